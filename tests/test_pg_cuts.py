"""Operations of the PostgreSQL store and its event relay whose commit answer is cut off.

The server committed, the client sees its connection reset and tries again
(``tests/cutting_proxy.py`` makes exactly that happen on a real server). The
second try must report what the first one did, not act on its work as if
someone else had done it: a cancel that landed is reported as done and
announced, jobs adopted or put once are handed out once, a periodic slot the
first try claimed is still this caller's (and only its), and an event batch
written again reaches readers once, while a node that really restarted still
gets through. Schema 5 (the nonces and the events' bus) migrates an older
database, however many nodes open it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from taskwatch.engine import Engine, PostgresEventRelay, TaskContext
from taskwatch.engine.events import BaseEvent, EngineStarted, RunSucceeded, event_to_json
from taskwatch.engine.runs import RunStatus
from taskwatch.engine.errors import DuplicateRunId, StoreError, StoreUnavailable
from taskwatch.engine.store import Inserted, NewRun, PostgresStore
from taskwatch.engine.store import queries as Q
from taskwatch.engine.store.base import Subscription

from .cutting_proxy import CuttingProxy
from .helpers import eventually
from .postgres_server import PostgresServer, schema_script

TTL = 10.0
#: generous bounds for a loaded machine; a passing run takes a fraction of them
TIMEOUT = 30.0


@contextlib.asynccontextmanager
async def proxied(server: PostgresServer, url: str) -> AsyncIterator[tuple[CuttingProxy, PostgresStore]]:
    """A node whose one connection goes through a proxy that can cut it."""
    async with CuttingProxy(server.port) as proxy:
        node = PostgresStore(proxy.url(url), lease_ttl=TTL, pool_size=1)
        async with node:
            yield proxy, node


def _db(url: str) -> str:
    return url.rsplit("/", 1)[1]


# ---------------------------------------------------------------- cancels


async def test_a_cancel_of_a_pending_run_whose_commit_answer_is_lost_is_reported_done(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with PostgresStore(postgres_url, lease_ttl=TTL) as other, proxied(postgres_server, postgres_url) as (proxy, node):
        await other.wait_listening()
        sub = other.subscribe(finished=True)
        [r] = await node.insert([NewRun("t")])
        proxy.cut_after(lambda c: b"FOR UPDATE" in c, lambda c: b"COMMIT" in c)
        result = await node.request_cancel(r.id)
        assert proxy.cuts == 1
        # the cancel happened: the caller is told so, not "too late, it finished"
        assert result.action == "cancelled" and result.run.status is RunStatus.CANCELLED
        stored = await node.get(r.id)
        assert stored is not None and stored.status is RunStatus.CANCELLED
        assert (await node.counts()).cancelled_total == 1  # counted once, by the first try
        # and the other nodes hear that it ended (the first try's notification never went out)
        await _heard(sub, "finished", r.id)


async def test_a_cancel_of_a_running_run_whose_commit_answer_is_lost_reaches_its_owner(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with PostgresStore(postgres_url, lease_ttl=TTL) as owner, proxied(postgres_server, postgres_url) as (proxy, node):
        await owner.wait_listening()
        sub = owner.subscribe()
        [r] = await owner.insert([NewRun("t")])
        [claim] = await owner.claim("owner", "inc-owner", 1, {"t": None})
        proxy.cut_after(lambda c: b"FOR UPDATE" in c, lambda c: b"COMMIT" in c)
        result = await node.request_cancel(r.id)
        assert proxy.cuts == 1
        assert result.action == "requested" and result.run.cancel_requested
        # the owner is told now, not at its next heartbeat
        await _heard(sub, "cancels", r.id)
        assert claim.run_id == r.id


async def _heard(sub: Subscription, what: str, run_id: str) -> None:
    seen: set[str] = set()

    def got() -> bool:
        seen.update(getattr(sub.poll(), what))
        return run_id in seen

    await eventually(got, timeout=TIMEOUT)


async def test_engine_cancel_of_a_pending_run_whose_commit_answer_is_lost_returns_the_cancelled_run(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with CuttingProxy(postgres_server.port) as proxy:
        gate = asyncio.Event()
        e = Engine(store=proxy.url(postgres_url), node_id="n", max_concurrency=1, health_interval=None, lease_ttl=30)

        @e.task
        async def hang(ctx: TaskContext) -> None:
            await gate.wait()

        async with e:
            await e.submit("hang")
            await eventually(lambda: e.stats().running == 1, TIMEOUT)
            h = await e.submit("hang")  # stays pending: the only slot is taken
            # the cancel's own row lock (a claim's has SKIP LOCKED), then its commit
            proxy.cut_after(lambda c: b"FOR UPDATE" in c and b"SKIP" not in c, lambda c: b"COMMIT" in c)
            try:
                record = await e.cancel(h.id)
                assert proxy.cuts == 1
                assert record.status is RunStatus.CANCELLED
                await eventually(lambda: e.get(h.id).status is RunStatus.CANCELLED, TIMEOUT)
            finally:
                gate.set()


async def test_runs_whose_insert_was_given_up_after_its_commit_went_through_insert_again_as_themselves(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # the engine puts a batch of submit_nowait runs back when the store stays away past its
    # reconnect_timeout, and writes it again later: the rows of a try that did commit are its own
    async with CuttingProxy(postgres_server.port) as proxy:
        node = PostgresStore(proxy.url(postgres_url), lease_ttl=TTL, pool_size=1, reconnect_timeout=0.5)
        async with node:
            await node.insert([NewRun("t")])  # the statement is prepared: one chunk per call
            runs = [NewRun("t", id=f"chosen-{i}", created_at=1_000.0 + i) for i in range(3)]
            # the insert's Bind: executed and committed on its own, its answer never arrives
            proxy.cut_after(lambda c: c[:1] == b"B" and b"chosen-0" in c, then_refuse=True)
            with pytest.raises(StoreUnavailable):
                await node.insert(runs)
            assert proxy.cuts == 1
            proxy.accept()
            # written again with a run queued meanwhile, which no earlier try sent
            later = NewRun("t", id="queued-since", created_at=2_000.0)
            assert await node.insert([*runs, later]) == [Inserted(r.id, True) for r in [*runs, later]]  # type: ignore[arg-type]
            stored = [await node.get(r.id) for r in [*runs, later]]  # type: ignore[arg-type]
            assert [r.status if r else None for r in stored] == [RunStatus.PENDING] * 4
            assert (await node.counts()).pending == 5
            # another run under a taken id is still no run of this batch
            with pytest.raises(DuplicateRunId):
                await node.insert([NewRun("t", id="chosen-0", created_at=5.0)])


# ---------------------------------------------------------------- queue jobs


async def test_an_adoption_whose_commit_answer_is_lost_hands_out_the_jobs_it_took(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with PostgresStore(postgres_url, lease_ttl=TTL) as direct:
        # held by an incarnation never registered: anyone's to adopt
        await direct.put_jobs("q", "dead-inc", [{"n": 1}, {"n": 2}])
        async with proxied(postgres_server, postgres_url) as (proxy, node):
            await node.register_node("n1", "inc-1", "x")
            proxy.cut_after(lambda c: b"queue_jobs" in c and b"SELECT" in c, lambda c: b"COMMIT" in c)
            adopted = await node.adopt_jobs("q", "inc-1")
            assert proxy.cuts == 1
            assert sorted(j.job["n"] for j in adopted) == [1, 2]
            # handed out once: a later look by the same live incarnation finds none
            assert await node.adopt_jobs("q", "inc-1") == []
        rows = await direct._run(direct._fetch, "SELECT incarnation FROM queue_jobs", {}, write=False)
        assert [r[0] for r in rows] == ["inc-1", "inc-1"]


async def test_a_put_whose_commit_answer_is_lost_stores_each_job_once(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with proxied(postgres_server, postgres_url) as (proxy, node):
        await node.register_node("n1", "inc-1", "x")
        proxy.cut_after(lambda c: b"queue_jobs" in c, lambda c: b"COMMIT" in c)
        ids = await node.put_jobs("q", "inc-1", [{"n": 1}, {"n": 2}])
        assert proxy.cuts == 1
        rows = await node._run(node._fetch, "SELECT id, job FROM queue_jobs ORDER BY id", {}, write=False)
        # stored once each, and the ids returned are theirs, in the order of the jobs
        assert [(i, json.loads(job)) for i, job in rows] == list(zip(ids, [{"n": 1}, {"n": 2}], strict=True))


# ---------------------------------------------------------------- periodic slots


async def test_a_periodic_claim_whose_answer_is_lost_still_wins_its_slot_and_only_its_own(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with PostgresStore(postgres_url, lease_ttl=TTL) as other, proxied(postgres_server, postgres_url) as (proxy, node):
        assert await node.claim_periodic("warm", 1.0)  # the statement is prepared: one chunk per call
        # the claim's Bind (the listening connection binds its clock readings too)
        proxy.cut_after(lambda c: c[:1] == b"B" and b"tick" in c)
        assert await node.claim_periodic("tick", 100.0, 0.0)
        assert proxy.cuts == 1
        assert await node.get_periodic("tick") == 100.0
        # the slot is taken: by nobody else, and by no later call of the same node either
        assert not await other.claim_periodic("tick", 100.0, 0.0)
        assert not await node.claim_periodic("tick", 100.0, 0.0)
        # another node's slot is no try's own: a slot taken is no proof of having taken it
        assert await other.claim_periodic("tock", 200.0, 0.0)
        proxy.cut_after(lambda c: c[:1] == b"B" and b"tock" in c)
        assert not await node.claim_periodic("tock", 200.0, 0.0)
        assert proxy.cuts == 2
        assert await node.claim_periodic("tick", 160.0, 50.0)  # the next slot, past the gap


# ---------------------------------------------------------------- cluster events


async def test_an_event_batch_written_again_after_a_lost_commit_answer_reaches_readers_once(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with CuttingProxy(postgres_server.port) as proxy, PostgresEventRelay(postgres_url) as observer:

        def seen(kind: str) -> list[Any]:
            return [e for e in observer.bus.recent() if e.kind == kind and e.node == "n"]

        def start_node() -> Engine:
            engine = Engine(store=postgres_url, node_id="n", events=proxy.url(postgres_url), health_interval=None,
                            lease_ttl=TTL)  # fmt: skip

            @engine.task
            async def hello(ctx: TaskContext) -> str:
                return "hi"

            return engine

        node = start_node()
        async with node:
            await (await node.submit("hello")).wait()
            await eventually(lambda: len(seen("run.succeeded")) == 1, TIMEOUT)
            proxy.cut_after(lambda c: b"COMMIT" in c)
            await (await node.submit("hello")).wait()
            relay = node.cluster
            assert relay is not None
            await eventually(lambda: proxy.cuts == 1 and relay.stats().pending == 0, TIMEOUT)
            # a later run's success is read after every row written before it (ids in
            # commit order): once it is here, any repeat of the cut batch would be too
            last = await node.submit("hello")
            await last.wait()
            await eventually(lambda: last.id in {e.run_id for e in seen("run.succeeded")}, TIMEOUT)
        repeated = postgres_server.sql(
            "SELECT seq FROM events WHERE node = 'n' GROUP BY seq HAVING COUNT(*) > 1", _db(postgres_url)
        )
        assert repeated == ""
        assert set(Counter(e.run_id for e in seen("run.succeeded")).values()) == {1}
        assert len(seen("engine.started")) == 1

        # a genuine restart (a new engine: its bus numbers from 1 again) still gets through
        again = start_node()
        async with again:
            h = await again.submit("hello")
            await h.wait()
            await eventually(lambda: h.id in {e.run_id for e in seen("run.succeeded")}, TIMEOUT)
        assert len(seen("engine.started")) == 2
        assert len(seen("run.succeeded")) == 4
        assert observer.repeated == 0  # the table held no repeat to leave out


def _json(event: BaseEvent) -> str:
    return event_to_json(event)


async def test_a_reader_leaves_out_an_event_its_bus_wrote_twice_and_keeps_a_restart(postgres_url: str) -> None:
    # a repeat the table cannot refuse: the first copy pruned before the batch was written again
    relay = PostgresEventRelay(postgres_url)
    first = _json(EngineStarted(seq=1, ts=1.0, node="n"))
    done = _json(RunSucceeded(seq=2, ts=2.0, node="n", run_id="r1", task="t"))
    for body in (first, done, first, done):
        relay._take(body, 0, "bus-a")
    assert [(e.kind, e.seq) for e in relay.bus.recent()] == [("engine.started", 1), ("run.succeeded", 2)]
    assert relay.repeated == 2
    # the node restarted: another bus, numbered from 1 again
    relay._take(_json(EngineStarted(seq=1, ts=3.0, node="n")), 0, "bus-b")
    # a place that does not say which bus (Redis, rows of an older taskwatch): a restart, as before
    relay._take(_json(EngineStarted(seq=1, ts=4.0, node="n")), 0, None)
    assert [e.ts for e in relay.bus.recent() if e.kind == "engine.started"] == [1.0, 3.0, 4.0]
    assert relay.missed == 0 and relay.repeated == 2


# ---------------------------------------------------------------- schema 5


async def test_a_version_4_database_migrates_to_5_once_with_several_nodes_and_keeps_its_data(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    db = _db(postgres_url)
    # a database as taskwatch left it before the nonces, with a batch of events written twice
    script = schema_script(4)
    script += [
        "INSERT INTO queue_jobs (queue, job, incarnation, created_at) VALUES ('q', '[1]', 'gone', 1)",
        "INSERT INTO periodic (name, last_fire) VALUES ('tick', 100)",
        "INSERT INTO events (node, seq, skipped, ts, body) VALUES ('n', 1, 0, 1, '{}'), ('n', 1, 0, 1, '{}')",
    ]
    postgres_server.sql(";\n".join(script), db)
    stores = [PostgresStore(postgres_url, lease_ttl=TTL) for _ in range(4)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        a = stores[0]
        assert [j.job for j in await a.adopt_jobs("q", "inc-a")] == [[1]]
        assert not await a.claim_periodic("tick", 100.0)
        assert await a.claim_periodic("tick", 101.0)
        assert len(await a.put_jobs("q", "inc-a", [2])) == 1
    finally:
        await asyncio.gather(*(s.close() for s in stores))
    assert postgres_server.sql("SELECT version FROM schema_migrations ORDER BY version", db).split() == [
        str(v) for v in range(1, Q.SCHEMA_VERSION + 1)
    ]
    assert postgres_server.sql("SELECT COUNT(*) FROM events", db) == "2"


# ---------------------------------------------------------------- a silent network


async def test_a_claim_that_waited_out_an_outage_takes_its_leases_from_when_it_got_through(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # the claim keeps trying through the outage (reconnect_timeout); the leases it writes when
    # it gets through must count from then: leases that ran out during the outage would have the
    # runs taken back as lost (and run twice) while this node starts them
    # (the outage is shorter than node_ttl: the node's registration is still good)
    ttl = 2.0
    async with PostgresStore(postgres_url, lease_ttl=ttl) as other, CuttingProxy(postgres_server.port) as proxy:
        node = PostgresStore(
            proxy.url(postgres_url), lease_ttl=ttl, node_ttl=5 * ttl, reconnect_timeout=TIMEOUT, pool_size=1
        )
        async with node:
            await node.register_node("n", "inc-n", "test")
            runs = await other.insert([NewRun("t"), NewRun("t")])
            proxy.refuse()
            began = time.time()
            claiming = asyncio.create_task(node.claim("n", "inc-n", 2, {"t": None}))
            await eventually(lambda: node.reconnects > 0, timeout=TIMEOUT)
            await eventually(lambda: time.time() > began + 2 * ttl, timeout=TIMEOUT)
            back = time.time()
            proxy.accept()
            claims = await asyncio.wait_for(claiming, TIMEOUT)
            assert sorted(c.run_id for c in claims) == sorted(r.id for r in runs)
            assert min(c.lease_until for c in claims) >= back + ttl / 2, [c.lease_until - back for c in claims]
            conn = await asyncpg.connect(postgres_url)
            try:
                written = await conn.fetch("SELECT lease_until FROM runs WHERE status = 'running'")
            finally:
                await conn.close()
            assert len(written) == 2 and min(r[0] for r in written) >= back + ttl / 2, [r[0] - back for r in written]


async def test_a_node_whose_registration_lapsed_claims_nothing_until_a_heartbeat_goes_through(
    postgres_url: str,
) -> None:
    # a process paused (or cut off) for longer than node_ttl may be counted gone by the others,
    # who recover what it holds: runs it claimed on waking would be taken back and run twice
    ttl = 1.0
    async with PostgresStore(postgres_url, lease_ttl=ttl) as node, PostgresStore(postgres_url, lease_ttl=ttl) as other:
        await node.register_node("n", "inc-n", "test")
        runs = await other.insert([NewRun("t"), NewRun("t")])
        registered = time.time()
        await eventually(lambda: time.time() > registered + 1.5 * ttl, timeout=TIMEOUT)
        assert await node.claim("n", "inc-n", 2, {"t": None}) == []
        assert all(s is not None and s.status is RunStatus.PENDING for s in [await other.get(r.id) for r in runs])
        await node.node_heartbeat("inc-n", 0)
        claims = await node.claim("n", "inc-n", 2, {"t": None})
        assert sorted(c.run_id for c in claims) == sorted(r.id for r in runs)
        # and the others leave them with it
        assert await other.recover() == []


@contextlib.asynccontextmanager
async def waiting_across_a_proxy(
    server: PostgresServer, url: str, *, timeout: float | None
) -> AsyncIterator[tuple[CuttingProxy, PostgresStore, Engine, asyncio.Task[Any], asyncio.Event]]:
    """A run executing on a "runner" node, released by the event yielded last, and a wait for it
    on a started "waiter" node whose store (reconnect_timeout 0.5 s) goes through a proxy."""
    release = asyncio.Event()
    runner = Engine(store=url, node_id="runner", health_interval=None, poll_interval=0.05)

    @runner.task
    async def slow(ctx: TaskContext) -> str:
        await release.wait()
        return "done"

    async with runner, CuttingProxy(server.port) as proxy:
        store = PostgresStore(proxy.url(url), reconnect_timeout=0.5, pool_size=1)
        waiter = Engine(store=store, node_id="waiter", health_interval=None, poll_interval=0.05)
        await waiter.start()
        try:
            handle = await runner.submit("slow")
            await eventually(lambda: runner.get(handle.id).status is RunStatus.RUNNING, timeout=TIMEOUT)
            waiting = asyncio.create_task(waiter.handle(handle.id).wait(timeout=timeout))
            yield proxy, store, waiter, waiting, release
        finally:
            release.set()
            await waiter.stop()


async def test_a_wait_on_another_nodes_run_outlasts_an_outage_shorter_than_its_timeout(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # the waiting node's reads fail for longer than its reconnect_timeout; the run goes on on
    # its node, and so does the wait: it ends with the run, not with StoreUnavailable
    waiting_run = waiting_across_a_proxy(postgres_server, postgres_url, timeout=TIMEOUT)
    async with waiting_run as (proxy, store, _, waiting, release):
        proxy.refuse()
        cut = time.monotonic()
        await eventually(lambda: store.reconnects > 0 and time.monotonic() > cut + 4 * store.reconnect_timeout)
        assert not waiting.done()
        proxy.accept()
        release.set()
        record = await asyncio.wait_for(waiting, TIMEOUT)
        assert record.status is RunStatus.SUCCEEDED and record.result == "done"


async def test_a_wait_on_another_nodes_run_ended_by_a_stop_during_an_outage_raises(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # not resolved with the run as last read (still running): a wait without a timeout
    # resolves only with the finished run
    waiting_run = waiting_across_a_proxy(postgres_server, postgres_url, timeout=None)
    async with waiting_run as (proxy, store, waiter, waiting, _):
        proxy.refuse()
        await eventually(lambda: store.unreachable_since is not None, timeout=TIMEOUT)
        await waiter.stop(0.5)
        with pytest.raises(StoreError):
            await asyncio.wait_for(waiting, TIMEOUT)


async def test_a_stop_during_an_outage_does_not_wait_out_deletes_of_handled_queue_jobs(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the store retries each write for reconnect_timeout (here far longer than the test's
    # bound); jobs handled during the outage keep their rows, which is no reason to hold a stop
    handled: list[int] = []
    release = asyncio.Event()
    async with CuttingProxy(postgres_server.port) as proxy:
        store = PostgresStore(proxy.url(postgres_url), reconnect_timeout=120.0)
        engine = Engine(store=store, node_id="n", cancel_grace=0.2, health_interval=None)

        async def handler(job: int) -> None:
            await release.wait()
            handled.append(job)

        queue = engine.queue("q", handler, concurrency=4)
        await engine.start()
        for job in range(4):
            await queue.put(job)
        await eventually(lambda: queue.info().in_flight == 4)
        proxy.refuse()
        release.set()  # handled now: their deletes wait for the store
        await eventually(lambda: len(handled) == 4 and store.unreachable_since is not None, timeout=TIMEOUT)
        async with asyncio.timeout(TIMEOUT):  # it waited out the whole retry period (twice)
            await engine.stop(0.5)
        assert engine.state == "stopped"
        assert "4 handled jobs could not be deleted from the store; they run again at the next start" in caplog.text


async def test_a_stop_on_a_network_that_drops_every_packet_ends_and_its_runs_come_back(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # nothing is refused, nothing answers: a claim round under way, outcomes and put-backs
    # would each wait for an answer that never comes (no driver timeout is that short)
    started: list[int] = []

    def node(url: str) -> Engine:
        engine = Engine(store=url, node_id="n", poll_interval=0.05, cancel_grace=0.2, health_interval=None)

        @engine.task
        async def slow(ctx: TaskContext) -> None:
            started.append(ctx.attempt)
            await asyncio.Event().wait()

        return engine

    async with CuttingProxy(postgres_server.port) as proxy:
        engine = node(proxy.url(postgres_url))
        await engine.start()
        handles = await engine.submit_many([("slow", None)] * 2)
        await eventually(lambda: len(started) == 2, timeout=TIMEOUT)
        proxy.silent = True
        # a claim round (every 0.05 s) or a heartbeat is under way, waiting for its answer
        await eventually(lambda: proxy.swallowed > 0, timeout=TIMEOUT)
        async with asyncio.timeout(TIMEOUT):  # without a bound of its own it waited forever
            await engine.stop(0.5)
        assert engine.state == "stopped"
    # what the stop could not write is recovered: the next start of the node takes its runs back
    again = node(postgres_url)
    async with again:
        await eventually(lambda: len(started) == 4, timeout=TIMEOUT)
        assert sorted(started) == [1, 1, 2, 2]
        for handle in handles:
            await again.cancel(handle.id)


# ---------------------------------------------------------------- a stop just after an outage


async def test_a_stop_right_after_an_outage_still_counts_the_other_nodes_alive(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # no node could heartbeat during the outage: a stop judging the others by their last heartbeat
    # alone took a live node for gone and answered the waits on its pending runs at once (kept),
    # while that node would run them (recovery's own judgment waits node_ttl of an answering store)
    ttl = 1.0

    def node(url: str, name: str) -> Engine:
        engine = Engine(
            store=f"{url}?lease_ttl={ttl}&node_ttl={ttl}&reconnect_timeout=60", node_id=name, health_interval=None
        )

        @engine.task(name="t")
        async def t(ctx: TaskContext) -> None: ...

        return engine

    async with CuttingProxy(postgres_server.port) as pa, CuttingProxy(postgres_server.port) as pb:
        a, b = node(pa.url(postgres_url), "A"), node(pb.url(postgres_url), "B")
        await a.start()
        await b.start()
        try:
            pa.refuse()
            pb.refuse()
            cut = time.monotonic()
            # an outage longer than node_ttl: every heartbeat in the table is stale when it ends
            await eventually(lambda: time.monotonic() - cut > 2.5 * ttl, timeout=TIMEOUT)
            pa.accept()  # A answers again, B not yet
            await eventually(lambda: a.store.unreachable_since is None, timeout=TIMEOUT)
            with caplog.at_level(logging.DEBUG, logger="taskwatch.engine"):
                await a.stop(timeout=1.0)
            told = [r.getMessage() for r in caplog.records if "waits on its pending runs" in r.getMessage()]
            assert told == ["node A stops beside live node(s) B: waits on its pending runs go on"]
        finally:
            pa.accept()
            pb.accept()
            await a.stop()
            await b.stop()


# ---------------------------------------------------------------- a server that never answers


async def test_a_start_against_a_paused_server_fails_within_the_stores_timeout_saying_why(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # a paused server (SIGSTOP) still has its connections accepted by the kernel, and answers
    # none: the start waited out the driver's own 60 s connect timeout, then said "TimeoutError: "
    engine = Engine(store=f"{postgres_url}?reconnect_timeout=1", node_id="n", health_interval=None)

    @engine.task
    async def t(ctx: TaskContext) -> str:
        return "ran"

    with open(os.path.join(postgres_server.data, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGSTOP)
    try:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            async with asyncio.timeout(120):
                await engine.start()
        took = time.monotonic() - began
    finally:
        os.kill(postmaster, signal.SIGCONT)
    # the store's wait for an answer: its reconnect_timeout, here raised to the 5 s a connection
    # is given at least; the bound leaves a loaded machine plenty of slack
    assert took < 30, took
    said = str(caught.value)
    assert f"no answer from the server at 127.0.0.1:{postgres_server.port} within 5 s" in said, said
    assert "reconnect_timeout" in said, said
    # once the server answers again, the same engine starts
    async with engine:
        handle = await engine.submit("t")
        assert (await asyncio.wait_for(handle.wait(), TIMEOUT)).result == "ran"
