"""Rows of the SQL run stores turned into the store's values, and values into column text.

Shared by the SQLite and PostgreSQL stores, which select the same columns in
the same order (``queries.RUN_COLUMNS``, ``queries.NODE_COLUMNS``).
"""

from __future__ import annotations

import logging
import math
import re
import reprlib
import shlex

from collections.abc import Callable, Collection, Hashable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from pydantic import ValidationError
from pydantic_core import from_json, to_json

from ..errors import StoreError
from ..runs import Progress, RunError, RunStatus
from . import queries as Q
from .base import lost_action, lost_reason, trigger_record
from .models import (
    Counts,
    LostReason,
    NodeInfo,
    Recovered,
    StoredJob,
    StoredRun,
    TriggerKeyRecord,
    lost_note,
    worker_lost_error,
)


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




def failed_at_claim(seq: int, token: str, now: float, error: RunError) -> dict[str, Any]:
    """The finish values that fail a claimed run which cannot start (its params unreadable):
    left pending, every claim from then on would take it again."""
    return {"seq": seq, "token": token, "now": now, "lost": 0, "result": None,
            "error": error_json(error), "cancel_reason": None, "status": "failed"}  # fmt: skip


class TriggerSave(NamedTuple):
    """What ``Store.save_trigger`` writes, as statement parameters: the rows to insert or
    replace, those to delete, and the keys of ``rows`` to write only over a row still there."""

    rows: list[dict[str, Any]]
    gone: list[dict[str, Any]]
    held: list[str]


def trigger_save(
    trigger: str, incarnation: str, keys: Mapping[str, TriggerKeyRecord], forget: Collection[str], held: Collection[str]
) -> TriggerSave:
    mine = {"trigger": trigger, "holder": incarnation, "nonce": None}
    return TriggerSave(
        rows=[{**mine, "key": key, **rec.model_dump()} for key, rec in keys.items()],
        gone=[{"trigger": trigger, "holder": incarnation, "key": key} for key in forget],
        held=[key for key in held if key in keys],
    )


def counts_of(rows: Sequence[Sequence[Any]]) -> Counts:
    """:class:`Counts` from the rows of ``queries.COUNTS`` (``'status'`` or ``'total'``, name, value)."""
    by_status = {s.value: 0 for s in RunStatus}
    totals: dict[str, int] = {}
    for what, name, value in rows:
        (by_status if what == "status" else totals)[name] = int(value)
    return Counts(by_status=by_status, **{f"{k}_total": v for k, v in totals.items()})


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


#: the ``type`` of the error a run's record carries when a column of its row could not be read
UNREADABLE = "UnreadableColumn"

#: what decoding a column raises for a value taskwatch did not write there (TypeError: not
#: text at all, a number written by hand, say; ValueError: text that is no such JSON)
_UNDECODABLE = (ValueError, TypeError)

#: damaged runs a store remembers having logged; past that many it forgets them, and may log one again
_TOLD_MAX = 10_000

_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false"}


class Unreadable(Exception):
    """A column of a run's row that does not hold what taskwatch writes there."""

    def __init__(self, column: str, why: str) -> None:
        super().__init__(f"column {column!r} could not be read ({why})")
        self.column = column
        self.why = why


def _decoded(column: str, text: Any) -> Any:
    try:
        return loads(text)
    except _UNDECODABLE as exc:
        raise Unreadable(column, f"{type(exc).__name__}: {exc}") from None


def stored_job(job_id: int, text: Any, handovers: Any) -> StoredJob:
    """A queue job's row as its queue takes it up; one whose ``job`` is no JSON comes with why
    (a ``handovers`` that is no count, changed by hand as well, counts none)."""
    if type(handovers) is not int:
        handovers = 0
    try:
        return StoredJob(job_id, loads(text), handovers)
    except _UNDECODABLE as exc:
        held = text if isinstance(text, str) else repr(text)
        return StoredJob(job_id, held, handovers, f"column 'job' could not be read ({type(exc).__name__}: {exc})")


