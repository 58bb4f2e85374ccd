"""Threshold triggers at their edges: drains that wait for keys a full run queue refused,
notifies made while the engine stops, NUL in keys and names, notifies from several threads
before the start, a drain right after the start or from another loop, state() from another
thread, sweeps (and a durable store's saves and loads of many keys) that let the loop breathe,
forgetting keys whatever their count, a late start that failed, options refused at registration
or that could never work, the checks of drain()'s and join()'s timeouts, state()'s keys_limit
and fire()'s thread, a run whose task raises CancelledError though nothing cancelled it,
and a drain on keys due while the engine is not started (``EngineNotRunning``, unless a
start is under way: that is waited for).
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sqlite3
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    BackgroundEngine,
    Engine,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidKey,
    InvalidQuery,
    LoopThreadError,
    QueueFull,
    RunStatus,
    StoppedBeforeDone,
    TaskContext,
    TaskDefinitionError,
    Trigger,
    WorkQueue,
)

from .helpers import Recorder, eventually, swallowing_every_cancel, table_away, wait_until
from .test_queue_edges import StartHeldAtRegister
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


async def test_keys_a_full_queue_refused_are_counted_once_each_and_run_first_refused_first() -> None:
    # more keys due at once than the queue holds: those it refused wait in line and go in as
    # it makes room. `rejected` says how many keys it refused, not how often they were tried
    # (every retry of every waiting key counted, it ran into the millions)
    engine = make_engine(max_concurrency=1, max_queue=5)
    gate = asyncio.Event()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await gate.wait()
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    keys = [f"k{i:02d}" for i in range(40)]
    async with engine:
        for key in keys:
            compile.notify(key)
        assert compile.state().rejected == 34  # one running, 5 queued, the rest refused
        gate.set()
        await compile.drain(timeout=TIMEOUT)
        assert ran == keys  # the queue took them in the order they became due
        state = compile.state()
        assert state.rejected == 34
        assert state.fired == 40
        assert all(k.count == 0 and k.last_status == "succeeded" for k in state.keys)


def sharing_a_queue_of_five(tmp_path: Path) -> tuple[Engine, Engine, asyncio.Event]:
    """Two nodes on one SQLite file whose queue holds five runs: ``here``, and ``other``,
    whose task ``block`` holds its one slot until the event is set."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    here = make_engine(store=url, node_id="a", max_queue=5)
    other = make_engine(store=url, node_id="b", max_queue=5, max_concurrency=1)
    gate = asyncio.Event()

    async def block(ctx: TaskContext) -> None:
        await gate.wait()

    other.register(block, name="block")
    return here, other, gate


async def test_a_key_a_shared_store_refused_keeps_its_count_and_runs_once_there_is_room(tmp_path: Path) -> None:
    # two nodes on one file share a queue of 5: this node's own queue is empty and takes the
    # key's run, which the store then refuses (the run fails QueueFull without starting). The
    # count it fired with was taken off as if the run had done its work, and the key never ran
    here, other, gate = sharing_a_queue_of_five(tmp_path)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        if key == "raises":
            # raised by a run that started: its count is taken off as any failure's
            raise QueueFull("a queue of the handler's own", 1)
        ran.append(key)

    compile = here.trigger("compile", run_compile, size_threshold=3)
    failed = Recorder(here, ("run.failed",))
    await here.start()
    await other.start()
    try:
        await other.submit("block")
        await eventually(lambda: other.stats().running == 1)
        for _ in range(5):
            await other.submit("block")  # the shared queue is full
        compile.notify("bank-42", n=3)
        await eventually(lambda: failed.of("run.failed"))
        [refused] = failed.of("run.failed")
        assert refused.error.type == "QueueFull"
        [key] = compile.state().keys
        assert key.count == 3 and not key.queued and not key.running
        assert compile.state().rejected == 1
        # tried again and refused again: still one key refused
        await eventually(lambda: len(failed.of("run.failed")) >= 2)
        assert {e.error.type for e in failed.of("run.failed")} == {"QueueFull"}
        assert compile.state().rejected == 1
        assert compile.state().keys[0].count == 3
        gate.set()
        await compile.drain(timeout=TIMEOUT)
        assert ran == ["bank-42"]
        [key] = compile.state().keys
        assert key.count == 0 and key.last_status == "succeeded"

        compile.notify("raises", n=3)
        await compile.drain(timeout=TIMEOUT)
        raised = key_named(compile, "raises")
        assert raised.count == 0 and raised.last_status == "failed"
        assert compile.state().rejected == 1
    finally:
        await other.stop(timeout=1.0)
        await here.stop(timeout=1.0)


