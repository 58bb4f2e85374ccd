"""Periodic tasks at their edges: bad options and empty names, needs that change at run time,
restarts, pauses across a stop, added, paused and resumed from another thread while the engine
runs in the background, slots missed while the loop was held up, a slot whose store write
failed (tried again as that same slot), cron across both DST changes (local zone and an
explicit one alike) and the cron forms.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from taskwatch.engine import DuplicateTask, Engine, InvalidConfiguration, LoopThreadError, PeriodicInfo, TaskContext
from taskwatch.engine.scheduler import next_cron_due

from .helpers import Recorder, eventually, in_thread, stray_tasks, swallowing_every_cancel, wait_until


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


async def test_a_withdraw_from_another_thread_takes_away_what_that_thread_just_provided() -> None:
    class Pool:
        def __init__(self, name: str) -> None:
            self.name = name

    a, b, c = Pool("A"), Pool("B"), Pool("C")
    engine = make_engine(resources={"db": a})

    @engine.periodic(every=3600, requires=("db",), initial_delay=3600)
    async def uses_db(ctx: TaskContext, db: Pool) -> None: ...

    def provide_then_withdraw(pool: Pool) -> tuple[object, bool]:
        engine.provide("db", pool)
        taken = engine.withdraw("db")
        # once withdraw() returned, the task is off: nothing starts with the pool any more
        return taken, info(engine, "uses_db").enabled

    async with engine:
        # the withdraw read what was provided before the provide reached the engine's loop: it
        # returned A, and B stayed provided with the task on
        assert await asyncio.to_thread(provide_then_withdraw, b) == (b, False)
        assert engine.resources == {}
        # and with nothing provided it raised "no resource of that name", leaving C provided
        assert await asyncio.to_thread(provide_then_withdraw, c) == (c, False)
        assert engine.resources == {} and not info(engine, "uses_db").enabled
        with pytest.raises(InvalidConfiguration, match="no resource of that name is provided"):
            await asyncio.to_thread(engine.withdraw, "db")
    assert not stray_tasks()


def test_a_provide_from_another_thread_between_two_pieces_of_the_engines_loop_waits_for_the_next() -> None:
    """A program driving the engine's loop in pieces (``run_until_complete`` again and again):
    between them the loop runs nothing, and the engine needs it to start the task's loop."""
    loop = asyncio.new_event_loop()
    engine = make_engine()
    fired = threading.Event()

    @engine.periodic(every=0.01, requires=("db",))
    async def uses_db(ctx: TaskContext, db: object) -> None:
        fired.set()

    said: list[object] = []

    def provide() -> None:
        try:
            said.append(engine.provide("db", "DB"))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            said.append(exc)

    async def until_fired() -> None:
        await eventually(fired.is_set)

    giver = threading.Thread(target=provide)
    try:
        loop.run_until_complete(engine.start())
        giver.start()
        wait_until(lambda: _waiting(giver), timeout=5)  # it waits for the loop's next piece
        loop.run_until_complete(until_fired())
        giver.join(5)
        # it raised "no running event loop", the resource set and the task shown enabled, never firing
        assert said == [None] and info(engine, "uses_db").enabled
        # so do the scheduler's own changes; a pause, which only cancels, is made between pieces
        # on the loop's own thread too (it raised LoopThreadError for a while), and a resume from
        # another thread waits for the next piece
        assert engine.pause_periodic("uses_db").paused
        resumer = threading.Thread(target=lambda: said.append(engine.resume_periodic("uses_db").enabled))
        resumer.start()
        wait_until(lambda: _waiting(resumer), timeout=5)
        runs = info(engine, "uses_db").runs
        loop.run_until_complete(eventually(lambda: len(said) == 2 and info(engine, "uses_db").runs > runs))
        resumer.join(5)
        assert said == [None, True]
        # on the loop's own thread between two pieces nothing could run the loop: said at once
        started = time.monotonic()
        with pytest.raises(LoopThreadError, match=r"Engine.withdraw\(\) was called on the engine's loop's thread"):
            engine.withdraw("db")
        assert time.monotonic() - started < 1.0 and engine.resources == {"db": "DB"}
    finally:
        giver.join(5)
        loop.run_until_complete(engine.stop())
        loop.close()



def test_a_call_made_on_a_loop_that_stops_before_taking_it_runs_on_the_callers_thread() -> None:
    """What a provide() from another thread meets while a background engine ends: its loop
    stops before it takes the call, which it then never runs."""
    # this turn ends the loop: what was shipped meanwhile stays unrun
    answer, ran = _call_while_the_loop_ends(lambda loop: loop.stop())
    # it used to wait out call_blocking's 5 s, and raise TimeoutError
    assert answer == ["done"] and ran == ["caller"]


