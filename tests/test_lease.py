"""Leader leases: the compare-and-set lease interface, election, renewal and failover."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from taskwatch.engine import (
    Engine,
    InProcessLease,
    InvalidConfiguration,
    Lease,
    LeaseState,
    NotLeader,
    RunStatus,
    TaskContext,
)

from .helpers import Recorder, eventually, stray_tasks

TTL = 0.3
RENEW = 0.05


class FakeClock:
    """A settable wall clock, so a lease can expire without anyone sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FlakyLease(InProcessLease):
    """An in-process lease whose calls from chosen nodes fail the way a remote store can."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: node id -> "raise" (store unreachable), "hang" (no reply), "refuse" (CAS fails)
        self.failing: dict[str, str] = {}
        #: calls made while failing (by any node)
        self.failed_calls = 0
        #: no call answers, whoever makes it, lookups too (a store that stalled: a SIGSTOPped Redis)
        self.frozen = False

    async def _refused(self, node_id: str) -> bool:
        mode = "hang" if self.frozen else self.failing.get(node_id)
        if mode is not None:
            self.failed_calls += 1
        if mode == "raise":
            raise ConnectionError("lease store unreachable")
        if mode == "hang":
            await asyncio.Event().wait()
        return mode == "refuse"

    async def acquire(self, node_id: str) -> LeaseState | None:
        return None if await self._refused(node_id) else await super().acquire(node_id)

    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        return None if await self._refused(node_id) else await super().renew(node_id, term)

    async def release(self, node_id: str, term: int) -> bool:
        return False if await self._refused(node_id) else await super().release(node_id, term)

    async def holder(self) -> LeaseState | None:
        if self.frozen:
            await asyncio.Event().wait()
        return await super().holder()


class LeaderWatch:
    """Watches the lease events of several engines sharing one lease.

    Records every acquired term in the order it happened, and every moment at
    which two nodes both believed they held a valid lease (there must be none).
    """

    def __init__(self, *engines: Engine) -> None:
        self.engines = engines
        self.acquired: list[tuple[str, int]] = []
        self.overlaps: list[list[str]] = []
        for engine in engines:
            engine.bus.add_callback(self._seen, kinds=("lease.",))

    def _seen(self, event: Any) -> None:
        if event.kind == "lease.acquired":
            self.acquired.append((event.node, event.term))
        valid = [e.node_id for e in self.engines if e._leader.is_leader and e._leader.lease_valid()]
        if len(valid) > 1:
            self.overlaps.append(valid)

    def check(self) -> None:
        assert self.overlaps == []
        terms = [term for _, term in self.acquired]
        assert terms == sorted(set(terms)), f"terms must strictly increase: {self.acquired}"


def leader_engines(
    lease: Lease, *nodes: str
) -> tuple[list[Engine], dict[str, list[TaskContext]], dict[str, list[str]]]:
    """Engines sharing ``lease``, each with a leader-only worker that records its life.

    Returns the engines, the contexts each node's worker was started with, and
    per node what the worker saw when it was cancelled ("not_leader" if
    ensure_leader() failed by then).
    """
    engines: list[Engine] = []
    contexts: dict[str, list[TaskContext]] = {n: [] for n in nodes}
    endings: dict[str, list[str]] = {n: [] for n in nodes}
    for node in nodes:
        engine = Engine(node_id=node, lease=lease, health_interval=None)

        async def dedup(ctx: TaskContext, node: str = node) -> None:
            contexts[node].append(ctx)
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                try:
                    await ctx.ensure_leader()
                    endings[node].append("still_leader")
                except NotLeader:
                    endings[node].append("not_leader")
                raise

        engine.supervised(dedup, name="dedup", leader_only=True, backoff=0.01)
        engines.append(engine)
    return engines, contexts, endings


async def stop_all(*engines: Engine) -> None:
    for engine in engines:
        await engine.stop(1.0)


# ---------------------------------------------------------------- the lease interface


async def test_acquire_free_lease_starts_term_one_with_ttl() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=2.0, clock=clock)
    assert await lease.holder() is None

    state = await lease.acquire("a")

    assert state == LeaseState(holder="a", term=1, expires_at=clock.now + 2.0)
    assert await lease.holder() == state


async def test_acquire_refused_while_another_node_holds_an_unexpired_lease() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=2.0, clock=clock)
    held = await lease.acquire("a")
    clock.advance(1.9)

    assert await lease.acquire("b") is None
    assert await lease.holder() == held


async def test_expired_lease_is_taken_over_with_a_higher_term() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=2.0, clock=clock)
    old = await lease.acquire("a")
    assert old is not None
    clock.advance(2.0)

    assert await lease.holder() is None
    new = await lease.acquire("b")

    assert new is not None and new.holder == "b" and new.term > old.term
    # the old holder can neither renew nor release the term it lost
    assert await lease.renew("a", old.term) is None
    assert await lease.release("a", old.term) is False
    assert await lease.holder() == new


async def test_renew_is_compare_and_set_on_holder_and_term() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=2.0, clock=clock)
    state = await lease.acquire("a")
    assert state is not None
    clock.advance(1.5)

    assert await lease.renew("b", state.term) is None
    assert await lease.renew("a", state.term + 1) is None
    renewed = await lease.renew("a", state.term)

    assert renewed == LeaseState(holder="a", term=state.term, expires_at=clock.now + 2.0)
    clock.advance(1.5)
    assert await lease.holder() == renewed  # still held thanks to the renew


async def test_renew_after_expiry_fails_even_if_nobody_took_over() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=2.0, clock=clock)
    state = await lease.acquire("a")
    assert state is not None
    clock.advance(2.5)

    assert await lease.renew("a", state.term) is None


async def test_release_by_a_non_holder_or_a_stale_term_is_refused() -> None:
    lease = InProcessLease(ttl=2.0)
    state = await lease.acquire("a")
    assert state is not None

    assert await lease.release("b", state.term) is False
    assert await lease.release("a", state.term - 1) is False
    assert await lease.holder() == state

    assert await lease.release("a", state.term) is True
    assert await lease.holder() is None
    assert await lease.release("a", state.term) is False


async def test_terms_keep_growing_across_release_and_reacquire() -> None:
    lease = InProcessLease(ttl=2.0)
    first = await lease.acquire("a")
    assert first is not None
    again = await lease.acquire("a")  # re-acquiring your own lease fences off the old term
    assert again is not None and again.term > first.term
    assert await lease.renew("a", first.term) is None

    assert await lease.release("a", again.term)
    after = await lease.acquire("b")

    assert after is not None and after.term > again.term


@pytest.mark.parametrize(
    ("ttl", "renew_interval"),
    [(0.0, None), (-1.0, None), (1.0, 0.0), (1.0, 0.6), (1.0, 1.0)],
)
def test_lease_rejects_a_ttl_that_leaves_no_room_to_renew(ttl: float, renew_interval: float | None) -> None:
    with pytest.raises(InvalidConfiguration, match="InProcessLease"):
        InProcessLease(ttl=ttl, renew_interval=renew_interval)


def test_renew_interval_defaults_to_a_third_of_the_ttl() -> None:
    assert InProcessLease(ttl=3.0).renew_interval == pytest.approx(1.0)


def test_lease_options_given_as_strings_are_read_as_numbers() -> None:
    # as every other option is read: the checked value is kept, not the str it was given as
    lease = InProcessLease(ttl="2", renew_interval="0.5")  # type: ignore[arg-type]
    assert (lease.ttl, lease.renew_interval) == (2.0, 0.5)
    assert InProcessLease(ttl="3").renew_interval == pytest.approx(1.0)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("options", "option"), [({"ttl": 2, "renew_interval": 1e-6}, "renew_interval"), ({"ttl": 1e-9}, "ttl")]
)
def test_a_renew_interval_under_a_millisecond_is_refused(options: dict[str, float], option: str) -> None:
    # the elector wakes once per interval: below 1 ms it would only burn CPU and publish lease.renewed
    with pytest.raises(InvalidConfiguration, match=f"{option}=.*0.001"):
        InProcessLease(**options)


def test_engine_refuses_something_that_is_not_a_lease() -> None:
    with pytest.raises(InvalidConfiguration, match="InProcessLease"):
        Engine(lease=object(), health_interval=None)


# ---------------------------------------------------------------- an engine's leadership


async def test_engine_without_a_lease_is_its_own_permanent_leader() -> None:
    engine = Engine(node_id="solo", health_interval=None)
    rec = Recorder(engine)
    async with engine:
        leadership = engine.leadership()
        assert leadership.model_dump() == {
            "node_id": "solo",
            "is_leader": True,
            "holder": "solo",
            "term": 1,
            "expires_at": None,
            "backend": None,
        }
        assert await TaskContext(engine, None, "probe").ensure_leader() == 1
    assert engine.leadership().is_leader
    assert not [k for k in rec.kinds() if k.startswith("lease.")]


async def test_two_engines_sharing_a_lease_elect_exactly_one_leader() -> None:
    lease = InProcessLease(ttl=TTL, renew_interval=RENEW)
    (a, b), contexts, _ = leader_engines(lease, "a", "b")
    try:
        await a.start()
        await b.start()

        # the outcome of the first election is known as soon as start() returns
        assert a.leadership().is_leader and a.leadership().holder == "a"
        assert not b.leadership().is_leader
        assert b.leadership().holder == "a"
        assert b.leadership().term == a.leadership().term == 1
        with pytest.raises(NotLeader) as info:
            await TaskContext(b, None, "probe").ensure_leader()
        assert info.value.holder == "a"

        await eventually(lambda: contexts["a"])
        assert contexts["b"] == []
        assert contexts["a"][0].term == 1
    finally:
        await stop_all(a, b)


async def test_leadership_events_carry_node_holder_term_and_expiry() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=TTL, renew_interval=RENEW, clock=clock)
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    rec = Recorder(engine, kinds=("lease.",))
    await engine.start()
    try:
        (acquired,) = rec.of("lease.acquired")
        assert (acquired.node, acquired.holder, acquired.term) == ("a", "a", 1)
        assert acquired.expires_at == clock.now + TTL
        assert engine.leadership().expires_at == acquired.expires_at

        # renewals come from the elector's own timer; each one pushes the expiry out
        clock.advance(0.1)
        await eventually(lambda: rec.of("lease.renewed"))
        renewed = rec.of("lease.renewed")[0]
        assert (renewed.node, renewed.holder, renewed.term) == ("a", "a", 1)
        assert renewed.expires_at == pytest.approx(clock.now + TTL)
        # as on every lease event, the lease before the change: for a renew, the same holder and term
        assert (renewed.previous_holder, renewed.previous_term) == ("a", 1)
    finally:
        await engine.stop(1.0)

    (released,) = rec.of("lease.released")
    assert (released.node, released.term) == ("a", 1)
    assert await lease.holder() is None
    assert not engine.leadership().is_leader


async def test_follower_takes_over_at_once_when_the_leader_stops() -> None:
    # a long ttl: a takeover within a second can only come from the release
    lease = InProcessLease(ttl=30.0, renew_interval=RENEW)
    (a, b), contexts, endings = leader_engines(lease, "a", "b")
    watch = LeaderWatch(a, b)
    rec_a, rec_b = Recorder(a), Recorder(b)
    try:
        await a.start()
        await b.start()
        await eventually(lambda: contexts["a"])
        old_term = a.leadership().term

        await a.stop(1.0)

        assert rec_a.of("lease.released")[0].term == old_term
        assert [e.reason for e in rec_a.of("worker.stopped")] == ["shutdown"]
        await eventually(lambda: b.leadership().is_leader)
        assert b.leadership().term > old_term
        await eventually(lambda: contexts["b"])
        assert rec_b.of("worker.started")[0].term == b.leadership().term
        with pytest.raises(NotLeader):
            await contexts["a"][0].ensure_leader()
        # workers are stopped before the lease is given up, never after
        assert endings["a"] == ["still_leader"]
    finally:
        await stop_all(a, b)
    watch.check()


async def test_follower_takes_over_when_the_leader_cannot_reach_the_lease() -> None:
    clock = FakeClock()
    lease = FlakyLease(ttl=10.0, renew_interval=RENEW, clock=clock)
    (a, b), contexts, endings = leader_engines(lease, "a", "b")
    watch = LeaderWatch(a, b)
    rec_a, rec_b = Recorder(a), Recorder(b)
    try:
        await a.start()
        await b.start()
        await eventually(lambda: contexts["a"])
        old_term = a.leadership().term

        lease.failing["a"] = "raise"

        # a gives up within a renew interval: its leader-only worker is cancelled
        # and already sees it is no longer leader
        await eventually(lambda: rec_a.of("lease.lost"))
        await eventually(lambda: endings["a"])
        assert endings["a"] == ["not_leader"]
        assert [e.reason for e in rec_a.of("worker.stopped")] == ["leadership_lost"]
        with pytest.raises(NotLeader):
            await contexts["a"][0].ensure_leader()
        assert a.workers()[0].state == "waiting_for_leadership"
        # b must wait for the lease to expire: a might still be writing
        assert not b.leadership().is_leader

        clock.advance(10.0)

        await eventually(lambda: b.leadership().is_leader)
        assert b.leadership().term > old_term
        await eventually(lambda: contexts["b"])
        assert contexts["b"][0].term == b.leadership().term

        # a reconnects and finds b in charge
        del lease.failing["a"]
        await eventually(lambda: a.leadership().holder == "b")
        assert not a.leadership().is_leader
        assert len(contexts["a"]) == 1
        assert not rec_b.of("lease.lost")
    finally:
        await stop_all(a, b)
    watch.check()


async def test_a_lease_store_failing_on_every_attempt_is_logged_once_per_outage(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a store that stays down is tried every renew interval: a line per try would bury the log
    caplog.set_level(logging.INFO, logger="taskwatch.lease")
    lease = FlakyLease(ttl=TTL, renew_interval=RENEW)
    engine = Engine(node_id="a", lease=lease, health_interval=None)

    def failures() -> list[str]:
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        return [message for message in warnings if "unreachable" in message]

    try:
        await engine.start()
        assert engine.leadership().is_leader
        lease.failing["a"] = "raise"
        await eventually(lambda: lease.failed_calls >= 6)
        assert len(failures()) == 1, failures()
        assert not engine.leadership().is_leader

        del lease.failing["a"]
        await eventually(lambda: engine.leadership().is_leader)
        assert any("answers again" in r.getMessage() for r in caplog.records)
        # a new outage is news again
        calls = lease.failed_calls
        lease.failing["a"] = "raise"
        await eventually(lambda: lease.failed_calls >= calls + 4)
        assert len(failures()) == 2, failures()
    finally:
        lease.failing.clear()
        await engine.stop(1.0)
    assert not stray_tasks()


async def test_a_lapsed_lease_fails_ensure_leader_before_the_elector_notices() -> None:
    clock = FakeClock()
    lease = InProcessLease(ttl=TTL, renew_interval=RENEW, clock=clock)
    (a, b), contexts, _ = leader_engines(lease, "a", "b")
    watch = LeaderWatch(a, b)
    rec_a = Recorder(a)
    try:
        await a.start()
        await b.start()
        await eventually(lambda: contexts["a"])
        ctx = contexts["a"][0]
        old_term = ctx.term

        # as if a's renewals stalled past the ttl: no await in between, so
        # the elector loop has had no chance to run
        clock.advance(TTL + 0.01)
        with pytest.raises(NotLeader):
            await ctx.ensure_leader()

        await eventually(lambda: rec_a.of("lease.lost"))
        # whichever node wins the next election does so with a new term
        await eventually(
            lambda: [e for e in (a, b) if e.leadership().is_leader and e.leadership().term > old_term],
        )
    finally:
        await stop_all(a, b)
    watch.check()
    assert len(watch.acquired) >= 2


async def lose_the_lease_in_its_store(lease: InProcessLease) -> None:
    """The lease store loses a's lease (a Redis that lost its data) and b takes it: a's own view
    is still good, so it is a worker's next ``ensure_leader()`` that finds out."""
    held = await lease.holder()
    assert held is not None and await lease.release("a", held.term)
    assert await lease.acquire("b") is not None


