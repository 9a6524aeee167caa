"""Property tests (hypothesis): random mixes of valid and invalid calls, in random orders.

``PoolMachine`` drives one pool through ``splice`` / ``unsplice`` / ``transferred`` with
every kind of argument docs/contract.md's "Errors" talks about (connected TCP and AF_UNIX stream
sockets, closed fds, pipes, a file, UDP, listening and unconnected sockets, bad ``max``
and ``idle`` values, wrong types), while it sends data, closes sockets and hangs up peers.
A model predicts each call's outcome: success, or exactly the documented error (``OSError``
with FreeBSD's errno, checked in its order; ``TypeError``; ``RuntimeError`` once the pool
is closed). After every step the pool's books must agree with the model; at the end every
byte sent must be accounted for, in order, and ``close()`` must leave no fd or thread.

A multi-threaded variant races four threads over sixteen links.
"""

from __future__ import annotations

import errno
import math
import os
import random
import socket
import struct
import tempfile
import threading
import time

import pytest
from conftest import GEVENT, Collector, Link, open_fds, tcp_pair, thread_count, until, wakeups
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from splicepool import EndReason, SplicePool, SpliceState, _sockets
from splicepool.splice import LIVE_STATES

S = SpliceState
R = EndReason
OFF_MAX = (1 << 63) - 1
WORKERS = 2
ENDING = frozenset({S.CLOSING, S.EXCEPTION})
SETTLE = 5.0  # seconds a step may take to reach a quiet state


# -- helpers ----------------------------------------------------------------------------


def key_of(fd: int) -> int:
    """The pool's key for the socket behind ``fd`` (its inode number)."""
    return _sockets.socket_key(fd)



def fd_name(fd: int) -> str:
    try:
        return f"{fd}={os.readlink(f'/proc/self/fd/{fd}')}"
    except OSError:
        return str(fd)


def same_fds(now: set[int], want: set[int], names0: dict[int, str]) -> bool:
    """``now == want``; under gevent, the hub's epoll fd may have been replaced meanwhile.

    libev never EPOLL_CTL_DELs a watched fd: when the pool closes its duplicate while the
    user's fd keeps the socket open, the stale registration reports events for a number
    libev has forgotten, and libev rebuilds its epoll set on a new fd (same count).
    """
    if now == want:
        return True
    if not GEVENT:
        return False
    gone = all(names0.get(fd, "").endswith("[eventpoll]") for fd in want - now)
    new = all(fd_name(fd).endswith("[eventpoll]") for fd in now - want)
    return gone and new and len(now) == len(want)


def fd_diff(now: set[int], want: set[int]) -> str:
    return f"unexpected: {[fd_name(fd) for fd in sorted(now - want)]}, missing: {sorted(want - now)}"


def outcome(fn):
    """("ok", value) or (kind, exception) for the documented kinds; anything else propagates."""
    try:
        return ("ok", fn())
    except TypeError as exc:
        return ("type", exc)
    except RuntimeError as exc:
        return ("runtime", exc)
    except OSError as exc:
        return ("errno", exc)


class FilenoLiar:
    """Has a fileno() that does not return an int."""

    def fileno(self):
        return "7"

    def __repr__(self) -> str:
        return "FilenoLiar()"


class Conn:
    """One connection: the pool is handed ``sock``; the test drives ``peer``."""

    def __init__(self, name: str, sock: socket.socket, peer: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.peer = peer
        self.fd = sock.fileno()
        self.key = key_of(self.fd)
        peer.setblocking(False)
        self.closed = False  # the user closed sock, or handed it to the pool (close=True)
        self.peer_closed = False
        self.peer_eof = False
        self.peer_broken = False  # the peer saw a reset: what it read may be incomplete
        self.stream = bytearray()  # every byte the peer sent into sock
        self.received = bytearray()  # every byte the peer read (what sock sent)

    def __repr__(self) -> str:
        return f"Conn({self.name})"


class Item:
    """Something to pass as a source or drain: a connection, a wrong kind of fd, a wrong type."""

    def __init__(self, name: str, kind: str, obj: object, conn: Conn | None = None) -> None:
        self.name = name
        self.kind = kind  # conn, proto, listen, unconn, notsock, ebadf, type
        self.obj = obj
        self.conn = conn
        self.closable = isinstance(obj, socket.socket)
        self.fd = obj.fileno() if self.closable else None
        self.closed = False

    def value(self, as_int: bool) -> object:
        """What is passed: the object, or its fd number (-1 once the socket is closed)."""
        if as_int and self.closable:
            return self.obj.fileno()
        return self.obj

    def klass(self, value: object) -> str:
        if self.kind == "type":
            return "type"
        if self.kind == "ebadf" or (self.closable and self.closed):
            return "ebadf"
        if isinstance(value, int) and value < 0:
            return "ebadf"
        return self.kind


class Rec:
    """A splice the model knows about."""

    def __init__(self, sp, src: Conn, dst: Conn, off: int, short_idle: bool) -> None:
        self.sp = sp
        self.src = src
        self.dst = dst
        self.off = off  # where in src.stream it started taking
        self.short_idle = short_idle
        self.allowed: set[EndReason] = set()  # end reasons the model accepts for it
        if sp.max:
            self.allowed.add(R.MAX)
        if short_idle:
            self.allowed.add(R.IDLE)

    def __repr__(self) -> str:
        return f"Rec({self.src.name}->{self.dst.name} off={self.off} {self.sp!r})"


def as_seconds(idle: float) -> float:
    try:
        return float(idle)
    except OverflowError:  # an int too big for a float: no timer
        return math.inf


def neg_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value < 0


def bad_max_type(value: object) -> bool:
    return isinstance(value, bool) or not isinstance(value, int)


def bad_idle_type(value: object) -> bool:
    return value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)))


