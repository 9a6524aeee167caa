"""``python -m splicepool proxy --config FILE.toml`` and reload on SIGHUP, end to end: the CLI
as a real subprocess (one or several processes), real loopback backends, a TOML file the test
rewrites between SIGHUPs. Every check is exact: the bytes by sha256, the backend each
connection went to by its log line, the counters and routes by /stats, the log lines word
for word. Waits end on a log line or a /stats value, each bounded."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import test_cli
from conftest import (
    digest,
    free_port,
    own_processes,
    payload,
    recv_exact,
    wait_until,
)
from test_backends import can_unshare, rewrite_in_place
from test_cli import (
    ProxyProc,
    Upstream,
    hostport,
    http_get,
    ping,
    run_cli,
    sockname,
    wait_listening,
)

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixtures, shared
start_proxy = test_cli.start_proxy

RELOADED = r" INFO reloaded: proxying to "
REFUSED = r" ERROR reload failed, keeping the running configuration: "


# -- helpers -------------------------------------------------------------------------------
def toml_value(value: object) -> str:
    """``value`` as TOML: the few kinds a --config file holds."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a TOML basic string, for the ASCII text used here
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(value)


def write_config(path: Path, options: dict[str, object]) -> None:
    """Write ``options`` as a TOML file, replaced whole (a reload never reads half a file)."""
    text = "".join(f"{key} = {toml_value(value)}\n" for key, value in options.items())
    write_text(path, text)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ConfigProxy(ProxyProc):
    """A proxy started from a --config file; ``fixed`` (its listen and stats addresses) stays
    in every version of the file it is given."""

    def __init__(self, *args, config: Path, fixed: dict[str, object], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.config = config
        self.fixed = fixed

    def rewrite(self, options: dict[str, object]) -> None:
        write_config(self.config, {**self.fixed, **options})

    def reload(self, options: dict[str, object] | None = None, *, count: int = 1) -> str:
        """Rewrite the file (unless ``options`` is None), SIGHUP, wait for the ``count``-th
        "reloaded" line; return its text after "proxying to "."""
        if options is not None:
            self.rewrite(options)
        self.signal(signal.SIGHUP)
        return self.wait_log(RELOADED + r"(.*)$", count=count)[count - 1]

    def refused(self, text: str | None = None, *, count: int = 1) -> str:
        """SIGHUP after writing ``text`` (raw file content); wait for the ``count``-th refusal
        line and return its reason."""
        if text is not None:
            write_text(self.config, text)
        self.signal(signal.SIGHUP)
        return self.wait_log(REFUSED + r"(.*)$", count=count)[count - 1]

    def stats_of(self, index: int) -> dict:
        """/stats of process ``index`` (with --processes: it serves on PORT + index)."""
        assert self.stats_port is not None
        return json.loads(http_get(self.stats_port + index, "/stats"))


@pytest.fixture
def config_proxy(tmp_path):
    """``start(options, *args, processes=, stats=, wrap=)`` → a ConfigProxy started
    with ``--config FILE`` (and ``args``) only: the file holds ``options`` and the listen
    address (and, with ``stats``, the stats port) this fixture picks. Ready means every
    process logged "listening on" (no probe connection: the counters stay exact). A port
    taken between free_port() and bind is retried."""
    started: list[ConfigProxy] = []

    def start(
        options: dict[str, object],
        *args: str,
        processes: int = 1,
        stats: bool = True,
        wrap: list[str] | None = None,
    ) -> ConfigProxy:
        for attempt in range(20):
            port = free_port()
            stats_port = (free_port() if processes == 1 else free_pair()) if stats else None
            fixed: dict[str, object] = {"listen": f"127.0.0.1:{port}"}
            if stats_port is not None:
                fixed["stats-listen"] = f"127.0.0.1:{stats_port}"
            if processes > 1:
                fixed["processes"] = processes
            path = tmp_path / f"config-proxy-{len(started)}.toml"  # start_proxy's are proxy-N
            write_config(path, {**fixed, **options})
            proxy = ConfigProxy(
                ["--config", str(path), *args], tmp_path / f"config-proxy-{len(started)}.log", port,
                stats_port, wrap=wrap, config=path, fixed=fixed,
            )
            started.append(proxy)
            if wait_listening(proxy, processes, attempt):
                return proxy
        pytest.fail("no free ports after 20 attempts")

    yield start
    for proxy in started:
        proxy.kill()


def free_pair() -> int:
    """A port P such that P and P + 1 were free a moment ago (process i serves its stats on
    P + i). Looked for below the ephemeral range: in it, P + 1 is often some connection's
    own port (Linux gives connect() the odd ones, bind() the even ones)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        low = int(f.read().split()[0])
    for _ in range(100):
        port = random.randrange(min(10000, low // 2), low - 1)
        if _free(port) and _free(port + 1):
            return port
    pytest.fail("no two free ports in a row")


def _free(port: int) -> bool:
    """Whether the stats server (SO_REUSEADDR) could bind ``port`` now."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def connect_and_ping(proxy: ProxyProc, data: bytes = b"ping") -> str:
    """One short connection through ``proxy`` (the echo checked); its client address."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as c:
        peer = sockname(c)
        ping(c, data)
    return peer


def upstream_of(proxy: ProxyProc, peer: str) -> str:
    """The backend address the log line of ``peer``'s connection names."""
    line = proxy.conn_line(peer)
    assert line["reason"] == "EOF", line
    return line["upstream"]


def backends_by_name(stats: dict) -> dict[str, dict]:
    return {b["name"]: b for b in stats["backends"]}


def refused_or_closed(sock: socket.socket) -> bool:
    """The proxy closed ``sock`` without proxying it: EOF or a reset, no byte."""
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


class Stream:
    """A long connection through the proxy to a recording echo upstream: ``send(n)`` moves n
    more bytes up and reads their echo back; ``close()`` ends it. The bytes sent, echoed and
    received upstream are kept for exact checks."""

    def __init__(self, proxy: ProxyProc) -> None:
        self.sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        self.peer = sockname(self.sock)
        self.sent = bytearray()
        self.received = bytearray()
        self.seed = 0

    def send(self, n: int) -> None:
        self.seed += 1
        data = payload(n, 1000 + self.seed)
        self.sock.sendall(data)
        self.sent += data
        self.received += recv_exact(self.sock, n, timeout=10)

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
        self.sock.settimeout(10)
        assert self.sock.recv(1) == b""
        self.sock.close()


def recording_echo(log: list[bytes]):
    """Upstream mode: echo every byte and keep what came, appended to ``log`` at EOF."""

    def handler(conn: socket.socket) -> None:
        got = bytearray()
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            got += data
            conn.sendall(data)
        log.append(bytes(got))

    return handler


# -- 1. a config file, the command line over it, bad files ----------------------------------
def test_a_config_file_alone_starts_the_proxy_with_every_option_it_names(upstreams, config_proxy):
    """listen, connect (a list), balance, allow, stats-listen and log-level all from the file,
    nothing on the command line but --config: the start line names both backends, the
    connections alternate between them (roundrobin), /stats shows the file's routes."""
    a, b = upstreams(), upstreams()
    proxy = config_proxy(
        {"connect": [a.addr, b.addr], "balance": "roundrobin", "allow": ["127.0.0.0/8"],
         "log-level": "info", "workers": 1},
    )
    proxy.wait_log(rf" INFO listening on 127\.0\.0\.1:{proxy.port}, proxying to "
                   rf"{re.escape(a.addr)}, {re.escape(b.addr)} \(roundrobin\)$")
    peers = [connect_and_ping(proxy, b"%d" % i) for i in range(4)]
    assert [upstream_of(proxy, p) for p in peers] == [a.addr, b.addr, a.addr, b.addr]
    st = proxy.stats()
    assert st["routes"]["backends"] == [a.addr, b.addr]
    assert (st["routes"]["balance"], st["routes"]["access"]) == ("roundrobin", "allow 127.0.0.0/8")
    assert {n: e["connections"] for n, e in backends_by_name(st).items()} == {a.addr: 2, b.addr: 2}
    assert (a.accepted, b.accepted) == (2, 2)
    assert st["connections"]["reloads"] == 0


def test_the_command_line_wins_and_its_list_replaces_the_files(upstreams, config_proxy):
    """The file says connect [A, B], allow 10.0.0.0/8 (which would refuse 127.0.0.1),
    balance leastconn, max-conns-per-client 1; the command line says --connect C,
    --allow 127.0.0.1/32, --balance source, --max-conns-per-client 3. The command line's
    values are used, and its lists are used instead of the file's, not added to them."""
    a, b, c = upstreams(), upstreams(), upstreams()
    proxy = config_proxy(
        {"connect": [a.addr, b.addr], "allow": ["10.0.0.0/8"], "balance": "leastconn",
         "max-conns-per-client": 1},
        "--connect", c.addr, "--allow", "127.0.0.1/32", "--balance", "source",
        "--max-conns-per-client", "3",
    )
    proxy.wait_log(rf" INFO listening on 127\.0\.0\.1:{proxy.port}, proxying to {re.escape(c.addr)}$")
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(3)]
    try:
        for i, s in enumerate(held):  # 3 at once from one address: the limit is 3, not 1
            ping(s, b"held %d" % i)
    finally:
        for s in held:
            s.close()
    proxy.wait_stats(finished=3, live=0)
    assert {line["upstream"] for line in proxy.conn_lines()} == {c.addr}
    st = proxy.stats()
    assert st["routes"]["backends"] == [c.addr]
    assert st["routes"]["access"] == "allow 127.0.0.1/32"
    assert (st["routes"]["balance"], st["routes"]["max_conns_per_client"]) == ("source", 3)
    assert st["connections"]["refusals"] == {}
    assert (a.accepted, b.accepted, c.accepted) == (0, 0, 3)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('connect = ["127.0.0.1:1"]\nbogus = 1\n',
                     "{path}: bogus: not an option of proxy (see --help; a file may not name "
                     "another --config)", id="unknown key"),
        pytest.param('connect = ["127.0.0.1:1"]\nidle = true\n',
                     "{path}: idle: expected a string or a number, not True", id="bool for a number"),
        pytest.param('connect = ["127.0.0.1:1"]\nmax-conns = [1, 2]\n',
                     "{path}: max-conns: a list, but --max-conns takes one value", id="list for a value"),
        pytest.param('connect = ["127.0.0.1:1"]\nworkers = "two"\n',
                     "{path}: workers: 'two' is not a whole number",
                     id="bad value"),
        pytest.param('connect = "127.0.0.1:1\nidle = 3\n',
                     "{path}: not valid TOML: *(at line 2, column 23)", id="bad TOML"),
    ],
)
def test_a_bad_config_file_exits_2_naming_the_file_and_what_is_wrong(tmp_path, text, message):
    """Each mistake gets one error line naming the file and the key (or the line), exit
    status 2 (a usage error), no traceback, and no proxy started. (``*`` in ``message``:
    the TOML parser's own words, which are Python's to change.)"""
    path = tmp_path / "bad.toml"
    write_text(path, f'listen = "127.0.0.1:{free_port()}"\n' + text)
    done = run_cli("--config", str(path), timeout=10)
    assert done.returncode == 2, done
    expected = r"\S.* error: --config " + r".*".join(map(re.escape, message.format(path=path).split("*")))
    assert re.fullmatch(expected, done.stderr.splitlines()[-1]), done.stderr
    assert "Traceback" not in done.stderr
    assert "listening on" not in done.stderr