async def test_keys_a_shared_store_refused_all_run_while_it_has_room_for_only_two(tmp_path: Path) -> None:
    # the store refuses a whole write that does not fit: were every refused key tried at once,
    # the keys would be refused for good while the other node's runs hold three of five places
    here, other, gate = sharing_a_queue_of_five(tmp_path)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = here.trigger("compile", run_compile, size_threshold=1)
    keys = [f"k{i}" for i in range(12)]
    await here.start()
    await other.start()
    try:
        await other.submit("block")
        await eventually(lambda: other.stats().running == 1)
        for _ in range(3):
            await other.submit("block")  # pending: two places left
        for key in keys:
            compile.notify(key)
        await compile.drain(timeout=TIMEOUT)
        assert sorted(ran) == sorted(keys)
        assert all(k.count == 0 and k.last_status == "succeeded" for k in compile.state().keys)
        assert compile.state().rejected <= len(keys)
    finally:
        gate.set()
        await other.stop(timeout=1.0)
        await here.stop(timeout=1.0)


def key_named(trigger: Trigger, key: str) -> Any:
    [found] = [k for k in trigger.state().keys if k.key == key]
    return found


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


async def test_a_sweep_that_fires_many_stale_keys_lets_other_work_run_between_its_fires() -> None:
    # fewer keys than a sweep looks at between two yields: only the runs it fires (each a
    # submit) make it yield, as they must, for they cost far more than a look
    clock = Clock()
    engine = make_engine()
    keys = 2_000
    compile = engine.trigger("compile", nothing, size_threshold=10**9, staleness=60, clock=clock, check_interval=0.01)
    loop_turns = 0
    turn_at_fire: list[int] = []
    engine.bus.add_callback(lambda event: turn_at_fire.append(loop_turns), ("trigger.fired",))
    async with engine:
        for i in range(keys):
            compile.notify(f"doc-{i}")
        clock.now += 61  # every key stale: the next sweep fires them all
        deadline = time.monotonic() + 30
        while len(turn_at_fire) < keys:
            assert time.monotonic() < deadline, len(turn_at_fire)
            loop_turns += 1
            await asyncio.sleep(0)
        await compile.drain(timeout=60)
    assert len(turn_at_fire) == keys
    # this loop ran while the sweep fired: between its first fire and its last, many times
    assert turn_at_fire[-1] - turn_at_fire[0] >= keys // 256, (turn_at_fire[0], turn_at_fire[-1])


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


async def test_saving_many_changed_keys_to_a_durable_store_lets_other_work_run_between_its_requests(
    tmp_path: Path,
) -> None:
    # a save hands the store its keys a few at a time (the store turns each into a row on the
    # loop), and the loop's other work runs between those requests
    engine = Engine(health_interval=None, store=f"sqlite:///{tmp_path / 't.db'}")
    keys = 100_000
    compile = engine.trigger("compile", nothing, size_threshold=10**9, save_interval=3600)
    sizes: list[int] = []
    # for each request, how many requests had been made when a callback it scheduled ran
    turns: dict[int, int] = {}
    async with engine:
        real_save = engine.store.save_trigger
        loop = asyncio.get_running_loop()

        async def save_trigger(name: str, incarnation: str, records: Any, forget: Any = ()) -> None:
            i = len(sizes)
            sizes.append(len(records) + len(forget))
            loop.call_soon(lambda: turns.setdefault(i, len(sizes)))
            await real_save(name, incarnation, records, forget)

        engine.store.save_trigger = save_trigger  # type: ignore[method-assign]
        for i in range(keys):
            compile.notify(f"doc-{i}")
        await compile.save_changes()
        engine.store.save_trigger = real_save  # type: ignore[method-assign]
        assert sum(sizes) == keys
        assert max(sizes) <= 4096
        # each request's callback ran before the next request was made
        assert [turns.get(i) for i in range(len(sizes))] == list(range(1, len(sizes) + 1))
    with sqlite3.connect(tmp_path / "t.db") as conn:
        assert conn.execute("SELECT count(*) FROM trigger_keys").fetchone() == (keys,)


