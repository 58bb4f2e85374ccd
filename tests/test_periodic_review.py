"""Periodic tasks, from a review: added, paused and resumed from another thread while the
engine runs in the background; cron across both DST changes (local zone and an explicit
one alike); a slot whose store write failed, tried again as that same slot; empty names."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from taskwatch.engine import DuplicateTask, Engine, InvalidConfiguration, PeriodicInfo, TaskContext
from taskwatch.engine.scheduler import next_cron_due

from .helpers import eventually, in_thread, stray_tasks, wait_until

BERLIN = ZoneInfo("Europe/Berlin")


def make_engine(**kwargs: Any) -> Engine:
    kwargs.setdefault("health_interval", None)
    return Engine(**kwargs)


def info(engine: Engine, name: str) -> PeriodicInfo:
    return next(p for p in engine.schedule() if p.name == name)


def berlin_time(*args: int, fold: int = 0) -> float:
    return datetime(*args, tzinfo=BERLIN, fold=fold).timestamp()  # type: ignore[misc]


@pytest.fixture
def berlin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is Berlin's for the test (cron reads expressions in local time)."""
    monkeypatch.setenv("TZ", "Europe/Berlin")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


# ---------------------------------------------------------------- from another thread


def test_a_periodic_task_added_from_another_thread_runs_on_the_background_engine() -> None:
    engine = make_engine()
    bg = engine.start_background()
    ran = threading.Event()

    async def late(ctx: TaskContext) -> None:
        ran.set()

    try:
        assert in_thread(lambda: engine.periodic(late, every=0.05)) is late
        assert ran.wait(10)
        assert wait_until(lambda: info(engine, "late").runs >= 1)
        # a refused one, from a thread too, is refused with its own error and records nothing
        assert isinstance(in_thread(lambda: engine.periodic(late, every=0.05)), DuplicateTask)

        async def other(ctx: TaskContext) -> None: ...

        assert isinstance(in_thread(lambda: engine.periodic(other, every=-1)), InvalidConfiguration)
        assert [p.name for p in bg.schedule()] == ["late"] and "other" not in engine.tasks()
    finally:
        bg.stop(timeout=10)


