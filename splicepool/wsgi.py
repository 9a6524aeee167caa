"""Take over the client socket of a WSGI request: HTTP ``CONNECT`` tunnels and ``Upgrade``.

WSGI has no standard way to hand a connection over, so this module knows where
the servers keep it: ``gevent.pywsgi`` (also gunicorn's ``gevent_pywsgi``
worker) and gunicorn's own HTTP parser (``gunicorn -k gevent``, ``sync``,
``gthread``). It takes the socket away from the server, collects the bytes the
server already read past the request head (RFC 9110 lets a client pipeline
tunnel data right behind a ``CONNECT``), and parks the request greenlet (or
thread) while ``splicepool.proxy`` moves the bytes, so the server neither
parses tunnel bytes as HTTP nor closes the socket under the pool. Another
server can publish its socket as ``environ["splicepool.socket"]``; it must then
write nothing on the connection once the application returns.

    from splicepool.wsgi import connect_tunnel

    def app(environ, start_response):
        if environ["REQUEST_METHOD"] == "CONNECT":
            return connect_tunnel(environ, start_response)   # loopback targets only
        ...

Importing this module never imports gevent; a gevent server's socket is
recognised by its type, and only then is ``gevent.socket`` imported.
"""

from __future__ import annotations

import errno
import io
import ipaddress
import socket
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from .pool import default_pool
from .relay import peer_gone

if TYPE_CHECKING:
    from .pool import SplicePool

__all__ = [
    "ESTABLISHED",
    "GONE_KEY",
    "PROXY_KEY",
    "SOCKET_KEY",
    "connect_tunnel",
    "find_socket",
    "parse_allow",
    "parse_authority",
    "request_target",
    "run_tunnel",
    "take_over",
]

#: A server (or a handler subclass) may publish the client socket under this key;
#: it is looked at first.
SOCKET_KEY = "splicepool.socket"
#: ``run_tunnel`` stores the running ``Proxy`` here, so the application can log its counts.
PROXY_KEY = "splicepool.proxy"
#: Set to ``(side, errno name)``, e.g. ``("client", "ENOTCONN")``, when a taken-over
#: request ends without a relay because ``side`` ("client" or "upstream") was already gone.
GONE_KEY = "splicepool.gone"
#: What ``connect_tunnel`` answers once the upstream is connected.
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"

_SOCKET_KEYS = (SOCKET_KEY, "gunicorn.sock", "gunicorn.socket")
_RAW_PATH = "environ['wsgi.input'](.rfile).raw._sock"
_TAKEN = "splicepool.taken_over"

Allow = Callable[[str, int], bool] | Iterable[Any] | None


def find_socket(environ: dict[str, Any]) -> tuple[Any, str]:
    """Return ``(socket, where)``: the request's client socket and where it was found.

    Looks, in this order, at ``environ["splicepool.socket"]`` (your own handler),
    ``environ["gunicorn.sock"]`` (gunicorn's pywsgi worker),
    ``environ["gunicorn.socket"]`` (gunicorn's own parser), then the socket
    under the server's read buffer, ``environ["wsgi.input"](.rfile).raw._sock``
    (gevent.pywsgi). Raises ``LookupError`` naming every place tried.
    Nothing is changed: the server still owns the socket.
    """
    tried = []
    for key in _SOCKET_KEYS:
        sock = environ.get(key)
        if sock is not None:
            return sock, f"environ[{key!r}]"
        tried.append(f"environ[{key!r}]")
    sock = getattr(getattr(_rfile(environ), "raw", None), "_sock", None)
    if sock is not None:
        return sock, _RAW_PATH
    tried.append(_RAW_PATH)
    raise LookupError(
        "splicepool.wsgi: no client socket in this WSGI environ (tried "
        + ", ".join(tried)
        + "); run under gevent.pywsgi or gunicorn, or have your server's handler "
        f"publish it as environ[{SOCKET_KEY!r}]"
    )


