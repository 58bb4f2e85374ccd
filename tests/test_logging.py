"""What reaches the log when user code fails: runs, queue jobs, supervised workers.

An operator whose logs go to a collector sees every failure there once, with its
traceback; a retry is one INFO line; success and cancellation log nothing. Values
from users (an exception's message) cannot start a line of their own.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from taskwatch.engine import Engine, RunStatus, TaskContext

from .helpers import eventually, stray_tasks
from .test_durable import Child

# a message trying to pass for a record of its own on a line-based collector
FORGED = "bad input\n2026-01-01 00:00:00 CRITICAL taskwatch: forged"


def make_engine(store: str, tmp_path: Path) -> Engine:
    if store == "sqlite":
        return Engine(store=f"sqlite:///{tmp_path / 'r.db'}", health_interval=None)
    return Engine(health_interval=None)


def records(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_task_failing_every_try_logs_each_retry_and_its_final_failure_once(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(store, tmp_path)

    @engine.task(name="flaky", retries=2, backoff=0.001, backoff_max=0.002)
    async def explode_every_time(ctx: TaskContext) -> None:
        raise ValueError(FORGED)

    caplog.set_level(logging.DEBUG, logger="taskwatch.runs")
    async with engine:
        handle = await engine.submit("flaky")
        record = await handle.wait(timeout=10)
    assert record.status is RunStatus.FAILED and record.attempt == 3

    logged = records(caplog, "taskwatch.runs")
    assert [r.levelno for r in logged] == [logging.INFO, logging.INFO, logging.WARNING]
    for n, retry in enumerate(logged[:2], start=1):
        text = retry.getMessage()
        assert "\n" not in text  # one line, the message's newline escaped
        assert text.startswith(f"run {handle.id} of task 'flaky' failed on try {n} of 3 (ValueError: bad input\\n2026")
        assert "trying again in" in text
    final = logged[2].getMessage().split("\n")
    assert final[0] == (
        f"run {handle.id} of task 'flaky' failed on try 3 of 3: "
        "ValueError: bad input\\n2026-01-01 00:00:00 CRITICAL taskwatch: forged"
    )
    assert final[1] == "Traceback (most recent call last):"
    # the traceback comes once, cut to the user's own frames
    assert logged[2].getMessage().count("explode_every_time") == 1
    assert "taskwatch/engine" not in logged[2].getMessage() and "/engine/execution.py" not in logged[2].getMessage()


async def test_a_run_that_times_out_for_good_logs_a_warning_with_the_line_it_waited_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine("memory", tmp_path)

    @engine.task(name="slow", timeout=0.02)
    async def wait_on_upstream(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    caplog.set_level(logging.DEBUG, logger="taskwatch.runs")
    async with engine:
        record = await (await engine.submit("slow")).wait(timeout=10)
    assert record.status is RunStatus.FAILED

    [warning] = records(caplog, "taskwatch.runs")
    assert warning.levelno == logging.WARNING
    first, *rest = warning.getMessage().split("\n")
    assert first.endswith("failed on try 1 of 1: TimeoutError: run exceeded its 0.02 s timeout")
    assert any("wait_on_upstream" in line for line in rest)


async def test_succeeded_and_cancelled_runs_log_nothing_only_the_failed_one_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine("memory", tmp_path)
    started = asyncio.Event()

    @engine.task(name="ok")
    async def ok(ctx: TaskContext) -> int:
        return 1

    @engine.task(name="long", retries=3)
    async def long(ctx: TaskContext) -> None:
        started.set()
        await asyncio.Event().wait()

    @engine.task(name="broken")
    async def broken(ctx: TaskContext) -> None:
        raise RuntimeError("broken")

    caplog.set_level(logging.DEBUG, logger="taskwatch.runs")
    async with engine:
        succeeded = await (await engine.submit("ok")).wait(timeout=10)
        cancelled = await engine.submit("long")
        await asyncio.wait_for(started.wait(), 5)
        await engine.cancel(cancelled.id)
        cancelled_record = await cancelled.wait(timeout=10)
        failed = await engine.submit("broken")
        await failed.wait(timeout=10)
    assert succeeded.status is RunStatus.SUCCEEDED and cancelled_record.status is RunStatus.CANCELLED

    logged = records(caplog, "taskwatch.runs")
    assert [r.getMessage().split("\n")[0] for r in logged] == [
        f"run {failed.id} of task 'broken' failed on try 1 of 1: RuntimeError: broken"
    ]


async def test_a_run_its_recovery_fails_logs_one_warning_on_the_recovering_node(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "runs.db"
    # a process killed by its own run (on_lost="fail"): the run stays claimed in the file
    first = Child(db, "worker-1", "run", "--submit", "suicide_fail", "--count", "1")
    try:
        [run_id] = first.event("submitted")["ids"]
        assert await asyncio.to_thread(first.exit) == -signal.SIGKILL
    finally:
        first.close()

    caplog.set_level(logging.DEBUG, logger="taskwatch.runs")
    engine = Engine(store=f"sqlite:///{db}", node_id="worker-1", health_interval=None)
    async with engine:  # its start recognises its previous incarnation and recovers the run
        record = await engine.handle(run_id).wait(timeout=10)
    assert record.status is RunStatus.FAILED

    [warning] = records(caplog, "taskwatch.runs")
    assert warning.levelno == logging.WARNING
    text = warning.getMessage()
    assert text.startswith(f"run {run_id} of task 'suicide_fail' failed on try 1 of 1: WorkerLost: ")
    assert "\n" not in text  # no traceback: the attempt's died with its process


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_queue_job_that_fails_logs_one_warning_with_its_traceback(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(store, tmp_path)

    async def handle_order(job: dict[str, int]) -> None:
        if job["n"] == 2:
            raise KeyError("sku\r\nforged")

    queue = engine.queue("orders", handle_order)
    caplog.set_level(logging.DEBUG, logger="taskwatch.queues")
    async with engine:
        for n in range(1, 4):
            await queue.put({"n": n})
        await asyncio.wait_for(queue.join(), 10)
    assert queue.info().failed == 1

    [warning] = [r for r in records(caplog, "taskwatch.queues") if "failed" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    first, *rest = warning.getMessage().split("\n")
    assert first.startswith("queue 'orders': ") and "KeyError: 'sku\\r\\nforged'" in first
    assert rest[0] == "Traceback (most recent call last):"
    assert sum("handle_order" in line for line in rest) == 1
    assert not stray_tasks()


async def test_a_supervised_workers_crash_line_has_its_message_and_the_streaks_first_its_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = Engine(health_interval=None)

    # (a cap well above how long a crash takes: the streak is not reset as healthy)
    @engine.supervised(name="feed", backoff=0.001, backoff_max=0.05)
    async def follow_upstream(ctx: TaskContext) -> None:
        raise ConnectionError("upstream refused\nforged line")

    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    async with engine:
        await eventually(lambda: engine.stats().supervised["feed"]["crashes"] >= 3)

    crashes = [r.getMessage() for r in records(caplog, "taskwatch.supervisor") if "crashed" in r.getMessage()]
    assert len(crashes) >= 3
    first, *traceback = crashes[0].split("\n")
    assert first.startswith("supervised worker 'feed' crashed (ConnectionError: upstream refused\\nforged line)")
    assert traceback[0] == "Traceback (most recent call last):"
    assert any("follow_upstream" in line for line in traceback)
    # the rest of the streak: the line alone
    for later in crashes[1:3]:
        assert "\n" not in later and "upstream refused\\nforged line" in later


class _Broken(logging.Handler):
    """A log shipper whose collector is down: it raises from emit, or from its filter."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def filter(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if self.where == "filter":
            raise OSError("log collector down")
        return True

    def emit(self, record: logging.LogRecord) -> None:
        raise OSError("log collector down")


