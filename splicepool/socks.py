"""SOCKS5 (RFC 1928) and its username/password sub-negotiation (RFC 1929): read the messages a
client sends a SOCKS5 proxy, write the server's answers (and, for tests and clients, the
client's messages). Parse and encode only: no sockets, no threads, no state.

A SOCKS5 connection goes: the client's greeting (the methods it offers), the server's method
reply; when the server picked USER_PASSWORD, the client's credentials and the server's auth
reply; then the client's request (a command and a destination) and the server's reply. The
server reads each client message with its parser, writes the answer the encoder gives.

The contract of each parser (``parse_greeting``, ``parse_credentials``, ``parse_request``),
called with the bytes the client has sent so far, from the start of that message:

* a complete, valid message gives a namedtuple whose ``length`` says how many bytes of
  ``data`` it took; nothing after them is looked at, so ``data[length:]`` is what the client
  sent next (a client may pipeline its request after its greeting: pass that on to the next
  parser, unchanged);
* a valid but incomplete beginning of one gives ``None``: read more and call again with
  everything received so far. Every proper prefix of a valid message gives ``None``;
* anything else raises ``SocksError`` (a ``ValueError``) as soon as the bytes cannot begin a
  valid message, with a message naming the byte at fault and its offset in ``data``.
  ``SocksError.reply`` is the reply code to send in answer (``encode_reply(err.reply)``)
  when the fault is in a request; ``None`` for a greeting or credentials at fault: the server
  closes the connection (after ``auth_reply(False)`` for credentials, if it likes: RFC 1929
  has the server close after any failure status).

No message can be longer than its format allows, so no size limit is needed: a greeting is at
most 2 + 255 bytes, credentials at most 3 + 255 + 255, a request at most 4 + 1 + 255 + 2. The
parsers copy at most that many bytes from the start of ``data``, look at each once per call,
and keep no view of ``data``: a ``bytearray`` buffer can be resized as soon as they return or
raise.

What is accepted (the choices a user may need to know):

* Greeting: VER must be 5. A first byte of 4 is reported as SOCKS4, an HTTP method and a
  space (``GET ``, ``CONNECT `` ...) as an HTTP request, 0x16 as a TLS ClientHello: a client
  pointed at the wrong port. NMETHODS must be at least 1. The method bytes are returned as
  sent, in order (duplicates, private and unassigned methods included):
  ``choose_method`` picks from them.
* Credentials: the sub-negotiation VER must be 1 (some broken clients send 5: refused, with
  a hint). ULEN and PLEN must be at least 1: an empty user name or password is an error, as
  RFC 1929 draws them as 1 to 255 bytes. (curl sends PLEN 0 for ``--proxy-user u:``: that is
  refused.) The user name and password are returned as ``bytes``, not decoded.
* Request: VER must be 5, RSV must be 0 (``GENERAL_FAILURE`` otherwise). CMD 1, 2 and 3
  (CONNECT, BIND, UDP ASSOCIATE) are returned as they are: the server answers
  ``COMMAND_NOT_SUPPORTED`` itself to those it does not do; any other CMD byte is an error
  with reply ``COMMAND_NOT_SUPPORTED``. ATYP 1 gives the host as IPv4 text, ATYP 4 as IPv6
  text in the compressed form ``ipaddress`` prints (an IPv4-mapped address stays IPv6,
  ``::ffff:...``); any other ATYP byte is an error with reply
  ``ADDRESS_TYPE_NOT_SUPPORTED``.
* ATYP 3, a domain name: 1 to 255 bytes, each printable ASCII (0x21 to 0x7E: no NUL, space,
  control or non-ASCII byte; an internationalised name must come IDNA-encoded, as clients
  send it). It is returned as a ``str`` exactly as sent: not lowercased, a trailing dot kept,
  an IP literal sent as a name left for the resolver (which takes it). A name that breaks
  these rules is an error with reply ``HOST_UNREACHABLE``: it names no host, and that is
  the reply a name that does not resolve gets (``reply_for_gaierror``), so a client sees
  the same answer whether the parser or the resolver refuses the name.
* DST.PORT is 0 to 65535, except that CONNECT to port 0 is an error with reply
  ``GENERAL_FAILURE`` (nothing listens on port 0: the server refuses the request rather than
  try it). BIND and UDP ASSOCIATE may give port 0 (RFC 1928: a client that does not know
  its UDP port sends 0).

The encoders raise ``ValueError`` for a bad value (a reply code RFC 1928 does not define, an
address that is not an IP address, a port outside 0..65535, a name too long) and
``TypeError`` for an argument of the wrong type, each naming what was wrong. What an encoder
writes, the matching parser reads back to the same values. Standard library only.
"""

