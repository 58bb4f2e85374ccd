"""The public API at its edges: next_cron_due as exported and documented, the
advice of EngineCrashed followed, a crashed loop reported once, unknown queue and trigger
names looked up, the advice of QueueFull and InvalidProgress, staleness_min given without
staleness, and the wording of messages a user reads.

Real engines, real threads, real SQLite files and a real child process; waits are bounded.
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
import sys
import textwrap
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    Engine,
    EngineCrashed,
    EngineLoopClosed,
    InvalidConfiguration,
    InvalidProgress,
    JobNotSerializable,
    QueueFull,
    RunStatus,
    StoppedBeforeDone,
    TaskContext,
    UnknownQueue,
    UnknownTrigger,
)
from taskwatch.engine.store import NewRun, SqliteStore

from .helpers import eventually, taskwatch_threads

REPO = Path(__file__).resolve().parent.parent
TIMEOUT = 10.0


def make_engine(**options: Any) -> Engine:
    options.setdefault("health_interval", None)
    return Engine(**options)


async def nothing(ctx: TaskContext, key: str) -> None:
    return None


# ------------------------------------------------------------ next_cron_due, as the README has it


BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
# the night Berlin's clocks jump from 02:00 to 03:00
SPRING_MIDNIGHT = datetime.datetime(2024, 3, 31, 0, 0, tzinfo=BERLIN).timestamp()


def test_next_cron_due_is_exported_and_takes_a_zone_by_name() -> None:
    from taskwatch.engine import next_cron_due

    by_name = next_cron_due("30 2 * * *", SPRING_MIDNIGHT, tz="Europe/Berlin")
    assert by_name == next_cron_due("30 2 * * *", SPRING_MIDNIGHT, tz=BERLIN)
    # the skipped 02:30 runs as late as the clocks jumped, as documented
    assert datetime.datetime.fromtimestamp(by_name, BERLIN) == datetime.datetime(2024, 3, 31, 3, 30, tzinfo=BERLIN)
    assert next_cron_due("0 12 * * *", SPRING_MIDNIGHT, tz="UTC") == datetime.datetime(
        2024, 3, 31, 12, 0, tzinfo=datetime.timezone.utc
    ).timestamp()


@pytest.mark.parametrize(
    ("args", "kwargs", "said"),
    [
        (("30 2 * * *", SPRING_MIDNIGHT), {"tz": "Europe/Berlinn"}, r"tz='Europe/Berlinn': no time zone has that name"),
        (("30 2 * * *", SPRING_MIDNIGHT), {"tz": ""}, r"tz='': no time zone has that name"),
        (("30 2 * * *", SPRING_MIDNIGHT), {"tz": 2}, r"tz=2: not a time zone nor a zone name \(got int\)"),
        (("30 2 * * *", datetime.datetime(2024, 3, 31)), {}, r"after=datetime.*pass its \.timestamp\(\)"),
        (("30 2 * * *", "1711836000"), {}, r"after='1711836000': not UNIX seconds \(got str\)"),
        (("30 2 * * *", True), {}, r"after=True: not UNIX seconds \(got bool\)"),
        (("30 2 * * *", float("nan")), {}, r"after=nan: not a finite number"),
        (("30 2 * * *", SPRING_MIDNIGHT * 1000), {}, r"not milliseconds"),
        (("30 2 * * *", SPRING_MIDNIGHT), {"fired": "x"}, r"fired='x': not UNIX seconds"),
        (("61 2 * * *", SPRING_MIDNIGHT), {}, r"expr='61 2 \* \* \*' does not parse"),
        ((None, SPRING_MIDNIGHT), {}, r"expr=None: a cron expression is a str"),
    ],
)
def test_next_cron_due_refuses_what_it_cannot_read_saying_what_it_takes(
    args: tuple[Any, ...], kwargs: dict[str, Any], said: str
) -> None:
    from taskwatch.engine import next_cron_due

    with pytest.raises(InvalidConfiguration, match=said) as refused:
        next_cron_due(*args, **kwargs)
    assert "next_cron_due()" in str(refused.value)


def test_next_cron_due_names_every_bad_argument_at_once() -> None:
    from taskwatch.engine import next_cron_due

    with pytest.raises(InvalidConfiguration) as refused:
        next_cron_due("0 3 * * *", datetime.datetime(2024, 1, 1), tz="Nowhere/City")
    assert [p.split(":")[0] for p in refused.value.problems] == [
        "after=datetime.datetime(2024, 1, 1, 0, 0)",
        "tz='Nowhere/City'",
    ]


# ------------------------------------------------------------ a crashed background loop


def crashing_engine() -> Engine:
    engine = make_engine(cancel_grace=1.0)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    return engine


def crash(engine: Engine, bg: Any) -> None:
    """End ``bg``'s loop as a user's callback can: a SystemExit raised on it, inside a run's task."""

    def exits(event: Any) -> None:
        raise SystemExit("from a callback")

    unsubscribe = engine.bus.add_callback(exits, kinds=["run.succeeded"])
    try:
        bg.submit("quick")
    except BaseException:  # noqa: BLE001 - the crash may already answer the submit itself
        pass
    bg.thread.join(TIMEOUT)
    assert not bg.thread.is_alive() and bg.state == "failed"
    unsubscribe()


