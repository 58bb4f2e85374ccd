"""taskwatch in a database an application also uses: the ``schema`` option, and the refusal
of a schema whose tables would clash with the application's, on a real PostgreSQL server.

Users point taskwatch at their application's database, which often has tables named
``runs``, ``events`` or ``schema_migrations`` (Rails', golang-migrate's). Checked here:

- such a schema is refused before anything is created or changed, by the store, the
  event relay, an engine with both and a lease, and the cluster observer, with an error
  naming the clashing tables and saying to use ``?schema=taskwatch``;
- with ``?schema=taskwatch`` the same database works end to end (store, lease, events,
  observer on one URL) and every taskwatch object is in that schema, none in ``public``;
- a lease's own objects made before the store are taskwatch's, an application's
  ``leases`` table is refused by the lease;
- two schemas of one database are two separate stores; bad schema names are refused.
"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest
from taskwatch.engine import ClusterObserver, Engine, PostgresEventRelay, PostgresLease, TaskContext
from taskwatch.engine.errors import InvalidConfiguration, NotATaskwatchStore, SchemaInUse
from taskwatch.engine.store import NewRun, PostgresStore, make_store
from taskwatch.engine.store.queries import SCHEMA_VERSION

from .helpers import eventually
from .postgres_server import PostgresServer, schema_script

TIMEOUT = 30.0

APP_RUNS = [
    "CREATE TABLE runs (id bigserial PRIMARY KEY, athlete text NOT NULL, km float8 NOT NULL)",
    "INSERT INTO runs (athlete, km) VALUES ('ada', 10.5), ('bob', 42.2)",
]
RAILS_LEDGER = [
    "CREATE TABLE schema_migrations (version text PRIMARY KEY)",
    "INSERT INTO schema_migrations VALUES ('20240101000000')",
]
GOLANG_MIGRATE_LEDGER = [
    "CREATE TABLE schema_migrations (version bigint NOT NULL PRIMARY KEY, dirty boolean NOT NULL)",
    "INSERT INTO schema_migrations VALUES (20240101, false)",
]
APP_EVENTS = ["CREATE TABLE events (id serial PRIMARY KEY, what text)", "INSERT INTO events (what) VALUES ('signup')"]
#: unrelated tables an application's database has besides: never a reason to refuse
APP_OTHERS = ["CREATE TABLE users (id serial PRIMARY KEY, email text)", "CREATE TABLE ar_internal_metadata (key text)"]

#: every table, index and sequence taskwatch creates (store, events, lease)
TASKWATCH_TABLES = {"events", "leases", "nodes", "periodic", "queue_jobs", "runs", "schema_migrations", "totals",
                    "trigger_keys"}  # fmt: skip
TASKWATCH_INDEXES = {"events_bus_seq", "queue_jobs_by_queue", "runs_dedup", "runs_finished", "runs_pending",
                     "runs_running"}  # fmt: skip


async def execute(url: str, statements: list[str]) -> None:
    conn = await asyncpg.connect(url)
    try:
        for sql in statements:
            await conn.execute(sql)
    finally:
        await conn.close()


async def contents(url: str) -> dict[str, Any]:
    """Every schema, object (with its kind) and the application's rows: what must not change."""
    conn = await asyncpg.connect(url)
    try:
        objects = await conn.fetch(
            "SELECT n.nspname, c.relname, c.relkind::text FROM pg_class AS c "
            "JOIN pg_namespace AS n ON n.oid = c.relnamespace "
            "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') ORDER BY 1, 2"
        )
        schemas = await conn.fetch("SELECT nspname FROM pg_namespace WHERE nspname NOT LIKE 'pg\\_%' ORDER BY 1")
        rows = {}
        for (name,) in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'"):
            rows[name] = [tuple(r) for r in await conn.fetch(f'SELECT * FROM public."{name}" ORDER BY 1')]
        return {
            "schemas": [s[0] for s in schemas],
            "objects": [tuple(o) for o in objects],
            "rows": rows,
        }
    finally:
        await conn.close()


def of_schema(found: dict[str, Any], schema: str, kinds: str) -> set[str]:
    return {name for nsp, name, kind in found["objects"] if nsp == schema and kind in kinds}


def make_engine(url: str, node_id: str = "n") -> Engine:
    engine = Engine(store=url, node_id=node_id, lease=PostgresLease(url, ttl=10), events="postgres",
                    health_interval=None, lease_ttl=10)  # fmt: skip

    @engine.task
    async def hello(ctx: TaskContext) -> str:
        return "hi"

    return engine


