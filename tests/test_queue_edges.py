"""Queues at their edges: late starts, waiters on another loop, handler shapes, and jobs that
would not read back from the store as put.

- on a durable store, ``await put()`` on a queue made while the engine runs returns only
  once the job is committed (a process killed right after still has it at the next
  start), and ``join()`` on such a queue waits for the jobs the store holds;
- a ``join()`` awaited on another loop while a ``start_background()`` start is under way,
  or a ``put()`` waiting for room there before that engine starts, is woken once the queue
  drains or room frees (a durable put then returns once its job is committed);
- a ``join()`` on jobs put while the engine is not started, and no start is under way,
  raises ``EngineNotRunning`` at once (the jobs run at the next start); a start under way
  on its loop is waited for, and one that fails ends the join with ``EngineNotRunning``;
- ``await put()``, ``join()`` and ``purge()`` awaited on the application's loop while
  the engine runs on its own (``start_background()``, a notebook) behave as on the
  engine's loop: a join returns once the work is done, a put waiting for room returns
  once room frees, a durable put returns once its job is committed or raises the
  store's error, and a caller cancelled on its loop queues nothing;
- a job model is found on a handler that is a ``functools.partial``, an object with an
  async ``__call__``, a model defined inside a function under ``from __future__ import
  annotations``, or beside a context annotation typing cannot resolve; an annotation that
  resolves nowhere raises ``TaskDefinitionError`` instead of being ignored;
- a job model whose job would reach the handler as other values once read back from the
  store (a ``SecretStr`` is stored masked, a field with ``exclude=True`` left out) is
  refused at put with :class:`InvalidJob` naming the field and why, on every store, and
  nothing is queued, stored, or handled after a restart; a model that reads back as put
  (an alias, a tuple, an aware datetime) is still accepted and read back equal;
- jobs taken up from the store are not held back by ``maxsize``, and ``QueueFull`` says
  how many really wait;
- a queue handler's ``ctx.progress`` checks its values (``InvalidProgress``) and publishes
  nothing; ``Engine(store=...)`` of the wrong kind raises ``InvalidConfiguration``;
- a queue whose late start failed handles its jobs once the store answers again, and a
  queue made by a job while the engine stops leaves the stop whole.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import json
import logging
import math
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.dataclasses import dataclass as pydantic_dataclass
from taskwatch.engine import (
    BackgroundEngine,
    Engine,
    EngineLoopClosed,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidJob,
    InvalidProgress,
    JobNotSerializable,
    MemoryStore,
    NodeInfo,
    QueueFull,
    StoreBusy,
    StoreError,
    TaskContext,
    TaskDefinitionError,
)

from .helpers import Recorder, eventually, stray_tasks, table_away

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


#: puts jobs before the engine's start ("before": two awaited puts and a put_nowait, then the
#: start; "during": one awaited put while the start is opening the store), then is killed with
#: SIGKILL right after: no stop, no further write
_KILLED_AFTER_START = """
import asyncio, os, signal, sys
from taskwatch.engine import Engine

async def main() -> None:
    engine = Engine(store="sqlite:///" + sys.argv[1], node_id="n1", health_interval=None)

    async def handler(job):
        await asyncio.Event().wait()

    queue = engine.queue("early", handler)
    if sys.argv[2] == "before":
        await queue.put({"n": 1})
        await queue.put({"n": 2})
        queue.put_nowait({"n": 3})
        await engine.start()
        print("start returned", flush=True)
    else:
        starting = asyncio.create_task(engine.start())
        await asyncio.sleep(0)  # the start's task takes its first step: it is opening the store
        assert engine.state == "new" and not starting.done()
        await queue.put({"n": 1})
        print("put returned", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


@pytest.mark.parametrize(("when", "said", "jobs"), [("before", "start returned", 3), ("during", "put returned", 1)])
def test_jobs_put_before_or_during_the_engine_start_are_in_the_store_once_start_or_put_returned(
    tmp_path: Path, when: str, said: str, jobs: int
) -> None:
    db = tmp_path / "q.db"
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_AFTER_START, str(db), when], cwd=REPO, capture_output=True, text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stderr
    assert child.stdout.strip() == said
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT job FROM queue_jobs WHERE queue = 'early' ORDER BY id").fetchall()
    # before: a put before the start only queued the job in memory, and the start returned (and
    # a put during it) before the job's write: the kill left no row of them
    assert [json.loads(job) for (job,) in rows] == [{"n": n} for n in range(1, jobs + 1)]


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


