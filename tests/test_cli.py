"""``python -m splicepool proxy`` end to end: the CLI as a real subprocess, real loopback peers."""

from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import (
    free_port,
    own_processes,
    recv_exact,
    recv_until_eof,
    send_in_thread,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT = 10.0  # interpreter start + import on a loaded 2-core machine

CONN_LINE = re.compile(
    r"^\S+ \S+ (?P<pid>\d+) (?P<level>[A-Z]+) conn (?P<id>\d+) (?P<peer>\S+(?: via \S+)?) -> (?P<upstream>\S+)"
    r" up=(?P<up>\d+) down=(?P<down>\d+) duration=(?P<duration>[\d.]+)s reason=(?P<reason>\w+)",
    re.MULTILINE,
)

pytestmark = own_processes


# -- helpers -------------------------------------------------------------------------------
def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def sockname(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return hostport(host, port)


def http_get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
        assert resp.status == 200
        return resp.read().decode()


def echo(conn: socket.socket) -> None:
    """Upstream mode: send back every byte until the client's EOF (holds idle connections open)."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return
        conn.sendall(data)


def reply_after_eof(reply: bytes, requests: list[bytes]) -> Callable[[socket.socket], None]:
    """Upstream mode: read the request until EOF, then send ``reply`` and close."""

    def handler(conn: socket.socket) -> None:
        requests.append(recv_until_eof(conn, timeout=20))
        conn.sendall(reply)

    return handler


class Upstream:
    """A threaded TCP server on loopback; ``handler(conn)`` runs per connection, then conn closes."""

    def __init__(
        self,
        handler: Callable[[socket.socket], None] = echo,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.handler = handler
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(1024)
        self.sock.settimeout(0.05)
        self.host, self.port = host, self.sock.getsockname()[1]
        self.addr = hostport(host, self.port)
        self.accepted = 0
        self.errors: list[BaseException] = []
        self._conns: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._closed = False
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)
        self._acceptor.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(30)
            t = threading.Thread(target=self._run, args=(conn,), daemon=True)
            with self._lock:
                self.accepted += 1
                self._conns.append(conn)
                self._threads.append(t)
            t.start()

    def _run(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        except OSError as exc:
            if not self._closed:
                self.errors.append(exc)
        finally:
            conn.close()

    def join(self, timeout: float = 10.0) -> None:
        """Wait for every handler so far to return."""
        deadline = time.monotonic() + timeout
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
            assert not t.is_alive(), "an upstream handler is still running"

    def close(self) -> None:
        self._closed = True
        self._acceptor.join(2)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)  # wakes a handler blocked in recv
            except OSError:
                pass


class ProxyProc:
    """One ``python -m splicepool proxy`` subprocess; stderr (and stdout) go to a log file."""

    def __init__(
        self,
        args: list[str],
        log_path: Path,
        port: int,
        stats_port: int | None,
        nofile: int | None = None,
        wrap: list[str] | None = None,
        command: str = "proxy",
    ) -> None:
        self.args = args
        self.port = port
        self.stats_port = stats_port
        self.log_path = log_path
        self._log_file = open(log_path, "ab")  # closed in kill()
        self.proc = subprocess.Popen(
            [*(wrap or []), sys.executable, "-m", "splicepool", command, *args],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )
        self.pid = self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def conn_lines(self) -> list[dict[str, str]]:
        return [m.groupdict() for m in CONN_LINE.finditer(self.log())]

    def wait_log(self, pattern: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        """Wait until ``pattern`` (a regex, MULTILINE) matches ``count`` times in the log."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.findall(self.log())
            if len(found) >= count:
                return found
            if time.monotonic() >= deadline:
                pytest.fail(f"no {count} x {pattern!r} in the proxy log after {timeout} s:\n{self.log()}")
            time.sleep(0.02)  # the poll interval: the wait ends on the log line

    def conn_line(self, peer: str, timeout: float = 5.0) -> dict[str, str]:
        """The log line of the connection whose client address is ``peer``."""

        def find() -> dict[str, str] | None:
            return next((line for line in self.conn_lines() if line["peer"] == peer), None)

        line = wait_until(find, timeout, f"the log line for {peer}")
        assert isinstance(line, dict)
        return line

    def stats(self) -> dict:
        assert self.stats_port is not None
        return json.loads(http_get(self.stats_port, "/stats"))

    def wait_stats(self, timeout: float = 5.0, **expected: int) -> dict:
        """Poll /stats until ``connections`` has every ``expected`` value; return it."""
        last: dict = {}

        def check() -> bool:
            nonlocal last
            last = self.stats()["connections"]
            return all(last[k] == v for k, v in expected.items())

        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() >= deadline:
                pytest.fail(f"/stats never had {expected}; last: {last}")
            time.sleep(0.02)  # the poll interval: the wait ends on the counters
        return last

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def status(self, field: str) -> int:
        """A number from /proc/PID/status: ``Threads``, or ``VmRSS`` (in KiB)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise KeyError(field)

    def signal(self, signum: int = signal.SIGTERM) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the proxy did not exit within {timeout} s:\n{self.log()}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log_file.close()


@pytest.fixture
def upstreams():
    """``make(handler, ...)`` → a started Upstream, closed at teardown."""
    made: list[Upstream] = []

    def make(handler: Callable[[socket.socket], None] = echo, **kw) -> Upstream:
        up = Upstream(handler, **kw)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


def wait_listening(proxy: ProxyProc, processes: int, attempt: int) -> bool:
    """Wait until every process of ``proxy`` logged "listening on" (True); False, with the
    proxy killed, if a port it was given was taken meanwhile (the caller tries new ones);
    any other end of the start fails the test."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        log = proxy.log()
        if log.count(" INFO listening on ") >= processes:
            return True
        if "Address already in use" in log or proxy.proc.poll() is not None:
            break
        time.sleep(0.02)  # the poll interval: the wait ends on "listening on"
    log = proxy.log()
    proxy.kill()
    if "Address already in use" not in log:
        pytest.fail(f"the proxy did not start (attempt {attempt + 1}):\n{log}")
    return False


@pytest.fixture
def start_proxy(tmp_path):
    """``start(connect, *options, listen_host=, processes=, stats=, nofile=)`` → a ready ProxyProc.

    ``nofile`` sets the proxy's open-file limit, soft and hard (so it cannot raise it).
    ``stats_host`` is written before the stats port (``"127.0.0.1:"``, ``":"``; default: none).
    ``wrap`` is a command prefix the proxy runs under (``unshare ... exec "$@"``).

    Ready means every process logged "listening on": the listener is bound and listening
    before that line is written. A probe connect is avoided on purpose: it would be
    counted by the accepted/finished counters that several tests check exactly.
    A port lost to another process between free_port() and bind is retried.
    """
    started: list[ProxyProc] = []

    def start(
        connect: str,
        *options: str,
        listen_host: str = "127.0.0.1",
        processes: int = 1,
        stats: bool = False,
        nofile: int | None = None,
        stats_host: str = "",
        wrap: list[str] | None = None,
    ) -> ProxyProc:
        for attempt in range(5):
            port = free_port(listen_host)
            stats_port = free_port() if stats else None
            args = ["--listen", hostport(listen_host, port), "--connect", connect, *options]
            if processes > 1:
                args += ["--processes", str(processes)]
            if stats_port is not None:
                args += ["--stats-listen", f"{stats_host}{stats_port}"]
            proxy = ProxyProc(args, tmp_path / f"proxy-{len(started)}.log", port, stats_port, nofile, wrap)
            started.append(proxy)
            if wait_listening(proxy, processes, attempt):
                return proxy
        pytest.fail("no free port after 5 attempts")

    yield start
    for proxy in started:
        proxy.kill()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ping(sock: socket.socket, data: bytes = b"ping") -> None:
    sock.sendall(data)
    assert recv_exact(sock, len(data), timeout=5) == data


# -- 1. bulk both ways ------------------------------------------------------------------------
def test_8_mib_each_way_at_once_arrives_intact_and_is_logged(upstreams, start_proxy):
    n = 8 << 20
    up_data, down_data = os.urandom(n), os.urandom(n)
    received_up: list[str] = []

    def handler(conn: socket.socket) -> None:
        sender = send_in_thread(conn, down_data, shut=True)
        received_up.append(sha256(recv_until_eof(conn, timeout=20)))
        sender.join(20)

    upstream = upstreams(handler)
    proxy = start_proxy(upstream.addr)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        sender = send_in_thread(client, up_data, shut=True)
        down = recv_until_eof(client, timeout=20)
        sender.join(20)
    assert sha256(down) == sha256(down_data)
    upstream.join()
    assert received_up == [sha256(up_data)]
    line = proxy.conn_line(peer)
    assert (line["level"], line["up"], line["down"], line["reason"]) == ("INFO", str(n), str(n), "EOF")
    assert line["upstream"] == upstream.addr
    assert not upstream.errors


# -- 2. half-close ------------------------------------------------------------------------------
def test_half_close_request_then_reply_after_eof(upstreams, start_proxy):
    request, reply = os.urandom(50_000), os.urandom(1 << 20)
    requests: list[bytes] = []
    upstream = upstreams(reply_after_eof(reply, requests))
    proxy = start_proxy(upstream.addr)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        client.sendall(request)
        client.shutdown(socket.SHUT_WR)
        got = recv_until_eof(client, timeout=10)
        assert client.recv(1) == b""  # EOF stays EOF
    assert sha256(got) == sha256(reply)
    upstream.join()
    assert requests == [request]
    line = proxy.conn_line(peer)
    assert (line["up"], line["down"], line["reason"]) == (str(len(request)), str(len(reply)), "EOF")


# -- 3. upstream refused ------------------------------------------------------------------------
def test_upstream_refused_closes_the_client_and_the_proxy_keeps_serving(upstreams, start_proxy):
    dead = free_port()  # nothing listens here
    proxy = start_proxy(f"127.0.0.1:{dead}", stats=True)
    for attempt in (1, 2):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            client.settimeout(2)
            t0 = time.monotonic()
            try:
                assert client.recv(1) == b""
            except ConnectionResetError:
                pass
            assert time.monotonic() - t0 < 2
        proxy.wait_log(r" WARNING conn \d+ \S+ -> \S+: upstream connect failed: ", count=attempt)
        assert proxy.proc.poll() is None
        st = proxy.wait_stats(failed_connects=attempt)
        assert (st["accepted"], st["live"], st["finished"]) == (attempt, 0, 0)
    # the same proxy proxies once the upstream is there
    upstreams(port=dead)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        ping(client)
    proxy.wait_stats(accepted=3, failed_connects=2, finished=1, live=0)


def test_connect_timeout_closes_the_client(upstreams, start_proxy, blackhole):
    # An upstream whose accept queue is full: the kernel drops further SYNs, so connects hang.
    proxy = start_proxy(hostport(*blackhole), "--connect-timeout", "0.5", stats=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.settimeout(5)
        t0 = time.monotonic()
        try:
            assert client.recv(1) == b""
        except ConnectionResetError:
            pass
        waited = time.monotonic() - t0
    assert 0.4 <= waited <= 3.0, waited
    proxy.wait_log(r" WARNING conn 1 \S+ -> \S+: upstream connect failed: connect timed out")
    st = proxy.wait_stats(failed_connects=1)
    assert (st["accepted"], st["connecting"], st["live"], st["finished"]) == (1, 0, 0, 0)
    assert proxy.proc.poll() is None


# -- 4. --idle ------------------------------------------------------------------------------------
def test_idle_closes_a_silent_connection_but_not_a_trickling_one(upstreams, start_proxy):
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--idle", "0.5")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as silent:
        t0 = time.monotonic()
        silent.settimeout(5)
        with pytest.raises(ConnectionResetError):  # cut by --idle: a reset, not a clean end
            silent.recv(1)
        waited = time.monotonic() - t0
        peer = sockname(silent)
    assert 0.45 <= waited <= 3.0, waited
    line = proxy.conn_line(peer)
    assert (line["up"], line["down"], line["reason"]) == ("0", "0", "IDLE")

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as busy:
        peer = sockname(busy)
        for _ in range(8):  # ~1 s of traffic, never 0.5 s quiet
            ping(busy, b"x")
            time.sleep(0.1)  # the trickle under test: a byte every 0.1 s keeps it from --idle
        t0 = time.monotonic()
        busy.settimeout(5)
        with pytest.raises(ConnectionResetError):
            busy.recv(1)
        assert 0.3 <= time.monotonic() - t0 <= 3.0
    line = proxy.conn_line(peer)
    assert (line["up"], line["down"], line["reason"]) == ("8", "8", "IDLE")


# -- 5. --max-conns ---------------------------------------------------------------------------------
def test_max_conns_leaves_the_third_in_the_backlog_until_one_ends(upstreams, start_proxy):
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--max-conns", "2", stats=True)
    clients = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
    try:
        wait_until(lambda: upstream.accepted >= 2, 5, "two upstream connections")
        st = proxy.wait_stats(live=2)
        # Would the third sneak through? Its connect is done (in the backlog): let the proxy's
        # loop turn. It logs an ignored SIGUSR1 after what its select returned (the listener
        # too, if it were watched); the second is logged a full turn after the first.
        for turn in (1, 2):
            proxy.signal(signal.SIGUSR1)
            proxy.wait_log(r" WARNING SIGUSR1 received: ignored$", count=turn)
        assert upstream.accepted == 2
        st = proxy.stats()["connections"]
        assert (st["accepted"], st["live"], st["connecting"]) == (2, 2, 0)
        ping(clients[0])
        ping(clients[1])

        clients[0].close()
        wait_until(lambda: upstream.accepted == 3, 5, "the third upstream connection")
        proxy.wait_stats(live=2, accepted=3, finished=1)
        ping(clients[2])
        ping(clients[1])
    finally:
        for c in clients:
            c.close()
    proxy.wait_stats(live=0, accepted=3, finished=3)


# -- 6. many short connections: nothing grows --------------------------------------------------------
def short_connections(upstream, proxy, total: int, concurrency: int = 16) -> dict[str, object]:
    """``total`` short echo connections through ``proxy``, ``concurrency`` at a time; each sends
    1 to 64 KiB, checks the echo by hash and closes. Returns the proxy's fds, threads and RSS
    before and after, and fails if they grew beyond a small constant."""
    sizes = [1 + (i * 7919) % (64 * 1024) for i in range(total)]
    failures: list[BaseException] = []

    def one(size: int) -> None:
        data = os.urandom(size)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as c:
            c.sendall(data)
            got = recv_exact(c, size, timeout=10)
            assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    def lane(k: int) -> None:
        try:
            for size in sizes[k::concurrency]:
                one(size)
        except BaseException as exc:  # reported below, with the figures
            failures.append(exc)

    def settled_fds() -> int:
        previous = -1
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # a /stats request's own socket may still be closing
            count = proxy.fd_count()
            if count == previous:
                return count
            previous = count
            time.sleep(0.1)
        pytest.fail("the proxy's fd count never settled")

    warm_up = 50  # the first connections fill caches (a worker's pipes, the allocator's arenas)
    for size in sizes[:warm_up]:
        one(size)
    proxy.wait_stats(finished=warm_up, live=0)
    before = {"fds": settled_fds(), "threads": proxy.status("Threads"), "rss_kib": proxy.status("VmRSS")}
    t0 = time.monotonic()
    lanes = [threading.Thread(target=lane, args=(k,), daemon=True) for k in range(concurrency)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join(600)
    wall = time.monotonic() - t0
    assert not failures, failures[:3]
    done = warm_up + total
    proxy.wait_stats(timeout=30, finished=done, live=0, accepted=done)
    after = {"fds": settled_fds(), "threads": proxy.status("Threads"), "rss_kib": proxy.status("VmRSS")}
    figures = {"connections": total, "wall_s": round(wall, 2), "before": before, "after": after}
    print(f"\nCLI short connections: {figures}")
    # A worker may keep a few idle pipes cached for reuse (2 fds each); more than +4 is a leak.
    assert after["fds"] <= before["fds"] + 4, figures
    assert after["threads"] == before["threads"], figures
    assert after["rss_kib"] <= before["rss_kib"] + 4096, figures  # 4 MiB: allocator slack, not per-conn
    lines = proxy.conn_lines()
    assert len(lines) == done
    assert {line["reason"] for line in lines} == {"EOF"}
    assert sum(int(line["up"]) for line in lines) == sum(sizes[:warm_up]) + sum(sizes)
    assert sum(int(line["down"]) for line in lines) == sum(sizes[:warm_up]) + sum(sizes)
    assert not upstream.errors
    return figures


@pytest.mark.parametrize("layout", [("--workers", "2"), ("--workers", "2", "--loop-thread"), ("--workers", "1")],
                         ids=["loop-on-worker-0", "loop-thread", "one-thread"])
def test_1000_short_connections_leave_no_fd_thread_or_memory_behind(upstreams, start_proxy, layout):
    """The accept loop on the first worker (the default), in a thread of its own, and the
    whole proxy as one thread: every byte, every line, nothing left behind."""
    proxy = start_proxy((upstream := upstreams()).addr, *layout, stats=True)
    short_connections(upstream, proxy, 1000)


@pytest.mark.soak
@pytest.mark.timeout(1200)
def test_soak_10000_short_connections_through_the_cli(upstreams, start_proxy):
    total = int(os.environ.get("SPLICEPOOL_SOAK_CONNECTIONS", "10000"))
    proxy = start_proxy((upstream := upstreams()).addr, "--workers", "2", stats=True)
    short_connections(upstream, proxy, total, concurrency=32)


def test_fd_exhaustion_pauses_accepts_and_the_proxy_serves_again_once_fds_free_up(upstreams, start_proxy):
    """At a 64-file limit the proxy runs out of fds after some 25 idle connections: it logs it,
    stays up, and once the clients go away serves new connections; nothing leaks."""
    proxy = start_proxy(upstreams().addr, "--workers", "1", nofile=64)
    base = proxy.fd_count()
    held: list[socket.socket] = []
    try:
        for _ in range(60):
            c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            held.append(c)
            if "Too many open files" in proxy.log():
                break
            c.settimeout(2)
            try:
                c.sendall(b"p")
                if c.recv(1) != b"p":  # closed: no fd was left for its upstream socket
                    break
            except (TimeoutError, ConnectionError):
                break  # waits in the listen backlog: the proxy stopped accepting
        wait_until(lambda: "Too many open files" in proxy.log(), 10, "the EMFILE warning")
        assert proxy.proc.poll() is None, proxy.log()
        assert proxy.fd_count() <= 64
    finally:
        for c in held:
            c.close()
    wait_until(lambda: proxy.fd_count() <= base + 4, 15, "the proxy's fds to come back")
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            ping(c)
    assert proxy.proc.poll() is None
    assert "Traceback" not in proxy.log()


# -- 7. SIGTERM ----------------------------------------------------------------------------------------
def test_sigterm_with_a_live_idle_connection_closes_it_after_grace(upstreams, start_proxy):
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--grace", "1")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        ping(client)
        t0 = time.monotonic()
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(r" INFO stopping: 1 connection\(s\) live")
        with pytest.raises(ConnectionRefusedError):  # the listener is closed at once
            socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
        rc = proxy.wait(timeout=1 + 3)
        elapsed = time.monotonic() - t0
        client.settimeout(2)
        with pytest.raises(ConnectionResetError):  # cut when the grace ran out
            client.recv(1)
    assert rc == 0
    assert elapsed >= 0.9, f"exited after {elapsed:.2f} s, before the 1 s grace"
    log = proxy.log()
    assert "stopping" in log
    line = proxy.conn_line(peer, timeout=0)
    assert line["reason"] == "POOL_CLOSED"
    assert "stopped after 1 connection(s)" in log


def test_sigterm_lets_a_live_connection_finish_within_grace(upstreams, start_proxy):
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--grace", "10")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        ping(client)
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(r" INFO stopping: 1 connection\(s\) live")
        ping(client, b"still flowing")
    t0 = time.monotonic()
    assert proxy.wait(timeout=3) == 0
    assert time.monotonic() - t0 < 3
    line = proxy.conn_line(peer, timeout=0)
    assert (line["up"], line["down"], line["reason"]) == ("17", "17", "EOF")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_with_no_connection_exits_0_quickly(upstreams, start_proxy, signum):
    upstream = upstreams()
    proxy = start_proxy(upstream.addr)
    t0 = time.monotonic()
    proxy.signal(signum)
    assert proxy.wait(timeout=3) == 0
    assert time.monotonic() - t0 < 3
    log = proxy.log()
    assert "stopping: 0 connection(s) live" in log
    assert "stopped after 0 connection(s)" in log


# -- 8. --processes -------------------------------------------------------------------------------------
def test_two_processes_both_serve_and_sigterm_leaves_no_child(upstreams, start_proxy):
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--workers", "1", processes=2)
    n = 40
    for i in range(n):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            ping(c, b"%d" % i)
    wait_until(lambda: len(proxy.conn_lines()) >= n, 5, f"{n} conn log lines")
    lines = proxy.conn_lines()
    assert len(lines) == n
    pids = {int(line["pid"]) for line in lines}
    assert len(pids) == 2, pids
    assert proxy.pid not in pids
    listening_pids = set(map(int, re.findall(r"^\S+ \S+ (\d+) INFO listening on ", proxy.log(), re.M)))
    assert listening_pids == pids

    proxy.signal(signal.SIGTERM)
    assert proxy.wait(timeout=5) == 0  # the parent exits after it has reaped every child
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert len(re.findall(r" INFO stopped after \d+ connection\(s\)", proxy.log())) == 2


# -- 9. --stats-listen ------------------------------------------------------------------------------------
def test_stats_and_metrics_count_finished_connections(upstreams, start_proxy):
    from prometheus_client.parser import text_string_to_metric_families

    upstream = upstreams()
    proxy = start_proxy(upstream.addr, stats=True)
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            ping(c, b"x" * 100)

    def scrape() -> dict[tuple[str, tuple], float]:
        text = http_get(proxy.stats_port, "/metrics")
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    samples: dict = {}

    def finished() -> bool:
        nonlocal samples
        samples = scrape()
        return samples.get(("splicepool_connections_finished_total", ())) == 5

    wait_until(finished, 5, "connections_finished_total == 5")
    assert samples[("splicepool_connections_accepted_total", ())] == 5
    assert samples[("splicepool_connections_finished_total", ())] == 5
    assert samples[("splicepool_connections_live", ())] == 0
    assert samples[("splicepool_connections_connecting", ())] == 0
    assert samples[("splicepool_upstream_connect_failures_total", ())] == 0
    assert samples[("splicepool_connection_bytes_total", (("direction", "up"),))] == 500
    assert samples[("splicepool_connection_bytes_total", (("direction", "down"),))] == 500
    assert samples[("splicepool_connections_ended_total", (("reason", "EOF"),))] == 5

    st = proxy.stats()
    conns = st["connections"]
    assert (conns["accepted"], conns["finished"], conns["live"]) == (5, 5, 0)
    assert (conns["bytes_up"], conns["bytes_down"], conns["reasons"]) == (500, 500, {"EOF": 5})
    assert st["pool"]["live"] == 0
    assert isinstance(st["pool"]["workers"], list)


# -- 10. arguments, --help, IPv6 ------------------------------------------------------------------------
def run_cli(*args: str, timeout: float = 10.0, command: str = "proxy") -> subprocess.CompletedProcess:
    """Run the CLI to completion; one still running after ``timeout`` is killed (returncode None)."""
    with subprocess.Popen(
        [sys.executable, "-m", "splicepool", command, *args],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            rc = None
    return subprocess.CompletedProcess(proc.args, rc, out, err)


def test_help_mentions_every_option_and_an_example():
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    for option in (
        "--listen", "--connect", "--workers", "--idle", "--max-conns", "--connect-timeout",
        "--nodelay", "--pipe-size", "--reuse-port", "--processes", "--grace",
        "--stats-listen", "--log-level",
    ):
        assert option in done.stdout, option
    assert "example" in done.stdout
    assert "python -m splicepool proxy --listen" in done.stdout


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        ("nonsense", "expected HOST:PORT"),
        ("::1:80", "brackets"),
        ("127.0.0.1:65536", "0 to 65535"),
        ("[::1:80", "expected [IPV6]:PORT"),
    ],
)
def test_bad_listen_exits_2_with_a_message(listen, message):
    done = run_cli("--listen", listen, "--connect", "127.0.0.1:1")
    assert done.returncode == 2, done
    assert "--max-conns" in done.stderr
    assert "--listen" in done.stderr
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no ::1")
def test_ipv6_listen_and_connect(upstreams, start_proxy):
    upstream = upstreams(host="::1")
    proxy = start_proxy(f"[::1]:{upstream.port}", listen_host="::1")
    data = os.urandom(200_000)
    with socket.create_connection(("::1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        sender = send_in_thread(client, data, shut=True)
        got = recv_until_eof(client, timeout=10)
        sender.join(10)
    assert got == data
    line = proxy.conn_line(peer)
    assert peer.startswith("[::1]:")
    assert line["upstream"] == f"[::1]:{upstream.port}"
    assert (line["up"], line["down"], line["reason"]) == (str(len(data)), str(len(data)), "EOF")
    assert f"listening on [::1]:{proxy.port}" in proxy.log()


# -- bad command lines: usage errors and one-line failures, never a traceback --------------------
def test_negative_max_conns_is_a_usage_error():
    done = run_cli(
        "--listen", "127.0.0.1:0", "--connect", "127.0.0.1:1", "--max-conns", "-1", timeout=3
    )
    assert done.returncode == 2, done
    assert "--max-conns" in done.stderr


def test_too_small_pipe_size_is_a_usage_error():
    done = run_cli("--listen", "127.0.0.1:0", "--connect", "127.0.0.1:1", "--pipe-size", "0")
    assert (done.returncode, "Traceback" in done.stderr) == (2, False), done.stderr
    assert "--pipe-size" in done.stderr


def listening_addresses(pid: int) -> set[str]:
    """Every address a process listens on: its socket inodes matched in /proc/net/tcp{,6}."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if fields[3] != "0A" or fields[9] not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, hexport = fields[1].split(":")
                raw = bytes.fromhex(hexaddr)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))  # host order
                found.add(hostport(socket.inet_ntop(family, raw), int(hexport, 16)))
    return found


def test_the_proxy_listens_only_where_it_is_told(upstreams, start_proxy):
    """--listen and the stats server (loopback by default) are all it binds: nothing on
    another loopback address, no wildcard."""
    proxy = start_proxy(upstreams().addr, stats=True)
    assert listening_addresses(proxy.pid) == {
        f"127.0.0.1:{proxy.port}",
        f"127.0.0.1:{proxy.stats_port}",
    }
    for port in (proxy.port, proxy.stats_port):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.2", port), timeout=5).close()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        ping(c)


def test_listen_address_in_use_is_one_line_not_a_traceback():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("--listen", f"127.0.0.1:{port}", "--connect", "127.0.0.1:1")
    assert done.returncode != 0
    assert "Address already in use" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr


def test_the_proxy_process_loads_no_heavy_module_it_does_not_use():
    """Every idle connection counts against the proxy's RSS, and so does its start: http.server
    (with ssl and email, ~7 MiB) and the stats server load only with --stats-listen; typing
    and dataclasses not at all (bench/compare.py's idle workload holds 9000 connections
    against HAProxy's memory)."""
    code = (
        "import sys, splicepool.__main__\n"
        "print(sorted(m for m in ('http.server', 'json', 'ssl', 'email', 'typing', 'dataclasses',"
        " 'hashlib', 'tomllib', 'hmac', 'concurrent.futures', 'splicepool._stats', 'splicepool.proxyproto',"
        " 'splicepool.sni', 'splicepool.socks')"
        " if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_parsing_the_options_and_resolving_names_load_no_codec_or_archive_module():
    """argparse's formatter imports shutil (and shutil zlib, bz2 and lzma) for the terminal's
    width, once per add_argument; getaddrinfo given a str host imports the IDNA codec (and
    stringprep and unicodedata): ~1.8 MiB together, for the proxy's whole life, that a plain
    proxy needs none of."""
    code = (
        "import sys, splicepool.__main__ as m\n"
        "from splicepool.server import resolve\n"
        "args = m.load_args(['proxy', '--listen', '127.0.0.1:0', '--connect', 'localhost:9'])\n"
        "m.build_routes(args)\n"
        "resolve(('localhost', 9))\n"
        "print(sorted(m for m in ('shutil', 'zlib', 'bz2', 'lzma', 'encodings.idna', 'stringprep',"
        " 'unicodedata') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout


def test_the_help_is_as_wide_as_columns_says():
    """The parser measures the terminal without shutil, as shutil would: $COLUMNS first."""
    narrow = subprocess.run([sys.executable, "-m", "splicepool", "proxy", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=30,
                            env={**os.environ, "COLUMNS": "50"})
    wide = subprocess.run([sys.executable, "-m", "splicepool", "proxy", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, "COLUMNS": "200"})
    assert narrow.returncode == wide.returncode == 0

    def usage(text: str) -> list[str]:  # the usage lines: the epilog is laid out by hand
        return text.split("\n\n")[0].splitlines()

    assert len(usage(narrow.stdout)) > len(usage(wide.stdout))  # wrapped at 50, not at 200
