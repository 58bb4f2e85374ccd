"""Modal screens: submit a task, read a traceback, confirm an action, read an event's JSON,
read one run in full, pick a trigger key, the key help."""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Awaitable, Callable
from typing import Any

from rich.syntax import Syntax
from rich.text import Text
from taskwatch.engine import BaseEvent, InvalidParams, RunRecord, TaskInfo, TaskwatchError, event_to_json
from taskwatch.engine.wire import UnixAddress, parse_address
from taskwatch.widgets import ParamsForm, ParamsFormError, RunDetail, printable, printable_lines
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, OptionList, Select, Static

SubmitFn = Callable[[str, dict[str, Any]], Awaitable[RunRecord]]


def may_have_been_done(exc: BaseException) -> bool:
    """Whether a command that raised may have been carried out all the same: it went out and
    its reply did not come (a timeout, or a connection lost after sending). A remote client's
    errors say whether the command was sent; a timeout that does not say is taken as sent."""
    sent = getattr(exc, "sent", None)
    return bool(sent) if sent is not None else isinstance(exc, TimeoutError)


class SubmitScreen(ModalScreen[RunRecord | None]):
    """Pick a task, fill in its generated params form, submit once the params are valid.

    The fields scroll; the task, the error line and the buttons stay in sight, and a short
    terminal (``-short``) gets a dialog with less space around them.
    """

    BINDINGS = [Binding("escape", "dismiss_none", "Close")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (30, "-tall")]

    def __init__(
        self,
        tasks: list[TaskInfo],
        submit: SubmitFn,
        initial: str | None = None,
        *,
        values: dict[str, Any] | None = None,
        title: str = "Submit a task",
        cursor_blink: bool = True,
    ) -> None:
        """``values`` pre-fill the first form (say, a failed run's params to edit and resubmit)."""
        super().__init__()
        self._cursor_blink = cursor_blink
        self._values = values
        self._title = title
        self.tasks = {t.name: t for t in tasks if t.submittable}
        #: tasks the engine has that cannot be submitted (periodic ones): named when none can
        self._unsubmittable = [t.name for t in tasks if not t.submittable]
        self._submit = submit
        self._initial = initial if initial in self.tasks else next(iter(self.tasks), None)
        #: a submit request waits for its reply (Submit is disabled meanwhile)
        self._in_flight = False

    def compose(self) -> ComposeResult:
        initial = self.tasks.get(self._initial) if self._initial is not None else None
        with Vertical(id="submit-dialog"):
            # docked above and below the fields: those scroll in what room is left
            with Vertical(id="submit-head"):
                yield Label(Text(printable(self._title)), id="submit-title")
                # task text: drawn as written, never read as markup
                yield Select(
                    [(Text(printable(name)), name) for name in self.tasks],
                    # Select.NULL is "nothing picked" (Select.BLANK is Widget.BLANK, a bool)
                    value=self._initial if self._initial is not None else Select.NULL,
                    allow_blank=False if self.tasks else True,
                    id="submit-task",
                )
                description = Static(_description(initial), id="submit-description")
                description.display = bool(initial and initial.description)  # no blank lines for none
                yield description
            with Vertical(id="submit-foot"):
                error = Static("", id="submit-error")
                error.display = False  # no blank line while there is nothing to say
                yield error
                with Horizontal(id="submit-buttons"):
                    yield Button("Submit", variant="primary", id="submit-ok", disabled=not self.tasks)
                    yield Button("Cancel", id="submit-cancel")
            # not a focus stop of its own: the first Tab goes to the first field
            with VerticalScroll(id="submit-form", can_focus=False):
                # the first form is composed, not mounted later, so it is there at once
                if initial is not None:
                    yield ParamsForm(initial, values=self._values, id="params-form", cursor_blink=self._cursor_blink)

    def on_mount(self) -> None:
        if self._initial is None:
            self._say(Text(_nothing_to_submit(self._unsubmittable)))

    @on(Select.Changed, "#submit-task")
    async def _task_changed(self, event: Select.Changed) -> None:
        shown = self.query("#params-form")
        if isinstance(event.value, str) and not (shown and shown.first(ParamsForm).task_info.name == event.value):
            await self._show_form(event.value)

    async def _show_form(self, name: str) -> None:
        info = self.tasks[name]
        description = self.query_one("#submit-description", Static)
        description.update(_description(info))
        description.display = bool(info.description)
        self._say("")
        holder = self.query_one("#submit-form", VerticalScroll)
        await holder.remove_children()
        await holder.mount(ParamsForm(info, id="params-form", cursor_blink=self._cursor_blink))

    def _say(self, message: str | Text) -> None:
        """The error line under the fields (hidden while empty)."""
        line = self.query_one("#submit-error", Static)
        line.update(message)
        line.display = bool(message)

    @property
    def form(self) -> ParamsForm:
        return self.query_one("#params-form", ParamsForm)

    @on(Button.Pressed, "#submit-cancel")
    def action_dismiss_none(self) -> None:
        self.dismiss(None)

    @on(ParamsForm.Submitted)
    def _enter_pressed(self) -> None:
        self.action_submit()

    @on(Button.Pressed, "#submit-ok")
    def action_submit(self) -> None:
        # one request at a time: a second press while the first waits for its reply would
        # submit the run twice (Enter in a field lands here too, hence the flag as well)
        if self._in_flight:
            return
        select = self.query_one("#submit-task", Select)
        name = select.value
        if not isinstance(name, str):
            self._say("Pick a task first.")
            return
        form = self.form
        form.clear_errors()
        try:
            params = form.collect()
        except ParamsFormError as exc:
            form.show_errors(exc.errors)
            return
        self._in_flight = self.query_one("#submit-ok", Button).disabled = True
        self._say(Text("submitting…", style="dim"))
        self._send(name, params)

    @work(group="submit")
    async def _send(self, name: str, params: dict[str, Any]) -> None:
        """Wait for the reply in a worker: the screen keeps taking keys and clicks meanwhile
        (awaited in a handler, a second press would queue behind the first and submit again)."""
        try:
            record = await self._submit(name, params)
        except InvalidParams as exc:
            self._say("")
            self.form.show_errors(exc.errors)
            return
        except Exception as exc:  # noqa: BLE001 - whatever the engine or its store raise too
            # TaskwatchError, TimeoutError and a lost connection, and anything else: a KeyError
            # (from a params validator, once) reached here and, uncaught, took the dashboard down
            if may_have_been_done(exc):
                # the request went out and no reply came: the engine may well have taken it
                said = f"{error_text(exc)}; the run may have been submitted: check the Runs tab before submitting again"
                self._say(Text(printable_lines(said), style="bold yellow"))
            else:
                self._say(Text(printable_lines(f"not submitted: {error_text(exc)}"), style="bold red"))
            return
        finally:
            self._in_flight = False
            for button in self.query("#submit-ok").results(Button):  # none once the dialog closed
                button.disabled = False
        self.dismiss(record)


