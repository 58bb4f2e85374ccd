"""Supervised workers: restart with backoff, clean returns, leader-only workers, shutdown."""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any

import pytest
from taskwatch.engine import (
    DuplicateTask,
    Engine,
    InProcessLease,
    InvalidConfiguration,
    TaskContext,
    TaskDefinitionError,
)

from .helpers import Recorder, eventually, stray_tasks

# asyncio may fire a timer up to its clock resolution early; measured gaps get this slack
SLACK = 0.005


def engine_with(**options: object) -> Engine:
    return Engine(health_interval=None, **options)  # type: ignore[arg-type]


async def forever() -> None:
    await asyncio.Event().wait()


async def test_crashing_worker_restarts_with_growing_capped_backoff() -> None:
    engine = engine_with()
    starts: list[float] = []

    @engine.supervised(name="flaky", backoff=0.01, backoff_max=0.04)
    async def flaky(ctx: TaskContext) -> None:
        starts.append(asyncio.get_running_loop().time())
        raise ValueError(f"boom {len(starts)}")

    rec = Recorder(engine)
    async with engine:
        await eventually(lambda: engine.stats().supervised["flaky"]["crashes"] >= 5)
        counts = engine.stats().supervised["flaky"]
        info = engine.workers()[0]

    # each crash is restarted once its delay is over, so restarts trail crashes by one
    assert counts["state"] == "backoff"
    assert counts["restarts"] == counts["crashes"] - 1
    assert info.last_error is not None and info.last_error.type == "ValueError"

    crashes = rec.of("worker.crashed")[:5]
    assert [c.restart_in for c in crashes] == [0.01, 0.02, 0.04, 0.04, 0.04]
    assert [c.restarts for c in crashes] == [0, 1, 2, 3, 4]
    assert [s.restarts for s in rec.of("worker.started")[:5]] == [0, 1, 2, 3, 4]
    # the delays are really waited, not just announced
    for before, after, crash in zip(starts[:4], starts[1:5], crashes[:4], strict=True):
        assert after - before >= crash.restart_in - SLACK


async def test_crash_event_carries_exception_type_message_and_traceback() -> None:
    engine = engine_with()

    @engine.supervised(name="broken", backoff=0.5)
    async def broken(ctx: TaskContext) -> None:
        raise KeyError("missing-row")

    rec = Recorder(engine)
    async with engine:
        await eventually(lambda: rec.of("worker.crashed"))
        info = engine.workers()[0]

    crash = rec.of("worker.crashed")[0]
    assert crash.name == "broken"
    assert crash.error.type == "KeyError"
    assert "missing-row" in crash.error.message
    assert "Traceback (most recent call last)" in crash.error.traceback
    assert "in broken" in crash.error.traceback
    assert crash.restart_in == 0.5
    assert info.last_error == crash.error
    assert info.state == "backoff" and info.next_restart_at is not None
    after = engine.workers()[0]
    assert after.state == "stopped" and after.next_restart_at is None


async def test_a_worker_that_crashes_thousands_of_times_in_a_row_is_still_restarted() -> None:
    # the delay doubles per crash: past 1024 crashes an unbounded exponent overflowed, and the
    # worker was never restarted again while it still said "running"
    engine = engine_with()

    @engine.supervised(name="down", backoff=0.001, backoff_max=0.001)
    async def down(ctx: TaskContext) -> None:
        raise ConnectionError("the database is down")

    async with engine:
        await eventually(lambda: engine.stats().supervised["down"]["crashes"] >= 1_100, timeout=30.0)
        info = engine.workers()[0]
    assert info.state in ("backoff", "running") and info.restarts >= 1_099
    assert info.last_error is not None and info.last_error.type == "ConnectionError"
    assert not stray_tasks()


