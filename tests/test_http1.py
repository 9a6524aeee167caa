"""splicepool.http1: HTTP/1.1 heads for a splicing reverse proxy. Exact results and exact errors
(status and message) for hand-built heads; every proper prefix of a valid head is incomplete,
never an error; body framing for each method and status; chunk lines and trailers; round trips
and fuzzing with hypothesis; the heads curl really sends (captured by a scripted loopback server
that reads them with this module) and the heads nginx really answers with."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from conftest import engine_free, free_port
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("h11", reason="pip install h11 (or 'splicepool[http]')")

from splicepool import http1  # noqa: E402
from splicepool.http1 import (  # noqa: E402
    CHUNK_END,
    MAX_HEAD,
    Body,
    Chunk,
    HttpError,
    RequestHead,
    ResponseHead,
    check_chunk_end,
    encode_chunk_line,
    error_response,
    expects_continue,
    is_upgrade_response,
    keeps_alive,
    parse_chunk_line,
    parse_request_head,
    parse_response_head,
    parse_trailers,
    proxy_request_head,
    proxy_response_head,
    request_body,
    response_body,
    upgrade_to,
    upstream_keeps_alive,
)

pytestmark = engine_free

HAVE_HTTPTOOLS = importlib.util.find_spec("httptools") is not None


@pytest.fixture(scope="module", autouse=True, params=["h11", "httptools"])
def parser(request):
    """Every test runs twice: complete heads parsed by h11 alone, then by httptools (the
    fast path, h11 judging what it leaves). Module-scoped: hypothesis refuses function-scoped
    fixtures."""
    if request.param == "httptools" and not HAVE_HTTPTOOLS:
        pytest.skip("httptools is not installed: pip install httptools")
    assert http1.use_parser(request.param) == request.param
    yield request.param
    http1.use_parser("auto")

GET = b"GET /a/b?c=d HTTP/1.1\r\nHost: example.test\r\nUser-Agent: t/1\r\nAccept: */*\r\n\r\n"


def req(text: bytes) -> RequestHead:
    head = parse_request_head(text)
    assert head is not None
    return head


def resp(text: bytes, method: str = "GET") -> ResponseHead:
    head = parse_response_head(text, request_method=method)
    assert head is not None
    return head


def error(call, *args, **kwargs) -> HttpError:
    with pytest.raises(HttpError) as info:
        call(*args, **kwargs)
    return info.value


# -- parsing --------------------------------------------------------------------------------


def test_request_head_exact():
    head = parse_request_head(GET + b"body")
    assert head == RequestHead(
        "GET",
        "/a/b?c=d",
        "1.1",
        ((b"host", b"example.test"), (b"user-agent", b"t/1"), (b"accept", b"*/*")),
        len(GET),
    )
    assert type(head).__name__ == "RequestHead" and head.length == len(GET)


def test_request_head_normalisation_as_h11_gives_it():
    text = (
        b"\r\nPOST * HTTP/1.0\r\nX-A:   spaced  out \t\r\nX-Fold: one\r\n  two\r\n"
        b"Content-Length: 5, 5\r\n\r\n"
    )
    assert req(text) == RequestHead(
        "POST",
        "*",
        "1.0",
        ((b"x-a", b"spaced  out"), (b"x-fold", b"one two"), (b"content-length", b"5")),
        len(text),
    )


def test_bare_lf_heads_are_accepted_as_h11_does():
    text = b"GET / HTTP/1.1\nHost: a\n\n"
    assert req(text + b"x").length == len(text)
    assert req(b"GET / HTTP/1.1\r\nHost: a\n\r\n").length == 26


def test_response_head_exact():
    text = b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nServer: s\r\n\r\n"
    assert parse_response_head(text + b"abc", request_method="GET") == ResponseHead(
        404, b"Not Found", "1.1", ((b"content-length", b"3"), (b"server", b"s")), len(text)
    )
    assert resp(b"HTTP/1.0 200\r\n\r\n") == ResponseHead(200, b"", "1.0", (), 16)
    assert resp(b"HTTP/1.1 100 Continue\r\n\r\n", "POST").status == 100
    assert resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n").status == 101
    assert resp(b"HTTP/1.1 200 OK\r\n\r\n", "CONNECT").status == 200


VALID_HEADS = [
    GET,
    b"\r\nGET / HTTP/1.0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nX: a\r\n b\r\n\r\n",
    b"GET / HTTP/1.1\nHost: a\n\n",
]


@pytest.mark.parametrize("text", VALID_HEADS)
def test_every_proper_prefix_of_a_request_head_is_incomplete(text):
    for i in range(len(text)):
        assert parse_request_head(text[:i]) is None, text[:i]
    assert parse_request_head(text).length == len(text)


@pytest.mark.parametrize(
    "text",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.0 204\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: /\r\nX: a\r\n\tb\r\n\r\n",
    ],
)
def test_every_proper_prefix_of_a_response_head_is_incomplete(text):
    for i in range(len(text)):
        assert parse_response_head(text[:i], request_method="GET") is None, text[:i]
    assert resp(text).length == len(text)


@pytest.mark.parametrize(
    "text, status, message",
    [
        (b"\x16\x03\x01\x02\x00", 400,
         "request line: byte b'\\x16' at offset 0 cannot be in a method (a token): "
         "b'\\x16\\x03\\x01\\x02\\x00'"),
        (b"GET  / HTTP/1.1\r\n", 400, "request line has an empty target (two spaces): b'GET  / HTTP/1.1'"),
        (b"GET /\r\n", 400, "request line has no HTTP version: b'GET /'"),
        (b"GET / HTTP/1.1 x", 400,
         "request line: byte b' ' at offset 14 follows the HTTP version: b'GET / HTTP/1.1 x'"),
        (b"GET / HTTQ", 400,
         "request line: byte b'Q' at offset 9 does not fit the HTTP version "
         "(HTTP/<digit>.<digit>): b'GET / HTTQ'"),
        (b"GET /\x7f HTTP/1.1", 400,
         "request line: byte b'\\x7f' at offset 5 cannot be in a request target: "
         "b'GET /\\x7f HTTP/1.1'"),
        (b"GET / HTTP/2.0", 505, "HTTP version 2.0 is not supported (only 1.0 and 1.1)"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505, "HTTP version 2.0 is not supported (only 1.0 and 1.1)"),
        (b"GET / HTTP/0.9\r\n\r\n", 505, "HTTP version 0.9 is not supported (only 1.0 and 1.1)"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX : y\r\n", 400,
         "header line at offset 25: byte b' ' at offset 26 cannot be in a header name (a token): "
         "b'X : y'"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n", 400,
         "header line at offset 25 has no colon: b'NoColon'"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n", 400,
         "header line at offset 25 has a bad byte in its value: b'X: a\\x00b'"),
        (b"GET / HTTP/1.1\r\nHo(st", 400,
         "header line at offset 16: byte b'(' at offset 18 cannot be in a header name (a token)"),
        (b"GET / HTTP/1.1\r\nHost: a\rb\r\n", 400, "bare CR at offset 23: a line must end with CRLF"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "bad request head: Missing mandatory Host: header"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400,
         "bad request head: Found multiple Host: headers"),
        (b"GET / HTTP/1.1\r\n  folded: x\r\nHost: a\r\n\r\n", 400,
         "bad request head: continuation line at start of headers"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: x\r\n\r\n", 400,
         "bad request head: bad Content-Length"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400,
         "bad request head: conflicting Content-Length headers"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501,
         "bad request head: Only Transfer-Encoding: chunked is supported"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501,
         "bad request head: Only Transfer-Encoding: chunked is supported"),
    ],
)
def test_request_head_errors(text, status, message):
    err = error(parse_request_head, text)
    assert (err.status, str(err)) == (status, message)
    assert isinstance(err, ValueError)


def test_head_too_large_is_431_complete_or_not():
    big = b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 100 + b"\r\n\r\n"
    assert req(big).length == len(big)
    assert parse_request_head(big, max_size=len(big)).length == len(big)
    err = error(parse_request_head, big, max_size=len(big) - 1)
    assert err.status == 431
    assert str(err) == (
        f"request head is over {len(big) - 1} bytes (max_size) and has not ended (no empty line yet)"
    )
    # Incomplete, but already over the bound: refused before the end arrives.
    err = error(parse_request_head, big[:60], max_size=50)
    assert err.status == 431
    assert parse_request_head(big[:49], max_size=50) is None
    err = error(parse_request_head, b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)
    assert err.status == 431
    err = error(parse_response_head, b"HTTP/1.1 200 OK\r\nX: " + b"a" * 100, request_method="GET",
                max_size=64)
    assert (err.status, str(err)) == (
        431, "response head is over 64 bytes (max_size) and has not ended (no empty line yet)"
    )


@pytest.mark.parametrize(
    "text, status, message",
    [
        (b"HTTP/2.0 200 OK\r\n\r\n", 505, "HTTP version 2.0 is not supported (only 1.0 and 1.1)"),
        (b"HTTP/1.1 20x", 400,
         "status line: byte b'x' at offset 11 is not a digit of the 3-digit status code: "
         "b'HTTP/1.1 20x'"),
        (b"HTTP/1.1 600 X\r\n", 400, "status line has status code 600, not in 100..599"),
        (b"HTTP/1.1 099 X\r\n", 400, "status line has status code 99, not in 100..599"),
        (b"HTTP/1.1 200OK\r\n", 400, "status line: byte b'O' at offset 12 should be a space"),
        (b"SSH-2.0-OpenSSH\r\n", 400,
         "status line: byte b'S' at offset 0 does not fit the HTTP version "
         "(HTTP/<digit>.<digit>): b'SSH-2.0-OpenSSH'"),
        (b"HTTP/1.1 200 OK\r\nA: b\r\nTransfer-Encoding: br\r\n\r\n", 501,
         "bad response head: Only Transfer-Encoding: chunked is supported"),
    ],
)
def test_response_head_errors(text, status, message):
    err = error(parse_response_head, text, request_method="GET")
    assert (err.status, str(err)) == (status, message)


def test_argument_errors_are_not_http_errors():
    with pytest.raises(ValueError, match="request_method must be a method name"):
        parse_response_head(b"", request_method="G T")
    with pytest.raises(ValueError, match="request_method must be a method name"):
        parse_response_head(b"", request_method="G\u00c9T")
    with pytest.raises(TypeError):
        parse_request_head(b"", max_size=1.5)
    with pytest.raises(ValueError, match="max_size must be at least 16"):
        parse_request_head(b"", max_size=3)


def test_missing_h11_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "h11", None)
    with pytest.raises(ImportError, match=r"pip install 'splicepool\[http\]'"):
        parse_request_head(GET)
    assert parse_request_head(GET[:20]) is None  # incomplete: h11 is not needed yet


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=30)


def test_h11_and_httptools_are_imported_lazily():
    out = run_python("import sys, splicepool.http1; print('h11' in sys.modules, 'httptools' in sys.modules)")
    assert out.stdout.strip() == "False False", out.stderr


def test_without_httptools_heads_are_parsed_by_h11():
    code = """if True:
        import sys
        sys.modules['httptools'] = None  # as if it were not installed
        from splicepool import http1
        print(http1.parse_request_head(b'GET /x HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 2\\r\\n\\r\\nhi'))
        print(http1.parse_response_head(b'HTTP/1.1 204 No Content\\r\\n\\r\\n', request_method='GET'))
        try:
            http1.parse_request_head(b'GET / HTTP/1.1\\r\\n\\r\\n')
        except http1.HttpError as exc:
            print(exc.status, exc)
        print(http1.use_parser())
        try:
            http1.use_parser('httptools')
        except ImportError as exc:
            print(exc)
    """
    out = run_python(code, SPLICEPOOL_HTTP1_PARSER="auto")
    assert out.stdout.splitlines() == [
        "RequestHead(method='GET', target='/x', version='1.1', headers=((b'host', b'a'), "
        "(b'content-length', b'2')), length=47)",
        "ResponseHead(status=204, reason=b'No Content', version='1.1', headers=(), length=27)",
        "400 bad request head: Missing mandatory Host: header",
        "h11",
        "splicepool.http1 was asked to parse heads with httptools, which is not installed: "
        "pip install httptools",
    ], out.stderr


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="pip install httptools")
def test_parser_env_and_use_parser():
    code = ("from splicepool import http1; http1.parse_request_head(b'GET / HTTP/1.0\\r\\n\\r\\n'); "
            "import sys; print('httptools' in sys.modules, http1.use_parser('auto'))")
    assert run_python(code, SPLICEPOOL_HTTP1_PARSER="h11").stdout.split() == ["False", "httptools"]
    assert run_python(code, SPLICEPOOL_HTTP1_PARSER="auto").stdout.split() == ["True", "httptools"]
    out = run_python("import splicepool.http1", SPLICEPOOL_HTTP1_PARSER="llhttp")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1] == (
        "ValueError: SPLICEPOOL_HTTP1_PARSER='llhttp': the HTTP/1.1 head parser is auto, h11 or "
        "httptools"
    )
    with pytest.raises(ValueError, match="parser 'llhttp' is not one of auto, h11, httptools"):
        http1.use_parser("llhttp")


def fast_fields(text: bytes, request: bool = True):
    """What the fast path makes of the whole head ``text``: None when it leaves it to h11."""
    found = http1._find_head(text, MAX_HEAD, None if request else "GET")
    assert found is not None
    start, end, buf, line = found
    return None if line is None else http1._fast_fields(buf, line, end, request)


@pytest.mark.skipif(not HAVE_HTTPTOOLS, reason="pip install httptools")
def test_plain_heads_take_the_fast_path_and_odd_ones_leave_it(parser):
    try:
        http1.use_parser("httptools")
        assert fast_fields(GET) == (
            ((b"host", b"example.test"), (b"user-agent", b"t/1"), (b"accept", b"*/*")),
            [b"host", b"user-agent", b"accept"],
        )
        assert fast_fields(b"\r\nPOST /u HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n"
                           b"X: \r\n\r\n")[0] == ((b"host", b"a"), (b"transfer-encoding", b"chunked"), (b"x", b""))
        assert fast_fields(b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\n"
                           b"Upgrade: websocket\r\n\r\n") is not None  # httptools raises HttpParserUpgrade
        assert fast_fields(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", False)[0] == (
            (b"content-length", b"12"),
        )
        assert fast_fields(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: ws\r\n\r\n", False)
        for odd in (
            b"GET / HTTP/1.1\nHost: a\n\n",  # bare LF
            b"GET / HTTP/1.1\r\nHost: a\r\nX: b\r\n c\r\n\r\n",  # obs-fold
            b"GET / HTTP/1.1\r\nHost: a \r\n\r\n",  # a space at the end of a value
            b"GET / HTTP/1.1\r\nHost:a\r\n\r\n",  # no space after the colon
            b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n",  # h11 takes it, llhttp not
            b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n",  # a method llhttp does not know
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + b"1" * 21 + b"\r\n\r\n",
        ):
            assert fast_fields(odd) is None, odd
        assert fast_fields(b"HTTP/1.1 200 OK \r\nA: b\r\n\r\n", False) is not None  # reason's space
        assert fast_fields(b"HTTP/1.1 200 OK\rx\r\nA: b\r\n\r\n", False) is None  # not matched
    finally:
        http1.use_parser(parser)


# -- framing --------------------------------------------------------------------------------


def head_with(*fields: bytes, version: bytes = b"1.1", method: bytes = b"POST") -> RequestHead:
    return req(method + b" / HTTP/" + version + b"\r\nHost: h\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n")


def test_request_body_framing():
    assert request_body(head_with()) == Body("none", 0)
    assert request_body(head_with(b"Content-Length: 10")) == Body("length", 10)
    assert request_body(head_with(b"Content-Length: 0")) == Body("none", 0)  # never max=0
    assert request_body(head_with(b"Transfer-Encoding: Chunked")) == Body("chunked", None)
    err = error(request_body, head_with(b"Content-Length: 3", b"Transfer-Encoding: chunked"))
    assert (err.status, str(err)) == (
        400,
        "request has both Transfer-Encoding and Content-Length: refused, as a message that "
        "could be read two ways (request smuggling, RFC 9112 6.3)",
    )
    err = error(request_body, head_with(b"Transfer-Encoding: chunked", version=b"1.0"))
    assert (err.status, str(err)) == (
        400, "HTTP/1.0 request has a Transfer-Encoding: its framing is faulty (RFC 9112 6.1)"
    )
    # Heads built by hand (h11 refuses these at parse time already).
    hand = RequestHead("POST", "/", "1.1", ((b"transfer-encoding", b"gzip, chunked"),), 0)
    err = error(request_body, hand)
    assert (err.status, str(err)) == (
        501, "Transfer-Encoding b'gzip, chunked' is not supported (only chunked)"
    )
    hand = RequestHead("POST", "/", "1.1", ((b"content-length", b"-1"),), 0)
    assert str(error(request_body, hand)) == "request has a bad Content-Length b'-1'"
    hand = RequestHead("POST", "/", "1.1", ((b"content-length", b"1"), (b"content-length", b"2")), 0)
    assert error(request_body, hand).status == 400


@pytest.mark.parametrize(
    "method, status, fields, body",
    [
        ("HEAD", 200, [b"Content-Length: 10"], Body("none", 0)),
        ("HEAD", 200, [b"Transfer-Encoding: chunked"], Body("none", 0)),
        ("GET", 100, [], Body("none", 0)),
        ("GET", 101, [b"Upgrade: websocket"], Body("none", 0)),
        ("GET", 204, [], Body("none", 0)),
        ("GET", 304, [b"Content-Length: 10"], Body("none", 0)),
        ("CONNECT", 200, [], Body("none", 0)),
        ("CONNECT", 299, [b"Content-Length: 5"], Body("none", 0)),
        ("CONNECT", 407, [b"Content-Length: 5"], Body("length", 5)),
        ("GET", 200, [b"Transfer-Encoding: chunked"], Body("chunked", None)),
        ("POST", 201, [b"Content-Length: 7"], Body("length", 7)),
        ("GET", 200, [b"Content-Length: 0"], Body("none", 0)),
        ("GET", 200, [], Body("close", None)),
        ("GET", 404, [b"Server: x"], Body("close", None)),
        ("GET", 205, [], Body("close", None)),
    ],
)
def test_response_body_framing(method, status, fields, body):
    text = b"HTTP/1.1 %d X\r\n" % status + b"".join(f + b"\r\n" for f in fields) + b"\r\n"
    assert response_body(resp(text, method), method) == body


def test_response_body_errors_and_rfc_close():
    head = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert error(response_body, head, "GET").status == 400
    hand = ResponseHead(200, b"OK", "1.1", ((b"transfer-encoding", b"gzip"),), 0)
    assert response_body(hand, "GET") == Body("close", None)  # RFC 9112 6.3 item 4


def test_keeps_alive():
    r11, r10 = head_with(method=b"GET"), head_with(version=b"1.0", method=b"GET")
    r10ka = head_with(b"Connection: Keep-Alive", version=b"1.0", method=b"GET")
    r11c = head_with(b"Connection: foo, CLOSE", method=b"GET")
    ok = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n")
    ok10 = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n")
    ok10ka = resp(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\nConnection: keep-alive\r\n\r\n")
    closing = resp(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n")
    eof = resp(b"HTTP/1.1 200 OK\r\n\r\n")
    assert keeps_alive(r11, ok) is True
    assert keeps_alive(r10, ok) is False
    assert keeps_alive(r10ka, ok) is True
    assert keeps_alive(r11c, ok) is False
    assert keeps_alive(r11, closing) is False
    assert keeps_alive(r11, ok10) is False
    assert keeps_alive(r11, ok10ka) is True
    assert keeps_alive(r11, eof) is False
    assert keeps_alive(r11, resp(b"HTTP/1.1 101 S\r\nUpgrade: ws\r\n\r\n")) is False
    assert keeps_alive(r11, resp(b"HTTP/1.1 204 No Content\r\n\r\n")) is True
    # the upstream's side alone: what a request sent as HTTP/1.1 without close gets back
    for response in (ok, ok10ka, resp(b"HTTP/1.1 204 No Content\r\n\r\n")):
        assert upstream_keeps_alive(response, "GET") is True
    for response in (ok10, closing, eof, resp(b"HTTP/1.1 101 S\r\nUpgrade: ws\r\n\r\n")):
        assert upstream_keeps_alive(response, "GET") is False
    assert upstream_keeps_alive(resp(b"HTTP/1.1 200 OK\r\n\r\n", "HEAD"), "HEAD") is True  # no body
    assert upstream_keeps_alive(resp(b"HTTP/1.1 200 OK\r\n\r\n", "CONNECT"), "CONNECT") is False
    # the body the caller worked out already is the one used (not worked out again)
    for response in (ok, ok10, ok10ka, closing, eof):
        body = response_body(response, "GET")
        assert upstream_keeps_alive(response, "GET", body=body) is upstream_keeps_alive(response, "GET")
    assert upstream_keeps_alive(ok, "GET", body=Body("close", None)) is False


def test_expect_and_upgrade():
    assert expects_continue(head_with(b"Expect: 100-Continue"))
    assert not expects_continue(head_with(b"Expect: 100-continue", version=b"1.0"))
    assert not expects_continue(head_with())
    ws = head_with(b"Connection: keep-alive, Upgrade", b"Upgrade: websocket", method=b"GET")
    assert upgrade_to(ws) == b"websocket"
    assert upgrade_to(head_with(b"Upgrade: websocket")) is None  # Connection does not say so
    assert upgrade_to(head_with(b"Connection: upgrade", b"Upgrade: h2c", version=b"1.0")) is None
    assert is_upgrade_response(resp(b"HTTP/1.1 101 S\r\nUpgrade: websocket\r\n\r\n"))
    assert not is_upgrade_response(resp(b"HTTP/1.1 200 OK\r\n\r\n"))


# -- chunks ---------------------------------------------------------------------------------


def test_chunk_lines():
    assert parse_chunk_line(b"1a\r\nrest") == Chunk(26, 4)
    assert parse_chunk_line(b"FFff\r\n") == Chunk(0xFFFF, 6)
    assert parse_chunk_line(b"0\r\n\r\n") == Chunk(0, 3)
    assert parse_chunk_line(b"000\r\n") == Chunk(0, 5)
    line = b'10 ; name=value;x ;q="a \\" b"\t\r\n'
    assert parse_chunk_line(line + b"data") == Chunk(16, len(line))
    assert parse_chunk_line(b"f" * 16 + b"\r\n") == Chunk(16**16 - 1, 18)
    for i in range(len(line)):
        assert parse_chunk_line(line[:i]) is None, line[:i]
    assert encode_chunk_line(26) == b"1a\r\n" and encode_chunk_line(0) == b"0\r\n"


@pytest.mark.parametrize(
    "text, message",
    [
        (b"g\r\n", "chunk size: byte b'g' at offset 0 is not a hex digit"),
        (b"\r\n", "chunk size: byte b'\\r' at offset 0 is not a hex digit"),
        (b"-1\r\n", "chunk size: byte b'-' at offset 0 is not a hex digit"),
        (b"0x10\r\n", "chunk size: byte b'x' at offset 1 is not a hex digit, ';' or CRLF"),
        (b"1" * 17, "chunk size has more than 16 hex digits: b'11111111111111111'"),
        (b"5\n", "chunk-size line has a bare LF at offset 1: it must end with CRLF"),
        (b"5\rx", "chunk-size line has a bare CR at offset 1: it must end with CRLF"),
        (b"5;=x\r\n", "chunk-size line has bad chunk extensions b';=x' at offset 1"),
        (b"5;a=\"x\r\n", "chunk-size line has bad chunk extensions b';a=\"x' at offset 1"),
        (b"5;a\x00", "chunk extensions: byte b'\\x00' at offset 3"),
    ],
)
def test_chunk_line_errors(text, message):
    err = error(parse_chunk_line, text)
    assert (err.status, str(err)) == (400, message)


def test_chunk_line_bound():
    long = b"5;" + b"x" * 100
    assert parse_chunk_line(long, max_line=200) is None
    err = error(parse_chunk_line, long, max_line=50)
    assert str(err) == "chunk-size line is over 50 bytes (max_line)"
    assert parse_chunk_line(long + b"\r\n", max_line=104) == Chunk(5, 104)
    assert error(parse_chunk_line, long + b"\r\n", max_line=103).status == 400


def test_chunk_end():
    assert CHUNK_END == b"\r\n"
    check_chunk_end(b"\r\n")
    check_chunk_end(memoryview(b"\r\n"))
    err = error(check_chunk_end, b"\n0")
    assert str(err) == "chunk data is not followed by CRLF but by b'\\n0'"


def test_trailers():
    assert parse_trailers(b"\r\n") == 2
    assert parse_trailers(b"\r\nnext request") == 2
    text = b"Checksum: abc\r\nX-T:  1 \r\n\r\n"
    assert parse_trailers(text + b"GET") == len(text)
    for i in range(len(text)):
        assert parse_trailers(text[:i]) is None, text[:i]
    assert str(error(parse_trailers, b"\n")) == "trailer section has a bare LF at offset 0"
    assert str(error(parse_trailers, b"X: y\n")) == "trailer section has a bare LF at offset 4"
    assert str(error(parse_trailers, b"X y\r\n")) == "trailer header line at offset 0 has no colon: b'X y'"
    assert str(error(parse_trailers, b"X(")) == (
        "trailer line at offset 0: byte b'(' at offset 1 cannot be in a field name (a token)"
    )
    err = error(parse_trailers, b"X: " + b"y" * 100, max_size=50)
    assert (err.status, str(err)) == (431, "trailer section is over 50 bytes (max_size)")


def walk_chunked(data: bytes) -> tuple[bytes, int]:
    """A chunked body walked as the module docstring tells a server to: (the data, bytes used)."""
    pos, out = 0, []
    while True:
        chunk = parse_chunk_line(data[pos:])
        assert chunk is not None
        pos += chunk.length
        if chunk.size == 0:
            break
        out.append(data[pos : pos + chunk.size])
        pos += chunk.size
        check_chunk_end(data[pos : pos + 2])
        pos += 2
    trailers = parse_trailers(data[pos:])
    assert trailers is not None
    return b"".join(out), pos + trailers


def test_walk_a_chunked_body():
    body = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nT: v\r\n\r\nNEXT"
    assert walk_chunked(body) == (b"hello world", len(body) - 4)


# -- rewriting ------------------------------------------------------------------------------


def test_proxy_request_head_exact():
    head = req(
        b"GET /p HTTP/1.1\r\nHost: site\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: 5\r\n"
        b"X-Secret: s\r\nTE: trailers\r\nTrailer: Checksum\r\nProxy-Authorization: Basic x\r\n"
        b"Proxy-Connection: keep-alive\r\nUpgrade: websocket\r\nX-Forwarded-For: 192.0.2.1\r\n"
        b"X-Forwarded-Proto: https\r\nAccept: */*\r\n\r\n"
    )
    assert proxy_request_head(head, client_ip="198.51.100.7") == (
        b"GET /p HTTP/1.1\r\nhost: site\r\ntrailer: Checksum\r\n"
        b"x-forwarded-for: 192.0.2.1, 198.51.100.7\r\naccept: */*\r\n"
        b"forwarded: for=198.51.100.7;proto=http\r\nx-forwarded-proto: http\r\n\r\n"
    )


def test_proxy_request_head_ipv6_upgrade_http10_and_framing_kept():
    ws = req(
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Forwarded: for=192.0.2.1\r\n\r\n"
    )
    assert proxy_request_head(ws, client_ip="2001:db8::1", proto="https") == (
        b"GET /ws HTTP/1.1\r\nhost: h\r\nupgrade: websocket\r\n"
        b'forwarded: for=192.0.2.1, for="[2001:db8::1]";proto=https\r\nconnection: upgrade\r\n'
        b"x-forwarded-for: 2001:db8::1\r\nx-forwarded-proto: https\r\n\r\n"
    )
    assert proxy_request_head(ws, client_ip="::1", keep_upgrade=False) == (
        b'GET /ws HTTP/1.1\r\nhost: h\r\nforwarded: for=192.0.2.1, for="[::1]";proto=http\r\n'
        b"x-forwarded-for: ::1\r\nx-forwarded-proto: http\r\n\r\n"
    )
    old = req(b"POST /f HTTP/1.0\r\nContent-Length: 3\r\nConnection: content-length, host\r\n\r\n")
    assert proxy_request_head(old, client_ip="10.0.0.1", host_default="backend:8080") == (
        b"POST /f HTTP/1.1\r\nhost: backend:8080\r\ncontent-length: 3\r\n"
        b"x-forwarded-for: 10.0.0.1\r\nforwarded: for=10.0.0.1;proto=http\r\n"
        b"x-forwarded-proto: http\r\n\r\n"
    )
    err = error(proxy_request_head, old, client_ip="10.0.0.1")
    assert (err.status, str(err)) == (400, "request has no Host field (and no host_default was given)")
    with pytest.raises(ValueError, match="client_ip 'nope' is not an IPv4 or IPv6 address"):
        proxy_request_head(ws, client_ip="nope")
    with pytest.raises(ValueError, match="proto 'h t' is not a URI scheme"):
        proxy_request_head(ws, client_ip="::1", proto="h t")
    bad = RequestHead("GET", "/", "1.1", ((b"host", b"a\r\nX: injected"),), 0)
    with pytest.raises(ValueError, match="cannot be sent"):
        proxy_request_head(bad, client_ip="::1")


def test_proxy_request_head_checks_the_request_line_of_a_hand_built_head():
    for method, target in (("G T", "/"), ("G\u00c9T", "/"), ("GET", "/a b"), ("PATCH", "/\x7f")):
        bad = RequestHead(method, target, "1.1", ((b"host", b"a"),), 0)
        with pytest.raises((ValueError, UnicodeEncodeError)):
            proxy_request_head(bad, client_ip="::1")
    for method in ("PATCH", "M-SEARCH", "OPTIONS"):
        ok = RequestHead(method, "*", "1.1", ((b"host", b"a"),), 0)
        assert proxy_request_head(ok, client_ip="::1").startswith(method.encode() + b" * HTTP/1.1\r\n")
    with pytest.raises(ValueError, match=r"request line b'G T / HTTP/1.1\\r\\n' cannot be sent"):
        proxy_request_head(RequestHead("G T", "/", "1.1", ((b"host", b"a"),), 0), client_ip="::1")
    assert resp(b"HTTP/1.1 200 OK\r\n\r\n", "PATCH").status == 200
    with pytest.raises(ValueError, match="request_method must be a method name"):
        parse_response_head(b"", request_method=["GET"])


def test_framing_reads_every_field_of_each_kind():
    hand = RequestHead("POST", "/", "1.1", ((b"transfer-encoding", b"gzip"), (b"x", b"1"),
                                            (b"transfer-encoding", b"chunked")), 0)
    err = error(request_body, hand)
    assert (err.status, str(err)) == (
        501, "Transfer-Encoding b'gzip, chunked' is not supported (only chunked)"
    )
    hand = ResponseHead(200, b"OK", "1.1", ((b"content-length", b"4"), (b"content-length", b"4, 4")), 0)
    assert response_body(hand, "GET") == Body("length", 4)
    hand = ResponseHead(200, b"OK", "1.1", ((b"content-length", b"4"), (b"transfer-encoding", b"chunked")), 0)
    assert error(response_body, hand, "GET").status == 400


def test_proxy_response_head():
    head = resp(
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nServer: s\r\n\r\n"
    )
    assert proxy_response_head(head, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nserver: s\r\n\r\n"
    )
    assert proxy_response_head(head, keep_alive=False) == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nserver: s\r\nconnection: close\r\n\r\n"
    )
    assert proxy_response_head(head, keep_alive=True, request_version="1.0") == (
        b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nserver: s\r\nconnection: keep-alive\r\n\r\n"
    )
    chunked = resp(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert proxy_response_head(chunked, keep_alive=True) == (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert proxy_response_head(chunked, keep_alive=True, request_version="1.0") == (
        b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n"
    )
    switch = resp(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n")
    assert proxy_response_head(switch, keep_alive=False) == (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )
    assert proxy_response_head(resp(b"HTTP/1.1 204\r\n\r\n"), keep_alive=True) == (
        b"HTTP/1.1 204 \r\n\r\n"
    )


@pytest.mark.parametrize("status", [400, 431, 501, 502, 504, 505])
def test_error_response(status):
    text = error_response(status)
    head = resp(text)
    body = text[head.length :]
    assert head.status == status and head.reason == http1.REASONS[status].encode()
    assert response_body(head, "GET") == Body("length", len(body))
    assert body == f"{status} {http1.REASONS[status]}\n".encode()
    assert (b"connection", b"close") in head.headers


def test_error_response_exact_and_arguments():
    assert error_response(502, reason="Upstream Down", close=False) == (
        b"HTTP/1.1 502 Upstream Down\r\nContent-Type: text/plain; charset=utf-8\r\n"
        b"Content-Length: 18\r\n\r\n502 Upstream Down\n"
    )
    with pytest.raises(ValueError, match="no default reason"):
        error_response(418)
    with pytest.raises(ValueError, match="printable ASCII"):
        error_response(400, reason="a\r\nb")
    with pytest.raises(ValueError, match="not a final status"):
        error_response(100)


# -- hypothesis -----------------------------------------------------------------------------

TCHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
tokens = st.text(TCHARS, min_size=1, max_size=12)
values = st.from_regex(rb"\A(?:[\x21-\x7e\x80-\xff]+(?: [\x21-\x7e\x80-\xff]+)*)?\Z").filter(
    lambda v: len(v) < 60
)
SPECIAL = {b"host", b"content-length", b"transfer-encoding", b"connection", b"forwarded",
           b"x-forwarded-for", b"x-forwarded-proto"}
names = st.one_of(tokens.map(str.encode), st.sampled_from(sorted(http1.HOP_BY_HOP))).filter(
    lambda n: n.lower() not in SPECIAL
)


@st.composite
def request_heads(draw):
    method = draw(st.one_of(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]), tokens))
    target = draw(st.text(bytes(range(0x21, 0x7F)).decode(), min_size=1, max_size=30))
    version = draw(st.sampled_from(["1.0", "1.1"]))
    fields = draw(st.lists(st.tuples(names, values), max_size=8))
    if version == "1.1" or draw(st.booleans()):
        fields.insert(draw(st.integers(0, len(fields))), (b"Host", b"example.test"))
    if draw(st.booleans()):
        named = draw(st.lists(st.sampled_from([n for n, _ in fields] or [b"x"]), max_size=3))
        fields.append((b"Connection", b", ".join(named + [b"keep-alive"])))
    framing = draw(st.sampled_from([None, b"content-length", b"transfer-encoding"]))
    if framing == b"content-length":
        fields.append((b"Content-Length", str(draw(st.integers(0, 10**12))).encode()))
    elif framing == b"transfer-encoding" and version == "1.1":
        fields.append((b"Transfer-Encoding", b"chunked"))
    eol = draw(st.sampled_from([b"\r\n", b"\n"]))
    text = f"{method} {target} HTTP/{version}".encode() + eol
    text += b"".join(n + b":" + draw(st.sampled_from([b"", b" ", b"\t "])) + v + eol for n, v in fields)
    return text + eol, method, target, version, fields


def connection_tokens(fields):
    return {t.strip().lower() for n, v in fields if n.lower() == b"connection" for t in v.split(b",")}


def upgrades(fields, version):
    """Whether the proxy passes this request on as an upgrade: HTTP/1.1, Connection names
    upgrade, and an Upgrade field says to what."""
    return (version == "1.1" and b"upgrade" in connection_tokens(fields)
            and any(n.lower() == b"upgrade" and v.strip() for n, v in fields))


def forwarded(fields, version):
    drop = (set(http1.HOP_BY_HOP) | connection_tokens(fields)) - {b"host", b"content-length", b"transfer-encoding"}
    if upgrades(fields, version):
        drop.discard(b"upgrade")
    return [(n.lower(), v) for n, v in fields if n.lower() not in drop]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_heads(), st.sampled_from(["192.0.2.9", "2001:db8::9"]))
def test_round_trip_through_proxy_request_head(drawn, client_ip):
    text, method, target, version, fields = drawn
    head = parse_request_head(text + b"body")
    assert head == RequestHead(method, target, version, tuple((n.lower(), v) for n, v in fields),
                               len(text))
    for i in range(0, len(text), 7):
        assert parse_request_head(text[:i]) is None
    out = proxy_request_head(head, client_ip=client_ip, host_default="dflt")
    again = parse_request_head(out)
    assert again.length == len(out)
    assert (again.method, again.target, again.version) == (method, target, "1.1")
    node = f'"[{client_ip}]"' if ":" in client_ip else client_ip
    expected = forwarded(fields, version)
    if not any(n == b"host" for n, _ in expected):
        expected.insert(0, (b"host", b"dflt"))
    if upgrades(fields, version):
        expected.append((b"connection", b"upgrade"))
    expected += [
        (b"x-forwarded-for", client_ip.encode()),
        (b"forwarded", f"for={node};proto=http".encode()),
        (b"x-forwarded-proto", b"http"),
    ]
    assert list(again.headers) == expected
    assert request_body(again) == request_body(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([b"", b"GET / HTTP/1.1\r\n", b"HTTP/1.1 200 OK\r\n"]))
def test_fuzz_only_http_errors(data, prefix):
    data = prefix + data
    for call in (
        lambda: parse_request_head(data, max_size=128),
        lambda: parse_response_head(data, request_method="GET", max_size=128),
        lambda: parse_chunk_line(data, max_line=64),
        lambda: parse_trailers(data, max_size=128),
    ):
        try:
            result = call()
        except HttpError as exc:
            assert exc.status in (400, 431, 501, 505)
            continue
        if result is not None:
            length = result if isinstance(result, int) else result.length
            assert 0 < length <= len(data)


def h11_accepts(text: bytes, request: bool) -> bool:
    import h11

    if request:
        conn = h11.Connection(h11.SERVER)
    else:
        conn = h11.Connection(h11.CLIENT)
        conn.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
    conn.receive_data(text)
    try:
        conn.next_event()
        return True
    except h11.RemoteProtocolError:
        return False


def we_accept(text: bytes, request: bool) -> bool:
    try:
        if request:
            parse_request_head(text)
        else:
            parse_response_head(text, request_method="GET")
        return True
    except HttpError:
        return False


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.binary(max_size=20).map(lambda b: b.replace(b"\n", b"")), max_size=5),
    st.sampled_from([b"GET / HTTP/1.1\r\nHost: a", b"HTTP/1.1 200 OK"]),
    st.binary(max_size=12).map(lambda b: b.replace(b"\n", b"")),
)
def test_fuzz_heads_agree_with_h11(lines, first, tail):
    """The early line checks refuse no head that h11 takes, and miss none that it refuses
    (the version, which h11 leaves to us, and a status over 599 aside)."""
    request = first.startswith(b"GET")
    for text in (first, first + tail):
        text += b"\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
        assert we_accept(text, request) == h11_accepts(text, request), text


# -- curl, the real client ------------------------------------------------------------------

# -- the two parsers agree ------------------------------------------------------------------


def outcome(call, *args, **kwargs):
    """The result of a call, or the HttpError's (status, message)."""
    try:
        return call(*args, **kwargs)
    except HttpError as exc:
        return ("HttpError", exc.status, str(exc))


