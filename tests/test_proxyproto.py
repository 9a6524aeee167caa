"""The PROXY protocol (splicepool.proxyproto): the parser, the encoders, and HAProxy as the
real peer on both sides (it sends headers we parse, and it parses headers we send).
"""

from __future__ import annotations

import ipaddress
import shutil
import socket
import subprocess

import pytest
from conftest import engine_free, free_port, recv_until_eof, until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splicepool.proxyproto import (
    V1_MAX,
    V2_MAX,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse,
)

pytestmark = engine_free

SIG = V2_SIGNATURE


def v2(command: int, family: int, body: bytes, length: int | None = None) -> bytes:
    """A version 2 header built by hand (not by encode_v2), with a length field of choice."""
    size = len(body) if length is None else length
    return SIG + bytes([command, family]) + size.to_bytes(2, "big") + body


IPV4_BLOCK = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + (1234).to_bytes(2, "big") + b"\x00\x50"
IPV6_BLOCK = (
    ipaddress.IPv6Address("2001:db8::1").packed
    + ipaddress.IPv6Address("::ffff:10.0.0.1").packed
    + b"\xff\xff\x00\x00"
)


def raises(data: bytes, *words: str, max_size: int = V2_MAX) -> str:
    with pytest.raises(ProxyProtocolError) as info:
        parse(data, max_size=max_size)
    message = str(info.value)
    for word in words:
        assert word in message, f"{word!r} not in {message!r}"
    return message


# -- detection ----------------------------------------------------------------------------


def test_the_first_bytes_decide_at_once():
    raises(b"G", "first byte", "b'G'")
    raises(b"GET / HTTP/1.1\r\n", "first byte")
    raises(b"\x16\x03\x01", "first byte")  # a TLS ClientHello
    assert parse(b"") is None
    assert parse(b"P") is None
    assert parse(b"PRO") is None
    assert parse(b"PROXY") is None
    assert parse(b"PROXY ") is None
    assert parse(b"\r") is None
    assert parse(b"\r\n\r\n\x00") is None
    assert parse(SIG) is None
    raises(b"PROXX", "not a PROXY protocol header", "'PROXY '")
    raises(b"PROXY\t", "'PROXY '")
    raises(b"proxy ", "first byte")
    raises(b"\r\n\r\n\x01", "v2 signature")
    raises(b"\r\n\r\n\x00\r\nQUIT\r", "v2 signature")


# -- version 1 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "source", "dest"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
            ("192.0.2.1", 56324),
            ("198.51.100.2", 443),
        ),
        (
            b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n",
            ("0.0.0.0", 0),
            ("255.255.255.255", 65535),
        ),
        (b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n", ("2001:db8::1", 1), ("::1", 2)),
        (
            b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
            b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
            ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535),
        ),
        (
            b"PROXY TCP6 ::ffff:192.0.2.1 0:0:0:0:0:ffff:c000:202 80 8080\r\n",
            (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 80),
            (str(ipaddress.IPv6Address("::ffff:192.0.2.2")), 8080),
        ),
    ],
)
def test_v1_tcp_lines_give_their_addresses_and_leave_what_follows(line, source, dest):
    after = b"GET / HTTP/1.0\r\n\r\n"
    h = parse(line + after)
    assert h == ProxyHeader(1, False, source, dest, (), len(line))
    assert (line + after)[h.length :] == after
    assert parse(line) == h