def test_a_call_the_loops_owner_cancels_before_it_started_runs_on_the_callers_thread() -> None:
    """A background engine's end cancels the tasks left on its loop, a shipped call's among
    them: the call never ran, and its caller got CancelledError for a provide() that was lost."""

    def cancel_what_is_left(loop: asyncio.AbstractEventLoop) -> None:
        for task in asyncio.all_tasks(loop):  # the call's, before its first step
            task.cancel()
            task.add_done_callback(lambda _: loop.stop())  # after the call has heard of it

    # behind the call shipped meanwhile
    answer, ran = _call_while_the_loop_ends(lambda loop: loop.call_soon(cancel_what_is_left, loop))
    assert answer == ["done"] and ran == ["caller"]


def _call_while_the_loop_ends(
    then: Callable[[asyncio.AbstractEventLoop], object],
) -> tuple[list[object], list[str]]:
    """``call_blocking`` from a thread named "caller" while a loop running in another thread is
    held; once the call is shipped, the loop is let go and does ``then(loop)``. Returns what
    the call answered (or raised) and the names of the threads the call ran on."""
    from taskwatch.engine.hop import call_blocking

    loop = asyncio.new_event_loop()
    held, go = threading.Event(), threading.Event()

    def hold() -> None:
        held.set()
        go.wait(5)
        then(loop)

    loop.call_soon(hold)
    runner = threading.Thread(target=loop.run_forever)
    runner.start()
    answer: list[object] = []
    ran: list[str] = []

    def call() -> None:
        try:
            answer.append(call_blocking(loop, lambda: ran.append(threading.current_thread().name) or "done"))
        except BaseException as exc:  # noqa: BLE001 - the test reads it
            answer.append(exc)

    caller = threading.Thread(target=call, name="caller")
    try:
        assert held.wait(5)
        caller.start()
        # the caller has shipped its call and waits for the answer (its thread sits in a wait)
        wait_until(lambda: _waiting(caller), timeout=5)
        go.set()
        runner.join(5)
        assert not loop.is_running()
        caller.join(3)
        assert not caller.is_alive()
        return answer, ran
    finally:
        go.set()
        runner.join(5)
        caller.join(5)
        loop.close()


def _waiting(thread: threading.Thread) -> bool:
    import sys

    frame = sys._current_frames().get(thread.ident or -1)
    while frame is not None:
        if frame.f_code.co_name == "result":  # a concurrent.futures.Future's wait for its answer
            return True
        frame = frame.f_back
    return False


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


async def test_a_task_disabled_at_the_start_is_logged_with_what_it_waits_for(caplog: pytest.LogCaptureFixture) -> None:
    # the same state reached later logged a warning, at the start nothing: a misspelled
    # resource name left no trace in the log
    engine = make_engine(resources={"redis": 1}, flags={"kg": False})

    @engine.periodic(every=60.0, requires=("reddis",))
    async def typo(ctx: TaskContext, reddis: object) -> None: ...

    @engine.periodic(every=60.0, opt_in="kg")
    async def flagged(ctx: TaskContext) -> None: ...

    @engine.periodic(every=60.0, opt_in="kgg")
    async def flag_typo(ctx: TaskContext) -> None: ...

    @engine.periodic(every=60.0, requires=("cache",))
    async def later(ctx: TaskContext, cache: object) -> None: ...

    @engine.periodic(every=60.0, initial_delay=60.0)
    async def fine(ctx: TaskContext) -> None: ...

    with caplog.at_level(logging.INFO, logger="taskwatch.scheduler"):
        async with engine:
            pass
    said = {(r.levelno, r.getMessage()) for r in caplog.records if r.name == "taskwatch.scheduler"}
    # what looks like a typo is a warning, which the default logging shows; a need not met yet is not
    assert said == {
        (logging.WARNING, "periodic task 'typo' is disabled until its needs are met: missing resource: reddis (did you mean redis?)"),
        (logging.WARNING, "periodic task 'flag_typo' is disabled until its needs are met: flag kgg (did you mean kg?) is not set; the engine's flags: kg"),
        (logging.INFO, "periodic task 'flagged' is disabled until its needs are met: flag kg is off"),
        (logging.INFO, "periodic task 'later' is disabled until its needs are met: missing resource: cache"),
    }


