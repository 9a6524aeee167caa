"""``python -m splicepool socks``: a SOCKS5 front door (RFC 1928 CONNECT, RFC 1929 user
names), end to end. Real subprocesses, loopback sockets and curl (apt: curl) as the client;
raw clients built with splicepool.socks check each reply code exactly."""

from __future__ import annotations

import hashlib
import http.server
import re
import shutil
import signal
import socket
import subprocess
import threading

import pytest
import test_cli
from conftest import (
    digest,
    free_port,
    own_processes,
    payload,
    recv_exact,
    recv_until_eof,
    wait_until,
)
from test_cli import ProxyProc, _has_ipv6_loopback, wait_listening

from splicepool import socks

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixtures, shared

BLOB = payload(3 << 20, 1928)


@pytest.fixture
def start_socks(tmp_path):
    """``start(*options, stats=True)`` → a ready ``python -m splicepool socks`` on 127.0.0.1."""
    started: list[ProxyProc] = []

    def start(*options: str, stats: bool = True) -> ProxyProc:
        for attempt in range(5):
            port = free_port()
            stats_port = free_port() if stats else None
            args = ["--listen", f"127.0.0.1:{port}", *options]
            if stats_port is not None:
                args += ["--stats-listen", str(stats_port)]
            proxy = ProxyProc(args, tmp_path / f"socks-{len(started)}.log", port, stats_port, command="socks")
            started.append(proxy)
            if wait_listening(proxy, 1, attempt):
                return proxy
        pytest.fail("no free port after 5 attempts")

    yield start
    for proxy in started:
        proxy.kill()


@pytest.fixture
def web():
    """An HTTP server on 127.0.0.1 serving BLOB at /blob (and on [::1] too where it exists):
    ``(ipv4 port, ipv6 port or None)``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
            self.send_response(200)
            self.send_header("Content-Length", str(len(BLOB)))
            self.end_headers()
            self.wfile.write(BLOB)

        def log_message(self, *args: object) -> None:
            pass

    class V6(http.server.ThreadingHTTPServer):
        address_family = socket.AF_INET6

    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)]
    if _has_ipv6_loopback():
        servers.append(V6(("::1", 0), Handler))
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    yield servers[0].server_address[1], (servers[1].server_address[1] if len(servers) > 1 else None)
    for server in servers:
        server.shutdown()
        server.server_close()


def curl(*args: str) -> bytes:
    if shutil.which("curl") is None:
        pytest.skip("curl is missing: apt-get install curl")
    done = subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def ask(port: int, host: str, target_port: int, *, command: int = socks.CONNECT,
        user: tuple[bytes, bytes] | None = None) -> tuple[socket.socket, bytes]:
    """A raw SOCKS5 client: greeting (and credentials), then the request; the socket and the
    reply's first 2 bytes (VER, REP), the rest of the reply read off."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    method = socks.USER_PASSWORD if user else socks.NO_AUTH
    sock.sendall(socks.encode_greeting([method]))
    assert recv_exact(sock, 2) == bytes([5, method])
    if user:
        sock.sendall(socks.encode_credentials(*user))
        status = recv_exact(sock, 2)
        if status != b"\x01\x00":
            return sock, status
    sock.sendall(socks.encode_request(command, host, target_port))
    return sock, read_reply(sock)


def read_reply(sock: socket.socket) -> bytes:
    head = recv_exact(sock, 4)
    atyp = head[3]
    rest = 4 + 2 if atyp == socks.ATYP_IPV4 else 16 + 2 if atyp == socks.ATYP_IPV6 else recv_exact(sock, 1)[0] + 2
    recv_exact(sock, rest)
    return head[:2]


def test_curl_downloads_through_socks5_by_address_and_by_name(start_socks, web):
    """curl --socks5 (the client resolves) and --socks5-hostname (the proxy resolves
    "localhost", trying each address it gives) fetch the same 3 MiB, byte for byte; each
    connection's log line names the target address and counts the bytes."""
    v4, _ = web
    proxy = start_socks()
    want = hashlib.sha256(BLOB).hexdigest()
    for option in ("--socks5", "--socks5-hostname"):
        got = curl(option, f"127.0.0.1:{proxy.port}", f"http://localhost:{v4}/blob", "--ipv4")
        assert hashlib.sha256(got).hexdigest() == want
    lines = wait_until(lambda: len(proxy.conn_lines()) == 2 and proxy.conn_lines(), 5, "2 log lines")
    assert [ln["upstream"] for ln in lines] == [f"127.0.0.1:{v4}"] * 2
    assert all(int(ln["down"]) > len(BLOB) and ln["reason"] == "EOF" for ln in lines), lines
    st = proxy.stats()
    assert st["connections"]["finished"] == 2 and st["connections"]["refusals"] == {}
    assert [(b["name"], b["connections"]) for b in st["backends"]] == [("SOCKS targets", 2)]


