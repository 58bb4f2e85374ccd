"""The dashboard driven like a person would: Pilot key presses on a live engine."""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from pydantic import BaseModel, Field
from taskwatch.engine import Engine, RunStatus, TaskContext
from taskwatch.tui.app import TaskwatchApp, parse_run_filter
from taskwatch.tui.client import LocalClient
from taskwatch.tui.screens import HelpScreen, SubmitScreen, TracebackScreen
from taskwatch.widgets import (
    CountsBar,
    EventLog,
    FailuresList,
    ParamsForm,
    RunDetail,
    RunsTable,
    ScheduleTable,
)
from textual.pilot import Pilot
from textual.widgets import Input, Select, TabbedContent

from .helpers import eventually, screen_shown

SIZE = (140, 42)


class EmbedParams(BaseModel):
    user_id: str
    contents: list[str]
    batch: int = 8


def make_engine(**options: Any) -> Engine:
    options.setdefault("health_interval", None)
    engine = Engine(node_id="dash-test", **options)
    release = asyncio.Event()
    engine.resources["release"] = release

    @engine.task(name="embed_batch")
    async def embed_batch(ctx: TaskContext, params: EmbedParams) -> dict[str, int]:
        for i, _ in enumerate(params.contents, 1):
            await ctx.progress(i, len(params.contents), f"item {i}")
        return {"stored": len(params.contents)}

    @engine.task(name="hold")
    async def hold(ctx: TaskContext) -> None:
        await ctx.progress(1, 4, "holding")
        await release.wait()

    @engine.task(name="explode")
    async def explode(ctx: TaskContext) -> None:
        raise ValueError("kaboom in explode")

    @engine.periodic(every=3600.0, initial_delay=3600.0, name="hourly")
    async def hourly(ctx: TaskContext) -> None:
        return None

    return engine


@asynccontextmanager
async def dashboard(engine: Engine, **app_options: Any) -> AsyncIterator[tuple[TaskwatchApp, Pilot]]:
    app_options.setdefault("refresh_hz", 30.0)
    app_options.setdefault("overview_interval", 0.2)
    app = TaskwatchApp(LocalClient(engine, manage=True), **app_options)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: app.state.node_id == "dash-test")
        yield app, pilot
        engine.resources["release"].set()


def table(app: TaskwatchApp) -> RunsTable:
    return app.main.query_one(RunsTable)


def shown_status(app: TaskwatchApp, run_id: str) -> str | None:
    record = table(app).record(run_id)
    return None if record is None else record.status.value


async def open_submit(app: TaskwatchApp, pilot: Pilot, task: str) -> SubmitScreen:
    await pilot.press("s")
    screen = await screen_shown(app, SubmitScreen)
    select = screen.query_one("#submit-task", Select)
    select.value = task
    await eventually(lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm).task_info.name == task)
    await pilot.pause()
    return screen


async def test_submit_through_the_form_and_see_the_run_finish() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        screen = await open_submit(app, pilot, "embed_batch")
        form = screen.query_one(ParamsForm)
        assert form.field_widget("batch").value == "8"  # the default is filled in
        form.field_widget("user_id").value = "u42"
        form.field_widget("contents").value = '["a", "b", "c"]'
        await pilot.click("#submit-ok")
        await eventually(lambda: not isinstance(app.screen, SubmitScreen))
        runs = engine.runs(task="embed_batch")
        assert len(runs) == 1 and runs[0].params == {"user_id": "u42", "contents": ["a", "b", "c"], "batch": 8}
        run_id = runs[0].id
        # the new run is selected and shown finishing
        assert table(app).selected_run_id == run_id
        await eventually(lambda: shown_status(app, run_id) == "succeeded")
        detail = app.main.query_one(RunDetail)
        await eventually(lambda: detail.record is not None and detail.record.status is RunStatus.SUCCEEDED)
        assert detail.record.result == {"stored": 3}


async def test_bad_params_show_inline_errors_and_submit_nothing() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        screen = await open_submit(app, pilot, "embed_batch")
        form = screen.query_one(ParamsForm)
        form.field_widget("user_id").value = "u1"
        form.field_widget("contents").value = '["a", '  # invalid JSON
        await pilot.click("#submit-ok")
        await pilot.pause()
        assert "JSON" in form.field_error("contents") or "json" in form.field_error("contents")
        contents = form.field_widget("contents")
        contents.value = '{"not": "a list"}'  # parses, but the engine refuses it
        contents.focus()
        await pilot.pause()
        await pilot.press("enter")  # Enter in a field submits too
        # the engine's own validation message replaces the parse error
        await eventually(lambda: "list" in form.field_error("contents").lower())
        assert form.field_error("user_id") == ""
        assert isinstance(app.screen, SubmitScreen)
        assert engine.runs(limit=None) == []
        await pilot.press("escape")
        await eventually(lambda: not isinstance(app.screen, SubmitScreen))
        assert engine.runs(limit=None) == []


