"""The loop actions through every facade: the background thread's (blocking and awaitable),
the remote client over a real control endpoint, and the dashboard's local and remote clients.
Each must do what the engine does and raise the same typed errors.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    InProcessLease,
    QueueInfo,
    QueuePurge,
    RemoteEngine,
    TaskContext,
    TriggerFire,
    UnknownQueue,
    UnknownTrigger,
    UnknownWorker,
    WorkerInfo,
    WorkerNotLeading,
)
from taskwatch.tui.client import LocalClient
from taskwatch.tui.remote_client import RemoteClient

from .helpers import eventually
from .raw_client import serve

Call = Callable[..., Awaitable[Any]]


def loops_engine(node_id: str = "loops", **options: Any) -> tuple[Engine, dict[str, list[Any]]]:
    engine = Engine(node_id=node_id, health_interval=None, cancel_grace=1.0, **options)
    seen: dict[str, list[Any]] = {"starts": [], "jobs": [], "keys": []}

    @engine.supervised(name="indexer")
    async def indexer(ctx: TaskContext) -> None:
        seen["starts"].append(1)
        await asyncio.Event().wait()

    async def mail(job: int) -> None:
        seen["jobs"].append(job)

    async def compile_bank(ctx: TaskContext, key: str) -> None:
        seen["keys"].append(key)

    engine.queue("mail", mail)
    engine.trigger("compile", compile_bank, size_threshold=100)
    return engine, seen


async def exercise(call: Call, engine: Engine, seen: dict[str, list[Any]]) -> None:
    """The same story through any facade: ``call(operation, *args)`` awaits its result."""
    await eventually(lambda: seen["starts"])
    paused = await call("pause_queue", "mail")
    assert isinstance(paused, QueueInfo) and paused.paused
    queue = engine.get_queue("mail")
    for i in range(3):
        queue.put_nowait(i)  # safe from any thread
    await eventually(lambda: engine.queues()[0].depth == 3)
    purge = await call("purge_queue", "mail")
    assert isinstance(purge, QueuePurge) and purge.purged == 3 and purge.info.purged == 3
    resumed = await call("resume_queue", "mail")
    assert isinstance(resumed, QueueInfo) and not resumed.paused and resumed.purged == 3
    assert seen["jobs"] == []

    fire = await call("fire_trigger", "compile", "bank-7")
    assert isinstance(fire, TriggerFire) and fire.fired and fire.key == "bank-7"
    await eventually(lambda: seen["keys"] == ["bank-7"])

    stopped = await call("stop_worker", "indexer")
    assert isinstance(stopped, WorkerInfo) and stopped.state == "stopped" and stopped.stopped_by_user
    started = await call("start_worker", "indexer")
    assert not started.stopped_by_user
    await eventually(lambda: len(seen["starts"]) == 2)
    restarted = await call("restart_worker", "indexer")
    assert restarted.state == "running"
    await eventually(lambda: len(seen["starts"]) == 3)

    with pytest.raises(UnknownQueue) as no_queue:
        await call("purge_queue", "ghost")
    assert "mail" in str(no_queue.value)
    with pytest.raises(UnknownTrigger):
        await call("fire_trigger", "ghost", "k")
    with pytest.raises(UnknownWorker):
        await call("restart_worker", "ghost")
    assert engine.queues()[0].purged == 3 and engine.triggers()[0].fired == 1


async def test_the_background_engine_blocking_and_awaitable() -> None:
    engine, seen = loops_engine()
    bg = engine.start_background()
    try:

        async def blocking(name: str, *args: Any) -> Any:
            return await asyncio.to_thread(getattr(bg, name), *args)

        await exercise(blocking, engine, seen)
    finally:
        bg.stop(timeout=5)

    engine, seen = loops_engine("loops-2")
    bg = engine.start_background()
    try:

        async def awaitable(name: str, *args: Any) -> Any:
            return await getattr(bg, "a" + name)(*args)

        await exercise(awaitable, engine, seen)
    finally:
        bg.stop(timeout=5)


async def test_the_remote_engine_over_a_real_control_endpoint(sock_path: str) -> None:
    engine, seen = loops_engine()
    async with engine:
        server = await serve(engine, sock_path)
        remote = RemoteEngine(server.address)
        await remote.connect()
        try:

            async def over_the_wire(name: str, *args: Any) -> Any:
                return await getattr(remote, name)(*args)

            await exercise(over_the_wire, engine, seen)
            # what the actions published reached the remote side as typed events
            kinds = {e.kind for e in remote.get_batch()}  # type: ignore[attr-defined]
            assert {"queue.paused", "queue.purged", "queue.resumed", "trigger.fired", "worker.stopped",
                    "worker.resumed"} <= kinds
        finally:
            await remote.close()


async def test_a_follower_refuses_to_restart_a_leader_only_worker_over_the_wire(sock_path: str) -> None:
    lease = InProcessLease(ttl=2.0, renew_interval=0.1)
    leader = Engine(node_id="a", lease=lease, health_interval=None)
    follower = Engine(node_id="b", lease=lease, health_interval=None)
    for engine in (leader, follower):

        @engine.supervised(name="dedup", leader_only=True)
        async def dedup(ctx: TaskContext) -> None:
            await asyncio.Event().wait()

    async with leader:
        await eventually(lambda: leader.leadership().is_leader)
        async with follower:
            server = await serve(follower, sock_path)
            remote = RemoteEngine(server.address)
            await remote.connect()
            try:
                with pytest.raises(WorkerNotLeading) as refused:
                    await remote.restart_worker("dedup")
                assert refused.value.worker == "dedup" and refused.value.holder == "a"
                assert "restart it on the leader" in str(refused.value)
                assert follower.workers()[0].state == "waiting_for_leadership"
            finally:
                await remote.close()


async def test_the_dashboards_local_client() -> None:
    engine, seen = loops_engine()
    bg = engine.start_background()
    client = LocalClient(engine)
    try:
        await client.connect()

        async def local(name: str, *args: Any) -> Any:
            return await getattr(client, name)(*args)

        await exercise(local, engine, seen)
    finally:
        await client.close()
        bg.stop(timeout=5)


async def test_the_dashboards_remote_client(sock_path: str) -> None:
    engine, seen = loops_engine()
    async with engine:
        server = await serve(engine, sock_path)
        client = RemoteClient(server.address)
        await client.connect()
        try:

            async def attached(name: str, *args: Any) -> Any:
                return await getattr(client, name)(*args)

            await exercise(attached, engine, seen)
        finally:
            await client.close()
