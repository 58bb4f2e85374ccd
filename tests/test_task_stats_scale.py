"""The Tasks tab at scale: a queue deeper than the runs its book keeps whole still counts each
run once, and a dashboard with many tasks builds only the rows of tasks whose figures moved,
and none while the tab is hidden (it catches up when shown).

The book is fed events directly; the tab is driven on the real app with Pilot against an
in-process engine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from taskwatch.engine import Engine, RunError, RunRecord, RunStatus, TaskContext
from taskwatch.engine import events as ev
from taskwatch.tui.task_stats import TaskStatsBook, TaskTally
from taskwatch.widgets import TaskStatsTable

from .helpers import eventually
from .test_dashboard import make_engine
from .test_dashboard_use import LARGE, cell_text, dashboard

# ---------------------------------------------------------------- each run counted once


def figures(book: TaskStatsBook, task: str = "t") -> tuple[int, int, int, int]:
    t = book.tallies[task]
    return t.submitted, t.succeeded, t.failed, t.cancelled


def test_runs_of_a_queue_deeper_than_a_hundred_thousand_are_each_counted_once() -> None:
    # the book let go of open runs past 100,000: each was counted as submitted again when it
    # was next heard of (110,000 submitted read 115,000 once the oldest 5,000 were cancelled)
    book = TaskStatsBook()
    deep = 110_000
    for i in range(deep):
        book.on_event("run.submitted", ev.RunSubmitted(run_id=f"r{i}", task="t", ts=float(i)))
    assert figures(book) == (deep, 0, 0, 0)

    # the oldest are cancelled, started and finished, retried: none is counted as submitted again
    for i in range(5_000):
        book.on_event("run.cancelled", ev.RunCancelled(run_id=f"r{i}", task="t", ts=200_000.0 + i))
    for i in range(5_000, 5_010):
        book.on_event("run.started", ev.RunStarted(run_id=f"r{i}", task="t", ts=300_000.0 + i))
        book.on_event("run.succeeded", ev.RunSucceeded(run_id=f"r{i}", task="t", ts=300_001.0 + i, duration=1.0))
    error = RunError(type="E", message="m")
    book.on_event("run.retrying", ev.RunRetrying(run_id="r5010", task="t", ts=400_000.0, attempt=2, delay=0.0, error=error))
    book.on_event("run.failed", ev.RunFailed(run_id="r5010", task="t", ts=400_001.0, attempt=2, error=error))
    assert figures(book) == (deep, 10, 1, 5_000)
    assert book.tallies["t"].retried == 1

    # a reload's snapshot listing one of them as ended counts its end, not a second submission
    record = RunRecord(id="r5012", task="t", status=RunStatus.SUCCEEDED, created_at=5012.0, started_at=5e5, finished_at=5e5 + 1)
    book.seed([record], now=5e5 + 2)
    assert figures(book) == (deep, 11, 1, 5_000)

    # a run never heard of before is still counted when first heard of
    book.on_event("run.started", ev.RunStarted(run_id="late", task="t", ts=6e5))
    assert figures(book) == (deep + 1, 11, 1, 5_000)


def test_a_failure_from_a_deep_queue_is_counted_once_however_many_reloads_list_it() -> None:
    # snapshots list the newest failures however old: a failed run the book had forgotten
    # among its ended runs must be taken as counted at each reload, not failed again
    book = TaskStatsBook()
    error = RunError(type="ValueError", message="m")
    for i in range(100_050):
        book.on_event("run.submitted", ev.RunSubmitted(run_id=f"r{i}", task="import", ts=float(i)))
    failed = "r5"  # among the oldest: 100,000 runs queued behind it
    book.on_event("run.failed", ev.RunFailed(run_id=failed, task="import", ts=2e5, error=error))
    for i in range(100, 100 + book.remember + 10):  # enough runs end after it that it is let go
        book.on_event("run.cancelled", ev.RunCancelled(run_id=f"r{i}", task="import", ts=3e5 + i))
    record = RunRecord(
        id=failed, task="import", status=RunStatus.FAILED, created_at=5.0, started_at=2e5 - 1, finished_at=2e5, error=error
    )
    for _ in range(3):
        book.seed([record], now=4e5)
    tally = book.tallies["import"]
    assert (tally.submitted, tally.failed, tally.cancelled) == (100_050, 1, book.remember + 10)


# ---------------------------------------------------------------- many tasks on the real app

TASKS = [f"t{i:02}" for i in range(30)]


def many_tasks_engine() -> Engine:
    engine = make_engine()
    for name in TASKS:

        @engine.task(name=name)
        async def quick(ctx: TaskContext) -> None:
            return None

    return engine


@pytest.fixture
def rows_built(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tasks whose figures were built for the Tasks tab, one entry each time."""
    built: list[str] = []
    fields = TaskTally.fields

    def counting(self: TaskTally) -> dict[str, Any]:
        built.append(self.task)
        return fields(self)

    monkeypatch.setattr(TaskTally, "fields", counting)
    return built


