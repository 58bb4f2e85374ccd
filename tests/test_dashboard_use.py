"""The dashboard as its users drive it: keys from any focus, the cursor where the user put it,
confirmations that name the run, true totals, and layouts that fit 80x24.

Every test drives the real app with Pilot on a live engine (or a real remote connection).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import pytest
from pydantic import BaseModel
from taskwatch.engine import Engine, InProcessLease, LeaseState, RunStatus
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.screens import ConfirmScreen, HelpScreen, SubmitScreen, TracebackScreen
from taskwatch.widgets import CountsBar, FailuresList, ParamsForm, RunDetail, ScheduleTable
from textual.pilot import Pilot
from textual.widgets import Button, Input, Sparkline, Static, TabbedContent

from .helpers import Recorder, eventually, screen_shown
from .test_dashboard import make_engine, open_submit, shown_status, table

SMALL = (80, 24)
LARGE = (160, 48)


@asynccontextmanager
async def dashboard(
    engine: Engine, size: tuple[int, int] = SMALL, **app_options: Any
) -> AsyncIterator[tuple[TaskwatchApp, Pilot]]:
    app_options.setdefault("refresh_hz", 30.0)
    app_options.setdefault("overview_interval", 0.2)
    app = TaskwatchApp(LocalClient(engine, manage=True), **app_options)
    async with app.run_test(size=size) as pilot:
        await eventually(lambda: app.state.node_id == "dash-test")
        await pilot.pause()
        yield app, pilot
        engine.resources["release"].set()


def notes(app: TaskwatchApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


def tabs(app: TaskwatchApp) -> str:
    return str(app.main.query_one(TabbedContent).active)


# ---------------------------------------------------------------- focus and keys


async def test_number_keys_switch_tabs_from_any_focus() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: shown_status(app, failed.id) == "failed")
        # focus inside the runs table, then inside the detail pane
        table(app).focus()
        await pilot.pause()  # focus moves on the next message round
        await pilot.press("2")
        assert tabs(app) == "failures"
        await pilot.press("1")
        assert tabs(app) == "runs"
        await pilot.press("4")  # a tab with nothing to focus
        assert tabs(app) == "health"
        await pilot.pause()
        assert tabs(app) == "health"
        await pilot.press("1")
        assert tabs(app) == "runs"
        app.main.query_one(RunDetail).focus()
        await pilot.pause()  # focus moves on the next message round
        await pilot.press("3")
        assert tabs(app) == "scheduler"
        app.main.query_one(ScheduleTable).focus()
        await pilot.pause()  # focus moves on the next message round
        await pilot.press("5")
        assert tabs(app) == "events"
        # after a filter typed and confirmed with Enter
        await pilot.press("1", "slash", *"explode", "enter")
        assert app.main.query_one("#runs-filter", Input).value == "explode"
        await pilot.press("2")
        assert tabs(app) == "failures"
        # on Failures, with the table focused, r retries the failure (it does not wander off)
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: failures.selected == ("run", failed.id))
        await pilot.press("r")
        await eventually(lambda: [r for r in engine.runs(task="explode") if r.source == f"retry:{failed.id}"])
        # screen keys work from every focus: help, submit, quit
        app.main.query_one(RunDetail).focus()
        await pilot.pause()  # focus moves on the next message round
        await pilot.press("question_mark")
        await screen_shown(app, HelpScreen)
        await pilot.press("escape")
        await pilot.press("s")
        await screen_shown(app, SubmitScreen)


async def test_typing_in_a_filter_is_text_not_keys() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("slash", *"status:failed q1 s2")
        assert app.main.query_one("#runs-filter", Input).value == "status:failed q1 s2"
        assert tabs(app) == "runs" and app.screen is app.main and app.is_running


async def test_the_runs_table_has_focus_at_start_and_moves_with_vim_keys() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        ids = [(await (await engine.submit("explode")).wait(2)).id for _ in range(4)]
        newest_first = list(reversed(ids))
        await eventually(lambda: table(app).shown_keys == newest_first)
        assert app.focused is table(app)
        table(app).select_run(newest_first[0])
        await pilot.press("down")
        assert table(app).selected_run_id == newest_first[1]
        await pilot.press("j")
        assert table(app).selected_run_id == newest_first[2]
        await pilot.press("k")
        assert table(app).selected_run_id == newest_first[1]
        await pilot.press("G")
        assert table(app).selected_run_id == newest_first[-1]
        await pilot.press("g")
        assert table(app).selected_run_id == newest_first[0]
        # switching tabs puts focus in the tab's table
        await pilot.press("2")
        assert app.focused is app.main.query_one(FailuresList).table
        await pilot.press("1")
        assert app.focused is table(app)


async def test_tab_in_the_submit_form_goes_to_a_field_that_shows_what_is_typed() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        await pilot.press("s")
        screen = await screen_shown(app, SubmitScreen)
        await eventually(lambda: screen.query(ParamsForm))
        await pilot.pause()
        form = screen.query_one(ParamsForm)
        assert form.task_info.name == "embed_batch"
        first = form.field_widget("user_id")
        await pilot.press("tab")
        assert app.focused is first and first.region.area > 0  # a visible field
        await pilot.press(*"abc")
        assert isinstance(first, Input) and first.value == "abc"


def in_sight(widget: Any) -> bool:
    """The whole widget is drawn: on the screen, not cut by a container that scrolls or clips."""
    placed = widget.screen.find_widget(widget)
    return widget.region.area > 0 and placed.visible_region == widget.region


@pytest.mark.parametrize("size", [SMALL, (60, 15)], ids=["80x24", "60x15"])
async def test_on_a_small_terminal_the_submit_form_scrolls_and_its_buttons_and_errors_stay_in_sight(
    size: tuple[int, int],
) -> None:
    engine = make_engine()
    async with dashboard(engine, size=size, cursor_blink=False) as (app, pilot):
        screen = await open_submit(app, pilot, "embed_batch")
        form = screen.query_one(ParamsForm)
        buttons = [screen.query_one("#submit-ok"), screen.query_one("#submit-cancel")]
        assert all(in_sight(button) for button in buttons)
        # the last field is reached by scrolling the fields, not by the dialog running off the screen
        await pilot.press("tab", "tab", "tab")
        batch = form.field_widget("batch")
        assert app.focused is batch
        await pilot.pause()
        assert in_sight(batch) and all(in_sight(button) for button in buttons)
        # a wrong field is scrolled back into sight with its error under it
        batch.value = ""
        form.field_widget("user_id").value = "u1"
        form.field_widget("user_id").focus()
        await pilot.pause()
        await pilot.press("enter")  # Enter in a field submits; the focus moves to the wrong one
        await eventually(lambda: form.field_error("contents") == "this field is required")

        def wrong_field_in_sight() -> bool:
            # scrolled there once the errors are laid out (after a refresh: a moment on a busy machine)
            error = next((e for e in form.query(".params-form--error") if e.display), None)
            return error is not None and in_sight(form.field_widget("contents")) and in_sight(error)

        await eventually(wrong_field_in_sight)
        assert all(in_sight(button) for button in buttons)
        assert isinstance(app.screen, SubmitScreen) and engine.runs(limit=None) == []


@pytest.mark.parametrize("tab", ["1", "3", "5"])
async def test_at_60_columns_the_footer_still_shows_help_and_quit(tab: str) -> None:
    engine = make_engine()
    async with dashboard(engine, size=(60, 15)) as (app, pilot):
        await pilot.press(tab)
        await pilot.pause()
        keys = {k.key: k for k in app.main.query("FooterKey")}
        for key in ("question_mark", "q"):
            assert in_sight(keys[key]) and keys[key].region.right <= 60, key
        await pilot.click(keys["question_mark"])  # and they work
        await screen_shown(app, HelpScreen)


# ---------------------------------------------------------------- actions on what the user chose


async def test_the_cursor_stays_on_the_chosen_run_as_new_runs_arrive() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")
        table(app).focus()
        await pilot.pause()  # focus moves on the next message round
        await pilot.press("j", "k")  # the user puts the cursor on the top row: the newest run
        assert table(app).selected_run_id == held.id
        for _ in range(5):
            await (await engine.submit("embed_batch", {"user_id": "u", "contents": []})).wait(2)
        await eventually(lambda: len(table(app).shown_keys) == 6)
        await pilot.pause()
        assert table(app).selected_run_id == held.id  # never dragged to whatever came last


def top_row(app: TaskwatchApp) -> str:
    """The id on the runs table's first line under its header, as drawn."""
    return table(app).render_line(1).text.split()[0]


