"""splicepool.socks: the SOCKS5 (RFC 1928) and username/password (RFC 1929) messages, parsed
and encoded. Exact results and exact errors (message and reply code) for hand-built bytes;
every proper prefix of a valid message is incomplete, never an error; round trips and fuzzing
with hypothesis; and curl as the real client, against a scripted loopback server that records
what curl sends at each step and answers with this module's encoders."""

from __future__ import annotations

import array
import errno
import ipaddress
import pickle
import shutil
import socket
import subprocess
import sys
import threading

import pytest
from conftest import engine_free, recv_exact, tcp_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from splicepool import socks
from splicepool.socks import (
    ADDRESS_TYPE_NOT_SUPPORTED,
    ATYP_DOMAIN,
    ATYP_IPV4,
    ATYP_IPV6,
    BIND,
    COMMAND_NOT_SUPPORTED,
    CONNECT,
    CONNECTION_REFUSED,
    GENERAL_FAILURE,
    HOST_UNREACHABLE,
    NETWORK_UNREACHABLE,
    NO_ACCEPTABLE,
    NO_AUTH,
    NOT_ALLOWED,
    REPLY_TEXT,
    SUCCEEDED,
    UDP_ASSOCIATE,
    USER_PASSWORD,
    Credentials,
    Greeting,
    Request,
    SocksError,
    auth_reply,
    choose_method,
    encode_credentials,
    encode_greeting,
    encode_reply,
    encode_request,
    method_reply,
    parse_credentials,
    parse_greeting,
    parse_request,
    reply_for_errno,
    reply_for_gaierror,
)

pytestmark = engine_free

PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARSERS = (parse_greeting, parse_credentials, parse_request)


def raises(parse, data: bytes, message: str, reply: int | None = None) -> SocksError:
    """``parse(data)`` raises SocksError with exactly ``message`` and ``reply``."""
    with pytest.raises(SocksError) as info:
        parse(data)
    assert str(info.value) == message
    assert info.value.reply == reply
    return info.value


def fails_at(parse, data: bytes, offset: int, message: str, reply: int | None = None) -> None:
    """The byte at ``offset`` is the fault: the bytes before it are an incomplete beginning,
    and the error comes as soon as it arrives, the same with whatever follows."""
    assert parse(data[:offset]) is None
    raises(parse, data[: offset + 1], message, reply)
    raises(parse, data, message, reply)


def incomplete_until_whole(parse, message: bytes, tail: bytes = b"") -> object:
    """Every proper prefix of ``message`` parses to None; ``message + tail`` parses to the
    same result as ``message`` alone, its length that of ``message``."""
    for cut in range(len(message)):
        assert parse(message[:cut]) is None, (cut, message)
    result = parse(message)
    assert result is not None
    assert result.length == len(message)
    assert parse(message + tail) == result
    return result


# -- constants ----------------------------------------------------------------------------


def test_constants_are_rfc_1928_and_1929():
    assert socks.VERSION == 5
    assert (NO_AUTH, USER_PASSWORD, NO_ACCEPTABLE) == (0x00, 0x02, 0xFF)
    assert (CONNECT, BIND, UDP_ASSOCIATE) == (1, 2, 3)
    assert (ATYP_IPV4, ATYP_DOMAIN, ATYP_IPV6) == (1, 3, 4)
    assert REPLY_TEXT == {
        0x00: "succeeded",
        0x01: "general SOCKS server failure",
        0x02: "connection not allowed by ruleset",
        0x03: "network unreachable",
        0x04: "host unreachable",
        0x05: "connection refused",
        0x06: "TTL expired",
        0x07: "command not supported",
        0x08: "address type not supported",
    }
    assert socks.TTL_EXPIRED == 6 and ADDRESS_TYPE_NOT_SUPPORTED == 8
    assert set(socks.__all__) <= set(dir(socks))


def test_results_are_plain_namedtuples():
    assert Greeting._fields == ("methods", "length")
    assert Credentials._fields == ("user", "password", "length")
    assert Request._fields == ("command", "host", "port", "atyp", "length")
    for cls in (Greeting, Credentials, Request):
        assert cls.__bases__ == (tuple,) and cls.__doc__


def test_importing_the_module_does_not_import_typing():
    code = "import sys, splicepool.socks; print('typing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_socks_error_is_a_value_error_that_keeps_its_reply():
    err = SocksError("what was wrong", HOST_UNREACHABLE)
    assert isinstance(err, ValueError) and err.reply == HOST_UNREACHABLE
    assert SocksError("no reply").reply is None
    copy = pickle.loads(pickle.dumps(err))
    assert (str(copy), copy.reply) == ("what was wrong", HOST_UNREACHABLE)


