"""Argument and socket validation, with FreeBSD's errnos.

Everything that turns "a socket or an fd" into one thing happens here, at the
edge, so the pool and the workers never ask again. Messages name the socket
(fd number and addresses) and the check that failed.
"""

from __future__ import annotations

import _socket
import errno
import math
import os
import socket
import stat
import struct
import sys
from collections import namedtuple

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

# Linux's TCP_INFO starts with the connection state; 2 is TCP_SYN_SENT.
_TCP_SYN_SENT = 2
_SPLICEABLE_FAMILIES = {socket.AF_INET, socket.AF_INET6}
if hasattr(socket, "AF_UNIX"):
    _SPLICEABLE_FAMILIES.add(socket.AF_UNIX)
OFF_MAX = (1 << 63) - 1


def oserror(code: int, message: str) -> OSError:
    """An OSError whose errno is ``code`` and whose text says what failed."""
    return OSError(code, f"{os.strerror(code)}: {message}")


def fileno_of(obj: Any, role: str) -> int:
    """The fd behind ``obj`` (an int or anything with ``fileno()``); TypeError otherwise.

    Negative ints are returned as they are (they mean "unsplice" for a drain).

    An asyncio ``TransportSocket`` (``transport.get_extra_info("socket")``) is
    refused by its type alone, before anything is asked of it: its transport
    owns the fd and reads from it, so the pool and the transport would both
    own it (the transport's buffered bytes lost, EBADF once one of them closes it).
    """
    if isinstance(obj, bool):
        raise TypeError(f"{role} must be a socket or an int file descriptor, not bool")
    if isinstance(obj, int):
        return int(obj)
    cls = type(obj)
    if cls.__name__ == "TransportSocket" and cls.__module__ == "asyncio.trsock":
        raise TypeError(
            f"{role} is an asyncio TransportSocket (transport.get_extra_info('socket')): "
            "its transport owns the fd and has already read from it, so the pool cannot "
            "take it. Accept with loop.sock_accept() on a plain non-blocking listening "
            "socket and hand that socket over (see examples/asyncio_proxy.py), or take "
            "the connection away from the transport first: pause_reading(), keep the "
            "StreamReader's buffered bytes, socket.socket(fileno=os.dup(fd)), then "
            "transport.abort()"
        )
    fileno = getattr(obj, "fileno", None)
    if fileno is None or not callable(fileno):
        raise TypeError(
            f"{role} must be a socket or an int file descriptor, not {type(obj).__name__}"
        )
    fd = fileno()
    if isinstance(fd, bool) or not isinstance(fd, int):
        raise TypeError(f"{role}.fileno() returned {type(fd).__name__}, expected int")
    return fd


def check_max(max: Any) -> int:
    if isinstance(max, bool) or not isinstance(max, int):
        raise TypeError(f"max must be an int number of bytes, not {type(max).__name__}")
    return int(max)


def check_idle(idle: Any) -> float | None:
    if idle is None:
        return None
    if isinstance(idle, bool) or not isinstance(idle, (int, float)):
        raise TypeError(f"idle must be seconds as a float or None, not {type(idle).__name__}")
    try:
        return float(idle)
    except OverflowError:
        return math.inf if idle > 0 else -math.inf


def validate_limits(max: int, idle: float | None) -> None:
    """EINVAL for a negative ``max`` or ``idle`` (and for values no off_t/timeval holds)."""
    if max < 0:
        raise oserror(errno.EINVAL, f"max={max} is negative (0 means unlimited)")
    if max > OFF_MAX:
        raise oserror(errno.EINVAL, f"max={max} does not fit in off_t (at most {OFF_MAX})")
    if idle is not None and (math.isnan(idle) or idle < 0):
        raise oserror(errno.EINVAL, f"idle={idle} is not a non-negative number of seconds")


def _fmt_addr(addr: Any) -> str:
    if isinstance(addr, tuple):
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    if isinstance(addr, bytes):
        addr = addr.decode("utf-8", "replace")
    return repr(addr) if addr else "unix"


