"""A job another thread put (its ``put_nowait`` has returned) is queued from that moment on,
though its handover to the engine's loop is a callback still to run: a purge drops it, counted
as purged like any other, and a put made on the loop afterwards comes after it (FIFO)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, QueueFull, QueuePurge, WorkQueue

from .helpers import Recorder


def put_from_another_thread(queue: WorkQueue, job: Any) -> None:
    """``queue.put_nowait(job)`` on a thread of its own, returned before this does. The loop is
    held meanwhile, so the job's handover to it has not run when this returns."""
    failure: list[BaseException] = []

    def put() -> None:
        try:
            queue.put_nowait(job)
        except BaseException as exc:  # noqa: BLE001 - raised again below, on the test's thread
            failure.append(exc)

    thread = threading.Thread(target=put)
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


def stored_jobs(db: Path, queue: str) -> int:
    with sqlite3.connect(db) as conn:
        return int(conn.execute("SELECT count(*) FROM queue_jobs WHERE queue = ?", (queue,)).fetchone()[0])


async def test_a_purge_drops_the_jobs_other_threads_put_before_it() -> None:
    engine = Engine(health_interval=None)
    handled: list[str] = []

    async def handle(job: dict[str, str]) -> None:
        handled.append(job["n"])

    queue = engine.queue("q", handle, concurrency=1, maxsize=100)
    recorder = Recorder(engine, ("queue.purged",))
    async with engine:
        engine.pause_queue("q")
        queue.put_nowait({"n": "on-the-loop"})
        put_from_another_thread(queue, {"n": "from-a-thread"})
        put_from_another_thread(queue, {"n": "from-another-thread"})
        assert queue.info().depth == 3
        purge = await engine.purge_queue("q")
        assert isinstance(purge, QueuePurge)
        assert (purge.purged, purge.from_store) == (3, 0)
        assert (purge.info.depth, purge.info.purged) == (0, 3)
        engine.resume_queue("q")
        # a job put after the purge: whatever the purge left would be handled before it
        queue.put_nowait({"n": "after-the-purge"})
        await queue.join(10.0)
        assert handled == ["after-the-purge"]
        info = queue.info()
        assert (info.accepted, info.processed, info.purged, info.depth) == (4, 1, 3, 0)
    assert [e.purged for e in recorder.of("queue.purged")] == [3]


async def test_a_put_on_the_loop_comes_after_a_put_another_thread_made_before_it() -> None:
    engine = Engine(health_interval=None)
    handled: list[str] = []

    async def handle(job: dict[str, str]) -> None:
        handled.append(job["n"])

    queue = engine.queue("q", handle, concurrency=1, maxsize=100)
    async with engine:
        engine.pause_queue("q")
        put_from_another_thread(queue, {"n": "1 thread"})
        queue.put_nowait({"n": "2 loop"})
        put_from_another_thread(queue, {"n": "3 thread"})
        put_from_another_thread(queue, {"n": "4 thread"})
        await queue.put({"n": "5 loop"})
        assert queue.info().depth == 5
        engine.resume_queue("q")
        await queue.join(10.0)
    assert handled == ["1 thread", "2 loop", "3 thread", "4 thread", "5 loop"]


async def test_a_full_queue_counts_a_thread_put_that_returned_before_a_put_on_the_loop() -> None:
    # the thread's job holds its place from its put on: the loop's put is the one refused
    engine = Engine(health_interval=None)
    handled: list[str] = []

    async def handle(job: dict[str, str]) -> None:
        handled.append(job["n"])

    queue = engine.queue("q", handle, concurrency=1, maxsize=1)
    async with engine:
        engine.pause_queue("q")
        put_from_another_thread(queue, {"n": "thread"})
        with pytest.raises(QueueFull):
            queue.put_nowait({"n": "loop"})
        engine.resume_queue("q")
        await queue.join(10.0)
    assert handled == ["thread"]


async def test_a_durable_purge_drops_a_thread_put_that_is_then_never_written(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    store = f"sqlite:///{db}"
    handled: list[str] = []

    async def handle(job: dict[str, str]) -> None:
        handled.append(job["n"])

    engine = Engine(store=store, node_id="n", health_interval=None)
    queue = engine.queue("q", handle, maxsize=100)
    engine.pause_queue("q")
    async with engine:
        await queue.put({"n": "committed"})
        put_from_another_thread(queue, {"n": "from-a-thread"})
        purge = await engine.purge_queue("q")
        assert (purge.purged, purge.from_store) == (2, 1)
        assert stored_jobs(db, "q") == 0
    assert stored_jobs(db, "q") == 0
    assert handled == []

    # the next start on the same file finds nothing to take up
    again = Engine(store=store, node_id="n", health_interval=None)
    second = again.queue("q", handle, maxsize=100)
    async with again:
        await second.put({"n": "later"})
        await second.join(10.0)
        assert second.info().adopted == 0
    assert handled == ["later"]
