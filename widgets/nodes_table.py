"""NodesTable: every node of a cluster as its shared event stream shows it."""

from __future__ import annotations

import time
from typing import ClassVar

from taskwatch.engine import ClusterNode

from ._format import DASH, fmt_ago, fmt_bytes
from ._keyed_table import Cell, Column, KeyedTable


def node_cells(info: ClusterNode, now: float) -> tuple[Cell, ...]:
    """The (text, style) of every column for one node."""
    if info.is_leader:
        role: Cell = (f"LEADER t{info.term}", "bold black on green")
    elif info.is_leader is False:
        role = (f"follower t{info.term}" if info.term else "follower", "")
    else:
        role = (DASH, "dim")
    state: Cell = ("stopped", "dim") if info.stopped else ("up", "green")
    return (
        (info.node, "bold"),
        role,
        state,
        (DASH if info.running is None else str(info.running), ""),
        (DASH if info.cpu_percent is None else f"{info.cpu_percent:.0f}%", ""),
        (DASH if info.rss_bytes is None else fmt_bytes(info.rss_bytes), ""),
        (info.last_kind, ""),
        (fmt_ago(info.last_ts, now), "dim"),
        (str(info.events), ""),
        (str(info.missed), "bold red" if info.missed else "dim"),
    )


class NodesTable(KeyedTable):
    """Nodes keyed by id, in name order; ``update_nodes(nodes)`` shows exactly these."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("node", "node"),
        Column("role", "leader", 16),
        Column("state", "state", 8),
        Column("running", "running", 8, "right"),
        Column("cpu", "CPU", 6, "right"),
        Column("rss", "RSS", 10, "right"),
        Column("last", "last event", 22),
        Column("ago", "", 10),
        Column("events", "events", 8, "right"),
        Column("missed", "missed", 7, "right"),
    )

    def update_nodes(self, nodes: list[ClusterNode], now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._begin()
        wanted = {info.node for info in nodes}
        self._remove([key for key in self._cells if key not in wanted])
        for info in nodes:
            self._upsert(info.node, info.node, node_cells(info, now))
        self._finish()
