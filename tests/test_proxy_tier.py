"""The proxy tier through the real CLI: several ``--connect`` backends and ``--balance``,
failover, health checks, ``--allow``/``--deny``, ``--max-conns-per-client``, refusals counted
by reason in /stats and /metrics, usage errors and the ``splicepool`` console script.

Each backend is a loopback Upstream that first sends its one-byte tag, so a client knows
which backend it reached; clients bind 127.0.0.x before connecting to be told apart by the
access list, the per-client limit and source balancing. Every wait ends on a log line, a
/stats value or a byte read, never on the clock."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_cli
from conftest import (
    digest,
    own_processes,
    payload,
    recv_exact,
    recv_until_eof,
    send_in_thread,
    wait_until,
)
from test_cli import ROOT, echo, hostport, http_get, ping, run_cli, sockname

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixtures, shared
start_proxy = test_cli.start_proxy

LOG = r"^\S+ \S+ \d+ "  # the start of a log line: date, time, pid


# -- helpers -------------------------------------------------------------------------------
def tagged(tag: bytes) -> Callable[[socket.socket], None]:
    """Upstream mode: send ``tag`` (one byte: which backend this is), then echo until EOF."""

    def handler(conn: socket.socket) -> None:
        conn.sendall(tag)
        echo(conn)

    return handler


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    """A client of the proxy on 127.0.0.1:``port``, bound to ``source`` first (its address as
    the proxy sees it)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.settimeout(5)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def reached(sock: socket.socket) -> bytes:
    """The tag of the backend a new client reached (its first byte)."""
    return recv_exact(sock, 1, timeout=5)


def visit(port: int, source: str = "127.0.0.1") -> bytes:
    """One short connection: the tag of the backend it reached, the echo checked, closed."""
    with connect(port, source) as c:
        tag = reached(c)
        ping(c)
    return tag


def refused(sock: socket.socket) -> None:
    """The proxy closed this client without a byte: EOF (or a reset), well within 5 s."""
    sock.settimeout(5)
    try:
        assert sock.recv(1) == b""
    except ConnectionResetError:
        pass


def by_name(proxy) -> dict[str, dict]:
    """/stats' backends by name."""
    return {b["name"]: b for b in proxy.stats()["backends"]}


def metric_lines(proxy, name: str) -> list[str]:
    """The sample lines of ``splicepool_<name>`` in /metrics, in the order served."""
    text = http_get(proxy.stats_port, "/metrics")
    return [
        line for line in text.splitlines()
        if line.startswith(f"splicepool_{name}{{") or line.startswith(f"splicepool_{name} ")
    ]


def per_backend(name: str, values: dict[str, int]) -> list[str]:
    """The metric lines ``splicepool_<name>{backend="ADDR"} VALUE`` expected, in order."""
    return [f'splicepool_{name}{{backend="{addr}"}} {value}' for addr, value in values.items()]


def _can_bind(host: str) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False


SOURCES = [f"127.0.0.{i}" for i in range(2, 14)]  # 12 client addresses on loopback

needs_127_x = pytest.mark.skipif(
    not all(_can_bind(s) for s in SOURCES[:2]), reason="cannot bind 127.0.0.2 (no 127/8 loopback)"
)


