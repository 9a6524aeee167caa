"""Connection setup in the CLI's server (issue 13): what an accept loop hands the pool and
how. ``SplicePool.proxy_accepted`` (the server's entry: two sockets it made, not probed),
TCP_NODELAY set once on the listener, a loopback connect taken at once, one wakeup for
many ended relays. Real loopback sockets, exact bytes and counts."""

from __future__ import annotations

import errno
import os
import socket
import threading

import pytest
from conftest import GEVENT, digest, payload, recv_exact, recv_until_eof, reset, wait_until
from test_cli import Upstream

from splicepool import SplicePool, _sockets
from splicepool.server import ProxyServer


def _accepted_pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(the client's end, the accepted end, made non-blocking)."""
    client = socket.create_connection(listener.getsockname()[:2], timeout=10)
    accepted, _ = listener.accept()
    accepted.setblocking(False)
    return client, accepted


def _connected(upstream: socket.socket) -> tuple[socket.socket, socket.socket]:
    """(a non-blocking socket connected to ``upstream``, the upstream's accepted end)."""
    out = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    out.connect(upstream.getsockname()[:2])
    out.setblocking(False)
    far, _ = upstream.accept()
    return out, far


@pytest.fixture
def listeners():
    made = [socket.create_server(("127.0.0.1", 0)) for _ in range(2)]
    yield made
    for s in made:
        s.close()


def test_proxy_accepted_relays_every_byte_both_ways_and_closes_both(listeners):
    front, back = listeners
    client, accepted = _accepted_pair(front)
    up, far = _connected(back)
    with SplicePool(workers=1) as pool:
        a, b = accepted.detach(), up.detach()
        relay = pool.proxy_accepted(a, b, socket.AF_INET, client.getsockname(), far.getsockname())
        assert relay.forward.src.label == f"fd {a} (-> {_sockets._fmt_addr(client.getsockname())})"
        up_data, down_data = payload(3 << 20, seed=1), payload(2 << 20, seed=2)
        sender = threading.Thread(target=lambda: (client.sendall(up_data), client.shutdown(socket.SHUT_WR)))
        sender.start()
        got_up = recv_until_eof(far, timeout=20)
        sender.join()
        far.sendall(down_data)
        far.shutdown(socket.SHUT_WR)
        got_down = recv_until_eof(client, timeout=20)
        assert digest(got_up) == digest(up_data) and len(got_up) == len(up_data)
        assert digest(got_down) == digest(down_data) and len(got_down) == len(down_data)
        assert relay.wait(10).name == "EOF"
        assert (relay.forward.transferred, relay.reverse.transferred) == (len(up_data), len(down_data))
        for fd in (a, b):  # the pool closed both
            with pytest.raises(OSError) as exc:
                os.fstat(fd)
            assert exc.value.errno == errno.EBADF
        assert pool.registry.snapshot() == ({}, {}, {})
    client.close()
    far.close()


def test_proxy_accepted_keeps_the_peers_it_is_given_and_labels_from_them_when_asked(listeners):
    """No label string per socket while a connection idles (issue 13, idle memory): the
    endpoints keep the very peer objects given (the server's: the client as it logs it, the
    backend's address) and a message's label is made from them, as before."""
    front, back = listeners
    client, accepted = _accepted_pair(front)
    up, far = _connected(back)
    with SplicePool(workers=1) as pool:
        a, b = accepted.detach(), up.detach()
        a_peer, b_peer = f"127.0.0.1:{client.getsockname()[1]}", far.getsockname()
        relay = pool.proxy_accepted(a, b, socket.AF_INET, a_peer, b_peer)
        src, dst = relay.forward.src, relay.forward.dst
        assert src.peer is a_peer and dst.peer is b_peer
        assert src.label == f"fd {a} (-> {a_peer})"
        assert dst.label == f"fd {b} (-> 127.0.0.1:{b_peer[1]})"
        assert str(src.fd) in repr(relay.forward) and a_peer in repr(relay.forward)
        client.close()
        far.close()
        assert relay.wait(10).name == "EOF"


def test_proxy_accepted_probes_neither_socket(listeners, monkeypatch):
    def no_probe(*args, **kwargs):
        raise AssertionError("proxy_accepted must not probe")

    monkeypatch.setattr(_sockets, "probe", no_probe)
    front, back = listeners
    client, accepted = _accepted_pair(front)
    up, far = _connected(back)
    with SplicePool(workers=1) as pool:
        relay = pool.proxy_accepted(accepted.detach(), up.detach(), socket.AF_INET,
                                    client.getsockname(), far.getsockname())
        client.sendall(b"ping")
        assert recv_exact(far, 4) == b"ping"
        far.sendall(b"pong")
        assert recv_exact(client, 4) == b"pong"
        client.close()
        far.close()
        relay.wait(10)


def test_proxy_accepted_refuses_a_client_that_reset_and_leaves_both_fds_to_the_caller(listeners):
    front, back = listeners
    client, accepted = _accepted_pair(front)
    up, far = _connected(back)
    reset(client)
    wait_until(lambda: accepted.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) or _gone(accepted),
               what="the reset to arrive")
    with SplicePool(workers=1) as pool:
        a, b = accepted.fileno(), up.fileno()
        with pytest.raises(OSError) as exc:
            pool.proxy_accepted(a, b, socket.AF_INET, ("127.0.0.1", 1), far.getsockname())
        assert exc.value.errno == errno.ENOTCONN
        assert str(exc.value).endswith(f"a fd {a} (127.0.0.1:{front.getsockname()[1]}) is not connected")
        assert pool.registry.snapshot() == ({}, {}, {})
        os.fstat(a), os.fstat(b)  # still open: the caller's to close
        assert up.gettimeout() == 0.0 and accepted.fileno() == a
    accepted.close()
    up.close()
    far.close()