async def test_clean_return_restarts_after_base_backoff_and_resets_the_crash_streak() -> None:
    engine = engine_with()
    starts: list[float] = []
    script = ["crash", "crash", "return", "crash"]  # then run for good

    @engine.supervised(name="batch", backoff=0.01, backoff_max=1.0)
    async def batch(ctx: TaskContext) -> None:
        starts.append(asyncio.get_running_loop().time())
        step = script[len(starts) - 1] if len(starts) <= len(script) else "run"
        if step == "crash":
            raise RuntimeError(f"attempt {len(starts)}")
        if step == "run":
            await forever()

    rec = Recorder(engine, kinds=("worker.",))
    async with engine:
        await eventually(lambda: len(starts) == 5)
        counts = engine.stats().supervised["batch"]

    assert rec.kinds() == [
        "worker.started", "worker.crashed",
        "worker.started", "worker.crashed",
        "worker.started", "worker.stopped",
        "worker.started", "worker.crashed",
        "worker.started", "worker.stopped",
    ]  # fmt: skip
    assert rec.of("worker.stopped")[0].reason == "returned"
    assert rec.of("worker.stopped")[1].reason == "shutdown"
    # the return waits the base backoff, and the crash after it starts the streak over
    assert starts[3] - starts[2] >= 0.01 - SLACK
    assert [c.restart_in for c in rec.of("worker.crashed")] == [0.01, 0.02, 0.01]
    assert counts == {"state": "running", "restarts": 4, "crashes": 3}