# -- 1. roundrobin ---------------------------------------------------------------------------
def test_roundrobin_over_three_backends_goes_in_turn_and_counts_each(upstreams, start_proxy):
    """9 connections in a row go A, B, C, A, B, C, A, B, C: each backend takes 3, which
    /stats and the backend_connections_total metric say exactly, and each log line names
    the backend its client reached."""
    a, b, c = (upstreams(tagged(t)) for t in (b"A", b"B", b"C"))
    proxy = start_proxy(a.addr, "--connect", b.addr, "--connect", c.addr, stats=True)
    assert proxy.wait_log(rf"{LOG}INFO listening on \S+, proxying to (.*)$")[0] == (
        f"{a.addr}, {b.addr}, {c.addr} (roundrobin)"
    )
    peers, tags = [], []
    for _ in range(9):
        with connect(proxy.port) as client:
            peers.append(sockname(client))
            tags.append(reached(client))
            ping(client)
    assert tags == [b"A", b"B", b"C"] * 3
    proxy.wait_stats(accepted=9, finished=9, live=0)
    assert [proxy.conn_line(p)["upstream"] for p in peers] == [a.addr, b.addr, c.addr] * 3
    backends = by_name(proxy)
    assert [(n, s["connections"], s["live"], s["failures"], s["up"]) for n, s in backends.items()] == [
        (a.addr, 3, 0, 0, True),
        (b.addr, 3, 0, 0, True),
        (c.addr, 3, 0, 0, True),
    ]
    assert all(s["bytes_up"] == s["bytes_down"] - 3 == 12 for s in backends.values())  # 3 x "ping", + tags
    assert metric_lines(proxy, "backend_connections_total") == per_backend(
        "backend_connections_total", {a.addr: 3, b.addr: 3, c.addr: 3}
    )
    assert metric_lines(proxy, "backend_connect_failures_total") == per_backend(
        "backend_connect_failures_total", {a.addr: 0, b.addr: 0, c.addr: 0}
    )
    assert (a.accepted, b.accepted, c.accepted) == (3, 3, 3)


# -- 2. leastconn ----------------------------------------------------------------------------
def test_leastconn_sends_new_connections_away_from_the_busy_backend(upstreams, start_proxy):
    """Two connections held open on A (B's and C's closed): the next four go B, C, B, C, the
    backends with the fewest live connections (ties in turn), and A gets one again only once
    every backend has two. Roundrobin would have sent the third of them to A."""
    a, b, c = (upstreams(tagged(t)) for t in (b"A", b"B", b"C"))
    proxy = start_proxy(a.addr, "--connect", b.addr, "--connect", c.addr, "--balance", "leastconn",
                        stats=True)
    held: list[socket.socket] = []
    try:
        first = [connect(proxy.port) for _ in range(4)]  # with nothing live: in turn
        held += first
        assert [reached(s) for s in first] == [b"A", b"B", b"C", b"A"]
        for s in first[1:3]:  # close B's and C's: A keeps two
            s.close()
            held.remove(s)
        proxy.wait_stats(live=2, finished=2)
        assert [s["live"] for s in by_name(proxy).values()] == [2, 0, 0]

        then = []
        for _ in range(5):
            s = connect(proxy.port)
            held.append(s)
            then.append(reached(s))
        assert then == [b"B", b"C", b"B", b"C", b"A"]
        for s in held:
            ping(s)  # every one held is spliced both ways
        proxy.wait_stats(live=7, accepted=9)
        backends = by_name(proxy)
        assert [(s["live"], s["connections"]) for s in backends.values()] == [(3, 3), (2, 3), (2, 3)]
        assert metric_lines(proxy, "backend_connections_live") == per_backend(
            "backend_connections_live", {a.addr: 3, b.addr: 2, c.addr: 2}
        )
    finally:
        for s in held:
            s.close()
    proxy.wait_stats(live=0, finished=9)


# -- 3. source ---------------------------------------------------------------------------------
def source_picks(addrs: list[str], sources: list[str]) -> dict[str, str]:
    """The backend ``--balance source`` should pick for each client address: what a
    BackendSet of the same backends (unit-tested in test_backends.py) picks first."""
    from splicepool.backends import Backend, BackendSet

    backends = [Backend("127.0.0.1", int(addr.rpartition(":")[2])) for addr in addrs]
    chooser = BackendSet(backends, "source")
    return {src: chooser.order(src)[0].name for src in sources}


