"""SplicePool: options, the order of the checks, worker choice, and one start path.

This is FreeBSD's ``so_splice`` / ``so_unsplice`` side: it validates a
request in the kernel's order, takes its own duplicates of the fds (or the
sockets themselves, when handed over), assigns a worker (round-robin, or the
worker of a live splice sharing a socket: see ``_choose_worker``) and hands
the splice to it. ``splice()`` and ``proxy()`` share one start path. The
workers do everything else. docs/contract.md says what users may rely on.
"""

from __future__ import annotations

import atexit
import errno
import os
from collections import namedtuple

from . import _hub, _native, _sockets, engine
from ._sockets import oserror
from .registry import Registry
from .relay import LISTENER, Proxy
from .splice import Splice, is_live
from .xfer import HAVE_SPLICE

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

    from ._sockets import SockInfo

__all__ = ["Options", "SplicePool", "default_pool"]

#: A pool's options, validated once by ``options()`` and frozen.
Options = namedtuple(
    "Options",
    "workers backend dispatch pipe_size zero_copy copy_size small_copy hub bind_cpus",
)


def _int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    return value


def options(
    workers: int | None = None,
    backend: str = "thread",
    *,
    pipe_size: int = 1 << 20,
    zero_copy: bool | None = None,
    copy_size: int = 256 * 1024,
    small_copy: int = 16 * 1024,
    hub: str = "auto",
    dispatch: str = "worker",
    bind_cpus: bool = False,
) -> Options:
    """Validate ``SplicePool``'s arguments (``TypeError``/``ValueError`` naming the bad one)."""
    if workers is None:
        workers = os.cpu_count() or 1
    if _int("workers", workers) < 1:
        raise ValueError(f"workers must be at least 1, not {workers}")
    if backend not in ("thread", "gevent"):
        raise ValueError(f"unknown backend {backend!r}: expected 'thread' or 'gevent'")
    if dispatch not in ("worker", "direct"):
        raise ValueError(f"unknown dispatch {dispatch!r}: expected 'worker' or 'direct'")
    if dispatch == "direct" and backend != "gevent":
        raise ValueError("dispatch='direct' needs backend='gevent'")
    if backend == "gevent":
        try:
            import gevent  # noqa: F401
        except ImportError:
            raise ValueError("backend='gevent' needs gevent: pip install splicepool[gevent]") from None
    for name, value in (("pipe_size", pipe_size), ("copy_size", copy_size)):
        if _int(name, value) < 4096:
            raise ValueError(f"{name} must be at least 4096 bytes, not {value}")
    if _int("small_copy", small_copy) < 0 or small_copy > copy_size:
        raise ValueError(f"small_copy must be between 0 and copy_size ({copy_size}), not {small_copy}")
    if bind_cpus and (backend != "thread" or not hasattr(os, "sched_setaffinity")):
        raise ValueError("bind_cpus=True needs backend='thread' and os.sched_setaffinity (Linux)")
    if hub not in _hub.HUBS:
        raise ValueError(f"unknown hub {hub!r}: expected one of {sorted(_hub.HUBS)}")
    if zero_copy and not HAVE_SPLICE:
        raise ValueError("zero_copy=True needs os.splice (Linux, Python >= 3.10)")
    return Options(
        workers=workers,
        backend=backend,
        dispatch=dispatch,
        pipe_size=pipe_size,
        zero_copy=HAVE_SPLICE if zero_copy is None else bool(zero_copy),
        copy_size=copy_size,
        small_copy=small_copy,
        hub=hub,
        bind_cpus=bool(bind_cpus),
    )


