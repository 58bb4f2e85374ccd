"""Run records: the public pydantic models and the engine's internal run state.

A run is one submission of a task. The engine keeps a cheap mutable
:class:`Run` per submission and hands out immutable :class:`RunRecord`
snapshots, which are JSON-serialisable so a durable or distributed store can
hold them unchanged.
"""

from __future__ import annotations

import os
import traceback
import weakref
from enum import StrEnum
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .errors import InvalidStatus
from .jsonsafe import cut_text, safe_str, safe_text
from .trusted import construct

if TYPE_CHECKING:
    import asyncio

    from .tasks import TaskSpec


class RunStatus(StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED})


def run_status(value: RunStatus | str) -> RunStatus:
    """``value`` as a :class:`RunStatus`; raises :class:`InvalidStatus` naming the statuses there are."""
    try:
        return RunStatus(value)
    except ValueError:
        raise InvalidStatus(value, [s.value for s in RunStatus]) from None

#: Why a run was cancelled: by a user (``engine.cancel``), by ``engine.stop``
#: (a durable backend may re-queue these), by something outside the engine, or
#: because its store found its dedup key held by another pending run when it was
#: written (``submit_nowait``, which cannot wait for that answer; never queued).
CancelReason = Literal["user", "shutdown", "external", "key_held"]


class Progress(BaseModel):
    model_config = ConfigDict(frozen=True)

    # finite only: JSON has no NaN or infinity, and a dashboard must be able to read it back
    done: float = Field(default=0, allow_inf_nan=False)
    total: float | None = Field(default=None, allow_inf_nan=False)
    message: str = ""

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return max(0.0, min(1.0, self.done / self.total))


#: the longest error message and traceback a failure keeps: people read them, and every
#: event, record, snapshot and store row carries them (a 20 MB message made a 90 MB snapshot)
MAX_ERROR_MESSAGE = 8_192
MAX_TRACEBACK = 65_536