def test_v1_mapped_ipv6_stays_ipv6():
    h = parse(b"PROXY TCP6 ::ffff:1.2.3.4 ::ffff:5.6.7.8 1 2\r\n")
    assert ipaddress.ip_address(h.source[0]).version == 6
    assert ipaddress.ip_address(h.source[0]).ipv4_mapped == ipaddress.IPv4Address("1.2.3.4")


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN 192.0.2.1 198.51.100.2 1 2\r\n",
        b"PROXY UNKNOWN ffff:f...f:ffff whatever \x00\xff\r\n",
        b"PROXY UNKNOWN" + b" " * (V1_MAX - 15) + b"\r\n",
    ],
)
def test_v1_unknown_is_local_whatever_follows_it(line):
    assert len(line) <= V1_MAX
    h = parse(line + b"\x00data")
    assert h == ProxyHeader(1, True, None, None, (), len(line))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", ("protocol", "TCP5")),
        (b"PROXY TCP", ()),  # a valid beginning: checked below to be None, not here
        (b"PROXY tcp4", ("protocol",)),
        (b"PROXY UNKNOWNX\r\n", ("protocol",)),
        (b"PROXY  TCP4", ("protocol",)),
        (b"PROXY TCP4  1.2.3.4", ("source address", "empty")),
        (b"PROXY TCP4 1.2.3.4  5", ("destination address", "empty")),
        (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", ("source address", "leading zeros")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.256 1 2\r\n", ("destination address", "dotted quad")),
        (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", ("source address",)),
        (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", ("source address",)),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", ("source address",)),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", ("source address", "IPv6")),
        (b"PROXY TCP6 ::1 fe80::1%eth0 1 2\r\n", ("destination address", "IPv6")),
        (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", ("destination address", "IPv6")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", ("source port", "leading zeros")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", ("destination port", "0..65535")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", ("source port",)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n", ("source port",)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", ("more than 4 fields",)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", ("more than 4 fields",)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", ("3 of its 4 fields",)),
        (b"PROXY TCP4\r\n", ("0 of its 4 fields",)),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", ("lone LF", "CRLF")),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", ("not followed by LF", "CRLF")),
        (b"PROXY UNKNOWN\n", ("lone LF",)),
        (b"PROXY UNKNOWN\r\r\n", ("not followed by LF",)),
        (b"PROXY UNKNOWN" + b" " * (V1_MAX - 13), ("no CRLF", "107")),
        (b"PROXY UNKNOWN" + b" " * (V1_MAX - 14) + b"\r", ("no CRLF", "107")),
    ],
)
def test_v1_errors_name_what_is_wrong(data, words):
    if not words:
        assert parse(data) is None
        return
    raises(data, *words)


def test_v1_errors_come_as_soon_as_the_bytes_cannot_be_a_header():
    """Each of these is the shortest input that shows the fault: one byte less is None."""
    for data in [
        b"PROXY X",
        b"PROXY TCP7",
        b"PROXY TCP4 1.2.3.4x",
        b"PROXY TCP4 256",
        b"PROXY TCP4 00",
        b"PROXY TCP4 1.2.3.4.",
        b"PROXY TCP4 1234",
        b"PROXY TCP6 ::g",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 00",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 123456",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r",
        b"PROXY TCP4 1.2.3.4\n",
    ]:
        assert parse(data[:-1]) is None, data
        with pytest.raises(ProxyProtocolError):
            parse(data)


# -- version 2 ----------------------------------------------------------------------------


def test_v2_tcp4_and_tcp6_give_their_addresses_and_tlvs():
    tlv_bytes = b"\x01\x00\x02h2" + b"\xe0\x00\x00" + b"\x02\x00\x0bexample.com"
    tlvs = ((0x01, b"h2"), (0xE0, b""), (0x02, b"example.com"))
    header = v2(0x21, 0x11, IPV4_BLOCK + tlv_bytes)
    h = parse(header + b"after")
    assert h == ProxyHeader(2, False, ("192.0.2.1", 1234), ("198.51.100.2", 80), tlvs, 16 + 12 + 22)
    assert (header + b"after")[h.length :] == b"after"

    header = v2(0x21, 0x21, IPV6_BLOCK)
    h = parse(header + b"\r\n\r\n")
    mapped = str(ipaddress.IPv6Address("::ffff:10.0.0.1"))
    assert h == ProxyHeader(2, False, ("2001:db8::1", 65535), (mapped, 0), (), 52)


