"""Queue jobs and trigger counts on a durable store: they survive a SIGKILL and a restart.

Real SQLite files and real child processes (``tests/loops_child.py``) killed
with SIGKILL.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

from pydantic import BaseModel
from taskwatch.engine import Engine, TaskContext
from taskwatch.engine.events import QueueDrainIncomplete

from .test_durable import Child

CHILD = "tests.loops_child"


def handled(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [json.loads(line)["i"] for line in log.read_text().splitlines() if line.strip()]


def poll(pred, timeout: float = 30.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout} s")
        time.sleep(0.02)


def test_queue_jobs_put_before_a_kill_are_all_handled_after_the_restart(tmp_path: Path) -> None:
    db, log = tmp_path / "q.db", tmp_path / "handled.log"
    count = 300
    first = Child(db, "mailer", "--log", str(log), "--sleep", "0.05", "put", "--count", str(count), module=CHILD)
    try:
        first.event("all_put")  # every put returned: every job is committed
        poll(lambda: len(handled(log)) >= 20, what="20 jobs handled")
        first.sigkill()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    before = handled(log)
    assert len(set(before)) < count, "the kill came too late to leave jobs behind"

    second = Child(db, "mailer", "--log", str(log), "--sleep", "0", "drain", module=CHILD)
    started = second.event("started")
    drained = second.event("drained", timeout=120)
    second.event("stopped")
    assert second.exit() == 0
    assert started["adopted"] >= count - len(set(before))
    assert set(handled(log)) == set(range(count)), "a committed job was lost"
    # a job is handled again only if the kill cut it short (or its done mark was not yet written)
    again = len(handled(log)) - count
    assert again <= started["adopted"] - (count - len(set(before)))
    assert drained["info"]["failed"] == 0
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM queue_jobs").fetchone()[0] == 0


class Mail(BaseModel):
    i: int


async def test_a_graceful_stop_keeps_queued_jobs_for_the_next_start(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'q.db'}"
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(job: Mail) -> None:
        await release.wait()
        seen.append(job.i)  # read back from the store as the model the handler names

    engine = Engine(store=store, node_id="n", health_interval=None)
    queue = engine.queue("mail", slow)
    queue.put_nowait(Mail(i=0))  # before start: written once the engine runs
    sub = engine.bus.subscribe(kinds=["queue."])
    async with engine:
        for i in range(1, 5):
            await queue.put(Mail(i=i))
        await engine.stop(timeout=0.2)
    [incomplete] = [e for e in sub.get_batch() if isinstance(e, QueueDrainIncomplete)]
    assert (incomplete.left, incomplete.kept) == (5, True)
    assert queue.info().kept == 5 and seen == []

    release.set()
    engine = Engine(store=store, node_id="n", health_interval=None)
    queue = engine.queue("mail", slow)
    async with engine:
        await queue.join(timeout=10)
        info = queue.info()
    assert sorted(seen) == [0, 1, 2, 3, 4] and seen[0] == 0  # the oldest job first
    assert (info.adopted, info.processed) == (5, 5)


def test_trigger_counts_survive_a_kill(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    child = Child(db, "counter", "notify", "--key", "doc-1", "--count", "7", module=CHILD)
    try:
        child.event("notified")

        def saved() -> int:
            try:
                with sqlite3.connect(db) as conn:
                    row = conn.execute("SELECT count FROM trigger_keys WHERE counter_key = 'doc-1'").fetchone()
            except sqlite3.OperationalError:
                return 0  # the table is not there yet
            return 0 if row is None else int(row[0])

        poll(lambda: saved() == 7, what="the count saved")
        child.sigkill()
    finally:
        if child.proc.poll() is None:
            child.proc.kill()

    async def restart() -> int:
        engine = Engine(store=f"sqlite:///{db}", node_id="counter", health_interval=None)

        async def compile_key(ctx: TaskContext, key: str) -> None:
            return None

        trigger = engine.trigger("compile", compile_key, size_threshold=1_000_000)
        trigger.notify("doc-1")  # before start: added to what was saved
        async with engine:
            [key] = trigger.state().keys
            return key.count

    assert asyncio.run(restart()) == 8


async def test_a_trigger_key_follows_its_run_across_a_restart(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 't.db'}"
    gate = asyncio.Event()
    ran: list[str] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        await gate.wait()
        ran.append(key)

    engine = Engine(store=store, node_id="n", health_interval=None)
    trigger = engine.trigger("compile", compile_key, size_threshold=3)
    async with engine:
        for _ in range(3):
            trigger.notify("k")
        [state] = trigger.state().keys
        assert state.run_id is not None
        first_run = state.run_id
        await engine.stop(timeout=0.1)  # the run is cut short: back to pending in the store

    gate.set()
    engine = Engine(store=store, node_id="n", health_interval=None)
    trigger = engine.trigger("compile", compile_key, size_threshold=3)
    async with engine:
        [state] = trigger.state().keys
        assert state.run_id == first_run  # the key waits on the same run, and fires no second one
        await trigger.drain(timeout=10)
        [state] = trigger.state().keys
    assert ran == ["k"]
    assert (state.count, state.last_status, state.run_id) == (0, "succeeded", first_run)