# -- 2. SIGHUP: new routes for new connections, live ones keep their backend -----------------
def test_sighup_moves_new_connections_and_a_live_one_keeps_flowing_to_its_backend(
    upstreams, config_proxy
):
    """Start with A and B; a connection on A streams 1 MiB each way; the file now says C only;
    SIGHUP. New connections all go to C; the one on A streams another MiB each way after the
    reload and ends with every byte intact (sha256 at the client and at A) and a log line
    naming A. /stats: one reload, C the only route, A listed as retired while its connection
    lives, gone once it ended."""
    received: list[bytes] = []
    a, b, c = upstreams(recording_echo(received)), upstreams(), upstreams()
    proxy = config_proxy({"connect": [a.addr, b.addr], "workers": 1})
    stream = Stream(proxy)  # the first connection: roundrobin starts at A
    stream.send(1 << 20)
    on_b = connect_and_ping(proxy)
    assert upstream_of(proxy, on_b) == b.addr

    assert proxy.reload({"connect": [c.addr], "workers": 1}) == c.addr
    peers = [connect_and_ping(proxy, b"%d" % i) for i in range(4)]
    assert [upstream_of(proxy, p) for p in peers] == [c.addr] * 4
    st = proxy.stats()
    assert st["connections"]["reloads"] == 1
    assert st["routes"]["backends"] == [c.addr]
    listed = backends_by_name(st)
    assert sorted(listed) == sorted([a.addr, c.addr])  # B had no live connection: gone
    assert (listed[a.addr].get("retired"), listed[a.addr]["live"]) == (True, 1)
    assert (listed[c.addr].get("retired"), listed[c.addr]["connections"]) == (None, 4)

    stream.send(1 << 20)  # the live connection keeps flowing, to A
    stream.close()
    assert digest(stream.received) == digest(stream.sent)
    wait_until(lambda: received, 5, "A to see the stream's EOF")
    assert [digest(r) for r in received] == [digest(stream.sent)]
    line = proxy.conn_line(stream.peer)
    assert (line["upstream"], line["up"], line["down"], line["reason"]) == (
        a.addr, str(2 << 20), str(2 << 20), "EOF")
    proxy.wait_stats(live=0, finished=6, reloads=1)
    st = proxy.stats()
    assert [e["name"] for e in st["backends"]] == [c.addr]
    assert (a.accepted, b.accepted, c.accepted) == (1, 1, 4)


