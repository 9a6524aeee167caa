"""The proxy tier end to end against real peers: ``python -m splicepool proxy`` as a subprocess,
with HAProxy in front of it (``send-proxy``, ``send-proxy-v2``, a two-tier balance with health
checks) and behind it (``accept-proxy``), a Python backend that parses the PROXY header with
``splicepool.proxyproto.parse``, and real TLS peers (Python's ssl, ``openssl s_client``) for
``--sni`` routing. Every check is exact: bytes by sha256, addresses and ports as the peers saw
them, log lines and /stats counters. Loopback only; clients bind 127.0.0.2 and up so that the
real client's address differs from HAProxy's (127.0.0.1).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
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
    recv_until_eof,
    send_in_thread,
    wait_until,
)
from test_cli import Upstream, hostport, sockname
from test_proxyproto import launch_haproxy

from splicepool import proxyproto

pytestmark = own_processes
upstreams = test_cli.upstreams  # the fixtures, shared
start_proxy = test_cli.start_proxy

# test_cli.CONN_LINE's peer is one word; behind --accept-proxy it is "CLIENT via PEER".
CONN_LINE = re.compile(
    r"^\S+ \S+ (?P<pid>\d+) (?P<level>[A-Z]+) conn (?P<id>\d+) (?P<peer>\S+(?: via \S+)?) -> (?P<upstream>\S+)"
    r" up=(?P<up>\d+) down=(?P<down>\d+) duration=[\d.]+s reason=(?P<reason>\w+)",
    re.MULTILINE,
)
HAPROXY_PEER = r"127\.0\.0\.1:\d+"  # the address HAProxy connects from: its port is its own pick


def need(tool: str, package: str) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool}: apt-get install {package}")


# -- helpers ------------------------------------------------------------------------------
def conn_lines(proxy) -> list[dict[str, str]]:
    return [m.groupdict() for m in CONN_LINE.finditer(proxy.log())]


def line_of(proxy, client: str, timeout: float = 5.0) -> dict[str, str]:
    """The log line of the connection whose real client is ``client`` (``ip:port``), with or
    without a ``via`` part."""

    def find() -> dict[str, str] | None:
        return next((ln for ln in conn_lines(proxy) if ln["peer"].split(" via ")[0] == client), None)

    line = wait_until(find, timeout, f"the log line for {client}")
    assert isinstance(line, dict)
    return line


def connect_from(ip: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from ``ip`` (any port)."""
    sock = socket.socket()
    try:
        sock.settimeout(timeout)
        sock.bind((ip, 0))
        sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """What arrives on ``sock`` before its peer closes it (FIN or RST); fails if it stays open."""
    sock.settimeout(timeout)
    got = bytearray()
    try:
        while chunk := sock.recv(1 << 16):
            got += chunk
    except ConnectionResetError:
        pass
    return bytes(got)


def bulk_echo(sock: socket.socket, data: bytes) -> bytes:
    """Send ``data`` and EOF from a thread while reading the echo until EOF."""
    sender = send_in_thread(sock, data, shut=True)
    got = recv_until_eof(sock, timeout=30)
    sender.join(30)
    assert not sender.is_alive()
    return got


# sock_diag (what ss uses): one socket looked up by its addresses, with its tcp_info.
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, INET_DIAG_INFO = 4, 20, 1, 2
TCPI_BYTES_RECEIVED = 128  # the offset of tcpi_bytes_received (u64) in struct tcp_info


def peer_counts(sock: socket.socket) -> tuple[int, int]:
    """(bytes received, bytes not read yet) of the socket at the other end of ``sock`` (IPv4
    loopback: that socket belongs to another process, the proxy), asked of the kernel by
    NETLINK_SOCK_DIAG: its tcp_info's bytes_received and its receive queue."""
    local, remote = sock.getsockname(), sock.getpeername()
    sockid = (
        struct.pack("!HH", remote[1], local[1])
        + socket.inet_aton(remote[0]) + bytes(12)
        + socket.inet_aton(local[0]) + bytes(12)
        + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)  # any interface, no cookie
    )
    request = struct.pack("=BBBxI", socket.AF_INET, socket.IPPROTO_TCP, 1 << (INET_DIAG_INFO - 1),
                          0xFFFFFFFF) + sockid
    message = struct.pack("=IHHII", 16 + len(request), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST, 1, 0) + request
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
        nl.send(message)
        reply = nl.recv(1 << 16)
    length, kind = struct.unpack_from("=IH", reply)
    if kind != SOCK_DIAG_BY_FAMILY:
        raise OSError(-struct.unpack_from("=i", reply, 16)[0], f"no socket {remote} -> {local}")
    queued = struct.unpack_from("=I", reply, 16 + 4 + 48 + 4)[0]  # inet_diag_msg.idiag_rqueue
    pos = 16 + 72  # the attributes after the inet_diag_msg
    while pos + 4 <= length:
        size, kind = struct.unpack_from("=HH", reply, pos)
        if kind == INET_DIAG_INFO:
            return struct.unpack_from("=Q", reply, pos + 4 + TCPI_BYTES_RECEIVED)[0], queued
        pos += (size + 3) & ~3
    raise AssertionError("sock_diag gave no tcp_info")


