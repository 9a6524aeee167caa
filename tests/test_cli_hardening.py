"""``python -m splicepool proxy`` under hostile or odd conditions (issue 11): signals, dead
children, multi-address upstreams, bad addresses, a hostile stats client, huge timeouts,
a proxy pointed at itself. Real subprocesses and loopback sockets, as in test_cli.py."""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import test_cli
from conftest import free_port, own_processes, recv_until_eof, reset, until, wait_until
from test_cli import (
    ROOT,
    START_TIMEOUT,
    _has_ipv6_loopback,
    http_get,
    listening_addresses,
    ping,
    run_cli,
    sockname,
)

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixtures, shared
start_proxy = test_cli.start_proxy

LISTENING = re.compile(r"^\S+ \S+ (\d+) INFO listening on ", re.MULTILINE)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _reap(proc: subprocess.Popen) -> None:
    """Kill and wait for a proxy a failed test left running (one that exited is left alone)."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


# -- 8. signals --------------------------------------------------------------------------------
def test_sighup_without_config_and_sigusr1_are_logged_and_ignored(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as live:
        ping(live)
        for signum, line in (
            (signal.SIGHUP, r"reload: no --config file to read again; ignored"),
            (signal.SIGUSR1, r"SIGUSR1 received: ignored"),
        ):
            proxy.signal(signum)
            proxy.wait_log(rf" WARNING {line}$")
            assert proxy.proc.poll() is None, proxy.log()
        ping(live, b"after the signals")  # no drain, no cut
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as fresh:
        ping(fresh)
    proxy.wait_log(r" INFO conn 2 ")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(timeout=5) == 0
    log = proxy.log()
    assert "stopped after 2 connection(s)" in log
    assert "Traceback" not in log


# A SIGHUP sent to the proxy at the last moment before run_proxy installs its handler (in
# the one process, or in a child just forked): its default action would kill the process.
EARLY_SIGHUP = """
import os, signal, sys
import splicepool.__main__ as cli
real = cli.run_proxy
def run_proxy(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGHUP)  # before run_proxy handles SIGHUP
    return real(*args, **kwargs)
cli.run_proxy = run_proxy
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("processes", [1, 2])
def test_a_sighup_before_the_handler_is_in_place_is_handled_not_fatal(upstreams, tmp_path, processes):
    """main() (and the supervisor, for a child it forks) keeps SIGHUP blocked until the
    reload handler is in place: one that came before is handled then (here: no --config,
    so logged and ignored), and no process dies of it."""
    up = upstreams()
    port = free_port()
    log_path = tmp_path / "proxy.log"
    args = ["proxy", "--listen", f"127.0.0.1:{port}", "--connect", up.addr]
    if processes > 1:
        args += ["--processes", str(processes), "--reuse-port"]
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen([sys.executable, "-c", EARLY_SIGHUP, *args], cwd=ROOT,
                                stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file)
        try:
            def handled() -> bool:
                text = log_path.read_text()
                return text.count("WARNING reload: no --config file to read again; ignored") >= processes
            wait_until(handled, START_TIMEOUT, f"{processes} SIGHUP(s) handled")
            with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                ping(c)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            _reap(proc)
    text = log_path.read_text()
    assert "SIGHUP" not in text.replace("reload: no --config", ""), text  # no child died of it
    assert not re.search(r"process \d+ \(pid \d+\)", text), text  # no child ended early


# -- 8. --processes supervises its children ---------------------------------------------------------
def conn_pids(proxy, n: int, want: int) -> set[int]:
    """Make ``n`` more short connections (echo checked); the pids that logged them."""
    before = len(proxy.conn_lines())
    for i in range(n):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
            ping(c, b"%d" % i)
    wait_until(lambda: len(proxy.conn_lines()) >= before + n, 5, f"{n} more conn lines")
    return {int(line["pid"]) for line in proxy.conn_lines()[before:]}