def error_text(exc: BaseException) -> str:
    """What an exception says, with its type where the message alone may not say what went
    wrong (``KeyError: 'mars'``); taskwatch's own errors, timeouts and lost connections say it
    already."""
    if isinstance(exc, (TaskwatchError, OSError)):
        return str(exc)
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _nothing_to_submit(unsubmittable: list[str]) -> str:
    """What the submit dialog says for an engine with no task it can submit."""
    if not unsubmittable:
        return "This engine has no submittable tasks: it has no tasks, only what runs on its own (queues, workers)."
    names = ", ".join(printable(name) for name in unsubmittable[:5])
    if len(unsubmittable) > 5:
        names += f" and {len(unsubmittable) - 5} more"
    return (f"This engine has no submittable tasks: its tasks ({names}) run on their own, on a schedule "
            "or a trigger (on the Scheduler tab, n runs a periodic task now and f fires a trigger).")


def _description(info: TaskInfo | None) -> Text:
    """A task's description as written: a ``[/tmp/x]`` in a docstring is text, not markup."""
    return Text(printable_lines(info.description) if info else "")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question naming what is about to happen: Enter or y says yes, Esc or n no."""

    BINDINGS = [
        Binding("enter,y", "answer(True)", "Yes"),
        Binding("escape,n", "answer(False)", "No"),
    ]

    def __init__(self, question: str, yes: str = "Yes") -> None:
        super().__init__()
        self.question = question
        self._yes = yes

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-dialog"):
            yield Static(Text(self.question), id="confirm-question")
            yield Static(Text("enter / y: yes    esc / n: no", style="dim"), id="confirm-keys")
            with Horizontal(id="confirm-buttons"):
                yield Button(self._yes, variant="error", id="confirm-yes")
                yield Button("No", id="confirm-no")

    def on_mount(self) -> None:
        # the buttons take no keys: Enter answers yes whatever has focus
        for button in self.query(Button):
            button.can_focus = False

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed, "#confirm-yes")
    def _yes_pressed(self) -> None:
        self.dismiss(True)

    @on(Button.Pressed, "#confirm-no")
    def _no_pressed(self) -> None:
        self.dismiss(False)


class AttachScreen(ModalScreen[None]):
    """How to attach to the engine this dashboard serves: the command to run elsewhere."""

    BINDINGS = [Binding("escape,q,enter", "dismiss", "Close")]

    def __init__(self, address: str, token: str | None, node_id: str) -> None:
        super().__init__()
        self.address = address
        self._token = token
        self._node_id = node_id

    @property
    def command(self) -> str:
        """The command as a shell reads it: pasted, a token or a socket path with spaces, ``;``
        or ``$(...)`` in it stays one word; a relative socket path is made absolute, since the
        command is run from another directory."""
        env = f"TASKWATCH_TOKEN={shlex.quote(self._token)} " if self._token else ""
        return f"{env}taskwatch attach {shlex.quote(self._attach_address())}"

    def _attach_address(self) -> str:
        try:
            target = parse_address(self.address)
        except TaskwatchError:
            return self.address  # served, so it parsed once; shown as given rather than not at all
        if isinstance(target, UnixAddress) and not os.path.isabs(target.path):
            return os.path.abspath(target.path)
        return self.address

    def compose(self) -> ComposeResult:
        with Vertical(id="attach-dialog"):
            yield Label(Text(printable(f"Engine {self._node_id} is served at {self._attach_address()}")), id="attach-title")
            yield Static("To watch it from another terminal, run:", classes="attach-hint")
            yield Static(Text(printable(self.command), style="bold"), id="attach-command")
            if self._token:
                yield Static(
                    Text("The token is shown here only: keep it out of shell history and logs "
                         "(put it in a file only you can read and use --token-file).", style="dim"),
                    classes="attach-hint",
                )
            yield Button("Close", id="attach-close")

    @on(Button.Pressed, "#attach-close")
    def _close(self) -> None:
        self.dismiss(None)


class TracebackScreen(ModalScreen[None]):
    """The full traceback of a failed run or a crashed worker."""

    BINDINGS = [Binding("escape,q,t", "dismiss", "Close")]

    def __init__(self, title: str, traceback: str) -> None:
        super().__init__()
        self._title = title
        self._traceback = traceback

    def compose(self) -> ComposeResult:
        with Vertical(id="traceback-dialog"):
            # task text: drawn as written, never read as markup
            yield Label(Text(printable(self._title)), id="traceback-title")
            with VerticalScroll():
                yield Static(
                    Syntax(self._traceback or "(no traceback recorded)", "pytb", word_wrap=True, theme="ansi_dark"),
                    id="traceback-body",
                )
            yield Button("Close", id="traceback-close")

    @on(Button.Pressed, "#traceback-close")
    def _close(self) -> None:
        self.dismiss(None)


def event_json(event: BaseEvent) -> str:
    """The event as the control protocol sends it, indented for reading."""
    return json.dumps(json.loads(event_to_json(event)), indent=2, ensure_ascii=False)


class EventScreen(ModalScreen[None]):
    """One event's full JSON; ``c`` copies it to the clipboard."""

    BINDINGS = [
        Binding("c", "copy", "Copy JSON"),
        Binding("escape,q,enter", "dismiss", "Close"),
    ]

    def __init__(self, event: BaseEvent) -> None:
        super().__init__()
        self.event = event
        self.json = event_json(event)

    def compose(self) -> ComposeResult:
        kind = getattr(self.event, "kind", type(self.event).__name__)
        with Vertical(id="event-dialog"):
            yield Label(Text(printable(f"Event #{self.event.seq}: {kind}")), id="event-title")
            with VerticalScroll(id="event-scroll"):
                # JSON escapes C0 controls in strings, not DEL, C1 (CSI) or the bidirectional
                # overrides: drawn escaped, copied (``c``) as they are
                shown = printable_lines(self.json)
                yield Static(Syntax(shown, "json", word_wrap=True, theme="ansi_dark"), id="event-body")
            yield Static(Text("c: copy the JSON    esc: close", style="dim"), id="event-keys")
            with Horizontal(id="event-buttons"):
                yield Button("Copy", variant="primary", id="event-copy")
                yield Button("Close", id="event-close")

    def on_mount(self) -> None:
        for button in self.query(Button):
            button.can_focus = False

    @on(Button.Pressed, "#event-copy")
    def action_copy(self) -> None:
        self.app.copy_to_clipboard(self.json)
        kind = getattr(self.event, "kind", "event")
        self.notify(f"copied event #{self.event.seq} ({kind}) to the clipboard as JSON")

    @on(Button.Pressed, "#event-close")
    def _close(self) -> None:
        self.dismiss(None)


