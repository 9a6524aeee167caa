"""Lifecycle and data rules: end reasons, counters, no byte lost (docs/contract.md sections 2, 4).

Every data test runs on both paths: ``os.splice`` through a pipe (``zero_copy=None``
on Linux) and the copy path (``zero_copy=False``). Payloads are seeded random
bytes, compared by SHA-256, with exact counts.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time

import pytest
from conftest import (
    HAVE_SPLICE,
    Collector,
    Link,
    digest,
    payload,
    peek,
    recv_available,
    recv_exact,
    recv_until_eof,
    reset,
    send_in_thread,
    shrink,
    tcp_pair,
    thread_backend_only,
    until,
)

from splicepool import EndReason, SplicePool, SpliceState

MiB = 1 << 20
LIVE = {SpliceState.INIT, SpliceState.IDLE, SpliceState.QUEUED, SpliceState.RUNNING}


# -- helpers ----------------------------------------------------------------------------




def socket_inodes() -> set[int]:
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(int(target[8:-1]))
    return found


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture(params=["splice", "copy"])
def path(request) -> str:
    if request.param == "splice" and not HAVE_SPLICE:
        pytest.skip("no os.splice on this platform")
    return request.param


@pytest.fixture
def zpool(path):
    p = SplicePool(workers=2, zero_copy=None if path == "splice" else False)
    yield p
    p.close()


def check_path(path: str, sp) -> None:
    """The splice uses the path its pool was made for (os.splice or copy), and says so."""
    assert sp.zero_copy is (path == "splice")


# -- EOF --------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 60_001, 3 * MiB + 11])
def test_eof_moves_everything_and_leaves_the_drain_open(zpool, path, link, size):
    data = payload(size, size)
    sender = send_in_thread(link.peer_src, data, shut=True)
    sp = zpool.splice(link.src, link.dst)
    check_path(path, sp)
    assert (sp.source, sp.drain, sp.max, sp.idle) == (link.src, link.dst, 0, None)
    got = recv_exact(link.peer_dst, size)
    assert sp.wait(10) is EndReason.EOF
    sender.join(10)
    assert digest(got) == digest(data)
    assert sp.transferred == size
    assert zpool.transferred(link.src) == size
    assert sp.dropped == 0
    assert sp.error is None
    assert sp.reason is EndReason.EOF
    assert sp.done()
    assert sp.state is SpliceState.CLOSED
    check_path(path, sp)
    # The drain was not shut down: no FIN reached its peer, and it still sends.
    assert peek(link.peer_dst) is None
    link.dst.sendall(b"after the splice")
    assert recv_exact(link.peer_dst, 16) == b"after the splice"


def test_data_queued_before_splice_moves_at_once(zpool, path, link):
    data = payload(60_000, 1)
    link.peer_src.sendall(data)
    assert until(
        lambda: len(link.src.recv(1 << 17, socket.MSG_PEEK | socket.MSG_DONTWAIT)) == len(data)
    )
    sp = zpool.splice(link.src, link.dst)
    check_path(path, sp)
    # No EOF, no further byte: the queued data must move by itself.
    got = recv_exact(link.peer_dst, len(data), timeout=3)
    assert digest(got) == digest(data)
    assert until(lambda: sp.transferred == len(data), 3)
    assert not sp.done()
    assert sp.reason is None
    assert zpool.transferred(link.src) == len(data)
    sp.unsplice()
    assert sp.wait(5) is EndReason.UNSPLICED
    assert sp.transferred == len(data)


# -- max --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "limit,size,queued",
    [
        (1, 10_000, True),
        (100, 60_000, True),  # smaller than the first chunk the source holds
        (MiB + 7, 4 * MiB, False),
        (3 * MiB, 3 * MiB + 1, False),
    ],
)
def test_max_moves_exactly_max_and_leaves_the_rest_in_the_source(
    zpool, path, link, limit, size, queued
):
    data = payload(size, limit)
    sender = None
    if queued:
        link.peer_src.sendall(data)
        link.peer_src.shutdown(socket.SHUT_WR)
    sp = zpool.splice(link.src, link.dst, max=limit)
    check_path(path, sp)
    assert sp.max == limit
    if not queued:
        sender = send_in_thread(link.peer_src, data, shut=True)
    got = recv_exact(link.peer_dst, limit)
    assert sp.wait(10) is EndReason.MAX
    assert sp.transferred == limit
    assert zpool.transferred(link.src) == limit
    assert sp.dropped == 0
    assert sp.error is None
    assert sp.state is SpliceState.CLOSED
    rest = recv_until_eof(link.src, timeout=15)
    if sender is not None:
        sender.join(10)
    assert len(rest) == size - limit
    assert digest(got) == digest(data[:limit])
    assert digest(got + rest) == digest(data)
    assert peek(link.peer_dst) is None  # not one byte past max reached the drain
    assert sp.transferred == limit


# -- idle -------------------------------------------------------------------------------


def test_idle_ends_a_silent_splice(zpool, link):
    idle = 0.4
    t0 = time.monotonic()
    sp = zpool.splice(link.src, link.dst, idle=idle)
    assert sp.idle == idle
    assert sp.wait(idle + 5) is EndReason.IDLE
    elapsed = time.monotonic() - t0
    assert idle - 0.01 <= elapsed <= idle + 2  # 10 ms slack for timer granularity
    assert sp.transferred == 0
    assert zpool.transferred(link.src) == 0
    assert sp.error is None
    assert sp.state is SpliceState.CLOSED
    # The source is an ordinary socket again.
    link.peer_src.sendall(b"ping")
    assert recv_exact(link.src, 4) == b"ping"
    assert peek(link.peer_dst) is None


def test_idle_is_kept_alive_by_a_trickle(zpool, path, link):
    idle = 0.6
    col = Collector(link.peer_dst)
    sp = zpool.splice(link.src, link.dst, idle=idle)
    check_path(path, sp)
    sent = bytearray()
    stop_at = time.monotonic() + 2.5 * idle
    last = time.monotonic()
    while time.monotonic() < stop_at:
        last = time.monotonic()
        link.peer_src.send(bytes([len(sent) % 251]))
        sent.append(len(sent) % 251)
        time.sleep(idle / 3)  # the trickle under test: a byte every idle/3 keeps it alive
        assert not sp.done(), f"ended with {sp.reason} during the trickle, after {len(sent)} bytes"
    assert sp.wait(idle + 5) is EndReason.IDLE
    quiet = time.monotonic() - last
    assert idle - 0.01 <= quiet <= idle + 2
    assert col.wait_for(len(sent), 5)
    assert col.stop() == bytes(sent)
    assert sp.transferred == len(sent) == zpool.transferred(link.src)


def test_idle_leaves_pending_source_data_readable(zpool, path, link):
    """The drain's peer never reads: the splice stalls, goes idle, the rest stays in the source."""
    shrink(link.dst, link.peer_dst)
    data = payload(4 * MiB, 44)
    sp = zpool.splice(link.src, link.dst, idle=0.3)
    check_path(path, sp)
    sender = send_in_thread(link.peer_src, data, shut=True)
    assert sp.wait(10) is EndReason.IDLE
    moved, dropped = sp.transferred, sp.dropped
    assert 0 < moved < len(data)
    got = recv_exact(link.peer_dst, moved)
    assert peek(link.peer_dst) is None
    rest = recv_until_eof(link.src, timeout=15)
    sender.join(10)
    assert moved + dropped + len(rest) == len(data)
    assert digest(got) == digest(data[:moved])
    assert digest(rest) == digest(data[moved + dropped :])
    assert zpool.transferred(link.src) == moved