def test_processes_replace_a_killed_child_and_exit_0_on_sigterm(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, "--workers", "1", processes=2)
    first = [int(p) for p in LISTENING.findall(proxy.log())]
    assert len(set(first)) == 2 and proxy.pid not in first
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    index = proxy.wait_log(
        rf" WARNING process (\d) \(pid {victim}\) was killed by SIGKILL; starting a new one in 0\.1 s$"
    )[0]
    proxy.wait_log(r" INFO listening on ", count=3)
    pids = [int(p) for p in LISTENING.findall(proxy.log())]
    new = pids[2]
    assert new not in first
    proxy.wait_log(rf" INFO process {index} started: pid {new}$")
    # It dies again at once: the back-off doubles.
    os.kill(new, signal.SIGKILL)
    proxy.wait_log(
        rf" WARNING process {index} \(pid {new}\) was killed by SIGKILL; starting a new one in 0\.2 s$"
    )
    proxy.wait_log(r" INFO listening on ", count=4)
    newest = [int(p) for p in LISTENING.findall(proxy.log())][3]
    # The replacement serves on the port (SO_REUSEPORT spreads connections by hash).
    serving: set[int] = set()
    for _ in range(10):
        serving |= conn_pids(proxy, 20, newest)
        if newest in serving:
            break
    assert newest in serving, (newest, serving)
    assert serving <= {first[1], newest}
    # The parent passes SIGHUP on to its children (with no --config, each says so).
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(rf"^\S+ \S+ {proxy.pid} INFO SIGHUP: 2 process\(es\) reload$")
    for pid in (first[1], newest):
        proxy.wait_log(rf"^\S+ \S+ {pid} WARNING reload: no --config file to read again; ignored$")
    assert proxy.proc.poll() is None

    proxy.signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0, proxy.log()
    for pid in (first[1], newest):
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    log = proxy.log()
    assert len(re.findall(r" INFO stopped after \d+ connection\(s\)", log)) == 2
    assert "Traceback" not in log


# -- 8. --connect tries every resolved address --------------------------------------------------------
def _can_unshare() -> bool:
    if shutil.which("unshare") is None or not _has_ipv6_loopback():
        return False
    done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    return done.returncode == 0


@pytest.mark.skipif(not _can_unshare(), reason="needs unshare -rm (to give localhost ::1 first) and ::1")
def test_connect_tries_each_resolved_address_in_order(upstreams, start_proxy, tmp_path):
    """localhost → ::1 then 127.0.0.1 (an /etc/hosts bind-mounted in a private mount namespace,
    the resolver itself untouched); the upstream listens on 127.0.0.1 only."""
    hosts = tmp_path / "hosts"
    hosts.write_text("::1 localhost\n127.0.0.1 localhost\n")
    wrap = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    upstream = upstreams()
    port = upstream.port
    proxy = start_proxy(f"localhost:{port}", "--log-level", "debug", wrap=wrap)
    assert f"proxying to localhost:{port} ([::1]:{port}, 127.0.0.1:{port})" in proxy.log()
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            peer = sockname(client)
            ping(client)
        line = proxy.conn_line(peer)
        assert (line["upstream"], line["reason"], line["up"]) == (f"127.0.0.1:{port}", "EOF", "4")
    proxy.wait_log(
        rf" DEBUG conn \d+ \S+: upstream \[::1\]:{port}: Connection refused; trying 127\.0\.0\.1:{port}$",
        count=2,
    )
    assert "upstream connect failed" not in proxy.log()


# -- 8. addresses ---------------------------------------------------------------------------------------
def test_connect_port_0_is_a_usage_error():
    done = run_cli("--listen", "127.0.0.1:0", "--connect", "127.0.0.1:0", timeout=5)
    assert done.returncode == 2, done
    assert "argument --connect: '127.0.0.1:0': port 0 is not a port to connect to" in done.stderr
    assert "Traceback" not in done.stderr


def test_listen_without_a_host_is_a_usage_error():
    done = run_cli("--listen", ":8080", "--connect", "127.0.0.1:1", timeout=5)
    assert done.returncode == 2, done
    assert (
        "argument --listen: ':8080': no host; write 127.0.0.1:8080 (this host only), "
        "or [::]:8080 or 0.0.0.0:8080 to listen on every interface" in done.stderr
    )


def test_a_wildcard_listen_logs_a_warning(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, listen_host="0.0.0.0")
    proxy.wait_log(
        rf" WARNING listening on every interface \(0\.0\.0\.0:{proxy.port}\): "
        r"anyone who can reach this host can use the proxy$"
    )
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(timeout=5) == 0


def test_stats_port_in_use_exits_1_with_the_error_as_the_last_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("--listen", "127.0.0.1:0", "--connect", "127.0.0.1:1", "--stats-listen", str(port))
    assert done.returncode == 1, done
    lines = done.stderr.strip().splitlines()
    assert lines[-1].endswith(f" ERROR cannot serve stats on 127.0.0.1:{port}: Address already in use"), lines
    assert "listening on" not in done.stderr
    assert "stopping" not in done.stderr


