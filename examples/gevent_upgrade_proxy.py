"""HTTP Upgrade pass-through on gevent.pywsgi: the upgraded connection is spliced by splicepool.

    python examples/gevent_upgrade_proxy.py --listen 127.0.0.1:8081 --connect 127.0.0.1:9000

A request carrying an ``Upgrade:`` header (WebSocket, h2c, anything) is
forwarded to the fixed upstream; the upstream's answer (normally ``101
Switching Protocols``) is relayed to the client byte for byte, and from then on
the connection is a relay: the client's socket is taken from pywsgi and the
pool's worker threads move every byte both ways while the request greenlet
waits without blocking the hub. If the upstream answers something other than
101, that answer is relayed the same way and the connection continues as
plain HTTP straight to the upstream. 502 if the upstream cannot be reached or
sends no valid response head within ``--timeout`` seconds. Requests without
``Upgrade`` get a short text page (GET/HEAD) or 405.

A client that resets between the ``101`` and the start of the relay makes
``splicepool.proxy()`` raise ``OSError(ENOTCONN)`` (its checks ask both sockets
for their peer); ``run_tunnel`` closes both sockets and sets
``environ["splicepool.gone"]``, and this app logs one line for it instead of a
traceback.
"""

from gevent import monkey

if not monkey.is_module_patched("socket"):
    monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from urllib.parse import quote  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import splicepool  # noqa: E402
from splicepool.wsgi import GONE_KEY, PROXY_KEY, run_tunnel, take_over  # noqa: E402

log = logging.getLogger("upgrade_proxy")

UPSTREAM = ("127.0.0.1", 9000)
TIMEOUT = 10.0
IDLE = None
POOL = None
MAX_HEAD = 64 * 1024
PAGE = b"splicepool Upgrade pass-through: send a request with an Upgrade header.\n"


def request_head(environ):
    """The request head to send upstream, rebuilt from the WSGI environ."""
    uri = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not uri:
        uri = quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""), safe="/;:@&=+$,%!~*'()")
        if environ.get("QUERY_STRING"):
            uri += "?" + environ["QUERY_STRING"]
    lines = [f"{environ['REQUEST_METHOD']} {uri} {environ.get('SERVER_PROTOCOL', 'HTTP/1.1')}"]
    for key, value in environ.items():
        if key.startswith("HTTP_") and key != "HTTP_X_FORWARDED_FOR":
            name = key[5:]
        elif key in ("CONTENT_TYPE", "CONTENT_LENGTH") and value:
            name = key
        else:
            continue
        lines.append(f"{name.replace('_', '-').title()}: {value}")
    forwarded = environ.get("HTTP_X_FORWARDED_FOR")
    client = environ.get("REMOTE_ADDR", "")
    lines.append(f"X-Forwarded-For: {forwarded + ', ' + client if forwarded else client}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def read_response_head(sock):
    """Read until the end of the upstream's response head; return everything read (head + extra)."""
    buf = bytearray()
    while b"\r\n\r\n" not in buf:
        if len(buf) > MAX_HEAD:
            raise ValueError(f"response head longer than {MAX_HEAD} bytes")
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("upstream closed the connection before answering")
        buf += chunk
    if not buf.startswith(b"HTTP/1."):
        raise ValueError(f"not an HTTP response: {bytes(buf[:40])!r}")
    return bytes(buf)


def refuse(start_response, status, text, extra=()):
    body = (text + "\n").encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
                            ("Connection", "close"), *extra])
    return [body]


def app(environ, start_response):
    """Upgrade → forwarded and spliced; otherwise a text page or 405."""
    method = environ["REQUEST_METHOD"]
    if not environ.get("HTTP_UPGRADE"):
        if method in ("GET", "HEAD"):
            start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(PAGE)))])
            return [PAGE] if method == "GET" else []
        return refuse(start_response, "405 Method Not Allowed", "send an Upgrade request", [("Allow", "GET, HEAD")])
    started = time.monotonic()
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length) if length else b""
    try:
        upstream = socket.create_connection(UPSTREAM, timeout=TIMEOUT)
    except OSError as exc:
        return refuse(start_response, "502 Bad Gateway", f"cannot connect to the upstream: {exc}")
    try:
        upstream.sendall(request_head(environ) + body)
        answer = read_response_head(upstream)  # the upstream's 101 (head and anything after it)
        upstream.settimeout(None)
    except (OSError, ValueError) as exc:
        upstream.close()
        return refuse(start_response, "502 Bad Gateway", f"no valid answer from the upstream: {exc}")
    try:
        client, early = take_over(environ)
    except BaseException:
        upstream.close()
        raise
    try:
        client.sendall(answer)
    except OSError:
        client.close()
        upstream.close()
        return []
    try:
        return run_tunnel(environ, client, upstream, early, pool=POOL, idle=IDLE)
    finally:
        relay = environ.get(PROXY_KEY)
        if relay is not None and relay.done():
            log.info("upgrade %s %s -> %s status=%s up=%d down=%d duration=%.3fs reason=%s",
                     environ.get("REMOTE_ADDR"), environ.get("PATH_INFO"), f"{UPSTREAM[0]}:{UPSTREAM[1]}",
                     answer.split(b" ", 2)[1].decode("latin-1"), relay.forward.transferred,
                     relay.reverse.transferred, time.monotonic() - started, relay.reason.name)
        if environ.get(GONE_KEY):  # a reset before the relay started: both sockets closed
            side, why = environ[GONE_KEY]
            where = (f"{environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}" if side == "client"
                     else f"{UPSTREAM[0]}:{UPSTREAM[1]}")
            log.warning("%s %s went away before the relay started (%s)", side, where, why)


def parse_hostport(text, option):
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{option} {text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv=None):
    global UPSTREAM, TIMEOUT, IDLE, POOL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="HOST:PORT ([V6]:PORT)")
    parser.add_argument("--connect", required=True, help="the upstream, HOST:PORT")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to connect and get the answer head")
    parser.add_argument("--idle", type=float, default=0, help="end a relay after this many silent seconds")
    parser.add_argument("--workers", type=int, default=None, help="splice worker threads (default: CPUs)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds live relays get on SIGTERM")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    try:
        listen = parse_hostport(args.listen, "--listen")
        UPSTREAM = parse_hostport(args.connect, "--connect")
    except ValueError as exc:
        parser.error(str(exc))
    TIMEOUT, IDLE = args.timeout, args.idle or None
    POOL = splicepool.SplicePool(workers=args.workers)
    server = WSGIServer(listen, app, spawn=gevent.pool.Pool(10000), log=None)
    stop = gevent.event.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    server.start()
    log.info("listening on %s:%d, upstream %s:%d", *server.address[:2], *UPSTREAM)
    try:
        stop.wait()
        server.stop(timeout=args.grace)
    finally:
        POOL.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