def take_over(environ: dict[str, Any]) -> tuple[socket.socket, bytes]:
    """Take the client connection away from the WSGI server: ``(sock, buffered)``.

    ``sock`` is a new socket object of the server's socket class (a gevent
    socket under gevent) that owns the connection's fd; the server's own
    object is detached, so its keep-alive loop ends at its next read and its
    cleanup cannot close the fd. ``buffered`` is what the server had already
    read past the request head (pipelined tunnel data), taken without
    blocking; send it on before anything read from ``sock``. Read a request
    body first, if the request has one. From here on the caller owns ``sock``
    and must close it or hand it to ``splicepool.proxy``; nothing has been
    written to the client. Call it in the request's own greenlet or thread.

    Raises ``LookupError`` (see ``find_socket``) if there is no socket,
    ``RuntimeError`` if it was already taken over or closed, is a TLS socket
    (the tunnel would lose the TLS state), or if the server buffers input
    somewhere this module cannot reach (pipelined bytes would be lost).
    """
    sock, where = find_socket(environ)
    if environ.get(_TAKEN):
        raise RuntimeError("splicepool.wsgi: this request's socket was already taken over")
    if sock.fileno() < 0:
        raise RuntimeError(f"splicepool.wsgi: the socket at {where} is closed or detached")
    if callable(getattr(sock, "do_handshake", None)):
        raise RuntimeError(
            f"splicepool.wsgi: the socket at {where} is a TLS socket; its bytes cannot be "
            "spliced (terminate TLS in front of the server, or relay with a copy loop)"
        )
    buffered = _take_buffered(environ, sock)
    family, type_, proto = sock.family, sock.type, sock.proto
    fd = sock.detach()
    environ[_TAKEN] = True
    try:
        new = type(sock)(family, type_, proto, fileno=fd)
    except TypeError:  # a socket class with its own constructor: fall back to the stdlib one
        new = socket.socket(family, type_, proto, fileno=fd)
    return new, buffered


def run_tunnel(
    environ: dict[str, Any],
    client: Any,
    upstream: Any,
    early: bytes = b"",
    *,
    pool: SplicePool | None = None,
    idle: float | None = None,
    nodelay: bool = True,
) -> list[bytes]:
    """Relay ``client`` ⇄ ``upstream`` until both directions end; return the WSGI body ``[]``.

    Sends ``early`` (``take_over``'s buffered bytes) to the upstream, sets
    ``TCP_NODELAY`` on both legs (``nodelay``), hands both sockets to
    ``splicepool.proxy`` (default pool unless ``pool``; ``idle`` seconds with
    no byte either way ends it) and parks the calling greenlet until the relay
    has ended: ``Proxy.wait()`` yields to the gevent hub, so the server keeps
    serving. The ``Proxy`` is stored in ``environ["splicepool.proxy"]``. If the
    greenlet is killed meanwhile (a server stopping), the relay is aborted and
    the exception propagates. Both sockets end up closed on every path (by the
    pool, once it has them).

    A side that reset before the relay could start (``proxy()`` raises
    ``OSError(ENOTCONN)``: a reset socket has no peer) is not an error of the
    server's: both sockets are closed, ``environ["splicepool.gone"]`` is set to
    ``("client", "ENOTCONN")`` (or ``"upstream"``), and the request ends as
    after a relay, so the application can log one line.

    Return its result from the application without calling ``start_response``.
    Under gunicorn's own HTTP parser (``-k gevent``, ``sync``, ``gthread``) it
    raises ``StopIteration`` instead, once the relay has ended: gunicorn's
    workers take that as "close this connection quietly" (as flask-sock does)
    rather than writing a response into the finished tunnel; let it propagate.
    """
    in_proxy = False
    try:
        if early:
            upstream.sendall(early)
        if nodelay:
            for sock in (client, upstream):
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                except OSError:
                    pass  # not TCP (AF_UNIX), or already reset: the relay finds out
        in_proxy = True
        relay = (pool or default_pool()).proxy(client, upstream, idle=idle)
    except Exception as exc:
        gone = peer_gone(exc, client=client, upstream=upstream)
        client.close()  # proxy() refused and changed nothing: the sockets are still ours
        upstream.close()
        if gone is None:
            raise
        environ[GONE_KEY] = (gone, "ENOTCONN")
        return _finished(environ)
    except BaseException:
        if in_proxy:
            # Killed (GreenletExit) while proxy() waited for its workers, its only yield
            # point: the relay is committed on these fds but the objects are not detached
            # yet. Let go of them, so that neither we nor the garbage collector closes an
            # fd the pool uses; the relay ends by itself (EOF, error, idle).
            client.detach()
            upstream.detach()
        else:
            client.close()
            upstream.close()
        raise
    environ[PROXY_KEY] = relay
    try:
        relay.wait()
    except BaseException:  # GreenletExit from a stopping server, KeyboardInterrupt
        relay.close()
        raise
    return _finished(environ)