async def test_a_fixed_rate_task_enabled_again_keeps_its_grid_and_counts_nothing_missed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a flag turned off and on again restarted the task as at an engine start: the slot it
    # waited for before it was turned off fired at once, late, and counted the slots of the
    # time it was off as missed, logging them as a late tick
    start = 1_800_000_000.0
    now = [start]
    engine = make_engine(flags={"on": True}, clock=lambda: now[0])

    @engine.periodic(every=60.0, fixed_rate=True, opt_in="on")
    async def tick(ctx: TaskContext) -> None: ...

    with caplog.at_level(logging.INFO, logger="taskwatch.scheduler"):
        async with engine:
            await eventually(lambda: info(engine, "tick").last_status == "succeeded")
            engine.set_flag("on", False)
            now[0] = start + 179.9  # two slots of its grid pass while it is off
            engine.set_flag("on", True)
            p = info(engine, "tick")
            assert (p.enabled, p.next_due, p.runs, p.missed) == (True, start + 180.0, 1, 0)
            now[0] = start + 180.0
            await eventually(lambda: info(engine, "tick").runs == 2 and info(engine, "tick").next_due == start + 240.0)
            assert info(engine, "tick").missed == 0
    assert not [r for r in caplog.records if "late" in r.getMessage()]


async def test_a_task_enabled_again_waits_for_no_initial_delay_but_the_starts() -> None:
    start = 1_800_000_000.0
    now = [start]
    engine = make_engine(flags={"on": True}, clock=lambda: now[0])

    @engine.periodic(every=60.0, initial_delay=0.5, opt_in="on")
    async def tick(ctx: TaskContext) -> None: ...

    async with engine:
        assert info(engine, "tick").next_due == start + 0.5
        # off and on within the start's warm-up: that one still holds, no new one begins
        engine.set_flag("on", False)
        now[0] = start + 0.3
        engine.set_flag("on", True)
        assert info(engine, "tick").next_due == start + 0.5
        # off for a while: the interval's time came meanwhile, so it fires at once
        engine.set_flag("on", False)
        now[0] = start + 100.0
        engine.set_flag("on", True)
        assert info(engine, "tick").next_due == start + 100.0
        await eventually(lambda: info(engine, "tick").last_status == "succeeded")
        p = info(engine, "tick")
        assert (p.runs, p.missed, p.skipped) == (1, 0, 0)


async def test_an_end_based_task_enabled_again_while_its_run_goes_counts_from_that_runs_end() -> None:
    # a resource swapped (withdraw, provide) while a run went on: the task started again as at
    # a start, so the slot it had already fired came due at once, was skipped for the run
    # still going, and the ticks after it were counted missed
    start = 1_800_000_000.0
    now = [start]
    engine = make_engine(resources={"db": "conn-1"}, clock=lambda: now[0])
    release = asyncio.Event()

    @engine.periodic(every=60.0, requires=("db",))
    async def job(ctx: TaskContext, db: str) -> None:
        await release.wait()

    async with engine:
        await eventually(lambda: engine.runs(task="job", status="running"))
        engine.withdraw("db")
        engine.provide("db", "conn-2")
        p = info(engine, "job")
        # waiting for that run's end, as an end-based interval does
        assert (p.enabled, p.next_due, p.running_run_id is not None) == (True, None, True)
        now[0] = start + 5.0
        release.set()
        p = await eventually(lambda: (p := info(engine, "job")).next_due is not None and p)
        assert (p.next_due, p.runs, p.skipped, p.missed, p.last_status) == (start + 65.0, 1, 0, 0, "succeeded")