def test_a_client_gone_before_hand_over_is_named_client_not_a_fd(upstreams, start_proxy):
    """--max-conns 1 keeps the second client in the backlog; it resets there; once the first
    ends, the proxy accepts the reset one, connects upstream and cannot proxy it: a debug
    line (a balancer's health check does the same, every few seconds), closed_early."""
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--max-conns", "1", "--log-level", "debug", stats=True)
    first = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    ping(first)
    second = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)  # kernel handshake only
    peer = sockname(second)
    reset(second)
    first.close()
    lines = proxy.wait_log(rf" DEBUG conn 2 {peer}: not proxied: (.*)$")
    assert lines[0].endswith(f"client (127.0.0.1:{proxy.port}) is not connected"), lines
    assert not re.search(r"\b[ab] fd \d+", proxy.log())
    # a client gone first is its own doing: counted as closed early, no warning
    assert proxy.stats()["connections"]["refusals"] == {"closed_early": 1}
    assert " WARNING " not in proxy.log()
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        ping(c)


# -- 13. the stats server cannot take the proxy down ---------------------------------------------------
def test_stats_listen_with_an_empty_host_means_loopback(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, stats=True, stats_host=":")
    assert listening_addresses(proxy.pid) == {f"127.0.0.1:{proxy.port}", f"127.0.0.1:{proxy.stats_port}"}
    assert json.loads(http_get(proxy.stats_port, "/stats"))["connections"]["accepted"] == 0


def test_slowloris_stats_clients_are_bounded_and_cut_and_the_proxy_keeps_serving(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, "--workers", "1", stats=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        ping(c)  # the worker thread starts
    proxy.wait_stats(finished=1)
    threads = proxy.status("Threads")
    fds = proxy.fd_count()
    slow = []
    try:
        for _ in range(50):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", proxy.stats_port))
            slow.append(s)
        t0 = time.monotonic()
        # One header byte a second each, for up to 8 s.
        request = b"GET /stats HTTP/1.1\r\nHost: x\r\n"
        open_ = list(slow)
        for i in range(8):
            for s in list(open_):
                try:
                    s.send(request[i : i + 1])
                except BlockingIOError:
                    pass
                except OSError:
                    open_.remove(s)
            assert proxy.status("Threads") <= threads
            assert proxy.fd_count() <= fds + 9  # 8 stats connections, 1 more while one is cut
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
                ping(c)
            # A real scrape gets through the slow ones.
            assert json.loads(http_get(proxy.stats_port, "/stats"))["connections"]["accepted"] == i + 2
            if time.monotonic() - t0 > 6.5:
                break
            time.sleep(1)  # the slowloris pace under test: a byte a second
        # Every slow client is cut by 5 s after it was accepted (or at once, to make room).

        def all_closed() -> bool:
            for s in slow:
                s.setblocking(True)
                s.settimeout(0.01)
                try:
                    if s.recv(1 << 16) != b"":
                        return False
                except TimeoutError:
                    return False
                except ConnectionResetError:
                    pass
            return True

        # A client whose SYN found the backlog full (16) connects on a SYN retry, 1, 3 or 7 s
        # later, and has its 5 s from then: on a loaded machine some do (a CI run found the
        # last ones cut after the 8 s this allowed before).
        wait_until(all_closed, max(0.5, t0 + 15 - time.monotonic()), "every slow stats client cut")
    finally:
        for s in slow:
            s.close()
    assert proxy.proc.poll() is None


def test_idle_stats_connections_never_take_the_fds_proxied_connections_need(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, "--workers", "1", stats=True, nofile=64)
    idle = []
    clients = []
    try:
        for _ in range(60):  # each one connected (and accepted, unless the server is out of fds)
            try:
                idle.append(socket.create_connection(("127.0.0.1", proxy.stats_port), timeout=2))
            except TimeoutError:  # its SYN dropped: the backlog is full
                pass
        for i in range(15):
            c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            clients.append(c)
            ping(c, b"%d" % i)
        for c in clients:
            ping(c, b"all at once")
    finally:
        for s in idle + clients:
            s.close()
    assert "Too many open files" not in proxy.log()
    assert proxy.proc.poll() is None


def test_an_oversized_request_head_gets_431_and_memory_stays_bounded(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, stats=True)
    with socket.create_connection(("127.0.0.1", proxy.stats_port), timeout=5) as c:
        c.sendall(b"GET /stats HTTP/1.1\r\nX-Big: " + b"a" * 9000)
        reply = recv_until_eof(c, timeout=5)
    assert reply.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), reply[:100]

    rss = proxy.status("VmRSS")
    line = b"X-Pad: " + b"b" * 65000 + b"\r\n"

    def flood() -> None:
        with socket.create_connection(("127.0.0.1", proxy.stats_port), timeout=5) as s:
            try:
                s.sendall(b"GET /stats HTTP/1.1\r\n")
                for _ in range(16):  # 1 MiB of header lines, as many as http.server took
                    s.sendall(line)
                s.recv(1)
            except OSError:
                pass

    floods = [threading.Thread(target=flood, daemon=True) for _ in range(30)]
    for t in floods:
        t.start()
    for t in floods:
        t.join(20)
        assert not t.is_alive()
    assert proxy.status("VmRSS") <= rss + 4096, "more than 4 MiB kept for 30 MiB of request heads"
    assert json.loads(http_get(proxy.stats_port, "/stats"))["connections"]["accepted"] == 0


