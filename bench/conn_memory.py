"""What one idle proxied connection costs the proxy in Python memory, line by line.

    python bench/conn_memory.py [--conns 2000] [--top 20]

Runs the CLI's ProxyServer (on a SplicePool, as ``python -m splicepool proxy``
does) in this process in front of a holding upstream, opens ``--conns`` client
connections through it, and compares two ``tracemalloc`` snapshots taken
before and after: bytes and objects per connection, by the line of splicepool
that allocated them. The clients and the upstream live in this process too,
but only splicepool's own allocations are counted. Loopback only.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import socket
import sys
import threading
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from splicepool import SplicePool  # noqa: E402
from splicepool.server import ProxyServer  # noqa: E402

HOST = "127.0.0.1"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conns", type=int, default=2000, help="connections to hold (default 2000)")
    parser.add_argument("--top", type=int, default=20, help="lines to list (default 20)")
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if 4 * args.conns + 100 > hard:
        parser.error(f"--conns {args.conns}: 4 fds each (client, proxy's two, upstream) exceed {hard}")

    upstream = socket.create_server((HOST, 0), backlog=4096)
    held: list[socket.socket] = []

    def hold() -> None:
        while True:
            try:
                held.append(upstream.accept()[0])
            except OSError:
                return

    threading.Thread(target=hold, daemon=True).start()
    server = ProxyServer((HOST, 0), (HOST, upstream.getsockname()[1]), pool=SplicePool())
    threading.Thread(target=server.serve_forever, daemon=True).start()

    def open_held(n: int) -> list[socket.socket]:
        want = len(held) + n
        clients = [socket.create_connection(server.address[:2]) for _ in range(n)]
        deadline = time.monotonic() + 30
        while len(held) < want:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the upstream got {len(held)} of {want} connections")
            time.sleep(0.01)
        return clients

    for sock in open_held(100):  # workers started, pipes and buffers made: not per connection
        sock.close()
    time.sleep(1.0)
    gc.collect()
    tracemalloc.start(5)
    before = tracemalloc.take_snapshot()
    clients = open_held(args.conns)
    time.sleep(1.0)
    gc.collect()
    after = tracemalloc.take_snapshot()
    only = [tracemalloc.Filter(True, os.path.join("*", "splicepool", "*"))]
    stats = after.filter_traces(only).compare_to(before.filter_traces(only), "lineno")
    n = args.conns
    print(f"splicepool's Python memory per idle proxied connection: "
          f"{sum(s.size_diff for s in stats) / n:.0f} bytes ({n} connections)")
    for s in stats[: args.top]:
        frame = s.traceback[0]
        where = f"{os.path.relpath(frame.filename)}:{frame.lineno}"
        print(f"{s.size_diff / n:8.0f} B {s.count_diff / n:6.2f} objects  {where}")
    server.stop()
    for sock in clients:
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
