"""Periodic tasks: the decorator registry, interval and cron triggers, pause/resume.

(Stub: to be implemented.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .engine import Engine


class PeriodicInfo(BaseModel):
    """One periodic task as ``engine.schedule()`` reports it. Times are UNIX seconds."""

    model_config = ConfigDict(frozen=True)

    name: str
    trigger: str  # human form: "every 60s", "cron 0 3 * * *"
    trigger_kind: Literal["interval", "cron"]
    every: float | None = None
    cron: str | None = None
    fixed_rate: bool = False
    enabled: bool
    reason: str | None = None  # why disabled
    paused: bool = False
    next_due: float | None = None
    running_run_id: str | None = None
    last_run_id: str | None = None
    last_status: str | None = None
    last_started: float | None = None
    last_duration: float | None = None
    runs: int = 0
    failures: int = 0
    skipped: int = 0


class Scheduler:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(self, fn: Any, **options: Any) -> Any:
        raise NotImplementedError

    def schedule(self) -> list[PeriodicInfo]:
        return []

    def pause(self, name: str) -> PeriodicInfo:
        raise NotImplementedError

    def resume(self, name: str) -> PeriodicInfo:
        raise NotImplementedError

    async def start(self) -> None:
        pass

    async def stop(self, deadline: float) -> None:
        pass