def _object(column: str, text: Any) -> dict[str, Any]:
    value = _decoded(column, text)
    if not isinstance(value, dict):
        raise Unreadable(column, f"it holds {_JSON_KINDS.get(type(value), 'null')}, not a JSON object")
    return value


def _check_claimed(created_at: Any, attempt: Any, max_attempts: Any, lost_count: Any, key: Any, source: Any) -> None:
    """Raise :class:`Unreadable` for a column besides ``params`` that a claim reads and that does
    not hold what taskwatch writes there (SQLite keeps whatever a hand writes into a column):
    the run's record, which reads leave out, would carry it into the engine."""
    if type(created_at) not in (int, float) or not math.isfinite(created_at):
        raise Unreadable("created_at", f"it holds {reprlib.repr(created_at)}, not a time")
    for column, count in (("attempt", attempt), ("max_attempts", max_attempts), ("lost_count", lost_count)):
        if type(count) is not int:
            raise Unreadable(column, f"it holds {reprlib.repr(count)}, not a count")
    for column, text, optional in (("dedup_key", key, True), ("source", source, False)):
        if not (type(text) is str or (optional and text is None)):
            raise Unreadable(column, f"it holds {reprlib.repr(text)}, not text")


def _error(text: Any) -> RunError:
    try:
        return RunError.model_validate(_object("error", text))
    except _UNDECODABLE:  # a ValidationError
        raise Unreadable("error", "it holds no error taskwatch wrote (a type and a message)") from None


#: a run row's times, checked finite as it is read
_TIME_COLUMNS = ("created_at", "started_at", "finished_at", "run_after", "lease_until")


def _why(exc: BaseException) -> str:
    """What a row's values failed to make, in one line (a ValidationError says it in several)."""
    if isinstance(exc, ValidationError):
        return "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'row'}: {e['msg']} (it holds {reprlib.repr(e['input'])})"
            for e in exc.errors()
        )
    return f"{type(exc).__name__}: {exc}"


