"""A ``RemoteEngine``'s event stream around the snapshots it takes: what the engine
dropped for it after a snapshot is announced, even when the run of losses began before."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from taskwatch.engine import ConnectionClosed, Engine, RemoteEngine
from taskwatch.engine.events import EngineStarted, Event, EventsDropped
from taskwatch.engine.wire import PROTOCOL_VERSION, EventMessage, OkReply, SnapshotMessage, Welcome, encode_message

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


async def test_the_event_stream_goes_on_after_a_snapshot_reply_ahead_of_events_it_covers() -> None:
    """The engine sends a snapshot's reply ahead of the events it still had queued for the
    client, and those the snapshot covers are taken back once the reply is read. Arriving in
    one read, they woke the stream and were taken back before it ran: ``events()`` took that
    wake for the end of the connection, and stopped, connected."""
    engine = Engine(health_interval=None, node_id="ahead")
    async with engine:
        at = engine.snapshot()

        def event(seq: int) -> bytes:
            started = engine.bus.make(EngineStarted, backend="memory").model_copy(update={"seq": seq})
            return encode_message(EventMessage(event=started))

        later = asyncio.Event()

        async def server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()  # the hello
            writer.write(encode_message(Welcome(version=PROTOCOL_VERSION, node_id="ahead")))
            writer.write(encode_message(SnapshotMessage(snapshot=at)))
            command = json.loads(await reader.readline())  # the snapshot() below
            newer = at.model_copy(update={"last_seq": at.last_seq + 10})
            # the reply, then an event it covers, in one write: one read for the client
            writer.write(
                encode_message(OkReply(id=command["id"], result=newer.model_dump(mode="json")))
                + event(at.last_seq + 5)
            )
            await later.wait()
            writer.write(event(at.last_seq + 11))  # after the snapshot: the stream reads it
            await writer.drain()
            await reader.read()  # until the client closes

        service = await asyncio.start_server(server, "127.0.0.1", 0)
        port = service.sockets[0].getsockname()[1]
        remote = RemoteEngine(f"tcp://127.0.0.1:{port}", token="x" * 20, timeout=5)
        try:
            await remote.connect()
            read: list[int] = []

            async def consume() -> None:
                async for e in remote.events():
                    read.append(e.seq)

            consuming = asyncio.create_task(consume())
            await remote.snapshot()
            later.set()
            await eventually(lambda: consuming.done() or read)
            assert not consuming.done(), "events() ended while connected"
            assert read == [at.last_seq + 11] and remote.connected
            await remote.close()
            await asyncio.wait_for(consuming, 5)  # the end of the connection ends it
        finally:
            await remote.close()
            service.close()
            await service.wait_closed()


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