def test_parsers_take_any_bytes_like_and_hold_no_view_of_it():
    request = encode_request(CONNECT, "example.com", 443)
    expected = Request(CONNECT, "example.com", 443, ATYP_DOMAIN, 18)
    assert parse_request(bytearray(request)) == expected
    assert parse_request(memoryview(b"xx" + request)[2:]) == expected
    assert parse_request(memoryview(request).cast("c")) == expected
    assert len(request) % 2 == 0
    assert parse_request(memoryview(array.array("H", request))) == expected  # 9 words
    # A server's buffer: resizable while a SocksError is being handled, and after a None.
    for parse, bad in ((parse_greeting, b"\x05\x00"), (parse_credentials, b"\x01\x00"),
                       (parse_request, b"\x05\x01\x00\x03\x03a b")):  # fmt: skip
        buf = bytearray(bad[:1])
        assert parse(buf) is None
        buf += bad[1:]
        try:
            parse(buf)
        except SocksError:
            buf.clear()  # BufferError if a view of buf were still alive
        else:
            pytest.fail(f"{bad!r} parsed")
    with pytest.raises(TypeError):
        parse_request("\x05\x01\x00\x01")


# -- the greeting -------------------------------------------------------------------------


def test_greeting_exact():
    assert parse_greeting(b"\x05\x01\x00") == Greeting((0,), 3)
    assert parse_greeting(b"\x05\x03\x00\x01\x02") == Greeting((0, 1, 2), 5)
    assert parse_greeting(bytearray(b"\x05\x02\x02\xff")) == Greeting((2, 255), 4)
    assert parse_greeting(memoryview(b"\x05\x02\x00\x00")) == Greeting((0, 0), 4)
    every = bytes(range(255))
    assert parse_greeting(b"\x05\xff" + every) == Greeting(tuple(every), 257)
    # A pipelined request after the greeting is not looked at.
    request = encode_request(CONNECT, "192.0.2.1", 443)
    greeting = parse_greeting(b"\x05\x01\x00" + request)
    assert greeting == Greeting((0,), 3)
    assert parse_request((b"\x05\x01\x00" + request)[greeting.length :]) == Request(
        CONNECT, "192.0.2.1", 443, ATYP_IPV4, 10
    )


def test_greeting_incomplete():
    for data in (b"", b"\x05", b"\x05\x01", b"\x05\x03\x00\x01", b"\x05\xff" + bytes(254)):
        assert parse_greeting(data) is None


def test_greeting_not_socks5():
    raises(parse_greeting, b"\x04", "not SOCKS5: version byte 0x04 at offset 0 (SOCKS4?)")
    raises(
        parse_greeting,
        b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00",
        "not SOCKS5: version byte 0x04 at offset 0 (SOCKS4?)",
    )
    raises(
        parse_greeting,
        b"GET / HTTP/1.1\r\nHost: example.com\r\n\r\n",
        "an HTTP request, not SOCKS5: b'GET / HTTP/1.1' (version byte 0x47 at offset 0)",
    )
    raises(
        parse_greeting,
        b"CONNECT example.com:443 HTTP/1.1\r\n",
        "an HTTP request, not SOCKS5: b'CONNECT example.com:443 HTTP/1.1' "
        "(version byte 0x43 at offset 0)",
    )
    raises(
        parse_greeting,
        b"GET ",
        "an HTTP request, not SOCKS5: b'GET ' (version byte 0x47 at offset 0)",
    )
    # Only the first bytes have come: it cannot be SOCKS5 already, the message guesses.
    raises(
        parse_greeting,
        b"G",
        "not SOCKS5: version byte 0x47 at offset 0 (b'G': the start of an HTTP request?)",
    )
    raises(
        parse_greeting,
        b"CONN",
        "not SOCKS5: version byte 0x43 at offset 0 (b'CONN': the start of an HTTP request?)",
    )
    raises(parse_greeting, b"GETX", "not SOCKS5: version byte 0x47 at offset 0")
    raises(parse_greeting, b"get / HTTP/1.1", "not SOCKS5: version byte 0x67 at offset 0")
    raises(
        parse_greeting,
        b"\x16\x03\x01\x02\x00",
        "not SOCKS5: version byte 0x16 at offset 0 (a TLS ClientHello?)",
    )
    raises(parse_greeting, b"\x00", "not SOCKS5: version byte 0x00 at offset 0")
    raises(parse_greeting, b"\x01\x01u\x01p", "not SOCKS5: version byte 0x01 at offset 0")


def test_greeting_without_methods():
    fails_at(
        parse_greeting,
        b"\x05\x00\x00",
        1,
        "greeting: NMETHODS byte 0x00 at offset 1: a client must offer at least one method",
    )


def test_choose_method():
    both = Greeting((0, 2), 4)
    assert choose_method(both, password=False) == NO_AUTH
    assert choose_method(both, password=True) == USER_PASSWORD
    assert choose_method(Greeting((2, 0), 4), password=True) == USER_PASSWORD
    assert choose_method(Greeting((0,), 3), password=True) == NO_ACCEPTABLE  # no fallback
    assert choose_method(Greeting((2,), 3), password=False) == NO_ACCEPTABLE
    assert choose_method(Greeting((1,), 3), password=False) == NO_ACCEPTABLE  # GSSAPI only
    assert choose_method(Greeting((0xFF,), 3), password=False) == NO_ACCEPTABLE
    with pytest.raises(TypeError):
        choose_method(both, True)  # keyword only


