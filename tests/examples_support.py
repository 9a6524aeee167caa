"""Real pieces for the example tests: an upstream server, example subprocesses, hashed transfers.

The upstream speaks a tiny protocol that checks both directions and both
half-closes. The client sends a 25-byte header ``mode (1) | down (8, big
endian) | token (16)`` and then its upload; the upstream sends ``down`` random
bytes while it reads the upload to EOF, and records what it got under the token.

* mode ``C`` (the client closes first): after the client's EOF the upstream
  sends ``sha256(upload) + sha256(download)`` and closes; so the reply still
  flows after the client's FIN.
* mode ``S`` (the server closes first): the upstream shuts its write side as
  soon as the download is sent and keeps reading the upload to EOF.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import threading
import time

from conftest import recv_until_eof

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EXAMPLES = os.path.join(ROOT, "examples")
HEADER = struct.Struct("!cQ16s")
UPGRADE_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: splicetest\r\nConnection: Upgrade\r\n\r\n"


def sha(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def recv_exact(sock: socket.socket, n: int, pending: bytearray) -> bytes:
    while len(pending) < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"EOF after {len(pending)} of {n} bytes")
        pending += chunk
    out = bytes(pending[:n])
    del pending[:n]
    return out


def read_head(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes, bytes]:
    """Read an HTTP response head: ``(status, head, bytes after the head)``."""
    sock.settimeout(timeout)
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"EOF before the end of the response head: {bytes(buf)!r}")
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), head, rest


class Upstream(socketserver.ThreadingTCPServer):
    """The upstream of every test: the protocol above, optionally behind an HTTP Upgrade."""

    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 512

    def __init__(self, upgrade: bool = False) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)
        self.upgrade = upgrade
        self.heads: list[bytes] = []  # request heads seen in upgrade mode
        self.sent: dict[bytes, bytes] = {}  # token -> sha256 of the download
        self.got: dict[bytes, tuple[int, bytes]] = {}  # token -> (length, sha256) of the upload
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return self.server_address[1]

    def record(self, table: dict, token: bytes, value: object) -> None:
        with self.cond:
            table[token] = value
            self.cond.notify_all()

    def wait_for(self, table: dict, token: bytes, timeout: float = 20.0) -> object:
        with self.cond:
            if not self.cond.wait_for(lambda: token in table, timeout):
                raise TimeoutError(f"upstream never finished connection {token.hex()}")
            return table[token]

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class _UpstreamHandler(socketserver.BaseRequestHandler):
    server: Upstream

    def handle(self) -> None:
        sock, srv = self.request, self.server
        sock.settimeout(30)
        pending = bytearray()
        try:
            if srv.upgrade:
                while b"\r\n\r\n" not in pending:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    pending += chunk
                head, _, rest = bytes(pending).partition(b"\r\n\r\n")
                srv.heads.append(head)
                pending[:] = rest
                sock.sendall(UPGRADE_101)
            mode, down, token = HEADER.unpack(recv_exact(sock, HEADER.size, pending))
        except (OSError, EOFError):
            return
        data = os.urandom(down)
        srv.record(srv.sent, token, sha(data))

        def send() -> None:
            try:
                sock.sendall(data)
                if mode == b"S":
                    sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        h, n = hashlib.sha256(pending), len(pending)
        try:
            while True:
                chunk = sock.recv(1 << 20)
                if not chunk:
                    break
                h.update(chunk)
                n += len(chunk)
        except OSError:
            return
        finally:
            sender.join(30)
        srv.record(srv.got, token, (n, h.digest()))
        if mode == b"C":
            try:
                sock.sendall(h.digest() + sha(data))
            except OSError:
                pass


class Transfer:
    """One run of the upstream protocol from the client's side, with every check."""

    def __init__(self, upstream: Upstream, up: int, down: int, mode: str = "C") -> None:
        self.upstream = upstream
        self.mode = mode
        self.token = os.urandom(16)
        self.up = os.urandom(up)
        self.down = down
        self.header = HEADER.pack(mode.encode(), down, self.token)
        self.stream = self.header + self.up

    def run(self, sock: socket.socket, *, sent: int = 0, received: bytes = b"", timeout: float = 30.0) -> None:
        """Finish the exchange on ``sock``; ``sent`` bytes of the stream already went out,
        ``received`` tunnel bytes were already read (with the response head)."""
        sock.settimeout(timeout)
        if self.mode == "C":
            errors: list[BaseException] = []

            def upload() -> None:
                try:
                    sock.sendall(self.stream[sent:])
                    sock.shutdown(socket.SHUT_WR)
                except BaseException as exc:  # reported by the reader's checks
                    errors.append(exc)

            sender = threading.Thread(target=upload, daemon=True)
            sender.start()
            data = received + recv_until_eof(sock, timeout)
            sender.join(timeout)
            assert not errors, errors
            assert len(data) == self.down + 64, f"got {len(data)} bytes, expected {self.down} + 64"
            assert data[-64:-32] == sha(self.up), "the upload arrived damaged"
            assert sha(data[: self.down]) == data[-32:], "the download arrived damaged"
        else:
            if sent < len(self.header):
                sock.sendall(self.header[sent:])
                sent = len(self.header)
            data = received + recv_until_eof(sock, timeout)  # the upstream's FIN came through
            assert len(data) == self.down, f"got {len(data)} bytes, expected {self.down}"
            assert sha(data) == self.upstream.wait_for(self.upstream.sent, self.token)
            sock.sendall(self.stream[sent:])  # our direction still flows after the upstream's FIN
            sock.shutdown(socket.SHUT_WR)
        got = self.upstream.wait_for(self.upstream.got, self.token, timeout)
        assert got == (len(self.up), sha(self.up)), "the upstream saw a different upload"


