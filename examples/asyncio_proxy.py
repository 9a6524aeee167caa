"""A TCP proxy on asyncio whose connections are spliced by splicepool.

    python examples/asyncio_proxy.py --listen 127.0.0.1:8080 --connect 127.0.0.1:8000

The event loop only accepts and connects; each connection is then handed to
``splicepool.proxy`` and the handler ``await``s the relay, so the loop never
sees a byte of payload. SIGINT/SIGTERM: stop accepting, give live relays
``--grace`` seconds, abort the rest, close the pool, exit 0.

Who owns the sockets. ``asyncio.start_server`` would hand us a transport that
owns the accepted socket and has already been reading from it into a
StreamReader: taking the socket back means pausing the transport, draining
the reader's private buffer, ``os.dup()``-ing the fd and ``abort()``-ing the
transport (which closes the original), i.e. a second fd per side and a race
with bytes already read. Instead this proxy accepts with ``loop.sock_accept``
on a plain non-blocking listening socket and connects with
``loop.sock_connect``: asyncio only watches those sockets for the one call
and stops watching when it completes, so it never owns them, never reads
payload, and never closes them. Each socket has exactly one owner at a time:
this handler until ``splicepool.proxy()`` returns, the pool afterwards (it
detaches the socket objects and closes the fds when both directions end).
No dup, no double close, two fds per connection.

A client that resets its connection (RST) before the relay starts makes
``splicepool.proxy()`` raise ``OSError(ENOTCONN)``: its checks ask both sockets
for their peer, and a reset socket has none. A failed ``proxy()`` changed
nothing, so the handler still owns both sockets: it closes them and logs one
line (``client 127.0.0.1:5555 went away before the relay started (ENOTCONN)``),
not a connect failure: the upstream did nothing wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import socket
import time

import splicepool

log = logging.getLogger("asyncio_proxy")


def parse_hostport(text: str, option: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{option} {text!r}: expected HOST:PORT ([V6]:PORT)")
    return host.strip("[]") or "0.0.0.0", int(port)


class TcpProxy:
    def __init__(self, connect: tuple[str, int], pool: splicepool.SplicePool,
                 idle: float | None, connect_timeout: float) -> None:
        self.connect = connect
        self.pool = pool
        self.idle = idle
        self.connect_timeout = connect_timeout
        self.handlers: set[asyncio.Task[None]] = set()
        self.count = 0

    async def serve(self, lsock: socket.socket) -> None:
        """Accept until cancelled; one handler task per connection."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, addr = await loop.sock_accept(lsock)
            except OSError as exc:  # EMFILE and friends: back off, keep serving
                log.warning("accept failed: %s", exc)
                await asyncio.sleep(0.1)
                continue
            self.count += 1
            task = asyncio.create_task(self.handle(client, addr, self.count))
            self.handlers.add(task)
            task.add_done_callback(self.handlers.discard)

    async def resolve(self) -> tuple[int, tuple]:
        """The upstream's family and address; a host name is looked up for each connection."""
        host, port = self.connect
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:  # a name: getaddrinfo runs in the loop's default executor
            info = (await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
            return info[0], info[4]
        return (socket.AF_INET6 if ip.version == 6 else socket.AF_INET), (host, port)

    async def handle(self, client: socket.socket, addr: tuple, n: int) -> None:
        """Connect upstream, hand both sockets to the pool, await the relay."""
        loop = asyncio.get_running_loop()
        started = time.monotonic()
        upstream = None
        try:
            family, address = await self.resolve()
            upstream = socket.socket(family, socket.SOCK_STREAM)
            upstream.setblocking(False)
            await asyncio.wait_for(loop.sock_connect(upstream, address), self.connect_timeout)
        except BaseException as exc:  # never connected (or cancelled): the sockets are still ours
            client.close()
            if upstream is not None:
                upstream.close()
            if isinstance(exc, (OSError, asyncio.TimeoutError)):
                log.warning("conn %d %s:%d: cannot connect to %s:%d: %s", n, *addr[:2], *self.connect, exc)
                return
            raise
        try:
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            relay = splicepool.proxy(client, upstream, pool=self.pool, idle=self.idle)
        except BaseException as exc:  # proxy() refused and changed nothing: the sockets are still ours
            gone = splicepool.peer_gone(exc, client=client, upstream=upstream)
            client.close()
            upstream.close()
            if gone is None:
                raise
            host, port = addr[:2] if gone == "client" else self.connect
            log.warning("conn %d: %s %s:%d went away before the relay started (ENOTCONN)", n, gone, host, port)
            return
        try:
            reason = await relay
        except asyncio.CancelledError:  # shutting down after the grace period
            relay.close()
            raise
        log.info("conn %d %s:%d -> %s:%d up=%d down=%d duration=%.3fs reason=%s", n, *addr[:2],
                 *self.connect, relay.forward.transferred, relay.reverse.transferred,
                 time.monotonic() - started, reason.name)


async def main_async(args: argparse.Namespace, listen: tuple[str, int], connect: tuple[str, int]) -> int:
    loop = asyncio.get_running_loop()
    family = socket.AF_INET6 if ":" in listen[0] else socket.AF_INET
    lsock = socket.create_server(listen, family=family, backlog=1024)
    lsock.setblocking(False)
    pool = splicepool.SplicePool(workers=args.workers)
    proxy = TcpProxy(connect, pool, args.idle or None, args.connect_timeout)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("listening on %s:%d, upstream %s:%d", *lsock.getsockname()[:2], *connect)
    server = asyncio.create_task(proxy.serve(lsock))
    try:
        await stop.wait()
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
        lsock.close()
        live = set(proxy.handlers)
        if live:
            log.info("stopping: %d connection(s) live, %.1f s grace", len(live), args.grace)
            _done, pending = await asyncio.wait(live, timeout=args.grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        pool.close()
    log.info("stopped")
    return 0


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
        connect = parse_hostport(args.connect, "--connect")
    except ValueError as exc:
        parser.error(str(exc))
    return asyncio.run(main_async(args, listen, connect))


if __name__ == "__main__":
    raise SystemExit(main())
