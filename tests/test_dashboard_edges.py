"""The dashboard at its edges: what edit-and-resubmit carries back and draws, what an untouched
secret sends, the event JSON view, long names, awkward text from tasks, pasted attach
commands, Esc on a confirmed filter, and bulk cancels of runs that take their time to stop.

Every test drives the real app with Pilot on a live engine.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import re
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, SecretStr
from rich.syntax import Syntax
from taskwatch.engine import Engine, RunRecord, RunStatus, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.screens import AttachScreen, ChooseKeyScreen, ConfirmScreen, EventScreen, SubmitScreen
from taskwatch.widgets import EventLog, FailuresList, ParamsForm, RunsTable, TaskStatsTable
from textual.command import CommandList, CommandPalette
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, OptionList, Select, Static

from .helpers import eventually, screen_shown
from .test_dashboard import make_engine, shown_status, table
from .test_dashboard_use import LARGE, SMALL, dashboard, notes, visible, visible_text

#: what must never reach the terminal from a task's text: C0/C1 controls, DEL, bidi overrides
RAW_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


#: ESC ] 0 ; (retitle the window), C1 CSI 2J (clear the screen), RLO (reverse what follows)
HOSTILE = "T\x1b]0;PWN\x07\x9b2J\u202eZ"


class Note(BaseModel):
    text: str = "x"
    data: dict[str, Any] = {}


class Mail(BaseModel):
    to: str
    subject: str = "Your weekly digest"
    note: str | None = "n/a"


class Loose(BaseModel):
    model_config = ConfigDict(extra="allow")
    a: int = 1


class Login(BaseModel):
    user: str = "bot"
    api_key: SecretStr = SecretStr("real-key-from-config")


def form_engine() -> Engine:
    engine = Engine(node_id="form-node", health_interval=None)

    @engine.task(name="note")
    async def note(ctx: TaskContext, params: Note) -> None:
        raise RuntimeError("refused")

    @engine.task(name="mail")
    async def mail(ctx: TaskContext, params: Mail) -> None:
        raise RuntimeError("smtp down")

    @engine.task(name="loose")
    async def loose(ctx: TaskContext, params: Loose) -> None:
        raise RuntimeError("boom")

    @engine.task(name="login")
    async def login(ctx: TaskContext, params: Login) -> None:
        engine.resources.setdefault("keys", []).append(params.api_key.get_secret_value())

    @engine.task(name="echo")
    async def echo(ctx: TaskContext) -> str:
        return "A\u202eB\x9b2J"

    return engine


def make_app(engine: Engine) -> TaskwatchApp:
    return TaskwatchApp(LocalClient(engine, manage=True), refresh_hz=30.0, overview_interval=0.2, cursor_blink=False)


async def started(app: TaskwatchApp, pilot: Pilot[Any]) -> None:
    await eventually(lambda: app.state.node_id == "form-node")
    await pilot.pause()


async def edit_run(app: TaskwatchApp, pilot: Pilot[Any], run: RunRecord) -> tuple[SubmitScreen, ParamsForm]:
    """``e`` on ``run``: the submit form filled with its params."""
    runs = app.main.query_one(RunsTable)
    await eventually(lambda: runs.record(run.id) is not None)
    runs.select_run(run.id)
    await pilot.pause()
    await pilot.press("e")
    screen = await screen_shown(app, SubmitScreen)
    form = await eventually(lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm))
    await pilot.pause()
    return screen, form


async def submit_and_get_new_run(
    engine: Engine, app: TaskwatchApp, pilot: Pilot[Any], task: str
) -> RunRecord:
    before = {r.id for r in engine.runs(limit=None)}
    await pilot.click("#submit-ok")
    await eventually(lambda: not isinstance(app.screen, SubmitScreen))
    (new,) = [r for r in engine.runs(task=task, limit=None) if r.id not in before]
    return new


# ---------------------------------------------------------------- edit and resubmit


async def test_edit_and_resubmit_draws_control_characters_escaped_and_submits_them_unchanged() -> None:
    engine = form_engine()
    original = {"text": HOSTILE, "data": {"k": "D\x9b2J\u202eZ"}}
    async with make_app(engine).run_test(size=(120, 40)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        await started(app, pilot)
        run = await (await engine.submit("note", original)).wait(2)
        screen, form = await edit_run(app, pilot, run)
        # every text field draws what it holds: no control character of the run's reaches the terminal
        shown = [widget.value for widget in screen.query(Input)]
        assert shown and not [text for text in shown if RAW_CONTROL.search(text)], shown
        assert json.loads(form.field_widget("text").value) == HOSTILE  # escaped, not lost
        # untouched: the run's params exactly
        again = await submit_and_get_new_run(engine, app, pilot, "note")
        assert again.params == original
        # edited inside the quotes: what the escapes spell, with the edit
        screen, form = await edit_run(app, pilot, again)
        text = form.field_widget("text")
        assert isinstance(text, Input)
        text.value = text.value.replace("PWN", "OK")
        edited = await submit_and_get_new_run(engine, app, pilot, "note")
        assert edited.params == {"text": HOSTILE.replace("PWN", "OK"), "data": original["data"]}


async def test_an_unchanged_resubmit_sends_the_runs_params_exactly() -> None:
    engine = form_engine()
    cases: list[tuple[str, dict[str, Any]]] = [
        ("mail", {"to": "a@b", "subject": "", "note": ""}),  # "" is not the default, nor None
        ("mail", {"to": "", "subject": "hi", "note": None}),  # "" passes where a value is required
        ("loose", {"a": 2, "extra_key": [1, 2]}),  # a key the schema does not name
    ]
    async with make_app(engine).run_test(size=(140, 50)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        await started(app, pilot)
        for task, params in cases:
            run = await (await engine.submit(task, params)).wait(2)
            screen, form = await edit_run(app, pilot, run)
            if task == "mail":
                # an empty string is shown as one, not as a blank that would mean something else
                empty = [name for name, value in params.items() if value == ""]
                assert [form.field_widget(name).value for name in empty] == ['""'] * len(empty)
            else:
                # kept, and in sight
                other = form.field_widget(ParamsForm.OTHER_PARAMS)
                assert isinstance(other, Input) and json.loads(other.value) == {"extra_key": [1, 2]}
            again = await submit_and_get_new_run(engine, app, pilot, task)
            assert again.params == run.params == params


async def submit_form(app: TaskwatchApp, pilot: Pilot[Any], task: str) -> ParamsForm:
    """The submit dialog opened with ``s`` and ``task`` chosen: its params form, drawn."""
    await started(app, pilot)
    await pilot.press("s")
    screen = await screen_shown(app, SubmitScreen)
    screen.query_one("#submit-task").value = task  # type: ignore[attr-defined]
    form: ParamsForm = await eventually(
        lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm).task_info.name == task
        and screen.query_one(ParamsForm)
    )
    await pilot.pause()
    return form


async def test_a_new_submission_still_leaves_empty_optional_fields_to_the_task() -> None:
    engine = form_engine()
    async with make_app(engine).run_test(size=(120, 40)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        form = await submit_form(app, pilot, "mail")
        form.field_widget("to").value = "a@b"
        form.field_widget("subject").value = ""
        form.field_widget("note").value = ""
        # as the README says: emptied, the default; emptied and nullable, null
        run = await submit_and_get_new_run(engine, app, pilot, "mail")
        assert run.params == {"to": "a@b", "subject": "Your weekly digest", "note": None}


class Payment(BaseModel):
    amount: Decimal
    ratio: float = 1.0


async def test_a_decimal_typed_in_the_form_reaches_the_task_exactly_as_engine_submit_would_take_it() -> None:
    engine = form_engine()
    got: list[tuple[Decimal, float]] = []

    @engine.task(name="pay")
    async def pay(ctx: TaskContext, params: Payment) -> None:
        got.append((params.amount, params.ratio))

    typed = "12345678901234567890.12"  # more digits than a float holds
    async with make_app(engine).run_test(size=(120, 40)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        form = await submit_form(app, pilot, "pay")
        form.field_widget("amount").value = typed
        form.field_widget("ratio").value = "0.1"  # a float field reads a float, as before
        run = await submit_and_get_new_run(engine, app, pilot, "pay")
        await engine.handle(run.id).wait(2)
        direct = await (await engine.submit("pay", {"amount": typed, "ratio": 0.1})).wait(2)
        assert got == [(Decimal(typed), 0.1), (Decimal(typed), 0.1)]
        assert run.params == direct.params
        # a number a float holds as typed is still taken as a number
        form = await submit_form(app, pilot, "pay")
        form.field_widget("amount").value = "2.5"
        await submit_and_get_new_run(engine, app, pilot, "pay")
        await eventually(lambda: len(got) == 3)
        assert got[-1][0] == Decimal("2.5")
        # edited again, the amount is shown as typed, not as a quoted string
        _, form = await edit_run(app, pilot, run)
        assert form.field_widget("amount").value == typed


async def test_an_untouched_secret_is_not_sent_as_its_schema_mask() -> None:
    engine = form_engine()
    async with make_app(engine).run_test(size=(120, 40)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        form = await submit_form(app, pilot, "login")
        # the schema's default of a SecretStr is a mask: left out, the task's own default applies
        assert form.collect() == {"user": "bot"}
        await pilot.click("#submit-ok")
        # the engine answers: a run, or its refusal beside the field; never a run given the mask
        await eventually(lambda: not isinstance(app.screen, SubmitScreen) or form.field_error("api_key"))
        assert not [run for run in engine.runs(task="login", limit=None) if "**********" in str(run.params)]
        assert "**********" not in engine.resources.get("keys", [])
        # typed, it is sent
        form.field_widget("api_key").value = "s3cret"
        assert form.collect() == {"user": "bot", "api_key": "s3cret"}


# ---------------------------------------------------------------- the event JSON view


async def test_the_event_json_view_draws_control_characters_escaped_and_copies_them_as_sent() -> None:
    engine = form_engine()
    async with make_app(engine).run_test(size=(120, 40)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        await started(app, pilot)
        await (await engine.submit("echo")).wait(2)
        await pilot.press("5")
        log = app.main.query_one(EventLog)
        log.set_filter("run.succeeded")
        await pilot.press("g")
        await eventually(lambda: getattr(log.chosen, "kind", None) == "run.succeeded")
        await pilot.press("enter")
        screen = await screen_shown(app, EventScreen)
        await pilot.pause()
        body = screen.query_one("#event-body", Static).content
        assert isinstance(body, Syntax)
        assert not RAW_CONTROL.search(body.code.replace("\n", "")), body.code
        assert "A\\u202eB\\x9b2J" in body.code
        assert json.loads(screen.json)["result"] == "A\u202eB\x9b2J"  # copied as the wire has it


# ---------------------------------------------------------------- long names


LONG = "reindex_" + "x" * 292


async def test_one_long_task_name_leaves_the_other_columns_in_sight() -> None:
    engine = Engine(node_id="form-node", health_interval=None)
    for name in (LONG, "short"):

        @engine.task(name=name)
        async def fails(ctx: TaskContext) -> None:
            raise RuntimeError("disk full")

    async with make_app(engine).run_test(size=(120, 24)) as pilot:
        app = pilot.app
        assert isinstance(app, TaskwatchApp)
        await started(app, pilot)
        for name in (LONG, "short"):
            await (await engine.submit(name)).wait(2)
        await pilot.press("2")
        failures = app.main.query_one(FailuresList).table
        await eventually(lambda: failures.row_count == 2)
        await pilot.press("6")
        stats = app.main.query_one(TaskStatsTable)
        await eventually(lambda: stats.row_count == 2)
        await pilot.pause()
        for table in (failures, stats):
            assert isinstance(table, DataTable)
            # every column starts on screen, the last (free text: the errors) with room to read it
            widths = [column.get_render_width(table) for column in table.columns.values()]
            assert sum(widths[:-1]) <= app.size.width - 12, (type(table).__name__, widths)
            names = [str(table.get_row_at(i)[0 if table is stats else 1]) for i in range(2)]
            assert any(n.startswith("reindex_x") and n.endswith("…") for n in names), names
            assert "short" in names


#: text from tasks that Rich/Textual markup would read as tags (and raise on, or eat)
CLOSING_PATH = "Reads paths like [/tmp/x]."


LINK = "see [link=https://x]docs[/link]"


class Mode(str, enum.Enum):
    odd = "a[/]b"
    plain = "plain"


class ModeParams(BaseModel):
    mode: Mode  # required, no default: the field starts blank, its prompt drawn


def markup_engine() -> Engine:
    engine = make_engine()

    @engine.task(name="boom[/]x", description=f"{CLOSING_PATH} {LINK}")
    async def boom(ctx: TaskContext, params: ModeParams) -> None:
        return None

    @engine.task(name="[bold red]loud", description="says \x1b[31mred\x1b[0m [/]")
    async def loud(ctx: TaskContext) -> None:
        return None

    return engine


def select_label(select: Select[Any]) -> str:
    """What a Select shows as its value (or its prompt while nothing is picked)."""
    return visible(select.query(Static).first())


async def open_list(pilot: Pilot, select: Select[Any]) -> OptionList:
    select.focus()
    await pilot.pause()
    await pilot.press("enter")
    overlay = select.query_one(OptionList)
    await eventually(lambda: overlay.display and overlay.size.height > 0)
    await pilot.pause()
    return overlay


async def palette_lines(app: TaskwatchApp, pilot: Pilot, query: str, wanted: str) -> list[str]:
    """The palette's hits for ``query``, as drawn, once one of them holds ``wanted``."""
    await pilot.press("ctrl+p")
    palette = await screen_shown(app, CommandPalette)
    await pilot.press(*query)
    hits = palette.query_one(CommandList)

    def drawn() -> list[str]:
        return [line.rstrip() for y in range(hits.size.height) if (line := hits.render_line(y).text.strip())]

    await eventually(lambda: any(wanted in line for line in drawn()))
    lines = drawn()
    await pilot.press("escape")
    await eventually(lambda: app.screen is app.main)
    return lines


