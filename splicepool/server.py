"""ProxyServer: the TCP proxy behind ``python -m splicepool proxy``.

One loop accepts and connects, without blocking: a selector watches the
listening socket, the upstream connects in progress and a wakeup fd. It runs in
the thread that calls ``serve_forever``, or (``on_worker=True``, what the CLI
does) on the pool's first worker thread, between its splices' passes: the
worker's epoll watches the selector's, and no connection that worker carries is
handed from one thread to another. Each
connection, once its upstream is connected, is handed to the pool
(``SplicePool.proxy_accepted``: ``proxy`` without probing the two sockets this
loop made itself; an accept burst wakes each worker once, at its end);
the pool's workers move every byte and the server only logs the result. Live
counters are served as JSON (``/stats``) and Prometheus text (``/metrics``).
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence

from ._sockets import MSG_NOSIGNAL
from .backends import Backend, HealthChecker, Resolver, lookup_host
from .pool import SplicePool
from .relay import Proxy
from .routes import PROXY_HEADER_MAX, Routes

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from .proxyproto import ProxyHeader


log = logging.getLogger("splicepool.proxy")

ACCEPT_BURST = 64  # connections accepted per wakeup before looking at the rest
EMFILE_BACKOFF = 0.1  # seconds without accepting after running out of fds
_MAX_WAIT = 3600.0  # the longest single selector wait: epoll's limit is ~24.8 days, inf overflows
_INF = float("inf")


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
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text  # the usual case, at C speed
    return "".join(c if " " <= c <= "~" and c != "\\" else f"\\x{ord(c):02x}" for c in text)


def _plain_ip(host: str) -> str:
    """``::ffff:1.2.3.4`` → ``1.2.3.4``; any other address as it is."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def _same_secret(want: bytes | None, given: bytes) -> bool:
    """``given == want`` in a time that does not tell how much of it matched."""
    import hmac  # only a SOCKS5 front door with users needs it

    return want is not None and hmac.compare_digest(want, given)


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


# The engine's words for a client that closed or reset before its relay could start.
_CLIENT_GONE = re.compile(r"\bclient \([^)]*\) is not connected$")


class Counters:
    """Connection counts since start (read by the stats server, written by the loop)."""

    __slots__ = ("accepted", "live", "finished", "refused", "failed_connects", "bytes_up",
                 "bytes_down", "reasons", "refusals", "reloads")

    def __init__(self) -> None:
        self.accepted = 0
        self.live = 0
        self.finished = 0
        self.refused = 0  # accepted connections closed without being proxied (refusals counts why)
        self.failed_connects = 0
        self.bytes_up = 0  # of finished connections only
        self.bytes_down = 0
        self.reasons: dict[str, int] = {}
        self.refusals: dict[str, int] = {}  # why clients were refused, by REFUSALS key
        self.reloads = 0


# Why an accepted client was closed before any backend was connected, as counted in /stats.
REFUSALS = {
    "access_list": "not allowed by --allow/--deny",
    "client_limit": "over --max-conns-per-client",
    "untrusted_proxy": "a peer not in --proxy-from (with --accept-proxy)",
    "no_backend": "no backend up",
    "bad_proxy_header": "no valid PROXY header",
    "bad_client_hello": "a malformed TLS ClientHello",
    "head_timeout": "no complete PROXY header or ClientHello in time",
    "closed_early": "closed before it was proxied (a balancer's health check, say)",
    "not_proxied": "the pool refused it (out of fds, closing, the upstream gone)",
    "bad_socks": "not a SOCKS5 client, or a malformed message (socks)",
    "socks_auth": "no acceptable method, or a wrong user name or password (socks)",
    "socks_command": "a command other than CONNECT (socks)",
    "target_not_allowed": "a target outside --allow-target, or the proxy itself (socks)",
    "target_unresolved": "a target name that does not resolve (socks)",
    "shutting_down": "the proxy stopped while its head was read",
}

# The SOCKS5 message a client's next bytes must be.
_GREETING, _AUTH, _REQUEST = 1, 2, 3

# What a connection is waiting for while the server holds it (before the pool takes it).
_HEAD, _CONNECT, _PREFIX, _RESOLVE = 1, 2, 3, 4
# Bytes read from a client before it is routed, at most: a PROXY header and a ClientHello
# (sni.MAX_HELLO; proxyproto and sni load only when a head is read: a lighter proxy without).
HEAD_MAX = PROXY_HEADER_MAX + 16384


class _Conn:
    """One accepted connection while it is read from, checked and connected (until hand-over)."""

    __slots__ = ("id", "client", "peer", "addr", "ip", "started", "upstream", "deadline",
                 "errors", "stage", "routes", "head", "header", "order", "bi",
                 "backend", "addrs", "ai", "prefix", "ahead", "counted", "socks", "target", "err",
                 "_server")

    def __init__(self, server: ProxyServer, id: int, client: socket.socket, addr: Any, started: float,
                 routes: Routes) -> None:
        self._server = server
        self.id = id
        self.client: socket.socket | None = client
        self.addr = addr  # the client's address as accepted
        self.ip = _plain_ip(addr[0])  # the client's IP: for the access list, limits and balance
        self.peer = format_addr(addr)  # the client as logged
        self.started = started
        self.routes = routes  # as they were when it was accepted: a reload never changes them
        self.stage = 0
        self.upstream: socket.socket | None = None
        self.deadline = 0.0
        self.errors: list[str] | None = None  # "address: error" of each address that failed
        self.head: bytearray | None = None  # bytes read before routing (PROXY header, ClientHello)
        self.header: ProxyHeader | None = None  # the PROXY header the client sent
        self.order: Sequence[Backend] = ()  # the backends to try, in order (none yet: no list made)
        self.bi = -1  # the index in order of the backend tried now
        self.backend: Backend | None = None
        self.addrs: tuple[Any, ...] = ()  # that backend's addresses, as they were when it was tried
        self.ai = 0  # the index in addrs of the address tried now (or connected to)
        self.prefix: bytes | None = None  # to send upstream before splicing (PROXY header, head)
        self.ahead = 0  # bytes of the client's in the prefix: counted in up= with the relay's
        self.counted = False  # counted in the server's per-client numbers
        self.socks = 0  # SOCKS5: the message awaited (_GREETING, _AUTH, _REQUEST), 0 otherwise
        self.target = ""  # SOCKS5: the HOST:PORT the client asked for
        self.err = 0  # the errno of the last failed connect (a SOCKS5 reply says it)


