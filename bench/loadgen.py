"""The ends of bench/compare.py's workloads: an upstream server and the clients, one process each.

    python bench/loadgen.py server --mode {echo,sink,hold}
    python bench/loadgen.py bulk --port P [--streams N] [--seconds T]
    python bench/loadgen.py latency --port P [--warmup 200] [--count 5000]
    python bench/loadgen.py conns --port P [--count 1000] [--concurrency 50] [--size 65536]
    python bench/loadgen.py idle --port P

Every role talks to 127.0.0.1 only and reports on stdout, one JSON object per line.

``server`` listens on an ephemeral port, prints ``{"port": N}`` and serves every
connection from one epoll loop, with TCP_NODELAY: ``echo`` sends back what it
receives and closes after the peer's EOF once all is echoed; ``sink`` counts
what it receives and at EOF answers with the count (8 bytes, big-endian) and
closes; ``hold`` keeps each connection until the peer closes it. Each line on
stdin is answered with ``{"accepted": A, "open": O}``; EOF on stdin ends it.

``bulk`` (used when iperf3 is missing) sends 1 MiB buffers on N connections for
T seconds, half-closes them and reads a ``sink`` server's counts.
``latency`` times 64-byte round trips through an ``echo`` server on one
connection. ``conns`` opens ``count`` connections, ``concurrency`` at a time,
sends each ``size`` distinct bytes and checks that exactly those come back.
``idle`` opens connections and holds them, on command from stdin: ``open K``
opens K more (``{"open": total, "errors": E}`` once all are connected) and
``close`` closes them all (``{"closed": N}``).
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import resource
import selectors
import socket
import sys
import threading
import time
from collections import Counter

HOST = "127.0.0.1"
MiB = 1 << 20
OK = "ok"
EVENT_READ = selectors.EVENT_READ
EVENT_WRITE = selectors.EVENT_WRITE


def raise_nofile_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def report(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=10)
    nodelay(sock)
    return sock


def recv_exactly(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise ConnectionError(f"EOF after {got} of {len(view)} bytes")
        got += n


# --- server ------------------------------------------------------------------


class _Conn:
    __slots__ = ("sock", "out", "received", "eof", "events")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.out = bytearray()
        self.received = 0
        self.eof = False
        self.events = EVENT_READ


class Server:
    """One epoll loop: the listener, stdin (queries) and every connection."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.listener = socket.create_server((HOST, 0), backlog=4096)
        self.listener.setblocking(False)
        self.selector = selectors.EpollSelector()
        self.selector.register(self.listener, EVENT_READ, "accept")
        self.selector.register(sys.stdin.fileno(), EVENT_READ, "control")
        self.buf = bytearray(MiB)
        self.view = memoryview(self.buf)
        self.accepted = 0
        self.conns = 0

    def serve(self) -> None:
        report({"port": self.listener.getsockname()[1]})
        while True:
            for key, events in self.selector.select():
                if key.data == "accept":
                    self.accept()
                elif key.data == "control":
                    if not self.control():
                        return
                elif events & EVENT_READ:
                    self.readable(key.data)
                else:
                    self.flush(key.data)

    def control(self) -> bool:
        if not os.read(sys.stdin.fileno(), 4096):
            return False
        report({"accepted": self.accepted, "open": self.conns})
        return True

    def accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: the client will see it
                print(f"loadgen server: accept: {exc}", file=sys.stderr)
                return
            sock.setblocking(False)
            nodelay(sock)
            self.selector.register(sock, EVENT_READ, _Conn(sock))
            self.accepted += 1
            self.conns += 1

    def readable(self, conn: _Conn) -> None:
        try:
            n = conn.sock.recv_into(self.buf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close(conn)
            return
        if n == 0:
            conn.eof = True
            if self.mode == "sink":
                conn.out += conn.received.to_bytes(8, "big")
            self.flush(conn)
        elif self.mode == "sink":
            conn.received += n
        elif self.mode == "echo":
            if conn.out:
                conn.out += self.view[:n]
            else:
                self.send(conn, self.view[:n])
            self.update(conn)

    def send(self, conn: _Conn, data: memoryview | bytearray) -> None:
        try:
            sent = conn.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            conn.eof = True
            conn.out.clear()
            return
        if data is conn.out:
            del conn.out[:sent]
        elif sent < len(data):
            conn.out += data[sent:]

    def flush(self, conn: _Conn) -> None:
        if conn.out:
            self.send(conn, conn.out)
        self.update(conn)

    def update(self, conn: _Conn) -> None:
        """Close once done; otherwise wait to write out a backlog, else to read."""
        if conn.eof and not conn.out:
            self.close(conn)
            return
        events = EVENT_WRITE if conn.out else EVENT_READ
        if events != conn.events:
            self.selector.modify(conn.sock, events, conn)
            conn.events = events

    def close(self, conn: _Conn) -> None:
        self.selector.unregister(conn.sock)
        conn.sock.close()
        self.conns -= 1


# --- clients -----------------------------------------------------------------


def bulk(port: int, streams: int, seconds: float) -> None:
    """Send for ``seconds`` on ``streams`` connections; report the bytes the sink counted."""
    socks = [connect(port) for _ in range(streams)]
    counts = [0] * streams
    failures: list[str] = []
    chunk = memoryview(b"\x5a" * MiB)
    deadline = time.monotonic() + seconds

    def send(i: int) -> None:
        sock = socks[i]
        try:
            while time.monotonic() < deadline:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
            answer = bytearray(8)
            recv_exactly(sock, memoryview(answer))
            counts[i] = int.from_bytes(answer, "big")
        except OSError as exc:
            failures.append(repr(exc))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(streams)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if failures:
        raise SystemExit(f"bulk: {failures[0]}")
    report({"bytes": sum(counts), "seconds": elapsed})


def latency(port: int, warmup: int, count: int) -> None:
    """Round trips of a 64-byte message on one connection: p50, p99 and mean, in µs."""
    sock = connect(port)
    sock.settimeout(None)
    message = bytes(range(64))
    reply = bytearray(64)
    view = memoryview(reply)
    samples = []
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        start = clock()
        sock.sendall(message)
        recv_exactly(sock, view)
        elapsed = clock() - start
        if reply != message:
            raise SystemExit("latency: the echo differs from the message")
        if i >= warmup:
            samples.append(elapsed)
    sock.close()
    samples.sort()
    report({
        "p50_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[min(len(samples) - 1, len(samples) * 99 // 100)] / 1000,
        "mean_us": sum(samples) / len(samples) / 1000,
        "count": len(samples),
    })


class _Exchange:
    """One connection of ``conns``: connect, send the payload, read it back."""

    __slots__ = ("sock", "payload", "sent", "reply", "got", "deadline")

    def __init__(self, port: int, index: int, base: bytes, timeout: float) -> None:
        self.payload = index.to_bytes(8, "big") + base[8:]
        self.sent = 0
        self.reply = bytearray(len(base))
        self.got = 0
        self.deadline = time.monotonic() + timeout
        self.sock = socket.socket()
        self.sock.setblocking(False)
        nodelay(self.sock)
        self.sock.connect_ex((HOST, port))


def conns(port: int, count: int, concurrency: int, size: int, timeout: float,
          seconds: float | None = None) -> None:
    """``count`` echo exchanges of ``size`` bytes, ``concurrency`` in flight; wall time, errors.
    With ``seconds``: as many as finish in that time instead (no new one starts after it),
    and ``done`` and ``per_second`` (exchanges finished per second) in the report.

    An error is any exchange that fails to connect, is reset, gets fewer or
    other bytes than it sent, or takes longer than ``timeout`` seconds.
    """
    base = random.Random(size).randbytes(size)
    selector = selectors.EpollSelector()
    errors: Counter[str] = Counter()
    started = done = 0

    def begin() -> None:
        nonlocal started
        ex = _Exchange(port, started, base, timeout)
        started += 1
        selector.register(ex.sock, EVENT_WRITE, ex)

    def finish(ex: _Exchange, outcome: str) -> None:
        nonlocal done
        if outcome != OK:
            errors[outcome] += 1
        selector.unregister(ex.sock)
        ex.sock.close()
        done += 1
        if started < count and (until is None or time.monotonic() < until):
            begin()

    def step(ex: _Exchange, events: int) -> str | None:
        """Advance one exchange: None while under way, else OK or what went wrong."""
        if ex.sent < size and events & EVENT_WRITE:
            if ex.sent == 0:
                code = ex.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    return f"connect: {errno.errorcode.get(code, code)}"
                selector.modify(ex.sock, EVENT_READ | EVENT_WRITE, ex)
            ex.sent += ex.sock.send(memoryview(ex.payload)[ex.sent:])
            if ex.sent == size:
                selector.modify(ex.sock, EVENT_READ, ex)
        if events & EVENT_READ:
            n = ex.sock.recv_into(memoryview(ex.reply)[ex.got:])
            if n == 0:
                return "short reply"
            ex.got += n
            if ex.got == size:
                return OK if ex.reply == ex.payload else "wrong bytes"
        return None

    start = time.perf_counter()
    until = None if seconds is None else time.monotonic() + seconds
    for _ in range(min(concurrency, count)):
        begin()
    while done < started:
        for key, events in selector.select(timeout=0.2):
            ex = key.data
            try:
                error = step(ex, events)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                error = f"{exc.__class__.__name__}: {exc.strerror or exc}"
            if error is not None:
                finish(ex, error)
        now = time.monotonic()
        for key in list(selector.get_map().values()):
            if key.data.deadline < now:
                finish(key.data, "timeout")
    elapsed = time.perf_counter() - start
    report({"seconds": elapsed, "errors": sum(errors.values()), "error_kinds": dict(errors),
            "done": done, "per_second": done / elapsed})


def idle(port: int) -> None:
    """Open and hold connections as stdin commands say (see the module docstring)."""
    held: list[socket.socket] = []
    errors: Counter[str] = Counter()
    for line in sys.stdin:
        command, *arg = line.split()
        if command == "open":
            held += open_batch(port, int(arg[0]), errors)
            report({"open": len(held), "errors": sum(errors.values()), "error_kinds": dict(errors)})
        elif command == "close":
            for sock in held:
                sock.close()
            report({"closed": len(held)})
            held.clear()


def open_batch(port: int, count: int, errors: Counter[str], timeout: float = 30.0) -> list[socket.socket]:
    """Connect ``count`` sockets at once; the connected ones (failures counted in ``errors``)."""
    selector = selectors.EpollSelector()
    for _ in range(count):
        try:
            sock = socket.socket()
        except OSError as exc:
            errors[f"socket: {exc.strerror}"] += 1
            break
        sock.setblocking(False)
        sock.connect_ex((HOST, port))
        selector.register(sock, EVENT_WRITE)
    connected = []
    deadline = time.monotonic() + timeout
    while selector.get_map() and time.monotonic() < deadline:
        for key, _ in selector.select(timeout=0.5):
            sock = key.fileobj
            selector.unregister(sock)
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                errors[f"connect: {errno.errorcode.get(code, code)}"] += 1
                sock.close()
            else:
                connected.append(sock)
    for key in list(selector.get_map().values()):
        errors["connect: timeout"] += 1
        key.fileobj.close()
    selector.close()
    return connected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)
    p = roles.add_parser("server")
    p.add_argument("--mode", choices=["echo", "sink", "hold"], required=True)
    p = roles.add_parser("bulk")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p = roles.add_parser("latency")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--count", type=int, default=5000)
    p = roles.add_parser("conns")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--size", type=int, default=64 * 1024)
    p.add_argument("--timeout", type=float, default=10.0)
    p.add_argument("--seconds", type=float, default=None)
    p = roles.add_parser("idle")
    p.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    raise_nofile_limit()
    if args.role == "server":
        Server(args.mode).serve()
    elif args.role == "bulk":
        bulk(args.port, args.streams, args.seconds)
    elif args.role == "latency":
        latency(args.port, args.warmup, args.count)
    elif args.role == "conns":
        conns(args.port, args.count, args.concurrency, args.size, args.timeout, args.seconds)
    else:
        idle(args.port)


if __name__ == "__main__":
    main()
