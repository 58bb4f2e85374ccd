"""A run store whose file or rows were damaged: a row changed by hand (a database shell writing a
Python repr where JSON belongs) holds up no other run and no start, and a start that fails on a
damaged file says to start again, while a failure once the engine runs still says no restart is
needed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import Engine, QueueJobFailed, RunStatus, TaskContext
from taskwatch.engine.errors import StoreError, StoreUnavailable
from taskwatch.engine.store import NewRun, PostgresStore, SqliteStore, TriggerKeyRecord

from .helpers import eventually

#: a hand fix with a database shell that wrote a Python dict's repr: not JSON
REPR_NOT_JSON = "{'i': 2}"


class Numbered(BaseModel):
    i: int


def numbered_engine(store: str, *, max_concurrency: int = 4) -> Engine:
    engine = Engine(store=store, node_id="damage", health_interval=None, max_concurrency=max_concurrency)

    @engine.task
    async def double(ctx: TaskContext, params: Numbered) -> int:
        return params.i * 2

    return engine


async def stored_runs(path: Path, n: int) -> list[str]:
    """``n`` pending runs of ``double`` in the SQLite file at ``path``, oldest first."""
    async with SqliteStore(path) as store:
        inserted = await store.insert([NewRun("double", {"i": i}) for i in range(n)])
    return [run.id for run in inserted]


def by_hand(path: Path, sql: str, *args: Any) -> None:
    """What a user does with the sqlite3 module (or shell) on the file."""
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        conn.execute(sql, args)


def row(path: Path, run_id: str) -> tuple[Any, ...]:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        found = conn.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert found is not None
    return tuple(found)


def errors_naming(caplog: pytest.LogCaptureFixture, run_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and run_id in r.getMessage()]


async def test_a_run_whose_params_were_changed_by_hand_fails_alone_and_the_engine_starts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "runs.db"
    ids = await stored_runs(db, 5)
    bad = ids[2]
    by_hand(db, "UPDATE runs SET params = ? WHERE id = ?", REPR_NOT_JSON, bad)
    engine = numbered_engine(f"sqlite:///{db}")
    with caplog.at_level(logging.ERROR, logger="taskwatch.store"):
        async with engine:
            done = [await engine.wait_for(run_id, timeout=10) for run_id in ids if run_id != bad]
            failed = await engine.wait_for(bad, timeout=10)
    assert [(run.status, run.result) for run in done] == [(RunStatus.SUCCEEDED, 2 * i) for i in (0, 1, 3, 4)]
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error.type == "UnreadableColumn"
    message = failed.error.message
    assert "column 'params' could not be read (ValueError: key must be a string at line 1 column 2)" in message
    assert repr(str(db)) in message and "submit it again with the params it needs" in message
    # written so: a restart, or another process sharing the file, finds it failed
    status, error = row(db, bad)[4], row(db, bad)[22]
    assert status == "failed" and "column 'params' could not be read" in error
    # told once when the start read it, once when its claim failed it; each says how to look at it
    told = errors_naming(caplog, bad)
    assert len(told) == 2, told
    assert "cannot start" in told[0] and "is failed at its claim" in told[1]
    for line in told:
        assert f"""sqlite3 {db} "SELECT * FROM runs WHERE id = '{bad}'\"""" in line
        assert f"""sqlite3 {db} "DELETE FROM runs WHERE id = '{bad}'\"""" in line


@pytest.mark.parametrize(
    ("params", "why"),
    [
        (REPR_NOT_JSON, "ValueError: key must be a string at line 1 column 2"),
        ("[1]", "it holds an array, not a JSON object"),
    ],
)
async def test_a_pending_run_damaged_while_the_engine_runs_fails_at_its_claim_and_holds_up_no_other(
    tmp_path: Path, params: str, why: str
) -> None:
    db = tmp_path / "runs.db"
    engine = numbered_engine(f"sqlite:///{db}", max_concurrency=1)
    released = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await released.wait()

    async with engine:
        holding = await engine.submit("hold")
        await eventually(lambda: engine.get(holding.id).status is RunStatus.RUNNING)
        damaged = await engine.submit("double", {"i": 1})  # pending: the one slot is taken
        by_hand(db, "UPDATE runs SET params = ? WHERE id = ?", params, damaged.id)
        after = await engine.submit("double", {"i": 5})
        released.set()
        ran = await after.wait(timeout=10)
        failed = await damaged.wait(timeout=10)
    assert (ran.status, ran.result) == (RunStatus.SUCCEEDED, 10)
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error.type == "UnreadableColumn"
    assert f"column 'params' could not be read ({why})" in failed.error.message
    assert row(db, damaged.id)[4] == "failed"


