"""Shared fixtures: real loopback sockets, a pool that is always closed.

``SPLICEPOOL_TEST_BACKEND=gevent`` (or ``gevent-direct``) runs the same suite
in a monkey-patched process against ``SplicePool(backend="gevent")``: every
pool a test makes defaults to that backend, and the tests' threads and
sockets are gevent's.
"""

from __future__ import annotations

import os

BACKEND = os.environ.get("SPLICEPOOL_TEST_BACKEND", "thread")
GEVENT = BACKEND.startswith("gevent")
if GEVENT:
    from gevent import monkey

    monkey.patch_all()

import fcntl  # noqa: E402 - after patching, on purpose
import hashlib  # noqa: E402
import random  # noqa: E402
import select  # noqa: E402
import socket  # noqa: E402
import struct  # noqa: E402
import termios  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402

import splicepool  # noqa: E402
from splicepool.state import Phase  # noqa: E402

if GEVENT:
    import functools

    _init = splicepool.SplicePool.__init__
    _defaults = {"backend": "gevent", "dispatch": "direct" if BACKEND == "gevent-direct" else "worker"}

    @functools.wraps(_init)
    def _gevent_default(self, *args, **kwargs):
        for key, value in _defaults.items():
            kwargs.setdefault(key, value)
        _init(self, *args, **kwargs)

    splicepool.SplicePool.__init__ = _gevent_default


