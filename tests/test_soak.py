"""Soaks: many splices, every end reason, and nothing left behind.

The short soak runs in ``make test``; ``make soak`` runs the long one
(SPLICEPOOL_SOAK_SPLICES, default 50,000 splices).
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time

import pytest
from conftest import Link, fd_count, recv_exact, thread_count

from splicepool import EndReason, SplicePool


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def _settled_threads() -> int:
    """OS threads once every thread threading does not know about (pool workers) has gone."""
    deadline = time.monotonic() + 2.0
    while thread_count() != threading.active_count() and time.monotonic() < deadline:
        time.sleep(0.01)
    return thread_count()


def _one_round(pool: SplicePool, links: list[Link], i: int) -> None:
    """Splice every link once, each ending by one of four reasons chosen by position."""
    splices = []
    expected = []
    for k, ln in enumerate(links):
        payload = hashlib.sha256(f"{i}:{k}".encode()).digest() * 64  # 2 KiB, distinct
        kind = (i + k) % 4
        if kind == 0:  # EOF
            ln.peer_src.sendall(payload)
            sp = pool.splice(ln.src, ln.dst)
            ln.peer_src.shutdown(socket.SHUT_WR)
            expected.append((EndReason.EOF, payload))
        elif kind == 1:  # MAX
            ln.peer_src.sendall(payload)
            sp = pool.splice(ln.src, ln.dst, max=1000)
            expected.append((EndReason.MAX, payload[:1000]))
        elif kind == 2:  # IDLE
            ln.peer_src.sendall(payload)
            sp = pool.splice(ln.src, ln.dst, idle=0.05)
            expected.append((EndReason.IDLE, payload))
        else:  # UNSPLICED
            ln.peer_src.sendall(payload)
            sp = pool.splice(ln.src, ln.dst)
            expected.append((EndReason.UNSPLICED, None))
        splices.append(sp)
    for k, (sp, (reason, data)) in enumerate(zip(splices, expected, strict=True)):
        ln = links[k]
        if reason is EndReason.UNSPLICED:
            got = recv_exact(ln.peer_dst, 1, timeout=10)  # let it move something first
            sp.unsplice()
            assert sp.wait(10) is reason
            got += recv_exact(ln.peer_dst, sp.transferred - 1, timeout=10)
            ln.src.settimeout(10)
            rest = recv_exact(ln.src, 2048 - sp.transferred, timeout=10)
            assert hashlib.sha256(f"{i}:{k}".encode()).digest() * 64 == got + rest
            continue
        assert sp.wait(10) is reason, sp
        assert recv_exact(ln.peer_dst, len(data), timeout=10) == data
        assert sp.transferred == len(data)
        if reason is EndReason.MAX:
            assert recv_exact(ln.src, 2048 - 1000, timeout=10) == (
                hashlib.sha256(f"{i}:{k}".encode()).digest() * 64
            )[1000:]


def _soak(total: int, batch: int = 64) -> dict[str, int]:
    before = {"fds": fd_count(), "threads": _settled_threads(), "rss_kib": _rss_kib()}
    done = 0
    with SplicePool(workers=2) as pool:
        while done < total:
            links = [Link() for _ in range(batch)]
            try:
                _one_round(pool, links, done)
            finally:
                for ln in links:
                    ln.close()
            done += batch
        stats = pool.stats()
        assert stats["live"] == 0
        assert pool.registry.records() <= 2 * 1024 + batch  # ended counters of closed sockets are pruned
    after = {"fds": fd_count(), "threads": thread_count(), "rss_kib": _rss_kib()}  # close() joined
    assert after["fds"] == before["fds"], (before, after)
    assert after["threads"] == before["threads"], (before, after)
    return {"splices": done, **{f"{k}_before": v for k, v in before.items()},
            **{f"{k}_after": v for k, v in after.items()}}


def test_short_soak_leaves_nothing_behind():
    _soak(1024)


@pytest.mark.soak
def test_long_soak_leaves_nothing_behind(capsys):
    total = int(os.environ.get("SPLICEPOOL_SOAK_SPLICES", "50000"))
    figures = _soak(total)
    with capsys.disabled():
        print(f"\nsoak: {figures}")
    assert figures["rss_kib_after"] - figures["rss_kib_before"] < 64 * 1024
