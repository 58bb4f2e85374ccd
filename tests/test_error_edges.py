"""Errors where users meet them off the happy path: pickled across processes, copied, a
progress message too long to keep whole, a store reached while its engine is not running."""

from __future__ import annotations

import asyncio
import concurrent.futures
import copy
import multiprocessing
import pickle
from pathlib import Path
from typing import Any

import pytest
import taskwatch.engine as tw
from pydantic import BaseModel
from taskwatch.engine import (
    Engine,
    InvalidParams,
    RunProgressed,
    RunStatus,
    SqliteStore,
    StoreClosed,
    TaskContext,
    is_truncated,
)
from taskwatch.engine import errors as E

from .helpers import eventually

PYDANTIC_ERRORS: list[dict[str, Any]] = [{"loc": ("n",), "msg": "Input should be a valid integer", "type": "int_parsing"}]

#: representative arguments for every error class; a new class must be added here
ERROR_ARGS: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {
    "AuthenticationFailed": ((), {}),
    "ConnectionClosed": (("the connection closed",), {}),
    "CommandTimeout": (("no reply within 10 s",), {}),
    "DuplicateRunId": (("r1",), {}),
    "DuplicateTask": (("task", "t"), {}),
    "EngineAlreadyRunning": (("running",), {"holder": "a BackgroundEngine"}),
    "EngineCrashed": ((ValueError("boom"),), {}),
    "EngineInAnotherProcess": ((4242,), {}),
    "EngineLoopClosed": ((), {}),
    "EngineNotRunning": (("new",), {}),
    "EngineUnreachable": (("tcp://127.0.0.1:1", "connection refused", "Check the port"), {}),
    "IncompatibleVersion": ((3, 2), {}),
    "InvalidAddress": (("tcp://x:http", "no port"), {}),
    "InvalidConfiguration": (("the engine", ["max_concurrency=0 must be at least 1"]), {}),
    "InvalidCount": (("trigger 't'", 0), {}),
    "InvalidJob": (("q", "Job", PYDANTIC_ERRORS), {}),
    "InvalidKey": (("task 't'", 3, "a key must be a str"), {}),
    "InvalidParams": (("t", PYDANTIC_ERRORS), {}),
    "InvalidProgress": (("r1", ["done must be finite"]), {}),
    "InvalidQuery": ((["limit must be at least 1"],), {}),
    "InvalidStatus": (("done", ["pending", "running"]), {}),
    "InvalidSubmission": ((2, "is a str"), {}),
    "JobNotSerializable": (("q", "socket", "not JSON"), {}),
    "LeaseRefused": (("redis://h", "WRONGPASS"), {}),
    "LeaseUnavailable": (("redis://h", "refused", 1.5), {}),
    "LoopThreadError": (("wait",), {}),
    "MalformedMessage": (("not JSON",), {}),
    "MessageTooLarge": ((2_000_000, 1_000_000), {}),
    "MissingDependency": (("the Redis lease", "redis", "redis"), {}),
    "NotATaskwatchStore": (("'/tmp/x.db'", ["users", "orders"]), {"advice": "Use another file"}),
    "NotLeader": (("n1", "n2"), {"reason": "lease lost"}),
    "PeriodicNotRunnable": (("nightly",), {"run_id": "r1", "status": "running"}),
    "ProtocolError": (("bad",), {}),
    "QueueFull": (("queue 'q'", 10, 19), {}),
    "RelayRefused": (("redis://h", "AuthenticationError: WRONGPASS"), {}),
    "RemoteError": (("Custom", "it broke", {"why": 1}), {}),
    "ReplyTooLarge": (("the snapshot", 2_000_000, 1_000_000), {}),
    "RunNotCancellable": (("r1", "succeeded"), {}),
    "RunNotFound": (("r1",), {}),
    "RunNotRetryable": (("r1", "running"), {}),
    "SchemaInUse": (("'/tmp/x.db'", 7, 8, ["web-1", "web-2"], 30.0), {}),
    "SchemaTooNew": (("'/tmp/x.db'", 9, 3), {}),
    "StoppedBeforeDone": (("run r1", True), {"elsewhere": "n2"}),
    "StoreBusy": (("'/tmp/x.db'", 5000), {}),
    "StoreClosed": (("'/tmp/x.db'",), {}),
    "StoreDriverMissing": (("PostgreSQL", "asyncpg", "postgres"), {}),
    "StoreError": (("failed",), {}),
    "StoreGaveUp": (("'/tmp/x.db'", "timed out"), {}),
    "StoreUnavailable": (("'/tmp/x.db'", "disk full"), {}),
    "TaskDefinitionError": (("not a coroutine function",), {}),
    "TaskwatchError": (("something",), {}),
    "TooManyConnections": ((64,), {}),
    "TooManyHandshakes": ((16,), {}),
    "UnknownCommand": (("no such type",), {}),
    "UnknownEventKind": (("run.done", "no event kind 'run.done'"), {}),
    "UnknownPeriodic": (("p", {"a": 1}.keys()), {}),
    "UnknownQueue": (("q", ["a"]), {}),
    "UnknownStore": (("postgresql://u:secret@h/db", "bad option"), {}),
    "UnknownTask": (("t", {"a": 1}.keys()), {"kind": "periodic"}),
    "UnknownTrigger": (("t", ["a"]), {}),
    "UnknownWorker": (("w", ["a"]), {}),
    "WeakToken": ((8, 16), {}),
    "WorkerNotLeading": (("w", "n1", None), {}),
}


