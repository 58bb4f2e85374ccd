"""The in-memory run store: the default, as fast as the engine's own queue.

Rows are plain slotted objects; due pending runs wait in one line per task
(fresh inserts in a deque, runs re-queued by a retry or a recovery in a small
heap by insertion order, so they keep their place), delayed runs in one heap
by due time. Pydantic models are built only when a caller reads rows (get,
query, cancel), never per insert, claim or finish. Nothing here ever waits,
so the hot operations also come as plain methods (``insert_now``,
``claim_now``, ``finish_now``, ``prune_now``): the engine calls them directly
on its loop, and a run is queued and started before ``submit`` returns,
without a coroutine per step. Two of them speak the engine's own run entries:
``admit`` inserts one (no ``NewRun``), and ``take_now`` claims rows and hands
them back as they are, each linked to the entry it was admitted with (no
``Claim`` per run).
"""

from __future__ import annotations

import heapq
import itertools
import os
from bisect import bisect_left
from collections import deque
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from ..errors import DuplicateRunId, InvalidQuery, QueueFull, RunNotFound
from ..runs import CancelReason, Progress, Run, RunError, RunStatus, run_status, record_fields
from .base import (
    Clock,
    Store,
    adoptable,
    gone_incarnations,
    lost_action,
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
    OnLost,
    Outcome,
    Page,
    Recovered,
    Retry,
    StoredJob,
    StoredRun,
    Succeeded,
    TriggerKeyRecord,
    lost_note,
    worker_lost_error,
)

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_SUCCEEDED = RunStatus.SUCCEEDED
_FAILED = RunStatus.FAILED
_CANCELLED = RunStatus.CANCELLED
_ALL = tuple(RunStatus)
#: Enum.value is a descriptor call: looked up once here instead of per finished run
_TOTAL_OF = {s: s.value for s in RunStatus}


class MemoryRow:
    """One run as the memory store holds it (its queue entry and its record)."""

    __slots__ = (
        "seq",
        "id",
        "task",
        "params",
        "status",
        "attempt",
        "max_attempts",
        "lost_count",
        "created_at",
        "started_at",
        "finished_at",
        "run_after",
        "node",
        "incarnation",
        "token",
        "lease_until",
        "cancel_requested",
        "cancel_reason",
        "done",
        "total",
        "message",
        "result",
        "error",
        "key",
        "holds_key",
        "source",
        "on_lost",
        "run",
    )

    def __init__(
        self,
        seq: int,
        run_id: str,
        task: str,
        params: dict[str, Any],
        max_attempts: int,
        key: str | None,
        source: str,
        on_lost: OnLost,
        created_at: float,
        run_after: float,
        run: Run | None,
    ) -> None:
        self.seq = seq
        self.id = run_id
        self.task = task
        self.params = params
        self.status = _PENDING
        self.attempt = 1
        self.max_attempts = max_attempts
        self.lost_count = 0
        self.created_at = created_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.run_after = run_after
        self.node: str | None = None
        self.incarnation: str | None = None
        self.token: str | None = None
        self.lease_until: float | None = None
        self.cancel_requested = False
        self.cancel_reason: CancelReason | None = None
        self.done: float = 0
        self.total: float | None = None
        self.message = ""
        self.result: Any = None
        self.error: RunError | None = None
        self.key = key
        self.holds_key = False
        self.source = source
        self.on_lost = on_lost
        #: the engine's index entry for a run it admitted (see MemoryStore.admit)
        self.run = run

    def model(self) -> StoredRun:
        return StoredRun(
            **record_fields(self),
            incarnation=self.incarnation,
            claim_token=self.token,
            lease_until=self.lease_until,
            run_after=self.run_after,
            lost_count=self.lost_count,
            cancel_requested=self.cancel_requested,
            on_lost=self.on_lost,
            seq=self.seq,
        )



