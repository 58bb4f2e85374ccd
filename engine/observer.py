"""Watching a cluster on PostgreSQL from outside it: every node, every run, every event.

A :class:`ClusterObserver` runs no tasks and registers no node. It reads what
the nodes share in their database: the ``nodes`` table (each node's newest
incarnation: up, dead or stopped, last heartbeat, running runs, CPU and RSS,
version), the leader and its term from the ``leases`` table (when the nodes
use a :class:`~.postgres_lease.PostgresLease`; else, a RedisLease say, from
the nodes' own lease events), the newest runs of the whole
cluster (with the node each ran on), and the cluster's events through a
:class:`~.postgres_events.PostgresEventRelay` (nodes started with
``events="postgres"``). ``taskwatch attach postgresql://...`` shows it.

The runs come from the store: read again when run events arrive (at most a
few times a second), every ``runs_interval`` seconds anyway, and at once when
events were missed (a resync, counted); progress events move a run's
progress in between. Cancel and retry act through the store, so they work on
a run whatever node holds it: a pending run is cancelled at once, a running
run's owner is notified and stops it; a retry inserts a new run with the same
params, which any node that has its task claims.

It only watches: it never creates or migrates the tables (a newer dashboard
migrating an older cluster's database would keep that cluster's nodes from
starting), and refuses a database without them or at another schema version.

While the database is out of reach, what was read last is not shown as
current: see :attr:`ClusterObserver.stale`. A node that was up and has been
silent past the node TTL since (by this process's view of the database's
clock) is ``unknown``, and a leader whose lease has lapsed since is no longer
shown (:attr:`ClusterObserver.leader_unknown`). So is a node whose events stopped
coming (:attr:`~.relay.ClusterNode.unknown`): the nodes' TTL may be far shorter than
the watcher's ``node_ttl``, which the nodes table does not record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from .hop import spawn
from .bus import EventBus
from .errors import InvalidConfiguration, RunNotCancellable, RunNotFound, RunNotRetryable, TaskwatchError
from .lease import LeaseState
from .postgres_events import PostgresEventRelay
from .postgres_lease import PostgresLease
from .relay import SILENT_SAMPLES, SILENT_SLACK, ClusterNode, RelayStats
from .runs import Progress, RunStatus
from .store import NewRun, NodeInfo, PostgresStore, StoredRun, make_store

log = logging.getLogger("taskwatch.observer")

#: sources of runs that a periodic task or a trigger starts itself (the engine refuses to retry them)
_RUNS_ITS_OWN = ("periodic:", "trigger:")

#: seconds between two looks at the lease's holder (unless the runs are read anyway)
_LEASE_INTERVAL = 2.0

#: the least time between two reads of the runs, however many run events arrive
_MIN_GAP = 0.25

#: running runs read per query (all of them are read, a page at a time, up to running_limit)
_RUNNING_PAGE = 1000

#: lease events looked at per question: a holder renews every few seconds, so its last
#: events before it died name the term it held then
_LEASE_EVENTS_LOOKED_AT = 20


class ClusterObserver:
    """Every node, run and event of the cluster whose PostgreSQL database ``url`` names.

    ``url`` may carry the store's options (``node_ttl``: how long a node may
    be silent before it shows as dead; default the lease TTL, 30 s) and the
    event relay's (``keep``, ``max_age``). ``lease``: the name of the
    nodes' :class:`PostgresLease` (``None``: show no leader). ``runs_limit``:
    the newest runs shown, and as many of those that ended last and of the newest
    failures, whatever their place in the queue; every running run is shown besides,
    however old, up to ``running_limit`` (those beyond it are counted in
    :attr:`running_unlisted`), and so is one waiting for its next attempt.
    """

    def __init__(
        self,
        url: str,
        *,
        lease: str | None = "leader",
        runs_limit: int = 200,
        running_limit: int = 10_000,
        refresh_interval: float = 1.0,
        runs_interval: float = 5.0,
        since: str = "$",
    ) -> None:
        # a watcher: it never creates or migrates the cluster's tables
        postgres = isinstance(url, str) and url.startswith(("postgresql://", "postgres://"))
        store = make_store(url, migrate=False) if postgres else None
        if not isinstance(store, PostgresStore):
            raise InvalidConfiguration("the cluster observer", [f"it reads a cluster's PostgreSQL database: "
                                       f"give a postgresql://USER@HOST/DATABASE URL, not {url!r}"])  # fmt: skip
        if isinstance(running_limit, bool) or not isinstance(running_limit, int) or running_limit < 1:
            raise InvalidConfiguration("the cluster observer",
                                       [f"running_limit must be a positive count, got {running_limit!r}"])  # fmt: skip
        self.store: PostgresStore = store
        self.relay = PostgresEventRelay(url, since=since, migrate=False)
        self._lease = PostgresLease(store.url, name=lease) if lease else None
        self.runs_limit = runs_limit
        self.running_limit = running_limit
        self.refresh_interval = refresh_interval
        self.runs_interval = runs_interval
        self._node_rows: list[NodeInfo] = []
        #: incarnation -> its last heartbeat as read, the step between the last two read (how
        #: often it heartbeats, as far as the reads of the nodes table show), and when that
        #: heartbeat was first read (this watcher's clock: nodes' clocks may be apart from it)
        self._beats: dict[str, tuple[float, float | None, float]] = {}
        self._leader: LeaseState | None = None
        #: the term read held last, and when it was first read so (the database's clock): a node
        #: whose newest process registered after that holds it only through an older process
        #: of its name (the lease names the node, not the process)
        self._term_seen: tuple[int, float] | None = None
        #: (term, incarnation) -> whether the store's events show that term held by the node
        #: before that incarnation (its newest process) started: looked up once each, for a
        #: term held since before this observer started (see _held_before)
        self._earlier_terms: dict[tuple[int, str], bool] = {}
        #: the lease was seen held since this observer started: the nodes lead through it
        self._lease_seen = False
        self._lease_due = 0.0
        self._runs: dict[str, StoredRun] = {}
        #: the run kept current whether or not the reads list it (a run's open detail)
        self._followed: str | None = None
        #: run id -> (attempt, progress) from the newest run.progress event of a running run:
        #: the store's row holds only what the node's last heartbeat wrote, often older
        self._progress_seen: dict[str, tuple[int, Progress | None]] = {}
        self._runs_stale = True
        self._poke = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        #: the database's time of the last read of the nodes table that got through
        self._now = 0.0
        #: a read failed since the last that got through (the database is out of reach)
        self._read_failed = False
        #: the database's time of the first read that got through after one failed: no node
        #: could heartbeat before, so none is judged dead until node_ttl after it
        self._answering_since = -math.inf
        #: running runs the last read left out (beyond running_limit): 0 when every one is listed
        self.running_unlisted = 0
        #: counts the changes to what runs() returns (a view redraws the runs when it moved)
        self.runs_changes = 0
        #: times the runs were read again because events were missed
        self.resyncs = 0
        #: reads of the store that failed (the next one tries again)
        self.errors = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._task is not None:
            return
        await self.store.open()
        try:
            await self.relay.start()
        except BaseException:
            await self.store.close()
            raise
        self._poke = asyncio.Event()
        self._unsubscribe = self.relay.bus.add_callback(self._on_event)
        with contextlib.suppress(TaskwatchError, OSError):
            await self.refresh()
        self._task = spawn(self._loop(), name="taskwatch-observer")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        await self.relay.stop()
        await self.store.close()

    async def __aenter__(self) -> ClusterObserver:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ what it shows

    @property
    def bus(self) -> EventBus:
        """Every node's events (the relay's cluster bus)."""
        return self.relay.bus

    @property
    def stream(self) -> str:
        return self.relay.stream

    @property
    def public_url(self) -> str:
        return self.store.describe()

    def stats(self) -> RelayStats:
        return self.relay.stats()

    @property
    def stale(self) -> bool:
        """Whether what was read last may no longer hold: the database is out of reach (the
        last read failed, or one is waiting for it to come back), or no read got through for
        longer than a few refresh intervals (a connection that hangs)."""
        if self.last_error is not None or self.store.unreachable_since is not None:
            return True
        return self.store.clock() - self._now > max(5.0, 3 * (self.refresh_interval + _MIN_GAP))

    @property
    def leader_unknown(self) -> bool:
        """Whether who leads is not known now: the database is out of reach (:attr:`stale`),
        and the lease read last has lapsed since (or no holder was read: someone may hold it now)."""
        if self._lease is None or not self.stale:
            return False
        return self._leader is None or self._leader.expires_at < self.store.clock()

    @property
    def by_lease(self) -> bool:
        """Whether the roles come from the lease watched here: it is held now, or was seen held
        since this observer started. Until then (the nodes may lead through another lease, a
        RedisLease say, or none) each node's role is what its own lease events said."""
        return self._lease is not None and (self._leader is not None or self._lease_seen)

    @property
    def leader_vacant(self) -> bool:
        """Whether nobody leads, as known now: the lease the nodes lead through was read
        unheld (a read that got through, not a lapse seen from a database out of reach)."""
        return self.by_lease and self._leader is None and not self.stale

    def nodes(self) -> list[ClusterNode]:
        """Each node's newest incarnation, by name, with what its events said (events, missed).

        A node that is not up (dead, stopped, or unknown: silent past the node TTL while the
        database is out of reach, or its events stopped coming, whatever this watcher's node
        TTL) has no role, unless it still holds the lease (until it lapses), and its running
        count is the store's count of runs it still holds (0 once they were taken over), not
        the last it reported; an unknown node's is not known. Roles come from the lease (see
        :attr:`by_lease`), else from the nodes' lease events; a process restarted under the
        holder's name is not the holder while the lease of the one it replaced runs out.
        """
        newest: dict[str, NodeInfo] = {}
        for info in self._node_rows:  # registration order: a later start replaces an earlier one
            current = newest.get(info.node)
            if current is None or info.started_at >= current.started_at:
                newest[info.node] = info
        seen = {view.node: view for view in self.relay.nodes()}
        leader = None if self.leader_unknown else self._leader
        by_lease = self.by_lease
        now = self.store.clock()
        stale = self.stale
        ttl = self.store.node_ttl
        holding: dict[str, int] = {}
        for run in self._runs.values():
            if run.status is RunStatus.RUNNING and run.node is not None:
                holding[run.node] = holding.get(run.node, 0) + 1
        out: list[ClusterNode] = []
        for name in sorted(set(newest) | set(seen)):
            view = seen.get(name)
            row = newest.get(name)
            if row is None:
                assert view is not None
                out.append(view)  # a node that publishes here but keeps its runs elsewhere
                continue
            info = row
            # its engine.stopped event may come before the next read of the nodes table
            stopped = info.stopped_at is not None or (view is not None and view.stopped)
            # dead as the nodes table said at its last read; silent past the TTL only since, and
            # that read is no longer current: nobody here can tell whether it is up or dead
            overdue = info.last_heartbeat < self._now - ttl
            # unless the database answers again only since less than a TTL: an outage proves
            # no node dead (none could heartbeat through it), so until then it is not known
            dead = not stopped and overdue and self._now >= self._answering_since + ttl
            # or its events stopped coming (see ClusterNode.unknown): this watcher's node_ttl may
            # be far longer than the nodes' own, and a killed node would show up until it passed
            silent = (view is not None and view.unknown) or self._quiet(info)
            unknown = not stopped and not dead and (silent or overdue or (stale and info.last_heartbeat < now - ttl))
            fields: dict[str, Any] = view.model_dump() if view is not None else {"node": name}
            fields.update(
                running=info.running,
                cpu_percent=info.cpu_percent,
                rss_bytes=info.rss_bytes,
                stopped=stopped,
                dead=dead,
                unknown=unknown,
                incarnation=info.incarnation,
                version=info.version,
                started_at=info.started_at,
                last_heartbeat=info.last_heartbeat,
            )
            holds_lease = leader is not None and leader.holder == name and not self._held_before(leader, info)
            if stopped or dead or unknown:
                # what it last reported is not what it holds now: its runs may have been taken over
                fields.update(running=None if unknown else holding.get(name, 0), is_leader=None, term=None)
            elif by_lease:
                # no holder read (or not known now): nobody is shown as a follower either
                fields.update(is_leader=None if leader is None else holds_lease, term=None)
            if holds_lease:
                # a dead leader still holds the lease until it lapses: that is worth seeing
                assert leader is not None
                fields.update(is_leader=True, term=leader.term)
            out.append(ClusterNode(**fields))
        return out

    def _note_beats(self) -> None:
        """Note how far each node's heartbeat moved since the last read of the nodes table."""
        beats: dict[str, tuple[float, float | None, float]] = {}
        for info in self._node_rows:
            last, step, seen_at = self._beats.get(info.incarnation, (info.last_heartbeat, None, self._now))
            if info.last_heartbeat > last:
                # a difference of the node's own times: whatever its clock is apart from this one's
                step, seen_at = info.last_heartbeat - last, self._now
            beats[info.incarnation] = (info.last_heartbeat, step, seen_at)
        self._beats = beats

    def _quiet(self, info: NodeInfo) -> bool:
        """Whether ``info``'s heartbeat stopped: not moved, as this watcher read it, for three of
        its steps (or, for one never seen to move, of the others') and a second. Unknown well
        before this watcher's node TTL, which may be far longer than the nodes' own; its events
        tell the same sooner, but only for a node heard from since this watcher started, not
        for one killed before."""
        beat = self._beats.get(info.incarnation)
        if beat is None:
            return False
        step = beat[1]
        if step is None:
            step = max((b[1] for b in self._beats.values() if b[1] is not None), default=None)
        return step is not None and self._now - beat[2] > SILENT_SAMPLES * step + SILENT_SLACK

    def _held_before(self, leader: LeaseState, info: NodeInfo) -> bool:
        """Whether ``leader``'s term was held before ``info``'s process registered: then an
        earlier process of that name holds it (a process registers before it competes for the
        lease, and every acquire makes a new term), its lease running out after a restart.

        Known when this observer read the term before that process registered, or when the
        node's own lease events in the store name the term and were stored before it
        registered (see :meth:`_judge_term`). The lease's row cannot tell: it holds the
        holder, the term and the expiry, not when the term was taken nor the ttl it runs on."""
        seen = self._term_seen
        if seen is not None and seen[0] == leader.term and seen[1] < info.started_at:
            return True
        return self._earlier_terms.get((leader.term, info.incarnation), False)

    async def _judge_term(self, leader: LeaseState) -> None:
        """Look up, once per term and process, whether the holder's newest process took the
        term it holds or an earlier process of its name did (see :meth:`_held_before`)."""
        rows = [info for info in self._node_rows if info.node == leader.holder]
        if len(rows) < 2:
            return  # no earlier process of that name is known: nobody else to hold it
        newest = max(rows, key=lambda info: info.started_at)
        key = (leader.term, newest.incarnation)
        seen = self._term_seen
        if key in self._earlier_terms or (seen is not None and seen[0] == leader.term and seen[1] < newest.started_at):
            return
        # a term named in the node's lease events stored before its newest process registered
        # was held before that process existed, so it is not that process's
        earlier = leader.term in await self.store.lease_terms_before(
            leader.holder, newest.started_at, _LEASE_EVENTS_LOOKED_AT
        )
        # one term at a time is looked at: the entries of terms gone are of no use
        self._earlier_terms = {k: v for k, v in self._earlier_terms.items() if k[0] == leader.term}
        self._earlier_terms[key] = earlier

    @property
    def leader(self) -> LeaseState | None:
        """The lease's holder and term at the last look, or None."""
        return self._leader

    @property
    def read_at(self) -> float | None:
        """The database's time of the last read of the nodes table that got through (None: none yet)."""
        return self._now or None

    def runs(self) -> list[StoredRun]:
        """The runs of the whole cluster the last read listed (see :meth:`_read_runs`), by
        their place in the queue, newest first."""
        return sorted(self._runs.values(), key=lambda r: r.seq, reverse=True)

    def record(self, run_id: str) -> StoredRun | None:
        return self._runs.get(run_id)

    # ------------------------------------------------------------------ acting on runs

    async def get(self, run_id: str) -> StoredRun:
        """A run's full record, from the store."""
        run = await self.store.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    async def cancel(self, run_id: str) -> StoredRun:
        """Cancel a pending run now, or ask the node running it to stop it (it is notified).

        Raises :class:`RunNotFound` or :class:`RunNotCancellable`; returns the record after.
        """
        result = await self.store.request_cancel(run_id, "user")
        if result.action == "finished":
            raise RunNotCancellable(run_id, result.run.status.value)
        self._keep(result.run)
        return result.run

    async def retry(self, run_id: str) -> StoredRun:
        """Queue a failed or cancelled run again with the same params and key (a new run, which
        any node that has its task claims), as :meth:`Engine.retry` does: while a run of the task
        with that key waits, that run comes back instead of a second one. Raises
        :class:`RunNotFound` or :class:`RunNotRetryable`.

        The nodes' ``max_queue`` is theirs: a dashboard that runs nothing does not know it,
        and a retry asked for by hand is not held to it."""
        old = await self.get(run_id)
        if old.status not in (RunStatus.FAILED, RunStatus.CANCELLED):
            raise RunNotRetryable(run_id, old.status.value)
        if old.source.startswith(_RUNS_ITS_OWN):
            raise RunNotRetryable(run_id, old.status.value, f"it was started by {old.source}, which runs it again itself")
        new = NewRun(old.task, dict(old.params), key=old.key, source=f"retry:{run_id}",
                     max_attempts=old.max_attempts, on_lost=old.on_lost)  # fmt: skip
        (inserted,) = await self.store.insert([new])
        record = await self.get(inserted.id)
        self._keep(record)
        return record

    # ------------------------------------------------------------------ reading the store

    async def refresh(self, runs: bool = True) -> None:
        """Read the nodes, the leader and (with ``runs``) the runs again, now."""
        await self._refresh(runs, lease_now=True)

    async def _refresh(self, runs: bool, *, lease_now: bool) -> None:
        """:meth:`refresh`; the lease is read only when due, unless ``lease_now``."""
        try:
            self._node_rows = await self.store.nodes()
        except Exception:
            # a failed read, not a cancel (the observer stopping): only that proves an outage
            self._read_failed = True
            raise
        self._now = self.store.clock()
        self._note_beats()
        if self._read_failed:
            self._read_failed = False
            self._answering_since = self._now
        if self._lease is not None and (lease_now or self._now >= self._lease_due):
            # each look opens a connection of its own (as the lease's operations do): every few seconds
            self._lease_due = self._now + _LEASE_INTERVAL
            try:
                leader = await self._lease.peek()
                if leader is not None and (self._term_seen is None or self._term_seen[0] != leader.term):
                    self._term_seen = (leader.term, self.store.clock())
                if leader is not None:
                    # before the holder is shown: a restarted process is never shown leading
                    # on its predecessor's term until the store is asked
                    try:
                        await self._judge_term(leader)
                    except (TaskwatchError, OSError) as exc:
                        log.debug("reading the lease's events failed: %r", exc)  # asked again at the next look
                self._leader = leader
                self._lease_seen = self._lease_seen or leader is not None
            except Exception as exc:  # noqa: BLE001 - the badge waits for the next look; the rest goes on
                log.debug("reading the lease failed: %r", exc)
        if runs:
            self._runs_stale = False
            await self._read_runs()

    async def _read_runs(self) -> None:
        """Read the runs again: the newest ``runs_limit`` submitted, every running one, the
        ``runs_limit`` that ended last and the newest ``runs_limit`` failures, whatever their
        place in the queue (in a backlog, a run starts and ends long after newer runs were
        submitted), and by id those listed before that have started and not ended (a run
        waiting for its next attempt) and the followed one (see :meth:`follow`). Each read is
        bounded by an index; a read that comes later holds the newer row of a run."""
        fresh: dict[str, StoredRun] = {}
        for batch in (
            (await self.store.query(limit=self.runs_limit)).runs,
            await self._running_runs(),
            await self.store.recently_finished(self.runs_limit),
            (await self.store.query(status=RunStatus.FAILED.value, limit=self.runs_limit)).runs,
        ):
            fresh.update((r.id, r) for r in batch)
        old = self._runs
        # a running run the reads left out stopped running, unless the bound on them left it out
        every_running = self.running_unlisted == 0
        carried = [run_id for run_id, r in old.items() if run_id not in fresh and (
                   (r.status is RunStatus.RUNNING and every_running)
                   or (r.status is RunStatus.PENDING and r.started_at is not None))][: self.runs_limit]  # fmt: skip
        if self._followed is not None and self._followed not in fresh:
            carried.append(self._followed)
        if carried:
            for run_id, r in (await self.store.get_many(carried)).items():
                # a run that ended and is no longer among those that ended last goes (unless followed)
                if not r.status.finished or run_id == self._followed:
                    fresh[run_id] = r
        self._progress_seen = {run_id: seen for run_id, seen in self._progress_seen.items()
                               if (now := fresh.get(run_id)) is not None and not now.status.finished}  # fmt: skip
        # unchanged rows keep their object, so a table diffing by identity skips them
        self._runs = {run_id: self._merged(old.get(run_id), r) for run_id, r in fresh.items()}
        self.runs_changes += 1

    def _merged(self, old: StoredRun | None, new: StoredRun) -> StoredRun:
        """``new`` (a run read again), with the progress its events told since when that is
        newer: a running run's row holds the progress its node's last heartbeat wrote, and
        its progress events come as it goes (while they come: not when they were missed,
        whose resync forgets them, or while the relay is cut off)."""
        seen = self._progress_seen.get(new.id)
        told = None if seen is None or seen[0] != new.attempt else seen[1]
        if told is not None and new.status is RunStatus.RUNNING and new.progress != told and self.relay.connected:
            new = new.model_copy(update={"progress": told})
        return old if old == new and old is not None else new

    def follow(self, run_id: str | None) -> None:
        """Keep ``run_id`` current whether or not the reads list it (a run's open detail),
        read by id with the others; None: none. A run not listed yet is read at once."""
        if run_id == self._followed:
            return
        self._followed = run_id
        if run_id is not None and run_id not in self._runs:
            self._runs_stale = True
            self._poke.set()

    async def _running_runs(self) -> list[StoredRun]:
        """Every running run, however many, a page at a time, up to ``running_limit`` (those
        beyond it, counted by the store, are :attr:`running_unlisted`)."""
        out: list[StoredRun] = []
        before: str | None = None
        while True:
            want = min(_RUNNING_PAGE, self.running_limit - len(out))
            page = await self.store.query(status=RunStatus.RUNNING.value, limit=want, before=before)
            out += page.runs
            if page.next is None:
                self.running_unlisted = 0
                return out
            if len(out) >= self.running_limit:
                counts = await self.store.counts()
                self.running_unlisted = max(0, counts.running - len(out))
                return out
            before = page.next

    def _keep(self, record: StoredRun) -> None:
        self._runs[record.id] = record
        self.runs_changes += 1
        self._runs_stale = True
        self._poke.set()

    def _on_event(self, event: Any) -> None:
        kind: str = event.kind
        if kind == "bus.dropped":
            # events were missed: what the runs show may be wrong until read again, and the
            # progress events kept may not be the newest
            self.resyncs += 1
            self._progress_seen.clear()
        elif kind == "run.progress":
            run = self._runs.get(event.run_id)
            if run is None:
                return
            # the attempt its run.started named: the row read before it may still show the last one
            before = self._progress_seen.get(run.id)
            attempt = run.attempt if before is None else before[0]
            progress = Progress(done=event.done, total=event.total, message=event.message)
            self._progress_seen[run.id] = (attempt, progress)
            if run.status is RunStatus.RUNNING and run.attempt == attempt:
                self._runs[run.id] = run.model_copy(update={"progress": progress})
                self.runs_changes += 1
            return
        elif kind == "run.started":
            # another attempt: its progress is its own, the last attempt's events say nothing of it
            self._progress_seen[event.run_id] = (event.attempt, None)
        elif kind in ("run.retrying", "run.recovered"):
            self._progress_seen.pop(event.run_id, None)
        elif kind in ("lease.acquired", "lease.released", "lease.lost"):
            # a node took the lease, or let it go: the badge reads who leads at the next look
            # (not on each renew, which changes no holder: each read opens a connection)
            self._lease_due = -math.inf
            self._poke.set()
            return
        elif not kind.startswith("run."):
            return
        self._runs_stale = True
        self._poke.set()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        runs_due = loop.time() + self.runs_interval
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.refresh_interval):
                    await self._poke.wait()
            self._poke.clear()
            now = loop.time()
            read_runs = self._runs_stale or now >= runs_due
            try:
                await self._refresh(read_runs, lease_now=False)
                self.last_error = None
            except (TaskwatchError, OSError) as exc:
                self.errors += 1
                self.last_error = str(exc)
                log.warning("reading the cluster's state failed: %s", exc)
            if read_runs:
                runs_due = now + self.runs_interval
            await asyncio.sleep(_MIN_GAP)
