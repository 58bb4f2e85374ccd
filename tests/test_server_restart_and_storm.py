"""A control endpoint across engine restarts, and bursts of clients over a Unix socket.

A ``ControlServer`` started again after its engine was restarted is stopped by that
engine's next stop, like one ``engine.serve()`` made; more clients than
``max_handshakes`` connecting at once over a Unix socket all get in, whether their
hellos are already there when the server accepts them or still on their way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from taskwatch.engine import ControlServer, Engine, EngineNotRunning, EngineUnreachable, RemoteEngine
from taskwatch.engine.wire import PROTOCOL_VERSION

from .helpers import eventually, stray_tasks

HELLO = json.dumps({"type": "hello", "version": PROTOCOL_VERSION}).encode() + b"\n"


def build_engine() -> Engine:
    engine = Engine(health_interval=None)

    @engine.task
    async def quick(ctx: Any) -> int:
        return 1

    return engine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = build_engine()
    yield engine
    if engine.state in ("running", "stopping"):
        await engine.stop()
    # the engine's stop stopped every server: no connection task may outlive it
    assert stray_tasks() == set()


async def test_a_server_started_again_after_an_engine_restart_stops_with_the_engine(
    engine: Engine, sock_path: str
) -> None:
    await engine.start()
    server = await engine.serve(sock_path, announce=False)
    await engine.stop()
    await engine.start()
    await server.start()  # "a stopped ControlServer serves again on start()"
    async with RemoteEngine(sock_path, timeout=5) as remote:
        assert (await remote.submit("quick")).task == "quick"

    await engine.stop()
    # nothing listens there any more: a dashboard is told no engine is there
    assert not os.path.exists(sock_path)
    with pytest.raises(EngineUnreachable):
        await RemoteEngine(sock_path, timeout=2).connect()
    # and the address is free for the engine's next endpoint
    await engine.start()
    again = await engine.serve(sock_path, announce=False)
    async with RemoteEngine(again.address, timeout=5) as remote:
        assert await remote.ping() >= 0
    await engine.stop()
    assert not os.path.exists(sock_path)


async def test_a_server_started_by_itself_stops_with_the_engine_after_a_stop_and_start_of_its_own(
    engine: Engine, sock_path: str
) -> None:
    await engine.start()
    own = ControlServer(engine, sock_path, announce=False)
    await own.start()
    async with RemoteEngine(sock_path, timeout=5) as remote:
        assert await remote.ping() >= 0
    await own.stop()
    await own.start()  # still on the same running engine: served again, and stopped with it
    await engine.stop()
    assert not os.path.exists(sock_path)
    with pytest.raises(EngineUnreachable):
        await RemoteEngine(sock_path, timeout=2).connect()


async def test_a_server_cannot_start_on_an_engine_that_is_not_running(engine: Engine, sock_path: str) -> None:
    # it would serve a stopped engine and keep its address, with nothing to stop it
    server = ControlServer(engine, sock_path, announce=False)
    with pytest.raises(EngineNotRunning):
        await server.start()
    assert not os.path.exists(sock_path)
    await engine.start()
    served = await engine.serve(sock_path, announce=False)
    await engine.stop()
    with pytest.raises(EngineNotRunning):
        await served.start()
    assert not os.path.exists(sock_path)
    with pytest.raises(EngineUnreachable):
        await RemoteEngine(sock_path, timeout=2).connect()


async def test_more_clients_than_the_handshake_pool_connecting_at_once_over_a_unix_socket_all_get_in(
    engine: Engine, sock_path: str
) -> None:
    # over a Unix socket a connect() returns before its hello is written: the server took the
    # oldest sockets of a burst for idle ones and closed them while their hellos were on the way
    # (the dashboards then said no engine was there). The clients connect from a loop of their
    # own, as they would from other processes: the engine's loop does not wait for their hellos
    await engine.start()
    server = await engine.serve(sock_path, announce=False, max_connections=200)

    async def burst() -> list[str]:
        remotes = [RemoteEngine(sock_path, timeout=10) for _ in range(80)]
        try:
            results = await asyncio.gather(*(remote.connect() for remote in remotes), return_exceptions=True)
            return [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
        finally:
            for remote in remotes:
                await remote.close()

    failures = await asyncio.to_thread(asyncio.run, burst())
    assert failures == []
    stats = server.stats()
    assert (stats["connections"], stats["handshakes_evicted"], stats["refused"]) == (80, 0, 0)


def connected(path: str) -> socket.socket:
    """A client socket connected to ``path``: over a Unix socket connect() returns once the
    connection is queued, before the server has accepted it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock


async def first_line(sock: socket.socket) -> str:
    """The type of the first message the server sends on ``sock`` (its error_type for an
    error), or what came instead."""
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        line = await asyncio.wait_for(reader.readline(), 10)
    except TimeoutError:
        return "nothing within 10 s"
    except ConnectionError:
        return "closed"
    finally:
        writer.close()
    if not line:
        return "closed"
    message = json.loads(line)
    return str(message.get("error_type") or message["type"])


async def test_clients_whose_hellos_follow_their_connects_are_not_taken_for_idle_sockets(
    engine: Engine, sock_path: str
) -> None:
    await engine.start()
    server = await engine.serve(sock_path, announce=False, max_handshakes=4, hello_timeout=30)
    socks = [connected(sock_path) for _ in range(8)]  # twice the pool, none has said hello yet
    await eventually(lambda: server.stats()["handshaking"] == 4)
    for sock in socks:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # one closed already
            sock.sendall(HELLO)  # their hellos, a moment after their connects
    assert await asyncio.gather(*(first_line(sock) for sock in socks)) == ["welcome"] * 8
    assert (server.stats()["handshakes_evicted"], server.stats()["hello_timeouts"]) == (0, 0)


async def test_more_whole_hellos_than_the_handshake_pool_are_all_answered_at_once(
    engine: Engine, sock_path: str
) -> None:
    # every place held by a hello being read paused accepting, and the end of those handshakes
    # did not resume it: the clients behind them waited for a timer (hello_timeout), or forever
    await engine.start()
    server = await engine.serve(sock_path, announce=False, max_handshakes=4, hello_timeout=30)
    socks = []
    for _ in range(12):
        # connected and said hello before the engine's loop turns: the server finds 12 whole
        # hellos waiting for its 4 places
        socks.append(sock := connected(sock_path))
        sock.sendall(HELLO)
    assert await asyncio.gather(*(first_line(sock) for sock in socks)) == ["welcome"] * 12
    assert server.stats()["handshakes_evicted"] == 0