class ReportParams(BaseModel):
    account_id: int
    options: dict[str, str] = Field(default_factory=dict)  # optional: the schema states no default
    flag: bool | None = None  # three values: unset is not False


async def test_optional_fields_left_empty_are_sent_as_the_task_would_have_them_and_resubmitted_alike() -> None:
    engine = make_engine()
    seen: list[dict[str, Any]] = []

    @engine.task(name="report")
    async def report(ctx: TaskContext, params: ReportParams) -> None:
        seen.append(params.model_dump())

    async with dashboard(engine) as (app, pilot):
        screen = await open_submit(app, pilot, "report")
        form = screen.query_one(ParamsForm)
        assert "(empty: the task's default)" in str(form.field_widget("options").placeholder)
        form.field_widget("account_id").value = "42"
        await pilot.click("#submit-ok")
        await eventually(lambda: seen)
        assert form.field_error("options") == ""
        assert seen == [{"account_id": 42, "options": {}, "flag": None}]
        first = engine.runs(task="report")[0]
        assert "flag" not in first.params or first.params["flag"] is None
        # e: the same params again, None kept as None
        await eventually(lambda: table(app).selected_run_id == first.id)
        await pilot.press("e")
        screen = await screen_shown(app, SubmitScreen)
        await pilot.pause()
        await pilot.click("#submit-ok")
        await eventually(lambda: len(seen) == 2)
        assert seen[1] == seen[0]
        # and set, it is sent as set
        screen = await open_submit(app, pilot, "report")
        form = screen.query_one(ParamsForm)
        form.field_widget("account_id").value = "7"
        form.field_widget("flag").value = "false"
        await pilot.click("#submit-ok")
        await eventually(lambda: len(seen) == 3)
        assert seen[2] == {"account_id": 7, "options": {}, "flag": False}


async def test_cancel_a_running_run() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        handle = await engine.submit("hold")
        await eventually(lambda: shown_status(app, handle.id) == "running")
        assert table(app).select_run(handle.id)
        await pilot.press("c", "y")  # the dialog names the run; y confirms
        record = await handle.wait(timeout=3)
        assert record.status is RunStatus.CANCELLED and record.cancel_reason == "user"
        await eventually(lambda: shown_status(app, handle.id) == "cancelled")
        # cancelling it again is refused with a message, not a crash
        await pilot.press("c", "enter")
        await eventually(lambda: any("already cancelled" in str(n.message) for n in app._notifications))


async def test_retry_a_failed_run_with_its_params() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: shown_status(app, failed.id) == "failed")
        table(app).select_run(failed.id)
        await pilot.press("t")
        screen = await screen_shown(app, TracebackScreen)
        assert "kaboom in explode" in screen._traceback and "in explode" in screen._traceback
        await pilot.press("escape")
        await eventually(lambda: not isinstance(app.screen, TracebackScreen))
        await pilot.press("r")
        retried = await eventually(lambda: [r for r in engine.runs(task="explode") if r.source == f"retry:{failed.id}"])
        new_id = retried[0].id
        await eventually(lambda: table(app).selected_run_id == new_id)
        await eventually(lambda: shown_status(app, new_id) == "failed")


async def test_filter_runs_by_status_and_task() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        ok = await (await engine.submit("embed_batch", {"user_id": "u", "contents": ["x"]})).wait(2)
        bad = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: {ok.id, bad.id} <= set(table(app).shown_keys))
        await pilot.press("slash")
        box = app.main.query_one("#runs-filter", Input)
        assert box.has_focus
        await pilot.press(*"status:failed")
        await eventually(lambda: table(app).shown_keys == [bad.id])
        box.value = "embed"
        await eventually(lambda: table(app).shown_keys == [ok.id])
        box.value = ""
        await eventually(lambda: set(table(app).shown_keys) == {ok.id, bad.id})


def test_run_filter_syntax() -> None:
    assert parse_run_filter("status:failed,running embed") == ({"failed", "running"}, "embed", None)
    # task: names tasks exactly, apart from the free text (which also matches run ids)
    assert parse_run_filter("failed task:send") == ({"failed"}, "", {"send"})
    assert parse_run_filter("t:send,embed_batch x") == (None, "x", {"send", "embed_batch"})
    assert parse_run_filter("") == (None, "", None)


