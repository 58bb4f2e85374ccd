"""The taskwatch dashboard app.

One timer drains the client's event buffer and redraws at a fixed rate
(``refresh_hz``, 15 by default), never once per event; a second timer
refreshes what only query methods know (schedule, queues, triggers,
workers, leadership) once a second. Widgets get plain data through method
calls; they talk back with messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import difflib
import functools
import gc
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from itertools import islice
from typing import Any, NamedTuple, TypeVar

from rich.text import Text
from taskwatch.engine import (
    EVENT_KINDS,
    PeriodicNotRunnable,
    QueueInfo,
    RunError,
    RunNotCancellable,
    RunNotRetryable,
    RunRecord,
    RunStatus,
    ServerInfo,
    Snapshot,
    TaskwatchError,
    WorkerInfo,
    WorkerNotLeading,
    is_truncated,
)
from taskwatch.engine.events import HealthSample
from taskwatch.widgets import (
    CountsBar,
    EventLog,
    FailuresList,
    HealthSparklines,
    LeaderBadge,
    QueuesTable,
    RunAttempt,
    RunDetail,
    RunsTable,
    ScheduleTable,
    StoreBadge,
    TaskStats,
    TaskStatsTable,
    TriggersTable,
    WorkersTable,
    printable,
    printable_lines,
)
from textual import events, on, work
from textual.app import ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, HorizontalGroup, Vertical
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.screen import Screen
from textual.widget import Widget
from textual.widgets import Footer, Input, Static, TabbedContent, TabPane

from .client import DashboardClient
from .in_flight import CommandsInFlight
from .screens import (
    AttachScreen,
    ChooseKeyScreen,
    ConfirmScreen,
    EventScreen,
    HelpScreen,
    SubmitScreen,
    TracebackScreen,
    error_text,
    may_have_been_done,
)
from .state import DEFAULT_MAX_RUNS, DashboardState
from .plain_app import PlainApp

TABS = ("runs", "failures", "scheduler", "health", "events", "tasks")

#: below this many columns the run detail goes behind Enter instead of beside the table
NARROW = 120

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def while_dashboard_alive(method: F) -> F:
    """Skip an update whose widgets are gone: timers and workers may still fire while
    the app tears its screens down, and there is nothing left to draw then."""

    @functools.wraps(method)
    def guarded(self: TaskwatchApp, *args: Any, **kwargs: Any) -> Any:
        if self._dashboard_gone:
            return None
        try:
            return method(self, *args, **kwargs)
        except NoMatches:
            if self._dashboard_gone or not self.main.is_attached or not self.is_running:
                return None
            raise

    return guarded  # type: ignore[return-value]


#: what a command to an engine can fail with: its own errors, a lost or timed-out
#: connection, or an in-process engine whose loop has already closed
COMMAND_ERRORS = (TaskwatchError, OSError, RuntimeError)

#: full records of cut-down runs kept for the detail pane (they can be megabytes each)
_FULL_RECORDS_KEPT = 16

#: runs first heard of after their submission whose records wait to be fetched (the newest
#: are kept: under a flood of such runs the oldest stay as their events told them)
_FILLS_QUEUED = 256
#: of those, fetched at once
_FILLS_AT_ONCE = 4
#: runs whose records were asked for, remembered so that none is asked for again and again
_FILLS_REMEMBERED = 2_000


def _has_cut_values(record: RunRecord) -> bool:
    error = record.error
    return (
        is_truncated(record.params)
        or is_truncated(record.result)
        or (error is not None and (is_truncated(error.message) or is_truncated(error.traceback)))
    )


def command_failure(verb: str, exc: BaseException) -> str:
    """What became of a command that raised, said so that nobody takes it for not done when
    it may have been."""
    if may_have_been_done(exc):
        return f"{verb}: {error_text(exc)}; it may have been done all the same: check before trying again"
    return f"{verb} failed: {error_text(exc)}"


def unknown_statuses(text: str) -> list[str]:
    """The ``status:`` values in a runs filter that are not statuses."""
    valid = {s.value for s in RunStatus}
    out: list[str] = []
    for word in filter_words(text):
        if word.key in ("status", "s"):
            out.extend(v for v in word.values if v and v not in valid)
    return out


def unknown_event_kinds(text: str) -> list[str]:
    """Events filter terms that no event kind matches, each with a suggestion when one is
    near (``"run.faild (run.failed?)"``); read as the events log reads them."""
    out: list[str] = []
    for term in text.replace(",", " ").split():
        kind = term[:-1] if term.endswith("*") else term
        if kind.endswith("."):
            if not any(k.startswith(kind) for k in EVENT_KINDS):
                out.append(term)
            continue
        if kind in EVENT_KINDS:
            continue
        if any(k.startswith(kind + ".") for k in EVENT_KINDS):
            near = [kind + "."]
        else:
            near = difflib.get_close_matches(kind, EVENT_KINDS, n=1)
        out.append(f"{term} ({near[0]}?)" if near else term)
    return out


class RunFilter(NamedTuple):
    """What the runs filter box asks for; None or empty: no criterion."""

    statuses: set[str] | None
    text: str
    tasks: set[str] | None


class FilterWord(NamedTuple):
    """One word of a filter: ``key`` is what comes before its first ``:`` (None when it has
    none), ``values`` what comes after, split at its commas, and ``text`` the whole word."""

    key: str | None
    values: list[str]
    text: str


_QUOTES = "\"'"


def filter_words(text: str) -> list[FilterWord]:
    """The words of a filter, split at whitespace. A quote where a value starts (a word, or
    the part after ``key:`` or a comma) runs to the same quote and keeps its spaces, colons
    and commas: ``task:"send email"``; one never closed runs to the end of the text. A quote
    anywhere else is a character of the word (``bob's``)."""
    words: list[FilterWord] = []
    i, end = 0, len(text)
    while i < end:
        if text[i].isspace():
            i += 1
            continue
        key: str | None = None
        values = [""]
        whole = ""
        starts_value = True
        while i < end and not text[i].isspace():
            char = text[i]
            if char in _QUOTES and starts_value:
                close = text.find(char, i + 1)
                if close < 0:
                    close = end
                quoted = text[i + 1 : close]
                values[-1] += quoted
                whole += quoted
                i = close + 1
                starts_value = False
                continue
            i += 1
            whole += char
            if char == ":" and key is None:
                key, values, starts_value = values[0], [""], True
            elif char == "," and key is not None:
                values.append("")
                starts_value = True
            else:
                values[-1] += char
                starts_value = False
        words.append(FilterWord(key, values if key is not None else [], whole))
    return words


def parse_run_filter(text: str) -> RunFilter:
    """``"status:failed,running task:embed x"`` -> ({"failed", "running"}, "x", {"embed"}).

    ``task:`` names tasks exactly (``task:fail`` is not ``deep_fail``; ``task:"send email"``
    one with a space); free text is a substring of the task name or the run id."""
    statuses: set[str] = set()
    tasks: set[str] = set()
    words: list[str] = []
    valid = {s.value for s in RunStatus}
    for word in filter_words(text):
        if word.key in ("status", "s"):
            statuses.update(v for v in word.values if v in valid)
        elif word.key in ("task", "t"):
            tasks.update(v for v in word.values if v)
        elif word.key is None and word.text in valid:
            statuses.add(word.text)
        elif word.text:
            words.append(word.text)
    return RunFilter(statuses or None, " ".join(words), tasks or None)


#: keys that act on a row of the Scheduler tab: in the footer, and active, only there
SCHEDULER_ACTIONS = frozenset({"restart_worker", "toggle_worker", "toggle_queue", "purge_queue", "fire_trigger"})
#: keys for the selected run: in the footer, and active, only on the tabs where they can act
#: (a failed run can be retried from the Failures tab, but not cancelled)
RUN_ACTIONS: dict[str, tuple[str, ...]] = {
    "cancel_run": ("runs",),
    "retry_run": ("runs", "failures"),
    # a run's, a failure's, a crashed worker's (Scheduler) or a failure event's (Events): the
    # Health and Tasks tabs have nothing it could show
    "traceback": ("runs", "failures", "scheduler", "events"),
}

_QUEUE_KEYS = Binding.Group("queue", compact=True)
_WORKER_KEYS = Binding.Group("worker", compact=True)

#: the widget each tab puts the keyboard focus on when it is shown
TAB_FOCUS = {
    "runs": "#runs-table",
    "failures": "#failures-table",
    "scheduler": "#schedule-table",
    "health": None,
    "events": "#event-log",
    "tasks": "#task-stats",
}


#: keys the footer keeps in sight however narrow it gets: help and quit
PINNED_KEYS = ("question_mark", "q")


class DashboardFooter(Footer):
    """Textual's footer, whose keys are cut on the right where they do not fit, except help
    and quit: those come after the part that may be cut (``#footer-keys``), before the
    palette's key; compact, they keep to the right end."""

    def compose(self) -> ComposeResult:
        last: list[Widget] = []
        with HorizontalGroup(id="footer-keys"):
            for widget in super().compose():
                if getattr(widget, "key", None) in PINNED_KEYS:  # a key of the footer's (FooterKey)
                    last.append(widget.add_class("-pinned"))
                elif widget.has_class("-command-palette"):
                    last.append(widget)
                else:
                    yield widget
        yield from last


class EngineStateNote(Static):
    """The header's word on an engine stopping or stopped; hidden while it runs."""

    DEFAULT_CSS = """
    EngineStateNote {
        width: auto;
        height: 1;
        padding: 0 1;
        display: none;
    }
    EngineStateNote.-stopping {
        background: $warning 25%;
    }
    EngineStateNote.-stopped {
        background: $error 25%;
    }
    """

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__("", id=id)
        #: "" (hidden), "stopping" or "stopped"
        self.state = ""
        self._shown: tuple[str, str] = ("", "")

    def show(self, state: str, text: Text | None = None) -> None:
        """Say ``text`` in the colours of ``state`` ("stopping" or "stopped"); "" hides it."""
        text = text or Text()
        # called every frame: only a change repaints
        if (state, text.markup) == self._shown:
            return
        self._shown = (state, text.markup)
        self.state = state
        self.set_class(state == "stopping", "-stopping")
        self.set_class(state == "stopped", "-stopped")
        self.display = bool(state)
        self.update(text)


class DashboardScreen(Screen[None]):
    """The dashboard itself: header, tabs, footer. Modal dialogs stack above it.

    Its keys are priority bindings, so they work whichever widget has focus (a
    table or the detail pane would otherwise take them first); Textual leaves out
    the printable ones while a text box has focus, so typing in a filter stays text.
    Dialogs are separate screens and keep their own keys.
    """

    BINDINGS = [
        Binding("s", "app.submit", "Submit", priority=True),
        Binding("c", "app.cancel_run", "Cancel", priority=True),
        Binding("r", "app.retry_run", "Retry", priority=True),
        Binding("t", "app.traceback", "Traceback", priority=True),
        Binding("R", "app.retry_task_failures", "Retry task's failures", show=False, priority=True),
        Binding("e", "app.edit_resubmit", "Edit and resubmit", show=False, priority=True),
        Binding("slash", "app.filter", "Filter", priority=True),
        Binding("p", "app.toggle_view", "Pause", priority=True),
        Binding("z", "app.toggle_periodic", "Pause periodic", show=False, priority=True),
        Binding("n", "app.run_periodic", "Run periodic now", show=False, priority=True),
        # the Scheduler tab's keys, grouped in the footer by the table they act on
        Binding("P", "app.toggle_queue", "Pause or resume queue", group=_QUEUE_KEYS, priority=True),
        Binding("D", "app.purge_queue", "Purge queue", group=_QUEUE_KEYS, priority=True),
        Binding("f", "app.fire_trigger", "Fire", priority=True),
        Binding("x", "app.restart_worker", "Restart worker", group=_WORKER_KEYS, priority=True),
        Binding("X", "app.toggle_worker", "Stop or start worker", group=_WORKER_KEYS, priority=True),
        Binding("question_mark", "app.help", "Help", priority=True),
        Binding("q", "app.quit", "Quit", priority=True),
        Binding("escape", "app.close_filter", "Close", show=False),
        *(
            Binding(str(i), f"app.show_tab('{tab}')", tab.title(), show=False, priority=True)
            for i, tab in enumerate(TABS, 1)
        ),
    ]

    def __init__(self, max_rows: int) -> None:
        super().__init__(id="dashboard")
        self.max_rows = max_rows

    def on_mount(self) -> None:
        app = self.app
        if isinstance(app, TaskwatchApp):
            app.dashboard_ready()

    def on_unmount(self) -> None:
        app = self.app
        if isinstance(app, TaskwatchApp):
            app.dashboard_gone()

    def compose(self) -> ComposeResult:
        with Vertical(id="top"):
            with Horizontal(id="top-line"):
                yield LeaderBadge(id="leader")
                yield EngineStateNote(id="engine-state")
                yield StoreBadge(id="store")
            yield CountsBar(id="counts")
        with TabbedContent(initial="runs", id="tabs"):
            with TabPane("Runs", id="runs"):
                yield Input(placeholder='filter runs: text, status:failed, task:NAME, task:"A NAME"  (esc closes)', id="runs-filter", classes="filter")
                with Horizontal(id="runs-body"):
                    yield RunsTable(id="runs-table", max_rows=self.max_rows)
                    yield RunDetail(id="run-detail")
            with TabPane("Failures", id="failures"):
                yield FailuresList(id="failures-list")
            with TabPane("Scheduler", id="scheduler"):
                with Vertical(id="scheduler-body"):
                    yield Static("Periodic tasks", classes="section")
                    yield ScheduleTable(id="schedule-table")
                    yield Static("Queues", classes="section")
                    yield QueuesTable(id="queues-table")
                    yield Static("Triggers", classes="section")
                    yield TriggersTable(id="triggers-table")
                    yield Static("Supervised workers", classes="section")
                    yield WorkersTable(id="workers-table")
            with TabPane("Health", id="health"):
                yield HealthSparklines(id="health-lines")
            with TabPane("Events", id="events"):
                yield Input(placeholder="filter events by kind: run. lease. health run.failed  (esc closes)", id="events-filter", classes="filter")
                yield EventLog(id="event-log")
            with TabPane("Tasks", id="tasks"):
                yield Static("", id="task-stats-since", classes="section")
                yield TaskStatsTable(id="task-stats")
        yield DashboardFooter()


class TaskwatchApp(PlainApp):
    """The dashboard. Give it a :class:`DashboardClient`: in-process or remote."""

    CSS_PATH = ["app.tcss", "screens.tcss"]
    TITLE = "taskwatch"
    view_paused: reactive[bool] = reactive(False, init=False)


    def __init__(
        self,
        client: DashboardClient,
        *,
        refresh_hz: float = 15.0,
        overview_interval: float = 1.0,
        max_rows: int = 500,
        rows_per_frame: int = 60,
        clock: Callable[[], float] = time.time,
        cursor_blink: bool = True,
        confirm: bool = True,
        serving: ServerInfo | None = None,
        unresponsive_after: float = 3.0,
    ) -> None:
        """``confirm=False`` cancels without asking first (``taskwatch --no-confirm``);
        ``serving`` is where this process serves its engine (the attach command is shown);
        ``unresponsive_after`` is how long the engine may leave a request unanswered, saying
        nothing else either, before the header says it is not responding."""
        super().__init__()
        self.client = client
        # the model holds at least the runs the table may show
        self.state = DashboardState(max_runs=max(DEFAULT_MAX_RUNS, max_rows), clock=clock)
        self.refresh_hz = refresh_hz
        self.overview_interval = overview_interval
        self.max_rows = max_rows
        self.clock = clock
        self._resyncing = False
        self._connected_once = False
        #: the last time (``clock``) the engine was seen answering: running durations stop there
        self._answering_at: float | None = None
        #: the overview of the in-process engine as it stopped is shown (see refresh_overview)
        self._stopped_overview_shown = False
        #: redraws done, and events drained, since start (for tests and the load bench)
        self.frames = 0
        self.events_seen = 0
        self._failures_shown: tuple[int, int] = (-1, -1)
        #: the dropped events the Tasks tab last said its figures may miss
        self._stats_dropped = 0
        #: whether this app froze the objects that existed when its dashboard was ready
        self._frozen = False
        self.main = DashboardScreen(max_rows)
        self._dashboard_gone = False
        self._client_dropped = 0
        self._backfill = False
        #: the runs still to be listed, newest first, while a backfill goes on: taken a frame's
        #: room at a time (finding them again every frame walked every run the model holds)
        self._backfill_queue: deque[str] | None = None
        self._table_stale = False
        #: after a reconnect, the run to select again once the refilled runs table shows it
        self._reselect: str | None = None
        #: runs marked before a reload emptied the table, marked again as the refill brings them
        self._remark: dict[str, None] = {}
        #: new rows the runs table takes per frame (each costs a measurement of its cells)
        self.rows_per_frame = rows_per_frame
        #: off for screenshots and snapshot tests, whose pictures must not depend on timing
        self.cursor_blink = cursor_blink
        #: ask before cancelling (the dialog names the run)
        self.confirm = confirm
        self.serving = serving
        #: full records fetched for runs whose values came cut down over the wire (newest last)
        self._full_records: dict[str, RunRecord] = {}
        self._fetching: set[str] = set()
        self.unresponsive_after = unresponsive_after
        #: whether the dashboard screen's widgets exist (see :meth:`dashboard_ready`)
        self._dashboard_up = False
        #: a quit typed before they did, carried out once they do
        self._quit_when_ready = False
        #: ``time.monotonic()`` when the overview request in flight was sent (None: none is)
        self._overview_sent: float | None = None
        #: when the first overview request still unanswered was sent (None: the last one was)
        self._unanswered_since: float | None = None
        #: the commands whose replies the keys still wait for
        self._in_flight = CommandsInFlight(lambda text: self.notify(text, severity="warning"), "the engine's reply")
        #: runs known only from their later events, whose records are to be fetched (newest last)
        self._to_fill: dict[str, None] = {}
        self._filling = False
        #: runs whose records were asked for already (one the engine no longer has is not
        #: asked for again each time the detail pane draws it)
        self._fill_asked: dict[str, None] = {}

    # ------------------------------------------------------------------ layout

    def get_default_screen(self) -> Screen[Any]:
        return self.main

    def on_resize(self, event: events.Resize) -> None:
        # Rich asks the OS for the terminal size on every measurement unless it is
        # told, and the tables measure every cell of every new row: tell it
        self.console.size = (event.size.width, event.size.height)
        self._fit_width(event.size.width)

    def _fit_width(self, width: int) -> None:
        """Below NARROW columns the runs table takes the whole width (so progress and
        duration stay in sight) and Enter opens the run detail in its place."""
        narrow = width < NARROW
        self.main.set_class(narrow, "-narrow")
        if not narrow:
            self.main.remove_class("-detail-open")
        self._fit_footer()

    def _fit_footer(self) -> None:
        """A compact footer below NARROW columns; on the Scheduler tab, whose row keys need
        the room, it leaves out the command palette's hint (ctrl+p still opens it)."""
        footer = self.main.query(Footer)
        if not footer:
            return
        narrow = self.size.width < NARROW
        footer.first().compact = narrow
        try:
            crowded = narrow and self.active_tab == "scheduler"
        except NoMatches:
            crowded = False
        footer.first().show_command_palette = not crowded

    @property
    def detail_open(self) -> bool:
        """Whether a narrow screen shows the run detail in place of the runs table."""
        return self.main.has_class("-detail-open")

    def open_detail(self, open_: bool = True) -> None:
        if open_ and not self.main.has_class("-narrow"):
            return  # beside the table already
        self.main.set_class(open_, "-detail-open")
        self.main.query_one(RunDetail if open_ else RunsTable).focus()

    def dashboard_ready(self) -> None:
        """Called by the dashboard screen once its widgets exist: start the data flow."""
        self.console.size = (self.size.width, self.size.height)
        self._fit_width(self.size.width)
        for box in self.main.query(".filter").results(Input):
            box.cursor_blink = self.cursor_blink
        self.sub_title = self.client.where
        # the runs table, not the tab strip: arrows and j/k move through runs at once
        self.main.query_one(RunsTable).focus()
        self.connect()
        if self.serving is not None:
            self.notify(
                f"serving at {self.serving.address}: ctrl+p, 'Attach command' shows how to attach",
                timeout=15,
            )
        self._freeze_startup_objects()
        self.set_interval(1.0 / self.refresh_hz, self.redraw, name="redraw")
        self.set_interval(self.overview_interval, self._overview_tick, name="overview")
        self._dashboard_up = True
        if self._quit_when_ready:
            self.exit()

    async def action_quit(self) -> None:
        if not self._dashboard_up:
            # `q` typed ahead, while the screen is still being built: exiting under a mount
            # crashes Textual's tabs (a traceback and exit status 1), so it waits for the mount
            self._quit_when_ready = True
            return
        await super().action_quit()

    def _freeze_startup_objects(self) -> None:
        """Take what exists now out of the garbage collector's passes, until the app stops.

        A full collection scans every object the process holds, and under a flood one
        came every second or so and took a couple of frames (about 120 ms at 10,000
        events a second). Modules, widgets, styles and the engine as it stands live as
        long as the dashboard: frozen, they halve that pause. Garbage made so far is
        collected first, so nothing is frozen that was already unreachable.
        """
        # only in a process nobody froze before: unfreezing at the stop must not
        # hand back objects a host program froze for reasons of its own
        # (Python 3.12.1 freezes a few hundred objects of its own at startup: no freeze there)
        if not self._frozen and gc.get_freeze_count() == 0:
            self._frozen = True
            gc.collect()
            gc.freeze()

    # ------------------------------------------------------------------ data flow

    @work(exclusive=True, group="connect")
    async def connect(self) -> None:
        try:
            snap = await self.client.connect(runs_limit=self.max_rows)
        except (OSError, TaskwatchError) as exc:
            failure = self.client.failure
            if failure is not None:
                self.notify(failure, severity="error", timeout=30)
            else:
                self.notify(f"cannot reach the engine: {exc}; retrying", severity="error", timeout=8)
            self._update_header()
            return
        self._reload(snap)
        self.redraw(full=True)
        self.refresh_tables()

    @while_dashboard_alive
    def _reload(self, snap: Snapshot) -> None:
        """Start over from a snapshot (first connect, reconnect, or after lost events).

        The runs table forgets its rows, since the snapshot may not have them (another
        engine process, or runs whose updates were lost); the selected run is selected
        again once the refilled table shows it.
        """
        self.state.load(snap, keep=self._kept_runs())
        # which engine process, and where its runs live, is the first thing to know
        self.sub_title = f"{self.client.where} · node {snap.node_id} · store {snap.store}"
        self.main.query_one(StoreBadge).update(snap.store, snap.incarnation, self.client.where)
        if self.view_paused:
            self._table_stale = True  # the frozen screen is cleared when the view resumes
        else:
            self._reset_runs_table()
        # also after a first connect that failed: lets the overview refresh start
        self._connected_once = True
        self._stopped_overview_shown = False

    def _kept_runs(self) -> set[str]:
        """The runs the user chose (the one the cursor holds, the marked ones): the model
        never trims them, so an action on them finds them however many runs come after."""
        table = self.main.query_one(RunsTable)
        kept = set(table.marked)
        if not table.following and table.selected_run_id is not None:
            kept.add(table.selected_run_id)
        if self._reselect is not None:
            kept.add(self._reselect)
        kept.update(self._remark)
        return kept

    def _reset_runs_table(self) -> None:
        table = self.main.query_one(RunsTable)
        # a reselect still pending from an earlier reload wins; a cursor following the
        # newest run follows the refilled table's newest instead
        if self._reselect is None and not table.following:
            self._reselect = table.selected_run_id
        # marks too: c and r act on every marked run, and a reload (a reconnect, dropped
        # events) must not quietly narrow that to the run under the cursor
        self._remark.update(dict.fromkeys(table.marked))
        table.clear_runs()
        self._table_stale = False

    @work(exclusive=True, group="resync")
    async def resync(self) -> None:
        """Reload from a fresh snapshot after events were dropped."""
        self._resyncing = True
        try:
            snap = await self.client.snapshot(runs_limit=self.max_rows)
            self._reload(snap)
            self.redraw(full=True)
        except (OSError, TaskwatchError):
            pass
        finally:
            self._resyncing = False

    def _overview_tick(self) -> None:
        """Ask for the overview, unless the last request still waits for its reply: that one
        is left to come back or time out (cancelled, a slow engine would never answer one)."""
        if self._overview_sent is not None:
            self._update_header()  # counts up how long the engine has not answered
            return
        self.refresh_overview()

    @work(group="overview")
    async def refresh_overview(self) -> None:
        if not self.client.connected or not self._connected_once:
            if self._connected_once and not self._stopped_overview_shown:
                # an in-process engine that stopped: its queues, schedule and workers shown as they
                # ended, not as the last overview before the stop left them (a queue "in flight")
                ended = self.client.stopped_overview()
                if ended is not None:
                    self._stopped_overview_shown = True
                    self.state.apply_overview(ended)
                    if not self.view_paused:
                        self.refresh_tables()
            self._update_header()
            return
        sent = self._overview_sent = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = sent
        try:
            snap = await self.client.snapshot(runs_limit=0)
        except COMMAND_ERRORS:
            return  # no reply in time, or the connection went: still unanswered
        finally:
            if self._overview_sent == sent:
                self._overview_sent = None
        self._unanswered_since = None
        known = self.state.incarnation
        self.state.apply_overview(snap)
        if known and snap.incarnation != known and not self._resyncing:
            # the in-process engine started again, and this overview came before the events of
            # its start: the state moved from stopped to running here, so those events, when
            # they come, move nothing, and the new start would never be reloaded
            self.resync()
        if not self.view_paused:
            self.refresh_tables()

    @while_dashboard_alive
    def redraw(self, full: bool = False) -> None:
        """Drain buffered events into the state, then update the widgets that changed."""
        # while a resync waits for its snapshot, and until the first connect's is loaded,
        # events stay in the client's buffer: applied now, they would be thrown away with the
        # state the snapshot replaces, and a run that ended meanwhile would show running for good
        events = [] if self._resyncing or not self._connected_once else self.client.take_events()
        resync = getattr(self.client, "take_resync", lambda: None)()
        if resync is not None:
            # a reconnect, maybe to another engine process
            self._reload(resync)
            full = True
        if events:
            self.events_seen += len(events)
            was = self.state.engine_state
            self.state.apply(events, keep=self._kept_runs())
            first_seen = self.state.take_partial()
            if first_seen:
                self._fill(first_seen)
            if was == "stopped" and self.state.engine_state == "running":
                # the in-process engine started again (a remote one is reconnected to, and
                # reloaded then): a new incarnation, with runs its store read back as new
                self.resync()
        if self.client.dropped != self._client_dropped:
            # our own buffer overflowed: what we hold is incomplete, reload it
            self._client_dropped = self.client.dropped
            self.state.needs_resync = True
        if self.state.needs_resync and not self._resyncing:
            self.state.needs_resync = False
            self.resync()
        log = self.main.query_one(EventLog)
        if events:
            log.add_events(events)
            # a paused view keeps them too (its graphs hold still until it resumes)
            health = [e for e in events if isinstance(e, HealthSample)]
            if health:
                lines = self.main.query_one(HealthSparklines)
                for sample in health:
                    lines.add_sample(sample)
        if self.view_paused:
            # what changes meanwhile stays dirty: resuming hands the runs table those runs, not
            # every run again (a deep queue's waiting runs would each be made a record to compare)
            table = self.main.query_one(RunsTable)
            self.state.gone = {run_id for run_id in self.state.gone if table.has_run(run_id)}
            self._update_counts()
            # the view holds still, not the connection: the badge says who answers (another
            # process now, after a restart; answering again, after a stall) as it changes
            self._update_header()
            return
        self.frames += 1
        now = self.clock()
        with self.batch_update():
            dirty = self.state.take_dirty()
            # running durations tick (and rows are backfilled) in frames with nothing new too
            self._update_runs(self._runs_clock(now), dirty, full)
            if self._reselect is not None:
                # the refill may take a few frames (rows_per_frame); give up once it is complete
                if self.main.query_one(RunsTable).select_run(self._reselect) or not self._backfill:
                    self._reselect = None
            if self._remark:
                self._restore_marks()
            self._update_detail(dirty, full)
            self._update_failures()
            self._update_header(now)
            self._update_counts()
            # "next in" counts down between the once-a-second schedule refreshes
            self.main.query_one(ScheduleTable).update_schedule(self.state.schedule, now)

    def _runs_clock(self, now: float | None = None) -> float:
        """The time running runs' durations count to: now while the engine answers, else when
        it last did. A dashboard cut off from its engine cannot see a run end: its duration
        is not shown growing on (the header says the engine is out of reach)."""
        now = self.clock() if now is None else now
        if self.client.connected and self.unresponsive_for() is None:
            self._answering_at = now
            return now
        return now if self._answering_at is None else min(now, self._answering_at)

    def _restore_marks(self) -> None:
        """Mark again the runs marked before the reload, as the refill brings them; once it is
        complete, the ones it did not bring (gone from the engine) are let go."""
        table = self.main.query_one(RunsTable)
        for run_id in list(self._remark):
            if table.mark(run_id):
                del self._remark[run_id]
        if not self._backfill:
            self._remark.clear()

    def _update_runs(self, now: float, dirty: set[str] | None = None, full: bool = True) -> None:
        """Hand the runs table what changed, at most ``rows_per_frame`` new rows a frame.

        Adding a row costs the table a measurement of every cell, so under a flood
        only the newest new runs go in each frame; older ones are backfilled in
        later frames, once the flood leaves room. The model keeps all of them.
        """
        table = self.main.query_one(RunsTable)
        state = self.state
        kept = self._kept_runs()
        gone = state.take_gone()
        if gone:
            # runs the model let go would otherwise keep their last values on screen
            table.remove_runs(gone)
        if full or dirty is None:
            views = state.views_to_show(self.max_rows, kept)
            if dirty is not None:
                # a run the table holds changed only if the model says so (every change is
                # dirty, paused or not; a reload empties the table)
                listed = {v.id for v in views}
                views = [v for v in views if v.id in dirty or not table.has_run(v.id)]
                # and one that changed is passed in wherever it is, listed or not: a run that
                # ended while the view was paused and newer runs pushed out of the listed ones
                # would stay shown as it was
                views += [
                    state.runs[run_id] for run_id in dirty
                    if run_id not in listed and run_id in state.runs and table.has_run(run_id)
                ]  # fmt: skip
        else:
            views = [state.runs[run_id] for run_id in dirty if run_id in state.runs]
        known = [v for v in views if table.has_run(v.id)]
        fresh = [v for v in views if not table.has_run(v.id)]
        budget = self.rows_per_frame
        if len(fresh) > budget:
            # records are built only for what goes on screen this frame
            fresh.sort(key=lambda v: v.created_at, reverse=True)
            del fresh[budget:]
            self._backfill = True
            self._backfill_queue = None  # the runs left out now are to be found again
        elif self._backfill:
            room = budget - len(fresh)
            shown = {v.id for v in fresh}
            queue = self._backfill_queue
            found_now = queue is None
            if queue is None:
                queue = self._backfill_queue = deque(
                    v.id for v in state.views_to_show(self.max_rows, kept) if v.id not in shown and not table.has_run(v.id)
                )
            runs = state.runs
            while queue and room > 0:
                run_id = queue.popleft()
                view = runs.get(run_id)
                if view is not None and run_id not in shown and not table.has_run(run_id):
                    fresh.append(view)
                    room -= 1
            if not queue:
                # a queue found this frame and emptied: nothing is missing. One found before:
                # the next frame looks once more for runs left out meanwhile
                self._backfill_queue = None
                self._backfill = not found_now
        candidates = [v.record() for v in known] + [v.record() for v in fresh]
        try:
            table.update_runs(candidates, now)
        except ValueError:
            # a record the table refuses (a time that is no time, from a remote node's event):
            # the others are shown, that one is not, rather than no redraw ever again
            for record in candidates:
                with contextlib.suppress(ValueError):
                    table.update_runs([record], now)

    def _update_detail(self, dirty: set[str], full: bool) -> None:
        """Keep the detail pane on the selected run, current, with a live duration."""
        selected = self.main.query_one(RunsTable).selected_run_id
        detail = self.main.query_one(RunDetail)
        shown = detail.record
        if selected is None:
            if shown is not None:
                detail.show(None)
            return
        view = self.state.runs.get(selected)
        if (
            full
            or shown is None
            or shown.id != selected
            or selected in dirty
            or (view is not None and view.status is RunStatus.RUNNING)
        ):
            self._show_detail(selected)

    def _show_detail(self, run_id: str | None) -> None:
        seen = self.state.attempts(run_id)
        attempts = None if seen is None else [RunAttempt(**fields) for fields in seen]
        self.main.query_one(RunDetail).show(self._complete(self.state.record(run_id)), self._runs_clock(), attempts)

    def _complete(self, record: RunRecord | None) -> RunRecord | None:
        """``record`` with its full values when the wire cut some down; fetched once, in the background.

        A remote engine sends large params, results and tracebacks as markers
        (see ``taskwatch.engine.snapshot``); the detail pane asks for the whole
        record when the user looks at such a run.
        """
        if record is not None and record.id not in self._fill_asked and self.state.is_partial(record.id):
            self._fill([record.id])  # looked at: fetched next
        if record is None or not _has_cut_values(record):
            return record
        full = self._full_records.get(record.id)
        if full is not None and full.status is record.status and full.attempt == record.attempt:
            return full.model_copy(update={"progress": record.progress})
        if record.id not in self._fetching:
            self._fetching.add(record.id)
            self.run_worker(self._fetch_full(record.id), group="full-records")
        return record

    async def _fetch_full(self, run_id: str) -> None:
        try:
            full = await self.client.get(run_id)
        except COMMAND_ERRORS as exc:
            # too large even for one reply, evicted, disconnected or no reply in time (a
            # TimeoutError): the cut values stay shown
            if not self._dashboard_gone:
                self.notify(f"could not load run {run_id} in full: {exc}", severity="warning")
            return
        finally:
            self._fetching.discard(run_id)
        self._keep_full(full)
        if self._dashboard_gone:
            return
        if self.main.query_one(RunsTable).selected_run_id == run_id:
            self._show_detail(run_id)

    def _fill(self, run_ids: Iterable[str]) -> None:
        """Fetch the records of these runs, which the model knows only from events after their
        submission (no params, submit time or key), in the background; the last given first."""
        queued = self._to_fill
        for run_id in run_ids:
            queued.pop(run_id, None)
            queued[run_id] = None
        for run_id in list(islice(queued, max(0, len(queued) - _FILLS_QUEUED))):
            del queued[run_id]
        if queued and not self._filling:
            self._filling = True
            self.run_worker(self._fill_runs(), group="fill-runs")

    async def _fill_runs(self) -> None:
        try:
            while self._to_fill and not self._dashboard_gone:
                batch = list(self._to_fill)[-_FILLS_AT_ONCE:]
                for run_id in batch:
                    del self._to_fill[run_id]
                    self._fill_asked[run_id] = None
                for run_id in list(islice(self._fill_asked, max(0, len(self._fill_asked) - _FILLS_REMEMBERED))):
                    del self._fill_asked[run_id]
                batch = [run_id for run_id in batch if self.state.is_partial(run_id)]
                answers = await asyncio.gather(*(self.client.get(run_id) for run_id in batch), return_exceptions=True)
                for answer in answers:
                    if isinstance(answer, RunRecord):
                        self.state.fill(answer)
                    elif not isinstance(answer, COMMAND_ERRORS):
                        raise answer
                    # else gone from the engine, disconnected or no reply: the run stays as
                    # its events told it
        finally:
            self._filling = False

    def _keep_full(self, full: RunRecord) -> None:
        self._full_records[full.id] = full
        while len(self._full_records) > _FULL_RECORDS_KEPT:
            del self._full_records[next(iter(self._full_records))]

    async def _in_full(self, record: RunRecord, purpose: str) -> RunRecord | None:
        """``record`` with every value in full, fetched now if the wire cut some down; None
        (and a message) when it cannot be had: an action that uses the values (a form to
        resubmit, a traceback to read) must never use a shortened stand-in."""
        partial = self.state.is_partial(record.id)
        if not _has_cut_values(record) and not partial:
            return record
        full = None if partial else self._full_records.get(record.id)
        if full is None or full.status is not record.status or full.attempt != record.attempt:
            try:
                full = await self.client.get(record.id)
            except Exception as exc:  # noqa: BLE001 - a key's action says what went wrong, never stops the app
                self.notify(
                    f"could not load run {record.id} in full for {purpose}: {error_text(exc)}", severity="warning"
                )
                return None
            self._keep_full(full)
            self.state.fill(full)
        if is_truncated(full.params) or is_truncated(full.result):  # a value the engine itself holds shortened
            self.notify(f"run {record.id} holds shortened values: {purpose} needs them whole", severity="warning")
            return None
        # an error's text the engine keeps cut to its bound (where the failure was recorded) is
        # the whole of it: there is no more to fetch
        return full

    def _update_failures(self) -> None:
        failed = self.state.failed_runs()
        key = (len(failed) and hash(tuple((r.id, r.attempt) for r in failed[:50])), len(self.state.worker_crashes))
        if key != self._failures_shown:
            self._failures_shown = key
            self.main.query_one(FailuresList).update(failed, self.state.workers)

    def unresponsive_for(self) -> float | None:
        """Seconds the engine has left the dashboard's requests unanswered and sent nothing
        else either, once that is ``unresponsive_after`` or more; None while it answers."""
        since = self._unanswered_since
        if since is None or not self.client.connected:
            return None
        heard = self.client.last_heard
        silent = time.monotonic() - (since if heard is None else max(since, heard))
        return silent if silent >= self.unresponsive_after else None

    @property
    def engine_gone(self) -> bool:
        """Whether the engine went away for good: it was connected, is not, and the client
        does not reconnect (an in-process engine that stopped; a remote client keeps trying,
        saying so in ``retrying``, until it gives up with a ``failure``)."""
        return (
            self._connected_once
            and self.client.failure is None
            and not self.client.connected
            and not self.client.retrying
        )

    @while_dashboard_alive
    def _update_header(self, now: float | None = None) -> None:
        now = self.clock() if now is None else now
        badge = self.main.query_one(LeaderBadge)
        failure = self.client.failure
        # why the last attempt to reach the engine failed (a client that reconnects by itself)
        reason = self.client.last_error
        gone = self.engine_gone
        if badge.display == gone:
            # the note says all there is: "reconnecting" would never come true, "leader" is over
            badge.display = not gone
        if failure is not None:
            badge.update_failed(failure)
        elif gone:
            pass
        elif self.state.leadership is not None:
            badge.update(
                self.state.leadership, self.state.started_at, now, connected=self.client.connected,
                silent_for=self.unresponsive_for(), reason=reason,
            )
        else:
            badge.update_disconnected(self.client.where, reason)
        # an engine that cannot reach its store runs on, but claims and leads nothing: said
        # beside the store, from the last overview (while the engine answers them)
        stats = self.state.stats
        cut_off = stats.cut_off_for if stats is not None and self.client.connected and not gone else None
        self.main.query_one(StoreBadge).show_cut_off(cut_off)
        self.main.query_one(EngineStateNote).show(*self._engine_state_note(gone))

    def _engine_state_note(self, gone: bool) -> tuple[str, Text | None]:
        """What the header says of the engine's stop: its state (as EngineStateNote takes
        it) and words; ("", None) while it runs, or nothing is known of a stop."""
        if gone:
            text = Text("■ STOPPED", style="bold red")
            if self.state.node_id:
                text.append(f"  {self.state.node_id}", style="bold")
            if self.state.leadership is not None:
                text.append(f"  last term {self.state.leadership.term}", style="dim")
            text.append("  shown as it ended; q quits", style="dim")
            return "stopped", text
        engine_state = self.state.engine_state
        if self.client.failure is not None or engine_state not in ("stopping", "stopped"):
            return "", None
        if self.client.connected:
            if engine_state == "stopping":
                return "stopping", Text("■ STOPPING", style="bold yellow")
            return "stopped", Text("■ STOPPED", style="bold red")
        # disconnected, reconnecting: the engine said it was stopping, so no network fault
        # took it away (it may come back, restarted)
        said = "stopping when last seen" if engine_state == "stopping" else "STOPPED"
        return "stopped", Text(f"■ {said}", style="bold red")

    def _update_counts(self) -> None:
        log = self.main.query_one(EventLog)
        self.main.query_one(CountsBar).update(
            self.state.by_status or self.state.counts(),
            self.state.dropped + self.client.dropped,
            self.view_paused,
            log.buffered,
            totals=self.state.totals(),
            # measured over the overviews: none come while disconnected or unanswered, so no
            # rate is known (the last one measured would stand for a hung engine's)
            rate=self.state.finish_rate() if self._live() else None,
        )
        queues = self.main.query_one(QueuesTable)
        if queues.measuring and not self._live() and not self.view_paused:
            queues.update_queues(self.state.queues, self.clock(), live=False)  # the queues' rates too

    def _live(self) -> bool:
        """Whether the overviews come from a running engine that answers (rates are measured on them)."""
        return self.client.connected and self.unresponsive_for() is None

    @while_dashboard_alive
    def refresh_tables(self) -> None:
        now = self.clock()
        self.main.query_one(ScheduleTable).update_schedule(self.state.schedule, now)
        self.main.query_one(QueuesTable).update_queues(self.state.queues, now, live=self._live())
        self.main.query_one(TriggersTable).update_triggers(self.state.triggers, now)
        self.main.query_one(WorkersTable).update_workers(self.state.workers, now)
        self._failures_shown = (-1, -1)
        self._update_failures()
        self._update_task_stats()

    def _update_task_stats(self) -> None:
        if self.active_tab != "tasks":
            # nothing on screen to keep up to date: the book keeps which tasks changed, and
            # their rows are brought up to date when the tab is shown (see _tasks_shown)
            return
        book = self.state.task_stats
        dropped = self.state.dropped + self.client.dropped
        if not book.changed and dropped == self._stats_dropped:
            return
        self._stats_dropped = dropped
        # only the tasks whose figures moved: thousands of tasks are not all rebuilt each second
        changed = book.take_changed()
        self.main.query_one(TaskStatsTable).update_tasks([TaskStats(**book.row(task)) for task in changed])
        since = "" if book.since is None else time.strftime("%H:%M:%S", time.localtime(book.since))
        text = Text()
        if since:
            text.append(
                f"Runs seen by this dashboard since {since} (its first snapshot's runs included, older queued "
                "ones once they start or end)"
            )
        if since and dropped:
            # the header's counts come whole with each overview; these only from the runs listed
            text.append(
                f"\n⚠ {dropped:,} events were dropped: these figures may miss runs, or show runs as not "
                "finished (the reload after a drop counts only the runs its snapshot lists)",
                style="bold yellow",
            )
        self.main.query_one("#task-stats-since", Static).update(text)

    @on(TabbedContent.TabActivated)
    @while_dashboard_alive
    def _tasks_shown(self, event: TabbedContent.TabActivated) -> None:
        # hidden, the Tasks tab was left as it was: what changed since is shown now
        if event.pane.id == "tasks":
            self._update_task_stats()

    # ------------------------------------------------------------------ selection

    @property
    def active_tab(self) -> str:
        return str(self.main.query_one(TabbedContent).active)

    @property
    def selected_run(self) -> RunRecord | None:
        """The run the user is looking at: the Runs table's, or the Failures list's."""
        tab = self.active_tab
        if tab == "failures":
            picked = self.main.query_one(FailuresList).selected
            if picked is None or picked[0] != "run":
                return None
            return self.state.failure(picked[1])
        if tab == "runs":
            return self._complete(self.state.record(self.main.query_one(RunsTable).selected_run_id))
        return None

    def _no_run_selected(self, verb: str) -> None:
        where = "on the Runs (1) or Failures (2) tab" if verb != "cancel" else "on the Runs tab (1)"
        self.notify(f"select a run to {verb} {where}", severity="warning")

    @on(RunsTable.RunHighlighted)
    @while_dashboard_alive
    def _run_highlighted(self, message: RunsTable.RunHighlighted) -> None:
        self._show_detail(message.run_id)

    @on(RunsTable.RunSelected)
    @while_dashboard_alive
    def _run_selected(self, message: RunsTable.RunSelected) -> None:
        self._show_detail(message.run_id)
        self.open_detail()

    @on(FailuresList.FailureSelected)
    def _failure_chosen(self) -> None:
        self.action_traceback()

    # ------------------------------------------------------------------ actions

    def action_show_tab(self, tab: str) -> None:
        if tab != "runs":
            self.main.remove_class("-detail-open")
        self.main.query_one(TabbedContent).active = tab
        self._focus_tab(tab)

    @on(TabbedContent.TabActivated)
    def _tab_activated(self, event: TabbedContent.TabActivated) -> None:
        # a tab chosen with the mouse puts the keys in its table too
        if event.pane.id is not None:
            self._focus_tab(event.pane.id)
        # the footer shows the keys of the tab in view
        self.refresh_bindings()
        self._fit_footer()

    def _focus_tab(self, tab: str) -> None:
        selector = TAB_FOCUS.get(tab)
        if selector is not None:
            self.main.query_one(selector).focus()
        else:
            # nothing to focus there; focus left in a hidden tab would switch back to that tab
            self.set_focus(None)

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    def action_attach_command(self) -> None:
        serving = self.serving
        if serving is None:
            self.notify("this dashboard serves no engine: start it with --serve ADDRESS", severity="warning")
            return
        self.push_screen(AttachScreen(serving.address, serving.token, serving.node_id))

    def action_submit(
        self, task: str | None = None, values: dict[str, Any] | None = None, title: str = "Submit a task"
    ) -> None:
        if not self._connected_once:
            self.notify("not connected to an engine yet", severity="warning")
            return
        # connected to an engine with no task to submit (periodic tasks only, or only queues
        # and workers): the dialog says so

        def submitted(record: RunRecord | None) -> None:
            if record is None:
                return
            self.notify(f"submitted {record.task} as run {record.id}")
            self.action_show_tab("runs")
            self.state.add_record(record)
            self.redraw()
            self.main.query_one(RunsTable).select_run(record.id)
            self._show_detail(record.id)

        self.push_screen(
            SubmitScreen(
                self.state.tasks, self.client.submit, initial=task, values=values, title=title,
                cursor_blink=self.cursor_blink,
            ),
            submitted,
        )

    def _sole(self, verb: str, targets: Iterable[str], what: str) -> contextlib.AbstractContextManager[bool]:
        """Whether a key may ``verb`` ``targets`` now: False, after a word, while an earlier
        ``verb`` of one of them still waits for the engine's reply (see :class:`CommandsInFlight`);
        the submit form's Submit refuses a second press the same way."""
        return self._in_flight.sole(verb, targets, what)

    async def _command(
        self, verb: str, call: Awaitable[T], refused: type[TaskwatchError] | None = None
    ) -> T | None:
        """Await a command to the engine; a refusal or a failure becomes a message."""
        try:
            return await call
        # anything else too: what an engine's callables or its store raise (a KeyError from a
        # run id factory, say) is said like any failure; a key's worker never stops the app
        except Exception as exc:  # noqa: BLE001
            if refused is not None and isinstance(exc, refused):
                self.notify(str(exc), severity="warning")
            else:
                self.notify(command_failure(verb, exc), severity="error", timeout=10)
            return None

    async def _command_once(
        self,
        verb: str,
        target: str,
        what: str,
        call: Callable[[], Awaitable[T]],
        refused: type[TaskwatchError] | None = None,
    ) -> T | None:
        """:meth:`_command` of ``call()``; None, sending nothing, while the last ``verb`` of
        ``target`` still waits for its reply (see :meth:`_sole`)."""
        with self._sole(verb, [target], what) as free:
            return await self._command(verb, call(), refused) if free else None

    def _marked_runs(self) -> list[RunRecord]:
        """The runs marked in the Runs table (when that is the tab in view)."""
        if self.active_tab != "runs":
            return []
        table = self.main.query_one(RunsTable)
        found = (self.state.record(run_id) or table.record(run_id) for run_id in table.marked)
        return [record for record in found if record is not None]

    @staticmethod
    def _name_runs(runs: list[RunRecord], limit: int = 4) -> str:
        named = ", ".join(f"{r.id} ({r.task})" for r in runs[:limit])
        return named + (f" and {len(runs) - limit} more" if len(runs) > limit else "")

    async def _confirmed(self, question: str, yes: str) -> bool:
        if not self.confirm:
            return True
        dialog: ConfirmScreen = ConfirmScreen(question, yes=yes)
        answer: bool = await self.push_screen_wait(dialog)
        return answer

    @work(group="actions")
    async def action_cancel_run(self) -> None:
        marked = self._marked_runs()
        if marked:
            with self._sole("cancel", (r.id for r in marked), f"{len(marked)} marked runs") as free:
                if free:
                    await self._cancel_many(marked)
            return
        run = self.selected_run if self.active_tab == "runs" else None
        if run is None:
            self._no_run_selected("cancel")
            return
        if run.status.finished:
            # no dialog: a "yes" could only be refused
            self.notify(str(RunNotCancellable(run.id, run.status.value)), severity="warning")
            return
        with self._sole("cancel", [run.id], f"run {run.id}") as free:
            if free:
                await self._cancel_one(run)

    async def _cancel_one(self, run: RunRecord) -> None:
        # the run is fixed now: rows moving while the dialog is open change nothing
        if not await self._confirmed(f"Cancel run {run.id} ({run.task}, {run.status.value})?", "Cancel run"):
            return
        record = await self._command("cancel", self.client.cancel(run.id), RunNotCancellable)
        if record is None:
            return
        if record.status is RunStatus.CANCELLED:
            self.notify(f"run {run.id} cancelled")
        else:
            self.notify(f"run {run.id} was asked to cancel and is still {record.status.value}", severity="warning")

    async def _cancel_many(self, runs: list[RunRecord]) -> None:
        if not await self._confirmed(f"Cancel {len(runs)} marked runs: {self._name_runs(runs)}?", f"Cancel {len(runs)} runs"):
            return
        records, refused = await self._each_run("cancel", self.client.cancel, runs)
        cancelled = sum(record.status is RunStatus.CANCELLED for record in records)
        self.main.query_one(RunsTable).clear_marks()
        self._say_bulk(f"cancelled {cancelled} of {len(runs)} marked runs", refused)

    #: commands of one bulk action in flight at once: a run that takes its time to wind down
    #: holds up no other, and a remote client's window of requests (16) is not filled by them
    _BULK_IN_FLIGHT = 8

    async def _each_run(
        self, verb: str, command: Callable[[str], Awaitable[RunRecord]], runs: list[RunRecord]
    ) -> tuple[list[RunRecord], list[str]]:
        """``command`` for every run, a few at a time: the records it returned, in the runs'
        order, and what became of those it was refused for."""
        gate = asyncio.Semaphore(self._BULK_IN_FLIGHT)

        async def one(run: RunRecord) -> RunRecord | str:
            async with gate:
                try:
                    return await command(run.id)
                except Exception as exc:  # noqa: BLE001 - said with the others refused (see _command)
                    return f"{run.id}: {command_failure(verb, exc)}"

        outcomes = await asyncio.gather(*(one(run) for run in runs))
        return [o for o in outcomes if not isinstance(o, str)], [o for o in outcomes if isinstance(o, str)]

    def _say_bulk(self, done: str, refused: list[str]) -> None:
        if refused:
            self.notify(f"{done}; {len(refused)} refused: " + "; ".join(refused[:3]), severity="warning", timeout=10)
        else:
            self.notify(done)

    async def _retry_many(self, runs: list[RunRecord]) -> list[RunRecord]:
        retried, refused = await self._each_run("retry", self.client.retry, runs)
        for record in retried:
            self.state.add_record(record)
        self._say_bulk(f"retried {len(retried)} of {len(runs)} runs", refused)
        return retried

    @work(group="actions")
    async def action_retry_run(self) -> None:
        marked = self._marked_runs()
        if marked:
            with self._sole("retry", (r.id for r in marked), f"{len(marked)} marked runs") as free:
                if free and await self._confirmed(
                    f"Retry {len(marked)} marked runs: {self._name_runs(marked)}?", f"Retry {len(marked)} runs"
                ):
                    self.main.query_one(RunsTable).clear_marks()
                    await self._retry_many(marked)
            return
        run = self.selected_run
        if run is None:
            self._no_run_selected("retry")
            return
        with self._sole("retry", [run.id], f"run {run.id}") as free:
            if free:
                await self._retry_one(run)

    async def _retry_one(self, run: RunRecord) -> None:
        record = await self._command("retry", self.client.retry(run.id), RunNotRetryable)
        if record is None:
            return
        self.notify(f"retrying {run.task} as run {record.id}")
        self.state.add_record(record)
        self.action_show_tab("runs")
        self.redraw()
        self.main.query_one(RunsTable).select_run(record.id)

    @work(group="actions")
    async def action_retry_task_failures(self) -> None:
        """R on the Failures tab: retry every failed run of the selected failure's task (those
        the dashboard holds, leaving out runs already retried)."""
        picked = self.main.query_one(FailuresList).selected if self.active_tab == "failures" else None
        failure = self.state.failure(picked[1]) if picked is not None and picked[0] == "run" else None
        if failure is None:
            self.notify("select a failed run on the Failures tab (2)", severity="warning")
            return
        retried_already = {v.source.removeprefix("retry:") for v in self.state.runs.values() if v.source.startswith("retry:")}
        runs = [r for r in self.state.failed_runs() if r.task == failure.task and r.id not in retried_already]
        if not runs:
            self.notify(f"every failure of {failure.task} shown here was retried already", severity="warning")
            return
        with self._sole("retry", (r.id for r in runs), f"the failures of {failure.task}") as free:
            if free and await self._confirmed(
                f"Retry the {len(runs)} failed runs of task {failure.task}: {self._name_runs(runs)}?",
                f"Retry {len(runs)} runs",
            ):
                await self._retry_many(runs)

    @work(group="actions")
    async def action_edit_resubmit(self) -> None:
        """e: the submit form for the selected run's task, filled with its params, to edit and submit anew."""
        run = self.selected_run
        if run is None:
            self._no_run_selected("edit and resubmit")
            return
        info = self.state.task_info(run.task)
        if info is None or not info.submittable:
            self.notify(f"task {run.task} cannot be submitted from the dashboard", severity="warning")
            return
        # params the wire cut down would fill the form with a stand-in (or nothing)
        with self._sole("edit and resubmit", [run.id], f"run {run.id}") as free:
            full = await self._in_full(run, "edit and resubmit") if free else None
        if full is None:
            return
        self.action_submit(full.task, values=dict(full.params), title=f"Edit and resubmit {full.task} (from run {full.id})")

    @work(group="actions")
    async def action_traceback(self) -> None:
        if self.active_tab == "events":
            await self._event_traceback()
            return
        if self.active_tab == "scheduler":
            worker = self._selected_worker()
            if worker is None or worker.last_error is None:
                self.notify("the selected worker has not crashed", severity="warning")
            else:
                error = worker.last_error
                title = printable(f"worker {worker.name}: {error.type}: {error.message}")
                self.push_screen(TracebackScreen(title, printable_lines(error.traceback)))
            return
        if self.active_tab == "failures":
            failures = self.main.query_one(FailuresList)
            selected = failures.selected
            picked = failures.selected_traceback()
            if picked is None or selected is None:
                self.notify("no failure selected", severity="warning")
                return
            failed = self.state.failure(selected[1]) if selected[0] == "run" else None
            if failed is None:  # a crashed worker: its error came whole with the overview
                self.push_screen(TracebackScreen(*picked))
                return
            run: RunRecord | None = failed
        else:
            run = self.selected_run
        if run is not None:
            # a traceback the wire cut down is fetched whole (shown cut, after a warning, if it cannot be)
            with self._sole("show the traceback of", [run.id], f"run {run.id}") as free:
                if not free:
                    return
                run = await self._in_full(run, "the traceback") or run
        if run is None or run.error is None:
            self.notify("the selected run has no traceback", severity="warning")
            return
        # a task's error may hold escape sequences: shown, never handed to the terminal
        title = printable(f"{run.task} {run.id}: {run.error.type}: {run.error.message}")
        self.push_screen(TracebackScreen(title, printable_lines(run.error.traceback)))

    async def _event_traceback(self) -> None:
        """The traceback of the event under the Events tab's cursor: a run's failure (the run's
        own, fetched whole where the wire cut it), a retried attempt's or a worker's crash."""
        event = self.main.query_one(EventLog).chosen
        error = getattr(event, "error", None)
        if event is None or not isinstance(error, RunError):
            self.notify("the selected event has no traceback: move the cursor to a run.failed, "
                        "run.retrying or worker.crashed event", severity="warning")
            return
        run_id = getattr(event, "run_id", None)
        if event.kind == "run.failed" and isinstance(run_id, str):
            # a run fails once: its record's error is this one, whole
            record = self.state.failure(run_id)
            if record is not None and record.error is not None:
                with self._sole("show the traceback of", [run_id], f"run {run_id}") as free:
                    if not free:
                        return
                    record = await self._in_full(record, "the traceback") or record
                if record.error is not None:
                    error = record.error
        who = f"{getattr(event, 'task', '')} {run_id}" if run_id else f"worker {getattr(event, 'name', '')}"
        title = printable(f"{who}: {error.type}: {error.message}")
        self.push_screen(TracebackScreen(title, printable_lines(error.traceback)))

    def action_filter(self) -> None:
        tab = self.main.query_one(TabbedContent).active
        target = "#events-filter" if tab == "events" else "#runs-filter"
        if tab not in ("events", "runs"):
            self.action_show_tab("runs")
        box = self.main.query_one(target, Input)
        box.add_class("shown")
        box.focus()

    def action_close_filter(self) -> None:
        """Esc closes what is open: the run detail on a narrow screen, or the filter of the tab
        in view (clearing it, as in k9s), being typed in or confirmed with Enter and left on
        screen while the table has focus."""
        if self.detail_open and self.active_tab == "runs":
            self.open_detail(False)
            return
        in_view = f"{self.active_tab}-filter"
        for box in self.main.query(".filter").results(Input):
            if box.has_focus or (box.id == in_view and box.has_class("shown")):
                had_focus = box.has_focus
                box.value = ""
                box.remove_class("shown")
                if had_focus:
                    self.main.query_one(EventLog if box.id == "events-filter" else RunsTable).focus()

    @on(Input.Changed, "#runs-filter")
    def _runs_filter(self, event: Input.Changed) -> None:
        wanted = parse_run_filter(event.value)
        table = self.main.query_one(RunsTable)
        table.set_filter(wanted.statuses, wanted.text, tasks=wanted.tasks)

    @on(Input.Changed, "#events-filter")
    def _events_filter(self, event: Input.Changed) -> None:
        kinds = {k for k in event.value.replace(",", " ").split() if k}
        self.main.query_one(EventLog).set_filter(kinds or None)

    @on(Input.Submitted, ".filter")
    def _filter_done(self, event: Input.Submitted) -> None:
        # an active filter stays on screen, so nobody wonders where the rows went
        event.input.set_class(bool(event.value), "shown")
        if event.input.id == "runs-filter":
            unknown = unknown_statuses(event.value)
            if unknown:
                valid = ", ".join(s.value for s in RunStatus)
                self.notify(f"unknown status {', '.join(unknown)}; use one of {valid}", severity="warning")
        if event.input.id == "events-filter":
            unknown_kinds = unknown_event_kinds(event.value)
            if unknown_kinds:
                self.notify(
                    f"no event kind matches {', '.join(unknown_kinds)}; use kinds such as run.failed, "
                    "or prefixes ending in a dot, such as run.",
                    severity="warning",
                )
            self.main.query_one(EventLog).focus()
        else:
            self.main.query_one(RunsTable).focus()

    def action_toggle_view(self) -> None:
        self.view_paused = not self.view_paused

    def watch_view_paused(self, paused: bool) -> None:
        self.main.query_one(EventLog).paused = paused
        self.main.query_one(HealthSparklines).paused = paused
        self.notify("view paused: events are still recorded" if paused else "view resumed")
        if not paused:
            if self._table_stale:
                self._reset_runs_table()
            self.redraw(full=True)
            self.refresh_tables()
        else:
            self._update_counts()

    @work(group="actions")
    async def action_toggle_periodic(self, name: str | None = None) -> None:
        if name is None and self.active_tab == "scheduler":
            name = self.main.query_one(ScheduleTable).selected_name
        if name is None:
            self.notify("select a periodic task on the Scheduler tab (3)", severity="warning")
            return
        info = next((p for p in self.state.schedule if p.name == name), None)
        resume = info is not None and info.paused
        verb = "resume" if resume else "pause"
        call = self.client.resume_periodic if resume else self.client.pause_periodic
        result = await self._command_once(verb, name, f"periodic task {name}", lambda: call(name))
        if result is None:
            return
        self.notify(f"periodic task {name} {verb}d")
        self.state.schedule = [result if p.name == name else p for p in self.state.schedule]
        self.main.query_one(ScheduleTable).update_schedule(self.state.schedule, self.clock())

    @work(group="actions")
    async def action_run_periodic(self, name: str | None = None) -> None:
        if name is None and self.active_tab == "scheduler":
            name = self.main.query_one(ScheduleTable).selected_name
        if name is None:
            self.notify("select a periodic task on the Scheduler tab (3)", severity="warning")
            return
        # a run still going is a refusal to read, not a failure
        record = await self._command_once(
            "run", name, f"periodic task {name}", lambda: self.client.run_periodic(name), PeriodicNotRunnable
        )
        if record is None:
            return
        self.notify(f"periodic task {name} queued now as run {record.id}; its schedule is unchanged")
        self.state.add_record(record)

    # ------------------------------------------------------------------ the Scheduler tab's other loops

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        """Keys for a tab's rows show in the footer, and act, only on that tab: the Scheduler
        tab's row keys there, each run key where it can act on the runs listed (cancel on
        the Runs tab, retry there and on Failures, t wherever a traceback can be picked; the
        footer has room then)."""
        if action not in SCHEDULER_ACTIONS and action not in RUN_ACTIONS:
            return True
        try:
            tab = self.active_tab
        except NoMatches:
            return True
        return tab == "scheduler" if action in SCHEDULER_ACTIONS else tab in RUN_ACTIONS[action]

    def _selected_worker(self) -> WorkerInfo | None:
        name = self.main.query_one(WorkersTable).selected_name
        return next((w for w in self.state.workers if w.name == name), None)

    def _show_worker(self, info: WorkerInfo) -> None:
        self.state.workers = [info if w.name == info.name else w for w in self.state.workers]
        self.main.query_one(WorkersTable).update_workers(self.state.workers, self.clock())

    def _show_queue(self, info: QueueInfo) -> None:
        self.state.queues = [info if q.name == info.name else q for q in self.state.queues]
        self.main.query_one(QueuesTable).update_queues(self.state.queues, self.clock())

    def _named(self, name: str | None, table: str) -> str | None:
        """The row to act on: the one named (the palette), else the selected one of ``table``."""
        if name is not None:
            return name
        if self.active_tab != "scheduler":
            return None
        if table == "workers":
            return self.main.query_one(WorkersTable).selected_name
        return self.main.query_one(QueuesTable).selected_name

    @work(group="actions")
    async def action_restart_worker(self, name: str | None = None) -> None:
        name = self._named(name, "workers")
        if name is None:
            self.notify("select a supervised worker on the Scheduler tab (3)", severity="warning")
            return
        info = await self._command_once(
            "restart", name, f"worker {name}", lambda: self.client.restart_worker(name), WorkerNotLeading
        )
        if info is not None:
            self._show_worker(info)
            self.notify(f"worker {name} restarted")

    @work(group="actions")
    async def action_toggle_worker(self, name: str | None = None) -> None:
        name = self._named(name, "workers")
        if name is None:
            self.notify("select a supervised worker on the Scheduler tab (3)", severity="warning")
            return
        current = next((w for w in self.state.workers if w.name == name), None)
        start = current is not None and current.stopped_by_user
        call = self.client.start_worker if start else self.client.stop_worker
        info = await self._command_once("start" if start else "stop", name, f"worker {name}", lambda: call(name))
        if info is None:
            return
        self._show_worker(info)
        if not start:
            self.notify(f"worker {name} stopped; it stays stopped until started (X) or restarted (x)")
        elif info.state == "waiting_for_leadership":
            self.notify(f"worker {name} may run again: it starts once this node leads")
        else:
            self.notify(f"worker {name} started")

    @work(group="actions")
    async def action_toggle_queue(self, name: str | None = None) -> None:
        name = self._named(name, "queues")
        if name is None:
            self.notify("select a queue on the Scheduler tab (3)", severity="warning")
            return
        current = next((q for q in self.state.queues if q.name == name), None)
        resume = current is not None and current.paused
        call = self.client.resume_queue if resume else self.client.pause_queue
        info = await self._command_once("resume" if resume else "pause", name, f"queue {name}", lambda: call(name))
        if info is None:
            return
        self._show_queue(info)
        if resume:
            self.notify(f"queue {name} resumed: {info.depth} jobs waiting")
        else:
            self.notify(f"queue {name} paused: jobs being handled finish, new ones wait ({info.depth} now)")

    @work(group="actions")
    async def action_purge_queue(self, name: str | None = None) -> None:
        name = self._named(name, "queues")
        if name is None:
            self.notify("select a queue on the Scheduler tab (3)", severity="warning")
            return
        with self._sole("purge", [name], f"queue {name}") as free:
            if free:
                await self._purge(name)

    async def _purge(self, name: str) -> None:
        current = next((q for q in self.state.queues if q.name == name), None)
        depth = current.depth if current is not None else 0
        jobs = "1 job" if depth == 1 else f"{depth} jobs"
        if not await self._confirmed(
            f"Purge queue {name}: drop the {jobs} waiting in it? Jobs being handled finish; "
            "the dropped ones are not run and leave the store.",
            f"Purge {jobs}",
        ):
            return
        purge = await self._command("purge", self.client.purge_queue(name))
        if purge is None:
            return
        self._show_queue(purge.info)
        stored = f" ({purge.from_store} removed from the store)" if purge.from_store else ""
        self.notify(f"purged {purge.purged} jobs from queue {name}{stored}")

    @work(group="actions")
    async def action_fire_trigger(self, name: str | None = None, key: str | None = None) -> None:
        if name is None and self.active_tab == "scheduler":
            picked = self.main.query_one(TriggersTable).selected_trigger_key
            if picked is not None:
                name, key = picked
        if name is None:
            self.notify("select a trigger key on the Scheduler tab (3)", severity="warning")
            return
        if key is None:
            state = next((t for t in self.state.triggers if t.name == name), None)
            keys = [k.key for k in state.keys] if state is not None else []
            if len(keys) == 1:
                key = keys[0]
            else:
                key = await self.push_screen_wait(ChooseKeyScreen(name, keys, cursor_blink=self.cursor_blink))
                if key is None:
                    return
        trigger, fired_key = name, key
        fire = await self._command_once(
            "fire", f"{name}\0{key}", f"trigger {name} for key {key}",
            lambda: self.client.fire_trigger(trigger, fired_key),
        )
        if fire is None:
            return
        if fire.fired:
            self.notify(f"trigger {name} fired for key {key}: run {fire.run_id}")
        else:
            what = "running" if fire.running else "queued"
            self.notify(f"key {key} of trigger {name} has run {fire.run_id} {what} already; not fired again",
                        severity="warning")

    # ------------------------------------------------------------------ the event log

    @on(EventLog.EventChosen)
    def _event_chosen(self, message: EventLog.EventChosen) -> None:
        self.push_screen(EventScreen(message.event))

    # ------------------------------------------------------------------ command palette

    def get_system_commands(self, screen: Screen[Any]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        if screen is not self.main:
            return  # a dialog is open: its own keys apply
        # the palette reads titles and help as markup, and they quote names and descriptions
        # from tasks: a "[/]" in one raised in the palette's search, which lost every command
        # after it, and a "[bold red]" was eaten
        for command in self._dashboard_commands():
            yield command._replace(title=self._as_written(command.title), help=self._as_written(command.help))

    @staticmethod
    def _as_written(text: str) -> str:
        """``text`` as markup that draws it as written, on one line. Textual's markup has one
        escape, ``\\[`` for ``[`` (``textual.markup.escape`` misses ``[$x]`` and doubles backslashes)."""
        return printable(text).replace("[", "\\[")

    def _dashboard_commands(self) -> Iterable[SystemCommand]:
        yield SystemCommand("Submit a task", "Open the submit form (s)", self.action_submit)
        for info in self.state.tasks:
            if info.submittable:
                yield SystemCommand(
                    f"Submit {info.name}", info.description or "Open the submit form for this task",
                    lambda name=info.name: self.action_submit(name), discover=False,
                )
        yield SystemCommand("Cancel selected run", "Cancel the run selected in the Runs table (c)", self.action_cancel_run)
        yield SystemCommand("Retry selected run", "Submit the selected failed run again with the same params (r)", self.action_retry_run)
        yield SystemCommand("Show traceback", "Full traceback of the selected run (t)", self.action_traceback)
        yield SystemCommand(
            "Retry every failure of this task", "On the Failures tab: retry the selected failure's task's failed runs (R)",
            self.action_retry_task_failures,
        )
        yield SystemCommand(
            "Edit and resubmit", "The submit form filled with the selected run's params (e)", self.action_edit_resubmit
        )
        yield SystemCommand("Filter", "Filter runs or events (/)", self.action_filter)
        yield SystemCommand("Pause or resume the view", "Freeze the screen; events keep being recorded (p)", self.action_toggle_view)
        for periodic in self.state.schedule:
            verb = "Resume" if periodic.paused else "Pause"
            yield SystemCommand(
                f"{verb} periodic {periodic.name}", f"{verb} the periodic task {periodic.name} ({periodic.trigger})",
                lambda name=periodic.name: self.action_toggle_periodic(name), discover=False,
            )
            yield SystemCommand(
                f"Run periodic {periodic.name} now", f"Queue a run of {periodic.name} now, its schedule unchanged (n)",
                lambda name=periodic.name: self.action_run_periodic(name), discover=False,
            )
        for worker in self.state.workers:
            yield SystemCommand(
                f"Restart worker {worker.name}", "Cancel the supervised worker and start it again now (x)",
                lambda name=worker.name: self.action_restart_worker(name), discover=False,
            )
            verb = "Start" if worker.stopped_by_user else "Stop"
            yield SystemCommand(
                f"{verb} worker {worker.name}",
                "Let the stopped worker run again (X)" if worker.stopped_by_user
                else "Stop the supervised worker until started again (X)",
                lambda name=worker.name: self.action_toggle_worker(name), discover=False,
            )
        for queue in self.state.queues:
            verb = "Resume" if queue.paused else "Pause"
            yield SystemCommand(
                f"{verb} queue {queue.name}", f"{verb} the consumers of queue {queue.name} (P)",
                lambda name=queue.name: self.action_toggle_queue(name), discover=False,
            )
            yield SystemCommand(
                f"Purge queue {queue.name}", f"Drop the jobs waiting in queue {queue.name}, after asking (D)",
                lambda name=queue.name: self.action_purge_queue(name), discover=False,
            )
        for trigger in self.state.triggers:
            yield SystemCommand(
                f"Fire trigger {trigger.name}", "Run one of its keys now, whatever its count (f)",
                lambda name=trigger.name: self.action_fire_trigger(name), discover=False,
            )
        for i, tab in enumerate(TABS, 1):
            yield SystemCommand(f"Show {tab.title()}", f"Switch to the {tab} tab ({i})", lambda tab=tab: self.action_show_tab(tab))
        if self.serving is not None:
            yield SystemCommand(
                "Attach command", f"How to attach to this engine, served at {self.serving.address}",
                self.action_attach_command,
            )
        yield SystemCommand("Help", "Keys and what they do (?)", self.action_help)

    async def on_unmount(self) -> None:
        if self._frozen:
            self._frozen = False
            gc.unfreeze()  # back to the collector: the objects may go now
        await self.client.close()

    def dashboard_gone(self) -> None:
        """Called as the dashboard screen unmounts: timers must stop touching its widgets."""
        self._dashboard_gone = True
