"""One stream through one splice, on loopback: throughput, and a process to strace.

    python bench/single_stream.py [--mib 2048] [--copy] [--pipe-size N]

The sender and the receiver run in a child process (``--role ends``), so the
measuring process holds only the splice: ``strace -f -c`` on it counts the
syscalls of the pool alone. Prints MiB/s, the CPU seconds per GiB the splicing
process spent (all its threads), and the pool's pass/wakeup counts.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import splicepool  # noqa: E402


def ends(mib: int, port_file: str) -> None:
    """Child: feed ``mib`` MiB into the proxy's source, drain its drain, report timing."""
    feed = socket.create_server(("127.0.0.1", 0))
    sink = socket.create_server(("127.0.0.1", 0))
    with open(port_file, "w") as f:
        json.dump([feed.getsockname()[1], sink.getsockname()[1]], f)
    a, _ = feed.accept()
    b, _ = sink.accept()
    total = mib << 20
    pid = os.fork()
    if pid == 0:  # the feeder
        buf = b"\x5a" * (1 << 20)
        for _ in range(mib):
            a.sendall(buf)
        a.shutdown(socket.SHUT_WR)
        os._exit(0)
    buf = bytearray(1 << 20)
    got = 0
    start = None
    while got < total:
        n = b.recv_into(buf)
        if not n:
            break
        if start is None:
            start = time.perf_counter()
        got += n
    elapsed = time.perf_counter() - (start or time.perf_counter())
    os.waitpid(pid, 0)
    print(json.dumps({"bytes": got, "seconds": elapsed}), flush=True)


def start_strace() -> tuple[subprocess.Popen[bytes], str]:
    """Attach ``strace -c`` to this process and all its threads (not the child)."""
    out = f"/tmp/splicepool-strace-{os.getpid()}.txt"
    proc = subprocess.Popen(["strace", "-c", "-f", "-o", out, "-p", str(os.getpid())],
                            stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let it attach before the splice starts
    return proc, out


def report_strace(proc: subprocess.Popen[bytes], out: str, moved: int) -> None:
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=30)
    mib = moved / 2**20
    rows = []
    for line in open(out):
        parts = line.split()
        if len(parts) >= 5 and parts[0][0].isdigit() and parts[-1] != "total":
            calls = int(parts[3])
            rows.append((calls, parts[-1]))
    os.unlink(out)
    total = sum(c for c, _ in rows)
    print(f"syscalls of the splicing process: {total} for {mib:.0f} MiB = {total / mib:.2f} per MiB")
    for calls, name in sorted(rows, reverse=True)[:8]:
        print(f"  {name:14} {calls:8}  {calls / mib:6.2f}/MiB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=2048)
    ap.add_argument("--copy", action="store_true", help="force the copy path")
    ap.add_argument("--pipe-size", type=int, default=1 << 20)
    ap.add_argument("--role", default="proxy", choices=["proxy", "ends"])
    ap.add_argument("--port-file", default="")
    ap.add_argument("--strace", action="store_true", help="count this process's syscalls per MiB")
    args = ap.parse_args()
    if args.role == "ends":
        ends(args.mib, args.port_file)
        return
    port_file = f"/tmp/splicepool-bench-{os.getpid()}.json"
    child = subprocess.Popen(
        [sys.executable, __file__, "--role", "ends", "--mib", str(args.mib), "--port-file", port_file],
        stdout=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 10
    while not os.path.exists(port_file) or not open(port_file).read():
        if time.monotonic() > deadline:
            raise SystemExit("the child did not start")
        time.sleep(0.01)
    feed_port, sink_port = json.load(open(port_file))
    os.unlink(port_file)
    src = socket.create_connection(("127.0.0.1", feed_port))
    dst = socket.create_connection(("127.0.0.1", sink_port))
    tracer = start_strace() if args.strace else None
    with splicepool.SplicePool(workers=1, zero_copy=False if args.copy else None, pipe_size=args.pipe_size) as pool:
        cpu = time.process_time()
        sp = pool.splice(src, dst)
        reason = sp.wait(120)
        cpu = time.process_time() - cpu
        stats = pool.stats()["workers"][0]
    if tracer is not None:
        report_strace(*tracer, sp.transferred)
    out, _ = child.communicate(timeout=60)
    result = json.loads(out)
    mib_s = result["bytes"] / result["seconds"] / 2**20
    print(
        f"{'copy' if args.copy else 'zero-copy'} pipe={args.pipe_size}: {result['bytes'] >> 20} MiB in "
        f"{result['seconds']:.2f} s = {mib_s:.0f} MiB/s; splicing CPU {cpu / (result['bytes'] / 2**30):.3f} s/GiB; "
        f"reason={reason.name} passes={stats['passes']} "
        f"wakeups={stats['wakeups']} transferred={sp.transferred}"
    )


if __name__ == "__main__":
    main()
