"""An engine on a durable store: periodic slots across restarts, runs another node executes,
runs left going by a program that ended without a stop, and a process replaced under its
node id.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import sys
import time
from datetime import datetime, timezone
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    EngineNotRunning,
    RunHandle,
    RunRecord,
    RunStatus,
    SqliteStore,
    StoppedBeforeDone,
    TaskContext,
)
from taskwatch.engine.scheduler import next_cron_due

from .helpers import eventually

EVERY = 2.0


def periodic_engine(db: Path, clock: Callable[[], float] = time.time) -> Engine:
    engine = Engine(store=f"sqlite:///{db}", node_id="sched-node", health_interval=None, clock=clock)

    @engine.periodic(every=EVERY, fixed_rate=True)
    async def tick(ctx: TaskContext) -> None:
        return None

    return engine


def ticks(engine: Engine) -> list[RunRecord]:
    return sorted(engine.runs(task="tick", limit=None), key=lambda r: r.created_at)


async def test_a_restart_does_not_fire_the_slot_it_already_fired(tmp_path: Path) -> None:
    db = tmp_path / "sched.db"
    first = periodic_engine(db)
    async with first:
        await eventually(lambda: [r for r in ticks(first) if r.status.finished])
        fired = ticks(first)[0]
    second = periodic_engine(db)
    async with second:
        # the earlier tick is history now; the next one is due a whole interval after it
        await eventually(lambda: len(ticks(second)) >= 2, timeout=EVERY + 5)
        runs = ticks(second)
        assert runs[0].id == fired.id
        assert runs[1].created_at >= fired.created_at + EVERY - 0.05, (runs[1].created_at - fired.created_at)


async def test_a_missed_slot_waits_for_initial_delay_after_a_restart(tmp_path: Path) -> None:
    # the warm-up a task asks for after a start holds after every start, not the first only
    db = tmp_path / "sched.db"
    now = [1_000_000.0]

    def engine_with_delay(delay: float) -> Engine:
        engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None, clock=lambda: now[0])

        @engine.periodic(every=60.0, initial_delay=delay)
        async def warm(ctx: TaskContext) -> None: ...

        return engine

    first = engine_with_delay(0.0)
    async with first:
        await eventually(lambda: [r for r in first.runs(task="warm") if r.status.finished])
    now[0] += 600.0  # ten slots missed while stopped
    second = engine_with_delay(30.0)
    async with second:
        assert [p.next_due for p in second.schedule()] == [1_000_630.0]


@pytest.mark.parametrize(
    "schedule", [{"every": 1.0}, {"every": 1.0, "fixed_rate": True}, {"cron": "* * * * * *"}],
    ids=["end-based", "fixed-rate", "cron"],
)
async def test_a_quick_restart_counts_no_slot_of_its_warm_up_missed(tmp_path: Path, schedule: dict[str, Any]) -> None:
    # a deploy restarts the engine at once; its next slot comes due within the warm-up, not
    # while nothing ran: before, it fired late at the warm-up's end, logged "fired 2 s late",
    # and the dashboard counted the slots in between missed (a cron task off its grid)
    db = tmp_path / "sched.db"

    def warming(delay: float) -> Engine:
        engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)

        @engine.periodic(initial_delay=delay, **schedule)
        async def tick(ctx: TaskContext) -> None: ...

        return engine

    first = warming(0.0)
    async with first:
        await eventually(lambda: [r for r in first.runs(task="tick") if r.status.finished])
    second = warming(3.0)
    started = time.time()
    async with second:
        warm_until = started + 3.0
        [done] = await eventually(
            lambda: [r for r in second.runs(task="tick") if r.created_at > started and r.status.finished], timeout=15
        )
        [info] = second.schedule()
    assert done.created_at >= warm_until - 0.05
    assert info.missed == 0


@pytest.mark.parametrize(
    "schedule", [{"cron": "0 3 * * *"}, {"every": 3600.0, "fixed_rate": True}], ids=["daily cron", "hourly grid"]
)
async def test_a_restart_just_before_a_slot_fires_it_at_the_warm_ups_end(tmp_path: Path, schedule: dict[str, Any]) -> None:
    # restarted ten seconds before its slot, with a 30 s warm-up: the slot fires once the
    # warm-up is over, as it did before a deploy, never skipped to the day (or hour) after
    from taskwatch.engine.store import SqliteStore

    db = tmp_path / "sched.db"
    slot = datetime(2024, 5, 10, 3, 0, tzinfo=timezone.utc).timestamp()
    async with SqliteStore(db) as store:
        await store.set_periodic("tick", slot - (86_400 if "cron" in schedule else 3600))
    now = slot - 10
    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None, clock=lambda: now)

    @engine.periodic(initial_delay=30.0, tz="UTC" if "cron" in schedule else None, **schedule)
    async def tick(ctx: TaskContext) -> None: ...

    async with engine:
        [info] = engine.schedule()
    assert info.next_due == slot + 20  # the warm-up's end


async def test_slots_missed_while_stopped_fire_once(tmp_path: Path) -> None:
    db = tmp_path / "sched.db"
    first = periodic_engine(db)
    async with first:
        await eventually(lambda: [r for r in ticks(first) if r.status.finished])
    # the next start comes 20 intervals later (on its clock): ten missed slots
    later = periodic_engine(db, clock=lambda: time.time() + 20 * EVERY)
    async with later:
        started = later.clock()
        await eventually(lambda: len(ticks(later)) >= 2)
        caught_up = [r for r in ticks(later)[1:] if r.created_at < started + EVERY - 0.05]
        assert len(caught_up) == 1, [r.created_at - started for r in caught_up]


async def test_runs_another_node_executes_finish_in_this_nodes_index_and_waits(tmp_path: Path) -> None:
    from taskwatch.engine import RunStatus

    url = f"sqlite:///{tmp_path / 'shared.db'}"
    options = dict(store=url, health_interval=None, lease_ttl=1.0, poll_interval=0.05)
    a = Engine(node_id="node-a", max_concurrency=1, **options)  # type: ignore[arg-type]
    b = Engine(node_id="node-b", **options)  # type: ignore[arg-type]
    release = asyncio.Event()
    ran_on: dict[str, str] = {}

    @a.task
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    for engine in (a, b):

        @engine.task(name="work")
        async def work(ctx: TaskContext) -> str:
            ran_on[ctx.run_id or ""] = ctx.node_id
            return ctx.node_id

    async with a, b:
        await a.submit("hold")  # a's only slot is taken: b does a's work
        await eventually(lambda: a.stats().running == 1)
        handles = [await a.submit("work") for _ in range(3)]
        records = await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 15)
        assert [r.status for r in records] == [RunStatus.SUCCEEDED] * 3
        assert {ran_on[h.id] for h in handles} == {"node-b"}
        assert [r.result for r in records] == ["node-b"] * 3
        # a's own view agrees: nothing of it is left pending
        await eventually(lambda: a.stats().by_status["pending"] == 0)
        assert all(a.get(h.id).status is RunStatus.SUCCEEDED for h in handles)
        release.set()


async def test_restarting_one_engine_object_on_a_durable_store_keeps_its_counts_true(tmp_path: Path) -> None:
    engine = Engine(store=f"sqlite:///{tmp_path / 'restart.db'}", node_id="again", max_concurrency=1,
                    max_queue=4, health_interval=None)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    await engine.start()
    for _ in range(3):
        await (await engine.submit("quick")).wait(5)
    await engine.submit("hold")
    for _ in range(3):
        await engine.submit("quick")  # wait behind the held slot
    await engine.stop(timeout=0)
    for _ in range(3):
        await engine.start()
        try:
            counts = engine.stats().by_status
            assert counts["succeeded"] == 3
            assert counts["pending"] + counts["running"] == 4, counts
            assert len(engine.runs(limit=None)) == 7
        finally:
            await engine.stop(timeout=0)


def held_engine(db: Path) -> tuple[Engine, asyncio.Event]:
    """An engine with one slot, a ``hold`` task that keeps it until the event is set, and ``quick``."""
    engine = Engine(store=f"sqlite:///{db}", node_id="again", max_concurrency=1, health_interval=None)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    return engine, gate


async def test_a_handle_from_before_a_restart_of_its_engine_sees_the_run_finish(tmp_path: Path) -> None:
    engine, gate = held_engine(tmp_path / "handles.db")
    await engine.start()
    await engine.submit("hold")
    waiting = await engine.submit("quick")  # behind the held slot: still pending at the stop
    await engine.stop(timeout=0)
    gate.set()
    await engine.start()
    try:
        record = await waiting.wait(5)  # the restarted engine runs it; the old handle hears of it
        assert record.status.value == "succeeded"
        assert waiting.record().status.value == "succeeded"
    finally:
        await engine.stop()


async def test_waits_open_at_a_stop_hear_that_their_work_is_kept_for_the_next_start(tmp_path: Path) -> None:
    engine, gate = held_engine(tmp_path / "waits.db")

    async def slow(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    async def handle_job(job: int) -> None: ...

    queue = engine.queue("jobs", handle_job)
    trigger = engine.trigger("compile", slow, size_threshold=1)
    await engine.start()
    await engine.submit("hold")
    pending = await engine.submit("quick")  # behind the held slot: still pending at the stop
    engine.pause_queue("jobs")
    queue.put_nowait(1)
    trigger.notify("bank-1")
    waits = [asyncio.create_task(w) for w in (pending.wait(), queue.join(), trigger.drain())]
    await engine.stop(timeout=0)
    done, _ = await asyncio.wait(waits, timeout=5)
    assert len(done) == 3, "a wait open at the stop was left waiting for good"
    for waited in waits:
        error = waited.exception()
        assert isinstance(error, StoppedBeforeDone) and isinstance(error, EngineNotRunning), error
        assert error.kept and "next start" in str(error)
    with pytest.raises(StoppedBeforeDone, match=pending.id):
        await pending.wait()  # waited after the stop: refused at once too
    with pytest.raises(StoppedBeforeDone):
        await trigger.drain()
    gate.set()
    await engine.start()
    try:
        assert (await pending.wait(5)).status.value == "succeeded"  # the restart runs it
        await trigger.drain(5)
    finally:
        await engine.stop()


async def test_a_cancel_between_a_failed_attempt_and_its_retry_ends_the_run_here_at_once(tmp_path: Path) -> None:
    engine = Engine(store=f"sqlite:///{tmp_path / 'retry.db'}", health_interval=None)
    failed = asyncio.Event()
    kinds: list[str] = []
    engine.bus.add_callback(lambda e: kinds.append(e.kind), kinds=["run."])  # type: ignore[attr-defined]

    @engine.task(retries=2, backoff=30)
    async def flaky(ctx: TaskContext) -> None:
        failed.set()
        raise RuntimeError("try again later")

    async with engine:
        handle = await engine.submit("flaky")
        await failed.wait()
        record = await engine.cancel(handle.id)
        assert record.status.value == "cancelled"
        # this node's index, its waiters and its events agree with the store at once
        assert handle.record().status.value == "cancelled"
        assert (await handle.wait(1)).status.value == "cancelled"
        assert (await engine.store.get(handle.id)).status == "cancelled"
        assert kinds[-1] == "run.cancelled" and kinds.count("run.cancelled") == 1


async def test_history_set_after_construction_holds_for_the_index_and_the_store() -> None:
    engine = Engine(history=100, health_interval=None)

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    engine.history = 3
    async with engine:
        for _ in range(10):
            await (await engine.submit("quick")).wait(5)
        assert len(engine.runs(limit=None)) == 3
        assert engine.stats().by_status["succeeded"] == 3
    with pytest.raises(Exception, match="history"):
        engine.history = -1


async def test_a_heartbeat_crossing_a_finish_is_not_taken_for_a_lost_claim(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # heartbeats every 0.05 s while thousands of runs finish: many cross a finish being written
    engine = Engine(store=f"sqlite:///{tmp_path / 'runs.db'}", node_id="n", health_interval=None,
                    lease_ttl=0.15, max_concurrency=50, max_queue=10_000)

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    async with engine:
        handles = await engine.submit_many([("quick", None)] * 3_000)
        records = [await h.wait(timeout=60) for h in handles]
        assert all(r.status == "succeeded" for r in records)
        assert engine.stats().by_status["running"] == 0
    assert "lost the claim" not in caplog.text


async def test_an_outcome_refused_by_a_busy_file_is_written_once_the_file_is_free(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # another process holds the file's write lock past the store's busy timeout just as a
    # run ends: the outcome waits for the file and is written, not left to recovery
    import sqlite3

    from taskwatch.engine import RunStatus

    db = tmp_path / "busy.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=50", health_interval=None)
    go = asyncio.Event()

    @engine.task
    async def waits(ctx: TaskContext) -> str:
        await go.wait()
        return "written"

    caplog.set_level(logging.INFO, logger="taskwatch.engine")
    async with engine:
        handle = await engine.submit("waits")
        await eventually(lambda: engine.get(handle.id).status is RunStatus.RUNNING)
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            go.set()
            await eventually(lambda: f"writing the outcome of run {handle.id}" in caplog.text, timeout=10)
            assert engine.get(handle.id).status is RunStatus.RUNNING  # nothing reported before the store has it
        finally:
            other.rollback()
            other.close()
        record = await handle.wait(timeout=10)
        assert (record.status, record.result) == (RunStatus.SUCCEEDED, "written")
        stored = await engine.fetch_run(handle.id)
        assert (stored.status, stored.attempt) == (RunStatus.SUCCEEDED, 1)


async def test_an_outcome_write_waits_out_a_busy_file_while_its_claim_holds(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the file stays locked past what a fixed number of tries would wait, but not past the
    # claim's lease: the outcome is written once it is free, and the run never runs twice
    import sqlite3

    db = tmp_path / "busy.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=50", lease_ttl=30, health_interval=None)
    go = asyncio.Event()
    executions: list[int] = []

    @engine.task
    async def waits(ctx: TaskContext) -> str:
        executions.append(ctx.attempt)
        await go.wait()
        return "written"

    caplog.set_level(logging.DEBUG, logger="taskwatch.engine")
    async with engine:
        handle = await engine.submit("waits")
        await eventually(lambda: executions == [1])
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            go.set()
            tries = f"writing the outcome of run {handle.id}:"
            await eventually(lambda: caplog.text.count(tries) >= 10, timeout=20)
        finally:
            other.rollback()
            other.close()
        record = await handle.wait(timeout=10)
        assert (record.status.value, record.attempt, record.result) == ("succeeded", 1, "written")
        assert executions == [1]
    assert "recovery will run it again" not in caplog.text and "refused" not in caplog.text


async def test_a_cancel_before_the_first_step_reaches_a_busy_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a run cancelled between its claim and its first step ends without an attempt; the store
    # must hear so even if the file is locked just then, or the claim, let go unwritten, would
    # be recovered as lost once its lease ran out and the run would execute after all
    import sqlite3

    from taskwatch.engine import RunStatus

    db = tmp_path / "busy.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=50", lease_ttl=3.0, health_interval=None)
    executions: list[int] = []
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    cancels: list[asyncio.Task[object]] = []

    @engine.task
    async def job(ctx: TaskContext) -> str:
        executions.append(ctx.attempt)
        return "ran"

    def on_started(event: object) -> None:
        # another process takes the write lock just as the user cancels, before the first step
        if not cancels:
            other.execute("BEGIN IMMEDIATE")
            cancels.append(asyncio.get_running_loop().create_task(engine.cancel(event.run_id)))  # type: ignore[attr-defined]

    engine.bus.add_callback(on_started, kinds=["run.started"])
    caplog.set_level(logging.INFO, logger="taskwatch.engine")
    try:
        async with engine:
            handle = await engine.submit("job")
            record = await handle.wait(timeout=10)
            assert record.status is RunStatus.CANCELLED
            await eventually(lambda: f"writing the outcome of run {handle.id}:" in caplog.text, timeout=10)
            other.rollback()
            await asyncio.gather(*cancels, return_exceptions=True)  # it may have met the lock too

            async def stored_status() -> RunStatus:
                return (await engine.fetch_run(handle.id)).status

            deadline = asyncio.get_running_loop().time() + 10
            while (status := await stored_status()) is RunStatus.RUNNING:
                assert asyncio.get_running_loop().time() < deadline, "the store still has the run running"
                await asyncio.sleep(0.01)
            stored = await engine.fetch_run(handle.id)
            assert (status, stored.attempt) == (RunStatus.CANCELLED, 1), stored
    finally:
        other.close()
    assert executions == []


@contextlib.asynccontextmanager
async def keyed_run_started_elsewhere(url: str) -> AsyncIterator[tuple[Engine, Engine, RunHandle, asyncio.Event]]:
    """Nodes A and B sharing ``url``: A (its one slot held) submitted a run of ``job`` with
    key ``K``, which B has started; A's index still shows it pending. ``release`` ends them.
    B has one slot too: a run submitted next stays pending until ``release``, whoever polls."""
    options = dict(store=url, health_interval=None, lease_ttl=30, poll_interval=0.05, max_concurrency=1)
    a = Engine(node_id="node-a", **options)  # type: ignore[arg-type]
    b = Engine(node_id="node-b", **options)  # type: ignore[arg-type]
    release = asyncio.Event()

    @a.task
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    for engine in (a, b):

        @engine.task(name="job")
        async def job(ctx: TaskContext) -> None:
            await release.wait()

    async with a, b:
        await a.submit("hold")  # A's only slot: B runs the keyed runs
        await eventually(lambda: a.stats().running == 1)
        first = await a.submit("job", key="K")
        await eventually(lambda: b.stats().running == 1)
        try:
            yield a, b, first, release
        finally:
            release.set()


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_key_whose_run_another_node_started_is_free_for_a_new_submit(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # node A indexes its keyed run as pending until its next catch-up, though node B has
    # started it: the key is free in the store, and A's next submit of it must queue a run
    from taskwatch.engine import RunStatus

    url = f"sqlite:///{tmp_path / 'shared.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    async with keyed_run_started_elsewhere(url) as (a, b, first, release):
        stored = await a.store.get(first.id)
        assert stored is not None and stored.status is RunStatus.RUNNING
        second = await a.submit("job", key="K")
        [again] = await a.submit_many([{"task": "job", "key": "K"}])
        assert second.id != first.id
        assert again.id == second.id  # the new pending run holds the key now
        pending = (await a.store.query(status="pending", task="job")).runs
        assert [r.id for r in pending] == [second.id]
        release.set()
        assert (await second.wait(timeout=20)).status is RunStatus.SUCCEEDED


async def test_a_run_cancelled_while_its_worker_was_lost_ends_cancelled_by_its_user(tmp_path: Path) -> None:
    from taskwatch.engine import RunStatus
    from taskwatch.engine.store import NewRun, SqliteStore

    path = tmp_path / "shared.db"
    # what a node that died mid-run leaves: its claim, which runs out in a moment
    async with SqliteStore(path, lease_ttl=0.3) as dead:
        await dead.register_node("node-b", "dead-incarnation", "x")
        [inserted] = await dead.insert([NewRun("job")])
        [claim] = await dead.claim("node-b", "dead-incarnation", 1, {"job": None})
    engine = Engine(store=f"sqlite:///{path}", node_id="node-a", health_interval=None, lease_ttl=1.0, poll_interval=0.05)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    async with engine:
        record = await engine.cancel(inserted.id)
        # asked of its (dead) owner; the cancel's grace may see recovery end it already
        assert record.status in (RunStatus.RUNNING, RunStatus.CANCELLED)
        # recovered once the dead claim ran out: what was asked for happens, by its user
        await eventually(lambda: engine.get(inserted.id).status is RunStatus.CANCELLED, timeout=10)
        assert engine.get(inserted.id).cancel_reason == "user"
        stored = await engine.store.get(inserted.id)
        assert stored is not None and stored.cancel_reason == "user"


@contextlib.asynccontextmanager
async def _claimed_by_another_node(path: Path, poll_interval: float) -> AsyncIterator[tuple[Engine, Any, str, str]]:
    """An engine on ``path`` (node-a), and a run another node (node-b, a store of its own)
    claimed and executes: yields the engine, that store, the run's id and node-b's claim token."""
    from taskwatch.engine.store import NewRun, SqliteStore

    other = SqliteStore(path)  # another node, executing the run
    await other.open()
    try:
        await other.register_node("node-b", "b-incarnation", "x")
        [inserted] = await other.insert([NewRun("job")])
        [claim] = await other.claim("node-b", "b-incarnation", 1, {"job": None})
        engine = Engine(store=f"sqlite:///{path}", node_id="node-a", health_interval=None, poll_interval=poll_interval)

        @engine.task
        async def job(ctx: TaskContext) -> None:
            await asyncio.Event().wait()

        async with engine:
            yield engine, other, inserted.id, claim.token
    finally:
        await other.close()


async def test_cancelling_a_run_another_node_finished_meanwhile_says_it_finished(tmp_path: Path) -> None:
    from taskwatch.engine import RunNotCancellable
    from taskwatch.engine.store import Succeeded

    async with _claimed_by_another_node(tmp_path / "shared.db", poll_interval=60) as (engine, other, run_id, token):
        assert engine.get(run_id).status.value == "running"  # on node-b, as loaded at start
        assert await other.finish(token, Succeeded("done")) is not None
        with pytest.raises(RunNotCancellable, match="succeeded"):
            await engine.cancel(run_id)
        stored = await engine.store.get(run_id)
        assert stored is not None and stored.status.value == "succeeded" and stored.cancel_reason is None


@pytest.mark.parametrize("ending", ["succeeded", "failed"])
async def test_a_cancel_asked_while_the_runs_outcome_was_on_its_way_says_it_finished(
    ending: str, tmp_path: Path
) -> None:
    # the run's node had its outcome on the way (a write waiting on a busy file, or a node that
    # had not heard of the request yet) when the cancel was asked: before, cancel() returned the
    # succeeded record as if it had cancelled it, and the row kept cancel_reason 'user' for a
    # run that ran to its end (the node that ran it said None)
    from taskwatch.engine import RunError, RunNotCancellable
    from taskwatch.engine.store import Failed, Succeeded

    async with _claimed_by_another_node(tmp_path / "shared.db", poll_interval=0.05) as (engine, other, run_id, token):
        cancelling = asyncio.create_task(engine.cancel(run_id, grace=30))
        async with asyncio.timeout(10):  # the request is in the store
            while (row := await other.get(run_id)) is None or row.cancel_reason != "user":
                await asyncio.sleep(0.01)
        outcome = Succeeded("done") if ending == "succeeded" else Failed(RunError(type="ValueError", message="no"))
        assert await other.finish(token, outcome) is not None
        with pytest.raises(RunNotCancellable, match=ending):
            await cancelling
        stored = await engine.store.get(run_id)
        assert stored is not None and (stored.status.value, stored.cancel_reason) == (ending, None)
        assert engine.get(run_id).cancel_reason is None


async def test_a_submit_given_up_while_the_store_writes_still_indexes_and_announces_the_run(tmp_path: Path) -> None:
    # a control client that disconnects, or a timeout around submit(), cancels the submit
    # while the store commits it: the run lands in the store all the same, and must not go
    # unannounced and uncounted here

    from taskwatch.engine import RunStatus

    from .helpers import Recorder

    path = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{path}", node_id="node-a", health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> str:
        return "done"

    recorder = Recorder(engine, ("run.submitted",))
    async with engine:
        submitting = asyncio.create_task(engine.submit("job"))
        await asyncio.sleep(0)  # one turn: the submit hands its row to the store's writer
        # the loop is held until the row is committed, so the writer's answer is on its way
        # when the caller gives up, as when a timeout runs out during the commit
        with contextlib.closing(sqlite3.connect(path)) as reader:
            deadline = time.monotonic() + 10
            while reader.execute("SELECT id FROM runs").fetchone() is None:
                assert time.monotonic() < deadline, "the submit's row was never committed"
                time.sleep(0.002)
        submitting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await submitting
        [event] = await eventually(lambda: recorder.of("run.submitted"), timeout=10)
        record = await engine.wait_for(event.run_id, timeout=10)
        assert record.status is RunStatus.SUCCEEDED and record.result == "done"
        assert engine.stats().submitted_total == 1


async def test_progress_an_older_version_stored_as_infinity_does_not_stop_a_start(tmp_path: Path) -> None:
    # older taskwatch took ctx.progress(float("inf")) and stored it; the file must still open

    path = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{path}", node_id="n", health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        await ctx.progress(1, 2)

    async with engine:
        done = await (await engine.submit("job")).wait(5)
        other = await (await engine.submit("job")).wait(5)
    with sqlite3.connect(path) as conn:  # what the older version wrote
        # (SQLite keeps infinities; a NaN it cannot keep, PostgreSQL could)
        conn.execute("UPDATE runs SET progress_done = 9e999, progress_total = -9e999 WHERE id = ?", (done.id,))
        conn.execute("UPDATE runs SET progress_total = 9e999 WHERE id = ?", (other.id,))
    again = Engine(store=f"sqlite:///{path}", node_id="n", health_interval=None)
    again.task(name="job")(job)
    async with again:
        for run_id in (done.id, other.id):
            progress = again.get(run_id).progress
            assert (progress.done, progress.total) in ((0.0, None), (1.0, None)), progress
        assert len(again.runs(limit=None)) == 2


async def test_submit_nowait_with_a_key_lets_a_shared_store_decide(tmp_path: Path) -> None:
    from taskwatch.engine import RunStatus

    async with keyed_run_started_elsewhere(f"sqlite:///{tmp_path / 'shared.db'}") as (a, b, first, release):
        # B started it, which freed the key: a new run, though A's index still says pending
        second = a.submit_nowait("job", key="K")
        assert second.id != first.id
        assert a.submit_nowait("job", key="K").id == second.id  # not written yet: A knows
        stored = None

        async def written() -> bool:
            nonlocal stored
            stored = await a.store.get(second.id)
            return stored is not None

        for _ in range(500):
            if await written():
                break
            await asyncio.sleep(0.01)
        assert stored is not None and stored.status is RunStatus.PENDING
        # written and pending now: the store's write of a third finds the key held, and says so
        third = a.submit_nowait("job", key="K")
        record = await third.wait(timeout=10)
        assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "key_held")
        assert record.error is not None and record.error.type == "KeyHeld" and second.id in record.error.message
        release.set()


CANCEL_THEN_DIE = r"""
import asyncio, sys
from taskwatch.engine import Engine, TaskContext