class Example:
    """An example (or any command) run as a subprocess, its output collected line by line."""

    LISTENING = re.compile(r"listening on \[?([^\]\s]+?)\]?:(\d+)|Listening at: http://[^:]+:(\d+)")

    def __init__(self, argv: list[str], *, env: dict[str, str] | None = None, wait_listening: bool = True,
                 timeout: float = 20.0) -> None:
        self.proc = subprocess.Popen(
            argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **(env or {})},
        )
        self.lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_listening and not self._ready.wait(timeout):
            self.kill()
            raise RuntimeError(f"{argv} did not start listening:\n{self.output}")

    @classmethod
    def script(cls, name: str, *args: str, **kw: object) -> Example:
        return cls([sys.executable, os.path.join(EXAMPLES, name), "--listen", "127.0.0.1:0", *args], **kw)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)
            m = self.LISTENING.search(line)
            if m and not self._ready.is_set():
                self.port = int(m.group(2) or m.group(3))
                self._ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def fd_kinds(self) -> tuple[int, int]:
        """``(pipe fds, all other fds)`` of the process."""
        pipes = other = 0
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("pipe:"):
                pipes += 1
            else:
                other += 1
        return pipes, other

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Signal the process and wait for it; return its exit status."""
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"did not exit within {timeout} s after signal {sig}:\n{self.output}") from None
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(5)


def connect_tunnel(proxy_port: int, target_port: int, extra: bytes = b"",
                   host: str = "127.0.0.1") -> tuple[socket.socket, int, bytes, bytes]:
    """Send ``CONNECT host:target_port`` (plus ``extra`` in the same send); return
    ``(sock, status, head, bytes after the head)``."""
    sock = socket.create_connection(("127.0.0.1", proxy_port), timeout=10)
    target = f"[{host}]:{target_port}" if ":" in host else f"{host}:{target_port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode() + extra)
    status, head, rest = read_head(sock)
    return sock, status, head, rest


def settled(measure, quiet: float = 0.3, timeout: float = 5.0) -> int:
    """``measure()`` once it has not changed for ``quiet`` seconds (threads exiting, fds closing)."""
    deadline = time.monotonic() + timeout
    value, since = measure(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)  # the poll interval of a measurement: the value, once it holds still
        now = measure()
        if now != value:
            value, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet:
            break
    return value
