"""The SQLite store beyond the shared contract: a killed writer loses nothing it confirmed,
two processes on one file claim each run once, schema versions, threads, group commit."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine.errors import NotATaskwatchStore, QueueFull, StoreUnavailable
from taskwatch.engine.runs import RunStatus
from taskwatch.engine.store import NewRun, SchemaInUse, SchemaTooNew, SqliteStore, StoreClosed, Succeeded, make_store
from taskwatch.engine.store.queries import SCHEMA_VERSION

INSERTER = r"""
import asyncio, json, sys
from taskwatch.engine.store import NewRun, SqliteStore

async def main(path):
    async with SqliteStore(path) as store:
        batch = 0
        while True:
            out = await store.insert([NewRun("a", {"batch": batch, "i": i}) for i in range(50)])
            # printed only after the insert's transaction committed
            print(json.dumps([r.id for r in out]), flush=True)
            batch += 1

asyncio.run(main(sys.argv[1]))
"""

WORKER = r"""
import asyncio, json, sys
from taskwatch.engine.store import NewRun, SqliteStore, Succeeded

async def main(path, name):
    async with SqliteStore(path, busy_timeout=30000) as store:
        print("ready", flush=True)
        sys.stdin.readline()
        claimed, stale = [], 0
        while True:
            claims = await store.claim(name, name + "-inc", 16, {"a": None})
            if not claims:
                if (await store.counts()).pending == 0:
                    break
                continue
            for c in claims:
                claimed.append(c.run_id)
                if await store.finish(c.token, Succeeded({"by": name})) is None:
                    stale += 1
        print(json.dumps({"claimed": claimed, "stale": stale}), flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2]))