class SplicePool:
    """A fixed pool of worker threads that splice sockets.

    ``workers`` (default: ``os.cpu_count()``) threads start lazily, on the first
    splice assigned to each. ``zero_copy=None`` uses ``os.splice`` where the
    platform has it, ``False`` forces the copy path. ``pipe_size`` sizes each
    splice's pipe (``F_SETPIPE_SZ``); ``copy_size`` the copy path's buffer.
    ``small_copy``: on the zero-copy path, a splice whose last read took fewer
    bytes than this reads next with ``recv_into`` up to this many (two plain
    syscalls beat two splices through a pipe for a request or a reply), most
    often right where the worker handles the event, without a queued pass; it
    goes back to splicing as soon as a read fills it. 0 always splices.
    ``hub`` picks what workers sleep on: ``"epoll"`` (edge-triggered, Linux),
    ``"selector"`` (level-triggered ``selectors.DefaultSelector``, what other
    systems get) or ``"auto"`` (epoll where there is one).
    ``backend="gevent"`` makes the workers greenlets on the gevent hub (no OS
    thread; use the pool from the hub's thread); with it, ``dispatch="direct"``
    runs each pass in the io watcher's callback instead of the worker greenlet.
    ``bind_cpus=True`` binds worker thread i to the i-th CPU the process may run
    on (round-robin, ``os.sched_setaffinity``), as FreeBSD binds its splice and
    KTLS threads; docs/performance.md says when it pays.
    A context manager: leaving the block calls ``close()``.
    """

    def __init__(
        self,
        workers: int | None = None,
        backend: str = "thread",
        *,
        pipe_size: int = 1 << 20,
        zero_copy: bool | None = None,
        copy_size: int = 256 * 1024,
        small_copy: int = 16 * 1024,
        hub: str = "auto",
        dispatch: str = "worker",
        bind_cpus: bool = False,
    ) -> None:
        self.options = options(
            workers, backend, pipe_size=pipe_size, zero_copy=zero_copy, copy_size=copy_size,
            small_copy=small_copy, hub=hub, dispatch=dispatch, bind_cpus=bind_cpus,
        )
        self.registry = Registry()
        self._workers: list[Any] = [None] * self.options.workers
        self._next = 0
        self._unwoken: list[Any] = []  # workers given relays with wake=False, not woken yet
        adopt = _native.hooks.adopt_hub
        if adopt is not None:  # gevent: workers' log records go to this thread's hub
            adopt()

    # -- context manager and views ------------------------------------------------
    def __enter__(self) -> SplicePool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        with self.registry.lock:
            state = "closed" if self.registry.closed else f"live={self.registry.live()}"
        return f"<SplicePool workers={len(self._workers)} {state}>"

    @property
    def backend(self) -> str:
        return self.options.backend

    @property
    def dispatch(self) -> str:
        return self.options.dispatch

    @property
    def workers(self) -> int:
        return len(self._workers)

    @property
    def closed(self) -> bool:
        return self.registry.closed

    def worker(self, index: int) -> Any:
        """The worker at ``index`` if it has started (for stats and tests), else None."""
        return self._workers[index]

    @property
    def next_worker(self) -> int:
        """The index of the worker the next splice goes to, unless it shares a socket with a
        live splice (it then joins that splice's worker)."""
        return self._next

    def start(self) -> SplicePool:
        """Start every worker now (they otherwise start on their first splice); returns the pool.

        Raises ``RuntimeError`` if the pool is closed, ``OSError`` if a worker cannot start
        (the ones started stay).
        """
        with self.registry.lock:
            self.registry.check_open()
            for index in range(len(self._workers)):
                self._worker(index)
        return self

    # -- splice / unsplice ---------------------------------------------------------
    def splice(
        self,
        src: Any,
        dst: Any,
        max: int = 0,
        idle: float | None = None,
        close: bool = False,
        *,
        wait: bool = True,
    ) -> Splice:
        """Splice ``src`` into ``dst``; return the running ``Splice``.

        Returns once its worker has set the splice up and run its first pass, so
        data already in the source has started moving (at most one pass of
        another splice delays that). ``dst`` negative unsplices ``src`` (and
        returns that splice). Raises ``OSError`` with FreeBSD's errno for a bad
        request (docs/contract.md, "Errors"), ``ELOOP`` if ``src`` and ``dst`` are the two ends
        of one TCP connection, ``TypeError`` for bad types, ``RuntimeError`` if the pool
        is closed; a failed call changes nothing. ``wait=False`` returns as soon as the splice
        is handed to its worker, as ``proxy(wait=False)`` does (an event loop that splices,
        such as the HTTP front door, never waits for a worker thread).
        """
        src_fd = _sockets.fileno_of(src, "source")
        if isinstance(dst, int) and not isinstance(dst, bool) and dst < 0:
            return self.unsplice(src)
        dst_fd = _sockets.fileno_of(dst, "drain")
        max = _sockets.check_max(max)
        idle = _sockets.check_idle(idle)
        self.registry.check_open()
        src_info = _sockets.probe(src, src_fd, "source")
        dst_info = _sockets.probe(dst, dst_fd, "drain")
        _sockets.validate_limits(max, idle)
        (sp,) = self._start(((src, src_info, dst, dst_info),), max, idle, close, wait, None)
        return sp

    def proxy(
        self, a: Any, b: Any, *, idle: float | None = None, half_close: bool = True, wait: bool = True
    ) -> Proxy:
        """Relay ``a`` ⇄ ``b``: splices a → b and b → a; return the ``Proxy``.

        The pool owns both sockets from the call on and closes them once both
        directions have ended. EOF one way shuts the other socket's write side
        (``half_close``, default) and the reverse keeps running; with
        ``half_close=False`` it ends both. An error, ``idle`` seconds with no
        byte moved either way (nor leaving either socket's send queue), or
        ``Proxy.close()`` ends both, and then both peers get a RST, never a FIN
        that would pass for a complete transfer. Errors as for ``splice``,
        checked for a → b then b → a; a failed call changes nothing. A client
        that has already reset is no longer connected: that is
        ``OSError(ENOTCONN)``, and the caller still owns both sockets and must
        close them. Returns once both directions have run their first pass, like ``splice``;
        ``wait=False`` returns as soon as they are handed to their worker (an
        accept loop then never waits for a worker thread).
        """
        a_fd = _sockets.fileno_of(a, "a")
        b_fd = _sockets.fileno_of(b, "b")
        idle = _sockets.check_idle(idle)
        self.registry.check_open()
        a_info = _sockets.probe(a, a_fd, "a")
        b_info = _sockets.probe(b, b_fd, "b")
        _sockets.validate_limits(0, idle)
        if a_info.key == b_info.key:
            raise oserror(errno.EINVAL, f"{a_info.label} and {b_info.label} are one socket: a proxy joins two")
        relay = Proxy(self, half_close)
        self._start(((a, a_info, b, b_info), (b, b_info, a, a_info)), 0, idle, True, wait, relay)
        return relay

    def proxy_accepted(self, a: int, b: int, family: int, a_peer: Any, b_peer: Any, *,
                       idle: float | None = None, wake: bool = True) -> Proxy:
        """For the CLI's server (``ProxyServer``), not for library code: ``proxy(a, b,
        wait=False)`` for two sockets the caller made itself, without probing them.

        ``a`` is an fd the caller accepted, ``b`` one it connected (the connect complete):
        both TCP stream sockets of ``family``, non-blocking, and no other fd refers to
        either (the pool closes them). ``a_peer`` and ``b_peer`` are their peers'
        addresses (or those as text already, ``HOST:PORT``), for the sockets' labels in
        messages: kept, not copied (the server passes what it keeps anyway). Of all the checks of ``proxy()``
        only one is made, as an accept loop cannot know it: that ``a`` is still connected
        (a client may reset before its hand-over): ``OSError(ENOTCONN)`` if not, and the
        caller still owns both fds. ``proxy()`` checks everything (docs/contract.md);
        this saves an accept loop the 26 syscalls of probing two sockets it made itself.
        ``wake=False`` queues the relay without waking its worker: the caller hands over
        a burst, then calls ``wake_workers()`` once (one wakeup per worker per burst).
        """
        idle = _sockets.check_idle(idle)
        _sockets.validate_limits(0, idle)
        registry = self.registry
        registry.check_open()
        a_sock, a_key = _sockets.made(a, family)
        try:
            _sockets.check_still_connected(a_sock, a, "a")
            b_sock, b_key = _sockets.made(b, family)
        except BaseException:
            a_sock.detach()
            raise
        relay = Proxy(self, True)
        with registry.lock:
            try:
                registry.check_open()
                index = self._next
                worker = self._worker(index)
                a_ep = registry.adopt(a_key, a, a_peer, a_sock, 2)
                try:
                    b_ep = registry.adopt(b_key, b, b_peer, b_sock, 2)
                except BaseException:
                    registry.forget(a_ep)
                    raise
            except BaseException:
                a_sock.detach()
                b_sock.detach()
                raise
            self._next = (index + 1) % len(self._workers)
            copy = not self.options.zero_copy
            idle = idle or None
            forward = Splice(a, b, 0, idle, worker, copy)
            reverse = Splice(b, a, 0, idle, worker, copy)
            registry.claim_owned(forward, a_ep, b_ep)
            registry.claim_owned(reverse, b_ep, a_ep)
            relay.join(forward, reverse)
            control = worker.control
            control.append(engine.Add(forward, None))
            control.append(engine.Add(reverse, None))
            if wake:
                if not worker.is_current():
                    worker.hub.wake()
            elif worker not in self._unwoken:
                self._unwoken.append(worker)
        return relay

    def wake_workers(self) -> None:
        """Wake the workers ``proxy_accepted(..., wake=False)`` queued relays for (the
        thread that queued them)."""
        unwoken = self._unwoken
        if not unwoken:
            return
        with self.registry.lock:  # a worker that has exited (accepting cleared) has no hub left
            for worker in unwoken:
                if worker.accepting and not worker.is_current():  # a hosted loop's own worker
                    worker.hub.wake()  # takes its queue up when the loop's step returns
            unwoken.clear()

    def host(self, guest: Any) -> None:
        """Run ``guest``, another event loop, on the first worker thread, between its
        passes: for the CLI's server (``ProxyServer(on_worker=True)``), whose accept loop
        then shares a thread with the relays it hands over instead of handing each to
        another thread. The guest's protocol is ``engine.Worker._host``'s; it is told by
        ``guest.unhosted(exc)`` when it stops being run. ``ValueError`` for the gevent
        backend (its workers are greenlets: a loop of its own has a thread to run in);
        ``RuntimeError`` if the pool is closed.
        """
        if self.options.backend != "thread":
            raise ValueError(f"host() needs the thread backend, not {self.options.backend!r}")
        with self.registry.lock:
            self.registry.check_open()
            self._worker(0).post(engine.Host(guest))

    def _start(self, pairs: tuple[tuple[Any, SockInfo, Any, SockInfo], ...], max: int,
               idle: float | None, close: bool, wait: bool, relay: Proxy | None) -> list[Splice]:
        """The one start path: the checks that need the lock, in order, for every pair, then
        the endpoints and the worker (all of it given back on a failure), then the splices."""
        for _src, src_info, _dst, dst_info in pairs:
            _sockets.check_spliceable(src_info)
            _sockets.check_spliceable(dst_info)
        registry = self.registry
        with registry.lock:
            registry.check_open()
            for _src, src_info, _dst, dst_info in pairs:
                registry.check_free(src_info, dst_info)
            taken: list[Any] = []
            try:
                for _src, src_info, _dst, dst_info in pairs:
                    taken.append(registry.take(src_info, close))
                    taken.append(registry.take(dst_info, close))
                index, turn = self._choose_worker(pairs[0][1], pairs[0][3])
                worker = self._worker(index)
            except BaseException:
                for ep in taken:
                    registry.put(ep)
                raise
            if turn:
                self._next = (index + 1) % len(self._workers)
            copy = not self.options.zero_copy
            splices = []
            for i, (src, src_info, dst, dst_info) in enumerate(pairs):
                sp = Splice(src, dst, max, idle or None, worker, copy)
                registry.claim(sp, taken[2 * i], taken[2 * i + 1], src_info, dst_info, close)
                splices.append(sp)
            if relay is not None:
                relay.join(*splices)
            ack = None if not wait or engine.must_not_wait(self._workers) else _native.Event()
            for sp in splices:
                worker.post(engine.Add(sp, ack if sp is splices[-1] else None))
        if close:  # before any wait: a greenlet killed while waiting must not keep them
            _sockets.detach(pairs[0][0], pairs[0][2])  # a proxy's second pair is the same two
        if ack is not None:
            ack.wait()
        return splices

    def _choose_worker(self, src_info: SockInfo, dst_info: SockInfo) -> tuple[int, bool]:
        """(worker index, whether round-robin moved on) for a new splice (lock held).

        A splice that shares a socket with a live one (the reverse direction of a
        relay) joins that splice's worker: one registration per fd, one wakeup
        for both directions, and no second thread woken by every byte. Others
        go round-robin.
        """
        registry = self.registry
        for other in (registry.drain_of(src_info.key), registry.source_of(dst_info.key)):
            if other is not None and other.owner.accepting:
                return other.owner.index, False
        return self._next, True

    def _worker(self, index: int) -> Any:
        """The running worker at ``index``, started (or replaced, after a crash) if need be."""
        worker = self._workers[index]
        if worker is None or not worker.accepting:
            worker = self._new_worker(index)
            try:
                worker.start()
            except BaseException:
                worker.xfer.close()
                worker.hub.close()
                raise
            self._workers[index] = worker
        return worker

    def _new_worker(self, index: int) -> Any:
        opts = self.options
        if opts.backend == "gevent":
            from ._gevent_backend import GeventWorker

            return GeventWorker(index, opts, self.registry, LISTENER, self._workers,
                                direct=opts.dispatch == "direct")
        return engine.Worker(index, opts, self.registry, LISTENER, self._workers, _hub.HUBS[opts.hub]())

    def unsplice(self, src: Any) -> Splice:
        """Stop splicing ``src`` (FreeBSD's ``so_unsplice``) and return that splice.

        Returns once the worker has finished any chunk in flight; nothing more is
        taken from the source. Raises ``OSError`` EINVAL for a listening socket,
        ENOTCONN if ``src`` is not a spliced source, ``RuntimeError`` if the pool
        is closed.
        """
        src_fd = _sockets.fileno_of(src, "source")
        self.registry.check_open()
        info = _sockets.probe(src, src_fd, "source")
        if info.listening:
            raise oserror(errno.EINVAL, f"{info.label} is listening: nothing to unsplice")
        with self.registry.lock:
            sp = self.registry.source_of(info.key)
        if sp is None:
            raise oserror(errno.ENOTCONN, f"{info.label} is not spliced (as a source)")
        engine.unsplice(sp)
        return sp

    # -- counters ------------------------------------------------------------------
    def transferred(self, src: Any) -> int:
        """Bytes moved by the most recent splice whose source is ``src`` (like getsockopt(SO_SPLICE)).

        The running total while spliced, the final total after it ended, 0 if
        never spliced. Raises ``OSError`` EBADF if ``src`` is not open.
        """
        fd = _sockets.fileno_of(src, "source")
        try:
            key = _sockets.socket_key(fd)
        except (OSError, OverflowError) as exc:
            raise oserror(errno.EBADF, f"source fd {fd} is not an open file descriptor") from exc
        return self.registry.transferred(key)

    # -- closing and stats ---------------------------------------------------------------
    def close(self, grace: float = 1.0) -> None:
        """End every live splice with POOL_CLOSED and stop the workers.

        Data not yet moved stays in the sources; pipe leftovers get ``grace``
        seconds to reach their drains. Joins the workers and leaves no thread or
        fd behind. Idempotent. Called from a done callback (a worker thread) it
        signals the workers and returns without joining them. Raises ``TypeError``
        if ``grace`` is not a number of seconds, ``ValueError`` if it is negative
        or NaN; the pool is then left as it was.
        """
        if isinstance(grace, bool) or not isinstance(grace, (int, float)):
            raise TypeError(f"grace must be seconds as an int or float, not {type(grace).__name__}")
        if not grace >= 0:
            raise ValueError(f"grace must be zero or more seconds, not {grace}")
        registry = self.registry
        with registry.lock:
            already = registry.closed
            registry.closed = True
            workers = [w for w in self._workers if w is not None]
            for worker in workers:
                if worker.accepting and not already:
                    worker.post(engine.Close(grace))
        if engine.must_not_wait(self._workers):
            return  # from a done callback: joining could wait on a worker joining us
        for worker in workers:
            worker.join()

    def stats(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: live splices, bytes moved, and per-worker counters."""
        workers = []
        with self.registry.lock:
            live = self.registry.live()
            for index, worker in enumerate(self._workers):
                if worker is None:
                    workers.append(
                        {"index": index, "live": 0, "bytes": 0, "passes": 0, "wakeups": 0,
                         "zero_copy": 0, "copy": 0, "started": False}
                    )
                    continue
                xf = worker.xfer
                workers.append(
                    {
                        "index": index,
                        "live": sum(1 for sp in worker.assigned() if is_live(sp)),
                        "bytes": xf.bytes,
                        "passes": xf.passes,
                        "wakeups": worker.wakeups,
                        "zero_copy": xf.zero_copy,
                        "copy": xf.copy,
                        "started": True,
                        "pipes_created": xf.pipes.created,
                        "pipes_idle": xf.pipes.idle,
                    }
                )
        return {
            "live": live,
            "bytes": sum(w["bytes"] for w in workers),
            "zero_copy": self.options.zero_copy,
            "workers": workers,
        }


_default: SplicePool | None = None
_default_lock = _native.allocate_lock()


def default_pool(create: bool = True) -> SplicePool | None:
    """The pool behind the module-level functions: created on first use, closed at exit.

    ``create=False`` returns it as it is (None if it was never made).
    """
    global _default
    pool = _default
    if not create or (pool is not None and not pool.closed):
        return pool
    with _default_lock:
        if _default is None or _default.closed:
            _default = SplicePool()
        return _default


@atexit.register
def _close_default() -> None:
    pool = _default
    if pool is not None:
        pool.close()
