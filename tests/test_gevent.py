"""splicepool inside a gevent process: real worker threads, greenlets that yield.

Monkey-patching cannot be undone, so each case runs in its own interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import own_processes

pytest.importorskip("gevent")

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

PRELUDE = """
import hashlib, os, socket, sys, threading, time
sys.path.insert(0, {tests!r})
sys.path.insert(0, {root!r})
"""

SCENARIO = """
import gevent
import splicepool
from splicepool import EndReason
from conftest import Link

ticks = [0]
def ticker():
    while True:
        ticks[0] += 1
        gevent.sleep(0.005)  # a ticker's pace: ticks show the hub ran
ticker_g = gevent.spawn(ticker)

import gevent.monkey
patched = gevent.monkey.is_module_patched("socket")

def spawn(fn):
    # a greenlet when sockets cooperate; a real thread otherwise (blocking sockets)
    if patched:
        return gevent.spawn(fn)
    box = []
    t = threading.Thread(target=lambda: box.append(fn()))
    t.start()
    t.get = lambda timeout=None: (t.join(timeout), box[0])[1]
    return t

pool = splicepool.SplicePool(workers=2)
ln = Link()
data = os.urandom(16 << 20)  # more than the socket buffers hold: the reader must run

def feed():
    ln.peer_src.sendall(data)
    ln.peer_src.shutdown(socket.SHUT_WR)

def slow_read():
    got = bytearray()
    while len(got) < len(data):
        chunk = ln.peer_dst.recv(65536)
        if not chunk:
            break
        got += chunk
        time.sleep(0.001)  # a slow reader on purpose: the drain fills, waits must yield
    return bytes(got)

feeder = spawn(feed)
sp = pool.splice(ln.src, ln.dst)
reader = spawn(slow_read)
before = ticks[0]
reason = sp.wait(20)
during = ticks[0] - before
got = reader.get(timeout=20)
assert reason is EndReason.EOF, reason
assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()
assert sp.transferred == len(data)
assert during >= 5, f"the hub did not run while waiting: {during} ticks"

# unsplice from a greenlet yields too, and a raising done callback is only logged
ln2 = Link()
sp2 = pool.splice(ln2.src, ln2.dst)
sp2.add_done_callback(lambda s: 1 / 0)
sp2.unsplice()
assert sp2.wait(5) is EndReason.UNSPLICED
ticker_g.kill()
pool.close()
print("threads after close:", threading.active_count())
print("OK", during)
"""

pytestmark = own_processes


def _run(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    script = PRELUDE.format(tests=HERE, root=ROOT) + textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, cwd=ROOT
    )


def _assert_clean(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK" in proc.stdout, proc.stdout + proc.stderr
    assert "LoopExit" not in proc.stderr, proc.stderr
    # the only tracebacks allowed are the logged ones of the raising done callback
    assert proc.stderr.count("Traceback") == proc.stderr.count("raised (ignored)"), proc.stderr


def test_patch_all_before_importing_splicepool():
    proc = _run("from gevent import monkey\nmonkey.patch_all()\n" + SCENARIO)
    _assert_clean(proc)
    assert "ZeroDivisionError" in proc.stderr  # the raising callback was logged, by the hub


def test_patch_all_after_importing_splicepool():
    proc = _run("import splicepool\nfrom gevent import monkey\nmonkey.patch_all()\n" + SCENARIO)
    _assert_clean(proc)


def test_gevent_without_patching():
    proc = _run(SCENARIO)
    _assert_clean(proc)


def test_the_core_never_imports_gevent():
    code = """
    import builtins
    real_import = builtins.__import__
    def guard(name, *args, **kwargs):
        if name == "gevent" or name.startswith("gevent."):
            raise ImportError("gevent is not installed here")
        return real_import(name, *args, **kwargs)
    builtins.__import__ = guard
    import splicepool
    from conftest import Link
    with splicepool.SplicePool(workers=1) as pool:
        ln = Link()
        ln.peer_src.sendall(b"x" * 1000)
        ln.peer_src.shutdown(socket.SHUT_WR)
        sp = pool.splice(ln.src, ln.dst)
        assert sp.wait(5).name == "EOF" and sp.transferred == 1000
    assert "gevent" not in sys.modules
    print("OK")
    """
    _assert_clean(_run(code))


def test_a_greenlet_killed_inside_proxy_leaves_the_sockets_to_the_pool():
    """Killed while waiting for the workers, proxy() has already handed the sockets over."""
    code = """
    from gevent import monkey
    monkey.patch_all()
    import gevent
    import splicepool
    from conftest import passes, tcp_pair, until
    pool = splicepool.SplicePool(workers=1)
    client, a = tcp_pair()
    b, server = tcp_pair()
    g = gevent.spawn(pool.proxy, a, b)
    gevent.sleep(0)  # one turn: the greenlet runs into proxy() and waits there for the worker
    g.kill()
    assert a.fileno() == -1 and b.fileno() == -1, (a.fileno(), b.fileno())
    a.close()
    b.close()
    assert until(lambda: passes(pool) >= 2)  # the worker has taken up both directions
    x, y = tcp_pair()  # may reuse the numbers: the pool must never close these
    pool.close()
    x.sendall(b"ping")
    assert y.recv(4) == b"ping"
    print("OK")
    """
    _assert_clean(_run(code))