from __future__ import annotations

import errno
import ipaddress
import re
from collections import namedtuple

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import NamedTuple

    class Greeting(NamedTuple):
        methods: tuple[int, ...]
        length: int

    class Credentials(NamedTuple):
        user: bytes
        password: bytes
        length: int

    class Request(NamedTuple):
        command: int
        host: str
        port: int
        atyp: int
        length: int

else:
    Greeting = namedtuple("Greeting", ["methods", "length"])
    Credentials = namedtuple("Credentials", ["user", "password", "length"])
    Request = namedtuple("Request", ["command", "host", "port", "atyp", "length"])

    Greeting.__doc__ = """A client's greeting, as ``parse_greeting`` read it.

``methods``: the authentication methods offered, as ints in the client's order (1 to 255 of
them). ``length``: bytes of input the greeting took (2 + the number of methods).
"""
    Credentials.__doc__ = """A client's RFC 1929 username/password, as ``parse_credentials``
read it.

``user``, ``password``: the bytes as sent (1 to 255 each, not decoded). ``length``: bytes
of input the message took (3 + both lengths).
"""
    Request.__doc__ = """A client's request, as ``parse_request`` read it.

``command``: CONNECT, BIND or UDP_ASSOCIATE. ``host``: IPv4 or IPv6 text (as ``ipaddress``
prints it) or the domain name as sent. ``port``: 0 to 65535 (never 0 for CONNECT).
``atyp``: ATYP_IPV4, ATYP_DOMAIN or ATYP_IPV6, as sent. ``length``: bytes of input the
request took.
"""

__all__ = [
    "ADDRESS_TYPE_NOT_SUPPORTED",
    "ATYP_DOMAIN",
    "ATYP_IPV4",
    "ATYP_IPV6",
    "BIND",
    "COMMAND_NOT_SUPPORTED",
    "CONNECT",
    "CONNECTION_REFUSED",
    "GENERAL_FAILURE",
    "HOST_UNREACHABLE",
    "NETWORK_UNREACHABLE",
    "NOT_ALLOWED",
    "NO_ACCEPTABLE",
    "NO_AUTH",
    "REPLY_TEXT",
    "SUCCEEDED",
    "TTL_EXPIRED",
    "UDP_ASSOCIATE",
    "USER_PASSWORD",
    "VERSION",
    "Credentials",
    "Greeting",
    "Request",
    "SocksError",
    "auth_reply",
    "choose_method",
    "encode_credentials",
    "encode_greeting",
    "encode_reply",
    "encode_request",
    "method_reply",
    "parse_credentials",
    "parse_greeting",
    "parse_request",
    "reply_for_errno",
    "reply_for_gaierror",
]

#: The protocol version byte of every SOCKS5 message (but the RFC 1929 sub-negotiation's).
VERSION = 5

#: Authentication methods (the greeting's METHODS, the method reply's METHOD).
NO_AUTH = 0x00
USER_PASSWORD = 0x02
NO_ACCEPTABLE = 0xFF

#: Request commands (CMD).
CONNECT = 1
BIND = 2
UDP_ASSOCIATE = 3

#: Address types (ATYP).
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4

#: Reply codes (REP).
SUCCEEDED = 0x00
GENERAL_FAILURE = 0x01
NOT_ALLOWED = 0x02
NETWORK_UNREACHABLE = 0x03
HOST_UNREACHABLE = 0x04
CONNECTION_REFUSED = 0x05
TTL_EXPIRED = 0x06
COMMAND_NOT_SUPPORTED = 0x07
ADDRESS_TYPE_NOT_SUPPORTED = 0x08

#: Each reply code's meaning in RFC 1928's words (lowercase but for the acronyms), for logs.
REPLY_TEXT: dict[int, str] = {
    SUCCEEDED: "succeeded",
    GENERAL_FAILURE: "general SOCKS server failure",
    NOT_ALLOWED: "connection not allowed by ruleset",
    NETWORK_UNREACHABLE: "network unreachable",
    HOST_UNREACHABLE: "host unreachable",
    CONNECTION_REFUSED: "connection refused",
    TTL_EXPIRED: "TTL expired",
    COMMAND_NOT_SUPPORTED: "command not supported",
    ADDRESS_TYPE_NOT_SUPPORTED: "address type not supported",
}

_AUTH_VERSION = 1  # RFC 1929's sub-negotiation version
_COMMANDS = (CONNECT, BIND, UDP_ASSOCIATE)
_IPV4_SIZE = 4
_IPV6_SIZE = 16
_NAME_MAX = 255
# The longest message of each kind, from its format.
_GREETING_MAX = 2 + 255
_CREDENTIALS_MAX = 3 + 255 + 255
_REQUEST_MAX = 4 + 1 + 255 + 2
# A byte that cannot be in a domain name: anything but printable ASCII (space excluded).
_BAD_NAME_BYTE = re.compile(rb"[^\x21-\x7e]")
# Requests start with these (and a space): an HTTP client pointed at the SOCKS port.
_HTTP_METHODS = (
    b"GET",
    b"HEAD",
    b"POST",
    b"PUT",
    b"DELETE",
    b"CONNECT",
    b"OPTIONS",
    b"TRACE",
    b"PATCH",
)
_TLS_HANDSHAKE = 0x16


class SocksError(ValueError):
    """The bytes are not a valid SOCKS5 (or RFC 1929) message; the message says what was
    wrong. ``reply``: the reply code to answer with (``encode_reply(err.reply)``) when the
    fault is in a request, ``None`` when no reply applies (the greeting, the credentials)."""

    def __init__(self, message: str, reply: int | None = None) -> None:
        super().__init__(message)
        self.reply = reply

    def __reduce__(self):  # pickle (a process pool's result) keeps .reply
        return (type(self), (str(self), self.reply))


def _head(data: bytes | bytearray | memoryview, limit: int | None) -> bytes:
    """A copy of the first ``limit`` bytes of ``data`` (any bytes-like object; None: all of
    it). The longest message is 513 bytes, so the copy is cheap, and no view of the caller's
    buffer outlives the call: a view kept alive by an exception's traceback would leave a
    ``bytearray`` buffer impossible to resize, or clear, while the error is handled."""
    if isinstance(data, bytes):
        return data[:limit]
    with memoryview(data) as view, view.cast("B") as flat:
        return flat[:limit].tobytes()


# -- parsing ------------------------------------------------------------------------------


def parse_greeting(data: bytes | bytearray | memoryview) -> Greeting | None:
    """The client's greeting (VER, NMETHODS, METHODS) at the start of ``data``; None while
    ``data`` is a valid but incomplete beginning of one; SocksError (``reply`` None) as soon
    as it cannot be one: VER not 5 (the message names SOCKS4, HTTP and TLS clients), or
    NMETHODS 0."""
    view = _head(data, _GREETING_MAX)
    have = len(view)
    if not have:
        return None
    if view[0] != VERSION:
        raise _not_socks5(view)
    if have < 2:
        return None
    count = view[1]
    if count == 0:
        raise SocksError(
            "greeting: NMETHODS byte 0x00 at offset 1: a client must offer at least one method"
        )
    end = 2 + count
    if have < end:
        return None
    return Greeting(tuple(view[2:end]), end)


def _not_socks5(view: bytes) -> SocksError:
    """The error for a greeting whose first byte is not 5, with a guess at what it is."""
    first = view[0]
    where = f"version byte 0x{first:02x} at offset 0"
    head = view[:16]
    word, space, _ = head.partition(b" ")
    if space and word in _HTTP_METHODS:
        line = view[:64].partition(b"\r")[0].partition(b"\n")[0]
        return SocksError(f"an HTTP request, not SOCKS5: {line!r} ({where})")
    if first == 4:
        return SocksError(f"not SOCKS5: {where} (SOCKS4?)")
    if first == _TLS_HANDSHAKE:
        return SocksError(f"not SOCKS5: {where} (a TLS ClientHello?)")
    if not space and any(method.startswith(head) for method in _HTTP_METHODS):
        return SocksError(f"not SOCKS5: {where} ({head!r}: the start of an HTTP request?)")
    return SocksError(f"not SOCKS5: {where}")


