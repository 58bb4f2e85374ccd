"""The dashboard's model of an engine, rebuilt from a snapshot and kept current by events.

Pure Python (no Textual): the app applies batches of events here between
redraws, then asks what changed. Runs are bounded: the oldest finished runs
leave first, as in the engine's own history.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from itertools import islice
from typing import Any

from taskwatch.engine import (
    BaseEvent,
    EngineStats,
    Leadership,
    PeriodicInfo,
    Progress,
    QueueInfo,
    RunError,
    RunRecord,
    RunStatus,
    Snapshot,
    TaskInfo,
    TriggerState,
    WorkerInfo,
)
from taskwatch.engine.events import HealthSample
from taskwatch.engine.trusted import construct

from .task_stats import TaskStatsBook

_FINISHED = {RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED}


def _finish_order(view: RunView) -> tuple[float, float]:
    return (view.finished_at or view.created_at, view.created_at)

#: the events of a run after its submission: each makes a run the model does not know yet
#: known from then on (see :meth:`DashboardState._first_seen`)
_LATER_RUN_EVENTS = frozenset(
    {"run.started", "run.progress", "run.retrying", "run.succeeded", "run.failed", "run.cancelled", "run.recovered"}
)

#: runs the model keeps (finished ones; pending and running ones always stay)
DEFAULT_MAX_RUNS = 2_000


def _status_move(kind: str, e: Any, known: str | None) -> tuple[str | None, str] | None:
    """The status change (from, to) a run event makes, as the engine counts it: from the
    status the dashboard knew the run in (``known``), else the one the event implies."""
    if kind == "run.submitted":
        return (None, "pending")
    if kind == "run.started":
        move: tuple[str | None, str] = (known or "pending", "running")
    elif kind == "run.retrying" or (kind == "run.recovered" and e.action == "requeued"):
        move = (known or "running", "pending")
    elif kind in ("run.succeeded", "run.failed"):
        move = (known or "running", kind.removeprefix("run."))
    elif kind == "run.cancelled":
        move = (known or ("running" if e.was_running else "pending"), "cancelled")
    else:
        return None  # progress; a recovery that fails or cancels the run has its own event
    return None if move[0] == move[1] else move


class DashboardState:
    """Everything the dashboard shows, as plain data."""

    def __init__(
        self, max_runs: int = DEFAULT_MAX_RUNS, max_worker_crashes: int = 200, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_runs = max_runs
        self.clock = clock
        self.node_id = ""
        self.version = ""
        self.started_at: float | None = None
        self.engine_state = "unknown"
        #: where the engine keeps its runs, and which start of its process this is
        self.store = ""
        self.incarnation = ""
        #: the engine's counters at the last snapshot (totals since it started, rates)
        self.stats: EngineStats | None = None
        #: (our clock, runs finished in total) at each snapshot: the finish rate
        self._finished_samples: deque[tuple[float, int]] = deque(maxlen=11)
        self.runs: dict[str, RunView] = {}
        #: finished runs, oldest finish first (an entry whose run is unfinished again, a retry,
        #: stays until a trim finds it): only these are trimmed, so however many runs wait,
        #: the newest ``max_runs`` finished ones stay to be seen
        self._finished: dict[str, None] = {}
        self.tasks: list[TaskInfo] = []
        self.schedule: list[PeriodicInfo] = []
        self.queues: list[QueueInfo] = []
        self.triggers: list[TriggerState] = []
        self.workers: list[WorkerInfo] = []
        self.leadership: Leadership | None = None
        #: runs by status and, finished since the engine started, by outcome: the last
        #: snapshot's counts moved on by the run events after it (they also come once the
        #: engine can no longer be asked: stopping, stopped, or the connection gone)
        self.by_status: dict[str, int] = {}
        self.finished_totals: dict[str, int] | None = None
        #: the ``last_seq`` of the snapshot the counts were taken from: events up to it are in them
        self._counted_seq = 0
        #: the status moves (seq, from, to) of events after it: the next snapshot may have been
        #: taken before some of them, which are then moved on it again
        self._moves: deque[tuple[int, str | None, str]] = deque(maxlen=100_000)
        self.last_seq = 0
        self.events_applied = 0
        #: events the engine's bus or our client dropped before we saw them
        self.dropped = 0
        #: run ids changed since the widgets last looked
        self.dirty: set[str] = set()
        #: run ids trimmed away since the widgets last looked (their rows must go too)
        self.gone: set[str] = set()
        self.health: deque[HealthSample] = deque(maxlen=600)
        #: the newest failed runs, kept apart so a backlog of other runs never pushes them out
        self.failures: dict[str, RunRecord] = {}
        self.max_failures = 200
        self.worker_crashes: deque[Any] = deque(maxlen=max_worker_crashes)
        self.needs_resync = False
        #: per-task figures from the runs seen since the first snapshot
        self.task_stats = TaskStatsBook()
        #: runs first heard of after their submission, whose full records nobody asked for yet
        self.partial: dict[str, None] = {}

    # ------------------------------------------------------------------ snapshot

    def load(self, snap: Snapshot, keep: Collection[str] = ()) -> None:
        """Replace what we know with a fresh snapshot (first connect, or after drops).

        Reloading the same engine process (node and incarnation), the runs in ``keep``
        (the ones the user chose) stay known when the snapshot, which holds only the newest
        runs, leaves them out, and so do the failures collected so far.
        """
        same = bool(self.node_id) and (snap.node_id, snap.incarnation) == (self.node_id, self.incarnation)
        self.node_id = snap.node_id
        self.version = snap.version
        self.started_at = snap.started_at
        self.engine_state = snap.state
        self.store = snap.store
        self.incarnation = snap.incarnation
        previous = self.runs
        views = [RunView.of(r) for r in snap.runs]
        if same:
            listed = {view.id for view in views}
            views += [previous[run_id] for run_id in keep if run_id in previous and run_id not in listed]
        self.runs = {view.id: view for view in sorted(views, key=lambda v: v.created_at)}
        self._finished = {
            view.id: None for view in sorted(self.runs.values(), key=_finish_order) if view.status in _FINISHED
        }
        for run_id, view in self.runs.items():
            # what we saw of a run's attempts outlives a reload (the snapshot has only the last)
            before = previous.get(run_id)
            if before is not None and before is not view and before.attempts:
                view.attempts = before.attempts
        self.dirty = set(self.runs)
        self.gone = set()
        if not same:
            # another engine process: its failures are not these, and its total of finished
            # runs counts from its own start (the rate's window begins at this snapshot)
            self.failures = {}
            self._finished_samples.clear()
        self._moves.clear()  # the snapshot holds every event before it; none after it was applied
        self.add_failures(view.record() for view in self.runs.values() if view.status is RunStatus.FAILED)
        self.apply_overview(snap)
        self.last_seq = snap.last_seq
        self.needs_resync = False
        # the first snapshot's runs, and, in a later one, what dropped events kept from the figures
        self.task_stats.seed(snap.runs, self.clock())
        self._trim(keep)

    def apply_overview(self, snap: Snapshot) -> None:
        """Take the query-method parts of a snapshot: schedule, queues, triggers, workers, leader."""
        self.tasks = snap.tasks
        self.schedule = snap.schedule
        self.queues = snap.queues
        self.triggers = snap.triggers
        self.workers = snap.workers
        self.leadership = snap.leadership
        self.by_status = dict(snap.stats.by_status)
        self.stats = snap.stats
        self.finished_totals = {
            "succeeded": snap.stats.succeeded_total,
            "failed": snap.stats.failed_total,
            "cancelled": snap.stats.cancelled_total,
        }
        self._counted_seq = snap.last_seq
        moves = self._moves
        while moves and moves[0][0] <= snap.last_seq:
            moves.popleft()
        for _, old, new in moves:
            self._move_count(old, new)
        self._finished_samples.append((self.clock(), snap.stats.finished_total))
        self.engine_state = snap.state

    # ------------------------------------------------------------------ events

    def apply(self, events: list[BaseEvent], keep: Collection[str] = ()) -> None:
        """Absorb events; ``keep``: runs the trim must spare (the ones the user chose to act on)."""
        for event in events:
            self._apply_one(event)
        if len(self._finished) > self.max_runs:
            self._trim(keep)

    def _apply_one(self, event: BaseEvent) -> None:
        kind: str = event.kind
        if kind == "bus.dropped":
            self.dropped += event.count  # type: ignore[attr-defined]
            self.needs_resync = True
            return
        if event.seq and event.seq <= self.last_seq:
            return  # already part of the snapshot we loaded
        self.last_seq = max(self.last_seq, event.seq)
        self.events_applied += 1
        if kind.startswith("run."):
            self._apply_run(kind, event)
        elif kind == "health":
            self.health.append(event)  # type: ignore[arg-type]
        elif kind.startswith("lease."):
            self._apply_lease(kind, event)
        elif kind == "worker.crashed":
            self.worker_crashes.append(event)
        elif kind in ("engine.stopping", "engine.stopped", "engine.started"):
            self.engine_state = {"engine.stopping": "stopping", "engine.stopped": "stopped"}.get(kind, "running")
            if kind == "engine.started":
                self.started_at = event.ts
            elif kind == "engine.stopped" and self.store == "memory":
                self._ended_by_stop(event.ts)

    def _ended_by_stop(self, ts: float) -> None:
        """A memory store's engine has stopped: every run of it not finished ended cancelled
        (shutdown), each with an event before this one. A run still pending or running here
        lost its event (a connection's buffer overflowing at the stop's burst, with no snapshot
        to be had from a stopped engine): it is shown as the engine ended it, not as waiting for
        good, and so are the counts."""
        for run in self.runs.values():
            if not run.status.finished:
                if run.status is RunStatus.RUNNING:
                    run.end_attempt(run.attempt, ts, "cancelled", note="reason: shutdown")
                run.status = RunStatus.CANCELLED
                run.cancel_reason = "shutdown"
                run.finished_at = ts
                self.dirty.add(run.id)
                self._finished[run.id] = None
        counts = self.by_status
        left = counts.get("pending", 0) + counts.get("running", 0)
        if left:
            counts["pending"] = counts["running"] = 0
            counts["cancelled"] = counts.get("cancelled", 0) + left
            if self.finished_totals is not None:
                self.finished_totals["cancelled"] = self.finished_totals.get("cancelled", 0) + left

    def _apply_run(self, kind: str, e: Any) -> None:
        self.task_stats.on_event(kind, e)
        run_id = e.run_id
        self._count_run_event(kind, e, self.runs.get(run_id))
        if kind == "run.submitted":
            self.runs[run_id] = RunView(run_id, e.task, e.params, e.max_attempts, e.ts, e.key, e.source)
            self.dirty.add(run_id)
            return
        run = self.runs.get(run_id)
        if run is None:
            if kind not in _LATER_RUN_EVENTS:
                return
            run = self._first_seen(kind, e)
        if kind == "run.started":
            if run.status is not RunStatus.RUNNING or run.attempt != e.attempt:
                # progress is an attempt's own, as in the engine's record: the next attempt
                # starts with none. (Not a second word of the same start: another node that
                # read it from the store tells it too, after the attempt's progress maybe)
                run.progress = (0, None, "")
            run.status = RunStatus.RUNNING
            run.attempt = e.attempt
            run.started_at = e.ts
            run.finished_at = None
            if not e.from_store:
                # the node that started it (one that read the start from the store publishes an
                # event of its own, under its own name: the node is then left to the next snapshot)
                run.node = _shared(e.node or None)
            run.add_attempt(AttemptLog(e.attempt, e.ts))
        elif kind == "run.progress":
            run.progress = (e.done, e.total, e.message)
        elif kind == "run.retrying":
            run.status = RunStatus.PENDING
            run.attempt = e.attempt
            if e.max_attempts is not None:
                run.max_attempts = e.max_attempts  # a stop's hand-back adds one
            run.error = e.error
            run.node = None  # waiting again: no node holds it (as the engine's record says)
            run.end_attempt(e.attempt - 1, e.ts, "retried", error=e.error, note=f"retry in {fmt_seconds(e.delay)}")
        elif kind == "run.succeeded":
            run.status = RunStatus.SUCCEEDED
            run.result = e.result
            run.finished_at = e.ts
            # (a success after retries keeps its last failed attempt's error, as the engine's record does)
            run.end_attempt(e.attempt, e.ts, "succeeded", duration=e.duration)
        elif kind == "run.failed":
            run.status = RunStatus.FAILED
            run.error = e.error
            run.finished_at = e.ts
            self._remember_failure(run)
            run.end_attempt(e.attempt, e.ts, "failed", error=e.error, duration=e.duration)
        elif kind == "run.cancelled":
            run.status = RunStatus.CANCELLED
            run.cancel_reason = e.reason
            run.finished_at = e.ts
            if e.was_running:
                run.end_attempt(e.attempt, e.ts, "cancelled", note=f"reason: {e.reason}")
        elif kind == "run.recovered":
            # a lost worker's run: pending again with a new attempt (failed and cancelled
            # ones also get their own finished event)
            lost = e.attempt - 1 if e.action == "requeued" else e.attempt
            recovery = f"{e.action} by recovery ({e.reason})"
            run.end_attempt(lost, e.ts, "lost", recovery=recovery, lost_on=e.from_node)
            run.attempt = e.attempt
            if e.action == "requeued":
                run.status = RunStatus.PENDING
                run.finished_at = None
                run.node = None
        else:
            return
        self.dirty.add(run_id)
        if run.status in _FINISHED:
            finished = self._finished
            finished.pop(run_id, None)  # (a second finish, after a retry: newest again)
            finished[run_id] = None

    def _first_seen(self, kind: str, e: Any) -> RunView:
        """A run heard of only after its submission: say one queued before the snapshot's
        newest runs (which that snapshot leaves out while it waits) that starts, fails or is
        cancelled now. Known from here on, as the event tells it, so that it is listed, and
        can be cancelled or retried, like any other; what the event does not carry (params,
        submit time, key) comes with its record (see :meth:`fill`), so it is placed among
        the oldest runs meanwhile, where that record will most likely put it."""
        oldest = next(iter(self.runs.values()), None)
        created = e.ts if oldest is None else min(e.ts, oldest.created_at)
        attempt = getattr(e, "attempt", 1)
        run = RunView(e.run_id, e.task, {}, attempt, created, None, "submit")
        # progress and a recovery come from a run under way; the other events set the status
        run.status = RunStatus.RUNNING
        run.attempt = attempt
        duration = getattr(e, "duration", 0.0)
        if kind in ("run.succeeded", "run.failed") and duration:
            run.started_at = e.ts - duration
        run.partial = True
        self.runs[run.id] = run
        self.partial[run.id] = None
        # (the Tasks tab's figures count it as submitted when first heard of: see TaskStatsBook)
        return run

    def take_partial(self) -> list[str]:
        """The runs first heard of since the last call, whose records the app is to fetch."""
        partial, self.partial = list(self.partial), {}
        return partial

    def is_partial(self, run_id: str) -> bool:
        """Whether the run is known only from its events after its submission (no params yet)."""
        run = self.runs.get(run_id)
        return run is not None and run.partial

    def fill(self, record: RunRecord) -> None:
        """Complete a run first heard of after its submission with its record: what no event
        carried. Its status and the rest stay as its events told them (newer, maybe)."""
        run = self.runs.get(record.id)
        if run is None or not run.partial:
            return
        run.partial = False
        run.params = record.params or _NO_PARAMS
        run.max_attempts = max(record.max_attempts, run.attempt)
        run.created_at = record.created_at
        run.key = record.key
        run.source = _name(record.source)
        if run.started_at is None:
            run.started_at = record.started_at
        if run.node is None:
            run.node = _shared(record.node)
        self.dirty.add(run.id)
        if run.id in self.failures:
            self.failures[run.id] = run.record()

    def _count_run_event(self, kind: str, e: Any, run: RunView | None) -> None:
        """Move the counts on by a run event the last snapshot's counts do not hold yet."""
        if self.finished_totals is None or (e.seq and e.seq <= self._counted_seq):
            return
        move = _status_move(kind, e, None if run is None else run.status.value)
        if move is None:
            return
        if e.seq:
            self._moves.append((e.seq, *move))
        self._move_count(*move)

    def _move_count(self, old: str | None, new: str) -> None:
        counts = self.by_status
        if old is not None and counts.get(old, 0) > 0:
            counts[old] -= 1
        counts[new] = counts.get(new, 0) + 1
        totals = self.finished_totals
        if totals is not None and new in totals:
            totals[new] += 1

    def _apply_lease(self, kind: str, e: Any) -> None:
        mine = e.node == self.node_id
        lead = self.leadership
        if not mine or lead is None:
            return
        is_leader = kind in ("lease.acquired", "lease.renewed")
        # after lease.lost or lease.released this node no longer leads, and who does is
        # unknown until the next overview says (the event names no other holder)
        holder = e.holder if is_leader or e.holder != self.node_id else None
        self.leadership = lead.model_copy(
            update={"is_leader": is_leader, "holder": holder, "term": e.term, "expires_at": e.expires_at}
        )

    # ------------------------------------------------------------------ queries for widgets

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def take_gone(self) -> set[str]:
        gone, self.gone = self.gone, set()
        return gone

    def record(self, run_id: str | None) -> RunRecord | None:
        """The run as a :class:`RunRecord` (what widgets take), or None if unknown."""
        run = self.runs.get(run_id) if run_id is not None else None
        return run.record() if run is not None else None

    def add_record(self, record: RunRecord) -> None:
        """Learn of a run from a command's reply (its events may not have arrived yet)."""
        if record.id not in self.runs:
            self.runs[record.id] = RunView.of(record)
            self.dirty.add(record.id)
            if record.status in _FINISHED:
                self._finished[record.id] = None

    def attempts(self, run_id: str | None) -> list[dict[str, Any]] | None:
        """What the dashboard saw of a run's attempts, oldest first, as the fields of
        ``taskwatch.widgets.RunAttempt`` (None: nothing seen)."""
        run = self.runs.get(run_id) if run_id is not None else None
        if run is None or not run.attempts:
            return None
        return [log.fields() for log in run.attempts]

    def newest_views(self, limit: int) -> list[RunView]:
        out: list[RunView] = []
        for run in reversed(self.runs.values()):
            out.append(run)
            if len(out) >= limit:
                break
        return out

    def views_to_show(self, limit: int, keep: Collection[str] = ()) -> list[RunView]:
        """The newest ``limit`` runs and, however old, every pending or running one and those
        in ``keep``: a run that has not finished must stay in sight, to be found and
        cancelled, and one the user chose, to be acted on."""
        out = self.newest_views(limit)
        older = len(self.runs) - len(out)
        if older > 0:
            out.extend(
                view for view in islice(self.runs.values(), older) if view.status not in _FINISHED or view.id in keep
            )
        return out

    def newest_runs(self, limit: int) -> list[RunRecord]:
        out: list[RunRecord] = []
        for run in reversed(self.runs.values()):
            out.append(run.record())
            if len(out) >= limit:
                break
        return out

    def _remember_failure(self, view: RunView) -> None:
        self.failures[view.id] = view.record()
        while len(self.failures) > self.max_failures:
            del self.failures[next(iter(self.failures))]

    def add_failures(self, records: Iterable[RunRecord]) -> None:
        """Take failed runs from a snapshot or a query (older than the runs held, maybe):
        kept oldest first by submission, the newest ``max_failures`` of them. A run retried
        or deleted since is no failure any more only once its events say so."""
        merged = dict(self.failures)
        for record in records:
            if record.status is RunStatus.FAILED:
                merged[record.id] = record
        ordered = sorted(merged.values(), key=lambda r: (r.created_at, r.id))
        self.failures = {r.id: r for r in ordered[-self.max_failures :]}

    def failure(self, run_id: str) -> RunRecord | None:
        """A failed run, from the runs or from the failures kept apart."""
        return self.record(run_id) or self.failures.get(run_id)

    def failed_runs(self, limit: int = 200) -> list[RunRecord]:
        """The newest failed runs first (kept even when the runs themselves were trimmed)."""
        return list(reversed(self.failures.values()))[:limit]

    def totals(self) -> dict[str, int] | None:
        """Finished runs by status since the engine started (not only those its history keeps)."""
        return None if self.finished_totals is None else dict(self.finished_totals)

    def finish_rate(self) -> float | None:
        """Runs finished per second over the last snapshots (about ten seconds of them);
        None until two snapshots some time apart were taken."""
        samples = self._finished_samples
        if len(samples) < 2:
            return None
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        if t1 <= t0 or n1 < n0:  # no time passed, or another engine process now
            return None
        return (n1 - n0) / (t1 - t0)

    def counts(self) -> dict[str, int]:
        counts = {s.value: 0 for s in RunStatus}
        for run in self.runs.values():
            counts[run.status.value] += 1
        return counts

    def latest_health(self) -> HealthSample | None:
        return self.health[-1] if self.health else None

    def task_info(self, name: str) -> TaskInfo | None:
        for info in self.tasks:
            if info.name == name:
                return info
        return None

    def crash_error(self, name: str) -> RunError | None:
        for crash in reversed(self.worker_crashes):
            if crash.name == name:
                return crash.error
        return None

    def _trim(self, keep: Collection[str] = ()) -> None:
        """Let the oldest finished runs go, down to the newest ``max_runs`` of them. Pending
        and running runs stay (counted apart: a queue of thousands must not push every
        finished run out the moment it finishes), and so do the ones kept (selected or
        marked: an action on them must find them)."""
        finished = self._finished
        excess = len(finished) - self.max_runs
        if excess <= 0:
            return
        runs = self.runs
        for run_id in list(finished):
            if excess <= 0:
                break
            view = runs.get(run_id)
            if view is None or view.status not in _FINISHED:
                del finished[run_id]  # gone with a reload, or retried since: not finished now
                excess -= 1
                continue
            if run_id in keep:
                continue
            del finished[run_id]
            del runs[run_id]
            self.dirty.discard(run_id)
            self.gone.add(run_id)
            excess -= 1

    def uptime(self, now: float | None = None) -> float | None:
        if self.started_at is None:
            return None
        return (now or time.time()) - self.started_at


def fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 60 else f"{seconds / 60:.1f}min"


class AttemptLog:
    """One attempt of a run as its events told it (mutable while the attempt goes on)."""

    __slots__ = ("number", "started_at", "ended_at", "outcome", "error", "note", "recovery", "lost_on")

    def __init__(self, number: int, started_at: float | None) -> None:
        self.number = number
        self.started_at = started_at
        self.ended_at: float | None = None
        self.outcome = "running"
        self.error: RunError | None = None
        self.note = ""
        self.recovery = ""
        self.lost_on: str | None = None

    def fields(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


#: the params of a run that has none, shared by all of them: a deep queue of runs without
#: params would otherwise hold an empty dict each (nothing here changes a record's params)
_NO_PARAMS: dict[str, Any] = {}
#: the progress of a run that reported none (frozen, so one instance serves every record)
_NO_PROGRESS = Progress()
_NO_PROGRESS_SEEN: tuple[float, float | None, str] = (0, None, "")
#: the fields set of every record built here: each is given every field (see ``construct``)
_RECORD_FIELDS = set(RunRecord.model_fields)


def _name(text: str) -> str:
    """``text`` as the one string object of its value: a remote engine's events bring every
    run its own copy of its task's, source's and node's names, which a deep queue would keep
    once per run (interned strings no run names any more are freed)."""
    return sys.intern(text) if type(text) is str else text


def _shared(text: str | None) -> str | None:
    return None if text is None else _name(text)


class RunView:
    """One run as the dashboard knows it: mutated in place by events, turned into a
    :class:`RunRecord` only when asked (and not kept: a deep queue of waiting runs would
    hold a model each), so absorbing an event costs attribute writes, not a model copy."""

    __slots__ = (
        "id", "task", "params", "status", "attempt", "max_attempts", "created_at", "started_at",
        "finished_at", "progress", "result", "error", "key", "source", "cancel_reason",
        "attempts", "node", "partial",
    )

    def __init__(
        self,
        run_id: str,
        task: str,
        params: dict[str, Any],
        max_attempts: int,
        created_at: float,
        key: str | None,
        source: str,
    ) -> None:
        self.id = run_id
        self.task = _name(task)
        self.params = params or _NO_PARAMS
        self.status = RunStatus.PENDING
        self.attempt = 1
        self.max_attempts = max_attempts
        self.created_at = created_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.progress: tuple[float, float | None, str] = _NO_PROGRESS_SEEN
        self.result: Any = None
        self.error: RunError | None = None
        self.key = key
        self.source = _name(source)
        self.cancel_reason: str | None = None
        #: the attempts seen through events (none for a run known only from a snapshot, nor
        #: for one still waiting: an empty tuple until the first, not a list per run)
        self.attempts: list[AttemptLog] | tuple[()] = ()
        #: the node running it, or the one that ran its last attempt
        self.node: str | None = None
        #: known only from events after its submission: params, key, source and submit time
        #: are stand-ins until its record fills them in
        self.partial = False

    def add_attempt(self, log: AttemptLog) -> list[AttemptLog]:
        attempts = self.attempts
        if isinstance(attempts, tuple):
            attempts = self.attempts = []
        attempts.append(log)
        return attempts

    def end_attempt(
        self,
        number: int,
        ts: float,
        outcome: str,
        *,
        error: RunError | None = None,
        note: str = "",
        duration: float | None = None,
        recovery: str = "",
        lost_on: str | None = None,
    ) -> None:
        """Close attempt ``number`` (adding it if its start was never seen). A recovery
        note stays when the run's own finished event follows it."""
        log = next((a for a in reversed(self.attempts) if a.number == number), None)
        if log is None:
            started = ts - duration if duration is not None else None
            log = AttemptLog(number, started)
            self.add_attempt(log).sort(key=lambda a: a.number)
        log.ended_at = ts
        log.outcome = outcome
        log.error = error
        log.note = note
        if recovery:
            log.recovery = recovery
        if lost_on:
            log.lost_on = lost_on

    @classmethod
    def of(cls, record: RunRecord) -> RunView:
        view = cls(
            record.id, record.task, record.params, record.max_attempts, record.created_at,
            record.key, record.source,
        )
        view.status = record.status
        view.attempt = record.attempt
        view.started_at = record.started_at
        view.finished_at = record.finished_at
        progress = record.progress
        if progress.done or progress.total is not None or progress.message:
            view.progress = (progress.done, progress.total, progress.message)
        view.result = record.result
        view.error = record.error
        view.cancel_reason = record.cancel_reason
        view.node = _shared(record.node)
        return view

    def record(self) -> RunRecord:
        """The run as a :class:`RunRecord`, built now (each call gives a new one)."""
        progress = self.progress
        return construct(
            RunRecord,
            {
                "id": self.id,
                "task": self.task,
                "params": self.params,
                "status": self.status,
                "attempt": self.attempt,
                "max_attempts": self.max_attempts,
                "created_at": self.created_at,
                "started_at": self.started_at,
                "finished_at": self.finished_at,
                "progress": _NO_PROGRESS if progress == _NO_PROGRESS_SEEN else Progress(
                    done=progress[0], total=progress[1], message=progress[2]
                ),
                "result": self.result,
                "error": self.error,
                "key": self.key,
                "source": self.source,
                "cancel_reason": self.cancel_reason,
                "node": self.node,
            },
            _RECORD_FIELDS,
        )
