"""Supervised workers at the engine's stop and at a lapse of the lease.

* The stop stops its producers first: supervised workers are cancelled before queues,
  triggers and runs drain, so a worker feeding a queue is neither refused into a "crash" nor
  restarted during the drain, and a leader hands its lease over before that drain.
* A leader-only worker whose ``ctx.ensure_leader()`` finds the node's own view of the lease
  lapsed is cancelled right at that await; its cleanup is not cut by the elector's later wakes.
* A worker whose cleanup (after a lost leadership, a restart) outlasts the engine's stop ends
  ``stopped`` with reason ``shutdown`` once its code has ended.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    EngineNotRunning,
    InProcessLease,
    NotLeader,
    RedisLease,
    TaskContext,
)

from .helpers import Recorder, eventually, stray_tasks
from .redis_server import RedisServer


async def forever() -> None:
    await asyncio.Event().wait()


class OffsetClock:
    """A lease clock that runs with time.time(), moved ahead by hand to lapse a lease at once."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


def stops(rec: Recorder) -> list[tuple[str, Any]]:
    return [(e.kind, getattr(e, "reason", None)) for e in rec.events]


# ---------------------------------------------------------------- producers stop first


async def test_a_worker_feeding_a_queue_is_stopped_before_the_drain_neither_crashed_nor_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    engine = Engine(node_id="a", health_interval=None)
    accepted: list[int] = []
    handled: list[int] = []

    async def handle(job: int) -> None:
        handled.append(job)

    jobs = engine.queue("jobs", handle, concurrency=1, maxsize=2)

    # a short backoff: a worker restarted during the drain would show within it
    @engine.supervised(name="feeder", backoff=0.01)
    async def feeder(ctx: TaskContext) -> None:
        i = 0
        while True:
            await jobs.put(i, timeout=30.0)  # waits for room: back-pressure from the handler
            accepted.append(i)
            i += 1

    rec = Recorder(engine, ("worker.",))
    await engine.start()
    await eventually(lambda: len(accepted) >= 20)
    await asyncio.wait_for(engine.stop(10.0), 30)

    assert stops(rec) == [("worker.started", None), ("worker.stopped", "shutdown")]
    info = engine.workers()[0]
    assert (info.state, info.crashes, info.restarts, info.last_error) == ("stopped", 0, 0, None)
    assert "crashed" not in caplog.text
    # what the worker had queued when it was stopped is all the drain had to do, and it did it
    assert handled == accepted
    assert jobs.info().abandoned == 0
    assert not stray_tasks()


async def test_a_workers_cleanup_at_the_stop_can_wait_for_the_jobs_it_fed() -> None:
    engine = Engine(node_id="a", health_interval=None)
    release = asyncio.Event()
    handled: list[int] = []
    joined: list[list[int]] = []

    async def handle(job: int) -> None:
        await release.wait()  # the jobs wait for what the worker lets go of at its end
        handled.append(job)

    jobs = engine.queue("jobs", handle, concurrency=1)

    @engine.supervised(name="feeder")
    async def feeder(ctx: TaskContext) -> None:
        try:
            for i in range(3):
                await jobs.put(i)
            await forever()
        finally:
            release.set()
            await jobs.join()  # the queue still runs: the worker is stopped before it drains
            joined.append(list(handled))

    await engine.start()
    await eventually(lambda: jobs.info().accepted == 3)
    await asyncio.wait_for(engine.stop(5.0), 30)
    assert joined == [[0, 1, 2]]
    assert engine.workers()[0].last_error is None
    assert not stray_tasks()