class _Line:
    """One task's due pending rows, oldest first.

    Fresh inserts arrive in ``seq`` order, so they wait in a deque with no
    per-row tuple (a tuple per queued run is garbage-collector work); rows put
    back by a retry or a recovery keep their place through a small heap keyed
    by ``seq``. Rows that left pending meanwhile are skipped when met.
    """

    __slots__ = ("fresh", "back")

    def __init__(self) -> None:
        self.fresh: deque[MemoryRow] = deque()
        self.back: list[tuple[int, MemoryRow]] = []

    def head(self) -> MemoryRow | None:
        """The oldest pending row, left in place; None when there is none."""
        fresh, back = self.fresh, self.back
        while fresh and fresh[0].status is not _PENDING:
            fresh.popleft()
        while back and back[0][1].status is not _PENDING:
            heapq.heappop(back)
        if not back:
            return fresh[0] if fresh else None
        if fresh and fresh[0].seq < back[0][0]:
            return fresh[0]
        return back[0][1]

    def pop(self) -> MemoryRow | None:
        """Take the oldest pending row."""
        row = self.head()
        if row is not None:
            if self.fresh and self.fresh[0] is row:
                self.fresh.popleft()
            else:
                heapq.heappop(self.back)
        return row

    def put_back(self, row: MemoryRow) -> None:
        heapq.heappush(self.back, (row.seq, row))


