"""A relay: two splices, ``a → b`` (``forward``) and ``b → a`` (``reverse``), and their ends.

When one direction reaches EOF, the other socket's write side is shut
(``SHUT_WR``) so its peer sees the FIN, and the other direction keeps
running (for the second direction of a relay whose sockets the pool alone
holds, the close that follows at once sends that FIN). When both have ended, both sockets are closed. An error, an idle
timeout, an unsplice or ``close()`` on either direction ends both, and then
both sockets are closed with a reset (RST), as a transparent TCP path would:
a peer must never mistake a cut relay for a complete transfer. The pool owns
both sockets from the call on: no duplicates, so a proxied connection costs
its two fds (plus a pooled pipe only while data is in flight).

The engine tells ``LISTENER`` of each direction's end; the ``Proxy`` handle
keeps the relay's own books, so a relay is one object besides its splices.
"""

from __future__ import annotations

import errno
import socket

from . import engine
from ._sockets import reset_on_close
from .splice import Splice, is_live
from .state import DONE_LOCK, EndReason, Waitable

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any


class Proxy(Waitable):
    """Handle of a running relay: ``forward`` (a → b) and ``reverse`` (b → a) splices.

    ``done()`` once both have ended and both sockets are closed; ``reason`` is
    EOF when both directions ended by EOF, else the first other reason. A relay
    that did not end by EOF both ways closes both sockets with a RST.
    """

    __slots__ = ("pool", "half_close", "forward", "reverse", "_first_reason", "_left", "__weakref__")

    def __init__(self, pool: Any, half_close: bool) -> None:
        Waitable.__init__(self)
        self.pool = pool
        self.half_close = half_close
        self.forward: Splice = None  # type: ignore[assignment]  # set by join()
        self.reverse: Splice = None  # type: ignore[assignment]
        self._first_reason: EndReason | None = None  # the first direction's end that was not EOF
        self._left = 2  # directions not done yet

    def join(self, forward: Splice, reverse: Splice) -> None:
        """Make ``forward`` and ``reverse`` its directions (the pool, before they start)."""
        self.forward, self.reverse = forward, reverse
        forward.relay = reverse.relay = self
        forward.peer, reverse.peer = reverse, forward

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

    def close(self) -> None:
        """Abort the relay: end both directions now; the sockets are closed once they are done."""
        for sp in (self.forward, self.reverse):
            if is_live(sp):
                try:
                    engine.unsplice(sp)
                except (OSError, RuntimeError):
                    pass  # it ended meanwhile, or the pool is closing and ends it

    # -- one direction's end (its worker's thread) ---------------------------------------
    def _direction_ending(self, sp: Splice) -> None:
        """``sp`` is about to be done; its sockets are still open."""
        other = sp.peer
        if sp.reason is EndReason.EOF and self.half_close:
            # Forward the half-close: the peer behind the drain sees our FIN. When the
            # other direction is done (by EOF) and the pool holds the drain's only fd, the
            # close that follows at once sends that FIN: no shutdown() needed first.
            if self._left == 1 and self._first_reason is None and sp.dst.sole:
                return
            try:
                sp.dst.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # already gone: the other direction will find out
            return
        with DONE_LOCK:
            if self._first_reason is None:
                self._first_reason = sp.reason
        if self._first_reason is not EndReason.EOF:
            # Cut short: each peer gets a RST when the pool closes the sockets, not a
            # FIN that would look like the end of a complete transfer.
            for ep in (sp.src, sp.dst):
                reset_on_close(ep.sock)
        if is_live(other):
            engine.unsplice(other, wait=False, strict=False)

    def _direction_done(self) -> None:
        """One direction is done: the second one completes the relay."""
        with DONE_LOCK:
            self._left -= 1
            if self._left:
                return
        self._complete()


class _Listener:
    """What the engine tells a relay (``Worker.listener``)."""

    __slots__ = ()

    def ending(self, sp: Splice) -> None:
        sp.relay._direction_ending(sp)

    def done(self, sp: Splice) -> None:
        sp.relay._direction_done()


LISTENER = _Listener()


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
