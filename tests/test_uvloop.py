"""The engine on uvloop, the event loop many services run: every pattern, the SQLite store, the
control endpoint with clients coming and going while events stream, and a stop that leaves
nothing behind. Each test runs its own uvloop loop (``asyncio.Runner(loop_factory=...)``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from taskwatch.engine import Engine, InProcessLease, RemoteEngine, TaskContext

from .helpers import eventually


def on_uvloop(main: Callable[[], Awaitable[Any]]) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        loop = runner.get_loop()
        assert type(loop).__module__.startswith("uvloop")
        result = runner.run(main())
        assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
        return result


def test_every_pattern_runs_on_uvloop_with_the_sqlite_store(tmp_path: Path) -> None:
    async def main() -> None:
        engine = Engine(store=f"sqlite:///{tmp_path / 'runs.db'}", health_interval=None, lease=InProcessLease())
        handled: list[int] = []
        fired: list[str] = []
        ticks: list[float] = []
        worked = asyncio.Event()

        @engine.task(retries=1, backoff=0.01)
        async def flaky(ctx: TaskContext) -> int:
            if ctx.attempt == 1:
                raise ValueError("first try fails")
            return ctx.attempt

        @engine.periodic(every=0.05)
        async def tick(ctx: TaskContext) -> None:
            ticks.append(asyncio.get_running_loop().time())

        async def handle(job: int) -> None:
            handled.append(job)

        async def on_key(ctx: TaskContext, key: str) -> None:
            fired.append(key)

        @engine.supervised(leader_only=True)
        async def singleton(ctx: TaskContext) -> None:
            worked.set()
            await asyncio.Event().wait()

        queue = engine.queue("jobs", handle)
        trigger = engine.trigger("compile", on_key, size_threshold=2)
        async with engine:
            record = await (await engine.submit("flaky")).wait(10)
            assert (record.status, record.result) == ("succeeded", 2)
            for job in range(3):
                await queue.put(job)
            await asyncio.wait_for(queue.join(), 10)
            trigger.notify("k", 2)
            await eventually(lambda: fired == ["k"], timeout=10)
            await eventually(lambda: len(ticks) >= 2, timeout=10)
            await asyncio.wait_for(worked.wait(), 10)
        assert handled == [0, 1, 2]

    on_uvloop(main)


def test_clients_that_leave_while_events_stream_to_them_leave_no_error_on_uvloop(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # uvloop raises on a write to a transport that has closed, where asyncio's loop ignores it:
    # a client gone while its events were on the way is no failure of the connection
    caplog.set_level(logging.DEBUG, logger="taskwatch.server")

    async def main() -> int:
        engine = Engine(health_interval=None, max_queue=1_000_000)

        @engine.task
        async def noop(ctx: TaskContext) -> None:
            return None

        stop = asyncio.Event()

        async def busy() -> None:
            while not stop.is_set():
                await engine.submit_many([("noop", None)] * 50)
                await asyncio.sleep(0.002)  # the load's pace: about 25,000 runs a second at most

        attached = 0
        async with engine:
            server = await engine.serve(str(tmp_path / "s.sock"), announce=False)
            load = asyncio.create_task(busy())
            try:
                for _ in range(200):
                    remote = RemoteEngine(server.address)
                    await remote.connect()
                    # events are streaming to it: leave in the middle of the stream
                    received = 0
                    while received < 300:
                        assert await remote.wait(timeout=5)
                        received += len(remote.get_batch())
                    attached += 1
                    await remote.close()
            finally:
                stop.set()
                await load
        return attached

    assert on_uvloop(main) == 200
    failed = [r for r in caplog.records if r.levelno >= logging.WARNING and "control connection" in r.getMessage()]
    assert not failed, [(r.getMessage(), r.exc_info) for r in failed]
