"""Moving bytes: the zero-copy path (``os.splice`` through a pipe) and the copy path.

Both movers keep one contract, which the worker's xfer pass relies on:

* ``pull(src, n)`` takes at most ``n`` bytes from the source into the mover
  and returns how many (0 means EOF). It raises ``BlockingIOError`` when the
  source has nothing, or another ``OSError``. It is only called when
  ``pending`` is 0.
* ``push(dst)`` hands what the mover holds to the drain and returns how many
  bytes the drain accepted (``BlockingIOError`` when it accepted none).
* ``pending`` is what was pulled and not yet accepted by the drain: the
  leftover. ``drop()`` discards it (the drain is gone) and returns its size.
  ``hold(data, sent)`` makes the rest of ``data`` (bytes the worker read and
  sent itself, of which ``sent`` went) the leftover, to be pushed first.
* ``step(src, n, buf)`` is ``pull`` with ``recv_into`` (into ``buf``): it reads
  past a TCP urgent mark, where ``os.splice`` stops for good and ``recv`` only
  once (without ``SO_OOBINLINE`` it skips the urgent byte, with it the byte is
  read as data). Only called when ``pending`` is 0.
* ``release()`` gives back per-splice resources once ``pending`` is 0: an
  idle splice holds no pipe.

``src`` and ``dst`` are the pool's endpoints: ``.fd`` for os.splice, ``.sock``
(a non-blocking ``_socket.socket``) for the copy path.

A splice chooses its mover once; it changes only from zero-copy to copy, and
only when nothing is pending (a socket ``os.splice`` refuses, or no pipe can
be had because the process is out of fds).

``Xfer`` is a worker's transfer context (FreeBSD's ``so_splice_xfer``): its
pipes, buffers and spare movers, and the passes. ``run_pass`` moves bytes for
one splice until the source is drained, the drain is full, the budget is
spent or the splice ends, and says which as an *outcome*; ``small_pass`` is
the same for one small read at the event (direct dispatch), ``flush`` pushes
an ended splice's leftover. A pass never changes a splice's phase and never
ends it: the engine does, from the outcome.
"""

from __future__ import annotations

import array
import errno
import logging
import os
import sys

from . import _native, _sockets
from ._sockets import MSG_NOSIGNAL, drain_space, socket_error

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ (Python >= 3.10 names it, on Linux only)
_F_GETPIPE_SZ = 1032

HAVE_SPLICE = sys.platform.startswith("linux") and hasattr(os, "splice")

# Errors that mean "this fd cannot take part in splice(2)", not "the connection failed".
_NOT_SPLICEABLE = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP}
# Errors that mean "no pipe now": the copy path still works.
_NO_PIPE = {errno.EMFILE, errno.ENFILE, errno.ENOMEM}


class NotSpliceable(Exception):
    """os.splice refused these fds; the splice must switch to the copy path."""


class Pipe:
    """A non-blocking pipe used as the in-kernel buffer of one splice at a time."""

    __slots__ = ("r", "w", "capacity")

    def __init__(self, size: int) -> None:
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            import fcntl

            try:
                fcntl.fcntl(self.w, _F_SETPIPE_SZ, size)
            except OSError:
                pass  # over /proc/sys/fs/pipe-max-size or the per-user quota: keep the default
            self.capacity = fcntl.fcntl(self.w, _F_GETPIPE_SZ)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                _native.close(fd)
            except OSError:
                pass


class PipePool:
    """A worker's free list of empty pipes, so idle splices hold none."""

    def __init__(self, size: int, keep: int = 8) -> None:
        self.size = size
        self.keep = keep
        self._free: list[Pipe] = []
        self.created = 0

    def acquire(self) -> Pipe:
        if self._free:
            return self._free.pop()
        pipe = Pipe(self.size)
        self.created += 1
        return pipe

    def release(self, pipe: Pipe) -> None:
        if len(self._free) < self.keep:
            self._free.append(pipe)
        else:
            pipe.close()

    @property
    def idle(self) -> int:
        return len(self._free)

    def close(self) -> None:
        while self._free:
            self._free.pop().close()


