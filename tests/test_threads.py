"""The engine used from other threads and loops: engine.history set from another thread,
what the loop-thread refusal tells a caller on another thread, the background engine's batch
submit waited from any thread, and a run handle awaited on another loop than the engine's.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import BackgroundEngine, Engine, InvalidParams, LoopThreadError, RunStatus, TaskContext

from .helpers import in_thread

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

    @engine.task(name="gated")
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
