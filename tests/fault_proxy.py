"""A fault-injecting TCP proxy for HTTP on loopback, run as its own process in front of a real server (the moto
S3 server): the first ``--faults`` connections that send a request get a fault, every later one is forwarded
byte for byte. Clients reach it through the standard ``AWS_ENDPOINT_URL``, so the faults are real network
faults to them — nothing in the client is patched.

Faults (``--mode``):

- ``reset``: the request is read, then the connection is closed with a TCP RST (``SO_LINGER`` 0) — the client
  sees a connection reset / server disconnect with no answer;
- ``slowdown``: the request is read and answered ``503 SlowDown`` with S3's XML error body, then closed.

``--faults -1`` faults every connection (a store that stays down). With ``--trigger FILE`` nothing is faulted
until FILE exists; when it appears, the connections being forwarded are cut (reset) too, so a client's
kept-alive connections cannot outlive the outage (logged as one ``cut N live connections`` line). Each fault served is one line appended to
``--log`` (``<n> <mode> <request line>``), so a test can compare what the client counted with what it got.
A connection that sends nothing (a readiness probe) is closed without counting.

Usage: ``python tests/fault_proxy.py --port P --target 127.0.0.1:T --mode reset --faults 3 --log FILE``
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import struct

SLOWDOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?>\n<Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    def __init__(self, target: tuple[str, int], mode: str, faults: int, log: str, trigger: str = "") -> None:
        self.target = target
        self.mode = mode
        self.left = faults
        self.log = log
        self.served = 0
        self.trigger = trigger
        self.armed = not trigger
        self.live: set[asyncio.StreamWriter] = set()

    async def watch_trigger(self) -> None:
        """Arm the faults once the trigger file exists, cutting every connection being forwarded."""
        while not os.path.exists(self.trigger):
            await asyncio.sleep(0.05)
        self.armed = True
        for writer in list(self.live):
            writer.transport.abort()
        with open(self.log, "a", encoding="utf-8") as out:
            out.write(f"cut {len(self.live)} live connections\n")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        if self.armed and self.left != 0:
            self.left -= 1 if self.left > 0 else 0
            await self.fault(head, reader, writer)
            return
        await self.forward(head, reader, writer)

    async def fault(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.served += 1
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        with open(self.log, "a", encoding="utf-8") as out:
            out.write(f"{self.served} {self.mode} {request_line}\n")
        if self.mode == "slowdown":
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if length:
                await reader.readexactly(length)
            body = b"" if head.startswith(b"HEAD ") else SLOWDOWN  # a HEAD answer has headers only
            writer.write(
                b"HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nConnection: close\r\n"
                + f"Content-Length: {len(body)}\r\n\r\n".encode()
                + body
            )
            await writer.drain()
            writer.close()
            return
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close → RST
        writer.transport.abort()

    async def forward(self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        up_writer.write(head)
        self.live.add(writer)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(1 << 16):
                    dst.write(data)
                    await dst.drain()
            except ConnectionError:
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self.live.discard(writer)


async def serve(args: argparse.Namespace) -> None:
    host, port = args.target.rsplit(":", 1)
    proxy = FaultProxy((host, int(port)), args.mode, args.faults, args.log, args.trigger)
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", args.port)
    watcher = asyncio.create_task(proxy.watch_trigger()) if args.trigger else None  # noqa: F841 - kept alive
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--target", required=True, help="HOST:PORT of the real server")
    parser.add_argument("--mode", choices=("reset", "slowdown"), required=True)
    parser.add_argument("--faults", type=int, required=True, help="connections to fault (-1: all)")
    parser.add_argument("--log", required=True, help="file to append one line per fault served to")
    parser.add_argument("--trigger", default="", help="fault only once this file exists")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
