"""Periodic tasks on a durable store: a restart neither repeats a slot nor makes up every missed one."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from taskwatch.engine import Engine, RunRecord, TaskContext

from .helpers import eventually

EVERY = 2.0


def periodic_engine(db: Path, clock: Callable[[], float] = time.time) -> Engine:
    engine = Engine(store=f"sqlite:///{db}", node_id="sched-node", health_interval=None, clock=clock)

    @engine.periodic(every=EVERY, fixed_rate=True)
    async def tick(ctx: TaskContext) -> None:
        return None

    return engine


def ticks(engine: Engine) -> list[RunRecord]:
    return sorted(engine.runs(task="tick", limit=None), key=lambda r: r.created_at)


async def test_a_restart_does_not_fire_the_slot_it_already_fired(tmp_path: Path) -> None:
    db = tmp_path / "sched.db"
    first = periodic_engine(db)
    async with first:
        await eventually(lambda: [r for r in ticks(first) if r.status.finished])
        fired = ticks(first)[0]
    second = periodic_engine(db)
    async with second:
        # the earlier tick is history now; the next one is due a whole interval after it
        await eventually(lambda: len(ticks(second)) >= 2, timeout=EVERY + 5)
        runs = ticks(second)
        assert runs[0].id == fired.id
        assert runs[1].created_at >= fired.created_at + EVERY - 0.05, (runs[1].created_at - fired.created_at)


async def test_slots_missed_while_stopped_fire_once(tmp_path: Path) -> None:
    db = tmp_path / "sched.db"
    first = periodic_engine(db)
    async with first:
        await eventually(lambda: [r for r in ticks(first) if r.status.finished])
    # the next start comes 20 intervals later (on its clock): ten missed slots
    later = periodic_engine(db, clock=lambda: time.time() + 20 * EVERY)
    async with later:
        started = later.clock()
        await eventually(lambda: len(ticks(later)) >= 2)
        caught_up = [r for r in ticks(later)[1:] if r.created_at < started + EVERY - 0.05]
        assert len(caught_up) == 1, [r.created_at - started for r in caught_up]