async def quick_runs(engine: Engine, n: int) -> list[str]:
    return [(await (await engine.submit("embed_batch", {"user_id": "u", "contents": []})).wait(2)).id for _ in range(n)]


async def test_an_untouched_runs_table_shows_the_newest_runs_as_they_arrive() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        first = await quick_runs(engine, 1)
        await eventually(lambda: table(app).selected_run_id == first[0])
        # three screenfuls of newer runs, no key pressed: the newest is on top, under the cursor
        ids = await quick_runs(engine, 3 * table(app).size.height)
        await eventually(lambda: table(app).selected_run_id == ids[-1])
        await pilot.pause()
        assert top_row(app) == ids[-1][-8:] and table(app).scroll_y == 0
        assert app.main.query_one(RunDetail).record.id == ids[-1]  # type: ignore[union-attr]
        # moved by the user, the cursor holds its run; g follows the newest again
        await pilot.press("j")
        held = table(app).selected_run_id
        assert held == ids[-2]
        newer = await quick_runs(engine, 3)
        await eventually(lambda: newer[-1] in table(app).shown_keys)
        await pilot.pause()
        assert table(app).selected_run_id == held and top_row(app) == newer[-1][-8:]
        await pilot.press("g")
        newest = await quick_runs(engine, 2)
        await eventually(lambda: table(app).selected_run_id == newest[-1])


async def test_the_chosen_run_stays_selected_past_the_models_bound_and_r_retries_it() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE, max_rows=10) as (app, pilot):
        app.state.max_runs = 30  # the model's bound, small: reached within a few dozen runs
        failed = await (await engine.submit("explode")).wait(2)
        await quick_runs(engine, 2)
        await eventually(lambda: len(table(app).shown_keys) == 3)
        await pilot.press("j", "j")  # the user puts the cursor on the failed run
        assert table(app).selected_run_id == failed.id
        newer = await quick_runs(engine, 60)
        await eventually(lambda: newer[-1] in table(app).shown_keys and len(app.state.runs) <= 31)
        await pilot.pause()
        assert app.state.record(newer[0]) is None  # the model did trim
        assert table(app).selected_run_id == failed.id and failed.id in table(app).shown_keys
        assert app.main.query_one(RunDetail).record.id == failed.id  # type: ignore[union-attr]
        await pilot.press("r")
        await eventually(lambda: any(r.source == f"retry:{failed.id}" for r in engine.runs(limit=None)))
        assert any(f"retrying explode as run" in n for n in notes(app))


async def test_marked_runs_stay_marked_however_many_newer_runs_arrive() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE, max_rows=10) as (app, pilot):
        app.state.max_runs = 30
        failed = [(await (await engine.submit("explode")).wait(2)).id for _ in range(2)]
        await eventually(lambda: set(failed) <= set(table(app).shown_keys))
        await pilot.press("space", "space")  # marks both, newest first
        assert table(app).marked == failed[::-1]
        await pilot.press("g")  # back to watching the newest
        newer = await quick_runs(engine, 60)
        await eventually(lambda: newer[-1] in table(app).shown_keys and len(app.state.runs) <= 31)
        await pilot.pause()
        assert len(table(app).shown_keys) <= 10 + table(app).trim_batch + 3  # the rest is trimmed
        assert table(app).marked == failed[::-1]
        assert all(table(app).get_cell(run_id, "id").style == "bold black on yellow" for run_id in failed)
        await pilot.press("r")
        dialog = await screen_shown(app, ConfirmScreen)
        assert "2 marked runs" in dialog.question
        await pilot.press("y")
        await eventually(lambda: {r.source for r in engine.runs(limit=None)} >= {f"retry:{i}" for i in failed})


async def test_a_chosen_run_that_leaves_the_filter_leaves_no_run_selected_for_c_to_hit() -> None:
    engine = make_engine(max_concurrency=1)
    async with dashboard(engine, size=LARGE, confirm=False) as (app, pilot):
        first, chosen, *others = [await engine.submit("hold") for _ in range(4)]
        await eventually(lambda: shown_status(app, first.id) == "running")
        await pilot.press("slash", *"status:pending", "enter")
        await eventually(lambda: set(table(app).shown_keys) == {chosen.id, *(h.id for h in others)})
        assert table(app).select_run(chosen.id)
        await engine.cancel(first.id)  # the chosen run starts: it is no longer pending
        await eventually(lambda: chosen.id not in table(app).shown_keys)
        await pilot.pause()
        # not moved to its neighbour, which c would then cancel
        assert table(app).selected_run_id is None
        await pilot.press("c")
        await eventually(lambda: any("select a run to cancel" in n for n in notes(app)))
        assert [engine.get(h.id).status for h in others] == [RunStatus.PENDING] * 2


async def test_enter_holds_the_cursor_on_the_run_it_opened_as_newer_runs_arrive() -> None:
    engine = make_engine()
    async with dashboard(engine, size=(60, 20), confirm=False) as (app, pilot):
        opened = await engine.submit("hold")
        await eventually(lambda: table(app).shown_keys == [opened.id])
        await pilot.press("enter")  # on the untouched table: the newest run, which it follows
        await eventually(lambda: app.detail_open)
        newer = await engine.submit("hold")
        await eventually(lambda: newer.id in table(app).shown_keys)
        await pilot.pause()
        assert table(app).selected_run_id == opened.id
        assert app.main.query_one(RunDetail).record.id == opened.id  # type: ignore[union-attr]
        await pilot.press("c")
        await eventually(lambda: engine.get(opened.id).status is RunStatus.CANCELLED)
        assert engine.get(newer.id).status is RunStatus.RUNNING