@pytest.mark.parametrize(
    ("command", "family", "body", "tlvs"),
    [
        (0x20, 0x00, b"", ()),  # LOCAL, UNSPEC: a health check
        (0x20, 0x00, b"\x04\x00\x01\x00", ((0x04, b"\x00"),)),  # LOCAL with a NOOP TLV
        (0x20, 0x11, IPV4_BLOCK, ()),  # LOCAL with addresses: they are ignored
        (0x20, 0x21, IPV6_BLOCK + b"\x05\x00\x02id", ((0x05, b"id"),)),
        (0x20, 0x7F, b"not TLVs at all", ()),  # LOCAL, unknown family: the block is skipped
        (0x21, 0x00, b"", ()),  # PROXY, UNSPEC
        (0x21, 0x12, IPV4_BLOCK, ()),  # PROXY, UDP over IPv4
        (0x21, 0x22, IPV6_BLOCK, ()),  # PROXY, UDP over IPv6
        (0x21, 0x31, b"/tmp/a".ljust(108, b"\0") + b"/tmp/b".ljust(108, b"\0"), ()),  # UNIX
        (0x21, 0x32, bytes(216) + b"\x01\x00\x00", ((0x01, b""),)),  # UNIX datagram
    ],
)
def test_v2_without_tcp_addresses_is_local(command, family, body, tlvs):
    header = v2(command, family, body)
    h = parse(header + b"X")
    assert h == ProxyHeader(2, True, None, None, tlvs, 16 + len(body))


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (SIG + b"\x11", ("version is 1", "not 2")),
        (SIG + b"\x31", ("version is 3",)),
        (SIG + b"\x01", ("version is 0",)),
        (SIG + b"\x22", ("command is 2", "LOCAL", "PROXY")),
        (SIG + b"\x2f", ("command is 15",)),
        (SIG + b"\x21\x13", ("family", "0x13")),
        (SIG + b"\x21\x41", ("family", "0x41")),
        (SIG + b"\x21\x10", ("family", "0x10")),
        (SIG + b"\x21\x11\x00\x0b", ("11 bytes", "shorter", "12 bytes")),
        (SIG + b"\x21\x21\x00\x0c", ("12 bytes", "shorter", "36 bytes")),
        (SIG + b"\x20\x31\x00\x24", ("36 bytes", "shorter", "216 bytes")),
        (v2(0x21, 0x11, IPV4_BLOCK + b"\x01"), ("TLV truncated", "1 bytes are left")),
        (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00"), ("TLV truncated", "2 bytes are left")),
        (v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x03ab"), ("TLV truncated", "type 0x01", "1 bytes")),
        (v2(0x20, 0x00, b"\x01\x00\x01a\x02"), ("TLV truncated",)),
    ],
)
def test_v2_errors_name_what_is_wrong(data, words):
    raises(data, *words)


def test_v2_errors_come_as_soon_as_the_bytes_cannot_be_a_header():
    # A length over the limit: known from the fixed 16 bytes alone.
    message = raises(SIG + b"\x21\x11\x01\x00", "length 256", "limit of 100", max_size=116)
    assert "max_size 116" in message
    assert parse(SIG + b"\x21\x11\x00\x64", max_size=116) is None  # 100: exactly the limit
    # A TLV running past the header's end: known once its own 3 bytes are in.
    start = SIG + b"\x21\x11\x00\x14" + IPV4_BLOCK + b"\x01\x00"
    assert parse(start) is None
    raises(start + b"\x06", "TLV truncated")  # 3 + 6 bytes, but only 8 are left
    assert parse(start + b"\x05") is None  # 3 + 5 bytes: exactly what is left


def test_max_size_bounds_both_versions():
    body = IPV4_BLOCK + b"\x01\x00\x04abcd"  # 19 bytes after the fixed 16
    assert parse(v2(0x21, 0x11, body), max_size=35).length == 35
    raises(v2(0x21, 0x11, body), "length 19", "limit of 18", max_size=34)
    assert parse(SIG + b"\x21\x11\xff\xff") is None  # 65535 is within the default
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"  # 45 bytes
    assert parse(line, max_size=45).length == 45
    raises(line, "no CRLF", "44 bytes", max_size=44)
    with pytest.raises(ValueError, match="at least 16") as info:
        parse(b"PROXY UNKNOWN\r\n", max_size=15)
    assert type(info.value) is ValueError
    with pytest.raises(TypeError, match="max_size"):
        parse(b"", max_size=100.0)


def valid_headers() -> list[bytes]:
    return [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n",
        b"PROXY TCP6 2001:db8::1 ::ffff:1.2.3.4 0 65535\r\n",
        b"PROXY UNKNOWN\r\n",
        b"PROXY UNKNOWN ignored \xff\r\n",
        encode_v2(("192.0.2.1", 1), ("198.51.100.2", 2), tlvs=[(1, b"h2"), (0x20, b"x" * 40)]),
        encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2)),
        encode_v2(None, None),
        encode_v2(None, None, tlvs=[(4, b"")]),
        v2(0x21, 0x31, bytes(216) + b"\x01\x00\x01z"),
        v2(0x20, 0x99, b"opaque"),
    ]


