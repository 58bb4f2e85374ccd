"""The snapshot model: an engine's whole visible state at one moment."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from .lease import Leadership
from .queues import QueueInfo
from .runs import EngineStats, RunRecord
from .scheduler import PeriodicInfo
from .supervisor import WorkerInfo
from .tasks import TaskInfo
from .triggers import TriggerState


class Snapshot(BaseModel):
    """What a dashboard needs to draw itself; events after ``last_seq`` bring it up to date."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    version: str
    state: str
    started_at: float | None
    runs: list[RunRecord]
    tasks: list[TaskInfo]
    schedule: list[PeriodicInfo]
    queues: list[QueueInfo]
    triggers: list[TriggerState]
    workers: list[WorkerInfo]
    stats: EngineStats
    leadership: Leadership
    last_seq: int