async def test_marks_outlive_a_reload_from_a_snapshot_and_c_still_acts_on_every_marked_run() -> None:
    engine = make_engine(max_concurrency=1)
    async with dashboard(engine, size=LARGE) as (app, pilot):
        held = [await engine.submit("hold") for _ in range(5)]
        await eventually(lambda: set(table(app).shown_keys) == {h.id for h in held})
        await pilot.press("j", "space", "space", "space")
        marked = table(app).marked
        assert len(marked) == 3
        # what a dashboard does after dropping events, or on a reconnect: start over from a snapshot
        await app.resync().wait()
        await eventually(lambda: set(table(app).marked) == set(marked))
        await pilot.press("c")
        dialog = await screen_shown(app, ConfirmScreen)
        assert "3 marked runs" in dialog.question
        await pilot.press("escape")


async def test_cancel_asks_first_naming_the_run_and_cancels_exactly_that_run() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        held = await engine.submit("hold")
        other = await engine.submit("hold")
        await eventually(lambda: shown_status(app, other.id) == "running")
        table(app).select_run(held.id)
        await pilot.press("c")
        dialog = await screen_shown(app, ConfirmScreen)
        assert held.id in dialog.question and "hold" in dialog.question
        await pilot.press("n")  # no: nothing happens
        await eventually(lambda: app.screen is app.main)
        assert engine.get(held.id).status is RunStatus.RUNNING
        await pilot.press("c")
        await screen_shown(app, ConfirmScreen)
        # the table moving meanwhile does not change which run the dialog cancels
        table(app).select_run(other.id)
        await pilot.press("enter")
        await eventually(lambda: engine.get(held.id).status is RunStatus.CANCELLED)
        assert engine.get(other.id).status is RunStatus.RUNNING


async def test_a_running_run_older_than_max_rows_newer_runs_stays_listed_and_can_be_cancelled() -> None:
    engine = make_engine()
    async with dashboard(engine, max_rows=10) as (app, pilot):
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")

        async def newer_runs(n: int) -> None:
            for _ in range(n):
                await engine.submit("embed_batch", {"user_id": "u", "contents": []})
            newest = {r.id for r in engine.runs(limit=10)}
            await eventually(lambda: newest <= set(table(app).shown_keys) and engine.stats().by_status["pending"] == 0)
            await pilot.pause()

        await newer_runs(30)
        await pilot.press("g")  # the cursor on the newest: it is not what keeps the held run listed
        await newer_runs(30)
        assert held.id in table(app).shown_keys
        assert len(table(app).shown_keys) <= 10 + table(app).trim_batch + 1  # the rest is still trimmed
        # a reload (after lost events, or a reconnect) lists it again too
        app.resync()
        await eventually(lambda: app.state.last_seq == engine.bus.last_seq and held.id in table(app).shown_keys)
        # found with the filter, and cancelled
        await pilot.press("slash", *"status:running", "enter")
        await eventually(lambda: table(app).shown_keys == [held.id])
        await pilot.press("c")
        dialog = await screen_shown(app, ConfirmScreen)
        assert held.id in dialog.question
        await pilot.press("y")
        await eventually(lambda: engine.get(held.id).status is RunStatus.CANCELLED)


async def test_cancel_without_confirmation_when_the_setting_says_so() -> None:
    engine = make_engine()
    async with dashboard(engine, confirm=False) as (app, pilot):
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")
        table(app).select_run(held.id)
        await pilot.press("c")
        await eventually(lambda: engine.get(held.id).status is RunStatus.CANCELLED)
        assert not isinstance(app.screen, ConfirmScreen)



async def test_the_runs_filter_task_names_a_task_exactly_not_part_of_a_name_or_id() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        ok = await (await engine.submit("embed_batch", {"user_id": "u", "contents": []})).wait(2)
        bad = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: {ok.id, bad.id} <= set(table(app).shown_keys))
        await pilot.press("slash", *"task:explode", "enter")
        await eventually(lambda: table(app).shown_keys == [bad.id])
        box = app.main.query_one("#runs-filter", Input)
        box.value = "task:expl"  # part of a name is not the name
        await eventually(lambda: table(app).shown_keys == [])
        box.value = "task:explode,embed_batch status:succeeded"
        await eventually(lambda: table(app).shown_keys == [ok.id])
        box.value = "expl"  # free text still matches part of a name
        await eventually(lambda: table(app).shown_keys == [bad.id])


async def test_c_on_a_finished_run_says_at_once_that_it_finished_without_asking() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        done = await (await engine.submit("embed_batch", {"user_id": "u", "contents": []})).wait(2)
        await eventually(lambda: shown_status(app, done.id) == "succeeded")
        table(app).select_run(done.id)
        await pilot.press("c")
        await eventually(lambda: any(f"run {done.id} is already succeeded" in n for n in notes(app)))
        assert app.screen is app.main  # no "Cancel run …?" dialog first


async def test_an_events_filter_no_event_kind_matches_is_pointed_out() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("5", "slash", *"run.failed run.", "enter")
        assert app.main.query_one("#events-filter", Input).value == "run.failed run."
        await pilot.pause()
        assert not [n for n in notes(app) if "event kind" in n]  # known kinds: no warning
        box = app.main.query_one("#events-filter", Input)
        box.value = ""
        await pilot.press("slash", *"run.faild", "enter")
        await eventually(lambda: any("no event kind matches run.faild (run.failed?)" in n for n in notes(app)))


# ---------------------------------------------------------------- what the header says


def visible(widget: Any) -> str:
    """The widget's first line as drawn on screen (cut where the screen cuts it)."""
    return widget.render_line(0).text


async def test_the_header_names_the_node_and_the_store_it_watches(tmp_path: Any) -> None:
    from taskwatch.widgets import LeaderBadge, StoreBadge

    db = tmp_path / "a-rather-long-folder-name-for-the-runs" / "dashboard-runs.db"
    engine = make_engine(store=f"sqlite:///{db}")
    async with dashboard(engine) as (app, pilot):
        store = app.main.query_one(StoreBadge)
        await eventually(lambda: "dashboard-runs.db" in visible(store))
        assert visible(store).startswith("store sqlite:")
        assert "dash-test" in visible(app.main.query_one(LeaderBadge))
        # given room, it also says which start of the engine this is and how it is reached
        await pilot.resize_terminal(*LARGE)
        await eventually(lambda: engine.incarnation[:8] in visible(store))
        assert "via in-process" in visible(store) and "dashboard-runs.db" in visible(store)


