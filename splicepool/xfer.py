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
"""

from __future__ import annotations

import errno
import os
import socket
import sys

from . import _native

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
_MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)


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
            sent = dst.sock.send(left, _MSG_NOSIGNAL)
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

