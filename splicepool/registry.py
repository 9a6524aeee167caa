"""Who splices what: the pool's endpoints, their roles, and the lock that guards them.

FreeBSD keeps a splice on its two sockets (``so_splice``, ``so_splice_back``)
under the socket locks. Here each socket the pool holds is one ``Endpoint``,
shared by every splice that uses it; ``src_of`` is the live splice reading
from it, ``drain_of`` the splice (not done) writing into it. Every change of
a role happens in this module, under ``Registry.lock``: ``claim`` when a
splice starts, ``source_ended`` when it stops taking from its source,
``drain_released`` and ``release`` when it is done.
"""

from __future__ import annotations

import errno
import os
import sys

from . import _native, _sockets
from ._sockets import SockInfo, oserror

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

_RECORDS_MIN = 1024  # ended-splice counters kept before pruning closed sockets


class Endpoint:
    """One socket as the pool holds it, shared by every splice that uses it.

    ``fd`` is the pool's own duplicate, or the caller's fd when the socket was
    handed over (``close=True``). The duplicate shares the file description
    with the caller's socket, so the caller closing theirs cannot make a worker
    touch a reused fd number.
    """

    __slots__ = (
        "key",
        "fd",
        "sock",
        "given_label",
        "peer",
        "error",
        "dup",
        "owned",
        "adopted",
        "was_blocking",
        "refs",
        "connecting",
        "outq",
        "sndbuf",
        "sndbuf_age",
        "space",
        "look",
        "urgent",
        "src_of",
        "drain_of",
        "sole",
    )

    def __init__(self, key: int, fd: int, label: str | None, dup: bool, connecting: bool,
                 sock: Any = None) -> None:
        self.key = key
        self.fd = fd
        self.given_label = label  # no role: it may be a source here and a drain there
        self.peer: Any = None  # adopted: its peer, for a label made only when asked (label)
        self.dup = dup  # fd is the pool's duplicate (closed by the pool)
        self.owned = False  # the caller handed the socket over: close its fd(s) too
        self.adopted: tuple[int, ...] = ()  # caller fds handed over besides self.fd (rare)
        self.refs = 0
        self.error = 0  # a socket error a drain check took off the socket (SO_ERROR clears it)
        self.connecting = connecting
        self.outq = sys.platform.startswith("linux")  # SIOCOUTQ gives the drain's queue
        self.sndbuf = 0
        self.sndbuf_age = 1 << 30  # read SO_SNDBUF on the first pass
        self.space = 0  # free send buffer at the last SIOCOUTQ, less what was sent since
        self.look: tuple[int, float] | None = None  # (send queue, when): see the idle timer
        self.urgent = False  # TCP urgent data was reported: reads may stop at its mark
        self.src_of: Any = None  # the live splice reading from it
        self.drain_of: Any = None  # the splice (not done) writing into it
        # The pool holds the only fd of the socket (Registry.adopt): its close is the
        # socket's close (no epoll_ctl DEL needed first, and it sends the FIN).
        self.sole = False
        if sock is not None:  # handed over whole, already non-blocking (Registry.adopt)
            self.was_blocking = False
            self.sock = sock
            return
        self.was_blocking = os.get_blocking(fd)
        self.sock = _sockets.wrap(fd)
        try:
            self.sock.setblocking(False)
        except BaseException:
            self.sock.detach()
            raise

    @property
    def label(self) -> str:
        """The socket as messages name it (``fd 7 (-> 127.0.0.1:8000)``). An adopted socket's
        is made when asked, from its ``peer``: a message is rare, and the caller keeps that
        address anyway (the server: the client as it logs it, the backend's address), where
        a string each would be 154 bytes per proxied connection."""
        label = self.given_label
        return label if label is not None else _sockets.made_label(self.fd, self.peer)

    def release(self) -> None:
        """The last splice using it is done: restore the blocking mode, close what the pool holds."""
        sock, self.sock = self.sock, None
        if sock is not None:
            sock.detach()
        if self.owned:
            for fd in (self.fd, *self.adopted):
                _close(fd)
            return
        if self.was_blocking:
            try:
                os.set_blocking(self.fd, True)
            except OSError:
                pass
        if self.dup:
            _close(self.fd)


