"""Durable runs end to end: real SQLite files, real processes, real SIGKILL.

Each crash test drives ``python -m tests.durable_child`` (an engine on a SQLite
file in its own process), kills it with SIGKILL at a point it has announced on
stdout, and then checks the file itself -- with :mod:`sqlite3`, after every
process that wrote it is gone -- and the execution logs the tasks append to.
Nothing waits by sleeping: a test acts on a line the child printed, or polls
the database with a bounded timeout.

What each test proves:

- a killed engine loses no run; a restart with the same node id finishes
  every one, never runs again a run that had finished, and runs each
  in-flight run again as attempt 2;
- a retry waiting for its backoff at the kill fires after the restart at its
  due time (not at once, not never);
- every id ``submit_many`` returned before a kill is in the file;
- two processes on one file (different node ids) execute each run exactly once;
- a graceful ``stop()`` leaves pending runs and runs it cut short in the file
  for the next start (attempt 2 for the cut-short ones, 1 for the others),
  also when it comes right after a submit, while the executor is claiming:
  no run is cancelled, left ``running``, or counted as lost;
- a run that kills its worker is failed as ``WorkerLost`` after three losses,
  or at the first restart with ``on_lost="fail"``;
- processes opening a new file at the same moment all open it, and make
  different run ids however the application seeds ``random``;
- a program that ends with no ``engine.stop()`` (``main()`` returning, an
  exception or ``sys.exit`` out of ``asyncio.run``, Ctrl-C) leaves every run
  ``submit_nowait`` accepted in the file, pending, even when the file was
  locked by another process until the program was exiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from taskwatch.engine import Engine, TaskContext
from taskwatch.engine.store import SqliteStore
from taskwatch.engine.store.base import new_run_id

from .processes import JsonLineProcess, Line

#: generous bounds for a loaded 2-core machine; a passing run takes a fraction of them
START_TIMEOUT = 20.0
EXIT_TIMEOUT = 30.0
#: runs in the two-process test (10,000 takes ~11 s on 2 cores); TASKWATCH_DURABLE_RUNS=N to change it
TWO_PROCESS_RUNS = int(os.environ.get("TASKWATCH_DURABLE_RUNS", "10000"))
#: stop/start cycles in the stop-right-after-submit test (the race it looks for is narrow)
ROUNDS = 60


# ---------------------------------------------------------------- the child process


class Child(JsonLineProcess):
    """One ``python -m tests.durable_child`` process and every JSON line it printed."""

    def __init__(
        self, db: Path, node: str, *args: str, log: Path | None = None, module: str = "tests.durable_child"
    ) -> None:
        cmd = [sys.executable, "-m", module, str(db), "--node", node]
        if log is not None:
            cmd += ["--log", str(log)]
        super().__init__([*cmd, *args], f"child {node}", START_TIMEOUT)

    def recovered_at_start(self) -> list[Line]:
        """The ``recovered`` lines printed before ``started``: runs ``engine.start()`` itself took
        back (a restart recognising its previous incarnation), not the later lease-expiry sweep.
        (A process that died before printing ``started`` printed all of them inside ``start()``.)"""
        with self._cond:
            assert self.eof, "call it once the process has exited"
            out: list[Line] = []
            for line in self.lines:
                if line.get("ev") == "started":
                    break
                if line.get("ev") == "recovered":
                    out.append(line)
            return out

    def go(self) -> None:
        self.send("go")

    def sigkill(self) -> None:
        """SIGKILL now, then wait until the process and its stdout are gone."""
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.exit() == -signal.SIGKILL

    def exit(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Wait for the process to end by itself; its return code (negative: killed by that signal)."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"child {self.proc.pid} still running after {timeout} s; last lines: {self.lines[-3:]}") from None
        self._reader.join(5)
        return rc


@pytest.fixture
def spawn() -> Iterator[Callable[..., Child]]:
    """Start children; any still alive at the end of the test is killed."""
    children: list[Child] = []

    def start(db: Path, node: str, *args: str, log: Path | None = None) -> Child:
        child = Child(db, node, *args, log=log)
        children.append(child)
        return child

    yield start
    for child in children:
        child.close()


# ---------------------------------------------------------------- reading what is on disk


def table(db: Path) -> dict[str, dict[str, Any]]:
    """Every run row, by id, read straight from the file."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.row_factory = sqlite3.Row
        return {row["id"]: dict(row) for row in conn.execute("SELECT * FROM runs")}


def integrity(db: Path) -> str:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def total(db: Path, name: str) -> int:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return int(conn.execute("SELECT value FROM totals WHERE name = ?", (name,)).fetchone()[0])


def stored_jobs(db: Path) -> list[int]:
    """The ``n`` of every queue job row in the file, sorted (a job written twice shows twice)."""
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return sorted(json.loads(job)["n"] for (job,) in conn.execute("SELECT job FROM queue_jobs"))


def run_to_its_end(script: str, *args: str, code: int = 0) -> str:
    """Run ``script`` with ``args`` in a child process until it ends, check its exit ``code``;
    what it printed."""
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=EXIT_TIMEOUT)
    assert done.returncode == code, done.stderr
    return done.stdout


def executions(log: Path) -> list[Line]:
    """The execution log: one line per attempt a task started, in any process.

    A process SIGKILLed in the middle of writing its line leaves part of it, with no newline:
    that part is its own (an attempt it had started, and the kill cut short) and is left out;
    the line the next process appended after it is kept.
    """
    if not log.exists():
        return []
    lines = []
    for raw in log.read_text().splitlines():
        try:
            lines.append(json.loads(raw))
        except json.JSONDecodeError:
            start = raw.rfind('{"run": ', 1)
            if start > 0:
                lines.append(json.loads(raw[start:]))
            # else: the torn last line of a killed process, nothing after it
    return lines


