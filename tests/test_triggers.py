"""Threshold triggers: size and staleness firing, one run per key, counters and last-run times."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from taskwatch.engine import (
    Engine,
    InvalidConfiguration,
    InvalidCount,
    RunStatus,
    StoppedBeforeDone,
    TaskContext,
    TaskDefinitionError,
)
from taskwatch.engine.engine import SNAPSHOT_TRIGGER_KEYS

from .helpers import Recorder, eventually, stray_tasks


def make_engine(**kwargs: object) -> Engine:
    kwargs.setdefault("health_interval", None)
    return Engine(**kwargs)  # type: ignore[arg-type]


class Clock:
    """A wall clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def key_state(trigger, key: str):  # type: ignore[no-untyped-def]
    return next(k for k in trigger.state().keys if k.key == key)


async def test_size_threshold_fires_once_per_key() -> None:
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=3)
    rec = Recorder(engine, ("trigger.fired",))
    async with engine:
        for _ in range(4):
            compile.notify("bank-42")
        compile.notify("bank-7", n=2)
        await asyncio.wait_for(compile.drain(), 1.0)
        assert ran == ["bank-42"]
        [fired] = rec.of("trigger.fired")
        assert (fired.trigger, fired.key, fired.reason, fired.count) == ("compile", "bank-42", "size", 3)
        # the fourth notify came after the fire and is kept; bank-7 is still below threshold
        assert key_state(compile, "bank-42").count == 1
        assert key_state(compile, "bank-7").count == 2
        assert compile.state().fired == 1
        compile.notify("bank-7")
        await asyncio.wait_for(compile.drain(), 1.0)
        assert ran == ["bank-42", "bank-7"]
        assert engine.stats().triggers["compile"] == {"keys": 2, "fired": 2}
    assert not stray_tasks()


async def test_fires_are_engine_runs_with_the_key_as_params() -> None:
    engine = make_engine()

    async def run_compile(ctx: TaskContext, key: str) -> str:
        return f"compiled {key}"

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    rec = Recorder(engine, ("trigger.fired",))
    async with engine:
        compile.notify("bank-1")
        await asyncio.wait_for(compile.drain(), 1.0)
        [run] = engine.runs(task="trigger:compile")
        assert run.source == "trigger:compile" and run.params == {"key": "bank-1"}
        assert run.status is RunStatus.SUCCEEDED and run.result == "compiled bank-1"
        assert rec.of("trigger.fired")[0].run_id == run.id
        [task] = [t for t in engine.catalog() if t.name == "trigger:compile"]
        assert task.kind == "trigger" and not task.submittable


async def test_a_key_already_queued_or_running_is_not_queued_twice_and_notifies_are_kept() -> None:
    engine = make_engine()
    release = asyncio.Event()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)
        await release.wait()

    compile = engine.trigger("compile", run_compile, size_threshold=3)
    rec = Recorder(engine, ("trigger.fired",))
    async with engine:
        for _ in range(3):
            compile.notify("k")
        fired = key_state(compile, "k")
        assert fired.queued or fired.running  # fired at once
        await eventually(lambda: ran == ["k"] and key_state(compile, "k").running)
        for _ in range(7):  # past the threshold again, while the run goes on
            compile.notify("k")
        assert len(rec.of("trigger.fired")) == 1
        assert key_state(compile, "k").count == 10
        release.set()
        await asyncio.wait_for(compile.drain(), 1.0)
        # the 7 that arrived during the run were kept and fired one more run
        counts = [e.count for e in rec.of("trigger.fired")]
        assert counts == [3, 7]
        assert ran == ["k", "k"]
        assert key_state(compile, "k").count == 0
    assert not stray_tasks()