"""


def _spawn(script: str, *args: str, stdin: bool = False) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script, *args],
        stdout=subprocess.PIPE,
        stdin=subprocess.PIPE if stdin else None,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )


async def _pragma(store: SqliteStore, name: str) -> Any:
    return await store._call(lambda tx: tx.cur.execute(f"PRAGMA {name}").fetchone()[0], write=False)


def _store_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("taskwatch-sqlite")]


# ---------------------------------------------------------------- durability


@pytest.mark.timeout(60)
async def test_runs_confirmed_before_a_sigkill_survive_it(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    proc = _spawn(INSERTER, str(path))
    assert proc.stdout is not None
    confirmed: list[str] = []
    try:
        # wait for real progress by reading it, then kill mid-stream
        for _ in range(20):
            line = await asyncio.to_thread(proc.stdout.readline)
            assert line, "the inserter exited early"
            confirmed += json.loads(line)
        proc.send_signal(signal.SIGKILL)
        rest = await asyncio.to_thread(proc.stdout.read)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    for line in rest.splitlines():
        try:
            confirmed += json.loads(line)
        except json.JSONDecodeError:
            pass  # a line cut by the kill was never fully confirmed
    assert len(confirmed) >= 1000
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    async with SqliteStore(path) as store:
        missing = [i for i in confirmed if await store.get(i) is None]
        assert missing == []
        counts = await store.counts()
        assert counts.pending >= len(confirmed)


# ---------------------------------------------------------------- two processes


@pytest.mark.timeout(120)
async def test_two_processes_claim_every_run_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SqliteStore(path) as store:
        ids = {r.id for r in await store.insert([NewRun("a", {"i": i}) for i in range(2000)])}
    workers = [_spawn(WORKER, str(path), name, stdin=True) for name in ("w1", "w2")]
    try:
        for w in workers:
            assert w.stdout is not None
            assert (await asyncio.to_thread(w.stdout.readline)).strip() == "ready"
        for w in workers:  # both start together, so their claims interleave
            assert w.stdin is not None
            w.stdin.write("go\n")
            w.stdin.flush()
        reports = [json.loads(await asyncio.to_thread(w.stdout.read)) for w in workers]  # type: ignore[union-attr]
    finally:
        for w in workers:
            w.kill()
            w.wait()
    c1, c2 = (set(r["claimed"]) for r in reports)
    assert [r["stale"] for r in reports] == [0, 0]
    assert len(c1) == len(reports[0]["claimed"]) and len(c2) == len(reports[1]["claimed"])
    assert c1.isdisjoint(c2)
    assert c1 | c2 == ids
    assert c1 and c2, "one worker did all the work: the test did not exercise sharing"
    async with SqliteStore(path) as store:
        counts = await store.counts()
        assert counts.by_status["succeeded"] == 2000 and counts.succeeded_total == 2000
        for run_id in list(ids)[:200]:
            row = await store.get(run_id)
            assert row is not None and row.result == {"by": "w1" if run_id in c1 else "w2"}


# ---------------------------------------------------------------- schema, threads, settings


async def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SqliteStore(path) as store:
        await store.insert([NewRun("a")])
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, 'from the future', 0)",
            (SCHEMA_VERSION + 1,),
        )
    before = set(_store_threads())
    with pytest.raises(SchemaTooNew, match=r"install the newer taskwatch that wrote it \(from its source: `pip install /path/to/taskwatch`") as info:
        await SqliteStore(path).open()
    assert (info.value.found, info.value.supported) == (SCHEMA_VERSION + 1, SCHEMA_VERSION)
    assert set(_store_threads()) == before


async def test_a_file_of_an_older_schema_is_migrated_and_keeps_its_runs(tmp_path: Path) -> None:
    from taskwatch.engine.store import queries as Q

    path = tmp_path / "runs.db"
    with sqlite3.connect(path) as conn:  # a file as the first schema version left it
        conn.execute(Q.CREATE_MIGRATIONS)
        _, name, statements = Q.MIGRATIONS[0]
        for sql in statements:
            conn.execute(sql)
        conn.execute(Q.RECORD_MIGRATION, {"version": 1, "name": name, "now": 0.0})
        conn.execute("INSERT INTO runs (id, task, params, status, created_at, run_after) VALUES ('r1', 'a', '{}', 'pending', 1.0, 0.0)")
    async with SqliteStore(path) as store:
        assert (await store.get("r1")) is not None
        [job] = await store.put_jobs("q", "i1", [{"x": 1}])  # a table of the newer version
        assert job > 0
    with sqlite3.connect(path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        indexes = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert "runs_status" not in indexes and {"runs_pending", "runs_running", "runs_finished"} <= indexes


async def test_a_file_an_earlier_taskwatch_still_runs_on_is_not_migrated_under_it(tmp_path: Path) -> None:
    # migrated under a live node of the earlier version, that node's writes failed from then on and
    # what it counted (trigger counts) was lost; nothing said so
    from taskwatch.engine.store import queries as Q

    path = tmp_path / "runs.db"
    older = SCHEMA_VERSION - 1
    with sqlite3.connect(path) as conn:  # a file the previous version made, two of its nodes on it
        conn.execute(Q.CREATE_MIGRATIONS)
        for version, name, statements in Q.MIGRATIONS[:older]:
            for sql in statements:
                conn.execute(sql)
            conn.execute(Q.RECORD_MIGRATION, {"version": version, "name": name, "now": 0.0})
        now = time.time()
        for seq, (node, beat, stopped) in enumerate([("web-1", now - 1.0, None), ("web-2", now - 2.0, now - 1.0)], 1):
            conn.execute(
                "INSERT INTO nodes (incarnation, node, version, started_at, last_heartbeat, running, stopped_at, "
                "registered_seq) VALUES (?, ?, '0.1.0', ?, ?, 0, ?, ?)",
                (f"i{seq}", node, now - 60, beat, stopped, seq),
            )
    def dump() -> list[str]:
        with contextlib.closing(sqlite3.connect(path)) as conn:
            return list(conn.iterdump())

    before = dump()
    with pytest.raises(SchemaInUse, match=r"node\(s\) web-1 of an earlier taskwatch still run on it") as refused:
        await SqliteStore(path, node_ttl=30).open()
    assert (refused.value.found, refused.value.supported, refused.value.nodes) == (older, SCHEMA_VERSION, ["web-1"])
    assert "Nothing was changed" in str(refused.value)
    assert dump() == before
    # stopped, or silent for node_ttl (crashed): the file is migrated
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE nodes SET stopped_at = ? WHERE node = 'web-1'", (time.time(),))
    async with SqliteStore(path, node_ttl=30):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION


async def test_a_version_2_file_gains_node_load_and_events_and_keeps_its_data(tmp_path: Path) -> None:
    from taskwatch.engine.store import queries as Q

    path = tmp_path / "runs.db"
    with sqlite3.connect(path) as conn:  # a file as taskwatch left it before CPU and RSS were kept
        conn.execute(Q.CREATE_MIGRATIONS)
        for version, name, statements in Q.MIGRATIONS[:2]:
            for sql in statements:
                conn.execute(sql)
            conn.execute(Q.RECORD_MIGRATION, {"version": version, "name": name, "now": 0.0})
        conn.execute("INSERT INTO runs (id, task, params, status, created_at, run_after) VALUES ('r1', 'a', '{\"n\": 1}', 'pending', 1.0, 0.0)")
        conn.execute("INSERT INTO nodes (incarnation, node, version, started_at, last_heartbeat, running, registered_seq) "
                     "VALUES ('i0', 'old', '0.9', 1.0, 2.0, 3, 1)")
        conn.execute("INSERT INTO queue_jobs (queue, job, incarnation, created_at) VALUES ('q', '[1]', 'i0', 1.0)")
    async with SqliteStore(path) as store:
        run = await store.get("r1")
        assert run is not None and run.params == {"n": 1} and run.status is RunStatus.PENDING
        [old] = await store.nodes()
        assert (old.node, old.version, old.running, old.cpu_percent, old.rss_bytes) == ("old", "0.9", 3, None, None)
        await store.register_node("new", "i1", "1.0")
        await store.node_heartbeat("i1", running=1, cpu_percent=40.0, rss_bytes=5 << 20)
        new = [n for n in await store.nodes() if n.node == "new"][0]
        assert (new.cpu_percent, new.rss_bytes) == (40.0, 5 << 20)
        assert [job.job for job in await store.adopt_jobs("q", "i1")] == [[1]]
    with sqlite3.connect(path) as conn:
        versions = [v for (v,) in conn.execute("SELECT version FROM schema_migrations ORDER BY version")]
        assert conn.execute("SELECT COUNT(*) FROM events").fetchone() == (0,)
    assert versions == list(range(1, SCHEMA_VERSION + 1))


async def test_close_joins_the_thread_and_later_calls_are_refused(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    store = SqliteStore(tmp_path / "runs.db")
    await store.open()
    assert len(_store_threads()) == 1
    await asyncio.gather(*(store.insert([NewRun("a")]) for _ in range(50)))
    await store.close()
    await store.close()  # idempotent
    assert set(threading.enumerate()) == before
    with pytest.raises(StoreClosed):
        await store.insert([NewRun("a")])
    async with store:  # reopenable
        assert (await store.counts()).pending == 50
    assert set(threading.enumerate()) == before


async def test_wal_and_synchronous_settings(tmp_path: Path) -> None:
    async with make_store(f"sqlite:///{tmp_path}/a.db") as store:
        assert isinstance(store, SqliteStore)
        assert await _pragma(store, "journal_mode") == "wal"
        assert await _pragma(store, "synchronous") == 1  # NORMAL
    async with make_store(f"sqlite:///{tmp_path}/b.db?synchronous=full") as store:
        assert isinstance(store, SqliteStore)
        assert await _pragma(store, "synchronous") == 2  # FULL


async def test_group_commit_isolates_a_failing_operation(tmp_path: Path) -> None:
    """Concurrent inserts share transactions; the ones refused by max_pending change nothing."""
    async with SqliteStore(tmp_path / "runs.db") as store:
        results = await asyncio.gather(
            *(store.insert([NewRun("a", {"i": i})], max_pending=60) for i in range(100)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, QueueFull)]
        accepted = [r for r in results if isinstance(r, list)]
        assert len(refused) == 40 and len(accepted) == 60
        counts = await store.counts()
        assert counts.pending == 60 and counts.inserted_total == 60
        # every caller resumed only after its transaction committed: a fresh connection sees them all
        with sqlite3.connect(store.path) as conn:
            assert conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 60


async def test_concurrent_claims_and_finishes_in_one_process(tmp_path: Path) -> None:
    async with SqliteStore(tmp_path / "runs.db") as store:
        await store.insert([NewRun("a") for _ in range(300)])

        async def worker(n: int) -> list[str]:
            got = []
            while claims := await store.claim("n", f"i{n}", 7, {"a": None}):
                for c in claims:
                    assert await store.finish(c.token, Succeeded()) is not None
                    got.append(c.run_id)
            return got

        lists = await asyncio.gather(*(worker(n) for n in range(8)))
        flat = [i for lst in lists for i in lst]
        assert len(flat) == len(set(flat)) == 300


async def test_three_slashes_are_relative_four_absolute_and_both_are_named_by_their_full_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    relative = make_store("sqlite:///data/runs.db")
    absolute = make_store(f"sqlite:///{tmp_path}/elsewhere/runs.db")  # tmp_path starts with '/': four slashes
    for store, where in [(relative, tmp_path / "data" / "runs.db"), (absolute, tmp_path / "elsewhere" / "runs.db")]:
        assert isinstance(store, SqliteStore)
        # the dashboard header shows this: where the file is, not how the URL spelled it
        assert store.describe() == f"sqlite:{where}"
        async with store:
            await store.insert([NewRun("a", {})])
        assert where.is_file()


# ---------------------------------------------------------------- files and folders it must refuse


def _listing(root: Path) -> dict[str, bytes | None]:
    """Every path under root, with a file's bytes: what a refused open must leave as it was."""
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() and not p.is_symlink() else None
        for p in sorted(root.rglob("*"))
    }