def parse_credentials(data: bytes | bytearray | memoryview) -> Credentials | None:
    """The client's RFC 1929 username/password message (VER, ULEN, UNAME, PLEN, PASSWD) at
    the start of ``data``; None while ``data`` is a valid but incomplete beginning of one;
    SocksError (``reply`` None) as soon as it cannot be one: VER not 1, ULEN or PLEN 0.

    The user name and password are returned as the bytes sent: compare them as bytes (with
    ``hmac.compare_digest``), or decode them as the deployment's users are written."""
    view = _head(data, _CREDENTIALS_MAX)
    have = len(view)
    if not have:
        return None
    version = view[0]
    if version != _AUTH_VERSION:
        hint = " (the SOCKS version: a client that gets RFC 1929 wrong)" if version == 5 else ""
        raise SocksError(
            f"credentials: version byte 0x{version:02x} at offset 0, not 0x01 "
            f"(RFC 1929 username/password){hint}"
        )
    if have < 2:
        return None
    ulen = view[1]
    if ulen == 0:
        raise SocksError("credentials: ULEN byte 0x00 at offset 1: the user name is empty")
    at = 2 + ulen  # the PLEN byte
    if have <= at:
        return None
    plen = view[at]
    if plen == 0:
        raise SocksError(f"credentials: PLEN byte 0x00 at offset {at}: the password is empty")
    end = at + 1 + plen
    if have < end:
        return None
    return Credentials(view[2:at], view[at + 1 : end], end)


def parse_request(data: bytes | bytearray | memoryview) -> Request | None:
    """The client's request (VER, CMD, RSV, ATYP, DST.ADDR, DST.PORT) at the start of
    ``data``; None while ``data`` is a valid but incomplete beginning of one; SocksError as
    soon as it cannot be one, its ``reply`` the code to answer with:

    * VER not 5, RSV not 0, CONNECT to port 0: ``GENERAL_FAILURE``;
    * CMD not 1, 2 or 3: ``COMMAND_NOT_SUPPORTED``;
    * ATYP not 1, 3 or 4: ``ADDRESS_TYPE_NOT_SUPPORTED``;
    * a domain name of 0 bytes, or with a byte outside 0x21..0x7E: ``HOST_UNREACHABLE``.

    A BIND or UDP ASSOCIATE request is returned like a CONNECT: the server decides what to
    answer. The domain name's bytes are checked as they arrive."""
    view = _head(data, _REQUEST_MAX)
    have = len(view)
    if not have:
        return None
    version = view[0]
    if version != VERSION:
        raise SocksError(
            f"request: version byte 0x{version:02x} at offset 0, not 0x05", GENERAL_FAILURE
        )
    if have < 2:
        return None
    command = view[1]
    if command not in _COMMANDS:
        raise SocksError(
            f"request: CMD byte 0x{command:02x} at offset 1 is not CONNECT (1), BIND (2) "
            "or UDP ASSOCIATE (3)",
            COMMAND_NOT_SUPPORTED,
        )
    if have < 3:
        return None
    if view[2] != 0:
        raise SocksError(
            f"request: RSV byte 0x{view[2]:02x} at offset 2, not 0x00", GENERAL_FAILURE
        )
    if have < 4:
        return None
    atyp = view[3]
    if atyp == ATYP_IPV4:
        start, port_at = 4, 4 + _IPV4_SIZE
    elif atyp == ATYP_IPV6:
        start, port_at = 4, 4 + _IPV6_SIZE
    elif atyp == ATYP_DOMAIN:
        if have < 5:
            return None
        size = view[4]
        if size == 0:
            raise SocksError(
                "request: domain name length byte 0x00 at offset 4: the name is empty",
                HOST_UNREACHABLE,
            )
        start, port_at = 5, 5 + size
        bad = _BAD_NAME_BYTE.search(view[start : min(have, port_at)])
        if bad is not None:
            raise SocksError(
                f"request: domain name byte 0x{bad.group()[0]:02x} at offset "
                f"{start + bad.start()} is not printable ASCII (no NUL, space, control or "
                "non-ASCII byte in a host name)",
                HOST_UNREACHABLE,
            )
    else:
        raise SocksError(
            f"request: ATYP byte 0x{atyp:02x} at offset 3 is not IPv4 (1), a domain name (3) "
            "or IPv6 (4)",
            ADDRESS_TYPE_NOT_SUPPORTED,
        )
    end = port_at + 2
    if have < end:
        return None
    port = (view[port_at] << 8) | view[port_at + 1]
    if port == 0 and command == CONNECT:
        raise SocksError(
            f"request: DST.PORT 0 (bytes 0x00 0x00 at offset {port_at}) for CONNECT: "
            "nothing can be connected to port 0",
            GENERAL_FAILURE,
        )
    raw = view[start:port_at]
    if atyp == ATYP_IPV4:
        host = str(ipaddress.IPv4Address(raw))
    elif atyp == ATYP_IPV6:
        host = str(ipaddress.IPv6Address(raw))
    else:
        host = raw.decode("ascii")
    return Request(command, host, port, atyp, end)


