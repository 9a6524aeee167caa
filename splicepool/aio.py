"""asyncio adapter: wait for a splice without blocking the event loop.

The core knows nothing about asyncio; this module turns its done callback
(which runs in a worker thread) into an ``asyncio.Future`` on the caller's loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .splice import EndReason, Splice


def _resolve(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():  # the awaiting task may have been cancelled
        fut.set_result(value)


async def wait_async(sp: Splice) -> EndReason:
    """Wait until ``sp`` has ended and return its reason; cancellable, never blocks the loop."""
    if sp.done():
        assert sp.reason is not None
        return sp.reason
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[EndReason] = loop.create_future()

    def on_done(done: Splice) -> None:  # worker thread
        try:
            loop.call_soon_threadsafe(_resolve, fut, done.reason)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass

    sp.add_done_callback(on_done)
    return await fut
