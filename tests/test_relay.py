"""proxy(): two splices, half-close forwarding, one lifetime for both sockets."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import socket
import struct
import threading
import time

import pytest
from conftest import fd_count, recv_exact, recv_until_eof, tcp_pair

import splicepool
from splicepool import EndReason, Proxy, SplicePool


class Relay:
    """client ⇄ a [proxy] b ⇄ server, all on loopback."""

    def __init__(self) -> None:
        self.client, self.a = tcp_pair()
        self.b, self.server = tcp_pair()

    def close(self) -> None:
        for s in (self.client, self.a, self.b, self.server):
            s.close()


def assert_reset(sock: socket.socket) -> None:
    """The peer of a cut relay reads a reset, never a clean end of stream."""
    sock.settimeout(5)
    with pytest.raises(ConnectionResetError):
        while sock.recv(1 << 16):
            pass


@pytest.fixture
def relay():
    r = Relay()
    yield r
    r.close()


def _settle_fds(pool: SplicePool) -> int:
    """fd count with every worker started (its hub's fds open) and no pipe cached."""
    pool.start()
    for index in range(pool.workers):
        pool.worker(index).xfer.pipes.keep = 0
    return fd_count()


def test_wait_false_hands_over_at_once_and_moves_early_data_like_a_waiting_call(pool, relay):
    """proxy(wait=False) returns before the workers have taken the relay up (an accept loop
    never waits on them); bytes queued before the call still move first, whole."""
    early, late = os.urandom(50_000), os.urandom(70_000)
    relay.client.sendall(early)
    px = pool.proxy(relay.a, relay.b, wait=False)
    assert relay.a.fileno() == -1 and relay.b.fileno() == -1  # handed over at once
    relay.client.sendall(late)
    relay.client.shutdown(socket.SHUT_WR)
    assert hashlib.sha256(recv_until_eof(relay.server)).digest() == hashlib.sha256(early + late).digest()
    relay.server.close()
    assert px.wait(10) is EndReason.EOF
    assert (px.forward.transferred, px.reverse.transferred) == (len(early) + len(late), 0)


def test_half_close_is_forwarded_and_the_reply_still_flows(pool, relay):
    px = pool.proxy(relay.a, relay.b)
    request = os.urandom(100_000)
    relay.client.sendall(request)
    relay.client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(relay.server) == request  # the server saw our FIN
    reply = os.urandom(3_000_000)
    relay.server.sendall(reply)
    relay.server.shutdown(socket.SHUT_WR)
    assert hashlib.sha256(recv_until_eof(relay.client)).digest() == hashlib.sha256(reply).digest()
    assert px.wait(10) is EndReason.EOF
    assert (px.forward.reason, px.reverse.reason) == (EndReason.EOF, EndReason.EOF)
    assert (px.forward.transferred, px.reverse.transferred) == (len(request), len(reply))
    assert px.done() and px.error is None


def test_half_close_from_the_server_side_first(pool, relay):
    px = pool.proxy(relay.a, relay.b)
    relay.server.sendall(b"banner\n")
    relay.server.shutdown(socket.SHUT_WR)
    assert recv_until_eof(relay.client) == b"banner\n"
    relay.client.sendall(b"late words")
    relay.client.shutdown(socket.SHUT_WR)
    assert recv_until_eof(relay.server) == b"late words"
    assert px.wait(10) is EndReason.EOF


def test_many_mib_both_ways_at_once(pool, relay):
    px = pool.proxy(relay.a, relay.b)
    up, down = os.urandom(16 << 20), os.urandom(16 << 20)
    got: dict[str, bytes] = {}
    threads = [
        threading.Thread(target=lambda: (relay.client.sendall(up), relay.client.shutdown(socket.SHUT_WR))),
        threading.Thread(target=lambda: (relay.server.sendall(down), relay.server.shutdown(socket.SHUT_WR))),
        threading.Thread(target=lambda: got.__setitem__("up", recv_until_eof(relay.server, 30))),
        threading.Thread(target=lambda: got.__setitem__("down", recv_until_eof(relay.client, 30))),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert hashlib.sha256(got["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(got["down"]).digest() == hashlib.sha256(down).digest()
    assert px.wait(10) is EndReason.EOF


def test_the_pool_owns_both_sockets_and_closes_them(pool, relay):
    a_fd, b_fd = relay.a.fileno(), relay.b.fileno()
    before = _settle_fds(pool)
    px = pool.proxy(relay.a, relay.b)
    assert relay.a.fileno() == -1 and relay.b.fileno() == -1  # handed over (detached)
    assert fd_count() == before  # no duplicates: the connection costs its two fds
    relay.client.close()
    relay.server.close()
    assert px.wait(10) is EndReason.EOF
    assert fd_count() == before - 4  # client and server closed by us, a and b by the pool
    for fd in (a_fd, b_fd):
        with pytest.raises(OSError) as info:
            os.fstat(fd)
        assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("side", ["client", "server"])
def test_a_reset_on_either_side_ends_both_directions(pool, relay, side):
    px = pool.proxy(relay.a, relay.b)
    peer = relay.client if side == "client" else relay.server
    other = relay.server if side == "client" else relay.client
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    peer.close()
    assert px.wait(10) is EndReason.ERROR
    assert px.error is not None and px.error.errno in (errno.ECONNRESET, errno.EPIPE)
    reasons = {px.forward.reason, px.reverse.reason}
    assert EndReason.ERROR in reasons
    assert_reset(other)  # the relay passed the reset on: no FIN that looks like a clean end


def test_idle_counts_both_directions(pool, relay):
    px = pool.proxy(relay.a, relay.b, idle=0.3)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # traffic one way only, for more than 3 x idle
        relay.server.sendall(b"x")
        assert recv_exact(relay.client, 1) == b"x"
        time.sleep(0.08)  # the one-way trickle under test: never idle for 0.3 s
    assert not px.done()
    start = time.monotonic()
    assert px.wait(5) is EndReason.IDLE
    assert 0.2 < time.monotonic() - start < 2.0
    assert_reset(relay.client)  # cut by the timer: a reset, not a clean end of stream
    assert_reset(relay.server)


def test_without_half_close_one_eof_ends_both(pool, relay):
    px = pool.proxy(relay.a, relay.b, half_close=False)
    relay.client.shutdown(socket.SHUT_WR)
    assert px.wait(5) is EndReason.EOF
    assert px.reverse.reason is EndReason.UNSPLICED
    assert recv_until_eof(relay.client) == b""


def test_close_aborts_and_callbacks_run_once(pool, relay):
    px = pool.proxy(relay.a, relay.b)
    calls: list[Proxy] = []
    px.add_done_callback(calls.append)
    px.close()
    assert px.wait(5) is EndReason.UNSPLICED
    assert calls == [px]
    px.add_done_callback(calls.append)  # already done: at once
    assert calls == [px, px]
    px.close()  # idempotent


def test_await_proxy_in_asyncio(pool, relay):
    px = pool.proxy(relay.a, relay.b)

    async def main() -> EndReason:
        relay.client.close()
        relay.server.close()
        return await px

    assert asyncio.run(main()) is EndReason.EOF


def test_pool_close_ends_the_relay_and_closes_its_sockets(relay):
    p = SplicePool(workers=2)
    px = p.proxy(relay.a, relay.b)
    p.close()
    assert px.done() and px.reason is EndReason.POOL_CLOSED
    assert_reset(relay.client)
    assert_reset(relay.server)


def test_bad_requests_change_nothing(pool, relay):
    with pytest.raises(OSError) as info:
        pool.proxy(relay.a, relay.a)
    assert info.value.errno == errno.EINVAL
    sp = pool.splice(relay.a, relay.server)  # a is now a busy source
    fds = fd_count()
    with pytest.raises(OSError) as info:
        pool.proxy(relay.a, relay.b)
    assert info.value.errno == errno.EBUSY and "already spliced" in str(info.value)
    assert relay.b.fileno() != -1 and relay.a.fileno() != -1  # not taken over
    assert fd_count() == fds
    assert relay.b.getblocking()
    sp.unsplice()
    sp.wait(5)
    with pytest.raises(TypeError):
        pool.proxy(relay.a, relay.b, idle="soon")


def test_module_level_proxy_uses_the_given_pool(pool, relay):
    px = splicepool.proxy(relay.a, relay.b, pool=pool)
    assert px.pool is pool
    assert px.forward.owner is pool.worker(px.forward.worker) is px.reverse.owner
    relay.client.close()
    relay.server.close()
    assert px.wait(5) is EndReason.EOF


def test_peer_gone_names_the_side_that_reset_before_the_relay(pool, relay):
    """A client that already reset makes proxy() raise ENOTCONN and change nothing;
    peer_gone() says which side it was, and None for any other error."""
    relay.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    relay.client.close()
    with pytest.raises(OSError) as info:
        pool.proxy(relay.a, relay.b)
    assert info.value.errno == errno.ENOTCONN
    assert relay.a.fileno() != -1 and relay.b.fileno() != -1  # still the caller's
    assert splicepool.peer_gone(info.value, client=relay.a, upstream=relay.b) == "client"
    assert splicepool.peer_gone(OSError(errno.ECONNREFUSED, "refused"), client=relay.a) is None
    assert splicepool.peer_gone(ValueError("x"), client=relay.a) is None
