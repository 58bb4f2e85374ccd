"""NodesTable: every node of a cluster, as its shared event stream shows it; StoreNodesTable:
as the cluster store's nodes table records it (heartbeats, version), with what its events said."""

from __future__ import annotations

import time
from typing import ClassVar

from taskwatch.engine import ClusterNode

from ._format import DASH, fmt_ago, fmt_bytes
from ._keyed_table import Cell, Column, KeyedTable

_STATE_STYLES = {"up": "green", "dead": "bold red", "stopped": "dim"}


def _role(info: ClusterNode) -> Cell:
    if info.is_leader:
        return (f"LEADER t{info.term}", "bold black on green")
    if info.is_leader is False:
        return (f"follower t{info.term}" if info.term else "follower", "")
    return (DASH, "dim")


def _load(info: ClusterNode) -> tuple[Cell, Cell, Cell]:
    return (
        (DASH if info.running is None else str(info.running), ""),
        (DASH if info.cpu_percent is None else f"{info.cpu_percent:.0f}%", ""),
        (DASH if info.rss_bytes is None else fmt_bytes(info.rss_bytes), ""),
    )


def node_cells(info: ClusterNode, now: float) -> tuple[Cell, ...]:
    """The (text, style) of every column for one node, as its events show it."""
    return (
        (info.node, "bold"),
        _role(info),
        (info.state, _STATE_STYLES[info.state]),
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
        (info.state, _STATE_STYLES[info.state]),
        (fmt_ago(info.last_heartbeat, now), "bold red" if info.dead else "dim"),
        *_load(info),
        (info.version or DASH, ""),
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

    def cells(self, info: ClusterNode, now: float) -> tuple[Cell, ...]:
        return node_cells(info, now)

    def update_nodes(self, nodes: list[ClusterNode], now: float | None = None) -> None:
        now = time.time() if now is None else now
        self._begin()
        wanted = {info.node for info in nodes}
        self._remove([key for key in self._cells if key not in wanted])
        for info in nodes:
            self._upsert(info.node, info.node, self.cells(info, now))
        self._finish()


class StoreNodesTable(NodesTable):
    """Nodes as a cluster store records them: up, dead or stopped, the last heartbeat, the
    load each reports with it, the version it runs; events seen and missed beside."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("node", "node"),
        Column("role", "leader", 16),
        Column("state", "state", 8),
        Column("heartbeat", "heartbeat", 12),
        Column("running", "running", 8, "right"),
        Column("cpu", "CPU", 6, "right"),
        Column("rss", "RSS", 10, "right"),
        Column("version", "version", 10),
        Column("events", "events", 8, "right"),
        Column("missed", "missed", 7, "right"),
    )

    def cells(self, info: ClusterNode, now: float) -> tuple[Cell, ...]:
        return store_node_cells(info, now)