@needs_127_x
def test_source_keeps_each_client_address_on_its_backend_and_spreads_them(upstreams, start_proxy):
    """12 client addresses, each connecting twice (in two rounds): every connection of one
    address lands on the same backend, the one rendezvous hashing of that address picks, and
    the addresses spread over more than one backend."""
    ups = {t: upstreams(tagged(t)) for t in (b"A", b"B", b"C")}
    addrs = [u.addr for u in ups.values()]
    tag_of = {u.addr: t for t, u in ups.items()}
    proxy = start_proxy(addrs[0], "--connect", addrs[1], "--connect", addrs[2], "--balance", "source",
                        stats=True)
    expected = {src: tag_of[name] for src, name in source_picks(addrs, SOURCES).items()}
    got: dict[str, list[bytes]] = {src: [] for src in SOURCES}
    for _ in range(2):
        for src in SOURCES:
            got[src].append(visit(proxy.port, src))
    assert got == {src: [tag, tag] for src, tag in expected.items()}
    assert len(set(expected.values())) >= 2, expected  # 12 addresses on one backend: 1 in 177147
    proxy.wait_stats(accepted=24, finished=24, live=0)
    counts = {u.addr: 2 * list(expected.values()).count(t) for t, u in ups.items()}
    assert {n: s["connections"] for n, s in by_name(proxy).items()} == counts
    assert metric_lines(proxy, "backend_connections_total") == per_backend(
        "backend_connections_total", counts
    )


@needs_127_x
@pytest.mark.skipif(not _can_bind("::ffff:127.0.0.1"), reason="no IPv6 socket that takes IPv4 "
                    "clients (IPv4-mapped ::ffff:127.0.0.1) on this host")
def test_source_balances_ipv4_clients_of_an_ipv6_listener_by_their_ipv4_address(upstreams, start_proxy):
    """An IPv6 listener (bound to ::ffff:127.0.0.1) sees IPv4 clients as ::ffff:127.0.0.x:
    they are logged so, but balanced by the plain IPv4 address, so each lands on the backend
    an IPv4 listener would send it to."""
    ups = {t: upstreams(tagged(t)) for t in (b"A", b"B", b"C")}
    addrs = [u.addr for u in ups.values()]
    tag_of = {u.addr: t for t, u in ups.items()}
    proxy = start_proxy(addrs[0], "--connect", addrs[1], "--connect", addrs[2], "--balance", "source",
                        listen_host="::ffff:127.0.0.1", stats=True)
    expected = {src: tag_of[name] for src, name in source_picks(addrs, SOURCES).items()}
    for src in SOURCES:
        with connect(proxy.port, src) as client:
            port = client.getsockname()[1]
            assert (src, reached(client)) == (src, expected[src])
            ping(client)
        line = proxy.conn_line(f"[::ffff:{src}]:{port}")
        assert tag_of[line["upstream"]] == expected[src]
    proxy.wait_stats(accepted=len(SOURCES), finished=len(SOURCES))


# -- 4. failover ---------------------------------------------------------------------------------
class Closed:
    """A loopback port bound but not listening: connects to it are refused, and no other
    socket can take the port while this is open."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.addr = hostport(*self.sock.getsockname())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def closed_ports():
    """``make()`` → a Closed port, released at teardown."""
    made: list[Closed] = []

    def make() -> Closed:
        made.append(Closed())
        return made[-1]

    yield make
    for c in made:
        c.close()


def bulk(tag: bytes, down: bytes, got: list[str]) -> Callable[[socket.socket], None]:
    """Upstream mode: send ``tag`` + ``down`` and then EOF, while reading the client's bytes
    until its EOF; the sha256 of what came is appended to ``got``."""

    def handler(conn: socket.socket) -> None:
        sender = send_in_thread(conn, tag + down, shut=True)
        got.append(digest(recv_until_eof(conn, timeout=20)))
        sender.join(20)

    return handler


def test_a_refusing_backend_is_skipped_and_every_client_is_served_intact(upstreams, start_proxy,
                                                                          closed_ports):
    """A, B (a closed port), C in turn: the two clients whose turn is B's go on to C. Each of
    6 clients sends 2 MiB and gets its backend's 2 MiB, both checked by sha256 at both ends;
    B's failures are 2 and nothing else failed."""
    n = 2 << 20
    down = {b"A": payload(n, 101), b"C": payload(n, 103)}
    got = {b"A": [], b"C": []}
    a = upstreams(bulk(b"A", down[b"A"], got[b"A"]))
    dead = closed_ports()
    c = upstreams(bulk(b"C", down[b"C"], got[b"C"]))
    proxy = start_proxy(a.addr, "--connect", dead.addr, "--connect", c.addr, stats=True)
    ups = [payload(n, i) for i in range(6)]
    tags, peers = [], []
    for data in ups:
        with connect(proxy.port) as client:
            peers.append(sockname(client))
            sender = send_in_thread(client, data, shut=True)
            received = recv_until_eof(client, timeout=20)
            sender.join(20)
            assert not sender.is_alive()
        tags.append(received[:1])
        assert digest(received[1:]) == digest(down[received[:1]])
    assert tags == [b"A", b"C", b"C", b"A", b"C", b"C"]
    a.join()
    c.join()
    assert sorted(got[b"A"]) == sorted(digest(ups[i]) for i in (0, 3))
    assert sorted(got[b"C"]) == sorted(digest(ups[i]) for i in (1, 2, 4, 5))
    st = proxy.wait_stats(accepted=6, finished=6, live=0)
    assert (st["failed_connects"], st["refused"], st["refusals"]) == (0, 0, {})
    lines = [proxy.conn_line(p) for p in peers]
    assert [line["upstream"] for line in lines] == [a.addr, c.addr, c.addr, a.addr, c.addr, c.addr]
    assert {(line["up"], line["down"], line["reason"]) for line in lines} == {(str(n), str(n + 1), "EOF")}
    backends = by_name(proxy)
    assert [(s["connections"], s["failures"]) for s in backends.values()] == [(2, 0), (0, 2), (4, 0)]
    assert metric_lines(proxy, "backend_connect_failures_total") == per_backend(
        "backend_connect_failures_total", {a.addr: 0, dead.addr: 2, c.addr: 0}
    )
    assert not a.errors and not c.errors


