"""The PROXY protocol (HAProxy's, versions 1 and 2): read and write the header a proxy puts in
front of a TCP connection's bytes to tell the next hop who the client really is.

``parse(data)`` reads the header at the start of what a connection has received so far:

* a complete, valid header gives a ``ProxyHeader``; its ``length`` says how many bytes of
  ``data`` it took, and ``data[length:]`` is the connection's own data, untouched;
* a valid but incomplete beginning of a header gives ``None``: read more and call again
  with everything received so far;
* anything else raises ``ProxyProtocolError`` (a ``ValueError``) as soon as the bytes cannot
  begin a valid header, with a message that says what was wrong.

The first byte decides the version: ``P`` for the text version 1 (``PROXY ...\\r\\n``, at most
``V1_MAX`` = 107 bytes), ``\\r`` for the binary version 2 (the 12-byte ``V2_SIGNATURE``, then
16 bytes in all before the address block). Version 1 is read strictly: single spaces, dotted
quads without leading zeros for ``TCP4``, IPv6 text (no scope) for ``TCP6``, decimal ports
0..65535 without leading zeros, and the line must end with CRLF (a lone CR or LF is an
error). ``PROXY UNKNOWN`` followed by anything (or nothing) up to the CRLF is accepted.

The connection this header arrives on is TCP, so only a version 2 PROXY command with the
TCP over IPv4 or TCP over IPv6 family carries addresses the receiver uses. A LOCAL command
(whatever its family), the UNSPEC family, and the UDP and UNIX families all give
``local=True`` with no addresses: the receiver uses the connection's own addresses. Version 2
TLVs are returned in order as (type, value) pairs and are not interpreted; in particular the
CRC32c TLV (type 0x03) is not checked. The TLVs must exactly fill the block after the family's
addresses (with UNSPEC, the whole block). A PROXY command with a family byte the spec does not
define is an error; a LOCAL command with one is accepted and its block skipped (no TLVs), as
the spec says a LOCAL command's family is ignored. ``UNKNOWN`` in version 1 must be followed
by a space or the CRLF.

``max_size`` (default ``V2_MAX`` = 16 + 65535) bounds a header of either version; a version 2
length field over ``max_size - 16`` is refused as soon as its 16 fixed bytes are in.

``encode_v1`` and ``encode_v2`` write headers that ``parse`` reads back to the same
addresses (and TLVs). Their bad arguments raise ``ValueError`` (or ``TypeError`` for a wrong
type) naming what was wrong. The module is pure: no I/O, no state, standard library only.
"""

from __future__ import annotations

import ipaddress
import re
from collections import namedtuple

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import NamedTuple

    class _HeaderFields(NamedTuple):
        version: int
        local: bool
        source: tuple[str, int] | None
        dest: tuple[str, int] | None
        tlvs: tuple[tuple[int, bytes], ...]
        length: int

else:
    _HeaderFields = namedtuple(
        "ProxyHeader", ["version", "local", "source", "dest", "tlvs", "length"]
    )

#: The longest version 1 header, CRLF included (the spec's worst case line).
V1_MAX = 107
#: The 12 bytes that begin every version 2 header.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The fixed part of a version 2 header: signature, version/command, family, length.
V2_FIXED = 16
#: The longest version 2 header: its length field is 16 bits.
V2_MAX = V2_FIXED + 0xFFFF

#: Version 2 TLV types the spec defines (``parse`` returns every TLV, known or not).
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_V1_PREFIX = b"PROXY "
_V1_PROTOCOLS = (b"TCP4", b"TCP6", b"UNKNOWN")

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_FAM_TCP4 = 0x11
_FAM_TCP6 = 0x21
# Family/transport byte -> size of its address block. The spec defines no other values.
_FAMILY_SIZES = {
    0x00: 0,  # UNSPEC
    0x11: 12,  # TCP over IPv4: two 4-byte addresses, two ports
    0x12: 12,  # UDP over IPv4
    0x21: 36,  # TCP over IPv6: two 16-byte addresses, two ports
    0x22: 36,  # UDP over IPv6
    0x31: 216,  # UNIX stream: two 108-byte paths
    0x32: 216,  # UNIX datagram
}