def test_the_advice_of_engine_crashed_works_when_followed() -> None:
    engine = crashing_engine()
    bg = engine.start_background()
    crash(engine, bg)
    with pytest.raises(EngineCrashed) as caught:
        bg.submit("quick")
    advice = str(caught.value)
    assert "SystemExit: from a callback" in advice
    assert "engine.start_background()" in advice and "new engine" not in advice
    # as it says: the same engine starts again, and the BackgroundEngine it returns serves
    again = engine.start_background()
    try:
        assert again.submit("quick").wait(TIMEOUT).status is RunStatus.SUCCEEDED
        with pytest.raises(EngineCrashed):
            bg.submit("quick")  # the crashed facade stays refused, as the advice says
    finally:
        again.stop(timeout=0)


CRASH_CHILD = textwrap.dedent(
    """
    import asyncio, gc, sys
    from taskwatch.engine import Engine, TaskContext

    engine = Engine(health_interval=None, cancel_grace=1.0)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    bg = engine.start_background()
    bg.submit("slow")
    def exits(event):
        raise SystemExit("from a callback")
    engine.bus.add_callback(exits, kinds=["run.succeeded"])
    try:
        bg.submit("quick")
    except BaseException:
        pass
    bg.thread.join(10)
    print("state", bg.state, flush=True)
    del bg
    gc.collect()
    print("collected", flush=True)
    """
)