def test_method_and_auth_replies():
    assert method_reply(NO_AUTH) == b"\x05\x00"
    assert method_reply(USER_PASSWORD) == b"\x05\x02"
    assert method_reply(NO_ACCEPTABLE) == b"\x05\xff"
    with pytest.raises(ValueError, match="method is 256, not in 0..255"):
        method_reply(256)
    with pytest.raises(TypeError):
        method_reply(True)
    assert auth_reply(True) == b"\x01\x00"
    assert auth_reply(False) == b"\x01\x01"


# -- the credentials ----------------------------------------------------------------------


def test_credentials_exact():
    assert parse_credentials(b"\x01\x01u\x01p") == Credentials(b"u", b"p", 5)
    assert parse_credentials(b"\x01\x04user\x06secret\x05\x01") == Credentials(
        b"user", b"secret", 13
    )
    undecodable = b"\xff\x00\x80"
    assert parse_credentials(b"\x01\x03" + undecodable + b"\x03" + undecodable) == Credentials(
        undecodable, undecodable, 9
    )
    longest = b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255
    assert parse_credentials(longest) == Credentials(b"u" * 255, b"p" * 255, 513)


def test_credentials_errors():
    fails_at(
        parse_credentials,
        b"\x05\x01u\x01p",
        0,
        "credentials: version byte 0x05 at offset 0, not 0x01 (RFC 1929 username/password) "
        "(the SOCKS version: a client that gets RFC 1929 wrong)",
    )
    fails_at(
        parse_credentials,
        b"\x00\x01u\x01p",
        0,
        "credentials: version byte 0x00 at offset 0, not 0x01 (RFC 1929 username/password)",
    )
    fails_at(
        parse_credentials,
        b"\x01\x00\x01p",
        1,
        "credentials: ULEN byte 0x00 at offset 1: the user name is empty",
    )
    fails_at(
        parse_credentials,
        b"\x01\x04user\x00",
        6,
        "credentials: PLEN byte 0x00 at offset 6: the password is empty",
    )


# -- the request --------------------------------------------------------------------------


def test_request_ipv4():
    assert parse_request(b"\x05\x01\x00\x01\xc0\x00\x02\x01\x01\xbb") == Request(
        CONNECT, "192.0.2.1", 443, ATYP_IPV4, 10
    )
    assert parse_request(b"\x05\x01\x00\x01\x00\x00\x00\x00\xff\xff") == Request(
        CONNECT, "0.0.0.0", 65535, ATYP_IPV4, 10
    )


def test_request_ipv6_is_compressed_text():
    packed = ipaddress.IPv6Address("2001:db8::1").packed
    assert parse_request(b"\x05\x01\x00\x04" + packed + b"\x00\x50") == Request(
        CONNECT, "2001:db8::1", 80, ATYP_IPV6, 22
    )
    loopback = bytes(15) + b"\x01"
    assert parse_request(b"\x05\x01\x00\x04" + loopback + b"\x00\x50").host == "::1"
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.1").packed
    # ::ffff:c000:201 before Python 3.13, ::ffff:192.0.2.1 since: as ipaddress prints it.
    assert parse_request(b"\x05\x01\x00\x04" + mapped + b"\x00\x50").host == str(
        ipaddress.IPv6Address("::ffff:192.0.2.1")
    )
    full = bytes.fromhex("20010db8000100020003000400050006")
    assert parse_request(b"\x05\x01\x00\x04" + full + b"\x00\x50").host == "2001:db8:1:2:3:4:5:6"


def test_request_domain_is_kept_as_sent():
    assert parse_request(b"\x05\x01\x00\x03\x0bexample.com\x01\xbb") == Request(
        CONNECT, "example.com", 443, ATYP_DOMAIN, 18
    )
    assert parse_request(b"\x05\x01\x00\x03\x0dExAmple.TEST.\x1f\x90").host == "ExAmple.TEST."
    # An IP literal sent as a name stays a name: the resolver takes it.
    assert parse_request(b"\x05\x01\x00\x03\x09127.0.0.1\x00\x50") == Request(
        CONNECT, "127.0.0.1", 80, ATYP_DOMAIN, 16
    )
    printable = bytes(range(0x21, 0x7F))
    request = b"\x05\x01\x00\x03" + bytes([len(printable)]) + printable + b"\x00\x50"
    assert parse_request(request).host == printable.decode()
    longest = b"a" * 255
    request = b"\x05\x01\x00\x03\xff" + longest + b"\x00\x50"
    assert parse_request(request) == Request(CONNECT, "a" * 255, 80, ATYP_DOMAIN, 262)


def test_request_bind_and_udp_associate_are_returned():
    assert parse_request(b"\x05\x02\x00\x01\xc0\x00\x02\x01\x00\x00") == Request(
        BIND, "192.0.2.1", 0, ATYP_IPV4, 10
    )
    assert parse_request(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00") == Request(
        UDP_ASSOCIATE, "0.0.0.0", 0, ATYP_IPV4, 10
    )
    assert parse_request(b"\x05\x03\x00\x03\x01x\x13\x88") == Request(
        UDP_ASSOCIATE, "x", 5000, ATYP_DOMAIN, 8
    )


