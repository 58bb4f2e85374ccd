"""A hand-rolled control-protocol client, to send what RemoteEngine never would."""

from __future__ import annotations

import asyncio
import json
from typing import Any, cast

from taskwatch.engine import ControlServer, Engine
from taskwatch.engine.wire import PROTOCOL_VERSION

#: generous read limit: a test may want to see a line the server should never send
READ_LIMIT = 64 << 20


async def serve(engine: Engine, address: str, **options: Any) -> ControlServer:
    return await engine.serve(address, announce=False, **options)


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, address: str) -> RawClient:
        if address.startswith("tcp://"):
            host, port = address[len("tcp://"):].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port), limit=READ_LIMIT)
        else:
            reader, writer = await asyncio.open_unix_connection(address, limit=READ_LIMIT)
        return cls(reader, writer)

    @classmethod
    async def authenticated(cls, address: str, token: str | None = None) -> RawClient:
        client = await cls.open(address)
        await client.send({"type": "hello", "version": PROTOCOL_VERSION, "token": token})
        assert (await client.recv())["type"] == "welcome"
        assert (await client.recv())["type"] == "snapshot"
        return client

    def reading(self, on: bool) -> None:
        """Stop (or resume) reading: what the server sends piles up in the socket, then in the server."""
        transport = cast(asyncio.Transport, self.writer.transport)
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    async def send(self, message: dict[str, Any] | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.writer.write(data)
        await self.writer.drain()

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            line = await self.reader.readline()
        assert line, "the server closed the connection"
        return cast(dict[str, Any], json.loads(line))

    async def reply(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next ok/error message, skipping streamed events."""
        while True:
            msg = await self.recv(timeout)
            if msg["type"] != "event":
                return msg

    async def at_eof(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            while await self.reader.readline():
                pass
        return True

    async def closed_by_server(self, timeout: float = 5.0) -> bool:
        """Read until the server's end of the stream (a reset counts too)."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(256 << 10):
                    pass
        except ConnectionError:
            pass
        return True

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


def flood(address: str, held: int = 200) -> None:
    """Connect as fast as possible and never send a byte, keeping the newest ``held`` sockets open.

    What a local user without the token can do to a control endpoint. Runs until
    killed: ``python -m tests.raw_client flood ADDRESS``; it prints ``ready`` once
    its first ``held`` connections are made.
    """
    import collections
    import socket

    if address.startswith("tcp://"):
        host, port = address[len("tcp://"):].rsplit(":", 1)
        family, target = socket.AF_INET, (host, int(port))
    else:
        family, target = socket.AF_UNIX, address
    open_: collections.deque[socket.socket] = collections.deque()
    told = False
    while True:
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(target)
        except BlockingIOError:
            pass  # a TCP connect in progress, or a Unix listener's full queue: either way, next
        except OSError:
            sock.close()
            continue
        open_.append(sock)
        if len(open_) > held:
            open_.popleft().close()
            if not told:
                print("ready", flush=True)
                told = True


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["flood"]:
        flood(sys.argv[2], *(int(arg) for arg in sys.argv[3:4]))
