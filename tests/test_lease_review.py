"""Leader election under a review's findings: a stop during a stepped-down leader's wind-down, many
``ensure_leader()`` calls at once, one node id in two processes (a fork) or two engines, and the
PostgreSQL lease tables dropped under a running cluster."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from taskwatch.engine import Engine, InProcessLease, Lease, NotLeader, PostgresLease, RedisLease, TaskContext

from .helpers import Recorder, eventually, leader_contexts, stray_tasks, stubborn_leader_engine
from .processes import REPO
from .redis_server import RedisServer


# ---------------------------------------------------------------- a stop during a wind-down


async def test_a_stop_while_a_stepped_down_leaders_cleanup_still_runs_leaves_its_term_to_lapse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # the node gave its leadership up (its store out of reach) and holds its term while the
    # worker's cleanup, which ignores every cancel, runs on; the engine's stop comes meanwhile.
    # Released at that stop, the lease let the follower start the worker beside that cleanup
    caplog.set_level(logging.WARNING, logger="taskwatch.lease")
    lease = InProcessLease(ttl=1.0, renew_interval=0.05)
    starts: list[tuple[str, float]] = []
    swallowed: list[str] = []
    cleanup_may_end = asyncio.Event()

    def build(node_id: str) -> Engine:
        return stubborn_leader_engine(
            node_id, lease, cleanup_may_end, swallowed, started=lambda node: starts.append((node, lease.now()))
        )

    old, follower = build("x"), build("y")
    rec = Recorder(old, ("lease.",))
    await old.start()
    try:
        await follower.start()
        await eventually(lambda: [n for n, _ in starts] == ["x"], 5)
        old.elector.suspend()  # what the engine does when its store is out of reach
        await eventually(lambda: len(swallowed) >= 3, 5)  # the wind-down's re-cancels came and went

        await asyncio.wait_for(old.stop(0.05), 10)
        held = await lease.holder()

        assert held is not None and held.holder == "x", "the term was handed over while the cleanup runs"
        assert [n for n, _ in starts] == ["x"]
        assert not rec.of("lease.released")
        assert "left to lapse" in caplog.text
        # no longer renewed: the follower takes it once it lapses, not before
        await eventually(lambda: len(starts) == 2, 5)
        assert starts[1][0] == "y" and starts[1][1] >= held.expires_at
    finally:
        cleanup_may_end.set()
        for engine in (follower, old):
            await engine.stop(1.0)
    assert stray_tasks() == set()


async def test_a_stop_leaving_a_given_up_term_to_lapse_keeps_its_deadline_with_redis_silent(
    redis_server: RedisServer,
) -> None:
    # its last renew of that term waited a whole renew interval for a Redis that answered
    # nothing, past the stop's own deadline (10 s here, 5 s at the default ttl)
    lease = RedisLease(redis_server.url, key="test:abandon", ttl=30.0)
    cleanup_may_end = asyncio.Event()
    started: list[str] = []
    engine = stubborn_leader_engine("a", lease, cleanup_may_end, [], started=started.append)
    await engine.start()
    try:
        await eventually(lambda: started == ["a"], 5)
        engine.elector.suspend()  # the term given up, held for the cleanup that runs on
        await eventually(lambda: not engine.leadership().is_leader, 5)
        assert redis_server.proc is not None
        redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            began = time.monotonic()
            await engine.stop(0.5)
            # the drain's 0.5 s, the cleanup's cancel rounds (3 x 0.05 s), the lease's second:
            # some 1.5 s (a bound with room for a loaded machine, far below the 10 s it took)
            assert time.monotonic() - began < 5.0
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)
    finally:
        cleanup_may_end.set()
        await engine.stop(1.0)


async def test_a_stop_after_a_stepped_down_leaders_cleanup_ended_releases_its_term() -> None:
    # the other side: nothing of the worker runs any more when the stop comes, so the term it
    # held for that cleanup is released at once (lease.released after its lease.lost)
    lease = InProcessLease(ttl=30.0, renew_interval=0.05)
    engine = Engine(node_id="x", lease=lease, cancel_grace=0.05, health_interval=None)
    cleaning = asyncio.Event()
    cleanup_may_end = asyncio.Event()

    @engine.supervised(name="poller", leader_only=True)
    async def poller(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaning.set()
            await cleanup_may_end.wait()

    rec = Recorder(engine, ("lease.",))
    await engine.start()
    try:
        await eventually(lambda: engine.workers()[0].state == "running")
        engine.elector.suspend()
        await asyncio.wait_for(cleaning.wait(), 5)
        assert (await lease.holder()) is not None  # held for the cleanup
        cleanup_may_end.set()
        await eventually(lambda: rec.of("lease.released"), 5)
    finally:
        await engine.stop(1.0)
    assert await lease.holder() is None
    assert [e.kind for e in rec.events][-2:] == ["lease.lost", "lease.released"]
    assert stray_tasks() == set()


# ---------------------------------------------------------------- many ensure_leader() calls at once


async def passes(ctx: TaskContext, callers: int, rounds: int) -> list[int | str]:
    """What ``callers`` concurrent loops of ``rounds`` ensure_leader() calls each got (a term, or "NotLeader")."""

    async def one() -> list[int | str]:
        got: list[int | str] = []
        for _ in range(rounds):
            try:
                got.append(await ctx.ensure_leader())
            except NotLeader:
                got.append("NotLeader")
        return got

    return [term for each in await asyncio.gather(*(one() for _ in range(callers))) for term in each]


async def all_pass_and_keep_the_leader(lease: Lease, callers: int, rounds: int) -> None:
    """``callers`` concurrent loops of ``rounds`` ensure_leader() calls on a leader all pass with
    its term; it never steps down, nor reads its lease store as out of reach."""
    engine, contexts = leader_contexts(lease)
    rec = Recorder(engine, ("lease.lost",))
    async with engine:
        await eventually(lambda: contexts)
        term = engine.leadership().term
        got = await asyncio.wait_for(passes(contexts[0], callers, rounds), 30)
        assert got == [term] * (callers * rounds)
        assert engine.leadership().is_leader and "unreachable" not in (engine.leadership().backend or "")
    assert rec.of("lease.lost") == []


async def test_more_ensure_leader_calls_at_once_than_the_redis_client_has_connections_keep_the_leader(
    redis_server: RedisServer,
) -> None:
    # one per item of work, as the README advises: past redis-py's pool (100 connections) each
    # call that found it full stepped the leader down, over and over
    await all_pass_and_keep_the_leader(RedisLease(redis_server.url, key="test:fanout", ttl=3.0), 150, 5)


async def test_a_full_redis_client_pool_is_not_redis_out_of_reach(redis_server: RedisServer) -> None:
    # the client refused a call itself: Redis was not asked, so no backoff fails the next calls
    lease = RedisLease(f"{redis_server.url}?max_connections=1", key="test:pool", ttl=3.0)
    try:
        first, second = await asyncio.gather(lease.holder(), lease.holder(), return_exceptions=True)
        assert first is None
        assert type(second).__name__ == "MaxConnectionsError"
        assert lease.failures == 0 and "unreachable" not in lease.describe()
        assert await lease.acquire("a") is not None  # at once, not after a backoff
    finally:
        await lease.close()


@pytest.fixture
async def limited_role_url(postgres_url: str) -> AsyncIterator[str]:
    """``postgres_url`` as a role the server lets open 5 connections at most."""
    role = f"lessee_{os.getpid()}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 5")
        await conn.execute(f"GRANT CREATE, USAGE ON SCHEMA public TO {role}")
        parts = urlsplit(postgres_url)
        yield urlunsplit(parts._replace(netloc=f"{role}@{parts.hostname}:{parts.port}"))
        await conn.execute(f"DROP OWNED BY {role}")
        await conn.execute(f"DROP ROLE {role}")
    finally:
        await conn.close()


async def test_more_ensure_leader_calls_at_once_than_postgres_lets_the_node_connect_keep_the_leader(
    limited_role_url: str,
) -> None:
    # each call opened a connection of its own: past the server's limit, every refused one
    # stepped the leader down ("too many connections"), over and over
    await all_pass_and_keep_the_leader(PostgresLease(limited_role_url, ttl=3.0), 40, 3)


class GatedCheckLease(InProcessLease):
    """An in-process lease whose checks read the lease when sent and answer when the test says."""

    def __init__(self) -> None:
        super().__init__(ttl=30.0, renew_interval=10.0)
        self.sent: list[asyncio.Event] = []

    async def check(self, node_id: str, term: int) -> bool:
        answer = await super().check(node_id, term)  # the lease as it is when the check reaches it
        gate = asyncio.Event()
        self.sent.append(gate)
        await gate.wait()
        return answer


async def test_concurrent_ensure_leader_calls_share_a_check_begun_after_each_call() -> None:
    lease = GatedCheckLease()
    engine, contexts = leader_contexts(lease)
    async with engine:
        await eventually(lambda: contexts)
        ctx = contexts[0]
        term = engine.leadership().term
        early = asyncio.ensure_future(ctx.ensure_leader())
        await eventually(lambda: len(lease.sent) == 1)
        # the lease changes hands behind this node's back while that check is on its way
        assert await lease.release("a", term)
        assert await lease.acquire("b") is not None
        # (their first steps, which find that check on its way, run before its answer: the loop
        # runs what is ready in order, and the answer is only scheduled by the gate below)
        late = [asyncio.ensure_future(ctx.ensure_leader()) for _ in range(50)]
        lease.sent[0].set()
        assert await asyncio.wait_for(early, 5) == term  # its check began after it was called
        # the check on its way when they were called cannot answer for them: they share the next
        await eventually(lambda: len(lease.sent) == 2)
        lease.sent[1].set()
        results = await asyncio.wait_for(asyncio.gather(*late, return_exceptions=True), 5)
        assert all(isinstance(r, NotLeader) for r in results)
        assert len(lease.sent) == 2  # one check for the fifty of them
        assert not engine.leadership().is_leader


# ---------------------------------------------------------------- one node id, two holders


async def test_two_engines_sharing_an_in_process_lease_under_one_node_id_do_not_take_it_in_turns() -> None:
    lease = InProcessLease(ttl=0.3, renew_interval=0.05)
    running: list[str] = []
    both: list[list[str]] = []

    def build(label: str) -> Engine:
        engine = Engine(node_id="svc", lease=lease, health_interval=None)

        @engine.supervised(name="singleton", leader_only=True)
        async def singleton(ctx: TaskContext) -> None:
            running.append(label)
            if len(running) > 1:
                both.append(list(running))
            try:
                await asyncio.Event().wait()
            finally:
                running.remove(label)

        return engine

    first, second = build("first"), build("second")
    seen_first, seen_second = Recorder(first, ("lease.",)), Recorder(second, ("lease.",))
    await first.start()
    try:
        await eventually(lambda: running == ["first"])
        await second.start()
        # the second tries to take the lease at every renew interval: give it many of them
        await eventually(lambda: len(seen_first.of("lease.renewed")) >= 15, 10)
        assert seen_second.of("lease.acquired") == []
        assert seen_first.of("lease.lost") == [] and running == ["first"] and both == []
        assert not second.leadership().is_leader and second.leadership().holder == "svc"
    finally:
        await second.stop(1.0)
        await first.stop(1.0)
    assert stray_tasks() == set()


#: builds the lease before it forks, as a preforking server (gunicorn --preload) builds its app;
#: the child takes the lease, then the parent tries, under the same node id
FORKED = """
import asyncio, json, os, sys
from taskwatch.engine import PostgresLease, RedisLease

