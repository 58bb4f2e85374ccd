"""Rows of the SQL run stores turned into the store's values, and values into column text.

Shared by the SQLite and PostgreSQL stores, which select the same columns in
the same order (``queries.RUN_COLUMNS``, ``queries.NODE_COLUMNS``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic_core import from_json, to_json

from ..runs import Progress, RunError
from .models import NodeInfo, StoredRun


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
        progress=Progress(done=done, total=total, message=message),
        result=None if result is None else loads(result),
        error=None if error is None else RunError(**loads(error)),
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
    node, incarnation, version, started_at, last_heartbeat, running, stopped_at = r
    return NodeInfo(
        node=node,
        incarnation=incarnation,
        version=version,
        started_at=started_at,
        last_heartbeat=last_heartbeat,
        running=running,
        stopped_at=stopped_at,
    )
