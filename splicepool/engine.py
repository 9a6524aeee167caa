"""The worker loop (FreeBSD's ``splice_work_thread``): events, passes, timers, ends.

A worker owns the splices assigned to it at creation. It sleeps on its hub
until one of them can progress (source readable, drain writable, a timer due,
a control message), then runs one bounded pass per ready splice, in order.
Every syscall on a spliced fd is non-blocking, so a slow drain stalls only its
own splice. Only the worker changes its splices' phases, and only through the
table (``state.move``).

Other threads reach a worker by posting a typed control message. Ending a
splice from outside goes through one routing point, ``unsplice()``: on the
splice's own worker between passes it ends at once, otherwise a message ends
it in order. The end of a splice is reported upward through the ``listener``
the worker is given (a relay's half-close and abort), never by calling into
the layers above.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
from collections import deque

from . import _hub, _native, _sockets, xfer
from ._sockets import oserror
from .state import (
    BETWEEN_PASSES,
    DRAIN_WAITS,
    LIVE,
    QUEUED,
    EndReason,
    Phase,
    abandon,
    finish,
    move,
)
from .state import Event as E

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

P = Phase
# The phases, events and event bits the hot path tests, as module names: reading an Enum
# member off its class costs ~70 ns, a global ~6 (a request and its reply pass here twice).
_INIT, _WAIT_SOURCE, _CLOSED = P.INIT, P.WAIT_SOURCE, P.CLOSED
_EV_RUN, _EV_DIRECT, _EV_READ, _EV_READ_HUP = E.RUN, E.DIRECT, E.READ, E.READ_HUP
_EV_WRITABLE, _EV_DRAIN_ERROR, _EV_FLUSH = E.WRITABLE, E.DRAIN_ERROR, E.FLUSH
_EV_WAIT_SOURCE, _EV_WAIT_DRAIN, _EV_REQUEUE, _EV_MORE = E.WAIT_SOURCE, E.WAIT_DRAIN, E.REQUEUE, E.MORE
_READABLE, _WRITE, _ERROR, _HANGUP, _URGENT = _hub.READ, _hub.WRITE, _hub.ERROR, _hub.HANGUP, _hub.URGENT
_OUT_WAIT_SOURCE, _OUT_WAIT_DRAIN, _OUT_REQUEUE, _OUT_MORE = (
    xfer.WAIT_SOURCE, xfer.WAIT_DRAIN, xfer.REQUEUE, xfer.MORE)
_STALE_TIMERS_MIN = 64  # ended splices' timer entries tolerated before the heap is compacted
_MAX_SLEEP = 3600.0  # longest single hub sleep, in seconds
_INF = float("inf")
# Why a queued pass runs, from the phase it was queued in.
_WHY = {P.QUEUED: 0, P.QUEUED_READ: xfer.FRESH, P.QUEUED_DRAIN: xfer.WOKE_FOR_DRAIN,
        P.QUEUED_CHECK: xfer.CHECK_DRAIN}
_ENDED_QUEUED = (P.CLOSING_QUEUED, P.EXCEPTION_QUEUED)
# How a pass that ended its splice ended it: (reason, its error is Xfer.error, drop the leftover).
_ENDS = {
    xfer.EOF: (EndReason.EOF, False, False),
    xfer.MAX: (EndReason.MAX, False, False),
    xfer.ERROR: (EndReason.ERROR, True, False),
    xfer.SOURCE_FAILED: (EndReason.ERROR, True, False),
    xfer.DRAIN_FAILED: (EndReason.ERROR, True, True),
}


# -- control messages: what other threads ask of a worker ----------------------------------
class Add:
    """Take up a new splice (``pool.splice()``, ``pool.proxy()``); ``ack`` once its first pass ran."""

    __slots__ = ("sp", "ack")

    def __init__(self, sp: Any, ack: _native.Event | None) -> None:
        self.sp, self.ack = sp, ack

    def handle(self, worker: Worker) -> None:
        worker._guarded(self.sp, worker._add, self.ack)

    def drop(self, worker: Worker, reason: EndReason, err: OSError | None) -> None:
        worker._abandon_safely(self.sp, reason, err)
        if self.ack is not None:
            self.ack.set()


class Unsplice(Add):
    """End a splice with UNSPLICED, in order after its ``Add``; ``ack`` once it has."""

    __slots__ = ()

    def handle(self, worker: Worker) -> None:
        worker._guarded(self.sp, worker._unsplice, self.ack)

    def drop(self, worker: Worker, reason: EndReason, err: OSError | None) -> None:
        if self.ack is not None:
            self.ack.set()  # the exiting worker ends the splice itself


class CheckDrain(Add):
    """Another worker read an error off this splice's drain: look at it (its source may be silent)."""

    __slots__ = ()

    def handle(self, worker: Worker) -> None:
        worker._guarded(self.sp, worker.check_drain, None)

    def drop(self, worker: Worker, reason: EndReason, err: OSError | None) -> None:
        pass


