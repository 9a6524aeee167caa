"""HTTP/1.1 (RFC 9112) heads for a reverse proxy whose bodies never enter Python: parse and
validate request and response heads, decide how each body is framed, read chunk-size lines and
trailers, and rewrite heads for the next hop. Parse and encode only: no sockets, no threads.

Heads are parsed and validated by h11 (``pip install 'splicepool[http]'``), imported the first
time a head is parsed; this module finds where a head ends, bounds its size, feeds h11 only the
head (never a body byte) and checks what h11 leaves to the caller (the HTTP version, framing).

When httptools (llhttp's binding, in the same extra) imports, a complete head that is plain
takes a fast path: its first line matched by one regex, every header line ``name: value`` CRLF
with a value h11 takes as it is (no space or tab at either end), Content-Length a number,
Transfer-Encoding chunked, one Host. httptools reads its fields and the result is the one h11
would give. Any other head (bare LF, obs-fold, a method llhttp does not know, a field h11
reads its own way or refuses) goes to h11, which also words every error: the results, and
the errors with their status and message, are the same with or without httptools; only the
time differs. ``use_parser("h11")`` (or ``SPLICEPOOL_HTTP1_PARSER=h11`` in the environment)
turns the fast path off; h11 is needed either way.

The contract of ``parse_request_head`` and ``parse_response_head``, called with the bytes
received so far on a connection, from the start of the head:

* a complete, valid head gives a namedtuple whose ``length`` says how many bytes of ``data`` it
  took; ``data[length:]`` is the start of the body (or of the next message), untouched;
* a valid but incomplete beginning of a head gives ``None``: read more and call again with
  everything received so far. Every proper prefix of a valid head gives ``None``;
* anything else raises ``HttpError`` (a ``ValueError``) with ``.status`` the status to answer
  (400 malformed, 431 too large, 501 a Transfer-Encoding other than chunked, 505 an HTTP
  version other than 1.0 and 1.1) and a message naming the problem, with the byte and offset
  where one is to blame. The request line (status line) and each complete header line are
  checked as soon as they are in, so garbage (a TLS ClientHello, a binary protocol) is refused
  at its first bad byte; what needs the whole head (a missing Host, conflicting
  Content-Lengths) is checked by h11 when the head is complete. A response head at fault is
  the upstream's fault: a proxy answers its client 502 whatever ``.status`` says.

A head ends at its first empty line: CRLF CRLF, or a bare LF where CRLF belongs (h11 accepts
those, so this module does too). Empty lines before a request line are skipped, as RFC 9112
2.2 suggests (they count in ``length``). ``max_size`` (default ``MAX_HEAD``, 64 KiB) bounds the
head, leading empty lines included: more than ``max_size`` bytes without the head's end is an
error (431) as soon as they are in, so at most ``max_size`` bytes of ``data`` are copied.

What the results hold: header names lowercased, values as h11 gives them (no surrounding
whitespace, an obs-fold continuation joined with a space, a Content-Length list of one repeated
value reduced to it, Transfer-Encoding lowercased). Method and target are ``str`` (ASCII);
``version`` is ``"1.0"`` or ``"1.1"``.

Bodies (RFC 9112 section 6), as ``request_body`` and ``response_body`` say: ``Body.kind`` is

* ``"none"``: no body (``length`` 0). A Content-Length of 0 is "none" too: never hand the
  splice engine ``max=0``, which means *unlimited*;
* ``"length"``: ``length`` bytes (> 0): splice them with ``max=length``;
* ``"chunked"``: walk the chunks (below);
* ``"close"``: a response body that lasts until the upstream closes: splice without ``max``
  and close the client connection after it.

A chunked body, walked by a server (each step reads into a buffer; bytes past what a step took
belong to the next step):

1. ``c = parse_chunk_line(buf)``: None -> read more; forward ``encode_chunk_line(c.size)``
   (the extensions, ignored, are not passed on) and drop ``c.length`` bytes from ``buf``;
2. if ``c.size`` is 0 it was the last chunk: go to 5;
3. splice ``c.size`` bytes with ``max=c.size`` (first forwarding any of them already in
   ``buf``, splicing only the rest);
4. read exactly 2 bytes, ``check_chunk_end(two)`` (HttpError unless CRLF), forward
   ``CHUNK_END``; back to 1;
5. ``n = parse_trailers(buf)``: None -> read more; forward ``buf[:n]`` (just ``b"\\r\\n"`` when
   there are no trailer fields). The body is over.

CONNECT is not for a reverse proxy: ``response_body`` says "none" for a 2xx to CONNECT (the
connection becomes a tunnel), but a reverse proxy should answer a CONNECT request itself
(405 or 501) rather than forward it.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections import namedtuple

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any, NamedTuple

    class RequestHead(NamedTuple):
        method: str
        target: str
        version: str
        headers: tuple[tuple[bytes, bytes], ...]
        length: int

    class ResponseHead(NamedTuple):
        status: int
        reason: bytes
        version: str
        headers: tuple[tuple[bytes, bytes], ...]
        length: int

    class Body(NamedTuple):
        kind: str
        length: int | None

    class Chunk(NamedTuple):
        size: int
        length: int

else:
    RequestHead = namedtuple("RequestHead", ["method", "target", "version", "headers", "length"])
    ResponseHead = namedtuple("ResponseHead", ["status", "reason", "version", "headers", "length"])
    Body = namedtuple("Body", ["kind", "length"])
    Chunk = namedtuple("Chunk", ["size", "length"])

    RequestHead.__doc__ = """A request head, as ``parse_request_head`` read it.

``method``, ``target``: as sent (``str``). ``version``: ``"1.0"`` or ``"1.1"``. ``headers``:
``(name, value)`` byte pairs in order, names lowercased. ``length``: bytes of input the head
took, its empty line (and any empty lines before it) included.
"""
    ResponseHead.__doc__ = """A response head, as ``parse_response_head`` read it.