async def test_a_trigger_made_while_the_engine_runs_takes_up_many_saved_keys_letting_other_work_run(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 't.db'}"
    keys = 100_000
    first = Engine(health_interval=None, store=store)
    compile = first.trigger("compile", nothing, size_threshold=10**9)
    async with first:
        for i in range(keys):
            compile.notify(f"doc-{i}")
    engine = Engine(health_interval=None, store=store)
    # loop turns between the store's answer and the trigger's launch, while it takes the keys up
    turns = 0
    launched = False
    async with engine:
        real_load = engine.store.adopt_trigger
        loop = asyncio.get_running_loop()

        def turn() -> None:
            nonlocal turns
            if not launched:
                turns += 1
                loop.call_soon(turn)

        async def adopt_trigger(name: str, incarnation: str, *, own: bool = False) -> Any:
            saved = await real_load(name, incarnation, own=own)
            loop.call_soon(turn)
            return saved

        engine.store.adopt_trigger = adopt_trigger  # type: ignore[method-assign]
        compile = engine.trigger("compile", nothing, size_threshold=10**9)
        real_launch = compile.launch

        def launch() -> None:
            nonlocal launched
            launched = True
            real_launch()

        compile.launch = launch  # type: ignore[method-assign]
        await compile.drain(timeout=60)
        assert compile.key_count == keys
    assert turns >= keys // 4096 - 1, turns


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


def counts(trigger: Trigger) -> dict[str, int]:
    return {k.key: k.count for k in trigger.state().keys}


# ------------------------------------------------------------ notifies made while stopping


async def test_notifies_of_a_queue_drained_by_the_stop_are_there_after_a_restart(tmp_path: Path) -> None:
    # the README's pattern: a queue's handler notifies a trigger. The stop drains the queue
    # after the trigger stopped; each of those notifies must reach the next start
    url = f"sqlite:///{tmp_path / 'q.db'}"

    def make() -> tuple[Engine, Trigger, WorkQueue]:
        engine = make_engine(store=url, node_id="n1")
        compile = engine.trigger("compile", nothing, size_threshold=1_000)

        async def ingest(job: dict[str, str]) -> None:
            await asyncio.sleep(0.005)  # the handler's own work
            compile.notify(job["doc"])

        return engine, compile, engine.queue("ingest", ingest, concurrency=1)

    engine, compile, ingest = make()
    async with engine:
        for _ in range(50):
            await ingest.put({"doc": "bank-42"})
    assert ingest.info().processed == 50
    assert counts(compile) == {"bank-42": 50}

    again, compile, _ = make()
    async with again:
        assert counts(compile) == {"bank-42": 50}