async def main(db):
    engine = Engine(store=f"sqlite:///{db}", node_id="n1", health_interval=None)
    running = asyncio.Event()

    @engine.task
    async def slow(ctx: TaskContext) -> str:
        running.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.shield(asyncio.Event().wait())  # a cleanup the kill cuts short
            raise
        return "done"

    async with engine:
        handle = await engine.submit("slow")
        await running.wait()
        record = await engine.cancel(handle.id, grace=0.05)
        print(handle.id, record.status.value, flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


async def killed_after_its_first_line(script: str, db: Path) -> str:
    """Run ``script`` on ``db`` in a child process; its first line, once it is dead by SIGKILL
    (its own, or this one's right after the line)."""
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(db), stdout=asyncio.subprocess.PIPE)
    try:
        assert child.stdout is not None
        async with asyncio.timeout(30):
            line = (await child.stdout.readline()).decode()
    finally:
        if child.returncode is None:
            # os.kill, not child.send_signal: that polls first, and a child that killed itself
            # a moment ago would be reaped there, behind asyncio's back (which then reports 255)
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.pid, signal.SIGKILL)
        async with asyncio.timeout(30):
            assert await child.wait() == -signal.SIGKILL
    return line


async def test_a_cancel_of_a_run_executing_here_survives_a_crash_during_its_cleanup(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    run_id, status = (await killed_after_its_first_line(CANCEL_THEN_DIE, db)).split()
    assert status == "running"  # still cleaning up after its grace, as cancel() documents
    # the same node starts again: the run it was cancelling is not run again, it ends cancelled
    engine = Engine(store=f"sqlite:///{db}", node_id="n1", health_interval=None)
    attempts: list[int] = []

    @engine.task
    async def slow(ctx: TaskContext) -> str:
        attempts.append(ctx.attempt)
        return "done"

    async with engine:
        record = await engine.wait_for(run_id, timeout=10)
    assert (record.status.value, record.cancel_reason, attempts) == ("cancelled", "user", [])


DIE_AS_A_SLOT_FIRES = r"""
import asyncio, os, signal, sys
from taskwatch.engine import Engine, TaskContext

async def main(db):
    engine = Engine(store=f"sqlite:///{db}", node_id="n1", health_interval=None)

    @engine.periodic(every=3600.0, name="hourly")
    async def hourly(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    def die(event) -> None:
        # the moment the engine says the slot's run exists
        print(event.run_id, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    engine.bus.add_callback(die, ["run.submitted"])
    async with engine:
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1]))
"""


async def test_a_crash_as_a_periodic_slot_fires_does_not_lose_that_slots_run(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    run_id = (await killed_after_its_first_line(DIE_AS_A_SLOT_FIRES, db)).strip()
    # the slot counts as fired (an hourly task does not fire again on restart): its run must be there
    engine = Engine(store=f"sqlite:///{db}", node_id="n1", health_interval=None)
    ran: list[str] = []

    @engine.periodic(every=3600.0, name="hourly")
    async def hourly(ctx: TaskContext) -> None:
        ran.append(ctx.run_id)

    async with engine:
        record = await engine.wait_for(run_id, timeout=10)
        [info] = engine.schedule()
    assert record.status.value == "succeeded" and ran == [run_id]
    assert info.next_due is not None and info.next_due > time.time() + 3000  # no second run for the slot


async def test_a_cancel_waits_its_grace_not_a_busy_file(tmp_path: Path) -> None:
    # the request is also written to the store; a file another process holds locked must not
    # stretch the cancel past its grace (the write lands once the file is free)

    from taskwatch.engine import RunStatus

    db = tmp_path / "busy.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=60000", health_interval=None)
    cleaning = asyncio.Event()
    done = asyncio.Event()

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await done.wait()  # a long cleanup
            raise

    async with engine:
        handle = await engine.submit("slow")
        await eventually(lambda: engine.get(handle.id).status is RunStatus.RUNNING)
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            async with asyncio.timeout(20):  # the store would keep the request waiting 60 s
                record = await engine.cancel(handle.id, grace=0.05)
            assert record.status is RunStatus.RUNNING and cleaning.is_set()
        finally:
            other.rollback()
            other.close()
        done.set()
        record = await handle.wait(timeout=10)
        assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "user")