``status``: 100..599. ``reason``: the reason phrase bytes (may be empty). ``version``,
``headers``, ``length``: as in ``RequestHead``.
"""
    Body.__doc__ = """How a message's body is framed: ``kind`` "none" (``length`` 0), "length"
(``length`` > 0 bytes), "chunked" or "close" (``length`` None)."""
    Chunk.__doc__ = """A chunk-size line: ``size`` of the chunk's data (0: the last chunk) and
``length``, the bytes of input the line took (its CRLF included)."""

__all__ = [
    "CHUNK_END",
    "HOP_BY_HOP",
    "MAX_HEAD",
    "Body",
    "Chunk",
    "HttpError",
    "RequestHead",
    "ResponseHead",
    "check_chunk_end",
    "encode_chunk_line",
    "error_response",
    "expects_continue",
    "is_upgrade_response",
    "keeps_alive",
    "request_keeps_alive",
    "upstream_keeps_alive",
    "parse_chunk_line",
    "parse_request_head",
    "parse_response_head",
    "parse_trailers",
    "proxy_request_head",
    "proxy_response_head",
    "request_body",
    "response_body",
    "upgrade_to",
    "use_parser",
]

#: The default bound on a head, in bytes.
MAX_HEAD = 64 * 1024
#: The 2 bytes after each chunk's data.
CHUNK_END = b"\r\n"
#: Header fields that concern one connection only: a proxy does not forward them (nor any
#: field the Connection field names). Trailer is not one: see ``proxy_request_head``.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"upgrade",
        b"proxy-authorization",
        b"proxy-authenticate",
    }
)
# Never dropped, even when Connection names them: they frame the body we pass on unchanged,
# or the upstream needs them.
_PROTECTED = frozenset({b"content-length", b"transfer-encoding", b"host"})
_FORWARDING = frozenset({b"x-forwarded-proto"})

REASONS = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
    505: "HTTP Version Not Supported",
}

_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_HEAD_END = re.compile(rb"\n\r?\n")
# A header line as h11 reads it: a field-vchar is any byte but NUL and whitespace (h11 keeps
# the other control bytes, as RFC 9110 5.5 allows), and an obs-fold line.
_VCHAR = rb"[^\x00\t\n\x0b\x0c\r ]"
_FIELD_LINE = re.compile(
    rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[ \t]*(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*"
)
_FIELD_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
# A request line and a status line that pass every check of _check_first_line, in one regex:
# a line that matches needs no byte-by-byte look (the others get one, for the message).
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([1-5][0-9][0-9])(?: ([^\x00\n\x0b\x0c\r]*))?")
# Header lines the fast path takes: each "name: value" CRLF, one space after the colon, the
# value as h11 reads it (no NUL, CR, LF, VT, FF) with no space or tab at either end, so that
# the value is the rest of the line whichever parser reads it; then the empty line.
_PLAIN_FIELDS = re.compile(
    rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+: (?:" + _VCHAR + rb"[^\x00\n\x0b\x0c\r]*(?<=" + _VCHAR
    + rb"))?\r\n)*\r\n"
)
_FOLD_LINE = re.compile(rb"[ \t]+(?:" + _VCHAR + rb"+(?:[ \t]+" + _VCHAR + rb"+)*)?[ \t]*")
_HEX = frozenset(b"0123456789abcdefABCDEF")
_MAX_HEX_DIGITS = 16
# After a chunk size: chunk extensions (RFC 9112 7.1.1), then CRLF.
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_CHUNK_EXT = re.compile(
    rb"(?:[ \t]*;[ \t]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
    rb"(?:[ \t]*=[ \t]*(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+|" + _QUOTED + rb"))?)*[ \t]*"
)
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*")
_TARGET = re.compile(rb"[\x21-\x7e]*")
# Methods known to be tokens: most requests name one, and need no regex for it.
_COMMON_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"})
_SAFE_TEXT = re.compile(rb"[^\x00\r\n]*")


class HttpError(ValueError):
    """The bytes are not a valid HTTP/1.x message (head, chunk line, trailers); ``status`` is
    the status to answer with (400, 431, 501 or 505) and the message says what was wrong."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# -- the parsers: h11, and httptools when it is there -----------------------------------------

#: The environment variable that picks the parser of complete heads for the process: "auto"
#: (the default: httptools when it imports, else h11), "h11" or "httptools". ``use_parser``
#: changes the choice later.
PARSER_ENV = "SPLICEPOOL_HTTP1_PARSER"
_PARSERS = ("auto", "h11", "httptools")
_wanted = os.environ.get(PARSER_ENV) or "auto"
if _wanted not in _PARSERS:
    raise ValueError(f"{PARSER_ENV}={_wanted!r}: the HTTP/1.1 head parser is auto, h11 or httptools")
_UNDECIDED: Any = object()
_fast: Any = _UNDECIDED  # the httptools module while the fast path is on, else None


def use_parser(name: str = "auto") -> str:
    """Pick the parser of complete heads: "httptools" (ImportError when it is not installed),
    "h11", or "auto" (httptools when it imports, else h11); returns the one now in use. The
    results and the errors are the same with either (see the module's docstring): this
    choice is for speed, and for tests and benchmarks."""
    global _wanted, _fast
    if name not in _PARSERS:
        raise ValueError(f"parser {name!r} is not one of auto, h11, httptools")
    fast = None
    if name != "h11":
        try:
            import httptools
        except ImportError as exc:
            if name == "httptools":
                raise ImportError(
                    "splicepool.http1 was asked to parse heads with httptools, which is not "
                    "installed: pip install httptools"
                ) from exc
        else:
            fast = httptools
    _wanted, _fast = name, fast
    return "h11" if fast is None else "httptools"


def _httptools() -> Any:
    """The httptools module while the fast path is on, else None; the first call makes the
    choice that ``PARSER_ENV`` asks for (httptools is imported then, not with this module)."""
    if _fast is _UNDECIDED:
        use_parser(_wanted)
    return _fast