def send_byte_by_byte(sock: socket.socket, data: bytes) -> None:
    """Send ``data`` (the first bytes ``sock`` sends) one byte per TCP segment (TCP_NODELAY),
    each only once the proxy has received and read the one before: each of its reads
    returns exactly one byte."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for i in range(len(data)):
        sock.sendall(data[i : i + 1])
        wait_until(lambda n=i + 1: peer_counts(sock) == (n, 0), 5, f"the proxy to read byte {i}",
                   interval=0.0002)


class HeaderBackend:
    """A backend that reads the PROXY header first (``proxyproto.parse`` on what it has so
    far, until it is whole), then echoes every byte until EOF. ``headers``: (parsed, raw
    bytes) per connection; ``after``: sha256 and length of each connection's bytes after
    the header, recorded at its EOF."""

    def __init__(self, upstreams) -> None:
        self.headers: list[tuple[proxyproto.ProxyHeader, bytes]] = []
        self.after: list[tuple[str, int]] = []
        self.up: Upstream = upstreams(self.handle)

    def handle(self, conn: socket.socket) -> None:
        buf = bytearray()
        while (header := proxyproto.parse(buf)) is None:
            chunk = conn.recv(1 << 16)
            if not chunk:
                raise ConnectionError(f"EOF after {len(buf)} bytes, before a whole PROXY header")
            buf += chunk
        self.headers.append((header, bytes(buf[: header.length])))
        h = hashlib.sha256()
        n = 0
        data = bytes(buf[header.length :])
        while True:
            h.update(data)
            n += len(data)
            conn.sendall(data)
            data = conn.recv(1 << 16)
            if not data:
                break
        self.after.append((h.hexdigest(), n))


@pytest.fixture
def haproxy(tmp_path):
    """``start(sections, global_lines="")`` → the port of a running haproxy; ``sections(port)``
    gives its config sections for a frontend port chosen here (another on a retry)."""
    need("haproxy", "haproxy")
    procs: list[subprocess.Popen] = []

    def start(sections, global_lines: str = "") -> int:
        for _attempt in range(3):  # a port free_port found may be taken before haproxy binds
            port = free_port()
            proc = launch_haproxy(tmp_path, sections(port), global_lines)
            if proc is not None:
                procs.append(proc)
                return port
        pytest.fail(f"haproxy did not start:\n{(tmp_path / 'haproxy.err').read_text()}")

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def one_server(port: int, target: int, *, bind_opts: str = "", server_opts: str = "") -> list[str]:
    return [
        f"listen tier\n  bind 127.0.0.1:{port} {bind_opts}\n"
        f"  server s 127.0.0.1:{target} {server_opts}\n"
    ]


# -- 1. HAProxy in front: send-proxy / send-proxy-v2 -> --accept-proxy -------------------------
@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_gives_the_real_client_and_the_bytes_arrive_intact(
    upstreams, start_proxy, haproxy, send
):
    """HAProxy's PROXY header (v1 or v2) makes the log line's peer "REAL_CLIENT via HAPROXY";
    4 MiB go through both ways intact, and up=/down= count exactly the client's bytes (the
    header excluded, the bytes HAProxy sent along with it included)."""
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--accept-proxy", stats=True)
    front = haproxy(lambda port: one_server(port, proxy.port, server_opts=send))
    data = payload(4 << 20, 1)
    with connect_from("127.0.0.2", front) as client:
        real = sockname(client)
        got = bulk_echo(client, data)
    assert digest(got) == digest(data)
    line = line_of(proxy, real)
    assert re.fullmatch(rf"{re.escape(real)} via {HAPROXY_PEER}", line["peer"]), line
    assert (line["upstream"], line["up"], line["down"], line["reason"]) == (
        upstream.addr, str(len(data)), str(len(data)), "EOF")
    st = proxy.wait_stats(finished=1)
    assert (st["accepted"], st["refused"], st["bytes_up"], st["bytes_down"]) == (1, 0, len(data), len(data))
    assert upstream.accepted == 1 and not upstream.errors


def test_allow_and_deny_judge_the_address_haproxy_carries_not_haproxys(upstreams, start_proxy, haproxy):
    """HAProxy (127.0.0.1) is allowed, but the access list is applied to the client its header
    names: 127.0.0.2 is denied, 127.0.0.4 is in no allowed network, 127.0.0.3 passes. The
    refused ones reach no backend and are logged and counted under access_list."""
    upstream = upstreams()
    proxy = start_proxy(
        upstream.addr, "--accept-proxy", "--allow", "127.0.0.1/32", "--allow", "127.0.0.3/32",
        "--deny", "127.0.0.2/32", stats=True,
    )
    front = haproxy(lambda port: one_server(port, proxy.port, server_opts="send-proxy-v2"))
    refused = []
    for ip in ("127.0.0.2", "127.0.0.4"):
        with connect_from(ip, front) as client:
            refused.append(sockname(client))
            client.sendall(b"let me in")
            assert closed_by_peer(client) == b""
    with connect_from("127.0.0.3", front) as client:
        allowed = sockname(client)
        client.sendall(b"ping")
        assert recv_exact(client, 4) == b"ping"
    for i, peer in enumerate(refused, 1):
        proxy.wait_log(
            rf" INFO conn {i} {re.escape(peer)} via {HAPROXY_PEER}: refused: {peer.split(':')[0]} "
            r"is not allowed \(allow 127\.0\.0\.1/32, 127\.0\.0\.3/32; deny 127\.0\.0\.2/32\)$"
        )
    assert line_of(proxy, allowed)["up"] == "4"
    st = proxy.wait_stats(finished=1)
    assert (st["accepted"], st["refused"], st["refusals"]) == (3, 2, {"access_list": 2})
    assert upstream.accepted == 1


# -- 2. --accept-proxy: bad heads, slow heads ------------------------------------------------
def test_accept_proxy_refuses_bad_heads_by_reason_and_takes_a_header_sent_byte_by_byte(upstreams, start_proxy):
    """Plain bytes, a garbage v2 header, a truncated header then close, and silence past
    --head-timeout are each closed and counted under their exact reason without a backend
    connection. Headers that arrive one byte per segment (v1 and v2), or with the client's
    data in the same segment, are taken: the peer is the address they carry, the bytes after
    them arrive intact and are counted."""
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--accept-proxy", "--head-timeout", "0.5", stats=True)

    def refusals() -> dict[str, int]:
        return proxy.stats()["connections"]["refusals"]

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as plain:
        plain.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert closed_by_peer(plain) == b""
        proxy.wait_log(rf" WARNING conn 1 {sockname(plain)}: refused: no valid PROXY header: not a "
                       r"PROXY protocol header: the first byte is b'G', neither 'P' .*$")
    assert refusals() == {"bad_proxy_header": 1}

    garbage = proxyproto.V2_SIGNATURE + b"\x31\x11\x00\x0c" + bytes(12)  # version 3
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as bad:
        bad.sendall(garbage + b"data")
        assert closed_by_peer(bad) == b""
        proxy.wait_log(rf" WARNING conn 2 {sockname(bad)}: refused: no valid PROXY header: v2 version is 3, not 2")
    assert refusals() == {"bad_proxy_header": 2}

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as cut:
        cut.sendall(b"PROXY TCP4 192.0.2.1 19")
        cut.shutdown(socket.SHUT_WR)
        assert closed_by_peer(cut) == b""
        proxy.wait_log(rf" WARNING conn 3 {sockname(cut)}: client closed after 23 bytes, before its head was whole$")
    assert refusals() == {"bad_proxy_header": 2, "closed_early": 1}

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as silent:
        t0 = time.monotonic()
        assert closed_by_peer(silent, timeout=5) == b""
        waited = time.monotonic() - t0
        proxy.wait_log(rf" WARNING conn 4 {sockname(silent)}: refused: no complete PROXY header within 0\.5 s$")
    assert 0.45 <= waited < 2.5, waited
    assert refusals() == {"bad_proxy_header": 2, "closed_early": 1, "head_timeout": 1}
    assert upstream.accepted == 0

    data = payload(1 << 16, 2)
    carried = [("203.0.113.7", 4711), ("2001:db8::7", 65535), ("198.51.100.1", 1)]
    headers = [
        proxyproto.encode_v1(carried[0], ("198.51.100.9", 443)),
        proxyproto.encode_v2(carried[1], ("2001:db8::9", 443)),
    ]
    peers = []
    for header in headers:
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
            peers.append(sockname(client))
            send_byte_by_byte(client, header)
            assert digest(bulk_echo(client, data)) == digest(data)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peers.append(sockname(client))
        header = proxyproto.encode_v2(carried[2], ("198.51.100.9", 443))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        assert digest(bulk_echo(client, header + data)) == digest(data)  # header and data in one send
    for source, peer in zip(carried, peers, strict=True):
        line = line_of(proxy, hostport(*source))
        assert line["peer"] == f"{hostport(*source)} via {peer}", line
        assert (line["up"], line["down"], line["reason"]) == (str(len(data)), str(len(data)), "EOF")
    st = proxy.wait_stats(finished=3)
    assert (st["accepted"], st["refused"], st["failed_connects"]) == (7, 4, 0)
    assert st["refusals"] == {"bad_proxy_header": 2, "closed_early": 1, "head_timeout": 1}
    assert upstream.accepted == 3 and not upstream.errors


def test_a_silent_client_does_not_hold_up_the_others(upstreams, start_proxy):
    """A client that connects and sends nothing waits for its header alone: with a 30 s
    --head-timeout, clients after it are read, routed and proxied at once (the head is read
    without blocking the proxy's one loop)."""
    upstream = upstreams()
    proxy = start_proxy(upstream.addr, "--accept-proxy", "--head-timeout", "30", stats=True)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as silent:
        proxy.wait_stats(accepted=1, reading_head=1)
        for i in range(3):
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
                header = proxyproto.encode_v1(("192.0.2.9", 1000 + i), ("198.51.100.9", 443))
                client.sendall(header + b"ping")
                assert recv_exact(client, 4, timeout=5) == b"ping"
        st = proxy.wait_stats(finished=3)
        assert (st["accepted"], st["reading_head"], st["refused"]) == (4, 1, 0)
        silent.settimeout(0.1)
        with pytest.raises(TimeoutError):  # still waited for
            silent.recv(1)
    assert upstream.accepted == 3


# -- 3. --send-proxy ----------------------------------------------------------------------------
ENCODE = {"v1": proxyproto.encode_v1, "v2": proxyproto.encode_v2}


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_send_proxy_header_is_exact_for_a_python_backend(upstreams, start_proxy, version):
    """The backend's first bytes are exactly the header ``encode_vN(client, listen address)``
    (proxyproto.parse reads the client's ip and port and the proxy's), then the client's bytes
    unaltered; up= counts the client's bytes only."""
    backend = HeaderBackend(upstreams)
    proxy = start_proxy(backend.up.addr, "--send-proxy", version)
    data = payload(1 << 20, 3)
    with connect_from("127.0.0.2", proxy.port) as client:
        source = client.getsockname()
        assert digest(bulk_echo(client, data)) == digest(data)
    backend.up.join()
    assert not backend.up.errors
    (header, raw), = backend.headers
    assert raw == ENCODE[version](source, ("127.0.0.1", proxy.port))
    assert (header.version, header.local, header.source, header.dest) == (
        int(version[1]), False, source, ("127.0.0.1", proxy.port))
    assert backend.after == [(digest(data), len(data))]
    line = line_of(proxy, hostport(*source))
    assert (line["peer"], line["up"], line["down"]) == (hostport(*source), str(len(data)), str(len(data)))


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_haproxy_accept_proxy_reads_the_header_we_send(upstreams, start_proxy, haproxy, version):
    """HAProxy (``bind ... accept-proxy``) behind ``--send-proxy vN`` takes the client to be the
    one our header names: its own send-proxy-v2 header to the backend carries the real client
    (127.0.0.2 and its port) and the proxy's listening address, and the bytes pass intact."""
    backend = HeaderBackend(upstreams)
    front = haproxy(lambda port: one_server(port, backend.up.port, bind_opts="accept-proxy",
                                            server_opts="send-proxy-v2"))
    proxy = start_proxy(f"127.0.0.1:{front}", "--send-proxy", version)
    data = payload(1 << 20, 4)
    with connect_from("127.0.0.2", proxy.port) as client:
        source = client.getsockname()
        assert digest(bulk_echo(client, data)) == digest(data)
    backend.up.join()
    assert not backend.up.errors
    (header, _raw), = backend.headers
    assert (header.local, header.source, header.dest) == (False, source, ("127.0.0.1", proxy.port))
    assert backend.after == [(digest(data), len(data))]


def test_accept_and_send_proxy_pass_the_original_client_through(upstreams, start_proxy, haproxy):
    """client (127.0.0.2) -> HAProxy send-proxy (v1) -> ``--accept-proxy --send-proxy v2`` ->
    backend: the v2 header the backend gets names the original client and HAProxy's frontend,
    not HAProxy's own connection to the proxy."""
    backend = HeaderBackend(upstreams)
    proxy = start_proxy(backend.up.addr, "--accept-proxy", "--send-proxy", "v2")
    front = haproxy(lambda port: one_server(port, proxy.port, server_opts="send-proxy"))
    data = payload(1 << 20, 5)
    with connect_from("127.0.0.2", front) as client:
        source = client.getsockname()
        assert digest(bulk_echo(client, data)) == digest(data)
    backend.up.join()
    assert not backend.up.errors
    (_header, raw), = backend.headers
    assert raw == proxyproto.encode_v2(source, ("127.0.0.1", front))
    assert backend.after == [(digest(data), len(data))]
    line = line_of(proxy, hostport(*source))
    assert re.fullmatch(rf"{re.escape(hostport(*source))} via {HAPROXY_PEER}", line["peer"]), line
    assert (line["up"], line["down"]) == (str(len(data)), str(len(data)))


# -- 4. --sni: TLS passthrough ----------------------------------------------------------------
END = b"\nEND\n"  # a client's last bytes: the TLS backends echo up to them, then close


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """Throwaway self-signed certificates made by ``openssl req``: name -> (cert, key), and
    "bundle": all of them, for clients to trust."""
    need("openssl", "openssl")
    where = tmp_path_factory.mktemp("certs")
    made = {}
    for name in ("a.test", "*.b.test", "default.test"):
        stem = where / name.replace("*", "star")
        crt, key = stem.with_suffix(".crt"), stem.with_suffix(".key")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
             "-keyout", str(key), "-out", str(crt)],
            check=True, capture_output=True, timeout=30,
        )
        made[name] = (str(crt), str(key))
    bundle = where / "bundle.pem"
    bundle.write_text("".join(Path(crt).read_text() for crt, _ in made.values()))
    made["bundle"] = str(bundle)
    return made


