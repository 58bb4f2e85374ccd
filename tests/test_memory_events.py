"""Cluster-wide events between engines of one process, through a MemoryEventStream.

Engines made with ``events=stream`` run the same relay as on Redis, with the
stream in memory. Checked here: three engines see each other's events with
their node ids, batched; a reader that attaches after the stream was trimmed,
or falls behind a trim, counts exactly what it missed (every event of a node
is either received or counted missed); a reader on another thread's loop is
woken; stopping leaves no task behind; bad options change nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    InProcessLease,
    InvalidConfiguration,
    MemoryEventRelay,
    MemoryEventStream,
    TaskContext,
)
from taskwatch.engine.bus import EventBus
from taskwatch.engine.events import EventsDropped, RunProgressed, RunStarted, RunSucceeded
from taskwatch.engine.relay import Outgoing, coalesce

from .helpers import Recorder, eventually, stray_tasks


def cluster_engine(node: str, stream: MemoryEventStream, **kwargs: Any) -> Engine:
    engine = Engine(node_id=node, events=stream, health_interval=None, **kwargs)

    @engine.task
    async def hello(ctx: TaskContext) -> str:
        return ctx.node_id

    return engine


def kinds_by_node(relay: MemoryEventRelay, kind: str) -> list[str]:
    return sorted(e.node for e in relay.bus.recent() if e.kind == kind)  # type: ignore[attr-defined]


async def test_three_engines_see_each_others_events_with_their_node_ids() -> None:
    stream = MemoryEventStream("app:events")
    lease = InProcessLease(ttl=30.0)
    engines = [cluster_engine(node, stream, lease=lease) for node in ("a", "b", "c")]
    try:
        for engine in engines:
            await engine.start()
        for engine in engines:
            await (await engine.submit("hello")).wait()
        for engine in engines:
            relay = engine.cluster
            assert isinstance(relay, MemoryEventRelay) and relay.stream == "app:events"
            await eventually(lambda r=relay: kinds_by_node(r, "run.succeeded") == ["a", "b", "c"])
        cluster = engines[1].cluster
        assert cluster is not None
        summary = {info.node: info for info in cluster.nodes()}
        assert [node for node, info in summary.items() if info.is_leader] == ["a"]
        assert summary["a"].term == 1 and summary["b"].is_leader is False
        stats = cluster.stats()
        assert stats.connected and stats.missed == 0 and stats.unsent == 0 and stats.batches < stats.published
    finally:
        for engine in engines:
            await engine.stop(1.0)
    last = engines[-1].cluster
    assert last is not None and {info.node for info in last.nodes() if info.stopped} >= {"a", "b"}
    assert not stray_tasks()


async def test_a_reader_attached_after_a_trim_counts_exactly_what_it_missed() -> None:
    stream = MemoryEventStream(maxlen=50)
    writer = cluster_engine("w", stream)
    try:
        await writer.start()
        for handle in await writer.submit_many([("hello", None)] * 100):
            await handle.wait()
        await eventually(lambda: writer.cluster is not None and writer.cluster.pending == 0)
        assert len(stream) == 50 and stream.trimmed == stream.last_id - 50

        async with MemoryEventRelay(stream, since="0") as reader:
            await eventually(lambda: reader.stats().received == 50)
            (seen,) = reader.nodes()
            # the 50 kept are read; everything before them is counted, none twice
            assert seen.node == "w" and seen.events == 50
            assert seen.events + seen.missed + seen.coalesced == writer.bus.last_seq
            assert seen.missed > 0 and reader.stats().missed == seen.missed
            (dropped,) = [e for e in reader.bus.recent() if e.kind == "bus.dropped"]  # type: ignore[attr-defined]
            assert dropped.node == "w" and dropped.count == seen.missed  # type: ignore[attr-defined]
    finally:
        await writer.stop(1.0)
    assert not stray_tasks()


async def test_a_reader_behind_a_trim_counts_the_gap_and_reads_on() -> None:
    stream = MemoryEventStream(maxlen=10)
    writer = cluster_engine("w", stream)
    reader = MemoryEventRelay(stream)
    await reader.start()
    try:
        await writer.start()
        await eventually(lambda: reader.stats().received > 0)
        # one batch larger than the stream: the reader cannot read between append and trim
        await writer.submit_many([("hello", None)] * 20)
        await eventually(lambda: writer.cluster is not None and writer.cluster.pending == 0)
        await eventually(lambda: reader.nodes()[0].events + reader.nodes()[0].missed
                         + reader.nodes()[0].coalesced >= writer.bus.last_seq)  # fmt: skip
        (seen,) = reader.nodes()
        assert seen.missed > 0 and seen.events + seen.missed + seen.coalesced == writer.bus.last_seq
    finally:
        await writer.stop(1.0)
        await reader.stop()
    assert not stray_tasks()


async def test_an_engine_started_again_reads_on_and_reports_nothing_missed() -> None:
    stream = MemoryEventStream("app:events")
    a, b = cluster_engine("a", stream), cluster_engine("b", stream)
    try:
        relay, b_relay = a.cluster, b.cluster
        assert isinstance(relay, MemoryEventRelay) and isinstance(b_relay, MemoryEventRelay)
        await a.start()
        await b.start()
        await (await b.submit("hello")).wait()
        await eventually(lambda: kinds_by_node(relay, "run.succeeded") == ["b"])
        await a.stop(2.0)
        await (await b.submit("hello")).wait()  # while a is stopped: it waits in the stream
        await eventually(lambda: b_relay.stats().pending == 0)
        await a.start()
        await (await b.submit("hello")).wait()
        await eventually(lambda: len(kinds_by_node(relay, "run.succeeded")) >= 3)
        assert kinds_by_node(relay, "run.succeeded") == ["b", "b", "b"]
        assert {n.node: n.missed for n in relay.nodes()} == {"a": 0, "b": 0}
    finally:
        await a.stop(2.0)
        await b.stop(2.0)
    assert not stray_tasks()


async def test_a_run_submitted_on_one_node_and_run_on_another_starts_and_ends_once_on_the_cluster_bus(
    tmp_path: Path,
) -> None:
    # the submitter reads the run's start and end from the store and tells its own bus
    # (its dashboard and waiters need them); only the node that ran it tells the cluster
    stream = MemoryEventStream("app:events")
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    release = asyncio.Event()
    submitter = cluster_engine("submitter", stream, store=db, max_concurrency=1)
    runner = cluster_engine("runner", stream, store=db)
    for engine in (submitter, runner):

        @engine.task(name="hold")
        async def hold(ctx: TaskContext) -> None:
            await release.wait()

        @engine.task(name="breaks")
        async def breaks(ctx: TaskContext) -> None:
            raise ValueError("broken")

    local = Recorder(submitter, ("run.",))
    try:
        await submitter.start()
        busy = await submitter.submit("hold")  # the submitter's one slot: the runner takes the rest
        await eventually(lambda: submitter.get(busy.id).status.value == "running")
        await runner.start()
        ok, bad = await submitter.submit("hello"), await submitter.submit("breaks")
        assert [(await h.wait()).status.value for h in (ok, bad)] == ["succeeded", "failed"]
        # the submitter's own bus heard both ends, marked as read from the store
        ends = ("run.succeeded", "run.failed")
        await eventually(lambda: {e.run_id for e in local.events if e.kind in ends} == {ok.id, bad.id})
        heard = [e for e in local.events if e.run_id in (ok.id, bad.id) and e.kind != "run.submitted"]
        assert heard and all(e.from_store for e in heard)
        # and its records name the node that ran them, as the store's do
        assert [submitter.get(h.id).node for h in (ok, bad)] == ["runner", "runner"]
        assert [(await submitter.fetch_run(h.id)).node for h in (ok, bad)] == ["runner", "runner"]
        # everything the submitter sent before this marker has been read once it is read
        marker = await submitter.submit("hello")
        cluster = runner.cluster
        assert cluster is not None
        await eventually(
            lambda: any(e.kind == "run.submitted" and e.run_id == marker.id for e in cluster.bus.recent()),
            timeout=5.0,
        )
        told = [
            (e.kind, e.node) for e in cluster.bus.recent()
            if getattr(e, "run_id", None) in (ok.id, bad.id) and e.kind != "run.submitted"
        ]
        assert sorted(told) == [
            ("run.failed", "runner"), ("run.started", "runner"), ("run.started", "runner"), ("run.succeeded", "runner")
        ]
        # what the submitter left out is accounted for, not taken for lost
        assert {n.node: n.missed for n in cluster.nodes()} == {"runner": 0, "submitter": 0}
    finally:
        release.set()
        await submitter.stop(2.0)
        await runner.stop(2.0)
    assert not stray_tasks()


async def test_an_event_no_json_can_carry_is_counted_missed_and_the_relay_goes_on() -> None:
    # once, one such event lost the batch it came in and stopped the node's relay for good
    stream = MemoryEventStream()
    engine = cluster_engine("a", stream)
    async with engine, MemoryEventRelay(stream) as reader:
        first = await engine.submit("hello")
        await first.wait()
        await eventually(lambda: reader.stats().received >= 4)  # started, and the run's three
        # posted unchecked, as only the engine's own values are
        engine.bus.post(RunSucceeded, run_id="r", task="t", from_store=False, result={"text": "x\udcff"})
        second = await engine.submit("hello")
        await second.wait()
        await eventually(lambda: any(getattr(e, "run_id", None) == second.id and e.kind == "run.succeeded"
                                     for e in reader.bus.recent()))
        assert engine.cluster is not None and engine.cluster.stats().unencodable == 1
        assert reader.stats().missed == 1 and reader.stats().malformed == 0
        [node] = reader.nodes()
        assert node.node == "a" and node.missed == 1
        assert [e.count for e in reader.bus.recent() if e.kind == "bus.dropped"] == [1]


@pytest.mark.parametrize("bad", ['"result":{"v":NaN}', '"result":1,"duration":Infinity'])
async def test_an_entry_holding_a_nan_from_a_foreign_writer_is_malformed_and_reading_goes_on(bad: str) -> None:
    # JSON's reader lets NaN through; once, publishing it ended the node's reader for good
    stream = MemoryEventStream()
    engine = cluster_engine("b", stream)
    async with engine:
        assert engine.cluster is not None
        now = time.time()
        entry = '{"kind":"run.succeeded","seq":%d,"ts":%f,"node":"x","run_id":"r%d","task":"t",%s}'
        stream.append([Outgoing(1, now, entry % (1, now, 1, bad))], "bus-x")
        stream.append([Outgoing(2, now, entry % (2, now, 2, '"result":{"v":"NaN in a text is fine"}'))], "bus-x")
        await eventually(lambda: any(getattr(e, "run_id", None) == "r2" for e in engine.cluster.bus.recent()))
        assert engine.cluster.stats().malformed == 1
        assert not any(getattr(e, "run_id", None) == "r1" for e in engine.cluster.bus.recent())


async def test_a_run_reporting_progress_in_a_tight_loop_pushes_no_other_event_off_the_queue() -> None:
    # each figure took a place in the line to send: a task calling ctx.progress in a loop
    # filled it, and the runs' ends, starts and failures behind it were dropped (a cluster
    # dashboard missed half of one node's failures)
    stream = MemoryEventStream("app:events")
    bus = EventBus(node="w")
    writer = MemoryEventRelay(stream, bus, max_pending=100)
    reader = MemoryEventRelay(stream)
    await reader.start()
    await writer.start()
    try:
        for run in ("r1", "r2"):
            bus.post(RunStarted, run_id=run, task="flood", attempt=1, from_store=False)
        for done in range(10_000):  # no await: nothing is sent meanwhile
            for run in ("r1", "r2"):
                bus.post(RunProgressed, run_id=run, task="flood", done=done, total=10_000.0, message="")
        for run in ("r1", "r2"):
            bus.post(RunSucceeded, run_id=run, task="flood", attempt=1, duration=1.0, result=None)
        await eventually(lambda: len(kinds_by_node(reader, "run.succeeded")) == 2)
        (seen,) = reader.nodes()
        assert (seen.missed, writer.stats().unsent) == (0, 0)
        assert seen.events + seen.coalesced == bus.last_seq
        figures = [e for e in reader.bus.recent() if e.kind == "run.progress"]
        assert {(e.run_id, e.done) for e in figures} == {("r1", 9_999), ("r2", 9_999)}  # type: ignore[attr-defined]
    finally:
        await writer.stop()
        await reader.stop()
    assert not stray_tasks()


def test_events_left_out_at_the_end_of_a_batch_are_counted_by_the_next_record() -> None:
    def started(seq: int, from_store: bool) -> RunStarted:
        return RunStarted(seq=seq, node="n", run_id=f"r{seq}", task="t", from_store=from_store)

    first, carried, _ = coalesce([started(1, False), started(2, True), started(3, True)])
    assert ([r.seq for r in first], carried) == ([1], 2)
    second, carried, _ = coalesce([started(4, False)], carried)
    assert [(r.seq, r.skipped) for r in second] == [(4, 2)] and carried == 0


def test_a_reader_on_another_threads_loop_is_woken() -> None:
    stream = MemoryEventStream()
    got_one = threading.Event()
    stop = threading.Event()

    async def read() -> None:
        async with MemoryEventRelay(stream) as reader:
            ready.set()
            while not reader.stats().received:
                await asyncio.sleep(0.01)
            got_one.set()
            while not stop.is_set():
                await asyncio.sleep(0.01)

    ready = threading.Event()
    thread = threading.Thread(target=asyncio.run, args=(read(),))
    thread.start()
    try:
        assert ready.wait(5)

        async def publish() -> None:
            engine = cluster_engine("w", stream)
            await engine.start()
            await (await engine.submit("hello")).wait()
            await engine.stop(1.0)

        asyncio.run(publish())
        assert got_one.wait(5)
    finally:
        stop.set()
        thread.join(5)
    assert not thread.is_alive()


def test_bad_options_are_refused_naming_each() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        MemoryEventStream("", maxlen=0)
    assert "name" in str(info.value) and "maxlen" in str(info.value)
    with pytest.raises(InvalidConfiguration) as info:
        MemoryEventRelay(MemoryEventStream(), batch=0, linger=-1, since="later")
    assert all(word in str(info.value) for word in ("batch", "linger", "since"))
    with pytest.raises(InvalidConfiguration):
        MemoryEventRelay("taskwatch:events")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfiguration) as info:
        Engine(events=object())  # type: ignore[arg-type]
    assert "MemoryEventStream" in str(info.value)


async def test_a_burst_reaches_a_reader_of_a_memory_stream_as_it_would_over_redis() -> None:
    """A node's burst (``submit_many``) was appended batch after batch without a turn for the
    readers, and trimmed to the stream's length before they read any of it: the monitor
    missed most of it, where the same burst over Redis reaches it whole."""
    stream = MemoryEventStream(maxlen=2_000)  # a third of the burst's events
    worker = cluster_engine("worker", stream, max_queue=5_000)
    monitor = cluster_engine("monitor", stream)
    async with monitor:
        submitted = monitor.cluster.bus.subscribe(kinds=["run.submitted"], maxsize=10_000)
        async with worker:
            await worker.submit_many([("hello", None)] * 2_000)
            await eventually(lambda: submitted.pending() >= 2_000)
            got = submitted.get_batch()
    assert sum(e.kind == "run.submitted" and e.node == "worker" for e in got) == 2_000
    assert monitor.cluster.stats().missed == 0 and all(e.kind != "bus.dropped" for e in got)


async def test_a_reader_of_some_kinds_hears_of_the_events_a_relay_missed() -> None:
    """A monitor reading ``kinds=["run.failed"]`` off the cluster bus was not told of events
    the shared stream trimmed before its relay read them: the relay's ``bus.dropped`` notice
    was filtered out with the other kinds, so failures went missing without a word."""
    bus = EventBus(node="monitor")
    failures = bus.subscribe(kinds=["run.failed"])
    bus.publish(EventsDropped(node="worker", ts=time.time(), count=301, total=301))  # as a relay does
    [notice] = failures.get_batch()
    assert (notice.kind, notice.node, notice.count) == ("bus.dropped", "worker", 301)
