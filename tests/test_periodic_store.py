"""Periodic tasks and what the store knows of them: a task registered on a running engine takes
it up as one registered before the start does (and does not fire before it has), the last run
is read from the store (not the bounded index) at a restart, runs of a task whose opt_in flag
was turned off wait, a resume keeps a fixed-rate grid, a task already disabled is not warned of
again, and late ticks are warned of once a minute, counted exactly all the same.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    PeriodicInfo,
    PeriodicNotRunnable,
    RunStatus,
    SqliteStore,
    TaskContext,
    UnknownTask,
)
from taskwatch.engine import scheduler as scheduler_module

from .helpers import Recorder, eventually, stray_tasks

#: a UNIX time on every grid used here (a multiple of 10 s and of 60 s)
T0 = 1_800_000_000.0


def make_engine(**kwargs: Any) -> Engine:
    kwargs.setdefault("health_interval", None)
    return Engine(**kwargs)


def info(engine: Engine, name: str) -> PeriodicInfo:
    return next(p for p in engine.schedule() if p.name == name)


def frozen(now: list[float]) -> Callable[[], float]:
    return lambda: now[0]


async def never_pruned(**kwargs: Any) -> int:
    return 0


# ---------------------------------------------------------------- registered on a running engine


TRIGGERS = {
    "fixed_rate": {"every": 10.0, "fixed_rate": True},
    "end_based": {"every": 10.0},
    "cron": {"cron": "*/10 * * * * *"},
}


async def fire_once_and_stop(db: Path, options: dict[str, Any]) -> str:
    """A first process fires the task's slot at T0 (the engine's clock frozen there); the id of its run."""
    now = [T0]
    engine = make_engine(store=SqliteStore(db, clock=frozen(now)), clock=frozen(now))

    @engine.periodic(name="job", **options)
    async def job(ctx: TaskContext) -> None: ...

    async with engine:
        p = await eventually(lambda: (p := info(engine, "job")).last_status == "succeeded" and p)
    assert p.last_run_id is not None
    return p.last_run_id


@pytest.mark.parametrize("late", [False, True], ids=["before_start", "after_start"])
@pytest.mark.parametrize("trigger", list(TRIGGERS))
async def test_a_task_registered_on_a_running_engine_shows_its_last_run_and_keeps_its_schedule(
    tmp_path: Path, trigger: str, late: bool
) -> None:
    # restarted 5 s after the slot that fired: nothing is due yet, the last run is the one
    # the store holds, the next slot is the schedule's (not one from the registration)
    options = TRIGGERS[trigger]
    db = tmp_path / "runs.db"
    first_run = await fire_once_and_stop(db, options)
    now = [T0 + 5.0]
    engine = make_engine(store=SqliteStore(db, clock=frozen(now)), clock=frozen(now))

    async def job(ctx: TaskContext) -> None: ...

    if not late:
        engine.periodic(job, name="job", **options)
    async with engine:
        if late:
            engine.periodic(job, name="job", **options)
        p = await eventually(lambda: (p := info(engine, "job")).next_due is not None and p)
        assert (p.next_due, p.runs, p.missed, p.last_run_id, p.last_status) == (
            T0 + 10.0, 0, 0, first_run, "succeeded"
        )
        assert engine.runs(task="job", limit=None)[0].id == first_run
    assert not stray_tasks()


@pytest.mark.parametrize("late", [False, True], ids=["before_start", "after_start"])
@pytest.mark.parametrize("trigger", list(TRIGGERS))
async def test_a_slot_missed_while_stopped_fires_late_and_is_counted_for_a_task_registered_on_a_running_engine(
    tmp_path: Path, trigger: str, late: bool
) -> None:
    # restarted 25 s after the slot that fired: the T0+10 slot fires once, late, at the start,
    # T0+20 is counted missed, and the schedule goes on on its grid (T0+30), or an interval
    # after that late run's end (T0+35) for an end-based interval
    options = TRIGGERS[trigger]
    db = tmp_path / "runs.db"
    first_run = await fire_once_and_stop(db, options)
    now = [T0 + 25.0]
    engine = make_engine(store=SqliteStore(db, clock=frozen(now)), clock=frozen(now))

    async def job(ctx: TaskContext) -> None: ...

    if not late:
        engine.periodic(job, name="job", **options)
    async with engine:
        if late:
            engine.periodic(job, name="job", **options)
        p = await eventually(
            lambda: (p := info(engine, "job")).last_run_id not in (None, first_run) and p.next_due is not None and p
        )
        expected_next = T0 + 35.0 if trigger == "end_based" else T0 + 30.0
        assert (p.next_due, p.runs, p.missed, p.last_status) == (expected_next, 1, 1, "succeeded")
        [run, _] = engine.runs(task="job", limit=None)
        assert run.id == p.last_run_id and run.source == "periodic:job"
    assert not stray_tasks()


def holding_get_periodic(store: SqliteStore) -> tuple[asyncio.Event, asyncio.Event]:
    """Make ``store.get_periodic`` wait for a gate: (entered, gate)."""
    entered, gate = asyncio.Event(), asyncio.Event()
    real = store.get_periodic

    async def held(name: str) -> float | None:
        entered.set()
        await gate.wait()
        return await real(name)

    store.get_periodic = held  # type: ignore[method-assign]
    return entered, gate


async def test_a_task_registered_on_a_running_engine_does_not_fire_before_the_store_told_its_last_slot(
    tmp_path: Path,
) -> None:
    db = tmp_path / "runs.db"
    first_run = await fire_once_and_stop(db, {"every": 10.0})
    now = [T0 + 5.0]
    store = SqliteStore(db, clock=frozen(now))
    engine = make_engine(store=store, clock=frozen(now), flags={"kg": False})
    rec = Recorder(engine, ("periodic.registered",))

    async def job(ctx: TaskContext) -> None: ...

    async with engine:
        entered, gate = holding_get_periodic(store)
        engine.periodic(job, name="job", every=10.0, opt_in="kg")
        await asyncio.wait_for(entered.wait(), 10)
        # while the store is read: its needs met, paused and resumed, it plans no slot (enabled
        # again at once, an end-based interval with no known last run would fire at once)
        engine.set_flag("kg", True)
        engine.pause_periodic("job")
        engine.resume_periodic("job")
        p = info(engine, "job")
        assert (p.next_due, p.paused, p.runs) == (None, False, 0)
        assert rec.of("periodic.registered") == []
        gate.set()
        p = await eventually(lambda: (p := info(engine, "job")).next_due is not None and p)
        # the schedule the store gives: an interval after the last run's end, not now
        assert (p.enabled, p.next_due, p.runs, p.last_run_id) == (True, T0 + 10.0, 0, first_run)
        assert [e.enabled for e in rec.of("periodic.registered")] == [True]
        assert [r.id for r in engine.runs(task="job", limit=None)] == [first_run]
    assert not stray_tasks()


async def test_a_stop_while_a_task_registered_on_the_running_engine_reads_the_store_leaves_no_task(
    tmp_path: Path,
) -> None:
    db = tmp_path / "runs.db"
    await fire_once_and_stop(db, {"every": 10.0, "fixed_rate": True})
    now = [T0 + 5.0]
    store = SqliteStore(db, clock=frozen(now))
    engine = make_engine(store=store, clock=frozen(now))

    async def job(ctx: TaskContext) -> None: ...

    await engine.start()
    entered, _ = holding_get_periodic(store)
    engine.periodic(job, name="job", every=10.0, fixed_rate=True)
    await asyncio.wait_for(entered.wait(), 10)
    await engine.stop()
    assert not stray_tasks()
    assert info(engine, "job").next_due is None
    # started again, it reads the store as any task registered before a start
    del store.get_periodic  # the class's own again
    async with engine:
        p = await eventually(lambda: (p := info(engine, "job")).next_due is not None and p)
        assert (p.next_due, p.runs) == (T0 + 10.0, 0)
    assert not stray_tasks()


# ---------------------------------------------------------------- the last run after a restart


def history_engine(db: Path, now: list[float], *, prune: bool) -> Engine:
    store = SqliteStore(db, clock=frozen(now))
    if not prune:
        # the store's maintenance prunes it to `history` within a second: here, not yet
        store.prune = never_pruned  # type: ignore[method-assign]
    engine = make_engine(store=store, clock=frozen(now), history=2)

    @engine.periodic(every=60.0)
    async def sync_job(ctx: TaskContext) -> None:
        now[0] += 3.0  # a run of 3 s: an end-based interval counts from its end

    @engine.task()
    async def web(ctx: TaskContext) -> None: ...

    return engine


async def run_then_others(engine: Engine, now: list[float]) -> str:
    """The periodic run (T0 to T0+3), then five other runs (ended at T0+4): more than `history`."""
    async with engine:
        # (the next tick is planned a moment after the run's end is heard of)
        p = await eventually(
            lambda: (p := info(engine, "sync_job")).last_status == "succeeded" and p.next_due is not None and p
        )
        assert (p.last_status, p.last_started, p.last_duration, p.next_due) == ("succeeded", T0, 3.0, T0 + 63.0)
        now[0] = T0 + 4.0
        handles = await engine.submit_many([("web", None)] * 5)
        await asyncio.gather(*(h.wait() for h in handles))
    assert p.last_run_id is not None
    return p.last_run_id


async def test_after_a_restart_the_last_run_is_read_from_the_store_not_the_bounded_index(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    now = [T0]
    run_id = await run_then_others(history_engine(db, now, prune=False), now)
    now[0] = T0 + 5.0
    engine = history_engine(db, now, prune=False)
    async with engine:
        assert run_id not in [r.id for r in engine.runs(limit=None)]  # let go by the index
        p = info(engine, "sync_job")
        assert (p.last_run_id, p.last_status, p.last_started, p.last_duration) == (run_id, "succeeded", T0, 3.0)
        # an interval after the run's end, as without the restart; not after its start
        assert p.next_due == T0 + 63.0


async def test_after_a_restart_with_the_last_run_pruned_everywhere_the_interval_counts_from_the_latest_it_ended(
    tmp_path: Path,
) -> None:
    db = tmp_path / "runs.db"
    now = [T0]
    first = history_engine(db, now, prune=True)
    run_id = await run_then_others(first, now)
    async with first.store:
        await first.store.prune(keep=2)
        assert (await first.store.query(task="sync_job")).runs == []
    now[0] = T0 + 5.0
    engine = history_engine(db, now, prune=True)
    async with engine:
        p = info(engine, "sync_job")
        assert p.last_run_id is None and run_id  # known nowhere any more
        # it ended before the oldest run kept (T0+4): never an interval after its start (T0+60),
        # sooner than an interval after its end (T0+63)
        assert p.next_due == T0 + 64.0


# ---------------------------------------------------------------- an opt_in flag turned off


async def test_runs_queued_when_the_opt_in_flag_is_turned_off_wait_as_those_whose_resource_was_withdrawn() -> None:
    engine = make_engine(max_concurrency=1, flags={"kg": True}, resources={"db": "DB"})
    gate = asyncio.Event()
    ran: list[str] = []

    @engine.task()
    async def hog(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.task()
    async def after(ctx: TaskContext) -> None: ...

    @engine.periodic(every=3600.0, opt_in="kg")
    async def by_flag(ctx: TaskContext) -> None:
        ran.append("by_flag")

    @engine.periodic(every=3600.0, requires=("db",))
    async def by_resource(ctx: TaskContext, db: str) -> None:
        ran.append("by_resource")

    engine.pause_periodic("by_flag")
    engine.pause_periodic("by_resource")
    async with engine:
        busy = await engine.submit("hog")
        await eventually(lambda: engine.get(busy.id).status is RunStatus.RUNNING)
        queued = [await engine.run_periodic("by_flag"), await engine.run_periodic("by_resource")]
        engine.set_flag("kg", False)
        engine.withdraw("db")
        done = await engine.submit("after")
        gate.set()
        await done.wait()  # queued after them: the claims went past them
        assert [engine.get(h.id).status for h in queued] == [RunStatus.PENDING] * 2 and ran == []
        # nothing more is queued while it is off: by hand refused, by name no task to submit
        with pytest.raises(PeriodicNotRunnable, match="flag kg is off"):
            await engine.run_periodic("by_flag")
        with pytest.raises(UnknownTask):
            await engine.submit("by_flag")
        engine.set_flag("kg", True)
        await queued[0].wait()
        engine.provide("db", "DB")
        await queued[1].wait()
        assert ran == ["by_flag", "by_resource"]


async def test_a_run_left_in_the_store_waits_when_the_restart_has_its_opt_in_flag_off(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"

    def build(flag: bool, ran: list[str], hold: asyncio.Event | None = None) -> Engine:
        engine = make_engine(store=SqliteStore(db), max_concurrency=1, flags={"kg": flag})

        @engine.task()
        async def hog(ctx: TaskContext) -> None:
            if hold is not None:
                await hold.wait()

        @engine.task()
        async def after(ctx: TaskContext) -> None: ...

        @engine.periodic(every=3600.0, opt_in="kg")
        async def kg_extraction(ctx: TaskContext) -> None:
            ran.append("kg_extraction")

        return engine

    first = build(True, [], asyncio.Event())
    first.pause_periodic("kg_extraction")
    await first.start()
    busy = await first.submit("hog")
    await eventually(lambda: first.get(busy.id).status is RunStatus.RUNNING)
    left = await first.run_periodic("kg_extraction")  # queued behind the hog: pending at the stop
    await first.stop(timeout=0)
    ran: list[str] = []
    second = build(False, ran)
    second.pause_periodic("kg_extraction")
    async with second:
        assert second.get(left.id).status is RunStatus.PENDING
        done = await second.submit("after")  # queued after it: the claims go past it
        await done.wait()
        assert second.get(left.id).status is RunStatus.PENDING and ran == []
        second.set_flag("kg", True)
        assert (await second.handle(left.id).wait()).status is RunStatus.SUCCEEDED
        assert ran == ["kg_extraction"]


# ---------------------------------------------------------------- a resume keeps a fixed-rate grid


@pytest.mark.parametrize(
    ("resumed_at", "next_due"),
    [(T0 + 6.0, T0 + 10.0), (T0 + 14.0, T0 + 20.0), (T0 + 30.0, T0 + 30.0)],
    ids=["before_its_slot", "after_its_slot", "on_a_later_slot"],
)
async def test_a_resume_keeps_a_fixed_rate_grid_as_a_reenable_does(resumed_at: float, next_due: float) -> None:
    now = [T0]
    engine = make_engine(clock=frozen(now), resources={"db": "DB"})

    @engine.periodic(every=10.0, fixed_rate=True)
    async def paused(ctx: TaskContext) -> None: ...

    @engine.periodic(every=10.0, fixed_rate=True, requires=("db",))
    async def disabled(ctx: TaskContext, db: str) -> None: ...

    async with engine:
        for name in ("paused", "disabled"):
            await eventually(lambda: (p := info(engine, name)).runs == 1 and p.next_due == T0 + 10.0)
        now[0] = T0 + 3.0
        engine.pause_periodic("paused")
        db = engine.withdraw("db")
        now[0] = resumed_at
        engine.provide("db", db)
        # the next slot of the grid from then on (at once when then is one), for both
        assert engine.resume_periodic("paused").next_due == next_due
        assert info(engine, "disabled").next_due == next_due


# ---------------------------------------------------------------- a task already disabled


async def test_a_task_already_disabled_whose_reason_changes_is_not_warned_of_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(flags={"kg": False})

    @engine.periodic(every=60.0, requires=("db",), opt_in="kg")
    async def job(ctx: TaskContext, db: object) -> None: ...

    with caplog.at_level(logging.INFO, logger="taskwatch.scheduler"):
        async with engine:
            engine.provide("db", object())  # still disabled, by the flag alone now
            p = info(engine, "job")
            assert (p.enabled, p.reason) == (False, "flag kg is off")
            engine.set_flag("kg", False)
            assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
            engine.set_flag("kg", True)
            assert info(engine, "job").enabled
            engine.withdraw("db")  # newly disabled: that is news
            said = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "taskwatch.scheduler"]
    assert [m for level, m in said if level == "WARNING"] == ["periodic task 'job' disabled: missing resource: db"]
    assert ("INFO", "periodic task 'job' stays disabled: flag kg is off") in said


# ---------------------------------------------------------------- late ticks warned of once a minute


def late_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "taskwatch.scheduler" and r.levelno == logging.WARNING and "late" in r.getMessage()
    ]


async def test_late_ticks_are_warned_of_once_a_minute_and_counted_exactly(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the engine's clock jumps 10.5 s ahead while the loop waits, three times: three late
    # ticks, 10 slots missed each
    jump = 0.0
    engine = make_engine(clock=lambda: time.time() + jump)
    fired: list[float] = []

    @engine.periodic(every=1.0, fixed_rate=True)
    async def tick(ctx: TaskContext) -> None:
        fired.append(time.time())

    async def late_tick(missed: int) -> None:
        nonlocal jump
        jump += 10.5
        await eventually(lambda: info(engine, "tick").missed == missed)

    with caplog.at_level(logging.INFO, logger="taskwatch.scheduler"):
        async with engine:
            await eventually(lambda: info(engine, "tick").last_status == "succeeded")
            for missed in (10, 20, 30):
                await late_tick(missed)
            [first] = late_warnings(caplog)  # the first at once, the next two held back
            assert "fired" in first and "10 slot(s) passed without a run" in first
            # a minute on: the next late tick is warned of, with those held back
            monkeypatch.setattr(scheduler_module, "_LATE_WARNING_EVERY", 0.0)
            await late_tick(40)
            assert len(late_warnings(caplog)) == 2
            assert "2 more late tick(s)" in late_warnings(caplog)[1]
            assert "20 slot(s) passed without a run in all" in late_warnings(caplog)[1]
            monkeypatch.setattr(scheduler_module, "_LATE_WARNING_EVERY", 60.0)
            await late_tick(50)
            await late_tick(60)
            assert len(late_warnings(caplog)) == 2
        # the stop tells those no later warning will
        assert len(late_warnings(caplog)) == 3
        last = late_warnings(caplog)[-1]
        assert "2 more late tick(s)" in last and "20 slot(s) passed without a run in all" in last
    assert info(engine, "tick").missed == 60