# -- 3. counters carry over ------------------------------------------------------------------
def test_a_backend_still_listed_keeps_its_counters_and_a_removed_one_is_retired_until_it_ends(
    upstreams, config_proxy
):
    """A and B, three short connections (A, B, A) and one held on B; reload to A and C: A is
    the same backend (its connections count goes on from 2), B is shown retired with its
    counts while its connection lives, C starts at 0. Once the held one ends, B is gone."""
    a, b, c = upstreams(), upstreams(), upstreams()
    proxy = config_proxy({"connect": [a.addr, b.addr]})
    peers = [connect_and_ping(proxy, b"x" * 10) for _ in range(3)]
    assert [upstream_of(proxy, p) for p in peers] == [a.addr, b.addr, a.addr]
    held = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        ping(held, b"y" * 100)
        held_peer = sockname(held)
        proxy.wait_stats(live=1, finished=3)
        assert proxy.reload({"connect": [a.addr, c.addr]}) == f"{a.addr}, {c.addr} (roundrobin)"
        st = backends_by_name(proxy.stats())
        assert {n: (e["connections"], e["live"], e.get("retired")) for n, e in st.items()} == {
            a.addr: (2, 0, None), b.addr: (2, 1, True), c.addr: (0, 0, None)}
        assert (st[a.addr]["bytes_up"], st[b.addr]["bytes_up"]) == (20, 10)
        assert (st[b.addr]["live_bytes_up"], st[b.addr]["live_bytes_down"]) == (100, 100)
        peers = [connect_and_ping(proxy, b"z" * 5) for _ in range(3)]
        assert [upstream_of(proxy, p) for p in peers] == [a.addr, c.addr, a.addr]
        st = backends_by_name(proxy.stats())
        assert {n: (e["connections"], e["live"], e.get("retired")) for n, e in st.items()} == {
            a.addr: (4, 0, None), b.addr: (2, 1, True), c.addr: (1, 0, None)}
        assert (st[a.addr]["bytes_up"], st[c.addr]["bytes_up"]) == (30, 5)
        ping(held, b"still B")
    finally:
        held.close()
    line = proxy.conn_line(held_peer)
    assert (line["upstream"], line["up"], line["down"]) == (b.addr, "107", "107")
    proxy.wait_stats(live=0, finished=7)
    st = proxy.stats()
    assert sorted(backends_by_name(st)) == sorted([a.addr, c.addr])
    assert st["connections"]["reloads"] == 1