async def test_schedule_shows_when_a_cancelled_run_started_and_how_long_it_ran(tmp_path: Path) -> None:
    # a cancel's event carries no duration: schedule() showed None for both until a restart
    # read them from the store
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}")
    started = asyncio.Event()

    @engine.periodic(every=3600.0)
    async def long(ctx: TaskContext) -> None:
        started.set()
        await asyncio.Event().wait()

    async with engine:
        await asyncio.wait_for(started.wait(), 10)
        run_id = info(engine, "long").running_run_id
        assert run_id is not None
        await engine.cancel(run_id)
        record = await engine.wait_for(run_id)
        p = await eventually(lambda: (p := info(engine, "long")).last_run_id == run_id and p)
    assert record.started_at is not None and record.duration is not None
    assert (p.last_status, p.last_started, p.last_duration) == ("cancelled", record.started_at, record.duration)


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
    [{"every": 2.0, "fixed_rate": True}, {"every": 2.0}, {"cron": "*/2 * * * * *"}],
    ids=["fixed_rate", "end_based", "cron"],
)
async def test_slots_missed_while_the_loop_was_held_up_are_counted(options: dict[str, Any]) -> None:
    # the engine's clock jumps 20.5 s ahead while the loop waits for its next slot, as a
    # suspended process finds it when it wakes: the task fires once, late, and counts the rest.
    # (Slots of 2 s: the jump must come before the next slot, a poll away on a loaded machine)
    jump = 0.0
    engine = make_engine(clock=lambda: time.time() + jump)
    fired: list[float] = []

    @engine.periodic(**options)
    async def tick(ctx: TaskContext) -> None:
        fired.append(time.time() + jump)

    async with engine:
        await eventually(lambda: info(engine, "tick").last_status == "succeeded")
        assert info(engine, "tick").missed == 0
        jump = 20.5
        await eventually(lambda: len(fired) >= 2)
        p = await eventually(lambda: (p := info(engine, "tick")).next_due is not None and p)
        assert p.missed == 10
        # fired once for them all, and the next tick is ahead, not in a burst
        assert p.next_due > fired[1] and len(fired) == 2
    assert not stray_tasks()


async def test_a_fixed_rate_tick_its_full_jitter_put_near_the_next_slot_leaves_that_slot_standing() -> None:
    # with jitter=1.0 a tick may be put just before the next slot of its grid; reached a little
    # after its own time, it took that next slot for passed: dropped, counted missed, and
    # logged as a late tick
    start = 1_800_000_000.0
    now = [start]
    engine = make_engine(clock=lambda: now[0])
    every = 60.0

    @engine.periodic(every=every, fixed_rate=True, jitter=1.0)
    async def tick(ctx: TaskContext) -> None: ...

    engine.pause_periodic("tick")
    async with engine:
        for _ in range(100):
            # its next slot an interval from now, and the jitter drawn for it
            planned = engine.resume_periodic("tick").next_due
            slot = now[0] + every
            assert planned is not None and slot <= planned <= slot + every
            if planned - slot >= 1.0:
                break
            engine.pause_periodic("tick")
        else:
            pytest.fail("no jitter of a second or more in 100 draws")
        # the loop reaches the tick later than its jittered time, past the next slot of the
        # grid, yet less than an interval late: no slot passed while it was held up
        now[0] = slot + every + (planned - slot) / 2
        # caught up: its next tick planned ahead (the next slot's may have come due already)
        p = await eventually(lambda: (p := info(engine, "tick")).next_due is not None and p.next_due > now[0] and p)
    assert p.missed == 0
    # no slot of the grid left out: each fired one is followed by the next, with its own jitter
    assert p.runs in (1, 2) and slot + p.runs * every <= p.next_due <= slot + (p.runs + 1) * every


async def test_a_long_suspension_under_an_every_second_cron_is_counted_without_stalling_the_loop() -> None:
    jump = 0.0
    engine = make_engine(clock=lambda: time.time() + jump)

    @engine.periodic(cron="* * * * * *")
    async def tick(ctx: TaskContext) -> None: ...

    async with engine:
        await eventually(lambda: info(engine, "tick").runs >= 1)
        jump = 2 * 3600 + 0.5
        await eventually(lambda: info(engine, "tick").missed > 0)
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
        # finished, not only submitted: a run still queued at the stop is the next start's to
        # run, and the slot that start fires then passes without one (no overlap), as it should
        await eventually(lambda: first.schedule()[0].last_status == "succeeded")
        [fired] = first.runs(task="grid")
    # started again two and a half intervals later: the slot it waited for fires once, late
    later = grid_engine(2.5 * every)
    async with later:

        def planned_again() -> PeriodicInfo | None:
            # the late tick counted and the next slot planned (the count waits on the store)
            shown = later.schedule()[0]
            return shown if shown.runs == 1 and shown.next_due is not None and shown.next_due > later.clock() else None

        info = await eventually(planned_again)
    slot = fired.created_at
    assert info.missed == 1  # of the slots at +60 and +120, one is the late tick's, one missed
    assert info.next_due is not None and abs(info.next_due - (slot + 3 * every)) < 1.0  # on its grid