# -- manual unsplice --------------------------------------------------------------------


@pytest.mark.parametrize("how", ["splice-1", "pool.unsplice", "sp.unsplice"])
def test_unsplice_mid_transfer_loses_nothing(zpool, path, link, how):
    shrink(link.dst, link.peer_dst)
    data = payload(16 * MiB, 99)
    col = Collector(link.peer_dst, chunk=16 * 1024, delay=0.001)  # a slowish reader
    sp = zpool.splice(link.src, link.dst)
    check_path(path, sp)
    sender = send_in_thread(link.peer_src, data, shut=True)
    assert col.wait_for(MiB)
    if how == "splice-1":
        zpool.splice(link.src, -1)
    elif how == "pool.unsplice":
        zpool.unsplice(link.src)
    else:
        sp.unsplice()
    assert sp.wait(10) is EndReason.UNSPLICED
    moved = sp.transferred
    assert MiB <= moved < len(data)
    assert sp.dropped == 0
    assert sp.error is None
    assert sp.state is SpliceState.CLOSED
    assert col.wait_for(moved)
    rest = recv_until_eof(link.src, timeout=20)  # everything the sender sent after the cut
    sender.join(10)
    assert peek(link.peer_dst) is None
    delivered = col.stop()
    assert len(delivered) == moved
    assert len(delivered) + len(rest) == len(data)
    assert digest(delivered + rest) == digest(data)
    assert sp.transferred == moved
    assert zpool.transferred(link.src) == moved
    with pytest.raises(OSError) as exc:  # already ended: not a spliced source any more
        zpool.unsplice(link.src)
    assert exc.value.errno == errno.ENOTCONN


