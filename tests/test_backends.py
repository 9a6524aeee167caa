"""splicepool.backends: backends, balancing, health checks and re-resolution, with real sockets
on loopback, real threads, and (for a DNS change) a real child process in its own mount
namespace with a private /etc/hosts."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import engine_free, free_port, wait_until
from hypothesis import given, settings
from hypothesis import strategies as st

from splicepool.backends import (
    BALANCES,
    Backend,
    BackendSet,
    HealthChecker,
    Resolver,
    format_hostport,
)

pytestmark = engine_free

ROOT = Path(__file__).resolve().parent.parent
STREAM = socket.SOCK_STREAM
TCP = socket.IPPROTO_TCP


# -- helpers ---------------------------------------------------------------------------------
def backend(port: int, host: str = "127.0.0.1") -> Backend:
    return Backend(host, port)


def trio() -> tuple[Backend, Backend, Backend]:
    return Backend("127.0.0.1", 9001), Backend("127.0.0.1", 9002), Backend("127.0.0.1", 9003)


def names(backends) -> list[str]:
    return [b.name for b in backends]


def listener(host: str = "127.0.0.1", port: int = 0, backlog: int = 16) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(backlog)
    return s


class Changes:
    """on_change(backend, up, why) calls, with the backend's counters at the time."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, bool, str, int, int]] = []
        self.cond = threading.Condition()

    def __call__(self, b: Backend, up: bool, why: str) -> None:
        with self.cond:
            self.calls.append((b.name, up, why, b.checks_passed, b.checks_failed))
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 3.0) -> list:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.calls) >= n, timeout), self.calls
            return list(self.calls)


# -- format_hostport and Backend -------------------------------------------------------------
def test_format_hostport():
    assert format_hostport("127.0.0.1", 80) == "127.0.0.1:80"
    assert format_hostport("::1", 443) == "[::1]:443"
    assert format_hostport("db.example", 5432) == "db.example:5432"
    assert format_hostport("0.0.0.0", 0) == "0.0.0.0:0"
    for host, port in [("", 80), ("h", -1), ("h", 65536), ("h", True), ("h", "80"), (None, 80)]:
        with pytest.raises(ValueError):
            format_hostport(host, port)


def test_backend_resolves_ip_literals_to_themselves():
    v4 = Backend("127.0.0.1", 9001)
    assert (v4.name, v4.host, v4.port) == ("127.0.0.1:9001", "127.0.0.1", 9001)
    assert v4.addresses == ((socket.AF_INET, STREAM, TCP, "", ("127.0.0.1", 9001)),)
    v6 = Backend("::1", 9002)
    assert v6.name == "[::1]:9002"
    assert v6.addresses == ((socket.AF_INET6, STREAM, TCP, "", ("::1", 9002, 0, 0)),)
    assert Backend("[::1]", 9002).host == "::1"  # brackets are taken off
    assert v4.resolve() is False  # the same address: no change
    assert v4.last_error is None


def test_backend_resolves_a_name_in_getaddrinfo_order_each_address_once():
    b = Backend("localhost", 8080)
    expected = []
    for info in socket.getaddrinfo("localhost", 8080, type=STREAM):
        if (info[0], info[4]) not in [(e[0], e[4]) for e in expected]:
            expected.append(info)
    assert b.addresses == tuple(expected)
    assert len(b.addresses) >= 1
    assert all(a[4][0] in ("127.0.0.1", "::1") for a in b.addresses)
    assert isinstance(b.addresses, tuple)


def test_backend_counters_and_stats():
    b = Backend("::1", 7000)
    assert b.stats() == {
        "name": "[::1]:7000",
        "up": True,
        "live": 0,
        "connections": 0,
        "failures": 0,
        "bytes_up": 0,
        "bytes_down": 0,
        "checks_passed": 0,
        "checks_failed": 0,
        "last_error": None,
        "addresses": ["[::1]:7000"],
    }
    b.live, b.connections, b.bytes_up, b.bytes_down, b.up = 2, 5, 10, 20, False
    s = b.stats()
    assert (s["live"], s["connections"], s["bytes_up"], s["bytes_down"], s["up"]) == (
        2,
        5,
        10,
        20,
        False,
    )