BERLIN = ZoneInfo("Europe/Berlin")


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
            with caplog.at_level(logging.WARNING, logger="taskwatch.scheduler"):
                now[0] = slot
                await eventually(lambda: any("scheduling failed" in r.getMessage() for r in caplog.records))
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
        await eventually(lambda: info(a, "hourly").next_due == slot + 3600)
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
            with caplog.at_level(logging.WARNING, logger="taskwatch.scheduler"):
                now[0] = slot + 0.2
                await eventually(lambda: any("scheduling failed" in r.getMessage() for r in caplog.records))
        finally:
            await asyncio.to_thread(other.execute, "ROLLBACK")
            other.close()
        now[0] = slot + 2.0
        await eventually(lambda: info(engine, "hourly").runs == 1)
        # fired late for its slot, then back on the grid it had
        await eventually(lambda: info(engine, "hourly").next_due not in (None, slot))
        assert info(engine, "hourly").next_due == slot + 3600


async def test_a_pause_while_a_ticks_write_waits_for_the_lock_leaves_the_run_it_stored_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the pause cancelled the tick as its write waited for the file's lock; the write committed
    # all the same and its run went, shown nowhere: runs=0 and last_run_id None for good
    path = tmp_path / "runs.db"
    start = 1_800_000_000.0
    now = [start]
    engine = make_engine(store=f"sqlite:///{path}", clock=lambda: now[0])

    @engine.periodic(every=3600, initial_delay=0.05)
    async def hourly(ctx: TaskContext) -> None: ...

    writing = asyncio.Event()
    claim = engine.store.claim_periodic_run

    def noted(*args: Any, **kwargs: Any) -> Any:
        writing.set()
        return claim(*args, **kwargs)

    monkeypatch.setattr(engine.store, "claim_periodic_run", noted)
    async with engine:
        other = await asyncio.to_thread(locked, path)
        try:
            now[0] = start + 0.05
            await asyncio.wait_for(writing.wait(), 10.0)
            engine.pause_periodic("hourly")
            assert info(engine, "hourly").paused and info(engine, "hourly").next_due is None
        finally:
            await asyncio.to_thread(other.execute, "ROLLBACK")
            other.close()
        stored = await eventually(lambda: engine.runs(task="hourly"))
        done = await engine.wait_for(stored[0].id)
        shown = await eventually(lambda: info(engine, "hourly").last_run_id and info(engine, "hourly"))
        assert (shown.runs, shown.last_run_id, shown.last_status) == (1, done.id, "succeeded")
        assert shown.paused and shown.next_due is None and shown.running_run_id is None
        assert len((await engine.store.query(task="hourly", limit=10)).runs) == 1


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


async def test_a_cron_task_given_a_zone_fires_at_that_zones_times_whatever_the_nodes_zone(new_york: None) -> None:
    # nodes sharing a store in different zones (a container on UTC beside a host on local
    # time) each fired "0 8 * * *" at its own 08:00: twice a day. A zone given keeps them to one
    frozen = datetime(2027, 1, 15, 0, 0, tzinfo=timezone.utc).timestamp()
    engine = Engine(health_interval=None, clock=lambda: frozen)

    @engine.periodic(cron="0 8 * * *", tz="Asia/Kolkata")
    async def nightly(ctx: TaskContext) -> None: ...

    @engine.periodic(cron="0 8 * * *")
    async def local(ctx: TaskContext) -> None: ...

    async with engine:
        ist, here = info(engine, "nightly"), info(engine, "local")
    assert (ist.tz, ist.trigger) == ("Asia/Kolkata", "cron 0 8 * * * (Asia/Kolkata)")
    assert ist.next_due == datetime(2027, 1, 15, 2, 30, tzinfo=timezone.utc).timestamp()  # 08:00 in Kolkata
    assert (here.tz, here.next_due) == (None, datetime(2027, 1, 15, 13, 0, tzinfo=timezone.utc).timestamp())


def test_a_zone_that_is_none_or_for_no_cron_task_is_refused_and_registers_nothing() -> None:
    engine = make_engine()

    async def f(ctx: TaskContext) -> None: ...

    for options, problem in [
        ({"cron": "0 8 * * *", "tz": "Mars/Olympus"}, "tz='Mars/Olympus': no time zone has that name"),
        ({"cron": "0 8 * * *", "tz": timezone.utc}, "give the zone's IANA name"),
        ({"every": 60, "tz": "UTC"}, "a time zone is for a cron task's times"),
    ]:
        with pytest.raises(InvalidConfiguration, match=problem):
            engine.periodic(f, **options)
    assert engine.schedule() == []