# -- counters ---------------------------------------------------------------------------


def test_transferred_runs_while_spliced_and_resets_on_a_new_splice(zpool, link):
    assert zpool.transferred(link.src) == 0  # never spliced
    sp = zpool.splice(link.src, link.dst)
    assert zpool.transferred(link.src) == 0
    total = 0
    for i, n in enumerate([1000, 50_000, 3]):
        chunk = payload(n, i)
        link.peer_src.sendall(chunk)
        assert recv_exact(link.peer_dst, n) == chunk
        total += n
        assert until(lambda t=total: zpool.transferred(link.src) == t), zpool.transferred(link.src)
        assert sp.transferred == total
        assert not sp.done()
    assert zpool.transferred(link.dst) == 0  # a drain is not a source
    sp.unsplice()
    assert sp.wait(5) is EndReason.UNSPLICED
    assert zpool.transferred(link.src) == total
    sp2 = zpool.splice(link.src, link.dst)
    assert zpool.transferred(link.src) == 0  # reset by the new splice
    assert sp.transferred == total  # the old handle keeps its count
    link.peer_src.sendall(b"xyz")
    link.peer_src.shutdown(socket.SHUT_WR)
    assert recv_exact(link.peer_dst, 3) == b"xyz"
    assert sp2.wait(5) is EndReason.EOF
    assert zpool.transferred(link.src) == 3 == sp2.transferred


@pytest.mark.parametrize("reason", list(EndReason))
def test_transferred_is_final_after_every_end_reason(zpool, link, reason):
    n = 50_000
    data = payload(n + 20, 5)
    sp = zpool.splice(
        link.src,
        link.dst,
        max=n + 10 if reason is EndReason.MAX else 0,
        idle=0.3 if reason is EndReason.IDLE else None,
    )
    link.peer_src.sendall(data[:n])
    assert recv_exact(link.peer_dst, n) == data[:n]
    assert until(lambda: zpool.transferred(link.src) == n)
    expected = n
    if reason is EndReason.EOF:
        link.peer_src.shutdown(socket.SHUT_WR)
    elif reason is EndReason.MAX:
        link.peer_src.sendall(data[n:])
        assert recv_exact(link.peer_dst, 10) == data[n : n + 10]
        expected = n + 10
    elif reason is EndReason.UNSPLICED:
        sp.unsplice()
    elif reason is EndReason.ERROR:
        reset(link.peer_dst)
        link.peer_src.sendall(data[n:])
        expected = None
    elif reason is EndReason.POOL_CLOSED:
        zpool.close()
    assert sp.wait(10) is reason
    if expected is None:
        expected = sp.transferred
        assert n <= expected <= n + 20
    assert sp.transferred == expected
    assert zpool.transferred(link.src) == expected
    if reason is EndReason.MAX:
        assert recv_exact(link.src, 10) == data[n + 10 :]


# -- slow drain -------------------------------------------------------------------------


def test_slow_drain_gets_every_byte_in_order(zpool, path, link):
    data = payload(4 * MiB + 3, 8)
    col = Collector(link.peer_dst, chunk=16 * 1024, delay=0.002)
    sp = zpool.splice(link.src, link.dst)
    check_path(path, sp)
    sender = send_in_thread(link.peer_src, data, shut=True)
    assert sp.wait(30) is EndReason.EOF
    sender.join(10)
    assert col.wait_for(len(data), 15)
    got = col.stop()
    assert len(got) == len(data)
    assert digest(got) == digest(data)
    assert sp.transferred == len(data)
    assert sp.dropped == 0


# -- errors -----------------------------------------------------------------------------