def test_request_errors_and_their_replies():
    fails_at(
        parse_request,
        b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50",
        0,
        "request: version byte 0x04 at offset 0, not 0x05",
        GENERAL_FAILURE,
    )
    for cmd in (0x00, 0x04, 0xFF):
        fails_at(
            parse_request,
            bytes([5, cmd, 0, 1, 127, 0, 0, 1, 0, 80]),
            1,
            f"request: CMD byte 0x{cmd:02x} at offset 1 is not CONNECT (1), BIND (2) "
            "or UDP ASSOCIATE (3)",
            COMMAND_NOT_SUPPORTED,
        )
    fails_at(
        parse_request,
        b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50",
        2,
        "request: RSV byte 0x01 at offset 2, not 0x00",
        GENERAL_FAILURE,
    )
    for atyp in (0x00, 0x02, 0x05, 0xFF):
        fails_at(
            parse_request,
            bytes([5, 1, 0, atyp, 127, 0, 0, 1, 0, 80]),
            3,
            f"request: ATYP byte 0x{atyp:02x} at offset 3 is not IPv4 (1), a domain name (3) "
            "or IPv6 (4)",
            ADDRESS_TYPE_NOT_SUPPORTED,
        )
    fails_at(
        parse_request,
        b"\x05\x01\x00\x03\x00\x00\x50",
        4,
        "request: domain name length byte 0x00 at offset 4: the name is empty",
        HOST_UNREACHABLE,
    )


@pytest.mark.parametrize("bad", [0x00, 0x09, 0x0A, 0x0D, 0x20, 0x7F, 0x80, 0xC3, 0xFF])
def test_request_domain_bytes_are_checked_as_they_come(bad):
    name = b"exam" + bytes([bad]) + b"ple.com"
    request = b"\x05\x01\x00\x03" + bytes([len(name)]) + name + b"\x01\xbb"
    fails_at(
        parse_request,
        request,
        9,  # 5 bytes before the name, 4 of the name
        f"request: domain name byte 0x{bad:02x} at offset 9 is not printable ASCII "
        "(no NUL, space, control or non-ASCII byte in a host name)",
        HOST_UNREACHABLE,
    )


def test_request_connect_to_port_0():
    message = (
        "request: DST.PORT 0 (bytes 0x00 0x00 at offset {}) for CONNECT: "
        "nothing can be connected to port 0"
    )
    request = b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x00"
    assert parse_request(request[:9]) is None  # 0x00 0x50 would do
    raises(parse_request, request, message.format(8), GENERAL_FAILURE)
    raises(parse_request, b"\x05\x01\x00\x03\x01x\x00\x00", message.format(6), GENERAL_FAILURE)


# -- encoding -----------------------------------------------------------------------------


def test_encode_reply_exact():
    assert encode_reply(SUCCEEDED) == b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00"
    assert encode_reply(HOST_UNREACHABLE, None) == b"\x05\x04\x00\x01" + bytes(6)
    assert encode_reply(SUCCEEDED, ("192.0.2.7", 40000)) == (
        b"\x05\x00\x00\x01\xc0\x00\x02\x07\x9c\x40"
    )
    v6 = ipaddress.IPv6Address("2001:db8::7").packed
    assert encode_reply(SUCCEEDED, ("2001:db8::7", 1080, 0, 0)) == (
        b"\x05\x00\x00\x04" + v6 + b"\x04\x38"
    )
    assert encode_reply(SUCCEEDED, ("2001:db8::7", 1080)) == b"\x05\x00\x00\x04" + v6 + b"\x04\x38"
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.7").packed
    assert encode_reply(SUCCEEDED, ("::ffff:192.0.2.7", 80, 0, 0)) == (
        b"\x05\x00\x00\x04" + mapped + b"\x00\x50"
    )
    # A link-local sockname's scope id is dropped, from the text or the 4-tuple.
    link = ipaddress.IPv6Address("fe80::1").packed
    assert (
        encode_reply(SUCCEEDED, ("fe80::1%2", 80, 0, 2)) == b"\x05\x00\x00\x04" + link + b"\x00\x50"
    )
    assert encode_reply(SUCCEEDED, (ipaddress.IPv4Address("10.0.0.1"), 1)) == (
        b"\x05\x00\x00\x01\x0a\x00\x00\x01\x00\x01"
    )
    for code in REPLY_TEXT:
        assert encode_reply(code)[1] == code


def test_encode_reply_a_real_socket_address():
    client, server = tcp_pair()
    with client, server:
        host, port = client.getsockname()
        assert encode_reply(SUCCEEDED, client.getsockname())[4:] == (
            socket.inet_aton(host) + port.to_bytes(2, "big")
        )


