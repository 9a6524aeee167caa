"""splicepool's proxy against other TCP relays: the same workloads through each, on loopback.

    python bench/compare.py [--quick] [--reps 3] [--peers direct,splicepool,...]
                            [--workloads bulk1,bulk4,latency,conns,idle]
                            [--splicepool-args "..."] [--variant NAME="ARGS" ...]
                            [--tree NAME=PATH ...]
    python bench/compare.py --profile OUT.svg [--profile-seconds 10]

Peers (each a separate process listening on 127.0.0.1, forwarding to an upstream):
``direct`` (no relay: the ceiling), ``splicepool`` (``python -m splicepool proxy``,
plus one column per ``--variant``, and per ``--tree``: the proxy of another
checkout, e.g. a commit before a change, measured in the same interleaved
run), ``thread`` (bench/relay_thread.py),
``asyncio`` (bench/relay_asyncio.py), ``haproxy`` (tcp mode, splice-auto) and
``socat`` (fork per connection). A peer whose binary is missing is skipped.

Workloads (the ends are separate processes, bench/loadgen.py or iperf3):

* bulk1, bulk4: throughput of 1 and 4 parallel streams for ``--duration``
  seconds (iperf3 when installed, else a Python sender and sink), and the
  relay's CPU seconds (utime + stime from /proc/PID/stat, its whole process
  tree) per GiB moved.
* latency: round trips of a 64-byte message through an echo server on one
  connection, p50 and p99, and what the relay adds to direct's in the same rep.
* conns: ``--conns`` connections, 50 at a time, each sending 64 KiB of
  distinct bytes and checking the echo; wall time and errors.
* idle: ``--idle-conns`` idle connections held through the relay (clients in
  one process, the upstream holding them in another); the relay's RSS and
  open fds before and with them, and whether it drops back once they close.

Repetitions are interleaved (for each rep, each workload, every peer back to
back, the peer order rotating), and the median of the reps is reported: one
table of medians, one of splicepool ÷ each other peer, and the goals. Raw reps
and medians go to ``--json`` (default bench/results/compare-TIMESTAMP.json).

``--profile OUT.svg`` instead runs a 1-stream bulk load through the splicepool
proxy and records it with ``py-spy record --native``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import select
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from peers import (
    HAPROXY_MAXPIPES,
    HERE,
    HOST,
    KINDS,
    Peer,
    child_setup,
    cpu_times,
    free_port,
    haproxy_maxconn,
    machine_cpu,
    raise_nofile_limit,
    spawn,
    stop,
    stop_all,
    tail,
    usage,
    wait_listening,
    wait_single,
)

WORKLOADS = ("bulk1", "bulk4", "latency", "conns", "rate", "idle")
MiB = 1 << 20
GiB = 1 << 30
IDLE_BATCH = 250  # idle connections opened at once, before waiting for the relay to catch up
IDLE_WARMUP = 100  # connections opened and closed before the idle baseline is taken
FDS_SLACK = 8  # fds a relay may keep after its connections close (pooled pipes, lazy workers)
LOADGEN = os.path.join(HERE, "loadgen.py")


@dataclass
class Settings:
    reps: int
    duration: float
    bulk_tool: str
    latency_warmup: int
    latency_count: int
    conns: int
    conns_concurrency: int
    conns_size: int
    rate_seconds: float
    idle_conns: int
    pin_latency: bool
    workdir: str = ""

    @property
    def latency_cpus(self) -> set[int] | None:
        """Where the latency workload's three processes run: one CPU, or anywhere."""
        return {max(os.sched_getaffinity(0))} if self.pin_latency else None


# --- child processes -----------------------------------------------------------


class Child:
    """A process answering on stdout with one JSON object per line (a loadgen role)."""

    def __init__(self, argv: list[str], log_path: str, cpus: set[int] | None = None) -> None:
        self.log_path = log_path
        self.proc = spawn(argv, log_path, cpus, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self._buf = b""

    def read(self, timeout: float) -> dict:
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:g} s")
            if select.select([fd], [], [], left)[0]:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited: {tail(self.log_path)}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def ask(self, line: str, timeout: float = 30.0) -> dict:
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        return self.read(timeout)

    @property
    def name(self) -> str:
        return " ".join(os.path.basename(arg) for arg in self.proc.args[1:3])


@contextlib.contextmanager
def loadgen(args: list[str], s: Settings, cpus: set[int] | None = None) -> Iterator[Child]:
    child = Child([sys.executable, LOADGEN, *args], os.path.join(s.workdir, f"loadgen-{args[0]}.log"),
                  cpus)
    try:
        yield child
    finally:
        stop(child.proc)


@contextlib.contextmanager
def upstream_server(mode: str, s: Settings, cpus: set[int] | None = None) -> Iterator[tuple[Child, int]]:
    """A loadgen server (echo, sink or hold) and its port."""
    with loadgen(["server", "--mode", mode], s, cpus) as server:
        yield server, server.read(10)["port"]