class _Copied:
    """The bytes a mover read into Python (``_left``), kept until the drain takes them."""

    __slots__ = ("_left", "pending", "short")

    def __init__(self) -> None:
        self._left: Any = b""
        self.pending = 0
        self.short = False  # the last pull was a short copy read: the source was drained

    def hold(self, left: Any, sent: int) -> None:
        """Keep what the drain did not take of ``left`` (``sent`` bytes of it went) as the leftover."""
        if sent >= len(left):
            left = b""
        elif isinstance(left, memoryview):
            left = bytes(left[sent:])  # a view of a worker's buffer, which is about to be reused
        else:
            left = left[sent:]
        self._left = left
        self.pending = len(left)

    def step(self, src: Any, n: int, buf: memoryview) -> int:
        want = n if n < len(buf) else len(buf)
        got = src.sock.recv_into(buf, want)
        self.short = got < want
        if got:
            self._left = buf[:got]  # pushed in the same pass; copied by hold() if the drain balks
            self.pending = got
        return got

    def _push_copied(self, dst: Any) -> int:
        left = self._left
        try:
            sent = dst.sock.send(left, MSG_NOSIGNAL)
        except BaseException:
            self.hold(left, 0)
            raise
        self.hold(left, sent)
        return sent


class ZeroCopyMover(_Copied):
    """socket -> pipe -> socket with os.splice: the payload never enters Python.

    Small reads are the exception: after a pull that took less than the small
    buffer holds (a request, a reply, a keystroke), the next pull first tries
    ``recv_into`` that buffer. Two plain syscalls (recv, send) cost less than two
    splices through a pipe for a few bytes, and a short copy read says the
    socket is drained. A full small read means bulk: the same pull goes on
    through the pipe, and the splice stays zero-copy while it streams.
    """

    zero_copy = True
    __slots__ = ("_pipes", "_pipe", "_small", "copied")

    def __init__(self, pipes: PipePool, small: memoryview | None = None) -> None:
        _Copied.__init__(self)  # _left: pending bytes that are not in the pipe
        self._pipes = pipes
        self._pipe: Pipe | None = None
        self._small = small  # the worker's small-read buffer (None: always splice)
        self.copied = small is not None  # the next pull tries the small buffer first

    def capacity(self) -> int:
        pipe = self._pipe
        return pipe.capacity if pipe is not None else self._pipes.size

    def pull(self, src: Any, n: int) -> int:
        small = self._small
        if self.copied and small is not None:
            want = n if n < len(small) else len(small)
            got = src.sock.recv_into(small, want)
            self.short = got < want
            if got:
                self._left = small[:got]
                self.pending = got
                if got < want:
                    return got
            else:
                return 0
            # The small buffer filled up: more is waiting. Stream it through the pipe.
            self.copied = False
            return got
        pipe = self._pipe
        if pipe is None:
            try:
                pipe = self._pipe = self._pipes.acquire()
            except OSError as exc:
                if exc.errno in _NO_PIPE:
                    raise NotSpliceable(exc) from exc
                raise
        self.short = False
        try:
            got = os.splice(src.fd, pipe.w, n, flags=_SPLICE_FLAGS)
        except BlockingIOError:
            raise
        except OSError as exc:
            if exc.errno in _NOT_SPLICEABLE:
                raise NotSpliceable(exc) from exc
            raise
        self.pending = got
        if small is not None and got < len(small):
            self.copied = True
        return got

    def push(self, dst: Any) -> int:
        if self._left:
            return self._push_copied(dst)
        pipe = self._pipe
        assert pipe is not None
        sent = os.splice(pipe.r, dst.fd, self.pending, flags=_SPLICE_FLAGS)
        self.pending -= sent
        return sent

    def drop(self) -> int:
        lost = self.pending
        in_pipe = lost and not self._left
        self._left = b""
        if self._pipe is not None and in_pipe:
            # The bytes cannot go back to the source: close the pipe and with it the bytes.
            self._pipe.close()
            self._pipe = None
        self.pending = 0
        return lost

    def release(self) -> None:
        pipe = self._pipe
        if pipe is not None and not self.pending:
            self._pipe = None
            self._pipes.release(pipe)


