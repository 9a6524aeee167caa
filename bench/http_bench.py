"""HTTP/1.1 reverse proxies in front of one nginx: splicepool http, HAProxy, nginx, aiohttp (issue 15).

    python bench/http_bench.py [--quick] [--reps 3] [--peers direct,splicepool,...]
                               [--workloads small,large,large4] [--splicepool-args "..."]
                               [--splicepool-cmd "PYTHON -m splicepool http"] [--json PATH]

An upstream nginx (a child process, generated config in a temp dir, one process, sendfile
on, keep-alive for 10^6 requests) serves a 100-byte file and a 100 MiB file of random
bytes on 127.0.0.1. In front of it, each peer a process of its own on 127.0.0.1, started
afresh for each run and stopped after it:

* ``direct``: no proxy, the clients talk to the upstream nginx (the ceiling);
* ``splicepool``: ``python -m splicepool http --listen ... --connect ...`` (plus
  ``--splicepool-args``); run only when ``CMD --help`` exits 0. ``--splicepool-cmd`` runs
  another checkout's, e.g. ``"/work/main/.venv/bin/python -m splicepool http"``, from the
  temp dir so that this checkout's package is not the one imported;
* ``haproxy``: ``mode http``, keep-alive both sides (``http-reuse always``), bodies
  spliced (``option splice-request/splice-response``, 1 MiB pipes as splicepool's), 2 threads;
* ``nginx-proxy``: a second nginx, 2 workers, ``proxy_pass`` to an upstream block with
  ``keepalive 32`` over HTTP/1.1; ``proxy_buffering`` left at its default (on);
* ``nginx-unbuffered`` (only when named in ``--peers``): the same with ``proxy_buffering
  off`` and a 256 KiB ``proxy_buffer_size``, nginx's faster setting for large bodies;
* ``aiohttp``: bench/http_proxy_aiohttp.py, a pure-Python proxy (one event loop).

Workloads:

* ``small``: ``wrk -t1 -c50 --latency`` on the 100-byte file for 5 s (keep-alive):
  requests/s, latency p50/p99, the proxy's CPU per 1000 requests. Before it, curl fetches
  the file twice on one connection through the peer: both bodies must be byte-exact (sha256)
  and the connection kept, else the run is a failure, not a figure;
* ``large``: after one fetch that warms the peer up (not counted), one client (a Python
  http.client process) fetches the 100 MiB file 10 times over one keep-alive connection: MiB/s, and the proxy's CPU seconds (utime + stime of its
  process tree, from /proc) per GiB moved. The last body is compared with the file;
* ``large4``: the same with 4 concurrent clients, 5 fetches each.

Repetitions are interleaved (for each rep, each workload, every peer, the peer order
rotating); the medians are reported as markdown with ratios to haproxy and aiohttp, and
the goals of issue 15: large MiB/s ≥ 1× haproxy's, CPU per GiB ≤ 1× haproxy's, small
requests/s ≥ 3× aiohttp's. Raw results go to ``--json`` (default
bench/results/http-TIMESTAMP.json). A peer whose program is missing is skipped with a line
saying what to install. Every child process is stopped at the end, on error and Ctrl-C too.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from peers import (  # noqa: E402 (bench/ is not a package: the path first)
    HOST,
    cpu_seconds,
    cpu_times,
    free_port,
    machine_cpu,
    raise_nofile_limit,
    spawn,
    stop,
    stop_all,
    tail,
    wait_listening,
)

PEERS = ("direct", "splicepool", "haproxy", "nginx-proxy", "nginx-unbuffered", "aiohttp")
DEFAULT_PEERS = ("direct", "splicepool", "haproxy", "nginx-proxy", "aiohttp")
WORKLOADS = ("small", "large", "large4")
SMALL_BYTES = 100
LARGE_MIB = 100
MiB = 1 << 20
GiB = 1 << 30
HAPROXY_MAXCONN = 4096
HAPROXY_MAXPIPES = 64
INSTALL_APT = "apt-get install nginx-light haproxy wrk"
INSTALL_PIP = "pip install 'splicepool[bench]'"


@dataclass
class Settings:
    reps: int
    small_seconds: float
    wrk_conns: int
    large_count: int
    large4_clients: int
    large4_count: int
    splicepool_cmd: list[str]
    splicepool_args: list[str]
    splicepool_cwd: str
    workdir: str = ""
    files: dict = field(default_factory=dict)  # name → {"path", "size", "sha256"}


# --- programs ----------------------------------------------------------------------


def which(name: str) -> str | None:
    """``name`` on PATH, or in /usr/sbin and /usr/local/sbin (nginx and haproxy live there,
    which a non-root PATH may lack)."""
    return shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")


def loadavg() -> list[str]:
    """The 1, 5 and 15 minute load averages: how busy the machine was (others' work too)."""
    return Path("/proc/loadavg").read_text().split()[:3]


def version(argv: list[str]) -> str | None:
    if not which(argv[0]):
        return None
    try:
        done = subprocess.run([which(argv[0]), *argv[1:]], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else None


def splicepool_missing(s: Settings) -> str | None:
    """Why the splicepool peer cannot run (its ``--help`` does not exit 0), or None."""
    argv = [*s.splicepool_cmd, "--help"]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=s.splicepool_cwd)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`{shlex.join(argv)}` failed: {exc}"
    if done.returncode == 0:
        return None
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    where = "that command" if s.splicepool_cwd != str(ROOT) else "this checkout"
    return (f"`{shlex.join(argv)}` exited {done.returncode} ({last}): {where} has no `splicepool "
            "http`; point --splicepool-cmd at a checkout that has, e.g. "
            "--splicepool-cmd \"/work/main/.venv/bin/python -m splicepool http\"")


def peer_missing(name: str, s: Settings) -> str | None:
    """Why peer ``name`` cannot run here, or None."""
    if name == "splicepool":
        return splicepool_missing(s)
    if name == "haproxy" and not which("haproxy"):
        return f"haproxy is not installed ({INSTALL_APT})"
    if name.startswith("nginx") and not which("nginx"):
        return f"nginx is not installed ({INSTALL_APT})"
    if name == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        return f"aiohttp is not installed in {sys.executable} ({INSTALL_PIP}; make bench does)"
    return None


# --- the upstream and the peers ------------------------------------------------------


def nginx_common(d: Path) -> str:
    """The lines both nginx configs share: pid, temp paths, no access log, as root the
    workers stay root (the temp dir is 0700)."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    return f"""{user}daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; }}
