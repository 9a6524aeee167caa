"""splicepool.sni: the server name and ALPN names of real ClientHellos made by Python's ssl
(OpenSSL), read whole, split at every byte, re-fragmented over many records, and sent over
real loopback TCP; plus exact errors for hand-built malformed hellos and fuzzing."""

from __future__ import annotations

import random
import socket
import ssl
import struct
import threading

import pytest
from conftest import engine_free, tcp_pair
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from splicepool.sni import (
    MAX_HELLO,
    MAX_RECORD,
    ClientHello,
    ClientHelloError,
    NotTLS,
    parse_client_hello,
)

pytestmark = engine_free

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- real ClientHellos from OpenSSL -------------------------------------------------------


def client_context(alpn: list[str] | None = None, tls12: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False  # lets server_hostname be None (no SNI at all)
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if tls12:
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def real_hello(
    server_hostname: str | None = "example.com", alpn: list[str] | None = None, tls12=False
) -> bytes:
    """The bytes OpenSSL sends first for a client of this shape: one ClientHello."""
    outgoing = ssl.MemoryBIO()
    obj = client_context(alpn, tls12).wrap_bio(
        ssl.MemoryBIO(), outgoing, server_hostname=server_hostname
    )
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    data = outgoing.read()
    assert data[:1] == b"\x16" and len(data) == 5 + int.from_bytes(data[3:5], "big")
    return data


@pytest.fixture(scope="module")
def hello13() -> bytes:
    return real_hello("Example.COM", ["h2", "http/1.1"])


LONG_NAME = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 bytes, the DNS maximum


@pytest.mark.parametrize("tls12", [False, True], ids=["tls13", "tls12max"])
@pytest.mark.parametrize(
    ("hostname", "alpn", "expected_name"),
    [
        ("example.com", None, "example.com"),
        ("Example.COM", ["h2", "http/1.1"], "example.com"),
        ("www.example.org.", ["http/1.1"], "www.example.org"),
        ("my_host-1.internal", ["h2"], "my_host-1.internal"),
        (LONG_NAME.upper(), None, LONG_NAME),
        (None, ["h2"], None),
        ("127.0.0.1", None, None),  # ssl sends no SNI for an IP literal
        ("::1", ["h2"], None),
    ],
)
def test_real_hellos_give_their_name_and_alpn(hostname, alpn, expected_name, tls12):
    data = real_hello(hostname, alpn, tls12)
    assert parse_client_hello(data) == ClientHello(expected_name, tuple(alpn or ()), len(data))
    # Bytes after the hello (say, early data) are not looked at.
    assert parse_client_hello(data + b"\x17\x03\x03\x00\x05hello") == ClientHello(
        expected_name, tuple(alpn or ()), len(data)
    )
    assert parse_client_hello(bytearray(data)).server_name == expected_name
    assert parse_client_hello(memoryview(data)).server_name == expected_name


def test_tls12_and_tls13_hellos_differ_but_parse_alike():
    h12 = real_hello("a.example", ["h2"], tls12=True)
    h13 = real_hello("a.example", ["h2"])
    assert h12[9:11] == b"\x03\x03" and h13[9:11] == b"\x03\x03"
    assert b"\x00\x2b" in h13  # supported_versions, the TLS 1.3 marker
    assert parse_client_hello(h12) == ClientHello("a.example", ("h2",), len(h12))
    assert parse_client_hello(h13) == ClientHello("a.example", ("h2",), len(h13))


def test_every_prefix_of_a_real_hello_is_incomplete(hello13):
    for cut in range(len(hello13)):
        assert parse_client_hello(hello13[:cut]) is None, cut
    assert parse_client_hello(hello13) == ClientHello("example.com", ("h2", "http/1.1"), 517)


def refragment(data: bytes, sizes, version: bytes = b"\x03\x01") -> bytes:
    """The same handshake message as ``data`` (one record), cut into records of ``sizes``."""
    msg = data[5:]
    out = bytearray()
    pos = 0
    sizes = iter(sizes)
    while pos < len(msg):
        size = next(sizes, len(msg) - pos)
        chunk = msg[pos : pos + size]
        out += b"\x16" + version + struct.pack("!H", len(chunk)) + chunk
        pos += size
    return bytes(out)


def test_a_hello_fragmented_over_many_records_gives_the_same_answer(hello13):
    rng = random.Random(7)
    sizes = [rng.randint(1, 50) for _ in range(len(hello13))]
    data = refragment(hello13, sizes)
    records = 0
    pos = 0
    while pos < len(data):
        pos += 5 + int.from_bytes(data[pos + 3 : pos + 5], "big")
        records += 1
    assert records > 15
    expected = ClientHello("example.com", ("h2", "http/1.1"), len(data))
    assert parse_client_hello(data) == expected
    for cut in range(len(data)):
        assert parse_client_hello(data[:cut]) is None, cut
    # One byte per record: the handshake header itself is split over four records.
    ones = refragment(hello13, [1] * len(hello13), version=b"\x03\x03")
    assert len(ones) == 6 * (len(hello13) - 5)
    assert parse_client_hello(ones) == ClientHello("example.com", ("h2", "http/1.1"), len(ones))


@FUZZ
@given(sizes=st.lists(st.integers(1, 600), min_size=1, max_size=40))
def test_any_fragmentation_gives_the_same_answer(hello13, sizes):
    data = refragment(hello13, sizes)
    assert parse_client_hello(data) == ClientHello("example.com", ("h2", "http/1.1"), len(data))
    cut = sizes[0] % len(data)
    assert parse_client_hello(data[:cut]) is None


# --- real TCP ----------------------------------------------------------------------------


def test_a_real_tls_client_over_tcp_is_read_until_its_hello_is_complete():
    outcome: list[BaseException | None] = []
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        port = lsock.getsockname()[1]

        def client() -> None:
            ctx = client_context(["h2", "http/1.1"])
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                    with ctx.wrap_socket(sock, server_hostname="Service.Example.") as tls:
                        tls.version()
                outcome.append(None)
            except (ssl.SSLError, OSError) as exc:  # the listener closes without answering
                outcome.append(exc)

        thread = threading.Thread(target=client, daemon=True)
        thread.start()
        conn, _ = lsock.accept()
        with conn:
            conn.settimeout(5)
            buf = bytearray()
            calls = 0
            while (result := parse_client_hello(buf)) is None:
                calls += 1
                chunk = conn.recv(4096)
                assert chunk, f"EOF after {len(buf)} bytes, before a whole ClientHello"
                buf += chunk
        thread.join(5)
    assert not thread.is_alive()
    assert result == ClientHello("service.example", ("h2", "http/1.1"), len(buf))
    assert calls >= 1 and buf[:3] == b"\x16\x03\x01"
    assert len(outcome) == 1 and isinstance(outcome[0], (ssl.SSLError, OSError))


def test_a_hello_sent_one_byte_per_segment_is_parsed_as_it_arrives(hello13):
    client, server = tcp_pair()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    turn = threading.Semaphore(0)  # one byte in flight: each recv sees exactly one segment
    sent: list[int] = []

    def sender() -> None:
        for i in range(len(hello13)):
            client.send(hello13[i : i + 1])
            sent.append(i)
            if not turn.acquire(timeout=5):
                return

    thread = threading.Thread(target=sender, daemon=True)
    try:
        thread.start()
        server.settimeout(5)
        buf = bytearray()
        answers = []
        while len(buf) < len(hello13):
            chunk = server.recv(4096)
            assert len(chunk) == 1
            buf += chunk
            answers.append(parse_client_hello(buf))
            turn.release()
        thread.join(5)
    finally:
        client.close()
        server.close()
    assert bytes(buf) == hello13
    assert len(answers) == len(hello13) == len(sent)
    assert answers[:-1] == [None] * (len(hello13) - 1)
    assert answers[-1] == ClientHello("example.com", ("h2", "http/1.1"), len(hello13))


# --- hand-built hellos: exact answers and errors -------------------------------------------


def u8(n: int) -> bytes:
    return bytes([n])


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def ext(etype: int, data: bytes) -> bytes:
    return u16(etype) + u16(len(data)) + data


def sni(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(u8(name_type) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn(*names: bytes) -> bytes:
    entries = b"".join(u8(len(n)) + n for n in names)
    return ext(16, u16(len(entries)) + entries)


def body(
    exts: bytes | None = b"",
    *,
    version: bytes = b"\x03\x03",
    session_id: bytes = b"",
    suites: bytes = b"\x13\x01\x00\xff",
    compression: bytes = b"\x00",
) -> bytes:
    out = version + bytes(range(32)) + u8(len(session_id)) + session_id
    out += u16(len(suites)) + suites + u8(len(compression)) + compression
    if exts is not None:
        out += u16(len(exts)) + exts
    return out


def hello(exts: bytes | None = b"", *, record: bytes = b"\x16\x03\x01", **kw) -> bytes:
    """One record holding one ClientHello with these extensions."""
    b = body(exts, **kw)
    msg = b"\x01" + len(b).to_bytes(3, "big") + b
    return record + u16(len(msg)) + msg


def more_in_record(data: bytes, extra: bytes) -> bytes:
    """``data`` (one record) with ``extra`` bytes added to its record after the ClientHello."""
    return data[:3] + u16(len(data) - 5 + len(extra)) + data[5:] + extra


def error_of(data: bytes, **kw) -> str:
    with pytest.raises(ClientHelloError) as info:
        parse_client_hello(data, **kw)
    assert type(info.value) is ClientHelloError  # TLS, so not NotTLS
    return str(info.value)


def test_hand_built_hellos_parse_exactly():
    plain = hello(None)
    assert parse_client_hello(plain) == ClientHello(None, (), len(plain))
    assert len(plain) == 5 + 4 + 41 + 2  # two cipher suites, one compression method
    empty = hello(b"")
    assert parse_client_hello(empty) == ClientHello(None, (), len(empty))
    both = hello(ext(0xFF01, b"\x00") + alpn(b"h2", b"\xff\x00x") + sni(b"A.b-C_d.E."))
    assert parse_client_hello(both) == ClientHello("a.b-c_d.e", ("h2", "\xff\x00x"), len(both))
    # Another name type before the host_name is skipped.
    other = hello(ext(0, u16(13) + b"\x07" + u16(2) + b"zz" + b"\x00" + u16(5) + b"a.b.c"))
    assert parse_client_hello(other).server_name == "a.b.c"
    only_other = hello(sni(b"zz", name_type=7))
    assert parse_client_hello(only_other) == ClientHello(None, (), len(only_other))
    name = b"x" * 63 + b"." + b"y" * 63 + b"." + b"z" * 63 + b"." + b"w" * 62 + b"."
    assert len(name) == 255
    assert parse_client_hello(hello(sni(name))).server_name == name[:-1].decode()
    assert parse_client_hello(hello(sni(b"1.2.3.4"))).server_name == "1.2.3.4"
    sessioned = hello(sni(b"s"), session_id=bytes(32), version=b"\x03\x00", record=b"\x16\x03\x00")
    assert parse_client_hello(sessioned) == ClientHello("s", (), len(sessioned))


@pytest.mark.parametrize(
    "data",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x80\x2e\x01\x03\x01",
        b"\x15\x03\x01",
        b"\x17",
        b"\x00",
        b"\x16\x02",
        b"\x16\x00\x00\x00\x05",
    ],
    ids=["http", "sslv2", "alert", "appdata", "nul", "major2", "major0"],
)
def test_not_tls_is_reported_at_the_first_byte_that_shows_it(data):
    with pytest.raises(NotTLS):
        parse_client_hello(data)
    with pytest.raises(NotTLS):
        parse_client_hello(data[:2] if data[:1] == b"\x16" else data[:1])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x16\x03\x05", "record version 3.5"),
        (b"\x16\x03\x01\x00\x00", "length 0"),
        (b"\x16\x03\x01" + u16(MAX_RECORD + 1), f"record length {MAX_RECORD + 1}"),
        (b"\x16\x03\x01\x00\x30\x02", "message type 2 is not ClientHello"),
        (b"\x16\x03\x01\x00\x30\x01\x00\x00\x28", "length 40 is under"),
        (more_in_record(hello(sni(b"a")), b"\x16\x03\x01"), "has more bytes"),
        (hello(None, version=b"\x02\x00"), "version 2.0"),
        (hello(None, version=b"\x03\x05"), "version 3.5"),
        (hello(None, session_id=bytes(33)), "session_id length 33"),
        (hello(sni(b"a"), suites=b"\x13"), "cipher_suites length 1"),
        (hello(sni(b"ab"), suites=b""), "cipher_suites length 0"),
        (hello(None, compression=b""), "compression_methods is empty"),
        (hello(sni(b"a") + sni(b"b")), "extension 0 appears twice"),
        (hello(alpn(b"h2") + alpn(b"h2")), "extension 16 appears twice"),
        (hello(ext(5, b"") + ext(5, b"")), "extension 5 appears twice"),
        (hello(sni(b"a", b"b")), "two host_name entries"),
        (hello(ext(0, b"")), "server_name list length runs past"),
        (hello(ext(0, u16(0))), "server_name list is empty"),
        (hello(ext(0, u16(3) + b"\x00" + u16(1) + b"a")), "server_name list does not fill"),
        (hello(sni(b"")), "server name length 0"),
        (hello(sni(b"a" * 256)), "server name length 256"),
        (hello(sni(b"a b")), "byte 0x20"),
        (hello(sni(b"a\x00b")), "byte 0x00"),
        (hello(sni(b"*.example")), "byte 0x2a"),
        (hello(sni("ü.example".encode())), "byte 0xc3"),
        (hello(sni(b"a..b")), "a label of 0 bytes"),
        (hello(sni(b".a")), "a label of 0 bytes"),
        (hello(sni(b".")), "a label of 0 bytes"),
        (hello(sni(b"a" * 64 + b".b")), "a label of 64 bytes"),
        (hello(ext(16, u16(0))), "ALPN list is empty"),
        (hello(alpn(b"h2", b"")), "ALPN name is empty"),
        (hello(ext(16, u16(3) + b"\x05h2")), "ALPN name length 5 runs past"),
        (hello(u16(1) + u16(9) + b"x"), "extension 1 length 9 runs past"),
        (hello(b"\x00"), "extension type runs past"),
    ],
)
def test_malformed_hellos_raise_naming_the_fault(data, message):
    assert message in error_of(data)