def everything(text: bytes, method: str | None):
    """All http1 makes of ``text`` (a request head when ``method`` is None, else a response
    head to a ``method`` request): the head, its framing, keep-alive, the head proxied."""
    if method is None:
        head = outcome(parse_request_head, text, max_size=512)
        if not isinstance(head, RequestHead):
            return head
        return (head, outcome(request_body, head), http1.request_keeps_alive(head),
                expects_continue(head), upgrade_to(head),
                outcome(proxy_request_head, head, client_ip="192.0.2.1", host_default="dflt"))
    head = outcome(parse_response_head, text, request_method=method, max_size=512)
    if not isinstance(head, ResponseHead):
        return head
    return (head, outcome(response_body, head, method), outcome(upstream_keeps_alive, head, method),
            outcome(proxy_response_head, head, keep_alive=True, request_version="1.0"))


def both_parsers(text: bytes, method: str | None, restore: str):
    try:
        http1.use_parser("h11")
        slow = everything(text, method)
        http1.use_parser("httptools")
        fast = everything(text, method)
    finally:
        http1.use_parser(restore)
    return slow, fast


SEEDS = [
    (GET, None),
    (b"POST /form?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 7\r\nExpect: 100-continue\r\n"
     b"Content-Type: application/x-www-form-urlencoded\r\n\r\n", None),
    (b"PUT /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, X-A\r\n"
     b"X-A: 1\r\n\r\n", None),
    (b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n", None),
    (b"GET / HTTP/1.0\r\nUser-Agent: x\r\n\r\n", None),
    (b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 12\r\nConnection: keep-alive\r\n\r\n", "GET"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Y: a b\r\n\r\n", "GET"),
    (b"HTTP/1.0 404 Not Found\r\nContent-Type: text/html\r\n\r\n", "POST"),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n", "GET"),
    (b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n", "HEAD"),
]
PIECES = [b" ", b"\t", b"\r", b"\n", b"\r\n", b":", b",", b"\x00", b"\x01", b"\x0b", b"\x0c",
          b"\x7f", b"\xff", b"a", b"Z", b"0", b"9", b"(", b"\r\n ", b"\r\n\t", b"\r\nHost: x",
          b"\r\nContent-Length: 5", b"\r\nContent-Length: 5, 5", b"\r\ncontent-length: 05",
          b"\r\nTransfer-Encoding: Chunked", b"\r\nTransfer-Encoding: gzip", b"\r\nX: y ",
          b"\r\nConnection: close", b"HTTP/1.1", b"1.0", b"2"]


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(SEEDS),
       st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(["insert", "delete", "replace"]),
                          st.sampled_from(PIECES)), max_size=4),
       st.sampled_from([b"", b"body", b"\r\n"]))