"""


def nginx_temp_paths(d: Path) -> str:
    return "".join(f"    {kind}_temp_path {d}/{kind}_temp;\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))


def upstream_config(d: Path, port: int, www: Path) -> str:
    """One nginx process (no master) serving ``www``: sendfile, keep-alive for 10^6
    requests, and each response saying which request of its connection it answers
    (X-Connection-Requests: how the check tells whether a proxy reuses upstream connections)."""
    return nginx_common(d) + f"""master_process off;
http {{
    access_log off;
{nginx_temp_paths(d)}    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    tcp_nodelay on;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    open_file_cache max=16 inactive=300s;
    server {{
        listen {HOST}:{port} backlog=1024;
        root {www};
        add_header X-Connection-Requests $connection_requests;
    }}
}}
"""


def nginx_proxy_config(d: Path, port: int, upstream: int, unbuffered: bool = False) -> str:
    """nginx as a reverse proxy: 2 workers, HTTP/1.1 upstream connections kept (32 idle per
    worker), proxy_buffering at its default (on: 8 buffers of a page in memory, then a temp
    file); or ``unbuffered``: proxy_buffering off, each read from upstream up to 256 KiB
    (proxy_buffer_size; proxy_buffers and proxy_busy_buffers_size only to pass nginx's
    check that the busy buffers fit in them)."""
    tuning = ("""
            proxy_buffering off;
            proxy_buffer_size 256k;
            proxy_buffers 4 256k;
            proxy_busy_buffers_size 256k;""" if unbuffered else "")
    return nginx_common(d) + f"""worker_processes 2;
http {{
    access_log off;
{nginx_temp_paths(d)}    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream up {{
        server {HOST}:{upstream};
        keepalive 32;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {HOST}:{port} backlog=1024;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";{tuning}
        }}
    }}
}}
"""


def haproxy_config(port: int, upstream: int) -> str:
    """HTTP mode, keep-alive both sides, bodies spliced through 1 MiB pipes, 2 threads."""
    return f"""global
    nbthread 2
    maxconn {HAPROXY_MAXCONN}
    maxpipes {HAPROXY_MAXPIPES}
    tune.pipesize 1048576

defaults
    mode http
    option http-keep-alive
    option splice-request
    option splice-response
    http-reuse always
    maxconn {HAPROXY_MAXCONN}
    timeout connect 10s
    timeout client 300s
    timeout server 300s
    timeout http-request 30s
    timeout http-keep-alive 300s

frontend front
    bind {HOST}:{port}
    default_backend up