@pytest.mark.parametrize("header", valid_headers())
def test_every_prefix_of_a_valid_header_is_none_and_the_whole_is_read(header):
    after = b"\r\nPROXY more bytes that are not the header's"
    for cut in range(len(header)):
        assert parse(header[:cut]) is None, cut
    h = parse(header)
    assert h.length == len(header)
    assert parse(header + after) == h
    assert (header + after)[h.length :] == after
    # bytes, bytearray and memoryview: one answer.
    assert parse(bytearray(header + after)) == h
    assert parse(memoryview(b"xx" + header + after)[2:]) == h


def test_parse_takes_bytes_only():
    with pytest.raises(TypeError):
        parse("PROXY UNKNOWN\r\n")


# -- encoding -----------------------------------------------------------------------------


def test_encode_v1_writes_the_spec_lines():
    assert encode_v1(("192.0.2.1", 56324), ("198.51.100.2", 443)) == (
        b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    )
    assert (
        encode_v1(("2001:DB8:0::1", 0), ("::1", 65535)) == b"PROXY TCP6 2001:db8::1 ::1 0 65535\r\n"
    )
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(("192.0.2.1", 1), None) == b"PROXY UNKNOWN\r\n"
    assert encode_v1(None, ("::1", 1)) == b"PROXY UNKNOWN\r\n"
    longest = encode_v1(("ffff:" * 7 + "ffff", 65535), ("ffff:" * 7 + "ffff", 65535))
    assert len(longest) == 104 <= V1_MAX
    assert encode_v1((ipaddress.ip_address("10.0.0.1"), 1), ("10.0.0.2", 2)).startswith(
        b"PROXY TCP4 10.0.0.1 10.0.0.2"
    )


def test_encode_v2_writes_the_spec_bytes():
    assert encode_v2(("192.0.2.1", 1234), ("198.51.100.2", 80)) == v2(0x21, 0x11, IPV4_BLOCK)
    assert encode_v2(("2001:db8::1", 65535), ("::ffff:10.0.0.1", 0)) == v2(0x21, 0x21, IPV6_BLOCK)
    assert encode_v2(None, None) == SIG + b"\x20\x00\x00\x00"
    assert encode_v2(None, ("::1", 1), tlvs=[(4, b"ab")]) == SIG + b"\x20\x00\x00\x05\x04\x00\x02ab"
    assert encode_v2(
        ("192.0.2.1", 1234),
        ("198.51.100.2", 80),
        tlvs=iter([(1, bytearray(b"h2")), (2, memoryview(b""))]),
    ) == v2(0x21, 0x11, IPV4_BLOCK + b"\x01\x00\x02h2\x02\x00\x00")
    biggest = encode_v2(None, None, tlvs=[(0xFF, bytes(0xFFFF - 3))])
    assert len(biggest) == V2_MAX
    assert parse(biggest).tlvs == ((0xFF, bytes(0xFFFF - 3)),)


def test_an_ipv6_socket_address_can_be_passed_as_it_is():
    with socket.socket(socket.AF_INET6) as lsock:
        lsock.bind(("::1", 0))
        lsock.listen(1)
        with socket.create_connection(lsock.getsockname()[:2]):
            server, _ = lsock.accept()
            with server:
                peer, me = server.getpeername(), server.getsockname()
    assert len(peer) == 4
    for encode in (encode_v1, encode_v2):
        h = parse(encode(peer, me))
        assert (h.source, h.dest) == (("::1", peer[1]), ("::1", me[1]))


