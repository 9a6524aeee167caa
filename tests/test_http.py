"""``python -m splicepool http``: the HTTP/1.1 reverse proxy, end to end. Real subprocesses,
loopback sockets, nginx (apt: nginx-light) as the upstream and curl (apt: curl) as the
client; raw clients and raw upstreams where a test needs exact bytes on the wire (odd chunk
sizes, a body cut short, a stale keep-alive connection, an upgrade)."""

from __future__ import annotations

import http.client
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time

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
from test_cli import ProxyProc, wait_listening

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixture, shared

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None)
CURL = shutil.which("curl")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed: apt-get install nginx-light")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed: apt-get install curl")

pytest.importorskip("h11", reason="the HTTP front door needs h11: pip install 'splicepool[http]'")

SIZES = {"0b": 0, "1b": 1, "64k": 64 << 10, "10m": 10 << 20, "100m": 100 << 20}
# The access line of one exchange: conn ID PEER -> UPSTREAM "REQUEST LINE" STATUS up= down=
HTTP_LINE = re.compile(
    r'^\S+ \S+ \d+ (?P<level>[A-Z]+) conn (?P<id>\d+) (?P<peer>\S+(?: via \S+)?) -> (?P<upstream>\S+) '
    r'"(?P<request>[^"]*)" (?P<status>\S+) up=(?P<up>\d+) down=(?P<down>\d+) duration=[\d.]+s'
    r'(?: error=(?P<error>.*))?$',
    re.MULTILINE,
)


# -- peers ---------------------------------------------------------------------------------
class Nginx:
    """nginx as the upstream: static files, WebDAV PUT (uploads land as files), a 204, gzip."""

    def __init__(self, root) -> None:
        self.root = root
        www = root / "www"
        (www / "up").mkdir(parents=True)
        (www / "gz").mkdir()
        self.files = {}
        for name, size in SIZES.items():
            data = payload(size, size + 7)
            (www / name).write_bytes(data)
            self.files[name] = data
        text = b"".join(b"line %d of a text that gzip makes chunked\n" % i for i in range(40000))
        (www / "gz" / "text.txt").write_bytes(text)
        self.files["text"] = text
        (root / "tmp").mkdir()
        self.port = free_port()
        conf = root / "nginx.conf"
        conf.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
error_log {root}/error.log;
pid {root}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {root}/tmp;
  proxy_temp_path {root}/tmp;
  fastcgi_temp_path {root}/tmp;
  uwsgi_temp_path {root}/tmp;
  scgi_temp_path {root}/tmp;
  keepalive_requests 100000;
  server {{
    listen 127.0.0.1:{self.port};
    root {www};
    location /up/ {{
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 512m;
      client_body_buffer_size 1m;
    }}
    location = /nocontent {{ return 204; }}
    location /gz/ {{ gzip on; gzip_min_length 1; gzip_types text/plain; }}
  }}
}}
""")
        self.log = open(root / "nginx.out", "wb")
        self.proc = subprocess.Popen([NGINX, "-c", str(conf), "-p", str(root)], stdout=self.log,
                                     stderr=self.log, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(root / 'error.log').read_text()}") from None
                time.sleep(0.02)  # the poll interval: the wait ends on the first connect
        self.addr = f"127.0.0.1:{self.port}"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed: apt-get install nginx-light")
    ng = Nginx(tmp_path_factory.mktemp("nginx"))
    yield ng
    ng.close()


@pytest.fixture
def start_http(tmp_path):
    """``start(*options, connect=ADDR, stats=True)`` → a ready ``python -m splicepool http``."""
    started: list[ProxyProc] = []

    def start(*options: str, connect: str | None = None, stats: bool = True) -> ProxyProc:
        for attempt in range(5):
            port = free_port()
            stats_port = free_port() if stats else None
            args = ["--listen", f"127.0.0.1:{port}", *options]
            if connect is not None:
                args += ["--connect", connect]
            if stats_port is not None:
                args += ["--stats-listen", str(stats_port)]
            proxy = ProxyProc(args, tmp_path / f"http-{len(started)}.log", port, stats_port, command="http")
            started.append(proxy)
            if wait_listening(proxy, 1, attempt):
                return proxy
        pytest.fail("no free port after 5 attempts")

    yield start
    for proxy in started:
        proxy.kill()
        assert "Traceback" not in proxy.log(), proxy.log()


def lines(proxy: ProxyProc) -> list[dict[str, str]]:
    return [m.groupdict() for m in HTTP_LINE.finditer(proxy.log())]


def wait_lines(proxy: ProxyProc, count: int, timeout: float = 10.0) -> list[dict[str, str]]:
    return wait_until(lambda: (found := lines(proxy)) and len(found) >= count and found, timeout,
                      f"{count} access lines in the log:\n{proxy.log()}")


def curl(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
    return subprocess.run([CURL, "-sS", "--max-time", str(timeout - 5), *args], capture_output=True,
                          timeout=timeout)


class _Unclosable:
    """One buffered reader shared by the responses read from one connection, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.fp = sock.makefile("rb")

    def makefile(self, *_args: object, **_kwargs: object) -> _Unclosable:
        return self

    def __getattr__(self, name: str):
        return getattr(self.fp, name)

    def close(self) -> None:
        pass