def test_encode_reply_errors():
    with pytest.raises(ValueError, match=r"reply code 9 is not one RFC 1928 defines \(0..8\)"):
        encode_reply(9)
    with pytest.raises(ValueError, match="reply code -1"):
        encode_reply(-1)
    with pytest.raises(TypeError, match="reply code must be an int, not bool"):
        encode_reply(True)
    with pytest.raises(ValueError, match="bound address 'example.com' is not an IPv4 or IPv6"):
        encode_reply(SUCCEEDED, ("example.com", 80))
    with pytest.raises(ValueError, match="bound port 65536 is not in 0..65535"):
        encode_reply(SUCCEEDED, ("127.0.0.1", 65536))
    with pytest.raises(ValueError, match="4-tuple, which only an IPv6 address has"):
        encode_reply(SUCCEEDED, ("127.0.0.1", 80, 0, 0))
    with pytest.raises(TypeError, match="bound must be an"):
        encode_reply(SUCCEEDED, "127.0.0.1:80")
    with pytest.raises(TypeError, match="bound address must be a str, not int"):
        encode_reply(SUCCEEDED, (0x7F000001, 80))
    with pytest.raises(TypeError, match="bound port must be an int, not str"):
        encode_reply(SUCCEEDED, ("127.0.0.1", "80"))


def test_encode_client_messages_exact():
    assert encode_greeting([NO_AUTH]) == b"\x05\x01\x00"
    assert encode_greeting((NO_AUTH, USER_PASSWORD)) == b"\x05\x02\x00\x02"
    assert encode_greeting(b"\x00\x01\x02") == b"\x05\x03\x00\x01\x02"
    assert encode_credentials(b"u", b"p") == b"\x01\x01u\x01p"
    assert encode_credentials("us\u00e9r", "pw") == b"\x01\x05us\xc3\xa9r\x02pw"
    assert encode_request(CONNECT, "127.0.0.1", 80) == b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"
    assert encode_request(CONNECT, "::1", 80) == b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50"
    assert encode_request(CONNECT, "Example.COM", 443) == (
        b"\x05\x01\x00\x03\x0bExample.COM\x01\xbb"
    )
    assert encode_request(UDP_ASSOCIATE, "0.0.0.0", 0) == b"\x05\x03\x00\x01" + bytes(6)
    assert encode_request(BIND, ipaddress.IPv6Address("2001:db8::1"), 1)[3] == ATYP_IPV6
    # Not IP address text (a leading zero, brackets): a name, as sent.
    assert encode_request(CONNECT, "010.0.0.1", 80)[3] == ATYP_DOMAIN
    assert encode_request(CONNECT, "[::1]", 80)[3] == ATYP_DOMAIN


def test_encode_client_messages_errors():
    with pytest.raises(ValueError, match="a greeting offers 1 to 255 methods, not 0"):
        encode_greeting([])
    with pytest.raises(ValueError, match="a greeting offers 1 to 255 methods, not 256"):
        encode_greeting([0] * 256)
    with pytest.raises(ValueError, match=r"methods\[1\] is 256, not in 0..255"):
        encode_greeting([0, 256])
    with pytest.raises(TypeError):
        encode_greeting(0)
    with pytest.raises(ValueError, match="user must be 1 to 255 bytes, not 0"):
        encode_credentials(b"", b"p")
    with pytest.raises(ValueError, match="password must be 1 to 255 bytes, not 256"):
        encode_credentials(b"u", b"p" * 256)
    with pytest.raises(TypeError, match="user must be bytes or str, not int"):
        encode_credentials(1, b"p")
    with pytest.raises(ValueError, match="domain name must be 1 to 255 bytes, not 256"):
        encode_request(CONNECT, "a" * 256, 80)
    encode_request(CONNECT, "a" * 255, 80)
    with pytest.raises(ValueError, match="domain name must be 1 to 255 bytes, not 0"):
        encode_request(CONNECT, "", 80)
    with pytest.raises(ValueError, match="is not ASCII: give an internationalised name IDNA"):
        encode_request(CONNECT, "b\u00fccher.example", 80)
    with pytest.raises(ValueError, match="has the byte 0x20 at 3: only printable ASCII"):
        encode_request(CONNECT, "bad name", 80)
    with pytest.raises(ValueError, match="has a scope id, which SOCKS5 cannot carry"):
        encode_request(CONNECT, "fe80::1%eth0", 80)
    with pytest.raises(ValueError, match="port 0 for CONNECT: parse_request refuses it"):
        encode_request(CONNECT, "127.0.0.1", 0)
    with pytest.raises(ValueError, match="port 65536 is not in 0..65535"):
        encode_request(CONNECT, "127.0.0.1", 65536)
    with pytest.raises(ValueError, match=r"command 4 is not CONNECT \(1\)"):
        encode_request(4, "127.0.0.1", 80)
    with pytest.raises(TypeError, match="command must be an int, not bool"):
        encode_request(True, "127.0.0.1", 80)
    with pytest.raises(TypeError, match="host must be a str, not bytes"):
        encode_request(CONNECT, b"example.com", 80)


# -- reply codes for failures -------------------------------------------------------------


def test_reply_for_errno():
    assert reply_for_errno(errno.ECONNREFUSED) == CONNECTION_REFUSED == 0x05
    assert reply_for_errno(errno.ENETUNREACH) == NETWORK_UNREACHABLE
    for err in (errno.EHOSTUNREACH, errno.ETIMEDOUT, errno.EHOSTDOWN):
        assert reply_for_errno(err) == HOST_UNREACHABLE == 0x04
    assert reply_for_errno(errno.EACCES) == NOT_ALLOWED
    assert reply_for_errno(errno.EPERM) == NOT_ALLOWED
    for err in (errno.ECONNRESET, errno.EADDRNOTAVAIL, errno.EMFILE, 0, 99999, None):
        assert reply_for_errno(err) == GENERAL_FAILURE