def _h11() -> Any:
    try:
        import h11
    except ImportError as exc:
        raise ImportError(
            "splicepool.http1 parses HTTP heads with h11, which is not installed: "
            "pip install 'splicepool[http]'"
        ) from exc
    return h11


class _Fields:
    """What httptools hands over while it reads a head: the field names and values, in order,
    and whether the head was whole."""

    __slots__ = ("names", "values", "complete")

    def __init__(self) -> None:
        self.names: list[bytes] = []
        self.values: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.names.append(name)
        self.values.append(value)

    def on_headers_complete(self) -> None:
        self.complete = True


def _fast_fields(
    buf: bytes, line: Any, end: int, request: bool
) -> tuple[tuple[tuple[bytes, bytes], ...], list[bytes]] | None:
    """The fields of the whole head ``buf[line.start():end]``, whose first line matched
    ``line``, as h11 would give them (``(headers, lowercased names)``), read by httptools;
    None when httptools is off or the head is not plain enough to be sure of that: h11 then
    reads it, and says what is wrong with it if anything is."""
    ht = _httptools()
    if ht is None:
        return None
    _h11()  # h11 judges every head the fast path leaves: no head is parsed without it
    begin = line.end() + 2
    # httptools is more lenient than h11 in places (obs-fold, bare LF, Content-Length and
    # Transfer-Encoding both, lenient modes): only plain lines go its way.
    if buf[line.end() : begin] != b"\r\n" or not _PLAIN_FIELDS.fullmatch(buf, begin, end):
        return None
    got = _Fields()
    parser = (ht.HttpRequestParser if request else ht.HttpResponseParser)(got)
    try:
        parser.feed_data(memoryview(buf)[line.start() : end])
    except (ht.HttpParserUpgrade, ht.HttpParserError):
        # A method llhttp does not know, a value byte it refuses: h11 decides. Raised once the
        # head is whole (an upgrade, CONNECT, a 101), it is about what would follow: the
        # fields are all in, and are checked below as any.
        if not got.complete:
            return None
    names, values = got.names, got.values
    # The pairs are the lines': as many, and as long (each line is "name: value" CRLF).
    if (
        not got.complete
        or len(names) != buf.count(b"\n", begin, end) - 1
        or sum(map(len, names)) + sum(map(len, values)) != end - begin - 2 - 4 * len(names)
    ):
        return None
    lowered = [name.lower() for name in names]
    if b"content-length" in lowered or b"transfer-encoding" in lowered:
        # h11 reduces a Content-Length list to its value and lowercases Transfer-Encoding,
        # and refuses their odd forms: only one field, of the plain form, stays on this path.
        if lowered.count(b"content-length") + lowered.count(b"transfer-encoding") != 1:
            return None
        if b"content-length" in lowered:
            value = values[lowered.index(b"content-length")]
            if not value.isdigit() or len(value) > 20:
                return None
        else:
            at = lowered.index(b"transfer-encoding")
            if values[at].lower() != b"chunked":
                return None
            values[at] = b"chunked"
    return tuple(zip(lowered, values, strict=True)), lowered


def _show(value: bytes) -> str:
    """Bytes for an error message: short, and printable whatever they are."""
    return repr(bytes(value[:48]) + (b"..." if len(value) > 48 else b""))


def _check_max(name: str, value: int, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{name} must be at least {least}, not {value}")


# -- heads ----------------------------------------------------------------------------------


def parse_request_head(
    data: bytes | bytearray | memoryview, *, max_size: int = MAX_HEAD
) -> RequestHead | None:
    """The request head at the start of ``data``; None while incomplete; HttpError as soon as
    the bytes cannot begin a valid head or are over ``max_size`` bytes without its end."""
    found = _find_head(data, max_size, None)
    if found is None:
        return None
    start, end, buf, line = found
    fields = None if line is None else _fast_fields(buf, line, end, True)
    if fields is not None:
        headers, names = fields
        hosts = names.count(b"host")  # h11: one, or none in HTTP/1.0
        method, target, version = line.groups()
        if hosts == 1 or (hosts == 0 and version == b"1.0"):
            return RequestHead(
                method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), headers, end
            )
    event = _parsed(found, None)
    return RequestHead(
        event.method.decode("ascii"),
        event.target.decode("ascii"),
        event.http_version.decode("ascii"),
        tuple((name, value) for name, value in event.headers),
        end,
    )


def parse_response_head(
    data: bytes | bytearray | memoryview, *, request_method: str, max_size: int = MAX_HEAD
) -> ResponseHead | None:
    """The response head at the start of ``data`` answering a ``request_method`` request
    (an interim 1xx head too: parse again after it for the next); None while incomplete;
    HttpError as for ``parse_request_head``."""
    if not isinstance(request_method, str) or (
        request_method not in _COMMON_METHODS
        and (not request_method.isascii() or not _TOKEN.fullmatch(request_method.encode("ascii")))
    ):
        raise ValueError(f"request_method must be a method name (a token), not {request_method!r}")
    found = _find_head(data, max_size, request_method)
    if found is None:
        return None
    start, end, buf, line = found
    fields = None if line is None else _fast_fields(buf, line, end, False)
    if fields is not None:
        version, status, reason = line.groups()
        return ResponseHead(int(status), reason or b"", version.decode("ascii"), fields[0], end)
    event = _parsed(found, request_method)
    return ResponseHead(
        event.status_code,
        bytes(event.reason),
        event.http_version.decode("ascii"),
        tuple((name, value) for name, value in event.headers),
        end,
    )