def by_status(rows: dict[str, dict[str, Any]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for run_id, row in rows.items():
        out.setdefault(row["status"], set()).add(run_id)
    return out


# ---------------------------------------------------------------- 1. kill -9 mid-way, restart


@pytest.mark.timeout(90)
def test_a_killed_engine_loses_nothing_and_reruns_only_what_was_in_flight(tmp_path: Path, spawn: Callable[..., Child]) -> None:
    db, log = tmp_path / "runs.db", tmp_path / "exec.log"
    first = spawn(db, "worker-1", "--sleep", "0.05", "--max-concurrency", "16", "run", "--submit", "work", "--count", "1000", log=log)
    ids = set(first.event("submitted")["ids"])
    assert len(ids) == 1000
    first.wait_for(lambda line: line.get("ev") == "succeeded" and line["n"] >= 300, timeout=60)
    first.sigkill()
    confirmed = {line["id"] for line in first.of("succeeded")}

    # what the file holds right after the kill, with nobody writing it
    assert integrity(db) == "ok"
    before = table(db)
    assert set(before) == ids
    at_kill = by_status(before)
    done, in_flight, queued = at_kill.get("succeeded", set()), at_kill.get("running", set()), at_kill.get("pending", set())
    assert done | in_flight | queued == ids, f"unexpected statuses at the kill: { {k: len(v) for k, v in at_kill.items()} }"
    assert confirmed <= done, "a run reported succeeded was not succeeded in the file"
    assert in_flight and queued, "the kill came too late to catch runs in flight and runs queued"
    assert all(before[i]["attempt"] == 1 for i in ids)
    ran_first = executions(log)
    assert {e["run"] for e in ran_first} <= done | in_flight, "a run executed without a committed claim"

    second = spawn(db, "worker-1", "--sleep", "0.05", "--max-concurrency", "16", "run", "--until-drained", "--expect", "1000", log=log)
    assert second.exit() == 0
    assert second.event("drained")["counts"]["succeeded"] == 1000

    assert integrity(db) == "ok"
    after = table(db)
    assert set(after) == ids
    assert {i for i, row in after.items() if row["status"] != "succeeded"} == set()
    # runs finished before the kill are untouched, and ran exactly once
    for i in done:
        for col in ("attempt", "started_at", "finished_at", "owner_incarnation", "lost_count"):
            assert after[i][col] == before[i][col], f"run {i} finished before the kill, yet its {col} changed"
    ran_second = [e for e in executions(log) if e["pid"] == second.proc.pid]
    assert not {e["run"] for e in ran_second} & done, "a run that had finished before the kill ran again"
    per_run = Counter(e["run"] for e in ran_second)
    assert set(per_run) == in_flight | queued and set(per_run.values()) == {1}
    # runs in flight at the kill were recovered (the restart recognised its previous
    # incarnation) and ran again as attempt 2; queued runs ran once, as attempt 1
    recovered = {line["id"]: line for line in second.recovered_at_start()}
    assert set(recovered) == in_flight
    assert {r["action"] for r in recovered.values()} == {"requeued"}
    for e in ran_second:
        assert e["attempt"] == (2 if e["run"] in in_flight else 1), e
    for i in in_flight:
        assert (after[i]["attempt"], after[i]["lost_count"]) == (2, 1), after[i]
    for i in queued:
        assert (after[i]["attempt"], after[i]["lost_count"]) == (1, 0), after[i]
    assert Counter(e["run"] for e in ran_first if e["run"] in done) == Counter(done)


# ---------------------------------------------------------------- 2. a retry waiting at the kill


@pytest.mark.timeout(60)
def test_a_retry_waiting_at_the_kill_fires_after_the_restart_at_its_due_time(tmp_path: Path, spawn: Callable[..., Child]) -> None:
    db, log = tmp_path / "runs.db", tmp_path / "exec.log"
    # the restarted process is ready (imports done) before the kill, so it starts well before the retry is due
    second = spawn(db, "worker-1", "--wait-go", "--backoff", "2", "run", "--until-drained", "--expect", "1", log=log)
    second.event("ready")
    first = spawn(db, "worker-1", "--backoff", "2", "run", "--submit", "flaky", "--count", "1", log=log)
    [run_id] = first.event("submitted")["ids"]
    retrying = first.event("retrying")
    assert (retrying["id"], retrying["attempt"]) == (run_id, 2)
    first.sigkill()
    killed_at = time.time()

    row = table(db)[run_id]
    assert (row["status"], row["attempt"], row["lost_count"]) == ("pending", 2, 0)
    due = row["run_after"]
    assert killed_at < due, "the retry was already due at the kill: the test proves nothing"

    second.go()
    restarted_at = second.event("started")["t"]
    assert restarted_at < due, "the restart came after the due time: 'not at once' is not exercised"
    assert second.exit() == 0

    row = table(db)[run_id]
    assert (row["status"], row["attempt"], row["lost_count"]) == ("succeeded", 2, 0)
    assert row["started_at"] >= due, f"attempt 2 started {due - row['started_at']:.3f} s before it was due"
    assert row["started_at"] < due + 2.0, f"attempt 2 started {row['started_at'] - due:.3f} s after it was due"
    ran = [(e["attempt"], e["pid"]) for e in executions(log)]
    assert ran == [(1, first.proc.pid), (2, second.proc.pid)]
    assert integrity(db) == "ok"


# ---------------------------------------------------------------- 3. a kill during a submit_many burst


@pytest.mark.timeout(60)
def test_every_id_submit_many_returned_before_a_kill_is_stored(tmp_path: Path, spawn: Callable[..., Child]) -> None:
    db = tmp_path / "runs.db"
    batch = 100
    child = spawn(db, "burster", "--max-concurrency", "4", "burst", "--batch", str(batch))
    batches = Counter[str]()

    def twentieth_batch(line: Line) -> bool:
        batches[line["ev"]] += 1
        return batches["batch"] >= 20

    child.wait_for(twentieth_batch)
    child.sigkill()
    returned = [i for line in child.of("batch") for i in line["ids"]]
    assert len(returned) == len(set(returned)) >= 20 * batch

    assert integrity(db) == "ok"
    rows = table(db)
    missing = set(returned) - set(rows)
    assert not missing, f"{len(missing)} run(s) submit_many returned are not in the file"
    # one submit_many is one transaction: the file never holds part of a batch
    assert len(rows) % batch == 0
    assert total(db, "inserted") == len(rows)


# ---------------------------------------------------------------- 4. two processes, one file


@pytest.mark.timeout(120)
@pytest.mark.parametrize("count", [TWO_PROCESS_RUNS])
def test_two_processes_execute_each_run_exactly_once(tmp_path: Path, spawn: Callable[..., Child], count: int) -> None:
    db = tmp_path / "shared.db"
    logs = {"node-a": tmp_path / "a.log", "node-b": tmp_path / "b.log"}
    # nobody is killed here, so the lease only has to outlast stalls: with lease_ttl=1 a process
    # kept off SQLite's write lock by the other for over a second (measured: up to 1.5 s) cannot
    # commit its heartbeats, is taken for dead (owner_silent), and ~20 of its runs run twice
    common = ["--lease-ttl", "10", "--quiet", "--max-concurrency", "16"]
    drain = ["--until-drained", "--expect", str(count)]
    b = spawn(db, "node-b", *common, "run", *drain, log=logs["node-b"])
    b.event("started", timeout=60)  # on a loaded machine a slow start could miss every run
    a = spawn(db, "node-a", *common, "run", "--submit", "work", "--count", str(count), *drain, log=logs["node-a"])
    ids = set(a.event("submitted", timeout=60)["ids"])
    assert len(ids) == count
    assert a.exit(90) == 0 and b.exit(90) == 0

    ran = {node: executions(path) for node, path in logs.items()}
    per_run = Counter(e["run"] for lines in ran.values() for e in lines)
    twice = [i for i, n in per_run.items() if n > 1]
    assert not twice, f"{len(twice)} run(s) executed more than once, e.g. {twice[:3]}"
    assert set(per_run) == ids
    assert ran["node-a"] and ran["node-b"], "one process did all the work: sharing was not exercised"

    assert integrity(db) == "ok"
    rows = table(db)
    assert set(rows) == ids
    assert {(r["status"], r["attempt"]) for r in rows.values()} == {("succeeded", 1)}
    for node, lines in ran.items():
        assert {rows[e["run"]]["owner_node"] for e in lines} == {node}


# ---------------------------------------------------------------- 5. a graceful stop keeps pending runs


def _engine_options(db: Path) -> dict[str, Any]:
    return dict(
        store=f"sqlite:///{db}", node_id="worker-1", max_concurrency=8, lease_ttl=1.0, poll_interval=0.05, health_interval=None
    )


async def _run_them_all(db: Path, ids: set[str]) -> list[tuple[str | None, int]]:
    """A new engine on the file, whose ``block`` task now returns at once, runs every run in ``ids``."""
    engine = Engine(**_engine_options(db))
    ran: list[tuple[str | None, int]] = []

    @engine.task(name="block")
    async def block_no_more(ctx: TaskContext) -> None:
        ran.append((ctx.run_id, ctx.attempt))

    await engine.start()
    try:
        records = await asyncio.wait_for(asyncio.gather(*(engine.wait_for(i) for i in ids)), 20)
    finally:
        await engine.stop()
    assert {r.status.value for r in records} == {"succeeded"}
    return ran


@pytest.mark.timeout(60)
async def test_a_graceful_stop_leaves_pending_and_cut_short_runs_for_the_next_start(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    first = Engine(**_engine_options(db))
    started: list[tuple[str | None, int]] = []
    all_busy = asyncio.Event()

    @first.task(name="block")
    async def block_forever(ctx: TaskContext) -> None:
        started.append((ctx.run_id, ctx.attempt))
        if len(started) == 8:
            all_busy.set()
        await asyncio.Event().wait()

    await first.start()
    try:
        ids = {h.id for h in await first.submit_many([("block", None)] * 50)}
        await asyncio.wait_for(all_busy.wait(), 10)
    finally:
        await first.stop(timeout=0)
    cut = {run_id for run_id, _ in started}
    assert len(cut) == len(started) == 8
    expected = {i: 2 if i in cut else 1 for i in ids}

    rows = table(db)
    assert {i: (r["status"], r["attempt"]) for i, r in rows.items()} == {i: ("pending", n) for i, n in expected.items()}

    ran = await _run_them_all(db, ids)
    assert sorted(ran) == sorted(expected.items())
    rows = table(db)
    assert {i: (r["status"], r["attempt"], r["lost_count"]) for i, r in rows.items()} == {
        i: ("succeeded", n, 0) for i, n in expected.items()
    }
    assert integrity(db) == "ok"


@pytest.mark.timeout(60)
async def test_graceful_stops_right_after_submitting_hand_every_run_back(tmp_path: Path) -> None:
    """A program that submits and at once shuts down, again and again: each stop comes while
    the executor is claiming. A run whose task started is re-queued (attempt + 1); any other
    run, claimed or not, stays pending as it was -- never cancelled, never left running for
    the next start to recover as lost."""
    db = tmp_path / "runs.db"
    starts: Counter[str] = Counter()  # how often each run's task really began
    ids: set[str] = set()
    for round_ in range(ROUNDS):
        engine = Engine(**_engine_options(db))

        @engine.task(name="block")
        async def block_forever(ctx: TaskContext) -> None:
            assert ctx.run_id is not None
            starts[ctx.run_id] += 1
            await asyncio.Event().wait()

        await engine.start()
        try:
            ids |= {h.id for h in await engine.submit_many([("block", None)] * 8)}
        finally:
            await engine.stop(timeout=0)
        rows = table(db)
        assert set(rows) == ids
        wrong = {
            i: (r["status"], r["attempt"], r["lost_count"], r["cancel_reason"])
            for i, r in rows.items()
            if (r["status"], r["attempt"], r["lost_count"]) != ("pending", 1 + starts[i], 0)
        }
        assert not wrong, (
            f"after graceful stop {round_ + 1}, {len(wrong)} run(s) are not pending with attempt 1 + times started "
            f"and no loss: {Counter(v[:1] + v[3:] for v in wrong.values())}"
        )

    ran = await _run_them_all(db, ids)
    assert sorted(ran) == sorted((i, 1 + starts[i]) for i in ids)
    rows = table(db)
    assert {i: (r["status"], r["attempt"], r["lost_count"]) for i, r in rows.items()} == {
        i: ("succeeded", 1 + starts[i], 0) for i in ids
    }
    assert integrity(db) == "ok"


# ---------------------------------------------------------------- 6. a task that kills its own worker


@pytest.mark.timeout(90)
def test_a_run_that_kills_its_worker_is_failed_as_worker_lost_after_three_losses(tmp_path: Path, spawn: Callable[..., Child]) -> None:
    db, log = tmp_path / "runs.db", tmp_path / "exec.log"
    first = spawn(db, "worker-1", "run", "--submit", "suicide", "--count", "1", log=log)
    [run_id] = first.event("submitted")["ids"]
    assert first.exit() == -signal.SIGKILL
    for loss in (1, 2):
        # each restart recovers the run (attempt + 1), runs it, and dies again
        restart = spawn(db, "worker-1", "run", "--until-drained", "--expect", "1", log=log)
        assert restart.exit() == -signal.SIGKILL
        [recovered] = restart.recovered_at_start()
        assert (recovered["id"], recovered["action"], recovered["attempt"]) == (run_id, "requeued", loss + 1)
    last = spawn(db, "worker-1", "run", "--until-drained", "--expect", "1", log=log)
    assert last.exit() == 0
    [recovered] = last.recovered_at_start()
    assert (recovered["id"], recovered["action"]) == (run_id, "failed")

    row = table(db)[run_id]
    assert (row["status"], row["attempt"], row["lost_count"]) == ("failed", 3, 3)
    assert json.loads(row["error"])["type"] == "WorkerLost"
    assert [e["attempt"] for e in executions(log)] == [1, 2, 3]
    assert integrity(db) == "ok"


@pytest.mark.timeout(60)
def test_a_run_declared_on_lost_fail_is_failed_at_the_first_restart(tmp_path: Path, spawn: Callable[..., Child]) -> None:
    db, log = tmp_path / "runs.db", tmp_path / "exec.log"
    first = spawn(db, "worker-1", "run", "--submit", "suicide_fail", "--count", "1", log=log)
    [run_id] = first.event("submitted")["ids"]
    assert first.exit() == -signal.SIGKILL
    restart = spawn(db, "worker-1", "run", "--until-drained", "--expect", "1", log=log)
    assert restart.exit() == 0
    [recovered] = restart.recovered_at_start()
    assert (recovered["id"], recovered["action"]) == (run_id, "failed")

    row = table(db)[run_id]
    assert (row["status"], row["attempt"], row["lost_count"]) == ("failed", 1, 1)
    assert json.loads(row["error"])["type"] == "WorkerLost"
    assert [e["attempt"] for e in executions(log)] == [1]
    assert integrity(db) == "ok"


def _open_when_released(path: str, barrier: Any, results: Any) -> None:
    """A forked child: open a SqliteStore on ``path`` the moment every sibling is ready."""

    async def go() -> str:
        store = SqliteStore(path, busy_timeout=5_000)
        barrier.wait()
        try:
            await store.open()
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            return f"{type(exc).__name__}: {exc}"
        await store.close()
        return "ok"

    results.put(asyncio.run(go()))


def test_processes_opening_a_new_file_together_all_open_it(tmp_path: Path) -> None:
    # switching a new file to WAL meets the other openers' locks, and SQLite answers that at
    # once instead of calling the busy handler: before the store waited for it itself, about
    # one trial in six had an opener fail with StoreBusy although nobody held a long transaction
    ctx = multiprocessing.get_context("fork")
    failures: list[str] = []
    for trial in range(15):
        path = str(tmp_path / f"new-{trial}.db")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_open_when_released, args=(path, barrier, results)) for _ in range(6)]
        for proc in procs:
            proc.start()
        outcomes = [results.get(timeout=30) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
            assert proc.exitcode == 0
        failures += [o for o in outcomes if o != "ok"]
    assert failures == []


def test_run_ids_sort_in_the_order_they_are_made() -> None:
    # so a store's index of ids grows at its end rather than at a random page per insert
    ids = [new_run_id() for _ in range(10_000)]
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)


def _seeded_run_id(results: Any) -> None:
    """A forked child that seeds ``random`` as an application might, then makes a run id."""
    random.seed(7)
    results.put(new_run_id())


def test_run_ids_differ_across_processes_whatever_the_application_seeds() -> None:
    # processes sharing a store must never make the same id: not forked children of one
    # parent (they inherit its generator's state), nor processes seeding ``random`` alike
    random.seed(7)
    first = new_run_id()
    random.seed(7)
    assert new_run_id() != first
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    procs = [ctx.Process(target=_seeded_run_id, args=(results,)) for _ in range(4)]
    for proc in procs:
        proc.start()
    ids = {results.get(timeout=30) for _ in procs}
    for proc in procs:
        proc.join(timeout=30)
    assert len(ids | {new_run_id()}) == 5


# ---------------------------------------------------------------- 7. a program that ends with no stop()


#: the end of a child's main(), once it has queued its work: as argv[2] says
_ENDS_AS_TOLD = r"""
    if how == "raise":
        raise RuntimeError("the program fails after queueing")
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        await asyncio.Event().wait()  # until Ctrl-C

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


#: the program: an engine on the file; on a line from stdin (the test holds the file's write
#: lock from then on) it accepts runs with submit_nowait, then ends as argv[2] says
_ENDS_WITHOUT_STOP = ("""
import asyncio, atexit, json, sys
from taskwatch.engine import Engine, TaskContext

def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\\n")
    sys.stdout.flush()

async def main(db, how):
    # busy_timeout: the writes wait for the test's lock however long a loaded machine takes
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=120000", node_id="n", poll_interval=60, health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    await engine.start()
    # the store's writer takes operations in order: once a read queued after the claim loop's
    # first claim is answered, that claim is over, and the loop idles (poll_interval is long);
    # two reads, as the loop may not have queued its claim before the first
    for _ in range(2):
        await engine.query_runs(limit=1)
    # atexit runs the hook registered last first: this one, once the event loop is gone and
    # before the store's own, so the test frees the file while the process is exiting
    atexit.register(emit, ev="exiting")
    emit(ev="started")
    await asyncio.to_thread(sys.stdin.readline)
    first = engine.submit_nowait("job")
    # a few turns of the loop: the claim loop, woken by that submit, is now waiting on the
    # store writing it (no claim of its own is due, poll_interval is long), so the runs
    # below wait in the engine's own batch; the teardown cancels the loop in that wait
    for _ in range(20):
        await asyncio.sleep(0)
    ids = [first.id] + [engine.submit_nowait("job").id for _ in range(5)]
    emit(ev="queued", ids=ids)
"""
    + _ENDS_AS_TOLD
)


def _end_holding_the_file(
    script: str, db: Path, how: str, code: int, held_until: str = "exiting", interrupt_after: str | None = None
) -> Line:
    """Run ``script`` on ``db`` until it says it queued its work, end it ``how`` (its own end,
    or SIGINT for "interrupt...", once it has said ``interrupt_after``: by default at once)
    and check its exit ``code``; the "queued" line.

    Another process's long write holds the file from the child's "go" until the child says
    ``held_until`` (by default that it is exiting): nothing the program hands its store can
    be committed before then.
    """
    child = JsonLineProcess([sys.executable, "-c", script, str(db), how], f"ends by {how}", START_TIMEOUT)
    try:
        child.event("started")
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            child.send("go")
            queued = child.event("queued")
            if how.startswith("interrupt"):
                if interrupt_after is not None:
                    child.event(interrupt_after)
                os.kill(child.proc.pid, signal.SIGINT)
            child.event(held_until)
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        child.event("exiting")
        assert child.proc.wait(EXIT_TIMEOUT) == code
    finally:
        child.close()
    return queued


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("how", "code"), [("return", 0), ("raise", 1), ("exit", 3), ("interrupt", -signal.SIGINT)])
def test_runs_submit_nowait_accepted_are_kept_by_a_program_that_ends_without_stop(
    tmp_path: Path, how: str, code: int
) -> None:
    db = tmp_path / "runs.db"
    ids = _end_holding_the_file(_ENDS_WITHOUT_STOP, db, how, code)["ids"]
    assert integrity(db) == "ok"
    rows = table(db)
    assert sorted(rows) == sorted(ids), f"{len(set(ids) - set(rows))} of the {len(ids)} accepted runs are not in the file"
    # the teardown started none of them and claimed none: the next start runs each as attempt 1
    assert {(r["status"], r["attempt"], r["lost_count"]) for r in rows.values()} == {("pending", 1, 0)}
    assert total(db, "inserted") == len(ids)


_ENDS_AT_ONCE = r"""
import asyncio, sys
from taskwatch.engine import Engine, TaskContext

engine = Engine(store=f"sqlite:///{sys.argv[1]}", node_id="n", health_interval=None)

@engine.task
async def job(ctx: TaskContext) -> None: ...

async def main(how):
    await engine.start()
    # in the step the start returned in: the engine's claim loop has not taken its first step
    ids = [engine.submit_nowait("job").id for _ in range(100)]
    print(" ".join(ids), flush=True)
    if how == "exit":
        sys.exit(3)
    raise KeyboardInterrupt

asyncio.run(main(sys.argv[2]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("how", "code"), [("exit", 3), ("interrupt", -signal.SIGINT)])
def test_runs_submit_nowait_accepted_right_after_the_start_are_kept_by_a_program_that_exits_at_once(
    tmp_path: Path, how: str, code: int
) -> None:
    # a SystemExit (or KeyboardInterrupt) leaves the loop in the middle of its turn: the claim
    # loop, whose end handed the runs to the store, never began, and all 100 were lost unsaid
    db = tmp_path / "runs.db"
    ids = run_to_its_end(_ENDS_AT_ONCE, str(db), how, code=code).split()
    assert len(ids) == 100
    rows = table(db)
    assert sorted(rows) == sorted(ids), f"{len(set(ids) - set(rows))} of the {len(ids)} accepted runs are not in the file"
    assert {(r["status"], r["attempt"]) for r in rows.values()} == {("pending", 1)}


#: the same for a queue's jobs put with put_nowait, one of them being handled
_PUTS_WITHOUT_STOP = (r"""
import asyncio, atexit, json, sys
from taskwatch.engine import Engine

def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

async def main(db, how):
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=120000", node_id="n", health_interval=None)
    handling = asyncio.Event()

    async def handle(job: dict) -> None:
        handling.set()
        await asyncio.Event().wait()  # cut short by the teardown: undone, it is kept

    jobs = engine.queue("mail", handle, concurrency=1)
    await engine.start()
    if how == "interrupt-stop":
        # nothing handled: the stop comes to its own write of the jobs at once, not after a drain
        engine.pause_queue("mail")
        handling.set()
    atexit.register(emit, ev="exiting")
    emit(ev="started")
    await asyncio.to_thread(sys.stdin.readline)
    for i in range(3):
        jobs.put_nowait({"n": i})
    await handling.wait()
    # a few turns of the loop: the queue's write of the first three is under way, held up by
    # the test's lock, when the next three are put
    for _ in range(20):
        await asyncio.sleep(0)
    for i in range(3, 6):
        jobs.put_nowait({"n": i})
    if how == "interrupt-stop":
        stopping = asyncio.ensure_future(engine.stop(timeout=30))  # held up by the test's lock
        # (not a wait for anything: half a second gives the stop time to come to its own write
        # of the jobs, which is where Ctrl-C is to cut it; anywhere else, they are kept all the same)
        await asyncio.sleep(0.5)
        emit(ev="queued")
        try:
            await stopping
        except asyncio.CancelledError:
            emit(ev="cut")  # the teardown cancels the stop's own task next
            raise
    emit(ev="queued")
"""
    + _ENDS_AS_TOLD
)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("how", "code"),
    [("return", 0), ("raise", 1), ("exit", 3), ("interrupt", -signal.SIGINT), ("interrupt-stop", -signal.SIGINT)],
)
async def test_queue_jobs_put_nowait_accepted_are_kept_by_a_program_that_ends_without_stop(
    tmp_path: Path, how: str, code: int
) -> None:
    db = tmp_path / "runs.db"
    # a stop cut short closes its store, which waits for the writer: the file is let go once
    # the stop was cut
    _end_holding_the_file(_PUTS_WITHOUT_STOP, db, how, code, held_until="cut" if how == "interrupt-stop" else "exiting")
    assert integrity(db) == "ok"
    stored = stored_jobs(db)
    assert stored == list(range(6)), "each accepted job is in the file once"

    # and the next start handles every one of them, the one the teardown cut short too
    handled: list[int] = []
    all_handled = asyncio.Event()

    async def handle(job: dict[str, int]) -> None:
        handled.append(job["n"])
        if len(handled) == 6:
            all_handled.set()

    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)
    engine.queue("mail", handle, concurrency=1)
    async with engine:
        await asyncio.wait_for(all_handled.wait(), 30)
    assert sorted(handled) == list(range(6))


