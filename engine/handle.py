"""Handles returned by ``submit``: a run's id plus ways to wait for and steer it.

A handle is the engine and the run id, so it works for a run that another
process executes: waiting falls back to reading the store. A handle of a run
submitted here also keeps that run's in-memory entry, so ``wait()`` and
``record()`` keep working after the run left the history (and the store).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Generator
from typing import TYPE_CHECKING, Any

from .execution import checked_grace, checked_timeout
from .hop import call_on, current_loop
from .runs import RunRecord, RunStatus

if TYPE_CHECKING:
    from .engine import Engine
    from .runs import Run


#: how much longer than a wait's timeout its caller on another loop gives the engine's loop to
#: answer: both timers would otherwise end together, and the caller's, which can only say the
#: engine did not answer, came first about as often as not when the run was simply still going
ANSWER_MARGIN = 0.5


def caller_bound(timeout: float | None) -> asyncio.Timeout:
    """The bound a caller on another loop keeps on a wait of ``timeout`` made on the engine's
    (a blocked engine loop would not end a wait timed there)."""
    return asyncio.timeout(None if timeout is None else timeout + ANSWER_MARGIN)


def no_answer_in_time(run_id: str, timeout: float | None) -> TimeoutError:
    """The wait for a run that ended on the caller's loop, the engine's being too busy (or
    blocked by a task) to say how the run stands within ``timeout`` and the margin."""
    waited = "" if timeout is None else f" within {timeout + ANSWER_MARGIN:g} s"
    return TimeoutError(
        f"run {run_id}: no answer from the engine's loop{waited} (a task holds it up?); "
        "the run may still be going: wait again, or read its record"
    )


class RunHandle:
    """A submitted run. ``await handle`` or ``await handle.wait()`` gives the finished record."""

    __slots__ = ("_engine", "_run", "id")

    def __init__(self, engine: Engine, run_id: str, run: Run | None = None) -> None:
        self._engine = engine
        self._run = run
        self.id = run_id

    @property
    def status(self) -> RunStatus:
        return self.record().status

    @property
    def done(self) -> bool:
        return self.record().status.finished

    def record(self) -> RunRecord:
        """The run's current record as this node knows it (``RunNotFound`` for a run of
        another process that this node does not hold; :meth:`fetch` reads the store)."""
        run = self._engine.current(self.id, self._run)
        if run is not None:
            return run.record()
        return self._engine.get(self.id)

    async def fetch(self) -> RunRecord:
        """The run's current record, from the store if this node no longer holds it."""
        return await self._engine.fetch_run(self.id)

    def wait(self, timeout: float | None = None) -> Awaitable[RunRecord]:
        """Await the run's finished record (``await handle.wait()``).

        Raises ``TimeoutError`` if it is still going after ``timeout`` seconds
        (``math.inf`` is no limit), and :class:`InvalidConfiguration` at once for a
        ``timeout`` that is no number of seconds >= 0.
        Without a timeout this is a future resolved by the run's finish, so
        gathering many handles costs no task each, and a coroutine too, so
        ``create_task`` and a ``TaskGroup`` take it (``asyncio.wait``, which
        refuses coroutines, takes that task). Awaited in a fork of the process the engine
        runs in, it raises :class:`EngineInAnotherProcess` at once (the wait is hopped to
        the engine's loop, which no thread runs there).
        """
        timeout = checked_timeout("RunHandle.wait()", timeout)
        loop = self._engine.loop
        if loop is not None and loop.is_running() and loop is not current_loop():
            # awaited on another loop (a thread's own, a notebook's beside start_background()):
            # a run's finish resolves futures of the engine's loop, so the wait is made there
            return self._wait_elsewhere(loop, timeout)
        return self._wait_here(timeout)

    async def _wait_elsewhere(self, loop: asyncio.AbstractEventLoop, timeout: float | None) -> RunRecord:
        # the timeout kept on the caller's loop too: an engine loop blocked by a task would not
        # end a wait timed there (the call given up is cancelled at its next await there)
        bound = caller_bound(timeout)
        try:
            async with bound:
                record: RunRecord = await call_on(loop, self._wait_here, timeout)
        except TimeoutError:
            if not bound.expired():
                raise  # the engine's own answer, which says how the run stands
            raise no_answer_in_time(self.id, timeout) from None
        return record

    def _wait_here(self, timeout: float | None) -> Awaitable[RunRecord]:
        if timeout is None:
            return self._engine.wait_for(self.id, None, run=self._run)
        return self._wait(timeout)

    async def _wait(self, timeout: float) -> RunRecord:
        record = await self._engine.wait_for(self.id, timeout, run=self._run)
        if not record.status.finished:
            raise TimeoutError(f"run {self.id} is still {record.status.value} after {timeout} s")
        return record

    async def cancel(self, grace: float | None = None) -> RunRecord:
        """Cancel the run (see :meth:`Engine.cancel`)."""
        return await self._engine.cancel(self.id, checked_grace("RunHandle.cancel()", grace))

    def __await__(self) -> Generator[Any, None, RunRecord]:
        return self.wait().__await__()

    def __repr__(self) -> str:
        return f"<RunHandle {self.id}>"
