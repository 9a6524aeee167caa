"""What one proxied connection costs a relay: its syscalls (strace) and, for splicepool, its
Python calls (cProfile of the accept loop and of each worker).

    python bench/conn_cost.py strace [--peer splicepool|haproxy-splice|go] [--tree PATH]
                                     [--conns 1000] [--size 65536] [--args "..."]
    python bench/conn_cost.py profile [--tree PATH] [--conns 1000] [--size 65536] [--args "..."]
    python bench/conn_cost.py cpu [--peer ...] [--tree PATH] [--conns 1000] [--size 65536] [--reps 3]
    python bench/conn_cost.py gil [--tree PATH] [--size 65536] [--seconds 5] [--args "..."]

Both run bench/compare.py's ``conns`` workload (bench/loadgen.py: ``--conns`` connections,
50 at a time, each echoing ``--size`` distinct bytes through an echo server) once through
the relay, in front of a loadgen echo server.

``strace`` attaches ``strace -c -f`` to the relay's process (all its threads, and those it
starts) once it listens, runs the workload, detaches, and prints each syscall's count per
connection (the relay's start-up is not counted; what an idle relay does meanwhile, its
timers, is: a few calls in all, 0.00 per connection).

``profile`` runs the splicepool proxy (of this checkout, or ``--tree PATH``'s) with
cProfile on in its main thread (the accept loop) and in every worker thread, and prints
for each the functions by own time, with calls per connection. cProfile slows the
proxy down several times: read the call counts and the shares, not the times.

``gil`` runs a sustained load instead (50 clients opening connections of ``--size`` bytes
for as long as it takes) and records the proxy twice with py-spy for ``--seconds`` each:
once every thread at every sample (``--idle``), once only the thread holding the GIL
(``--gil``). The share of samples with a holder is how much of the time the GIL is held,
and per connection, how long each holds it.

``cpu`` runs the workload ``--reps`` times through one relay process, untraced, and
prints for each rep the relay's CPU time (user and system, /proc/PID/stat) and its
context switches (voluntary and not, summed over its threads from /proc/PID/task/*/status)
per connection: a GIL hand-over between threads is a futex wait, a voluntary switch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from compare import LOADGEN, Settings, run_json, upstream_server  # noqa: E402
from peers import ROOT, Peer, raise_nofile_limit, stop  # noqa: E402

# Run as the proxy process by ``profile``: cProfile in the main thread and in every worker.
_PROFILED_PROXY = r"""
import cProfile, sys
from splicepool import __main__ as cli, engine
out = sys.argv.pop(1)
run = engine.Worker._run
def profiled(self):
    prof = cProfile.Profile()
    prof.enable()
    try:
        run(self)
    finally:
        prof.disable()
        prof.dump_stats(f"{out}.worker{self.index}")
engine.Worker._run = profiled
prof = cProfile.Profile()
prof.enable()
try:
    status = cli.main(sys.argv[1:])
finally:
    prof.disable()
    prof.dump_stats(f"{out}.main")
sys.exit(status)
"""


def settings(workdir: str) -> Settings:
    return Settings(reps=1, duration=0, bulk_tool="python", latency_warmup=0, latency_count=0,
                    conns=0, conns_concurrency=50, conns_size=0, rate_seconds=0, idle_conns=0,
                    pin_latency=False, workdir=workdir)


def workload(port: int, args: argparse.Namespace) -> dict:
    return run_json([sys.executable, LOADGEN, "conns", "--port", str(port), "--count", str(args.conns),
                     "--concurrency", "50", "--size", str(args.size)], timeout=600)


def parse_strace(text: str) -> dict[str, tuple[int, int]]:
    """{syscall: (calls, errors)} from ``strace -c``'s table."""
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 5 and re.fullmatch(r"[\d.]+", fields[0]) and fields[-1] != "total":
            calls = int(fields[3])
            errors = int(fields[4]) if len(fields) == 6 else 0
            out[fields[-1]] = (calls, errors)
    return out


