"""``python -m splicepool.demo``: a self-contained tour of the splice pool on loopback.

Three parties run in this one process, all on 127.0.0.1:

* an **upstream** server: each connection sends ``"<id> <size> <flag>\\n"`` and some
  upload bytes; the upstream answers with ``size`` deterministic pseudo-random
  bytes while it hashes everything it receives (with flag 1: once the upload ended);
* three **proxy lanes** on one ``SplicePool``, each connecting to the upstream:
  the main lane is ``splicepool.server.ProxyServer``, the proxy that
  ``python -m splicepool proxy`` runs (``pool.proxy()`` per connection: two splices,
  the half-close forwarded); the idle lane calls ``pool.proxy(..., idle=1.0)``
  itself; the capped lane, request/response, splices the upload and then the
  download with ``max=``, one after the other, with ``pool.splice()``;
* **clients**, run concurrently: each uploads, downloads, and hashes. Of the
  default 8, three are big (``--size`` MiB each way), three small, one goes
  through the capped lane and one says nothing on the idle lane.

It prints live progress, then one row per splice, per-worker load and a check
that every byte arrived intact both ways. Exit status 0 when all checks pass.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import itertools
import random
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import EndReason, Proxy, Splice, SplicePool
from .server import ProxyServer

HOST = "127.0.0.1"
MiB = 1 << 20
CHUNK = 256 * 1024
IDLE = 1.0  # the idle lane's timeout (seconds)
CAP = 3 * MiB  # the capped lane's max= on the download direction
DIRS = {"up": "client->upstream", "down": "upstream->client"}
Key = tuple[int, str]  # (connection id, "up" or "down")
Relay = dict[str, Splice]  # a proxied connection's splices: "up" and "down"


def payload(cid: int, direction: str, size: int) -> Iterator[memoryview]:
    """``size`` deterministic pseudo-random bytes: random rotations of a random 1 MiB block.

    Cheap to produce (no per-byte Python work) and prefix-stable: the first n
    bytes do not depend on ``size``.
    """
    rng = random.Random(f"{cid}/{direction}")
    block = rng.randbytes(MiB)
    doubled = memoryview(block + block)
    while size > 0:
        n = min(CHUNK, size)
        start = rng.randrange(MiB)
        yield doubled[start : start + n]
        size -= n


def digest(chunks: Iterable[bytes | memoryview]) -> tuple[int, str]:
    """(bytes, SHA-256) of a stream of chunks."""
    h, n = hashlib.sha256(), 0
    for c in chunks:
        h.update(c)
        n += len(c)
    return n, h.hexdigest()


@dataclass
class Ledger:
    """What each end sent and received, as (bytes, sha256), and what each proxy lane relayed."""

    sent: dict[Key, tuple[int, str]] = field(default_factory=dict)
    got: dict[Key, tuple[int, str]] = field(default_factory=dict)
    started: dict[int, float] = field(default_factory=dict)  # connection id -> client connected
    ended: dict[Key, float] = field(default_factory=dict)  # when the receiver saw the EOF
    cid_of_port: dict[int, int] = field(default_factory=dict)  # client's local port -> id
    relays: dict[int, Relay] = field(default_factory=dict)  # client's local port -> splices
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)
    cond: threading.Condition = field(default_factory=threading.Condition)

    def spawn(self, fn: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:
                self.errors.append(f"{getattr(fn, '__name__', fn)}: {exc!r}")

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)
        return thread

    def send(self, sock: socket.socket, chunks: Iterable[bytes | memoryview], key: Key) -> None:
        """Send and hash every chunk, then the FIN."""
        h, n = hashlib.sha256(), 0
        for c in chunks:
            sock.sendall(c)
            h.update(c)
            n += len(c)
        sock.shutdown(socket.SHUT_WR)
        self.sent[key] = (n, h.hexdigest())

    def receive(self, sock: socket.socket, key: Key, prefix: bytes = b"") -> None:
        h, n = hashlib.sha256(prefix), len(prefix)
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while k := sock.recv_into(buf):
            h.update(view[:k])
            n += k
        self.got[key], self.ended[key] = (n, h.hexdigest()), time.monotonic()

    def relayed(self, port: int, up: Splice, down: Splice) -> None:
        """A lane is done with the client at ``port``: both splices ended, both sockets closed."""
        with self.cond:
            self.relays[port] = {"up": up, "down": down}
            self.cond.notify_all()

    def wait_relays(self, n: int, deadline: float) -> bool:
        with self.cond:
            return self.cond.wait_for(lambda: len(self.relays) >= n, max(0.0, deadline - time.monotonic()))


def listen(ledger: Ledger, handler: Callable[[socket.socket, int], None]) -> socket.socket:
    """A loopback listener that runs ``handler(conn, peer_port)`` in a thread per connection."""
    listener = socket.create_server((HOST, 0))

    def accept_loop() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # the listener was shut
            ledger.spawn(handler, conn, peer[1])

    threading.Thread(target=accept_loop, daemon=True).start()
    return listener


@dataclass
class Plan:
    cid: int
    up: int  # bytes uploaded after the header line
    down: int  # bytes asked of the upstream
    lane: str  # "main", "idle" (sends nothing, idle= ends it) or "capped" (max= on download)


def make_plans(connections: int, size: int) -> list[Plan]:
    plans = []
    for cid in range(1, connections + 1):
        if connections >= 3 and cid == connections:
            plans.append(Plan(cid, 0, 0, "idle"))
        elif connections >= 3 and cid == connections - 1:
            plans.append(Plan(cid, 64 * 1024, 2 * CAP, "capped"))
        elif cid <= 3:  # the big ones
            plans.append(Plan(cid, size * MiB + cid, size * MiB + 7 * cid, "main"))
        else:
            plans.append(Plan(cid, MiB // 2 + 999 * cid, (cid % 4 + 1) * MiB + 777 * cid, "main"))
    return plans


def run_client(plan: Plan, port: int, ledger: Ledger, timeout: float) -> None:
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        ledger.started[plan.cid] = time.monotonic()
        ledger.cid_of_port[sock.getsockname()[1]] = plan.cid
        if plan.lane == "idle":  # say nothing; the proxy's idle timer must cut us off
            try:
                ledger.receive(sock, (plan.cid, "down"))
            except ConnectionResetError:  # a cut relay resets both sides, never a clean FIN
                ledger.got[(plan.cid, "down")] = "reset"
            return
        # "<id> <bytes wanted> <1: answer only after my upload ended>": the capped lane is
        # request/response, so its upload has ended (EOF) before max= cuts the download.
        header = f"{plan.cid} {plan.down} {int(plan.lane == 'capped')}\n".encode()
        upload = itertools.chain([header], payload(plan.cid, "up", plan.up))
        sender = ledger.spawn(ledger.send, sock, upload, (plan.cid, "up"))
        ledger.receive(sock, (plan.cid, "down"))
        sender.join()


class Upstream:
    """Reads a header, answers with the bytes asked for, and hashes everything it receives.

    It answers while it receives (both directions busy at once), or, if the header
    asks so, once the upload has ended.
    """

    def __init__(self, ledger: Ledger, timeout: float) -> None:
        self.ledger, self.timeout = ledger, timeout
        self.listener = listen(ledger, self._serve)
        self.port = self.listener.getsockname()[1]

    def _serve(self, conn: socket.socket, _port: int) -> None:
        conn.settimeout(self.timeout)
        with conn:
            head = b""
            while b"\n" not in head:
                try:
                    data = conn.recv(CHUNK)
                except ConnectionResetError:
                    return  # the idle client's relay, cut before it said anything
                if not data:
                    return
                head += data
            cid, down, after = map(int, head.split(b"\n", 1)[0].split())
            sender = None if after else self.ledger.spawn(self._answer, conn, cid, down)
            self.ledger.receive(conn, (cid, "up"), prefix=head)
            if sender is None:
                self._answer(conn, cid, down)
            else:
                sender.join()

    def _answer(self, conn: socket.socket, cid: int, down: int) -> None:
        try:
            self.ledger.send(conn, payload(cid, "down", down), (cid, "down"))
        except OSError:  # EPIPE, ECONNRESET or ENOTCONN (at shutdown)
            pass  # the capped lane cuts us off after max= bytes; elsewhere the checks see it


def idle_lane(pool: SplicePool, upstream: int, ledger: Ledger, client: socket.socket, port: int) -> None:
    """``pool.proxy(idle=)``: the pool owns and closes both sockets (it detaches these objects)."""
    with client, socket.create_connection((HOST, upstream)) as up:  # closed here only on failure
        relay = pool.proxy(client, up, idle=IDLE)
    relay.add_done_callback(lambda r: ledger.relayed(port, r.forward, r.reverse))


def capped_lane(pool: SplicePool, upstream: int, ledger: Ledger, timeout: float,
                client: socket.socket, port: int) -> None:
    """``proxy()`` has no ``max=``; request/response needs no relay: two splices in turn."""
    with client, socket.create_connection((HOST, upstream)) as up:
        upload = pool.splice(client, up)
        upload.wait(timeout)  # EOF: the client's request is complete
        up.shutdown(socket.SHUT_WR)  # pass its FIN on: the upstream answers now
        download = pool.splice(up, client, max=CAP)
        download.wait(timeout)  # MAX: the rest of the answer stays unread, and is reset
    ledger.relayed(port, upload, download)


def watch(server: ProxyServer, clients: list[threading.Thread], deadline: float) -> bool:
    """Show progress until every client is done; False if the deadline passed first."""
    tty = sys.stdout.isatty()
    period = 0.25 if tty else 1.0
    last = [0, time.monotonic()]  # bytes and time of the previous line

    def show() -> None:
        now, stats = time.monotonic(), server.stats()
        conns, pool = stats["connections"], stats["pool"]
        rate = (pool["bytes"] - last[0]) / max(now - last[1], 1e-3) / MiB
        last[:] = pool["bytes"], now
        line = (f"  server connections {conns['live']:3d} live {conns['finished']:3d} finished  "
                f"{pool['bytes'] / MiB:9.1f} MiB moved  {rate:8.1f} MiB/s  {pool['live']:3d} live splices")
        print("\r" + line if tty else line, end="" if tty else "\n", flush=True)

    tick = time.monotonic() + period
    while (alive := [t for t in clients if t.is_alive()]) and time.monotonic() < deadline:
        alive[0].join(max(0.0, min(tick, deadline) - time.monotonic()))
        if time.monotonic() >= tick:
            show()
            tick += period
    show()
    if tty:
        print()
    return not alive


def check(plans: list[Plan], relays: dict[int, Relay], ledger: Ledger, server: ProxyServer) -> list[str]:
    """Every way a byte could have gone missing; an empty list means all is well."""
    bad = list(ledger.errors)
    for p in plans:
        sps = relays.get(p.cid)
        if sps is None:
            bad.append(f"conn {p.cid}: the proxy never finished it")
            continue
        if p.lane == "idle":
            reasons = {sps[d].reason for d in DIRS}
            if EndReason.IDLE not in reasons or any(sps[d].transferred for d in DIRS):
                bad.append(f"conn {p.cid}: expected an IDLE end with 0 bytes, got {reasons}")
            if ledger.got.get((p.cid, "down")) != "reset":
                bad.append(f"conn {p.cid}: the idle client was not reset when idle= cut it")
            continue
        for d in DIRS:
            sp, key = sps[d], (p.cid, d)
            capped = p.lane == "capped" and d == "down"
            want = digest(payload(p.cid, d, CAP)) if capped else ledger.sent.get(key)
            reason = EndReason.MAX if capped else EndReason.EOF
            if want is None:
                bad.append(f"conn {p.cid} {DIRS[d]}: the sender never finished")
            elif ledger.got.get(key) != want:
                bad.append(f"conn {p.cid} {DIRS[d]}: received {ledger.got.get(key)}, sent {want}")
            elif sp.transferred != want[0]:
                bad.append(f"conn {p.cid} {DIRS[d]}: transferred {sp.transferred} != {want[0]} sent")
            if sp.reason is not reason or sp.dropped:
                bad.append(f"conn {p.cid} {DIRS[d]}: ended {sp.reason}, dropped {sp.dropped}")
    main = [relays[p.cid] for p in plans if p.lane == "main" and p.cid in relays]
    conns = server.stats()["connections"]
    counted = (conns["finished"], conns["bytes_up"], conns["bytes_down"])
    if counted != (len(main), sum(r["up"].transferred for r in main), sum(r["down"].transferred for r in main)):
        bad.append(f"server counters (finished, bytes up, bytes down) {counted} differ from its relays")
    return bad


def report(pool: SplicePool, plans: list[Plan], relays: dict[int, Relay], ledger: Ledger, wall: float) -> None:
    print(f"\n{'conn':>4}  {'lane':<6}  {'direction':<16}  {'bytes':>13}  {'MiB/s':>8}  "
          f"{'reason':<9}  {'worker':>6}  mode")
    total = 0
    for p in plans:
        for d, sp in relays.get(p.cid, {}).items():  # MiB/s: from the client's connect to the EOF
            secs = ledger.ended.get((p.cid, d), time.monotonic()) - ledger.started[p.cid]
            reason = sp.reason.name if sp.reason else "(live)"
            mode = "zero-copy" if sp.zero_copy else "copy"
            total += sp.transferred
            print(f"{p.cid:>4}  {p.lane:<6}  {DIRS[d]:<16}  {sp.transferred:>13,}  "
                  f"{sp.transferred / MiB / max(secs, 1e-6):>8.1f}  {reason:<9}  {sp.worker:>6}  {mode}")
    print(f"total: {total:,} bytes ({total / MiB:.1f} MiB) in {wall:.2f} s, "
          f"{total / MiB / wall:.1f} MiB/s through the proxy")
    for w in pool.stats()["workers"]:
        print(f"  worker {w['index']}: {w['bytes']:>13,} bytes  {w['passes']:>7,} passes  "
              f"{w['wakeups']:>7,} wakeups  splices zero-copy/copy {w['zero_copy']}/{w['copy']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m splicepool.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, metavar="N", help="clients (default 8; --big: 16)")
    parser.add_argument("--size", type=int, metavar="MIB",
                        help="MiB each way for the big connections (default 768; --big: 4096)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="pool workers (default: CPUs)")
    parser.add_argument("--copy", action="store_true", help="force the copy path (no os.splice)")
    parser.add_argument("--seconds", type=float, metavar="S",
                        help="give up after S seconds and exit 1 (default 45; --big: 300)")
    parser.add_argument("--big", action="store_true", help="a bigger, longer run (defaults in brackets)")
    args = parser.parse_args(argv)
    for name, normal, big in (("connections", 8, 16), ("size", 768, 4096), ("seconds", 45.0, 300.0)):
        if getattr(args, name) is None:
            setattr(args, name, big if args.big else normal)
    if args.connections < 1 or args.size < 1:
        parser.error("--connections and --size must be at least 1")

    start = time.monotonic()
    deadline = start + args.seconds
    ledger = Ledger()
    plans = make_plans(args.connections, args.size)
    pool = SplicePool(workers=args.workers, zero_copy=False if args.copy else None)
    upstream = Upstream(ledger, args.seconds)

    def server_finished(_id: int, peer: str, relay: Proxy) -> None:
        ledger.relayed(int(peer.rpartition(":")[2]), relay.forward, relay.reverse)

    server = ProxyServer((HOST, 0), (HOST, upstream.port), pool=pool, on_finished=server_finished)
    serving = threading.Thread(target=server.serve_forever, args=(0.2,), daemon=True)
    serving.start()
    lanes = {"idle": listen(ledger, functools.partial(idle_lane, pool, upstream.port, ledger)),
             "capped": listen(ledger, functools.partial(capped_lane, pool, upstream.port, ledger, args.seconds))}
    ports = {"main": server.address[1]} | {lane: sock.getsockname()[1] for lane, sock in lanes.items()}
    volume = sum(p.up + p.down for p in plans) / MiB
    print(f"splicepool demo: {len(plans)} connections, {volume:.0f} MiB through a ProxyServer and "
          f"two more lanes on {pool.workers} workers ({'copy' if args.copy else 'zero-copy where possible'})")
    try:
        clients = [ledger.spawn(run_client, p, ports[p.lane], ledger, args.seconds) for p in plans]
        finished = watch(server, clients, deadline)
        finished &= ledger.wait_relays(len(plans), deadline)  # every lane has closed its sockets
        for thread in ledger.threads:  # upstream handlers too (the list may grow meanwhile)
            thread.join(max(0.0, deadline - time.monotonic()))
            finished &= not thread.is_alive()
    finally:
        wall = time.monotonic() - start
        server.stop()  # its loop closes the pool on the way out, ending what is left
        serving.join()
        pool.close(grace=0.2)  # a no-op unless the server's loop died
        for listener in [upstream.listener, *lanes.values()]:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            listener.close()
    relays = {ledger.cid_of_port.get(port, -port): sps for port, sps in list(ledger.relays.items())}
    report(pool, plans, relays, ledger, wall)
    bad = check(plans, relays, ledger, server)
    if not finished:
        bad.insert(0, f"TIMEOUT: not finished after {args.seconds:g} s")
    elif pool.stats()["bytes"] != sum(sp.transferred for sps in relays.values() for sp in sps.values()):
        bad.append("pool.stats()['bytes'] differs from the splices' transferred sum")
    for line in bad:
        print("FAILED:", line)
    if not bad:
        print(f"ALL CHECKS PASSED: {len(plans)} connections, every byte arrived intact both ways "
              "(SHA-256 and byte counts match, transferred == sent)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
