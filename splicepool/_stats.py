"""The stats server behind ``--stats-listen``: ``/stats`` (JSON) and ``/metrics``
(Prometheus text) over HTTP, bounded so that it cannot hurt the proxy it reports on.

Loaded only when stats are asked for: a proxy process without them stays lighter.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time

from .server import (
    ACCEPT_BURST,
    EMFILE_BACKOFF,
    OutOfFds,
    accept_nowait,
    format_addr,
    log,
    printable,
)

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from .server import ProxyServer

_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 431: "Request Header Fields Too Large"}


class _StatsConn:
    __slots__ = ("sock", "peer", "deadline", "head", "out", "done_reading")

    def __init__(self, sock: socket.socket, peer: str, deadline: float) -> None:
        self.sock = sock
        self.peer = peer
        self.deadline = deadline
        self.head = bytearray()
        self.out: memoryview | None = None  # the response, once there is one
        self.done_reading = False


class StatsServer:
    """``/stats`` and ``/metrics`` over HTTP, bounded so that it cannot hurt the proxy.

    One thread, one selector, non-blocking sockets; each connection gets one request and
    one response (``Connection: close``). At most ``max_conns`` connections at once (their
    fds are all it ever takes: the proxy's fds stay the proxy's); when full, a new one
    replaces the oldest still sending its request (so slow clients cannot lock a scraper
    out), or, if every one is being answered, waits in the backlog. A connection has
    ``timeout`` seconds in all, request and response; a request head over ``head_limit``
    bytes gets 431. Out of fds, it stops accepting for a moment instead of spinning.

    The constructor binds (so a port in use fails before anything is announced);
    ``start(proxy)`` serves; ``close()`` stops and releases everything.
    """

    def __init__(
        self,
        address: tuple[str, int],
        *,
        max_conns: int = 8,
        timeout: float = 5.0,
        head_limit: int = 8192,
        backlog: int = 16,
    ) -> None:
        import json  # only with stats: a proxy process without them is lighter

        self._dumps = json.dumps
        self.max_conns = max_conns
        self.timeout = timeout
        self.head_limit = head_limit
        info = socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        self._sock = socket.socket(info[0], socket.SOCK_STREAM)
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._sock.bind(info[4])
            self._sock.listen(backlog)
            self._sock.setblocking(False)
        except BaseException:
            self._sock.close()
            raise
        self.address = self._sock.getsockname()
        self._proxy: ProxyServer | None = None
        self._conns: dict[int, _StatsConn] = {}  # by fd, oldest first
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accepting = False
        self._paused_until = 0.0
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self, proxy: ProxyServer) -> None:
        self._proxy = proxy
        self._set_accepting(True)
        self._thread = threading.Thread(target=self._serve, name="splicepool-stats", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        if self._thread is not None:
            os.write(self._wake_w, b"x")
            self._thread.join(5)
        for conn in list(self._conns.values()):
            self._drop(conn)
        self._sel.close()
        self._sock.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _set_accepting(self, on: bool) -> None:
        if on != self._accepting:
            self._accepting = on
            if on:
                self._sel.register(self._sock, selectors.EVENT_READ, "listen")
            else:
                self._sel.unregister(self._sock)

    def _serve(self) -> None:
        try:
            self._loop()
        except Exception:
            log.exception("stats server failed; stats are off")

    def _loop(self) -> None:
        while not self._closing:
            now = time.monotonic()
            timeout = None
            if self._conns:
                timeout = max(0.0, next(iter(self._conns.values())).deadline - now)
            if self._paused_until:
                left = max(0.0, self._paused_until - now)
                timeout = left if timeout is None else min(timeout, left)
            for key, mask in self._sel.select(timeout):
                if key.data == "wake":
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                elif key.data == "listen":
                    self._accept()
                elif key.data.sock.fileno() != -1:  # not dropped earlier in this round
                    self._io(key.data, mask)
            now = time.monotonic()
            for conn in list(self._conns.values()):  # oldest first: deadline order
                if conn.deadline > now:
                    break
                if conn.out is None:
                    log.debug("stats: %s: no request within %.0f s; closed", conn.peer, self.timeout)
                self._drop(conn)
            if self._paused_until and now >= self._paused_until:
                self._paused_until = 0.0
            self._set_accepting(not self._paused_until and self._room())

    def _room(self) -> bool:
        """Room for one more connection, if need be by dropping the oldest still reading."""
        return len(self._conns) < self.max_conns or any(c.out is None for c in self._conns.values())

    def _accept(self) -> None:
        for _ in range(ACCEPT_BURST):
            if not self._room():
                return
            try:
                got = accept_nowait(self._sock)
            except OutOfFds as exc:
                log.warning("stats: accept: %s; pausing for %.1f s", exc, EMFILE_BACKOFF)
                self._paused_until = time.monotonic() + EMFILE_BACKOFF
                self._set_accepting(False)
                return
            if got is None:
                return
            sock, peer = got
            if len(self._conns) >= self.max_conns:
                oldest = next(c for c in self._conns.values() if c.out is None)
                log.debug("stats: %s: closed to make room for a new connection", oldest.peer)
                self._drop(oldest)
            sock.setblocking(False)
            conn = _StatsConn(sock, format_addr(peer), time.monotonic() + self.timeout)
            self._conns[sock.fileno()] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._io(conn, selectors.EVENT_READ)  # a request sent with the connect is often there

    def _drop(self, conn: _StatsConn) -> None:
        self._conns.pop(conn.sock.fileno(), None)
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    def _io(self, conn: _StatsConn, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ:
                self._read(conn)
            if conn.out is not None and conn.sock.fileno() != -1:
                self._write(conn)
        except OSError as exc:
            log.debug("stats: %s: %s; closed", conn.peer, exc.strerror or exc)
            self._drop(conn)

    def _read(self, conn: _StatsConn) -> None:
        if conn.out is not None:  # answered: what the client still sends is read and forgotten
            for _ in range(4):  # a bounded amount per wakeup: a flood cannot hold the thread
                try:
                    data = conn.sock.recv(1 << 16)
                except BlockingIOError:
                    return
                if not data:
                    if conn.done_reading:
                        self._drop(conn)
                    return
            return
        while True:
            try:
                data = conn.sock.recv(self.head_limit + 1 - len(conn.head))
            except BlockingIOError:
                return
            if not data:
                self._drop(conn)  # gone before its request was whole
                return
            conn.head += data
            end = conn.head.find(b"\r\n\r\n")
            if end < 0:
                end = conn.head.find(b"\n\n")
            if end >= 0:
                self._respond(conn, bytes(conn.head[:end]))
            elif len(conn.head) > self.head_limit:
                nl = conn.head.find(b"\n")
                line = bytes(conn.head[: nl if 0 <= nl < 200 else 200]).rstrip(b"\r")
                self._reply(conn, 431, b"request head over %d bytes\n" % self.head_limit, line)
            else:
                continue
            conn.head = bytearray()
            return

    def _respond(self, conn: _StatsConn, head: bytes) -> None:
        line = head.split(b"\n", 1)[0].rstrip(b"\r")
        parts = line.split(b" ")
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            self._reply(conn, 400, b"bad request line\n", line)
            return
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            self._reply(conn, 405, b"GET /stats or /metrics\n", line)
            return
        assert self._proxy is not None
        if target == b"/stats":
            body = self._dumps(self._proxy.stats(), indent=2).encode()
            ctype = "application/json"
        elif target == b"/metrics":
            body = self._proxy.metrics().encode()
            ctype = "text/plain; version=0.0.4; charset=utf-8"
        else:
            self._reply(conn, 404, b"try /stats or /metrics\n", line)
            return
        self._reply(conn, 200, body, line, ctype, head_only=method == b"HEAD")

    def _reply(
        self,
        conn: _StatsConn,
        code: int,
        body: bytes,
        line: bytes,
        ctype: str = "text/plain; charset=utf-8",
        head_only: bool = False,
    ) -> None:
        log.debug('stats: %s "%s" %d', conn.peer, printable(line), code)
        head = (
            f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        conn.out = memoryview(head if head_only else head + body)
        self._sel.modify(conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, conn)

    def _write(self, conn: _StatsConn) -> None:
        out = conn.out
        assert out is not None
        while out:
            try:
                n = conn.sock.send(out)
            except BlockingIOError:
                conn.out = out
                return
            out = out[n:]
        conn.out = out
        if not conn.done_reading:
            # All sent: half-close, and read what the client still sends until its EOF (or
            # the deadline), so that closing with unread bytes does not reset the response.
            conn.done_reading = True
            conn.sock.shutdown(socket.SHUT_WR)
            self._sel.modify(conn.sock, selectors.EVENT_READ, conn)