#: for a child program: an engine on the SQLite file ``db`` (``options`` its URL's query),
#: started, and its queue "mail", paused, so the jobs put wait there
_PAUSED_QUEUE = r"""
from taskwatch.engine import Engine

async def paused_queue(db, options="", maxsize=1000):
    engine = Engine(store=f"sqlite:///{db}{options}", node_id="n", health_interval=None)

    async def handle(job: dict) -> None: ...

    jobs = engine.queue("mail", handle, maxsize=maxsize)
    await engine.start()
    engine.pause_queue("mail")
    return engine, jobs
"""


_MANY_PUTS_THEN_RETURN = _PAUSED_QUEUE + r"""
import asyncio, sys
from taskwatch.engine import Engine

async def main(db, turns):
    engine, jobs = await paused_queue(db, maxsize=5_000)  # the jobs wait: each is in the file or nowhere
    for i in range(2_000):
        jobs.put_nowait({"n": i})
    for _ in range(turns):  # the keeper's write is handed to the store's writer, or under way there
        await asyncio.sleep(0)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("turns", [1, 5, 50, 500])
def test_queue_jobs_a_teardown_cuts_off_while_they_are_written_are_kept_once(tmp_path: Path, turns: int) -> None:
    # the teardown comes at some point of the keeper's write: before the writer took it, while it
    # writes, after its commit and before the loop heard; written again, every job would run twice
    db = tmp_path / "runs.db"
    run_to_its_end(_MANY_PUTS_THEN_RETURN, str(db), str(turns))
    stored = stored_jobs(db)
    assert stored == list(range(2_000)), f"{len(stored)} rows for 2,000 jobs, {len(set(stored))} of them"


_PUTS_FROM_THREADS_THROUGH_THE_TEARDOWN = _PAUSED_QUEUE + r"""
import asyncio, json, sys, threading, time
from taskwatch.engine import Engine, EngineNotRunning

