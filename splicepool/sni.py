"""Read the server name (SNI) and ALPN names from the TLS ClientHello a client sends first.

A TLS proxy that routes on the server name must look at the client's first bytes before it
picks a backend, but it must not change them: the backend terminates TLS and needs the
stream exactly as the client sent it. ``parse_client_hello`` therefore only *reads* a
buffer that holds the start of the stream; it never consumes anything. The caller keeps
reading into the buffer and calling again until it gets an answer, then sends the whole
buffer on to the chosen backend (and splices the rest).

The contract of ``parse_client_hello(data)``:

* ``ClientHello(server_name, alpn, length)`` once ``data`` starts with a complete,
  well-formed ClientHello. ``length`` is how many bytes of ``data`` the TLS records holding
  it take; bytes after them are not looked at.
* ``None`` while ``data`` is a valid but incomplete beginning of one: every prefix of a
  valid ClientHello, split anywhere (TCP segments) and fragmented over any number of TLS
  records, gives ``None``. Read more and call again with the longer buffer.
* ``NotTLS`` (a ``ClientHelloError``) as soon as the first bytes are not a TLS handshake
  record at all: a plain-text client, an SSLv2-compatible hello, an empty-looking stream.
* ``ClientHelloError`` (a ``ValueError``) as soon as the bytes are TLS but cannot be a
  well-formed ClientHello, or when the ClientHello would need more than ``max_size`` bytes
  of input (``MAX_HELLO``, 16384, by default). The message says what was wrong.

What is accepted (the choices a user may need to know):

* Records: content type 22 (handshake) only, until the ClientHello is complete; a record of
  any other type before that is an error. The record version must be 0x0300 to 0x0304
  (SSL 3.0 record versions are accepted because some old clients send them on their
  first record; SSLv2-compatible hellos are ``NotTLS``). A record holds 1 to 16640 bytes
  (2**14 + 256). The ClientHello may be fragmented over several records; a record that
  holds bytes after the end of the ClientHello is an error (a client sends nothing else
  before the server answers).
* The ClientHello body: legacy version 0x0300 to 0x0304, a 32-byte random, a session id
  of at most 32 bytes, a non-empty even-length cipher suite list, at least one compression
  method, then optionally the extensions block, which must end exactly where the message
  ends. Two extensions of the same type are an error (RFC 8446 section 4.2).
* ``server_name`` (extension 0): the list is walked entry by entry (each entry is a type
  byte and a 2-byte length, the only layout ever defined); entries of other name types are
  skipped; exactly one ``host_name`` (type 0) entry is allowed, a second is an error
  (RFC 6066 section 3). The name is 1 to 255 bytes of letters, digits, ``-``, ``_`` and
  ``.``; its labels are 1 to 63 bytes (no empty label, so no leading dot and no ``..``).
  It is returned lowercased, with one trailing dot removed. An IP literal sent as a name
  passes these rules and is returned as sent (RFC 6066 forbids it, but it is harmless to
  route on). No ``host_name`` entry, or no extension at all, gives ``server_name=None``.
* ALPN (extension 16): a non-empty list of names of 1 to 255 bytes each, returned in the
  client's order. Names are decoded as Latin-1, so every byte maps to one character and
  ``name.encode("latin-1")`` gives back the exact bytes (real names are ASCII, "h2").

The parser is cheap: it looks at each byte at most once per call, reads nothing beyond
what the length fields say, and copies at most ``max_size`` bytes (the handshake bytes,
when the ClientHello is fragmented over several records). A caller feeding it a growing
buffer pays for re-parsing the prefix on each call; ``max_size`` bounds that work.
Standard library only.
"""

from __future__ import annotations

from collections import namedtuple

__all__ = ["MAX_HELLO", "ClientHello", "ClientHelloError", "NotTLS", "parse_client_hello"]

#: Bytes of TLS records (headers included) the parser will look at for one ClientHello:
#: a ClientHello that needs more input than this is a ``ClientHelloError``. Real hellos
#: are 200 to 2000 bytes (post-quantum key shares included); 16384 leaves ample room.
MAX_HELLO = 16384

#: The largest record length accepted: 2**14 bytes of plaintext plus 256 of expansion.
MAX_RECORD = 16384 + 256

_HANDSHAKE = 22
_CLIENT_HELLO = 1
_EXT_SERVER_NAME = 0
_EXT_ALPN = 16
_NAME_HOST = 0
# The smallest body: version 2, random 32, session id length 1, cipher suites 2 + 2,
# compression methods 1 + 1.
_MIN_BODY = 41
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


class ClientHelloError(ValueError):
    """The bytes are TLS but not a well-formed ClientHello; the message says what was wrong."""


class NotTLS(ClientHelloError):
    """The first bytes are not a TLS handshake record at all (a plain-text client, say)."""


ClientHello = namedtuple("ClientHello", ["server_name", "alpn", "length"])
ClientHello.__doc__ = """What ``parse_client_hello`` found in one complete ClientHello.

``server_name``: the host_name of the server_name extension: ASCII, lowercased, one
trailing dot removed; None when the client sent no SNI. ``alpn``: the ALPN protocol
names offered, in order (() when none). ``length``: bytes of input the records holding
the ClientHello took (nothing is consumed).
"""


class _Incomplete(Exception):
    """Internal: the bytes so far are a valid beginning but more are needed."""


class _Reader:
    """A cursor over the handshake bytes received so far, inside nested length limits.

    ``take`` past the current limit is malformed input (``ClientHelloError``); past the
    bytes received so far it is only incomplete input (``_Incomplete``).
    """

    __slots__ = ("buf", "pos", "have")

    def __init__(self, buf: bytes | bytearray, pos: int) -> None:
        self.buf = buf
        self.pos = pos
        self.have = len(buf)

    def take(self, n: int, end: int, what: str) -> int:
        """Advance over ``n`` bytes that must fit before ``end``; return where they start."""
        start = self.pos
        if start + n > end:
            raise ClientHelloError(f"the {what} runs past the end of its enclosing field")
        if start + n > self.have:
            raise _Incomplete
        self.pos = start + n
        return start

    def uint(self, size: int, end: int, what: str) -> int:
        start = self.take(size, end, what)
        return int.from_bytes(self.buf[start : start + size], "big")

    def vector(self, size: int, end: int, what: str) -> int:
        """Read a ``size``-byte length that must fit before ``end``; return the vector's end.

        The vector's bytes are not consumed; the caller walks them, or calls ``skip_to``.
        """
        length = self.uint(size, end, f"{what} length")
        vend = self.pos + length
        if vend > end:
            raise ClientHelloError(
                f"the {what} length {length} runs past the end of its enclosing field"
            )
        return vend

    def skip_to(self, vend: int) -> None:
        if vend > self.have:
            raise _Incomplete
        self.pos = vend


