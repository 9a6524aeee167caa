"""The errors ``pool.splice`` / ``pool.unsplice`` raise, in FreeBSD's order (docs/contract.md, "Errors").

Real loopback sockets only, no mocks. Every error test asserts the exact errno,
that the message names the offending socket (its fd number or its address) and
the check that failed, and the "failed call changes nothing" tests check the
live splice, its counters, the data, the blocking modes and the fd table.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    Link,
    accept_queue_full,
    fd_count,
    inq,
    recv_available,
    recv_exact,
    tcp_pair,
    wait_until,
)

import splicepool
from splicepool import EndReason, SplicePool, SpliceState
from splicepool.state import Phase

# Linux TCP_INFO: the first byte is the TCP state; 1 = ESTABLISHED, 2 = SYN_SENT.
_TCP_ESTABLISHED = 1
_TCP_SYN_SENT = 2


# --------------------------------------------------------------------------- helpers


def unused_fd(start: int = 10_000) -> int:
    """An fd number that is not open in this process (checked with os.fstat)."""
    fd = start
    while True:
        try:
            os.fstat(fd)
        except OSError as exc:
            if exc.errno == errno.EBADF:
                return fd
        fd += 1


def stable_fd_count(timeout: float = 1.0) -> int:
    """fd_count() once it has not changed for a few polls (workers may still be settling)."""
    deadline = time.monotonic() + timeout
    last, same = fd_count(), 0
    while same < 5 and time.monotonic() < deadline:
        time.sleep(0.01)  # the poll interval of a measurement: five equal counts in a row
        now = fd_count()
        same = same + 1 if now == last else 0
        last = now
    return last


def mode(sock: socket.socket) -> tuple[float | None, bool, bool]:
    """Everything a caller can observe about a socket's blocking mode."""
    return (sock.gettimeout(), sock.getblocking(), os.get_blocking(sock.fileno()))


def _message(exc: BaseException) -> str:
    """The text of an exception without OSError's '[Errno N]' prefix."""
    return re.sub(r"^\[Errno \d+\]\s*", "", str(exc))


def _number_in(text: str, number: int | str) -> bool:
    # a whole number: not part of a longer number nor of a dotted address
    return re.search(rf"(?<![\d.]){re.escape(str(number))}(?!\d|\.\d)", text) is not None


def _identities(thing: Any) -> list[str]:
    """The fd number, and for a bound socket its local port: what may name it."""
    if isinstance(thing, int):
        return [str(thing)]
    ids = [str(thing.fileno())]
    if isinstance(thing, socket.socket):
        try:
            local = thing.getsockname()
        except OSError:
            local = None
        if isinstance(local, tuple) and local[1]:
            ids.append(str(local[1]))
    return ids


def names(exc: BaseException, thing: Any) -> bool:
    text = _message(exc)
    return any(_number_in(text, ident) for ident in _identities(thing))


def assert_message(
    exc: BaseException,
    blamed: Any,
    words: tuple[str, ...],
    not_blamed: Any = None,
) -> None:
    """str(exc) names ``blamed`` (fd or address) and a word of the failed check."""
    text = str(exc)
    if blamed is not None:
        assert names(exc, blamed), (
            f"message does not name the offending socket {_identities(blamed)}: {text!r}"
        )
    if not_blamed is not None:
        assert not names(exc, not_blamed), (
            f"message blames the other socket {_identities(not_blamed)}, not "
            f"{_identities(blamed)}: {text!r}"
        )
    assert any(w.lower() in text.lower() for w in words), (
        f"message names none of the words {words} of the failed check: {text!r}"
    )


def splice_error(pool: SplicePool, src: Any, dst: Any, **kw: Any) -> OSError:
    with pytest.raises(OSError) as info:
        pool.splice(src, dst, **kw)
    return info.value


def unsplice_error(call: Callable[[], Any]) -> OSError:
    with pytest.raises(OSError) as info:
        call()
    return info.value


def has_ipv6() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback (::1)")


class Sockets:
    """Makes the sockets a test needs and closes every one of them at teardown."""

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._fds: list[int] = []

    def _keep(self, *items: Any) -> None:
        self._items.extend(items)

    def pair(self, family: int = socket.AF_INET) -> tuple[socket.socket, socket.socket]:
        a, b = tcp_pair(family)
        self._keep(a, b)
        return a, b

    def link(self, family: int = socket.AF_INET) -> Link:
        ln = Link(family)
        self._keep(*ln.sockets())
        return ln

    def listener(self, backlog: int = 1, host: str = "127.0.0.1") -> socket.socket:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        self._keep(s)
        s.bind((host, 0))
        s.listen(backlog)
        return s

    def unconnected(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._keep(s)
        return s

    def udp(self) -> socket.socket:
        """A connected UDP socket (so only its protocol is wrong)."""
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._keep(a, b)
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        a.connect(b.getsockname())
        b.connect(a.getsockname())
        return a

    def unix(self, kind: int = socket.SOCK_STREAM) -> tuple[socket.socket, socket.socket]:
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        self._keep(a, b)
        return a, b

    def file_fd(self) -> int:
        f = tempfile.TemporaryFile()
        self._keep(f)
        return f.fileno()

    def pipe_fd(self) -> int:
        r, w = os.pipe()
        self._fds.extend([r, w])
        return w

    def closed_socket(self) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.close()
        return s

    def close(self) -> None:
        for item in reversed(self._items):
            try:
                item.close()
            except OSError:
                pass
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass


@pytest.fixture
def socks():
    s = Sockets()
    yield s
    s.close()


def assert_running(sp: Any) -> None:
    assert sp.reason is None, f"splice ended: reason={sp.reason} error={sp.error}"
    assert not sp.done(), "splice is done"
    assert sp.state not in (SpliceState.CLOSED, SpliceState.CLOSING, SpliceState.EXCEPTION), (
        f"splice state is {sp.state}"
    )


def flow(sender: socket.socket, receiver: socket.socket, payload: bytes) -> None:
    """``payload`` sent on ``sender`` arrives, exactly, on ``receiver``."""
    sender.sendall(payload)
    got = recv_exact(receiver, len(payload), timeout=5)
    assert got == payload


def settle(sp: Any, expected: int) -> None:
    wait_until(lambda: sp.transferred == expected, what=f"transferred == {expected}")


# --------------------------------------------------------------------------- the environment
#
# One place that makes every kind of socket the table rows need, each on its own
# connection (so no two are the two ends of one connection and their ports differ).


class Env:
    def __init__(self, pool: SplicePool, socks: Sockets) -> None:
        self.conn_peer, self.conn = socks.pair()
        self.conn2, self.conn2_peer = socks.pair()
        self.listening = socks.listener()
        self.listening2 = socks.listener()
        self.unconnected = socks.unconnected()
        self.udp = socks.udp()
        self.unix_dgram, _ = socks.unix(socket.SOCK_DGRAM)
        self.unix_seqpacket, _ = socks.unix(socket.SOCK_SEQPACKET)
        self.closed_fd = unused_fd()
        self.file_fd = socks.file_fd()
        self.pipe_fd = socks.pipe_fd()
        self.live = socks.link()  # busy_src -> busy_drain, running
        self.busy_src, self.busy_drain = self.live.src, self.live.dst
        self.sp = pool.splice(self.busy_src, self.busy_drain)
        self.live2 = socks.link()  # busy_src2 -> busy_drain2, running
        self.busy_src2, self.busy_drain2 = self.live2.src, self.live2.dst
        self.sp2 = pool.splice(self.busy_src2, self.busy_drain2)

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)


