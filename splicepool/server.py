"""ProxyServer: the TCP proxy behind ``python -m splicepool proxy``.

One thread accepts and connects, without blocking: a selector watches the
listening socket, the upstream connects in progress and a wakeup fd. Each
connection, once its upstream is connected, is handed to ``SplicePool.proxy``;
the pool's workers move every byte and the server only logs the result. Live
counters are served as JSON (``/stats``) and Prometheus text (``/metrics``).
"""

from __future__ import annotations

import errno
import logging
import os
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from .pool import SplicePool
from .proxy import Proxy

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    import http.server
    from typing import Any

log = logging.getLogger("splicepool.proxy")

_ACCEPT_BURST = 64  # connections accepted per wakeup before looking at the rest
_EMFILE_BACKOFF = 0.1  # seconds without accepting after running out of fds


def parse_hostport(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or (with ``default_host``) ``PORT`` → (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r}: expected [IPV6]:PORT")
    elif ":" in text:
        host, _, port = text.rpartition(":")
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, as [::1]:PORT")
    elif default_host is not None:
        host, port = default_host, text
    else:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number from 0 to 65535")
    return host or "0.0.0.0", int(port)


def format_addr(addr: Any) -> str:
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


class Counters:
    """Connection counts since start (read by the stats server, written by the loop)."""

    __slots__ = ("accepted", "live", "finished", "refused", "failed_connects", "bytes_up",
                 "bytes_down", "reasons")

    def __init__(self) -> None:
        self.accepted = 0
        self.live = 0
        self.finished = 0
        self.refused = 0
        self.failed_connects = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.reasons: dict[str, int] = {}


class _Conn:
    """One accepted connection: while its upstream connects, then until it is logged."""

    __slots__ = ("id", "client", "peer", "started", "upstream", "deadline", "relay", "_server")

    def __init__(self, server: ProxyServer, id: int, client: socket.socket, peer: str, started: float) -> None:
        self._server = server
        self.id = id
        self.client: socket.socket | None = client
        self.peer = peer
        self.started = started
        self.upstream: socket.socket | None = None
        self.deadline = 0.0
        self.relay: Proxy | None = None

    def __call__(self, _relay: Proxy) -> None:
        """The relay's done callback (a worker thread): queue it for the loop to log."""
        self._server._finished.append(self)
        self._server._wake()


class ProxyServer:
    """Accept on ``listen``, connect to ``connect``, splice the two with ``pool.proxy``.

    ``on_finished(conn_id, peer, relay)``, if given, is called once per proxied
    connection after it has ended and been counted and logged, with the ``Proxy``
    (``relay.forward`` is client → upstream). It runs in the server's loop thread,
    so keep it short; an exception it raises is logged, not fatal.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        connect: tuple[str, int],
        *,
        pool: SplicePool,
        idle: float | None = None,
        max_conns: int = 0,
        connect_timeout: float = 10.0,
        nodelay: bool = True,
        reuse_port: bool = False,
        backlog: int = 1024,
        listener: socket.socket | None = None,
        on_finished: Callable[[int, str, Proxy], None] | None = None,
    ) -> None:
        self.pool = pool
        self.on_finished = on_finished
        self.idle = idle
        self.max_conns = max_conns
        self.connect_timeout = connect_timeout
        self.nodelay = nodelay
        self.counters = Counters()
        self._upstream = socket.getaddrinfo(connect[0], connect[1], type=socket.SOCK_STREAM)[0]
        self.connect_label = format_addr(self._upstream[4])
        self.listener = listener if listener is not None else _listen(listen, reuse_port, backlog)
        self.listener.setblocking(False)
        self.address = self.listener.getsockname()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accepting = False
        self._paused_until = 0.0
        self._ids = 0
        self._connecting: dict[int, _Conn] = {}  # upstream fd -> connection
        # Connects in progress, oldest first: with one timeout for all, that is deadline order.
        # A connection leaves when it is due; one that connected or failed (deadline 0) is
        # dropped as soon as it reaches the head, so the queue holds no finished connect long.
        self._deadlines: deque[_Conn] = deque()
        self._finished: deque[_Conn] = deque()  # filled by workers' done callbacks
        self._stopping = False
        self._stop_requested = False

    # -- control from other threads / signal handlers --------------------------
    def stop(self) -> None:
        """Ask ``serve_forever`` to stop accepting and wind down (thread- and signal-safe)."""
        self._stop_requested = True
        self._wake()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the loop ------------------------------------------------------------
    def serve_forever(self, grace: float = 10.0) -> None:
        """Serve until ``stop()``; then let live connections finish for ``grace`` seconds."""
        self._set_accepting(True)
        log.info("listening on %s, proxying to %s", format_addr(self.address), self.connect_label)
        drain_until = None
        try:
            while True:
                if self._stop_requested and not self._stopping:
                    self._begin_stop()
                    drain_until = time.monotonic() + grace
                    log.info(
                        "stopping: %d connection(s) live, waiting up to %.1f s",
                        self.counters.live,
                        grace,
                    )
                if self._stopping and self.counters.live == 0 and not self._connecting:
                    break
                now = time.monotonic()
                if drain_until is not None and now >= drain_until:
                    log.info("grace period over: closing %d connection(s)", self.counters.live)
                    break
                self._run_once(self._sel.select(self._timeout(now, drain_until)))
        finally:
            self._shutdown()

    def _timeout(self, now: float, drain_until: float | None) -> float | None:
        timeout = None
        if self._deadlines:
            timeout = max(0.0, self._deadlines[0].deadline - now)
        if self._paused_until:
            left = max(0.0, self._paused_until - now)
            timeout = left if timeout is None else min(timeout, left)
        if drain_until is not None:
            left = max(0.0, drain_until - now)
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    def _run_once(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, _mask in events:
            if key.data == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
            elif key.data == "listen":
                self._accept()
            else:
                self._connected(key.data)
        while self._finished:
            self._log_finished(self._finished.popleft())
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines and deadlines[0].deadline <= now:
            conn = deadlines.popleft()
            if conn.deadline:
                self._connect_failed(conn, OSError(errno.ETIMEDOUT, "connect timed out"))
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
        self._set_accepting(not self._stopping and not self._paused_until and not self._full())

    def _full(self) -> bool:
        return bool(self.max_conns) and self.counters.live + len(self._connecting) >= self.max_conns

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        self._accepting = on
        if on:
            self._sel.register(self.listener, selectors.EVENT_READ, "listen")
        else:
            self._sel.unregister(self.listener)

    # -- accepting and connecting ------------------------------------------------
    def _accept(self) -> None:
        for _ in range(_ACCEPT_BURST):
            if self._full():
                return
            try:
                client, peer = self.listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept: %s; pausing accepts for %.1f s", exc.strerror, _EMFILE_BACKOFF)
                    self._paused_until = time.monotonic() + _EMFILE_BACKOFF
                    self._set_accepting(False)
                    return
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue
                raise
            self.counters.accepted += 1
            self._ids += 1
            conn = _Conn(self, self._ids, client, format_addr(peer), time.monotonic())
            self._start_connect(conn)

    def _start_connect(self, conn: _Conn) -> None:
        family, type_, proto, _, addr = self._upstream
        try:
            up = socket.socket(family, type_, proto)
        except OSError as exc:
            self.counters.refused += 1
            log.warning("conn %d %s: no socket for upstream (%s); closed", conn.id, conn.peer, exc.strerror)
            conn.client.close()
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self._paused_until = time.monotonic() + _EMFILE_BACKOFF
            return
        up.setblocking(False)
        if self.nodelay:
            for s in (conn.client, up):
                try:
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
        err = up.connect_ex(addr)
        conn.upstream = up
        if err in (0, errno.EISCONN):
            self._hand_over(conn)
        elif err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
            conn.deadline = time.monotonic() + self.connect_timeout
            self._connecting[up.fileno()] = conn
            self._sel.register(up, selectors.EVENT_WRITE, conn)
            self._deadlines.append(conn)
        else:
            self._connect_failed(conn, OSError(err, os.strerror(err)), registered=False)

    def _connected(self, conn: _Conn) -> None:
        up = conn.upstream
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_failed(conn, OSError(err, os.strerror(err)))
            return
        self._sel.unregister(up)
        del self._connecting[up.fileno()]
        conn.deadline = 0.0
        self._hand_over(conn)

    def _connect_failed(self, conn: _Conn, exc: OSError, registered: bool = True) -> None:
        conn.deadline = 0.0
        up = conn.upstream
        if up is not None:
            if registered:
                self._sel.unregister(up)
                self._connecting.pop(up.fileno(), None)
            up.close()
        conn.client.close()
        self.counters.failed_connects += 1
        log.warning(
            "conn %d %s -> %s: upstream connect failed: %s; client closed",
            conn.id,
            conn.peer,
            self.connect_label,
            exc.strerror or exc,
        )

    def _hand_over(self, conn: _Conn) -> None:
        client, up = conn.client, conn.upstream
        assert client is not None and up is not None
        conn.client = conn.upstream = None
        # The pool takes the bare fds (it owns them from here): no socket object
        # per connection stays alive while it is proxied.
        a, b = client.detach(), up.detach()
        try:
            relay = self.pool.proxy(a, b, idle=self.idle, wait=False)
        except (OSError, RuntimeError) as exc:
            self.counters.refused += 1
            log.warning("conn %d %s: not proxied: %s", conn.id, conn.peer, exc)
            os.close(a)
            os.close(b)
            return
        conn.relay = relay
        self.counters.live += 1
        relay.add_done_callback(conn)

    def _log_finished(self, conn: _Conn) -> None:
        relay = conn.relay
        assert relay is not None
        c = self.counters
        c.live -= 1
        c.finished += 1
        up, down = relay.forward.transferred, relay.reverse.transferred
        c.bytes_up += up
        c.bytes_down += down
        reason = relay.reason.name if relay.reason else "?"
        c.reasons[reason] = c.reasons.get(reason, 0) + 1
        error = f" error={relay.error.strerror}" if relay.error is not None else ""
        log.info(
            "conn %d %s -> %s up=%d down=%d duration=%.3fs reason=%s%s",
            conn.id,
            conn.peer,
            self.connect_label,
            up,
            down,
            time.monotonic() - conn.started,
            reason,
            error,
        )
        if self.on_finished is not None:
            try:
                self.on_finished(conn.id, conn.peer, relay)
            except Exception:
                log.exception("conn %d: on_finished callback failed", conn.id)

    # -- stopping ------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stopping = True
        self._set_accepting(False)
        self.listener.close()
        for conn in list(self._connecting.values()):
            self._connect_failed(conn, OSError(errno.ECANCELED, "shutting down"))

    def _shutdown(self) -> None:
        for conn in list(self._connecting.values()):
            self._connect_failed(conn, OSError(errno.ECANCELED, "shutting down"))
        self.pool.close(grace=1.0)
        while self._finished:
            self._log_finished(self._finished.popleft())
        if self._accepting:
            self._set_accepting(False)
        if self.listener.fileno() != -1:
            self.listener.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- stats -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {
            "connections": {
                "live": c.live,
                "accepted": c.accepted,
                "finished": c.finished,
                "refused": c.refused,
                "failed_connects": c.failed_connects,
                "connecting": len(self._connecting),
                "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down,
                "reasons": dict(c.reasons),
            },
            "pool": self.pool.stats(),
        }

    def metrics(self) -> str:
        """The stats in the Prometheus text exposition format (version 0.0.4)."""
        st = self.stats()
        conns, pool = st["connections"], st["pool"]
        lines: list[str] = []

        def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
            lines.append(f"# HELP splicepool_{name} {help_}")
            lines.append(f"# TYPE splicepool_{name} {kind}")
            for labels, value in samples:
                lines.append(f"splicepool_{name}{labels} {value}")

        metric("connections_live", "gauge", "Proxied connections now.", [("", conns["live"])])
        metric("connections_connecting", "gauge", "Upstream connects in progress.", [("", conns["connecting"])])
        metric("connections_accepted_total", "counter", "Client connections accepted.", [("", conns["accepted"])])
        metric("connections_finished_total", "counter", "Proxied connections ended.", [("", conns["finished"])])
        metric("connections_refused_total", "counter", "Accepted connections closed unproxied.", [("", conns["refused"])])
        metric("upstream_connect_failures_total", "counter", "Failed upstream connects.", [("", conns["failed_connects"])])
        metric(
            "connection_bytes_total",
            "counter",
            "Bytes of finished connections, by direction.",
            [('{direction="up"}', conns["bytes_up"]), ('{direction="down"}', conns["bytes_down"])],
        )
        metric(
            "connections_ended_total",
            "counter",
            "Finished connections by end reason.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(conns["reasons"].items())],
        )
        metric("splices_live", "gauge", "Live splices in the pool.", [("", pool["live"])])
        workers = pool["workers"]
        for name, key, help_ in (
            ("worker_bytes_total", "bytes", "Bytes moved by each worker."),
            ("worker_passes_total", "passes", "xfer passes run by each worker."),
            ("worker_wakeups_total", "wakeups", "Hub wakeups of each worker."),
        ):
            metric(name, "counter", help_, [(f'{{worker="{w["index"]}"}}', w[key]) for w in workers])
        metric(
            "worker_splices_live",
            "gauge",
            "Live splices on each worker.",
            [(f'{{worker="{w["index"]}"}}', w["live"]) for w in workers],
        )
        return "\n".join(lines) + "\n"

    def serve_stats(self, address: tuple[str, int]) -> http.server.ThreadingHTTPServer:
        """Serve ``/stats`` (JSON) and ``/metrics`` (Prometheus) from a daemon thread."""
        import http.server  # only here: it costs a proxy ~7 MiB of memory
        import json

        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path.split("?")[0] == "/stats":
                    body = json.dumps(server.stats(), indent=2).encode()
                    ctype = "application/json"
                elif self.path.split("?")[0] == "/metrics":
                    body = server.metrics().encode()
                    ctype = "text/plain; version=0.0.4; charset=utf-8"
                else:
                    self.send_error(404, "try /stats or /metrics")
                    return
                self.send_response(200)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("stats: " + format, *args)

        class StatsServer(http.server.ThreadingHTTPServer):
            address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
            daemon_threads = True

        httpd = StatsServer(address, Handler)
        threading.Thread(
            target=httpd.serve_forever, args=(0.1,), name="splicepool-stats", daemon=True
        ).start()
        log.info("stats on http://%s/stats and /metrics", format_addr(httpd.server_address))
        return httpd


def _listen(address: tuple[str, int], reuse_port: bool, backlog: int) -> socket.socket:
    host, port = address
    info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(info[0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(info[4])
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock
