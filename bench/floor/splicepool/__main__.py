"""The floor for a Python relay on short connections: not splicepool, a bare stand-in.

One thread, one edge-triggered epoll: accept, connect the upstream (non-blocking, TCP_NODELAY),
then copy with ``recv_into`` / ``send`` both ways; a FIN is passed on with ``shutdown``, the
pair closed when both directions ended. No checks, no limits, no timers, no log, no counters.
It is here to be measured in splicepool's place, with the options that run another checkout:

    python bench/compare.py --peers splicepool,go --tree floor=bench/floor --workloads rate,conns
    python bench/conn_cost.py cpu --tree bench/floor

What it makes in those workloads is about the most any Python relay can on this machine;
docs/performance.md compares it with splicepool and the anchors.
"""
import argparse
import select
import socket

IN_OUT_ET = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
READ_EVENTS = select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR

parser = argparse.ArgumentParser()
parser.add_argument("cmd")  # "proxy", as splicepool's command line has it
parser.add_argument("--listen", required=True)
parser.add_argument("--connect", required=True)
args, _ = parser.parse_known_args()
listen_host, listen_port = args.listen.rsplit(":", 1)
up_host, up_port = args.connect.rsplit(":", 1)
upstream = (up_host, int(up_port))

listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # inherited by accepted sockets
listener.bind((listen_host, int(listen_port)))
listener.listen(1024)
listener.setblocking(False)
ep = select.epoll()
ep.register(listener.fileno(), select.EPOLLIN)

peer: dict[int, tuple[socket.socket, socket.socket]] = {}  # fd -> (its socket, the other one)
pending: dict[int, bytes] = {}  # fd -> bytes still to send to it
ended: set[int] = set()  # fds whose reading side has seen EOF
buf = bytearray(65536)
view = memoryview(buf)


def close_pair(fd: int) -> None:
    s, other = peer.pop(fd, (None, None))
    if s is None:
        return
    for f in (fd, other.fileno()):
        peer.pop(f, None)
        pending.pop(f, None)
        ended.discard(f)
    s.close()
    other.close()


def pump(src: int) -> None:
    """Copy from ``src`` to its peer until ``src`` is empty or the peer is full."""
    s, d = peer[src]
    dst = d.fileno()
    while not pending.get(dst):
        try:
            n = s.recv_into(buf)
        except BlockingIOError:
            return
        except OSError:
            close_pair(src)
            return
        if n == 0:
            ended.add(src)
            if dst in ended:
                close_pair(src)
                return
            try:
                d.shutdown(socket.SHUT_WR)
            except OSError:
                close_pair(src)
            return
        try:
            m = d.send(view[:n])
        except BlockingIOError:
            m = 0
        except OSError:
            close_pair(src)
            return
        if m < n:
            pending[dst] = bytes(view[m:n])
            return


def accept_all() -> None:
    while True:
        try:
            client, _ = listener.accept()
        except BlockingIOError:
            return
        client.setblocking(False)
        up = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        up.connect_ex(upstream)
        peer[client.fileno()] = (client, up)
        peer[up.fileno()] = (up, client)
        ep.register(client.fileno(), IN_OUT_ET)
        ep.register(up.fileno(), IN_OUT_ET)


def writable(fd: int) -> bool:
    """Send what waits for ``fd``; True when all of it went (and its source was pumped)."""
    s = peer[fd][0]
    data = pending.pop(fd)
    try:
        m = s.send(data)
    except BlockingIOError:
        m = 0
    except OSError:
        close_pair(fd)
        return False
    if m < len(data):
        pending[fd] = data[m:]
        return False
    pump(peer[fd][1].fileno())
    return fd in peer


while True:
    for fd, events in ep.poll():
        if fd == listener.fileno():
            accept_all()
            continue
        if fd not in peer:
            continue
        if events & select.EPOLLOUT and pending.get(fd) and not writable(fd):
            continue
        if events & READ_EVENTS:
            pump(fd)
