"""Execution backends: where and when the engine runs its pending runs.

The engine owns run records, validation, retries and events; a backend owns
the queue of pending runs and the tasks that execute them. A durable (SQLite)
or distributed (Redis) backend implements the same :class:`Backend` interface,
so callers never change.
"""

from __future__ import annotations

import asyncio
import functools
from abc import ABC, abstractmethod
from collections import deque
from typing import TYPE_CHECKING, ClassVar

from .runs import Run, RunStatus

if TYPE_CHECKING:
    from .engine import Engine


class Backend(ABC):
    """The interface every execution backend implements."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self._engine: Engine | None = None
        #: the tasks executing runs right now, owned and awaited by the backend
        self._tasks: set[asyncio.Task[None]] = set()

    def bind(self, engine: Engine) -> None:
        self._engine = engine

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("backend is not bound to an engine")
        return self._engine

    @abstractmethod
    def enqueue(self, run: Run) -> None:
        """Accept a pending run. Never blocks; the engine already checked the queue bound."""

    async def settle(self, run: Run) -> None:
        """Called by ``submit`` after ``enqueue``; a backend may make the caller wait here."""

    @abstractmethod
    def discard(self, run: Run) -> None:
        """Forget a pending run that was cancelled before it started."""

    @property
    @abstractmethod
    def queue_depth(self) -> int:
        """Runs waiting for a slot."""

    @property
    def running(self) -> int:
        return len(self._tasks)

    def running_tasks(self) -> list[asyncio.Task[None]]:
        return list(self._tasks)

    def drain_pending(self) -> list[Run]:
        """Remove and return every queued run (used when stop times out)."""
        return []

    def _launch(self, run: Run) -> None:
        engine = self.engine
        engine._begin(run)
        task = asyncio.get_running_loop().create_task(engine._execute(run), name=f"taskwatch-run-{run.id}")
        run.task = task
        self._tasks.add(task)
        # a callback, not a finally: it also runs for a task cancelled before its first step
        task.add_done_callback(functools.partial(self._ended, run))

    def _ended(self, run: Run, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if run.task is task:
            run.task = None
        self.engine._task_done(run)
        self._released(run)

    def _released(self, run: Run) -> None:
        """A run's task finished; free its slot."""


class AsyncioBackend(Backend):
    """The default: fire-and-track on the engine's loop, within concurrency limits.

    Runs wait in one FIFO queue. A run whose task is at its own ``concurrency``
    limit steps aside into that task's blocked line so it does not hold up
    runs of other tasks; it goes first when a slot of its task frees.
    """

    name = "asyncio"

    def __init__(self) -> None:
        super().__init__()
        self._queue: deque[Run] = deque()
        self._blocked: dict[str, deque[Run]] = {}
        self._depth = 0
        self._per_task: dict[str, int] = {}

    @property
    def queue_depth(self) -> int:
        return self._depth

    def enqueue(self, run: Run) -> None:
        self._queue.append(run)
        self._depth += 1
        if len(self._tasks) < self.engine.max_concurrency:
            self._dispatch()

    def discard(self, run: Run) -> None:
        # removal is lazy: cancelled runs are skipped when they reach the head
        self._depth -= 1

    def drain_pending(self) -> list[Run]:
        out = [r for r in self._queue if r.status is RunStatus.PENDING]
        for line in self._blocked.values():
            out.extend(r for r in line if r.status is RunStatus.PENDING)
        self._queue.clear()
        self._blocked.clear()
        self._depth = 0
        return out

    def _can_start(self, run: Run) -> bool:
        limit = run.spec.concurrency
        return limit is None or self._per_task.get(run.spec.name, 0) < limit

    def _start(self, run: Run) -> None:
        self._depth -= 1
        name = run.spec.name
        self._per_task[name] = self._per_task.get(name, 0) + 1
        self._launch(run)

    def _dispatch(self) -> None:
        limit = self.engine.max_concurrency
        queue = self._queue
        while queue and len(self._tasks) < limit:
            run = queue.popleft()
            if run.status is not RunStatus.PENDING:
                continue
            if self._can_start(run):
                self._start(run)
            else:
                self._blocked.setdefault(run.spec.name, deque()).append(run)

    def _released(self, run: Run) -> None:
        name = run.spec.name
        self._per_task[name] -= 1
        line = self._blocked.get(name)
        while line:
            waiting = line.popleft()
            if waiting.status is RunStatus.PENDING:
                self._start(waiting)
                break
        if line is not None and not line:
            del self._blocked[name]
        self._dispatch()


class InlineBackend(Backend):
    """Runs each submission at once and makes ``submit`` wait until it has finished.

    No queue and no concurrency limits: for tests, scripts and CLI use where the
    caller wants the outcome before going on.
    """

    name = "inline"

    @property
    def queue_depth(self) -> int:
        return 0

    def enqueue(self, run: Run) -> None:
        self._launch(run)

    def discard(self, run: Run) -> None:
        pass

    async def settle(self, run: Run) -> None:
        await self.engine._wait_finished(run, None)


BACKENDS: dict[str, type[Backend]] = {"asyncio": AsyncioBackend, "inline": InlineBackend}


def make_backend(spec: str | Backend) -> Backend:
    if isinstance(spec, Backend):
        return spec
    try:
        return BACKENDS[spec]()
    except KeyError:
        raise ValueError(
            f"unknown backend {spec!r}; choose one of {', '.join(sorted(BACKENDS))} or pass a Backend instance"
        ) from None