def read_response(reader: _Unclosable, method: str = "GET") -> tuple[http.client.HTTPResponse, bytes]:
    """The next response on the connection (the stdlib's client parses it: not ours)."""
    resp = http.client.HTTPResponse(reader, method=method)  # type: ignore[arg-type]
    resp.begin()
    return resp, resp.read()


def request(method: str, path: str, headers: dict[str, str] | None = None, body: bytes = b"",
            version: str = "1.1") -> bytes:
    fields = {"Host": "test", **(headers or {})}
    if body and "Transfer-Encoding" not in fields:
        fields.setdefault("Content-Length", str(len(body)))
    head = f"{method} {path} HTTP/{version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    return head.encode() + b"\r\n" + body


def connect(proxy: ProxyProc) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    return sock


# -- bodies through nginx ------------------------------------------------------------------
@needs_nginx
@needs_curl
def test_bodies_of_every_size_over_one_keepalive_connection(nginx, start_http):
    """0 B, 1 B, 64 KiB, 10 MiB and 100 MiB over one client connection, byte-exact; the
    upstream connection is kept and reused between them."""
    proxy = start_http(connect=nginx.addr)
    names = ["0b", "1b", "64k", "10m", "100m"]
    got = curl(*(f"http://127.0.0.1:{proxy.port}/{n}" for n in names))
    assert got.returncode == 0, got.stderr
    want = b"".join(nginx.files[n] for n in names)
    assert digest(got.stdout) == digest(want)
    found = wait_lines(proxy, 5)
    assert [f["request"] for f in found] == [f"GET /{n} HTTP/1.1" for n in names]
    assert {f["id"] for f in found} == {found[0]["id"]}  # one client connection
    assert [f["status"] for f in found] == ["200"] * 5
    conns = proxy.wait_stats(finished=1, live=0)
    assert conns["accepted"] == 1 and conns["bytes_down"] > len(want)
    http_st = proxy.stats()["http"]
    assert http_st["requests"] == 5
    assert http_st["responses"] == {"2xx": 5}
    assert http_st["upstream_reused"] == 4  # one upstream connection for the five