def shows(stats: TaskStatsTable, task: str, submitted: int, succeeded: int) -> Callable[[], bool]:
    def check() -> bool:
        return (
            task in stats.shown_keys
            and cell_text(stats, task, "submitted") == str(submitted)
            and cell_text(stats, task, "succeeded") == str(succeeded)
        )

    return check


async def run_each(engine: Engine, tasks: list[str]) -> None:
    for handle in [await engine.submit(name) for name in tasks]:
        await handle.wait(10)


async def test_a_hidden_tasks_tab_builds_no_rows_and_shows_the_current_figures_once_shown(rows_built: list[str]) -> None:
    engine = many_tasks_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        stats = app.main.query_one(TaskStatsTable)
        book = app.state.task_stats
        await run_each(engine, TASKS)
        # the dashboard heard every end, and overviews came after (each refreshes the tables)
        await eventually(lambda: sum(t.succeeded for t in book.tallies.values()) == len(TASKS))
        for _ in range(2):
            await app.refresh_overview().wait()
        assert app.active_tab == "runs"
        assert rows_built == [] and stats.row_count == 0

        await pilot.press("6")
        await eventually(lambda: all(shows(stats, task, 1, 1)() for task in TASKS))
        assert sorted(rows_built) == TASKS  # each built once, when shown

        # hidden again: runs of two tasks end, nothing is built until the tab is back
        await pilot.press("1")
        rows_built.clear()
        await run_each(engine, ["t03", "t03", "t17"])
        await eventually(lambda: book.tallies["t03"].succeeded == 3 and book.tallies["t17"].succeeded == 2)
        await app.refresh_overview().wait()
        assert rows_built == []
        assert shows(stats, "t03", 1, 1)()  # (as it was when hidden)
        await pilot.press("6")
        await eventually(shows(stats, "t03", 3, 3))
        assert shows(stats, "t17", 2, 2)() and shows(stats, "t04", 1, 1)()
        assert sorted(set(rows_built)) == ["t03", "t17"]


async def test_the_tasks_tab_rebuilds_only_the_rows_of_tasks_whose_figures_changed(
    rows_built: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = many_tasks_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        await pilot.press("6")
        stats = app.main.query_one(TaskStatsTable)
        await run_each(engine, TASKS)
        await eventually(lambda: all(shows(stats, task, 1, 1)() for task in TASKS))

        rows_built.clear()
        cells_updated: list[str] = []
        update_cell = stats.update_cell

        def counting_update_cell(row_key: Any, column_key: Any, value: Any, **options: Any) -> None:
            cells_updated.append(str(row_key))
            update_cell(row_key, column_key, value, **options)

        monkeypatch.setattr(stats, "update_cell", counting_update_cell)
        await run_each(engine, ["t07"])
        await eventually(shows(stats, "t07", 2, 2))
        for _ in range(2):
            await app.refresh_overview().wait()  # overviews with nothing new build nothing either
        assert set(rows_built) == {"t07"}
        assert len(rows_built) <= 3  # its submission, start and end: at most one build each
        assert set(cells_updated) == {"t07"}
        assert all(shows(stats, task, 1, 1)() for task in TASKS if task != "t07")
