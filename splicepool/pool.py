"""SplicePool: checks, worker assignment, and who splices what.

This is FreeBSD's ``so_splice`` / ``so_unsplice`` side: it validates a
request in the kernel's order, takes its own duplicates of the fds (or the
sockets themselves, when handed over), assigns a worker (round-robin, or the
worker of a live splice sharing a socket: see ``_choose_worker``) and hands
the splice to it. The workers do everything else. docs/contract.md says what
users may rely on.
"""

from __future__ import annotations

import errno
import os
import sys

from . import _sockets, _hub, _native
from ._sockets import SockInfo, oserror
from .splice import LIVE_STATES, EndReason, Splice, SpliceState
from .worker import Worker
from .xfer import HAVE_SPLICE

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from .proxy import Proxy

__all__ = ["SplicePool"]

_RECORDS_MIN = 1024  # ended-splice counters kept before pruning closed sockets
# States in which a splice's own worker may end it at once (no pass of it is running).
_BETWEEN_PASSES = frozenset({SpliceState.IDLE, SpliceState.QUEUED})


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
        "label",
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
    )

    def __init__(self, info: SockInfo, fd: int, dup: bool) -> None:
        self.key = info.key
        self.fd = fd
        self.label = info.desc  # no role: it may be a source here and a drain there
        self.dup = dup  # fd is the pool's duplicate (closed by the pool)
        self.owned = False  # the caller handed the socket over: close its fd(s) too
        self.adopted: tuple[int, ...] = ()  # caller fds handed over besides self.fd (rare)
        self.refs = 0
        self.error = 0  # a socket error a drain check took off the socket (SO_ERROR clears it)
        self.connecting = not info.connected
        self.outq = sys.platform.startswith("linux")  # SIOCOUTQ gives the drain's queue
        self.sndbuf = 0
        self.sndbuf_age = 1 << 30  # read SO_SNDBUF on the first pass
        self.space = 0  # free send buffer at the last SIOCOUTQ, less what was sent since
        self.look: tuple[int, float] | None = None  # (send queue, when): see Worker._idle_expired
        self.urgent = False  # TCP urgent data was reported: reads may stop at its mark
        self.src_of: Splice | None = None  # the live splice reading from it
        self.drain_of: Splice | None = None  # the splice (not done) writing into it
        self.was_blocking = os.get_blocking(fd)
        self.sock = _sockets.wrap(fd)
        try:
            self.sock.setblocking(False)
        except BaseException:
            self.sock.detach()
            raise

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


def _detach(*objs: Any) -> None:
    """The pool owns these sockets now: make their objects forget the fds."""
    for obj in objs:
        if not isinstance(obj, int) and hasattr(obj, "detach"):
            obj.detach()


def _close(fd: int) -> None:
    try:
        _native.close(fd)
    except OSError:
        pass