@pytest.fixture
def env(pool, socks):
    return Env(pool, socks)


# --------------------------------------------------------------------------- one row at a time

# (source, drain, kwargs, errno, blamed socket or None, words of the check)
ROWS = [
    # dst is not an open fd
    ("conn", "closed_fd", {}, errno.EBADF, "closed_fd", ("open", "closed", "descriptor")),
    # dst is not a socket
    ("conn", "file_fd", {}, errno.ENOTSOCK, "file_fd", ("socket",)),
    ("conn", "pipe_fd", {}, errno.ENOTSOCK, "pipe_fd", ("socket",)),
    # max < 0 or idle < 0
    ("conn", "conn2", {"max": -1}, errno.EINVAL, None, ("max",)),
    ("conn", "conn2", {"max": -(1 << 40)}, errno.EINVAL, None, ("max",)),
    ("conn", "conn2", {"idle": -1}, errno.EINVAL, None, ("idle",)),
    ("conn", "conn2", {"idle": -0.25}, errno.EINVAL, None, ("idle",)),
    # not a stream socket that can be spliced
    ("udp", "conn2", {}, errno.EPROTONOSUPPORT, "udp", ("stream", "tcp", "protocol", "udp")),
    ("conn", "udp", {}, errno.EPROTONOSUPPORT, "udp", ("stream", "tcp", "protocol", "udp")),
    ("unix_dgram", "conn2", {}, errno.EPROTONOSUPPORT, "unix_dgram", ("stream", "protocol")),
    ("conn", "unix_dgram", {}, errno.EPROTONOSUPPORT, "unix_dgram", ("stream", "protocol")),
    ("unix_seqpacket", "conn2", {}, errno.EPROTONOSUPPORT, "unix_seqpacket", ("stream",)),
    ("conn", "unix_seqpacket", {}, errno.EPROTONOSUPPORT, "unix_seqpacket", ("stream",)),
    # source is listening
    ("listening", "conn2", {}, errno.EINVAL, "listening", ("listening",)),
    # source not connected
    ("unconnected", "conn2", {}, errno.ENOTCONN, "unconnected", ("connected",)),
    # source already spliced
    ("busy_src", "conn2", {}, errno.EBUSY, "busy_src", ("spliced", "busy")),
    # drain is listening
    ("conn", "listening", {}, errno.EINVAL, "listening", ("listening",)),
    # drain not connected
    ("conn", "unconnected", {}, errno.ENOTCONN, "unconnected", ("connected",)),
    # drain is already the drain of another splice
    ("conn", "busy_drain", {}, errno.EBUSY, "busy_drain", ("drain", "busy")),
]


@pytest.mark.parametrize(
    "src, dst, kw, code, blamed, words",
    ROWS,
    ids=[f"{r[0]}->{r[1]}{'-' + str(r[2]) if r[2] else ''}-{errno.errorcode[r[3]]}" for r in ROWS],
)
def test_each_row_raises_its_errno(pool, env, src, dst, kw, code, blamed, words):
    exc = splice_error(pool, env[src], env[dst], **kw)
    assert exc.errno == code, (
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(exc.errno)}: {exc}"
    )
    assert_message(exc, env[blamed] if blamed else None, words)
    if code == errno.EINVAL and blamed is None:
        key = next(iter(kw))
        assert str(kw[key]) in str(exc), f"message does not show {key}={kw[key]}: {exc}"
    # the live splices were not disturbed by the failed call
    assert_running(env.sp)
    assert_running(env.sp2)


def test_ebadf_for_a_closed_sockets_old_number(pool, socks):
    """A socket closed by the caller: its old fd number is not an open fd."""
    ln = socks.link()
    s = socket.socket()
    old = s.fileno()
    s.close()
    try:
        os.fstat(old)
    except OSError:
        pass
    else:
        pytest.skip(f"fd {old} was reused before the call")  # pragma: no cover
    exc = splice_error(pool, ln.src, old)
    assert exc.errno == errno.EBADF, str(exc)
    assert_message(exc, old, ("open", "closed", "descriptor"))