def test_backend_unresolvable_name_raises_gaierror():
    with pytest.raises(socket.gaierror):
        Backend("splicepool-nx.invalid", 80)


def test_backend_without_resolve_has_no_addresses_until_resolve():
    b = Backend("localhost", 8081, resolve=False)
    assert b.addresses == ()
    assert b.stats()["addresses"] == []
    assert b.resolve() is True
    assert b.addresses == Backend("localhost", 8081).addresses
    first = b.addresses
    assert b.resolve() is False
    assert b.addresses is first  # unchanged: the same tuple object


def test_backend_resolve_replaces_changed_addresses():
    b = Backend("127.0.0.1", 8082, resolve=False)
    b.addresses = ((socket.AF_INET, STREAM, TCP, "", ("127.0.0.9", 8082)),)
    assert b.resolve() is True
    assert b.addresses == ((socket.AF_INET, STREAM, TCP, "", ("127.0.0.1", 8082)),)


def test_backend_name_that_stops_resolving_keeps_its_addresses():
    b = Backend("splicepool-nx.invalid", 8083, resolve=False)
    old = ((socket.AF_INET, STREAM, TCP, "", ("127.0.0.7", 8083)),)
    b.addresses = old
    assert b.resolve() is False
    assert b.addresses is old
    assert b.last_error is not None
    assert b.last_error.startswith("name does not resolve: ")
    assert len(b.last_error) > len("name does not resolve: ")


@pytest.mark.parametrize(
    "host, port",
    [
        ("", 80),
        (" h", 80),
        ("a b", 80),
        (None, 80),
        ("h", 0),
        ("h", 65536),
        ("h", "80"),
        ("h", True),
    ],
)
def test_backend_bad_arguments(host, port):
    with pytest.raises(ValueError):
        Backend(host, port, resolve=False)


# -- BackendSet ------------------------------------------------------------------------------
def test_backend_set_bad_arguments():
    a, b, _ = trio()
    with pytest.raises(ValueError, match="at least one"):
        BackendSet([])
    with pytest.raises(ValueError) as err:
        BackendSet([a], "random")
    for balance in BALANCES:
        assert balance in str(err.value)
    with pytest.raises(ValueError, match=r"127\.0\.0\.1:9001 is listed twice"):
        BackendSet([a, b, Backend("127.0.0.1", 9001)])
    with pytest.raises(ValueError, match="not a Backend"):
        BackendSet([a, "127.0.0.1:9002"])


def test_single_backend_is_a_prebuilt_list():
    b = backend(9001)
    for balance in BALANCES:
        bs = BackendSet([b], balance)
        first = bs.order("10.0.0.1")
        assert first == [b]
        assert bs.order() is first
        b.up = False
        assert bs.order() == []
        assert bs.order("10.0.0.1") == []
        b.up = True
        assert bs.order() is first


def test_roundrobin_rotates_exactly():
    a, b, c = trio()
    bs = BackendSet([a, b, c])
    orders = [bs.order() for _ in range(9)]
    assert [o[0] for o in orders] == [a, b, c] * 3
    assert Counter(o[0].name for o in orders) == {a.name: 3, b.name: 3, c.name: 3}
    assert orders[0] == [a, b, c]
    assert orders[1] == [b, c, a]
    assert orders[2] == [c, a, b]


def test_roundrobin_skips_down_backends_and_spreads_over_the_rest():
    a, b, c = trio()
    bs = BackendSet([a, b, c], "roundrobin")
    b.up = False
    orders = [bs.order() for _ in range(6)]
    assert orders == [[a, c], [c, a]] * 3
    a.up = c.up = False
    assert bs.order() == []
    assert bs.order("10.0.0.1") == []
    b.up = True
    assert bs.order() == [b]