def test_reply_for_errno_of_a_real_refused_connect():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, not listening: a connect is refused
        with pytest.raises(OSError) as info:
            socket.create_connection(("127.0.0.1", port), timeout=5)
    assert reply_for_errno(info.value.errno) == CONNECTION_REFUSED


def test_reply_for_gaierror():
    codes = [
        getattr(socket, name)
        for name in ("EAI_NONAME", "EAI_AGAIN", "EAI_FAIL", "EAI_FAMILY", "EAI_NODATA",
                     "EAI_ADDRFAMILY", "EAI_SERVICE", "EAI_SYSTEM", "EAI_MEMORY")
        if hasattr(socket, name)
    ]  # fmt: skip
    assert len(codes) >= 5
    for code in codes:
        assert reply_for_gaierror(code) == HOST_UNREACHABLE
    with pytest.raises(socket.gaierror) as info:  # a real one, without asking any DNS server
        socket.getaddrinfo("name.invalid", 80, flags=socket.AI_NUMERICHOST)
    assert reply_for_gaierror(info.value.errno) == HOST_UNREACHABLE


# -- every prefix is incomplete -----------------------------------------------------------


VALID = [
    (parse_greeting, b"\x05\x01\x00"),
    (parse_greeting, b"\x05\x03\x00\x01\x02"),
    (parse_greeting, b"\x05\xff" + bytes(range(255))),
    (parse_credentials, b"\x01\x01u\x01p"),
    (parse_credentials, b"\x01\xff" + b"u" * 255 + b"\xff" + b"p" * 255),
    (parse_request, b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50"),
    (parse_request, b"\x05\x01\x00\x04" + bytes(15) + b"\x01\x00\x50"),
    (parse_request, b"\x05\x01\x00\x03\x0bexample.com\x01\xbb"),
    (parse_request, b"\x05\x01\x00\x03\xff" + b"a" * 255 + b"\xff\xff"),
    (parse_request, b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00"),
    (parse_request, b"\x05\x03\x00\x03\x01x\x00\x00"),
]


@pytest.mark.parametrize(("parse", "message"), VALID)
def test_every_proper_prefix_is_incomplete(parse, message):
    incomplete_until_whole(parse, message, tail=b"\x05\x01\x00 and more")
    incomplete_until_whole(parse, message, tail=message)


# -- hypothesis: round trips --------------------------------------------------------------

NAME_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E)
names = st.text(NAME_CHARS, min_size=1, max_size=255).filter(
    lambda s: not _is_ip(s)  # IP text is sent as an address, not a name
)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    names,
    st.from_regex(r"[a-z0-9-]{1,63}(\.[a-z0-9-]{1,63}){0,3}\.?", fullmatch=True),
)
commands = st.sampled_from([CONNECT, BIND, UDP_ASSOCIATE])
ports = st.integers(0, 0xFFFF)
fields = st.binary(min_size=1, max_size=255)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


@PROPERTY
@given(st.lists(st.integers(0, 255), min_size=1, max_size=255), st.binary(max_size=20))
def test_greeting_round_trip(methods, tail):
    data = encode_greeting(methods)
    greeting = incomplete_until_whole(parse_greeting, data, tail)
    assert greeting == Greeting(tuple(methods), 2 + len(methods))


@PROPERTY
@given(fields, fields, st.binary(max_size=20))
def test_credentials_round_trip(user, password, tail):
    data = encode_credentials(user, password)
    credentials = incomplete_until_whole(parse_credentials, data, tail)
    assert credentials == Credentials(user, password, 3 + len(user) + len(password))


@PROPERTY
@given(commands, hosts, ports, st.binary(max_size=20))
def test_request_round_trip(command, host, port, tail):
    if command == CONNECT and port == 0:
        port = 1
    data = encode_request(command, host, port)
    request = incomplete_until_whole(parse_request, data, tail)
    if _is_ip(host):
        ip = ipaddress.ip_address(host)
        atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
        assert request == Request(command, str(ip), port, atyp, 4 + len(ip.packed) + 2)
    else:
        assert request == Request(command, host, port, ATYP_DOMAIN, 5 + len(host) + 2)


@PROPERTY
@given(st.sampled_from(sorted(REPLY_TEXT)), st.one_of(st.ip_addresses(), st.none()), ports)
def test_reply_layout(code, ip, port):
    data = encode_reply(code, None if ip is None else (str(ip), port))
    assert data[:3] == bytes([5, code, 0])
    if ip is None:
        assert data[3:] == b"\x01" + bytes(6)
    else:
        # A reply has the request's address layout: parse it as a request to read it back.
        as_request = parse_request(b"\x05\x02" + data[2:])
        assert (as_request.host, as_request.port) == (str(ip), port)
        assert as_request.atyp == (ATYP_IPV4 if ip.version == 4 else ATYP_IPV6)
        assert as_request.length == len(data)


