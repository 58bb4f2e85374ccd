"""The values a run store takes and returns.

Values on the hot path (one per run: :class:`NewRun`, :class:`Claim`, the
outcomes) are plain slotted dataclasses (not frozen: a frozen dataclass's
``__init__`` costs several times more), because the in-memory store must
cost a few microseconds per run and pydantic validation alone costs more.
Treat them as read-only. Values
handed to queries, dashboards and events (:class:`StoredRun`, :class:`Page`,
:class:`Counts`, :class:`Recovered`, ...) are frozen pydantic models, built
only when asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field

from ..runs import CancelReason, RunError, RunRecord, RunStatus

#: what recovery does with a run whose worker was lost: run it again, or fail it
OnLost = Literal["retry", "fail"]


@dataclass(slots=True)
class NewRun:
    """A run to insert. ``id`` and ``created_at`` default to a random id and the store's clock."""

    task: str
    params: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    source: str = "submit"
    max_attempts: int = 1
    on_lost: OnLost = "retry"
    #: seconds from now before the run may be claimed (0: at once)
    delay: float = 0.0
    id: str | None = None
    created_at: float | None = None


class Inserted(NamedTuple):
    """One result of ``insert``: the run's id, and whether it is new (False: dedup hit)."""

    id: str
    new: bool


@dataclass(slots=True)
class Claim:
    """A run this node now owns; ``token`` must accompany its heartbeats and its finish."""

    run_id: str
    token: str
    task: str
    params: dict[str, Any]
    attempt: int
    max_attempts: int
    created_at: float
    started_at: float
    lease_until: float
    key: str | None
    source: str
    lost_count: int
    #: the error of its last failed attempt (None before any): a run retried on another node
    #: keeps it there, as it is kept where it failed
    error: RunError | None = None


# ---------------------------------------------------------------- outcomes


@dataclass(slots=True)
class Succeeded:
    result: Any = None


@dataclass(slots=True)
class Failed:
    error: RunError


@dataclass(slots=True)
class Cancelled:
    reason: CancelReason = "user"


@dataclass(slots=True)
class Retry:
    """The attempt failed and the run goes back to pending with ``attempt + 1``, due in ``delay`` s.

    ``next_attempt=False`` hands a claim back whose attempt never started (its
    node stopped first): pending again with the same attempt, and not counted
    as a retry.

    ``cut_short``: the attempt's node cut it short at a graceful stop, which is no failure
    of the run's code. It still counts as an execution (``attempt + 1``), and in the same
    write ``max_attempts + 1``, so the run keeps the retries it had for failures of its own.
    (A run recovered from a node that crashed is not cut short: its loss counts.)
    """

    error: RunError
    delay: float = 0.0
    next_attempt: bool = True
    cut_short: bool = False

    @property
    def added_attempts(self) -> int:
        """What re-queueing with this outcome adds to the run's ``max_attempts``."""
        return 1 if self.cut_short and self.next_attempt else 0


Outcome = Succeeded | Failed | Cancelled | Retry


# ---------------------------------------------------------------- records


class StoredRun(RunRecord):
    """A run row as the store holds it: the public record plus ownership and queue fields."""

    incarnation: str | None = None
    claim_token: str | None = None
    lease_until: float | None = None
    run_after: float = 0.0
    lost_count: int = 0
    cancel_requested: bool = False
    on_lost: OnLost = "retry"
    #: position in insertion order; query cursors are built from it
    seq: int = 0

    def to_record(self) -> RunRecord:
        """The public :class:`RunRecord`, without the store's fields."""
        data = {name: getattr(self, name) for name in RunRecord.model_fields}
        return RunRecord.model_construct(**data)


class Page(BaseModel):
    """One page of ``query``: newest first; pass ``next`` as ``before`` for the next page."""

    model_config = ConfigDict(frozen=True)

    runs: list[StoredRun]
    next: str | None = None