@pytest.mark.parametrize(
    "other_cron", ["1-59/2 * * * * *", "*/2 * * * * *"], ids=["other-times", "same-times"]
)
async def test_a_node_sharing_the_store_that_fires_a_cron_task_at_other_times_is_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, other_cron: str
) -> None:
    # two zones (a container on UTC beside a host on local time), or a rolling deploy that
    # changed the expression: the store records slots, so each node fired at its own times,
    # twice as often as asked, and nothing said so
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    here, other = make_engine(store=store, node_id="here"), make_engine(store=store, node_id="other")

    async def tick(ctx: TaskContext) -> None: ...

    here.periodic(tick, cron="*/2 * * * * *")
    other.periodic(tick, cron=other_cron)
    caplog.set_level(logging.WARNING, logger="taskwatch")
    async with here, other:
        fired = lambda: info(here, "tick").runs + info(other, "tick").runs  # noqa: E731
        if other_cron != "*/2 * * * * *":
            await eventually(lambda: "'*/2 * * * * *' in this node's local zone" in caplog.text, timeout=15)
            await eventually(lambda: fired() >= 6, timeout=15)
            # once a start, not at every tick
            assert caplog.text.count("no time of its cron '*/2 * * * * *'") == 1
            assert caplog.text.count(f"no time of its cron '{other_cron}'") == 1
        else:
            await eventually(lambda: fired() >= 3, timeout=15)
            assert "no time of its cron" not in caplog.text


async def test_ticks_the_full_run_queue_refuses_are_told_apart_from_overlaps_and_warned_of_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(max_concurrency=1, max_queue=2)
    release = asyncio.Event()

    @engine.task
    async def busy(ctx: TaskContext) -> None:
        await release.wait()

    @engine.periodic(every=0.02)
    async def beat(ctx: TaskContext) -> None: ...

    rec = Recorder(engine, ("periodic.skipped",))
    caplog.set_level(logging.WARNING, logger="taskwatch")
    async with engine:
        # one running and two queued: every tick of beat finds the queue full
        for _ in range(3):
            await engine.submit("busy")
        await eventually(lambda: len(rec.of("periodic.skipped")) >= 4)
        skips = rec.of("periodic.skipped")
        assert {(e.reason, e.running_run_id) for e in skips} == {("queue_full", None)}
        p = info(engine, "beat")
        assert p.refused == p.skipped >= 4 and p.runs == 0
        # one line for them all, where every tick logged one
        full = [r for r in caplog.records if "run queue is full" in r.getMessage()]
        assert len(full) == 1 and full[0].levelno == logging.WARNING
        release.set()
        await eventually(lambda: info(engine, "beat").runs >= 1)
    assert not stray_tasks()


@pytest.mark.parametrize("schedule", [{"every": 0.02}, {"every": 0.02, "fixed_rate": True}], ids=["end-based", "fixed-rate"])
async def test_a_run_a_stop_gave_up_on_holds_its_schedule_at_the_next_start_until_it_ends(
    schedule: dict[str, Any],
) -> None:
    """A periodic run whose code ignores every cancel outlives the stop, which records it
    cancelled and goes on. A start right after fired the schedule's next run beside it: two
    runs of one periodic task at once, which the schedule promises never happen. Now it
    waits for that run's real end (the interval counts from there)."""
    engine = make_engine(cancel_grace=0.02)
    release = asyncio.Event()
    stubborn_runs: list[str] = []
    ticks = 0

    @engine.periodic(**schedule)
    async def stubborn(ctx: TaskContext) -> None:
        stubborn_runs.append("began")
        try:
            if len(stubborn_runs) == 1:
                await swallowing_every_cancel(release)
        finally:
            stubborn_runs.append("ended")

    @engine.periodic(every=0.02)
    async def ticker(ctx: TaskContext) -> None:
        nonlocal ticks
        ticks += 1

    await engine.start()
    try:
        await eventually(lambda: stubborn_runs == ["began"])
        await asyncio.wait_for(engine.stop(timeout=0.02), 30)
        [record] = engine.runs(task="stubborn")
        assert record.cancel_reason == "shutdown"  # the record ended; its code goes on
        await engine.start()
        seen = ticks
        # the other schedule, on the same interval, runs a few times: the stubborn one's next
        # slot has come and gone as often
        await eventually(lambda: ticks >= seen + 5)
        assert stubborn_runs == ["began"], "a second run of the periodic task ran beside the first"
        release.set()
        await eventually(lambda: len(stubborn_runs) >= 4)
        assert stubborn_runs[:4] == ["began", "ended", "began", "ended"]
    finally:
        release.set()
        await engine.stop()
    assert not stray_tasks()
