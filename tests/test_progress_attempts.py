"""A run's progress is its attempt's own: each attempt starts with none, in the engine's record,
in the store's row as read back (a retry; a run a restart took up again), in the dashboard's
model and in its run detail. Until the next attempt starts, a run waiting for its retry shows
how far the failed attempt got, beside that attempt's error."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, Progress, RunStatus, TaskContext
from taskwatch.engine.runs import RunError
from taskwatch.engine.store import NewRun, Retry, SqliteStore, Store
from taskwatch.tui.state import DashboardState
from taskwatch.widgets import RunDetail

from .helpers import Recorder, each_store, eventually
from .test_widgets import Host

NONE = Progress()


class Attempts:
    """A task whose first attempt reports 3 of 4 and fails once ``fail`` is set; later attempts
    wait for ``go``."""

    def __init__(self, *, fail_at_once: bool = True) -> None:
        self.started: dict[int, asyncio.Event] = {}
        self.fail = asyncio.Event()
        if fail_at_once:
            self.fail.set()
        self.go = asyncio.Event()

    def entered(self, attempt: int) -> asyncio.Event:
        return self.started.setdefault(attempt, asyncio.Event())

    async def body(self, ctx: TaskContext) -> str:
        self.entered(ctx.attempt).set()
        if ctx.attempt == 1:
            await ctx.progress(3, 4, "attempt 1 got to step 3")
            await self.fail.wait()
            raise RuntimeError("boom")
        await self.go.wait()
        await ctx.progress(1, 4, f"attempt {ctx.attempt} step 1")
        return "ok"


async def test_a_retry_starts_with_no_progress_in_the_record_and_the_dashboard() -> None:
    engine = Engine(health_interval=None)
    attempts = Attempts()
    engine.task(name="job", retries=1, backoff=0)(attempts.body)
    recorder = Recorder(engine)
    async with engine:
        handle = await engine.submit("job")
        await asyncio.wait_for(attempts.entered(2).wait(), 10)
        record = engine.get(handle.id)
        assert (record.status, record.attempt) == (RunStatus.RUNNING, 2)
        assert record.progress == NONE
        assert record.error is not None and record.error.message == "boom"  # the last failed attempt's

        # the dashboard's model, from the engine's own events: pending after attempt 1 it shows
        # how far that attempt got; attempt 2's start clears it
        events = recorder.events
        retried = next(i for i, e in enumerate(events) if e.kind == "run.retrying")
        state = DashboardState()
        state.apply(events[: retried + 1])
        waiting = state.runs[handle.id].record()
        assert waiting.status is RunStatus.PENDING
        assert (waiting.progress.done, waiting.progress.total) == (3, 4)
        state.apply(events[retried + 1 :])
        shown = state.runs[handle.id].record()
        assert (shown.status, shown.attempt, shown.progress) == (RunStatus.RUNNING, 2, NONE)

        # and the run detail draws no progress once the next attempt started
        detail = RunDetail()
        async with Host(detail).run_test() as pilot:
            detail.show(waiting)
            await pilot.pause()
            row = detail.query_one("#run-detail-progress-row")
            assert row.display
            detail.show(shown)
            await pilot.pause()
            assert not row.display
            assert not detail.query_one("#run-detail-progress").display

        attempts.go.set()
        final = await handle.wait(timeout=10)
    assert final.status is RunStatus.SUCCEEDED
    assert (final.progress.done, final.progress.total, final.progress.message) == (1, 4, "attempt 2 step 1")


async def eventually_async(predicate: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """``eventually`` for a predicate that reads the store (a coroutine)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, f"condition not met within {timeout} s: {predicate}"
        await asyncio.sleep(0.01)


async def stored_progress(store: SqliteStore, run_id: str) -> Progress | None:
    stored = await store.get(run_id)
    return None if stored is None else stored.progress


async def test_a_retry_on_sqlite_starts_with_no_progress_in_its_stored_row(tmp_path: Path) -> None:
    # a short lease: the claims' heartbeats, which write the attempts' progress, come often
    store = SqliteStore(tmp_path / "runs.db", lease_ttl=0.3)
    engine = Engine(store=store, node_id="n", health_interval=None)
    attempts = Attempts(fail_at_once=False)
    engine.task(name="job", retries=1, backoff=0)(attempts.body)
    async with engine:
        handle = await engine.submit("job")
        await asyncio.wait_for(attempts.entered(1).wait(), 10)

        async def written() -> bool:
            progress = await stored_progress(store, handle.id)
            return progress is not None and progress.done == 3

        await eventually_async(written)
        attempts.fail.set()
        await asyncio.wait_for(attempts.entered(2).wait(), 10)
        stored = await engine.store.get(handle.id)
        assert stored is not None and (stored.status, stored.attempt) == (RunStatus.RUNNING, 2)
        assert stored.progress == NONE
        assert engine.get(handle.id).progress == NONE
        attempts.go.set()
        final = await handle.wait(timeout=10)
        assert final.progress.message == "attempt 2 step 1"
        stored = await engine.store.get(handle.id)
        assert stored is not None and stored.progress.message == "attempt 2 step 1"