class SplicePool:
    """A fixed pool of worker threads that splice sockets.

    ``workers`` (default: ``os.cpu_count()``) threads start lazily, on the first
    splice assigned to each. ``zero_copy=None`` uses ``os.splice`` where the
    platform has it, ``False`` forces the copy path. ``pipe_size`` sizes each
    splice's pipe (``F_SETPIPE_SZ``); ``copy_size`` the copy path's buffer.
    ``small_copy``: on the zero-copy path, a splice whose last read took fewer
    bytes than this reads next with ``recv_into`` up to this many (two plain
    syscalls beat two splices through a pipe for a request or a reply), most
    often right where the worker handles the event, without a queued pass; it
    goes back to splicing as soon as a read fills it. 0 always splices.
    ``hub`` picks what workers sleep on: ``"epoll"`` (edge-triggered, Linux),
    ``"selector"`` (level-triggered ``selectors.DefaultSelector``, what other
    systems get) or ``"auto"`` (epoll where there is one).
    ``backend="gevent"`` makes the workers greenlets on the gevent hub (no OS
    thread; use the pool from the hub's thread); with it, ``dispatch="direct"``
    runs each pass in the io watcher's callback instead of the worker greenlet.
    ``bind_cpus=True`` binds worker thread i to the i-th CPU the process may run
    on (round-robin, ``os.sched_setaffinity``), as FreeBSD binds its splice and
    KTLS threads; docs/performance.md says when it pays.
    A context manager: leaving the block calls ``close()``.
    """

    def __init__(
        self,
        workers: int | None = None,
        backend: str = "thread",
        *,
        pipe_size: int = 1 << 20,
        zero_copy: bool | None = None,
        copy_size: int = 256 * 1024,
        small_copy: int = 16 * 1024,
        hub: str = "auto",
        dispatch: str = "worker",
        bind_cpus: bool = False,
    ) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if isinstance(workers, bool) or not isinstance(workers, int):
            raise TypeError(f"workers must be an int, not {type(workers).__name__}")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        if backend not in ("thread", "gevent"):
            raise ValueError(f"unknown backend {backend!r}: expected 'thread' or 'gevent'")
        if dispatch not in ("worker", "direct"):
            raise ValueError(f"unknown dispatch {dispatch!r}: expected 'worker' or 'direct'")
        if dispatch == "direct" and backend != "gevent":
            raise ValueError("dispatch='direct' needs backend='gevent'")
        if backend == "gevent":
            try:
                import gevent  # noqa: F401
            except ImportError:
                raise ValueError("backend='gevent' needs gevent: pip install splicepool[gevent]") from None
        for name, value in (("pipe_size", pipe_size), ("copy_size", copy_size)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, not {type(value).__name__}")
            if value < 4096:
                raise ValueError(f"{name} must be at least 4096 bytes, not {value}")
        if isinstance(small_copy, bool) or not isinstance(small_copy, int):
            raise TypeError(f"small_copy must be an int, not {type(small_copy).__name__}")
        if small_copy < 0 or small_copy > copy_size:
            raise ValueError(f"small_copy must be between 0 and copy_size ({copy_size}), not {small_copy}")
        if bind_cpus and (backend != "thread" or not hasattr(os, "sched_setaffinity")):
            raise ValueError("bind_cpus=True needs backend='thread' and os.sched_setaffinity (Linux)")
        if hub not in _hub.HUBS:
            raise ValueError(f"unknown hub {hub!r}: expected one of {sorted(_hub.HUBS)}")
        if zero_copy and not HAVE_SPLICE:
            raise ValueError("zero_copy=True needs os.splice (Linux, Python >= 3.10)")
        self.backend = backend
        self.dispatch = dispatch
        self._zero_copy = HAVE_SPLICE if zero_copy is None else bool(zero_copy)
        self._pipe_size = pipe_size
        self._hub = _hub.HUBS[hub]
        self._copy_size = copy_size
        self._small_copy = small_copy
        self._bind_cpus = bool(bind_cpus)
        self._lock = _native.allocate_lock()
        self._workers: list[Worker | None] = [None] * workers
        self._next = 0
        self._closed = False
        self._endpoints: dict[int, Endpoint] = {}
        # Who splices what lives on the endpoints (lock held to change it): ep.src_of, the
        # live splice reading from it; ep.drain_of, the splice (not done) writing into it.
        # Ended splices by source key: (the caller's fd, the final count). While the ended
        # splice is still delivering its leftover the splice itself stands in for the count;
        # it is replaced once done, so no record keeps a splice or the caller's socket objects.
        self._records: dict[int, tuple[int, int | Splice]] = {}
        self._records_limit = _RECORDS_MIN
        if "gevent" in sys.modules:  # workers' log records go to this thread's hub
            from .gevent import adopt_current_hub

            adopt_current_hub()

    # -- context manager ---------------------------------------------------------
    def __enter__(self) -> SplicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"live={len(self._sources)}"
        return f"<SplicePool workers={len(self._workers)} {state}>"

    @property
    def _sources(self) -> dict[int, Splice]:
        """Live splices by source key (a snapshot of the endpoints' roles)."""
        return {key: ep.src_of for key, ep in list(self._endpoints.items()) if ep.src_of is not None}

    @property
    def _drains(self) -> dict[int, Splice]:
        """Splices not yet done by drain key (a snapshot of the endpoints' roles)."""
        return {key: ep.drain_of for key, ep in list(self._endpoints.items()) if ep.drain_of is not None}

    def _role(self, key: int, role: str) -> Splice | None:
        """The splice holding socket ``key`` as ``"src_of"`` or ``"drain_of"`` (lock held)."""
        ep = self._endpoints.get(key)
        return getattr(ep, role) if ep is not None else None

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def closed(self) -> bool:
        return self._closed

    # -- splice / unsplice ---------------------------------------------------------
    def splice(
        self,
        src: Any,
        dst: Any,
        max: int = 0,
        idle: float | None = None,
        close: bool = False,
    ) -> Splice:
        """Splice ``src`` into ``dst``; return the running ``Splice``.

        Returns once its worker has set the splice up and run its first pass, so
        data already in the source has started moving (at most one pass of
        another splice delays that). ``dst`` negative unsplices ``src`` (and
        returns that splice). Raises ``OSError`` with FreeBSD's errno for a bad
        request (docs/contract.md, "Errors"), ``ELOOP`` if ``src`` and ``dst`` are the two ends
        of one TCP connection, ``TypeError`` for bad types, ``RuntimeError`` if the pool
        is closed; a failed call changes nothing.
        """
        src_fd = _sockets.fileno_of(src, "source")
        if isinstance(dst, int) and not isinstance(dst, bool) and dst < 0:
            return self.unsplice(src)
        dst_fd = _sockets.fileno_of(dst, "drain")
        max = _sockets.check_max(max)
        idle = _sockets.check_idle(idle)
        self._check_open()
        src_info = _sockets.probe(src, src_fd, "source")
        dst_info = _sockets.probe(dst, dst_fd, "drain")
        _sockets.validate_limits(max, idle)
        _sockets.check_spliceable(src_info)
        _sockets.check_spliceable(dst_info)
        with self._lock:
            self._check_open()
            self._check_free(src_info, dst_info)
            plan = self._prepare(src, src_info, dst, dst_info, close)
            sp = self._commit(plan, max, idle)
            ack = self._post(sp)
        if close:  # before any wait: a greenlet killed while waiting must not keep them
            _detach(src, dst)
        if ack is not None:
            ack.wait()
        return sp

    def _check_free(self, src_info: SockInfo, dst_info: SockInfo) -> None:
        """The checks that depend on the sockets' state and the pool's (lock held)."""
        _sockets.check_endpoint(src_info, accept_connecting=True)
        busy = self._role(src_info.key, "src_of")
        if busy is not None:
            raise oserror(errno.EBUSY, f"{src_info.label} is already spliced (to drain {busy._dst.label})")
        _sockets.check_endpoint(dst_info, accept_connecting=True)
        busy = self._role(dst_info.key, "drain_of")
        if busy is not None:
            raise oserror(errno.EBUSY, f"{dst_info.label} is already the drain of source {busy._src.label}")
        _sockets.check_loop(src_info, dst_info)

    def _prepare(
        self, src: Any, src_info: SockInfo, dst: Any, dst_info: SockInfo, close: bool, index: int | None = None
    ) -> tuple[Any, ...]:
        """Everything that can fail: the endpoints (dups) and the worker (lock held).

        ``index`` picks the worker (``proxy()`` puts both directions on one);
        by default see ``_choose_worker``. ``_undo`` gives it all back;
        ``_commit`` cannot fail.
        """
        taken: list[Endpoint] = []
        turn = False
        try:
            taken.append(self._take_endpoint(src_info, close))
            taken.append(self._take_endpoint(dst_info, close))
            if index is None:
                index, turn = self._choose_worker(src_info, dst_info)
            self._worker(index)
        except BaseException:
            for ep in taken:
                self._put_endpoint(ep)
            raise
        if turn:
            self._next = (index + 1) % len(self._workers)
        return (src, src_info, dst, dst_info, close, taken[0], taken[1], index)

    def _choose_worker(self, src_info: SockInfo, dst_info: SockInfo) -> tuple[int, bool]:
        """(worker index, whether round-robin moved on) for a new splice (lock held).

        A splice that shares a socket with a live one (the reverse direction of a
        relay) joins that splice's worker: one registration per fd, one wakeup
        for both directions, and no second thread woken by every byte. Others
        go round-robin.
        """
        for other in (self._role(src_info.key, "drain_of"), self._role(dst_info.key, "src_of")):
            if other is not None and other._owner.accepting:
                return other.worker, False
        return self._next, True

    def _undo(self, plan: tuple[Any, ...]) -> None:
        self._put_endpoint(plan[5])
        self._put_endpoint(plan[6])

    def _commit(self, plan: tuple[Any, ...], max: int, idle: float | None) -> Splice:
        """Register a prepared splice as live (lock held; cannot fail)."""
        src, src_info, dst, dst_info, close, src_ep, dst_ep, index = plan
        if close:
            for ep, info in ((src_ep, src_info), (dst_ep, dst_info)):
                ep.owned = True
                if info.fd != ep.fd and info.fd not in ep.adopted:
                    ep.adopted += (info.fd,)
        sp = Splice(self, src, dst, max, idle or None, self._workers[index])
        sp._src, sp._dst = src_ep, dst_ep
        sp._user_fd = src_info.fd
        src_ep.src_of = sp
        dst_ep.drain_of = sp
        self._records.pop(src_info.key, None)
        return sp

    def _post(self, sp: Splice, wait: bool = True) -> _native.Event | None:
        """Hand a committed splice to its worker (lock held).

        Returns the event the worker sets once the splice is set up and its first
        pass has run; None if the caller does not ``wait``, or must not (see
        ``_must_not_wait``).
        """
        ack = None if not wait or self._must_not_wait() else _native.Event()
        sp._owner.post(("add", sp, ack))
        return ack

    def _on_worker_thread(self) -> Worker | None:
        """The worker we are running in (a done callback), if any."""
        for worker in self._workers:
            if worker is not None and worker.is_current():
                return worker
        return None

    def _must_not_wait(self) -> bool:
        """True where waiting for a worker could deadlock: in a worker (a done callback), or
        in a gevent hub's own greenlet (where direct dispatch runs callbacks), which must
        never block or switch out."""
        if self._on_worker_thread() is not None:
            return True
        if "gevent" in sys.modules:
            from .gevent import in_hub_greenlet

            return in_hub_greenlet()
        return False

    def _take_endpoint(self, info: SockInfo, close: bool) -> Endpoint:
        ep = self._endpoints.get(info.key)
        if ep is None:
            if close:
                ep = Endpoint(info, info.fd, dup=False)
            else:
                try:
                    fd = os.dup(info.fd)
                except OSError as exc:
                    raise oserror(exc.errno or errno.EMFILE, f"cannot duplicate {info.label}") from exc
                try:
                    if _sockets.socket_key(fd) != info.key:
                        raise oserror(errno.EBADF, f"{info.label} was closed during the call")
                    ep = Endpoint(info, fd, dup=True)
                except BaseException:
                    _close(fd)
                    raise
            self._endpoints[info.key] = ep
        ep.refs += 1
        return ep

    def _put_endpoint(self, ep: Endpoint) -> None:
        ep.refs -= 1
        if ep.refs <= 0:
            del self._endpoints[ep.key]
            ep.release()

    def _worker(self, index: int) -> Worker:
        worker = self._workers[index]
        if worker is None or not worker.accepting:
            worker = self._new_worker(index)
            try:
                worker.start()
            except BaseException:
                worker.pipes.close()
                worker.hub.close()
                raise
            self._workers[index] = worker
        return worker

    def _new_worker(self, index: int) -> Worker:
        if self.backend == "gevent":
            from ._gevent_backend import GeventWorker

            return GeventWorker(self, index, direct=self.dispatch == "direct")
        return Worker(self, index, self._hub())

    def unsplice(self, src: Any) -> Splice:
        """Stop splicing ``src`` (FreeBSD's ``so_unsplice``) and return that splice.

        Returns once the worker has finished any chunk in flight; nothing more is
        taken from the source. Raises ``OSError`` EINVAL for a listening socket,
        ENOTCONN if ``src`` is not a spliced source, ``RuntimeError`` if the pool
        is closed.
        """
        src_fd = _sockets.fileno_of(src, "source")
        self._check_open()
        info = _sockets.probe(src, src_fd, "source")
        if info.listening:
            raise oserror(errno.EINVAL, f"{info.label} is listening: nothing to unsplice")
        with self._lock:
            sp = self._role(info.key, "src_of")
        if sp is None:
            raise oserror(errno.ENOTCONN, f"{info.label} is not spliced (as a source)")
        self._unsplice_splice(sp)
        return sp

    def _unsplice_splice(self, sp: Splice) -> None:
        """End ``sp`` with UNSPLICED once its chunk in flight is done (see ``unsplice``).

        From a worker thread it never waits: on the splice's own worker it acts at
        once, on another it posts the request.
        """
        with self._lock:
            self._check_open()
            if sp._src.src_of is not sp:
                raise oserror(errno.ENOTCONN, f"source {sp._src.label} is not spliced (as a source)")
            now, ack = self._request_unsplice(sp, wait=True)
        if now:
            sp._owner.end_now(sp, EndReason.UNSPLICED)
        elif ack is not None:
            ack.wait()

    def _abort(self, sp: Splice) -> None:
        """End ``sp`` with UNSPLICED without waiting, from any thread; nothing if it has ended."""
        with self._lock:
            if sp._src.src_of is not sp:
                return
            now, _ = self._request_unsplice(sp, wait=False)
        if now:
            sp._owner.end_now(sp, EndReason.UNSPLICED)

    def _request_unsplice(self, sp: Splice, wait: bool) -> tuple[bool, _native.Event | None]:
        """How ``sp``'s worker is to end it with UNSPLICED (lock held): (at once, event to wait for).

        On its own worker, between passes, the caller ends it at once, once it has let go
        of the lock. A splice its worker has not taken up yet (INIT: its "add" message is
        still queued) or one in a pass is ended by a message, which the worker handles in
        order, after the "add". Nobody waits where waiting could deadlock
        (``_must_not_wait``), nor for an exiting worker, which ends its splices itself.
        """
        worker = sp._owner
        if not worker.accepting:
            return False, None
        if worker.is_current() and sp.state in _BETWEEN_PASSES:
            return True, None
        ack = _native.Event() if wait and not self._must_not_wait() else None
        worker.post(("unsplice", sp, ack))
        return False, ack

    def proxy(
        self, a: Any, b: Any, *, idle: float | None = None, half_close: bool = True, wait: bool = True
    ) -> Proxy:
        """Relay ``a`` ⇄ ``b``: splices a → b and b → a; return the ``Proxy``.

        The pool owns both sockets from the call on and closes them once both
        directions have ended. EOF one way shuts the other socket's write side
        (``half_close``, default) and the reverse keeps running; with
        ``half_close=False`` it ends both. An error, ``idle`` seconds with no
        byte moved either way (nor leaving either socket's send queue), or
        ``Proxy.close()`` ends both, and then both peers get a RST, never a FIN
        that would pass for a complete transfer. Errors as for ``splice``,
        checked for a → b then b → a; a failed call changes nothing. A client
        that has already reset is no longer connected: that is
        ``OSError(ENOTCONN)``, and the caller still owns both sockets and must
        close them. Returns once both directions have run their first pass, like ``splice``;
        ``wait=False`` returns as soon as they are handed to their worker (an
        accept loop then never waits for a worker thread).
        """
        from .proxy import proxy

        return proxy(self, a, b, idle=idle, half_close=half_close, wait=wait)

    # -- counters ------------------------------------------------------------------
    def transferred(self, src: Any) -> int:
        """Bytes moved by the most recent splice whose source is ``src`` (like getsockopt(SO_SPLICE)).

        The running total while spliced, the final total after it ended, 0 if
        never spliced. Raises ``OSError`` EBADF if ``src`` is not open.
        """
        fd = _sockets.fileno_of(src, "source")
        try:
            key = _sockets.socket_key(fd)
        except (OSError, OverflowError) as exc:
            raise oserror(errno.EBADF, f"source fd {fd} is not an open file descriptor") from exc
        with self._lock:
            sp = self._role(key, "src_of")
            if sp is None:
                record = self._records.get(key)
                if record is None:
                    return 0
                sp = record[1]
        return sp if type(sp) is int else sp.transferred

    # -- called by workers ---------------------------------------------------------------
    def _source_ended(self, sp: Splice) -> None:
        """The splice stopped taking from its source: free the source, keep its counter."""
        src = sp._src
        with self._lock:
            if src.src_of is sp:
                src.src_of = None
            if src.owned:
                return  # the pool closes it: its counter dies with it
            self._records[src.key] = (sp._user_fd, sp)
            if len(self._records) > self._records_limit:
                self._prune_records()

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

    def _drain_failed(self, ep: Endpoint, worker: Worker) -> None:
        """``worker`` read a socket error off ``ep``: the splice draining into it must end too.

        With its own source silent, nothing else would wake it: a level-triggered
        hub does not watch a drain for errors, and the read took the socket's error.
        """
        with self._lock:
            sp = ep.drain_of
            if sp is None or sp.state not in LIVE_STATES:
                return
            owner = sp._owner
            if not owner.accepting:
                return
            if owner is not worker:
                owner.post(("check_drain", sp))
                return
        worker.check_drain(sp)

    def _splice_done(self, sp: Splice) -> None:
        """Nothing of the splice is in flight (its worker freed the drain): free the endpoints,
        and keep only its final count in the records."""
        with self._lock:
            key = sp._src.key
            record = self._records.get(key)
            if record is not None and record[1] is sp:
                self._records[key] = (record[0], sp.transferred)
            self._put_endpoint(sp._src)
            self._put_endpoint(sp._dst)

    # -- closing and stats ---------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("splicepool: the pool is closed")

    def close(self, grace: float = 1.0) -> None:
        """End every live splice with POOL_CLOSED and stop the workers.

        Data not yet moved stays in the sources; pipe leftovers get ``grace``
        seconds to reach their drains. Joins the workers and leaves no thread or
        fd behind. Idempotent. Called from a done callback (a worker thread) it
        signals the workers and returns without joining them. Raises ``TypeError``
        if ``grace`` is not a number of seconds, ``ValueError`` if it is negative
        or NaN; the pool is then left as it was.
        """
        if isinstance(grace, bool) or not isinstance(grace, (int, float)):
            raise TypeError(f"grace must be seconds as an int or float, not {type(grace).__name__}")
        if not grace >= 0:
            raise ValueError(f"grace must be zero or more seconds, not {grace}")
        with self._lock:
            already = self._closed
            self._closed = True
            workers = [w for w in self._workers if w is not None]
            for worker in workers:
                if worker.accepting and not already:
                    worker.post(("close", grace))
        if self._must_not_wait():
            return  # from a done callback: joining could wait on a worker joining us
        for worker in workers:
            worker.join()

    def stats(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: live splices, bytes moved, and per-worker counters."""
        workers = []
        with self._lock:
            live = len(self._sources)
            for index, worker in enumerate(self._workers):
                if worker is None:
                    workers.append(
                        {"index": index, "live": 0, "bytes": 0, "passes": 0, "wakeups": 0,
                         "zero_copy": 0, "copy": 0, "started": False}
                    )
                    continue
                workers.append(
                    {
                        "index": index,
                        "live": sum(1 for sp in worker.assigned() if sp.state in LIVE_STATES),
                        "bytes": worker.bytes,
                        "passes": worker.passes,
                        "wakeups": worker.wakeups,
                        "zero_copy": worker.zero_copy,
                        "copy": worker.copy,
                        "started": True,
                        "pipes_created": worker.pipes.created,
                        "pipes_idle": worker.pipes.idle,
                    }
                )
        return {
            "live": live,
            "bytes": sum(w["bytes"] for w in workers),
            "zero_copy": self._zero_copy,
            "workers": workers,
        }