_OCTET = rb"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_OCTET_TEXT = re.compile(_OCTET)
_IPV4_TEXT = re.compile(_OCTET + rb"(?:\." + _OCTET + rb"){3}")
_IPV4_CHARS = re.compile(rb"[0-9.]*")
_IPV6_CHARS = re.compile(rb"[0-9A-Fa-f:.]*")
_PORT_TEXT = re.compile(rb"0|[1-9][0-9]{0,4}")
_DIGITS = re.compile(rb"[0-9]*")
_IPV4_TEXT_MAX = len("255.255.255.255")
_IPV6_TEXT_MAX = len("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255")


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY protocol header; the message says what was wrong."""


class ProxyHeader(_HeaderFields):
    """One PROXY protocol header, as ``parse`` read it.

    ``version``: 1 or 2. ``local``: no TCP addresses are carried (a v2 LOCAL command, v1
    ``UNKNOWN``, or a v2 UNSPEC, UDP or UNIX family); the receiver uses the connection's own
    addresses. ``source`` and ``dest``: ``(ip, port)`` with the ip as ``ipaddress`` prints it,
    ``None`` when ``local``. ``tlvs``: the v2 TLVs in order as ``(type, value)``, ``()`` for
    v1. ``length``: how many bytes of the input the header took.
    """

    __slots__ = ()


def parse(data: bytes | bytearray | memoryview, *, max_size: int = V2_MAX) -> ProxyHeader | None:
    """The header at the start of ``data``; None while ``data`` is a valid but incomplete
    beginning of one (read more and call again); ProxyProtocolError as soon as the bytes
    cannot begin a valid header.

    Nothing after the header is looked at beyond what tells where it ends: ``data[h.length:]``
    is the connection's own data. ``max_size`` bounds the whole header in bytes (both
    versions; a version 1 header is never longer than ``V1_MAX``): a version 2 length field
    over ``max_size - 16`` is an error as soon as it is read. ``max_size`` below 16 is a
    ``ValueError`` (not a ``ProxyProtocolError``: the bytes are not at fault).
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise TypeError(f"max_size must be an int, not {type(max_size).__name__}")
    if max_size < V2_FIXED:
        raise ValueError(
            f"max_size must be at least {V2_FIXED} (a v2 fixed header), not {max_size}"
        )
    view = memoryview(data).cast("B")
    if not view:
        return None
    first = view[0]
    if first == _V1_PREFIX[0]:
        return _parse_v1(view, min(V1_MAX, max_size))
    if first == V2_SIGNATURE[0]:
        return _parse_v2(view, max_size)
    raise ProxyProtocolError(
        f"not a PROXY protocol header: the first byte is {bytes([first])!r}, "
        "neither 'P' (v1 'PROXY ') nor '\\r' (the v2 signature)"
    )


# -- version 1 ----------------------------------------------------------------------------


def _parse_v1(view: memoryview, limit: int) -> ProxyHeader | None:
    head = bytes(view[:limit])
    start = min(len(head), len(_V1_PREFIX))
    if head[:start] != _V1_PREFIX[:start]:
        raise ProxyProtocolError(
            f"not a PROXY protocol header: {head[:start]!r} does not begin v1 'PROXY '"
        )
    cr = head.find(b"\r")
    lf = head.find(b"\n")
    if lf != -1 and (cr == -1 or lf < cr):
        raise ProxyProtocolError("v1 line ends with a lone LF: it must end with CRLF")
    if cr == -1:
        if len(head) >= limit:
            raise ProxyProtocolError(f"v1 line has no CRLF within its limit of {limit} bytes")
        _check_v1_fields(head[len(_V1_PREFIX) :], complete=False)
        return None
    if cr + 1 < len(head) and head[cr + 1] != 0x0A:
        raise ProxyProtocolError("v1 line has a CR not followed by LF: it must end with CRLF")
    if cr + 2 > limit:
        raise ProxyProtocolError(f"v1 line has no CRLF within its limit of {limit} bytes")
    fields = _check_v1_fields(head[len(_V1_PREFIX) : cr], complete=True)
    if cr + 1 >= len(head):
        return None  # the LF is still to come
    length = cr + 2
    if fields is None:
        return ProxyHeader(1, True, None, None, (), length)
    source, dest = fields
    return ProxyHeader(1, False, source, dest, (), length)