@needs_nginx
@needs_curl
def test_chunked_response_from_nginx_gzip(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    url = f"http://127.0.0.1:{proxy.port}/gz/text.txt"
    raw = curl("--raw", "-H", "Accept-Encoding: gzip", "-D", "-", url)
    assert raw.returncode == 0, raw.stderr
    assert b"transfer-encoding: chunked" in raw.stdout.lower()
    got = curl("--compressed", url, url)
    assert digest(got.stdout) == digest(nginx.files["text"] * 2)


@needs_nginx
@needs_curl
@pytest.mark.parametrize("how", ["length", "chunked", "expect"])
def test_uploads_reach_nginx_byte_exact(nginx, start_http, tmp_path, how):
    """PUT bodies (Content-Length, chunked, and Expect: 100-continue) land in nginx's files
    exactly as sent."""
    proxy = start_http(connect=nginx.addr)
    body = payload((7 << 20) + 13, len(how))
    src = tmp_path / "body"
    src.write_bytes(body)
    extra = {"length": [], "chunked": ["-H", "Transfer-Encoding: chunked"],
             "expect": ["-H", "Expect: 100-continue"]}[how]
    got = curl("-v", "-T", str(src), *extra, f"http://127.0.0.1:{proxy.port}/up/{how}")
    assert got.returncode == 0, got.stderr
    if how == "expect":
        assert b"< HTTP/1.1 100 Continue" in got.stderr
    assert digest((nginx.root / "www" / "up" / how).read_bytes()) == digest(body)
    (line,) = wait_lines(proxy, 1)
    assert line["status"] == "201"
    assert int(line["up"]) > len(body)  # the head and (chunked) the chunk lines too


@needs_nginx
def test_head_204_304_carry_no_body_and_keep_the_connection(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    with connect(proxy) as sock:
        reader = _Unclosable(sock)
        sock.sendall(request("HEAD", "/10m"))
        resp, body = read_response(reader, "HEAD")
        assert resp.status == 200 and body == b""
        assert resp.getheader("content-length") == str(SIZES["10m"])
        etag = resp.getheader("etag")
        sock.sendall(request("GET", "/nocontent"))
        resp, body = read_response(reader)
        assert resp.status == 204 and body == b""
        sock.sendall(request("GET", "/10m", {"If-None-Match": etag}))
        resp, body = read_response(reader)
        assert resp.status == 304 and body == b""
        sock.sendall(request("GET", "/64k"))
        resp, body = read_response(reader)
        assert resp.status == 200 and digest(body) == digest(nginx.files["64k"])
    found = wait_lines(proxy, 4)
    assert [f["status"] for f in found] == ["200", "204", "304", "200"]
    assert len({f["id"] for f in found}) == 1


@needs_nginx
def test_pipelined_requests_are_answered_in_order(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    order = ["1b", "10m", "0b", "64k", "1b"]
    with connect(proxy) as sock:
        sock.sendall(b"".join(request("GET", f"/{n}") for n in order))
        reader = _Unclosable(sock)
        for name in order:
            resp, body = read_response(reader)
            assert resp.status == 200
            assert digest(body) == digest(nginx.files[name]), name
    assert [f["request"] for f in wait_lines(proxy, 5)] == [f"GET /{n} HTTP/1.1" for n in order]


@needs_nginx
def test_http10_client_gets_close_and_a_dechunked_body(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/gz/text.txt", {"Accept-Encoding": "identity"}, version="1.0"))
        raw = recv_until_eof(sock, 30)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"\r\nconnection: close" in head.lower()
    assert digest(body) == digest(nginx.files["text"])


# -- exact wire bytes, with raw upstreams -----------------------------------------------------
def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise EOFError(f"closed after {data!r}")
        data += chunk
    return data


CHUNKS = [1, 2, 7, 4095, 65537, (1 << 20) + 3, 16]


def chunked_upstream(conn: socket.socket) -> None:
    """Answers one GET with odd-sized chunks (with extensions) and a trailer."""
    read_head(conn)
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n")
    for i, size in enumerate(CHUNKS):
        conn.sendall(b"%x;ext=%d\r\n" % (size, i) + payload(size, i) + b"\r\n")
    conn.sendall(b"0\r\nX-Sum: 42\r\n\r\n")
    read_head(conn)  # the same connection is used again: a second request comes
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    conn.recv(1)


def test_odd_chunk_sizes_pass_exactly(start_http, upstreams):
    up = upstreams(chunked_upstream)
    proxy = start_http(connect=up.addr)
    want = b"".join(b"%x\r\n" % n + payload(n, i) + b"\r\n" for i, n in enumerate(CHUNKS)) + b"0\r\nx-sum: 42\r\n\r\n"
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/chunks"))
        head = read_head(sock)
        assert b"transfer-encoding: chunked" in head.lower()
        body = recv_exact(sock, len(want) - len(b"x-sum: 42\r\n\r\n") + len(b"X-Sum: 42\r\n\r\n"))
        assert body.lower() == want.lower()  # extensions dropped, trailer passed as sent
        assert body.endswith(b"0\r\nX-Sum: 42\r\n\r\n")
        sock.sendall(request("GET", "/again"))
        resp, data = read_response(_Unclosable(sock))
        assert data == b"ok"
    assert up.accepted == 1


def _recorder(heads: list[bytes], response: bytes):
    """An upstream handler that keeps the request head it gets and answers ``response``."""

    def record(conn: socket.socket) -> None:
        heads.append(read_head(conn))
        conn.sendall(response)
        conn.recv(1)

    return record


def test_forwarding_headers_and_hop_by_hop_fields(start_http, upstreams):
    heads: list[bytes] = []
    up = upstreams(_recorder(heads, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nKeep-Alive: timeout=5\r\nX-Up: 1\r\n\r\n"))
    proxy = start_http("--forwarded-proto", "https", connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/h", {"Connection": "x-private", "X-Private": "1", "Keep-Alive": "300",
                                           "X-Forwarded-For": "192.0.2.1", "Proxy-Connection": "keep-alive"}))
        resp, _ = read_response(_Unclosable(sock))
        assert resp.getheader("x-up") == "1" and resp.getheader("keep-alive") is None
    head = heads[0].decode().lower()
    assert head.startswith("get /h http/1.1\r\n")
    assert "x-private" not in head and "keep-alive" not in head and "proxy-connection" not in head
    assert "x-forwarded-for: 192.0.2.1, 127.0.0.1\r\n" in head
    assert "forwarded: for=127.0.0.1;proto=https\r\n" in head
    assert "x-forwarded-proto: https\r\n" in head


def test_stale_upstream_connection_is_retried_once(start_http, upstreams):
    """An upstream that closes a kept connection without saying so: the next bodiless request
    finds it closed and goes again on a new connection; the client never sees it."""

    def one_then_close(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\none")
        # closes without Connection: close: the proxy keeps a connection that is gone

    up = upstreams(one_then_close)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        reader = _Unclosable(sock)
        for _ in range(3):
            sock.sendall(request("GET", "/x"))
            resp, body = read_response(reader)
            assert (resp.status, body) == (200, b"one")
            time.sleep(0.05)  # lets the upstream's FIN arrive first, the race the retry covers
    assert up.accepted == 3
    assert [f["status"] for f in wait_lines(proxy, 3)] == ["200"] * 3


def test_response_body_cut_short_resets_the_client(start_http, upstreams):
    def short(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + payload(300000, 3))

    up = upstreams(short)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/short"))
        head = read_head(sock)
        assert b"content-length: 1000000" in head.lower()
        got = bytearray()
        with pytest.raises(ConnectionResetError):
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        assert bytes(got) == payload(300000, 3)[: len(got)]
    (line,) = wait_lines(proxy, 1)
    assert line["status"] == "200" and "response body cut short" in line["error"]


def test_request_body_cut_short_resets_the_upstream(start_http, upstreams):
    seen: list[bytes] = []
    ended = threading.Event()

    def sink(conn: socket.socket) -> None:
        read_head(conn)
        data = b""
        try:
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            data += b"<RST>"
        seen.append(data)
        ended.set()

    up = upstreams(sink)
    proxy = start_http(connect=up.addr)
    body = payload(1 << 20, 5)
    sock = connect(proxy)
    sock.sendall(request("POST", "/p", {"Content-Length": str(len(body))}) + body[:400000])
    wait_until(lambda: up.accepted == 1, 5, "the upstream connection")
    sock.close()
    assert ended.wait(10)
    assert seen[0].endswith(b"<RST>")
    assert seen[0][:-5] == body[: len(seen[0]) - 5]
    (line,) = wait_lines(proxy, 1)
    assert "request body cut short" in line["error"]


def test_early_response_is_delivered_and_the_connection_closed(start_http, upstreams):
    """An upstream that answers 413 without reading the body: the client gets the whole 413
    and then the end of the connection, not a reset that would lose it."""

    def refuse(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")

    up = upstreams(refuse)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("POST", "/big", {"Content-Length": str(50 << 20)}) + payload(1 << 20, 1))
        resp, body = read_response(_Unclosable(sock))
        assert (resp.status, body) == (413, b"too large")
        assert resp.getheader("connection") == "close"
    (line,) = wait_lines(proxy, 1)
    assert line["status"] == "413"


def test_close_delimited_response(start_http, upstreams):
    data = payload(3 << 20, 11)

    def until_close(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n" + data)

    up = upstreams(until_close)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/all"))
        raw = recv_until_eof(sock, 30)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    assert digest(body) == digest(data)


def test_websocket_upgrade_becomes_a_relay(start_http, upstreams):
    def ws(conn: socket.socket) -> None:
        head = read_head(conn)
        assert b"upgrade: websocket" in head.lower()
        conn.sendall(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nhello")
        while True:
            chunk = conn.recv(65536)
            if not chunk:
                conn.shutdown(socket.SHUT_WR)
                return
            conn.sendall(chunk.upper())

    up = upstreams(ws)
    proxy = start_http(connect=up.addr)
    frames = payload(1 << 20, 2).hex().encode()[: 1 << 20]
    with connect(proxy) as sock:
        # bytes right behind the request head, before the 101, must not be lost
        sock.sendall(request("GET", "/ws", {"Connection": "Upgrade", "Upgrade": "websocket"}) + b"early")
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101") and b"upgrade: websocket" in head.lower()
        assert recv_exact(sock, 5) == b"hello"
        assert recv_exact(sock, 5) == b"EARLY"
        sock.sendall(frames)
        assert recv_exact(sock, len(frames), 30) == frames.upper()
        sock.shutdown(socket.SHUT_WR)
        assert recv_until_eof(sock) == b""
    proxy.wait_log(rf"upgraded connection ended up={5 + len(frames)} down={5 + 5 + len(frames)}")


# -- errors the proxy answers itself ---------------------------------------------------------
@pytest.mark.parametrize(
    "raw,status",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n", 431),
        (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", 505),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405),
    ],
    ids=["malformed", "tls", "too-large", "http2", "gzip-te", "connect"],
)
def test_bad_requests_get_their_status_and_never_reach_the_upstream(start_http, upstreams, raw, status):
    up = upstreams()
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        try:
            sock.sendall(raw)
        except ConnectionResetError:
            pass
        got = recv_until_eof(sock)
    assert got.startswith(b"HTTP/1.1 %d " % status), got[:80]
    assert b"connection: close" in got.lower()
    assert up.accepted == 0
    proxy.wait_log(rf'"[^"]*" {status} up=0 ')


def test_unreachable_backend_is_502(start_http, blackhole):
    port = free_port()  # nothing listens there
    proxy = start_http(connect=f"127.0.0.1:{port}")
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/x"))
        resp, body = read_response(_Unclosable(sock))
    assert resp.status == 502 and body == b"502 Bad Gateway\n"
    (line,) = wait_lines(proxy, 1)
    assert line["status"] == "502" and "Connection refused" in line["error"]
    assert proxy.stats()["connections"]["failed_connects"] == 1


def test_silent_backend_is_504(start_http, upstreams):
    release = threading.Event()
    up = upstreams(lambda conn: (read_head(conn), release.wait(10)))
    proxy = start_http("--response-timeout", "0.5", connect=up.addr)
    try:
        with connect(proxy) as sock:
            sock.sendall(request("GET", "/slow"))
            resp, body = read_response(_Unclosable(sock))
        assert resp.status == 504
    finally:
        release.set()
    (line,) = wait_lines(proxy, 1)
    assert "no response head within 0.5 s" in line["error"]


def test_every_backend_down_is_503(start_http):
    port = free_port()
    proxy = start_http("--health-check", "0.1", "--fall", "1", connect=f"127.0.0.1:{port}")
    proxy.wait_log(r"DOWN|down")
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/x"))
        resp, _ = read_response(_Unclosable(sock))
    assert resp.status == 503


def test_partial_head_times_out_with_408(start_http, upstreams):
    up = upstreams()
    proxy = start_http("--head-timeout", "0.3", connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost:")
        got = recv_until_eof(sock)
    assert got.startswith(b"HTTP/1.1 408 ")
    assert up.accepted == 0


# -- keep-alive across clients, stopping --------------------------------------------------------
@needs_nginx
def test_idle_upstream_connection_serves_the_next_client(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    for _ in range(3):
        with connect(proxy) as sock:
            sock.sendall(request("GET", "/64k", {"Connection": "close"}))
            resp, body = read_response(_Unclosable(sock))
            assert digest(body) == digest(nginx.files["64k"])
            assert resp.getheader("connection") == "close"
            assert sock.recv(1) == b""
    wait_lines(proxy, 3)
    st = proxy.stats()["http"]
    assert st["upstream_reused"] == 2 and st["upstream_idle"] == 1


@needs_nginx
def test_sigterm_lets_a_download_finish_and_closes_idle_clients(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    idle = connect(proxy)
    idle.sendall(request("GET", "/1b"))
    read_response(_Unclosable(idle))
    busy = connect(proxy)
    busy.sendall(request("GET", "/100m"))
    reader = _Unclosable(busy)
    resp = http.client.HTTPResponse(reader, method="GET")  # type: ignore[arg-type]
    resp.begin()
    first = resp.read(1 << 20)
    proxy.proc.send_signal(signal.SIGTERM)
    assert recv_until_eof(idle) == b""  # the idle keep-alive client is closed at once
    rest = resp.read()
    assert digest(first + rest) == digest(nginx.files["100m"])
    assert proxy.proc.wait(20) == 0
    idle.close()
    busy.close()


def test_options_an_http_proxy_does_not_take():
    for extra in (["--sni", "a.example=127.0.0.1:1"], ["--send-proxy", "v1"]):
        got = test_cli.run_cli("--listen", "127.0.0.1:0", "--connect", "127.0.0.1:1", *extra, command="http")
        assert got.returncode == 2 and "unrecognized arguments" in got.stderr
    got = test_cli.run_cli("--listen", "127.0.0.1:0", command="http")
    assert got.returncode == 2 and "--connect is required" in got.stderr


def test_library_refuses_routes_it_cannot_serve():
    from splicepool import SplicePool
    from splicepool.http import HttpProxyServer
    from splicepool.routes import Routes

    with SplicePool(workers=1) as pool:
        with pytest.raises(ValueError, match="no --sni, no --send-proxy"):
            HttpProxyServer(("127.0.0.1", 0), Routes([("127.0.0.1", 1)], send_proxy="v1"), pool=pool)


def test_stats_count_requests_by_status(start_http, upstreams):
    def answer(conn: socket.socket) -> None:
        while True:
            try:
                head = read_head(conn)
            except EOFError:
                return
            code = b"404" if b"/missing" in head else b"200"
            conn.sendall(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 1\r\n\r\nz")

    up = upstreams(answer)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        reader = _Unclosable(sock)
        for path in ("/a", "/missing", "/b"):
            sock.sendall(request("GET", path))
            read_response(reader)
    wait_lines(proxy, 3)
    st = proxy.stats()
    assert st["http"]["responses"] == {"2xx": 2, "4xx": 1}
    assert st["http"]["requests"] == 3
    metrics = test_cli.http_get(proxy.stats_port, "/metrics")
    for line in ('splicepool_http_responses_total{class="2xx"} 2', 'splicepool_http_responses_total{class="4xx"} 1',
                 "splicepool_http_requests_total 3", "splicepool_http_upstream_reused_total 2",
                 "splicepool_connections_accepted_total 1"):
        assert line in metrics.splitlines(), line


@needs_nginx
def test_upload_keeps_the_connection_for_the_next_request(nginx, start_http):
    """The upstream may answer before the loop hears that the body's splice ended: the
    exchange still keeps both connections (up= counts the whole body)."""
    proxy = start_http(connect=nginx.addr)
    body = payload(3 << 20, 9)
    with connect(proxy) as sock:
        reader = _Unclosable(sock)
        for i in range(5):
            sock.sendall(request("PUT", f"/up/keep{i}", body=body))
            resp, _ = read_response(reader)
            assert resp.status in (201, 204) and resp.getheader("connection") != "close"
    found = wait_lines(proxy, 5)
    assert len({f["id"] for f in found}) == 1
    assert all(int(f["up"]) > len(body) for f in found)
    for i in range(5):
        assert digest((nginx.root / "www" / "up" / f"keep{i}").read_bytes()) == digest(body)


def test_balance_picks_the_backend_and_idle_connections_follow_it(start_http, upstreams):
    """Two backends, roundrobin: each client's request goes to the backend the balance
    chose, over an idle connection to that backend when there is one."""
    a, b = upstreams(lambda conn: _serve_named(conn, "a")), upstreams(lambda conn: _serve_named(conn, "b"))
    proxy = start_http("--connect", a.addr, "--connect", b.addr)
    bodies = []
    for _ in range(6):
        with connect(proxy) as sock:
            sock.sendall(request("GET", "/", {"Connection": "close"}))
            bodies.append(read_response(_Unclosable(sock))[1])
    assert bodies == [b"a", b"b"] * 3
    assert (a.accepted, b.accepted) == (1, 1)  # then reused
    assert proxy.stats()["http"]["upstream_reused"] == 4


def test_idle_upstream_connections_time_out_and_the_loop_then_sleeps(start_http, upstreams):
    """An idle connection older than --upstream-idle-timeout is closed (in the idle list) or
    replaced (held by its client); afterwards the loop waits without spinning."""
    up = upstreams(lambda conn: _serve_named(conn, "ok"))
    proxy = start_http("--upstream-idle-timeout", "0.3", connect=up.addr)
    with connect(proxy) as held:
        reader = _Unclosable(held)
        held.sendall(request("GET", "/1"))
        read_response(reader)
        with connect(proxy) as other:  # parks its connection when it goes
            other.sendall(request("GET", "/2", {"Connection": "close"}))
            read_response(_Unclosable(other))
        wait_until(lambda: proxy.stats()["http"]["upstream_idle"] == 1, 5, "one idle connection")
        wait_until(lambda: proxy.stats()["http"]["upstream_idle"] == 0, 5, "the idle one closed")
        held.sendall(request("GET", "/3"))  # its held connection is 0.3 s old by now: a new one
        assert read_response(reader)[1] == b"ok"
    assert up.accepted == 3
    before = _cpu_seconds(proxy.pid)
    time.sleep(1.0)  # the measured span: a loop that spins uses all of it
    assert _cpu_seconds(proxy.pid) - before < 0.3


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_accept_proxy_puts_the_carried_client_in_x_forwarded_for(start_http, upstreams):
    heads: list[bytes] = []
    up = upstreams(_recorder(heads, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
    proxy = start_http("--accept-proxy", connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(b"PROXY TCP4 198.51.100.7 127.0.0.1 40000 80\r\n" + request("GET", "/p"))
        resp, _ = read_response(_Unclosable(sock))
        assert resp.status == 200
    assert "x-forwarded-for: 198.51.100.7\r\n" in heads[0].decode().lower()
    (line,) = wait_lines(proxy, 1)
    assert line["peer"].startswith("198.51.100.7:40000 via 127.0.0.1:")


@needs_nginx
def test_concurrent_keepalive_clients_get_every_body_exact(nginx, start_http):
    """20 clients at once, each 15 requests on one connection (downloads of every size,
    uploads, HEADs, some pipelined in pairs): every body exact, every upload landed whole."""
    proxy = start_http(connect=nginx.addr)
    names = ["0b", "1b", "64k", "10m", "1b", "64k"]
    failures: list[str] = []

    def client(k: int) -> None:
        try:
            with connect(proxy) as sock:
                reader = _Unclosable(sock)
                for i in range(15):
                    name = names[(k + i) % len(names)]
                    if i % 5 == 4:  # an upload
                        body = payload(100_000 + k * 7 + i, k * 100 + i)
                        sock.sendall(request("PUT", f"/up/c{k}-{i}", body=body))
                        resp, _ = read_response(reader)
                        assert resp.status in (201, 204), resp.status
                        assert (nginx.root / "www" / "up" / f"c{k}-{i}").read_bytes() == body
                    elif i % 5 == 3:  # two pipelined: a HEAD and a GET
                        sock.sendall(request("HEAD", f"/{name}") + request("GET", f"/{name}"))
                        resp, body = read_response(reader, "HEAD")
                        assert resp.status == 200 and body == b""
                        resp, body = read_response(reader)
                        assert digest(body) == digest(nginx.files[name])
                    else:
                        sock.sendall(request("GET", f"/{name}"))
                        resp, body = read_response(reader)
                        assert digest(body) == digest(nginx.files[name]), (k, i, name)
        except Exception as exc:  # noqa: BLE001 - reported below, with the client's number
            failures.append(f"client {k}: {exc!r}")

    threads = [threading.Thread(target=client, args=(k,)) for k in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    conns = proxy.wait_stats(finished=20, live=0, timeout=10)
    assert conns["accepted"] == 20
    st = proxy.stats()["http"]
    assert st["requests"] == 20 * 18 and st["responses"] == {"2xx": 20 * 18}


@needs_nginx
def test_a_client_that_stops_reading_stalls_no_one_else(nginx, start_http):
    proxy = start_http(connect=nginx.addr)
    stalled = connect(proxy)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(request("GET", "/100m"))
    read_head(stalled)  # its body is spliced now, into a client that reads nothing more
    with connect(proxy) as sock:
        reader = _Unclosable(sock)
        for name in ["10m", "64k", "1b", "10m"]:
            sock.sendall(request("GET", f"/{name}"))
            assert digest(read_response(reader)[1]) == digest(nginx.files[name])
        reader.fp.close()  # else the makefile keeps the socket open past its close()
    proxy.wait_stats(live=1, finished=1)  # the stalled one, still there
    stalled.close()


@pytest.mark.parametrize("tail,why", [(b"5\r\nhelloXX", "chunk"), (b"zz\r\n", "chunk size"),
                                      (b"0\r\nBad Trailer\r\n\r\n", "trailer")])
def test_malformed_chunked_response_is_a_502_before_any_byte_goes(start_http, upstreams, tail, why):
    """Nothing of a response whose body turns out malformed has gone to the client yet
    (its head and first chunk wait to go out in one write): the client gets a 502."""
    def bad(conn: socket.socket) -> None:
        read_head(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + tail)
        conn.recv(1)

    up = upstreams(bad)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/c"))
        got = recv_until_eof(sock)
    assert got.startswith(b"HTTP/1.1 502 Bad Gateway\r\n"), got[:60]
    (line,) = wait_lines(proxy, 1)
    assert line["status"] == "502" and "bad response body" in line["error"]
    assert why in line["error"].lower()


def test_malformed_chunked_request_is_a_400_and_never_completes_upstream(start_http, upstreams):
    seen: list[bytes] = []

    def sink(conn: socket.socket) -> None:
        data = b""
        try:
            while chunk := conn.recv(65536):
                data += chunk
        except ConnectionResetError:
            data += b"<RST>"
        seen.append(data)

    up = upstreams(sink)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("POST", "/u", {"Transfer-Encoding": "chunked"}) + b"3\r\nabc\r\nnot-hex\r\n")
        got = recv_until_eof(sock)
    assert got.startswith(b"HTTP/1.1 400 Bad Request\r\n"), got[:60]
    (line,) = wait_lines(proxy, 1)
    assert line["status"] == "400" and "bad request body" in line["error"]
    wait_until(lambda: len(seen) == up.accepted, 5, "the upstream connection's end")
    assert not any(data.endswith(b"0\r\n\r\n") for data in seen)  # no body ever ended there


def test_sighup_moves_new_clients_to_the_reloaded_backends(start_http, upstreams, tmp_path):
    """--config and SIGHUP: a client connected before keeps its backend (and its kept
    connection); clients after the reload go to the new one; idle connections to the old
    backend are not handed to them."""
    old, new = upstreams(lambda conn: _serve_named(conn, "old")), upstreams(lambda conn: _serve_named(conn, "new"))
    config = tmp_path / "http.toml"
    config.write_text(f'connect = ["{old.addr}"]\n')
    proxy = start_http("--config", str(config))
    with connect(proxy) as parked:  # leaves an idle connection to old behind
        parked.sendall(request("GET", "/", {"Connection": "close"}))
        assert read_response(_Unclosable(parked))[1] == b"old"
    before = connect(proxy)
    before_reader = _Unclosable(before)
    before.sendall(request("GET", "/"))
    assert read_response(before_reader)[1] == b"old"
    config.write_text(f'connect = ["{new.addr}"]\n')
    proxy.signal(signal.SIGHUP)
    proxy.wait_log(rf" INFO reloaded: proxying to {re.escape(new.addr)}")
    with connect(proxy) as after:
        after.sendall(request("GET", "/"))
        assert read_response(_Unclosable(after))[1] == b"new"
    before.sendall(request("GET", "/"))
    assert read_response(before_reader)[1] == b"old"
    before_reader.fp.close()
    before.close()


def _serve_named(conn: socket.socket, name: str) -> None:
    while True:
        try:
            read_head(conn)
        except (EOFError, OSError):
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(name) + name.encode())


def test_a_busy_keepalive_connection_leaves_no_pile_of_deadlines(start_http, upstreams):
    """Each request sets two deadlines (the next request's, the response's): the heap keeps
    one entry per session, not two per request until they come due a minute later."""
    up = upstreams(lambda conn: _serve_named(conn, "x"))
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        reader = _Unclosable(sock)
        for _ in range(300):
            sock.sendall(request("GET", "/"))
            assert read_response(reader)[1] == b"x"
        assert proxy.stats()["http"]["deadlines"] <= 2
        reader.fp.close()


@pytest.mark.parametrize("pipelined", [False, True], ids=["fin", "pipelined+fin"])
def test_a_client_that_sends_on_or_closes_while_its_response_is_awaited(start_http, upstreams, pipelined):
    """The loop keeps watching a keep-alive client while its request is upstream (no
    unwatch and rewatch per request): what the client sends meanwhile (the next request,
    its FIN) is read ahead, the loop does not spin on it, and every response still comes,
    in order, before the close the FIN asked for."""
    got_first, release = threading.Event(), threading.Event()

    def held(conn: socket.socket) -> None:
        for i in range(2):
            try:
                read_head(conn)
            except (EOFError, OSError):
                return
            if i == 0:
                got_first.set()
                release.wait(10)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nr%d" % i)

    up = upstreams(held)
    proxy = start_http(connect=up.addr)
    with connect(proxy) as sock:
        sock.sendall(request("GET", "/0") + (request("GET", "/1") if pipelined else b""))
        assert got_first.wait(10)
        sock.shutdown(socket.SHUT_WR)
        before = _cpu_seconds(proxy.pid)
        time.sleep(0.5)  # the measured span: a loop that spins on the FIN uses all of it
        assert _cpu_seconds(proxy.pid) - before < 0.2
        release.set()
        raw = recv_until_eof(sock, 10)
    want = [b"r0", b"r1"] if pipelined else [b"r0"]
    assert re.findall(rb"\r\n\r\n(r\d)", raw) == want
    heads = re.findall(rb"HTTP/1.1 200 OK\r\n(.*?)\r\n\r\n", raw, re.S)
    closes = [b"connection: close" in h.lower() for h in heads]
    assert closes[:-1] == [False] * (len(heads) - 1)  # a request read ahead keeps the connection
    if not pipelined:  # the FIN was read ahead while the answer was held: that answer says close
        assert closes[-1] is True
    assert [f["status"] for f in wait_lines(proxy, len(want))] == ["200"] * len(want)
