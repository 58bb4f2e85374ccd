"""The SQLite store at its edges: a process that changes directory, a restart's history, a
start cancelled while another process holds the file, URLs and files that are no store, a
claim and a heartbeat that waited for the file's lock while their process was paused."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, EngineNotRunning, TaskContext
from taskwatch.engine.errors import InvalidConfiguration, NotATaskwatchStore, StoreBusy, StoreUnavailable
from taskwatch.engine.store import NewRun, SqliteStore

from .helpers import eventually, wait_until
from .processes import JsonLineProcess


def _store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("taskwatch-sqlite")]


def _listing(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(root.rglob("*"))
    }


# ---------------------------------------------------------------- a relative path and chdir


@pytest.mark.parametrize("relative", ["runs.db", "data/runs.db"])
async def test_a_relative_path_means_the_directory_the_engine_was_built_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, relative: str
) -> None:
    built, moved = tmp_path / "built", tmp_path / "moved"
    built.mkdir()
    moved.mkdir()
    monkeypatch.chdir(built)
    engine = Engine(store=f"sqlite:///{relative}", node_id="cd")

    @engine.task
    async def work(ctx: TaskContext) -> int:
        return 1

    monkeypatch.chdir(moved)  # a daemon library's chdir("/"), between construction and start
    async with engine:
        run = await (await engine.submit("work")).wait(timeout=10)
        assert run.status.value == "succeeded"
        assert engine.store.describe() == f"sqlite:{built / relative}"
    assert (built / relative).is_file()
    assert list(moved.iterdir()) == []
    with sqlite3.connect(built / relative) as conn:
        assert conn.execute("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'").fetchone() == (1,)


# ---------------------------------------------------------------- history after a restart


async def test_finished_history_is_in_the_index_after_a_restart_beside_every_unfinished_run(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    history = 5

    first = Engine(store=url, node_id="h", history=history, max_concurrency=4)

    @first.task
    async def work(ctx: TaskContext) -> int:
        return 1

    @first.task
    async def later(ctx: TaskContext) -> int:
        await asyncio.Event().wait()  # until the stop cuts it short
        return 1

    async with first:
        done = [await first.submit("work") for _ in range(8)]
        for handle in done:
            await handle.wait(timeout=10)
        waiting = [(await first.submit("later")).id for _ in range(12)]  # 4 running, 8 pending
        await first.stop(timeout=0.1)  # the running ones go back to pending

    second = Engine(store=url, node_id="h", history=history)  # `later` is no longer registered

    @second.task
    async def work(ctx: TaskContext) -> int:  # noqa: F811
        return 1

    async with second:
        view = second.runs(limit=1000)
        finished = [r.id for r in view if r.status.finished]
        assert sorted(finished) == sorted(h.id for h in done[-history:])
        assert sorted(r.id for r in view if not r.status.finished) == sorted(waiting)
        assert second.get(done[-1].id) is not None


# ---------------------------------------------------------------- a cancelled start


@pytest.fixture
def thread_errors(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """What reaches threading.excepthook: a thread that died of an uncaught exception."""
    seen: list[Any] = []
    monkeypatch.setattr(threading, "excepthook", seen.append)
    yield seen


async def test_a_start_cancelled_while_another_process_holds_the_file_stops_at_once(
    tmp_path: Path, thread_errors: list[Any]
) -> None:
    path = tmp_path / "runs.db"
    async with SqliteStore(path):
        pass  # a taskwatch file already
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another process's write, holding the lock
    before = set(_store_threads())
    engine = Engine(store=f"sqlite:///{path}", node_id="c")  # busy_timeout: 5 s

    @engine.task
    async def work(ctx: TaskContext) -> int:
        return 1

    began = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(engine.start(), 0.3)
    assert time.monotonic() - began < 2.0, "the cancelled start waited out busy_timeout"
    assert set(_store_threads()) == before
    assert engine.state == "new"
    holder.execute("COMMIT")
    holder.close()
    async with engine:  # nothing left behind stands in the way of the next start
        run = await (await engine.submit("work")).wait(timeout=10)
        assert run.status.value == "succeeded"
    assert set(_store_threads()) == before
    assert thread_errors == []


async def test_a_start_that_outlasts_busy_timeout_still_says_the_file_is_busy(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SqliteStore(path):
        pass
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(Exception, match="busy") as info:
            await SqliteStore(path, busy_timeout=200).open()
        assert "busy_timeout" in str(info.value)
    finally:
        holder.execute("COMMIT")
        holder.close()
    assert _store_threads() == []


# ---------------------------------------------------------------- URLs that name no file


def test_sqlites_in_memory_database_is_refused_pointing_at_the_memory_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidConfiguration, match='store="memory"') as info:
        Engine(store="sqlite:///:memory:", node_id="m")
    assert "keeps nothing" in str(info.value)
    with pytest.raises(InvalidConfiguration, match='store="memory"'):
        SqliteStore(":memory:")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- files that are no store


async def test_another_tools_ledger_shaped_like_taskwatchs_is_refused_before_anything_changes(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
    conn.execute("INSERT INTO schema_migrations VALUES (1, 'init', 0)")
    conn.execute("CREATE TABLE users (name TEXT)")
    conn.commit()
    conn.close()
    before, threads = _listing(tmp_path), set(_store_threads())
    with pytest.raises(NotATaskwatchStore) as info:
        await SqliteStore(path).open()
    assert info.value.tables == ["schema_migrations", "users"]
    assert _listing(tmp_path) == before  # journal mode included: no -wal or -shm beside it
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert set(_store_threads()) == threads


async def test_an_empty_ledger_beside_other_tables_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT, applied_at REAL)")
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(NotATaskwatchStore):
        await SqliteStore(path).open()


async def test_a_taskwatch_file_of_every_schema_version_still_opens(tmp_path: Path) -> None:
    from taskwatch.engine.store import queries as Q

    for upto in range(1, len(Q.MIGRATIONS) + 1):
        path = tmp_path / f"v{upto}.db"
        with sqlite3.connect(path) as conn:
            conn.execute(Q.CREATE_MIGRATIONS)
            for version, name, statements in Q.MIGRATIONS[:upto]:
                for sql in statements:
                    conn.execute(sql)
                conn.execute(Q.RECORD_MIGRATION, {"version": version, "name": name, "now": 0.0})
            conn.execute("CREATE TABLE notes (body TEXT)")  # the user's own, beside taskwatch's
        async with SqliteStore(path) as store:
            await store.insert([NewRun("a")])
            assert (await store.counts()).pending == 1


async def test_a_folder_at_the_path_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "runs.db").mkdir()
    with pytest.raises(StoreUnavailable, match="is a folder, not a file"):
        await SqliteStore(tmp_path / "runs.db").open()


_OPENER = (  # opens the store and writes, as an engine's start does
    "import asyncio, sys\n"
    "from taskwatch.engine.store import NewRun, make_store\n"
    "async def main():\n"
    "    async with make_store(sys.argv[1]) as store:\n"
    "        await store.insert([NewRun('a')])\n"
    "try:\n"
    "    asyncio.run(main())\n"
    "    print('written')\n"
    "except Exception as exc:\n"
    "    print(type(exc).__name__, exc)\n"
)


def _open_without_root_powers(url: str) -> str:
    command = [sys.executable, "-c", _OPENER, url]
    if os.geteuid() == 0:
        # root writes anywhere while it holds these capabilities: the opener runs without them
        caps = "-dac_override,-dac_read_search,-fowner"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60).stdout


@pytest.mark.parametrize("what", ["folder", "file"])
async def test_a_read_only_file_or_folder_is_named_as_the_cause(tmp_path: Path, what: str) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    path = folder / "runs.db"
    async with SqliteStore(path) as store:
        await store.insert([NewRun("a")])
    locked = folder if what == "folder" else path
    locked.chmod(0o500 if what == "folder" else 0o400)
    try:
        said = _open_without_root_powers(f"sqlite:///{path}")
    finally:
        locked.chmod(0o700 if what == "folder" else 0o600)
    assert said.startswith("StoreUnavailable "), said
    if what == "folder":
        assert f"its folder {str(folder)!r} is read-only for this user" in said
    else:
        assert "the file is read-only for this user" in said
    assert "write access" in said


# ---------------------------------------------------------------- a pause while waiting for the lock


#: a store in its own process: three pending runs and node A's registration; on each line from
#: stdin (the test holds the file's write lock from then on) it queues one operation, says so,
#: and prints what the operation returned once it has
_PAUSED_WRITES = """
import asyncio, json, sys, time
from taskwatch.engine.store import NewRun, SqliteStore