async def test_notifies_made_by_runs_and_workers_the_stop_waits_for_are_kept(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'w.db'}"
    engine = make_engine(store=url, node_id="n1")
    gate = asyncio.Event()
    started = asyncio.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        started.set()
        await gate.wait()
        trigger.notify(key, 2)  # counted for the key's next run

    trigger = engine.trigger("compile", run_compile, size_threshold=3)

    @engine.supervised(name="flusher")
    async def flusher(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            # the stop cancels workers after the triggers have stopped: a worker flushing
            # what it holds notifies then, and lets the run go on
            trigger.notify("from-worker", 1)
            gate.set()

    async with engine:
        trigger.notify("bank-42", 3)
        await asyncio.wait_for(started.wait(), 5)
    assert counts(trigger) == {"bank-42": 2, "from-worker": 1}

    again = make_engine(store=url, node_id="n1")
    later = again.trigger("compile", nothing, size_threshold=100)
    async with again:
        assert counts(later) == {"bank-42": 2, "from-worker": 1}
        assert {k.key: k.last_status for k in later.state().keys}["bank-42"] == "succeeded"


# ------------------------------------------------------------ NUL in keys and names


@pytest.mark.parametrize("where", ["memory", "sqlite"])
async def test_a_key_holding_a_nul_is_refused_and_counts_nothing(where: str, tmp_path: Path) -> None:
    store = {} if where == "memory" else {"store": f"sqlite:///{tmp_path / 'n.db'}", "node_id": "n1"}
    engine = make_engine(**store)
    compile = engine.trigger("compile", nothing, size_threshold=100)

    @engine.task(name="job")
    async def job(ctx: TaskContext) -> None:
        return None

    async with engine:
        compile.notify("good", 2)
        with pytest.raises(InvalidKey, match=re.escape("NUL character ('\\x00' at index 3)")):
            compile.notify("bad\x00key")
        with pytest.raises(InvalidKey, match="NUL"):
            engine.fire_trigger("compile", "bad\x00key")
        with pytest.raises(InvalidKey, match="NUL"):
            await engine.submit("job", key="dedup\x00")
        assert counts(compile) == {"good": 2}
        assert compile.state().fired == 0
        assert engine.runs(task="job") == []


@pytest.mark.parametrize("name", ["q\x00x", "a\nb", "tab\there", "esc\x1b[31m", "del\x7f"])
def test_names_holding_control_characters_are_refused(name: str) -> None:
    engine = make_engine()

    async def handler(job: object) -> None:
        return None

    control = next(c for c in name if ord(c) < 32 or ord(c) == 127)
    with pytest.raises(InvalidConfiguration, match=re.escape(f"the control character {control!r}")):
        engine.queue(name, handler)
    with pytest.raises(InvalidConfiguration, match="use a name of plain text"):
        engine.trigger(name, nothing, size_threshold=2)

    async def work(ctx: TaskContext) -> None:
        return None

    with pytest.raises(InvalidConfiguration, match="control character"):
        engine.register(work, name=name)
    assert engine.queues() == [] and engine.triggers() == []
    assert name not in engine.tasks()


def test_a_refused_name_says_which_character_and_where() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration) as caught:
        engine.trigger("counts\x00old", nothing, size_threshold=2)
    assert "the control character '\\x00' (at index 6)" in str(caught.value)


async def test_on_postgres_a_nul_key_is_refused_and_the_other_keys_survive_a_restart(postgres_url: str) -> None:
    engine = make_engine(store=postgres_url, node_id="n1")
    compile = engine.trigger("compile", nothing, size_threshold=100, save_interval=0.02)
    async with engine:
        compile.notify("good", 5)
        with pytest.raises(InvalidKey, match="PostgreSQL"):
            compile.notify("bad\x00key")
    again = make_engine(store=postgres_url, node_id="n1")
    later = again.trigger("compile", nothing, size_threshold=100)
    async with again:
        assert counts(later) == {"good": 5}


async def test_on_postgres_a_progress_message_holding_a_nul_is_kept_escaped(postgres_url: str) -> None:
    # params, results and error texts travel as JSON (which escapes NUL); a progress message
    # is plain text to the store, which refused it, so the run could never finish
    engine = make_engine(store=postgres_url, node_id="n1")

    @engine.task(name="reads")
    async def reads(ctx: TaskContext) -> str:
        await ctx.progress(1, 2, "half\x00way")
        return "done\x00too"

    async with engine:
        record = await (await engine.submit("reads")).wait(10)
        assert record.status is RunStatus.SUCCEEDED
        assert record.result == "done\x00too"
        assert record.progress.message == "half\\x00way"
    again = make_engine(store=postgres_url, node_id="n1")
    async with again:
        stored = await again.fetch_run(record.id)
        assert (stored.status, stored.progress.message, stored.result) == (RunStatus.SUCCEEDED, "half\\x00way", "done\x00too")