def connect_tunnel(
    environ: dict[str, Any],
    start_response: Callable[..., Any],
    *,
    allow: Allow = None,
    pool: SplicePool | None = None,
    idle: float | None = None,
    connect_timeout: float = 10.0,
    nodelay: bool = True,
) -> list[bytes]:
    """Answer an HTTP ``CONNECT host:port`` request with a spliced tunnel; return ``[]``.

    Every refusal is an ordinary WSGI response, given before the socket is
    touched: 405 for another method, 400 for a target that is not
    ``host:port``, 403 for a target ``allow`` refuses, 502 when the upstream
    cannot be reached in ``connect_timeout`` seconds (cooperatively under
    gevent). Otherwise it takes the socket over (``take_over``), writes
    ``HTTP/1.1 200 Connection Established`` itself, forwards the bytes the
    client pipelined after the head, and relays until both sides are done
    (``run_tunnel``: the request greenlet stays parked, the server's
    keep-alive loop ends, the result or ``StopIteration`` must be passed on).

    ``allow``: ``None`` (default) admits only loopback targets (``localhost``,
    127.0.0.0/8, ``::1``; the connected address is checked too); a callable
    ``(host, port) -> bool``; or a collection of ``"HOST:PORT"`` strings or
    ``(host, port)`` tuples, where either part may be ``"*"``. Raises
    ``LookupError``/``RuntimeError`` from ``take_over`` when the server gives
    no usable socket; nothing has been answered then.
    """
    if environ.get("REQUEST_METHOD") != "CONNECT":
        return _refuse(start_response, "405 Method Not Allowed", "only CONNECT is handled here",
                       [("Allow", "CONNECT")])
    target = request_target(environ)
    try:
        host, port = parse_authority(target)
    except ValueError as exc:
        return _refuse(start_response, "400 Bad Request", str(exc))
    if not _allowed(allow, host, port):
        return _refuse(start_response, "403 Forbidden", f"tunnels to {target} are not allowed")
    sock, _where = find_socket(environ)  # fail before costing the upstream a connection
    upstream = None
    try:
        upstream = _connector(sock)((host, port), timeout=connect_timeout)
        peer = upstream.getpeername()[0]
    except OSError as exc:
        if upstream is not None:
            upstream.close()
        return _refuse(start_response, "502 Bad Gateway", f"cannot connect to {target}: {exc}")
    try:
        if allow is None and not _is_loopback(peer):
            upstream.close()
            return _refuse(start_response, "403 Forbidden", f"{target} is not a loopback address")
        upstream.settimeout(None)
        client, early = take_over(environ)
    except BaseException:
        upstream.close()
        raise
    try:
        client.sendall(ESTABLISHED)
    except OSError as exc:  # the client left: nothing to relay
        client.close()
        upstream.close()
        environ[GONE_KEY] = ("client", errno.errorcode.get(exc.errno or 0, str(exc.errno)))
        return _finished(environ)
    return run_tunnel(environ, client, upstream, early, pool=pool, idle=idle, nodelay=nodelay)


def request_target(environ: dict[str, Any]) -> str:
    """The request-target as the client sent it: ``host:port`` for ``CONNECT``,
    ``http://host/path`` for a request meant for a forward proxy (absolute-form),
    ``/path?query`` for one meant for this server (origin-form), ``*``.

    ``environ["RAW_URI"]`` (gunicorn) or ``REQUEST_URI`` when the server gives
    one; else rebuilt from ``PATH_INFO`` and ``QUERY_STRING`` (gevent.pywsgi,
    where PATH_INFO is the whole target, percent-escapes decoded). An
    application that is no forward proxy answers a target that does not start
    with ``/`` with a refusal, not with its own pages.
    """
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if raw:
        return str(raw)
    target = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING")
    return f"{target}?{query}" if query else target


