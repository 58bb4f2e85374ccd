"""The PostgreSQL run store: several nodes (processes, hosts) share one queue and one history.

Every node points at one database and the database decides: a claim is one
``UPDATE ... WHERE seq IN (SELECT ... FOR UPDATE SKIP LOCKED LIMIT n)``, so
two nodes never take the same run and never wait on each other's rows; a
finish or a heartbeat carries the claim token, so a node that lost its claim
(paused past its lease, cut off from the database) cannot overwrite the
outcome of the node that took the run over. The statements are the SQLite
store's (``queries.py``), bound positionally, plus a few set-based ones that
do many runs in one round trip.

Per node, finishes are group-committed: those that arrive while a batch is
being written go out together in the next one. Other nodes learn of new work
and cancel requests through LISTEN/NOTIFY: at most one NOTIFY in flight per
node, so a busy node sends a few dozen a second, never one per run. A
notification can be lost (the listening connection was down), so waiters
keep a slow poll. Lease and heartbeat times come from the database's clock
(the local clock plus an offset measured against it), so nodes with skewed
clocks still agree on which claims expired.

The driver is asyncpg (the ``postgres`` extra); it is imported only when a
PostgreSQL store is created.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from ..hop import spawn
from ..errors import (
    DuplicateRunId,
    InvalidConfiguration,
    NotATaskwatchStore,
    QueueFull,
    RunNotFound,
    SchemaInUse,
    SchemaTooNew,
    StoreClosed,
    StoreDriverMissing,
    StoreError,
    StoreGaveUp,
    StoreUnavailable,
)
from ..options import PostgresOptions, check_options
from ..runs import CancelReason, Progress, RunError, RunStatus, run_status
from ..urls import password_problem, redact_url
from . import queries as Q
from .base import (
    Store,
    adoptable,
    gone_incarnations,
    in_outage_grace,
    lost_reason,
    merge_taken,
    merge_trigger_records,
    new_run_id,
    trigger_holders_taken,
)
from .models import (
    CancelResult,
    Cancelled,
    Claim,
    Counts,
    Failed,
    HeartbeatResult,
    Inserted,
    NewRun,
    NodeInfo,
    Outcome,
    Page,
    Recovered,
    Retry,
    StoredJob,
    StoredRun,
    Succeeded,
    TriggerKeyRecord,
    Wakeup,
)
from .memory import parse_cursor
from .rows import (
    FIRE_AHEAD,
    RunRows,
    trigger_save,
    book_recovered,
    counts_of,
    dumps,
    error_json,
    failed_at_claim,
    loads,
    node_info,
    claim_lease,
    recovery_step,
    seq_of,
    stored_job,
)

if TYPE_CHECKING:
    import asyncpg

log = logging.getLogger("taskwatch.store.postgres")

#: NOTIFY payloads are capped at 8000 bytes by the server; leave room for the envelope
_PAYLOAD_BUDGET = 7000
#: how often the listening connection re-measures the database clock (and proves it is alive)
_CLOCK_SYNC_INTERVAL = 10.0
#: round trips per clock measurement, and the slowest one a measurement may rest on
_CLOCK_SAMPLES = 3
_CLOCK_MAX_RTT = 0.5
#: a pending change waits at most this long for the NOTIFY that carries it, so a busy
#: node sends a few dozen notifications a second however many runs it writes
_NOTIFY_SPACING = 0.02
_ADVICE = "Check that the database server is up and reachable from this host"
#: a connection attempt (and a start's first queries) waits at least this long for the server's
#: answer, however short ``reconnect_timeout``: a connection is a few round trips (a TLS handshake,
#: the login), which a loaded machine or a far server stretches past a second, and 0 means "wait
#: out no outage", not "give a server no time to answer"
_ANSWER_FLOOR = 5.0
#: what to do about an error the server answered with, by SQLSTATE (or its class): the
#: server is up, so "check it is reachable" would send the user the wrong way
_ANSWERED_ADVICE = {
    "3D000": "The server is up but has no such database: create it (createdb NAME) or fix the database in the URL",
    "28": "The server refused the login: check the user and password in the URL (or PGPASSWORD, ~/.pgpass) and pg_hba.conf",
    "42501": "The server refused the user a privilege taskwatch needs: grant it, or use the database's owner",
}
#: SQLSTATE classes tried again (for up to ``reconnect_timeout``), each an answer that a later try
#: can get past: the connection or the server went away (08: a cut; 57: a shutdown, a restart, a
#: session or statement ended by an operator or a timeout), the server cannot serve now (53: too many
#: connections, disk or memory full), or the transaction lost a race with another (40: a
#: serialization failure, a deadlock), which is no outage. An answer refusing the statement itself
#: is none of these: see _REFUSED_CLASSES
_TRANSIENT_CLASSES = ("08", "57", "53", "40")
#: the server ended a session left idle inside its transaction (idle_in_transaction_session_timeout,
#: which this store sets): the connection is lost, as a cut one is
_SESSION_ENDED = "25P03"
#: SQLSTATE classes of an answer refusing the operation itself, which every try gets alike: a value
#: (22: data exception), a constraint (23), a program limit (54: an index entry over its ~2.7 KB, say),
#: the statement or what it names (42, but for 42501, a privilege, in _ANSWERED_ADVICE), a feature
#: (0A), a cardinality (21). Raised as StoreError, neither retried nor said to be an outage
#: (StoreUnavailable, which callers write again and again, saying to check the server is up)
_REFUSED_CLASSES = ("22", "23", "54", "42", "0A", "21")
#: run ids an insert that failed may have stored, kept for a later insert of them to look for
_UNSURE_KEPT = 100_000


class _FloorRetriesInOneLine(logging.Filter):
    """asyncpg logs a whole traceback each time its pool fails to restore its minimum
    connection, at every retry through an outage (backing off to once a minute), while the
    store says once itself that the database is out of reach. A driver's or the network's
    error keeps its warning on one line, the error named; anything else keeps its traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        floor = isinstance(record.msg, str) and record.msg.startswith("Failed to restore the pool connection floor")
        if floor and exc is not None and (type(exc).__module__.startswith("asyncpg") or isinstance(exc, OSError)):
            record.msg = f"{record.msg} ({type(exc).__name__}: {exc})"
            record.exc_info = None
            record.exc_text = None
        return True


_FLOOR_RETRIES = _FloorRetriesInOneLine()


#: what taskwatch itself reads from a PostgreSQL URL's query (the store's options, the event
#: relay's), never handed to the driver: one URL serves the store, the lease and the events
OWN_OPTIONS = frozenset({"pool_size", "lease_ttl", "node_ttl", "reconnect_timeout", "schema", "keep", "max_age"})


def driver_url(url: str) -> str:
    """``url`` as the driver takes it: scheme ``postgresql``, taskwatch's own options left out."""
    parts = urlsplit(url)
    rest = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key not in OWN_OPTIONS]
    return urlunsplit(("postgresql", parts.netloc, parts.path, urlencode(rest), parts.fragment))


#: a schema name taskwatch takes: a plain SQL identifier, always used quoted (so exactly as written)
_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

_SCHEMA_ADVICE = (
    "Give taskwatch a schema of its own: add ?schema=taskwatch to the URL (the schema is created at "
    "start; use the same URL on every node, for the store, the lease and the events), or a database "
    "of its own"
)

#: every table, index and sequence taskwatch names (the migrations' and PostgresLease's): another
#: application's object of one of these names in taskwatch's schema is a clash. (Names PostgreSQL
#: picks itself, such as a primary key's index, step aside from a name already taken.)
_CREATED = re.compile(r"CREATE\s+(?:UNIQUE\s+)?(?:TABLE|INDEX|SEQUENCE)\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.I)
LEASE_OBJECTS = frozenset({"leases", "lease_terms"})
TASKWATCH_OBJECTS = frozenset(
    _CREATED.findall(" ".join([Q.CREATE_MIGRATIONS, *(sql for _, _, sqls in Q.MIGRATIONS for sql in sqls)]))
) | LEASE_OBJECTS
#: the columns of taskwatch's schema_migrations (Rails' and golang-migrate's differ), and of its leases
_LEDGER_COLUMNS = frozenset({"version", "name", "applied_at"})
_LEASE_COLUMNS = frozenset({"name", "holder", "term", "expires_at"})

#: the target schema (the named one, else the session's current one) and those of its objects
#: named in $2, with their kinds and columns; no row at all: the schema does not exist
_SCHEMA_OBJECTS = """
SELECT n.nspname::text, c.relname::text, c.relkind::text,
       ARRAY(SELECT a.attname::text FROM pg_attribute AS a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped)
FROM pg_namespace AS n
LEFT JOIN pg_class AS c ON c.relnamespace = n.oid AND c.relname = ANY($2::text[])
WHERE n.nspname = COALESCE($1, current_schema())
ORDER BY c.relname"""


def schema_of(url: str, given: str | None = None) -> tuple[str | None, list[str]]:
    """The schema for taskwatch's tables that ``url``'s ``schema`` option (or ``given``) names
    (None: the connection's default, as before the option existed), and what is wrong with it."""
    query = parse_qsl(urlsplit(url).query, keep_blank_values=True)
    named = list(dict.fromkeys([value for key, value in query if key == "schema"] + ([] if given is None else [given])))
    if not named:
        return None, []
    if len(named) > 1:
        return None, [f"schema is given as {' and '.join(map(repr, named))}; give it in one place"]
    schema = named[0]
    if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
        return None, [f"schema {schema!r} is not a plain SQL identifier: use letters, digits and _, "
                      "not starting with a digit, at most 63 (e.g. schema=taskwatch)"]  # fmt: skip
    if schema.lower().startswith("pg_"):
        return None, [f"schema {schema!r} starts with pg_, which PostgreSQL keeps for its own (e.g. schema=taskwatch)"]
    if any(key == "search_path" for key, _ in query):
        return None, [f"schema={schema} and search_path both in the URL; give schema only"]
    return schema, []


def schema_settings(schema: str | None) -> dict[str, str]:
    """The session settings of every connection taskwatch opens: with a schema, its unqualified
    statements find and create their tables there, and there only (the statements stay the same)."""
    return {} if schema is None else {"search_path": f'"{schema}"'}


def with_schema(url: str, schema: str | None) -> str:
    """``url`` naming ``schema`` in its query: the one URL a relay or a lease made from a store's
    ``url`` (``events="postgres"``, the cluster observer) reads the same schema from."""
    if schema is None or schema_of(url)[0] == schema:
        return url
    parts = urlsplit(url)
    query = [(key, value) for key, value in parse_qsl(parts.query, keep_blank_values=True) if key != "schema"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("schema", schema)])))


