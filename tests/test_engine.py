"""The worker loop (splicepool.engine): isolation, fairness, small reads, a slow drain.

docs/contract.md, section 4 (workers never block, bugs).
"""

from __future__ import annotations

import hashlib
import socket
import struct
import time

from conftest import (
    Collector,
    Link,
    digest,
    drain_full,
    fd_count,
    fill_send_buffer,
    payload,
    peek,
    recv_exact,
    recv_until_eof,
    send_in_thread,
    shrink,
    tcp_pair,
    thread_count,
    until,
    wakeups,
)

from splicepool import EndReason, SplicePool

MiB = 1 << 20


# -- helpers -------------------------------------------------------------------------


# -- assignment -------------------------------------------------------------------------


# -- isolation and fairness on one worker -----------------------------------------------


def test_a_stalled_splice_does_not_stall_its_worker(zero_copy):
    stalled, busy = Link(), Link()
    pool = SplicePool(workers=1, zero_copy=zero_copy)
    try:
        shrink(stalled.dst, stalled.peer_dst)
        big = payload(8 * MiB, 1)
        sp1 = pool.splice(stalled.src, stalled.dst)
        sender1 = send_in_thread(stalled.peer_src, big, shut=True)
        assert until(lambda: sp1.transferred > 0)
        assert until(lambda: drain_full(sp1)), sp1  # the drain's peer never reads: sp1 waits
        data = payload(8 * MiB, 2)
        col = Collector(busy.peer_dst)
        t0 = time.monotonic()
        sp2 = pool.splice(busy.src, busy.dst)
        assert sp2.worker == sp1.worker == 0
        sender2 = send_in_thread(busy.peer_src, data, shut=True)
        assert sp2.wait(10) is EndReason.EOF
        assert time.monotonic() - t0 < 5
        sender2.join(5)
        assert col.wait_for(len(data))
        assert digest(col.stop()) == digest(data)
        assert sp2.transferred == len(data)
        assert not sp1.done()  # still there, still waiting for its drain
        # Let the stalled one go: its bytes are all intact too.
        col1 = Collector(stalled.peer_dst)
        sp1.unsplice()
        assert sp1.wait(10) is EndReason.UNSPLICED
        assert col1.wait_for(sp1.transferred)
        rest = recv_until_eof(stalled.src, timeout=15)
        sender1.join(5)
        assert digest(col1.stop() + rest) == digest(big)
    finally:
        pool.close()
        stalled.close()
        busy.close()


def test_a_spinning_splice_does_not_starve_others_on_its_worker(zero_copy):
    """A ring (s1 -> c2 -> s2 -> c1 -> s1) always has data and space; another splice on its
    worker still runs."""
    c, s = tcp_pair()
    c2, s2 = tcp_pair()
    ln = Link()
    pool = SplicePool(workers=1, zero_copy=zero_copy)
    try:
        c.sendall(payload(64 * 1024, 3))  # queued in s; s -> c2 -> s2 -> c -> s, forever
        hog = pool.splice(s, c2)
        pool.splice(s2, c)
        assert until(lambda: hog.transferred > 4 * MiB)
        data = payload(4 * MiB, 4)
        col = Collector(ln.peer_dst)
        t0 = time.monotonic()
        sp = pool.splice(ln.src, ln.dst)
        sender = send_in_thread(ln.peer_src, data, shut=True)
        assert sp.wait(10) is EndReason.EOF
        assert time.monotonic() - t0 < 5
        sender.join(5)
        assert col.wait_for(len(data))
        assert digest(col.stop()) == digest(data)
        before = hog.transferred
        assert until(lambda: hog.transferred > before)  # and the hog still spins
        hog.unsplice()
        assert hog.wait(5) is EndReason.UNSPLICED
    finally:
        pool.close()
        for sock in (c, s, c2, s2):
            sock.close()
        ln.close()


def test_eight_bulk_splices_on_one_worker_all_finish(zero_copy):
    links = [Link() for _ in range(8)]
    pool = SplicePool(workers=1, zero_copy=zero_copy)
    try:
        runs = []
        for i, ln in enumerate(links):
            data = payload(2 * MiB + i, 10 + i)
            col = Collector(ln.peer_dst)
            sp = pool.splice(ln.src, ln.dst)
            assert sp.worker == 0
            runs.append((data, col, sp))
        senders = [
            send_in_thread(ln.peer_src, data, shut=True)
            for ln, (data, _, _) in zip(links, runs, strict=True)
        ]
        for data, col, sp in runs:
            assert sp.wait(30) is EndReason.EOF
            assert sp.transferred == len(data)
            assert col.wait_for(len(data))
            assert digest(col.stop()) == digest(data)
        for t in senders:
            t.join(5)
        st = pool.stats()
        assert st["bytes"] == sum(len(data) for data, _, _ in runs)
        assert st["workers"][0]["passes"] >= len(runs)
    finally:
        pool.close()
        for ln in links:
            ln.close()


# -- small messages (read and sent at dispatch, without a queued pass) ---------------------