def emit(**fields):
    sys.stdout.write(json.dumps(fields) + "\\n")
    sys.stdout.flush()

async def queued(operation):
    pending = asyncio.ensure_future(operation)
    await asyncio.sleep(0)  # one turn of the loop: the operation is in the writer's queue
    emit(ev="queued")
    return await pending

async def main(db, ttl):
    async with SqliteStore(db, lease_ttl=ttl, busy_timeout=120000) as store:
        await store.insert([NewRun("job") for _ in range(3)])
        await store.register_node("A", "a1", "test")
        emit(ev="ready")
        await asyncio.to_thread(sys.stdin.readline)
        claims = await queued(store.claim("A", "a1", 3, {"job": None}))
        emit(ev="claimed", ids=[c.run_id for c in claims])
        await store.node_heartbeat("a1", 0)
        sent = time.time()
        claims = await store.claim("A", "a1", 3, {"job": None})
        emit(ev="claimed", ids=[c.run_id for c in claims], sent=sent, leases=[c.lease_until for c in claims])
        await asyncio.to_thread(sys.stdin.readline)
        beat = await queued(store.heartbeat("a1", [c.token for c in claims]))
        emit(ev="renewed", lost=beat.lost)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


def _column(db: Path, sql: str) -> list[Any]:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        return [row[0] for row in conn.execute(sql)]


