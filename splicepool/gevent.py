"""gevent integration: wait for splices in greenlets, log from workers safely.

The worker threads are real OS threads started with the original ``_thread``
functions, and touch no monkey-patchable API. What crosses back into gevent
goes through one *completion port* per hub: a thread-safe deque plus the
hub loop's ``async_`` watcher, whose ``send()`` is the one gevent call that
is safe from a foreign thread. Importing this module never imports gevent:
the package imports it, and it installs its hooks into ``_native.hooks``
(the core never imports it), each of which does nothing until gevent is in
``sys.modules``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections import deque

from . import _native

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

_ports: dict[int, _Port] = {}  # id(hub) -> its completion port
_main_port: _Port | None = None  # where worker log records go


class _Port:
    """Runs callables in a hub's thread, posted from any thread."""

    def __init__(self, hub: Any) -> None:
        self.hub = hub
        self.queue: deque[Any] = deque()
        self.waiters = 0
        self.watcher = hub.loop.async_()
        self.watcher.start(self._run)
        self.watcher.ref = False  # keeps the loop alive only while someone waits

    def post(self, fn: Any) -> None:
        """Any thread: run ``fn()`` in the hub's thread soon."""
        self.queue.append(fn)
        self.watcher.send()

    def _run(self) -> None:
        queue = self.queue
        while queue:
            try:
                queue.popleft()()
            except Exception:  # a log handler or a waiter that failed: never kill the hub
                logging.getLogger("splicepool").exception("splicepool: completion failed")

    def hold(self, delta: int) -> None:
        self.waiters += delta
        self.watcher.ref = self.waiters > 0


def _current_hub() -> Any:
    try:
        from gevent._hub_local import get_hub_if_exists
    except ImportError:  # pragma: no cover - very old gevent
        return None
    return get_hub_if_exists()


def in_hub_thread() -> bool:
    """True in a thread that runs a gevent hub (where greenlets and logging are safe)."""
    return _current_hub() is not None


def in_hub_greenlet() -> bool:
    """True in the hub's own greenlet (its callbacks), which must never block or switch out."""
    hub = _current_hub()
    if hub is None:
        return False
    import gevent

    return gevent.getcurrent() is hub


def _port(hub: Any) -> _Port:
    global _main_port
    port = _ports.get(id(hub))
    if port is None or port.hub is not hub:
        port = _ports[id(hub)] = _Port(hub)
    if _main_port is None or _main_port.hub is hub or _main_port.hub.loop is None:
        _main_port = port
    return port


def cooperative_wait(event: _native.Event, timeout: float | None) -> bool | None:
    """Wait for ``event`` by yielding to this thread's gevent hub; None if it has none."""
    hub = _current_hub()
    if hub is None:
        return None
    import gevent.event

    port = _port(hub)
    flag = gevent.event.Event()

    def notify() -> None:  # a worker thread, from event.set()
        port.post(flag.set)

    event.notify(notify)
    port.hold(+1)
    try:
        if event.is_set():
            return True
        flag.wait(timeout)
        return event.is_set()
    finally:
        port.hold(-1)
        event.forget(notify)


def report_from_thread(level: int, msg: str, args: tuple[Any, ...], exc_info: bool) -> None:
    """A worker's log record, emitted by the hub thread (never logging in the worker)."""
    text = msg % args if args else msg
    if exc_info:
        import traceback

        text += "\n" + traceback.format_exc().rstrip()
    port = _main_port
    if port is not None and port.hub.loop is not None:
        port.post(lambda: logging.getLogger("splicepool").log(level, "%s", text))
        return
    try:
        os.write(2, f"splicepool: {logging.getLevelName(level)}: {text}\n".encode())
    except OSError:
        pass


def adopt_current_hub() -> None:
    """Send worker log records to this thread's hub (called where the pool is made)."""
    hub = _current_hub()
    if hub is not None:
        _port(hub)


def _cooperative_wait(event: _native.Event, timeout: float | None) -> bool | None:
    if "gevent" not in sys.modules:
        return None
    return cooperative_wait(event, timeout)


def _report(level: int, msg: str, args: tuple[Any, ...], exc_info: bool) -> bool:
    """A worker thread must not take patched logging locks: hand the record to the hub."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading") or in_hub_thread():
        return False
    report_from_thread(level, msg, args, exc_info)
    return True


def _in_hub_greenlet() -> bool:
    return "gevent" in sys.modules and in_hub_greenlet()


def _adopt_hub() -> None:
    if "gevent" in sys.modules:
        adopt_current_hub()


_native.hooks.cooperative_wait = _cooperative_wait
_native.hooks.report = _report
_native.hooks.in_hub_greenlet = _in_hub_greenlet
_native.hooks.adopt_hub = _adopt_hub

__all__ = [
    "adopt_current_hub",
    "cooperative_wait",
    "in_hub_greenlet",
    "in_hub_thread",
    "report_from_thread",
]
