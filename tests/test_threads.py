"""The engine used from other threads and loops: engine.history set from another thread,
what the loop-thread refusal tells a caller on another thread, the background engine's batch
submit waited from any thread, a run handle awaited on another loop than the engine's, the
engine's reads and loop actions called from another thread or awaited on another loop (made on
the engine's loop), and its start and stop awaited on another loop (refused, changing nothing).
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    BackgroundEngine,
    Engine,
    EngineAlreadyRunning,
    InvalidParams,
    LoopThreadError,
    RunStatus,
    TaskContext,
)

from .helpers import in_thread, wait_until
from .test_background import hold_loop

# ---------------------------------------------------------------- history from another thread


@pytest.fixture
def bg() -> Iterator[BackgroundEngine]:
    engine = Engine(health_interval=None, history=1_000)

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> None:
        return None

    background = engine.start_background()
    try:
        yield background
    finally:
        background.stop(timeout=10)


def test_history_lowered_from_another_thread_leaves_the_loops_runs_alone_until_its_next_turn(
    bg: BackgroundEngine,
) -> None:
    async def fill(engine: Engine) -> None:
        handles = await engine.submit_many([("t", None)] * 300)
        await asyncio.gather(*(h.wait() for h in handles))

    bg.call(fill)
    lowered = threading.Event()
    looking = threading.Event()

    def on_the_loop(engine: Engine) -> tuple[int, int]:
        # what a snapshot or runs() iterating on the loop sees across the other thread's setting
        before = len(engine.runs(limit=None))
        looking.set()
        assert lowered.wait(10)
        return before, len(engine.runs(limit=None))

    seen: list[tuple[int, int]] = []
    caller = threading.Thread(target=lambda: seen.append(bg.call(on_the_loop)))
    caller.start()
    assert looking.wait(10)
    bg.engine.history = 10  # from this thread, as a notebook cell beside start_background() would
    assert bg.engine.history == 10
    lowered.set()
    caller.join(10)
    assert seen == [(300, 300)]  # the loop's dicts did not change under it
    # and the loop lets them go at its next turn
    assert len(bg.runs(limit=None)) == 10
    assert bg.stats().by_status["succeeded"] == 10


def test_history_set_from_another_thread_with_no_loop_running_evicts_at_once() -> None:
    engine = Engine(health_interval=None)

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> None:
        return None

    bg = engine.start_background()
    for _ in range(5):
        bg.submit("t").wait(timeout=10)
    bg.stop(timeout=10)
    in_thread(lambda: setattr(engine, "history", 2))
    assert len(engine.runs(limit=None)) == 2


# ---------------------------------------------------------------- what the refusal says


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_each_refusal_from_another_thread_names_its_method_and_a_fix_that_exists(
    durable: bool, tmp_path: Path
) -> None:
    # a durable store's reads are futures of the engine's loop: run_periodic and retry read before they queue
    engine = Engine(health_interval=None, store=f"sqlite:///{tmp_path / 'runs.db'}" if durable else "memory")

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> None:
        return None

    @engine.task(name="boom")
    async def boom(ctx: TaskContext) -> None:
        raise ValueError("boom")

    @engine.periodic(name="per", every=3600, initial_delay=3600)
    async def per(ctx: TaskContext) -> None:
        return None

    async with engine:
        failed = await (await engine.submit("boom")).wait(timeout=5)
        calls: dict[str, Callable[[], Any]] = {
            "submit": lambda: asyncio.run(engine.submit("t")),
            "submit_many": lambda: asyncio.run(engine.submit_many([("t", None)])),
            "submit_nowait": lambda: engine.submit_nowait("t"),
            "retry": lambda: asyncio.run(engine.retry(failed.id)),
            "run_periodic": lambda: asyncio.run(engine.run_periodic("per")),
        }
        errors = {name: await asyncio.to_thread(in_thread, call) for name, call in calls.items()}
        assert len(engine.runs(limit=None)) == 1  # nothing was queued
    for name, error in errors.items():
        assert isinstance(error, LoopThreadError), (name, error)
        assert error.method == name
        assert f"Engine.{name}() was called from a thread" in str(error)
        assert "nothing was queued" in str(error)
    for name in ("submit", "submit_many", "retry", "run_periodic"):
        assert f"background engine's `{name}(...)`" in str(errors[name])
        assert hasattr(BackgroundEngine, name)
    # the background engine has no submit_nowait: its submit returns a handle as soon as the run is queued
    assert "background engine's `submit(...)`" in str(errors["submit_nowait"])


def test_the_background_engines_batch_submit_gives_handles_waited_from_any_thread() -> None:
    engine = Engine(health_interval=None)

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> str:
        return "ok"

    bg = engine.start_background()
    try:
        handles = bg.submit_many([("t", None), {"task": "t", "key": "k"}])
        # waited from this thread (not the engine's), as bg.submit's are
        assert [h.wait(timeout=5).result for h in handles] == ["ok", "ok"]
        with pytest.raises(InvalidParams, match="item 1 of submit_many"):
            bg.submit_many([("t", None), ("t", {"x": 1})])
        assert len(bg.runs()) == 2  # the bad batch queued nothing
    finally:
        bg.stop(timeout=10)


# ---------------------------------------------------------------- a handle awaited on another loop


async def test_a_run_handle_awaited_on_another_loop_than_the_engines_gets_the_finish() -> None:
    engine = Engine(health_interval=None)
    gate = threading.Event()

    @engine.task(name="gated", concurrency=1)
    async def gated(ctx: TaskContext) -> int:
        await asyncio.to_thread(gate.wait, 10)
        return 7

    bg = engine.start_background()  # the engine's loop is another thread's; this test's is its own
    try:
        run_id = bg.submit("gated").id
        waits = [
            asyncio.ensure_future(engine.handle(run_id).wait()),
            asyncio.ensure_future(engine.handle(run_id).wait(timeout=30)),
        ]
        gate.set()
        records = await asyncio.wait_for(asyncio.gather(*waits), 10)
        assert [(r.status, r.result) for r in records] == [(RunStatus.SUCCEEDED, 7)] * 2
        assert (await engine.handle(run_id)).result == 7  # and once it has finished
    finally:
        bg.stop(timeout=10)


# ---------------------------------------------------------------- reads and loop actions from another thread


class Beats:
    """Counts a supervised worker's turns, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._n = 0

    def beat(self) -> None:
        with self._lock:
            self._n += 1

    @property
    def n(self) -> int:
        with self._lock:
            return self._n


