"""SOCKS5 through splicepool against pproxy: curl downloads the same bytes through each.

    python bench/socks_bench.py [--mib 1024] [--reps 5] [--json PATH]

An HTTP server on 127.0.0.1 (this script, in a thread: it writes its header, then the body
with os.sendfile from a file) serves ``--mib`` MiB; ``curl --socks5-hostname`` fetches it
to /dev/null through ``python -m splicepool socks`` and through ``pproxy -l socks5://``
(PyPI: pproxy, installed by ``make bench``), each proxy a process of its own, the reps
interleaved. Reported per proxy, as medians: MiB/s (curl's own speed_download) and the
proxy's CPU seconds (utime + stime of its process tree) per GiB moved, and the goals of
the SOCKS5 front door: ≥ 2× pproxy's MiB/s at ≤ 0.5× its CPU per GiB. A proxy whose
program is missing is skipped with a line saying what to install.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` and its children still running, from /proc."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(entry) == pid or int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def serve(body: Path, size: int) -> int:
    """An HTTP/1.0 server on 127.0.0.1 sending ``size`` bytes of ``body`` per request."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)

    def one(conn: socket.socket) -> None:
        with conn, open(body, "rb") as f:
            conn.recv(65536)  # the request: its content does not matter here
            conn.sendall(f"HTTP/1.0 200 OK\r\nContent-Length: {size}\r\n\r\n".encode())
            left = size
            while left:
                f.seek(0)
                sent = conn.sendfile(f, count=min(left, body.stat().st_size))
                left -= sent

    def loop() -> None:
        while True:
            conn, _ = lsock.accept()
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()
    return lsock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, port: int) -> subprocess.Popen | None:
    if name == "splicepool":
        cmd = [sys.executable, "-m", "splicepool", "socks", "--listen", f"127.0.0.1:{port}",
               "--allow-target", "127.0.0.0/8", "--log-level", "warning"]
    else:
        exe = shutil.which("pproxy") or str(Path(sys.executable).parent / "pproxy")
        if not Path(exe).exists():
            print("pproxy: skipped (pip install pproxy; make bench installs it)")
            return None
        cmd = [exe, "-l", f"socks5://127.0.0.1:{port}"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"{name} did not start")


def fetch(proxy_port: int, web_port: int) -> tuple[float, int]:
    """One download through the proxy: curl's MiB/s and the bytes it got."""
    done = subprocess.run(
        ["curl", "-sS", "--max-time", "300", "-o", "/dev/null", "-w", "%{speed_download} %{size_download}",
         "--socks5-hostname", f"127.0.0.1:{proxy_port}", f"http://127.0.0.1:{web_port}/"],
        capture_output=True, text=True, check=True,
    )
    speed, size = done.stdout.split()
    return float(speed) / 2**20, int(size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if shutil.which("curl") is None:
        raise SystemExit("curl is missing: apt-get install curl")
    size = args.mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(os.urandom(64 << 20))
        web = serve(body, size)
        procs = {}
        for name in ("splicepool", "pproxy"):
            port = free_port()
            proc = start(name, port)
            if proc is not None:
                procs[name] = (proc, port)
        runs: dict[str, list[tuple[float, float]]] = {name: [] for name in procs}
        try:
            for rep in range(args.reps):
                order = list(procs) if rep % 2 == 0 else list(reversed(procs))
                for name in order:
                    proc, port = procs[name]
                    before = cpu_seconds(proc.pid)
                    mibs, got = fetch(port, web)
                    cpu = (cpu_seconds(proc.pid) - before) / (got / 2**30)
                    assert got == size, (name, got, size)
                    runs[name].append((mibs, cpu))
                    print(f"[rep {rep + 1}/{args.reps}] {name:10s} {mibs:7.0f} MiB/s  CPU {cpu:.3f} s/GiB")
        finally:
            for proc, _ in procs.values():
                proc.terminate()
                proc.wait(10)
    med = {name: (statistics.median(r[0] for r in rs), statistics.median(r[1] for r in rs))
           for name, rs in runs.items()}
    print(f"\n## SOCKS5: curl --socks5-hostname, {args.mib} MiB per download, medians of {args.reps}\n")
    print("| proxy | MiB/s | proxy CPU per GiB, s |\n|---|---:|---:|")
    for name, (mibs, cpu) in med.items():
        print(f"| {name} | {mibs:.0f} | {cpu:.3f} |")
    if "pproxy" in med and "splicepool" in med:
        speed = med["splicepool"][0] / med["pproxy"][0]
        cpu = med["splicepool"][1] / med["pproxy"][1] if med["pproxy"][1] else float("inf")
        print(f"\n- MiB/s ÷ pproxy: {speed:.2f}, goal ≥ 2: {'met' if speed >= 2 else '**NOT met**'}")
        print(f"- CPU per GiB ÷ pproxy: {cpu:.2f}, goal ≤ 0.5: {'met' if cpu <= 0.5 else '**NOT met**'}")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "medians": med}, indent=1))


if __name__ == "__main__":
    main()