def _find_head(
    data: bytes | bytearray | memoryview, max_size: int, request_method: str | None
) -> tuple[int, int, bytes, Any] | None:
    """(start, end, buf, line): the head is ``buf[start:end]``, ``line`` the match of its
    first line by _REQUEST_LINE or _STATUS_LINE (None when only the byte-by-byte check
    passed it); None while incomplete."""
    _check_max("max_size", max_size, 16)
    what = "request" if request_method is None else "response"
    buf = bytes(memoryview(data).cast("B")[:max_size])
    start = 0
    if request_method is None:  # RFC 9112 2.2: ignore empty lines before a request line
        while True:
            if buf.startswith(b"\r\n", start):
                start += 2
            elif buf.startswith(b"\n", start):
                start += 1
            else:
                break
    match = _HEAD_END.search(buf, start)
    if match is not None:
        # Whole: its first line is checked here (h11 reads versions 1.x and others that are
        # not 1.0 or 1.1), the rest by h11, and only a head h11 refuses gets every line
        # checked, for the fault's exact place (_parsed): each head is checked once.
        lf = buf.find(b"\n", start)
        stop = lf - 1 if lf > start and buf[lf - 1] == 0x0D else lf
        pattern = _REQUEST_LINE if request_method is None else _STATUS_LINE
        line = pattern.fullmatch(buf, start, stop)
        if line is None:
            _check_first_line(buf[start:stop], start, request_method, True)
        return start, match.end(), buf, line
    # Check each complete line as soon as it is in (the last, unfinished one as far as it goes).
    _check_lines(buf, start, len(buf), request_method, complete=False)
    if len(buf) >= max_size:
        raise HttpError(
            431,
            f"{what} head is over {max_size} bytes (max_size) and has not ended "
            "(no empty line yet)",
        )
    return None


def _check_lines(
    buf: bytes, start: int, end: int, request_method: str | None, *, complete: bool
) -> None:
    pos = start
    first = True
    while pos < end:
        lf = buf.find(b"\n", pos, end)
        whole = lf != -1
        stop = lf if whole else end
        line = buf[pos:stop]
        if line.endswith(b"\r"):
            line = line[:-1]  # the line's CR (when it is not complete: its LF may be next)
        if b"\r" in line:
            bad = pos + line.index(b"\r")
            raise HttpError(400, f"bare CR at offset {bad}: a line must end with CRLF")
        if not line and whole:
            return  # the empty line: the head's end
        if first:
            _check_first_line(line, pos, request_method, whole)
            first = False
        elif whole:
            if line[:1] in (b" ", b"\t"):
                ok = _FOLD_LINE.fullmatch(line)
            else:
                ok = _FIELD_LINE.fullmatch(line)
            if not ok:
                raise HttpError(400, _bad_header(line, pos))
        else:
            # An unfinished header line: its name so far must be a token.
            name = line.split(b":", 1)[0] if line[:1] not in (b" ", b"\t") else b""
            if not _FIELD_NAME.fullmatch(name):
                bad = pos + _FIELD_NAME.match(name).end()
                raise HttpError(
                    400,
                    f"header line at offset {pos}: byte {_show(buf[bad : bad + 1])} at offset "
                    f"{bad} cannot be in a header name (a token)",
                )
        if not whole:
            return
        pos = lf + 1


def _bad_header(line: bytes, pos: int) -> str:
    name, colon, _ = line.partition(b":")
    if line[:1] in (b" ", b"\t"):
        return f"header continuation line at offset {pos} is invalid: {_show(line)}"
    if not colon:
        return f"header line at offset {pos} has no colon: {_show(line)}"
    if not name:
        return f"header line at offset {pos} has an empty name: {_show(line)}"
    bad = _FIELD_NAME.match(name).end()
    if bad < len(name):
        return (
            f"header line at offset {pos}: byte {_show(name[bad : bad + 1])} at offset "
            f"{pos + bad} cannot be in a header name (a token): {_show(line)}"
        )
    return f"header line at offset {pos} has a bad byte in its value: {_show(line)}"


def _check_first_line(line: bytes, pos: int, request_method: str | None, whole: bool) -> None:
    """The request line (``token SP target SP HTTP/d.d``) or status line (``HTTP/d.d SP ddd
    [SP reason]``), or as much of it as is in; HttpError at its first bad byte."""
    if request_method is None:
        what = "request line"
        sp1 = line.find(b" ")
        method = line if sp1 == -1 else line[:sp1]
        for i, byte in enumerate(method):
            if byte not in _TCHAR:
                raise HttpError(
                    400,
                    f"{what}: byte {_show(bytes([byte]))} at offset {pos + i} cannot be in a "
                    f"method (a token): {_show(line)}",
                )
        if sp1 == -1:
            if whole:
                raise HttpError(400, f"{what} has no target and version: {_show(line)}")
            return
        if sp1 == 0:
            raise HttpError(400, f"{what} begins with a space: {_show(line)}")
        sp2 = line.find(b" ", sp1 + 1)
        target = line[sp1 + 1 :] if sp2 == -1 else line[sp1 + 1 : sp2]
        for i, byte in enumerate(target):
            if not 0x21 <= byte <= 0x7E:
                raise HttpError(
                    400,
                    f"{what}: byte {_show(bytes([byte]))} at offset {pos + sp1 + 1 + i} cannot "
                    f"be in a request target: {_show(line)}",
                )
        if sp2 == -1:
            if whole:
                raise HttpError(400, f"{what} has no HTTP version: {_show(line)}")
            return
        if sp2 == sp1 + 1:
            raise HttpError(400, f"{what} has an empty target (two spaces): {_show(line)}")
        _check_version(line[sp2 + 1 :], pos + sp2 + 1, what, line, whole, last=True)
        return
    what = "status line"
    _check_version(line[:8], pos, what, line, whole or len(line) > 8, last=False)
    rest = line[8:]
    if not rest:
        if whole:
            raise HttpError(400, f"{what} has no status code: {_show(line)}")
        return
    if rest[:1] != b" ":
        raise HttpError(
            400, f"{what}: byte {_show(rest[:1])} at offset {pos + 8} should be a space"
        )
    code = rest[1:4]
    for i, byte in enumerate(code):
        if not 0x30 <= byte <= 0x39:
            raise HttpError(
                400,
                f"{what}: byte {_show(bytes([byte]))} at offset {pos + 9 + i} is not a digit "
                f"of the 3-digit status code: {_show(line)}",
            )
    if len(code) < 3:
        if whole:
            raise HttpError(400, f"{what} has a status code of fewer than 3 digits: {_show(line)}")
        return
    if not 100 <= int(code) <= 599:
        raise HttpError(400, f"{what} has status code {int(code)}, not in 100..599")
    reason = rest[4:]
    if reason and reason[:1] != b" ":
        raise HttpError(
            400, f"{what}: byte {_show(reason[:1])} at offset {pos + 12} should be a space"
        )
    for i, byte in enumerate(reason[1:]):
        if byte in (0x00, 0x0B, 0x0C):  # as h11: any byte but NUL, CR, LF, VT and FF
            raise HttpError(
                400,
                f"{what}: byte {_show(bytes([byte]))} at offset {pos + 13 + i} cannot be in "
                f"a reason phrase: {_show(line)}",
            )