@pytest.mark.parametrize("encode", [encode_v1, encode_v2])
@pytest.mark.parametrize(
    ("source", "dest", "error", "words"),
    [
        (("192.0.2.1", 1), ("::1", 2), ValueError, ("IPv4", "IPv6", "family")),
        (("::1", 1), ("192.0.2.1", 2), ValueError, ("IPv6", "IPv4")),
        (("localhost", 1), ("192.0.2.1", 2), ValueError, ("source ip", "localhost")),
        (("192.0.2.1", 1), ("192.0.2.256", 2), ValueError, ("dest ip",)),
        (("192.0.2.1", 65536), ("192.0.2.2", 2), ValueError, ("source port 65536", "0..65535")),
        (("192.0.2.1", 1), ("192.0.2.2", -1), ValueError, ("dest port -1",)),
        (("fe80::1%eth0", 1), ("fe80::2", 2), ValueError, ("scope id",)),
        (("192.0.2.1", 1, 0, 0), ("192.0.2.2", 2), ValueError, ("4-tuple",)),
        (("192.0.2.1", True), ("192.0.2.2", 2), TypeError, ("source port", "bool")),
        (("192.0.2.1", "80"), ("192.0.2.2", 2), TypeError, ("source port", "str")),
        ((3232235777, 1), ("192.0.2.2", 2), TypeError, ("source ip", "int")),
        ("192.0.2.1:80", ("192.0.2.2", 2), TypeError, ("source", "tuple")),
        (("192.0.2.1", 1), ("192.0.2.2",), TypeError, ("dest",)),
        (("192.0.2.1", 1), None, ValueError, ()),  # checked below: this one is fine
        ((None, 1), None, TypeError, ("source ip",)),  # the other being None checks it anyway
    ],
)
def test_encode_errors_name_what_is_wrong(encode, source, dest, error, words):
    if not words:
        assert parse(encode(source, dest)).local
        return
    with pytest.raises(error) as info:
        encode(source, dest)
    assert not isinstance(info.value, ProxyProtocolError)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


@pytest.mark.parametrize(
    ("tlvs", "error", "words"),
    [
        ([(256, b"")], ValueError, ("TLV 0", "type 256", "0..255")),
        ([(1, b""), (-1, b"")], ValueError, ("TLV 1", "type -1")),
        ([(1, bytes(0x10000))], ValueError, ("TLV 0", "65536 bytes", "over 65535")),
        ([(1, bytes(0x8000)), (2, bytes(0x8000))], ValueError, ("over 65535",)),
        ([(1, "text")], TypeError, ("TLV 0", "bytes")),
        ([(1, 5)], TypeError, ("TLV 0", "bytes")),
        ([(True, b"")], TypeError, ("TLV 0", "type", "bool")),
        ([(1, b"", 3)], TypeError, ("TLV 0", "pair")),
        ([b"ab"], TypeError, ("TLV 0", "pair")),
    ],
)
def test_encode_v2_tlv_errors_name_what_is_wrong(tlvs, error, words):
    with pytest.raises(error) as info:
        encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), tlvs=tlvs)
    for word in words:
        assert word in str(info.value), f"{word!r} not in {info.value}"


# -- properties ---------------------------------------------------------------------------

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

ports = st.integers(0, 65535)
pairs = st.one_of(
    st.tuples(st.ip_addresses(v=4).map(str), ports, st.ip_addresses(v=4).map(str), ports),
    st.tuples(st.ip_addresses(v=6).map(str), ports, st.ip_addresses(v=6).map(str), ports),
)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=300)), max_size=6)


@PROPERTY
@given(pairs, tlv_lists, st.binary(max_size=20))
def test_encoded_headers_round_trip(pair, tlvs, after):
    src_ip, src_port, dst_ip, dst_port = pair
    source, dest = (src_ip, src_port), (dst_ip, dst_port)
    want_src = (str(ipaddress.ip_address(src_ip)), src_port)
    want_dst = (str(ipaddress.ip_address(dst_ip)), dst_port)
    one = encode_v1(source, dest)
    assert len(one) <= V1_MAX
    assert parse(one + after) == ProxyHeader(1, False, want_src, want_dst, (), len(one))
    two = encode_v2(source, dest, tlvs=tlvs)
    assert parse(two + after) == ProxyHeader(2, False, want_src, want_dst, tuple(tlvs), len(two))
    local = encode_v2(None, dest, tlvs=tlvs)
    assert parse(local + after) == ProxyHeader(2, True, None, None, tuple(tlvs), len(local))


@PROPERTY
@given(pairs, tlv_lists, st.booleans(), st.data())
def test_any_prefix_of_an_encoded_header_is_none(pair, tlvs, one, data):
    src_ip, src_port, dst_ip, dst_port = pair
    if one:
        header = encode_v1((src_ip, src_port), (dst_ip, dst_port))
    else:
        header = encode_v2((src_ip, src_port), (dst_ip, dst_port), tlvs=tlvs)
    cut = data.draw(st.integers(0, len(header) - 1))
    assert parse(header[:cut]) is None


