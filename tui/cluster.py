"""The cluster dashboard: every node, every node's events and, on PostgreSQL, every run.

``taskwatch attach redis://host:6379/0`` opens it on the Redis stream that
engines made with ``events="redis://..."`` publish to (an
:class:`~taskwatch.engine.RedisEventRelay` with no bus of its own): a Nodes
view (id, leader badge and term, up, stopped or unknown, running runs, CPU,
RSS, last event, events seen and missed) above the cluster's event log, each
line naming its node (Enter on a line shows its event's JSON). It only
watches. A node killed without a word (``kill -9``) shows as unknown once it
has been silent for a few of its health intervals (the relay's ``nodes()``
says so).

``taskwatch attach postgresql://...`` opens it on the cluster's database (a
:class:`~taskwatch.engine.ClusterObserver`, which runs no tasks): the Nodes
view comes from the nodes table (up, dead or stopped, last heartbeat, running
runs, CPU, RSS, version) with the leader and term from the lease table (from
the nodes' lease events when they lead through another lease, a RedisLease
say; "leader unknown" when neither says); the
runs of the whole cluster, each with its node, sit between the nodes and the
event log, and ``c`` / ``r`` cancel or retry the selected run wherever it
runs; Enter opens it in full (params, result, attempts, a failure's
traceback), read from the store and kept current while open. When events were missed, the observer reads the runs again from the
store. Runs are newest first, those submitted together in the order the store
took them. While the database is out of reach the header says how old what is
shown is, a node silent past the node TTL since shows as ``unknown`` and a
leader whose lease lapsed since is no longer shown; Enter shows a run as read
before, at once, and ``c`` / ``r`` are refused at once (nothing is sent). A
read or a command that gets no answer within ``answer_timeout`` is given up on,
and the user is told (a cancel or a retry may still have been carried out). A
``c`` or ``r`` pressed again while its command still waits is not sent twice (as
in the engine dashboard), and ``r`` on a run's own screen shows the new run then,
so that ``r`` again acts on it.

Any event relay will do: ``ClusterApp(MemoryEventRelay(stream))`` watches
engines of one process sharing a :class:`~taskwatch.engine.MemoryEventStream`
(the pictures of ``make screenshots`` are taken that way).

Entries in the stream that are no event are counted in the header (``N malformed``).

Like the engine dashboard it never redraws per event: a timer drains the bus
at a fixed rate. Events missed on the way are counted per node and in the
header, and marked in the log. ``p`` pauses the log (the header says so, with
the events held back meanwhile).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from taskwatch.engine import (
    ClusterNode,
    ClusterObserver,
    EventRelay,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    RunStatus,
    StoredRun,
    Subscription,
    TaskwatchError,
)
from taskwatch.widgets import (
    ClusterRunsTable,
    EventLog,
    NodesTable,
    RunsTable,
    StoreNodesTable,
    printable,
)
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.content import Content
from textual.timer import Timer
from textual.widgets import Footer, Static

from .in_flight import CommandsInFlight
from .screens import ConfirmScreen, EventScreen, RunScreen
from .plain_app import PlainApp

#: what a command through the store can fail with: its own errors, or a lost connection
COMMAND_ERRORS = (TaskwatchError, OSError)

#: seconds a read or a command through the store (Enter, ``c``, ``r``) may take before the
#: dashboard says it got no answer: the store itself keeps retrying for its reconnect_timeout
#: (30 s by default), and a key that goes silent that long reads as ignored
ANSWER_TIMEOUT = 5.0

#: what ``c`` and ``r`` say while the observer knows the database is out of reach
UNREACHABLE = "the database is unreachable: nothing was sent; try again once it answers"

#: seconds between two redraws of the runs table when its runs changed, and when they did not
#: (running runs' durations tick): every running run is listed, thousands of them on a busy
#: cluster, and each redraw renders every running row again
RUNS_REDRAW_CHANGED = 0.2
RUNS_REDRAW_IDLE = 1.0


def as_written(text: object) -> str:
    """``text`` (a node name, a store's error) as markup that draws it as written, on one line:
    the header is markup, and a "[/x]" in a store's error would stop the app. Textual's markup
    has no escape for a backslash: one at the end would escape the closing tag after it, so a
    zero-width space follows it."""
    written = printable(str(text)).replace("[", "\\[")
    return written + "\u200b" if written.endswith("\\") else written


def join_parts(parts: list[str], width: int) -> str:
    """Markup ``parts`` two spaces apart, on as many lines of ``width`` cells as they need,
    so a narrow terminal never splits one part ("27 missed") across two lines."""
    lines: list[list[str]] = [[]]
    used = 0
    for part in parts:
        size = Content.from_markup(part).cell_length  # read as the Static reads it
        if lines[-1] and width and used + 2 + size > width:
            lines.append([])
            used = 0
        used += size + (2 if lines[-1] else 0)
        lines[-1].append(part)
    return "\n".join("  ".join(line) for line in lines)


def leader_part(observer: ClusterObserver, nodes: list[ClusterNode]) -> str:
    """The header's word on who leads, from the nodes the table shows (their roles come from
    the lease, or from the nodes' lease events when they lead through another lease)."""
    if observer.leader_unknown:
        return "[bold yellow]leader unknown[/]"  # the lease read last lapsed since
    leaders = [node for node in nodes if node.is_leader]
    if leaders:
        top = max(leaders, key=lambda node: node.term or 0)
        return f"leader {as_written(top.node)}" + (f" t{top.term}" if top.term is not None else "")
    lease = observer.leader
    if lease is not None:  # held by a process the nodes table does not list
        return f"leader {as_written(lease.holder)} t{lease.term}"
    if observer.leader_vacant or any(node.is_leader is False for node in nodes):
        return "no leader"
    # nothing says who leads: the nodes may lead through a lease this dashboard cannot see
    return "[yellow]leader unknown[/]"


def read_ago(observer: ClusterObserver) -> str:
    """How old what the observer read last is ("as read 12s ago"), by the database's clock."""
    read_at = observer.read_at
    return "never read" if read_at is None else f"as read {max(0, int(observer.store.clock() - read_at))}s ago"


class ClusterApp(PlainApp):
    """Watches a cluster through an event relay (events only) or a :class:`ClusterObserver`
    (nodes, runs and events, with cancel and retry). The source is started with the app and
    stopped with it unless ``manage=False`` (then the caller runs it). ``confirm=False``
    cancels without asking first. ``clock`` is the wall clock that "last event ... ago" is
    measured against (the observer measures heartbeats by the database's clock instead).
    ``answer_timeout``: the seconds Enter, ``c`` and ``r`` wait for the store before saying
    it did not answer."""

    CSS_PATH = ["cluster.tcss", "screens.tcss"]
    TITLE = "taskwatch cluster"

    BINDINGS = [
        Binding("c", "cancel_run", "cancel run"),
        Binding("r", "retry_run", "retry run"),
        Binding("p", "toggle_pause", "pause log"),
        Binding("q", "quit", "quit", priority=True),
    ]


    def __init__(
        self,
        source: EventRelay | ClusterObserver,
        *,
        manage: bool = True,
        refresh_hz: float = 15.0,
        confirm: bool = True,
        clock: Callable[[], float] = time.time,
        answer_timeout: float = ANSWER_TIMEOUT,
    ) -> None:
        super().__init__()
        self.source = source
        #: the observer, when the cluster is watched through its database (runs, cancel, retry)
        self.observer = source if isinstance(source, ClusterObserver) else None
        self.manage = manage
        self.refresh_hz = refresh_hz
        self.confirm = confirm
        self.clock = clock
        self.answer_timeout = answer_timeout
        self._sub: Subscription | None = None
        self._timer: Timer | None = None
        self._runs_shown: set[str] = set()
        #: the cancels and retries whose answers the keys still wait for (as the engine dashboard's)
        self._in_flight = CommandsInFlight(lambda text: self.notify(text, severity="warning"), "the database's answer")
        #: (monotonic time, observer.runs_changes) of the last redraw of the runs table
        self._runs_drawn: tuple[float, int] = (float("-inf"), -1)

    def compose(self) -> ComposeResult:
        yield Static("", id="cluster-header")
        if self.observer is not None:
            yield StoreNodesTable(id="nodes")
            # room for every run the observer lists that has ended: the newest, those that ended
            # last and the newest failures (runs_limit of each) and a few more (one followed, ...)
            yield ClusterRunsTable(id="cluster-runs", max_rows=self.observer.runs_limit * 4)
        else:
            yield NodesTable(id="nodes")
        yield EventLog(id="cluster-events", show_node=True)
        yield Footer()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action in ("cancel_run", "retry_run") and self.observer is None:
            return False  # events only: commands go to a node's own control endpoint
        return True

    async def on_mount(self) -> None:
        # the nodes table above the log grows after the log has scrolled to its end (a table
        # measures its rows when idle): anchored, the log keeps its newest line in view
        self.query_one(EventLog).anchor()
        self._sub = self.source.bus.subscribe()
        if self.manage:
            try:
                await self.source.start()
            except COMMAND_ERRORS as exc:  # the database is unreachable, say: nothing to watch
                self.manage = False
                self.exit(return_code=2, message=f"taskwatch: cannot watch {self.source.public_url}: {exc}")
                return
            except Exception as exc:  # noqa: BLE001 - a client's own error: one line, not a traceback
                # whose locals (the URL, the client's options) would show the password
                self.manage = False
                self.exit(
                    return_code=2, message=f"taskwatch: cannot watch {self.source.public_url}: {type(exc).__name__}: {exc}"
                )
                return
        self._draw()
        self._timer = self.set_interval(1 / self.refresh_hz, self._draw)
        if self.observer is not None:
            self.query_one(ClusterRunsTable).focus()

    async def on_unmount(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._sub is not None:
            self._sub.close()
        if self.manage:
            await self.source.stop()

    def _draw(self) -> None:
        # a shutdown not begun by exit() (run_test's) leaves the timer ticking while it takes
        # the screens down: nothing is left to draw then, nor a screen to ask which one is open
        if self.is_running:
            self._redraw()

    def _redraw(self) -> None:
        now = self.clock()
        if self._sub is not None:
            batch = self._sub.get_batch(5_000)
            if batch:
                self.query_one(EventLog).add_events(batch)
        nodes = self.source.nodes()
        observer = self.observer
        if observer is not None:
            now = observer.store.clock()  # heartbeats are the database's times
            self._draw_runs(observer, now)
        self.query_one(NodesTable).update_nodes(nodes, now)
        stats = self.source.stats()
        if stats.connected:
            link = "connected"
        elif stats.errors == 0 and stats.received == 0:
            link = "[yellow]connecting…[/]"  # not failed yet: the first connection is under way
        else:
            # why, where known: a wrong password met after the start is retried as an outage is
            why = f": {as_written(stats.last_error)}" if stats.last_error else ""
            link = f"[bold red]DISCONNECTED[/] (retrying{why})"
        missed = f"[bold red]{stats.missed} missed[/]" if stats.missed else "0 missed"
        parts = [f"[b]{as_written(stats.stream)}[/] on {as_written(self.source.public_url)}", link,
                 f"{len(nodes)} nodes", f"{stats.received} events", missed]  # fmt: skip
        if stats.malformed:
            # entries in the stream that are no event (a foreign writer, a corrupted row): counted nowhere else
            parts.append(f"[bold red]{stats.malformed} malformed[/]")
        if observer is not None:
            parts.insert(3, leader_part(observer, nodes))
            if observer.stale:
                # nothing below is current: say how old it is
                parts.insert(4, f"[bold yellow]stale: {read_ago(observer)}[/]")
            if observer.running_unlisted:
                parts.append(f"[bold yellow]{observer.running_unlisted} more running not listed[/]")
            if observer.resyncs:
                parts.append(f"{observer.resyncs} resyncs")
            if observer.last_error:
                parts.append(f"[bold red]store: {as_written(observer.last_error)}[/]")
        log = self.query_one(EventLog)
        if log.paused:
            held = f" ({log.buffered} buffered)" if log.buffered else ""
            parts.append(f"[bold yellow]⏸ log paused[/]{held}")
        header = self.query_one("#cluster-header", Static)
        header.update(join_parts(parts, header.size.width))

    def _draw_runs(self, observer: ClusterObserver, now: float) -> None:
        screen = self.screen
        detail = screen if isinstance(screen, RunScreen) else None
        # the open run is read by id when the list leaves it out (a backlog's run that ended)
        observer.follow(None if detail is None else detail.run_id)
        at, changes = self._runs_drawn
        wall = time.monotonic()
        if wall - at < (RUNS_REDRAW_IDLE if changes == observer.runs_changes else RUNS_REDRAW_CHANGED):
            return
        self._runs_drawn = (wall, observer.runs_changes)
        table = self.query_one(ClusterRunsTable)
        runs = observer.runs()
        current = {run.id for run in runs}
        gone = self._runs_shown - current
        if gone:
            table.remove_runs(gone)
        self._runs_shown = current
        table.update_runs(runs, now)
        if detail is not None:
            # the run read again with the others: its status, a new attempt, a live duration
            fresh = observer.record(detail.run_id)
            if fresh is not None:
                detail.show(fresh, now)

    # ------------------------------------------------------------------ actions

    def action_toggle_pause(self) -> None:
        log = self.query_one(EventLog)
        log.toggle_pause()
        self.notify("log paused: events are still received" if log.paused else "log resumed")
        self._draw()

    def _selected_run(self) -> StoredRun | None:
        if self.observer is None:
            return None
        screen = self.screen
        if isinstance(screen, RunScreen):
            return self.observer.record(screen.run_id) or screen.record  # type: ignore[return-value]
        run_id = self.query_one(ClusterRunsTable).selected_run_id
        return None if run_id is None else self.observer.record(run_id)

    @on(RunsTable.RunSelected)
    def _run_chosen(self, message: RunsTable.RunSelected) -> None:
        self._open_run(message.run_id)

    @work(group="detail", exclusive=True)
    async def _open_run(self, run_id: str) -> None:
        """Enter on a run: its full record, read from the store (the list may be older); while
        the database is out of reach, at once, the record as read last."""
        observer = self.observer
        if observer is None:
            return
        origin = self.screen
        last = observer.record(run_id)
        if observer.stale:
            # waiting for the store would leave the key silent for its whole reconnect_timeout
            if last is None:
                self.notify(f"cannot open run {run_id}: the database is unreachable and it was never read; "
                            "try again once it answers", severity="error")  # fmt: skip
                return
            self.push_screen(RunScreen(last, observer.store.clock()))
            self.notify(f"the database is unreachable: run {run_id} is shown {read_ago(observer)}, "
                        "before the outage", severity="warning", timeout=10)  # fmt: skip
            return
        bound = asyncio.timeout(self.answer_timeout)
        try:
            async with bound:
                record: StoredRun = await observer.get(run_id)
        except RunNotFound:
            self.notify(f"run {run_id} is no longer in the store (pruned by history or retention)", severity="warning")
            return
        except COMMAND_ERRORS as exc:
            last = observer.record(run_id) or last  # the database is out of reach: what was read last
            why = f"no answer from the database within {self.answer_timeout:g} s" if bound.expired() else str(exc)
            if last is None:
                self.notify(f"cannot read run {run_id}: {why}", severity="error")
                return
            record = last
            self.notify(f"cannot read run {run_id} ({why}): it is shown {read_ago(observer)}",
                        severity="warning", timeout=10)  # fmt: skip
        if self.screen is origin:  # not over a screen the user opened meanwhile
            self.push_screen(RunScreen(record, observer.store.clock()))

    async def _confirmed(self, question: str, yes: str) -> bool:
        if not self.confirm:
            return True
        answer: bool = await self.push_screen_wait(ConfirmScreen(question, yes=yes))
        return answer

    def _unreachable(self, verb: str, run_id: str) -> bool:
        """Whether the database is known out of reach: then the command is refused at once
        (the store would retry it for its whole reconnect_timeout, and act late)."""
        if self.observer is None or not self.observer.stale:
            return False
        self.notify(f"cannot {verb} run {run_id}: {UNREACHABLE}", severity="error")
        return True

    async def _send(
        self, verb: str, run_id: str, command: Awaitable[StoredRun], refused: type[Exception], unanswered: str
    ) -> StoredRun | None:
        """``command`` through the store, bounded by ``answer_timeout``; None, the user told
        why, when it was refused or failed (``unanswered``: what may have happened anyway)."""
        bound = asyncio.timeout(self.answer_timeout)
        try:
            async with bound:
                return await command
        except refused as exc:
            self.notify(str(exc), severity="warning")
        except COMMAND_ERRORS as exc:
            if bound.expired():
                # given up on, not undone: the command may have reached the database before
                self.notify(f"{verb} of run {run_id}: no answer from the database within "
                            f"{self.answer_timeout:g} s; {unanswered}", severity="error", timeout=15)  # fmt: skip
            else:
                self.notify(f"{verb} failed: {exc}", severity="error")
        return None

    @work(group="actions")
    async def action_cancel_run(self) -> None:
        run = self._selected_run()
        if self.observer is None or run is None:
            self.notify("select a run to cancel", severity="warning")
            return
        if self._unreachable("cancel", run.id):
            return
        with self._in_flight.sole("cancel", [run.id], f"run {run.id}") as free:
            if free:
                await self._cancel(self.observer, run)

    async def _cancel(self, observer: ClusterObserver, run: StoredRun) -> None:
        where = f" on {run.node}" if run.node else ""
        if not await self._confirmed(f"Cancel run {run.id} ({run.task}, {run.status.value}{where})?", "Cancel run"):
            return
        if self._unreachable("cancel", run.id):  # it went out of reach while the question was open
            return
        record = await self._send("cancel", run.id, observer.cancel(run.id), RunNotCancellable,
                                  "it may still have been carried out: see the run's status once the database answers")  # fmt: skip
        if record is None:
            return
        if record.status is RunStatus.CANCELLED:
            self.notify(f"run {run.id} cancelled")
        else:
            self.notify(f"run {run.id} is running on {record.node}: that node was asked to cancel it")

    @work(group="actions")
    async def action_retry_run(self) -> None:
        run = self._selected_run()
        if self.observer is None or run is None:
            self.notify("select a failed or cancelled run to retry", severity="warning")
            return
        if self._unreachable("retry", run.id):
            return
        with self._in_flight.sole("retry", [run.id], f"run {run.id}") as free:
            if free:
                await self._retry(self.observer, run)

    async def _retry(self, observer: ClusterObserver, run: StoredRun) -> None:
        record = await self._send("retry", run.id, observer.retry(run.id), RunNotRetryable,
                                  "a new run may still have been queued: see the runs once the database answers")  # fmt: skip
        if record is None:
            return
        self.notify(f"retrying {run.task} as run {record.id}")
        screen = self.screen
        if isinstance(screen, RunScreen) and screen.run_id == run.id:
            # the new run is the one shown now, as the engine dashboard's detail follows the
            # retry it selects: r again acts on it, never on the failed run once more
            screen.show(record, observer.store.clock())
        self._runs_drawn = (float("-inf"), -1)  # now: the new run is selected next
        self._draw()
        self.query_one(ClusterRunsTable).select_run(record.id)

    @on(EventLog.EventChosen)
    def _event_chosen(self, message: EventLog.EventChosen) -> None:
        self.push_screen(EventScreen(message.event))
