"""Supervised workers at the edges: a cleanup that outlasts the engine's stop, a worker whose
task was cancelled from outside, and leader-only workers on nodes that share a store and
have no lease (every one of them leads).

Run as a module, this file is one such node in a process of its own::

    python -m tests.test_supervisor_edges DB NODE

It prints one JSON line per thing it does (``started``, ``pass`` with the term its
leader-only worker got, ``log`` for each warning the engine logs, ``stopped``) and
stops once its stdin is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sys
from pathlib import Path
from collections.abc import AsyncIterator
from typing import Any

import pytest
from taskwatch.engine import Engine, InProcessLease, TaskContext

from .helpers import Recorder, eventually, stray_tasks
from .processes import JsonLineProcess

#: a child's every step waits for it at most this long (a loaded machine is slow, a passing run is not)
CHILD_TIMEOUT = 30.0

#: short claim and node ttls, so each node heartbeats (and looks at the nodes table) every second
STORE_OPTIONS = "?lease_ttl=3"


def sqlite_url(db: Path | str) -> str:
    return f"sqlite:///{db}{STORE_OPTIONS}"


async def forever() -> None:
    await asyncio.Event().wait()


# ---------------------------------------------------------------- a cleanup that outlasts the stop


class SlowCleanup:
    """A worker whose first run's cleanup shields itself from every cancel (flushing a buffer,
    say) until ``may_end`` is set; it counts its runs and how many of them ran at once."""

    def __init__(self) -> None:
        self.runs = 0
        self.alive = 0
        self.most_alive = 0
        self.cleaning = asyncio.Event()
        self.may_end = asyncio.Event()

    async def __call__(self, ctx: TaskContext) -> None:
        self.runs += 1
        run = self.runs
        self.alive += 1
        self.most_alive = max(self.most_alive, self.alive)
        try:
            await forever()
        finally:
            try:
                if run == 1:
                    self.cleaning.set()
                    while not self.may_end.is_set():
                        with contextlib.suppress(asyncio.CancelledError):
                            await self.may_end.wait()
            finally:
                self.alive -= 1


def engine_with_slow_cleanup(tmp_path: Path) -> tuple[Engine, SlowCleanup]:
    engine = Engine(store=sqlite_url(tmp_path / "runs.db"), health_interval=None, cancel_grace=0.05)
    worker = SlowCleanup()
    engine.supervised(name="flusher", backoff=0.01)(worker)
    return engine, worker


@contextlib.asynccontextmanager
async def ending_cleanups(engine: Engine, worker: SlowCleanup) -> AsyncIterator[None]:
    """Let the slow cleanup end and the engine stop however the test ends: a copy left
    swallowing cancels would hang the closing of the test's loop."""
    try:
        yield
    finally:
        worker.may_end.set()
        if engine.state == "running":
            await engine.stop()
        left = [t for t in stray_tasks() if t.get_name() == "taskwatch-worker-flusher"]
        if left:
            await asyncio.wait(left, timeout=CHILD_TIMEOUT)


async def stopped_while_it_cleans_up(engine: Engine, worker: SlowCleanup) -> None:
    """Start ``engine``, then stop it while ``worker`` swallows the stop's cancels in its cleanup."""
    await engine.start()
    await eventually(lambda: engine.workers()[0].state == "running")
    await asyncio.wait_for(engine.stop(0.05), timeout=CHILD_TIMEOUT)
    assert worker.cleaning.is_set()


async def test_a_worker_still_cleaning_up_after_the_engine_stopped_says_running_until_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    engine, worker = engine_with_slow_cleanup(tmp_path)
    rec = Recorder(engine, kinds=("worker.",))
    async with ending_cleanups(engine, worker):
        await stopped_while_it_cleans_up(engine, worker)
        assert "ignored cancellation" in caplog.text
        # its code is still executing: "stopped" would be a lie
        assert engine.workers()[0].state == "running"
        assert rec.of("worker.stopped") == []

        worker.may_end.set()
        await eventually(lambda: engine.workers()[0].state == "stopped")
    assert [e.reason for e in rec.of("worker.stopped")] == ["shutdown"]
    assert worker.runs == 1  # the engine is stopped: nothing starts it again
    assert not stray_tasks()


async def test_a_worker_whose_cleanup_outlasted_the_stop_runs_again_once_it_ends_after_a_new_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.supervisor")
    engine, worker = engine_with_slow_cleanup(tmp_path)
    rec = Recorder(engine, kinds=("worker.",))
    async with ending_cleanups(engine, worker):
        await stopped_while_it_cleans_up(engine, worker)

        await engine.start()
        # the old copy still runs: no second one beside it, and starting it changes nothing
        info = engine.start_worker("flusher")
        assert info.state == "running" and not info.stopped_by_user
        assert worker.runs == 1

        worker.may_end.set()
        await eventually(lambda: worker.runs == 2)
        info = engine.workers()[0]
        assert info.state == "running" and not info.stopped_by_user
    assert worker.most_alive == 1
    assert [(e.kind, getattr(e, "reason", None)) for e in rec.events] == [
        ("worker.started", None),
        ("worker.stopped", "shutdown"),  # the first copy, once its cleanup ended
        ("worker.started", None),
        ("worker.stopped", "shutdown"),  # the second, at the last stop
    ]
    assert not stray_tasks()