def test_leastconn_picks_the_fewest_live():
    a, b, c = trio()
    bs = BackendSet([a, b, c], "leastconn")
    a.live, b.live, c.live = 2, 0, 1
    assert bs.order() == [b, c, a]
    assert bs.order() == [b, c, a]
    b.live = 5
    assert bs.order() == [c, a, b]


def test_leastconn_ties_rotate():
    a, b, c = trio()
    bs = BackendSet([a, b, c], "leastconn")
    assert [bs.order()[0] for _ in range(6)] == [a, b, c, a, b, c]
    a.live = 1
    picks = [bs.order() for _ in range(4)]
    assert [p[0] for p in picks] == [b, c, b, c]
    assert picks[0] == [b, c, a] and picks[1] == [c, b, a]


def test_leastconn_as_the_loop_counts():
    """The loop raises live on a pick and lowers it when a connection ends: equal load."""
    backends = trio()
    bs = BackendSet(backends, "leastconn")
    for _ in range(9):
        bs.order()[0].live += 1
    assert [b.live for b in backends] == [3, 3, 3]
    backends[1].live = 0  # its three connections ended
    assert bs.order()[0] is backends[1]
    backends[1].up = False
    assert sorted(names(bs.order())) == sorted(names([backends[0], backends[2]]))


def test_source_same_ip_same_backend():
    backends = trio()
    bs = BackendSet(backends, "source")
    first = bs.order("192.0.2.10")
    assert sorted(names(first)) == sorted(names(backends))
    for _ in range(100):
        assert bs.order("192.0.2.10") == first


def test_source_spreads_clients_and_moves_only_the_clients_of_a_down_backend():
    backends = trio()
    bs = BackendSet(backends, "source")
    ips = [f"10.1.{i // 256}.{i % 256}" for i in range(600)]
    before = {ip: bs.order(ip) for ip in ips}
    counts = Counter(o[0].name for o in before.values())
    assert set(counts) == set(names(backends))
    assert all(120 <= n <= 280 for n in counts.values()), counts  # about 200 each
    gone = backends[1]
    gone.up = False
    moved = 0
    for ip in ips:
        now = bs.order(ip)
        assert gone not in now
        if before[ip][0] is gone:
            assert now == before[ip][1:]  # its clients go to their first fall-back
            moved += 1
        else:
            assert now == [b for b in before[ip] if b is not gone]  # the rest stay
    assert moved == counts[gone.name]
    gone.up = True
    assert all(bs.order(ip) == before[ip] for ip in ips)  # back where they were


def test_source_does_not_depend_on_the_list_order():
    a, b, c = trio()
    one = BackendSet([a, b, c], "source")
    other = BackendSet([c, a, b], "source")
    for i in range(50):
        ip = f"2001:db8::{i:x}"
        assert one.order(ip) == other.order(ip)


def test_source_without_a_client_ip_is_roundrobin():
    a, b, c = trio()
    bs = BackendSet([a, b, c], "source")
    assert [bs.order(None)[0] for _ in range(6)] == [a, b, c, a, b, c]
    assert bs.order(None) == [a, b, c]


SOURCE_PICKS = """
import sys
from splicepool.backends import Backend, BackendSet
bs = BackendSet([Backend("127.0.0.1", p) for p in (9001, 9002, 9003)], "source")
for i in range(200):
    print(" ".join(b.name for b in bs.order(f"172.16.{i}.{i * 7 % 256}")))
"""


def test_source_picks_are_the_same_in_every_process():
    bs = BackendSet(list(trio()), "source")
    here = [" ".join(names(bs.order(f"172.16.{i}.{i * 7 % 256}"))) for i in range(200)]
    procs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", SOURCE_PICKS],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=20)
        assert proc.returncode == 0, err
        assert out.splitlines() == here
    assert len(set(here)) > 1


