"""A graceful ``engine.stop()`` on a SQLite file that does not get to finish: runs in flight are
never recorded cancelled, they run again at the next start.

A program's own graceful stop can be cut short from outside the engine: a second Ctrl-C
while the stop drains (asyncio raises ``KeyboardInterrupt`` wherever the process is, then
``asyncio.run`` cancels every task), or a shutdown budget (``asyncio.wait_for`` around
``stop()``) running out, after which ``asyncio.run`` ends the same way. That teardown is no
one's cancel: as after ``kill -9``, the runs it cancels are left to recovery, and a restart
under the same node id runs each of them again as attempt 2. Each such program runs in a
child process, which the test signals for real; the test then reads the file it left and
restarts an engine on it.

Any other cancel from outside the engine while it stops (the program's own code cancelling a
run's task) puts the run back to pending, as the stop's own cut would; a user's cancel during
the stop still ends its run ``cancelled`` ("user").
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, RunStatus, TaskContext

from .helpers import Recorder, eventually
from .processes import JsonLineProcess

#: generous bounds for a loaded machine; a passing test takes a fraction of them
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0
#: runs the program has going when its stop is interrupted (all of them at once)
RUNS = 4

#: The program: an engine on the file (argv[1]) running argv[3] ``block`` runs, which never end
#: by themselves, then stopped gracefully (a drain far longer than the test) as argv[2] says:
#:
#: - ``sigint``: serves until Ctrl-C, then stops in its ``finally``; the test's second SIGINT
#:   comes once the stop drains the runs (the stop tells its store how long it may retry
#:   right before it waits for them: ``give_up_after``);
#: - ``sigint-early``: the same, the second SIGINT as soon as the stop has begun (it may end
#:   the stop's own task, which closes the store on its way out);
#: - ``sigint-maintenance``: the same, but the second SIGINT is the process's own, raised while
#:   the executor's maintenance loop runs its code (its store's ``recover``) during the drain,
#:   so the ``KeyboardInterrupt`` ends that loop itself instead of leaving the event loop;
#: - ``wait_for``: ``asyncio.wait_for(engine.stop(timeout=60), 0.2)``, and ``main()`` returns
#:   when that budget runs out.
#:
#: taskwatch's ERROR log records are printed as lines too.
_PROGRAM = r"""
import asyncio, json, logging, signal, sys
from taskwatch.engine import Engine, TaskContext
from taskwatch.engine.store import SqliteStore

db, how, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
draining = False

def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

class ErrorLines(logging.Handler):
    def emit(self, record):
        emit(ev="log", level=record.levelname, message=record.getMessage())

logging.getLogger("taskwatch").addHandler(ErrorLines(logging.ERROR))

class Store(SqliteStore):
    def give_up_after(self, deadline):
        global draining
        super().give_up_after(deadline)
        if deadline is not None and not draining:
            draining = True
            emit(ev="draining")

    async def recover(self, *args, **kwargs):
        if how == "sigint-maintenance" and draining:
            # raise_signal runs the handler before it returns: the KeyboardInterrupt of
            # asyncio.run's second Ctrl-C is raised here, in the maintenance loop's task
            signal.raise_signal(signal.SIGINT)
        return await super().recover(*args, **kwargs)

# a maintenance round every half second (a third of the lease): the interrupt comes soon
engine = Engine(store=Store(db, lease_ttl=1.5), node_id="app", max_concurrency=runs, poll_interval=0.05,
                health_interval=None)
going = asyncio.Event()
started = 0

@engine.task(name="block")
async def block(ctx: TaskContext) -> None:
    global started
    started += 1
    emit(ev="running", id=ctx.run_id, attempt=ctx.attempt)
    if started == runs:
        going.set()
    await asyncio.Event().wait()

engine.bus.add_callback(lambda event: emit(ev="stopping", state=engine.state), ["engine.stopping"])

async def main():
    await engine.start()
    try:
        handles = await engine.submit_many([("block", None)] * runs)
        emit(ev="submitted", ids=[h.id for h in handles])
        await going.wait()
        emit(ev="going")
        if how == "wait_for":
            try:
                await asyncio.wait_for(engine.stop(timeout=60), 0.2)  # the deployment's shutdown budget
            except TimeoutError:
                emit(ev="budget", state=engine.state)
            return
        await asyncio.Event().wait()  # until Ctrl-C
    finally:
        if how != "wait_for":
            await engine.stop(timeout=60)  # graceful: lets the runs finish