# ---------------------------------------------------------------- markup-like text from tasks


async def test_the_submit_form_draws_task_names_descriptions_and_choices_that_look_like_markup_as_written() -> None:
    engine = markup_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        await eventually(lambda: any(t.name == "boom[/]x" for t in app.state.tasks))
        await pilot.press("s")
        screen = await screen_shown(app, SubmitScreen)
        tasks = screen.query_one("#submit-task", Select)
        tasks.value = "boom[/]x"
        await eventually(lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm).task_info.name == "boom[/]x")
        await pilot.pause()
        assert select_label(tasks).startswith("boom[/]x")
        assert visible_text(screen.query_one("#submit-description", Static)) == f"{CLOSING_PATH} {LINK}"
        # the blank enum field draws its prompt, which names the choices
        mode = screen.query_one(ParamsForm).field_widget("mode")
        assert isinstance(mode, Select)
        assert select_label(mode).startswith("a[/]b | plain  (required)")
        choices = await open_list(pilot, mode)
        drawn = visible_text(choices)
        assert "a[/]b | plain (required)" in drawn and " a[/]b " in f" {drawn} "
        await pilot.press("down", "enter")  # the first choice, under the blank prompt
        await eventually(lambda: mode.value == "a[/]b")
        assert select_label(mode).startswith("a[/]b")
        # the other task: its name, and its description with escape sequences shown, not sent
        tasks.value = "[bold red]loud"
        # (no form at all for a moment: the old one is removed before the new one is mounted)
        await eventually(lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm).task_info.name == "[bold red]loud")
        await pilot.pause()
        assert select_label(tasks).startswith("[bold red]loud")
        assert visible_text(screen.query_one("#submit-description", Static)) == r"says \x1b[31mred\x1b[0m [/]"
        names = visible_text(await open_list(pilot, tasks))
        assert "boom[/]x" in names and "[bold red]loud" in names
        assert app.is_running


