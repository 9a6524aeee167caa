"""splicepool: splice TCP sockets like FreeBSD's SO_SPLICE, with a pool of worker threads.

A splice joins a source socket to a drain socket: whatever arrives in the
source is moved into the drain by a worker thread, zero-copy on Linux
(``os.splice``), without the application reading or writing it.

    import splicepool
    sp = splicepool.splice(src, dst)      # on the default pool
    sp.wait()                             # -> EndReason.EOF, MAX, IDLE, ...
"""

from __future__ import annotations

from . import gevent as _gevent  # noqa: F401  # installs its hooks; never imports gevent itself
from .pool import SplicePool, default_pool
from .relay import Proxy, peer_gone
from .splice import EndReason, Splice, SpliceState

TYPE_CHECKING = False  # typing is for type checkers: a proxy process is 0.6 MiB lighter without it
if TYPE_CHECKING:
    from typing import Any

__all__ = [
    "EndReason",
    "Proxy",
    "Splice",
    "SplicePool",
    "SpliceState",
    "default_pool",
    "peer_gone",
    "proxy",
    "splice",
    "transferred",
    "unsplice",
]

__version__ = "0.1.0"

def splice(src: Any, dst: Any, max: int = 0, idle: float | None = None, close: bool = False) -> Splice:
    """``default_pool().splice(...)``: see ``SplicePool.splice``."""
    return default_pool().splice(src, dst, max=max, idle=idle, close=close)


def unsplice(src: Any) -> Splice:
    """``default_pool().unsplice(src)``: see ``SplicePool.unsplice``."""
    return default_pool().unsplice(src)


def transferred(src: Any) -> int:
    """``default_pool().transferred(src)``: bytes moved by ``src``'s most recent splice."""
    pool = default_pool(create=False)
    return 0 if pool is None else pool.transferred(src)


def proxy(
    a: Any,
    b: Any,
    *,
    pool: SplicePool | None = None,
    idle: float | None = None,
    half_close: bool = True,
    wait: bool = True,
) -> Proxy:
    """Relay ``a`` ⇄ ``b`` on ``pool`` (default: the default pool); see ``SplicePool.proxy``."""
    return (pool or default_pool()).proxy(a, b, idle=idle, half_close=half_close, wait=wait)
