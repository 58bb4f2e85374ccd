"""A leader lease kept in a PostgreSQL row, for nodes that share a database.

Every operation is one compare-and-set statement, judged by the database's
clock (``clock_timestamp()``), so nodes with skewed clocks still agree on
when a lease lapsed. Terms come from a sequence: they only grow, across
releases, restarts and holders. Each operation opens a short connection of
its own: a renew every few seconds costs little, and a lease that never keeps
a connection has none to lose, none to reconnect and none to close.

The expiry a holder is told is the database's, less the round trip of the
request and a small margin, and this lease's :meth:`now` is the local clock
moved onto the database's: so a holder considers its lease over a little
before any other node can take it.

A database that cannot be reached (refused, cut, or silent until the elector
gives up waiting: see :meth:`PostgresLease.timed_out`) is counted
(``failures``, ``last_error``) and reported by :meth:`PostgresLease.describe`,
so in ``engine.leadership().backend``, until an operation is answered again;
meanwhile operations back off as :class:`~.redis_lease.RedisLease`'s do
(50 ms doubling up to the renew interval), failing fast with
:class:`~.errors.LeaseUnavailable`. A database that answers with an error
(a wrong password, a database or a role that does not exist, a setting in the
URL the server does not know) is no outage: the operation raises
:class:`~.errors.LeaseRefused`, which fails ``engine.start()``, and
``leadership().backend`` says ``refused: <error>`` until an operation succeeds.

A node stalled inside its acquire (paused, or cut off by a network that drops
its packets) holds the lease's row locked: the server ends its session once it
has sat idle in its transaction for a ttl, and the other nodes' waits for the
row end after half a renew interval (``lock_timeout``), before the elector
gives up on them, so they read as "another node holds the lease", not as a
database out of reach. A term is committed durably (``synchronous_commit``)
before the holder is told it. Tables dropped under a running cluster (a
schema reset) are created again by the next operation, with the lease's row
held by nobody and free only a ttl later: the last holder may think it leads
until its deadline. Tables a restore puts back with older contents are not
noticed: stop the nodes before restoring them.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from .errors import InvalidConfiguration, LeaseRefused, NotATaskwatchStore
from .jsonsafe import name_problem
from .lease import Lease, LeaseState, ReportsHealth, StoreHealth, seconds_option
from .urls import password_problem, redact_url
from .store import queries as Q
from .store.postgres import LEASE_OBJECTS, claim_schema, driver_url, load_driver, schema_of, schema_settings

log = logging.getLogger("taskwatch.lease")

#: seconds taken off the expiry a holder is told, beyond the round trip, as a fraction of the ttl
_MARGIN = 0.05

#: the first wait after a failure (doubling up to the renew interval)
_BACKOFF = 0.05

#: SQLSTATE classes that mean the server cannot serve now (connection, shutdown, resources)
_UNREACHABLE_CLASSES = ("08", "57", "53")

#: the server ended a session left idle inside its transaction (this node was paused or cut off
#: mid-acquire): the connection is lost, as a cut one is
_SESSION_ENDED = "25P03"

#: SQLSTATE class of a transaction to try again (serialization failure, deadlock): neither an
#: outage nor a refusal
_RETRY_CLASS = "40"

_NOW = "EXTRACT(EPOCH FROM clock_timestamp())::float8"

#: the lease's own lock, then the migrations' (a schema is created under it, by the store or here)
_SETUP_LOCKS = ["SELECT pg_advisory_xact_lock(7418990303)", Q.PG_MIGRATION_LOCK]

_SETUP = [
    """CREATE TABLE IF NOT EXISTS leases (
        name        TEXT PRIMARY KEY,
        holder      TEXT,
        term        BIGINT NOT NULL,
        expires_at  DOUBLE PRECISION NOT NULL
    )""",
    "CREATE SEQUENCE IF NOT EXISTS lease_terms",
]

#: a sequence made again (the old one dropped) raised past the highest term this node has seen,
#: so the next term drawn is above it (next = last_value, or last_value + 1 once one was drawn);
#: the term written in, not bound: a statement with parameters is prepared, and this one cannot
#: be before the transaction that makes the sequence (see acquire())
_RAISE_TERMS = "SELECT setval('lease_terms', {term}) FROM lease_terms WHERE last_value + is_called::int <= {term}"

# An acquire is three statements in one transaction, so that a term is drawn only by the node
# that takes the lease: terms then count the leaderships, but for the values a server crash skips
# (PostgreSQL logs sequences 32 values ahead). (A term drawn in the statement that
# checks the row is drawn by every racer that passes the check before the winner commits, and
# wasted when the row, locked and checked again, turns out taken; an INSERT ... ON CONFLICT
# draws one on every try.)

#: the lease's row, free, if there is none yet (term 0 is no term: it is never handed out)
_MAKE_ROW = "INSERT INTO leases (name, holder, term, expires_at) VALUES ($1, NULL, 0, 0) ON CONFLICT (name) DO NOTHING"

#: the lease's row made again with the tables (dropped under a running cluster): held by nobody,
#: and free only a ttl from now, when the last holder's term has surely lapsed (see _set_up)
_HOLD_OFF_ROW = f"""
INSERT INTO leases (name, holder, term, expires_at) VALUES ($1, NULL, 0, {_NOW} + $2)
ON CONFLICT (name) DO NOTHING"""

#: the row locked if it is free (released, or never taken: its expiry is 0), expired or already
#: the caller's; checked again on the newest version once a racer that locked it first has committed
_LOCK_IF_FREE = f"""
SELECT 1 FROM leases
WHERE name = $1 AND (expires_at <= {_NOW} OR holder = $2)
FOR UPDATE"""

#: the locked row taken, with the new term (a statement of its own: it sees the row as locked)
_TAKE = f"""
UPDATE leases SET holder = $2, term = nextval('lease_terms'), expires_at = {_NOW} + $3
WHERE name = $1
RETURNING term, expires_at, {_NOW}"""

_RENEW = f"""
UPDATE leases SET expires_at = {_NOW} + $4
WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > {_NOW}
RETURNING term, expires_at, {_NOW}"""

_RELEASE = f"""
UPDATE leases SET holder = NULL, expires_at = 0
WHERE name = $1 AND holder = $2 AND term = $3 AND expires_at > {_NOW}
RETURNING term, {_NOW}"""

_HOLDER = f"""
SELECT holder, term, expires_at, {_NOW} FROM leases
WHERE name = $1 AND holder IS NOT NULL AND expires_at > {_NOW}"""


def _url_problems(url: object) -> list[str]:
    """What makes ``url`` a PostgreSQL URL no connection could ever be made with (the
    driver's and the server's own options are theirs to judge, when connecting)."""
    if not isinstance(url, str):
        return [f"url must be a postgresql:// URL (postgresql://user:password@host:port/database), got {url!r}"]
    shown = redact_url(url)
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        return [f"url must be a postgresql:// URL (postgresql://user:password@host:port/database), got {shown!r}"]
    if (problem := password_problem(url)) is not None:
        return [f"url {shown}: {problem}"]
    problems = []
    # as the store's URL: the server named, not left to the driver's default
    if not parts.hostname and "host=" not in parts.query:
        problems.append(f"url {shown} names no server: postgresql://user@host:port/database")
    if "," not in parts.netloc:  # several servers (db1:5432,db2:5432) are the driver's to read
        try:
            parts.port
        except ValueError as exc:
            problems.append(f"url {shown}: {exc}")
    return problems


def _node_of(holder: str) -> str:
    """The node id in a holder written as ``node#token`` (16 hex digits)."""
    node, sep, token = holder.rpartition("#")
    return node if sep and len(token) == 16 else holder