kind, url = sys.argv[1], sys.argv[2]
lease = RedisLease(url, key="test:fork", ttl=30) if kind == "redis" else PostgresLease(url, ttl=30)

async def take():
    try:
        state = await lease.acquire("api")
        return None if state is None else state.term
    finally:
        await lease.close()

pid = os.fork()
if pid == 0:
    print(json.dumps({"child": asyncio.run(take())}), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"parent": asyncio.run(take())}), flush=True)
"""


@pytest.mark.parametrize("kind", ["redis", "postgres"])
async def test_processes_forked_with_one_lease_object_and_one_node_id_are_two_holders(
    kind: str, request: pytest.FixtureRequest
) -> None:
    url = request.getfixturevalue("redis_server").url if kind == "redis" else request.getfixturevalue("postgres_url")
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", FORKED, kind, url], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    said = [json.loads(line) for line in done.stdout.splitlines()]
    assert said[0]["child"] is not None  # the lease was free
    assert said[1] == {"parent": None}  # held by the child, another holder


#: a leader forks a helper that reads the lease with the app's lease object, and collects its garbage
FORKED_HELPER = """
import asyncio, gc, json, os, sys
from taskwatch.engine import Engine, RedisLease

lease = RedisLease(sys.argv[1], key="test:fork-helper", ttl=1.5)
engine = Engine(node_id="parent", lease=lease, health_interval=None)
seen = []
engine.bus.add_callback(lambda e: seen.append((e.kind, e.term)), ["lease."])