@pytest.fixture(params=["emit", "filter"])
def broken_handler(request: pytest.FixtureRequest) -> Iterator[None]:
    logger = logging.getLogger("taskwatch")
    handler = _Broken(request.param)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    yield
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.mark.usefixtures("broken_handler")
async def test_a_log_handler_that_raises_does_not_stop_a_workers_restarts() -> None:
    engine = Engine(health_interval=None)
    starts = 0

    @engine.supervised(name="w", backoff=0.001, backoff_max=0.002)
    async def w(ctx: TaskContext) -> None:
        nonlocal starts
        starts += 1
        raise RuntimeError("crash")

    async with engine:
        await eventually(lambda: starts >= 4)
        [info] = engine.workers()
        assert info.crashes >= 3
    assert not stray_tasks()


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_periodic_task_failing_the_same_way_logs_its_traceback_once_a_streak(
    store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a schedule failing every tick for one reason (its database is down) would bury the log
    # under copies of one traceback: it comes with the first failure, and again for a new kind
    engine = make_engine(store, tmp_path)
    script = ["down", "down", "down", "slow", "ok", "down"]
    ended: list[str] = []
    engine.bus.add_callback(lambda e: ended.append(e.kind), ["run.succeeded", "run.failed"])

    @engine.periodic(every=0.01, name="sync")
    async def sync(ctx: TaskContext) -> None:
        step = script.pop(0) if script else "ok"
        if step == "down":
            raise ConnectionError("database is down")
        if step == "slow":
            raise TimeoutError("database is slow")

    @engine.task(name="once")
    async def once(ctx: TaskContext) -> None:
        raise ConnectionError("database is down")

    caplog.set_level(logging.DEBUG, logger="taskwatch.runs")
    async with engine:
        await eventually(lambda: len(ended) >= 6)
        # a one-shot task's failures are each a request of their own: each keeps its traceback
        for _ in range(2):
            await (await engine.submit("once")).wait(10)

    logged = [r.getMessage() for r in records(caplog, "taskwatch.runs")]
    periodic = [m for m in logged if "of task 'sync'" in m or "periodic task 'sync'" in m][:6]
    assert ["Traceback" in m for m in periodic] == [True, False, False, True, False, True], periodic
    assert "(2 runs of this periodic task failed in a row" in periodic[1]
    assert "(3 runs of this periodic task failed in a row" in periodic[2]
    assert "TimeoutError: database is slow" in periodic[3]
    assert "periodic task 'sync' succeeded again" in periodic[4] and "after 4 failed run(s) in a row" in periodic[4]
    assert "ConnectionError: database is down" in periodic[5]
    assert [("Traceback" in m) for m in logged if "of task 'once'" in m] == [True, True]


async def test_a_periodic_tasks_failure_after_a_restart_logs_its_traceback_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the streak is of runs in a row on one start: what ran meanwhile (another node sharing the
    # store may have run the task with success) is not known, so the next failure tells all again
    engine = make_engine("sqlite", tmp_path)
    failed: list[str] = []
    engine.bus.add_callback(lambda e: failed.append(e.run_id), ["run.failed"])

    @engine.periodic(every=0.01, name="sync")
    async def sync(ctx: TaskContext) -> None:
        raise ConnectionError("database is down")

    caplog.set_level(logging.DEBUG, logger="taskwatch.runs")

    def logged() -> list[str]:
        return [r.getMessage() for r in records(caplog, "taskwatch.runs") if "of task 'sync'" in r.getMessage()]

    async with engine:
        await eventually(lambda: len(failed) >= 2)
    first = logged()
    assert ["Traceback" in m for m in first[:2]] == [True, False]
    async with engine:
        await eventually(lambda: len(logged()) > len(first))
    assert "Traceback" in logged()[len(first)]