# -- strategies -------------------------------------------------------------------------

CONN_NAMES = ["tcp0", "tcp1", "tcp2", "tcp3", "unix0"]
OTHER_NAMES = [
    "udp", "unix-dgram", "listener", "unconnected", "pipe", "file", "closed-sock",
    "bad-fd", "negative-fd", "huge-fd", "huge-negative-fd", "str", "float", "none", "bool",
    "liar",
]
ALL_NAMES = CONN_NAMES + OTHER_NAMES
targets = st.one_of(st.sampled_from(CONN_NAMES), st.sampled_from(ALL_NAMES))

maxes = st.one_of(
    st.just(0),
    st.integers(1, 300),
    st.integers(1, OFF_MAX),
    st.just(OFF_MAX),
    st.integers(OFF_MAX + 1, 2**70),
    st.integers(-(2**70), -1),
    st.sampled_from([1.5, 2.0, "10", None, True, b"1"]),
)
long_idles = st.one_of(  # valid, and never due within a test: 1000 s up to inf
    st.none(),
    st.sampled_from([0, 0.0, -0.0, 3600, 3e6, 1e308, math.inf, 10**400]),
    st.floats(1000.0, math.inf),
)
short_idles = st.sampled_from([0.03, 0.05])  # the splice ends IDLE within the step
good_maxes = st.one_of(st.just(0), st.integers(1, 300), st.integers(1, OFF_MAX))
good_idles = st.one_of(long_idles, short_idles)
idles = st.one_of(
    long_idles,
    short_idles,
    st.floats(max_value=-1e-9),  # negative, -inf: EINVAL
    st.just(math.nan),  # EINVAL
    st.sampled_from(["1", b"1", [], 1j]),  # TypeError
)