def test_a_periodic_task_added_from_a_thread_running_its_own_loop_runs_on_the_engines() -> None:
    # a notebook cell: the caller's thread runs the kernel's loop, the engine runs in the background
    engine = make_engine()
    bg = engine.start_background()
    ran_on: list[str] = []
    ran = threading.Event()

    async def cell() -> list[str]:
        @engine.periodic(every=0.05)
        async def late(ctx: TaskContext) -> None:
            ran_on.append(threading.current_thread().name)
            ran.set()

        # nothing of the engine's was left on the caller's loop
        left = [t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.get_running_loop().run_in_executor(None, ran.wait, 10)
        return left

    try:
        assert in_thread(lambda: asyncio.run(cell())) == []
        assert ran_on and set(ran_on) == {bg.thread.name}
        assert wait_until(lambda: info(engine, "late").runs >= 1)
        assert info(engine, "late").failures == 0
    finally:
        bg.stop(timeout=10)


def test_pause_and_resume_from_another_thread_take_effect_on_the_background_engine() -> None:
    engine = make_engine()

    @engine.periodic(every=0.05)
    async def tick(ctx: TaskContext) -> None: ...

    bg = engine.start_background()
    try:
        wait_until(lambda: info(engine, "tick").runs >= 1)
        paused = in_thread(lambda: engine.pause_periodic("tick"))
        assert isinstance(paused, PeriodicInfo) and paused.paused and paused.next_due is None
        resumed = in_thread(lambda: engine.resume_periodic("tick"))
        assert isinstance(resumed, PeriodicInfo), resumed
        assert not resumed.paused and resumed.next_due is not None
        runs = info(engine, "tick").runs
        assert wait_until(lambda: info(engine, "tick").runs > runs)
    finally:
        bg.stop(timeout=10)


# ---------------------------------------------------------------- an empty name


async def test_an_empty_name_for_a_periodic_task_is_refused_and_records_nothing() -> None:
    engine = make_engine()

    async def f(ctx: TaskContext) -> None: ...

    with pytest.raises(InvalidConfiguration, match="name='': a name must not be empty"):
        engine.periodic(f, every=1, name="")
    assert engine.schedule() == [] and "f" not in engine.tasks()
    engine.periodic(f, every=1)  # the corrected call goes through
    assert [p.name for p in engine.schedule()] == ["f"]


# ---------------------------------------------------------------- the night the clocks go back


async def test_a_daily_slot_of_the_repeated_hour_fired_late_is_not_fired_again_in_its_second_pass(
    berlin: None,
) -> None:
    # 2026-10-25, Berlin: at 03:00 CEST the clocks go back to 02:00 CET
    now = [berlin_time(2026, 10, 25, 2, 29, 59, 900000)]
    engine = make_engine(clock=lambda: now[0])

    @engine.periodic(cron="30 2 * * *")
    async def backup(ctx: TaskContext) -> None: ...

    slot = berlin_time(2026, 10, 25, 2, 30)  # CEST, the first pass
    tomorrow = berlin_time(2026, 10, 26, 2, 30)
    async with engine:
        assert info(engine, "backup").next_due == slot
        # suspended across 02:30 CEST: the host wakes at 02:10 CET, in the second pass
        now[0] = berlin_time(2026, 10, 25, 2, 10, fold=1)
        await eventually(lambda: (due := info(engine, "backup").next_due) is not None and due > now[0])
        assert info(engine, "backup").runs == 1
        assert info(engine, "backup").next_due == tomorrow
        # a resume in the second pass does not give that time back either
        engine.pause_periodic("backup")
        assert engine.resume_periodic("backup").next_due == tomorrow
    assert not stray_tasks()


async def test_a_restart_in_the_second_pass_fires_the_missed_slot_once(berlin: None, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    now = [berlin_time(2026, 10, 24, 2, 30)]

    async def backup(ctx: TaskContext) -> None: ...

    first = make_engine(store=store, clock=lambda: now[0])
    first.periodic(backup, cron="30 2 * * *")
    async with first:
        await eventually(lambda: info(first, "backup").runs == 1)
    # redeployed that night: down before 02:30 CEST, up again at 02:10 CET
    now[0] = berlin_time(2026, 10, 25, 2, 10, fold=1)
    engine = make_engine(store=store, clock=lambda: now[0])
    engine.periodic(backup, cron="30 2 * * *")
    async with engine:
        await eventually(lambda: info(engine, "backup").runs == 1)  # the missed 02:30 CEST, late
        await eventually(lambda: (due := info(engine, "backup").next_due) is not None and due > now[0])
        assert info(engine, "backup").next_due == berlin_time(2026, 10, 26, 2, 30)


def test_an_hourly_task_fires_once_per_wall_clock_hour_in_an_explicit_zone_too(berlin: None) -> None:
    # README: the repeated hour fires in its first pass only, one two-hour gap
    t = berlin_time(2026, 10, 25, 1, 50)
    for tz in (None, BERLIN):
        due = [next_cron_due("0 * * * *", t, tz)]
        due.append(next_cron_due("0 * * * *", due[-1], tz))
        assert due == [berlin_time(2026, 10, 25, 2, 0), berlin_time(2026, 10, 25, 3, 0)]


# ---------------------------------------------------------------- the night the clocks go forward


#: wall-clock times (hour, minute; or day, hour, minute) of each expression's first ticks after 01:40
SPRING_TICKS: dict[str, list[tuple[int, ...]]] = {
    "30 2 * * *": [(3, 30), (30, 2, 30)],
    "0,30 2 * * *": [(3, 0), (3, 30), (30, 2, 0)],
    "*/15 2 * * *": [(3, 0), (3, 15), (3, 30), (3, 45), (30, 2, 0)],
    # times the clocks skip fall on ones that exist: each instant once, none lost
    "*/15 * * * *": [(1, 45), (3, 0), (3, 15), (3, 30)],
}


def test_each_time_the_clocks_skip_runs_an_hour_later_that_day(berlin: None) -> None:
    # 2026-03-29, Berlin: at 02:00 CET the clocks go forward to 03:00 CEST
    for expr, wall in SPRING_TICKS.items():
        expected = [berlin_time(2026, 3, 29, *w) if len(w) == 2 else berlin_time(2026, 3, *w) for w in wall]
        for tz in (None, BERLIN):  # the local zone and the same zone named give the same times
            t = berlin_time(2026, 3, 29, 1, 40)
            got = []
            for _ in expected:
                t = next_cron_due(expr, t, tz)
                got.append(t)
            assert got == expected, (expr, tz)


def test_the_local_zone_and_the_same_zone_named_follow_one_rule(berlin: None) -> None:
    for night in ((2026, 3, 29), (2026, 10, 25)):
        starts = (berlin_time(*night, 0, 50), berlin_time(*night, 2, 10, fold=1), berlin_time(*night, 3, 10))
        for expr in ("30 2 * * *", "*/20 * * * *", "0 */2 * * *", "15 1-3 * * *", "*/45 * * * * *"):
            for start in starts:
                local, named = start, start
                for _ in range(12):
                    local, named = next_cron_due(expr, local), next_cron_due(expr, named, BERLIN)
                    assert local == named, (night, expr, start)


# ---------------------------------------------------------------- a slot whose store write failed


def locked(path: Path) -> sqlite3.Connection:
    """Another connection to ``path`` holding its write lock, as a long migration would."""
    other = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN EXCLUSIVE")
    return other


async def test_a_cron_slot_whose_store_write_failed_on_one_node_is_not_fired_again_there(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.db"
    slot = float((int(time.time()) // 3600 + 1) * 3600)  # a whole hour
    now = [slot - 0.05]

    async def hourly(ctx: TaskContext) -> None: ...

    # node a gives up on a locked file at once, node b waits for it
    a = make_engine(store=f"sqlite:///{path}?busy_timeout=0", node_id="a", clock=lambda: now[0])
    b = make_engine(store=f"sqlite:///{path}", node_id="b", clock=lambda: now[0])
    for engine in (a, b):
        engine.periodic(hourly, cron="0 * * * *")
    async with a, b:
        assert info(a, "hourly").next_due == info(b, "hourly").next_due == slot
        other = await asyncio.to_thread(locked, path)
        try:
            with caplog.at_level(logging.ERROR, logger="taskwatch.scheduler"):
                now[0] = slot
                await eventually(lambda: any("scheduling error" in r.getMessage() for r in caplog.records), timeout=5)
        finally:
            await asyncio.to_thread(other.execute, "ROLLBACK")
            other.close()

        async def stored() -> list[Any]:
            return (await b.store.query(task="hourly", limit=10)).runs

        # b, which waited for the lock, fires the slot
        for _ in range(1000):
            runs = await stored()
            if runs and all(r.status.finished for r in runs):
                break
            await asyncio.sleep(0.01)
        assert len(runs) == 1
        # a tries again a second later: that same slot, which b has fired
        now[0] = slot + 1.5
        await eventually(lambda: info(a, "hourly").next_due == slot + 3600, timeout=5)
        assert len(await stored()) == 1
        assert info(a, "hourly").runs == 0


async def test_a_fixed_rate_grid_stays_put_after_a_store_error(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "runs.db"
    start = 1_800_000_000.0
    now = [start]
    engine = make_engine(store=f"sqlite:///{path}?busy_timeout=0", clock=lambda: now[0])

    @engine.periodic(every=3600, fixed_rate=True, initial_delay=0.05)
    async def hourly(ctx: TaskContext) -> None: ...

    async with engine:
        slot = info(engine, "hourly").next_due
        assert slot == start + 0.05
        other = await asyncio.to_thread(locked, path)
        try:
            with caplog.at_level(logging.ERROR, logger="taskwatch.scheduler"):
                now[0] = slot + 0.2
                await eventually(lambda: any("scheduling error" in r.getMessage() for r in caplog.records), timeout=5)
        finally:
            await asyncio.to_thread(other.execute, "ROLLBACK")
            other.close()
        now[0] = slot + 2.0
        await eventually(lambda: info(engine, "hourly").runs == 1, timeout=5)
        # fired late for its slot, then back on the grid it had
        await eventually(lambda: info(engine, "hourly").next_due not in (None, slot), timeout=5)
        assert info(engine, "hourly").next_due == slot + 3600


def test_periodic_tasks_added_from_another_thread_while_the_engine_starts_all_run(tmp_path: Path) -> None:
    # the scheduler's start reads each task's last slot from the store, one await each: tasks
    # added meanwhile (handed to the loop between those reads) broke the start, or were skipped
    engine = Engine(store=f"sqlite:///{tmp_path / 'runs.db'}", health_interval=None)

    async def tick(ctx: TaskContext) -> None:
        return None

    for i in range(200):
        engine.periodic(tick, every=3600, initial_delay=3600, name=f"early-{i}")
    added: list[str] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def add() -> None:
        while not done.is_set() and len(added) < 2_000:
            name = f"late-{len(added)}"
            try:
                engine.periodic(tick, every=3600, initial_delay=3600, name=name)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return
            added.append(name)

    adder = threading.Thread(target=add)
    adder.start()
    try:
        bg = engine.start_background()
    finally:
        done.set()
        adder.join(30)
    try:
        assert errors == []
        # every one is scheduled, those added during the start included
        unscheduled = [p.name for p in bg.schedule() if p.next_due is None]
        assert unscheduled == [] and len(bg.schedule()) == 200 + len(added)
    finally:
        bg.stop(timeout=10)


async def test_a_periodic_task_with_no_name_of_its_own_needs_name_and_a_callable_object_is_one() -> None:
    import functools

    from taskwatch.engine import TaskDefinitionError

    engine = Engine(health_interval=None)
    ran = asyncio.Event()

    async def tick(ctx: TaskContext, label: str) -> None:
        ran.set()

    # a partial has no __name__: its repr (a memory address) would name it differently on every node
    with pytest.raises(TaskDefinitionError, match="give the periodic task a name="):
        engine.periodic(functools.partial(tick, label="x"), every=3600)
    assert engine.schedule() == []
    engine.periodic(functools.partial(tick, label="x"), every=3600, name="tick-x")

    class Poll:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, ctx: TaskContext) -> None:
            self.calls += 1

    poll = Poll()
    engine.periodic(poll, every=0.01, name="poll")  # accepted, as task() and supervised() accept one
    async with engine:
        await eventually(lambda: poll.calls >= 2)
    assert sorted(p.name for p in engine.schedule()) == ["poll", "tick-x"]
