"""Running a periodic task now, by hand: the operator's re-run of a failed nightly job.

One run is queued off the schedule, which stays as it was; a run of the task still
pending or running, a task whose needs are unmet and an unknown name are refused
with typed errors that queue nothing. Through the engine, the background facade,
a real control endpoint and the dashboard's key.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    EngineNotRunning,
    PeriodicInfo,
    PeriodicNotRunnable,
    RemoteEngine,
    RunNotRetryable,
    RunStatus,
    TaskContext,
    UnknownPeriodic,
)
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.widgets import ScheduleTable
from textual.widgets import TabbedContent

from .helpers import Recorder, eventually, stray_tasks
from .raw_client import serve


def make_engine(**options: Any) -> Engine:
    options.setdefault("health_interval", None)
    return Engine(**options)


def info(engine: Engine, name: str) -> PeriodicInfo:
    return next(p for p in engine.schedule() if p.name == name)


def held_backup(engine: Engine, gate: asyncio.Event, *, name: str = "backup", **options: Any) -> list[str]:
    """A nightly periodic task whose runs wait for ``gate``; the ids of the runs that started."""
    started: list[str] = []
    options.setdefault("cron", "0 3 * * *")

    @engine.periodic(name=name, **options)
    async def backup(ctx: TaskContext) -> None:
        started.append(ctx.run_id)
        await gate.wait()

    return started


async def test_a_failed_nightly_run_is_run_again_now_and_the_schedule_stays() -> None:
    engine = make_engine()
    attempts: list[int] = []

    @engine.periodic(cron="0 3 * * *", name="nightly")
    async def nightly(ctx: TaskContext) -> str:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("backup disk full")
        return "saved"

    async with engine:
        due = info(engine, "nightly").next_due
        assert due is not None
        failed = await (await engine.run_periodic("nightly")).wait(2)
        assert failed.status is RunStatus.FAILED and failed.source == "periodic:nightly:manual"
        # retry refuses a periodic task's run, and says what to do instead
        with pytest.raises(RunNotRetryable, match=r"run_periodic\('nightly'\)"):
            await engine.retry(failed.id)
        handle = await engine.run_periodic("nightly")
        record = await handle.wait(2)
        assert record.status is RunStatus.SUCCEEDED and record.result == "saved"
        assert record.source == "periodic:nightly:manual"
        now = info(engine, "nightly")
        # the 03:00 tick is where it was; the runs by hand are counted as the task's runs
        assert now.next_due == due
        assert (now.runs, now.failures, now.last_run_id, now.last_status) == (2, 1, handle.id, "succeeded")


async def test_a_run_going_refuses_another_and_nothing_is_queued() -> None:
    engine = make_engine()
    gate = asyncio.Event()
    started = held_backup(engine, gate)
    async with engine:
        first = await engine.run_periodic("backup")
        # refused while pending, before it started, and while running
        with pytest.raises(PeriodicNotRunnable) as pending:
            await engine.run_periodic("backup")
        assert pending.value.run_id == first.id
        await eventually(lambda: started == [first.id])
        with pytest.raises(PeriodicNotRunnable) as running:
            await engine.run_periodic("backup")
        assert running.value.run_id == first.id and running.value.status == "running"
        assert first.id in str(running.value) and "cancel" in str(running.value)
        assert [r.id for r in engine.runs(task="backup")] == [first.id]
        assert info(engine, "backup").running_run_id == first.id
        gate.set()
        await first.wait(2)
        # once it has finished, the task may be run again
        second = await engine.run_periodic("backup")
        assert (await second.wait(2)).status is RunStatus.SUCCEEDED
    assert not stray_tasks()


async def test_an_unknown_name_is_refused_naming_the_known_ones() -> None:
    engine = make_engine()
    held_backup(engine, asyncio.Event())
    async with engine:
        with pytest.raises(UnknownPeriodic, match="backup"):
            await engine.run_periodic("bakup")
        assert engine.runs() == []


async def test_a_disabled_task_is_refused_with_the_reason_and_runs_once_provided() -> None:
    engine = make_engine()

    @engine.periodic(every=3600.0, name="digest", requires=("redis",))
    async def digest(ctx: TaskContext, redis: str) -> str:
        return redis

    async with engine:
        with pytest.raises(PeriodicNotRunnable) as refused:
            await engine.run_periodic("digest")
        assert refused.value.reason == "missing resource: redis" and refused.value.run_id is None
        assert "missing resource: redis" in str(refused.value)
        assert engine.runs() == []
        engine.provide("redis", "client")
        assert (await (await engine.run_periodic("digest")).wait(2)).result == "client"


async def test_a_paused_task_may_be_run_by_hand_and_stays_paused() -> None:
    engine = make_engine()

    @engine.periodic(every=3600.0, name="tick")
    async def tick(ctx: TaskContext) -> None:
        return None

    async with engine:
        engine.pause_periodic("tick")
        record = await (await engine.run_periodic("tick")).wait(2)
        assert record.status is RunStatus.SUCCEEDED
        now = info(engine, "tick")
        assert now.paused and now.next_due is None


async def test_a_stopped_engine_refuses() -> None:
    engine = make_engine()
    held_backup(engine, asyncio.Event())
    with pytest.raises(EngineNotRunning):
        await engine.run_periodic("backup")


async def test_a_tick_coming_due_while_the_run_by_hand_goes_is_skipped_and_counted() -> None:
    engine = make_engine()
    gate = asyncio.Event()
    started = held_backup(engine, gate, cron=None, every=0.2, initial_delay=0.2)
    skipped = Recorder(engine, ("periodic.skipped",))
    async with engine:
        by_hand = await engine.run_periodic("backup")
        await eventually(lambda: skipped.of("periodic.skipped"))
        assert skipped.of("periodic.skipped")[0].running_run_id == by_hand.id
        assert started == [by_hand.id] and info(engine, "backup").skipped >= 1
        assert [r.id for r in engine.runs(task="backup")] == [by_hand.id]
        gate.set()
        await by_hand.wait(2)
        # the schedule goes on: the end-based interval counts from the end of that run
        await eventually(lambda: len(engine.runs(task="backup")) == 2)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_node_sharing_a_store_refuses_while_another_nodes_run_goes(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # the run is another node's, maybe not taken up by this one: the store is asked
    db = f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    gate = asyncio.Event()
    a = make_engine(store=db, node_id="node-a")
    b = make_engine(store=db, node_id="node-b")
    for engine in (a, b):
        held_backup(engine, gate)
    async with a, b:
        going = await a.run_periodic("backup")
        with pytest.raises(PeriodicNotRunnable) as refused:
            await b.run_periodic("backup")
        assert refused.value.run_id == going.id
        gate.set()
        assert (await going.wait(5)).status is RunStatus.SUCCEEDED


async def test_the_background_engine_blocking_and_awaitable() -> None:
    engine = make_engine()
    gate = asyncio.Event()
    held_backup(engine, gate)
    bg = engine.start_background()
    try:
        handle = await asyncio.to_thread(bg.run_periodic, "backup")
        with pytest.raises(PeriodicNotRunnable):
            await bg.arun_periodic("backup")
        bg.call(lambda e: gate.set())
        assert (await asyncio.to_thread(handle.wait, 5)).source == "periodic:backup:manual"
        again = await bg.arun_periodic("backup")
        assert (await again.finished(5)).status is RunStatus.SUCCEEDED
        with pytest.raises(UnknownPeriodic):
            await asyncio.to_thread(bg.run_periodic, "ghost")
    finally:
        bg.stop(timeout=5)


async def test_over_a_real_control_endpoint(sock_path: str) -> None:
    engine = make_engine()
    gate = asyncio.Event()
    held_backup(engine, gate)

    @engine.periodic(every=3600.0, name="digest", requires=("redis",))
    async def digest(ctx: TaskContext, redis: str) -> None:
        return None

    async with engine:
        server = await serve(engine, sock_path)
        remote = RemoteEngine(server.address)
        await remote.connect()
        try:
            record = await remote.run_periodic("backup")
            assert record.task == "backup" and record.source == "periodic:backup:manual"
            with pytest.raises(PeriodicNotRunnable) as running:
                await remote.run_periodic("backup")
            assert running.value.run_id == record.id  # the typed error, with its fields
            with pytest.raises(PeriodicNotRunnable) as disabled:
                await remote.run_periodic("digest")
            assert disabled.value.reason == "missing resource: redis"
            with pytest.raises(UnknownPeriodic):
                await remote.run_periodic("ghost")
            gate.set()
            assert (await engine.handle(record.id).wait(2)).status is RunStatus.SUCCEEDED
            assert [r.id for r in engine.runs()] == [record.id]
        finally:
            await remote.close()


async def test_the_dashboard_key_runs_the_selected_periodic_task_now() -> None:
    engine = make_engine(node_id="dash-run")
    gate = asyncio.Event()
    held_backup(engine, gate)
    app = TaskwatchApp(LocalClient(engine, manage=True), refresh_hz=30.0, overview_interval=0.2)

    def said(text: str) -> bool:
        return any(text in str(n.message) for n in app._notifications)

    async with app.run_test(size=(140, 42)) as pilot:
        await eventually(lambda: app.state.node_id == "dash-run")
        await pilot.press("n")  # on the Runs tab no periodic task is selected
        await eventually(lambda: said("Scheduler tab"))
        assert engine.runs() == []
        await pilot.press("3")
        assert app.main.query_one(TabbedContent).active == "scheduler"
        schedule = app.main.query_one(ScheduleTable)
        await eventually(lambda: schedule.selected_name == "backup")
        await pilot.press("n")
        [run] = await eventually(lambda: engine.runs(task="backup"))
        assert run.source == "periodic:backup:manual"
        await eventually(lambda: said(f"queued now as run {run.id}"))
        # again while it goes: a warning naming the run, and nothing queued
        await pilot.press("n")
        await eventually(lambda: said(f"its run {run.id} is still"))
        assert [r.id for r in engine.runs(task="backup")] == [run.id]
        gate.set()
        await engine.handle(run.id).wait(2)


async def test_the_scheduler_tab_shows_a_tick_queued_behind_other_runs_as_pending_until_it_starts() -> None:
    engine = make_engine(max_concurrency=1)
    gate, hog_gate = asyncio.Event(), asyncio.Event()
    started = held_backup(engine, gate, cron=None, every=3600, initial_delay=3600)

    @engine.task()
    async def hog(ctx: TaskContext) -> None:
        await hog_gate.wait()

    app = TaskwatchApp(LocalClient(engine, manage=True), refresh_hz=30.0, overview_interval=0.1)
    async with app.run_test(size=(140, 42)) as pilot:
        await eventually(lambda: app.state.node_id == engine.node_id)
        hogging = await engine.submit("hog")
        await eventually(lambda: engine.get(hogging.id).status is RunStatus.RUNNING)
        await engine.run_periodic("backup")
        await pilot.press("3")
        schedule = app.main.query_one(ScheduleTable)
        await eventually(lambda: schedule.shown_keys == ["backup"])
        # the only slot is the hog's: the tick's run waits, and is shown waiting
        await eventually(lambda: schedule.get_cell("backup", "state").plain == "pending")
        assert info(engine, "backup").running_status == "pending" and started == []
        hog_gate.set()
        await eventually(lambda: schedule.get_cell("backup", "state").plain == "running")
        assert len(started) == 1
        gate.set()
        await eventually(lambda: schedule.get_cell("backup", "state").plain == "enabled")