# -- the server's side ---------------------------------------------------------------------


def choose_method(greeting: Greeting, *, password: bool) -> int:
    """The method to answer ``greeting`` with: USER_PASSWORD when ``password`` (the server
    requires a user name and password) and the client offers it; NO_AUTH when not
    ``password`` and the client offers it; else NO_ACCEPTABLE (the server sends it, then
    closes). A server that requires a password never falls back to NO_AUTH."""
    wanted = USER_PASSWORD if password else NO_AUTH
    return wanted if wanted in greeting.methods else NO_ACCEPTABLE


def method_reply(method: int) -> bytes:
    """The server's answer to the greeting: VER 5 and the chosen ``method`` (0..255)."""
    return bytes([VERSION, _byte(method, "method")])


def auth_reply(ok: bool) -> bytes:
    """The server's answer to the credentials: status 0x00 when ``ok``, else 0x01 (after
    which the server closes, RFC 1929)."""
    return bytes([_AUTH_VERSION, 0x00 if ok else 0x01])


def encode_reply(
    code: int, bound: tuple[str, int] | tuple[str, int, int, int] | None = None
) -> bytes:
    """The server's reply to a request: VER 5, REP ``code``, RSV 0, then ``bound`` as
    ATYP, BND.ADDR and BND.PORT.

    ``code``: one of the reply codes RFC 1928 defines (the keys of REPLY_TEXT), else
    ValueError. ``bound``: the server's socket address for the connection it made (its
    ``getsockname()``, passed as it is: an IPv6 4-tuple is accepted, its flow info and
    scope id dropped), an IPv4 address as ATYP 1, an IPv6 one (IPv4-mapped included) as
    ATYP 4; None (a failure, or an address the client has no use for) writes 0.0.0.0:0.
    An address that is not an IP address, or a port outside 0..65535, is a ValueError."""
    if isinstance(code, bool) or not isinstance(code, int):
        raise TypeError(f"reply code must be an int, not {type(code).__name__}")
    if code not in REPLY_TEXT:
        raise ValueError(f"reply code {code} is not one RFC 1928 defines (0..8)")
    if bound is None:
        return bytes([VERSION, code, 0, ATYP_IPV4, 0, 0, 0, 0, 0, 0])
    ip, port = _socket_address(bound)
    atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
    return bytes([VERSION, code, 0, atyp]) + ip.packed + port.to_bytes(2, "big")


def reply_for_errno(err: int | None) -> int:
    """The reply code for a failed connect's ``OSError.errno``: ECONNREFUSED ->
    CONNECTION_REFUSED; ENETUNREACH -> NETWORK_UNREACHABLE; EHOSTUNREACH, ETIMEDOUT,
    EHOSTDOWN -> HOST_UNREACHABLE; EACCES, EPERM (a firewall's refusal) -> NOT_ALLOWED;
    anything else (None included) -> GENERAL_FAILURE.

    A connect that times out on a socket timeout raises ``TimeoutError`` with errno None:
    pass ``errno.ETIMEDOUT`` for it."""
    return _ERRNO_REPLIES.get(err, GENERAL_FAILURE)


_ERRNO_REPLIES = {
    errno.ECONNREFUSED: CONNECTION_REFUSED,
    errno.ENETUNREACH: NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: HOST_UNREACHABLE,
    errno.ETIMEDOUT: HOST_UNREACHABLE,
    errno.EACCES: NOT_ALLOWED,
    errno.EPERM: NOT_ALLOWED,
}
if hasattr(errno, "EHOSTDOWN"):  # not on every platform
    _ERRNO_REPLIES[errno.EHOSTDOWN] = HOST_UNREACHABLE


def reply_for_gaierror(code: int | None) -> int:
    """The reply code for a failed name resolution (``socket.gaierror``'s errno, any
    ``EAI_*``): always HOST_UNREACHABLE. A name that does not resolve, has no address of
    the family asked for, or cannot be resolved now (EAI_AGAIN) names no host the server
    can reach; the client is told so, not that the server failed."""
    return HOST_UNREACHABLE


# -- the client's side ---------------------------------------------------------------------


def encode_greeting(methods: Iterable[int]) -> bytes:
    """A client's greeting offering ``methods`` (1 to 255 ints 0..255, in order; bytes
    work too), which ``parse_greeting`` reads back as the same tuple."""
    if isinstance(methods, (str, int)):
        raise TypeError(f"methods must be an iterable of ints, not {type(methods).__name__}")
    offered = bytes(_byte(m, f"methods[{i}]") for i, m in enumerate(methods))
    if not 1 <= len(offered) <= 255:
        raise ValueError(f"a greeting offers 1 to 255 methods, not {len(offered)}")
    return bytes([VERSION, len(offered)]) + offered