class TLSBackend:
    """A TLS server (Python ssl) with its own certificate: it greets with ``tag`` and a newline,
    then echoes until the client's END. ``names``: the server name each handshake offered, as
    the backend itself read it. With ``sniff``, a client whose first byte is not a TLS
    handshake record is echoed in plain text instead, and its bytes kept in ``plain``."""

    def __init__(self, upstreams, cert: tuple[str, str], tag: bytes, sniff: bool = False) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*cert)
        self.ctx.sni_callback = lambda _obj, name, _ctx: self.names.append(name)
        self.tag = tag
        self.sniff = sniff
        self.names: list[str | None] = []
        self.plain: list[bytes] = []
        self.up: Upstream = upstreams(self.handle)

    def handle(self, conn: socket.socket) -> None:
        if self.sniff and conn.recv(1, socket.MSG_PEEK) != b"\x16":
            got = bytearray()
            while chunk := conn.recv(1 << 16):
                got += chunk
                conn.sendall(chunk)
            self.plain.append(bytes(got))
            return
        with self.ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(self.tag + b"\n")
            got = bytearray()
            while not got.endswith(END):
                chunk = tls.recv(1 << 16)
                if not chunk:
                    break
                got += chunk
                tls.sendall(chunk)


@pytest.fixture
def sni_tier(upstreams, start_proxy, certs):
    """Backends a (a.test), b (*.b.test) and the default (default.test, plain text too), and a
    proxy with ``--sni a.test=a --sni *.b.test=b --connect default``."""
    a = TLSBackend(upstreams, certs["a.test"], b"backend-a")
    b = TLSBackend(upstreams, certs["*.b.test"], b"backend-b")
    default = TLSBackend(upstreams, certs["default.test"], b"backend-default", sniff=True)
    proxy = start_proxy(default.up.addr, "--sni", f"a.test={a.up.addr}", "--sni", f"*.b.test={b.up.addr}",
                        stats=True)
    return {"a": a, "b": b, "default": default, "proxy": proxy, "bundle": certs["bundle"]}


