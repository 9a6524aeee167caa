"""proxy(): a bidirectional relay of two splices, with half-close forwarding.

``a → b`` (``forward``) and ``b → a`` (``reverse``). When one direction reaches
EOF, the other socket's write side is shut (``SHUT_WR``) so its peer sees the
FIN, and the other direction keeps running. When both have ended, both sockets
are closed. An error, an idle timeout, an unsplice or ``close()`` on either
direction ends both, and then both sockets are closed with a reset (RST), as a
transparent TCP path would: a peer must never mistake a cut relay for a
complete transfer. The pool owns both sockets from the call on: no
duplicates, so a proxied connection costs its two fds (plus a pooled pipe only
while data is in flight).
"""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Generator

from . import _sockets
from ._sockets import oserror
from .pool import _detach
from .splice import _DONE_LOCK, LIVE_STATES, EndReason, Splice, _Waitable

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from .pool import SplicePool

_RESET_ON_CLOSE = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends a RST

class Proxy(_Waitable):
    """Handle of a running relay: ``forward`` (a → b) and ``reverse`` (b → a) splices.

    ``done()`` once both have ended and both sockets are closed; ``reason`` is
    EOF when both directions ended by EOF, else the first other reason. A relay
    that did not end by EOF both ways closes both sockets with a RST.
    """

    __slots__ = ("pool", "half_close", "forward", "reverse", "_first_reason", "_left", "__weakref__")

    def __init__(self, pool: SplicePool, half_close: bool) -> None:
        _Waitable.__init__(self)
        self.pool = pool
        self.half_close = half_close
        self.forward: Splice = None  # type: ignore[assignment]  # set by SplicePool.proxy
        self.reverse: Splice = None  # type: ignore[assignment]
        self._first_reason: EndReason | None = None  # the first direction's end that was not EOF
        self._left = 2  # directions not done yet

    def __repr__(self) -> str:
        return (
            f"<Proxy {self.forward!r} <-> {self.reverse!r} reason="
            f"{self.reason.name if self.reason else None}>"
        )

    # -- results ------------------------------------------------------------
    @property
    def reason(self) -> EndReason | None:
        """None while running; EOF if both directions ended by EOF, else the first other reason."""
        if not self._ended:
            return None
        return self._first_reason or EndReason.EOF

    @property
    def error(self) -> OSError | None:
        """The error that ended the relay, if one did (from either direction)."""
        return self.forward.error or self.reverse.error

    def wait(self, timeout: float | None = None) -> EndReason:
        """Block until the relay has ended; return ``reason``. ``TimeoutError`` on timeout."""
        if not self._wait_done(timeout):
            raise TimeoutError(f"proxy still running after {timeout} s: {self!r}")
        reason = self.reason
        assert reason is not None
        return reason

    def __await__(self) -> Generator[Any, None, EndReason]:
        """``await proxy`` in asyncio: wait without blocking the loop, return ``reason``."""
        from .aio import wait_async

        return wait_async(self).__await__()  # type: ignore[arg-type]

    def close(self) -> None:
        """Abort the relay: end both directions now; the sockets are closed once they are done."""
        for sp in (self.forward, self.reverse):
            if sp.state in LIVE_STATES:
                try:
                    self.pool._unsplice_splice(sp)
                except (OSError, RuntimeError):
                    pass  # it ended meanwhile, or the pool is closing and ends it

    # -- called by the worker, before the direction's endpoints are released -----
    def _other(self, sp: Splice) -> Splice:
        """The direction that is not ``sp``."""
        return self.reverse if sp is self.forward else self.forward

    def _direction_ending(self, sp: Splice) -> None:
        """One direction is about to be done (its worker's thread; its sockets still open)."""
        other = self._other(sp)
        if sp.reason is EndReason.EOF and self.half_close:
            # Forward the half-close: the peer behind the drain sees our FIN.
            try:
                sp._dst.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone: the other direction will find out
        else:
            with _DONE_LOCK:
                if self._first_reason is None:
                    self._first_reason = sp.reason
            if self._first_reason is not EndReason.EOF:
                # Cut short: each peer gets a RST when the pool closes the sockets, not a
                # FIN that would look like the end of a complete transfer.
                for ep in (sp._src, sp._dst):
                    try:
                        ep.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
                    except OSError:
                        pass  # AF_UNIX has no RST; a socket already reset needs none
            if other.state in LIVE_STATES:
                self.pool._abort(other)

    def _direction_done(self, sp: Splice) -> None:
        """One direction is done (its worker's thread): the second one completes the relay."""
        with _DONE_LOCK:
            self._left -= 1
            if self._left:
                return
        self._complete()


def peer_gone(exc: BaseException, **sides: Any) -> str | None:
    """Which side had already lost its peer when ``proxy()`` (or ``splice()``) raised ``exc``.

    ``sides`` names the sockets, e.g. ``peer_gone(exc, client=c, upstream=u)``: the
    name of the first one with no peer (a client that reset before the relay could
    start) when ``exc`` is ``OSError(ENOTCONN)``, else None (any other error is not a
    peer going away). The failed call changed nothing: close both sockets yourself.
    """
    if not isinstance(exc, OSError) or exc.errno != errno.ENOTCONN:
        return None
    for name, sock in sides.items():
        try:
            sock.getpeername()
        except OSError:
            return name
    return None


def proxy(
    pool: SplicePool,
    a: Any,
    b: Any,
    *,
    idle: float | None = None,
    half_close: bool = True,
    wait: bool = True,
) -> Proxy:
    """Relay ``a`` ⇄ ``b`` on ``pool``; see ``SplicePool.proxy``."""
    a_fd = _sockets.fileno_of(a, "a")
    b_fd = _sockets.fileno_of(b, "b")
    idle = _sockets.check_idle(idle)
    pool._check_open()
    a_info = _sockets.probe(a, a_fd, "a")
    b_info = _sockets.probe(b, b_fd, "b")
    _sockets.validate_limits(0, idle)
    if a_info.key == b_info.key:
        raise oserror(errno.EINVAL, f"{a_info.label} and {b_info.label} are one socket: a proxy joins two")
    _sockets.check_spliceable(a_info)
    _sockets.check_spliceable(b_info)
    relay = Proxy(pool, half_close)
    with pool._lock:
        pool._check_open()
        pool._check_free(a_info, b_info)
        pool._check_free(b_info, a_info)
        fwd_plan = pool._prepare(a, a_info, b, b_info, True)
        try:
            rev_plan = pool._prepare(b, b_info, a, a_info, True, index=fwd_plan[7])
        except BaseException:
            pool._undo(fwd_plan)
            raise
        fwd = pool._commit(fwd_plan, 0, idle)
        rev = pool._commit(rev_plan, 0, idle)
        relay.forward, relay.reverse = fwd, rev
        fwd._proxy = rev._proxy = relay
        acks = [pool._post(fwd, wait), pool._post(rev, wait)]
    _detach(a, b)  # the pool owns them now, even if this greenlet is killed while waiting
    for ack in acks:
        if ack is not None:
            ack.wait()
    return relay
