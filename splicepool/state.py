"""Splice states: the transition table, the per-splice record, and the done signal.

FreeBSD's ``enum so_splice_state`` is what users see (``SpliceState``). The
engine works on finer *phases*: each says what a splice waits for, or why it
is queued, so no side flag can disagree with the state (waiting for the
source and waiting for the drain are two phases of IDLE; a pass queued by a
read event, by the drain, or by a drain error are three phases of QUEUED).

``TABLE`` is every legal move, ``(phase, event) -> phase``; ``move()`` is
the one way a phase changes, and only the splice's own worker calls it. An
event with no entry for the current phase raises ``SpliceStateError`` and
changes nothing.
"""

from __future__ import annotations

import enum
import logging

from . import _native

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from collections.abc import Callable, Generator
    from typing import Any


class SpliceState(enum.Enum):
    """Where a splice is in its life (FreeBSD's ``SPLICE_*`` states)."""

    INIT = "init"  # created by pool.splice(), not yet taken up by its worker
    IDLE = "idle"  # waiting for the source to be readable or the drain writable
    QUEUED = "queued"  # on its worker's ready queue
    RUNNING = "running"  # its worker is in an xfer pass for it
    CLOSING = "closing"  # unspliced (by the user or pool.close); the pipe leftover is being delivered
    CLOSED = "closed"  # ended, nothing in flight: done() is true
    EXCEPTION = "exception"  # ended by itself (EOF, max, idle, error); finishing like CLOSING

    # Members are singletons: hash by identity, in C (Enum's own __hash__ is Python code).
    __hash__ = object.__hash__


class EndReason(enum.Enum):
    """Why a splice ended."""

    EOF = "eof"  # the source reached EOF and everything before it was moved
    MAX = "max"  # exactly ``max`` bytes moved
    IDLE = "idle"  # no byte moved for ``idle`` seconds
    UNSPLICED = "unspliced"  # pool.splice(src, -1), pool.unsplice(src) or Splice.unsplice()
    ERROR = "error"  # a socket error on either side; see Splice.error
    POOL_CLOSED = "pool_closed"  # pool.close() while it was live

    __hash__ = object.__hash__


class SpliceStateError(RuntimeError):
    """An illegal state transition: a bug in splicepool, never the user's."""


S = SpliceState


class Phase(enum.Enum):
    """The engine's states; ``public`` is the ``SpliceState`` users see."""

    INIT = (S.INIT, "init")
    WAIT_SOURCE = (S.IDLE, "the source is watched for data")
    WAIT_DRAIN = (S.IDLE, "the drain is watched for space; the source is not read")
    QUEUED = (S.QUEUED, "queued for a pass: taken up, or requeued after its budget")
    QUEUED_READ = (S.QUEUED, "queued by a read event that saw no FIN or error")
    QUEUED_DRAIN = (S.QUEUED, "queued by the drain becoming writable")
    QUEUED_CHECK = (S.QUEUED, "queued by an error or hang-up on the drain: look at it first")
    RUNNING = (S.RUNNING, "in a pass")
    CLOSING_WAIT = (S.CLOSING, "unspliced; the leftover waits for the drain")
    CLOSING_QUEUED = (S.CLOSING, "unspliced; queued to deliver the leftover")
    EXCEPTION_WAIT = (S.EXCEPTION, "ended by itself; the leftover waits for the drain")
    EXCEPTION_QUEUED = (S.EXCEPTION, "ended by itself; queued to deliver the leftover")
    CLOSED = (S.CLOSED, "done")

    __hash__ = object.__hash__

    def __init__(self, public: SpliceState, meaning: str) -> None:
        self.public = public
        self.meaning = meaning


P = Phase
LIVE = frozenset({P.INIT, P.WAIT_SOURCE, P.WAIT_DRAIN, P.QUEUED, P.QUEUED_READ,
                  P.QUEUED_DRAIN, P.QUEUED_CHECK, P.RUNNING})
#: Live and between passes: an unsplice may end it at once, on its worker.
BETWEEN_PASSES = LIVE - {P.INIT, P.RUNNING}
#: Waiting for the drain to become writable (the hub watches it for space).
DRAIN_WAITS = frozenset({P.WAIT_DRAIN, P.CLOSING_WAIT, P.EXCEPTION_WAIT})
#: On the ready queue.
QUEUED = frozenset({P.QUEUED, P.QUEUED_READ, P.QUEUED_DRAIN, P.QUEUED_CHECK,
                    P.CLOSING_QUEUED, P.EXCEPTION_QUEUED})
_ENDED_WAIT = {P.CLOSING_WAIT: P.CLOSING_QUEUED, P.EXCEPTION_WAIT: P.EXCEPTION_QUEUED}
_QUEUED_LIVE = (P.QUEUED, P.QUEUED_READ, P.QUEUED_DRAIN, P.QUEUED_CHECK)


