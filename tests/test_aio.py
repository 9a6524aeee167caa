"""splicepool.aio: ``await sp`` and ``await proxy`` from an asyncio loop, never blocking it."""

from __future__ import annotations

import asyncio
import socket

from conftest import Link, recv_exact, thread_backend_only

from splicepool import EndReason, SplicePool

# asyncio runs in the thread run; the gevent runs patch the process for gevent instead.
pytestmark = thread_backend_only


def test_await_a_splice_returns_its_reason_without_blocking_the_loop():
    link = Link()
    pool = SplicePool(workers=1)
    try:
        sp = pool.splice(link.src, link.dst)

        async def main() -> tuple[EndReason, int]:
            ticks = 0

            async def tick() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)  # a ticker's pace: ticks show the loop ran

            def send() -> None:
                link.peer_src.sendall(b"through the splice")
                link.peer_src.shutdown(socket.SHUT_WR)

            ticker = asyncio.ensure_future(tick())
            # The bytes go once the loop runs again, so the splice is still live when awaited
            # (an ended one would return at once, and the loop would not have to run at all).
            asyncio.get_running_loop().call_soon(send)
            reason = await sp
            ticker.cancel()
            return reason, ticks

        reason, ticks = asyncio.run(main())
        assert reason is EndReason.EOF
        assert ticks >= 1  # the loop ran while the splice was awaited
        assert recv_exact(link.peer_dst, 18) == b"through the splice"
    finally:
        pool.close()
        link.close()


def test_a_cancelled_await_leaves_the_splice_running_and_a_closed_loop_is_never_called():
    """Cancelling ``await sp`` does not end the splice; a splice that ends after its loop
    was closed must not disturb the worker (the loop is never called)."""
    link = Link()
    pool = SplicePool(workers=1)
    try:
        sp = pool.splice(link.src, link.dst)

        async def waiter(awaiting: asyncio.Event) -> EndReason:
            awaiting.set()  # then straight into ``await sp``: nothing yields before it waits
            return await sp

        async def cancelled() -> bool:
            awaiting = asyncio.Event()
            task = asyncio.ensure_future(waiter(awaiting))
            await awaiting.wait()  # the task now waits in ``await sp``
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                return True
            return False

        assert asyncio.run(cancelled())
        assert not sp.done()  # cancelling the waiter does not end the splice

        loop = asyncio.new_event_loop()
        awaiting = asyncio.Event()  # bound to the loop that first waits on it (3.10+)
        task = loop.create_task(waiter(awaiting))
        loop.run_until_complete(awaiting.wait())  # the task waits in ``await sp``
        task.cancel()
        loop.run_until_complete(asyncio.gather(task, return_exceptions=True))
        loop.close()  # the splice ends after its loop is gone: the worker must not mind
        sp.unsplice()
        assert sp.wait(5) is EndReason.UNSPLICED
        link.peer_src.sendall(b"still served")
        sp2 = pool.splice(link.src, link.dst)
        assert recv_exact(link.peer_dst, 12) == b"still served"
        sp2.unsplice()
        assert sp2.wait(5) is EndReason.UNSPLICED
    finally:
        pool.close()
        link.close()