async def test_a_row_that_makes_no_record_is_left_as_it_is_and_left_out(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "runs.db"
    ids = await stored_runs(db, 3)
    bad = ids[0]
    # marked done by hand, with a time that is no time: there is no record to make of it
    by_hand(db, "UPDATE runs SET status = 'succeeded', finished_at = 'yesterday' WHERE id = ?", bad)
    before = row(db, bad)
    engine = numbered_engine(f"sqlite:///{db}")
    with caplog.at_level(logging.ERROR, logger="taskwatch.store"):
        async with engine:
            done = [await engine.wait_for(run_id, timeout=10) for run_id in ids[1:]]
            with pytest.raises(StoreError) as info:
                await engine.fetch_run(bad)
            assert [r.id for r in (await engine.query_runs(limit=10)).runs] == ids[:0:-1]
    assert [run.status for run in done] == [RunStatus.SUCCEEDED] * 2
    assert f"run {bad!r} in the run store {str(db)!r} cannot be read" in str(info.value)
    assert f"""sqlite3 {db} "DELETE FROM runs WHERE id = '{bad}'\"""" in str(info.value)
    assert row(db, bad) == before
    told = errors_naming(caplog, bad)
    assert len(told) == 1, told
    assert "finished_at: Input should be a valid number" in told[0] and "(1 such run(s) so far)" in told[0]
    assert repr(str(db)) in told[0] and f"""sqlite3 {db} "SELECT * FROM runs WHERE id = '{bad}'\"""" in told[0]


async def test_a_store_error_at_start_says_to_start_again_and_one_later_that_no_restart_is_needed(
    tmp_path: Path,
) -> None:
    good, bad = tmp_path / "good.db", tmp_path / "bad.db"
    await stored_runs(good, 300)
    shutil.copy(good, bad)
    with open(bad, "r+b") as f:  # pages 3 to 5 overwritten; page 1 (the header and the schema) kept
        f.seek(4096 * 2)
        f.write(b"\xff" * 4096 * 3)
    engine = numbered_engine(f"sqlite:///{bad}")
    with pytest.raises(StoreUnavailable) as info:
        await engine.start()  # the file opens: registering, recovering or reading the runs fails
    assert "database disk image is malformed" in str(info.value)
    # no start again helps: it says what does
    assert str(info.value).endswith("`sqlite3 FILE .recover` may save what it still holds")
    assert "restore it from a backup, or move it aside (with its -wal and -shm files)" in str(info.value)
    assert engine.state == "new"

    # once started, a failure (a full disk, as SQLite sees it) needs no restart, also one of
    # the very task that started the engine
    engine = numbered_engine(f"sqlite:///{good}")
    async with engine:
        store = engine.store
        assert isinstance(store, SqliteStore)
        pages = await store._call(lambda tx: tx.cur.execute("PRAGMA page_count").fetchone()[0], write=False)
        await store._call(lambda tx: tx.cur.execute(f"PRAGMA max_page_count={pages}").fetchone(), write=False)
        with pytest.raises(StoreUnavailable, match="full") as later:
            await store.insert([NewRun("double", {"blob": "x" * 200_000})])
    assert str(later.value).endswith("later operations try it again, so no restart is needed once it is fixed")


async def test_postgres_a_run_whose_params_were_changed_by_hand_fails_alone(postgres_url: str) -> None:
    import asyncpg

    async with PostgresStore(postgres_url) as store:
        ids = [r.id for r in await store.insert([NewRun("double", {"i": i}) for i in range(3)])]
    bad = ids[1]
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("UPDATE runs SET params = $1 WHERE id = $2", REPR_NOT_JSON, bad)
    finally:
        await conn.close()
    engine = numbered_engine(postgres_url)
    async with engine:
        done = [await engine.wait_for(ids[i], timeout=10) for i in (0, 2)]
        failed = await engine.wait_for(bad, timeout=10)
        stored = await engine.store.get(bad)
    assert [(run.status, run.result) for run in done] == [(RunStatus.SUCCEEDED, 0), (RunStatus.SUCCEEDED, 4)]
    assert failed.status is RunStatus.FAILED
    assert failed.error is not None and failed.error.type == "UnreadableColumn"
    assert "column 'params' could not be read (ValueError: key must be a string" in failed.error.message
    assert stored is not None and stored.status is RunStatus.FAILED
    async with PostgresStore(postgres_url) as store:
        assert (await store.counts()).failed_total == 1


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        ("created_at", "yesterday", "column 'created_at' could not be read (it holds 'yesterday', not a time)"),
        ("attempt", "one", "column 'attempt' could not be read (it holds 'one', not a count)"),
        ("source", b"web", "column 'source' could not be read (it holds b'web', not text)"),
    ],
)
async def test_a_pending_run_whose_other_columns_were_changed_by_hand_is_failed_at_its_claim_not_run(
    tmp_path: Path, column: str, value: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the claim read these columns into the run's record as they were: a record reads leave out
    # ran, and its text time broke every view sorting by time (the dashboard's among them)
    db = tmp_path / "runs.db"
    engine = numbered_engine(f"sqlite:///{db}", max_concurrency=1)
    released = asyncio.Event()
    ran: list[int] = []

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await released.wait()

    @engine.task
    async def note(ctx: TaskContext, params: Numbered) -> None:
        ran.append(params.i)

    with caplog.at_level(logging.ERROR, logger="taskwatch.store"):
        async with engine:
            holding = await engine.submit("hold")
            await eventually(lambda: engine.get(holding.id).status is RunStatus.RUNNING)
            damaged = await engine.submit("note", {"i": 1})  # pending: the one slot is taken
            by_hand(db, f"UPDATE runs SET {column} = ? WHERE id = ?", value, damaged.id)
            after = await engine.submit("note", {"i": 2})
            released.set()
            assert (await after.wait(timeout=10)).status is RunStatus.SUCCEEDED
            await eventually(lambda: row(db, damaged.id)[4] == "failed")
            snapshot = engine.snapshot()
    assert ran == [2]
    assert why in row(db, damaged.id)[22] and "so the run could not start and was failed" in row(db, damaged.id)[22]
    assert all(type(run.created_at) is float for run in snapshot.runs)
    told = errors_naming(caplog, damaged.id)
    assert any("is failed at its claim" in line and why in line for line in told), told


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_queue_job_whose_row_holds_no_json_fails_alone_and_the_queue_handles_the_others(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    # before, the queue's start failed on it, and failed again each time it was tried: no job ran
    url = f"sqlite:///{tmp_path / 'jobs.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")
    store: SqliteStore | PostgresStore = SqliteStore(tmp_path / "jobs.db") if kind == "sqlite" else PostgresStore(url)
    async with store:
        ids = await store.put_jobs("mail", "a-gone-node", [{"i": i} for i in range(3)])
    if kind == "sqlite":
        by_hand(tmp_path / "jobs.db", "UPDATE queue_jobs SET job = ? WHERE id = ?", REPR_NOT_JSON, ids[1])
    else:
        import asyncpg

        conn = await asyncpg.connect(url)
        try:
            await conn.execute("UPDATE queue_jobs SET job = $1 WHERE id = $2", REPR_NOT_JSON, ids[1])
        finally:
            await conn.close()

    handled: list[Any] = []

    async def send(job: Any) -> None:
        handled.append(job)

    engine = Engine(store=url, node_id="damage", health_interval=None)
    queue = engine.queue("mail", send)
    failures = engine.bus.subscribe(kinds=["queue.job_failed"])
    with caplog.at_level(logging.ERROR, logger="taskwatch"):
        async with engine:
            await queue.join(timeout=10)
    assert handled == [{"i": 0}, {"i": 2}]
    assert (queue.info().processed, queue.info().failed) == (2, 1)
    (failed,) = [e for e in failures.get_batch() if isinstance(e, QueueJobFailed)]
    assert failed.queue == "mail" and failed.job == REPR_NOT_JSON  # what the row holds, to put right
    assert failed.error.type == "UnreadableColumn"
    assert "column 'job' could not be read (ValueError: key must be a string at line 1 column 2)" in failed.error.message
    assert "put it again" in failed.error.message
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any(f"queue 'mail': job {ids[1]}" in line and "could not be read" in line for line in told), told
    # dropped: the next start does not fail it again
    async with SqliteStore(tmp_path / "jobs.db") if kind == "sqlite" else PostgresStore(url) as again:
        assert await again.adopt_jobs("mail", "a-later-node") == []


async def _by_hand_pg(url: str, sql: str, *args: Any) -> None:
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


def _ticking(store: str) -> Engine:
    engine = Engine(store=store, node_id="damage", health_interval=None)

    @engine.periodic(every=0.2)
    async def tick(ctx: TaskContext) -> str:
        return "ticked"

    return engine


async def _ticks(engine: Engine) -> None:
    await eventually(lambda: any(r.status is RunStatus.SUCCEEDED for r in engine.runs(task="tick")), timeout=10)


async def test_postgres_times_that_are_no_time_hold_up_no_start_and_no_periodic_task(
    postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # PostgreSQL's double precision takes 'Infinity' and 'NaN' from psql: the periodic task's
    # slot and its last run's end made every start of the engine raise InvalidConfiguration
    # (a next fire at infinity), and the cluster dashboard's tables refused the run
    async with PostgresStore(postgres_url) as store:
        await store.set_periodic("tick", 1_000.0)
        (last,) = await store.insert([NewRun("tick", source="periodic:tick")])
    await _by_hand_pg(postgres_url, "UPDATE periodic SET last_fire = 'Infinity'")
    await _by_hand_pg(
        postgres_url, "UPDATE runs SET status = 'succeeded', started_at = 1000, finished_at = 'Infinity' WHERE id = $1",
        last.id,
    )  # fmt: skip
    engine = _ticking(postgres_url)
    with caplog.at_level(logging.ERROR, logger="taskwatch"):
        async with engine:
            await _ticks(engine)
            with pytest.raises(StoreError, match="finished_at: it holds inf, not a time"):
                await engine.store.get(last.id)
            listed = [r.id for r in (await engine.store.query(task="tick")).runs]
    assert last.id not in listed and listed  # left out; the runs since are there
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("periodic task 'tick'" in line and "holds inf as the time it last fired" in line for line in told), told
    assert any(last.id in line and "makes no record" in line for line in told), told
    async with PostgresStore(postgres_url) as store:
        fired = await store.get_periodic("tick")
    assert fired is not None and fired > 1_000.0  # its fire wrote a time over it


async def test_a_periodic_slot_written_by_hand_as_text_holds_up_no_fire(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "runs.db"
    async with SqliteStore(db) as store:
        await store.set_periodic("tick", 1_000.0)
    by_hand(db, "UPDATE periodic SET last_fire = datetime('now')")  # text: SQLite keeps what it is given
    engine = _ticking(f"sqlite:///{db}")
    with caplog.at_level(logging.ERROR, logger="taskwatch"):
        async with engine:
            await _ticks(engine)
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("periodic task 'tick'" in line and "which is no time" in line for line in told), told


@pytest.mark.parametrize("kind", ["sqlite", "postgres"])
async def test_a_periodic_slot_recorded_ahead_of_the_clock_holds_up_no_fire(
    kind: str, tmp_path: Path, request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> None:
    # a node whose clock ran ten days ahead records its slots there: before, every node read
    # that as the last fire and waited ten days for the next, and no claim could take a slot
    # below it, so the task stopped everywhere without a word
    url = f"sqlite:///{tmp_path / 'runs.db'}" if kind == "sqlite" else request.getfixturevalue("postgres_url")

    async def ahead() -> None:
        async with SqliteStore(tmp_path / "runs.db") if kind == "sqlite" else PostgresStore(url) as store:
            await store.set_periodic("tick", store.clock() + 10 * 86_400)

    def ticked() -> int:
        return sum(r.status is RunStatus.SUCCEEDED for r in engine.runs(task="tick"))

    await ahead()
    engine = _ticking(url)
    with caplog.at_level(logging.ERROR, logger="taskwatch"):
        async with engine:
            await _ticks(engine)  # read at the start
            await ahead()  # written while this node runs: its next claim finds it
            seen = ticked()
            await eventually(lambda: ticked() >= seen + 2, timeout=10)
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("periodic task 'tick'" in line and "more than a day after this node's clock" in line
               for line in told), told  # fmt: skip


async def test_a_nodes_row_changed_by_hand_holds_up_no_start_and_no_recovery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # one unreadable nodes row (a heartbeat written as text) failed every start, and every
    # recovery and adoption on every node sharing the file: a dead node's runs stayed running.
    # Its node is one never registered now: its claim is taken back once its lease is out
    db = tmp_path / "runs.db"
    async with SqliteStore(db, lease_ttl=1.0) as store:
        await store.register_node("crashed", "inc-crashed", "1")
        (run,) = await store.insert([NewRun("double", {"i": 4})])
        (claim,) = await store.claim("crashed", "inc-crashed", 1, {"double": None})
        assert claim.run_id == run.id
    by_hand(db, "UPDATE nodes SET last_heartbeat = datetime('now') WHERE incarnation = 'inc-crashed'")
    engine = numbered_engine(f"sqlite:///{db}")
    with caplog.at_level(logging.ERROR, logger="taskwatch"):
        async with engine:
            done = await engine.wait_for(run.id, timeout=10)  # its claim taken back, and run here
            nodes = await engine.store.nodes()
    assert (done.status, done.result) == (RunStatus.SUCCEEDED, 8)
    assert [n.incarnation for n in nodes] == [engine.incarnation]
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("incarnation inc-crashed" in line and "makes no node" in line and "DELETE FROM nodes" in line
               for line in told), told  # fmt: skip


async def test_a_saved_trigger_key_changed_by_hand_holds_up_no_start_and_no_other_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a count written as text failed the trigger's start, and with it the engine's, every time
    db = tmp_path / "runs.db"

    async def compile_key(ctx: TaskContext, key: str) -> None: ...

    async with SqliteStore(db) as store:
        await store.register_node("gone", "inc-gone", "1")
        await store.save_trigger("compile", "inc-gone", {"a": TriggerKeyRecord(count=3), "b": TriggerKeyRecord(count=4)})
        await store.node_stopped("inc-gone")
    by_hand(db, "UPDATE trigger_keys SET count = 'many' WHERE counter_key = 'b'")
    engine = Engine(store=f"sqlite:///{db}", node_id="damage", health_interval=None)
    compile = engine.trigger("compile", compile_key, size_threshold=100)
    with caplog.at_level(logging.ERROR, logger="taskwatch"):
        async with engine:
            assert {k.key: k.count for k in compile.state().keys} == {"a": 3}
            compile.notify("b")  # counted afresh
            assert {k.key: k.count for k in compile.state().keys} == {"a": 3, "b": 1}
    told = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("trigger 'compile', key 'b'" in line and "makes no key" in line
               and "DELETE FROM trigger_keys WHERE trigger_name = 'compile' AND counter_key = 'b'" in line
               for line in told), told  # fmt: skip


async def test_a_queue_jobs_handover_count_changed_by_hand_holds_up_no_start(tmp_path: Path) -> None:
    db = tmp_path / "jobs.db"
    async with SqliteStore(db) as store:
        await store.put_jobs("mail", "a-gone-node", [{"i": 0}, {"i": 1}])
    by_hand(db, "UPDATE queue_jobs SET handovers = 'many' WHERE job = '{\"i\":0}'")
    handled: list[tuple[Any, int]] = []

    async def send(ctx: TaskContext, job: Any) -> None:
        handled.append((job, ctx.attempt))

    engine = Engine(store=f"sqlite:///{db}", node_id="damage", health_interval=None)
    queue = engine.queue("mail", send)
    async with engine:
        await queue.join(timeout=10)
    # each was handed over once (from a node never registered): its second delivery
    assert handled == [({"i": 0}, 2), ({"i": 1}, 2)]


@pytest.mark.parametrize(("column", "value"), [("lost_count", "once"), ("attempt", "one"), ("lease_until", "soon")])
async def test_a_running_run_changed_by_hand_holds_up_no_recovery(tmp_path: Path, column: str, value: str) -> None:
    # recovery did arithmetic on the row as it found it: the start failed with a TypeError,
    # and so did every recovery on every node sharing the file, for the other runs too
    db = tmp_path / "runs.db"
    async with SqliteStore(db, lease_ttl=1.0) as store:
        damaged, other = await store.insert([NewRun("double", {"i": 1}), NewRun("double", {"i": 2})])
        # by a node with no row (pruned, say): its runs are taken back once their lease is out
        claims = await store.claim("crashed", "inc-crashed", 2, {"double": None})
        assert {c.run_id for c in claims} == {damaged.id, other.id}
    by_hand(db, f"UPDATE runs SET {column} = ? WHERE id = ?", value, damaged.id)
    engine = numbered_engine(f"sqlite:///{db}")
    async with engine:
        ran = await engine.wait_for(other.id, timeout=10)
        again = await engine.wait_for(damaged.id, timeout=10)
    assert (ran.status, ran.result) == (RunStatus.SUCCEEDED, 4)
    assert (again.status, again.result) == (RunStatus.SUCCEEDED, 2)  # taken back and run here


async def test_postgres_a_stopped_nodes_row_whose_start_is_no_time_replaces_no_later_start(postgres_url: str) -> None:
    # 'NaN' sorts above every number in PostgreSQL: the old row looked like a later start of the
    # node id, so every start of it took itself for replaced and claimed nothing, for a day
    async with PostgresStore(postgres_url) as store:
        await store.register_node("damage", "inc-old", "1")
        await store.node_stopped("inc-old")
    await _by_hand_pg(postgres_url, "UPDATE nodes SET started_at = 'NaN' WHERE incarnation = 'inc-old'")
    engine = numbered_engine(postgres_url)
    async with engine:
        done = await (await engine.submit("double", {"i": 21})).wait(timeout=10)
    assert (done.status, done.result) == (RunStatus.SUCCEEDED, 42)


async def test_a_live_nodes_row_changed_by_hand_leaves_it_its_jobs_keys_and_claims(tmp_path: Path) -> None:
    # the node whose row cannot be read may be alive and working: counted gone, another node took
    # its queue jobs and handled them a second time, and took its running claim back at once
    db = tmp_path / "runs.db"
    async with SqliteStore(db, lease_ttl=30.0) as store:
        await store.register_node("alive", "inc-alive", "1")
        await store.register_node("other", "inc-other", "1")
        await store.put_jobs("mail", "inc-alive", [{"i": 0}])
        await store.save_trigger("compile", "inc-alive", {"k": TriggerKeyRecord(count=3)})
        (run,) = await store.insert([NewRun("double", {"i": 1})])
        (claim,) = await store.claim("alive", "inc-alive", 1, {"double": None})
        by_hand(db, "UPDATE nodes SET started_at = datetime('now') WHERE incarnation = 'inc-alive'")
        by_hand(db, "UPDATE runs SET lease_until = 'soon' WHERE id = ?", run.id)
        assert [n.incarnation for n in await store.nodes()] == ["inc-other"]
        assert await store.adopt_jobs("mail", "inc-other") == []
        assert await store.adopt_trigger("compile", "inc-other") == {}
        assert await store.recover() == []  # its lease is no time: its renewal writes over it
        await store.heartbeat("inc-alive", [claim.token])
        stored = await store.get(run.id)
        assert stored is not None and stored.status is RunStatus.RUNNING and stored.lease_until is not None
