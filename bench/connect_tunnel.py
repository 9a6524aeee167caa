"""One big download through an HTTP CONNECT tunnel on gevent.pywsgi: splice vs. a gevent copy relay.

    python bench/connect_tunnel.py [--mib 1024] [--relay splice|copy] [--runs 1]

``splice`` runs ``examples/gevent_connect_proxy.py`` (the tunnel is handed to
splicepool). ``copy`` runs the same pywsgi CONNECT handling in this script
(``--serve-copy``) but relays with two greenlets doing ``recv(65536)`` /
``sendall``, the usual pure-gevent tunnel. The upstream (a forked child
sending 1 MiB buffers) and the client (``recv_into`` a 1 MiB buffer) are
outside the proxy process. Prints MiB/s seen by the client and the CPU
seconds (utime + stime, all threads) the proxy process spent during the
transfer, from /proc/PID/stat.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def serve_copy(listen_port: int) -> None:
    """The pure-gevent relay: pywsgi CONNECT, then two greenlets copying 64 KiB at a time."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    from gevent.pywsgi import WSGIServer

    sys.path.insert(0, ROOT)
    from splicepool.wsgi import ESTABLISHED, parse_authority, take_over

    def pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def app(environ, start_response):
        host, port = parse_authority(environ["PATH_INFO"])
        upstream = socket.create_connection((host, port))
        client, early = take_over(environ)
        client.sendall(ESTABLISHED)
        if early:
            upstream.sendall(early)
        gevent.joinall([gevent.spawn(pump, client, upstream), gevent.spawn(pump, upstream, client)])
        client.close()
        upstream.close()
        return []

    server = WSGIServer(("127.0.0.1", listen_port), app, log=None)
    server.start()
    print(f"listening on 127.0.0.1:{server.address[1]}", file=sys.stderr, flush=True)
    gevent.signal_handler(signal.SIGTERM, server.stop)
    server.serve_forever()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def start_proxy(relay: str) -> tuple[subprocess.Popen, int]:
    if relay != "copy":
        backend = {"splice": "thread"}.get(relay, relay)
        argv = [sys.executable, os.path.join(ROOT, "examples", "gevent_connect_proxy.py"),
                "--listen", "127.0.0.1:0", "--workers", "2", "--backend", backend]
    else:
        argv = [sys.executable, os.path.abspath(__file__), "--serve-copy"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert proc.stderr is not None
    for line in proc.stderr:
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
        if m:
            return proc, int(m.group(1))
    raise RuntimeError(f"{argv} did not start")


def upstream(mib: int) -> tuple[int, int]:
    """Fork a child that accepts one connection and sends ``mib`` MiB; return (pid, port)."""
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        try:
            conn, _ = lsock.accept()
            buf = b"\x5a" * (1 << 20)
            for _ in range(mib):
                conn.sendall(buf)
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)
        finally:
            os._exit(0)
    lsock.close()
    return pid, port


def run(relay: str, mib: int) -> tuple[float, float]:
    proc, port = start_proxy(relay)
    try:
        up_pid, up_port = upstream(mib)
        sock = socket.create_connection(("127.0.0.1", port))
        sock.sendall(f"CONNECT 127.0.0.1:{up_port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(1)
        assert head.startswith(b"HTTP/1.1 200"), head
        cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
        buf = bytearray(1 << 20)
        total = 0
        while True:
            n = sock.recv_into(buf)
            if not n:
                break
            total += n
        elapsed, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
        sock.close()
        os.waitpid(up_pid, 0)
        assert total == mib << 20, total
        return (mib / elapsed, cpu)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=1024)
    parser.add_argument("--relay", choices=["splice", "gevent", "gevent-direct", "copy"], action="append")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--serve-copy", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_copy:
        serve_copy(0)
        return
    for i in range(args.runs):
        for relay in args.relay or ["splice", "gevent", "gevent-direct", "copy"]:
            rate, cpu = run(relay, args.mib)
            print(f"run {i + 1} {relay:6s} {args.mib} MiB: {rate:7.0f} MiB/s, proxy CPU {cpu:5.2f} s "
                  f"({cpu / (args.mib / 1024):.2f} s/GiB)", flush=True)


if __name__ == "__main__":
    main()