class CopyMover(_Copied):
    """recv_into a buffer shared by the worker's splices, then send; a leftover is kept per splice."""

    zero_copy = False
    __slots__ = ("_buf",)

    def __init__(self, buf: memoryview) -> None:
        _Copied.__init__(self)
        self._buf = buf

    def capacity(self) -> int:
        return len(self._buf)

    def pull(self, src: Any, n: int) -> int:
        buf = self._buf
        want = n if n < len(buf) else len(buf)
        got = src.sock.recv_into(buf, want)
        self.short = got < want
        if got:
            self._left = buf[:got]  # a view until push decides; copied if a leftover remains
            self.pending = got
        return got

    def push(self, dst: Any) -> int:
        return self._push_copied(dst)

    def drop(self) -> int:
        lost = self.pending
        self._left = b""
        self.pending = 0
        return lost

    def release(self) -> None:
        pass



# -- passes --------------------------------------------------------------------------------
# Outcomes of a pass: what the splice waits for next, or why it ended.
WAIT_SOURCE = 0  # the source is drained
WAIT_DRAIN = 1  # the drain is full (a leftover may be held)
REQUEUE = 2  # the budget is spent: another pass after the other ready splices
MORE = 3  # a small read filled its buffer: a queued pass streams the rest
EOF = 4
MAX = 5
ERROR = 6  # the source is at EOF, but another call took its error (Xfer.error)
SOURCE_FAILED = 7  # reading failed (Xfer.error); the socket's other role must look at it
DRAIN_FAILED = 8  # writing failed (Xfer.error): the leftover is lost

# Why a queued pass runs (the phase it was queued in).
FRESH = 1  # a read event that saw no FIN or error queued it
WOKE_FOR_DRAIN = 2  # the drain reported space
CHECK_DRAIN = 4  # the drain reported an error or hang-up

_SPARE_MOVERS = 64  # idle movers a worker keeps for its next passes