# -- 4. a bad file on SIGHUP ------------------------------------------------------------------
def test_a_bad_file_on_sighup_is_refused_and_the_old_routes_serve_on(upstreams, config_proxy):
    """A syntax error, an unknown key, a bad value, a backend name that does not resolve,
    a malformed --sni, a backend that is the proxy itself: each SIGHUP logs one error line
    saying why the reload was refused; the reload counter stays at 0, new connections still
    go to A, and the log level the bad file asked for is not taken. A good file after them
    reloads (the refusals wedged nothing)."""
    a, c = upstreams(), upstreams()
    proxy = config_proxy({"connect": [a.addr]})
    path = proxy.config
    head = "".join(f"{k} = {toml_value(v)}\n" for k, v in proxy.fixed.items())
    cases = [
        (f'connect = ["{c.addr}"\n', rf"--config {re.escape(str(path))}: not valid TOML: .*"),
        (f'connect = ["{c.addr}"]\nbogus = 1\n',
         rf"--config {re.escape(str(path))}: bogus: not an option of proxy \(see --help; a file "
         r"may not name another --config\)"),
        (f'connect = ["{c.addr}"]\nidle = "soon"\n',
         rf"--config {re.escape(str(path))}: idle: 'soon' is not a number of seconds"),
        (f'connect = ["{c.addr}", "splicepool-test.invalid:80"]\n',
         r"backend splicepool-test\.invalid:80: .+"),
        (f'connect = ["{c.addr}"]\nsni = ["bad name={c.addr}"]\n',
         rf"--config {re.escape(str(path))}: sni: 'bad name' is not a server name .*"),
        (f'connect = ["127.0.0.1:{proxy.port}"]\nlog-level = "warning"\n',
         rf"127\.0\.0\.1:{proxy.port} is this proxy's own listening address"),
    ]
    for n, (body, why) in enumerate(cases, 1):
        reason = proxy.refused(head + body, count=n)
        assert re.fullmatch(why, reason), (reason, why)
        peer = connect_and_ping(proxy)
        assert upstream_of(proxy, peer) == a.addr  # the conn line is INFO: still logged
        st = proxy.stats()
        assert (st["connections"]["reloads"], st["routes"]["backends"]) == (0, [a.addr])
    assert RELOADED not in proxy.log()
    assert "Traceback" not in proxy.log()
    assert proxy.reload({"connect": [c.addr]}) == c.addr
    assert upstream_of(proxy, connect_and_ping(proxy)) == c.addr
    assert proxy.stats()["connections"]["reloads"] == 1
    assert c.accepted == 1


def test_sighups_in_quick_succession_end_with_the_last_file_in_effect(upstreams, config_proxy):
    """The file is rewritten and SIGHUP sent twice in a row, 0 to 3 ms apart, forty times over;
    each time the second file must be in effect soon after, with no connection or other event
    to wake the proxy: a SIGHUP that arrives while the first reload's thread ends must not wait
    for one (it did: the loop saw that thread still alive, and nothing woke it again)."""
    proxy = config_proxy({"connect": ["127.0.0.1:1000"]})
    for i in range(40):
        proxy.rewrite({"connect": [f"127.0.0.1:{2000 + 2 * i}"]})
        proxy.signal(signal.SIGHUP)
        time.sleep((i % 4) / 1000)  # the gap under test, 0 to 3 ms: no wait for an outcome
        last = f"127.0.0.1:{2001 + 2 * i}"
        proxy.rewrite({"connect": [last]})
        proxy.signal(signal.SIGHUP)
        wait_until(lambda last=last: proxy.stats()["routes"]["backends"] == [last], 3,
                   f"round {i}: {last} in effect")
    assert proxy.stats()["connections"]["accepted"] == 0  # nothing but the signals woke it
    assert REFUSED not in proxy.log()