last_turn_over = threading.Event()
put_done = threading.Event()
paced, late = [], []

class Loop(asyncio.SelectorEventLoop):
    def close(self):
        if not self.is_closed():
            # the teardown has run the loop for the last time: a handover queued to it now
            # would never run (closing it drops it); the late thread puts right here
            last_turn_over.set()
            put_done.wait(30)
        super().close()

def produce_paced(jobs, ten_in):
    for i in range(60):
        jobs.put_nowait({"n": i})
        paced.append(i)
        if i == 9:
            ten_in()
        time.sleep(0.005)  # the program's own pace: the rest come while its loop tears down

def produce_late(jobs):
    last_turn_over.wait(30)
    for i in range(100, 110):
        jobs.put_nowait({"n": i})
        late.append(i)
    put_done.set()

async def main(db):
    engine, jobs = await paused_queue(db)
    loop = asyncio.get_running_loop()
    ten = asyncio.Event()
    loop.run_in_executor(None, produce_paced, jobs, lambda: loop.call_soon_threadsafe(ten.set))
    threading.Thread(target=produce_late, args=(jobs,)).start()
    await ten.wait()
    return jobs  # no stop: the teardown waits for the executor's thread, puts and all

with asyncio.Runner(loop_factory=Loop) as runner:
    jobs = runner.run(main(sys.argv[1]))