def test_a_backend_that_times_out_is_skipped_after_connect_timeout(upstreams, start_proxy, blackhole):
    """A blackholed backend first, a live one second, --connect-timeout 0.5: the first client
    waits out the 0.5 s and is served by the live one; the second's turn is the live one's,
    at once. The blackhole's failures are exactly 1, and no client failed."""
    live = upstreams(tagged(b"L"))
    hole = hostport(*blackhole)
    proxy = start_proxy(hole, "--connect", live.addr, "--connect-timeout", "0.5", stats=True)
    waits = []
    for _ in range(2):
        with connect(proxy.port) as client:
            t0 = time.monotonic()
            assert reached(client) == b"L"
            waits.append(time.monotonic() - t0)
            ping(client)
    assert 0.45 <= waits[0] <= 3.0, waits
    st = proxy.wait_stats(accepted=2, finished=2, live=0, connecting=0)
    assert (st["failed_connects"], st["refused"]) == (0, 0)
    backends = by_name(proxy)
    assert [(s["connections"], s["failures"], s["live"]) for s in backends.values()] == [(0, 1, 0), (2, 0, 0)]
    assert metric_lines(proxy, "backend_connect_failures_total") == per_backend(
        "backend_connect_failures_total", {hole: 1, live.addr: 0}
    )
    assert [line["upstream"] for line in proxy.conn_lines()] == [live.addr, live.addr]


# -- 5. every backend down -----------------------------------------------------------------------
def test_every_backend_down_refuses_the_client_as_no_backend(start_proxy, closed_ports):
    """Health checks mark both backends down; a client is then closed at once, without a
    connect to either, logged as refused and counted under the refusal reason no_backend."""
    d1, d2 = closed_ports(), closed_ports()
    proxy = start_proxy(d1.addr, "--connect", d2.addr, "--health-check", "0.1", "--rise", "2",
                        "--fall", "2", stats=True)
    for d in (d1, d2):
        proxy.wait_log(rf"{LOG}WARNING backend {re.escape(d.addr)} is down: 2 checks failed: "
                       r"connection refused$")
    with connect(proxy.port) as client:
        peer = sockname(client)
        refused(client)
    proxy.wait_log(rf"{LOG}WARNING conn 1 {re.escape(peer)}: refused: no backend is up$")
    st = proxy.wait_stats(accepted=1, refused=1)
    assert (st["refusals"], st["failed_connects"], st["finished"], st["live"]) == ({"no_backend": 1}, 0, 0, 0)
    backends = by_name(proxy)
    assert [(s["up"], s["connections"], s["failures"], s["last_error"]) for s in backends.values()] == [
        (False, 0, 0, "connection refused"),
        (False, 0, 0, "connection refused"),
    ]
    assert metric_lines(proxy, "connections_refused_by_reason_total") == [
        'splicepool_connections_refused_by_reason_total{reason="no_backend"} 1'
    ]
    assert metric_lines(proxy, "connections_refused_total") == ["splicepool_connections_refused_total 1"]
    assert metric_lines(proxy, "backend_up") == per_backend("backend_up", {d1.addr: 0, d2.addr: 0})