async def test_a_worker_that_finds_its_leadership_gone_itself_is_cancelled_there_and_gets_its_cleanup() -> None:
    # as when the elector's renew finds it out: cancelled and waited for as stop_worker waits,
    # not cut off at the cleanup's first await by a cancel made from inside its own check
    lease = InProcessLease(ttl=30.0)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=30.0)
    steps: list[str] = []
    checking = asyncio.Event()

    @engine.supervised(leader_only=True)
    async def guard(ctx: TaskContext) -> None:
        try:
            while True:
                await ctx.ensure_leader()
                checking.set()
                await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            steps.append("cancelled")
            raise
        finally:
            await asyncio.sleep(0.01)  # a cleanup that awaits: flushing, releasing
            steps.append("cleaned up")

    events = Recorder(engine, ("worker.",))
    async with engine:
        await asyncio.wait_for(checking.wait(), 10)
        await lose_the_lease_in_its_store(lease)
        await eventually(lambda: steps == ["cancelled", "cleaned up"])
        await eventually(lambda: engine.workers()[0].state == "waiting_for_leadership")
        stops = [e for e in events.events if e.kind != "worker.started"]
        assert [(e.kind, getattr(e, "reason", None)) for e in stops] == [("worker.stopped", "leadership_lost")]


async def test_a_worker_that_catches_every_error_is_still_stopped_at_once_when_its_check_finds_the_loss() -> None:
    lease = InProcessLease(ttl=30.0)
    # a grace far past the test's bound: the worker must not be left running until it is over
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=60.0)
    checking = asyncio.Event()
    refused: list[Exception] = []

    @engine.supervised(leader_only=True)
    async def guard(ctx: TaskContext) -> None:
        while True:
            try:
                await ctx.ensure_leader()
                checking.set()
            except Exception as exc:  # "log and carry on"
                refused.append(exc)
            await asyncio.sleep(0.01)

    async with engine:
        await asyncio.wait_for(checking.wait(), 10)
        await lose_the_lease_in_its_store(lease)
        await eventually(lambda: engine.workers()[0].state == "waiting_for_leadership")
        assert len(refused) <= 1


