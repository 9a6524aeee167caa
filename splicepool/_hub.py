"""Selector hubs: what a worker sleeps on.

One contract, several mechanisms (as CPython's ``selectors`` does it):

* ``add(fd, data)`` starts watching a socket fd, ``remove(fd)`` stops (always
  before the fd is closed: epoll keys on the open file, which a dup keeps alive).
  ``forget(fd)`` stops too, for an fd the caller is about to close and that no
  other fd shares: epoll drops the registration itself when the file closes, so
  ``EpollHub`` makes no ``epoll_ctl`` for it (the others remove it).
  ``data`` is what ``poll`` returns for the fd, as ``selectors`` returns a key's
  ``data`` (the worker registers the socket's endpoint). ``get(fd)`` is the data
  of a watched fd (None if it is not watched), ``watched()`` all of them, and
  ``len(hub)`` how many fds it watches: the hub's map is the worker's only one.
* ``interest(fd, read, write)`` says what the worker now waits for on ``fd``.
  Turning ``write`` on must guarantee a later wakeup once the fd is writable.
* ``poll(timeout)`` returns ``[(data, flags)]``; ``timeout`` None sleeps until
  woken. ``flags`` are epoll's bits (Linux's numbers on every system); test them
  with the masks
  ``READ`` (worth reading: data, FIN, urgent data or error), ``WRITE``, ``ERROR``
  (error or hang-up), ``HANGUP`` (FIN or error: epoll only) and ``URGENT`` (TCP
  urgent data: epoll only). Level-triggered hubs report ``IN`` and ``WRITE`` only.
* ``wake()`` may be called from any thread and makes ``poll`` return soon.
* ``host(fd)`` watches one more fd, level-triggered, outside the map: the fd of a loop
  the worker runs besides its splices (``SplicePool.host``). ``poll`` reports it by
  setting ``guest_ready``, not in its list; ``unhost()`` stops watching it.
* ``close()`` releases the hub's own fds.

``EpollHub`` (Linux) is edge-triggered: each fd is registered once for
everything, so a pass never needs an ``epoll_ctl`` except to arm a drain wait
and, around that wait, to mute and unmute its source's read events (a source
not read for now would report every segment that arrives: a wakeup for nothing).
``SelectorHub`` is the portable, level-triggered fallback (kqueue, poll).
"""

from __future__ import annotations

import os
import select
import selectors
from collections.abc import Callable

from . import _native

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

# epoll's event bits (the same numbers on every Linux architecture).
IN = 0x001  # EPOLLIN: readable
URGENT = 0x002  # EPOLLPRI: TCP urgent data arrived (reads stop at its mark)
WRITE = 0x004  # EPOLLOUT: writable
_ERR = 0x008  # EPOLLERR
_HUP = 0x010  # EPOLLHUP
_RDHUP = 0x2000  # EPOLLRDHUP: the peer's FIN
# Masks the worker tests events with.
READ = IN | URGENT | _RDHUP | _ERR | _HUP  # worth a read: data, urgent data, the peer's FIN, an error
ERROR = _ERR | _HUP
HANGUP = _RDHUP | _ERR | _HUP  # the peer's FIN, or an error, was seen when the event was taken


class _Waker:
    """A self-pipe (eventfd on Linux) that coalesces wakeups from other threads."""

    def __init__(self) -> None:
        self.pending = False
        if hasattr(os, "eventfd"):
            self.rfd = self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        else:  # pragma: no cover - non-Linux
            self.rfd, self.wfd = os.pipe()
            os.set_blocking(self.rfd, False)
            os.set_blocking(self.wfd, False)

    def wake(self) -> None:
        if not self.pending:
            self.pending = True
            try:
                os.write(self.wfd, b"\x01\0\0\0\0\0\0\0")
            except BlockingIOError:  # pragma: no cover - counter or pipe full: already awake
                pass

    def consume(self) -> None:
        # Read first, then clear: a wake() between the two either saw pending set
        # (its message is older than this and will be processed now) or wrote again
        # (the next poll returns at once). Clearing first could leave pending set
        # with nothing to read, and every later wake() would be skipped.
        try:
            os.read(self.rfd, 4096)
        except BlockingIOError:
            pass
        self.pending = False

    def close(self) -> None:
        _native.close(self.rfd)
        if self.wfd != self.rfd:  # pragma: no cover - non-Linux
            _native.close(self.wfd)


class _Watched:
    """The fd -> data map both selector hubs keep (``get``, ``watched``, ``len``), and the
    hosted loop's fd (``unhost``; each hub's ``host`` registers it its own way)."""

    _data: dict[int, Any]
    _guest = -1  # the hosted loop's fd (see host), -1 for none
    guest_ready = False
    _unregister: Callable[[int], Any]  # the selector's or epoll's own

    def unhost(self) -> None:
        fd, self._guest = self._guest, -1
        self.guest_ready = False
        try:
            self._unregister(fd)
        except (OSError, KeyError, ValueError):
            pass

    def get(self, fd: int) -> Any:
        return self._data.get(fd)

    def watched(self) -> list[Any]:
        return list(self._data.values())

    def __len__(self) -> int:
        return len(self._data)