# -- the state machine ------------------------------------------------------------------


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryFile()
        self.pipe_r, self.pipe_w = os.pipe()
        self.conns: list[Conn] = []
        for i in range(4):
            peer, sock = tcp_pair()
            self.conns.append(Conn(f"tcp{i}", sock, peer))
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.conns.append(Conn("unix0", a, b))
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        ud1, ud2 = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.extra = [ud2]
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        dead = socket.socket()
        dead.close()
        self.items: dict[str, Item] = {c.name: Item(c.name, "conn", c.sock, c) for c in self.conns}
        for name, kind, obj in [
            ("udp", "proto", udp),
            ("unix-dgram", "proto", ud1),
            ("listener", "listen", listener),
            ("unconnected", "unconn", socket.socket()),
            ("pipe", "notsock", self.pipe_r),
            ("file", "notsock", self.tmp),
            ("closed-sock", "ebadf", dead),
            ("bad-fd", "ebadf", 1_000_000),
            ("negative-fd", "ebadf", -7),
            ("huge-fd", "ebadf", 2**70),
            ("huge-negative-fd", "ebadf", -(2**40)),
            ("str", "type", "3"),
            ("float", "type", 3.0),
            ("none", "type", None),
            ("bool", "type", True),
            ("liar", "type", FilenoLiar()),
        ]:
            self.items[name] = Item(name, kind, obj)
        assert list(self.items) == ALL_NAMES
        self.fds0 = open_fds()
        self.fd_names0 = {fd: fd_name(fd) for fd in self.fds0}
        self.threads0 = thread_count()
        self.closed_fds: set[int] = set()
        self.pool = SplicePool(workers=WORKERS)
        self.pool_closed = False
        self.recs: list[Rec] = []
        self.n_ok = 0
        self.steps = 0

    # -- the model ----------------------------------------------------------------------
    def live_source(self, conn: Conn | None) -> Rec | None:
        if conn is None:
            return None
        for rec in self.recs:
            if rec.src is conn and rec.sp.reason is None:
                return rec
        return None

    def busy_drain(self, conn: Conn | None) -> Rec | None:
        if conn is None:
            return None
        for rec in self.recs:
            if rec.dst is conn and not rec.sp.done():
                return rec
        return None

    def consumed(self, conn: Conn) -> int:
        """Bytes of conn.stream taken by its (ended) splices."""
        return sum(r.sp.transferred + r.sp.dropped for r in self.recs if r.src is conn)

    def expect_unsplice(self, item: Item, value: object) -> set:
        klass = item.klass(value)
        if klass == "type":
            return {("type", None, None)} | ({("runtime", None, None)} if self.pool_closed else set())
        if self.pool_closed:
            return {("runtime", None, None)}
        if klass == "ebadf":
            return {("errno", errno.EBADF, "source")}
        if klass == "notsock":
            return {("errno", errno.ENOTSOCK, "source")}
        if klass == "listen":
            return {("errno", errno.EINVAL, "source")}
        if klass == "conn" and self.live_source(item.conn) is not None:
            return {("ok", None, None)}
        return {("errno", errno.ENOTCONN, "source")}

    def expect_splice(self, src: Item, sv, dst: Item, dv, max_, idle) -> set:
        sk = src.klass(sv)
        if sk == "type":
            return {("type", None, None)} | ({("runtime", None, None)} if self.pool_closed else set())
        if neg_int(dv):
            return self.expect_unsplice(src, sv)
        dk = dst.klass(dv)
        if dk == "type" or bad_max_type(max_) or bad_idle_type(idle):
            return {("type", None, None)} | ({("runtime", None, None)} if self.pool_closed else set())
        if self.pool_closed:
            return {("runtime", None, None)}
        for klass, role in ((sk, "source"), (dk, "drain")):
            if klass == "ebadf":
                return {("errno", errno.EBADF, role)}
            if klass == "notsock":
                return {("errno", errno.ENOTSOCK, role)}
        if max_ < 0 or max_ > OFF_MAX:
            return {("errno", errno.EINVAL, "max")}
        if idle is not None and ((isinstance(idle, float) and math.isnan(idle)) or idle < 0):
            return {("errno", errno.EINVAL, "idle")}
        for klass, role in ((sk, "source"), (dk, "drain")):
            if klass == "proto":
                return {("errno", errno.EPROTONOSUPPORT, role)}
        if sk == "listen":
            return {("errno", errno.EINVAL, "source")}
        if sk == "unconn":
            return {("errno", errno.ENOTCONN, "source")}
        if self.live_source(src.conn) is not None:
            return {("errno", errno.EBUSY, "source")}
        if dk == "listen":
            return {("errno", errno.EINVAL, "drain")}
        if dk == "unconn":
            return {("errno", errno.ENOTCONN, "drain")}
        if self.busy_drain(dst.conn) is not None:
            return {("errno", errno.EBUSY, "drain")}
        return {("ok", None, None)}

    def check(self, got, expected: set, what: str) -> None:
        kind, val = got
        code = val.errno if kind == "errno" else None
        event(f"{what.split('(')[0]}: {errno.errorcode[code] if code else kind}")
        keys = {(k, c) for k, c, _ in expected}
        assert (kind, code) in keys, f"{what}: got {kind} {val!r}, expected one of {expected}"
        if kind == "errno":
            role = next(r for k, c, r in expected if (k, c) == (kind, code))
            text = str(val)
            assert role in text, f"{what}: message does not name the {role}: {text}"
            if role in ("source", "drain"):
                assert f"{role} fd" in text, f"{what}: message does not name the socket: {text}"
        if kind == "runtime":
            assert "closed" in str(val), val

    # -- keeping the world quiet between steps -----------------------------------------
    def pump(self) -> None:
        """Read whatever the peers have received, so no drain ever stalls."""
        for conn in self.conns:
            if conn.peer_closed or conn.peer_eof:
                continue
            while True:
                try:
                    chunk = conn.peer.recv(1 << 16, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
                    conn.peer_broken = conn.peer_eof = True
                    break
                if not chunk:
                    conn.peer_eof = True
                    break
                conn.received += chunk

    def quiet(self, rec: Rec) -> bool:
        sp = rec.sp
        if sp.done():
            return True
        if sp.reason is not None or rec.short_idle or self.pool_closed:
            return False
        queued = len(rec.src.stream) - rec.off
        if sp.max and queued >= sp.max:
            return False  # it is about to end with MAX
        return sp.transferred == queued and sp.in_flight == 0

    def settle(self, timeout: float = SETTLE) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self.pump()
            busy = [r for r in self.recs if not self.quiet(r)]
            if not busy:
                return
            assert time.monotonic() < deadline, f"not quiet after {timeout} s: {busy}"
            time.sleep(0.001)  # the poll interval: the wait ends when every splice is quiet

    def feed(self, conn: Conn, n: int, seed: int) -> int:
        data = random.Random(seed).randbytes(n)
        try:
            sent = conn.peer.send(data, socket.MSG_DONTWAIT)
        except BlockingIOError:
            sent = 0
        conn.stream += data[:sent]
        return sent

    def close_user(self, item: Item) -> None:
        if item.closable and not item.closed:
            fd = item.obj.fileno()
            if fd >= 0:
                self.closed_fds.add(fd)
            item.obj.close()
            item.closed = True
            if item.conn is not None:
                item.conn.closed = True

    # -- rules ---------------------------------------------------------------------------
    @rule(
        src=targets,
        src_int=st.booleans(),
        dst=targets,
        dst_int=st.booleans(),
        max_=maxes,
        idle=idles,
        close=st.sampled_from([False, False, False, True]),
    )
    def splice(self, src, src_int, dst, dst_int, max_, idle, close):
        """Anything at all: mostly one of the errors."""
        self.do_splice(src, src_int, dst, dst_int, max_, idle, close)

    @rule(
        src=st.sampled_from(CONN_NAMES),
        src_int=st.booleans(),
        dst=st.sampled_from(CONN_NAMES),
        dst_int=st.booleans(),
        max_=good_maxes,
        idle=good_idles,
        close=st.sampled_from([False, False, False, True]),
    )
    def splice_sockets(self, src, src_int, dst, dst_int, max_, idle, close):
        """Connected sockets and valid limits: succeeds unless one is busy or closed."""
        self.do_splice(src, src_int, dst, dst_int, max_, idle, close)

    @rule(a=st.sampled_from(CONN_NAMES), b=st.sampled_from(CONN_NAMES), max_=good_maxes)
    def relay(self, a, b, max_):
        """a -> b and b -> a: each socket a source and a drain at once."""
        self.do_splice(a, False, b, False, max_, None, False)
        self.do_splice(b, False, a, False, max_, None, False)

    def do_splice(self, src, src_int, dst, dst_int, max_, idle, close):
        self.steps += 1
        s_item, d_item = self.items[src], self.items[dst]
        sv, dv = s_item.value(src_int), d_item.value(dst_int)
        close = close and not src_int and not dst_int  # never hand over a bare fd number
        expected = self.expect_splice(s_item, sv, d_item, dv, max_, idle)
        unsplicing = neg_int(dv) and s_item.klass(sv) != "type"
        before = self.live_source(s_item.conn) if unsplicing else None
        got = outcome(lambda: self.pool.splice(sv, dv, max=max_, idle=idle, close=close))
        self.check(got, expected, f"splice({src}, {dst}, max={max_!r}, idle={idle!r})")
        if got[0] != "ok":
            self.settle()
            return
        if unsplicing:
            self.finish_unsplice(before, got[1])
            return
        sp = got[1]
        src_conn, dst_conn = s_item.conn, d_item.conn
        assert sp.source is sv and sp.drain is dv
        assert sp.max == max_
        assert sp.idle == (as_seconds(idle) if idle else None)
        # A splice sharing a socket with one not yet done (a relay's reverse direction) joins
        # its worker; the others go round-robin. A sharer may finish during the call: either.
        sharers = {
            r.sp.worker
            for r in self.recs
            if (r.dst is src_conn or r.src is dst_conn) and not r.sp.done()
        }
        if sharers:
            assert sp.worker == self.n_ok % WORKERS or sp.worker in sharers, (sp.worker, self.n_ok, sharers)
            self.n_ok = self.pool.next_worker  # joined or took its turn: only the pool knows which
        else:
            assert sp.worker == self.n_ok % WORKERS, (sp.worker, self.n_ok)
            self.n_ok += 1
        if close:
            for item in {s_item, d_item}:
                fd = item.fd
                item.closed = True
                item.conn.closed = True
                self.closed_fds.add(fd)  # the pool owns it now and closes it at the end
                assert item.obj.fileno() == -1  # detached: our object can never close it
        rec = Rec(sp, src_conn, dst_conn, self.consumed(src_conn), idle is not None and 0 < idle < 1)
        self.recs.append(rec)
        self.settle()

    def finish_unsplice(self, rec: Rec | None, returned) -> None:
        assert rec is not None and returned is rec.sp
        rec.allowed.add(R.UNSPLICED)
        assert rec.sp.reason is R.UNSPLICED  # it was quiet: nothing else could end it
        self.settle()

    @rule(src=targets, as_int=st.booleans(), how=st.sampled_from(["unsplice", "-1", "-99"]))
    def unsplice(self, src, as_int, how):
        self.steps += 1
        item = self.items[src]
        value = item.value(as_int)
        expected = self.expect_unsplice(item, value)
        before = self.live_source(item.conn) if item.klass(value) != "type" else None
        if how == "unsplice":
            got = outcome(lambda: self.pool.unsplice(value))
        else:
            got = outcome(lambda: self.pool.splice(value, int(how)))
        self.check(got, expected, f"unsplice({src}) via {how}")
        if got[0] == "ok":
            self.finish_unsplice(before, got[1])
        else:
            self.settle()

    @precondition(lambda self: self.recs)
    @rule(pick=st.integers(0, 1 << 30))
    def unsplice_handle(self, pick):
        self.steps += 1
        rec = self.recs[pick % len(self.recs)]
        if self.pool_closed:
            expected = {("runtime", None, None)}
        elif rec.sp.reason is None:
            expected = {("ok", None, None)}
        else:
            expected = {("errno", errno.ENOTCONN, "source")}
        got = outcome(rec.sp.unsplice)
        self.check(got, expected, f"{rec}.unsplice()")
        if got[0] == "ok":
            self.finish_unsplice(rec, rec.sp)
        else:
            self.settle()

    @rule(src=targets, as_int=st.booleans())
    def transferred(self, src, as_int):
        self.steps += 1
        item = self.items[src]
        value = item.value(as_int)
        klass = item.klass(value)
        got = outcome(lambda: self.pool.transferred(value))
        if klass == "type":
            expected = {("type", None, None)}
        elif klass == "ebadf":
            expected = {("errno", errno.EBADF, "source")}
        elif klass == "notsock":
            expected = {("ok", None, None), ("errno", errno.ENOTSOCK, "source")}
        else:
            expected = {("ok", None, None)}
        if self.pool_closed:
            expected |= {("runtime", None, None)}
        self.check(got, expected, f"transferred({src})")
        if got[0] == "ok":
            latest = [r for r in self.recs if item.conn is not None and r.src is item.conn]
            assert got[1] == (latest[-1].sp.transferred if latest else 0), (src, latest)

    @rule(name=st.sampled_from(CONN_NAMES), n=st.integers(1, 8192), seed=st.integers(0, 1 << 16))
    def send(self, name, n, seed):
        self.steps += 1
        conn = self.items[name].conn
        if conn.peer_closed or len(conn.stream) > 96 * 1024:
            return
        if conn.closed and self.live_source(conn) is None:
            return  # its connection is gone (or only the pool's drain dup holds it)
        self.feed(conn, n, seed)
        self.settle()

    @rule(name=st.sampled_from(ALL_NAMES))
    def close_socket(self, name):
        """The user closes their socket object: splices using it go on (the pool has dups)."""
        self.steps += 1
        item = self.items[name]
        if not item.closable or item.closed:
            return
        self.close_user(item)
        self.settle()

    @rule(name=st.sampled_from(CONN_NAMES), rst=st.booleans())
    def peer_hangs_up(self, name, rst):
        """The far end closes (FIN) or resets: every splice on that connection must end."""
        self.steps += 1
        conn = self.items[name].conn
        if conn.peer_closed:
            return
        affected = [r for r in self.recs if not r.sp.done()]  # before: some end at once
        if rst:
            conn.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.closed_fds.add(conn.peer.fileno())
        conn.peer.close()
        conn.peer_closed = conn.peer_broken = True
        deadline = time.monotonic() + SETTLE
        for rec in affected:
            if rec.src is conn:  # EOF (or the reset) on its source
                rec.allowed |= {R.EOF, R.ERROR}
                assert until(rec.sp.done, SETTLE), rec
            elif rec.dst is conn:  # its drain is dead: the next bytes must fail
                rec.allowed.add(R.ERROR)
                seed = 0
                while not rec.sp.done():
                    assert time.monotonic() < deadline, rec
                    try:
                        self.feed(rec.src, 1024, seed)
                    except (BrokenPipeError, ConnectionResetError):
                        # The splice saw its drain die on its own and ended between the check
                        # and the send; its source was closed by the user, so the pool's dup
                        # was its last fd, and it is gone with the splice.
                        assert rec.src.closed and until(rec.sp.done, SETTLE), rec
                        break
                    seed += 1
                    self.pump()
                    time.sleep(0.002)  # a writer's pace: a KiB at a time until the splice notices
        self.close_user(self.items[name])  # the connection is over for the user too
        self.settle()

    @precondition(lambda self: not self.pool_closed and self.steps >= 12)
    @rule(dice=st.integers(0, 5))
    def close_pool(self, dice):
        """Now and then (a closed pool only says RuntimeError from then on)."""
        self.steps += 1
        if dice:
            return
        for rec in self.recs:
            if rec.sp.reason is None:
                rec.allowed.add(R.POOL_CLOSED)
        self.pool.close()
        self.pool_closed = True
        for rec in self.recs:
            assert rec.sp.done(), rec
        self.settle()

    # -- invariants ------------------------------------------------------------------------
    @invariant()
    def books_agree(self):
        pool = self.pool
        sources, drains, _refs = pool.registry.snapshot()
        live = [r for r in self.recs if r.sp.reason is None]
        pending = [r for r in self.recs if not r.sp.done()]
        for rec in self.recs:
            sp = rec.sp
            if sp.done():
                assert sp.state is S.CLOSED, rec
                assert sp.reason in rec.allowed, (rec, rec.allowed)
                if sp.reason is R.MAX:
                    assert sp.transferred == sp.max, rec
                if sp.reason not in (R.ERROR, R.IDLE):
                    assert sp.dropped == 0, rec
                if sp.reason is not R.ERROR:
                    assert sp.error is None, rec
            else:
                assert sp.state in LIVE_STATES | ENDING, rec
        # Every live splice is in the registry's sources exactly once, under its own source.
        assert len(sources) == len(live), (sources, live)
        assert {id(sp) for sp in sources.values()} == {id(r.sp) for r in live}
        for rec in live:
            assert sources[rec.src.key] is rec.sp
        # No drain is shared: each splice not done holds its drain, alone.
        assert len({r.dst.key for r in pending}) == len(pending), pending
        assert len(drains) == len(pending), (drains, pending)
        for rec in pending:
            assert drains.get(rec.dst.key) is rec.sp
        stats = pool.stats()
        assert stats["live"] == len(live)
        assert sum(w["live"] for w in stats["workers"]) == len(live)
        # A failed call changed nothing: no object of ours was detached or closed by the pool.
        for item in self.items.values():
            if item.closable and not item.closed:
                assert item.obj.fileno() == item.fd, item.name

    # -- the end ---------------------------------------------------------------------------
    def teardown(self):
        try:
            if not self.pool_closed:
                for rec in self.recs:
                    if rec.sp.reason is None:
                        rec.allowed.add(R.POOL_CLOSED)
            self.pool.close()
            self.pool_closed = True
            self.settle()
            self.books_agree()
            for rec in self.recs:
                event(f"ended {rec.sp.reason.name}" + (" with data" if rec.sp.transferred else ""))
            self.check_bytes()
            # gevent closes some fds on its next loop turn: until() polls, and yields to it
            assert until(lambda: thread_count() == self.threads0), (thread_count(), self.threads0)
            want = self.fds0 - self.closed_fds
            assert until(lambda: same_fds(open_fds(), want, self.fd_names0)), (fd_diff(open_fds(), want), self.fd_names0)
        finally:
            for item in self.items.values():
                if item.closable:
                    item.obj.close()
            for conn in self.conns:
                conn.peer.close()
            for s in self.extra:
                s.close()
            self.tmp.close()
            os.close(self.pipe_r)
            os.close(self.pipe_w)

    def check_bytes(self) -> None:
        """Each drain's peer got its splices' segments of their sources' streams, in order;
        each source still holds exactly the part of its stream no splice took."""
        for conn in self.conns:
            if conn.peer_broken:
                continue
            want = bytearray()
            for rec in self.recs:
                if rec.dst is conn:
                    want += rec.src.stream[rec.off : rec.off + rec.sp.transferred]
            n = len(want)
            until(lambda c=conn, n=n: (self.pump(), len(c.received) >= n)[1], 2)
            assert conn.received == want, (conn, len(conn.received), len(want))
        for conn in self.conns:
            if conn.closed:
                continue
            rest = conn.stream[self.consumed(conn) :]
            conn.sock.setblocking(False)
            got = bytearray()
            n = len(rest)

            def drained(c=conn, g=got, n=n) -> bool:
                while True:
                    try:
                        chunk = c.sock.recv(1 << 16, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        return len(g) >= n
                    if not chunk:
                        return True
                    g.extend(chunk)

            until(drained, 2)
            assert got == rest, (conn, len(got), len(rest))


# No shrinking: a failing run can spend seconds per step waiting for quiet, and shrinking
# would run for minutes (it even swallows pytest-timeout's interrupt). The unshrunk steps
# are printed, which is enough to reproduce.
PoolMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestPoolMachine = PoolMachine.TestCase


# -- four threads, sixteen links --------------------------------------------------------


def test_four_threads_splicing_and_unsplicing_at_random_keep_the_books_straight():
    """Four threads splice, unsplice (three ways), ask for counters and send, at random,
    over 16 links (plus 8 silent sources that compete for the same drains) for ~3 s."""
    links = [Link() for _ in range(16)]
    dry = [tcp_pair() for _ in range(8)]  # (peer, sock): sources that never carry data
    for ln in links:
        ln.peer_src.setblocking(False)
    cols = [Collector(ln.peer_dst) for ln in links]
    streams = [bytearray() for _ in links]
    send_locks = [threading.Lock() for _ in links]
    handles: list = []
    failures: list[BaseException] = []
    counts: dict[str, int] = {}
    fds0, threads0 = open_fds(), thread_count()
    names0 = {fd: fd_name(fd) for fd in fds0}
    pool = SplicePool(workers=WORKERS)

    def tally(what: str) -> None:
        counts[what] = counts.get(what, 0) + 1

    def expect_errno(what: str, codes: tuple[int, ...], fn, *args):
        try:
            result = fn(*args)
        except OSError as exc:
            if exc.errno not in codes:
                raise
            tally(f"{what}:{errno.errorcode[exc.errno]}")
            return None
        tally(f"{what}:ok")
        return result

    def run(seed: int, stop_at: float) -> None:
        rng = random.Random(seed)
        try:
            while time.monotonic() < stop_at:
                i = rng.randrange(len(links))
                ln = links[i]
                op = rng.random()
                if op < 0.25:
                    sp = expect_errno("splice", (errno.EBUSY,), pool.splice, ln.src, ln.dst)
                    if sp is not None:
                        handles.append(sp)
                elif op < 0.35:
                    sock = dry[rng.randrange(len(dry))][1]
                    sp = expect_errno("dry", (errno.EBUSY,), pool.splice, sock, ln.dst)
                    if sp is not None:
                        handles.append(sp)
                elif op < 0.45:
                    expect_errno("unsplice", (errno.ENOTCONN,), pool.unsplice, ln.src)
                elif op < 0.5:
                    expect_errno("splice-1", (errno.ENOTCONN,), pool.splice, ln.src, -1)
                elif op < 0.55:
                    sock = dry[rng.randrange(len(dry))][1]
                    expect_errno("unsplice-dry", (errno.ENOTCONN,), pool.unsplice, sock)
                elif op < 0.65:
                    if handles:
                        sp = handles[rng.randrange(len(handles))]
                        expect_errno("handle", (errno.ENOTCONN,), sp.unsplice)
                elif op < 0.75:
                    assert pool.transferred(ln.src) >= 0
                    tally("transferred")
                else:
                    data = rng.randbytes(rng.randrange(1, 16384))
                    with send_locks[i]:
                        try:
                            n = ln.peer_src.send(data, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            n = 0
                        streams[i] += data[:n]
                    tally("send")
                if rng.random() < 0.1:
                    time.sleep(0)  # give up the GIL now and then: other interleavings
        except BaseException as exc:  # reported by the test, never lost in a thread
            failures.append(exc)

    try:
        stop_at = time.monotonic() + 3.0
        threads = [threading.Thread(target=run, args=(k, stop_at), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert not any(t.is_alive() for t in threads)
        assert not failures, failures
        assert counts.get("splice:ok", 0) > 10 and counts.get("splice:EBUSY", 0) > 0, counts
        assert counts.get("handle:ok", 0) + counts.get("unsplice:ok", 0) > 10, counts
        # Quiet now (only data in flight): ended splices finish, and the books agree.
        assert until(lambda: all(sp.done() for sp in handles if sp.reason is not None))
        sources, drains, _refs = pool.registry.snapshot()
        live = [sp for sp in handles if sp.reason is None]
        pending = [sp for sp in handles if not sp.done()]
        assert len(handles) == len({id(sp) for sp in handles})
        assert len(sources) == len(live)
        assert {id(sp) for sp in sources.values()} == {id(sp) for sp in live}
        assert len(drains) == len(pending)
        assert {id(sp) for sp in drains.values()} == {id(sp) for sp in pending}
        for sp in handles:
            assert sp.state in (LIVE_STATES | ENDING if not sp.done() else {S.CLOSED}), sp
            if sp.done():
                assert sp.reason is R.UNSPLICED and sp.error is None and sp.dropped == 0, sp
        assert pool.stats()["live"] == len(live)
        pool.close()
        for sp in handles:
            assert sp.done() and sp.reason in (R.UNSPLICED, R.POOL_CLOSED), sp
            assert sp.dropped == 0 and sp.error is None, sp
        assert until(lambda: thread_count() == threads0), (thread_count(), threads0)
        assert until(lambda: same_fds(open_fds(), fds0, names0)), fd_diff(open_fds(), fds0)
        # Every byte: what each drain's peer got, then what its source still holds.
        for i, ln in enumerate(links):
            ln.src.setblocking(False)
            rest = bytearray()
            moved = sum(sp.transferred for sp in handles if sp.source is ln.src)

            def done(i=i, ln=ln, rest=rest, moved=moved) -> bool:
                while True:
                    try:
                        chunk = ln.src.recv(1 << 16, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        break
                    rest.extend(chunk)
                return len(cols[i].data) >= moved and moved + len(rest) >= len(streams[i])

            assert until(done), (i, len(cols[i].data), moved, len(rest), len(streams[i]))
            delivered = cols[i].stop()
            assert len(delivered) == moved
            assert delivered + rest == streams[i], i
        for _peer, sock in dry:
            assert all(sp.transferred == 0 for sp in handles if sp.source is sock)
    finally:
        pool.close()
        for col in cols:
            col.stop()
        for ln in links:
            ln.close()
        for peer, sock in dry:
            peer.close()
            sock.close()


# -- inputs outside every range ------------------------------------------------------------


def test_fd_numbers_outside_the_c_int_range_are_ebadf():
    """Regression test (fixed in 5a7b1d3): they raised OverflowError."""
    peer, sock = tcp_pair()
    pool = SplicePool(workers=1)
    try:

        @settings(max_examples=20, deadline=None, database=None)
        @given(
            fd=st.one_of(st.integers(2**31, 2**70), st.integers(-(2**70), -(2**31) - 1)),
            call=st.sampled_from(["source", "drain", "unsplice", "transferred"]),
        )
        def check(fd, call):
            if call == "drain" and fd < 0:
                return  # a negative drain means "unsplice"
            with pytest.raises(OSError) as exc:
                if call == "source":
                    pool.splice(fd, sock)
                elif call == "drain":
                    pool.splice(sock, fd)
                elif call == "unsplice":
                    pool.unsplice(fd)
                else:
                    pool.transferred(fd)
            assert exc.value.errno == errno.EBADF

        check()
    finally:
        pool.close()
        peer.close()
        sock.close()


def test_idle_too_large_for_a_timer_means_no_timer():
    """Regression test (fixed in 5a7b1d3): with the thread backend, idle >= 2**31 ms (about
    24.9 days) or inf overflowed epoll's timeout and crashed the worker, ending every splice
    on it with ERROR EIO."""
    link, other = Link(), Link()
    pool = SplicePool(workers=1)
    try:

        @settings(max_examples=8, deadline=None, database=None)
        @given(idle=st.one_of(st.just(math.inf), st.floats(2_200_000.0, 1e308)))
        def check(idle):
            bystander = pool.splice(other.src, other.dst)
            sp = pool.splice(link.src, link.dst, idle=idle)
            # The worker sleeps with sp's timer armed; a wakeup for the ping proves that sleep
            # took the timeout (a worker that crashed would have ended both, ERROR EIO).
            seen = wakeups(pool)
            link.peer_src.sendall(b"ping")
            assert until(lambda: wakeups(pool) > seen or sp.done() or bystander.done())
            assert sp.reason is None, (sp, sp.error)
            assert bystander.reason is None, (bystander, bystander.error)
            assert link.peer_dst.recv(4) == b"ping"
            for s in (sp, bystander):
                s.unsplice()
                assert s.wait(5) is R.UNSPLICED

        check()
    finally:
        pool.close()
        link.close()
        other.close()


def test_idle_beyond_the_float_range_is_einval_or_no_timer():
    """Regression test (fixed in 5a7b1d3): an int idle too big for a float raised OverflowError."""
    link = Link()
    pool = SplicePool(workers=1)
    try:
        try:
            sp = pool.splice(link.src, link.dst, idle=10**400)
        except OSError as exc:
            assert exc.errno == errno.EINVAL
        else:
            sp.unsplice()
            assert sp.wait(5) is R.UNSPLICED
    finally:
        pool.close()
        link.close()
