"""Who may speak to the proxy before it reads a byte: ``--proxy-from`` (the peers trusted to
send a PROXY header) and ``--allow``/``--deny`` ahead of an SNI ClientHello. A client that
is refused on its socket address is closed at once, without waiting for (or reading) its
head, and never reaches a backend. Real subprocesses and loopback sockets, as in
test_cli.py; clients bind 127.0.0.2 and 127.0.0.3 to be different addresses."""

from __future__ import annotations

import socket

import test_cli
from conftest import own_processes, recv_until_eof
from test_cli import ping, run_cli

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixtures, shared
start_proxy = test_cli.start_proxy


def client_from(source: str, port: int) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def test_proxy_from_closes_an_untrusted_peer_unread_and_admits_a_trusted_one(upstreams, start_proxy):
    up = upstreams()
    proxy = start_proxy(up.addr, "--accept-proxy", "--proxy-from", "127.0.0.2/32",
                        "--head-timeout", "30", stats=True)
    # untrusted: closed at once (far sooner than --head-timeout), its valid header unread
    bad = client_from("127.0.0.3", proxy.port)
    bad.settimeout(10)
    bad_port = bad.getsockname()[1]
    assert recv_until_eof(bad, timeout=10) == b""
    bad.close()
    proxy.wait_log(
        rf" INFO conn 1 127\.0\.0\.3:{bad_port}: refused: 127\.0\.0\.3 may not send a PROXY header "
        r"\(allow 127\.0\.0\.2/32\)$"
    )
    # trusted: its header is taken off and the carried address is the client's
    good = client_from("127.0.0.2", proxy.port)
    good_port = good.getsockname()[1]
    good.sendall(b"PROXY TCP4 203.0.113.9 127.0.0.1 4000 80\r\n")
    ping(good, b"through the trusted balancer")
    good.shutdown(socket.SHUT_WR)
    assert recv_until_eof(good) == b""
    good.close()
    line = proxy.conn_line(f"203.0.113.9:4000 via 127.0.0.2:{good_port}")
    assert (line["up"], line["down"], line["reason"]) == ("28", "28", "EOF")
    st = proxy.wait_stats(finished=1)
    assert st["refused"] == 1
    assert st["refusals"] == {"untrusted_proxy": 1}
    assert up.accepted == 1  # the untrusted peer never reached the backend
    assert proxy.stats()["routes"]["proxy_from"] == "allow 127.0.0.2/32"


def test_proxy_from_without_accept_proxy_is_refused_at_start():
    done = run_cli("--listen", "127.0.0.1:1", "--connect", "127.0.0.1:2", "--proxy-from", "127.0.0.1/32")
    assert done.returncode == 2, done
    assert "proxy_from (--proxy-from) needs accept_proxy (--accept-proxy)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_denied_client_is_closed_before_its_client_hello_is_awaited(upstreams, start_proxy):
    """With --sni the proxy reads a ClientHello before it routes; a client its access list
    refuses by socket address is closed at once, not after --head-timeout."""
    up = upstreams()
    proxy = start_proxy(up.addr, "--sni", f"a.test={up.addr}", "--deny", "127.0.0.3/32",
                        "--head-timeout", "30", stats=True)
    denied = client_from("127.0.0.3", proxy.port)
    denied_port = denied.getsockname()[1]
    assert recv_until_eof(denied, timeout=10) == b""  # sent nothing, closed anyway
    denied.close()
    proxy.wait_log(
        rf" INFO conn 1 127\.0\.0\.3:{denied_port}: refused: 127\.0\.0\.3 is not allowed "
        r"\(allow all; deny 127\.0\.0\.3/32\)$"
    )
    plain = client_from("127.0.0.2", proxy.port)  # not TLS: to the default backend, intact
    ping(plain, b"GET / HTTP/1.0\r\n\r\n")
    plain.close()
    st = proxy.wait_stats(finished=1)
    assert st["refusals"] == {"access_list": 1}
    assert up.accepted == 1
