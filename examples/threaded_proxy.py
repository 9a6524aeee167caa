"""A TCP proxy on socketserver.ThreadingTCPServer whose connections are spliced by splicepool.

    python examples/threaded_proxy.py --listen 127.0.0.1:8080 --connect 127.0.0.1:8000

The handler thread only connects upstream and hands both sockets to
``splicepool.proxy``, then returns: no thread is held per connection, the
pool's worker threads move the bytes. SIGINT/SIGTERM: stop accepting, give
live relays ``--grace`` seconds, abort the rest, close the pool, exit 0.

A client that resets its connection (RST) before the relay starts makes
``splicepool.proxy()`` raise ``OSError(ENOTCONN)``: its checks ask both sockets
for their peer, and a reset socket has none. A failed ``proxy()`` changed
nothing, so the handler still owns both sockets: it closes the upstream it
connected, logs one line (``client 127.0.0.1:5555 went away before the relay
started (ENOTCONN)``) and returns; socketserver closes the client.

socketserver shuts down and closes ``self.request`` once ``handle()`` returns.
That is harmless here: ``splicepool.proxy()`` detached the socket object (the
pool owns the fd now), so the server's ``shutdown()`` fails with EBADF (which
socketserver ignores) and its ``close()`` is a no-op.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import socketserver
import threading
import time

import splicepool

log = logging.getLogger("threaded_proxy")


def parse_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{option} {text!r}: expected HOST:PORT ([V6]:PORT)")
    return host.strip("[]") or "0.0.0.0", int(port)


class Handler(socketserver.BaseRequestHandler):
    server: Server

    def handle(self) -> None:
        srv = self.server
        started = time.monotonic()
        try:
            upstream = socket.create_connection(srv.upstream, timeout=srv.connect_timeout)
        except OSError as exc:
            log.warning("%s:%d: cannot connect to %s:%d: %s", *self.client_address[:2], *srv.upstream, exc)
            return  # socketserver closes the client
        try:
            for sock in (self.request, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relay = splicepool.proxy(self.request, upstream, pool=srv.pool, idle=srv.idle)
        except BaseException as exc:
            gone = splicepool.peer_gone(exc, client=self.request, upstream=upstream)
            upstream.close()  # proxy() failed and changed nothing; socketserver closes the client
            if gone is None:
                raise
            host, port = self.client_address[:2] if gone == "client" else srv.upstream
            log.warning("%s %s:%d went away before the relay started (ENOTCONN)", gone, host, port)
            return
        srv.started(relay, self.client_address, started)
        # Return now: the pool owns both sockets (self.request is detached).


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True
    request_queue_size = 1024

    def __init__(self, listen: tuple[str, int], upstream: tuple[str, int], pool: splicepool.SplicePool,
                 idle: float | None, connect_timeout: float) -> None:
        self.address_family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
        super().__init__(listen, Handler)
        self.upstream = upstream
        self.pool = pool
        self.idle = idle
        self.connect_timeout = connect_timeout
        self.live: set[splicepool.Proxy] = set()
        self.lock = threading.Lock()
        self.all_done = threading.Condition(self.lock)

    def started(self, relay: splicepool.Proxy, peer: tuple, started: float) -> None:
        with self.lock:
            self.live.add(relay)

        def done(relay: splicepool.Proxy) -> None:  # runs in a pool worker thread: keep it short
            with self.lock:
                self.live.discard(relay)
                self.all_done.notify_all()
            log.info("%s:%d -> %s:%d up=%d down=%d duration=%.3fs reason=%s", *peer[:2], *self.upstream,
                     relay.forward.transferred, relay.reverse.transferred,
                     time.monotonic() - started, relay.reason.name)

        relay.add_done_callback(done)

    def drain(self, grace: float) -> None:
        """Wait up to ``grace`` seconds for live relays, then abort the rest."""
        deadline = time.monotonic() + grace
        with self.lock:
            while self.live and time.monotonic() < deadline:
                self.all_done.wait(deadline - time.monotonic())
            left = list(self.live)
        for relay in left:
            relay.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:8080", help="HOST:PORT ([V6]:PORT)")
    parser.add_argument("--connect", required=True, help="the upstream, HOST:PORT")
    parser.add_argument("--idle", type=float, default=0, help="end a relay after this many silent seconds")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=None, help="splice worker threads (default: CPUs)")
    parser.add_argument("--grace", type=float, default=5.0, help="seconds live relays get on SIGTERM")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(process)d %(levelname)s %(message)s")
    try:
        listen = parse_hostport(args.listen, "--listen")
        upstream = parse_hostport(args.connect, "--connect")
    except ValueError as exc:
        parser.error(str(exc))
    pool = splicepool.SplicePool(workers=args.workers)
    server = Server(listen, upstream, pool, args.idle or None, args.connect_timeout)

    def on_signal(signum: int, frame: object) -> None:
        # serve_forever() runs in this (the main) thread: shutdown() must come from another.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    log.info("listening on %s:%d, upstream %s:%d", *server.server_address[:2], *upstream)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        if server.live:
            log.info("stopping: %d connection(s) live, %.1f s grace", len(server.live), args.grace)
        server.drain(args.grace)
        pool.close()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
