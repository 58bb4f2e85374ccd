"""What an outage of the store or of the events' transport puts in the log: for each loop that
meets it, one warning when it starts (the store's own message, no traceback), debug lines while
it lasts, and one info line when it ends, however long it lasts and however many loops retry.

A real SQLite file whose tables another connection takes away, and a real ``redis-server``
stopped and started again.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, RedisEventRelay, SqliteStore, StoreUnavailable, TaskContext
from taskwatch.engine.bus import EventBus
from taskwatch.engine.events import BaseEvent, RunSubmitted

from .helpers import eventually, table_away
from .redis_server import RedisServer


def said(caplog: pytest.LogCaptureFixture, logger: str, level: int, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger and r.levelno == level and text in r.getMessage()]


async def test_a_store_outage_is_one_warning_per_loop_and_one_line_when_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="taskwatch")
    path = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{path}", health_interval=None, poll_interval=0.02)

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> None:
        return None

    @engine.periodic(every=0.05, name="tick")
    async def tick(ctx: TaskContext) -> None:
        return None

    # the table goes away right as a tick's run has finished: one still going then would hold
    # its schedule (an interval counts from a run's end) until its outcome could be written
    other = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    gone = asyncio.Event()

    def take_away(event: BaseEvent) -> None:
        if not gone.is_set() and getattr(event, "task", None) == "tick":
            other.execute("ALTER TABLE runs RENAME TO runs_away")
            gone.set()

    engine.bus.add_callback(take_away, ["run.succeeded"])
    async with engine:
        try:
            await gone.wait()
            # many tries of each loop while the table is away
            await eventually(lambda: len(said(caplog, "taskwatch.executor", logging.DEBUG, "claiming runs failed again")) >= 5)
            await eventually(lambda: len(said(caplog, "taskwatch.scheduler", logging.DEBUG, "failed again")) >= 3)
        finally:
            await asyncio.to_thread(other.execute, "ALTER TABLE runs_away RENAME TO runs")
            other.close()
        await eventually(lambda: said(caplog, "taskwatch.executor", logging.INFO, "claiming runs works again after"))
        await eventually(lambda: said(caplog, "taskwatch.scheduler", logging.INFO, "scheduling works again after"))
        assert (await (await engine.submit("t")).wait(10)).status == "succeeded"

    loud = [r for r in caplog.records if r.name.startswith("taskwatch") and r.levelno >= logging.WARNING]
    claims = [r for r in loud if r.name == "taskwatch.executor" and "claiming runs failed" in r.getMessage()]
    ticks = [r for r in loud if r.name == "taskwatch.scheduler" and "'tick': scheduling failed" in r.getMessage()]
    # once each, as warnings naming the store's own error and what to check
    assert len(claims) == 1 and len(ticks) == 1, [r.getMessage() for r in loud]
    for record in claims + ticks:
        assert record.levelno == logging.WARNING
        assert "StoreUnavailable" in record.getMessage() and "no such table: runs" in record.getMessage()
        assert "further failures are logged at debug level" in record.getMessage()
    # a store error's traceback shows only the engine's frames: none is logged at all
    assert not [r for r in loud if r.exc_info], [r.getMessage() for r in loud if r.exc_info]
    ended = said(caplog, "taskwatch.executor", logging.INFO, "claiming runs works again after")
    assert len(ended) == 1 and "failed tries" in ended[0].getMessage()


class ScriptedStore(SqliteStore):
    """A store of the user's own making whose claims raise ``errors`` in turn, then work."""

    def __init__(self, path: Path, errors: list[BaseException]) -> None:
        super().__init__(path)
        self.errors = errors
        self.failures = 0

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        if self.failures < len(self.errors):
            self.failures += 1
            raise self.errors[self.failures - 1]
        return await super().claim(*args, **kwargs)


async def failing_claims(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, errors: list[BaseException]
) -> list[logging.LogRecord]:
    """Runs one run through claims that first raise ``errors``; the executor's warnings and
    worse that says of them (each of the errors raised)."""
    caplog.set_level(logging.DEBUG, logger="taskwatch")
    store = ScriptedStore(tmp_path / "runs.db", errors)
    engine = Engine(store=store, health_interval=None, poll_interval=0.02)

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> None:
        return None

    async with engine:
        assert (await (await engine.submit("t")).wait(10)).status == "succeeded"
    assert store.failures == len(errors)
    return [r for r in caplog.records if r.name == "taskwatch.executor" and r.levelno >= logging.WARNING]