async def test_the_header_says_when_the_engine_cannot_reach_its_store(tmp_path: Any) -> None:
    # a node kept from its store past its claim lease steps down: it runs on, claims nothing and
    # leads nothing, and the dashboard said so only as one red line in its event log
    import sqlite3

    from taskwatch.widgets import StoreBadge

    db = tmp_path / "runs.db"
    engine = make_engine(store=f"sqlite:///{db}?busy_timeout=50", lease_ttl=1.0)
    async with dashboard(engine, size=LARGE) as (app, pilot):
        store = app.main.query_one(StoreBadge)
        await eventually(lambda: "runs.db" in visible(store))
        assert "OUT OF REACH" not in visible(store)
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")  # another process holds the file
        try:
            await eventually(lambda: engine.stats().cut_off_for is not None, timeout=15)
            await eventually(lambda: visible(store).startswith("✖ OUT OF REACH "), timeout=10)
            assert "runs.db" in visible(store)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        await eventually(lambda: engine.stats().cut_off_for is None, timeout=15)
        await eventually(lambda: "OUT OF REACH" not in visible(store), timeout=10)


async def test_counts_are_totals_since_start_not_the_history_window() -> None:
    from taskwatch.widgets import CountsBar

    engine = make_engine(history=5)
    async with dashboard(engine, size=LARGE) as (app, pilot):
        for _ in range(12):
            await (await engine.submit("explode")).wait(2)
        await eventually(lambda: engine.stats().by_status["failed"] <= 5)  # the window keeps 5
        bar = app.main.query_one(CountsBar)
        await eventually(lambda: "failed 12" in visible(bar))
        assert "since start" in visible(bar)
        # the finish rate, measured between the dashboard's snapshots
        await eventually(lambda: "finished/s" in visible(bar))


async def test_pause_and_drop_indicators_stay_visible_beside_large_counts() -> None:
    from .test_widgets import Host

    bar = CountsBar()
    async with Host(bar).run_test(size=SMALL) as pilot:
        bar.update(
            {"pending": 4_512, "running": 128}, dropped=37, paused=True, view_paused_buffered=950,
            totals={"succeeded": 981_223, "failed": 12_345, "cancelled": 678}, rate=1234.5,
        )
        await pilot.pause()
        line = visible(bar)
        assert "dropped 37 events" in line and "paused (950 buffered)" in line
        assert line.startswith("pend 4,512 run 128 │ ok")  # the narrowest form, then cut
        bar.update({"pending": 1}, dropped=0, paused=False, totals={"succeeded": 2, "failed": 0, "cancelled": 0})
        await pilot.pause()
        line = visible(bar)
        assert "succeeded 2" in line and "paused" not in line and "dropped" not in line


@pytest.mark.parametrize(("size", "pause"), [((60, 20), False), ((80, 24), True)])
async def test_a_narrow_header_still_shows_the_failed_and_cancelled_totals(size: tuple[int, int], pause: bool) -> None:
    engine = make_engine()
    async with dashboard(engine, size=size) as (app, pilot):
        for _ in range(1_234):
            engine.submit_nowait("explode")
        held = await engine.submit("hold")
        await engine.cancel(held.id)
        await eventually(lambda: engine.stats().failed_total == 1_234)
        if pause:
            await pilot.press("p")
            await engine.submit("hold")
        bar = app.main.query_one(CountsBar)
        # the names shortened rather than the totals cut off the end
        await eventually(lambda: "fail 1,234" in visible(bar) and "canc 1" in visible(bar))
        assert ("paused" in visible(bar)) is pause


# ---------------------------------------------------------------- a run's attempts


async def test_the_detail_pane_lists_each_attempt_with_its_outcome() -> None:
    engine = make_engine()
    tries: list[int] = []

    @engine.task(name="flaky", retries=2, backoff=0.01)
    async def flaky(ctx: Any) -> str:
        tries.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError(f"relay refused attempt {ctx.attempt}")
        return "sent"

    async with dashboard(engine, size=LARGE) as (app, pilot):
        run = await (await engine.submit("flaky")).wait(5)
        assert run.status is RunStatus.SUCCEEDED and tries == [1, 2, 3]
        await eventually(lambda: shown_status(app, run.id) == "succeeded")
        table(app).select_run(run.id)
        detail = app.main.query_one(RunDetail)
        await eventually(lambda: len(detail.attempts) == 3)
        first, second, third = detail.attempts
        assert [a.number for a in detail.attempts] == [1, 2, 3]
        assert first.outcome == "retried" and first.error is not None and "attempt 1" in first.error.message
        assert first.note.startswith("retry in") and first.started_at is not None and first.ended_at is not None
        assert second.outcome == "retried" and third.outcome == "succeeded" and third.error is None
        await pilot.pause()
        text = visible_text(app.main.query_one("#run-detail-attempts"))
        assert "#1" in text and "ConnectionError: relay refused attempt 1" in text and "succeeded" in text
        # the run keeps its last failed attempt's error, as the engine's record does (and t shows it)
        assert run.error is not None and "attempt 2" in run.error.message
        assert detail.record is not None and detail.record.error == run.error
        assert detail.record.node == run.node == "dash-test"
        await pilot.press("t")
        shown = await screen_shown(app, TracebackScreen)
        assert "relay refused attempt 2" in str(shown.query_one("#traceback-title").render())


def visible_text(widget: Any) -> str:
    """What the widget shows, its lines joined and runs of spaces closed up (wrapping aside)."""
    return " ".join(" ".join(widget.render_line(y).text for y in range(widget.size.height)).split())


def test_a_recovered_run_shows_the_lost_attempt_and_what_recovery_did() -> None:
    from taskwatch.engine import RunError
    from taskwatch.engine import events as ev
    from taskwatch.tui.state import DashboardState

    state = DashboardState()
    state.apply([
        ev.RunSubmitted(seq=1, ts=100.0, run_id="r1", task="t", max_attempts=1),
        ev.RunStarted(seq=2, ts=101.0, run_id="r1", task="t", attempt=1, node="node-b"),
        ev.RunRecovered(seq=3, ts=140.0, run_id="r1", task="t", action="requeued", reason="node-b stopped heartbeating",
                        attempt=2, lost_count=1, from_node="node-b"),
        ev.RunStarted(seq=4, ts=141.0, run_id="r1", task="t", attempt=2),
        ev.RunRecovered(seq=5, ts=180.0, run_id="r1", task="t", action="failed", reason="lost 3 times",
                        attempt=2, lost_count=3, from_node="node-c"),
        ev.RunFailed(seq=6, ts=180.0, run_id="r1", task="t", attempt=2,
                     error=RunError(type="WorkerLost", message="its worker was lost")),
    ])
    first, second = state.attempts("r1") or []
    assert (first["number"], first["outcome"], first["lost_on"]) == (1, "lost", "node-b")
    assert first["recovery"] == "requeued by recovery (node-b stopped heartbeating)"
    assert (first["started_at"], first["ended_at"]) == (101.0, 140.0)
    assert (second["number"], second["outcome"], second["lost_on"]) == (2, "failed", "node-c")
    assert second["error"].type == "WorkerLost" and "lost 3 times" in second["recovery"]
    assert state.runs["r1"].status is RunStatus.FAILED


