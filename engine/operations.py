"""The operations every way of driving an engine offers, declared once.

An engine is driven in its own process (:class:`~taskwatch.engine.Engine`),
from another thread (:class:`~taskwatch.engine.BackgroundEngine`, with a
blocking ``name`` and an awaitable ``aname`` per operation), from another
process over the control endpoint (:class:`~taskwatch.engine.RemoteEngine`)
and by the dashboard through its local and remote clients. Each of them
offers these operations under the same names, with the same parameters in
the same order; they differ only in what a result is wrapped in (a handle,
or a record). The control endpoint's commands come from this table, and
``tests/test_facades.py`` holds every facade to it, so a new operation is
added here first and none of the facades can drift.
"""

from __future__ import annotations

from typing import NamedTuple

from pydantic import BaseModel

from .queues import QueueInfo, QueuePurge
from .runs import RunRecord
from .scheduler import PeriodicInfo
from .snapshot import Snapshot
from .supervisor import WorkerInfo
from .triggers import TriggerFire
from .wire import (
    CancelCommand,
    Command,
    FireTriggerCommand,
    GetCommand,
    PauseCommand,
    PauseQueueCommand,
    PurgeQueueCommand,
    RestartWorkerCommand,
    ResumeCommand,
    ResumeQueueCommand,
    RetryCommand,
    RunPeriodicCommand,
    SnapshotCommand,
    StartWorkerCommand,
    StopWorkerCommand,
    SubmitCommand,
)


class Operation(NamedTuple):
    """One operation: its name (the engine's method), parameters, wire command and result."""

    name: str
    params: tuple[str, ...]
    command: type[Command]
    #: what a remote caller gets back (in-process callers may get a richer object, e.g. a handle)
    result: type[BaseModel]
    summary: str


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in (
        Operation("submit", ("task", "params", "key"), SubmitCommand, RunRecord, "validate and queue a run"),
        Operation("cancel", ("run_id", "grace"), CancelCommand, RunRecord, "cancel a pending or running run"),
        Operation("retry", ("run_id",), RetryCommand, RunRecord, "queue a finished run again, same params"),
        Operation("get", ("run_id",), GetCommand, RunRecord, "a run's full record"),
        Operation("pause_periodic", ("name",), PauseCommand, PeriodicInfo, "stop a periodic task firing"),
        Operation("resume_periodic", ("name",), ResumeCommand, PeriodicInfo, "let a paused periodic task fire again"),
        Operation(
            "run_periodic", ("name",), RunPeriodicCommand, RunRecord,
            "queue a run of a periodic task now, its schedule unchanged (refused while one is going)",
        ),
        Operation(
            "restart_worker", ("name",), RestartWorkerCommand, WorkerInfo,
            "cancel a supervised worker and start it again now (leader-only: on the leader)",
        ),
        Operation("stop_worker", ("name",), StopWorkerCommand, WorkerInfo, "stop a supervised worker until started"),
        Operation("start_worker", ("name",), StartWorkerCommand, WorkerInfo, "let a stopped supervised worker run again"),
        Operation("pause_queue", ("name",), PauseQueueCommand, QueueInfo, "stop a queue's consumers taking jobs"),
        Operation("resume_queue", ("name",), ResumeQueueCommand, QueueInfo, "let a paused queue's consumers take jobs"),
        Operation("purge_queue", ("name",), PurgeQueueCommand, QueuePurge, "drop the jobs waiting in a queue"),
        Operation("fire_trigger", ("name", "key"), FireTriggerCommand, TriggerFire, "queue a trigger key's run now"),
        Operation("snapshot", ("runs_limit",), SnapshotCommand, Snapshot, "runs, schedule, queues, leadership, stats"),
    )
}

#: the operation a wire command asks for
BY_COMMAND: dict[type[Command], Operation] = {op.command: op for op in OPERATIONS.values()}