try:
    jobs.put_nowait({"n": 200})
except EngineNotRunning:
    late.append("refused once the loop is closed")
print(json.dumps([paced, late]))
"""


@pytest.mark.timeout(120)
def test_queue_jobs_other_threads_put_while_the_loop_tears_down_are_kept(tmp_path: Path) -> None:
    # those put after the loop's last turn too: their handover to the loop would never run,
    # and they were accepted and lost unsaid
    db = tmp_path / "runs.db"
    paced, late = json.loads(run_to_its_end(_PUTS_FROM_THREADS_THROUGH_THE_TEARDOWN, str(db)))
    assert paced == list(range(60))
    assert late == [*range(100, 110), "refused once the loop is closed"]
    assert stored_jobs(db) == paced + late[:-1]


_PUTS_TO_A_QUEUE_NOT_STARTED = r"""
import asyncio, json, sqlite3, sys
from taskwatch.engine import Engine

async def main(db, how):
    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)
    await engine.start()

    async def handle(job: dict) -> None: ...

    first = 0
    if how == "failed":
        # another process changes the file under the engine: the queue's start cannot read its jobs
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("ALTER TABLE queue_jobs RENAME TO queue_jobs_away")
    jobs = engine.queue("mail", handle)  # made while the engine runs: its start reads the store first
    if how == "failed":
        await jobs.put({"n": 0})  # returns once the start failed: the job waits here for one that works
        other.execute("ALTER TABLE queue_jobs_away RENAME TO queue_jobs")
        first = 1
    for i in range(first, 5):
        jobs.put_nowait({"n": i})
    print(json.dumps(jobs.info().depth), flush=True)
    # main() returns, no stop: the teardown cuts the queue's start short, or comes before the
    # engine tries the failed one again

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["starting", "failed"])
def test_queue_jobs_put_before_a_late_start_went_through_are_kept_by_a_teardown(tmp_path: Path, how: str) -> None:
    db = tmp_path / "runs.db"
    assert json.loads(run_to_its_end(_PUTS_TO_A_QUEUE_NOT_STARTED, str(db), how)) == 5
    assert stored_jobs(db) == [0, 1, 2, 3, 4]


