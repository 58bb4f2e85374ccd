"""The run index: every run this node knows, bounded, for the sync queries and dashboards.

The store owns the runs; the index is this node's view of them, fed as runs
are admitted, claimed and finished here (and as the store tells of runs other
nodes execute). Pending and running runs are always in it; finished ones are
kept up to ``history`` and evicted oldest-finished first. It also keeps the
counts by status, the totals since the engine's latest start, per-second
throughput buckets, the dedup keys of the pending runs this node submitted,
and when the next retry it knows of is due. Plain data and arithmetic: nothing here awaits or
publishes.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable

from .errors import InvalidQuery
from .runs import Run, RunError, RunList, RunStatus, run_status

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_SUCCEEDED = RunStatus.SUCCEEDED
_FAILED = RunStatus.FAILED
_CANCELLED = RunStatus.CANCELLED
_monotonic = time.monotonic
#: the largest integer a store's column holds
MAX_LIMIT = 2**63 - 1


# ---------------------------------------------------------------- checking the queries' arguments
#
# Shared by every read of runs (``query_runs``, ``runs``, ``snapshot``, ``rates``...) and the
# remote client, so that one bad value is refused alike whichever way it is asked, as an
# InvalidQuery naming it. Each returns why a value cannot be used, or None: cheap enough for
# a dashboard's every refresh (no model is built).


def limit_problem(name: str, value: object, least: int, what: str) -> str | None:
    """Why ``value`` is no count of at least ``least`` (a bool is none), or None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        return f"{name}={value!r}: pass {what}, an int of {least} or more"
    if value > MAX_LIMIT:
        return f"{name}={value!r}: pass {what}, an int from {least} to 2**63 - 1"
    return None


def runs_limit_problem(runs_limit: object) -> str | None:
    """Why ``runs_limit`` is no number of runs a snapshot can hold, or None."""
    return limit_problem("runs_limit", runs_limit, 0, "how many of the newest runs the snapshot holds (0 for none)")


def since_problem(since: object) -> str | None:
    if since is None or (not isinstance(since, bool) and isinstance(since, (int, float)) and math.isfinite(since)):
        return None
    return f"since={since!r} is no time: pass UNIX seconds (time.time() - 3600, say) or None"


def task_problem(task: object) -> str | None:
    if task is None or isinstance(task, str):
        return None
    return f"task={task!r} is no task name: pass a task's name (a str) or None for every task"


def seconds_problem(seconds: object) -> str | None:
    if not isinstance(seconds, bool) and isinstance(seconds, (int, float)) and 1 <= seconds < math.inf:
        return None  # (a NaN compares false)
    return f"seconds={seconds!r}: pass how many seconds back to count, a finite number of 1 or more"


def check_query(*problems: str | None, what: str = "runs query") -> None:
    """Raise :class:`InvalidQuery` naming every problem given (None is none) and the read refused."""
    found = [p for p in problems if p is not None]
    if found:
        raise InvalidQuery(found, what)


def wanted_statuses(status: RunStatus | str | Iterable[RunStatus | str] | None) -> set[RunStatus] | None:
    """The statuses a ``status=`` filter names (None: all); :class:`InvalidStatus` for one naming none."""
    if status is None:
        return None
    if isinstance(status, str) or not isinstance(status, Iterable):
        # not iterable (status=5): a bad status, not a TypeError about iterating
        return {run_status(status)}
    return {run_status(s) for s in status}