def common_name(cert: dict) -> str:
    return dict(field[0] for field in cert["subject"])["commonName"]


def tls_session(port: int, hostname: str | None, bundle: str, data: bytes,
                check_hostname: bool = True) -> tuple[str, bytes, bytes]:
    """A verified TLS session through the proxy: (the server certificate's CN, the greeting,
    the echo of ``data`` + END), sent and read back 16 KiB at a time."""
    ctx = ssl.create_default_context(cafile=bundle)
    ctx.check_hostname = check_hostname
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=hostname) as tls:
            cn = common_name(tls.getpeercert())
            greeting = bytearray()
            while not greeting.endswith(b"\n"):
                greeting += recv_exact(tls, 1)
            echoed = bytearray()
            message = data + END
            for i in range(0, len(message), 1 << 14):
                chunk = message[i : i + (1 << 14)]
                tls.sendall(chunk)
                echoed += recv_exact(tls, len(chunk))
    return cn, bytes(greeting), bytes(echoed)


@pytest.mark.parametrize(
    ("hostname", "check_hostname", "reached", "cn"),
    [
        ("a.test", True, "a", "a.test"),
        ("A.Test", True, "a", "a.test"),
        ("x.b.test", True, "b", "*.b.test"),
        ("y.z.b.test", False, "b", "*.b.test"),  # *.b.test routes every depth; a cert, one label
        ("b.test", False, "default", "default.test"),  # the wildcard's own domain is not under it
        ("unknown.test", False, "default", "default.test"),
        (None, False, "default", "default.test"),  # no SNI at all
    ],
)
def test_sni_routes_real_tls_sessions_by_server_name(sni_tier, hostname, check_hostname, reached, cn):
    """A Python ssl client with ``server_hostname`` reaches the backend its name routes to (the
    certificate it verifies, the backend's greeting and the name the backend itself read say
    so), and 256 KiB go through the TLS session and back intact."""
    proxy = sni_tier["proxy"]
    data = payload(1 << 18, 6)
    assert END not in data
    got_cn, greeting, echoed = tls_session(proxy.port, hostname, sni_tier["bundle"], data, check_hostname)
    assert (got_cn, greeting) == (cn, f"backend-{reached}\n".encode())
    assert digest(echoed) == digest(data + END)
    backend = sni_tier[reached]
    backend.up.join()
    assert backend.names == [hostname]  # the ClientHello reached it unchanged
    assert {k: sni_tier[k].up.accepted for k in ("a", "b", "default")} == {
        k: int(k == reached) for k in ("a", "b", "default")}
    st = proxy.wait_stats(finished=1)
    assert (st["accepted"], st["refused"]) == (1, 0)
    assert not backend.up.errors


