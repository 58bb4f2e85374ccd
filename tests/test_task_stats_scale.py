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


def test_runs_older_than_the_open_runs_kept_whole_are_counted_once_when_they_end() -> None:
    # 50 runs queued with room for 10 open runs: the oldest 40 are let go of as more come
    book = TaskStatsBook(remember_open=10)
    for i in range(50):
        book.on_event("run.submitted", ev.RunSubmitted(run_id=f"r{i}", task="t", ts=float(i)))
    assert figures(book) == (50, 0, 0, 0)

    # the oldest are cancelled, started and finished, retried: none is counted as submitted again
    for i in range(20):
        book.on_event("run.cancelled", ev.RunCancelled(run_id=f"r{i}", task="t", ts=100.0 + i))
    for i in range(20, 30):
        book.on_event("run.started", ev.RunStarted(run_id=f"r{i}", task="t", ts=200.0 + i))
        book.on_event("run.succeeded", ev.RunSucceeded(run_id=f"r{i}", task="t", ts=201.0 + i, duration=1.0))
    error = RunError(type="E", message="m")
    book.on_event("run.retrying", ev.RunRetrying(run_id="r30", task="t", ts=300.0, attempt=2, delay=0.0, error=error))
    book.on_event("run.failed", ev.RunFailed(run_id="r30", task="t", ts=301.0, attempt=2, error=error))
    assert figures(book) == (50, 10, 1, 20)
    assert book.tallies["t"].retried == 1

    # a reload's snapshot listing one of them as ended counts its end, not a second submission
    record = RunRecord(id="r32", task="t", status=RunStatus.SUCCEEDED, created_at=32.0, started_at=400.0, finished_at=401.0)
    book.seed([record], now=402.0)
    assert figures(book) == (50, 11, 1, 20)

    # a run never heard of before is still counted when first heard of
    book.on_event("run.started", ev.RunStarted(run_id="late", task="t", ts=500.0))
    assert figures(book) == (51, 11, 1, 20)


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