# ---------------------------------------------------------------- a schema with another application's tables


@pytest.mark.parametrize(
    ("setup", "clashing"),
    [
        (APP_RUNS + RAILS_LEDGER + APP_OTHERS, ["runs", "schema_migrations"]),
        # its ledger's version would have been taken for a newer taskwatch's (SchemaTooNew)
        (GOLANG_MIGRATE_LEDGER + APP_OTHERS, ["schema_migrations"]),
        (APP_EVENTS, ["events"]),
    ],
    ids=["runs-and-rails-ledger", "golang-migrate-ledger", "events"],
)
async def test_another_applications_tables_are_refused_by_name_and_left_unchanged(
    postgres_url: str, setup: list[str], clashing: list[str]
) -> None:
    await execute(postgres_url, setup)
    before = await contents(postgres_url)

    errors: list[NotATaskwatchStore] = []
    with pytest.raises(NotATaskwatchStore) as store_refused:
        await PostgresStore(postgres_url).open()
    errors.append(store_refused.value)
    # an engine with the lease and the events on the same URL: refused before its lease writes anything
    with pytest.raises(NotATaskwatchStore) as engine_refused:
        async with make_engine(postgres_url):
            pass
    errors.append(engine_refused.value)
    # a reader of the events alone (another database's relay) and `taskwatch attach postgresql://...`
    with pytest.raises(NotATaskwatchStore) as relay_refused:
        await PostgresEventRelay(postgres_url).start()
    errors.append(relay_refused.value)
    with pytest.raises(NotATaskwatchStore) as observer_refused:
        await ClusterObserver(postgres_url).start()
    errors.append(observer_refused.value)

    for error in errors:
        assert error.tables == clashing
        message = str(error)
        assert f"({', '.join(clashing)})" in message and "(schema public)" in message
        assert "nothing was changed" in message and "?schema=taskwatch" in message
        assert "users" not in message  # unrelated tables are no clash
    assert await contents(postgres_url) == before


async def test_the_lease_refuses_an_applications_leases_table_and_creates_nothing(postgres_url: str) -> None:
    await execute(postgres_url, ["CREATE TABLE leases (id serial PRIMARY KEY, tenant text, until date)"])
    before = await contents(postgres_url)
    with pytest.raises(NotATaskwatchStore, match=r"\(leases\).*\?schema=taskwatch"):
        await PostgresLease(postgres_url).acquire("n")
    with pytest.raises(NotATaskwatchStore, match=r"\(leases\)"):
        await PostgresStore(postgres_url).open()
    assert await contents(postgres_url) == before  # no lease_terms sequence either


async def test_a_lease_made_before_the_store_is_taskwatchs_own(postgres_url: str) -> None:
    # a lease writes no ledger: its table and sequence alone are no clash for the store
    assert await PostgresLease(postgres_url).acquire("n") is not None
    async with PostgresStore(postgres_url) as store:
        assert [i.new for i in await store.insert([NewRun(task="t", params={})])] == [True]


# ---------------------------------------------------------------- a schema of its own


async def test_a_schema_of_its_own_works_end_to_end_beside_the_application(postgres_url: str) -> None:
    await execute(postgres_url, APP_RUNS + RAILS_LEDGER + APP_OTHERS)
    before = await contents(postgres_url)
    url = f"{postgres_url}?schema=taskwatch"  # one URL for the store, the lease, the events and the observer

    # the node first: it makes the schema, which a watcher only reads
    async with make_engine(url) as engine, ClusterObserver(url) as observer:
        assert engine.leadership().is_leader
        handle = await engine.submit("hello")
        assert (await handle.wait()).result == "hi"
        relay = engine.cluster
        assert relay is not None
        # through the events table: this node's own events read back, and the observer's
        for bus in (relay.bus, observer.bus):
            await eventually(
                lambda bus=bus: any(e.kind == "run.succeeded" and e.run_id == handle.id  # type: ignore[attr-defined]
                                    for e in bus.recent()),
                timeout=TIMEOUT,
            )  # fmt: skip
        await observer.refresh()
        record = observer.record(handle.id)
        assert record is not None and record.status.value == "succeeded"
        # the observer's lease, made from its store's URL, reads the leases table of the same schema
        await eventually(lambda: observer.leader is not None and observer.leader.holder == "n", timeout=TIMEOUT)

    after = await contents(postgres_url)
    assert set(after["schemas"]) == {*before["schemas"], "taskwatch"}
    assert of_schema(after, "taskwatch", "rp") == TASKWATCH_TABLES
    assert TASKWATCH_INDEXES <= of_schema(after, "taskwatch", "i")
    assert "lease_terms" in of_schema(after, "taskwatch", "S")
    # the application's schema is exactly as it was: no taskwatch object, its rows untouched
    assert [o for o in after["objects"] if o[0] == "public"] == [o for o in before["objects"] if o[0] == "public"]
    assert after["rows"] == before["rows"]

    # started again on the schema it made: taskwatch's own, with its history
    async with make_engine(url) as again:
        assert again.get(handle.id) is not None


