"""Queue fixes found in review: late starts, waiters on another loop, handler shapes.

- on a durable store, ``await put()`` on a queue made while the engine runs returns only
  once the job is committed (a process killed right after still has it at the next
  start), and ``join()`` on such a queue waits for the jobs the store holds;
- a ``join()`` or a ``put()`` waiting for room, awaited on another loop before a
  ``start_background()`` engine starts, is woken once the queue drains or room frees
  (a durable put then returns once its job is committed);
- a job model is found on a handler that is a ``functools.partial``, an object with an
  async ``__call__``, a model defined inside a function under ``from __future__ import
  annotations``, or beside a context annotation typing cannot resolve; an annotation that
  resolves nowhere raises ``TaskDefinitionError`` instead of being ignored;
- jobs taken up from the store are not held back by ``maxsize``, and ``QueueFull`` says
  how many really wait;
- a queue handler's ``ctx.progress`` checks its values (``InvalidProgress``) and publishes
  nothing; ``Engine(store=...)`` of the wrong kind raises ``InvalidConfiguration``.
"""

from __future__ import annotations

import asyncio
import functools
import math
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    BackgroundEngine,
    Engine,
    InvalidConfiguration,
    InvalidJob,
    InvalidProgress,
    QueueFull,
    TaskContext,
    TaskDefinitionError,
)

from .helpers import Recorder, eventually

if TYPE_CHECKING:
    # only for type checkers: typing cannot resolve it when the queue reads the handler's hints
    from taskwatch.engine.context import TaskContext as LazyContext

#: generous bounds for a loaded machine; a passing run takes a fraction of them
TIMEOUT = 10.0
REPO = Path(__file__).resolve().parent.parent


class Job(BaseModel):
    n: int


def _engine(db: Path, **options: Any) -> Engine:
    return Engine(store=f"sqlite:///{db}", node_id="n1", health_interval=None, cancel_grace=0.05, **options)


# ---------------------------------------------------------------- queues made while the engine runs

#: puts one job on a queue made after the engine started, then dies at once (no stop, no
#: further write): what the store holds then is all the next start has
_CRASH_AFTER_PUT = """
import asyncio, os, sys
from taskwatch.engine import Engine

async def main() -> None:
    engine = Engine(store="sqlite:///" + sys.argv[1], node_id="n1", health_interval=None)
    await engine.start()

    async def handler(job):
        await asyncio.Event().wait()

    queue = engine.queue("late", handler)
    await queue.put({"n": 1})
    print("put returned", flush=True)
    os._exit(0)

asyncio.run(main())
"""


