"""Cluster-wide events over a real Redis stream: every node sees every node's events.

Engines made with ``events="redis://..."`` publish their bus to one capped
stream and read it back into ``engine.cluster.bus``. Checked here: events of
three engines reach each of them with their node ids; the per-node summary
(leader, running, CPU/RSS); events trimmed away before a reader got them are
counted exactly (every event of a node is either received or counted missed);
and events wait in the outgoing buffer while Redis is down and arrive once it
is back.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from taskwatch.engine import Engine, InProcessLease, InvalidConfiguration, TaskContext
from taskwatch.engine.redis_events import RedisEventRelay

from .helpers import eventually, stray_tasks
from .redis_server import RedisServer


def stream_name() -> str:
    return f"test:{uuid.uuid4().hex[:8]}:events"


def cluster_engine(url: str, node: str, stream: str, maxlen: int = 10_000, **kwargs: Any) -> Engine:
    engine = Engine(node_id=node, events=f"{url}?stream={stream}&maxlen={maxlen}", **kwargs)
    assert engine.cluster is not None and engine.cluster.stream == stream

    @engine.task
    async def hello(ctx: TaskContext) -> str:
        return ctx.node_id

    return engine


def nodes_seen(engine: Engine, kind: str) -> set[str]:
    assert engine.cluster is not None
    return {e.node for e in engine.cluster.bus.recent() if e.kind == kind}  # type: ignore[attr-defined]


async def test_three_engines_see_each_others_events_with_their_node_ids(redis_server: RedisServer) -> None:
    stream = stream_name()
    lease = InProcessLease(ttl=2.0)
    engines = [
        cluster_engine(redis_server.url, node, stream, lease=lease, health_interval=0.1) for node in ("a", "b", "c")
    ]
    try:
        for engine in engines:
            await engine.start()
        for engine in engines:
            await (await engine.submit("hello")).wait()

        for engine in engines:
            await eventually(lambda e=engine: nodes_seen(e, "run.succeeded") == {"a", "b", "c"}, timeout=10.0)
            await eventually(lambda e=engine: nodes_seen(e, "health") == {"a", "b", "c"}, timeout=10.0)
        cluster = engines[2].cluster
        assert cluster is not None
        # the run events say which node ran what
        succeeded = [e for e in cluster.bus.recent() if e.kind == "run.succeeded"]  # type: ignore[attr-defined]
        assert sorted((e.node, e.result) for e in succeeded) == [("a", "a"), ("b", "b"), ("c", "c")]
        # the per-node summary: one leader, health figures for each
        summary = {n.node: n for n in cluster.nodes()}
        assert set(summary) == {"a", "b", "c"}
        assert [n for n, info in summary.items() if info.is_leader] == ["a"]
        assert all(info.rss_bytes and info.rss_bytes > 0 and info.running is not None for info in summary.values())
        stats = cluster.stats()
        assert stats.connected and stats.missed == 0 and stats.unsent == 0 and stats.malformed == 0
        assert stats.batches < stats.published  # batched: fewer round trips than events
        for engine in engines[:2]:
            await engine.stop(2.0)
        # the engine still running reads the others' engine.stopped
        await eventually(lambda: {n.node for n in cluster.nodes() if n.stopped} >= {"a", "b"}, timeout=10.0)
    finally:
        for engine in engines:
            await engine.stop(2.0)
    assert not stray_tasks()


async def test_events_trimmed_away_before_a_reader_got_them_are_counted(redis_server: RedisServer) -> None:
    stream = stream_name()
    writer = cluster_engine(redis_server.url, "w", stream, maxlen=100, health_interval=None)
    assert writer.cluster is not None and writer.cluster.maxlen == 100
    try:
        await writer.start()
        handles = await writer.submit_many([("hello", None)] * 400)
        for handle in handles:
            await handle.wait()
        await eventually(lambda: writer.cluster.stats().pending == 0, timeout=10.0)  # type: ignore[union-attr]

        # a reader from the oldest kept event: most of w's events were trimmed away
        async with RedisEventRelay(redis_server.url, stream=stream, since="0") as reader:
            await eventually(
                lambda: reader.nodes() and reader.nodes()[0].events + reader.nodes()[0].missed >= writer.bus.last_seq,
                timeout=10.0,
            )
            (seen,) = reader.nodes()
            assert seen.node == "w"
            assert seen.missed > 0
            # every event of w is either received or counted as missed, never both, never neither
            assert seen.events + seen.missed == writer.bus.last_seq
            assert reader.stats().missed == seen.missed
            notices = [e for e in reader.bus.recent() if e.kind == "bus.dropped"]  # type: ignore[attr-defined]
            assert notices and notices[0].node == "w" and sum(n.count for n in notices) == seen.missed
    finally:
        await writer.stop(2.0)
    assert not stray_tasks()


async def test_a_reader_that_falls_behind_a_burst_accounts_for_every_event(redis_server: RedisServer) -> None:
    stream = stream_name()
    writer = cluster_engine(redis_server.url, "w", stream, maxlen=50, health_interval=None)
    reader = RedisEventRelay(redis_server.url, stream=stream, batch=20)
    try:
        await reader.start()
        await writer.start()
        handles = await writer.submit_many([("hello", None)] * 300)
        for handle in handles:
            await handle.wait()

        def caught_up() -> bool:
            seen = {n.node: n for n in reader.nodes()}.get("w")
            return seen is not None and seen.events + seen.missed >= writer.bus.last_seq

        await eventually(caught_up, timeout=15.0)
        (seen,) = reader.nodes()
        assert seen.events + seen.missed == writer.bus.last_seq
    finally:
        await writer.stop(2.0)
        await reader.stop()
    assert not stray_tasks()


async def test_events_wait_while_redis_is_down_and_arrive_once_it_is_back(
    persistent_redis_server: RedisServer,
) -> None:
    server = persistent_redis_server
    stream = stream_name()
    writer = cluster_engine(server.url, "w", stream, health_interval=None)
    reader = RedisEventRelay(server.url, stream=stream)
    try:
        await writer.start()
        await reader.start()
        await (await writer.submit("hello")).wait()
        await eventually(lambda: nodes_seen_relay(reader) == 1, timeout=10.0)

        server.stop()
        handle = await writer.submit("hello")
        await handle.wait()
        assert writer.cluster is not None
        await eventually(lambda: writer.cluster.stats().errors > 0, timeout=10.0)  # type: ignore[union-attr]
        assert writer.cluster.stats().pending > 0

        server.start()

        await eventually(lambda: nodes_seen_relay(reader) == 2, timeout=15.0)
        assert writer.cluster.stats().pending == 0
        assert reader.stats().missed == 0
    finally:
        await writer.stop(2.0)
        await reader.stop()
    assert not stray_tasks()


def nodes_seen_relay(reader: RedisEventRelay) -> int:
    return len([e for e in reader.bus.recent() if e.kind == "run.succeeded"])  # type: ignore[attr-defined]


def test_bad_relay_options_are_refused_with_every_problem_named() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        RedisEventRelay("http://x", stream="", maxlen=0, since="later")
    message = str(info.value)
    assert all(word in message for word in ("redis://", "stream", "maxlen", "since"))
    with pytest.raises(InvalidConfiguration, match="postgresql://"):
        Engine(events="http://db")
    with pytest.raises(InvalidConfiguration, match="maxlen"):
        Engine(events="redis://127.0.0.1:1/0?maxlen=lots")
    # the relay's own options come out of the URL redis-py gets
    relay = RedisEventRelay("redis://127.0.0.1:1/0?stream=app:ev&maxlen=500&socket_timeout=3")
    assert (relay.stream, relay.maxlen, relay.url) == ("app:ev", 500, "redis://127.0.0.1:1/0?socket_timeout=3")


async def test_an_engine_without_events_has_no_cluster_view() -> None:
    engine = Engine(health_interval=None)
    assert engine.cluster is None
    async with engine:
        await asyncio.sleep(0)
    assert not stray_tasks()


async def test_progress_bursts_are_coalesced_and_not_counted_missed(redis_server: RedisServer) -> None:
    stream = stream_name()
    steps = 300
    writer = Engine(node_id="w", events=f"{redis_server.url}?stream={stream}", health_interval=None)

    @writer.task
    async def steps_task(ctx: TaskContext) -> None:
        for i in range(1, steps + 1):
            await ctx.progress(i, steps)  # no await in between: one batch

    async with RedisEventRelay(redis_server.url, stream=stream) as reader:
        async with writer:
            await (await writer.submit("steps_task")).wait()
        last = writer.bus.last_seq
        await eventually(lambda: bool(reader.nodes()) and reader.nodes()[0].stopped, timeout=10.0)
        (seen,) = reader.nodes()
        progress = [e for e in reader.bus.recent() if e.kind == "run.progress"]  # type: ignore[attr-defined]
        assert progress[-1].done == steps and len(progress) < steps // 10
        assert seen.missed == 0 and seen.events + seen.coalesced == last
        assert writer.cluster is not None and writer.cluster.stats().coalesced == seen.coalesced
    assert not stray_tasks()
