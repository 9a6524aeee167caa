"""The hubs workers sleep on: edge-triggered epoll and the portable selectors hub."""

from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from conftest import tcp_pair, thread_backend_only

from splicepool import _hub, _native

pytestmark = thread_backend_only  # these hubs serve worker threads; a patched process cannot drive them

HUBS = [pytest.param(_hub.SelectorHub, id="selector")]
if _native.epoll is not None:
    HUBS.insert(0, pytest.param(_hub.EpollHub, id="epoll"))


@pytest.fixture(params=HUBS)
def hub(request):
    h = request.param()
    yield h
    h.close()


def _flags_for(events, fd: int) -> int:
    return sum(f for got, f in events if got == fd)


def test_readable_source_is_reported(hub):
    a, b = tcp_pair()
    try:
        b.setblocking(False)
        hub.add(b.fileno(), b.fileno())
        hub.interest(b.fileno(), read=True, write=False)
        assert _flags_for(hub.poll(0.05), b.fileno()) & _hub.READ == 0
        a.sendall(b"x")
        assert _flags_for(hub.poll(2.0), b.fileno()) & _hub.READ
    finally:
        hub.remove(b.fileno())
        a.close()
        b.close()


def test_write_interest_reports_a_writable_socket(hub):
    a, b = tcp_pair()
    try:
        hub.add(a.fileno(), a.fileno())
        hub.interest(a.fileno(), read=False, write=True)
        assert _flags_for(hub.poll(2.0), a.fileno()) & _hub.WRITE
    finally:
        hub.remove(a.fileno())
        a.close()
        b.close()


def test_a_reset_is_reported_as_error(hub):
    a, b = tcp_pair()
    try:
        hub.add(b.fileno(), b.fileno())
        hub.interest(b.fileno(), read=True, write=False)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        a.close()
        flags = _flags_for(hub.poll(2.0), b.fileno())
        assert flags & _hub.READ
        if isinstance(hub, _hub.EpollHub):
            assert flags & _hub.ERROR
    finally:
        hub.remove(b.fileno())
        b.close()


def test_wake_from_another_thread_ends_a_sleeping_poll(hub):
    """A wake ends the poll (whose list may hold the waker's own fd, which no caller watches);
    two wakes before a poll are one wakeup, after which the hub is quiet."""
    timer = threading.Timer(0.1, hub.wake)
    timer.start()
    start = time.monotonic()
    hub.poll(None)
    assert time.monotonic() - start < 5
    timer.join()
    hub.wake()
    hub.wake()
    start = time.monotonic()
    hub.poll(1.0)
    assert time.monotonic() - start < 0.5  # woken, not timed out
    assert hub.poll(0.05) == []


def test_removed_fd_is_not_reported(hub):
    a, b = tcp_pair()
    try:
        hub.add(b.fileno(), b.fileno())
        hub.interest(b.fileno(), read=True, write=False)
        hub.remove(b.fileno())
        a.sendall(b"x")
        assert _flags_for(hub.poll(0.1), b.fileno()) == 0
    finally:
        a.close()
        b.close()


def test_no_wakeup_is_lost_when_wake_races_with_consume(hub):
    """Many threads wake the hub while it consumes: every wake() after a consume is seen."""
    stop = threading.Event()
    posted = [0]
    seen = [0]

    def poster():
        while not stop.is_set():
            posted[0] += 1
            hub.wake()
            time.sleep(0)  # give up the GIL: wakes land at every point of the consume

    threads = [threading.Thread(target=poster) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            hub.poll(1.0)
            seen[0] += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    # Quiet now; one more wake must end a sleeping poll at once.
    hub.poll(0)
    timer = threading.Timer(0.05, hub.wake)
    timer.start()
    start = time.monotonic()
    hub.poll(5.0)
    assert time.monotonic() - start < 2.0, "a wake() was lost"
    timer.join()
    assert seen[0] > 1 and posted[0] > 1


def test_poll_returns_the_data_registered_with_the_fd_and_never_the_waker(hub):
    a, b = tcp_pair()
    mark = object()
    try:
        b.setblocking(False)
        hub.add(b.fileno(), mark)
        hub.interest(b.fileno(), read=True, write=False)
        a.sendall(b"x")
        hub.wake()
        events = []
        deadline = time.monotonic() + 2.0
        while not events and time.monotonic() < deadline:
            events = hub.poll(2.0)
        assert [got for got, _ in events] == [mark]  # the waker's wakeup is consumed, not listed
    finally:
        hub.remove(b.fileno())
        a.close()
        b.close()