def engine_of_every_kind(beats: Beats, store: str = "memory") -> Engine:
    """An engine with a task, a periodic task, a queue, a trigger and a supervised worker."""
    engine = Engine(health_interval=None, store=store, cancel_grace=5.0)
    gate = threading.Event()
    engine.resources["gate"] = gate

    @engine.task(name="t")
    async def t(ctx: TaskContext) -> int:
        return 1

    @engine.task(name="gated", concurrency=1)
    async def gated(ctx: TaskContext) -> int:
        await asyncio.to_thread(gate.wait, 30)
        return 2

    @engine.periodic(name="per", every=3600, initial_delay=3600)
    async def per(ctx: TaskContext) -> None:
        return None

    async def handle(job: Any) -> None:
        return None

    engine.queue("q", handle)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        return None

    engine.trigger("trig", compile_key, size_threshold=1_000)

    @engine.supervised(name="sup")
    async def sup(ctx: TaskContext) -> None:
        while True:
            beats.beat()
            await asyncio.sleep(0.01)

    return engine


def test_reads_and_loop_actions_from_another_thread_wait_for_the_engines_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # a read walking the index from this thread while the loop changes it raised "dictionary
    # changed size during iteration", or crashed the interpreter: made on the loop instead, a
    # read cannot happen while the loop is held, and one given up there did nothing
    # the wait for the loop cut short, so that a read the loop does not take up gives up quickly
    engine_module = importlib.import_module("taskwatch.engine.engine")
    monkeypatch.setattr(engine_module, "_HOP_TIMEOUT", 0.2, raising=False)
    beats = Beats()
    engine = engine_of_every_kind(beats)
    bg = engine.start_background()
    try:
        done = bg.submit("t").wait(timeout=10)
        wait_until(lambda: beats.n > 0)
        calls: dict[str, Callable[[], Any]] = {
            "get": lambda: engine.get(done.id),
            "runs": lambda: engine.runs(limit=None),
            "stats": engine.stats,
            "rates": lambda: engine.rates(1),
            "leadership": engine.leadership,
            "snapshot": engine.snapshot,
            "catalog": engine.catalog,
            "schedule": engine.schedule,
            "queues": engine.queues,
            "triggers": engine.triggers,
            "workers": engine.workers,
            "given_up_tasks": engine.given_up_tasks,
            "pause_queue": lambda: engine.pause_queue("q"),
            "start_worker": lambda: engine.start_worker("sup"),
        }
        release = hold_loop(bg)
        try:
            held = {name: in_thread(call) for name, call in calls.items()}
        finally:
            release.set()
        for name, outcome in held.items():
            assert isinstance(outcome, TimeoutError), (name, outcome)
            assert f"Engine.{name}() waited" in str(outcome) and "did nothing" in str(outcome), (name, outcome)
        assert not bg.queues()[0].paused  # the action given up changed nothing
        # once the loop is free every one of them answers, from this thread and from another
        answered = {name: in_thread(call) for name, call in calls.items()}
        assert not [(n, a) for n, a in answered.items() if isinstance(a, BaseException)]
        assert engine.get(done.id) == done
        assert [r.id for r in engine.runs(limit=None)] == [done.id]
        assert engine.snapshot().stats.succeeded_total == 1
        assert engine.queues()[0].paused
        assert engine.resume_queue("q").paused is False
    finally:
        bg.stop(timeout=10)