def test_a_plain_text_client_goes_to_the_default_backend_with_its_bytes_intact(sni_tier):
    """A client that does not speak TLS (its first byte is not a handshake record) is routed at
    once to --connect: its first bytes, then 2 MiB more, arrive there exactly as sent, the
    echo comes back intact and up=/down= count every byte."""
    proxy, default = sni_tier["proxy"], sni_tier["default"]
    data = b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n" + payload(2 << 20, 7)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        peer = sockname(client)
        assert digest(bulk_echo(client, data)) == digest(data)
    default.up.join()
    assert [digest(p) for p in default.plain] == [digest(data)]
    assert (sni_tier["a"].up.accepted, sni_tier["b"].up.accepted) == (0, 0)
    line = line_of(proxy, peer)
    assert (line["upstream"], line["up"], line["down"]) == (default.up.addr, str(len(data)), str(len(data)))


def test_a_client_hello_in_one_byte_segments_is_routed_by_its_name(sni_tier):
    """An ssl.MemoryBIO client whose ClientHello is relayed one byte per TCP segment (each read
    by the proxy before the next is sent) still goes to a.test's backend; the rest of the
    handshake and a 64 KiB exchange then run over the same raw socket."""
    proxy, a = sni_tier["proxy"], sni_tier["a"]
    ctx = ssl.create_default_context(cafile=sni_tier["bundle"])
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname="a.test")
    data = payload(1 << 16, 8)

    def pump(sock: socket.socket) -> None:
        chunk = sock.recv(1 << 16)
        if not chunk:
            raise EOFError("the proxy closed during the handshake")
        incoming.write(chunk)

    def read(sock: socket.socket, n: int) -> bytes:
        got = bytearray()
        while len(got) < n:
            try:
                got += tls.read(n - len(got))
            except ssl.SSLWantReadError:
                pump(sock)
        return bytes(got)

    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        assert hello[:1] == b"\x16" and len(hello) > 200
        send_byte_by_byte(sock, hello)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out := outgoing.read():
                    sock.sendall(out)
                pump(sock)
        if out := outgoing.read():
            sock.sendall(out)
        assert common_name(tls.getpeercert()) == "a.test"
        assert read(sock, len(b"backend-a\n")) == b"backend-a\n"
        tls.write(data + END)
        sock.sendall(outgoing.read())
        assert digest(read(sock, len(data) + len(END))) == digest(data + END)
    a.up.join()
    assert a.names == ["a.test"] and a.up.accepted == 1 and not a.up.errors
    assert (sni_tier["b"].up.accepted, sni_tier["default"].up.accepted) == (0, 0)