def test_rst_from_the_source_peer_ends_with_error(zpool, path, link):
    data = payload(300_000, 3)
    col = Collector(link.peer_dst)
    sp = zpool.splice(link.src, link.dst)
    check_path(path, sp)
    link.peer_src.sendall(data)
    assert col.wait_for(len(data))
    reset(link.peer_src)
    assert sp.wait(10) is EndReason.ERROR
    assert isinstance(sp.error, OSError)
    assert sp.error.errno in (errno.ECONNRESET, errno.ECONNABORTED), sp.error
    assert "source" in str(sp.error), sp.error
    assert sp.transferred == len(data) == zpool.transferred(link.src)
    assert sp.state is SpliceState.CLOSED
    assert col.stop() == data


def test_rst_from_the_drain_peer_ends_with_error_naming_the_drain(zpool, link):
    data = payload(2 * MiB, 4)
    head = 100_000
    sp = zpool.splice(link.src, link.dst)
    link.peer_src.sendall(data[:head])
    assert recv_exact(link.peer_dst, head) == data[:head]
    reset(link.peer_dst)
    sender = send_in_thread(link.peer_src, data[head:], shut=True)
    assert sp.wait(10) is EndReason.ERROR
    assert isinstance(sp.error, OSError)
    assert sp.error.errno in (errno.ECONNRESET, errno.EPIPE), sp.error
    assert "drain" in str(sp.error), sp.error
    moved, dropped = sp.transferred, sp.dropped
    assert moved >= head
    rest = recv_until_eof(link.src, timeout=15)
    sender.join(10)
    # What the source gave up either was accepted by the drain or is counted as dropped.
    assert moved + dropped + len(rest) == len(data)
    assert digest(rest) == digest(data[moved + dropped :])
    assert zpool.transferred(link.src) == moved


def test_drain_peer_closing_normally_ends_with_error(zpool, link):
    data = payload(8 * MiB, 6)
    head = MiB
    sp = zpool.splice(link.src, link.dst)
    link.peer_src.sendall(data[:head])
    assert recv_exact(link.peer_dst, head) == data[:head]
    link.peer_dst.close()  # nothing unread: a FIN, not a RST
    sender = send_in_thread(link.peer_src, data[head:], shut=True)
    assert sp.wait(10) is EndReason.ERROR
    assert isinstance(sp.error, OSError)
    assert sp.error.errno in (errno.ECONNRESET, errno.EPIPE), sp.error
    moved, dropped = sp.transferred, sp.dropped
    assert moved >= head
    rest = recv_until_eof(link.src, timeout=15)
    sender.join(10)
    assert moved + dropped <= len(data)
    assert moved + dropped + len(rest) == len(data)
    assert digest(rest) == digest(data[moved + dropped :])


# -- pool.close() -----------------------------------------------------------------------


def test_pool_close_ends_live_splices_and_keeps_unmoved_data(path):
    pool = SplicePool(workers=2, zero_copy=None if path == "splice" else False)
    links = [Link() for _ in range(3)]
    try:
        runs = []
        for i, ln in enumerate(links):
            shrink(ln.dst, ln.peer_dst)
            data = payload(4 * MiB, 100 + i)
            col = Collector(ln.peer_dst, chunk=16 * 1024, delay=0.002)
            sp = pool.splice(ln.src, ln.dst)
            check_path(path, sp)
            sender = send_in_thread(ln.peer_src, data, shut=True)
            runs.append((ln, data, col, sp, sender))
        for _, _, col, _, _ in runs:
            assert col.wait_for(256 * 1024)
        pool.close()
        for ln, data, col, sp, sender in runs:
            assert sp.done()
            assert sp.reason is EndReason.POOL_CLOSED
            assert sp.state is SpliceState.CLOSED
            assert sp.dropped == 0  # the readers kept reading: the grace was enough
            moved = sp.transferred
            assert 0 < moved < len(data)
            assert col.wait_for(moved)
            rest = recv_until_eof(ln.src, timeout=20)
            sender.join(10)
            assert peek(ln.peer_dst) is None
            delivered = col.stop()
            assert len(delivered) == moved
            assert digest(delivered + rest) == digest(data)
        pool.close()  # idempotent
    finally:
        pool.close()
        for ln in links:
            ln.close()


# -- topologies -------------------------------------------------------------------------


