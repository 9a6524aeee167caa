"""``python -m splicepool.demo``: a self-contained tour of the splice pool on loopback.

Three parties run in this one process, all on 127.0.0.1:

* an **upstream** server: each connection sends ``"<id> <size> <flag>\\n"`` and some
  upload bytes; the upstream answers with ``size`` deterministic pseudo-random
  bytes while it hashes everything it receives (with flag 1: once the upload ended);
* a **proxy** whose accept thread only connects to the upstream and splices the
  two sockets together, client → upstream and upstream → client, on one
  ``SplicePool``. When a direction ends by EOF, its drain is shut for writing
  (``SHUT_WR``) so the peer sees the FIN; any other end aborts the other
  direction; when both have ended, both sockets are closed. (This is what
  ``pool.proxy()`` does for you; it is spelled out here to show the core API.)
  A second proxy lane splices with ``idle=``, a third with ``max=``;
* **clients**, run concurrently: each uploads, downloads, and hashes. Of the
  default 8, three are big (``--size`` MiB each way), three small, one goes
  through the ``max=`` lane and one says nothing on the ``idle=`` lane.

It prints live progress, then one row per splice, per-worker load and a check
that every byte arrived intact both ways. Exit status 0 when all checks pass.
"""

from __future__ import annotations

import argparse
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

from . import EndReason, Splice, SplicePool

HOST = "127.0.0.1"
MiB = 1 << 20
CHUNK = 256 * 1024
IDLE = 1.0  # the idle lane's timeout (seconds)
CAP = 3 * MiB  # the capped lane's max= on the download direction
DIRS = {"up": "client->upstream", "down": "upstream->client"}
Key = tuple[int, str]  # (connection id, "up" or "down")


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
    """What each end sent and received, as (bytes, sha256), by (connection id, direction)."""

    sent: dict[Key, tuple[int, str]] = field(default_factory=dict)
    got: dict[Key, tuple[int, str]] = field(default_factory=dict)
    cid_of_port: dict[int, int] = field(default_factory=dict)  # client's local port -> id
    errors: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def spawn(self, fn: Callable[..., None], *args: Any) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except Exception as exc:
                self.errors.append(f"{fn.__name__}: {exc!r}")

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
        self.got[key] = (n, h.hexdigest())


def listen(handler: Callable[[socket.socket, int], None]) -> socket.socket:
    """A loopback listener whose one accept thread calls ``handler(conn, peer_port)``."""
    listener = socket.create_server((HOST, 0))

    def accept_loop() -> None:
        while True:
            try:
                conn, peer = listener.accept()
            except OSError:
                return  # the listener was shut
            handler(conn, peer[1])

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
        ledger.cid_of_port[sock.getsockname()[1]] = plan.cid
        if plan.lane == "idle":  # say nothing; the proxy's idle timer must close us
            ledger.receive(sock, (plan.cid, "down"))
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
        self.listener = listen(lambda conn, _port: ledger.spawn(self._serve, conn))
        self.port = self.listener.getsockname()[1]

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(self.timeout)
        with conn:
            head = b""
            while b"\n" not in head:
                data = conn.recv(CHUNK)
                if not data:
                    return  # the idle client: closed before it said anything
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


@dataclass
class Relay:
    """One proxied connection: its sockets, its two splices and when they ended."""

    port: int  # the client's port: tells which client this is
    client: socket.socket
    upstream: socket.socket
    started: float
    splices: dict[str, Splice] = field(default_factory=dict)
    ended: dict[str, float] = field(default_factory=dict)
    aborted: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)
    closed: threading.Event = field(default_factory=threading.Event)


class Proxy:
    """A listener whose one accept thread connects upstream and hands both sockets to the pool."""

    def __init__(self, pool: SplicePool, upstream: int, lane: str,
                 idle: float | None = None, max_down: int = 0) -> None:
        self.pool, self.upstream, self.lane = pool, upstream, lane
        self.idle, self.max_down = idle, max_down
        self.relays: list[Relay] = []
        self.errors: list[str] = []
        self.listener = listen(self._accept)
        self.port = self.listener.getsockname()[1]

    def _accept(self, client: socket.socket, port: int) -> None:
        """In the accept thread: connect upstream, splice both ways, and get back to accepting."""
        try:
            upstream = socket.create_connection((HOST, self.upstream))
        except OSError as exc:
            self.errors.append(f"proxy {self.lane}: {exc!r}")
            client.close()
            return
        relay = Relay(port, client, upstream, time.monotonic())
        self.relays.append(relay)
        try:
            self._splice(relay, "up", client, upstream, 0)
            self._splice(relay, "down", upstream, client, self.max_down)
        except (OSError, RuntimeError) as exc:
            self.errors.append(f"proxy {self.lane}: {exc!r}")
            for sock in (client, upstream):  # a splice already made sees this and ends
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
            relay.closed.set()

    def _splice(self, relay: Relay, direction: str, src: socket.socket,
                dst: socket.socket, max: int) -> None:
        sp = self.pool.splice(src, dst, max=max, idle=self.idle)
        with relay.lock:
            relay.splices[direction] = sp
            aborted = relay.aborted
        sp.add_done_callback(lambda sp: self._ended(relay, direction, sp))
        if aborted:  # the other direction already ended badly
            _unsplice(sp)

    @staticmethod
    def _ended(relay: Relay, direction: str, sp: Splice) -> None:
        """Done callback, in a worker thread: forward the FIN, or abort; close when both are done."""
        if sp.reason is EndReason.EOF:
            try:
                sp.drain.shutdown(socket.SHUT_WR)
            except OSError:
                pass  # the peer is gone already
        other = None
        with relay.lock:
            relay.ended[direction] = time.monotonic()
            if sp.reason is not EndReason.EOF and not relay.aborted:
                relay.aborted = True
                other = relay.splices.get("down" if direction == "up" else "up")
            finished = len(relay.ended) == 2
        if other is not None:
            _unsplice(other)
        if finished:
            relay.client.close()
            relay.upstream.close()
            relay.closed.set()


