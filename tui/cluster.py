"""The cluster dashboard: every node's events, read from the shared Redis stream.

``taskwatch attach redis://host:6379/0`` opens it. It reads the stream that
engines made with ``events="redis://..."`` publish to (a
:class:`~taskwatch.engine.RedisEventRelay` with no bus of its own), and shows
a Nodes view (id, leader badge and term, up or stopped, running runs, CPU,
RSS, last event, events seen and missed) above the cluster's event log, each
line naming its node (Enter on a line shows its event's JSON). It only
watches: commands go to a node's own control endpoint (``taskwatch attach ADDRESS``).

Like the engine dashboard it never redraws per event: a timer drains the
relay's bus at a fixed rate. Events the stream trimmed away before they were
read are counted per node and in the header, and marked in the log.
"""

from __future__ import annotations

import time

from taskwatch.engine import RedisEventRelay, Subscription
from taskwatch.widgets import EventLog, NodesTable
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.timer import Timer
from textual.widgets import Footer, Static

from .screens import EventScreen


class ClusterApp(App[None]):
    """Watches a :class:`RedisEventRelay`; started with the app and stopped with it
    unless ``manage=False`` (then the caller runs the relay)."""

    CSS_PATH = "cluster.tcss"
    TITLE = "taskwatch cluster"

    BINDINGS = [
        Binding("p", "toggle_pause", "pause log"),
        Binding("q", "quit", "quit", priority=True),
    ]

    def __init__(self, relay: RedisEventRelay, *, manage: bool = True, refresh_hz: float = 15.0) -> None:
        super().__init__()
        self.relay = relay
        self.manage = manage
        self.refresh_hz = refresh_hz
        self._sub: Subscription | None = None
        self._timer: Timer | None = None

    def compose(self) -> ComposeResult:
        yield Static("", id="cluster-header")
        yield NodesTable(id="nodes")
        yield EventLog(id="cluster-events", show_node=True)
        yield Footer()

    async def on_mount(self) -> None:
        self._sub = self.relay.bus.subscribe()
        if self.manage:
            await self.relay.start()
        self._draw()
        self._timer = self.set_interval(1 / self.refresh_hz, self._draw)

    async def on_unmount(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._sub is not None:
            self._sub.close()
        if self.manage:
            await self.relay.stop()

    def _draw(self) -> None:
        try:
            self._redraw()
        except NoMatches:
            # the timer can fire once more while the app tears its screen down
            if self.is_running and self.screen.is_attached:
                raise

    def _redraw(self) -> None:
        if self._sub is not None:
            batch = self._sub.get_batch(5_000)
            if batch:
                self.query_one(EventLog).add_events(batch)
        self.query_one(NodesTable).update_nodes(self.relay.nodes(), time.time())
        stats = self.relay.stats()
        link = "connected" if stats.connected else "[bold red]DISCONNECTED[/] (retrying)"
        missed = f"[bold red]{stats.missed} missed[/]" if stats.missed else "0 missed"
        self.query_one("#cluster-header", Static).update(
            f"[b]{self.relay.stream}[/] on {self.relay.public_url}  {link}  "
            f"{len(self.relay.nodes())} nodes  {stats.received} events  {missed}"
        )

    def action_toggle_pause(self) -> None:
        self.query_one(EventLog).toggle_pause()

    @on(EventLog.EventChosen)
    def _event_chosen(self, message: EventLog.EventChosen) -> None:
        self.push_screen(EventScreen(message.event))