def _check_v1_fields(
    rest: bytes, *, complete: bool
) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """Check the v1 line after ``PROXY `` (without its CRLF); raise on the first field that is
    wrong. When ``complete``, return the (source, dest) of a TCP line, None for UNKNOWN; when
    not, the last field may be the beginning of one (and None is returned)."""
    fields = rest.split(b" ")
    protocol = fields[0]
    if protocol == b"UNKNOWN":
        return None  # the spec: ignore anything before the CRLF
    if protocol.startswith(b"UNKNOWN"):
        raise ProxyProtocolError(f"v1 protocol {_show(protocol)} is not TCP4, TCP6 or UNKNOWN")
    if len(fields) == 1 and not complete:
        if not any(p.startswith(protocol) for p in _V1_PROTOCOLS):
            raise ProxyProtocolError(f"v1 protocol {_show(protocol)} is not TCP4, TCP6 or UNKNOWN")
        return None
    if protocol not in _V1_PROTOCOLS:
        raise ProxyProtocolError(f"v1 protocol {_show(protocol)} is not TCP4, TCP6 or UNKNOWN")
    values = fields[1:]
    if len(values) > 4:
        raise ProxyProtocolError(f"v1 {protocol.decode()} line has more than 4 fields after it")
    names = ("source address", "destination address", "source port", "destination port")
    for i, value in enumerate(values):
        whole = complete or i < len(values) - 1
        name = names[i]
        if whole and not value:
            raise ProxyProtocolError(f"v1 {name} is empty (two spaces, or a missing field)")
        if i < 2:
            _check_v1_address(protocol, value, name, whole)
        else:
            _check_v1_port(value, name, whole)
    if not complete:
        return None
    if len(values) < 4:
        raise ProxyProtocolError(
            f"v1 {protocol.decode()} line has {len(values)} of its 4 fields "
            "(source address, destination address, source port, destination port)"
        )
    src_ip, dst_ip, src_port, dst_port = values
    return (
        (str(ipaddress.ip_address(src_ip.decode())), int(src_port)),
        (str(ipaddress.ip_address(dst_ip.decode())), int(dst_port)),
    )


def _check_v1_address(protocol: bytes, value: bytes, name: str, whole: bool) -> None:
    if protocol == b"TCP4":
        if whole:
            if not _IPV4_TEXT.fullmatch(value):
                raise ProxyProtocolError(
                    f"v1 {name} {_show(value)} is not an IPv4 dotted quad "
                    "(four numbers 0..255, no leading zeros)"
                )
            return
        parts = value.split(b".")
        if (
            not _IPV4_CHARS.fullmatch(value)
            or len(value) > _IPV4_TEXT_MAX
            or len(parts) > 4
            or not all(_OCTET_TEXT.fullmatch(part) for part in parts[:-1])
            or not _octet_may_begin(parts[-1])
        ):
            raise ProxyProtocolError(
                f"v1 {name} {_show(value)} cannot begin an IPv4 dotted quad "
                "(four numbers 0..255, no leading zeros)"
            )
        return
    # TCP6
    if not _IPV6_CHARS.fullmatch(value) or len(value) > _IPV6_TEXT_MAX:
        raise ProxyProtocolError(f"v1 {name} {_show(value)} is not IPv6 address text")
    if whole:
        try:
            ipaddress.IPv6Address(value.decode("ascii"))
        except ValueError:
            raise ProxyProtocolError(f"v1 {name} {_show(value)} is not an IPv6 address") from None


def _octet_may_begin(part: bytes) -> bool:
    """``part`` (the last, unfinished number of a dotted quad) can still become 0..255."""
    if not part:
        return True
    if not part.isdigit() or len(part) > 3 or (len(part) > 1 and part[0] == 0x30):
        return False
    return int(part) <= 255


def _check_v1_port(value: bytes, name: str, whole: bool) -> None:
    if whole:
        ok = _PORT_TEXT.fullmatch(value) is not None and int(value) <= 0xFFFF
    else:
        ok = (
            _DIGITS.fullmatch(value) is not None
            and len(value) <= 5
            and not (len(value) > 1 and value[0] == 0x30)
            and (not value or int(value) <= 0xFFFF)
        )
    if not ok:
        raise ProxyProtocolError(
            f"v1 {name} {_show(value)} is not a decimal port 0..65535 without leading zeros"
        )