class SockInfo(
    namedtuple(
        "SockInfo",
        "fd key family type proto listening connected connecting tls local peer label desc",
    )
):
    """What the checks learned about one socket fd (a passive record).

    ``key``: the socket's inode number, which survives fd-number reuse (see
    ``socket_key``). ``local`` and ``peer``: its addresses (None when unknown).
    ``label``: "source fd 7 (127.0.0.1:5000 -> 127.0.0.1:40000)", role, fd and
    addresses; ``desc``: the same without the role, as a socket can be a source
    and a drain at once.
    """

    __slots__ = ()

    @property
    def spliceable(self) -> bool:
        if self.tls or self.type != socket.SOCK_STREAM:
            return False
        if self.family not in _SPLICEABLE_FAMILIES:
            return False
        return self.family == getattr(socket, "AF_UNIX", None) or self.proto in (
            0,
            socket.IPPROTO_TCP,
        )


def socket_key(fd: int) -> int:
    """What identifies the socket behind ``fd`` while it lives: its inode number.

    Every socket is an inode of the one sockfs, so the number alone is unique
    (a plain int is also half the memory of a (st_dev, st_ino) tuple). A file
    that is not a socket gets a negative key, which no socket has.
    """
    st = os.fstat(fd)
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else -1 - st.st_ino


def wrap(fd: int) -> Any:
    """A ``_socket.socket`` on ``fd`` (the C type: never monkey-patched) that leaves its mode alone.

    With ``socket.setdefaulttimeout()`` in force, creating a socket object from
    an fd makes it non-blocking; a check must change nothing, so undo that.
    """
    if socket.getdefaulttimeout() is None:
        return _socket.socket(fileno=fd)
    blocking = os.get_blocking(fd)
    s = _socket.socket(fileno=fd)
    if blocking:
        os.set_blocking(fd, True)
    return s


_STREAM_NONBLOCK = socket.SOCK_STREAM | getattr(socket, "SOCK_NONBLOCK", 0)


def made(fd: int, family: int) -> tuple[Any, int]:
    """(a non-blocking ``_socket.socket`` on ``fd``, its key) for a connected stream socket
    a caller made itself and hands over whole (``SplicePool.proxy_accepted``): nothing is
    asked of it but its key (``fstat``) and what CPython checks when it wraps an fd
    (``getsockname``). ``SOCK_NONBLOCK`` in the type tells the object what the caller
    promised (the fd is non-blocking) without setting it again. Its label is
    ``made_label``'s, made only when a message needs it."""
    key = socket_key(fd)
    sock = _socket.socket(family, _STREAM_NONBLOCK, 0, fileno=fd)
    return sock, key


def made_label(fd: int, peer: Any) -> str:
    """The label of a socket ``made``: ``fd 7 (-> 127.0.0.1:8000)``. ``peer``: its peer's
    address, or that address as text already (``HOST:PORT``, ``[V6]:PORT``)."""
    return f"fd {fd} (-> {peer if isinstance(peer, str) else _fmt_addr(peer)})"


def check_still_connected(sock: Any, fd: int, role: str) -> None:
    """ENOTCONN, naming the socket as ``probe`` would, if ``sock`` has no peer (any more)."""
    try:
        sock.getpeername()
    except OSError:
        try:
            where = _fmt_addr(sock.getsockname())
        except OSError:
            where = "unbound"
        raise oserror(errno.ENOTCONN, f"{role} fd {fd} ({where}) is not connected") from None


def probe(obj: Any, fd: int, role: str) -> SockInfo:
    """Inspect ``fd``; raise EBADF if it is not open, ENOTSOCK if it is not a socket."""
    try:
        key = socket_key(fd)
    except (OSError, OverflowError) as exc:
        raise oserror(errno.EBADF, f"{role} fd {fd} is not an open file descriptor") from exc
    try:
        s = wrap(fd)
    except OSError as exc:
        if exc.errno == errno.EBADF:
            raise oserror(errno.EBADF, f"{role} fd {fd} is not an open file descriptor") from exc
        raise oserror(errno.ENOTSOCK, f"{role} fd {fd} is not a socket") from exc
    try:
        return _inspect(obj, s, fd, key, role)
    finally:
        s.detach()


def _inspect(obj: Any, s: Any, fd: int, key: int, role: str) -> SockInfo:
    listening = False
    try:
        listening = bool(s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))
    except OSError:
        pass
    local = peer = None
    try:
        local = s.getsockname()
    except OSError:
        pass
    connected = connecting = False
    try:
        peer = s.getpeername()
        connected = True
    except OSError:
        if s.family in (socket.AF_INET, socket.AF_INET6) and hasattr(socket, "TCP_INFO"):
            try:
                info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
                connecting = info[0] == _TCP_SYN_SENT
            except OSError:
                pass
    ssl = sys.modules.get("ssl")
    tls = ssl is not None and isinstance(obj, ssl.SSLSocket)
    where = _fmt_addr(local) if local is not None else "unbound"
    if peer is not None:
        where += f" -> {_fmt_addr(peer)}"
    return SockInfo(
        fd=fd,
        key=key,
        family=s.family,
        type=s.type,
        proto=s.proto,
        listening=listening,
        connected=connected,
        connecting=connecting,
        tls=tls,
        local=local,
        peer=peer,
        label=f"{role} fd {fd} ({where})",
        desc=f"fd {fd} ({where})",
    )