def _bounded_message(text: str) -> str:
    return cut_text(text, MAX_ERROR_MESSAGE // 2, MAX_ERROR_MESSAGE // 2)


def _bounded_traceback(text: str) -> str:
    """Its start (the first exception of a chain) and, mostly, its end (the failure itself)."""
    return cut_text(text, MAX_TRACEBACK // 4, MAX_TRACEBACK - MAX_TRACEBACK // 4)


class RunError(BaseModel):
    """What went wrong in a failed attempt."""

    model_config = ConfigDict(frozen=True)

    type: str
    message: str
    traceback: str = ""

    @classmethod
    def from_exception(cls, exc: BaseException) -> RunError:
        """Capture an exception; the traceback starts at the user's code.

        The leading frames are the engine's own (the loop that awaited the
        task), which tell a user nothing about their failure, so they are cut.
        """
        message = safe_str(exc)
        return cls(
            # a class may be given any name (a generated one, from a file name, say): one UTF-8
            # cannot encode would be refused by every event and store write that carries it
            type=safe_text(type(exc).__qualname__),
            message=_bounded_message(message),
            traceback=_bounded_traceback(safe_text(_formatted(exc, message))),
        )

    @classmethod
    def timed_out(cls, message: str, waiting: BaseException) -> RunError:
        """A run its timeout cut short; ``waiting`` is the cancel that reached the task, so the
        traceback shows the line the task was waiting on then (not asyncio's timeout machinery)."""
        frames = traceback.format_tb(_from_user_code(waiting.__traceback__))
        return cls(
            type="TimeoutError",
            message=message,
            traceback=_bounded_traceback(
                safe_text(f"Traceback (most recent call last):\n{''.join(frames)}TimeoutError: {message}\n")
            ),
        )


def _formatted(exc: BaseException, message: str) -> str:
    """``exc``'s traceback as Python prints it, from the user's code on.

    Formatting runs the exception's own code (its ``__str__``, ``__notes__``, its chain's), and
    this runs where a run's failure is caught: whatever that code raises, KeyboardInterrupt and
    any BaseException included, gives a plainer traceback (the frames alone, else none) rather
    than escaping the run's containment (the run ended cancelled, its retries skipped, the
    caller's program stopped by a KeyboardInterrupt that no one pressed).
    """
    tb = _from_user_code(exc.__traceback__)
    try:
        return "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException as broken:  # noqa: BLE001 - see above
        why = type(broken).__qualname__
    try:
        frames = "".join(traceback.format_tb(tb))
    except BaseException:  # noqa: BLE001 - a source line's loader is the user's code too
        frames = ""
    head = "Traceback (most recent call last):\n" if frames else ""
    return (
        f"{head}{frames}{type(exc).__qualname__}: {message}\n"
        f"(its cause, context and notes are left out: formatting them raised {why})\n"
    )


def _from_user_code(tb: TracebackType | None) -> TracebackType | None:
    """``tb`` without its leading frames of the engine's own (the loop that awaited the task)."""
    while tb is not None and tb.tb_next is not None and _is_engine_frame(tb.tb_frame.f_code.co_filename):
        tb = tb.tb_next
    return tb


_ENGINE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _is_engine_frame(filename: str) -> bool:
    return filename.startswith(_ENGINE_DIR)


class RunRecord(BaseModel):
    """An immutable snapshot of one run. Times are UNIX timestamps in seconds."""

    model_config = ConfigDict(frozen=True)

    id: str
    task: str
    params: dict[str, Any] = Field(default_factory=dict)
    status: RunStatus
    attempt: int = 1
    max_attempts: int = 1
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    progress: Progress = Field(default_factory=Progress)
    result: Any = None
    error: RunError | None = None
    key: str | None = None
    source: str = "submit"
    cancel_reason: CancelReason | None = None
    #: the node running it, or the one that ran its last attempt (None while it waits)
    node: str | None = None

    @property
    def duration(self) -> float | None:
        if self.started_at is None:
            return None
        if self.finished_at is None:
            return None
        return self.finished_at - self.started_at

    def _repr_html_(self) -> str:
        from .display import run_html

        return run_html(self)

    def __rich__(self) -> Any:
        from .display import run_rich

        return run_rich(self)


#: a record is given every field
_RECORD_FIELDS = set(RunRecord.model_fields)
#: the progress of a run that reported none (frozen, so one instance serves every record)
_NO_PROGRESS = Progress()


class RunList(list[RunRecord]):
    """A list of run records that renders as a table in notebooks and Rich consoles."""

    def _repr_html_(self) -> str:
        from .display import runs_html

        return runs_html(self)

    def __rich__(self) -> Any:
        from .display import runs_list_rich

        return runs_list_rich(self)


class EngineStats(BaseModel):
    """Counters describing an engine at one moment."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    state: str
    by_status: dict[str, int]
    queue_depth: int
    running: int
    submitted_total: int
    finished_total: int
    succeeded_total: int
    failed_total: int
    cancelled_total: int
    retries_total: int
    #: runs finished per second over the last ``throughput_window`` seconds
    throughput: float
    throughput_window: float
    #: per-queue and per-trigger counters, and supervised-worker restart counts
    queues: dict[str, dict[str, int]] = Field(default_factory=dict)
    triggers: dict[str, dict[str, int]] = Field(default_factory=dict)
    supervised: dict[str, dict[str, Any]] = Field(default_factory=dict)
    bus: dict[str, int] = Field(default_factory=dict)
    #: while this node cannot reach its store (it has stepped down: it claims nothing and
    #: leads nothing), seconds since it last renewed its claims; None while it reaches it. A
    #: health check reads "running" and this together: a cut-off node runs, but does no work
    cut_off_for: float | None = None


class Run:
    """This node's view of one run: what the sync queries answer from (never handed to callers).

    The store owns the run's row; this is the engine's in-memory index entry,
    kept current by the transitions this node makes (and, for runs this node
    did not submit, filled in when it claims or recovers them).
    """

    __slots__ = (
        "id",
        "task",
        "spec",
        "params",
        "model",
        "status",
        "attempt",
        "max_attempts",
        "created_at",
        "started_at",
        "finished_at",
        "done",
        "total",
        "message",
        "result",
        "error",
        "key",
        "source",
        "cancel_reason",
        "node",
        "handle",
        "token",
        "run_after",
        "waiters",
    )

    def __init__(
        self,
        run_id: str,
        task: str,
        spec: TaskSpec | None,
        params: dict[str, Any],
        model: BaseModel | None,
        created_at: float,
        key: str | None,
        source: str,
        max_attempts: int,
    ) -> None:
        self.id = run_id
        self.task = task
        #: the registered task (None for a run of a task this node does not know)
        self.spec = spec
        # a params model validated from ``params`` shares their nested dicts and lists (fields
        # typed Any, dict[str, Any]): the task changing its model in place must not rewrite them
        self.params = _detached_dict(params) if model is not None and params and shares_input(type(model)) else params
        self.model = model
        self.status = RunStatus.PENDING
        self.attempt = 1
        self.max_attempts = max_attempts
        self.created_at = created_at
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.done: float = 0
        self.total: float | None = None
        self.message = ""
        self.result: Any = None
        self.error: RunError | None = None
        self.key = key
        self.source = source
        self.cancel_reason: CancelReason | None = None
        self.node: str | None = None
        #: the asyncio task executing the current attempt on this node
        self.handle: asyncio.Task[Any] | None = None
        #: this node's claim token while it executes the run
        self.token: str | None = None
        #: when a pending retry is due (UNIX seconds; 0 for at once)
        self.run_after = 0.0
        self.waiters: list[asyncio.Future[RunRecord]] | None = None

    @classmethod
    def from_record(cls, record: RunRecord, spec: TaskSpec | None, *, own: bool = False) -> Run:
        """An index entry for a run read from the store.

        ``own``: the record was read for this entry alone and is dropped after, so its
        params and result are taken as they are; otherwise they are copied, as a record
        someone else holds could change them in place (a start reads every unfinished run
        this way, and the copies were a tenth of its time).
        """
        copy = _as_it_is if own else detached
        run = cls(
            record.id,
            record.task,
            spec,
            copy(record.params),
            None,
            record.created_at,
            record.key,
            record.source,
            record.max_attempts,
        )
        run.status = record.status
        run.attempt = record.attempt
        run.started_at = record.started_at
        run.finished_at = record.finished_at
        run.done = record.progress.done
        run.total = record.progress.total
        run.message = record.progress.message
        run.result = copy(record.result)
        run.error = record.error
        run.cancel_reason = record.cancel_reason
        run.node = record.node
        return run

    def record(self) -> RunRecord:
        # the engine's own values, of their declared types: put together, not validated again
        # (a record per awaited run); its params and result are the record's own (record_fields)
        return construct(RunRecord, record_fields(self), _RECORD_FIELDS)


def record_fields(run: Any) -> dict[str, Any]:
    """The :class:`RunRecord` fields of an object keeping them as attributes of the same
    names, with progress as ``done``/``total``/``message`` (the engine's index entry and
    the memory store's row both do).

    The params and result are copies (:func:`detached`): a record is handed to user code,
    and a caller post-processing ``record.result`` in place must not rewrite what every
    later ``get``, ``runs``, snapshot and dashboard sees (nor, with a value JSON cannot
    carry, break every dashboard's attach).
    """
    params = run.params
    result = run.result
    return {
        "id": run.id,
        "task": run.task,
        # the checks first: most runs have no params and no result, and pay nothing here
        "params": _detached_dict(params) if params else {},
        "status": run.status,
        "attempt": run.attempt,
        "max_attempts": run.max_attempts,
        "created_at": run.created_at,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "progress": _NO_PROGRESS if run.done == 0 and run.total is None and not run.message
        else Progress(done=run.done, total=run.total, message=run.message),
        "result": result if type(result) not in _CONTAINERS else detached(result),
        "error": run.error,
        "key": run.key,
        "source": run.source,
        "cancel_reason": run.cancel_reason,
        "node": run.node,
    }


#: the mutable types JSON data is made of: params are dumped as JSON and results made JSON
#: data (``jsonable``) where they enter the engine, so every other value in them is a str,
#: number, bool or None, which needs no copy
_CONTAINERS = frozenset({dict, list})


#: core-schema kinds whose validation builds every list, dict and model anew, or keeps only
#: immutable values: a model made of these alone shares nothing with what it was validated from
_REBUILT = frozenset({
    "model", "model-fields", "model-field", "dataclass", "dataclass-args", "dataclass-field",
    "typed-dict", "typed-dict-field", "list", "tuple", "set", "frozenset", "dict", "default",
    "nullable", "union", "tagged-union", "literal", "enum", "str", "int", "float", "bool", "none",
    "bytes", "datetime", "date", "time", "timedelta", "decimal", "uuid", "url", "multi-host-url",
    "definitions", "definition-ref", "lax-or-strict", "json-or-python", "chain",
})
#: (weak, as tasks' own per-class cache: a model class made at run time may go away)
_SHARES_INPUT: weakref.WeakKeyDictionary[type[BaseModel], bool] = weakref.WeakKeyDictionary()


def shares_input(model: type[BaseModel]) -> bool:
    """Whether an instance of ``model`` may share a list or dict with the data it was validated
    from (a field typed ``Any``, a custom validator...): decided once per class, conservatively."""
    shares = _SHARES_INPUT.get(model)
    if shares is None:
        kinds: set[str] = set()
        _schema_kinds(model.__pydantic_core_schema__, kinds)
        shares = _SHARES_INPUT[model] = not kinds <= _REBUILT
    return shares


def _schema_kinds(schema: Any, into: set[str]) -> None:
    # every "type" in the schema counts, a serializer's included: unknown kinds mean "may share"
    if isinstance(schema, dict):
        kind = schema.get("type")
        if isinstance(kind, str):
            into.add(kind)
        for value in schema.values():
            _schema_kinds(value, into)
    elif isinstance(schema, (list, tuple)):
        for value in schema:
            _schema_kinds(value, into)


def _as_it_is(value: Any) -> Any:
    return value


def detached(value: Any) -> Any:
    """``value`` (JSON data) sharing no dict or list with it: what the engine hands out of its
    own params and results, so that changing the copy in place cannot change the engine's."""
    cls = type(value)
    if cls is dict:
        return _detached_dict(value)
    if cls is list:
        return [item if type(item) not in _CONTAINERS else detached(item) for item in value]
    return value


def _detached_dict(value: dict[str, Any]) -> dict[str, Any]:
    return {key: item if type(item) not in _CONTAINERS else detached(item) for key, item in value.items()}
