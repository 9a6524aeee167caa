"""The relays bench/compare.py measures ("peers"), as processes, and what /proc says about them.

A peer listens on 127.0.0.1:PORT and forwards each connection to an upstream
port. ``Peer.start`` runs it in its own process group and waits until it
listens; ``stop`` ends the whole group. ``usage`` sums CPU time, RSS, PSS,
open fds, processes and threads over a process and all its descendants (socat
forks one process per connection).
"""

from __future__ import annotations

import ctypes
import os
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
HOST = "127.0.0.1"
KINDS = ("direct", "splicepool", "thread", "asyncio", "haproxy", "haproxy-splice", "go", "socat")
GO_RELAY = os.path.join(HERE, "relay_go", "relay")  # built from relay_go/main.go on first use
HAPROXY_MAXPIPES = 256  # pipes haproxy may keep for splicing; the bulk runs need at most 8
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def raise_nofile_limit() -> int:
    """Raise this process's soft RLIMIT_NOFILE to the hard limit (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def haproxy_maxconn() -> int:
    """The largest maxconn haproxy starts with under our fd limit.

    haproxy wants 2 fds per connection, 2 per pipe and ~20 more (at startup it
    refuses a need above the hard RLIMIT_NOFILE); 64 to spare.
    """
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return (limit - 2 * HAPROXY_MAXPIPES - 64) // 2


# --- processes ---------------------------------------------------------------

_live: set[subprocess.Popen] = set()


def child_setup(cpus: set[int] | None = None) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL if this process dies (even by SIGKILL), and
    with ``cpus`` runs there only, as does every thread it starts."""

    def setup() -> None:
        _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if cpus is not None:
            os.sched_setaffinity(0, cpus)

    return setup


def spawn(argv: list[str], log_path: str, cpus: set[int] | None = None, **kwargs) -> subprocess.Popen:
    """Start ``argv`` in a new process group (on ``cpus`` if given), stderr (and stdout unless
    piped) to ``log_path``."""
    with open(log_path, "ab") as log:
        kwargs.setdefault("stdout", log)
        proc = subprocess.Popen(argv, stderr=log, start_new_session=True,
                                preexec_fn=child_setup(cpus), **kwargs)
    _live.add(proc)
    return proc


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it; reap the leader."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout)
    for pipe in (proc.stdin, proc.stdout):
        if pipe:
            pipe.close()
    _live.discard(proc)


def stop_all() -> None:
    for proc in list(_live):
        stop(proc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp, no connection made)."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return any(line.split()[1:4:2] == [local, "0A"] for line in f)


def wait_listening(port: int, proc: subprocess.Popen, log_path: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            state = f"exited with {proc.returncode}" if proc.returncode is not None else "timed out"
            raise RuntimeError(f"{shlex.join(proc.args)}: {state} before listening on {port}; "
                               f"log: {tail(log_path)}")
        time.sleep(0.02)


def tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-lines:]) or "(empty)"
    except OSError:
        return "(none)"


# --- /proc accounting --------------------------------------------------------


def tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        found.append(p)
        todo += children.get(p, [])
    return found


def _stat_cpu(pid: int) -> tuple[float, float]:
    """(utime + stime + cutime + cstime, utime + cutime) of one process, in seconds (0 if it
    is gone): all its CPU time, and the part in user mode."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime + cutime + cstime) / CLK_TCK, (utime + cutime) / CLK_TCK


def cpu_times(pid: int) -> tuple[float, float]:
    """(all, user mode) CPU time of ``pid``'s tree: every live process's own time plus that
    of the reaped ones; the rest of all is the kernel's, for the processes."""
    times = [_stat_cpu(p) for p in tree(pid)]
    return sum(t for t, _ in times), sum(u for _, u in times)


def cpu_seconds(pid: int) -> float:
    """All CPU time of ``pid``'s tree (``cpu_times``)."""
    return cpu_times(pid)[0]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat's first line.

    Busy counts user, nice, system, irq and softirq time: on loopback much of the
    TCP work runs in softirq context, charged to no process.
    """
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    busy = user + nice + system + irq + softirq
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def _status_kib(pid: int, key: str, path: str = "status") -> int:
    try:
        with open(f"/proc/{pid}/{path}") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def usage(pid: int) -> dict[str, int]:
    """RSS and PSS (KiB), open fds, processes and threads, summed over ``pid``'s tree."""
    total = {"rss_kib": 0, "pss_kib": 0, "fds": 0, "procs": 0, "threads": 0}
    for p in tree(pid):
        try:
            total["fds"] += len(os.listdir(f"/proc/{p}/fd"))
        except OSError:
            continue
        total["procs"] += 1
        total["rss_kib"] += _status_kib(p, "VmRSS:")
        total["threads"] += _status_kib(p, "Threads:")
        total["pss_kib"] += _status_kib(p, "Pss:", "smaps_rollup")
    return total


def wait_single(pid: int, timeout: float = 10.0) -> None:
    """Wait until ``pid`` has no child process left (socat's per-connection children)."""
    deadline = time.monotonic() + timeout
    while len(tree(pid)) > 1 and time.monotonic() < deadline:
        time.sleep(0.05)