def test_a_crashed_loop_is_reported_once_not_again_as_a_task_exception_never_retrieved() -> None:
    child = subprocess.run(
        [sys.executable, "-c", CRASH_CHILD], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr
    assert "state failed" in child.stdout and "collected" in child.stdout
    # the crash itself is reported, with its traceback, once
    assert child.stderr.count("the background engine's event loop died: SystemExit: from a callback") == 1
    assert child.stderr.count(", in exits\n") == 1  # the callback's frame: one traceback
    assert "never retrieved" not in child.stderr


# ------------------------------------------------------------ unknown queue and trigger names


async def test_get_queue_and_get_trigger_refuse_an_unknown_name_naming_the_known_ones() -> None:
    engine = make_engine()

    async def handle(job: Any) -> None:
        return None

    mail = engine.queue("mail", handle)
    compile = engine.trigger("compile", nothing, size_threshold=5)
    assert engine.get_queue("mail") is mail and engine.get_trigger("compile") is compile
    with pytest.raises(UnknownQueue, match=r"no queue named 'mial'.*Known queues: mail") as queue:
        engine.get_queue("mial")
    assert isinstance(queue.value, LookupError) and not isinstance(queue.value, KeyError)
    with pytest.raises(UnknownTrigger, match=r"no trigger named 'compil'.*Known triggers: compile") as trigger:
        engine.get_trigger("compil")
    assert isinstance(trigger.value, LookupError) and not isinstance(trigger.value, KeyError)
    # and nothing was made by the look-up
    assert [q.name for q in engine.queues()] == ["mail"] and [t.name for t in engine.triggers()] == ["compile"]


# ------------------------------------------------------------ the advice a full queue gives


@pytest.mark.parametrize(
    ("durable", "said"),
    [(False, "the engine's run queue is full (1 item waiting)"), (True, "the run queue shared by every node")],
)
async def test_a_full_run_queue_names_the_max_queue_option_that_raises_its_limit(
    tmp_path: Path, durable: bool, said: str
) -> None:
    store = {"store": f"sqlite:///{tmp_path / 'runs.db'}"} if durable else {}
    engine = make_engine(max_queue=1, max_concurrency=1, **store)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    async with engine:
        try:
            await engine.submit("hold")
            await eventually(lambda: engine.stats().running == 1, timeout=TIMEOUT)
            await engine.submit("hold")
            with pytest.raises(QueueFull) as full:
                await engine.submit("hold")
        finally:
            gate.set()
    assert said in str(full.value)
    assert "Engine(max_queue=...)" in str(full.value)


async def test_a_full_work_queue_names_its_maxsize() -> None:
    engine = make_engine()

    async def handle(job: Any) -> None:
        return None

    queue = engine.queue("mail", handle, maxsize=1)
    queue.put_nowait(1)  # not started: nothing takes it
    with pytest.raises(QueueFull) as full:
        queue.put_nowait(2)
    assert "queue 'mail' is full" in str(full.value) and "maxsize=" in str(full.value)
    assert "max_queue" not in str(full.value)


# ------------------------------------------------------------ the advice of InvalidProgress


async def test_invalid_progress_advises_on_what_was_wrong() -> None:
    engine = make_engine()
    said: dict[str, str] = {}

    @engine.task
    async def reports(ctx: TaskContext) -> None:
        for name, args in (("message", (1, 2, 5)), ("number", (True, 2)), ("both", (1, float("inf"), 5))):
            try:
                await ctx.progress(*args)
            except InvalidProgress as exc:
                said[name] = str(exc)

    async with engine:
        assert (await (await engine.submit("reports")).wait(TIMEOUT)).status is RunStatus.SUCCEEDED
    assert "message should be a valid string" in said["message"]
    assert "report the message as text (a str)" in said["message"]
    assert "finite numbers" not in said["message"]
    assert "report done and total as finite numbers," in said["number"]
    assert "report done and total as finite numbers and the message as text (a str)" in said["both"]


# ------------------------------------------------------------ staleness_min without staleness


def test_staleness_min_given_as_one_without_staleness_is_refused_too() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration, match=r"staleness_min=1:.*no staleness="):
        engine.trigger("compile", nothing, size_threshold=5, staleness_min=1)
    assert engine.triggers() == []
    # left out it is 1, with staleness or without
    assert engine.trigger("compile", nothing, size_threshold=5).staleness_min == 1
    assert engine.trigger("stale", nothing, size_threshold=5, staleness=60).staleness_min == 1
    assert engine.trigger("given", nothing, size_threshold=5, staleness=60, staleness_min=1).staleness_min == 1
    with pytest.raises(InvalidConfiguration, match=r"staleness_min=0"):
        engine.trigger("zero", nothing, size_threshold=5, staleness=60, staleness_min=0)


# ------------------------------------------------------------ the wording of messages


class Widget:
    pass


def test_a_job_of_a_type_starting_with_a_vowel_reads_an() -> None:
    engine = make_engine()

    async def handle(job: Any) -> None:
        return None

    queue = engine.queue("plain", handle)
    with pytest.raises(JobNotSerializable, match=r"^an object job cannot be put into queue 'plain'"):
        queue.put_nowait(object())
    with pytest.raises(JobNotSerializable, match=r"^a Widget job cannot be put into queue 'plain'"):
        queue.put_nowait(Widget())


class V2(BaseModel):
    n: int
    added: str  # a required field the recorded params (from the model before it) lack


async def test_params_that_no_longer_fit_name_the_params_model_of_the_task(tmp_path: Path) -> None:
    async with SqliteStore(str(tmp_path / "runs.db")) as store:
        [inserted] = await store.insert([NewRun("job", {"n": 1}, max_attempts=1)])
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}")

    @engine.task(params=V2)
    async def job(ctx: TaskContext, params: V2) -> int:
        return params.n

    async with engine:
        record = await engine.handle(inserted.id).wait(timeout=TIMEOUT)
    assert record.error is not None
    assert "no longer fit the params model of task 'job' (added: Field required)" in record.error.message
    assert "''s" not in record.error.message


