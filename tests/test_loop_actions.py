"""Actions on the engine's other loops: restart, stop and start a supervised worker, pause,
resume and purge a queue, fire a trigger key now. Each changes what it says, publishes an
event, and refuses bad input with a typed error that changes nothing.
"""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    EngineNotRunning,
    Engine,
    InProcessLease,
    InvalidKey,
    NotLeader,
    TaskContext,
    UnknownQueue,
    UnknownTrigger,
    UnknownWorker,
    WorkerNotLeading,
)

from .helpers import Recorder, eventually, stray_tasks


def engine_with(**options: Any) -> Engine:
    options.setdefault("health_interval", None)
    return Engine(**options)


async def forever() -> None:
    await asyncio.Event().wait()


# ---------------------------------------------------------------- supervised workers


async def test_restart_cancels_the_running_worker_and_starts_it_again_at_once() -> None:
    engine = engine_with(cancel_grace=1.0)
    starts: list[int] = []
    cancelled: list[int] = []

    @engine.supervised(name="indexer")
    async def indexer(ctx: TaskContext) -> None:
        starts.append(len(starts) + 1)
        try:
            await forever()
        except asyncio.CancelledError:
            cancelled.append(starts[-1])
            raise

    rec = Recorder(engine, ("worker.",))
    async with engine:
        await eventually(lambda: starts == [1])
        info = await engine.restart_worker("indexer")
        assert info.state == "running"
        await eventually(lambda: starts == [1, 2])
        assert cancelled == [1]
        assert engine.workers()[0].state == "running"
    assert [(e.kind, getattr(e, "reason", None)) for e in rec.events[:3]] == [
        ("worker.started", None),
        ("worker.stopped", "restart"),
        ("worker.started", None),
    ]


async def test_restart_skips_the_backoff_and_forgets_the_crash_streak() -> None:
    engine = engine_with()
    attempts: list[int] = []

    @engine.supervised(name="flaky", backoff=3600.0, backoff_max=7200.0)
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("first start fails")
        await forever()

    rec = Recorder(engine, ("worker.",))
    async with engine:
        await eventually(lambda: engine.workers()[0].state == "backoff")
        # an hour to wait; the restart starts it now
        assert engine.workers()[0].next_restart_at is not None
        await engine.restart_worker("flaky")
        await eventually(lambda: len(attempts) == 2)
        info = engine.workers()[0]
        assert info.state == "running" and info.next_restart_at is None
        assert info.crashes == 1
    assert ("worker.stopped", "restart") in [(e.kind, getattr(e, "reason", None)) for e in rec.events]


async def test_a_stopped_worker_stays_stopped_until_started() -> None:
    engine = engine_with(cancel_grace=1.0)
    runs: dict[str, int] = {"held": 0, "control": 0}

    async def held(ctx: TaskContext) -> None:
        runs["held"] += 1
        await forever()

    async def control(ctx: TaskContext) -> None:
        runs["control"] += 1
        await forever()

    # registered first: were it started, its task would run before the control's
    engine.supervised(held, name="held", backoff=0.001)
    engine.supervised(control, name="control")
    rec = Recorder(engine, ("worker.",))
    async with engine:
        await eventually(lambda: runs == {"held": 1, "control": 1})
        info = await engine.stop_worker("held")
        assert info.state == "stopped" and info.stopped_by_user
        assert rec.of("worker.stopped")[-1].reason == "user"
        # stopping again changes nothing and says nothing more
        assert (await engine.stop_worker("held")).stopped_by_user
        assert len(rec.of("worker.stopped")) == 1
    # an engine started again leaves it stopped too
    async with engine:
        await eventually(lambda: runs["control"] == 2)
        assert runs["held"] == 1
        info = {w.name: w for w in engine.workers()}["held"]
        assert info.state == "stopped" and info.stopped_by_user
        assert engine.stats().supervised["held"]["state"] == "stopped"

        started = engine.start_worker("held")
        assert started.state == "running" and not started.stopped_by_user
        await eventually(lambda: runs["held"] == 2)
        resumed = rec.of("worker.resumed")
        assert [(e.name, e.state) for e in resumed] == [("held", "running")]
        # starting a worker that is not stopped leaves it alone
        engine.start_worker("held")
        assert len(rec.of("worker.resumed")) == 1
    assert stray_tasks() == set()


def one_worker() -> tuple[Engine, list[int]]:
    """An engine with one supervised worker ``w``, and the list its every start appends to."""
    engine = engine_with(cancel_grace=1.0)
    runs: list[int] = []

    @engine.supervised(name="w")
    async def w(ctx: TaskContext) -> None:
        runs.append(1)
        await forever()

    return engine, runs


