"""Health sampling: the engine measures itself and publishes a ``health`` event.

Every ``interval`` seconds: process CPU %, RSS, threads and open file
descriptors (psutil), event-loop lag (how late this loop's own timer fired),
queue depths, running runs and finished/failed runs per second.

``running`` is the runs this node executes, not every run it knows to be
running: on a cluster store a node also knows the runs it submitted that
others execute, and the cluster's Nodes view shows each node's sample.
``queue_depth`` is the runs waiting to start that this node knows of (those
it submitted, and others it read from the store): a waiting run belongs to
no node yet, any node with its task may start it, so on a cluster the figure
is the node's view of the cluster's queue, not work waiting for this node.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import psutil

from .hop import spawn
from .events import HealthSample, QueueStatsEvent
from .runs import RunStatus

if TYPE_CHECKING:
    from .engine import Engine


class HealthSampler:
    def __init__(self, engine: Engine, interval: float | None) -> None:
        self._engine = engine
        self.interval = interval
        self._task: asyncio.Task[None] | None = None
        self._process = psutil.Process()
        self.last: HealthSample | None = None

    async def start(self) -> None:
        if self.interval is None or self.interval <= 0 or self._task is not None:
            return
        # the first cpu_percent call only sets the baseline
        self._process.cpu_percent(None)
        self._task = spawn(self._loop(), name="taskwatch-health")

    async def stop(self, deadline: float) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def sample(self, loop_lag: float) -> HealthSample:
        engine = self._engine
        proc = self._process
        with proc.oneshot():
            cpu = proc.cpu_percent(None)
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            try:
                fds = proc.num_fds()
            except (AttributeError, psutil.Error):  # not on Windows
                fds = -1
        queues = engine.queues()
        for q in queues:
            engine.bus.emit(
                QueueStatsEvent,
                queue=q.name,
                depth=q.depth,
                in_flight=q.in_flight,
                processed=q.processed,
                failed=q.failed,
                maxsize=q.maxsize,
            )
        finished, failed = engine.rates(1)
        counts = engine.stats().by_status
        sample = engine.bus.emit(
            HealthSample,
            cpu_percent=cpu,
            rss_bytes=rss,
            threads=threads,
            open_fds=fds,
            loop_lag_ms=max(0.0, loop_lag * 1000.0),
            running=engine.executing,
            queue_depth=counts[RunStatus.PENDING.value],
            queue_depths={q.name: q.depth for q in queues},
            finished_per_s=finished,
            failed_per_s=failed,
        )
        self.last = sample
        return sample

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.interval or 1.0
        while True:
            expected = loop.time() + interval
            await asyncio.sleep(interval)
            lag = loop.time() - expected
            try:
                self.sample(lag)
            except psutil.Error:
                # the process table can be briefly unreadable; the next sample will do
                continue