def run_json(argv: list[str], timeout: float, cpus: set[int] | None = None) -> dict:
    """Run a client to completion; the JSON object it printed (loadgen, iperf3 -J)."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=child_setup(cpus))
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        out = None
    if done.returncode or not isinstance(out, dict) or "error" in out:
        err = (out or {}).get("error") or (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"{shlex.join(argv[:3])}: exit {done.returncode}: {err}")
    return out


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


# --- workloads -----------------------------------------------------------------


@contextlib.contextmanager
def bulk_upstream(s: Settings) -> Iterator[int]:
    """The receiving end of a bulk run: a one-test ``iperf3 -s``, or a loadgen sink; its port."""
    if s.bulk_tool == "iperf3":
        port = free_port()
        log_path = os.path.join(s.workdir, "iperf3-server.log")
        proc = spawn(["iperf3", "-s", "-1", "-B", HOST, "-p", str(port)], log_path)
        try:
            wait_listening(port, proc, log_path)
            yield port
        finally:
            stop(proc)
    else:
        with upstream_server("sink", s) as (_, port):
            yield port


def bulk_client(port: int, streams: int, seconds: float, s: Settings) -> list[str]:
    if s.bulk_tool == "iperf3":
        return ["iperf3", "-c", HOST, "-p", str(port), "-t", f"{seconds:g}", "-P", str(streams),
                "-l", "1M", "-J"]
    return [sys.executable, LOADGEN, "bulk", "--port", str(port), "--streams", str(streams),
            "--seconds", str(seconds)]


def bulk_result(out: dict, s: Settings) -> tuple[int, float]:
    """(bytes received, MiB/s) from the bulk client's JSON."""
    if s.bulk_tool == "iperf3":
        total = out["end"]["sum_received"]
        return int(total["bytes"]), total["bits_per_second"] / 8 / MiB
    return out["bytes"], out["bytes"] / out["seconds"] / MiB


def run_bulk(peer: Peer, s: Settings, streams: int) -> dict:
    """Throughput of ``streams`` parallel streams, the relay's CPU seconds per GiB, and the
    whole machine's: how busy all CPUs were, and their CPU seconds per GiB (relay, load
    generators and the kernel's softirq work together)."""
    with bulk_upstream(s) as up, peer.start(up, s.workdir) as relay:
        before = cpu_times(relay.pid) if relay.proc else None
        busy0, total0 = machine_cpu()
        out = run_json(bulk_client(relay.port, streams, s.duration, s), timeout=s.duration + 60)
        busy1, total1 = machine_cpu()
        moved, rate = bulk_result(out, s)
        cpu_per_gib = user_per_gib = None
        if before is not None:
            wait_single(relay.pid)  # socat: let the per-connection processes exit and be reaped
            cpu, user = cpu_times(relay.pid)
            cpu_per_gib = (cpu - before[0]) / (moved / GiB)
            user_per_gib = (user - before[1]) / (moved / GiB)
    busy, total = busy1 - busy0, total1 - total0
    return {"mib_s": rate, "cpu_s_per_gib": cpu_per_gib, "user_s_per_gib": user_per_gib, "bytes": moved,
            "machine_busy_pct": 100 * busy / total if total else None,
            "machine_cpu_s_per_gib": busy / (moved / GiB)}


def run_latency(peer: Peer, s: Settings) -> dict:
    """p50/p99/mean µs of 64-byte round trips through an echo server.

    The client, the echo server and the relay all run on one CPU (unless --no-pin): on a VM
    a wakeup across CPUs costs tens of µs, and whether each hop crosses is up to the
    scheduler, which made p50s vary 3× between identical runs.
    """
    cpus = s.latency_cpus
    with upstream_server("echo", s, cpus) as (_, up), peer.start(up, s.workdir, cpus) as relay:
        return run_json([sys.executable, LOADGEN, "latency", "--port", str(relay.port),
                         "--warmup", str(s.latency_warmup), "--count", str(s.latency_count)],
                        timeout=120, cpus=cpus)


def run_conns(peer: Peer, s: Settings) -> dict:
    """Wall time and errors of ``s.conns`` echo exchanges of 64 KiB, 50 in flight."""
    with upstream_server("echo", s) as (_, up), peer.start(up, s.workdir) as relay:
        out = run_json([sys.executable, LOADGEN, "conns", "--port", str(relay.port),
                        "--count", str(s.conns), "--concurrency", str(s.conns_concurrency),
                        "--size", str(s.conns_size)], timeout=300)
    return {"wall_s": out["seconds"], "errors": out["errors"], "error_kinds": out["error_kinds"]}


def run_rate(peer: Peer, s: Settings) -> dict:
    """Connections per second, sustained: 50 clients each opening a connection, echoing
    4 KiB through it and closing it, again and again for ``s.rate_seconds``."""
    with upstream_server("echo", s) as (_, up), peer.start(up, s.workdir) as relay:
        out = run_json([sys.executable, LOADGEN, "conns", "--port", str(relay.port),
                        "--count", str(10**9), "--seconds", str(s.rate_seconds),
                        "--concurrency", str(s.conns_concurrency), "--size", "4096"],
                       timeout=s.rate_seconds + 120)
    return {"per_s": out["per_second"], "errors": out["errors"], "error_kinds": out["error_kinds"]}


def hold(clients: Child, server: Child, count: int) -> None:
    """Open ``count`` more idle connections, a batch at a time, each batch until the upstream
    has accepted it (so the relay's listen backlog never overflows)."""
    accepted = server.ask("stats")["accepted"]
    for done in range(0, count, IDLE_BATCH):
        batch = min(IDLE_BATCH, count - done)
        reply = clients.ask(f"open {batch}", timeout=60)
        if reply["errors"]:
            raise RuntimeError(f"{reply['errors']} connections failed: {reply['error_kinds']}")
        accepted += batch
        wait_for(lambda want=accepted: server.ask("stats")["accepted"] >= want, 30,
                 f"the relay to connect {done + batch} of {count} upstream")


