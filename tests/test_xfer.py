"""The two movers behind one contract: zero-copy (os.splice via a pipe) and copy."""

from __future__ import annotations

import array
import hashlib
import os
import socket
from types import SimpleNamespace

import pytest
from conftest import Link, recv_exact

from splicepool._sockets import drain_space
from splicepool.xfer import HAVE_SPLICE, CopyMover, PipePool, ZeroCopyMover


def _ep(sock: socket.socket) -> SimpleNamespace:
    """What the movers see of a pool endpoint: the fd and a non-blocking socket object."""
    sock.setblocking(False)
    return SimpleNamespace(fd=sock.fileno(), sock=sock)


def _movers() -> list:
    movers = [pytest.param("copy", id="copy")]
    if HAVE_SPLICE:
        movers.insert(0, pytest.param("zero_copy", id="zero_copy"))
    return movers


@pytest.fixture(params=_movers())
def mover(request):
    pipes = PipePool(1 << 16)
    if request.param == "zero_copy":
        m = ZeroCopyMover(pipes)
    else:
        m = CopyMover(memoryview(bytearray(1 << 16)))
    yield m
    m.drop()
    m.release()
    pipes.close()


def test_pull_then_push_moves_exact_bytes(mover):
    ln = Link()
    try:
        data = os.urandom(50_000)
        ln.peer_src.sendall(data)
        src, dst = _ep(ln.src), _ep(ln.dst)
        got = recv_exact_pull(mover, src, 50_000)
        assert got == 50_000
        assert mover.pending == 50_000
        assert mover.push(dst) == 50_000
        assert mover.pending == 0
        assert hashlib.sha256(recv_exact(ln.peer_dst, 50_000)).digest() == hashlib.sha256(data).digest()
    finally:
        ln.close()


def recv_exact_pull(mover, src, n: int) -> int:
    """Pull once data is there (the peer's bytes may still be on the way)."""
    for _ in range(1000):
        try:
            return mover.pull(src, n)
        except BlockingIOError:
            os.sched_yield()
    raise AssertionError("no data arrived")


def test_pull_never_takes_more_than_asked(mover):
    ln = Link()
    try:
        ln.peer_src.sendall(b"abcdefghij")
        src = _ep(ln.src)
        assert recv_exact_pull(mover, src, 3) == 3
        assert mover.push(_ep(ln.dst)) == 3
        assert recv_exact(ln.peer_dst, 3) == b"abc"
        ln.src.setblocking(True)
        assert recv_exact(ln.src, 7) == b"defghij"
    finally:
        ln.close()


def test_pull_on_an_empty_source_raises_blocking_and_eof_returns_zero(mover):
    ln = Link()
    try:
        src = _ep(ln.src)
        with pytest.raises(BlockingIOError):
            mover.pull(src, 100)
        ln.peer_src.shutdown(socket.SHUT_WR)
        for _ in range(1000):
            try:
                assert mover.pull(src, 100) == 0
                break
            except BlockingIOError:
                os.sched_yield()
        assert mover.pending == 0
    finally:
        ln.close()


def test_a_full_drain_leaves_a_leftover_that_push_delivers_later(mover):
    ln = Link()
    try:
        ln.dst.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        ln.peer_dst.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        src, dst = _ep(ln.src), _ep(ln.dst)
        data = os.urandom(60_000)
        ln.peer_src.sendall(data)
        pulled = 0
        delivered = bytearray()
        while pulled < len(data) or mover.pending:
            if not mover.pending:
                pulled += recv_exact_pull(mover, src, len(data) - pulled)
            try:
                mover.push(dst)
            except BlockingIOError:
                pass
            if mover.pending:  # the drain is full: read some at the far end
                ln.peer_dst.settimeout(5)
                delivered += ln.peer_dst.recv(65536)
        delivered += recv_exact(ln.peer_dst, len(data) - len(delivered))
        assert bytes(delivered) == data
    finally:
        ln.close()


def test_drop_discards_the_leftover_and_reports_its_size(mover):
    ln = Link()
    try:
        ln.peer_src.sendall(b"x" * 1000)
        assert recv_exact_pull(mover, _ep(ln.src), 1000) == 1000
        assert mover.drop() == 1000
        assert mover.pending == 0
        assert mover.drop() == 0
    finally:
        ln.close()


@pytest.mark.skipif(not HAVE_SPLICE, reason="pipes for os.splice are Linux-only")
def test_pipe_pool_reuses_pipes_and_keeps_a_bounded_free_list():
    pool = PipePool(1 << 20, keep=2)
    try:
        pipes = [pool.acquire() for _ in range(4)]
        assert pool.created == 4
        assert len({p.r for p in pipes}) == 4
        with open("/proc/sys/fs/pipe-max-size") as f:
            limit = int(f.read())
        assert pipes[0].capacity == min(1 << 20, limit) or pipes[0].capacity == 65536
        before = len(os.listdir("/proc/self/fd"))
        for p in pipes:
            pool.release(p)
        assert pool.idle == 2
        assert len(os.listdir("/proc/self/fd")) == before - 4  # two pipes (4 fds) closed
        again = pool.acquire()
        assert again in pipes and pool.created == 4
        pool.release(again)
    finally:
        pool.close()
    assert pool.idle == 0


@pytest.mark.skipif(not HAVE_SPLICE, reason="pipes for os.splice are Linux-only")
def test_an_idle_zero_copy_mover_holds_no_pipe():
    pipes = PipePool(1 << 16)
    ln = Link()
    try:
        m = ZeroCopyMover(pipes)
        ln.peer_src.sendall(b"hello")
        assert recv_exact_pull(m, _ep(ln.src), 5) == 5
        m.release()  # pending: the pipe must stay with the mover
        assert pipes.idle == 0
        assert m.push(_ep(ln.dst)) == 5
        m.release()
        assert pipes.idle == 1
    finally:
        ln.close()
        pipes.close()


def test_idle_drains_share_one_int_for_their_send_buffer_size_and_space():
    """Two idle drains with the same SO_SNDBUF keep one int object between them, for the
    size and for the space (their queues are empty): 9000 idle connections would otherwise
    keep 36000 ints of a few distinct values (issue 13, idle memory)."""
    listener = socket.create_server(("127.0.0.1", 0))
    socks = []
    try:
        for _ in range(2):
            client = socket.create_connection(listener.getsockname())
            socks += [client, listener.accept()[0]]
        drains = []
        for sock in socks[0], socks[2]:
            dst = SimpleNamespace(outq=True, sock=sock, fd=sock.fileno(), space=0, sndbuf=0,
                                  sndbuf_age=1 << 30)
            drain_space(dst, 1, array.array("i", [0]))
            drains.append(dst)
        a, b = drains
        assert a.sndbuf == b.sndbuf > 0
        assert a.sndbuf is b.sndbuf
        assert a.space is a.sndbuf and b.space is b.sndbuf
    finally:
        for sock in socks:
            sock.close()
        listener.close()