async def test_counter_resets_and_last_run_is_recorded() -> None:
    clock = Clock(5_000.0)
    engine = make_engine()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        clock.now += 2.0  # the run takes two (fake) seconds

    compile = engine.trigger("compile", run_compile, size_threshold=2, clock=clock)
    async with engine:
        compile.notify("k")
        state = key_state(compile, "k")
        assert (state.count, state.first_seen_at, state.last_run_at) == (1, 5_000.0, None)
        compile.notify("k")
        await asyncio.wait_for(compile.drain(), 1.0)
        state = key_state(compile, "k")
        assert state.count == 0 and state.last_run_at == 5_002.0
        assert state.last_status == "succeeded" and not state.queued and not state.running


async def test_a_failed_run_also_resets_the_counter() -> None:
    engine = make_engine()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        raise RuntimeError("compiler crashed")

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    async with engine:
        compile.notify("k")
        await asyncio.wait_for(compile.drain(), 1.0)
        state = key_state(compile, "k")
        assert state.count == 0 and state.last_status == "failed" and state.last_run_at is not None
        [run] = engine.runs(task="trigger:compile")
        assert run.status is RunStatus.FAILED


async def test_staleness_fires_from_first_notify_then_from_last_run() -> None:
    clock = Clock(1_000.0)
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger(
        "compile", run_compile, size_threshold=50, staleness=timedelta(seconds=100),
        check_interval=3600, clock=clock,
    )
    rec = Recorder(engine, ("trigger.fired",))
    async with engine:
        compile.notify("k")
        clock.now = 1_099.0
        assert compile.check() == 0
        clock.now = 1_100.0
        assert compile.check() == 1
        await asyncio.wait_for(compile.drain(), 1.0)
        [fired] = rec.of("trigger.fired")
        assert (fired.reason, fired.count) == ("staleness", 1)
        assert key_state(compile, "k").last_run_at == 1_100.0
        # next time staleness counts from the last run, not from the first notify
        clock.now = 1_150.0
        compile.notify("k")
        clock.now = 1_199.0
        assert compile.check() == 0
        clock.now = 1_200.0
        assert compile.check() == 1
        await asyncio.wait_for(compile.drain(), 1.0)
        assert ran == ["k", "k"]
        assert compile.state().staleness == 100.0
    assert not stray_tasks()


async def test_staleness_min_is_respected() -> None:
    clock = Clock()
    engine = make_engine()

    async def run_compile(ctx: TaskContext, key: str) -> None: ...

    compile = engine.trigger(
        "compile", run_compile, size_threshold=50, staleness=10.0, staleness_min=3,
        check_interval=3600, clock=clock,
    )
    async with engine:
        compile.notify("k", n=2)
        clock.now += 1_000
        assert compile.check() == 0  # stale but too little work to bother
        compile.notify("k")
        assert compile.check() == 1
        await asyncio.wait_for(compile.drain(), 1.0)
        assert key_state(compile, "k").count == 0
        # a key that has nothing counted never fires, however stale
        clock.now += 1_000
        assert compile.check() == 0


async def test_the_sweep_loop_checks_staleness_by_itself() -> None:
    clock = Clock()
    engine = make_engine()

    async def run_compile(ctx: TaskContext, key: str) -> None: ...

    compile = engine.trigger(
        "compile", run_compile, size_threshold=50, staleness=60.0, check_interval=0.01, clock=clock
    )
    rec = Recorder(engine, ("trigger.fired",))
    async with engine:
        compile.notify("k")
        clock.now += 61
        await eventually(lambda: rec.of("trigger.fired"))
        assert rec.of("trigger.fired")[0].reason == "staleness"
    assert not stray_tasks()


async def test_default_check_interval_follows_staleness() -> None:
    engine = make_engine()

    async def run_compile(ctx: TaskContext, key: str) -> None: ...

    assert engine.trigger("a", run_compile, size_threshold=5, staleness=30.0).check_interval == 3.0
    week = engine.trigger("b", run_compile, size_threshold=5, staleness=timedelta(days=7))
    assert week.check_interval == 60.0 and week.state().staleness == 7 * 86_400.0
    assert engine.trigger("c", run_compile, size_threshold=5).check_interval is None


