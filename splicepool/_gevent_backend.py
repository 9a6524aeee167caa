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

from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from . import _hub
from .worker import Worker

if TYPE_CHECKING:
    from .pool import SplicePool

_READ = 1  # libev/libuv event bits, as gevent's loop.io() takes them
_WRITE = 2


class GeventHub:
    """Level-triggered hub on the gevent loop's io watchers (one per fd and direction)."""

    def __init__(self) -> None:
        self._loop = gevent.get_hub().loop
        self._watchers: dict[int, tuple[Any, Any]] = {}
        self._pending: dict[int, int] = {}
        self._event = gevent.event.Event()
        self._async = self._loop.async_()  # wake() is safe from any thread
        self._async.start(self._event.set)
        self.direct: Any = None  # set by a direct-dispatch worker: fn(fd, flags)

    def add(self, fd: int) -> None:
        loop = self._loop
        self._watchers[fd] = (loop.io(fd, _READ), loop.io(fd, _WRITE))

    def remove(self, fd: int) -> None:
        pair = self._watchers.pop(fd, None)
        self._pending.pop(fd, None)
        if pair is not None:
            for watcher in pair:
                watcher.stop()
                watcher.close()

    def interest(self, fd: int, read: bool, write: bool) -> None:
        pair = self._watchers.get(fd)
        if pair is None:
            return
        for watcher, want, flag in ((pair[0], read, _hub.IN), (pair[1], write, _hub.WRITE)):
            if want and not watcher.active:
                watcher.start(self._ready, fd, flag)
            elif not want and watcher.active:
                watcher.stop()

    def _ready(self, fd: int, flag: int) -> None:
        """io watcher callback (in the hub greenlet)."""
        if self.direct is not None:
            self.direct(fd, flag)
            return
        self._pending[fd] = self._pending.get(fd, 0) | flag
        self._event.set()

    def poll(self, timeout: float | None) -> list[tuple[int, int]]:
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

    def __init__(self, pool: SplicePool, index: int, direct: bool = False) -> None:
        super().__init__(pool, index, GeventHub())
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

    def _direct(self, fd: int, flag: int) -> None:
        """Direct dispatch: run the pass in the io callback, no switch to the worker."""
        ep = self.fds.get(fd)
        if ep is None:
            return
        self.wakeups += 1
        ready = self.ready
        mark = len(ready)
        self._dispatch(ep, flag)
        while len(ready) > mark:  # the splices this event made ready; older ones wait their turn
            sp = ready.pop()
            sp._queued = False
            self._xfer(sp)
        if ready:
            self.hub._event.set()  # requeued passes continue in the worker greenlet