def check_spliceable(info: SockInfo) -> None:
    if info.spliceable:
        return
    if info.tls:
        why = "is a TLS socket: splicing would bypass TLS (use a copy relay)"
    elif info.type != socket.SOCK_STREAM:
        why = "is not a stream socket"
    else:
        why = "is not a TCP (IPv4/IPv6) or AF_UNIX stream socket"
    raise oserror(errno.EPROTONOSUPPORT, f"{info.label} {why}")


def check_loop(src: SockInfo, dst: SockInfo) -> None:
    """ELOOP if ``src`` and ``dst`` are the two ends of one TCP connection.

    Every byte the drain sends would arrive at the source and be moved again, for
    ever (OpenBSD refuses such loops with ELOOP; FreeBSD lets them spin). Only TCP
    is checked: its two address pairs name a connection on this host exactly,
    whereas unnamed AF_UNIX ends look alike. A socket spliced to itself is an
    echo, not a loop, and stays allowed.
    """
    if src.key == dst.key or src.family not in (socket.AF_INET, socket.AF_INET6):
        return
    if src.local is None or src.peer is None or dst.local is None or dst.peer is None:
        return
    if src.local[:2] == dst.peer[:2] and src.peer[:2] == dst.local[:2]:
        raise oserror(
            errno.ELOOP,
            f"{src.label} and {dst.label} are the two ends of one connection: "
            "every byte would loop between them",
        )


def check_endpoint(info: SockInfo, *, accept_connecting: bool) -> None:
    """EINVAL if listening, ENOTCONN if neither connected nor (when allowed) connecting."""
    if info.listening:
        raise oserror(errno.EINVAL, f"{info.label} is listening")
    if info.connected or (accept_connecting and info.connecting):
        return
    raise oserror(errno.ENOTCONN, f"{info.label} is not connected")


def detach(*objs: Any) -> None:
    """The pool owns these sockets now: make their objects forget the fds."""
    for obj in objs:
        if not isinstance(obj, int) and hasattr(obj, "detach"):
            obj.detach()


# -- a spliced socket at run time ----------------------------------------------------------
# ``ep`` below is the registry's endpoint of a socket: ``fd``, ``sock`` (a non-blocking
# ``_socket.socket``), ``label``, and what the worker learned of it (``error``, ``outq``,
# ``sndbuf``, ``sndbuf_age``, ``space``, ``urgent``).

_SIOCOUTQ = 0x5411  # Linux: bytes in a socket's send queue (unsent + unacked)
_SIOCATMARK = 0x8905  # is the next byte to read at the TCP urgent mark?
_SNDBUF_REFRESH = 32  # passes between re-reads of the drain's SO_SNDBUF (TCP autotuning grows it)
_LOW_WATER_MAX = 64 * 1024  # below this much drain space (and less than wanted), wait for the drain
MSG_NOSIGNAL = getattr(socket, "MSG_NOSIGNAL", 0)
_LINGER_ZERO = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s


