"""The engine samples its own health and publishes it on the bus."""

from __future__ import annotations

import asyncio

import psutil
from taskwatch.engine import Engine, TaskContext

from .helpers import Recorder, eventually, stray_tasks


async def test_health_events_describe_the_process_and_the_engine() -> None:
    engine = Engine(health_interval=0.05)
    release = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    async def handle(job: dict) -> None:
        await release.wait()

    queue = engine.queue("jobs", handle, concurrency=1, maxsize=10)
    rec = Recorder(engine, kinds=("health", "queue.stats"))
    async with engine:
        await engine.submit("hold")
        for _ in range(3):
            queue.put_nowait({"n": 1})
        for _ in range(20):
            await engine.submit("quick")
        samples = await eventually(lambda: [e for e in rec.of("health") if e.running == 1 and e.queue_depths.get("jobs") == 2])
        sample = samples[-1]
        me = psutil.Process()
        assert 0 < sample.rss_bytes <= me.memory_info().rss * 2
        assert sample.threads >= 1 and sample.open_fds > 0
        assert sample.cpu_percent >= 0 and sample.loop_lag_ms >= 0
        assert sample.queue_depth == 0
        # finished runs show up as a rate once a whole second has passed
        await eventually(lambda: any(e.finished_per_s >= 20 for e in rec.of("health")))
        stats = await eventually(lambda: [e for e in rec.of("queue.stats") if e.queue == "jobs" and e.in_flight == 1])
        assert stats[-1].depth == 2 and stats[-1].maxsize == 10
        release.set()
    assert not stray_tasks()


async def test_a_busy_loop_shows_up_as_loop_lag() -> None:
    import time

    engine = Engine(health_interval=0.02)

    @engine.task
    async def hog(ctx: TaskContext) -> None:
        time.sleep(0.15)  # blocks the event loop on purpose

    rec = Recorder(engine, kinds=("health",))
    async with engine:
        await (await engine.submit("hog")).wait(2)
        await eventually(lambda: any(e.loop_lag_ms >= 100 for e in rec.of("health")))