async def claim_schema(conn: asyncpg.Connection, schema: str | None, where: str, names: Collection[str]) -> None:
    """Refuse the schema taskwatch's tables go in when it holds another application's objects
    named as taskwatch's ``names`` and no taskwatch ledger (:class:`NotATaskwatchStore`, before
    anything is created or changed); create ``schema`` when it is missing. In the caller's
    transaction, under the migration lock."""
    rows = await conn.fetch(_SCHEMA_OBJECTS, schema, sorted({*names, "schema_migrations"}))
    if not rows:
        if schema is not None:
            # only when missing: CREATE SCHEMA IF NOT EXISTS needs the right to create one even
            # when it exists (a schema made for taskwatch by an administrator, say)
            await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        return
    foreign = _foreign(_objects(rows), names)
    if foreign:
        raise NotATaskwatchStore(f"{where} (schema {rows[0][0]})", foreign, advice=_SCHEMA_ADVICE)


_WATCH_ADVICE = (
    "Watch the cluster's own database, with the ?schema=NAME its nodes use if they use one "
    "(?schema=taskwatch, say): a watcher creates and changes no table; the nodes make them when they first start"
)


def _advice_for(exc: BaseException) -> str:
    sqlstate = str(getattr(exc, "sqlstate", "") or "")
    return _ANSWERED_ADVICE.get(sqlstate) or _ANSWERED_ADVICE.get(sqlstate[:2]) or _ADVICE


async def check_schema(conn: asyncpg.Connection, where: str, schema: str | None = None) -> None:
    """What a watcher (the cluster observer, its event relay) does instead of :func:`migrate`:
    it reads, and never creates or migrates (a newer dashboard migrating an older cluster's
    database would keep that cluster's nodes from starting). Raises unless the schema holds
    taskwatch's tables at this code's version: :class:`StoreUnavailable` saying what was found
    (nothing, an older version), :class:`NotATaskwatchStore`, :class:`SchemaTooNew`."""
    rows = await conn.fetch(_SCHEMA_OBJECTS, schema, sorted({*TASKWATCH_OBJECTS, "schema_migrations"}))
    if not rows:
        named = f'schema "{schema}"' if schema is not None else "the connection's schema (search_path)"
        raise StoreUnavailable(where, f"{named} does not exist, so it holds no taskwatch tables", _WATCH_ADVICE)
    found = _objects(rows)
    foreign = _foreign(found, TASKWATCH_OBJECTS)
    if foreign:
        raise NotATaskwatchStore(f"{where} (schema {rows[0][0]})", foreign, advice=_WATCH_ADVICE)
    if "schema_migrations" not in found:
        raise StoreUnavailable(where, f"schema {rows[0][0]} holds no taskwatch run store (no schema_migrations table)",
                               _WATCH_ADVICE)  # fmt: skip
    version = int(await conn.fetchval(Q.SCHEMA_FOUND))
    if version > Q.SCHEMA_VERSION:
        raise SchemaTooNew(where, version, Q.SCHEMA_VERSION)
    if version < Q.SCHEMA_VERSION:
        raise StoreUnavailable(
            where,
            f"its tables are at schema version {version}, older than this taskwatch's {Q.SCHEMA_VERSION}, and a "
            "watcher does not migrate them (the cluster's nodes would then refuse the database)",
            "Upgrade the cluster's nodes first (the first to start migrates it), or watch it with a taskwatch "
            "of the nodes' version",
        )


def _objects(rows: Sequence[Any]) -> dict[str, tuple[str, frozenset[str]]]:
    """The rows of :data:`_SCHEMA_OBJECTS` by object name: (kind, columns)."""
    return {name: (kind, frozenset(columns)) for _, name, kind, columns in rows if name is not None}


def _foreign(found: Mapping[str, tuple[str, frozenset[str]]], names: Collection[str]) -> list[str]:
    """Those of taskwatch's ``names`` in ``found`` that another application made (none beside
    taskwatch's own ledger)."""
    if found.get("schema_migrations", ("", frozenset()))[1] == _LEDGER_COLUMNS:
        return []
    return [name for name, (kind, cols) in found.items() if name in names and not _lease_made(name, kind, cols)]


def _lease_made(name: str, kind: str, columns: frozenset[str]) -> bool:
    """A PostgresLease's table or sequence (it writes no ledger: a lease may come before the store)."""
    return (name == "leases" and kind == "r" and columns == _LEASE_COLUMNS) or (name == "lease_terms" and kind == "S")


def load_driver() -> Any:
    """The asyncpg module, or :class:`StoreDriverMissing` naming the extra that installs it."""
    try:
        import asyncpg
    except ImportError:
        raise StoreDriverMissing("PostgreSQL", "asyncpg", "postgres") from None
    return asyncpg


class _Compiled:
    """One statement of ``queries.py`` in PostgreSQL's form, and how to bind a dict to it."""

    __slots__ = ("sql", "names")

    def __init__(self, sql: str) -> None:
        self.sql, self.names = Q.for_postgres(sql)

    def args(self, values: Mapping[str, Any]) -> list[Any]:
        return [values[n] for n in self.names]


_SQL: dict[str, _Compiled] = {}

_UNLOCKED_CLAIMS = Q.RUNNING_CLAIMS.replace("/*LOCK*/", "")


def _q(sql: str) -> _Compiled:
    found = _SQL.get(sql)
    if found is None:
        found = _SQL[sql] = _Compiled(sql)
    return found


class _Tx:
    """One transaction on one connection, and what to announce once it has committed."""

    __slots__ = ("conn", "totals", "work", "cancels", "finished", "again")

    def __init__(self, conn: asyncpg.Connection, again: bool = False) -> None:
        self.conn = conn
        #: an earlier try of this operation lost its connection: it may have been committed
        self.again = again
        self.totals: dict[str, int] = {}
        self.work = False
        self.cancels: list[str] = []
        self.finished: list[str] = []

    def add(self, name: str, n: int = 1) -> None:
        self.totals[name] = self.totals.get(name, 0) + n

    async def fetch(self, sql: str, values: Mapping[str, Any]) -> list[Any]:
        c = _q(sql)
        return await self.conn.fetch(c.sql, *c.args(values))  # type: ignore[no-any-return]

    async def fetchrow(self, sql: str, values: Mapping[str, Any]) -> Any:
        c = _q(sql)
        return await self.conn.fetchrow(c.sql, *c.args(values))

    async def fetchval(self, sql: str, values: Mapping[str, Any]) -> Any:
        c = _q(sql)
        return await self.conn.fetchval(c.sql, *c.args(values))

    async def execute(self, sql: str, values: Mapping[str, Any]) -> int:
        """Run a statement; how many rows it changed."""
        c = _q(sql)
        status: str = await self.conn.execute(c.sql, *c.args(values))
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Sequence[Mapping[str, Any]]) -> None:
        c = _q(sql)
        await self.conn.executemany(c.sql, [c.args(r) for r in rows])


class _DedupRace(Exception):
    """Another node inserted a run holding the same key meanwhile: run the insert again."""


@dataclass(slots=True)
class _Finish:
    seq: int
    token: str
    status: str
    result: str | None
    error: str | None
    reason: str | None
    future: asyncio.Future[RunStatus | None] = field(repr=False)
    #: the attempt's last progress report, if it made one
    progress: Progress | None = None