def release(clients: Child, server: Child, relay_pid: int, fds: int | None = None) -> float:
    """Close the idle connections; seconds until the upstream has seen them all close and
    the relay is back to ``fds`` open fds, if given (at most 30)."""
    clients.ask("close", timeout=60)
    start = time.monotonic()
    with contextlib.suppress(TimeoutError):
        wait_for(lambda: server.ask("stats")["open"] == 0
                 and (fds is None or usage(relay_pid)["fds"] <= fds), 30,
                 "the relay to close its connections")
    return time.monotonic() - start


def run_idle(peer: Peer, s: Settings) -> dict:
    """The relay's memory and fds before and with ``s.idle_conns`` idle connections, then after.

    IDLE_WARMUP connections come and go first, so that what a relay starts lazily
    (splicepool's workers, haproxy's pipes) counts in its baseline, not per connection.
    Memory is VmRSS, or for a process tree (socat) the sum of PSS: summed RSS would count
    shared pages once per process. After the close, the wait is for the relay to be back
    within FDS_SLACK fds of the baseline; ``fds_left`` is the exact difference.
    """
    n = s.idle_conns
    with (upstream_server("hold", s) as (server, up), peer.start(up, s.workdir) as relay,
          loadgen(["idle", "--port", str(relay.port)], s) as clients):
        hold(clients, server, IDLE_WARMUP)
        release(clients, server, relay.pid)
        time.sleep(0.5)
        base = usage(relay.pid)
        hold(clients, server, n)
        time.sleep(1.0)
        held = usage(relay.pid)
        drop_s = release(clients, server, relay.pid, base["fds"] + FDS_SLACK)
        after = usage(relay.pid)
    memory = "pss_kib" if held["procs"] > 1 else "rss_kib"
    return {
        "memory": "PSS sum" if memory == "pss_kib" else "VmRSS",
        "mem_base_mib": base[memory] / 1024,
        "mem_mib": held[memory] / 1024,
        "mem_kib_per_conn": (held[memory] - base[memory]) / n,
        "mem_after_mib": after[memory] / 1024,
        "rss_sum_mib": held["rss_kib"] / 1024,
        "fds_per_conn": (held["fds"] - base["fds"]) / n,
        "fds_left": after["fds"] - base["fds"],
        "drop_s": drop_s,
        "procs": held["procs"],
        "threads": held["threads"],
    }


def run_workload(workload: str, peer: Peer, s: Settings) -> dict:
    if workload == "bulk1":
        return run_bulk(peer, s, 1)
    if workload == "bulk4":
        return run_bulk(peer, s, 4)
    if workload == "latency":
        return run_latency(peer, s)
    if workload == "conns":
        return run_conns(peer, s)
    if workload == "rate":
        return run_rate(peer, s)
    return run_idle(peer, s)


def skip_reason(workload: str, peer: Peer, s: Settings) -> str | None:
    """Why ``peer`` sits out ``workload``, or None."""
    if workload == "idle" and peer.kind == "direct":
        return "no relay to measure"
    if workload == "idle" and peer.kind.startswith("haproxy") and s.idle_conns > haproxy_maxconn() - 10:
        return f"maxconn {haproxy_maxconn()} (the fd limit) < {s.idle_conns} connections"
    if workload == "idle" and peer.kind == "go" and 6 * s.idle_conns + 100 > raise_nofile_limit():
        # measured: 2000 idle connections hold 12007 fds in the Go relay
        return (f"6 fds per idle connection (two sockets, and a pipe per direction that Go's "
                f"splice keeps while it waits): {s.idle_conns} need more than the fd limit")
    return None


def summary(workload: str, v: dict) -> str:
    """One progress line's worth of a result."""
    if workload.startswith("bulk"):
        cpu = (f", CPU {v['cpu_s_per_gib']:.3f} s/GiB (user {v['user_s_per_gib']:.3f})"
               if v["cpu_s_per_gib"] is not None else "")
        return f"{v['mib_s']:.0f} MiB/s{cpu}"
    if workload == "latency":
        return f"p50 {v['p50_us']:.0f} µs, p99 {v['p99_us']:.0f} µs"
    if workload == "conns":
        return f"{v['wall_s']:.2f} s, {v['errors']} errors"
    if workload == "rate":
        return f"{v['per_s']:.0f} conns/s, {v['errors']} errors"
    return (f"{v['memory']} {v['mem_base_mib']:.1f} → {v['mem_mib']:.1f} MiB "
            f"({v['mem_kib_per_conn']:.1f} KiB/conn), "
            f"{v['fds_per_conn']:.2f} fds/conn, {v['fds_left']} fds left after close")


# --- the report ------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    workload: str
    field: str
    label: str
    fmt: str
    better: str = ""  # "higher" or "lower": gets a splicepool ÷ peer ratio
    vs_direct: bool = False  # show the ratio to direct next to the value

    @property
    def key(self) -> str:
        return f"{self.workload}.{self.field}"


