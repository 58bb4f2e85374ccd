"""A stop drains queues and runs that feed each other, and never destroys a job it cut short.

- a queue handler that catches the stop's cancel and returns (or raises something else from
  its cleanup) leaves its job undone, as when the cancel goes through: counted neither
  processed nor failed, kept in a durable store and handled at the next start;
- work the engine runs (a queue's handler, a run, a thread or task either starts) may still
  put into a queue and submit runs while the stop drains: a pipeline of queues, in either
  order of creation, a queue whose handler submits runs, a run that puts into a queue, all
  drain within the stop's timeout; callers outside the engine are refused as before, and so
  is a put into a queue made during the stop (nothing would ever handle it);
- a durable store's stop runs no pending run, so it takes none: a handler or a run that
  submits (and awaits what it submitted) is cut short at once, left undone and kept, and
  handled once at the next start (the stop does not wait out its timeout, nothing runs twice);
  a handler awaiting a run it submitted before the stop, still pending, is told at once
  (StoppedBeforeDone, kept) when no other node is alive on the store, and waits on when one is;
  a run refused a put or a submit by the stop is cut short the same way, not failed;
- with no queue at all, a trigger's key brought due by its run's end inside the stop still
  runs within the stop's timeout (memory store);
- a handler refused a put because its target closed once the drain was over has its job
  left undone (kept, reported in ``queue.drain_incomplete``), not failed and deleted;
- ``Trigger.drain()`` during a stop: a key brought due by a run ending inside the drain fires
  and runs (memory store), or keeps its count for the next start (durable) and drain() says so;
  a key that comes due once the stop takes no more runs makes drain() raise
  ``StoppedBeforeDone`` (its count kept) instead of returning as if all were done;
- a queue handler with a required keyword-only parameter is refused at ``engine.queue()``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    Engine,
    EngineNotRunning,
    RunStatus,
    StoppedBeforeDone,
    TaskContext,
    TaskDefinitionError,
    WorkQueue,
)

from .helpers import Recorder, eventually

#: a stop given this long drains everything these tests queue many times over
LONG = 60.0


class Num(BaseModel):
    n: int


def _engine(store: str, **options: Any) -> Engine:
    return Engine(store=store, node_id="n1", health_interval=None, cancel_grace=0.05, **options)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'stop.db'}"


def _durable(store: str) -> bool:
    return store != "memory"


# ---------------------------------------------------------------- a handler swallowing the stop's cancel


@pytest.mark.parametrize("cleanup", ["returns", "raises"])
async def test_a_handler_that_swallows_the_stops_cancel_leaves_its_job_undone(store: str, cleanup: str) -> None:
    started = asyncio.Event()

    async def handler(job: int) -> None:
        started.set()
        try:
            await asyncio.Event().wait()  # the work, cut short by the stop
        except asyncio.CancelledError:
            if cleanup == "raises":
                raise RuntimeError("the cleanup failed") from None
            return  # closed a connection, say, and returned

    engine = _engine(store)
    rec = Recorder(engine, ("queue.drain_incomplete", "queue.job_failed"))
    q = engine.queue("q", handler)
    await engine.start()
    await q.put(1)
    await asyncio.wait_for(started.wait(), 10)
    await engine.stop(timeout=0)

    info = q.info()
    assert (info.processed, info.failed, info.abandoned) == (0, 0, 1)
    assert rec.of("queue.job_failed") == []
    [event] = rec.of("queue.drain_incomplete")
    assert event.left == 1 and event.kept is _durable(store)
    assert info.kept == (1 if _durable(store) else 0)

    if not _durable(store):
        return
    # kept means kept: the next start takes the job up and handles it
    again = _engine(store)
    done: list[Any] = []

    async def finish(job: int) -> None:
        done.append(job)

    q2 = again.queue("q", finish)
    async with again:
        await q2.join(10)
    assert done == [1] and q2.info().adopted == 1


# ---------------------------------------------------------------- queues and runs feeding each other


@pytest.mark.parametrize("down_first", [True, False])
async def test_a_pipeline_of_queues_drains_through_at_stop(store: str, down_first: bool) -> None:
    finished: list[int] = []
    go = asyncio.Event()

    async def down_h(job: int) -> None:
        finished.append(job)

    async def up_h(job: int) -> None:
        await go.wait()  # every put into down is made during the stop
        await down.put(job)

    engine = _engine(store)
    rec = Recorder(engine, ("queue.drain_incomplete", "queue.job_failed"))
    if down_first:
        down = engine.queue("down", down_h)
        up = engine.queue("up", up_h)
    else:
        up = engine.queue("up", up_h)
        down = engine.queue("down", down_h)
    await engine.start()
    for i in range(5):
        await up.put(i)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await stopping

    assert sorted(finished) == [0, 1, 2, 3, 4]
    assert (up.info().processed, up.info().failed, down.info().processed) == (5, 0, 5)
    assert rec.events == []
    if _durable(store):
        # nothing left in the store: the next start has nothing to take up
        again = _engine(store)
        seen: list[int] = []

        async def record(job: int) -> None:
            seen.append(job)

        up2, down2 = again.queue("up", record), again.queue("down", record)
        async with again:
            pass
        assert (up2.info().adopted, down2.info().adopted, seen) == (0, 0, [])


async def test_a_handlers_thread_may_still_put_while_the_stop_drains() -> None:
    """What a handler starts is the engine's work too: a thread of ``asyncio.to_thread``
    (which runs in a copy of the handler's context) puts into the next queue."""
    finished: list[int] = []

    async def down_h(job: int) -> None:
        finished.append(job)

    async def up_h(job: int) -> None:
        await asyncio.to_thread(down.put_nowait, job)

    engine = _engine("memory")
    down = engine.queue("down", down_h)
    up = engine.queue("up", up_h)
    await engine.start()
    for i in range(3):
        up.put_nowait(i)
    await engine.stop(timeout=LONG)
    assert sorted(finished) == [0, 1, 2] and up.info().failed == 0


async def test_a_queue_whose_handler_submits_runs_drains_at_stop(store: str) -> None:
    ran: list[int] = []
    engine = _engine(store)

    @engine.task()
    async def work(ctx: TaskContext, p: Num) -> None:
        ran.append(p.n)

    go = asyncio.Event()

    async def handler(job: int) -> None:
        await go.wait()  # every submit is made during the stop
        await engine.submit("work", {"n": job})

    q = engine.queue("q", handler)
    rec = Recorder(engine, ("queue.job_failed",))
    await engine.start()
    for i in range(5):
        await q.put(i)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await stopping

    assert q.info().failed == 0 and rec.events == []
    if not _durable(store):
        assert q.info().processed == 5
        assert sorted(ran) == [0, 1, 2, 3, 4]  # run within the drain
        return
    # a durable stop runs no pending run, so it takes none: each job is left undone, kept, and
    # handled (its run submitted and run) at the next start, once
    assert (q.info().processed, q.info().abandoned, q.info().kept) == (0, 5, 5)
    assert ran == []
    again = _engine(store)

    async def handler_again(job: int) -> None:
        await again.submit("work", {"n": job})

    again.queue("q", handler_again)

    @again.task(name="work")
    async def work_again(ctx: TaskContext, p: Num) -> None:
        ran.append(p.n)

    async with again:
        await eventually(lambda: len(ran) == 5)
    assert sorted(ran) == [0, 1, 2, 3, 4]


async def test_a_run_may_put_into_a_queue_while_the_stop_drains() -> None:
    engine = _engine("memory")
    release = asyncio.Event()
    going = asyncio.Event()
    handled: list[str] = []

    async def handler(job: str) -> None:
        handled.append(job)

    q = engine.queue("q", handler)

    @engine.task()
    async def feed(ctx: TaskContext) -> None:
        going.set()
        await release.wait()
        await q.put("from a run")

    await engine.start()
    handle = await engine.submit("feed")
    await asyncio.wait_for(going.wait(), 10)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    # a caller outside the engine is refused, as before
    with pytest.raises(EngineNotRunning):
        q.put_nowait("from outside")
    with pytest.raises(EngineNotRunning):
        await engine.submit("feed")
    release.set()
    await stopping
    assert handled == ["from a run"]
    assert (await handle.wait()).status.value == "succeeded"


async def test_a_paused_queue_does_not_hold_the_drain_of_the_others() -> None:
    engine = _engine("memory")
    rec = Recorder(engine, ("queue.drain_incomplete",))
    done: list[int] = []

    async def handler(job: int) -> None:
        done.append(job)

    paused = engine.queue("paused", handler)
    busy = engine.queue("busy", handler)
    await engine.start()
    engine.pause_queue("paused")
    for i in range(3):
        paused.put_nowait(i)
        busy.put_nowait(10 + i)
    # bounded: a drain waiting on the paused queue's jobs would take the whole LONG timeout
    await asyncio.wait_for(engine.stop(timeout=LONG), LONG / 3)
    assert sorted(done) == [10, 11, 12]
    [event] = rec.of("queue.drain_incomplete")
    assert (event.queue, event.left) == ("paused", 3)


async def test_a_job_refused_work_once_the_drain_is_over_is_left_undone(store: str) -> None:
    """``down`` (made first) closes before ``up``: the put of ``up``'s handler, still going past
    the deadline, is refused. That job did not fail: the stop cut it short, and keeps it."""
    down_going, up_going, go = asyncio.Event(), asyncio.Event(), asyncio.Event()
    finished: list[Any] = []

    async def down_h(job: Any) -> None:
        if job == "blocker":
            down_going.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                go.set()  # down is closing now: up's handler goes on and puts into it
                raise
        finished.append(job)

    async def up_h(job: int) -> None:
        up_going.set()
        await go.wait()
        await down.put(job)

    engine = _engine(store)
    rec = Recorder(engine, ("queue.drain_incomplete", "queue.job_failed"))
    down = engine.queue("down", down_h)
    up = engine.queue("up", up_h)
    await engine.start()
    await down.put("blocker")
    await up.put(7)
    await asyncio.wait_for(down_going.wait(), 10)
    await asyncio.wait_for(up_going.wait(), 10)
    await engine.stop(timeout=0)

    assert rec.of("queue.job_failed") == []
    assert (up.info().failed, up.info().processed, up.info().abandoned) == (0, 0, 1)
    drains = {e.queue: e for e in rec.of("queue.drain_incomplete")}
    assert drains["up"].left == 1 and drains["up"].kept is _durable(store)
    with pytest.raises(StoppedBeforeDone):
        await up.join(1)
    if not _durable(store):
        return
    again = _engine(store)

    async def down_again(job: Any) -> None:
        finished.append(job)

    async def up_again(job: int) -> None:
        await down2.put(job)

    down2 = again.queue("down", down_again)
    up2 = again.queue("up", up_again)
    async with again:
        await eventually(lambda: 7 in finished)
    assert up2.info().adopted == 1 and up2.info().failed == 0


# ---------------------------------------------------------------- triggers during the stop


async def _due_again_during_the_stop(engine: Engine, ran: list[str]) -> tuple[Any, asyncio.Task[None]]:
    """A key whose run is going when the stop begins and which notifies bring due again meanwhile:
    the run ends inside the stop's drain. Returns the trigger and a drain() begun before the stop."""
    release = asyncio.Event()
    going = asyncio.Event()

    async def fn(ctx: TaskContext, key: str) -> None:
        if not ran:
            going.set()
            await release.wait()
        ran.append(key)

    t = engine.trigger("t", fn, size_threshold=2)
    await engine.start()
    t.notify("k", 2)  # fires the first run
    await asyncio.wait_for(going.wait(), 10)
    t.notify("k", 2)  # due again once that run ends
    drain = asyncio.create_task(t.drain())
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    release.set()
    await stopping
    return t, drain


async def test_a_key_due_again_inside_the_drain_runs_there() -> None:
    engine = _engine("memory")
    ran: list[str] = []
    t, drain = await _due_again_during_the_stop(engine, ran)
    await asyncio.wait_for(drain, 10)  # both runs ran: nothing is left undone
    assert ran == ["k", "k"]
    [key] = t.state().keys
    assert (key.count, key.last_status) == (0, "succeeded")


async def test_a_durable_key_due_again_inside_the_drain_waits_in_the_store(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'trigger.db'}"
    engine = _engine(store)
    ran: list[str] = []
    t, drain = await _due_again_during_the_stop(engine, ran)
    with pytest.raises(StoppedBeforeDone) as raised:
        await asyncio.wait_for(drain, 10)
    assert raised.value.kept
    assert ran == ["k"]  # a durable stop runs no pending run: the key waits for the next start
    [key] = t.state().keys
    assert key.count == 2 and not key.queued  # the first run took its 2 off; the rest keep their count

    again = _engine(store)

    async def fn(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    t2 = again.trigger("t", fn, size_threshold=2)
    async with again:
        await asyncio.wait_for(t2.drain(), 10)
        [key] = t2.state().keys
        assert key.count == 0
    assert ran == ["k", "k"]


async def test_a_key_due_once_the_stop_takes_no_runs_makes_drain_raise(store: str) -> None:
    """A run's cleanup, once the stop cut it, notifies a key to its threshold: no run is taken
    any more, so drain() says the key was left (its count kept), not that all is done."""
    engine = _engine(store)
    going = asyncio.Event()
    fired: list[str] = []

    async def fn(ctx: TaskContext, key: str) -> None:
        fired.append(key)

    t = engine.trigger("t", fn, size_threshold=2)

    @engine.task()
    async def worker(ctx: TaskContext) -> None:
        going.set()
        try:
            await asyncio.Event().wait()
        finally:
            t.notify("k", 2)

    await engine.start()
    await engine.submit("worker")
    await asyncio.wait_for(going.wait(), 10)
    await engine.stop(timeout=0)

    with pytest.raises(StoppedBeforeDone) as raised:
        await asyncio.wait_for(t.drain(), 10)
    assert raised.value.kept
    assert fired == []
    [key] = t.state().keys
    assert key.count == 2 and not key.queued and not key.running
    if not _durable(store):
        return
    # kept means saved: the next start fires it
    again = _engine(store)

    @again.task(name="worker")
    async def worker_again(ctx: TaskContext) -> None:
        pass

    t2 = again.trigger("t", fn, size_threshold=2)
    async with again:
        await eventually(lambda: fired == ["k"])
        await asyncio.wait_for(t2.drain(), 10)


async def test_a_handler_notifying_a_trigger_during_the_drain_fires_its_run() -> None:
    """queue -> trigger -> run: the key a handler brings due while the stop drains fires, and
    its run runs within the stop's timeout (memory store)."""
    engine = _engine("memory")
    ran: list[str] = []
    go = asyncio.Event()

    async def fn(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    t = engine.trigger("t", fn, size_threshold=3)

    async def handler(job: str) -> None:
        await go.wait()
        t.notify(job)

    q = engine.queue("q", handler)
    await engine.start()
    for _ in range(3):
        q.put_nowait("k")
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await stopping
    assert ran == ["k"] and q.info().processed == 3
    [key] = t.state().keys
    assert (key.count, key.last_status) == (0, "succeeded")


# ---------------------------------------------------------------- handler shapes


async def test_a_queue_handler_with_a_required_keyword_only_parameter_is_refused() -> None:
    engine = _engine("memory")

    async def needs_db(job: Any, *, db: Any) -> None: ...

    async def with_ctx(ctx: TaskContext, job: Any, *, db: Any) -> None: ...

    for handler in (needs_db, with_ctx):
        with pytest.raises(TaskDefinitionError, match="db"):
            engine.queue(f"q-{handler.__name__}", handler)

    async def optional(job: Any, *, db: Any = None) -> None: ...

    engine.queue("fine", optional)  # a default: the consumer never needs to pass it


# ---------------------------------------------------------------- a durable stop takes no run: what submits one is cut


async def test_a_durable_handler_submitting_a_run_during_the_stop_is_cut_at_once_and_handled_once_later(
    tmp_path: Path,
) -> None:
    store = f"sqlite:///{tmp_path / 'stop.db'}"
    children: list[int] = []
    go = asyncio.Event()

    def build() -> tuple[Engine, WorkQueue]:
        engine = _engine(store)

        @engine.task(name="child")
        async def child(ctx: TaskContext, p: Num) -> None:
            children.append(p.n)

        async def handler(job: int) -> None:
            await go.wait()  # every submit is made during the stop
            await (await engine.submit("child", {"n": job})).wait()

        return engine, engine.queue("q", handler)

    engine, q = build()
    await engine.start()
    for i in range(3):
        await q.put(i)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    # not the whole timeout: no handler waits on a run the stop would never take
    await asyncio.wait_for(stopping, LONG / 4)
    assert (q.info().processed, q.info().failed, q.info().kept) == (0, 0, 3)
    assert children == []
    again, q2 = build()
    async with again:
        await eventually(lambda: q2.info().processed == 3 and len(children) == 3)
        assert sorted(children) == [0, 1, 2]  # each job's run once, none twice
        assert {r.status for r in again.runs(limit=None)} == {RunStatus.SUCCEEDED}


async def test_a_durable_run_refused_a_submit_by_the_stop_goes_back_to_pending_with_its_retries(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'stop.db'}"
    engine = _engine(store)
    go, going = asyncio.Event(), asyncio.Event()

    @engine.task(name="parent")
    async def parent(ctx: TaskContext) -> None:
        going.set()
        await go.wait()
        await engine.submit("child")

    @engine.task(name="child")
    async def child(ctx: TaskContext) -> None:
        return None

    await engine.start()
    handle = await engine.submit("parent")
    await asyncio.wait_for(going.wait(), 10)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await asyncio.wait_for(stopping, LONG / 4)
    record = engine.get(handle.id)
    assert record.status is RunStatus.PENDING and record.error is not None and record.error.type == "Shutdown"
    assert (record.attempt, record.max_attempts) == (2, 2)  # cut short: its one try is still its own
    assert [r.task for r in engine.runs(limit=None)] == ["parent"]


async def test_a_put_into_a_queue_made_during_the_stop_is_refused() -> None:
    engine = _engine("memory")
    go, going = asyncio.Event(), asyncio.Event()
    refused: list[BaseException] = []

    @engine.task(name="r")
    async def r(ctx: TaskContext) -> None:
        going.set()
        await go.wait()
        async def nothing(job: str) -> None:
            return None

        late = engine.queue("late", nothing)
        try:
            late.put_nowait("job")
        except EngineNotRunning as exc:
            refused.append(exc)

    await engine.start()
    await engine.submit("r")
    await asyncio.wait_for(going.wait(), 10)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await stopping
    assert len(refused) == 1  # never started, nothing would handle it: not accepted and lost


async def test_with_no_queue_a_key_due_again_at_its_runs_end_runs_within_the_stop() -> None:
    engine = _engine("memory")
    calls: list[str] = []

    async def fn(ctx: TaskContext, key: str) -> None:
        calls.append(key)
        # its work, long enough for the stop to be waiting on the runs when the first ends (the
        # end brings the key due again while that wait is being answered), and for the second
        # to be still going when a stop that no longer waited would cut it
        await asyncio.sleep(0.3)

    t = engine.trigger("t", fn, size_threshold=2)
    await engine.start()
    t.notify("k", 2)
    await eventually(lambda: calls == ["k"])
    t.notify("k", 2)  # due again once the running one ends
    drain = asyncio.create_task(t.drain())
    await asyncio.wait_for(engine.stop(timeout=LONG), LONG / 4)
    await asyncio.wait_for(drain, 10)  # returns: both ran
    assert calls == ["k", "k"]
    [key] = t.state().keys
    assert key.count == 0


async def test_a_workers_cleanup_joining_a_durable_queue_whose_jobs_the_stop_refused_is_told_at_once(
    tmp_path: Path,
) -> None:
    """A supervised worker's cleanup may await queue.join() on what it fed: once the only jobs
    left are ones the durable stop refused a submit (kept for the next start), the join says so
    with StoppedBeforeDone, rather than hold the stop to its timeout."""
    engine = _engine(f"sqlite:///{tmp_path / 'stop.db'}")
    go = asyncio.Event()
    joined: list[BaseException | None] = []

    @engine.task(name="work")
    async def work(ctx: TaskContext) -> None:
        return None

    async def handler(job: int) -> None:
        await go.wait()  # every submit is made during the stop
        await engine.submit("work")

    q = engine.queue("q", handler)

    @engine.supervised(name="feeder")
    async def feeder(ctx: TaskContext) -> None:
        try:
            for n in range(3):
                await q.put(n)
            await asyncio.Event().wait()
        finally:
            try:
                await q.join()
                joined.append(None)
            except StoppedBeforeDone as exc:
                joined.append(exc)

    await engine.start()
    await eventually(lambda: q.info().accepted == 3)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await asyncio.wait_for(stopping, LONG / 4)  # not the whole timeout
    [told] = joined
    assert isinstance(told, StoppedBeforeDone) and told.kept
    assert (q.info().processed, q.info().failed, q.info().kept) == (0, 0, 3)


# ---------------------------------------------------------------- a durable stop: waits on runs it will not take


def _awaiting(store: str, node: str, ran: list[tuple[str, int]], go: asyncio.Event) -> tuple[Engine, dict[str, Any]]:
    """A node whose one slot ``hold`` keeps until ``go``, and whose queue ``q``'s handler submits
    a ``child`` run and awaits it: the child stays pending while ``hold`` runs."""
    engine = Engine(store=store, node_id=node, health_interval=None, cancel_grace=0.05, max_concurrency=1)
    seen: dict[str, Any] = {"submitted": asyncio.Event(), "told": []}

    @engine.task(name="hold")
    async def hold(ctx: TaskContext) -> None:
        await go.wait()

    @engine.task(name="child")
    async def child(ctx: TaskContext, p: Num) -> None:
        ran.append((node, p.n))

    async def handler(job: int) -> None:
        handle = await engine.submit("child", {"n": job})
        seen["submitted"].set()
        try:
            await handle.wait()
        except StoppedBeforeDone as exc:
            seen["told"].append((exc.kept, engine.state))
            raise

    seen["queue"] = engine.queue("q", handler)
    return engine, seen


async def test_a_durable_stop_alone_on_its_store_tells_a_handler_awaiting_a_pending_run_at_once(tmp_path: Path) -> None:
    # the stop takes no pending run, and no other node will: the handler's wait was held to the
    # stop's timeout, to be cut short then all the same
    store = f"sqlite:///{tmp_path / 'stop.db'}"
    ran: list[tuple[str, int]] = []
    go = asyncio.Event()
    engine, seen = _awaiting(store, "n1", ran, go)
    await engine.start()
    await engine.submit("hold")
    await seen["queue"].put(7)
    await asyncio.wait_for(seen["submitted"].wait(), LONG)
    stopping = asyncio.create_task(engine.stop(timeout=LONG))
    await eventually(lambda: engine.state == "stopping")
    go.set()
    await asyncio.wait_for(stopping, LONG / 4)  # not the whole timeout
    assert seen["told"] == [(True, "stopping")]
    info = seen["queue"].info()
    assert (info.processed, info.failed, info.kept) == (0, 0, 1)
    assert ran == []
    again, seen2 = _awaiting(store, "n1", ran, go)
    async with again:
        # the job is handled again, and its child (kept pending) runs
        await eventually(lambda: seen2["queue"].info().processed == 1)
        assert ("n1", 7) in ran


async def test_a_durable_stop_with_another_node_alive_lets_a_handler_wait_for_that_node_to_run_it(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'stop.db'}"
    ran: list[tuple[str, int]] = []
    go = asyncio.Event()
    first, seen = _awaiting(store, "n1", ran, go)
    other, _ = _awaiting(store, "n2", ran, go)
    await first.start()
    await first.submit("hold")
    await eventually(lambda: first.stats().running == 1)
    await other.start()
    try:
        await other.submit("hold")  # n2's slot: the child waits for go on both nodes
        await eventually(lambda: other.stats().running == 1)
        await seen["queue"].put(7)
        await asyncio.wait_for(seen["submitted"].wait(), LONG)
        stopping = asyncio.create_task(first.stop(timeout=LONG))
        await eventually(lambda: first.state == "stopping")
        go.set()
        await asyncio.wait_for(stopping, LONG / 4)
    finally:
        await other.stop()
    assert ran == [("n2", 7)]
    assert seen["told"] == []
    info = seen["queue"].info()
    assert (info.processed, info.failed, info.kept) == (1, 0, 0)


# ---------------------------------------------------------------- a stop the engine's own work asks for


@pytest.mark.parametrize("asker", ["run", "handler"])
async def test_a_stop_awaited_by_the_engines_own_work_starts_the_stop_and_lets_that_work_finish(
    store: str, asker: str
) -> None:
    # the stop drained the very run (or handler) awaiting it, so it waited for itself until its
    # timeout, then cut it short: the run ended cancelled, the job undone, the warning advising
    # a longer timeout
    engine = _engine(store)
    said: list[str] = []

    @engine.task
    async def shut_down(ctx: TaskContext) -> str:
        await engine.stop(timeout=LONG)
        said.append("run")
        return "asked"

    async def handle(job: Any) -> None:
        await engine.stop(timeout=LONG)
        said.append("handler")

    queue = engine.queue("control", handle)
    await engine.start()
    if asker == "run":
        handle_ = await engine.submit("shut_down")
    else:
        await queue.put({"stop": True})
    await eventually(lambda: engine.state != "running")  # the stop it asked for is under way
    # an outside caller waits for the end: well inside LONG, as nothing waits for itself
    await asyncio.wait_for(engine.stop(timeout=LONG), 10)
    assert engine.state == "stopped" and said == [asker]
    if asker == "run":
        record = engine.get(handle_.id)
        assert (record.status, record.result) == (RunStatus.SUCCEEDED, "asked")
    else:
        assert queue.processed == 1