def _check_version(
    text: bytes, pos: int, what: str, line: bytes, whole: bool, *, last: bool
) -> None:
    """``HTTP/d.d`` (or a beginning of it when not ``whole``); 505 for a version other than
    1.0 and 1.1. ``last``: nothing may follow it on the line."""
    pattern = b"HTTP/0.0"
    for i, byte in enumerate(text[:8]):
        want = pattern[i]
        ok = 0x30 <= byte <= 0x39 if want == 0x30 and i != 6 else byte == want
        if not ok:
            raise HttpError(
                400,
                f"{what}: byte {_show(bytes([byte]))} at offset {pos + i} does not fit the "
                f"HTTP version (HTTP/<digit>.<digit>): {_show(line)}",
            )
    if len(text) < 8:
        if whole:
            raise HttpError(400, f"{what} has a truncated HTTP version: {_show(line)}")
        return
    if last and len(text) > 8:
        raise HttpError(
            400,
            f"{what}: byte {_show(text[8:9])} at offset {pos + 8} follows the HTTP version: "
            f"{_show(line)}",
        )
    version = text[5:8]
    if version not in (b"1.0", b"1.1"):
        raise HttpError(
            505, f"HTTP version {version.decode()} is not supported (only 1.0 and 1.1)"
        )


def _parsed(found: tuple[int, int, bytes, Any], request_method: str | None) -> Any:
    """The h11 event of the whole head ``found`` (``_find_head``); HttpError naming the
    first bad line and byte when there is one, else h11's own reason."""
    start, end, buf, _ = found
    try:
        return _h11_event(buf[start:end], request_method, start)
    except HttpError:
        _check_lines(buf, start, end, request_method, complete=True)
        raise


@functools.lru_cache(maxsize=64)  # methods are the peers' to choose: a bounded cache
def _asked(request_method: str) -> Any:
    """The h11 request a response head to ``request_method`` is parsed after. It proposes
    an upgrade, so that h11 takes a 101 (whether there was one is the caller's to know: see
    is_upgrade_response). Made once per method: an h11 event is immutable, and making one
    validates its fields every time."""
    return _h11().Request(
        method=request_method,
        target="/",
        headers=[("Host", "upstream"), ("Connection", "upgrade"), ("Upgrade", "any")],
    )


def _h11_event(head: bytes, request_method: str | None, start: int) -> Any:
    """The h11 event for a complete head (``buf[start:end]``), HttpError if h11 refuses it."""
    h11 = _h11()
    try:
        if request_method is None:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=len(head) + 1)
        else:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=len(head) + 1)
            conn.send(_asked(request_method))
        conn.receive_data(head)
        event = conn.next_event()
    except h11.ProtocolError as exc:
        what = "request" if request_method is None else "response"
        raise HttpError(exc.error_status_hint, f"bad {what} head: {exc}") from None
    if request_method is None and not isinstance(event, h11.Request):
        raise HttpError(400, f"bad request head: h11 read {type(event).__name__}")  # not expected
    if request_method is not None and not isinstance(
        event, (h11.Response, h11.InformationalResponse)
    ):
        raise HttpError(400, f"bad response head: h11 read {type(event).__name__}")
    return event


# -- fields ---------------------------------------------------------------------------------


def _values(head: RequestHead | ResponseHead, name: bytes) -> list[bytes]:
    return [value for key, value in head.headers if key == name]


def _tokens(head: RequestHead | ResponseHead, name: bytes) -> list[bytes]:
    """The comma-separated elements of every ``name`` field, stripped and lowercased."""
    return _split_tokens(_values(head, name))


def _split_tokens(values: list[bytes]) -> list[bytes]:
    out = []
    for value in values:
        for item in value.split(b","):
            item = item.strip(b" \t").lower()
            if item:
                out.append(item)
    return out


# -- bodies ---------------------------------------------------------------------------------


def _framing(head: RequestHead | ResponseHead, what: str) -> Body | None:
    """Body from Transfer-Encoding / Content-Length; None when neither is present."""
    encodings: list[bytes] = []
    lengths: list[bytes] = []
    for name, value in head.headers:  # one pass for both (this runs for every message)
        if name == b"transfer-encoding":
            encodings.append(value)
        elif name == b"content-length":
            lengths.append(value)
    has_te = bool(encodings)
    if has_te and lengths:
        raise HttpError(
            400,
            f"{what} has both Transfer-Encoding and Content-Length: refused, as a message "
            "that could be read two ways (request smuggling, RFC 9112 6.3)",
        )
    if has_te:
        if head.version == "1.0":
            raise HttpError(
                400,
                f"HTTP/1.0 {what} has a Transfer-Encoding: its framing is faulty (RFC 9112 6.1)",
            )
        codings = _split_tokens(encodings)
        if codings != [b"chunked"]:
            if what == "response" and codings and codings[-1] != b"chunked":
                return Body("close", None)  # RFC 9112 6.3: read until the server closes
            shown = b", ".join(encodings)
            raise HttpError(
                501, f"Transfer-Encoding {_show(shown)} is not supported (only chunked)"
            )
        return Body("chunked", None)
    if lengths:
        found = set()
        for value in lengths:
            for item in value.split(b","):
                found.add(item.strip(b" \t"))
        if len(found) != 1:
            raise HttpError(400, f"{what} has conflicting Content-Length values {sorted(found)}")
        (value,) = found
        if not value.isdigit() or len(value) > 19:
            raise HttpError(400, f"{what} has a bad Content-Length {_show(value)}")
        length = int(value)
        return Body("length", length) if length else Body("none", 0)
    return None


