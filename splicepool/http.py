"""HttpProxyServer: the HTTP/1.1 reverse proxy behind ``python -m splicepool http``.

Heads in Python, bodies in the kernel, the way OpenBSD's relayd uses ``SO_SPLICE``: the
server's loop reads and parses each request and response head (``splicepool.http1``, with
h11), rewrites it for the next hop and writes it; a body then moves with
``pool.splice(src, dst, max=its length)`` and never enters Python. When the splice ends with
``MAX`` the loop has the socket back, at the first byte of the next message, and reads the
next head. A chunked body is walked chunk by chunk: the chunk-size lines, the CRLF after
each chunk's data and the trailers are read in Python; each chunk's data is spliced with
``max`` = its size. Bytes that came in with a head (the start of a body, small chunks that
arrived whole) are written from Python, and only the rest is spliced: a small body costs
no splice at all.

One session per client connection, with two legs: the request leg (the client's read side,
the upstream's write side) and the response leg (the upstream's read side, the client's
write side). They run at the same time, so a response that comes before its request body is
over (an early error, a 100 Continue) is forwarded at once. Requests are answered in order:
the next request head is parsed once the exchange before it is over (pipelined requests
wait in the session's buffer, where one read made while a request is upstream puts them, or
unread in the client's socket).

Keep-alive on both legs: a client connection carries requests until either side says
``Connection: close`` (or HTTP/1.0 without keep-alive) or a response is close-delimited. The
session keeps its upstream connection between requests, and when the client goes, an
upstream connection that can carry another request waits in an idle list of its backend
(at most ``max_idle`` per backend, ``upstream_idle`` seconds) for the next session. A
request without a body that finds its reused upstream connection closed before any byte of
the response is sent again once on a new connection.

What the client gets when something fails: 400 (431, 501, 505) for a request head that
``http1`` refuses, 405 for CONNECT (a reverse proxy is no tunnel), 502 when no backend
connects or the upstream's response head is malformed or missing, 503 when every backend is
down, 504 when the response head does not come within ``response_timeout`` (or every
connect timed out), and 408 for a request head that does not come whole within the head
timeout. A body that ends early, on either leg, ends both connections, and the client gets a
RST rather than a FIN that could pass for a complete response.

``Upgrade`` (WebSocket): after a 101 the two sockets are one ``pool.proxy()``.
"""

from __future__ import annotations

import errno
import heapq
import logging
import os
import selectors
import socket
import time
from collections import deque

from . import http1
from ._sockets import MSG_NOSIGNAL, reset_on_close
from .http1 import HttpError
from .routes import Routes
from .server import ProxyServer, format_addr, printable
from .state import EndReason

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from .backends import Backend
    from .relay import Proxy
    from .splice import Splice

__all__ = ["HttpProxyServer", "LINGER"]

log = logging.getLogger("splicepool.proxy")

_R, _W = selectors.EVENT_READ, selectors.EVENT_WRITE
READ_SIZE = 65536  # one recv of a head (and what came with it)
LINGER = 2.0  # seconds a closing client may still send (read and dropped) before the close
EARLY = 0.05  # seconds a response may wait for the end of its request's body splice

# What a leg is doing.
_IDLE, _HEAD, _LENGTH, _LINE, _DATA, _END, _TRAILERS, _CLOSE, _DONE = range(9)
# Body kinds (http1.Body.kind) -> the state a leg starts its body in.
_BODY_STATE = {"none": _DONE, "length": _LENGTH, "chunked": _LINE, "close": _CLOSE}


class _Leg:
    """One direction of a session: ``src``'s read side and ``dst``'s write side."""

    __slots__ = ("session", "src", "dst", "inbuf", "out", "state", "left", "dechunk", "splice",
                 "rwait", "wwait", "eof", "moved")

    def __init__(self, session: _Session, src: socket.socket | None) -> None:
        self.session = session
        self.src = src
        self.dst: socket.socket | None = None
        self.inbuf = bytearray()  # read from src, not yet taken
        self.out = bytearray()  # to write to dst before anything else
        self.state = _IDLE
        self.left = 0  # bytes of the body (_LENGTH) or chunk (_DATA) still to move
        self.dechunk = False  # an HTTP/1.0 client: pass a chunked body's data only
        self.splice: Splice | None = None
        self.rwait = False  # src said EAGAIN: wait for it to be readable
        self.wwait = False  # dst said EAGAIN: wait for it to be writable
        self.eof = False  # src reached EOF
        self.moved = 0  # bytes written to dst in this exchange (heads, bodies, spliced)

    def __call__(self, sp: Splice) -> None:
        """The splice's done callback (a worker thread): queue it for the loop."""
        self.session.server.splice_ended(self, sp)


class _Session:
    """One client connection and the upstream connection it uses now."""

    stage = -1  # no stage of a connection being routed: the loop hands its events to _ready

    __slots__ = ("server", "id", "peer", "ip", "counted", "routes", "client", "cfd", "up", "ufd",
                 "rq", "rs", "backend", "sockaddr", "reused", "req", "resp", "keep", "up_keep",
                 "started", "t0", "requests", "deadline", "waiting", "cmask", "umask", "closed",
                 "replay", "lingering", "upgrade", "tunnel", "order", "bi", "addrs", "ai",
                 "connecting", "errors", "timed_out", "ending", "status", "error", "reason", "logged", "early",
                 "idle_since", "timer")

    def __init__(self, server: HttpProxyServer, id: int, client: socket.socket, peer: str, ip: str,
                 routes: Routes) -> None:
        self.server = server
        self.id = id
        self.peer = peer
        self.ip = ip
        self.counted = False
        self.routes = routes
        self.client: socket.socket | None = client
        self.cfd = client.fileno()
        self.up: socket.socket | None = None
        self.ufd = -1
        self.rq = _Leg(self, client)  # client -> upstream
        self.rs = _Leg(self, None)  # upstream -> client
        self.rs.dst = client
        self.backend: Backend | None = None
        self.sockaddr: Any = None
        self.reused = False  # the upstream connection carried an earlier request
        self.req: http1.RequestHead | None = None  # the request of the exchange in progress
        self.resp: http1.ResponseHead | None = None  # its final response
        self.keep = False  # the client connection carries another request after this one
        self.up_keep = False  # and the upstream connection does
        self.started = time.monotonic()
        self.t0 = 0.0  # when the exchange's request head was whole
        self.requests = 0
        self.deadline = 0.0
        self.waiting = ""  # what the deadline is for
        self.cmask = self.umask = 0  # what the selector watches on each socket
        self.closed = False
        self.replay: bytes | None = None  # a bodiless request's head, until a response byte
        self.lingering = False
        self.upgrade = False  # the request asks to upgrade
        self.tunnel: Proxy | None = None  # after a 101: the relay of the two sockets
        self.order: list[Backend] = []  # connecting: the backends to try
        self.bi = -1
        self.addrs: tuple[Any, ...] = ()
        self.ai = 0
        self.connecting = False
        self.errors: list[str] = []
        self.timed_out = False  # a connect attempt timed out (504 rather than 502)
        self.ending = ""  # closing once the splices have ended: "close" (graceful) or "abort"
        self.status = 0  # of the exchange's final response (or the error answered)
        self.error = ""  # why the exchange failed, for its log line
        self.reason = "client_closed"  # how the session ended, counted in /stats
        self.logged = False  # the exchange in progress has had its log line
        self.early = False  # its final response came before its request's end, for sure
        self.idle_since = 0.0  # when the upstream connection held between requests went idle
        self.timer = 0.0  # when the session's entry in the server's heap of deadlines is due