def test_a_worker_stopped_then_started_again_from_another_thread_runs_again() -> None:
    # started from this thread, it was marked started before its task failed to start here
    # ("no running event loop"): it stayed dead, and every later start_worker a no-op
    beats = Beats()
    engine = engine_of_every_kind(beats)
    bg = engine.start_background()
    try:
        wait_until(lambda: beats.n > 0)
        assert bg.stop_worker("sup").state == "stopped"
        info = engine.start_worker("sup")
        assert (info.state, info.stopped_by_user) == ("running", False)
        after = beats.n
        wait_until(lambda: beats.n > after)
        assert [(w.name, w.state, w.stopped_by_user) for w in bg.workers()] == [("sup", "running", False)]
    finally:
        bg.stop(timeout=10)


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
def test_loop_actions_and_store_reads_awaited_on_another_loop_are_made_on_the_engines(
    durable: bool, tmp_path: Path
) -> None:
    # each awaited on a loop of its own, which ends with it (asyncio.run's here, as a thread's
    # would): a worker restarted there became that loop's task and died with it, and a durable
    # store's futures, being the engine's loop's, failed there
    beats = Beats()
    engine = engine_of_every_kind(beats, f"sqlite:///{tmp_path / 'runs.db'}" if durable else "memory")
    bg = engine.start_background()
    gate: threading.Event = engine.resources["gate"]
    try:
        wait_until(lambda: beats.n > 0)
        first = bg.submit("gated")
        wait_until(lambda: bg.get(first.id).status is RunStatus.RUNNING)
        if durable:
            assert asyncio.run(engine.query_runs(task="gated")).runs[0].id == first.id
        assert asyncio.run(engine.fetch_run(first.id)).status is RunStatus.RUNNING
        assert asyncio.run(engine.stop_worker("sup")).state == "stopped"
        assert asyncio.run(engine.restart_worker("sup")).state == "running"
        after = beats.n
        wait_until(lambda: beats.n > after)  # still running, once the loop it was restarted from has closed
        assert bg.workers()[0].state == "running"
        waiting = bg.submit("gated")  # behind the first: its task runs one at a time
        assert asyncio.run(engine.cancel(waiting.id)).status is RunStatus.CANCELLED
        gate.set()
        assert first.wait(timeout=10).status is RunStatus.SUCCEEDED
    finally:
        gate.set()
        bg.stop(timeout=10)


# ---------------------------------------------------------------- start and stop awaited on another loop


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
def test_start_and_stop_awaited_on_another_loop_are_refused_and_change_nothing(
    durable: bool, tmp_path: Path
) -> None:
    # the stop was spawned on the caller's loop and failed half way: the engine said "stopped"
    # while its loops went on and the background engine said "running"; the start returned None
    beats = Beats()
    engine = engine_of_every_kind(beats, f"sqlite:///{tmp_path / 'runs.db'}" if durable else "memory")
    gate: threading.Event = engine.resources["gate"]
    bg = engine.start_background()
    try:
        going = bg.submit("gated")
        wait_until(lambda: bg.get(going.id).status is RunStatus.RUNNING)
        with pytest.raises(EngineAlreadyRunning, match="already running on another event loop"):
            asyncio.run(engine.start())
        with pytest.raises(LoopThreadError, match=r"nothing was stopped.*`bg\.stop\(\)`") as refused:
            asyncio.run(engine.stop(5))
        assert refused.value.method == "stop"

        async def as_a_block() -> None:
            async with engine:
                pass

        with pytest.raises(EngineAlreadyRunning):
            asyncio.run(as_a_block())
        assert (engine.state, bg.state) == ("running", "running")
        gate.set()
        assert going.wait(timeout=10).status is RunStatus.SUCCEEDED
        assert bg.submit("t").wait(timeout=10).result == 1
    finally:
        gate.set()
        bg.stop(timeout=10)
    assert engine.state == "stopped"

    # stopped, it starts on another loop as before, and stops there
    async def start_and_stop() -> str:
        await engine.start()
        await engine.stop(5)
        return engine.state

    assert asyncio.run(start_and_stop()) == "stopped"