def encode_credentials(user: bytes | str, password: bytes | str) -> bytes:
    """A client's RFC 1929 username/password message; ``parse_credentials`` reads it back as
    the same bytes. A ``str`` is encoded as UTF-8. Each must be 1 to 255 bytes (ValueError)."""
    fields = []
    for value, name in ((user, "user"), (password, "password")):
        if isinstance(value, str):
            value = value.encode("utf-8")
        elif isinstance(value, (bytes, bytearray, memoryview)):
            value = _head(value, None)
        else:
            raise TypeError(f"{name} must be bytes or str, not {type(value).__name__}")
        if not 1 <= len(value) <= 255:
            raise ValueError(f"{name} must be 1 to 255 bytes, not {len(value)}")
        fields.append(bytes([len(value)]) + value)
    return bytes([_AUTH_VERSION]) + b"".join(fields)


def encode_request(command: int, host: str, port: int) -> bytes:
    """A client's request; ``parse_request`` reads it back as the same command, host (IP
    text as ``ipaddress`` prints it), port and ATYP.

    The ATYP follows from ``host``: IPv4 text -> ATYP_IPV4, IPv6 text (no brackets, no scope
    id: ValueError) -> ATYP_IPV6, anything else -> ATYP_DOMAIN, sent as it is: 1 to 255
    bytes of printable ASCII without spaces (an internationalised name must be given
    IDNA-encoded), else ValueError. ``command``: CONNECT, BIND or UDP_ASSOCIATE; ``port``:
    0..65535, not 0 for CONNECT (``parse_request`` refuses it)."""
    if isinstance(command, bool) or not isinstance(command, int):
        raise TypeError(f"command must be an int, not {type(command).__name__}")
    if command not in _COMMANDS:
        raise ValueError(f"command {command} is not CONNECT (1), BIND (2) or UDP ASSOCIATE (3)")
    port = _port(port, "port")
    if port == 0 and command == CONNECT:
        raise ValueError("port 0 for CONNECT: parse_request refuses it")
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = host
    elif isinstance(host, str):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = None
    else:
        raise TypeError(f"host must be a str, not {type(host).__name__}")
    if ip is not None:
        if getattr(ip, "scope_id", None):
            raise ValueError(f"host {str(host)!r} has a scope id, which SOCKS5 cannot carry")
        atyp = ATYP_IPV4 if ip.version == 4 else ATYP_IPV6
        address = ip.packed
    else:
        atyp = ATYP_DOMAIN
        try:
            name = host.encode("ascii")
        except UnicodeEncodeError:
            raise ValueError(
                f"host {host!r} is not ASCII: give an internationalised name IDNA-encoded"
            ) from None
        if not 1 <= len(name) <= _NAME_MAX:
            raise ValueError(f"domain name must be 1 to 255 bytes, not {len(name)}")
        bad = _BAD_NAME_BYTE.search(name)
        if bad is not None:
            raise ValueError(
                f"domain name {host!r} has the byte 0x{bad.group()[0]:02x} at {bad.start()}: "
                "only printable ASCII without spaces"
            )
        address = bytes([len(name)]) + name
    return bytes([VERSION, command, 0, atyp]) + address + port.to_bytes(2, "big")


# -- argument checks -----------------------------------------------------------------------


def _byte(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFF:
        raise ValueError(f"{what} is {value}, not in 0..255")
    return value


def _port(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{what} {value} is not in 0..65535")
    return value


def _socket_address(
    pair: object,
) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``pair`` (a socket address) as (ip, port); TypeError / ValueError naming the fault."""
    if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 4):
        raise TypeError(
            f"bound must be an (ip, port) tuple (or an IPv6 socket's 4-tuple), not {pair!r}"
        )
    host, port = pair[0], pair[1]
    if isinstance(host, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        ip = host
    elif isinstance(host, str):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"bound address {host!r} is not an IPv4 or IPv6 address") from None
    else:
        raise TypeError(f"bound address must be a str, not {type(host).__name__}")
    if len(pair) == 4 and ip.version != 6:
        raise ValueError(f"bound is a 4-tuple, which only an IPv6 address has: {pair!r}")
    return ip, _port(port, "bound port")