def test_ebadf_for_a_closed_socket_object_as_drain(pool, socks):
    """A closed socket object (fileno() == -1) is a bad fd, not a request to unsplice.

    docs/contract.md: only a negative *int* means unsplice; a closed ``socket.socket`` is
    "not an open fd". It must neither unsplice the running splice nor succeed.
    """
    ln = socks.link()
    sp = pool.splice(ln.src, ln.dst)
    flow(ln.peer_src, ln.peer_dst, b"before")
    settle(sp, 6)
    dead = socks.closed_socket()
    exc = splice_error(pool, ln.src, dead)
    assert exc.errno == errno.EBADF, str(exc)
    assert_running(sp)
    flow(ln.peer_src, ln.peer_dst, b"after")
    settle(sp, 11)


def test_source_not_open_or_not_a_socket(pool, socks):
    """The source gets EBADF/ENOTSOCK too, before the drain's (setsockopt on a bad fd; docs/contract.md)."""
    ln = socks.link()
    bad = unused_fd()
    exc = splice_error(pool, bad, ln.dst)
    assert exc.errno == errno.EBADF, str(exc)
    assert_message(exc, bad, ("open", "closed", "descriptor"))
    f = socks.file_fd()
    exc = splice_error(pool, f, ln.dst)
    assert exc.errno == errno.ENOTSOCK, str(exc)
    assert_message(exc, f, ("socket",))


# --------------------------------------------------------------------------- order

# Two conditions at once: the earlier row wins. (source, drain, kwargs, errno,
# blamed, words, the other offending socket that must not be blamed)
ORDER = [
    ("conn", "closed_fd", {"max": -1}, errno.EBADF, "closed_fd", ("open", "descriptor"), None),
    ("listening", "closed_fd", {}, errno.EBADF, "closed_fd", ("open", "descriptor"), "listening"),
    ("busy_src", "closed_fd", {"idle": -1}, errno.EBADF, "closed_fd", ("open",), "busy_src"),
    ("conn", "file_fd", {"max": -1}, errno.ENOTSOCK, "file_fd", ("socket",), None),
    ("udp", "pipe_fd", {}, errno.ENOTSOCK, "pipe_fd", ("socket",), "udp"),
    ("unconnected", "file_fd", {}, errno.ENOTSOCK, "file_fd", ("socket",), "unconnected"),
    ("udp", "conn2", {"max": -1}, errno.EINVAL, None, ("max",), None),
    ("conn", "udp", {"idle": -1.0}, errno.EINVAL, None, ("idle",), None),
    ("unix_dgram", "conn2", {"max": -5}, errno.EINVAL, None, ("max",), None),
    ("listening", "conn2", {"max": -1}, errno.EINVAL, None, ("max",), None),
    ("busy_src", "busy_drain2", {"max": -1}, errno.EINVAL, None, ("max",), None),
    ("listening", "udp", {}, errno.EPROTONOSUPPORT, "udp", ("stream", "tcp"), "listening"),
    ("unconnected", "unix_dgram", {}, errno.EPROTONOSUPPORT, "unix_dgram", ("stream",), None),
    ("busy_src", "udp", {}, errno.EPROTONOSUPPORT, "udp", ("stream", "tcp"), "busy_src"),
    ("listening", "listening2", {}, errno.EINVAL, "listening", ("listening",), "listening2"),
    ("listening", "unconnected", {}, errno.EINVAL, "listening", ("listening",), "unconnected"),
    ("listening", "busy_drain", {}, errno.EINVAL, "listening", ("listening",), "busy_drain"),
    ("unconnected", "listening", {}, errno.ENOTCONN, "unconnected", ("connected",), "listening"),
    ("unconnected", "busy_drain", {}, errno.ENOTCONN, "unconnected", ("connected",), "busy_drain"),
    ("busy_src", "listening", {}, errno.EBUSY, "busy_src", ("spliced", "busy"), "listening"),
    ("busy_src", "unconnected", {}, errno.EBUSY, "busy_src", ("spliced", "busy"), "unconnected"),
    ("busy_src", "busy_drain2", {}, errno.EBUSY, "busy_src", ("spliced", "busy"), "busy_drain2"),
    # a drain (of another splice) is free to be a source: the drain checks decide
    ("busy_drain", "listening", {}, errno.EINVAL, "listening", ("listening",), "busy_drain"),
    ("busy_drain", "busy_drain2", {}, errno.EBUSY, "busy_drain2", ("drain",), "busy_drain"),
]


@pytest.mark.parametrize(
    "src, dst, kw, code, blamed, words, other",
    ORDER,
    ids=[f"{r[0]}->{r[1]}{'-' + str(r[2]) if r[2] else ''}-{errno.errorcode[r[3]]}" for r in ORDER],
)
def test_earlier_row_wins(pool, env, src, dst, kw, code, blamed, words, other):
    exc = splice_error(pool, env[src], env[dst], **kw)
    assert exc.errno == code, (
        f"expected {errno.errorcode[code]}, got {errno.errorcode.get(exc.errno)}: {exc}"
    )
    assert_message(exc, env[blamed] if blamed else None, words, env[other] if other else None)
    assert_running(env.sp)
    assert_running(env.sp2)


def test_both_listening_blames_the_source(pool, socks):
    src = socks.listener()
    dst = socks.listener()
    exc = splice_error(pool, src, dst)
    assert exc.errno == errno.EINVAL, str(exc)
    assert_message(exc, src, ("listening",), not_blamed=dst)


def test_source_spliced_and_drain_busy_blames_the_source(pool, socks):
    a, b = socks.link(), socks.link()
    sp_a = pool.splice(a.src, a.dst)
    sp_b = pool.splice(b.src, b.dst)
    exc = splice_error(pool, a.src, b.dst)
    assert exc.errno == errno.EBUSY, str(exc)
    assert_message(exc, a.src, ("spliced", "busy"), not_blamed=b.dst)
    assert_running(sp_a)
    assert_running(sp_b)