# ------------------------------------------------------------ notifies from several threads


@pytest.fixture
def busy_switching() -> Iterator[None]:
    """Threads switch every few microseconds: a count made without the lock loses notifies."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def hammer(trigger: Trigger, n: int) -> None:
    for _ in range(n):
        trigger.notify("k")


def notify_from_threads(trigger: Trigger, threads: int, n: int) -> None:
    workers = [threading.Thread(target=hammer, args=(trigger, n)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


async def test_notifies_from_several_threads_before_the_start_are_all_counted(busy_switching: None) -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=10**12)
    notify_from_threads(compile, 4, 30_000)
    assert counts(compile) == {"k": 120_000}
    async with engine:
        assert counts(compile) == {"k": 120_000}
    # stopped: no loop counts for it any more, the threads count as before the start
    notify_from_threads(compile, 4, 10_000)
    assert counts(compile) == {"k": 160_000}


async def test_notifies_from_threads_while_a_durable_start_loads_are_all_counted(
    tmp_path: Path, busy_switching: None
) -> None:
    url = f"sqlite:///{tmp_path / 't.db'}"
    first = make_engine(store=url, node_id="n1")
    compile = first.trigger("compile", nothing, size_threshold=10**12)
    async with first:
        compile.notify("k", 1_000)

    engine = make_engine(store=url, node_id="n1")
    compile = engine.trigger("compile", nothing, size_threshold=10**12)
    done = threading.Event()

    def run() -> None:
        notify_from_threads(compile, 4, 20_000)
        done.set()

    threading.Thread(target=run).start()
    async with engine:
        await eventually(done.is_set, timeout=30)
        await eventually(lambda: counts(compile) == {"k": 81_000})
    again = make_engine(store=url, node_id="n1")
    later = again.trigger("compile", nothing, size_threshold=10**12)
    async with again:
        assert counts(later) == {"k": 81_000}


async def test_a_key_due_from_another_thread_before_the_trigger_started_fires_on_the_loop(tmp_path: Path) -> None:
    # a trigger made while a durable engine runs starts in a task of the loop: a thread's
    # notifies before that are counted there, and the run is queued on the loop, not the thread
    engine = make_engine(store=f"sqlite:///{tmp_path / 'l.db'}", node_id="n1")
    loop_thread = threading.get_ident()
    fired_on: list[int] = []
    engine.bus.add_callback(lambda event: fired_on.append(threading.get_ident()), ["trigger.fired"])
    errors: list[BaseException] = []
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    async with engine:
        late = engine.trigger("late", run_compile, size_threshold=2)

        def producer() -> None:
            try:
                late.notify("k", 2)
            except BaseException as exc:  # noqa: BLE001 - handed to the test
                errors.append(exc)

        thread = threading.Thread(target=producer)
        thread.start()
        thread.join()  # the loop is held: the trigger's start has not run yet
        assert errors == []
        await asyncio.wait_for(late.drain(), 5)
        assert ran == ["k"] and fired_on == [loop_thread]


# ------------------------------------------------------------ drain


@pytest.mark.parametrize("where", ["memory", "sqlite"])
async def test_a_drain_right_after_the_start_waits_for_keys_due_before_it(where: str, tmp_path: Path) -> None:
    store = {} if where == "memory" else {"store": f"sqlite:///{tmp_path / 'd.db'}", "node_id": "n1"}
    engine = make_engine(**store)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=3)
    compile.notify("bank-42", 3)  # due before the engine runs
    async with engine:
        # awaited at once, not wrapped in a task (which would start a loop turn later)
        await compile.drain(timeout=5)
        assert ran == ["bank-42"]
        assert counts(compile) == {"bank-42": 0}


def test_a_drain_awaited_on_another_loop_returns_when_the_runs_end() -> None:
    engine = make_engine()
    release = threading.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await asyncio.to_thread(release.wait, 5)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    bg = engine.start_background()
    try:

        async def app() -> None:
            compile.notify("k")
            await eventually(lambda: compile.state().keys and compile.state().keys[0].running)
            waiting = asyncio.ensure_future(compile.drain())
            done, _ = await asyncio.wait([waiting], timeout=0.05)
            assert not done  # the run is held
            release.set()
            began = time.monotonic()
            # nothing else wakes this loop: the end of the run on the engine's loop must (a
            # waiter answered from the engine's thread was seen only at the 5 s timeout)
            await asyncio.wait_for(waiting, 5)
            assert time.monotonic() - began < 2.5
            assert compile.state().keys[0].last_status == "succeeded"

            # a drain its caller gives up on leaves the next one working
            release.clear()
            compile.notify("k")
            await eventually(lambda: compile.state().keys[0].running)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(compile.drain(), 0.05)
            with pytest.raises(TimeoutError):
                await compile.drain(timeout=0.05)
            release.set()
            await asyncio.wait_for(compile.drain(), 5)
            assert compile.state().fired == 2

            # a notify made just before the drain is counted before the drain looks
            release.clear()
            compile.notify("k")
            with pytest.raises(TimeoutError):
                await compile.drain(timeout=0.05)
            release.set()
            await asyncio.wait_for(compile.drain(), 5)

        asyncio.run(app())
    finally:
        release.set()
        bg.stop(timeout=5)


# ------------------------------------------------------------ forget_after


@pytest.mark.parametrize("where", ["memory", "sqlite"])
async def test_forget_after_drops_keys_untouched_that_long_whatever_their_count(where: str, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'f.db'}"
    store = {} if where == "memory" else {"store": url, "node_id": "n1"}
    clock = Clock()
    engine = make_engine(**store)
    gate = asyncio.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        if key == "busy":
            await gate.wait()

    compile = engine.trigger(
        "compile", run_compile, size_threshold=5, forget_after=100, clock=clock, save_interval=0.02
    )
    async with engine:
        compile.notify("once", 1)  # a request id: never notified again, never due
        compile.notify("steady", 1)
        compile.notify("busy", 5)  # its run is still going when the time is up
        await eventually(lambda: compile.state().keys and any(k.running for k in compile.state().keys))
        clock.now += 60
        compile.notify("steady", 1)  # touched: kept for another 100 s
        clock.now += 50
        compile.check()
        assert counts(compile) == {"busy": 5, "steady": 2}
        assert compile.state().forgotten == 1
        gate.set()
        await asyncio.wait_for(compile.drain(), 5)
        clock.now += 101
        compile.check()
        assert counts(compile) == {}
        assert compile.state().forgotten == 3
    if where == "sqlite":
        again = make_engine(store=url, node_id="n1")
        later = again.trigger("compile", nothing, size_threshold=5)
        async with again:
            assert counts(later) == {}


async def test_a_key_due_by_staleness_fires_rather_than_being_forgotten() -> None:
    clock = Clock()
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger(
        "compile", run_compile, size_threshold=5, staleness=50, forget_after=100, clock=clock
    )
    async with engine:
        compile.notify("k", 2)
        clock.now += 200
        assert compile.check() == 1
        await asyncio.wait_for(compile.drain(), 5)
        assert ran == ["k"] and counts(compile) == {"k": 0}


# ------------------------------------------------------------ options that could never work


def test_staleness_min_above_the_size_threshold_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration, match="staleness could never fire it; use at most 5"):
        engine.trigger("compile", nothing, size_threshold=5, staleness=10, staleness_min=6)
    # nothing was registered: the name is free
    engine.trigger("compile", nothing, size_threshold=5, staleness=10, staleness_min=5)


def test_a_size_threshold_beyond_the_largest_count_is_refused() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration, match=r"use at most 2\*\*63-1"):
        engine.trigger("compile", nothing, size_threshold=2**63)
    engine.trigger("compile", nothing, size_threshold=2**63 - 1)


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
                # logged as the start's failure is taken up, which may be a loop turn after
                await eventually(
                    lambda: any("trigger 'late'" in r.getMessage() and "could not start" in r.getMessage() for r in caplog.records)
                )
        # counted, and fired once the start tried again has taken up the saved keys (fired before,
        # it could go beside a run its key's saved record names)
        trigger.notify("k")
        await eventually(lambda: ran == ["k"], timeout=TIMEOUT)
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


# ------------------------------------------------------------ a CancelledError nobody asked for


async def raises_cancelled_itself() -> None:
    """What a handler does that awaits a task someone else cancelled: CancelledError comes out
    of it, though nothing cancelled the handler's own task."""
    inner = asyncio.ensure_future(asyncio.sleep(3600))
    inner.cancel()
    await inner


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_a_trigger_run_raising_cancelled_error_itself_fails_with_its_retries_and_is_not_fired_again(
    tmp_path: Path, durable: bool
) -> None:
    engine = Engine(health_interval=None, **({"store": f"sqlite:///{tmp_path / 't.db'}"} if durable else {}))
    calls = 0

    async def compile_key(ctx: TaskContext, key: str) -> None:
        nonlocal calls
        calls += 1
        await raises_cancelled_itself()

    compile = engine.trigger("compile", compile_key, size_threshold=3, retries=1)
    async with engine:
        compile.notify("k", 3)
        # (taken for a cancel from outside, the run ended as if it had done nothing, and the key,
        # still at its threshold, was fired again at once, for good: this drain never returned)
        await compile.drain(timeout=TIMEOUT)
        [run] = engine.runs(task="trigger:compile", limit=None)
        [state] = compile.state().keys
    assert calls == 2
    assert (run.status, run.attempt, run.cancel_reason) == (RunStatus.FAILED, 2, None)
    assert run.error is not None and run.error.type == "CancelledError"
    assert "raised CancelledError without being cancelled" in run.error.message
    assert "raises_cancelled_itself" in run.error.traceback
    assert (state.count, state.last_status, compile.fired) == (0, "failed", 1)