# -- 5. options a reload cannot change ------------------------------------------------------
def test_a_changed_listen_or_workers_is_warned_about_and_the_rest_applied(upstreams, config_proxy):
    """The file changes listen, workers and grace (which need a restart) and connect (which
    does not): one warning per restart-only option, naming it, on every reload while the file
    differs from what runs; the new backend is used; the proxy listens where it did."""
    a, c = upstreams(), upstreams()
    proxy = config_proxy({"connect": [a.addr], "workers": 1, "grace": 5})
    elsewhere = free_port()
    changed = {"listen": f"127.0.0.1:{elsewhere}", "connect": [c.addr], "workers": 2, "grace": 1}
    for n in (1, 2):
        write_config(proxy.config, {**proxy.fixed, **changed})
        assert proxy.reload(count=n) == c.addr
        for name in ("grace", "listen", "workers"):
            proxy.wait_log(rf" WARNING reload: --{name} changed; it takes effect when the proxy is "
                           r"restarted$", count=n)
    warnings = re.findall(r" WARNING (.*)$", proxy.log(), re.MULTILINE)
    assert warnings == [f"reload: --{name} changed; it takes effect when the proxy is restarted"
                        for name in ("grace", "listen", "workers")] * 2
    assert upstream_of(proxy, connect_and_ping(proxy)) == c.addr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", elsewhere), timeout=5).close()
    st = proxy.stats()
    assert (st["connections"]["reloads"], len(st["pool"]["workers"])) == (2, 1)


# -- 6. what a reload changes --------------------------------------------------------------
def client_from(source: str, port: int) -> socket.socket:
    """A connection to the proxy on 127.0.0.1:``port`` from loopback address ``source``."""
    s = socket.socket()
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def test_reload_applies_allow_deny_and_the_per_client_limit(upstreams, config_proxy):
    """deny 127.0.0.1 refuses a client from 127.0.0.1 (and one from 127.0.0.2 is proxied);
    then allow 127.0.0.2 only does the same the other way round; then a limit of 1 per
    client refuses a second connection from one address but not one from another. Each
    refusal is logged and counted by reason; the routes in /stats say what is in effect."""
    a = upstreams()
    proxy = config_proxy({"connect": [a.addr]})
    expected = {"access_list": 0, "client_limit": 0}

    def refused(source: str, why: str, detail: str) -> None:
        with client_from(source, proxy.port) as s:
            peer = sockname(s)
            assert refused_or_closed(s)
        expected[why] += 1
        proxy.wait_log(rf" INFO conn \d+ {re.escape(peer)}: refused: {re.escape(detail)}$")
        assert proxy.stats()["connections"]["refusals"] == {k: v for k, v in expected.items() if v}

    def proxied(source: str) -> None:
        with client_from(source, proxy.port) as s:
            ping(s)

    proxy.reload({"connect": [a.addr], "deny": ["127.0.0.1/32"]})
    assert proxy.stats()["routes"]["access"] == "allow all; deny 127.0.0.1/32"
    refused("127.0.0.1", "access_list", "127.0.0.1 is not allowed (allow all; deny 127.0.0.1/32)")
    proxied("127.0.0.2")

    proxy.reload({"connect": [a.addr], "allow": ["127.0.0.2/32"]}, count=2)
    refused("127.0.0.1", "access_list", "127.0.0.1 is not allowed (allow 127.0.0.2/32)")
    proxied("127.0.0.2")

    proxy.reload({"connect": [a.addr], "max-conns-per-client": 1}, count=3)
    st = proxy.stats()
    assert (st["routes"]["access"], st["routes"]["max_conns_per_client"]) == ("", 1)
    with client_from("127.0.0.1", proxy.port) as held:
        ping(held)
        refused("127.0.0.1", "client_limit", "127.0.0.1 has 1 connections already (the limit)")
        proxied("127.0.0.2")
        ping(held)
    proxy.wait_stats(live=0, finished=4, refused=3, reloads=3)
    proxied("127.0.0.1")  # its first one ended: room again
    assert a.accepted == 5


def test_reload_applies_idle_and_max_conns_to_new_connections_only(upstreams, config_proxy):
    """idle 0.3 s: a silent connection made after the reload is cut (IDLE) while one made
    before it, just as silent, lives on. max-conns 1: with that one live, the next waits in
    the backlog (never accepted while the loop turns) until it ends."""
    a = upstreams()
    proxy = config_proxy({"connect": [a.addr]})
    before = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
    try:
        ping(before)
        proxy.reload({"connect": [a.addr], "idle": 0.3})
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as silent:
            peer = sockname(silent)
            ping(silent)
            line = proxy.conn_line(peer)
        assert (line["up"], line["down"], line["reason"]) == ("4", "4", "IDLE")
        ping(before, b"older than the reload")
        proxy.reload({"connect": [a.addr], "idle": 0.3, "max-conns": 1}, count=2)
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as waiting:
            for turn in (1, 2):  # two turns of the loop: it would have accepted by now
                proxy.signal(signal.SIGUSR1)
                proxy.wait_log(r" WARNING SIGUSR1 received: ignored$", count=turn)
            st = proxy.stats()["connections"]
            assert (st["accepted"], st["live"]) == (2, 1)
            ping(before, b"still")
            before.close()
            ping(waiting, b"accepted once the other ended")
        proxy.wait_stats(accepted=3, finished=3, live=0)
    finally:
        before.close()
    assert [line["reason"] for line in proxy.conn_lines()] == ["IDLE", "EOF", "EOF"]


