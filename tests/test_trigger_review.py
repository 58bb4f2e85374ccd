"""Threshold triggers after review: drains that wait for keys a full run queue refused, state()
from another thread, sweeps that let the loop breathe, options refused at registration, and
the checks of drain()'s and join()'s timeouts, state()'s keys_limit and fire()'s thread."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    InvalidConfiguration,
    InvalidQuery,
    LoopThreadError,
    QueueFull,
    StoppedBeforeDone,
    TaskContext,
    TaskDefinitionError,
)

from .helpers import Recorder, eventually, wait_until
from .test_triggers import Clock, make_engine

TIMEOUT = 10.0


async def nothing(ctx: TaskContext, key: str) -> None:
    return None


# ------------------------------------------------------------ drain and a full run queue


async def test_drain_waits_for_the_keys_a_full_run_queue_refused() -> None:
    engine = make_engine(max_concurrency=1, max_queue=2)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await asyncio.sleep(0.005)  # the work: later keys find the queue full
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    keys = [f"k{i}" for i in range(10)]
    async with engine:
        for key in keys:
            compile.notify(key)
        assert compile.state().rejected > 0  # the queue did refuse some
        await compile.drain(timeout=TIMEOUT)
        # every key due when the drain began has run, none is left due and idle
        assert sorted(ran) == sorted(keys)
        assert all(k.count == 0 and not k.queued and not k.running for k in compile.state().keys)


async def test_a_drain_on_refused_keys_alone_waits_for_the_queue_to_take_them() -> None:
    # the queue is full of another task's runs: the trigger has nothing queued or running,
    # only a key the queue refused
    engine = make_engine(max_concurrency=1, max_queue=1)
    gate = asyncio.Event()

    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    engine.register(hold, name="hold")
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    async with engine:
        engine.submit_nowait("hold")
        await eventually(lambda: engine.stats().running == 1)
        engine.submit_nowait("hold")
        with pytest.raises(QueueFull):
            engine.submit_nowait("hold")
        compile.notify("bank-42")
        assert compile.state().rejected == 1
        draining = asyncio.ensure_future(compile.drain(timeout=TIMEOUT))
        done, _ = await asyncio.wait([draining], timeout=0.2)
        assert not done  # the key is still due: the drain waits for it
        gate.set()
        await draining
        assert ran == ["bank-42"]


async def test_a_drain_on_refused_keys_hears_when_the_engine_stops() -> None:
    engine = make_engine(max_concurrency=1, max_queue=1)
    gate = asyncio.Event()

    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    engine.register(hold, name="hold")
    compile = engine.trigger("compile", nothing, size_threshold=1)
    await engine.start()
    try:
        engine.submit_nowait("hold")
        await eventually(lambda: engine.stats().running == 1)
        engine.submit_nowait("hold")
        compile.notify("bank-42")
        draining = asyncio.ensure_future(compile.drain(timeout=TIMEOUT))
        done, _ = await asyncio.wait([draining], timeout=0.05)
        assert not done
    finally:
        await engine.stop(timeout=0.1)
    with pytest.raises(StoppedBeforeDone, match="refused") as stopped:
        await draining
    assert "the 1 key of trigger 'compile' that a full run queue refused" in str(stopped.value)
    assert stopped.value.kept  # the key keeps its count: the next start fires it
    assert compile.state().keys[0].count == 1


# ------------------------------------------------------------ state() from another thread


def test_state_from_another_thread_while_the_loop_counts_notifies() -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=10**9)
    bg = engine.start_background()
    notifies = 100_000

    def produce() -> None:
        for i in range(notifies):
            compile.notify(f"user-{i}")  # new keys: the loop grows the dict of keys

    producer = threading.Thread(target=produce)
    producer.start()
    try:
        wait_until(lambda: compile.key_count >= 10_000)
        reads = 0
        # (each read walks ten thousand keys or more while the loop goes on adding more)
        while (producer.is_alive() and reads < 2000) or reads < 3:
            hottest = compile.state(keys_limit=10)
            assert len(hottest.keys) == min(10, hottest.key_count)
            reads += 1
        producer.join()
        wait_until(lambda: compile.key_count == notifies)
        assert compile.state(keys_limit=5).key_count == notifies
    finally:
        producer.join()
        bg.stop(timeout=5)


# ------------------------------------------------------------ a sweep over many keys


async def test_a_sweep_of_many_keys_lets_other_work_of_the_loop_run() -> None:
    clock = Clock()
    engine = make_engine()
    keys = 10_000
    compile = engine.trigger("compile", nothing, size_threshold=10**9, forget_after=10, clock=clock, check_interval=0.01)
    seen: list[int] = []
    async with engine:
        for i in range(keys):
            compile.notify(f"doc-{i}")
        clock.now += 11  # every key untouched past forget_after: the next sweep forgets them all
        while compile.key_count:
            seen.append(compile.key_count)
            await asyncio.sleep(0)
    # this loop ran while the sweep was half through (one sweep in one step would jump from
    # every key to none)
    assert any(0 < n < keys for n in seen)
    assert compile.state().forgotten == keys


async def test_the_start_sweep_over_many_due_keys_lets_other_work_run_and_fires_them_all() -> None:
    engine = make_engine()
    keys = 10_000
    compile = engine.trigger("compile", nothing, size_threshold=1)
    for i in range(keys):
        compile.notify(f"doc-{i}")  # due before the start: the start's sweep fires them
    loop_ran_at: list[int] = []
    fired = 0

    def on_fired(event: Any) -> None:
        nonlocal fired
        fired += 1
        if fired == 1:
            asyncio.get_running_loop().call_soon(lambda: loop_ran_at.append(fired))

    engine.bus.add_callback(on_fired, ("trigger.fired",))
    async with engine:
        await compile.drain(timeout=60)
        assert compile.state().fired == keys
    # the callback ran while the sweep still had keys to fire
    assert loop_ran_at and loop_ran_at[0] < keys


# ------------------------------------------------------------ options refused at registration


def test_a_clock_that_is_not_callable_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration, match=r"clock=5: pass a callable"):
        engine.trigger("compile", nothing, size_threshold=5, clock=5)
    assert engine.triggers() == []
    engine.trigger("compile", nothing, size_threshold=5, clock=Clock())  # the name is free


def test_staleness_min_without_staleness_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration, match=r"staleness_min=3:.*no staleness="):
        engine.trigger("compile", nothing, size_threshold=5, staleness_min=3)
    assert engine.triggers() == []
    engine.trigger("compile", nothing, size_threshold=5, staleness=60, staleness_min=3)


async def needs_more(ctx: TaskContext, key: str, other: int) -> None:
    return None


async def needs_a_keyword(ctx: TaskContext, key: str, *, flag: bool) -> None:
    return None


async def takes_more(ctx: TaskContext, key: str, other: int = 0, *, flag: bool = False) -> None:
    return None


@pytest.mark.parametrize(("fn", "name"), [(needs_more, "other"), (needs_a_keyword, "flag")])
def test_a_handler_with_a_parameter_a_run_cannot_fill_is_refused(fn: Any, name: str) -> None:
    engine = make_engine()
    with pytest.raises(TaskDefinitionError, match=rf"parameter {name} would never get a value"):
        engine.trigger("compile", fn, size_threshold=1)
    assert engine.triggers() == []


async def test_a_handler_whose_other_parameters_have_defaults_runs() -> None:
    engine = make_engine()
    compile = engine.trigger("compile", takes_more, size_threshold=1)
    async with engine:
        compile.notify("k")
        await compile.drain(timeout=TIMEOUT)
        assert compile.state().keys[0].last_status == "succeeded"


class Compiler:
    """A handler object, called as a task's may be: its ``__call__`` is the async function."""

    def __init__(self) -> None:
        self.keys: list[str] = []

    async def __call__(self, ctx: TaskContext, key: str) -> None:
        self.keys.append(key)


