"""A pure-Python HTTP/1.1 reverse proxy with aiohttp: the Python baseline of bench/http_bench.py.

    python bench/http_proxy_aiohttp.py --listen 127.0.0.1:8080 --connect 127.0.0.1:8000

One process, one asyncio event loop (as a Python proxy is usually run; aiohttp's C
HTTP parser when its wheel has it). The server side is aiohttp.web (keep-alive with
clients, no access log); each request goes upstream through one ClientSession whose
TCPConnector keeps connections alive (no limit on their number, idle ones kept 60 s).
The request body, if any, is streamed upstream; the response body is streamed back in
chunks of up to 256 KiB (``iter_chunked``), never whole in memory, and not
decompressed. Hop-by-hop headers (RFC 9110 §7.6.1) are dropped both ways; the
upstream's Content-Length is kept, so a response of known length goes out with it,
not chunked.
"""

from __future__ import annotations

import argparse

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

CHUNK = 256 * 1024
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "transfer-encoding", "upgrade",
})


def split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


def forwarded_headers(headers) -> dict[str, str]:
    """``headers`` minus the hop-by-hop ones and those its Connection names."""
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: dict[str, str] = {}
    for key, value in headers.items():
        k = key.lower()
        if k in HOP_BY_HOP or k in named:
            continue
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


def make_app(upstream: str) -> web.Application:
    base = f"http://{upstream}"

    async def start_session(app: web.Application) -> None:
        connector = TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=None)
        app["session"] = ClientSession(connector=connector, auto_decompress=False,
                                       timeout=ClientTimeout(total=None, sock_connect=10),
                                       skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close_session(app: web.Application) -> None:
        await app["session"].close()

    async def proxy(request: web.Request) -> web.StreamResponse:
        session: ClientSession = request.app["session"]
        headers = forwarded_headers(request.headers)
        body = request.content if request.body_exists else None
        async with session.request(request.method, base + request.rel_url.raw_path_qs,
                                   headers=headers, data=body, allow_redirects=False,
                                   compress=None, chunked=None) as upstream_resp:
            response = web.StreamResponse(status=upstream_resp.status, reason=upstream_resp.reason,
                                          headers=forwarded_headers(upstream_resp.headers))
            length = upstream_resp.headers.get("Content-Length")
            if length is not None:
                response.content_length = int(length)
            await response.prepare(request)
            async for chunk in upstream_resp.content.iter_chunked(CHUNK):
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application(client_max_size=1 << 40)
    app.router.add_route("*", "/{tail:.*}", proxy)
    app.on_startup.append(start_session)
    app.on_cleanup.append(close_session)
    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, metavar="HOST:PORT")
    ap.add_argument("--connect", required=True, metavar="HOST:PORT")
    args = ap.parse_args()
    host, port = split_hostport(args.listen)
    web.run_app(make_app(args.connect), host=host, port=port, access_log=None, print=None,
                backlog=1024, handle_signals=True, keepalive_timeout=300)


if __name__ == "__main__":
    main()
