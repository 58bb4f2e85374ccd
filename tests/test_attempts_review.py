"""What an attempt owns and what counts against a run's retries.

- A run's progress is its current attempt's own: a report from an earlier attempt's context
  (a thread it left going, a timed-out attempt) changes nothing, on the record, the bus or the
  store.
- A graceful stop that cuts a run short on a durable store hands it back with the retries it
  had: ``attempt`` still counts executions, ``max_attempts`` grows with it in the same write.
  A crash's recovery still counts against ``max_attempts``.
- A result JSON cannot carry fails its run at once: another attempt would redo the work.
- A params validator whose message holds a lone surrogate is reported on its field, escaped.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, computed_field, field_validator
from taskwatch.engine import Engine, InvalidParams, Progress, RunNotCancellable, RunStatus, TaskContext
from taskwatch.engine.jsonsafe import NotJsonSafe
from taskwatch.engine.runs import RunError, RunRecord
from taskwatch.engine.store import NewRun, Retry, Store, StoredRun, make_store
from taskwatch.tui.state import DashboardState

from .helpers import Recorder, each_store, eventually

TTL = 10.0

NONE = Progress()
SHUTDOWN = RunError(type="Shutdown", message="node 'n1' stopped while the run was executing; re-queued")
BOOM = RunError(type="RuntimeError", message="boom")


# ---------------------------------------------------------------- progress is the attempt's own


@pytest.fixture(params=["memory", "sqlite"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"


async def test_a_report_from_an_earlier_attempts_context_changes_nothing(store_url: str) -> None:
    engine = Engine(store=store_url, node_id="n1", health_interval=None)
    contexts: dict[int, TaskContext] = {}
    second = asyncio.Event()
    finish = asyncio.Event()

    @engine.task(retries=1, backoff=0, backoff_max=0)
    async def crunch(ctx: TaskContext) -> str:
        contexts[ctx.attempt] = ctx
        if ctx.attempt == 1:
            await ctx.progress(1, 20, "attempt 1: step 1/20")
            raise RuntimeError("timed out, its thread goes on")
        second.set()
        await finish.wait()
        await ctx.progress(3, 3, "attempt 2: step 3/3")
        return "ok"

    recorder = Recorder(engine, ("run.progress",))
    async with engine:
        handle = await engine.submit("crunch")
        await asyncio.wait_for(second.wait(), 10)
        assert engine.get(handle.id).attempt == 2
        # what attempt 1 left going reports now, while attempt 2 runs
        await contexts[1].progress(9, 20, "attempt 1: step 9/20")
        record = engine.get(handle.id)
        assert (record.status, record.attempt, record.progress) == (RunStatus.RUNNING, 2, NONE)
        assert [e.message for e in recorder.events] == ["attempt 1: step 1/20"]
        # nor does an invalid one raise: it is no report of this run's any more
        await contexts[1].progress(float("nan"))
        finish.set()
        record = await handle.wait(10)
        assert record.status is RunStatus.SUCCEEDED
        assert record.progress == Progress(done=3, total=3, message="attempt 2: step 3/3")
        assert [e.message for e in recorder.events] == ["attempt 1: step 1/20", "attempt 2: step 3/3"]
        stored = await engine.fetch_run(handle.id)
        assert stored.progress == record.progress
        # and after the run ended, the earlier attempt's reports still change nothing
        await contexts[1].progress(10, 20, "attempt 1: step 10/20")
        assert engine.get(handle.id).progress == record.progress
    assert len(recorder.events) == 2


# ---------------------------------------------------------------- a graceful stop keeps the retries


@pytest.fixture(params=["sqlite", "postgres"])
def durable_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


class Stopped:
    """A task whose first ``stops`` executions wait until the engine's stop cuts them short,
    and whose later ones raise."""

    def __init__(self, stops: int) -> None:
        self.stops = stops
        self.executions: list[int] = []
        self.entered = asyncio.Event()

    async def body(self, ctx: TaskContext) -> None:
        self.executions.append(ctx.attempt)
        self.entered.set()
        if len(self.executions) <= self.stops:
            await asyncio.Event().wait()  # until the stop cuts it short
        raise RuntimeError(f"transient failure on attempt {ctx.attempt}")


async def stored(url: str, run_id: str) -> StoredRun:
    """The run's row as the store holds it between two starts."""
    async with make_store(url) as store:
        row = await store.get(run_id)
    assert row is not None
    return row


def engine_on(url: str, stopped: Stopped, retries: int) -> Engine:
    engine = Engine(store=url, node_id="n1", health_interval=None)
    engine.task(name="job", retries=retries, backoff=0, backoff_max=0)(stopped.body)
    return engine