class _Idle:
    """An idle upstream connection waiting in its backend's list for another session."""

    stage = -1
    __slots__ = ("sock", "backend", "sockaddr", "since")

    def __init__(self, sock: socket.socket, backend: Backend, sockaddr: Any, since: float) -> None:
        self.sock = sock
        self.backend = backend
        self.sockaddr = sockaddr
        self.since = since


class HttpProxyServer(ProxyServer):
    """An HTTP/1.1 reverse proxy: accept on ``listen``, forward each request to a backend of
    ``connect`` (one ``(host, port)``, a list, or a ``Routes`` without SNI routes, PROXY
    headers to send or SOCKS5), splice the bodies. The module docstring says how.

    ``keepalive_timeout``: how long a client connection may wait between requests.
    ``response_timeout``: how long the upstream has to start its response once the request
    is sent (and any one write of a head may wait). ``proto``: the X-Forwarded-Proto (and
    Forwarded proto=) to send. ``max_idle``: idle upstream connections kept per backend;
    ``upstream_idle``: how long one may be idle (kept for another client, or held by its client
    between requests) before it is closed rather than used: keep it below the backends' own
    keep-alive timeout, so that they never close a connection as a request leaves on it.
    ``idle`` (as for ``ProxyServer``) bounds each body splice and tunnel. The rest: as for
    ``ProxyServer`` (``on_finished`` is not called: each request is logged instead).
    ``ImportError`` without h11 (``pip install 'splicepool[http]'``).
    """

    def __init__(self, listen: tuple[str, int], connect: Any, *, keepalive_timeout: float = 60.0,
                 response_timeout: float = 60.0, proto: str = "http", max_idle: int = 32,
                 upstream_idle: float = 4.0,
                 **kwargs: Any) -> None:
        http1.parse_request_head(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # h11 there? ImportError now
        for name, value in (("keepalive_timeout", keepalive_timeout), ("response_timeout", response_timeout),
                            ("upstream_idle", upstream_idle)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, not {value}")
        if max_idle < 0:
            raise ValueError(f"max_idle must be >= 0, not {max_idle}")
        if isinstance(connect, Routes):
            self.check_routes(connect)
        super().__init__(listen, connect, **kwargs)
        self.keepalive_timeout = keepalive_timeout
        self.response_timeout = response_timeout
        self.proto = proto
        self.max_idle = max_idle
        self.upstream_idle = upstream_idle
        self.host_default = format_addr(self.address)  # for an HTTP/1.0 request without Host
        self._sessions: dict[int, _Session] = {}
        self._idle_up: dict[Backend, list[_Idle]] = {}
        self._spliced: deque[tuple[_Leg, Splice]] = deque()  # from workers' done callbacks
        self._tunnels: deque[_Session] = deque()
        self._timers: list[tuple[float, int, _Session]] = []  # a heap: (deadline, seq, session)
        self._next_purge = 0.0
        self._seq = 0
        self.requests = 0
        self.statuses: dict[str, int] = {}  # "2xx" ... "5xx": responses the clients got
        self.reused = 0  # requests sent on an upstream connection that carried one before
        self.retried = 0

    @staticmethod
    def check_routes(routes: Routes) -> None:
        """ValueError for what an HTTP front door cannot do."""
        if routes.socks is not None or routes.routes_by_name or routes.send_proxy:
            raise ValueError("an HTTP proxy takes --connect backends only: no --sni, no --send-proxy")

    def reload(self, routes: Routes, **settings: Any) -> None:
        self.check_routes(routes)
        super().reload(routes, **settings)

    # -- from the accept loop ------------------------------------------------------------
    def _route(self, conn: Any) -> None:
        """An admitted client: a session of its own from now on."""
        client = conn.client
        conn.client = None
        client.setblocking(False)
        s = _Session(self, conn.id, client, conn.peer, conn.ip, conn.routes)
        s.counted, conn.counted = conn.counted, False
        s.order = list(conn.order)  # asked of the balance at accept: for the first request
        if conn.prefix:  # read along with a PROXY header: the start of the first request
            s.rq.inbuf += conn.prefix
        with self._live_lock:
            self.counters.live += 1
        self._sessions[s.id] = s
        try:
            self._await_request(s)
            self._step(s)
        except Exception:
            self._crashed(s)

    def _ready(self, data: Any, fd: int, mask: int) -> None:
        if type(data) is _Idle:
            self._drop_idle(data)
            return
        if data.closed or data.tunnel is not None:
            return
        try:
            self._session_ready(data, fd, mask)
        except Exception:
            self._crashed(data)

    def _crashed(self, s: _Session) -> None:
        """A bug met in ``s``'s steps: log it, end that session alone (the others go on)."""
        log.exception("conn %d %s: internal error; closing it", s.id, s.peer)
        s.reason = "internal_error"
        try:
            self._close(s, rst=True)
        except Exception:
            log.exception("conn %d: closing it failed too", s.id)

    def _session_ready(self, s: _Session, fd: int, mask: int) -> None:
        if fd == s.cfd:
            if mask & _R:
                s.rq.rwait = False
                if s.lingering:
                    self._linger_read(s)
                    return
                if s.rq.state == _DONE:  # the request is upstream: what comes next is read ahead
                    self._read_ahead(s)
            if mask & _W:
                s.rs.wwait = False
        else:
            if s.connecting:
                self._connect_ready(s)
                return
            if mask & _R:
                s.rs.rwait = False
                if s.rs.state == _IDLE:  # EOF (or stray bytes) on a kept upstream connection
                    self._close_up(s)
            if mask & _W:
                s.rq.wwait = False
        self._step(s)

    def splice_ended(self, leg: _Leg, sp: Splice) -> None:
        """A body splice ended (any thread): the loop takes it from here."""
        self._spliced.append((leg, sp))
        self._wake()

    def _run_once(self, events: list[tuple[selectors.SelectorKey, int]]) -> None:
        super()._run_once(events)
        spliced = self._spliced
        while spliced:
            leg, sp = spliced.popleft()
            try:
                self._splice_done(leg, sp)
            except Exception:
                self._crashed(leg.session)
        while self._tunnels:
            self._tunnel_done(self._tunnels.popleft())
        now = time.monotonic()
        timers = self._timers
        while timers and timers[0][0] <= now:
            when, _, s = heapq.heappop(timers)
            if when != s.timer or s.closed:
                continue  # an earlier entry of the session's took its place
            s.timer = 0.0
            if not s.deadline:
                continue  # cleared
            if s.deadline > now:  # moved later since: one entry again, at the new time
                self._push_timer(s, s.deadline)
                continue
            s.deadline = 0.0
            try:
                self._timed_out(s)
            except Exception:
                self._crashed(s)
        if self._next_purge and now >= self._next_purge:
            self._purge_idle(now)
        self._set_accepting(not self._stopping and not self._paused_until and not self._full())

    def _timeout(self, now: float, drain_until: float | None) -> float | None:
        timeout = super()._timeout(now, drain_until)
        if self._timers:
            left = max(0.0, self._timers[0][0] - now)
            timeout = left if timeout is None else min(timeout, left)
        if self._next_purge:  # 0: no idle upstream connection to time out
            left = max(0.0, self._next_purge - now)
            timeout = left if timeout is None else min(timeout, left)
        return timeout

    # -- a session's steps ---------------------------------------------------------------
    def _step(self, s: _Session) -> None:
        """Move ``s`` on as far as it goes without waiting, then watch what it waits for."""
        while not s.closed and s.tunnel is None:
            did = self._pump(s, s.rq)
            if s.closed:
                return
            did = self._pump(s, s.rs) or did
            if s.closed:
                return
            if self._exchange_step(s):
                continue
            if not did:
                break
        if not s.closed and s.tunnel is None:
            self._settle(s)

    def _pump(self, s: _Session, leg: _Leg) -> bool:
        """Move ``leg`` on: walk its head or body as far as the bytes in hand go, then write
        what that gave (one write for a head and the body bytes that came with it), then
        read or splice. True if anything moved."""
        did = False
        while not s.closed:
            if leg.splice is not None or s.ending:
                return did
            state = leg.state
            if state == _LENGTH or state == _DATA or state == _CLOSE:
                inbuf = leg.inbuf
                if inbuf:
                    n = len(inbuf) if state == _CLOSE else min(len(inbuf), leg.left)
                    leg.out += inbuf[:n]
                    del inbuf[:n]
                    if state != _CLOSE:
                        leg.left -= n
                        if not leg.left:
                            leg.state = _DONE if state == _LENGTH else _END
                    did = True
                elif state == _CLOSE and leg.eof:
                    leg.state = _DONE
                    did = True
                elif leg.out:  # written before the splice: the bytes keep their order
                    if not self._flush_out(s, leg):
                        return did
                    did = True
                elif leg.dst is None:
                    return did
                else:
                    self._start_splice(s, leg)
                    return True
            elif state == _HEAD:
                if not leg.inbuf and not leg.out and (leg.rwait or leg.src is None):
                    return did  # nothing to parse, and nothing to read before the source says so
                if leg is s.rq:
                    took = self._request_head(s)
                else:
                    took = self._response_head(s)
                if not took:
                    return did
                did = True
            elif state == _LINE:
                chunk = self._body_part(s, leg, http1.parse_chunk_line)
                if chunk is None:
                    return did
                if chunk is _MORE:
                    continue
                del leg.inbuf[: chunk.length]
                if not leg.dechunk:
                    leg.out += http1.encode_chunk_line(chunk.size)
                if chunk.size:
                    leg.state, leg.left = _DATA, chunk.size
                else:
                    leg.state = _TRAILERS
                did = True
            elif state == _END or state == _TRAILERS:
                n = self._body_part(s, leg, _chunk_end if state == _END else http1.parse_trailers)
                if n is None:
                    return did
                if n is _MORE:
                    continue
                if not leg.dechunk:
                    leg.out += http1.CHUNK_END if state == _END else leg.inbuf[:n]
                del leg.inbuf[:n]
                leg.state = _LINE if state == _END else _DONE
                did = True
            else:  # _IDLE, _DONE: what is left to write
                if leg.out and self._flush_out(s, leg):
                    did = True
                return did
        return did

    def _body_part(self, s: _Session, leg: _Leg, parse: Any) -> Any:
        """``parse(leg.inbuf)`` (a chunk line, a chunk's CRLF, the trailers): what it gives;
        ``_MORE`` when more bytes came in (parse again); None to stop here (waiting for
        bytes, or the session ended on a malformed body)."""
        try:
            got = parse(leg.inbuf)
        except HttpError as exc:
            self._bad_body(s, leg, str(exc))
            return None
        if got is None:
            return _MORE if self._more(s, leg) else None
        return got

    def _flush_out(self, s: _Session, leg: _Leg) -> bool:
        """Write ``leg.out`` if its destination can take it now; True once it is all written."""
        if leg.dst is None or leg.wwait:
            return False
        return self._flush(s, leg)

    def _more(self, s: _Session, leg: _Leg) -> bool:
        """More input is needed: first write what is pending (the peer may be waiting for it
        before it sends more), then read; True if bytes came."""
        if leg.out and not self._flush_out(s, leg):
            return False
        return self._fill(s, leg)

    def _fill(self, s: _Session, leg: _Leg) -> bool:
        """Read what ``leg``'s source has; False when there is nothing now (or it ended)."""
        if leg.rwait or leg.src is None:
            return False
        try:
            data = leg.src.recv(READ_SIZE)
        except BlockingIOError:
            leg.rwait = True
            return False
        except OSError as exc:
            self._src_ended(s, leg, exc.strerror or str(exc))
            return False
        if not data:
            leg.eof = True
            if leg.state == _CLOSE:
                return True
            self._src_ended(s, leg, "")
            return False
        leg.inbuf += data
        return True

    @staticmethod
    def _read_ahead(s: _Session) -> None:
        """The client sent on while its request is upstream (the loop keeps watching it
        between requests, rather than unwatch and watch again each time): read that once (the
        next request, its FIN) and stop watching until the exchange is over. A reset client
        counts as one that closed: writing the response to it says the rest."""
        rq = s.rq
        src = rq.src
        assert src is not None
        try:
            data = src.recv(READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            rq.inbuf += data
        else:
            rq.eof = True

    def _flush(self, s: _Session, leg: _Leg) -> bool:
        """Write ``leg.out``; True once all of it is written."""
        dst = leg.dst
        assert dst is not None
        try:
            sent = dst.send(leg.out, MSG_NOSIGNAL)
        except BlockingIOError:
            leg.wwait = True
            return False
        except OSError as exc:
            self._dst_failed(s, leg, exc)
            return False
        leg.moved += sent
        del leg.out[:sent]
        if leg.out:
            leg.wwait = True
            return False
        return True

    def _start_splice(self, s: _Session, leg: _Leg) -> None:
        limit = 0 if leg.state == _CLOSE else leg.left  # 0: until EOF (never for a known length)
        try:
            sp = self.pool.splice(leg.src, leg.dst, max=limit, idle=self.idle, wait=False)
        except (OSError, RuntimeError) as exc:
            if leg is s.rq and isinstance(exc, OSError):
                self._request_broken(s)
            else:
                self._abort(s, f"{self._which(s, leg)} body not spliced: {exc}")
            return
        leg.splice = sp
        sp.add_done_callback(leg)

    def _splice_done(self, leg: _Leg, sp: Splice) -> None:
        s = leg.session
        if leg.splice is not sp:
            return  # given up on (the session ended): nothing to do
        leg.splice = None
        leg.moved += sp.transferred
        if s.closed:
            return
        reason = sp.reason
        if reason is EndReason.MAX:
            leg.left = 0
            leg.state = _DONE if leg.state == _LENGTH else _END
        elif reason is EndReason.EOF and leg.state == _CLOSE:
            leg.eof = True
            leg.state = _DONE
        elif s.ending:
            pass  # unspliced to end the session
        elif leg is s.rq and reason is EndReason.ERROR:
            self._request_broken(s)
        else:
            why = reason.value if reason is not None else "?"
            if sp.error is not None:
                why += f" ({sp.error.strerror or sp.error})"
            elif reason is EndReason.EOF:
                why = "the sender closed before the end of the body"
            self._abort(s, f"{self._which(s, leg)} body cut short after {sp.transferred} of "
                        f"{leg.left} bytes: {why}")
            return
        self._step(s)

    @staticmethod
    def _which(s: _Session, leg: _Leg) -> str:
        return "request" if leg is s.rq else "response"

    # -- heads -----------------------------------------------------------------------------
    def _await_request(self, s: _Session) -> None:
        """Wait for the next request head (it may be in the buffer already)."""
        s.rq.state = _HEAD
        s.rq.moved = s.rs.moved = 0
        s.req = s.resp = None
        s.status = 0
        s.error = ""
        s.logged = s.early = False
        first = s.requests == 0
        if not first and not s.rq.inbuf and not s.rq.eof:
            s.rq.rwait = True  # the client is watched: no recv to hear EAGAIN first
        self._set_deadline(s, s.routes.head_timeout if first else self.keepalive_timeout, "request")

    def _request_head(self, s: _Session) -> bool:
        leg = s.rq
        if not leg.inbuf:
            return self._more(s, leg)
        try:
            head = http1.parse_request_head(leg.inbuf)
        except HttpError as exc:
            self._answer(s, exc.status, f"bad request head: {exc}")
            return True
        if head is None:
            if leg.inbuf and s.waiting == "request":  # a head began: it has the head time
                left = s.routes.head_timeout
                if s.deadline:
                    left = min(left, s.deadline - time.monotonic())
                self._set_deadline(s, left, "head")
            return self._more(s, leg)
        del leg.inbuf[: head.length]
        s.req = head
        s.t0 = time.monotonic()
        s.requests += 1
        self.requests += 1
        self._clear_deadline(s)
        if head.method == "CONNECT":
            self._answer(s, 405, "CONNECT (this is a reverse proxy, not a tunnel)")
            return True
        try:
            body = http1.request_body(head)
            out = http1.proxy_request_head(head, client_ip=s.ip, proto=self.proto,
                                           host_default=self.host_default)
        except HttpError as exc:
            self._answer(s, exc.status, f"bad request: {exc}")
            return True
        except ValueError as exc:
            self._answer(s, 400, f"bad request: {exc}")
            return True
        leg.state = _BODY_STATE[body.kind]
        leg.left = body.length or 0
        leg.out += out
        s.replay = out if body.kind == "none" else None
        s.upgrade = http1.upgrade_to(head) is not None
        s.rs.state = _HEAD
        s.rs.rwait = True  # no response before the request: wait to hear of one
        if s.up is not None and s.t0 - s.idle_since >= self.upstream_idle:
            self._close_up(s)  # idle too long: the backend may be closing it right now
            s.rs.state = _HEAD
        if s.up is None:
            self._get_upstream(s)
        else:
            s.reused = True
            self.reused += 1
        return True

    def _response_head(self, s: _Session) -> bool:
        leg = s.rs
        req = s.req
        assert req is not None
        if not leg.inbuf:
            return self._more(s, leg)
        try:
            head = http1.parse_response_head(leg.inbuf, request_method=req.method)
        except HttpError as exc:
            self._upstream_failed(s, 502, f"bad response head: {exc}")
            return True
        if head is None:
            return self._more(s, leg)
        if head.status >= 200 and s.rq.splice is not None and not self._request_sent(s):
            # The last bytes of the body may be moved with the loop not told yet: wait for
            # the splice's end, EARLY seconds at most, before calling the answer early.
            if s.waiting != "early" and not s.early:
                self._set_deadline(s, EARLY, "early")
            if not s.early:
                return False
        del leg.inbuf[: head.length]
        s.replay = None
        status = head.status
        if status < 200 and status != 101:  # interim: forwarded (to HTTP/1.1 clients only)
            if req.version == "1.1":
                leg.out += http1.proxy_response_head(head, keep_alive=True)
            return True
        try:
            body = http1.response_body(head, req.method)
            if status == 101:
                if not s.upgrade or s.rq.state != _DONE:
                    raise HttpError(502, "101 Switching Protocols to a request that did not ask to upgrade")
            sent = self._request_sent(s)
            up_ok = sent and http1.upstream_keeps_alive(head, req.method, body=body)
            rq = s.rq
            more = not rq.eof or rq.inbuf  # the client closed: a request it sent first still counts
            keep = up_ok and http1.request_keeps_alive(req) and more and not self._stopping
            out = http1.proxy_response_head(head, keep_alive=keep, request_version=req.version)
        except (HttpError, ValueError) as exc:
            self._upstream_failed(s, 502, f"bad response head: {exc}")
            return True
        s.resp = head
        s.status = status
        s.keep = keep
        s.up_keep = up_ok
        self._clear_deadline(s)
        leg.out += out
        leg.dechunk = body.kind == "chunked" and req.version == "1.0"
        if status == 101:
            leg.state = _DONE
        else:
            leg.state = _BODY_STATE[body.kind]
            leg.left = body.length or 0
        return True

    @staticmethod
    def _request_sent(s: _Session) -> bool:
        """The request is all written upstream: its leg is done, or the splice of its last
        bytes has moved them all (its done callback may not have reached the loop yet: an
        upstream can answer before it does)."""
        rq = s.rq
        if rq.state == _DONE:
            return not rq.out
        sp = rq.splice
        return rq.state == _LENGTH and sp is not None and sp.transferred >= rq.left

    def _exchange_step(self, s: _Session) -> bool:
        """End the exchange in progress if it is over; True if the session moved on."""
        rq, rs = s.rq, s.rs
        if s.ending:
            if not s.lingering and rq.splice is None and rs.splice is None:
                self._finish(s)
                return True
            return False
        if s.req is None or rs.state != _DONE or rs.out or rs.splice is not None:
            return False
        # The response is all written.
        if s.resp is not None and s.resp.status == 101:
            if rq.out:
                return False
            if not s.logged:
                self._log_exchange(s)
                rq.moved = rs.moved = 0  # from here on: the tunnel's bytes
            self._start_tunnel(s)
            return True
        if rq.state != _DONE or rq.out or rq.splice is not None:
            if s.keep:
                return False  # its request's end is still to come
            self._log_exchange(s)
            self._end_client(s, "early_response")  # the response came first: close after it
            return True
        self._log_exchange(s)
        if s.up is not None:
            if not s.up_keep:
                self._close_up(s)
            elif s.keep and not self._stopping:
                rs.state = _IDLE  # held for the next request: its EOF while idle closes it
                s.idle_since = time.monotonic()
            else:
                self._park(s)
        if s.keep and not self._stopping:
            self._await_request(s)
            return True
        self._end_client(s, "error_answered" if s.error else "closed")
        return True

    # -- upstream connections -----------------------------------------------------------
    def _get_upstream(self, s: _Session, fresh: bool = False) -> None:
        order = s.order if s.requests == 1 and s.order else s.routes.order(s.ip)
        if not order:
            self._answer(s, 503, "no backend is up")
            return
        if not fresh:  # the balance's choice: an idle connection to it, else a new one
            backend = order[0]
            idle = self._idle_up.get(backend)
            if idle:
                entry = idle.pop()  # the newest: the least likely to have been closed
                self._sel.unregister(entry.sock)
                backend.live += 1
                self._attach(s, entry.sock, backend, entry.sockaddr, reused=True)
                self.reused += 1
                return
        s.order = order
        s.bi = -1
        s.errors = []
        s.timed_out = False
        if self._next_backend(s):
            self._connect_next(s)
        else:
            self._connect_failed(s)

    def _connect_next(self, s: _Session) -> None:
        """Connect to the next address (then backend) that does not fail at once."""
        while True:
            while s.ai < len(s.addrs):
                family, type_, proto, _, addr = s.addrs[s.ai]
                try:
                    up = socket.socket(family, type_, proto)
                except OSError as exc:
                    s.errors.append(f"no socket: {exc.strerror}")
                    s.ai = len(s.addrs)
                    break
                up.setblocking(False)
                if self.nodelay:
                    up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                err = up.connect_ex(addr)
                if err in (0, errno.EINPROGRESS, errno.EAGAIN, errno.EALREADY):
                    s.up, s.ufd = up, up.fileno()
                    s.connecting = True
                    self._set_deadline(s, self.connect_timeout, "connect")
                    self._watch_up(s, _W)
                    return
                up.close()
                s.errors.append(f"{format_addr(addr)}: {os.strerror(err)}")
                s.ai += 1
            if not self._next_backend(s):
                self._connect_failed(s)
                return

    def _connect_ready(self, s: _Session) -> None:
        up = s.up
        assert up is not None
        err = up.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._connect_attempt_failed(s, f"{format_addr(s.addrs[s.ai][4])}: {os.strerror(err)}")
            return
        s.connecting = False
        self._clear_deadline(s)
        self._watch_up(s, 0)
        backend = s.backend
        assert backend is not None
        backend.connections += 1
        s.up = None
        self._attach(s, up, backend, s.addrs[s.ai][4], reused=False)
        self._step(s)

    def _connect_attempt_failed(self, s: _Session, error: str) -> None:
        self._watch_up(s, 0)
        assert s.up is not None
        s.up.close()
        s.up, s.ufd = None, -1
        s.connecting = False
        s.errors.append(error)
        s.ai += 1
        self._connect_next(s)
        if not s.closed:
            self._step(s)

    def _connect_failed(self, s: _Session) -> None:
        self.counters.failed_connects += 1
        status = 504 if s.timed_out else 502
        self._answer(s, status, "upstream connect failed: " + ("; ".join(s.errors) or "no address"))

    def _attach(self, s: _Session, up: socket.socket, backend: Backend, sockaddr: Any, *,
                reused: bool) -> None:
        s.up, s.ufd = up, up.fileno()
        s.backend = backend
        s.sockaddr = format_addr(sockaddr)  # as logged
        s.reused = reused
        s.rq.dst = up
        s.rs.src = up
        s.rs.inbuf.clear()
        s.rs.eof = s.rq.wwait = False
        s.rs.rwait = True  # no response before the request: wait to hear of one

    def _close_up(self, s: _Session, rst: bool = False) -> None:
        """Close the session's upstream connection (its backend gets its live count back)."""
        up = s.up
        if up is None:
            return
        self._watch_up(s, 0)
        if rst:
            reset_on_close(up)
        up.close()
        s.up, s.ufd = None, -1
        s.rq.dst = s.rs.src = None
        s.rs.state = _IDLE
        s.connecting = False
        if s.backend is not None:
            s.backend.live -= 1
            s.backend = None

    def _park(self, s: _Session) -> None:
        """Keep the session's idle upstream connection for another session, if there is room."""
        up, backend = s.up, s.backend
        assert up is not None and backend is not None
        idle = self._idle_up.setdefault(backend, [])
        if len(idle) >= self.max_idle or self._stopping:
            self._close_up(s)
            return
        self._watch_up(s, 0)
        s.up, s.ufd = None, -1
        s.rq.dst = s.rs.src = None
        s.backend = None
        backend.live -= 1
        entry = _Idle(up, backend, s.sockaddr, time.monotonic())
        idle.append(entry)
        self._sel.register(up, _R, entry)
        due = entry.since + self.upstream_idle
        if not self._next_purge or due < self._next_purge:
            self._next_purge = due

    def _drop_idle(self, entry: _Idle) -> None:
        idle = self._idle_up.get(entry.backend)
        if idle is not None and entry in idle:
            idle.remove(entry)
        self._sel.unregister(entry.sock)
        entry.sock.close()

    def _purge_idle(self, now: float) -> None:
        self._next_purge = 0.0
        for idle in self._idle_up.values():
            for entry in [e for e in idle if now - e.since >= self.upstream_idle]:
                self._drop_idle(entry)
            for entry in idle:
                due = entry.since + self.upstream_idle
                if not self._next_purge or due < self._next_purge:
                    self._next_purge = due

    # -- ends --------------------------------------------------------------------------
    def _src_ended(self, s: _Session, leg: _Leg, error: str) -> None:
        """``leg``'s source closed (``error`` empty) or failed while a head or body was read."""
        if leg is s.rq:
            if leg.state == _HEAD:  # between requests: the usual end
                s.reason = "client_closed"
                if leg.inbuf:
                    log.debug("conn %d %s: closed in the middle of a request head", s.id, s.peer)
                self._close(s)
                return
            self._abort(s, f"request body cut short: {error or 'the client closed'}")
            return
        if leg.state == _HEAD:
            if s.reused and s.replay is not None and not leg.inbuf:
                self._retry(s)
                return
            self._upstream_failed(s, 502, f"upstream {error or 'closed'} before a response head")
            return
        self._abort(s, f"response body cut short: {error or 'the upstream closed'}")

    def _dst_failed(self, s: _Session, leg: _Leg, exc: OSError) -> None:
        if leg is s.rq:
            if s.reused and s.replay is not None and not s.rs.inbuf:
                self._retry(s)
                return
            self._request_broken(s)
            return
        s.reason = "client_gone"
        self._abort(s, f"writing to the client failed: {exc.strerror or exc}")

    def _request_broken(self, s: _Session) -> None:
        """The request cannot go on upstream (the upstream reset, or stopped reading after an
        early answer, a 413 say): read what the upstream answered. An answer goes to the
        client, whose connection then closes; none is a 502."""
        rq = s.rq
        rq.out.clear()
        rq.wwait = False
        s.early = True  # any final answer now is early: the request will never be whole
        s.keep = s.up_keep = False
        s.rs.rwait = False
        if s.rs.state == _IDLE:  # the request head never went: nothing will answer
            self._upstream_failed(s, 502, "the upstream connection failed before the request was sent")

    def _retry(self, s: _Session) -> None:
        """A reused upstream connection closed before answering a bodiless request: send it
        again on a new connection (once)."""
        replay = s.replay
        assert replay is not None
        self._close_up(s)
        self.retried += 1
        s.rq.out[:] = replay
        s.rq.state = _DONE
        s.rs.state = _HEAD
        s.replay = None  # once only
        self._get_upstream(s, fresh=True)

    def _upstream_failed(self, s: _Session, status: int, detail: str) -> None:
        self._close_up(s, rst=True)
        self._answer(s, status, detail)

    def _answer(self, s: _Session, status: int, detail: str) -> None:
        """Answer the client ``status`` ourselves (nothing of a response has gone to it) and
        close its connection after that."""
        if s.rs.moved or s.resp is not None:  # a response is under way: too late to answer
            self._abort(s, detail)
            return
        if s.up is not None:
            self._close_up(s, rst=True)
        for leg in (s.rq, s.rs):
            if leg.splice is not None:
                _unsplice(leg.splice)
                leg.splice = None
        s.status = status
        s.error = detail
        s.keep = s.up_keep = False
        s.rq.state = _DONE
        s.rq.out.clear()
        s.rs.out[:] = http1.error_response(status)
        s.rs.state = _DONE
        if s.req is None:
            s.t0 = time.monotonic()
            s.req = _NO_REQUEST
        self._clear_deadline(s)

    def _bad_body(self, s: _Session, leg: _Leg, detail: str) -> None:
        """A malformed chunk line, chunk end or trailer: answered 400 (the request's) or 502
        (the response's) while nothing of a response has reached the client, else both
        connections reset."""
        which = "request" if leg is s.rq else "response"
        if s.rs.moved:
            self._abort(s, f"bad {which} body: {detail}")
            return
        s.rs.out.clear()  # the start of the bad response, never sent
        s.resp = None
        self._answer(s, 400 if leg is s.rq else 502, f"bad {which} body: {detail}")

    def _abort(self, s: _Session, detail: str) -> None:
        """Something failed mid-exchange: RST both connections."""
        if not s.error:
            s.error = detail
        if s.req is not None and s.req is not _NO_REQUEST:
            self._log_exchange(s)
            s.req = None
        elif s.req is None:
            log.warning("conn %d %s: %s", s.id, s.peer, detail)
        if s.reason == "client_closed":
            s.reason = "error"
        self._close(s, rst=True)

    def _end_client(self, s: _Session, reason: str) -> None:
        """The exchange is over and the client connection ends: close it once the splices
        have ended, letting the client's last bytes drain first (``LINGER``)."""
        s.reason = reason
        s.ending = "close"
        for leg in (s.rq, s.rs):
            if leg.splice is not None:
                _unsplice(leg.splice)  # its done callback then finishes
        if s.rq.splice is None and s.rs.splice is None:
            self._finish(s)

    def _finish(self, s: _Session) -> None:
        self._close_up(s, rst=s.rq.state not in (_DONE, _HEAD, _IDLE))
        client = s.client
        assert client is not None
        if s.rq.eof:
            self._close(s)
            return
        try:
            client.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(s)
            return
        s.lingering = True
        s.rq.rwait = False
        self._set_deadline(s, LINGER, "linger")
        self._linger_read(s)

    def _linger_read(self, s: _Session) -> None:
        client = s.client
        assert client is not None
        for _ in range(16):  # then the others' turn: LINGER bounds the whole wait
            try:
                data = client.recv(READ_SIZE)
            except BlockingIOError:
                break
            except OSError:
                self._close(s)
                return
            if not data:
                self._close(s)
                return
        s.rq.rwait = True
        self._settle(s)

    def _close(self, s: _Session, rst: bool = False) -> None:
        """The session is over: close both sockets (or keep the upstream idle), count it."""
        if s.closed:
            return
        s.closed = True
        for leg in (s.rq, s.rs):
            if leg.splice is not None:
                _unsplice(leg.splice)
                leg.splice = None
        if s.up is not None:
            if not rst and s.rs.state == _IDLE and s.req is None and not s.connecting:
                self._park(s)  # held between requests: another session may use it
            else:
                self._close_up(s, rst=True)
        client = s.client
        if client is not None:
            self._watch_client(s, 0)
            if rst:
                reset_on_close(client)
            client.close()
            s.client = None
        self._end_session(s)

    def _end_session(self, s: _Session) -> None:
        del self._sessions[s.id]
        s.deadline = 0.0
        c = self.counters
        with self._live_lock:
            c.live -= 1
            c.finished += 1
        c.reasons[s.reason] = c.reasons.get(s.reason, 0) + 1
        if s.counted:
            s.counted = False
            self._uncount(s.ip)
        log.debug("conn %d %s: closed after %d request(s) (%s)", s.id, s.peer, s.requests, s.reason)

    def _timed_out(self, s: _Session) -> None:
        waiting = s.waiting
        s.waiting = ""
        if waiting == "connect":
            s.timed_out = True
            self._connect_attempt_failed(s, f"{format_addr(s.addrs[s.ai][4])}: timed out")
        elif waiting == "early":
            s.early = True
            self._step(s)
        elif waiting == "linger":
            self._close(s)
        elif waiting in ("request", "head"):
            if s.rq.inbuf or waiting == "head":
                self._answer(s, 408, "no complete request head in time")
                self._step(s)
            else:
                s.reason = "keepalive_timeout" if s.requests else "head_timeout"
                self._close(s)
        elif waiting == "response":
            self._upstream_failed(s, 504, f"no response head within {self.response_timeout:g} s")
            self._step(s)
        else:
            self._abort(s, f"a write stalled for {self.response_timeout:g} s")

    # -- upgrade -------------------------------------------------------------------------
    def _start_tunnel(self, s: _Session) -> None:
        """After a 101 (its head written): the bytes each side sent past its head go first,
        then the two sockets are one relay."""
        rq, rs = s.rq, s.rs
        if rq.inbuf or rs.inbuf:
            rq.out += rq.inbuf
            rs.out += rs.inbuf
            rq.inbuf.clear()
            rs.inbuf.clear()
            rq.state = rs.state = _DONE
            return  # _step flushes them and comes back here
        client, up = s.client, s.up
        assert client is not None and up is not None
        self._watch_up(s, 0)
        self._watch_client(s, 0)
        self._clear_deadline(s)
        s.client = s.up = None
        s.rq.src = s.rq.dst = s.rs.src = s.rs.dst = None
        a, b = client.detach(), up.detach()
        try:
            relay = self.pool.proxy(a, b, idle=self.idle, wait=False)
        except (OSError, RuntimeError) as exc:
            os.close(a)
            os.close(b)
            s.reason = "error"
            log.warning("conn %d %s: upgrade not relayed: %s", s.id, s.peer, exc)
            s.closed = True
            if s.backend is not None:
                s.backend.live -= 1
            self._end_session(s)
            return
        s.tunnel = relay
        s.req = None
        s.reason = "upgraded"
        relay.add_done_callback(lambda _relay: self._tunnel_ended(s))

    def _tunnel_ended(self, s: _Session) -> None:
        self._tunnels.append(s)
        self._wake()

    def _tunnel_done(self, s: _Session) -> None:
        relay = s.tunnel
        assert relay is not None
        if s.closed:
            return  # ended by a bug's clean-up already
        # with what each side sent behind its head, written before the relay began
        up, down = relay.forward.transferred + s.rq.moved, relay.reverse.transferred + s.rs.moved
        with self._live_lock:
            self.counters.bytes_up += up
            self.counters.bytes_down += down
        if s.backend is not None:
            s.backend.live -= 1
            s.backend.bytes_up += up
            s.backend.bytes_down += down
        log.info("conn %d %s: upgraded connection ended up=%d down=%d reason=%s", s.id, s.peer, up,
                 down, relay.reason.name if relay.reason else "?")
        s.closed = True
        self._end_session(s)

    # -- bookkeeping ---------------------------------------------------------------------
    def _log_exchange(self, s: _Session) -> None:
        req = s.req
        if req is None:
            return
        if s.logged:
            return
        s.logged = True
        up, down = s.rq.moved, s.rs.moved
        status = s.status
        key = f"{status // 100}xx" if status else "none"
        self.statuses[key] = self.statuses.get(key, 0) + 1
        with self._live_lock:
            self.counters.bytes_up += up
            self.counters.bytes_down += down
        if s.backend is not None:
            s.backend.bytes_up += up
            s.backend.bytes_down += down
        quiet = not s.error or status == 400 or s.reason == "client_gone"  # the client's doing
        level = logging.INFO if quiet else logging.WARNING
        if not log.isEnabledFor(level):
            return  # the line is not made at all: a proxy without access log spends nothing on it
        target = s.sockaddr if s.backend is not None and s.sockaddr is not None else "-"
        line = "-" if req is _NO_REQUEST else printable(f"{req.method} {req.target} HTTP/{req.version}")
        error = f" error={printable(s.error)}" if s.error else ""
        log.log(level, 'conn %d %s -> %s "%s" %s up=%d down=%d duration=%.3fs%s', s.id, s.peer,
                target, line, status or "-", up, down, time.monotonic() - s.t0, error)

    def _set_deadline(self, s: _Session, seconds: float, what: str) -> None:
        s.waiting = what
        if seconds == float("inf"):
            s.deadline = 0.0
            return
        s.deadline = when = time.monotonic() + seconds
        if not s.timer or when < s.timer:
            self._push_timer(s, when)

    def _push_timer(self, s: _Session, when: float) -> None:
        """One entry in the heap per session, at most: a deadline moved later (the next
        request's, say) is found when the entry comes due and pushed again then, so a busy
        keep-alive connection does not leave two stale entries per request behind."""
        s.timer = when
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, s))

    @staticmethod
    def _clear_deadline(s: _Session) -> None:
        s.deadline = 0.0
        s.waiting = ""

    def _settle(self, s: _Session) -> None:
        """Watch what ``s`` waits for: each socket's read and write sides, and a deadline."""
        rq, rs = s.rq, s.rs
        # Between a request's end and its response's, the client stays watched (read ahead).
        ahead = rq.state == _DONE and not rq.inbuf and not rq.eof and rq.splice is None
        mask = (_R if rq.rwait or s.lingering or ahead else 0) | (_W if rs.wwait else 0)
        if mask != s.cmask:
            self._watch_client(s, mask)
        if s.up is not None and not s.connecting:
            mask = (_R if rs.rwait or rs.state == _IDLE else 0) | (_W if rq.wwait else 0)
            if mask != s.umask:
                self._watch_up(s, mask)
        if not s.waiting and s.deadline == 0.0:
            if rs.state == _HEAD and (rq.state == _DONE and not rq.out or s.early) and s.up is not None:
                self._set_deadline(s, self.response_timeout, "response")
            elif rq.wwait or rs.wwait:
                self._set_deadline(s, self.response_timeout, "write")
        elif s.waiting == "write" and not (rq.wwait or rs.wwait):
            self._clear_deadline(s)

    def _watch_client(self, s: _Session, mask: int) -> None:
        s.cmask = self._watch(s, s.cfd, s.cmask, mask)

    def _watch_up(self, s: _Session, mask: int) -> None:
        s.umask = self._watch(s, s.ufd, s.umask, mask)

    def _watch(self, s: _Session, fd: int, old: int, new: int) -> int:
        """Have the selector watch ``fd`` (of ``s``) for ``new`` instead of ``old`` (0: not
        at all); returns ``new``."""
        if new != old:
            if not old:
                self._sel.register(fd, new, s)
            elif not new:
                self._sel.unregister(fd)
            else:
                self._sel.modify(fd, new, s)
        return new

    # -- stopping and stats ---------------------------------------------------------------
    def _begin_stop(self) -> None:
        super()._begin_stop()
        for s in list(self._sessions.values()):  # waiting for a request: nothing to finish
            if not s.closed and s.req is None and s.rq.state == _HEAD and not s.rq.inbuf and s.tunnel is None:
                s.reason = "shutting_down"
                self._close(s)
        self._close_idle()

    def _close_idle(self) -> None:
        for idle in self._idle_up.values():
            for entry in list(idle):
                self._drop_idle(entry)
        self._idle_up.clear()

    def _shutdown(self) -> None:
        for s in list(self._sessions.values()):
            if s.tunnel is not None:
                continue  # the pool's close ends it
            s.reason = "shutting_down"
            if s.req is not None:
                s.error = s.error or "the proxy stopped"
            self._close(s, rst=True)
        self._close_idle()
        super()._shutdown()
        while self._tunnels:
            self._tunnel_done(self._tunnels.popleft())

    def metrics(self) -> str:
        """``ProxyServer.metrics`` and the HTTP counters (responses by class: ``class="2xx"``)."""
        lines = [super().metrics().rstrip("\n")]
        st = self.stats()["http"]
        for name, kind, help_, key in _HTTP_METRICS:
            lines += [f"# HELP splicepool_{name} {help_}", f"# TYPE splicepool_{name} {kind}",
                      f"splicepool_{name} {st[key]}"]
        lines += ["# HELP splicepool_http_responses_total Responses the clients got, by status class.",
                  "# TYPE splicepool_http_responses_total counter"]
        lines += [f'splicepool_http_responses_total{{class="{k}"}} {v}' for k, v in sorted(st["responses"].items())]
        return "\n".join(lines) + "\n"

    def stats(self) -> dict[str, Any]:
        st = super().stats()
        st["http"] = {
            "requests": self.requests,
            "responses": dict(self.statuses),
            "upstream_reused": self.reused,
            "upstream_retried": self.retried,
            "upstream_idle": sum(len(v) for v in self._idle_up.values()),
            "deadlines": len(self._timers),  # entries in the heap of deadlines (one per session at most, and a few stale ones)
        }
        return st


_HTTP_METRICS = (  # name, type, help, the /stats "http" key
    ("http_requests_total", "counter", "Requests whose head was read whole.", "requests"),
    ("http_upstream_reused_total", "counter", "Requests sent on a kept upstream connection.", "upstream_reused"),
    ("http_upstream_retried_total", "counter", "Requests sent again after a kept connection closed.",
     "upstream_retried"),
    ("http_upstream_idle", "gauge", "Idle upstream connections kept for the next client.", "upstream_idle"),
)


_MORE = object()  # _body_part: more bytes came in, parse again


def _chunk_end(buf: bytearray) -> int | None:
    """The CRLF after a chunk's data: 2 (the bytes it takes), None while incomplete."""
    if len(buf) < 2:
        return None
    http1.check_chunk_end(buf[:2])
    return 2


def _unsplice(sp: Splice) -> None:
    """Stop ``sp`` unless it has ended already (its done callback may still be on its way)."""
    try:
        sp.unsplice()
    except OSError:
        pass  # ended meanwhile: nothing to stop


# The request of an exchange answered before any request head was whole (a 400, a 408).
_NO_REQUEST: Any = http1.RequestHead("-", "-", "1.1", (), 0)
