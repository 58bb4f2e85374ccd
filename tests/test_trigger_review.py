"""Threshold triggers, from a review: a bus callback that notifies or fires a key during that
key's own submit (before the submit has returned its run), state() of many keys asked from
another thread, the hottest keys a snapshot lists, and check() called from another thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import operator
import random
import threading
from collections.abc import AsyncIterator
from typing import Any

import pytest
from taskwatch.engine import Engine, LoopThreadError, TaskContext, Trigger, TriggerKeyState
from taskwatch.engine import triggers as triggers_module

from .helpers import Gauge, Recorder, eventually, in_thread, wait_until
from .test_triggers import Clock, make_engine

TIMEOUT = 10.0


async def nothing(ctx: TaskContext, key: str) -> None:
    return None


@contextlib.asynccontextmanager
async def opened(gate: asyncio.Event) -> AsyncIterator[None]:
    """Opens ``gate`` on the way out, before the engine's stop: a failed test's runs end."""
    try:
        yield
    finally:
        gate.set()


def fired_after_submitted(recorder: Recorder) -> list[tuple[str, str]]:
    """The run.submitted and trigger.fired events in the order published, as (kind, run id);
    checks that each trigger.fired comes after the run.submitted of the run it names."""
    seen: set[str] = set()
    order = []
    for event in recorder.events:
        kind: str = event.kind  # type: ignore[attr-defined]
        run_id: str = event.run_id  # type: ignore[attr-defined]
        if kind == "run.submitted":
            seen.add(run_id)
        elif kind == "trigger.fired":
            assert run_id in seen, f"trigger.fired for {run_id} before its run.submitted"
        order.append((kind, run_id))
    return order


# ------------------------------------------------------------ a callback of a key's own submit


@pytest.mark.parametrize("kind", ["run.submitted", "run.started"])
async def test_a_notify_called_back_by_the_keys_own_submit_counts_toward_its_next_run(kind: str) -> None:
    engine = make_engine()
    gate = asyncio.Event()
    gauge = Gauge()

    async def compile_key(ctx: TaskContext, key: str) -> None:
        await gauge.hold(gate)

    compile = engine.trigger("compile", compile_key, size_threshold=2)
    recorder = Recorder(engine, ("run.submitted", "trigger.fired"))
    hooked: list[str] = []

    def activity(event: Any) -> None:
        # "every run started counts as activity for its key": the first run's own event
        if event.task == compile.task_name and not hooked:
            hooked.append(event.run_id)
            compile.notify("a", 2)

    engine.bus.add_callback(activity, [kind])
    async with engine, opened(gate):
        compile.notify("a", 2)
        [a] = compile.state().keys
        # the notify during the submit counted, and queued no second run beside the first
        assert (a.run_id, a.count) == (hooked[0], 4)
        [fired] = recorder.of("trigger.fired")
        assert (fired.run_id, fired.count) == (hooked[0], 2)  # the count the run takes off
        await eventually(lambda: gauge.now == 1)
        gate.set()
        await asyncio.wait_for(compile.drain(), TIMEOUT)
        # the 2 notified during the first run's submit fired the next run, after it
        assert gauge.peak == 1
        assert [e.count for e in recorder.of("trigger.fired")] == [2, 2]
        assert len(recorder.of("run.submitted")) == 2
        [a] = compile.state().keys
        assert (a.count, a.last_status) == (0, "succeeded")
        fired_after_submitted(recorder)


async def test_fire_of_a_new_key_keeps_a_count_its_own_submit_called_back() -> None:
    engine = make_engine()
    gate = asyncio.Event()

    async def compile_key(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", compile_key, size_threshold=5)

    def activity(event: Any) -> None:
        if event.task == compile.task_name:
            compile.notify("new", 1)

    engine.bus.add_callback(activity, ["run.submitted"])
    async with engine, opened(gate):
        result = compile.fire("new")
        assert result.fired and result.count == 0  # a key never notified fires with nothing counted
        [key] = compile.state().keys
        # the key's record the notify made is the one the run belongs to, not replaced by the fire
        assert (key.count, key.run_id) == (1, result.run_id)
        gate.set()
        await asyncio.wait_for(compile.drain(), TIMEOUT)
        [key] = compile.state().keys
        assert (key.count, key.last_status) == (1, "succeeded")  # notified while queued: kept


async def test_fire_called_back_by_the_keys_own_submit_names_the_run_being_queued() -> None:
    engine = make_engine()
    gate = asyncio.Event()

    async def compile_key(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", compile_key, size_threshold=5)
    recorder = Recorder(engine, ("run.submitted", "trigger.fired"))
    answers = []

    def again(event: Any) -> None:
        if event.task == compile.task_name and not answers:
            answers.append(compile.fire("k"))

    engine.bus.add_callback(again, ["run.submitted"])
    async with engine, opened(gate):
        compile.notify("k", 3)
        result = compile.fire("k")
        [inner] = answers
        assert not inner.fired and inner.run_id == result.run_id and inner.count == 3
        assert result.fired and result.count == 3
        assert len(recorder.of("run.submitted")) == 1
        gate.set()
        await asyncio.wait_for(compile.drain(), TIMEOUT)
        assert compile.state().keys[0].count == 0


async def test_fires_called_back_by_another_keys_submit_are_published_after_its_own() -> None:
    engine = make_engine()
    gate = asyncio.Event()

    async def compile_key(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", compile_key, size_threshold=2)
    recorder = Recorder(engine, ("run.submitted", "trigger.fired"))

    def chain(event: Any) -> None:
        # the run of "a" brings "b" to its threshold
        if event.task == compile.task_name and event.params == {"key": "a"}:
            compile.notify("b", 2)

    engine.bus.add_callback(chain, ["run.submitted"])
    async with engine, opened(gate):
        compile.notify("a", 2)
        runs = {k.key: k.run_id for k in compile.state().keys}
        assert fired_after_submitted(recorder) == [
            ("run.submitted", runs["a"]),
            ("run.submitted", runs["b"]),
            ("trigger.fired", runs["a"]),
            ("trigger.fired", runs["b"]),
        ]
        assert [(e.key, e.count) for e in recorder.of("trigger.fired")] == [("a", 2), ("b", 2)]
        gate.set()
        await asyncio.wait_for(compile.drain(), TIMEOUT)


# ------------------------------------------------------------ state() of many keys from another thread


def watched_key(ticks: list[int], reads: list[int]) -> Any:
    """A key record that notes, each time its count is read, how many turns the loop's ticker
    had made by then."""

    class Watched(triggers_module._Key):
        __slots__ = ("_watched_count",)

        @property  # type: ignore[override]
        def count(self) -> int:
            reads.append(ticks[0])
            return self._watched_count  # type: ignore[no-any-return]

        @count.setter
        def count(self, value: int) -> None:
            self._watched_count = value

    return Watched(count=1, first_seen_at=1.0)


@pytest.mark.parametrize("how", ["trigger.state", "bg.triggers", "bg.atriggers"])
def test_a_listing_from_another_thread_lets_the_loop_run_between_its_reads(how: str) -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=10**9)
    ticks = [0]
    reads: list[int] = []
    compile._keys["first"] = watched_key(ticks, reads)
    keys = 3 * 8192  # more than one step of the listing
    for i in range(keys):
        compile.notify(f"user-{i}", 1 + i % 5)
    compile._keys["last"] = watched_key(ticks, reads)
    bg = engine.start_background()
    stop = threading.Event()

    async def ticker() -> None:
        while not stop.is_set():
            ticks[0] += 1
            await asyncio.sleep(0)

    assert engine.loop is not None
    ticking = asyncio.run_coroutine_threadsafe(ticker(), engine.loop)
    try:
        bg.call(lambda engine: compile.drain())  # (the start's own sweep, which reads counts, is over)
        wait_until(lambda: ticks[0] > 0)
        reads.clear()
        if how == "trigger.state":
            state = compile.state()
        elif how == "bg.triggers":
            # (engine.triggers() and bg.triggers() were made whole on the loop)
            (state,) = bg.triggers()
        else:
            (state,) = asyncio.run(bg.atriggers())
        first, last = reads
        # the loop went on with its other work between the first key read and the last
        assert last > first
        assert state.key_count == len(state.keys) == keys + 2
        # what the listing returns is what one read on the loop returns, in the same order
        reads.clear()
        assert bg.call(lambda engine: compile.state()) == state
        assert [k.key for k in state.keys] == ["first", *(f"user-{i}" for i in range(keys)), "last"]
    finally:
        stop.set()
        ticking.result(TIMEOUT)
        bg.stop(timeout=5)


def test_state_from_another_thread_gives_up_on_a_loop_that_takes_no_step(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triggers_module, "_LIST_PATIENCE", 0.2)
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=10**9)
    compile.notify("a")
    bg = engine.start_background()
    entered, release = threading.Event(), threading.Event()

    def block() -> None:
        entered.set()
        release.wait(TIMEOUT)  # a callback running blocking code on the loop

    try:
        assert engine.loop is not None
        engine.loop.call_soon_threadsafe(block)
        assert entered.wait(TIMEOUT)
        error = in_thread(compile.state)
        assert isinstance(error, TimeoutError)
        assert "busy or blocked" in str(error)
        release.set()
        assert [k.key for k in compile.state().keys] == ["a"]
    finally:
        release.set()
        bg.stop(timeout=5)


# ------------------------------------------------------------ the hottest keys (a snapshot's)


def hottest_as_before(full: list[TriggerKeyState], limit: int) -> list[TriggerKeyState]:
    """The keys a limited listing held before: ``heapq.nlargest`` by (queued or running, count),
    the first to come of those alike, listed by key; or every key, in order, when no more."""
    if len(full) <= limit:
        return full
    chosen = heapq.nlargest(limit, full, key=lambda k: (k.queued or k.running, k.count))
    return sorted(chosen, key=operator.attrgetter("key"))


def assert_same_selection(trigger: Trigger, limits: list[int]) -> None:
    full = trigger.state()
    for limit in limits:
        listed = trigger.state(keys_limit=limit)
        assert listed.key_count == full.key_count
        assert listed.keys == hottest_as_before(full.keys, limit), limit


async def test_the_hottest_keys_are_those_chosen_before() -> None:
    engine = make_engine(max_concurrency=2)
    gate = asyncio.Event()

    async def compile_key(ctx: TaskContext, key: str) -> None:
        if not key.startswith("done"):
            await gate.wait()

    compile = engine.trigger("compile", compile_key, size_threshold=5)
    rng = random.Random(7)
    async with engine, opened(gate):
        for i in range(3):
            compile.fire(f"done-{i}")  # run and end: count 0, last_status succeeded
        await asyncio.wait_for(compile.drain(), TIMEOUT)
        for i in range(40):
            compile.notify(f"k{i:02d}", rng.randint(1, 4))  # below the threshold: many alike
        for key in ("k03", "k11", "k17", "k20", "k28", "k39"):
            compile.fire(key)  # two running, four queued
        await eventually(lambda: sum(k.running for k in compile.state().keys) == 2)
        assert sum(k.queued for k in compile.state().keys) == 4
        total = compile.key_count
        assert_same_selection(compile, [0, 1, 2, 3, 5, 6, 7, 10, 20, total - 1, total, total + 3])
        gate.set()
        await asyncio.wait_for(compile.drain(), TIMEOUT)
        assert_same_selection(compile, [1, 6, 20, total - 1])


async def test_the_hottest_of_many_keys_are_those_chosen_before() -> None:
    engine = make_engine()
    compile = engine.trigger("compile", nothing, size_threshold=10**9)
    rng = random.Random(11)
    for i in range(5000):
        compile.notify(f"user-{rng.randrange(10**6):06d}", rng.choice([1, 1, 2, 3, 7, rng.randrange(1, 10**6)]))
    for i in range(500):
        compile.notify(f"rising-{i}", i + 1)  # each beats the ones before
    assert_same_selection(compile, [1, 2, 100, 499, 500, 501, 1000])


# ------------------------------------------------------------ check() from another thread


@pytest.mark.parametrize("due", ["staleness", "forget_after"])
def test_check_from_another_thread_says_so_and_changes_nothing(due: str) -> None:
    clock = Clock()
    engine = make_engine()
    options: dict[str, Any] = {due: 10, "check_interval": 3600}  # (the test sweeps by hand)
    compile = engine.trigger("compile", nothing, size_threshold=100, clock=clock, **options)
    recorder = Recorder(engine, ("trigger.fired",))
    bg = engine.start_background()
    try:
        for key in "abc":
            compile.notify(key)
        wait_until(lambda: compile.key_count == 3)
        bg.call(lambda engine: compile.drain())  # (the start's own sweep is over)
        clock.now += 20  # every key due, or untouched for long enough
        with pytest.raises(LoopThreadError) as caught:
            compile.check()
        assert caught.value.method == "check"
        assert "Trigger.check()" in str(caught.value) and "submit_nowait" not in str(caught.value)
        state = compile.state()
        assert (state.fired, state.forgotten, state.key_count) == (0, 0, 3)
        assert not recorder.events
        # on the loop it does
        assert bg.call(lambda engine: compile.check()) == (3 if due == "staleness" else 0)
        assert compile.key_count == (3 if due == "staleness" else 0)
    finally:
        bg.stop(timeout=5)


async def test_a_due_key_whose_run_gets_a_bad_id_keeps_its_count_and_fires_once_ids_are_good() -> None:
    """A run_id_factory making ids no store could keep refuses the submit (InvalidConfiguration):
    the notify that brought the key due is no caller's mistake and returns; the key waits in line
    and fires once the factory makes good ids again."""
    made = {"good": False, "n": 0}

    def ids() -> str:
        made["n"] += 1
        return f"run-{made['n']}" if made["good"] else ""

    engine = Engine(run_id_factory=ids, health_interval=None)
    ran: list[str] = []

    async def compile_(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    t = engine.trigger("t", compile_, size_threshold=2)
    async with engine:
        t.notify("k", 2)  # returns: no InvalidConfiguration out of a notify
        [key] = t.state().keys
        assert key.count == 2 and key.run_id is None and ran == []
        made["good"] = True
        await asyncio.wait_for(t.drain(), 10)
        assert ran == ["k"] and t.state().keys[0].count == 0
