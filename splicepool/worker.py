"""One worker: its hub, its ready queue, its timers, and xfer (FreeBSD's ``splice_work_thread``).

A worker owns the splices assigned to it at creation. It sleeps on its hub
until one of them can progress (source readable, drain writable, a timer due,
a control message), then runs one bounded xfer pass per ready splice, in
order. Every syscall on a spliced fd is non-blocking, so a slow drain stalls
only its own splice. Only the worker changes its splices' states.
"""

from __future__ import annotations

import array
import errno
import heapq
import itertools
import logging
import os
import socket
from collections import deque

from . import _hub, _native
from .splice import LIVE_STATES, EndReason, Splice, SpliceState
from .xfer import CopyMover, NotSpliceable, PipePool, ZeroCopyMover

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from .pool import SplicePool

S = SpliceState
_SIOCOUTQ = 0x5411  # Linux: bytes in a socket's send queue (unsent + unacked)
_SIOCATMARK = 0x8905  # is the next byte to read at the TCP urgent mark?
_STALE_TIMERS_MIN = 64  # ended splices' timer entries tolerated before the heap is compacted
_LOW_WATER_MAX = 64 * 1024  # below this much drain space (and less than wanted), wait for the drain
_MAX_SLEEP = 3600.0  # longest single hub sleep, in seconds
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_SNDBUF_REFRESH = 32  # passes between re-reads of the drain's SO_SNDBUF (TCP autotuning grows it)
_SPARE_MOVERS = 64  # idle movers a worker keeps for its next passes

try:
    import fcntl

    _ioctl: Any = fcntl.ioctl
except ImportError:  # pragma: no cover - not POSIX
    _ioctl = None

# What a pass ends waiting for.
_WAIT_SOURCE = 0
_WAIT_DRAIN = 1
_REQUEUE = 2
_ENDED = 3


# Errnos that say a socket is already shut or failed, not why: a read or write after
# another one took the socket's error (reading clears it, as SO_ERROR does).
_AFTERMATH = frozenset((errno.ENOTCONN, errno.EPIPE))


def _socket_error(ep: Any, exc: OSError | None, side: str) -> OSError:
    """The error to report for a failed read or write on ``ep``, remembered on ``ep``.

    A socket's pending error is handed to the first call that meets it and then
    cleared, so the socket's other role (a relay's reverse direction) would see
    only ENOTCONN or EPIPE: the first error is kept on the endpoint and reported
    by every later failure on it.
    """
    code = exc.errno if exc is not None else 0
    if ep.error and (not code or code in _AFTERMATH):
        code = ep.error
    elif code and code not in _AFTERMATH and not ep.error:
        ep.error = code
    code = code or errno.EIO
    return OSError(code, f"{os.strerror(code)}: {side} {ep.label}")


