"""The typed events the engine publishes on its debug-event bus.

Every event is a frozen pydantic model with a ``kind`` discriminator, a
per-engine monotonic ``seq``, a wall-clock ``ts`` (UNIX seconds) and the
``node`` that emitted it. :data:`Event` is the discriminated union of all of
them; :func:`event_to_json` and :func:`event_from_json` round-trip losslessly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter

from .runs import CancelReason, RunError

if TYPE_CHECKING:
    from pydantic import PrivateAttr
    from pydantic._internal._model_construction import ModelMetaclass
    from typing_extensions import dataclass_transform

    # What type checkers see of an event class: pydantic's model transform, frozen as the
    # models are (model_config). Frozen fields are read-only to a checker, so a subclass may
    # narrow BaseEvent's ``kind: str`` to its ``Literal``; with pydantic's own (mutable) view,
    # pyright refuses that override, and a ``frozen=True`` class keyword would make every
    # subclass, a user's too, say it again
    @dataclass_transform(kw_only_default=True, frozen_default=True, field_specifiers=(Field, PrivateAttr))
    class _EventMeta(ModelMetaclass): ...
else:
    _EventMeta = type(BaseModel)


class BaseEvent(BaseModel, metaclass=_EventMeta):
    model_config = ConfigDict(frozen=True)

    if TYPE_CHECKING:
        # every event has one (each class sets its own, e.g. Literal["run.failed"]); declared
        # for type checkers only: a field here would lead every event's dump and JSON, and
        # cost each event built a field more
        kind: str

    seq: int = 0
    ts: float = 0.0
    node: str = ""


# ---------------------------------------------------------------- runs


class RunEvent(BaseEvent):
    run_id: str
    task: str


class RunSubmitted(RunEvent):
    kind: Literal["run.submitted"] = "run.submitted"
    params: dict[str, Any] = Field(default_factory=dict)
    key: str | None = None
    source: str = "submit"
    max_attempts: int = 1


class RunOutcomeEvent(RunEvent):
    #: True when this node read it from the store: another node started or ended the run
    #: (this node submitted it, or waits on it) and publishes the event of its own; a
    #: relay sends only that one to the cluster, so a run is started and ended once there
    from_store: bool = False


class RunStarted(RunOutcomeEvent):
    kind: Literal["run.started"] = "run.started"
    attempt: int = 1


def _a_number(value: Any) -> Any:
    # a bool is an int to Python and "3" converts: neither is an amount of work a task meant
    if isinstance(value, (bool, str, bytes)):
        raise ValueError("should be a number, not a bool or text")
    return value


#: an amount of progress: a finite number (JSON has no NaN or infinity, and an attached
#: dashboard reads these back), given as one
ProgressAmount = Annotated[float, BeforeValidator(_a_number), Field(allow_inf_nan=False)]


class RunProgressed(RunEvent):
    kind: Literal["run.progress"] = "run.progress"
    done: ProgressAmount = 0
    total: ProgressAmount | None = None
    message: str = ""


class RunRetrying(RunEvent):
    kind: Literal["run.retrying"] = "run.retrying"
    attempt: int = Field(description="the attempt that will run next")
    delay: float
    error: RunError
    #: the run's attempt budget from now on: one more than before when a stop cut the attempt
    #: short (a stop is no failure of its code). None from a node that does not say it
    max_attempts: int | None = None
    #: True when this node read it from the store: another node's attempt failed (see
    #: RunOutcomeEvent.from_store; a relay leaves it out, that node's own goes to the cluster)
    from_store: bool = False


class RunSucceeded(RunOutcomeEvent):
    kind: Literal["run.succeeded"] = "run.succeeded"
    attempt: int = 1
    duration: float = 0.0
    result: Any = None


class RunFailed(RunOutcomeEvent):
    kind: Literal["run.failed"] = "run.failed"
    attempt: int = 1
    duration: float = 0.0
    error: RunError


class RunRecovered(RunEvent):
    """A run whose worker was lost, taken back by recovery.

    ``action`` says what became of it: ``requeued`` (pending again, with
    ``attempt`` counted up), ``failed`` (as ``WorkerLost``: lost too often, or
    its task says ``on_lost="fail"``) or ``cancelled`` (a cancel was pending).
    A ``failed`` or ``cancelled`` run also gets its usual finished event, from
    the node that recovered it (the node that ran it is gone), so the cluster
    bus carries it once.
    """

    kind: Literal["run.recovered"] = "run.recovered"
    action: Literal["requeued", "failed", "cancelled"]
    reason: str
    attempt: int
    lost_count: int
    from_node: str | None = None


class RunCancelled(RunOutcomeEvent):
    kind: Literal["run.cancelled"] = "run.cancelled"
    attempt: int = 1
    reason: CancelReason = "user"
    was_running: bool = False


# ---------------------------------------------------------------- engine and bus


class EngineStarted(BaseEvent):
    kind: Literal["engine.started"] = "engine.started"
    backend: str = "asyncio"


class EngineStopping(BaseEvent):
    kind: Literal["engine.stopping"] = "engine.stopping"
    timeout: float
    pending: int = 0
    running: int = 0


class EngineStopped(BaseEvent):
    kind: Literal["engine.stopped"] = "engine.stopped"
    cancelled_pending: int = 0
    cancelled_running: int = 0


class EventsDropped(BaseEvent):
    """Told to one subscriber whose buffer overflowed: it missed ``count`` events."""

    kind: Literal["bus.dropped"] = "bus.dropped"
    count: int
    total: int


# ---------------------------------------------------------------- periodic scheduler


class PeriodicRegistered(BaseEvent):
    kind: Literal["periodic.registered"] = "periodic.registered"
    name: str
    trigger: str
    enabled: bool
    reason: str | None = None
    next_due: float | None = None


class PeriodicSkipped(BaseEvent):
    """A tick came due and passed without a run: the previous run was still going
    (``reason="overlap"``, naming it), or the engine's run queue was full (``"queue_full"``)."""

    kind: Literal["periodic.skipped"] = "periodic.skipped"
    name: str
    running_run_id: str | None = None
    skipped_total: int = 0
    reason: Literal["overlap", "queue_full"] = "overlap"