async def test_restart_starts_a_stopped_worker() -> None:
    engine, runs = one_worker()
    async with engine:
        await eventually(lambda: runs)
        await engine.stop_worker("w")
        info = await engine.restart_worker("w")
        assert not info.stopped_by_user
        await eventually(lambda: len(runs) == 2)


async def test_a_worker_stopped_before_its_first_step_reads_stopped() -> None:
    # stop_worker straight after start_worker or restart_worker, on the same loop turn
    engine, runs = one_worker()
    rec = Recorder(engine, ("worker.",))
    async with engine:
        await eventually(lambda: runs)
        await engine.stop_worker("w")
        engine.start_worker("w")
        info = await engine.stop_worker("w")
        assert info.state == "stopped" and info.stopped_by_user
        assert engine.stats().supervised["w"]["state"] == "stopped"
        assert [e.reason for e in rec.of("worker.stopped")] == ["user", "user"]

        before = (await engine.restart_worker("w")).started_at
        assert before is not None and before > rec.of("worker.started")[0].ts
        info = await engine.stop_worker("w")
        assert info.state == "stopped"
        assert [e.reason for e in rec.of("worker.stopped")] == ["user", "user", "user"]
        assert runs == [1]  # neither of the two starts took a step
    assert stray_tasks() == set()


async def test_leader_only_worker_restarts_only_on_the_leader_and_a_stop_outlives_leadership() -> None:
    lease = InProcessLease(ttl=2.0, renew_interval=0.1)
    a = engine_with(node_id="a", lease=lease, cancel_grace=1.0)
    b = engine_with(node_id="b", lease=lease, cancel_grace=1.0)
    runs: dict[str, int] = {"a": 0, "b": 0}
    for engine in (a, b):

        async def dedup(ctx: TaskContext, node: str = engine.node_id) -> None:
            runs[node] += 1
            await forever()

        engine.supervised(dedup, name="dedup", leader_only=True)
    try:
        await a.start()
        await eventually(lambda: a.leadership().is_leader and runs["a"] == 1)
        await b.start()
        assert b.workers()[0].state == "waiting_for_leadership"

        rec = Recorder(b, ("worker.",))
        with pytest.raises(WorkerNotLeading) as refused:
            await b.restart_worker("dedup")
        assert isinstance(refused.value, NotLeader)
        assert "'dedup' is leader-only" in str(refused.value) and "'a'" in str(refused.value)
        assert b.workers()[0].state == "waiting_for_leadership" and runs["b"] == 0
        assert rec.events == []

        # on the leader the same restart works
        await a.restart_worker("dedup")
        await eventually(lambda: runs["a"] == 2)

        # stopped on b, it stays stopped when b becomes the leader
        held = await b.stop_worker("dedup")
        assert held.state == "stopped" and held.stopped_by_user
        await a.stop(1.0)
        await eventually(lambda: b.leadership().is_leader, timeout=10.0)
        assert b.workers()[0].state == "stopped" and runs["b"] == 0
        # started there, it runs at once: b leads now
        assert b.start_worker("dedup").state == "running"
        await eventually(lambda: runs["b"] == 1)
    finally:
        await a.stop(1.0)
        await b.stop(1.0)


async def test_start_on_a_follower_waits_for_leadership() -> None:
    lease = InProcessLease(ttl=2.0, renew_interval=0.1)
    a = engine_with(node_id="a", lease=lease)
    b = engine_with(node_id="b", lease=lease)
    for engine in (a, b):
        @engine.supervised(name="dedup", leader_only=True)
        async def dedup(ctx: TaskContext) -> None:
            await forever()

    try:
        await a.start()
        await eventually(lambda: a.leadership().is_leader)
        await b.start()
        rec = Recorder(b, ("worker.",))
        await b.stop_worker("dedup")
        info = b.start_worker("dedup")
        assert info.state == "waiting_for_leadership" and not info.stopped_by_user
        assert [(e.kind, getattr(e, "state", None)) for e in rec.events] == [
            ("worker.stopped", None),
            ("worker.resumed", "waiting_for_leadership"),
        ]
    finally:
        await a.stop(1.0)
        await b.stop(1.0)