def test_stats_accept_at_the_fd_limit_backs_off_instead_of_spinning(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, "--workers", "1", stats=True, nofile=64)
    held: list[socket.socket] = []
    try:
        while "Too many open files" not in proxy.log() and len(held) < 60:
            c = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
            held.append(c)
            c.settimeout(1)
            try:
                c.sendall(b"p")
                if c.recv(1) != b"p":
                    break
            except (TimeoutError, ConnectionError):
                break
        wait_until(lambda: "Too many open files" in proxy.log(), 10, "the EMFILE warning")
        # Take the last fds: the stats server's own accept must now fail with EMFILE.

        def out_of_fds() -> int:
            return proxy.log().count("Too many open files")

        def connect_and_wait(port: int) -> None:
            """Connect; wait until the proxy has taken it up: its fds grew, or it said it has
            none left (at 63 of 64 fds a connection's upstream socket fails, and it is closed)."""
            fds, said = proxy.fd_count(), out_of_fds()
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", port))
            held.append(c)
            assert until(lambda: proxy.fd_count() > fds or out_of_fds() > said), (proxy.fd_count(), fds)

        while proxy.fd_count() < 64 and len(held) < 80:
            said = out_of_fds()
            connect_and_wait(proxy.port)
            if out_of_fds() > said:
                break  # refused for want of fds: the proxy is at its limit
        # Stats connections until one finds no fd (the first may take the proxy's last one).
        while " WARNING stats: accept: " not in proxy.log() and len(held) < 90:
            connect_and_wait(proxy.stats_port)
        proxy.wait_log(r" WARNING stats: accept: .*; pausing for ")  # it backs off ...
        cpu0, t0 = cpu_seconds(proxy.pid), time.monotonic()
        time.sleep(1.0)  # ... for a second of wall time: the CPU it uses meanwhile is the point
        used = (cpu_seconds(proxy.pid) - cpu0) / (time.monotonic() - t0)
        assert used < 0.3, f"the proxy used {used:.0%} of a core at its fd limit"
    finally:
        for c in held:
            c.close()
    assert proxy.proc.poll() is None
    wait_until(lambda: json.loads(http_get(proxy.stats_port, "/stats")), 10, "stats once fds are back")


def test_peer_bytes_in_log_lines_are_escaped(upstreams, start_proxy):
    proxy = start_proxy(upstreams().addr, "--log-level", "debug", stats=True)
    with socket.create_connection(("127.0.0.1", proxy.stats_port), timeout=5) as c:
        c.sendall(b"GET /\x1b[2Jx\x7f\rFAKE\x08 HTTP/1.0\r\n\r\n")
        reply = recv_until_eof(c, timeout=5)
    assert reply.startswith(b"HTTP/1.1 404 "), reply[:100]
    proxy.wait_log(r' DEBUG stats: 127\.0\.0\.1:\d+ "GET /\\x1b\[2Jx\\x7f\\x0dFAKE\\x08 HTTP/1\.0" 404$')
    raw = proxy.log_path.read_bytes()
    for byte in (b"\x1b", b"\x7f", b"\r", b"\x08"):
        assert byte not in raw