async def test_a_handler_object_with_an_async_call_runs_as_a_task_would() -> None:
    engine = make_engine()
    handler = Compiler()
    compile = engine.trigger("compile", handler, size_threshold=1)

    async def no_key(ctx: TaskContext) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"cannot be called as no_key\(ctx, key\)"):
        engine.trigger("other", no_key, size_threshold=1)
    async with engine:
        compile.notify("k")
        await compile.drain(timeout=TIMEOUT)
    assert handler.keys == ["k"]


# ------------------------------------------------------------ arguments of state(), drain(), join()


@pytest.mark.parametrize("limit", [-1, 1.5, True, "3"])
def test_state_refuses_a_keys_limit_that_is_no_count(limit: Any) -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=5)
    compile.notify("a")
    with pytest.raises(InvalidQuery, match="keys_limit"):
        compile.state(keys_limit=limit)
    assert compile.state(keys_limit=0).keys == []
    assert compile.state(keys_limit=0).key_count == 1


BAD_TIMEOUTS = [math.nan, True, "x", -1]


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
async def test_drain_refuses_a_timeout_that_is_no_seconds(timeout: Any) -> None:
    engine = make_engine()
    gate = asyncio.Event()

    async def held(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", held, size_threshold=1)
    async with engine:
        compile.notify("k")
        with pytest.raises(InvalidConfiguration, match=r"Trigger.drain\(\): timeout="):
            await compile.drain(timeout=timeout)
        gate.set()
        await compile.drain(timeout=math.inf)  # no limit, as a wait's


@pytest.mark.parametrize("timeout", BAD_TIMEOUTS)
async def test_join_refuses_a_timeout_that_is_no_seconds(timeout: Any) -> None:
    engine = make_engine()
    gate = asyncio.Event()

    async def handle(job: dict[str, str]) -> None:
        await gate.wait()

    ingest = engine.queue("ingest", handle)
    async with engine:
        await ingest.put({"doc": "d"})
        with pytest.raises(InvalidConfiguration, match=r"queue 'ingest' join\(\): timeout="):
            await ingest.join(timeout=timeout)
        gate.set()
        await ingest.join(timeout=math.inf)


# ------------------------------------------------------------ fire() and its events


def test_fire_from_another_thread_names_itself_and_what_to_call() -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=5)
    bg = engine.start_background()
    try:
        with pytest.raises(LoopThreadError, match=r"Trigger.fire\(\).*bg.fire_trigger\('compile', key\)") as refused:
            compile.fire("a")
        assert refused.value.method == "fire"
        assert engine.runs(task="trigger:compile") == []  # nothing was queued
        fired = bg.fire_trigger("compile", "a")  # what the message says to call
        assert fired.fired
    finally:
        bg.stop(timeout=5)


async def test_trigger_fired_names_the_run_it_queued_and_a_refused_fire_publishes_nothing() -> None:
    engine = make_engine(max_concurrency=1, max_queue=1)
    gate = asyncio.Event()

    async def held(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", held, size_threshold=1)
    rec = Recorder(engine, ("run.submitted", "trigger.fired"))
    async with engine:
        compile.notify("a")
        await eventually(lambda: engine.stats().running == 1)
        compile.notify("b")
        compile.notify("c")  # refused: the queue holds b
        submitted = [e.run_id for e in rec.of("run.submitted")]
        fired = rec.of("trigger.fired")
        assert [e.key for e in fired] == ["a", "b"]
        assert [e.run_id for e in fired] == submitted
        gate.set()
        await compile.drain(timeout=TIMEOUT)
        assert [e.key for e in rec.of("trigger.fired")] == ["a", "b", "c"]