def reset_on_close(sock: socket.socket) -> None:
    """Make ``sock``'s last close send a RST, not a FIN that would pass for a complete
    transfer (SO_LINGER 0). A socket that has none to send (AF_UNIX, already reset) is left
    as it is."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    except OSError:
        pass
UNKNOWN_SPACE = 1 << 62  # the drain's free space, where it cannot be known
# Errnos that say a socket is already shut or failed, not why: a read or write after
# another one took the socket's error (reading clears it, as SO_ERROR does).
_AFTERMATH = frozenset((errno.ENOTCONN, errno.EPIPE))

try:
    import fcntl

    _ioctl: Any = fcntl.ioctl
except ImportError:  # pragma: no cover - not POSIX
    _ioctl = None


def socket_error(ep: Any, exc: OSError | None, side: str) -> OSError:
    """The error to report for a failed read or write on ``ep``, remembered on ``ep``.

    A socket's pending error is handed to the first call that meets it and then
    cleared, so the socket's other role (a relay's reverse direction) would see
    only ENOTCONN or EPIPE: the first error is kept on the endpoint and reported
    by every later failure on it.
    """
    code = exc.errno if exc is not None else 0
    if ep.error and (not code or code in _AFTERMATH):
        code = ep.error
    elif code and code not in _AFTERMATH and not ep.error:
        ep.error = code
    code = code or errno.EIO
    return OSError(code, f"{os.strerror(code)}: {side} {ep.label}")


def drain_failure(dst: Any) -> OSError | None:
    """The drain reported an error or hang-up: its error if it can no longer send, else None."""
    err = dst.error or dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        dst.error = err  # the socket's other role (a relay's source) must see it too
        return OSError(err, f"{os.strerror(err)}: drain {dst.label}")
    try:
        dst.sock.send(b"", MSG_NOSIGNAL)  # shut for writing (shutdown() by its owner)?
    except BlockingIOError:
        return None
    except OSError as exc:
        return socket_error(dst, exc, "drain")
    return None


def connect_failure(dst: Any) -> OSError | None:
    """A drain handed over while connecting: None once connected; its error if the connect
    failed; ``BlockingIOError`` (raised) while it is still in progress."""
    try:
        dst.sock.getpeername()
    except OSError:
        err = dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return OSError(err, f"{errno.errorcode.get(err, err)}: connect failed: drain {dst.label}")
        raise BlockingIOError(errno.EINPROGRESS, "connect in progress") from None
    dst.connecting = False
    return None


def send_queue(ep: Any, ioc: Any) -> int:
    """Bytes in ``ep``'s send queue (SIOCOUTQ: unsent + unacked), or -1 where it cannot be
    known (then never asked again for that socket). ``ioc``: a one-int ``array``."""
    if not ep.outq or ep.sock is None:
        return -1
    try:
        _ioctl(ep.fd, _SIOCOUTQ, ioc, True)
    except OSError:
        ep.outq = False
        return -1
    return ioc[0]


_SIZES: dict[int, int] = {}  # each SO_SNDBUF value seen: the one int object kept for it
_SIZES_MAX = 256  # values kept at most (autotuning makes more): past it, no new one is kept


def _shared(size: int) -> int:
    """``size`` as the int object already kept for that value. An idle connection's two
    drains each keep a send buffer size and a free space, mostly one of a few values (an
    idle drain's space is its whole buffer): shared, they are not 4 × 32 bytes per
    connection (1.1 MiB over 9000 idle connections)."""
    kept = _SIZES.get(size)
    if kept is None:
        if len(_SIZES) >= _SIZES_MAX:
            return size
        kept = _SIZES.setdefault(size, size)
    return kept


def drain_space(dst: Any, want: int, ioc: Any) -> tuple[int, int]:
    """(free bytes in the drain's send buffer, low-water mark): at least ``want`` if known.

    ``dst.space`` is what SIOCOUTQ said was free (``SO_SNDBUF`` less the send
    queue), less every byte pushed since: a lower bound, as the queue only
    shrinks by itself (ACKs). While it covers ``want``, no syscall is needed;
    small messages skip the ioctl for a whole send buffer's worth of bytes.
    """
    if not dst.outq:
        return (UNKNOWN_SPACE, 0)
    space = dst.space
    if space >= want:
        return (space, 0)
    age = dst.sndbuf_age
    if age >= _SNDBUF_REFRESH:
        dst.sndbuf = _shared(dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        age = 0
    queued = send_queue(dst, ioc)
    if queued < 0:  # not a socket type that reports it: rely on partial sends
        return (UNKNOWN_SPACE, 0)
    space = dst.sndbuf - queued if queued else dst.sndbuf  # an empty queue: the shared int
    low = dst.sndbuf >> 2
    if low > _LOW_WATER_MAX:
        low = _LOW_WATER_MAX
    if space < low and age:
        # Before calling the drain full, make sure we are not looking at a stale size.
        dst.sndbuf = _shared(dst.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF))
        age = 0
        space = dst.sndbuf - queued if queued else dst.sndbuf
    dst.sndbuf_age = age + 1
    dst.space = space
    return (space, low)


def at_mark(src: Any, ioc: Any) -> bool:
    """Is ``src``'s next byte at a TCP urgent mark? Clears the urgent hint when it is not."""
    try:
        _ioctl(src.fd, _SIOCATMARK, ioc, True)
    except OSError:  # not TCP
        src.urgent = False
        return False
    at = src.urgent = bool(ioc[0])
    return at