async def cut_once(url: str, stopped: Stopped, retries: int, run_id: str | None) -> tuple[str, RunRecord]:
    """Start an engine on ``url``, submit the job (unless ``run_id`` names it already), and stop
    the engine once the job runs, cutting it short (back to pending): the run, as it ran."""
    engine = engine_on(url, stopped, retries=retries)
    await engine.start()
    try:
        if run_id is None:
            run_id = (await engine.submit("job")).id
        stopped.entered.clear()
        await asyncio.wait_for(stopped.entered.wait(), 20)
        running = engine.get(run_id)
    finally:
        await engine.stop(timeout=0)
    return run_id, running


async def run_to_its_end(url: str, stopped: Stopped, retries: int, run_id: str) -> RunRecord:
    """Start an engine on ``url`` and let the run ``run_id`` finish there: its final record."""
    engine = engine_on(url, stopped, retries=retries)
    await engine.start()
    try:
        return await engine.handle(run_id).wait(20)
    finally:
        await engine.stop()


async def test_runs_handed_back_at_graceful_stops_keep_their_retries(
    durable_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    stopped = Stopped(stops=2)
    run_id = None
    for cycle in range(2):
        run_id, _ = await cut_once(durable_url, stopped, 1, run_id)
        row = await stored(durable_url, run_id)
        assert row.status is RunStatus.PENDING
        assert row.error is not None and row.error.type == "Shutdown"
        # one more allowed per hand-back: the run's one retry is still left
        assert (row.attempt, row.max_attempts) == (cycle + 2, cycle + 3)
    assert stopped.executions == [1, 2]
    assert run_id is not None

    caplog.set_level(logging.INFO, logger="taskwatch.runs")
    record = await run_to_its_end(durable_url, stopped, 1, run_id)
    # two executions cut short, then the run's own two tries (one retry) both failed
    assert stopped.executions == [1, 2, 3, 4]
    assert (record.status, record.attempt, record.max_attempts) == (RunStatus.FAILED, 4, 4)
    assert record.error is not None and record.error.message == "transient failure on attempt 4"
    tries = [r.getMessage() for r in caplog.records if r.name == "taskwatch.runs" and "failed on try" in r.getMessage()]
    assert any("failed on try 3 of 4" in line for line in tries), tries
    assert any("failed on try 4 of 4" in line for line in tries), tries


async def test_a_run_with_no_retries_stopped_many_times_still_gets_its_one_try(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    stopped = Stopped(stops=3)
    run_id = None
    for _ in range(3):
        run_id, running = await cut_once(url, stopped, 0, run_id)
        assert running.attempt <= running.max_attempts  # never "attempt 4 of 1"
    assert run_id is not None
    record = await run_to_its_end(url, stopped, 0, run_id)
    assert stopped.executions == [1, 2, 3, 4]
    assert (record.status, record.attempt, record.max_attempts) == (RunStatus.FAILED, 4, 4)


async def test_a_dashboard_fed_by_events_shows_the_budget_a_hand_back_raised(tmp_path: Path) -> None:
    # an attached or cluster dashboard knows a run only from its events until it reloads: the
    # hand-back's run.retrying carries the new budget, or it would show "attempt 2 of 1"
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    stopped = Stopped(stops=1)
    engine = engine_on(url, stopped, retries=0)
    state = DashboardState()
    await engine.start()
    sub = engine.bus.subscribe(kinds=["run."])
    try:
        run_id = (await engine.submit("job")).id
        await asyncio.wait_for(stopped.entered.wait(), 20)
    finally:
        await engine.stop(timeout=0)
    events = sub.get_batch()
    (retrying,) = [e for e in events if e.kind == "run.retrying"]
    assert retrying.max_attempts == 2
    state.apply(events)
    shown = state.record(run_id)
    assert shown is not None
    assert (shown.status, shown.attempt, shown.max_attempts) == (RunStatus.PENDING, 2, 2)
    row = await stored(url, run_id)
    assert (row.attempt, row.max_attempts) == (shown.attempt, shown.max_attempts)


# ---------------------------------------------------------------- the stores: a cut short Retry, a Retry, recovery


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    s: Store = each_store(request.param, request, tmp_path, clock, TTL)
    async with s:
        yield s


async def claimed(store: Store, inc: str = "i1") -> str:
    (claim,) = await store.claim("n1", inc, 1, {"a": None})
    return claim.token


async def attempts_of(store: Store, run_id: str) -> tuple[RunStatus, int, int]:
    row = await store.get(run_id)
    assert row is not None
    return row.status, row.attempt, row.max_attempts


async def test_a_cut_short_attempt_raises_max_attempts_with_attempt_a_retry_does_not(store: Store) -> None:
    (inserted,) = await store.insert([NewRun("a", max_attempts=2)])
    run_id = inserted.id
    assert await store.finish(await claimed(store), Retry(SHUTDOWN, cut_short=True)) is RunStatus.PENDING
    assert await attempts_of(store, run_id) == (RunStatus.PENDING, 2, 3)
    assert await store.finish(await claimed(store), Retry(BOOM)) is RunStatus.PENDING
    assert await attempts_of(store, run_id) == (RunStatus.PENDING, 3, 3)
    # a claim handed back before its attempt started changes neither
    assert await store.finish(await claimed(store), Retry(SHUTDOWN, next_attempt=False)) is RunStatus.PENDING
    assert await attempts_of(store, run_id) == (RunStatus.PENDING, 3, 3)
    (claim,) = await store.claim("n1", "i1", 1, {"a": None})
    assert (claim.attempt, claim.max_attempts) == (3, 3)


async def test_a_crashed_nodes_run_recovered_still_counts_against_max_attempts(store: Store, clock: FakeClock) -> None:
    (inserted,) = await store.insert([NewRun("a", max_attempts=1)])
    await claimed(store, inc="crashed")
    clock.now += TTL + 1  # its lease ran out unrenewed
    (recovered,) = await store.recover()
    assert (recovered.action, recovered.attempt) == ("requeued", 2)
    assert await attempts_of(store, inserted.id) == (RunStatus.PENDING, 2, 1)


# ---------------------------------------------------------------- a result JSON cannot carry is final


async def test_a_result_json_cannot_carry_fails_the_run_without_retries() -> None:
    engine = Engine(health_interval=None)
    charges: list[int] = []

    @engine.task(retries=3, backoff=0, backoff_max=0)
    async def charge_card(ctx: TaskContext) -> dict[str, float]:
        charges.append(ctx.attempt)  # the side effect, done by every attempt
        return {"charged": 10.0, "fee_ratio": float("nan")}

    async with engine:
        record = await (await engine.submit("charge_card")).wait(10)
    assert charges == [1]
    assert (record.status, record.attempt, record.max_attempts) == (RunStatus.FAILED, 1, 4)
    assert record.error is not None and record.error.type == "ResultNotSerializable"
    assert "fee_ratio is nan" in record.error.message and "Not retried" in record.error.message


async def test_a_result_whose_conversion_raises_fails_the_run_without_retries() -> None:
    """A returned model whose computed field raises: the attempt did its work (the card is
    charged), so the run fails at once as a result that cannot be sent, naming what its
    conversion raised. It was retried, and reported as the task's own ZeroDivisionError."""

    class Invoice(BaseModel):
        total: float
        count: int

        @computed_field  # type: ignore[prop-decorator]
        @property
        def average(self) -> float:
            return self.total / self.count

    engine = Engine(health_interval=None)
    charges: list[int] = []

    @engine.task(retries=3, backoff=0, backoff_max=0)
    async def charge_card(ctx: TaskContext) -> Invoice:
        charges.append(ctx.attempt)
        return Invoice(total=10.0, count=0)

    async with engine:
        record = await (await engine.submit("charge_card")).wait(10)
    assert charges == [1]
    assert (record.status, record.attempt) == (RunStatus.FAILED, 1)
    assert record.error is not None and record.error.type == "ResultNotSerializable"
    assert "ZeroDivisionError" in record.error.message and "Not retried" in record.error.message


async def test_a_not_json_safe_the_task_raises_itself_is_a_failure_retried_as_any() -> None:
    engine = Engine(health_interval=None)
    tries: list[int] = []

    @engine.task(retries=1, backoff=0, backoff_max=0)
    async def encode(ctx: TaskContext) -> None:
        tries.append(ctx.attempt)
        raise NotJsonSafe("its own encoder refused a value")

    async with engine:
        record = await (await engine.submit("encode")).wait(10)
    assert tries == [1, 2]
    assert record.status is RunStatus.FAILED
    assert record.error is not None and record.error.type == "NotJsonSafe"


# ---------------------------------------------------------------- a validator's message with a lone surrogate


UNDECODABLE = os.fsdecode(b"/nonexistent/report-\xff.csv")
#: a directory listing as os.listdir gives it: a name that is not UTF-8 keeps its bytes as surrogates
LISTED = [os.fsdecode(b"x-\xfe.csv")]


class Params(BaseModel):
    path: str

    @field_validator("path")
    @classmethod
    def must_exist(cls, v: str) -> str:
        if not os.path.exists(v):
            raise ValueError(f"no such file: {v}")
        return v


class Listing(BaseModel):
    files: list[Params] = []
    pick: str = ""

    @field_validator("pick")
    @classmethod
    def listed(cls, v: str) -> str:
        if v:
            # the surrogate comes from the file system, not from the params
            raise ValueError(f"{v} is not one of: {', '.join(LISTED)}")
        return v


@pytest.fixture
def engine() -> Iterator[Engine]:
    engine = Engine(health_interval=None)

    @engine.task
    async def ingest(ctx: TaskContext, p: Params) -> str:
        return p.path

    @engine.task
    async def ingest_many(ctx: TaskContext, p: Listing) -> None:
        return None

    yield engine


async def test_a_validators_message_with_a_lone_surrogate_names_its_field(engine: Engine) -> None:
    async with engine:
        given: list[Any] = [{"path": UNDECODABLE}, Params.model_construct(path=UNDECODABLE)]
        for params in given:
            with pytest.raises(InvalidParams) as refused:
                await engine.submit("ingest", params)
            assert refused.value.errors == [
                {"type": "value_error", "loc": ("path",), "msg": "Value error, no such file: /nonexistent/report-\\udcff.csv"}
            ]
            assert "path: Value error, no such file: /nonexistent/report-\\udcff.csv" in str(refused.value)
        with pytest.raises(InvalidParams) as refused:
            await engine.submit("ingest_many", {"files": [{"path": "/"}, {"path": UNDECODABLE}]})
        assert [(e["loc"], e["msg"]) for e in refused.value.errors] == [
            (("files", 1, "path"), "Value error, no such file: /nonexistent/report-\\udcff.csv")
        ]
        # a message whose surrogate is not in the params: told, escaped, of the params as a whole
        with pytest.raises(InvalidParams) as refused:
            await engine.submit("ingest_many", {"pick": "y.csv"})
        (error,) = refused.value.errors
        assert error["loc"] == ("params",)
        assert error["msg"] == "a validator of Listing refused them: y.csv is not one of: x-\\udcfe.csv"
        # nothing was queued
        assert engine.runs(limit=None) == []
        assert engine.stats().by_status["pending"] == 0


# ---------------------------------------------------------------- what a node hears of another's attempts


async def test_a_cancel_made_while_a_runs_outcome_is_written_ends_it_once(tmp_path: Path) -> None:
    """A cancel that comes as the task returns, its success still on its way to the SQLite
    file, is refused (the run ended). The store's answer was applied as another node's end
    of the run: a second ``run.succeeded`` on the bus, and the run counted twice in stats."""
    engine = Engine(health_interval=None, store=f"sqlite:///{tmp_path / 'runs.db'}")
    returned: dict[str, asyncio.Event] = {}

    @engine.task
    async def ok(ctx: TaskContext) -> str:
        returned[ctx.run_id].set()
        return "done"

    events = Recorder(engine, ("run.",))
    refused = 0
    async with engine:
        for _ in range(10):
            handle = await engine.submit("ok")
            returned[handle.id] = asyncio.Event()
            await returned[handle.id].wait()  # the task has returned; its outcome is being written
            try:
                await handle.cancel()
            except RunNotCancellable:
                refused += 1
            assert (await handle.wait(10)).status is RunStatus.SUCCEEDED
        stats = engine.stats()
    assert refused == 10
    succeeded = [e.run_id for e in events.of("run.succeeded")]
    assert sorted(succeeded) == sorted(returned), "a run ended twice on the bus"
    assert (stats.finished_total, stats.succeeded_total) == (10, 10)


async def test_a_node_hears_the_retry_of_a_run_another_node_tried(tmp_path: Path) -> None:
    """Node "a" submits a run only node "b" can run (it has the GPU); b's attempt fails and
    waits for its retry. a showed it pending, attempt 2, with no error, and its dashboard
    heard of no retry; now a's record has the error, and its bus a ``run.retrying`` read
    from the store (which a relay leaves out: b's own goes to the cluster)."""
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    a = Engine(health_interval=None, store=url, node_id="a", poll_interval=0.05)
    b = Engine(health_interval=None, store=url, node_id="b", poll_interval=0.05, resources={"gpu": object()})
    for engine in (a, b):

        async def render(ctx: TaskContext, gpu: Any) -> None:
            raise RuntimeError(f"GPU out of memory on attempt {ctx.attempt}")

        engine.register(render, name="render", retries=2, backoff=60.0, backoff_max=60.0, resources=("gpu",))
    heard = Recorder(a, ("run.retrying",))
    async with a, b:
        handle = await a.submit("render")
        [retrying] = await eventually(lambda: heard.of("run.retrying"), timeout=30)
        record = a.get(handle.id)
    assert (retrying.run_id, retrying.attempt, retrying.from_store) == (handle.id, 2, True)
    assert retrying.error.message == "GPU out of memory on attempt 1" and 0 < retrying.delay <= 60
    assert (record.status, record.attempt) == (RunStatus.PENDING, 2)
    assert record.error is not None and record.error.message == "GPU out of memory on attempt 1"
