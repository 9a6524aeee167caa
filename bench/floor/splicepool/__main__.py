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
import argparse, errno, os, select, socket, sys
p = argparse.ArgumentParser()
p.add_argument("cmd"); p.add_argument("--listen"); p.add_argument("--connect")
a, _ = p.parse_known_args()
lh, lp = a.listen.rsplit(":", 1); ch, cp = a.connect.rsplit(":", 1)
up = (ch, int(cp))
L = socket.socket(); L.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
L.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
L.bind((lh, int(lp))); L.listen(1024); L.setblocking(False)
ep = select.epoll()
ET = select.EPOLLIN | select.EPOLLOUT | select.EPOLLRDHUP | select.EPOLLET
ep.register(L.fileno(), select.EPOLLIN)
peer = {}   # fd -> (sock, other sock)
pend = {}   # fd -> bytes pending to write to this fd
buf = bytearray(65536); mv = memoryview(buf)
eof = {}
def close_pair(fd):
    s, o = peer.pop(fd, (None, None))
    if s is None: return
    peer.pop(o.fileno(), None)
    s.close(); o.close()
def pump(src):
    s, d = peer[src]
    while True:
        if pend.get(d.fileno()):
            return
        try:
            n = s.recv_into(buf)
        except BlockingIOError:
            return
        except OSError:
            close_pair(src); return
        if n == 0:
            eof[src] = True
            if eof.get(d.fileno()):
                close_pair(src); return
            try: d.shutdown(socket.SHUT_WR)
            except OSError: close_pair(src)
            return
        try:
            m = d.send(mv[:n])
        except BlockingIOError:
            m = 0
        except OSError:
            close_pair(src); return
        if m < n:
            pend[d.fileno()] = bytes(mv[m:n]); return
while True:
    for fd, ev in ep.poll():
        if fd == L.fileno():
            while True:
                try:
                    c, _ = L.accept()
                except BlockingIOError:
                    break
                c.setblocking(False)
                u = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
                u.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                u.connect_ex(up)
                peer[c.fileno()] = (c, u); peer[u.fileno()] = (u, c)
                ep.register(c.fileno(), ET); ep.register(u.fileno(), ET)
            continue
        if fd not in peer: continue
        if ev & select.EPOLLOUT and pend.get(fd):
            s = peer[fd][0]
            data = pend.pop(fd)
            try:
                m = s.send(data)
            except BlockingIOError:
                m = 0
            except OSError:
                close_pair(fd); continue
            if m < len(data):
                pend[fd] = data[m:]; continue
            pump(peer[fd][1].fileno())
            if fd not in peer: continue
        if ev & (select.EPOLLIN | select.EPOLLRDHUP | select.EPOLLHUP | select.EPOLLERR):
            pump(fd)
