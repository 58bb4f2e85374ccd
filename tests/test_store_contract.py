"""One contract, every run store: the same tests run on MemoryStore, on SqliteStore (a real file)
and on PostgresStore (a real server, a fresh database per test).

Time moves through the stores' ``clock`` parameter; nothing sleeps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from taskwatch.engine.errors import QueueFull, RunNotFound
from taskwatch.engine.runs import Progress, RunError, RunRecord, RunStatus
from taskwatch.engine import InvalidConfiguration
from taskwatch.engine.store import (
    Cancelled,
    DuplicateRunId,
    Failed,
    Inserted,
    MemoryStore,
    NewRun,
    Retry,
    SqliteStore,
    Store,
    Succeeded,
    TriggerKeyRecord,
    UnknownStore,
    make_store,
)

from .helpers import each_store

TTL = 10.0
BOOM = RunError(type="ValueError", message="boom")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    s: Store = each_store(request.param, request, tmp_path, clock, TTL)
    async with s:
        yield s


async def insert_ids(store: Store, *runs: NewRun) -> list[str]:
    return [r.id for r in await store.insert(list(runs))]


async def claim_all(store: Store, n: int = 100, tasks: dict[str, int | None] | None = None, inc: str = "i1") -> list:
    return await store.claim("n1", inc, n, tasks if tasks is not None else {"a": None, "b": None})


# ---------------------------------------------------------------- insert and dedup


async def test_insert_returns_new_pending_rows(store: Store, clock: FakeClock) -> None:
    out = await store.insert([NewRun("a", {"x": 1}, max_attempts=3, source="api"), NewRun("b", id="fixed-id")])
    assert [i.new for i in out] == [True, True]
    assert out[1].id == "fixed-id"
    row = await store.get(out[0].id)
    assert row is not None
    assert row.status is RunStatus.PENDING
    assert (row.task, row.params, row.attempt, row.max_attempts, row.source) == ("a", {"x": 1}, 1, 3, "api")
    assert row.created_at == clock.now and row.run_after == clock.now
    assert row.lost_count == 0 and not row.cancel_requested and row.claim_token is None
    record = row.to_record()
    assert type(record) is RunRecord and record.id == row.id and record.params == {"x": 1}
    assert await store.get("nope") is None
    with pytest.raises(DuplicateRunId):
        await store.insert([NewRun("a"), NewRun("b", id="fixed-id")])
    assert (await store.counts()).pending == 2  # the refused batch left nothing behind


async def test_dedup_returns_the_pending_holder(store: Store) -> None:
    first = await store.insert([NewRun("a", key="k"), NewRun("a", key="k"), NewRun("b", key="k")])
    assert first[0].new and not first[1].new and first[1].id == first[0].id
    assert first[2].new and first[2].id != first[0].id  # keys are per task
    again = await store.insert([NewRun("a", key="k")])
    assert again[0] == (first[0].id, False)
    assert (await store.counts()).pending == 2


async def test_key_is_freed_when_its_run_leaves_pending(store: Store) -> None:
    (held,) = await insert_ids(store, NewRun("a", key="k"))
    await store.request_cancel(held)  # finished: frees the key
    (second,) = await insert_ids(store, NewRun("a", key="k"))
    assert second != held
    (claim,) = await claim_all(store)
    assert claim.run_id == second
    (third,) = await insert_ids(store, NewRun("a", key="k"))  # running runs do not hold it either
    assert third != second


async def test_retried_run_retakes_its_key_only_if_free(store: Store) -> None:
    (first,) = await insert_ids(store, NewRun("a", key="k", max_attempts=3))
    (c1,) = await claim_all(store)
    (second,) = await insert_ids(store, NewRun("a", key="k"))
    assert await store.finish(c1.token, Retry(BOOM)) is RunStatus.PENDING
    # the slot stayed with the newer run; the retried row is pending without it
    assert (await store.insert([NewRun("a", key="k")]))[0] == (second, False)
    await store.request_cancel(second)
    # the holder left pending: the retried run, still pending with the key, answers for it (a
    # new run took it, and a third charge of the card was queued beside the retry)
    assert (await store.insert([NewRun("a", key="k")]))[0] == (first, False)
    assert (await store.insert([NewRun("a", key="k")]))[0] == (first, False)
    assert (await store.counts()).pending == 1


async def test_a_retry_waiting_for_its_key_takes_it_once_the_holder_is_claimed(store: Store) -> None:
    (first,) = await insert_ids(store, NewRun("a", key="k", max_attempts=3))
    (c1,) = await claim_all(store)
    (second,) = await insert_ids(store, NewRun("a", key="k"))
    assert await store.finish(c1.token, Retry(BOOM, delay=60)) is RunStatus.PENDING  # backing off
    (c2,) = await claim_all(store)
    assert c2.run_id == second
    # pending for its retry, the first run holds the key again: a submit with it is answered
    # with that run, by the store alone (the engine's index may not know of the hand-over)
    assert (await store.insert([NewRun("a", key="k")]))[0] == (first, False)
    assert (await store.insert([NewRun("a", key="k"), NewRun("a", key="k")])) == [(first, False), (first, False)]
    assert (await store.counts()).pending == 1
    await store.request_cancel(first)
    assert (await store.insert([NewRun("a", key="k")]))[0].new  # nothing waits for it any more


async def test_max_pending_refuses_the_whole_batch(store: Store) -> None:
    await store.insert([NewRun("a", key="k"), NewRun("a"), NewRun("a")], max_pending=3)
    with pytest.raises(QueueFull):
        await store.insert([NewRun("b")], max_pending=3)
    with pytest.raises(QueueFull):
        await store.insert([NewRun("b", id="x1"), NewRun("b", id="x2")], max_pending=4)
    assert await store.get("x1") is None
    counts = await store.counts()
    assert counts.pending == 3 and counts.inserted_total == 3
    # a dedup hit adds nothing, so it is not refused
    assert not (await store.insert([NewRun("a", key="k")], max_pending=3))[0].new
    await claim_all(store, 1)
    assert (await store.insert([NewRun("b")], max_pending=3))[0].new


async def test_bulk_insert_of_many(store: Store) -> None:
    out = await store.insert([NewRun("a", {"i": i}) for i in range(2000)])
    assert len({i.id for i in out}) == 2000
    assert (await store.counts()).pending == 2000


# ---------------------------------------------------------------- claim


async def test_claim_is_fifo_within_the_global_limit(store: Store, clock: FakeClock) -> None:
    ids = await insert_ids(store, *(NewRun("a" if i % 2 else "b", {"i": i}) for i in range(6)))
    claims = await claim_all(store, 4)
    assert [c.run_id for c in claims] == ids[:4]
    assert len({c.token for c in claims}) == 4
    c = claims[0]
    assert c.attempt == 1 and c.started_at == clock.now and c.lease_until == clock.now + TTL
    row = await store.get(c.run_id)
    assert row is not None and row.status is RunStatus.RUNNING
    assert (row.node, row.incarnation, row.claim_token) == ("n1", "i1", c.token)
    assert [c.run_id for c in await claim_all(store, 4)] == ids[4:]
    assert await claim_all(store, 4) == []
    counts = await store.counts()
    assert counts.running == 6 and counts.pending == 0


async def test_claim_respects_per_task_limits_and_listed_tasks(store: Store) -> None:
    a = await insert_ids(store, *(NewRun("a") for _ in range(3)))
    b = await insert_ids(store, *(NewRun("b") for _ in range(3)))
    c = await insert_ids(store, NewRun("c"))
    got = await store.claim("n1", "i1", 10, {"a": 1, "b": None, "c": 0})
    assert [x.run_id for x in got] == [a[0], *b]
    assert await store.claim("n1", "i1", 10, {"a": 0, "c": 0}) == []
    assert await store.claim("n1", "i1", 0, {"a": None}) == []
    assert [x.run_id for x in await store.claim("n1", "i1", 10, {"c": 2})] == c
    assert [x.run_id for x in await store.claim("n1", "i1", 1, {"a": None})] == [a[1]]


async def test_a_concurrency_limit_counts_every_nodes_running_runs(store: Store) -> None:
    a = await insert_ids(store, *(NewRun("a") for _ in range(5)))
    b = await insert_ids(store, *(NewRun("b") for _ in range(2)))
    # another node runs one run of "a": with a limit of 2, this node may start one more
    (other,) = await store.claim("n2", "i2", 1, {"a": None})
    got = await store.claim("n1", "i1", 10, {"a": None, "b": None}, limits={"a": 2})
    assert [x.run_id for x in got] == [a[1], *b]
    assert await store.claim("n1", "i1", 10, {"a": None}, limits={"a": 2}) == []
    # the node's own room still bounds it when the cluster has more
    assert await store.claim("n1", "i1", 10, {"a": 0}, limits={"a": 5}) == []
    # the other node's run ends: its slot is free for anyone
    assert await store.finish(other.token, Succeeded()) is RunStatus.SUCCEEDED
    assert [x.run_id for x in await store.claim("n1", "i1", 10, {"a": None}, limits={"a": 2})] == [a[2]]
    # without limits nothing is counted
    assert [x.run_id for x in await store.claim("n1", "i1", 10, {"a": None})] == a[3:]


async def test_claim_waits_for_run_after(store: Store, clock: FakeClock) -> None:
    (later,) = await insert_ids(store, NewRun("a", delay=5))
    (now,) = await insert_ids(store, NewRun("a"))
    assert [c.run_id for c in await claim_all(store)] == [now]
    clock.advance(4.9)
    assert await claim_all(store) == []
    clock.advance(0.2)
    assert [c.run_id for c in await claim_all(store)] == [later]


# ---------------------------------------------------------------- finish


async def test_finish_outcomes_and_stale_tokens(store: Store, clock: FakeClock) -> None:
    ids = await insert_ids(store, NewRun("a"), NewRun("a"), NewRun("a"))
    c1, c2, c3 = await claim_all(store)
    clock.advance(2)
    assert await store.finish(c1.token, Succeeded({"ok": [1, 2]})) is RunStatus.SUCCEEDED
    assert await store.finish(c1.token, Failed(BOOM)) is None  # already finished: nothing written
    assert await store.finish("123.deadbeef", Succeeded()) is None
    assert await store.finish("garbage", Succeeded()) is None
    assert await store.finish(c2.token, Failed(BOOM)) is RunStatus.FAILED
    assert await store.finish(c3.token, Cancelled("shutdown")) is RunStatus.CANCELLED
    r1, r2, r3 = [await store.get(i) for i in ids]
    assert r1 is not None and r2 is not None and r3 is not None
    assert r1.status is RunStatus.SUCCEEDED and r1.result == {"ok": [1, 2]} and r1.error is None
    assert r1.finished_at == clock.now and r1.duration == 2 and r1.claim_token is None
    assert r2.status is RunStatus.FAILED and r2.error == BOOM
    assert r3.status is RunStatus.CANCELLED and r3.cancel_reason == "shutdown"
    counts = await store.counts()
    assert (counts.succeeded_total, counts.failed_total, counts.cancelled_total) == (1, 1, 1)


async def test_retry_puts_the_row_back_pending_and_due_later(store: Store, clock: FakeClock) -> None:
    (run_id,) = await insert_ids(store, NewRun("a", max_attempts=3))
    (c,) = await claim_all(store)
    assert await store.finish(c.token, Retry(BOOM, delay=3)) is RunStatus.PENDING
    row = await store.get(run_id)
    assert row is not None
    assert row.status is RunStatus.PENDING and row.attempt == 2 and row.error == BOOM
    assert row.run_after == clock.now + 3 and row.claim_token is None and row.node is None
    assert await claim_all(store) == []
    clock.advance(3)
    (c2,) = await claim_all(store)
    assert c2.run_id == run_id and c2.attempt == 2 and c2.token != c.token
    assert await store.finish(c.token, Succeeded()) is None  # the first attempt's token is stale
    assert await store.finish(c2.token, Succeeded(7)) is RunStatus.SUCCEEDED
    assert (await store.counts()).retried_total == 1


# ---------------------------------------------------------------- cancel and heartbeat


async def test_cancel_pending_running_and_finished(store: Store) -> None:
    p, r = await insert_ids(store, NewRun("a"), NewRun("b"))
    done = await store.request_cancel(p)
    assert done.action == "cancelled" and done.run.status is RunStatus.CANCELLED and done.run.cancel_reason == "user"
    (c,) = await claim_all(store)
    assert c.run_id == r  # the cancelled pending run is never claimed
    asked = await store.request_cancel(r, "shutdown")
    assert asked.action == "requested" and asked.run.status is RunStatus.RUNNING and asked.run.cancel_requested
    hb = await store.heartbeat("i1", [c.token])
    assert hb.cancel == {c.token: "shutdown"} and hb.lost == []
    assert await store.finish(c.token, Cancelled("shutdown")) is RunStatus.CANCELLED
    late = await store.request_cancel(r)
    assert late.action == "finished" and late.run.status is RunStatus.CANCELLED
    with pytest.raises(RunNotFound):
        await store.request_cancel("missing")


async def test_a_retry_of_a_run_asked_to_cancel_ends_cancelled(store: Store) -> None:
    (run_id,) = await insert_ids(store, NewRun("a", max_attempts=5))
    (c,) = await claim_all(store)
    await store.request_cancel(run_id)
    assert await store.finish(c.token, Retry(BOOM)) is RunStatus.CANCELLED
    row = await store.get(run_id)
    assert row is not None and row.status is RunStatus.CANCELLED and row.cancel_reason == "user"


async def test_heartbeat_extends_the_lease_and_writes_progress(store: Store, clock: FakeClock) -> None:
    (run_id,) = await insert_ids(store, NewRun("a"))
    (c,) = await claim_all(store)
    for _ in range(3):
        clock.advance(TTL * 0.8)
        hb = await store.heartbeat("i1", [c.token], {c.token: Progress(done=3, total=10, message="x")})
        assert hb.lost == [] and hb.cancel == {}
        assert await store.recover() == []
    row = await store.get(run_id)
    assert row is not None and row.lease_until == clock.now + TTL
    assert row.progress == Progress(done=3, total=10, message="x")
    # another incarnation cannot keep someone else's claim alive
    assert (await store.heartbeat("other", [c.token])).lost == [c.token]


# ---------------------------------------------------------------- recovery


async def test_expired_claim_is_requeued_with_attempt_and_lost_count(store: Store, clock: FakeClock) -> None:
    (run_id,) = await insert_ids(store, NewRun("a", max_attempts=1))
    (c,) = await claim_all(store)
    clock.advance(TTL - 1)
    assert await store.recover() == []
    clock.advance(2)
    (rec,) = await store.recover()
    assert (rec.run_id, rec.action, rec.reason, rec.attempt, rec.lost_count) == (run_id, "requeued", "lease_expired", 2, 1)
    assert (rec.node, rec.incarnation) == ("n1", "i1")
    row = await store.get(run_id)
    assert row is not None and row.status is RunStatus.PENDING and row.attempt == 2 and row.lost_count == 1
    assert row.error is not None and row.error.type == "WorkerLost" and row.claim_token is None
    hb = await store.heartbeat("i1", [c.token])
    assert hb.lost == [c.token]
    assert await store.finish(c.token, Succeeded()) is None
    (c2,) = await claim_all(store)
    assert c2.run_id == run_id and c2.lost_count == 1
    assert (await store.counts()).lost_total == 1


async def test_third_loss_fails_the_run_as_worker_lost(store: Store, clock: FakeClock) -> None:
    (run_id,) = await insert_ids(store, NewRun("a"))
    actions = []
    for _ in range(3):
        assert len(await claim_all(store)) == 1
        clock.advance(TTL + 1)
        (rec,) = await store.recover()
        actions.append(rec.action)
    assert actions == ["requeued", "requeued", "failed"]
    row = await store.get(run_id)
    assert row is not None and row.status is RunStatus.FAILED and row.lost_count == 3
    assert row.error is not None and row.error.type == "WorkerLost" and "3 times" in row.error.message
    assert await claim_all(store) == []


async def test_on_lost_fail_fails_at_the_first_loss(store: Store, clock: FakeClock) -> None:
    (run_id,) = await insert_ids(store, NewRun("a", on_lost="fail"))
    await claim_all(store)
    clock.advance(TTL + 1)
    (rec,) = await store.recover()
    assert rec.action == "failed"
    row = await store.get(run_id)
    assert row is not None and row.status is RunStatus.FAILED and row.error is not None
    assert row.error.type == "WorkerLost" and "on_lost='fail'" in row.error.message


async def test_restarted_node_orphans_its_previous_incarnation_at_once(store: Store) -> None:
    await store.register_node("n1", "old", "1.0")
    await store.register_node("n2", "other", "1.0")
    old_run, other_run = await insert_ids(store, NewRun("a"), NewRun("a"))
    (c_old,) = await store.claim("n1", "old", 1, {"a": None})
    (c_other,) = await store.claim("n2", "other", 1, {"a": None})
    assert await store.recover() == []  # leases fresh, owners alive
    await store.register_node("n1", "new", "1.1")  # same node id, new process
    (rec,) = await store.recover()  # no time passed: the old incarnation is provably gone
    assert (rec.run_id, rec.reason, rec.action) == (old_run, "owner_restarted", "requeued")
    assert (await store.get(other_run)).status is RunStatus.RUNNING  # type: ignore[union-attr]
    assert await store.finish(c_old.token, Succeeded()) is None


async def test_an_incarnation_a_restart_replaced_claims_nothing(store: Store) -> None:
    # the others count it gone and recover what it holds at once: a process resumed from a
    # pause shorter than a lease, not yet told by a heartbeat, would run those runs twice
    await store.register_node("n1", "old", "1.0")
    await insert_ids(store, NewRun("a"), NewRun("a"))
    await store.register_node("n1", "new", "1.1")  # same node id, new process
    assert await store.claim("n1", "old", 2, {"a": None}) == []
    assert await store.claim("n1", "old", 2, {"a": None}, limits={"a": 5}) == []
    assert len(await store.claim("n1", "new", 2, {"a": None})) == 2
    assert await store.node_heartbeat("old", 0) is True  # and its next heartbeat tells it


async def test_stopped_or_silent_incarnations_are_gone(store: Store, clock: FakeClock) -> None:
    await store.register_node("n1", "i1", "1.0")
    await store.register_node("n2", "i2", "1.0")
    await insert_ids(store, NewRun("a"), NewRun("a"))
    await store.claim("n1", "i1", 1, {"a": None})
    (c2,) = await store.claim("n2", "i2", 1, {"a": None})
    await store.node_stopped("i1")
    (rec,) = await store.recover()
    assert rec.reason == "owner_stopped"
    # i2 keeps its claim's lease alive but its node stops heartbeating: silent beyond the node ttl
    clock.advance(TTL * 0.6)
    await store.heartbeat("i2", [c2.token])
    clock.advance(TTL * 0.6)
    (rec2,) = await store.recover()
    assert rec2.reason == "owner_silent" and rec2.incarnation == "i2"


async def test_missing_node_row_recovers_only_after_lease_expiry(store: Store, clock: FakeClock) -> None:
    await store.register_node("n1", "i1", "1.0")
    (run_id,) = await insert_ids(store, NewRun("a"))
    await store.claim("ghost-node", "ghost", 1, {"a": None})  # never registered (or its row was pruned)
    assert await store.recover() == []
    clock.advance(TTL + 1)
    (rec,) = await store.recover()
    assert rec.run_id == run_id and rec.reason == "lease_expired"


async def test_live_incarnations_argument(store: Store) -> None:
    await insert_ids(store, NewRun("a"), NewRun("a"))
    await store.claim("n1", "alive", 1, {"a": None})
    (dead,) = await store.claim("n2", "dead", 1, {"a": None})
    (rec,) = await store.recover(live_incarnations={"alive"})
    assert rec.run_id == dead.run_id and rec.reason == "owner_not_live"


async def test_cancel_requested_run_of_a_dead_owner_ends_cancelled(store: Store, clock: FakeClock) -> None:
    (run_id,) = await insert_ids(store, NewRun("a"))
    await claim_all(store)
    await store.request_cancel(run_id)
    clock.advance(TTL + 1)
    (rec,) = await store.recover()
    assert rec.action == "cancelled"
    row = await store.get(run_id)
    assert row is not None and row.status is RunStatus.CANCELLED and row.cancel_reason == "user"
    assert row.lost_count == 1


# ---------------------------------------------------------------- prune, query, counts


async def test_prune_by_count_and_age_never_touches_pending_or_running(store: Store, clock: FakeClock) -> None:
    finished = []
    for _ in range(6):
        (run_id,) = await insert_ids(store, NewRun("a"))
        (c,) = await claim_all(store)
        await store.finish(c.token, Succeeded())
        finished.append(run_id)
        clock.advance(10)
    (running,) = await insert_ids(store, NewRun("a"))
    await claim_all(store)
    (pending,) = await insert_ids(store, NewRun("a"))
    clock.advance(1000)
    # finished at t0, t0+10, ... t0+50; now t0+1060: older than 1045 s are the first two
    assert await store.prune(older_than=1045) == 2
    assert [await store.get(i) for i in finished[:2]] == [None, None]
    assert await store.prune(keep=3) == 1
    assert await store.get(finished[2]) is None and await store.get(finished[3]) is not None
    assert await store.prune(keep=0, older_than=0) == 3
    assert await store.get(running) is not None and await store.get(pending) is not None
    counts = await store.counts()
    assert counts.by_status["succeeded"] == 0 and counts.succeeded_total == 6
    assert counts.pending == 1 and counts.running == 1


async def test_query_pages_newest_first_with_a_cursor(store: Store, clock: FakeClock) -> None:
    ids = []
    for i in range(25):
        ids += await insert_ids(store, NewRun("a" if i % 5 else "b", {"i": i}))
        clock.advance(1)
    seen: list[str] = []
    page = await store.query(limit=10)
    sizes = []
    while True:
        sizes.append(len(page.runs))
        seen += [r.id for r in page.runs]
        if page.next is None:
            break
        page = await store.query(limit=10, before=page.next)
    assert sizes == [10, 10, 5] and seen == ids[::-1]
    only_b = await store.query(task="b", limit=100)
    assert [r.id for r in only_b.runs] == [ids[i] for i in (20, 15, 10, 5, 0)] and only_b.next is None
    recent = await store.query(since=clock.now - 3, limit=100)
    assert [r.id for r in recent.runs] == ids[:-4:-1]
    await claim_all(store, 2, {"a": None})
    running = await store.query(status="running")
    assert {r.id for r in running.runs} == {ids[1], ids[2]}
    assert (await store.query(status=RunStatus.FAILED)).runs == []
    with pytest.raises(ValueError, match="cursor"):
        await store.query(before="not-a-cursor")


async def test_counts_by_status_and_totals(store: Store) -> None:
    await insert_ids(store, *(NewRun("a") for _ in range(4)))
    c1, c2 = await claim_all(store, 2)
    await store.finish(c1.token, Failed(BOOM))
    counts = await store.counts()
    assert counts.by_status == {"pending": 2, "running": 1, "succeeded": 0, "failed": 1, "cancelled": 0}
    assert counts.inserted_total == 4 and counts.failed_total == 1


# ---------------------------------------------------------------- nodes, small state, wakeups


async def test_nodes_table(store: Store, clock: FakeClock) -> None:
    info = await store.register_node("n1", "i1", "1.2.3")
    assert (info.node, info.incarnation, info.version, info.started_at) == ("n1", "i1", "1.2.3", clock.now)
    clock.advance(5)
    assert (info.cpu_percent, info.rss_bytes) == (None, None)  # no heartbeat yet
    await store.node_heartbeat("i1", running=7, cpu_percent=12.5, rss_bytes=3 << 30)
    await store.node_heartbeat("unknown", running=1)  # no row: ignored
    await store.register_node("n2", "i2", "1.2.3")
    await store.node_heartbeat("i2", running=0)  # an engine that samples no health
    await store.node_stopped("i2")
    n1, n2 = await store.nodes()
    assert n1.last_heartbeat == clock.now and n1.running == 7 and n1.stopped_at is None
    assert (n1.cpu_percent, n1.rss_bytes) == (12.5, 3 << 30)  # RSS past 2 GiB: a 64-bit column
    assert n2.stopped_at == clock.now and (n2.cpu_percent, n2.rss_bytes) == (None, None)


async def test_a_node_heartbeat_tells_an_incarnation_that_a_later_start_of_its_node_replaced_it(
    store: Store, clock: FakeClock
) -> None:
    await store.register_node("web", "paused", "1.0")
    await store.register_node("batch", "other", "1.0")
    assert await store.node_heartbeat("paused", running=2) is False
    clock.advance(1)
    await store.register_node("web", "restarted", "1.0")  # the same node id started again
    assert await store.node_heartbeat("paused", running=2) is True
    assert await store.node_heartbeat("restarted", running=0) is False
    assert await store.node_heartbeat("other", running=0) is False  # another node id: not replaced
    assert await store.node_heartbeat("unknown", running=0) is False
    # still replaced after the newer one stopped: the others count the paused one gone all the same
    await store.node_stopped("restarted")
    assert await store.node_heartbeat("paused", running=2) is True
    # the heartbeat was written all the same (the row shows the process is there)
    (paused,) = [n for n in await store.nodes() if n.incarnation == "paused"]
    assert paused.last_heartbeat == clock.now and paused.running == 2


async def test_of_two_starts_of_a_node_in_the_same_instant_the_later_registered_replaces_the_other(
    store: Store, clock: FakeClock
) -> None:
    await store.register_node("web", "first", "1.0")
    await store.register_node("web", "second", "1.0")  # same clock reading
    assert await store.node_heartbeat("first", running=0) is True
    assert await store.node_heartbeat("second", running=0) is False


async def test_dead_incarnations_are_pruned_and_their_runs_still_recovered(store: Store, clock: FakeClock) -> None:
    await store.register_node("web", "stopped-early", "1.0")
    await store.node_stopped("stopped-early")
    await store.register_node("web", "went-silent", "1.0")
    await store.register_node("batch", "suspended", "1.0")  # silent, but nothing replaced it
    (run_id,) = await insert_ids(store, NewRun("a"))
    await store.claim("web", "went-silent", 1, {"a": None})  # then its process vanished
    clock.advance(50)
    await store.register_node("worker", "alive", "1.0")
    await store.register_node("web", "stopped-late", "1.0")  # web started again
    await store.node_stopped("stopped-late")
    clock.advance(50)
    await store.node_heartbeat("alive", running=0)
    # gone 100 s and 50 s ago; an hour of retention keeps every row
    assert await store.prune_nodes(3600) == 0
    assert await store.prune_nodes(60) == 2
    assert [n.incarnation for n in await store.nodes()] == ["suspended", "alive", "stopped-late"]
    # the silent incarnation's run has no node row any more: its lease still brings it back
    (rec,) = await store.recover()
    assert rec.run_id == run_id and rec.reason == "lease_expired" and rec.action == "requeued"


async def test_periodic_last_fire(store: Store) -> None:
    assert await store.get_periodic("nightly") is None
    await store.set_periodic("nightly", 123.5)
    await store.set_periodic("nightly", 456.5)
    assert await store.get_periodic("nightly") == 456.5


async def test_trigger_keys_are_saved_per_trigger_and_replaced_per_key(store: Store) -> None:
    await store.register_node("n1", "i1", "1")
    assert await store.adopt_trigger("t", "i1", own=True) == {}
    await store.save_trigger("t", "i1", {"k": TriggerKeyRecord(count=3, first_seen_at=5.0), "k2": TriggerKeyRecord(count=1)})
    await store.save_trigger("t", "i1", {"k": TriggerKeyRecord(count=4, captured=4, run_id="r1", first_seen_at=5.0)})
    await store.save_trigger("other", "i1", {"k": TriggerKeyRecord(count=9)})
    keys = await store.adopt_trigger("t", "i1", own=True)
    assert keys == {
        "k": TriggerKeyRecord(count=4, captured=4, run_id="r1", first_seen_at=5.0),
        "k2": TriggerKeyRecord(count=1),
    }


async def test_forgotten_trigger_keys_are_deleted_and_only_those(store: Store) -> None:
    await store.register_node("n1", "i1", "1")
    await store.save_trigger("t", "i1", {"a": TriggerKeyRecord(count=0), "b": TriggerKeyRecord(count=2)})
    await store.save_trigger("other", "i1", {"a": TriggerKeyRecord(count=9)})
    await store.save_trigger("t", "i1", {"c": TriggerKeyRecord(count=1)}, forget=["a", "never-saved"])
    assert await store.adopt_trigger("t", "i1", own=True) == {"b": TriggerKeyRecord(count=2), "c": TriggerKeyRecord(count=1)}
    assert await store.adopt_trigger("other", "i1", own=True) == {"a": TriggerKeyRecord(count=9)}
    # a key forgotten and saved afresh in one call is kept, as saved
    await store.save_trigger("t", "i1", {"b": TriggerKeyRecord(count=5)}, forget=["b"])
    assert (await store.adopt_trigger("t", "i1", own=True))["b"] == TriggerKeyRecord(count=5)


async def test_queue_jobs_are_kept_until_done_and_adopted_only_from_gone_holders(store: Store, clock: FakeClock) -> None:
    await store.register_node("n1", "i1", "1")
    await store.register_node("n2", "i2", "1")
    a, b = await store.put_jobs("emails", "i1", [{"to": "a"}, {"to": "b"}])
    [c] = await store.put_jobs("emails", "i2", [{"to": "c"}])
    [other] = await store.put_jobs("other", "i1", [[1, 2]])
    assert a < b < c
    # i1 and i2 are alive: nobody else may take their jobs; i1 may take its own back
    assert await store.adopt_jobs("emails", "i3") == []
    assert [j.job for j in await store.adopt_jobs("emails", "i1", own=True)] == [{"to": "a"}, {"to": "b"}]
    await store.done_jobs([a])
    await store.node_stopped("i1")
    await store.register_node("n3", "i3", "1")
    adopted = await store.adopt_jobs("emails", "i3")
    assert [(j.id, j.job) for j in adopted] == [(b, {"to": "b"})]
    assert await store.adopt_jobs("emails", "i4") == []  # i3 holds it now and is alive
    clock.advance(TTL + 1)  # i2 falls silent; i3 keeps heartbeating
    await store.node_heartbeat("i3", running=0)
    assert [j.id for j in await store.adopt_jobs("emails", "i4")] == [c]
    [d] = await store.put_jobs("emails", "never-registered", [{"to": "d"}])
    assert [j.id for j in await store.adopt_jobs("emails", "i4")] == [d]  # c is i4's already
    await store.done_jobs([b, c, d])
    assert await store.adopt_jobs("emails", "i5", own=True) == []
    assert [j.job for j in await store.adopt_jobs("other", "i5")] == [[1, 2]]
    assert other not in (a, b, c)


async def test_a_queue_job_counts_each_handover_to_a_new_holder(store: Store, clock: FakeClock) -> None:
    await store.register_node("n1", "i1", "1")
    [job] = await store.put_jobs("q", "i1", [{"n": 1}])
    # its own holder taking it back (a retake after a lapse) hands nothing over
    assert [(j.id, j.handovers) for j in await store.adopt_jobs("q", "i1", own=True)] == [(job, 0)]
    await store.node_stopped("i1")
    await store.register_node("n1", "i2", "1")  # the same node, started again
    assert [(j.id, j.handovers) for j in await store.adopt_jobs("q", "i2", own=True)] == [(job, 1)]
    assert [j.handovers for j in await store.adopt_jobs("q", "i2", own=True)] == [1]
    clock.advance(TTL + 1)  # i2 falls silent
    await store.register_node("n2", "i3", "1")
    assert [(j.id, j.handovers) for j in await store.adopt_jobs("q", "i3")] == [(job, 2)]
    [fresh] = await store.put_jobs("q", "i3", [{"n": 2}])
    assert [(j.id, j.handovers) for j in await store.adopt_jobs("q", "i3", own=True)] == [(job, 2), (fresh, 0)]


async def test_get_many(store: Store) -> None:
    ids = await insert_ids(store, NewRun("a", {"i": 1}), NewRun("b", {"i": 2}))
    (c,) = await claim_all(store, 1)
    rows = await store.get_many([*ids, "missing"])
    assert set(rows) == set(ids)
    assert rows[ids[0]].status is RunStatus.RUNNING and rows[ids[0]].claim_token == c.token
    assert rows[ids[1]].params == {"i": 2} and rows[ids[1]].status is RunStatus.PENDING
    assert await store.get_many([]) == {}


async def test_claim_periodic_takes_each_slot_once(store: Store) -> None:
    assert await store.claim_periodic("p", 100.0)
    assert not await store.claim_periodic("p", 100.0)  # a second node with the same slot skips it
    assert not await store.claim_periodic("p", 99.0)
    assert await store.claim_periodic("p", 110.0, gap=9.999)  # one interval later
    assert not await store.claim_periodic("p", 115.0, gap=9.999)  # less than an interval after the last
    assert await store.get_periodic("p") == 110.0
    assert await store.claim_periodic("other", 1.0)  # slots are per periodic task


async def test_a_periodic_slot_and_its_run_are_stored_both_or_neither(store: Store) -> None:
    [first] = await store.claim_periodic_run("p", 100.0, 0.0, NewRun("p", source="periodic:p"))
    assert first.new and (await store.get(first.id)) is not None
    assert await store.claim_periodic_run("p", 100.0, 0.0, NewRun("p")) == []  # the slot is taken: no run
    assert [r.id for r in (await store.query(task="p")).runs] == [first.id]
    [claim] = await store.claim("n1", "i1", 1, {"p": None})
    await store.finish(claim.token, Succeeded())
    # a full queue refuses the run and, with it, the claim: the slot can still be fired
    await store.insert([NewRun("other")])
    with pytest.raises(QueueFull):
        await store.claim_periodic_run("p", 200.0, 0.0, NewRun("p"), max_pending=1)
    assert await store.get_periodic("p") == 100.0
    [later] = await store.claim_periodic_run("p", 200.0, 0.0, NewRun("p"), max_pending=2)
    assert later.new and await store.get_periodic("p") == 200.0


async def test_a_periodic_slot_passes_without_a_run_while_one_of_its_task_is_going(store: Store) -> None:
    [first] = await store.claim_periodic_run("p", 100.0, 0.0, NewRun("p", source="periodic:p"))
    [claim] = await store.claim("n1", "i1", 1, {"p": None})  # running, on some node
    if isinstance(store, MemoryStore):
        # one node's store, whose scheduler holds its next run back itself: the store inserts
        [second] = await store.claim_periodic_run("p", 200.0, 0.0, NewRun("p"))
        assert second.new and second.id != first.id
        return
    # the next slot is claimed (no other node fires it) and names the run still going
    assert await store.claim_periodic_run("p", 200.0, 0.0, NewRun("p")) == [Inserted(first.id, False)]
    assert await store.get_periodic("p") == 200.0
    assert [r.id for r in (await store.query(task="p")).runs] == [first.id]
    await store.finish(claim.token, Succeeded())
    [third] = await store.claim_periodic_run("p", 300.0, 0.0, NewRun("p"))
    assert third.new and third.id != first.id


async def test_wakeups_for_work_cancels_and_finished(store: Store) -> None:
    sub = store.subscribe(finished=True)
    assert not sub.poll()
    await store.insert([NewRun("a"), NewRun("a")])
    w = await sub.wait(timeout=1)
    assert w.work and not w.cancels
    c1, c2 = await claim_all(store)
    await store.request_cancel(c1.run_id)
    await store.finish(c2.token, Succeeded())
    w = await sub.wait(timeout=1)
    assert w.cancels == {c1.run_id} and w.finished == {c2.run_id}
    assert not await sub.wait(timeout=0.01)  # nothing new: empty after the timeout


# ---------------------------------------------------------------- make_store


async def test_make_store_specs(tmp_path: Path) -> None:
    assert isinstance(make_store("memory"), MemoryStore)
    mem = MemoryStore()
    assert make_store(mem) is mem
    s = make_store(f"sqlite:///{tmp_path}/a.db?synchronous=full&busy_timeout=100")
    assert isinstance(s, SqliteStore)
    assert (s.path, s.synchronous, s.busy_timeout) == (f"{tmp_path}/a.db", "full", 100)
    rel = make_store("sqlite:///runs.db")
    assert isinstance(rel, SqliteStore) and rel.path == "runs.db"
    for bad in ("redis://x", "sqlite://host/x.db", "sqlite:///", "mem"):
        with pytest.raises(UnknownStore):
            make_store(bad)
    # a '#' began a fragment: 'jobs#2.db?synchronous=full' named the file 'jobs', synchronous normal
    for bad in ("sqlite:///jobs#2.db?synchronous=full", "sqlite:///team#a/runs.db", "sqlite:///runs.db#"):
        with pytest.raises(UnknownStore, match="write it as %23"):
            make_store(bad)
    hashed = make_store(f"sqlite:///{tmp_path}/jobs%232.db?synchronous=full")
    assert isinstance(hashed, SqliteStore) and (hashed.path, hashed.synchronous) == (f"{tmp_path}/jobs#2.db", "full")
    # a store the URL names well, with an option it cannot take
    for bad, why in [("sqlite:///a.db?colour=red", "unknown option 'colour'"), ("sqlite:///a.db?busy_timeout=x", "not a valid int")]:
        with pytest.raises(InvalidConfiguration, match=f"run store sqlite:///a.db.*{why}"):
            make_store(bad)
    for bad in ("sqlite:///a.db?synchronous=sometimes", "sqlite:///a.db?busy_timeout=-1"):
        with pytest.raises(InvalidConfiguration, match="SqliteStore"):
            make_store(bad)