def test_every_backend_refusing_without_health_checks_is_a_failed_connect(start_proxy, closed_ports):
    """Without health checks both backends count as up: a client tries each (a failure each),
    then is closed, logged with both errors and counted as a failed connect, not a refusal."""
    d1, d2 = closed_ports(), closed_ports()
    proxy = start_proxy(d1.addr, "--connect", d2.addr, stats=True)
    with connect(proxy.port) as client:
        peer = sockname(client)
        refused(client)
    proxy.wait_log(
        rf"{LOG}WARNING conn 1 {re.escape(peer)} -> {re.escape(d1.addr)}, {re.escape(d2.addr)}: "
        rf"upstream connect failed: {re.escape(d1.addr)}: Connection refused; "
        rf"{re.escape(d2.addr)}: Connection refused; client closed$"
    )
    st = proxy.wait_stats(accepted=1, failed_connects=1)
    assert (st["refused"], st["refusals"], st["live"]) == (0, {}, 0)
    assert [(s["up"], s["failures"]) for s in by_name(proxy).values()] == [(True, 1), (True, 1)]
    assert metric_lines(proxy, "connections_refused_by_reason_total") == []


# -- 6. health checks --------------------------------------------------------------------------------
def test_health_checks_take_a_stopped_backend_out_and_back_in(upstreams, start_proxy):
    """--health-check 0.1 --rise 2 --fall 2: B stopped is marked down (logged once, /stats
    up false, backend_up 0) and gets no new connection; B started again on its port is
    marked up (logged once) and takes its turns again."""
    a, b = upstreams(tagged(b"A")), upstreams(tagged(b"B"))
    b_port = b.port
    proxy = start_proxy(a.addr, "--connect", b.addr, "--health-check", "0.1", "--rise", "2",
                        "--fall", "2", stats=True)
    down_line = rf"{LOG}WARNING backend {re.escape(b.addr)} is down: 2 checks failed: connection refused$"
    up_line = rf"{LOG}WARNING backend {re.escape(b.addr)} is up: 2 checks passed$"
    wait_until(lambda: all(s["checks_passed"] >= 2 for s in by_name(proxy).values()), 5,
               "two passed checks of each backend")
    assert [visit(proxy.port) for _ in range(2)] == [b"A", b"B"]

    b.close()
    proxy.wait_log(down_line)
    backends = by_name(proxy)
    assert [s["up"] for s in backends.values()] == [True, False]
    assert backends[b.addr]["last_error"] == "connection refused"
    assert metric_lines(proxy, "backend_up") == per_backend("backend_up", {a.addr: 1, b.addr: 0})
    assert [visit(proxy.port) for _ in range(4)] == [b"A"] * 4
    assert [(s["connections"], s["failures"]) for s in by_name(proxy).values()] == [(5, 0), (1, 0)]

    upstreams(tagged(b"B"), port=b_port)
    proxy.wait_log(up_line)
    assert [s["up"] for s in by_name(proxy).values()] == [True, True]
    assert metric_lines(proxy, "backend_up") == per_backend("backend_up", {a.addr: 1, b.addr: 1})
    assert [visit(proxy.port) for _ in range(4)] == [b"B", b"A", b"B", b"A"]
    st = proxy.wait_stats(accepted=10, finished=10, live=0)
    assert (st["failed_connects"], st["refused"]) == (0, 0)
    assert [(s["connections"], s["failures"]) for s in by_name(proxy).values()] == [(7, 0), (3, 0)]
    log = proxy.log()
    assert len(re.findall(down_line, log, re.M)) == 1
    assert len(re.findall(up_line, log, re.M)) == 1
    assert not re.search(rf"backend {re.escape(a.addr)} is (up|down)", log), log