def test_a_malformed_client_hello_is_refused_and_reaches_no_backend(sni_tier):
    """A TLS handshake record holding a ServerHello (type 2) instead of a ClientHello is closed
    at once, logged with the parser's reason and counted under bad_client_hello."""
    proxy = sni_tier["proxy"]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as client:
        client.sendall(b"\x16\x03\x01\x00\x04\x02\x00\x00\x00")
        assert closed_by_peer(client) == b""
        proxy.wait_log(rf" WARNING conn 1 {sockname(client)}: refused: malformed TLS ClientHello: "
                       r"handshake message type 2 is not ClientHello \(1\)$")
    st = proxy.wait_stats(refused=1)
    assert (st["accepted"], st["refusals"], st["finished"]) == (1, {"bad_client_hello": 1}, 0)
    assert [sni_tier[k].up.accepted for k in ("a", "b", "default")] == [0, 0, 0]


def test_openssl_s_client_is_routed_by_its_servername(sni_tier):
    """``openssl s_client -servername x.b.test`` verifies *.b.test's certificate for that name
    and exchanges lines with b's backend through the proxy."""
    need("openssl", "openssl")
    proxy, b = sni_tier["proxy"], sni_tier["b"]
    out = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{proxy.port}", "-servername", "x.b.test",
         "-CAfile", sni_tier["bundle"], "-verify_return_error", "-verify_hostname", "x.b.test",
         "-ign_eof"],
        input=b"hello from s_client" + END, capture_output=True, timeout=20,
    )
    text = out.stdout.decode(errors="replace")
    assert "Verify return code: 0 (ok)" in text, text + out.stderr.decode(errors="replace")
    assert re.search(r"^subject=CN ?= ?\*\.b\.test$", text, re.M), text
    assert "backend-b\nhello from s_client\nEND\n" in text, text
    b.up.join()
    assert b.names == ["x.b.test"] and b.up.accepted == 1 and not b.up.errors