async def test_a_run_taken_up_after_a_restart_starts_with_no_progress(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = Engine(store=SqliteStore(db, lease_ttl=0.3), node_id="n", health_interval=None, cancel_grace=0.05)
    reported = asyncio.Event()

    @first.task(name="report")
    async def cut(ctx: TaskContext) -> str:
        await ctx.progress(3, 4, "page 3 of 4")
        reported.set()
        await asyncio.Event().wait()  # until the stop cuts it short
        return "never"

    await first.start()
    try:
        handle = await first.submit("report")
        await asyncio.wait_for(reported.wait(), 10)

        async def written() -> bool:
            progress = await stored_progress(first.store, handle.id)  # type: ignore[arg-type]
            return progress is not None and progress.done == 3

        await eventually_async(written)
    finally:
        await first.stop(timeout=0)
    async with SqliteStore(db) as looker:
        left = await looker.get(handle.id)
    assert left is not None
    # handed back for the next start, with how far the attempt the stop cut short got
    assert (left.status, left.attempt, left.progress.message) == (RunStatus.PENDING, 2, "page 3 of 4")

    second = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)
    entered, go = asyncio.Event(), asyncio.Event()

    @second.task(name="report")
    async def again(ctx: TaskContext) -> str:
        entered.set()
        await go.wait()
        return "done"

    async with second:
        await asyncio.wait_for(entered.wait(), 10)
        record = await eventually(lambda: _running(second, handle.id))
        assert (record.attempt, record.progress) == (2, NONE)
        stored = await second.store.get(handle.id)
        assert stored is not None and (stored.attempt, stored.progress) == (2, NONE)
        assert (await second.fetch_run(handle.id)).progress == NONE
        go.set()
        assert (await second.handle(handle.id).wait(timeout=10)).status is RunStatus.SUCCEEDED


def _running(engine: Engine, run_id: str) -> Any:
    record = engine.get(run_id)
    return record if record.status is RunStatus.RUNNING else None



def test_the_dashboard_keeps_an_attempts_progress_when_another_node_tells_of_its_start() -> None:
    # a node that read the start from the store publishes it too, maybe after the attempt's progress
    from taskwatch.engine import events as ev

    state = DashboardState()
    state.apply([
        ev.RunSubmitted(seq=1, ts=100.0, run_id="r1", task="t", max_attempts=2),
        ev.RunStarted(seq=2, ts=101.0, run_id="r1", task="t", attempt=1, node="node-a"),
        ev.RunProgressed(seq=3, ts=102.0, run_id="r1", task="t", done=2, total=5, message="two"),
        ev.RunStarted(seq=4, ts=101.0, run_id="r1", task="t", attempt=1, from_store=True),
    ])
    assert state.runs["r1"].record().progress == Progress(done=2, total=5, message="two")


# ---------------------------------------------------------------- every store's claim


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


TTL = 10.0


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store_and_clock(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Store, Clock]]:
    clock = Clock()
    s: Store = each_store(request.param, request, tmp_path, clock, TTL)
    async with s:
        yield s, clock


@pytest.mark.parametrize("how", ["retried", "recovered"])
async def test_a_claim_starts_the_row_of_the_next_attempt_with_no_progress(
    store_and_clock: tuple[Store, Clock], how: str
) -> None:
    store, clock = store_and_clock
    incarnations = (f"i{n}" for n in itertools.count(1))
    (run_id,) = [r.id for r in await store.insert([NewRun("a", max_attempts=3)])]
    inc = next(incarnations)
    (first,) = await store.claim("n1", inc, 1, {"a": None})
    await store.heartbeat(inc, [first.token], {first.token: Progress(done=3, total=4, message="step 3")})
    if how == "retried":
        assert await store.finish(first.token, Retry(RunError(type="ValueError", message="boom"))) is RunStatus.PENDING
    else:
        clock.now += TTL + 1
        assert [r.action for r in await store.recover()] == ["requeued"]
        inc = next(incarnations)
    (second,) = await store.claim("n1", inc, 1, {"a": None})
    assert second.attempt == 2
    row = await store.get(run_id)
    assert row is not None and (row.status, row.attempt) == (RunStatus.RUNNING, 2)
    assert row.progress == NONE


@pytest.mark.parametrize("store_and_clock", ["sqlite", "postgres"], indirect=True)
async def test_a_stored_run_back_to_pending_for_its_retry_shows_how_far_its_last_attempt_got(
    store_and_clock: tuple[Store, Clock],
) -> None:
    # what another node, a dashboard reading the store, or this node after a restart see of it
    store, _ = store_and_clock
    (run_id,) = [r.id for r in await store.insert([NewRun("a", max_attempts=3)])]
    (first,) = await store.claim("n1", "i1", 1, {"a": None})
    last = Progress(done=7, total=10, message="got 7 of 10")
    error = RunError(type="ValueError", message="transient")
    assert await store.finish(first.token, Retry(error, 60.0), last) is RunStatus.PENDING
    row = await store.get(run_id)
    assert row is not None and (row.status, row.attempt, row.progress) == (RunStatus.PENDING, 2, last)
    assert row.error is not None and row.error.message == "transient"