# -- 14. huge timeouts ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "option",
    [
        ("--connect-timeout", "inf"),
        ("--connect-timeout", "3000000"),
        ("--grace", "3000000"),
        ("--grace", "inf"),
        ("--idle", "inf"),
        ("--idle", "3000000"),
    ],
    ids=lambda o: " ".join(o),
)
def test_huge_timeouts_are_accepted_and_never_overflow(upstreams, start_proxy, option):
    proxy = start_proxy(upstreams().addr, *option)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        ping(client)
        proxy.signal(signal.SIGTERM)
        proxy.wait_log(r" INFO stopping: 1 connection\(s\) live, waiting up to ")
        ping(client, b"still flowing")
    assert proxy.wait(timeout=5) == 0, proxy.log()
    line = proxy.conn_line(peer, timeout=0)
    assert (line["up"], line["down"], line["reason"]) == ("17", "17", "EOF")
    assert "Traceback" not in proxy.log()


# -- 15. a proxy pointed at itself ----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("listen", "connect"),
    [
        ("127.0.0.1:{p}", "127.0.0.1:{p}"),
        ("127.0.0.1:{p}", "localhost:{p}"),
        ("0.0.0.0:{p}", "127.0.0.1:{p}"),
        ("[::]:{p}", "127.0.0.1:{p}"),
    ],
)
def test_connect_to_the_own_listen_address_is_refused(listen, connect):
    if listen.startswith("[") and not _has_ipv6_loopback():
        pytest.skip("no IPv6")
    p = free_port()
    done = run_cli("--listen", listen.format(p=p), "--connect", connect.format(p=p), timeout=5)
    assert done.returncode == 2, done
    assert (
        f"--connect {connect.format(p=p)} is this proxy's own --listen address "
        "(every connection would loop back into the proxy)" in done.stderr
    ), done.stderr
    assert "Traceback" not in done.stderr