def metrics(s: Settings) -> list[Metric]:
    return [
        Metric("bulk1", "mib_s", "bulk, 1 stream: MiB/s", "{:.0f}", "higher", True),
        Metric("bulk4", "mib_s", "bulk, 4 streams: MiB/s", "{:.0f}", "higher", True),
        Metric("bulk1", "cpu_s_per_gib", "relay CPU per GiB, 1 stream: s", "{:.3f}", "lower"),
        Metric("bulk4", "cpu_s_per_gib", "relay CPU per GiB, 4 streams: s", "{:.3f}", "lower"),
        Metric("bulk1", "user_s_per_gib", "of which in user mode, 1 stream: s", "{:.3f}", "lower"),
        Metric("bulk4", "user_s_per_gib", "of which in user mode, 4 streams: s", "{:.3f}", "lower"),
        Metric("bulk1", "machine_busy_pct", "all CPUs busy during 1 stream: %", "{:.0f}"),
        Metric("bulk1", "machine_cpu_s_per_gib", "whole machine CPU per GiB, 1 stream: s", "{:.3f}"),
        Metric("bulk4", "machine_busy_pct", "all CPUs busy during 4 streams: %", "{:.0f}"),
        Metric("bulk4", "machine_cpu_s_per_gib", "whole machine CPU per GiB, 4 streams: s", "{:.3f}"),
        Metric("latency", "p50_us", "64 B round trip p50: µs", "{:.0f}", "lower"),
        Metric("latency", "p99_us", "64 B round trip p99: µs", "{:.0f}", "lower"),
        Metric("latency", "added_p50_us", "added p50 over direct: µs", "{:.0f}", "lower"),
        Metric("latency", "added_p99_us", "added p99 over direct: µs", "{:.0f}", "lower"),
        Metric("conns", "wall_s", f"{s.conns} conns × {s.conns_size >> 10} KiB echo: wall s", "{:.2f}",
               "lower", True),
        Metric("conns", "errors", f"{s.conns} conns: errors (all reps)", "{:.0f}"),
        Metric("rate", "per_s", f"sustained, 50 clients × 4 KiB for {s.rate_seconds:g} s: conns/s", "{:.0f}",
               "higher", True),
        Metric("rate", "errors", "sustained: errors (all reps)", "{:.0f}"),
        Metric("idle", "mem_base_mib", "idle: RSS before: MiB", "{:.1f}"),
        Metric("idle", "mem_mib", f"idle: RSS with {s.idle_conns} conns: MiB", "{:.1f}", "lower"),
        Metric("idle", "mem_kib_per_conn", "idle: RSS per conn over before: KiB", "{:.2f}", "lower"),
        Metric("idle", "fds_per_conn", "idle: fds per conn", "{:.2f}", "lower"),
        Metric("idle", "fds_left", "idle: fds left after close", "{:.0f}"),
    ]


@dataclass(frozen=True)
class Goal:
    label: str
    key: str
    versus: str | None  # a peer: the goal is on splicepool ÷ that peer; None: on the value
    op: str  # ">=", "<=" or "="
    target: float
    fmt: str = "{:.2f}"


def goals(s: Settings) -> list[Goal]:
    return [
        Goal("bulk 1 stream ÷ haproxy", "bulk1.mib_s", "haproxy", ">=", 1.15),
        Goal("bulk 1 stream ÷ thread relay", "bulk1.mib_s", "thread", ">=", 1.3),
        Goal("bulk 4 streams ÷ haproxy", "bulk4.mib_s", "haproxy", ">=", 1.0),
        Goal("CPU per GiB (1 stream) ÷ haproxy", "bulk1.cpu_s_per_gib", "haproxy", "<=", 0.65),
        Goal("added p50 latency ÷ thread relay's", "latency.added_p50_us", "thread", "<=", 1.0),
        Goal(f"{s.conns}-conn wall time ÷ thread relay", "conns.wall_s", "thread", "<=", 1.0),
        Goal(f"{s.conns}-conn wall time ÷ haproxy", "conns.wall_s", "haproxy", "<=", 2.0),
        Goal(f"{s.conns}-conn errors, all reps", "conns.errors", None, "=", 0, "{:.0f}"),
        Goal(f"RSS with {s.idle_conns} idle conns ÷ haproxy", "idle.mem_mib", "haproxy", "<=", 0.75),
        Goal("fds per idle conn", "idle.fds_per_conn", None, "=", 2),
        # the real anchors: HAProxy forced to splice with 1 MiB pipes, and the Go relay
        Goal(f"{s.conns}-conn wall time ÷ go", "conns.wall_s", "go", "<=", 1.0),
        Goal(f"{s.conns}-conn wall time ÷ haproxy-splice", "conns.wall_s", "haproxy-splice", "<=", 1.3),
        Goal("sustained conns/s ÷ go", "rate.per_s", "go", ">=", 1.0),
        Goal("sustained errors, all reps", "rate.errors", None, "=", 0, "{:.0f}"),
        Goal("CPU per GiB (1 stream) ÷ haproxy-splice", "bulk1.cpu_s_per_gib", "haproxy-splice", "<=", 0.9),
        Goal("CPU per GiB (4 streams) ÷ haproxy-splice", "bulk4.cpu_s_per_gib", "haproxy-splice", "<=", 0.9),
        Goal("bulk 1 stream ÷ haproxy-splice", "bulk1.mib_s", "haproxy-splice", ">=", 1.0),
        Goal("bulk 4 streams ÷ haproxy-splice", "bulk4.mib_s", "haproxy-splice", ">=", 1.0),
        Goal("bulk 1 stream ÷ go", "bulk1.mib_s", "go", ">=", 1.2),
        Goal("bulk 4 streams ÷ go", "bulk4.mib_s", "go", ">=", 1.2),
        Goal("added p50 latency ÷ haproxy-splice's", "latency.added_p50_us", "haproxy-splice", "<=", 1.0),
        Goal("added p99 latency ÷ haproxy-splice's", "latency.added_p99_us", "haproxy-splice", "<=", 1.0),
        Goal("added p50 latency ÷ go's", "latency.added_p50_us", "go", "<=", 1.0),
        Goal("added p99 latency ÷ go's", "latency.added_p99_us", "go", "<=", 1.0),
        Goal(f"RSS with {s.idle_conns} idle conns ÷ haproxy-splice", "idle.mem_mib", "haproxy-splice", "<=", 0.55),
    ]