def _gone(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return True
    return False


# -- the server ------------------------------------------------------------------------------
needs_threads = pytest.mark.skipif(GEVENT, reason="a threaded server of its own: runs in the thread run")


class Served:
    """A ProxyServer in front of an echo upstream, serving in a thread of the test."""

    def __init__(self, **kwargs) -> None:
        self.upstream = Upstream()
        self.pool = SplicePool(workers=1)
        self.server = ProxyServer(("127.0.0.1", 0), (self.upstream.host, self.upstream.port),
                                  pool=self.pool, **kwargs)
        self.port = self.server.address[1]
        self.loop = threading.Thread(target=self.server.serve_forever, kwargs={"grace": 5.0})

    def start(self) -> Served:
        self.loop.start()
        return self

    def echo(self, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as c:
            c.sendall(data)
            c.shutdown(socket.SHUT_WR)
            return recv_until_eof(c)

    def close(self) -> None:
        self.server.stop()
        self.loop.join(20)
        self.upstream.close()


@needs_threads
def test_the_server_hands_over_without_probing_and_without_waiting_for_a_loopback_connect(monkeypatch):
    probes = []
    probe = _sockets.probe
    monkeypatch.setattr(_sockets, "probe", lambda *a, **k: probes.append(a) or probe(*a, **k))
    served = Served()
    registered = []
    register = served.server._sel.register
    served.server._sel.register = lambda obj, events, data=None: (
        registered.append(events), register(obj, events, data))[1]
    served.start()
    try:
        for i in range(5):
            data = payload(100_000 + i, seed=i)
            assert served.echo(data) == data
        wait_until(lambda: served.server.counters.finished == 5, what="5 relays logged")
    finally:
        served.close()
    assert probes == []  # before: 2 per connection (pool.proxy probed both sockets)
    # before: the upstream of each was registered for EVENT_WRITE until it connected
    assert 2 not in registered  # selectors.EVENT_WRITE
    assert served.server.counters.failed_connects == 0


@needs_threads
@pytest.mark.parametrize("nodelay", [True, False])
def test_nodelay_is_set_once_on_the_listener_and_the_accepted_sockets_inherit_it(nodelay, monkeypatch):
    served = Served(nodelay=nodelay)
    set_calls = []
    real = socket.socket.setsockopt
    monkeypatch.setattr(socket.socket, "setsockopt",
                        lambda self, *a: (set_calls.append(a[:2]), real(self, *a))[1])
    served.start()
    seen = []
    try:
        assert served.server.listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == int(nodelay)
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", served.port), timeout=10) as c:
                c.sendall(b"x")
                assert recv_exact(c, 1) == b"x"

                def client_side():
                    sources = served.pool.registry.snapshot()[0]
                    return [sp.src.sock for sp in sources.values() if sp.src.fd != sp.relay.reverse.src.fd]

                socks = wait_until(client_side, what="the relay")
                seen.append(socks[0].getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
    finally:
        served.close()
    assert seen == [int(nodelay)] * 3
    # per connection, only the upstream's TCP_NODELAY is set (before: the client's too)
    nodelays = [c for c in set_calls if c == (socket.IPPROTO_TCP, socket.TCP_NODELAY)]
    assert len(nodelays) == (3 if nodelay else 0)


@needs_threads
def test_many_wakeups_before_the_loop_reads_cost_one_byte():
    served = Served()
    try:
        server = served.server
        for _ in range(5):
            server._wake()
        assert os.read(server._wake_r, 4096) == b"x"
        server._wake_pending = False  # what the loop does after its read
        server._wake()
        assert os.read(server._wake_r, 4096) == b"x"
        server._wake_pending = False
    finally:
        served.loop.start()
        served.close()


def _epoll_targets(epfd: int) -> set[int]:
    """The fds registered in the epoll instance ``epfd`` (its /proc fdinfo: a ``tfd:`` line each)."""
    with open(f"/proc/self/fdinfo/{epfd}") as f:
        return {int(line.split()[1]) for line in f if line.startswith("tfd:")}


def test_a_relay_of_proxy_accepted_ends_with_close_alone_and_leaves_nothing_registered(listeners, monkeypatch):
    """The pool holds the only fd of each socket: no epoll_ctl DEL and no second shutdown()
    before the close (the close sends the FIN, and drops the registration): the client still
    gets every byte and a FIN, and the worker's epoll holds nothing of the relay after it."""
    from splicepool import _hub

    removed = []
    remove = _hub.EpollHub.remove
    monkeypatch.setattr(_hub.EpollHub, "remove", lambda self, fd: (removed.append(fd), remove(self, fd))[1])
    front, back = listeners
    with SplicePool(workers=1) as pool:
        for i in range(3):
            client, accepted = _accepted_pair(front)
            up, far = _connected(back)
            relay = pool.proxy_accepted(accepted.detach(), up.detach(), socket.AF_INET,
                                        client.getsockname(), far.getsockname())
            data = payload(200_000 + i, seed=10 + i)
            client.sendall(data)
            client.shutdown(socket.SHUT_WR)
            assert recv_until_eof(far) == data
            far.sendall(data[::-1])
            far.shutdown(socket.SHUT_WR)
            assert recv_until_eof(client) == data[::-1]  # then EOF: a FIN, not a reset
            assert relay.wait(10).name == "EOF"
            client.close()
            far.close()
        hub = pool.worker(0).hub
        if isinstance(hub, _hub.EpollHub):
            assert removed == []
            assert _epoll_targets(hub._ep.fileno()) == {hub._waker.rfd}
        assert len(hub) == 0


def test_relays_queued_without_a_wakeup_move_once_their_worker_is_woken(listeners):
    front, back = listeners
    with SplicePool(workers=1) as pool:
        pool.start()
        worker = pool.worker(0)
        wakes = []
        wake = worker.hub.wake
        worker.hub.wake = lambda: (wakes.append(1), wake())[1]
        pairs = []
        for _ in range(3):
            client, accepted = _accepted_pair(front)
            up, far = _connected(back)
            pool.proxy_accepted(accepted.detach(), up.detach(), socket.AF_INET, client.getsockname(),
                                far.getsockname(), wake=False)
            pairs.append((client, far))
        assert wakes == [] and len(worker.control) == 6  # queued: two Adds per relay
        pool.wake_workers()
        pool.wake_workers()  # nothing left to wake: no second wakeup
        assert wakes == [1]
        for i, (client, far) in enumerate(pairs):
            data = payload(70_000, seed=20 + i)
            client.sendall(data)
            assert recv_exact(far, len(data)) == data
            client.close()
            far.close()


@needs_threads
def test_an_accept_burst_wakes_the_worker_once():
    served = Served()
    server = served.server
    server.pool.start()
    worker = server.pool.worker(0)
    wakes = []
    wake = worker.hub.wake
    worker.hub.wake = lambda: (wakes.append(1), wake())[1]
    clients = [socket.create_connection(("127.0.0.1", served.port), timeout=10) for _ in range(5)]
    try:
        server._set_accepting(True)  # what serve_forever does first; the 5 wait in the backlog
        server._run_once(server._sel.select(5))  # one burst: all 5 accepted, connected, handed over
        assert server.counters.accepted == 5 and server.counters.live == 5
        assert wakes == [1]  # before: one per relay handed over (unless the worker was awake)
        for i, c in enumerate(clients):
            data = payload(50_000, seed=30 + i)
            c.sendall(data)
            assert recv_exact(c, len(data)) == data
    finally:
        for c in clients:
            c.close()
        served.start()
        served.close()
