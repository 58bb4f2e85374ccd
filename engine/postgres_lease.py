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
:class:`~.errors.LeaseUnavailable`.
"""

from __future__ import annotations

import os
import time
from typing import Any

from .errors import InvalidConfiguration
from .jsonsafe import name_problem
from .lease import Lease, LeaseState, ReportsHealth, StoreHealth, seconds_option
from .urls import redact_url
from .store import queries as Q
from .store.postgres import LEASE_OBJECTS, claim_schema, driver_url, load_driver, schema_of, schema_settings

#: seconds taken off the expiry a holder is told, beyond the round trip, as a fraction of the ttl
_MARGIN = 0.05

#: the first wait after a failure (doubling up to the renew interval)
_BACKOFF = 0.05

#: SQLSTATE classes that mean the server cannot serve now (connection, shutdown, resources)
_UNREACHABLE_CLASSES = ("08", "57", "53")

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

#: free, expired or already the caller's: take it, with a new term. A term is drawn only
#: when the lease is taken (an INSERT ... ON CONFLICT draws one on every try): terms then
#: count the leaders, and a follower's tries do not make the next leader's term jump
_ACQUIRE = f"""
WITH taken AS (
    UPDATE leases SET holder = $2, term = nextval('lease_terms'), expires_at = {_NOW} + $3
    WHERE name = $1 AND (holder IS NULL OR expires_at <= {_NOW} OR holder = $2)
    RETURNING term, expires_at
), made AS (
    INSERT INTO leases (name, holder, term, expires_at)
    SELECT $1, $2, nextval('lease_terms'), {_NOW} + $3
    WHERE NOT EXISTS (SELECT 1 FROM leases WHERE name = $1)
    ON CONFLICT (name) DO NOTHING
    RETURNING term, expires_at
)
SELECT term, expires_at, {_NOW} FROM taken
UNION ALL
SELECT term, expires_at, {_NOW} FROM made"""

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
        super().__init__(ttl, renew_interval=renew_interval)
        self.schema, problems = schema_of(url)
        if problems:
            raise InvalidConfiguration(f"the PostgreSQL lease {redact_url(url)}", problems)
        # a timeout of -1 or NaN fails every connection: the node would never lead, only say
        # the database is unreachable; a name the driver cannot send fails the same way
        problems = [problem] if (problem := name_problem("name", name)) is not None else []
        timeout = seconds_option("connect_timeout", connect_timeout, problems)
        if problems or timeout is None:
            raise InvalidConfiguration("PostgresLease", problems)
        self.url = url
        #: the URL may be the cluster's one (with the store's or the relay's options in it)
        self._dsn = driver_url(url)
        self._settings = schema_settings(self.schema)
        self.name = name
        self.connect_timeout = timeout
        #: database clock minus local clock, as the last operation measured it
        self._offset = 0.0
        #: written beside the node id: two processes started with the same node id by mistake
        #: are still two holders, and neither renews or releases the other's lease
        self._token = os.urandom(8).hex()
        self._ready = False
        self._health = StoreHealth(redact_url(url), _BACKOFF, self.renew_interval)

    def now(self) -> float:
        return time.time() + self._offset

    def describe(self) -> str:
        return super().describe() + self._health.describe()

    def timed_out(self, operation: str, after: float) -> None:
        # a silent database raises nothing before the elector's bound (at most the renew
        # interval) runs out: without this it would never count as unreachable
        self._health.failed(f"TimeoutError: no answer to {operation} within {after:.3g} s")

    def _unreachable(self, exc: BaseException) -> bool:
        d = self._driver
        if isinstance(exc, OSError | TimeoutError | d.InterfaceError | d.exceptions.InternalClientError):
            return True
        sqlstate = str(getattr(exc, "sqlstate", "") or "")
        return isinstance(exc, d.PostgresError) and sqlstate[:2] in _UNREACHABLE_CLASSES

    async def _one(self, sql: str, *args: Any) -> tuple[Any, float]:
        """One statement on a connection of its own: its row (or None) and the round trip in seconds."""
        self._health.check()
        try:
            conn = await self._driver.connect(self._dsn, timeout=self.connect_timeout, server_settings=self._settings)
            try:
                if not self._ready:
                    async with conn.transaction():
                        for statement in _SETUP_LOCKS:
                            await conn.execute(statement)
                        # another application's leases table is refused, not written to
                        await claim_schema(conn, self.schema, redact_url(self.url), LEASE_OBJECTS)
                        for statement in _SETUP:
                            await conn.execute(statement)
                    self._ready = True
                sent = time.time()
                row = await conn.fetchrow(sql, *args)
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
            if not self._unreachable(exc):
                raise
            raise self._health.failed(f"{type(exc).__name__}: {exc}") from exc
        self._health.answered()
        if row is not None:
            self._offset = row[-1] - (sent + back) / 2
        return row, back - sent

    def _holder(self, node_id: str) -> str:
        return f"{node_id}#{self._token}"

    def _state(self, holder: str, term: int, expires_at: float, rtt: float) -> LeaseState:
        return LeaseState(holder=holder, term=term, expires_at=expires_at - rtt - _MARGIN * self.ttl)

    async def acquire(self, node_id: str) -> LeaseState | None:
        row, rtt = await self._one(_ACQUIRE, self.name, self._holder(node_id), float(self.ttl))
        return None if row is None else self._state(node_id, row[0], row[1], rtt)

    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        row, rtt = await self._one(_RENEW, self.name, self._holder(node_id), term, float(self.ttl))
        return None if row is None else self._state(node_id, row[0], row[1], rtt)

    async def release(self, node_id: str, term: int) -> bool:
        row, _ = await self._one(_RELEASE, self.name, self._holder(node_id), term)
        return row is not None

    async def holder(self) -> LeaseState | None:
        row, _ = await self._one(_HOLDER, self.name)
        return None if row is None else LeaseState(holder=_node_of(row[0]), term=row[1], expires_at=row[2])

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
        return f"<PostgresLease {self.name!r} ttl={self.ttl:g}>"
