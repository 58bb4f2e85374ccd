"""Queue jobs and trigger counts on a durable store: they survive a SIGKILL and a restart, and a
trigger's start takes up its keys and their runs before any of them fires again.

Real SQLite files and real child processes (``tests/loops_child.py``) killed
with SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import Engine, EngineNotRunning, RunStatus, TaskContext
from taskwatch.engine.events import QueueDrainIncomplete
from taskwatch.engine.store import TriggerKeyRecord
from taskwatch.engine.triggers import TriggerKeyState

from .helpers import eventually
from .processes import JsonLineProcess
from .test_durable import Child
from .test_triggers import Clock

CHILD = "tests.loops_child"


def handled(log: Path) -> list[int]:
    if not log.exists():
        return []
    return [json.loads(line)["i"] for line in log.read_text().splitlines() if line.strip()]


def lines(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


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
    # every job the restarted process took up tells its handler it was handed out before
    attempts = {(line["pid"] == second.proc.pid, line["attempt"]) for line in lines(log)}
    assert attempts == {(False, 1), (True, 2)}


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


async def test_a_queue_and_a_trigger_made_while_the_engine_runs_are_as_durable(tmp_path: Path) -> None:
    # made after start (a plugin loaded late, a notebook cell run later): what an earlier
    # start left is taken up, and what they hold now is kept for the next one
    store = f"sqlite:///{tmp_path / 'late.db'}"
    release = asyncio.Event()
    seen: list[int] = []

    async def slow(job: Mail) -> None:
        await release.wait()
        seen.append(job.i)

    async def compile_key(ctx: TaskContext, key: str) -> None: ...

    for i in range(2):
        engine = Engine(store=store, node_id="n", health_interval=None)
        async with engine:
            queue = engine.queue("mail", slow)
            compile = engine.trigger("compile", compile_key, size_threshold=100)
            await queue.put(Mail(i=i))
            compile.notify("k", n=3)
            await engine.stop(timeout=0.1)
        assert queue.info().kept >= 1

    release.set()
    engine = Engine(store=store, node_id="n", health_interval=None)
    async with engine:
        queue = engine.queue("mail", slow)
        compile = engine.trigger("compile", compile_key, size_threshold=100)
        await asyncio.wait_for(_poll_until(lambda: len(seen) == 2 and compile.key_count == 1), 10)
        assert [k.count for k in compile.state().keys] == [6]
        assert queue.info().adopted == 2
    assert sorted(seen) == [0, 1]


async def _poll_until(pred) -> None:  # type: ignore[no-untyped-def]
    while not pred():
        await asyncio.sleep(0.01)


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


def test_a_key_fired_just_before_a_kill_follows_its_run_after_the_restart(tmp_path: Path) -> None:
    # the key fires and the process dies before its next save: the store has the run but no key
    # naming it. After the restart the key must follow that run (recovered, attempt 2), not fire
    # a second one that would run beside it
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    args = ("--log", str(log), "notify", "--key", "k", "--count", "5", "--threshold", "5", "--hold",
            "--save-interval", "60")  # fmt: skip
    first = Child(db, "compiler", *args, module=CHILD)
    try:
        fired = first.event("notified")
        assert fired["fired"] == 1 and fired["run_id"] is not None
        poll(lambda: len(starts(log)) == 1, what="the key's run started")
        first.sigkill()
    finally:
        if first.proc.poll() is None:
            first.proc.kill()
    second = Child(db, "compiler", *args, module=CHILD)
    try:
        again = second.event("notified")
        # five more notifies: counted on the run the key follows, not a second run
        assert again["fired"] == 0 and again["run_id"] == fired["run_id"]
        poll(lambda: len(starts(log)) == 2, what="the run recovered and started again")
        assert [(s["run"], s["attempt"]) for s in starts(log)] == [(fired["run_id"], 1), (fired["run_id"], 2)]
    finally:
        second.proc.kill()
        second.proc.wait(10)


def starts(log: Path) -> list[dict[str, object]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


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


# ---------------------------------------------------------------- writes to the store that wait or fail
#
# tests/queue_child.py runs the queue; this process holds the SQLite file's write
# lock (BEGIN EXCLUSIVE on a connection of its own) so the queue's writes wait for
# it, or fail once its busy_timeout has passed.

QUEUE_CHILD = "tests.queue_child"


@contextlib.contextmanager
def queue_child(db: Path, *, busy_timeout: int, paused: bool = False) -> Iterator[Child]:
    """tests/queue_child.py on ``db`` (its store's busy_timeout in ms; consumers paused or not), ready."""
    child = Child(db, "n", "--busy-timeout", str(busy_timeout), *(["--paused"] if paused else []), module=QUEUE_CHILD)
    try:
        child.event("ready")
        yield child
    finally:
        child.close()


def rows(db: Path) -> list[int]:
    """The jobs (their ``i``) the store holds, oldest first."""
    with sqlite3.connect(db) as conn:
        return [json.loads(job)["i"] for (job,) in conn.execute("SELECT job FROM queue_jobs ORDER BY id")]


@contextlib.contextmanager
def locked(db: Path) -> Iterator[None]:
    """The file's write lock, held by this process (another process's transaction) for the block."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.execute("COMMIT")
        conn.close()


async def handle_all(db: Path) -> tuple[list[int], int]:
    """Start an engine on ``db``, handle every job left in it; the jobs handled and how many were adopted."""
    seen: list[int] = []

    async def handler(job: dict) -> None:
        seen.append(job["i"])

    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)
    queue = engine.queue("q", handler)
    async with engine:
        await queue.join(timeout=10)
        adopted = queue.info().adopted
    return seen, adopted


async def test_jobs_a_stop_reports_kept_are_in_postgres_at_the_next_start(postgres_url: str) -> None:
    # put_nowait, then a stop that times out at once: the stop writes them while the
    # consumers end, and must not cut that write short (PostgreSQL rolls it back)
    async def stuck(job: dict) -> None:
        await asyncio.Event().wait()

    engine = Engine(store=postgres_url, node_id="n", health_interval=None)
    queue = engine.queue("q", stuck)
    sub = engine.bus.subscribe(kinds=["queue."])
    await engine.start()
    for i in range(50):
        queue.put_nowait({"i": i})
    await engine.stop(timeout=0)
    [incomplete] = [e for e in sub.get_batch() if isinstance(e, QueueDrainIncomplete)]
    assert (incomplete.left, incomplete.kept) == (50, True)
    assert queue.info().kept == 50

    seen: list[int] = []

    async def handler(job: dict) -> None:
        seen.append(job["i"])

    engine = Engine(store=postgres_url, node_id="n", health_interval=None)
    queue = engine.queue("q", handler)
    async with engine:
        await queue.join(timeout=10)
        info = queue.info()
    assert sorted(seen) == list(range(50)), f"kept=True, left=50, but {info.adopted} were in the store"


async def test_jobs_handled_while_their_write_waits_do_not_run_again_after_a_clean_stop(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with queue_child(db, busy_timeout=30000) as child:
        with locked(db):
            child.send("put_nowait 0 1 2 3")  # their write waits for the lock; the handler has them at once
            for i in range(4):
                child.wait_for(lambda line, i=i: line.get("ev") == "handled" and line["i"] == i)
            child.send("stop 5")
            child.event("stopping")  # the write is still waiting: the stop must let it end, and record it
        stopped = child.event("stopped")
        assert child.exit() == 0
    assert stopped["info"]["processed"] == 4 and stopped["incomplete"] == []
    assert rows(db) == [], "handled jobs kept their rows after a clean stop"
    assert await handle_all(db) == ([], 0)


def test_a_put_the_store_refuses_raises_and_a_retry_is_kept_across_a_kill(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with queue_child(db, busy_timeout=200, paused=True) as child:
        with locked(db):
            child.send("put 1")
            refused = child.event("put")
        # put returns only once its job is committed: the store stayed locked, so it says so
        assert refused["i"] == 1 and refused["error"] == "StoreBusy", refused
        assert "nothing was written. Retry" in refused["message"]
        mark = child.mark()
        child.send("put 1")  # what the error says to do
        child.send("put 2")
        child.wait_for(lambda line: line.get("ev") == "put" and line["i"] == 2, start=mark)
        child.wait_for(lambda line: line.get("ev") == "put" and line["i"] == 1, start=mark)
        assert [line["error"] for line in child.since(mark, "put")] == [None, None]
        assert rows(db) == [1, 2]  # the refused put left nothing behind: no duplicate
        child.sigkill()
    seen, adopted = asyncio.run(handle_all(db))
    assert sorted(seen) == [1, 2] and adopted == 2


def test_jobs_and_acks_of_a_refused_write_are_written_once_the_store_frees_up(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with queue_child(db, busy_timeout=200) as child:
        child.send("put 10 hold")
        assert child.event("put")["error"] is None  # committed; the handler holds it
        child.send("pause")
        child.event("paused")
        with locked(db):
            mark = child.mark()
            child.send("put_nowait 11")  # its write fails: the queue keeps it and tries again
            child.wait_for(lambda line: line.get("ev") == "log" and "writing to the store failed" in line["msg"], start=mark)
            mark = child.mark()
            child.send("release")  # job 10 is handled while the store is locked: its row's delete fails
            child.wait_for(lambda line: line.get("ev") == "handled" and line["i"] == 10, start=mark)
            mark = child.mark()
            child.wait_for(lambda line: line.get("ev") == "log" and "writing to the store failed" in line["msg"], start=mark)
        mark = child.mark()
        child.send("put 12")
        assert child.wait_for(lambda line: line.get("ev") == "put", start=mark)["error"] is None
        child.send("stop 5")  # the queue is paused: 11 and 12 stay kept, 10's row goes
        stopped = child.event("stopped")
        assert child.exit() == 0
    assert rows(db) == [11, 12], "a refused write dropped a job, or the delete of a handled one"
    assert stopped["incomplete"] == [{"left": 2, "kept": True}]
    assert stopped["info"]["write_failures"] >= 2 and stopped["info"]["lost"] == 0
    seen, adopted = asyncio.run(handle_all(db))
    assert seen == [11, 12] and adopted == 2


def test_jobs_a_stop_cannot_write_are_counted_lost_not_kept(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with queue_child(db, busy_timeout=200, paused=True) as child:
        with locked(db):
            child.send("put_nowait 1 2")
            child.event("put_nowait")
            child.send("stop 0")
            stopped = child.event("stopped")
        assert child.exit() == 0
    assert stopped["incomplete"] == [{"left": 2, "kept": False}]
    info = stopped["info"]
    assert (info["abandoned"], info["kept"], info["lost"]) == (2, 0, 2)
    assert rows(db) == []


def test_a_put_whose_job_a_consumer_has_waits_for_the_store_to_free_up(tmp_path: Path) -> None:
    db = tmp_path / "q.db"
    with queue_child(db, busy_timeout=200) as child:
        with locked(db):
            mark = child.mark()
            child.send("put 20 hold")  # the consumer takes it at once: it can no longer be taken back
            child.wait_for(lambda line: line.get("ev") == "log" and "writing to the store failed" in line["msg"], start=mark)
        put = child.wait_for(lambda line: line.get("ev") == "put", start=mark)
        assert put["error"] is None
        assert rows(db) == [20], "put returned before its job was committed"
        child.send("release")
        child.event("handled")
        child.send("stop 5")
        stopped = child.event("stopped")
        assert child.exit() == 0
    assert stopped["info"]["processed"] == 1 and stopped["incomplete"] == []
    assert rows(db) == []


# ---------------------------------------------------------------- a trigger's start and the keys it takes up


@pytest.mark.parametrize("notified_from", ["the loop", "another thread", "a trigger made while the engine runs"])
async def test_a_notify_while_the_trigger_loads_its_keys_waits_for_the_key_to_follow_its_saved_run(
    tmp_path: Path, notified_from: str
) -> None:
    # the key's run is cut short by a stop (pending again, named by the key's saved record); at the
    # next start an edit is notified while the trigger still reads its keys (a queue's handler runs
    # by then): the key follows its saved run first, then runs once more for that edit, never two
    # runs at once
    store = f"sqlite:///{tmp_path / 't.db'}"
    gate = asyncio.Event()
    started: list[str] = []
    running = peak = 0

    async def compile_key(ctx: TaskContext, key: str) -> None:
        nonlocal running, peak
        started.append(ctx.run_id)
        running += 1
        peak = max(peak, running)
        try:
            await gate.wait()
        finally:
            running -= 1

    engine = Engine(store=store, node_id="n", health_interval=None)
    trigger = engine.trigger("compile", compile_key, size_threshold=1)
    async with engine:
        trigger.notify("k")
        [state] = trigger.state().keys
        saved_run = state.run_id
        assert saved_run is not None
        await eventually(lambda: started == [saved_run])
        await engine.stop(timeout=0.1)

    started.clear()
    engine = Engine(store=store, node_id="n", health_interval=None)
    real_load = engine.store.adopt_trigger

    async def adopt_trigger(name: str, incarnation: str, *, own: bool = False) -> dict[str, TriggerKeyRecord]:
        if notified_from == "another thread":
            await asyncio.to_thread(trigger.notify, "k")
        else:
            trigger.notify("k")
        return await real_load(name, incarnation, own=own)

    engine.store.adopt_trigger = adopt_trigger  # type: ignore[method-assign]
    if notified_from != "a trigger made while the engine runs":
        trigger = engine.trigger("compile", compile_key, size_threshold=1)
        await engine.start()
    else:
        await engine.start()
        trigger = engine.trigger("compile", compile_key, size_threshold=1)
    try:
        # the saved run is recovered and under way, and the key follows it (a run fired beside it
        # would be under way too by now)
        await eventually(lambda: saved_run in started)
        await eventually(lambda: [(k.key, k.run_id) for k in trigger.state().keys] == [("k", saved_run)])
        gate.set()
        await trigger.drain(timeout=10)
        [state] = trigger.state().keys
    finally:
        await engine.stop()
    assert peak == 1
    assert len(started) == 2 and started[0] == saved_run  # then one run for the edit
    assert (state.count, state.last_status, trigger.fired) == (0, "succeeded", 1)


async def test_fire_while_the_trigger_loads_its_keys_is_refused(tmp_path: Path) -> None:
    engine = Engine(store=f"sqlite:///{tmp_path / 't.db'}", node_id="n", health_interval=None)
    refused: list[Exception] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        return None

    real_load = engine.store.adopt_trigger

    async def adopt_trigger(name: str, incarnation: str, *, own: bool = False) -> dict[str, TriggerKeyRecord]:
        try:
            trigger.fire("k")  # the key may wait on a saved run not known yet
        except EngineNotRunning as exc:
            refused.append(exc)
        return await real_load(name, incarnation, own=own)

    engine.store.adopt_trigger = adopt_trigger  # type: ignore[method-assign]
    trigger = engine.trigger("compile", compile_key, size_threshold=5)
    async with engine:
        await trigger.drain(timeout=10)
        assert [str(e) for e in refused] == [
            "trigger 'compile' is still taking up the keys its store saved (and the runs they wait on), so "
            "nothing was queued; fire once it has started (`await trigger.drain()` waits for its start)"
        ]
        assert engine.runs(limit=None) == [] and trigger.fired == 0
        assert trigger.fire("k").fired  # once started


#: a trigger on a SQLite file whose key "k" fires and succeeds after its count was saved, and before
#: the next save: the process is killed then. Prints {"ev": "ran", "run_id"}; the runs go to the log
RAN_UNSAVED_CHILD = r"""
import asyncio, json, os, sys
from taskwatch.engine import Engine, TaskContext

async def main(db: str, log: str, ran_before: bool) -> None:
    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        os.write(fd, (json.dumps({"key": key, "run": ctx.run_id, "pid": os.getpid()}) + "\n").encode())

    # no save of its own before the kill: only those save_changes() makes
    trigger = engine.trigger("compile", compile_key, size_threshold=3, save_interval=3600)
    async with engine:
        if ran_before:
            trigger.notify("k", 3)
            await trigger.drain()
        trigger.notify("k", 2)
        await trigger.save_changes()
        trigger.notify("k")
        await trigger.drain()
        [state] = trigger.state().keys
        print(json.dumps({"ev": "ran", "run_id": state.run_id}), flush=True)
        await asyncio.Event().wait()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3] == "1"))
