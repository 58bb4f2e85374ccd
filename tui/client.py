"""The one interface the dashboard talks to, and its in-process implementation.

Screens never know whether the engine lives in this process or another: they
see a :class:`DashboardClient`. :class:`LocalClient` watches an engine running
on its own loop (usually a background thread, so a slow dashboard can never
slow it); the remote implementation lives in ``remote_client.py``.
"""

from __future__ import annotations

import asyncio
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from typing import Any

from taskwatch.engine import (
    BaseEvent,
    Engine,
    PeriodicInfo,
    QueueInfo,
    QueuePurge,
    RunRecord,
    Snapshot,
    TriggerFire,
    WorkerInfo,
)
from taskwatch.engine.bus import Posted, built
from taskwatch.engine.errors import ConnectionClosed
from taskwatch.engine.hop import call_on


DEFAULT_BUFFER = 200_000

#: seconds a dashboard's cancel waits for a running run to end before it answers, whatever
#: the engine's cancel_grace (a run whose cleanup takes longer is shown cancelling meanwhile);
#: the same in-process and attached, so that the two dashboards answer alike
CANCEL_GRACE = 2.0


class DashboardClient(ABC):
    """What a dashboard can ask of an engine, wherever it runs."""

    #: shown in the header: "in-process" or the address attached to
    where: str = ""

    def __init__(self, buffer: int = DEFAULT_BUFFER) -> None:
        # events as the bus posted them: built here, on the dashboard's side, when taken
        self._events: deque[BaseEvent | Posted] = deque()
        self.buffer = buffer
        #: events that arrived while our buffer was full (counted, never silently lost)
        self.dropped = 0
        #: ``time.monotonic()`` when the engine last answered a request or sent an event
        #: (None before it ever did): how long a silent engine has been silent
        self.last_heard: float | None = None

    def _heard(self) -> None:
        self.last_heard = time.monotonic()

    @property
    @abstractmethod
    def connected(self) -> bool: ...

    @property
    def failure(self) -> str | None:
        """Why the client gave up for good (say, a wrong token), or None while it can still connect."""
        return None

    @property
    def last_error(self) -> str | None:
        """Why its last attempt to connect failed, as plain text, while it keeps trying (None:
        none failed since the last that got through; an in-process client never tries)."""
        return None

    @property
    def retrying(self) -> bool:
        """Whether the client reconnects by itself when the connection drops (an in-process
        client never needs to: its engine stopped, it is gone)."""
        return False

    @abstractmethod
    async def connect(self, runs_limit: int = 500) -> Snapshot:
        """Start receiving events and return the state they continue from: the newest
        ``runs_limit`` runs (and every running one)."""

    @abstractmethod
    async def snapshot(self, runs_limit: int = 500) -> Snapshot: ...

    @abstractmethod
    async def get(self, run_id: str) -> RunRecord:
        """A run's full record (listings and events may carry cut-down values)."""

    @abstractmethod
    async def submit(self, task: str, params: dict[str, Any] | None = None, key: str | None = None) -> RunRecord: ...

    @abstractmethod
    async def cancel(self, run_id: str, grace: float | None = CANCEL_GRACE) -> RunRecord:
        """Cancel a run; a running one is given ``grace`` seconds to end before the record is
        returned (None: the engine's cancel_grace), as ``Engine.cancel`` does."""

    @abstractmethod
    async def retry(self, run_id: str) -> RunRecord: ...

    @abstractmethod
    async def pause_periodic(self, name: str) -> PeriodicInfo: ...

    @abstractmethod
    async def resume_periodic(self, name: str) -> PeriodicInfo: ...

    @abstractmethod
    async def run_periodic(self, name: str) -> RunRecord: ...

    @abstractmethod
    async def restart_worker(self, name: str) -> WorkerInfo: ...

    @abstractmethod
    async def stop_worker(self, name: str) -> WorkerInfo: ...

    @abstractmethod
    async def start_worker(self, name: str) -> WorkerInfo: ...

    @abstractmethod
    async def pause_queue(self, name: str) -> QueueInfo: ...

    @abstractmethod
    async def resume_queue(self, name: str) -> QueueInfo: ...

    @abstractmethod
    async def purge_queue(self, name: str) -> QueuePurge: ...

    @abstractmethod
    async def fire_trigger(self, name: str, key: str) -> TriggerFire: ...

    @abstractmethod
    async def close(self) -> None: ...

    # the buffer between the event source and the redraw timer
    def _offer(self, event: BaseEvent | Posted) -> None:
        # deque.append is atomic, so the engine's thread may call this directly
        if len(self._events) >= self.buffer:
            self.dropped += 1
            return
        self._events.append(event)

    def take_events(self, limit: int = 20_000) -> list[BaseEvent]:
        """Take up to ``limit`` buffered events (called by the redraw timer)."""
        events = self._events
        n = min(limit, len(events))
        if n:
            self._heard()
        return [built(events.popleft()) for _ in range(n)]

    def pending_events(self) -> int:
        return len(self._events)

    def stopped_overview(self) -> Snapshot | None:
        """The overview of an engine that has stopped for good, as it ended (None: none to be had;
        a remote engine's is gone with its connection)."""
        return None


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

    def stopped_overview(self) -> Snapshot | None:
        # a stopped engine still answers its reads from its records (its loop may be gone)
        return self.engine.snapshot(runs_limit=0) if self.engine.state == "stopped" else None

    def _engine_loop(self) -> asyncio.AbstractEventLoop | None:
        loop = self.engine.loop
        if loop is not None and loop.is_closed():
            raise ConnectionClosed(f"the engine {self.engine.node_id!r} has stopped")
        return loop

    async def _on_engine(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the engine's loop (awaiting it there if it is async); its result, here."""
        loop = self._engine_loop()
        try:
            result = await call_on(loop, fn)
        except Exception:
            self._heard()  # a refusal is an answer too
            raise
        self._heard()
        return result

    async def connect(self, runs_limit: int = 500) -> Snapshot:
        if self.manage and self.engine.state in ("new", "stopped"):
            await self.engine.start()

        def subscribe_and_snapshot() -> Snapshot:
            # both on the engine's loop, back to back: no event falls between them
            if self._unsubscribe is not None:
                self._unsubscribe()
            self._unsubscribe = self.engine.bus.add_callback(self._offer, unbuilt=True)
            return self.engine.snapshot(runs_limit=runs_limit)

        return await self._on_engine(subscribe_and_snapshot)

    async def snapshot(self, runs_limit: int = 500) -> Snapshot:
        return await self._on_engine(lambda: self.engine.snapshot(runs_limit=runs_limit))

    async def get(self, run_id: str) -> RunRecord:
        return await self._on_engine(lambda: self.engine.get(run_id))

    async def submit(self, task: str, params: dict[str, Any] | None = None, key: str | None = None) -> RunRecord:
        async def go() -> RunRecord:
            handle = await self.engine.submit(task, params, key=key)
            return handle.record()

        return await self._on_engine(go)

    async def cancel(self, run_id: str, grace: float | None = CANCEL_GRACE) -> RunRecord:
        return await self._on_engine(lambda: self.engine.cancel(run_id, grace=grace))

    async def retry(self, run_id: str) -> RunRecord:
        async def go() -> RunRecord:
            handle = await self.engine.retry(run_id)
            return handle.record()

        return await self._on_engine(go)

    async def pause_periodic(self, name: str) -> PeriodicInfo:
        return await self._on_engine(lambda: self.engine.pause_periodic(name))

    async def resume_periodic(self, name: str) -> PeriodicInfo:
        return await self._on_engine(lambda: self.engine.resume_periodic(name))

    async def run_periodic(self, name: str) -> RunRecord:
        async def go() -> RunRecord:
            handle = await self.engine.run_periodic(name)
            return handle.record()

        return await self._on_engine(go)

    async def restart_worker(self, name: str) -> WorkerInfo:
        return await self._on_engine(lambda: self.engine.restart_worker(name))

    async def stop_worker(self, name: str) -> WorkerInfo:
        return await self._on_engine(lambda: self.engine.stop_worker(name))

    async def start_worker(self, name: str) -> WorkerInfo:
        return await self._on_engine(lambda: self.engine.start_worker(name))

    async def pause_queue(self, name: str) -> QueueInfo:
        return await self._on_engine(lambda: self.engine.pause_queue(name))

    async def resume_queue(self, name: str) -> QueueInfo:
        return await self._on_engine(lambda: self.engine.resume_queue(name))

    async def purge_queue(self, name: str) -> QueuePurge:
        return await self._on_engine(lambda: self.engine.purge_queue(name))

    async def fire_trigger(self, name: str, key: str) -> TriggerFire:
        return await self._on_engine(lambda: self.engine.fire_trigger(name, key))

    async def close(self) -> None:
        if self._unsubscribe is not None:
            unsubscribe, self._unsubscribe = self._unsubscribe, None
            if self.engine.state in ("running", "stopping"):
                await self._on_engine(unsubscribe)
        if self.manage:
            await self.engine.stop(timeout=self.stop_timeout)
