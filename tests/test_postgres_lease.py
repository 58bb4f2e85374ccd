"""PostgresLease on a real server: compare-and-set on one row, terms from a sequence.

The semantics with two lease objects standing for two nodes, then a real
failover: two engine processes compete, the leader is killed with SIGKILL,
and the other takes over with a higher term.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from taskwatch.engine import Engine, InvalidConfiguration, PostgresLease, TaskContext
from taskwatch.engine.errors import LeaseRefused, NotATaskwatchStore

from .cutting_proxy import CuttingProxy
from .helpers import eventually, stray_tasks
from .postgres_server import PostgresServer
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


def engine_on(lease: PostgresLease) -> tuple[Engine, list[TaskContext]]:
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    contexts: list[TaskContext] = []

    @engine.supervised(name="guarded", leader_only=True, backoff=0.05)
    async def guarded(ctx: TaskContext) -> None:
        contexts.append(ctx)
        await asyncio.Event().wait()

    return engine, contexts


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
    engine, contexts = engine_on(PostgresLease(url, ttl=1.0))
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
    engine, contexts = engine_on(PostgresLease(postgres_url, ttl=1.0))
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
    engine, contexts = engine_on(lease)

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
    engine, contexts = engine_on(PostgresLease(url, ttl=1.0, name="jobs"))
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
            assert engine.leadership().is_leader
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