@pytest.mark.timeout(90)
def test_a_claim_or_heartbeat_that_waited_out_a_pause_writes_leases_from_when_it_is_written(tmp_path: Path) -> None:
    """A process paused (SIGSTOP) while its claim waits for another process's write lock is
    written after it resumes. Its leases count from then, not from before the pause (they
    would have run out already, and the node's own recovery would take the runs back), and
    while the node's registration has lapsed it claims nothing: the others may count it gone."""
    db, ttl = tmp_path / "runs.db", 1.0
    child = JsonLineProcess([sys.executable, "-c", _PAUSED_WRITES, str(db), str(ttl)], "store A", 20.0)

    def paused_while_locked(until: Any) -> float:
        """Hold the write lock, let A queue its operation, stop A, free the lock; resume A once
        ``until()`` holds; when A was resumed."""
        lock = sqlite3.connect(db, isolation_level=None)
        lock.execute("BEGIN IMMEDIATE")
        try:
            mark = child.mark()
            child.send("go")
            child.wait_for(lambda line: line["ev"] == "queued", start=mark)
            child.proc.send_signal(signal.SIGSTOP)
            # a signal is delivered a moment after kill() returns: not a write may land before
            _, status = os.waitpid(child.proc.pid, os.WUNTRACED)
            assert os.WIFSTOPPED(status), status
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        try:
            wait_until(until, timeout=30)
        finally:
            resumed = time.time()
            child.proc.send_signal(signal.SIGCONT)
        return resumed

    try:
        child.event("ready")
        last_heartbeat = "SELECT last_heartbeat FROM nodes WHERE incarnation = 'a1'"
        # the pause outlasts A's registration: its queued claim must take nothing
        mark = child.mark()
        paused_while_locked(lambda: time.time() > _column(db, last_heartbeat)[0] + ttl)
        assert child.wait_for(lambda line: line["ev"] == "claimed", start=mark)["ids"] == []
        # a heartbeat went through: it claims again, with leases from the claim's own time
        claimed = child.wait_for(lambda line: line["ev"] == "claimed" and line["ids"], start=mark)
        assert len(claimed["ids"]) == 3
        assert min(claimed["leases"]) >= claimed["sent"] + ttl
        # the pause outlasts those leases: the queued heartbeat renews them from when it is written
        mark = child.mark()
        resumed = paused_while_locked(lambda: time.time() > max(_column(db, "SELECT lease_until FROM runs")))
        assert child.wait_for(lambda line: line["ev"] == "renewed", start=mark)["lost"] == []
        leases = _column(db, "SELECT lease_until FROM runs WHERE status = 'running'")
        assert len(leases) == 3 and min(leases) >= resumed + ttl, [lease - resumed for lease in leases]
        assert child.proc.wait(20) == 0
    finally:
        child.close()


async def test_a_stop_while_another_process_holds_the_file_lock_ends_after_its_drain_and_grace(
    tmp_path: Path,
) -> None:
    # the last writes (the cut run's hand-back, the node's end) wait for the lock no longer
    # than the stop's drain, its cancel grace and a second: recovery does what they leave
    db = tmp_path / "runs.db"
    engine = Engine(
        store=SqliteStore(db, busy_timeout=120_000, lease_ttl=120.0), node_id="n", cancel_grace=0.2,
        health_interval=None,
    )
    started = asyncio.Event()

    @engine.task
    async def long(ctx: TaskContext) -> None:
        started.set()
        await asyncio.Event().wait()

    await engine.start()
    await engine.submit("long")
    await asyncio.wait_for(started.wait(), 10)
    other = sqlite3.connect(db, isolation_level=None, timeout=10)
    other.execute("BEGIN IMMEDIATE")  # another process's write, held for good
    try:
        async with asyncio.timeout(30):  # (it waited for the lock past busy_timeout, per write)
            await engine.stop(0.5)
        assert engine.state == "stopped"
    finally:
        other.execute("ROLLBACK")
        other.close()
    # the run it could not hand back is still the node's in the file: the next start takes it back
    started.clear()
    again = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None, cancel_grace=0.2)
    again.task(long)
    await again.start()
    try:
        await asyncio.wait_for(started.wait(), 10)
        assert again.runs()[0].attempt == 2
    finally:
        await again.stop(0.1)


