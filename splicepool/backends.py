"""Backends of the proxy: where a new connection goes, whether a backend is up, and its addresses.

A ``Backend`` is one upstream ``HOST:PORT``: the addresses its name resolves to (getaddrinfo's
answers, in getaddrinfo's order), whether it is up, and the counters the proxy keeps on it. A
``BackendSet`` spreads new connections over its backends: ``order(client_ip)`` gives the backends
that are up, in the order one new connection should try them (the balance's pick first, then the
fall-backs). ``HealthChecker`` connects to every backend every few seconds, in one background
thread, and marks a backend down after ``fall`` failed checks in a row and up again after
``rise`` passed checks in a row. ``Resolver`` re-resolves the backends' names in another
background thread, so that a DNS change reaches new connections without a restart.

The contract between the threads: the proxy's loop thread calls ``order()`` and writes the
connection counters (``live``, ``connections``, ``failures``, ``bytes_up``, ``bytes_down``); the
health checker writes ``up``, ``checks_passed``, ``checks_failed`` and ``last_error``; the
resolver writes ``addresses`` and ``last_error``. Every shared write is one plain assignment of
a whole immutable value (``addresses`` is a tuple, replaced, never changed in place), so no
thread ever waits for a lock and a reader sees either the old value or the new one.
``order()`` itself keeps a rotation counter, so it must be called from one thread only.

Bad arguments raise ``ValueError`` naming what was wrong, before anything changes.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Sequence

__all__ = ["BALANCES", "Backend", "BackendSet", "HealthChecker", "Resolver", "format_hostport"]

#: The ways a BackendSet can spread new connections over its backends.
BALANCES = ("roundrobin", "leastconn", "source")

log = logging.getLogger("splicepool.proxy")

#: The longest a health check may take by default, whatever the interval.
DEFAULT_MAX_CHECK_TIMEOUT = 5.0


def _check_port(port: object, what: str = "port", lowest: int = 1) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not lowest <= port < 65536:
        raise ValueError(f"{what} must be an integer from {lowest} to 65535, not {port!r}")
    return port


def lookup_host(host: str) -> str | bytes:
    """``host`` as getaddrinfo should be given it: an ASCII name as bytes. CPython encodes a
    str host with the IDNA codec, whose first use imports encodings.idna, stringprep and
    unicodedata: ~0.6 MiB of RSS for the rest of a proxy's life, for a codec that leaves an
    ASCII name as it is (it only refuses an empty or over-long label, which the resolver
    then refuses instead). A non-ASCII name still goes through the codec."""
    return host.encode("ascii") if isinstance(host, str) and host.isascii() else host


def format_hostport(host: str, port: int) -> str:
    """Return ``host:port``, with an IPv6 address in brackets (``[::1]:80``) so the port stays
    unambiguous.

    A host that contains a colon is taken for an IPv6 address. Raises ``ValueError`` for a host
    that is not a non-empty string or a port outside 0-65535 (0: a listening address's "any").
    """
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a non-empty string, not {host!r}")
    _check_port(port, lowest=0)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address_text(sockaddr: tuple) -> str:
    return format_hostport(sockaddr[0], sockaddr[1])


def _addresses_text(addresses: tuple[tuple, ...]) -> str:
    return ", ".join(_address_text(a[4]) for a in addresses) or "no addresses"


def _error_text(code: int) -> str:
    """An errno as lower-case text: ``connection refused``."""
    text = os.strerror(code)
    return text[:1].lower() + text[1:] if text else f"error {code}"


class Backend:
    """One upstream HOST:PORT: the addresses its name resolves to, whether it is up, and its
    counters.

    ``name`` is ``format_hostport(host, port)``. ``addresses`` holds getaddrinfo 5-tuples
    ``(family, type, proto, canonname, sockaddr)``, each address once, in getaddrinfo's order;
    it is replaced whole, never changed in place. ``up`` is True at the start; only a health
    checker changes it. The counters start at 0: the proxy's loop writes ``live``,
    ``connections``, ``failures``, ``bytes_up`` and ``bytes_down``; the health checker writes
    ``checks_passed``, ``checks_failed`` and ``last_error`` (the resolver writes
    ``last_error`` too). ``last_error`` is the last error seen, kept after a later success.
    """

    def __init__(self, host: str, port: int, *, resolve: bool = True) -> None:
        """Make a backend for ``host`` and ``port``; with ``resolve`` (the default) its name is
        resolved now and a name that does not resolve raises ``socket.gaierror``.

        With ``resolve=False`` the backend has no addresses until ``resolve()`` is called. A
        host given in brackets (``[::1]``) is taken without them. Raises ``ValueError`` for an
        empty host or one with spaces, or a port outside 1-65535.
        """
        if isinstance(host, str) and len(host) > 2 and host[0] == "[" and host[-1] == "]":
            host = host[1:-1]
        if not isinstance(host, str) or not host or host != host.strip() or " " in host:
            raise ValueError(f"backend host must be a non-empty name or address, not {host!r}")
        _check_port(port, "backend port")
        self.host = host
        self.port = port
        self.name = format_hostport(host, port)
        self.addresses: tuple[tuple, ...] = ()
        self.up = True
        self.live = 0
        self.connections = 0
        self.failures = 0
        self.bytes_up = 0
        self.bytes_down = 0
        self.checks_passed = 0
        self.checks_failed = 0
        self.last_error: str | None = None
        if resolve:
            self.addresses = self._lookup()

    def __repr__(self) -> str:
        state = "up" if self.up else "down"
        return f"<Backend {self.name} {state} live={self.live} addresses={len(self.addresses)}>"

    def _lookup(self) -> tuple[tuple, ...]:
        """getaddrinfo's answers for this backend, each address once; OSError if none."""
        try:
            infos = socket.getaddrinfo(lookup_host(self.host), self.port, type=socket.SOCK_STREAM)
        except UnicodeError as exc:  # a label the IDNA codec refuses (too long, empty)
            raise socket.gaierror(socket.EAI_NONAME, f"not a valid host name ({exc})") from None
        seen = set()
        addresses = []
        for family, type_, proto, canonname, sockaddr in infos:
            key = (family, sockaddr)
            if key not in seen:
                seen.add(key)
                addresses.append((family, type_, proto, canonname, sockaddr))
        if not addresses:
            raise socket.gaierror(socket.EAI_NONAME, "no addresses")
        return tuple(addresses)

    def _apply(self, addresses: tuple[tuple, ...]) -> bool:
        """Take ``addresses`` if they are another set than the current ones; True if taken."""
        old = {(a[0], a[4]) for a in self.addresses}
        new = {(a[0], a[4]) for a in addresses}
        if old == new:
            return False
        self.addresses = addresses
        return True

    @staticmethod
    def _resolve_error(exc: OSError) -> str:
        text = exc.strerror if isinstance(exc, socket.gaierror) and exc.strerror else str(exc)
        return f"name does not resolve: {text}"

    def resolve(self) -> bool:
        """Re-resolve the name and return True exactly when that replaced ``addresses``.

        The addresses are replaced when the new answer is another set of addresses; the same
        addresses in another order count as no change (the order stays as it was), so that a
        DNS server that rotates its answers does not churn. When the name does not resolve, the
        old addresses stay, ``last_error`` says why (``name does not resolve: ...``) and the
        result is False: no OSError is raised.
        """
        try:
            addresses = self._lookup()
        except OSError as exc:
            self.last_error = self._resolve_error(exc)
            return False
        return self._apply(addresses)

    def stats(self) -> dict:
        """Return a new dict of this backend's state and counters, with its addresses as text.

        Keys: name, up, live, connections, failures, bytes_up, bytes_down, checks_passed,
        checks_failed, last_error, addresses (a list of ``ip:port`` strings).
        """
        return {
            "name": self.name,
            "up": self.up,
            "live": self.live,
            "connections": self.connections,
            "failures": self.failures,
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "checks_passed": self.checks_passed,
            "checks_failed": self.checks_failed,
            "last_error": self.last_error,
            "addresses": [_address_text(a[4]) for a in self.addresses],
        }


class BackendSet:
    """Backends and how new connections are spread over them.

    ``balance`` is one of ``BALANCES``:

    - ``roundrobin``: successive connections start at successive backends that are up; the
      fall-backs follow the pick in list order, wrapping around.
    - ``leastconn``: the backend that is up with the fewest ``live`` connections; ties are
      broken round-robin; the fall-backs follow by ascending ``live``.
    - ``source``: rendezvous hashing of the client's IP address over the names of the backends
      that are up (a hash that is the same in every process), so one client address keeps
      going to one backend while the same backends are up, and a backend going down moves only
      its own clients. The fall-backs follow by descending score. Without a client address it
      works as ``roundrobin``.
    """

    def __init__(self, backends: Sequence[Backend], balance: str = "roundrobin") -> None:
        """Make a set of ``backends`` spread by ``balance``; raises ``ValueError`` for an empty
        list, an item that is not a Backend, two backends with the same name or an unknown
        balance."""
        backends = tuple(backends)
        if not backends:
            raise ValueError("a backend set needs at least one backend")
        for b in backends:
            if not isinstance(b, Backend):
                raise ValueError(f"not a Backend: {b!r}")
        names = set()
        for b in backends:
            if b.name in names:
                raise ValueError(f"backend {b.name} is listed twice")
            names.add(b.name)
        if balance not in BALANCES:
            raise ValueError(f"unknown balance {balance!r}: use one of {', '.join(BALANCES)}")
        self.backends = backends
        self.balance = balance
        self._next = 0  # roundrobin / leastconn: where the next rotation starts
        self._index = {id(b): i for i, b in enumerate(backends)}
        # each rotation of the list, prebuilt: rotations[i] starts at backends[i]
        self._rotations = tuple(backends[i:] + backends[:i] for i in range(len(backends)))
        self._single = [backends[0]] if len(backends) == 1 else None
        # source: each backend's hash prefix (its name), so a score is one hash of prefix + ip
        if balance == "source":  # hashlib only then: it loads OpenSSL, 5 MiB of RSS in a proxy
            import hashlib

            self._blake2b = hashlib.blake2b
        self._prefixes = tuple(
            (b.name.encode("utf-8", "surrogatepass") + b"\0", b) for b in backends
        )

    def __repr__(self) -> str:
        return f"<BackendSet {self.balance} {', '.join(b.name for b in self.backends)}>"

    def order(self, client_ip: str | None = None) -> list[Backend]:
        """The backends that are up, in the order one new connection should try them: the first
        is the balance's pick, the rest the fall-backs if its connect fails. [] when every
        backend is down.

        With one backend the same prebuilt one-item list is returned every time it is up: the
        caller reads the list and must not change it. Call from one thread only.
        """
        single = self._single
        if single is not None:
            return single if single[0].up else []
        if self.balance == "source" and client_ip is not None:
            return self._by_source(client_ip)
        if self.balance == "leastconn":
            return self._by_least_live()
        return self._by_rotation()

    def _by_rotation(self) -> list[Backend]:
        found = [b for b in self._rotations[self._next] if b.up]
        if found:
            self._next = (self._index[id(found[0])] + 1) % len(self.backends)
        return found

    def _by_least_live(self) -> list[Backend]:
        found = [b for b in self._rotations[self._next] if b.up]
        if found:
            found.sort(key=_live)  # stable: equal loads stay in rotation order
            self._next = (self._index[id(found[0])] + 1) % len(self.backends)
        return found

    def _by_source(self, client_ip: str) -> list[Backend]:
        blake2b = self._blake2b
        ip = client_ip.encode("utf-8", "surrogatepass")
        scored = [
            (blake2b(prefix + ip, digest_size=8).digest(), b.name, b)
            for prefix, b in self._prefixes
            if b.up
        ]
        scored.sort(reverse=True)
        return [item[2] for item in scored]


def _live(backend: Backend) -> int:
    return backend.live


def _check_positive(value: object, what: str) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{what} must be a positive number of seconds, not {value!r}")
    return float(value)


def _check_count(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer of at least 1, not {value!r}")
    return value


def _check_backends(backends: Sequence[Backend]) -> tuple[Backend, ...]:
    backends = tuple(backends)
    for b in backends:
        if not isinstance(b, Backend):
            raise ValueError(f"not a Backend: {b!r}")
    return backends


def _plural(n: int, word: str, words: str | None = None) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {words or word + 's'}"


class _Wakeup:
    """A self-pipe: ``set()`` makes its read end readable, so a selector wait ends at once.

    The lock makes ``set()`` and ``close()`` exclusive, so ``set()`` never writes to an fd
    number that ``close()`` has freed (and another thread may have reused)."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self._lock = threading.Lock()
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self._closed = False

    def fileno(self) -> int:
        return self._r

    def set(self) -> None:
        with self._lock:
            self.event.set()
            if self._closed:
                return
            try:
                os.write(self._w, b"x")
            except OSError:  # full: it is readable already
                pass

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            os.close(self._r)
            os.close(self._w)


class _Check:
    """One backend's check in a round: its addresses, tried in order, one socket at a time."""

    __slots__ = ("backend", "addresses", "next", "sock", "error")

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.addresses = backend.addresses
        self.next = 0
        self.sock: socket.socket | None = None
        self.error = "no addresses"


class HealthChecker:
    """TCP health checks: every ``interval`` seconds, connect to each backend; ``fall``
    failures in a row mark it down, ``rise`` successes in a row mark it up again.

    A check connects (non-blocking) to the backend's addresses in order: the first address
    that accepts the connection passes the check, and the socket is closed at once; an address
    that fails gives way to the next one. The check fails when every address failed or when
    ``timeout`` passed (one timeout for the whole check, all addresses included); the error
    text goes to the backend's ``last_error``. Every backend is checked at the same time in
    one round (one selector), so a backend that hangs never delays another one's check. A
    round starts every ``interval`` seconds, or at once when the last round took longer.
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        *,
        interval: float,
        rise: int = 2,
        fall: int = 3,
        timeout: float | None = None,
        on_change: Callable[[Backend, bool, str], None] | None = None,
    ) -> None:
        """Make a checker of ``backends`` (not started); raises ``ValueError`` for an interval
        or timeout that is not a positive number, or a rise or fall below 1.

        ``timeout`` defaults to ``min(interval, 5.0)``. ``on_change(backend, up, why)`` is
        called from the checker's thread each time a backend goes down or up (``why``: ``3
        checks failed: connection refused``, ``2 checks passed``); an exception it raises is
        logged and ignored.
        """
        self.backends = _check_backends(backends)
        self.interval = _check_positive(interval, "health check interval")
        self.rise = _check_count(rise, "health check rise")
        self.fall = _check_count(fall, "health check fall")
        if timeout is None:
            timeout = min(self.interval, DEFAULT_MAX_CHECK_TIMEOUT)
        self.timeout = _check_positive(timeout, "health check timeout")
        self.on_change = on_change
        self.rounds = 0
        # checks in a row with the same outcome, per backend: passed (> 0) or failed (< 0)
        self._streak = {id(b): 0 for b in self.backends}
        self._wakeup = _Wakeup()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the checker's one daemon thread, ``splicepool-health``; its first round of
        checks begins at once. Raises ``RuntimeError`` when called a second time."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("a HealthChecker starts once")
        self._thread = threading.Thread(target=self._run, name="splicepool-health", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the checker's thread and wait for it: a round in progress is cut short (its
        unfinished checks count for nothing). Calling it again does nothing."""
        if self._stopped:
            return
        self._stopped = True
        self._wakeup.set()
        if self._thread is None:
            self._wakeup.close()
        elif self._thread is not threading.current_thread():
            self._thread.join()  # the thread closes the wakeup pipe as it ends

    def run_round(self) -> None:
        """Run one round of checks in the calling thread and count it in ``rounds``, for a
        checker that has not been started (``RuntimeError`` otherwise)."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("run_round() is for a HealthChecker that is not started")
        with selectors.DefaultSelector() as sel:
            self._round(sel)
        self.rounds += 1

    def _run(self) -> None:
        stop = self._wakeup.event
        try:
            with selectors.DefaultSelector() as sel:
                sel.register(self._wakeup, selectors.EVENT_READ)
                while not stop.is_set():
                    began = time.monotonic()
                    try:
                        self._round(sel)
                    except Exception:  # never let the checks die with the thread
                        log.exception("health check round failed")
                    if stop.is_set():
                        break
                    self.rounds += 1
                    stop.wait(max(0.0, began + self.interval - time.monotonic()))
        finally:
            self._wakeup.close()

    def _round(self, sel: selectors.BaseSelector) -> None:
        """Check every backend at once; results are applied as each check ends."""
        stop = self._wakeup.event
        deadline = time.monotonic() + self.timeout
        pending = 0
        for backend in self.backends:
            check = _Check(backend)
            if self._connect_next(check, sel):
                pending += 1
        try:
            while pending and not stop.is_set():
                wait = deadline - time.monotonic()
                if wait <= 0:
                    break
                for key, _ in sel.select(wait):
                    check = key.data
                    if check is None:  # the wakeup: stop() was called
                        continue
                    sock = check.sock
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    sel.unregister(sock)
                    sock.close()
                    check.sock = None
                    if code == 0:
                        pending -= 1
                        self._passed(check.backend)
                        continue
                    check.error = _error_text(code)
                    if not self._connect_next(check, sel):
                        pending -= 1
        finally:
            for key in list(sel.get_map().values()):
                check = key.data
                if check is None:
                    continue
                sel.unregister(key.fileobj)
                check.sock.close()
                if not stop.is_set():
                    self._failed(check.backend, "timed out")

    def _connect_next(self, check: _Check, sel: selectors.BaseSelector) -> bool:
        """Start connecting to the check's next address: True if a connect is in progress;
        False once the check has ended (passed, or every address failed: counted here)."""
        while check.next < len(check.addresses):
            family, type_, proto, _, sockaddr = check.addresses[check.next]
            check.next += 1
            try:
                sock = socket.socket(family, type_, proto)
            except OSError as exc:
                check.error = _error_text(exc.errno) if exc.errno else str(exc)
                continue
            sock.setblocking(False)
            code = sock.connect_ex(sockaddr)
            if code == 0:
                sock.close()
                self._passed(check.backend)
                return False
            if code in (errno.EINPROGRESS, errno.EAGAIN):
                check.sock = sock
                sel.register(sock, selectors.EVENT_WRITE, check)
                return True
            sock.close()
            check.error = _error_text(code)
        self._failed(check.backend, check.error)
        return False

    def _passed(self, backend: Backend) -> None:
        backend.checks_passed += 1
        streak = max(self._streak[id(backend)], 0) + 1
        self._streak[id(backend)] = streak
        if not backend.up and streak >= self.rise:
            backend.up = True
            self._changed(backend, True, f"{_plural(self.rise, 'check')} passed")

    def _failed(self, backend: Backend, error: str) -> None:
        backend.checks_failed += 1
        backend.last_error = error
        streak = min(self._streak[id(backend)], 0) - 1
        self._streak[id(backend)] = streak
        if backend.up and -streak >= self.fall:
            backend.up = False
            self._changed(backend, False, f"{_plural(self.fall, 'check')} failed: {error}")

    def _changed(self, backend: Backend, up: bool, why: str) -> None:
        log.warning("backend %s is %s: %s", backend.name, "up" if up else "down", why)
        if self.on_change is None:
            return
        try:
            self.on_change(backend, up, why)
        except Exception:
            log.exception("health check on_change callback failed for backend %s", backend.name)


class Resolver:
    """Re-resolves each backend's name every ``every`` seconds in a daemon thread
    ("splicepool-resolve"), so a DNS change reaches new connections without a restart.

    A backend whose host is an IP address is skipped (unless it has no addresses yet). When a
    name's addresses change, the backend's ``addresses`` are replaced (logged at info level and
    passed to ``on_change``); when the name does not resolve, the old addresses stay and
    ``last_error`` says why (logged at warning level once, when it starts failing or the error
    changes, and at info level when it resolves again).
    """

    def __init__(
        self,
        backends: Sequence[Backend],
        every: float,
        on_change: Callable[[Backend], None] | None = None,
    ) -> None:
        """Make a resolver of ``backends`` (not started); raises ``ValueError`` when ``every``
        is not a positive number of seconds.

        ``on_change(backend)`` is called from the resolver's thread after a backend's
        addresses were replaced; an exception it raises is logged and ignored.
        """
        self.backends = _check_backends(backends)
        self.every = _check_positive(every, "resolve interval")
        self.on_change = on_change
        self.rounds = 0
        self._names = tuple(b for b in self.backends if not _is_ip_literal(b.host))
        self._literals = tuple(b for b in self.backends if _is_ip_literal(b.host))
        self._failing: dict[int, str] = {}  # id(backend) -> the error last logged
        self._stop = threading.Event()
        # Held to look at or set _stopped, and by the thread while it changes a backend, so
        # that nothing changes once stop() has returned; re-entrant for an on_change that
        # calls stop().
        self._lock = threading.RLock()
        self._looking_up = False  # the thread is in getaddrinfo, which cannot be cut short
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        """Start the resolver's daemon thread, ``splicepool-resolve``, whose first round begins
        at once; with nothing to resolve (IP addresses only) no thread is started. Raises
        ``RuntimeError`` when called a second time."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("a Resolver starts once")
        if not self._names and all(b.addresses for b in self._literals):
            return
        self._thread = threading.Thread(target=self._run, name="splicepool-resolve", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the resolver's thread: it changes no backend after this returns. It never waits
        for a name lookup in progress (getaddrinfo cannot be cut short, and a reload stops the
        old resolver from the accept loop, which may be running on a pool worker): the daemon
        thread then ends when the lookup does, dropping its answer. When no lookup is in
        progress, the thread has ended when this returns. Calling it again does nothing."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._stop.set()
            looking_up = self._looking_up
        thread = self._thread
        if thread is not None and not looking_up and thread is not threading.current_thread():
            thread.join()  # it is waiting for the next round, or about to see _stopped

    def run_round(self) -> None:
        """Re-resolve every name once in the calling thread and count it in ``rounds``, for a
        resolver that has not been started (``RuntimeError`` otherwise)."""
        if self._thread is not None or self._stopped:
            raise RuntimeError("run_round() is for a Resolver that is not started")
        self._round()
        self.rounds += 1

    def _run(self) -> None:
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                self._round()
            except Exception:  # never let re-resolution die with the thread
                log.exception("resolve round failed")
            if self._stop.is_set():
                break
            self.rounds += 1
            self._stop.wait(max(0.0, began + self.every - time.monotonic()))

    def _round(self) -> None:
        todo = self._names + tuple(b for b in self._literals if not b.addresses)
        for backend in todo:
            with self._lock:
                if self._stopped:
                    return
                self._looking_up = True
            try:
                addresses = backend._lookup()
            except OSError as exc:
                with self._lock:
                    self._looking_up = False
                    if self._stopped:
                        return
                    self._failed(backend, Backend._resolve_error(exc))
                continue
            with self._lock:
                self._looking_up = False
                if self._stopped:
                    return
                self._resolved(backend, addresses)

    def _failed(self, backend: Backend, error: str) -> None:
        backend.last_error = error
        if self._failing.get(id(backend)) != error:
            self._failing[id(backend)] = error
            log.warning(
                "backend %s: %s; keeping %s",
                backend.name,
                error,
                _plural(len(backend.addresses), "address", "addresses"),
            )

    def _resolved(self, backend: Backend, addresses: tuple[tuple, ...]) -> None:
        if self._failing.pop(id(backend), None) is not None:
            log.info("backend %s resolves again", backend.name)
        if backend._apply(addresses):
            log.info("backend %s now resolves to %s", backend.name, _addresses_text(addresses))
            if self.on_change is not None:
                try:
                    self.on_change(backend)
                except Exception:
                    log.exception("resolver on_change callback failed for backend %s", backend.name)