class Event(enum.Enum):
    """What happens to a splice; the table says where each event takes it."""

    TAKE_UP = "its worker takes it up and runs its first pass"
    READ = "the source reported data, no FIN or error"
    READ_HUP = "the source reported a FIN, an error, or data with either"
    WRITABLE = "the drain has space"
    DRAIN_ERROR = "the drain reported an error or hang-up"
    RUN = "a queued pass starts"
    DIRECT = "a small read at the event, without a queued pass"
    WAIT_SOURCE = "the pass drained the source"
    WAIT_DRAIN = "the pass filled the drain"
    REQUEUE = "the pass used its budget"
    MORE = "a small read at the event filled its buffer: a queued pass reads on"
    FLUSH = "an ended splice's leftover is pushed"
    END = "it ended by itself: EOF, max, idle, an error"
    CUT = "unsplice() or pool.close()"
    FINISH = "nothing is left in flight: released, waiters woken"
    ABANDON = "ending it failed (a bug): completed anyway, so no waiter hangs"

    __hash__ = object.__hash__


E = Event


def _table() -> dict[tuple[Phase, Event], Phase]:
    t: dict[tuple[Phase, Event], Phase] = {(P.INIT, E.TAKE_UP): P.QUEUED}
    # Not taken up yet, a splice may share a watched socket with one that is: reads wait.
    for e in (E.READ, E.READ_HUP):
        t[P.INIT, e] = P.INIT
    for p in (P.WAIT_SOURCE, *_QUEUED_LIVE):
        t[p, E.READ] = P.QUEUED_READ if p in (P.WAIT_SOURCE, P.QUEUED, P.QUEUED_READ) else p
        t[p, E.READ_HUP] = P.QUEUED if p in (P.WAIT_SOURCE, P.QUEUED, P.QUEUED_READ) else p
    # Waiting for the drain, the source is read when the drain wakes the splice.
    t[P.WAIT_DRAIN, E.READ] = t[P.WAIT_DRAIN, E.READ_HUP] = P.WAIT_DRAIN
    # Space on a drain matters only to a splice waiting for it (epoll reports it all along).
    t[P.WAIT_DRAIN, E.WRITABLE] = P.QUEUED_DRAIN
    for p in (P.WAIT_SOURCE, P.WAIT_DRAIN, *_QUEUED_LIVE):
        t[p, E.DRAIN_ERROR] = P.QUEUED_CHECK
    for wait, queued in _ENDED_WAIT.items():
        t[wait, E.WRITABLE] = t[wait, E.DRAIN_ERROR] = queued
        t[queued, E.DRAIN_ERROR] = queued
        t[queued, E.FLUSH] = wait
    for p in _QUEUED_LIVE:
        t[p, E.RUN] = P.RUNNING
    t[P.WAIT_SOURCE, E.DIRECT] = P.RUNNING
    t[P.RUNNING, E.WAIT_SOURCE] = P.WAIT_SOURCE
    t[P.RUNNING, E.WAIT_DRAIN] = P.WAIT_DRAIN
    t[P.RUNNING, E.REQUEUE] = P.QUEUED
    t[P.RUNNING, E.MORE] = P.QUEUED_READ
    for p in LIVE - {P.INIT}:
        t[p, E.END] = P.EXCEPTION_WAIT
        # Cut in a pass (a worker crash, pool.close()'s grace) is an exception, not a close.
        t[p, E.CUT] = P.EXCEPTION_WAIT if p is P.RUNNING else P.CLOSING_WAIT
    for p in (P.INIT, *_ENDED_WAIT, *_ENDED_WAIT.values()):
        t[p, E.FINISH] = P.CLOSED
    for p in Phase:
        if p is not P.CLOSED:
            t[p, E.ABANDON] = P.CLOSED
    return t


#: Every legal move: ``(phase, event) -> phase``. Anything else is a bug.
TABLE: dict[tuple[Phase, Event], Phase] = _table()
# The same moves by event, for move(): one dict lookup, no tuple.
_BY_EVENT: dict[Event, dict[Phase, Phase]] = {e: {} for e in Event}
for (_p, _e), _q in TABLE.items():
    _BY_EVENT[_e][_p] = _q
del _p, _e, _q


_tracer: Callable[[Record, Phase, Event, Phase], Any] | None = None


def trace(fn: Callable[[Record, Phase, Event, Phase], Any] | None) -> None:
    """Call ``fn(record, old, event, new)`` on every move from now on (None: stop).

    For debugging and for the tests that walk the table; ``fn`` runs in the
    worker, on its hot path: keep it short.
    """
    global _tracer
    _tracer = fn