class PeriodicPaused(BaseEvent):
    kind: Literal["periodic.paused"] = "periodic.paused"
    name: str


class PeriodicResumed(BaseEvent):
    kind: Literal["periodic.resumed"] = "periodic.resumed"
    name: str
    next_due: float | None = None


# ---------------------------------------------------------------- queues


class QueueJobFailed(BaseEvent):
    kind: Literal["queue.job_failed"] = "queue.job_failed"
    queue: str
    job: Any = None
    error: RunError


class QueueStatsEvent(BaseEvent):
    kind: Literal["queue.stats"] = "queue.stats"
    queue: str
    depth: int
    in_flight: int
    processed: int
    failed: int
    maxsize: int


class QueueDrainIncomplete(BaseEvent):
    """``engine.stop`` hit its timeout with jobs still queued: they were not run.

    ``kept``: the jobs wait in the engine's durable store for its next start
    (False: they are gone).
    """

    kind: Literal["queue.drain_incomplete"] = "queue.drain_incomplete"
    queue: str
    left: int
    kept: bool = False


class QueuePaused(BaseEvent):
    """``pause_queue``: the consumers take no more jobs; puts are still accepted up to ``maxsize``.

    Jobs already being handled finish; ``depth`` jobs were waiting then.
    """

    kind: Literal["queue.paused"] = "queue.paused"
    queue: str
    depth: int = 0


class QueueResumed(BaseEvent):
    """``resume_queue``: the consumers take jobs again, ``depth`` of them waiting."""

    kind: Literal["queue.resumed"] = "queue.resumed"
    queue: str
    depth: int = 0


class QueuePurged(BaseEvent):
    """``purge_queue`` dropped ``purged`` waiting jobs (jobs being handled were left to finish).

    ``from_store``: of those, how many were deleted from the durable store (the
    others had not been written yet); they will not come back at the next start.
    """

    kind: Literal["queue.purged"] = "queue.purged"
    queue: str
    purged: int
    from_store: int = 0


# ---------------------------------------------------------------- triggers


class TriggerFired(BaseEvent):
    kind: Literal["trigger.fired"] = "trigger.fired"
    trigger: str
    key: str
    #: ``manual``: fired with ``fire_trigger``, whatever its count
    reason: Literal["size", "staleness", "manual"]
    count: int
    run_id: str | None = None


# ---------------------------------------------------------------- supervised workers


class WorkerStarted(BaseEvent):
    kind: Literal["worker.started"] = "worker.started"
    name: str
    restarts: int = 0
    term: int | None = None


class WorkerCrashed(BaseEvent):
    kind: Literal["worker.crashed"] = "worker.crashed"
    name: str
    error: RunError
    restarts: int
    restart_in: float


class WorkerStopped(BaseEvent):
    """A worker's run ended without a crash.

    ``reason``: ``returned`` (it returned; it runs again after its backoff),
    ``cancelled``, ``leadership_lost``, ``shutdown`` (the engine stops),
    ``user`` (``stop_worker``: it stays stopped until ``start_worker`` or
    ``restart_worker``) or ``restart`` (``restart_worker``: it starts again at once).
    """

    kind: Literal["worker.stopped"] = "worker.stopped"
    name: str
    reason: Literal["returned", "cancelled", "leadership_lost", "shutdown", "user", "restart"]


class WorkerResumed(BaseEvent):
    """``start_worker`` let a worker stopped with ``stop_worker`` run again.

    ``state`` is ``running`` when it started at once, ``waiting_for_leadership``
    for a leader-only worker on a node that does not lead (it starts when it does).
    """

    kind: Literal["worker.resumed"] = "worker.resumed"
    name: str
    state: str