async def test_an_unexpected_error_in_a_loop_keeps_its_traceback_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # an error that is no store error is a bug to report: its traceback is logged, once
    loud = await failing_claims(tmp_path, caplog, [LookupError(f"shard map not loaded yet ({i})") for i in range(4)])
    assert len(loud) == 1, [r.getMessage() for r in loud]
    assert loud[0].levelno == logging.ERROR and loud[0].exc_info is not None
    assert loud[0].exc_info[0] is LookupError
    assert said(caplog, "taskwatch.executor", logging.INFO, "claiming runs works again after")


async def test_an_events_transport_outage_is_one_warning_each_way_and_one_line_when_it_ends(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="taskwatch")
    bus = EventBus(node="w")
    relay = RedisEventRelay(redis_server.url, bus, stream="tw:outage-logs", read_block=0.05)
    await relay.start()
    try:
        bus.emit(RunSubmitted, run_id="r1", task="t")
        await eventually(lambda: relay.stats().published == 1, timeout=10)
        redis_server.stop()
        bus.emit(RunSubmitted, run_id="r2", task="t")
        # the relay backs off up to 2 s between tries: a few tries of each direction
        await eventually(lambda: len(said(caplog, "taskwatch.events", logging.DEBUG, "failed again")) >= 4, timeout=15)
        redis_server.start()
        await eventually(lambda: relay.stats().published == 2, timeout=15)
        await eventually(lambda: said(caplog, "taskwatch.events", logging.INFO, "reading events from"), timeout=15)
    finally:
        await relay.stop()

    warnings = [r for r in caplog.records if r.name == "taskwatch.events" and r.levelno >= logging.WARNING]
    publishing = [r for r in warnings if r.getMessage().startswith("publishing events to")]
    reading = [r for r in warnings if r.getMessage().startswith("reading events from")]
    assert len(publishing) == 1 and len(reading) == 1, [r.getMessage() for r in warnings]
    assert said(caplog, "taskwatch.events", logging.INFO, "publishing events to")


async def test_an_error_of_another_kind_within_an_outage_is_said_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outage = [StoreUnavailable("shards", "its shard map is loading", "wait a moment") for _ in range(3)]
    loud = await failing_claims(tmp_path, caplog, [*outage, *(KeyError("shard 7") for _ in range(3))])
    # the outage once, then the bug once, with its traceback: neither buried at debug level
    assert [(r.levelno, r.exc_info is not None) for r in loud] == [(logging.WARNING, False), (logging.ERROR, True)]
    assert "StoreUnavailable" in loud[0].getMessage() and loud[1].exc_info[0] is KeyError  # type: ignore[index]
    [ended] = said(caplog, "taskwatch.executor", logging.INFO, "claiming runs works again after")
    assert "(6 failed tries)" in ended.getMessage()


async def test_a_node_cut_off_from_its_store_does_not_say_claiming_works_again_until_it_does(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # cut off (no heartbeat for a lease), the node asks the store for no claims at all: rounds
    # that ask nothing say nothing of the outage
    caplog.set_level(logging.DEBUG, logger="taskwatch")
    path = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{path}", health_interval=None, poll_interval=0.02, lease_ttl=0.6)

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> None:
        return None

    async with engine:
        async with table_away(path, "runs"), table_away(path, "nodes"):
            await eventually(lambda: said(caplog, "taskwatch.executor", logging.WARNING, "has not reached its store"), 10)
            # the heartbeat, still failing, is the clock: a few more of its tries
            beats = len(said(caplog, "taskwatch.executor", logging.DEBUG, "the heartbeat failed again"))
            await eventually(
                lambda: len(said(caplog, "taskwatch.executor", logging.DEBUG, "the heartbeat failed again")) >= beats + 3, 10
            )
            assert not said(caplog, "taskwatch.executor", logging.INFO, "claiming runs works again")
        await eventually(lambda: said(caplog, "taskwatch.executor", logging.INFO, "claiming runs works again after"), 10)
        assert (await (await engine.submit("t")).wait(10)).status == "succeeded"
