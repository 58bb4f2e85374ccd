"""The executor: claims due runs from the store for this node's free slots, and keeps its claims alive.

It owns three loops, each cancelled and awaited by :meth:`Executor.stop`:

- the claim loop: writes runs queued without waiting (``submit_nowait``) in
  one batch, then claims as many due runs as there are free slots (global
  and per task) and hands each claim to the engine to execute. It sleeps
  until woken (new work, a freed slot) or until the next delayed retry is
  due, and never longer than ``poll_interval``, which is how it notices work
  other processes put into a shared store;
- the heartbeat loop: extends the lease of every claim this node holds,
  writes their progress, and learns which of them someone asked to cancel
  and which were taken away;
- the maintenance loop: recovers runs whose worker was lost (anywhere, not
  only here) and prunes finished runs beyond the retention limits.

What a claim means for a run (events, the run index, waiters) is the
engine's: the executor calls back into it through the functions it was given.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping

from .runs import CancelReason, Progress
from .store import Claim, Inserted, MemoryStore, NewRun, Recovered, Store

log = logging.getLogger("taskwatch.executor")

class Executor:
    def __init__(
        self,
        store: Store,
        *,
        node: str,
        incarnation: str,
        max_concurrency: int,
        limits: Callable[[], Mapping[str, int | None]],
        launch: Callable[[Claim], None],
        claims: Callable[[], Mapping[str, Progress]],
        cancel_requested: Callable[[str, CancelReason], None],
        claim_lost: Callable[[str], None],
        inserted: Callable[[list[NewRun], list[Inserted] | BaseException], None],
        recovered: Callable[[list[Recovered]], Awaitable[None]],
        next_due: Callable[[], float | None],
        clock: Callable[[], float],
        poll_interval: float,
        heartbeat_interval: float,
        maintenance_interval: float,
        prune: Callable[[], Awaitable[None]],
        node_load: Callable[[], tuple[float | None, int | None]] | None = None,
    ) -> None:
        self.store = store
        self.node = node
        self.incarnation = incarnation
        self.max_concurrency = max_concurrency
        self._limits = limits
        self._launch = launch
        self._claims = claims
        self._cancel_requested = cancel_requested
        self._claim_lost = claim_lost
        self._inserted = inserted
        self._recovered = recovered
        self._next_due = next_due
        self._clock = clock
        self._prune = prune
        #: this process's CPU and RSS for the nodes table (the engine's last health sample)
        self._node_load = node_load
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.maintenance_interval = maintenance_interval
        #: attempts executing here, in all and per task
        self.running = 0
        self._per_task: dict[str, int] = {}
        self._seen_limits: Mapping[str, int | None] | None = None
        self._unlimited = False
        #: runs queued without waiting, written by the claim loop in one batch
        self._unwritten: list[NewRun] = []
        self._wake = asyncio.Event()
        self._claiming = True
        #: resolved once the claim now in flight has returned and its runs are launched
        self._in_flight: asyncio.Future[None] | None = None
        self._loops: list[asyncio.Task[None]] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._claiming = True
        self._loops = [
            loop.create_task(self._claim_loop(), name="taskwatch-executor-claim"),
            loop.create_task(self._heartbeat_loop(), name="taskwatch-executor-heartbeat"),
            loop.create_task(self._maintenance_loop(), name="taskwatch-executor-maintenance"),
        ]

    @property
    def claiming(self) -> bool:
        """False once the engine began to stop: runs claimed after that are handed back."""
        return self._claiming

    def stop_claiming(self) -> None:
        """Take no new runs from now on (runs already executing carry on)."""
        self._claiming = False

    async def settle(self) -> None:
        """Wait until no claim is in flight, so its runs reach the engine (which hands them
        back when it is stopping). Cancelling the claim loop mid-claim would drop them while
        the store still commits the claim: they would stay running under this node, unrun,
        and the next start would recover them as lost (attempt + 1, one loss counted)."""
        while self._in_flight is not None:
            await asyncio.shield(self._in_flight)

    async def stop(self) -> None:
        """Write what is still unwritten, let a claim in flight land, then cancel and await every loop."""
        self._claiming = False
        await self.flush()
        await self.settle()
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    # ------------------------------------------------------------------ called by the engine

    def wake(self) -> None:
        self._wake.set()

    def insert_later(self, run: NewRun) -> None:
        """Queue ``run`` for the next batch write (for callers that cannot wait)."""
        self._unwritten.append(run)
        self._wake.set()

    def unwritten(self, run_id: str) -> bool:
        return any(r.id == run_id for r in self._unwritten)

    def drop_unwritten(self, run_id: str) -> bool:
        """Forget a queued run that was never written (cancelled before its batch)."""
        for i, run in enumerate(self._unwritten):
            if run.id == run_id:
                del self._unwritten[i]
                return True
        return False

    def started(self, task: str) -> None:
        self.running += 1
        self._per_task[task] = self._per_task.get(task, 0) + 1

    def released(self, task: str) -> None:
        """An attempt of ``task`` ended here: its slot is free (the engine then starts what is due)."""
        self.running -= 1
        left = self._per_task.get(task, 0) - 1
        if left > 0:
            self._per_task[task] = left
        else:
            self._per_task.pop(task, None)

    async def flush(self) -> None:
        """Write every run queued with :meth:`insert_later` in one batch."""
        while self._unwritten:
            batch, self._unwritten = self._unwritten, []
            try:
                inserted: list[Inserted] | BaseException = await self.store.insert(batch)
            except Exception as exc:  # noqa: BLE001 - the engine records each run's failure
                inserted = exc
            self._inserted(batch, inserted)

    def _room(self) -> tuple[int, Mapping[str, int | None]]:
        """Free slots in all, and per task this node can run (None: no limit of its own)."""
        free = self.max_concurrency - self.running
        if free <= 0 or not self._claiming:
            return 0, {}
        limits = self._limits()
        if limits is not self._seen_limits:
            # the engine hands out a new mapping whenever a task registers
            self._seen_limits = limits
            self._unlimited = all(limit is None for limit in limits.values())
        if self._unlimited:
            return free, limits
        per_task = self._per_task
        tasks: dict[str, int | None] = {}
        for name, limit in limits.items():
            if limit is None:
                tasks[name] = None
            elif (room := limit - per_task.get(name, 0)) > 0:
                tasks[name] = room
        return free, tasks

    def _start_all(self, claims: list[Claim]) -> int:
        for claim in claims:
            self._launch(claim)
        return len(claims)

    async def claim_now(self) -> int:
        """Claim due runs for every free slot and launch them; returns how many."""
        free, tasks = self._room()
        if not tasks:
            return 0
        done = self._in_flight = asyncio.get_running_loop().create_future()
        try:
            return self._start_all(await self.store.claim(self.node, self.incarnation, free, tasks))
        finally:
            self._in_flight = None
            done.set_result(None)

    def claim_at_once(self, store: MemoryStore) -> int:
        """:meth:`claim_now` for the memory store, whose claims never wait: no coroutine, no loop turn."""
        free, tasks = self._room()
        if not tasks:
            return 0
        return self._start_all(store.claim_now(self.node, self.incarnation, free, tasks))

    # ------------------------------------------------------------------ loops

    async def _claim_loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.flush()
                claimed = await self.claim_now()
            except asyncio.CancelledError:
                raise
            except Exception:
                # a store that fails now (disk full, file locked too long) may work
                # on the next round; the error must not end the loop for good
                log.exception("claiming runs failed; trying again in %.2g s", self.poll_interval)
                claimed = 0
            if claimed and self.max_concurrency - self.running > 0:
                continue  # more may be due: claim again before sleeping
            timeout = self.poll_interval
            due = self._next_due()
            if due is not None:
                timeout = min(timeout, max(0.0, due - self._clock()))
            if self._wake.is_set():
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            try:
                await self.heartbeat()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed; claims expire unless the next one succeeds")

    async def heartbeat(self) -> None:
        """Extend every claim this node holds; act on cancels and lost claims."""
        claims = self._claims()
        if claims:
            result = await self.store.heartbeat(self.incarnation, list(claims), dict(claims))
            for token, reason in result.cancel.items():
                self._cancel_requested(token, reason)
            for token in result.lost:
                self._claim_lost(token)
        cpu, rss = self._node_load() if self._node_load is not None else (None, None)
        await self.store.node_heartbeat(self.incarnation, self.running, cpu_percent=cpu, rss_bytes=rss)

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.maintenance_interval)
            try:
                # our own heartbeat first: a loop that stalled (or a clock that jumped)
                # must not make this node look dead to its own recovery
                await self.heartbeat()
                await self.recover()
                await self._prune()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("recovery or pruning failed; trying again in %.2g s", self.maintenance_interval)

    async def recover(self) -> list[Recovered]:
        recovered = await self.store.recover()
        if recovered:
            await self._recovered(recovered)
            self._wake.set()
        return recovered

    def __repr__(self) -> str:
        return f"<Executor {self.node} running={self.running} unwritten={len(self._unwritten)}>"