def test_request_and_reply_of_every_small_size_arrive_whole_in_order(zero_copy):
    """Many request/response exchanges through a relay, one message in flight at a time:
    each reply is exactly its request (a small read goes out in one direct pass)."""
    a_peer, a = tcp_pair()
    b, b_peer = tcp_pair()
    with SplicePool(workers=1, zero_copy=zero_copy) as pool:
        relay = pool.proxy(a, b)
        sizes = [1, 63, 64, 1000, 4096, 16383, 16384, 16385, 40000] + list(range(100, 5000, 450))
        for i, size in enumerate(sizes):
            msg = payload(size, 100 + i)
            a_peer.sendall(msg)
            assert recv_exact(b_peer, size) == msg, size
            b_peer.sendall(msg[::-1])
            assert recv_exact(a_peer, size) == msg[::-1], size
        total = sum(sizes)
        assert until(lambda: relay.forward.transferred == total and relay.reverse.transferred == total)
        assert relay.forward.dropped == relay.reverse.dropped == 0
        a_peer.close()
        b_peer.close()
        assert relay.wait(10) in (EndReason.EOF, EndReason.ERROR)


def test_a_small_read_the_drain_cannot_take_whole_waits_for_the_drain_in_order(zero_copy):
    """The pool's idea of the drain's free space goes stale when the user fills the drain
    itself: a small read then meets a full drain. What it could not send waits for the
    drain and arrives after the user's bytes, whole; nothing is dropped."""
    link = Link()
    shrink(link.dst, link.peer_dst)
    with SplicePool(workers=1, zero_copy=zero_copy) as pool:
        sp = pool.splice(link.src, link.dst)
        link.peer_src.sendall(b"hello")
        assert recv_exact(link.peer_dst, 5) == b"hello"
        assert until(lambda: sp.transferred == 5)
        filler = fill_send_buffer(link.dst)  # the user writes into the drain until it is full
        msg = payload(8000, 8)
        seen = wakeups(pool)
        link.peer_src.sendall(msg)
        assert until(lambda: wakeups(pool) > seen)  # the worker saw it: and the drain was full
        queued = peek(link.src, 0) or b""  # what the worker has not taken is still in the source
        assert sp.transferred == 5 and sp.in_flight + len(queued) == len(msg), (sp, len(queued))
        assert sp.in_flight > 0 if zero_copy is None else sp.in_flight == 0  # read at dispatch, kept
        got = recv_exact(link.peer_dst, len(filler) + len(msg), timeout=10)
        assert digest(got) == digest(filler + msg)
        assert until(lambda: sp.transferred == 5 + len(msg))
        assert sp.dropped == 0 and sp.reason is None
        link.peer_src.shutdown(socket.SHUT_WR)
        assert sp.wait(10) is EndReason.EOF
    link.close()


# -- binding workers to CPUs ------------------------------------------------------------


# -- threads, fds, closing --------------------------------------------------------------


def test_soak_of_2000_short_splices_leaves_nothing_behind(zero_copy):
    batch, rounds, size = 50, 40, 4096
    drains = [tcp_pair() for _ in range(batch)]  # (dst, peer_dst), reused by every round
    try:
        fds0, threads0 = fd_count(), thread_count()
        pool = SplicePool(workers=2, zero_copy=zero_copy)
        t0 = time.monotonic()
        total = 0
        for r in range(rounds):
            sources = [tcp_pair() for _ in range(batch)]  # (peer_src, src)
            try:
                splices = []
                for k, ((peer_src, src), (dst, _)) in enumerate(zip(sources, drains, strict=True)):
                    data = hashlib.sha256(f"{r}:{k}".encode()).digest() * (size // 32)
                    peer_src.sendall(data)
                    peer_src.shutdown(socket.SHUT_WR)
                    splices.append((pool.splice(src, dst), data))
                for (sp, data), (_, peer_dst) in zip(splices, drains, strict=True):
                    assert recv_exact(peer_dst, size) == data
                    assert sp.wait(5) is EndReason.EOF
                    assert sp.transferred == size
                    total += size
            finally:
                for pair in sources:
                    for sock in pair:
                        sock.close()
        assert time.monotonic() - t0 < 30
        st = pool.stats()
        assert st["live"] == 0
        assert st["bytes"] == total == batch * rounds * size
        pool.close()
        assert thread_count() == threads0
        assert fd_count() == fds0
    finally:
        for pair in drains:
            for sock in pair:
                sock.close()


# -- stats ------------------------------------------------------------------------------


def test_rst_on_one_splice_does_not_disturb_another_on_the_same_worker(zero_copy):
    broken, fine = Link(), Link()
    pool = SplicePool(workers=1, zero_copy=zero_copy)
    try:
        bad = pool.splice(broken.src, broken.dst)
        good = pool.splice(fine.src, fine.dst)
        data = payload(3 * MiB, 7)
        col = Collector(fine.peer_dst)
        sender = send_in_thread(fine.peer_src, data, shut=True)
        broken.peer_dst.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        broken.peer_dst.close()
        broken.peer_src.sendall(payload(200_000, 8))
        assert bad.wait(10) is EndReason.ERROR
        assert good.wait(10) is EndReason.EOF
        sender.join(5)
        assert col.wait_for(len(data))
        assert digest(col.stop()) == digest(data)
    finally:
        pool.close()
        broken.close()
        fine.close()
