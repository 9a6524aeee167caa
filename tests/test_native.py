"""Native primitives (splicepool._native): the Event, native threads, the adapter hooks."""

from __future__ import annotations

import os
import threading

import pytest
from conftest import GEVENT

from splicepool import _native

native_only = pytest.mark.skipif(GEVENT, reason="waits block the OS thread: not in a monkey-patched process")


@native_only
def test_an_event_set_in_another_thread_wakes_its_waiter_and_stays_set():
    ev = _native.Event()
    assert not ev.is_set() and ev.wait(0.01) is False
    woke = []
    t = threading.Thread(target=lambda: woke.append(ev.wait(10)))
    t.start()
    ev.set()
    t.join(10)
    assert woke == [True] and ev.is_set() and ev.wait(0) is True
    ev.set()  # a second set changes nothing
    assert ev.wait() is True


def test_notify_runs_on_set_once_and_forget_stops_it():
    ev, calls = _native.Event(), []
    first, second = (lambda: calls.append(1)), (lambda: calls.append(2))
    ev.notify(first)
    ev.notify(second)
    ev.forget(second)
    ev.forget(second)  # not there any more: no error
    ev.set()
    ev.set()
    assert calls == [1]


@native_only
def test_start_thread_runs_a_native_thread_and_join_waits_for_its_end():
    started, release, ran = _native.Event(), _native.Event(), []

    def body():
        ran.append(_native.get_native_id())
        started.set()
        release.wait(10)

    join = _native.start_thread(body)
    assert started.wait(10)
    task = f"/proc/self/task/{ran[0]}"
    assert ran[0] != threading.get_native_id() and os.path.exists(task)  # its own OS thread
    release.set()
    join()
    assert not os.path.exists(task)  # join() returned once the OS thread was gone


def test_the_package_installs_the_gevent_hooks_and_each_is_inert_without_a_hub():
    hooks = _native.hooks
    assert all(callable(getattr(hooks, name)) for name in hooks.__slots__)
    if not GEVENT:
        ev = _native.Event()
        assert hooks.cooperative_wait(ev, 0) is None  # no hub in this thread: block natively
        assert hooks.in_hub_greenlet() is False
        assert hooks.report(40, "x %s", ("y",), False) is False  # logging is safe here