# --------------------------------------------------------------------------- in-progress drain


def _tcp_state(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0]


def test_drain_with_connect_in_progress_is_accepted_and_data_waits(pool, socks):
    """A drain still in SYN_SENT is accepted; the data waits, then arrives once it connects.

    listen(0) takes one connection into its accept queue; the next non-blocking
    connect has its SYN dropped and stays in SYN_SENT until the queue has room
    and the SYN is retransmitted (about 1 s on Linux).
    """
    if not hasattr(socket, "TCP_INFO"):
        pytest.skip("needs TCP_INFO to see SYN_SENT")
    lsock = socks.listener(backlog=0)
    drain = None
    for _ in range(8):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        socks._keep(c)
        c.setblocking(False)
        rc = c.connect_ex(lsock.getsockname())
        assert rc in (0, errno.EINPROGRESS), os.strerror(rc)
        # Answered (connected), or its SYN is dropped: the accept queue is full.
        wait_until(lambda c=c: _tcp_state(c) != _TCP_SYN_SENT or accept_queue_full(lsock),
                   what="the connect answered or its SYN dropped")
        if _tcp_state(c) == _TCP_SYN_SENT:
            drain = c
            break
    if drain is None:
        pytest.skip("could not get a connect to stay in SYN_SENT")
    peer_src, src = socks.pair()
    sp = pool.splice(src, drain)  # must not raise ENOTCONN
    assert sp.drain is drain
    payload = os.urandom(3000)
    peer_src.sendall(payload)
    # The bytes wait in the source, and the splice waits for its drain (it reads no source).
    wait_until(lambda: inq(src) == len(payload) and sp.phase is Phase.WAIT_DRAIN,
               what="the bytes in the source, sp waiting for its drain")
    assert _tcp_state(drain) == _TCP_SYN_SENT, "drain connected too early for this test"
    assert sp.transferred == 0, "bytes were counted before the drain connected"
    assert_running(sp)  # EAGAIN/ENOTCONN on a connecting drain must not end the splice
    # make room in the accept queue: the retransmitted SYN completes the connect
    lsock.settimeout(5)
    want = drain.getsockname()
    for _ in range(10):
        peer_dst, addr = lsock.accept()
        socks._keep(peer_dst)
        if addr == want:
            break
    else:
        pytest.fail("the in-progress drain never connected")
    assert recv_exact(peer_dst, len(payload), timeout=5) == payload
    settle(sp, len(payload))
    assert_running(sp)


def test_just_connected_nonblocking_drain_is_accepted(pool, socks):
    lsock = socks.listener()
    drain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    socks._keep(drain)
    drain.setblocking(False)
    rc = drain.connect_ex(lsock.getsockname())
    assert rc in (0, errno.EINPROGRESS), os.strerror(rc)
    peer_src, src = socks.pair()
    sp = pool.splice(src, drain)
    lsock.settimeout(5)
    peer_dst, _ = lsock.accept()
    socks._keep(peer_dst)
    payload = os.urandom(10_000)
    flow(peer_src, peer_dst, payload)
    settle(sp, len(payload))


# --------------------------------------------------------------------------- accepted families


def test_af_unix_stream_is_accepted_and_moves_data(pool, socks):
    peer_src, src = socks.unix()
    dst, peer_dst = socks.unix()
    sp = pool.splice(src, dst)
    payload = os.urandom(50_000)
    flow(peer_src, peer_dst, payload)
    settle(sp, len(payload))


def test_tcp_to_af_unix_and_back_is_accepted(pool, socks):
    peer_src, src = socks.pair()
    dst, peer_dst = socks.unix()
    sp1 = pool.splice(src, dst)
    sp2 = pool.splice(dst, src)
    flow(peer_src, peer_dst, b"tcp to unix")
    flow(peer_dst, peer_src, b"unix to tcp")
    settle(sp1, 11)
    settle(sp2, 11)


@needs_ipv6
def test_ipv4_to_ipv6_is_accepted_and_moves_data(pool, socks):
    peer_src, src = socks.pair(socket.AF_INET)
    dst, peer_dst = socks.pair(socket.AF_INET6)
    sp = pool.splice(src, dst)
    payload = os.urandom(40_000)
    flow(peer_src, peer_dst, payload)
    settle(sp, len(payload))


@needs_ipv6
def test_ipv6_to_ipv4_is_accepted_and_moves_data(pool, socks):
    peer_src, src = socks.pair(socket.AF_INET6)
    dst, peer_dst = socks.pair(socket.AF_INET)
    sp = pool.splice(src, dst)
    payload = os.urandom(40_000)
    flow(peer_src, peer_dst, payload)
    settle(sp, len(payload))


# --------------------------------------------------------------------------- allowed cases


def test_self_splice_echoes_back_to_the_peer(pool, socks):
    peer, s = socks.pair()
    sp = pool.splice(s, s)
    assert sp.source is s and sp.drain is s
    payload = os.urandom(64_000)
    flow(peer, peer, payload)
    settle(sp, len(payload))
    pool.unsplice(s)
    assert sp.wait(2) is EndReason.UNSPLICED
    assert sp.transferred == len(payload)


def test_self_splice_max_then_data_stays(pool, socks):
    peer, s = socks.pair()
    sp = pool.splice(s, s, max=5)
    peer.sendall(b"helloworld")
    assert recv_exact(peer, 5, timeout=5) == b"hello"
    assert sp.wait(2) is EndReason.MAX
    assert sp.transferred == 5
    assert recv_exact(s, 5, timeout=5) == b"world"