def _unsplice(sp: Splice) -> None:
    try:
        sp.unsplice()
    except (OSError, RuntimeError):
        pass  # it has ended meanwhile, or the pool is closing


def watch(pool: SplicePool, clients: list[threading.Thread], deadline: float) -> bool:
    """Show progress until every client is done; False if the deadline passed first."""
    tty = sys.stdout.isatty()
    period = 0.25 if tty else 1.0
    last = [0, time.monotonic()]  # bytes and time of the previous line

    def show() -> None:
        now, stats = time.monotonic(), pool.stats()
        rate = (stats["bytes"] - last[0]) / max(now - last[1], 1e-3) / MiB
        last[:] = stats["bytes"], now
        done = sum(not t.is_alive() for t in clients)
        line = (f"  {stats['bytes'] / MiB:9.1f} MiB moved  {rate:8.1f} MiB/s  "
                f"{stats['live']:3d} live splices  {done}/{len(clients)} clients done")
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


def check(plans: list[Plan], relays: dict[int, Relay], ledger: Ledger) -> list[str]:
    """Every way a byte could have gone missing; an empty list means all is well."""
    bad = list(ledger.errors)
    for p in plans:
        relay = relays.get(p.cid)
        if relay is None or len(relay.ended) < 2:
            bad.append(f"conn {p.cid}: the proxy never finished it")
            continue
        sps = relay.splices
        if p.lane == "idle":
            reasons = {sps[d].reason for d in DIRS}
            if EndReason.IDLE not in reasons or any(sps[d].transferred for d in DIRS):
                bad.append(f"conn {p.cid}: expected an IDLE end with 0 bytes, got {reasons}")
            if ledger.got.get((p.cid, "down")) != digest([]):
                bad.append(f"conn {p.cid}: the idle client did not see a clean EOF")
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
    return bad


def report(pool: SplicePool, plans: list[Plan], relays: dict[int, Relay], wall: float) -> None:
    print(f"\n{'conn':>4}  {'lane':<6}  {'direction':<16}  {'bytes':>13}  {'MiB/s':>8}  "
          f"{'reason':<9}  {'worker':>6}  mode")
    total = 0
    for p in plans:
        relay = relays.get(p.cid)
        for d in DIRS if relay else ():
            sp = relay.splices.get(d)
            if sp is None:
                continue
            secs = relay.ended.get(d, time.monotonic()) - relay.started
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
    parser.add_argument("--connections", type=int, default=8, metavar="N", help="clients (default 8)")
    parser.add_argument("--size", type=int, default=768, metavar="MIB",
                        help="MiB each way for the big connections (default 768)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="pool workers (default: CPUs)")
    parser.add_argument("--copy", action="store_true", help="force the copy path (no os.splice)")
    parser.add_argument("--seconds", type=float, default=45.0, metavar="S",
                        help="give up after S seconds and exit 1 (default 45)")
    args = parser.parse_args(argv)
    if args.connections < 1 or args.size < 1:
        parser.error("--connections and --size must be at least 1")

    start = time.monotonic()
    deadline = start + args.seconds
    ledger = Ledger()
    plans = make_plans(args.connections, args.size)
    pool = SplicePool(workers=args.workers, zero_copy=False if args.copy else None)
    upstream = Upstream(ledger, args.seconds)
    lanes = {"main": Proxy(pool, upstream.port, "main"),
             "idle": Proxy(pool, upstream.port, "idle", idle=IDLE),
             "capped": Proxy(pool, upstream.port, "capped", max_down=CAP)}
    volume = sum(p.up + p.down for p in plans) / MiB
    print(f"splicepool demo: {len(plans)} connections, {volume:.0f} MiB through a proxy on "
          f"{pool.workers} workers ({'copy' if args.copy else 'zero-copy where possible'})")
    try:
        clients = [ledger.spawn(run_client, p, lanes[p.lane].port, ledger, args.seconds)
                   for p in plans]
        finished = watch(pool, clients, deadline)
        # Clients are done; let the relays close and the upstream record what it got.
        relays = {ledger.cid_of_port.get(r.port, -r.port): r
                  for proxy in lanes.values() for r in proxy.relays}
        for relay in relays.values():
            finished &= relay.closed.wait(max(0.0, deadline - time.monotonic()))
        for thread in ledger.threads:  # upstream handlers too (the list may grow meanwhile)
            thread.join(max(0.0, deadline - time.monotonic()))
            finished &= not thread.is_alive()
        for proxy in lanes.values():
            ledger.errors.extend(proxy.errors)
        wall = time.monotonic() - start
        report(pool, plans, relays, wall)
        bad = check(plans, relays, ledger)
        if not finished:
            bad.insert(0, f"TIMEOUT: not finished after {args.seconds:g} s")
        elif pool.stats()["bytes"] != sum(sp.transferred for r in relays.values()
                                          for sp in r.splices.values()):
            bad.append("pool.stats()['bytes'] differs from the splices' transferred sum")
    finally:
        pool.close(grace=0.2)
        for listener in [upstream.listener] + [p.listener for p in lanes.values()]:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
            except OSError:
                pass
            listener.close()
    for line in bad:
        print("FAILED:", line)
    if not bad:
        print(f"ALL CHECKS PASSED: {len(plans)} connections, every byte arrived intact both ways "
              "(SHA-256 and byte counts match, transferred == sent)")
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