async def test_the_command_palette_lists_markup_like_task_names_as_written_and_every_command_after_them() -> None:
    engine = markup_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        await eventually(lambda: any(t.name == "boom[/]x" for t in app.state.tasks))
        assert "Submit boom[/]x" in await palette_lines(app, pilot, "boom", "Submit boom[/]x")
        lines = await palette_lines(app, pilot, "loud", "loud")
        assert "Submit [bold red]loud" in lines
        assert r"says \x1b[31mred\x1b[0m [/]" in lines  # its help line: the description, as written
        # the commands listed after those tasks are still there
        assert "Pause periodic hourly" in await palette_lines(app, pilot, "Pause periodic", "hourly")
        assert app.is_running


async def test_a_trigger_key_that_looks_like_markup_is_offered_as_written_and_fired() -> None:
    engine = make_engine()
    fired: list[str] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        fired.append(key)

    trigger = engine.trigger("compile", compile_key, size_threshold=100)
    async with dashboard(engine, size=LARGE) as (app, pilot):
        trigger.notify("k[/]1")
        trigger.notify("k2")
        await eventually(lambda: any(t.name == "compile" and len(t.keys) == 2 for t in app.state.triggers))
        app.action_fire_trigger("compile")  # what the palette's "Fire trigger compile" does
        dialog = await screen_shown(app, ChooseKeyScreen)
        keys = dialog.query_one(OptionList)
        await pilot.pause()
        drawn = visible_text(keys)
        assert "k[/]1" in drawn and "k2" in drawn
        keys.highlighted = next(i for i, key in enumerate(dialog.keys) if key == "k[/]1")
        await pilot.press("enter")
        await eventually(lambda: fired == ["k[/]1"])
        assert app.is_running


