"""Errors raised by the run stores (to move into ``engine/errors.py`` later).

Every one derives from :class:`taskwatch.engine.errors.TaskwatchError`; a full
pending queue raises the engine's own :class:`QueueFull`, so callers catch the
same error whichever store the engine runs on.
"""

from __future__ import annotations

from ..errors import TaskwatchError


class StoreError(TaskwatchError):
    """Base class of the errors a run store raises."""


class UnknownStore(StoreError, ValueError):
    """``make_store`` was given a spec it does not understand."""

    def __init__(self, spec: object, detail: str = "") -> None:
        self.spec = spec
        super().__init__(
            f"unknown run store {spec!r}{': ' + detail if detail else ''}; use 'memory', "
            "'sqlite:///relative/path.db', 'sqlite:////absolute/path.db' (optionally "
            "'?synchronous=full&busy_timeout=5000'), 'postgresql://user@host/database' "
            "(optionally '?pool_size=8') or pass a Store instance"
        )


class StoreDriverMissing(StoreError, ImportError):
    """The store asked for needs a database driver that is not installed."""

    def __init__(self, store: str, driver: str, extra: str) -> None:
        self.extra = extra
        super().__init__(
            f"the {store} run store needs the {driver} driver, which is not installed; "
            f"install it with: pip install 'taskwatch[{extra}]'"
        )


class SchemaTooNew(StoreError):
    """The database was written by a newer taskwatch than this one."""

    def __init__(self, where: str, found: int, supported: int) -> None:
        self.where = where
        self.found = found
        self.supported = supported
        super().__init__(
            f"the run store {where} has schema version {found}, but this taskwatch only knows "
            f"versions up to {supported}; upgrade taskwatch (pip install -U taskwatch) on every "
            "node that opens it. Nothing was changed"
        )


class StoreClosed(StoreError, RuntimeError):
    """An operation reached a store that is not open."""

    def __init__(self, where: str) -> None:
        super().__init__(
            f"the run store {where} is not open; use `async with store:` or `await store.open()` first"
        )


class StoreBusy(StoreError):
    """Another process held the database's write lock longer than ``busy_timeout``."""

    def __init__(self, where: str, timeout_ms: int) -> None:
        super().__init__(
            f"the run store {where} stayed locked by another process for more than {timeout_ms} ms; "
            "nothing was written. Retry, raise busy_timeout (sqlite:///...?busy_timeout=MS), or "
            "check for a process holding a long transaction"
        )


class StoreUnavailable(StoreError):
    """The store's backend failed (disk full, file removed, I/O error); ``__cause__`` says how."""

    def __init__(self, where: str, detail: str, advice: str = "Check the disk and the file, then restart the engine") -> None:
        super().__init__(f"the run store {where} failed: {detail}; the operation was not applied. {advice}")


class DuplicateRunId(StoreError, ValueError):
    """``insert`` was given an explicit id that a stored run already has."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"a run with id {run_id!r} is already stored; nothing was inserted. "
            "Ids must be unique: leave NewRun.id unset for a random one"
        )