# -- 5. two tiers: HAProxy over two splicepools -------------------------------------------------
class Load:
    """``lanes`` threads, each making short connections one after another from 127.0.0.1x: it
    sends 1 to 32 KiB and reads the echo, checked by sha256. ``results``: (start, client
    address, size, error or None) per connection; "corrupt" would be an echo that differs."""

    def __init__(self, port: int, lanes: int = 4) -> None:
        self.port = port
        self.results: list[tuple[float, str, int, str | None]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._lane, args=(k,), daemon=True) for k in range(lanes)]
        for t in self.threads:
            t.start()

    def _lane(self, k: int) -> None:
        i = 0
        while not self.stopping.is_set():
            i += 1
            size = 1 + (k * 7919 + i * 104729) % (32 << 10)
            data = payload(size, k * 100_000 + i)
            start, addr, error = time.monotonic(), "", None
            try:
                with connect_from(f"127.0.0.{10 + k}", self.port) as c:
                    addr = sockname(c)
                    c.sendall(data)
                    if digest(recv_exact(c, size, timeout=10)) != digest(data):
                        error = "corrupt"
            except (OSError, EOFError) as exc:
                error = repr(exc)
            with self.lock:
                self.results.append((start, addr, size, error))

    def ok_since(self, t: float) -> int:
        with self.lock:
            return sum(1 for start, _, _, error in self.results if start >= t and error is None)

    def stop(self) -> list[tuple[float, str, int, str | None]]:
        self.stopping.set()
        for t in self.threads:
            t.join(15)
            assert not t.is_alive()
        return list(self.results)


def two_tier_front(haproxy, proxies: list, stats_socket: str, extra: str = "") -> int:
    """The port of an HAProxy balancing round-robin over ``proxies`` (splicepools with
    --accept-proxy) with send-proxy-v2 and health checks every 200 ms (``extra``: more
    lines for its ``listen`` section), once it has seen every one of them UP."""
    front = haproxy(
        lambda port: [
            f"listen tier\n  bind 127.0.0.1:{port}\n  balance roundrobin\n{extra}"
            + "".join(f"  server s{i} 127.0.0.1:{p.port} send-proxy-v2 check inter 200ms fall 2 rise 2\n"
                      for i, p in enumerate(proxies, 1))
        ],
        global_lines=f"  stats socket {stats_socket} level admin\n",
    )
    every = {f"s{i}": "UP" for i in range(1, len(proxies) + 1)}
    wait_until(lambda: server_status(stats_socket) == every, 10, "every server UP")
    return front