def test_relay_both_ways_16_mib(zpool, path, link):
    fwd_data = payload(16 * MiB, 21)
    rev_data = payload(16 * MiB, 22)
    at_dst = Collector(link.peer_dst)
    at_src = Collector(link.peer_src)
    fwd = zpool.splice(link.src, link.dst)
    rev = zpool.splice(link.dst, link.src)
    check_path(path, fwd)
    check_path(path, rev)
    s1 = send_in_thread(link.peer_src, fwd_data, shut=True)
    s2 = send_in_thread(link.peer_dst, rev_data, shut=True)
    assert fwd.wait(30) is EndReason.EOF
    assert rev.wait(30) is EndReason.EOF
    s1.join(10)
    s2.join(10)
    assert at_dst.wait_for(len(fwd_data))
    assert at_src.wait_for(len(rev_data))
    assert digest(at_dst.stop()) == digest(fwd_data)
    assert digest(at_src.stop()) == digest(rev_data)
    assert fwd.transferred == len(fwd_data) == zpool.transferred(link.src)
    assert rev.transferred == len(rev_data) == zpool.transferred(link.dst)


def test_self_splice_echoes(zpool, path):
    client, server = tcp_pair()
    try:
        data = payload(MiB + 5, 31)
        col = Collector(client)
        sp = zpool.splice(server, server)
        check_path(path, sp)
        sender = send_in_thread(client, data, shut=True)
        assert sp.wait(15) is EndReason.EOF
        sender.join(10)
        assert col.wait_for(len(data))
        assert digest(col.stop()) == digest(data)
        assert sp.transferred == len(data) == zpool.transferred(server)
    finally:
        client.close()
        server.close()


def rotated(data: bytes, by: int) -> bytes:
    by %= len(data)
    return data[by:] + data[:by]


@pytest.mark.parametrize("how", ["unsplice", "max"])
def test_loop_through_two_connections_spins_until_stopped(zpool, path, link, how):
    """s1 -> c2 and s2 -> c1 over two connections (c1, s1) and (c2, s2): a ring.

    What s1 receives goes out of c2 to s2, and from there out of c1 back to s1: the bytes
    queued in s1 go round for ever (FreeBSD lets such a loop spin; the pool refuses only
    the loop it can see in one splice, one end of a connection into its other end).
    """
    c1, s1 = tcp_pair()
    c2, s2 = tcp_pair()
    try:
        k = 10_000
        ring = payload(k, 41)
        c1.sendall(ring)  # queued in s1
        limit = MiB + 123 if how == "max" else 0
        out_of_s1 = zpool.splice(s1, c2, max=limit)
        out_of_s2 = zpool.splice(s2, c1)
        check_path(path, out_of_s1)
        check_path(path, out_of_s2)
        if how == "max":
            assert out_of_s1.wait(20) is EndReason.MAX
            assert out_of_s1.transferred == limit
        else:
            assert until(lambda: out_of_s1.transferred > 20 * k), out_of_s1.transferred
            out_of_s1.unsplice()
            assert out_of_s1.wait(5) is EndReason.UNSPLICED
        # The other splice delivers what is still on its way, then has nothing to move.
        assert until(lambda: out_of_s2.transferred == out_of_s1.transferred), (
            out_of_s2.transferred,
            out_of_s1.transferred,
        )
        out_of_s2.unsplice()
        assert out_of_s2.wait(5) is EndReason.UNSPLICED
        assert out_of_s1.dropped == out_of_s2.dropped == 0
        # The ring's k bytes are all back in s1, in order, turned by the count moved.
        in_s1 = recv_available(s1, 0.3)
        assert len(in_s1) == k
        assert digest(in_s1) == digest(rotated(ring, out_of_s1.transferred))
        assert recv_available(s2, 0.1) == b""
    finally:
        for s in (c1, s1, c2, s2):
            s.close()
    # The pool is still usable.
    more = payload(100_000, 43)
    sender = send_in_thread(link.peer_src, more, shut=True)
    sp = zpool.splice(link.src, link.dst)
    assert recv_exact(link.peer_dst, len(more)) == more
    assert sp.wait(5) is EndReason.EOF
    sender.join(5)


# -- blocking mode and ownership --------------------------------------------------------