@pytest.mark.parametrize("given", ["instance", "url"])
async def test_the_stores_lease_sets_the_heartbeat_whereever_it_is_given(given: str, tmp_path: Path) -> None:
    # a 0.6 s lease renewed every third of the engine's default 30 s would lapse under a long run
    from taskwatch.engine import RunStatus
    from taskwatch.engine.store import SqliteStore

    db = tmp_path / "runs.db"
    store = SqliteStore(db, lease_ttl=0.6) if given == "instance" else f"sqlite:///{db}?lease_ttl=0.6"
    engine = Engine(store=store, health_interval=None)
    assert engine.lease_ttl == 0.6

    @engine.task
    async def long(ctx: TaskContext) -> int:
        await asyncio.sleep(2.0)  # the work: several leases long
        return ctx.attempt

    async with engine:
        record = await (await engine.submit("long")).wait(timeout=20)
    assert (record.status, record.result, record.attempt) == (RunStatus.SUCCEEDED, 1, 1)


def test_a_lease_given_to_the_engine_and_otherwise_to_its_store_is_refused(tmp_path: Path) -> None:
    from taskwatch.engine import InvalidConfiguration
    from taskwatch.engine.store import SqliteStore

    with pytest.raises(InvalidConfiguration, match="give it in one place"):
        Engine(store=SqliteStore(tmp_path / "a.db", lease_ttl=5.0), lease_ttl=10.0)
    with pytest.raises(InvalidConfiguration, match="run store sqlite:///.*give it in one place"):
        Engine(store=f"sqlite:///{tmp_path / 'b.db'}?lease_ttl=5", lease_ttl=10.0)
    same = Engine(store=f"sqlite:///{tmp_path / 'c.db'}?lease_ttl=5", lease_ttl=5.0, health_interval=None)
    assert same.lease_ttl == 5.0


