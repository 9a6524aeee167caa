"""The gevent backend: workers are greenlets on the gevent hub, no OS thread.

``SplicePool(backend="gevent")`` reuses the pool, the splice state machine,
the worker loop and xfer unchanged; only the hub differs. ``GeventHub`` turns
the gevent loop's io watchers into the hub contract (level-triggered, like
``SelectorHub``): an io watcher dispatches a ready fd to its worker greenlet,
as FreeBSD's wakeups dispatch to a worker thread.

With ``dispatch="direct"`` the io watcher's callback runs the pass itself,
without switching to the worker greenlet (the *direct dispatch* FreeBSD's
commit names as future work). A pass is bounded, and a splice that used its
budget is requeued to the worker greenlet, so one busy splice cannot hold the
hub. Done callbacks then run inside the hub: they must not block.

Everything here runs in the hub's thread: use such a pool from that thread.
"""

from __future__ import annotations

from typing import Any

import gevent
import gevent.event

from . import _hub, _native
from .engine import Worker

_READ = 1  # libev/libuv event bits, as gevent's loop.io() takes them
_WRITE = 2


class GeventHub:
    """Level-triggered hub on the gevent loop's io watchers (one per fd and direction)."""

    guest_ready = False  # always: a greenlet worker hosts no loop (SplicePool.host refuses)

    def __init__(self) -> None:
        self._loop = gevent.get_hub().loop
        self._watchers: dict[int, tuple[Any, Any, Any]] = {}  # fd -> (read, write, data)
        self._pending: dict[Any, int] = {}  # data -> flags
        self._event = gevent.event.Event()
        self._async = self._loop.async_()  # wake() is safe from any thread
        self._async.start(self._event.set)
        self.direct: Any = None  # set by a direct-dispatch worker: fn(fd, flags)

    def add(self, fd: int, data: Any) -> None:
        loop = self._loop
        self._watchers[fd] = (loop.io(fd, _READ), loop.io(fd, _WRITE), data)

    def remove(self, fd: int) -> None:
        entry = self._watchers.pop(fd, None)
        if entry is not None:
            self._pending.pop(entry[2], None)
            for watcher in entry[:2]:
                watcher.stop()
                watcher.close()

    forget = remove  # libev must stop its watchers before the fd closes

    def interest(self, fd: int, read: bool, write: bool) -> None:
        entry = self._watchers.get(fd)
        if entry is None:
            return
        data = entry[2]
        for watcher, want, flag in ((entry[0], read, _hub.IN), (entry[1], write, _hub.WRITE)):
            if want and not watcher.active:
                watcher.start(self._ready, data, flag)
            elif not want and watcher.active:
                watcher.stop()

    def _ready(self, data: Any, flag: int) -> None:
        """io watcher callback (in the hub greenlet)."""
        if self.direct is not None:
            self.direct(data, flag)
            return
        self._pending[data] = self._pending.get(data, 0) | flag
        self._event.set()

    def get(self, fd: int) -> Any:
        entry = self._watchers.get(fd)
        return entry[2] if entry is not None else None

    def watched(self) -> list[Any]:
        return [entry[2] for entry in self._watchers.values()]

    def __len__(self) -> int:
        return len(self._watchers)

    def kick(self) -> None:
        """Make the worker greenlet's next ``poll`` return (from the hub greenlet)."""
        self._event.set()

    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        if not self._pending:
            if timeout == 0:
                gevent.sleep(0)  # a bounded round of passes is done: let the hub run
            else:
                self._event.wait(timeout)
        self._event.clear()
        out = list(self._pending.items())
        self._pending.clear()
        return out

    def wake(self) -> None:
        self._async.send()

    def close(self) -> None:
        for fd in list(self._watchers):
            self.remove(fd)
        self._async.stop()
        self._async.close()


class GeventWorker(Worker):
    """A worker greenlet: the same loop as a worker thread, on a GeventHub."""

    def __init__(self, index: int, options: Any, registry: Any, listener: Any, peers: Any,
                 direct: bool = False) -> None:
        super().__init__(index, options, registry, listener, peers, GeventHub())
        self._greenlet: Any = None
        self._hub_greenlet: Any = None
        if direct:
            self.hub.direct = self._direct
            self._hub_greenlet = gevent.get_hub()

    def start(self) -> None:
        self._greenlet = gevent.spawn(self._run)
        self.join = self._join

    def _join(self) -> None:
        self._greenlet.join()

    def is_current(self) -> bool:
        """In the worker greenlet, or (direct dispatch) in the hub, which runs its passes too."""
        current = gevent.getcurrent()
        return (current is self._greenlet and current is not None) or current is self._hub_greenlet

    def _direct(self, ep: Any, flag: int) -> None:
        """Direct dispatch: run the pass in the io callback, no switch to the worker."""
        if self.hub.get(ep.fd) is not ep:
            return
        self.wakeups += 1
        self.xfer.now = _native.monotonic()
        ready = self.ready
        mark = len(ready)
        self.dispatch(ep, flag)
        # The splices this event made ready, once each; older ones, and a pass that used
        # its budget and was requeued, wait their turn in the worker greenlet.
        made = [ready.pop() for _ in range(len(ready) - mark)]
        for sp in reversed(made):
            self.run_one(sp)
        if ready:
            self.hub.kick()  # requeued passes continue in the worker greenlet
