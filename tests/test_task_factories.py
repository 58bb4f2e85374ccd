"""The engine on loops with a task factory: a user's own (as Sentry's and OpenTelemetry's are,
giving each task a scope of its own), and an eager one (``asyncio.eager_task_factory``, Python
3.12 and later), as every loop under a Textual app's ``run``/``run_async`` is: an engine started
in a Textual app's ``on_mount`` (the README's widgets example) runs on one.

The factory makes the engine's tasks, and its runs and loops start as on any other loop: a run
never starts inside ``submit()``, so a trigger and a periodic task hear of each run they fire,
and a run submitted can be cancelled before its first step.
"""

from __future__ import annotations

import asyncio
import contextvars
import sys
import time
from collections.abc import Coroutine
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import Engine, RunStatus, TaskContext

from .helpers import eventually

needs_eager = pytest.mark.skipif(sys.version_info < (3, 12), reason="eager task factories came with Python 3.12")

#: what a tracing library's factory gives each task: a scope of its own, for tags set in it
scope: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("scope")


def scoping_factory(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], context: contextvars.Context | None = None
) -> asyncio.Task[Any]:
    context = (context or contextvars.copy_context()).copy()
    context.run(scope.set, {})
    return asyncio.Task(coro, loop=loop, context=context)


class Customer(BaseModel):
    customer: str


async def test_a_users_task_factory_makes_the_engines_tasks_and_gives_each_run_its_scope() -> None:
    asyncio.get_running_loop().set_task_factory(scoping_factory)  # type: ignore[arg-type]
    scope.set({})  # the program's own
    engine = Engine(health_interval=None)
    seen: dict[str, dict[str, str]] = {}

    @engine.task
    async def tagged(ctx: TaskContext, params: Customer) -> None:
        seen[params.customer] = dict(scope.get())  # what the run found in its scope
        scope.get()["customer"] = params.customer

    async with engine:
        for customer in ("a", "b"):
            await (await engine.submit("tagged", {"customer": customer})).wait(10)
    # each run had a scope of its own: the first's tag reached neither the second nor the program
    assert seen == {"a": {}, "b": {}}
    assert scope.get() == {}


def eager() -> None:
    asyncio.get_running_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]


@needs_eager
async def test_a_trigger_hears_of_each_run_it_fires_and_fires_the_key_again() -> None:
    eager()
    engine = Engine(health_interval=None)
    ran: list[str] = []

    async def on_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)  # done at its first step

    async with engine:
        trigger = engine.trigger("t", on_key, size_threshold=1)
        trigger.notify("k")
        await trigger.drain(timeout=5)
        trigger.notify("k")  # fired again only once the trigger knows the first run ended
        await trigger.drain(timeout=5)
    assert ran == ["k", "k"]


@needs_eager
async def test_a_periodic_task_that_ends_at_its_first_step_runs_at_every_slot() -> None:
    eager()
    engine = Engine(health_interval=None)
    calls = 0

    @engine.periodic(every=0.02)
    async def tick(ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1

    async with engine:
        await eventually(lambda: calls >= 5, timeout=10)
        (info,) = engine.schedule()
        assert info.skipped == 0


@needs_eager
async def test_a_run_starts_after_submit_returns_and_can_be_cancelled_before_its_first_step() -> None:
    eager()
    engine = Engine(health_interval=None)
    started: list[float] = []

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        started.append(time.monotonic())

    async with engine:
        handle = await engine.submit("quick")
        assert started == []  # not started inside submit(): cancelled before its first step below
        record = await engine.cancel(handle.id)
        assert record.status is RunStatus.CANCELLED
        assert started == []