async def test_a_start_says_so_when_pending_runs_are_of_a_task_it_no_longer_has(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    before = Engine(store=url, node_id="n1", max_concurrency=1, health_interval=None)
    release = asyncio.Event()

    @before.task
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    @before.task
    async def old_task(ctx: TaskContext) -> None: ...

    await before.start()
    busy = await before.submit("hold")  # the one slot: what comes next waits
    await eventually(lambda: before.get(busy.id).status.value == "running")
    waiting = [await before.submit("old_task") for _ in range(3)]
    await before.stop(timeout=0)  # hold is cut short: pending again, as the rest
    # the next version of the code has neither task
    after = Engine(store=url, node_id="n1", health_interval=None)
    caplog.set_level("INFO", logger="taskwatch.engine")
    async with after:
        said = [r.getMessage() for r in caplog.records if "does not run" in r.getMessage()]
        assert len(said) == 1 and "4 pending run(s)" in said[0] and "('old_task': 3, 'hold': 1)" in said[0]
        assert [r.levelname for r in caplog.records if "does not run" in r.getMessage()] == ["WARNING"]
        assert [after.get(h.id).status.value for h in [busy, *waiting]] == ["pending"] * 4  # kept, not failed


async def test_a_restart_shows_the_periodic_tasks_run_still_going_and_then_its_last_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    release = asyncio.Event()

    def engine_with_digest() -> Engine:
        engine = Engine(store=url, node_id="n1", health_interval=None)

        @engine.periodic(every=3600.0, name="digest")
        async def digest(ctx: TaskContext) -> str:
            await release.wait()
            return "digested"

        return engine

    def shown(engine: Engine) -> tuple[str | None, str | None, str | None]:
        info = next(p for p in engine.schedule() if p.name == "digest")
        return info.running_run_id, info.last_run_id, info.last_status

    first = engine_with_digest()
    await first.start()
    await eventually(lambda: shown(first)[0] is not None)
    going = shown(first)[0]
    await first.stop(timeout=0)  # cut short: pending again, for the next start
    second = engine_with_digest()
    async with second:
        # shown going from the start (it is taken up again at once), not only once a slot finds it
        assert shown(second) == (going, None, None)
        release.set()
        await eventually(lambda: shown(second) == (None, going, "succeeded"))
    third = engine_with_digest()
    async with third:
        assert shown(third) == (None, going, "succeeded")  # the last run, as the store has it


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_finished_runs_last_progress_is_kept_in_the_store(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # heartbeats write progress only every third of the lease: a run that reports and ends
    # between two of them must still leave its last report in the store, for other nodes and
    # for the next start; a run that reported nothing keeps none
    url = f"sqlite:///{tmp_path / 'progress.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")

    def make() -> Engine:
        engine = Engine(store=url, node_id="p", health_interval=None, lease_ttl=60)

        @engine.task
        async def chunks(ctx: TaskContext) -> int:
            for i in range(1, 6):
                await ctx.progress(i, 5, f"chunk {i}/5")
            return 5

        @engine.task
        async def broken(ctx: TaskContext) -> None:
            await ctx.progress(2, 4, "half way")
            raise RuntimeError("gave up half way")

        @engine.task
        async def quiet(ctx: TaskContext) -> None:
            return None

        return engine

    async with make() as first:
        done = await (await first.submit("chunks")).wait(timeout=20)
        failed = await (await first.submit("broken")).wait(timeout=20)
        silent = await (await first.submit("quiet")).wait(timeout=20)
    async with make() as again:
        for run, (d, t, message) in [(done, (5, 5, "chunk 5/5")), (failed, (2, 4, "half way")), (silent, (0, None, ""))]:
            stored = await again.fetch_run(run.id)
            assert (stored.progress.done, stored.progress.total, stored.progress.message) == (d, t, message), stored
        assert (await again.fetch_run(failed.id)).status.value == "failed"


async def test_a_missed_cron_slot_fires_once_across_nodes_started_apart(tmp_path: Path) -> None:
    # two nodes start with the store's last fire two days old: each waits out its own
    # initial_delay after its start, and the missed 03:00 slot they both find fires once
    from taskwatch.engine.store import SqliteStore

    db = tmp_path / "cron.db"
    two_days_ago = time.time() - 2 * 86_400
    async with SqliteStore(db) as store:
        last = next_cron_due("0 3 * * *", two_days_ago - 86_400)
        assert await store.claim_periodic("nightly", last)

    def node(name: str) -> Engine:
        engine = Engine(store=f"sqlite:///{db}", node_id=name, health_interval=None)

        @engine.periodic(cron="0 3 * * *", initial_delay=0.3)
        async def nightly(ctx: TaskContext) -> None: ...

        return engine

    a, b = node("a"), node("b")
    async with a:
        async with b:  # started after a: its warm-up ends later
            # each has had its go at the missed slot once it waits for the coming one (at any
            # hour of the day: an hour ahead is not always "the next day's")
            upcoming = next_cron_due("0 3 * * *", time.time())
            await eventually(
                lambda: all((e.schedule()[0].next_due or 0) >= upcoming - 1 for e in (a, b)), timeout=10
            )
            fired = (await a.query_runs(task="nightly", limit=10)).runs
            assert len(fired) == 1, [(r.node, r.created_at) for r in fired]


async def test_a_run_recovered_from_under_its_own_node_stops_there_and_its_next_attempt_runs_on(
    tmp_path: Path,
) -> None:
    # the wall clock steps forward past the lease while a run executes (NTP, a resumed VM): the
    # node's own sweep takes the run's claim back and claims it again. The attempt still running
    # is over and must stop; the new one must run on (it was the one cancelled, and the run
    # executed a third time)
    offset = [0.0]
    armed = [False]

    def clock() -> float:
        # the step lands between the node's own heartbeat and its recovery sweep (a step before
        # the heartbeat only renews the claim): the sweep is the first reader to see it
        if armed[0] and "recover" in (sys._getframe(1).f_code.co_name, sys._getframe(2).f_code.co_name):
            armed[0], offset[0] = False, 100.0
        return time.time() + offset[0]

    engine = Engine(
        store=f"sqlite:///{tmp_path / 'runs.db'}", node_id="n", lease_ttl=1.0, health_interval=None, clock=clock
    )
    starts: asyncio.Queue[int] = asyncio.Queue()
    cancelled: list[int] = []
    release = asyncio.Event()

    @engine.task
    async def work(ctx: TaskContext) -> int:
        starts.put_nowait(ctx.attempt)
        try:
            await release.wait()
        except asyncio.CancelledError:
            cancelled.append(ctx.attempt)  # its own attempt's number, not the one replacing it
            raise
        return ctx.attempt

    async with engine:
        handle = await engine.submit("work")
        assert await asyncio.wait_for(starts.get(), 10) == 1
        armed[0] = True
        assert await asyncio.wait_for(starts.get(), 10) == 2
        await eventually(lambda: cancelled == [1], timeout=10)
        release.set()
        record = await handle.wait(timeout=10)
    assert (record.status.value, record.attempt, record.result) == ("succeeded", 2, 2)
    assert cancelled == [1] and starts.empty()


# ---------------------------------------------------------------- a program that ends without stop()

_ENDS_WITHOUT_STOP = """
import asyncio, sys
from taskwatch.engine import Engine, TaskContext

engine = Engine(store=sys.argv[1], node_id="w1", health_interval=None)

@engine.task(name="long")
async def long(ctx: TaskContext) -> None:
    await asyncio.Event().wait()

async def main() -> None:
    await engine.start()  # no `async with`, and no stop(): main() fails first
    handles = [await engine.submit("long") for _ in range(4)]
    while any(engine.get(h.id).status != "running" for h in handles):
        await asyncio.sleep(0.005)
    print(" ".join(h.id for h in handles), flush=True)
    raise RuntimeError("a bug elsewhere in the program")

asyncio.run(main())
"""


async def test_runs_going_when_a_program_ends_without_stop_are_run_again_not_cancelled(tmp_path: Path) -> None:
    # asyncio.run's end cancels every task: no one cancelled those runs, and a kill -9 at the
    # same moment would have left them to run again
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _ENDS_WITHOUT_STOP, url], capture_output=True, text=True, timeout=60
    )
    assert "a bug elsewhere in the program" in done.stderr, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 4
    engine = Engine(store=url, node_id="w1", health_interval=None)

    @engine.task(name="long")
    async def long(ctx: TaskContext) -> int:
        return ctx.attempt

    async with engine:
        records = [await asyncio.wait_for(engine.handle(i).wait(), 10) for i in ids]
    assert [(r.status, r.result) for r in records] == [(RunStatus.SUCCEEDED, 2)] * 4