class _Live:
    """A proxied connection, from hand-over until it is logged: what the log line, the
    counters and /stats need, and nothing of how it was routed (its ``_Conn`` is dropped at
    hand-over, so a live connection costs no more than this)."""

    __slots__ = ("id", "peer", "started", "relay", "backend", "sockaddr", "ahead", "counted_ip",
                 "_server")

    def __init__(self, conn: _Conn, relay: Proxy, backend: Backend) -> None:
        self._server = conn._server
        self.id = conn.id
        self.peer = conn.peer
        self.started = conn.started
        self.relay = relay
        self.backend = backend
        self.sockaddr = conn.addrs[conn.ai][4]  # the backend address connected to
        self.ahead = conn.ahead  # client bytes sent before the splice: part of up=
        self.counted_ip = conn.ip if conn.counted else None  # in the per-client numbers

    def __call__(self, _relay: Proxy) -> None:
        """The relay's done callback (a worker thread): queue it for the loop to log."""
        self._server._finished.append(self)
        self._server._wake()


class _Hosted:
    """A ``ProxyServer``'s loop as the guest of a pool worker (``on_worker=True``): see
    ``SplicePool.host``."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.fd = server._sel.fileno()
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.quit = False  # serve_forever's caller left early: give the loop back at once

    def step(self, _now: float) -> float | None:
        if self.quit:
            return None
        server = self.server
        server._run_once(server._sel.select(0))
        now = time.monotonic()
        if server._should_end(now):
            return None
        timeout = server._timeout(now, server._drain_until)
        return _INF if timeout is None else now + timeout

    def unhosted(self, exc: BaseException | None) -> None:
        self.error = exc
        self.ended.set()

    def __repr__(self) -> str:
        return f"<the loop of the proxy on {format_addr(self.server.address)}>"


class ProxyServer:
    """Accept on ``listen``, connect to a backend, splice the two with the ``pool``.

    ``connect`` is one ``(host, port)``, a list of them, or a ``Routes`` (several backends,
    balance, SNI routes, access lists, PROXY protocol: see ``splicepool.routes``). Names are
    resolved once, here (and again every ``resolve_every`` seconds if the routes say so);
    each connection tries its backends in the balance's order and each backend's addresses
    in order until one connects, ``connect_timeout`` seconds each (``inf``: no limit).
    ``ValueError`` if a backend is the listening address itself.

    ``reload(routes)`` swaps the routes for new connections; ``reloader``, if given, is
    called (in a thread of its own) by ``request_reload()`` to make them: it takes the
    routes in use and returns the new ones and a dict of settings (``idle``,
    ``connect_timeout``, ``max_conns``, ``log_level``: the root logger's level), or raises
    ``ValueError``/``OSError`` to keep the old ones.

    ``on_finished(conn_id, peer, relay)``, if given, is called once per proxied
    connection after it has ended and been counted and logged, with the ``Proxy``
    (``relay.forward`` is client → upstream). It runs in the server's loop thread,
    so keep it short; an exception it raises is logged, not fatal.

    ``on_worker=True`` runs the loop on the pool's first worker thread (``SplicePool.host``)
    instead of the thread that calls ``serve_forever``, which then only waits for it to
    end: a connection that worker carries is never handed to another thread (the GIL
    changing hands, a wakeup), so short connections cost less (docs/performance.md).
    The loop, its log lines and ``on_finished`` then share that thread with the worker's
    splices: a log handler that blocks stalls them. Ignored (the loop keeps its thread)
    for the gevent backend and on a system whose selector has no fd of its own.
    """

    def __init__(
        self,
        listen: tuple[str, int],
        connect: tuple[str, int] | list[tuple[str, int]] | Routes,
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
        reloader: Callable[[Routes], tuple[Routes, dict[str, Any]]] | None = None,
        on_worker: bool = False,
    ) -> None:
        self.pool = pool
        self.on_finished = on_finished
        self.reloader = reloader
        self.idle = idle
        self.max_conns = max_conns
        self.connect_timeout = connect_timeout
        self.nodelay = nodelay
        self.counters = Counters()
        if isinstance(connect, Routes):
            routes = connect
        else:
            routes = Routes([connect] if isinstance(connect, tuple) else list(connect))
        self.routes = routes
        self.listener = listener if listener is not None else _listen(listen, reuse_port, backlog)
        self.address = self.listener.getsockname()
        looping = self.loops_back(routes)
        if looping is not None:
            self.listener.close()
            raise ValueError(
                f"{looping} is this proxy's own listening address "
                "(every connection would loop back into the proxy)"
            )
        self.listener.setblocking(False)
        self._family = int(self.listener.family)
        # Accepted sockets inherit TCP_NODELAY from the listener (Linux, the BSDs): set once
        # here, not once per accept; the first accepted socket says whether it was inherited.
        self._nodelay_each = nodelay and not _set_nodelay(self.listener)
        self._nodelay_checked = not nodelay
        self._sel = selectors.DefaultSelector()
        # The loop on a worker: a thread backend, and a selector that has an fd to watch.
        self.on_worker = on_worker and pool.backend == "thread" and hasattr(self._sel, "fileno")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake_pending = False  # a byte is in the wakeup pipe that the loop has not read
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._accepting = False
        self._burst = False  # in _accept: hand-overs wake their worker at the burst's end
        self._paused_until = 0.0
        self._ids = 0
        self._connecting: dict[int, _Conn] = {}  # upstream fd -> connection
        self._reading: dict[int, _Conn] = {}  # client fd -> connection whose head is read
        self._resolving: dict[int, _Conn] = {}  # SOCKS5 targets being resolved, by conn id
        self._resolved: deque[tuple[_Conn, Any]] = deque()  # (conn, addresses or the error)
        self._lookups: Any = None  # the threads that resolve SOCKS5 target names, made on first use
        # Connect attempts in progress, oldest first: (deadline, conn, its upstream socket then).
        # With one timeout for all, that is deadline order. An entry whose connection has
        # connected, failed or moved on to its next address is stale: dropped when at the head.
        self._deadlines: deque[tuple[float, _Conn, socket.socket]] = deque()
        self._head_deadlines: list[tuple[float, int, _Conn]] = []  # a heap: head timeouts change on reload
        self._per_client: dict[str, int] = {}  # client ip -> connections (with a per-client limit)
        self._finished: deque[_Live] = deque()  # filled by workers' done callbacks
        self._live: dict[int, _Live] = {}  # proxied connections not logged yet, by id
        self._live_lock = threading.Lock()  # _live and the byte counters, against stats()
        self._notes: deque[str] = deque()  # warnings to log from the loop (signal handlers)
        self._reloads: deque[tuple[Routes, dict[str, Any]] | str] = deque()  # from reload threads
        self._reload_requested = False
        self._reloading = False  # a reload thread runs (it clears this before its last wakeup)
        self._checker: HealthChecker | None = None
        self._resolver: Resolver | None = None
        self._stopping = False
        self._stop_requested = False

    def loops_back(self, routes: Routes) -> str | None:
        """The name of a backend of ``routes`` that is this proxy's own listening address."""
        for backend in routes.backends:
            if any(loops_back(self.address, info[4]) for info in backend.addresses):
                return backend.name
        return None

    # -- control from other threads / signal handlers --------------------------
    def stop(self) -> None:
        """Ask ``serve_forever`` to stop accepting and wind down (thread- and signal-safe)."""
        self._stop_requested = True
        self._wake()

    def warn_soon(self, message: str) -> None:
        """Have the loop log ``message`` as a warning (signal-safe: a handler must not log)."""
        self._notes.append(message)
        self._wake()

    def request_reload(self) -> None:
        """Have the loop call the ``reloader`` in a thread and use what it returns
        (thread- and signal-safe)."""
        self._reload_requested = True
        self._wake()

    def reload(self, routes: Routes, **settings: Any) -> None:
        """Use ``routes`` (and ``settings``: ``idle``, ``connect_timeout``, ``max_conns``,
        ``log_level``) for new connections from now on; live ones keep theirs. Thread-safe:
        the loop applies it."""
        self._reloads.append((routes, settings))
        self._wake()

    def _wake(self) -> None:
        # One byte until the loop has read it: a burst of relays ending on the workers
        # costs one write and one wakeup, not one each (the loop clears the flag after its
        # read and before it looks at what was queued, so nothing queued is missed).
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- the loop ------------------------------------------------------------
    def serve_forever(self, grace: float = 10.0) -> None:
        """Serve until ``stop()``; then let live connections finish for ``grace`` seconds.

        With ``on_worker``, the loop runs on the pool's first worker thread and this
        thread only waits for it to end (signal handlers still run here)."""
        self._set_accepting(True)
        self._start_upkeep()
        log.info("listening on %s, proxying to %s", format_addr(self.address), self.routes.describe())
        self._grace = grace
        self._drain_until: float | None = None
        try:
            if self.on_worker:
                hosted = _Hosted(self)
                self.pool.host(hosted)
                try:
                    hosted.ended.wait()
                except BaseException:  # KeyboardInterrupt, say: take the loop back first
                    hosted.quit = True
                    self._wake()
                    hosted.ended.wait()
                    raise
                if hosted.error is not None:
                    raise hosted.error
                return
            while True:
                now = time.monotonic()
                if self._should_end(now):
                    break
                self._run_once(self._sel.select(self._timeout(now, self._drain_until)))
        finally:
            self._shutdown()

    def _should_end(self, now: float) -> bool:
        """Whether the loop is over (stopped, and every connection ended or the grace over)."""
        if self._stop_requested and not self._stopping:
            self._begin_stop()
            self._drain_until = now + self._grace
            log.info("stopping: %d connection(s) live, waiting up to %.1f s", self.counters.live, self._grace)
        if self._stopping and self.counters.live == 0 and not self._connecting:
            return True
        if self._drain_until is not None and now >= self._drain_until:
            log.info("grace period over: closing %d connection(s)", self.counters.live)
            return True
        return False

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
        if self._head_deadlines:
            left = max(0.0, self._head_deadlines[0][0] - now)
            timeout = left if timeout is None else min(timeout, left)
        if self._paused_until:
            left = max(0.0, self._paused_until - now)
            timeout = left if timeout is None else min(timeout, left)
        if drain_until is not None:
            left = max(0.0, drain_until - now)
            timeout = left if timeout is None else min(timeout, left)
        return timeout if timeout is None else min(timeout, _MAX_WAIT)

    def _run_once(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        for key, mask in events:
            data = key.data
            if data == "wake":
                try:
                    os.read(self._wake_r, 4096)
                except BlockingIOError:
                    pass
                self._wake_pending = False
            elif data == "listen":
                self._accept()
            elif data.stage == _HEAD:
                self._read_head(data)
            elif data.stage == _PREFIX:
                self._send_prefix(data)
            elif data.stage == _CONNECT:
                self._connected(data)
            else:  # a subclass's own object (HttpProxyServer's sessions)
                self._ready(data, key.fd, mask)
        while self._notes:
            log.warning("%s", self._notes.popleft())
        while self._finished:
            self._log_finished(self._finished.popleft())
        while self._resolved:
            conn, got = self._resolved.popleft()
            if conn.stage == _RESOLVE:  # else closed meanwhile
                del self._resolving[conn.id]
                conn.stage = 0
                self._socks_resolved(conn, got)
        if self._reload_requested or self._reloads:
            self._reload_step()
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
        heads = self._head_deadlines
        while heads and heads[0][0] <= now:
            conn = heapq.heappop(heads)[2]
            if conn.stage == _HEAD:
                routes = conn.routes
                if routes.accept_proxy and conn.header is None:
                    what = "PROXY header"
                else:
                    what = "SOCKS5 request" if routes.socks is not None else "ClientHello"
                self._refuse(conn, "head_timeout", f"refused: no complete {what} within {conn.routes.head_timeout:g} s")
        if self._paused_until and now >= self._paused_until:
            self._paused_until = 0.0
        self._set_accepting(not self._stopping and not self._paused_until and not self._full())

    def _ready(self, data: Any, fd: int, mask: int) -> None:
        """``fd``, registered by a subclass with ``data`` (whose ``stage`` is none of a
        connection's), is ready for ``mask``."""
        raise NotImplementedError(f"no handler for {data!r} (fd {fd})")

    def _full(self) -> bool:
        return bool(self.max_conns) and (
            self.counters.live + len(self._connecting) + len(self._reading) + len(self._resolving)
            >= self.max_conns
        )

    def _set_accepting(self, on: bool) -> None:
        if on == self._accepting:
            return
        self._accepting = on
        if on:
            self._sel.register(self.listener, selectors.EVENT_READ, "listen")
        else:
            self._sel.unregister(self.listener)

    # -- accepting ------------------------------------------------------------------
    def _accept(self) -> None:
        """Accept a burst; the relays it hands over wake their worker once, at its end."""
        self._burst = True
        try:
            self._accept_burst()
        finally:
            self._burst = False
            self.pool.wake_workers()

    def _accept_burst(self) -> None:
        routes = self.routes
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
            client, addr = got
            self.counters.accepted += 1
            self._ids += 1
            conn = _Conn(self, self._ids, client, addr, time.monotonic(), routes)
            if not self._nodelay_checked:
                self._nodelay_checked = True
                try:
                    inherited = client.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                except OSError:
                    inherited = 1  # not TCP: nothing to set
                self._nodelay_each = not inherited
            if self._nodelay_each:
                _set_nodelay(client)
            if routes.reads_head:
                if routes.accept_proxy:
                    if routes.proxy_from and not routes.proxy_from.permits(conn.ip):
                        self._refuse(conn, "untrusted_proxy", f"refused: {conn.ip} may not send a PROXY "
                                     f"header ({routes.proxy_from.describe()})", logging.INFO)
                    else:
                        self._start_head(conn)
                elif routes.acl and not routes.acl.permits(conn.ip):
                    self._refuse_by_acl(conn)  # known now: no ClientHello need be read
                else:
                    self._start_head(conn)
            elif routes.admits:
                self._admit(conn)
            else:  # the common path: nothing to check, one balance to ask
                conn.order = routes.default.order(conn.ip)
                self._route(conn)

    def _refuse(self, conn: _Conn, why: str, detail: str, level: int = logging.WARNING) -> None:
        """Close a client that will not be proxied; count it under ``why`` (a REFUSALS key)."""
        if conn.stage == _HEAD:
            self._end_head(conn)
        elif conn.stage == _RESOLVE:
            del self._resolving[conn.id]
        conn.stage = 0
        self._release_client(conn)
        c = self.counters
        c.refused += 1
        c.refusals[why] = c.refusals.get(why, 0) + 1
        log.log(level, "conn %d %s: %s", conn.id, conn.peer, detail)

    def _release_client(self, conn: _Conn) -> None:
        """Close the client of a connection that ends before hand-over, and take it out of
        the per-client numbers."""
        if conn.counted:
            conn.counted = False
            self._uncount(conn.ip)
        client = conn.client
        if client is not None:
            conn.client = None
            client.close()

    def _release_backend(self, conn: _Conn) -> None:
        """The backend being tried gets its live count back (no failure counted)."""
        backend = conn.backend
        if backend is not None:
            backend.live -= 1
            conn.backend = None

    def _uncount(self, ip: str) -> None:
        """One connection less for ``ip`` in the per-client numbers."""
        left = self._per_client[ip] - 1
        if left:
            self._per_client[ip] = left
        else:
            del self._per_client[ip]

    # -- reading the head: a PROXY header, a ClientHello ---------------------------------
    def _start_head(self, conn: _Conn) -> None:
        client = conn.client
        assert client is not None
        # accept() gives a blocking socket: a recv on it would hold the whole loop (every
        # other client, and this one's head timeout) until the client sends or closes.
        client.setblocking(False)
        conn.stage = _HEAD
        conn.head = bytearray()
        conn.deadline = time.monotonic() + conn.routes.head_timeout
        self._reading[client.fileno()] = conn
        self._sel.register(client, selectors.EVENT_READ, conn)
        heapq.heappush(self._head_deadlines, (conn.deadline, conn.id, conn))
        self._read_head(conn)  # its first bytes often came with the handshake: no wait for them

    def _end_head(self, conn: _Conn) -> None:
        client = conn.client
        assert client is not None
        self._sel.unregister(client)
        del self._reading[client.fileno()]
        conn.stage = 0
        conn.deadline = 0.0

    def _read_head(self, conn: _Conn) -> None:
        """Read what the client sent; route it once its head is whole."""
        from . import proxyproto, sni
        head = conn.head
        client = conn.client
        assert head is not None and client is not None
        if len(head) >= HEAD_MAX:  # the parsers' own bounds are lower: a safety net
            self._refuse(conn, "bad_client_hello", f"refused: no complete head in {len(head)} bytes")
            return
        try:
            data = client.recv(HEAD_MAX - len(head))
        except BlockingIOError:
            return
        except OSError as exc:
            self._refuse(conn, "closed_early", f"closed: read failed before its head was whole: {exc.strerror or exc}")
            return
        if not data:
            if head:
                self._refuse(conn, "closed_early", f"client closed after {len(head)} bytes, before its head was whole")
            else:  # what TCP health checks do: not worth a warning
                self._refuse(conn, "closed_early", "client closed before sending anything", logging.DEBUG)
            return
        head += data
        routes = conn.routes
        if routes.socks is not None and not (routes.accept_proxy and conn.header is None):
            self._socks_step(conn)
            return
        start = 0
        if routes.accept_proxy:
            header = conn.header
            if header is None:
                try:
                    header = proxyproto.parse(head, max_size=PROXY_HEADER_MAX)
                except proxyproto.ProxyProtocolError as exc:
                    self._refuse(conn, "bad_proxy_header", f"refused: no valid PROXY header: {printable(str(exc))}")
                    return
                if header is None:
                    return  # not whole yet: wait for more (HEAD_MAX bounds it)
                self._take_header(conn, header)
                if routes.socks is not None:  # the SOCKS5 greeting follows the header
                    del head[: header.length]
                    self._socks_step(conn)
                    return
            start = header.length
        name = None
        if routes.routes_by_name:
            try:
                hello = sni.parse_client_hello(head[start:] if start else head)
            except sni.NotTLS:
                hello = None
                name = ""  # not TLS at all: the default backends, as a client without SNI
            except sni.ClientHelloError as exc:
                self._refuse(conn, "bad_client_hello", f"refused: malformed TLS ClientHello: {printable(str(exc))}")
                return
            if hello is None and name is None:
                return  # not whole yet: wait for more
            if hello is not None:
                name = hello.server_name
        self._end_head(conn)
        conn.head = None
        if start < len(head):
            conn.prefix = bytes(head[start:])  # sent upstream as it came, before splicing
            conn.ahead = len(conn.prefix)
        self._admit(conn, name or None)

    def _take_header(self, conn: _Conn, header: ProxyHeader) -> None:
        """The client is whom the PROXY header says (unless it is a LOCAL one, as a health
        check of the balancer in front sends): log, check and balance it by that address."""
        conn.header = header
        if header.local or header.source is None:
            return
        conn.ip = _plain_ip(header.source[0])
        conn.peer = f"{format_addr(header.source)} via {conn.peer}"

    # -- SOCKS5: the client says where it goes ----------------------------------------------
    def _socks_step(self, conn: _Conn) -> None:
        """Take the SOCKS5 messages the head holds (greeting, credentials, request), answer
        each, and once the request is whole resolve and connect its target."""
        from . import socks

        head = conn.head
        policy = conn.routes.socks
        assert head is not None and policy is not None
        try:
            while True:
                if not conn.socks:
                    conn.socks = _GREETING
                if conn.socks == _GREETING:
                    greeting = socks.parse_greeting(head)
                    if greeting is None:
                        return
                    del head[: greeting.length]
                    method = socks.choose_method(greeting, password=bool(policy.users))
                    if not self._socks_send(conn, socks.method_reply(method)):
                        return
                    if method == socks.NO_ACCEPTABLE:
                        offered = ", ".join(f"0x{m:02x}" for m in greeting.methods)
                        self._refuse(conn, "socks_auth", "refused: no acceptable SOCKS5 method "
                                     f"(offered {offered})", logging.INFO)
                        return
                    conn.socks = _AUTH if method == socks.USER_PASSWORD else _REQUEST
                elif conn.socks == _AUTH:
                    given = socks.parse_credentials(head)
                    if given is None:
                        return
                    del head[: given.length]
                    ok = _same_secret(policy.users.get(given.user), given.password)
                    if not self._socks_send(conn, socks.auth_reply(ok)):
                        return
                    user = printable(given.user.decode("utf-8", "replace"))
                    if not ok:
                        self._refuse(conn, "socks_auth", f"refused: wrong user name or password "
                                     f"(user {user})", logging.INFO)
                        return
                    conn.peer = f"{user}@{conn.peer}"
                    conn.socks = _REQUEST
                else:
                    request = socks.parse_request(head)
                    if request is None:
                        return
                    del head[: request.length]
                    self._socks_request(conn, request)
                    return
        except socks.SocksError as exc:
            if exc.reply is not None:
                self._socks_reply(conn, socks.encode_reply(exc.reply))
            self._refuse(conn, "bad_socks", f"refused: {printable(str(exc))}", logging.INFO)

    @staticmethod
    def _socks_reply(conn: _Conn, data: bytes) -> str | None:
        """Send a short SOCKS5 message at once: None when it went, else why not (a client
        that does not read a few bytes of reply is not worth a wait)."""
        client = conn.client
        assert client is not None
        try:
            sent = client.send(data, MSG_NOSIGNAL)
        except OSError as exc:
            return exc.strerror or str(exc)
        return None if sent == len(data) else "its receive buffer is full"

    def _socks_send(self, conn: _Conn, data: bytes) -> bool:
        """Send a SOCKS5 message the negotiation goes on after; False, the client closed, if
        it cannot go at once."""
        why = self._socks_reply(conn, data)
        if why is None:
            return True
        self._refuse(conn, "closed_early", f"closed: cannot send the SOCKS5 reply: {why}", logging.INFO)
        return False

    def _socks_fail(self, conn: _Conn, code: int, why: str, detail: str) -> None:
        """Answer a SOCKS5 request with ``code`` (as far as the client takes it) and refuse
        the client under ``why``: counted once, whether the reply went or not."""
        from . import socks

        self._socks_reply(conn, socks.encode_reply(code))
        self._refuse(conn, why, detail, logging.INFO)

    def _socks_request(self, conn: _Conn, request: Any) -> None:
        from . import socks

        if request.command != socks.CONNECT:
            self._socks_fail(conn, socks.COMMAND_NOT_SUPPORTED, "socks_command",
                             f"refused: SOCKS5 command {request.command} (only CONNECT is served)")
            return
        head = conn.head
        assert head is not None
        self._end_head(conn)
        conn.head = None
        if head:  # the client's first bytes, sent before the reply: they go upstream first
            conn.prefix = bytes(head)
            conn.ahead = len(conn.prefix)
        conn.target = format_addr((request.host, request.port))
        if not self._client_admitted(conn):
            return
        if request.atyp != socks.ATYP_DOMAIN:  # an address: no lookup, no wait
            family = socket.AF_INET6 if request.atyp == socks.ATYP_IPV6 else socket.AF_INET
            sockaddr = (request.host, request.port) if family == socket.AF_INET else (request.host, request.port, 0, 0)
            self._socks_connect(conn, [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)])
            return
        if self._lookups is None:
            from concurrent.futures import ThreadPoolExecutor

            self._lookups = ThreadPoolExecutor(max_workers=4, thread_name_prefix="splicepool-resolve")
        conn.stage = _RESOLVE
        self._resolving[conn.id] = conn
        future = self._lookups.submit(socket.getaddrinfo, request.host, request.port, type=socket.SOCK_STREAM)

        def done(f: Any) -> None:  # a lookup thread: hand the answer to the loop
            exc = f.exception()
            self._resolved.append((conn, exc if exc is not None else f.result()))
            self._wake()

        future.add_done_callback(done)

    def _socks_resolved(self, conn: _Conn, got: Any) -> None:
        from . import socks

        if isinstance(got, BaseException):
            why = got.strerror if isinstance(got, OSError) and got.strerror else str(got)
            code = socks.reply_for_gaierror(got.errno) if isinstance(got, socket.gaierror) else socks.GENERAL_FAILURE
            self._socks_fail(conn, code, "target_unresolved", f"refused: SOCKS5 target {conn.target}: {why}")
            return
        self._socks_connect(conn, got)

    def _socks_connect(self, conn: _Conn, addrs: list[Any]) -> None:
        """Connect to the target's addresses that the policy allows, in order."""
        from . import socks

        policy = conn.routes.socks
        assert policy is not None
        allowed = [
            ai for ai in addrs
            if ai[0] in (socket.AF_INET, socket.AF_INET6)
            and (policy.targets is None or policy.targets.permits(ai[4][0]))
            and not loops_back(self.address, ai[4])
        ]
        if not allowed:
            rule = policy.targets.describe() if policy.targets is not None else "the proxy itself"
            self._socks_fail(conn, socks.NOT_ALLOWED, "target_not_allowed",
                             f"refused: SOCKS5 target {conn.target} is not allowed ({rule})")
            return
        backend = conn.routes.default.backends[0]  # SOCKS targets: every target's counters
        backend.live += 1
        conn.order = [backend]
        conn.bi = 0
        conn.backend = backend
        conn.addrs = tuple(allowed)
        conn.ai = 0
        self._start_connect(conn)

    # -- admitting, routing and connecting ---------------------------------------------
    def _admit(self, conn: _Conn, server_name: str | None = None) -> None:
        """Check the client against the access list and the per-client limit, then route it."""
        if not self._client_admitted(conn):
            return
        routes = conn.routes
        conn.order = routes.order(conn.ip, server_name)
        if routes.send_proxy:
            header = self._proxy_header(conn)
            conn.prefix = header + conn.prefix if conn.prefix else header
        self._route(conn)

    def _client_admitted(self, conn: _Conn) -> bool:
        """Whether the access list and the per-client limit let ``conn`` in (counted then);
        refused otherwise."""
        routes = conn.routes
        ip = conn.ip
        if routes.acl and not routes.acl.permits(ip):
            self._refuse_by_acl(conn)
            return False
        if routes.max_per_client:
            n = self._per_client.get(ip, 0)
            if n >= routes.max_per_client:
                self._refuse(conn, "client_limit", f"refused: {ip} has {n} connections already (the limit)", logging.INFO)
                return False
            self._per_client[ip] = n + 1
            conn.counted = True
        return True

    def _refuse_by_acl(self, conn: _Conn) -> None:
        acl = conn.routes.acl
        self._refuse(conn, "access_list", f"refused: {conn.ip} is not allowed ({acl.describe()})", logging.INFO)

    def _proxy_header(self, conn: _Conn) -> bytes:
        """The PROXY header to send upstream: the client's address and the one it connected
        to (as a received header gave them, else as the sockets say)."""
        from . import proxyproto
        got = conn.header
        if got is not None and not got.local and got.source is not None and got.dest is not None:
            source, dest = got.source, got.dest
        else:
            assert conn.client is not None
            source = (conn.addr[0], conn.addr[1])
            dest = conn.client.getsockname()[:2]
        source, dest = _same_family(source, dest)
        if conn.routes.send_proxy == "v1":
            return proxyproto.encode_v1(source, dest)
        return proxyproto.encode_v2(source, dest)

    def _route(self, conn: _Conn) -> None:
        if not conn.order:
            self._refuse(conn, "no_backend", "refused: no backend is up")
            return
        if self._next_backend(conn):
            self._start_connect(conn)
        else:
            self._connect_failed(conn)

    def _next_backend(self, conn: _Conn) -> bool:
        """Move ``conn`` on to the next backend of its order that has an address; False
        when none is left. (``conn`` may be anything with a connection's routing slots,
        ``order``, ``bi``, ``backend``, ``addrs``, ``ai`` and ``errors``: the HTTP server's
        sessions use it for each new upstream connection.)"""
        while True:
            backend = conn.backend
            if backend is not None:
                backend.live -= 1
                backend.failures += 1
                conn.backend = None
            conn.bi += 1
            if conn.bi >= len(conn.order):
                return False
            backend = conn.order[conn.bi]
            addrs = backend.addresses
            if not addrs:
                self._note(conn, f"{backend.name}: no address (its name did not resolve)")
                continue
            backend.live += 1
            conn.backend = backend
            conn.addrs = addrs
            conn.ai = 0
            return True

    def _start_connect(self, conn: _Conn) -> None:
        """Connect ``conn`` to its next address, or its next backend's, that does not fail at once."""
        while True:
            addrs = conn.addrs
            while conn.ai < len(addrs):
                family, type_, proto, _, addr = addrs[conn.ai]
                try:
                    up = socket.socket(family, type_ | _NONBLOCK, proto)
                except OSError as exc:
                    self._refuse(conn, "not_proxied", f"no socket for upstream ({exc.strerror}); closed")
                    self._release_backend(conn)
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        self._paused_until = time.monotonic() + EMFILE_BACKOFF
                    return
                if not _NONBLOCK:
                    up.setblocking(False)
                if self.nodelay:
                    _set_nodelay(up)
                err = up.connect_ex(addr)
                conn.upstream = up
                if err in (0, errno.EISCONN):
                    self._connect_done(conn)
                    return
                if err in (errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
                    if _is_loopback(addr[0]) and _connected_now(up):
                        # On loopback the handshake is done inside connect(): no wait for it
                        # (a connect still in progress, or failed, is waited for below).
                        self._connect_done(conn)
                        return
                    conn.stage = _CONNECT
                    self._wait_upstream(conn, up)
                    return
                up.close()
                conn.upstream = None
                self._note_failure(conn, OSError(err, os.strerror(err)))
            if not self._next_backend(conn):
                self._connect_failed(conn)
                return

    def _wait_upstream(self, conn: _Conn, up: socket.socket) -> None:
        """Wait (at most connect_timeout) for ``up`` to be writable: connected, or room to
        send the rest of the prefix."""
        conn.deadline = time.monotonic() + self.connect_timeout
        self._connecting[up.fileno()] = conn
        self._sel.register(up, selectors.EVENT_WRITE, conn)
        self._deadlines.append((conn.deadline, conn, up))

    def _note_failure(self, conn: _Conn, exc: OSError) -> None:
        """Record that the current address failed; move ``conn`` on to the next one."""
        conn.err = exc.errno or 0
        addrs = conn.addrs
        addr = format_addr(addrs[conn.ai][4])
        reason = exc.strerror or str(exc)
        several = len(addrs) > 1 or len(conn.order) > 1
        self._note(conn, f"{addr}: {reason}" if several else reason)
        conn.ai += 1
        if conn.ai < len(addrs):
            log.debug(
                "conn %d %s: upstream %s: %s; trying %s",
                conn.id,
                conn.peer,
                addr,
                reason,
                format_addr(addrs[conn.ai][4]),
            )

    def _drop_attempt(self, conn: _Conn) -> None:
        """Close the upstream socket of ``conn``'s connect in progress."""
        up = conn.upstream
        assert up is not None
        self._stop_waiting(conn, up)
        up.close()
        conn.upstream = None

    def _stop_waiting(self, conn: _Conn, up: socket.socket) -> None:
        """``up`` is no longer waited on for writing (connected, prefix sent, or given up)."""
        self._sel.unregister(up)
        del self._connecting[up.fileno()]
        conn.deadline = 0.0

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
        self._stop_waiting(conn, up)
        self._connect_done(conn)

    def _connect_done(self, conn: _Conn) -> None:
        if conn.socks and not self._socks_succeeded(conn):
            return
        if conn.prefix is None:
            self._hand_over(conn)
        else:
            self._send_prefix(conn)

    def _socks_succeeded(self, conn: _Conn) -> bool:
        """Tell a SOCKS5 client its target is connected (with the address the proxy connected
        from, as RFC 1928 asks); False, all closed, if the reply cannot go."""
        from . import socks

        up = conn.upstream
        assert up is not None
        conn.socks = 0  # answered: a failure from here on is not the target's
        if self._socks_send(conn, socks.encode_reply(socks.SUCCEEDED, up.getsockname())):
            return True
        up.close()
        conn.upstream = None
        self._release_backend(conn)
        return False

    def _send_prefix(self, conn: _Conn) -> None:
        """Send the PROXY header and the bytes read from the client, before any other byte."""
        up = conn.upstream
        prefix = conn.prefix
        assert up is not None and prefix is not None
        try:
            sent = up.send(prefix, MSG_NOSIGNAL)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            if conn.stage == _PREFIX:
                self._drop_attempt(conn)
            else:
                up.close()
                conn.upstream = None
            self._note_failure(conn, exc)
            self._start_connect(conn)
            return
        if sent < len(prefix):
            conn.prefix = prefix[sent:]
            if conn.stage != _PREFIX:
                conn.stage = _PREFIX
                self._wait_upstream(conn, up)
            return
        conn.prefix = None
        if conn.stage == _PREFIX:
            self._stop_waiting(conn, up)
        self._hand_over(conn)

    def _cancel(self, conn: _Conn) -> None:
        """Give up a connect in progress (shutting down)."""
        self._drop_attempt(conn)
        self._note(conn, "shutting down")
        self._release_backend(conn)
        self._connect_failed(conn)

    @staticmethod
    def _note(conn: _Conn, error: str) -> None:
        """Remember why an address failed (the list is made on the first failure: most
        connections never need one)."""
        if conn.errors is None:
            conn.errors = []
        conn.errors.append(error)

    def _connect_failed(self, conn: _Conn) -> None:
        """Every backend failed (or the server stops): close the client, count, log."""
        conn.deadline = 0.0
        conn.stage = 0
        if conn.socks:  # the SOCKS5 reply says why, as RFC 1928 codes it (if the client takes it)
            from . import socks

            self._socks_reply(conn, socks.encode_reply(socks.reply_for_errno(conn.err)))
        self._release_client(conn)
        self.counters.failed_connects += 1
        log.warning(
            "conn %d %s -> %s: upstream connect failed: %s; client closed",
            conn.id,
            conn.peer,
            conn.target or ", ".join(b.name for b in conn.order) or "-",
            "; ".join(conn.errors or ()),
        )

    def _hand_over(self, conn: _Conn) -> None:
        client, up = conn.client, conn.upstream
        assert client is not None and up is not None
        conn.client = conn.upstream = None
        conn.deadline = 0.0
        conn.stage = 0
        # The pool takes the bare fds (it owns them from here): no socket object
        # per connection stays alive while it is proxied. It need not probe them: this
        # loop made both (proxy_accepted), and both are non-blocking.
        if client.gettimeout() != 0.0:
            client.setblocking(False)
        a, b = client.detach(), up.detach()
        try:
            relay = self.pool.proxy_accepted(a, b, self._family, conn.peer, conn.addrs[conn.ai][4],
                                             idle=self.idle, wake=not self._burst)
        except (OSError, RuntimeError) as exc:
            os.close(a)
            os.close(b)
            self._release_backend(conn)
            why = _name_sides(str(exc))
            if _CLIENT_GONE.search(why):  # it closed or reset first: a balancer's health check, say
                self._refuse(conn, "closed_early", f"not proxied: {why}", logging.DEBUG)
            else:
                self._refuse(conn, "not_proxied", f"not proxied: {why}")
            return
        backend = conn.backend
        assert backend is not None
        backend.connections += 1
        live = _Live(conn, relay, backend)
        with self._live_lock:
            self._live[conn.id] = live
            self.counters.live += 1
        relay.add_done_callback(live)

    def _log_finished(self, conn: _Live) -> None:
        relay = conn.relay
        backend = conn.backend
        c = self.counters
        # up: every byte of the client's written upstream, those read with its head included
        # (a PROXY header, received or sent, is not the client's and is not counted).
        up, down = relay.forward.transferred + conn.ahead, relay.reverse.transferred
        with self._live_lock:  # from live to finished at once: stats() never counts it twice
            del self._live[conn.id]
            c.live -= 1
            c.finished += 1
            c.bytes_up += up
            c.bytes_down += down
            backend.live -= 1
            backend.bytes_up += up
            backend.bytes_down += down
        if conn.counted_ip is not None:
            self._uncount(conn.counted_ip)
        reason = relay.reason.name if relay.reason else "?"
        c.reasons[reason] = c.reasons.get(reason, 0) + 1
        error = f" error={relay.error.strerror}" if relay.error is not None else ""
        log.info(
            "conn %d %s -> %s up=%d down=%d duration=%.3fs reason=%s%s",
            conn.id,
            conn.peer,
            format_addr(conn.sockaddr),
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

    # -- reloading -------------------------------------------------------------------
    def _reload_step(self) -> None:
        """Start the reloader thread when asked; apply what reload threads made."""
        if self._reload_requested and not self._reloading:
            self._reload_requested = False
            if self.reloader is None:
                log.warning("reload: no --config file to read again; ignored")
            else:
                self._reloading = True
                threading.Thread(target=self._make_routes, name="splicepool-reload", daemon=True).start()
        while self._reloads:
            made = self._reloads.popleft()
            if isinstance(made, str):
                log.error("reload failed, keeping the running configuration: %s", made)
                continue
            routes, settings = made
            looping = self.loops_back(routes)
            if looping is not None:
                log.error("reload failed, keeping the running configuration: %s is this proxy's "
                          "own listening address", looping)
                continue
            self._stop_upkeep()
            if not routes.health_check:
                for backend in routes.backends:
                    backend.up = True  # no checks say otherwise any more
            self.routes = routes
            for name in ("idle", "connect_timeout", "max_conns"):
                if name in settings:
                    setattr(self, name, settings[name])
            if "log_level" in settings:
                logging.getLogger().setLevel(settings["log_level"])
            self.counters.reloads += 1
            if not self._stopping:
                self._start_upkeep()
            log.info("reloaded: proxying to %s", routes.describe())

    def _make_routes(self) -> None:
        """The reloader, in a thread of its own (it may resolve names): post its result."""
        assert self.reloader is not None
        try:
            self._reloads.append(self.reloader(self.routes))
        except (OSError, ValueError) as exc:
            self._reloads.append(str(exc))
        except Exception as exc:  # a bug in the reloader must not end the proxy
            log.exception("reloader failed")
            self._reloads.append(f"{type(exc).__name__}: {exc}")
        # Done before the wakeup: a SIGHUP that came meanwhile starts its reload on that
        # wakeup (a thread still alive then left it waiting for some other event).
        self._reloading = False
        self._wake()

    def _start_upkeep(self) -> None:
        """Start the health checks and the re-resolution the routes ask for."""
        routes = self.routes
        if routes.health_check:
            self._checker = HealthChecker(
                routes.backends,
                interval=routes.health_check,
                rise=routes.rise,
                fall=routes.fall,
                timeout=min(routes.health_check, self.connect_timeout, 5.0),
            )
            self._checker.start()
        if routes.resolve_every:
            self._resolver = Resolver(routes.backends, routes.resolve_every)
            self._resolver.start()

    def _stop_upkeep(self) -> None:
        if self._checker is not None:
            self._checker.stop()
            self._checker = None
        if self._resolver is not None:
            self._resolver.stop()
            self._resolver = None

    # -- stopping ------------------------------------------------------------------
    def _begin_stop(self) -> None:
        self._stopping = True
        self._set_accepting(False)
        self.listener.close()
        self._stop_upkeep()
        self._drop_pending()

    def _drop_pending(self) -> None:
        """Close the connections not proxied yet: heads being read, connects in progress."""
        for conn in [*self._reading.values(), *self._resolving.values()]:  # a head, a SOCKS5 lookup
            self._refuse(conn, "shutting_down", "closed unproxied: the proxy is stopping", logging.INFO)
        for conn in list(self._connecting.values()):
            self._cancel(conn)

    def _shutdown(self) -> None:
        self._stop_upkeep()
        self._drop_pending()
        if self._lookups is not None:  # a lookup in progress ends on its own; nobody waits
            self._lookups.shutdown(wait=False, cancel_futures=True)
            self._lookups = None
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
        routes = self.routes
        backends = {id(b): b.stats() for b in routes.backends}
        for entry in backends.values():
            entry["live_bytes_up"] = entry["live_bytes_down"] = 0
        live_up = live_down = 0
        # The live set and the finished counts are taken together, under the lock that moves
        # a connection from one to the other; its bytes are read after, outside it (the loop,
        # on a worker with on_worker, waits for this lock at each hand-over and log line). A
        # connection that ends meanwhile is still counted here as live, with all it moved:
        # never in both, never in neither.
        with self._live_lock:
            lives = list(self._live.values())
            bytes_up, bytes_down, live, finished = c.bytes_up, c.bytes_down, c.live, c.finished
        for conn in lives:
            relay, backend = conn.relay, conn.backend
            up, down = relay.forward.transferred + conn.ahead, relay.reverse.transferred
            live_up += up
            live_down += down
            entry = backends.get(id(backend))
            if entry is None:  # a backend a reload took out, with connections still live
                entry = backends[id(backend)] = backend.stats()
                entry["live_bytes_up"] = entry["live_bytes_down"] = 0
                entry["retired"] = True
            entry["live_bytes_up"] += up
            entry["live_bytes_down"] += down
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
                "refusals": dict(c.refusals),
                "reading_head": len(self._reading),
                "reloads": c.reloads,
            },
            "backends": list(backends.values()),
            "routes": routes.options(),
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
        metric(
            "connections_refused_by_reason_total",
            "counter",
            "Accepted connections closed unproxied, by why.",
            [(f'{{reason="{r}"}}', n) for r, n in sorted(conns["refusals"].items())],
        )
        backends = st["backends"]

        def per_backend(key: str) -> list[tuple[str, float]]:
            return [(f'{{backend="{b["name"]}"}}', b[key]) for b in backends]

        metric("backend_up", "gauge", "Whether each backend is up (1) or down (0).",
               [(f'{{backend="{b["name"]}"}}', int(b["up"])) for b in backends])
        metric("backend_connections_live", "gauge", "Connections to each backend now.", per_backend("live"))
        metric("backend_connections_total", "counter", "Connections each backend has taken.",
               per_backend("connections"))
        metric("backend_connect_failures_total", "counter",
               "Connects to each backend that failed (every address).", per_backend("failures"))
        metric("backend_checks_failed_total", "counter", "Failed health checks of each backend.",
               per_backend("checks_failed"))
        metric(
            "backend_bytes_total",
            "counter",
            "Bytes moved by each backend's connections, finished and live, by direction.",
            [
                (f'{{backend="{b["name"]}",direction="{d}"}}', b[f"bytes_{d}"] + b[f"live_bytes_{d}"])
                for b in backends
                for d in ("up", "down")
            ],
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


def _same_family(source: tuple[str, int], dest: tuple[str, int]) -> tuple[tuple[str, int], tuple[str, int]]:
    """A PROXY header's two addresses in one family: IPv4-mapped IPv6 addresses as IPv4,
    and, when one is IPv6 and the other IPv4 still, the IPv4 one mapped into IPv6."""
    src, dst = (_plain_ip(source[0]), source[1]), (_plain_ip(dest[0]), dest[1])
    if (":" in src[0]) != (":" in dst[0]):
        if ":" in src[0]:
            dst = ("::ffff:" + dst[0], dst[1])
        else:
            src = ("::ffff:" + src[0], src[1])
    return src, dst


_NONBLOCK = getattr(socket, "SOCK_NONBLOCK", 0)  # a socket made non-blocking: no second syscall


def _set_nodelay(sock: socket.socket) -> bool:
    """TCP_NODELAY on ``sock``; False where it cannot be set (not TCP)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        return False
    return True


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host == "::1" or host.startswith("::ffff:127.")


def _connected_now(sock: socket.socket) -> bool:
    """Whether a connect that said "in progress" has completed already."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


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
    for info in socket.getaddrinfo(lookup_host(address[0]), address[1], type=socket.SOCK_STREAM):
        if info[4] not in seen:
            seen.add(info[4])
            infos.append(info)
    return infos


def _listen(address: tuple[str, int], reuse_port: bool, backlog: int) -> socket.socket:
    host, port = address
    info = socket.getaddrinfo(lookup_host(host), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
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