async def test_a_store_whose_file_was_removed_refuses_writes_instead_of_losing_them(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    engine = Engine(store=f"sqlite:///{folder / 'runs.db'}", node_id="n", health_interval=None)

    @engine.task
    async def work(ctx: TaskContext) -> str:
        return "done"

    async with engine:
        assert (await (await engine.submit("work")).wait(10)).result == "done"
        shutil.rmtree(folder)  # SQLite would go on writing to the unlinked file, never seen again
        with pytest.raises(StoreUnavailable, match="file was removed"):
            await engine.submit("work")


async def test_a_stop_after_the_file_was_removed_under_running_runs_ends(tmp_path: Path) -> None:
    # the runs' outcomes cannot be written any more: their writes were tried again for ever,
    # past the stop's time for last writes, and the stop never returned
    folder = tmp_path / "data"
    engine = Engine(store=f"sqlite:///{folder / 'runs.db'}", node_id="n", health_interval=None, cancel_grace=0.2)
    release = asyncio.Event()
    running = 0

    @engine.task
    async def work(ctx: TaskContext) -> None:
        nonlocal running
        running += 1
        await release.wait()

    await engine.start()
    try:
        await engine.submit_many([("work", None)] * 2)
        await eventually(lambda: running == 2)
        shutil.rmtree(folder)
        release.set()  # their outcomes now go to a file that is gone
        async with asyncio.timeout(30):  # it did not return in ten minutes
            await engine.stop(0.5)
        assert engine.state == "stopped"
    finally:
        release.set()
        if engine.state != "stopped":
            await asyncio.wait_for(engine.stop(0), 30)


async def test_a_run_queued_with_submit_nowait_outlasts_a_lock_held_past_busy_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the run exists nowhere else: it waits to be written, as a queue's put_nowait does, rather
    # than failing StoreBusy while the engine goes on
    db = tmp_path / "runs.db"
    engine = Engine(store=SqliteStore(db, busy_timeout=200), node_id="n", health_interval=None, poll_interval=0.05)

    @engine.task
    async def work(ctx: TaskContext) -> str:
        return "done"

    async with engine:
        other = sqlite3.connect(db, isolation_level=None, timeout=10)
        other.execute("BEGIN IMMEDIATE")  # another process's long write
        try:
            handle = engine.submit_nowait("work")
            await eventually(lambda: "writing runs queued with submit_nowait failed (StoreBusy" in caplog.text)
            assert engine.get(handle.id).status.value == "pending"
        finally:
            other.execute("ROLLBACK")
            other.close()
        record = await handle.wait(timeout=10)
        assert record.status.value == "succeeded" and record.result == "done"


async def test_store_busy_says_how_long_the_file_has_stayed_locked_across_tries(tmp_path: Path) -> None:
    """Each try waits up to busy_timeout, and an operation that arrives while another try waits
    waits out both: StoreBusy says how long the file has stayed locked, not one busy_timeout."""
    db = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=300", health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        return None

    async with engine:
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")  # another process's long write
        try:
            with pytest.raises(StoreBusy) as first:
                await engine.submit("job")
            with pytest.raises(StoreBusy) as second:
                await engine.submit("job")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert second.value.locked_for >= first.value.locked_for + 0.25
        assert second.value.locked_for >= 0.55 and "so far" in str(second.value), str(second.value)
        # the lock gone, the next write goes through
        await (await engine.submit("job")).wait(10)


async def test_a_claim_already_waiting_for_the_lock_ends_at_the_stops_give_up(tmp_path: Path) -> None:
    """SQLite's wait for a lock heeds no interrupt: a claim that began waiting (busy_timeout
    60 s) before a stopping engine's give-up must still end with it, or the stop, settling the
    claim in flight, waits the whole minute."""
    db = tmp_path / "runs.db"
    async with SqliteStore(db, busy_timeout=60_000) as store:
        await store.register_node("n", "i1", "test")
        other = sqlite3.connect(db, isolation_level=None, timeout=10)
        other.execute("BEGIN IMMEDIATE")  # another process's write, held for good
        try:
            claim = asyncio.ensure_future(store.claim("n", "i1", 1, {"job": None}))
            await asyncio.sleep(0)  # one turn of the loop: the claim is the writer's, waiting for the lock
            store.give_up_after(time.monotonic() + 0.3)
            async with asyncio.timeout(10):
                with pytest.raises(StoreUnavailable):
                    await claim
        finally:
            other.execute("ROLLBACK")
            other.close()
        store.give_up_after(None)


# ---------------------------------------------------------------- descriptors after a refusal


#: holds the file's write lock from another process until a line on stdin
_LOCK_HOLDER = """
import json, sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print(json.dumps({"ev": "locked"}), flush=True)
sys.stdin.readline()
conn.execute("ROLLBACK")
conn.close()
print(json.dumps({"ev": "released"}), flush=True)
"""


@contextlib.contextmanager
def _locked_by_another_process(db: Path) -> Iterator[JsonLineProcess]:
    """The file's write lock, held by another process until ``release`` is sent (or the block ends)."""
    holder = JsonLineProcess([sys.executable, "-c", _LOCK_HOLDER, str(db)], "lock holder", 20.0)
    try:
        holder.event("locked")
        yield holder
    finally:
        holder.close()


def _release(holder: JsonLineProcess) -> None:
    holder.send("release")
    holder.event("released")
    assert holder.proc.wait(20) == 0


def _open_here(db: Path) -> list[str]:
    """The names among the file, its -wal and its -shm that this process has a descriptor of."""
    real = os.path.realpath(db)
    ours = {real: db.name, f"{real}-wal": f"{db.name}-wal", f"{real}-shm": f"{db.name}-shm"}
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # (the listing's own descriptor, closed by now)
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target in ours:
                found.append(ours[target])
    return sorted(found)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_a_start_refused_as_busy_leaves_the_file_closed_while_its_error_is_kept(tmp_path: Path) -> None:
    # the refused open's connection stayed open for as long as anything held the error (a lifespan
    # keeping it to report, the engine's futures): one descriptor more for each refused retry
    db = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=300", node_id="b", health_interval=None)
    await engine.start()  # a taskwatch file already, in WAL mode
    await engine.stop()
    assert _open_here(db) == []
    refusals = []
    with _locked_by_another_process(db) as holder:
        for _ in range(2):
            start = asyncio.create_task(engine.start())  # as a web framework's lifespan runs it
            with pytest.raises(StoreBusy) as refused:
                await start
            refusals.append(refused.value)
            gc.collect()
            assert _open_here(db) == [], "the refused start left the file open"
        _release(holder)
    await engine.start()
    await engine.stop()
    assert engine.state == "stopped"
    assert _open_here(db) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd")
async def test_an_operation_refused_as_busy_leaves_nothing_open_after_the_store_closes(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    store = SqliteStore(db, busy_timeout=300)
    await store.open()
    try:
        with _locked_by_another_process(db) as holder:
            with pytest.raises(StoreBusy) as refused:
                await store.insert([NewRun("a")])
            _release(holder)
    finally:
        await store.close()
    gc.collect()
    assert refused.value is not None  # kept, as a caller reporting it would
    assert _open_here(db) == [], "the closed store left the file open"


async def test_a_stop_during_a_start_waiting_for_a_locked_file_gives_the_open_up_at_once(tmp_path: Path) -> None:
    # the stop waited for the start, which waited out busy_timeout for another process's lock:
    # a stop(timeout=1) took as long as that (a minute here), though nothing had started yet
    db = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=60000", node_id="s", health_interval=None)
    await engine.start()  # a taskwatch file already: the next open waits for the lock
    await engine.stop()
    with _locked_by_another_process(db) as holder:
        start = asyncio.create_task(engine.start())
        await eventually(lambda: any(t.name.startswith("taskwatch-sqlite") for t in threading.enumerate()))
        await asyncio.wait_for(engine.stop(timeout=1), 10)  # well inside busy_timeout
        with pytest.raises(EngineNotRunning, match="stop.* while the engine was opening its store"):
            await start
        assert engine.state == "stopped"
        await eventually(lambda: not any(t.name.startswith("taskwatch-sqlite") for t in threading.enumerate()))
        _release(holder)
    await engine.start()  # and it starts again, the lock gone
    assert engine.state == "running"
    await engine.stop()
