"""Hands the executor the changes a shared store pushes from other nodes.

A store shared by a cluster (PostgreSQL) hears of other nodes' inserts and
cancel requests (LISTEN/NOTIFY). An idle executor would otherwise notice new
work only at its next poll, and a cancel of a run executing here only at its
next heartbeat: this relay wakes the claim loop on new work, heartbeats
at once when a cancel arrives (the heartbeat learns which claims to stop),
and has the runs other nodes finished read back at once, so a ``wait()`` here
on a run executed elsewhere returns as soon as it has ended.
For stores that push nothing (memory, SQLite) it does nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from .hop import spawn
from .executor import Executor
from .store import Store, Subscription

log = logging.getLogger("taskwatch.wakeups")


class StoreWakeups:
    """One loop, started and stopped with the engine, relaying store wakeups to the executor."""

    def __init__(
        self, store: Store, executor: Executor, on_finished: Callable[[Collection[str]], Awaitable[None]]
    ) -> None:
        self.store = store
        self.executor = executor
        self.on_finished = on_finished
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None and self.store.pushes_remote_changes:
            sub = self.store.subscribe(finished=True)
            self._task = spawn(self._relay(sub), name="taskwatch-store-wakeups")

    async def stop(self, deadline: float | None = None) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _relay(self, sub: Subscription) -> None:
        while True:
            wakeup = await sub.wait()
            if wakeup.work:
                self.executor.wake()
            if wakeup.cancels and self.executor.running:
                try:
                    await self.executor.heartbeat()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the regular heartbeat will carry the cancel
                    log.warning("heartbeat after a cancel request failed (%s); the next one will tell", exc)
            if wakeup.finished:
                try:
                    await self.on_finished(wakeup.finished)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - the regular catch-up will bring them
                    log.warning("reading back runs other nodes finished failed (%s); the next catch-up will", exc)
