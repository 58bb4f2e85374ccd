"""Fixes from a review: engine.history set from another thread, a trigger whose late start
failed, and what the loop-thread refusal tells a caller on another thread."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskwatch.engine import BackgroundEngine, Engine, InvalidParams, LoopThreadError, RunStatus, TaskContext

from .helpers import eventually, in_thread, stray_tasks


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


# ---------------------------------------------------------------- a trigger whose late start failed


@contextlib.asynccontextmanager
async def table_away(path: Path, table: str) -> AsyncIterator[None]:
    """Another process renames ``table`` of the engine's file while inside (a migration, an
    operator): the engine's reads and writes of it fail until it is back."""
    other = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(other.execute, f"ALTER TABLE {table} RENAME TO {table}_away")
        try:
            yield
        finally:
            await asyncio.to_thread(other.execute, f"ALTER TABLE {table}_away RENAME TO {table}")
    finally:
        other.close()


async def test_drain_of_a_trigger_whose_late_start_failed_waits_only_for_its_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.db"
    engine = Engine(health_interval=None, store=f"sqlite:///{path}")
    ran: list[str] = []

    async def on_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    async with engine:
        # another process changing the file under the engine (a migration, an operator): the
        # trigger's start cannot read its saved counts
        async with table_away(path, "trigger_keys"):
            with caplog.at_level(logging.ERROR):
                trigger = engine.trigger("late", on_key, size_threshold=1)
                # made before the start ran, this drain waits for it: its failure answers it
                await asyncio.wait_for(trigger.drain(), 5)
            assert any("trigger 'late'" in r.getMessage() and "could not start" in r.getMessage() for r in caplog.records)
        trigger.notify("k")  # still counted and fired on the engine's loop
        await asyncio.wait_for(trigger.drain(), 5)
        assert ran == ["k"]
        assert trigger.fired == 1
        assert [r.status for r in engine.runs(limit=None)] == [RunStatus.SUCCEEDED]


async def test_a_trigger_whose_late_start_failed_starts_once_the_store_answers_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.db"
    ran: list[str] = []

    async def on_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    first = Engine(health_interval=None, store=f"sqlite:///{path}")
    first.trigger("late", on_key, size_threshold=3).notify("k", 2)
    async with first:
        pass
    engine = Engine(health_interval=None, store=f"sqlite:///{path}")
    async with engine:
        async with table_away(path, "trigger_keys"):
            with caplog.at_level(logging.ERROR):
                trigger = engine.trigger("late", on_key, size_threshold=3, check_interval=0.05, staleness=3600)
                await eventually(lambda: any("trying again" in r.getMessage() for r in caplog.records))
        # the two counts the first engine saved are taken up by the start tried again
        await eventually(lambda: [(k.key, k.count) for k in trigger.state().keys] == [("k", 2)], timeout=10)
        trigger.notify("k")
        await asyncio.wait_for(trigger.drain(), 5)
        assert ran == ["k"]


async def test_a_queue_whose_late_start_failed_handles_its_jobs_once_the_store_answers_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.db"
    handled: list[int] = []

    async def handle(job: int) -> None:
        handled.append(job)

    engine = Engine(health_interval=None, store=f"sqlite:///{path}")
    async with engine:
        async with table_away(path, "queue_jobs"):
            with caplog.at_level(logging.ERROR):
                queue = engine.queue("late", handle)
                await eventually(lambda: any("trying again" in r.getMessage() for r in caplog.records))
            for job in range(3):
                await queue.put(job)
        await asyncio.wait_for(queue.join(), 10)
        assert handled == [0, 1, 2]
    # nothing was left behind for a next start
    seen: list[int] = []

    async def keep(job: int) -> None:
        seen.append(job)

    again = Engine(health_interval=None, store=f"sqlite:///{path}")
    q = again.queue("late", keep)
    async with again:
        await asyncio.wait_for(q.join(), 5)
    assert seen == [] and q.adopted == 0


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