# ---------------------------------------------------------------- what a superseded process says it stopped


async def test_a_process_replaced_under_its_node_id_names_the_runs_it_stopped(tmp_path: Path) -> None:
    # the newer process recovers the older one's claims at its start, so the older one's next
    # heartbeat finds them lost and learns it was replaced at once: they are still its runs
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    old = Engine(store=url, node_id="same", lease_ttl=1.0, health_interval=None)
    new = Engine(store=url, node_id="same", lease_ttl=1.0, health_interval=None)
    for engine in (old, new):

        @engine.task(name="long")
        async def long(ctx: TaskContext) -> None:
            await asyncio.Event().wait()

    said: list[Any] = []
    old.bus.add_callback(said.append, ["node.superseded"])
    async with old:
        ids = [(await old.submit("long")).id for _ in range(3)]
        await eventually(lambda: all(old.get(i).status is RunStatus.RUNNING for i in ids))
        async with new:
            await eventually(lambda: said, 10)
            assert sorted(said[0].stopped) == sorted(ids)
            await new.stop(0.1)
        await old.stop(0.1)


class SlowReads(SqliteStore):
    """A store whose ``get_many`` is held before it reads and again before it answers, as a
    busy database holds a query: the answer reaches the engine later than the state it read."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read, self.answer = asyncio.Event(), asyncio.Event()
        self.reading, self.has_read = asyncio.Event(), asyncio.Event()

    async def get_many(self, run_ids: Any) -> Any:
        self.reading.set()
        await self.read.wait()
        rows = await super().get_many(run_ids)
        self.has_read.set()
        await self.answer.wait()
        return rows


async def test_a_stale_read_of_a_run_this_node_ran_meanwhile_does_not_move_it_back(tmp_path: Path) -> None:
    # a look at the store for a run still pending (fetch_run, or the index's catch-up with other
    # nodes) can answer after this node claimed it, ran an attempt and put it back for a retry:
    # what it read (running, attempt 1) is older than what this node knows (pending, attempt 2)
    store = SlowReads(tmp_path / "runs.db")
    engine = Engine(store=store, node_id="n", max_concurrency=1, poll_interval=0.02, health_interval=None)
    slot, first_attempt, fail = asyncio.Event(), asyncio.Event(), asyncio.Event()
    started: list[tuple[str, int]] = []
    engine.bus.add_callback(lambda e: started.append((e.run_id, e.attempt)), ["run.started"])

    @engine.task
    async def blocker(ctx: TaskContext) -> None:
        await slot.wait()

    @engine.task(retries=1, backoff=60.0)
    async def flaky(ctx: TaskContext) -> None:
        first_attempt.set()
        await fail.wait()
        raise RuntimeError("the first attempt fails")

    async with engine:
        held = await engine.submit("blocker")
        await eventually(lambda: held.status is RunStatus.RUNNING)
        handle = await engine.submit("flaky")  # pending: the only slot is taken
        looking = asyncio.create_task(engine.fetch_run(handle.id))
        await store.reading.wait()
        slot.set()
        await first_attempt.wait()
        store.read.set()
        await store.has_read.wait()  # it read the run running its first attempt
        fail.set()
        await eventually(lambda: engine.get(handle.id).attempt == 2)  # pending for its retry
        store.answer.set()
        record = await looking
        assert (record.status, record.attempt) == (RunStatus.PENDING, 2)
        assert (engine.get(handle.id).status, engine.get(handle.id).attempt) == (RunStatus.PENDING, 2)
        assert [attempt for run_id, attempt in started if run_id == handle.id] == [1]
        await engine.cancel(handle.id)


async def test_runs_kept_for_a_task_registered_after_the_start_run_once_it_is(tmp_path: Path) -> None:
    # a notebook's order: the engine's cell, then the tasks' (after a kernel restart that
    # left runs pending in the file)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    first = Engine(store=db, health_interval=None)
    never = asyncio.Event()

    @first.task
    async def report(ctx: TaskContext) -> str:
        await never.wait()
        return "first"

    async with first:
        kept = (await first.submit("report")).id
        await first.stop(timeout=0)  # cut short: back to pending, in the file

    second = Engine(store=db, health_interval=None)
    async with second:
        assert (await second.fetch_run(kept)).status is RunStatus.PENDING

        @second.task(name="report")
        async def report_again(ctx: TaskContext) -> str:
            return "second"

        record = await second.handle(kept).wait(10)
    assert record.status is RunStatus.SUCCEEDED and record.result == "second"


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_run_that_succeeds_on_another_node_after_a_failed_attempt_keeps_that_error(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # as it is kept on the node where the attempt failed: every node gives the same record
    from taskwatch.engine import RunStatus

    url = f"sqlite:///{tmp_path / 'shared.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    options = dict(store=url, health_interval=None, poll_interval=0.05)
    a = Engine(node_id="node-a", max_concurrency=1, **options)  # type: ignore[arg-type]
    b = Engine(node_id="node-b", **options)  # type: ignore[arg-type]
    release = asyncio.Event()

    @a.task
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    @a.task(name="upload", retries=3, backoff=1.0)
    async def accepted(ctx: TaskContext) -> str:
        return ctx.node_id

    @b.task(name="upload", retries=3, backoff=1.0)
    async def refused(ctx: TaskContext) -> str:
        raise ConnectionError(f"refused on {ctx.node_id}, attempt {ctx.attempt}")

    async with a:
        await a.submit("hold")  # a's only slot is taken: b takes the first attempt
        await eventually(lambda: a.stats().running == 1)
        handle = await a.submit("upload")
        async with b, asyncio.timeout(10):
            while (await a.store.get(handle.id)).error is None:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        # b stopped before the retry was due: a runs it
        release.set()
        record = await handle.wait(timeout=20)
        assert record.status is RunStatus.SUCCEEDED and record.result == "node-a"
        stored = await a.store.get(handle.id)
        assert stored is not None and stored.error is not None and "on node-b" in stored.error.message
        assert record.error == a.get(handle.id).error == stored.error


async def test_a_submit_given_up_on_while_another_process_holds_the_file_is_not_written(tmp_path: Path) -> None:
    # the caller's wait_for ran out while the store waited for the file's lock: it was told
    # nothing was submitted, so the run must not be written (and run) once the lock is let go
    db = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=30000", health_interval=None)
    executions: list[str] = []

    @engine.task
    async def job(ctx: TaskContext) -> str:
        executions.append(ctx.run_id)
        return "ran"

    async with engine:
        other = sqlite3.connect(db, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(engine.submit("job"), 0.3)
        finally:
            other.rollback()
            other.close()
        # the store's writer takes operations in order: this one is written after the other's turn
        after = await engine.submit("job")
        assert (await after.wait(timeout=10)).status is RunStatus.SUCCEEDED
        assert [run.id for run in engine.runs(limit=None)] == [after.id]
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT id FROM runs").fetchall() == [(after.id,)]
    assert executions == [after.id]