def add_latency_over_direct(runs: list[dict]) -> None:
    """Give each latency run the p50/p99 it adds to direct's in the same rep."""
    direct = {r["rep"]: r["values"] for r in runs
              if r["workload"] == "latency" and r["peer"] == "direct" and r["values"]}
    for r in runs:
        if r["workload"] == "latency" and r["values"] and r["rep"] in direct and r["peer"] != "direct":
            for q in ("p50", "p99"):
                r["values"][f"added_{q}_us"] = r["values"][f"{q}_us"] - direct[r["rep"]][f"{q}_us"]


def medians(runs: list[dict], peers: list[Peer], ms: list[Metric]) -> dict[str, dict[str, float]]:
    """peer → metric key → median over reps (errors: the sum); absent if never measured."""
    out: dict[str, dict[str, float]] = {p.name: {} for p in peers}
    for p in peers:
        for m in ms:
            values = [r["values"][m.field] for r in runs
                      if r["peer"] == p.name and r["workload"] == m.workload and r["values"]
                      and r["values"].get(m.field) is not None]
            if values:
                out[p.name][m.key] = sum(values) if m.field == "errors" else statistics.median(values)
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    """a ÷ b, if both are measured and positive (an added latency can come out at or below 0)."""
    return a / b if a is not None and b is not None and a >= 0 and b > 0 else None


def check(goal: Goal, value: float) -> bool:
    if goal.op == ">=":
        return value >= goal.target
    if goal.op == "<=":
        return value <= goal.target
    return abs(value - goal.target) < 0.005


class Report:
    """Builds the markdown from the runs; ``text()`` is what is printed, ``data`` goes to JSON."""

    def __init__(self, runs: list[dict], peers: list[Peer], s: Settings, notes: list[str]) -> None:
        add_latency_over_direct(runs)
        self.runs, self.peers, self.s, self.notes = runs, peers, s, notes
        self.metrics = metrics(s)
        self.med = medians(runs, peers, self.metrics)
        self.splicepools = [p for p in peers if p.kind == "splicepool"]
        self.others = [p for p in peers if p.kind not in ("direct", "splicepool")]
        self.data: dict = {"medians": self.med, "ratios": {}, "goals": {}}

    def metric(self, key: str) -> Metric:
        return next(m for m in self.metrics if m.key == key)

    def cell(self, peer: Peer, m: Metric) -> str:
        value = self.med[peer.name].get(m.key)
        if value is None:
            return self.missing(peer, m.workload)
        text = m.fmt.format(value)
        direct = self.med.get("direct", {}).get(m.key)
        if m.vs_direct and peer.kind != "direct" and direct:
            text += f" ({value / direct:.2f}×)"
        if m.field.startswith("mem_") and self.pss_summed(peer):
            text += " †"
        return text

    def pss_summed(self, peer: Peer) -> bool:
        return any(r["values"] and r["values"].get("memory") == "PSS sum" for r in self.runs
                   if r["peer"] == peer.name and r["workload"] == "idle")

    def missing(self, peer: Peer, workload: str) -> str:
        if peer.kind == "direct":
            return "—"
        ran = [r for r in self.runs if r["peer"] == peer.name and r["workload"] == workload]
        if not ran:
            return "not run"
        return "failed" if any(r.get("error") for r in ran) else "skipped"

    def results_table(self) -> list[str]:
        lines = [
            f"| metric (median of {self.s.reps}) | " + " | ".join(p.name for p in self.peers) + " |",
            "|---|" + "---:|" * len(self.peers),
        ]
        workloads = {r["workload"] for r in self.runs}
        for m in self.metrics:
            if m.workload in workloads:
                lines.append(f"| {m.label} | " + " | ".join(self.cell(p, m) for p in self.peers) + " |")
        return lines

    def ratio_table(self, sp: Peer) -> list[str]:
        cols = self.others
        lines = [
            f"| {sp.name} ÷ peer | better | " + " | ".join(f"÷ {p.name}" for p in cols)
            + " | ÷ best other |",
            "|---|---|" + "---:|" * (len(cols) + 1),
        ]
        ratios: dict[str, dict[str, float | None]] = {}
        for m in self.metrics:
            mine = self.med[sp.name].get(m.key)
            if not m.better or mine is None:
                continue
            row = {p.name: ratio(mine, self.med[p.name].get(m.key)) for p in cols}
            ratios[m.key] = row
            measured = [p for p in cols if self.med[p.name].get(m.key) is not None]
            pick = max if m.better == "higher" else min
            best = pick(measured, key=lambda p: self.med[p.name][m.key], default=None)
            best_text = f"{row[best.name]:.2f} ({best.name})" if best and row[best.name] else "—"
            cells = [f"{row[p.name]:.2f}" if row[p.name] is not None else "—" for p in cols]
            lines.append(f"| {m.label} | {m.better} | " + " | ".join(cells) + f" | {best_text} |")
        self.data["ratios"][sp.name] = ratios
        return lines

    def goals_section(self, sp: Peer) -> list[str]:
        """One line per goal whose workload ran; haproxy goals also say how haproxy-splice fares."""
        lines, results = [], []
        ran = {r["workload"] for r in self.runs}
        for g in goals(self.s):
            if g.key.split(".")[0] not in ran:
                continue
            mine = self.med[sp.name].get(g.key)
            theirs = self.med.get(g.versus, {}).get(g.key) if g.versus else None
            value = ratio(mine, theirs) if g.versus else mine
            goal_text = f"goal {g.op.replace('>=', '≥').replace('<=', '≤')} {g.target:g}"
            results.append({"goal": g.label, "value": value, "target": g.target, "op": g.op,
                            "met": None if value is None else check(g, value)})
            if value is None:
                lines.append(f"- {g.label}: n/a (not measured), {goal_text}")
                continue
            fmt = self.metric(g.key).fmt
            basis = f" ({fmt.format(mine)} vs {fmt.format(theirs)})" if g.versus else ""
            line = (f"- {g.label}: {g.fmt.format(value)}{basis}, {goal_text}: "
                    + ("met" if check(g, value) else "**NOT met**"))
            alt = ratio(mine, self.med.get("haproxy-splice", {}).get(g.key))
            if g.versus == "haproxy" and alt is not None:
                line += (f" (÷ haproxy-splice: {alt:.2f}, "
                         + ("would be met)" if check(g, alt) else "would not be met)"))
            lines.append(line)
        self.data["goals"][sp.name] = results
        return lines

    def text(self) -> str:
        out = ["## Results", "", *self.results_table(), "", *[f"- {n}" for n in self.notes]]
        for sp in self.splicepools:
            if self.others:
                out += ["", f"## {sp.name} ÷ each other relay (from the medians)", "",
                        *self.ratio_table(sp), "",
                        "- higher-is-better rows: above 1 favours splicepool; lower-is-better "
                        "rows: below 1 does."]
            out += ["", f"## Goals ({sp.name})", "", *self.goals_section(sp)]
        return "\n".join(out)