# -- 15 / 10. documentation of the byte counts, and live bytes --------------------------------------------
def test_help_says_what_down_counts():
    done = run_cli("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "down= counts bytes written to the client's socket buffer, not bytes the client has received" in text


def test_live_connection_bytes_are_exact_in_metrics_and_stats(upstreams, start_proxy):
    from prometheus_client.parser import text_string_to_metric_families

    proxy = start_proxy(upstreams().addr, stats=True)

    def scrape() -> dict:
        text = http_get(proxy.stats_port, "/metrics")
        assert "# HELP splicepool_connection_bytes_total Bytes moved by finished connections only" in text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def check(live_up, live_down, done_up, done_down) -> None:
        m = scrape()
        assert m[("splicepool_live_connection_bytes", (("direction", "up"),))] == live_up
        assert m[("splicepool_live_connection_bytes", (("direction", "down"),))] == live_down
        assert m[("splicepool_connection_bytes_total", (("direction", "up"),))] == done_up
        assert m[("splicepool_connection_bytes_total", (("direction", "down"),))] == done_down
        assert m[("splicepool_bytes_total", (("direction", "up"),))] == live_up + done_up
        assert m[("splicepool_bytes_total", (("direction", "down"),))] == live_down + done_down
        conns = proxy.stats()["connections"]
        assert (conns["live_bytes_up"], conns["live_bytes_down"]) == (live_up, live_down)
        assert (conns["bytes_up"], conns["bytes_down"]) == (done_up, done_down)

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        ping(client, b"u" * 1000)
        ping(client, b"v" * 234)
        # The worker counts a write once it returns: the client may read the echo first.
        proxy.wait_stats(live=1, live_bytes_up=1234, live_bytes_down=1234)
        check(1234, 1234, 0, 0)
    proxy.wait_stats(live=0, finished=1)
    check(0, 0, 1234, 1234)


# -- 1. clients that reset while their relay starts ----------------------------------------------
def test_400_clients_resetting_at_once_all_end_and_sigterm_does_not_wait_out_the_grace(
    upstreams, start_proxy
):
    """Clients that send a RST right after connecting race the relay's start: each must end
    (logged, counted), none may stay live, and SIGTERM then exits at once, not after --grace
    (a relay stuck with no end reason kept `live: 1` and made SIGTERM wait the whole grace)."""
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--grace", "30", stats=True)
    n = 400
    delays = random.Random(11)
    for i in range(n):  # the resets spread over the hand-over: before, during and after it
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        if i % 2:
            client.sendall(b"GET / HTTP/1.0\r\n")  # half of them say something first
        time.sleep(delays.random() * 0.002)  # the race: the reset lands before, during or after
        reset(client)
    st = proxy.wait_stats(timeout=15, accepted=n, live=0, connecting=0)
    assert st["finished"] + st["refused"] + st["failed_connects"] == n, st
    log = proxy.log()
    for bad in ("illegal splice transition", "internal error", "Traceback", "crashed"):
        assert bad not in log, log
    t0 = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(timeout=10) == 0
    assert time.monotonic() - t0 < 5, "SIGTERM waited for a relay that never ended"


# -- 12. a log nobody reads ------------------------------------------------------------------------
@pytest.mark.parametrize(("stderr", "layout"), [("pipe", ()), ("pipe", ("--loop-thread",)), ("socket", ())],
                         ids=["pipe", "pipe-loop-thread", "unix-socket"])
def test_a_stderr_pipe_nobody_reads_never_stalls_the_proxy_and_says_what_it_dropped(upstreams, stderr, layout):
    """A proxy whose stderr is a pipe that nobody reads (a supervisor that never drains it)
    wrote each connection's log line there until the pipe was full (64 KiB, ~530 lines
    here), then blocked in that write: no connection was accepted any more. Now a line
    that cannot be written at once waits in a bounded queue for a writer thread, and what
    does not fit is dropped and counted: every connection is served, and once the pipe is
    read again each connection's line is there or counted in a "dropped" line. The same
    for a stream socket (what systemd gives a service for its journal)."""
    upstream = upstreams()
    port = free_port()
    if stderr == "pipe":
        r, w = os.pipe()
    else:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        r, w = a.detach(), b.detach()
    proc = subprocess.Popen(
        [sys.executable, "-m", "splicepool", "proxy", "--listen", f"127.0.0.1:{port}",
         "--connect", upstream.addr, *layout],
        stderr=w, stdout=subprocess.DEVNULL, cwd=ROOT)
    os.close(w)
    out = bytearray()
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while b" INFO listening on " not in out:  # the start's lines only: then nobody reads
            assert time.monotonic() < deadline and proc.poll() is None, out.decode()
            if select.select([r], [], [], 0.1)[0]:
                out += os.read(r, 4096)
        n = 4000  # ~450 KB of log lines: more than the pipe and the queue hold together
        failures: list[BaseException] = []

        def lane(k: int) -> None:
            try:
                for i in range(k, n, 8):
                    data = f"{i:08d}".encode() * 8
                    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                        c.sendall(data)
                        c.shutdown(socket.SHUT_WR)
                        assert recv_until_eof(c, timeout=5) == data
            except BaseException as exc:
                failures.append(exc)

        lanes = [threading.Thread(target=lane, args=(k,)) for k in range(8)]
        for t in lanes:
            t.start()
        for t in lanes:
            t.join(120)
        assert not failures, failures[:3]
        assert all(not t.is_alive() for t in lanes)
        proc.send_signal(signal.SIGTERM)
        while chunk := os.read(r, 1 << 16):  # read at last: the queue drains, then EOF
            out += chunk
        assert proc.wait(30) == 0
    finally:
        _reap(proc)
        os.close(r)
    text = out.decode()
    logged = len(re.findall(r" INFO conn \d+ \S+ -> \S+ up=64 down=64 duration=\S+ reason=EOF$", text, re.M))
    dropped = [int(m) for m in re.findall(r" WARNING (\d+) log lines? dropped: stderr was not read", text)]
    assert dropped, text[-2000:]
    stopping = " INFO stopping: " in text  # logged after the SIGTERM: it may be a dropped one
    assert logged + sum(dropped) == n + (0 if stopping else 1), (logged, dropped, stopping)
    assert logged >= 2000  # the pipe's 64 KiB and the queue's 256 KiB at least
    assert "stopped after 4000 connection(s)" in text


def test_a_proxy_started_with_stderr_closed_serves_and_stops(upstreams):
    """``2>&-``: no stderr at all. The log handler looks at fd 2 to pick how to write, and
    that must not stop the proxy from starting (it raised EBADF for a moment of
    2026-12-06); each line is then lost, as with logging's own handler."""
    upstream = upstreams()
    port = free_port()
    proc = subprocess.Popen(
        ["sh", "-c", 'exec "$@" 2>&-', "sh", sys.executable, "-m", "splicepool", "proxy",
         "--listen", f"127.0.0.1:{port}", "--connect", upstream.addr],
        stdout=subprocess.DEVNULL, cwd=ROOT)
    try:
        def served() -> bool:
            assert proc.poll() is None, f"the proxy exited with {proc.returncode}"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
                    c.sendall(b"no stderr")
                    c.shutdown(socket.SHUT_WR)
                    assert recv_until_eof(c) == b"no stderr"
            except ConnectionRefusedError:
                return False  # not listening yet
            return True

        wait_until(served, START_TIMEOUT, "an echo through the proxy")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        _reap(proc)
