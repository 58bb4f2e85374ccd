"""The engine core: submitting, running, retrying, cancelling and stopping one-shot runs."""

from __future__ import annotations

import asyncio
import time
import contextvars
import gc
import json
import threading
import weakref
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    DuplicateTask,
    Engine,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidParams,
    QueueFull,
    RunHandle,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    RunRecord,
    RunStatus,
    StoppedBeforeDone,
    TaskContext,
    TaskDefinitionError,
    TaskwatchError,
    UnknownTask,
)

from .helpers import Gauge, Recorder, eventually, stray_tasks, wait_until


class EmbedParams(BaseModel):
    user_id: str
    contents: list[str]


def make_engine(**kwargs: object) -> Engine:
    kwargs.setdefault("health_interval", None)
    engine = Engine(**kwargs)  # type: ignore[arg-type]

    @engine.task(name="embed_batch", retries=2, timeout=30.0, concurrency=2)
    async def embed_batch(ctx: TaskContext, params: EmbedParams) -> dict:
        for i, text in enumerate(params.contents, 1):
            await ctx.progress(i, len(params.contents), f"embedded {text!r}")
        return {"stored": len(params.contents)}

    @engine.task
    async def noop(ctx: TaskContext) -> None:
        return None

    return engine


def add_blocked(engine: Engine) -> asyncio.Event:
    """Register a task ``blocked`` that holds its slot until the returned gate is set."""
    gate = asyncio.Event()

    @engine.task
    async def blocked(ctx: TaskContext) -> None:
        await gate.wait()

    return gate


async def test_submit_runs_to_success_with_progress_and_result() -> None:
    engine = make_engine()
    rec = Recorder(engine)
    async with engine:
        handle = await engine.submit("embed_batch", {"user_id": "u1", "contents": ["a", "b"]})
        run = await handle.wait(timeout=2)
    assert run.status is RunStatus.SUCCEEDED
    assert run.result == {"stored": 2}
    assert run.params == {"user_id": "u1", "contents": ["a", "b"]}
    assert run.progress.done == 2 and run.progress.total == 2
    assert run.progress.message == "embedded 'b'"
    assert run.started_at is not None and run.finished_at is not None
    assert run.created_at <= run.started_at <= run.finished_at
    run_kinds = [k for k in rec.kinds() if k.startswith("run.")]
    assert run_kinds == ["run.submitted", "run.started", "run.progress", "run.progress", "run.succeeded"]
    seqs = [e.seq for e in rec.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)


async def test_run_record_round_trips_through_json() -> None:
    engine = make_engine()
    async with engine:
        run = await (await engine.submit("embed_batch", {"user_id": "u", "contents": ["x"]})).wait(2)
    again = RunRecord.model_validate_json(run.model_dump_json())
    assert again == run
    json.dumps(run.model_dump(mode="json"))


async def test_task_without_params() -> None:
    engine = make_engine()
    async with engine:
        run = await (await engine.submit("noop")).wait(2)
        assert run.status is RunStatus.SUCCEEDED and run.params == {}
        with pytest.raises(InvalidParams):
            await engine.submit("noop", {"unexpected": 1})


async def test_bad_params_raise_typed_error_and_queue_nothing() -> None:
    engine = make_engine()
    async with engine:
        with pytest.raises(InvalidParams) as info:
            await engine.submit("embed_batch", {"user_id": 3})
        err = info.value
        assert isinstance(err, TaskwatchError)
        locs = {tuple(e["loc"]) for e in err.errors}
        assert ("user_id",) in locs and ("contents",) in locs
        assert "contents" in str(err) and "nothing was queued" in str(err)
        assert engine.runs(limit=None) == []
        assert engine.stats().submitted_total == 0


async def test_unknown_task_lists_known_names() -> None:
    engine = make_engine()
    async with engine:
        with pytest.raises(UnknownTask) as info:
            await engine.submit("embed_btach", {})
    assert info.value.known == ["embed_batch", "noop"]
    assert "embed_batch" in str(info.value) and "noop" in str(info.value)


async def test_submit_before_start_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(EngineNotRunning):
        await engine.submit("noop")


async def test_task_definition_errors() -> None:
    engine = Engine(health_interval=None)

    def not_async(ctx: TaskContext) -> None: ...

    with pytest.raises(TaskDefinitionError):
        engine.task(not_async)

    async def untyped(ctx: TaskContext, params) -> None: ...  # type: ignore[no-untyped-def]

    with pytest.raises(TaskDefinitionError):
        engine.task(untyped)

    # each error says what is wrong with this function, and nothing was registered
    async def streams(ctx: TaskContext):  # type: ignore[no-untyped-def]
        yield 1

    with pytest.raises(TaskDefinitionError, match="async generator .* returns its result instead"):
        engine.task(streams)

    class Page(BaseModel):
        n: int

    async def no_ctx(params: Page) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"receives the TaskContext.*no_ctx\(ctx: TaskContext, params: \.\.\.\)"):
        engine.task(no_ctx)

    async def ctx_only(ctx: TaskContext) -> None: ...

    engine.task(ctx_only)  # one argument annotated as the context is the ordinary no-params task
    assert [spec.name for spec in engine.catalog()] == ["ctx_only"]


async def test_queue_full_names_the_limit_and_keeps_nothing_extra() -> None:
    engine = make_engine(max_concurrency=1, max_queue=3)
    gate = add_blocked(engine)

    async with engine:
        first = await engine.submit("blocked")
        await eventually(lambda: first.status is RunStatus.RUNNING)
        for _ in range(3):
            await engine.submit("blocked")
        with pytest.raises(QueueFull) as info:
            await engine.submit("blocked")
        assert info.value.limit == 3 and "3" in str(info.value)
        assert engine.stats().queue_depth == 3
        assert engine.stats().submitted_total == 4
        gate.set()