def notes(peers: list[Peer], s: Settings, runs: list[dict]) -> list[str]:
    """The table's footnotes: how each row was measured, each peer's command and quirks."""
    if s.bulk_tool == "iperf3":
        tool = (f"`iperf3 -c -t {s.duration:g} [-P 4] -l 1M -J` against `iperf3 -s -1`; "
                "MiB/s = end.sum_received.bits_per_second / 8 / 2^20 (1 MiB writes and reads: with "
                "iperf3's default 128 KiB, iperf3 itself caps direct here)")
    else:
        tool = (f"bench/loadgen.py bulk for {s.duration:g} s (1 MiB sendall per stream), "
                "the sink counts and acknowledges")
    out = [
        "(n×): the median ÷ direct's",
        f"bulk: {tool}",
        "relay CPU: utime+stime from /proc/PID/stat of the relay's process tree, before and after the "
        "run, ÷ GiB received; in user mode: utime alone (the rest is the kernel's work for it)",
        "all CPUs busy / whole machine CPU: /proc/stat's user+nice+system+irq+softirq over the run, "
        "as a share of all CPUs' time and ÷ GiB received (relay, load generators and softirq "
        "together: at 100% the machine, not the relay, sets the throughput)",
        f"latency: {s.latency_warmup} warm-up then {s.latency_count} round trips, one connection, "
        "TCP_NODELAY, epoll echo server; "
        + (f"client, echo server and relay all pinned to CPU {min(s.latency_cpus)} (a wakeup across "
           "CPUs costs tens of µs on this VM, and which hops cross is up to the scheduler); "
           if s.latency_cpus else "not pinned to CPUs; ")
        + "added = minus direct's in the same rep, then the median",
        f"conns: {s.conns_concurrency} in flight, each sends {s.conns_size} distinct bytes and must get "
        "exactly them back within 10 s; the echo server closes after the client's EOF",
        f"sustained: {s.conns_concurrency} clients, each opening a connection, sending 4096 distinct "
        f"bytes, checking the echo and closing, again and again for {s.rate_seconds:g} s; conns/s = "
        "exchanges finished ÷ wall time",
        f"idle: RSS = VmRSS, 1 s after the upstream has accepted all {s.idle_conns}; \"before\" and "
        f"the per-conn figures' baseline are taken after {IDLE_WARMUP} connections have come and gone "
        "(so what a relay starts lazily is not counted per connection); fds left = open fds over "
        "that baseline once the clients closed and the relay settled (up to 30 s)",
    ]
    for p in peers:
        if p.kind != "direct":
            out.append(f"{p.name}: `{p.describe()}`")
    if any(p.kind.startswith("haproxy") for p in peers):
        out.append(f"haproxy: nbthread left at its default (one per CPU: {os.cpu_count()} here); "
                   f"maxconn {haproxy_maxconn()} and maxpipes {HAPROXY_MAXPIPES}, so that its fd need "
                   "(2·maxconn + 2·maxpipes + ~20, checked at startup) fits the fd limit; timeouts "
                   "1 h. `haproxy`: option splice-auto (which here never splices: it recv/sends); "
                   "`haproxy-splice`: option splice-request + splice-response and tune.pipesize "
                   "1048576, splicing both ways with 1 MiB pipes like splicepool")
    if any(p.kind == "socat" for p in peers):
        out.append("socat: forks a process per connection, so its CPU and fds are sums over its "
                   "process tree; listen backlog set to 1024 (socat's default is 5)")
    idle = {r["peer"]: r["values"] for r in runs if r["workload"] == "idle" and r["values"]}
    for p in peers:
        v = idle.get(p.name)
        if v and v["memory"] == "PSS sum":
            out.append(f"†: {p.name} is a tree of processes ({v['procs']} with {s.idle_conns} idle "
                       f"conns), so its memory is their PSS summed; the sum of their RSS, which counts "
                       f"shared pages once per process, was {v['rss_sum_mib']:.0f} MiB")
        if v and p.kind == "thread":
            out.append(f"thread: two threads per connection, 256 KiB stacks, mmap'd buffers "
                       f"({v['threads']} threads with {s.idle_conns} idle conns)")
    return out