class MemoryStore(Store):
    """Every row in this process's memory; gone when the process exits."""

    name = "memory"

    def __init__(
        self,
        *,
        clock: Clock | None = None,
        lease_ttl: float = 30.0,
        node_ttl: float | None = None,
        max_lost: int = 3,
    ) -> None:
        kw: dict[str, Any] = {} if clock is None else {"clock": clock}
        super().__init__(lease_ttl=lease_ttl, node_ttl=node_ttl, max_lost=max_lost, **kw)
        self._rows: dict[str, MemoryRow] = {}
        #: rows in insertion order for cursors; pruned rows are dropped lazily
        self._order: list[MemoryRow] = []
        self._dropped = 0
        self._ready: dict[str, _Line] = {}
        self._delayed: list[tuple[float, int, MemoryRow]] = []
        self._keys: dict[tuple[str, str], MemoryRow] = {}
        #: pending rows whose dedup key another pending row held when they became pending again
        #: (a retry): the first still waiting takes the key at the next submit with it
        self._key_waiting: dict[tuple[str, str], deque[MemoryRow]] = {}
        self._claims: dict[str, MemoryRow] = {}
        #: finished rows, oldest first (a row finishes once: nothing is ever looked up here)
        self._finished: deque[MemoryRow] = deque()
        self._counts: dict[RunStatus, int] = dict.fromkeys(_ALL, 0)
        self._totals = {"inserted": 0, "succeeded": 0, "failed": 0, "cancelled": 0, "retried": 0, "lost": 0}
        self._seq = 0
        # tokens only need to be unique within this store, and a counter is cheaper than urandom
        self._tokens = map((os.urandom(3).hex() + "-{}").format, itertools.count(1))
        self._nodes: dict[str, NodeInfo] = {}
        self._periodic: dict[str, float] = {}
        #: trigger name -> holder incarnation -> key -> record
        self._trigger_keys: dict[str, dict[str, dict[str, TriggerKeyRecord]]] = {}
        #: queue name -> job id -> (holder incarnation, job, handovers)
        self._jobs: dict[str, dict[int, tuple[str, Any, int]]] = {}
        self._job_ids = itertools.count(1)

    def __repr__(self) -> str:
        return f"<MemoryStore runs={len(self._rows)} pending={self._counts[_PENDING]}>"

    # ---------------------------------------------------------------- insert

    async def insert(self, runs: Sequence[NewRun], *, max_pending: int | None = None) -> list[Inserted]:
        return self.insert_now(runs, max_pending=max_pending)

    def insert_now(self, runs: Sequence[NewRun], *, max_pending: int | None = None) -> list[Inserted]:
        """:meth:`insert` without a coroutine: the engine's hot path calls it directly."""
        now = self.clock()
        keys = self._keys
        rows = self._rows
        if max_pending is not None or len(runs) > 1:
            self._check_insert(runs, max_pending)
        elif runs and runs[0].id is not None and runs[0].id in rows:
            raise DuplicateRunId(runs[0].id)
        out: list[Inserted] = []
        added = 0
        for new in runs:
            key = new.key
            if key is not None:
                held = keys.get((new.task, key)) or self._hand_key((new.task, key))
                if held is not None:
                    out.append(Inserted(held.id, False))
                    continue
            self._seq += 1
            seq = self._seq
            run_id = new.id or new_run_id()
            created = new.created_at if new.created_at is not None else now
            delay = new.delay
            row = MemoryRow(
                seq, run_id, new.task, new.params, new.max_attempts, key, new.source, new.on_lost,
                created, now + delay if delay > 0 else now, None,
            )
            self._place(row, delayed=delay > 0)
            added += 1
            out.append(Inserted(run_id, True))
        if added:
            self._counts[_PENDING] += added
            self._totals["inserted"] += added
            if self._notifying:
                self._notify(work=True)
        return out

    def admit(self, run: Run, on_lost: OnLost) -> str | None:
        """Insert one run the engine made and indexed, due now; the row links back to it.

        :meth:`insert_now` for the engine's hot path: no ``NewRun`` and no
        result list per run, and the row's claim (:meth:`take_now`) hands back
        the engine's own entry. Returns None once inserted, or the id of the
        pending run already holding its dedup key (nothing inserted then).
        The engine checks its queue limit first.
        """
        key = run.key
        task = run.task
        if key is not None:
            held = self._keys.get((task, key)) or self._hand_key((task, key))
            if held is not None:
                return held.id
        run_id = run.id
        if run_id in self._rows:
            raise DuplicateRunId(run_id)
        self._seq += 1
        created = run.created_at
        row = MemoryRow(self._seq, run_id, task, run.params, run.max_attempts, key, run.source, on_lost, created, created, run)
        self._place(row, delayed=False)
        self._counts[_PENDING] += 1
        self._totals["inserted"] += 1
        if self._notifying:
            self._notify(work=True)
        return None

    def _place(self, row: MemoryRow, *, delayed: bool) -> None:
        """File a new pending row: by id, in insertion order, under its dedup key, and in its
        task's line (or among the delayed ones, by due time)."""
        self._rows[row.id] = row
        self._order.append(row)
        if row.key is not None:
            self._keys[(row.task, row.key)] = row
            row.holds_key = True
        if delayed:
            heapq.heappush(self._delayed, (row.run_after, row.seq, row))
        else:
            line = self._ready.get(row.task)
            if line is None:
                line = self._ready[row.task] = _Line()
            line.fresh.append(row)

    def _check_insert(self, runs: Sequence[NewRun], max_pending: int | None) -> None:
        """Refuse the whole batch before anything changes."""
        seen: set[tuple[str, str]] = set()
        ids: set[str] = set()
        new_count = 0
        for r in runs:
            if r.key is not None:
                k = (r.task, r.key)
                if k in self._keys or k in seen or self._waiting_for(k) is not None:
                    continue
                seen.add(k)
            if r.id is not None:
                if r.id in self._rows or r.id in ids:
                    raise DuplicateRunId(r.id)
                ids.add(r.id)
            new_count += 1
        if max_pending is not None and new_count and self._counts[_PENDING] + new_count > max_pending:
            raise QueueFull("the run store's pending queue", max_pending, self._counts[_PENDING], adding=new_count)

    # ---------------------------------------------------------------- claim

    def _line(self, task: str) -> _Line:
        line = self._ready.get(task)
        if line is None:
            line = self._ready[task] = _Line()
        return line

    def _promote(self, now: float) -> None:
        delayed = self._delayed
        while delayed and delayed[0][0] <= now:
            _, seq, row = heapq.heappop(delayed)
            if row.status is _PENDING:
                self._line(row.task).put_back(row)

    async def claim(
        self,
        node: str,
        incarnation: str,
        slots: int,
        tasks: Mapping[str, int | None],
        *,
        limits: Mapping[str, int] | None = None,
    ) -> list[Claim]:
        if self._replaced(incarnation):
            return []  # as the durable stores refuse it (see REPLACED_INCARNATION)
        if limits:
            tasks = self._within(tasks, limits)
        return self.claim_now(node, incarnation, slots, tasks)

    def _within(self, tasks: Mapping[str, int | None], limits: Mapping[str, int]) -> dict[str, int | None]:
        """``tasks`` with each capped task's room cut to what its cap leaves beside the runs
        running now (engines sharing this store object count together). Not on the hot path:
        an engine counts its own runs, and one store object lives in one process."""
        running: dict[str, int] = {}
        for row in self._rows.values():
            if row.status is _RUNNING and row.task in limits:
                running[row.task] = running.get(row.task, 0) + 1
        out: dict[str, int | None] = {}
        for task, free in tasks.items():
            cap = limits.get(task)
            if cap is not None:
                room = cap - running.get(task, 0)
                free = room if free is None else min(free, room)
            out[task] = free
        return out

    def claim_now(self, node: str, incarnation: str, slots: int, tasks: Mapping[str, int | None]) -> list[Claim]:
        """:meth:`claim` without a coroutine (and without cluster-wide ``limits``)."""
        return [claim_of(row) for row in self.take_now(node, incarnation, slots, tasks)]

    def take_now(self, node: str, incarnation: str, slots: int, tasks: Mapping[str, int | None]) -> list[MemoryRow]:
        """:meth:`claim_now` giving the claimed rows themselves (no ``Claim`` per run): the
        engine reads the token, attempt and start from the row, and its own entry from
        ``row.run`` for the runs it admitted. Rows are the store's: read them, never change them."""
        now = self.clock()
        if self._delayed and self._delayed[0][0] <= now:
            self._promote(now)
        out: list[MemoryRow] = []
        if slots <= 0:
            return out
        ready = self._ready
        lease_until = now + self.lease_ttl
        lines: list[tuple[str, _Line, int]] = []
        for task, free in tasks.items():
            line = ready.get(task)
            if line is None or not (line.fresh or line.back):
                continue
            n = slots if free is None else min(free, slots)
            if n > 0:
                lines.append((task, line, n))
        if not lines:
            return out
        if len(lines) == 1:
            _, line, n = lines[0]
            fresh = line.fresh
            while n:
                if line.back:
                    row = line.pop()
                    if row is None:
                        break
                elif fresh:
                    row = fresh.popleft()
                    if row.status is not _PENDING:
                        continue  # cancelled while it waited
                else:
                    break
                out.append(row)
                n -= 1
        else:
            # oldest first across tasks: merge the lines by the seq at their heads
            free_of = {task: n for task, _, n in lines}
            line_of = {task: line for task, line, _ in lines}
            heads: list[tuple[int, str]] = []
            for task, line, _ in lines:
                head = line.head()
                if head is not None:
                    heads.append((head.seq, task))
            heapq.heapify(heads)
            while heads and len(out) < slots:
                _, task = heapq.heappop(heads)
                line = line_of[task]
                row = line.pop()
                assert row is not None  # its head was pending a moment ago, and nothing ran since
                out.append(row)
                free_of[task] -= 1
                if free_of[task] > 0:
                    head = line.head()
                    if head is not None:
                        heapq.heappush(heads, (head.seq, task))
        if out:
            tokens = self._tokens
            claims = self._claims
            for row in out:
                token = next(tokens)
                row.status = _RUNNING
                row.node = node
                row.incarnation = incarnation
                row.token = token
                row.lease_until = lease_until
                row.started_at = now
                # an attempt starts with no progress of its own (as the durable stores' claims)
                row.done, row.total, row.message = 0, None, ""
                if row.holds_key:
                    self._release_key(row)
                claims[token] = row
            counts = self._counts
            counts[_PENDING] -= len(out)
            counts[_RUNNING] += len(out)
        return out

    # ---------------------------------------------------------------- heartbeat, finish

    async def heartbeat(
        self, incarnation: str, tokens: Sequence[str], progress: Mapping[str, Progress] | None = None
    ) -> HeartbeatResult:
        lease_until = self.clock() + self.lease_ttl
        cancel: dict[str, CancelReason] = {}
        lost: list[str] = []
        claims = self._claims
        for token in tokens:
            row = claims.get(token)
            if row is None or row.incarnation != incarnation:
                lost.append(token)
                continue
            row.lease_until = lease_until
            if progress is not None:
                p = progress.get(token)
                if p is not None:
                    row.done, row.total, row.message = p.done, p.total, p.message
            if row.cancel_requested:
                cancel[token] = row.cancel_reason or "user"
        return HeartbeatResult(cancel=cancel, lost=lost)

    async def finish(self, token: str, outcome: Outcome, progress: Progress | None = None) -> RunStatus | None:
        return self.finish_now(token, outcome)  # the index's run is the row's record: its progress is there

    def finish_now(self, token: str, outcome: Outcome) -> RunStatus | None:
        """:meth:`finish` without a coroutine."""
        row = self._claims.pop(token, None)
        if row is None:
            return None
        now = self.clock()
        if type(outcome) is Succeeded:
            row.result = outcome.result
            self._end(row, _SUCCEEDED, now)
            return _SUCCEEDED
        if isinstance(outcome, Failed):
            row.error = outcome.error
            self._end(row, _FAILED, now)
            return _FAILED
        if isinstance(outcome, Cancelled):
            row.cancel_reason = outcome.reason
            self._end(row, _CANCELLED, now)
            return _CANCELLED
        if isinstance(outcome, Retry):
            if row.cancel_requested:
                row.cancel_reason = row.cancel_reason or "user"
                self._end(row, _CANCELLED, now)
                return _CANCELLED
            if outcome.next_attempt:
                self._totals["retried"] += 1
            self._requeue(
                row, now, now + max(0.0, outcome.delay), outcome.error, step=1 if outcome.next_attempt else 0,
                added=outcome.added_attempts,
            )
            return _PENDING
        raise TypeError(f"unknown outcome {outcome!r}; pass Succeeded, Failed, Cancelled or Retry")

    def _waiting_for(self, key: tuple[str, str]) -> MemoryRow | None:
        """The first row still pending without ``key`` it waits for (stale entries dropped)."""
        waiting = self._key_waiting.get(key)
        while waiting:
            row = waiting[0]
            if row.status is _PENDING and not row.holds_key:
                return row
            waiting.popleft()
        self._key_waiting.pop(key, None)
        return None

    def _hand_key(self, key: tuple[str, str]) -> MemoryRow | None:
        """No row holds ``key``: the first row waiting for it (a retry, while another held it)
        takes it, and answers for the submit asking."""
        row = self._waiting_for(key)
        if row is not None:
            self._key_waiting[key].popleft()
            self._keys[key] = row
            row.holds_key = True
        return row

    def _release_key(self, row: MemoryRow) -> None:
        """The row no longer holds its dedup key (it left pending): another run may take it."""
        del self._keys[(row.task, row.key)]  # type: ignore[index,arg-type]
        row.holds_key = False

    def _end(self, row: MemoryRow, status: RunStatus, now: float) -> None:
        counts = self._counts
        counts[row.status] -= 1
        counts[status] += 1
        row.status = status
        row.finished_at = now
        row.token = None
        row.lease_until = None
        if row.holds_key:
            self._release_key(row)
        self._finished.append(row)
        self._totals[_TOTAL_OF[status]] += 1
        if self._notifying:
            self._notify(finished=(row.id,))

    def _requeue(
        self, row: MemoryRow, now: float, run_after: float, error: RunError, step: int = 1, added: int = 0
    ) -> None:
        counts = self._counts
        counts[row.status] -= 1
        counts[_PENDING] += 1
        row.status = _PENDING
        row.attempt += step
        row.max_attempts += added  # (see Retry.cut_short)
        row.run_after = run_after
        row.node = row.incarnation = row.token = None
        row.lease_until = None
        row.error = error
        if row.key is not None and not row.holds_key:
            k = (row.task, row.key)
            if k not in self._keys:
                self._keys[k] = row
                row.holds_key = True
            else:
                self._key_waiting.setdefault(k, deque()).append(row)
        if run_after <= now:
            self._line(row.task).put_back(row)
        else:
            heapq.heappush(self._delayed, (run_after, row.seq, row))
        if self._notifying:
            self._notify(work=True)

    # ---------------------------------------------------------------- cancel, recover

    async def request_cancel(self, run_id: str, reason: CancelReason = "user") -> CancelResult:
        row = self._rows.get(run_id)
        if row is None:
            raise RunNotFound(run_id)
        if row.status is _PENDING:
            row.cancel_reason = reason
            # left in its heap: claims skip rows that are no longer pending
            self._end(row, _CANCELLED, self.clock())
            return CancelResult(action="cancelled", run=row.model())
        if row.status is _RUNNING:
            if not row.cancel_requested:
                row.cancel_requested = True
                row.cancel_reason = reason
                if self._notifying:
                    self._notify(cancels=(run_id,))
            return CancelResult(action="requested", run=row.model())
        return CancelResult(action="finished", run=row.model())

    async def recover(self, live_incarnations: Collection[str] | None = None) -> list[Recovered]:
        now = self.clock()
        gone = gone_incarnations(self._nodes.values(), now, self.node_ttl)
        out: list[Recovered] = []
        for token, row in list(self._claims.items()):
            why = lost_reason(row.incarnation, row.lease_until, now, gone, live_incarnations)
            if why is None:
                continue
            del self._claims[token]
            node, incarnation = row.node, row.incarnation
            row.lost_count += 1
            self._totals["lost"] += 1
            action = lost_action(row.cancel_requested, row.lost_count, row.on_lost, self.max_lost)
            if action == "cancelled":
                row.cancel_reason = row.cancel_reason or "user"
                self._end(row, _CANCELLED, now)
            elif action == "failed":
                row.error = worker_lost_error(row.id, row.lost_count, why, row.on_lost, self.max_lost)
                self._end(row, _FAILED, now)
            else:
                self._requeue(row, now, now, lost_note(why))
            out.append(
                Recovered(
                    run_id=row.id,
                    task=row.task,
                    action=action,
                    reason=why,
                    node=node,
                    incarnation=incarnation,
                    attempt=row.attempt,
                    lost_count=row.lost_count,
                )
            )
        return out

    # ---------------------------------------------------------------- reads

    async def get(self, run_id: str) -> StoredRun | None:
        row = self._rows.get(run_id)
        return None if row is None else row.model()

    async def query(
        self,
        *,
        status: RunStatus | str | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> Page:
        wanted = None if status is None else run_status(status)
        order = self._order
        end = len(order) if before is None else bisect_left(order, parse_cursor(before), key=_seq_of)
        rows = self._rows
        found: list[MemoryRow] = []
        for i in range(end - 1, -1, -1):
            row = order[i]
            if rows.get(row.id) is not row:
                continue
            if wanted is not None and row.status is not wanted:
                continue
            if task is not None and row.task != task:
                continue
            if since is not None and row.created_at < since:
                continue
            found.append(row)
            if len(found) > limit:
                break
        more = len(found) > limit
        found = found[:limit]
        return Page(runs=[r.model() for r in found], next=str(found[-1].seq) if more and found else None)

    async def counts(self) -> Counts:
        t = self._totals
        return Counts(
            by_status={s.value: n for s, n in self._counts.items()},
            inserted_total=t["inserted"],
            succeeded_total=t["succeeded"],
            failed_total=t["failed"],
            cancelled_total=t["cancelled"],
            retried_total=t["retried"],
            lost_total=t["lost"],
        )

    async def prune(self, *, keep: int | None = None, older_than: float | None = None) -> int:
        return self.prune_now(keep=keep, older_than=older_than)

    def prune_now(self, *, keep: int | None = None, older_than: float | None = None) -> int:
        """:meth:`prune` without a coroutine."""
        finished = self._finished
        deleted = 0
        if older_than is not None:
            cutoff = self.clock() - older_than
            # finish order is finished_at order, so the old ones are at the front
            while finished:
                row = finished[0]
                if row.finished_at is None or row.finished_at >= cutoff:
                    break
                finished.popleft()
                self._drop(row)
                deleted += 1
        if keep is not None:
            while len(finished) > max(0, keep):
                self._drop(finished.popleft())
                deleted += 1
        if self._dropped > 1024 and self._dropped > len(self._order) // 2:
            rows = self._rows
            self._order = [r for r in self._order if rows.get(r.id) is r]
            self._dropped = 0
        return deleted

    def _drop(self, row: MemoryRow) -> None:
        del self._rows[row.id]
        self._counts[row.status] -= 1
        self._dropped += 1

    # ---------------------------------------------------------------- nodes

    async def register_node(self, node: str, incarnation: str, version: str) -> NodeInfo:
        now = self.clock()
        info = self._nodes.pop(incarnation, None)
        info = NodeInfo(
            node=node,
            incarnation=incarnation,
            version=version,
            started_at=now if info is None else info.started_at,
            last_heartbeat=now,
        )
        # re-inserted last: registration order breaks ties of started_at
        self._nodes[incarnation] = info
        return info

    async def node_heartbeat(
        self, incarnation: str, running: int, *, cpu_percent: float | None = None, rss_bytes: int | None = None
    ) -> bool:
        info = self._nodes.get(incarnation)
        if info is None:
            return False
        update = {"last_heartbeat": self.clock(), "running": running, "cpu_percent": cpu_percent,
                  "rss_bytes": rss_bytes}  # fmt: skip
        self._nodes[incarnation] = info.model_copy(update=update)
        return self._replaced(incarnation)

    def _replaced(self, incarnation: str) -> bool:
        """Whether a later start of ``incarnation``'s node id registered (it counts as gone)."""
        info = self._nodes.get(incarnation)
        if info is None:
            return False
        # the rows are in registration order, which breaks ties of started_at (as in gone_incarnations)
        after = False
        for other in self._nodes.values():
            if other.incarnation == incarnation:
                after = True
            elif other.node == info.node and (
                other.started_at > info.started_at or (other.started_at == info.started_at and after)
            ):
                return True
        return False

    async def node_stopped(self, incarnation: str) -> None:
        info = self._nodes.get(incarnation)
        if info is not None:
            self._nodes[incarnation] = info.model_copy(update={"stopped_at": self.clock(), "running": 0})

    async def nodes(self) -> list[NodeInfo]:
        return list(self._nodes.values())

    async def prune_nodes(self, older_than: float) -> int:
        cutoff = self.clock() - older_than
        # registration order: an incarnation is replaced when its node id registered again later
        replaced: set[str] = set()
        newest: dict[str, str] = {}
        for incarnation, info in self._nodes.items():
            earlier = newest.get(info.node)
            if earlier is not None:
                replaced.add(earlier)
            newest[info.node] = incarnation
        old = [
            incarnation for incarnation, info in self._nodes.items()
            if (info.stopped_at is not None and info.stopped_at < cutoff)
            or (info.stopped_at is None and info.last_heartbeat < cutoff and incarnation in replaced)
        ]
        for incarnation in old:
            del self._nodes[incarnation]
        return len(old)

    # ---------------------------------------------------------------- small durable state

    async def get_periodic(self, name: str) -> float | None:
        return self._periodic.get(name)

    async def set_periodic(self, name: str, fired_at: float) -> None:
        self._periodic[name] = fired_at

    async def claim_periodic_run(
        self, name: str, slot: float, gap: float, run: NewRun, *, max_pending: int | None = None
    ) -> list[Inserted]:
        last = self._periodic.get(name)
        if last is not None and last >= slot - gap:
            return []
        # no await from here on: the claim and the insert are one step (a full queue refuses both)
        self._check_insert([run], max_pending)
        self._periodic[name] = slot
        return self.insert_now([run], max_pending=max_pending)

    async def adopt_trigger(
        self, trigger: str, incarnation: str, *, own: bool = False
    ) -> dict[str, TriggerKeyRecord]:
        # no await: one step, as a transaction is
        held = self._trigger_keys.get(trigger)
        if not held:
            return {}
        gone = gone_incarnations(self._nodes.values(), self.clock(), self.node_ttl)
        taking = trigger_holders_taken(held, incarnation, own, self._nodes, gone)
        taken = merge_taken((key, rec) for holder in taking for key, rec in held.pop(holder).items())
        if taken:
            mine = held.setdefault(incarnation, {})
            for key, rec in taken.items():
                had = None if own else mine.get(key)
                mine[key] = rec if had is None else merge_trigger_records(had, rec)
        return taken

    async def trigger_keys_elsewhere(self, trigger: str, incarnation: str) -> set[str]:
        held = self._trigger_keys.get(trigger, {})
        return {key for holder, keys in held.items() if holder != incarnation for key in keys}

    async def trigger_keys_held(self, trigger: str, incarnation: str) -> set[str]:
        return set(self._trigger_keys.get(trigger, {}).get(incarnation, {}))

    async def save_trigger(
        self, trigger: str, incarnation: str, keys: Mapping[str, TriggerKeyRecord], forget: Collection[str] = (),
        *, held: Collection[str] = (),
    ) -> set[str]:
        if not keys and not forget:
            return set()
        mine = self._trigger_keys.setdefault(trigger, {}).setdefault(incarnation, {})
        for key in forget:
            mine.pop(key, None)
        taken = {key for key in held if key in keys and key not in mine}
        mine.update((key, rec) for key, rec in keys.items() if key not in taken)
        return taken

    # ---------------------------------------------------------------- queue jobs

    async def put_jobs(self, queue: str, incarnation: str, jobs: Sequence[Any]) -> list[int]:
        held = self._jobs.setdefault(queue, {})
        ids = [next(self._job_ids) for _ in jobs]
        for job_id, job in zip(ids, jobs):
            held[job_id] = (incarnation, job, 0)
        return ids

    async def done_jobs(self, ids: Sequence[int]) -> None:
        for held in self._jobs.values():
            for job_id in ids:
                held.pop(job_id, None)

    async def adopt_jobs(self, queue: str, incarnation: str, *, own: bool = False) -> list[StoredJob]:
        gone = gone_incarnations(self._nodes.values(), self.clock(), self.node_ttl)
        held = self._jobs.get(queue, {})
        out: list[StoredJob] = []
        for job_id in sorted(held):
            holder, job, handovers = held[job_id]
            if adoptable(holder, incarnation, own, self._nodes, gone):
                if holder != incarnation:
                    handovers += 1
                held[job_id] = (incarnation, job, handovers)
                out.append(StoredJob(job_id, job, handovers))
        return out


def claim_of(row: MemoryRow) -> Claim:
    """The :class:`Claim` a claimed row stands for."""
    return Claim(
        row.id,
        row.token,  # type: ignore[arg-type]
        row.task,
        row.params,
        row.attempt,
        row.max_attempts,
        row.created_at,
        row.started_at,  # type: ignore[arg-type]
        row.lease_until,  # type: ignore[arg-type]
        row.key,
        row.source,
        row.lost_count,
        row.error,
    )


def _seq_of(row: MemoryRow) -> int:
    return row.seq


def parse_cursor(cursor: str) -> int:
    if isinstance(cursor, str) and cursor.isdigit() and cursor.isascii() and int(cursor) < 2**63:
        return int(cursor)
    raise InvalidQuery([f"before={cursor!r} is no page's cursor: pass the `next` value of a previous page unchanged"])