def test_source_of_one_and_drain_of_another(pool, socks):
    """A bidirectional relay: src->dst and dst->src, each socket in both roles."""
    ln = socks.link()
    fwd = pool.splice(ln.src, ln.dst)
    rev = pool.splice(ln.dst, ln.src)
    flow(ln.peer_src, ln.peer_dst, b"ping" * 1000)
    flow(ln.peer_dst, ln.peer_src, b"pong" * 500)
    settle(fwd, 4000)
    settle(rev, 2000)
    assert_running(fwd)
    assert_running(rev)


def test_chain_source_is_drain_of_another(pool, socks):
    """x -> a and a -> b at once: a is the drain of one splice and the source of another."""
    x_peer, x = socks.pair()
    a_peer, a = socks.pair()
    b, b_peer = socks.pair()
    into_a = pool.splice(x, a)  # bytes to x go out of a, to a_peer
    out_of_a = pool.splice(a, b)  # bytes to a go out of b, to b_peer
    flow(x_peer, a_peer, b"via x into a")
    flow(a_peer, b_peer, b"from a to b")
    settle(into_a, 12)
    settle(out_of_a, 11)


@pytest.mark.parametrize("order", ["a_into_b", "b_into_a"])
def test_one_end_of_a_connection_into_its_other_end_is_eloop(pool, socks, order):
    """A -> B where A and B are the two ends of one TCP connection: what B sends arrives at
    A and would be moved again, for ever. Refused with ELOOP (OpenBSD's answer to a loop);
    the call changes nothing, and the sockets still work."""
    a, b = socks.pair()
    src, dst = (a, b) if order == "a_into_b" else (b, a)
    with pytest.raises(OSError) as info:
        pool.splice(src, dst)
    assert info.value.errno == errno.ELOOP
    assert f"fd {src.fileno()}" in str(info.value) and f"fd {dst.fileno()}" in str(info.value)
    assert "two ends of one connection" in str(info.value)
    assert pool.stats()["live"] == 0
    assert pool.transferred(src) == 0
    flow(a, b, b"still a plain connection")
    flow(b, a, b"both ways")


def test_eloop_comes_after_ebusy(pool, socks):
    """FreeBSD's order first: a busy source is EBUSY even when the request would also loop."""
    a, b = socks.pair()
    ln = socks.link()
    pool.splice(a, ln.dst)
    with pytest.raises(OSError) as info:
        pool.splice(a, b)
    assert info.value.errno == errno.EBUSY


# --------------------------------------------------------------------------- types


def test_int_fds_and_fileno_objects_are_accepted(pool, socks):
    class Wrap:
        def __init__(self, sock: socket.socket) -> None:
            self.sock = sock

        def fileno(self) -> int:
            return self.sock.fileno()

    a, b = socks.link(), socks.link()
    sp_a = pool.splice(a.src.fileno(), a.dst.fileno(), max=0, idle=30)
    sp_b = pool.splice(Wrap(b.src), Wrap(b.dst), idle=30.0)
    flow(a.peer_src, a.peer_dst, b"int fds")
    flow(b.peer_src, b.peer_dst, b"fileno objects")
    settle(sp_a, 7)
    settle(sp_b, 14)
    assert pool.transferred(a.src) == 7
    assert pool.transferred(b.src.fileno()) == 14


class BadFileno:
    def __init__(self, value: Any) -> None:
        self.value = value

    def fileno(self) -> Any:
        return self.value


def _type_cases() -> list[tuple[str, Callable[[Link], tuple[Any, Any, dict]]]]:
    return [
        ("max-str", lambda ln: (ln.src, ln.dst, {"max": "x"})),
        ("max-float", lambda ln: (ln.src, ln.dst, {"max": 1.5})),
        ("idle-str", lambda ln: (ln.src, ln.dst, {"idle": "x"})),
        ("idle-list", lambda ln: (ln.src, ln.dst, {"idle": [1]})),
        ("dst-float-fd", lambda ln: (ln.src, float(ln.dst.fileno()), {})),
        ("src-float-fd", lambda ln: (float(ln.src.fileno()), ln.dst, {})),
        ("dst-float-3.0", lambda ln: (ln.src, 3.0, {})),
        ("dst-fileno-str", lambda ln: (ln.src, BadFileno(str(ln.dst.fileno())), {})),
        ("dst-fileno-float", lambda ln: (ln.src, BadFileno(float(ln.dst.fileno())), {})),
        ("src-fileno-str", lambda ln: (BadFileno(str(ln.src.fileno())), ln.dst, {})),
        ("src-fileno-none", lambda ln: (BadFileno(None), ln.dst, {})),
        ("dst-none", lambda ln: (ln.src, None, {})),
        ("dst-str", lambda ln: (ln.src, "127.0.0.1:80", {})),
        ("dst-object", lambda ln: (ln.src, object(), {})),
        ("src-object", lambda ln: (object(), ln.dst, {})),
    ]


@pytest.mark.parametrize("build", [c[1] for c in _type_cases()], ids=[c[0] for c in _type_cases()])
def test_bad_types_raise_typeerror(pool, link, build):
    src, dst, kw = build(link)
    before = (mode(link.src), mode(link.dst))
    with pytest.raises(TypeError):
        pool.splice(src, dst, **kw)
    assert (mode(link.src), mode(link.dst)) == before
    assert pool.transferred(link.src) == 0
    # nothing was spliced: the bytes stay in the source
    link.peer_src.sendall(b"not moved")
    assert recv_exact(link.src, 9, timeout=5) == b"not moved"
    assert recv_available(link.peer_dst, wait=0.05) == b""


def test_bool_max_is_consistent(pool, link):
    """``max=True``: either a TypeError, or exactly max=1 (never 'unlimited')."""
    try:
        sp = pool.splice(link.src, link.dst, max=True)
    except TypeError:
        return  # bool rejected as a byte count
    link.peer_src.sendall(b"ab")
    assert recv_exact(link.peer_dst, 1, timeout=5) == b"a"
    assert sp.wait(2) is EndReason.MAX
    assert sp.transferred == 1
    assert recv_exact(link.src, 1, timeout=5) == b"b"