@settings(max_examples=200, deadline=None)
@given(
    balance=st.sampled_from(BALANCES),
    ups=st.lists(st.booleans(), min_size=1, max_size=6),
    lives=st.lists(st.integers(0, 5), min_size=6, max_size=6),
    client_ip=st.one_of(st.none(), st.text(max_size=40)),
    calls=st.integers(1, 8),
)
def test_order_is_always_the_up_backends_each_once(balance, ups, lives, client_ip, calls):
    backends = [Backend("127.0.0.1", 9000 + i, resolve=False) for i in range(len(ups))]
    for b, up, live in zip(backends, ups, lives[: len(ups)], strict=True):
        b.up, b.live = up, live
    bs = BackendSet(backends, balance)
    up = [b for b in backends if b.up]
    for _ in range(calls):
        got = bs.order(client_ip)
        assert sorted(names(got)) == sorted(names(up))
        if balance == "leastconn" and got:
            assert [b.live for b in got] == sorted(b.live for b in got)
        if balance == "source" and client_ip is not None and len(backends) > 1:
            assert got == bs.order(client_ip)


# -- HealthChecker ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0},
        {"interval": -1},
        {"interval": float("nan")},
        {"interval": float("inf")},
        {"interval": True},
        {"interval": "1"},
        {"interval": 1, "rise": 0},
        {"interval": 1, "fall": 0},
        {"interval": 1, "fall": 1.5},
        {"interval": 1, "timeout": 0},
        {"interval": 1, "timeout": -0.5},
    ],
)
def test_health_checker_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        HealthChecker([backend(9001)], **kwargs)


def test_health_checker_defaults():
    assert HealthChecker([backend(9001)], interval=0.5).timeout == 0.5
    hc = HealthChecker([backend(9001)], interval=30)
    assert (hc.timeout, hc.rise, hc.fall, hc.rounds) == (5.0, 2, 3, 0)


def test_check_passes_against_a_listener_and_closes_at_once():
    with listener() as lsock:
        b = backend(lsock.getsockname()[1])
        changes = Changes()
        hc = HealthChecker([b], interval=1, on_change=changes)
        hc.run_round()
        hc.run_round()
        assert (hc.rounds, b.checks_passed, b.checks_failed, b.up) == (2, 2, 0, True)
        assert changes.calls == []
        assert b.last_error is None
        lsock.settimeout(2)
        for _ in range(2):
            conn, _ = lsock.accept()
            with conn:
                conn.settimeout(2)
                assert conn.recv(1) == b""  # the check closed its socket: EOF, no data


def test_fall_and_rise_exact_counts(caplog):
    port = free_port()
    b = backend(port)
    changes = Changes()
    hc = HealthChecker([b], interval=1, rise=2, fall=3, on_change=changes)
    caplog.set_level(logging.WARNING, logger="splicepool.proxy")
    for _ in range(2):
        hc.run_round()
    assert (b.up, b.checks_failed, changes.calls) == (True, 2, [])
    assert b.last_error == "connection refused"
    hc.run_round()
    assert b.up is False
    assert changes.calls == [(b.name, False, "3 checks failed: connection refused", 0, 3)]
    hc.run_round()
    assert (b.checks_failed, len(changes.calls)) == (4, 1)  # already down: no new call
    with listener(port=port) as lsock:
        hc.run_round()
        assert (b.up, b.checks_passed) == (False, 1)
        hc.run_round()
        assert b.up is True
        assert changes.calls[1] == (b.name, True, "2 checks passed", 2, 4)
        hc.run_round()
        assert len(changes.calls) == 2
        lsock.close()
    assert [r.getMessage() for r in caplog.records if r.name == "splicepool.proxy"] == [
        f"backend 127.0.0.1:{port} is down: 3 checks failed: connection refused",
        f"backend 127.0.0.1:{port} is up: 2 checks passed",
    ]
    assert [r.levelno for r in caplog.records] == [logging.WARNING, logging.WARNING]