class Close:
    """``pool.close(grace)``: end every splice with POOL_CLOSED, give leftovers ``grace`` seconds."""

    __slots__ = ("grace",)

    def __init__(self, grace: float) -> None:
        self.grace = grace

    def handle(self, worker: Worker) -> None:
        worker._close(self.grace)

    def drop(self, worker: Worker, reason: EndReason, err: OSError | None) -> None:
        pass


class Host:
    """``pool.host(guest)``: run ``guest``'s loop on this worker too (see ``Worker._host``)."""

    __slots__ = ("guest",)

    def __init__(self, guest: Any) -> None:
        self.guest = guest

    def handle(self, worker: Worker) -> None:
        worker._host(self.guest)

    def drop(self, worker: Worker, reason: EndReason, err: OSError | None) -> None:
        self.guest.unhosted(_stopped(worker, err))


def _stopped(worker: Worker, err: OSError | None) -> OSError:
    """What a guest is told when the worker hosting it stops (``err``: the crash, if one)."""
    return err or oserror(errno.ESHUTDOWN, f"splicepool worker {worker.index} stopped: the pool was closed")


# -- timers ------------------------------------------------------------------------------
class Timers:
    """Idle deadlines: a heap of ``[deadline, seq, splice]``; an ended splice's entry forgets
    it (nothing is kept alive after the end) and is skipped, or compacted away."""

    def __init__(self) -> None:
        self.heap: list[list[Any]] = []
        self._stale = 0
        self._seq = itertools.count()

    def arm(self, sp: Any, deadline: float) -> None:
        entry = [deadline, next(self._seq), sp]
        sp.timer = entry
        heapq.heappush(self.heap, entry)

    def disarm(self, sp: Any) -> None:
        entry = sp.timer
        if entry is None:
            return
        sp.timer = None
        entry[2] = None
        self._stale += 1
        heap = self.heap
        if self._stale > _STALE_TIMERS_MIN and 2 * self._stale > len(heap):
            heap[:] = [e for e in heap if e[2] is not None]  # in place: the loop holds the list
            heapq.heapify(heap)
            self._stale = 0

    def pop_due(self, now: float) -> Any:
        """The next splice whose deadline has come (its entry gone), or None."""
        heap = self.heap
        while heap and heap[0][0] <= now:
            sp = heapq.heappop(heap)[2]
            if sp is None:
                self._stale -= 1
                continue
            sp.timer = None
            return sp
        return None


def must_not_wait(workers: Any) -> bool:
    """True where waiting for a worker could deadlock: in a worker (a done callback), or in a
    gevent hub's own greenlet (where direct dispatch runs callbacks), which must never block
    or switch out."""
    for worker in workers:
        if worker is not None and worker.is_current():
            return True
    hook = _native.hooks.in_hub_greenlet
    return hook is not None and hook()


