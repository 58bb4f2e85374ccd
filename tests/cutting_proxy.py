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

Made to :meth:`CuttingProxy.refuse`, it is a server gone away: every connection is
reset, and new ones are reset as they come, until :meth:`CuttingProxy.accept`.

A :class:`StallingProxy` holds every packet instead, and lets them go: what
it held then arrives, as with a router that came back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Self

Match = Callable[[bytes], bool]


class _Proxy:
    """A listener on a free loopback port forwarding to ``target_port``; connections are
    handled by :meth:`_handle`, each a task of the proxy's own, cancelled when it closes."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Self:
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

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class CuttingProxy(_Proxy):
    def __init__(self, target_port: int, *, linger: float = 0.3) -> None:
        super().__init__(target_port)
        self.linger = linger
        self.cuts = 0
        #: forward nothing, answer nothing, refuse nothing
        self.silent = False
        #: client chunks dropped while silent: a client is waiting for an answer
        self.swallowed = 0
        self._arm: list[Match] = []
        self._refuse_at_cut = False
        self._refusing = False

    def refuse(self) -> None:
        """Reset every connection, and each new one, until :meth:`accept`."""
        self._refusing = True
        for task in list(self._tasks):
            task.cancel()  # its connection is aborted on the way out

    def accept(self) -> None:
        self._refusing = False

    def cut_after(self, *steps: Match, then_refuse: bool = False) -> None:
        """Cut the connection after the client chunk matching the last of ``steps``, each
        step looked for in the chunks after the one matching the step before it;
        ``then_refuse``: and refuse every connection from then on, until :meth:`accept`."""
        self._arm = list(steps)
        self._refuse_at_cut = then_refuse

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self._refusing:
            client_w.transport.abort()
            return
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
                        if self._refuse_at_cut:
                            self._refusing = True  # before the client can try again
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


class StallingProxy(_Proxy):
    """A TCP proxy to a database server that can hold every packet (both ways) and let them go.

    Held, it is a network that delivers nothing and refuses nothing; let go, what it held
    arrives, as with a router that came back (or a proxy process resumed after SIGSTOP).
    """

    def __init__(self, target_port: int) -> None:
        super().__init__(target_port)
        self._flowing = asyncio.Event()
        self._flowing.set()
        #: what the server sends flows (held alone, the client's packets still reach the server)
        self._answering = asyncio.Event()
        self._answering.set()

    async def __aexit__(self, *exc: object) -> None:
        self.release()
        await super().__aexit__(*exc)

    def hold(self, *, answers_only: bool = False) -> None:
        """Hold every packet; ``answers_only``: only the server's (a client that stopped reading)."""
        self._answering.clear()
        if not answers_only:
            self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()
        self._answering.set()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)  # type: ignore[arg-type]
        server_w: asyncio.StreamWriter | None = None
        try:
            await self._flowing.wait()
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)

            async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, flowing: asyncio.Event) -> None:
                while data := await src.read(65536):
                    await flowing.wait()
                    dst.write(data)
                    await dst.drain()
                dst.close()

            await asyncio.gather(
                pipe(client_r, server_w, self._flowing), pipe(server_r, client_w, self._answering), return_exceptions=True
            )
        finally:
            self._tasks.discard(task)  # type: ignore[arg-type]
            client_w.transport.abort()
            if server_w is not None:
                server_w.transport.abort()