@pytest.mark.parametrize("raised", ["as_is", "wrapped"])
async def test_a_worker_refused_by_a_stop_that_began_before_its_cancel_is_stopped_not_crashed(
    raised: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    engine = Engine(node_id="a", health_interval=None)
    waiting = asyncio.Event()
    go = asyncio.Event()
    refused: list[Exception] = []

    async def handle(job: int) -> None:
        pass

    jobs = engine.queue("jobs", handle)

    @engine.supervised(name="feeder", backoff=0.01)
    async def feeder(ctx: TaskContext) -> None:
        waiting.set()
        await go.wait()
        try:
            await jobs.put(1)
        except EngineNotRunning as exc:
            refused.append(exc)
            if raised == "wrapped":
                raise RuntimeError("the feed could not hand its item on") from exc
            raise

    rec = Recorder(engine, ("worker.",))
    await engine.start()
    await asyncio.wait_for(waiting.wait(), 10)
    # the worker's wake-up is due before the stop's first step: it sees the engine stopping
    # (and is refused) before the stop has cancelled it. Awaited here, not in a task of its own
    # (wait_for's, on Python 3.11), which would let the worker run before the stop began
    go.set()
    await engine.stop(10.0)

    assert len(refused) == 1  # the race this is about did happen
    assert stops(rec) == [("worker.started", None), ("worker.stopped", "shutdown")]
    info = engine.workers()[0]
    assert (info.state, info.crashes, info.restarts, info.last_error) == ("stopped", 0, 0, None)
    assert "crashed" not in caplog.text
    assert not stray_tasks()


async def test_a_stopping_leader_hands_the_lease_over_before_its_queues_drain() -> None:
    # a ttl far longer than the test: a takeover can only come from a release
    lease = InProcessLease(ttl=60.0, renew_interval=0.05)
    a = Engine(node_id="a", lease=lease, health_interval=None)
    b = Engine(node_id="b", lease=lease, health_interval=None)
    gate = asyncio.Event()
    handling = asyncio.Event()
    started: list[str] = []

    async def handle(job: int) -> None:
        handling.set()
        await gate.wait()

    jobs = a.queue("jobs", handle)
    for engine in (a, b):

        @engine.supervised(name="dedup", leader_only=True)
        async def dedup(ctx: TaskContext) -> None:
            started.append(ctx.node_id)
            await forever()

    await a.start()
    await b.start()
    stopping: asyncio.Task[None] | None = None
    try:
        await eventually(lambda: started == ["a"])
        await jobs.put(1)
        await asyncio.wait_for(handling.wait(), 10)
        stopping = asyncio.ensure_future(a.stop(30.0))
        # a's leader-only worker has stopped: b leads, and runs it, while a's queue still drains
        await eventually(lambda: b.leadership().is_leader and started == ["a", "b"])
        assert a.state == "stopping" and not gate.is_set()
    finally:
        gate.set()
        if stopping is not None:
            await asyncio.wait_for(stopping, 30)
        await a.stop(1.0)
        await b.stop(1.0)
    assert jobs.info().abandoned == 0
    assert not stray_tasks()


# ---------------------------------------------------------------- a lapse found by ensure_leader()


class CheckAnsweredLate(InProcessLease):
    """Answers ``check`` truly, but only once the node's own view of the lease has lapsed
    (as when the answer is slow to come back, or the loop stalls on its way)."""

    def __init__(self, clock: OffsetClock, **kwargs: Any) -> None:
        super().__init__(clock=clock, **kwargs)
        self.offset_clock = clock
        self.late = False

    async def check(self, node_id: str, term: int) -> bool:
        held = await super().check(node_id, term)
        if self.late:
            self.offset_clock.offset += 10 * self.ttl
        return held


class Guard:
    """A leader-only worker "guard" that waits for ``go``, then checks its leadership and works
    on; told it does not lead, or cancelled, it notes where and cleans up until ``may_finish``
    (``steps`` says whether that cleanup was cut or finished). A later copy just waits."""

    def __init__(self, engine: Engine) -> None:
        self.waiting = asyncio.Event()
        self.go = asyncio.Event()
        self.cleaning = asyncio.Event()
        self.may_finish = asyncio.Event()
        self.steps: list[str] = []
        engine.supervised(name="guard", leader_only=True)(self.guard)

    async def cleanup(self) -> None:
        self.cleaning.set()
        try:
            await self.may_finish.wait()  # flushing, releasing: it awaits
        except asyncio.CancelledError:
            self.steps.append("cleanup cut")
            raise
        self.steps.append("cleanup finished")

    async def guard(self, ctx: TaskContext) -> None:
        if self.steps:
            await forever()  # a later copy, started once leadership is back
        where = "waiting"
        try:
            self.waiting.set()
            await self.go.wait()
            where = "ensure_leader"
            await ctx.ensure_leader()
            where = "work"
            await forever()
        except NotLeader:
            self.steps.append("not leader")
            await self.cleanup()
        except asyncio.CancelledError:
            self.steps.append(f"cancelled at {where}")
            await self.cleanup()
            raise

    async def cleaned_up(self) -> list[str]:
        """``steps`` once the cleanup (let finish now) has ended, cut or not."""
        self.may_finish.set()
        await eventually(lambda: [s for s in self.steps if s.startswith("cleanup")])
        return self.steps


@pytest.mark.parametrize("lapse", ["before_the_check", "during_the_check"])
async def test_a_worker_whose_check_finds_its_own_lease_lapsed_is_cancelled_there_and_keeps_its_cleanup(
    lapse: str,
) -> None:
    clock = OffsetClock()
    # renewed every second: the elector wakes (and takes the lapsed lease back) while the cleanup runs
    lease = CheckAnsweredLate(clock, ttl=3.0, renew_interval=1.0)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=60.0)
    guard = Guard(engine)
    rec = Recorder(engine, ("lease.", "worker."))
    await engine.start()
    try:
        await asyncio.wait_for(guard.waiting.wait(), 10)
        assert engine.leadership().is_leader
        if lapse == "before_the_check":
            clock.offset += 10 * lease.ttl
        else:
            lease.late = True
        # the worker's wake-up comes before any of the elector's: its own check finds the lapse
        guard.go.set()
        await asyncio.wait_for(guard.cleaning.wait(), 10)
        lease.late = False
        await eventually(lambda: rec.of("lease.lost"))
        # the elector's next wakes while the cleanup runs: it takes the lease back, in a new
        # term, and then sees that one lapse too (the worker, still cleaning up, is not cancelled again)
        await eventually(lambda: len(rec.of("lease.acquired")) == 2)
        clock.offset += 10 * lease.ttl
        await eventually(lambda: len(rec.of("lease.lost")) == 2)
        assert await guard.cleaned_up() == ["cancelled at ensure_leader", "cleanup finished"]
        assert [e.reason for e in rec.of("worker.stopped")] == ["leadership_lost"]
        assert not rec.of("worker.crashed")
    finally:
        guard.may_finish.set()
        await engine.stop(5.0)
    assert not stray_tasks()