# -- hypothesis: fuzzing ------------------------------------------------------------------


def outcome(parse, data: bytes):
    """Parse ``data``: a result, None, or the SocksError; anything else fails the test."""
    try:
        result = parse(data)
    except SocksError as err:
        assert str(err)
        return err
    if result is not None:
        assert 0 < result.length <= len(data)
    return result


@FUZZ
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data):
    for parse in PARSERS:
        outcome(parse, data)


@FUZZ
@given(st.sampled_from(PARSERS), st.binary(max_size=8), st.binary(max_size=300))
def test_fuzz_plausible_starts(parse, start, rest):
    # Random bytes behind a first byte the parser takes: deeper into each parser.
    first = b"\x01" if parse is parse_credentials else b"\x05"
    outcome(parse, first + start + rest)


@FUZZ
@given(st.sampled_from(VALID), st.data())
def test_fuzz_mutated_messages(valid, data):
    parse, message = valid
    at = data.draw(st.integers(0, len(message) - 1))
    byte = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(message) + 4))
    mutated = (message[:at] + bytes([byte]) + message[at + 1 :] + b"\x00\x00\x00\x00")[:cut]
    outcome(parse, mutated)


@FUZZ
@given(st.binary(min_size=1, max_size=300), st.data())
def test_fuzz_errors_come_at_once_and_stay(data, draw):
    # Once some bytes cannot begin a message, no longer bytes can.
    for parse in PARSERS:
        if isinstance(outcome(parse, data), SocksError):
            more = draw.draw(st.binary(max_size=40))
            assert isinstance(outcome(parse, data + more), SocksError)


# -- curl, the real client ----------------------------------------------------------------


needs_curl = pytest.mark.skipif(
    shutil.which("curl") is None, reason="curl is not installed (apt-get install curl)"
)


class ScriptedServer:
    """One SOCKS5 exchange with one client on loopback, played by the script, not by the
    parsers: reads each message by its own length fields, records it, and answers with
    this module's encoders; then, after a success reply, answers one HTTP request."""

    def __init__(self, *, password: bool = False, reply: int = SUCCEEDED) -> None:
        self.password = password
        self.reply = reply
        self.steps: dict[str, bytes] = {}
        self.error: BaseException | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.listener.settimeout(10)
            conn, _ = self.listener.accept()
            with conn:
                self._exchange(conn)
        except BaseException as err:  # reported by finish()
            self.error = err
        finally:
            self.listener.close()

    def _exchange(self, conn: socket.socket) -> None:
        head = recv_exact(conn, 2)
        self.steps["greeting"] = head + recv_exact(conn, head[1])
        offered = self.steps["greeting"][2:]
        if self.password:
            if USER_PASSWORD not in offered:
                conn.sendall(method_reply(NO_ACCEPTABLE))
                return
            conn.sendall(method_reply(USER_PASSWORD))
            user = recv_exact(conn, 2)
            user += recv_exact(conn, user[1] + 1)
            self.steps["credentials"] = user + recv_exact(conn, user[-1])
            ok = user[-1] > 0
            conn.sendall(auth_reply(ok))
            if not ok:
                return
        else:
            conn.sendall(method_reply(NO_AUTH))
        head = recv_exact(conn, 4)
        atyp = head[3]
        if atyp == ATYP_DOMAIN:
            size = recv_exact(conn, 1)
            address = size + recv_exact(conn, size[0])
        else:
            address = recv_exact(conn, 4 if atyp == ATYP_IPV4 else 16)
        self.steps["request"] = head + address + recv_exact(conn, 2)
        if self.reply != SUCCEEDED:
            conn.sendall(encode_reply(self.reply))
            return
        conn.sendall(encode_reply(SUCCEEDED, conn.getsockname()))
        http = b""
        while b"\r\n\r\n" not in http:
            chunk = conn.recv(4096)
            if not chunk:
                raise EOFError(f"curl closed before its HTTP request ended: {http!r}")
            http += chunk
        self.steps["http"] = http
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n")

    def finish(self) -> dict[str, bytes]:
        self.thread.join(15)
        assert not self.thread.is_alive(), "the scripted server is stuck"
        if self.error is not None:
            raise self.error
        return self.steps


def curl(server: ScriptedServer, mode: str, url: str, *extra: str) -> subprocess.CompletedProcess:
    # -q first: no ~/.curlrc; a bare environment: no proxy variables, no NO_PROXY.
    args = ["curl", "-q", "-sS", "--max-time", "10", mode, f"127.0.0.1:{server.port}", *extra, url]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(args, capture_output=True, env=env, timeout=20)


def check_incomplete_prefixes(parse, message: bytes) -> None:
    for cut in range(len(message)):
        assert parse(message[:cut]) is None