def request_body(head: RequestHead) -> Body:
    """How the body of the request ``head`` is framed: "none", "length" or "chunked"; HttpError
    400 for both Transfer-Encoding and Content-Length, for a Transfer-Encoding in HTTP/1.0 or
    a bad Content-Length, 501 for a Transfer-Encoding other than chunked."""
    body = _framing(head, "request")
    return Body("none", 0) if body is None else body


def response_body(head: ResponseHead, request_method: str) -> Body:
    """How the body of the response ``head`` to a ``request_method`` request is framed
    (RFC 9112 6.3): "none" for HEAD, 1xx, 204, 304 and a 2xx to CONNECT (a tunnel follows:
    not for a reverse proxy); else "chunked", "length", or "close" (until the upstream
    closes). HttpError as for ``request_body`` (a response with a Transfer-Encoding whose last
    coding is not chunked is "close", as the RFC says)."""
    status = head.status
    if (
        request_method == "HEAD"
        or 100 <= status < 200
        or status in (204, 304)
        or (request_method == "CONNECT" and 200 <= status < 300)
    ):
        return Body("none", 0)
    body = _framing(head, "response")
    return Body("close", None) if body is None else body


def keeps_alive(request_head: RequestHead, response_head: ResponseHead) -> bool:
    """Whether the connection can carry another request after this exchange (RFC 9112 9.3):
    not when either side's Connection has "close", not when either side is HTTP/1.0 without
    "keep-alive", not when the response's body is close-delimited, and not after a 101 or a
    2xx to CONNECT (the connection is no longer HTTP). ``response_head`` is the final
    response (a 1xx other than 101 is interim)."""
    return request_keeps_alive(request_head) and upstream_keeps_alive(response_head, request_head.method)


def request_keeps_alive(request_head: RequestHead) -> bool:
    """The request's side of ``keeps_alive``: no Connection: close, and HTTP/1.1 or
    Connection: keep-alive (so ``keeps_alive(q, r)`` is ``request_keeps_alive(q) and
    upstream_keeps_alive(r, q.method)``)."""
    return _persists(request_head)


def upstream_keeps_alive(response_head: ResponseHead, request_method: str, *,
                         body: Body | None = None) -> bool:
    """Whether the upstream connection can carry another request after ``response_head``
    (the final response to a ``request_method`` request sent as ``proxy_request_head`` sends
    it: HTTP/1.1 without Connection: close): ``keeps_alive`` with the response's side only.
    ``body``: ``response_body(response_head, request_method)`` when the caller has it already
    (it is not worked out again)."""
    if not _persists(response_head) or response_head.status == 101:
        return False
    if request_method == "CONNECT" and 200 <= response_head.status < 300:
        return False
    if body is None:
        body = response_body(response_head, request_method)
    return body.kind != "close"


def _persists(head: RequestHead | ResponseHead) -> bool:
    """This side lets the connection persist: no Connection: close, and HTTP/1.1 or
    Connection: keep-alive."""
    tokens = _tokens(head, b"connection")
    return b"close" not in tokens and (head.version != "1.0" or b"keep-alive" in tokens)


def expects_continue(request_head: RequestHead) -> bool:
    """An HTTP/1.1 request with ``Expect: 100-continue`` (case-insensitive): the client may wait
    for a 100 (Continue) before it sends its body."""
    return request_head.version == "1.1" and b"100-continue" in _tokens(request_head, b"expect")


def upgrade_to(request_head: RequestHead) -> bytes | None:
    """The Upgrade field's value (b"websocket", or a list as sent) when an HTTP/1.1 request
    asks to upgrade (Connection has "upgrade"); None otherwise (RFC 9110 7.8: an HTTP/1.0
    request's Upgrade is ignored)."""
    if request_head.version != "1.1" or b"upgrade" not in _tokens(request_head, b"connection"):
        return None
    values = [v for v in _values(request_head, b"upgrade") if v.strip()]  # an empty one names nothing
    return b", ".join(values) if values else None


def is_upgrade_response(response_head: ResponseHead) -> bool:
    """The response is 101 (Switching Protocols): after its head the connection is a tunnel."""
    return response_head.status == 101


# -- chunks ---------------------------------------------------------------------------------


def parse_chunk_line(data: bytes | bytearray | memoryview, *, max_line: int = 4096) -> Chunk | None:
    """The chunk-size line at the start of ``data`` (RFC 9112 7.1): hex digits (at most 16),
    chunk extensions (checked, then ignored), CRLF. None while incomplete; HttpError (400) as
    soon as the bytes cannot begin one, or over ``max_line`` bytes."""
    _check_max("max_line", max_line, 3)
    buf = bytes(memoryview(data).cast("B")[:max_line])
    digits = 0
    while digits < len(buf) and buf[digits] in _HEX:
        digits += 1
        if digits > _MAX_HEX_DIGITS:
            raise HttpError(
                400, f"chunk size has more than {_MAX_HEX_DIGITS} hex digits: {_show(buf)}"
            )
    if digits == len(buf):
        if len(buf) >= max_line:
            raise HttpError(400, f"chunk-size line is over {max_line} bytes (max_line)")
        return None
    if digits == 0:
        raise HttpError(
            400, f"chunk size: byte {_show(buf[:1])} at offset 0 is not a hex digit"
        )
    size = int(buf[:digits], 16)
    cr = buf.find(b"\r", digits)
    lf = buf.find(b"\n", digits)
    if lf != -1 and (cr == -1 or lf < cr):
        raise HttpError(400, f"chunk-size line has a bare LF at offset {lf}: it must end with CRLF")
    if cr == -1 or cr + 1 == len(buf):
        if len(buf) >= max_line:
            raise HttpError(400, f"chunk-size line is over {max_line} bytes (max_line)")
        _check_chunk_ext(buf, digits, len(buf) if cr == -1 else cr, complete=False)
        return None
    if buf[cr + 1] != 0x0A:
        raise HttpError(400, f"chunk-size line has a bare CR at offset {cr}: it must end with CRLF")
    _check_chunk_ext(buf, digits, cr, complete=True)
    return Chunk(size, cr + 2)


