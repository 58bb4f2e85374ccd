"""Periodic tasks at their edges: bad options, needs that change at run time, restarts,
pauses across a stop, slots missed while the loop was held up, DST and the cron forms."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, InvalidConfiguration, PeriodicInfo, TaskContext
from taskwatch.engine.scheduler import next_cron_due

from .helpers import Recorder, eventually, stray_tasks


def make_engine(**kwargs: Any) -> Engine:
    kwargs.setdefault("health_interval", None)
    return Engine(**kwargs)


def info(engine: Engine, name: str) -> PeriodicInfo:
    return next(p for p in engine.schedule() if p.name == name)


# ---------------------------------------------------------------- options checked before anything is recorded


@pytest.mark.parametrize("opt_in", [5, ["kg"], "", b"kg"], ids=["int", "list", "empty", "bytes"])
async def test_a_bad_opt_in_is_refused_and_registers_nothing(opt_in: object) -> None:
    engine = make_engine(flags={"kg": True})

    @engine.periodic(every=0.05)
    async def good(ctx: TaskContext) -> None: ...

    async def f(ctx: TaskContext) -> None: ...

    with pytest.raises(InvalidConfiguration, match=r"opt_in=.*the name of a flag in Engine\(flags=\.\.\.\)"):
        engine.periodic(f, every=60, opt_in=opt_in)  # type: ignore[arg-type]
    assert "f" not in engine.tasks() and [p.name for p in engine.schedule()] == ["good"]
    engine.snapshot()  # a half-registered task broke every snapshot
    # the corrected call goes through (no "already registered")
    engine.periodic(f, every=60, opt_in="kg")
    assert info(engine, "f").opt_in == "kg"
    async with engine:
        await eventually(lambda: info(engine, "good").runs >= 1)
        assert info(engine, "f").enabled


async def test_options_given_as_text_are_kept_as_numbers_and_fixed_rate_must_be_a_bool() -> None:
    engine = make_engine()

    async def f(ctx: TaskContext) -> None: ...

    with pytest.raises(InvalidConfiguration, match="fixed_rate='no'"):
        engine.periodic(f, every=60, fixed_rate="no")  # type: ignore[arg-type]
    engine.periodic(f, every=60, initial_delay="5", jitter="0")  # type: ignore[arg-type]
    async with engine:  # "5" seconds of delay once broke the start
        assert engine.started_at is not None
        assert info(engine, "f").next_due == pytest.approx(engine.started_at + 5.0, abs=1.0)
    assert not stray_tasks()


# ---------------------------------------------------------------- needs that change while the engine runs


async def test_provide_withdraw_and_set_flag_enable_and_disable_tasks_at_once() -> None:
    engine = make_engine(resources={"redis": "R"}, flags={"kg": False})
    seen: list[tuple[str, object]] = []

    @engine.periodic(every=0.01, requires=("late",))
    async def late(ctx: TaskContext, late: object) -> None:
        seen.append(("late", late))

    @engine.periodic(every=60.0, requires=("redis",))
    async def uses_redis(ctx: TaskContext, redis: object) -> None:
        seen.append(("redis", redis))

    @engine.periodic(every=0.01, opt_in="kg")
    async def flagged(ctx: TaskContext) -> None:
        seen.append(("flagged", None))

    rec = Recorder(engine, ("periodic.registered",))
    async with engine:
        assert info(engine, "late").reason == "missing resource: late"
        assert info(engine, "flagged").reason == "flag kg is off"
        engine.provide("late", "L")
        # enabled at once, and said so
        assert info(engine, "late").enabled and info(engine, "late").next_due is not None
        assert [(e.enabled, e.reason) for e in rec.of("periodic.registered") if e.name == "late"][-1] == (True, None)
        await eventually(lambda: ("late", "L") in seen)

        engine.set_flag("kg", True)
        await eventually(lambda: ("flagged", None) in seen)
        engine.set_flag("kg", False)
        assert info(engine, "flagged").reason == "flag kg is off" and info(engine, "flagged").next_due is None

        await eventually(lambda: info(engine, "uses_redis").last_status == "succeeded")
        assert engine.withdraw("redis") == "R"
        p = info(engine, "uses_redis")
        assert (p.enabled, p.reason, p.next_due) == (False, "missing resource: redis", None)
        assert [(e.enabled, e.reason) for e in rec.of("periodic.registered") if e.name == "uses_redis"][-1] == (
            False, "missing resource: redis",
        )
        # and back: on its schedule, an interval after its last run ended
        engine.provide("redis", "R2")
        [run] = engine.runs(task="uses_redis")
        assert run.finished_at is not None
        assert info(engine, "uses_redis").enabled and info(engine, "uses_redis").next_due == run.finished_at + 60.0
        # resources and flags stay readable
        assert engine.resources["redis"] == "R2" and engine.flags == {"kg": False}
    assert not stray_tasks()


async def test_needs_changed_from_another_thread_reach_the_engine_loop() -> None:
    engine = make_engine()
    seen: list[object] = []

    @engine.periodic(every=60.0, requires=("db",))
    async def uses_db(ctx: TaskContext, db: object) -> None:
        seen.append(db)

    async with engine:
        await asyncio.to_thread(engine.provide, "db", "D")
        await eventually(lambda: seen == ["D"])
        assert info(engine, "uses_db").enabled
    assert not stray_tasks()


async def test_a_tick_whose_resource_was_deleted_disables_the_task_instead_of_failing_runs() -> None:
    engine = make_engine(resources={"db": "D"})

    @engine.periodic(every=0.01, requires=("db",))
    async def uses_db(ctx: TaskContext, db: object) -> None: ...

    rec = Recorder(engine, ("periodic.registered",))
    async with engine:
        await eventually(lambda: info(engine, "uses_db").last_status == "succeeded")
        del engine.resources["db"]  # behind the engine's back: the next tick finds it gone
        await eventually(lambda: not info(engine, "uses_db").enabled)
        assert info(engine, "uses_db").reason == "missing resource: db"
        assert rec.of("periodic.registered")[-1].enabled is False
        assert engine.runs(task="uses_db", status="failed") == []
    assert not stray_tasks()


async def test_resume_checks_the_needs_again() -> None:
    engine = make_engine(resources={"db": "D"})

    @engine.periodic(every=0.01, requires=("db",))
    async def uses_db(ctx: TaskContext, db: object) -> None: ...

    async with engine:
        await eventually(lambda: info(engine, "uses_db").runs >= 1)
        engine.pause_periodic("uses_db")
        await eventually(lambda: info(engine, "uses_db").running_run_id is None)
        runs = info(engine, "uses_db").runs
        del engine.resources["db"]
        p = engine.resume_periodic("uses_db")
        assert (p.paused, p.enabled, p.reason, p.next_due) == (False, False, "missing resource: db", None)
        engine.provide("db", "D2")
        await eventually(lambda: info(engine, "uses_db").runs > runs)
        assert engine.runs(task="uses_db", status="failed") == []
    assert not stray_tasks()


def test_bad_changes_of_needs_are_refused_and_change_nothing() -> None:
    engine = make_engine(resources={"redis": 1}, flags={"kg": True})
    with pytest.raises(InvalidConfiguration, match=r"no resource of that name is provided \(did you mean 'redis'\?\); provided: redis"):
        engine.withdraw("reddis")
    with pytest.raises(InvalidConfiguration, match=r"on='false': a flag is True or False"):
        engine.set_flag("kg", "false")  # type: ignore[arg-type]
    with pytest.raises(InvalidConfiguration, match="must not be empty"):
        engine.provide("", object())
    with pytest.raises(InvalidConfiguration, match="a name must be a str"):
        engine.set_flag(5, True)  # type: ignore[arg-type]
    assert engine.resources == {"redis": 1} and engine.flags == {"kg": True}


async def test_reasons_name_a_flag_that_is_not_set_and_the_nearest_resource() -> None:
    engine = make_engine(resources={"redis": 1}, flags={"kg_extraction": True, "beta": False})

    @engine.periodic(every=60.0, requires=("reddis",))
    async def typo(ctx: TaskContext, reddis: object) -> None: ...

    @engine.periodic(every=60.0, opt_in="kg_extration")
    async def flag_typo(ctx: TaskContext) -> None: ...

    async with engine:
        assert info(engine, "typo").reason == "missing resource: reddis (did you mean redis?)"
        assert info(engine, "flag_typo").reason == (
            "flag kg_extration (did you mean kg_extraction?) is not set; the engine's flags: beta, kg_extraction"
        )


# ---------------------------------------------------------------- restarts and stops


async def test_after_a_restart_an_end_based_interval_counts_from_the_last_runs_end(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'runs.db'}"

    def build() -> Engine:
        engine = make_engine(store=db)

        @engine.periodic(every=30.0)
        async def job(ctx: TaskContext) -> None:
            await asyncio.sleep(0.2)

        return engine

    first = build()
    async with first:
        await eventually(lambda: info(first, "job").last_status == "succeeded")
    second = build()
    async with second:
        [run] = second.runs(task="job")
        assert run.started_at is not None and run.finished_at is not None
        assert run.finished_at - run.started_at >= 0.2
        # from the end, as without the restart; not from the slot the run started at
        assert info(second, "job").next_due == run.finished_at + 30.0
    assert not stray_tasks()


async def test_a_pause_lasts_until_the_engine_stops() -> None:
    engine = make_engine()
    runs = 0

    @engine.periodic(every=0.01)
    async def tick(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1

    async with engine:
        await eventually(lambda: runs >= 1)
        assert engine.pause_periodic("tick").paused
    assert not info(engine, "tick").paused
    before = runs
    async with engine:
        await eventually(lambda: runs > before)
    # a pause before the start still holds through it
    engine.pause_periodic("tick")
    async with engine:
        assert info(engine, "tick").paused and info(engine, "tick").next_due is None
    assert not stray_tasks()


# ---------------------------------------------------------------- slots missed while the loop was held up


@pytest.mark.parametrize(
    "options",
    [{"every": 1.0, "fixed_rate": True}, {"every": 1.0}, {"cron": "* * * * * *"}],
    ids=["fixed_rate", "end_based", "cron"],
)
async def test_slots_missed_while_the_loop_was_held_up_are_counted(options: dict[str, Any]) -> None:
    # the engine's clock jumps 10.5 s ahead while the loop waits for its next slot, as a
    # suspended process finds it when it wakes: the task fires once, late, and counts the rest
    jump = 0.0
    engine = make_engine(clock=lambda: time.time() + jump)
    fired: list[float] = []

    @engine.periodic(**options)
    async def tick(ctx: TaskContext) -> None:
        fired.append(time.time() + jump)

    async with engine:
        await eventually(lambda: info(engine, "tick").last_status == "succeeded")
        assert info(engine, "tick").missed == 0
        jump = 10.5
        await eventually(lambda: len(fired) >= 2, timeout=5.0)
        p = await eventually(lambda: (p := info(engine, "tick")).next_due is not None and p, timeout=5.0)
        assert p.missed == 10
        # fired once for them all, and the next tick is ahead, not in a burst
        assert p.next_due > fired[1] and len(fired) == 2
    assert not stray_tasks()


async def test_a_long_suspension_under_an_every_second_cron_is_counted_without_stalling_the_loop() -> None:
    jump = 0.0
    engine = make_engine(clock=lambda: time.time() + jump)

    @engine.periodic(cron="* * * * * *")
    async def tick(ctx: TaskContext) -> None: ...

    async with engine:
        await eventually(lambda: info(engine, "tick").runs >= 1, timeout=3.0)
        jump = 2 * 3600 + 0.5
        await eventually(lambda: info(engine, "tick").missed > 0, timeout=5.0)
        assert abs(info(engine, "tick").missed - 7200) <= 2
    assert not stray_tasks()


# ---------------------------------------------------------------- what the docs promise of cron


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_a_time_the_clocks_skip_runs_an_hour_later_that_day(new_york: None) -> None:
    # 2024-03-10, New York: at 07:00 UTC the clocks went from 02:00 EST to 03:00 EDT
    midnight = datetime(2024, 3, 10, 5, 0, tzinfo=timezone.utc).timestamp()
    half_past_three_edt = datetime(2024, 3, 10, 7, 30, tzinfo=timezone.utc).timestamp()
    assert next_cron_due("30 2 * * *", midnight) == half_past_three_edt
    # and the next day at 02:30 again
    assert next_cron_due("30 2 * * *", half_past_three_edt) == half_past_three_edt + 23 * 3600


def test_six_fields_put_seconds_first() -> None:
    utc = timezone.utc
    after = datetime(2024, 1, 1, 12, 0, 3, tzinfo=utc).timestamp()
    assert next_cron_due("*/10 * * * * *", after, tz=utc) == after + 7
    assert next_cron_due("30 0 12 * * *", after, tz=utc) == datetime(2024, 1, 1, 12, 0, 30, tzinfo=utc).timestamp()



async def test_set_flag_from_another_thread_while_the_engine_stops_is_applied_on_its_loop() -> None:
    # the window between stop()'s start and the scheduler's stop: a config watcher's thread
    # changing a flag then ran scheduler code on its own thread (RuntimeError, no running loop)
    engine = Engine(flags={"f": False}, health_interval=None)

    @engine.periodic(every=60.0, opt_in="f")
    async def tick(ctx: TaskContext) -> None:
        return None

    errors: list[BaseException] = []

    def watcher() -> None:
        try:
            engine.set_flag("f", True)
            engine.provide("db", object())
        except BaseException as exc:  # noqa: BLE001 - what the test looks for
            errors.append(exc)

    await engine.start()
    stopping = asyncio.get_running_loop().create_task(engine.stop(timeout=1))
    await asyncio.sleep(0)  # one step: stop() under way, the scheduler not stopped yet
    assert engine.state == "stopping"
    thread = threading.Thread(target=watcher)
    thread.start()
    await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)
    await asyncio.wait_for(stopping, 10)
    assert errors == []
    assert engine.flags["f"] is True and "db" in engine.resources
    assert not stray_tasks()


async def test_a_run_left_waiting_by_withdraw_starts_as_soon_as_its_resource_is_provided() -> None:
    # the executor polls every 30 s here: only a wake at provide() starts the run in time
    engine = Engine(resources={"r": "R"}, max_concurrency=1, poll_interval=30.0, health_interval=None)
    gate = asyncio.Event()
    got: list[str] = []

    @engine.task(name="blocker")
    async def blocker(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.periodic(every=3600.0, initial_delay=0.2, requires=("r",))
    async def uses_r(ctx: TaskContext, r: str) -> None:
        got.append(r)

    async with engine:
        await engine.submit("blocker")
        await eventually(lambda: [x for x in engine.runs(status="pending") if x.task == "uses_r"], timeout=10)
        assert engine.withdraw("r") == "R"
        gate.set()
        await eventually(lambda: all(x.status.finished for x in engine.runs(task="blocker")), timeout=10)
        engine.provide("r", "R2")
        await eventually(lambda: got == ["R2"], timeout=10)


async def test_a_resource_withdrawn_as_its_run_starts_stays_that_runs() -> None:
    # claimed and marked running, its first step not taken yet: the run was given the resource
    # with its claim (it failed with a bare KeyError when the withdraw came in between)
    engine = Engine(resources={"db": 42}, health_interval=None)
    got: list[int] = []

    @engine.periodic(every=3600.0, initial_delay=3000, requires=("db",), name="needdb")
    async def needdb(ctx: TaskContext, db: int) -> None:
        got.append(db)

    async with engine:
        handle = await engine.run_periodic("needdb")
        assert handle.status.value == "running"
        assert engine.withdraw("db") == 42
        record = await handle.wait(timeout=10)
    assert (record.status.value, got) == ("succeeded", [42])


async def test_resume_checks_the_needs_of_a_task_disabled_by_a_resource_deleted_by_hand() -> None:
    engine = Engine(resources={"db": 1}, health_interval=None)
    got: list[int] = []

    @engine.periodic(every=0.05, requires=("db",), name="t")
    async def t(ctx: TaskContext, db: int) -> None:
        got.append(db)

    async with engine:
        await eventually(lambda: got)
        del engine.resources["db"]  # by hand, not withdraw(): found gone at the next tick
        await eventually(lambda: not engine.schedule()[0].enabled)
        engine.resources["db"] = 2  # put back by hand
        info = engine.resume_periodic("t")  # not paused: it checks the needs all the same
        assert info.enabled and info.reason is None
        await eventually(lambda: 2 in got)


async def test_a_fixed_rate_task_started_again_late_keeps_its_grid_and_counts_what_it_missed(tmp_path: Path) -> None:
    every = 60.0
    store = f"sqlite:///{tmp_path / 'grid.db'}"

    def grid_engine(ahead: float) -> Engine:
        engine = Engine(store=store, node_id="n", health_interval=None, clock=lambda: time.time() + ahead)

        @engine.periodic(every=every, fixed_rate=True)
        async def grid(ctx: TaskContext) -> None:
            return None

        return engine

    first = grid_engine(0.0)
    async with first:
        await eventually(lambda: first.schedule()[0].runs == 1)
        [fired] = first.runs(task="grid")
    # started again two and a half intervals later: the slot it waited for fires once, late
    later = grid_engine(2.5 * every)
    async with later:
        await eventually(lambda: later.schedule()[0].runs == 1)
        info = later.schedule()[0]
    slot = fired.created_at
    assert info.missed == 1  # of the slots at +60 and +120, one is the late tick's, one missed
    assert info.next_due is not None and abs(info.next_due - (slot + 3 * every)) < 1.0  # on its grid