@needs_curl
def test_curl_socks5_ipv4_no_auth():
    server = ScriptedServer()
    result = curl(server, "--socks5", "http://127.0.0.1:8080/path")
    steps = server.finish()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"ok\n"
    greeting = parse_greeting(steps["greeting"])
    assert greeting.length == len(steps["greeting"])
    assert NO_AUTH in greeting.methods and greeting.methods[0] == NO_AUTH
    assert choose_method(greeting, password=False) == NO_AUTH
    assert choose_method(greeting, password=True) == NO_ACCEPTABLE  # curl offered no password
    assert parse_request(steps["request"]) == Request(
        CONNECT, "127.0.0.1", 8080, ATYP_IPV4, len(steps["request"])
    )
    assert steps["http"].startswith(b"GET /path HTTP/1.1\r\n")
    check_incomplete_prefixes(parse_greeting, steps["greeting"])
    check_incomplete_prefixes(parse_request, steps["request"])


@needs_curl
def test_curl_socks5_hostname_sends_the_name_as_typed():
    server = ScriptedServer()
    result = curl(server, "--socks5-hostname", "http://ExAmple.TEST.:8080/")
    steps = server.finish()
    assert result.returncode == 0, result.stderr
    request = parse_request(steps["request"])
    assert request == Request(CONNECT, "ExAmple.TEST.", 8080, ATYP_DOMAIN, 5 + 13 + 2)
    assert request.length == len(steps["request"])
    check_incomplete_prefixes(parse_request, steps["request"])


@needs_curl
def test_curl_socks5_hostname_with_user_and_password():
    server = ScriptedServer(password=True)
    result = curl(
        server, "--socks5-hostname", "http://example.test/", "--proxy-user", "alice:s3cr:et"
    )
    steps = server.finish()
    assert result.returncode == 0, result.stderr
    greeting = parse_greeting(steps["greeting"])
    assert {NO_AUTH, USER_PASSWORD} <= set(greeting.methods)
    assert choose_method(greeting, password=True) == USER_PASSWORD
    credentials = parse_credentials(steps["credentials"])
    assert credentials == Credentials(b"alice", b"s3cr:et", 3 + 5 + 7)
    assert parse_request(steps["request"]) == Request(
        CONNECT, "example.test", 80, ATYP_DOMAIN, 5 + 12 + 2
    )
    check_incomplete_prefixes(parse_credentials, steps["credentials"])


@needs_curl
def test_curl_socks5_ipv6_target_with_user_and_password():
    server = ScriptedServer(password=True)
    result = curl(server, "--socks5", "http://[::1]:80/", "--proxy-user", "u:p")
    steps = server.finish()
    assert result.returncode == 0, result.stderr
    assert parse_credentials(steps["credentials"]) == Credentials(b"u", b"p", 5)
    assert parse_request(steps["request"]) == Request(CONNECT, "::1", 80, ATYP_IPV6, 22)
    check_incomplete_prefixes(parse_request, steps["request"])


@needs_curl
def test_curl_socks5_hostname_sends_an_ipv6_literal_as_an_address():
    server = ScriptedServer()
    result = curl(server, "--socks5-hostname", "http://[2001:db8::1]:8443/")
    steps = server.finish()
    assert result.returncode == 0, result.stderr
    assert parse_request(steps["request"]) == Request(CONNECT, "2001:db8::1", 8443, ATYP_IPV6, 22)


@needs_curl
def test_curl_empty_password_is_refused():
    # curl sends PLEN 0 for "u:": parse_credentials refuses it (RFC 1929: 1 to 255 bytes).
    server = ScriptedServer(password=True)
    result = curl(server, "--socks5", "http://127.0.0.1:80/", "--proxy-user", "u:")
    steps = server.finish()
    assert result.returncode == 97, result.stderr  # CURLE_PROXY
    assert steps["credentials"] == b"\x01\x01u\x00"
    raises(
        parse_credentials,
        steps["credentials"],
        "credentials: PLEN byte 0x00 at offset 3: the password is empty",
    )


@needs_curl
@pytest.mark.parametrize("code", [HOST_UNREACHABLE, CONNECTION_REFUSED, GENERAL_FAILURE])
def test_curl_reads_a_failure_reply(code):
    server = ScriptedServer(reply=code)
    result = curl(server, "--socks5-hostname", "http://name.invalid:8080/")
    steps = server.finish()
    assert result.returncode == 97, result.stderr  # CURLE_PROXY
    assert f"({code})".encode() in result.stderr
    assert parse_request(steps["request"]).host == "name.invalid"


@needs_curl
def test_curl_pointed_at_a_socks_port_as_an_http_proxy():
    # An HTTP client at the SOCKS port: the greeting parser says so.
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    got: list[bytes] = []

    def serve() -> None:
        listener.settimeout(10)
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            got.append(conn.recv(4096))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    with listener:
        subprocess.run(
            ["curl", "-q", "-sS", "--max-time", "10", "-x", f"http://127.0.0.1:{port}",
             "http://example.test/"],
            capture_output=True, env={"PATH": "/usr/local/bin:/usr/bin:/bin"}, timeout=20,
        )  # fmt: skip
        thread.join(15)
    assert got and got[0]
    raises(
        parse_greeting,
        got[0],
        "an HTTP request, not SOCKS5: b'GET http://example.test/ HTTP/1.1' "
        "(version byte 0x47 at offset 0)",
    )
