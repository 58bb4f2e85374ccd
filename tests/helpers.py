"""Shared test helpers: bounded polling instead of sleeping, event collection, and a table taken
away from under an engine's SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest
from taskwatch.engine import BaseEvent, Engine

S = TypeVar("S")


async def eventually(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.005) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``
    (generous: a passing test returns as soon as it holds, and these machines are shared)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)


async def screen_shown(app: Any, kind: type[S], *, other_than: object = None, timeout: float = 10.0) -> S:
    """The app's screen once it is a ``kind`` and mounted. A pushed screen is ``app.screen``
    before it has composed its widgets, so a query made on it at once can miss them."""

    def ready() -> S | None:
        screen = app.screen
        if isinstance(screen, kind) and screen is not other_than and screen.is_mounted:
            return screen
        return None

    result: S = await eventually(ready, timeout=timeout)
    return result


async def swallowing_every_cancel(until: asyncio.Event) -> None:
    """Wait for ``until``, swallowing every cancel meanwhile: a bug in a task or handler (a retry
    loop with ``except BaseException``, say), which a stop gives up on and the engine outlasts."""
    while not until.is_set():
        try:
            await until.wait()
        except asyncio.CancelledError:
            pass


class Recorder:
    """Records every event an engine publishes (a synchronous bus callback)."""

    def __init__(self, engine: Engine, kinds: tuple[str, ...] | None = None) -> None:
        self.events: list[BaseEvent] = []
        self._unsubscribe = engine.bus.add_callback(self.events.append, kinds)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]  # type: ignore[attr-defined]

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.kind == kind]  # type: ignore[attr-defined]

    def close(self) -> None:
        self._unsubscribe()


class Gauge:
    """How many task bodies are inside :meth:`hold` now, and the most there ever were."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    async def hold(self, gate: asyncio.Event) -> None:
        """Count this body in until ``gate`` is set."""
        self.now += 1
        self.peak = max(self.peak, self.now)
        try:
            await gate.wait()
        finally:
            self.now -= 1


def stray_tasks() -> set[asyncio.Task[Any]]:
    """Tasks still alive on this loop other than the current one."""
    current = asyncio.current_task()
    return {t for t in asyncio.all_tasks() if t is not current and not t.done()}


def server_missing(message: str) -> NoReturn:
    """A database server a test needs is not installed: skip, but fail under CI (``CI`` set to true, 1 or yes)."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(message + " (CI: a missing server is a failure)", pytrace=False)
    pytest.skip(message)


def taskwatch_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("taskwatch-")}


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll from a plain thread (no event loop here) with a bounded wait."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)


def in_thread(call: Callable[[], Any]) -> Any:
    """What ``call`` returns or raises in a thread of its own."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - handed to the test as it was raised
            out["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join(10)
    assert not thread.is_alive()
    return out.get("error", out.get("value"))


@contextlib.asynccontextmanager
async def table_away(path: Path, table: str) -> AsyncIterator[None]:
    """Another process renames ``table`` of the engine's file while inside (a migration, an
    operator): the engine's reads and writes of it fail until it is back."""
    other = sqlite3.connect(path, timeout=10, isolation_level=None, check_same_thread=False)
    try:
        await asyncio.to_thread(other.execute, f"ALTER TABLE {table} RENAME TO {table}_away")
        try:
            yield
        finally:
            await asyncio.to_thread(other.execute, f"ALTER TABLE {table}_away RENAME TO {table}")
    finally:
        other.close()


def each_store(kind: str, request: pytest.FixtureRequest, tmp_path: Path, clock: Callable[[], float], lease_ttl: float) -> Any:
    """A run store of ``kind`` ("memory", "sqlite": a real file, "postgres": a fresh database on
    the test server), on ``clock``: what a store fixture parametrized over the three opens."""
    from taskwatch.engine.store import MemoryStore, PostgresStore, SqliteStore

    if kind == "memory":
        return MemoryStore(clock=clock, lease_ttl=lease_ttl)
    if kind == "sqlite":
        return SqliteStore(tmp_path / "runs.db", clock=clock, lease_ttl=lease_ttl)
    return PostgresStore(request.getfixturevalue("postgres_url"), clock=clock, lease_ttl=lease_ttl)


def stubborn_leader_engine(
    node_id: str,
    lease: Any,
    cleanup_may_end: asyncio.Event,
    swallowed: list[str],
    started: Callable[[str], object],
    ended: Callable[[str], object] = lambda node_id: None,
) -> Engine:
    """An engine on ``lease`` whose leader-only worker "poller" waits until it is cancelled,
    then cleans up until ``cleanup_may_end`` is set, swallowing every cancel meanwhile (each
    one noted in ``swallowed``): a bug in a worker, which the engine must outlast. ``started``
    and ``ended`` are told the node id as the worker starts and as its cleanup ends."""
    engine = Engine(node_id=node_id, lease=lease, cancel_grace=0.05, health_interval=None)

    @engine.supervised(name="poller", leader_only=True)
    async def poller(ctx: Any) -> None:
        started(node_id)
        try:
            await asyncio.Event().wait()
        finally:
            while not cleanup_may_end.is_set():
                try:
                    await cleanup_may_end.wait()
                except asyncio.CancelledError:
                    swallowed.append(node_id)
            ended(node_id)

    return engine


def leader_contexts(lease: Any) -> tuple[Engine, list[Any]]:
    """An engine (node "a") on ``lease`` whose leader-only worker keeps the context of each of
    its starts in the list returned, and waits: what a test calls ``ensure_leader()`` from."""
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    contexts: list[Any] = []

    @engine.supervised(name="guarded", leader_only=True, backoff=0.05)
    async def guarded(ctx: Any) -> None:
        contexts.append(ctx)
        await asyncio.Event().wait()

    return engine, contexts