def test_the_extensions_block_must_end_with_the_message():
    base = hello(sni(b"a"))
    # Shorten the extensions length by one: one stray byte before the message ends.
    ext_len_at = 5 + 4 + 2 + 32 + 1 + 2 + 4 + 1 + 1
    short = bytearray(base)
    short[ext_len_at + 1] -= 1
    assert "1 bytes after the extensions" in error_of(bytes(short))
    longer = bytearray(base)
    longer[ext_len_at + 1] += 1
    assert "extensions length 11 runs past" in error_of(bytes(longer))


def test_another_record_type_before_the_hello_is_complete_is_an_error(hello13):
    first, rest = refragment(hello13, [100])[:105], refragment(hello13, [100])[105:]
    assert parse_client_hello(first) is None
    assert "content type 21" in error_of(first + b"\x15\x03\x03\x00\x02\x02\x28" + rest)
    assert "content type 20" in error_of(first + b"\x14\x03\x03\x00\x01\x01")
    assert "record 2 has version major 2" in error_of(first + b"\x16\x02")


def test_max_size_bounds_the_input_looked_at(hello13):
    assert parse_client_hello(hello13, max_size=len(hello13)).length == len(hello13)
    assert "max_size=516" in error_of(hello13, max_size=len(hello13) - 1)
    # Known from the record header alone, before the rest arrives.
    assert "max_size=100" in error_of(hello13[:5], max_size=100)
    # Known from the handshake length, even when the first record is small.
    frag = refragment(hello13, [10])
    assert "(508 bytes) needs more than max_size=400" in error_of(frag[:15], max_size=400)
    big = hello(ext(0xAAAA, bytes(MAX_HELLO)))
    assert "max_size=16384" in error_of(big)
    assert parse_client_hello(big, max_size=len(big)) == ClientHello(None, (), len(big))
    for bad in (0, -1, 1.5, True, "100"):
        with pytest.raises(ValueError, match="max_size must be a positive int"):
            parse_client_hello(hello13, max_size=bad)