class Worker:
    """A worker thread (or, for other backends, the same logic driven differently).

    ``options``: the pool's frozen options. ``registry``: the pool's roles and lock.
    ``listener``: told of a relay direction's end (``ending(sp)`` while its sockets
    are open, ``done(sp)`` after). ``peers``: the pool's list of workers (who must
    not wait for whom).
    """

    def __init__(self, index: int, options: Any, registry: Any, listener: Any, peers: Any,
                 hub: Any) -> None:
        self.index = index
        self.options = options
        self.registry = registry
        self.listener = listener
        self.peers = peers
        self.hub = hub
        self.xfer = xfer.Xfer(options.pipe_size, options.copy_size, options.small_copy)
        self.control: deque[Any] = deque()
        self.ready: deque[Any] = deque()
        self.timers = Timers()
        self.accepting = True  # cleared (under the registry lock) when the loop exits
        self.thread_id: int | None = None
        self.exited = _native.Event()
        self.join: Any = self.exited.wait
        self._closing_at: float | None = None
        self.wakeups = 0  # for stats(); written by this worker only
        self.guest: Any = None  # a loop this worker runs besides its splices (see _host)
        self._guest_due = _INF  # when the guest's next step is due, without an event

    # -- life ----------------------------------------------------------------
    def start(self) -> None:
        self.join = _native.start_thread(self._run)

    def is_current(self) -> bool:
        """True when called from this worker (e.g. in a done callback it runs)."""
        return self.thread_id == _native.get_ident()

    def post(self, msg: Any) -> None:
        """Queue a control message (any thread; the caller holds the registry lock)."""
        self.control.append(msg)
        self.hub.wake()

    def _run(self) -> None:
        self.thread_id = _native.get_ident()
        reason, err = EndReason.POOL_CLOSED, None
        try:
            if self.options.bind_cpus:
                cpus = sorted(os.sched_getaffinity(0))
                os.sched_setaffinity(0, {cpus[self.index % len(cpus)]})  # this thread only
            self._loop()
        except BaseException as exc:  # a bug: report it, end what it held, never hang
            _native.report(logging.CRITICAL, "splicepool: worker %d crashed", self.index, exc_info=True)
            reason = EndReason.ERROR
            err = OSError(errno.EIO, f"splicepool worker {self.index} crashed: {exc!r}")
        finally:
            self._exit(reason, err)

    def _exit(self, reason: EndReason, err: OSError | None) -> None:
        """Stop for good: end every splice this worker holds (and only those) with ``reason``.

        New splices go to a fresh worker from the moment ``accepting`` is cleared; one
        of them may share a socket with a splice here, so splices are told apart by
        their worker object, never by index.
        """
        with self.registry.lock:
            self.accepting = False
        for msg in self.control:  # nothing posts after accepting is cleared
            msg.drop(self, reason, err)
        self.control.clear()
        if self.guest is not None:
            self._unhost(_stopped(self, err))
        for sp in self.assigned():
            self._abandon_safely(sp, reason, err)
        self.xfer.close()
        self.hub.close()
        self.exited.set()

    # -- the loop ------------------------------------------------------------
    def _loop(self) -> None:
        hub = self.hub
        ready = self.ready
        control = self.control
        heap = self.timers.heap
        clock = _native.monotonic
        dispatch = self.dispatch
        xf = self.xfer
        now = xf.now = clock()
        while True:
            if ready or control:  # control: queued by this worker itself (no wakeup was made)
                timeout: float | None = 0.0
            else:
                timeout = None
                if heap:
                    timeout = max(0.0, heap[0][0] - now)
                if self._closing_at is not None:
                    left = max(0.0, self._closing_at - now)
                    timeout = left if timeout is None else min(timeout, left)
                if self._guest_due != _INF:
                    left = max(0.0, self._guest_due - now)
                    timeout = left if timeout is None else min(timeout, left)
                if timeout is not None and timeout > _MAX_SLEEP:
                    timeout = _MAX_SLEEP  # epoll takes a C int of milliseconds; a far deadline waits again
            events = hub.poll(timeout)
            now = xf.now = clock()  # the one clock read of this wakeup
            if events:
                self.wakeups += 1
                for ep, flags in events:
                    dispatch(ep, flags)
            if hub.guest_ready or self._guest_due <= now:
                self._run_guest(now)  # before the control queue: it may queue relays there
            if control:
                self._process_control()
            if heap and heap[0][0] <= now:
                self._expire_timers(now)
            if ready:
                self._run_ready()
            if self._closing_at is not None:
                if not len(hub):
                    return
                if now >= self._closing_at:
                    for sp in self.assigned():
                        self._abandon_safely(sp, EndReason.POOL_CLOSED, None)
                    return

    def _run_ready(self) -> None:
        """One pass for each splice ready now, in order (its own frame: no ended splice is
        kept alive by a loop variable while the worker sleeps)."""
        ready = self.ready
        control = self.control
        for _ in range(len(ready)):
            if control:  # a caller waits in pool.splice() or unsplice(): at most one pass
                self._process_control()
            self.run_one(ready.popleft())

    def run_one(self, sp: Any) -> None:
        """The pass of a splice taken off the ready queue (an entry it left behind is skipped)."""
        try:
            phase = sp.phase
            why = _WHY.get(phase)
            if why is not None:
                move(sp, _EV_RUN)
                self._settle(sp, self.xfer.run_pass(sp, why))
            elif phase in _ENDED_QUEUED:
                move(sp, _EV_FLUSH)
                self._flush(sp)
        except Exception as exc:  # a bug in a pass ends that splice only
            self._fail(sp, exc)

    def _settle(self, sp: Any, outcome: int) -> None:
        """After a pass: the phase its outcome leads to, and what the hub watches."""
        if outcome == _OUT_WAIT_SOURCE:
            move(sp, _EV_WAIT_SOURCE)
            if sp.mover is not None:
                self.xfer.checkin(sp)
            if sp.armed:
                self._disarm_drain(sp)
        elif outcome == _OUT_WAIT_DRAIN:
            move(sp, _EV_WAIT_DRAIN)
            self.xfer.checkin(sp)
            self._arm_drain(sp)
        elif outcome == _OUT_REQUEUE:  # keeps its mover for the next pass
            move(sp, _EV_REQUEUE)
            self.ready.append(sp)
            if sp.armed:
                self._disarm_drain(sp)
        elif outcome == _OUT_MORE:
            move(sp, _EV_MORE)
            self.ready.append(sp)
        else:
            reason, with_error, drop = _ENDS[outcome]
            self._end(sp, reason, self.xfer.error if with_error else None, drop)
            if outcome == xfer.SOURCE_FAILED:
                self._drain_failed(sp.src)  # a relay's reverse direction drains into it

    def dispatch(self, ep: Any, flags: int) -> None:
        """Readiness on a socket: queue the splice(s) it concerns (FreeBSD's so_splice_dispatch).

        ``ep.src_of`` and ``ep.drain_of`` are the socket's two roles; a role may
        belong to another worker (a socket shared by splices on two workers), and
        each worker acts only on its own. A bug met while handling one splice ends
        that splice (``_fail``), never the worker or the other role's splice.
        """
        src_of = ep.src_of
        if src_of is not None and flags & _READABLE and src_of.owner is self:
            try:
                self._source_event(src_of, ep, flags)
            except Exception as exc:
                self._fail(src_of, exc)
        drain_of = ep.drain_of
        if drain_of is not None and drain_of.owner is self:
            try:
                if flags & _ERROR:
                    self.check_drain(drain_of)
                elif flags & _WRITE and drain_of.phase in DRAIN_WAITS:
                    self._enqueue(drain_of, _EV_WRITABLE)
            except Exception as exc:
                self._fail(drain_of, exc)

    def _source_event(self, sp: Any, ep: Any, flags: int) -> None:
        if flags & _URGENT:
            ep.urgent = True  # a read may stop at the urgent mark: see Xfer.run_pass
        if flags & _HANGUP:
            self._enqueue(sp, _EV_READ_HUP)
        elif sp.phase is _WAIT_SOURCE and self.xfer.can_pass_small(sp):
            move(sp, _EV_DIRECT)
            outcome = self.xfer.small_pass(sp)
            if outcome == _OUT_WAIT_SOURCE and sp.mover is None:  # the usual end: all sent
                move(sp, _EV_WAIT_SOURCE)
            else:
                self._settle(sp, outcome)
        else:
            self._enqueue(sp, _EV_READ)

    def _enqueue(self, sp: Any, event: E) -> None:
        """Apply ``event``; a splice it queues goes on the ready queue."""
        was = sp.phase in QUEUED
        if move(sp, event) in QUEUED and not was:
            self.ready.append(sp)

    def check_drain(self, sp: Any) -> None:
        """Have ``sp`` look at its drain's error on its next pass (its source may be silent)."""
        if sp.phase is _INIT:
            self.post(CheckDrain(sp, None))  # after its Add, which is still queued
        elif sp.phase is not _CLOSED:
            self._enqueue(sp, _EV_DRAIN_ERROR)

    def _drain_failed(self, ep: Any) -> None:
        """This worker read a socket error off ``ep``: the splice draining into it must end too.

        With its own source silent, nothing else would wake it: a level-triggered
        hub does not watch a drain for errors, and the read took the socket's error.
        """
        with self.registry.lock:
            sp = ep.drain_of
            if sp is None or sp.phase not in LIVE:
                return
            owner = sp.owner
            if not owner.accepting:
                return
            if owner is not self:
                owner.post(CheckDrain(sp, None))
                return
        self.check_drain(sp)

    # -- control messages ------------------------------------------------------
    def _process_control(self) -> None:
        control = self.control
        while control:
            control.popleft().handle(self)

    def _guarded(self, sp: Any, fn: Any, ack: _native.Event | None) -> None:
        """``fn(sp)`` for a message; a bug ends that splice only; ``ack`` is set in any case."""
        try:
            fn(sp)
        except Exception as exc:
            self._fail(sp, exc)
        finally:
            if ack is not None:
                ack.set()  # pool.splice() or unsplice() returns

    def _add(self, sp: Any) -> None:
        if self._closing_at is not None:
            self._abandon(sp, EndReason.POOL_CLOSED, None)
            return
        try:
            self._watch(sp.src)
            self._watch(sp.dst)
        except OSError as exc:
            self._abandon(sp, EndReason.ERROR, exc)
            return
        xf = self.xfer
        if sp.copy:
            xf.copy += 1
        else:
            xf.zero_copy += 1
        if sp.idle:
            now = sp.last_move = xf.now
            self._look((sp.dst, sp.src) if sp.peer is not None else (sp.dst,), now)
            self.timers.arm(sp, now + sp.idle)
        # The first pass runs now, before pool.splice() returns: data already in the
        # source moves at once, as both kernels move it inside setsockopt().
        move(sp, E.TAKE_UP)
        self.run_one(sp)

    # -- a hosted loop ----------------------------------------------------------
    def _host(self, guest: Any) -> None:
        """Run ``guest`` on this worker, between passes, until it says it has finished.

        ``guest.fd`` is watched (level-triggered: readable while the guest has work);
        ``guest.step(now)`` runs when it is readable or when the deadline the last step
        returned (a monotonic time, ``inf`` for none) has come, and returns the next
        deadline, or None once the guest has finished. ``guest.unhosted(exc)`` is called
        when the worker stops running it: ``exc`` None after a step returned None, the
        exception a step raised (a bug in the guest ends the guest, not the worker), or
        an ``OSError`` when the worker stops (``ESHUTDOWN``: the pool was closed). A step
        must never block: every splice of this worker waits for it.
        """
        if self.guest is not None or self._closing_at is not None:
            guest.unhosted(_stopped(self, None) if self._closing_at is not None
                           else RuntimeError(f"splicepool worker {self.index} already hosts {self.guest!r}"))
            return
        self.hub.host(guest.fd)
        self.guest = guest
        self._run_guest(self.xfer.now)

    def _run_guest(self, now: float) -> None:
        """A step of the guest (only while there is one: ``_unhost`` clears both triggers)."""
        self.hub.guest_ready = False
        try:
            due = self.guest.step(now)
        except Exception as exc:
            self._unhost(exc)
            return
        if due is None:
            self._unhost(None)
        else:
            self._guest_due = due

    def _unhost(self, exc: BaseException | None) -> None:
        guest = self.guest
        self.guest = None
        self._guest_due = _INF
        self.hub.unhost()
        guest.unhosted(exc)

    def _unsplice(self, sp: Any) -> None:
        if sp.phase in LIVE:
            self._end(sp, EndReason.UNSPLICED, None)

    def _close(self, grace: float) -> None:
        self._closing_at = self.xfer.now + max(grace, 0.0)
        for sp in self.assigned():
            if sp.phase in LIVE:
                try:
                    self._end(sp, EndReason.POOL_CLOSED, None)
                except Exception as exc:
                    self._fail(sp, exc)

    # -- what the hub watches ------------------------------------------------------
    def _watch(self, ep: Any) -> None:
        """Watch a socket a splice here has just taken a role on (the registry set the role)."""
        if self.hub.get(ep.fd) is None:
            self.hub.add(ep.fd, ep)
        self._update_interest(ep)

    def _unwatch(self, ep: Any) -> None:
        """A role on ``ep`` was given up: stop watching it once no splice here holds one."""
        if self.hub.get(ep.fd) is not ep:
            return
        if self._mine(ep.src_of) is None and self._mine(ep.drain_of) is None:
            if ep.sole:  # closed once its last splice here is done: epoll forgets it then
                self.hub.forget(ep.fd)
            else:
                self.hub.remove(ep.fd)
        else:
            self._update_interest(ep)

    def assigned(self) -> list[Any]:
        """This worker's splices not yet done (taken up, so each holds a role on a watched fd)."""
        found: dict[Any, None] = {}
        for ep in self.hub.watched():
            for sp in (ep.src_of, ep.drain_of):
                if sp is not None and sp.owner is self:
                    found[sp] = None
        return list(found)

    def _mine(self, sp: Any) -> Any:
        return sp if sp is not None and sp.owner is self else None

    def _update_interest(self, ep: Any) -> None:
        src_of = self._mine(ep.src_of)
        drain_of = self._mine(ep.drain_of)
        read = src_of is not None and not src_of.armed
        write = drain_of is not None and drain_of.armed
        self.hub.interest(ep.fd, read, write)

    def _arm_drain(self, sp: Any) -> None:
        """Watch the drain for space (again, on every drain wait), and stop reading the source."""
        first = not sp.armed
        sp.armed = True
        src, dst = sp.src, sp.dst
        self._update_interest(dst)
        if first and src is not dst and sp.phase in LIVE:
            self._update_interest(src)

    def _disarm_drain(self, sp: Any) -> None:
        sp.armed = False
        src, dst = sp.src, sp.dst
        for ep in (src, dst) if src is not dst else (src,):
            if self.hub.get(ep.fd) is ep:
                self._update_interest(ep)

    # -- idle timers ------------------------------------------------------------------
    def _expire_timers(self, now: float) -> None:
        timers = self.timers
        while True:
            sp = timers.pop_due(now)
            if sp is None:
                return
            try:
                self._idle_expired(sp, now)
            except Exception as exc:
                self._fail(sp, exc)

    def _idle_expired(self, sp: Any, now: float) -> None:
        """``sp``'s idle deadline came: re-arm if it was active since, else end it with IDLE.

        Active means a byte moved (either way, for a relay), or a byte left a drain's
        send queue: a client reading a fast upstream slowly empties a multi-MB buffer
        without waking the pool, and must not be cut. The queues are looked at when
        the timer fires (SIOCOUTQ); with no byte pushed since the last look, a queue
        only shrinks when the peer takes bytes. While bytes wait in a queue, it is
        known quiet only since that look, and must stay so for ``idle`` seconds.
        """
        last = sp.last_move
        peer = sp.peer
        if peer is not None:  # a relay is idle only when neither way moves
            last = max(last, peer.last_move)
        drains = (sp.dst, sp.src) if peer is not None else (sp.dst,)
        deadline = last + sp.idle
        if deadline > now:  # something moved since: re-arm (one entry per splice)
            self._look(drains, now)
            self.timers.arm(sp, deadline)
            return
        quiet_from = None
        ioc = self.xfer.ioc
        for ep in drains:
            queued = _sockets.send_queue(ep, ioc)
            look = ep.look
            if queued < 0 or look is None:
                continue
            before, looked = look
            if queued < before or looked < last:
                # Bytes left the queue (or no look since the last move to compare with):
                # active now; look again from here.
                sp.last_move = now
                self._look(drains, now)
                self.timers.arm(sp, now + sp.idle)
                return
            if queued or before:
                quiet_from = looked if quiet_from is None else max(quiet_from, looked)
        if quiet_from is not None and quiet_from + sp.idle > now:
            self.timers.arm(sp, quiet_from + sp.idle)
            return
        # Nothing moved for `idle` seconds; a leftover means the drain accepted nothing.
        if sp.phase in LIVE:
            self._end(sp, EndReason.IDLE, None, drop=True)
        else:
            sp.dropped += sp.mover.drop()
            self._finish(sp)

    def _look(self, drains: tuple[Any, ...], now: float) -> None:
        """Note the drains' send queues now, for the next idle deadline to compare."""
        ioc = self.xfer.ioc
        for ep in drains:
            queued = _sockets.send_queue(ep, ioc)
            if queued >= 0:
                ep.look = (queued, now)

    # -- ending ------------------------------------------------------------------
    def _end(self, sp: Any, reason: EndReason, error: OSError | None, drop: bool = False) -> None:
        """End a live splice (FreeBSD's EXCEPTION or CLOSING, then so_unsplice).

        The source is released at once (it may be spliced again); the splice is done
        once its pipe leftover has reached the drain, or has been dropped.
        """
        sp.reason = reason
        sp.error = error
        move(sp, E.CUT if reason is EndReason.UNSPLICED or reason is EndReason.POOL_CLOSED else E.END)
        self.registry.source_ended(sp)  # gives up the source role
        self._unwatch(sp.src)
        mover = sp.mover
        if drop and mover is not None:
            sp.dropped += mover.drop()
        if mover is not None and mover.pending:
            self._flush(sp)
        else:
            self._finish(sp)

    def _flush(self, sp: Any) -> None:
        """Deliver an ended splice's leftover; finish once it is gone."""
        if self.xfer.flush(sp):
            self._finish(sp)
        else:
            self._arm_drain(sp)  # its idle timer, if any, still runs

    def _finish(self, sp: Any) -> None:
        """Release everything of an ended splice and wake its waiters."""
        if sp.phase is _CLOSED:
            return
        mover = sp.mover
        if mover is not None:
            if mover.pending:
                sp.dropped += mover.drop()
            self.xfer.checkin(sp)
        self.timers.disarm(sp)
        src, dst = sp.src, sp.dst
        self.registry.drain_released(sp)
        self._unwatch(src)
        if dst is not src:
            self._unwatch(dst)
        relay = sp.relay
        if relay is not None:
            self.listener.ending(sp)  # half-close or abort, while its sockets are open
        self.registry.release(sp)
        finish(sp)
        if relay is not None:
            self.listener.done(sp)

    def end_now(self, sp: Any, reason: EndReason) -> None:
        """End ``sp`` at once if it is between passes (on this worker); a bug doing so ends it
        with ERROR."""
        if sp.phase not in BETWEEN_PASSES:
            return
        try:
            self._end(sp, reason, None)
        except Exception as exc:
            self._fail(sp, exc)

    def _fail(self, sp: Any, exc: BaseException) -> None:
        """A bug met while handling ``sp``: end that splice with ERROR; the worker goes on.

        Its leftover is dropped (counted in ``dropped``). If ending it fails too, the
        worker cannot trust its books: it re-raises, and the crash path ends everything.
        """
        _native.report(
            logging.ERROR, "splicepool: internal error on %r; it ends with ERROR", sp, exc_info=True
        )
        self._abandon(sp, EndReason.ERROR, OSError(errno.EIO, f"splicepool internal error: {exc!r}"))

    def _abandon_safely(self, sp: Any, reason: EndReason, error: OSError | None) -> None:
        """``_abandon`` on the way out: a failure is reported, and the splice still completes."""
        try:
            self._abandon(sp, reason, error)
        except Exception:
            _native.report(logging.CRITICAL, "splicepool: cannot end %r cleanly", sp, exc_info=True)
            if sp.phase is not P.CLOSED:
                abandon(sp, reason, error)  # no other legal move is left: waiters must not hang
                if sp.relay is not None:
                    self.listener.done(sp)

    def _abandon(self, sp: Any, reason: EndReason, error: OSError | None) -> None:
        """End a splice now, whatever its phase: leftover dropped (pool close, crash)."""
        phase = sp.phase
        if phase is P.CLOSED:
            return
        if phase is P.INIT:
            sp.reason, sp.error = reason, error
            self.registry.source_ended(sp)
        elif phase in LIVE:
            self._end(sp, reason, error, drop=True)
            return
        self._finish(sp)