def _sql_text(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def sqlite_console(path: str) -> Callable[[str], str]:
    """How to run a statement on the SQLite file at ``path``: a command line of the sqlite3 shell."""

    def console(sql: str) -> str:
        # double quotes read best; anything a shell would expand inside them is quoted the safe way
        shown = f'"{sql}"' if re.fullmatch(r'[^"$`\\!]*', sql) else shlex.quote(sql)
        return f"sqlite3 {shlex.quote(path)} {shown}"

    return console


#: how far past a node's clock a periodic task's last fire may be and still be taken as one.
#: A slot is recorded once it has come, on the clock of the node that fires it, so a later
#: one means a clock that ran ahead (or a row changed by hand): taken as it is, it would hold
#: the task's slots on every node until that time, without a word. Clocks of nodes kept by
#: NTP are apart by far less than this
FIRE_AHEAD = 86_400.0


class RunRows:
    """One SQL store's run rows turned into its values, every row on its own: a row changed by
    hand (a database shell writing a Python repr into ``params``, say) fails no read, no
    claim and no engine start, and holds up none of the other runs.

    - A JSON column that does not decode shows empty (``params`` as ``{}``, ``result`` as
      None) and the record's ``error`` says which column could not be read and why
      (:data:`UNREADABLE`). A run whose ``params`` cannot be read cannot start: the claim
      that takes it fails it at once with that error (:meth:`params`), and it ends there.
    - A row that makes no record at all (a status or a time that is no such value) is left as
      it is: reads leave it out (:meth:`runs`), reading it alone raises :class:`StoreError`.

    Each damaged run is logged at ERROR once (per store object), with the statement that
    shows its row; those left out are counted in :attr:`left_out`.

    The nodes table's rows are read alike (:meth:`nodes`): one that makes no node is left
    out, so it holds up no start, no recovery and no adoption of the other nodes' work.
    """

    def __init__(self, where: str, log: logging.Logger, console: Callable[[str], str], table: str = "runs") -> None:
        self.where = where
        self._log = log
        #: a statement as the user would run it on this store
        self._console = console
        #: the runs table as a statement names it
        self._table = table
        #: ids of the runs whose rows make no record, left out of reads
        self.left_out: set[str] = set()
        self._told: set[Hashable] = set()

    def run(self, r: Sequence[Any]) -> StoredRun | None:
        """The record of a row of ``queries.RUN_COLUMNS``; None for one that makes no record."""
        run = self._read(r)
        if isinstance(run, str):
            self._left_out(r[1], run)
            return None
        return run

    def runs(self, rows: Iterable[Sequence[Any]]) -> list[StoredRun]:
        """The records of ``rows``, without those that make none."""
        return [run for r in rows if (run := self.run(r)) is not None]

    def record(self, r: Sequence[Any]) -> StoredRun:
        """The record of the one run a caller asked for; :class:`StoreError` if its row makes none."""
        run = self._read(r)
        if isinstance(run, str):
            self._left_out(r[1], run)
            raise StoreError(
                f"run {r[1]!r} in the run store {self.where} cannot be read: its row holds what taskwatch "
                f"does not write there (changed by hand?): {run}. Nothing was changed. {self._how_to_look(r[1])}"
            )
        return run

    def _read(self, r: Sequence[Any]) -> StoredRun | str:
        """The record of a row, or why it makes none."""
        (
            seq, run_id, task, params, status, attempt, max_attempts, lost_count, created_at, started_at,
            finished_at, run_after, node, incarnation, token, lease_until, cancel_requested, cancel_reason,
            done, total, message, result, error, key, source, on_lost,
        ) = r  # fmt: skip
        damage: list[Unreadable] = []
        try:
            params = _object("params", params)
        except Unreadable as exc:
            damage.append(exc)
            params = {}
        if result is not None:
            try:
                result = _decoded("result", result)
            except Unreadable as exc:
                damage.append(exc)
                result = None
        if error is not None:
            try:
                error = _error(error)
            except Unreadable as exc:
                damage.append(exc)
                error = None
        for column, value in zip(_TIME_COLUMNS, (created_at, started_at, finished_at, run_after, lease_until), strict=True):
            if type(value) is float and not math.isfinite(value):
                # PostgreSQL's double precision takes 'Infinity' and 'NaN' (psql, say): no time,
                # which every comparison, JSON and the dashboard's tables would trip over
                return f"{column}: it holds {value!r}, not a time"
        note = None
        if damage and not (isinstance(error, RunError) and error.type == UNREADABLE):
            # (one the claim that failed the run recorded says it already)
            note = error = self._note(damage, "to start" if status == "pending" else "shown")
        try:
            stored = StoredRun(
                id=run_id,
                task=task,
                params=params,
                status=status,
                attempt=attempt,
                max_attempts=max_attempts,
                created_at=created_at,
                started_at=started_at,
                finished_at=finished_at,
                # an older taskwatch stored non-finite progress: read back as none, never refused
                progress=Progress(done=_finite(done) or 0.0, total=_finite(total), message=message),
                result=result,
                error=error,
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
        except _UNDECODABLE as exc:  # a ValidationError, or a time that is no number (math.isfinite)
            return _why(exc)
        if note is not None:
            self._tell(run_id, note)
        return stored

    def claimed(
        self, run_id: str, text: Any, created_at: Any, attempt: Any, max_attempts: Any, lost_count: Any,
        key: Any, source: Any,
    ) -> dict[str, Any] | RunError:
        """A claimed run's params; if they, or another column the claim reads, cannot be read, the
        error to fail the run with (it cannot start, and claimed again it would fail again; left
        pending it would be the oldest candidate of every claim from then on)."""
        try:
            params = _object("params", text)
            _check_claimed(created_at, attempt, max_attempts, lost_count, key, source)
            return params
        except Unreadable as exc:
            err = self._note([exc], "claimed")
            self._log.error("run %s is failed at its claim: %s. %s", run_id, err.message, self._how_to_look(run_id))
            return err

    def error(self, run_id: str, text: Any) -> RunError | None:
        """The error of a claimed run's last attempt (None before any); one that cannot be read is
        replaced by an error saying so (the run can still start)."""
        if text is None:
            return None
        try:
            return _error(text)
        except Unreadable as exc:
            note = self._note([exc], "to start")
            self._tell(run_id, note)
            return note

    def _note(self, damage: list[Unreadable], when: str) -> RunError:
        """The error a damaged run's record carries. ``when``: the run is "to start" (pending),
        "claimed" now, or "shown" only (it started or ended before the damage)."""
        parts = []
        for d in damage:
            part = str(d)
            if d.column == "params":
                part += {
                    "to start": ", so the run cannot start: the claim that takes it fails it",
                    "claimed": ", so the run could not start and was failed",
                    "shown": "; its params show as {}",
                }[when]
                if when != "shown":
                    part += "; submit it again with the params it needs"
            elif d.column == "result":
                part += "; its result shows as None"
            elif when == "claimed":
                part += ", so the run could not start and was failed; submit it again"
            parts.append(part)
        return RunError(
            type=UNREADABLE,
            message=(
                f"the run's row in the run store {self.where} holds what taskwatch did not write there "
                f"(changed by hand?): {'; '.join(parts)}"
            ),
        )

    def _tell(self, run_id: str, note: RunError) -> None:
        if self._first_time(run_id):
            self._log.error("run %s: %s. %s", run_id, note.message, self._how_to_look(run_id))

    def _left_out(self, run_id: str, why: str) -> None:
        self.left_out.add(run_id)
        if self._first_time(run_id):
            self._log.error(
                "run %s in the run store %s makes no record (%s): it is left as it is, and left out of "
                "what the store reads (%d such run(s) so far). %s",
                run_id, self.where, why, len(self.left_out), self._how_to_look(run_id),
            )  # fmt: skip

    def _first_time(self, run_id: Hashable) -> bool:
        if run_id in self._told:
            return False
        if len(self._told) >= _TOLD_MAX:
            self._told.clear()
        self._told.add(run_id)
        return True

    def _how_to_look(self, run_id: Any, table: str | None = None, column: str = "id") -> str:
        return self._statements(table or self._table, f"{column} = {_sql_text(str(run_id))}")

    def _statements(self, table: str, where: str) -> str:
        return (
            f"Look at its row with: {self._console(f'SELECT * FROM {table} WHERE {where}')}; "
            f"fix it there, or delete it with: {self._console(f'DELETE FROM {table} WHERE {where}')}"
        )

    def trigger_key(self, trigger: str, key: str, row: Sequence[Any]) -> TriggerKeyRecord | None:
        """A saved key of ``trigger`` from its row's columns (``queries.TRIGGER_KEY_COLUMNS``);
        None for a row that makes none (a count written as text, say), logged at ERROR once:
        the key is taken up as never counted, so the trigger's start holds up no other key."""
        try:
            return trigger_record(row)
        except _UNDECODABLE as exc:
            if self._first_time(("trigger_keys", trigger, key)):
                where = f"trigger_name = {_sql_text(trigger)} AND counter_key = {_sql_text(key)}"
                self._log.error(
                    "trigger %r, key %r: its saved row in the run store %s makes no key (%s): the key is taken "
                    "up as never counted, and its row dropped or written over by the key's next save. %s",
                    trigger, key, self.where, _why(exc), self._statements("trigger_keys", where),
                )  # fmt: skip
            return None

    def periodic_fire(self, name: str, stored: Any, now: float) -> float | None:
        """The time periodic task ``name`` last fired as its row holds it; None (never) for a
        value that is no time (changed by hand: 'NaN' or 'Infinity' in PostgreSQL, text in
        SQLite) or more than :data:`FIRE_AHEAD` after ``now``, logged at ERROR once: its next
        fire writes a time over it."""
        if stored is None:
            return None
        if type(stored) in (int, float) and math.isfinite(stored):
            if stored <= now + FIRE_AHEAD:
                return stored  # type: ignore[no-any-return]
            why = (
                f"more than a day after this node's clock ({now:.0f}): this node's clock set back by more than a "
                "day, or the time written by a node whose clock ran ahead, or by hand?"
            )
        else:
            why = "which is no time (changed by hand?)"
        if self._first_time(("periodic", name)):
            self._log.error(
                "periodic task %r: its row in the run store %s holds %s as the time it last fired, %s: it is "
                "taken as never fired, and its next fire writes over it. %s",
                name, self.where, reprlib.repr(stored), why, self._how_to_look(name, "periodic", "name"),
            )  # fmt: skip
        return None

    def nodes(self, rows: Iterable[Sequence[Any]]) -> NodeRows:
        """The nodes of rows of ``queries.NODE_COLUMNS``, without those whose row makes none
        (changed by hand: a time written as text, say), each logged at ERROR once. Such a node
        is neither gone nor shown: its queue jobs and trigger keys stay its own (it may be alive
        and working), and its claims are taken back once their lease is out, as a node's without
        a row are; until its row is fixed or deleted."""
        out = NodeRows([], set())
        for r in rows:
            try:
                info = node_info(r)
                for column in ("started_at", "last_heartbeat", "stopped_at"):
                    value = getattr(info, column)
                    if value is not None and not math.isfinite(value):
                        raise ValueError(f"{column}: it holds {value!r}, not a time")
            except _UNDECODABLE as exc:
                incarnation = r[1]
                out.unreadable.add(incarnation)
                if self._first_time(("nodes", incarnation)):
                    self._log.error(
                        "the nodes row of incarnation %s in the run store %s makes no node (%s): it is left as "
                        "it is; its claims are taken back once their lease is out, and its queue jobs and "
                        "trigger keys stay its own until the row is fixed or deleted. %s",
                        incarnation, self.where, _why(exc), self._how_to_look(incarnation, "nodes", "incarnation"),
                    )  # fmt: skip
                continue
            out.nodes.append(info)
        return out


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


class NodeRows(NamedTuple):
    """The nodes table as read: the nodes its rows make, and the incarnations of those that make none."""

    nodes: list[NodeInfo]
    unreadable: set[str]

    @property
    def known(self) -> set[str]:
        """Every incarnation with a row: one whose row cannot be read may be alive, and keeps what it holds."""
        return {n.incarnation for n in self.nodes} | self.unreadable


class RecoveryStep(NamedTuple):
    """What recovery does with one running claim: a statement, its arguments, and the record of it."""

    sql: str
    args: dict[str, Any]
    recovered: Recovered


def claim_lease(incarnation: str | None, lease_until: Any, known: Collection[str]) -> float | None:
    """A running claim's lease as recovery judges it. One changed by hand into no time (text in
    SQLite, 'NaN' in PostgreSQL) fails no recovery: it has run out for an owner with no nodes
    row (no renewal is coming), and never for one with a row (it may be alive, and its next
    renewal writes over it; gone, it is recovered as gone)."""
    if lease_until is None or (type(lease_until) in (int, float) and math.isfinite(lease_until)):
        return lease_until  # type: ignore[no-any-return]
    return math.inf if incarnation in known else None


def recovery_step(
    row: Sequence[Any],
    now: float,
    gone: Mapping[str, LostReason],
    live: Collection[str] | None,
    max_lost: int,
    known: Collection[str] = (),
    held: Collection[str] = (),
) -> RecoveryStep | None:
    """The step for a claim row of ``queries.RUNNING_CLAIMS``'s columns; None while its owner may hold it.

    ``known``: the incarnations with a nodes row. Both SQL stores run the statement in the
    recovering transaction and book the record's action (totals, wakeups) the same way.
    """
    seq, run_id, task, node, inc, token, lease_until, cancel_req, lost_count, on_lost, attempt = row
    why = lost_reason(inc, claim_lease(inc, lease_until, known), now, gone, live, held)
    if why is None:
        return None
    # (a count changed by hand into no count is none)
    lost_count = (lost_count if type(lost_count) is int else 0) + 1
    if type(attempt) is not int:
        attempt = 1
    action = lost_action(bool(cancel_req), lost_count, on_lost, max_lost)
    args: dict[str, Any] = {"seq": seq, "token": token, "now": now, "lost": 1, "result": None, "cancel_reason": None}
    if action == "requeued":
        # a crash's loss counts against max_attempts (added=0), unlike a graceful stop's cut (Retry.cut_short)
        args.update(run_after=now, step=1, added=0, error=error_json(lost_note(why)))
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