# ---------------------------------------------------------------- the attach command


@pytest.fixture
def odd_dir() -> Iterator[str]:
    # short, under /tmp: a unix socket path has a length limit a pytest tmp_path may pass
    path = tempfile.mkdtemp(prefix="tw a;b ")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def attach_command(engine: Engine, address: str, token: str) -> tuple[str, str]:
    """The command the dialog holds and the line it draws."""
    server = await engine.serve(address, token=token, announce=False)
    app = TaskwatchApp(LocalClient(engine), refresh_hz=30.0, serving=server.info())
    async with app.run_test(size=SMALL) as pilot:
        app.action_attach_command()
        dialog = await screen_shown(app, AttachScreen)
        await pilot.pause()
        drawn = visible_text(dialog.query_one("#attach-command", Static))
        command = dialog.command
        await app.action_quit()
    return command, drawn


async def test_the_attach_command_is_quoted_for_the_shell_it_is_pasted_into(odd_dir: str) -> None:
    engine = make_engine()
    token = "correct horse $(id) battery staple"
    socket = os.path.join(odd_dir, "e;x.sock")
    async with engine:
        command, drawn = await attach_command(engine, socket, token)
        engine.resources["release"].set()
    assert shlex.split(command) == [f"TASKWATCH_TOKEN={token}", "taskwatch", "attach", socket]
    assert drawn == command  # fits on one line at 80 columns


