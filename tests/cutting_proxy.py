"""A TCP proxy in front of a database server that can cut a connection right after a write.

It forwards bytes both ways on the test's own event loop. Armed with
:meth:`CuttingProxy.cut_after`, it forwards the next client chunk that
matches, lets the server work on it for a moment, then drops the server's
answer and aborts both sides: the server has done (and committed) what it
was asked while the client sees its connection reset, the case a client
must not take for "nothing happened".

Made :attr:`CuttingProxy.silent`, it is a network that drops every packet:
nothing gets through either way, new connections are taken and never
answered, and nobody is told (no reset, no refusal).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

Match = Callable[[bytes], bool]


class CuttingProxy:
    def __init__(self, target_port: int, *, linger: float = 0.3) -> None:
        self.target_port = target_port
        self.linger = linger
        self.port = 0
        self.cuts = 0
        #: forward nothing, answer nothing, refuse nothing
        self.silent = False
        #: client chunks dropped while silent: a client is waiting for an answer
        self.swallowed = 0
        self._arm: list[Match] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> CuttingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    def url(self, url: str) -> str:
        """``url`` (of the target server) pointed at the proxy instead."""
        return url.replace(f":{self.target_port}/", f":{self.port}/")

    def cut_after(self, *steps: Match) -> None:
        """Cut the connection after the client chunk matching the last of ``steps``, each
        step looked for in the chunks after the one matching the step before it."""
        self._arm = list(steps)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.silent:
            task = asyncio.current_task()
            assert task is not None
            self._tasks.add(task)  # type: ignore[arg-type]
            try:
                while await client_r.read(65536):
                    self.swallowed += 1
            finally:
                self._tasks.discard(task)  # type: ignore[arg-type]
                client_w.transport.abort()
            return
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        state = {"cut": False}

        async def upstream() -> None:
            while data := await client_r.read(65536):
                if self.silent:
                    self.swallowed += 1
                    continue
                server_w.write(data)
                await server_w.drain()
                if self._arm and self._arm[0](data):
                    self._arm.pop(0)
                    if not self._arm:
                        state["cut"] = True  # the server's answer to this never arrives
                        self.cuts += 1
                        await asyncio.sleep(self.linger)
                        client_w.transport.abort()
                        server_w.transport.abort()
                        return
            server_w.close()  # the client hung up: so does the proxy, towards the server

        async def downstream() -> None:
            while data := await server_r.read(65536):
                if state["cut"] or self.silent:
                    continue
                client_w.write(data)
                await client_w.drain()
            client_w.close()  # and the other way round

        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        try:
            await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            client_w.transport.abort()
            server_w.transport.abort()
