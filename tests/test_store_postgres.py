"""What only a store shared by several nodes has to get right, on a real PostgreSQL server.

Two :class:`PostgresStore` objects on one database stand for two nodes (each
has its own connections, as two processes would). The contract every store
keeps is in ``test_store_contract.py``; the subprocess cluster in
``test_cluster.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import string
import subprocess
import sys
from collections.abc import AsyncIterator

import pytest
from taskwatch.engine import Engine, TaskContext
from taskwatch.engine.errors import InvalidConfiguration, InvalidKey, QueueFull
from taskwatch.engine.runs import RunStatus
from taskwatch.engine.store import (
    NewRun,
    PostgresStore,
    StoreDriverMissing,
    StoreError,
    StoreUnavailable,
    Succeeded,
    TriggerKeyRecord,
    UnknownStore,
    make_store,
)
from taskwatch.engine.store import queries as Q

from .cutting_proxy import CuttingProxy
from .postgres_server import PostgresServer, schema_script

TTL = 10.0


@pytest.fixture
async def two(postgres_url: str) -> AsyncIterator[tuple[PostgresStore, PostgresStore]]:
    """Two nodes' stores on one fresh database."""
    a = PostgresStore(postgres_url, lease_ttl=TTL, pool_size=4)
    b = PostgresStore(postgres_url, lease_ttl=TTL, pool_size=4)
    async with a, b:
        await a.wait_listening()
        await b.wait_listening()
        yield a, b


