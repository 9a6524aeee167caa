"""The pool (splicepool.pool): its options, worker choice and start, close, stats.

docs/contract.md, sections 1 (options, which worker) and 7 (stats).
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest
from conftest import (
    BACKEND,
    GEVENT,
    HAVE_SPLICE,
    Link,
    digest,
    fd_count,
    payload,
    recv_exact,
    recv_until_eof,
    send_in_thread,
    shrink,
    thread_count,
    until,
)

from splicepool import EndReason, SplicePool

MiB = 1 << 20


@pytest.mark.skipif(
    BACKEND == "gevent-direct", reason="direct dispatch runs passes and callbacks in the hub itself"
)
def test_round_robin_assignment_and_each_splice_stays_on_its_worker():
    links = [Link() for _ in range(7)]
    try:
        with SplicePool(workers=3) as pool:
            ran_in: dict[int, int] = {}
            splices = []
            for i, ln in enumerate(links):
                sp = pool.splice(ln.src, ln.dst)
                sp.add_done_callback(lambda s, i=i: ran_in.__setitem__(i, threading.get_ident()))
                splices.append(sp)
            assert [sp.worker for sp in splices] == [0, 1, 2, 0, 1, 2, 0]
            assert [w["live"] for w in pool.stats()["workers"]] == [3, 2, 2]
            for i, (ln, sp) in enumerate(zip(links, splices, strict=True)):
                data = payload(20_000 + i, i)
                ln.peer_src.sendall(data)
                ln.peer_src.shutdown(socket.SHUT_WR)
                assert recv_exact(ln.peer_dst, len(data)) == data
                assert sp.wait(5) is EndReason.EOF
            assert until(lambda: len(ran_in) == len(links), 5)
            # Done callbacks run in the splice's worker thread: one thread per worker index.
            me = threading.get_ident()
            for i in range(len(links)):
                for j in range(len(links)):
                    assert (ran_in[i] == ran_in[j]) is (i % 3 == j % 3), (i, j)
                assert ran_in[i] != me
            # The rotation goes on where it stopped, whatever ended meanwhile.
            again = [Link() for _ in range(2)]
            links += again
            assert [pool.splice(ln.src, ln.dst).worker for ln in again] == [1, 2]
    finally:
        for ln in links:
            ln.close()

@pytest.mark.skipif(
    GEVENT or not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="worker threads on Linux, with two CPUs to tell them apart",
)
def test_bind_cpus_binds_each_worker_thread_to_one_cpu_round_robin():
    allowed = sorted(os.sched_getaffinity(0))
    links = [Link(), Link(), Link()]
    with SplicePool(workers=3, bind_cpus=True) as pool:
        splices = [pool.splice(ln.src, ln.dst) for ln in links]
        for i, (ln, sp) in enumerate(zip(links, splices, strict=True)):
            msg = payload(100_000, 40 + i)
            ln.peer_src.sendall(msg)
            assert recv_exact(ln.peer_dst, len(msg)) == msg
            assert sp.worker == i
        bound = {}
        for task in os.listdir("/proc/self/task"):
            cpus = os.sched_getaffinity(int(task))
            if len(cpus) == 1 and int(task) != threading.get_native_id():
                bound[int(task)] = cpus
        want = [{allowed[i % len(allowed)]} for i in range(3)]
        assert sorted(map(sorted, bound.values())) == sorted(map(sorted, want)), bound
    assert os.sched_getaffinity(0) == set(allowed)  # the caller's thread is left alone
    for ln in links:
        ln.close()

def test_bind_cpus_with_the_gevent_backend_is_refused():
    with pytest.raises(ValueError, match="bind_cpus"):
        SplicePool(workers=1, backend="gevent", bind_cpus=True)

def test_workers_start_lazily(link):
    threads0 = thread_count()
    pool = SplicePool(workers=4)
    try:
        assert thread_count() == threads0
        assert len(pool.stats()["workers"]) == 4
        assert thread_count() == threads0
        data = payload(100_000, 5)
        link.peer_src.sendall(data)
        link.peer_src.shutdown(socket.SHUT_WR)
        sp = pool.splice(link.src, link.dst)
        assert recv_exact(link.peer_dst, len(data)) == data
        assert sp.wait(5) is EndReason.EOF
        assert thread_count() <= threads0 + 1
    finally:
        pool.close()
    assert thread_count() == threads0

def test_close_leaves_no_thread_or_fd_and_is_idempotent(zero_copy):
    links = [Link() for _ in range(4)]
    try:
        fds0, threads0 = fd_count(), thread_count()
        pool = SplicePool(workers=2, zero_copy=zero_copy)
        # Two splices that ended, one live and idle, one live and stalled with data in flight.
        for ln in links[:2]:
            ln.peer_src.sendall(b"done")
            ln.peer_src.shutdown(socket.SHUT_WR)
            sp = pool.splice(ln.src, ln.dst)
            assert recv_exact(ln.peer_dst, 4) == b"done"
            assert sp.wait(5) is EndReason.EOF
        idle = pool.splice(links[2].src, links[2].dst)
        stalled_link = links[3]
        shrink(stalled_link.dst, stalled_link.peer_dst)
        big = payload(4 * MiB, 6)
        stalled = pool.splice(stalled_link.src, stalled_link.dst)
        sender = send_in_thread(stalled_link.peer_src, big, shut=True)
        assert until(lambda: stalled.transferred > 0)
        assert fd_count() > fds0
        assert thread_count() > threads0 or GEVENT  # the gevent backend starts no thread
        pool.close(grace=0.2)
        assert idle.reason is EndReason.POOL_CLOSED
        assert stalled.reason is EndReason.POOL_CLOSED
        assert idle.done() and stalled.done()
        # Unblock our sender: everything not accepted by the drain or dropped is still in src.
        moved = stalled.transferred + stalled.dropped
        rest = recv_until_eof(stalled_link.src, timeout=15)
        sender.join(5)
        assert not sender.is_alive()
        assert digest(rest) == digest(big[moved:])
        assert thread_count() == threads0
        assert fd_count() == fds0
        pool.close()  # idempotent
        with SplicePool(workers=1) as other:  # and the context manager closes too
            other.splice(links[0].src, links[0].dst)
        assert thread_count() == threads0
        assert fd_count() == fds0
        with pytest.raises(RuntimeError):
            pool.splice(links[0].src, links[0].dst)
        with pytest.raises(RuntimeError):
            pool.unsplice(links[2].src)
        assert thread_count() == threads0
        assert fd_count() == fds0
    finally:
        for ln in links:
            ln.close()

def test_stats_is_json_and_counts_bytes_and_live_splices(zero_copy):
    links = [Link() for _ in range(5)]
    pool = SplicePool(workers=2, zero_copy=zero_copy)
    try:
        st = pool.stats()
        assert json.loads(json.dumps(st)) == st
        assert st["live"] == 0
        assert st["bytes"] == 0
        assert [w["index"] for w in st["workers"]] == [0, 1]
        sizes = [1000, 70_000, 300_003]
        splices = []
        for ln, size in zip(links, sizes, strict=False):
            data = payload(size, size)
            sp = pool.splice(ln.src, ln.dst)
            sender = send_in_thread(ln.peer_src, data, shut=True)
            assert recv_exact(ln.peer_dst, size) == data
            assert sp.wait(5) is EndReason.EOF
            sender.join(5)
            splices.append(sp)
        st = pool.stats()
        assert json.loads(json.dumps(st)) == st
        assert st["live"] == 0
        assert st["bytes"] == sum(sp.transferred for sp in splices) == sum(sizes)
        assert len(st["workers"]) == 2
        for w in st["workers"]:
            assert {"index", "live", "bytes", "passes", "wakeups", "zero_copy", "copy"} <= set(w)
            assert w["live"] == 0
            assert w["bytes"] == sum(sp.transferred for sp in splices if sp.worker == w["index"])
            assert w["passes"] >= 1
            assert w["wakeups"] >= 0
        # The path in use shows.
        if zero_copy is False:
            assert any(w["copy"] for w in st["workers"])
            assert not any(w["zero_copy"] for w in st["workers"])
        else:
            assert any(w["zero_copy"] for w in st["workers"])
            assert not any(w["copy"] for w in st["workers"])
        # Live splices: two that wait for data.
        live = [pool.splice(ln.src, ln.dst) for ln in links[3:]]
        st = pool.stats()
        assert json.loads(json.dumps(st)) == st
        assert st["live"] == 2
        assert sum(w["live"] for w in st["workers"]) == 2
        assert st["bytes"] == sum(sizes)
        for sp in live:
            sp.unsplice()
            assert sp.wait(5) is EndReason.UNSPLICED
        assert pool.stats()["live"] == 0
    finally:
        pool.close()
        for ln in links:
            ln.close()


# -- options: validated once, frozen ---------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"workers": 0}, ValueError, "workers must be at least 1"),
        ({"workers": 1.5}, TypeError, "workers must be an int"),
        ({"workers": True}, TypeError, "workers must be an int"),
        ({"backend": "fork"}, ValueError, "unknown backend 'fork'"),
        ({"dispatch": "inline"}, ValueError, "unknown dispatch 'inline'"),
        ({"dispatch": "direct", "backend": "thread"}, ValueError, "dispatch='direct' needs backend='gevent'"),
        ({"pipe_size": 4095}, ValueError, "pipe_size must be at least 4096"),
        ({"pipe_size": "1M"}, TypeError, "pipe_size must be an int"),
        ({"copy_size": 1024}, ValueError, "copy_size must be at least 4096"),
        ({"small_copy": -1}, ValueError, "small_copy must be between 0 and copy_size"),
        ({"small_copy": 1 << 20, "copy_size": 8192}, ValueError, r"small_copy must be between 0 and copy_size \(8192\)"),
        ({"small_copy": None}, TypeError, "small_copy must be an int"),
        ({"hub": "kqueue"}, ValueError, "unknown hub 'kqueue'"),
    ],
)
def test_a_bad_option_is_refused_by_name_and_starts_nothing(kwargs, error, words):
    threads0, fds0 = thread_count(), fd_count()
    with pytest.raises(error, match=words):
        SplicePool(**kwargs)
    assert (thread_count(), fd_count()) == (threads0, fds0)


def test_options_are_frozen_and_keep_what_was_asked():
    with SplicePool(workers=3, pipe_size=65536, small_copy=0, hub="selector") as pool:
        opts = pool.options
        assert (opts.workers, opts.pipe_size, opts.small_copy, opts.hub) == (3, 65536, 0, "selector")
        assert opts.zero_copy is HAVE_SPLICE and pool.backend == ("gevent" if GEVENT else "thread")
        with pytest.raises(AttributeError):
            opts.workers = 4
        assert pool.workers == 3


def test_start_starts_every_worker_at_once_and_a_closed_pool_refuses_it():
    threads0 = thread_count()
    pool = SplicePool(workers=3)
    try:
        assert [pool.worker(i) for i in range(3)] == [None, None, None]
        assert pool.start() is pool
        if not GEVENT:
            assert thread_count() == threads0 + 3
        assert [pool.worker(i).index for i in range(3)] == [0, 1, 2]
        assert pool.stats()["workers"][2]["started"] is True
        assert pool.next_worker == 0  # starting is not splicing: round-robin has not moved
    finally:
        pool.close()
    assert thread_count() == threads0
    with pytest.raises(RuntimeError, match="closed"):
        pool.start()


def test_splice_wait_false_ends_at_max_and_gives_the_socket_back(pool, link):
    """splice(wait=False), the way the HTTP front door uses it from its loop: it returns once
    handed over, moves exactly ``max`` bytes (those already queued first), ends with MAX and
    leaves every later byte in the source for the caller to read."""
    body, after = payload(3 * MiB + 5, 31), b"NEXT REQUEST"
    link.peer_src.sendall(body[:100_000])
    ended = threading.Event()
    sp = pool.splice(link.src, link.dst, max=len(body), wait=False)
    sp.add_done_callback(lambda _sp: ended.set())
    sender = send_in_thread(link.peer_src, body[100_000:] + after)
    assert digest(recv_exact(link.peer_dst, len(body), 30)) == digest(body)
    assert ended.wait(10)
    assert (sp.reason, sp.transferred) == (EndReason.MAX, len(body))
    sender.join(10)
    assert recv_exact(link.src, len(after)) == after  # untouched, for the caller
