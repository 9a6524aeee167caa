"""Who splices what (splicepool.registry): endpoints, roles, counters, the lock.

These drive a ``Registry`` directly, on real sockets, with bare records standing in
for splices; the pool's own use of it is in every end-to-end test.
"""

from __future__ import annotations

import errno
import os

import pytest
from conftest import Link, fd_count

from splicepool import _sockets
from splicepool.registry import Registry
from splicepool.state import Record


def _info(sock, role):
    return _sockets.probe(sock, sock.fileno(), role)


def _claimed(reg: Registry, ln: Link, close: bool = False) -> Record:
    src_info, dst_info = _info(ln.src, "source"), _info(ln.dst, "drain")
    with reg.lock:
        reg.check_free(src_info, dst_info)
        src, dst = reg.take(src_info, close), reg.take(dst_info, close)
        rec = Record(max=0, idle=None, owner=None, copy=False)
        reg.claim(rec, src, dst, src_info, dst_info, close)
    return rec


def test_a_claim_sets_both_roles_and_the_release_gives_everything_back():
    ln = Link()
    try:
        fds0 = fd_count()
        mode0 = os.get_blocking(ln.src.fileno())  # gevent's sockets are non-blocking already
        reg = Registry()
        rec = _claimed(reg, ln)
        assert fd_count() == fds0 + 2  # the registry's own dups
        assert not os.get_blocking(ln.src.fileno())  # the dup shares the file: non-blocking
        sources, drains, refs = reg.snapshot()
        assert sources == {rec.src.key: rec} and drains == {rec.dst.key: rec}
        assert refs == {rec.src.key: 1, rec.dst.key: 1}
        with reg.lock:
            assert reg.source_of(rec.src.key) is rec and reg.drain_of(rec.dst.key) is rec
            assert reg.live() == 1
        rec.transferred = 42
        reg.source_ended(rec)  # the source is free at once, its count kept
        assert reg.snapshot()[0] == {} and reg.transferred(rec.src.key) == 42
        reg.drain_released(rec)
        assert reg.snapshot()[1] == {}
        reg.release(rec)
        assert reg.snapshot() == ({}, {}, {})
        assert fd_count() == fds0 and os.get_blocking(ln.src.fileno()) == mode0  # mode restored
        assert reg.transferred(rec.src.key) == 42 and reg.records() == 1
    finally:
        ln.close()


def test_a_busy_source_or_drain_is_ebusy_naming_the_other_side_and_changes_nothing():
    ln, other = Link(), Link()
    try:
        reg = Registry()
        rec = _claimed(reg, ln)
        before = reg.snapshot()
        with reg.lock:
            with pytest.raises(OSError) as exc:
                reg.check_free(_info(ln.src, "source"), _info(other.dst, "drain"))
            assert exc.value.errno == errno.EBUSY and "already spliced (to drain fd" in str(exc.value)
            with pytest.raises(OSError) as exc:
                reg.check_free(_info(other.src, "source"), _info(ln.dst, "drain"))
            assert exc.value.errno == errno.EBUSY and "already the drain of source fd" in str(exc.value)
        assert reg.snapshot() == before
        for step in (reg.source_ended, reg.drain_released, reg.release):
            step(rec)
    finally:
        ln.close()
        other.close()


def test_handed_over_sockets_are_closed_with_the_last_user_and_keep_no_count():
    ln = Link()
    try:
        reg = Registry()
        src_fd, dst_fd = ln.src.fileno(), ln.dst.fileno()
        rec = _claimed(reg, ln, close=True)
        assert (rec.src.fd, rec.dst.fd) == (src_fd, dst_fd)  # no dups: the sockets themselves
        ln.src.detach()
        ln.dst.detach()
        for step in (reg.source_ended, reg.drain_released, reg.release):
            step(rec)
        for fd in (src_fd, dst_fd):
            with pytest.raises(OSError):
                os.fstat(fd)
        assert reg.records() == 0
    finally:
        ln.close()


def test_a_closed_registry_refuses_new_work():
    reg = Registry()
    reg.check_open()
    reg.closed = True
    with pytest.raises(RuntimeError, match="the pool is closed"):
        reg.check_open()
