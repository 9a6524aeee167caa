"""What splicepool.http1 costs per proxied request, in µs: no sockets, one thread.

    python bench/http1_micro.py [--reps 7] [--loops 5000] [--parser auto|h11|httptools]

One request is what ``splicepool http`` does with the heads of one exchange: parse a
browser-like request head (a bytearray, as a session's buffer is), frame its body, build the
head sent upstream, ask whether it upgrades; parse an nginx-like response head, frame its
body, decide keep-alive both ways and build the head sent to the client. Each rep times
``--loops`` requests; the figure printed is the median of ``--reps`` reps, with the parser
that did the parsing (``--parser``: ``auto`` is httptools when it imports, else h11).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splicepool import http1  # noqa: E402

# What Firefox sends for a page (a cookie and all), as a session's buffer holds it.
REQUEST = bytearray(
    b"GET /articles/2024/splice-all-the-things?ref=home&page=2 HTTP/1.1\r\n"
    b"Host: www.example.test\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0\r\n"
    b"Accept: text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8\r\n"
    b"Accept-Language: en-GB,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br, zstd\r\n"
    b"Referer: https://www.example.test/\r\n"
    b"Connection: keep-alive\r\n"
    b"Cookie: session=4f2a9c1e8b7d6a5f3e2d1c0b; theme=dark; consent=1\r\n"
    b"Upgrade-Insecure-Requests: 1\r\n"
    b"Sec-Fetch-Dest: document\r\n"
    b"Sec-Fetch-Mode: navigate\r\n"
    b"Sec-Fetch-Site: same-origin\r\n"
    b"Sec-Fetch-User: ?1\r\n"
    b"Priority: u=0, i\r\n"
    b"\r\n"
)
# What nginx answers for a static file.
RESPONSE = bytearray(
    b"HTTP/1.1 200 OK\r\n"
    b"Server: nginx/1.22.1\r\n"
    b"Date: Sun, 06 Dec 2026 18:00:00 GMT\r\n"
    b"Content-Type: text/html\r\n"
    b"Content-Length: 18234\r\n"
    b"Last-Modified: Fri, 04 Dec 2026 09:12:44 GMT\r\n"
    b"Connection: keep-alive\r\n"
    b'ETag: "6751e1ac-473a"\r\n'
    b"Accept-Ranges: bytes\r\n"
    b"\r\n"
)


def one_request() -> None:
    """The http1 calls of HttpProxyServer for one exchange, in its order."""
    req = http1.parse_request_head(REQUEST)
    http1.request_body(req)
    http1.proxy_request_head(req, client_ip="192.0.2.10", proto="http", host_default="proxy:8080")
    http1.upgrade_to(req)
    resp = http1.parse_response_head(RESPONSE, request_method=req.method)
    http1.response_body(resp, req.method)
    keep = http1.upstream_keeps_alive(resp, req.method) and http1.request_keeps_alive(req)
    http1.proxy_response_head(resp, keep_alive=keep, request_version=req.version)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=7, help="timed reps (default 7)")
    parser.add_argument("--loops", type=int, default=5000, help="requests per rep (default 5000)")
    parser.add_argument(
        "--parser", choices=["auto", "h11", "httptools"], default="auto",
        help="the head parser (default auto: httptools when it imports, else h11)",
    )
    args = parser.parse_args()
    if args.reps < 1 or args.loops < 1:
        parser.error("--reps and --loops must be at least 1")
    used = http1.use_parser(args.parser)
    loops = range(args.loops)
    for _ in range(200):  # warm: the caches of the first request, the parser's import
        one_request()
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        for _ in loops:
            one_request()
        times.append((time.perf_counter() - t0) / args.loops * 1e6)
    print(
        f"parser {used}: {statistics.median(times):.1f} µs per request (median of {args.reps} "
        f"reps of {args.loops}; min {min(times):.1f}, max {max(times):.1f}; "
        f"Python {sys.version.split()[0]})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