def test_mutated_heads_are_read_alike_by_both_parsers(parser, seed, edits, tail):
    if not HAVE_HTTPTOOLS:
        pytest.skip("pip install httptools")
    text, method = seed
    text = bytearray(text)
    for at, how, piece in edits:
        at %= len(text) + 1
        if how == "insert":
            text[at:at] = piece
        elif how == "delete":
            del text[at : at + len(piece)]
        else:
            text[at : at + len(piece)] = piece
    text = bytes(text) + tail
    slow, fast = both_parsers(text, method, parser)
    assert fast == slow, text


# Names, each with the values worth trying for it (h11 reads some of them its own way).
FIELDS = {
    b"Host": [b"a", b"a:80", b""],
    b"Content-Length": [b"5", b"0", b"05", b"5, 5", b"5,6", b"-1", b"+5", b"1" * 20, b"1" * 21, b""],
    b"content-LENGTH": [b"7"],
    b"Transfer-Encoding": [b"chunked", b"CHUNKED", b"Chunked", b"gzip", b"gzip, chunked",
                           b"chunked, chunked", b""],
    b"Connection": [b"close", b"upgrade", b"keep-alive, X-A", b"Keep-Alive", b"host, content-length"],
    b"Upgrade": [b"websocket", b"", b"h2c, ws"],
    b"Expect": [b"100-continue", b"100-Continue, x"],
    b"X-A": [b"a  b", b"a\tb", b"", b"\xff\x80", b"\x01", b"a\x00", b"\x7f", b"a\x0bb", b"a,b"],
    b"Keep-Alive": [b"timeout=5"],
    b"Ho(st": [b"a"],
    b"": [b"a"],
}