async def test_a_worker_stopped_while_its_old_copy_still_cleans_up_stays_stopped(tmp_path: Path) -> None:
    engine, worker = engine_with_slow_cleanup(tmp_path)
    async with ending_cleanups(engine, worker):
        await engine.start()
        await eventually(lambda: engine.workers()[0].state == "running")
        await asyncio.wait_for(engine.stop(0.05), timeout=CHILD_TIMEOUT)

        await engine.start()
        stopping = asyncio.ensure_future(engine.stop_worker("flusher"))
        await eventually(lambda: engine.workers()[0].stopped_by_user)
        worker.may_end.set()
        info = await asyncio.wait_for(stopping, timeout=CHILD_TIMEOUT)
        assert info.stopped_by_user
        await eventually(lambda: engine.workers()[0].state == "stopped")
        assert worker.runs == 1
    assert not stray_tasks()


async def test_start_worker_starts_a_worker_whose_task_was_cancelled_from_outside(tmp_path: Path) -> None:
    engine = Engine(store=sqlite_url(tmp_path / "runs.db"), health_interval=None)
    runs = 0

    @engine.supervised(name="w")
    async def w(ctx: TaskContext) -> None:
        nonlocal runs
        runs += 1
        await forever()

    async with engine:
        await eventually(lambda: runs == 1)
        [task] = [t for t in stray_tasks() if t.get_name() == "taskwatch-worker-w"]
        task.cancel()
        await asyncio.wait([task])
        info = engine.workers()[0]
        assert info.state == "stopped" and not info.stopped_by_user

        engine.start_worker("w")
        await eventually(lambda: runs == 2)
        assert engine.workers()[0].state == "running"
    assert not stray_tasks()


# ---------------------------------------------------------------- nodes sharing a store, no lease


class Node(JsonLineProcess):
    """``python -m tests.test_supervisor_edges DB NODE``: a node with a leader-only worker and no lease."""

    def __init__(self, db: Path, node: str) -> None:
        super().__init__([sys.executable, "-m", "tests.test_supervisor_edges", str(db), node], f"node {node}", CHILD_TIMEOUT)

    def stop(self) -> None:
        if self.alive and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.event("stopped")


def lone_leader_warnings(records: list[logging.LogRecord]) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and "has no lease" in r.getMessage()]


async def test_nodes_sharing_a_sqlite_file_without_a_lease_are_each_warned_that_both_lead(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch")
    db = tmp_path / "runs.db"
    a = Node(db, "a")
    try:
        a.event("started")
        assert (await asyncio.to_thread(a.event, "pass"))["term"] == 1
        assert a.of("log") == []  # alone on the file, it has nothing to warn of

        b = Engine(store=sqlite_url(db), node_id="b", health_interval=None)
        terms: list[int] = []

        @b.supervised(name="dedup", leader_only=True)
        async def dedup(ctx: TaskContext) -> None:
            terms.append(await ctx.ensure_leader())
            await forever()

        async with b:
            # both lead, and nothing but the warnings says so
            await eventually(lambda: terms == [1])
            [warning] = await eventually(lambda: lone_leader_warnings(caplog.records), timeout=CHILD_TIMEOUT)
            # a, started first, sees b at its next look at the nodes table
            seen = await asyncio.to_thread(
                a.wait_for, lambda line: line.get("ev") == "log" and "has no lease" in line["message"]
            )
        assert "node b " in warning and "'a'" in warning and "'dedup'" in warning
        assert "RedisLease" in warning and "PostgresLease" in warning
        assert "node a " in seen["message"] and "'b'" in seen["message"]
        # once: the watch ends with its warning
        assert len(lone_leader_warnings(caplog.records)) == 1
        await asyncio.to_thread(a.stop)
        assert len(a.of("log")) == 1
    finally:
        a.close()


# ---------------------------------------------------------------- the child process


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _EmitWarnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _emit(ev="log", level=record.levelname, logger=record.name, message=record.getMessage())


async def _node_main(db: str, node: str) -> None:
    logging.getLogger("taskwatch").addHandler(_EmitWarnings(logging.WARNING))
    engine = Engine(store=sqlite_url(db), node_id=node, health_interval=None)

    @engine.supervised(name="dedup", leader_only=True)
    async def dedup(ctx: TaskContext) -> None:
        _emit(ev="pass", term=await ctx.ensure_leader())
        await forever()

    async with engine:
        _emit(ev="started")
        await asyncio.to_thread(sys.stdin.read)  # until the test closes it
    _emit(ev="stopped")


if __name__ == "__main__":
    asyncio.run(_node_main(sys.argv[1], sys.argv[2]))


async def test_a_leader_stopping_while_a_leader_only_cleanup_still_runs_leaves_the_lease_to_lapse(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # handed over at once, the lease would start the other node's copy beside this one
    lease = InProcessLease(ttl=5.0, renew_interval=0.5)
    first = Engine(node_id="a", lease=lease, health_interval=None, cancel_grace=0.05)
    worker = SlowCleanup()
    first.supervised(name="flusher", leader_only=True)(worker)
    second = Engine(node_id="b", lease=lease, health_interval=None)
    async with ending_cleanups(first, worker):
        await first.start()
        await eventually(lambda: first.leadership().is_leader and worker.runs == 1)
        await asyncio.wait_for(first.stop(0.05), timeout=CHILD_TIMEOUT)
        assert worker.cleaning.is_set() and worker.alive == 1
        held = await lease.holder()
        assert held is not None and held.holder == "a"  # not released: it lapses at its ttl
        assert not first.leadership().is_leader
        assert "the lease is left to lapse" in caplog.text
        async with second:
            assert not second.leadership().is_leader
    # a leader whose leader-only work did end hands the lease over at once, as before
    other = InProcessLease(ttl=5.0, renew_interval=0.5)
    third = Engine(node_id="c", lease=other, health_interval=None, cancel_grace=0.05)

    @third.supervised(name="quick", leader_only=True)
    async def quick(ctx: TaskContext) -> None:
        await forever()

    async with third:
        await eventually(lambda: third.leadership().is_leader)
    assert await other.holder() is None
