"""splicepool.wsgi through the gevent.pywsgi CONNECT example, and under gunicorn's gevent worker.

Every server is a real subprocess on loopback; clients are raw sockets,
http.client's set_tunnel and curl (when installed).
"""

from __future__ import annotations

import hashlib
import http.client
import http.server
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from conftest import free_port, recv_until_eof, tcp_pair, until
from examples_support import (
    Example,
    Transfer,
    connect_tunnel,
    read_head,
)

from splicepool import wsgi

pytest.importorskip("gevent")

MIB = 1 << 20
SCRIPT = "gevent_connect_proxy.py"


class _ExchangeHandler(http.server.BaseHTTPRequestHandler):
    """POST /exchange?down=N: answers N random bytes, with both bodies' SHA-256 in headers."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        down = os.urandom(int(self.path.partition("down=")[2] or 0))
        self.send_response(200)
        self.send_header("Content-Length", str(len(down)))
        self.send_header("X-Upload-SHA256", hashlib.sha256(body).hexdigest())
        self.send_header("X-Download-SHA256", hashlib.sha256(down).hexdigest())
        self.end_headers()
        self.wfile.write(down)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def http_upstream():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ExchangeHandler)
    srv.daemon_threads = True
    t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def proxy():
    ex = Example.script(SCRIPT, "--workers", "2")
    yield ex
    ex.kill()
    assert "Traceback" not in ex.output and "LoopExit" not in ex.output, ex.output


# -- the helper on its own --------------------------------------------------------------
def test_parse_authority_and_allow_rules():
    assert wsgi.parse_authority("127.0.0.1:443") == ("127.0.0.1", 443)
    assert wsgi.parse_authority("[::1]:8080") == ("::1", 8080)
    assert wsgi.parse_authority("example.com:22") == ("example.com", 22)
    for bad in ("example.com", "::1:80", "host:0", "host:99999", ":80", "[::1]80"):
        with pytest.raises(ValueError):
            wsgi.parse_authority(bad)
    assert wsgi.parse_allow(["a:1", "[::1]:*", "*:443", ("b", 2)]) == [
        ("a", "1"), ("::1", "*"), ("*", "443"), ("b", "2")]
    with pytest.raises(ValueError):
        wsgi.parse_allow(["nohost"])


def test_no_socket_is_a_clear_lookup_error():
    with pytest.raises(LookupError) as info:
        wsgi.take_over({"REQUEST_METHOD": "CONNECT", "wsgi.input": None})
    text = str(info.value)
    for place in ("splicepool.socket", "gunicorn.sock", "gunicorn.socket", "rfile).raw._sock"):
        assert place in text, text


def test_importing_the_helper_does_not_import_gevent():
    code = "import sys, splicepool.wsgi; assert 'gevent' not in sys.modules, sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


def test_run_tunnel_with_a_client_that_already_reset_ends_quietly(pool):
    """proxy() raises ENOTCONN for a reset client: run_tunnel closes both and says who went away.

    The WSGI server gets the ordinary end of a taken-over request, not an
    exception (a traceback, and a 500 written into a connection that is gone).
    """
    client_peer, client = tcp_pair()
    upstream, upstream_peer = tcp_pair()
    client_peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client_peer.close()  # RST
    assert select.select([client], [], [], 5)[0] == [client]  # the reset has arrived
    environ: dict = {}
    try:
        assert wsgi.run_tunnel(environ, client, upstream, b"early", pool=pool) == []
        assert environ[wsgi.GONE_KEY] == ("client", "ENOTCONN")
        assert wsgi.PROXY_KEY not in environ
        assert client.fileno() == -1 and upstream.fileno() == -1
        assert recv_until_eof(upstream_peer, 5) == b"early"  # sent on, then the upstream was closed
        assert pool.stats()["live"] == 0
    finally:
        for sock in (client, upstream, upstream_peer):
            sock.close()


# -- through the pywsgi example ----------------------------------------------------------
def test_tunnel_carries_mib_both_ways_raw_socket(proxy, upstream):
    for mode in ("C", "S"):
        sock, status, head, rest = connect_tunnel(proxy.port, upstream.port)
        with sock:
            assert (status, head) == (200, b"HTTP/1.1 200 Connection Established")
            Transfer(upstream, 8 * MIB, 8 * MIB, mode).run(sock, received=rest)


def test_tunnel_with_http_client_set_tunnel(proxy, http_upstream):
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=20)
    conn.set_tunnel("127.0.0.1", http_upstream.server_address[1])
    try:
        for _ in range(2):  # two requests on one tunnel: keep-alive inside it
            up = os.urandom(4 * MIB)
            conn.request("POST", f"/exchange?down={5 * MIB}", body=up)
            resp = conn.getresponse()
            down = resp.read()
            assert resp.status == 200
            assert resp.headers["X-Upload-SHA256"] == hashlib.sha256(up).hexdigest()
            assert resp.headers["X-Download-SHA256"] == hashlib.sha256(down).hexdigest()
            assert len(down) == 5 * MIB
    finally:
        conn.close()


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_tunnel_with_curl(proxy, http_upstream, tmp_path):
    up = os.urandom(3 * MIB)
    (tmp_path / "up").write_bytes(up)
    url = f"http://127.0.0.1:{http_upstream.server_address[1]}/exchange?down={4 * MIB}"
    out = subprocess.run(
        ["curl", "-sS", "--fail", "-p", "-x", f"http://127.0.0.1:{proxy.port}", "--data-binary",
         f"@{tmp_path / 'up'}", "-D", str(tmp_path / "headers"), "-o", str(tmp_path / "down"), url],
        capture_output=True, timeout=30,
    )
    assert out.returncode == 0, out.stderr
    headers = (tmp_path / "headers").read_text().lower()
    down = (tmp_path / "down").read_bytes()
    assert "200 connection established" in headers
    assert f"x-upload-sha256: {hashlib.sha256(up).hexdigest()}" in headers
    assert f"x-download-sha256: {hashlib.sha256(down).hexdigest()}" in headers and len(down) == 4 * MIB


def test_early_data_in_the_connect_packet_reaches_the_upstream(proxy, upstream):
    t = Transfer(upstream, 3000, 2 * MIB)
    early = t.stream[:2000]  # the protocol header and upload bytes, in the same send as the head
    sock, status, _head, rest = connect_tunnel(proxy.port, upstream.port, extra=early)
    with sock:
        assert status == 200
        t.run(sock, sent=len(early), received=rest)


def test_unreachable_target_is_502(proxy):
    sock, status, head, rest = connect_tunnel(proxy.port, free_port())
    with sock:
        assert status == 502, head
        assert b"Connection: close" in head
        assert b"cannot connect" in rest + recv_until_eof(sock, 5)


@pytest.mark.parametrize("target", ["192.0.2.1", "example.com", "10.0.0.1"])
def test_target_outside_the_allow_list_is_403(proxy, upstream, target):
    sock, status, head, _rest = connect_tunnel(proxy.port, 443, host=target)
    with sock:
        assert status == 403, head
        assert recv_until_eof(sock, 5) is not None  # and the connection is closed


def test_allow_option(upstream):
    ex = Example.script(SCRIPT, "--workers", "1", "--allow", f"127.0.0.1:{upstream.port}")
    try:
        sock, status, _head, _rest = connect_tunnel(ex.port, upstream.port + 1 if upstream.port < 65535 else 1)
        sock.close()
        assert status == 403
        sock, status, _head, rest = connect_tunnel(ex.port, upstream.port)
        with sock:
            assert status == 200
            Transfer(upstream, 1000, 1000).run(sock, received=rest)
        sock, status, _head, _rest = connect_tunnel(ex.port, upstream.port, host="::1")
        sock.close()
        assert status == 403  # the rule names 127.0.0.1, not every loopback address
        assert ex.stop(signal.SIGINT) == 0
    finally:
        ex.kill()


def test_bad_target_is_400_and_other_methods_get_a_page_or_405(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(b"CONNECT nonsense HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_head(sock)[0] == 400
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and b"CONNECT" in resp.read()
        conn.request("POST", "/", body=b"x")
        resp = conn.getresponse()
        assert resp.status == 405 and "CONNECT" in resp.headers["Allow"]
        resp.read()
    finally:
        conn.close()


DENIED_BODY = b"method not allowed: use CONNECT\n"


def _denied_line(method: str, target: str, port: int | str) -> str:
    return f" WARNING denied {method} {target} from 127.0.0.1:{port}: 405 Method Not Allowed\n"


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST"])
def test_a_proxied_request_in_absolute_form_is_405_and_logged(proxy, http_upstream, method):
    """``GET http://host/`` is what an HTTP-proxy client sends for http:// URLs: not a page of ours."""
    target = f"http://127.0.0.1:{http_upstream.server_address[1]}/exchange?down=5"
    body = b"x" if method == "POST" else b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        status, head, rest = read_head(sock)
        rest += recv_until_eof(sock, 5)
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 405 Method Not Allowed", head
    assert b"Allow: CONNECT" in lines[1:], head
    assert f"Content-Length: {len(DENIED_BODY)}".encode() in lines[1:], head
    assert rest == (b"" if method == "HEAD" else DENIED_BODY)
    line = _denied_line(method, target, port)
    assert until(lambda: line in proxy.output, 5), proxy.output[-2000:]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_through_the_proxy_without_a_tunnel_is_405(proxy, http_upstream):
    url = f"http://127.0.0.1:{http_upstream.server_address[1]}/exchange"
    out = subprocess.run(["curl", "-sS", "-x", f"http://127.0.0.1:{proxy.port}", "-D", "-", "-o", os.devnull, url],
                         capture_output=True, timeout=30)
    assert out.returncode == 0, out.stderr
    head = out.stdout.split(b"\r\n")
    assert head[0] == b"HTTP/1.1 405 Method Not Allowed", out.stdout
    assert b"Allow: CONNECT" in head, out.stdout
    line = re.compile(re.escape(_denied_line("GET", url, "PORT")).replace("PORT", r"\d+"))
    assert until(lambda: line.search(proxy.output), 5), proxy.output[-2000:]