_PUT_IN_A_CLEANUP = r"""
import asyncio, json, sqlite3, sys
from taskwatch.engine import Engine

async def main(url, turns, how, locked):
    engine = Engine(store=url, node_id="n", health_interval=None)
    handling = asyncio.Event()

    async def handle(job: dict) -> None:
        handling.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # the loop's teardown cancels the handler: its cleanup queues a follow-up job
            for _ in range(turns):
                await asyncio.sleep(0)
            try:
                if how == "put":
                    await jobs.put({"n": 100})
                else:
                    jobs.put_nowait({"n": 100})
                print(json.dumps(["returned", jobs.info().lost]), flush=True)
            except Exception as exc:
                print(json.dumps([f"raised {type(exc).__name__}", str(exc), jobs.info().lost]), flush=True)
            raise

    jobs = engine.queue("mail", handle)
    await engine.start()
    await jobs.put({"n": 0})
    await handling.wait()
    if locked:
        # another process (a backup, the sqlite3 shell) holds the file past busy_timeout
        main.lock = sqlite3.connect(url.removeprefix("sqlite:///").split("?")[0], timeout=0, isolation_level=None)
        main.lock.execute("BEGIN IMMEDIATE")
    # main() returns, no stop

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4:] == ["locked"]))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["put", "put_nowait"])
@pytest.mark.parametrize("turns", [0, 1, 2, 5])
def test_a_put_while_the_loop_tears_down_returns_once_its_job_is_kept(tmp_path: Path, turns: int, how: str) -> None:
    # it neither waits for ever (the teardown would never end) nor raises for a job that is kept
    db = tmp_path / "runs.db"
    said, *_ = json.loads(run_to_its_end(_PUT_IN_A_CLEANUP, f"sqlite:///{db}", str(turns), how))
    assert said == "returned"
    assert stored_jobs(db) == [0, 100]


@pytest.mark.timeout(120)
def test_a_put_while_the_loop_tears_down_raises_when_the_store_cannot_write_its_job(tmp_path: Path) -> None:
    # before: it waited for ever, at full CPU, and the program never ended
    db = tmp_path / "runs.db"
    said, detail, lost = json.loads(
        run_to_its_end(_PUT_IN_A_CLEANUP, f"sqlite:///{db}?busy_timeout=200", "5", "put", "locked")
    )
    assert said == "raised StoreBusy", detail
    assert lost == 0  # the put says it: the job was not queued
    assert stored_jobs(db) == [0]


@pytest.mark.timeout(120)
def test_a_put_nowait_as_the_loop_tears_down_is_refused_when_the_store_cannot_keep_it(postgres_url: str) -> None:
    # PostgreSQL writes on the loop, which is going: a few turns into the teardown, once the
    # queue's keeper has ended, the job would be accepted and lost (logged, counted); refused,
    # the handler learns it at once
    said, detail, _ = json.loads(run_to_its_end(_PUT_IN_A_CLEANUP, postgres_url, "5", "put_nowait"))
    assert said == "raised EngineNotRunning", f"accepted, lost: {detail}"
    assert "the program is ending" in detail and "mail" in detail


_TEARDOWN_CUT_AS_IT_BEGINS = _PAUSED_QUEUE + r"""
import asyncio, gc, json, sys
from taskwatch.engine import Engine