# -- 7. --allow / --deny ------------------------------------------------------------------------------
@needs_127_x
def test_allow_and_deny_admit_exactly_the_allowed_clients(upstreams, start_proxy):
    """--allow 127.0.0.2/31 --deny 127.0.0.3: 127.0.0.2 is served; 127.0.0.3 (allowed, but
    denied: deny wins) and 127.0.0.4 (not allowed) are closed at once, never reach the
    backend, and are counted under access_list in /stats and /metrics."""
    up = upstreams(tagged(b"U"))
    proxy = start_proxy(up.addr, "--allow", "127.0.0.2/31", "--deny", "127.0.0.3", stats=True)
    verdicts = []
    for i, src in enumerate(["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.2"], 1):
        with connect(proxy.port, src) as client:
            peer = sockname(client)
            if src == "127.0.0.2":
                verdicts.append(reached(client))
                ping(client)
            else:
                refused(client)
                verdicts.append(b"")
                proxy.wait_log(
                    rf"{LOG}INFO conn {i} {re.escape(peer)}: refused: {re.escape(src)} is not allowed "
                    r"\(allow 127\.0\.0\.2/31; deny 127\.0\.0\.3/32\)$"
                )
    assert verdicts == [b"U", b"", b"", b"U"]
    st = proxy.wait_stats(accepted=4, finished=2, refused=2, live=0)
    assert (st["refusals"], st["failed_connects"]) == ({"access_list": 2}, 0)
    assert up.accepted == 2
    assert by_name(proxy)[up.addr]["connections"] == 2
    assert metric_lines(proxy, "connections_refused_by_reason_total") == [
        'splicepool_connections_refused_by_reason_total{reason="access_list"} 2'
    ]
    assert proxy.stats()["routes"]["access"] == "allow 127.0.0.2/31; deny 127.0.0.3/32"


# -- 8. --max-conns-per-client ----------------------------------------------------------------------
@needs_127_x
def test_max_conns_per_client_refuses_the_third_from_one_address_only(upstreams, start_proxy):
    """--max-conns-per-client 2: a third live connection from 127.0.0.2 is refused
    (client_limit) while 127.0.0.3 is served; once one of the two ends, 127.0.0.2 gets a new
    one, and a further one is refused again."""
    up = upstreams(tagged(b"U"))
    proxy = start_proxy(up.addr, "--max-conns-per-client", "2", stats=True)
    limit = r": refused: 127\.0\.0\.2 has 2 connections already \(the limit\)$"
    held: list[socket.socket] = []
    try:
        for _ in range(2):
            held.append(connect(proxy.port, "127.0.0.2"))
            assert reached(held[-1]) == b"U"
        with connect(proxy.port, "127.0.0.2") as third:
            peer = sockname(third)
            refused(third)
        proxy.wait_log(rf"{LOG}INFO conn 3 {re.escape(peer)}{limit}")
        assert visit(proxy.port, "127.0.0.3") == b"U"  # another address: its own count
        for h in held:
            ping(h)  # the two still work

        first = sockname(held[0])
        held.pop(0).close()
        proxy.conn_line(first)  # logged: the loop has let go of its count
        held.append(connect(proxy.port, "127.0.0.2"))
        assert reached(held[-1]) == b"U"
        ping(held[-1])
        with connect(proxy.port, "127.0.0.2") as again:
            peer = sockname(again)
            refused(again)
        proxy.wait_log(rf"{LOG}INFO conn 6 {re.escape(peer)}{limit}")
        st = proxy.wait_stats(accepted=6, refused=2, live=2, finished=2)
        assert (st["refusals"], st["failed_connects"]) == ({"client_limit": 2}, 0)
        assert up.accepted == 4
        assert metric_lines(proxy, "connections_refused_by_reason_total") == [
            'splicepool_connections_refused_by_reason_total{reason="client_limit"} 2'
        ]
    finally:
        for h in held:
            h.close()
    proxy.wait_stats(live=0, finished=4)


