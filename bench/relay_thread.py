"""A thread-per-connection TCP relay: the plain-Python baseline in bench/compare.py.

    python bench/relay_thread.py --listen 127.0.0.1:P --connect 127.0.0.1:S

The main thread accepts. Each connection gets a thread that connects upstream
and copies client → upstream, and a second thread that copies upstream →
client: ``recv_into`` a 256 KiB buffer, ``sendall``, TCP_NODELAY on both legs.
A direction that reads EOF forwards it with ``shutdown(SHUT_WR)``; a direction
that fails shuts both sockets down, which ends the other one too. The sockets
are closed once both directions are done.

9000 idle connections are 18000 threads, so stacks are 256 KiB, and a
direction maps its buffer (an anonymous mmap, not a zero-filled bytearray)
only once its first byte has arrived: an idle connection costs no buffer, and
no mapping (18000 stacks already take 36000 of the kernel's default limit of
65530 mappings per process, vm.max_map_count).
"""

from __future__ import annotations

import argparse
import mmap
import resource
import socket
import sys
import threading
import time

BUFFER = 256 * 1024
STACK = 256 * 1024


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def nodelay(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def copy(src: socket.socket, dst: socket.socket) -> None:
    """Copy until EOF (forwarded as a half-close) or an error (both sockets shut down)."""
    try:
        if src.recv(1, socket.MSG_PEEK):  # the buffer waits for the first byte
            with mmap.mmap(-1, BUFFER) as buf:
                pump(src, dst, buf)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def pump(src: socket.socket, dst: socket.socket, buf: mmap.mmap) -> None:
    """recv_into ``buf``, sendall, until EOF."""
    with memoryview(buf) as view:
        while n := src.recv_into(buf):
            dst.sendall(view[:n])


def relay(client: socket.socket, upstream_addr: tuple[str, int]) -> None:
    """One connection: this thread copies up, a second one copies down."""
    try:
        upstream = socket.create_connection(upstream_addr)
    except OSError:
        client.close()
        return
    with client, upstream:
        nodelay(client)
        nodelay(upstream)
        down = threading.Thread(target=copy, args=(upstream, client), daemon=True)
        try:
            down.start()
        except RuntimeError:  # no more threads
            return
        copy(client, upstream)
        down.join()


def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    listener = socket.create_server(listen, backlog=1024)
    while True:
        try:
            client, _ = listener.accept()
        except OSError as exc:  # EMFILE: back off and let connections finish
            print(f"relay_thread: accept: {exc}", file=sys.stderr)
            time.sleep(0.1)
            continue
        try:
            threading.Thread(target=relay, args=(client, upstream), daemon=True).start()
        except RuntimeError as exc:
            print(f"relay_thread: {exc}", file=sys.stderr)
            client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--connect", type=hostport, required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(STACK)
    try:
        serve(args.listen, args.connect)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
