"""What a submit refuses, said so the caller can act on it: an id of your own that no store
could keep, and a batch bigger than the room the run queue has left.

Checked here, on the memory store and a real SQLite file:

- an ``Engine(run_id_factory=...)`` whose id is empty, not a str, holds a control character
  or is too long refuses that submit with :class:`InvalidConfiguration` naming the factory, and
  queues nothing (a store would put an id of its own in place of ``""``, leaving the caller's
  handle waiting on a run that never ends); good ids of your own go on working; one used
  already raises :class:`DuplicateRunId` and leaves the run under it alone;
- ``submit_many`` of a batch the queue has no room for says how many wait and how many more
  it takes, so the caller knows a smaller batch fits; nothing of the batch is queued.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import DuplicateRunId, Engine, InvalidConfiguration, QueueFull, RunStatus, TaskContext

TIMEOUT = 10.0


def _store(kind: str, tmp_path: Path) -> str:
    return "memory" if kind == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize(
    ("bad", "said"),
    [
        ("", "empty id"),
        (42, "a int, where a run id is a str"),
        ("run\n1", "control character"),
        ("x" * 300, "300 bytes"),
    ],
)
async def test_an_id_of_your_own_no_store_could_keep_refuses_its_submit_and_queues_nothing(
    kind: str, bad: Any, said: str, tmp_path: Path
) -> None:
    ids = iter(["order-1", bad, "order-2"])
    engine = Engine(store=_store(kind, tmp_path), run_id_factory=lambda: next(ids), health_interval=None)

    @engine.task
    async def work(ctx: TaskContext) -> str:
        return ctx.run_id

    async with engine:
        first = await (await engine.submit("work")).wait(TIMEOUT)
        with pytest.raises(InvalidConfiguration, match=said) as refused:
            await engine.submit("work")
        assert "run_id_factory" in str(refused.value) and "nothing was queued" in str(refused.value)
        last = await (await engine.submit("work")).wait(TIMEOUT)
        stored = await engine.query_runs()
    assert (first.id, first.result, last.id, last.result) == ("order-1", "order-1", "order-2", "order-2")
    assert sorted(r.id for r in stored.runs) == ["order-1", "order-2"]
    assert all(r.status is RunStatus.SUCCEEDED for r in stored.runs)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("how", ["submit", "submit_nowait", "submit_many"])
async def test_an_id_of_your_own_used_twice_refuses_the_second_and_leaves_the_first_run_alone(
    kind: str, how: str, tmp_path: Path
) -> None:
    ids = iter(["order-1", "order-1", "order-2"])
    engine = Engine(store=_store(kind, tmp_path), run_id_factory=lambda: next(ids), health_interval=None)
    release = asyncio.Event()

    @engine.task
    async def work(ctx: TaskContext) -> str:
        await release.wait()
        return ctx.run_id

    async with engine:
        first = await engine.submit("work")
        with pytest.raises(DuplicateRunId, match="run_id_factory") as refused:
            if how == "submit":
                await engine.submit("work")
            elif how == "submit_nowait":
                engine.submit_nowait("work")
            else:
                await engine.submit_many([("work", None)])
        assert refused.value.run_id == "order-1" and "nothing was inserted" in str(refused.value)
        release.set()
        done = await first.wait(TIMEOUT)
        last = await (await engine.submit("work")).wait(TIMEOUT)
        stored = await engine.query_runs()
        stats = engine.stats()
    # the run under that id was not stood in for (a SQLite submit_nowait failed it)
    assert (done.status, done.result, last.id) == (RunStatus.SUCCEEDED, "order-1", "order-2")
    assert sorted((r.id, r.status) for r in stored.runs) == [
        ("order-1", RunStatus.SUCCEEDED), ("order-2", RunStatus.SUCCEEDED)
    ]
    assert (stats.submitted_total, stats.failed_total) == (2, 0)


async def test_an_id_used_by_a_run_only_the_store_still_holds_fails_that_run_alone(tmp_path: Path) -> None:
    # (history=2: the engine's memory let the first session's runs go) submit_nowait's batch
    # write was refused as a whole for that one id, failing every run written with it
    ids = iter(["order-1", "order-2", "order-3", "order-1", *(f"new-{i}" for i in range(20))])
    store = _store("sqlite", tmp_path)

    def engine() -> Engine:
        built = Engine(store=store, run_id_factory=lambda: next(ids), health_interval=None, history=2)

        @built.task
        async def work(ctx: TaskContext) -> str:
            return ctx.run_id

        return built

    async with engine() as first:
        for _ in range(3):
            await (await first.submit("work")).wait(TIMEOUT)
    async with engine() as second:
        handles = [second.submit_nowait("work") for _ in range(21)]
        records = [await h.wait(TIMEOUT) for h in handles]
        stored = await second.query_runs(limit=100)
    refused, *written = records
    assert refused.id == "order-1" and refused.status is RunStatus.FAILED
    assert refused.error is not None and refused.error.type == "DuplicateRunId"
    assert [(r.id, r.status) for r in written] == [(f"new-{i}", RunStatus.SUCCEEDED) for i in range(20)]
    # the stored run under that id is left as it was
    assert {r.id: r.status for r in stored.runs}["order-1"] is RunStatus.SUCCEEDED
    assert len(stored.runs) == 23


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_batch_bigger_than_the_room_left_says_how_much_room_there_is(kind: str, tmp_path: Path) -> None:
    engine = Engine(store=_store(kind, tmp_path), max_queue=10, max_concurrency=1, health_interval=None)
    hold, started = asyncio.Event(), asyncio.Event()

    @engine.task
    async def wait(ctx: TaskContext) -> None:
        started.set()
        await hold.wait()

    async with engine:
        await engine.submit("wait")
        await asyncio.wait_for(started.wait(), TIMEOUT)  # running: it takes no room in the queue
        await engine.submit_many([("wait", None)] * 2)
        with pytest.raises(QueueFull) as refused:
            await engine.submit_many([("wait", None)] * 9)
        text = str(refused.value)
        assert (refused.value.waiting, refused.value.adding) == (2, 9)
        assert "room for 8 more (2 of 10 waiting), not the 9 given at once" in text and "nothing was queued" in text
        assert engine.stats().by_status["pending"] == 2  # nothing of the batch
        await engine.submit_many([("wait", None)] * 8)  # what it said fits, fits
        assert engine.stats().by_status["pending"] == 10
        hold.set()
