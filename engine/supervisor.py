"""Supervised long-lived workers: restarted with backoff, optionally leader-only.

(Stub: to be implemented.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from .runs import RunError

if TYPE_CHECKING:
    from .engine import Engine


class WorkerInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    leader_only: bool
    state: str  # "running", "backoff", "waiting_for_leadership", "stopped", "returned"
    restarts: int = 0
    crashes: int = 0
    started_at: float | None = None
    last_error: RunError | None = None
    last_error_at: float | None = None
    next_restart_at: float | None = None


class Supervisor:
    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def add(self, fn: Any, **options: Any) -> Any:
        raise NotImplementedError

    def workers(self) -> list[WorkerInfo]:
        return []

    async def start(self) -> None:
        pass

    async def stop(self, deadline: float) -> None:
        pass