class Loop(asyncio.SelectorEventLoop):
    turns = 0

    def run_until_complete(self, future):
        Loop.turns += 1
        if Loop.turns == 2:
            # the teardown's first run of the loop: a second Ctrl-C as it begins, so nothing of
            # it runs, the hand-overs of what the engine accepted included
            raise KeyboardInterrupt
        return super().run_until_complete(future)

async def main(db, earlier):
    if earlier != "-":
        # another engine, on another durable store, started (and stopped) first in the process
        async with Engine(store=earlier, node_id="other", health_interval=None):
            pass
    engine, jobs = await paused_queue(db)
    for i in range(5):
        jobs.put_nowait({"n": i})
    # main() returns, no stop

try:
    with asyncio.Runner(loop_factory=Loop) as runner:
        runner.run(main(sys.argv[1], sys.argv[2]))
except KeyboardInterrupt:
    pass  # as a program does that says "Bye" on Ctrl-C
gc.collect()  # nothing holds the engine any more but reference cycles
"""


@pytest.mark.timeout(120)
def test_queue_jobs_are_kept_when_a_second_ctrl_c_cuts_the_loops_teardown_short(tmp_path: Path) -> None:
    # before: the teardown's hand-over never ran, and the jobs were lost unsaid
    db = tmp_path / "runs.db"
    run_to_its_end(_TEARDOWN_CUT_AS_IT_BEGINS, str(db), "-")
    assert stored_jobs(db) == [0, 1, 2, 3, 4]


@pytest.mark.timeout(120)
def test_queue_jobs_a_cut_teardown_left_are_kept_when_an_engine_on_postgresql_started_first(
    tmp_path: Path, postgres_url: str
) -> None:
    # the exit hands them over before the SQLite store writes out, whatever started first: an
    # earlier engine on PostgreSQL put the two the other way round, and the jobs were lost
    db = tmp_path / "runs.db"
    run_to_its_end(_TEARDOWN_CUT_AS_IT_BEGINS, str(db), postgres_url)
    assert stored_jobs(db) == [0, 1, 2, 3, 4]


_A_MULTIPROCESSING_CHILD_RETURNS = r"""
import asyncio, multiprocessing, sys
from taskwatch.engine import Engine, TaskContext

