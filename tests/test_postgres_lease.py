"""PostgresLease on a real server: compare-and-set on one row, terms from a sequence.

The semantics with two lease objects standing for two nodes, then a real
failover: two engine processes compete, the leader is killed with SIGKILL,
and the other takes over with a higher term.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from taskwatch.engine import Engine, InvalidConfiguration, PostgresLease, TaskContext
from taskwatch.engine.errors import LeaseRefused, LeaseUnavailable, NotATaskwatchStore

from .cutting_proxy import CuttingProxy, Match, StallingProxy
from .helpers import eventually, leader_contexts, stray_tasks
from .postgres_server import PostgresServer, start_server
from .test_durable import Child


@pytest.mark.parametrize(
    ("option", "bad"),
    [
        ("connect_timeout", -1),
        ("connect_timeout", float("nan")),
        ("connect_timeout", True),
        ("name", ""),
        ("name", 123),
    ],
)
def test_a_connect_timeout_or_a_name_that_could_never_work_is_refused(option: str, bad: object) -> None:
    # a negative or NaN timeout fails every connection: the node would never lead, only
    # report the database unreachable
    with pytest.raises(InvalidConfiguration, match=f"PostgresLease: {option}="):
        PostgresLease("postgresql://app@127.0.0.1:1/app", **{option: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "named"),
    [
        (None, "postgresql://"),
        ("redis://127.0.0.1:6379/0", "postgresql://"),
        ("mysql://app:s3cret@127.0.0.1/app", "postgresql://"),
        ("postgresql://app@127.0.0.1:99999/app", "Port out of range"),
        ("postgresql://app@127.0.0.1:pg/app", "Port could not be cast"),
        ("postgresql:///app", "names no server"),
    ],
)
def test_a_url_that_could_never_work_is_refused_when_the_lease_is_made(url: object, named: str) -> None:
    with pytest.raises(InvalidConfiguration, match="PostgresLease") as info:
        PostgresLease(url)  # type: ignore[arg-type]
    assert named in str(info.value) and "s3cret" not in str(info.value)
    # with the other options' problems, not one at a time
    with pytest.raises(InvalidConfiguration, match="ttl=0") as info:
        PostgresLease(url, ttl=0)  # type: ignore[arg-type]
    assert named in str(info.value)


def test_a_url_naming_several_servers_or_a_socket_is_the_drivers_to_read() -> None:
    for url in ("postgresql://app@db1:5432,db2:5433/app", "postgresql:///app?host=/run/postgresql"):
        assert PostgresLease(url).url == url


@pytest.mark.parametrize(
    ("change", "refusal"),
    [
        (lambda url: url.rsplit("/", 1)[0] + "/no_such_db", 'database "no_such_db" does not exist'),
        (lambda url: url + "?bogus=1", 'unrecognized configuration parameter "bogus"'),
        (lambda url: url.replace("postgres@", "nobody:s3cret@"), 'role "nobody" does not exist'),
        (lambda url: url + "?sslmode=sometimes", "sslmode"),
    ],
)
async def test_a_lease_the_server_refuses_fails_the_start(postgres_url: str, change: Any, refusal: str) -> None:
    # as a store on that URL does: the node could never lead, and waiting changes nothing
    url = change(postgres_url)
    engine, contexts = leader_contexts(PostgresLease(url, ttl=1.0))
    with pytest.raises(LeaseRefused, match=refusal) as info:
        await engine.start()
    assert "s3cret" not in str(info.value)
    assert engine.state == "stopped" and contexts == []
    assert not stray_tasks()


async def test_another_applications_leases_table_fails_the_start(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("CREATE TABLE leases (id serial PRIMARY KEY, tenant text)")
    finally:
        await conn.close()
    engine, contexts = leader_contexts(PostgresLease(postgres_url, ttl=1.0))
    with pytest.raises(NotATaskwatchStore, match=r"\(leases\)"):
        await engine.start()
    assert engine.state == "stopped" and contexts == []
    assert not stray_tasks()


async def test_a_database_that_starts_refusing_is_shown_in_the_backend_and_logged_once(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.lease")
    database = postgres_url.rsplit("/", 1)[1]
    role = f"lease_{database}"
    postgres_server.sql(f"CREATE ROLE {role} LOGIN")
    postgres_server.sql(f"ALTER DATABASE {database} OWNER TO {role}")
    lease = PostgresLease(postgres_url.replace("postgres@", f"{role}@"), ttl=1.0)
    engine, contexts = leader_contexts(lease)

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not permitted to log in" in r.getMessage()]

    try:
        await engine.start()
        await eventually(lambda: contexts, timeout=10.0)
        postgres_server.sql(f"ALTER ROLE {role} NOLOGIN")
        await eventually(lambda: not engine.leadership().is_leader)
        await eventually(lambda: lease.refusals >= 6, timeout=10.0)
        backend = engine.leadership().backend or ""
        assert "refused: InvalidAuthorizationSpecificationError" in backend and "unreachable" not in backend
        assert len(refusals()) == 1, refusals()

        postgres_server.sql(f"ALTER ROLE {role} LOGIN")
        await eventually(lambda: engine.leadership().is_leader)
        assert "refused" not in (engine.leadership().backend or "")
    finally:
        await engine.stop(2.0)
        postgres_server.sql(f"REASSIGN OWNED BY {role} TO postgres", database)
        postgres_server.sql(f"DROP ROLE {role}")
    assert not stray_tasks()


async def test_the_backend_names_the_database_and_the_lease_without_the_password(postgres_url: str) -> None:
    url = postgres_url.replace("postgres@", "postgres:s3cret@")  # the test server trusts: any password does
    engine, contexts = leader_contexts(PostgresLease(url, ttl=1.0, name="jobs"))
    try:
        await engine.start()
        backend = engine.leadership().backend or ""
        database = postgres_url.rsplit("/", 1)[1]
        assert f"/{database}" in backend and "name=jobs" in backend and "***" in backend
        assert "s3cret" not in backend and "s3cret" not in repr(engine.elector.lease)
    finally:
        await engine.stop(2.0)


async def test_takers_racing_for_a_free_lease_draw_one_term_between_them(postgres_url: str) -> None:
    # terms count the leaderships: a taker that loses the race must not use a number up
    takers = [PostgresLease(postgres_url, ttl=30, name="raced") for _ in range(6)]
    first = await takers[0].acquire("n0")
    assert first is not None and await takers[0].release("n0", first.term)
    terms = [first.term]
    holder, watcher = await asyncpg.connect(postgres_url), await asyncpg.connect(postgres_url)
    waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    try:
        for _ in range(3):
            # the row held by a transaction of its own: every taker gets as far as it can, then
            # they all go at once when it ends
            async with holder.transaction():
                await holder.execute("SELECT 1 FROM leases WHERE name = 'raced' FOR UPDATE")
                race = asyncio.gather(*(t.acquire(f"n{i}") for i, t in enumerate(takers)))
                async with asyncio.timeout(10):
                    while await watcher.fetchval(waiting) < len(takers):
                        await asyncio.sleep(0.01)
            won = [(i, state) for i, state in enumerate(await race) if state is not None]
            assert len(won) == 1, won
            ((i, state),) = won
            terms.append(state.term)
            assert await takers[i].release(f"n{i}", state.term)
        assert terms == list(range(terms[0], terms[0] + len(terms)))
        assert await watcher.fetchval("SELECT last_value FROM lease_terms") == terms[-1]
    finally:
        await holder.close()
        await watcher.close()


async def test_acquire_renew_release_and_terms_that_only_grow(postgres_url: str) -> None:
    a = PostgresLease(postgres_url, ttl=30)
    b = PostgresLease(postgres_url, ttl=30)
    first = await a.acquire("a")
    assert first is not None and first.holder == "a"
    assert first.expires_at <= a.now() + 30 and first.expires_at > a.now() + 20
    for _ in range(3):
        assert await b.acquire("b") is None  # held by a
    seen = await b.holder()
    assert seen is not None and (seen.holder, seen.term) == ("a", first.term)
    renewed = await a.renew("a", first.term)
    assert renewed is not None and renewed.term == first.term
    assert await b.renew("b", first.term) is None  # not b's to renew
    assert not await b.release("b", first.term)
    again = await a.acquire("a")  # the holder acquiring again starts a new term
    # the next one: b's tries while a held it drew none (terms count the leaders)
    assert again is not None and again.term == first.term + 1
    assert await a.renew("a", first.term) is None  # the old term is over
    assert await a.release("a", again.term)
    assert await b.holder() is None
    taken = await b.acquire("b")
    assert taken is not None and taken.term == again.term + 1


async def test_one_url_with_every_option_serves_the_store_the_lease_and_the_events(postgres_url: str) -> None:
    # the cluster's one URL, as the README writes it, carrying the store's and the relay's
    # options: the lease must lead with it (the driver refuses options it does not know)
    url = f"{postgres_url}?pool_size=4&lease_ttl=30&keep=5000&max_age=3600&application_name=taskwatch-test"
    engine = Engine(store=url, lease=PostgresLease(url, ttl=5), events=url, node_id="only", health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> str:
        return "done"

    async with engine:
        await eventually(lambda: engine.elector.is_leader, timeout=20)
        record = await (await engine.submit("job")).wait(20)
    assert record.result == "done"


async def test_two_processes_given_the_same_node_id_are_still_two_holders(postgres_url: str) -> None:
    mine, theirs = PostgresLease(postgres_url, ttl=30), PostgresLease(postgres_url, ttl=30)
    held = await mine.acquire("api")
    assert held is not None
    assert await theirs.acquire("api") is None  # the same name from another lease object: someone else
    assert await theirs.renew("api", held.term) is None and not await theirs.release("api", held.term)
    seen = await theirs.holder()
    assert seen is not None and (seen.holder, seen.term) == ("api", held.term)  # shown by its node id
    assert await mine.renew("api", held.term) is not None


async def test_an_expired_lease_goes_to_the_next_node(postgres_url: str) -> None:
    a = PostgresLease(postgres_url, ttl=0.3, renew_interval=0.1)
    b = PostgresLease(postgres_url, ttl=0.3, renew_interval=0.1)
    held = await a.acquire("a")
    assert held is not None
    # a holder is told its lease ends before the database lets anyone else take it
    deadline = asyncio.get_running_loop().time() + 10
    while (taken := await b.acquire("b")) is None:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.02)
    assert a.now() >= held.expires_at
    assert taken.term > held.term
    assert await a.renew("a", held.term) is None
    # what ctx.ensure_leader() asks: the old leader's term is refused, the new one's stands
    assert not await a.check("a", held.term)
    assert await b.check("b", taken.term)


async def test_a_silent_database_counts_as_unreachable_until_it_answers(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with CuttingProxy(postgres_server.port) as proxy:
        lease = PostgresLease(proxy.url(postgres_url), ttl=1.0)
        engine = Engine(node_id="a", lease=lease, health_interval=None)
        backends: list[str] = []

        def silent_for_a_while() -> bool:
            # every few ms from the first failure on: between backoff windows too
            if lease.failures:
                backends.append(engine.leadership().backend or "")
            return lease.failures >= 3

        try:
            await engine.start()
            # (a start's first try may time out on a loaded machine: the next one takes it)
            await eventually(lambda: engine.leadership().is_leader, timeout=10.0)
            proxy.silent = True  # nothing gets through, nobody is told
            await eventually(lambda: not engine.leadership().is_leader)
            # the elector gives up on each operation before any driver timeout would: the
            # lease counts those, says so in leadership().backend and backs off
            await eventually(silent_for_a_while, timeout=10.0)
            assert lease.last_error is not None and lease.last_error.startswith("TimeoutError")
            assert backends and all("unreachable: TimeoutError" in backend for backend in backends)

            proxy.silent = False
            await eventually(lambda: engine.leadership().is_leader, timeout=10.0)
            assert "unreachable" not in (engine.leadership().backend or "")
        finally:
            await engine.stop(2.0)
    assert not stray_tasks()


def test_a_killed_leader_is_replaced_with_a_higher_term(
    postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    ttl = 1.0
    args = ("--leader", "--lease-ttl", str(ttl), "run")
    first = Child(postgres_url, "node-a", *args)  # type: ignore[arg-type]
    nodes.append(first)
    won = first.event("lease.acquired")
    second = Child(postgres_url, "node-b", *args)  # type: ignore[arg-type]
    nodes.append(second)
    second.event("started")
    assert not second.of("lease.acquired")  # a leads; b follows
    os.kill(first.proc.pid, signal.SIGKILL)
    killed_at = time.time()
    took = second.event("lease.acquired", timeout=30)
    assert took["holder"] == "node-b" and took["term"] > won["term"]
    # within the ttl plus a renew interval (and slack for a loaded machine)
    assert took["t"] - killed_at < ttl + ttl / 3 + 5.0
    assert second.proc.stdin is not None
    second.proc.stdin.close()
    second.event("lease.released", timeout=30)
    second.event("stopped", timeout=30)


_LOCK_WAITS = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"


async def test_a_lease_row_held_by_a_silent_session_reads_as_held_not_as_unreachable(postgres_url: str) -> None:
    # a node stalled inside its acquire holds the row locked: the others' waits for it end on
    # the server, before the elector gives up on them, and say another node holds the lease
    lease = PostgresLease(postgres_url, ttl=6.0)
    engine, contexts = leader_contexts(lease)
    holder, watcher = await asyncpg.connect(postgres_url), await asyncpg.connect(postgres_url)
    try:
        await lease.holder()  # the table made
        await holder.execute("INSERT INTO leases VALUES ('leader', NULL, 0, 0)")
        # as a node's acquire leaves it when the node stalls right after locking the free row
        transaction = holder.transaction()
        await transaction.start()
        await holder.execute("SELECT 1 FROM leases WHERE name = 'leader' FOR UPDATE")
        await engine.start()  # one election before it returns: it met the locked row
        leadership = engine.leadership()
        assert not leadership.is_leader and contexts == []
        assert "unreachable" not in (leadership.backend or "") and "refused" not in (leadership.backend or "")
        assert lease.failures == 0 and lease.refusals == 0
        # the server ended the wait itself: no session is left waiting for the row
        assert await watcher.fetchval(_LOCK_WAITS) == 0

        await transaction.rollback()
        await eventually(lambda: contexts, timeout=20.0)
        assert lease.failures == 0
    finally:
        await engine.stop(2.0)
        await holder.close()
        await watcher.close()
    assert not stray_tasks()


def _silent_after(proxy: CuttingProxy, marker: bytes) -> Match:
    """A step for :meth:`CuttingProxy.cut_after` that cuts nothing: once a client chunk holding
    ``marker`` went through, the proxy drops every packet, both ways, and tells nobody."""

    def step(chunk: bytes) -> bool:
        if marker in chunk:
            proxy.silent = True
        return False

    return step


@pytest.mark.parametrize(
    "marker",
    [
        # the text of the statement that draws the term: prepared with the row locked, the
        # session waits "active" for the rest of it, out of reach of every server timeout
        pytest.param(b"nextval('lease_terms')", id="preparing-the-take"),
        # the stalled node's name goes first with the statement that locks the row
        pytest.param(b"stalled-node#", id="once-the-row-is-locked"),
    ],
)
async def test_a_node_stalled_inside_its_acquire_does_not_keep_the_others_from_leading(
    postgres_server: PostgresServer, postgres_url: str, marker: bytes
) -> None:
    ttl = 1.0
    async with CuttingProxy(postgres_server.port) as proxy:
        stalled = PostgresLease(proxy.url(postgres_url), ttl=ttl)
        await stalled.holder()  # the table made
        proxy.cut_after(_silent_after(proxy, marker))
        # no bound on it: its connection stays open, as a paused process's does, and nothing
        # but the server can end its transaction
        stuck = asyncio.ensure_future(stalled.acquire("stalled-node"))
        try:
            await eventually(lambda: proxy.silent)
            engine, contexts = leader_contexts(PostgresLease(postgres_url, ttl=ttl))
            try:
                await engine.start()
                await eventually(lambda: contexts, timeout=20.0)
                assert engine.leadership().holder == "a"
            finally:
                await engine.stop(2.0)
            if marker.startswith(b"stalled-node"):
                # it held the row: the server ended its session, and its acquire failed
                with pytest.raises(LeaseUnavailable):
                    await asyncio.wait_for(stuck, 20.0)
        finally:
            stuck.cancel()
            await asyncio.gather(stuck, return_exceptions=True)
            # its connection through the proxy winds down (the hang-up reaches the server, whose
            # close comes back) rather than being cancelled under it by the proxy's exit
            await eventually(lambda: not proxy._tasks)
    assert not stray_tasks()


async def test_a_stalled_node_that_wakes_after_its_session_was_ended_has_lost_the_race(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # paused holding the row (a network that held every packet, a process stopped): by the time
    # it goes on, the server has ended its session and another node leads; it must neither take
    # the lease nor read the lost session as a refusal (that would fail an engine's start)
    ttl = 1.0
    async with StallingProxy(postgres_server.port) as network, CuttingProxy(network.port) as watch:
        stalled = PostgresLease(watch.url(network.url(postgres_url)), ttl=ttl)
        await stalled.holder()  # the table made
        sent: list[bytes] = []

        def take_sent(chunk: bytes) -> bool:
            if b"stalled-node#" in chunk:
                sent.append(chunk)  # the statement that locks the row, then the one that takes it
                if len(sent) == 2:
                    network.hold()  # the take, and all after it, held on the way
            return False

        watch.cut_after(take_sent)
        stuck = asyncio.ensure_future(stalled.acquire("stalled-node"))
        try:
            await eventually(lambda: len(sent) == 2)
            other = PostgresLease(postgres_url, ttl=ttl)
            engine, contexts = leader_contexts(other)
            try:
                await engine.start()
                await eventually(lambda: contexts, timeout=20.0)
                network.release()
                with pytest.raises(LeaseUnavailable):
                    await asyncio.wait_for(stuck, 20.0)
                assert stalled.refusals == 0
                assert engine.leadership().is_leader and engine.leadership().holder == "a"
                seen = await other.holder()
                assert seen is not None and seen.holder == "a"
            finally:
                await engine.stop(2.0)
        finally:
            stuck.cancel()
            await asyncio.gather(stuck, return_exceptions=True)
    assert not stray_tasks()


@pytest.fixture
def crashing_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of the test's own, to crash and start again on its data."""
    server = start_server()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        except Exception:  # noqa: BLE001 - stopped already, or never restarted
            pass
        shutil.rmtree(server.root, ignore_errors=True)


async def test_a_term_handed_out_survives_a_crash_of_the_server(crashing_server: PostgresServer) -> None:
    # the server commits asynchronously (synchronous_commit=off, as the test servers and many
    # production ones run) and its WAL writer waits 10 s between rounds: a commit not yet
    # written is lost in a crash, and the term it drew would be handed out again
    server = crashing_server
    server.sql("ALTER SYSTEM SET wal_writer_delay = '10s'")
    server.sql("SELECT pg_reload_conf()")
    lease = PostgresLease(server.url(), ttl=30)
    first = await lease.acquire("n")
    assert first is not None
    server.sql("CHECKPOINT")  # the table and the first term on disk
    terms = [first.term]
    for _ in range(3):
        taken = await lease.acquire("n")  # the holder acquiring again: a new term, led with at once
        assert taken is not None
        terms.append(taken.term)
        await asyncio.to_thread(server.stop, "immediate")  # a crash: no checkpoint, no flush
        await asyncio.to_thread(server.start)
    last = await lease.acquire("n")
    assert last is not None
    terms.append(last.term)
    assert terms == sorted(set(terms)), terms