@pytest.mark.parametrize("mode", ["blocking", "non-blocking"])
@pytest.mark.parametrize("end", ["eof", "unsplice"])
@thread_backend_only
def test_blocking_mode_is_restored(zpool, link, mode, end):
    if mode == "non-blocking":
        link.src.setblocking(False)
        link.dst.setblocking(False)
    before = [os.get_blocking(s.fileno()) for s in (link.src, link.dst)]
    assert before == [mode == "blocking"] * 2
    sp = zpool.splice(link.src, link.dst)
    assert not os.get_blocking(link.src.fileno())
    assert not os.get_blocking(link.dst.fileno())
    link.peer_src.sendall(b"abc")
    assert recv_exact(link.peer_dst, 3) == b"abc"
    if end == "eof":
        link.peer_src.shutdown(socket.SHUT_WR)
        assert sp.wait(5) is EndReason.EOF
    else:
        sp.unsplice()
        assert sp.wait(5) is EndReason.UNSPLICED
    assert [os.get_blocking(s.fileno()) for s in (link.src, link.dst)] == before
    if mode == "blocking":
        # A plain blocking recv works again (it would raise BlockingIOError if the fd stayed
        # non-blocking with nothing queued).
        assert link.src.gettimeout() is None
        if end == "unsplice":
            later = threading.Timer(0.1, link.peer_src.sendall, (b"z",))
            later.start()
            assert link.src.recv(10) == b"z"
            later.join()
        else:
            assert link.src.recv(10) == b""


@thread_backend_only
def test_blocking_mode_stays_off_while_another_splice_uses_the_socket(zpool, link):
    fwd = zpool.splice(link.src, link.dst)
    rev = zpool.splice(link.dst, link.src)
    link.peer_src.shutdown(socket.SHUT_WR)
    assert fwd.wait(5) is EndReason.EOF
    # src and dst are still in the live reverse splice.
    assert not os.get_blocking(link.src.fileno())
    assert not os.get_blocking(link.dst.fileno())
    link.peer_dst.sendall(b"back")
    assert recv_exact(link.peer_src, 4) == b"back"
    rev.unsplice()
    assert rev.wait(5) is EndReason.UNSPLICED
    assert os.get_blocking(link.src.fileno())
    assert os.get_blocking(link.dst.fileno())


def test_close_true_hands_both_sockets_to_the_pool(zpool, path, link):
    data = payload(500_000, 51)
    inodes = {os.fstat(s.fileno()).st_ino for s in (link.src, link.dst)}
    assert inodes <= socket_inodes()
    sp = zpool.splice(link.src, link.dst, close=True)
    check_path(path, sp)
    for s in (link.src, link.dst):  # ours no longer: never let Link.close() touch the fd number
        if s.fileno() != -1:
            s.detach()
    sender = send_in_thread(link.peer_src, data, shut=True)
    got = recv_until_eof(link.peer_dst, timeout=10)  # the pool closed dst: EOF after the data
    assert sp.wait(5) is EndReason.EOF
    sender.join(5)
    assert digest(got) == digest(data)
    assert sp.transferred == len(data)
    assert not inodes & socket_inodes()
    link.peer_src.settimeout(5)
    assert link.peer_src.recv(10) == b""  # the pool closed src too


# -- waiting and callbacks --------------------------------------------------------------


def test_wait_timeout_and_done_callbacks(zpool, link, caplog):
    sp = zpool.splice(link.src, link.dst)
    with pytest.raises(TimeoutError):
        sp.wait(0.1)
    assert not sp.done()
    assert sp.reason is None
    assert sp.state in LIVE
    calls = []

    def boom(s):
        raise RuntimeError("callback boom")

    sp.add_done_callback(boom)
    sp.add_done_callback(lambda s: calls.append((s, s.reason)))
    assert calls == []
    link.peer_src.sendall(b"x")
    link.peer_src.shutdown(socket.SHUT_WR)
    assert recv_exact(link.peer_dst, 1) == b"x"
    assert sp.wait(5) is EndReason.EOF
    assert sp.wait(0) is EndReason.EOF
    assert until(lambda: calls, 5)
    assert calls == [(sp, EndReason.EOF)]
    assert "callback boom" in caplog.text
    late = []
    sp.add_done_callback(late.append)  # already ended: runs at once
    assert late == [sp]
    # Both workers still work after a callback raised in one of them.
    workers = set()
    for seed in range(2):
        ln = Link()
        try:
            data = payload(70_000, seed)
            s2 = zpool.splice(ln.src, ln.dst)
            s2.add_done_callback(boom)
            sender = send_in_thread(ln.peer_src, data, shut=True)
            assert recv_exact(ln.peer_dst, len(data)) == data
            assert s2.wait(5) is EndReason.EOF
            sender.join(5)
            workers.add(s2.worker)
        finally:
            ln.close()
    # sp's worker has since run a whole splice to its end: a second call would show up by now.
    assert sp.worker in workers, (sp.worker, workers)
    assert calls == [(sp, EndReason.EOF)]