def check_any(data: bytes) -> None:
    """``parse`` gives a header no longer than ``data``, None, or a ProxyProtocolError."""
    try:
        h = parse(data)
    except ProxyProtocolError:
        return
    if h is not None:
        assert 0 < h.length <= len(data)
        assert h.version in (1, 2)
        assert h.local == (h.source is None) == (h.dest is None)


starts = st.sampled_from(
    [b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", b"PROXY TCP4 1.2.3.4 "]
    + [SIG, SIG + b"\x21", SIG + b"\x20", SIG + b"\x21\x11", SIG + b"\x21\x21", SIG + b"\x20\x00"]
)


@PROPERTY
@given(starts, st.binary(max_size=120))
def test_random_bytes_raise_nothing_but_proxy_protocol_error(start, tail):
    check_any(start + tail)


@PROPERTY
@given(st.sampled_from(valid_headers()), st.data())
def test_damaged_headers_raise_nothing_but_proxy_protocol_error(header, data):
    index = data.draw(st.integers(0, len(header) - 1))
    byte = data.draw(st.integers(0, 255))
    damaged = header[:index] + bytes([byte]) + header[index + 1 :]
    check_any(damaged)
    check_any(damaged[: data.draw(st.integers(0, len(damaged)))])


# -- HAProxy, the real peer ---------------------------------------------------------------

GLOBAL = """global
  maxconn 100
defaults
  mode tcp
  timeout connect 5s
  timeout client 30s
  timeout server 30s
"""

#: name -> (frontend host, bind options, server options)
SECTIONS = {
    "send_v1": ("127.0.0.1", "", "send-proxy"),
    "send_v2": ("127.0.0.1", "", "send-proxy-v2"),
    "send_v2_crc": ("127.0.0.1", "", "send-proxy-v2 proxy-v2-options crc32c"),
    "send_v2_ipv6": ("::1", "", "send-proxy-v2"),
    "accept_v1": ("127.0.0.1", "accept-proxy", "send-proxy-v2"),
    "accept_v2": ("127.0.0.1", "accept-proxy", "send-proxy-v2"),
    "accept_local": ("127.0.0.1", "accept-proxy", "send-proxy-v2"),
    "accept_bad": ("127.0.0.1", "accept-proxy", "send-proxy-v2"),
}


def launch_haproxy(tmp_path, sections: list[str], global_lines: str = "") -> subprocess.Popen | None:
    """``haproxy -db`` on ``GLOBAL`` (``global_lines`` added to its global section), ``sections``
    and a probe frontend that rejects every connection; returns once the probe connects
    (haproxy binds every listener before it serves any), or None when haproxy exited at once
    or its probe never answered (a port that free_port found was taken: pick others and call
    again). Its output goes to ``tmp_path/haproxy.out`` and ``haproxy.err``; the caller stops
    the process."""
    probe = free_port()
    cfg = [GLOBAL.replace("global\n", "global\n" + global_lines, 1), *sections]
    cfg.append(f"frontend probe\n  bind 127.0.0.1:{probe}\n  tcp-request connection reject\n")
    path = tmp_path / "haproxy.cfg"
    path.write_text("\n".join(cfg))
    with (
        open(tmp_path / "haproxy.out", "wb") as out,
        open(tmp_path / "haproxy.err", "wb") as err,
    ):
        proc = subprocess.Popen(["haproxy", "-f", str(path), "-db"], stdout=out, stderr=err)

    def listening() -> bool:
        try:
            socket.create_connection(("127.0.0.1", probe), timeout=1).close()
        except OSError:
            return False
        return True

    until(lambda: proc.poll() is not None or listening(), 10)
    if proc.poll() is not None:
        return None
    if not listening():  # it runs, but its probe port answers no connect: try other ports
        proc.kill()
        proc.wait(5)
        return None
    return proc


class HAProxy:
    """One haproxy process with a ``listen`` section per ``SECTIONS`` entry: ``front[name]``
    is where it listens, ``back[name]`` the Python listener its server line points at."""

    def __init__(self, tmp_path) -> None:
        self.back = {}
        for name in SECTIONS:
            lsock = socket.socket()
            lsock.bind(("127.0.0.1", 0))
            lsock.listen(8)
            lsock.settimeout(5)
            self.back[name] = lsock
        self.proc = None
        try:
            for _attempt in range(3):  # a port free_port found may be taken before haproxy binds
                if self._start(tmp_path):
                    return
            pytest.fail(f"haproxy did not start:\n{(tmp_path / 'haproxy.err').read_text()}")
        except BaseException:
            self.close()
            raise

    def _start(self, tmp_path) -> bool:
        self.front = {name: (host, free_port(host)) for name, (host, _, _) in SECTIONS.items()}
        sections = []
        for name, (host, bind_opts, server_opts) in SECTIONS.items():
            port = self.front[name][1]
            back_port = self.back[name].getsockname()[1]
            bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            sections.append(
                f"listen {name}\n  bind {bind} {bind_opts}\n"
                f"  server s 127.0.0.1:{back_port} {server_opts}\n"
            )
        self.proc = launch_haproxy(tmp_path, sections)
        return self.proc is not None

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        for lsock in self.back.values():
            lsock.close()


@pytest.fixture(scope="module")
def haproxy(tmp_path_factory):
    if shutil.which("haproxy") is None:
        pytest.skip("install haproxy (apt-get install haproxy) to test against it")
    proxy = HAProxy(tmp_path_factory.mktemp("haproxy"))
    yield proxy
    proxy.close()


def client(haproxy: HAProxy, name: str, source_ip: str) -> socket.socket:
    """A connection to section ``name`` from ``source_ip`` (any port)."""
    host, port = haproxy.front[name]
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.settimeout(5)
    sock.bind((source_ip, 0))
    sock.connect((host, port))
    return sock


def received(haproxy: HAProxy, name: str) -> tuple[ProxyHeader, bytes]:
    """What section ``name``'s server got on its next connection, up to EOF: the parsed
    header and the bytes after it."""
    conn, _ = haproxy.back[name].accept()
    with conn:
        data = recv_until_eof(conn, timeout=5)
    h = parse(data)
    assert h is not None, data
    return h, data[h.length :]


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli), bit by bit: only for checking what HAProxy sends."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