async def test_run_detail_draws_a_recovery() -> None:
    from taskwatch.widgets import RunAttempt

    from .test_widgets import Host, run

    detail = RunDetail()
    async with Host(detail).run_test(size=LARGE) as pilot:
        record = run("r1", 1, status=RunStatus.RUNNING, started=50, attempt=2, max_attempts=1)
        detail.show(record, now=record.created_at + 60, attempts=[
            RunAttempt(number=1, started_at=record.created_at + 1, ended_at=record.created_at + 40, outcome="lost",
                       recovery="requeued by recovery (node-b stopped heartbeating)", lost_on="node-b"),
            RunAttempt(number=2, started_at=record.created_at + 50),
        ])
        await pilot.pause()
        text = visible_text(detail.query_one("#run-detail-attempts"))
        assert "lost on node-b" in text and "requeued by recovery (node-b stopped heartbeating)" in text
        assert "#2" in text and "running" in text


# ---------------------------------------------------------------- readable at 80x24


async def test_at_80_columns_the_runs_table_has_the_width_and_enter_opens_the_detail() -> None:
    engine = make_engine()
    async with dashboard(engine, size=SMALL) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: shown_status(app, failed.id) == "failed")
        detail = app.main.query_one(RunDetail)
        await pilot.pause()
        assert detail.region.area == 0  # not squeezed beside the table
        header = visible(table(app))
        assert "progress" in header and "duration" in header
        assert table(app).region.right <= SMALL[0] and table(app).region.width >= SMALL[0] - 2
        await pilot.press("enter")
        await eventually(lambda: detail.region.width >= SMALL[0] - 2)
        assert table(app).region.area == 0 and app.focused is detail
        assert detail.record is not None and detail.record.id == failed.id
        await pilot.press("escape")
        await eventually(lambda: table(app).region.area > 0 and detail.region.area == 0)
        assert app.focused is table(app)
        # the footer keeps help and quit in sight
        keys = {k.key: k for k in app.main.query("FooterKey")}
        for key in ("question_mark", "q"):
            assert keys[key].region.width > 0 and keys[key].region.right <= SMALL[0], key
        # wide again: the detail is back beside the table
        await pilot.resize_terminal(*LARGE)
        await eventually(lambda: detail.region.area > 0 and table(app).region.area > 0)


async def test_at_80_columns_beside_a_scrollbar_the_started_time_shows_its_seconds() -> None:
    engine = make_engine()
    async with dashboard(engine, size=SMALL) as (app, pilot):
        for _ in range(30):  # more rows than fit: the table gets a vertical scrollbar
            await (await engine.submit("explode")).wait(2)
        newest = engine.runs(limit=1)[0]
        await eventually(lambda: table(app).shown_keys[:1] == [newest.id] and len(table(app).shown_keys) == 30)
        await pilot.pause()
        assert table(app).show_vertical_scrollbar
        assert "started" in visible(table(app))
        started = time.strftime("%H:%M:%S", time.localtime(newest.started_at))
        in_view = table(app).scrollable_content_region.width  # the scrollbar takes the rest
        assert started in table(app).render_line(1).crop(0, in_view).text


async def test_a_click_chooses_a_run_and_a_second_click_opens_it_at_80_columns() -> None:
    engine = make_engine()
    async with dashboard(engine, size=SMALL) as (app, pilot):
        ids = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await eventually(lambda: table(app).shown_keys == list(reversed(ids)))
        detail = app.main.query_one(RunDetail)
        row = (table(app).cursor_row + 1) % 3  # a row the cursor is not on
        chosen = table(app).shown_keys[row]
        await pilot.click(table(app), offset=(3, 1 + row))  # line 0 is the header
        await eventually(lambda: table(app).selected_run_id == chosen)
        await pilot.pause()
        assert detail.region.area == 0  # chosen, not opened yet
        await pilot.click(table(app), offset=(20, 1 + row))
        await eventually(lambda: detail.region.width >= SMALL[0] - 2)
        assert detail.record is not None and detail.record.id == chosen


async def test_the_scheduler_tab_shows_no_stray_scrollbars_at_80_columns() -> None:
    from taskwatch.widgets import QueuesTable, TriggersTable

    engine = make_engine()

    async def send(job: Any) -> None:
        return None

    engine.queue("mail", send, concurrency=1)
    async with dashboard(engine, size=SMALL) as (app, pilot):
        await pilot.press("3")
        await eventually(lambda: app.state.schedule and app.state.queues)
        await pilot.pause()
        for kind in (ScheduleTable, QueuesTable, TriggersTable):
            widget = app.main.query_one(kind)
            assert not widget.show_horizontal_scrollbar and not widget.show_vertical_scrollbar, kind.__name__


async def test_the_failures_cursor_stays_on_its_failure_as_newer_ones_arrive() -> None:
    engine = make_engine()
    async with dashboard(engine) as (app, pilot):
        first = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await pilot.press("2")
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: len(failures.table.shown_keys) == 3)
        assert failures.select("run", first[1])
        for _ in range(4):
            await (await engine.submit("explode")).wait(2)
        await eventually(lambda: len(failures.table.shown_keys) == 7)
        await pilot.pause()
        assert failures.selected == ("run", first[1])


async def test_z_on_a_disabled_periodic_task_shows_it_paused() -> None:
    engine = make_engine(flags={"nightly": False})

    @engine.periodic(every=60.0, opt_in="nightly", name="gated")
    async def gated(ctx: Any) -> None:
        return None

    async with dashboard(engine, size=LARGE) as (app, pilot):
        await pilot.press("3")
        schedule = app.main.query_one(ScheduleTable)
        await eventually(lambda: "gated" in schedule.shown_keys)
        schedule.select_name("gated")
        await pilot.press("z")
        await eventually(lambda: any(p.paused for p in engine.schedule() if p.name == "gated"))
        await eventually(lambda: str(schedule.get_cell("gated", "state")) == "paused")
        assert "flag nightly is off" in str(schedule.get_cell("gated", "note"))


# ---------------------------------------------------------------- per-task statistics


class Item(BaseModel):
    n: int


def cell_text(widget: Any, row: str, column: str) -> str:
    return str(widget.get_cell(row, column))


async def test_the_tasks_tab_shows_per_task_counts_rates_durations_and_errors_by_type() -> None:
    from taskwatch.widgets import TaskStatsTable

    engine = make_engine()

    @engine.task(name="picky")
    async def picky(ctx: Any, params: Item) -> int:
        n = params.n
        if n % 3 == 0:
            raise KeyError(f"no item {n}")
        if n % 3 == 1:
            raise ValueError(f"bad item {n}")
        return n

    async with dashboard(engine, size=LARGE) as (app, pilot):
        for n in range(6):
            await (await engine.submit("picky", {"n": n})).wait(2)
        for _ in range(2):
            await (await engine.submit("embed_batch", {"user_id": "u", "contents": ["a"]})).wait(2)
        await pilot.press("6")
        stats = app.main.query_one(TaskStatsTable)
        assert app.focused is stats
        await eventually(lambda: cell_text(stats, "picky", "submitted") == "6")
        await eventually(lambda: cell_text(stats, "embed_batch", "succeeded") == "2")
        assert cell_text(stats, "picky", "failed") == "4"
        assert cell_text(stats, "picky", "rate") == "66.7%"
        assert cell_text(stats, "picky", "errors") in ("KeyError ×2  ValueError ×2", "ValueError ×2  KeyError ×2")
        assert cell_text(stats, "embed_batch", "rate") == "0.0%"
        assert cell_text(stats, "embed_batch", "p50").endswith("s")
        assert cell_text(stats, "picky", "last") != "—"
        assert "since" in visible(app.main.query_one("#task-stats-since"))