def test_reload_applies_the_connect_timeout(upstreams, config_proxy, blackhole):
    """connect-timeout 30 at start; the reload says 0.5 and a backend whose accept queue is
    full (the kernel drops further SYNs: its connects hang): a client is closed after about
    0.5 s, not 30, with the timeout logged."""
    a = upstreams()
    hole = hostport(*blackhole)
    proxy = config_proxy({"connect": [a.addr], "connect-timeout": 30})
    assert proxy.reload({"connect": [hole], "connect-timeout": 0.5}) == hole
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        t0 = time.monotonic()
        assert refused_or_closed(client)
        waited = time.monotonic() - t0
    assert 0.4 <= waited <= 3.0, waited
    proxy.wait_log(rf" WARNING conn 1 \S+ -> {re.escape(hole)}: upstream connect "
                   r"failed: connect timed out; client closed$")
    st = proxy.wait_stats(failed_connects=1)
    assert (st["accepted"], st["live"], st["finished"], st["reloads"]) == (1, 0, 0, 1)


def test_reload_applies_the_log_level(upstreams, config_proxy):
    """info → debug: a /stats request is logged (a DEBUG line) where before it was not;
    debug → warning: a connection's INFO line and the reload's own INFO line are not."""
    a = upstreams()
    proxy = config_proxy({"connect": [a.addr]})
    proxy.stats()
    assert " DEBUG " not in proxy.log()
    proxy.reload({"connect": [a.addr], "log-level": "debug"})
    proxy.stats()
    proxy.wait_log(r' DEBUG stats: 127\.0\.0\.1:\d+ "GET /stats HTTP/1\.1" 200$')
    proxy.rewrite({"connect": [a.addr], "log-level": "warning"})
    proxy.signal(signal.SIGHUP)
    wait_until(lambda: proxy.stats()["connections"]["reloads"] == 2, 5, "the second reload")
    connect_and_ping(proxy)
    proxy.wait_stats(finished=1, reloads=2)
    proxy.signal(signal.SIGUSR1)  # a WARNING after the connection's end: the log is written up to it
    proxy.wait_log(r" WARNING SIGUSR1 received: ignored$")
    log = proxy.log()
    assert len(re.findall(RELOADED, log)) == 1
    assert proxy.conn_lines() == []
    after = log.split(RELOADED, 1)[1].split("\n", 1)[1]
    levels = re.findall(r"^\S+ \S+ \d+ (\w+) ", after, re.MULTILINE)
    # /stats requests (DEBUG) until the second reload, then nothing below WARNING
    assert (set(levels[:-1]), levels[-1]) == ({"DEBUG"}, "WARNING"), levels


# -- 7. --processes: the supervisor passes SIGHUP on -----------------------------------------
def reload_lines(proxy: ProxyProc) -> dict[int, list[str]]:
    """The "reloaded" lines by the pid that logged them."""
    found: dict[int, list[str]] = {}
    for pid, text in re.findall(r"^\S+ \S+ (\d+) INFO reloaded: proxying to (.*)$", proxy.log(), re.M):
        found.setdefault(int(pid), []).append(text)
    return found


def conns_until_both(proxy: ProxyProc, pids: set[int], limit: int = 200) -> list[dict[str, str]]:
    """Short connections until each of ``pids`` has logged one (SO_REUSEPORT spreads them by a
    hash of the client's port); the conn lines they made."""
    before = len(proxy.conn_lines())
    for i in range(limit):
        connect_and_ping(proxy, b"%d" % i)
        wait_until(lambda n=before + i + 1: len(proxy.conn_lines()) >= n, 5, "the conn line")
        lines = proxy.conn_lines()[before:]
        if {int(line["pid"]) for line in lines} >= pids:
            return lines
    pytest.fail(f"{limit} connections never reached every one of {pids}")


def test_sighup_to_the_supervisor_reloads_every_child(upstreams, config_proxy):
    """--processes 2 from the file: SIGHUP to the parent is passed on; each child logs its
    own reload; afterwards connections served by both children go to C only, and each
    child's /stats (PORT and PORT+1) counts one reload and lists C."""
    a, c = upstreams(), upstreams()
    proxy = config_proxy({"connect": [a.addr], "workers": 1}, processes=2)
    children = {int(p) for p in re.findall(r"^\S+ \S+ (\d+) INFO listening on ", proxy.log(), re.M)}
    assert len(children) == 2 and proxy.pid not in children
    proxy.rewrite({"connect": [c.addr], "workers": 1})
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(rf"^\S+ \S+ {proxy.pid} INFO SIGHUP: 2 process\(es\) reload$")
    proxy.wait_log(RELOADED, count=2)
    assert reload_lines(proxy) == {pid: [c.addr] for pid in children}
    lines = conns_until_both(proxy, children)
    assert {line["upstream"] for line in lines} == {c.addr}
    assert a.accepted == 0 and c.accepted == len(lines)
    for index in (0, 1):
        st = proxy.stats_of(index)
        assert (st["connections"]["reloads"], st["routes"]["backends"]) == (1, [c.addr])
    assert sum(proxy.stats_of(i)["connections"]["finished"] for i in (0, 1)) == len(lines)