# ---------------------------------------------------------------- a program that ends without stop()

_ENDS_WITHOUT_STOP = """
import asyncio, sys
from taskwatch.engine import Engine, TaskContext

engine = Engine(store=sys.argv[1], node_id="w1", health_interval=None)

@engine.task(name="long")
async def long(ctx: TaskContext) -> None:
    await asyncio.Event().wait()

async def main() -> None:
    await engine.start()  # no `async with`, and no stop(): main() fails first
    handles = [await engine.submit("long") for _ in range(4)]
    while any(engine.get(h.id).status != "running" for h in handles):
        await asyncio.sleep(0.005)
    print(" ".join(h.id for h in handles), flush=True)
    raise RuntimeError("a bug elsewhere in the program")

asyncio.run(main())
"""


async def test_runs_going_when_a_program_ends_without_stop_are_run_again_not_cancelled(tmp_path: Path) -> None:
    # asyncio.run's end cancels every task: no one cancelled those runs, and a kill -9 at the
    # same moment would have left them to run again
    import subprocess
    import sys

    url = f"sqlite:///{tmp_path / 'runs.db'}"
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", _ENDS_WITHOUT_STOP, url], capture_output=True, text=True, timeout=60
    )
    assert "a bug elsewhere in the program" in done.stderr, done.stderr
    ids = done.stdout.split()
    assert len(ids) == 4
    engine = Engine(store=url, node_id="w1", health_interval=None)

    @engine.task(name="long")
    async def long(ctx: TaskContext) -> int:
        return ctx.attempt

    async with engine:
        records = [await asyncio.wait_for(engine.handle(i).wait(), 10) for i in ids]
    assert [(r.status, r.result) for r in records] == [(RunStatus.SUCCEEDED, 2)] * 4


# ---------------------------------------------------------------- what a superseded process says it stopped


async def test_a_process_replaced_under_its_node_id_names_the_runs_it_stopped(tmp_path: Path) -> None:
    # the newer process recovers the older one's claims at its start, so the older one's next
    # heartbeat finds them lost and learns it was replaced at once: they are still its runs
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    old = Engine(store=url, node_id="same", lease_ttl=1.0, health_interval=None)
    new = Engine(store=url, node_id="same", lease_ttl=1.0, health_interval=None)
    for engine in (old, new):

        @engine.task(name="long")
        async def long(ctx: TaskContext) -> None:
            await asyncio.Event().wait()

    said: list[Any] = []
    old.bus.add_callback(said.append, ["node.superseded"])
    async with old:
        ids = [(await old.submit("long")).id for _ in range(3)]
        await eventually(lambda: all(old.get(i).status is RunStatus.RUNNING for i in ids))
        async with new:
            await eventually(lambda: said, 10)
            assert sorted(said[0].stopped) == sorted(ids)
            await new.stop(0.1)
        await old.stop(0.1)


# ---------------------------------------------------------------- a queue made while the engine stops


async def test_a_queue_made_by_a_job_while_the_engine_stops_leaves_the_stop_whole(tmp_path: Path) -> None:
    engine = Engine(store=f"sqlite:///{tmp_path / 'runs.db'}", health_interval=None)
    made: list[str] = []

    async def quick(job: int) -> None:
        return None

    async def maker(job: int) -> None:
        # a job still handled while the stop drains the queues makes another queue
        while engine.state == "running":
            await asyncio.sleep(0.005)
        for _ in range(50):
            await asyncio.sleep(0)  # the stop is past its scheduler and triggers: at the queues
        made.append(engine.queue("made-late", quick).name)

    first = engine.queue("first", maker)
    await engine.start()
    await first.put(1)
    await eventually(lambda: first.info().in_flight == 1)
    await engine.stop(5)
    assert made == ["made-late"] and engine.state == "stopped"
    assert stray_tasks() == set()  # the executor's loops too


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
