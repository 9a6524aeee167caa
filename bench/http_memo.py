"""``python -m splicepool http`` with each distinct head parsed once: what the session's own
steps cost per request, the heads' parsing taken out (issue 15's small-request figures).

    python bench/http_memo.py --listen HOST:PORT --connect HOST:PORT [splicepool http options]

Not a proxy to use: a head seen before (the same bytes) gets the answer ``splicepool.http1``
gave the first time, from a dict, for ``parse_request_head``, ``parse_response_head``,
``request_body``, ``proxy_request_head``, ``proxy_response_head``, ``upgrade_to`` and
``request_keeps_alive``. wrk sends one request head over and over, and nginx's response head
changes only with its Date, so nearly every parse is a lookup: ``bench/http_bench.py
--workloads small --splicepool-cmd "PYTHON bench/http_memo.py"`` then measures the loop, the
sessions and the syscalls without the parser.
"""

from __future__ import annotations

import runpy
import sys

from splicepool import http1


def _memo_head(parse):
    seen = {}

    def parse_seen(data, **options):
        raw = bytes(data)
        end = raw.find(b"\r\n\r\n")
        if end < 0:
            return parse(data, **options)
        key = (raw[: end + 4], tuple(sorted(options.items())))
        got = seen.get(key)
        if got is None:
            got = seen[key] = parse(data, **options)
        return got

    return parse_seen


def _memo(fn):
    seen = {}

    def fn_seen(head, **options):
        key = (head, tuple(sorted(options.items())))
        got = seen.get(key)
        if got is None:
            got = seen[key] = fn(head, **options)
        return got

    return fn_seen


def main() -> None:
    http1.parse_request_head = _memo_head(http1.parse_request_head)
    http1.parse_response_head = _memo_head(http1.parse_response_head)
    for name in ("request_body", "proxy_request_head", "proxy_response_head", "upgrade_to",
                 "request_keeps_alive"):
        setattr(http1, name, _memo(getattr(http1, name)))
    sys.argv = ["splicepool", "http", *sys.argv[1:]]
    runpy.run_module("splicepool", run_name="__main__")


if __name__ == "__main__":
    main()
