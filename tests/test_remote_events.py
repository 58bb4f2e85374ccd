"""A ``RemoteEngine``'s event stream around the snapshots it takes: what the engine
dropped for it after a snapshot is announced, even when the run of losses began before."""

from __future__ import annotations

import asyncio
from typing import Any

from taskwatch.engine import Engine, RemoteEngine
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