def parse_client_hello(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_HELLO
) -> ClientHello | None:
    """The ClientHello at the start of ``data``; None while ``data`` is a valid but incomplete
    beginning (read more and call again); NotTLS / ClientHelloError as soon as it cannot be
    one; ClientHelloError when it would need more than max_size bytes.

    ``data`` is only read, never changed; ``length`` in the result says how many of its
    bytes the ClientHello's records took. ``max_size`` must be a positive int (ValueError).
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ValueError(f"max_size must be a positive int, not {max_size!r}")
    view = memoryview(data)
    if view.itemsize != 1 or view.ndim != 1:
        view = view.cast("B")
    n = len(view)
    pos = 0  # start of the record being read
    records = 0
    hs = bytearray()  # the handshake message bytes gathered from the records so far
    need = 0  # the handshake message's full size (4 + its length), 0 until known
    while not need or len(hs) < need:
        first = records == 0
        if pos >= n:
            return _partial(hs, need)
        ctype = view[pos]
        if ctype != _HANDSHAKE:
            if first:
                raise NotTLS(f"the first byte is {ctype:#04x}, not a TLS handshake record (0x16)")
            raise ClientHelloError(
                f"a record of content type {ctype} came before the ClientHello was complete"
            )
        if pos + 1 < n and view[pos + 1] != 3:
            if first:
                raise NotTLS(f"record version major {view[pos + 1]} is not TLS (3)")
            raise ClientHelloError(f"record {records + 1} has version major {view[pos + 1]}")
        if pos + 2 < n and view[pos + 2] > 4:
            raise ClientHelloError(
                f"record version 3.{view[pos + 2]} is not one of 3.0 to 3.4 (SSL 3.0 to TLS 1.3)"
            )
        if pos + 5 > n:
            return _partial(hs, need)
        rlen = (view[pos + 3] << 8) | view[pos + 4]
        if rlen == 0:
            raise ClientHelloError("a handshake record of length 0")
        if rlen > MAX_RECORD:
            raise ClientHelloError(f"record length {rlen} is over the limit of {MAX_RECORD}")
        records += 1
        rend = pos + 5 + rlen
        if rend > max_size:
            raise ClientHelloError(f"the ClientHello needs more than max_size={max_size} bytes")
        had = len(hs)
        hs += view[pos + 5 : min(rend, n)]
        if had == 0 and hs and hs[0] != _CLIENT_HELLO:
            raise ClientHelloError(f"handshake message type {hs[0]} is not ClientHello (1)")
        if not need and len(hs) >= 4:
            body = int.from_bytes(hs[1:4], "big")
            if body < _MIN_BODY:
                raise ClientHelloError(
                    f"ClientHello length {body} is under the smallest possible ({_MIN_BODY})"
                )
            need = 4 + body
            if need + 5 * records > max_size:
                raise ClientHelloError(
                    f"the ClientHello ({body} bytes) needs more than max_size={max_size} bytes"
                )
        if need and had + rlen > need:
            raise ClientHelloError("the record holding the end of the ClientHello has more bytes")
        if rend > n:
            return _partial(hs, need)
        pos = rend
    server_name, alpn = _parse_body(hs, need)
    return ClientHello(server_name, alpn, pos)


def _partial(hs: bytearray, need: int) -> None:
    """Check the ClientHello bytes received so far; None when they are a valid beginning."""
    if need:
        try:
            _parse_body(hs, need)
        except _Incomplete:
            return None
        raise AssertionError("a complete ClientHello reported as partial")  # pragma: no cover
    return None


def _parse_body(hs: bytes | bytearray, end: int) -> tuple[str | None, tuple[str, ...]]:
    """Walk the ClientHello body in ``hs[4:end]``; raise _Incomplete when ``hs`` stops short."""
    r = _Reader(hs, 4)
    major = r.uint(1, end, "legacy_version")
    minor = r.uint(1, end, "legacy_version")
    if major != 3 or minor > 4:
        raise ClientHelloError(f"ClientHello version {major}.{minor} is not 3.0 to 3.4")
    r.take(32, end, "random")
    vend = r.vector(1, end, "session_id")
    if vend - r.pos > 32:
        raise ClientHelloError(f"session_id length {vend - r.pos} is over 32")
    r.skip_to(vend)
    vend = r.vector(2, end, "cipher_suites")
    suites = vend - r.pos
    if suites < 2 or suites % 2:
        raise ClientHelloError(f"cipher_suites length {suites} is not a positive even number")
    r.skip_to(vend)
    vend = r.vector(1, end, "compression_methods")
    if vend == r.pos:
        raise ClientHelloError("compression_methods is empty")
    r.skip_to(vend)
    if r.pos == end:
        return None, ()
    ext_end = r.vector(2, end, "extensions")
    if ext_end != end:
        raise ClientHelloError(
            f"{end - ext_end} bytes after the extensions, before the end of the ClientHello"
        )
    seen: set[int] = set()
    server_name: str | None = None
    alpn: tuple[str, ...] = ()
    while r.pos < ext_end:
        etype = r.uint(2, ext_end, "extension type")
        if etype in seen:
            raise ClientHelloError(f"extension {etype} appears twice")
        seen.add(etype)
        data_end = r.vector(2, ext_end, f"extension {etype}")
        if etype == _EXT_SERVER_NAME:
            server_name = _server_name(r, data_end)
        elif etype == _EXT_ALPN:
            alpn = _alpn(r, data_end)
        else:
            r.skip_to(data_end)
    return server_name, alpn


def _server_name(r: _Reader, end: int) -> str | None:
    list_end = r.vector(2, end, "server_name list")
    if list_end != end:
        raise ClientHelloError("the server_name list does not fill its extension")
    if r.pos == list_end:
        raise ClientHelloError("the server_name list is empty")
    found: str | None = None
    while r.pos < list_end:
        name_type = r.uint(1, list_end, "server_name type")
        name_end = r.vector(2, list_end, "server_name entry")
        if name_type != _NAME_HOST:
            r.skip_to(name_end)
            continue
        if found is not None:
            raise ClientHelloError("the server_name list has two host_name entries")
        start = r.pos
        r.skip_to(name_end)
        found = _host_name(bytes(r.buf[start:name_end]))
    return found


def _host_name(raw: bytes) -> str:
    if not 1 <= len(raw) <= 255:
        raise ClientHelloError(f"server name length {len(raw)} is not 1 to 255")
    bad = next((b for b in raw if b not in _HOST_CHARS), None)
    if bad is not None:
        raise ClientHelloError(f"server name has the byte {bad:#04x}, not a host name character")
    if raw.endswith(b"."):
        raw = raw[:-1]
    for label in raw.split(b"."):
        if not 1 <= len(label) <= 63:
            raise ClientHelloError(
                f"server name {raw.decode('ascii')!r} has a label of {len(label)} bytes"
                " (1 to 63 allowed)"
            )
    return raw.decode("ascii").lower()


def _alpn(r: _Reader, end: int) -> tuple[str, ...]:
    list_end = r.vector(2, end, "ALPN list")
    if list_end != end:
        raise ClientHelloError("the ALPN list does not fill its extension")
    if r.pos == list_end:
        raise ClientHelloError("the ALPN list is empty")
    names = []
    while r.pos < list_end:
        name_end = r.vector(1, list_end, "ALPN name")
        if name_end == r.pos:
            raise ClientHelloError("an ALPN name is empty")
        start = r.pos
        r.skip_to(name_end)
        names.append(bytes(r.buf[start:name_end]).decode("latin-1"))
    return tuple(names)