def move(rec: Record, event: Event) -> Phase:
    """Apply ``event`` to ``rec``: its new phase, from the table, or ``SpliceStateError``."""
    old = rec.phase
    try:
        new = _BY_EVENT[event][old]
    except KeyError:
        raise SpliceStateError(f"illegal splice transition: {event.name} in {old.name}") from None
    rec.phase = new
    if _tracer is not None:
        _tracer(rec, old, event, new)
    return new


def finish(rec: Record) -> None:
    """FINISH: the splice is CLOSED; wake its waiters and run its done callbacks."""
    move(rec, E.FINISH)
    rec._complete()


def abandon(rec: Record, reason: EndReason, error: OSError | None) -> None:
    """ABANDON: complete a splice that could not be ended cleanly, so no waiter hangs."""
    if rec.reason is None:
        rec.reason, rec.error = reason, error
    move(rec, E.ABANDON)
    rec._complete()


# Guards every handle's event and callbacks (below); held for a few instructions at a
# time, so one lock for all costs nothing and saves a lock per splice.
# The relay keeps its own books (directions left, first reason) under it too: as short.
DONE_LOCK = _native.allocate_lock()


class Waitable:
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
        with DONE_LOCK:
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
        with DONE_LOCK:
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

    def __await__(self) -> Generator[Any, None, EndReason]:
        """``await handle`` in asyncio: wait without blocking the loop, return its reason."""
        return _wait_async(self).__await__()

    def _complete(self) -> None:
        """Mark done and wake everyone: waiters, then the callbacks (the worker's thread)."""
        with DONE_LOCK:
            self._ended = True
            event, callbacks = self._event, self._callbacks
            self._event = self._callbacks = None
        if event is not None:
            event.set()
        if callbacks is not None:
            for fn in callbacks if type(callbacks) is list else (callbacks,):
                _run_callback(fn, self)


def _run_callback(fn: Callable[[Any], Any], handle: Any) -> None:
    try:
        fn(handle)
    except BaseException:  # even SystemExit: a callback must never take its worker down
        _native.report(logging.ERROR, "splicepool: done callback %r raised (ignored)", fn, exc_info=True)


async def _wait_async(handle: Any) -> EndReason:
    """Wait for ``handle`` on the running asyncio loop; its done callback runs in a worker."""
    import asyncio  # only programs that await a handle pay for asyncio

    if handle.done():
        return handle.reason
    loop = asyncio.get_running_loop()
    fut = loop.create_future()

    def resolve(value: Any) -> None:
        if not fut.done():  # the awaiting task may have been cancelled
            fut.set_result(value)

    def on_done(done: Any) -> None:  # a worker thread
        try:
            loop.call_soon_threadsafe(resolve, done.reason)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    handle.add_done_callback(on_done)
    return await fut


class Record(Waitable):
    """What the engine knows of one splice: its phase, counters and resources.

    The ``Splice`` handle users hold is this same object (one allocation per
    splice: a proxied connection is two of them); users only read the handle's
    documented attributes. Every field but the counters is written by the
    splice's own worker only, after the pool filled it in.
    """

    __slots__ = (
        "phase",
        "reason",
        "error",
        "transferred",
        "dropped",
        "taken",
        "max",
        "idle",
        "owner",
        "src",
        "dst",
        "mover",
        "copy",
        "bulk",
        "armed",
        "last_move",
        "timer",
        "user_fd",
        "relay",
        "peer",
    )

    def __init__(self, max: int, idle: float | None, owner: Any, copy: bool) -> None:
        Waitable.__init__(self)
        self.phase = P.INIT
        self.reason: EndReason | None = None
        self.error: OSError | None = None
        self.transferred = 0  # bytes the drain accepted
        self.dropped = 0  # bytes taken from the source that the drain never accepted
        self.taken = 0  # bytes pulled from the source: transferred + dropped + in flight
        self.max = max
        self.idle = idle
        self.owner = owner  # its worker (told apart by object, never by index)
        self.src: Any = None  # the registry's endpoints (set by the pool)
        self.dst: Any = None
        self.mover: Any = None  # while bytes are in flight or a pass runs: a mover (xfer)
        self.copy = copy  # moves with recv/send (set for good on a fallback)
        self.bulk = False  # zero-copy: the last read filled the small buffer, so splice next
        self.armed = False  # the hub watches the drain for space for it (and not its source)
        self.last_move = 0.0  # monotonic time of the last move (read by the idle timer)
        self.timer: list[Any] | None = None  # its idle timer's heap entry, while it has one
        self.user_fd = -1  # the caller's fd number for the source (to notice it closing)
        self.relay: Any = None  # the Proxy this splice is a direction of (its listener's key)
        self.peer: Record | None = None  # a relay's other direction