async def test_a_drain_cut_by_a_stop_counts_one_run_in_the_singular() -> None:
    engine = make_engine()
    started = asyncio.Event()

    async def hold(ctx: TaskContext, key: str) -> None:
        started.set()
        await asyncio.Event().wait()

    compile = engine.trigger("compile", hold, size_threshold=1)
    await engine.start()
    try:
        compile.notify("bank-1")
        await asyncio.wait_for(started.wait(), TIMEOUT)
        draining = asyncio.ensure_future(compile.drain())
    finally:
        await engine.stop(timeout=0)
    with pytest.raises(StoppedBeforeDone) as stopped:
        await asyncio.wait_for(draining, TIMEOUT)
    assert "the engine stopped before the 1 run of trigger 'compile' finished" in str(stopped.value)


# ------------------------------------------------------------ a key is per task, as the README says


async def test_a_key_holds_back_a_second_run_of_the_same_task_only() -> None:
    engine = make_engine(max_concurrency=1)
    gate = asyncio.Event()

    @engine.task
    async def first(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.task
    async def other(ctx: TaskContext) -> None:
        return None

    async with engine:
        await engine.submit("first")
        await eventually(lambda: engine.stats().running == 1)
        a = await engine.submit("other", key="bank-42")
        again = await engine.submit("other", key="bank-42")
        elsewhere = await engine.submit("first", key="bank-42")
        assert again.id == a.id and elsewhere.id != a.id
        gate.set()
        for handle in (a, elsewhere):
            assert (await handle.wait(TIMEOUT)).status is RunStatus.SUCCEEDED



def test_an_engine_whose_event_loop_closed_without_a_stop_refuses_work_and_its_stop_tidies_up(tmp_path: Path) -> None:
    # asyncio.run(engine.start()) then asyncio.run(main()): the first loop's end took the engine's
    # loops and runs with it. A submit on the second loop was accepted and never ran, its wait
    # hung, and stop() failed with a bare "Event loop is closed"
    path = tmp_path / "runs.db"
    before = taskwatch_threads()
    engine = Engine(node_id="n1", store=SqliteStore(path), health_interval=None)
    hold = asyncio.Event()

    @engine.task
    async def work(ctx: TaskContext) -> None:
        await hold.wait()

    async def handle(job: dict[str, Any]) -> None:
        await hold.wait()

    queue = engine.queue("jobs", handle)

    async def fire(ctx: TaskContext, key: str) -> None:
        pass

    trigger = engine.trigger("compile", fire, size_threshold=100)

    async def first() -> str:
        await engine.start()
        await queue.put({"n": 0})  # in flight, its handler held: a join has something to wait for
        return (await engine.submit("work")).id

    run_id = asyncio.run(first())
    assert engine.loop_lost
    # said as it is, to a dashboard or a health check as much as to the caller
    assert engine.state == engine.stats().state == "stopped"

    async def second() -> None:
        for refused in (engine.submit("work"), queue.put({"a": 1}), engine.start()):
            with pytest.raises(EngineLoopClosed, match=r"asyncio\.run\(\) return.*build a new Engine"):
                await refused
        with pytest.raises(EngineLoopClosed):
            queue.put_nowait({"a": 1})
        with pytest.raises(EngineLoopClosed):
            trigger.fire("k")
        with pytest.raises(EngineLoopClosed):
            trigger.notify("k")  # counted, it would never fire
        # waits on what was there would wait for good, or return as if it had been done
        for wait in (queue.join(), trigger.drain()):
            with pytest.raises(EngineLoopClosed):
                await asyncio.wait_for(wait, TIMEOUT)
        assert engine.get(run_id).status is not RunStatus.SUCCEEDED  # what it knew still reads
        await engine.stop()
        assert engine.state == "stopped"
        assert taskwatch_threads() <= before  # the store's thread joined
        await engine.stop()  # again: nothing left to do
        with pytest.raises(EngineLoopClosed):
            await engine.start()

    asyncio.run(second())
    with pytest.raises(EngineLoopClosed):
        engine.start_background()

    # nothing queued is lost: the store kept the run, and the next engine on it takes it back
    again = Engine(node_id="n1", store=SqliteStore(path), health_interval=None)

    @again.task
    async def work(ctx: TaskContext) -> str:  # noqa: F811 - the same task, in the next engine
        return "done"

    async def third() -> Any:
        async with again:
            return await again.handle(run_id).wait(TIMEOUT)

    record = asyncio.run(third())
    assert record.status is RunStatus.SUCCEEDED and record.result == "done"
