"""Named work queues drained by N consumer tasks, off the request path.

(Stub: to be implemented.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .engine import Engine


class QueueInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    concurrency: int
    maxsize: int
    depth: int
    in_flight: int
    processed: int
    failed: int
    rejected: int = 0


class WorkQueue:
    def __init__(self, engine: Engine, name: str, handler: Any, *, concurrency: int = 1, maxsize: int = 1000) -> None:
        self._engine = engine
        self.name = name

    def info(self) -> QueueInfo:
        raise NotImplementedError

    def launch(self) -> None:
        """Start this component's tasks on the running loop (sync: usable after engine start)."""

    async def start(self) -> None:
        self.launch()

    async def stop(self, deadline: float) -> None:
        pass
