"""Thread workers vs gevent worker greenlets vs gevent direct dispatch, side by side.

    python bench/backends.py [--reps 3] [--mib 1024] [--pings 5000]

Each measurement runs the relay in its own process (``--role relay``): a
``pool.proxy()`` between a client-facing and a server-facing connection. The
ends run in this process: a bulk sender and sink (throughput, and the relay
process's CPU seconds per GiB from /proc), and a 64-byte ping-pong through an
echo server (round-trip latency, p50 and p99). Repetitions are interleaved.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

MODES = ["thread", "gevent", "gevent-direct"]


def relay(mode: str, port_a: int, port_b: int) -> None:
    """Child: connect to both ends, relay them with the pool until both sides close."""
    if mode.startswith("gevent"):
        from gevent import monkey

        monkey.patch_all()
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import splicepool

    a = socket.create_connection(("127.0.0.1", port_a))
    b = socket.create_connection(("127.0.0.1", port_b))
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    kwargs: dict[str, str] = {}
    if mode.startswith("gevent"):
        kwargs = {"backend": "gevent", "dispatch": "direct" if mode == "gevent-direct" else "worker"}
    with splicepool.SplicePool(workers=1, **kwargs) as pool:
        pool.proxy(a, b).wait()


def _cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _start(mode: str) -> tuple[subprocess.Popen[bytes], socket.socket, socket.socket]:
    la = socket.create_server(("127.0.0.1", 0))
    lb = socket.create_server(("127.0.0.1", 0))
    child = subprocess.Popen(
        [sys.executable, __file__, "--role", "relay", "--mode", mode,
         str(la.getsockname()[1]), str(lb.getsockname()[1])]
    )
    a, _ = la.accept()
    b, _ = lb.accept()
    la.close()
    lb.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return child, a, b


def bulk(mode: str, mib: int) -> tuple[float, float]:
    """(MiB/s, relay CPU s per GiB) for ``mib`` MiB one way."""
    child, a, b = _start(mode)
    time.sleep(0.3)
    cpu0 = _cpu(child.pid)
    chunk = b"\x5a" * (1 << 20)

    def send() -> None:
        for _ in range(mib):
            a.sendall(chunk)
        a.shutdown(socket.SHUT_WR)

    t = threading.Thread(target=send)
    start = time.perf_counter()
    t.start()
    buf = bytearray(1 << 20)
    got = 0
    while got < mib << 20:
        n = b.recv_into(buf)
        if not n:
            break
        got += n
    elapsed = time.perf_counter() - start
    t.join()
    cpu = _cpu(child.pid) - cpu0
    b.close()
    a.close()
    child.wait(30)
    return got / elapsed / 2**20, cpu / (got / 2**30)


def pingpong(mode: str, pings: int) -> tuple[float, float]:
    """(p50, p99) round-trip microseconds of 64-byte messages through the relay."""
    child, a, b = _start(mode)

    def echo() -> None:
        while True:
            data = b.recv(64)
            if not data:
                b.close()
                return
            b.sendall(data)

    t = threading.Thread(target=echo)
    t.start()
    msg = b"p" * 64
    rtts = []
    for i in range(pings + 200):
        start = time.perf_counter()
        a.sendall(msg)
        got = 0
        while got < 64:
            got += len(a.recv(64 - got))
        if i >= 200:  # warm-up excluded
            rtts.append((time.perf_counter() - start) * 1e6)
    a.close()
    t.join()
    child.wait(30)
    rtts.sort()
    return rtts[len(rtts) // 2], rtts[int(len(rtts) * 0.99)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="bench")
    ap.add_argument("--mode", default="thread")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--pings", type=int, default=5000)
    ap.add_argument("ports", nargs="*", type=int)
    args = ap.parse_args()
    if args.role == "relay":
        relay(args.mode, *args.ports)
        return
    results: dict[str, dict[str, list[float]]] = {m: {"mib_s": [], "cpu": [], "p50": [], "p99": []} for m in MODES}
    for _ in range(args.reps):
        for mode in MODES:
            rate, cpu = bulk(mode, args.mib)
            p50, p99 = pingpong(mode, args.pings)
            r = results[mode]
            r["mib_s"].append(rate)
            r["cpu"].append(cpu)
            r["p50"].append(p50)
            r["p99"].append(p99)
    print(f"| backend | MiB/s (median of {args.reps}) | relay CPU s/GiB | RTT p50 us | RTT p99 us |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        r = {k: statistics.median(v) for k, v in results[mode].items()}
        print(f"| {mode} | {r['mib_s']:.0f} | {r['cpu']:.3f} | {r['p50']:.0f} | {r['p99']:.0f} |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
