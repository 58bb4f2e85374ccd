"""The dashboard where a review found it wanting: an engine with nothing to submit, text from
tasks that reads as markup in a tooltip or a message, a params validator raising what nobody
expected, the empty choice of a string enum, the Tasks tab after dropped events, the header's
indicators on a narrow terminal, a running run's detail redrawn for nothing, and ``t`` where
it can do nothing.

Every test drives the real app with Pilot on a live engine (the header's is a widget test).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

from pydantic import BaseModel, Field
from taskwatch.engine import Engine, RunStatus, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.screens import SubmitScreen, TracebackScreen
from taskwatch.widgets import (
    CountsBar,
    EventLog,
    ParamsForm,
    RunDetail,
    ScheduleTable,
    TaskStatsTable,
)
from textual.pilot import Pilot
from textual.widgets import Select, Static
from textual.widgets._footer import FooterKey
from textual.widgets._toast import Toast
from textual.widgets._tooltip import Tooltip

from .helpers import eventually, screen_shown
from .test_dashboard import make_engine, open_submit, shown_status, table
from .test_dashboard_use import (
    LARGE,
    cell_text,
    dashboard,
    notes,
    visible,
    visible_text,
)
from .test_widgets import Host


@asynccontextmanager
async def watching(
    engine: Engine, *, size: tuple[int, int] = LARGE, tooltips: bool = False, notifications: bool = False,
    buffer: int | None = None, **app_options: Any,
) -> AsyncIterator[tuple[TaskwatchApp, Pilot]]:
    """The dashboard on ``engine`` (any node id), with tooltips or toasts drawn, or a small event buffer."""
    app_options.setdefault("refresh_hz", 30.0)
    app_options.setdefault("overview_interval", 0.2)
    client = LocalClient(engine, manage=True) if buffer is None else LocalClient(engine, manage=True, buffer=buffer)
    app = TaskwatchApp(client, **app_options)
    async with app.run_test(size=size, tooltips=tooltips, notifications=notifications) as pilot:
        await eventually(lambda: app.state.node_id == engine.node_id)
        await pilot.pause()
        yield app, pilot


def error_line(screen: SubmitScreen) -> str:
    return str(screen.query_one("#submit-error", Static).content)


def toasts(app: TaskwatchApp) -> list[str]:
    """The notifications as drawn."""
    return [toast.render().plain for toast in app.screen.query(Toast)]


# ---------------------------------------------------------------- nothing to submit


async def test_s_on_an_engine_with_only_periodic_tasks_opens_a_dialog_that_says_so() -> None:
    engine = Engine(node_id="periodic-only", health_interval=None)

    @engine.periodic(every=3600.0, initial_delay=3600.0, name="cleanup")
    async def cleanup(ctx: TaskContext) -> None:
        return None

    async with watching(engine) as (app, pilot):
        await eventually(lambda: [t.name for t in app.state.tasks] == ["cleanup"])
        await pilot.press("s")
        dialog = await screen_shown(app, SubmitScreen)
        await pilot.pause()
        said = error_line(dialog)
        assert "no submittable tasks" in said and "cleanup" in said
        assert dialog.query_one("#submit-ok").disabled
        await pilot.press("escape")
        await eventually(lambda: app.screen is app.main)
        assert app.is_running and app._exception is None


async def test_s_on_a_connected_engine_with_only_a_queue_and_a_worker_never_says_not_connected() -> None:
    engine = Engine(node_id="no-tasks", health_interval=None)

    class Job(BaseModel):
        n: int

    @engine.supervised(name="watcher")
    async def watcher(ctx: Any) -> None:
        await asyncio.Event().wait()

    async def handle(job: Job) -> None:
        return None

    engine.queue("jobs", handle)
    async with watching(engine) as (app, pilot):
        await eventually(lambda: app.state.queues and app.state.workers)
        await pilot.press("s")
        dialog = await screen_shown(app, SubmitScreen)
        await pilot.pause()
        assert "no submittable tasks" in error_line(dialog)
        assert not any("not connected" in note for note in notes(app))
        await pilot.press("escape")
        await eventually(lambda: app.screen is app.main)
        assert app.is_running


# ---------------------------------------------------------------- text that reads as markup


class OutParams(BaseModel):
    path: str = Field(description="output dir, e.g. [/tmp/out] or [bold]here[/bold]")


async def test_a_field_description_that_reads_as_markup_shows_as_written_in_its_tooltip() -> None:
    engine = Engine(node_id="tooltips", health_interval=None)

    @engine.task(name="copy")
    async def copy(ctx: TaskContext, params: OutParams) -> None:
        return None

    async with watching(engine, tooltips=True) as (app, pilot):
        screen = await open_submit(app, pilot, "copy")
        await pilot.hover(".params-form--label")
        tooltip = screen.query_one(Tooltip)
        await eventually(lambda: tooltip.display and "tmp/out" in visible_text(tooltip))
        assert "output dir, e.g. [/tmp/out] or [bold]here[/bold]" in visible_text(tooltip)
        assert app.is_running and app._exception is None


async def test_messages_quoting_a_task_name_that_reads_as_markup_show_it_as_written() -> None:
    engine = Engine(node_id="loud", health_interval=None)

    @engine.task(name="[b]loud[/b]")
    async def loud(ctx: TaskContext) -> None:
        return None

    async with watching(engine, notifications=True) as (app, pilot):
        await open_submit(app, pilot, "[b]loud[/b]")
        await pilot.click("#submit-ok")
        await eventually(lambda: any("submitted [b]loud[/b] as run" in toast for toast in toasts(app)))


# ---------------------------------------------------------------- what nobody expected


class IdService:
    """Run ids from a service that, once it loses its table, raises KeyError (as a lookup
    does): the engine's ``run_id_factory``, called for every run a submit, retry or periodic
    "run now" makes."""

    def __init__(self) -> None:
        self.broken = False
        self.made = 0

    def __call__(self) -> str:
        if self.broken:
            raise KeyError("id-table")
        self.made += 1
        return f"run{self.made:06d}"


def id_engine(ids: IdService) -> Engine:
    engine = Engine(node_id="ids", health_interval=None, run_id_factory=ids)

    @engine.task(name="deploy")
    async def deploy(ctx: TaskContext) -> None:
        raise RuntimeError("no capacity")

    @engine.periodic(every=3600.0, initial_delay=3600.0, name="hourly")
    async def hourly(ctx: TaskContext) -> None:
        return None

    return engine


async def test_whatever_a_submit_raises_is_said_in_the_dialog_with_its_type_and_nothing_is_submitted() -> None:
    ids = IdService()
    engine = id_engine(ids)
    async with watching(engine) as (app, pilot):
        screen = await open_submit(app, pilot, "deploy")
        ids.broken = True
        await pilot.click("#submit-ok")
        await eventually(lambda: "KeyError" in error_line(screen) and not screen.query_one("#submit-ok").disabled)
        assert "not submitted: KeyError: 'id-table'" in error_line(screen)
        assert app.screen is screen and app.is_running and app._exception is None
        assert engine.runs(task="deploy") == []
        # the dialog still works once the engine does
        ids.broken = False
        # the error line moved the button down: its new place is laid out before it is clicked
        await pilot.pause()
        await pilot.click("#submit-ok")
        await eventually(lambda: app.screen is app.main and engine.runs(task="deploy"))


async def test_whatever_a_keys_command_raises_is_said_and_the_dashboard_keeps_running() -> None:
    ids = IdService()
    engine = id_engine(ids)
    async with watching(engine, confirm=False) as (app, pilot):
        failed = await (await engine.submit("deploy")).wait(2)
        assert failed.status is RunStatus.FAILED
        await eventually(lambda: shown_status(app, failed.id) == "failed")
        table(app).select_run(failed.id)
        ids.broken = True
        await pilot.press("r")  # retry: a new run, a new id
        await eventually(lambda: any(note.startswith("retry failed: KeyError") for note in notes(app)))
        # the Scheduler tab's "run now"
        await pilot.press("3")
        await eventually(lambda: app.main.query_one(ScheduleTable).selected_name == "hourly")
        await pilot.press("n")
        await eventually(lambda: any(note.startswith("run failed: KeyError") for note in notes(app)))
        # marked runs, each retried on its own
        await pilot.press("1")
        await pilot.press("space")
        await eventually(lambda: table(app).marked)
        await pilot.press("r")
        await eventually(lambda: any("retried 0 of 1 runs; 1 refused" in note and "KeyError" in note
                                     for note in notes(app)))  # fmt: skip
        assert app.is_running and app._exception is None
        assert [r.id for r in engine.runs(limit=None)] == [failed.id]


# ---------------------------------------------------------------- "" among a string enum's values


class JoinParams(BaseModel):
    sep: Literal["", ",", ";"] = ","  # "" is no separator
    mode: Literal["", "fast"]  # required; "" is a value like any other


async def test_the_empty_choice_of_a_string_enum_is_listed_visibly_and_submitted_as_picked() -> None:
    engine = Engine(node_id="joins", health_interval=None)

    @engine.task(name="join")
    async def join(ctx: TaskContext, params: JoinParams) -> str:
        return f"{params.sep!r} {params.mode!r}"

    async with watching(engine) as (app, pilot):
        screen = await open_submit(app, pilot, "join")
        form = screen.query_one(ParamsForm)
        sep, mode = form.field_widget("sep"), form.field_widget("mode")
        assert isinstance(sep, Select) and isinstance(mode, Select)
        assert sep.value == "," and mode.is_blank()
        # the "" choice is named, apart from the blank entry
        labels = [str(label) for label, value in sep._options if value == ""]
        assert labels and labels[0].startswith('""')
        sep.value = ""
        mode.value = ""
        await pilot.pause()
        assert form.collect() == {"sep": "", "mode": ""}
        await pilot.click("#submit-ok")
        await eventually(lambda: engine.runs(task="join"))
        assert engine.runs(task="join")[0].params == {"sep": "", "mode": ""}


# ---------------------------------------------------------------- the Tasks tab after dropped events

RUNS = 300


async def test_the_tasks_tab_is_corrected_by_the_reload_after_dropped_events_and_says_events_were_dropped() -> None:
    engine = Engine(node_id="flood", health_interval=None, max_concurrency=50)

    @engine.task(name="noop")
    async def noop(ctx: TaskContext) -> None:
        return None

    # a buffer this small overflows as the runs go by: the dashboard reloads from snapshots,
    # which list every run (fewer than max_rows)
    async with watching(engine, buffer=20) as (app, pilot):
        for handle in await engine.submit_many([("noop", None)] * RUNS):
            await handle.wait(10)
        await eventually(lambda: engine.stats().succeeded_total == RUNS)
        assert app.client.dropped > 0
        await pilot.press("6")
        stats = app.main.query_one(TaskStatsTable)

        def row() -> tuple[str, str]:
            return cell(stats, "submitted"), cell(stats, "succeeded")

        await eventually(lambda: row() == (str(RUNS), str(RUNS)), timeout=20)
        since = app.main.query_one("#task-stats-since", Static)
        await eventually(lambda: "events were dropped" in visible_text(since))


def cell(stats: TaskStatsTable, column: str) -> str:
    if "noop" not in stats.shown_keys:
        return ""
    return cell_text(stats, "noop", column)


# ---------------------------------------------------------------- the header on a narrow terminal


async def test_dropped_and_paused_stay_in_sight_however_narrow_the_header() -> None:
    bar = CountsBar()
    async with Host(bar).run_test(size=(40, 6)) as pilot:
        bar.update({"pending": 12, "running": 3}, dropped=123_456, paused=True,
                   totals={"succeeded": 10_000, "failed": 0, "cancelled": 0})  # fmt: skip
        await pilot.pause()
        line = visible(bar)
        assert "dropped 123,456 events" in line and "⏸ paused" in line
        # and shorter, when even they do not fit as they are
        bar.update({"pending": 12}, dropped=123_456, paused=True, view_paused_buffered=98_765)
        await pilot.pause()
        line = visible(bar)
        assert "dropped 123,456" in line and "paused (98,765" in line
    bar = CountsBar()
    async with Host(bar).run_test(size=(46, 6)) as pilot:
        bar.update({"pending": 1}, dropped=5, paused=True, totals={"succeeded": 2, "failed": 0, "cancelled": 0})
        await pilot.pause()
        line = visible(bar)
        assert "dropped 5 events" in line and "paused" in line and line.lstrip().startswith("pend")


# ---------------------------------------------------------------- a running run's detail


async def test_a_running_runs_detail_is_not_drawn_again_while_what_it_shows_stays_the_same() -> None:
    engine = make_engine()
    # a clock that stands still: the running run's duration shown does not change
    async with dashboard(engine, size=LARGE, clock=lambda: 1_900_000_000.0) as (app, pilot):
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")
        table(app).select_run(held.id)
        detail = app.main.query_one(RunDetail)
        await eventually(lambda: detail.record is not None and detail.record.id == held.id
                         and detail.record.progress.message == "holding")  # fmt: skip
        await pilot.pause()
        parts = ["#run-detail-summary", "#run-detail-attempts", "#run-detail-progress-message"]
        drawn = [detail.query_one(part, Static).content for part in parts]
        frames = app.frames
        await eventually(lambda: app.frames >= frames + 10)
        assert [detail.query_one(part, Static).content for part in parts] == drawn
        assert all(detail.query_one(part, Static).content is was for part, was in zip(parts, drawn, strict=True))
        # what changes is drawn: the run ends
        engine.resources["release"].set()
        await eventually(lambda: detail.record is not None and detail.record.status is RunStatus.SUCCEEDED)
        assert detail.query_one("#run-detail-summary", Static).content is not drawn[0]


# ---------------------------------------------------------------- t where it can act


def footer_keys(app: TaskwatchApp) -> set[str]:
    return {key.key for key in app.main.query(FooterKey)}


async def test_t_is_offered_only_where_it_shows_a_traceback_and_on_events_shows_a_failures() -> None:
    engine = make_engine()
    async with dashboard(engine, size=(160, 30)) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: shown_status(app, failed.id) == "failed")
        await eventually(lambda: "t" in footer_keys(app))
        for tab in ("4", "6"):  # Health, Tasks: no run, failure or worker to pick
            await pilot.press(tab)
            await eventually(lambda: "t" not in footer_keys(app) and "s" in footer_keys(app))
            await pilot.press("t")
            await pilot.pause()
            assert app.screen is app.main and not any("traceback" in note for note in notes(app))
        # Events: the failure under the cursor
        await pilot.press("5")
        await eventually(lambda: "t" in footer_keys(app))
        await pilot.press("slash", *"run.failed", "enter")
        log = app.main.query_one(EventLog)
        await eventually(lambda: log.chosen is not None and log.chosen.kind == "run.failed")
        await pilot.press("t")
        shown = await screen_shown(app, TracebackScreen)
        await pilot.pause()
        assert "kaboom in explode" in visible_text(shown.query_one("#traceback-title"))
        assert "raise ValueError" in visible_text(shown.query_one("#traceback-body"))


# ---------------------------------------------------------------- the cluster header


async def test_the_cluster_header_draws_a_stream_name_that_reads_as_markup_as_written() -> None:
    from taskwatch.engine import MemoryEventRelay, MemoryEventStream
    from taskwatch.tui.cluster import ClusterApp

    name = "events [/x] of C:\\queue\\"  # a closing tag, and a backslash before the header's own
    app = ClusterApp(MemoryEventRelay(MemoryEventStream(name)))
    async with app.run_test(size=(120, 30)) as pilot:
        header = app.query_one("#cluster-header", Static)
        await eventually(lambda: "connected" in visible_text(header))
        await pilot.pause()
        assert visible_text(header).replace("\u200b", "").startswith(f"{name} on memory")
        assert app.is_running and app._exception is None