_READ_EVENTS = select.EPOLLIN | select.EPOLLPRI  # what a muted fd (not read for now) does not report


class EpollHub(_Watched):
    """Edge-triggered epoll: one registration per fd for its whole life, its read events
    muted while the worker does not read it."""

    _MASK = (
        select.EPOLLIN | select.EPOLLPRI | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
        if hasattr(select, "EPOLLET")
        else 0
    )

    def __init__(self) -> None:
        self._ep = _native.epoll()
        self._waker = _Waker()
        self._ep.register(self._waker.rfd, select.EPOLLIN)
        self._data: dict[int, Any] = {}
        self._muted: set[int] = set()  # fds registered without EPOLLIN (see interest)
        self._unregister = self._ep.unregister
        self.wake = self._waker.wake

    def add(self, fd: int, data: Any) -> None:
        self._ep.register(fd, self._MASK)
        self._data[fd] = data

    def remove(self, fd: int) -> None:
        self._muted.discard(fd)
        self._data.pop(fd, None)
        try:
            self._ep.unregister(fd)
        except (OSError, ValueError):
            pass

    def forget(self, fd: int) -> None:
        self._muted.discard(fd)
        # Events the kernel reports for it until it is closed find no data: poll() drops them.
        self._data.pop(fd, None)

    def interest(self, fd: int, read: bool, write: bool) -> None:
        muted = self._muted
        if write:
            # Re-polling the fd sets the kernel's "no space" mark, so the socket
            # reports EPOLLOUT as soon as the peer's ACKs free room; and if it is
            # already writable, the event is queued now. No wakeup is lost.
            self._ep.modify(fd, self._MASK if read else self._MASK & ~_READ_EVENTS)
        elif read == (fd not in muted):
            return  # as registered already: no epoll_ctl
        else:
            # Unmuted, the re-poll queues an event now if it is readable: none is lost.
            # Muted: not read for now (a source waiting for its drain, say); edge-triggered
            # epoll would still report every segment that arrives (each one an edge), a
            # wakeup for nothing each. Its hang-up and error events stay.
            self._ep.modify(fd, self._MASK if read else self._MASK & ~(_READ_EVENTS | select.EPOLLOUT))
        if read:
            muted.discard(fd)
        else:
            muted.add(fd)

    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        events = self._ep.poll(-1 if timeout is None else timeout, 512)
        if not events:
            return events
        data = self._data
        wfd = self._waker.rfd
        out = []
        for fd, flags in events:
            ep = data.get(fd)
            if ep is not None:
                out.append((ep, flags))
            elif fd == wfd:
                self._waker.consume()
            elif fd == self._guest:
                self.guest_ready = True
        return out

    def host(self, fd: int) -> None:
        self._ep.register(fd, select.EPOLLIN)  # level-triggered: what a step leaves is reported again
        self._guest = fd

    def close(self) -> None:
        self._ep.close()
        self._waker.close()


class SelectorHub(_Watched):
    """Level-triggered ``selectors`` hub for systems without epoll."""

    def __init__(self, selector: Any = None) -> None:
        self._sel = selector if selector is not None else selectors.DefaultSelector()
        self._waker = _Waker()
        self._sel.register(self._waker.rfd, selectors.EVENT_READ)
        self._mask: dict[int, int] = {}
        self._data: dict[int, Any] = {}
        self._unregister = self._sel.unregister
        self.wake = self._waker.wake

    def add(self, fd: int, data: Any) -> None:
        self._mask[fd] = 0
        self._data[fd] = data

    def remove(self, fd: int) -> None:
        self._data.pop(fd, None)
        if self._mask.pop(fd, 0):
            self._sel.unregister(fd)

    forget = remove  # a selector keeps its own map: it must be told

    def interest(self, fd: int, read: bool, write: bool) -> None:
        old = self._mask.get(fd, 0)
        new = (selectors.EVENT_READ if read else 0) | (selectors.EVENT_WRITE if write else 0)
        if new == old:
            return
        self._mask[fd] = new
        if not old:
            self._sel.register(fd, new, self._data[fd])
        elif not new:
            self._sel.unregister(fd)
        else:
            self._sel.modify(fd, new, self._data[fd])

    def poll(self, timeout: float | None) -> list[tuple[Any, int]]:
        out = []
        wfd = self._waker.rfd
        for key, ev in self._sel.select(timeout):
            if key.fd == wfd:
                self._waker.consume()
                continue
            if key.fd == self._guest:
                self.guest_ready = True
                continue
            flags = (IN if ev & selectors.EVENT_READ else 0) | (
                WRITE if ev & selectors.EVENT_WRITE else 0
            )
            out.append((key.data, flags))
        return out

    def host(self, fd: int) -> None:
        self._sel.register(fd, selectors.EVENT_READ)
        self._guest = fd

    def close(self) -> None:
        self._sel.close()
        self._waker.close()


def default_hub() -> EpollHub | SelectorHub:
    return EpollHub() if _native.epoll is not None else SelectorHub()


#: Names accepted by ``SplicePool(hub=...)``.
HUBS: dict[str, Callable[[], EpollHub | SelectorHub]] = {
    "auto": default_hub,
    "epoll": EpollHub,
    "selector": SelectorHub,
}