async def test_pause_and_resume_a_periodic_task() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("3")
        assert app.main.query_one(TabbedContent).active == "scheduler"
        schedule = app.main.query_one(ScheduleTable)
        await eventually(lambda: schedule.selected_name == "hourly")
        schedule.focus()
        await pilot.press("z")
        await eventually(lambda: engine.schedule()[0].paused)
        await eventually(lambda: any(p.paused for p in app.state.schedule))
        await pilot.press("z")
        await eventually(lambda: not engine.schedule()[0].paused)


async def test_pausing_the_view_keeps_recording_events() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("p")
        assert app.view_paused
        frames = app.frames
        handle = await engine.submit("embed_batch", {"user_id": "u", "contents": ["x"]})
        await handle.wait(2)
        # the model keeps up while the screen stands still
        await eventually(lambda: handle.id in app.state.runs and app.state.runs[handle.id].status is RunStatus.SUCCEEDED)
        assert handle.id not in table(app).shown_keys
        assert app.frames == frames
        assert app.main.query_one(EventLog).buffered > 0
        await pilot.press("p")
        await eventually(lambda: shown_status(app, handle.id) == "succeeded")
        assert app.main.query_one(EventLog).buffered == 0


async def test_help_and_command_palette_list_every_action() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("question_mark")
        await screen_shown(app, HelpScreen)
        await pilot.press("escape")
        await eventually(lambda: not isinstance(app.screen, HelpScreen))
        titles = {c.title for c in app.get_system_commands(app.screen)}
        assert {"Submit a task", "Cancel selected run", "Retry selected run", "Show traceback", "Filter",
                "Pause or resume the view", "Pause periodic hourly", "Submit embed_batch"} <= titles
        footer_keys = {b.key for b in app.main.BINDINGS if getattr(b, "show", True)}
        assert {"s", "c", "r", "t", "slash", "p", "question_mark", "q"} <= footer_keys


async def test_flood_of_events_every_visible_row_agrees_and_nothing_is_lost() -> None:
    engine = make_engine(max_queue=20_000, history=20_000)
    async with dashboard(engine, refresh_hz=15.0) as (app, pilot):
        started = time.monotonic()
        frames_before = app.frames
        published_before = engine.bus.last_seq
        handles = [await engine.submit("hold") for _ in range(3)]
        for _ in range(16_700):  # three events each: > 50,000 events
            await engine.submit("embed_batch", {"user_id": "u", "contents": []})
        # quiet: nothing left but the three held runs, so no event is still to come
        await eventually(
            lambda: engine.stats().by_status["pending"] == 0 and engine.stats().running == len(handles), timeout=90
        )
        published = engine.bus.last_seq - published_before
        assert published >= 50_000
        await eventually(
            lambda: app.client.pending_events() == 0 and app.state.last_seq == engine.bus.last_seq, timeout=90
        )
        await pilot.pause()
        assert all(app.state.runs[h.id].status is RunStatus.RUNNING for h in handles)
        # the newest runs are all on screen (older ones were backfilled after the flood)
        newest = {r.id for r in engine.runs(limit=app.max_rows)}
        await eventually(lambda: newest <= set(table(app).shown_keys), timeout=90)
        shown = table(app).shown_keys
        assert len(shown) <= app.max_rows + table(app).trim_batch  # bounded
        for run_id in shown:
            assert shown_status(app, run_id) == engine.get(run_id).status.value, run_id
        # every event published reached the dashboard, and none was dropped on the way
        assert app.client.dropped == 0 and app.state.dropped == 0
        assert app.events_seen >= published
        # it redrew at its fixed rate at most, not once per event
        frames = app.frames - frames_before
        assert 0 < frames <= (time.monotonic() - started) * 15.0 + 2 < published / 10


@pytest.mark.parametrize("attached", [False, True], ids=["in-process", "attached"])
async def test_max_rows_is_how_many_runs_the_table_shows_from_a_snapshot(attached: bool, tmp_path: Any) -> None:
    """``TaskwatchApp(max_rows=...)`` is what the snapshots at connect and at a resync hold,
    not their default of 500 (over a socket too: the handshake's snapshot has the server's number)."""
    from taskwatch.tui.remote_client import RemoteClient

    engine = make_engine(history=2_000)
    async with engine:
        for _ in range(700):
            await engine.submit("embed_batch", {"user_id": "u", "contents": []})
        await eventually(lambda: engine.stats().by_status.get("succeeded", 0) == 700, timeout=10)
        client: Any = LocalClient(engine)
        if attached:
            server = await engine.serve(str(tmp_path / "rows.sock"), announce=False)
            client = RemoteClient(server.address)
        app = TaskwatchApp(client, refresh_hz=30.0, max_rows=600, rows_per_frame=1000)
        async with app.run_test(size=SIZE) as pilot:
            newest = [r.id for r in engine.runs(limit=600)]
            await eventually(lambda: table(app).shown_keys == newest)
            app.resync()
            await pilot.pause()
            await eventually(lambda: not app._resyncing and table(app).shown_keys == newest)
            await app.action_quit()