backend up
    server nginx {HOST}:{upstream}
"""


def start_nginx(d: Path, config: str, port: int) -> subprocess.Popen:
    d.mkdir(parents=True, exist_ok=True)
    conf = d / "nginx.conf"
    conf.write_text(config)
    log = str(d / "stderr.log")
    proc = spawn([which("nginx"), "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)], log,
                 stdin=subprocess.DEVNULL)
    try:
        wait_listening(port, proc, log)
    except BaseException:
        stop(proc)
        raise
    return proc


def make_files(workdir: Path) -> dict:
    """The two files the upstream serves, of random bytes, and their sha256."""
    www = workdir / "www"
    www.mkdir()
    files = {}
    for name, size in (("small", SMALL_BYTES), ("large", LARGE_MIB * MiB)):
        path = www / f"{name}.bin"
        data = os.urandom(size)
        path.write_bytes(data)
        files[name] = {"path": str(path), "url_path": f"/{path.name}", "size": size,
                       "sha256": hashlib.sha256(data).hexdigest()}
    return files


@dataclass
class Running:
    """A started peer: the port clients connect to, its process (None for direct)."""

    name: str
    port: int
    proc: subprocess.Popen | None
    log: str = ""

    def alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {tail(self.log)}")


def peer_argv(name: str, s: Settings, port: int, upstream: int, d: Path) -> tuple[list[str], str]:
    """The argv of peer ``name`` listening on ``port`` in front of ``upstream``, and its cwd."""
    listen, connect = f"{HOST}:{port}", f"{HOST}:{upstream}"
    if name == "splicepool":
        return ([*s.splicepool_cmd, "--listen", listen, "--connect", connect, *s.splicepool_args],
                s.splicepool_cwd)
    if name == "haproxy":
        cfg = d / "haproxy.cfg"
        cfg.write_text(haproxy_config(port, upstream))
        return [which("haproxy"), "-db", "-f", str(cfg)], str(d)
    if name == "aiohttp":
        return ([sys.executable, str(HERE / "http_proxy_aiohttp.py"), "--listen", listen,
                 "--connect", connect], str(d))
    raise ValueError(name)


@contextlib.contextmanager
def running(name: str, s: Settings, upstream: int):
    """Peer ``name`` started in front of ``upstream`` for the block, stopped after it."""
    if name == "direct":
        yield Running(name, upstream, None)
        return
    port = free_port()
    d = Path(s.workdir) / f"{name}-{port}"
    if name.startswith("nginx"):
        proc = start_nginx(d, nginx_proxy_config(d, port, upstream, name == "nginx-unbuffered"), port)
        peer = Running(name, port, proc, str(d / "error.log"))
    else:
        d.mkdir(parents=True)
        argv, cwd = peer_argv(name, s, port, upstream, d)
        log = str(d / "stderr.log")
        proc = spawn(argv, log, cwd=cwd, stdin=subprocess.DEVNULL)
        peer = Running(name, port, proc, log)
        try:
            wait_listening(port, proc, log)
        except BaseException:
            stop(proc)
            raise
    try:
        yield peer
    finally:
        stop(peer.proc)


# --- checks and workloads --------------------------------------------------------------


def check_small(peer: Running, s: Settings) -> dict:
    """curl fetches the small file twice on one connection through ``peer``: each body must
    be the file's bytes, and curl must have connected once (keep-alive on the client side).
    Returns which request of its upstream connection the second one was (> 1: the proxy
    kept its upstream connection)."""
    f = s.files["small"]
    d = Path(s.workdir)
    url = f"http://{HOST}:{peer.port}{f['url_path']}"
    bodies = [d / f"check-{peer.name}-{i}" for i in (1, 2)]
    heads = d / f"check-{peer.name}-heads"
    for p in [*bodies, heads]:
        p.unlink(missing_ok=True)
    done = subprocess.run(["curl", "-sS", "--max-time", "20", "-D", str(heads),
                           "-o", str(bodies[0]), "-o", str(bodies[1]), "-w", "%{num_connects} ",
                           url, url], capture_output=True, text=True, timeout=30)
    if done.returncode:
        raise RuntimeError(f"curl through {peer.name}: exit {done.returncode}: {done.stderr.strip()}")
    for p in bodies:
        got = hashlib.sha256(p.read_bytes()).hexdigest()
        if got != f["sha256"]:
            raise RuntimeError(f"{peer.name} returned wrong bytes for {f['url_path']}: "
                               f"{p.stat().st_size} bytes, sha256 {got[:16]}… "
                               f"(the file: {f['size']} bytes, {f['sha256'][:16]}…)")
    connects = sum(int(n) for n in done.stdout.split())
    if connects != 1:
        raise RuntimeError(f"{peer.name}: curl connected {connects} times for 2 requests "
                           "(no keep-alive with the client)")
    reqs = re.findall(r"^x-connection-requests:\s*(\d+)", heads.read_text(), re.M | re.I)
    return {"client_keepalive": True, "upstream_request_no": int(reqs[-1]) if reqs else None}


def to_ms(text: str) -> float:
    """A wrk duration (``812.00us``, ``1.23ms``, ``2.00s``, ``1.00m``) in milliseconds."""
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"wrk duration {text!r}")
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}[m.group(2)]
    return float(m.group(1)) * scale


def parse_wrk(out: str) -> dict:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", out, re.M)
    total = re.search(r"^\s*(\d+) requests in ([\d.]+\w+)", out, re.M)
    if not rps or not total:
        raise RuntimeError(f"wrk output not understood: {out.strip()[-300:]!r}")
    quantiles = dict(re.findall(r"^\s+(50|99)(?:\.0+)?%\s+(\S+)", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "req_s": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": to_ms(quantiles["50"]),
        "p99_ms": to_ms(quantiles["99"]),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(int(x) for x in sock.groups()) if sock else 0,
    }


def run_small(peer: Running, upstream: Running, s: Settings) -> dict:
    check = check_small(peer, s)
    url = f"http://{HOST}:{peer.port}{s.files['small']['url_path']}"
    argv = ["wrk", "-t1", f"-c{s.wrk_conns}", f"-d{s.small_seconds:g}s", "--latency", url]
    cpu0 = cpu_seconds(peer.proc.pid) if peer.proc else None
    up0 = cpu_seconds(upstream.proc.pid)
    busy0, total0 = machine_cpu()
    done = subprocess.run(argv, capture_output=True, text=True, timeout=s.small_seconds + 60)
    busy1, total1 = machine_cpu()
    peer.alive()
    if done.returncode:
        raise RuntimeError(f"wrk: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    v = parse_wrk(done.stdout)
    if v["non_2xx"]:
        raise RuntimeError(f"{v['non_2xx']} of {v['requests']} responses were not 2xx/3xx")
    kreq = v["requests"] / 1000
    if cpu0 is not None:
        v["cpu_ms_per_kreq"] = (cpu_seconds(peer.proc.pid) - cpu0) * 1000 / kreq
    v["upstream_cpu_ms_per_kreq"] = (cpu_seconds(upstream.proc.pid) - up0) * 1000 / kreq
    v["machine_busy_pct"] = 100 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else None
    v.update(check)
    return v


def fetch_large(peer: Running, s: Settings, clients: int, count: int) -> dict:
    """Run the client: ``clients`` keep-alive connections each fetching the large file
    ``count`` times; what it reports."""
    f = s.files["large"]
    argv = [sys.executable, str(Path(__file__).resolve()), "_client", "--port", str(peer.port),
            "--path", f["url_path"], "--expect", f["path"], "--clients", str(clients),
            "--count", str(count)]
    mib = clients * count * f["size"] / MiB
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60 + mib / 20)
    peer.alive()
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        out = {"error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    if done.returncode or "error" in out:
        raise RuntimeError(f"client: {out.get('error')}")
    return out


def run_large(peer: Running, upstream: Running, s: Settings, clients: int, count: int) -> dict:
    """One fetch of the large file to warm the peer up (not counted: a fresh proxy may set
    up workers, pipes and upstream connections on its first body), then ``clients``
    keep-alive connections each fetching it ``count`` times, measured."""
    f = s.files["large"]
    fetch_large(peer, s, 1, 1)
    cpu0 = cpu_times(peer.proc.pid) if peer.proc else None
    up0 = cpu_seconds(upstream.proc.pid)
    busy0, total0 = machine_cpu()
    out = fetch_large(peer, s, clients, count)
    busy1, total1 = machine_cpu()
    if out["verified"] != clients or out["sha256"] != f["sha256"]:
        raise RuntimeError(f"{peer.name} returned wrong bytes for {f['url_path']}: the last body of "
                           f"{clients - out['verified']} of {clients} connections differs from the file "
                           f"(sha256 {out['sha256'][:16]}…, the file's {f['sha256'][:16]}…)")
    gib = out["bytes"] / GiB
    v = {"mib_s": out["mib_s"], "bytes": out["bytes"], "seconds": out["seconds"],
         "reconnects": out["reconnects"], "verified_bodies": out["verified"]}
    if cpu0 is not None:
        cpu, user = cpu_times(peer.proc.pid)
        v["cpu_s_per_gib"] = (cpu - cpu0[0]) / gib
        v["user_s_per_gib"] = (user - cpu0[1]) / gib
    v["upstream_cpu_s_per_gib"] = (cpu_seconds(upstream.proc.pid) - up0) / gib
    v["machine_busy_pct"] = 100 * (busy1 - busy0) / (total1 - total0) if total1 > total0 else None
    v["machine_cpu_s_per_gib"] = (busy1 - busy0) / gib
    return v


def run_workload(workload: str, peer: Running, upstream: Running, s: Settings) -> dict:
    if workload == "small":
        return run_small(peer, upstream, s)
    if workload == "large":
        return run_large(peer, upstream, s, 1, s.large_count)
    return run_large(peer, upstream, s, s.large4_clients, s.large4_count)


def summary(workload: str, v: dict) -> str:
    if workload == "small":
        cpu = f", CPU {v['cpu_ms_per_kreq']:.1f} ms/1000 req" if "cpu_ms_per_kreq" in v else ""
        errors = f", {v['socket_errors']} socket errors" if v["socket_errors"] else ""
        return f"{v['req_s']:.0f} req/s, p50 {v['p50_ms']:.2f} ms, p99 {v['p99_ms']:.2f} ms{cpu}{errors}"
    cpu = (f", CPU {v['cpu_s_per_gib']:.3f} s/GiB (user {v['user_s_per_gib']:.3f})"
           if "cpu_s_per_gib" in v else "")
    again = f", {v['reconnects']} reconnects" if v["reconnects"] else ""
    return f"{v['mib_s']:.0f} MiB/s{cpu}{again}"


# --- the client of the large workloads (run as a child: bench/http_bench.py _client) ----


def client_main(argv: list[str]) -> int:
    """Fetch ``--path`` ``--count`` times on each of ``--clients`` keep-alive connections
    (threads), each body read into a buffer with readinto; print one JSON object: bytes,
    seconds (first request to last body), MiB/s, how many connections' last body was the
    file's bytes, and a sha256 of one last body (one that differs, if any)."""
    import http.client
    import threading

    ap = argparse.ArgumentParser(prog="http_bench.py _client")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--expect", required=True, help="the file served: its size and bytes")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--count", type=int, default=10)
    args = ap.parse_args(argv)
    expected = Path(args.expect).read_bytes()
    size = len(expected)
    barrier = threading.Barrier(args.clients)
    results: list[dict] = [{} for _ in range(args.clients)]

    def fetch(i: int) -> None:
        res = results[i]
        try:
            buf = bytearray(size)
            buf[:] = bytes(size)  # fault every page in before the clock starts
            view = memoryview(buf)
            conn = http.client.HTTPConnection(HOST, args.port, timeout=60)
            conn.connect()
            barrier.wait(30)
            res["start"] = time.perf_counter()
            moved = reconnects = 0
            for _ in range(args.count):
                conn.request("GET", args.path)
                resp = conn.getresponse()
                if resp.status != 200:
                    raise RuntimeError(f"HTTP {resp.status} {resp.reason}")
                n = 0
                while n < size:
                    got = resp.readinto(view[n:])
                    if not got:
                        break
                    n += got
                if n != size or resp.read():
                    raise RuntimeError(f"a body of {n}+ bytes, not {size}")
                moved += n
                reconnects += resp.will_close
            res["end"] = time.perf_counter()
            conn.close()
            res.update(bytes=moved, reconnects=reconnects,
                       sha256=hashlib.sha256(buf).hexdigest(), same=buf == expected)
        except BaseException as exc:  # reported in the JSON; the barrier must not hang the rest
            res["error"] = f"{exc.__class__.__name__}: {exc}"
            barrier.abort()

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(args.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        print(json.dumps({"error": errors[0]}))
        return 1
    seconds = max(r["end"] for r in results) - min(r["start"] for r in results)
    moved = sum(r["bytes"] for r in results)
    print(json.dumps({
        "bytes": moved, "seconds": seconds, "mib_s": moved / MiB / seconds,
        "reconnects": sum(r["reconnects"] for r in results),
        "verified": sum(r["same"] for r in results),
        "sha256": next((r["sha256"] for r in results if not r["same"]), results[0]["sha256"]),
    }))
    return 0


# --- the report -----------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    workload: str
    field: str
    label: str
    fmt: str
    ratios: bool = False  # gets rows of ratios to haproxy and aiohttp


def metrics(s: Settings) -> list[Metric]:
    c = s.large4_clients
    return [
        Metric("small", "req_s", f"small ({SMALL_BYTES} B, wrk -c{s.wrk_conns}): requests/s", "{:.0f}", True),
        Metric("small", "p50_ms", "small: latency p50, ms", "{:.2f}"),
        Metric("small", "p99_ms", "small: latency p99, ms", "{:.2f}"),
        Metric("small", "cpu_ms_per_kreq", "small: proxy CPU per 1000 requests, ms", "{:.1f}", True),
        Metric("large", "mib_s", f"large ({LARGE_MIB} MiB × {s.large_count}, 1 client): MiB/s", "{:.0f}",
               True),
        Metric("large", "cpu_s_per_gib", "large: proxy CPU per GiB, s", "{:.3f}", True),
        Metric("large", "user_s_per_gib", "large: of which in user mode, s", "{:.3f}", True),
        Metric("large", "upstream_cpu_s_per_gib", "large: upstream nginx's CPU per GiB, s", "{:.3f}"),
        Metric("large4", "mib_s", f"large, {c} clients × {s.large4_count}: MiB/s", "{:.0f}", True),
        Metric("large4", "cpu_s_per_gib", f"large, {c} clients: proxy CPU per GiB, s", "{:.3f}", True),
        Metric("large4", "user_s_per_gib", f"large, {c} clients: of which in user mode, s", "{:.3f}", True),
    ]


GOALS = (  # (label, workload, field, versus, op, target, unit): issue 15
    ("large MiB/s ÷ haproxy", "large", "mib_s", "haproxy", ">=", 1.0, "{:.0f} MiB/s"),
    ("large proxy CPU per GiB ÷ haproxy", "large", "cpu_s_per_gib", "haproxy", "<=", 1.0, "{:.3f} s/GiB"),
    ("small requests/s ÷ aiohttp", "small", "req_s", "aiohttp", ">=", 3.0, "{:.0f} req/s"),
)


def medians(runs: list[dict], peers: list[str], ms: list[Metric]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {p: {} for p in peers}
    for p in peers:
        for m in ms:
            vals = [r["values"][m.field] for r in runs if r["peer"] == p and r["workload"] == m.workload
                    and r.get("values") and r["values"].get(m.field) is not None]
            if vals:
                out[p][f"{m.workload}.{m.field}"] = statistics.median(vals)
                out[p][f"{m.workload}.{m.field}.range"] = (min(vals), max(vals))
    return out


def table(rows: list[list[str]], header: list[str]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(runs: list[dict], peers: list[str], s: Settings, ms: list[Metric]) -> tuple[str, dict]:
    med = medians(runs, peers, ms)
    workloads = {r["workload"] for r in runs}
    shown = [m for m in ms if m.workload in workloads]
    out = [f"## HTTP/1.1 reverse proxies in front of nginx: medians of {s.reps}", ""]

    def cell(p: str, key: str, fmt: str) -> str:
        return fmt.format(med[p][key]) if key in med[p] else "—"

    out.append(table([[m.label] + [cell(p, f"{m.workload}.{m.field}", m.fmt) for p in peers]
                      for m in shown], ["median", *peers]))
    if s.reps > 1:
        out += ["", "Spread (min–max of the reps):", ""]
        rows = []
        for m in shown:
            key = f"{m.workload}.{m.field}.range"
            rows.append([m.label] + [(m.fmt + "–" + m.fmt).format(*med[p][key]) if key in med[p] else "—"
                                     for p in peers])
        out.append(table(rows, ["min–max", *peers]))
    rows = []
    for versus in ("haproxy", "aiohttp"):
        if versus not in peers:
            continue
        for m in shown:
            if not m.ratios:
                continue
            key = f"{m.workload}.{m.field}"
            base = med[versus].get(key)
            rows.append([f"{m.label} ÷ {versus}"] + [
                f"{med[p][key] / base:.2f}" if base and key in med[p] else "—" for p in peers])
    if rows:
        out += ["", table(rows, ["ratio", *peers])]
    out += ["", "Goals of issue 15 (splicepool ÷ peer, medians):", ""]
    goals = []
    for label, workload, fld, versus, op, target, unit in GOALS:
        key = f"{workload}.{fld}"
        mine, theirs = med.get("splicepool", {}).get(key), med.get(versus, {}).get(key)
        if theirs is None:
            out.append(f"- {label} {'≥' if op == '>=' else '≤'} {target:g}: {versus} not measured")
            continue
        need = theirs * target
        if mine is None:
            out.append(f"- {label} {'≥' if op == '>=' else '≤'} {target:g}: splicepool not measured "
                       f"(it would need {'≥' if op == '>=' else '≤'} {unit.format(need)} in this run)")
            continue
        ratio = mine / theirs
        met = ratio >= target if op == ">=" else ratio <= target
        goals.append({"goal": label, "ratio": ratio, "target": target, "op": op, "met": met})
        out.append(f"- {label}: {ratio:.2f} ({unit.format(mine)} against {unit.format(theirs)}), "
                   f"goal {'≥' if op == '>=' else '≤'} {target:g}: {'met' if met else '**NOT met**'}")
    failed = [r for r in runs if r.get("error")]
    if failed:
        out += ["", "Failed runs:", ""]
        out += [f"- rep {r['rep'] + 1} {r['workload']} {r['peer']}: {r['error']}" for r in failed]
    data = {"medians": {p: {k: v for k, v in d.items() if not k.endswith(".range")} for p, d in med.items()},
            "goals": goals}
    return "\n".join(out), data


# --- the run ------------------------------------------------------------------------


def describe(name: str, s: Settings) -> str:
    """How peer ``name`` runs, for the report."""
    if name == "direct":
        return "none: wrk and the client talk to the upstream nginx itself"
    if name.startswith("nginx"):
        buffering = "proxy_buffering off, 256 KiB" if name == "nginx-unbuffered" else "proxy_buffering on (default)"
        return f"nginx -c nginx.conf: 2 workers, proxy_pass to an upstream block with keepalive 32, {buffering}"
    if name == "haproxy":
        return "haproxy -db -f haproxy.cfg: mode http, splice-request/response, 1 MiB pipes, nbthread 2"
    listen, connect = f"{HOST}:PORT", f"{HOST}:UPSTREAM"
    if name == "splicepool":
        argv = [*s.splicepool_cmd, "--listen", listen, "--connect", connect, *s.splicepool_args]
    else:
        argv = [sys.executable, "bench/http_proxy_aiohttp.py", "--listen", listen, "--connect", connect]
    return shlex.join(argv).replace(sys.executable, "python")


def benchmark(peers: list[str], workloads: list[str], s: Settings, upstream: Running) -> list[dict]:
    runs = []
    for rep in range(s.reps):
        order = peers[rep % len(peers):] + peers[:rep % len(peers)]
        for workload in workloads:
            for name in order:
                tag = f"[rep {rep + 1}/{s.reps}] {workload:<6} {name:<16}"
                record = {"rep": rep, "workload": workload, "peer": name, "values": None}
                runs.append(record)
                began = time.monotonic()
                try:
                    upstream.alive()
                    with running(name, s, upstream.port) as peer:
                        record["values"] = run_workload(workload, peer, upstream, s)
                except Exception as exc:
                    record["error"] = f"{exc.__class__.__name__}: {exc}"
                    print(f"{tag} FAILED: {record['error']}", flush=True)
                    continue
                finally:
                    record["seconds"] = round(time.monotonic() - began, 2)
                print(f"{tag} {summary(workload, record['values'])}  ({record['seconds']:.1f} s)", flush=True)
    return runs


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: 1 rep, wrk for 1 s, 2 large fetches, 4 clients × 1")
    ap.add_argument("--reps", type=int, help="repetitions, interleaved; medians reported (default 3)")
    ap.add_argument("--peers", default=",".join(DEFAULT_PEERS),
                    help=f"comma-separated, from {', '.join(PEERS)} (default: all but nginx-unbuffered)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated, from {', '.join(WORKLOADS)}")
    ap.add_argument("--small-seconds", type=float, help="seconds of each wrk run (default 5)")
    ap.add_argument("--large-count", type=int, help="fetches of the 100 MiB file by the one client "
                    "(default 10; the 4 clients fetch half as many each)")
    ap.add_argument("--splicepool-cmd", default=None, metavar="CMD",
                    help="the command of the splicepool peer, to which --listen/--connect are "
                    "appended (default: this interpreter's `-m splicepool http`, run in this "
                    "checkout); e.g. \"/work/main/.venv/bin/python -m splicepool http\", run "
                    "from the temp dir")
    ap.add_argument("--splicepool-args", default="--log-level warning", metavar="ARGS",
                    help='extra arguments for `splicepool http`, e.g. "--workers 1" (default: '
                    '"--log-level warning": no access-log line per request, as the other peers '
                    'run: nginx with access_log off, HAProxy with no log, aiohttp without its '
                    'access logger)')
    ap.add_argument("--json", metavar="PATH",
                    help="raw results (default bench/results/http-TIMESTAMP.json)")
    args = ap.parse_args()
    for opt, valid in (("peers", PEERS), ("workloads", WORKLOADS)):
        unknown = set(getattr(args, opt).split(",")) - set(valid)
        if unknown:
            ap.error(f"--{opt}: unknown {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        return client_main(sys.argv[2:])
    args = parse_args()
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started in the background
    raise_nofile_limit()
    if not which("nginx"):  # not an error: `make bench` goes on without this part
        print(f"http_bench: skipped: nginx, the upstream of every peer, is not installed ({INSTALL_APT})")
        return 0
    wanted = args.workloads.split(",")
    for tool in ("wrk", "curl"):
        if "small" in wanted and not which(tool):
            print(f"small: skipped: {tool} is not installed ({INSTALL_APT} curl)")
            wanted.remove("small")
            break
    quick = args.quick
    large_count = args.large_count or (2 if quick else 10)
    with tempfile.TemporaryDirectory(prefix="splicepool-http-bench-") as workdir:
        s = Settings(
            reps=args.reps or (1 if quick else 3),
            small_seconds=args.small_seconds or (1.0 if quick else 5.0),
            wrk_conns=50,
            large_count=large_count,
            large4_clients=4,
            large4_count=max(1, large_count // 2),
            splicepool_cmd=(shlex.split(args.splicepool_cmd) if args.splicepool_cmd
                            else [sys.executable, "-m", "splicepool", "http"]),
            splicepool_args=shlex.split(args.splicepool_args),
            splicepool_cwd=workdir if args.splicepool_cmd else str(ROOT),
            workdir=workdir,
        )
        info = {
            "nproc": len(os.sched_getaffinity(0)),
            "loadavg_start": loadavg(),
            "python": sys.version.split()[0],
            **{tool: version(argv) for tool, argv in (("nginx", ["nginx", "-v"]), ("haproxy", ["haproxy", "-v"]),
                                                      ("wrk", ["wrk", "-v"]), ("curl", ["curl", "--version"]))},
        }
        with contextlib.suppress(ImportError):
            import aiohttp
            info["aiohttp"] = aiohttp.__version__
        peers = []
        for name in (p for p in PEERS if p in args.peers.split(",")):
            reason = peer_missing(name, s)
            if reason:
                print(f"{name}: skipped: {reason}")
            else:
                peers.append(name)
        workloads = [w for w in WORKLOADS if w in wanted]
        print("# HTTP/1.1 reverse proxies in front of nginx (127.0.0.1)\n")
        print(f"- command: `{shlex.join(sys.orig_argv)}`")
        print(f"- machine: {info['nproc']} CPUs, load average at start {' '.join(info['loadavg_start'])}; "
              f"Python {info['python']}, aiohttp {info.get('aiohttp', '—')}")
        print("- tools: " + "; ".join(f"{info[t]}" for t in ("nginx", "haproxy", "wrk")))
        for name in peers:
            print(f"- {name}: `{describe(name, s)}`")
        print(flush=True)
        runs: list[dict] = []
        try:
            s.files = make_files(Path(workdir))
            port = free_port()
            d = Path(workdir) / "upstream"
            proc = start_nginx(d, upstream_config(d, port, Path(workdir) / "www"), port)
            upstream = Running("upstream nginx", port, proc, str(d / "error.log"))
            runs = benchmark(peers, workloads, s, upstream)
        finally:
            stop_all()
        info["loadavg_end"] = loadavg()
        text, data = report(runs, peers, s, metrics(s))
        print()
        print(text)
        print(f"\nload average at the end: {' '.join(info['loadavg_end'])} (figures taken on a busy "
              "machine are noisy: re-take them on a quiet one)")
        path = Path(args.json) if args.json else HERE / "results" / time.strftime("http-%Y%m%d-%H%M%S.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        settings = {k: v for k, v in asdict(s).items() if k not in ("workdir",)}
        path.write_text(json.dumps({"command": sys.orig_argv, "machine": info, "settings": settings,
                                    "peers": {p: describe(p, s) for p in peers},
                                    "seconds": round(time.monotonic() - began, 1), "runs": runs, **data},
                                   indent=1))
        print(f"took {(time.monotonic() - began) / 60:.1f} min; raw reps and medians: {path}")
    return 1 if any(r.get("error") for r in runs) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted: every child process stopped", file=sys.stderr)
        sys.exit(130)