def server_status(stats_socket: str) -> dict[str, str]:
    """HAProxy's view of its servers (``show stat`` on its stats socket): name -> status."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(stats_socket)
        s.sendall(b"show stat\n")
        text = recv_until_eof(s, timeout=5).decode()
    header, *rows = [row.split(",") for row in text.splitlines() if row]
    header[0] = header[0].lstrip("# ")  # the CSV header line starts with "# "
    name, status = header.index("svname"), header.index("status")
    return {
        row[name]: row[status]
        for row in rows
        if row[0] == "tier" and row[name] not in ("FRONTEND", "BACKEND")
    }


def test_two_tier_survives_a_killed_splicepool_and_a_reload(upstreams, start_proxy, haproxy, tmp_path):
    """HAProxy (roundrobin, send-proxy-v2, health checks every 200 ms) in front of two
    splicepools (--accept-proxy, --config) in front of one echo backend, under 4 lanes of short
    connections. kill -9 of one splicepool fails only connections begun before it died (at
    most one per lane); HAProxy marks it DOWN and every later connection succeeds through the
    survivor, which logs each with its real client and exact byte counts. A SIGHUP then
    reloads the survivor's --config (a new access list) with the load still running and no
    error. Health checks are not counted as pool refusals nor logged as warnings."""
    upstream = upstreams()
    configs = [tmp_path / "one.toml", tmp_path / "two.toml"]
    proxies = []
    for config in configs:
        config.write_text("accept-proxy = true\nworkers = 1\n")
        proxies.append(start_proxy(upstream.addr, "--config", str(config), stats=True))
    killed, survivor = proxies
    with tempfile.TemporaryDirectory(prefix="sp-hap-") as where:  # a short path: sun_path has 108 bytes
        stats_socket = f"{where}/stats.sock"
        front = two_tier_front(haproxy, proxies, stats_socket, "  retries 3\n  option redispatch 1\n")

        load = Load(front)
        try:
            for proxy in proxies:
                wait_until(lambda p=proxy: sum(" via " in ln["peer"] for ln in conn_lines(p)) >= 20, 10,
                           "20 client connections through each splicepool")
            killed.proc.kill()
            killed.proc.wait(5)
            dead = time.monotonic()
            wait_until(lambda: server_status(stats_socket)["s1"].startswith("DOWN"), 10, "HAProxy to mark s1 DOWN")
            assert server_status(stats_socket)["s2"] == "UP"
            down = time.monotonic()
            wait_until(lambda: load.ok_since(down) >= 100, 20, "100 connections after s1 is DOWN")

            configs[1].write_text('accept-proxy = true\nworkers = 1\nallow = ["127.0.0.0/8"]\n')
            survivor.signal(signal.SIGHUP)
            survivor.wait_log(r" INFO reloaded: proxying to ")
            reloaded = time.monotonic()
            wait_until(lambda: load.ok_since(reloaded) >= 100, 20, "100 connections after the reload")
        finally:
            results = load.stop()

    assert not [r for r in results if r[3] == "corrupt"]
    failed = [r for r in results if r[3] is not None]
    print(f"\ntwo tiers: {len(results)} connections, {len(failed)} cut by the kill")
    assert all(start < dead for start, _, _, _ in failed), failed
    assert len(failed) <= 4, failed  # at most the one connection each lane had open
    later = [(addr, size) for start, addr, size, error in results if start >= dead and error is None]
    assert len(later) >= 200

    def logged() -> dict[str, dict[str, str]] | None:
        lines = {ln["peer"].split(" via ")[0]: ln for ln in conn_lines(survivor) if " via " in ln["peer"]}
        return lines if all(addr in lines for addr, _ in later) else None

    lines = wait_until(logged, 10, "the survivor's log line of every connection after the kill")
    for addr, size in later:
        line = lines[addr]
        assert re.fullmatch(rf"{re.escape(addr)} via {HAPROXY_PEER}", line["peer"]), line
        assert (line["up"], line["down"], line["reason"]) == (str(size), str(size), "EOF"), line
    st = survivor.stats()
    assert st["connections"]["reloads"] == 1
    assert st["routes"]["access"] == "allow 127.0.0.0/8"
    # HAProxy's health checks (a LOCAL header, so no "via") reset before they are handed to the
    # pool: each is counted as closed early and logged at DEBUG only, never as a warning.
    assert re.findall(r" WARNING (.*)$", survivor.log(), re.M) == []
    assert set(st["connections"]["refusals"]) <= {"closed_early"}, st["connections"]
    assert survivor.proc.poll() is None


def test_sigterm_drains_a_splicepool_that_haproxy_then_stops_using(upstreams, start_proxy, haproxy):
    """The drain a balancer notices: SIGTERM closes the splicepool's listener at once, so
    HAProxy's next checks fail and it marks the server DOWN while a connection still live
    through it goes on; new connections all go to the other splicepool, intact; the live one
    finishes its bytes exactly (sha256 both ways) and the drained process exits 0 after it."""
    upstream = upstreams()
    proxies = [start_proxy(upstream.addr, "--accept-proxy", "--grace", "30", stats=True) for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="sp-hap-") as where:  # a short path: sun_path has 108 bytes
        stats_socket = f"{where}/stats.sock"
        front = two_tier_front(haproxy, proxies, stats_socket, "  timeout server 60s\n  timeout client 60s\n")
        first = payload(1 << 20, 71)
        rest = payload(3 << 20, 72)
        with connect_from("127.0.0.20", front) as live:
            live.sendall(first)
            assert digest(recv_exact(live, len(first))) == digest(first)
            # which splicepool holds it: the one with a live connection
            holder = wait_until(
                lambda: next((p for p in proxies if p.stats()["connections"]["live"] == 1), None), 5,
                "the splicepool holding the live connection")
            other = proxies[1 - proxies.index(holder)]
            name = f"s{proxies.index(holder) + 1}"
            holder.signal(signal.SIGTERM)
            holder.wait_log(r" INFO stopping: 1 connection\(s\) live, waiting up to 30\.0 s$")
            wait_until(lambda: server_status(stats_socket)[name].startswith("DOWN"), 10, f"HAProxy to mark {name} DOWN")
            before = other.stats()["connections"]["finished"]
            for k in range(20):  # new connections while the drain goes on: all through the other
                data = payload(4096 + k, 80 + k)
                with connect_from("127.0.0.21", front) as c:
                    c.sendall(data)
                    assert digest(recv_exact(c, len(data))) == digest(data)
            other.wait_stats(finished=before + 20)
            assert holder.proc.poll() is None  # still draining: its connection is live
            sender = threading.Thread(target=live.sendall, args=(rest,))
            sender.start()
            assert digest(recv_exact(live, len(rest), timeout=30)) == digest(rest)
            sender.join()
            live.shutdown(socket.SHUT_WR)
            assert recv_until_eof(live) == b""  # the echo server closes after our FIN
        assert holder.wait(30) == 0
    line = [ln for ln in conn_lines(holder) if ln["peer"].startswith("127.0.0.20:")]
    assert [(ln["up"], ln["down"], ln["reason"]) for ln in line] == [
        (str(len(first) + len(rest)), str(len(first) + len(rest)), "EOF")
    ]