async def test_counts_before_start_fire_once_the_engine_runs() -> None:
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=2)
    compile.notify("k", n=2)
    assert compile.state().fired == 0
    async with engine:
        await eventually(lambda: compile.state().fired == 1)
        await asyncio.wait_for(compile.drain(), 1.0)
    assert ran == ["k"]


async def test_notify_from_another_thread() -> None:
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=5)

    def produce() -> None:
        for _ in range(5):
            compile.notify("k")

    async with engine:
        await asyncio.to_thread(produce)
        await eventually(lambda: compile.state().fired == 1)
        await asyncio.wait_for(compile.drain(), 1.0)
    assert ran == ["k"]
    assert not stray_tasks()


async def test_pending_fires_cancelled_by_shutdown_keep_their_count() -> None:
    engine = make_engine(max_concurrency=1)
    release = asyncio.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await release.wait()

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    await engine.start()
    compile.notify("a")
    compile.notify("b")  # waits for the single slot
    await eventually(lambda: key_state(compile, "a").running)
    await engine.stop(timeout=0.05)
    assert not stray_tasks()
    # neither did its work: both keep their counts for the next start
    assert key_state(compile, "a").count == 1 and key_state(compile, "b").count == 1
    assert key_state(compile, "b").last_status == "cancelled"
    assert key_state(compile, "b").last_run_at is None


def test_bad_options_raise_typed_errors() -> None:
    engine = make_engine()

    async def ok(ctx: TaskContext, key: str) -> None: ...

    def not_async(ctx: TaskContext, key: str) -> None: ...

    async def no_key(ctx: TaskContext) -> None: ...

    with pytest.raises(ValueError, match="size_threshold"):
        engine.trigger("a", ok, size_threshold=0)
    with pytest.raises(ValueError, match="staleness"):
        engine.trigger("b", ok, size_threshold=5, staleness=-1)
    with pytest.raises(ValueError, match="staleness_min"):
        engine.trigger("c", ok, size_threshold=5, staleness=10, staleness_min=0)
    with pytest.raises(TaskDefinitionError, match="async def"):
        engine.trigger("d", not_async, size_threshold=5)
    with pytest.raises(TaskDefinitionError, match=r"\(ctx, key\)"):
        engine.trigger("e", no_key, size_threshold=5)
    assert engine.triggers() == []


async def test_the_engine_clock_is_the_default_clock() -> None:
    clock = Clock(7_000.0)
    engine = make_engine(clock=clock)

    async def run_compile(ctx: TaskContext, key: str) -> None: ...

    compile = engine.trigger("compile", run_compile, size_threshold=50, staleness=10.0, check_interval=3600)
    async with engine:
        compile.notify("k")
        assert key_state(compile, "k").first_seen_at == 7_000.0
        clock.now += 10
        assert compile.check() == 1
        await asyncio.wait_for(compile.drain(), 1.0)
        assert key_state(compile, "k").last_run_at == 7_010.0


async def test_a_run_cancelled_by_the_user_is_not_fired_again_at_once() -> None:
    engine = make_engine()
    started = asyncio.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        if not started.is_set():
            started.set()
            await asyncio.Event().wait()  # the first run waits to be cancelled

    compile = engine.trigger("compile", run_compile, size_threshold=2)
    rec = Recorder(engine, ("trigger.fired",))
    async with engine:
        for _ in range(4):
            compile.notify("k")
        await asyncio.wait_for(started.wait(), 1.0)
        run_id = key_state(compile, "k").run_id
        assert run_id is not None
        await engine.cancel(run_id, grace=1.0)
        # a refire would come with call_soon: let the loop go round twice
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(rec.of("trigger.fired")) == 1
        state = key_state(compile, "k")
        assert not state.queued and not state.running
        assert state.count == 4 and state.last_status == "cancelled"
        compile.notify("k")  # the next notify fires it again
        assert len(rec.of("trigger.fired")) == 2


