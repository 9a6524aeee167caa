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
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from .pool import SplicePool
from .relay import Proxy

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any


log = logging.getLogger("splicepool.proxy")

ACCEPT_BURST = 64  # connections accepted per wakeup before looking at the rest
EMFILE_BACKOFF = 0.1  # seconds without accepting after running out of fds
_MAX_WAIT = 3600.0  # the longest single selector wait: epoll's limit is ~24.8 days, inf overflows


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
    if not host and default_host is not None:
        host = default_host
    return host, int(port)  # an empty host stays empty: the caller refuses it or picks one


def format_addr(addr: Any) -> str:
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return str(addr)


WILDCARDS = ("0.0.0.0", "::")


def printable(text: str | bytes) -> str:
    """Peer-controlled text made safe for a log line: every character outside printable
    ASCII (control characters, DEL, CR/LF, non-ASCII) and the backslash become ``\\xNN``."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    return "".join(c if " " <= c <= "~" and c != "\\" else f"\\x{ord(c):02x}" for c in text)


def _plain_ip(host: str) -> str:
    """``::ffff:1.2.3.4`` → ``1.2.3.4``; any other address as it is."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _is_local(host: str) -> bool:
    """Whether ``host`` (an IP address) is one of this machine's: can a socket bind to it?"""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


def loops_back(listen: tuple[Any, ...], upstream: tuple[Any, ...]) -> bool:
    """Whether connecting to ``upstream`` (a resolved sockaddr) reaches the listener bound to
    ``listen``: the same port and the same address, or the listener on a wildcard (``::`` is
    dual-stack: it takes IPv4 too) and the upstream one of this machine's addresses."""
    if listen[1] != upstream[1] or not listen[1]:
        return False
    lhost, uhost = _plain_ip(listen[0]), _plain_ip(upstream[0])
    if lhost == uhost:
        return True
    if lhost == "0.0.0.0":
        return ":" not in uhost and _is_local(uhost)
    if lhost == "::":
        return _is_local(uhost)
    return False


def _name_sides(message: str) -> str:
    """An engine message about ``proxy(a, b)`` in the CLI's words: a is the client, b the upstream."""
    return re.sub(r"\b([ab]) fd \d+", lambda m: "client" if m.group(1) == "a" else "upstream", message)


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
        self.bytes_up = 0  # of finished connections only
        self.bytes_down = 0
        self.reasons: dict[str, int] = {}


class _Conn:
    """One accepted connection: while its upstream connects, then until it is logged."""

    __slots__ = ("id", "client", "peer", "started", "upstream", "deadline", "relay", "errors",
                 "_server")

    def __init__(self, server: ProxyServer, id: int, client: socket.socket, peer: str, started: float) -> None:
        self._server = server
        self.id = id
        self.client: socket.socket | None = client
        self.peer = peer
        self.started = started
        self.upstream: socket.socket | None = None
        self.deadline = 0.0
        self.relay: Proxy | None = None
        self.errors: list[str] | None = None  # "address: error" of each address that failed

    @property
    def attempt(self) -> int:
        """The index of the upstream address tried now (or connected to): one per failure."""
        errors = self.errors
        return len(errors) if errors else 0

    def __call__(self, _relay: Proxy) -> None:
        """The relay's done callback (a worker thread): queue it for the loop to log."""
        self._server._finished.append(self)
        self._server._wake()