# -- 9. usage errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--listen", "127.0.0.1:2"], "--listen given twice: one --listen per proxy"),
        (["--balance", "random"], "argument --balance: invalid choice: 'random'"),
        (["--allow", "10.0.0.1/8"],
         "argument --allow: allow entry '10.0.0.1/8' has host bits set (the network is 10.0.0.0/8)"),
        (["--allow", "example.com"],
         "argument --allow: allow entry 'example.com' is not an IP address or CIDR network"),
        (["--deny", "10.0.0.1/8"],
         "argument --deny: deny entry '10.0.0.1/8' has host bits set (the network is 10.0.0.0/8)"),
        (["--deny", "fe80::1%eth0"],
         "argument --deny: deny entry 'fe80::1%eth0' has a %scope, which entries must not have"),
    ],
    ids=["listen-twice", "balance", "allow-host-bits", "allow-name", "deny-host-bits", "deny-scope"],
)
def test_bad_tier_options_exit_2_naming_what_is_wrong(options, message):
    """A second --listen, an unknown --balance, a bad --allow or --deny entry: exit status 2,
    the usage and one line naming the option and the value, no traceback, nothing started."""
    done = run_cli("--listen", "127.0.0.1:1", "--connect", "127.0.0.1:3", *options, timeout=10)
    assert done.returncode == 2, done
    assert done.stderr.startswith("usage: "), done.stderr
    assert done.stderr.splitlines()[-1].startswith(f"python -m splicepool proxy: error: {message}"), (
        done.stderr
    )
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stderr
    if options[0] == "--balance":
        assert "roundrobin" in done.stderr and "leastconn" in done.stderr and "source" in done.stderr


# -- 10. the console script ----------------------------------------------------------------------------
SCRIPT = Path(sys.executable).parent / "splicepool"


@pytest.mark.skipif(not SCRIPT.exists(), reason=f"no console script {SCRIPT}: run `make install`")
def test_the_splicepool_console_script_runs_the_cli_under_its_own_name():
    """`splicepool proxy --help` (pyproject's [project.scripts]) prints the proxy's help with
    `splicepool` as the program name, and a usage error says `splicepool` too (a missing
    --connect is reported by the top-level parser, as `splicepool: error:`)."""
    done = subprocess.run([str(SCRIPT), "proxy", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: splicepool proxy [-h] [--listen HOST:PORT]"), done.stdout
    for option in ("--balance", "--health-check", "--allow", "--deny", "--max-conns-per-client"):
        assert option in done.stdout, option
    done = subprocess.run([str(SCRIPT), "proxy", "--listen", "127.0.0.1:1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    assert done.returncode == 2, done
    assert done.stderr.splitlines()[-1] == (
        "splicepool proxy: error: --connect is required (on the command line or in the --config file)"
    ), done.stderr


def test_a_server_name_routed_to_two_backends_spreads_its_clients_over_them(upstreams, start_proxy):
    """--sni a.test=A --sni a.test=B: clients whose ClientHello names a.test reach A and B in
    turn, each with its hello delivered whole (the backends echo it: sha256); a hello naming
    another server goes to the default backend."""
    a, b, d = (upstreams(tagged(tag)) for tag in (b"A", b"B", b"D"))
    proxy = start_proxy(d.addr, "--sni", f"a.test={a.addr}", "--sni", f"a.test={b.addr}", stats=True)

    def hello_to(name: str) -> bytes:
        client = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO(),
                                                       server_hostname=name)
        with pytest.raises(ssl.SSLWantReadError):
            client.do_handshake()
        return out.read()

    tags = []
    for name in ("a.test", "a.test", "a.test", "other.test"):
        hello = hello_to(name)
        with connect(proxy.port) as c:
            c.sendall(hello)
            tags.append(reached(c))
            assert digest(recv_exact(c, len(hello))) == digest(hello)
    assert tags == [b"A", b"B", b"A", b"D"]
    assert proxy.stats()["routes"]["sni"] == {"a.test": [a.addr, b.addr]}
