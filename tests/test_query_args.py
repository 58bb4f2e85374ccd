"""The sync reads (``runs``, ``snapshot``, ``rates``, ``triggers``) refuse nonsense as ``query_runs`` does.

A limit of -1 used to list nothing, 1.5 two runs and ``True`` one, ``"3"`` or a
status of 5 raised a bare ``TypeError``, ``task=5`` silently matched nothing and
``rates(nan)`` a bare ``ValueError``: each is now an :class:`InvalidQuery` (or
:class:`InvalidStatus`) naming the argument and what it takes, alike in-process,
through a background engine and through a remote client.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from taskwatch.engine import (
    BackgroundEngine,
    ControlServer,
    Engine,
    InvalidQuery,
    InvalidStatus,
    RemoteEngine,
    RunStatus,
    TaskContext,
    TaskwatchError,
)

from .raw_client import serve

RUNS = 3


def build_engine() -> Engine:
    engine = Engine(health_interval=None)

    @engine.task
    async def noop(ctx: TaskContext) -> int:
        return 1

    async def count(ctx: TaskContext, key: str, n: int = 1) -> None:
        pass

    engine.trigger("counted", count, size_threshold=1000)
    return engine


async def with_runs(engine: Engine) -> None:
    for _ in range(RUNS):
        await (await engine.submit("noop")).wait(5)
    trigger = engine.get_trigger("counted")
    for key in ("a", "b", "c"):
        trigger.notify(key)


BAD_LIMITS = [-1, 1.5, "3", True, 10**30]


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = build_engine()
    async with engine:
        await with_runs(engine)
        yield engine


@pytest.mark.parametrize("limit", BAD_LIMITS, ids=repr)
async def test_runs_refuses_a_limit_that_is_no_count(engine: Engine, limit: Any) -> None:
    with pytest.raises(InvalidQuery, match=re.escape(f"invalid runs query: limit={limit!r}: pass how many runs to list")):
        engine.runs(limit=limit)
    # the good ones still read: 0 lists none, None every one
    assert engine.runs(limit=0) == [] and len(engine.runs(limit=None)) == len(engine.runs(limit=2)) + 1 == RUNS


async def test_runs_refuses_a_task_that_is_no_name(engine: Engine) -> None:
    # it silently matched nothing, as if no run of it had ever been submitted
    with pytest.raises(InvalidQuery, match=re.escape("task=5 is no task name")):
        engine.runs(task=5)  # type: ignore[arg-type]
    assert len(engine.runs(task="noop")) == RUNS


@pytest.mark.parametrize("status", [5, 5.0, object()], ids=["int", "float", "object"])
async def test_runs_refuses_a_status_that_is_no_status_as_an_invalid_status(engine: Engine, status: Any) -> None:
    # a TypeError about iterating an int, not the error a status of "done" gets
    with pytest.raises(InvalidStatus, match="is not a run status; use one of pending, running"):
        engine.runs(status=status)
    assert len(engine.runs(status=RunStatus.SUCCEEDED)) == len(engine.runs(status=["succeeded", "failed"])) == RUNS


@pytest.mark.parametrize("runs_limit", BAD_LIMITS, ids=repr)
async def test_snapshot_refuses_a_runs_limit_that_is_no_count(engine: Engine, runs_limit: Any) -> None:
    with pytest.raises(InvalidQuery, match=re.escape(f"invalid snapshot query: runs_limit={runs_limit!r}: pass how many of the newest runs")):
        engine.snapshot(runs_limit=runs_limit)
    assert engine.snapshot(runs_limit=0).runs == [] and len(engine.snapshot(runs_limit=2).runs) == 2


@pytest.mark.parametrize("seconds", [math.nan, math.inf, "x", True, 0, -1, 0.5], ids=repr)
async def test_rates_refuses_seconds_that_are_no_span(engine: Engine, seconds: Any) -> None:
    # 0, -1 and 0.5 were silently read as 1 s; NaN and "x" raised a bare ValueError
    with pytest.raises(InvalidQuery, match=re.escape(f"invalid rates query: seconds={seconds!r}: pass how many seconds back to count")):
        engine.rates(seconds)
    done, failed = engine.rates(60)  # a good span still counts
    assert done >= 0 and failed == 0.0


@pytest.mark.parametrize("keys_limit", BAD_LIMITS, ids=repr)
async def test_triggers_refuses_a_keys_limit_that_is_no_count(engine: Engine, keys_limit: Any) -> None:
    with pytest.raises(InvalidQuery, match=re.escape(f"invalid triggers query: keys_limit={keys_limit!r}: pass how many keys")):
        engine.triggers(keys_limit=keys_limit)
    [state] = engine.triggers(keys_limit=2)
    assert len(state.keys) == 2 and state.key_count == 3


def same_refusal(calls: dict[str, Callable[[], Any]]) -> None:
    """Every call raises an error of the same class with the same message."""
    caught: dict[str, TaskwatchError] = {}
    for via, call in calls.items():
        with pytest.raises(TaskwatchError) as error:
            call()
        caught[via] = error.value
    kinds = {via: (type(e).__name__, str(e)) for via, e in caught.items()}
    assert len(set(kinds.values())) == 1, kinds
    assert isinstance(next(iter(caught.values())), (InvalidQuery, InvalidStatus))


@pytest.fixture
def background() -> Iterator[BackgroundEngine]:
    engine = build_engine()
    bg = engine.start_background()
    try:
        bg.call(with_runs)
        yield bg
    finally:
        bg.stop()


FACADE_CASES: list[tuple[str, dict[str, Any]]] = [
    ("runs", {"limit": -1}),
    ("runs", {"limit": "3"}),
    ("runs", {"task": 5}),
    ("runs", {"status": 5}),
    ("snapshot", {"runs_limit": -1}),
    ("snapshot", {"runs_limit": 1.5}),
    ("rates", {"seconds": 0}),
    ("triggers", {"keys_limit": -1}),
]


@pytest.mark.parametrize(("method", "args"), FACADE_CASES, ids=[f"{m}({a})" for m, a in FACADE_CASES])
def test_a_background_engine_refuses_as_the_engine_does(
    background: BackgroundEngine, method: str, args: dict[str, Any]
) -> None:
    awaitable = getattr(background, "a" + method)
    same_refusal(
        {
            "Engine": lambda: background.call(lambda engine: getattr(engine, method)(**args)),
            "BackgroundEngine": lambda: getattr(background, method)(**args),
            "BackgroundEngine (awaitable)": lambda: asyncio.run(awaitable(**args)),
        }
    )
    assert len(background.runs()) == RUNS  # and reads on


def test_a_background_engine_reads_what_the_engine_reads(background: BackgroundEngine) -> None:
    [state] = background.triggers(keys_limit=2)
    assert len(state.keys) == 2 and state.key_count == 3
    assert asyncio.run(background.atriggers(keys_limit=0))[0].keys == []
    # whole seconds only: the runs of this second may not count yet, so only the shape is known
    for done, failed in (background.rates(60), asyncio.run(background.arates(60))):
        assert done >= 0.0 and failed == 0.0
    assert [t.name for t in asyncio.run(background.acatalog())] == [t.name for t in background.catalog()]
    assert asyncio.run(background.aqueues()) == background.queues()
    assert asyncio.run(background.aworkers()) == background.workers()


@pytest.fixture
async def served(sock_path: str) -> AsyncIterator[tuple[Engine, RemoteEngine, ControlServer]]:
    engine = build_engine()
    async with engine:
        await with_runs(engine)
        server = await serve(engine, sock_path)
        async with RemoteEngine(sock_path) as remote:
            yield engine, remote, server


@pytest.mark.parametrize("runs_limit", BAD_LIMITS, ids=repr)
async def test_a_remote_snapshot_refuses_as_the_engine_does_and_sends_nothing(
    served: tuple[Engine, RemoteEngine, ControlServer], runs_limit: Any
) -> None:
    engine, remote, server = served
    with pytest.raises(InvalidQuery) as local:
        engine.snapshot(runs_limit)
    await remote.ping()
    before = server.stats()["commands"]
    with pytest.raises(InvalidQuery) as far:
        await remote.snapshot(runs_limit)
    assert str(far.value) == str(local.value)
    await remote.ping()  # answered after every line sent before it
    assert server.stats()["commands"] == before + 1  # the ping alone: the bad call sent nothing
    assert len((await remote.snapshot(runs_limit=2)).runs) == 2
