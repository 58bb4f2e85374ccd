"""Work queues: FIFO consumers, concurrency, failures, bounds, draining on stop, threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, field_serializer
from taskwatch.engine import (
    Engine,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidJob,
    QueueFull,
    QueueInfo,
    StoppedBeforeDone,
    TaskContext,
    TaskDefinitionError,
    TaskwatchError,
)
from taskwatch.engine.errors import JobNotSerializable

from .helpers import Gauge, Recorder, eventually, stray_tasks


def make_engine(**kwargs: object) -> Engine:
    kwargs.setdefault("health_interval", None)
    return Engine(**kwargs)  # type: ignore[arg-type]


class Significance(BaseModel):
    memory_id: str
    score: float = 0.0


async def test_jobs_are_processed_in_order() -> None:
    engine = make_engine()
    seen: list[int] = []

    async def handler(job: dict) -> None:
        seen.append(job["n"])

    queue = engine.queue("ordered", handler, concurrency=1)
    async with engine:
        for n in range(20):
            queue.put_nowait({"n": n})
        await asyncio.wait_for(queue.join(), 1.0)
        assert seen == list(range(20))
        info = queue.info()
        assert (info.processed, info.failed, info.depth, info.in_flight) == (20, 0, 0, 0)
        assert info.accepted == 20
        assert engine.stats().queues["ordered"]["processed"] == 20
    assert not stray_tasks()


async def test_concurrency_limits_jobs_in_flight() -> None:
    engine = make_engine()
    release = asyncio.Event()
    active = Gauge()

    async def handler(job: dict) -> None:
        await active.hold(release)

    queue = engine.queue("wide", handler, concurrency=3)
    async with engine:
        for n in range(7):
            await queue.put({"n": n})
        await eventually(lambda: queue.in_flight == 3)
        assert queue.depth == 4
        assert engine.queues()[0].in_flight == 3
        release.set()
        await asyncio.wait_for(queue.join(), 1.0)
        assert active.peak == 3
        assert queue.info().processed == 7


async def _four_jobs(handler: Callable[[dict], Awaitable[None]]) -> tuple[QueueInfo, list[Any]]:
    """Jobs {"n": 1} to {"n": 4} through ``handler`` on one consumer: the queue's figures once
    it is idle, and its queue.job_failed events."""
    engine = make_engine()
    queue = engine.queue("fragile", handler, concurrency=1)
    rec = Recorder(engine, ("queue.job_failed",))
    async with engine:
        for n in range(1, 5):
            queue.put_nowait({"n": n})
        await asyncio.wait_for(queue.join(), 10)
        info = queue.info()
    assert not stray_tasks()
    return info, rec.of("queue.job_failed")


async def test_a_failing_job_is_recorded_with_its_traceback_and_the_consumer_survives() -> None:
    done: list[int] = []

    async def handler(job: dict) -> None:
        if job["n"] == 2:
            raise ValueError("bad job 2")
        done.append(job["n"])

    info, [event] = await _four_jobs(handler)
    assert done == [1, 3, 4]
    assert info.processed == 3 and info.failed == 1
    assert event.queue == "fragile" and event.job == {"n": 2}
    assert event.error.type == "ValueError" and event.error.message == "bad job 2"
    assert "Traceback" in event.error.traceback and "bad job 2" in event.error.traceback


class _Unprintable:
    def __repr__(self) -> str:
        raise RuntimeError("no repr")


async def test_a_failure_that_cannot_be_written_as_it_is_still_fails_its_job_alone() -> None:
    # an exception class whose name UTF-8 cannot encode (a generated class, named from a file
    # name), and a job its handler left holding an object whose repr raises: either ended the
    # consumer without a word (no queue.job_failed, no log, no replacement) and join() hung
    class BadError(Exception):
        pass

    BadError.__qualname__ = "Bad\udce9Error"
    done: list[int] = []

    async def handler(job: dict) -> None:
        if job["n"] == 1:
            raise BadError("boom")
        if job["n"] == 2:
            job["kept"] = _Unprintable()
            raise ValueError("bad job 2")
        done.append(job["n"])

    info, [first, second] = await _four_jobs(handler)
    assert done == [3, 4]
    assert (info.processed, info.failed, info.consumers_replaced) == (2, 2, 0)
    assert (first.job, first.error.type) == ({"n": 1}, "Bad\\udce9Error")
    assert (second.job, second.error.type) == ("<unprintable dict>", "ValueError")


async def test_a_full_queue_raises_queue_full_and_counts_it() -> None:
    engine = make_engine()
    release = asyncio.Event()

    async def handler(job: dict) -> None:
        await release.wait()

    queue = engine.queue("small", handler, concurrency=1, maxsize=2)
    async with engine:
        queue.put_nowait({"n": 0})
        await eventually(lambda: queue.in_flight == 1)
        queue.put_nowait({"n": 1})
        queue.put_nowait({"n": 2})
        with pytest.raises(QueueFull, match="small"):
            queue.put_nowait({"n": 3})
        with pytest.raises(QueueFull):
            await queue.put({"n": 4})  # does not block forever: refuses at once by default
        assert queue.info().rejected == 2
        assert queue.depth == 2
        # with a timeout, put waits for room and succeeds once a consumer takes a job
        waiting = asyncio.create_task(queue.put({"n": 5}, timeout=1.0))
        await asyncio.sleep(0)
        assert not waiting.done()
        release.set()
        await asyncio.wait_for(waiting, 1.0)
        await asyncio.wait_for(queue.join(), 1.0)
        assert queue.info().processed == 4
        assert queue.info().rejected == 2


async def test_put_with_a_timeout_gives_up_with_queue_full() -> None:
    engine = make_engine()
    release = asyncio.Event()

    async def handler(job: dict) -> None:
        await release.wait()

    queue = engine.queue("stuck", handler, maxsize=1)
    async with engine:
        queue.put_nowait({"n": 0})
        await eventually(lambda: queue.in_flight == 1)
        queue.put_nowait({"n": 1})
        with pytest.raises(QueueFull):
            await queue.put({"n": 2}, timeout=0.02)
        assert queue.info().rejected == 1
        release.set()


async def test_jobs_must_be_models_or_json_serialisable() -> None:
    engine = make_engine()
    got: list[Any] = []

    async def handler(job: Any) -> None:
        got.append(job)

    queue = engine.queue("typed", handler)
    async with engine:
        with pytest.raises(JobNotSerializable, match="typed") as caught:
            queue.put_nowait({"conn": object()})
        assert isinstance(caught.value, TaskwatchError) and isinstance(caught.value, TypeError)
        with pytest.raises(JobNotSerializable):
            await queue.put(threading.Lock())
        assert queue.depth == 0 and queue.info().accepted == 0
        queue.put_nowait(Significance(memory_id="m1", score=0.5))
        queue.put_nowait({"memory_id": "m2", "tags": ["a"]})
        await asyncio.wait_for(queue.join(), 1.0)
        # the handler gets the job as it was put: a model stays a model
        assert got == [Significance(memory_id="m1", score=0.5), {"memory_id": "m2", "tags": ["a"]}]


async def test_handler_may_take_a_context() -> None:
    engine = make_engine()
    names: list[str] = []

    async def handler(ctx: TaskContext, job: dict) -> None:
        names.append(f"{ctx.name}:{job['n']}:{ctx.attempt}")

    queue = engine.queue("ctx", handler)
    async with engine:
        queue.put_nowait({"n": 1})
        await asyncio.wait_for(queue.join(), 1.0)
    assert names == ["queue:ctx:1:1"]  # a first delivery


def test_handler_must_be_async_with_one_or_two_arguments() -> None:
    engine = make_engine()

    def sync_handler(job: dict) -> None: ...

    async def too_many(a: object, b: object, c: object) -> None: ...

    with pytest.raises(TaskDefinitionError, match="async def"):
        engine.queue("sync", sync_handler)
    with pytest.raises(TaskDefinitionError, match="3 required"):
        engine.queue("many", too_many)


async def test_jobs_put_before_start_run_once_the_engine_starts() -> None:
    engine = make_engine()
    seen: list[int] = []

    async def handler(job: dict) -> None:
        seen.append(job["n"])

    queue = engine.queue("early", handler)
    queue.put_nowait({"n": 1})
    async with engine:
        later = engine.queue("late", handler)  # created while running: consumers start now
        later.put_nowait({"n": 2})
        await asyncio.wait_for(queue.join(), 1.0)
        await asyncio.wait_for(later.join(), 1.0)
    assert sorted(seen) == [1, 2]
    assert not stray_tasks()


async def test_stop_drains_queued_jobs_first() -> None:
    engine = make_engine()
    seen: list[int] = []

    async def handler(job: dict) -> None:
        await asyncio.sleep(0)
        seen.append(job["n"])

    queue = engine.queue("drain", handler, concurrency=2)
    rec = Recorder(engine, ("queue.drain_incomplete",))
    await engine.start()
    for n in range(50):
        queue.put_nowait({"n": n})
    assert queue.depth > 0
    await engine.stop(timeout=1.0)
    assert sorted(seen) == list(range(50))
    assert queue.info().processed == 50
    assert rec.of("queue.drain_incomplete") == []
    assert not stray_tasks()
    with pytest.raises(EngineNotRunning):
        queue.put_nowait({"n": 99})
    with pytest.raises(EngineNotRunning):
        await queue.put({"n": 99})


async def test_stop_timeout_reports_what_was_left_undone() -> None:
    engine = make_engine()
    never = asyncio.Event()
    cancelled: list[int] = []

    async def handler(job: dict) -> None:
        try:
            await never.wait()
        except asyncio.CancelledError:
            cancelled.append(job["n"])
            raise

    queue = engine.queue("blocked", handler, concurrency=1)
    rec = Recorder(engine, ("queue.drain_incomplete",))
    await engine.start()
    for n in range(3):
        queue.put_nowait({"n": n})
    await eventually(lambda: queue.in_flight == 1)
    joining = asyncio.ensure_future(queue.join())
    await engine.stop(timeout=0.05)
    # the job in flight was cancelled and awaited; it and the two queued ones are reported
    assert cancelled == [0]
    [event] = rec.of("queue.drain_incomplete")
    assert event.queue == "blocked" and event.left == 3
    # and the join waiting on them hears they were dropped, instead of waiting for good
    with pytest.raises(StoppedBeforeDone, match="3 jobs left in queue 'blocked'.*dropped"):
        await asyncio.wait_for(joining, 5)
    with pytest.raises(StoppedBeforeDone, match="dropped"):
        await queue.join()  # asked after the stop: the same answer, not "drained"
    info = queue.info()
    assert info.abandoned == 3 and info.processed == 0 and info.depth == 0 and info.in_flight == 0
    assert not stray_tasks()


async def test_put_nowait_from_another_thread() -> None:
    engine = make_engine()
    seen: list[tuple[int, bool]] = []
    loop_thread = threading.get_ident()

    async def handler(job: dict) -> None:
        seen.append((job["n"], threading.get_ident() == loop_thread))

    queue = engine.queue("threads", handler)

    def produce() -> None:
        for n in range(10):
            queue.put_nowait({"n": n})

    async with engine:
        await asyncio.to_thread(produce)
        await asyncio.wait_for(queue.join(), 1.0)
        assert seen == [(n, True) for n in range(10)]
    assert not stray_tasks()


class Handover(BaseModel):
    """A job whose serialisation, done by ``put_nowait`` before it queues the job, waits for the test."""

    n: int

    @field_serializer("n")
    def _hold(self, n: int) -> int:
        checking.set()
        go_on.wait(5)
        return n


checking, go_on = threading.Event(), threading.Event()


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_a_put_from_another_thread_that_races_the_stop_is_refused_not_lost(
    durable: bool, tmp_path: Path
) -> None:
    # the thread passed the open check before the stop began and queues its job after the stop ended
    checking.clear()
    go_on.clear()
    engine = make_engine(store=f"sqlite:///{tmp_path / 'q.db'}") if durable else make_engine()

    async def handler(job: Any) -> None:
        pass

    queue = engine.queue("handover", handler)
    outcome: list[str] = []

    def produce() -> None:
        try:
            queue.put_nowait(Handover(n=1))
            outcome.append("accepted")
        except EngineNotRunning:
            outcome.append("refused")

    thread = threading.Thread(target=produce)
    async with engine:
        thread.start()
        assert await asyncio.to_thread(checking.wait, 5)
        await engine.stop(timeout=0)
    go_on.set()
    await asyncio.to_thread(thread.join, 5)
    await asyncio.sleep(0)  # the loop runs what the thread handed over, if anything
    info = queue.info()
    # a job put_nowait accepted would be in no count: not handled, not abandoned, not kept
    assert outcome == ["refused"]
    assert (info.accepted, info.abandoned, info.kept, info.lost) == (0, 0, 0, 0)
    assert not stray_tasks()


async def test_queue_full_is_raised_in_the_calling_thread() -> None:
    engine = make_engine()
    release = asyncio.Event()

    async def handler(job: dict) -> None:
        await release.wait()

    queue = engine.queue("bounded", handler, maxsize=3)
    outcomes: list[str] = []

    def produce() -> None:
        for n in range(5):
            try:
                queue.put_nowait({"n": n})
                outcomes.append("ok")
            except QueueFull:
                outcomes.append("full")

    async with engine:
        await asyncio.to_thread(produce)
        # a consumer may already have taken the first job, which frees one slot
        assert outcomes[:3] == ["ok", "ok", "ok"] and outcomes.count("full") >= 1
        assert queue.info().rejected == outcomes.count("full")
        release.set()
        await asyncio.wait_for(queue.join(), 1.0)
        assert queue.info().processed == outcomes.count("ok")


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_a_consumer_cancelled_by_the_application_fails_its_job_and_another_takes_its_place(
    durable: bool, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    engine = make_engine(store=url, node_id="n") if durable else make_engine()
    consumers: list[asyncio.Task[Any]] = []
    started, never = asyncio.Event(), asyncio.Event()
    handled: list[str] = []

    async def handler(job: str) -> None:
        # an application's "abort this job" keeps the task the job runs in, and cancels it
        consumers.append(asyncio.current_task())  # type: ignore[arg-type]
        if job == "victim":
            started.set()
            await never.wait()
        handled.append(job)

    queue = engine.queue("abortable", handler, concurrency=1)
    rec = Recorder(engine, ("queue.job_failed",))
    async with engine:
        await queue.put("victim")
        await asyncio.wait_for(started.wait(), 2)
        consumers[0].cancel()
        await queue.put("next")
        await asyncio.wait_for(queue.join(), 2)  # the queue's only consumer was replaced
        assert handled == ["next"]
        # the cancelled task ended, as a cancelled task must; its job counts as failed
        assert consumers[0].done() and consumers[1] is not consumers[0]
        [event] = rec.of("queue.job_failed")
        assert event.job == "victim" and event.error.type == "CancelledError"
        info = queue.info()
        assert (info.processed, info.failed, info.depth, info.in_flight, info.consumers_replaced) == (1, 1, 0, 0, 1)
        # cancelled while it waits for a job: it ends too, and the next job finds another
        consumers[1].cancel()
        await eventually(lambda: consumers[1].done())
        await queue.put("last")
        await asyncio.wait_for(queue.join(), 2)
        assert handled == ["next", "last"] and queue.info().consumers_replaced == 2
    info = queue.info()
    assert (info.abandoned, info.kept, info.lost) == (0, 0, 0)
    assert not stray_tasks()
    if durable:
        # a failed job is done with: the store does not run it again at the next start
        again = make_engine(store=url, node_id="n")
        later = again.queue("abortable", handler)
        async with again:
            await asyncio.wait_for(later.join(), 2)
        assert later.info().adopted == 0 and handled == ["next", "last"]


@pytest.mark.parametrize("cleanup", ["none", "shielded"])
def test_asyncio_run_ends_with_an_engine_never_stopped_whatever_its_tasks_do_on_the_way_out(cleanup: str) -> None:
    # its end cancels every task once and waits for them: a consumer must end on that cancel, even
    # while another task's cleanup makes new tasks (asyncio.shield wraps its coroutine in one)
    outcome: list[str] = []
    # held past program()'s end: a pending task that nothing refers to is a garbage cycle, which
    # the collector may destroy (pending) before asyncio.run's end gets to cancel it
    kept: list[asyncio.Task[None]] = []

    async def program() -> None:
        engine = make_engine()
        started = asyncio.Event()

        async def handler(job: int) -> None:
            started.set()
            await asyncio.Event().wait()

        async def tidy() -> None:
            try:
                await asyncio.Event().wait()
            finally:
                if cleanup == "shielded":
                    await asyncio.shield(asyncio.sleep(0.01))

        kept.append(asyncio.get_running_loop().create_task(tidy()))
        queue = engine.queue("unstopped", handler, concurrency=2)
        engine.queue("idle", handler, concurrency=2)
        await engine.start()
        for n in range(4):
            queue.put_nowait(n)
        await started.wait()

    def run() -> None:
        asyncio.run(program())
        outcome.append("ended")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome == ["ended"]


async def test_cancelling_every_task_then_waiting_for_them_ends_every_consumer() -> None:
    engine = make_engine()

    async def handler(job: int) -> None:
        await asyncio.Event().wait()

    queue = engine.queue("busy", handler, concurrency=2)
    engine.queue("idle", handler, concurrency=2)
    await engine.start()
    try:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1)
        me = asyncio.current_task()
        consumers = [t for t in asyncio.all_tasks() if t is not me and t.get_name().startswith("taskwatch-queue-")]
        assert len(consumers) == 4
        for task in consumers:
            task.cancel()
        done, pending = await asyncio.wait(consumers, timeout=5)
        assert not pending
    finally:
        await engine.stop()


class Reading(BaseModel):
    sensor: str
    value: int


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_jobs_are_validated_into_the_model_the_handler_declares_at_put(durable: bool, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    engine = make_engine(store=url, node_id="n") if durable else make_engine()
    got: list[Any] = []

    async def handler(job: Reading) -> None:
        got.append(job)

    queue = engine.queue("readings", handler)
    given = Reading(sensor="b", value=2)
    async with engine:
        engine.pause_queue("readings")
        await queue.put({"sensor": "a", "value": "1"})  # pydantic reads "1" as 1, as a restart would
        queue.put_nowait(given)
        with pytest.raises(InvalidJob, match=r"queue 'readings'(.|\n)*value: Input should be a valid integer") as bad:
            await queue.put({"sensor": "c", "value": "many"})
        assert isinstance(bad.value, TaskwatchError) and isinstance(bad.value, ValueError)
        assert bad.value.queue == "readings" and [e["loc"] for e in bad.value.errors] == [("value",)]
        with pytest.raises(InvalidJob, match="sensor: Field required"):
            queue.put_nowait({"value": 3})

        def from_a_thread() -> str:
            try:
                queue.put_nowait({"sensor": 4, "value": 4})
            except InvalidJob as exc:
                return str(exc)
            return "accepted"

        assert "sensor: Input should be a valid string" in await asyncio.to_thread(from_a_thread)
        info = queue.info()
        assert (info.accepted, info.depth, info.rejected) == (2, 2, 0)
        engine.resume_queue("readings")
        await asyncio.wait_for(queue.join(), 2)
    # the handler gets the model it declares; an instance of it is passed as it was put
    assert got == [Reading(sensor="a", value=1), given] and got[1] is given
    if durable:
        again = make_engine(store=url, node_id="n")
        later = again.queue("readings", handler)
        async with again:
            await asyncio.wait_for(later.join(), 2)
        assert later.info().adopted == 0  # the refused jobs left no row behind


@pytest.mark.parametrize("kind", ["queue", "trigger"])
@pytest.mark.parametrize("name", [123, None, "", "\udcff"], ids=["int", "none", "empty", "surrogate"])
async def test_queue_and_trigger_names_must_be_plain_text(kind: str, name: Any, tmp_path: Path) -> None:
    engine = make_engine(store=f"sqlite:///{tmp_path / 'q.db'}", node_id="n")

    async def handler(job: Any) -> None: ...

    async def compile_key(ctx: TaskContext, key: str) -> None: ...

    with pytest.raises(InvalidConfiguration, match=f"invalid configuration for {kind} .*name="):
        if kind == "queue":
            engine.queue(name, handler)
        else:
            engine.trigger(name, compile_key, size_threshold=1)
    # nothing was registered: the engine starts, and its stats and snapshot encode
    async with engine:
        assert engine.queues() == [] and engine.triggers() == []
        assert engine.stats().queues == {} and engine.stats().triggers == {}
        engine.snapshot().model_dump_json()


@pytest.mark.parametrize(
    "timeout", [None, float("inf"), float("nan"), True, "1", -1], ids=["none", "inf", "nan", "bool", "str", "negative"]
)
async def test_put_refuses_a_timeout_that_is_not_finite_seconds(timeout: Any) -> None:
    engine = make_engine()
    release = asyncio.Event()

    async def handler(job: int) -> None:
        await release.wait()

    queue = engine.queue("full", handler, maxsize=1)
    async with engine:
        queue.put_nowait(0)
        await eventually(lambda: queue.in_flight == 1)
        queue.put_nowait(1)
        with pytest.raises(InvalidConfiguration, match=r"timeout=.*a finite number of 0 or more"):
            await asyncio.wait_for(queue.put(2, timeout=timeout), 2)
        info = queue.info()
        assert (info.accepted, info.rejected, info.depth) == (2, 0, 1)
        with pytest.raises(QueueFull):
            await queue.put(2, timeout=0)  # a whole number of seconds is fine
        release.set()


async def test_stats_count_the_jobs_a_stop_left_undone() -> None:
    engine = make_engine()
    never = asyncio.Event()

    async def handler(job: int) -> None:
        await never.wait()

    queue = engine.queue("stuck", handler)
    await engine.start()
    for n in range(5):
        queue.put_nowait(n)
    await eventually(lambda: queue.in_flight == 1)
    joining = asyncio.ensure_future(queue.join())
    await engine.stop(timeout=0.05)
    # the join says the dropped jobs are counted in the engine's stats: they are
    with pytest.raises(StoppedBeforeDone, match="counted in the engine's stats"):
        await asyncio.wait_for(joining, 2)
    counts = engine.stats().queues["stuck"]
    assert (counts["abandoned"], counts["lost"]) == (5, 0)


async def test_a_durable_job_changed_after_put_into_something_not_json_safe_is_counted_lost(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'q.db'}"
    engine = make_engine(store=url, node_id="n")
    got: list[Any] = []

    async def handler(job: dict) -> None:
        got.append(dict(job))

    queue = engine.queue("mutable", handler)
    rec = Recorder(engine, ("queue.drain_incomplete",))
    async with engine:
        engine.pause_queue("mutable")
        ran, waits = {"v": 1.0}, {"v": 2.0}
        queue.put_nowait(ran)
        ran["v"] = float("nan")  # the caller reuses its dict before the job is written
        await eventually(lambda: queue.info().lost == 1)
        engine.resume_queue("mutable")
        await asyncio.wait_for(queue.join(), 2)
        assert len(got) == 1  # it ran here all the same
        assert engine.stats().queues["mutable"]["lost"] == 1
        engine.pause_queue("mutable")
        queue.put_nowait(waits)
        waits["v"] = float("inf")
        queue.put_nowait({"v": 3.0})
        await eventually(lambda: queue.info().lost == 2)
        await engine.stop(timeout=0)
    # of the two jobs the stop left, only the one that could be written is kept for the next start
    info = queue.info()
    assert (info.abandoned, info.kept, info.lost) == (2, 1, 2)
    [event] = rec.of("queue.drain_incomplete")
    assert event.left == 2 and event.kept is False
    again = make_engine(store=url, node_id="n")
    later = again.queue("mutable", handler)
    async with again:
        await asyncio.wait_for(later.join(), 2)
    assert later.info().adopted == 1 and got[1:] == [{"v": 3.0}]