# --- peers -------------------------------------------------------------------


def build_go_relay() -> str | None:
    """Build bench/relay_go/relay from main.go when it is missing or older; None when it is
    there, else why it cannot be."""
    source = os.path.join(HERE, "relay_go", "main.go")
    if os.path.exists(GO_RELAY) and os.path.getmtime(GO_RELAY) >= os.path.getmtime(source):
        return None
    if not shutil.which("go"):
        return "not installed (apt-get install golang-go)"
    env = dict(os.environ, GOCACHE=os.environ.get("GOCACHE", "/tmp/splicepool-gocache"), GO111MODULE="off")
    done = subprocess.run(["go", "build", "-o", GO_RELAY, source], env=env, capture_output=True, text=True,
                          timeout=300)
    if done.returncode != 0:
        return f"go build failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


@dataclass
class Peer:
    """One column of the report: a relay kind, and for splicepool its CLI arguments."""

    name: str
    kind: str
    args: list[str] = field(default_factory=list)
    root: str = ROOT  # the checkout whose splicepool runs (another one: a before/after column)

    def missing(self) -> str | None:
        """Why this peer cannot run here, or None (the Go relay is built here if need be)."""
        if self.kind == "go":
            return build_go_relay()
        binary = {"haproxy": "haproxy", "haproxy-splice": "haproxy", "socat": "socat"}.get(self.kind)
        if binary and not shutil.which(binary):
            return f"not installed (apt-get install {binary})"
        return None

    def command(self, port: str, upstream: str, cfg: str) -> list[str]:
        """The argv listening on ``port`` and forwarding to ``upstream`` (haproxy: config ``cfg``)."""
        listen, connect = f"{HOST}:{port}", f"{HOST}:{upstream}"
        if self.kind == "splicepool":
            return [sys.executable, "-m", "splicepool", "proxy", "--listen", listen,
                    "--connect", connect, *self.args]
        if self.kind in ("thread", "asyncio"):
            return [sys.executable, os.path.join(HERE, f"relay_{self.kind}.py"),
                    "--listen", listen, "--connect", connect]
        if self.kind.startswith("haproxy"):
            return ["haproxy", "-db", "-f", cfg]
        if self.kind == "go":
            return [GO_RELAY, "-listen", listen, "-connect", connect]
        if self.kind == "socat":
            return ["socat", f"TCP-LISTEN:{port},fork,reuseaddr,bind={HOST},backlog=1024,nodelay",
                    f"TCP:{connect},nodelay"]
        raise ValueError(f"no command for {self.kind}")

    def describe(self) -> str:
        """The command line, for the report."""
        if self.kind == "direct":
            return "(none: clients connect to the upstream)"
        argv = self.command("PORT", "UPSTREAM", "haproxy.cfg")
        where = f"(in {self.root}) " if self.root != ROOT else ""
        return where + shlex.join(argv).replace(sys.executable, "python")

    def start(self, upstream: int, workdir: str, cpus: set[int] | None = None) -> Running:
        """Run this peer in front of ``upstream`` (on ``cpus``); for ``direct``, just the
        upstream port."""
        if self.kind == "direct":
            return Running(upstream, None)
        port = free_port()
        log_path = os.path.join(workdir, f"{self.name}-{port}.log")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [self.root, os.environ.get("PYTHONPATH")])))
        cfg = os.path.join(workdir, f"haproxy-{port}.cfg")
        if self.kind.startswith("haproxy"):
            with open(cfg, "w") as f:
                f.write(haproxy_config(port, upstream, always_splice=self.kind == "haproxy-splice"))
        proc = spawn(self.command(str(port), str(upstream), cfg), log_path, cpus, env=env, cwd=self.root,
                     stdin=subprocess.DEVNULL)
        try:
            wait_listening(port, proc, log_path)
        except BaseException:
            stop(proc)
            raise
        return Running(port, proc)


@dataclass
class Running:
    """A started peer: the port clients connect to and its process (None for ``direct``)."""

    port: int
    proc: subprocess.Popen | None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def __enter__(self) -> Running:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def haproxy_config(port: int, upstream: int, always_splice: bool = False) -> str:
    """tcp mode with splice-auto; or (``always_splice``) splicing both ways with 1 MiB pipes,
    as splicepool does (splice-auto does not splice at all in these workloads)."""
    maxconn = haproxy_maxconn()
    tune = "\n    tune.pipesize 1048576" if always_splice else ""
    splice = ("option splice-request\n    option splice-response" if always_splice
              else "option splice-auto")
    return f"""\
global
    maxconn {maxconn}
    maxpipes {HAPROXY_MAXPIPES}{tune}
    # nbthread: the default, one thread per CPU

defaults
    mode tcp
    {splice}
    maxconn {maxconn}
    timeout connect 10s
    timeout client 1h
    timeout server 1h

listen relay
    bind {HOST}:{port}
    server upstream {HOST}:{upstream}
"""