async def child():
    state = await lease.holder()
    return None if state is None else state.holder

async def main():
    async with engine:
        while ("lease.renewed", 1) not in seen:  # it leads, and renewed over its pooled connection
            await asyncio.sleep(0.01)
        pid = os.fork()
        if pid == 0:
            holder = asyncio.run(child())
            gc.collect()  # the client inherited from the parent goes with the garbage
            print(json.dumps({"child": holder}), flush=True)
            os._exit(0)
        await asyncio.to_thread(os.waitpid, pid, 0)
        renewed = seen.count(("lease.renewed", 1))
        for _ in range(1000):  # three more renews, or the lease lost (bounded: 10 s)
            if seen.count(("lease.renewed", 1)) >= renewed + 3 or any(k == "lease.lost" for k, _ in seen):
                break
            await asyncio.sleep(0.01)
        print(json.dumps({"parent": seen}), flush=True)

asyncio.run(main())
"""


async def test_a_forked_helper_reading_the_lease_leaves_the_parents_connections_alone(redis_server: RedisServer) -> None:
    # its garbage collector closed the parent's inherited connections through the parent's
    # copied loop, taking them out of the epoll the two share: the parent's renews went unheard
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", FORKED_HELPER, redis_server.url], capture_output=True, text=True,
        timeout=60, cwd=REPO,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    said = [json.loads(line) for line in done.stdout.splitlines()]
    assert said[0] == {"child": "parent"}
    events = [tuple(e) for e in said[1]["parent"]]
    assert ("lease.lost", 1) not in events and events.count(("lease.renewed", 1)) >= 4, events


# ---------------------------------------------------------------- the PostgreSQL lease tables dropped


async def test_after_the_lease_tables_are_dropped_no_node_takes_the_lease_before_the_last_term_lapsed(
    postgres_url: str,
) -> None:
    # a restore, a schema reset: the table went with the row of a holder that still thinks it
    # leads until its deadline. Taken at once from the row made again, the lease had two leaders
    ttl = 1.0
    a, b, c = (PostgresLease(postgres_url, ttl=ttl) for _ in range(3))
    try:
        held = await a.acquire("a")
        assert held is not None and await b.holder() is not None
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute("DROP TABLE leases; DROP SEQUENCE lease_terms")
        finally:
            await conn.close()
        dropped = time.monotonic()

        assert await b.acquire("b") is None  # b makes the tables again, and finds the lease held off
        assert await c.acquire("c") is None  # so does a node that never saw them gone
        assert await b.holder() is None  # held by nobody meanwhile
        assert await a.renew("a", held.term) is None  # the old holder's term went with its row

        while (taken := await b.acquire("b")) is None:
            assert time.monotonic() - dropped < 10 * ttl, "the lease was never free again"
            await asyncio.sleep(0.02)  # (polling the lease, as a follower's elector does)
        assert time.monotonic() - dropped >= ttl * 0.9
        assert taken.term > held.term  # terms still grow: a fencing target that saw the old ones accepts it
        now = await a.holder()
        assert now is not None and (now.holder, now.term) == ("b", taken.term)
        # no outage: the tables were made again, nothing refused or failed
        assert a.refusals == b.refusals == 0 and a.failures == b.failures == 0
        assert "refused" not in a.describe() + b.describe()
    finally:
        for lease in (a, b, c):
            await lease.close()