async def test_a_run_whose_task_is_cancelled_from_outside_the_engine_is_still_cancelled_external() -> None:
    engine = make_engine()
    tasks: list[asyncio.Task[Any]] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        if len(tasks) == 1:
            await asyncio.Event().wait()

    compile = engine.trigger("compile", compile_key, size_threshold=1)
    async with engine:
        compile.notify("k")
        await eventually(lambda: tasks)
        tasks[0].cancel()  # by code of the program's own, not the engine
        await eventually(lambda: len(tasks) == 2)
        await compile.drain(timeout=TIMEOUT)
        runs = engine.runs(task="trigger:compile", limit=None)
    # a cancelled run did no work: its key, at its threshold still, fired again
    assert [(r.status, r.cancel_reason) for r in reversed(runs)] == [
        (RunStatus.CANCELLED, "external"),
        (RunStatus.SUCCEEDED, None),
    ]


# ------------------------------------------------------------ a drain on an engine that is not started


@pytest.mark.parametrize("when", ["new", "stopped"])
@pytest.mark.parametrize("due", ["size", "staleness"])
async def test_a_drain_on_a_key_due_while_the_engine_is_not_started_raises_and_the_key_runs_at_the_start(
    when: str, due: str
) -> None:
    clock = Clock()
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=2, staleness=60, clock=clock)
    if when == "stopped":
        async with engine:
            pass
    compile.notify("bank-42", 2 if due == "size" else 1)
    if due == "staleness":
        clock.now += 61
    # before: the drain returned at once, as if nothing were due
    with pytest.raises(EngineNotRunning) as raised:
        await asyncio.wait_for(compile.drain(), 1.0)
    assert raised.value.state == when
    said = str(raised.value)
    assert "1 key due" in said and "`async with engine:`" in said and "`await engine.start()`" in said
    assert ran == [] and counts(compile) == {"bank-42": 2 if due == "size" else 1}  # kept for the start
    async with engine:
        await compile.drain(timeout=TIMEOUT)
        assert ran == ["bank-42"]
        assert counts(compile) == {"bank-42": 0}