"""


@pytest.mark.parametrize("ran_before", [False, True], ids=["first run", "a run recorded before"])
def test_a_key_whose_run_succeeded_after_the_last_save_does_not_run_again_after_a_kill(
    tmp_path: Path, ran_before: bool
) -> None:
    db, log = tmp_path / "t.db", tmp_path / "runs.log"
    child = JsonLineProcess(
        [sys.executable, "-c", RAN_UNSAVED_CHILD, str(db), str(log), "1" if ran_before else "0"], "child", 30.0
    )
    try:
        run_id = child.event("ran")["run_id"]

        def status() -> str | None:
            with sqlite3.connect(db) as conn:
                row = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
            return None if row is None else str(row[0])

        poll(lambda: status() == "succeeded", what="the run's success in the file")
    finally:
        child.close()  # SIGKILL: the key's record still holds the count of 2 that run took
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count, run_id FROM trigger_keys").fetchall() == [(2, None)]
    assert len(lines(log)) == (2 if ran_before else 1)
    restarted: list[str] = []

    async def restart() -> TriggerKeyState:
        engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)

        async def compile_key(ctx: TaskContext, key: str) -> None:
            restarted.append(key)

        trigger = engine.trigger("compile", compile_key, size_threshold=3)
        trigger.notify("k")  # one unit of new work: below the threshold, unless the 2 were still counted
        async with engine:
            await trigger.drain(timeout=10)
            [state] = trigger.state().keys
            return state

    state = asyncio.run(restart())
    assert restarted == []
    assert (state.count, state.run_id, state.last_status) == (1, run_id, "succeeded")


async def test_a_run_of_a_key_before_it_was_forgotten_takes_nothing_off_its_new_count(tmp_path: Path) -> None:
    # the key ran, was forgotten (its record deleted) and was notified afresh: its old run is no
    # run fired after the record was saved
    store = f"sqlite:///{tmp_path / 't.db'}"
    clock = Clock()
    ran: list[str] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    engine = Engine(store=store, node_id="n", health_interval=None, clock=clock)
    trigger = engine.trigger("compile", compile_key, size_threshold=3, forget_after=100, check_interval=3600)
    async with engine:
        trigger.notify("k", 3)
        await trigger.drain(timeout=10)
        clock.now += 200
        trigger.check()
        assert trigger.key_count == 0
        await trigger.save_changes()
        clock.now += 10
        trigger.notify("k", 2)
    assert ran == ["k"]

    engine = Engine(store=store, node_id="n", health_interval=None, clock=clock)
    trigger = engine.trigger("compile", compile_key, size_threshold=3, forget_after=100, check_interval=3600)
    async with engine:
        assert [r.status for r in engine.runs(task="trigger:compile", limit=None)] == [RunStatus.SUCCEEDED]
        [state] = trigger.state().keys
        assert (state.count, state.run_id, state.last_status) == (2, None, None)