def _error_classes() -> dict[str, type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for module in (tw, E):
        for name in dir(module):
            value = getattr(module, name)
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__.startswith("taskwatch"):
                found[value.__name__] = value
    return found


def test_every_error_class_has_representative_arguments_here() -> None:
    assert sorted(_error_classes()) == sorted(ERROR_ARGS)


@pytest.mark.parametrize("name", sorted(ERROR_ARGS))
def test_every_error_pickles_and_copies_as_itself(name: str) -> None:
    # a ProcessPoolExecutor worker's raise, multiprocessing and copy.copy all go through pickling
    args, kwargs = ERROR_ARGS[name]
    error = _error_classes()[name](*args, **kwargs)
    if name == "ConnectionClosed":
        error.sent = True  # type: ignore[attr-defined]
    for again in (
        pickle.loads(pickle.dumps(error)),
        pickle.loads(pickle.dumps(error, protocol=0)),
        copy.copy(error),
        copy.deepcopy(error),
    ):
        assert type(again) is type(error)
        assert str(again) == str(error)
        assert again.args == error.args
        assert vars(again) == vars(error)


def test_a_pickled_error_keeps_what_callers_read() -> None:
    again = pickle.loads(pickle.dumps(InvalidParams("t", PYDANTIC_ERRORS)))
    assert again.task == "t" and again.errors == PYDANTIC_ERRORS
    assert isinstance(again, ValueError)
    unknown = pickle.loads(pickle.dumps(E.UnknownStore("postgresql://u:secret@h/db")))
    assert "secret" not in str(unknown) and "secret" not in repr(unknown.spec)


class Params(BaseModel):
    n: int


def _submit_in_a_worker(params: dict[str, Any]) -> Any:
    async def go() -> Any:
        engine = Engine(health_interval=None)

        @engine.task
        async def double(ctx: TaskContext, params: Params) -> int:
            return params.n * 2

        async with engine:
            return (await (await engine.submit("double", params)).wait(timeout=10)).result

    return asyncio.run(go())


def test_a_process_pool_worker_raising_a_taskwatch_error_leaves_the_pool_usable() -> None:
    # spawn, as on macOS and Windows: the worker imports everything anew
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        with pytest.raises(InvalidParams) as raised:
            pool.submit(_submit_in_a_worker, {"n": "many"}).result(timeout=60)
        assert raised.value.task == "double"
        assert [err["loc"] for err in raised.value.errors] == [("n",)]
        assert pool.submit(_submit_in_a_worker, {"n": 2}).result(timeout=60) == 4


async def test_a_huge_progress_message_is_kept_cut_to_8_kib_that_says_so(tmp_path: Path) -> None:
    # every event, record, snapshot and store row carries the message, as they carry an error's
    path = tmp_path / "runs.db"
    engine = Engine(health_interval=None, store=f"sqlite:///{path}")
    seen: list[RunProgressed] = []
    engine.bus.add_callback(seen.append, ["run.progress"])
    message = "start " + "x" * 100_000 + " end"

    @engine.task
    async def chatty(ctx: TaskContext) -> None:
        await ctx.progress(1, 2, message)

    async with engine:
        record = await (await engine.submit("chatty")).wait(timeout=10)
    assert record.status is RunStatus.SUCCEEDED
    for kept in (record.progress.message, seen[-1].message):
        assert kept.startswith("start xxx") and kept.endswith("xxx end")
        assert is_truncated(kept)
        assert len(kept) < 8_192 + 100
    async with SqliteStore(path) as store:
        stored = await store.get(record.id)
    assert stored is not None
    assert stored.to_record().progress.message == record.progress.message


async def test_a_short_progress_message_is_kept_whole() -> None:
    engine = Engine(health_interval=None)
    message = "y" * 8_000

    @engine.task
    async def chatty(ctx: TaskContext) -> None:
        await ctx.progress(1, 2, message)

    async with engine:
        record = await (await engine.submit("chatty")).wait(timeout=10)
    assert record.progress.message == message


ENGINE_REMEDY = "`await engine.start()`"


async def test_an_engine_not_started_says_to_start_it_when_its_store_is_closed(tmp_path: Path) -> None:
    engine = Engine(health_interval=None, store=f"sqlite:///{tmp_path / 'runs.db'}")

    @engine.task
    async def one(ctx: TaskContext) -> int:
        return 1

    for call in (lambda: engine.cancel("abc"), lambda: engine.retry("abc"), lambda: engine.fetch_run("abc")):
        with pytest.raises(StoreClosed) as raised:
            await call()
        assert ENGINE_REMEDY in str(raised.value)


async def test_a_stopped_engine_says_to_start_it_again_when_its_store_is_closed(tmp_path: Path) -> None:
    engine = Engine(health_interval=None, store=f"sqlite:///{tmp_path / 'runs.db'}", max_concurrency=1)
    gate = asyncio.Event()

    @engine.task
    async def held(ctx: TaskContext) -> int:
        await gate.wait()
        return 1

    await engine.start()
    await engine.submit("held")
    kept = await engine.submit("held")
    await engine.stop(timeout=0.1)
    for call in (lambda: engine.cancel(kept.id), lambda: engine.fetch_run(kept.id), lambda: engine.query_runs()):
        with pytest.raises(StoreClosed) as raised:
            await call()
        assert ENGINE_REMEDY in str(raised.value)
    async with engine:  # as the message says: started again, the kept run is there
        assert (await engine.fetch_run(kept.id)).status is RunStatus.PENDING
        await engine.cancel(kept.id)
        gate.set()


async def test_a_store_used_on_its_own_says_to_open_it(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "runs.db")
    with pytest.raises(StoreClosed) as raised:
        await store.get("abc")
    assert "`await store.open()`" in str(raised.value)


async def test_a_submit_to_a_stopping_engine_is_not_told_to_start_it() -> None:
    engine = Engine(health_interval=None)
    gate = asyncio.Event()
    entered = asyncio.Event()

    @engine.task
    async def held(ctx: TaskContext) -> int:
        entered.set()
        await gate.wait()
        return 1

    await engine.start()
    await engine.submit("held")
    await entered.wait()
    stopping = asyncio.create_task(engine.stop(timeout=10))
    await eventually(lambda: engine.state == "stopping")
    with pytest.raises(E.EngineNotRunning) as raised:
        await engine.submit("held")
    gate.set()
    await stopping
    assert raised.value.state == "stopping"
    assert "is stopping and accepts no new work" in str(raised.value)
    assert ENGINE_REMEDY not in str(raised.value)