async def test_worker_actions_refuse_unknown_names_and_a_stopped_engine() -> None:
    engine = engine_with()

    @engine.supervised(name="real")
    async def real(ctx: TaskContext) -> None:
        await forever()

    rec = Recorder(engine)
    with pytest.raises(EngineNotRunning):
        await engine.restart_worker("real")
    async with engine:
        await eventually(lambda: engine.workers()[0].state == "running")
        before = engine.workers()
        seen = len(rec.events)
        for action in (engine.restart_worker, engine.stop_worker):
            with pytest.raises(UnknownWorker) as unknown:
                await action("ghost")
            assert unknown.value.known == ["real"] and "'ghost'" in str(unknown.value)
        with pytest.raises(UnknownWorker):
            engine.start_worker("ghost")
        assert engine.workers() == before
        assert len(rec.events) == seen


# ---------------------------------------------------------------- queues


async def test_a_paused_queue_accepts_jobs_up_to_its_limit_and_runs_them_once_resumed() -> None:
    engine = engine_with()
    handled: list[int] = []
    other: list[int] = []

    async def handle(job: int) -> None:
        handled.append(job)

    async def handle_other(job: int) -> None:
        other.append(job)

    queue = engine.queue("mail", handle, concurrency=2, maxsize=5)
    control = engine.queue("control", handle_other)
    rec = Recorder(engine, ("queue.",))
    async with engine:
        info = engine.pause_queue("mail")
        assert info.paused
        for i in range(5):
            queue.put_nowait(i)
        with pytest.raises(Exception) as full:
            queue.put_nowait(99)
        assert type(full.value).__name__ == "QueueFull"
        # the other queue's consumers run meanwhile; the paused one's take nothing
        for i in range(20):
            await control.put(i)
        await control.join(2.0)
        assert other == list(range(20))
        info = {q.name: q for q in engine.queues()}["mail"]
        assert handled == [] and info.depth == 5 and info.paused and info.rejected == 1
        assert engine.stats().queues["mail"]["paused"] == 1

        resumed = engine.resume_queue("mail")
        assert not resumed.paused
        await queue.join(2.0)
        assert sorted(handled) == [0, 1, 2, 3, 4]
    kinds = [(e.kind, e.depth) for e in rec.events if e.kind in ("queue.paused", "queue.resumed")]
    assert kinds == [("queue.paused", 0), ("queue.resumed", 5)]


async def test_a_job_being_handled_finishes_when_its_queue_is_paused_or_purged() -> None:
    engine = engine_with()
    release = asyncio.Event()
    started = asyncio.Event()
    handled: list[int] = []

    async def handle(job: int) -> None:
        if job == 0:
            started.set()
            await release.wait()
        handled.append(job)

    queue = engine.queue("jobs", handle, maxsize=100)
    rec = Recorder(engine, ("queue.",))
    async with engine:
        queue.put_nowait(0)
        await started.wait()
        engine.pause_queue("jobs")
        for i in range(1, 8):
            queue.put_nowait(i)
        purge = await engine.purge_queue("jobs")
        assert purge.queue == "jobs" and purge.purged == 7 and purge.from_store == 0
        assert purge.info.depth == 0 and purge.info.purged == 7 and purge.info.in_flight == 1
        release.set()
        await eventually(lambda: handled == [0])
        engine.resume_queue("jobs")
        await queue.put(100)
        await queue.join(2.0)
        assert handled == [0, 100]
        info = engine.queues()[0]
        # nothing disappears silently: accepted = processed + purged
        assert (info.accepted, info.processed, info.purged) == (9, 2, 7)
    purged = rec.of("queue.purged")
    assert [(e.queue, e.purged, e.from_store) for e in purged] == [("jobs", 7, 0)]


async def test_a_paused_queue_does_not_hold_up_the_engines_stop() -> None:
    engine = engine_with()

    async def handle(job: int) -> None:
        return None

    queue = engine.queue("jobs", handle)
    rec = Recorder(engine, ("queue.",))
    await engine.start()
    engine.pause_queue("jobs")
    for i in range(3):
        queue.put_nowait(i)
    await engine.stop(timeout=30.0)
    [left] = rec.of("queue.drain_incomplete")
    assert left.left == 3 and not left.kept
    assert engine.queues()[0].processed == 0
    assert stray_tasks() == set()


async def test_queue_actions_refuse_unknown_names_and_change_nothing() -> None:
    engine = engine_with()

    async def handle(job: int) -> None:
        return None

    engine.queue("real", handle)
    rec = Recorder(engine)
    async with engine:
        engine.get_queue("real").put_nowait(1)
        before = engine.queues()
        seen = len(rec.events)
        for action in (engine.pause_queue, engine.resume_queue):
            with pytest.raises(UnknownQueue) as unknown:
                action("ghost")
            assert unknown.value.known == ["real"]
        with pytest.raises(UnknownQueue):
            await engine.purge_queue("ghost")
        assert engine.queues() == before and len(rec.events) == seen