class Xfer:
    """A worker's transfer context: its pipes, buffers, spare movers and counters."""

    def __init__(self, pipe_size: int, copy_size: int, small_copy: int) -> None:
        self.pipes = PipePool(pipe_size)
        self.budget = max(pipe_size, 256 * 1024) * 2  # bytes per pass, then requeue
        self.copy_size = copy_size
        self.small_copy = small_copy
        self.copybuf: memoryview | None = None
        self.small: memoryview | None = None  # made with the first zero-copy mover
        self.spare_zc: list[ZeroCopyMover] = []
        self.spare_copy: list[CopyMover] = []
        self.ioc = array.array("i", [0])
        self.now = 0.0  # the worker's clock, read once per wakeup
        self.error: OSError | None = None  # the error of the last *_FAILED or ERROR outcome
        # Counters for stats(); written by this worker only.
        self.passes = 0
        self.bytes = 0
        self.zero_copy = 0  # splices taken up on each path
        self.copy = 0

    # -- movers: one per splice while it has bytes in flight or a pass running ------------
    def checkout(self, sp: Any) -> Any:
        """Give ``sp`` a mover for a pass (an idle splice holds none, nor its pipe)."""
        if sp.copy:
            spare = self.spare_copy
            mover = spare.pop() if spare else CopyMover(self.copy_buffer())
        else:
            spare = self.spare_zc
            mover = spare.pop() if spare else ZeroCopyMover(self.pipes, self.small_buffer())
            mover.copied = not sp.bulk and self.small is not None
        sp.mover = mover
        return mover

    def checkin(self, sp: Any) -> None:
        """Take back ``sp``'s mover once nothing of it is in flight (it keeps it otherwise)."""
        mover = sp.mover
        if mover is None or mover.pending:
            return
        mover.release()
        sp.mover = None
        # The next pass starts where this one left off: small reads (and direct passes) or bulk.
        if mover.zero_copy:
            sp.bulk = not mover.copied
            spare = self.spare_zc
        else:
            sp.bulk = not mover.short
            spare = self.spare_copy
        if len(spare) < _SPARE_MOVERS:
            spare.append(mover)

    def small_buffer(self) -> memoryview | None:
        if self.small is None and self.small_copy:
            self.small = memoryview(bytearray(self.small_copy))
        return self.small

    def copy_buffer(self) -> memoryview:
        if self.copybuf is None:
            self.copybuf = memoryview(bytearray(self.copy_size))
        return self.copybuf

    def to_copy(self, sp: Any, why: BaseException) -> Any:
        """Switch a splice to the copy path for good (nothing is pending); its new mover."""
        _native.report(logging.WARNING, "splicepool: %r falls back to the copy path: %s", sp, why)
        self.checkin(sp)
        sp.copy = True
        self.zero_copy -= 1
        self.copy += 1
        return self.checkout(sp)

    def close(self) -> None:
        self.pipes.close()

    # -- the one byte-accounting helper ---------------------------------------------------
    def _moved(self, sp: Any, dst: Any, n: int) -> None:
        """The drain accepted ``n`` bytes of ``sp``."""
        sp.transferred += n
        sp.last_move = self.now
        dst.space -= n
        self.bytes += n

    def _push(self, sp: Any, mover: Any, dst: Any) -> bool:
        """Hand the mover's bytes to the drain; False if the drain failed (``error`` set)."""
        try:
            sent = mover.push(dst)
        except BlockingIOError:
            return True
        except OSError as exc:
            self.error = socket_error(dst, exc, "drain")
            return False
        self._moved(sp, dst, sent)
        return True

    def _source_failed(self, src: Any, exc: OSError) -> int:
        self.error = socket_error(src, exc, "source")
        return SOURCE_FAILED

    def _source_eof(self, src: Any) -> int:
        if src.error:  # another call on this socket took its error: it is no EOF
            self.error = socket_error(src, None, "source")
            return ERROR
        return EOF

    # -- the passes --------------------------------------------------------------------
    def run_pass(self, sp: Any, why: int) -> int:
        """One bounded pass for ``sp`` (RUNNING); ``why``: FRESH, WOKE_FOR_DRAIN, CHECK_DRAIN bits."""
        self.passes += 1
        mover = sp.mover
        if mover is None:
            mover = self.checkout(sp)
        src = sp.src
        dst = sp.dst
        if mover.pending:
            if not self._push(sp, mover, dst):
                return DRAIN_FAILED
            if mover.pending:
                return WAIT_DRAIN
        if dst.connecting:
            try:
                exc = _sockets.connect_failure(dst)
            except BlockingIOError:
                return WAIT_DRAIN
            if exc is not None:
                self.error = exc
                return DRAIN_FAILED
        if why & CHECK_DRAIN:
            exc = _sockets.drain_failure(dst)
            if exc is not None:
                self.error = exc
                return DRAIN_FAILED
        woke_for_drain = why & WOKE_FOR_DRAIN
        fresh = why & FRESH
        budget = self.budget
        limit = sp.max
        taken = sp.taken
        ioc = self.ioc
        while True:
            want = budget
            if limit:
                rest = limit - sp.taken
                if rest <= 0:
                    return MAX
                if rest < want:
                    want = rest
            cap = mover.capacity()
            if cap < want:
                want = cap
            space, low = drain_space(dst, want, ioc)
            n = want if space >= want else space
            if n < low and n < want:
                if not woke_for_drain:
                    return WAIT_DRAIN
                # The drain said it is writable: trust it for one low-water chunk, so an
                # estimate that lags the kernel can never spin us on drain wakeups.
                n = min(want, low)
            woke_for_drain = 0
            try:
                try:
                    got = mover.pull(src, n)
                except BlockingIOError:
                    # Drained, or stopped at a TCP urgent mark (suspected after an urgent
                    # event, or when a woken pass finds nothing at all: a level-triggered
                    # hub keeps reporting a source stuck there).
                    if not (src.urgent or sp.taken == taken) or not _sockets.at_mark(src, ioc):
                        return WAIT_SOURCE
                    got = mover.step(src, n, self.copy_buffer())
            except BlockingIOError:
                return WAIT_SOURCE
            except NotSpliceable as exc:
                mover = self.to_copy(sp, exc)
                continue
            except OSError as exc:
                return self._source_failed(src, exc)
            if not got:
                return self._source_eof(src)
            sp.taken += got
            if not self._push(sp, mover, dst):
                return DRAIN_FAILED
            if mover.pending:
                return WAIT_DRAIN
            if mover.short and fresh and not src.urgent:
                # A copy read took less than asked: the source was drained. The event
                # that queued this pass saw no FIN or error, and anything arriving from
                # now on raises a new one, so the read that would say EAGAIN is skipped.
                # (A read also stops short at an urgent mark: never trusted after one.)
                return WAIT_SOURCE
            budget -= got
            if budget <= 0:
                return REQUEUE

    def can_pass_small(self, sp: Any) -> bool:
        """Whether a source event may run ``small_pass`` for ``sp`` (WAIT_SOURCE) right away."""
        small = self.small
        return (
            small is not None
            and sp.mover is None
            and not sp.bulk
            and not sp.max
            and not sp.src.urgent
            and sp.dst.space >= len(small)
            and not sp.dst.connecting
        )

    def small_pass(self, sp: Any) -> int:
        """A whole pass for one small read, at the event that reported it (direct dispatch).

        For a splice whose source reported data (no FIN, no error), holding nothing
        in flight, in small-read mode, with no ``max``, whose drain is known to take
        a small buffer's worth (``can_pass_small``). One ``recv_into`` and one
        ``send``, no queue: a request or a reply costs two syscalls and little more
        (FreeBSD's commit calls this direct dispatch). A read that fills the buffer
        means more is waiting: MORE, and a queued pass goes on.
        """
        small = self.small
        n = len(small)
        src = sp.src
        try:
            got = src.sock.recv_into(small, n)
        except BlockingIOError:
            return WAIT_SOURCE
        except OSError as exc:
            return self._source_failed(src, exc)
        if not got:
            return self._source_eof(src)
        self.passes += 1
        sp.taken += got
        dst = sp.dst
        data = small[:got]
        try:
            sent = dst.sock.send(data, MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.checkout(sp).hold(data, 0)
            self.error = socket_error(dst, exc, "drain")
            return DRAIN_FAILED
        if sent:
            self._moved(sp, dst, sent)
        if sent < got:  # the drain took less than its space said: wait for it
            self.checkout(sp).hold(data, sent)
            return WAIT_DRAIN
        if got < n:
            return WAIT_SOURCE  # the source is drained; its next byte raises a new event
        sp.bulk = True  # more is waiting: the queued pass streams it through the pipe
        return MORE

    def flush(self, sp: Any) -> bool:
        """Push an ended splice's leftover; True once nothing is left (delivered or dropped)."""
        self.passes += 1
        mover = sp.mover
        dst = sp.dst
        try:
            moved = mover.push(dst)
        except BlockingIOError:
            moved = 0
        except OSError as exc:
            if sp.error is None:
                sp.error = socket_error(dst, exc, "drain")
            sp.dropped += mover.drop()
            moved = 0
        if moved:
            self._moved(sp, dst, moved)
        return not mover.pending