def run_strace(args: argparse.Namespace, workdir: str) -> dict:
    s = settings(workdir)
    peer = Peer(args.peer, args.peer, shlex.split(args.args), root=args.tree or ROOT)
    if peer.missing():
        raise SystemExit(f"{peer.name}: {peer.missing()}")
    out_path = os.path.join(workdir, "strace.txt")
    with upstream_server("echo", s) as (_, up), peer.start(up, workdir) as relay:
        log_path = os.path.join(workdir, "strace.log")
        with open(log_path, "wb") as log:
            tracer = subprocess.Popen(["strace", "-c", "-f", "-o", out_path, "-p", str(relay.pid)],
                                      stderr=log)
        try:
            deadline = time.monotonic() + 10
            while b"attached" not in open(log_path, "rb").read():
                if tracer.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"strace did not attach: {open(log_path).read()}")
                time.sleep(0.05)
            time.sleep(0.2)
            result = workload(relay.port, args)
            time.sleep(0.5)  # the last relays end and are logged
        finally:
            tracer.send_signal(signal.SIGINT)
            tracer.wait(30)
    with open(out_path) as f:
        counts = parse_strace(f.read())
    return {"peer": peer.describe(), "conns": args.conns, "errors": result["errors"],
            "seconds_under_strace": result["seconds"], "syscalls": counts}


def print_strace(data: dict) -> None:
    n = data["conns"]
    counts = data["syscalls"]
    total = sum(c for c, _ in counts.values())
    print(f"{data['peer']}: {n} connections ({data['errors']} errors), "
          f"{total} syscalls, {total / n:.2f} per connection")
    for name, (calls, errors) in sorted(counts.items(), key=lambda kv: -kv[1][0]):
        err = f"  ({errors / n:.2f} failed)" if errors else ""
        print(f"  {name:<16} {calls / n:8.2f}{err}")


def _switches(pid: int) -> tuple[int, int]:
    vol = invol = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        vol += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        invol += int(line.split()[1])
        except OSError:
            pass
    return vol, invol


def _cpu(pid: int) -> tuple[float, float]:
    from peers import CLK_TCK

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def run_cpu(args: argparse.Namespace, workdir: str) -> None:
    s = settings(workdir)
    peer = Peer(args.peer, args.peer, shlex.split(args.args), root=args.tree or ROOT)
    n = args.conns
    print(f"{peer.describe()}: {n} connections × {args.size} B per rep, per connection:")
    print(f"  {'rep':>3} {'wall s':>7} {'user µs':>8} {'sys µs':>8} {'vol. sw':>8} {'invol. sw':>9}")
    with upstream_server("echo", s) as (_, up), peer.start(up, workdir) as relay:
        workload(relay.port, args)  # warm-up: workers started, pipes made
        time.sleep(0.3)
        for rep in range(args.reps):
            u0, s0 = _cpu(relay.pid)
            v0, i0 = _switches(relay.pid)
            result = workload(relay.port, args)
            time.sleep(0.3)  # the last relays end
            u1, s1 = _cpu(relay.pid)
            v1, i1 = _switches(relay.pid)
            print(f"  {rep + 1:>3} {result['seconds']:7.3f} {(u1 - u0) / n * 1e6:8.0f} "
                  f"{(s1 - s0) / n * 1e6:8.0f} {(v1 - v0) / n:8.1f} {(i1 - i0) / n:9.1f}"
                  + (f"  ({result['errors']} errors)" if result["errors"] else ""))


def run_profile(args: argparse.Namespace, workdir: str) -> None:
    import pstats

    s = settings(workdir)
    root = args.tree or ROOT
    prefix = os.path.join(workdir, "prof")
    with upstream_server("echo", s) as (_, up):
        port = _free_port()
        argv = [sys.executable, "-c", _PROFILED_PROXY, prefix, "proxy", "--listen", f"127.0.0.1:{port}",
                "--connect", f"127.0.0.1:{up}", *shlex.split(args.args)]
        env = dict(os.environ, PYTHONPATH=root)
        with open(os.path.join(workdir, "proxy.log"), "wb") as log:
            proc = subprocess.Popen(argv, stderr=log, stdout=log, env=env, cwd=root)
        try:
            from peers import wait_listening

            wait_listening(port, proc, os.path.join(workdir, "proxy.log"))
            result = workload(port, args)
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        finally:
            stop(proc)
    n = args.conns
    print(f"{n} connections ({result['errors']} errors), proxy in {root}")
    for name in sorted(f for f in os.listdir(workdir) if f.startswith("prof.")):
        st = pstats.Stats(os.path.join(workdir, name))
        total_calls = sum(v[1] for v in st.stats.values())
        print(f"\n{name[5:]}: {total_calls / n:.0f} function calls per connection, "
              f"{st.total_tt / n * 1e6:.0f} µs per connection under cProfile")
        rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[: args.top]
        print(f"  {'calls/conn':>10} {'own µs/conn':>11} {'cum µs/conn':>11}  function")
        for (path, line, func), (_cc, nc, tt, ct, _callers) in rows:
            where = f"{os.path.basename(path)}:{line}" if line else path
            print(f"  {nc / n:10.2f} {tt / n * 1e6:11.1f} {ct / n * 1e6:11.1f}  {func} ({where})")