class Worker:
    """A worker thread (or, for other backends, the same logic driven differently)."""

    def __init__(self, pool: SplicePool, index: int, hub: Any) -> None:
        self.pool = pool
        self.index = index
        self.hub = hub
        self.pipes = PipePool(pool._pipe_size)
        self.budget = max(pool._pipe_size, 256 * 1024) * 2  # bytes per pass, then requeue
        self._copybuf: memoryview | None = None
        self._smallbuf: memoryview | None = None
        self._spare_zc: list[ZeroCopyMover] = []
        self._spare_copy: list[CopyMover] = []
        self.control: deque[tuple[Any, ...]] = deque()
        self.ready: deque[Splice] = deque()
        # Idle timers: [deadline, seq, splice] entries; an ended splice's entry has its
        # splice set to None (nothing is kept after the end) and is skipped or compacted.
        self.timers: list[list[Any]] = []
        self._stale_timers = 0
        self._seq = itertools.count()
        self.fds: dict[int, Any] = {}  # fd -> its pool Endpoint, while a splice here uses it
        self.accepting = True  # cleared (under the pool lock) when the loop exits
        self.thread_id: int | None = None
        self.exited = _native.Event()
        self.join: Any = self.exited.wait
        self._closing_at: float | None = None
        self._ioc = array.array("i", [0])
        # Counters for stats(); written by this worker only.
        self.passes = 0
        self.wakeups = 0
        self.bytes = 0
        self.zero_copy = 0
        self.copy = 0

    # -- life ----------------------------------------------------------------
    def start(self) -> None:
        self.join = _native.start_thread(self._run)

    def is_current(self) -> bool:
        """True when called from this worker (e.g. in a done callback it runs)."""
        return self.thread_id == _native.get_ident()

    def post(self, msg: tuple[Any, ...]) -> None:
        """Queue a control message (any thread; the caller holds the pool lock)."""
        self.control.append(msg)
        self.hub.wake()

    def _run(self) -> None:
        self.thread_id = _native.get_ident()
        reason, err = EndReason.POOL_CLOSED, None
        try:
            if self.pool._bind_cpus:
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
        with self.pool._lock:
            self.accepting = False
        for msg in self.control:  # nothing posts after accepting is cleared
            if msg[0] == "add":
                self._abandon_safely(msg[1], reason, err)
                if msg[2] is not None:
                    msg[2].set()
            elif msg[0] == "unsplice" and msg[2] is not None:
                msg[2].set()
        self.control.clear()
        for sp in self.assigned():
            self._abandon_safely(sp, reason, err)
        self.pipes.close()
        self.hub.close()
        self.exited.set()

    # -- the loop ------------------------------------------------------------
    def _loop(self) -> None:
        hub = self.hub
        ready = self.ready
        control = self.control
        timers = self.timers
        monotonic = _native.monotonic
        while True:
            if ready:
                timeout: float | None = 0.0
            else:
                timeout = None
                if timers:
                    timeout = max(0.0, timers[0][0] - monotonic())
                if self._closing_at is not None:
                    left = max(0.0, self._closing_at - monotonic())
                    timeout = left if timeout is None else min(timeout, left)
            if timeout is not None and timeout > _MAX_SLEEP:
                timeout = _MAX_SLEEP  # epoll takes a C int of milliseconds; a far deadline waits again
            events = hub.poll(timeout)
            if events:
                self.wakeups += 1
                fds = self.fds
                for fd, flags in events:
                    ep = fds.get(fd)
                    if ep is not None:
                        self._dispatch(ep, flags)
            if control:
                self._process_control()
            if timers and timers[0][0] <= monotonic():
                self._expire_timers(monotonic())
            if ready:
                self._run_ready()
            if self._closing_at is not None:
                if not self.fds:
                    return
                if monotonic() >= self._closing_at:
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
            sp = ready.popleft()
            sp._queued = False
            self._xfer(sp)

    def _dispatch(self, ep: Any, flags: int) -> None:
        """Readiness on an fd: queue the splice(s) it can move (FreeBSD's so_splice_dispatch).

        ``ep.src_of`` and ``ep.drain_of`` are the socket's two roles; a role may
        belong to another worker (a socket shared by splices on two workers), and
        each worker acts only on its own. A bug met while handling one splice ends
        that splice (``_fail``), never the worker or the other role's splice.
        """
        src_of = ep.src_of
        if src_of is not None and flags & _hub.READ and src_of._owner is self:
            try:
                self._source_event(src_of, ep, flags)
            except Exception as exc:
                self._fail(src_of, exc)
        drain_of = ep.drain_of
        if drain_of is not None and drain_of._owner is self:
            try:
                if flags & _hub.ERROR:
                    drain_of._check_drain = True
                    self._make_ready(drain_of)
                elif flags & _hub.WRITE and drain_of._wait_drain:
                    self._make_ready(drain_of)
            except Exception as exc:
                self._fail(drain_of, exc)

    def _source_event(self, sp: Splice, ep: Any, flags: int) -> None:
        if flags & _hub.URGENT:
            ep.urgent = True  # a read may stop at the urgent mark: see _pass and _at_mark
        if sp._wait_drain:
            # Read when the drain wakes it. An edge-triggered hub will not report what
            # arrived meanwhile (data, a FIN) again: that pass must read until EAGAIN.
            sp._fresh = False
            return
        fresh = sp._fresh = not flags & _hub.HANGUP
        small = self._smallbuf
        direct = (  # see _small_pass
            fresh
            and small is not None
            and sp.state is S.IDLE
            and sp._mover is None
            and not sp._bulk
            and not sp.max
            and not sp._check_drain
            and not ep.urgent
            and sp._dst.space >= len(small)
            and not sp._dst.connecting
        )
        if not (direct and self._small_pass(sp, small)):
            self._make_ready(sp)

    def _make_ready(self, sp: Splice) -> None:
        if sp._queued:
            return
        state = sp.state
        if state is S.IDLE:
            sp._set_state(S.QUEUED)
        elif state is not S.CLOSING and state is not S.EXCEPTION:
            return
        sp._queued = True
        self.ready.append(sp)

    # -- control messages (from pool.splice, unsplice, close) ------------------
    def _process_control(self) -> None:
        control = self.control
        while control:
            msg = control.popleft()
            kind = msg[0]
            if kind == "close":
                self._close(msg[1])
                continue
            sp = msg[1]
            try:
                if kind == "add":
                    self._add(sp)
                elif kind == "unsplice":
                    if sp.state in LIVE_STATES:
                        self._end(sp, EndReason.UNSPLICED, None)
                elif kind == "check_drain":
                    self.check_drain(sp)
            except Exception as exc:
                self._fail(sp, exc)
            finally:
                if len(msg) > 2 and msg[2] is not None:
                    msg[2].set()  # pool.splice() or unsplice() returns

    def check_drain(self, sp: Splice) -> None:
        """Have ``sp`` look at its drain's error on its next pass (its source may be silent)."""
        if sp.state in LIVE_STATES:
            sp._check_drain = True
            self._make_ready(sp)

    def _add(self, sp: Splice) -> None:
        if self._closing_at is not None:
            self._abandon(sp, EndReason.POOL_CLOSED, None)
            return
        try:
            self._watch(sp._src)
            self._watch(sp._dst)
        except OSError as exc:
            self._abandon(sp, EndReason.ERROR, exc)
            return
        if sp._copy:
            self.copy += 1
        else:
            self.zero_copy += 1
        if sp.idle:
            now = sp._last_move = _native.monotonic()
            self._look((sp._dst, sp._src) if sp._proxy is not None else (sp._dst,), now)
            self._arm(sp, now + sp.idle)
        # The first pass runs now, before pool.splice() returns: data already in the
        # source moves at once, as both kernels move it inside setsockopt().
        sp._set_state(S.QUEUED)
        self._xfer(sp)

    # -- movers: one per splice while it has bytes in flight or a pass running ------------
    def _checkout(self, sp: Splice) -> Any:
        """Give ``sp`` a mover for a pass (an idle splice holds none, nor its pipe)."""
        if sp._copy:
            spare = self._spare_copy
            mover = spare.pop() if spare else CopyMover(self._copy_buffer())
        else:
            spare = self._spare_zc
            mover = spare.pop() if spare else ZeroCopyMover(self.pipes, self._small_buffer())
            mover.copied = not sp._bulk and mover._small is not None
        sp._mover = mover
        return mover

    def _checkin(self, sp: Splice) -> None:
        """Take back ``sp``'s mover once nothing of it is in flight (it keeps it otherwise)."""
        mover = sp._mover
        if mover is None or mover.pending:
            return
        mover.release()
        sp._mover = None
        # The next pass starts where this one left off: small reads (and direct passes) or bulk.
        if mover.zero_copy:
            sp._bulk = not mover.copied
            spare = self._spare_zc
        else:
            sp._bulk = not mover.short
            spare = self._spare_copy
        if len(spare) < _SPARE_MOVERS:
            spare.append(mover)

    def _small_buffer(self) -> memoryview | None:
        size = self.pool._small_copy
        if not size:
            return None
        if self._smallbuf is None:
            self._smallbuf = memoryview(bytearray(size))
        return self._smallbuf

    def _copy_buffer(self) -> memoryview:
        if self._copybuf is None:
            self._copybuf = memoryview(bytearray(self.pool._copy_size))
        return self._copybuf

    def _close(self, grace: float) -> None:
        self._closing_at = _native.monotonic() + max(grace, 0.0)
        for sp in self.assigned():
            if sp.state in LIVE_STATES:
                try:
                    self._end(sp, EndReason.POOL_CLOSED, None)
                except Exception as exc:
                    self._fail(sp, exc)

    # -- fd roles on the hub ---------------------------------------------------
    def _watch(self, ep: Any) -> None:
        """Watch a socket a splice here has just taken a role on (the pool set the role)."""
        if self.fds.get(ep.fd) is None:
            self.hub.add(ep.fd)
            self.fds[ep.fd] = ep
        self._update_interest(ep)

    def _unwatch(self, ep: Any) -> None:
        """A role on ``ep`` was given up: stop watching it once no splice here holds one."""
        if self.fds.get(ep.fd) is not ep:
            return
        if self._mine(ep.src_of) is None and self._mine(ep.drain_of) is None:
            del self.fds[ep.fd]
            self.hub.remove(ep.fd)
        else:
            self._update_interest(ep)

    def assigned(self) -> list[Splice]:
        """This worker's splices not yet done (taken up, so each holds a role on a watched fd)."""
        found: dict[Splice, None] = {}
        for ep in list(self.fds.values()):
            for sp in (ep.src_of, ep.drain_of):
                if sp is not None and sp._owner is self:
                    found[sp] = None
        return list(found)

    def _mine(self, sp: Splice | None) -> Splice | None:
        return sp if sp is not None and sp._owner is self else None

    def _update_interest(self, ep: Any) -> None:
        src_of = self._mine(ep.src_of)
        drain_of = self._mine(ep.drain_of)
        read = src_of is not None and not src_of._wait_drain
        write = drain_of is not None and drain_of._wait_drain
        self.hub.interest(ep.fd, read, write)

    def _wait_for(self, sp: Splice, drain: bool) -> None:
        """Say what the splice waits for next; arms the drain on every drain wait."""
        src, dst = sp._src, sp._dst
        if drain:
            was = sp._wait_drain
            sp._wait_drain = True
            self._update_interest(dst)
            if not was and src is not dst and not sp._finishing:
                self._update_interest(src)
        elif sp._wait_drain:
            sp._wait_drain = False
            for ep in (src, dst) if src is not dst else (src,):
                if self.fds.get(ep.fd) is ep:
                    self._update_interest(ep)

    # -- timers ------------------------------------------------------------------
    def _arm(self, sp: Splice, deadline: float) -> None:
        """(Re-)arm ``sp``'s idle timer."""
        entry = [deadline, next(self._seq), sp]
        sp._timer = entry
        heapq.heappush(self.timers, entry)

    def _disarm(self, sp: Splice) -> None:
        """An ended splice keeps no timer: its entry forgets it, and dead entries are compacted."""
        entry = sp._timer
        if entry is None:
            return
        sp._timer = None
        entry[2] = None
        self._stale_timers += 1
        timers = self.timers
        if self._stale_timers > _STALE_TIMERS_MIN and 2 * self._stale_timers > len(timers):
            timers[:] = [e for e in timers if e[2] is not None]  # in place: _loop holds the list
            heapq.heapify(timers)
            self._stale_timers = 0

    def _expire_timers(self, now: float) -> None:
        timers = self.timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            sp = entry[2]
            if sp is None:
                self._stale_timers -= 1
                continue
            sp._timer = None
            try:
                self._idle_expired(sp, now)
            except Exception as exc:
                self._fail(sp, exc)

    def _idle_expired(self, sp: Splice, now: float) -> None:
        """``sp``'s idle deadline came: re-arm if it was active since, else end it with IDLE.

        Active means a byte moved (either way, for a relay), or a byte left a drain's
        send queue: a client reading a fast upstream slowly empties a multi-MB buffer
        without waking the pool, and must not be cut. The queues are looked at when
        the timer fires (SIOCOUTQ); with no byte pushed since the last look, a queue
        only shrinks when the peer takes bytes. While bytes wait in a queue, it is
        known quiet only since that look, and must stay so for ``idle`` seconds.
        """
        last = sp._last_move
        relay = sp._proxy
        if relay is not None:  # a relay is idle only when neither way moves
            last = max(last, relay._other(sp)._last_move)
        drains = (sp._dst, sp._src) if relay is not None else (sp._dst,)
        deadline = last + sp.idle
        if deadline > now:  # something moved since: re-arm (one entry per splice)
            self._look(drains, now)
            self._arm(sp, deadline)
            return
        quiet_from = None
        for ep in drains:
            queued = self._send_queue(ep)
            look = ep.look
            if queued < 0 or look is None:
                continue
            before, looked = look
            if queued < before or looked < last:
                # Bytes left the queue (or no look since the last move to compare with):
                # active now; look again from here.
                sp._last_move = now
                self._look(drains, now)
                self._arm(sp, now + sp.idle)
                return
            if queued or before:
                quiet_from = looked if quiet_from is None else max(quiet_from, looked)
        if quiet_from is not None and quiet_from + sp.idle > now:
            self._arm(sp, quiet_from + sp.idle)
            return
        # Nothing moved for `idle` seconds; a leftover means the drain accepted nothing.
        if sp.state in LIVE_STATES:
            self._end(sp, EndReason.IDLE, None, drop=True)
        else:
            sp.dropped += sp._mover.drop()
            self._finish(sp)

    def _look(self, drains: tuple[Any, ...], now: float) -> None:
        """Note the drains' send queues now, for the next idle deadline to compare."""
        for ep in drains:
            queued = self._send_queue(ep)
            if queued >= 0:
                ep.look = (queued, now)

    def _send_queue(self, ep: Any) -> int:
        """Bytes in ``ep``'s send queue (SIOCOUTQ: unsent + unacked), or -1 where it cannot
        be known (then never asked again for that socket)."""
        if not ep.outq or ep.sock is None:
            return -1
        ioc = self._ioc
        try:
            _ioctl(ep.fd, _SIOCOUTQ, ioc, True)
        except OSError:
            ep.outq = False
            return -1
        return ioc[0]

    # -- xfer ----------------------------------------------------------------------
    def _xfer(self, sp: Splice) -> None:
        """One pass for one splice (FreeBSD's so_splice_xfer); a bug in it ends that splice only."""
        try:
            self._xfer_pass(sp)
        except Exception as exc:
            self._fail(sp, exc)

    def _xfer_pass(self, sp: Splice) -> None:
        state = sp.state
        if state is S.CLOSED:
            return
        self.passes += 1
        if sp._finishing:
            self._flush(sp)
            return
        sp._set_state(S.RUNNING)
        before = sp.transferred
        outcome = self._pass(sp)
        sp._fresh = False
        moved = sp.transferred - before
        if moved:
            self.bytes += moved
            if sp.idle:  # only an idle timer reads it
                sp._last_move = _native.monotonic()
        if outcome == _ENDED:
            return
        self._checkin(sp)
        if outcome == _REQUEUE:
            sp._set_state(S.QUEUED)
            sp._queued = True
            self.ready.append(sp)
            if sp._wait_drain:
                self._wait_for(sp, drain=False)
            return
        sp._set_state(S.IDLE)
        self._wait_for(sp, drain=outcome == _WAIT_DRAIN)

    def _pass(self, sp: Splice) -> int:
        mover = sp._mover
        if mover is None:
            mover = self._checkout(sp)
        src = sp._src
        dst = sp._dst
        woke_for_drain = sp._wait_drain
        if mover.pending:
            if not self._push(sp, mover, dst):
                return _ENDED
            if mover.pending:
                return _WAIT_DRAIN
        if dst.connecting and not self._drain_connected(sp):
            return _WAIT_DRAIN if sp.state is S.RUNNING else _ENDED
        if sp._check_drain:
            sp._check_drain = False
            exc = self._drain_failure(dst)
            if exc is not None:
                return self._end(sp, EndReason.ERROR, exc, drop=True)
        budget = self.budget
        limit = sp.max
        taken = sp.taken
        while True:
            want = budget
            if limit:
                rest = limit - sp.taken
                if rest <= 0:
                    return self._end(sp, EndReason.MAX, None)
                if rest < want:
                    want = rest
            cap = mover.capacity()
            if cap < want:
                want = cap
            space, low = self._drain_space(dst, want)
            n = want if space >= want else space
            if n < low and n < want:
                if not woke_for_drain:
                    return _WAIT_DRAIN
                # The drain said it is writable: trust it for one low-water chunk, so an
                # estimate that lags the kernel can never spin us on drain wakeups.
                n = min(want, low)
            woke_for_drain = False
            try:
                try:
                    got = mover.pull(src, n)
                except BlockingIOError:
                    # Drained, or stopped at a TCP urgent mark (suspected after an urgent
                    # event, or when a woken pass finds nothing at all: a level-triggered
                    # hub keeps reporting a source stuck there).
                    if not (src.urgent or sp.taken == taken) or not self._at_mark(src):
                        return _WAIT_SOURCE
                    got = mover.step(src, n, self._copy_buffer())
            except BlockingIOError:
                return _WAIT_SOURCE
            except NotSpliceable as exc:
                self._to_copy(sp, exc)
                mover = sp._mover
                continue
            except OSError as exc:
                return self._source_failed(sp, exc)
            if not got:
                return self._source_eof(sp)
            sp.taken += got
            if not self._push(sp, mover, dst):
                return _ENDED
            if mover.pending:
                return _WAIT_DRAIN
            if mover.short and sp._fresh and not src.urgent:
                # A copy read took less than asked: the source was drained. The event
                # that queued this pass saw no FIN or error, and anything arriving from
                # now on raises a new one, so the read that would say EAGAIN is skipped.
                # (A read also stops short at an urgent mark: never trusted after one.)
                return _WAIT_SOURCE
            budget -= got
            if budget <= 0:
                return _REQUEUE

    def _at_mark(self, src: Any) -> bool:
        """Is ``src``'s next byte at a TCP urgent mark? Clears the urgent hint when it is not."""
        ioc = self._ioc
        try:
            _ioctl(src.fd, _SIOCATMARK, ioc, True)
        except OSError:  # not TCP
            src.urgent = False
            return False
        at = src.urgent = bool(ioc[0])
        return at

    def _source_failed(self, sp: Splice, exc: OSError) -> int:
        src = sp._src
        self._end(sp, EndReason.ERROR, _socket_error(src, exc, "source"))
        self.pool._drain_failed(src, self)  # a relay's reverse direction drains into it
        return _ENDED

    def _source_eof(self, sp: Splice) -> int:
        src = sp._src
        if src.error:  # another call on this socket took its error: it is no EOF
            return self._end(sp, EndReason.ERROR, _socket_error(src, None, "source"))
        return self._end(sp, EndReason.EOF, None)

    def _small_pass(self, sp: Splice, small: memoryview) -> bool:
        """A whole pass for a small read, at dispatch: False if a queued pass must run instead.

        Called for an IDLE splice whose source reported data (no FIN, no error) and
        that holds nothing in flight, in small-read mode, with no ``max``, and whose
        drain is known to take ``len(small)`` bytes. One ``recv_into`` and one
        ``send``, no queue and no state change: a request or a reply costs two
        syscalls and little more (FreeBSD's commit calls this direct dispatch). A
        read that fills the buffer means more is waiting: the queued pass goes on.
        """
        n = len(small)
        try:
            got = sp._src.sock.recv_into(small, n)
        except BlockingIOError:
            return True
        except OSError as exc:
            self._source_failed(sp, exc)
            return True
        if not got:
            self._source_eof(sp)
            return True
        self.passes += 1
        sp.taken += got
        dst = sp._dst
        data = small[:got]
        try:
            sent = dst.sock.send(data, _MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._checkout(sp).hold(data, 0)
            self._end(sp, EndReason.ERROR, _socket_error(dst, exc, "drain"), drop=True)
            return True
        if sent:
            sp.transferred += sent
            dst.space -= sent
            self.bytes += sent
            if sp.idle:
                sp._last_move = _native.monotonic()
        if sent < got:  # the drain took less than its space said: wait for it
            self._checkout(sp).hold(data, sent)
            self._wait_for(sp, drain=True)
            sp._fresh = False  # the event is spent: the pass the drain wakes reads to EAGAIN
            return True
        if got < n:
            sp._fresh = False
            return True  # the source is drained; its next byte raises a new event
        sp._bulk = True  # more is waiting: the queued pass streams it through the pipe
        return False

    def _push(self, sp: Splice, mover: Any, dst: Any) -> bool:
        """Hand the mover's bytes to the drain; False if the drain failed (sp is then ended)."""
        try:
            sent = mover.push(dst)
            sp.transferred += sent
            dst.space -= sent
        except BlockingIOError:
            pass
        except OSError as exc:
            self._end(sp, EndReason.ERROR, _socket_error(dst, exc, "drain"), drop=True)
            return False
        return True

    @staticmethod
    def _drain_failure(dst: Any) -> OSError | None:
        """The drain reported an error or hang-up: its error if it can no longer send, else None."""
        err = dst.error or dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            dst.error = err  # the socket's other role (a relay's source) must see it too
            return OSError(err, f"{os.strerror(err)}: drain {dst.label}")
        try:
            dst.sock.send(b"", _MSG_NOSIGNAL)  # shut for writing (shutdown() by its owner)?
        except BlockingIOError:
            return None
        except OSError as exc:
            return _socket_error(dst, exc, "drain")
        return None

    def _drain_space(self, dst: Any, want: int) -> tuple[int, int]:
        """(free bytes in the drain's send buffer, low-water mark): at least ``want`` if known.

        ``dst.space`` is what SIOCOUTQ said was free, less every byte pushed since:
        a lower bound, as the queue only shrinks by itself (ACKs). While it covers
        ``want``, no syscall is needed; small messages skip the ioctl for a whole
        send buffer's worth of bytes.
        """
        if not dst.outq:
            return (1 << 62, 0)
        space = dst.space
        if space >= want:
            return (space, 0)
        age = dst.sndbuf_age
        if age >= _SNDBUF_REFRESH:
            dst.sndbuf = dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            age = 0
        queued = self._send_queue(dst)
        if queued < 0:  # not a socket type that reports it: rely on partial sends
            return (1 << 62, 0)
        space = dst.sndbuf - queued
        low = dst.sndbuf >> 2
        if low > _LOW_WATER_MAX:
            low = _LOW_WATER_MAX
        if space < low and age:
            # Before calling the drain full, make sure we are not looking at a stale size.
            dst.sndbuf = dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            age = 0
            space = dst.sndbuf - queued
        dst.sndbuf_age = age + 1
        dst.space = space
        return (space, low)

    def _drain_connected(self, sp: Splice) -> bool:
        """A drain accepted while its connect was in progress: connected yet? (ends sp on failure)"""
        dst = sp._dst
        try:
            dst.sock.getpeername()
        except OSError:
            err = dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                exc = OSError(err, f"{errno.errorcode.get(err, err)}: connect failed: drain {dst.label}")
                self._end(sp, EndReason.ERROR, exc, drop=True)
            return False
        dst.connecting = False
        return True

    def _to_copy(self, sp: Splice, why: BaseException) -> None:
        """Switch a splice to the copy path for good (nothing is pending)."""
        _native.report(logging.WARNING, "splicepool: %r falls back to the copy path: %s", sp, why)
        self._checkin(sp)
        sp._copy = True
        self._checkout(sp)
        self.zero_copy -= 1
        self.copy += 1

    # -- ending ------------------------------------------------------------------
    def _end(self, sp: Splice, reason: EndReason, error: OSError | None, drop: bool = False) -> int:
        """End a live splice (FreeBSD's EXCEPTION or CLOSING, then so_unsplice).

        The source is released at once (it may be spliced again); the splice is done
        once its pipe leftover has reached the drain, or has been dropped.
        """
        sp.reason = reason
        sp.error = error
        if (reason is EndReason.UNSPLICED or reason is EndReason.POOL_CLOSED) and sp.state is not S.RUNNING:
            sp._set_state(S.CLOSING)
        else:  # by itself, or cut short in a pass (a worker crash, pool.close's grace)
            sp._set_state(S.EXCEPTION)
        sp._finishing = True
        self.pool._source_ended(sp)  # gives up the source role
        self._unwatch(sp._src)
        mover = sp._mover
        if drop and mover is not None:
            sp.dropped += mover.drop()
        if mover is not None and mover.pending:
            self._flush(sp)
        else:
            self._finish(sp)
        return _ENDED

    def _flush(self, sp: Splice) -> None:
        """Deliver an ended splice's leftover; finish once it is gone."""
        mover = sp._mover
        try:
            moved = mover.push(sp._dst)
        except BlockingIOError:
            moved = 0
        except OSError as exc:
            if sp.error is None:
                sp.error = _socket_error(sp._dst, exc, "drain")
            sp.dropped += mover.drop()
            moved = 0
        if moved:
            sp.transferred += moved
            sp._dst.space -= moved
            self.bytes += moved
            if sp.idle:
                sp._last_move = _native.monotonic()
        if mover.pending:
            self._wait_for(sp, drain=True)  # its idle timer, if any, still runs
        else:
            self._finish(sp)

    def _finish(self, sp: Splice) -> None:
        """Release everything of an ended splice and wake its waiters."""
        if sp.state is S.CLOSED:
            return
        mover = sp._mover
        if mover is not None:
            if mover.pending:
                sp.dropped += mover.drop()
            self._checkin(sp)
        self._disarm(sp)
        src, dst = sp._src, sp._dst
        if dst.drain_of is sp:
            dst.drain_of = None  # the drain is free: another splice may take it now
        self._unwatch(src)
        if dst is not src:
            self._unwatch(dst)
        relay = sp._proxy
        if relay is not None:
            relay._direction_ending(sp)  # half-close or abort, while its sockets are open
        self.pool._splice_done(sp)
        sp._signal_done()
        if relay is not None:
            relay._direction_done(sp)

    def end_now(self, sp: Splice, reason: EndReason) -> None:
        """End ``sp`` at once if it is between passes (on this worker); a bug doing so ends it
        with ERROR."""
        if sp.state is not S.IDLE and sp.state is not S.QUEUED:
            return
        try:
            self._end(sp, reason, None)
        except Exception as exc:
            self._fail(sp, exc)

    def _fail(self, sp: Splice, exc: BaseException) -> None:
        """A bug met while handling ``sp``: end that splice with ERROR; the worker goes on.

        Its leftover is dropped (counted in ``dropped``). If ending it fails too, the
        worker cannot trust its books: it re-raises, and the crash path ends everything.
        """
        _native.report(
            logging.ERROR, "splicepool: internal error on %r; it ends with ERROR", sp, exc_info=True
        )
        self._abandon(sp, EndReason.ERROR, OSError(errno.EIO, f"splicepool internal error: {exc!r}"))

    def _abandon_safely(self, sp: Splice, reason: EndReason, error: OSError | None) -> None:
        """``_abandon`` on the way out: a failure is reported, and the splice still completes."""
        try:
            self._abandon(sp, reason, error)
        except Exception:
            _native.report(logging.CRITICAL, "splicepool: cannot end %r cleanly", sp, exc_info=True)
            if sp.state is not S.CLOSED:
                if sp.reason is None:
                    sp.reason, sp.error = reason, error
                sp.state = S.CLOSED  # no legal move is left: waiters must not hang
                sp._complete()
                if sp._proxy is not None:
                    sp._proxy._direction_done(sp)

    def _abandon(self, sp: Splice, reason: EndReason, error: OSError | None) -> None:
        """End a splice now, whatever its state: leftover dropped (pool close, crash)."""
        if sp.state is S.CLOSED:
            return
        if sp.state in LIVE_STATES:
            if sp.state is S.INIT:
                sp.reason, sp.error = reason, error
                self.pool._source_ended(sp)
            else:
                self._end(sp, reason, error, drop=True)
                return
        self._finish(sp)