def _show(value: bytes) -> str:
    """A field for an error message: short, and printable whatever the bytes."""
    return repr(value[:48] + (b"..." if len(value) > 48 else b""))


# -- version 2 ----------------------------------------------------------------------------


def _parse_v2(view: memoryview, max_size: int) -> ProxyHeader | None:
    have = len(view)
    start = min(have, len(V2_SIGNATURE))
    if bytes(view[:start]) != V2_SIGNATURE[:start]:
        raise ProxyProtocolError(
            f"not a PROXY protocol header: {bytes(view[:start])!r} does not begin the v2 signature"
        )
    if have < 13:
        return None
    version, command = view[12] >> 4, view[12] & 0x0F
    if version != 2:
        raise ProxyProtocolError(f"v2 version is {version}, not 2 (byte 13 is 0x{view[12]:02x})")
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(
            f"v2 command is {command}: only 0 (LOCAL) and 1 (PROXY) are defined"
        )
    if have < 14:
        return None
    family = view[13]
    address_size = _FAMILY_SIZES.get(family)
    if address_size is None and command == _CMD_PROXY:
        raise ProxyProtocolError(f"v2 address family and protocol byte 0x{family:02x} is unknown")
    if have < V2_FIXED:
        return None
    length = int.from_bytes(view[14:16], "big")
    if length > max_size - V2_FIXED:
        raise ProxyProtocolError(
            f"v2 length {length} is over the limit of {max_size - V2_FIXED} "
            f"(max_size {max_size} less the 16-byte fixed part)"
        )
    if address_size is not None and length < address_size:
        raise ProxyProtocolError(
            f"v2 address block of {length} bytes is shorter than the {address_size} bytes "
            f"family 0x{family:02x} needs"
        )
    end = V2_FIXED + length
    tlvs: list[tuple[int, bytes]] = []
    if address_size is not None:
        # Walk the TLVs as far as the bytes go: a bad one is an error before the rest arrives.
        pos = V2_FIXED + address_size
        while pos < end:
            if end - pos < 3:
                raise ProxyProtocolError(
                    f"v2 TLV truncated: {end - pos} bytes are left at offset {pos}, "
                    "a TLV needs at least 3"
                )
            if pos + 3 > have:
                return None
            kind, size = view[pos], int.from_bytes(view[pos + 1 : pos + 3], "big")
            if pos + 3 + size > end:
                raise ProxyProtocolError(
                    f"v2 TLV truncated: type 0x{kind:02x} at offset {pos} has a length of "
                    f"{size}, {pos + 3 + size - end} bytes past the header's end at {end}"
                )
            if pos + 3 + size > have:
                return None
            tlvs.append((kind, bytes(view[pos + 3 : pos + 3 + size])))
            pos += 3 + size
    # else: a LOCAL command with a family the spec does not define: the block is ignored.
    if have < end:
        return None
    if command == _CMD_LOCAL or family not in (_FAM_TCP4, _FAM_TCP6):
        return ProxyHeader(2, True, None, None, tuple(tlvs), end)
    size = 4 if family == _FAM_TCP4 else 16
    make = ipaddress.IPv4Address if family == _FAM_TCP4 else ipaddress.IPv6Address
    ports = V2_FIXED + 2 * size
    source = (
        str(make(bytes(view[V2_FIXED : V2_FIXED + size]))),
        int.from_bytes(view[ports : ports + 2], "big"),
    )
    dest = (
        str(make(bytes(view[V2_FIXED + size : ports]))),
        int.from_bytes(view[ports + 2 : ports + 4], "big"),
    )
    return ProxyHeader(2, False, source, dest, tuple(tlvs), end)


# -- encoding -----------------------------------------------------------------------------