def test_other_methods_in_origin_form_are_405_and_logged(proxy):
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        port = sock.getsockname()[1]
        sock.sendall(b"DELETE /thing HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        status, head, rest = read_head(sock)
        rest += recv_until_eof(sock, 5)
    assert status == 405 and b"Allow: CONNECT, GET, HEAD" in head.split(b"\r\n"), head
    assert rest == DENIED_BODY
    line = _denied_line("DELETE", "/thing", port)
    assert until(lambda: line in proxy.output, 5), proxy.output[-2000:]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        port = sock.getsockname()[1]  # pywsgi decodes %0A in PATH_INFO: the log line stays one line
        sock.sendall(b"PUT /a%0A2026-01-01%20INFO%20forged HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert read_head(sock)[0] == 405
    line = _denied_line("PUT", "/a\\n2026-01-01 INFO forged", port)
    assert until(lambda: line in proxy.output, 5), proxy.output[-2000:]


def _concurrently(fn, n: int) -> None:
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            fn(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not errors, errors[:3]
    assert not any(t.is_alive() for t in threads)


def test_100_concurrent_tunnels_each_64k_both_ways(proxy, upstream):
    barrier = threading.Barrier(100, timeout=20)

    def tunnel(i: int) -> None:
        sock, status, _head, rest = connect_tunnel(proxy.port, upstream.port)
        with sock:
            assert status == 200
            barrier.wait()  # all 100 tunnels are open at once
            Transfer(upstream, 64 * 1024, 64 * 1024, "CS"[i % 2]).run(sock, received=rest)

    _concurrently(tunnel, 100)


def test_server_answers_while_10_tunnels_are_open(proxy, upstream):
    tunnels = []
    for _ in range(10):
        sock, status, _head, rest = connect_tunnel(proxy.port, upstream.port)
        assert status == 200
        t = Transfer(upstream, 2 * MIB, 4 * MIB)
        sock.sendall(t.stream[:MIB])  # bytes in flight both ways, nobody reading the download yet
        tunnels.append((sock, t, rest))
    try:
        started = time.monotonic()
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read()
        conn.close()
        assert time.monotonic() - started < 4.0  # not held up by the stalled tunnels
    finally:
        _concurrently(lambda i: tunnels[i][1].run(tunnels[i][0], sent=MIB, received=tunnels[i][2]), 10)
        for sock, _t, _rest in tunnels:
            sock.close()


def test_sigterm_with_a_live_tunnel_exits_cleanly(upstream):
    ex = Example.script(SCRIPT, "--workers", "2", "--grace", "0.5")
    try:
        sock, status, _head, _rest = connect_tunnel(ex.port, upstream.port)
        assert status == 200
        sock.sendall(Transfer(upstream, 10, 4 * MIB).stream[:30])  # the upstream sends, we never read
        assert ex.stop(signal.SIGTERM) == 0, ex.output
        sock.settimeout(5)
        try:  # the aborted tunnel is closed: EOF or a reset, never a hang
            while sock.recv(1 << 20):
                pass
        except ConnectionResetError:
            pass
        sock.close()
    finally:
        ex.kill()
    out = ex.output
    assert "stopping: 1 connection(s) open" in out and "stopped" in out, out
    assert "LoopExit" not in out and "Traceback" not in out, out


def test_sigint_exits_cleanly(upstream):
    ex = Example.script(SCRIPT, "--workers", "2")
    try:
        sock, status, _head, rest = connect_tunnel(ex.port, upstream.port)
        with sock:
            Transfer(upstream, 1000, 1000).run(sock, received=rest)
        assert ex.stop(signal.SIGINT) == 0, ex.output
    finally:
        ex.kill()
    assert "stopped" in ex.output
    assert "LoopExit" not in ex.output and "Traceback" not in ex.output, ex.output


# -- under gunicorn's gevent worker ------------------------------------------------------
def test_gunicorn_gevent_worker(upstream):
    pytest.importorskip("gunicorn")
    port = free_port()
    ex = Example(
        [sys.executable, "-m", "gunicorn", "-k", "gevent", "-w", "1", "-b", f"127.0.0.1:{port}",
         "--graceful-timeout", "5", "--chdir", "examples", "gevent_connect_proxy:app"],
    )
    try:
        def answers() -> bool:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    return read_head(s, 2)[0] == 200
            except OSError:
                return False

        assert until(answers, 15), ex.output
        for mode in ("C", "S"):
            t = Transfer(upstream, 6 * MIB, 6 * MIB, mode)
            early = t.stream[: 500 if mode == "C" else 0]
            sock, status, head, rest = connect_tunnel(port, upstream.port, extra=early)
            with sock:
                assert (status, head) == (200, b"HTTP/1.1 200 Connection Established")
                t.run(sock, sent=len(early), received=rest)
        sock, status, _head, _rest = connect_tunnel(port, free_port())
        sock.close()
        assert status == 502
        sock, status, _head, _rest = connect_tunnel(port, 443, host="192.0.2.1")
        sock.close()
        assert status == 403
        assert ex.stop(signal.SIGTERM) == 0, ex.output
    finally:
        ex.kill()
    assert "Traceback" not in ex.output and "Socket error" not in ex.output, ex.output
    assert ex.output.count("reason=EOF") == 2, ex.output  # one log line per tunnel