asyncio.run(main())
"""


@pytest.fixture
def children() -> Iterator[list[JsonLineProcess]]:
    started: list[JsonLineProcess] = []
    yield started
    for child in started:
        child.close()


def _run_program(db: Path, how: str, children: list[JsonLineProcess]) -> tuple[list[str], int]:
    """Run the program until its runs are going, interrupt its stop ``how``; the ids of its runs
    and its exit code."""
    cmd = [sys.executable, "-c", _PROGRAM, str(db), how, str(RUNS)]
    child = JsonLineProcess(cmd, f"program ({how})", START_TIMEOUT)
    children.append(child)
    ids: list[str] = child.event("submitted")["ids"]
    child.event("going")
    if how == "wait_for":
        assert child.event("budget")["state"] == "stopping"
    else:
        os.kill(child.proc.pid, signal.SIGINT)  # the first Ctrl-C: the program's finally stops the engine
        assert child.event("stopping")["state"] == "stopping"
        if how == "sigint":
            child.event("draining")
        if how != "sigint-maintenance":
            os.kill(child.proc.pid, signal.SIGINT)  # the second, an impatient user's
    try:
        code = child.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the program did not end; last lines: {child.lines[-3:]}") from None
    child.close()  # its last lines read
    assert sorted(line["id"] for line in child.of("running")) == sorted(ids)
    # (an outcome written to a store the teardown closed would say "... recovery will run it again")
    assert child.of("log") == []
    return ids, code


def _rows(db: Path) -> dict[str, tuple[Any, ...]]:
    """id -> (status, attempt, cancel_reason), read from the file itself."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return {row[0]: tuple(row[1:]) for row in conn.execute("SELECT id, status, attempt, cancel_reason FROM runs")}


def _integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


async def _restart(db: Path, ids: list[str]) -> tuple[list[tuple[RunStatus, Any, int]], set[str]]:
    """A restart of the program's node on the file, whose ``block`` now returns its attempt: how
    each of ``ids`` ends, and the ids its start recovered."""
    engine = Engine(store=f"sqlite:///{db}", node_id="app", poll_interval=0.05, health_interval=None)

    @engine.task(name="block")
    async def block(ctx: TaskContext) -> int:
        return ctx.attempt

    recorder = Recorder(engine, ("run.recovered",))
    async with engine:
        records = [await engine.handle(i).wait(timeout=20) for i in ids]
    recovered = {event.run_id for event in recorder.of("run.recovered") if event.action == "requeued"}
    return [(r.status, r.result, r.attempt) for r in records], recovered


@pytest.mark.timeout(90)
@pytest.mark.parametrize("how", ["sigint", "sigint-early", "sigint-maintenance", "wait_for"])
async def test_runs_a_stop_left_to_the_loops_teardown_run_again_at_the_next_start(
    tmp_path: Path, children: list[JsonLineProcess], how: str
) -> None:
    db = tmp_path / "runs.db"
    ids, code = await asyncio.to_thread(_run_program, db, how, children)
    # Ctrl-C twice ends the program with KeyboardInterrupt; the spent budget ends main()
    assert code == (0 if how == "wait_for" else -signal.SIGINT)
    assert _integrity(db) == "ok"
    # nothing was written for them: their claims are left to recovery, as a kill -9 leaves them
    # (a write would race the teardown, which closes the store under it)
    assert _rows(db) == {i: ("running", 1, None) for i in ids}

    ended, recovered = await _restart(db, ids)
    assert ended == [(RunStatus.SUCCEEDED, 2, 2)] * RUNS
    assert recovered == set(ids)


@pytest.mark.timeout(60)
async def test_a_cancel_from_outside_the_engine_during_its_stop_puts_the_run_back_to_pending(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{db}", node_id="app", max_concurrency=4, poll_interval=0.05, health_interval=None)
    release = asyncio.Event()
    tasks: dict[str, asyncio.Task[Any]] = {}

    @engine.task(name="block")
    async def block(ctx: TaskContext) -> int:
        task = asyncio.current_task()
        assert ctx.run_id is not None and task is not None
        tasks[ctx.run_id] = task
        await release.wait()
        return ctx.attempt

    await engine.start()
    stop: asyncio.Task[None] | None = None
    try:
        outside, by_user, left = [h.id for h in await engine.submit_many([("block", None)] * 3)]
        await eventually(lambda: len(tasks) == 3)
        stop = asyncio.create_task(engine.stop(timeout=60))
        await eventually(lambda: engine.state == "stopping")
        tasks[outside].cancel()  # the program's own code, not the engine: no one asked for a cancel
        await eventually(lambda: tasks[outside].done())
        cancelled = await engine.cancel(by_user)  # a user's cancel still is one
        assert (cancelled.status, cancelled.cancel_reason) == (RunStatus.CANCELLED, "user")
    finally:
        release.set()  # the last one finishes within the drain
        if stop is None:
            await engine.stop()
        else:
            await asyncio.wait_for(stop, 20)

    # the stop's own cut would have put it back to pending for its next attempt, and so did this
    assert _rows(db) == {
        outside: ("pending", 2, None),
        by_user: ("cancelled", 1, "user"),
        left: ("succeeded", 1, None),
    }
    ended, recovered = await _restart(db, [outside])
    assert (ended, recovered) == ([(RunStatus.SUCCEEDED, 2, 2)], set())