def _address(pair: object, which: str) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``pair`` as (address, port), or TypeError / ValueError naming ``which`` and the fault."""
    if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 4):
        raise TypeError(
            f"{which} must be an (ip, port) tuple (or an IPv6 socket's 4-tuple), not {pair!r}"
        )
    host, port = pair[0], pair[1]
    if not isinstance(host, (str, ipaddress.IPv4Address, ipaddress.IPv6Address)):
        raise TypeError(f"{which} ip must be a str, not {type(host).__name__}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{which} ip {host!r} is not an IPv4 or IPv6 address") from None
    if len(pair) == 4 and ip.version != 6:
        raise ValueError(f"{which} is a 4-tuple, which only an IPv6 address has: {pair!r}")
    if getattr(ip, "scope_id", None):
        raise ValueError(f"{which} ip {host!r} has a scope id, which a PROXY header cannot carry")
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"{which} port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{which} port {port} is not in 0..65535")
    return ip, port


def _addresses(
    source: object, dest: object
) -> tuple[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], ...] | None:
    """Both addresses checked, or None when either is None (the other is checked anyway)."""
    checked = tuple(
        _address(pair, which)
        for pair, which in ((source, "source"), (dest, "dest"))
        if pair is not None
    )
    if len(checked) < 2:
        return None
    (src_ip, _), (dst_ip, _) = checked
    if src_ip.version != dst_ip.version:
        raise ValueError(
            f"source {src_ip} is IPv{src_ip.version} but dest {dst_ip} is IPv{dst_ip.version}: "
            "a PROXY header carries two addresses of one family"
        )
    return checked


def encode_v1(source: tuple[str, int] | None, dest: tuple[str, int] | None) -> bytes:
    """A version 1 header that ``parse`` reads back as ``source`` and ``dest`` (ip text as
    ``ipaddress`` prints it); None for either -> b"PROXY UNKNOWN\\r\\n". ValueError when the
    two are of different families or not IP addresses / ports 0..65535.

    An address may also be an IPv6 socket address 4-tuple (its flow info and scope id are
    dropped), so ``sock.getpeername()`` can be passed as it is. A wrong type is a TypeError.
    """
    checked = _addresses(source, dest)
    if checked is None:
        return b"PROXY UNKNOWN\r\n"
    (src_ip, src_port), (dst_ip, dst_port) = checked
    protocol = "TCP4" if src_ip.version == 4 else "TCP6"
    return f"PROXY {protocol} {src_ip} {dst_ip} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(
    source: tuple[str, int] | None,
    dest: tuple[str, int] | None,
    *,
    tlvs: Iterable[tuple[int, bytes]] = (),
) -> bytes:
    """A version 2 header that ``parse`` reads back as ``source``, ``dest`` and ``tlvs``: the
    PROXY command with TCP4/TCP6 addresses; None for either -> the LOCAL command with family
    UNSPEC. Same ValueErrors; a TLV type outside 0..255 or value over 65535 bytes ->
    ValueError.

    The TLVs follow the addresses in the order given (after them, or alone with LOCAL). A
    header whose addresses and TLVs together exceed 65535 bytes is a ValueError. Addresses
    are taken as by ``encode_v1``.
    """
    checked = _addresses(source, dest)
    blocks = []
    for i, item in enumerate(tlvs):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"TLV {i} must be a (type, value) pair, not {item!r}")
        kind, value = item
        if isinstance(kind, bool) or not isinstance(kind, int):
            raise TypeError(f"TLV {i} type must be an int, not {type(kind).__name__}")
        if not 0 <= kind <= 0xFF:
            raise ValueError(f"TLV {i} type {kind} is not in 0..255")
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"TLV {i} value must be bytes, not {type(value).__name__}")
        value = bytes(memoryview(value).cast("B"))
        if len(value) > 0xFFFF:
            raise ValueError(f"TLV {i} value of {len(value)} bytes is over 65535 bytes")
        blocks.append(bytes([kind]) + len(value).to_bytes(2, "big") + value)
    if checked is None:
        command, family, addresses = 0x20, 0x00, b""
    else:
        (src_ip, src_port), (dst_ip, dst_port) = checked
        command = 0x21
        family = _FAM_TCP4 if src_ip.version == 4 else _FAM_TCP6
        addresses = (
            src_ip.packed
            + dst_ip.packed
            + src_port.to_bytes(2, "big")
            + dst_port.to_bytes(2, "big")
        )
    body = addresses + b"".join(blocks)
    if len(body) > 0xFFFF:
        raise ValueError(
            f"v2 header would carry {len(body)} bytes after its fixed part, over 65535"
        )
    return V2_SIGNATURE + bytes([command, family]) + len(body).to_bytes(2, "big") + body
