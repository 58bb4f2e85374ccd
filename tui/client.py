"""The one interface the dashboard talks to, and its in-process implementation.

Screens never know whether the engine lives in this process or another: they
see a :class:`DashboardClient`. :class:`LocalClient` watches an engine running
on its own loop (usually a background thread, so a slow dashboard can never
slow it); the remote implementation lives in ``remote_client.py``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

from taskwatch.engine import BaseEvent, Engine, PeriodicInfo, RunRecord, Snapshot
from taskwatch.engine.errors import ConnectionClosed

T = TypeVar("T")

DEFAULT_BUFFER = 200_000


class DashboardClient(ABC):
    """What a dashboard can ask of an engine, wherever it runs."""

    #: shown in the header: "in-process" or the address attached to
    where: str = ""

    def __init__(self, buffer: int = DEFAULT_BUFFER) -> None:
        self._events: deque[BaseEvent] = deque()
        self.buffer = buffer
        #: events that arrived while our buffer was full (counted, never silently lost)
        self.dropped = 0

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @property
    def failure(self) -> str | None:
        """Why the client gave up for good (say, a wrong token), or None while it can still connect."""
        return None

    @abstractmethod
    async def connect(self) -> Snapshot:
        """Start receiving events and return the state they continue from."""

    @abstractmethod
    async def snapshot(self, runs_limit: int = 500) -> Snapshot: ...

    @abstractmethod
    async def get(self, run_id: str) -> RunRecord:
        """A run's full record (listings and events may carry cut-down values)."""

    @abstractmethod
    async def submit(self, task: str, params: dict[str, Any]) -> RunRecord: ...

    @abstractmethod
    async def cancel(self, run_id: str) -> RunRecord: ...

    @abstractmethod
    async def retry(self, run_id: str) -> RunRecord: ...

    @abstractmethod
    async def pause_periodic(self, name: str) -> PeriodicInfo: ...

    @abstractmethod
    async def resume_periodic(self, name: str) -> PeriodicInfo: ...

    @abstractmethod
    async def close(self) -> None: ...

    # the buffer between the event source and the redraw timer
    def _offer(self, event: BaseEvent) -> None:
        # deque.append is atomic, so the engine's thread may call this directly
        if len(self._events) >= self.buffer:
            self.dropped += 1
            return
        self._events.append(event)

    def take_events(self, limit: int = 20_000) -> list[BaseEvent]:
        """Take up to ``limit`` buffered events (called by the redraw timer)."""
        events = self._events
        n = min(limit, len(events))
        return [events.popleft() for _ in range(n)]

    def pending_events(self) -> int:
        return len(self._events)


class LocalClient(DashboardClient):
    """Watches an :class:`Engine` in this process, on whichever loop runs it."""

    where = "in-process"

    def __init__(
        self, engine: Engine, buffer: int = DEFAULT_BUFFER, *, manage: bool = False, stop_timeout: float = 2.0
    ) -> None:
        super().__init__(buffer)
        self.engine = engine
        #: start the engine on the dashboard's own loop at connect and stop it at close
        #: (for scripts and tests; normally the engine runs on its own thread)
        self.manage = manage
        self.stop_timeout = stop_timeout
        self._unsubscribe: Callable[[], None] | None = None

    @property
    def connected(self) -> bool:
        return self.engine.state in ("running", "stopping")

    def _engine_loop(self) -> asyncio.AbstractEventLoop | None:
        loop = self.engine.loop
        if loop is not None and loop.is_closed():
            raise ConnectionClosed(f"the engine {self.engine.node_id!r} has stopped")
        return loop

    async def _on_engine(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine's loop and return its result here."""
        loop = self._engine_loop()
        if loop is None or loop is asyncio.get_running_loop():
            return fn()
        fut: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            # the caller may have given up (its worker was cancelled): then do nothing
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller, raised there
                fut.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return await asyncio.wrap_future(fut)

    async def _await_on_engine(self, coro_fn: Callable[[], Any]) -> Any:
        loop = self._engine_loop()
        if loop is None or loop is asyncio.get_running_loop():
            return await coro_fn()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro_fn(), loop))

    async def connect(self) -> Snapshot:
        if self.manage and self.engine.state in ("new", "stopped"):
            await self.engine.start()

        def subscribe_and_snapshot() -> Snapshot:
            # both on the engine's loop, back to back: no event falls between them
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._unsubscribe = self.engine.bus.add_callback(self._offer)
            return self.engine.snapshot()

        return await self._on_engine(subscribe_and_snapshot)

    async def snapshot(self, runs_limit: int = 500) -> Snapshot:
        return await self._on_engine(lambda: self.engine.snapshot(runs_limit=runs_limit))

    async def get(self, run_id: str) -> RunRecord:
        return await self._on_engine(lambda: self.engine.get(run_id))

    async def submit(self, task: str, params: dict[str, Any]) -> RunRecord:
        async def go() -> RunRecord:
            handle = await self.engine.submit(task, params)
            return handle.record()

        return await self._await_on_engine(go)

    async def cancel(self, run_id: str) -> RunRecord:
        return await self._await_on_engine(lambda: self.engine.cancel(run_id, grace=2.0))

    async def retry(self, run_id: str) -> RunRecord:
        async def go() -> RunRecord:
            handle = await self.engine.retry(run_id)
            return handle.record()

        return await self._await_on_engine(go)

    async def pause_periodic(self, name: str) -> PeriodicInfo:
        return await self._on_engine(lambda: self.engine.pause_periodic(name))

    async def resume_periodic(self, name: str) -> PeriodicInfo:
        return await self._on_engine(lambda: self.engine.resume_periodic(name))

    async def close(self) -> None:
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            if self.engine.state in ("running", "stopping"):
                await self._on_engine(unsubscribe)
        if self.manage:
            await self.engine.stop(timeout=self.stop_timeout)