async def test_a_run_told_its_node_lapsed_makes_the_node_step_down_at_once() -> None:
    clock = OffsetClock()
    lease = InProcessLease(ttl=30.0, renew_interval=10.0, clock=clock)
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    rec = Recorder(engine, ("lease.",))
    async with engine:
        await eventually(lambda: engine.leadership().is_leader)
        clock.offset += 60.0
        with pytest.raises(NotLeader, match="lapsed before it was renewed"):
            await TaskContext(engine, None, "probe").ensure_leader()
        # stepped down there, not at the elector's next wake seconds from now
        assert [e.kind for e in rec.events][-1] == "lease.lost"
        assert not engine.leadership().is_leader


async def test_a_worker_on_redis_whose_node_stalled_past_its_lease_keeps_its_cleanup(
    redis_server: RedisServer,
) -> None:
    lease = RedisLease(redis_server.url, key="test:stall", ttl=1.0)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=60.0)
    guard = Guard(engine)
    rec = Recorder(engine, ("lease.",))
    await engine.start()
    try:
        await asyncio.wait_for(guard.waiting.wait(), 10)
        await eventually(lambda: engine.leadership().is_leader)
        # the loop stalls past the lease (a GC pause, a blocking call): the condition under
        # test, not a wait for something
        time.sleep(lease.ttl + 0.1)
        guard.go.set()
        await asyncio.wait_for(guard.cleaning.wait(), 10)
        await eventually(lambda: rec.of("lease.lost"))
        # the elector's next wake (a new election) comes while the cleanup runs
        await eventually(lambda: len(rec.of("lease.acquired")) == 2)
        assert await guard.cleaned_up() == ["cancelled at ensure_leader", "cleanup finished"]
    finally:
        guard.may_finish.set()
        await engine.stop(5.0)
    assert not stray_tasks()


# ---------------------------------------------------------------- a cleanup that outlasts the stop


async def lose_leadership(engine: Engine) -> None:
    engine.elector.suspend()  # what the engine does when its store is out of reach


async def restart(engine: Engine) -> None:
    # its caller gives up on the cleanup after its cancel rounds; the old copy still runs
    await engine.restart_worker("flusher")


@pytest.mark.parametrize("first", [lose_leadership, restart], ids=["lost_leadership", "restart"])
async def test_a_worker_whose_cleanup_outlasts_the_stop_ends_stopped_by_the_shutdown(
    first: Callable[[Engine], Any], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    leader_only = first is lose_leadership
    lease = InProcessLease(ttl=30.0, renew_interval=10.0) if leader_only else None
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=0.05)
    cleaning = asyncio.Event()
    may_end = asyncio.Event()
    runs = 0

    @engine.supervised(name="flusher", leader_only=leader_only)
    async def flusher(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        try:
            await forever()
        finally:
            cleaning.set()
            while not may_end.is_set():  # a cleanup that ignores every cancel
                try:
                    await may_end.wait()
                except asyncio.CancelledError:
                    pass

    rec = Recorder(engine, ("worker.",))
    states: list[str] = []
    await engine.start()
    try:
        await eventually(lambda: runs == 1)
        await first(engine)
        await asyncio.wait_for(cleaning.wait(), 10)
        await asyncio.wait_for(engine.stop(0.05), 30)
        assert "ignored cancellation" in caplog.text
        assert engine.workers()[0].state == "running"  # its code still runs

        may_end.set()
        await eventually(lambda: rec.of("worker.stopped"))
        states.append(engine.workers()[0].state)
    finally:
        may_end.set()
        await engine.stop(1.0)
    assert states == ["stopped"]
    assert [e.reason for e in rec.of("worker.stopped")] == ["shutdown"]
    assert runs == 1
    assert not stray_tasks()
