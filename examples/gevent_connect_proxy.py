"""An HTTP CONNECT proxy on gevent.pywsgi whose tunnels are spliced by splicepool.

    python examples/gevent_connect_proxy.py --listen 127.0.0.1:8080 [--allow HOST:PORT ...]
    curl -p -x http://127.0.0.1:8080 http://127.0.0.1:8000/      # a tunnel to a local server

``CONNECT host:port`` opens a tunnel: the upstream is connected in the hub
(502 if it cannot be), the client's socket is taken from pywsgi, and the pool's
worker threads move every byte while the request greenlet waits without
blocking the hub. Only loopback targets are allowed unless ``--allow`` names
others (403). ``GET``/``HEAD`` of a path on this server get a short text page.
Everything else is refused with 405 and ``Allow: CONNECT`` (``CONNECT, GET,
HEAD`` for a path here), logged in one line with method, target, client and
status: other methods, and requests meant for a forward proxy, such as the
``GET http://host/`` (absolute-form) that a client configured with an HTTP
proxy sends for an http:// URL without ``-p``/tunnelling. This proxy only
opens tunnels; it never fetches on a client's behalf nor answers such a
request with its own page. Refused ``CONNECT`` requests (400/403/502) are
logged the same way.

The same module is a WSGI app for gunicorn's gevent worker; there the allow
list comes from ``SPLICEPOOL_ALLOW`` (comma-separated ``HOST:PORT``):

    gunicorn -k gevent -b 127.0.0.1:8080 --chdir examples gevent_connect_proxy:app

A client that resets right after the ``200`` and before the relay starts makes
``splicepool.proxy()`` raise ``OSError(ENOTCONN)`` (its checks ask both sockets
for their peer); ``run_tunnel`` closes both sockets and sets
``environ["splicepool.gone"]``, and this app logs one line for it
(``client 127.0.0.1:5555 went away before the relay started (ENOTCONN)``).

SIGINT/SIGTERM: stop accepting, give live tunnels ``--grace`` seconds, abort
the rest, close the pool, exit 0.
"""

from gevent import monkey

if not monkey.is_module_patched("socket"):  # gunicorn's gevent worker has patched already
    monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402

import splicepool  # noqa: E402
from splicepool.wsgi import GONE_KEY, PROXY_KEY, connect_tunnel, parse_allow, request_target  # noqa: E402

log = logging.getLogger("connect_proxy")
if logging.getLogger("gunicorn.error").handlers:  # under gunicorn: log through its error log
    log.handlers[:] = logging.getLogger("gunicorn.error").handlers
    log.setLevel(logging.INFO)
    log.propagate = False

#: Allowed targets; None = loopback only. Set by main() or SPLICEPOOL_ALLOW.
ALLOW = parse_allow(filter(None, os.environ.get("SPLICEPOOL_ALLOW", "").split(","))) or None
IDLE = float(os.environ.get("SPLICEPOOL_IDLE", "0")) or None
POOL = None  # None: splicepool's default pool, created on first use (after gunicorn's fork)

PAGE = b"splicepool CONNECT proxy: send CONNECT host:port to open a tunnel.\n"


def app(environ, start_response):
    """CONNECT → a spliced tunnel; GET/HEAD of a path here → a text page; anything else → 405."""
    method = environ["REQUEST_METHOD"]
    target = request_target(environ)

    def deny_logged(status, headers, exc_info=None):
        """connect_tunnel calls start_response only to refuse: log each refusal."""
        log.warning("denied %s %s from %s:%s: %s", method, repr(target)[1:-1],  # escapes: one line
                    environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"), status)
        return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

    if method == "CONNECT":
        started = time.monotonic()
        try:
            return connect_tunnel(environ, deny_logged, allow=ALLOW, pool=POOL, idle=IDLE)
        finally:
            relay = environ.get(PROXY_KEY)
            if relay is not None and relay.done():
                log.info(
                    "tunnel %s:%s -> %s up=%d down=%d duration=%.3fs reason=%s",
                    environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"), target,
                    relay.forward.transferred, relay.reverse.transferred,
                    time.monotonic() - started, relay.reason.name,
                )
            if environ.get(GONE_KEY):  # a reset before the relay started: both sockets closed
                side, why = environ[GONE_KEY]
                where = f"{environ.get('REMOTE_ADDR')}:{environ.get('REMOTE_PORT')}" if side == "client" else target
                log.warning("%s %s went away before the relay started (%s)", side, where, why)
    ours = target.startswith("/")  # origin-form; absolute-form (http://...) is a forward-proxy request
    if ours and method in ("GET", "HEAD"):
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(PAGE)))])
        return [PAGE] if method == "GET" else []
    body = b"method not allowed: use CONNECT\n"
    deny_logged("405 Method Not Allowed", [
        ("Content-Type", "text/plain"), ("Content-Length", str(len(body))),
        ("Allow", "CONNECT, GET, HEAD" if ours else "CONNECT"),
    ])
    return [body] if method != "HEAD" else []


def parse_listen(text):
    """``HOST:PORT`` or ``[V6]:PORT`` (port 0: any free port) → (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def main(argv=None):
    global ALLOW, IDLE, POOL
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT ([V6]:PORT)")
    parser.add_argument("--allow", action="append", default=[], metavar="HOST:PORT",
                        help="allowed target (repeatable; * matches any host or port); "
                             "default: loopback targets only")
    parser.add_argument("--idle", type=float, default=0, help="end a tunnel after this many silent seconds")
    parser.add_argument("--workers", type=int, default=None, help="splice worker threads (default: CPUs)")
    parser.add_argument("--max-conns", type=int, default=10000, help="concurrent connections")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds live tunnels get on SIGTERM")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--backend", choices=["thread", "gevent", "gevent-direct"], default="thread",
                        help="splice workers: OS threads (default), greenlets, or direct dispatch")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    try:
        ALLOW = parse_allow(args.allow) or None
        host, port = parse_listen(args.listen)
    except ValueError as exc:
        parser.error(str(exc))
    IDLE = args.idle or None
    backend = {"thread": {}, "gevent": {"backend": "gevent"},
               "gevent-direct": {"backend": "gevent", "dispatch": "direct"}}[args.backend]
    POOL = splicepool.SplicePool(workers=args.workers, **backend)
    server = WSGIServer((host, port), app, spawn=gevent.pool.Pool(args.max_conns), log=None)
    stop = gevent.event.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        gevent.signal_handler(sig, stop.set)
    server.start()
    log.info("listening on %s:%d, allowing %s", *server.address[:2],
             "loopback targets" if ALLOW is None else ", ".join(f"{h}:{p}" for h, p in ALLOW))
    try:
        stop.wait()
        log.info("stopping: %d connection(s) open", len(server.pool))
        server.stop(timeout=args.grace)  # then kills what is left: each aborts its tunnel
    finally:
        POOL.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