class RunScreen(ModalScreen[None]):
    """One run in full: where it runs or ran, its attempts, params, result and the traceback
    of a failure. The app keeps it current with :meth:`show` while it is open; ``c`` and
    ``r`` are the app's cancel and retry, of this run."""

    BINDINGS = [
        Binding("c", "app.cancel_run", "Cancel run"),
        Binding("r", "app.retry_run", "Retry run"),
        Binding("escape,q,enter", "dismiss", "Close"),
    ]

    def __init__(self, record: RunRecord, now: float) -> None:
        super().__init__()
        self._record = record
        self._now = now

    @property
    def run_id(self) -> str:
        return self._record.id

    @property
    def record(self) -> RunRecord:
        """The run as shown now."""
        return self._record

    def compose(self) -> ComposeResult:
        with Vertical(id="run-dialog"):
            yield Label(self._title(), id="run-title")
            yield RunDetail(id="run-screen-detail")
            yield Static(Text("c: cancel    r: retry    esc: close", style="dim"), id="run-keys")

    def on_mount(self) -> None:
        self.query_one(RunDetail).show(self._record, self._now)
        self.query_one(RunDetail).focus()

    def show(self, record: RunRecord, now: float) -> None:
        """Show the run as it is now (another read of it: its status, a new attempt, a live duration)."""
        self._record = record
        self.query_one("#run-title", Label).update(self._title())
        self.query_one(RunDetail).show(record, now)

    def _title(self) -> Text:
        record = self._record
        where = f" on {record.node}" if record.node else ""
        return Text(printable(f"Run {record.id}: {record.task}, {record.status.value}{where}"))


