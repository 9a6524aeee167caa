"""Native (never monkey-patched) primitives for the worker threads.

gevent's ``monkey.patch_all()`` replaces ``threading``, ``_thread`` locks,
``time.sleep``, ``select`` and ``socket`` with cooperative versions that only
work inside the hub's thread. Worker threads are real OS threads, so they must
use the originals. When gevent has already patched the process we ask it for
the originals; otherwise the modules we import now *are* the originals, and a
later ``patch_all()`` replaces module attributes, not the objects captured here.
"""

from __future__ import annotations

import _thread
import os
import select
import sys
import time

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any


def _original(module: str, name: str, current: Any) -> Any:
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None:
        return current
    try:
        return monkey.get_original(module, name)
    except (AttributeError, ImportError):  # pragma: no cover - very old gevent
        return current


start_new_thread = _original("_thread", "start_new_thread", _thread.start_new_thread)
allocate_lock = _original("_thread", "allocate_lock", _thread.allocate_lock)
get_ident = _original("_thread", "get_ident", _thread.get_ident)
monotonic = _original("time", "monotonic", time.monotonic)
sleep = _original("time", "sleep", time.sleep)
get_native_id = _original("_thread", "get_native_id", _thread.get_native_id)
close = _original("os", "close", os.close)  # gevent's defers the close to its loop
_start_joinable = getattr(_thread, "start_joinable_thread", None)  # Python >= 3.13
if _start_joinable is not None:
    _start_joinable = _original("_thread", "start_joinable_thread", _start_joinable)
_set_sentinel = getattr(_thread, "_set_sentinel", None)  # Python <= 3.12
epoll = _original("select", "epoll", getattr(select, "epoll", None))


class Hooks:
    """What an adapter installs so the core works inside its event loop, without importing it.

    ``splicepool.gevent`` fills these in when it is imported (the package imports it;
    it never imports gevent itself, and each hook does nothing until gevent is in use).
    The core only calls them, and only when set.
    """

    __slots__ = ("cooperative_wait", "report", "in_hub_greenlet", "adopt_hub")

    def __init__(self) -> None:
        # cooperative_wait(event, timeout) -> bool | None: wait by yielding to this thread's
        # event loop, None if this thread runs none.
        self.cooperative_wait: Any = None
        # report(level, msg, args, exc_info) -> bool: a log record from a worker, handed to
        # a thread where logging is safe; False if the caller may log itself.
        self.report: Any = None
        # in_hub_greenlet() -> bool: in a loop callback, which must never block or switch out.
        self.in_hub_greenlet: Any = None
        # adopt_hub(): where a pool is made, note this thread's loop for worker log records.
        self.adopt_hub: Any = None


hooks = Hooks()


class Event:
    """A one-shot event on a native lock: ``set()`` from any thread, ``wait()`` from any.

    In a thread that runs a gevent hub, ``wait()`` yields to the hub instead of
    blocking it (see ``splicepool.gevent``); elsewhere it blocks the OS thread.
    """

    __slots__ = ("_lock", "_set", "_notify")

    def __init__(self) -> None:
        self._lock = allocate_lock()
        self._lock.acquire()
        self._set = False
        self._notify: list[Any] = []  # thread-safe callables run by set(): hub wakeups

    def set(self) -> None:
        if not self._set:
            self._set = True
            self._lock.release()
            for fn in tuple(self._notify):
                fn()

    def is_set(self) -> bool:
        return self._set

    def notify(self, fn: Any) -> None:
        """Call ``fn()`` (thread-safe, short) from ``set()``: how a loop adapter wakes its waiter."""
        self._notify.append(fn)

    def forget(self, fn: Any) -> None:
        """Stop calling ``fn`` (no error if it was not there)."""
        try:
            self._notify.remove(fn)
        except ValueError:
            pass

    def wait(self, timeout: float | None = None) -> bool:
        if self._set:
            return True
        wait = hooks.cooperative_wait
        if wait is not None:
            done = wait(self, timeout)
            if done is not None:
                return done
        if timeout is None:
            ok = self._lock.acquire()
        else:
            ok = self._lock.acquire(True, max(timeout, 0.0))
        if ok:
            self._lock.release()
        return ok


def report(level: int, msg: str, *args: Any, exc_info: bool = False) -> None:
    """Log from a worker thread without touching monkey-patched locks.

    Under gevent's ``patch_all()`` the ``logging`` module's locks are greenlet
    locks that a native thread must not take; the record is then handed to the
    hub thread (``hooks.report``, installed by ``splicepool.gevent``) or, failing that,
    written to stderr.
    """
    hook = hooks.report
    if hook is not None and hook(level, msg, args, exc_info):
        return
    import logging

    logging.getLogger("splicepool").log(level, msg, *args, exc_info=exc_info)


def start_thread(fn: Any) -> Any:
    """Start ``fn`` in a new native OS thread; return ``join()``, which waits for its real end."""
    if _start_joinable is not None:
        handle = _start_joinable(fn, daemon=True)
        return handle.join
    box: list[Any] = []
    started = allocate_lock()
    started.acquire()

    def run() -> None:
        # Held by this thread and released by the interpreter once its state is gone,
        # as threading.Thread does.
        sentinel = _set_sentinel()
        sentinel.acquire()
        box.append(sentinel)
        box.append(get_native_id())
        started.release()
        fn()

    start_new_thread(run, ())
    started.acquire()
    sentinel, tid = box
    task = f"/proc/self/task/{tid}"

    def join() -> None:
        sentinel.acquire()
        sentinel.release()
        # The interpreter is done with the thread; the OS thread exits a moment
        # later. Where /proc shows it, wait for that too (at most a second).
        deadline = monotonic() + 1.0
        while os.path.exists(task) and monotonic() < deadline:
            sleep(0.0005)

    return join
