"""The proxy tier from Python, as docs/proxy-tier.md shows it: ``Routes`` and ``ProxyServer``
in a thread of the test's own process, several backends, a reload from another thread that
keeps a backend's counters, and the exact per-backend stats. Real loopback sockets."""

from __future__ import annotations

import socket
import threading

import pytest
from conftest import GEVENT, digest, payload, recv_exact, wait_until
from test_cli import Upstream

from splicepool import SplicePool
from splicepool.routes import Routes
from splicepool.server import ProxyServer

pytestmark = pytest.mark.skipif(GEVENT, reason="a threaded server of its own: runs in the thread run")


def tagged(tag: bytes):
    """A backend that answers its tag, then echoes until EOF."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(tag)
        while data := conn.recv(65536):
            conn.sendall(data)

    return handler


def through(port: int, data: bytes) -> tuple[bytes, str]:
    """One connection: the backend's tag, and the sha256 of ``data`` echoed back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        tag = recv_exact(sock, 1)
        sender = threading.Thread(target=sock.sendall, args=(data,))
        sender.start()
        echoed = recv_exact(sock, len(data))
        sender.join()
        return tag, digest(echoed)


@pytest.fixture
def backends():
    made = [Upstream(tagged(tag)) for tag in (b"A", b"B", b"C")]
    yield made
    for up in made:
        up.close()


def test_routes_and_proxy_server_serve_reload_and_count_per_backend(backends):
    a, b, c = backends
    pool = SplicePool(workers=2)
    server = ProxyServer(("127.0.0.1", 0), Routes([(a.host, a.port), (b.host, b.port)]), pool=pool)
    port = server.address[1]
    loop = threading.Thread(target=server.serve_forever, kwargs={"grace": 5.0})
    loop.start()
    try:
        data = payload(256 * 1024, seed=14)
        want = digest(data)
        assert [through(port, data) for _ in range(4)] == [(b"A", want), (b"B", want)] * 2
        old = server.routes
        backend_b = old.backends[1]
        reloaded = threading.Thread(
            target=server.reload, args=(Routes([(b.host, b.port), (c.host, c.port)], reuse=old),)
        )
        reloaded.start()
        reloaded.join()
        wait_until(lambda: server.routes is not old, what="the reload applied by the loop")
        assert server.routes.backends[0] is backend_b  # the same backend: its counters go on
        assert [through(port, data)[0] for _ in range(4)] == [b"B", b"C", b"B", b"C"]
        stats = wait_until(
            lambda: (s := server.stats())["connections"]["finished"] == 8 and s, what="8 finished"
        )
        per = {entry["name"]: (entry["connections"], entry["bytes_up"], entry["bytes_down"])
               for entry in stats["backends"]}
        n = len(data)
        assert per == {b.addr: (4, 4 * n, 4 * (n + 1)), c.addr: (2, 2 * n, 2 * (n + 1))}
        assert stats["connections"]["reloads"] == 1
        assert stats["routes"]["backends"] == [b.addr, c.addr]
    finally:
        server.stop()
        loop.join(10)
    assert not loop.is_alive()


def test_a_server_name_given_several_backends_spreads_over_them_by_the_balance():
    """--sni a.test=A --sni a.test=B: a.test's connections go to A and B in turn (the
    balance of --connect's), never to the default; the same pair twice is refused, naming it."""
    ups = [Upstream(tagged(tag)) for tag in (b"A", b"B", b"D")]
    try:
        a, b, d = ((u.host, u.port) for u in ups)
        routes = Routes([d], sni=[("a.test", a), ("A.Test.", b), ("*.w.test", a)])
        picks = [routes.order("127.0.0.1", "a.test")[0].name for _ in range(4)]
        assert picks == [ups[0].addr, ups[1].addr] * 2
        assert [x.name for x in routes.order("127.0.0.1", "x.w.test")] == [ups[0].addr]
        assert [x.name for x in routes.order("127.0.0.1", "other.test")] == [ups[2].addr]
        assert routes.options()["sni"] == {"a.test": [ups[0].addr, ups[1].addr], "*.w.test": [ups[0].addr]}
        assert routes.describe().endswith(
            f"; by server name: a.test -> {ups[0].addr}, {ups[1].addr}, *.w.test -> {ups[0].addr}")
        with pytest.raises(ValueError, match=rf"^server name a\.test is routed to {ups[0].addr} twice$"):
            Routes([d], sni=[("a.test", a), ("a.test.", a)])
    finally:
        for u in ups:
            u.close()


def test_the_servers_head_bound_is_the_two_parsers_bounds():
    """server.HEAD_MAX is written as a number (so that a proxy without --sni never loads
    splicepool.sni): it must stay a PROXY header's bound plus the ClientHello's."""
    from splicepool import server, sni
    from splicepool.routes import PROXY_HEADER_MAX

    assert server.HEAD_MAX == PROXY_HEADER_MAX + sni.MAX_HELLO