class RunIndex:
    """Runs by id with their counts, totals and throughput."""

    def __init__(self, history: int, throughput_window: float) -> None:
        self.history = history
        self.throughput_window = throughput_window
        self._on_evicted: Callable[[], None] | None = None
        self._evicted_every = 1
        self._evicted = 0
        self.runs: dict[str, Run] = {}
        self.counts: dict[RunStatus, int] = {s: 0 for s in RunStatus}
        #: finished runs in the order they finished, oldest first (evicted from the front)
        self._finished: OrderedDict[str, None] = OrderedDict()
        #: (task, dedup key) -> the pending run holding it, for runs this node submitted
        self._keys: dict[tuple[str, str], Run] = {}
        #: (due, run id) of pending retries, so the executor sleeps until the first is due
        self._retry_due: list[tuple[float, str]] = []
        self.submitted_total = 0
        self.finished_total = 0
        self.totals = {_SUCCEEDED: 0, _FAILED: 0, _CANCELLED: 0}
        self.retries_total = 0
        self.recovered_total = 0
        # per-second buckets of [second, finished, failed] for throughput figures
        self._tp: deque[list[int]] = deque()
        #: the newest bucket (a stand-in before the first finish)
        self._bucket = [-1, 0, 0]

    def set_evicted(self, fn: Callable[[], None], every: int = 1) -> None:
        """Call ``fn`` after every ``every`` finished runs evicted (the memory store prunes along)."""
        self._on_evicted = fn
        self._evicted_every = max(1, every)
        self._evicted = 0

    def set_history(self, history: int) -> None:
        """Keep ``history`` finished runs from now on, evicting the oldest beyond it now."""
        self.history = history
        self.trim()

    def trim(self) -> None:
        """Evict the oldest finished runs beyond ``history`` (as it is when this runs)."""
        while len(self._finished) > self.history:
            self._evict()

    def new_start(self) -> None:
        """The engine starts (again): the totals count from here, as the views calling them
        "since start" say. The runs held (a memory store's history) stay, counted by status."""
        self.submitted_total = 0
        self.finished_total = 0
        self.totals = {_SUCCEEDED: 0, _FAILED: 0, _CANCELLED: 0}
        self.retries_total = 0
        self.recovered_total = 0

    def clear(self) -> None:
        """Forget every run (the totals are :meth:`new_start`'s to reset)."""
        self.runs.clear()
        self._finished.clear()
        self._keys.clear()
        self._retry_due.clear()
        self.counts = {s: 0 for s in RunStatus}

    def get(self, run_id: str) -> Run | None:
        return self.runs.get(run_id)

    # ---------------------------------------------------------------- runs coming in

    def add(self, run: Run) -> None:
        """Index a run as it stands (read back from the store, or another node's)."""
        self.runs[run.id] = run
        self.counts[run.status] += 1
        if run.status.finished:
            self._remember_finished(run)

    def admitted(self, run: Run) -> None:
        """Index a run this node just submitted (pending); it holds its dedup key while pending."""
        self.runs[run.id] = run
        self.counts[_PENDING] += 1
        self.submitted_total += 1
        if run.key is not None:
            self._keys[(run.task, run.key)] = run

    def pending_holder(self, run: Run) -> Run | None:
        """The pending run of the same task already holding ``run``'s dedup key, if any."""
        if run.key is None:
            return None
        holder = self._keys.get((run.task, run.key))
        return holder if holder is not None and holder.status is _PENDING else None

    def release_key(self, run: Run) -> None:
        if run.key is not None and self._keys.get((run.task, run.key)) is run:
            del self._keys[(run.task, run.key)]

    # ---------------------------------------------------------------- transitions

    def started(self, run: Run, attempt: int, started_at: float | None, node: str | None) -> None:
        """``run`` went from pending to running on ``node`` (this one or, as the store says, another)."""
        counts = self.counts
        counts[_PENDING] -= 1
        counts[_RUNNING] += 1
        run.status = _RUNNING
        run.attempt = attempt
        run.started_at = started_at
        run.node = node
        run.finished_at = None
        run.run_after = 0.0
        if run.key is not None:
            self.release_key(run)

    def unclaimed(self, run: Run) -> None:
        """This node no longer executes ``run``: shown pending until the store says more."""
        if run.status is _RUNNING:
            self.counts[_RUNNING] -= 1
            self.counts[_PENDING] += 1
            run.status = _PENDING
            run.node = None

    def requeued(self, run: Run, error: RunError | None, run_after: float) -> None:
        """Pending again for its next attempt, due at ``run_after`` (0: now)."""
        counts = self.counts
        counts[run.status] -= 1
        counts[_PENDING] += 1
        if run.status.finished:
            self._finished.pop(run.id, None)  # pending again: never evicted as finished
        run.status = _PENDING
        run.cancel_reason = None
        run.result = None
        run.node = None
        run.attempt += 1
        run.run_after = run_after
        if run_after:
            heapq.heappush(self._retry_due, (run_after, run.id))
        run.error = error
        run.finished_at = None
        self.retries_total += 1
        if run.key is not None:
            self._keys.setdefault((run.task, run.key), run)

    def finished(self, run: Run, status: RunStatus, now: float) -> None:
        """``run`` ended with ``status``: counted, its waiters resolved, kept as history."""
        counts = self.counts
        counts[run.status] -= 1
        counts[status] += 1
        run.status = status
        run.finished_at = now
        run.run_after = 0.0
        if run.key is not None:
            self.release_key(run)
        self.finished_total += 1
        self.totals[status] += 1
        second = int(_monotonic())
        bucket = self._bucket
        if bucket[0] != second:
            bucket = self._new_bucket(second)
        bucket[1] += 1
        if status is _FAILED:
            bucket[2] += 1
        waiters = run.waiters
        if waiters:
            run.waiters = None
            record = run.record()
            for fut in waiters:
                if not fut.done():
                    fut.set_result(record)
        self._remember_finished(run)

    def forget(self, run: Run) -> None:
        """Drop an unfinished ``run`` the store no longer has (another node finished it and
        it was pruned before this node heard how): not counted as finished, it never was here."""
        if self.runs.get(run.id) is not run:
            return
        del self.runs[run.id]
        self.counts[run.status] -= 1
        self.release_key(run)

    def _new_bucket(self, second: int) -> list[int]:
        tp = self._tp
        bucket = self._bucket = [second, 0, 0]
        tp.append(bucket)
        horizon = second - max(self.throughput_window, 60)
        while tp[0][0] < horizon:
            tp.popleft()
        return bucket

    def _remember_finished(self, run: Run) -> None:
        finished = self._finished
        finished[run.id] = None
        while len(finished) > self.history:  # more than one once history was lowered
            self._evict()

    def expire(self, before: float) -> None:
        """Forget the finished runs that finished before ``before`` (wall clock), oldest first,
        as the store's ``retention`` prunes them: sync queries and stats must not show runs
        the store no longer has."""
        finished = self._finished
        runs = self.runs
        while finished:
            run = runs.get(next(iter(finished)))
            if run is not None and run.finished_at is not None and run.finished_at >= before:
                return
            self._evict()

    def _evict(self) -> None:
        evicted, _ = self._finished.popitem(last=False)
        old = self.runs.pop(evicted, None)
        if old is not None:
            self.counts[old.status] -= 1
        self._evicted += 1
        if self._evicted >= self._evicted_every and self._on_evicted is not None:
            self._evicted = 0
            self._on_evicted()

    def next_due(self) -> float | None:
        """When the earliest pending retry this node knows of is due."""
        due = self._retry_due
        while due:
            when, run_id = due[0]
            run = self.runs.get(run_id)
            if run is not None and run.status is _PENDING and run.run_after == when:
                return when
            heapq.heappop(due)  # started, cancelled or evicted since
        return None

    # ---------------------------------------------------------------- reading

    def pending(self) -> list[Run]:
        return [run for run in self.runs.values() if run.status is _PENDING]

    def select(
        self, wanted: set[RunStatus] | None, task: str | None, limit: int | None
    ) -> RunList:
        """Records newest first, filtered by status and task, at most ``limit``."""
        out = RunList()
        if limit is not None and limit <= 0:
            return out
        for run in reversed(self.runs.values()):
            if wanted is not None and run.status not in wanted:
                continue
            if task is not None and run.task != task:
                continue
            out.append(run.record())
            if limit is not None and len(out) >= limit:
                break
        return out

    def throughput(self) -> float:
        """Runs finished per second over the throughput window."""
        now = int(time.monotonic())
        window = self.throughput_window
        return sum(b[1] for b in self._tp if b[0] > now - window) / window

    def rates(self, seconds: float = 1.0) -> tuple[float, float]:
        """Runs finished and failed per second over the last ``seconds`` whole seconds
        (:class:`InvalidQuery` for a ``seconds`` that is no finite number of 1 or more)."""
        check_query(seconds_problem(seconds), what="rates query")
        now = int(time.monotonic())
        span = int(seconds)
        done = failed = 0
        for second, fin, fail in self._tp:
            if now - span <= second < now:
                done += fin
                failed += fail
        return done / span, failed / span