async def test_a_relative_socket_path_is_shown_absolute_in_the_attach_command(
    odd_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(odd_dir)
    engine = make_engine()
    async with engine:
        command, _ = await attach_command(engine, "rel.sock", "a-token-of-sufficient-length-42")
        *_, address = shlex.split(command)
        assert address == os.path.join(os.getcwd(), "rel.sock")
        assert os.path.exists(address)  # the socket the engine serves on, found from any directory
        engine.resources["release"].set()


# ---------------------------------------------------------------- Esc on a confirmed filter


async def test_esc_clears_and_closes_a_filter_confirmed_with_enter() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        failed = await (await engine.submit("explode")).wait(2)
        ok = await (await engine.submit("embed_batch", {"user_id": "u", "contents": ["a"]})).wait(2)
        await eventually(lambda: set(table(app).shown_keys) == {failed.id, ok.id})
        box = app.main.query_one("#runs-filter", Input)
        await pilot.press("slash", *"status:failed", "enter")
        await eventually(lambda: table(app).shown_keys == [failed.id])
        assert app.focused is table(app) and box.has_class("shown")
        await pilot.press("escape")
        assert box.value == "" and not box.has_class("shown")
        await eventually(lambda: set(table(app).shown_keys) == {failed.id, ok.id})
        assert app.focused is table(app)
        # on the Events tab too
        await pilot.press("5", "slash", *"run.failed", "enter")
        events_box = app.main.query_one("#events-filter", Input)
        assert events_box.has_class("shown") and not events_box.has_focus
        await pilot.press("escape")
        assert events_box.value == "" and not events_box.has_class("shown")


async def test_esc_on_another_tab_leaves_the_runs_filter_alone() -> None:
    engine = make_engine()
    async with dashboard(engine, size=LARGE) as (app, pilot):
        box = app.main.query_one("#runs-filter", Input)
        await pilot.press("slash", *"explode", "enter")
        assert box.has_class("shown")
        await pilot.press("4", "escape")  # the Runs tab's filter is out of sight: Esc there is no surprise
        assert box.value == "explode" and box.has_class("shown")


# ---------------------------------------------------------------- bulk cancel


async def test_cancelling_marked_runs_cancels_them_together_not_one_after_another() -> None:
    engine = make_engine()
    count = 4
    winding_down = 0
    all_winding_down = asyncio.Event()

    @engine.task(name="sticky")
    async def sticky(ctx: TaskContext) -> None:
        nonlocal winding_down
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # each run finishes winding down only once every one has been asked to stop: one
            # cancel at a time would leave the first waiting out its grace, still running
            winding_down += 1
            if winding_down == count:
                all_winding_down.set()
            await all_winding_down.wait()
            raise

    async with dashboard(engine, size=LARGE) as (app, pilot):
        ids = [(await engine.submit("sticky")).id for _ in range(count)]
        await eventually(lambda: all(shown_status(app, i) == "running" for i in ids))
        await pilot.press("g", *["space"] * count)  # from the newest down: each marks and moves on
        assert sorted(table(app).marked) == sorted(ids)
        await pilot.press("c")
        await screen_shown(app, ConfirmScreen)
        await pilot.press("y")
        await eventually(lambda: any("marked runs" in n for n in notes(app)))
        assert f"cancelled {count} of {count} marked runs" in notes(app)
        assert all(engine.get(i).status is RunStatus.CANCELLED for i in ids)
        assert app.main.query_one(RunsTable).marked == []