@pytest.mark.parametrize("failure", ["raise", "hang", "refuse"])
async def test_leader_that_fails_to_renew_cancels_its_workers_and_recovers(failure: str) -> None:
    # a long ttl: leadership is lost because renewing failed, not because time ran out
    lease = FlakyLease(ttl=10.0, renew_interval=RENEW)
    (a,), contexts, endings = leader_engines(lease, "a")
    rec = Recorder(a)
    try:
        await a.start()
        await eventually(lambda: contexts["a"])

        lease.failing["a"] = failure

        await eventually(lambda: rec.of("lease.lost"))
        await eventually(lambda: endings["a"])
        assert endings["a"] == ["not_leader"]
        assert rec.of("worker.stopped")[0].reason == "leadership_lost"
        assert not a.leadership().is_leader

        # once the store answers again the node leads again, in a new term,
        # and its leader-only worker starts again
        del lease.failing["a"]
        await eventually(lambda: a.leadership().is_leader)
        await eventually(lambda: len(contexts["a"]) == 2)
        assert a.leadership().term > 1
        assert rec.of("worker.started")[-1].term == a.leadership().term
    finally:
        await a.stop(1.0)
    assert not stray_tasks()


class ReplyLostLease(InProcessLease):
    """Takes the lease, then fails as if the reply never arrived."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.attempts = 0

    async def acquire(self, node_id: str) -> LeaseState | None:
        self.attempts += 1
        await super().acquire(node_id)
        raise ConnectionError("connection reset")


async def test_an_error_while_acquiring_never_counts_as_holding() -> None:
    lease = ReplyLostLease(ttl=TTL, renew_interval=RENEW)
    (a,), contexts, _ = leader_engines(lease, "a")
    rec = Recorder(a)
    try:
        await a.start()
        assert not a.leadership().is_leader
        with pytest.raises(NotLeader):
            await TaskContext(a, None, "probe").ensure_leader()
        # the loop keeps trying (and failing) without ever claiming leadership
        await eventually(lambda: lease.attempts >= 3)
        assert not a.leadership().is_leader
        assert not rec.of("lease.acquired")
        assert contexts["a"] == []
        assert a.workers()[0].state == "waiting_for_leadership"
    finally:
        await a.stop(1.0)
    # the store did take it: the stop, which never heard so, looks and releases it
    assert await lease.holder() is None


async def test_stop_leaves_no_task_behind_and_frees_the_lease() -> None:
    lease = FlakyLease(ttl=TTL, renew_interval=RENEW)
    (a, b), contexts, _ = leader_engines(lease, "a", "b")
    await a.start()
    await b.start()
    await eventually(lambda: contexts["a"])

    await stop_all(b, a)

    assert not stray_tasks()
    assert await lease.holder() is None
    assert not a.leadership().is_leader and not b.leadership().is_leader


async def test_stop_while_the_lease_store_hangs_still_returns() -> None:
    lease = FlakyLease(ttl=TTL, renew_interval=RENEW)
    (a,), contexts, _ = leader_engines(lease, "a")
    rec = Recorder(a)
    await a.start()
    await eventually(lambda: contexts["a"])
    lease.failing["a"] = "hang"

    await asyncio.wait_for(a.stop(0.2), timeout=2.0)

    assert not stray_tasks()
    assert not a.leadership().is_leader
    # the store never answered, so the node cannot claim it released the lease
    assert rec.of("lease.released") == []
    assert len(rec.of("lease.lost")) == 1


async def test_a_follower_stopped_while_its_acquire_hangs_still_stops_within_its_deadline() -> None:
    # its acquire is let answer within the stop's deadline; one that never does may have taken
    # the lease, but a look for that (and a release) gets only what is left of the deadline:
    # before, each got a renew interval of its own past it (4 s each here)
    lease = FlakyLease(ttl=12.0, renew_interval=4.0)
    (a, b), _, _ = leader_engines(lease, "a", "b")
    await a.start()
    await b.start()
    try:
        assert a.leadership().is_leader and not b.leadership().is_leader
        lease.frozen = True
        await eventually(lambda: lease.failed_calls >= 2, timeout=10)  # a's renew, b's acquire: no answer
        await asyncio.wait_for(b.stop(0.5), timeout=3.5)
    finally:
        await stop_all(a, b)
    assert not stray_tasks()


async def test_leadership_regained_during_a_workers_cleanup_starts_it_once_cleanup_ends() -> None:
    lease = FlakyLease(ttl=10.0, renew_interval=RENEW)
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    cleanup_may_end = asyncio.Event()
    starts = 0

    @engine.supervised(name="slow", leader_only=True, backoff=0.01)
    async def slow(ctx: TaskContext) -> None:
        nonlocal starts
        starts += 1
        try:
            await asyncio.Event().wait()
        finally:
            if starts == 1:
                await cleanup_may_end.wait()

    rec = Recorder(engine)
    try:
        await engine.start()
        await eventually(lambda: starts == 1)
        lease.failing["a"] = "refuse"
        await eventually(lambda: rec.of("lease.lost"))
        del lease.failing["a"]
        await eventually(lambda: engine.leadership().is_leader)

        # never a second copy while the first is still cleaning up
        assert starts == 1
        cleanup_may_end.set()

        await eventually(lambda: starts == 2)
        assert rec.of("worker.started")[-1].term == engine.leadership().term == 2
    finally:
        cleanup_may_end.set()
        await engine.stop(1.0)
    assert not stray_tasks()


async def test_a_leader_only_worker_swallowing_the_cancel_of_a_lost_leadership_is_cancelled_again() -> None:
    # the same bounded cancel-and-wait as a stop: no second leader goes on unreported
    lease = FlakyLease(ttl=10.0, renew_interval=RENEW)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=0.3)
    ticks = 0
    swallowed = 0
    ended = asyncio.Event()

    @engine.supervised(name="singleton", leader_only=True)
    async def singleton(ctx: TaskContext) -> None:
        nonlocal ticks, swallowed
        try:
            while True:
                try:
                    await asyncio.sleep(0.005)
                    ticks += 1
                except asyncio.CancelledError:
                    swallowed += 1
                    if swallowed > 1:
                        raise  # "finish the batch in hand" once: a bug, but one cancel only
        finally:
            ended.set()

    rec = Recorder(engine, kinds=("lease.", "worker."))
    try:
        await engine.start()
        await eventually(lambda: ticks > 0)
        lease.failing["a"] = "refuse"
        await eventually(lambda: rec.of("lease.lost"))
        await eventually(lambda: swallowed == 1)
        # still going: it says so rather than "waiting_for_leadership"
        assert not ended.is_set() and engine.workers()[0].state == "running"

        await asyncio.wait_for(ended.wait(), timeout=2.0)
        assert swallowed == 2
        await eventually(lambda: engine.workers()[0].state == "waiting_for_leadership")
        assert [e.reason for e in rec.of("worker.stopped")] == ["leadership_lost"]
    finally:
        await engine.stop(1.0)
    assert not stray_tasks()


async def test_an_operators_stop_during_a_cleanup_for_lost_leadership_is_published_as_the_users() -> None:
    # stop_worker while the worker still cleaned up after its node lost the lease: the stop
    # held, but the bus said only leadership_lost, so whoever audits or alerts on
    # worker.stopped never saw that an operator stopped it
    lease = FlakyLease(ttl=10.0, renew_interval=RENEW)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=30)
    cleaning, cleaned = asyncio.Event(), asyncio.Event()

    @engine.supervised(name="sync", leader_only=True)
    async def sync(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cleaning.set()
            await cleaned.wait()  # flushing what it holds
            raise

    rec = Recorder(engine)
    async with engine:
        await eventually(lambda: engine.workers()[0].state == "running")
        lease.failing["a"] = "refuse"
        await asyncio.wait_for(cleaning.wait(), 10)  # leadership lost: cleaning up
        stopping = asyncio.create_task(engine.stop_worker("sync"))
        await eventually(lambda: engine.workers()[0].stopped_by_user)
        cleaned.set()
        info = await stopping
        assert (info.state, info.stopped_by_user) == ("stopped", True)
        assert [e.reason for e in rec.of("worker.stopped")] == ["user"]
        lease.failing.clear()
        await eventually(lambda: engine.leadership().is_leader)
        assert engine.workers()[0].state == "stopped"  # held: leading again starts nothing


class SlowReplyLease(InProcessLease):
    """Applies an acquire at once; its answer arrives only once ``reply`` is set (a remote
    store's reply on its way, or held up by a store that stalled after running it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reply: asyncio.Event | None = None
        self.applied = asyncio.Event()

    async def acquire(self, node_id: str) -> LeaseState | None:
        state = await super().acquire(node_id)
        if self.reply is not None and state is not None and state.holder == node_id:
            self.applied.set()
            await self.reply.wait()
        return state


async def start_held_at_its_election(
    engine: Engine, lease: SlowReplyLease
) -> tuple[asyncio.Task[None], asyncio.Event]:
    """Start ``engine``, held at its first election until the event returned is set (a start
    under way that takes runs meanwhile: the engine is running, its leadership not started)."""
    reply = lease.reply = asyncio.Event()
    lease.applied.clear()
    starting = asyncio.create_task(engine.start())
    await lease.applied.wait()
    return starting, reply


async def test_a_hurry_made_while_the_stop_waits_for_the_start_ends_the_drain_that_follows(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # stop() waits for a start under way (here its first election, whose answer is on its way)
    # before it sets its drain's end: a hurry_stop() made meanwhile was dropped, and the drain
    # then took the whole timeout asked for a run that never ends
    lease = SlowReplyLease(ttl=10.0, renew_interval=0.5)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=0.2)

    @engine.task
    async def forever(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    starting, reply = await start_held_at_its_election(engine, lease)
    handle = await engine.submit("forever")
    await eventually(lambda: handle.status is RunStatus.RUNNING)
    stopping = asyncio.create_task(engine.stop(timeout=60))
    await asyncio.sleep(0)  # one loop step: the stop now waits for the start
    assert not stopping.done() and engine.starting is not None
    engine.hurry_stop(120)  # later than the drain's own end: changes nothing
    engine.hurry_stop(0, drain_advice="the test hurried it")
    engine.hurry_stop(30)  # a later hurry does not undo a sooner one
    reply.set()
    await asyncio.wait_for(asyncio.gather(starting, stopping), 10)  # not the 60 s asked
    assert (handle.record().status, handle.record().cancel_reason) == (RunStatus.CANCELLED, "shutdown")
    assert "the test hurried it" in caplog.text  # the warning of the run cut says why
    assert not stray_tasks()


async def test_a_hurry_made_for_a_stop_cancelled_while_it_waited_holds_for_no_later_stop() -> None:
    lease = SlowReplyLease(ttl=10.0, renew_interval=0.5)
    engine = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=0.2)
    gate = asyncio.Event()

    @engine.task
    async def gated(ctx: TaskContext) -> str:
        await gate.wait()
        return "done"

    starting, reply = await start_held_at_its_election(engine, lease)
    stopping = asyncio.create_task(engine.stop(timeout=60))
    await asyncio.sleep(0)  # one loop step: the stop now waits for the start
    engine.hurry_stop(0)
    stopping.cancel()  # its caller gave up: the start goes on, and the hurry goes with the stop
    reply.set()
    await starting
    assert stopping.cancelled() and engine.state == "running"
    await engine.stop()
    # the next start, and a stop that waits for it with no hurry: its drain takes its time
    starting, reply = await start_held_at_its_election(engine, lease)
    handle = await engine.submit("gated")
    await eventually(lambda: handle.status is RunStatus.RUNNING)
    stopping = asyncio.create_task(engine.stop(timeout=60))
    await asyncio.sleep(0)
    reply.set()
    await eventually(lambda: engine.state == "stopping")
    gate.set()
    await asyncio.wait_for(asyncio.gather(starting, stopping), 10)
    assert (handle.record().status, handle.record().result) == (RunStatus.SUCCEEDED, "done")
    assert not stray_tasks()


async def test_a_follower_stopped_while_its_acquire_is_on_its_way_leaves_the_lease_free() -> None:
    # the store ran the acquire, the follower stopped before the answer came: cancelled, the
    # answer was lost and the lease stayed in the stopped node's name for a whole ttl, with no
    # leader meanwhile (on Redis, a rolling deploy's leader releasing as its follower stops)
    lease = SlowReplyLease(ttl=10.0, renew_interval=0.5)
    other = await lease.acquire("old-leader")
    assert other is not None
    (b,), contexts, _ = leader_engines(lease, "b")
    rec = Recorder(b)
    await b.start()
    try:
        assert not b.leadership().is_leader
        lease.reply = asyncio.Event()
        assert await lease.release("old-leader", other.term)
        await asyncio.wait_for(lease.applied.wait(), 10)  # b's next acquire took it; no answer yet
        stopping = asyncio.create_task(b.stop(5.0))
        await eventually(lambda: b.state != "running")
        lease.reply.set()
        await stopping
    finally:
        await b.stop(1.0)
    assert await lease.holder() is None
    assert contexts["b"] == []  # a stopping node leads nothing
    assert [e.previous_holder for e in rec.of("lease.released")] == ["b"]
    assert not stray_tasks()
