"""The command line's log handler: a line per record on stderr, never blocking the thread
that logs.

The accept loop and the workers log (a line per finished connection). A stderr that is
a pipe or a socket nobody reads fills up, and a plain ``StreamHandler`` then blocks in
``write``: the whole proxy stopped serving after about 64 KiB of lines. ``LogWriter``
writes a line at once when stderr can take it without waiting (a non-blocking twin of
the same pipe or socket), else queues it, in order, for a thread of its own
(``splicepool-log``) that writes and waits in the logging thread's place. The queue holds
at most ``QUEUE_MAX`` bytes; a line beyond that is dropped and counted, and the count is
written as a line of its own (``N log lines dropped: stderr was not read``) once the
queue is written out. A regular file or a terminal is written to directly, as logging
does. At exit the queue gets ``FLUSH_WAIT`` seconds to be written.

``log_to_stderr(level)`` sets the root logger up with it: ``TIME PID LEVEL MESSAGE``,
with no caller, thread, process or multiprocessing names looked up per record (the
logging HOWTO's "Optimization"; the pid is read once per process, not by a ``getpid``
system call per line), formatted by ``LogFormat``: about 40% less time per line than
logging's own way (``bench/log_line.py``; docs/performance.md has the figures).
"""

from __future__ import annotations

import logging
import os
import socket
import stat
import threading
import time
from collections import deque

QUEUE_MAX = 256 * 1024  # bytes of lines held while stderr cannot take them
FLUSH_WAIT = 2.0  # seconds the queue gets at exit (a stderr nobody reads must not hold the exit)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class LogWriter(logging.Handler):
    """Lines of ``logging`` records to ``fd`` (stderr); see the module docstring."""

    def __init__(self, fd: int = 2) -> None:
        super().__init__()
        self.fd = fd
        self._pipe = -1  # a non-blocking description of the same pipe, or -1
        self._sock: socket.socket | None = None  # the same socket, sent to with MSG_DONTWAIT
        try:
            mode = os.fstat(fd).st_mode
        except OSError:  # stderr closed (2>&-): each line's write fails, as logging's would
            mode = 0
        if stat.S_ISFIFO(mode):
            try:  # a new open file description: O_NONBLOCK on it leaves the shared one alone
                self._pipe = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError:
                pass
        elif stat.S_ISSOCK(mode):
            self._sock = socket.socket(fileno=os.dup(fd))
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._busy = False  # the writer thread is writing what it took from the queue
        self.dropped = 0  # lines dropped since the last count was written
        self._cond = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """A child (``--processes``) starts with no queue of its own: what the parent had
        queued is the parent's to write, and its writer thread did not come along."""
        self._cond = threading.Condition(threading.Lock())
        self._queue.clear()
        self._queued = 0
        self._busy = False
        self.dropped = 0
        self._thread = None

    def _try_write(self, line: bytes) -> int:
        """Bytes of ``line`` written without waiting (all of it where stderr cannot say)."""
        try:
            if self._pipe >= 0:
                return os.write(self._pipe, line)
            if self._sock is not None:
                return self._sock.send(line, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return 0
        _write_all(self.fd, line)  # a file or a terminal: as logging's StreamHandler does
        return len(line)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode("utf-8", "backslashreplace")
            with self._cond:
                if not self._queue and not self._busy:
                    written = self._try_write(line)
                    if written == len(line):
                        return
                    line = line[written:]
                if self._queued + len(line) > QUEUE_MAX:
                    self.dropped += 1
                    return
                self._queue.append(line)
                self._queued += len(line)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._drain, name="splicepool-log", daemon=True)
                    self._thread.start()
                self._cond.notify()
        except Exception:
            self.handleError(record)

    def _drain(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                data = b"".join(self._queue)
                self._queue.clear()
                self._queued = 0
                self._busy = True
            try:
                _write_all(self.fd, data)  # blocking: this thread waits, the loggers do not
                with self._cond:
                    dropped, self.dropped = self.dropped, 0
                if dropped:
                    _write_all(self.fd, self._dropped_line(dropped))
            except OSError:
                pass  # stderr is gone: nothing to tell
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _dropped_line(self, count: int) -> bytes:
        record = logging.LogRecord("splicepool.proxy", logging.WARNING, __file__, 0,
                                   "%d log line%s dropped: stderr was not read",
                                   (count, "" if count == 1 else "s"), None)
        return (self.format(record) + "\n").encode()

    def flush(self) -> None:
        """Wait (at most ``FLUSH_WAIT`` s) until the queue is written out."""
        with self._cond:
            self._cond.wait_for(lambda: not self._queue and not self._busy, FLUSH_WAIT)

    def close(self) -> None:  # logging.shutdown() has called flush()
        if self._pipe >= 0:
            os.close(self._pipe)
            self._pipe = -1
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        super().close()


class LogFormat(logging.Formatter):
    """``TIME PID LEVEL MESSAGE``, as ``logging.Formatter("%(asctime)s %(process)d
    %(levelname)s %(message)s")`` writes it, for less: the pid is read once per process
    (``logging.logProcesses`` is off: each record would make a ``getpid`` system call), the
    time's ``strftime`` is made once per second, and a record without an exception or a
    stack is formatted by one f-string (a line per finished connection: this is on the
    path of every connection)."""

    pid = os.getpid()

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(process)d %(levelname)s %(message)s")
        self._second: tuple[int, str] = (-1, "")  # (a second, its strftime), set whole

    def format(self, record: logging.LogRecord) -> str:
        if record.exc_info or record.exc_text or record.stack_info:
            record.process = self.pid
            return super().format(record)
        record.message = message = record.getMessage()
        return f"{self.formatTime(record)} {self.pid} {record.levelname} {message}"

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        cached, text = self._second
        if cached != second:
            text = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = (second, text)
        return self.default_msec_format % (text, record.msecs)


def _after_fork() -> None:
    LogFormat.pid = os.getpid()


def log_to_stderr(level: str) -> None:
    """The root logger: ``LogWriter`` on fd 2 at ``level`` (a name: ``"info"``...)."""
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logging._srcfile = None  # private-ok: the logging HOWTO's "Optimization" way to skip findCaller
    os.register_at_fork(after_in_child=_after_fork)
    handler = LogWriter(2)
    handler.setFormatter(LogFormat())
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