def child(db, how):
    engine = Engine(store=f"sqlite:///{db}", node_id="child", health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    async def handle(job: dict) -> None: ...

    jobs = engine.queue("mail", handle)

    def accept():
        engine.pause_queue("mail")
        for i in range(7):
            jobs.put_nowait({"n": i})
        for _ in range(3):
            engine.submit_nowait("job")

    async def main():
        await engine.start()
        accept()
        # main() returns, no stop

    if how == "background":
        bg = engine.start_background()
        bg.pause_queue("mail")
        for i in range(7):
            jobs.put_nowait({"n": i})
        for _ in range(3):
            bg.submit("job")
        # the child returns, no bg.stop(): the exit stops it
    else:
        asyncio.run(main())

if __name__ == "__main__":
    process = multiprocessing.get_context(sys.argv[2]).Process(target=child, args=(sys.argv[1], sys.argv[3]))
    process.start()
    process.join()
    sys.exit(process.exitcode)
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("context", "how"), [("fork", "asyncio.run"), ("forkserver", "asyncio.run"), ("fork", "background"), ("spawn", "background")]
)
def test_a_multiprocessing_child_that_ends_without_stop_keeps_what_it_accepted(
    tmp_path: Path, context: str, how: str
) -> None:
    # such a child ends with os._exit, which runs no atexit hook: the store's writer died with
    # every job and run it was handed, unsaid; and it runs its finalizers before its threads'
    # exit (a BackgroundEngine's stop): written out then, the store was closed under that stop
    program = tmp_path / "program.py"
    program.write_text(_A_MULTIPROCESSING_CHILD_RETURNS)
    db = tmp_path / "runs.db"
    done = subprocess.run(
        [sys.executable, str(program), str(db), context, how], capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert (done.returncode, done.stderr) == (0, "")
    assert stored_jobs(db) == list(range(7))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 3


_SUBMITS_THEN_RETURNS = r"""
import asyncio, sys
from taskwatch.engine import Engine, TaskContext

async def main(url):
    engine = Engine(store=url, node_id="n", health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    await engine.start()
    for _ in range(100):
        engine.submit_nowait("job")
    # main() returns, no stop: the runs' insert, on the loop, is cut short

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(120)
def test_runs_postgresql_could_not_write_as_the_program_ended_are_said_lost(postgres_url: str) -> None:
    # PostgreSQL writes on the loop, which is going (as the README says); before, the runs of
    # an insert the teardown cut short were lost without a word
    done = subprocess.run(
        [sys.executable, "-c", _SUBMITS_THEN_RETURNS, postgres_url], capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    stored = asyncio.run(_count_runs(postgres_url))
    lost = sum(int(n) for n in re.findall(r"(\d+) run\(s\) accepted as the program ended could not be handed", done.stderr))
    # an insert the teardown cut while PostgreSQL committed it: said to be maybe written
    maybe = sum(int(n) for n in re.findall(r"the insert of (\d+) run\(s\) accepted as the program ended", done.stderr))
    assert stored + lost <= 100 <= stored + lost + maybe, done.stderr


async def _count_runs(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM runs"))
    finally:
        await conn.close()


_START_FAILS = r"""
import asyncio, sqlite3, sys
from taskwatch.engine import Engine, StoreError

async def main(db):
    async with Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None):
        pass  # the file is made
    # another process changes the file: the start below cannot register its engine
    sqlite3.connect(db, isolation_level=None).execute("ALTER TABLE nodes RENAME TO nodes_away")
    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)

    async def handle(job: dict) -> None: ...

    jobs = engine.queue("mail", handle)
    for i in range(3):
        jobs.put_nowait({"n": i})
    try:
        await engine.start()
    except StoreError:
        pass

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(120)
def test_an_engine_whose_start_failed_says_nothing_at_the_exit(tmp_path: Path) -> None:
    # before: the exit's hand-over took it for one running, and said its jobs were lost
    done = subprocess.run(
        [sys.executable, "-c", _START_FAILS, str(tmp_path / "runs.db")], capture_output=True, text=True, timeout=EXIT_TIMEOUT
    )
    assert (done.returncode, done.stderr) == (0, "")


_EXIT_WAITS_FOR_THE_FILE = _PAUSED_QUEUE + r"""
import asyncio, atexit, json, logging, sys
from taskwatch.engine import Engine

def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()

class Say(logging.Handler):
    def emit(self, record):
        emit(ev=record.levelname.lower(), msg=record.getMessage())

logging.getLogger("taskwatch.store.sqlite").addHandler(Say())
logging.getLogger("taskwatch.store.sqlite").setLevel(logging.INFO)

async def main(db):
    # busy_timeout: the writes wait for the test's lock however long a loaded machine takes
    engine, jobs = await paused_queue(db, "?busy_timeout=120000")
    emit(ev="started")
    await asyncio.to_thread(sys.stdin.readline)  # the test holds the file from now on
    for i in range(1_000):
        jobs.put_nowait({"n": i})
    atexit.register(emit, ev="exiting")
    emit(ev="queued")
    # main() returns, no stop: the exit waits for the store's writer, which waits for the file

asyncio.run(main(sys.argv[1]))
"""


@pytest.mark.timeout(120)
def test_a_ctrl_c_while_the_exit_waits_for_the_file_is_said_and_loses_nothing(tmp_path: Path) -> None:
    # before: it ended the wait, and the writer (a daemon thread) died with the transaction
    # holding every job, unsaid but for "Exception ignored in atexit callback". Ctrl-C once the
    # exit has said why it waits; the file is held until the Ctrl-C is said
    db = tmp_path / "runs.db"
    _end_holding_the_file(_EXIT_WAITS_FOR_THE_FILE, db, "interrupt-exit", 0, held_until="warning", interrupt_after="info")
    assert stored_jobs(db) == list(range(1_000))


_PURGE_CUT_SHORT = _PAUSED_QUEUE + r"""
import asyncio, sys
from taskwatch.engine import Engine

async def main(db, turns):
    engine, jobs = await paused_queue(db)
    for i in range(5):
        await jobs.put({"n": i})  # in the file
    for i in range(5, 10):
        jobs.put_nowait({"n": i})  # not yet
    purging = asyncio.ensure_future(jobs.purge())
    for _ in range(turns):
        await asyncio.sleep(0)
    # main() returns, no stop: the teardown cuts the purge short

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.timeout(120)
@pytest.mark.parametrize("turns", [1, 3, 50])
def test_a_purge_the_teardown_cuts_short_stands_and_brings_back_no_job(tmp_path: Path, turns: int) -> None:
    db = tmp_path / "runs.db"
    run_to_its_end(_PURGE_CUT_SHORT, str(db), str(turns))
    assert stored_jobs(db) == []
