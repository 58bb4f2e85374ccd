"""Leader leases and the elector that holds one for an engine.

(Foundation stub: without a lease an engine is its own permanent leader.)
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from .engine import Engine


class Leadership(BaseModel):
    """Who leads, as seen from one node."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    is_leader: bool
    holder: str | None
    term: int
    expires_at: float | None = None


class LeaderElector:
    def __init__(self, engine: Engine, lease: object | None = None) -> None:
        self._engine = engine
        self.lease = lease
        self.is_leader = True
        self.term = 1
        self.holder: str | None = engine.node_id
        self.expires_at: float | None = None

    def lease_valid(self) -> bool:
        return self.expires_at is None or self.expires_at > time.time()

    def snapshot(self) -> Leadership:
        return Leadership(
            node_id=self._engine.node_id,
            is_leader=self.is_leader,
            holder=self.holder,
            term=self.term,
            expires_at=self.expires_at,
        )

    async def start(self) -> None:
        pass

    async def stop(self, deadline: float) -> None:
        pass