def test_percentiles_are_nearest_rank() -> None:
    from taskwatch.tui.task_stats import percentile

    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50.0 and percentile(values, 0.95) == 95.0
    assert percentile([3.0], 0.95) == 3.0 and percentile([], 0.5) is None


# ---------------------------------------------------------------- bulk actions


async def test_space_marks_runs_and_c_cancels_every_marked_run_after_one_confirmation() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        held = [await engine.submit("hold") for _ in range(3)]
        await eventually(lambda: all(shown_status(app, h.id) == "running" for h in held))
        await pilot.press("g")  # newest first: held[2], held[1], held[0]
        assert table(app).selected_run_id == held[2].id
        await pilot.press("space")  # marks held[2], moves down
        await pilot.press("space")  # marks held[1]
        assert table(app).marked == [held[2].id, held[1].id]
        assert table(app).get_cell(held[2].id, "id").style == "bold black on yellow"
        await pilot.press("c")
        dialog = await screen_shown(app, ConfirmScreen)
        assert "2 marked runs" in dialog.question and held[2].id in dialog.question and held[1].id in dialog.question
        await pilot.press("y")
        await eventually(lambda: engine.get(held[2].id).status is RunStatus.CANCELLED)
        await eventually(lambda: engine.get(held[1].id).status is RunStatus.CANCELLED)
        assert engine.get(held[0].id).status is RunStatus.RUNNING
        await eventually(lambda: table(app).marked == [])
        assert any("cancelled 2 of 2 marked runs" in n for n in notes(app))


async def test_r_on_failures_retries_every_failure_of_that_task() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        failed = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]

        @engine.task(name="other_failure")
        async def other_failure(ctx: Any) -> None:
            raise KeyError("other")

        other = (await (await engine.submit("other_failure")).wait(2)).id
        await pilot.press("2")
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: len(failures.table.shown_keys) == 4)
        failures.select("run", failed[0])
        await pilot.pause()
        await pilot.press("R")
        dialog = await screen_shown(app, ConfirmScreen)
        assert "3 failed runs of task explode" in dialog.question
        await pilot.press("enter")
        await eventually(lambda: any("retried 3 of 3 runs" in n for n in notes(app)))
        await eventually(lambda: {r.source for r in engine.runs(task="explode")} >= {f"retry:{i}" for i in failed})
        assert not [r for r in engine.runs(limit=None) if r.source == f"retry:{other}"]
        # pressed again, a failure already retried is left out: only the retries' own failures are offered
        retries = {r.id for r in engine.runs(task="explode") if r.source.startswith("retry:")}
        await eventually(lambda: retries <= set(app.state.failures))
        await pilot.press("R")
        dialog = await screen_shown(app, ConfirmScreen)
        assert "3 failed runs of task explode" in dialog.question
        assert not any(run_id in dialog.question for run_id in failed)
        await pilot.press("n")


async def test_e_opens_the_submit_form_filled_with_a_runs_params_to_edit_and_resubmit() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        first = await (await engine.submit("embed_batch", {"user_id": "u1", "contents": ["a"], "batch": 3})).wait(2)
        await eventually(lambda: shown_status(app, first.id) == "succeeded")
        table(app).select_run(first.id)
        await pilot.press("e")
        screen = await screen_shown(app, SubmitScreen)
        form = await eventually(lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm))
        assert form.field_widget("user_id").value == "u1" and form.field_widget("batch").value == "3"
        assert first.id in str(screen.query_one("#submit-title").content)
        form.field_widget("user_id").value = "u2"
        await pilot.click("#submit-ok")
        await eventually(lambda: not isinstance(app.screen, SubmitScreen))
        resubmitted = [r for r in engine.runs(task="embed_batch") if r.id != first.id]
        assert len(resubmitted) == 1
        assert resubmitted[0].params == {"user_id": "u2", "contents": ["a"], "batch": 3}


class LateReplies(LocalClient):
    """Commands reach the engine, and their replies are lost: each waits for ``reply`` and
    then times out, as a remote engine's would."""

    def __init__(self, engine: Engine) -> None:
        super().__init__(engine, manage=True)
        self.reply = asyncio.Event()
        self.sent = 0

    async def _lost_reply(self, kind: str) -> NoReturn:
        self.sent += 1
        await self.reply.wait()
        raise TimeoutError(f"no reply from the engine to {kind!r} within 3 s")

    async def submit(self, task: str, params: dict[str, Any] | None = None, key: str | None = None) -> Any:
        await super().submit(task, params, key)
        await self._lost_reply("submit")

    async def cancel(self, run_id: str) -> Any:
        await super().cancel(run_id)
        await self._lost_reply("cancel")


async def test_a_submit_without_reply_says_the_run_may_exist_and_submit_waits_meanwhile() -> None:
    engine = make_engine()
    client = LateReplies(engine)
    app = TaskwatchApp(client, refresh_hz=30.0, overview_interval=0.2, cursor_blink=False, confirm=False)
    async with app.run_test(size=LARGE) as pilot:
        await eventually(lambda: app.state.node_id == "dash-test")
        screen = await open_submit(app, pilot, "embed_batch")
        screen.form.field_widget("user_id").value = "u1"
        screen.form.field_widget("contents").value = '["a"]'
        await pilot.click("#submit-ok")
        await eventually(lambda: client.sent == 1)
        button = screen.query_one("#submit-ok", Button)
        assert button.disabled  # while the request waits for its reply
        await pilot.click("#submit-ok")  # an impatient second press, then Enter in a field
        screen.form.field_widget("user_id").focus()
        await pilot.press("enter")
        await pilot.pause()
        assert client.sent == 1 and len(engine.runs(task="embed_batch")) == 1
        client.reply.set()
        error = screen.query_one("#submit-error", Static)
        await eventually(lambda: "may have been submitted" in str(error.content))
        assert "not submitted" not in str(error.content) and "check the Runs tab" in str(error.content)
        assert not button.disabled and app.screen is screen
        assert len(engine.runs(task="embed_batch")) == 1

        # a cancel without reply does not claim it failed either
        await pilot.press("escape")
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")
        table(app).select_run(held.id)
        await pilot.press("c")
        await eventually(lambda: any("cancel" in n and "may have been done" in n for n in notes(app)))
        assert not any("cancel failed" in n for n in notes(app))
        engine.resources["release"].set()


class Blob(BaseModel):
    text: str
    n: int = 1