@pytest.mark.parametrize("where", ["src", "dst"])
def test_bool_fd_is_consistent(pool, link, where):
    """``True`` as an fd: either a TypeError, or exactly what the int 1 gives."""

    def call(value: Any) -> BaseException | None:
        args = (value, link.dst) if where == "src" else (link.src, value)
        try:
            pool.splice(*args)
        except (TypeError, OSError) as exc:
            return exc
        return None

    as_bool = call(True)
    assert as_bool is not None, "True was accepted as a socket"
    if isinstance(as_bool, TypeError):
        return
    as_int = call(1)
    assert type(as_bool) is type(as_int), (as_bool, as_int)
    assert getattr(as_bool, "errno", None) == getattr(as_int, "errno", None), (as_bool, as_int)


# --------------------------------------------------------------------------- a failed call changes nothing


class Scene:
    """A running splice A->B (with bytes already moved) and spare sockets C and D."""

    def __init__(self, pool: SplicePool, socks: Sockets) -> None:
        self.pool = pool
        self.ab = socks.link()
        self.a, self.b = self.ab.src, self.ab.dst
        # warm up: a second live splice so both workers have started
        self.other = socks.link()
        self.other_sp = pool.splice(self.other.src, self.other.dst)
        self.sp = pool.splice(self.a, self.b)
        self.first = os.urandom(20_000)
        flow(self.ab.peer_src, self.ab.peer_dst, self.first)
        settle(self.sp, len(self.first))
        self.c, self.c_peer = socks.pair()  # a free connected drain candidate
        self.c.settimeout(None)  # blocking
        self.d_peer, self.d = socks.pair()  # a free connected source candidate
        self.d.settimeout(2.5)  # timeout mode (the fd is non-blocking underneath)
        self.d_peer.sendall(b"D's own data")
        wait_until(lambda: inq(self.d) == 12, what="D's own data in D")
        self.udp = socks.udp()
        self.listening = socks.listener()

    def modes(self) -> list[tuple[float | None, bool, bool]]:
        return [mode(s) for s in (self.a, self.b, self.c, self.d)]


FAILING_CALLS: list[tuple[str, Callable[[Scene], Any], type[BaseException], int | None]] = [
    ("A-again-to-C", lambda s: s.pool.splice(s.a, s.c), OSError, errno.EBUSY),
    ("A-again-to-B", lambda s: s.pool.splice(s.a, s.b), OSError, errno.EBUSY),
    ("D-to-B", lambda s: s.pool.splice(s.d, s.b), OSError, errno.EBUSY),
    ("A-to-C-max-neg", lambda s: s.pool.splice(s.a, s.c, max=-1), OSError, errno.EINVAL),
    ("D-to-B-idle-neg", lambda s: s.pool.splice(s.d, s.b, idle=-1), OSError, errno.EINVAL),
    ("A-to-bad-fd", lambda s: s.pool.splice(s.a, unused_fd()), OSError, errno.EBADF),
    ("D-to-bad-fd", lambda s: s.pool.splice(s.d, unused_fd()), OSError, errno.EBADF),
    ("D-to-udp", lambda s: s.pool.splice(s.d, s.udp), OSError, errno.EPROTONOSUPPORT),
    ("D-to-listening", lambda s: s.pool.splice(s.d, s.listening), OSError, errno.EINVAL),
    ("unsplice-B-only-drain", lambda s: s.pool.unsplice(s.b), OSError, errno.ENOTCONN),
    ("B-to-minus-1", lambda s: s.pool.splice(s.b, -1), OSError, errno.ENOTCONN),
    ("unsplice-D", lambda s: s.pool.unsplice(s.d), OSError, errno.ENOTCONN),
    ("unsplice-listening", lambda s: s.pool.unsplice(s.listening), OSError, errno.EINVAL),
    ("A-to-C-max-str", lambda s: s.pool.splice(s.a, s.c, max="x"), TypeError, None),
    ("D-to-C-float-fd", lambda s: s.pool.splice(s.d, float(s.c.fileno())), TypeError, None),
]


@pytest.mark.parametrize(
    "call, exc_type, code", [c[1:] for c in FAILING_CALLS], ids=[c[0] for c in FAILING_CALLS]
)
def test_failed_call_changes_nothing(pool, socks, call, exc_type, code):
    s = Scene(pool, socks)
    n = len(s.first)
    modes_before = s.modes()
    fds_before = stable_fd_count()
    with pytest.raises(exc_type) as info:
        call(s)
    if code is not None:
        assert info.value.errno == code, (
            f"expected {errno.errorcode[code]}, got {errno.errorcode.get(info.value.errno)}: "
            f"{info.value}"
        )
    # the fd table: no duplicate, pipe or selector left behind
    assert stable_fd_count() == fds_before, "the failed call leaked an fd"
    # blocking modes, as the caller sees them and as the fd has them
    assert s.modes() == modes_before, "the failed call changed a blocking mode"
    # the live splice and its counters
    assert_running(s.sp)
    assert s.sp.transferred == n
    assert s.pool.transferred(s.a) == n
    assert s.pool.transferred(s.d) == 0
    assert s.sp.source is s.a and s.sp.drain is s.b
    # data still flows A->B, exactly, and only there
    more = os.urandom(30_000)
    flow(s.ab.peer_src, s.ab.peer_dst, more)
    settle(s.sp, n + len(more))
    assert s.pool.transferred(s.a) == n + len(more)
    assert recv_available(s.c_peer, wait=0.05) == b"", "bytes reached C"
    assert recv_exact(s.d, 12, timeout=5) == b"D's own data", "D's data was taken"
    assert recv_available(s.ab.peer_dst, wait=0.05) == b""
    assert_running(s.other_sp)