def test_a_pass_breaks_a_run_of_failures():
    port = free_port()
    b = backend(port)
    hc = HealthChecker([b], interval=1, fall=2)
    hc.run_round()  # failed 1
    with listener(port=port):
        hc.run_round()  # passed: the run starts again
    hc.run_round()  # failed 1
    assert (b.up, b.checks_passed, b.checks_failed) == (True, 1, 2)
    hc.run_round()  # failed 2
    assert b.up is False


def test_check_falls_back_to_the_next_address():
    port = free_port("127.0.0.2")
    with listener("127.0.0.2", port):
        b = Backend("127.0.0.1", port, resolve=False)
        b.addresses = (
            (socket.AF_INET, STREAM, TCP, "", ("127.0.0.1", port)),  # refused
            (socket.AF_INET, STREAM, TCP, "", ("127.0.0.2", port)),  # listening
        )
        hc = HealthChecker([b], interval=1, fall=1)
        hc.run_round()
        assert (b.checks_passed, b.checks_failed, b.up) == (1, 0, True)


def test_check_of_a_backend_without_addresses_fails():
    b = Backend("127.0.0.1", 9001, resolve=False)
    hc = HealthChecker([b], interval=1, fall=1)
    hc.run_round()
    assert (b.up, b.checks_failed, b.last_error) == (False, 1, "no addresses")


def test_check_times_out_on_a_full_accept_queue(blackhole):
    b = backend(blackhole[1])
    changes = Changes()
    hc = HealthChecker([b], interval=1, fall=1, timeout=0.2, on_change=changes)
    began = time.monotonic()
    hc.run_round()
    took = time.monotonic() - began
    assert 0.2 <= took < 1.0, took
    assert (b.up, b.checks_failed, b.last_error) == (False, 1, "timed out")
    assert changes.calls == [(b.name, False, "1 check failed: timed out", 0, 1)]


def test_backends_are_checked_at_the_same_time(blackhole):
    """A hanging backend listed first does not delay the others: their results come first."""
    hanging = backend(blackhole[1])
    with listener() as lsock:
        good = backend(lsock.getsockname()[1])
        good.up = False
        refused = backend(free_port())
        changes = Changes()
        hc = HealthChecker(
            [hanging, good, refused], interval=1, rise=1, fall=1, timeout=0.3, on_change=changes
        )
        hc.run_round()
        assert [(c[0], c[1]) for c in changes.calls[2:]] == [(hanging.name, False)]
        assert sorted((c[0], c[1]) for c in changes.calls[:2]) == sorted(
            [(good.name, True), (refused.name, False)]
        )
        assert (hanging.last_error, refused.last_error) == ("timed out", "connection refused")


def test_checker_thread_counts_rounds_and_stops_promptly():
    port = free_port()
    b = backend(port)
    changes = Changes()
    hc = HealthChecker([b], interval=0.05, fall=3, on_change=changes)
    hc.start()
    try:
        names_ = [t.name for t in threading.enumerate() if t.name == "splicepool-health"]
        assert names_ == ["splicepool-health"]
        assert hc._thread.daemon
        wait_until(lambda: hc.rounds >= 5, 3.0, what="5 health check rounds")
        with pytest.raises(RuntimeError):
            hc.start()
    finally:
        hc.stop()
    assert not hc._thread.is_alive()
    assert b.checks_failed == hc.rounds  # one check per backend per round, each counted
    assert changes.calls == [(b.name, False, "3 checks failed: connection refused", 0, 3)]
    rounds = hc.rounds
    hc.stop()  # again: nothing
    assert hc.rounds == rounds == b.checks_failed


def test_stop_is_prompt_with_a_long_interval():
    with listener() as lsock:
        b = backend(lsock.getsockname()[1])
        hc = HealthChecker([b], interval=60)
        hc.start()
        wait_until(lambda: hc.rounds == 1, 3.0, what="the first round")
        began = time.monotonic()
        hc.stop()
        assert time.monotonic() - began < 1.0
        assert not hc._thread.is_alive()
        assert (hc.rounds, b.checks_passed) == (1, 1)


