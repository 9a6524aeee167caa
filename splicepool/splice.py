"""The ``Splice`` handle, its states and end reasons.

The state machine is FreeBSD's (``enum so_splice_state``). Every legal move is
in ``TRANSITIONS`` below; ``Splice._set_state`` is the one place a state
changes, and only the splice's own worker calls it, so a pass and a state
change never race. Other threads only read ``state`` and wait for ``done()``.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Generator

from . import _native

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from .pool import SplicePool


class SpliceState(enum.Enum):
    """Where a splice is in its life (FreeBSD's ``SPLICE_*`` states)."""

    INIT = "init"  # created by pool.splice(), not yet taken up by its worker
    IDLE = "idle"  # waiting for the source to be readable or the drain writable
    QUEUED = "queued"  # on its worker's ready queue
    RUNNING = "running"  # its worker is in an xfer pass for it
    CLOSING = "closing"  # unspliced (by the user or pool.close); the pipe leftover is being delivered
    CLOSED = "closed"  # ended, nothing in flight: done() is true
    EXCEPTION = "exception"  # ended by itself (EOF, max, idle, error); finishing like CLOSING

    # Members are singletons: hash by identity, in C (Enum's own __hash__ is Python
    # code, and every state change looks a state up in TRANSITIONS).
    __hash__ = object.__hash__


S = SpliceState

#: Every legal move, and who makes it (always the splice's worker).
TRANSITIONS: dict[SpliceState, frozenset[SpliceState]] = {
    # The worker takes up a new splice and queues its first pass (data already in
    # the source moves at once); CLOSED if it could not be set up.
    S.INIT: frozenset({S.QUEUED, S.CLOSED}),
    # Readiness (or a requeue) queues it; unsplice/pool.close makes it CLOSING;
    # the idle timer makes it EXCEPTION.
    S.IDLE: frozenset({S.QUEUED, S.CLOSING, S.EXCEPTION}),
    S.QUEUED: frozenset({S.RUNNING, S.CLOSING, S.EXCEPTION}),
    # After a pass: wait for readiness, requeue (data and space remain, fairness),
    # or end by itself (EOF, max, error).
    S.RUNNING: frozenset({S.IDLE, S.QUEUED, S.EXCEPTION}),
    # Once the pipe leftover is delivered (or dropped) and the fds released.
    S.CLOSING: frozenset({S.CLOSED}),
    S.EXCEPTION: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}

LIVE_STATES = frozenset({S.INIT, S.IDLE, S.QUEUED, S.RUNNING})


class EndReason(enum.Enum):
    """Why a splice ended."""

    EOF = "eof"  # the source reached EOF and everything before it was moved
    MAX = "max"  # exactly ``max`` bytes moved
    IDLE = "idle"  # no byte moved for ``idle`` seconds
    UNSPLICED = "unspliced"  # pool.splice(src, -1), pool.unsplice(src) or Splice.unsplice()
    ERROR = "error"  # a socket error on either side; see Splice.error
    POOL_CLOSED = "pool_closed"  # pool.close() while it was live


class SpliceStateError(RuntimeError):
    """An illegal state transition: a bug in splicepool, never the user's."""


# Guards every handle's event and callbacks (below); held for a few instructions at a
# time, so one lock for all costs nothing and saves a lock per splice.
_DONE_LOCK = _native.allocate_lock()


class _Waitable:
    """The "done" half of a handle (a Splice, a Proxy): a flag, callbacks, waiters.

    Nothing is allocated until someone waits or adds a callback: a relay that
    nobody waits on costs no event and no list. ``_complete()`` is called once,
    by the worker that ends it.
    """

    __slots__ = ("_ended", "_event", "_callbacks")

    def __init__(self) -> None:
        self._ended = False
        self._event: _native.Event | None = None  # made by the first waiter
        # None, the one callback (most handles have at most one), or a list of them.
        self._callbacks: Callable[[Any], Any] | list[Callable[[Any], Any]] | None = None

    def done(self) -> bool:
        """True once it has ended and nothing of it is left in flight."""
        return self._ended

    def _wait_done(self, timeout: float | None) -> bool:
        """Wait until done (yielding to the hub in a gevent greenlet); False on timeout."""
        if self._ended:
            return True
        with _DONE_LOCK:
            if self._ended:
                return True
            event = self._event
            if event is None:
                event = self._event = _native.Event()
        return event.wait(timeout)

    def add_done_callback(self, fn: Callable[[Any], Any]) -> None:
        """Call ``fn(handle)`` once it has ended (at once, here, if it already has).

        The call normally happens in a worker thread: keep it short, never block
        in it. An exception it raises is logged and ignored.
        """
        with _DONE_LOCK:
            if not self._ended:
                callbacks = self._callbacks
                if callbacks is None:
                    self._callbacks = fn
                elif type(callbacks) is list:
                    callbacks.append(fn)
                else:
                    self._callbacks = [callbacks, fn]
                return
        _run_callback(fn, self)

    def _complete(self) -> None:
        """Mark done and wake everyone: waiters, then the callbacks (the worker's thread)."""
        with _DONE_LOCK:
            self._ended = True
            event, callbacks = self._event, self._callbacks
            self._event = self._callbacks = None
        if event is not None:
            event.set()
        if callbacks is not None:
            for fn in callbacks if type(callbacks) is list else (callbacks,):
                _run_callback(fn, self)


class Splice(_Waitable):
    """One running (or ended) splice: ``source`` into ``drain``.

    Created by ``SplicePool.splice()``; never instantiate it yourself. Counters
    are exact: ``transferred`` counts bytes the drain accepted, ``dropped``
    bytes taken from the source that the drain never accepted.
    """

    __slots__ = (
        "source",
        "drain",
        "max",
        "idle",
        "state",
        "reason",
        "error",
        "transferred",
        "dropped",
        "taken",
        "_pool",
        "_owner",
        "_timer",
        "_src",
        "_dst",
        "_mover",
        "_copy",
        "_bulk",
        "_queued",
        "_wait_drain",
        "_check_drain",
        "_fresh",
        "_last_move",
        "_finishing",
        "_user_fd",
        "_proxy",
        "__weakref__",
    )

    def __init__(
        self,
        pool: SplicePool,
        source: Any,
        drain: Any,
        max: int,
        idle: float | None,
        owner: Any,
    ) -> None:
        _Waitable.__init__(self)
        self.source = source
        self.drain = drain
        self.max = max
        self.idle = idle
        self.state = S.INIT
        self.reason: EndReason | None = None
        self.error: OSError | None = None
        self.transferred = 0
        self.dropped = 0
        self.taken = 0  # bytes pulled from the source: transferred + dropped + in flight
        self._pool = pool
        self._owner = owner  # its Worker: splices are told apart by it, never by index
        self._timer: list[Any] | None = None  # its idle timer's heap entry, while it has one
        self._src: Any = None  # the pool's endpoints (set by the pool)
        self._dst: Any = None
        self._mover: Any = None  # while bytes are in flight or a pass runs: its worker's mover
        self._copy = not pool._zero_copy  # moves with recv/send (set for good on a fallback)
        self._bulk = False  # zero-copy: the last read filled the small buffer, so splice next
        self._queued = False  # on the worker's ready queue
        self._wait_drain = False  # waiting for the drain to become writable
        self._check_drain = False  # the drain reported an error or hang-up
        self._fresh = False  # queued by a source read event with no hang-up (see Worker._pass)
        self._last_move = 0.0  # monotonic time of the last pass that moved bytes (with idle only)
        self._finishing = False  # ended, delivering the leftover
        self._user_fd = -1  # the caller's fd number for the source (to notice it closing)
        self._proxy: Any = None  # the Proxy this splice is a direction of

    # -- read-only views -------------------------------------------------
    @property
    def worker(self) -> int:
        """The index of its worker thread (a worker that crashed is replaced at the same index)."""
        owner = self._owner
        return owner.index if owner is not None else -1  # -1: a bare handle, in a unit test

    @property
    def zero_copy(self) -> bool:
        """True on the zero-copy path (bulk moves with os.splice, never entering Python; reads
        under ``small_copy`` bytes are copied), False on the copy path."""
        return not self._copy

    @property
    def in_flight(self) -> int:
        """Bytes taken from the source that the drain has not accepted yet (the pipe leftover)."""
        mover = self._mover
        return mover.pending if mover is not None else 0

    def __repr__(self) -> str:
        src = self._src.label if self._src is not None else repr(self.source)
        dst = self._dst.label if self._dst is not None else repr(self.drain)
        end = f" reason={self.reason.name}" if self.reason else ""
        return (
            f"<Splice source {src} -> drain {dst} worker={self.worker} state={self.state.name}"
            f" transferred={self.transferred}{end}>"
        )

    # -- waiting -----------------------------------------------------------
    def wait(self, timeout: float | None = None) -> EndReason:
        """Block until the splice has ended and return its ``reason``.

        Raises ``TimeoutError`` if it is still running after ``timeout`` seconds.
        """
        if not self._wait_done(timeout):
            raise TimeoutError(f"splice still running after {timeout} s: {self!r}")
        assert self.reason is not None
        return self.reason

    def __await__(self) -> Generator[Any, None, EndReason]:
        """``await splice`` in asyncio: wait without blocking the loop, return ``reason``."""
        from .aio import wait_async

        return wait_async(self).__await__()

    def unsplice(self) -> None:
        """Stop this splice: same as ``pool.splice(splice.source, -1)``."""
        self._pool._unsplice_splice(self)

    # -- used by the worker only ---------------------------------------------
    def _set_state(self, new: SpliceState) -> None:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise SpliceStateError(f"illegal splice transition {old.name} -> {new.name}")
        self.state = new

    def _signal_done(self) -> None:
        """Mark CLOSED and wake everyone: wait()ers, then the done callbacks (worker thread)."""
        self._set_state(S.CLOSED)
        self._complete()


def _run_callback(fn: Callable[[Any], Any], handle: Any) -> None:
    try:
        fn(handle)
    except BaseException:  # even SystemExit: a callback must never take its worker down
        _native.report(logging.ERROR, "splicepool: done callback %r raised (ignored)", fn, exc_info=True)