async def test_counts_survive_a_stop_and_start_of_the_same_engine_unchanged(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # the stop saves every key's count; the next start of this engine object reads them back
    # and adds only what was notified since (here: 1), never its own saved counts again
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}", node_id="n")
    ran: list[str] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", compile_key, size_threshold=5)
    async with engine:
        for _ in range(3):
            compile.notify("k")
    compile.notify("k")  # while stopped: counted, saved at the next start
    async with engine:
        assert key_state(compile, "k").count == 4
        assert compile.state().fired == 0 and ran == []
        compile.notify("k")  # the fifth: fires
        await asyncio.wait_for(compile.drain(), 5)
        assert ran == ["k"]
    async with engine:
        assert key_state(compile, "k").count == 0


async def test_a_drain_open_at_a_stop_hears_the_runs_were_dropped_not_done() -> None:
    engine = make_engine(max_concurrency=1)
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await asyncio.Event().wait()
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=1)
    await engine.start()
    compile.notify("bank-1")
    compile.notify("bank-2")  # waits behind bank-1 for the one slot
    draining = asyncio.ensure_future(compile.drain())
    await engine.stop(timeout=0)
    with pytest.raises(StoppedBeforeDone, match="2 runs of trigger 'compile'.*dropped") as caught:
        await asyncio.wait_for(draining, 5)
    assert not caught.value.kept and ran == []
    with pytest.raises(StoppedBeforeDone):
        await compile.drain()  # asked after the stop: the same answer
    assert {k.key: k.count for k in compile.state().keys} == {"bank-1": 1, "bank-2": 1}


async def test_a_key_refused_by_a_full_queue_runs_once_the_queue_has_room() -> None:
    # no staleness, so no sweep: the refused key must not wait for a notify that may never come
    engine = make_engine(max_concurrency=1, max_queue=1)
    release = asyncio.Event()
    ran: list[str] = []

    @engine.task
    async def block(ctx: TaskContext) -> None:
        await release.wait()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=2)
    async with engine:
        await engine.submit("block")
        await eventually(lambda: engine.stats().by_status["running"] == 1)
        await engine.submit("block")  # the queue's one place is taken
        compile.notify("bank-1", n=2)
        assert compile.state().rejected == 1
        assert key_state(compile, "bank-1").count == 2 and not key_state(compile, "bank-1").queued
        release.set()
        await eventually(lambda: ran == ["bank-1"])
        assert key_state(compile, "bank-1").count == 0
    assert not stray_tasks()


async def test_idle_keys_are_forgotten_after_forget_after_and_counted() -> None:
    # keys drawn from an unbounded space (request ids) must not pile up for good
    clock = Clock(1_000.0)
    engine = make_engine()
    ran: list[str] = []

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    compile = engine.trigger("compile", run_compile, size_threshold=2, forget_after=60.0, clock=clock)
    assert compile.check_interval == 6.0  # the sweep runs though there is no staleness
    async with engine:
        compile.notify("done", n=2)  # runs, then sits idle with count 0
        compile.notify("pending")  # count 1, below the threshold: forgotten all the same
        await asyncio.wait_for(compile.drain(), 1.0)
        assert ran == ["done"]
        clock.now += 59.0
        compile.check()
        assert sorted(compile.keys) == ["done", "pending"]
        compile.notify("recent")  # touched now: kept for another 60 s
        clock.now += 1.0
        compile.check()
        assert compile.keys == ["recent"]
        state = compile.state()
        assert (state.forgotten, state.forget_after) == (2, 60.0)
        assert key_state(compile, "recent").count == 1
        compile.notify("done", n=2)  # a forgotten key comes back as new
        await asyncio.wait_for(compile.drain(), 1.0)
        assert ran == ["done", "done"]