def test_stop_cuts_a_round_short(blackhole):
    hanging = backend(blackhole[1])
    with listener() as lsock:
        good = backend(lsock.getsockname()[1])
        good.up = False
        changes = Changes()
        hc = HealthChecker([hanging, good], interval=60, rise=1, timeout=30, on_change=changes)
        hc.start()
        changes.wait(1)  # the round is under way: good has passed, hanging is pending
        began = time.monotonic()
        hc.stop()
        assert time.monotonic() - began < 1.0
        assert not hc._thread.is_alive()
        assert hc.rounds == 0
        assert (hanging.checks_passed, hanging.checks_failed, hanging.up) == (0, 0, True)
        assert changes.calls == [(good.name, True, "1 check passed", 1, 0)]


def test_on_change_errors_are_logged_and_ignored(caplog):
    b = backend(free_port())
    calls = []

    def boom(changed, up, why):
        calls.append((changed.name, up, why))
        raise RuntimeError("callback broke")

    hc = HealthChecker([b], interval=0.05, fall=1, on_change=boom)
    caplog.set_level(logging.WARNING, logger="splicepool.proxy")
    hc.start()
    try:
        wait_until(lambda: hc.rounds >= 3, 3.0, what="3 rounds after the callback failed")
    finally:
        hc.stop()
    assert calls == [(b.name, False, "1 check failed: connection refused")]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errors[0].getMessage() == f"health check on_change callback failed for backend {b.name}"
    assert errors[0].exc_info[1].args == ("callback broke",)


def test_checks_ipv6():
    with listener("::1") as lsock:
        b = Backend("::1", lsock.getsockname()[1])
        hc = HealthChecker([b], interval=1)
        hc.run_round()
        assert (b.checks_passed, b.checks_failed) == (1, 0)


def test_health_checker_leaves_no_fds_open():
    port = free_port()
    with listener() as lsock:
        backends = [backend(lsock.getsockname()[1]), backend(port)]
        before = len(os.listdir("/proc/self/fd"))
        hc = HealthChecker(backends, interval=0.05)
        hc.start()
        wait_until(lambda: hc.rounds >= 3, 3.0, what="3 rounds")
        hc.stop()
        assert len(os.listdir("/proc/self/fd")) == before


# -- Resolver --------------------------------------------------------------------------------
def test_resolver_bad_arguments():
    for every in (0, -1, float("nan"), True, None):
        with pytest.raises(ValueError):
            Resolver([backend(9001)], every)
    with pytest.raises(ValueError):
        Resolver(["127.0.0.1:9001"], 1)


def test_resolver_resolves_names_and_skips_ip_addresses():
    named = Backend("localhost", 9100, resolve=False)
    literal = Backend("127.0.0.1", 9101)
    fake = ((socket.AF_INET, STREAM, TCP, "", ("127.0.0.9", 9101)),)
    literal.addresses = fake  # a resolver that looked it up would put 127.0.0.1 back
    seen = []
    r = Resolver([named, literal], 0.05, on_change=seen.append)
    r.start()
    try:
        assert r._thread.name == "splicepool-resolve" and r._thread.daemon
        wait_until(lambda: r.rounds >= 3, 3.0, what="3 resolve rounds")
    finally:
        r.stop()
    assert not r._thread.is_alive()
    assert named.addresses == Backend("localhost", 9100).addresses
    assert seen == [named]  # once: later rounds found the same addresses
    assert literal.addresses is fake


def test_resolver_with_only_ip_addresses_starts_no_thread():
    r = Resolver([backend(9001), Backend("::1", 9002)], 0.05)
    r.start()
    assert r._thread is None
    r.stop()
    r.stop()


def test_resolver_stop_is_prompt():
    r = Resolver([Backend("localhost", 9100)], 60)
    r.start()
    wait_until(lambda: r.rounds == 1, 3.0, what="the first round")
    began = time.monotonic()
    r.stop()
    assert time.monotonic() - began < 1.0
    assert not r._thread.is_alive()
    with pytest.raises(RuntimeError):
        r.start()