async def test_edit_and_traceback_from_the_failures_tab_use_the_whole_run_when_attached(tmp_path: Any) -> None:
    """Attached, a run's large params and traceback arrive cut down: the form and the
    traceback show them whole, never the stand-in."""
    from taskwatch.engine import is_truncated
    from taskwatch.tui.remote_client import RemoteClient
    from taskwatch.tui.screens import TracebackScreen

    engine = Engine(node_id="big-failures", health_interval=None)

    @engine.task
    async def big_failure(ctx: Any, params: Blob) -> None:
        raise ValueError("kaboom " + "y" * 30_000 + " the end")

    big = "x" * 40_000
    async with engine:
        failed = await (await engine.submit("big_failure", {"text": big, "n": 3})).wait(5)
        server = await engine.serve(str(tmp_path / "big.sock"), announce=False)
        app = TaskwatchApp(RemoteClient(server.address), refresh_hz=30.0, cursor_blink=False)
        async with app.run_test(size=LARGE) as pilot:
            await eventually(lambda: failed.id in app.state.failures)
            listed = app.state.failures[failed.id]
            assert is_truncated(listed.params) and is_truncated(listed.error.traceback)  # type: ignore[union-attr]
            await pilot.press("2")
            failures = app.main.query_one(FailuresList)
            await eventually(lambda: failures.selected == ("run", failed.id))
            await pilot.press("e")
            screen = await screen_shown(app, SubmitScreen)
            form = await eventually(lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm))
            assert form.field_widget("text").value == big and form.field_widget("n").value == "3"
            await pilot.press("escape")
            await eventually(lambda: app.screen is app.main)
            await pilot.press("t")
            shown = await screen_shown(app, TracebackScreen)
            body = str(shown.query_one("#traceback-body", Static).content.code)  # type: ignore[attr-defined]
            assert "characters truncated" not in body and body.rstrip().endswith("y the end")
            await app.action_quit()


@pytest.mark.parametrize("attached", [False, True], ids=["in-process", "attached"])
async def test_failures_older_than_the_snapshots_runs_are_listed_and_outlive_a_resync(
    attached: bool, tmp_path: Any
) -> None:
    from taskwatch.tui.remote_client import RemoteClient

    engine = make_engine()
    async with engine:
        failed = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await quick_runs(engine, 30)
        if attached:
            server = await engine.serve(str(tmp_path / "e.sock"), announce=False)
            client: Any = RemoteClient(server.address)
        else:
            client = LocalClient(engine)
        app = TaskwatchApp(client, refresh_hz=30.0, overview_interval=0.2, max_rows=10)
        async with app.run_test(size=LARGE) as pilot:
            await eventually(lambda: app.state.node_id == "dash-test")
            assert not set(failed) & set(table(app).shown_keys)  # older than the newest runs shown
            await pilot.press("2")
            failures = app.main.query_one(FailuresList)
            await eventually(lambda: failures.table.shown_keys == [f"run:{i}" for i in reversed(failed)])
            app.resync()
            await eventually(lambda: app.state.last_seq == engine.bus.last_seq)
            await pilot.pause()
            assert failures.table.shown_keys == [f"run:{i}" for i in reversed(failed)]
            await app.action_quit()


# ---------------------------------------------------------------- serving


async def test_a_served_dashboard_shows_the_attach_command_in_a_dialog(tmp_path: Any) -> None:
    from taskwatch.tui.screens import AttachScreen

    engine = make_engine()
    async with engine:
        server = await engine.serve("tcp://127.0.0.1:0", token="a-token-of-sufficient-length-42", announce=False)
        info = server.info()
        app = TaskwatchApp(LocalClient(engine), refresh_hz=30.0, serving=info)
        async with app.run_test(size=SMALL) as pilot:
            await eventually(lambda: any(info.address in n for n in notes(app)))
            assert not any("a-token-of" in n for n in notes(app))  # never in a passing message
            titles = {c.title for c in app.get_system_commands(app.screen)}
            assert "Attach command" in titles
            app.action_attach_command()
            dialog = await screen_shown(app, AttachScreen)
            assert dialog.command == f"TASKWATCH_TOKEN=a-token-of-sufficient-length-42 taskwatch attach {info.address}"
            await pilot.press("escape")
            await eventually(lambda: app.screen is app.main)
            await app.action_quit()
        engine.resources["release"].set()


# ---------------------------------------------------------------- keys per tab, leadership, paused graphs


def footer_keys(app: TaskwatchApp) -> set[str]:
    """The keys the footer draws (what a user reads as working here)."""
    return {str(k.key) for k in app.main.query("FooterKey")}


async def test_c_is_offered_only_where_a_run_can_be_cancelled() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        await eventually(lambda: shown_status(app, failed.id) == "failed")
        await eventually(lambda: {"c", "r"} <= footer_keys(app))
        await pilot.press("2")
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: failures.selected == ("run", failed.id))
        # a failed run cannot be cancelled: the Failures tab offers retry, not cancel
        await eventually(lambda: "r" in footer_keys(app) and "c" not in footer_keys(app))
        await pilot.press("c")
        await pilot.pause()
        assert app.screen is app.main and not [n for n in notes(app) if "cancel" in n]
        for tab in ("3", "4", "5", "6"):
            await pilot.press(tab)
            await eventually(lambda: "c" not in footer_keys(app))
        await pilot.press("1")
        await eventually(lambda: "c" in footer_keys(app))


class LosableLease(InProcessLease):
    """An in-process lease that can stop answering this node: renewals and elections refused."""

    def __init__(self) -> None:
        super().__init__(ttl=30.0, renew_interval=0.05)
        self.refusing = False

    async def acquire(self, node_id: str) -> LeaseState | None:
        return None if self.refusing else await super().acquire(node_id)

    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        return None if self.refusing else await super().renew(node_id, term)

    async def holder(self) -> LeaseState | None:
        return None if self.refusing else await super().holder()


async def test_the_badge_stops_naming_this_node_leader_as_soon_as_it_loses_the_lease() -> None:
    from taskwatch.widgets import LeaderBadge

    lease = LosableLease()
    engine = make_engine(lease=lease)
    lost = Recorder(engine, ("lease.lost",))
    # no overview refresh in the test's time: only the lease events tell the dashboard
    async with dashboard(engine, size=LARGE, overview_interval=3600.0) as (app, pilot):
        badge = app.main.query_one(LeaderBadge)
        await eventually(lambda: badge.state == "leader")
        lease.refusing = True
        await eventually(lambda: lost.events)
        await eventually(lambda: badge.state == "follower")
        assert badge.holder != "dash-test"
        assert "leader dash-test" not in visible(badge)
        assert app.state.leadership is not None and app.state.leadership.holder is None