@st.composite
def built_heads(draw):
    eol = draw(st.sampled_from([b"\r\n"] * 5 + [b"\n"]))
    if draw(st.booleans()):
        method = None
        line = b"%s /p HTTP/%s" % (draw(st.sampled_from([b"GET", b"POST", b"M-SEARCH", b"FOO", b"CONNECT"])),
                                   draw(st.sampled_from([b"1.1", b"1.0"])))
    else:
        method = draw(st.sampled_from(["GET", "HEAD", "CONNECT", "POST"]))
        line = b"HTTP/%s %d%s" % (draw(st.sampled_from([b"1.1", b"1.0"])),
                                  draw(st.sampled_from([100, 101, 200, 204, 304, 404, 599])),
                                  draw(st.sampled_from([b" OK", b"", b" ", b" A \tB "])))
    lines = [line]
    if method is None and draw(st.integers(0, 3)):
        lines.append(b"Host: a")
    for _ in range(draw(st.integers(0, 5))):
        name = draw(st.sampled_from(sorted(FIELDS)))
        lines.append(name
                     + draw(st.sampled_from([b": "] * 6 + [b":", b":  ", b":\t", b" :"]))
                     + draw(st.sampled_from(FIELDS[name]))
                     + draw(st.sampled_from([b""] * 6 + [b" ", b"\t"])))
    return b"".join(x + eol for x in lines) + eol, method


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(built_heads())
def test_built_heads_are_read_alike_by_both_parsers(parser, drawn):
    if not HAVE_HTTPTOOLS:
        pytest.skip("pip install httptools")
    text, method = drawn
    slow, fast = both_parsers(text, method, parser)
    assert fast == slow, text


needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="apt-get install curl")


class Capture:
    """A one-connection HTTP server on loopback that reads a request with this module (body
    moved in Python here, as the splice engine will), answers 200 and records the head bytes."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.head_bytes = b""
        self.head = None
        self.body = b""
        self.sent_continue = False
        self.error = None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def recv_more(self, sock, buf):
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(bytes(buf))
        buf += chunk

    def run(self) -> None:
        try:
            sock, _ = self.listener.accept()
            with sock:
                sock.settimeout(10)
                buf = bytearray()
                while (head := parse_request_head(buf)) is None:
                    self.recv_more(sock, buf)
                self.head, self.head_bytes = head, bytes(buf[: head.length])
                del buf[: head.length]
                if expects_continue(head):
                    self.sent_continue = True
                    sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
                body = request_body(head)
                if body.kind == "length":
                    while len(buf) < body.length:
                        self.recv_more(sock, buf)
                    self.body = bytes(buf[: body.length])
                elif body.kind == "chunked":
                    while True:
                        try:
                            self.body, _ = walk_chunked(bytes(buf))
                            break
                        except AssertionError:
                            self.recv_more(sock, buf)
                sock.sendall(error_response(200, reason="OK"))
        except Exception as exc:  # reported by the test
            self.error = exc
        finally:
            self.listener.close()

    def curl(self, *args: str) -> None:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        result = subprocess.run(
            ["curl", "-q", "-sS", "--max-time", "10", *args, f"http://127.0.0.1:{self.port}/up?x=1"],
            capture_output=True, env=env, timeout=20,
        )
        self.thread.join(10)
        assert self.error is None, self.error
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"200 OK\n"


def curl_version() -> str:
    out = subprocess.run(["curl", "--version"], capture_output=True, text=True).stdout
    return out.split()[1]


@needs_curl
def test_curl_get():
    server = Capture()
    server.curl()
    host = f"127.0.0.1:{server.port}".encode()
    assert server.head_bytes == (
        b"GET /up?x=1 HTTP/1.1\r\nHost: " + host + b"\r\nUser-Agent: curl/"
        + curl_version().encode() + b"\r\nAccept: */*\r\n\r\n"
    )
    assert server.head == RequestHead(
        "GET", "/up?x=1", "1.1",
        ((b"host", host), (b"user-agent", b"curl/" + curl_version().encode()), (b"accept", b"*/*")),
        len(server.head_bytes),
    )
    assert request_body(server.head) == Body("none", 0)


@needs_curl
def test_curl_post_form():
    server = Capture()
    server.curl("-d", "a=1&b=2")
    head = server.head
    assert head.method == "POST"
    assert (b"content-type", b"application/x-www-form-urlencoded") in head.headers
    assert request_body(head) == Body("length", 7) and server.body == b"a=1&b=2"
    assert not expects_continue(head)


@needs_curl
def test_curl_chunked_upload():
    server = Capture()
    server.curl("-H", "Transfer-Encoding: chunked", "--data-binary", "hello chunks")
    assert (b"transfer-encoding", b"chunked") in server.head.headers
    assert request_body(server.head) == Body("chunked", None)
    assert server.body == b"hello chunks"


@needs_curl
def test_curl_expect_100_continue():
    data = tempfile.NamedTemporaryFile(suffix=".bin")
    data.write(os.urandom(2 * 1024 * 1024))
    data.flush()
    server = Capture()
    server.curl("-H", "Expect: 100-continue", "--data-binary", f"@{data.name}")
    assert (b"expect", b"100-continue") in server.head.headers
    assert expects_continue(server.head) and server.sent_continue
    assert request_body(server.head) == Body("length", 2 * 1024 * 1024)
    with open(data.name, "rb") as f:
        assert server.body == f.read()


# -- nginx, a real upstream -----------------------------------------------------------------

NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)


@pytest.fixture(scope="module")
def nginx():
    if NGINX is None:
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    root = tempfile.mkdtemp(prefix="http1-nginx-")
    port = free_port()
    os.makedirs(f"{root}/html")
    with open(f"{root}/html/file.txt", "w") as f:
        f.write("static file body\n" * 200)
    conf = f"""