async def test_dedup_key_returns_the_pending_run() -> None:
    engine = make_engine(max_concurrency=1)
    gate = add_blocked(engine)

    async with engine:
        await engine.submit("blocked")  # occupies the only slot
        a = await engine.submit("noop", key="bank-42")
        b = await engine.submit("noop", key="bank-42")
        assert a.id == b.id
        assert engine.get(a.id).key == "bank-42"
        assert len(engine.runs(task="noop", limit=None)) == 1
        gate.set()
        await a.wait(2)
        # once it has left pending, the key is free again
        c = await engine.submit("noop", key="bank-42")
        assert c.id != a.id
        await c.wait(2)


async def test_cancel_pending_run() -> None:
    engine = make_engine(max_concurrency=1)
    gate = add_blocked(engine)
    ran: list[str] = []

    @engine.task
    async def record(ctx: TaskContext) -> None:
        ran.append(ctx.run_id or "")

    rec = Recorder(engine)
    async with engine:
        await engine.submit("blocked")
        waiting = await engine.submit("record")
        result = await engine.cancel(waiting.id)
        assert result.status is RunStatus.CANCELLED and result.cancel_reason == "user"
        assert engine.stats().queue_depth == 0
        gate.set()
        after = await engine.submit("record")
        await after.wait(2)
    assert ran == [after.id]
    cancelled = rec.of("run.cancelled")
    assert [(e.run_id, e.reason, e.was_running) for e in cancelled] == [(waiting.id, "user", False)]


async def test_cancel_running_run_ends_cancelled_not_failed() -> None:
    engine = make_engine()
    started = asyncio.Event()
    cleaned = asyncio.Event()

    @engine.task(retries=3)
    async def long(ctx: TaskContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    async with engine:
        handle = await engine.submit("long")
        await asyncio.wait_for(started.wait(), 2)
        record = await engine.cancel(handle.id, grace=2)
        assert record.status is RunStatus.CANCELLED
        assert record.cancel_reason == "user"
        assert record.error is None and record.attempt == 1
        assert cleaned.is_set()
        with pytest.raises(RunNotCancellable):
            await engine.cancel(handle.id)
    assert engine.stats().failed_total == 0


async def test_a_cancelled_run_that_swallows_the_cancel_is_cancelled_again_until_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a retry helper catching CancelledError once: a timeout's and a stop's cancels come again
    # every cancel_grace, a user's came once, and the run went on for as long as its work took
    engine = make_engine(cancel_grace=0.05)
    started, swallowed = asyncio.Event(), asyncio.Event()

    @engine.task
    async def stubborn(ctx: TaskContext) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        await asyncio.Event().wait()  # the work it goes on with, which never ends by itself
        return "went on"

    async with engine:
        handle = await engine.submit("stubborn")
        await started.wait()
        await engine.cancel(handle.id, grace=0)
        await eventually(swallowed.is_set)
        record = await handle.wait(10)
        assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "user")
    assert "still runs 0.05 s after its cancel; cancelling it again every 0.05 s" in caplog.text
    assert not stray_tasks()