async def test_a_drain_with_no_key_due_before_the_start_returns() -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=2)
    await asyncio.wait_for(compile.drain(), 1.0)
    compile.notify("bank-42")  # 1 of 2: not due
    await asyncio.wait_for(compile.drain(), 1.0)
    await compile.drain(timeout=0)


async def test_a_drain_during_a_start_under_way_waits_for_it_then_for_the_due_keys_run() -> None:
    store = StartHeldAtRegister()
    engine = make_engine(store=store)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    compile.notify("bank-42")
    starting = asyncio.create_task(engine.start())
    try:
        assert await asyncio.to_thread(store.reached.wait, TIMEOUT)
        assert engine.state == "new" and engine.starting is not None
        draining = asyncio.create_task(compile.drain(timeout=TIMEOUT))
        await asyncio.sleep(0)  # one step: the drain now waits for the start
        # before: it had returned already, the key not run
        assert not draining.done()
        store.gate.set()
        await asyncio.wait_for(draining, TIMEOUT)
        assert ran == ["bank-42"]
        await starting
    finally:
        store.gate.set()
        await engine.stop(timeout=5)


def test_a_drain_on_another_loop_during_a_background_start_waits_for_the_due_keys_run() -> None:
    store = StartHeldAtRegister()
    engine = make_engine(store=store)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    compile.notify("bank-42")
    launched: list[BackgroundEngine] = []
    launching = threading.Thread(target=lambda: launched.append(engine.start_background()), daemon=True)
    launching.start()
    try:
        assert store.reached.wait(TIMEOUT)  # the start is under way on the engine's own loop

        async def app() -> None:
            draining = asyncio.ensure_future(compile.drain(timeout=TIMEOUT))
            done, _ = await asyncio.wait([draining], timeout=0.05)
            assert not done  # it waits for the start under way there
            store.gate.set()
            await draining
            assert ran == ["bank-42"]

        asyncio.run(app())
    finally:
        store.gate.set()
        launching.join(TIMEOUT)
        for bg in launched:
            bg.stop(timeout=5)