async def test_a_long_healthy_run_resets_the_crash_streak() -> None:
    engine = engine_with()
    runs = 0

    @engine.supervised(name="steady", backoff=0.02, backoff_max=0.08)
    async def steady(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        if runs == 3:
            await asyncio.sleep(0.1)  # up longer than backoff_max: healthy until now
        if runs <= 3:
            raise RuntimeError("lost connection")
        await forever()

    rec = Recorder(engine)
    async with engine:
        await eventually(lambda: runs == 4)

    assert [c.restart_in for c in rec.of("worker.crashed")] == [0.02, 0.04, 0.02]


async def test_worker_gets_a_context_without_a_run() -> None:
    engine = engine_with(node_id="n1")
    seen: list[tuple[str, str | None, str, int, int]] = []

    @engine.supervised(name="janitor", leader_only=True)
    async def janitor(ctx: TaskContext) -> None:
        seen.append((ctx.name, ctx.run_id, ctx.node_id, ctx.term, await ctx.ensure_leader()))
        await forever()

    @engine.supervised(name="metrics")
    async def metrics(ctx: TaskContext) -> None:
        await forever()

    rec = Recorder(engine)
    async with engine:
        await eventually(lambda: seen and len(rec.of("worker.started")) == 2)
        states = {w.name: w.state for w in engine.workers()}

    assert seen == [("janitor", None, "n1", 1, 1)]
    assert {e.name: e.term for e in rec.of("worker.started")} == {"janitor": 1, "metrics": None}
    assert states == {"janitor": "running", "metrics": "running"}


async def test_leader_only_worker_runs_on_the_leader_only() -> None:
    lease = InProcessLease(ttl=0.3, renew_interval=0.05)
    engines = [engine_with(node_id=n, lease=lease) for n in ("a", "b")]
    running: dict[str, set[str]] = {"a": set(), "b": set()}
    for engine in engines:
        node = engine.node_id

        async def dedup(ctx: TaskContext, node: str = node) -> None:
            running[node].add("dedup")
            await forever()

        async def metrics(ctx: TaskContext, node: str = node) -> None:
            running[node].add("metrics")
            await forever()

        engine.supervised(dedup, name="dedup", leader_only=True)
        engine.supervised(metrics, name="metrics")

    a, b = engines
    try:
        await a.start()
        await b.start()
        await eventually(lambda: running["a"] == {"dedup", "metrics"} and running["b"])

        assert running["b"] == {"metrics"}
        assert {w.name: w.state for w in b.workers()} == {
            "dedup": "waiting_for_leadership",
            "metrics": "running",
        }
        assert b.stats().supervised["dedup"]["state"] == "waiting_for_leadership"
    finally:
        await a.stop(1.0)
        await b.stop(1.0)


async def test_stop_cancels_workers_lets_them_clean_up_and_leaves_no_task() -> None:
    engine = engine_with()
    cleaned: list[str] = []

    @engine.supervised(name="holder")
    async def holder(ctx: TaskContext) -> None:
        try:
            await forever()
        finally:
            await asyncio.sleep(0)  # cleanup may await
            cleaned.append(ctx.name)

    @engine.supervised(name="crasher", backoff=30.0, backoff_max=30.0)
    async def crasher(ctx: TaskContext) -> None:
        raise RuntimeError("always")

    rec = Recorder(engine, kinds=("worker.",))
    await engine.start()
    await eventually(lambda: rec.of("worker.crashed") and len(rec.of("worker.started")) == 2)

    await asyncio.wait_for(engine.stop(1.0), timeout=2.0)

    assert cleaned == ["holder"]
    assert sorted((e.name, e.reason) for e in rec.of("worker.stopped")) == [
        ("crasher", "shutdown"),
        ("holder", "shutdown"),
    ]
    assert {w.state for w in engine.workers()} == {"stopped"}
    assert not stray_tasks()


async def test_worker_that_swallows_cancellation_is_not_restarted() -> None:
    engine = engine_with()
    swallowed = 0

    @engine.supervised(name="stubborn", backoff=0.01)
    async def stubborn(ctx: TaskContext) -> None:
        nonlocal swallowed
        while True:
            try:
                await forever()
            except asyncio.CancelledError:
                swallowed += 1
                if swallowed == 2:
                    return  # gives up on the second cancel

    rec = Recorder(engine, kinds=("worker.",))
    await engine.start()
    await eventually(lambda: rec.of("worker.started"))

    await asyncio.wait_for(engine.stop(0.05), timeout=2.0)

    assert swallowed == 2  # cancelled again once the stop deadline passed
    assert rec.kinds() == ["worker.started", "worker.stopped"]
    assert rec.of("worker.stopped")[0].reason == "shutdown"
    assert not stray_tasks()


@pytest.mark.parametrize("stop", ["engine", "worker"])
async def test_a_worker_that_never_lets_a_cancel_through_does_not_hang_stop(
    stop: str, caplog: pytest.LogCaptureFixture
) -> None:
    # a bug in that worker: stop() and stop_worker() say so and return, as they do for runs
    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    engine = engine_with(cancel_grace=0.05, node_id="node-7")
    stubborn_to_the_end = True

    @engine.supervised(name="stubborn")
    async def stubborn(ctx: TaskContext) -> None:
        while True:
            try:
                await forever()
            except asyncio.CancelledError:
                if not stubborn_to_the_end:
                    raise

    await engine.start()
    await eventually(lambda: engine.workers()[0].state == "running")
    try:
        if stop == "engine":
            await asyncio.wait_for(engine.stop(0.05), timeout=10)
            assert engine.state == "stopped"
        else:
            await asyncio.wait_for(engine.stop_worker("stubborn"), timeout=10)
            assert engine.workers()[0].stopped_by_user
        # the log names the node too: several engines may share one process and its log
        [warning] = [r.getMessage() for r in caplog.records if "ignored cancellation" in r.getMessage()]
        assert "node-7" in warning and "taskwatch-worker-stubborn" in warning
    finally:
        stubborn_to_the_end = False  # let the test end: the worker's task goes with a last cancel
        left = [task for task in stray_tasks() if task.get_name() == "taskwatch-worker-stubborn"]
        assert left, "the stubborn worker was waited for after all?"
        for task in left:
            task.cancel()
        await asyncio.wait(left, timeout=10)
        await engine.stop(1.0)
    assert not stray_tasks()


async def test_a_cancelled_error_raised_by_the_worker_itself_is_a_crash() -> None:
    engine = engine_with()
    runs = 0

    @engine.supervised(name="inner", backoff=0.01)
    async def inner(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        if runs == 1:
            raise asyncio.CancelledError()  # e.g. awaited a future someone else cancelled
        await forever()

    rec = Recorder(engine)
    async with engine:
        await eventually(lambda: runs == 2)

    assert rec.of("worker.crashed")[0].error.type == "CancelledError"


async def test_worker_added_to_a_running_engine_starts_at_once() -> None:
    engine = engine_with()
    started = asyncio.Event()
    async with engine:

        @engine.supervised(name="late")
        async def late(ctx: TaskContext) -> None:
            started.set()
            await forever()

        await asyncio.wait_for(started.wait(), timeout=10)
        assert engine.workers()[0].state == "running"
    assert not stray_tasks()


async def test_engine_restarted_after_stop_runs_its_workers_again() -> None:
    engine = engine_with()
    runs = 0

    @engine.supervised(name="w")
    async def w(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        await forever()

    async with engine:
        await eventually(lambda: runs == 1)
    async with engine:
        await eventually(lambda: runs == 2)
    assert engine.workers()[0].state == "stopped"
    assert not stray_tasks()


def test_bad_registrations_are_refused() -> None:
    engine = engine_with()

    async def ok(ctx: TaskContext) -> None: ...

    def not_async(ctx: TaskContext) -> None: ...

    engine.supervised(ok)
    with pytest.raises(DuplicateTask):
        engine.supervised(ok)
    with pytest.raises(TaskDefinitionError):
        engine.supervised(not_async)
    with pytest.raises(ValueError, match="backoff"):
        engine.supervised(ok, name="zero", backoff=0)
    with pytest.raises(ValueError, match="backoff_max"):
        engine.supervised(ok, name="inverted", backoff=2.0, backoff_max=1.0)
    assert [w.name for w in engine.workers()] == ["ok"]


async def test_backoffs_given_as_strings_are_read_as_numbers_and_the_worker_keeps_restarting() -> None:
    # as every other option is read: the checked value is kept, not the str it was given as
    engine = engine_with()

    @engine.supervised(name="flaky", backoff="0.01", backoff_max="0.02")  # type: ignore[arg-type]
    async def flaky(ctx: TaskContext) -> None:
        raise RuntimeError("db down")

    rec = Recorder(engine, kinds=("worker.crashed",))
    async with engine:
        await eventually(lambda: engine.workers()[0].crashes >= 3)
        assert engine.workers()[0].state in ("backoff", "running")
    assert [c.restart_in for c in rec.of("worker.crashed")[:3]] == [0.01, 0.02, 0.02]
    assert not stray_tasks()


SURROGATE_NAME = "report-\udcff"  # what os.fsdecode() makes of a non-UTF-8 file name


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"name": 123}, "name"),
        ({"name": ""}, "name"),
        ({"name": SURROGATE_NAME}, "UTF-8"),
        ({"leader_only": "yes"}, "leader_only"),
        ({"leader_only": None}, "leader_only"),
        ({"backoff": 1e-9, "backoff_max": 1e-9}, "backoff"),
        ({"backoff": True}, "backoff"),
    ],
)
async def test_a_refused_worker_leaves_nothing_registered(options: dict[str, Any], option: str) -> None:
    engine = engine_with()

    async def w(ctx: TaskContext) -> None:
        await forever()

    with pytest.raises(InvalidConfiguration, match=option):
        engine.supervised(w, **options)
    # nothing half-registered: the engine still reports, and the name is free
    assert engine.workers() == []
    assert engine.stats().supervised == {}
    engine.snapshot().model_dump_json()
    engine.supervised(w, name="w")
    assert [x.name for x in engine.workers()] == ["w"]