# --- the run -------------------------------------------------------------------


def command_version(argv: list[str]) -> str | None:
    if not shutil.which(argv[0]):
        return None
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return next((line.strip() for line in lines if "version" in line.lower() or line.startswith("iperf")),
                lines[0] if lines else None)


def machine() -> dict:
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    with open("/proc/meminfo") as f:
        mem_kib = int(f.readline().split()[1])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": model,
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "mem_gib": round(mem_kib / 2**20, 1),
        "nofile_limit": raise_nofile_limit(),
        "haproxy": command_version(["haproxy", "-v"]),
        "socat": command_version(["socat", "-V"]),
        "go": command_version(["go", "version"]),
        "iperf3": command_version(["iperf3", "--version"]),
    }


# What `make bench` runs besides splicepool: this script's peers and load generators, and
# those of bench/http_bench.py (nginx, wrk) and bench/socks_bench.py (curl), which it runs next.
APT_PEERS = ["haproxy", "socat", "iperf3", "golang-go", "nginx-light", "wrk", "curl"]


def install_peers() -> None:
    names = " ".join(APT_PEERS)
    if os.geteuid() != 0:
        print(f"--install-peers: not root, not installing (run: apt-get install {names})")
        return
    if not shutil.which("apt-get"):
        print(f"--install-peers: no apt-get here; install {names} yourself")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    argv = ["apt-get", "install", "-y", "-q", *APT_PEERS]
    for attempt in (argv, ["apt-get", "update", "-q"], argv):
        done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode == 0 and attempt is argv:
            print(f"--install-peers: {names} installed")
            return
    print(f"--install-peers: apt-get failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")


def choose_peers(args: argparse.Namespace) -> list[Peer]:
    """The peers asked for, in report order, minus (with a line each) those missing here."""
    wanted = args.peers.split(",")
    unknown = set(wanted) - set(KINDS)
    if unknown:
        raise SystemExit(f"--peers: unknown {', '.join(sorted(unknown))} (choose from {', '.join(KINDS)})")
    chosen: list[Peer] = []
    for kind in KINDS:
        if kind == "splicepool":
            if kind in wanted:
                chosen.append(Peer("splicepool", kind, shlex.split(args.splicepool_args)))
            for spec in args.variant:
                name, sep, variant_args = spec.partition("=")
                if not sep or not name:
                    raise SystemExit(f"--variant {spec!r}: expected NAME=ARGS")
                chosen.append(Peer(f"splicepool:{name}", kind, shlex.split(variant_args)))
            for spec in args.tree:
                name, sep, path = spec.partition("=")
                if not sep or not name or not os.path.isfile(os.path.join(path, "splicepool", "__main__.py")):
                    raise SystemExit(f"--tree {spec!r}: expected NAME=PATH of a splicepool checkout")
                chosen.append(Peer(f"splicepool@{name}", kind, shlex.split(args.splicepool_args),
                                   root=os.path.abspath(path)))
        elif kind in wanted:
            chosen.append(Peer(kind, kind))
    available = []
    for peer in chosen:
        reason = peer.missing()
        if reason:
            print(f"{peer.name}: {reason}, skipped")
        else:
            available.append(peer)
    return available


def settings(args: argparse.Namespace, workdir: str) -> Settings:
    if args.bulk_tool == "auto":
        args.bulk_tool = "iperf3" if shutil.which("iperf3") else "python"
        if args.bulk_tool == "python":
            print("iperf3: not installed (apt-get install iperf3), bulk uses bench/loadgen.py instead")
    elif args.bulk_tool == "iperf3" and not shutil.which("iperf3"):
        raise SystemExit("--bulk-tool iperf3: iperf3 is not installed")
    quick = args.quick
    s = Settings(
        reps=args.reps or (1 if quick else 3),
        duration=args.duration or (1.0 if quick else 3.0),
        bulk_tool=args.bulk_tool,
        latency_warmup=200,
        latency_count=args.latency_trips or (1000 if quick else 5000),
        conns=args.conns or (200 if quick else 1000),
        conns_concurrency=50,
        conns_size=64 * 1024,
        rate_seconds=2.0 if quick else 10.0,
        idle_conns=args.idle_conns or (1000 if quick else 9000),
        pin_latency=not args.no_pin,
        workdir=workdir,
    )
    limit = raise_nofile_limit()
    if 2 * s.idle_conns + 200 > limit:
        raise SystemExit(f"--idle-conns {s.idle_conns}: a relay needs 2 fds per connection plus "
                         f"some, over the fd limit of {limit}")
    return s


def benchmark(peers: list[Peer], workloads: list[str], s: Settings) -> list[dict]:
    """Every workload through every peer, ``s.reps`` times interleaved; one record per run."""
    runs = []
    for rep in range(s.reps):
        order = peers[rep % len(peers):] + peers[:rep % len(peers)]
        for workload in workloads:
            for peer in order:
                record = {"rep": rep, "workload": workload, "peer": peer.name, "values": None}
                runs.append(record)
                reason = skip_reason(workload, peer, s)
                tag = f"[rep {rep + 1}/{s.reps}] {workload:<7} {peer.name:<14}"
                if reason:
                    record["skipped"] = reason
                    if rep == 0:
                        print(f"{tag} skipped: {reason}", file=sys.stderr)
                    continue
                start = time.monotonic()
                try:
                    record["values"] = run_workload(workload, peer, s)
                except Exception as exc:
                    record["error"] = f"{exc.__class__.__name__}: {exc}"
                    print(f"{tag} FAILED: {record['error']}", file=sys.stderr)
                    continue
                finally:
                    record["seconds"] = round(time.monotonic() - start, 2)
                print(f"{tag} {summary(workload, record['values'])}  ({record['seconds']:.1f} s)",
                      file=sys.stderr)
    return runs


