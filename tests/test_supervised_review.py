"""Supervised workers are checked as tasks are: one that cannot be called as ``fn(ctx)`` is
refused at registration, and the engine's flags and resources are named as set_flag/provide
name them."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from taskwatch.engine import Engine, InvalidConfiguration, TaskContext, TaskDefinitionError

from .helpers import stray_tasks


def engine_with(**options: object) -> Engine:
    return Engine(health_interval=None, **options)  # type: ignore[arg-type]


async def takes_nothing() -> None: ...


async def needs_a_db(ctx: TaskContext, db: object) -> None: ...


async def needs_a_db_by_keyword(ctx: TaskContext, *, db: object) -> None: ...


async def keywords_only(**kwargs: object) -> None: ...


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (takes_nothing, "too many positional arguments"),
        (needs_a_db, "missing a required argument: 'db'"),
        (needs_a_db_by_keyword, "missing a required argument: 'db'"),
        (keywords_only, "too many positional arguments"),
    ],
)
async def test_a_worker_that_cannot_be_called_with_the_context_alone_is_refused(
    fn: Callable[..., Awaitable[None]], why: str
) -> None:
    engine = engine_with()

    with pytest.raises(TaskDefinitionError) as refused:
        engine.supervised(fn, name="sync_orders")  # type: ignore[arg-type]

    message = str(refused.value)
    assert "supervised worker 'sync_orders'" in message
    assert f"cannot be called as {fn.__name__}(ctx) ({why})" in message
    assert f"`async def {fn.__name__}(ctx: TaskContext)`" in message
    # refused before anything is recorded: no worker to crash on every start, the name is free
    assert engine.workers() == []
    assert engine.stats().supervised == {}

    async def sync_orders(ctx: TaskContext, db: object = None) -> None: ...

    engine.supervised(sync_orders)  # a further parameter with a default is fine
    assert [w.name for w in engine.workers()] == ["sync_orders"]


def test_a_plain_function_is_refused_with_what_to_do_about_blocking_code() -> None:
    engine = engine_with()

    def poll(ctx: TaskContext) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"supervised worker 'poll' must be an `async def` function taking \(ctx\).*asyncio\.to_thread"):
        engine.supervised(poll)  # type: ignore[arg-type]
    assert engine.workers() == []


class Poller:
    """A worker kept as an object, as a task can be."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.names: list[str] = []

    async def __call__(self, ctx: TaskContext) -> None:
        self.names.append(ctx.name)
        self.started.set()
        await asyncio.Event().wait()


async def test_an_object_with_an_async_call_runs_as_a_worker_as_it_runs_as_a_task() -> None:
    engine = engine_with()
    poller = Poller()

    assert engine.supervised(poller, name="poller") is poller
    engine.task(Poller(), name="poll_once")  # accepted as a task already: the same for both
    async with engine:
        await asyncio.wait_for(poller.started.wait(), timeout=2.0)
        info = engine.workers()[0]
        assert (info.name, info.state, info.crashes) == ("poller", "running", 0)
    assert poller.names == ["poller"]
    assert not stray_tasks()


def test_an_object_whose_call_cannot_take_the_context_alone_is_refused() -> None:
    engine = engine_with()

    class NeedsDb:
        async def __call__(self, ctx: TaskContext, db: object) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"supervised worker 'needs_db' cannot be called .*'db'"):
        engine.supervised(NeedsDb(), name="needs_db")  # type: ignore[arg-type]
    assert engine.workers() == []


@pytest.mark.parametrize("fn", [Poller(), functools.partial(needs_a_db, db=None)], ids=["object", "partial"])
def test_a_worker_without_a_name_of_its_own_needs_name(fn: Any) -> None:
    # as a task does: a repr (memory address and all) would name it differently in every process
    engine = engine_with()

    with pytest.raises(TaskDefinitionError, match="has no __name__.*give the worker a name="):
        engine.supervised(fn)
    assert engine.workers() == []
    engine.supervised(fn, name="named")
    assert [w.name for w in engine.workers()] == ["named"]


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"flags": {"": True}}, "flag name='': a name must not be empty"),
        ({"flags": {"kg\x00": True}}, "flag name='kg\\x00': it holds the control character"),
        ({"resources": {3: object()}}, "resource name=3: a name must be a str, not int"),
        ({"resources": {"": object()}}, "resource name='': a name must not be empty"),
        ({"resources": {"db\n": object()}}, "resource name='db\\n': it holds the control character"),
    ],
)
def test_the_engine_refuses_flag_and_resource_names_set_flag_and_provide_refuse(
    options: dict[str, dict[Any, Any]], shown: str
) -> None:
    with pytest.raises(InvalidConfiguration) as refused:
        engine_with(**options)
    assert refused.value.where == "Engine()"
    assert shown in str(refused.value)

    # the same name is refused afterwards too, for the same reason
    engine = engine_with()
    [(name, value)] = next(iter(options.values())).items()
    with pytest.raises(InvalidConfiguration, match="a name must|control character"):
        if "flags" in options:
            engine.set_flag(name, value)
        else:
            engine.provide(name, value)
    assert (engine.flags, engine.resources) == ({}, {})


def test_resources_that_are_no_dict_are_refused() -> None:
    with pytest.raises(InvalidConfiguration, match=r"Engine\(\): resources=\['db'\]: a dict of resource name"):
        engine_with(resources=["db"])