async def test_a_keys_run_a_stop_gave_up_on_is_its_run_until_its_code_ends() -> None:
    """A key's run whose code ignores every cancel outlives the stop, which records it cancelled
    (the key's count stays) and goes on. The next start fired the key again at once, a second
    run beside the first; now the key waits for that code's end, and a drain with it."""
    engine = make_engine(cancel_grace=0.02)
    release = asyncio.Event()
    runs: list[str] = []

    async def stubborn(ctx: TaskContext, key: str) -> None:
        runs.append("began")
        try:
            if len(runs) == 1:
                await swallowing_every_cancel(release)
        finally:
            runs.append("ended")

    compile = engine.trigger("compile", stubborn, size_threshold=1)
    await engine.start()
    try:
        compile.notify("k")
        await eventually(lambda: runs == ["began"])
        await asyncio.wait_for(engine.stop(timeout=0.02), TIMEOUT)
        await engine.start()
        # loop turns enough for the start's first sweep to fire every key due
        for _ in range(50):
            await asyncio.sleep(0)
        assert runs == ["began"], "the key fired a second run beside the one the stop left going"
        drained = asyncio.ensure_future(compile.drain(TIMEOUT))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not drained.done()  # the key is due, and its run still goes
        release.set()
        await drained
        assert runs == ["began", "ended", "began", "ended"]
    finally:
        release.set()
        await engine.stop()