async def test_two_schemas_of_one_database_are_two_stores(postgres_url: str) -> None:
    async with PostgresStore(postgres_url, schema="TaskWatch") as a, make_store(f"{postgres_url}?schema=other") as b:
        [inserted] = await a.insert([NewRun(task="t", params={})])
        assert await a.get(inserted.id) is not None
        assert await b.get(inserted.id) is None and (await b.counts()).inserted_total == 0
    # a name is taken exactly as written (quoted): not folded to lower case
    assert {"TaskWatch", "other"} <= set((await contents(postgres_url))["schemas"])


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("name", ["bad-name", "1st", "a b", 'x"; DROP TABLE runs; --', "pg_taskwatch", "", "x" * 64])
def test_a_bad_schema_name_is_refused_naming_it(name: str) -> None:
    from urllib.parse import quote

    url = f"postgresql://app:secret@db/app?schema={quote(name)}"
    makers = [
        lambda: make_store(url),
        lambda: PostgresStore("postgresql://app:secret@db/app", schema=name),
        lambda: PostgresLease(url),
        lambda: PostgresEventRelay(url),
        lambda: ClusterObserver(url),
    ]
    for make in makers:
        with pytest.raises(InvalidConfiguration) as refused:
            make()
        assert repr(name) in str(refused.value) and "schema" in str(refused.value)
        assert "secret" not in str(refused.value)


def test_the_schema_is_given_in_one_place_and_kept_in_the_stores_url() -> None:
    with pytest.raises(InvalidConfiguration, match="in one place"):
        make_store("postgresql://db/app?schema=a", schema="b")
    with pytest.raises(InvalidConfiguration, match="in one place"):
        PostgresStore("postgresql://db/app?schema=a", schema="b")
    with pytest.raises(InvalidConfiguration, match="search_path"):
        make_store("postgresql://db/app?schema=a&search_path=b")
    s = make_store("postgresql://app:secret@db/app?schema=tw&application_name=x&pool_size=2")
    assert isinstance(s, PostgresStore) and s.schema == "tw"
    # the relay of events="postgres" and the observer's lease are made from this URL
    assert s.url == "postgresql://app:secret@db/app?application_name=x&schema=tw"
    assert PostgresStore("postgresql://db/app", schema="tw").url == "postgresql://db/app?schema=tw"
    assert PostgresStore("postgresql://db/app").schema is None  # the connection's default, as ever


async def test_a_database_an_earlier_taskwatch_still_runs_on_is_not_migrated_under_it(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # a rolling upgrade: migrated under the earlier version's live node, its writes failed from then
    # on (its trigger counts, and a newer node's saved ones, were lost) and nothing said so
    older = SCHEMA_VERSION - 1
    db = postgres_url.rsplit("/", 1)[1]
    postgres_server.sql(";\n".join(schema_script(older)), db)
    postgres_server.sql(
        "INSERT INTO nodes (incarnation, node, version, started_at, last_heartbeat, running, registered_seq) "
        "VALUES ('i1', 'web-1', '0.1.0', EXTRACT(EPOCH FROM now()) - 60, EXTRACT(EPOCH FROM now()) - 1, 0, 1)",
        db,
    )
    with pytest.raises(SchemaInUse, match=r"node\(s\) web-1 of an earlier taskwatch still run on it") as refused:
        await PostgresStore(postgres_url, node_ttl=30).open()
    assert (refused.value.found, refused.value.nodes) == (older, ["web-1"])
    assert postgres_server.sql("SELECT MAX(version) FROM schema_migrations", db) == str(older)
    # once it stopped, the database is migrated
    postgres_server.sql("UPDATE nodes SET stopped_at = EXTRACT(EPOCH FROM now())", db)
    async with PostgresStore(postgres_url, node_ttl=30):
        pass
    assert postgres_server.sql("SELECT MAX(version) FROM schema_migrations", db) == str(SCHEMA_VERSION)
