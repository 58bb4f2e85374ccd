"""Periodic tasks: next-due arithmetic, the decorator registry, and the scheduling loops."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from datetime import datetime, timezone
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    InvalidConfiguration,
    RunStatus,
    TaskContext,
    TaskDefinitionError,
    UnknownPeriodic,
)
from taskwatch.engine.scheduler import jitter_delay, next_cron_due, next_interval_due

from .helpers import Recorder, eventually, stray_tasks


def make_engine(**kwargs: object) -> Engine:
    kwargs.setdefault("health_interval", None)
    return Engine(**kwargs)  # type: ignore[arg-type]


def local(*args: int) -> float:
    """A local wall-clock time as UNIX seconds (cron reads expressions in local time)."""
    return datetime(*args).timestamp()  # type: ignore[arg-type]


def info(engine: Engine, name: str):  # type: ignore[no-untyped-def]
    return next(p for p in engine.schedule() if p.name == name)


# ---------------------------------------------------------------- pure next-due computation


def test_interval_is_measured_from_the_end_by_default() -> None:
    assert next_interval_due(last_start=100.0, last_end=107.5, every=10.0) == 117.5


def test_fixed_rate_interval_is_measured_from_the_start() -> None:
    assert next_interval_due(last_start=100.0, last_end=107.5, every=10.0, fixed_rate=True) == 110.0


def test_fixed_rate_skips_slots_missed_while_held_up_but_runs_the_latest() -> None:
    # held up until 135: the 110, 120 slots are gone, 130 runs at once, not three in a burst
    assert next_interval_due(100.0, None, 10.0, fixed_rate=True, now=135.0) == 130.0
    # not late: the next slot stands
    assert next_interval_due(100.0, None, 10.0, fixed_rate=True, now=101.0) == 110.0


def test_interval_needs_the_time_it_is_measured_from() -> None:
    with pytest.raises(ValueError):
        next_interval_due(None, None, 10.0)
    with pytest.raises(ValueError):
        next_interval_due(None, 50.0, 10.0, fixed_rate=True)


def test_jitter_adds_a_bounded_random_delay() -> None:
    rng = random.Random(7)
    dues = [next_interval_due(0.0, 100.0, 10.0, jitter_fraction=0.1, rng=rng) for _ in range(500)]
    assert all(110.0 <= d <= 111.0 for d in dues)
    assert max(dues) - min(dues) > 0.5  # actually spread, not a constant offset
    assert next_interval_due(0.0, 100.0, 10.0, jitter_fraction=0.0, rng=rng) == 110.0
    assert jitter_delay(60.0, 0.0) == 0.0


def test_cron_next_run_in_local_time_across_the_day_boundary() -> None:
    after = local(2024, 1, 15, 23, 59, 30)
    assert next_cron_due("0 3 * * *", after) == local(2024, 1, 16, 3, 0)


def test_cron_next_run_is_strictly_after_the_given_time() -> None:
    assert next_cron_due("*/15 * * * *", local(2024, 1, 15, 10, 7, 12)) == local(2024, 1, 15, 10, 15)
    assert next_cron_due("*/15 * * * *", local(2024, 1, 15, 10, 15)) == local(2024, 1, 15, 10, 30)
    assert next_cron_due("*/15 * * * *", local(2024, 1, 15, 10, 14, 59) + 0.5) == local(2024, 1, 15, 10, 15)


@pytest.fixture
def new_york(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Local time is New York's (DST) for the test, and what it was afterwards."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


#: 2024-11-03, New York: at 06:00 UTC the clocks went back from 02:00 EDT to 01:00 EST
FALL_BACK = datetime(2024, 11, 3, 6, 0, tzinfo=timezone.utc).timestamp()


def test_cron_in_the_repeated_hour_of_a_dst_change_moves_forward(new_york: None) -> None:
    # 01:40 EST, the second 01:40 of that night: the next "*/5" is 01:45 EST, five
    # minutes on, not 01:45 EDT (the first pass, 55 minutes back)
    after = FALL_BACK + 40 * 60
    assert next_cron_due("*/5 * * * *", after) == after + 5 * 60
    assert next_cron_due("* * * * *", after + 30) == after + 60
    # in the first pass the wall clock goes on as it reads: 01:55 EDT, then 01:00 EST
    first_pass = FALL_BACK - 20 * 60  # 01:40 EDT
    assert next_cron_due("*/5 * * * *", first_pass) == first_pass + 5 * 60
    # a daily time matches once that night, in the first pass
    assert next_cron_due("30 1 * * *", FALL_BACK - 3 * 3600) == FALL_BACK - 30 * 60


async def test_a_cron_task_started_in_the_repeated_hour_plans_its_next_tick_ahead(new_york: None) -> None:
    # the engine's clock reads 01:40:59.5 EST, second pass: the next minute is half a second on
    base = time.time()
    start = FALL_BACK + 40 * 60 + 59.5
    engine = make_engine(clock=lambda: start + time.time() - base)

    @engine.periodic(cron="* * * * *")
    async def minutely(ctx: TaskContext) -> None:
        return None

    async with engine:
        first = await eventually(lambda: engine.runs(task="minutely", limit=None))
        assert first[0].created_at >= start + 0.5 - 0.05
        # the following tick is a minute on (a slot in the past would fire again at once)
        assert info(engine, "minutely").next_due == start + 60.5
        assert len(engine.runs(task="minutely", limit=None)) == 1


def test_cron_across_month_and_year_in_an_explicit_zone() -> None:
    utc = timezone.utc
    after = datetime(2024, 12, 31, 23, 0, tzinfo=utc).timestamp()
    assert next_cron_due("0 0 1 * *", after, tz=utc) == datetime(2025, 1, 1, tzinfo=utc).timestamp()


# ---------------------------------------------------------------- validation at decoration time


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "exactly one of every"),
        ({"every": 5.0, "cron": "* * * * *"}, "exactly one of every"),
        ({"every": 0}, "every"),
        ({"every": -1.0}, "every"),
        ({"cron": "61 * * * *"}, "does not parse"),
        ({"cron": "not a cron"}, "does not parse"),
        ({"every": 5.0, "jitter": 1.5}, "jitter"),
        ({"every": 5.0, "initial_delay": -1.0}, "initial_delay"),
        ({"cron": "* * * * *", "fixed_rate": True}, "fixed_rate=True: a cron task"),
        ({"cron": 5}, "cron=5: a cron expression is a str"),
    ],
)
def test_bad_trigger_options_raise_typed_errors(options: dict, message: str) -> None:
    engine = make_engine()

    async def tick(ctx: TaskContext) -> None: ...

    # bad values, not a malformed function: a ValueError, and nothing is registered
    with pytest.raises(InvalidConfiguration, match=message):
        engine.periodic(tick, **options)
    assert engine.schedule() == [] and engine.tasks() == {}


def test_function_must_be_async_and_accept_its_resources() -> None:
    engine = make_engine()

    def not_async(ctx: TaskContext) -> None: ...

    async def lacks_redis(ctx: TaskContext) -> None: ...

    async def unfilled(ctx: TaskContext, redis: object, db: object) -> None: ...

    with pytest.raises(TaskDefinitionError, match="async def"):
        engine.periodic(not_async, every=1.0)
    with pytest.raises(TaskDefinitionError, match="requires redis"):
        engine.periodic(lacks_redis, every=1.0, requires=("redis",))
    with pytest.raises(TaskDefinitionError, match="db"):
        engine.periodic(unfilled, every=1.0, requires=("redis",))


def test_a_resource_named_like_the_context_parameter_is_refused_where_every_run_would_fail() -> None:
    engine = make_engine(resources={"ctx": "R"})

    async def tick(ctx: TaskContext, **resources: object) -> None: ...

    # each run would have called tick(context, ctx=R): "got multiple values for argument 'ctx'"
    with pytest.raises(TaskDefinitionError, match="requires a resource named 'ctx', the name of its first parameter"):
        engine.periodic(tick, every=1.0, requires=("ctx",))
    assert engine.schedule() == [] and "tick" not in engine.tasks()
    # positional-only, the keyword lands in **resources: nothing to refuse
    async def posonly(ctx: TaskContext, /, **resources: object) -> None: ...

    engine.periodic(posonly, every=1.0, requires=("ctx",))


# ---------------------------------------------------------------- registry: enabled or why not


async def test_unmet_needs_register_the_task_disabled_with_a_reason() -> None:
    engine = make_engine(resources={}, flags={"kg_extraction": False})
    calls: list[str] = []

    @engine.periodic(every=0.01, requires=("redis",))
    async def needs_redis(ctx: TaskContext, redis: object) -> None:
        calls.append("redis")

    @engine.periodic(every=0.01, opt_in="kg_extraction")
    async def needs_flag(ctx: TaskContext) -> None:
        calls.append("flag")

    @engine.periodic(every=0.01)
    async def witness(ctx: TaskContext) -> None:
        calls.append("witness")

    rec = Recorder(engine, ("periodic.",))
    await engine.start()
    try:
        registered = {e.name: e for e in rec.of("periodic.registered")}
        assert registered["needs_redis"].enabled is False
        assert registered["needs_redis"].reason == "missing resource: redis"
        assert registered["needs_flag"].reason == "flag kg_extraction is off"
        assert registered["witness"].enabled is True and registered["witness"].next_due is not None
        assert info(engine, "needs_redis").enabled is False
        assert info(engine, "needs_redis").reason == "missing resource: redis"
        assert info(engine, "needs_redis").next_due is None
        assert info(engine, "needs_flag").reason == "flag kg_extraction is off"
        # the enabled one keeps running while the disabled ones never do
        await eventually(lambda: calls.count("witness") >= 3)
        assert "redis" not in calls and "flag" not in calls
        assert engine.runs(task="needs_redis") == []
    finally:
        await engine.stop()
    assert not stray_tasks()


async def test_resources_are_passed_by_name_and_runs_go_through_the_engine() -> None:
    client = object()
    engine = make_engine(resources={"redis": client}, flags={"kg_extraction": True})
    seen: list[object] = []

    @engine.periodic(every=60.0, requires=("redis",), opt_in="kg_extraction")
    async def scheduled_prompt_tick(ctx: TaskContext, redis: object) -> None:
        seen.append(redis)

    async with engine:
        await eventually(lambda: info(engine, "scheduled_prompt_tick").last_status == "succeeded")
        assert seen == [client]
        [run] = engine.runs(task="scheduled_prompt_tick")
        assert run.source == "periodic:scheduled_prompt_tick"
        assert run.status is RunStatus.SUCCEEDED
        p = info(engine, "scheduled_prompt_tick")
        assert p.enabled and p.reason is None
        assert p.trigger == "every 60s" and p.trigger_kind == "interval"
        assert p.runs == 1 and p.failures == 0 and p.last_run_id == run.id
        assert p.last_duration is not None and p.last_duration >= 0
        # end-based: due one interval after the run ended
        assert run.finished_at is not None
        assert p.next_due == run.finished_at + 60.0
    assert not stray_tasks()


async def test_periodic_tasks_are_not_submittable_by_hand() -> None:
    engine = make_engine()

    @engine.periodic(every=60.0)
    async def hourly(ctx: TaskContext) -> None: ...

    [task] = engine.catalog()
    assert task.kind == "periodic" and task.submittable is False


async def test_cron_task_is_listed_with_its_next_local_fire_time() -> None:
    engine = make_engine()

    @engine.periodic(cron="0 3 * * *", name="nightly_backup")
    async def nightly(ctx: TaskContext) -> None: ...

    async with engine:
        p = info(engine, "nightly_backup")
        assert p.trigger == "cron 0 3 * * *" and p.trigger_kind == "cron" and p.enabled
        assert p.next_due is not None and engine.started_at is not None
        assert p.next_due == next_cron_due("0 3 * * *", engine.started_at)
        assert datetime.fromtimestamp(p.next_due).hour == 3
    assert not stray_tasks()


async def test_initial_delay_and_jitter_defer_the_first_run() -> None:
    engine = make_engine()

    @engine.periodic(every=0.01, initial_delay=30.0)
    async def later(ctx: TaskContext) -> None: ...

    @engine.periodic(every=60.0, jitter=0.5)
    async def spread(ctx: TaskContext) -> None: ...

    async with engine:
        assert engine.started_at is not None
        p = info(engine, "later")
        assert p.next_due == pytest.approx(engine.started_at + 30.0, abs=1.0)
        assert p.runs == 0
        # jitter applies to the first tick too, so nodes started together spread out
        spread_due = info(engine, "spread").next_due
        assert spread_due is not None
        assert engine.started_at <= spread_due <= engine.started_at + 30.0 + 1.0
        assert info(engine, "spread").jitter == 0.5


async def test_a_periodic_task_added_while_running_starts_at_once() -> None:
    engine = make_engine()
    rec = Recorder(engine, ("periodic.registered",))
    async with engine:

        @engine.periodic(every=60.0)
        async def late(ctx: TaskContext) -> None: ...

        await eventually(lambda: info(engine, "late").runs == 1)
        assert [e.name for e in rec.of("periodic.registered")] == ["late"]
    assert not stray_tasks()


# ---------------------------------------------------------------- the loop: overlap, failures, pause


async def test_a_slow_run_is_not_overlapped_and_skipped_ticks_are_counted() -> None:
    engine = make_engine()
    release = asyncio.Event()
    started = 0

    @engine.periodic(every=0.02, fixed_rate=True)
    async def slow(ctx: TaskContext) -> None:
        nonlocal started
        started += 1
        await release.wait()

    rec = Recorder(engine, ("periodic.skipped",))
    async with engine:
        await eventually(lambda: info(engine, "slow").skipped >= 3)
        p = info(engine, "slow")
        assert started == 1 and p.runs == 1
        assert p.running_run_id is not None
        # fixed rate: the next tick stays scheduled while the run goes on
        assert p.next_due is not None
        skipped = rec.of("periodic.skipped")
        assert {(e.running_run_id, e.reason) for e in skipped} == {(p.running_run_id, "overlap")}
        assert [e.skipped_total for e in skipped[:3]] == [1, 2, 3] and p.refused == 0
        release.set()
        await eventually(lambda: info(engine, "slow").runs >= 2)
    assert not stray_tasks()


async def test_end_based_interval_waits_for_the_run_to_end() -> None:
    engine = make_engine()
    release = asyncio.Event()

    @engine.periodic(every=30.0)
    async def slow(ctx: TaskContext) -> None:
        await release.wait()

    async with engine:
        await eventually(lambda: info(engine, "slow").running_run_id is not None)
        assert info(engine, "slow").next_due is None  # unknown until the run ends
        release.set()
        await eventually(lambda: info(engine, "slow").next_due is not None)
        [run] = engine.runs(task="slow")
        assert run.finished_at is not None
        assert info(engine, "slow").next_due == run.finished_at + 30.0
        assert info(engine, "slow").skipped == 0


async def test_a_failing_run_does_not_stop_later_runs_and_is_counted() -> None:
    engine = make_engine()
    calls = 0

    @engine.periodic(every=0.01)
    async def flaky(ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1
        if calls <= 2:
            raise RuntimeError(f"boom {calls}")

    async with engine:
        await eventually(lambda: info(engine, "flaky").runs >= 4)
        await eventually(lambda: info(engine, "flaky").last_status == "succeeded")
        p = info(engine, "flaky")
        assert p.failures == 2
        failed = engine.runs(RunStatus.FAILED, task="flaky")
        assert len(failed) == 2 and all(r.source == "periodic:flaky" for r in failed)
        assert failed[0].error is not None and "boom" in failed[0].error.message
    assert not stray_tasks()


async def test_pause_and_resume_with_events() -> None:
    engine = make_engine()
    counts = {"paused": 0, "witness": 0}

    @engine.periodic(every=0.01, name="paused")
    async def one(ctx: TaskContext) -> None:
        counts["paused"] += 1

    @engine.periodic(every=0.01, name="witness")
    async def two(ctx: TaskContext) -> None:
        counts["witness"] += 1

    rec = Recorder(engine, ("periodic.paused", "periodic.resumed"))
    async with engine:
        await eventually(lambda: counts["paused"] >= 1)
        p = engine.pause_periodic("paused")
        assert p.paused and p.next_due is None
        assert [e.name for e in rec.of("periodic.paused")] == ["paused"]
        before = counts["paused"]
        # the witness ticks at the same rate: several of its runs without one of ours
        witness = counts["witness"]
        await eventually(lambda: counts["witness"] >= witness + 4)
        assert counts["paused"] == before
        assert info(engine, "paused").next_due is None
        # pausing twice is harmless and says nothing more
        engine.pause_periodic("paused")
        assert len(rec.of("periodic.paused")) == 1

        p = engine.resume_periodic("paused")
        assert not p.paused and p.next_due is not None
        [resumed] = rec.of("periodic.resumed")
        assert resumed.name == "paused" and resumed.next_due == p.next_due
        await eventually(lambda: counts["paused"] > before)

        with pytest.raises(UnknownPeriodic, match="paused, witness"):
            engine.pause_periodic("nope")
        with pytest.raises(UnknownPeriodic):
            engine.resume_periodic("nope")
    assert not stray_tasks()


async def test_stop_cancels_every_loop_and_leaves_no_task_behind() -> None:
    engine = make_engine()
    started = asyncio.Event()

    @engine.periodic(every=0.01, fixed_rate=True)
    async def forever(ctx: TaskContext) -> None:
        started.set()
        await asyncio.Event().wait()

    @engine.periodic(cron="0 3 * * *")
    async def nightly(ctx: TaskContext) -> None: ...

    await engine.start()
    await asyncio.wait_for(started.wait(), 1.0)
    await engine.stop(timeout=0.05)
    assert not stray_tasks()
    assert all(p.next_due is None for p in engine.schedule())
    [run] = engine.runs(task="forever")
    assert run.status is RunStatus.CANCELLED
    await eventually(lambda: info(engine, "forever").last_status == "cancelled")


async def test_due_times_follow_the_engine_clock() -> None:
    engine = make_engine(clock=lambda: 50_000.0)

    @engine.periodic(every=60.0, initial_delay=5.0)
    async def tick(ctx: TaskContext) -> None: ...

    async with engine:
        assert info(engine, "tick").next_due == 50_005.0
        assert engine.pause_periodic("tick").next_due is None
        assert engine.resume_periodic("tick").next_due == 50_060.0  # fresh: one interval from now
    assert not stray_tasks()


# ---------------------------------------------------------------- ticks that submit nothing


@pytest.mark.parametrize("durable", [False, True], ids=["memory", "sqlite"])
async def test_a_tick_refused_by_a_full_queue_waits_an_interval_and_the_task_runs_again(
    durable: bool, tmp_path: Path
) -> None:
    # end-based: the interval after a refused tick counts from then, not again from the
    # end of the run before it (which gave the same slot back, refused, in a busy loop)
    store = {"store": f"sqlite:///{tmp_path / 'runs.db'}"} if durable else {}
    engine = make_engine(max_concurrency=1, max_queue=1, **store)
    release = asyncio.Event()
    every = 0.05

    @engine.periodic(every=every)
    async def tick(ctx: TaskContext) -> None: ...

    @engine.task
    async def block(ctx: TaskContext) -> None:
        await release.wait()

    rec = Recorder(engine, ("periodic.skipped",))
    async with engine:
        await eventually(lambda: info(engine, "tick").runs >= 1)
        await eventually(lambda: info(engine, "tick").running_run_id is None)
        await engine.submit("block")
        await eventually(lambda: engine.stats().by_status["running"] == 1)
        await engine.submit("block")  # the queue's one place is taken
        await eventually(lambda: len(rec.of("periodic.skipped")) >= 3)
        runs = info(engine, "tick").runs
        skipped = rec.of("periodic.skipped")
        gaps = [b.ts - a.ts for a, b in zip(skipped, skipped[1:])]
        assert min(gaps) >= every / 2, f"refused ticks came back at once: {gaps}"
        release.set()
        await eventually(lambda: info(engine, "tick").runs >= runs + 2)
    assert not stray_tasks()


async def test_a_fixed_rate_tick_that_fired_late_does_not_fire_again_at_once() -> None:
    engine = make_engine()
    every = 0.2
    fired: list[float] = []
    first = asyncio.Event()

    @engine.periodic(every=every, fixed_rate=True)
    async def tick(ctx: TaskContext) -> None:
        fired.append(time.monotonic())
        first.set()

    async with engine:
        await asyncio.wait_for(first.wait(), 2.0)
        # hold the event loop up past several slots: the next tick fires late, once
        time.sleep(3 * every)
        held = len(fired)
        await eventually(lambda: len(fired) >= held + 2)
        late, following = fired[held], fired[held + 1]
        assert following - late >= every / 4, "a late tick fired twice in a burst"
    assert not stray_tasks()


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_nodes_sharing_a_store_never_overlap_runs_of_one_periodic_task(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # each node counts its interval from the end of the task's last run on any node, which
    # it follows; the store also holds a node back while another node's run of the task
    # is still going, whatever that node knows of it
    db = f"sqlite:///{tmp_path / 'shared.db'}" if backend == "sqlite" else request.getfixturevalue("postgres_url")
    spans: list[tuple[float, float, str]] = []
    engines = [make_engine(store=db, node_id=f"node-{n}") for n in "ab"]
    for engine in engines:

        @engine.periodic(every=0.1, name="compact")
        async def compact(ctx: TaskContext) -> None:
            start = time.monotonic()
            await asyncio.sleep(0.3)
            spans.append((start, time.monotonic(), ctx.node_id))

    recorders = [Recorder(engine, ("periodic.skipped",)) for engine in engines]
    for engine in engines:
        await engine.start()

    def shown_going() -> set[str | None]:
        return {info(engine, "compact").running_run_id for engine in engines}

    try:
        # while one node's run goes, both nodes' schedules name it (not only its own node's)
        await eventually(lambda: len(shown_going()) == 1 and None not in shown_going(), timeout=10.0)
        await eventually(lambda: len(spans) >= 4, timeout=10.0)
    finally:
        for engine in engines:
            await engine.stop()
    spans.sort()
    overlaps = [(a, b) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert overlaps == [], overlaps
    # no slot comes due while a run goes (every node follows it); a tick that found one going
    # all the same passed, counted, naming it
    skipped = [e for rec in recorders for e in rec.of("periodic.skipped")]
    assert all(e.running_run_id for e in skipped)
    assert not stray_tasks()


async def test_a_node_without_a_periodic_tasks_resource_leaves_its_runs_to_a_node_that_has_it(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    release = asyncio.Event()
    has = make_engine(store=db, node_id="has-redis", max_concurrency=1, resources={"redis": "client"})
    lacks = make_engine(store=db, node_id="lacks-redis", max_concurrency=2)
    for engine in (has, lacks):

        @engine.task(name="hold")
        async def hold(ctx: TaskContext) -> None:
            await release.wait()

        @engine.task(name="where")
        async def where(ctx: TaskContext) -> str:
            return ctx.node_id

        @engine.periodic(every=0.2, name="digest", requires=("redis",))
        async def digest(ctx: TaskContext, redis: str) -> str:
            return f"{ctx.node_id} with {redis}"

    has.pause_periodic("digest")
    await has.start()
    try:
        # the only node with the resource is busy when the periodic run comes due
        busy = await has.submit("hold")
        await eventually(lambda: has.get(busy.id).status is RunStatus.RUNNING)
        await lacks.start()
        assert info(lacks, "digest").reason == "missing resource: redis"
        has.resume_periodic("digest")
        due = await eventually(lambda: has.runs(task="digest", limit=1))
        digest_id = due[0].id
        # the other node claims oldest first: the due digest run comes before this one
        later = await lacks.submit("where")
        assert (await later.wait()).result == "lacks-redis"
        assert (await lacks.fetch_run(digest_id)).status is RunStatus.PENDING
        release.set()
        done = await has.wait_for(digest_id)
        assert (done.status, done.result) == (RunStatus.SUCCEEDED, "has-redis with client")
    finally:
        release.set()
        await lacks.stop()
        await has.stop()
    assert not stray_tasks()


async def finished_in_the_store(engine: Engine, run_id: str) -> bool:
    """Wait (bounded) until ``run_id`` has finished in ``engine``'s store; False once it is gone
    from it."""
    for _ in range(10_000):
        stored = await engine.store.get(run_id)
        if stored is None:
            return False
        if stored.status.finished:
            return True
        await asyncio.sleep(0.001)
    raise AssertionError(f"run {run_id} never finished in the store")


async def pruned_from_the_store(engine: Engine, run_id: str) -> None:
    """Prune ``run_id`` from ``engine``'s store as soon as it has finished there, as a store whose
    history or retention is short does before other nodes read how it ended."""
    if await finished_in_the_store(engine, run_id):
        await engine.store.prune(keep=0)


def job_node(db: str, name: str, ran: list[str], release: asyncio.Event, **options: Any) -> Engine:
    """A node of a cluster on ``db`` whose periodic task ``job`` notes where it ran, then
    holds its run until ``release`` is set."""
    engine = make_engine(store=db, node_id=name)

    @engine.periodic(name="job", **options)
    async def job(ctx: TaskContext) -> None:
        ran.append(ctx.node_id)
        await release.wait()

    return engine


@contextlib.asynccontextmanager
async def job_going_on_a(
    tmp_path: Path, scheduled_on: str, **options: Any
) -> AsyncIterator[tuple[Engine, Engine, list[str], asyncio.Event, str]]:
    """Nodes a and b sharing a SQLite file, with the periodic task ``job`` (``options``): a fired
    its first run, which holds until the event yielded is set, and then b started. Only the
    node ``scheduled_on`` fires the task from then on (a, or b from a's first run on); yields
    a, b, where the task ran, that event and the first run's id. Both are stopped at the end."""
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    release = asyncio.Event()
    ran: list[str] = []
    a, b = (job_node(db, name, ran, release, **options) for name in ("a", "b"))
    if scheduled_on == "a":
        b.pause_periodic("job")  # b runs the task only by hand
    await a.start()
    try:
        await eventually(lambda: ran == ["a"])
        first = info(a, "job").running_run_id
        assert first is not None
        if scheduled_on == "b":
            a.pause_periodic("job")
        await b.start()
        yield a, b, ran, release, first
    finally:
        release.set()
        await b.stop()
        await a.stop()
    assert not stray_tasks()


@pytest.mark.parametrize("fixed_rate", [True, False], ids=["fixed_rate", "end_based"])
async def test_a_node_takes_up_a_periodic_task_whose_run_it_took_up_from_another_node_was_pruned(
    fixed_rate: bool, tmp_path: Path
) -> None:
    # b starts while a runs the task, and takes that run up as going. It ended on a and left
    # the store before b read how: b skipped every slot for it from then on (fixed rate), or
    # waited on it, failing every second with RunNotFound (end-based), so the task never ran
    async with job_going_on_a(tmp_path, "b", every=0.1, fixed_rate=fixed_rate) as (a, b, ran, release, first):
        assert info(b, "job").running_run_id == first
        release.set()
        await pruned_from_the_store(a, first)
        await eventually(lambda: "b" in ran)
        await eventually(lambda: info(b, "job").runs >= 2)
        assert info(b, "job").running_run_id != first


async def test_a_run_taken_up_from_another_node_and_pruned_unseen_is_let_go(tmp_path: Path) -> None:
    # b's schedule showed the run going for good, and run_periodic was refused for it
    async with job_going_on_a(tmp_path, "a", every=3600.0) as (a, b, ran, release, first):
        assert info(b, "job").running_run_id == first
        release.set()
        await pruned_from_the_store(a, first)
        # b finds it gone at its next look at the store
        await eventually(lambda: info(b, "job").running_run_id is None)
        # (a stops first: the two share the file, and a's claim could take b's run)
        await a.stop()
        handle = await b.run_periodic("job")
        assert (await handle.wait(timeout=10)).status is RunStatus.SUCCEEDED
        assert ran == ["a", "b"]


async def test_run_periodic_asks_the_store_whether_another_nodes_run_it_took_up_is_still_going(
    tmp_path: Path,
) -> None:
    # b learns of the end of a's run at its next catch-up with the store, up to a second
    # later; till then run_periodic on b was refused, naming a run that had ended
    async with job_going_on_a(tmp_path, "a", every=3600.0) as (a, b, _, release, first):
        release.set()
        assert await finished_in_the_store(a, first)
        handle = await b.run_periodic("job")  # no refusal naming the run that ended
        assert (await handle.wait(timeout=10)).status is RunStatus.SUCCEEDED
        assert info(b, "job").last_run_id == handle.id


async def test_a_node_fires_the_first_slot_after_another_nodes_run_ended_in_the_store(tmp_path: Path) -> None:
    # b took a's run up as going at its start, and hears of its end only at its next catch-up
    # with the store (up to a second later): every slot till then passed with no run on any
    # node, b claiming it and skipping it for a run that had ended
    async with job_going_on_a(tmp_path, "b", every=0.05, fixed_rate=True) as (a, b, ran, release, first):
        rec = Recorder(b, ("periodic.skipped", "run.submitted"))
        await eventually(lambda: rec.of("periodic.skipped"))  # b's slots pass while it goes
        release.set()
        assert await finished_in_the_store(a, first)
        since = len(rec.events)
        await eventually(lambda: "b" in ran)
        later = rec.events[since:]
        # the tick whose look at the store was under way as the run ended may still skip
        assert len([e for e in later if e.kind == "periodic.skipped"]) <= 1, later


async def test_a_node_whose_slot_another_node_fired_counts_its_interval_from_that_nodes_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # b's claim of its slot found it fired by a: b took it that nothing ran for it and counted
    # its next interval from its own tick, so with runs shorter than the interval b's next run
    # started less than an interval after a's run ended
    db = f"sqlite:///{tmp_path / 'shared.db'}"
    release = asyncio.Event()
    ran: list[str] = []
    a, b = (job_node(db, name, ran, release, every=3600.0) for name in ("a", "b"))
    at_claim, a_fired = asyncio.Event(), asyncio.Event()
    claim = b.store.claim_periodic_run

    def after_a(*args: Any, **kwargs: Any) -> asyncio.Future[Any]:
        monkeypatch.setattr(b.store, "claim_periodic_run", claim)  # b's first claim only

        async def claimed() -> Any:
            at_claim.set()
            await a_fired.wait()
            return await claim(*args, **kwargs)

        return asyncio.ensure_future(claimed())

    monkeypatch.setattr(b.store, "claim_periodic_run", after_a)
    await b.start()
    try:
        await asyncio.wait_for(at_claim.wait(), 10.0)  # b's first slot, claimed once a has fired
        await a.start()
        first = await eventually(lambda: info(a, "job").running_run_id)
        a_fired.set()
        # b follows a's run, shown going on b as on a, and counts its interval from its end
        await eventually(lambda: info(b, "job").running_run_id == first)
        assert info(b, "job").next_due is None
        release.set()
        assert await finished_in_the_store(a, first)
        stored = await a.store.get(first)
        assert stored is not None and stored.finished_at is not None
        due = stored.finished_at + 3600.0
        await eventually(lambda: info(b, "job").next_due is not None)
        assert info(b, "job").next_due == due
        assert ran == ["a"] and info(b, "job").runs == 0
    finally:
        release.set()
        await a.stop()
        await b.stop()
    assert not stray_tasks()


async def test_a_node_started_while_another_nodes_run_goes_counts_its_interval_from_that_runs_end(
    tmp_path: Path,
) -> None:
    # b took a's run up as going at its start, yet planned its first slot an interval after
    # the slot that run fired for: a run longer than that was skipped, a shorter one was
    # followed by b's run less than an interval after it ended
    async with job_going_on_a(tmp_path, "b", every=3600.0) as (a, b, ran, release, first):
        assert info(b, "job").running_run_id == first
        assert info(b, "job").next_due is None
        release.set()
        assert await finished_in_the_store(a, first)
        stored = await a.store.get(first)
        assert stored is not None and stored.finished_at is not None
        await eventually(lambda: info(b, "job").next_due is not None)
        assert info(b, "job").next_due == stored.finished_at + 3600.0
        assert ran == ["a"]