class PostgresStore(Store):
    """Runs in a PostgreSQL database shared by every node of a cluster.

    ``url``: ``postgresql://user:password@host:port/database`` (any option
    asyncpg accepts may follow as a query parameter). ``pool_size``:
    connections this node opens at most (plus one that listens).
    ``reconnect_timeout``: how long an operation keeps retrying while the
    database is unreachable before it fails with :class:`StoreUnavailable`
    (default: ``lease_ttl``, after which other nodes recover this node's runs
    anyway). It also bounds, at 5 s at least, the wait for the server's
    answer to a connection attempt, and at start (:meth:`open`) to the
    connection and the first queries: a server that answers nothing (paused,
    overloaded, behind a network that drops packets) would otherwise hold
    them for the driver's 60 s. :meth:`open` then fails with
    :class:`StoreUnavailable` saying so, as it does at once when the server
    refuses the connection: a start waits out no outage. The migration at
    start is not bounded by it: building an index over a big table, or waiting
    for another node's migration, rightly takes longer. ``clock``: leave unset
    to use the database's clock; tests pass their own. ``schema`` (or
    ``?schema=NAME`` in the URL): the schema every table, index and sequence
    of taskwatch's goes in, created at start
    (default: the connection's default schema, usually ``public``); :attr:`url`
    then names it, so a relay or a lease made from it uses the same one.
    ``migrate=False``: a watcher's store (the cluster observer's), which never creates or
    migrates the tables and refuses a database without them, or at another schema version
    (:func:`check_schema`).
    """

    name = "postgres"
    #: other processes' inserts and cancels are pushed to :meth:`subscribe`rs (LISTEN/NOTIFY)
    pushes_remote_changes = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 8,
        reconnect_timeout: float | None = None,
        channel: str = "taskwatch",
        clock: Callable[[], float] | None = None,
        lease_ttl: float = 30.0,
        node_ttl: float | None = None,
        max_lost: int = 3,
        schema: str | None = None,
        migrate: bool = True,
    ) -> None:
        self._driver = load_driver()
        super().__init__(
            clock=self._database_time if clock is None else clock,
            lease_ttl=lease_ttl,
            node_ttl=node_ttl,
            max_lost=max_lost,
        )
        check_options(
            PostgresOptions, "PostgresStore", pool_size=pool_size, reconnect_timeout=reconnect_timeout, channel=channel
        )
        if (problem := password_problem(url)) is not None:
            raise InvalidConfiguration(f"run store {redact_url(url)}", [problem])
        self.schema, problems = schema_of(url, schema)
        if problems:
            raise InvalidConfiguration(f"run store {redact_url(url)}", problems)
        self.url = with_schema(url, self.schema)
        #: what the driver connects to: the URL without taskwatch's own options (the schema)
        self._dsn = driver_url(self.url)
        self._settings = schema_settings(self.schema)
        #: whether open() creates and migrates the tables (False: a watcher's, which only checks them)
        self.migrates = migrate
        self.pool_size = pool_size
        self.reconnect_timeout = lease_ttl if reconnect_timeout is None else reconnect_timeout
        #: how long a connection attempt (and a start's first queries) waits for the server's answer
        self._answer_wait = max(self.reconnect_timeout, _ANSWER_FLOOR)
        self.channel = channel
        self._db_clock = clock is None
        #: database clock minus local clock, measured by the listening connection
        self._offset = 0.0
        self._clock_synced = False
        self._where = redact_url(self.url)
        self._server = _server_of(self._dsn)
        #: rows read one by one: a row changed by hand holds up no other run
        self._run_rows = RunRows(
            self._where, log, lambda sql: f"{sql} (in psql, on that database)",
            "runs" if self.schema is None else f'"{self.schema}".runs',
        )  # fmt: skip
        self._pool: asyncpg.Pool | None = None
        self._closing = False
        self._listener: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()
        self._finishes: list[_Finish] = []
        self._finisher: asyncio.Task[None] | None = None
        self._outbox = Wakeup()
        self._notifier: asyncio.Task[None] | None = None
        #: tells this node's own notifications apart from the others'
        self._sender = os.urandom(6).hex()
        #: ids left out of notifications that would have outgrown the payload limit
        self.notify_overflow = 0
        #: notifications received from other nodes
        self.notifications_received = 0
        #: times an operation had to wait for the database to come back
        self.reconnects = 0
        #: times the listening connection was (re)established
        self.listen_connects = 0
        #: when operations began to find the database unreachable (None: the last one got through)
        self._down_since: float | None = None
        #: when (by :attr:`clock`) an operation last got through after an outage (None: none seen)
        self._back_at: float | None = None
        #: set by a stopping engine: no retry goes on past it
        self._give_up_at: float | None = None
        #: every operation's bound (none until a stopping engine sets one), and the connections
        #: operations hold: give_up_after bounds them all, and closes those still busy at the deadline
        self._limits: set[asyncio.Timeout] = set()
        self._busy: set[Any] = set()
        self._terminator: asyncio.TimerHandle | None = None
        #: ids of runs whose insert failed after a try that may have committed, its answer
        #: lost: a later insert of them (the engine puts a submit_nowait batch back) looks first
        self._unsure: dict[str, None] = {}

    def describe(self) -> str:
        return self._where

    @property
    def unreachable_since(self) -> float | None:
        return self._down_since

    def __repr__(self) -> str:
        return f"<PostgresStore {self._where} {'open' if self._pool is not None else 'closed'}>"

    # ---------------------------------------------------------------- lifecycle

    @property
    def retry_period(self) -> float:
        return self.reconnect_timeout

    def give_up_after(self, deadline: float | None) -> None:
        self._give_up_at = deadline
        if self._terminator is not None:
            self._terminator.cancel()
            self._terminator = None
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + (deadline - time.monotonic())
        # operations already under way are bounded too (a claim, an outcome sent before the stop)
        for limit in list(self._limits):
            with contextlib.suppress(RuntimeError):  # one that is expiring right now
                limit.reschedule(when)
        # and a connection still busy then is closed under its operation: cancelled, a transaction
        # would wait for its ROLLBACK's answer, which a silent network never sends
        self._terminator = loop.call_at(when, self._terminate_busy)

    def _terminate_busy(self) -> None:
        self._terminator = None
        for conn in list(self._busy):
            with contextlib.suppress(Exception):
                conn.terminate()

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._closing = False
        self.give_up_after(None)
        pool_log = logging.getLogger("asyncpg.pool")
        if _FLOOR_RETRIES not in pool_log.filters:
            pool_log.addFilter(_FLOOR_RETRIES)
        answer_by = asyncio.get_running_loop().time() + self._answer_wait
        try:
            pool = await self._driver.create_pool(
                self._dsn, min_size=1, max_size=self.pool_size, reset=_keep_session,
                # every connection the pool makes, this first one and those replacing a lost one
                # later (an operation's retries end at reconnect_timeout: an attempt need not outlast it)
                timeout=self._answer_wait,
                # a node paused or cut off inside a transaction (a submit holding the queue's
                # lock, say) would hold its locks until the server gave up on the connection,
                # hours on a silent network: the server ends such a session after a lease
                server_settings={
                    "idle_in_transaction_session_timeout": str(max(1000, int(self.lease_ttl * 1000))),
                    **self._settings,
                },
            )
        except TimeoutError as exc:
            raise self._unanswered("a connection attempt") from exc
        except Exception as exc:  # noqa: BLE001 - re-raised as the store's own error
            raise self._translate(exc) from exc
        self._pool = pool
        silent = False
        try:
            async with pool.acquire() as conn:
                try:
                    # a server may go silent once it took the connection: its first answers are
                    # waited for no longer than the connection's (the clock's samples, or a read
                    # of the schema, are a few quick round trips)
                    async with asyncio.timeout_at(answer_by):
                        if self._db_clock:
                            await self._sync_clock(conn)
                        else:
                            await conn.fetchval("SELECT 1")
                        if not self.migrates:
                            await check_schema(conn, self._where, self.schema)
                except TimeoutError as exc:
                    silent = True
                    # handed back, the connection would wait for the answers first
                    conn.terminate()
                    raise self._unanswered("its first queries") from exc
                if self.migrates:
                    await self._migrate(conn)
        except BaseException as exc:
            self._pool = None
            if silent:
                pool.terminate()  # closing would wait for the silent server to see the others go
            else:
                await pool.close()
            if isinstance(exc, Exception) and not isinstance(exc, StoreError):
                raise self._translate(exc) from exc
            raise
        self._listening = asyncio.Event()
        self._listener = spawn(self._listen(), name="taskwatch-postgres-listen")
        # an open store hears the other nodes: work they insert from now on is not missed
        # (if listening takes longer, the slow poll covers the gap)
        try:
            await self.wait_listening(min(5.0, self.reconnect_timeout))
        except TimeoutError:
            log.warning("not yet listening to the other nodes of %s; polling meanwhile", self._where)

    async def close(self) -> None:
        """Write the finishes still queued, send the last notification, then close every connection."""
        pool = self._pool
        if pool is None:
            return
        self._closing = True
        if self._finisher is not None:
            await asyncio.gather(self._finisher, return_exceptions=True)
        if self._notifier is not None:  # read after the last finishes: they may have started it
            await asyncio.gather(self._notifier, return_exceptions=True)
        listener, self._listener = self._listener, None
        if listener is not None:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)
        self._pool = None
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except (TimeoutError, OSError):
            pool.terminate()
        finally:
            # only now: until the pool is closed, a connection stuck past the stop's deadline is
            # what the terminator closes (pool.close() would wait for it)
            if self._terminator is not None:
                self._terminator.cancel()
                self._terminator = None

    async def _migrate(self, conn: asyncpg.Connection) -> None:
        await migrate(conn, self._where, self.schema, node_ttl=self.node_ttl, now=None if self._db_clock else self.clock())

    # ---------------------------------------------------------------- the database clock

    def _database_time(self) -> float:
        return time.time() + self._offset

    async def _sync_clock(self, conn: asyncpg.Connection) -> None:
        """Measure the database clock's offset: the sample with the shortest round trip of a few
        (a process paused between reading its clock and sending would skew a single sample
        by the pause). A measurement whose every round trip was slow keeps the last offset."""
        best: tuple[float, float] | None = None
        for _ in range(_CLOCK_SAMPLES):
            sent = time.time()
            db = await conn.fetchval(Q.PG_NOW)
            back = time.time()
            if best is None or back - sent < best[0]:
                best = (back - sent, db - (sent + back) / 2)
        assert best is not None
        rtt, offset = best
        if rtt <= _CLOCK_MAX_RTT or not self._clock_synced:
            self._offset = offset
            self._clock_synced = True

    # ---------------------------------------------------------------- running operations

    async def _run(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, write: bool = True, single: bool = False
    ) -> Any:
        """``fn(tx, *args)`` in one transaction, retried while the database is unreachable.

        ``single``: ``fn`` runs one statement, atomic by itself, so no
        transaction is opened around it (BEGIN and COMMIT would cost two more
        round trips); reads (``write=False``) have none either. Once committed,
        this node's subscribers and the other nodes hear of the work and
        cancels it made.

        Once a stopping engine has set :meth:`give_up_after`, an operation
        started then is bounded by it as a whole, a hung connection included
        (a network that drops packets answers nothing, not even a refusal).
        """
        give_up = self._give_up_at
        limit = asyncio.timeout(None if give_up is None else max(0.0, give_up - time.monotonic()))
        try:
            async with limit:
                self._limits.add(limit)
                try:
                    return await self._attempts(fn, *args, write=write, single=single)
                finally:
                    self._limits.discard(limit)
        except TimeoutError:
            if limit.expired():
                raise StoreGaveUp(self._where, "an operation was still waiting for the database") from None
            raise

    async def _attempts(
        self, fn: Callable[..., Awaitable[Any]], *args: Any, write: bool, single: bool
    ) -> Any:
        delay = 0.05
        deadline: float | None = None
        races = 0
        cut = False
        while True:
            pool = self._pool
            if pool is None:
                raise StoreClosed(self._where)
            try:
                async with pool.acquire() as conn:
                    self._busy.add(conn)
                    try:
                        tx = _Tx(conn, again=cut)
                        if not write:
                            result = await fn(tx, *args)
                            break
                        if single:
                            result = await fn(tx, *args)
                            assert not tx.totals, "a single statement counts its totals itself"
                            break
                        async with conn.transaction():
                            result = await fn(tx, *args)
                            if tx.totals:
                                # sorted: two transactions must lock the totals rows in the same order
                                await tx.executemany(
                                    Q.ADD_TOTAL, [{"name": k, "delta": v} for k, v in sorted(tx.totals.items())]
                                )
                    except Exception as exc:
                        if self._transient(exc):
                            # a connection cut mid-operation may be left in any state: never reuse it
                            cut = True
                            with contextlib.suppress(Exception):
                                # a connection the driver already saw closing is detached from
                                # the pool's handle, which then refuses this: the cut is what to report
                                conn.terminate()
                        raise
                    except asyncio.CancelledError:
                        # given up mid-statement (a timeout, a stop): its answer may never come, and
                        # handing the connection back would wait for it
                        with contextlib.suppress(Exception):
                            conn.terminate()
                        raise
                    finally:
                        self._busy.discard(conn)
                break
            except _DedupRace:
                races += 1
                if races < 10:
                    continue
                raise StoreUnavailable(
                    self._where, "inserts kept colliding on dedup keys with other nodes", "Retry the submit"
                ) from None
            except Exception as exc:
                if not self._transient(exc):
                    translated = self._translate(exc)
                    if translated is exc:
                        raise
                    raise translated from exc
                now = time.monotonic()
                conflict = str(getattr(exc, "sqlstate", "") or "")[:2] == "40"  # a deadlock, not an outage
                if deadline is None:
                    deadline = now + self.reconnect_timeout
                    self.reconnects += 1
                    # one warning per outage: every operation under way meets it, and each
                    # saying so would bury the one line that matters
                    # named by its type too: a timeout's text is empty, and the driver's error on a
                    # connection the server's shutdown broke speaks of its own states
                    if conflict:
                        log.warning("an operation on the run store %s conflicted (%s); retrying", self._where, self._said(exc))
                    elif self._down_since is None:
                        log.warning("the run store %s is unreachable (%s); retrying", self._where, self._said(exc))
                    else:
                        log.debug("the run store %s is still unreachable (%s); retrying", self._where, self._said(exc), exc_info=True)
                if self._down_since is None and not conflict:
                    self._down_since = now  # the server or the way to it is gone
                if now >= deadline:
                    raise StoreUnavailable(
                        self._where,
                        f"unreachable for {self.reconnect_timeout:g} s ({self._said(exc)})",
                        _ADVICE,
                    ) from exc
                if self._give_up_at is not None and now >= self._give_up_at:
                    raise StoreGaveUp(self._where, self._said(exc)) from exc
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
        if self._down_since is not None:
            self._back_at = self.clock()
            log.info("the run store %s answers again after %.1f s", self._where, time.monotonic() - self._down_since)
            self._down_since = None
        if tx.work or tx.cancels or tx.finished:
            if self._notifying:
                self._notify(tx.work, tx.cancels, tx.finished)
            self._announce(tx.work, tx.cancels, tx.finished)
        return result

    def _unanswered(self, what: str) -> StoreUnavailable:
        """A start given up on a server that did not answer ``what`` in time."""
        return StoreUnavailable(
            self._where,
            f"no answer from the server at {self._server} within {self._answer_wait:g} s (to {what})",
            "Check that the database server is up, not paused or overloaded, and reachable from this "
            "host without packets dropped on the way (the store's reconnect_timeout is how long it waits "
            "for an answer, 5 s at least)",
        )

    def _said(self, exc: BaseException) -> str:
        """``exc`` for a message: a timeout the driver raised says nothing of itself."""
        text = str(exc)
        if not text and isinstance(exc, TimeoutError):
            text = f"no answer from the server at {self._server} within {self._answer_wait:g} s"
        return f"{type(exc).__name__}: {text}"

    def _transient(self, exc: BaseException) -> bool:
        d = self._driver
        if isinstance(exc, (OSError, TimeoutError, d.exceptions.ConnectionDoesNotExistError)):
            return True
        if isinstance(exc, d.exceptions.InternalClientError):
            return True  # a connection left mid-protocol by a cut: a fresh one will do
        if isinstance(exc, d.exceptions.InterfaceError) and "connection" in str(exc).lower():
            return True
        if isinstance(exc, d.PostgresError):
            sqlstate = str(getattr(exc, "sqlstate", "") or "")
            return sqlstate[:2] in _TRANSIENT_CLASSES or sqlstate == _SESSION_ENDED
        return False

    def _translate(self, exc: BaseException) -> BaseException:
        """A driver's or the network's error as :class:`StoreUnavailable`, one refusing the
        operation itself as :class:`StoreError`; anything else as it is."""
        driver_error = type(exc).__module__.startswith("asyncpg") or isinstance(exc, OSError)
        if isinstance(exc, StoreError) or not driver_error:
            return exc
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        err: StoreError
        if (
            isinstance(exc, self._driver.PostgresError)
            and sqlstate[:2] in _REFUSED_CLASSES
            and sqlstate not in _ANSWERED_ADVICE
        ):
            err = StoreError(
                f"the run store {self._where} refused the operation (SQLSTATE {sqlstate}): "
                f"{type(exc).__name__}: {exc}; it was not applied. The server is up and answered, and would "
                "answer every try alike: change what was written (a value past one of PostgreSQL's limits, "
                "say), or report it as a bug of taskwatch's with this message"
            )
        else:
            err = StoreUnavailable(self._where, self._said(exc), _advice_for(exc))
        err.__cause__ = exc
        return err

    # ---------------------------------------------------------------- cluster notifications

    def _announce(self, work: bool, cancels: Sequence[str], finished: Sequence[str]) -> None:
        """Tell the other nodes, in the next (coalesced) NOTIFY."""
        out = self._outbox
        out.work = out.work or work
        out.cancels.update(cancels)
        out.finished.update(finished)
        if self._notifier is None or self._notifier.done():
            self._notifier = spawn(self._send_notifications(), name="taskwatch-postgres-notify")

    async def _send_notifications(self) -> None:
        while self._outbox:
            out, self._outbox = self._outbox, Wakeup()
            payload = self._payload(out)
            try:
                await self._run(self._exec, Q.PG_NOTIFY, {"channel": self.channel, "payload": payload}, single=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the others fall back on their slow poll
                log.warning("could not notify the other nodes (%s); they will poll", exc)
            if not self._closing:
                await asyncio.sleep(_NOTIFY_SPACING)

    def _payload(self, w: Wakeup) -> str:
        """``w`` as JSON under the size limit; ids that do not fit are counted, and the others
        learn of those cancels from their next heartbeat instead."""
        budget = _PAYLOAD_BUDGET
        cancels: list[str] = []
        finished: list[str] = []
        for ids, into in ((w.cancels, cancels), (w.finished, finished)):
            for run_id in ids:
                cost = len(run_id) + 3
                if cost > budget:
                    self.notify_overflow += 1
                    continue
                budget -= cost
                into.append(run_id)
        return dumps({"s": self._sender, "w": w.work, "c": cancels, "f": finished})

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        try:
            data = loads(payload)
            if data.get("s") == self._sender:
                return
            work, cancels, finished = bool(data.get("w")), list(data.get("c", ())), list(data.get("f", ()))
        except (ValueError, AttributeError, TypeError):
            work, cancels, finished = True, [], []  # not ours to read: poll as for any change
        self.notifications_received += 1
        self._notify(work, cancels, finished)

    async def _listen(self) -> None:
        """Keep one connection LISTENing (reconnecting with backoff) and the clock offset fresh."""
        delay = 0.1
        lost = False
        while True:
            conn = None
            try:
                conn = await self._driver.connect(
                    self._dsn, server_settings=self._settings, timeout=self._answer_wait
                )
                down = asyncio.Event()
                conn.add_termination_listener(lambda _c: down.set())
                await conn.add_listener(self.channel, self._on_notification)
                self.listen_connects += 1
                if lost:
                    self._notify(work=True)  # notifications sent while we were away are gone: look
                lost = False
                delay = 0.1
                self._listening.set()
                while not down.is_set():
                    if self._db_clock:
                        await self._sync_clock(conn)
                    try:
                        await asyncio.wait_for(down.wait(), _CLOCK_SYNC_INTERVAL)
                    except TimeoutError:
                        pass
                raise ConnectionError("the listening connection closed")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - reconnect: waiters keep polling meanwhile
                if not lost:
                    log.info("listening for other nodes' changes failed (%s); reconnecting", self._said(exc))
                lost = True
                self._listening.clear()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if conn is not None:
                    conn.terminate()

    async def wait_listening(self, timeout: float = 10.0) -> None:
        """Wait until this node receives the other nodes' notifications (tests, benchmarks)."""
        async with asyncio.timeout(timeout):
            await self._listening.wait()

    # ---------------------------------------------------------------- runs

    async def insert(self, runs: Sequence[NewRun], *, max_pending: int | None = None) -> list[Inserted]:
        if not runs:
            return []
        rows = self._rows(runs, self.clock())
        # a plain insert is one statement; dedup keys (looked up first) and a limit (checked
        # under a lock taken first) need a transaction around the lookups and the insert
        single = max_pending is None and all(row["key"] is None for row in rows)
        chosen = [new.id for new in runs if new.id is not None]
        kept = self._unsure
        unsure = bool(kept) and any(run_id in kept for run_id in chosen)
        try:
            inserted: list[Inserted] = await self._run(self._insert, rows, max_pending, unsure, single=single)
        except (StoreUnavailable, asyncio.CancelledError):
            # given up on (an outage outlasting reconnect_timeout, a stop) after a try that may
            # have been committed: its rows would make a second insert of the same ids collide
            kept.update(dict.fromkeys(chosen))
            while len(kept) > _UNSURE_KEPT:
                # the oldest: runs failed by a stop that could not write them are never sent again
                del kept[next(iter(kept))]
            raise
        except BaseException:
            if unsure:
                for run_id in chosen:
                    kept.pop(run_id, None)
            raise
        if unsure:
            for run_id in chosen:
                kept.pop(run_id, None)
        return inserted

    @staticmethod
    def _rows(runs: Sequence[NewRun], now: float) -> list[dict[str, Any]]:
        """The rows ``runs`` insert, each with its id chosen here (a try after a cut looks for it)."""
        rows: list[dict[str, Any]] = []
        explicit: set[str] = set()
        for new in runs:
            if new.id is not None:
                if new.id in explicit:
                    raise DuplicateRunId(new.id)
                explicit.add(new.id)
            rows.append(
                {
                    "id": new.id or new_run_id(),
                    "task": new.task,
                    "params": dumps(new.params),
                    "max_attempts": new.max_attempts,
                    "created_at": float(new.created_at) if new.created_at is not None else now,
                    "run_after": now + new.delay if new.delay > 0 else now,
                    "key": new.key,
                    "source": new.source,
                    "on_lost": new.on_lost,
                }
            )
        return rows

    async def _insert(
        self, tx: _Tx, rows: list[dict[str, Any]], max_pending: int | None, unsure: bool = False
    ) -> list[Inserted]:
        if unsure and not tx.again:
            # some rows were sent by an earlier call that failed, maybe after its commit; the
            # others (newer runs written with them) never were: those found, as sent, stand
            sent = {row["id"]: (row["task"], row["created_at"]) for row in rows}
            found = await tx.fetch(Q.PG_IDS_PRESENT, {"ids": list(sent)})
            stood = {r[0] for r in found if sent[r[0]] == (r[1], r[2])}
            if stood:
                tx.work = True
                rest = iter(await self._insert(tx, [row for row in rows if row["id"] not in stood], max_pending))
                return [Inserted(row["id"], True) if row["id"] in stood else next(rest) for row in rows]
        if tx.again:
            sent = {row["id"]: (row["task"], row["created_at"]) for row in rows}
            found = await tx.fetch(Q.PG_IDS_PRESENT, {"ids": list(sent)})
            present = {r[0] for r in found}
            # rows that are this batch's own, to the creation time: an id someone else stored
            # (a chosen id colliding) is no sign of an earlier try, and stays a duplicate
            if present and all(sent[r[0]] == (r[1], r[2]) for r in found):
                # the try cut off was committed (one transaction, or one statement: all of it
                # or nothing): what it inserted stands, and trying again would only collide
                tx.work = True
                out_before: list[Inserted] = []
                for row in rows:
                    if row["id"] in present:
                        out_before.append(Inserted(row["id"], True))
                    else:  # a dedup key was held by another pending run: it answered for this one
                        holder = await tx.fetchval(Q.KEY_HOLDER, row) if row["key"] is not None else None
                        out_before.append(Inserted(holder or row["id"], False))
                return out_before
        if max_pending is not None:
            # one inserter at a time counts the pending runs: its statement's snapshot is
            # taken after every earlier holder of the lock has committed
            await tx.conn.execute(Q.PG_PENDING_LOCK)
        out: list[Inserted] = []
        fresh: list[dict[str, Any]] = []
        held: dict[tuple[str, str], str] = {}
        for row in rows:
            key = row["key"]
            if key is not None:
                holder = held.get((row["task"], key))
                if holder is None:
                    # the holder, else a run that waits for the key (a retry, while another held
                    # it), which takes it now and answers for this submit
                    holder = await tx.fetchval(Q.PG_KEY_HOLDER_OR_WAITING, row)
                if holder is not None:
                    out.append(Inserted(holder, False))
                    continue
                held[(row["task"], key)] = row["id"]
            fresh.append(row)
            out.append(Inserted(row["id"], True))
        if not fresh:
            return out
        columns = {
            "ids": "id", "tasks": "task", "params": "params", "max_attempts": "max_attempts",
            "created_ats": "created_at", "run_afters": "run_after", "keys": "key", "sources": "source",
            "on_losts": "on_lost",
        }  # fmt: skip
        values: dict[str, Any] = {arr: [row[col] for row in fresh] for arr, col in columns.items()}
        values["max_pending"] = max_pending
        try:
            # one statement inserts, checks the limit and counts the total; an id already
            # stored fails it on the unique index, so nothing else looks first
            inserted = await tx.fetchval(Q.PG_INSERT_MANY, values)
        except self._driver.UniqueViolationError as exc:
            if exc.constraint_name == "runs_dedup":
                raise _DedupRace() from exc  # a key taken by another node since we looked
            if exc.constraint_name == "runs_id_key":
                raise DuplicateRunId(_detail_value(exc) or "?") from None
            raise
        if inserted != len(fresh):
            assert max_pending is not None and inserted == 0, (inserted, len(fresh))
            # (how many wait, the one statement does not say)
            raise QueueFull("the run store's pending queue", max_pending, adding=len(fresh))
        tx.work = True
        return out

    async def claim(
        self,
        node: str,
        incarnation: str,
        slots: int,
        tasks: Mapping[str, int | None],
        *,
        limits: Mapping[str, int] | None = None,
    ) -> list[Claim]:
        if slots <= 0 or not tasks:
            return []
        free: dict[str, int] = {}
        capped: dict[str, tuple[int, int]] = {}
        for task, room in tasks.items():
            n = slots if room is None else min(room, slots)
            if n <= 0:
                continue
            cap = None if limits is None else limits.get(task)
            if cap is None:
                free[task] = n
            else:
                capped[task] = (n, cap)
        if not free and not capped:
            return []
        values = {
            "node": node,
            "incarnation": incarnation,
            "nonce": os.urandom(8).hex(),
            "lease_until": 0.0,  # set by each try (see _stamp)
            "now": 0.0,
            "node_ttl": self.node_ttl,
            "tasks": list(free),
            "limits": list(free.values()),
            "caps": [None] * len(free),
            "slots": slots,
            "peek": sorted(capped),
        }
        if not capped:
            return await self._run(self._claim, values, single=True)  # type: ignore[no-any-return]
        # one round trip claims the uncapped tasks and says which capped ones have runs waiting
        claims, waiting = await self._run(self._claim_and_peek, values, single=True)
        left = slots - len(claims)
        if waiting and left > 0:
            # a capped task's count of running runs must see every earlier claim of it: its lock
            # is taken in a statement of its own (a statement's snapshot is taken when it
            # starts), so this claim is a transaction of three statements
            names = sorted(waiting)
            values = {
                **values,
                "nonce": os.urandom(8).hex(),
                "tasks": names,
                "limits": [capped[t][0] for t in names],
                "caps": [capped[t][1] for t in names],
                "slots": left,
            }
            # (when slots are short, runs of uncapped tasks went first, whatever their age)
            claims = claims + await self._run(self._claim_capped, values, names)
            claims.sort(key=lambda c: seq_of(c.token))
        return claims  # type: ignore[no-any-return]

    async def _claimed_before(self, tx: _Tx, values: dict[str, Any]) -> list[Claim]:
        """What a cut-off earlier try of this claim took, if it was committed: those runs are
        this node's now, and claiming others instead would leave them running unexecuted."""
        if not tx.again:
            return []
        return await self._claims_of(tx, await tx.fetch(Q.PG_CLAIMED_WITH_NONCE, values), values)

    async def _claim_and_peek(self, tx: _Tx, values: dict[str, Any]) -> tuple[list[Claim], list[str]]:
        if before := await self._claimed_before(tx, values):
            return before, []
        self._stamp(values)
        rows = await tx.fetch(Q.PG_CLAIM_AND_PEEK, values)
        waiting = [r[2] for r in rows if r[1] is None]
        return await self._claims_of(tx, [r for r in rows if r[1] is not None], values), waiting

    async def _claim_capped(self, tx: _Tx, values: dict[str, Any], capped: list[str]) -> list[Claim]:
        await tx.execute(Q.PG_TASK_LOCKS, {"tasks": capped})
        return await self._claim(tx, values)

    async def _claim(self, tx: _Tx, values: dict[str, Any]) -> list[Claim]:
        if before := await self._claimed_before(tx, values):
            return before
        self._stamp(values)
        return await self._claims_of(tx, await tx.fetch(Q.PG_CLAIM, values), values)

    def _stamp(self, values: dict[str, Any]) -> None:
        """Leases from this try's time: a claim that waited out an outage and got through at its
        end must not write leases already (nearly) run out, which other nodes would take back as
        lost while this one starts the runs. (What an earlier try committed keeps its own.)"""
        now = self.clock()
        values["now"], values["lease_until"] = now, now + self.lease_ttl

    async def _claims_of(self, tx: _Tx, rows: list[Any], values: dict[str, Any]) -> list[Claim]:
        now, lease_until = values["now"], values["lease_until"]
        rows.sort(key=lambda r: r[0])  # RETURNING has no order: oldest first
        claims: list[Claim] = []
        unstartable: list[dict[str, Any]] = []
        for seq, run_id, task, params, attempt, max_attempts, created_at, key, source, lost, error, token in rows:
            decoded = self._run_rows.claimed(run_id, params, created_at, attempt, max_attempts, lost, key, source)
            if isinstance(decoded, RunError):
                unstartable.append(failed_at_claim(seq, token, now, decoded))
                continue
            claims.append(
                Claim(
                    run_id, token, task, decoded, attempt, max_attempts, created_at, now, lease_until, key, source,
                    lost, None if error is None else self._run_rows.error(run_id, error),
                )
            )
        if unstartable:
            await self._fail_unstartable(tx, unstartable)
        return claims

    @staticmethod
    async def _fail_unstartable(tx: _Tx, ends: list[dict[str, Any]]) -> None:
        """End claimed runs whose params cannot be read (changed by hand): they cannot start, and
        left pending they would be taken by every claim from now on.

        The claim itself may be one statement committed on its own (``single``, no totals in
        ``tx``): the ends and their count are a transaction of their own (a savepoint in a
        claim that has one). Cut off before it commits, they stay claimed under this try's
        nonce, and the claim's next try ends them.
        """
        failed = 0
        async with tx.conn.transaction():
            for values in ends:
                ended = await tx.fetchrow(Q.END_CLAIMED, values)
                if ended is not None:
                    failed += 1
                    tx.finished.append(ended[0])
            if failed:
                await tx.execute(Q.ADD_TOTAL, {"name": RunStatus.FAILED.value, "delta": failed})

    async def heartbeat(
        self, incarnation: str, tokens: Sequence[str], progress: Mapping[str, Progress] | None = None
    ) -> HeartbeatResult:
        if not tokens:
            return HeartbeatResult()
        progress = progress or {}
        seqs, toks, has, dones, totals, messages = [], [], [], [], [], []
        for token in tokens:
            p = progress.get(token)
            seqs.append(seq_of(token))
            toks.append(token)
            has.append(p is not None)
            dones.append(float(p.done) if p is not None else 0.0)
            totals.append(None if p is None or p.total is None else float(p.total))
            messages.append(p.message if p is not None else "")
        values = {
            "lease_until": 0.0,  # set by each try (see _renew)
            "incarnation": incarnation,
            "seqs": seqs,
            "tokens": toks,
            "has": has,
            "dones": dones,
            "totals": totals,
            "messages": messages,
        }
        rows = await self._run(self._renew, values, single=True)
        cancel: dict[str, CancelReason] = {}
        kept: set[str] = set()
        busy: list[str] = []
        for token, requested, reason, renewed in rows:
            kept.add(token)
            if not renewed:
                busy.append(token)
            elif requested:
                cancel[token] = reason or "user"
        return HeartbeatResult(cancel=cancel, lost=[t for t in tokens if t not in kept], busy=busy)

    async def _renew(self, tx: _Tx, values: dict[str, Any]) -> list[Any]:
        self._stamp(values)  # a heartbeat that waited out an outage renews from when it got through
        return await tx.fetch(Q.PG_HEARTBEAT_MANY, values)

    async def finish(self, token: str, outcome: Outcome, progress: Progress | None = None) -> RunStatus | None:
        if isinstance(outcome, Retry):
            return await self._run(self._finish_retry, token, outcome, self.clock(), progress)  # type: ignore[no-any-return]
        if isinstance(outcome, Succeeded):
            status, result, error, reason = RunStatus.SUCCEEDED, None if outcome.result is None else dumps(outcome.result), None, None
        elif isinstance(outcome, Failed):
            status, result, error, reason = RunStatus.FAILED, None, error_json(outcome.error), None
        elif isinstance(outcome, Cancelled):
            status, result, error, reason = RunStatus.CANCELLED, None, None, outcome.reason
        else:
            raise TypeError(f"unknown outcome {outcome!r}; pass Succeeded, Failed, Cancelled or Retry")
        if self._pool is None or self._closing:
            raise StoreClosed(self._where)
        fut: asyncio.Future[RunStatus | None] = asyncio.get_running_loop().create_future()
        self._finishes.append(_Finish(seq_of(token), token, status.value, result, error, reason, fut, progress))
        if self._finisher is None or self._finisher.done():
            self._finisher = spawn(self._write_finishes(), name="taskwatch-postgres-finish")
        # shielded: a caller that stops waiting does not take the batch's other finishes with it
        return await asyncio.shield(fut)

    async def _write_finishes(self) -> None:
        """Group commit: every finish queued while the previous batch was written goes in one statement."""
        while self._finishes:
            batch, self._finishes = self._finishes, []
            try:
                ended = await self._run(self._end_many, batch, self.clock(), single=True)
            except BaseException as exc:
                for f in batch:
                    if not f.future.done():
                        f.future.set_exception(exc)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                continue
            for f in batch:
                if not f.future.done():
                    f.future.set_result(ended.get(f.token))

    async def _end_many(self, tx: _Tx, batch: list[_Finish], now: float) -> dict[str, RunStatus]:
        rows = await tx.fetch(
            Q.PG_END_MANY,
            {
                "now": now,
                "seqs": [f.seq for f in batch],
                "tokens": [f.token for f in batch],
                "statuses": [f.status for f in batch],
                "results": [f.result for f in batch],
                "errors": [f.error for f in batch],
                "reasons": [f.reason for f in batch],
                "has": [f.progress is not None for f in batch],
                "dones": [f.progress.done if f.progress is not None else 0.0 for f in batch],
                "totals": [f.progress.total if f.progress is not None else None for f in batch],
                "messages": [f.progress.message if f.progress is not None else "" for f in batch],
            },
        )
        ended: dict[str, RunStatus] = {}
        for token, run_id, status in rows:
            ended[token] = RunStatus(status)  # counted in the totals by the statement itself
            tx.finished.append(run_id)
        if tx.again and len(ended) < len(batch):
            # a try cut off after its commit ended them: theirs, at this batch's own time
            by_seq = {f.seq: f for f in batch if f.token not in ended}
            for seq, run_id, status in await tx.fetch(Q.PG_ENDED_AT, {"seqs": list(by_seq), "now": now}):
                f = by_seq[seq]
                if status == f.status:
                    ended[f.token] = RunStatus(status)
                    tx.finished.append(run_id)
        return ended

    async def _finish_retry(
        self, tx: _Tx, token: str, outcome: Retry, now: float, progress: Progress | None = None
    ) -> RunStatus | None:
        status = await self._end_for_retry(tx, token, outcome, now)
        if progress is not None and status is not None:
            # how far the attempt got, shown while the run waits for its next (whose claim clears it)
            values = {"seq": seq_of(token), "done": progress.done, "total": progress.total, "message": progress.message}
            await tx.execute(Q.ENDED_PROGRESS, values)
        return status

    async def _end_for_retry(self, tx: _Tx, token: str, outcome: Retry, now: float) -> RunStatus | None:
        seq = seq_of(token)
        run_after, error = now + max(0.0, outcome.delay), error_json(outcome.error)
        state = await tx.fetchrow(Q.PG_CLAIM_STATE_LOCKED, {"seq": seq, "token": token})
        if state is None:
            if tx.again:
                # a try cut off after its commit may have done it: re-queued with this very due
                # time and error, or (a cancel was pending) ended at this very moment
                if await tx.fetchrow(Q.PG_REQUEUED_AS, {"seq": seq, "run_after": run_after, "error": error}):
                    return RunStatus.PENDING
                ended = await tx.fetch(Q.PG_ENDED_AT, {"seqs": [seq], "now": now})
                if ended and ended[0][2] == RunStatus.CANCELLED.value:
                    return RunStatus.CANCELLED
            return None
        if not state[0]:
            await tx.execute(
                Q.REQUEUE_CLAIMED,
                {
                    "seq": seq,
                    "token": token,
                    "lost": 0,
                    "step": 1 if outcome.next_attempt else 0,
                    "added": outcome.added_attempts,
                    "run_after": run_after,
                    "error": error,
                },
            )
            if outcome.next_attempt:
                tx.add("retried")
            tx.work = True
            return RunStatus.PENDING
        # a cancel was requested meanwhile: the user's intent wins
        values = {"seq": seq, "token": token, "now": now, "lost": 0, "result": None, "error": None,
                  "cancel_reason": None, "status": RunStatus.CANCELLED.value}  # fmt: skip
        ended = await tx.fetchrow(Q.END_CLAIMED, values)
        if ended is None:
            return None
        tx.add(RunStatus.CANCELLED.value)
        tx.finished.append(ended[0])
        return RunStatus.CANCELLED

    async def request_cancel(self, run_id: str, reason: CancelReason = "user") -> CancelResult:
        return await self._run(self._request_cancel, run_id, reason, self.clock())  # type: ignore[no-any-return]

    async def _request_cancel(self, tx: _Tx, run_id: str, reason: CancelReason, now: float) -> CancelResult:
        # locked: a claim or a finish racing with this cancel waits for it, and sees it
        row = await tx.fetchrow(Q.GET_RUN + " FOR UPDATE", {"id": run_id})
        if row is None:
            raise RunNotFound(run_id)
        seq, status = row[0], row[4]
        found = self._run_rows.record(row)  # a row that makes no record is left as it is
        action: Literal["cancelled", "requested"]
        if status == "pending":
            await tx.execute(Q.CANCEL_PENDING, {"seq": seq, "now": now, "reason": reason})
            tx.add("cancelled")
            tx.finished.append(run_id)
            action = "cancelled"
        elif status == "running":
            if await tx.execute(Q.CANCEL_FLAG, {"seq": seq, "reason": reason}):
                tx.cancels.append(run_id)
            elif tx.again and row["cancel_requested"]:
                # the flag may be the first try's, committed before the cut: its notification
                # never went out, so the owner (on another node) is told now
                tx.cancels.append(run_id)
            action = "requested"
        elif tx.again and status == "cancelled" and row["cancel_reason"] == reason and row["finished_at"] == now:
            # cancelled at this call's own moment: by its first try, committed before the cut,
            # not by someone else before it (counted then; its notification is sent now)
            tx.finished.append(run_id)
            return CancelResult(action="cancelled", run=found)
        else:
            return CancelResult(action="finished", run=found)
        return CancelResult(action=action, run=self._run_rows.record(await tx.fetchrow(Q.GET_RUN, {"id": run_id})))

    async def recover(self, live_incarnations: Collection[str] | None = None) -> list[Recovered]:
        live = None if live_incarnations is None else frozenset(live_incarnations)
        return await self._run(self._recover, live)  # type: ignore[no-any-return]

    def heard_nothing(self, since: float) -> None:
        if self._down_since is None:
            log.warning(
                "the run store %s gave this node no answer for %.1f s (no error: a server that is "
                "paused or overloaded, or a network that drops packets); counted as an outage, so the "
                "claims of live nodes that ran out through it are not taken at once",
                self._where, time.monotonic() - since,
            )  # fmt: skip
            self._down_since = since

    def answering_since(self) -> float | None:
        """When the database began to answer this node again after its last outage (by
        :attr:`clock`), for :func:`gone_incarnations`: now, while an operation that got through
        has yet to end the outage (it is the first)."""
        return self.clock() if self._down_since is not None else self._back_at

    async def _recover(self, tx: _Tx, live: frozenset[str] | None) -> list[Recovered]:
        # the time of this try, not of the call: a call that waited out an outage judges the
        # others by what they could have done since, and re-queues at the time it does it
        now = self.clock()
        nodes = self._run_rows.nodes(await tx.fetch(Q.ALL_NODES, {}))
        answering_since = self.answering_since()
        gone = gone_incarnations(nodes.nodes, now, self.node_ttl, answering_since=answering_since)
        known = nodes.known
        # just after an outage, a claim whose lease ran out through it is its live owner's still:
        # taken at once, a run that owner finished meanwhile ran a second time, its outcome refused
        held = known.difference(gone) if in_outage_grace(now, self.node_ttl, answering_since) else frozenset()
        out: list[Recovered] = []
        # every running claim is read without a lock (heartbeats and finishes of healthy
        # claims never wait for a recovery); the lost ones are then locked and judged again
        # on what they hold now, skipping those another node is recovering or finishing
        lost = [
            r[0] for r in await tx.fetch(_UNLOCKED_CLAIMS, {})
            if lost_reason(r[4], claim_lease(r[4], r[6], known), now, gone, live, held)
        ]  # fmt: skip
        if not lost:
            return out
        for row in await tx.fetch(Q.PG_LOCK_CLAIMS, {"seqs": lost}):
            step = recovery_step(row, now, gone, live, self.max_lost, known, held)
            if step is None:
                continue  # judged again on what it holds now: it was heartbeaten or finished meanwhile
            await tx.fetch(step.sql, step.args)
            book_recovered(tx, step.recovered)
            out.append(step.recovered)
        return out

    # ---------------------------------------------------------------- reads

    async def get(self, run_id: str) -> StoredRun | None:
        row = await self._run(self._fetchrow, Q.GET_RUN, {"id": run_id}, write=False)
        return None if row is None else self._run_rows.record(row)

    async def get_many(self, run_ids: Collection[str]) -> dict[str, StoredRun]:
        if not run_ids:
            return {}
        rows = await self._run(self._fetch, Q.PG_GET_RUNS, {"ids": list(run_ids)}, write=False)
        return {run.id: run for run in self._run_rows.runs(rows)}

    async def recently_finished(self, limit: int) -> list[StoredRun]:
        """The ``limit`` runs that ended last, the last first, whatever their place in the queue
        (in a backlog a run ends long after newer ones were submitted)."""
        rows = await self._run(self._fetch, Q.RECENTLY_FINISHED, {"limit": max(0, limit)}, write=False)
        return self._run_rows.runs(rows)

    async def lease_terms_before(self, node: str, before: float, limit: int = 20) -> set[int]:
        """The lease terms ``node``'s newest ``limit`` lease events stored before ``before`` (the
        server's time) say it held, as the event relay stored them (``events="postgres"``):
        a process of that node that registered at ``before`` did not take those terms."""
        values = {"node": node, "before": before, "limit": limit}
        terms: set[int] = set()
        for (body,) in await self._run(self._fetch, Q.PG_LEASE_EVENTS_BEFORE, values, write=False):
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                event = json.loads(body)
                term = event.get("term")
                if event.get("kind") in ("lease.acquired", "lease.renewed") and type(term) is int:
                    terms.add(term)
        return terms

    async def query(
        self,
        *,
        status: RunStatus | str | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> Page:
        values = {
            "status": None if status is None else run_status(status).value,
            "task": task,
            "since": None if since is None else float(since),
            "before": None if before is None else parse_cursor(before),
            "limit": max(0, limit) + 1,
        }
        rows = await self._run(self._fetch, Q.QUERY_RUNS, values, write=False)
        more = len(rows) > limit
        shown = rows[:limit]
        # the cursor is the last row's, read or not: the next page starts after it either way
        return Page(runs=self._run_rows.runs(shown), next=str(shown[-1][0]) if more and shown else None)

    async def counts(self) -> Counts:
        return await self._run(self._counts, write=False)  # type: ignore[no-any-return]

    async def _counts(self, tx: _Tx) -> Counts:
        return counts_of([tuple(r) for r in await tx.fetch(Q.COUNTS, {})])

    async def prune(self, *, keep: int | None = None, older_than: float | None = None) -> int:
        if keep is None and older_than is None:
            return 0
        return await self._run(self._prune, keep, older_than, self.clock())  # type: ignore[no-any-return]

    async def _prune(self, tx: _Tx, keep: int | None, older_than: float | None, now: float) -> int:
        deleted = 0
        if older_than is not None:
            deleted += await tx.execute(Q.PRUNE_OLDER, {"cutoff": now - older_than})
        if keep is not None:
            edge = await tx.fetchrow(Q.PRUNE_BOUNDARY, {"keep": max(0, keep)})
            if edge is not None:
                deleted += await tx.execute(Q.PRUNE_FROM, {"finished_at": edge[0], "seq": edge[1]})
        return deleted

    # ---------------------------------------------------------------- nodes

    async def register_node(self, node: str, incarnation: str, version: str) -> NodeInfo:
        values = {"node": node, "incarnation": incarnation, "version": version, "now": self.clock()}
        return await self._run(self._register_node, values)  # type: ignore[no-any-return]

    async def _register_node(self, tx: _Tx, values: dict[str, Any]) -> NodeInfo:
        await tx.execute(Q.REGISTER_NODE, values)
        return node_info(await tx.fetchrow(Q.GET_NODE, values))

    async def node_heartbeat(
        self, incarnation: str, running: int, *, cpu_percent: float | None = None, rss_bytes: int | None = None
    ) -> bool:
        values = {"incarnation": incarnation, "running": running, "now": 0.0,
                  "cpu_percent": cpu_percent, "rss_bytes": rss_bytes}  # fmt: skip
        return bool(await self._run(self._node_heartbeat, values, single=True))

    async def _node_heartbeat(self, tx: _Tx, values: dict[str, Any]) -> Any:
        # stamped with this try's time: a heartbeat that waited out an outage and got through
        # at its end, stamped with its call's, would tell the others this node had been silent
        # all along, and they would take the runs it claims from now on
        values["now"] = self.clock()
        return await tx.fetchval(Q.NODE_HEARTBEAT, values)

    async def node_stopped(self, incarnation: str) -> None:
        await self._run(self._exec, Q.NODE_STOPPED, {"incarnation": incarnation, "now": self.clock()}, single=True)

    async def nodes(self) -> list[NodeInfo]:
        return self._run_rows.nodes(await self._run(self._fetch, Q.ALL_NODES, {}, write=False)).nodes

    async def prune_nodes(self, older_than: float) -> int:
        cutoff = self.clock() - older_than
        return await self._run(self._exec, Q.PRUNE_NODES, {"cutoff": cutoff}, single=True)  # type: ignore[no-any-return]

    # ---------------------------------------------------------------- small durable state

    @staticmethod
    async def _exec(tx: _Tx, sql: str, values: dict[str, Any]) -> int:
        return await tx.execute(sql, values)

    @staticmethod
    async def _fetch(tx: _Tx, sql: str, values: dict[str, Any]) -> list[Any]:
        return await tx.fetch(sql, values)

    @staticmethod
    async def _fetchrow(tx: _Tx, sql: str, values: dict[str, Any]) -> Any:
        return await tx.fetchrow(sql, values)

    @staticmethod
    async def _fetchval(tx: _Tx, sql: str, values: dict[str, Any]) -> Any:
        return await tx.fetchval(sql, values)

    async def get_periodic(self, name: str) -> float | None:
        stored = await self._run(self._fetchval, Q.GET_PERIODIC, {"name": name}, write=False)
        return self._run_rows.periodic_fire(name, stored, self.clock())

    async def set_periodic(self, name: str, fired_at: float) -> None:
        await self._run(self._exec, Q.SET_PERIODIC, {"name": name, "fired_at": float(fired_at)}, single=True)

    async def claim_periodic_run(
        self, name: str, slot: float, gap: float, run: NewRun, *, max_pending: int | None = None
    ) -> list[Inserted]:
        # the claim's nonce and the run's id, kept by every try: a try after a cut finds both its
        # first try's claim and its row, and reports them as its own
        values = {"name": name, "slot": float(slot), "gap": float(gap), "latest": float(slot) + FIRE_AHEAD, "nonce": _nonce()}
        [row] = self._rows([run], self.clock())
        return await self._run(self._claim_periodic_run, values, row, max_pending)  # type: ignore[no-any-return]

    async def _claim_periodic_run(
        self, tx: _Tx, values: dict[str, Any], row: dict[str, Any], max_pending: int | None
    ) -> list[Inserted]:
        if await tx.fetchval(Q.PG_CLAIM_PERIODIC, values) is None:
            return []
        # after the claim: its row lock orders this behind a claim of the same task that
        # inserted a run and committed meanwhile, which this statement then sees
        going = await tx.fetchval(Q.UNFINISHED_OF_TASK, {"task": row["task"]})
        if going is not None and going != row["id"]:  # (a try after a cut finds its own first try's run)
            return [Inserted(going, False)]
        return await self._insert(tx, [row], max_pending)

    async def claim_periodic(self, name: str, slot: float, gap: float = 0.0) -> bool:
        # one nonce per call, kept by every try: a try after a cut wins the slot again if the
        # row is still the one its first try wrote (a slot taken is no proof it was ours)
        values = {"name": name, "slot": float(slot), "gap": float(gap), "latest": float(slot) + FIRE_AHEAD, "nonce": _nonce()}
        found = await self._run(self._fetchval, Q.PG_CLAIM_PERIODIC, values, single=True)
        return found is not None

    async def adopt_trigger(
        self, trigger: str, incarnation: str, *, own: bool = False
    ) -> dict[str, TriggerKeyRecord]:
        return await self._run(self._adopt_trigger, trigger, incarnation, own, _nonce())  # type: ignore[no-any-return]

    async def _adopt_trigger(
        self, tx: _Tx, trigger: str, incarnation: str, own: bool, nonce: str
    ) -> dict[str, TriggerKeyRecord]:
        holders = [h for (h,) in await tx.fetch(Q.TRIGGER_HOLDERS, {"trigger": trigger})]
        nodes = self._run_rows.nodes(await tx.fetch(Q.ALL_NODES, {}))
        gone = gone_incarnations(nodes.nodes, self.clock(), self.node_ttl, answering_since=self.answering_since())
        known = nodes.known
        taking = trigger_holders_taken(holders, incarnation, own, known, gone)
        before: list[tuple[str, TriggerKeyRecord]] = []
        if tx.again and not own:
            # taken by this call's first try, committed before the cut, and merged into this
            # incarnation's own rows there: its own part cannot be told apart any more, so it
            # comes back with them (counted again, rather than lost)
            found = await tx.fetch(Q.PG_TRIGGER_KEYS_ADOPTED_AS, {"trigger": trigger, "holder": incarnation, "nonce": nonce})
            before = [(r[0], rec) for r in found if (rec := self._run_rows.trigger_key(trigger, r[0], r[1:])) is not None]
        rows: list[tuple[str, TriggerKeyRecord]] = []
        if taking:
            # rows another node is taking up right now are locked and skipped: each has one taker
            found = await tx.fetch(Q.PG_TAKE_TRIGGER_KEYS, {"trigger": trigger, "holders": taking})
            order = {holder: i for i, holder in enumerate(taking)}
            found.sort(key=lambda r: order[r[0]])
            rows = [(r[1], rec) for r in found if (rec := self._run_rows.trigger_key(trigger, r[1], r[2:])) is not None]
            others = [{"trigger": trigger, "holder": r[0], "key": r[1]} for r in found if r[0] != incarnation]
            if others:
                await tx.executemany(Q.FORGET_TRIGGER_KEY, others)
        taken = merge_taken(rows)
        if taken:
            mine: dict[str, TriggerKeyRecord] = {}
            if not own:
                values = {"trigger": trigger, "holder": incarnation, "keys": list(taken)}
                held = await tx.fetch(Q.PG_HELD_TRIGGER_KEYS_OF, values)
                mine = {r[0]: rec for r in held if (rec := self._run_rows.trigger_key(trigger, r[0], r[1:])) is not None}
            keep = []
            for key, rec in taken.items():
                had = mine.get(key)
                merged = rec if had is None else merge_trigger_records(had, rec)
                keep.append({"trigger": trigger, "holder": incarnation, "key": key, "nonce": nonce, **merged.model_dump()})
            await tx.executemany(Q.SAVE_TRIGGER_KEY, keep)
        return merge_taken([*before, *rows]) if before else taken

    async def trigger_keys_elsewhere(self, trigger: str, incarnation: str) -> set[str]:
        values = {"trigger": trigger, "holder": incarnation}
        rows = await self._run(self._fetch, Q.TRIGGER_KEYS_ELSEWHERE, values, write=False)
        return {key for (key,) in rows}

    async def trigger_keys_held(self, trigger: str, incarnation: str) -> set[str]:
        values = {"trigger": trigger, "holder": incarnation}
        rows = await self._run(self._fetch, Q.TRIGGER_KEYS_HELD, values, write=False)
        return {key for (key,) in rows}

    async def save_trigger(
        self, trigger: str, incarnation: str, keys: Mapping[str, TriggerKeyRecord], forget: Collection[str] = (),
        *, held: Collection[str] = (),
    ) -> set[str]:
        if not keys and not forget:
            return set()
        return await self._run(self._save_trigger, *trigger_save(trigger, incarnation, keys, forget, held))  # type: ignore[no-any-return]

    @staticmethod
    async def _save_trigger(tx: _Tx, rows: list[dict[str, Any]], gone: list[dict[str, Any]], held: list[str]) -> set[str]:
        if gone:
            await tx.executemany(Q.FORGET_TRIGGER_KEY, gone)
        taken: set[str] = set()
        if held and rows:
            # locked until the commit: a node taking rows up skips them meanwhile, and a row another
            # node's adoption deleted before is not found (read committed: its delete is seen)
            values = {"trigger": rows[0]["trigger"], "holder": rows[0]["holder"], "keys": held}
            there = {r[0] for r in await tx.fetch(Q.PG_HELD_TRIGGER_KEYS_OF, values)}
            taken = set(held) - there
            if taken:
                rows = [row for row in rows if row["key"] not in taken]
        if rows:
            await tx.executemany(Q.SAVE_TRIGGER_KEY, rows)
        return taken

    @staticmethod
    async def _exec_many(tx: _Tx, sql: str, rows: list[dict[str, Any]]) -> None:
        await tx.executemany(sql, rows)

    # ---------------------------------------------------------------- queue jobs

    async def put_jobs(self, queue: str, incarnation: str, jobs: Sequence[Any]) -> list[int]:
        if not jobs:
            return []
        encoded = [dumps(job) for job in jobs]
        return await self._run(self._put_jobs, queue, incarnation, encoded, _nonce())  # type: ignore[no-any-return]

    async def _put_jobs(self, tx: _Tx, queue: str, incarnation: str, encoded: list[str], nonce: str) -> list[int]:
        values = {"queue": queue, "incarnation": incarnation, "now": self.clock(), "nonce": nonce}
        if tx.again:
            # one transaction: a first try committed before the cut stored every job, and
            # putting them again would have each one handled twice
            before = [int(r[0]) for r in await tx.fetch(Q.PG_JOBS_PUT_AS, values)]
            if before:
                return before
        return [int(await tx.fetchval(Q.PG_PUT_JOB, {**values, "job": job})) for job in encoded]

    async def done_jobs(self, ids: Sequence[int]) -> None:
        if ids:
            await self._run(self._exec_many, Q.DONE_JOB, [{"id": i} for i in ids])

    async def adopt_jobs(self, queue: str, incarnation: str, *, own: bool = False) -> list[StoredJob]:
        return await self._run(self._adopt_jobs, queue, incarnation, own, _nonce())  # type: ignore[no-any-return]

    async def _adopt_jobs(self, tx: _Tx, queue: str, incarnation: str, own: bool, nonce: str) -> list[StoredJob]:
        nodes = self._run_rows.nodes(await tx.fetch(Q.ALL_NODES, {}))
        gone = gone_incarnations(nodes.nodes, self.clock(), self.node_ttl, answering_since=self.answering_since())
        known = nodes.known
        out: list[StoredJob] = []
        # rows another node is adopting right now are locked and skipped: each job has one taker
        for job_id, job, holder, written_by, handovers in await tx.fetch(Q.PG_QUEUE_JOBS, {"queue": queue}):
            if tx.again and written_by == nonce:
                # adopted by this call's first try, committed before the cut: this
                # incarnation's now (its handover counted), and handed to nobody yet
                out.append(stored_job(int(job_id), job, int(handovers)))
            elif adoptable(holder, incarnation, own, known, gone):
                if holder != incarnation:
                    await tx.execute(Q.PG_ADOPT_JOB, {"incarnation": incarnation, "nonce": nonce, "id": job_id})
                    handovers += 1
                out.append(stored_job(int(job_id), job, int(handovers)))
        return out


async def _keep_session(conn: asyncpg.Connection) -> None:
    """A connection going back to the pool keeps its session as it is.

    The driver's default reset (``RESET ALL``, ``UNLISTEN *``, releasing
    advisory locks, ...) costs one more round trip per operation, and this
    store leaves nothing on a session to reset: its locks are transaction
    locks, it sets no session variables, and it listens on a connection of
    its own. (A transaction left open is still rolled back by the driver.)
    """


async def migrate(
    conn: asyncpg.Connection, where: str, schema: str | None = None, *, node_ttl: float | None = None,
    now: float | None = None,
) -> None:
    """Bring the database on ``conn`` to this code's schema (once, however many nodes start
    together); :class:`SchemaTooNew` when a newer taskwatch wrote it, :class:`NotATaskwatchStore`
    when its tables would clash with another application's, :class:`SchemaInUse` when nodes of an
    earlier taskwatch heartbeat on it (within ``node_ttl``; None: not asked). ``where`` names it;
    ``schema``: the one ``conn``'s search_path names (created here if missing), None for the
    connection's default. ``now``: the heartbeats' clock (None: the database's)."""
    async with conn.transaction():
        await conn.execute(Q.PG_MIGRATION_LOCK)
        await claim_schema(conn, schema, where, TASKWATCH_OBJECTS)
        await conn.execute(Q.CREATE_MIGRATIONS)
        found = await conn.fetchval(Q.SCHEMA_FOUND)
        if found > Q.SCHEMA_VERSION:
            raise SchemaTooNew(where, found, Q.SCHEMA_VERSION)
        if node_ttl is not None and 0 < found < Q.SCHEMA_VERSION:
            if now is None:
                now = float(await conn.fetchval("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8"))
            live = _q(Q.LIVE_NODES)
            nodes = [r[0] for r in await conn.fetch(live.sql, *live.args({"since": now - node_ttl}))]
            if nodes:
                raise SchemaInUse(where, found, Q.SCHEMA_VERSION, nodes, node_ttl)
        for version, name, statements in Q.MIGRATIONS:
            if version <= found:
                continue
            for sql in statements:
                await conn.execute(Q.postgres_ddl(sql))
            rec = _q(Q.RECORD_MIGRATION)
            await conn.execute(rec.sql, *rec.args({"version": version, "name": name, "now": time.time()}))


def _server_of(dsn: str) -> str:
    """The host(s) and port(s) ``dsn`` connects to, for a message (a socket directory given as
    ``?host=``, or the driver's default when it names none)."""
    parts = urlsplit(dsn)
    hosts = parts.netloc.rpartition("@")[2] or dict(parse_qsl(parts.query)).get("host", "")
    return hosts or "its default address (localhost)"


def _nonce() -> str:
    """A random mark for the rows one call writes, the same in every try of the call."""
    return os.urandom(8).hex()


def _detail_value(exc: Exception) -> str | None:
    """The duplicate value from a unique violation's detail (``Key (id)=(x) already exists.``)."""
    detail = str(getattr(exc, "detail", "") or "")
    start, end = detail.find(")=("), detail.rfind(")")
    return detail[start + 3 : end] if start >= 0 and end > start else None
