"""The dashboard's client for an engine in another process, over the control endpoint.

It keeps one :class:`~taskwatch.engine.remote.RemoteEngine` connection and,
when that drops, reconnects with backoff; each reconnect yields a fresh
snapshot that the dashboard loads (``take_resync``) so it resynchronises
instead of guessing what it missed. A refused token is final: retrying with
the same token can only fail again, so it stops and says so (``failure``); so
is an address ``RemoteEngine`` refuses (a non-loopback host). While it keeps
trying, ``last_error`` says why the last attempt failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable
from typing import Any, TypeVar, cast

from taskwatch.engine import (
    BaseEvent,
    PeriodicInfo,
    QueueInfo,
    QueuePurge,
    RunRecord,
    Snapshot,
    TaskwatchError,
    TriggerFire,
    WorkerInfo,
)
from taskwatch.engine.errors import (
    AuthenticationFailed,
    CommandTimeout,
    ConnectionClosed,
    EngineUnreachable,
    InvalidAddress,
    MessageTooLarge,
)
from taskwatch.engine.execution import checked_grace
from taskwatch.engine.remote import RemoteEngine

from .client import CANCEL_GRACE, DEFAULT_BUFFER, DashboardClient

T = TypeVar("T")


class RemoteClient(DashboardClient):
    def __init__(
        self,
        address: str,
        token: str | None = None,
        *,
        buffer: int = DEFAULT_BUFFER,
        retry_interval: float = 0.5,
        retry_max: float = 5.0,
        timeout: float = 10.0,
    ) -> None:
        super().__init__(buffer)
        self.where = address
        self.address = address
        self.token = token
        self.retry_interval = retry_interval
        self.retry_max = retry_max
        self.timeout = timeout
        self._remote: RemoteEngine | None = None
        self._resync: Snapshot | None = None
        self._watch: asyncio.Task[None] | None = None
        self._closing = False
        #: successful connections so far (1 after the first connect)
        self.connections = 0
        #: runs the snapshot of each (re)connect holds (the dashboard's ``max_rows``)
        self.runs_limit = 500
        self._failure: str | None = None
        self._last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._remote is not None and self._remote.connected

    @property
    def failure(self) -> str | None:
        return self._failure

    @property
    def last_error(self) -> str | None:
        """Why the last attempt to connect failed, as plain text (it may quote the address and
        what answered there: escape it to draw it); None before any failed, and again once one
        succeeds. The dashboard shows it while it reconnects, which may be for good."""
        return self._last_error

    def _attempt_failed(self, exc: OSError | TaskwatchError) -> None:
        # an unreachable engine's reason without the advice that follows it: the header has
        # one line, and the advice went with the first failure's notification
        if isinstance(exc, EngineUnreachable):
            self._last_error = exc.reason
        else:
            self._last_error = str(exc) or type(exc).__name__

    @property
    def retrying(self) -> bool:
        """Whether a background task is still keeping the connection up (reconnecting when it drops)."""
        return self._watch is not None and not self._watch.done()

    def _give_up(self, exc: AuthenticationFailed | InvalidAddress) -> None:
        if isinstance(exc, InvalidAddress):
            self._failure = f"{exc}; not retrying"
            return
        self._failure = (
            f"{exc} at {self.address}; not retrying: start again with the right token "
            "(TASKWATCH_TOKEN or --token-file)"
        )

    async def _open(self, resync: bool = False) -> Snapshot:
        remote = RemoteEngine(self.address, self.token, buffer=self.buffer, timeout=self.timeout)
        snap = await remote.connect()
        kept = sum(snap.stats.by_status.values())
        if len(snap.runs) < min(self.runs_limit, kept):
            # the handshake's snapshot holds the server's number of runs; more were asked for
            # (the events buffered meanwhile continue from this one: the older are skipped)
            try:
                snap = await remote.snapshot(runs_limit=self.runs_limit)
            except BaseException:
                await remote.close()
                raise
        self._heard()
        old, self._remote = self._remote, remote
        if resync:
            # set together with _remote, before the await below: the dashboard must never
            # take the new connection's events without the snapshot they continue from
            self._resync = snap
        self._last_error = None
        if old is not None:
            await old.close()
        self.connections += 1
        return snap

    async def connect(self, runs_limit: int = 500) -> Snapshot:
        self.runs_limit = runs_limit
        try:
            return await self._open()
        except (AuthenticationFailed, InvalidAddress) as exc:
            self._give_up(exc)
            raise
        except (OSError, TaskwatchError) as exc:
            self._attempt_failed(exc)
            raise
        finally:
            # keep trying in the background if this first attempt failed for a reason that may pass
            if self._watch is None and self._failure is None:
                self._watch = asyncio.get_running_loop().create_task(self._watchdog(), name="taskwatch-reconnect")

    async def _watchdog(self) -> None:
        delay = self.retry_interval
        while not self._closing:
            remote = self._remote
            if remote is not None and remote.connected:
                await remote.disconnected.wait()
                delay = self.retry_interval
                continue
            # pacing between attempts while the engine is away, not synchronisation; jittered
            # (0.5x to 1.5x) so the dashboards of a restarted engine do not all come back at once
            await asyncio.sleep(delay * (0.5 + random.random()))
            try:
                await self._open(resync=True)
            except AuthenticationFailed as exc:
                self._give_up(exc)  # the engine came back with another token: retrying cannot help
                return
            except (OSError, TaskwatchError) as exc:
                self._attempt_failed(exc)
                delay = min(delay * 2, self.retry_max)

    def take_resync(self) -> Snapshot | None:
        """A snapshot from a reconnect, once; the dashboard reloads from it."""
        snap, self._resync = self._resync, None
        return snap

    def take_events(self, limit: int = 20_000) -> list[BaseEvent]:
        remote = self._remote
        batch = remote.get_batch(limit) if remote is not None else []
        if batch:
            self._heard()
        # a list of the Event union is a list of BaseEvent to its reader here (list is invariant)
        return cast(list[BaseEvent], batch)

    def pending_events(self) -> int:
        remote = self._remote
        return remote.pending() if remote is not None else 0

    def _require(self) -> RemoteEngine:
        remote = self._remote
        if remote is None or not remote.connected:
            raise ConnectionClosed(f"not connected to {self.address}; reconnecting, try again in a moment")
        return remote

    async def _reply(self, request: Awaitable[T]) -> T:
        """Await a request's reply, noting that the engine answered (an error reply too)."""
        try:
            result = await request
        except TaskwatchError as exc:
            # a lost connection, a request too large to send, or no reply in time is no word
            # from the engine
            if not isinstance(exc, ConnectionClosed | MessageTooLarge | CommandTimeout):
                self._heard()
            raise
        self._heard()
        return result

    async def snapshot(self, runs_limit: int = 500) -> Snapshot:
        return await self._reply(self._require().snapshot(runs_limit=runs_limit))

    async def get(self, run_id: str) -> RunRecord:
        return await self._reply(self._require().get(run_id))

    async def submit(self, task: str, params: dict[str, Any] | None = None, key: str | None = None) -> RunRecord:
        return await self._reply(self._require().submit(task, params, key))

    async def cancel(self, run_id: str, grace: float | None = CANCEL_GRACE) -> RunRecord:
        """As :meth:`DashboardClient.cancel`; a ``grace`` is cut to half this client's timeout.

        The engine waits for the run as long as it is told, then replies: told nothing, it
        would wait its own cancel_grace, which may be longer than this client waits for a
        reply, and a cancel that happened would be reported as timed out.
        """
        # refused as Engine.cancel refuses it (InvalidConfiguration), before anything is sent
        grace = checked_grace("RemoteClient.cancel()", grace)
        if grace is not None:
            grace = min(grace, self.timeout / 2)
        return await self._reply(self._require().cancel(run_id, grace))

    async def retry(self, run_id: str) -> RunRecord:
        return await self._reply(self._require().retry(run_id))

    async def pause_periodic(self, name: str) -> PeriodicInfo:
        return await self._reply(self._require().pause_periodic(name))

    async def resume_periodic(self, name: str) -> PeriodicInfo:
        return await self._reply(self._require().resume_periodic(name))

    async def run_periodic(self, name: str) -> RunRecord:
        return await self._reply(self._require().run_periodic(name))

    async def restart_worker(self, name: str) -> WorkerInfo:
        return await self._reply(self._require().restart_worker(name))

    async def stop_worker(self, name: str) -> WorkerInfo:
        return await self._reply(self._require().stop_worker(name))

    async def start_worker(self, name: str) -> WorkerInfo:
        return await self._reply(self._require().start_worker(name))

    async def pause_queue(self, name: str) -> QueueInfo:
        return await self._reply(self._require().pause_queue(name))

    async def resume_queue(self, name: str) -> QueueInfo:
        return await self._reply(self._require().resume_queue(name))

    async def purge_queue(self, name: str) -> QueuePurge:
        return await self._reply(self._require().purge_queue(name))

    async def fire_trigger(self, name: str, key: str) -> TriggerFire:
        return await self._reply(self._require().fire_trigger(name, key))

    async def close(self) -> None:
        self._closing = True
        watch, self._watch = self._watch, None
        if watch is not None:
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch
        if self._remote is not None:
            await self._remote.close()
