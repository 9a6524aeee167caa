"""A loop hosted on a worker (``SplicePool.host``, ``engine.Worker._host``): what the CLI's
server runs its accept loop on (``ProxyServer(on_worker=True)``).

The guest here is a real client of the protocol: it reads a socket one byte per step,
so the level-triggered registration must bring it back for what it left.
"""

from __future__ import annotations

import errno
import socket
import threading
import time

import pytest
from conftest import GEVENT, Link, digest, payload, recv_exact, recv_until_eof, thread_count, until
from test_cli import Upstream  # an echo server

from splicepool import EndReason, SplicePool
from splicepool.server import ProxyServer

threads_only = pytest.mark.skipif(GEVENT, reason="host() is for the thread backend (gevent: refused, tested below)")

INF = float("inf")


class Guest:
    """Reads one byte of ``sock`` per step; finishes after a ``!``; records each step's thread."""

    def __init__(self, sock: socket.socket, *, due: float = INF, fail: BaseException | None = None) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()
        self.due = due  # returned by the first step; later steps return INF
        self.fail = fail
        self.threads: list[int] = []
        self.times: list[float] = []
        self.got = bytearray()
        self.told: list[BaseException | None] = []
        self.ended = threading.Event()

    def step(self, now: float) -> float | None:
        self.threads.append(threading.get_ident())
        self.times.append(time.monotonic())
        if self.fail is not None:
            raise self.fail
        try:
            self.got += self.sock.recv(1)
        except BlockingIOError:
            pass
        if self.got.endswith(b"!"):
            return None
        due, self.due = self.due, INF
        return due

    def unhosted(self, exc: BaseException | None) -> None:
        self.told.append(exc)
        self.ended.set()


def moves(pool: SplicePool) -> bool:
    """The worker still splices: 1 MiB through a fresh splice, byte for byte."""
    link = Link()
    try:
        body = payload(1 << 20, 7)
        sp = pool.splice(link.src, link.dst)
        link.peer_src.sendall(body)
        assert digest(recv_exact(link.peer_dst, len(body))) == digest(body)
        pool.unsplice(link.src)
        return sp.reason is EndReason.UNSPLICED
    finally:
        link.close()


@threads_only
@pytest.mark.parametrize("hub", ["epoll", "selector"])
def test_a_guest_steps_on_the_worker_until_it_has_read_everything_then_finishes(hub):
    with SplicePool(workers=1, hub=hub) as pool:
        a, b = socket.socketpair()
        with a, b:
            guest = Guest(a)
            b.sendall(b"abc!")
            pool.host(guest)
            assert guest.ended.wait(10)
            assert bytes(guest.got) == b"abc!"  # one byte a step: 4 steps at least, none lost
            assert guest.told == [None]
            assert set(guest.threads) == {pool.worker(0).thread_id}
            steps = len(guest.threads)
            b.sendall(b"more")  # no longer watched: no step for it
            assert moves(pool)
            assert len(guest.threads) == steps and bytes(guest.got) == b"abc!"


@threads_only
@pytest.mark.parametrize("hub", ["epoll", "selector"])
def test_a_step_runs_at_the_deadline_the_last_one_returned_with_nothing_to_read(hub):
    with SplicePool(workers=1, hub=hub) as pool:
        a, b = socket.socketpair()
        with a, b:
            guest = Guest(a, due=time.monotonic() + 0.2)
            pool.host(guest)
            assert until(lambda: len(guest.threads) >= 2, 10)
            assert guest.times[1] >= guest.times[0] + 0.15  # epoll's timeout is in ms
            assert guest.got == b"" and guest.told == []
            b.sendall(b"!")
            assert guest.ended.wait(10)
            assert guest.told == [None]


@threads_only
def test_a_step_that_raises_ends_that_guest_not_the_worker_and_another_may_be_hosted():
    with SplicePool(workers=1) as pool:
        a, b = socket.socketpair()
        with a, b:
            bug = RuntimeError("a bug in the guest")
            guest = Guest(a, fail=bug)
            pool.host(guest)
            assert guest.ended.wait(10)
            assert guest.told == [bug] and len(guest.threads) == 1
            assert moves(pool)
            again = Guest(a)
            pool.host(again)
            b.sendall(b"!")
            assert again.ended.wait(10) and again.told == [None]