def parse_authority(target: str) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` (a CONNECT target) → ``(host, port)``; ValueError otherwise."""
    text = target.strip()
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"CONNECT target {target!r}: expected [IPV6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise ValueError(f"CONNECT target {target!r}: expected HOST:PORT")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"CONNECT target {target!r}: expected HOST:PORT with a port from 1 to 65535")
    return host, int(port)


def parse_allow(rules: Iterable[Any]) -> list[tuple[str, str]]:
    """``"HOST:PORT"`` strings or ``(host, port)`` tuples → a list of ``(host, port)`` rules.

    Either part may be ``"*"``; IPv6 hosts go in brackets. ``ValueError`` for a
    malformed rule: call it at start-up to check an allow list from the command line.
    """
    parsed = []
    for rule in rules:
        if isinstance(rule, str):
            parsed.append(_split_rule(rule))
        else:
            rule_host, rule_port = rule
            parsed.append((str(rule_host), str(rule_port)))
    return parsed


# -- helpers -----------------------------------------------------------------------
def _rfile(environ: dict[str, Any]) -> Any:
    """The server's buffered reader under ``wsgi.input`` (pywsgi's ``Input.rfile``, or itself)."""
    inp = environ.get("wsgi.input")
    rfile = getattr(inp, "rfile", inp)
    if hasattr(rfile, "peek") and hasattr(rfile, "raw"):
        return rfile
    return None


def _unreader(environ: dict[str, Any]) -> Any:
    """gunicorn's parser buffer: ``wsgi.input`` is a ``Body`` whose reader has an ``unreader``."""
    return getattr(getattr(environ.get("wsgi.input"), "reader", None), "unreader", None)


def _take_buffered(environ: dict[str, Any], sock: Any) -> bytes:
    """Bytes the server read past the request head and nobody consumed, without blocking."""
    unreader = _unreader(environ)
    if unreader is not None:  # gunicorn's parser: the body's buffer, then the unreader's
        body_buf = getattr(environ["wsgi.input"], "buf", None)
        held = b""
        if isinstance(body_buf, io.BytesIO):
            held = body_buf.getvalue()
            environ["wsgi.input"].buf = io.BytesIO()
        take = getattr(unreader, "take_buffered", None)
        if take is not None:
            return held + take()
        held += unreader.buf.getvalue()
        unreader.buf = io.BytesIO()
        return held
    rfile = _rfile(environ)
    if rfile is not None and getattr(rfile.raw, "_sock", None) is sock:
        timeout = sock.gettimeout()
        sock.settimeout(0.0)  # peek() may read the socket once: that read must not block
        try:
            data = rfile.peek()
            return rfile.read(len(data)) if data else b""
        except BlockingIOError:
            return b""
        finally:
            sock.settimeout(timeout)
    if rfile is not None or environ.get("wsgi.input") is None:
        return b""  # its reader belongs to another socket: nothing of ours is buffered there
    if environ.get(SOCKET_KEY) is not None:
        return b""  # a handler that publishes its socket answers for its own buffering
    raise RuntimeError(
        "splicepool.wsgi: cannot find where the server buffers bytes read past the request "
        f"head (wsgi.input is {type(environ['wsgi.input']).__name__}); pipelined tunnel data "
        "would be lost"
    )


def _finished(environ: dict[str, Any]) -> list[bytes]:
    """The end of a taken-over request: ``[]``, or StopIteration for gunicorn's parser."""
    if _unreader(environ) is not None:
        raise StopIteration("splicepool.wsgi: connection taken over")
    return []


def _connector(sock: Any) -> Callable[..., Any]:
    """``create_connection`` of the server's world: gevent's for a gevent socket."""
    if type(sock).__module__.startswith("gevent"):
        from gevent import socket as gsocket

        return gsocket.create_connection  # type: ignore[no-any-return]
    return socket.create_connection


def _refuse(
    start_response: Callable[..., Any],
    status: str,
    text: str,
    extra: Iterable[tuple[str, str]] = (),
) -> list[bytes]:
    body = (text + "\n").encode("utf-8", "replace")
    headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),  # a refused CONNECT may be followed by tunnel bytes: never parse them
        *extra,
    ]
    start_response(status, headers)
    return [body]


def _norm_host(host: str) -> str:
    host = host.strip().strip("[]").lower()
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.rstrip(".")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return host.lower().rstrip(".") == "localhost"


def _allowed(allow: Allow, host: str, port: int) -> bool:
    if allow is None:
        return _is_loopback(_norm_host(host))
    if callable(allow):
        return bool(allow(host, port))
    want = _norm_host(host)
    for rule_host, rule_port in parse_allow(allow):
        if rule_host != "*" and _norm_host(str(rule_host)) != want:
            continue
        if rule_port != "*" and int(rule_port) != port:
            continue
        return True
    return False


def _split_rule(rule: str) -> tuple[str, str]:
    text = rule.strip()
    if text == "*":
        return "*", "*"
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
    else:
        host, sep, port = text.rpartition(":")
    if not sep or not host or not (port == "*" or (port.isdigit() and 0 < int(port) < 65536)):
        raise ValueError(f"allow rule {rule!r}: expected HOST:PORT (either may be *)")
    return host, port

