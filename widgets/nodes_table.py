"""NodesTable: every node of a cluster, as its shared event stream shows it; StoreNodesTable:
as the cluster store's nodes table records it (heartbeats, version), with what its events said.

The node column is as wide as the longest node name, up to ``NAME_WIDTH``
cells: a longer id (a pod's name runs to 60 characters and more) is cut
there, ending in an ellipsis (an event's JSON names it whole). A table too
narrow for every column (an 80-column terminal) leaves out the ones least
needed at a glance (``NARROW_DROPS``: the last event, which the log below
tells anyway; the version), narrows the node column down to
``NODE_MIN_WIDTH`` and then leaves out ``NARROWER_DROPS`` (RSS) too, rather
than hiding the state and the missed counts at its right edge behind a
scrollbar. A stopped node takes no part in elections (no role is shown); the
load of a node that is not up is the last it reported, dimmed. A node the
watcher cannot tell about now (``unknown``: the store out of reach since it
was last seen up) shows as such, in yellow."""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import replace
from typing import ClassVar

from rich.cells import cell_len
from taskwatch.engine import ClusterNode
from textual.events import Resize
from textual.message import Message

from ._format import DASH, clip, fmt_ago, fmt_bytes, printable
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable

#: the narrowest the node column is made on a narrow terminal before a load column gives way
NODE_MIN_WIDTH = 12


_STATE_STYLES = {"up": "green", "dead": "bold red", "stopped": "dim", "unknown": "bold yellow"}
#: how old a node's last heartbeat looks, by its state: alarming once it is dead, a warning
#: while it cannot be told whether the node is still up
_HEARTBEAT_STYLES = {"dead": "bold red", "unknown": "yellow"}


def _state(info: ClusterNode) -> Cell:
    state = info.state
    return (state, _STATE_STYLES.get(state, ""))


def _role(info: ClusterNode) -> Cell:
    if info.is_leader:
        # a dead leader still holds the lease until it lapses: that is worth seeing
        return (f"LEADER t{info.term}", "bold black on green")
    if info.stopped:
        return (DASH, "dim")  # it left: it takes no part in elections
    if info.is_leader is False:
        return (f"follower t{info.term}" if info.term else "follower", "")
    return (DASH, "dim")


def _load(info: ClusterNode) -> tuple[Cell, Cell, Cell]:
    style = "" if info.state == "up" else "dim"  # the last figures it reported
    return (
        (DASH if info.running is None else str(info.running), style),
        (DASH if info.cpu_percent is None else f"{info.cpu_percent:.0f}%", style),
        (DASH if info.rss_bytes is None else fmt_bytes(info.rss_bytes), style),
    )


def node_cells(info: ClusterNode, now: float) -> tuple[Cell, ...]:
    """The (text, style) of every column for one node, as its events show it."""
    return (
        (info.node, "bold"),
        _role(info),
        _state(info),
        *_load(info),
        (info.last_kind, ""),
        (fmt_ago(info.last_ts, now), "dim"),
        (str(info.events), ""),
        (str(info.missed), "bold red" if info.missed else "dim"),
    )


def store_node_cells(info: ClusterNode, now: float) -> tuple[Cell, ...]:
    """The (text, style) of every column for one node, as the nodes table records it."""
    return (
        (info.node, "bold"),
        _role(info),
        _state(info),
        (fmt_ago(info.last_heartbeat, now), _HEARTBEAT_STYLES.get(info.state, "dim")),
        *_load(info),
        (info.version or DASH, ""),
        (str(info.events), ""),
        (str(info.missed), "bold red" if info.missed else "dim"),
    )