def test_task_names_no_event_could_carry_are_refused() -> None:
    engine = engine_with()

    async def job(ctx: TaskContext) -> None: ...

    for bad in (SURROGATE_NAME, 123):
        with pytest.raises(InvalidConfiguration, match="name"):
            engine.task(job, name=bad)  # type: ignore[call-overload]
        with pytest.raises(InvalidConfiguration, match="name"):
            engine.periodic(job, every=60, name=bad)  # type: ignore[call-overload]
    assert engine.tasks() == {} and engine.schedule() == []
    engine.snapshot().model_dump_json()


def test_a_worker_registered_from_the_callers_thread_runs_on_a_background_engine() -> None:
    engine = engine_with()
    bg = engine.start_background()
    ran = threading.Event()

    async def late(ctx: TaskContext) -> None:
        ran.set()
        await forever()

    try:
        engine.supervised(late, name="late")
        assert ran.wait(5), "the worker never started"
        assert [(w.name, w.state) for w in bg.workers()] == [("late", "running")]
        with pytest.raises(DuplicateTask):
            engine.supervised(late, name="late")
    finally:
        bg.stop()
    assert [(w.name, w.state) for w in engine.workers()] == [("late", "stopped")]


async def test_an_error_in_a_workers_cleanup_during_a_stop_is_logged_and_kept(caplog: pytest.LogCaptureFixture) -> None:
    engine = engine_with()
    started = asyncio.Event()

    @engine.supervised(name="batcher")
    async def batcher(ctx: TaskContext) -> None:
        started.set()
        try:
            await forever()
        finally:
            raise RuntimeError("flush of the in-flight batch failed: 42 rows lost")

    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    async with engine:
        await asyncio.wait_for(started.wait(), 1.0)
        info = await engine.stop_worker("batcher")

    assert info.state == "stopped" and info.crashes == 0
    assert info.last_error is not None and "42 rows lost" in info.last_error.message
    assert info.last_error_at is not None
    logged = [r for r in caplog.records if "batcher" in r.getMessage() and r.exc_info]
    assert logged and logged[0].levelno == logging.WARNING
    assert not stray_tasks()


