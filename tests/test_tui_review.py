"""The submit form and the views as a reviewer drove them: what edit-and-resubmit carries back,
what it draws, what an untouched secret sends, the event JSON view and long names.

Every test drives the real app with Pilot on a live engine.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr
from rich.syntax import Syntax
from taskwatch.engine import Engine, RunRecord, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.screens import EventScreen, SubmitScreen
from taskwatch.widgets import EventLog, FailuresList, ParamsForm, RunsTable, TaskStatsTable
from textual.pilot import Pilot
from textual.widgets import DataTable, Input, Static

from .helpers import eventually

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


def make_engine() -> Engine:
    engine = Engine(node_id="review", health_interval=None)

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
    await eventually(lambda: app.state.node_id == "review")
    await pilot.pause()


async def edit_run(app: TaskwatchApp, pilot: Pilot[Any], run: RunRecord) -> tuple[SubmitScreen, ParamsForm]:
    """``e`` on ``run``: the submit form filled with its params."""
    runs = app.main.query_one(RunsTable)
    await eventually(lambda: runs.record(run.id) is not None)
    runs.select_run(run.id)
    await pilot.pause()
    await pilot.press("e")
    screen = await eventually(lambda: app.screen if isinstance(app.screen, SubmitScreen) else None)
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
    engine = make_engine()
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
    engine = make_engine()
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
    screen = await eventually(lambda: app.screen if isinstance(app.screen, SubmitScreen) else None)
    screen.query_one("#submit-task").value = task  # type: ignore[attr-defined]
    form: ParamsForm = await eventually(
        lambda: screen.query(ParamsForm) and screen.query_one(ParamsForm).task_info.name == task
        and screen.query_one(ParamsForm)
    )
    await pilot.pause()
    return form


async def test_a_new_submission_still_leaves_empty_optional_fields_to_the_task() -> None:
    engine = make_engine()
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


async def test_an_untouched_secret_is_not_sent_as_its_schema_mask() -> None:
    engine = make_engine()
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
    engine = make_engine()
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
        screen = await eventually(lambda: app.screen if isinstance(app.screen, EventScreen) else None)
        await pilot.pause()
        body = screen.query_one("#event-body", Static).content
        assert isinstance(body, Syntax)
        assert not RAW_CONTROL.search(body.code.replace("\n", "")), body.code
        assert "A\\u202eB\\x9b2J" in body.code
        assert json.loads(screen.json)["result"] == "A\u202eB\x9b2J"  # copied as the wire has it


# ---------------------------------------------------------------- long names


LONG = "reindex_" + "x" * 292


async def test_one_long_task_name_leaves_the_other_columns_in_sight() -> None:
    engine = Engine(node_id="review", health_interval=None)
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
