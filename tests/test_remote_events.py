"""A ``RemoteEngine``'s event stream around the snapshots it takes: what the engine
dropped for it after a snapshot is announced, even when the run of losses began before."""

from __future__ import annotations

import asyncio
from typing import Any

from taskwatch.engine import ConnectionClosed, Engine, RemoteEngine
from taskwatch.engine.events import Event, EventsDropped

from .cutting_proxy import StallingProxy
from .helpers import eventually
from .raw_client import serve


async def test_events_dropped_after_a_snapshot_taken_inside_the_gap_are_announced() -> None:
    engine = Engine(health_interval=None)
    flowing = asyncio.Event()
    flowing.set()

    @engine.task
    async def chatty(ctx: Any) -> None:
        i = 0
        while flowing.is_set():
            await ctx.progress(i, None, "x" * 200)
            i += 1
            if i % 50 == 0:
                await asyncio.sleep(0)

    async with engine:
        server = await serve(engine, "tcp://127.0.0.1:0", buffer=50, outgoing=8)
        port = int(server.address.rsplit(":", 1)[1])
        async with StallingProxy(port) as proxy:
            remote = RemoteEngine(f"tcp://127.0.0.1:{proxy.port}", token=server.token)
            await remote.connect()
            # the client reads nothing for a while: the engine's buffer for it overflows
            proxy.hold(answers_only=True)
            run = await engine.submit("chatty")
            # the engine now drops most of what it publishes for this client, in long runs
            await eventually(lambda: server.stats()["events_dropped"] > 20_000, timeout=60)
            commands = server.stats()["commands"]
            taking = asyncio.create_task(remote.snapshot())
            await eventually(lambda: server.stats()["commands"] > commands, timeout=30)
            dropped_at_snapshot = server.stats()["events_dropped"]
            # and goes on losing events after the snapshot, in the same run of losses
            await eventually(lambda: server.stats()["events_dropped"] > dropped_at_snapshot + 5_000, timeout=60)
            flowing.clear()
            await run.wait(30)
            proxy.release()
            snapshot = await taking
            last = engine.bus.last_seq
            seen: list[Event] = []

            def read_through_last() -> bool:
                seen.extend(remote.get_batch())
                return any(e.seq + (e.count - 1 if isinstance(e, EventsDropped) else 0) >= last for e in seen)

            await eventually(read_through_last, timeout=30)
            await remote.close()
    received = {e.seq for e in seen if e.kind != "bus.dropped"}
    announced = {seq for e in seen if e.kind == "bus.dropped" for seq in range(e.seq, e.seq + e.count)}
    # every event after the snapshot arrived or was announced as lost
    assert [seq for seq in range(snapshot.last_seq + 1, last + 1) if seq not in received | announced] == []
    assert announced and min(announced) > snapshot.last_seq
    # and counted: what the snapshot covered was lost all the same
    assert remote.dropped >= sum(e.count for e in seen if isinstance(e, EventsDropped))


async def test_the_event_stream_goes_on_while_snapshots_are_taken_beside_it() -> None:
    """A snapshot's reply may take back events the stream had just been woken for (they are in
    that snapshot): ``events()`` took that wake for the end of the connection, and stopped."""
    engine = Engine(health_interval=None)
    going = asyncio.Event()
    going.set()

    @engine.task
    async def ticker(ctx: Any) -> None:
        i = 0
        while going.is_set():
            i += 1
            await ctx.progress(i % 100, 100, "tick")
            await asyncio.sleep(0)

    async with engine:
        server = await serve(engine, "tcp://127.0.0.1:0")
        remote = RemoteEngine(server.address, token=server.token)
        await remote.connect()
        run = await engine.submit("ticker")
        read = 0
        ended = asyncio.Event()

        async def consume() -> None:
            nonlocal read
            async for _ in remote.events():
                read += 1
            ended.set()

        consuming = asyncio.create_task(consume())
        try:
            for _ in range(300):  # a dashboard's refresh, as fast as it goes
                await remote.snapshot()
                assert not ended.is_set(), f"events() ended after {read} events while connected={remote.connected}"
            assert remote.connected and read > 0
            # and an end of the connection still ends it
            await remote.close()
            await asyncio.wait_for(ended.wait(), 5)
        finally:
            going.clear()
            consuming.cancel()
            await asyncio.gather(consuming, return_exceptions=True)
            await remote.close()
            await run.wait(timeout=5)


async def test_a_close_made_while_connecting_leaves_no_connection_open() -> None:
    engine = Engine(health_interval=None)
    async with engine:
        server = await serve(engine, "tcp://127.0.0.1:0")
        for turns in range(1, 8):  # close() at each step of the handshake in turn
            remote = RemoteEngine(server.address, token=server.token)
            connecting = asyncio.create_task(remote.connect())
            for _ in range(turns):
                await asyncio.sleep(0)  # one turn of the loop: the handshake takes several
            await remote.close()
            [outcome] = await asyncio.gather(connecting, return_exceptions=True)
            # it finished connecting after close() returned: connected, reading events for good
            assert not remote.connected, turns
            if isinstance(outcome, BaseException):
                assert isinstance(outcome, ConnectionClosed) and "close() was called while connecting" in str(outcome)
            await eventually(lambda: server.stats()["active"] == 0)
        assert not [t for t in asyncio.all_tasks() if t.get_name() == "taskwatch-remote-read"]