@threads_only
def test_one_guest_at_a_time_a_second_is_told_why_and_the_first_goes_on():
    with SplicePool(workers=1) as pool:
        a, b = socket.socketpair()
        c, d = socket.socketpair()
        with a, b, c, d:
            first, second = Guest(a), Guest(c)
            pool.host(first)
            pool.host(second)
            assert second.ended.wait(10)
            assert len(second.told) == 1 and isinstance(second.told[0], RuntimeError)
            assert "already hosts" in str(second.told[0]) and second.threads == []
            b.sendall(b"!")
            assert first.ended.wait(10) and first.told == [None]


@threads_only
def test_closing_the_pool_tells_its_guest_eshutdown_and_leaves_no_thread():
    before = thread_count()
    pool = SplicePool(workers=1)
    a, b = socket.socketpair()
    with a, b:
        guest = Guest(a)
        pool.host(guest)
        assert until(lambda: guest.threads, 10)
        pool.close()
        assert guest.ended.is_set()  # told before close() returned
        [exc] = guest.told
        assert isinstance(exc, OSError) and exc.errno == errno.ESHUTDOWN
        assert "worker 0 stopped: the pool was closed" in str(exc)
    assert until(lambda: thread_count() == before, 5)


@threads_only
def test_a_closed_pool_refuses_a_guest():
    pool = SplicePool(workers=1)
    pool.close()
    a, b = socket.socketpair()
    with a, b, pytest.raises(RuntimeError):
        pool.host(Guest(a))


@threads_only
def test_server_on_worker_runs_its_loop_and_callbacks_on_the_first_worker():
    """ProxyServer(on_worker=True): connections proxied byte for byte, on_finished called on
    worker 0's thread, and stop() ends serve_forever in the calling thread as without it."""
    upstream = Upstream()
    pool = SplicePool(workers=2)
    finished: list[tuple[int, int]] = []
    done = threading.Event()

    def on_finished(conn_id, peer, relay):
        finished.append((conn_id, threading.get_ident()))
        if len(finished) == 4:
            done.set()

    server = ProxyServer(("127.0.0.1", 0), (upstream.host, upstream.port), pool=pool,
                         on_finished=on_finished, on_worker=True)
    assert server.on_worker
    serving = threading.Thread(target=server.serve_forever, kwargs={"grace": 5.0})
    serving.start()
    try:
        for i in range(4):
            body = payload(100_000 + i, i)
            with socket.create_connection(server.address, timeout=10) as c:
                c.sendall(body)
                c.shutdown(socket.SHUT_WR)
                assert digest(recv_until_eof(c)) == digest(body)
        assert done.wait(10)
        assert sorted(i for i, _ in finished) == [1, 2, 3, 4]
        assert {t for _, t in finished} == {pool.worker(0).thread_id}
    finally:
        server.stop()
        serving.join(15)
        upstream.close()
    assert not serving.is_alive() and pool.closed
    assert (server.counters.finished, server.counters.live) == (4, 0)


@threads_only
def test_server_on_worker_a_bug_in_its_loop_is_raised_by_serve_forever():
    class Broken(ProxyServer):
        def _accept(self):
            raise ZeroDivisionError("a bug in the accept loop")

    pool = SplicePool(workers=1)
    server = Broken(("127.0.0.1", 0), ("127.0.0.1", 9), pool=pool, on_worker=True)
    with socket.create_connection(server.address, timeout=10):
        with pytest.raises(ZeroDivisionError, match="a bug in the accept loop"):
            server.serve_forever(grace=1.0)
    assert pool.closed and server.listener.fileno() == -1


@pytest.mark.skipif(not GEVENT, reason="the gevent backend's refusal: in the gevent runs")
def test_host_needs_the_thread_backend_and_a_server_keeps_its_own_loop_there():
    with SplicePool(workers=1, backend="gevent") as pool:
        a, b = socket.socketpair()
        with a, b, pytest.raises(ValueError, match="host\\(\\) needs the thread backend, not 'gevent'"):
            pool.host(Guest(a))
        server = ProxyServer(("127.0.0.1", 0), ("127.0.0.1", 9), pool=pool, on_worker=True)
        assert not server.on_worker
        server.close()
