"""Every byte and every FIN: one regression test per engine defect found trying splicepool
as users would (relays racing resets, urgent data, slow readers, leaks, worker faults).

Each test failed on the engine before its fix (7ccf145) and names the defect it covers, by
its number in docs/reliability.md ("Defects found using it as users would"). Real loopback
sockets, real worker threads (or gevent greenlets), exact bytes by SHA-256.
"""

from __future__ import annotations

import errno
import gc
import socket
import threading
import time
import weakref

import pytest
from conftest import (
    GEVENT,
    HAVE_SPLICE,
    Collector,
    Link,
    digest,
    fd_count,
    fill_send_buffer,
    payload,
    recv_exact,
    reset,
    shrink,
    tcp_pair,
    thread_backend_only,
    until,
    wakeups,
)

from splicepool import EndReason, SplicePool, SpliceState

MiB = 1 << 20
LIVE = {SpliceState.INIT, SpliceState.IDLE, SpliceState.QUEUED, SpliceState.RUNNING}



def read_all(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Everything ``sock`` receives, and how it ended: "eof" or "reset"."""
    sock.settimeout(timeout)
    buf = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except ConnectionResetError:
            return bytes(buf), "reset"
        if not chunk:
            return bytes(buf), "eof"
        buf += chunk


class HeldWorker:
    """Keep a one-worker pool's worker busy inside a done callback until ``release()``.

    Work posted meanwhile (a relay handed over with ``wait=False``) is taken up only
    after the release, so a test can change the world in between (reset a client).
    With gevent the worker is a greenlet that runs only when the test yields, which
    gives the same order without holding anything.
    """

    def __init__(self, pool: SplicePool) -> None:
        self.link = Link()
        self.entered = threading.Event()
        self.gate = threading.Event()
        if GEVENT:
            return
        sp = pool.splice(self.link.src, self.link.dst)
        sp.add_done_callback(self._hold)
        self.link.peer_src.shutdown(socket.SHUT_WR)
        assert self.entered.wait(5)

    def _hold(self, _sp) -> None:
        self.entered.set()
        self.gate.wait(10)

    def release(self) -> None:
        self.gate.set()
        self.link.close()


# -- 1. a client reset racing proxy() --------------------------------------------------------


@pytest.mark.parametrize("wait", [False, pytest.param(True, marks=thread_backend_only)])
def test_1_a_client_reset_racing_proxy_ends_the_relay_and_resets_the_upstream(caplog, wait):
    """The client's RST lands after proxy()'s checks and before the worker's first pass: the
    forward direction fails at once while the reverse one is not taken up yet (INIT). The
    relay must end (ERROR, ECONNRESET), pass the reset on to the upstream, and log no bug."""
    pool = SplicePool(workers=1)
    client, a = tcp_pair()
    b, upstream = tcp_pair()
    try:
        held = HeldWorker(pool)
        box: list = []
        if wait:  # proxy() waits for the first passes, in another thread
            caller = threading.Thread(target=lambda: box.append(pool.proxy(a, b, wait=True)))
            caller.start()
            assert until(lambda: len(pool.worker(0).control) == 2, 5)
        else:
            box.append(pool.proxy(a, b, wait=False))
        reset(client)
        held.release()
        if wait:
            caller.join(5)
            assert not caller.is_alive()
        relay = box[0]
        assert relay.wait(5) is EndReason.ERROR
        assert relay.error is not None and relay.error.errno == errno.ECONNRESET
        assert relay.forward.reason is EndReason.ERROR
        assert relay.reverse.done()
        assert read_all(upstream) == (b"", "reset")
        assert "illegal splice transition" not in caplog.text
        assert pool.stats()["live"] == 0
    finally:
        pool.close()
        upstream.close()


# -- 2. a FIN after a small read met a full drain ----------------------------------------------


@pytest.mark.parametrize("zero_copy", [None, False])
def test_2_a_fin_after_a_small_read_met_a_full_drain_still_ends_the_splice(zero_copy):
    """A small read at dispatch finds the drain full (the user filled it): the rest waits for
    the drain. More bytes and the FIN arrive meanwhile; once the drain's peer reads, every
    byte arrives in order and the splice ends with EOF (it stayed IDLE for good)."""
    link = Link()
    shrink(link.dst, link.peer_dst)
    with SplicePool(workers=1, zero_copy=zero_copy) as pool:
        sp = pool.splice(link.src, link.dst)
        link.peer_src.sendall(b"hello")
        assert recv_exact(link.peer_dst, 5) == b"hello"
        assert until(lambda: sp.transferred == 5)
        filler = fill_send_buffer(link.dst)  # the user writes into the drain until it is full
        first, second = payload(8000, 8), payload(3000, 9)

        seen = wakeups(pool)
        link.peer_src.sendall(first)  # read at dispatch (zero-copy path), stuck at the drain
        assert until(lambda: wakeups(pool) > seen, 5)
        seen = wakeups(pool)
        link.peer_src.sendall(second)
        link.peer_src.shutdown(socket.SHUT_WR)
        assert until(lambda: wakeups(pool) > seen, 5)  # the worker saw them while it waited
        want = filler + first + second
        got = recv_exact(link.peer_dst, len(want), timeout=10)
        assert digest(got) == digest(want)
        assert sp.wait(5) is EndReason.EOF
        assert sp.transferred == 5 + len(first) + len(second) and sp.dropped == 0
    link.close()


# -- 3. TCP urgent data -------------------------------------------------------------------------

PATHS = {
    "default": {},
    "splice-only": {"small_copy": 0},
    "copy": {"zero_copy": False},
}


def _path(name: str) -> dict:
    if name != "copy" and not HAVE_SPLICE:
        pytest.skip("no os.splice on this platform")
    return PATHS[name]


@pytest.mark.parametrize("inline", [False, True], ids=["oob", "oobinline"])
@pytest.mark.parametrize("path", list(PATHS))
def test_3_urgent_bytes_like_openbsd_args_oob(path, inline):
    """OpenBSD's regress tcp/args-oob: a 251-byte stream whose four '9's are sent with
    MSG_OOB. Without SO_OOBINLINE the 247 normal bytes arrive (the urgent ones are not
    forwarded); with it all 251 arrive as normal data. Each urgent byte is sent once the
    bytes before it have arrived, so no mark overtakes another."""
    link = Link()
    if inline:
        link.src.setsockopt(socket.SOL_SOCKET, socket.SO_OOBINLINE, 1)
    stream = bytes((ord("0") + i % 9) for i in range(247))  # digits 0-8: no '9' in it
    cuts = [40, 100, 170, 230]
    with SplicePool(workers=1, **_path(path)) as pool:
        sp = pool.splice(link.src, link.dst)
        col = Collector(link.peer_dst)
        expected = b""
        start = 0
        for cut in [*cuts, len(stream)]:
            link.peer_src.sendall(stream[start:cut])
            expected += stream[start:cut]
            assert col.wait_for(len(expected), 5), (path, len(col.data), len(expected))
            if cut < len(stream):
                link.peer_src.send(b"9", socket.MSG_OOB)
                if inline:
                    expected += b"9"
            start = cut
        link.peer_src.shutdown(socket.SHUT_WR)
        assert sp.wait(5) is EndReason.EOF
        assert col.wait_for(len(expected), 5)
        got = col.stop()
        assert len(got) == (251 if inline else 247)
        assert got == expected
        assert sp.transferred == len(expected)


@pytest.mark.parametrize("path", list(PATHS))
def test_3_one_urgent_byte_after_8_mib_never_stalls(path):
    """8 MiB, one urgent byte, then a short tail, all queued in the source before the pool
    reaches the mark: recv and splice(2) stop there, a short read looks like "drained", and
    an edge-triggered hub gets no new edge. Every normal byte must arrive without waiting
    for more data (no FIN is sent until they have)."""
    link = Link()
    half = payload(8 * MiB, 31)
    rest = payload(32 * 1024, 32)
    with SplicePool(workers=1, **_path(path)) as pool:
        sp = pool.splice(link.src, link.dst)
        col = Collector(link.peer_dst)

        def send() -> None:
            link.peer_src.sendall(half)
            link.peer_src.send(b"!", socket.MSG_OOB)
            link.peer_src.sendall(rest)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        assert col.wait_for(len(half) + len(rest), 15), (path, len(col.data))
        sender.join(5)
        assert sp.reason is None
        link.peer_src.shutdown(socket.SHUT_WR)
        assert sp.wait(5) is EndReason.EOF
        got = col.stop()
        assert digest(got) == digest(half + rest)
        assert sp.transferred == len(half) + len(rest)
    link.close()


# -- 4. ended splices kept until their idle deadline --------------------------------------------


def test_4_an_ended_splice_with_an_idle_timer_is_not_kept():
    """idle=300 and an EOF after a few bytes: once it has ended and the caller drops its
    handles, nothing of the splice or the relay is left (the timer heap kept it 300 s)."""
    pool = SplicePool(workers=1)
    try:
        refs = []
        for i in range(40):
            ln = Link()
            sp = pool.splice(ln.src, ln.dst, idle=300, close=True)
            ln.peer_src.sendall(b"x" * (i + 1))
            ln.peer_src.shutdown(socket.SHUT_WR)
            assert sp.wait(5) is EndReason.EOF
            refs.append(weakref.ref(sp))
            del sp
            ln.peer_src.close()
            ln.peer_dst.close()
        for _ in range(40):
            client, a = tcp_pair()
            b, upstream = tcp_pair()
            px = pool.proxy(a, b, idle=300)
            client.close()
            upstream.close()
            assert px.wait(5) is EndReason.EOF
            refs += [weakref.ref(px), weakref.ref(px.forward), weakref.ref(px.reverse)]
            del px
        gc.collect()
        alive = [r() for r in refs if r() is not None]
        assert alive == [], f"{len(alive)} ended handles still alive, e.g. {alive[0]!r}"
    finally:
        pool.close()


# -- 5. the pool's records keep the caller's socket objects -------------------------------------


def test_5_records_of_ended_splices_keep_no_socket_object_alive():
    """A caller that drops its socket objects without close() gets the fds back: the pool
    keeps counts of ended splices, not the splices and the sockets they name."""
    pool = SplicePool(workers=1)
    try:
        fds0 = fd_count()
        for i in range(300):
            ln = Link()
            sp = pool.splice(ln.src, ln.dst)
            ln.peer_src.sendall(b"y" * (i % 7 + 1))
            ln.peer_src.shutdown(socket.SHUT_WR)
            assert sp.wait(5) is EndReason.EOF
            assert pool.transferred(ln.src) == i % 7 + 1
            ln.peer_src.close()
            ln.peer_dst.close()
            del sp, ln  # src and dst are dropped without close(), as code relying on gc does
        gc.collect()
        assert until(lambda: fd_count() <= fds0 + 8, 5), (fd_count(), fds0)  # +8: cached pipes
    finally:
        pool.close()


# -- 6. pool.splice() from a done callback ------------------------------------------------------


def test_6_splice_from_a_done_callback_returns_a_live_splice():
    """A done callback starts the next splice (backend="gevent", dispatch="direct" runs it in
    the hub, which must never wait): the caller gets the handle and the bytes move."""
    first, second = Link(), Link()
    pool = SplicePool(workers=1)
    try:
        box: list = []

        def chain(_sp) -> None:
            try:
                box.append(pool.splice(second.src, second.dst))
            except BaseException as exc:  # noqa: BLE001 - the test reports it
                box.append(exc)

        sp = pool.splice(first.src, first.dst)
        sp.add_done_callback(chain)
        first.peer_src.shutdown(socket.SHUT_WR)
        assert sp.wait(5) is EndReason.EOF
        assert until(lambda: box, 5)
        nxt = box[0]
        assert not isinstance(nxt, BaseException), repr(nxt)
        data = payload(200_000, 61)
        second.peer_src.sendall(data)
        assert digest(recv_exact(second.peer_dst, len(data))) == digest(data)
        second.peer_src.shutdown(socket.SHUT_WR)
        assert nxt.wait(5) is EndReason.EOF
        assert pool.stats()["live"] == 0
    finally:
        pool.close()
        first.close()
        second.close()


# -- 7. worker failure paths ---------------------------------------------------------------------


class _FaultySock:
    """A socket object that fails every read with a bug (injected into one endpoint)."""

    def __init__(self, real) -> None:
        self._real = real

    def recv_into(self, *args):
        raise RuntimeError("injected bug in a read")

    def __getattr__(self, name):
        return getattr(self._real, name)


def test_7_a_bug_in_dispatch_ends_that_splice_only(caplog):
    """An exception while handling one splice's event (here its direct small read) ends that
    splice with ERROR (EIO); the worker and its other splices go on."""
    faulty, healthy = Link(), Link()
    pool = SplicePool(workers=1)
    try:
        bad = pool.splice(faulty.src, faulty.dst)
        good = pool.splice(healthy.src, healthy.dst)
        bad.src.sock = _FaultySock(bad.src.sock)
        faulty.peer_src.sendall(b"boom")
        assert bad.wait(5) is EndReason.ERROR
        assert bad.error.errno == errno.EIO and "injected bug" in str(bad.error)
        data = payload(300_000, 71)
        healthy.peer_src.sendall(data)
        assert digest(recv_exact(healthy.peer_dst, len(data))) == digest(data)
        assert good.reason is None and good.state in LIVE
        assert "crashed" not in caplog.text
        healthy.peer_src.shutdown(socket.SHUT_WR)
        assert good.wait(5) is EndReason.EOF
        assert recv_exact(faulty.src, 4) == b"boom"  # not taken: still in the source
    finally:
        pool.close()
        faulty.close()
        healthy.close()


@thread_backend_only
def test_7_a_dying_worker_ends_only_its_own_splices():
    """A worker crashes; while it ends its splices, a new splice shares a socket with one of
    them and goes to the replacement worker. The dying worker must not end it."""
    x, y, later = Link(), Link(), Link()
    pool = SplicePool(workers=1)
    try:
        sx = pool.splice(x.src, x.dst)
        sy = pool.splice(y.src, y.dst)
        inside, gate = threading.Event(), threading.Event()

        def hold(_sp) -> None:  # runs in the dying worker, while it ends its splices
            inside.set()
            gate.wait(10)

        sx.add_done_callback(hold)
        worker = pool.worker(0)

        def crash(timeout):
            raise RuntimeError("injected worker bug")

        worker.hub.poll = crash
        worker.hub.wake()
        assert inside.wait(5)
        # y.dst is the drain of sy (still on the dying worker): splice it onwards.
        z = pool.splice(y.dst, later.dst)
        assert pool.worker(0) is not worker
        gate.set()
        assert sy.wait(5) is EndReason.ERROR
        assert until(lambda: worker.exited.is_set(), 5)
        assert z.reason is None, (z.reason, z.error)
        data = payload(100_000, 72)
        y.peer_dst.sendall(data)
        assert digest(recv_exact(later.peer_dst, len(data))) == digest(data)
        z.unsplice()
        assert z.wait(5) is EndReason.UNSPLICED
    finally:
        gate.set()
        pool.close()
        for ln in (x, y, later):
            ln.close()


# -- 11. idle and a steady slow reader ------------------------------------------------------------


def test_11_idle_does_not_cut_a_slow_reader_of_a_fast_upstream():
    """A client reads a fast upstream slowly: the proxy's send buffer towards it empties
    without waking the pool for longer than ``idle``. Bytes leaving that buffer are
    activity: the download completes, and the relay ends by EOF."""
    idle = 0.5
    pool = SplicePool(workers=1, pipe_size=64 * 1024)
    client, a = tcp_pair()
    b, upstream = tcp_pair()
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        try:  # a big send buffer towards the client (SO_SNDBUFFORCE needs CAP_NET_ADMIN)
            a.setsockopt(socket.SOL_SOCKET, 32, 1 * MiB)
        except OSError:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 * MiB)
        sndbuf = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        rate = sndbuf / 3 / (2.5 * idle)  # a third of the buffer takes 2.5 x idle to read
        total = sndbuf + 512 * 1024
        data = payload(total, 81)
        relay = pool.proxy(a, b, idle=idle)
        sender = threading.Thread(target=lambda: (upstream.sendall(data), upstream.shutdown(socket.SHUT_WR)), daemon=True)
        sender.start()
        got = bytearray()
        client.settimeout(10)
        step = max(1024, int(rate / 20))
        t0 = time.monotonic()
        while True:
            try:
                chunk = client.recv(step)
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
            pause = t0 + len(got) / rate - time.monotonic()
            if pause > 0:
                time.sleep(pause)  # the slow reader under test: it reads at ``rate``
        assert len(got) == total, f"got {len(got)} of {total} bytes: the relay was cut ({relay.reason})"
        assert digest(got) == digest(data)
        client.close()
        assert relay.wait(5) is EndReason.EOF
        assert read_all(upstream) == (b"", "eof")
    finally:
        pool.close()
        client.close()
        upstream.close()


# -- 12. an abort looks like a complete transfer --------------------------------------------------


@pytest.mark.parametrize("how", ["client_rst", "idle", "close", "pool_close"])
def test_12_a_relay_cut_short_resets_the_peers(how):
    """A relay that did not end by EOF both ways resets its peers (SO_LINGER 0), as a
    transparent TCP path would: a truncated upload never looks complete. A relay that
    ended by EOF both ways still closes with FINs."""
    pool = SplicePool(workers=1)
    client, a = tcp_pair()
    b, upstream = tcp_pair()
    try:
        relay = pool.proxy(a, b, idle=0.3 if how == "idle" else None)
        client.sendall(b"partial upload")
        assert recv_exact(upstream, 14) == b"partial upload"
        upstream.sendall(b"partial reply")
        assert recv_exact(client, 13) == b"partial reply"
        want = {"client_rst": EndReason.ERROR, "idle": EndReason.IDLE, "close": EndReason.UNSPLICED,
                "pool_close": EndReason.POOL_CLOSED}[how]
        if how == "client_rst":
            reset(client)
        elif how == "close":
            relay.close()
        elif how == "pool_close":
            pool.close(grace=0.2)
        assert relay.wait(5) is want
        assert read_all(upstream) == (b"", "reset")
        if how != "client_rst":
            assert read_all(client) == (b"", "reset")
    finally:
        pool.close()
        client.close()
        upstream.close()


def test_12_a_relay_that_ends_by_eof_both_ways_closes_with_fins():
    pool = SplicePool(workers=1)
    client, a = tcp_pair()
    b, upstream = tcp_pair()
    try:
        relay = pool.proxy(a, b)
        client.sendall(b"request")
        client.shutdown(socket.SHUT_WR)
        assert read_all(upstream) == (b"request", "eof")
        upstream.sendall(b"reply")
        upstream.shutdown(socket.SHUT_WR)
        assert read_all(client) == (b"reply", "eof")
        assert relay.wait(5) is EndReason.EOF
    finally:
        pool.close()
        client.close()
        upstream.close()


# -- 15. smaller ones ---------------------------------------------------------------------------


def test_15_proxy_of_the_two_ends_of_one_connection_is_eloop():
    pool = SplicePool(workers=1)
    a, b = tcp_pair()
    try:
        fds = fd_count()
        with pytest.raises(OSError) as info:
            pool.proxy(a, b)
        assert info.value.errno == errno.ELOOP
        assert a.fileno() != -1 and b.fileno() != -1  # not taken over
        assert fd_count() == fds
        a.sendall(b"ok")
        assert recv_exact(b, 2) == b"ok"
    finally:
        pool.close()
        a.close()
        b.close()


@pytest.mark.parametrize("grace", ["1", None, b"1", [1]])
def test_15_close_with_a_bad_grace_raises_type_error_and_changes_nothing(grace):
    link = Link()
    pool = SplicePool(workers=1)
    try:
        sp = pool.splice(link.src, link.dst)
        with pytest.raises(TypeError, match="grace"):
            pool.close(grace=grace)
        assert not pool.closed
        link.peer_src.sendall(b"still spliced")
        assert recv_exact(link.peer_dst, 13) == b"still spliced"
        assert sp.reason is None
    finally:
        pool.close()
        link.close()
    assert sp.reason is EndReason.POOL_CLOSED


@pytest.mark.parametrize("grace", [-1, float("nan")])
def test_15_close_with_a_negative_grace_raises_value_error(grace):
    pool = SplicePool(workers=1)
    try:
        with pytest.raises(ValueError, match="grace"):
            pool.close(grace=grace)
        assert not pool.closed
    finally:
        pool.close()