async def test_health_samples_taken_while_the_view_is_paused_reach_the_graphs_on_resume() -> None:
    from taskwatch.widgets import HealthSparklines

    engine = make_engine(health_interval=0.02)
    async with dashboard(engine, size=LARGE) as (app, pilot):
        lines = app.main.query_one(HealthSparklines)
        await eventually(lambda: len(lines.history("cpu")) >= 2)
        await pilot.press("p")
        assert app.view_paused
        graph = lines.query_one("#health-spark-cpu", Sparkline)
        frozen, taken = list(graph.data or []), len(app.state.health)
        await eventually(lambda: len(app.state.health) >= taken + 5)
        assert list(graph.data or []) == frozen  # the view stays still while paused
        await pilot.press("p")
        assert not app.view_paused
        # every sample the dashboard took, including those of the pause, is in the graphs
        kept = lines.history_size
        await eventually(lambda: lines.last_sample is app.state.latest_health())
        samples = list(app.state.health)[-kept:]
        assert lines.history("cpu") == [float(s.cpu_percent) for s in samples]
        assert lines.history("threads") == [float(s.threads) for s in samples]
        assert list(graph.data or []) == lines.history("cpu")


# ---------------------------------------------------------------- reported by a review


async def test_an_untouched_failures_list_follows_the_newest_failure_and_r_retries_that_one() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        first = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await pilot.press("2")
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: failures.selected == ("run", first[-1]))
        newer = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await eventually(lambda: failures.selected == ("run", newer[-1]))
        assert failures.table.shown_keys[0] == f"run:{newer[-1]}"
        await pilot.press("r")
        await eventually(lambda: [r for r in engine.runs(limit=None) if r.source == f"retry:{newer[-1]}"])
        assert not [r for r in engine.runs(limit=None) if r.source == f"retry:{first[0]}"]


async def test_a_chosen_failure_pushed_out_of_the_list_leaves_none_selected_for_r_to_hit() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        app.state.max_failures = 4  # the list's bound, reached sooner
        first = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await pilot.press("2")
        failures = app.main.query_one(FailuresList)
        await eventually(lambda: failures.selected == ("run", first[-1]))
        await pilot.press("j")  # chosen: held as newer failures arrive
        assert failures.selected == ("run", first[1])
        await (await engine.submit("explode")).wait(2)
        await eventually(lambda: len(failures.table.shown_keys) == 4)
        await pilot.pause()
        assert failures.selected == ("run", first[1])
        pushing = [(await (await engine.submit("explode")).wait(2)).id for _ in range(3)]
        await eventually(lambda: f"run:{first[1]}" not in failures.table.shown_keys)
        await pilot.pause()
        # not moved to a neighbour, which r would then retry
        assert failures.selected is None
        assert "No failure selected" in visible_text(failures.query_one("#failures-traceback"))
        await pilot.press("r")
        await eventually(lambda: any("select a run to retry" in n for n in notes(app)))
        assert not [r for r in engine.runs(limit=None) if r.source.startswith("retry:")]
        await pilot.press("j")  # the cursor comes back where it was
        assert failures.selected is not None
        await pilot.press("g")  # and follows the newest again
        assert failures.selected == ("run", pushing[-1])
        newest = (await (await engine.submit("explode")).wait(2)).id
        await eventually(lambda: failures.selected == ("run", newest))


def actions_under_way(app: TaskwatchApp) -> int:
    return sum(1 for worker in app.workers if worker.group == "actions" and not worker.is_finished)


def waiting(app: TaskwatchApp) -> list[str]:
    """The messages saying a key was pressed again while its command waits for its reply."""
    return [n for n in notes(app) if "still waiting for the engine" in n]


async def test_r_or_c_pressed_again_while_the_engine_has_not_answered_acts_once() -> None:
    engine = make_engine()
    bg = engine.start_background()
    answer = threading.Event()
    try:
        app = TaskwatchApp(LocalClient(engine), refresh_hz=30.0, overview_interval=0.2, confirm=False)
        async with app.run_test(size=LARGE) as pilot:
            await eventually(lambda: app.state.node_id == "dash-test")
            failed = bg.submit("explode")
            failed.wait(timeout=2)
            held = bg.submit("hold")
            await eventually(lambda: shown_status(app, failed.id) == "failed")
            await eventually(lambda: shown_status(app, held.id) == "running")

            for key, run_id in (("r", failed.id), ("c", held.id)):
                assert table(app).select_run(run_id)
                # the engine answers nothing for now: its loop is busy
                answer.clear()
                assert engine.loop is not None
                engine.loop.call_soon_threadsafe(answer.wait, 10)
                await pilot.press(key)
                await eventually(lambda: actions_under_way(app) == 1)
                said = len(waiting(app))
                await pilot.press(key)  # nothing seemed to happen: pressed again
                await eventually(lambda: len(waiting(app)) > said)
                assert f"run {run_id}" in waiting(app)[-1]
                await eventually(lambda: actions_under_way(app) == 1)  # the first press's alone
                answer.set()
                await eventually(lambda: actions_under_way(app) == 0)
            assert len([r for r in engine.runs(limit=None) if r.source == f"retry:{failed.id}"]) == 1
            assert engine.get(held.id).status is RunStatus.CANCELLED
            await app.action_quit()
    finally:
        answer.set()
        engine.resources["release"].set()
        bg.stop(timeout=2)


async def test_task_filter_quotes_a_name_with_a_space() -> None:
    engine = make_engine()
    for name in ("send email", "send", "email digest"):
        engine.task(name=name)(_nothing)
    async with dashboard(engine, size=LARGE) as (app, pilot):
        ids = {name: (await (await engine.submit(name)).wait(2)).id for name in ("send email", "send", "email digest")}
        await eventually(lambda: set(ids.values()) <= set(table(app).shown_keys))
        await pilot.press("slash", *'task:"send email"', "enter")
        await eventually(lambda: table(app).shown_keys == [ids["send email"]])
        box = app.main.query_one("#runs-filter", Input)
        box.value = "t:'email digest',send"
        await eventually(lambda: set(table(app).shown_keys) == {ids["email digest"], ids["send"]})
        box.value = 'task:"send email'  # a quote never closed runs to the end
        await eventually(lambda: table(app).shown_keys == [ids["send email"]])
        box.value = '"'
        await pilot.press("enter")
        await eventually(lambda: len(table(app).shown_keys) == 3)
        assert app.is_running


async def _nothing(ctx: Any) -> None:
    return None


async def test_a_run_that_ends_while_the_view_is_paused_is_shown_ended_on_resume_however_many_came_after() -> None:
    # newer runs meanwhile push it out of the newest runs listed; its row is still in the table
    # (finished rows are trimmed only in batches), and must not stay "running"
    engine = make_engine()

    @engine.task(name="quick")
    async def quick(ctx: Any) -> None:
        return None

    async with dashboard(engine, size=LARGE, max_rows=5) as (app, pilot):
        held = await engine.submit("hold")
        await eventually(lambda: shown_status(app, held.id) == "running")
        await pilot.press("p")
        assert app.view_paused
        for _ in range(6):
            await (await engine.submit("quick")).wait(5)
        engine.resources["release"].set()
        await held.wait(5)
        await pilot.press("p")
        assert not app.view_paused
        # (None: let go as one of the oldest finished runs, which is no stale row either)
        await eventually(lambda: shown_status(app, held.id) in (None, "succeeded"))
