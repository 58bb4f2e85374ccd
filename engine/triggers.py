"""Threshold triggers: per-key counters that enqueue one run per key when due.

(Stub: to be implemented.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .engine import Engine


class TriggerKeyState(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    count: int
    last_run_at: float | None = None
    first_seen_at: float | None = None
    queued: bool = False
    running: bool = False


class TriggerState(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    size_threshold: int
    staleness: float | None = None  # seconds
    staleness_min: int = 1
    fired: int = 0
    keys: list[TriggerKeyState] = Field(default_factory=list)


class Trigger:
    def __init__(self, engine: Engine, name: str, fn: Any, **options: Any) -> None:
        self._engine = engine
        self.name = name

    def state(self) -> TriggerState:
        raise NotImplementedError

    def launch(self) -> None:
        """Start this component's tasks on the running loop (sync: usable after engine start)."""

    async def start(self) -> None:
        self.launch()

    async def stop(self, deadline: float) -> None:
        pass