async def test_a_cancelled_runs_cleanup_within_the_cancels_grace_is_not_cancelled_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the well-behaved task: it catches the cancel, cleans up (longer than cancel_grace, within
    # the grace the caller gave) and re-raises. Cancelled again at cancel_grace, its cleanup was cut
    engine = make_engine(cancel_grace=0.05)
    started, cleaning, cleaned = asyncio.Event(), asyncio.Event(), asyncio.Event()
    release = asyncio.Event()

    @engine.task
    async def tidy(ctx: TaskContext) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await release.wait()  # a rollback, say, that the test lets end
            cleaned.set()
            raise

    async with engine:
        handle = await engine.submit("tidy")
        await started.wait()
        cancelling = asyncio.create_task(engine.cancel(handle.id, grace=30))
        await cleaning.wait()
        # cancel_grace passes several times over while the cleanup goes on: nothing cancels it
        done, _ = await asyncio.wait([cancelling], timeout=0.5)
        assert not done and not cleaned.is_set()
        release.set()
        record = await cancelling
        assert cleaned.is_set() and (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "user")
    assert "after its cancel" not in caplog.text


async def test_cancel_unknown_run() -> None:
    engine = make_engine()
    async with engine:
        with pytest.raises(RunNotFound):
            await engine.cancel("nope")
        with pytest.raises(RunNotFound):
            engine.get("nope")


async def test_retries_with_backoff_then_failure_keeps_traceback() -> None:
    engine = make_engine()
    attempts: list[int] = []

    @engine.task(retries=2, backoff=0.01)
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise ValueError(f"boom on attempt {ctx.attempt}")

    rec = Recorder(engine)
    async with engine:
        run = await (await engine.submit("flaky")).wait(3)
    assert attempts == [1, 2, 3]
    assert run.status is RunStatus.FAILED and run.attempt == 3 and run.max_attempts == 3
    assert run.error is not None and run.error.type == "ValueError"
    assert run.error.message == "boom on attempt 3"
    assert "Traceback (most recent call last)" in run.error.traceback
    assert "in flaky" in run.error.traceback
    retrying = rec.of("run.retrying")
    assert [e.attempt for e in retrying] == [2, 3]
    # exponential backoff with jitter: each delay within [base/2, base] * 2**n
    assert 0.005 <= retrying[0].delay <= 0.01 and 0.01 <= retrying[1].delay <= 0.02
    assert engine.stats().retries_total == 2


async def test_retry_then_success() -> None:
    engine = make_engine()

    @engine.task(retries=3, backoff=0.001)
    async def second_time_lucky(ctx: TaskContext) -> str:
        if ctx.attempt < 2:
            raise RuntimeError("transient")
        return "ok"

    async with engine:
        run = await (await engine.submit("second_time_lucky")).wait(2)
    assert run.status is RunStatus.SUCCEEDED and run.attempt == 2 and run.result == "ok"


async def test_timeout_fails_the_run_with_a_clear_error() -> None:
    engine = make_engine()

    @engine.task(timeout=0.05)
    async def sleepy(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    async with engine:
        run = await (await engine.submit("sleepy")).wait(2)
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error.type == "TimeoutError"
    assert "0.05 s timeout" in run.error.message
    # where the task was waiting when its time was up, and nothing of the engine's
    shown = run.error.traceback or ""
    assert "in sleepy\n    await asyncio.Event().wait()" in shown and "engine/" not in shown
    assert shown.endswith("TimeoutError: run exceeded its 0.05 s timeout\n")


async def test_a_timeout_the_task_raised_itself_is_not_called_the_runs_timeout() -> None:
    engine = make_engine()

    @engine.task(timeout=30.0)
    async def calls_a_slow_service(ctx: TaskContext) -> None:
        await asyncio.wait_for(asyncio.Event().wait(), 0.01)

    async with engine:
        run = await (await engine.submit("calls_a_slow_service")).wait(2)
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error.type == "TimeoutError"
    assert "30 s timeout" not in run.error.message
    assert "wait_for" in (run.error.traceback or "")


async def test_result_must_be_json_serialisable() -> None:
    engine = make_engine()

    @engine.task
    async def weird(ctx: TaskContext) -> object:
        return object()

    async with engine:
        run = await (await engine.submit("weird")).wait(2)
    assert run.status is RunStatus.FAILED
    assert run.error is not None and run.error.type == "ResultNotSerializable"


async def test_a_bus_callback_that_submits_cannot_push_past_max_concurrency() -> None:
    # the callback runs inside the start of a batch of runs, before the batch's later runs
    # hold their slots: the runs it submits must wait for a slot like any other
    engine = make_engine(max_concurrency=2)
    gate = asyncio.Event()
    running = Gauge()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await running.hold(gate)

    extra: list = []

    def on_started(event: object) -> None:
        if len(extra) < 3:
            extra.append(engine.submit_nowait("hold"))

    engine.bus.add_callback(on_started, ["run.started"])
    async with engine:
        # one insert, then one claim of two runs: the callback fires inside that batch
        first = await engine.submit_many([("hold", None)] * 4)
        await eventually(lambda: running.now == 2)
        assert engine.stats().running == 2 and engine.stats().queue_depth == 2 + len(extra)
        gate.set()
        await eventually(lambda: len(extra) == 3)
        for h in first + extra:
            assert (await h.wait(2)).status is RunStatus.SUCCEEDED
    assert running.peak == 2


async def test_retries_claimed_together_hold_their_slots_against_a_callback_that_submits() -> None:
    # two retries come due at once and are claimed in one batch; the first one's start makes a
    # callback submit: that run must not take the slot the second retry already holds
    now = [1_000.0]
    engine = make_engine(max_concurrency=2, clock=lambda: now[0])
    gate = asyncio.Event()
    running = Gauge()
    retrying: list[str] = []

    @engine.task(retries=1, backoff=5.0, backoff_max=5.0)
    async def flaky(ctx: TaskContext) -> None:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        await running.hold(gate)

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await running.hold(gate)

    extra: list = []

    def on_started(event: object) -> None:
        if getattr(event, "attempt", 1) == 2 and not extra:
            extra.append(engine.submit_nowait("hold"))

    engine.bus.add_callback(on_started, ["run.started"])
    engine.bus.add_callback(lambda event: retrying.append(event.run_id), ["run.retrying"])
    async with engine:
        first = await engine.submit_many([("flaky", None)] * 2)
        await eventually(lambda: len(retrying) == 2)
        now[0] += 60  # both retries are due: the claim loop takes them in one claim
        await eventually(lambda: running.now == 2 and len(extra) == 1)
        assert engine.stats().running == 2 and engine.stats().queue_depth == 1
        gate.set()
        for h in first + extra:
            assert (await h.wait(5)).status is RunStatus.SUCCEEDED
    assert running.peak == 2


async def test_a_callback_that_submits_while_a_batch_is_admitted_sees_the_whole_batch() -> None:
    # submit_many's events go out one by one; a callback submitting on the first must not
    # start the batch's later runs before they are indexed and announced
    engine = make_engine(max_concurrency=8)
    order: list[tuple[str, str]] = []

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    extra: list = []

    def on_submitted(event: object) -> None:
        if not extra:
            extra.append(engine.submit_nowait("quick"))

    engine.bus.add_callback(on_submitted, ["run.submitted"])
    engine.bus.add_callback(lambda event: order.append((event.kind, event.run_id)), ["run.submitted", "run.started"])
    async with engine:
        handles = await engine.submit_many([("quick", None)] * 3)
        records = [await h.wait(5) for h in handles + extra]
        assert [r.status for r in records] == [RunStatus.SUCCEEDED] * 4
        stats = engine.stats()
        assert stats.by_status["succeeded"] == 4 and stats.queue_depth == 0 and stats.running == 0
    for record in records:
        kinds = [kind for kind, run_id in order if run_id == record.id]
        assert kinds == ["run.submitted", "run.started"], (record.id, kinds)


async def test_a_retry_due_without_a_free_slot_does_not_keep_the_engine_busy() -> None:
    # the retry is due while the only slot is taken: the engine waits for the slot to free
    # (or polls) instead of going round its claim loop at once, again and again, on a full core
    engine = make_engine(max_concurrency=1)
    gate = asyncio.Event()
    retrying = asyncio.Event()

    @engine.task(retries=1, backoff=0.01, backoff_max=0.01)
    async def flaky(ctx: TaskContext) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return "ok"

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    engine.bus.add_callback(lambda event: retrying.set(), ["run.retrying"])
    async with engine:
        handle = await engine.submit("flaky")
        await retrying.wait()
        await engine.submit("hold")  # takes the slot before the retry is due
        await eventually(lambda: engine.stats().running == 1)
        cpu = time.process_time()
        await asyncio.sleep(0.5)  # a window to look at: the retry is overdue all along
        busy = time.process_time() - cpu
        assert busy < 0.1, f"{busy:.2f} s of CPU in 0.5 s while waiting for a slot"
        assert engine.get(handle.id).status is RunStatus.PENDING
        gate.set()
        assert (await handle.wait(5)).status is RunStatus.SUCCEEDED


async def test_lowering_history_trims_the_index_at_the_next_finish() -> None:
    engine = make_engine(history=100)

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    async with engine:
        for h in await engine.submit_many([("quick", None)] * 50):
            await h.wait(5)
        engine.history = 10
        await (await engine.submit("quick")).wait(5)
        assert len(engine.runs(limit=None)) == 10
        assert engine.stats().by_status["succeeded"] == 10


async def test_global_and_per_task_concurrency_limits() -> None:
    engine = make_engine(max_concurrency=3)
    gate = asyncio.Event()
    running = {"a": 0, "b": 0}
    peak = {"a": 0, "b": 0, "total": 0}

    def enter(name: str) -> None:
        running[name] += 1
        peak[name] = max(peak[name], running[name])
        peak["total"] = max(peak["total"], running["a"] + running["b"])

    @engine.task(concurrency=1)
    async def a(ctx: TaskContext) -> None:
        enter("a")
        await gate.wait()
        running["a"] -= 1

    @engine.task
    async def b(ctx: TaskContext) -> None:
        enter("b")
        await gate.wait()
        running["b"] -= 1

    async with engine:
        handles = [await engine.submit("a") for _ in range(3)] + [await engine.submit("b") for _ in range(4)]
        # one "a" and two "b" fill the three slots; the blocked "a" runs do not hold up "b"
        await eventually(lambda: running == {"a": 1, "b": 2})
        assert engine.stats().running == 3 and engine.stats().queue_depth == 4
        gate.set()
        for h in handles:
            await h.wait(2)
    assert peak["a"] == 1 and peak["total"] == 3


async def test_history_evicts_oldest_finished_but_never_pending_or_running() -> None:
    engine = make_engine(history=3, max_concurrency=1)
    gate = add_blocked(engine)

    async with engine:
        done = [await (await engine.submit("noop")).wait(2) for _ in range(5)]
        holder = await engine.submit("blocked")
        queued = await engine.submit("noop")
        await eventually(lambda: holder.status is RunStatus.RUNNING)
        known = {r.id for r in engine.runs(limit=None)}
        assert known == {done[2].id, done[3].id, done[4].id, holder.id, queued.id}
        with pytest.raises(RunNotFound):
            engine.get(done[0].id)
        gate.set()
        await queued.wait(2)
        assert engine.stats().by_status["succeeded"] == 3


async def test_runs_filters_newest_first() -> None:
    engine = make_engine()

    @engine.task
    async def bad(ctx: TaskContext) -> None:
        raise KeyError("x")

    async with engine:
        ids = []
        for _ in range(3):
            handle = await engine.submit("noop")
            await handle.wait(2)
            ids.append(handle.id)
        failed = await (await engine.submit("bad")).wait(2)
        await eventually(lambda: engine.stats().finished_total == 4)
        assert [r.id for r in engine.runs(task="noop")] == list(reversed(ids))
        assert [r.id for r in engine.runs(status="failed", limit=50)] == [failed.id]
        assert len(engine.runs(limit=2)) == 2


async def test_retry_a_failed_run_with_same_params() -> None:
    engine = make_engine()
    calls: list[dict] = []

    class P(BaseModel):
        n: int

    @engine.task
    async def once_bad(ctx: TaskContext, params: P) -> int:
        calls.append(params.model_dump())
        if len(calls) == 1:
            raise RuntimeError("first")
        return params.n

    async with engine:
        failed = await (await engine.submit("once_bad", {"n": 7})).wait(2)
        assert failed.status is RunStatus.FAILED
        again = await (await engine.retry(failed.id)).wait(2)
        assert again.status is RunStatus.SUCCEEDED and again.result == 7
        assert again.id != failed.id and again.source == f"retry:{failed.id}"
        with pytest.raises(RunNotRetryable):
            await engine.retry(again.id)
    assert calls == [{"n": 7}, {"n": 7}]


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_retry_keeps_the_runs_dedup_key(store: str, tmp_path: Path) -> None:
    engine = make_engine(store="memory" if store == "memory" else f"sqlite:///{tmp_path / 'runs.db'}")
    gate = asyncio.Event()
    calls = 0

    @engine.task(concurrency=1)
    async def compile_bank(ctx: TaskContext) -> str:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("first")
        await gate.wait()
        return "done"

    async with engine:
        failed = await (await engine.submit("compile_bank", key="bank-42")).wait(5)
        assert failed.status is RunStatus.FAILED
        busy = await engine.submit("compile_bank", key="bank-7")
        await eventually(lambda: busy.status is RunStatus.RUNNING)
        retried = await engine.retry(failed.id)  # pending behind bank-7's run
        assert retried.record().key == "bank-42"
        # the key still dedups: the pending retry is the run that does bank-42's work
        assert (await engine.submit("compile_bank", key="bank-42")).id == retried.id
        gate.set()
        assert (await retried.wait(5)).status is RunStatus.SUCCEEDED
    assert sorted(str(r.key) for r in engine.runs(task="compile_bank", limit=None)) == ["bank-42", "bank-42", "bank-7"]


async def test_stats_counts_and_throughput() -> None:
    engine = make_engine()
    async with engine:
        for _ in range(10):
            await (await engine.submit("noop")).wait(2)
        stats = engine.stats()
    assert stats.submitted_total == 10 and stats.finished_total == 10
    assert stats.by_status["succeeded"] == 10
    assert stats.throughput == pytest.approx(10 / stats.throughput_window)
    json.loads(stats.model_dump_json())


async def test_stop_drains_then_cancels_as_shutdown_and_leaves_no_task() -> None:
    engine = make_engine(max_concurrency=1)
    quick_done: list[str] = []

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        await asyncio.sleep(0)
        quick_done.append(ctx.run_id or "")

    @engine.task
    async def forever(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    rec = Recorder(engine)
    await engine.start()
    q = await engine.submit("quick")
    f = await engine.submit("forever")
    stuck = await engine.submit("quick")  # queued behind "forever", never gets a slot
    await eventually(lambda: f.status is RunStatus.RUNNING)
    await engine.stop(timeout=0.1)
    assert quick_done == [q.id]
    assert f.record().status is RunStatus.CANCELLED and f.record().cancel_reason == "shutdown"
    assert stuck.record().status is RunStatus.CANCELLED and stuck.record().cancel_reason == "shutdown"
    assert engine.state == "stopped"
    assert not stray_tasks()
    stopped = rec.of("engine.stopped")[0]
    assert (stopped.cancelled_pending, stopped.cancelled_running) == (1, 1)
    with pytest.raises(EngineNotRunning):
        await engine.submit("quick")


async def test_two_starts_at_once_start_once_and_a_stop_meanwhile_stops_it(tmp_path: Path) -> None:
    # a SQLite store suspends the start (opening the file, its writer thread): the second
    # start and the stop must wait for that one start, not run a second or return at once
    threads = set(threading.enumerate())
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}")

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    await asyncio.gather(engine.start(), engine.start())
    assert (await (await engine.submit("quick")).wait(5)).result == 1
    await engine.stop()
    assert not stray_tasks()
    assert not [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]
    starting = asyncio.create_task(engine.start())
    stopping = asyncio.create_task(engine.stop())
    await asyncio.gather(starting, stopping)
    assert engine.state == "stopped"
    assert not stray_tasks()
    assert not [t.name for t in threading.enumerate() if t not in threads and t.is_alive()]


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_a_wait_on_a_run_still_executing_after_the_stop_gets_its_verdict(durable: bool, tmp_path: Path) -> None:
    # the task ignores every cancel of the stop, which goes on without it. Memory store: the
    # run ends cancelled by the shutdown when the stop gives up on it, and what the task does
    # later changes nothing. Durable store: the run is kept for the next start
    engine = make_engine(cancel_grace=0.02, **({"store": f"sqlite:///{tmp_path / 'runs.db'}"} if durable else {}))
    started = asyncio.Event()
    let_go = asyncio.Event()

    @engine.task
    async def stubborn(ctx: TaskContext) -> str:
        started.set()
        while not let_go.is_set():
            try:
                await let_go.wait()
            except asyncio.CancelledError:
                pass
        return "returned after the stop"

    await engine.start()
    handle = await engine.submit("stubborn")
    await started.wait()
    waiting = asyncio.ensure_future(handle.wait())
    await engine.stop(timeout=0)
    try:
        if durable:
            with pytest.raises(StoppedBeforeDone, match="kept in the store"):
                await asyncio.wait_for(waiting, 5)
            with pytest.raises(StoppedBeforeDone):
                await asyncio.wait_for(handle.wait(), 5)
        else:
            record = await asyncio.wait_for(waiting, 5)
            assert record.status is RunStatus.CANCELLED and record.cancel_reason == "shutdown"
            assert (await asyncio.wait_for(handle.wait(), 5)).status is RunStatus.CANCELLED
            assert engine.stats().running == 0 and engine.stats().by_status["cancelled"] == 1
    finally:
        let_go.set()
        await eventually(lambda: not stray_tasks())  # the stubborn task's own end
    if not durable:
        after = engine.get(handle.id)
        assert (after.status, after.result) == (RunStatus.CANCELLED, None)


async def test_stop_waits_for_running_work_within_timeout() -> None:
    engine = make_engine()
    release = asyncio.Event()

    @engine.task
    async def slow(ctx: TaskContext) -> str:
        await release.wait()
        return "finished"

    await engine.start()
    handle = await engine.submit("slow")
    await eventually(lambda: handle.status is RunStatus.RUNNING)
    stopping = asyncio.ensure_future(engine.stop(timeout=5))
    await eventually(lambda: engine.state == "stopping")
    with pytest.raises(EngineNotRunning):
        await engine.submit("slow")
    release.set()
    await stopping
    assert handle.record().status is RunStatus.SUCCEEDED


async def test_stop_does_not_wait_for_pending_runs_no_one_here_can_start() -> None:
    # a periodic run queued, then its resource withdrawn: it can never start on this node,
    # so the drain ends with the last run that could, not with the stop's timeout
    engine = make_engine(max_concurrency=1, resources={"db": "DB"})
    release = asyncio.Event()

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        await release.wait()

    @engine.periodic(every=3600, initial_delay=3600, requires=("db",))
    async def vacuum(ctx: TaskContext, db: str) -> None: ...

    await engine.start()
    busy = await engine.submit("slow")
    await eventually(lambda: busy.status is RunStatus.RUNNING)
    held = await engine.run_periodic("vacuum")  # behind slow's run, in the only slot
    engine.withdraw("db")
    stopping = asyncio.ensure_future(engine.stop(timeout=3600))
    await eventually(lambda: engine.state == "stopping")
    release.set()
    await asyncio.wait_for(stopping, 30)
    assert busy.record().status is RunStatus.SUCCEEDED
    record = held.record()
    assert record.status is RunStatus.CANCELLED and record.cancel_reason == "shutdown"
    assert not stray_tasks()


async def test_a_stop_that_cancels_work_on_the_memory_store_says_so(caplog: pytest.LogCaptureFixture) -> None:
    engine = make_engine(max_concurrency=1)
    never = asyncio.Event()

    @engine.task
    async def send_email(ctx: TaskContext) -> None:
        await never.wait()

    await engine.start()
    handles = [await engine.submit("send_email") for _ in range(3)]
    await eventually(lambda: handles[0].status is RunStatus.RUNNING)
    with caplog.at_level("WARNING", logger="taskwatch.engine"):
        await engine.stop(timeout=0)
    assert [h.status for h in handles] == [RunStatus.CANCELLED] * 3
    (said,) = [r.getMessage() for r in caplog.records if "not done" in r.getMessage()]
    assert "2 pending and 1 running run(s) not done" in said and "SQLite store" in said


async def test_inline_backend_runs_in_the_caller() -> None:
    engine = make_engine(backend="inline")
    async with engine:
        handle = await engine.submit("embed_batch", {"user_id": "u", "contents": ["a"]})
        assert handle.done and handle.record().result == {"stored": 1}


async def test_handle_wait_timeout() -> None:
    engine = make_engine()

    @engine.task
    async def forever(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    async with engine:
        handle = await engine.submit("forever")
        with pytest.raises(TimeoutError):
            await handle.wait(timeout=0.01)
        await engine.cancel(handle.id)
        assert (await handle).status is RunStatus.CANCELLED


class ShapeV1(BaseModel):
    path: str


class ShapeV2(BaseModel):
    path: str
    fmt: str = "csv"


async def test_a_task_redefined_with_replace_runs_its_new_code_from_its_next_attempt() -> None:
    # a notebook cell defining a task, edited and run again
    engine = make_engine(max_concurrency=1)
    gate = asyncio.Event()

    @engine.task
    async def shape(ctx: TaskContext, p: ShapeV1) -> str:
        await gate.wait()
        return f"old {p.path}"

    async with engine:
        under_way = await engine.submit("shape", {"path": "a"})
        await eventually(lambda: under_way.status is RunStatus.RUNNING)
        queued = await engine.submit("shape", {"path": "b"})  # waits for the only slot

        with pytest.raises(DuplicateTask, match="pass replace=True to redefine it"):
            engine.task(shape)

        @engine.task(replace=True)
        async def shape(ctx: TaskContext, p: ShapeV2) -> str:  # noqa: F811 - the point of the test
            return f"new {p.path} as {p.fmt}"

        gate.set()
        assert (await under_way.wait(5)).result == "old a"  # finished on the code it started on
        # queued under the old definition: run by the new one, its params read by the new model
        assert (await queued.wait(5)).result == "new b as csv"
        assert (await (await engine.submit("shape", {"path": "c", "fmt": "tsv"})).wait(5)).result == "new c as tsv"

    # only a plain task is redefined in place: a periodic task's name stays taken
    periodic = make_engine()

    @periodic.periodic(every=3600)
    async def nightly(ctx: TaskContext) -> None:
        return None

    with pytest.raises(DuplicateTask) as taken:
        periodic.task(nightly, replace=True)
    assert "replace=True" not in str(taken.value)


async def test_a_wait_is_a_task_of_its_own_in_create_task_and_a_task_group() -> None:
    engine = make_engine()
    gate = asyncio.Event()

    @engine.task
    async def held(ctx: TaskContext) -> str:
        await gate.wait()
        return "done"

    async with engine:
        first, second, third = [await engine.submit("held") for _ in range(3)]
        waiting = asyncio.create_task(first.wait())
        # a task of a wait cancelled gives up that wait only: the run goes on
        given_up = asyncio.create_task(second.wait())
        await asyncio.sleep(0)
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        assert second.status is RunStatus.RUNNING and not waiting.done()
        async with asyncio.TaskGroup() as group:
            in_group = [group.create_task(h.wait()) for h in (second, third)]
            gate.set()
        assert [t.result().result for t in in_group] == ["done", "done"]
        assert (await waiting).status is RunStatus.SUCCEEDED
        # a wait on a run already finished is a task that ends at once with its record
        assert (await asyncio.create_task(first.wait())).id == first.id

async def test_cancel_right_after_submit_never_runs_the_task() -> None:
    engine = make_engine()
    ran: list[int] = []

    @engine.task
    async def work(ctx: TaskContext) -> None:
        ran.append(1)

    async with engine:
        handle = await engine.submit("work")  # a free slot: its task exists, not started
        record = await engine.cancel(handle.id)
        assert record.status is RunStatus.CANCELLED and record.cancel_reason == "user"
        assert (await handle.wait(1)).status is RunStatus.CANCELLED
        stats = engine.stats()
    assert ran == []
    assert stats.by_status == {"pending": 0, "running": 0, "succeeded": 0, "failed": 0, "cancelled": 1}
    assert stats.queue_depth == 0


async def test_stop_right_after_submit_then_start_again() -> None:
    engine = make_engine(max_concurrency=1)
    await engine.start()
    first = await engine.submit("noop")
    await engine.stop(timeout=0)
    # it either got its first step in before the shutdown or was cut short by it
    record = first.record()
    assert (record.status, record.cancel_reason) in {
        (RunStatus.SUCCEEDED, None), (RunStatus.CANCELLED, "shutdown")
    }
    assert not stray_tasks()
    # the only slot was given back: a restarted engine runs work again
    await engine.start()
    again = await (await engine.submit("noop")).wait(2)
    await engine.stop()
    assert again.status is RunStatus.SUCCEEDED


async def test_a_cancelled_stop_caller_does_not_leave_the_engine_half_stopped() -> None:
    engine = make_engine()
    release = asyncio.Event()

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        await release.wait()

    await engine.start()
    await engine.submit("slow")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.stop(timeout=5), 0.05)
    assert engine.state == "stopping"
    release.set()
    await engine.stop()  # waits for the same shutdown
    assert engine.state == "stopped"
    assert not stray_tasks()


async def test_dedup_keys_belong_to_one_task_and_params_are_still_checked() -> None:
    engine = make_engine(max_concurrency=1)
    gate = add_blocked(engine)

    async with engine:
        await engine.submit("blocked")
        a = await engine.submit("embed_batch", {"user_id": "u", "contents": []}, key="k")
        with pytest.raises(InvalidParams):
            await engine.submit("embed_batch", {"user_id": 1}, key="k")
        other = await engine.submit("noop", key="k")  # same key, another task: its own run
        assert other.id != a.id
        gate.set()


async def test_periodic_and_trigger_tasks_are_run_by_their_loops_not_by_hand() -> None:
    engine = make_engine()

    @engine.periodic(every=3600.0, initial_delay=3600.0, name="hourly")
    async def hourly(ctx: TaskContext) -> None:
        return None

    async def compile_key(ctx: TaskContext, key: str) -> None:
        raise RuntimeError("compile failed")

    trigger = engine.trigger("compile", compile_key, size_threshold=1)
    async with engine:
        with pytest.raises(UnknownTask, match="'hourly' is a periodic task, which the engine runs itself") as info:
            await engine.submit("hourly")
        assert info.value.kind == "periodic" and "engine.run_periodic('hourly') runs it now" in str(info.value)
        with pytest.raises(UnknownTask, match="is a trigger task") as info:
            await engine.submit(trigger.task_name, {"key": "k"})
        assert "run_periodic" not in str(info.value)
        with pytest.raises(UnknownTask, match="unknown task 'nope'") as info:
            await engine.submit("nope")
        assert info.value.kind is None
        trigger.notify("k")
        await trigger.drain(timeout=2)
        failed = engine.runs(status="failed", task=trigger.task_name)[0]
        with pytest.raises(RunNotRetryable, match="runs it again itself"):
            await engine.retry(failed.id)


async def test_a_missing_resource_fails_the_run_instead_of_hanging_it() -> None:
    engine = make_engine(resources={"db": object()}, max_concurrency=1)
    release = asyncio.Event()

    @engine.task(name="hold")
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    @engine.periodic(every=0.01, requires=("db",), name="uses_db")
    async def uses_db(ctx: TaskContext, db: object) -> None:
        return None

    async with engine:
        run = await eventually(lambda: engine.runs(task="uses_db"))
        await eventually(lambda: engine.get(run[0].id).status.finished)
        await engine.submit("hold")
        # a run already queued when its resource goes (later ticks see it gone and queue none)
        await eventually(lambda: engine.runs(task="uses_db", status="pending"))
        del engine.resources["db"]
        release.set()
        failed = await eventually(lambda: engine.runs(task="uses_db", status="failed"))
        error = failed[0].error
        assert error is not None and error.type == "LookupError"
        assert "resource 'db' of task 'uses_db' is not provided" in error.message and "engine.provide" in error.message


async def test_a_handle_still_waits_for_its_run_after_it_left_history_and_store() -> None:
    engine = make_engine(history=5)
    async with engine:
        handles = [await engine.submit("noop") for _ in range(50)]
        # most of them finished, left the history and were pruned from the store long ago
        records = await asyncio.gather(*(h.wait(5) for h in handles))
        assert all(r.status is RunStatus.SUCCEEDED for r in records)
        assert handles[0].record().status is RunStatus.SUCCEEDED
        with pytest.raises(RunNotFound):
            engine.get(handles[0].id)
        assert len(engine.runs(limit=None)) <= 5


async def test_a_batch_repeating_a_key_counts_it_once_against_the_queue_limit() -> None:
    engine = make_engine(max_queue=3)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    async with engine:
        # max_concurrency slots first, so that what follows waits in the queue
        running = [await engine.submit("hold") for _ in range(engine.max_concurrency)]
        handles = await engine.submit_many([{"task": "hold", "key": "same"}] * 5 + [("hold", None)] * 2)
        assert len({h.id for h in handles[:5]}) == 1 and engine.stats().queue_depth == 3
        with pytest.raises(QueueFull):
            await engine.submit("hold")
        gate.set()
        for h in running + handles:
            assert (await h.wait(5)).status is RunStatus.SUCCEEDED



async def test_waits_given_up_on_a_long_run_leave_nothing_behind() -> None:
    # a dashboard or a health check polling a long run with wait_for(handle.wait(), t)
    engine = make_engine()
    gate = asyncio.Event()

    @engine.task
    async def long(ctx: TaskContext) -> str:
        await gate.wait()
        return "done"

    async with engine:
        handle = await engine.submit("long")
        given_up: list[weakref.ref[Any]] = []
        for _ in range(1_000):
            waiting = handle.wait()
            given_up.append(weakref.ref(waiting))
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(waiting, 0)
            del waiting
        gc.collect()
        assert sum(ref() is not None for ref in given_up) < 64
        gate.set()
        assert (await handle.wait(5)).result == "done"


async def test_every_handle_of_a_deduplicated_run_waits_after_the_history_let_it_go() -> None:
    engine = make_engine(history=1, max_concurrency=1)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> str:
        await gate.wait()
        return "done"

    async with engine:
        await engine.submit("hold")
        first, repeated = await engine.submit_many([{"task": "hold", "key": "k"}] * 2)
        again = await engine.submit("hold", key="k")
        assert first.id == repeated.id == again.id
        gate.set()
        await first.wait(5)
        for _ in range(3):  # history=1: these push the keyed run out of the index
            await (await engine.submit("hold")).wait(5)
        with pytest.raises(RunNotFound):
            engine.get(first.id)
        await engine.store.prune(keep=0)  # and the store let it go (retention)
        for handle in (first, repeated, again):
            assert (await handle.wait(5)).result == "done"


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_run_sees_the_context_the_engine_started_in_never_a_submitters_or_another_runs(
    store: str, tmp_path: Path
) -> None:
    # what a request sets (a request id, a tenant) must not reach a run: a run may start
    # later, when an earlier request's run frees its slot, or on another node. What a task
    # sets is its own too. Every run sees the context the engine was started in
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="unset")
    url = "memory" if store == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"
    engine = Engine(store=url, max_concurrency=1, health_interval=None)
    seen: dict[int, str] = {}
    release = asyncio.Event()

    class Job(BaseModel):
        i: int

    @engine.task
    async def job(ctx: TaskContext, params: Job) -> None:
        seen[params.i] = tenant.get()
        tenant.set(f"set by run {params.i}")
        await release.wait()

    async def request(i: int) -> RunHandle:
        tenant.set(f"request {i}")  # each request's own context (a copy, as a server gives it)
        return await engine.submit("job", {"i": i})

    tenant.set("at start")
    async with engine:
        # the first run takes the one slot at once; the others start as it frees
        handles = [await asyncio.create_task(request(i)) for i in range(4)]
        release.set()
        for handle in handles:
            await handle.wait(5)
    assert seen == {i: "at start" for i in range(4)}


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_runs_past_retention_leave_the_engines_views_as_they_leave_the_store(store: str, tmp_path: Path) -> None:
    url = "memory" if store == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"
    engine = Engine(store=url, retention=0.5, lease_ttl=0.6, health_interval=None)
    release = asyncio.Event()

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    @engine.task
    async def long(ctx: TaskContext) -> None:
        await release.wait()

    async with engine:
        going = await engine.submit("long")
        done = [await engine.submit("quick") for _ in range(3)]
        for handle in done:
            await handle.wait(5)
        await eventually(lambda: engine.stats().by_status["succeeded"] == 0, timeout=10.0)
        assert [run.id for run in engine.runs(limit=None)] == [going.id]  # unfinished runs stay
        for handle in done:
            with pytest.raises(RunNotFound):
                engine.get(handle.id)
            with pytest.raises(RunNotFound):
                await engine.fetch_run(handle.id)
        release.set()


async def test_a_record_names_the_node_running_it_or_that_ran_it_and_none_while_it_waits() -> None:
    engine = make_engine(max_concurrency=1, node_id="api-1")
    gate = add_blocked(engine)

    async with engine:
        busy = await engine.submit("blocked")
        await eventually(lambda: busy.status is RunStatus.RUNNING)
        waiting = await engine.submit("noop")
        assert (engine.get(busy.id).node, engine.get(waiting.id).node) == ("api-1", None)
        gate.set()
        assert (await waiting.wait(5)).node == "api-1"
        assert (await engine.fetch_run(busy.id)).node == "api-1"


async def test_hurry_stop_ends_a_long_drain_sooner_and_cuts_what_is_left() -> None:
    engine = Engine(health_interval=None, cancel_grace=0.2)

    @engine.task
    async def forever(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    engine.hurry_stop(0)  # no stop under way: nothing to hurry
    async with engine:
        handle = await engine.submit("forever")
        await eventually(lambda: handle.status is RunStatus.RUNNING)
        stopping = asyncio.create_task(engine.stop(timeout=60))
        await eventually(lambda: engine.state == "stopping")
        with pytest.raises(InvalidConfiguration, match="timeout=-1"):
            engine.hurry_stop(-1)
        engine.hurry_stop(120)  # later than the drain's own end: changes nothing
        engine.hurry_stop(0)
        await asyncio.wait_for(stopping, 10)  # not the 60 s asked first
    record = handle.record()
    assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "shutdown")
    assert not stray_tasks()


def test_hurry_stop_from_another_thread_is_made_on_the_engines_loop() -> None:
    engine = Engine(health_interval=None, cancel_grace=0.2)

    @engine.task
    async def forever(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    bg = engine.start_background()
    handle = bg.submit("forever")
    stopping = threading.Thread(target=bg.stop, kwargs={"timeout": 60})
    try:
        wait_until(lambda: handle.status is RunStatus.RUNNING)
        stopping.start()
        wait_until(lambda: engine.state == "stopping")
        engine.hurry_stop(0)  # this thread is not the engine's loop's
        stopping.join(10)
        assert not stopping.is_alive() and engine.state == "stopped"
    finally:
        bg.stop(timeout=0)
    assert handle.record().cancel_reason == "shutdown"