class Counts(BaseModel):
    """Runs held now, by status, and totals since the store was created (pruning does not lower them)."""

    model_config = ConfigDict(frozen=True)

    by_status: dict[str, int]
    inserted_total: int = 0
    succeeded_total: int = 0
    failed_total: int = 0
    cancelled_total: int = 0
    retried_total: int = 0
    lost_total: int = 0

    @property
    def pending(self) -> int:
        return self.by_status.get(RunStatus.PENDING.value, 0)

    @property
    def running(self) -> int:
        return self.by_status.get(RunStatus.RUNNING.value, 0)


class HeartbeatResult(BaseModel):
    """What a heartbeat learnt: claims with a cancel request (token -> reason), claims lost,
    and claims still held but not renewed this time (``busy``: another session had the row
    locked; the next heartbeat tries again)."""

    model_config = ConfigDict(frozen=True)

    cancel: dict[str, CancelReason] = Field(default_factory=dict)
    lost: list[str] = Field(default_factory=list)
    busy: list[str] = Field(default_factory=list)


class CancelResult(BaseModel):
    """What ``request_cancel`` did: ``cancelled`` (was pending), ``requested`` (running:
    the owner is told), or ``finished`` (too late: nothing changed)."""

    model_config = ConfigDict(frozen=True)

    action: Literal["cancelled", "requested", "finished"]
    run: StoredRun


#: why a running run was taken from its owner
LostReason = Literal["lease_expired", "owner_stopped", "owner_silent", "owner_restarted", "owner_not_live"]


class Recovered(BaseModel):
    """One run taken back from a lost owner: re-queued, failed as WorkerLost, or cancelled."""

    model_config = ConfigDict(frozen=True)

    run_id: str
    task: str
    action: Literal["requeued", "failed", "cancelled"]
    reason: LostReason
    node: str | None
    incarnation: str | None
    #: the attempt number the run has now (re-queued runs count up)
    attempt: int
    lost_count: int


class NodeInfo(BaseModel):
    """One node incarnation (a process) as the nodes table records it."""

    model_config = ConfigDict(frozen=True)

    node: str
    incarnation: str
    version: str
    started_at: float
    last_heartbeat: float
    running: int = 0
    stopped_at: float | None = None
    #: the process's CPU (100 = one core) and resident memory at its last heartbeat
    #: (None: the engine samples no health, ``health_interval=None``)
    cpu_percent: float | None = None
    rss_bytes: int | None = None


class StoredJob(NamedTuple):
    """A queue job as the store keeps it: its row id, its JSON value, and how many times
    the store handed it to a new holder because the one before had ended or was cut off.

    ``unreadable`` says why a row's ``job`` column is no JSON (changed by hand, say); ``job``
    is then what the column holds, as text, for the queue to fail the job with (it holds up
    no other job)."""

    id: int
    job: Any
    handovers: int = 0
    unreadable: str | None = None


class TriggerKeyRecord(BaseModel):
    """One key of a threshold trigger, as saved between runs of the engine.

    ``captured`` is the count the key's active run (``run_id``) was fired
    with; it is taken off ``count`` when that run ends.
    """

    model_config = ConfigDict(frozen=True)

    count: int = 0
    captured: int = 0
    first_seen_at: float | None = None
    last_run_at: float | None = None
    run_id: str | None = None
    last_run_id: str | None = None
    last_status: str | None = None


@dataclass(slots=True)
class Wakeup:
    """Changes since a subscriber last looked: new work, cancels of running runs, finished runs."""

    work: bool = False
    cancels: set[str] = field(default_factory=set)
    finished: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.work or bool(self.cancels) or bool(self.finished)


def worker_lost_error(run_id: str, lost_count: int, reason: str, on_lost: OnLost, max_lost: int) -> RunError:
    why = (
        "its task is declared on_lost='fail'"
        if on_lost == "fail" and lost_count < max_lost
        else f"it was lost {lost_count} times (limit {max_lost})"
    )
    return RunError(
        type="WorkerLost",
        message=(
            f"run {run_id} lost its worker ({reason.replace('_', ' ')}) and {why}, so it is failed "
            "instead of run again; check that worker's logs for a crash or an out-of-memory kill"
        ),
    )


def lost_note(reason: str) -> RunError:
    """The error kept on a re-queued run, so its record says why it went back to pending."""
    return RunError(type="WorkerLost", message=f"its worker was lost ({reason.replace('_', ' ')}); re-queued")