@pytest.mark.parametrize("timeout", [None, 0.0, 2.5], ids=["blocking", "nonblocking", "timeout"])
def test_failed_call_keeps_each_blocking_mode(pool, socks, timeout):
    """The candidate source and drain of a rejected splice keep their mode, whatever it was."""
    ln = socks.link()
    sp = pool.splice(ln.src, ln.dst)
    d_peer, d = socks.pair()
    c, c_peer = socks.pair()
    d.settimeout(timeout)
    c.settimeout(timeout)
    before = (mode(d), mode(c))
    assert splice_error(pool, d, ln.dst).errno == errno.EBUSY  # drain busy: d is checked first
    assert splice_error(pool, ln.src, c).errno == errno.EBUSY  # source busy
    assert splice_error(pool, d, c, max=-3).errno == errno.EINVAL
    assert (mode(d), mode(c)) == before
    assert_running(sp)


def test_failed_calls_leak_no_fd_over_many_tries(pool, socks):
    s = Scene(pool, socks)
    fds_before = stable_fd_count()
    for _ in range(200):
        for call in (
            lambda: s.pool.splice(s.a, s.c),
            lambda: s.pool.splice(s.d, s.b),
            lambda: s.pool.splice(s.d, s.udp),
            lambda: s.pool.unsplice(s.d),
        ):
            with pytest.raises(OSError):
                call()
    assert stable_fd_count() == fds_before
    assert s.sp.transferred == len(s.first)
    assert_running(s.sp)


# --------------------------------------------------------------------------- unsplice


@pytest.mark.parametrize(
    "how",
    ["splice-minus-1", "splice-minus-2", "splice-minus-big", "pool-unsplice", "sp-unsplice"],
)
def test_unsplice_forms(pool, link, how):
    sp = pool.splice(link.src, link.dst)
    flow(link.peer_src, link.peer_dst, b"x" * 1000)
    settle(sp, 1000)
    if how == "splice-minus-1":
        pool.splice(link.src, -1)
    elif how == "splice-minus-2":
        pool.splice(link.src, -2)
    elif how == "splice-minus-big":
        pool.splice(link.src, -(1 << 31))
    elif how == "pool-unsplice":
        pool.unsplice(link.src)
    else:
        sp.unsplice()
    assert sp.wait(2) is EndReason.UNSPLICED
    assert sp.reason is EndReason.UNSPLICED
    assert sp.error is None
    assert sp.transferred == 1000
    assert pool.transferred(link.src) == 1000
    # nothing is taken from the source any more
    link.peer_src.sendall(b"stays")
    assert recv_exact(link.src, 5, timeout=5) == b"stays"
    assert recv_available(link.peer_dst, wait=0.05) == b""
    # source and drain are free again
    wait_until(sp.done, what="done()")
    sp2 = pool.splice(link.src, link.dst)
    assert pool.transferred(link.src) == 0
    flow(link.peer_src, link.peer_dst, b"again")
    settle(sp2, 5)
    assert pool.transferred(link.src) == 5


def _unsplicers(pool: SplicePool, sock: Any) -> list[Callable[[], Any]]:
    return [
        lambda: pool.unsplice(sock),
        lambda: pool.splice(sock, -1),
        lambda: pool.splice(sock, -7),
    ]


def test_unsplice_listening_is_einval(pool, socks):
    lsock = socks.listener()
    for call in _unsplicers(pool, lsock):
        exc = unsplice_error(call)
        assert exc.errno == errno.EINVAL, str(exc)
        assert_message(exc, lsock, ("listening",))


def test_unsplice_never_spliced_is_enotconn(pool, socks):
    _, s = socks.pair()
    for call in _unsplicers(pool, s):
        exc = unsplice_error(call)
        assert exc.errno == errno.ENOTCONN, str(exc)
        assert_message(exc, s, ("splice",))


def test_unsplice_unconnected_never_spliced_is_enotconn(pool, socks):
    s = socks.unconnected()
    exc = unsplice_error(lambda: pool.unsplice(s))
    assert exc.errno == errno.ENOTCONN, str(exc)
    assert_message(exc, s, ("splice", "connected"))


def test_unsplice_after_max_ended_is_enotconn(pool, link):
    sp = pool.splice(link.src, link.dst, max=4)
    link.peer_src.sendall(b"abcdef")
    assert recv_exact(link.peer_dst, 4, timeout=5) == b"abcd"
    assert sp.wait(2) is EndReason.MAX
    for call in _unsplicers(pool, link.src):
        exc = unsplice_error(call)
        assert exc.errno == errno.ENOTCONN, str(exc)
        assert_message(exc, link.src, ("splice",))
    assert sp.reason is EndReason.MAX  # not rewritten as UNSPLICED
    assert pool.transferred(link.src) == 4
    assert recv_exact(link.src, 2, timeout=5) == b"ef"


def test_unsplice_after_eof_ended_is_enotconn(pool, link):
    sp = pool.splice(link.src, link.dst)
    link.peer_src.sendall(b"bye")
    link.peer_src.shutdown(socket.SHUT_WR)
    assert sp.wait(2) is EndReason.EOF
    exc = unsplice_error(lambda: pool.unsplice(link.src))
    assert exc.errno == errno.ENOTCONN, str(exc)
    assert sp.reason is EndReason.EOF


def test_unsplice_only_a_drain_is_enotconn(pool, link):
    sp = pool.splice(link.src, link.dst)
    for call in _unsplicers(pool, link.dst):
        exc = unsplice_error(call)
        assert exc.errno == errno.ENOTCONN, str(exc)
        assert_message(exc, link.dst, ("splice", "drain"))
    assert_running(sp)
    flow(link.peer_src, link.peer_dst, b"still spliced")
    settle(sp, 13)