def test_resolver_keeps_addresses_of_a_name_that_fails(caplog):
    b = Backend("splicepool-nx.invalid", 9200, resolve=False)
    old = ((socket.AF_INET, STREAM, TCP, "", ("127.0.0.7", 9200)),)
    b.addresses = old
    r = Resolver([b], 1)
    caplog.set_level(logging.INFO, logger="splicepool.proxy")
    r.run_round()
    r.run_round()
    assert r.rounds == 2
    assert b.addresses is old
    assert b.last_error.startswith("name does not resolve: ")
    messages = [rec.getMessage() for rec in caplog.records]
    assert len(messages) == 1  # warned once, not every round
    assert messages[0] == f"backend {b.name}: {b.last_error}; keeping 1 address"
    assert caplog.records[0].levelno == logging.WARNING


# The child of the DNS-change test: in its own mount namespace, /etc/hosts is the test's
# temporary file. It prints what it sees; the test changes the file and reads the lines.
DNS_CHILD = """
import logging, sys
from splicepool.backends import Backend, Resolver

class Out(logging.Handler):
    def emit(self, record):
        print("log", record.levelname, record.getMessage(), flush=True)

log = logging.getLogger("splicepool.proxy")
log.addHandler(Out())
log.setLevel(logging.INFO)
b = Backend("splicepool-test.invalid", int(sys.argv[1]))
def show(backend):
    return " ".join(a[4][0] for a in backend.addresses)
r = Resolver([b], 0.05, on_change=lambda backend: print("change", show(backend), flush=True))
r.start()
print("start", show(b), flush=True)
sys.stdin.readline()
r.stop()
print("final", show(b), "|", b.last_error, flush=True)
"""


class Lines:
    """Read a child's stdout line by line, each wait bounded."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.buf = b""
        self.sel = selectors.DefaultSelector()
        self.sel.register(proc.stdout, selectors.EVENT_READ)

    def next(self, timeout: float = 5.0) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sel.select(left):
                pytest.fail(f"no line from the child in {timeout} s (so far {self.buf!r})")
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                err = self.proc.stderr.read().decode()
                pytest.fail(f"the child ended early ({self.buf!r}): {err}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.decode()


def rewrite_in_place(path: Path, text: str) -> None:
    """Change the file's content keeping its inode, so the bind mount shows the change."""
    with open(path, "r+") as f:
        f.write(text)
        f.truncate()


def can_unshare() -> str | None:
    if shutil.which("unshare") is None:
        return "no unshare command"
    try:
        done = subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unshare -rm true failed: {exc}"
    if done.returncode != 0:
        return f"unshare -rm true failed: {done.stderr.decode().strip()}"
    return None