async def test_max_rows_above_the_models_default_keeps_that_many_live_runs() -> None:
    engine = make_engine(history=5_000, max_queue=5_000)
    async with dashboard(engine, max_rows=2_500, rows_per_frame=2_500) as (app, pilot):
        for _ in range(2_200):
            await engine.submit("embed_batch", {"user_id": "u", "contents": []})
        await eventually(lambda: engine.stats().by_status.get("succeeded", 0) == 2_200, timeout=20)
        await eventually(lambda: app.state.last_seq == engine.bus.last_seq, timeout=10)
        await eventually(lambda: len(table(app).shown_keys) == 2_200)


async def test_dropped_events_are_counted_shown_and_resynced() -> None:
    engine = make_engine(max_queue=20_000, history=20_000)
    client = LocalClient(engine, manage=True, buffer=500)
    app = TaskwatchApp(client, refresh_hz=10.0, overview_interval=0.2)
    async with app.run_test(size=SIZE):
        await eventually(lambda: app.state.node_id == "dash-test")
        for _ in range(3_000):
            await engine.submit("embed_batch", {"user_id": "u", "contents": []})
        await eventually(lambda: engine.stats().by_status["pending"] == 0, timeout=30)
        assert client.dropped > 0
        # a fresh snapshot brings the visible rows back in line with the engine
        await eventually(
            lambda: all(shown_status(app, r) == engine.get(r).status.value for r in table(app).shown_keys)
            and table(app).shown_keys[:1] == [engine.runs(limit=1)[0].id],
            timeout=10,
        )
        counts = app.main.query_one(CountsBar)
        await eventually(lambda: "dropped" in str(counts.render()))
        engine.resources["release"].set()


async def test_keys_act_on_what_the_current_tab_shows() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")
        table(app).select_run(held.id)
        await pilot.press("2")  # Failures: the failed run is what the user sees
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: failures.selected == ("run", failed.id))
        # a failed run cannot be cancelled: c is not a key here, and the hidden running run is left alone
        assert "c" not in app.screen.active_bindings
        await pilot.press("c")
        await pilot.pause()
        assert app.screen is app.main and engine.get(held.id).status is RunStatus.RUNNING
        await pilot.press("r")  # retries the failure under the cursor
        await eventually(lambda: [r for r in engine.runs(task="explode") if r.source == f"retry:{failed.id}"])
        await pilot.press("4")
        await pilot.press("z")  # no periodic task is selected on the Health tab
        await eventually(lambda: any("Scheduler tab" in str(n.message) for n in app._notifications))
        assert not engine.schedule()[0].paused


async def test_a_stopped_engine_gives_messages_not_a_crash() -> None:
    engine = make_engine()
    bg = engine.start_background()
    try:
        app = TaskwatchApp(LocalClient(engine), refresh_hz=30.0, overview_interval=0.2)
        async with app.run_test(size=SIZE) as pilot:
            await eventually(lambda: app.state.node_id == "dash-test")
            handle = bg.submit("explode")
            handle.wait(timeout=2)
            await eventually(lambda: shown_status(app, handle.id) == "failed")
            table(app).select_run(handle.id)
            bg.stop(timeout=2)
            await pilot.press("r")
            await eventually(lambda: any("has stopped" in str(n.message) for n in app._notifications))
            assert app.is_running
    finally:
        bg.stop(timeout=2)


async def test_what_the_dashboard_froze_for_the_collector_is_given_back_when_it_stops() -> None:
    # while it runs, the objects that existed at its start are out of the collector's full
    # passes (shorter pauses under a flood); a program that ran it gets them back afterwards
    engine = make_engine()
    before = gc.get_freeze_count()
    if before:
        pytest.skip("this interpreter froze objects before the dashboard (Python 3.12.1 does at startup)")
    async with dashboard(engine) as (app, pilot):
        await eventually(lambda: gc.get_freeze_count() > before)
        await pilot.press("1")
        assert app.is_running
    assert gc.get_freeze_count() == before