async def wait_for(predicate, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    """Poll ``predicate`` (a coroutine function) until true, or fail after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {timeout} s: {predicate.__name__}")
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------- specs and the driver


def test_make_store_postgres_specs() -> None:
    s = make_store("postgresql://app:secret@db.example:5433/app?pool_size=3&lease_ttl=7&application_name=x")
    assert isinstance(s, PostgresStore)
    assert (s.pool_size, s.lease_ttl) == (3, 7.0)
    assert s.url == "postgresql://app:secret@db.example:5433/app?application_name=x"
    assert "secret" not in s.describe() and "secret" not in repr(s)
    assert isinstance(make_store("postgres://db/app"), PostgresStore)
    with pytest.raises(UnknownStore, match="names its server") as unknown:
        make_store("postgresql://app:secret@/app")
    with pytest.raises(InvalidConfiguration, match="pool_size='many' is not a valid int") as bad:
        make_store("postgresql://app:secret@db/app?pool_size=many")
    for error in (unknown.value, bad.value):
        assert "secret" not in str(error) and "app:***@" in str(error)
    with pytest.raises(InvalidConfiguration, match="pool_size"):
        make_store("postgresql://db/app?pool_size=0")


def test_without_the_driver_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "asyncpg", None)  # what an environment without it looks like
    with pytest.raises(StoreDriverMissing, match=r"pip install 'asyncpg>=0.30' \(taskwatch's 'postgres' extra\)"):
        make_store("postgresql://db/app")
    # and the engine itself imports without it
    code = "import sys; sys.modules['asyncpg'] = None; import taskwatch.engine; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


async def test_an_unreachable_server_is_a_clear_error(postgres_server: PostgresServer) -> None:
    # a port nothing listens on: connect fails at once, and open() says where and what to check
    store = PostgresStore(f"postgresql://postgres@127.0.0.1:{postgres_server.port + 1}/x", reconnect_timeout=0.2)
    with pytest.raises(StoreUnavailable, match="database server"):
        await store.open()


async def test_a_password_in_the_url_is_never_shown(postgres_server: PostgresServer) -> None:
    # libpq takes it in the user part and as ?password= alike; neither reaches a message
    port = postgres_server.port + 1
    for url in (f"postgresql://app:s3cret@127.0.0.1:{port}/x", f"postgresql://app@127.0.0.1:{port}/x?password=s3cret"):
        store = PostgresStore(url, reconnect_timeout=0.2)
        with pytest.raises(StoreUnavailable) as caught:
            await store.open()
        shown = [store.describe(), repr(store), str(caught.value)]
        assert all("s3cret" not in text for text in shown), shown
        assert all("***" in text for text in shown[:2]), shown


async def test_a_database_that_does_not_exist_is_named_as_such_not_as_a_server_out_of_reach(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # the server answered: "check that it is up and reachable" would send the user the wrong way
    missing = postgres_url.rsplit("/", 1)[0] + "/no_such_db"
    with pytest.raises(StoreUnavailable) as caught:
        await PostgresStore(missing, reconnect_timeout=0.2).open()
    said = str(caught.value)
    assert "no_such_db" in said and "create it (createdb NAME)" in said
    assert "reachable" not in said


# ---------------------------------------------------------------- what the server refuses


def _random_text(size: int, seed: int) -> str:
    """``size`` ASCII characters that do not compress: PostgreSQL compresses a long index entry"""
    rnd = random.Random(seed)
    return "".join(rnd.choice(string.ascii_letters + string.digits) for _ in range(size))


async def test_an_operation_the_server_refuses_is_raised_as_such_not_as_an_outage(postgres_url: str) -> None:
    # an index entry holds at most ~2.7 KB: every try of such an insert or save meets the same
    # answer. As StoreUnavailable ("check that the database server is up") its callers wrote it
    # again and again: a trigger with one such key never saved any of its keys again
    node = PostgresStore(postgres_url, lease_ttl=TTL, reconnect_timeout=30)
    async with node:
        long_key = _random_text(3000, 1)
        record = TriggerKeyRecord(count=3)
        calls = {
            "insert": lambda: node.insert([NewRun("t", key=long_key)]),
            "save_trigger": lambda: node.save_trigger("t", "i1", {"doc-1": record, long_key: record}),
        }
        for what, call in calls.items():
            with pytest.raises(StoreError) as caught:
                await call()
            said = str(caught.value)
            assert not isinstance(caught.value, StoreUnavailable), (what, said)
            assert "refused the operation (SQLSTATE 54000): ProgramLimitExceededError" in said, what
            assert "index row size" in said and "reachable" not in said, what
            assert type(caught.value.__cause__).__name__ == "ProgramLimitExceededError"
        # answered at once, never retried: no outage began
        assert node.reconnects == 0 and node.unreachable_since is None
        assert (await node.counts()).pending == 0 and await node.adopt_trigger("t", "i1", own=True) == {}
        await node.save_trigger("t", "i1", {"doc-1": record})
        assert await node.adopt_trigger("t", "i1", own=True) == {"doc-1": record}


def test_outages_and_conflicts_are_retried_and_a_refusal_is_not() -> None:
    import asyncpg.exceptions as pg

    node = PostgresStore("postgresql://db.example/app")
    retried = [
        pg.DeadlockDetectedError("deadlock detected"),  # 40P01
        pg.SerializationError("could not serialize access"),  # 40001
        pg.AdminShutdownError("terminating connection due to administrator command"),  # 57P01
        pg.CannotConnectNowError("the database system is starting up"),  # 57P03
        pg.TooManyConnectionsError("sorry, too many clients already"),  # 53300
        pg.IdleInTransactionSessionTimeoutError("terminating connection due to idle-in-transaction timeout"),
        ConnectionResetError("reset by peer"),
    ]
    assert [e for e in retried if not node._transient(e)] == []
    refused = [
        pg.ProgramLimitExceededError("index row size 3048 exceeds btree version 4 maximum 2704"),  # 54000
        pg.CharacterNotInRepertoireError('invalid byte sequence for encoding "UTF8": 0x00'),  # 22021
        pg.UndefinedTableError('relation "runs" does not exist'),  # 42P01
    ]
    for exc in refused:
        assert not node._transient(exc)
        translated = node._translate(exc)
        assert type(translated) is StoreError and "refused the operation" in str(translated), exc
    # an answer about the store's setup still says what to fix there, as before
    for exc, advice in [
        (pg.InvalidCatalogNameError('database "app" does not exist'), "createdb"),
        (pg.InsufficientPrivilegeError("permission denied for schema public"), "privilege"),
    ]:
        translated = node._translate(exc)
        assert isinstance(translated, StoreUnavailable) and advice in str(translated)


async def test_the_longest_key_beside_the_longest_trigger_name_is_kept_and_a_longer_key_refused(
    postgres_url: str,
) -> None:
    # the limits hold what PostgreSQL's index holds: a trigger key of 2048 bytes beside a name of
    # 512 bytes (the trigger's own, 504, plus "trigger:") is saved and read back after a restart
    name = _random_text(512 - len("trigger:"), 2)
    longest = _random_text(2048, 3)

    async def handle(ctx: TaskContext, key: str) -> None:
        return None

    engine = Engine(store=postgres_url, node_id="n1", health_interval=None)
    trigger = engine.trigger(name, handle, size_threshold=100, save_interval=0.05)
    async with engine:
        with pytest.raises(InvalidKey, match="2049 bytes long in UTF-8, over the 2048"):
            trigger.notify(longest + "x", 3)
        trigger.notify(longest, 3)
        trigger.notify("doc-1", 5)
        assert trigger.key_count == 2
    again = Engine(store=postgres_url, node_id="n1", health_interval=None)
    kept = again.trigger(name, handle, size_threshold=100)
    async with again:
        assert sorted((k.key, k.count) for k in kept.state().keys) == sorted([(longest, 3), ("doc-1", 5)])


# ---------------------------------------------------------------- two nodes, one queue


async def test_concurrent_claims_never_take_a_run_twice(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    ids = {i.id for i in await a.insert([NewRun("t", {"i": i}) for i in range(600)])}
    taken: dict[str, list[str]] = {"a": [], "b": []}

    async def drain(store: PostgresStore, name: str, inc: str) -> None:
        while True:
            claims = await store.claim(name, inc, 7, {"t": None})
            if not claims:
                if (await store.counts()).pending == 0:
                    return
                continue
            taken[name] += [c.run_id for c in claims]
            for c in claims:
                assert await store.finish(c.token, Succeeded()) is RunStatus.SUCCEEDED

    await asyncio.gather(drain(a, "a", "ia"), drain(a, "a", "ia2"), drain(b, "b", "ib"), drain(b, "b", "ib2"))
    assert len(taken["a"]) + len(taken["b"]) == 600
    assert set(taken["a"]) | set(taken["b"]) == ids and not set(taken["a"]) & set(taken["b"])
    assert taken["a"] and taken["b"]
    counts = await b.counts()
    assert counts.by_status["succeeded"] == 600 and counts.succeeded_total == 600


async def test_dedup_key_holds_across_nodes(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    results = await asyncio.gather(*(s.insert([NewRun("t", key="k")]) for s in (a, b) * 10))
    ids = {r[0].id for r in results}
    assert len(ids) == 1 and sum(r[0].new for r in results) == 1
    assert (await a.counts()).pending == 1


async def test_max_pending_holds_across_nodes(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two

    async def one(store: PostgresStore) -> bool:
        try:
            await store.insert([NewRun("t")], max_pending=25)
            return True
        except QueueFull:
            return False

    accepted = await asyncio.gather(*(one(s) for s in (a, b) * 30))
    assert sum(accepted) == 25
    assert (await b.counts()).pending == 25


async def test_a_concurrency_limit_holds_across_nodes_claiming_at_once(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    await a.insert([NewRun("t") for _ in range(100)])
    await asyncio.gather(*(s.counts() for s in (a, b) * 4))  # every connection open before the race
    # both nodes claim on every connection at once, each claim with room for 3: the cap is 2
    rounds = await asyncio.gather(
        *(s.claim(name, f"i-{name}", 3, {"t": 3}, limits={"t": 2}) for s, name in ((a, "a"), (b, "b")) * 8)
    )
    assert sum(len(r) for r in rounds) == 2
    assert (await a.counts()).running == 2


async def test_other_nodes_hear_of_work_and_cancels(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    sub = b.subscribe()
    (run_id,) = [i.id for i in await a.insert([NewRun("t")])]
    w = await sub.wait(timeout=10)
    assert w.work
    (claim,) = await b.claim("b", "ib", 1, {"t": None})
    sub.poll()
    await a.request_cancel(run_id)  # node a cancels a run node b executes
    w = await sub.wait(timeout=10)
    while not w.cancels:  # a wakeup about other work may come first
        w = await sub.wait(timeout=10)
        assert w, "no cancel arrived"
    assert w.cancels == {run_id}
    assert (await b.heartbeat("ib", [claim.token])).cancel == {claim.token: "user"}


async def test_notifications_are_batched_not_one_per_run(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    sub = b.subscribe()
    before = b.notifications_received
    await asyncio.gather(*(a.insert([NewRun("t")]) for _ in range(200)))
    await sub.wait(timeout=10)
    await a.insert([NewRun("t", id="last")])

    async def heard_last() -> bool:
        return (await sub.wait(timeout=0.05)).work or b.notifications_received - before > 0

    await wait_for(heard_last)
    assert 0 < b.notifications_received - before < 100  # 201 inserts


async def test_periodic_slot_is_taken_by_one_node(two: tuple[PostgresStore, PostgresStore]) -> None:
    a, b = two
    for slot in (10.0, 20.0, 30.0):
        won = await asyncio.gather(*(s.claim_periodic("nightly", slot, gap=9.9) for s in (a, b, a, b)))
        assert sum(won) == 1


async def test_a_node_survives_a_server_restart(
    postgres_server: PostgresServer, two: tuple[PostgresStore, PostgresStore]
) -> None:
    a, b = two
    sub = b.subscribe()
    (first,) = await a.insert([NewRun("t")])
    await sub.wait(timeout=10)
    postgres_server.restart()  # every connection is cut
    (second,) = await a.insert([NewRun("t")])  # retried until the server is back
    assert (await b.counts()).pending == 2
    claims = await b.claim("b", "ib", 5, {"t": None})
    assert {c.run_id for c in claims} == {first.id, second.id}
    # the listening connection comes back too: b hears a's work again

    async def listening_again() -> bool:
        return b.listen_connects >= 2

    await wait_for(listening_again, timeout=30)
    sub.poll()
    await a.insert([NewRun("t")])
    assert (await sub.wait(timeout=10)).work


async def test_two_nodes_recovering_at_once_take_each_lost_run_once(postgres_url: str) -> None:
    now = [1_000_000.0]
    a = PostgresStore(postgres_url, lease_ttl=TTL, clock=lambda: now[0])
    b = PostgresStore(postgres_url, lease_ttl=TTL, clock=lambda: now[0])
    async with a, b:
        await a.insert([NewRun("t") for _ in range(60)])
        claims = await a.claim("dead", "dead-1", 60, {"t": None})
        assert len(claims) == 60
        now[0] += TTL + 1  # the owner never heartbeats again
        found = await asyncio.gather(*(s.recover() for s in (a, b, a, b)))
        ids = [r.run_id for batch in found for r in batch]
        assert sorted(ids) == sorted(c.run_id for c in claims)  # each once, none missed
        counts = await b.counts()
        assert counts.pending == 60 and counts.lost_total == 60
        assert {r.lost_count for r in (await b.get_many(ids)).values()} == {1}


async def test_a_version_2_database_gains_node_load_and_events_and_keeps_its_data(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    db = postgres_url.rsplit("/", 1)[1]
    # a database as taskwatch left it before CPU and RSS were kept
    script = schema_script(2)
    script += [
        "INSERT INTO runs (id, task, params, status, created_at, run_after) VALUES ('r1', 'a', '{\"n\": 1}', 'pending', 1, 0)",
        "INSERT INTO nodes (incarnation, node, version, started_at, last_heartbeat, running, registered_seq) "
        "VALUES ('i0', 'old', '0.9', 1, 2, 3, 1)",
    ]
    postgres_server.sql(";\n".join(script), db)
    async with PostgresStore(postgres_url) as store:
        run = await store.get("r1")
        assert run is not None and run.params == {"n": 1} and run.status is RunStatus.PENDING
        [old] = await store.nodes()
        assert (old.node, old.version, old.running, old.cpu_percent, old.rss_bytes) == ("old", "0.9", 3, None, None)
        await store.register_node("new", "i1", "1.0")
        await store.node_heartbeat("i1", running=1, cpu_percent=40.0, rss_bytes=5 << 30)
        new = [n for n in await store.nodes() if n.node == "new"][0]
        assert (new.cpu_percent, new.rss_bytes) == (40.0, 5 << 30)
    assert postgres_server.sql("SELECT version FROM schema_migrations ORDER BY version", db).split() == [
        str(v) for v in range(1, Q.SCHEMA_VERSION + 1)
    ]
    assert postgres_server.sql("SELECT COUNT(*) FROM events", db) == "0"


async def test_a_cancel_requested_while_a_retry_is_written_is_kept(
    two: tuple[PostgresStore, PostgresStore], postgres_url: str
) -> None:
    # the owner writes a retry while another node asks to cancel; a third session holds the
    # row a moment (as a heartbeat batch does), so both writes queue behind it: whichever goes
    # first, the run must end cancelled, not go back to pending to be claimed and run again
    import asyncpg

    from taskwatch.engine.runs import RunError
    from taskwatch.engine.store import Retry

    owner, other = two
    await owner.register_node("n1", "inc-1", "x")
    [inserted] = await owner.insert([NewRun("t", max_attempts=3)])
    [claim] = await owner.claim("n1", "inc-1", 1, {"t": None})
    holder = await asyncpg.connect(postgres_url)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", inserted.id)
        cancel = asyncio.ensure_future(other.request_cancel(inserted.id))
        await wait_for(lambda: _waiting_on_locks(holder, 1))
        retry = asyncio.ensure_future(owner.finish(claim.token, Retry(RunError(type="Boom", message="failed"), 0.0)))
        await wait_for(lambda: _waiting_on_locks(holder, 2))
        await lock.commit()
        answer, written = await cancel, await retry
    finally:
        await holder.close()
    assert answer.action == "requested" and written is RunStatus.CANCELLED
    assert (await other.get(inserted.id)).status is RunStatus.CANCELLED  # type: ignore[union-attr]
    assert await other.claim("n2", "inc-2", 1, {"t": None}) == []


async def test_a_row_held_by_another_session_does_not_stall_a_nodes_heartbeat(
    two: tuple[PostgresStore, PostgresStore], postgres_url: str
) -> None:
    # a dashboard's cancel stuck in its transaction holds one run: the owner's heartbeat renews
    # its other claims at once and reports the held one as busy (not lost, not renewed)
    import asyncpg

    owner, _ = two
    await owner.register_node("n1", "inc-1", "x")
    stuck, free = await owner.insert([NewRun("t"), NewRun("t")])
    claims = {c.run_id: c for c in await owner.claim("n1", "inc-1", 2, {"t": None})}
    before = (await owner.get(free.id)).lease_until  # type: ignore[union-attr]
    holder = await asyncpg.connect(postgres_url)
    try:
        lock = holder.transaction()
        await lock.start()
        await holder.execute("SELECT 1 FROM runs WHERE id = $1 FOR UPDATE", stuck.id)
        async with asyncio.timeout(5):
            result = await owner.heartbeat("inc-1", [claims[stuck.id].token, claims[free.id].token])
        await lock.rollback()
    finally:
        await holder.close()
    assert (result.busy, result.lost) == ([claims[stuck.id].token], [])
    assert (await owner.get(free.id)).lease_until > before  # type: ignore[operator,union-attr]
    again = await owner.heartbeat("inc-1", [claims[stuck.id].token])
    assert (again.busy, again.lost) == ([], [])


async def _waiting_on_locks(conn: object, sessions: int) -> bool:
    """Whether ``sessions`` other sessions wait for a lock (the cancel, then the retry)."""
    waiting = await conn.fetchval(  # type: ignore[attr-defined]
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND pid <> pg_backend_pid()"
    )
    return bool(waiting >= sessions)


@contextlib.asynccontextmanager
async def proxied(server: PostgresServer, url: str) -> AsyncIterator[tuple[CuttingProxy, PostgresStore]]:
    """A node's store reaching the database through a proxy that can cut its connection (one
    connection in its pool, so the cut is the operation's own)."""
    async with CuttingProxy(server.port) as proxy:
        node = PostgresStore(proxy.url(url), lease_ttl=TTL, pool_size=1)
        async with node:
            yield proxy, node


async def test_a_claim_whose_answer_was_cut_off_keeps_what_it_took(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # the server commits a claim, the connection is reset before its answer arrives, the store
    # tries again: it must hand back the run the first try took (now this node's), not claim
    # another and leave that one running unexecuted until its lease runs out
    direct = PostgresStore(postgres_url, lease_ttl=TTL)
    async with direct:
        first, second = await direct.insert([NewRun("t"), NewRun("t")])
        async with proxied(postgres_server, postgres_url) as (proxy, node):
            await node.register_node("n1", "inc-1", "x")
            assert await node.claim("n1", "inc-1", 1, {"warm": None}) == []  # the claim's statement is prepared now
            proxy.cut_after(lambda chunk: chunk[:1] == b"B")  # its next execution (Bind, Execute)
            claims = await node.claim("n1", "inc-1", 1, {"t": None})
            assert proxy.cuts == 1 and node.reconnects == 1
        assert [c.run_id for c in claims] == [first.id]
        assert (await direct.get(first.id)).claim_token == claims[0].token  # type: ignore[union-attr]
        assert (await direct.get(second.id)).status is RunStatus.PENDING  # type: ignore[union-attr]


async def test_an_insert_whose_commit_answer_was_cut_off_is_not_refused_as_a_duplicate(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with proxied(postgres_server, postgres_url) as (proxy, node):
        # with a queue limit the insert is a transaction: the lock, the insert, COMMIT
        proxy.cut_after(lambda chunk: b"pg_advisory_xact_lock" in chunk, lambda chunk: b"COMMIT" in chunk)
        [inserted] = await node.insert([NewRun("t", id="run-1")], max_pending=100)
        assert proxy.cuts == 1 and node.reconnects == 1
        assert (inserted.id, inserted.new) == ("run-1", True)
        assert (await node.counts()).pending == 1


async def test_finishes_whose_answer_was_cut_off_report_what_the_store_did(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # an outcome written, committed, its answer lost with the connection: tried again, the store
    # must say what it did (succeeded; pending for a retry), not take the token for a stale one
    from taskwatch.engine.runs import RunError
    from taskwatch.engine.store import Retry

    async with proxied(postgres_server, postgres_url) as (proxy, node):
        await node.register_node("n1", "inc-1", "x")
        await node.insert([NewRun("t", max_attempts=3) for _ in range(3)])
        warm, done, retried = await node.claim("n1", "inc-1", 3, {"t": None})
        assert await node.finish(warm.token, Succeeded()) is RunStatus.SUCCEEDED  # statement prepared
        proxy.cut_after(lambda chunk: chunk[:1] == b"B")
        assert await node.finish(done.token, Succeeded()) is RunStatus.SUCCEEDED
        proxy.cut_after(lambda chunk: b"COMMIT" in chunk)
        error = RunError(type="Boom", message="failed")
        assert await node.finish(retried.token, Retry(error, 30.0)) is RunStatus.PENDING
        assert proxy.cuts == 2 and node.reconnects == 2
        stored = await node.get(retried.run_id)
        assert stored is not None and (stored.status, stored.attempt) == (RunStatus.PENDING, 2)
        assert (await node.counts()).by_status["succeeded"] == 2


async def test_an_outage_leaves_the_drivers_reconnect_warnings_one_line_each(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the driver warns at every try to reconnect its pool's floor; with a whole traceback each,
    # an outage of a few minutes filled the log with pages saying "connection refused"
    caplog.set_level(logging.WARNING, logger="asyncpg.pool")
    proxy = CuttingProxy(postgres_server.port)
    await proxy.__aenter__()
    node = PostgresStore(proxy.url(postgres_url), lease_ttl=TTL)
    async with node:
        await node.register_node("n1", "inc-1", "x")
        await proxy.__aexit__(None, None, None)  # the database goes away: connections reset, then refused

        def warned() -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.name == "asyncpg.pool" and "connection floor" in r.getMessage()]

        deadline = asyncio.get_running_loop().time() + 10
        while not warned():
            assert asyncio.get_running_loop().time() < deadline, "the driver never tried to reconnect"
            await asyncio.sleep(0.02)
        record = warned()[0]
        assert record.exc_info is None and "Error: " in record.getMessage()  # the error, named