@pytest.mark.parametrize("below", ["data/runs.db", "data/sub/runs.db", "link/runs.db"])
async def test_a_file_where_a_folder_should_be_is_refused_naming_it_and_nothing_is_created(
    tmp_path: Path, below: str
) -> None:
    (tmp_path / "data").write_text("a file, not a folder\n")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    before, threads = _listing(tmp_path), set(_store_threads())
    store = make_store(f"sqlite:///{tmp_path}/{below}")
    with pytest.raises(StoreUnavailable) as info:
        await store.open()
    message = str(info.value)
    assert repr(str(tmp_path / below)) in message  # the file, by its full path
    if below.startswith("link"):
        assert f"{str(tmp_path / 'link')!r} is a link to {str(tmp_path / 'nowhere')!r}, which is not a folder" in message
    else:
        assert f"{str(tmp_path / 'data')!r} is a file, not a folder" in message
        assert "Move or rename that file" in message
    assert _listing(tmp_path) == before
    assert set(_store_threads()) == threads


def test_a_folder_this_user_may_not_write_in_is_refused_naming_it(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    opener = (
        "import asyncio, sys\n"
        "from taskwatch.engine.store import make_store\n"
        "try:\n"
        "    asyncio.run(make_store(sys.argv[1]).open())\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    command = [sys.executable, "-c", opener, f"sqlite:///{locked}/sub/runs.db"]
    if os.geteuid() == 0:
        # root writes anywhere while it holds these capabilities: the opener runs without them
        caps = "-dac_override,-dac_read_search,-fowner"
        command = ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *command]
    try:
        said = subprocess.run(command, capture_output=True, text=True, timeout=60).stdout
        assert said.startswith("StoreUnavailable "), said
        assert f"cannot create its folder {str(locked / 'sub')!r}: this user may not write in {str(locked)!r}" in said
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize(
    "schema",
    [
        # another application that happens to keep its own runs
        ["CREATE TABLE runs (id INTEGER PRIMARY KEY, foo TEXT)", "CREATE TABLE users (name TEXT)"],
        # Rails keeps a schema_migrations table too, with other columns
        ["CREATE TABLE schema_migrations (version TEXT PRIMARY KEY)", "CREATE TABLE users (name TEXT)"],
    ],
)
async def test_another_applications_file_is_refused_naming_its_tables_and_left_as_it_was(
    tmp_path: Path, schema: list[str]
) -> None:
    path = tmp_path / "app.db"
    conn = sqlite3.connect(path)
    for sql in schema:
        conn.execute(sql)
    conn.execute("INSERT INTO users VALUES ('ada')")
    conn.commit()
    conn.close()
    before, threads = _listing(tmp_path), set(_store_threads())
    with pytest.raises(NotATaskwatchStore) as info:
        await SqliteStore(path).open()
    tables = sorted(sql.split()[2] for sql in schema)
    assert info.value.tables == tables
    assert f"{str(path)!r} is not a taskwatch database: it has tables taskwatch did not create ({', '.join(tables)})" in str(info.value)
    assert "a file of its own" in str(info.value)
    # byte for byte, journal mode included, and no -wal or -shm file beside it
    assert _listing(tmp_path) == before
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    assert set(_store_threads()) == threads


async def test_a_taskwatch_file_with_a_table_of_the_users_own_still_opens(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with SqliteStore(path) as store:
        await store.insert([NewRun("a")])
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE notes (body TEXT)")
    async with SqliteStore(path) as store:
        assert (await store.counts()).pending == 1


async def test_a_failure_at_open_says_to_start_again_and_a_later_one_that_no_restart_is_needed(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database, " * 512)
    with pytest.raises(StoreUnavailable, match="file is not a database.*point the store at another path") as info:
        await SqliteStore(garbage).open()
    assert "start the engine again" not in str(info.value)  # it would fail alike

    async with SqliteStore(tmp_path / "runs.db") as store:
        await store.insert([NewRun("a")])
        # a full disk, as SQLite sees it: the file may not grow past the pages it has
        pages = await _pragma(store, "page_count")
        await _pragma(store, f"max_page_count={pages}")
        with pytest.raises(StoreUnavailable, match="full") as info:
            await store.insert([NewRun("a", {"blob": "x" * 200_000})])
        assert "restart" not in str(info.value).replace("no restart is needed", "")
        assert "no restart is needed once it is fixed" in str(info.value)
        await _pragma(store, f"max_page_count={1 << 30}")  # space freed: the same open store carries on
        await store.insert([NewRun("a", {"blob": "x" * 200_000})])
        assert (await store.counts()).pending == 2
