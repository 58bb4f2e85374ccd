"""Handles returned by ``submit``: a run's id plus ways to wait for and steer it."""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from .runs import RunRecord, RunStatus

if TYPE_CHECKING:
    from .engine import Engine
    from .runs import Run


class RunHandle:
    """A submitted run. ``await handle`` or ``await handle.wait()`` gives the finished record."""

    __slots__ = ("_engine", "_run", "id")

    def __init__(self, engine: Engine, run: Run) -> None:
        self._engine = engine
        self._run = run
        self.id = run.id

    @property
    def status(self) -> RunStatus:
        return self._run.status

    @property
    def done(self) -> bool:
        return self._run.status.finished

    def record(self) -> RunRecord:
        """The run's current record (works even after the run left the history)."""
        return self._run.record()

    async def wait(self, timeout: float | None = None) -> RunRecord:
        """Wait until the run has finished and return its record.

        Raises ``TimeoutError`` if it is still going after ``timeout`` seconds.
        """
        record = await self._engine._wait_finished(self._run, timeout)
        if not record.status.finished:
            raise TimeoutError(f"run {self.id} is still {record.status.value} after {timeout} s")
        return record

    async def cancel(self, grace: float | None = None) -> RunRecord:
        return await self._engine.cancel(self.id, grace)

    def __await__(self) -> Generator[Any, None, RunRecord]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<RunHandle {self.id} {self._run.spec.name} {self._run.status.value}>"
