"""The floor of a Python HTTP/1.1 keep-alive relay: what one interpreter's loop costs per
request when it does nothing else (issue 15's small-request figures).

    python bench/http_floor.py --listen HOST:PORT --connect HOST:PORT

Not a proxy to use: one thread, epoll, one upstream connection per client connection,
blocking ``sendall`` writes, heads found by their blank line and bodies framed by
Content-Length only (no chunked, no validation, no rewriting, no X-Forwarded-For, no
timeouts). It answers "how much of a request's CPU is the Python loop itself", the part no
parser or session logic can remove: ``bench/http_bench.py --workloads small
--splicepool-cmd "PYTHON bench/http_floor.py" --splicepool-args ""`` measures it in
``splicepool http``'s place.
"""

from __future__ import annotations

import argparse
import select
import socket


def _addr(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


def _body_length(head: bytes) -> int:
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : end])


class _Side:
    """One direction: what came from ``src`` and is not yet a whole message."""

    __slots__ = ("src", "dst", "buf", "left")

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.buf = b""
        self.left = 0  # body bytes still to pass through as they come


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", required=True, type=_addr)
    ap.add_argument("--connect", required=True, type=_addr)
    args = ap.parse_args()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(args.listen)
    listener.listen(1024)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    sides: dict[int, _Side] = {}
    while True:
        for fd, _ in ep.poll():
            if fd == listener.fileno():
                client, _ = listener.accept()
                up = socket.create_connection(args.connect)
                for sock in (client, up):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ep.register(sock.fileno(), select.EPOLLIN)
                sides[client.fileno()] = _Side(client, up)
                sides[up.fileno()] = _Side(up, client)
                continue
            side = sides[fd]
            data = side.src.recv(262144)
            if not data:
                for sock in (side.src, side.dst):
                    ep.unregister(sock.fileno())
                    del sides[sock.fileno()]
                    sock.close()
                continue
            out = []
            if side.left:  # the rest of a body: through as it comes
                n = min(side.left, len(data))
                out.append(data[:n])
                side.left -= n
                data = data[n:]
            buf = side.buf + data
            while buf:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    break
                whole = end + 4 + _body_length(buf[: end + 4])
                if len(buf) < whole:  # a head and part of its body: pass what is here
                    side.left = whole - len(buf)
                    out.append(buf)
                    buf = b""
                    break
                out.append(buf[:whole])
                buf = buf[whole:]
            side.buf = buf
            if out:
                side.dst.sendall(b"".join(out))


if __name__ == "__main__":
    main()
