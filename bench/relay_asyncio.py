"""An asyncio streams TCP relay: the event-loop baseline in bench/compare.py.

    python bench/relay_asyncio.py --listen 127.0.0.1:P --connect 127.0.0.1:S

The default event loop (no uvloop). Each accepted connection opens its
upstream and runs two copy tasks, ``await reader.read(256 KiB)`` then
``writer.write`` and ``await writer.drain()``, with TCP_NODELAY on both legs.
A direction that reads EOF forwards it with ``write_eof()`` (a half-close); a
direction that fails aborts both transports, which ends the other one too. The
connection is closed once both directions are done.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket

BUFFER = 256 * 1024


def hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def nodelay(writer: asyncio.StreamWriter) -> None:
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               both: tuple[asyncio.StreamWriter, asyncio.StreamWriter]) -> None:
    try:
        while data := await reader.read(BUFFER):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    except OSError:
        for w in both:
            w.transport.abort()


async def relay(upstream: tuple[str, int], client_reader: asyncio.StreamReader,
                client_writer: asyncio.StreamWriter) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.transport.abort()
        return
    nodelay(client_writer)
    nodelay(up_writer)
    both = (client_writer, up_writer)
    try:
        await asyncio.gather(copy(client_reader, up_writer, both), copy(up_reader, client_writer, both))
    finally:
        client_writer.close()
        up_writer.close()


async def serve(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    server = await asyncio.start_server(
        lambda r, w: relay(upstream, r, w), *listen, backlog=1024
    )
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", type=hostport, required=True, metavar="HOST:PORT")
    parser.add_argument("--connect", type=hostport, required=True, metavar="HOST:PORT")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        asyncio.run(serve(args.listen, args.connect))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
