"""Cluster-wide events through the cluster's PostgreSQL database, without Redis.

An engine made with ``store="postgresql://..."`` and ``events="postgres"`` (or
``events="postgresql://..."`` for another database) runs a
:class:`PostgresEventRelay`. It writes this node's events to the ``events``
table in batches (one transaction per batch, after a short linger, with
progress events of one run coalesced to the newest), and sends one NOTIFY
per batch, never one per event (NOTIFY takes a global lock at commit). Every
node and every dashboard reads the table back from the last id it read, when
notified or at the latest every ``poll_interval`` (a notification is lost
while the listening connection is down), into :attr:`PostgresEventRelay.bus`,
each event with the node that emitted it. The buffering, coalescing, per-node
gap accounting and the per-node summary are the base's (``relay.py``).

Batches of all nodes are written one at a time (an advisory lock held from
the insert to the commit): the table's ids then commit in order, so a reader
never skips an event committed late with a lower id. A node paused or cut off
inside its batch would hold that lock, and every node's events with it: the
server ends a session idle inside a transaction after ``idle_timeout``
(5 s), and a batch taking longer than ``send_timeout`` (10 s) has its
connection cut and is sent again (a read, too, is cut after that long: a
silent network must not leave a reader that says it is connected and hears
nothing). The table is capped:
each publishing node deletes, every ``prune_interval``, what is beyond the
newest ``keep`` events or stored more than ``max_age`` seconds ago, both
times the server's (migration 7), whatever the nodes' clocks say. A reader that fell
further behind than that finds gaps in the nodes' numbers, counts them as
missed and puts a ``bus.dropped`` event naming the node on its bus.

A batch whose commit answer is lost (the connection cut after the server
committed) is sent again; each row names the relay's bus (migration 5), and a
unique index on node, bus and seq leaves the repeated rows out, so readers see
each event once while a restarted node (a new bus, seqs from 1 again) still
gets through.

Each relay keeps two connections of its own (one writes, one listens and
reads), reconnecting with backoff (50 ms doubling to 2 s); the table comes
with the store's schema (migrations 3, 5 and 7), which the relay applies itself
when it is the first to reach the database; a watcher's relay (``migrate=False``,
the cluster observer's) never does: it refuses a database without the tables,
or at another schema version.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .bus import DEFAULT_REPLAY, EventBus
from .errors import InvalidConfiguration
from .urls import password_problem, redact_url, shown_url
from .relay import READING, EventRelay, Outgoing, cancelling, log
from .store import queries as Q
from .store.postgres import check_schema, driver_url, load_driver, migrate, schema_of, schema_settings

#: the relay's own options in a URL's query; the store's options are left out of the driver's
_OPTIONS = ("keep", "max_age")

_INSERT, _INSERT_ARGS = Q.for_postgres(Q.PG_INSERT_EVENTS)
_AFTER, _ = Q.for_postgres(Q.EVENTS_AFTER)
_PRUNE, _ = Q.for_postgres(Q.PRUNE_EVENTS)
_NOTIFY, _ = Q.for_postgres(Q.PG_NOTIFY)
_SERVER_NOW = "SELECT extract(epoch FROM now())::float8"


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` for the driver, and the relay's own options from its query."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    mine = {key: value for key, value in query if key in _OPTIONS}
    return driver_url(url), mine


class PostgresEventRelay(EventRelay):
    """Publishes a bus to the ``events`` table of a PostgreSQL database and reads every
    node's events back from it.

    ``bus`` is the node's own bus to publish (``None`` for a reader only, as
    ``taskwatch attach postgresql://...`` is). ``keep`` and ``max_age`` cap the
    table (also as URL options: ``postgresql://db/app?keep=50000``); the URL's
    ``schema`` option is the store's (the table is in that schema).
    ``batch`` bounds events per transaction, ``linger`` is how long the
    publisher waits to fill a batch, ``max_pending`` bounds the events waiting
    to be sent. ``since="$"`` reads from the moment the relay starts, ``"0"``
    from the oldest event the table still holds (events of a node before that
    count as missed). ``poll_interval``: the longest a reader waits without a
    notification before it looks anyway. ``idle_timeout``: how long the server lets the
    relay's session sit idle inside a batch's transaction (which holds the lock every
    node's batches wait for) before it ends the session. ``send_timeout``: the longest a
    batch, a pruning or a read may take before its connection is cut and it is tried again.
    ``migrate=False``: a watcher's relay, which never creates or migrates the tables
    (:func:`~.store.postgres.check_schema`).
    """

    def __init__(
        self,
        url: str,
        bus: EventBus | None = None,
        *,
        keep: int = 10_000,
        max_age: float = 3600.0,
        channel: str = "taskwatch_events",
        batch: int = 500,
        linger: float = 0.02,
        max_pending: int = 50_000,
        since: str = "$",
        replay: int = DEFAULT_REPLAY,
        poll_interval: float = 1.0,
        prune_interval: float = 5.0,
        connect_timeout: float = 5.0,
        idle_timeout: float = 5.0,
        send_timeout: float = 10.0,
        migrate: bool = True,
    ) -> None:
        problems = []
        schema: str | None = None
        if not isinstance(url, str) or urlsplit(url).scheme not in ("postgresql", "postgres"):
            shown = shown_url(url) if isinstance(url, str) else url
            problems.append(f"events must be a postgresql:// URL, got {shown!r}")
        elif (problem := password_problem(url)) is not None:
            problems.append(f"url {redact_url(url)}: {problem}")
        else:
            schema, wrong = schema_of(url)
            problems += wrong
            url, options = _split_options(url)
            try:
                keep = int(options.get("keep", keep))
            except ValueError:
                problems.append(f"keep in the URL must be a count, got {options['keep']!r}")
            try:
                max_age = float(options.get("max_age", max_age))
            except ValueError:
                problems.append(f"max_age in the URL must be seconds, got {options['max_age']!r}")
        for name, value in (("keep", keep), ("batch", batch), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive count, got {value!r}")
        for name, seconds in (("max_age", max_age), ("poll_interval", poll_interval),
                              ("prune_interval", prune_interval), ("connect_timeout", connect_timeout),
                              ("idle_timeout", idle_timeout), ("send_timeout", send_timeout)):  # fmt: skip
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < float("inf"):
                problems.append(f"{name} must be a positive number of seconds, got {seconds!r}")
        if not isinstance(linger, int | float) or not 0 <= linger <= 5:
            problems.append(f"linger must be between 0 and 5 seconds, got {linger!r}")
        if not isinstance(channel, str) or not channel.isidentifier():
            problems.append(f"channel must be a plain identifier, got {channel!r}")
        if since not in ("$", "0"):
            problems.append(f"since must be '$' (from now) or '0' (the oldest kept), got {since!r}")
        if problems:
            raise InvalidConfiguration("the PostgreSQL event relay", problems)
        self._driver = load_driver()
        super().__init__(
            bus, stream="events", batch=batch, linger=linger, max_pending=max_pending, from_start=since == "0",
            replay=replay,
        )
        d = self._driver
        self.transient_errors = (OSError, TimeoutError, d.PostgresError, d.InterfaceError,
                                 d.exceptions.InternalClientError)  # fmt: skip
        self.url = url
        #: the schema of the store's tables (None: the connection's default)
        self.schema = schema
        self.keep = keep
        self.max_age = max_age
        self.channel = channel
        self.since = since
        self.poll_interval = poll_interval
        self.prune_interval = prune_interval
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        #: whether the first connection creates and migrates the tables (False: only checks them)
        self.migrates = migrate
        # every row names self.bus_id: a batch written again after its commit answer was lost
        # is recognised (by node, bus and seq) and not stored twice
        self._writer: Any = None
        self._reader: Any = None
        self._migrated = False
        #: the id of the last event read (None: not known yet, from the newest when first
        #: connected); kept across a stop and start, so a restart reads on from there
        self._last_id: int | None = 0 if since == "0" else None
        self._notified = asyncio.Event()
        self._prune_due = 0.0
        #: events deleted by this node's pruning
        self.pruned = 0
        #: notifications heard
        self.notifications = 0

    @property
    def public_url(self) -> str:
        return redact_url(self.url)

    # ------------------------------------------------------------------ connections

    async def _connect(self) -> Any:
        settings = {
            # every node's batches wait for the one holding the events lock: a node paused or
            # cut off inside its batch (three statements sent back to back, never idle for a
            # reason) would stop the cluster's events for as long; the server ends it instead
            "idle_in_transaction_session_timeout": str(max(1, round(self.idle_timeout * 1000))),
            **schema_settings(self.schema),
        }
        conn = await self._driver.connect(self.url, timeout=self.connect_timeout, server_settings=settings)
        try:
            if not self._migrated:
                # the events table comes with the store's schema; the first to arrive applies it
                if self.migrates:
                    await migrate(conn, self.public_url, self.schema)
                else:
                    await check_schema(conn, self.public_url, self.schema)
                self._migrated = True
        except BaseException:
            conn.terminate()
            raise
        return conn

    @staticmethod
    async def _drop(conn: Any) -> None:
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=2.0)
        except Exception:  # noqa: BLE001 - a connection cut mid-operation: just let it go
            conn.terminate()

    async def _open(self) -> None:
        self._notified = asyncio.Event()
        # _last_id stays: after a restart the per-node views (last seqs) are still there, and
        # what came while stopped is read, not taken for missed, as long as the table has it
        self._prune_due = asyncio.get_running_loop().time() + self.prune_interval * random.uniform(0.2, 1.0)
        try:
            await self._connect_reader()
        except self.transient_errors as exc:
            # the read loop keeps trying; events sent meanwhile wait in the table
            log.warning("cannot reach %s for events yet (%r); retrying", self.public_url, exc)

    async def _connect_reader(self) -> None:
        conn = await self._connect()
        try:
            conn.add_termination_listener(lambda _conn: self._notified.set())
            await conn.add_listener(self.channel, self._on_notify)
            if self._last_id is None:
                self._last_id = int(await conn.fetchval(Q.LAST_EVENT_ID))
        except BaseException:
            conn.terminate()
            raise
        self._reader = conn
        self.connected = True

    async def _close(self) -> None:
        writer, reader = self._writer, self._reader
        self._writer = self._reader = None
        await self._drop(writer)
        await self._drop(reader)

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        self.notifications += 1
        self._notified.set()

    # ------------------------------------------------------------------ publishing

    async def _send(self, batch: list[Outgoing]) -> None:
        if self._writer is None or self._writer.is_closed():
            self._writer = await self._connect()
        conn = self._writer
        assert self.source is not None
        values = {
            "node": self.source.node,
            "bus": self.bus_id,
            "seqs": [r.seq for r in batch],
            "skipped": [r.skipped for r in batch],
            "tss": [r.ts for r in batch],
            "bodies": [r.data for r in batch],
        }
        try:
            with self._bounded(conn, "sending a batch of events"):
                async with conn.transaction():
                    await conn.execute(Q.PG_EVENTS_LOCK)
                    await conn.execute(_INSERT, *[values[name] for name in _INSERT_ARGS])
                    # delivered at commit: one notification per batch
                    await conn.execute(_NOTIFY, self.channel, "")
        except BaseException:
            # a connection cut mid-transaction may be left in any state: never reuse it
            self._writer = None
            conn.terminate()
            raise

    @contextlib.contextmanager
    def _bounded(self, conn: Any, doing: str) -> Iterator[None]:
        """Cut ``conn`` if what is done on it takes longer than ``send_timeout``, and raise
        TimeoutError then: a silent network never answers, and a cancelled transaction would
        wait for its ROLLBACK's answer; a cut connection fails every wait on it at once."""
        cut: list[bool] = []

        def cut_off() -> None:
            cut.append(True)
            conn.terminate()

        timer = asyncio.get_running_loop().call_later(self.send_timeout, cut_off)
        try:
            yield
        except Exception as exc:
            if not cut:
                raise
            raise TimeoutError(f"{doing} took longer than {self.send_timeout:g} s (send_timeout)") from exc
        finally:
            timer.cancel()

    def _idle_timeout(self) -> float | None:
        return max(0.0, self._prune_due - asyncio.get_running_loop().time())

    async def _between_batches(self) -> None:
        now = asyncio.get_running_loop().time()
        if now < self._prune_due:
            return
        self._prune_due = now + self.prune_interval * random.uniform(0.8, 1.2)
        if self._writer is None or self._writer.is_closed():
            self._writer = await self._connect()
        conn = self._writer
        try:
            with self._bounded(conn, "pruning the events table"):
                # both ends of an event's age are the server's clock (its stored_at, its now):
                # a node whose clock is off would otherwise delete others' fresh events (ahead)
                # or have its own pruned as soon as they were written (behind)
                now = float(await conn.fetchval(_SERVER_NOW))
                status = await conn.execute(_PRUNE, self.keep, now - self.max_age)
        except BaseException:
            self._writer = None
            conn.terminate()
            raise
        tail = status.rsplit(" ", 1)[-1]
        self.pruned += int(tail) if tail.isdigit() else 0

    # ------------------------------------------------------------------ reading

    async def _read_loop(self) -> None:
        delay = 0.0
        while True:
            try:
                if self._reader is None or self._reader.is_closed():
                    conn, self._reader = self._reader, None
                    await self._drop(conn)
                    await self._connect_reader()
                # cleared before the read: a notification that comes during it wakes the next wait
                self._notified.clear()
                # bounded as a send is: a silent network would hold this read, and the
                # relay would say it is connected while it hears nothing, for good
                with self._bounded(self._reader, "reading events"):
                    rows = await self._reader.fetch(_AFTER, self._last_id, self.batch)
                self.connected = True
                delay = 0.0
                self._went_through(READING)
            except self.transient_errors as exc:
                if cancelling():
                    raise asyncio.CancelledError from exc
                conn, self._reader = self._reader, None
                if conn is not None:
                    conn.terminate()
                delay = await self._back_off(exc, delay, READING)
                continue
            for event_id, skipped, body, bus in rows:
                self._last_id = event_id
                self._take(body, skipped, bus)
            if len(rows) < self.batch:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.poll_interval):
                        await self._notified.wait()
