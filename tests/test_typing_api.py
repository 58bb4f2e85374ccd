"""The public API as a user's type checker reads it: an event's ``kind``, a remote command's
``sent``, ``BackgroundEngine.call``'s result, the widgets' inputs, the runs query's ``Page``;
and what the typing promises at run time (a ``CommandTimeout`` is a ``TimeoutError``; the
tables take any iterable, a generator too)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import taskwatch.engine
import taskwatch.tui
import taskwatch.widgets
from taskwatch.engine import ClusterNode, CommandTimeout, PeriodicInfo, QueueInfo, RemoteEngine, TaskwatchError
from taskwatch.widgets import NodesTable, QueuesTable, ScheduleTable
from textual.app import App, ComposeResult
from textual.widget import Widget

from .helpers import eventually
from .test_attach import ServeFn, frozen, serve  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent

#: kept between runs: a cold check reads pydantic's and Textual's hints for seconds
USER_CACHE = ROOT / ".mypy_cache" / "user-api-program"

#: a user's program reading what the README says the API gives
USER_PROGRAM = '''\
from __future__ import annotations

import time
from typing import Any, assert_type

from taskwatch.engine import (
    CommandTimeout,
    ConnectionClosed,
    Engine,
    MessageTooLarge,
    Page,
    QueuePurge,
    RemoteEngine,
    RunEvent,
    StoredRun,
    WorkQueue,
)
from taskwatch.widgets import EventLog, FailuresList, ScheduleTable
from textual.app import App

engine = Engine()


async def handler(job: dict[str, Any]) -> None: ...


class Dashboard(App[None]):
    def on_event_log_event_chosen(self, message: EventLog.EventChosen) -> None:
        assert_type(message.event.kind, str)
        if isinstance(message.event, RunEvent):
            print(message.event.kind, message.event.run_id)
        chosen = self.query_one(EventLog).chosen
        if chosen is not None and chosen.kind == "run.failed":
            print(chosen.seq)

    async def show_failures(self) -> None:
        page = await engine.query_runs(status="failed", limit=200)
        assert_type(page, Page)
        assert_type(page.runs, list[StoredRun])
        self.query_one(FailuresList).update(page.runs, engine.workers())
        due = (info for info in engine.schedule() if info.enabled)
        self.query_one(ScheduleTable).update_schedule(due, time.time())


def in_a_thread() -> None:
    bg = engine.start_background()
    queue = bg.call(lambda e: e.queue("q", handler))
    assert_type(queue, WorkQueue)
    queue.put_nowait({"a": 1})
    assert_type(bg.call(Engine.purge_queue, "q"), QueuePurge)


async def in_another_loop() -> None:
    bg = engine.start_background()
    assert_type(await bg.acall(Engine.purge_queue, "q"), QueuePurge)
    assert_type(await bg.acall(lambda e: e.queue("q2", handler)), WorkQueue)


async def remote_submit(address: str) -> None:
    async with RemoteEngine(address) as remote:
        try:
            await remote.submit("embed_batch", {"user_id": "u1"})
        except (CommandTimeout, ConnectionClosed, MessageTooLarge) as exc:
            if not exc.sent:
                await remote.submit("embed_batch", {"user_id": "u1"})
            raise
'''


def installed_layout(base: Path) -> Path:
    """``taskwatch/engine`` and the others as an install lays them out, linked to the packages
    imported here (the venv's editable install maps them with an import hook mypy does not run)."""
    site = base / "site"
    (site / "taskwatch").mkdir(parents=True)
    for package in (taskwatch.engine, taskwatch.widgets, taskwatch.tui):
        folder = Path(package.__file__ or "").parent
        (site / "taskwatch" / folder.name).symlink_to(folder, target_is_directory=True)
    return site


def test_a_users_program_reads_the_api_under_mypy_strict(tmp_path: Path) -> None:
    site = installed_layout(tmp_path)
    # errors inside the package are not the user's: mypy hides them for an installed package too
    (tmp_path / "mypy.ini").write_text(
        f"[mypy]\nmypy_path = {site}\n\n[mypy-taskwatch.*]\nfollow_imports = silent\n"
    )
    (tmp_path / "user.py").write_text(USER_PROGRAM)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini",
         "--cache-dir", str(USER_CACHE), "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_remote_command_timing_out_is_a_timeout_error_saying_it_was_sent(
    serve: ServeFn, tmp_path: Path
) -> None:
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    async with RemoteEngine(served.address, timeout=0.5) as remote:
        caught: TimeoutError | None = None
        with frozen(served):
            try:
                await remote.ping()
            except TimeoutError as exc:  # as code written for the builtin one catches it
                caught = exc
        assert isinstance(caught, CommandTimeout) and isinstance(caught, TaskwatchError)
        assert caught.sent is True
        assert "'ping' was sent" in str(caught)


class Host(App[None]):
    def __init__(self, widget: Widget) -> None:
        super().__init__()
        self.widget = widget

    def compose(self) -> ComposeResult:
        yield self.widget


def _periodic(name: str) -> PeriodicInfo:
    return PeriodicInfo(name=name, trigger="every 1s", trigger_kind="interval", enabled=True)


def _queue(name: str) -> QueueInfo:
    return QueueInfo(name=name, concurrency=1, maxsize=0, depth=0, in_flight=0, processed=0, failed=0)


#: a table and how to fill it with the rows "a" and "b" given by a generator
FROM_GENERATORS: list[tuple[type[Any], Callable[[Any, Iterator[Any]], None], Callable[[str], Any]]] = [
    (ScheduleTable, lambda t, rows: t.update_schedule(rows, 0.0), _periodic),
    (QueuesTable, lambda t, rows: t.update_queues(rows), _queue),
    (NodesTable, lambda t, rows: t.update_nodes(rows, 0.0), lambda name: ClusterNode(node=name)),
]


@pytest.mark.parametrize(("cls", "fill", "make"), FROM_GENERATORS, ids=lambda v: getattr(v, "__name__", ""))
async def test_a_table_given_a_generator_shows_every_row(
    cls: type[Any], fill: Callable[[Any, Iterator[Any]], None], make: Callable[[str], Any]
) -> None:
    table = cls()
    async with Host(table).run_test(size=(140, 20)) as pilot:
        fill(table, (make(name) for name in "ab"))
        await eventually(lambda: table.row_count == 2)