def tcp_pair(family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
    """Return (client, server): the two ends of one TCP connection on loopback."""
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    with socket.socket(family, socket.SOCK_STREAM) as lsock:
        lsock.bind((host, 0))
        lsock.listen(1)
        client = socket.create_connection(lsock.getsockname()[:2])
        server, _ = lsock.accept()
    return client, server


class Link:
    """A proxy-shaped fixture: ``peer_src`` writes into ``src``, ``dst`` sends to ``peer_dst``.

    Splicing ``src`` to ``dst`` makes bytes sent on ``peer_src`` arrive on ``peer_dst``.
    """

    def __init__(self, family: int = socket.AF_INET) -> None:
        self.peer_src, self.src = tcp_pair(family)
        self.dst, self.peer_dst = tcp_pair(family)

    def sockets(self) -> list[socket.socket]:
        return [self.peer_src, self.src, self.dst, self.peer_dst]

    def close(self) -> None:
        for s in self.sockets():
            s.close()


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER (1, 0): the peer gets a RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def shrink(*socks: socket.socket, size: int = 64 * 1024) -> None:
    """Small send and receive buffers, so that a drain fills up soon."""
    for s in socks:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def fill_send_buffer(sock: socket.socket) -> bytes:
    """Write into ``sock`` until its send buffer is full (its peer reads nothing); return what
    went in. ``os.write``: a gevent socket's send would wait for room instead of failing."""
    filler = bytearray()
    chunk = payload(4096, 7)
    while True:
        try:
            filler += chunk[: os.write(sock.fileno(), chunk)]
        except BlockingIOError:
            return bytes(filler)


def recv_exact(sock: socket.socket, n: int, timeout: float = 10.0) -> bytes:
    """Read exactly n bytes or fail (EOF or timeout raise)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"EOF after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def recv_until_eof(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """Read until EOF (a timeout raises)."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        chunk = sock.recv(1 << 20)
        if not chunk:
            return bytes(buf)
        buf += chunk


def recv_available(sock: socket.socket, wait: float = 0.2) -> bytes:
    """Read whatever arrives until the socket stays quiet for ``wait`` seconds."""
    sock.settimeout(wait)
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except (TimeoutError, BlockingIOError):
            return bytes(buf)
        if not chunk:
            return bytes(buf)
        buf += chunk


def send_in_thread(sock: socket.socket, data: bytes, *, shut: bool = False) -> threading.Thread:
    def run() -> None:
        sock.settimeout(30)
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


class Collector:
    """Read a socket in a thread into ``data`` until EOF or ``stop()``; optionally slowly.

    Uses poll + MSG_DONTWAIT, so it never changes the socket's timeout (a sender
    thread may be using the same socket object).
    """

    def __init__(self, sock: socket.socket, chunk: int = 1 << 20, delay: float = 0.0) -> None:
        self.sock = sock
        self.chunk = chunk
        self.delay = delay
        self.data = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.finished = False
        self.cond = threading.Condition()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            p = select.poll()
            p.register(self.sock, select.POLLIN)
            while not self._stop.is_set():
                if not p.poll(50):
                    continue
                try:
                    chunk = self.sock.recv(self.chunk, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    continue
                if not chunk:
                    self.eof = True
                    return
                with self.cond:
                    self.data += chunk
                    self.cond.notify_all()
                if self.delay:
                    time.sleep(self.delay)  # a slow reader on purpose: the pacing is the point
        except (OSError, ValueError) as exc:
            self.error = exc
        finally:
            with self.cond:
                self.finished = True
                self.cond.notify_all()

    def wait_for(self, n: int, timeout: float = 15.0) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: len(self.data) >= n or self.finished, timeout)
            return len(self.data) >= n

    def stop(self) -> bytes:
        self._stop.set()
        self.thread.join(5)
        assert not self.thread.is_alive()
        return bytes(self.data)


def payload(n: int, seed: int) -> bytes:
    """n deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(n)


def digest(data: bytes | bytearray) -> str:
    return hashlib.sha256(data).hexdigest()


def until(pred, timeout: float = 10.0) -> bool:
    """Poll ``pred`` until it is true or ``timeout`` passes; return its last value."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return bool(pred())
        time.sleep(0.005)  # the poll interval: the wait ends on ``pred``, not on the clock
    return True


def wait_until(pred, timeout: float = 5.0, what: str = "condition", interval: float = 0.01):
    """Poll ``pred`` every ``interval`` seconds until it returns something truthy and return
    that; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)  # the poll interval


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free on ``host`` a moment ago (callers retry on EADDRINUSE)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _ioctl_int(sock, request: int) -> int:
    fd = sock if isinstance(sock, int) else sock.fileno()
    return struct.unpack("i", fcntl.ioctl(fd, request, b"\0" * 4))[0]


def inq(sock) -> int:
    """Bytes waiting in ``sock``'s receive queue, unread (FIONREAD)."""
    return _ioctl_int(sock, termios.FIONREAD)


#: Linux SIOCOUTQNSD: bytes in a TCP send queue that have not been sent yet.
SIOCOUTQNSD = 0x894B


def unsent(sock) -> int:
    """Bytes in ``sock``'s send queue that TCP has not sent yet: with a peer on loopback, those
    wait for room in the peer's receive window (SIOCOUTQNSD)."""
    return _ioctl_int(sock, SIOCOUTQNSD)


def drain_full(sp) -> bool:
    """``sp`` waits for a full drain: it is in ``Phase.WAIT_DRAIN`` (its drain refused more; the
    source is not read) and bytes wait in the drain's send queue for room at its peer."""
    return sp.phase is Phase.WAIT_DRAIN and unsent(sp.drain) > 0


def accept_queue_full(lsock: socket.socket) -> bool:
    """A listening TCP socket's accept queue is full: Linux drops every new SYN (TCP_INFO of a
    listener: tcpi_unacked = connections waiting to be accepted, tcpi_sacked = the backlog)."""
    info = lsock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    waiting, backlog = struct.unpack_from("II", info, 24)
    return waiting > backlog


def open_fds() -> set[int]:
    """The fd numbers open right now (the listing's own fd is not one of them)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


#: For tests of what only holds with native threads and blocking fds.
thread_backend_only = pytest.mark.skipif(
    GEVENT, reason="gevent's sockets are always non-blocking fds, and its threads are greenlets"
)

#: For tests that start their own interpreters: they run once, in the thread run.
own_processes = pytest.mark.skipif(GEVENT, reason="starts its own processes: runs in the thread run")
engine_free = pytest.mark.skipif(GEVENT, reason="does not use the splice engine: runs in the thread run")


HAVE_SPLICE = hasattr(os, "splice")


@pytest.fixture(params=["splice", "copy"])
def zero_copy(request):
    """The two paths: ``None`` (zero-copy, os.splice) and ``False`` (the copy path)."""
    if request.param == "splice" and not HAVE_SPLICE:
        pytest.skip("no os.splice on this platform")
    return None if request.param == "splice" else False


def peek(sock: socket.socket, wait: float = 0.15) -> bytes | None:
    """None if neither data nor EOF shows up within ``wait``; else the queued bytes (b"" = EOF)."""
    p = select.poll()
    p.register(sock, select.POLLIN)
    if not p.poll(int(wait * 1000)):
        return None
    return sock.recv(1 << 16, socket.MSG_PEEK | socket.MSG_DONTWAIT)


def wakeups(pool, index: int = 0) -> int:
    """How many times worker ``index`` has woken up with events (stats). It counts a wakeup
    before handling its events: that the count grew proves the worker saw them, not that it is
    done with them."""
    return pool.stats()["workers"][index]["wakeups"]


def passes(pool, index: int = 0) -> int:
    """How many passes worker ``index`` has run (stats; counted as a pass starts)."""
    return pool.stats()["workers"][index]["passes"]


@pytest.fixture(scope="module")
def upstream():
    """The examples' upstream server (``examples_support.Upstream``), one per test module."""
    from examples_support import Upstream  # it imports conftest: not at the top

    srv = Upstream()
    yield srv
    srv.close()


@pytest.fixture
def pool():
    p = splicepool.SplicePool(workers=2)
    yield p
    p.close()


@pytest.fixture
def link():
    ln = Link()
    yield ln
    ln.close()


@pytest.fixture
def blackhole():
    """``(host, port)`` on 127.0.0.1 whose connects hang until their timeout: a listener with
    a full accept queue, so the kernel drops further SYNs. Skips where the kernel completes
    such connects anyway."""
    with socket.socket() as blocked:
        blocked.bind(("127.0.0.1", 0))
        blocked.listen(0)
        addr = blocked.getsockname()
        fillers = []
        try:
            for _ in range(3):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(addr)
                fillers.append(f)
            assert until(lambda: accept_queue_full(blocked), 3.0), "the fillers never filled the accept queue"
            with socket.socket() as probe:
                probe.settimeout(0.3)
                try:
                    probe.connect(addr)
                    pytest.skip("this kernel completes connects to a full accept queue")
                except TimeoutError:
                    pass
            yield addr
        finally:
            for f in fillers:
                f.close()