def _check_chunk_ext(buf: bytes, start: int, stop: int, *, complete: bool) -> None:
    ext = buf[start:stop]
    # The first byte after the digits must begin extensions or the end.
    if ext[:1] not in (b"", b";", b" ", b"\t"):
        raise HttpError(
            400,
            f"chunk size: byte {_show(ext[:1])} at offset {start} is not a hex digit, "
            "';' or CRLF",
        )
    if complete:
        if not _CHUNK_EXT.fullmatch(ext):
            raise HttpError(
                400, f"chunk-size line has bad chunk extensions {_show(ext)} at offset {start}"
            )
        return
    for i, byte in enumerate(ext):
        if byte < 0x20 and byte != 0x09 or byte == 0x7F:
            raise HttpError(
                400, f"chunk extensions: byte {_show(bytes([byte]))} at offset {start + i}"
            )


def encode_chunk_line(size: int) -> bytes:
    """The chunk-size line to forward for a chunk of ``size`` bytes (no extensions)."""
    if isinstance(size, bool) or not isinstance(size, int):
        raise TypeError(f"size must be an int, not {type(size).__name__}")
    if not 0 <= size < 16**_MAX_HEX_DIGITS:
        raise ValueError(f"chunk size {size} is out of range")
    return b"%x\r\n" % size


def check_chunk_end(two_bytes: bytes | bytearray | memoryview) -> None:
    """HttpError (400) unless ``two_bytes`` is the CRLF that ends a chunk's data."""
    got = bytes(two_bytes)
    if got != CHUNK_END:
        raise HttpError(400, f"chunk data is not followed by CRLF but by {_show(got)}")


def parse_trailers(data: bytes | bytearray | memoryview, *, max_size: int = MAX_HEAD) -> int | None:
    """After the last chunk's line: the bytes of the trailer section (its field lines and the
    final CRLF: 2 when it has none); None while incomplete; HttpError (400) at a bad line or
    over ``max_size`` bytes (431)."""
    _check_max("max_size", max_size, 2)
    buf = bytes(memoryview(data).cast("B")[:max_size])
    pos = 0
    while True:
        lf = buf.find(b"\n", pos)
        if lf == -1:
            line = buf[pos:]
            if b"\r" in line[:-1]:
                bad = pos + line.index(b"\r")
                raise HttpError(400, f"trailer section has a bare CR at offset {bad}")
            name = line.rstrip(b"\r").split(b":", 1)[0]
            if not _FIELD_NAME.fullmatch(name):
                bad = pos + _FIELD_NAME.match(name).end()
                raise HttpError(
                    400,
                    f"trailer line at offset {pos}: byte {_show(buf[bad : bad + 1])} at offset "
                    f"{bad} cannot be in a field name (a token)",
                )
            if len(buf) >= max_size:
                raise HttpError(431, f"trailer section is over {max_size} bytes (max_size)")
            return None
        if lf == pos or buf[lf - 1] != 0x0D:
            raise HttpError(400, f"trailer section has a bare LF at offset {lf}")
        line = buf[pos : lf - 1]
        if not line:
            return lf + 1
        if b"\r" in line:
            raise HttpError(400, f"trailer line at offset {pos} has a bare CR")
        if not _FIELD_LINE.fullmatch(line):
            raise HttpError(400, "trailer " + _bad_header(line, pos))
        pos = lf + 1


# -- rewriting ------------------------------------------------------------------------------


def _forwarded_node(client_ip: str) -> tuple[str, str]:
    """(X-Forwarded-For text, Forwarded for= value) for the client address (remembered for
    the last 1024 addresses: a client's every request asks again)."""
    got = _NODES.get(client_ip)
    if got is not None:
        return got
    got = _node(client_ip)
    if len(_NODES) >= 1024:
        _NODES.clear()
    _NODES[client_ip] = got
    return got


_NODES: dict[str, tuple[str, str]] = {}


def _node(client_ip: str) -> tuple[str, str]:
    try:
        ip = ipaddress.ip_address(client_ip)
    except (ValueError, TypeError):
        raise ValueError(f"client_ip {client_ip!r} is not an IPv4 or IPv6 address") from None
    if ip.version == 6:
        text = str(ipaddress.IPv6Address(ip.packed))  # no scope id
        return text, f'"[{text}]"'
    return str(ip), str(ip)


def _drop_set(head: RequestHead | ResponseHead) -> set[bytes]:
    return (set(HOP_BY_HOP) | set(_tokens(head, b"connection"))) - _PROTECTED


def _serialise(start_line: bytes, fields: list[tuple[bytes, bytes]]) -> bytes:
    names = [name for name, _ in fields]
    # Two passes of a regex in all: the names joined are a token only if each is (and none
    # is empty), the values joined hold no CR, LF or NUL only if none does; the field at
    # fault is looked for only when one fails.
    if fields and not (all(names) and _TOKEN.fullmatch(b"".join(names))
                       and _SAFE_TEXT.fullmatch(b"".join([value for _, value in fields]))):
        for name, value in fields:
            if not _TOKEN.fullmatch(name) or not _SAFE_TEXT.fullmatch(value):
                raise ValueError(f"header {name!r}: {value!r} cannot be sent (not a token, or CR/LF/NUL)")
    return b"".join([start_line, *[name + b": " + value + b"\r\n" for name, value in fields], b"\r\n"])


