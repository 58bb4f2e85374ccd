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
import json
import logging
import signal
import sys
import uuid
from typing import Any

import pytest
import redis.asyncio as aioredis
from taskwatch.engine import Engine, EventBus, InProcessLease, InvalidConfiguration, RedisLease, TaskContext
from taskwatch.engine.events import RunSubmitted
from taskwatch.engine.redis_events import RedisEventRelay

from .helpers import eventually, stray_tasks
from .processes import JsonLineProcess
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
    lease = InProcessLease(ttl=30.0)  # "a" leads throughout, however loaded the machine
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
        # the per-node summary: one leader, health figures for each (a node whose health samples,
        # 0.1 s apart, a loaded machine held up for a second shows unknown, with no role, meanwhile)
        summary = {n.node: n for n in cluster.nodes()}
        assert set(summary) == {"a", "b", "c"}
        await eventually(lambda: [n.node for n in cluster.nodes() if n.is_leader] == ["a"], timeout=10.0)
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


def submitted(relay: RedisEventRelay) -> list[str]:
    return [e.run_id for e in relay.bus.recent() if e.kind == "run.submitted"]  # type: ignore[attr-defined]


async def test_a_batch_redis_ran_after_a_stall_past_the_write_timeout_is_read_once(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    stream = stream_name()
    bus = EventBus(node="w")
    # redis-py takes socket_timeout from the URL: a stall of well under a second outlasts it
    relay = RedisEventRelay(f"{redis_server.url}?socket_timeout=0.3", bus, stream=stream, read_block=0.05)
    raw = aioredis.Redis.from_url(redis_server.url)
    assert redis_server.proc is not None
    caplog.set_level(logging.WARNING, logger="taskwatch.events")
    try:
        await relay.start()
        bus.emit(RunSubmitted, run_id="r1", task="t")
        await eventually(lambda: submitted(relay) == ["r1"])

        redis_server.proc.send_signal(signal.SIGSTOP)
        try:
            bus.emit(RunSubmitted, run_id="r2", task="t")
            # the batch reached Redis, its answer did not come in time: it is sent again
            await eventually(lambda: "publishing events to" in caplog.text)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
        # Redis ran the first copy when it woke, and a later one: r2 is in the stream twice
        await eventually(lambda: relay.stats().pending == 0)
        assert await raw.xlen(stream) >= 3
        bus.emit(RunSubmitted, run_id="r3", task="t")
        await eventually(lambda: "r3" in submitted(relay))

        # ... and every reader sees it once: not a second time as if the node had restarted
        assert submitted(relay) == ["r1", "r2", "r3"]
        (seen,) = relay.nodes()
        assert (seen.events, seen.missed) == (3, 0)
        assert relay.stats().missed == 0
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        await relay.stop()
        await raw.aclose()
    assert not stray_tasks()


async def test_an_engine_started_again_reads_on_and_reports_nothing_missed(redis_server: RedisServer) -> None:
    stream = stream_name()
    a = cluster_engine(redis_server.url, "a", stream, health_interval=None)
    b = cluster_engine(redis_server.url, "b", stream, health_interval=None)
    dropped: list[Any] = []
    assert a.cluster is not None
    a.cluster.bus.add_callback(dropped.append, ["bus.dropped"])

    def read_all(node: str, engine: Engine) -> bool:
        assert a.cluster is not None
        seen = {n.node: n for n in a.cluster.nodes()}.get(node)
        # every event of the node read, coalesced away or counted missed
        return seen is not None and seen.events + seen.coalesced + seen.missed >= engine.bus.last_seq

    try:
        await a.start()
        await b.start()
        await (await b.submit("hello")).wait()
        await eventually(lambda: read_all("b", b), timeout=10.0)
        await a.stop(2.0)
        # while a is stopped: its own last events (sent at its stop) and b's new ones wait in the stream
        await (await b.submit("hello")).wait()
        b_cluster = b.cluster
        assert b_cluster is not None
        await eventually(lambda: b_cluster.stats().pending == 0, timeout=10.0)

        await a.start()
        await (await a.submit("hello")).wait()
        await (await b.submit("hello")).wait()
        await eventually(lambda: read_all("a", a) and read_all("b", b), timeout=10.0)

        assert {n.node: n.missed for n in a.cluster.nodes()} == {"a": 0, "b": 0}
        assert a.cluster.stats().missed == 0 and dropped == []
        # b's run while a was stopped is on a's cluster bus
        b_runs = [e for e in a.cluster.bus.recent() if e.kind == "run.succeeded" and e.node == "b"]  # type: ignore[attr-defined]
        assert len(b_runs) == 3
    finally:
        await a.stop(2.0)
        await b.stop(2.0)
    assert not stray_tasks()


#: an engine leading on Redis and publishing its events there, in a process of its own
LEADER = """
import asyncio, json, sys
from taskwatch.engine import Engine, RedisLease

async def main(url, key, events):
    engine = Engine(node_id="a", lease=RedisLease(url, key=key, ttl=1.0), events=events, health_interval=None)
    await engine.start()
    print(json.dumps({"ev": "started", "leader": engine.leadership().is_leader}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(*sys.argv[1:4]))
"""


async def test_a_leader_killed_9_is_not_shown_leading_next_to_its_successor(redis_server: RedisServer) -> None:
    stream = stream_name()
    events = f"{redis_server.url}?stream={stream}"
    key = f"test:{uuid.uuid4().hex[:8]}:leader"
    killed = JsonLineProcess([sys.executable, "-c", LEADER, redis_server.url, key, events], "leader-a", 30.0)
    b = Engine(node_id="b", lease=RedisLease(redis_server.url, key=key, ttl=1.0), events=events, health_interval=None)
    try:
        started = await asyncio.to_thread(killed.event, "started")
        assert started["leader"], json.dumps(started)
        await b.start()
        assert b.cluster is not None
        cluster = b.cluster
        await eventually(lambda: any(n.node == "a" and n.is_leader for n in cluster.nodes()), timeout=10.0)

        killed.proc.kill()  # no lease.lost, no engine.stopped: a just goes silent
        await eventually(lambda: b.leadership().is_leader, timeout=10.0)
        await eventually(lambda: {n.node for n in cluster.nodes()} == {"a", "b"}, timeout=10.0)
        await eventually(lambda: any(n.node == "b" and n.is_leader for n in cluster.nodes()), timeout=10.0)

        leaders = {n.node: (n.is_leader, n.term) for n in cluster.nodes()}
        assert leaders == {"a": (False, 1), "b": (True, b.leadership().term)}
        assert b.leadership().term > 1
    finally:
        if killed.proc.poll() is None:
            killed.proc.kill()
        killed.proc.wait(timeout=30)
        await b.stop(2.0)
    assert not stray_tasks()