async def test_a_host_programs_own_frozen_objects_stay_frozen_after_the_dashboard() -> None:
    engine = make_engine()
    gc.freeze()  # the host froze what it had, before the dashboard
    try:
        before = gc.get_freeze_count()
        assert before > 0
        async with dashboard(engine) as (app, pilot):
            await pilot.press("1")
            assert app.is_running
        assert gc.get_freeze_count() > before // 2  # still frozen (less what refcounting freed)
    finally:
        gc.unfreeze()


async def test_escape_clears_the_runs_filter() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        ok = await (await engine.submit("embed_batch", {"user_id": "u", "contents": []})).wait(2)
        bad = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: {ok.id, bad.id} <= set(table(app).shown_keys))
        await pilot.press("slash", *"status:failed", "enter")
        await eventually(lambda: table(app).shown_keys == [bad.id])
        box = app.main.query_one("#runs-filter", Input)
        assert box.has_class("shown")  # an active filter stays in sight
        box.focus()
        await pilot.press("escape")
        await eventually(lambda: set(table(app).shown_keys) == {ok.id, bad.id})
        assert box.value == "" and not box.has_class("shown")


def test_failures_outlive_a_backlog_of_other_runs() -> None:
    from taskwatch.engine import RunError
    from taskwatch.engine import events as ev
    from taskwatch.tui.state import DashboardState

    state = DashboardState(max_runs=100)
    seq = 0
    events: list[Any] = []
    for i in range(5):
        seq += 1
        events.append(ev.RunSubmitted(seq=seq, ts=float(seq), run_id=f"f{i}", task="t"))
        seq += 1
        events.append(ev.RunFailed(seq=seq, ts=float(seq), run_id=f"f{i}", task="t", error=RunError(type="E", message="m")))
    for i in range(300):
        seq += 1
        events.append(ev.RunSubmitted(seq=seq, ts=float(seq), run_id=f"p{i}", task="t"))
        seq += 1
        events.append(ev.RunSucceeded(seq=seq, ts=float(seq), run_id=f"p{i}", task="t", attempt=1, duration=0.0))
    state.apply(events)
    assert len(state.runs) <= 100 and "f0" not in state.runs  # trimmed from the runs by newer ones...
    assert [r.id for r in state.failed_runs()] == ["f4", "f3", "f2", "f1", "f0"]  # ...kept as failures


async def test_a_run_too_large_for_the_wire_is_shown_in_full_when_selected(tmp_path: Any) -> None:
    """Attached over a socket, a run's megabyte params arrive cut down; the detail pane fetches them."""
    from taskwatch.engine import is_truncated
    from taskwatch.tui.remote_client import RemoteClient

    class Blob(BaseModel):
        text: str

    engine = Engine(node_id="big-runs", health_interval=None)

    @engine.task
    async def store_blob(ctx: TaskContext, params: Blob) -> dict[str, str]:
        return {"echo": params.text}

    big = "x" * 300_000
    async with engine:
        run = await (await engine.submit("store_blob", {"text": big})).wait(5)
        server = await engine.serve(str(tmp_path / "big.sock"), announce=False)
        app = TaskwatchApp(RemoteClient(server.address), refresh_hz=30.0)
        async with app.run_test(size=SIZE) as pilot:
            await eventually(lambda: run.id in table(app).shown_keys)
            listed = app.state.record(run.id)
            assert listed is not None and is_truncated(listed.params) and is_truncated(listed.result)
            table(app).select_run(run.id)
            await pilot.pause()
            detail = app.main.query_one(RunDetail)
            await eventually(lambda: detail.record is not None and detail.record.params.get("text") == big)
            assert detail.record.result == {"echo": big}
            await app.action_quit()


def test_a_failed_command_is_called_maybe_done_only_when_it_was_sent() -> None:
    from taskwatch.engine import ConnectionClosed
    from taskwatch.tui.app import command_failure

    def failed(cls: type[OSError], sent: bool | None) -> OSError:
        exc = cls("no reply")
        if sent is not None:
            exc.sent = sent  # type: ignore[attr-defined]
        return exc

    assert "may have been done" in command_failure("cancel", failed(TimeoutError, True))
    assert "may have been done" in command_failure("cancel", failed(ConnectionClosed, True))
    assert "may have been done" in command_failure("cancel", failed(TimeoutError, None))  # says nothing: maybe
    assert command_failure("cancel", failed(TimeoutError, False)) == "cancel failed: no reply"
    assert command_failure("cancel", failed(ConnectionClosed, False)) == "cancel failed: no reply"