async def test_a_key_with_a_run_queued_is_not_forgotten() -> None:
    clock = Clock(1_000.0)
    engine = make_engine(max_concurrency=1)
    gate = asyncio.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", run_compile, size_threshold=1, forget_after=10.0, clock=clock)
    async with engine:
        compile.fire("a")  # count 0, run running
        compile.fire("b")  # count 0, run queued behind it
        clock.now += 100.0
        compile.check()
        assert sorted(compile.keys) == ["a", "b"] and compile.state().forgotten == 0
        gate.set()
        await asyncio.wait_for(compile.drain(), 1.0)
        clock.now += 10.0
        compile.check()
        assert compile.keys == [] and compile.state().forgotten == 2


async def test_forgotten_keys_are_deleted_from_a_durable_store(tmp_path) -> None:  # type: ignore[no-untyped-def]
    clock = Clock(1_000.0)
    url = f"sqlite:///{tmp_path / 'runs.db'}"

    async def run_compile(ctx: TaskContext, key: str) -> None: ...

    first = make_engine(store=url, node_id="n")
    compile = first.trigger("compile", run_compile, size_threshold=1, forget_after=30.0, clock=clock)
    async with first:
        compile.notify("old")
        compile.notify("new")
        await asyncio.wait_for(compile.drain(), 5.0)
        clock.now += 30.0
        compile.notify("new")  # still busy: kept
        await asyncio.wait_for(compile.drain(), 5.0)
        compile.check()
        assert compile.keys == ["new"]
    # a new process: what the store kept is what comes back
    second = make_engine(store=url, node_id="n")
    again = second.trigger("compile", run_compile, size_threshold=1, forget_after=30.0, clock=clock)
    async with second:
        assert again.keys == ["new"]
        assert key_state(again, "new").last_status == "succeeded"


def test_a_bad_forget_after_is_refused() -> None:
    engine = make_engine()

    async def ok(ctx: TaskContext, key: str) -> None: ...

    for bad in (0, -5, "soon", True, float("nan")):
        with pytest.raises(ValueError, match="forget_after"):
            engine.trigger("a", ok, size_threshold=5, forget_after=bad)
    assert engine.triggers() == []


async def test_a_snapshot_carries_the_hottest_keys_of_a_big_trigger_and_counts_the_rest() -> None:
    # a key per user: the dashboard's snapshot must not list (or the health sampler count by
    # listing) a hundred thousand keys every second
    engine = make_engine(max_concurrency=1)
    gate = asyncio.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await gate.wait()

    compile = engine.trigger("compile", run_compile, size_threshold=1_000_000)
    async with engine:
        for i in range(3_000):
            compile.notify(f"user-{i:05}", n=1 + i % 7)
        compile.fire("user-00000")  # running, count 1: still among those shown
        compile.notify("user-00001", n=500)
        snap = engine.snapshot()
        [state] = snap.triggers
        assert state.key_count == 3_000 and len(state.keys) == SNAPSHOT_TRIGGER_KEYS
        shown = {k.key: k for k in state.keys}
        assert shown["user-00000"].running and shown["user-00001"].count == 502
        # the biggest counts: no key left out has more than a key shown
        left_out = [k.count for k in compile.state().keys if k.key not in shown]
        assert max(left_out) <= min(k.count for k in state.keys if k.key != "user-00000")
        assert [k.key for k in state.keys] == sorted(shown)
        assert engine.stats().triggers["compile"] == {"keys": 3_000, "fired": 1}
        assert len(compile.state().keys) == 3_000  # asked directly: every key
        gate.set()


def test_a_trigger_and_a_queue_made_from_another_thread_while_the_engine_runs_work() -> None:
    # a notebook: the engine runs on its background thread, cells make loops from the kernel's
    import threading

    engine = make_engine()
    ran = threading.Event()
    handled = threading.Event()

    async def run_compile(ctx: TaskContext, key: str) -> None:
        ran.set()

    async def handle(job: object) -> None:
        handled.set()

    bg = engine.start_background()
    try:
        compile = engine.trigger("compile", run_compile, size_threshold=1)
        queue = engine.queue("mail", handle)
        compile.notify("k")
        queue.put_nowait({"to": "a"})
        assert ran.wait(5) and handled.wait(5)
    finally:
        bg.stop()


