"""The SQLite run store: durable runs in one file, shareable by several processes.

All statements run on one dedicated thread with one connection, so the event
loop never waits on the disk. Operations queue up while the thread is busy
and the next transaction takes all of them (group commit): each awaiting
coroutine resumes once the transaction holding its operation has committed.
One operation failing (a full queue, say) rolls back to its own savepoint
and leaves the others in the batch alone. Write batches start with ``BEGIN
IMMEDIATE``, which takes SQLite's single write lock, so two processes
claiming from one file are serialised and never claim the same run.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Literal

from ..errors import (
    DuplicateRunId,
    InvalidConfiguration,
    NotATaskwatchStore,
    QueueFull,
    RunNotFound,
    SchemaInUse,
    SchemaTooNew,
    StoreBusy,
    StoreClosed,
    StoreGaveUp,
    StoreError,
    StoreUnavailable,
)
from ..options import SqliteOptions, check_options
from ..runs import CancelReason, Progress, RunError, RunStatus, run_status
from . import queries as Q
from .base import (
    Clock,
    Store,
    adoptable,
    at_exit,
    counter_from_random_start,
    gone_incarnations,
    merge_taken,
    merge_trigger_records,
    new_run_id,
    trigger_holders_taken,
)
from .models import (
    CancelResult,
    Cancelled,
    Claim,
    Counts,
    Failed,
    HeartbeatResult,
    Inserted,
    NewRun,
    NodeInfo,
    Outcome,
    Page,
    Recovered,
    Retry,
    StoredJob,
    StoredRun,
    TriggerKeyRecord,
    Succeeded,
)
from .memory import parse_cursor
from .rows import counts_of, dumps as _dumps
from .rows import error_json as _error_json
from .rows import failed_at_claim
from .rows import node_info as _node
from .rows import seq_of as _seq_of
from .rows import FIRE_AHEAD, RunRows, book_recovered, recovery_step, sqlite_console, stored_job, trigger_save


log = logging.getLogger("taskwatch.store.sqlite")

_CLAIM_CANDIDATES = Q.for_sqlite(Q.CLAIM_CANDIDATES)
#: whether a later start of this node id replaced the incarnation, and its last heartbeat
#: (NULL: no row, which proves nothing)
_STANDING = (
    "SELECT " + Q.REPLACED_INCARNATION + ", (SELECT last_heartbeat FROM nodes WHERE incarnation = :incarnation)"
)
_RUNNING_CLAIMS = Q.for_sqlite(Q.RUNNING_CLAIMS)
_QUEUE_JOBS = Q.for_sqlite(Q.QUEUE_JOBS)

#: the file's own tables and views (SQLite's internal ``sqlite_*`` ones aside)
_FILE_TABLES = (
    "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') "
    "AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' ORDER BY name"
)
#: the columns of taskwatch's schema_migrations (Rails' and golang-migrate's differ)
_LEDGER_COLUMNS = {"version", "name", "applied_at"}
#: taskwatch's migrations by version, as its ledger names them (released entries never change)
_MIGRATION_NAMES = {version: name for version, name, _ in Q.MIGRATIONS}

#: what to do when the file fails: at open (and in what the engine's start asks of the store
#: until it calls started()), the engine did not start; later, the writer thread carries
#: on and the next operation tries the file again (a full disk freed, say)
_OPEN_ADVICE = "Check the disk and the file, then start the engine again"
_LATER_ADVICE = "Check the disk and the file; later operations try it again, so no restart is needed once it is fixed"
#: for a file SQLite cannot read as a database, and one whose pages are damaged: neither a retry nor a
#: restart helps
_NOTADB_ADVICE = (
    "The file is not a SQLite database (another program's file, or one written over): point the store "
    "at another path, or at the file you meant"
)
_CORRUPT_ADVICE = (
    "The file is damaged: restore it from a backup, or move it aside (with its -wal and -shm files) and "
    "start on a new one; `sqlite3 FILE .recover` may save what it still holds"
)
#: for a file removed or replaced under the open store: its -wal and -shm stay beside the path
#: while any process has the old file open, and SQLite reads them onto whatever opens it next
#: (a backup put back read as malformed, or silently as the old data)
_GONE_ADVICE = (
    "Stop this process, and every other that has the old file open, before anything opens the path "
    "again; a file put back there (a backup restored) must have no -wal or -shm file left beside it "
    "from the old one: delete them first, or SQLite reads them onto it. Then start the engine again"
)


#: how long one try to begin a transaction waits for another process's lock (ms): the writer
#: tries again until busy_timeout, looking at a stopping engine's give-up between tries
_BUSY_SLICE_MS = 200

class _OpenAbandoned(Exception):
    """The open() waiting for the writer thread was cancelled: the thread gives up and closes."""


class _Tx:
    """What one transaction accumulates for after its commit: totals and wakeups."""

    __slots__ = ("cur", "totals", "work", "cancels", "finished", "pending")

    def __init__(self, cur: sqlite3.Cursor) -> None:
        self.cur = cur
        self.totals: dict[str, int] = {}
        self.work = False
        self.cancels: list[str] = []
        self.finished: list[str] = []
        #: pending runs as counted by an insert of this transaction, kept current by the
        #: inserts that follow it (None: count again; any other operation may have changed it)
        self.pending: int | None = None

    def add(self, name: str, n: int = 1) -> None:
        self.totals[name] = self.totals.get(name, 0) + n


#: status -> its text (an enum's ``.value`` is a descriptor call, on the writer's hot path)
_VALUES = {status: status.value for status in RunStatus}

#: (operation, its arguments, the caller's future, whether it writes, whether it is one
#: statement, what its failure tells the caller to do)
_Op = tuple[Callable[..., Any], tuple[Any, ...], "asyncio.Future[Any]", bool, bool, str]


def _remove_folders(created: list[str]) -> None:
    """Remove folders an open made before it failed, innermost first; one that is no longer
    empty (another process's file landed in it) stays."""
    for folder in reversed(created):
        try:
            os.rmdir(folder)
        except OSError:
            return


#: seconds a process that is exiting waits, beyond a store's busy_timeout, for its writer to
#: commit what it was handed (a disk that hangs must not hang the exit for good)
_EXIT_GRACE = 5.0
#: seconds into the exit's wait for a writer before the log says the process waits, and why
_EXIT_SAY_AFTER = 0.5

#: stores whose writer thread runs, each written out before the interpreter exits (weakly
#: held: the writer thread holds its store while it runs)
_open_stores: weakref.WeakSet[SqliteStore] = weakref.WeakSet()


def _write_out_at_exit() -> None:
    """Let every open store's writer commit what it was handed, then end it.

    A program that ends with no ``engine.stop()`` (an exception out of ``asyncio.run``,
    Ctrl-C, ``main()`` returning) has handed the writer runs it accepted (``submit_nowait``'s
    batch, outcomes, queue jobs), and nothing awaits them any more: the writer is a daemon,
    and the interpreter would end it with them uncommitted. An :mod:`atexit` hook runs after
    the program's other threads were joined (their writes are queued by then) and while
    daemon threads still run.
    """
    stores = [store for store in list(_open_stores) if store._owned_here()]
    waits: list[tuple[SqliteStore, concurrent.futures.Future[None], float]] = []
    for store in stores:
        exited = store._exited
        if exited is None:
            continue
        store._exiting = True  # a claim now would only take runs nobody here will start
        store._closing = True
        store._queue.put(None)
        waits.append((store, exited, time.monotonic() + store.busy_timeout / 1000 + _EXIT_GRACE))
    for store, exited, deadline in waits:
        if not _wait_for_writer(store, exited, deadline):
            return  # Ctrl-C twice: the user gives up on every store's last writes


def _wait_for_writer(store: SqliteStore, exited: concurrent.futures.Future[None], deadline: float) -> bool:
    """Wait until ``store``'s writer has committed what it was handed and ended, or until
    ``deadline``; False if the user gave up (a second Ctrl-C). A first Ctrl-C is said and
    waited through: cut short here, the writer (a daemon thread) would die with the whole
    transaction it holds, every job and run of it lost without a word."""
    # "first": a short wait, then "say" why the exit takes a while, then the "rest" of it
    phase = "first"
    interrupts = told = 0
    while True:
        # (everything inside the try: a Ctrl-C may come at any line, a log call's included)
        try:
            if interrupts > told:
                told = interrupts
                if interrupts > 1:
                    log.error(
                        "the SQLite store %s: gave up committing what the program handed it (a second Ctrl-C); "
                        "what it had left is lost", store._where,
                    )
                    return False
                phase = "rest"
                log.warning(
                    "the SQLite store %s is committing what the program handed it before the process exits; "
                    "waiting for it (Ctrl-C again gives up, and loses what it had left)", store._where,
                )
            if phase == "say":
                phase = "rest"
                log.info(
                    "the process waits (up to %.0f s) for the SQLite store %s to commit what the program handed it",
                    deadline - time.monotonic(), store._where,
                )
            wait = deadline - time.monotonic()
            if phase == "first":
                wait = min(wait, _EXIT_SAY_AFTER)
            try:
                exited.result(timeout=max(0.0, wait))
                return True
            except concurrent.futures.TimeoutError:
                if phase == "first" and time.monotonic() < deadline:
                    phase = "say"
                    continue
                log.warning(
                    "the SQLite store %s had not written everything it was handed when the process exited; "
                    "what it had left is lost", store._where,
                )
                return True
        except KeyboardInterrupt:
            interrupts += 1


def _write_out_before_exit(store: SqliteStore) -> None:
    _open_stores.add(store)
    at_exit("write out", _write_out_at_exit)


class SqliteStore(Store):
    """Runs in a SQLite file (WAL). ``synchronous="normal"`` survives a killed process;
    ``"full"`` also survives a power cut, at the cost of an fsync per commit."""

    name = "sqlite"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "normal",
        busy_timeout: int = 5000,
        max_batch: int = 4096,
        clock: Clock | None = None,
        lease_ttl: float = 30.0,
        node_ttl: float | None = None,
        max_lost: int = 3,
    ) -> None:
        kw: dict[str, Any] = {} if clock is None else {"clock": clock}
        super().__init__(lease_ttl=lease_ttl, node_ttl=node_ttl, max_lost=max_lost, **kw)
        sync = synchronous.lower() if isinstance(synchronous, str) else synchronous
        check_options(SqliteOptions, "SqliteStore", synchronous=sync, busy_timeout=busy_timeout, max_batch=max_batch)
        self.path = os.fspath(path)
        if self.path == ":memory:":
            # SQLite's private in-memory database: every run would vanish at close, while the
            # store calls itself durable (a stop leaves runs pending for a next start that never sees them)
            raise InvalidConfiguration("SqliteStore", [
                "':memory:' is SQLite's in-memory database, which keeps nothing once the store closes; "
                'for a store that need not outlive the process use store="memory" (MemoryStore), '
                "for a durable one name a file, e.g. sqlite:///runs.db"
            ])  # fmt: skip
        self.synchronous = sync
        self.busy_timeout = busy_timeout
        self.max_batch = max_batch
        # where the file really is, fixed now and used for everything (the connection too): a
        # relative URL is relative to the directory the process is in when the store is made,
        # which a later chdir (a daemon library's, a test's) must not move
        self._full_path = os.path.abspath(self.path)
        self._where = repr(self._full_path)
        #: rows read one by one: a row changed by hand holds up no other run
        self._run_rows = RunRows(self._where, log, sqlite_console(self._full_path))
        self._queue: queue.SimpleQueue[_Op | None] = queue.SimpleQueue()
        # claim tokens: a counter from a random start tells this store's claims apart from
        # every other process's, with no system call per claim (one would release the GIL
        # the loop may be waiting for)
        self._nonce = counter_from_random_start()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._exited: concurrent.futures.Future[None] | None = None
        self._closing = False
        #: the process is exiting: the writer commits what it was handed, but claims nothing
        self._exiting = False
        #: the process that started the writer thread (a forked child has none)
        self._pid: int | None = None
        #: the writer's connection while it serves (interrupted by a stopping engine's give-up)
        self._conn: sqlite3.Connection | None = None
        #: set by a stopping engine: no wait for another process's lock goes on past it
        self._give_up_at: float | None = None
        self._interrupter: asyncio.TimerHandle | None = None
        self._busy_now = busy_timeout
        #: when the writer began the first of the waits for another process's lock that have all
        #: timed out since (None once a transaction began): an operation queued behind one such
        #: wait waits out that one and then its own, which StoreBusy then says
        self._locked_since: float | None = None
        #: the file the connection opened ((device, inode)): removed or replaced, writes would go
        #: to a file nobody opens again
        self._identity: tuple[int, int] | None = None
        self._gone: str | None = None
        #: from the open until the engine's start is over (started()): a failure ends the start
        self._starting = False

    def describe(self) -> str:
        return f"sqlite:{self._full_path}"

    def __repr__(self) -> str:
        state = "open" if self._thread is not None else "closed"
        return f"<SqliteStore {self.path} {state}>"

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        if self._thread is not None:
            return
        self._starting = True
        created = self._make_folders()  # sqlite:///.taskwatch/app.db on a fresh checkout
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self.give_up_after(None)
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._exited = concurrent.futures.Future()
        self._queue = queue.SimpleQueue()
        abandon = threading.Event()
        # daemon: a store never closed must not keep the interpreter from exiting (joining
        # non-daemon threads comes first); what it was handed is written at exit all the same
        # (_write_out_at_exit), and SQLite's journal rolls back a transaction a kill cut short
        thread = threading.Thread(
            target=self._main,
            args=(ready, self._exited, abandon),
            name=f"taskwatch-sqlite-{os.path.basename(self.path)}",
            daemon=True,
        )
        thread.start()
        try:
            await asyncio.wrap_future(ready)
        except BaseException:
            self._starting = False
            # cancelled, say by a wait_for around the engine's start: the thread stops waiting
            # for another process's lock at once, and one that opened meanwhile ends its service
            abandon.set()
            self._queue.put(None)
            await asyncio.wrap_future(self._exited)
            thread.join()
            _remove_folders(created)
            raise
        self._thread = thread
        self._pid = os.getpid()
        self._exiting = False
        _write_out_before_exit(self)

    def _owned_here(self) -> bool:
        """Whether this process runs the store's writer (open, and not inherited by a fork)."""
        thread = self._thread
        return thread is not None and self._pid == os.getpid() and thread.is_alive()

    def _make_folders(self) -> list[str]:
        """Create the file's missing folders and return them, outermost first.

        A folder that cannot be created raises :class:`StoreUnavailable` saying why, after
        removing the folders this call made: a refused start leaves nothing behind.
        """
        missing: list[str] = []
        folder = os.path.dirname(self._full_path)
        while not os.path.isdir(folder) and os.path.dirname(folder) != folder:
            missing.append(folder)
            folder = os.path.dirname(folder)
        created: list[str] = []
        for folder in reversed(missing):
            try:
                os.mkdir(folder)
            except FileExistsError as exc:
                if os.path.isdir(folder):
                    continue  # another process made it meanwhile
                _remove_folders(created)
                raise self._folder_error(folder, exc) from exc
            except OSError as exc:
                _remove_folders(created)
                raise self._folder_error(folder, exc) from exc
            created.append(folder)
        return created

    def _folder_error(self, folder: str, exc: OSError) -> StoreUnavailable:
        if os.path.islink(folder):
            return StoreUnavailable(
                self._where,
                f"cannot create its folder: {folder!r} is a link to {os.readlink(folder)!r}, which is not a folder",
                "Fix or remove that link, or point the store at a path in an existing folder",
            )
        if os.path.lexists(folder):
            return StoreUnavailable(
                self._where,
                f"cannot create its folder: {folder!r} is a file, not a folder",
                "Move or rename that file, or point the store at a path in another folder",
            )
        if isinstance(exc, PermissionError):
            return StoreUnavailable(
                self._where,
                f"cannot create its folder {folder!r}: this user may not write in {os.path.dirname(folder)!r}",
                "Create the folder with write access for this user, or point the store at a path this user may write",
            )
        return StoreUnavailable(
            self._where,
            f"cannot create its folder {folder!r}: {exc.strerror or exc}",
            "Check the disk and the path, then start the engine again",
        )

    async def close(self) -> None:
        """Finish every queued operation, then close the connection and join the thread."""
        thread = self._thread
        if thread is None or self._exited is None:
            return
        self._closing = True
        self._starting = False
        self._queue.put(None)
        await asyncio.wrap_future(self._exited)
        thread.join()
        self._thread = None
        _open_stores.discard(self)

    # ---------------------------------------------------------------- the writer thread

    def _connect(self, abandon: threading.Event) -> sqlite3.Connection:
        # no busy handler while opening: SQLite's would wait out busy_timeout deaf to a
        # cancelled open, so the waits for another process's lock are ours (see _when_unlocked)
        conn = sqlite3.connect(self._full_path, timeout=0, isolation_level=None, check_same_thread=False)
        try:
            deadline = time.monotonic() + self.busy_timeout / 1000
            # before anything changes: even the switch to WAL outlives a refusal
            self._when_unlocked(lambda: self._refuse_foreign(conn), deadline, abandon)
            self._when_unlocked(lambda: conn.execute("PRAGMA journal_mode=WAL").fetchone(), deadline, abandon)
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            self._when_unlocked(lambda: self._migrate(conn), deadline, abandon)
            conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout)}")
        except BaseException:
            conn.close()
            raise
        return conn

    @staticmethod
    def _when_unlocked(step: Callable[[], object], deadline: float, abandon: threading.Event) -> None:
        """Run ``step``, tried again while another process holds a lock it needs, until
        ``deadline`` (then its "database is locked" stands) or until the open is abandoned.

        A journal-mode switch meets another connection's lock with "database is locked" at
        once, busy handler or not (two processes opening a new file together meet exactly
        there), so the open waits here for every lock alike.
        """
        pause = 0.001
        while True:
            if abandon.is_set():
                raise _OpenAbandoned
            try:
                step()
                return
            except sqlite3.OperationalError as exc:
                left = deadline - time.monotonic()
                if "locked" not in str(exc) or left <= 0:
                    raise
            if abandon.wait(min(pause, left)):
                raise _OpenAbandoned
            pause = min(pause * 2, 0.05)

    def _migrate(self, conn: sqlite3.Connection) -> None:
        # every cursor of the open is closed before it returns or raises: one whose statement failed
        # holds that statement unfinalized, and SQLite's close of the connection then leaves the file,
        # its -wal and -shm open for as long as the error is kept (its traceback holds the cursor)
        with contextlib.closing(conn.cursor()) as cur:
            cur.execute("BEGIN IMMEDIATE")
            try:
                self._refuse_foreign(conn)  # again under the write lock: another process may have written meanwhile
                cur.execute(Q.CREATE_MIGRATIONS)
                found = cur.execute(Q.SCHEMA_FOUND).fetchone()[0]
                if found > Q.SCHEMA_VERSION:
                    raise SchemaTooNew(self._where, found, Q.SCHEMA_VERSION)
                if 0 < found < Q.SCHEMA_VERSION:
                    # (under the write lock: no node of the earlier version heartbeats between this and the migration)
                    live = [n for (n,) in cur.execute(Q.LIVE_NODES, {"since": self.clock() - self.node_ttl}).fetchall()]
                    if live:
                        raise SchemaInUse(self._where, found, Q.SCHEMA_VERSION, live, self.node_ttl)
                for version, name, statements in Q.MIGRATIONS:
                    if version <= found:
                        continue
                    for sql in statements:
                        cur.execute(sql)
                    cur.execute(Q.RECORD_MIGRATION, {"version": version, "name": name, "now": self.clock()})
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def _refuse_foreign(self, conn: sqlite3.Connection) -> None:
        """Raise :class:`NotATaskwatchStore` for a file holding another application's tables.

        A new (empty) file and taskwatch's own are used; migrating anything else would mix
        taskwatch's tables into a foreign schema, or fail half way on a table name both use.
        Taskwatch's own is told by its ``schema_migrations`` ledger: these columns, and rows
        naming taskwatch's migrations (another tool's ledger may have the same columns).
        Versions past this taskwatch's are left to the schema check, which says to upgrade.
        """
        with contextlib.closing(conn.cursor()) as cur:  # (closed however it ends: see _migrate)
            tables = [name for (name,) in cur.execute(_FILE_TABLES).fetchall()]
            if not tables:
                return
            if "schema_migrations" in tables:
                columns = {row[1] for row in cur.execute("PRAGMA table_info(schema_migrations)").fetchall()}
                if columns == _LEDGER_COLUMNS:
                    rows = cur.execute("SELECT version, name FROM schema_migrations").fetchall()
                    known = [
                        _MIGRATION_NAMES.get(version) == name for version, name in rows if version in _MIGRATION_NAMES
                    ]
                    if (known and all(known)) or tables == ["schema_migrations"]:
                        return
        raise NotATaskwatchStore(self._where, tables)

    def _main(
        self,
        ready: concurrent.futures.Future[None],
        exited: concurrent.futures.Future[None],
        abandon: threading.Event,
    ) -> None:
        try:
            # once running, ``ready`` can no longer be cancelled under the results set below
            if not ready.set_running_or_notify_cancel():
                return
            try:
                conn = self._connect(abandon)
            except sqlite3.Error as exc:
                ready.set_exception(self._translate(exc, _OPEN_ADVICE))
                return
            except BaseException as exc:  # noqa: BLE001 - handed to open()
                ready.set_exception(exc)
                return
            self._identity = self._file_identity()
            self._gone = None
            self._busy_now = self.busy_timeout
            self._conn = conn
            ready.set_result(None)
            try:
                self._serve(conn)
            finally:
                self._conn = None
                conn.close()
        finally:
            exited.set_result(None)

    def _serve(self, conn: sqlite3.Connection) -> None:
        q = self._queue
        stop = False
        while not stop:
            item = q.get()
            if item is None:
                break
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                self._run_batch(conn, batch)
            except Exception as exc:  # noqa: BLE001 - the thread must outlive one bad batch
                # something failed outside an operation (a savepoint on a broken disk, say):
                # nothing of this batch committed, and every caller hears why
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._deliver_threadsafe(self._all_failed(batch, exc), _Tx(conn.cursor()))

    def _run_batch(self, conn: sqlite3.Connection, batch: list[_Op]) -> None:
        # closed once the batch is over, as the open's are (see _migrate): an error handed to a
        # caller holds the batch's cursor, and the caller may keep it past the store's close
        with contextlib.closing(conn.cursor()) as cur:
            self._run_batch_on(conn, cur, batch)

    def _run_batch_on(self, conn: sqlite3.Connection, cur: sqlite3.Cursor, batch: list[_Op]) -> None:
        write = any(op[3] for op in batch)
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        tx = _Tx(cur)
        gone = self._file_gone() if write else self._gone
        if gone is not None:
            lost: StoreError = (
                StoreGaveUp(self._where, gone)  # (a stop's writes would retry for ever)
                if self._gave_up()
                else StoreUnavailable(self._where, gone, _GONE_ADVICE)
            )
            self._deliver_threadsafe([(op[2], None, lost) for op in batch], tx)
            return
        began = time.monotonic()
        try:
            # a read-only batch must not take the write lock other processes wait for
            self._begin(conn, cur, "BEGIN IMMEDIATE" if write else "BEGIN")
        except sqlite3.Error as exc:
            if self._locked_since is None and isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
                self._locked_since = began
            self._deliver_threadsafe(self._all_failed(batch, exc), tx)
            return
        self._locked_since = None
        insert = self._insert
        for fn, args, fut, _, single, advice in batch:
            if fn == insert and fut.cancelled():
                # its submitter stopped waiting before the write began (a wait_for that ran out
                # while another process held the file): written now, the run would run although
                # its caller was told nothing was submitted (a read of the state from this thread
                # is safe; a cancel landing after it leaves the insert to be read back as before)
                continue
            if fn != insert:
                tx.pending = None
            # a failed operation leaves the batch as it found it: SQLite undoes a failed
            # statement by itself, so only operations of several writes need a savepoint
            # (and a single statement fails before the operation counts anything in tx)
            pending = tx.pending
            saved = None if single else (dict(tx.totals), tx.work, len(tx.cancels), len(tx.finished))
            if saved is not None:
                cur.execute("SAVEPOINT op")
            try:
                res = fn(tx, *args)
            except Exception as exc:  # noqa: BLE001 - handed to the caller
                tx.pending = pending
                if saved is not None:
                    cur.execute("ROLLBACK TO op")
                    cur.execute("RELEASE op")
                    tx.totals, tx.work = saved[0], saved[1]
                    del tx.cancels[saved[2] :], tx.finished[saved[3] :]
                elif not conn.in_transaction:
                    raise  # SQLite rolled the whole transaction back (a full disk, say): the batch failed
                results.append((fut, None, self._translate(exc, advice)))
            else:
                if saved is not None:
                    cur.execute("RELEASE op")
                results.append((fut, res, None))
        try:
            if tx.totals:
                cur.executemany(Q.ADD_TOTAL, [{"name": k, "delta": v} for k, v in tx.totals.items()])
            cur.execute("COMMIT")
        except sqlite3.Error as exc:
            try:
                cur.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._deliver_threadsafe(self._all_failed(batch, exc), _Tx(cur))
            return
        self._deliver_threadsafe(results, tx)

    def _all_failed(
        self, batch: list[_Op], exc: BaseException
    ) -> list[tuple[asyncio.Future[Any], Any, BaseException | None]]:
        """Every operation of ``batch`` failed with ``exc``: its error, with the advice its caller needs."""
        errors: dict[str, BaseException] = {}
        out: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        for op in batch:
            advice = op[5]
            err = errors.get(advice)
            if err is None:
                err = errors[advice] = self._translate(exc, advice)
            out.append((op[2], None, err))
        return out

    def _file_identity(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self._full_path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    def _file_gone(self) -> str | None:
        """Why the path no longer names the file the connection has open (removed, its folder
        removed, or replaced by another file), or None; looked at before every write batch (a
        stat, a few µs beside the batch's commit).

        SQLite goes on writing to an open file after it is unlinked, and nothing of it is
        seen again: every write from then on would be lost while reported committed."""
        if self._gone is not None or self._identity is None:
            return self._gone
        found = self._file_identity()
        if found is None:
            self._gone = "the file was removed (or its folder) while the store had it open"
        elif found != self._identity:
            self._gone = "the file was replaced by another while the store had it open"
        if self._gone is not None:
            log.error("the SQLite store %s: %s; every operation fails from now on", self._where, self._gone)
        return self._gone

    def give_up_after(self, deadline: float | None) -> None:
        self._give_up_at = deadline
        if self._interrupter is not None:
            self._interrupter.cancel()
            self._interrupter = None
        if deadline is None:
            return
        loop = asyncio.get_running_loop()
        # an operation already waiting for another process's lock is bounded too: interrupted then
        self._interrupter = loop.call_at(loop.time() + (deadline - time.monotonic()), self._interrupt)

    def _interrupt(self) -> None:
        self._interrupter = None
        conn = self._conn
        if conn is not None:
            with contextlib.suppress(Exception):  # (closing meanwhile)
                conn.interrupt()

    def _begin(self, conn: sqlite3.Connection, cur: sqlite3.Cursor, begin: str) -> None:
        """Begin the batch's transaction, waiting up to ``busy_timeout`` for another process's
        lock, in slices: SQLite's own wait for a lock heeds no interrupt (a stopping engine's
        give-up could not cut a wait begun before it, and the stop would wait it out, up to
        busy_timeout), so each slice looks at the give-up again."""
        until = time.monotonic() + self.busy_timeout / 1000
        while True:
            give_up = self._give_up_at
            left = until if give_up is None else min(until, give_up)
            wanted = max(0, min(_BUSY_SLICE_MS, int((left - time.monotonic()) * 1000)))
            if wanted != self._busy_now:
                conn.execute(f"PRAGMA busy_timeout={wanted}")
                self._busy_now = wanted
            try:
                cur.execute(begin)
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() >= left:
                    raise

    def _gave_up(self) -> bool:
        give_up = self._give_up_at
        return give_up is not None and time.monotonic() >= give_up - 0.05

    def _translate(self, exc: BaseException, advice: str = _LATER_ADVICE) -> BaseException:
        if isinstance(exc, StoreError) or not isinstance(exc, sqlite3.Error):
            return exc
        if self._gave_up():
            # past the stopping engine's time for last writes, whatever keeps the store from
            # answering (a lock, a full disk, a file gone): the stop's writes would retry for ever
            held = isinstance(exc, sqlite3.OperationalError) and ("locked" in str(exc) or "interrupted" in str(exc))
            gave_up = StoreGaveUp(
                self._where, f"another process held the file's lock ({exc})" if held else f"{type(exc).__name__}: {exc}"
            )
            gave_up.__cause__ = exc
            return gave_up
        unwritable = None
        code = getattr(exc, "sqlite_errorname", "")
        if code.startswith(("SQLITE_CANTOPEN", "SQLITE_READONLY")):
            unwritable = self._why_unwritable()
        elif code.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT")):
            # no retry or restart helps either: what to do is told as it is
            advice = _NOTADB_ADVICE if code.startswith("SQLITE_NOTADB") else _CORRUPT_ADVICE
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            since = self._locked_since
            err: StoreError = StoreBusy(self._where, self.busy_timeout, None if since is None else time.monotonic() - since)
        elif unwritable is not None:
            err = StoreUnavailable(self._where, f"{unwritable[0]} ({exc})", unwritable[1])
        else:
            err = StoreUnavailable(self._where, f"{type(exc).__name__}: {exc}", advice)
        err.__cause__ = exc
        return err

    def _why_unwritable(self) -> tuple[str, str] | None:
        """Why SQLite cannot open or write the file, where the file system can tell (SQLite
        says only "unable to open database file" or "attempt to write a readonly database"):
        (the cause, what to do), or None."""
        path = self._full_path
        folder = os.path.dirname(path)
        elsewhere = "or point the store at a path this user may write"
        if os.path.isdir(path):
            return (
                f"{path!r} is a folder, not a file",
                f"Point the store at a file, e.g. {os.path.join(path, 'runs.db')!r}, or move that folder",
            )
        try:
            read_only_fs = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except (OSError, AttributeError):  # no statvfs (Windows), or no such folder
            read_only_fs = False
        if read_only_fs:
            return (
                "it is on a read-only file system",
                "Mount that file system read-write, or point the store at a path on a writable one",
            )
        if os.path.exists(path) and not os.access(path, os.W_OK):
            return "the file is read-only for this user", f"Give this user write access to it, {elsewhere}"
        if os.path.isdir(folder) and not os.access(folder, os.W_OK):
            return (
                f"its folder {folder!r} is read-only for this user, and SQLite keeps its -wal and -shm files beside the file",
                f"Give this user write access to the folder, {elsewhere}",
            )
        for companion in (path + "-wal", path + "-shm"):
            if os.path.exists(companion) and not os.access(companion, os.W_OK):
                return (
                    f"{companion!r}, which SQLite keeps beside the file, is read-only for this user",
                    f"Give this user write access to it, {elsewhere}",
                )
        return None

    def _deliver_threadsafe(self, results: list[tuple[asyncio.Future[Any], Any, BaseException | None]], tx: _Tx) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            loop.call_soon_threadsafe(self._deliver, results, tx.work, tx.cancels, tx.finished)
        except RuntimeError:
            # the loop is closed: nobody is awaiting any more, and a write handed over as the
            # program ended (runs, queue jobs) that failed would be lost without a word
            failed = [exc for _, _, exc in results if exc is not None]
            if failed:
                log.error(
                    "the SQLite store %s could not write %d operation(s) handed to it as the program "
                    "ended (%s); what they held is lost", self._where, len(failed), failed[0],
                )

    def _deliver(
        self,
        results: list[tuple[asyncio.Future[Any], Any, BaseException | None]],
        work: bool,
        cancels: list[str],
        finished: list[str],
    ) -> None:
        for fut, res, exc in results:
            if fut.done():
                continue  # the caller stopped waiting; the operation still happened
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(res)
        if self._notifying and (work or cancels or finished):
            self._notify(work, cancels, finished)

    def _call(self, fn: Callable[..., Any], *args: Any, write: bool = True, single: bool = False) -> asyncio.Future[Any]:
        """Queue ``fn(tx, *args)`` for the writer. ``single``: it writes with one statement at
        most (reads aside), which fails whole or not at all."""
        if self._thread is None or self._closing:
            raise StoreClosed(self._where)
        loop = self._loop
        assert loop is not None
        fut = loop.create_future()
        self._queue.put((fn, args, fut, write, single or not write, self._advice()))
        return fut

    def started(self) -> None:
        self._starting = False

    def _advice(self) -> str:
        """What a failure of the operation being queued tells its caller to do: until the
        engine's start is over, that the engine must be started again (the failure ended the
        start); from then on, that later operations try the file again."""
        return _OPEN_ADVICE if self._starting else _LATER_ADVICE

    # ---------------------------------------------------------------- runs

    def insert(self, runs: Sequence[NewRun], *, max_pending: int | None = None) -> asyncio.Future[list[Inserted]]:
        # the writer's future itself, no coroutine around it (see Store.insert)
        if not runs:
            done: asyncio.Future[list[Inserted]] = asyncio.get_running_loop().create_future()
            done.set_result([])
            return done
        return self._call(self._insert, list(runs), self.clock(), max_pending, single=len(runs) == 1)

    def _insert(self, tx: _Tx, runs: list[NewRun], now: float, max_pending: int | None) -> list[Inserted]:
        cur = tx.cur
        out: list[Inserted] = []
        rows: list[dict[str, Any]] = []
        held: dict[tuple[str, str], str] = {}
        for new in runs:
            key = new.key
            if key is not None:
                holder = held.get((new.task, key))
                if holder is None:
                    found = cur.execute(Q.KEY_HOLDER, {"task": new.task, "key": key}).fetchone()
                    if found is None:
                        # no holder: a run that waits for the key (a retry, while another held it)
                        # takes it now and answers for this submit
                        waiting = cur.execute(Q.KEY_WAITING, {"task": new.task, "key": key}).fetchone()
                        if waiting is not None:
                            cur.execute(Q.TAKE_KEY, {"seq": waiting[0]})
                            found = (waiting[1],)
                    holder = None if found is None else found[0]
                if holder is not None:
                    out.append(Inserted(holder, False))
                    continue
            run_id = new.id or new_run_id()
            if key is not None:
                held[(new.task, key)] = run_id
            rows.append(
                {
                    "id": run_id,
                    "task": new.task,
                    "params": _dumps(new.params) if new.params else "{}",
                    "max_attempts": new.max_attempts,
                    "created_at": new.created_at if new.created_at is not None else now,
                    "run_after": now + new.delay if new.delay > 0 else now,
                    "key": key,
                    "source": new.source,
                    "on_lost": new.on_lost,
                }
            )
            out.append(Inserted(run_id, True))
        if not rows:
            return out
        if max_pending is not None:
            # counted once per run of inserts in a transaction: a count is a walk of the
            # pending index, and ten concurrent submitters make ten inserts per transaction
            pending = tx.pending
            if pending is None:
                pending = cur.execute(Q.COUNT_PENDING).fetchone()[0]
            if pending + len(rows) > max_pending:
                raise QueueFull("the run store's pending queue", max_pending, pending, adding=len(rows))
            tx.pending = pending
        try:
            if len(rows) == 1:
                cur.execute(Q.INSERT_RUN, rows[0])  # the common case: half the cost of executemany
            else:
                cur.executemany(Q.INSERT_RUN, rows)
        except sqlite3.IntegrityError:
            for row in rows:
                if cur.execute(Q.RUN_ID_EXISTS, {"id": row["id"]}).fetchone() is not None:
                    raise DuplicateRunId(row["id"]) from None
            raise
        if tx.pending is not None:
            tx.pending += len(rows)
        tx.add("inserted", len(rows))
        tx.work = True
        return out

    async def claim(
        self,
        node: str,
        incarnation: str,
        slots: int,
        tasks: Mapping[str, int | None],
        *,
        limits: Mapping[str, int] | None = None,
    ) -> list[Claim]:
        if slots <= 0 or not tasks:
            return []
        caps = dict(limits) if limits else None
        return await self._call(self._claim, node, incarnation, slots, dict(tasks), caps)  # type: ignore[no-any-return]

    def _claim(
        self,
        tx: _Tx,
        node: str,
        incarnation: str,
        slots: int,
        tasks: dict[str, int | None],
        caps: dict[str, int] | None = None,
    ) -> list[Claim]:
        if self._exiting:
            return []  # the process is exiting: nobody would start what this took
        cur = tx.cur
        # the time is read here, under the write lock, not when the claim was queued: a claim
        # that waited for the lock while its process was paused would be written with a lease
        # already run out (its own node's recovery would take the run back from under it)
        now = self.clock()
        replaced, last_heartbeat = cur.execute(_STANDING, {"incarnation": incarnation}).fetchone()
        if replaced:
            return []  # a later start of this node id registered: it claims nothing more
        if last_heartbeat is not None and last_heartbeat < now - self.node_ttl:
            # this node's registration has lapsed (its process was paused, say): the others may
            # count it gone and recover what it holds, so it claims nothing until a heartbeat
            # has gone through
            return []
        found: list[tuple[Any, ...]] = []
        for task, free in tasks.items():
            n = slots if free is None else min(free, slots)
            cap = None if caps is None else caps.get(task)
            if cap is not None and n > 0:
                # the write transaction holds the file's one write lock: no other process
                # claims between this count and the claim
                n = min(n, cap - cur.execute(Q.COUNT_RUNNING_TASK, {"task": task}).fetchone()[0])
            if n > 0:
                found.extend(cur.execute(_CLAIM_CANDIDATES, {"task": task, "now": now, "n": n}).fetchall())
        if not found:
            return []
        if len(tasks) > 1:
            found.sort(key=lambda r: r[0])  # oldest first across tasks
            del found[slots:]
        lease_until = now + self.lease_ttl
        takes = []
        claims = []
        unstartable: list[dict[str, Any]] = []
        rows = self._run_rows
        for seq, run_id, task, params, attempt, max_attempts, created_at, key, source, lost_count, error in found:
            token = f"{seq}.{self._nonce():016x}"
            takes.append(
                {"seq": seq, "node": node, "incarnation": incarnation, "token": token, "lease_until": lease_until, "now": now}
            )
            decoded = rows.claimed(run_id, params, created_at, attempt, max_attempts, lost_count, key, source)
            if isinstance(decoded, RunError):
                # a column changed by hand into something unreadable: it cannot start, and left
                # pending it would be taken by every claim from now on
                unstartable.append(failed_at_claim(seq, token, now, decoded))
                continue
            claims.append(
                Claim(
                    run_id, token, task, decoded, attempt, max_attempts, created_at, now, lease_until, key,
                    source, lost_count, None if error is None else rows.error(run_id, error),
                )
            )
        cur.executemany(Q.CLAIM_TAKE, takes)
        for values in unstartable:
            ended = cur.execute(Q.END_CLAIMED, values).fetchone()
            if ended is not None:
                tx.add("failed")
                tx.finished.append(ended[0])
        return claims

    async def heartbeat(
        self, incarnation: str, tokens: Sequence[str], progress: Mapping[str, Progress] | None = None
    ) -> HeartbeatResult:
        if not tokens:
            return HeartbeatResult()
        return await self._call(self._heartbeat, incarnation, list(tokens), dict(progress or {}))  # type: ignore[no-any-return]

    def _heartbeat(
        self, tx: _Tx, incarnation: str, tokens: list[str], progress: dict[str, Progress]
    ) -> HeartbeatResult:
        cur = tx.cur
        # from the time it is written (see _claim): one that waited out a pause must not write
        # a lease already run out
        lease_until = self.clock() + self.lease_ttl
        cancel: dict[str, CancelReason] = {}
        lost: list[str] = []
        for token in tokens:
            seq = _seq_of(token)
            args: dict[str, Any] = {"seq": seq, "token": token, "incarnation": incarnation, "lease_until": lease_until}
            p = progress.get(token)
            if p is None:
                row = cur.execute(Q.HEARTBEAT, args).fetchone()
            else:
                args.update(done=p.done, total=p.total, message=p.message)
                row = cur.execute(Q.HEARTBEAT_PROGRESS, args).fetchone()
            if row is None:
                lost.append(token)
            elif row[0]:
                cancel[token] = row[1] or "user"
        return HeartbeatResult(cancel=cancel, lost=lost)

    def finish(
        self, token: str, outcome: Outcome, progress: Progress | None = None
    ) -> asyncio.Future[RunStatus | None]:
        # the writer's future itself, no coroutine around it (see Store.finish)
        if not isinstance(outcome, (Succeeded, Failed, Cancelled, Retry)):
            raise TypeError(f"unknown outcome {outcome!r}; pass Succeeded, Failed, Cancelled or Retry")
        return self._call(self._finish, token, outcome, self.clock(), progress, single=True)

    def _finish(
        self, tx: _Tx, token: str, outcome: Outcome, now: float, progress: Progress | None = None
    ) -> RunStatus | None:
        status = self._end_claimed(tx, token, outcome, now)
        # (a run back to pending for its retry shows how far its last attempt got: the claim clears it)
        if progress is not None and status is not None:
            values = {"seq": _seq_of(token), "done": progress.done, "total": progress.total, "message": progress.message}
            tx.cur.execute(Q.ENDED_PROGRESS, values)
        return status

    def _end_claimed(self, tx: _Tx, token: str, outcome: Outcome, now: float) -> RunStatus | None:
        cur = tx.cur
        seq = _seq_of(token)
        if type(outcome) is Succeeded and not self._notifying_finished:
            # most outcomes: one statement, without RETURNING (see SUCCEED_CLAIMED); with a
            # subscriber of finished run ids, the one statement below says which run it was
            result = None if outcome.result is None else _dumps(outcome.result)
            if cur.execute(Q.SUCCEED_CLAIMED, {"seq": seq, "token": token, "now": now, "result": result}).rowcount != 1:
                return None
            tx.add("succeeded")
            return RunStatus.SUCCEEDED
        base = {"seq": seq, "token": token, "now": now, "lost": 0, "result": None, "error": None, "cancel_reason": None}
        if isinstance(outcome, Retry):
            state = cur.execute(Q.CLAIM_STATE, {"seq": seq, "token": token}).fetchone()
            if state is None:
                return None
            if not state[0]:
                cur.execute(
                    Q.REQUEUE_CLAIMED,
                    {
                        "seq": seq,
                        "token": token,
                        "lost": 0,
                        "step": 1 if outcome.next_attempt else 0,
                        "added": outcome.added_attempts,
                        "run_after": now + max(0.0, outcome.delay),
                        "error": _error_json(outcome.error),
                    },
                )
                if outcome.next_attempt:
                    tx.add("retried")
                tx.work = True
                return RunStatus.PENDING
            status = RunStatus.CANCELLED  # a cancel was requested meanwhile: the user's intent wins
        elif isinstance(outcome, Succeeded):
            status = RunStatus.SUCCEEDED
            base["result"] = None if outcome.result is None else _dumps(outcome.result)
        elif isinstance(outcome, Failed):
            status = RunStatus.FAILED
            base["error"] = _error_json(outcome.error)
        else:
            status = RunStatus.CANCELLED
            base["cancel_reason"] = outcome.reason
        base["status"] = value = _VALUES[status]
        ended = cur.execute(Q.END_CLAIMED, base).fetchone()
        if ended is None:
            return None
        tx.add(value)
        tx.finished.append(ended[0])
        return status

    async def request_cancel(self, run_id: str, reason: CancelReason = "user") -> CancelResult:
        return await self._call(self._request_cancel, run_id, reason, self.clock())  # type: ignore[no-any-return]

    def _request_cancel(self, tx: _Tx, run_id: str, reason: CancelReason, now: float) -> CancelResult:
        cur = tx.cur
        row = cur.execute(Q.GET_RUN, {"id": run_id}).fetchone()
        if row is None:
            raise RunNotFound(run_id)
        seq, status = row[0], row[4]
        found = self._run_rows.record(row)  # a row that makes no record is left as it is
        action: Literal["cancelled", "requested"]
        if status == "pending":
            cur.execute(Q.CANCEL_PENDING, {"seq": seq, "now": now, "reason": reason})
            tx.add("cancelled")
            tx.finished.append(run_id)
            action = "cancelled"
        elif status == "running":
            if cur.execute(Q.CANCEL_FLAG, {"seq": seq, "reason": reason}).rowcount:
                tx.cancels.append(run_id)
            action = "requested"
        else:
            return CancelResult(action="finished", run=found)
        return CancelResult(action=action, run=self._run_rows.record(cur.execute(Q.GET_RUN, {"id": run_id}).fetchone()))

    async def recover(self, live_incarnations: Collection[str] | None = None) -> list[Recovered]:
        live = None if live_incarnations is None else frozenset(live_incarnations)
        return await self._call(self._recover, live, self.clock())  # type: ignore[no-any-return]

    def _recover(self, tx: _Tx, live: frozenset[str] | None, now: float) -> list[Recovered]:
        cur = tx.cur
        nodes = self._run_rows.nodes(cur.execute(Q.ALL_NODES).fetchall())
        gone = gone_incarnations(nodes.nodes, now, self.node_ttl)
        known = nodes.known
        out: list[Recovered] = []
        for row in cur.execute(_RUNNING_CLAIMS).fetchall():
            step = recovery_step(row, now, gone, live, self.max_lost, known)
            if step is None:
                continue
            cur.execute(step.sql, step.args).fetchall()
            book_recovered(tx, step.recovered)
            out.append(step.recovered)
        return out

    # ---------------------------------------------------------------- reads

    async def get(self, run_id: str) -> StoredRun | None:
        return await self._call(self._get, run_id, write=False)  # type: ignore[no-any-return]

    def _get(self, tx: _Tx, run_id: str) -> StoredRun | None:
        row = tx.cur.execute(Q.GET_RUN, {"id": run_id}).fetchone()
        return None if row is None else self._run_rows.record(row)

    async def get_many(self, run_ids: Collection[str]) -> dict[str, StoredRun]:
        if not run_ids:
            return {}
        return await self._call(self._get_many, list(run_ids), write=False)  # type: ignore[no-any-return]

    def _get_many(self, tx: _Tx, run_ids: list[str]) -> dict[str, StoredRun]:
        found: dict[str, StoredRun] = {}
        for run_id in run_ids:
            row = tx.cur.execute(Q.GET_RUN, {"id": run_id}).fetchone()
            if row is not None and (run := self._run_rows.run(row)) is not None:
                found[run_id] = run
        return found

    async def query(
        self,
        *,
        status: RunStatus | str | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> Page:
        args = {
            "status": None if status is None else run_status(status).value,
            "task": task,
            "since": since,
            "before": None if before is None else parse_cursor(before),
            "limit": max(0, limit) + 1,
        }
        return await self._call(self._query, args, limit, write=False)  # type: ignore[no-any-return]

    def _query(self, tx: _Tx, args: dict[str, Any], limit: int) -> Page:
        rows = tx.cur.execute(Q.QUERY_RUNS, args).fetchall()
        more = len(rows) > limit
        shown = rows[:limit]
        # the cursor is the last row's, read or not: the next page starts after it either way
        return Page(runs=self._run_rows.runs(shown), next=str(shown[-1][0]) if more and shown else None)

    async def counts(self) -> Counts:
        return await self._call(self._counts, write=False)  # type: ignore[no-any-return]

    def _counts(self, tx: _Tx) -> Counts:
        return counts_of(tx.cur.execute(Q.COUNTS).fetchall())

    async def prune(self, *, keep: int | None = None, older_than: float | None = None) -> int:
        if keep is None and older_than is None:
            return 0
        return await self._call(self._prune, keep, older_than, self.clock())  # type: ignore[no-any-return]

    def _prune(self, tx: _Tx, keep: int | None, older_than: float | None, now: float) -> int:
        cur = tx.cur
        deleted = 0
        if older_than is not None:
            deleted += cur.execute(Q.PRUNE_OLDER, {"cutoff": now - older_than}).rowcount
        if keep is not None:
            edge = cur.execute(Q.PRUNE_BOUNDARY, {"keep": max(0, keep)}).fetchone()
            if edge is not None:
                deleted += cur.execute(Q.PRUNE_FROM, {"finished_at": edge[0], "seq": edge[1]}).rowcount
        return deleted

    # ---------------------------------------------------------------- nodes

    async def register_node(self, node: str, incarnation: str, version: str) -> NodeInfo:
        args = {"node": node, "incarnation": incarnation, "version": version, "now": self.clock()}
        return await self._call(self._register_node, args)  # type: ignore[no-any-return]

    def _register_node(self, tx: _Tx, args: dict[str, Any]) -> NodeInfo:
        tx.cur.execute(Q.REGISTER_NODE, args)
        return _node(tx.cur.execute(Q.GET_NODE, {"incarnation": args["incarnation"]}).fetchone())

    async def node_heartbeat(
        self, incarnation: str, running: int, *, cpu_percent: float | None = None, rss_bytes: int | None = None
    ) -> bool:
        # the time it was sent, not written: it proves the engine's loop ran then. Written late,
        # after a pause, it leaves a lapsed registration lapsed, so the node claims again only
        # once a heartbeat sent since the pause has gone through (see _claim)
        args = {"incarnation": incarnation, "running": running, "now": self.clock(),
                "cpu_percent": cpu_percent, "rss_bytes": rss_bytes}  # fmt: skip
        return await self._call(self._node_heartbeat, args)  # type: ignore[no-any-return]

    @staticmethod
    def _node_heartbeat(tx: _Tx, args: dict[str, Any]) -> bool:
        row = tx.cur.execute(Q.NODE_HEARTBEAT, args).fetchone()
        return row is not None and bool(row[0])

    async def node_stopped(self, incarnation: str) -> None:
        await self._call(self._exec, Q.NODE_STOPPED, {"incarnation": incarnation, "now": self.clock()})

    async def nodes(self) -> list[NodeInfo]:
        return await self._call(self._nodes, write=False)  # type: ignore[no-any-return]

    def _nodes(self, tx: _Tx) -> list[NodeInfo]:
        return self._run_rows.nodes(tx.cur.execute(Q.ALL_NODES).fetchall()).nodes

    async def prune_nodes(self, older_than: float) -> int:
        return await self._call(self._prune_nodes, self.clock() - older_than)  # type: ignore[no-any-return]

    @staticmethod
    def _prune_nodes(tx: _Tx, cutoff: float) -> int:
        return tx.cur.execute(Q.PRUNE_NODES, {"cutoff": cutoff}).rowcount

    # ---------------------------------------------------------------- small durable state

    @staticmethod
    def _exec(tx: _Tx, sql: str, args: dict[str, Any]) -> None:
        tx.cur.execute(sql, args)

    @staticmethod
    def _scalar(tx: _Tx, sql: str, args: dict[str, Any]) -> Any:
        row = tx.cur.execute(sql, args).fetchone()
        return None if row is None else row[0]

    async def get_periodic(self, name: str) -> float | None:
        stored = await self._call(self._scalar, Q.GET_PERIODIC, {"name": name}, write=False)
        return self._run_rows.periodic_fire(name, stored, self.clock())

    async def set_periodic(self, name: str, fired_at: float) -> None:
        await self._call(self._exec, Q.SET_PERIODIC, {"name": name, "fired_at": fired_at})

    async def claim_periodic(self, name: str, slot: float, gap: float = 0.0) -> bool:
        values = {"name": name, "slot": float(slot), "gap": float(gap), "latest": float(slot) + FIRE_AHEAD}
        return await self._call(self._scalar, Q.CLAIM_PERIODIC, values) is not None

    def claim_periodic_run(
        self, name: str, slot: float, gap: float, run: NewRun, *, max_pending: int | None = None
    ) -> asyncio.Future[list[Inserted]]:
        values = {"name": name, "slot": float(slot), "gap": float(gap), "latest": float(slot) + FIRE_AHEAD}
        return self._call(self._claim_periodic_run, values, run, self.clock(), max_pending)

    def _claim_periodic_run(
        self, tx: _Tx, values: dict[str, Any], run: NewRun, now: float, max_pending: int | None
    ) -> list[Inserted]:
        if self._scalar(tx, Q.CLAIM_PERIODIC, values) is None:
            return []
        going = self._scalar(tx, Q.UNFINISHED_OF_TASK, {"task": run.task})
        if going is not None:
            return [Inserted(going, False)]  # the slot passes: that run is still going
        return self._insert(tx, [run], now, max_pending)  # a full queue rolls the claim back with it

    async def adopt_trigger(
        self, trigger: str, incarnation: str, *, own: bool = False
    ) -> dict[str, TriggerKeyRecord]:
        return await self._call(self._adopt_trigger, trigger, incarnation, own)  # type: ignore[no-any-return]

    def _adopt_trigger(self, tx: _Tx, trigger: str, incarnation: str, own: bool) -> dict[str, TriggerKeyRecord]:
        # one write transaction (BEGIN IMMEDIATE): no other process takes or saves rows meanwhile
        cur = tx.cur
        holders = [h for (h,) in cur.execute(Q.TRIGGER_HOLDERS, {"trigger": trigger}).fetchall()]
        nodes = self._run_rows.nodes(cur.execute(Q.ALL_NODES).fetchall())
        gone = gone_incarnations(nodes.nodes, self.clock(), self.node_ttl)
        known = nodes.known
        taking = trigger_holders_taken(holders, incarnation, own, known, gone)
        if not taking:
            return {}
        rows: list[tuple[str, TriggerKeyRecord]] = []
        for holder in taking:
            found = cur.execute(Q.HELD_TRIGGER_KEYS, {"trigger": trigger, "holder": holder}).fetchall()
            rows.extend((r[0], rec) for r in found if (rec := self._run_rows.trigger_key(trigger, r[0], r[1:])) is not None)
            cur.execute(Q.FORGET_TRIGGER_HOLDER, {"trigger": trigger, "holder": holder})
        taken = merge_taken(rows)
        keep: list[dict[str, Any]] = []
        for key, rec in taken.items():
            if not own:
                had = cur.execute(Q.HELD_TRIGGER_KEY, {"trigger": trigger, "holder": incarnation, "key": key}).fetchone()
                mine = None if had is None else self._run_rows.trigger_key(trigger, key, had)
                if mine is not None:
                    rec = merge_trigger_records(mine, rec)
            keep.append({"trigger": trigger, "holder": incarnation, "key": key, "nonce": None, **rec.model_dump()})
        cur.executemany(Q.SAVE_TRIGGER_KEY, keep)
        return taken

    async def trigger_keys_elsewhere(self, trigger: str, incarnation: str) -> set[str]:
        values = {"trigger": trigger, "holder": incarnation}
        return await self._call(self._keys_of, Q.TRIGGER_KEYS_ELSEWHERE, values, write=False)  # type: ignore[no-any-return]

    async def trigger_keys_held(self, trigger: str, incarnation: str) -> set[str]:
        values = {"trigger": trigger, "holder": incarnation}
        return await self._call(self._keys_of, Q.TRIGGER_KEYS_HELD, values, write=False)  # type: ignore[no-any-return]

    @staticmethod
    def _keys_of(tx: _Tx, sql: str, values: dict[str, Any]) -> set[str]:
        return {key for (key,) in tx.cur.execute(sql, values)}

    async def save_trigger(
        self, trigger: str, incarnation: str, keys: Mapping[str, TriggerKeyRecord], forget: Collection[str] = (),
        *, held: Collection[str] = (),
    ) -> set[str]:
        if not keys and not forget:
            return set()
        return await self._call(self._save_trigger, *trigger_save(trigger, incarnation, keys, forget, held))  # type: ignore[no-any-return]

    @staticmethod
    def _save_trigger(tx: _Tx, rows: list[dict[str, Any]], gone: list[dict[str, Any]], held: list[str]) -> set[str]:
        cur = tx.cur
        cur.executemany(Q.FORGET_TRIGGER_KEY, gone)
        taken: set[str] = set()
        if held and rows:
            # (the write transaction keeps takers out until it ends: a row there now stays there)
            where = {"trigger": rows[0]["trigger"], "holder": rows[0]["holder"]}
            taken = {key for key in held if cur.execute(Q.HELD_TRIGGER_KEY, {**where, "key": key}).fetchone() is None}
            if taken:
                rows = [row for row in rows if row["key"] not in taken]
        cur.executemany(Q.SAVE_TRIGGER_KEY, rows)
        return taken

    @staticmethod
    def _exec_many(tx: _Tx, sql: str, rows: list[dict[str, Any]]) -> None:
        tx.cur.executemany(sql, rows)

    # ---------------------------------------------------------------- queue jobs

    def put_jobs(self, queue: str, incarnation: str, jobs: Sequence[Any]) -> asyncio.Future[list[int]]:
        # the writer's future itself, no coroutine around it (see Store.put_jobs)
        if not jobs:
            done: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
            done.set_result([])
            return done
        encoded = [_dumps(job) for job in jobs]  # before the writer thread: a bad job fails only its caller
        return self._call(self._put_jobs, queue, incarnation, encoded)

    def _put_jobs(self, tx: _Tx, queue: str, incarnation: str, encoded: list[str]) -> list[int]:
        now = self.clock()
        return [
            tx.cur.execute(Q.PUT_JOB, {"queue": queue, "job": job, "incarnation": incarnation, "now": now}).fetchone()[0]
            for job in encoded
        ]

    async def done_jobs(self, ids: Sequence[int]) -> None:
        if ids:
            await self._call(self._exec_many, Q.DONE_JOB, [{"id": i} for i in ids])

    async def adopt_jobs(self, queue: str, incarnation: str, *, own: bool = False) -> list[StoredJob]:
        return await self._call(self._adopt_jobs, queue, incarnation, own)  # type: ignore[no-any-return]

    def _adopt_jobs(self, tx: _Tx, queue: str, incarnation: str, own: bool) -> list[StoredJob]:
        cur = tx.cur
        nodes = self._run_rows.nodes(cur.execute(Q.ALL_NODES).fetchall())
        gone = gone_incarnations(nodes.nodes, self.clock(), self.node_ttl)
        known = nodes.known
        out: list[StoredJob] = []
        for job_id, job, holder, handovers in cur.execute(_QUEUE_JOBS, {"queue": queue}).fetchall():
            if adoptable(holder, incarnation, own, known, gone):
                if holder != incarnation:
                    cur.execute(Q.ADOPT_JOB, {"incarnation": incarnation, "id": job_id})
                    # (one changed by hand into no count counts none: the store's own + 1 made it 1)
                    handovers = (handovers if type(handovers) is int else 0) + 1
                out.append(stored_job(job_id, job, handovers))
        return out