def test_a_child_started_after_a_reload_serves_the_reloaded_file(upstreams, config_proxy):
    """A child that dies after a reload is replaced; the replacement must serve what its
    sibling serves (the file of the last reload they took, C), not the file the parent read
    at its start (A): else one port would split connections between the old and the new
    configuration. A later file both children refused (a backend that is the proxy itself)
    is not the replacement's either: it could not even start with it."""
    a, c = upstreams(), upstreams()
    proxy = config_proxy({"connect": [a.addr], "workers": 1}, processes=2)
    first = [int(p) for p in re.findall(r"^\S+ \S+ (\d+) INFO listening on ", proxy.log(), re.M)]
    proxy.rewrite({"connect": [c.addr], "workers": 1})
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(RELOADED, count=2)
    proxy.rewrite({"connect": [f"127.0.0.1:{proxy.port}"], "workers": 1})
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(REFUSED + rf"127\.0\.0\.1:{proxy.port} is this proxy's own listening address$",
                   count=2)
    os.kill(first[0], signal.SIGKILL)
    proxy.wait_log(r" INFO listening on ", count=3)
    new = int(re.findall(r"^\S+ \S+ (\d+) INFO listening on ", proxy.log(), re.M)[2])
    proxy.wait_log(rf"^\S+ \S+ {new} INFO listening on 127\.0\.0\.1:{proxy.port}, proxying to "
                   rf"{re.escape(c.addr)}$")
    lines = conns_until_both(proxy, {first[1], new})
    assert {line["upstream"] for line in lines} == {c.addr}
    assert a.accepted == 0
    assert [proxy.stats_of(i)["routes"]["backends"] for i in (0, 1)] == [[c.addr]] * 2
    assert proxy.proc.poll() is None


# -- 8. names resolved again: --resolve-every, and on reload ----------------------------------
NAME = "splicepool-test.invalid"


def name_backends(upstreams) -> tuple[int, Upstream, Upstream]:
    """A port P and echo upstreams on 127.0.0.2:P and 127.0.0.3:P (one backend name, two
    addresses over time)."""
    for _ in range(20):
        port = free_port("127.0.0.2")
        try:
            return port, upstreams(host="127.0.0.2", port=port), upstreams(host="127.0.0.3", port=port)
        except OSError:  # taken meanwhile, on either address
            continue
    pytest.fail("no port free on both 127.0.0.2 and 127.0.0.3")