def test_an_ipv6_target_by_address(start_socks, web):
    _, v6 = web
    if v6 is None:
        pytest.skip("no IPv6 loopback here")
    proxy = start_socks()
    got = curl("--socks5", f"127.0.0.1:{proxy.port}", f"http://[::1]:{v6}/blob")
    assert digest(got) == digest(BLOB)
    line = wait_until(lambda: proxy.conn_lines(), 5, "the log line")[0]
    assert line["upstream"] == f"[::1]:{v6}"


def test_users_and_passwords_with_curl_and_a_wrong_one_refused(start_socks, web):
    v4, _ = web
    proxy = start_socks("--user", "alice:s3cret", "--user", "bob:pa:ss")
    for cred in ("alice:s3cret", "bob:pa:ss"):
        got = curl("--socks5", f"127.0.0.1:{proxy.port}", "--proxy-user", cred, f"http://127.0.0.1:{v4}/blob")
        assert digest(got) == digest(BLOB)
    sock, status = ask(proxy.port, "127.0.0.1", v4, user=(b"alice", b"wrong"))
    assert status == b"\x01\x01"
    assert recv_until_eof(sock) == b""
    sock.close()
    # a client offering no authentication when it is required: method 0xFF, closed
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(socks.encode_greeting([socks.NO_AUTH]))
        assert recv_exact(sock, 2) == b"\x05\xff"
        assert recv_until_eof(sock) == b""
    peers = [ln["peer"] for ln in wait_until(lambda: len(proxy.conn_lines()) == 2 and proxy.conn_lines(), 5, "2")]
    assert [p.split("@")[0] for p in peers] == ["alice", "bob"]
    proxy.wait_log(r" INFO conn 3 \S+: refused: wrong user name or password \(user alice\)$")
    proxy.wait_log(r" INFO conn 4 \S+: refused: no acceptable SOCKS5 method \(offered 0x00\)$")
    assert proxy.stats()["connections"]["refusals"] == {"socks_auth": 2}


def test_each_failure_gets_its_rfc_1928_reply_code(start_socks, upstreams, blackhole):
    """refused → 0x05; a name that does not resolve → 0x04; a connect timeout → 0x04; BIND →
    0x07; outside --allow-target → 0x02; the proxy's own address → 0x02; each counted."""
    up = upstreams()
    closed = free_port()
    proxy = start_socks("--allow-target", "127.0.0.0/8", "--connect-timeout", "0.5")
    cases = [
        ("127.0.0.1", closed, socks.CONNECT, socks.CONNECTION_REFUSED),
        ("splicepool-test.invalid", 80, socks.CONNECT, socks.HOST_UNREACHABLE),
        (blackhole[0], blackhole[1], socks.CONNECT, socks.HOST_UNREACHABLE),
        ("127.0.0.1", up.port, socks.BIND, socks.COMMAND_NOT_SUPPORTED),
        ("192.0.2.1", 80, socks.CONNECT, socks.NOT_ALLOWED),
        ("127.0.0.1", proxy.port, socks.CONNECT, socks.NOT_ALLOWED),
    ]
    for host, port, command, code in cases:
        sock, reply = ask(proxy.port, host, port, command=command)
        assert reply == bytes([5, code]), (host, port, reply)
        assert recv_until_eof(sock) == b""
        sock.close()
    st = proxy.wait_stats(refused=4, failed_connects=2)
    assert st["refusals"] == {"target_unresolved": 1, "socks_command": 1, "target_not_allowed": 2}
    assert up.accepted == 0


def test_bytes_pipelined_behind_the_request_arrive_first_and_intact(start_socks, upstreams):
    """A client that sends greeting, request and 1 MiB at once (no waiting for replies):
    every byte reaches the target in order (sha256 of the echo) and counts in up=."""
    up = upstreams()
    proxy = start_socks()
    data = payload(1 << 20, 5)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(socks.encode_greeting([socks.NO_AUTH]) + socks.encode_request(socks.CONNECT, "127.0.0.1", up.port)
                     + data[:1000])
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert read_reply(sock) == b"\x05\x00"
        sender = threading.Thread(target=sock.sendall, args=(data[1000:],))
        sender.start()
        assert digest(recv_exact(sock, len(data))) == digest(data)
        sender.join()
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    line = wait_until(lambda: proxy.conn_lines(), 5, "the log line")[0]
    assert (line["up"], line["down"], line["reason"]) == (str(len(data)), str(len(data)), "EOF")