class PostgresLease(ReportsHealth, Lease):
    """The leader lease ``name`` in the PostgreSQL database at ``url``.

    Nodes pointing at the same database and name elect one leader::

        engine = Engine(store=url, lease=PostgresLease(url, ttl=15))

    ``connect_timeout`` bounds each connection attempt (the elector bounds
    each whole operation by the renew interval as well). The URL's ``schema``
    option is the store's: the ``leases`` table goes in that schema.
    """

    def __init__(
        self,
        url: str,
        ttl: float = 15.0,
        *,
        name: str = "leader",
        renew_interval: float | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self._driver = load_driver()
        problems = _url_problems(url)
        # a timeout of -1 or NaN fails every connection: the node would never lead, only say
        # the database is unreachable; a name the driver cannot send fails the same way
        if (problem := name_problem("name", name)) is not None:
            problems.append(problem)
        timeout = seconds_option("connect_timeout", connect_timeout, problems)
        try:
            super().__init__(ttl, renew_interval=renew_interval)
        except InvalidConfiguration as exc:
            # named together: fixing one only to be told of the next is a slow way to configure
            raise InvalidConfiguration("PostgresLease", [*problems, *exc.problems]) from None
        if problems or timeout is None:
            raise InvalidConfiguration("PostgresLease", problems)
        self.schema, problems = schema_of(url)
        if problems:
            raise InvalidConfiguration(f"the PostgreSQL lease {redact_url(url)}", problems)
        self.url = url
        #: the URL may be the cluster's one (with the store's or the relay's options in it)
        self._dsn = driver_url(url)
        self._settings = {
            # a term committed asynchronously can be lost in a crash of the server, which then
            # hands the same term out again: two leaderships with one fencing token
            "synchronous_commit": "on",
            # a node paused or cut off inside its acquire holds the lease's row locked: without
            # this the cluster has no leader until its connection dies (hours on a silent
            # network); a healthy transaction is never idle that long (the elector gives up on
            # the whole operation after a renew interval, at most half the ttl)
            "idle_in_transaction_session_timeout": str(max(1, round(self.ttl * 1000))),
            # a wait for that row ends on the server, and before the elector gives up on the
            # operation: so it reads as a lease held, not as a database that does not answer,
            # and no waiting session is left behind on the server for each try
            "lock_timeout": str(max(1, round(self.renew_interval * 500))),
            **schema_settings(self.schema),
        }
        self.name = name
        self.connect_timeout = timeout
        #: database clock minus local clock, as the last operation measured it
        self._offset = 0.0
        #: written beside the node id: two processes started with the same node id by mistake
        #: are still two holders, and neither renews or releases the other's lease
        self._token = os.urandom(8).hex()
        #: the process the token was made in: a forked child makes its own (see _holder)
        self._token_pid = os.getpid()
        self._ready = False
        #: the highest term this lease object has seen: a sequence made again starts above it
        self._term_seen = 0
        #: a wait for the lease's row timed out, and no try has got through to it since
        self._row_locked = False
        self._where = redact_url(url)
        self._health = StoreHealth(self._where, _BACKOFF, self.renew_interval)

    def now(self) -> float:
        return time.time() + self._offset

    def describe(self) -> str:
        return f"postgres {self._where} name={self.name} ttl={self.ttl:g}s{self._health.describe()}"

    def timed_out(self, operation: str, after: float) -> None:
        # a silent database raises nothing before the elector's bound (at most the renew
        # interval) runs out: without this it would never count as unreachable
        self._health.failed(f"TimeoutError: no answer to {operation} within {after:.3g} s")

    def _unreachable(self, exc: BaseException) -> bool:
        d = self._driver
        if isinstance(exc, d.exceptions.ClientConfigurationError):
            return False  # an option in the URL the driver cannot use: no outage
        if isinstance(exc, OSError | TimeoutError | d.InterfaceError | d.exceptions.InternalClientError):
            return True
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        return isinstance(exc, d.PostgresError) and (sqlstate[:2] in _UNREACHABLE_CLASSES or sqlstate == _SESSION_ENDED)

    def _refusal(self, exc: Exception) -> Exception:
        """What to raise for ``exc``, an error the database (or the driver) answered with;
        shown in :meth:`describe` until an operation succeeds."""
        d = self._driver
        error = f"{type(exc).__name__}: {exc}"
        self._health.refused(error)
        if isinstance(exc, NotATaskwatchStore):
            return exc  # another application's leases table: already says what to do
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        if isinstance(exc, d.PostgresError) and sqlstate[:2] == _RETRY_CLASS:
            return exc  # the next try goes through: nothing to fix
        if isinstance(exc, d.PostgresError | d.InterfaceError):
            return LeaseRefused(self._where, error)
        return exc

    async def _one(self, sql: str, *args: Any) -> tuple[Any, float]:
        """One statement on a connection of its own: its row (or None) and the round trip in seconds."""
        return await self._on_connection(lambda conn: conn.fetchrow(sql, *args))

    async def _on_connection(self, work: Callable[[Any], Awaitable[Any]]) -> tuple[Any, float]:
        """``work`` on a connection of its own: what it returned (a row or None) and how long it took."""
        self._health.check()
        try:
            conn = await self._driver.connect(self._dsn, timeout=self.connect_timeout, server_settings=self._settings)
            try:
                if not self._ready:
                    await self._set_up(conn)
                sent = time.time()
                try:
                    row = await work(conn)
                except self._driver.UndefinedTableError:
                    # the table or the sequence was dropped under the running cluster (a restore,
                    # a schema reset): made again here, or no node would lead until restarted
                    log.warning(
                        "the lease tables of %s are gone; creating them again (the lease can be taken "
                        "a ttl, %g s, from now: its last holder may think it leads until then)",
                        self._where, self.ttl,
                    )  # fmt: skip
                    self._ready = False
                    await self._set_up(conn, dropped=True)
                    row = await work(conn)
                back = time.time()
            except BaseException:
                # cut short (an error, or the elector's timeout): a polite close would wait
                # on a server that may not answer
                conn.terminate()
                raise
            try:
                await conn.close()
            except Exception:  # noqa: BLE001 - the answer is in: a connection failing to close changes nothing
                conn.terminate()
        except Exception as exc:
            if isinstance(exc, self._driver.LockNotAvailableError):
                # lock_timeout: the database answered, another session holds the lock
                self._health.answered()
                raise
            if not self._unreachable(exc):
                refusal = self._refusal(exc)
                if refusal is exc:
                    raise
                raise refusal from exc
            raise self._health.failed(f"{type(exc).__name__}: {exc}") from exc
        self._health.answered()
        if row is not None:
            self._offset = row[-1] - (sent + back) / 2
        return row, back - sent

    async def _set_up(self, conn: Any, *, dropped: bool = False) -> None:
        """Create the table and the sequence if they are missing (under the migrations' lock).

        ``dropped``: they were there, and were dropped under the running cluster. The lease's
        last holder still thinks it leads until its own deadline, within a ttl of its last
        renew: the lease's row is made again held off for a ttl (as RedisLease waits a ttl after
        Redis lost its data), in the same transaction, so no node takes it before then.
        """
        async with conn.transaction():
            for statement in _SETUP_LOCKS:
                await conn.execute(statement)
            # another application's leases table is refused, not written to
            await claim_schema(conn, self.schema, redact_url(self.url), LEASE_OBJECTS)
            for statement in _SETUP:
                await conn.execute(statement)
            if self._term_seen:
                # terms only grow, also across a sequence dropped and made again: a fencing
                # target that saw a term would refuse every lower one, the new leader's too
                await conn.execute(_RAISE_TERMS.format(term=int(self._term_seen)))
            if dropped:
                await conn.execute(_HOLD_OFF_ROW, self.name, float(self.ttl))
        self._ready = True

    def _saw(self, term: int) -> int:
        self._term_seen = max(self._term_seen, term)
        return term

    def _locked_out(self) -> None:
        """An acquire, renew or release waited out ``lock_timeout``: another session holds the
        lease's row (or the setup's lock), so this node cannot take or keep the lease now."""
        if not self._row_locked:
            self._row_locked = True
            log.warning(
                "the lease %s in %s is locked by another session (a node stalled inside its "
                "acquire?); the server ends a session idle in its transaction after %g s, and "
                "the lease can be taken then",
                self.name, self._where, self.ttl,
            )  # fmt: skip

    def _holder(self, node_id: str) -> str:
        if os.getpid() != self._token_pid:
            # a preforking server builds its app (the engine and this lease) before it forks its
            # workers: sharing the parent's token, they would be one holder, taking it in turns
            self._token, self._token_pid = os.urandom(8).hex(), os.getpid()
        return f"{node_id}#{self._token}"

    def _state(self, holder: str, term: int, expires_at: float, rtt: float) -> LeaseState:
        return LeaseState(holder=holder, term=term, expires_at=expires_at - rtt - _MARGIN * self.ttl)

    async def acquire(self, node_id: str) -> LeaseState | None:
        holder = self._holder(node_id)

        async def take(conn: Any) -> Any:
            # prepared before the transaction: a statement prepared inside it would be sent ending
            # in a Flush, not a Sync, and a session left waiting for the rest (its node paused or
            # cut off right then) is "active" to the server, beyond idle_in_transaction_session_timeout,
            # holding the row for as long as its connection lives. Inside, every message ends
            # in a Sync, so the server sees a stalled node idle in its transaction and ends it
            make_row, lock_if_free, take_row = [await conn.prepare(sql) for sql in (_MAKE_ROW, _LOCK_IF_FREE, _TAKE)]
            async with conn.transaction():
                await make_row.fetchval(self.name)
                if await lock_if_free.fetchval(self.name, holder) is None:
                    return None
                return await take_row.fetchrow(self.name, holder, float(self.ttl))

        # the round trip of the whole transaction: the expiry the holder is told errs early
        try:
            row, rtt = await self._on_connection(take)
        except self._driver.LockNotAvailableError:
            self._locked_out()
            return None  # as when another node holds the lease: it is not this node's to take
        self._row_locked = False
        return None if row is None else self._state(node_id, self._saw(row[0]), row[1], rtt)

    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        try:
            row, rtt = await self._one(_RENEW, self.name, self._holder(node_id), term, float(self.ttl))
        except self._driver.LockNotAvailableError:
            # only a lease that lapsed can be locked by a taker: not renewed
            self._locked_out()
            return None
        return None if row is None else self._state(node_id, self._saw(row[0]), row[1], rtt)

    async def release(self, node_id: str, term: int) -> bool:
        try:
            row, _ = await self._one(_RELEASE, self.name, self._holder(node_id), term)
        except self._driver.LockNotAvailableError:
            self._locked_out()
            return False
        return row is not None

    async def holder(self) -> LeaseState | None:
        row, _ = await self._one(_HOLDER, self.name)
        return None if row is None else LeaseState(holder=_node_of(row[0]), term=self._saw(row[1]), expires_at=row[2])

    async def peek(self) -> LeaseState | None:
        """:meth:`holder` for a watcher that changes nothing: a database whose nodes use no
        PostgresLease (no ``leases`` table) has no holder, and no table is created for it."""
        conn = await self._driver.connect(self._dsn, timeout=self.connect_timeout, server_settings=self._settings)
        try:
            row = await conn.fetchrow(_HOLDER, self.name)
        except self._driver.UndefinedTableError:
            return None
        finally:
            await conn.close()
        return None if row is None else LeaseState(holder=_node_of(row[0]), term=row[1], expires_at=row[2])

    def __repr__(self) -> str:
        return f"<PostgresLease {self.describe()}>"