async def test_a_put_on_a_queue_made_while_the_engine_runs_survives_a_crash_right_after_it(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    child = subprocess.run(
        [sys.executable, "-c", _CRASH_AFTER_PUT, str(db)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "put returned"

    seen: list[Any] = []

    async def handler(job: Any) -> None:
        seen.append(job)

    engine = _engine(db)
    queue = engine.queue("late", handler)
    async with engine:
        await queue.join(timeout=TIMEOUT)
    # before: put returned before the late start had even made the queue durable: nothing was stored
    assert seen == [{"n": 1}]


async def _leave_jobs(db: Path, name: str, count: int, maxsize: int = 1000) -> None:
    """Put ``count`` jobs whose handler never ends, and stop: the store keeps them for the next start."""

    async def stuck(job: Any) -> None:
        await asyncio.Event().wait()

    engine = _engine(db)
    queue = engine.queue(name, stuck, maxsize=maxsize)
    await engine.start()
    for n in range(count):
        await queue.put({"n": n})
    await engine.stop(timeout=0.1)
    assert queue.info().kept == count


async def test_join_on_a_queue_made_while_the_engine_runs_waits_for_the_jobs_the_store_holds(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    await _leave_jobs(db, "q", 3)

    seen: list[Any] = []

    async def handler(job: Any) -> None:
        seen.append(job)

    engine = _engine(db)
    async with engine:
        queue = engine.queue("q", handler)  # its start takes up the 3 jobs, a moment later
        await queue.join(timeout=TIMEOUT)
        # before: the join returned at once, the queue being empty until its start had run
        assert sorted(job["n"] for job in seen) == [0, 1, 2]
        assert queue.info().adopted == 3


# ---------------------------------------------------------------- awaited on another loop before a background start


@pytest.fixture
def stoppers() -> Iterator[list[BackgroundEngine]]:
    started: list[BackgroundEngine] = []
    yield started
    for bg in started:
        bg.stop(timeout=5)


def _on_a_loop_of_its_own(make: Any) -> tuple[threading.Event, dict[str, Any], threading.Thread]:
    """Await ``make()`` on an event loop in a thread of its own; the event is set once it waits."""
    waiting = threading.Event()
    outcome: dict[str, Any] = {}

    async def go() -> None:
        task = asyncio.ensure_future(make())
        await asyncio.sleep(0)  # one step: the call runs up to its wait, on this loop
        waiting.set()
        try:
            outcome["result"] = await task
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome["error"] = exc

    thread = threading.Thread(target=asyncio.run, args=(go(),), daemon=True)
    thread.start()
    return waiting, outcome, thread


def test_a_join_on_another_loop_before_a_background_start_returns_once_the_queue_drains(
    stoppers: list[BackgroundEngine],
) -> None:
    engine = Engine(health_interval=None)
    handled: list[int] = []

    async def handler(job: int) -> None:
        handled.append(job)

    queue = engine.queue("q", handler)
    for n in range(3):
        queue.put_nowait(n)
    waiting, outcome, thread = _on_a_loop_of_its_own(lambda: queue.join(timeout=60))
    assert waiting.wait(TIMEOUT)
    stoppers.append(engine.start_background())
    thread.join(TIMEOUT)
    # before: the join's future, of the other loop, was resolved from the engine's thread and
    # never woke that loop: the join waited out its whole timeout
    assert not thread.is_alive()
    assert outcome == {"result": None}
    assert handled == [0, 1, 2]


@pytest.mark.parametrize("durable", [False, True])
def test_a_put_waiting_for_room_on_another_loop_before_a_background_start_returns_once_room_frees(
    durable: bool, tmp_path: Path, stoppers: list[BackgroundEngine]
) -> None:
    db = tmp_path / "q.db"
    engine = _engine(db) if durable else Engine(health_interval=None)
    gate = asyncio.Event()
    handled: list[int] = []

    async def handler(job: int) -> None:
        await gate.wait()
        handled.append(job)

    queue = engine.queue("q", handler, maxsize=1)
    queue.put_nowait(1)  # full
    waiting, outcome, thread = _on_a_loop_of_its_own(lambda: queue.put(2, timeout=60))
    assert waiting.wait(TIMEOUT)
    bg = engine.start_background()
    stoppers.append(bg)
    thread.join(TIMEOUT)  # the consumer takes job 1 at once, which frees the room
    # before: woken only by its own timeout (60 s)
    assert not thread.is_alive()
    assert outcome == {"result": None}
    if durable:
        # returned once committed: both jobs are in the file (job 1's handler still holds it)
        with sqlite3.connect(db) as conn:
            assert sorted(row[0] for row in conn.execute("SELECT job FROM queue_jobs")) == ["1", "2"]
    loop = engine.loop
    assert loop is not None
    loop.call_soon_threadsafe(gate.set)
    asyncio.run(queue.join(timeout=TIMEOUT))
    assert handled == [1, 2]


# ---------------------------------------------------------------- the handler's job model


async def test_a_job_model_defined_inside_a_function_is_applied() -> None:
    class Local(BaseModel):
        n: int

    got: list[Any] = []

    async def handler(job: Local) -> None:
        got.append(job)

    engine = Engine(health_interval=None)
    queue = engine.queue("q", handler)
    async with engine:
        # before: the string annotation did not resolve and the model was silently ignored
        with pytest.raises(InvalidJob, match="Local"):
            queue.put_nowait({"n": "not an int"})
        queue.put_nowait({"n": "7"})
        await queue.join(timeout=TIMEOUT)
    assert got == [Local(n=7)]


async def _handle_with(db: str, job: Job) -> None:
    _PARTIAL_GOT.append((db, job))


_PARTIAL_GOT: list[tuple[str, Job]] = []


class _Handler:
    def __init__(self) -> None:
        self.got: list[Job] = []

    async def __call__(self, job: Job) -> None:
        self.got.append(job)


async def test_a_partial_and_an_object_with_an_async_call_are_handlers_whose_job_model_is_applied() -> None:
    _PARTIAL_GOT.clear()
    obj = _Handler()
    engine = Engine(health_interval=None)
    # before: the partial's model was ignored, and the object was refused
    by_partial = engine.queue("partial", functools.partial(_handle_with, "db"))
    by_object = engine.queue("object", obj)
    async with engine:
        for queue in (by_partial, by_object):
            with pytest.raises(InvalidJob):
                queue.put_nowait({"n": "not an int"})
            queue.put_nowait({"n": 1})
            await queue.join(timeout=TIMEOUT)
    assert _PARTIAL_GOT == [("db", Job(n=1))]
    assert obj.got == [Job(n=1)]


async def test_a_job_model_beside_a_context_annotation_typing_cannot_resolve_is_applied() -> None:
    got: list[Any] = []

    async def handler(ctx: LazyContext, job: Job) -> None:
        got.append(job)

    engine = Engine(health_interval=None)
    queue = engine.queue("q", handler)
    async with engine:
        with pytest.raises(InvalidJob):
            queue.put_nowait({"n": "not an int"})
        queue.put_nowait({"n": 2})
        await queue.join(timeout=TIMEOUT)
    assert got == [Job(n=2)]


async def test_a_job_annotation_that_resolves_nowhere_is_refused_when_the_queue_is_made() -> None:
    async def handler(job: Nowhere) -> None:  # type: ignore[name-defined]  # noqa: F821
        pass

    engine = Engine(health_interval=None)
    with pytest.raises(TaskDefinitionError, match="'Nowhere'.*queue 'q'"):
        engine.queue("q", handler)
    assert engine.queues() == []


# ---------------------------------------------------------------- maxsize and jobs taken up from the store


async def test_jobs_taken_up_from_the_store_are_all_kept_and_queue_full_says_how_many_wait(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    await _leave_jobs(db, "q", 20, maxsize=20)

    gate = asyncio.Event()
    seen: list[int] = []

    async def handler(job: Any) -> None:
        await gate.wait()
        seen.append(job["n"])

    engine = _engine(db)
    queue = engine.queue("q", handler, maxsize=5)
    async with engine:
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        assert queue.depth == 19  # all taken up, past the maxsize
        with pytest.raises(QueueFull) as full:
            queue.put_nowait({"n": 99})
        # before: "(5 items waiting)"
        assert "19 items waiting" in str(full.value)
        assert (full.value.limit, full.value.waiting) == (5, 19)
        gate.set()
        await queue.join(timeout=TIMEOUT)
        assert sorted(seen) == list(range(20))
        queue.put_nowait({"n": 20})  # drained below its maxsize: accepted again
        await queue.join(timeout=TIMEOUT)
    assert seen[-1] == 20


# ---------------------------------------------------------------- a handler's progress, the engine's store


async def test_a_queue_handlers_progress_is_checked_and_publishes_nothing() -> None:
    engine = Engine(health_interval=None)
    rec = Recorder(engine)
    outcomes: list[str] = []

    async def handler(ctx: TaskContext, job: Any) -> None:
        await ctx.progress(1, 2, "half")
        for bad in ((math.nan,), (1, math.inf), (1, 2, 5)):
            try:
                await ctx.progress(*bad)
            except InvalidProgress as exc:
                outcomes.append(str(exc))
            else:
                outcomes.append("accepted")

    queue = engine.queue("q", handler)
    async with engine:
        queue.put_nowait(1)
        await queue.join(timeout=TIMEOUT)
    # before: every report was accepted silently
    assert [("finite number" in o) or ("valid string" in o) for o in outcomes] == [True, True, True]
    assert not [k for k in rec.kinds() if "progress" in k]
    assert queue.info().failed == 0


@pytest.mark.parametrize("store", [None, 5, b"memory"])
def test_a_store_that_is_neither_a_url_nor_a_store_is_refused(store: Any) -> None:
    # before: AttributeError from deep inside the constructor
    with pytest.raises(InvalidConfiguration, match="store=.*'memory'.*Store instance"):
        Engine(store=store)