def _spy_samples(path: str) -> dict[str, int]:
    """{thread: samples} from a ``py-spy record --threads --format raw`` file."""
    per: dict[str, int] = {}
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip().rpartition(" ")
            if stack:
                thread = stack.split(";", 1)[0]
                per[thread] = per.get(thread, 0) + int(n)
    return per


def run_gil(args: argparse.Namespace, workdir: str) -> None:
    """How much of the time the proxy's threads hold the GIL, under a sustained load."""
    spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if spy is None:
        raise SystemExit("gil: py-spy is missing (pip install py-spy: the bench extra has it)")
    s = settings(workdir)
    peer = Peer("splicepool", "splicepool", shlex.split(args.args), root=args.tree or ROOT)
    rate, seconds = 200, args.seconds
    with upstream_server("echo", s) as (_, up), peer.start(up, workdir) as relay:
        load = subprocess.Popen(
            [sys.executable, LOADGEN, "conns", "--port", str(relay.port), "--count", str(10**9),
             "--seconds", str(2 * seconds + 3), "--concurrency", "50", "--size", str(args.size)],
            stdout=subprocess.PIPE)
        try:
            time.sleep(1.0)  # past the start: workers up, pipes made
            samples = {}
            for flag in ("--idle", "--gil"):  # every thread, always; then only the GIL's holder
                out = os.path.join(workdir, f"spy{flag}.raw")
                subprocess.run([spy, "record", "-p", str(relay.pid), "-r", str(rate), "-d", str(seconds),
                                "--threads", "-f", "raw", "-o", out, flag],
                               capture_output=True, timeout=seconds + 60, check=True)
                samples[flag] = _spy_samples(out)
            result = json.loads(load.communicate(timeout=seconds + 120)[0].splitlines()[-1])
        finally:
            stop(load)
    ticks = rate * seconds
    held = sum(samples["--gil"].values())
    per_conn = held / ticks / result["per_second"] * 1e6
    print(f"{peer.describe()}: 50 clients × {args.size} B connections, {result['per_second']:.0f} conns/s, "
          f"{result['errors']} errors; py-spy at {rate} Hz for {seconds} s, twice")
    print(f"  GIL held {held / ticks:.2f} of the time, {per_conn:.0f} µs per connection")
    for thread, n in sorted(samples["--idle"].items()):
        print(f"  {thread}: holds it {samples['--gil'].get(thread, 0) / ticks:.2f} of the time "
              f"({n / ticks:.2f} sampled)")


def _free_port() -> int:
    from peers import free_port

    return free_port()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["strace", "profile", "cpu", "gil"])
    parser.add_argument("--peer", default="splicepool", choices=["splicepool", "haproxy-splice", "go", "haproxy"])
    parser.add_argument("--tree", help="the splicepool checkout to run (default: this one)")
    parser.add_argument("--conns", type=int, default=1000)
    parser.add_argument("--size", type=int, default=65536)
    parser.add_argument("--args", default="", help="extra arguments for the splicepool proxy")
    parser.add_argument("--reps", type=int, default=3, help="cpu: repetitions")
    parser.add_argument("--top", type=int, default=30, help="profile: rows per thread")
    parser.add_argument("--seconds", type=int, default=5, help="gil: seconds of each py-spy recording")
    parser.add_argument("--json", help="strace: write the counts here too")
    args = parser.parse_args()
    raise_nofile_limit()
    with tempfile.TemporaryDirectory(prefix="splicepool-conncost-") as workdir:
        if args.mode == "strace":
            data = run_strace(args, workdir)
            print_strace(data)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(data, f, indent=1)
        elif args.mode == "cpu":
            run_cpu(args, workdir)
        elif args.mode == "gil":
            run_gil(args, workdir)
        else:
            run_profile(args, workdir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