class ChooseKeyScreen(ModalScreen[str | None]):
    """Which key of a trigger to fire: one of its keys, or one typed in."""

    BINDINGS = [Binding("escape", "dismiss_none", "Close")]

    def __init__(self, trigger: str, keys: list[str], *, cursor_blink: bool = True) -> None:
        super().__init__()
        self.trigger = trigger
        self.keys = keys
        self._cursor_blink = cursor_blink

    def compose(self) -> ComposeResult:
        with Vertical(id="choose-key-dialog"):
            yield Label(Text(printable(f"Fire trigger {self.trigger}: which key?")), id="choose-key-title")
            if self.keys:
                # keys come from tasks: drawn as written, never read as markup
                yield OptionList(*(Text(printable(key)) for key in self.keys), id="choose-key-list")
            box = Input(placeholder="or type a key and press enter", id="choose-key-input")
            box.cursor_blink = self._cursor_blink
            yield box
            yield Static(Text("enter: fire    esc: close", style="dim"), id="choose-key-keys")

    def on_mount(self) -> None:
        target = self.query("#choose-key-list")
        (target.first() if target else self.query_one("#choose-key-input")).focus()

    @on(OptionList.OptionSelected, "#choose-key-list")
    def _picked(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.keys[event.option_index])

    @on(Input.Submitted, "#choose-key-input")
    def _typed(self, event: Input.Submitted) -> None:
        if event.value:
            self.dismiss(event.value)

    def action_dismiss_none(self) -> None:
        self.dismiss(None)


HELP = """\
[b]Keys[/b]

  [b]s[/b]        submit a task (a form generated from its params model)
  [b]c[/b]        cancel the selected run (asks first, naming it)
  [b]r[/b]        retry the selected failed or cancelled run with the same params
  [b]space[/b]    mark runs (Runs tab): c and r then act on every marked run
  [b]R[/b]        retry every failure of the selected failure's task (tab 2)
  [b]e[/b]        edit the selected run's params and submit it again
  [b]t[/b]        show the selected run's (or worker's) traceback
  [b]enter[/b]    show the selected run in the detail pane
  [b]/[/b]        filter runs (text, status:failed, task:NAME) or events (kinds)
  [b]p[/b]        pause / resume the live view (events keep being recorded)
  [b]j[/b] [b]k[/b] [b]g[/b] [b]G[/b]  down, up, first (newest) and last row in a table
  [b]esc[/b]      back: close the run detail (narrow screens) or the filter
  [b]1[/b]-[b]6[/b]      Runs, Failures, Scheduler, Health, Events, Tasks
  [b]ctrl+p[/b]   command palette: every action, searchable
  [b]?[/b]        this help
  [b]q[/b]        quit

[b]Scheduler tab[/b]: each key acts on the selected row of its table

  [b]z[/b]        pause / resume the selected periodic task
  [b]n[/b]        run the selected periodic task now (its schedule unchanged)
  [b]P[/b]        pause / resume a queue's consumers (puts still accepted)
  [b]D[/b]        purge a queue's waiting jobs (asks first, naming the count)
  [b]f[/b]        fire the selected trigger key now (or type a key)
  [b]x[/b]        restart a supervised worker now, its backoff forgotten
  [b]X[/b]        stop a worker (it stays stopped), or start it again

[b]Events tab[/b]

  [b]j[/b] [b]k[/b] [b]g[/b] [b]G[/b]  move the cursor (it follows the newest event until moved)
  [b]enter[/b]    the event's full JSON, also on a click; [b]c[/b] there copies it
"""


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "dismiss", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(id="help-dialog"):
            with VerticalScroll(id="help-scroll"):
                yield Static(HELP, id="help-body")
            yield Button("Close", id="help-close")

    @on(Button.Pressed, "#help-close")
    def _close(self) -> None:
        self.dismiss(None)