def profile(args: argparse.Namespace, s: Settings) -> int:
    """Record the splicepool proxy under a 1-stream bulk load with py-spy, as a flame graph."""
    py_spy = shutil.which("py-spy", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                          os.environ.get("PATH", "")]))
    if not py_spy:
        print("py-spy is not installed (.venv/bin/python -m pip install py-spy)")
        return 1
    peer = Peer("splicepool", "splicepool", shlex.split(args.splicepool_args))
    seconds = args.profile_seconds
    with bulk_upstream(s) as up, peer.start(up, s.workdir) as relay:
        load = spawn(bulk_client(relay.port, 1, seconds + 3, s), os.path.join(s.workdir, "load.log"),
                     stdout=subprocess.DEVNULL)
        try:
            time.sleep(1.0)
            argv = [py_spy, "record", "--native", "--subprocesses", "--format", "flamegraph",
                    "-o", args.profile, "--pid", str(relay.pid), "--duration", str(seconds)]
            print(f"profiling: {shlex.join(argv)}")
            done = subprocess.run(argv, timeout=seconds + 120)
            load.wait(timeout=seconds + 60)
        finally:
            stop(load)
    if done.returncode:
        print(f"py-spy failed (exit {done.returncode})")
        return 1
    print(f"flame graph: {args.profile}")
    return 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 1 rep, 1 s bulk runs, 1000 latency trips, 200 conns, "
                        "1000 idle conns")
    parser.add_argument("--reps", type=int, help="repetitions, interleaved; the median is reported "
                        "(default 3)")
    parser.add_argument("--peers", default=",".join(KINDS), help="comma-separated, from: "
                        + ", ".join(KINDS) + " (default: all)")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated, from: " + ", ".join(WORKLOADS) + " (default: all)")
    parser.add_argument("--latency-trips", type=int, metavar="N",
                        help="latency: timed round trips per rep (default 5000; issue 13's "
                        "latency goal asks for 20000)")
    parser.add_argument("--splicepool-args", default="", metavar="ARGS",
                        help='extra arguments for the splicepool proxy, e.g. "--workers 1"')
    parser.add_argument("--variant", action="append", default=[], metavar='NAME="ARGS"',
                        help="one more splicepool column, named splicepool:NAME, run with ARGS "
                        "(instead of --splicepool-args); repeatable")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="one more splicepool column, named splicepool@NAME: the proxy of the "
                        "checkout at PATH (with --splicepool-args), e.g. the commit before a change; "
                        "repeatable")
    parser.add_argument("--duration", type=float, help="seconds per bulk run (default 3)")
    parser.add_argument("--conns", type=int, help="connections in the conns workload (default 1000)")
    parser.add_argument("--idle-conns", type=int, help="idle connections (default 9000)")
    parser.add_argument("--no-pin", action="store_true",
                        help="latency: let the client, echo server and relay run on any CPU "
                        "(default: all on one CPU, see run_latency)")
    parser.add_argument("--bulk-tool", choices=["auto", "iperf3", "python"], default="auto",
                        help="bulk load generator (default: iperf3 if installed)")
    parser.add_argument("--json", metavar="PATH", help="raw results (default: "
                        "bench/results/compare-TIMESTAMP.json)")
    parser.add_argument("--install-peers", action="store_true",
                        help="as root with apt-get: install the peers and load generators of "
                        "make bench first (" + ", ".join(APT_PEERS) + ")")
    parser.add_argument("--profile", metavar="OUT.svg",
                        help="instead of comparing: py-spy flame graph of the splicepool proxy "
                        "under a 1-stream bulk load")
    parser.add_argument("--profile-seconds", type=int, default=10, metavar="N")
    args = parser.parse_args()
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(sorted(unknown))}")
    return args


def main() -> int:
    args = parse_args()
    began = time.monotonic()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.install_peers:
        install_peers()
    with tempfile.TemporaryDirectory(prefix="splicepool-compare-") as workdir:
        s = settings(args, workdir)
        try:
            if args.profile:
                return profile(args, s)
            peers = choose_peers(args)
            workloads = [w for w in WORKLOADS if w in args.workloads.split(",")]
            info = machine()
            header = [
                "# splicepool proxy vs other relays (loopback)",
                "",
                f"- command: `{shlex.join(sys.orig_argv)}`",
                f"- machine: {info['nproc']} CPUs ({info['cpu']}), {info['mem_gib']} GiB, Linux "
                f"{info['kernel']}, {info['python']}, fd limit {info['nofile_limit']}",
                "- tools: " + ", ".join(f"{info[k] or k + ' not installed'}"
                                        for k in ("haproxy", "socat", "iperf3")),
            ]
            print("\n".join(header), flush=True)
            runs = benchmark(peers, workloads, s)
        finally:
            stop_all()
    report = Report(runs, peers, s, notes(peers, s, runs))
    print()
    print(report.text())
    elapsed = time.monotonic() - began
    path = args.json or os.path.relpath(os.path.join(HERE, "results",
                                                     time.strftime("compare-%Y%m%d-%H%M%S.json")))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"command": sys.orig_argv, "machine": info, "settings": asdict(s),
                   "peers": {p.name: p.describe() for p in peers}, "seconds": round(elapsed, 1),
                   "runs": runs, **report.data}, f, indent=1)
    print(f"\ntook {elapsed / 60:.1f} min; raw reps and medians: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