class NodesTable(KeyedTable):
    """Nodes keyed by id, in name order; ``update_nodes(nodes)`` shows exactly these."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("node", "node"),
        Column("role", "leader", 12),
        Column("state", "state", 7),
        Column("running", "running", 7, "right"),
        Column("cpu", "CPU", 5, "right"),
        Column("rss", "RSS", 10, "right"),
        Column("last", "last event", 22),
        Column("ago", "", 10),
        Column("events", "events", 7, "right"),
        Column("missed", "missed", 6, "right"),
    )
    #: the columns left out when the table is too narrow for all of them
    NARROW_DROPS: ClassVar[frozenset[str]] = frozenset({"last", "ago"})
    #: left out too when even so the node column would be narrower than NODE_MIN_WIDTH
    NARROWER_DROPS: ClassVar[frozenset[str]] = frozenset({"rss"})

    class NodeHighlighted(Message):
        """The cursor moved to another node (None when the table emptied)."""

        def __init__(self, table: NodesTable, node: str | None) -> None:
            self.table = table
            self.node = node
            super().__init__()

        @property
        def control(self) -> NodesTable:
            return self.table

    class NodeSelected(Message):
        """A node was chosen with Enter or a click."""

        def __init__(self, table: NodesTable, node: str) -> None:
            self.table = table
            self.node = node
            super().__init__()

        @property
        def control(self) -> NodesTable:
            return self.table

    def __init__(self, *, name: str | None = None, id: str | None = None, classes: str | None = None,
                 disabled: bool = False) -> None:  # fmt: skip
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self._shown_nodes: list[ClusterNode] = []
        self._shown_at: float | None = None

    def cells(self, info: ClusterNode, now: float) -> tuple[Cell, ...]:
        return node_cells(info, now)

    def update_nodes(self, nodes: Iterable[ClusterNode], now: float | None = None) -> None:
        now = time.time() if now is None else now
        # read three times (and again at a resize): a generator would be spent by the first
        nodes = self._shown_nodes = list(nodes)
        self._shown_at = now
        self._show_columns(self._columns_for(self.size.width))
        keys = {column.key for column in self.shown_columns}
        shown = [index for index, column in enumerate(self.COLUMNS) if column.key in keys]
        width = self.shown_columns[0].width or NAME_WIDTH
        self._begin()
        wanted = {info.node for info in nodes}
        self._remove([key for key in self._cells if key not in wanted])
        for info in nodes:
            cells = self.cells(info, now)
            (name, style), *rest = (cells[index] for index in shown)
            self._upsert(info.node, info.node, ((clip(printable(name), width), style), *rest))
        self._finish()

    def _columns_for(self, width: int) -> tuple[Column, ...]:
        """The node column as wide as the longest name (up to NAME_WIDTH), then every other
        column if ``width`` holds them all (or is not known yet); else the narrow set, the
        node column taking the room left (down to NODE_MIN_WIDTH, or the narrower set).

        Every column has a fixed width: a column fitted to its content is measured only
        when the table is idle, and a header drawn before that keeps the old width while
        the rows below take the new one.
        """
        first, *rest = self.COLUMNS
        longest = max([cell_len(first.label), *(cell_len(printable(info.node)) for info in self._shown_nodes)])
        names = min(longest, NAME_WIDTH)
        columns = (replace(first, width=names), *rest)
        if not width or self._width_of(columns) <= width:
            return columns
        floor = min(names, NODE_MIN_WIDTH)
        for drops in (self.NARROW_DROPS, self.NARROW_DROPS | self.NARROWER_DROPS):
            kept = tuple(column for column in rest if column.key not in drops)
            room = width - self._width_of(kept) - 2 * self.cell_padding
            if room >= floor:
                break
        return (replace(first, width=max(floor, min(names, room))), *kept)

    def _width_of(self, columns: tuple[Column, ...]) -> int:
        return sum((column.width or 0) + 2 * self.cell_padding for column in columns)

    def on_resize(self, event: Resize) -> None:
        if self._shown_at is not None and self._columns_for(event.size.width) != self.shown_columns:
            self.update_nodes(self._shown_nodes, self._shown_at)

    def _highlight_message(self, key: str | None) -> Message:
        return self.NodeHighlighted(self, key)

    def _selected_message(self, key: str) -> Message:
        return self.NodeSelected(self, key)


class StoreNodesTable(NodesTable):
    """Nodes as a cluster store records them: up, dead, stopped or unknown, the last heartbeat, the
    load each reports with it, the version it runs; events seen and missed beside."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("node", "node"),
        Column("role", "leader", 12),
        Column("state", "state", 7),
        Column("heartbeat", "heartbeat", 10),
        Column("running", "running", 7, "right"),
        Column("cpu", "CPU", 5, "right"),
        Column("rss", "RSS", 10, "right"),
        Column("version", "version", 10),
        Column("events", "events", 7, "right"),
        Column("missed", "missed", 6, "right"),
    )
    NARROW_DROPS: ClassVar[frozenset[str]] = frozenset({"version", "events"})

    def cells(self, info: ClusterNode, now: float) -> tuple[Cell, ...]:
        return store_node_cells(info, now)