@contextlib.contextmanager
def child_seeing_hosts(hosts: Path, code: str, *args: str) -> Iterator[subprocess.Popen]:
    """Run ``python -c code args`` in its own user and mount namespace, where /etc/hosts is
    ``hosts`` (bind-mounted); killed and reaped on the way out."""
    script = 'mount --bind "$0" /etc/hosts && py=$1 code=$2 && shift 2 && exec "$py" -c "$code" "$@"'
    proc = subprocess.Popen(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", script, str(hosts), sys.executable, code, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        proc.stdin.close()


def test_resolver_follows_a_dns_change(tmp_path):
    reason = can_unshare()
    if reason:
        pytest.skip(f"needs a user and mount namespace: {reason}")
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.2 splicepool-test.invalid\n")
    port = 9300
    name = f"splicepool-test.invalid:{port}"
    with child_seeing_hosts(hosts, DNS_CHILD, str(port)) as proc:
        lines = Lines(proc)
        assert lines.next(10.0) == "start 127.0.0.2"
        rewrite_in_place(hosts, "127.0.0.3 splicepool-test.invalid\n")
        assert lines.next() == f"log INFO backend {name} now resolves to 127.0.0.3:{port}"
        assert lines.next() == "change 127.0.0.3"
        rewrite_in_place(hosts, "127.0.0.4 splicepool-other.invalid\n")
        warning = lines.next()
        prefix = f"log WARNING backend {name}: name does not resolve: "
        assert warning.startswith(prefix), warning
        assert warning.endswith("; keeping 1 address"), warning
        error = warning[len("log WARNING backend " + name + ": ") : -len("; keeping 1 address")]
        proc.stdin.write(b"quit\n")
        proc.stdin.flush()
        assert lines.next() == f"final 127.0.0.3 | {error}"
        assert proc.wait(5) == 0


# The child of the slow-lookup test: /etc/hosts is a FIFO there, so getaddrinfo's open of
# it blocks until the test opens it for writing, as a slow DNS server would keep a lookup.
SLOW_LOOKUP_CHILD = """
import socket, sys, time
from splicepool.backends import Backend, Resolver

b = Backend("splicepool-test.invalid", 9310, resolve=False)
b.addresses = ((socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.2", 9310)),)
b.last_error = "before"
r = Resolver([b], 60, on_change=lambda backend: print("change", flush=True))
r.start()
sys.stdin.readline()  # the test saw the lookup wait in open("/etc/hosts")
began = time.monotonic()
r.stop()
print("stopped %.3f %s" % (time.monotonic() - began, r._thread.is_alive()), flush=True)
sys.stdin.readline()  # the test opened the FIFO: the lookup ends
r._thread.join(10)
print("final", b.addresses[0][4][0], b.last_error, r._thread.is_alive(), flush=True)
"""


def test_resolver_stop_never_waits_for_a_lookup_in_progress(tmp_path):
    # A reload stops the old resolver from the accept loop, which runs on a pool worker:
    # stop() must return at once even while a lookup hangs, and the lookup's answer, when
    # it comes, must change nothing.
    reason = can_unshare()
    if reason:
        pytest.skip(f"needs a user and mount namespace: {reason}")
    hosts = tmp_path / "hosts"
    os.mkfifo(hosts)
    with child_seeing_hosts(hosts, SLOW_LOOKUP_CHILD) as proc:
        lines = Lines(proc)

        def lookup_waits_on_the_fifo() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            for task in Path(f"/proc/{proc.pid}/task").iterdir():
                try:
                    if (task / "wchan").read_text() == "wait_for_partner":
                        return True
                except OSError:  # a thread that just ended
                    pass
            return False

        wait_until(lookup_waits_on_the_fifo, 10.0, what="the resolver's lookup to open /etc/hosts")
        proc.stdin.write(b"stop\n")
        proc.stdin.flush()
        word, took, alive = lines.next().split()
        assert word == "stopped" and alive == "True"
        assert float(took) < 0.2, f"stop() waited {took} s for a lookup in progress"
        # A writer lets the lookup's open() return: glibc finds no regular file and fails
        # the lookup, which must not touch the backend either.
        os.close(os.open(hosts, os.O_WRONLY | os.O_NONBLOCK))
        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert lines.next() == "final 127.0.0.2 before False"  # no change, no "change" line
        assert proc.wait(5) == 0


def test_stop_from_on_change_and_before_start():
    b = backend(free_port())
    done = threading.Event()
    hc: HealthChecker

    def stop_now(changed, up, why):
        hc.stop()  # from the checker's own thread: must not wait for itself
        done.set()

    hc = HealthChecker([b], interval=0.05, fall=1, on_change=stop_now)
    hc.start()
    assert done.wait(3.0)
    wait_until(lambda: not hc._thread.is_alive(), 3.0, what="the checker thread to end")
    assert hc.rounds == 0  # stopped inside its first round
    assert (b.up, b.checks_failed) == (False, 1)
    never = HealthChecker([b], interval=1)
    never.stop()
    with pytest.raises(RuntimeError):
        never.start()
    with pytest.raises(RuntimeError):
        never.run_round()
