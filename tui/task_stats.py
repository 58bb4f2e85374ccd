"""Per-task statistics built from the run events the dashboard receives.

Pure Python (no Textual): counts of submitted, succeeded, failed and
cancelled runs per task, the durations of its recent finished runs (for p50
and p95), its last failure, and its failures grouped by exception type. The
figures cover what this dashboard has seen since ``since`` (its first
snapshot's finished runs included), which it says on screen; each later
snapshot corrects them for the runs it lists (see :class:`TaskStatsBook`).
"""

from __future__ import annotations

from collections import Counter, deque
from typing import Any

from taskwatch.engine import RunRecord, RunStatus


def percentile(ordered: list[float], fraction: float) -> float | None:
    """The nearest-rank percentile of already sorted values (None when there are none)."""
    if not ordered:
        return None
    rank = max(1, -(-len(ordered) * fraction // 1))  # ceil, at least the first value
    return ordered[int(rank) - 1]


class TaskTally:
    """One task's counters."""

    __slots__ = ("task", "submitted", "succeeded", "failed", "cancelled", "retried", "durations",
                 "last_failure_at", "last_failure", "errors")

    def __init__(self, task: str, keep_durations: int) -> None:
        self.task = task
        self.submitted = 0
        self.succeeded = 0
        self.failed = 0
        self.cancelled = 0
        self.retried = 0
        self.durations: deque[float] = deque(maxlen=keep_durations)
        self.last_failure_at: float | None = None
        self.last_failure = ""
        #: failures by exception type, newest counts included
        self.errors: Counter[str] = Counter()

    def fields(self) -> dict[str, Any]:
        """The figures as the fields of ``taskwatch.widgets.TaskStats``."""
        finished = self.succeeded + self.failed
        ordered = sorted(self.durations)
        return {
            "task": self.task,
            "submitted": self.submitted,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "retried": self.retried,
            "failure_rate": (self.failed / finished) if finished else None,
            "p50": percentile(ordered, 0.50),
            "p95": percentile(ordered, 0.95),
            "last_failure_at": self.last_failure_at,
            "last_failure": self.last_failure,
            "errors": dict(self.errors.most_common()),
        }


class TaskStatsBook:
    """Every task's tally, fed one run event at a time, and corrected from each snapshot the
    dashboard reloads (after dropped events, or a reconnect).

    It remembers which runs it counted, and whether their end too: a later snapshot's runs
    that it never heard of are counted then, and the ends it missed of the runs it did. Runs
    whose events were dropped and that no snapshot lists stay missing (or unfinished): the
    app says so beside the figures. Of the runs that ended, the last ``remember`` are
    remembered; a snapshot's run submitted before those let go is taken as counted. Every
    run not ended is remembered (about 100 bytes each, beside the few KB the dashboard's
    model keeps of a waiting run): one let go would be counted as submitted again when
    heard of again, however deep the queue. A run whose end was dropped stays so until a
    snapshot lists it ended.

    Which tasks' figures changed is kept too (:meth:`take_changed`): a dashboard with
    thousands of tasks redraws the few that moved, not every one.
    """

    def __init__(self, keep_durations: int = 1_000, remember: int = 20_000) -> None:
        self.keep_durations = keep_durations
        self.remember = remember
        self.tallies: dict[str, TaskTally] = {}
        #: when the figures start (the first snapshot's time, or the first event's)
        self.since: float | None = None
        #: something shown changed (a task's figures, or ``since``) since :meth:`take_changed`
        self.changed = False
        #: the tasks whose figures changed since :meth:`take_changed`
        self._changed_tasks: set[str] = set()
        #: runs counted as submitted that have not ended, oldest first: id -> (the attempt last
        #: known, when it was submitted or first heard of), or only the time while the attempt
        #: is the first (a deep queue's waiting runs are each here: a tuple apiece adds up)
        self._open: dict[str, tuple[int, float] | float] = {}
        #: runs whose end is counted, oldest first: id -> when it was submitted (or first heard of)
        self._ended: dict[str, float] = {}
        #: the latest submit time among the ended runs let go (None: none was)
        self._forgotten_upto: float | None = None

    def _tally(self, task: str) -> TaskTally:
        tally = self.tallies.get(task)
        if tally is None:
            tally = self.tallies[task] = TaskTally(task, self.keep_durations)
            self._touch(task)  # a row to show, even before a figure in it moves
        return tally

    def _touch(self, task: str) -> None:
        self.changed = True
        self._changed_tasks.add(task)

    def take_changed(self) -> list[str]:
        """The tasks whose figures changed since the last call (all of them the first time),
        by name; ``changed`` is False again."""
        changed = sorted(self._changed_tasks)
        self._changed_tasks.clear()
        self.changed = False
        return changed

    def row(self, task: str) -> dict[str, Any]:
        """One task's figures (see :meth:`TaskTally.fields`)."""
        return self.tallies[task].fields()

    def seed(self, runs: list[RunRecord], now: float) -> None:
        """Count a snapshot's runs: all of them the first time; later, those not counted yet
        and the ends not counted yet (their events were dropped, or came while disconnected)."""
        if self.since is None:
            self.since = min((r.created_at for r in runs), default=now)
            self.changed = True
        for record in runs:
            self._reconcile(record)

    def _reconcile(self, record: RunRecord) -> None:
        run_id = record.id
        if run_id in self._ended:
            return
        known = self._open_run(run_id)
        if known is None:
            forgotten = self._forgotten_upto
            if forgotten is not None and record.created_at <= forgotten:
                return  # may be one of the ended runs let go: counted already
            self._tally(record.task).submitted += 1
            known = self._opened(run_id, 1, record.created_at)
            self._touch(record.task)
        tally = self._tally(record.task)
        attempt, submitted_at = known
        if record.attempt > attempt:
            # attempts whose retry (or recovery) events it missed
            tally.retried += record.attempt - attempt
            self._opened(run_id, record.attempt, submitted_at)
            self._touch(record.task)
        if not record.status.finished:
            return
        if record.status is RunStatus.SUCCEEDED:
            tally.succeeded += 1
        elif record.status is RunStatus.FAILED:
            self._failed(tally, record.finished_at or record.created_at, record.error)
        elif record.status is RunStatus.CANCELLED:
            tally.cancelled += 1
        if record.started_at is not None and record.finished_at is not None:
            tally.durations.append(record.finished_at - record.started_at)
        self._end(run_id)
        self._touch(record.task)

    def _opened(self, run_id: str, attempt: int, submitted_at: float) -> tuple[int, float]:
        self._open[run_id] = submitted_at if attempt == 1 else (attempt, submitted_at)
        return attempt, submitted_at

    def _open_run(self, run_id: str) -> tuple[int, float] | None:
        """(the attempt last known, when it was submitted) of a run not ended, or None."""
        known = self._open.get(run_id)
        if known is None or isinstance(known, tuple):
            return known
        return 1, known

    def _end(self, run_id: str) -> None:
        known = self._open.pop(run_id, None)
        self._ended[run_id] = 0.0 if known is None else known[1] if isinstance(known, tuple) else known
        if len(self._ended) > self.remember:
            oldest = next(iter(self._ended))
            at = self._ended.pop(oldest)
            if self._forgotten_upto is None or at > self._forgotten_upto:
                self._forgotten_upto = at

    def _failed(self, tally: TaskTally, ts: float, error: Any) -> None:
        tally.failed += 1
        kind = error.type if error is not None else "unknown"
        tally.errors[kind] += 1
        if tally.last_failure_at is None or ts >= tally.last_failure_at:
            tally.last_failure_at = ts
            tally.last_failure = kind if error is None else f"{error.type}: {error.message}"

    def on_event(self, kind: str, event: Any) -> None:
        """Count one run event (``kind`` is its ``kind``). A run first heard of after its
        submission (queued before the first snapshot's runs, say) is counted as submitted
        then: its end is counted too, and no task may show more runs ended than submitted.
        What was counted already (a run's submission or end told twice, or by a snapshot
        first) is not counted again."""
        if not kind.startswith("run."):
            return
        run_id = event.run_id
        if run_id in self._ended:
            return  # ended and counted: nothing after an end changes the figures
        if kind == "run.submitted":
            if self.since is None:
                self.since = event.ts
            if run_id in self._open:
                return
            self._tally(event.task).submitted += 1
            self._opened(run_id, 1, event.ts)
            self._touch(event.task)
            return
        tally = self._tally(event.task)
        known = self._open_run(run_id)
        if known is None:
            tally.submitted += 1
            known = self._opened(run_id, getattr(event, "attempt", 1), event.ts)
            self._touch(event.task)
        if kind == "run.succeeded":
            tally.succeeded += 1
            tally.durations.append(event.duration)
        elif kind == "run.failed":
            self._failed(tally, event.ts, event.error)
            if event.duration:
                tally.durations.append(event.duration)
        elif kind == "run.cancelled":
            tally.cancelled += 1
        elif kind == "run.retrying":
            tally.retried += 1
            self._opened(run_id, event.attempt, known[1])
        else:
            if kind in ("run.started", "run.recovered") and event.attempt > known[0]:
                self._opened(run_id, event.attempt, known[1])
            return
        if kind in ("run.succeeded", "run.failed", "run.cancelled"):
            self._end(run_id)
        self._touch(event.task)

