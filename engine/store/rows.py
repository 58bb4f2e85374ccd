"""Rows of the SQL run stores turned into the store's values, and values into column text.

Shared by the SQLite and PostgreSQL stores, which select the same columns in
the same order (``queries.RUN_COLUMNS``, ``queries.NODE_COLUMNS``).
"""

from __future__ import annotations

import math

from collections.abc import Collection, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from pydantic_core import from_json, to_json

from ..runs import Progress, RunError, RunStatus
from . import queries as Q
from .base import lost_action, lost_reason
from .models import Counts, LostReason, NodeInfo, Recovered, StoredRun, lost_note, worker_lost_error


def dumps(value: Any) -> str:
    # pydantic-core's encoder: several times faster than json's for the small dicts of params
    return to_json(value).decode()


loads = from_json


def seq_of(token: str) -> int:
    """The row a claim token names; -1 (matches nothing) for a token not made here."""
    head, _, _ = token.partition(".")
    try:
        return int(head)
    except ValueError:
        return -1


def error_json(error: RunError | None) -> str | None:
    return None if error is None else dumps(error.model_dump())


def error_of(text: str | None) -> RunError | None:
    """The :class:`RunError` a row's ``error`` column holds (written by :func:`error_json`)."""
    return None if text is None else RunError(**loads(text))


def counts_of(rows: Sequence[Sequence[Any]]) -> Counts:
    """:class:`Counts` from the rows of ``queries.COUNTS`` (``'status'`` or ``'total'``, name, value)."""
    by_status = {s.value: 0 for s in RunStatus}
    totals: dict[str, int] = {}
    for what, name, value in rows:
        (by_status if what == "status" else totals)[name] = int(value)
    return Counts(by_status=by_status, **{f"{k}_total": v for k, v in totals.items()})


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def stored_run(r: Sequence[Any]) -> StoredRun:
    (
        seq, run_id, task, params, status, attempt, max_attempts, lost_count, created_at, started_at,
        finished_at, run_after, node, incarnation, token, lease_until, cancel_requested, cancel_reason,
        done, total, message, result, error, key, source, on_lost,
    ) = r  # fmt: skip
    return StoredRun(
        id=run_id,
        task=task,
        params=loads(params),
        status=status,
        attempt=attempt,
        max_attempts=max_attempts,
        created_at=created_at,
        started_at=started_at,
        finished_at=finished_at,
        # an older taskwatch stored non-finite progress: read back as none, never refused
        progress=Progress(done=_finite(done) or 0.0, total=_finite(total), message=message),
        result=None if result is None else loads(result),
        error=error_of(error),
        key=key,
        source=source,
        cancel_reason=cancel_reason,
        node=node,
        incarnation=incarnation,
        claim_token=token,
        lease_until=lease_until,
        run_after=run_after,
        lost_count=lost_count,
        cancel_requested=bool(cancel_requested),
        on_lost=on_lost,
        seq=seq,
    )


def node_info(r: Sequence[Any]) -> NodeInfo:
    node, incarnation, version, started_at, last_heartbeat, running, stopped_at, cpu_percent, rss_bytes = r
    return NodeInfo(
        node=node,
        incarnation=incarnation,
        version=version,
        started_at=started_at,
        last_heartbeat=last_heartbeat,
        running=running,
        stopped_at=stopped_at,
        cpu_percent=cpu_percent,
        rss_bytes=rss_bytes,
    )


class RecoveryStep(NamedTuple):
    """What recovery does with one running claim: a statement, its arguments, and the record of it."""

    sql: str
    args: dict[str, Any]
    recovered: Recovered


def recovery_step(
    row: Sequence[Any], now: float, gone: Mapping[str, LostReason], live: Collection[str] | None, max_lost: int
) -> RecoveryStep | None:
    """The step for a claim row of ``queries.RUNNING_CLAIMS``'s columns; None while its owner may hold it.

    Both SQL stores run the statement in the recovering transaction and book
    the record's action (totals, wakeups) the same way.
    """
    seq, run_id, task, node, inc, token, lease_until, cancel_req, lost_count, on_lost, attempt = row
    why = lost_reason(inc, lease_until, now, gone, live)
    if why is None:
        return None
    lost_count += 1
    action = lost_action(bool(cancel_req), lost_count, on_lost, max_lost)
    args: dict[str, Any] = {"seq": seq, "token": token, "now": now, "lost": 1, "result": None, "cancel_reason": None}
    if action == "requeued":
        args.update(run_after=now, step=1, error=error_json(lost_note(why)))
        sql = Q.REQUEUE_CLAIMED
        attempt += 1
    elif action == "cancelled":
        args.update(status="cancelled", error=None)
        sql = Q.END_CLAIMED
    else:
        err = worker_lost_error(run_id, lost_count, why, on_lost, max_lost)
        args.update(status="failed", error=error_json(err))
        sql = Q.END_CLAIMED
    recovered = Recovered(
        run_id=run_id, task=task, action=action, reason=why, node=node, incarnation=inc,
        attempt=attempt, lost_count=lost_count,
    )
    return RecoveryStep(sql, args, recovered)


class Bookings(Protocol):
    """What a SQL store's transaction collects for after its commit."""

    work: bool
    finished: list[str]

    def add(self, name: str, n: int = 1) -> None: ...


def book_recovered(tx: Bookings, recovered: Recovered) -> None:
    """Count a recovery in the transaction's totals and wakeups."""
    if recovered.action == "requeued":
        tx.work = True
    else:
        tx.add(recovered.action)
        tx.finished.append(recovered.run_id)
    tx.add("lost")