class StartHeldAtRegister(MemoryStore):
    """A memory store whose start is held at its node's registration until ``gate`` is set
    (the engine is still "new", its start under way; threading events: the start may run on a
    ``start_background()`` loop); ``fail`` makes that registration fail."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.reached = threading.Event()
        self.fail = False

    async def register_node(self, node: str, incarnation: str, version: str) -> NodeInfo:
        self.reached.set()
        await asyncio.to_thread(self.gate.wait, 60)
        if self.fail:
            raise ConnectionError("the store is not there (the test says so)")
        return await super().register_node(node, incarnation, version)


def test_a_join_on_another_loop_during_a_background_start_returns_once_the_queue_drains(
    stoppers: list[BackgroundEngine],
) -> None:
    store = StartHeldAtRegister()
    engine = Engine(store=store, health_interval=None)
    handled: list[int] = []

    async def handler(job: int) -> None:
        handled.append(job)

    queue = engine.queue("q", handler)
    for n in range(3):
        queue.put_nowait(n)
    # before any start, nothing would handle the jobs: the join says so rather than wait
    _, refused, thread = _on_a_loop_of_its_own(lambda: queue.join(timeout=60))
    thread.join(TIMEOUT)
    assert isinstance(refused.get("error"), EngineNotRunning), refused
    launched: list[BackgroundEngine] = []
    launching = threading.Thread(target=lambda: launched.append(engine.start_background()), daemon=True)
    launching.start()
    try:
        assert store.reached.wait(TIMEOUT)  # the start is under way on the engine's own loop
        waiting, outcome, thread = _on_a_loop_of_its_own(lambda: queue.join(timeout=60))
        assert waiting.wait(TIMEOUT)
        assert not outcome  # it waits for the start under way, not refused
    finally:
        store.gate.set()
        launching.join(TIMEOUT)
        stoppers.extend(launched)
    thread.join(TIMEOUT)
    # before: the join's future, of the other loop, was resolved from the engine's thread and
    # never woke that loop: the join waited out its whole timeout
    assert not thread.is_alive()
    assert outcome == {"result": None}
    assert handled == [0, 1, 2]


def test_a_join_on_another_loop_during_a_background_start_that_fails_is_told_at_once(
    stoppers: list[BackgroundEngine],
) -> None:
    # it waited for the jobs' end on the engine's loop, which a failed start never gave them:
    # the join waited out its whole timeout (a drain in the same spot was told at once)
    store = StartHeldAtRegister()
    store.fail = True
    engine = Engine(store=store, health_interval=None)

    async def handler(job: int) -> None:
        pass

    queue = engine.queue("q", handler)
    queue.put_nowait(1)
    failed: list[BaseException] = []

    def launch() -> None:
        try:
            stoppers.append(engine.start_background())
        except Exception as exc:  # noqa: BLE001 - the refusal under test
            failed.append(exc)

    launching = threading.Thread(target=launch, daemon=True)
    launching.start()
    try:
        assert store.reached.wait(TIMEOUT)  # the start is under way on the engine's own loop
        waiting, outcome, thread = _on_a_loop_of_its_own(lambda: queue.join(timeout=60))
        assert waiting.wait(TIMEOUT)
        assert not outcome  # it waits for the start under way
    finally:
        store.gate.set()  # which now fails
        launching.join(TIMEOUT)
    thread.join(TIMEOUT)
    assert failed and not thread.is_alive()
    assert isinstance(outcome.get("error"), EngineNotRunning), outcome
    assert queue.depth == 1  # kept for a start that works


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


# ---------------------------------------------------------------- jobs that would not read back as put


class Mail(BaseModel):
    to: str
    api_token: SecretStr
    priority: int = Field(default=0, exclude=True)


class Shipment(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    order_id: str = Field(alias="orderId")
    size: tuple[int, int]
    due: dt.datetime


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    if request.param == "memory":
        yield None
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def _store_engine(store: str | None) -> Engine:
    if store is None:
        return Engine(health_interval=None)
    return Engine(store=store, node_id="n1", health_interval=None)


async def test_a_job_whose_secret_or_excluded_field_would_not_survive_the_store_is_refused_at_put(
    store: str | None,
) -> None:
    handled: list[Mail] = []

    async def send(job: Mail) -> None:
        handled.append(job)

    engine = _store_engine(store)
    queue = engine.queue("mail", send)
    async with engine:
        with pytest.raises(InvalidJob) as refused:
            await queue.put({"to": "a@x", "api_token": "real-token", "priority": 7})
        with pytest.raises(InvalidJob):
            queue.put_nowait(Mail(to="b@x", api_token=SecretStr("real-token")))
        info = queue.info()
    message = str(refused.value)
    assert "nothing was queued" in message
    assert "api_token: a secret's JSON dump is masked" in message
    assert "priority: excluded from dumps (exclude=True)" in message
    assert {e["loc"] for e in refused.value.errors} == {("api_token",), ("priority",)}
    assert (info.accepted, info.depth, info.processed) == (0, 0, 0)
    assert handled == []
    if store is None:
        return
    # nothing was stored either: a restart has no job to hand the handler (masked)
    engine = _store_engine(store)
    queue = engine.queue("mail", send)
    async with engine:
        await queue.join(timeout=TIMEOUT)
        assert queue.info().adopted == 0
    assert handled == []


async def test_a_job_model_that_reads_back_as_put_is_accepted_and_read_back_equal(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'q.db'}"
    job = Shipment(orderId="o1", size=(2, 3), due=dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    got: list[Any] = []
    held = asyncio.Event()

    async def ship_it(shipment: Shipment) -> None:
        got.append(shipment)
        held.set()
        await asyncio.Event().wait()  # still running when the first engine stops: kept for the next

    engine = _store_engine(db)
    queue = engine.queue("ship", ship_it)
    async with engine:
        await queue.put(job)
        await asyncio.wait_for(held.wait(), TIMEOUT)
        await engine.stop(timeout=0.1)

    async def done(shipment: Shipment) -> None:
        got.append(shipment)

    engine = _store_engine(db)
    queue = engine.queue("ship", done)
    async with engine:
        await queue.join(timeout=TIMEOUT)
    assert got == [job, job]
    assert isinstance(got[1], Shipment)


def _gated(engine: Engine, name: str, **options: Any) -> tuple[Any, asyncio.Event, list[Any]]:
    """A queue whose handler holds each job until ``gate`` is set (from any thread, via the engine's loop)."""
    gate = asyncio.Event()
    handled: list[Any] = []

    async def handler(job: Any) -> None:
        await gate.wait()
        handled.append(job)

    return engine.queue(name, handler, **options), gate, handled


def _open(engine: Engine, gate: asyncio.Event) -> None:
    loop = engine.loop
    assert loop is not None
    loop.call_soon_threadsafe(gate.set)


def test_join_on_another_loop_returns_once_the_work_is_done(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, gate, handled = _gated(engine, "q")
    stoppers.append(engine.start_background())

    async def app() -> None:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        join = asyncio.ensure_future(queue.join())
        await asyncio.sleep(0)  # the join is waiting before the job may end
        _open(engine, gate)
        started = time.monotonic()
        await asyncio.wait_for(join, TIMEOUT)
        # before: answered only when something else woke this loop (here the wait_for's timer)
        assert time.monotonic() - started < TIMEOUT / 2

    asyncio.run(app())
    assert handled == [1]


def test_put_on_another_loop_returns_as_soon_as_room_frees(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, gate, handled = _gated(engine, "q", concurrency=1, maxsize=1)
    stoppers.append(engine.start_background())

    async def app() -> None:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        queue.put_nowait(2)  # full now
        put = asyncio.ensure_future(queue.put(3, timeout=600))
        await asyncio.sleep(0)  # the put is waiting for room before any frees
        _open(engine, gate)
        started = time.monotonic()
        # the put may wait up to 600 s: it is answered once room frees, not when this loop
        # happens to wake (before: the wait_for's timer)
        await asyncio.wait_for(put, TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
        await asyncio.wait_for(queue.join(), TIMEOUT)

    asyncio.run(app())
    assert handled == [1, 2, 3]


def test_a_put_on_another_loop_cancelled_by_its_caller_queues_nothing(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, gate, handled = _gated(engine, "q", concurrency=1, maxsize=1)
    stoppers.append(engine.start_background())

    async def app() -> None:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        queue.put_nowait(2)
        # the caller gives up while the put waits for room (on the engine's loop by then, or not yet)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.put(3, timeout=600), 0.3)
        _open(engine, gate)
        await asyncio.wait_for(queue.join(), TIMEOUT)

    asyncio.run(app())
    assert handled == [1, 2]
    assert queue.info().accepted == 2


def test_a_durable_put_on_another_loop_raises_the_stores_error_and_returns_once_committed(
    tmp_path: Path, stoppers: list[BackgroundEngine]
) -> None:
    db = tmp_path / "q.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=200", node_id="n1", health_interval=None)
    queue, _gate, _handled = _gated(engine, "q")
    bg = engine.start_background()
    stoppers.append(bg)
    bg.pause_queue("q")  # no consumer takes the job: the put waits for its own write
    lock = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the store is busy past its busy_timeout

        async def refused() -> None:
            with pytest.raises(StoreBusy):
                await asyncio.wait_for(queue.put({"i": 1}), TIMEOUT)  # before: returned at once

        asyncio.run(refused())
        assert queue.info().depth == 0  # taken back: nothing queued, so the caller may retry
        lock.execute("ROLLBACK")
        asyncio.run(queue.put({"i": 2}))
        # committed once the put returned: in the file for any other connection to read
        stored = lock.execute("SELECT job FROM queue_jobs").fetchall()
        assert [json.loads(row[0]) for row in stored] == [{"i": 2}]
    finally:
        lock.close()


async def test_each_put_refused_by_a_busy_store_is_said_and_no_write_of_it_is_promised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "q.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=200", node_id="n1", health_interval=None)
    queue, _gate, _handled = _gated(engine, "q")
    lock = sqlite3.connect(db, isolation_level=None, timeout=0)
    async with engine:
        engine.pause_queue("q")  # no consumer takes the job: the put waits for its own write
        try:
            lock.execute("BEGIN EXCLUSIVE")  # the store is busy past its busy_timeout
            with caplog.at_level(logging.INFO, logger="taskwatch.queues"):
                for i in range(2):
                    with pytest.raises(StoreBusy):
                        await asyncio.wait_for(queue.put({"i": i}), TIMEOUT)
                    # said once the keeper and the put have both taken up the failure, in either order
                    await eventually(
                        lambda n=i + 1: sum("nothing is left" in r.getMessage() for r in caplog.records) == n
                    )
        finally:
            lock.close()
    said = [r for r in caplog.records if r.name == "taskwatch.queues"]
    # before: the first was said as "the jobs stay queued here, trying again", and the second,
    # a failure of that same streak, only at debug level
    assert sum(r.levelno == logging.WARNING for r in said) == 2, [r.getMessage() for r in said]
    assert queue.info().depth == 0


def test_an_engine_whose_stop_the_loops_teardown_cut_short_refuses_to_start_and_a_new_one_takes_up_its_jobs(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.db"
    engine = Engine(store=f"sqlite:///{path}", node_id="n", health_interval=None)
    handled: list[int] = []

    async def handle(job: dict[str, int]) -> None:
        handled.append(job["n"])
        if job["n"] == 0:
            await asyncio.Event().wait()  # keeps the stop draining

    queue = engine.queue("q", handle)

    async def first() -> None:
        await engine.start()
        for n in (0, 10, 11, 12):
            queue.put_nowait({"n": n})  # 10 to 12 wait behind 0 when the stop is cut
        await eventually(lambda: handled == [0], TIMEOUT)
        asyncio.get_running_loop().create_task(engine.stop(timeout=30))
        await eventually(lambda: engine.state == "stopping", TIMEOUT)
        # main() returns: the loop's teardown cuts the stop short while it drains

    asyncio.run(first())

    async def second() -> None:
        # its loops, tasks and queues ended half stopped with that loop: before, a start went
        # on with them (a queue running its jobs twice or never, a stop raising half way)
        with pytest.raises(EngineLoopClosed):
            await engine.start()
        with pytest.raises(EngineLoopClosed):
            queue.put_nowait({"n": 1})
        await engine.stop()  # tidies up, at once

    asyncio.run(second())
    # the jobs it held are in the file: a new engine of the node takes them up, each once (0
    # again: its handler was cut short)
    assert asyncio.run(handled_by_a_next_start(path, "q", "n")) == [{"n": n} for n in (0, 10, 11, 12)]


def test_purge_on_another_loop_drops_the_waiting_jobs(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, _gate, handled = _gated(engine, "q")
    bg = engine.start_background()
    stoppers.append(bg)
    bg.pause_queue("q")
    for i in range(3):
        queue.put_nowait(i)

    async def app() -> int:
        await eventually(lambda: queue.depth == 3, TIMEOUT)
        purge = await asyncio.wait_for(queue.purge(), TIMEOUT)
        return purge.purged

    assert asyncio.run(app()) == 3
    assert queue.info().purged == 3 and queue.depth == 0 and handled == []


def test_a_put_on_another_loop_after_the_engine_stopped_raises_engine_not_running() -> None:
    engine = Engine(health_interval=None)
    queue, _gate, _handled = _gated(engine, "q")
    engine.start_background().stop(timeout=5)

    async def app() -> None:
        with pytest.raises(EngineNotRunning):
            await queue.put(1)

    asyncio.run(app())


# ---------------------------------------------------------------- checked against what the store keeps


@pydantic_dataclass
class Customer:
    customer_id: int = Field(alias="customerId")


class Invoice(BaseModel):
    customer: Customer
    lines: list[int]


class Refund(BaseModel):
    # read by one name, stored (serialised) by another: the stored job would not read back
    refund_id: int = Field(validation_alias="rid", serialization_alias="refundId")


class Urgent(Invoice):
    reason: str


async def test_a_job_with_a_nested_aliased_dataclass_is_accepted_and_read_back_after_a_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'q.db'}"
    got: list[Any] = []
    held = asyncio.Event()

    async def bill(invoice: Invoice) -> None:
        got.append(invoice)
        held.set()
        await asyncio.Event().wait()  # still running when the first engine stops: kept for the next

    engine = _store_engine(db)
    queue = engine.queue("bill", bill)
    async with engine:
        await queue.put({"customer": {"customerId": 1}, "lines": [1, 2]})
        queue.put_nowait(Invoice(customer=Customer(customerId=2), lines=[3]))
        await asyncio.wait_for(held.wait(), TIMEOUT)
        await engine.stop(timeout=0.1)

    async def done(invoice: Invoice) -> None:
        got.append(invoice)

    engine = _store_engine(db)
    queue = engine.queue("bill", done)
    async with engine:
        await queue.join(timeout=TIMEOUT)
    first, second = Invoice(customer=Customer(customerId=1), lines=[1, 2]), Invoice(customer=Customer(customerId=2), lines=[3])
    assert got == [first, first, second]
    assert all(isinstance(job, Invoice) for job in got)


async def test_a_job_stored_by_a_name_its_model_does_not_read_or_of_a_subclass_is_refused_at_put(
    store: str | None,
) -> None:
    handled: list[Any] = []

    async def refund(job: Refund) -> None:
        handled.append(job)

    async def bill(job: Invoice) -> None:
        handled.append(job)

    engine = _store_engine(store)
    refunds = engine.queue("refunds", refund)
    invoices = engine.queue("invoices", bill)
    async with engine:
        with pytest.raises(InvalidJob) as aliased:
            await refunds.put({"rid": 5})
        with pytest.raises(InvalidJob):
            refunds.put_nowait(Refund(rid=5))  # type: ignore[call-arg]
        with pytest.raises(InvalidJob) as subclass:
            await invoices.put(Urgent(customer=Customer(customerId=1), lines=[], reason="late"))
        infos = [refunds.info(), invoices.info()]
    assert [e["loc"] for e in aliased.value.errors] == [("rid",)]
    assert "rid: the stored job holds it as 'refundId' (its serialization alias)" in str(aliased.value)
    assert "the handler would get the job as plain JSON, not a Refund" in str(aliased.value)
    assert "reads back as a Invoice, not the Urgent given" in str(subclass.value)
    assert "put a Invoice (or annotate the handler's job with Urgent)" in str(subclass.value)
    assert [(i.accepted, i.depth) for i in infos] == [(0, 0), (0, 0)]
    if store is not None:
        # nothing was stored: a restart hands the handlers nothing
        engine = _store_engine(store)
        refunds, invoices = engine.queue("refunds", refund), engine.queue("invoices", bill)
        async with engine:
            await refunds.join(timeout=TIMEOUT)
            await invoices.join(timeout=TIMEOUT)
            assert refunds.info().adopted == invoices.info().adopted == 0
    assert handled == []


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
    assert await handled_by_a_next_start(path, "late") == []


async def test_a_stop_keeps_the_jobs_of_a_queue_whose_late_start_failed_and_waits_to_be_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "runs.db"

    async def handle(job: int) -> None: ...

    engine = Engine(health_interval=None, store=f"sqlite:///{path}")
    async with engine:
        # another process changes the file under the engine: the queue's start cannot read its jobs
        other = sqlite3.connect(path, isolation_level=None)
        try:
            other.execute("ALTER TABLE queue_jobs RENAME TO queue_jobs_away")
            with caplog.at_level(logging.ERROR):
                queue = engine.queue("late", handle)
                await eventually(lambda: any("trying again" in r.getMessage() for r in caplog.records))
            for job in range(3):
                await queue.put(job)  # not waiting for the start tried again: kept here meanwhile
            # the file is whole again and the engine stops in one step of the loop: no try of
            # the start comes between (one that came before failed as well)
            other.execute("ALTER TABLE queue_jobs_away RENAME TO queue_jobs")
            await engine.stop()
        finally:
            other.close()
    # before: dropped unsaid (abandoned, and neither kept nor lost)
    assert (queue.info().kept, queue.info().lost) == (3, 0)
    assert await handled_by_a_next_start(path, "late") == [0, 1, 2]


async def test_a_start_tried_again_after_its_write_failed_runs_each_stored_job_once(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    first = Engine(store=f"sqlite:///{path}", node_id="n", health_interval=None)

    async def wait(job: dict[str, int]) -> None: ...

    earlier = first.queue("mail", wait)
    async with first:
        first.pause_queue("mail")
        for n in range(5):
            await earlier.put({"n": n})  # kept in the file by the stop, for the next start
    engine = Engine(store=f"sqlite:///{path}", node_id="n", health_interval=None)
    seen: list[int] = []

    async def handle(job: dict[str, int]) -> None:
        seen.append(job["n"])

    queue = engine.queue("mail", handle)
    queue.put_nowait({"n": 100})  # written by the start, after it took up the stored jobs
    other = sqlite3.connect(path, isolation_level=None)
    try:
        # another process refuses writes of jobs for a moment (a trigger, a migration)
        other.execute("CREATE TRIGGER no_insert BEFORE INSERT ON queue_jobs BEGIN SELECT RAISE(ABORT, 'not now'); END")
        with pytest.raises(StoreError):
            await engine.start()
        other.execute("DROP TRIGGER no_insert")
    finally:
        other.close()
    async with engine:  # started again, as the start's error says to
        await asyncio.wait_for(queue.join(), TIMEOUT)
    # before: the first start's take of the stored jobs was kept too, and each ran twice
    assert sorted(seen) == [0, 1, 2, 3, 4, 100]
    assert queue.info().adopted == 5


async def handled_by_a_next_start(path: Path, name: str, node_id: str | None = None) -> list[int]:
    """The jobs a new engine on the file ``path`` (as node ``node_id``) takes up into queue
    ``name`` and handles."""
    seen: list[Any] = []

    async def keep(job: Any) -> None:
        seen.append(job)

    again = Engine(health_interval=None, store=f"sqlite:///{path}", node_id=node_id)
    queue = again.queue(name, keep)
    async with again:
        await asyncio.wait_for(queue.join(), 5)
    assert queue.adopted == len(seen)
    return seen


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


class StrictStamp(BaseModel):
    model_config = ConfigDict(strict=True)
    at: dt.datetime
    xy: tuple[int, int]


async def test_a_strict_job_model_takes_its_jobs_in_process_and_read_back_from_the_store(tmp_path: Path) -> None:
    # JSON carries a datetime as text and a tuple as a list, which a strict model takes only as JSON
    url = f"sqlite:///{tmp_path / 'q.db'}"
    got: list[StrictStamp] = []
    job = StrictStamp(at=dt.datetime(2026, 1, 2, 3, 4, tzinfo=dt.timezone.utc), xy=(1, 2))

    async def handle(stamp: StrictStamp) -> None:
        got.append(stamp)

    first = Engine(store=url, health_interval=None)
    queue = first.queue("stamps", handle)
    async with first:
        await queue.put(job)
        await queue.join()
        queue.pause()
        await queue.put(job)  # kept in the store for the next start
    assert got == [job]
    again = Engine(store=url, health_interval=None)
    queue = again.queue("stamps", handle)
    async with again:
        await queue.join()
    assert got == [job, job]


async def test_a_job_dict_whose_keys_collide_in_json_is_refused_and_nothing_is_queued() -> None:
    engine = Engine(health_interval=None)
    got: list[Any] = []

    async def handle(job: Any) -> None:
        got.append(job)

    queue = engine.queue("q", handle)
    async with engine:
        with pytest.raises(JobNotSerializable, match="same JSON key"):
            await queue.put({1: "a", "1": "b"})
        await queue.put({"1": "b"})
        await queue.join()
    assert got == [{"1": "b"}]


# ---------------------------------------------------------------- a join on an engine that is not started


async def test_a_join_before_the_start_on_jobs_put_raises_engine_not_running_and_the_jobs_run_at_the_start() -> None:
    engine = Engine(health_interval=None)
    handled: list[int] = []

    async def handler(job: int) -> None:
        handled.append(job)

    queue = engine.queue("q", handler)
    await queue.put(1)  # accepted before the start, as documented
    queue.put_nowait(2)
    # bounded: before, the join waited for good, and nothing said the engine was not started
    with pytest.raises(EngineNotRunning) as raised:
        await asyncio.wait_for(queue.join(), 1.0)
    assert raised.value.state == "new"
    said = str(raised.value)
    assert "2 jobs" in said and "`async with engine:`" in said and "`await engine.start()`" in said
    assert queue.info().depth == 2 and handled == []  # kept for the start
    async with engine:
        await queue.join(timeout=TIMEOUT)
        assert handled == [1, 2]


async def test_a_join_with_nothing_put_before_the_start_returns() -> None:
    engine = Engine(health_interval=None)

    async def handler(job: int) -> None:
        return None

    queue = engine.queue("q", handler)
    await asyncio.wait_for(queue.join(), 1.0)
    await queue.join(timeout=0)


async def test_a_join_during_a_start_under_way_on_its_loop_waits_for_it_then_for_the_jobs() -> None:
    store = StartHeldAtRegister()
    engine = Engine(store=store, health_interval=None)
    handled: list[int] = []

    async def handler(job: int) -> None:
        handled.append(job)

    queue = engine.queue("q", handler)
    queue.put_nowait(1)
    starting = asyncio.create_task(engine.start())
    try:
        assert await asyncio.to_thread(store.reached.wait, TIMEOUT)
        assert engine.state == "new" and engine.starting is not None
        joining = asyncio.create_task(queue.join(timeout=TIMEOUT))
        done, _ = await asyncio.wait([joining], timeout=0.05)
        assert not done  # it waits for the start, not refused
        store.gate.set()
        await asyncio.wait_for(joining, TIMEOUT)
        assert handled == [1]
        await starting
    finally:
        store.gate.set()
        await engine.stop(timeout=5)


async def test_a_join_waiting_for_a_start_that_fails_raises_engine_not_running_and_the_jobs_are_kept() -> None:
    store = StartHeldAtRegister()
    store.fail = True
    engine = Engine(store=store, health_interval=None)
    handled: list[int] = []

    async def handler(job: int) -> None:
        handled.append(job)

    queue = engine.queue("q", handler)
    queue.put_nowait(1)
    starting = asyncio.create_task(engine.start())
    assert await asyncio.to_thread(store.reached.wait, TIMEOUT)
    joining = asyncio.create_task(queue.join(timeout=TIMEOUT))
    await asyncio.sleep(0)  # one step: the join now waits for the start
    assert not joining.done()
    store.gate.set()
    with pytest.raises(ConnectionError):
        await starting
    # before: the join waited out its whole timeout once the start had failed
    with pytest.raises(EngineNotRunning, match="kept for that start"):
        await asyncio.wait_for(joining, 1.0)
    store.fail = False
    async with engine:
        await queue.join(timeout=TIMEOUT)
        assert handled == [1]


async def test_a_join_and_a_drain_right_after_a_start_made_in_a_task_wait_for_that_start() -> None:
    # an app starts its engine in a task (`async with engine:` in its server's coroutine) and goes
    # on at once: the start had not taken its first step, and join() and drain() refused as if
    # no start were coming
    engine = Engine(health_interval=None)
    handled: list[str] = []

    async def handle(job: str) -> None:
        handled.append(job)

    queue = engine.queue("q", handle)

    async def fire(ctx: TaskContext, key: str) -> None:
        handled.append(key)

    trigger = engine.trigger("t", fire, size_threshold=1)
    stop = asyncio.Event()

    async def serve() -> None:
        async with engine:
            await stop.wait()

    server = asyncio.create_task(serve())
    queue.put_nowait("job-1")
    trigger.notify("key-1")
    async with asyncio.timeout(10):  # (not wait_for: its task would give the start its turn first)
        await queue.join()
        await trigger.drain()
    assert sorted(handled) == ["job-1", "key-1"]
    stop.set()
    await server