def test_input_is_never_changed(hello13):
    buf = bytearray(hello13)
    assert parse_client_hello(buf).length == 517
    assert bytes(buf) == hello13


# --- fuzzing -------------------------------------------------------------------------------


def parse_or_error(data: bytes):
    try:
        return parse_client_hello(data)
    except ClientHelloError as exc:
        return exc


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_raise_only_clienthelloerror(data):
    result = parse_or_error(data)
    assert result is None or isinstance(result, (ClientHello, ClientHelloError))


@FUZZ
@given(st.binary(max_size=400), st.sampled_from([b"\x16\x03\x01", b"\x16\x03\x03\x01\x00\x01"]))
def test_random_bytes_after_a_tls_header_raise_only_clienthelloerror(data, head):
    result = parse_or_error(head + data)
    assert not isinstance(result, NotTLS)
    assert result is None or isinstance(result, (ClientHello, ClientHelloError))


# Where each length field of ``hello(sni(b"name.example") + alpn(b"h2"))`` is, and its size.
_FUZZ_HELLO = hello(sni(b"name.example") + alpn(b"h2"))
_LENGTH_FIELDS = {
    "record": (3, 2),
    "handshake": (6, 3),
    "session_id": (43, 1),
    "cipher_suites": (44, 2),
    "compression": (50, 1),
    "extensions": (52, 2),
    "server_name ext": (56, 2),
    "server_name list": (58, 2),
    "host_name": (61, 2),
    "alpn ext": (77, 2),
    "alpn list": (79, 2),
    "alpn name": (81, 1),
}
# The fields before the extensions: a changed length there may realign the rest of the
# bytes into another well-formed hello (see the test after the fuzz test).
_REALIGNING = {"session_id", "cipher_suites", "compression"}