PAYLOAD = b"PROXY TCP4 this is payload, not a header\r\n\r\n\x00\r\nQUIT\n" + bytes(range(256))


@pytest.mark.parametrize(("name", "version"), [("send_v1", 1), ("send_v2", 2)])
def test_haproxy_sends_headers_we_parse(haproxy, name, version):
    with client(haproxy, name, "127.0.0.2") as sock:
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        h, after = received(haproxy, name)
        source = sock.getsockname()
    assert h == ProxyHeader(
        version, False, ("127.0.0.2", source[1]), haproxy.front[name], (), h.length
    )
    assert h.length == (
        28
        if version == 2
        else len(f"PROXY TCP4 127.0.0.2 127.0.0.1 {source[1]} {haproxy.front[name][1]}\r\n")
    )
    assert after == PAYLOAD


def test_haproxy_sends_an_ipv6_header_we_parse(haproxy):
    with client(haproxy, "send_v2_ipv6", "::1") as sock:
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        h, after = received(haproxy, "send_v2_ipv6")
        source = sock.getsockname()
    assert h == ProxyHeader(2, False, ("::1", source[1]), haproxy.front["send_v2_ipv6"], (), 52)
    assert after == PAYLOAD


def test_haproxy_sends_a_crc32c_tlv_we_find_where_it_belongs(haproxy):
    with client(haproxy, "send_v2_crc", "127.0.0.3") as sock:
        sock.sendall(PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        conn, _ = haproxy.back["send_v2_crc"].accept()
        with conn:
            data = recv_until_eof(conn, timeout=5)
        source = sock.getsockname()
    h = parse(data)
    assert (h.source, h.dest) == (("127.0.0.3", source[1]), haproxy.front["send_v2_crc"])
    assert [kind for kind, _ in h.tlvs] == [0x03]
    crc = h.tlvs[0][1]
    assert len(crc) == 4 and h.length == 16 + 12 + 3 + 4
    zeroed = data[: h.length - 4] + bytes(4)
    assert int.from_bytes(crc, "big") == crc32c(zeroed)
    assert data[h.length :] == PAYLOAD


@pytest.mark.parametrize(
    ("name", "encode", "source", "dest", "tlvs"),
    [
        ("accept_v1", encode_v1, ("192.0.2.10", 40000), ("198.51.100.20", 8443), ()),
        ("accept_v2", encode_v2, ("192.0.2.11", 1), ("198.51.100.21", 65535), ((0xE0, b"ours"),)),
    ],
)
def test_haproxy_accepts_headers_we_encode(haproxy, name, encode, source, dest, tlvs):
    """HAProxy reads our header, then sends its own (v2) to its server with our addresses."""
    header = encode(source, dest, tlvs=tlvs) if tlvs else encode(source, dest)
    with client(haproxy, name, "127.0.0.4") as sock:
        sock.sendall(header + PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        h, after = received(haproxy, name)
    assert h == ProxyHeader(2, False, source, dest, (), 28)
    assert after == PAYLOAD


def test_haproxy_accepts_our_ipv6_header(haproxy):
    source, dest = ("2001:db8::5", 5555), ("2001:db8:1::80", 80)
    with client(haproxy, "accept_v2", "127.0.0.4") as sock:
        sock.sendall(encode_v1(source, dest) + PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        h, after = received(haproxy, "accept_v2")
    assert h == ProxyHeader(2, False, source, dest, (), 52)
    assert after == PAYLOAD


@pytest.mark.parametrize(
    "header",
    [encode_v1(None, None), encode_v2(None, None), encode_v2(None, None, tlvs=[(4, b"pad")])],
)
def test_haproxy_takes_our_local_headers_as_the_real_addresses(haproxy, header):
    with client(haproxy, "accept_local", "127.0.0.5") as sock:
        sock.sendall(header + PAYLOAD)
        sock.shutdown(socket.SHUT_WR)
        h, after = received(haproxy, "accept_local")
        source = sock.getsockname()
    assert h == ProxyHeader(2, False, source, haproxy.front["accept_local"], (), 28)
    assert after == PAYLOAD


#: Headers both we and HAProxy 2.6 refuse. (HAProxy takes some lines the spec forbids and we
#: refuse, such as "192.0.2.01" or port 65536: those are not here.)
CORRUPTED = {
    "tcp5": b"PROXY TCP5 192.0.2.1 192.0.2.2 1 2\r\n",
    "ipv6-in-tcp4": b"PROXY TCP4 ::1 ::2 1 2\r\n",
    "lone-lf": b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\n",
    "v2-version-3": SIG + b"\x31\x11\x00\x0c" + IPV4_BLOCK,
    "v2-command-3": SIG + b"\x23\x11\x00\x0c" + IPV4_BLOCK,
    "v2-short-block": SIG + b"\x21\x11\x00\x08" + IPV4_BLOCK[:8],
    "v2-family-0x13": SIG + b"\x21\x13\x00\x0c" + IPV4_BLOCK,
    "v2-tlv-overrun": SIG + b"\x21\x11\x00\x10" + IPV4_BLOCK + b"\x01\x00\x05a",
}


@pytest.mark.parametrize("header", list(CORRUPTED.values()), ids=list(CORRUPTED))
def test_haproxy_refuses_a_corrupted_header_as_we_do(haproxy, header):
    with pytest.raises(ProxyProtocolError):
        parse(header)
    with client(haproxy, "accept_bad", "127.0.0.6") as bad:
        bad.sendall(header + PAYLOAD)
        try:
            assert recv_until_eof(bad, timeout=5) == b""  # closed by HAProxy, nothing sent
        except ConnectionResetError:
            pass
    # A good header after it: the server's first connection is the good one, and only it.
    good = encode_v1(("192.0.2.99", 9999), ("192.0.2.98", 80))
    with client(haproxy, "accept_bad", "127.0.0.6") as sock:
        sock.sendall(good + b"fine")
        sock.shutdown(socket.SHUT_WR)
        h, after = received(haproxy, "accept_bad")
    assert (h.source, h.dest, after) == (("192.0.2.99", 9999), ("192.0.2.98", 80), b"fine")
    lsock = haproxy.back["accept_bad"]
    lsock.setblocking(False)
    try:
        with pytest.raises(BlockingIOError):
            lsock.accept()
    finally:
        lsock.settimeout(5)
