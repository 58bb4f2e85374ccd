"""WorkersTable: each supervised worker, its state, how long it has run and how it has crashed."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from taskwatch.engine import WorkerInfo
from textual.message import Message

from ._format import DASH, compact, fmt_duration
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable

#: what each state reads as, and its colour
_STATES: dict[str, Cell] = {
    "running": ("running", "green"),
    "backoff": ("backoff", "bold yellow"),
    "waiting_for_leadership": ("waits for lead", "dim"),
    "returned": ("returned", "cyan"),
    "stopped": ("stopped", "dim"),
}


def _state(info: WorkerInfo) -> Cell:
    if info.stopped_by_user:
        # its code runs until it has ended: a cleanup may outlast the stop's wait for it
        return ("stopping (user)" if info.state == "running" else "stopped by user", "bold yellow")
    return _STATES.get(info.state, (info.state, ""))


def _up(info: WorkerInfo, now: float) -> Cell:
    if info.state != "running" or info.started_at is None:
        return (DASH, "dim")
    return (fmt_duration(max(0.0, now - info.started_at)), "")


def _next_start(info: WorkerInfo, now: float) -> Cell:
    if info.next_restart_at is None:
        return (DASH, "dim")
    return (fmt_duration(max(0.0, info.next_restart_at - now)), "yellow")


def worker_cells(info: WorkerInfo, now: float) -> tuple[Cell, ...]:
    error = info.last_error
    return (
        (info.name, "bold"),
        _state(info),
        ("leader", "cyan") if info.leader_only else ("all", "dim"),
        (str(info.restarts), "" if info.restarts else "dim"),
        (str(info.crashes), "bold red" if info.crashes else "dim"),
        _up(info, now),
        _next_start(info, now),
        (compact(f"{error.type}: {error.message}", 60), "red") if error is not None else ("", ""),
    )


class WorkersTable(KeyedTable):
    """Supervised workers keyed by name, in the order they were registered."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("name", "worker", max_width=NAME_WIDTH),
        Column("state", "state", 15),
        Column("runs_on", "runs on", 7),
        Column("restarts", "restarts", 8, "right"),
        Column("crashes", "crashes", 7, "right"),
        Column("up", "up", 7, "right"),
        Column("next", "restart in", 10, "right"),
        Column("error", "last error"),
    )

    class WorkerHighlighted(Message):
        """The cursor moved to another worker (None when the table emptied)."""

        def __init__(self, table: WorkersTable, name: str | None) -> None:
            self.table = table
            self.name = name
            super().__init__()

        @property
        def control(self) -> WorkersTable:
            return self.table

    class WorkerSelected(Message):
        """A worker was chosen with Enter or a click."""

        def __init__(self, table: WorkersTable, name: str) -> None:
            self.table = table
            self.name = name
            super().__init__()

        @property
        def control(self) -> WorkersTable:
            return self.table

    @property
    def selected_name(self) -> str | None:
        return self.selected_key

    def select_name(self, name: str) -> bool:
        return self.select_key(name)

    def update_workers(self, infos: Iterable[WorkerInfo], now: float) -> None:
        """Show exactly these workers (the full list, as ``engine.workers()`` returns it)."""
        self.set_rows((info.name, index, worker_cells(info, now)) for index, info in enumerate(infos))

    def _highlight_message(self, key: str | None) -> Message:
        return self.WorkerHighlighted(self, key)

    def _selected_message(self, key: str) -> Message:
        return self.WorkerSelected(self, key)
