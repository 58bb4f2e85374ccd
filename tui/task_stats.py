"""Per-task statistics built from the run events the dashboard receives.

Pure Python (no Textual): counts of submitted, succeeded, failed and
cancelled runs per task, the durations of its recent finished runs (for p50
and p95), its last failure, and its failures grouped by exception type. The
figures cover what this dashboard has seen since ``since`` (its first
snapshot's finished runs included), which it says on screen.
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
    """Every task's tally, fed one run event at a time."""

    def __init__(self, keep_durations: int = 1_000) -> None:
        self.keep_durations = keep_durations
        self.tallies: dict[str, TaskTally] = {}
        #: when the figures start (the first snapshot's time, or the first event's)
        self.since: float | None = None
        self.changed = False

    def _tally(self, task: str) -> TaskTally:
        tally = self.tallies.get(task)
        if tally is None:
            tally = self.tallies[task] = TaskTally(task, self.keep_durations)
        return tally

    def seed(self, runs: list[RunRecord], now: float) -> None:
        """Count a first snapshot's runs (only once: later snapshots repeat what events told)."""
        if self.since is not None:
            return
        self.since = min((r.created_at for r in runs), default=now)
        for record in runs:
            tally = self._tally(record.task)
            tally.submitted += 1
            if record.status is RunStatus.SUCCEEDED:
                tally.succeeded += 1
            elif record.status is RunStatus.FAILED:
                self._failed(tally, record.finished_at or record.created_at, record.error)
            elif record.status is RunStatus.CANCELLED:
                tally.cancelled += 1
            if record.status.finished and record.started_at is not None and record.finished_at is not None:
                tally.durations.append(record.finished_at - record.started_at)
        self.changed = True

    def _failed(self, tally: TaskTally, ts: float, error: Any) -> None:
        tally.failed += 1
        kind = error.type if error is not None else "unknown"
        tally.errors[kind] += 1
        if tally.last_failure_at is None or ts >= tally.last_failure_at:
            tally.last_failure_at = ts
            tally.last_failure = kind if error is None else f"{error.type}: {error.message}"

    def seen(self, task: str) -> None:
        """Count a run first seen after its submission (queued before the first snapshot's
        runs, say) as submitted: its end is counted too, and no task may show more runs
        ended than submitted."""
        self._tally(task).submitted += 1
        self.changed = True

    def on_event(self, kind: str, event: Any) -> None:
        """Count one run event (``kind`` is its ``kind``)."""
        if kind == "run.submitted":
            if self.since is None:
                self.since = event.ts
            self._tally(event.task).submitted += 1
        elif kind == "run.succeeded":
            tally = self._tally(event.task)
            tally.succeeded += 1
            tally.durations.append(event.duration)
        elif kind == "run.failed":
            tally = self._tally(event.task)
            self._failed(tally, event.ts, event.error)
            if event.duration:
                tally.durations.append(event.duration)
        elif kind == "run.cancelled":
            self._tally(event.task).cancelled += 1
        elif kind == "run.retrying":
            self._tally(event.task).retried += 1
        else:
            return
        self.changed = True

    def rows(self) -> list[dict[str, Any]]:
        return [self.tallies[task].fields() for task in sorted(self.tallies)]