def _close(fd: int) -> None:
    try:
        _native.close(fd)
    except OSError:
        pass


class Registry:
    """The pool's sockets by key, their roles, the ended splices' counters, and the lock."""

    def __init__(self) -> None:
        self.lock = _native.allocate_lock()
        self.closed = False  # set once, by pool.close() (lock held)
        self._endpoints: dict[int, Endpoint] = {}
        # Ended splices by source key: (the caller's fd, the final count). While the ended
        # splice is still delivering its leftover the splice itself stands in for the count;
        # it is replaced once done, so no record keeps a splice or the caller's socket objects.
        self._records: dict[int, tuple[int, Any]] = {}
        self._records_limit = _RECORDS_MIN

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("splicepool: the pool is closed")

    # -- looking (lock held) ------------------------------------------------------------
    def source_of(self, key: int) -> Any:
        """The live splice reading from socket ``key``, or None."""
        ep = self._endpoints.get(key)
        return ep.src_of if ep is not None else None

    def drain_of(self, key: int) -> Any:
        """The splice (not done) writing into socket ``key``, or None."""
        ep = self._endpoints.get(key)
        return ep.drain_of if ep is not None else None

    def check_free(self, src_info: SockInfo, dst_info: SockInfo) -> None:
        """The checks that depend on the sockets' state and the pool's, in FreeBSD's order."""
        _sockets.check_endpoint(src_info, accept_connecting=True)
        busy = self.source_of(src_info.key)
        if busy is not None:
            raise oserror(errno.EBUSY, f"{src_info.label} is already spliced (to drain {busy.dst.label})")
        _sockets.check_endpoint(dst_info, accept_connecting=True)
        busy = self.drain_of(dst_info.key)
        if busy is not None:
            raise oserror(errno.EBUSY, f"{dst_info.label} is already the drain of source {busy.src.label}")
        _sockets.check_loop(src_info, dst_info)

    def snapshot(self) -> tuple[dict[int, Any], dict[int, Any], dict[int, int]]:
        """(live splices by source key, splices not done by drain key, endpoint refs by key)."""
        with self.lock:
            eps = list(self._endpoints.values())
        return (
            {ep.key: ep.src_of for ep in eps if ep.src_of is not None},
            {ep.key: ep.drain_of for ep in eps if ep.drain_of is not None},
            {ep.key: ep.refs for ep in eps},
        )

    def records(self) -> int:
        """How many ended splices' counters are kept (pruned as their sockets close)."""
        return len(self._records)

    def live(self) -> int:
        """Live splices (lock held)."""
        return sum(1 for ep in self._endpoints.values() if ep.src_of is not None)

    # -- claiming (lock held) -----------------------------------------------------------
    def take(self, info: SockInfo, close: bool) -> Endpoint:
        """The endpoint of ``info``'s socket, made (with the pool's own dup) on first use."""
        ep = self._endpoints.get(info.key)
        if ep is None:
            if close:
                ep = Endpoint(info.key, info.fd, info.desc, False, not info.connected)
            else:
                try:
                    fd = os.dup(info.fd)
                except OSError as exc:
                    raise oserror(exc.errno or errno.EMFILE, f"cannot duplicate {info.label}") from exc
                try:
                    if _sockets.socket_key(fd) != info.key:
                        raise oserror(errno.EBADF, f"{info.label} was closed during the call")
                    ep = Endpoint(info.key, fd, info.desc, True, not info.connected)
                except BaseException:
                    _close(fd)
                    raise
            self._endpoints[info.key] = ep
        ep.refs += 1
        return ep

    def adopt(self, key: int, fd: int, peer: Any, sock: Any, refs: int) -> Endpoint:
        """A socket handed over whole by a caller that made it (``SplicePool.proxy_accepted``):
        an owned endpoint on its ``sock``, used ``refs`` times, labelled by its ``peer``
        (``_sockets.made_label``). EBUSY, changing nothing, if the pool holds that socket
        already (it cannot, for a socket the caller just made)."""
        if key in self._endpoints:
            raise oserror(errno.EBUSY, f"{_sockets.made_label(fd, peer)} is held by the pool already")
        ep = Endpoint(key, fd, None, False, False, sock)
        ep.peer = peer
        ep.owned = ep.sole = True
        ep.refs = refs
        self._endpoints[key] = ep
        return ep

    def forget(self, ep: Endpoint) -> None:
        """Undo ``adopt`` (its caller keeps the socket)."""
        del self._endpoints[ep.key]

    def put(self, ep: Endpoint) -> None:
        """Give back one use of ``ep``; the last one releases the socket."""
        ep.refs -= 1
        if ep.refs <= 0:
            del self._endpoints[ep.key]
            ep.release()

    def claim(self, sp: Any, src: Endpoint, dst: Endpoint, src_info: SockInfo, dst_info: SockInfo,
              close: bool) -> None:
        """``sp`` reads from ``src`` and writes into ``dst`` from now on (cannot fail)."""
        if close:
            for ep, info in ((src, src_info), (dst, dst_info)):
                ep.owned = True
                if info.fd != ep.fd and info.fd not in ep.adopted:
                    ep.adopted += (info.fd,)
        sp.src, sp.dst = src, dst
        sp.user_fd = src_info.fd
        src.src_of = sp
        dst.drain_of = sp
        self._records.pop(src_info.key, None)

    def claim_owned(self, sp: Any, src: Endpoint, dst: Endpoint) -> None:
        """``claim`` for adopted endpoints: the pool owns both, the caller keeps no fd."""
        sp.src, sp.dst = src, dst
        sp.user_fd = src.fd
        src.src_of = sp
        dst.drain_of = sp
        self._records.pop(src.key, None)

    # -- letting go (the splice's worker) ---------------------------------------------------
    def source_ended(self, sp: Any) -> None:
        """``sp`` stopped taking from its source: free the source, keep its counter."""
        src = sp.src
        with self.lock:
            if src.src_of is sp:
                src.src_of = None
            if src.owned:
                return  # the pool closes it: its counter dies with it
            self._records[src.key] = (sp.user_fd, sp)
            if len(self._records) > self._records_limit:
                self._prune_records()

    def drain_released(self, sp: Any) -> None:
        """Nothing more of ``sp`` goes into its drain: another splice may take it now."""
        dst = sp.dst
        with self.lock:
            if dst.drain_of is sp:
                dst.drain_of = None

    def release(self, sp: Any) -> None:
        """``sp`` is done: free its endpoints, and keep only its final count."""
        with self.lock:
            key = sp.src.key
            record = self._records.get(key)
            if record is not None and record[1] is sp:
                self._records[key] = (record[0], sp.transferred)
            self.put(sp.src)
            self.put(sp.dst)

    def transferred(self, key: int) -> int:
        """Bytes moved by the most recent splice reading from socket ``key``."""
        with self.lock:
            sp = self.source_of(key)
            if sp is None:
                record = self._records.get(key)
                if record is None:
                    return 0
                sp = record[1]
        return sp if type(sp) is int else sp.transferred

    def _prune_records(self) -> None:
        """Forget counters of sources the caller has closed (fd gone or reused)."""
        stale = []
        for key, (fd, _sp) in self._records.items():
            try:
                if fd < 0 or _sockets.socket_key(fd) != key:
                    stale.append(key)
            except OSError:
                stale.append(key)
        for key in stale:
            del self._records[key]
        self._records_limit = max(_RECORDS_MIN, 2 * len(self._records))