def test_the_length_field_map_is_right():
    assert parse_client_hello(_FUZZ_HELLO) == ClientHello("name.example", ("h2",), 84)
    lengths = {
        k: int.from_bytes(_FUZZ_HELLO[a : a + n], "big") for k, (a, n) in _LENGTH_FIELDS.items()
    }
    assert lengths == {
        "record": 79, "handshake": 75, "session_id": 0, "cipher_suites": 4, "compression": 1,
        "extensions": 30, "server_name ext": 17, "server_name list": 15, "host_name": 12,
        "alpn ext": 5, "alpn list": 3, "alpn name": 2,
    }  # fmt: skip


@FUZZ
@given(
    field=st.sampled_from(sorted(_LENGTH_FIELDS)),
    delta=st.integers(-300, 300).filter(bool),
    cut=st.integers(0, 84),
)
def test_a_wrong_length_field_is_an_error_or_incomplete_never_a_crash(field, delta, cut):
    at, size = _LENGTH_FIELDS[field]
    original = int.from_bytes(_FUZZ_HELLO[at : at + size], "big")
    value = (original + delta) % 256**size
    assume(value != original)
    data = _FUZZ_HELLO[:at] + value.to_bytes(size, "big") + _FUZZ_HELLO[at + size :]
    for candidate in (data, data[:cut]):
        result = parse_or_error(candidate)
        if field in _REALIGNING and isinstance(result, ClientHello):
            continue
        assert result is None or isinstance(result, ClientHelloError), (field, value, result)


def test_a_wrong_body_length_can_realign_into_another_valid_hello():
    # Why _REALIGNING exists: TLS has no redundancy before the extensions, so a cipher suite
    # list 28 bytes longer eats the extensions and leaves 5 compression methods.
    at, size = _LENGTH_FIELDS["cipher_suites"]
    data = _FUZZ_HELLO[:at] + u16(32) + _FUZZ_HELLO[at + size :]
    assert parse_client_hello(data) == ClientHello(None, (), 84)


@FUZZ
@given(at=st.integers(0, 516), byte=st.integers(0, 255), cut=st.integers(0, 517))
def test_a_corrupted_real_hello_raises_only_clienthelloerror(hello13, at, byte, cut):
    data = hello13[:at] + bytes([byte]) + hello13[at + 1 :]
    for candidate in (data, data[:cut]):
        result = parse_or_error(candidate)
        assert result is None or isinstance(result, (ClientHello, ClientHelloError))
