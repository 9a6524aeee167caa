"""asyncio adapter: wait for a splice or a relay without blocking the event loop.

``await splice`` and ``await proxy`` do the same (the handles import asyncio
lazily, only when awaited): the done callback, which runs in a worker
thread, resolves an ``asyncio.Future`` on the caller's loop.
"""

from __future__ import annotations

from typing import Any

from .state import EndReason, Waitable


async def wait_async(handle: Any) -> EndReason:
    """Wait until ``handle`` (a Splice or a Proxy) has ended and return its reason;
    cancellable, never blocks the loop."""
    if not isinstance(handle, Waitable):
        raise TypeError(f"wait_async() takes a Splice or a Proxy, not {type(handle).__name__}")
    return await handle


__all__ = ["wait_async"]