def stored_jobs(db: Path, queue: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM queue_jobs WHERE queue = ?", (queue,)).fetchone()[0])


async def test_purging_a_durable_queue_removes_its_jobs_from_the_store_for_good(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    store = f"sqlite:///{db}"
    handled: list[int] = []

    async def handle(job: dict[str, int]) -> None:
        handled.append(job["i"])

    engine = engine_with(store=store, node_id="n")
    queue = engine.queue("mail", handle, maxsize=1000)
    engine.pause_queue("mail")
    async with engine:
        for i in range(40):
            await queue.put({"i": i})  # returns once committed
        assert stored_jobs(db, "mail") == 40
        # and some not written yet when the purge comes
        for i in range(40, 50):
            queue.put_nowait({"i": i})
        purge = await engine.purge_queue("mail")
        assert purge.purged == 50 and purge.from_store >= 40
        assert stored_jobs(db, "mail") == 0
    assert stored_jobs(db, "mail") == 0
    assert handled == []

    # a new process on the same file finds nothing to take up
    again = engine_with(store=store, node_id="n")
    second = again.queue("mail", handle, maxsize=1000)
    async with again:
        assert again.queues()[0].adopted == 0
        await second.put({"i": 1000})
        await second.join(5.0)
    assert handled == [1000]
    assert stored_jobs(db, "mail") == 0


async def test_without_a_purge_the_paused_durable_queue_keeps_its_jobs(tmp_path: Path) -> None:
    # the counterpart of the test above: what the purge removes would otherwise come back
    db = tmp_path / "q.db"
    store = f"sqlite:///{db}"
    handled: list[int] = []

    async def handle(job: dict[str, int]) -> None:
        handled.append(job["i"])

    engine = engine_with(store=store, node_id="n")
    queue = engine.queue("mail", handle)
    engine.pause_queue("mail")
    async with engine:
        for i in range(5):
            await queue.put({"i": i})
    assert stored_jobs(db, "mail") == 5
    again = engine_with(store=store, node_id="n")
    second = again.queue("mail", handle)
    async with again:
        assert again.queues()[0].adopted == 5
        await second.join(5.0)
    assert sorted(handled) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------- triggers


async def test_fire_runs_a_key_now_whatever_its_count_and_never_queues_it_twice() -> None:
    engine = engine_with()
    release = asyncio.Event()
    ran: list[str] = []

    async def compile_bank(ctx: TaskContext, key: str) -> None:
        ran.append(key)
        await release.wait()

    trigger = engine.trigger("compile", compile_bank, size_threshold=50)
    rec = Recorder(engine, ("trigger.",))
    async with engine:
        trigger.notify("bank-1", 3)
        fire = engine.fire_trigger("compile", "bank-1")
        assert fire.fired and fire.trigger == "compile" and fire.key == "bank-1" and fire.count == 3
        await eventually(lambda: ran == ["bank-1"])
        # queued or running already: the same run, not a second one
        again = engine.fire_trigger("compile", "bank-1")
        assert not again.fired and again.run_id == fire.run_id and again.running
        [fired] = rec.of("trigger.fired")
        assert (fired.reason, fired.key, fired.run_id, fired.count) == ("manual", "bank-1", fire.run_id, 3)

        # a key never notified can be fired too
        fresh = engine.fire_trigger("compile", "bank-2")
        assert fresh.fired and fresh.count == 0
        release.set()
        await trigger.drain(2.0)
        state = {k.key: k for k in engine.triggers()[0].keys}
        assert state["bank-1"].count == 0 and state["bank-1"].last_status == "succeeded"
        assert state["bank-2"].last_run_at is not None
        assert engine.get(fire.run_id).source == "trigger:compile"
        assert engine.triggers()[0].fired == 2


async def test_fire_refuses_unknown_triggers_bad_keys_and_a_stopped_engine() -> None:
    engine = engine_with()

    async def fn(ctx: TaskContext, key: str) -> None:
        return None

    engine.trigger("compile", fn, size_threshold=5)
    rec = Recorder(engine)
    with pytest.raises(EngineNotRunning):
        engine.fire_trigger("compile", "k")
    async with engine:
        seen = len(rec.events)
        with pytest.raises(UnknownTrigger) as unknown:
            engine.fire_trigger("recompile", "k")
        assert unknown.value.known == ["compile"]
        with pytest.raises(InvalidKey):
            engine.fire_trigger("compile", 42)  # type: ignore[arg-type]
        assert engine.triggers()[0].keys == [] and engine.triggers()[0].fired == 0
        assert len(rec.events) == seen
        assert engine.runs() == [] and engine.stats().submitted_total == 0