daemon off; master_process off; pid {root}/nginx.pid; error_log {root}/error.log;
events {{ worker_connections 16; }}
http {{
  access_log off; client_body_temp_path {root}; proxy_temp_path {root};
  fastcgi_temp_path {root}; uwsgi_temp_path {root}; scgi_temp_path {root};
  server {{
    listen 127.0.0.1:{port}; root {root}/html;
    gzip on; gzip_types text/plain; gzip_min_length 0;
    location = /text {{ return 200 "hello\\n"; }}
    location = /redirect {{ return 302 /text; }}
  }}
}}
"""
    with open(f"{root}/nginx.conf", "w") as f:
        f.write(conf)
    proc = subprocess.Popen([NGINX, "-p", root, "-c", f"{root}/nginx.conf"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"nginx did not start: {proc.stderr.read()!r}")
            time.sleep(0.05)
    yield port
    proc.send_signal(signal.SIGQUIT)
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
    shutil.rmtree(root, ignore_errors=True)


def exchange(port: int, request: bytes, method: str) -> tuple[ResponseHead, bytes, bytes]:
    """Send ``request``, read one response with this module: (head, head bytes, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        buf = bytearray()
        while (head := parse_response_head(buf, request_method=method)) is None:
            buf += sock.recv(65536)
        head_bytes, rest = bytes(buf[: head.length]), bytes(buf[head.length :])
        body = response_body(head, method)
        while True:
            if body.kind == "none":
                return head, head_bytes, rest[:0]
            if body.kind == "length" and len(rest) >= body.length:
                return head, head_bytes, rest[: body.length]
            if body.kind == "chunked":
                try:
                    data, _ = walk_chunked(rest)
                    return head, head_bytes, data
                except AssertionError:
                    pass
            more = sock.recv(65536)
            if not more:
                assert body.kind == "close"
                return head, head_bytes, rest
            rest += more


def test_nginx_response_heads(nginx):
    head, raw, body = exchange(nginx, b"GET /text HTTP/1.1\r\nHost: x\r\n\r\n", "GET")
    assert (head.status, head.reason, head.version) == (200, b"OK", "1.1")
    assert raw.startswith(b"HTTP/1.1 200 OK\r\nServer: nginx")
    assert response_body(head, "GET") == Body("length", 6) and body == b"hello\n"
    names = [n for n, _ in head.headers]
    assert names[:4] == [b"server", b"date", b"content-type", b"content-length"]
    assert keeps_alive(req(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), head)

    head, raw, body = exchange(nginx, b"HEAD /file.txt HTTP/1.1\r\nHost: x\r\n\r\n", "HEAD")
    assert head.status == 200 and response_body(head, "HEAD") == Body("none", 0)
    assert (b"content-length", b"3400") in head.headers and (b"accept-ranges", b"bytes") in head.headers

    request = b"GET /file.txt HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n"
    head, raw, body = exchange(nginx, request, "GET")
    assert response_body(head, "GET") == Body("chunked", None)
    assert (b"content-encoding", b"gzip") in head.headers
    import gzip

    assert gzip.decompress(body) == b"static file body\n" * 200
    out = proxy_response_head(head, keep_alive=True)
    assert parse_response_head(out, request_method="GET").headers == tuple(
        (n, v) for n, v in head.headers if n != b"connection"
    )

    etag = dict(exchange(nginx, b"GET /file.txt HTTP/1.1\r\nHost: x\r\n\r\n", "GET")[0].headers)[b"etag"]
    head, raw, body = exchange(
        nginx, b"GET /file.txt HTTP/1.1\r\nHost: x\r\nIf-None-Match: " + etag + b"\r\n\r\n", "GET"
    )
    assert head.status == 304 and response_body(head, "GET") == Body("none", 0)

    head, raw, body = exchange(nginx, b"GET /nope HTTP/1.0\r\n\r\n", "GET")
    assert (head.status, head.version) == (404, "1.1")
    assert (b"connection", b"close") in head.headers
    assert response_body(head, "GET").kind == "length"
    assert not keeps_alive(req(b"GET /nope HTTP/1.0\r\n\r\n"), head)

    head, raw, body = exchange(nginx, b"GET /redirect HTTP/1.1\r\nHost: x\r\n\r\n", "GET")
    assert head.status == 302 and dict(head.headers)[b"location"].endswith(b"/text")

    head, raw, body = exchange(nginx, b"GET / HTTP/1.1\r\n\r\n", "GET")  # no Host: nginx says 400
    assert head.status == 400 and (b"connection", b"close") in head.headers