# -- the routing point: end a splice from any thread ---------------------------------------
def unsplice(sp: Any, *, wait: bool = True, strict: bool = True) -> None:
    """End ``sp`` with UNSPLICED once its chunk in flight is done.

    On its own worker between passes it ends at once. A splice its worker has not
    taken up yet (INIT: its ``Add`` is still queued) or one in a pass is ended by an
    ``Unsplice`` message, which the worker handles in order, after the ``Add``.
    ``wait``: return once it has ended, unless waiting could deadlock
    (``must_not_wait``) or its worker is exiting (it ends its splices itself).
    ``strict``: raise ``RuntimeError`` if the pool is closed and ``ENOTCONN`` if
    ``sp`` is no longer the live splice of its source; else do nothing then.
    """
    worker = sp.owner
    registry = worker.registry
    with registry.lock:
        if strict:
            registry.check_open()
        if sp.src.src_of is not sp:
            if strict:
                raise oserror(errno.ENOTCONN, f"source {sp.src.label} is not spliced (as a source)")
            return
        if not worker.accepting:
            return
        now = worker.is_current() and sp.phase in BETWEEN_PASSES
        ack = None
        if not now:
            if wait and not must_not_wait(worker.peers):
                ack = _native.Event()
            worker.post(Unsplice(sp, ack))
    if now:
        worker.end_now(sp, EndReason.UNSPLICED)
    elif ack is not None:
        ack.wait()