def proxy_request_head(
    head: RequestHead,
    *,
    client_ip: str,
    proto: str = "http",
    host_default: str | None = None,
    keep_upgrade: bool = True,
) -> bytes:
    """The request head to send upstream, as HTTP/1.1: hop-by-hop fields dropped (``HOP_BY_HOP``
    and every field Connection names, but Content-Length, Transfer-Encoding and Host, which
    stay); ``Upgrade`` and ``Connection: upgrade`` kept for an upgrade request when
    ``keep_upgrade``; ``client_ip`` appended to X-Forwarded-For (or a new one) and, as
    ``for=...;proto=...``, to Forwarded (RFC 7239; an IPv6 address quoted and bracketed);
    X-Forwarded-Proto replaced by ``proto``. Order kept otherwise; names are sent lowercased.
    An HTTP/1.0 request without Host gets ``Host: host_default`` (HttpError 400 when None).

    Trailer stays: it describes the trailer fields of a chunked body, which pass unchanged.
    """
    if not _SCHEME.fullmatch(proto):
        raise ValueError(f"proto {proto!r} is not a URI scheme")
    xff, node = _forwarded_node(client_ip)
    upgrade = keep_upgrade and upgrade_to(head) is not None
    drop = _drop_set(head) | _FORWARDING
    if upgrade:
        drop.discard(b"upgrade")
    fields = []
    xff_at = forwarded_at = None
    for name, value in head.headers:
        if name in drop:
            continue
        if name == b"x-forwarded-for":
            xff_at = len(fields)
        elif name == b"forwarded":
            forwarded_at = len(fields)
        fields.append((name, value))
    if not _values(head, b"host"):
        if host_default is None:
            raise HttpError(400, "request has no Host field (and no host_default was given)")
        fields.insert(0, (b"host", host_default.encode("idna" if not host_default.isascii() else "ascii")))
        xff_at = None if xff_at is None else xff_at + 1
        forwarded_at = None if forwarded_at is None else forwarded_at + 1
    if upgrade:
        fields.append((b"connection", b"upgrade"))
    element = f"for={node};proto={proto}".encode("ascii")
    if xff_at is None:
        fields.append((b"x-forwarded-for", xff.encode("ascii")))
    else:
        name, value = fields[xff_at]
        fields[xff_at] = (name, value + b", " + xff.encode("ascii") if value else xff.encode())
    if forwarded_at is None:
        fields.append((b"forwarded", element))
    else:
        name, value = fields[forwarded_at]
        fields[forwarded_at] = (name, value + b", " + element if value else element)
    fields.append((b"x-forwarded-proto", proto.encode("ascii")))
    line = f"{head.method} {head.target} HTTP/1.1\r\n".encode("ascii")
    if (
        head.method not in _COMMON_METHODS and not _TOKEN.fullmatch(head.method.encode("ascii"))
    ) or not _TARGET.fullmatch(head.target.encode("ascii")):
        raise ValueError(f"request line {line!r} cannot be sent")
    return _serialise(line, fields)


def proxy_response_head(
    head: ResponseHead, *, keep_alive: bool, request_version: str = "1.1"
) -> bytes:
    """The response head to send the client, as HTTP/1.1: hop-by-hop fields dropped as by
    ``proxy_request_head`` (Content-Length and Transfer-Encoding stay); a 101 keeps Upgrade
    and gets ``Connection: upgrade``; ``Connection: close`` added when not ``keep_alive``
    (``Connection: keep-alive`` when ``keep_alive`` and the client spoke HTTP/1.0:
    ``request_version``).

    An HTTP/1.0 client cannot read chunked: for it a chunked response loses its
    Transfer-Encoding and gets ``Connection: close``; the server then forwards only each chunk's
    data (no chunk lines, no CRLFs, no trailers) and closes the connection after the body.
    """
    drop = _drop_set(head)
    upgrade = head.status == 101
    if upgrade:
        drop.discard(b"upgrade")
    dechunk = request_version == "1.0" and b"chunked" in _tokens(head, b"transfer-encoding")
    if dechunk:
        drop.add(b"transfer-encoding")
        keep_alive = False
    fields = [(name, value) for name, value in head.headers if name not in drop]
    if upgrade:
        fields.append((b"connection", b"upgrade"))
    elif not keep_alive:
        fields.append((b"connection", b"close"))
    elif request_version == "1.0":
        fields.append((b"connection", b"keep-alive"))
    if not _SAFE_TEXT.fullmatch(head.reason):
        raise ValueError(f"reason {head.reason!r} cannot be sent")
    line = b"HTTP/1.1 %03d %s\r\n" % (head.status, head.reason)
    return _serialise(line, fields)


def error_response(status: int, *, reason: str | None = None, close: bool = True) -> bytes:
    """A complete small response: ``status``, its reason (``REASONS`` unless given), a
    one-line text/plain body saying both, Content-Length, and ``Connection: close`` when
    ``close``."""
    if isinstance(status, bool) or not isinstance(status, int):
        raise TypeError(f"status must be an int, not {type(status).__name__}")
    if not 200 <= status <= 599:
        raise ValueError(f"status {status} is not a final status 200..599")
    if reason is None:
        reason = REASONS.get(status)
        if reason is None:
            raise ValueError(f"status {status} has no default reason: give reason=")
    if not reason.isascii() or not reason.isprintable():
        raise ValueError(f"reason {reason!r} must be printable ASCII")
    body = f"{status} {reason}\n".encode("ascii")
    lines = [
        f"HTTP/1.1 {status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
    ]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body