async def test_huge_counts_are_refused_or_saturate_and_every_save_still_works(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # a store keeps counts as 64-bit integers: a count past them failed every save of the
    # trigger, and the other keys' counts were lost with it
    url = f"sqlite:///{tmp_path / 'runs.db'}"

    hold = asyncio.Event()  # never set: the run "big" fires is still going at each stop

    async def run_compile(ctx: TaskContext, key: str) -> None:
        await hold.wait()

    engine = make_engine(store=url, node_id="n")
    # the largest threshold there is: reached only by a saturated count
    compile = engine.trigger("compile", run_compile, size_threshold=2**63 - 1)
    await engine.start()
    try:
        with pytest.raises(InvalidCount, match="from 1 to 2\\*\\*62"):
            compile.notify("big", 2**63)
        assert compile.keys == []
        for _ in range(3):
            compile.notify("big", 2**62)  # saturates at the largest count a store keeps
        compile.notify("small", 3)
    finally:
        await engine.stop(timeout=0)  # the run is put back; the key waits on it, its count kept
    again = make_engine(store=url, node_id="n")
    compile = again.trigger("compile", run_compile, size_threshold=2**63 - 1)
    await again.start()
    try:
        assert {k.key: k.count for k in compile.state().keys} == {"big": 2**63 - 1, "small": 3}
    finally:
        await again.stop(timeout=0)


def test_trigger_intervals_under_a_millisecond_and_string_flags_are_refused() -> None:
    engine = make_engine()

    async def ok(ctx: TaskContext, key: str) -> None: ...

    for option in ("staleness", "check_interval", "save_interval", "forget_after"):
        with pytest.raises(InvalidConfiguration, match=option):
            engine.trigger("a", ok, **{"size_threshold": 5, "staleness": 10, option: 1e-6})
    # a sweep interval with nothing to sweep for would be ignored without a word
    with pytest.raises(InvalidConfiguration, match="check_interval=5: the sweep only looks"):
        engine.trigger("a", ok, size_threshold=5, check_interval=5)
    assert engine.triggers() == []
    # read from the environment, "false" and "0" are true to Python: refused, not switched on
    with pytest.raises(InvalidConfiguration, match="flags"):
        Engine(flags={"kg_extraction": "false"})  # type: ignore[dict-item]
    assert Engine(flags={"kg_extraction": False}).flags == {"kg_extraction": False}


async def test_forgotten_keys_leave_nothing_behind_with_the_memory_store() -> None:
    # nothing saves a memory store's keys: noting each change for a save kept every key ever
    # notified, forgotten or not, so memory grew with every new key for good
    import gc
    import tracemalloc

    clock = Clock(1_000.0)
    engine = make_engine(history=10, replay=0)

    async def run_compile(ctx: TaskContext, key: str) -> None: ...

    compile = engine.trigger("compile", run_compile, size_threshold=1, forget_after=1.0, clock=clock)

    async def a_round_of_new_keys(round_: int) -> int:
        for i in range(3_000):
            compile.notify(f"request-{round_}-{i:06}-{'x' * 400}")
        await asyncio.wait_for(compile.drain(), 30.0)
        clock.now += 1.0
        compile.check()
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    async with engine:
        tracemalloc.start()
        try:
            # the first rounds grow the engine's tables to their working size: measured after
            after_two = [await a_round_of_new_keys(r) for r in (1, 2)][-1]
            after_four = [await a_round_of_new_keys(r) for r in (3, 4)][-1]
        finally:
            tracemalloc.stop()
        assert compile.key_count == 0 and compile.state().forgotten == 12_000
        # held, each round's 3,000 keys of 400-odd bytes would add over 1.2 MB
        grown = after_four - after_two
        assert grown < 1_000_000, f"{grown:,} bytes more after 6,000 more keys"