class ProxyServer:
    """Accept on ``listen``, connect to ``connect``, splice the two with ``pool.proxy``.

    ``connect`` is resolved once, here; each connection tries the resolved addresses in
    order until one connects, ``connect_timeout`` seconds each (``inf``: no limit).
    ``ValueError`` if ``connect`` is the listening address itself.

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
        self._upstreams = resolve(connect)
        addrs = [format_addr(info[4]) for info in self._upstreams]
        if len(addrs) == 1:
            self.connect_label = addrs[0]
        else:
            self.connect_label = format_addr(connect)
        self.connect_description = self.connect_label
        if len(addrs) > 1 or addrs[0] != format_addr(connect):
            self.connect_description = f"{format_addr(connect)} ({', '.join(addrs)})"
        self.listener = listener if listener is not None else _listen(listen, reuse_port, backlog)
        self.address = self.listener.getsockname()
        if any(loops_back(self.address, info[4]) for info in self._upstreams):
            self.listener.close()
            raise ValueError(
                f"{format_addr(connect)} is this proxy's own listening address "
                "(every connection would loop back into the proxy)"
            )
        self.listener.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accepting = False
        self._paused_until = 0.0
        self._ids = 0
        self._connecting: dict[int, _Conn] = {}  # upstream fd -> connection
        # Connect attempts in progress, oldest first: (deadline, conn, its upstream socket then).
        # With one timeout for all, that is deadline order. An entry whose connection has
        # connected, failed or moved on to its next address is stale: dropped when at the head.
        self._deadlines: deque[tuple[float, _Conn, socket.socket]] = deque()
        self._finished: deque[_Conn] = deque()  # filled by workers' done callbacks
        self._live: dict[int, _Conn] = {}  # proxied connections not logged yet, by id
        self._live_lock = threading.Lock()  # _live and the byte counters, against stats()
        self._notes: deque[str] = deque()  # warnings to log from the loop (signal handlers)
        self._stopping = False
        self._stop_requested = False

    # -- control from other threads / signal handlers --------------------------
    def stop(self) -> None:
        """Ask ``serve_forever`` to stop accepting and wind down (thread- and signal-safe)."""
        self._stop_requested = True
        self._wake()

    def warn_soon(self, message: str) -> None:
        """Have the loop log ``message`` as a warning (signal-safe: a handler must not log)."""
        self._notes.append(message)
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
        log.info("listening on %s, proxying to %s", format_addr(self.address), self.connect_description)
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

    def close(self) -> None:
        """Release what the constructor took (listener, selector, wakeup pipe, pool) without
        serving: for a server whose ``serve_forever`` will never run."""
        self._stopping = True
        self._shutdown()

    def _timeout(self, now: float, drain_until: float | None) -> float | None:
        """How long the selector may wait: the nearest deadline, at most ``_MAX_WAIT``
        (a connect timeout or grace of ``inf`` or of months is waited for in slices)."""
        timeout = None
        if self._deadlines:
            timeout = max(0.0, self._deadlines[0][0] - now)
        if self._paused_until:
            left = max(0.0, self._paused_until - now)
            timeout = left if timeout is None else min(timeout, left)
        if drain_until is not None:
            left = max(0.0, drain_until - now)
            timeout = left if timeout is None else min(timeout, left)
        return timeout if timeout is None else min(timeout, _MAX_WAIT)

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
        while self._notes:
            log.warning("%s", self._notes.popleft())
        while self._finished:
            self._log_finished(self._finished.popleft())
        now = time.monotonic()
        deadlines = self._deadlines
        while deadlines:
            deadline, conn, up = deadlines[0]
            if conn.upstream is up and conn.deadline:  # still this attempt
                if deadline > now:
                    break
                deadlines.popleft()
                self._attempt_failed(conn, OSError(errno.ETIMEDOUT, "connect timed out"))
            else:
                deadlines.popleft()
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
        for _ in range(ACCEPT_BURST):
            if self._full():
                return
            try:
                got = accept_nowait(self.listener)
            except OutOfFds as exc:
                log.warning("accept: %s; pausing accepts for %.1f s", exc, EMFILE_BACKOFF)
                self._paused_until = time.monotonic() + EMFILE_BACKOFF
                self._set_accepting(False)
                return
            if got is None:
                return
            client, peer = got
            self.counters.accepted += 1
            self._ids += 1
            conn = _Conn(self, self._ids, client, format_addr(peer), time.monotonic())
            if self.nodelay:
                try:
                    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            self._start_connect(conn)

    def _start_connect(self, conn: _Conn) -> None:
        """Connect ``conn`` to its next upstream address that does not fail at once."""
        while conn.attempt < len(self._upstreams):
            family, type_, proto, _, addr = self._upstreams[conn.attempt]
            try:
                up = socket.socket(family, type_, proto)
            except OSError as exc:
                self.counters.refused += 1
                log.warning("conn %d %s: no socket for upstream (%s); closed", conn.id, conn.peer, exc.strerror)
                conn.client.close()
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    self._paused_until = time.monotonic() + EMFILE_BACKOFF
                return
            up.setblocking(False)
            if self.nodelay:
                try:
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass
            err = up.connect_ex(addr)
            conn.upstream = up
            if err in (0, errno.EISCONN):
                self._hand_over(conn)
                return
            if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
                conn.deadline = time.monotonic() + self.connect_timeout
                self._connecting[up.fileno()] = conn
                self._sel.register(up, selectors.EVENT_WRITE, conn)
                self._deadlines.append((conn.deadline, conn, up))
                return
            up.close()
            conn.upstream = None
            self._note_failure(conn, OSError(err, os.strerror(err)))
        self._connect_failed(conn)

    def _note_failure(self, conn: _Conn, exc: OSError) -> None:
        """Record that the current address failed; move ``conn`` on to the next one."""
        addr = format_addr(self._upstreams[conn.attempt][4])
        reason = exc.strerror or str(exc)
        self._note(conn, f"{addr}: {reason}" if len(self._upstreams) > 1 else reason)
        if conn.attempt < len(self._upstreams):
            log.debug(
                "conn %d %s: upstream %s: %s; trying %s",
                conn.id,
                conn.peer,
                addr,
                reason,
                format_addr(self._upstreams[conn.attempt][4]),
            )

    def _drop_attempt(self, conn: _Conn) -> None:
        """Close the upstream socket of ``conn``'s connect in progress."""
        conn.deadline = 0.0
        up = conn.upstream
        assert up is not None
        self._sel.unregister(up)
        self._connecting.pop(up.fileno(), None)
        up.close()
        conn.upstream = None

    def _attempt_failed(self, conn: _Conn, exc: OSError) -> None:
        """The connect in progress failed or timed out: try the next address, if any."""
        self._drop_attempt(conn)
        self._note_failure(conn, exc)
        self._start_connect(conn)

    def _connected(self, conn: _Conn) -> None:
        up = conn.upstream
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._attempt_failed(conn, OSError(err, os.strerror(err)))
            return
        self._sel.unregister(up)
        del self._connecting[up.fileno()]
        conn.deadline = 0.0
        self._hand_over(conn)

    def _cancel(self, conn: _Conn) -> None:
        """Give up a connect in progress (shutting down)."""
        self._drop_attempt(conn)
        self._note(conn, "shutting down")
        self._connect_failed(conn)

    @staticmethod
    def _note(conn: _Conn, error: str) -> None:
        """Remember why an address failed (the list is made on the first failure: most
        connections never need one)."""
        if conn.errors is None:
            conn.errors = []
        conn.errors.append(error)

    def _connect_failed(self, conn: _Conn) -> None:
        """Every address failed (or the server stops): close the client, count, log."""
        conn.deadline = 0.0
        conn.client.close()
        self.counters.failed_connects += 1
        log.warning(
            "conn %d %s -> %s: upstream connect failed: %s; client closed",
            conn.id,
            conn.peer,
            self.connect_label,
            "; ".join(conn.errors or ()),
        )

    def _hand_over(self, conn: _Conn) -> None:
        client, up = conn.client, conn.upstream
        assert client is not None and up is not None
        conn.client = conn.upstream = None
        conn.deadline = 0.0
        # The pool takes the bare fds (it owns them from here): no socket object
        # per connection stays alive while it is proxied.
        a, b = client.detach(), up.detach()
        try:
            relay = self.pool.proxy(a, b, idle=self.idle, wait=False)
        except (OSError, RuntimeError) as exc:
            self.counters.refused += 1
            log.warning("conn %d %s: not proxied: %s", conn.id, conn.peer, _name_sides(str(exc)))
            os.close(a)
            os.close(b)
            return
        conn.relay = relay
        with self._live_lock:
            self._live[conn.id] = conn
            self.counters.live += 1
        relay.add_done_callback(conn)

    def _log_finished(self, conn: _Conn) -> None:
        relay = conn.relay
        assert relay is not None
        c = self.counters
        up, down = relay.forward.transferred, relay.reverse.transferred
        with self._live_lock:  # from live to finished at once: stats() never counts it twice
            del self._live[conn.id]
            c.live -= 1
            c.finished += 1
            c.bytes_up += up
            c.bytes_down += down
        reason = relay.reason.name if relay.reason else "?"
        c.reasons[reason] = c.reasons.get(reason, 0) + 1
        error = f" error={relay.error.strerror}" if relay.error is not None else ""
        log.info(
            "conn %d %s -> %s up=%d down=%d duration=%.3fs reason=%s%s",
            conn.id,
            conn.peer,
            format_addr(self._upstreams[conn.attempt][4]),
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
            self._cancel(conn)

    def _shutdown(self) -> None:
        for conn in list(self._connecting.values()):
            self._cancel(conn)
        self.pool.close(grace=1.0)
        while self._finished:
            self._log_finished(self._finished.popleft())
        while self._notes:
            log.warning("%s", self._notes.popleft())
        if self._accepting:
            self._set_accepting(False)
        if self.listener.fileno() != -1:
            self.listener.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- stats -------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters since start. ``bytes_up``/``bytes_down``: finished connections only;
        ``live_bytes_up``/``live_bytes_down``: what the connections still live have moved so
        far (read together with the finished counts, so the two never overlap or miss one)."""
        c = self.counters
        with self._live_lock:
            relays = [conn.relay for conn in self._live.values()]
            live_up = sum(r.forward.transferred for r in relays if r is not None)
            live_down = sum(r.reverse.transferred for r in relays if r is not None)
            bytes_up, bytes_down, live, finished = c.bytes_up, c.bytes_down, c.live, c.finished
        return {
            "connections": {
                "live": live,
                "accepted": c.accepted,
                "finished": finished,
                "refused": c.refused,
                "failed_connects": c.failed_connects,
                "connecting": len(self._connecting),
                "bytes_up": bytes_up,
                "bytes_down": bytes_down,
                "live_bytes_up": live_up,
                "live_bytes_down": live_down,
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

        def up_down(up: int, down: int) -> list[tuple[str, float]]:
            return [('{direction="up"}', up), ('{direction="down"}', down)]

        metric("connections_live", "gauge", "Proxied connections now.", [("", conns["live"])])
        metric("connections_connecting", "gauge", "Upstream connects in progress.", [("", conns["connecting"])])
        metric("connections_accepted_total", "counter", "Client connections accepted.", [("", conns["accepted"])])
        metric("connections_finished_total", "counter", "Proxied connections ended.", [("", conns["finished"])])
        metric("connections_refused_total", "counter", "Accepted connections closed unproxied.", [("", conns["refused"])])
        metric("upstream_connect_failures_total", "counter", "Failed upstream connects.", [("", conns["failed_connects"])])
        metric(
            "connection_bytes_total",
            "counter",
            "Bytes moved by finished connections only (live ones: splicepool_live_connection_bytes), "
            "by direction (up: client to upstream).",
            up_down(conns["bytes_up"], conns["bytes_down"]),
        )
        metric(
            "live_connection_bytes",
            "gauge",
            "Bytes moved so far by the connections still live, by direction.",
            up_down(conns["live_bytes_up"], conns["live_bytes_down"]),
        )
        metric(
            "bytes_total",
            "counter",
            "Bytes moved by all connections, finished and live, by direction.",
            up_down(conns["bytes_up"] + conns["live_bytes_up"], conns["bytes_down"] + conns["live_bytes_down"]),
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


class OutOfFds(Exception):
    """``accept()`` ran out of fds or memory: stop accepting for a moment, never spin."""


def accept_nowait(listener: socket.socket) -> tuple[socket.socket, Any] | None:
    """One connection from a non-blocking ``listener``, or None when none is waiting.

    Connections aborted before they were taken are skipped; ``OutOfFds`` (EMFILE,
    ENFILE, ENOBUFS, ENOMEM) says to pause; any other error is raised.
    """
    while True:
        try:
            return listener.accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise OutOfFds(exc.strerror or str(exc)) from exc
            if exc.errno not in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                raise


def resolve(address: tuple[str, int]) -> list[tuple[Any, ...]]:
    """Every address ``getaddrinfo`` gives for a TCP ``(host, port)``, in its order, once each."""
    seen: set[Any] = set()
    infos = []
    for info in socket.getaddrinfo(address[0], address[1], type=socket.SOCK_STREAM):
        if info[4] not in seen:
            seen.add(info[4])
            infos.append(info)
    return infos


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