async def test_a_restart_and_a_stop_issued_together_end_stopped() -> None:
    engine = engine_with()
    runs = 0

    @engine.supervised(name="w")
    async def w(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        try:
            await forever()
        finally:
            await asyncio.sleep(0.01)  # a short, well-behaved cleanup

    async with engine:
        await eventually(lambda: runs == 1)
        restarted, stopped = await asyncio.gather(engine.restart_worker("w"), engine.stop_worker("w"))
        assert restarted.state == "running"
        assert stopped.state == "stopped" and stopped.stopped_by_user
        info = engine.workers()[0]
        assert info.state == "stopped" and info.stopped_by_user
        # the stop came last and holds: no run is left going
        assert not [t for t in stray_tasks() if t.get_name() == "taskwatch-worker-w"]
    assert runs == 2


async def test_a_start_during_a_stop_runs_the_worker_again_once_it_has_ended() -> None:
    engine = engine_with()
    runs = 0
    cleanup_may_end = asyncio.Event()

    @engine.supervised(name="w")
    async def w(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        try:
            await forever()
        finally:
            if runs == 1:
                await cleanup_may_end.wait()

    async with engine:
        await eventually(lambda: runs == 1)
        stopping = asyncio.ensure_future(engine.stop_worker("w"))
        await eventually(lambda: engine.workers()[0].stopped_by_user)
        engine.start_worker("w")
        cleanup_may_end.set()
        await stopping
        await eventually(lambda: runs == 2)
        info = engine.workers()[0]
        assert info.state == "running" and not info.stopped_by_user
    assert not stray_tasks()


async def test_a_restart_whose_caller_stops_waiting_still_starts_the_worker_again() -> None:
    engine = Engine(health_interval=None, cancel_grace=30)
    starts = 0
    cleaning = asyncio.Event()
    cleaned = asyncio.Event()

    @engine.supervised(name="indexer")
    async def indexer(ctx: TaskContext) -> None:
        nonlocal starts
        starts += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()  # a cleanup that takes a while (flushing a buffer, say)
            raise

    async with engine:
        await eventually(lambda: starts == 1)
        restarting = asyncio.create_task(engine.restart_worker("indexer"))
        await cleaning.wait()
        restarting.cancel()  # the caller gives up (a request's timeout, say)
        with pytest.raises(asyncio.CancelledError):
            await restarting
        cleaned.set()
        await eventually(lambda: starts == 2)
        await eventually(lambda: engine.workers()[0].state == "running")
    assert not stray_tasks()