def test_not_socks5_is_refused_and_a_warning_says_targets_are_open(start_socks):
    proxy = start_socks()
    assert re.search(r" WARNING socks: clients may connect to any address but this proxy's own", proxy.log())
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        assert recv_until_eof(sock) == b""
    assert proxy.wait_stats(refused=1)["refusals"] == {"bad_socks": 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "--listen is required"),
        (("--listen", "127.0.0.1:1", "--user", "alice"), "argument --user: 'alice': expected NAME:PASSWORD"),
        (("--listen", "127.0.0.1:1", "--allow-target", "10.0.0.1/8"), "has host bits set"),
        (("--listen", "127.0.0.1:1", "--connect", "127.0.0.1:2"), "unrecognized arguments: --connect"),
    ],
)
def test_socks_usage_errors_exit_2_naming_what_is_wrong(args, message):
    done = test_cli.run_cli(*args, command="socks")
    assert done.returncode == 2, done
    assert message in done.stderr.splitlines()[-1], done.stderr
    assert "Traceback" not in done.stderr


def test_socks_help_has_examples():
    done = test_cli.run_cli("--help", command="socks")
    assert done.returncode == 0, done.stderr
    for option in ("--user", "--allow-target", "--deny-target", "--connect-timeout", "--stats-listen"):
        assert option in done.stdout, option
    assert "python -m splicepool socks --listen 127.0.0.1:1080" in done.stdout


def test_sighup_reloads_users_and_targets_from_the_config_file(start_socks, upstreams, tmp_path):
    """users and --allow-target come from --config; SIGHUP re-reads them: a user removed is
    refused from then on, a new one admitted, a target newly denied gets 0x02."""
    up = upstreams()
    config = tmp_path / "socks.toml"
    config.write_text('user = ["alice:one"]\nallow-target = ["127.0.0.0/8"]\n')
    proxy = start_socks("--config", str(config))
    sock, reply = ask(proxy.port, "127.0.0.1", up.port, user=(b"alice", b"one"))
    assert reply == b"\x05\x00"
    sock.close()
    config.write_text('user = ["bob:two"]\nallow-target = ["10.0.0.0/8"]\n')
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(r" INFO reloaded: proxying to SOCKS5, 1 user\(s\), targets: allow 10\.0\.0\.0/8$")
    sock, status = ask(proxy.port, "127.0.0.1", up.port, user=(b"alice", b"one"))
    assert status == b"\x01\x01"
    sock.close()
    sock, reply = ask(proxy.port, "127.0.0.1", up.port, user=(b"bob", b"two"))
    assert reply == bytes([5, socks.NOT_ALLOWED])
    sock.close()
    assert proxy.wait_stats(refused=2)["refusals"] == {"socks_auth": 1, "target_not_allowed": 1}


def test_behind_a_balancer_the_proxy_header_comes_first_and_names_the_client(start_socks, upstreams):
    """--accept-proxy: a PROXY header, then the SOCKS5 greeting and request in the same
    write; the header is taken off, the log names the client it carries, bytes are exact."""
    up = upstreams()
    proxy = start_socks("--accept-proxy", "--proxy-from", "127.0.0.1/32")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 1080\r\n" + socks.encode_greeting([socks.NO_AUTH])
                     + socks.encode_request(socks.CONNECT, "127.0.0.1", up.port))
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert read_reply(sock) == b"\x05\x00"
        sock.sendall(b"ping")
        assert recv_exact(sock, 4) == b"ping"
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    line = wait_until(lambda: proxy.conn_lines(), 5, "the log line")[0]
    assert line["peer"].startswith("203.0.113.9:4000 via 127.0.0.1:"), line
    assert (line["up"], line["down"], line["upstream"]) == ("4", "4", up.addr)


def test_a_client_that_stops_mid_negotiation_is_cut_at_the_head_timeout(start_socks):
    """Greeting answered, then silence: closed after --head-timeout, the log naming what
    never came (a SOCKS5 request, not a ClientHello), counted as head_timeout."""
    proxy = start_socks("--head-timeout", "0.5")
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(socks.encode_greeting([socks.NO_AUTH]))
        assert recv_exact(sock, 2) == b"\x05\x00"
        assert recv_until_eof(sock) == b""
    proxy.wait_log(r" WARNING conn 1 \S+: refused: no complete SOCKS5 request within 0\.5 s$")
    assert proxy.wait_stats(refused=1)["refusals"] == {"head_timeout": 1}