def test_double_unsplice_is_enotconn(pool, link):
    sp = pool.splice(link.src, link.dst)
    pool.unsplice(link.src)
    assert sp.wait(2) is EndReason.UNSPLICED
    for call in _unsplicers(pool, link.src):
        exc = unsplice_error(call)
        assert exc.errno == errno.ENOTCONN, str(exc)
        assert_message(exc, link.src, ("splice",))
    assert sp.reason is EndReason.UNSPLICED


def test_double_handle_unsplice_is_enotconn(pool, link):
    """``sp.unsplice()`` is 'the same as pool.splice(sp.source, -1)': twice is ENOTCONN."""
    sp = pool.splice(link.src, link.dst)
    sp.unsplice()
    assert sp.wait(2) is EndReason.UNSPLICED
    exc = unsplice_error(sp.unsplice)
    assert exc.errno == errno.ENOTCONN, str(exc)


def test_unsplice_bad_fd(pool):
    """Like setsockopt on a bad fd, unsplicing one is EBADF (docs/contract.md, "Errors")."""
    bad = unused_fd()
    exc = unsplice_error(lambda: pool.unsplice(bad))
    assert exc.errno == errno.EBADF, str(exc)
    assert_message(exc, bad, ("open", "closed", "descriptor"))


# --------------------------------------------------------------------------- transferred


def test_transferred_of_never_spliced_is_zero(pool, socks):
    _, s = socks.pair()
    assert pool.transferred(s) == 0
    assert pool.transferred(s.fileno()) == 0
    assert pool.transferred(socks.listener()) == 0


def test_transferred_of_closed_socket_is_ebadf(pool, socks):
    ln = socks.link()
    sp = pool.splice(ln.src, ln.dst, max=3)
    flow(ln.peer_src, ln.peer_dst, b"abc")
    assert sp.wait(2) is EndReason.MAX
    assert pool.transferred(ln.src) == 3
    fd = ln.src.fileno()
    ln.src.close()
    with pytest.raises(OSError) as info:
        pool.transferred(ln.src)
    assert info.value.errno == errno.EBADF, str(info.value)
    bad = unused_fd()
    with pytest.raises(OSError) as info:
        pool.transferred(bad)
    assert info.value.errno == errno.EBADF, str(info.value)
    # a new socket that gets the old fd number was never spliced
    fresh = socket.socket()
    socks._keep(fresh)
    if fresh.fileno() == fd:
        assert pool.transferred(fresh) == 0
        assert pool.transferred(fd) == 0


# --------------------------------------------------------------------------- pool closed


def _closed_pool_calls(p: SplicePool, ln: Link) -> dict[str, Callable[[], Any]]:
    return {
        "splice": lambda: p.splice(ln.src, ln.dst),
        "splice-max-idle": lambda: p.splice(ln.src, ln.dst, max=10, idle=1.0),
        "unsplice": lambda: p.unsplice(ln.src),
        "splice-minus-1": lambda: p.splice(ln.src, -1),
    }


def _assert_closed_pool_refuses(p: SplicePool, ln: Link, which: tuple[str, ...]) -> None:
    """Each call in ``which`` raises a RuntimeError saying the pool is closed, changing nothing."""
    modes = (mode(ln.src), mode(ln.dst))
    fds = stable_fd_count()
    calls = _closed_pool_calls(p, ln)
    for name in which:
        with pytest.raises(RuntimeError) as info:
            calls[name]()
        assert not isinstance(info.value, OSError)
        assert "closed" in str(info.value).lower(), (
            f"{name}: does not say the pool is closed: {info.value}"
        )
    assert (mode(ln.src), mode(ln.dst)) == modes
    assert stable_fd_count() == fds
    ln.peer_src.sendall(b"unmoved")
    assert recv_exact(ln.src, 7, timeout=5) == b"unmoved"
    assert recv_available(ln.peer_dst, wait=0.05) == b""


SPLICE_CALLS = ("splice", "splice-max-idle")
UNSPLICE_CALLS = ("unsplice", "splice-minus-1")


def test_closed_pool_never_used_refuses_splice(socks):
    p = SplicePool(workers=2)
    p.close()
    p.close()  # idempotent
    _assert_closed_pool_refuses(p, socks.link(), SPLICE_CALLS)


def test_closed_pool_after_use_refuses_splice(socks):
    ln = socks.link()
    with SplicePool(workers=2) as p:
        sp = p.splice(ln.src, ln.dst)
        flow(ln.peer_src, ln.peer_dst, b"moved")
        settle(sp, 5)
    assert sp.wait(2) is EndReason.POOL_CLOSED
    _assert_closed_pool_refuses(p, ln, SPLICE_CALLS)


def test_closed_pool_refuses_unsplice(socks):
    """The last row holds for the unsplice forms too: ``pool.splice(src, -1)`` is a
    ``pool.splice`` call, and a closed pool says so instead of ENOTCONN (which
    would suggest the socket is merely not spliced, not that the pool is gone)."""
    ln = socks.link()
    with SplicePool(workers=2) as p:
        sp = p.splice(ln.src, ln.dst)
    assert sp.wait(2) is EndReason.POOL_CLOSED
    wait_until(sp.done, what="done()")
    _assert_closed_pool_refuses(p, ln, UNSPLICE_CALLS)


# --------------------------------------------------------------------------- module level


def test_module_level_functions_share_the_checks(socks):
    """splicepool.splice/unsplice/transferred (default pool) raise the same errnos."""
    ln = socks.link()
    lsock = socks.listener()
    exc = splice_error(splicepool, ln.src, lsock)
    assert exc.errno == errno.EINVAL, str(exc)
    exc = unsplice_error(lambda: splicepool.unsplice(ln.src))
    assert exc.errno == errno.ENOTCONN, str(exc)
    assert splicepool.transferred(ln.src) == 0