def private_hosts(tmp_path: Path, address: str) -> tuple[Path, list[str]]:
    """An /etc/hosts giving NAME ``address``, and the command prefix that runs the proxy with
    it bind-mounted over /etc/hosts in a private mount namespace (the resolver untouched)."""
    reason = can_unshare()
    if reason:
        pytest.skip(f"needs a user and mount namespace for a private /etc/hosts: {reason}")
    hosts = tmp_path / "hosts"
    hosts.write_text(f"{address} {NAME}\n")
    wrap = ["unshare", "-rm", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"', str(hosts)]
    return hosts, wrap


def test_resolve_every_moves_new_connections_to_the_new_address(upstreams, config_proxy, tmp_path):
    """NAME → 127.0.0.2, then (/etc/hosts rewritten in place) 127.0.0.3: with --resolve-every 0.2
    the proxy logs the change, /stats shows the new address and new connections go there,
    while a connection made before keeps its address. The resolver runs on after a reload."""
    port, two, three = name_backends(upstreams)
    hosts, wrap = private_hosts(tmp_path, "127.0.0.2")
    backend = f"{NAME}:{port}"
    proxy = config_proxy({"connect": [backend], "resolve-every": 0.2}, wrap=wrap)
    proxy.wait_log(rf" INFO listening on 127\.0\.0\.1:{proxy.port}, proxying to "
                   rf"{re.escape(backend)} \(127\.0\.0\.2:{port}\)$")
    assert upstream_of(proxy, connect_and_ping(proxy)) == f"127.0.0.2:{port}"
    assert backends_by_name(proxy.stats())[backend]["addresses"] == [f"127.0.0.2:{port}"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as before:
        ping(before)
        rewrite_in_place(hosts, f"127.0.0.3 {NAME}\n")
        proxy.wait_log(rf" INFO backend {re.escape(backend)} now resolves to 127\.0\.0\.3:{port}$")
        assert backends_by_name(proxy.stats())[backend]["addresses"] == [f"127.0.0.3:{port}"]
        peers = [connect_and_ping(proxy) for _ in range(3)]
        assert [upstream_of(proxy, p) for p in peers] == [f"127.0.0.3:{port}"] * 3
        ping(before, b"made before the change")
        before_peer = sockname(before)
    assert upstream_of(proxy, before_peer) == f"127.0.0.2:{port}"
    assert (two.accepted, three.accepted) == (2, 3)

    assert proxy.reload({"connect": [backend], "resolve-every": 0.2}) == f"{backend} (127.0.0.3:{port})"
    rewrite_in_place(hosts, f"127.0.0.2 {NAME}\n")
    proxy.wait_log(rf" INFO backend {re.escape(backend)} now resolves to 127\.0\.0\.2:{port}$")
    assert upstream_of(proxy, connect_and_ping(proxy)) == f"127.0.0.2:{port}"
    assert backends_by_name(proxy.stats())[backend]["addresses"] == [f"127.0.0.2:{port}"]


def test_a_reload_resolves_the_names_again(upstreams, config_proxy, tmp_path):
    """Without --resolve-every, --help says names are resolved "only at start and on reload":
    NAME → 127.0.0.2, then 127.0.0.3 in /etc/hosts, SIGHUP with the same file; the backend
    (kept, with its counters) must have the new address: the reload line names it, /stats
    lists it, new connections go there."""
    port, two, three = name_backends(upstreams)
    hosts, wrap = private_hosts(tmp_path, "127.0.0.2")
    backend = f"{NAME}:{port}"
    proxy = config_proxy({"connect": [backend]}, wrap=wrap)
    assert upstream_of(proxy, connect_and_ping(proxy)) == f"127.0.0.2:{port}"
    rewrite_in_place(hosts, f"127.0.0.3 {NAME}\n")
    assert proxy.reload() == f"{backend} (127.0.0.3:{port})"
    entry = backends_by_name(proxy.stats())[backend]
    assert (entry["addresses"], entry["connections"]) == ([f"127.0.0.3:{port}"], 1)
    assert upstream_of(proxy, connect_and_ping(proxy)) == f"127.0.0.3:{port}"
    assert (two.accepted, three.accepted) == (1, 1)
    # A name that stops resolving: the reload is refused, the old address kept.
    rewrite_in_place(hosts, f"127.0.0.3 other-{NAME}\n")
    reason = proxy.refused()
    assert re.fullmatch(rf"backend {re.escape(backend)}: .+", reason), reason
    assert upstream_of(proxy, connect_and_ping(proxy)) == f"127.0.0.3:{port}"
    assert proxy.stats()["connections"]["reloads"] == 1


# -- 9. signals that do not reload ----------------------------------------------------------------
def test_sighup_without_config_and_sigusr1_change_nothing(upstreams, config_proxy, start_proxy):
    """Without --config, SIGHUP logs exactly "reload: no --config file to read again;
    ignored" (a WARNING) and counts no reload; SIGUSR1 logs "SIGUSR1 received: ignored",
    also with --config, where it must not reload: the file is rewritten to C first, and new
    connections still go to A."""
    a, c = upstreams(), upstreams()
    plain = start_proxy(a.addr, stats=True)
    plain.signal(signal.SIGHUP)
    plain.wait_log(r" WARNING reload: no --config file to read again; ignored$")
    plain.signal(signal.SIGUSR1)
    plain.wait_log(r" WARNING SIGUSR1 received: ignored$")
    st = plain.stats()
    assert (st["connections"]["reloads"], st["routes"]["backends"]) == (0, [a.addr])
    assert upstream_of(plain, connect_and_ping(plain)) == a.addr
    assert re.findall(r" (WARNING|ERROR) (.*)$", plain.log(), re.MULTILINE) == [
        ("WARNING", "reload: no --config file to read again; ignored"),
        ("WARNING", "SIGUSR1 received: ignored"),
    ]

    proxy = config_proxy({"connect": [a.addr]})
    proxy.rewrite({"connect": [c.addr]})
    proxy.signal(signal.SIGUSR1)
    proxy.wait_log(r" WARNING SIGUSR1 received: ignored$")
    assert upstream_of(proxy, connect_and_ping(proxy)) == a.addr
    st = proxy.stats()
    assert (st["connections"]["reloads"], st["routes"]["backends"]) == (0, [a.addr])
    assert RELOADED not in proxy.log()
    assert proxy.reload() == c.addr  # the file itself was fine: SIGHUP takes it


def test_help_says_what_sighup_does():
    """--help describes the reload, not "no reload yet"."""
    done = run_cli("--help")
    assert done.returncode == 0, done.stderr
    text = " ".join(done.stdout.split())
    assert "no reload yet" not in text
    assert "SIGHUP re-reads --config and the command line" in text
    assert "Without --config, SIGHUP is logged and ignored; SIGUSR1 always is." in text
    assert "the parent forwards SIGINT/SIGTERM/SIGHUP to the children" in text
    assert "names are resolved at start, on each reload and every --resolve-every seconds" in text
