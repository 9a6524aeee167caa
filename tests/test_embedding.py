"""Embedding mistakes that splicepool refuses up front, with real asyncio servers on loopback.

``writer.get_extra_info("socket")`` is an ``asyncio.trsock.TransportSocket``:
its transport owns the fd and reads from it. Handing it to the pool would
give the fd two owners (the transport's reads race the workers', and one of
them fails with EBADF once the other closes it), so ``proxy()`` and
``splice()`` refuse it with a ``TypeError`` that names the right pattern, and
the refusal changes nothing: the connection still works for asyncio.
"""

from __future__ import annotations

import asyncio
import os
import re
import socket

from conftest import open_fds, recv_exact, tcp_pair

import splicepool

HINT = re.compile(
    r"asyncio TransportSocket .*loop\.sock_accept\(\).*examples/asyncio_proxy\.py", re.S
)


def _attempts(pool: splicepool.SplicePool, tsock: object, other: socket.socket) -> list:
    """Every public way of handing ``tsock`` to the pool, with the role the error must name."""
    return [
        ("a", lambda: splicepool.proxy(tsock, other, pool=pool)),
        ("b", lambda: pool.proxy(other, tsock)),
        ("source", lambda: pool.splice(tsock, other)),
        ("drain", lambda: pool.splice(other, tsock)),
        ("source", lambda: pool.unsplice(tsock)),
    ]


def test_asyncio_transport_socket_is_refused_and_the_connection_still_works(pool):
    upstream, upstream_peer = tcp_pair()  # the connection a handler would relay to
    results: dict[str, object] = {}

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readexactly(8)  # asyncio has read the request: it owns the stream
        tsock = writer.get_extra_info("socket")
        assert type(tsock).__module__ == "asyncio.trsock", type(tsock)
        fd, ufd = tsock.fileno(), upstream.fileno()
        before = (open_fds(), os.get_blocking(fd), os.get_blocking(ufd), fd, ufd)
        errors: list[tuple[str, str]] = []
        results["errors"] = errors
        for role, attempt in _attempts(pool, tsock, upstream):
            try:
                attempt()
            except TypeError as exc:
                errors.append((role, str(exc)))
            except Exception as exc:  # noqa: BLE001 - recorded, the test reports it
                errors.append((role, f"{type(exc).__name__}: {exc}"))
            else:
                errors.append((role, "accepted"))
        results["live"] = pool.stats()["live"]
        try:
            after = (open_fds(), os.get_blocking(fd), os.get_blocking(ufd), tsock.fileno(), upstream.fileno())
        except OSError as exc:
            after = exc
        results["unchanged"] = before == after or (before, after)
        # The refusal changed nothing: asyncio still reads and writes this connection.
        more = await reader.readexactly(6)
        writer.write(b"echo:" + request + more)
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main() -> bytes:
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"request1")
            await writer.drain()
            writer.write(b"second")
            await writer.drain()
            reply = await reader.read()  # to EOF
            writer.close()
            await writer.wait_closed()
            return reply

    reply = asyncio.run(asyncio.wait_for(main(), 20))
    try:
        errors = results["errors"]
        assert [role for role, _ in errors] == ["a", "b", "source", "drain", "source"], errors
        for role, text in errors:
            assert text.startswith(f"{role} is an asyncio TransportSocket"), (role, text)
            assert HINT.search(text), text
        assert results["unchanged"] is True
        assert results["live"] == 0
        assert reply == b"echo:request1second"
        # the upstream socket is still ours and still works, both ways
        upstream.sendall(b"ping")
        assert recv_exact(upstream_peer, 4) == b"ping"
        upstream_peer.sendall(b"pong")
        assert recv_exact(upstream, 4) == b"pong"
    finally:
        upstream.close()
        upstream_peer.close()


def test_the_check_leaves_a_plain_socket_from_sock_accept_alone(pool):
    """The pattern the error names: ``loop.sock_accept()`` on a plain socket, then ``proxy()``."""
    upstream, upstream_peer = tcp_pair()

    async def main() -> bytes:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        with lsock:
            client = socket.create_connection(lsock.getsockname()[:2], timeout=10)
            accepted, _addr = await loop.sock_accept(lsock)
            relay = splicepool.proxy(accepted, upstream, pool=pool)
            client.sendall(b"hello")
            got = await loop.run_in_executor(None, recv_exact, upstream_peer, 5)
            upstream_peer.sendall(b"world")
            back = await loop.run_in_executor(None, recv_exact, client, 5)
            client.close()
            upstream_peer.shutdown(socket.SHUT_WR)
            assert await asyncio.wait_for(relay, 10) is splicepool.EndReason.EOF
            return got + back

    try:
        assert asyncio.run(asyncio.wait_for(main(), 20)) == b"helloworld"
    finally:
        upstream_peer.close()