# ---------------------------------------------------------------- leadership


class LeaseEvent(BaseEvent):
    """A change of leadership as the emitting ``node`` saw it.

    ``holder``, ``term`` and ``expires_at`` describe the lease after the
    change; ``previous_holder`` and ``previous_term`` the one before it (on
    ``lease.acquired``, the holder this node last saw, ``None`` if it saw
    none; on ``lease.renewed``, ``lease.lost`` and ``lease.released``, this node itself).
    """

    holder: str | None = None
    term: int = 0
    expires_at: float | None = None
    previous_holder: str | None = None
    previous_term: int | None = None


class LeaseAcquired(LeaseEvent):
    kind: Literal["lease.acquired"] = "lease.acquired"


class LeaseRenewed(LeaseEvent):
    kind: Literal["lease.renewed"] = "lease.renewed"


class LeaseLost(LeaseEvent):
    kind: Literal["lease.lost"] = "lease.lost"


class LeaseReleased(LeaseEvent):
    kind: Literal["lease.released"] = "lease.released"


# ---------------------------------------------------------------- the store


class StoreUnreachable(BaseEvent):
    """This node could not renew its claims in the store for longer than the claim lease.

    Published when it steps down (it stops claiming and gives up leadership),
    and again for each claim that expires later while it is still cut off.
    ``stopped``: the runs stopped here because their claims ran out; the store
    hands them to another node (or back to pending when it answers again).
    """

    kind: Literal["store.unreachable"] = "store.unreachable"
    store: str
    seconds: float = Field(description="since this node last renewed its claims")
    stopped: list[str] = Field(default_factory=list)


class StoreReachable(BaseEvent):
    """The store answers again: this node claims runs and competes for leadership again."""

    kind: Literal["store.reachable"] = "store.reachable"
    store: str
    seconds: float = Field(description="how long it was cut off")


class NodeSuperseded(BaseEvent):
    """A later process started under this node's id, and the store counts this one gone.

    Published once, by the process replaced (one that was paused while a
    restart took its place, or a second process given the same ``node_id``),
    when a heartbeat tells it. It claims no more runs, stops those it was
    executing (``stopped``: the other nodes recover them) and gives up
    leadership, but keeps running: stop it, or give each process its own id.
    """

    kind: Literal["node.superseded"] = "node.superseded"
    store: str
    incarnation: str = Field(description="this process's incarnation, which the later start replaced")
    stopped: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- health


class HealthSample(BaseEvent):
    kind: Literal["health"] = "health"
    cpu_percent: float
    rss_bytes: int
    threads: int
    open_fds: int
    loop_lag_ms: float
    running: int
    queue_depth: int
    queue_depths: dict[str, int] = Field(default_factory=dict)
    finished_per_s: float
    failed_per_s: float


Event = Annotated[
    RunSubmitted
    | RunStarted
    | RunProgressed
    | RunRetrying
    | RunSucceeded
    | RunFailed
    | RunCancelled
    | RunRecovered
    | EngineStarted
    | EngineStopping
    | EngineStopped
    | EventsDropped
    | PeriodicRegistered
    | PeriodicSkipped
    | PeriodicPaused
    | PeriodicResumed
    | QueueJobFailed
    | QueueStatsEvent
    | QueueDrainIncomplete
    | QueuePaused
    | QueueResumed
    | QueuePurged
    | TriggerFired
    | WorkerStarted
    | WorkerCrashed
    | WorkerStopped
    | WorkerResumed
    | LeaseAcquired
    | LeaseRenewed
    | LeaseLost
    | LeaseReleased
    | StoreUnreachable
    | StoreReachable
    | NodeSuperseded
    | HealthSample,
    Field(discriminator="kind"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)

#: every event kind, e.g. for a dashboard's filter menu
def _descendants(cls: type[BaseEvent]) -> list[type[BaseEvent]]:
    return [d for sub in cls.__subclasses__() for d in (sub, *_descendants(sub))]


EVENT_KINDS: tuple[str, ...] = tuple(
    cls.model_fields["kind"].default for cls in _descendants(BaseEvent) if "kind" in cls.model_fields
)

FINISHED_RUN_KINDS = frozenset({"run.succeeded", "run.failed", "run.cancelled"})


def event_to_json(event: BaseEvent) -> str:
    return event.model_dump_json()


def event_from_json(data: str | bytes) -> Event:
    """Parse one event; raises pydantic's ``ValidationError`` on anything malformed."""
    return EVENT_ADAPTER.validate_json(data)


def event_to_dict(event: BaseEvent) -> dict[str, Any]:
    return event.model_dump(mode="json")


def event_from_dict(data: dict[str, Any]) -> Event:
    return EVENT_ADAPTER.validate_python(data)
