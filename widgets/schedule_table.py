"""ScheduleTable: every periodic task, its state, when it is next due and how it has gone."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from taskwatch.engine import PeriodicInfo
from textual.message import Message

from ._format import DASH, fmt_duration, status_style
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable


def _state(info: PeriodicInfo) -> Cell:
    # paused shows even on a disabled task: pausing it did happen, and stays after it is enabled
    if info.paused:
        return ("paused", "bold yellow")
    if not info.enabled:
        return ("disabled", "dim red")
    if info.running_run_id is not None:
        # a run queued behind others (or for its due time) is not running yet: shown as the runs tab shows it
        status = "pending" if info.running_status == "pending" else "running"
        return (status, status_style(status))
    return ("enabled", "green")


def _note(info: PeriodicInfo) -> Cell:
    if not info.enabled:
        return (f"disabled: {info.reason}" if info.reason else "disabled", "dim red")
    if info.refused:
        # skipped for want of room, not because a run was still going: a queue to make room in
        return (f"{info.refused} of the skipped refused: run queue full", "yellow")
    return ("", "")


def _next_due(info: PeriodicInfo, now: float) -> Cell:
    if not info.enabled or info.paused or info.next_due is None:
        return (DASH, "dim")
    remaining = info.next_due - now
    if remaining <= 0:
        return ("due", "bold")
    return (fmt_duration(remaining), "")


def schedule_cells(info: PeriodicInfo, now: float) -> tuple[Cell, ...]:
    return (
        (info.name, "bold"),
        (info.trigger, ""),
        _state(info),
        _next_due(info, now),
        (info.last_status or DASH, status_style(info.last_status)),
        (fmt_duration(info.last_duration), ""),
        (str(info.runs), ""),
        (str(info.failures), "bold red" if info.failures else "dim"),
        (str(info.skipped), "yellow" if info.skipped else "dim"),
        (str(info.missed), "yellow" if info.missed else "dim"),
        _note(info),
    )


class ScheduleTable(KeyedTable):
    """Periodic tasks keyed by name, sorted by name."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("name", "name", max_width=NAME_WIDTH),
        Column("trigger", "trigger"),
        Column("state", "state"),
        Column("next", "next in", 8, "right"),
        Column("last", "last", 9),
        Column("duration", "took", 7, "right"),
        Column("runs", "runs", 6, "right"),
        Column("failures", "failed", 6, "right"),
        Column("skipped", "skipped", 7, "right"),
        Column("missed", "missed", 6, "right"),
        Column("note", "note"),
    )

    class PeriodicHighlighted(Message):
        """The cursor moved to another periodic task (None when the table emptied)."""

        def __init__(self, table: ScheduleTable, name: str | None) -> None:
            self.table = table
            self.name = name
            super().__init__()

        @property
        def control(self) -> ScheduleTable:
            return self.table

    class PeriodicSelected(Message):
        """A periodic task was chosen with Enter or a click."""

        def __init__(self, table: ScheduleTable, name: str) -> None:
            self.table = table
            self.name = name
            super().__init__()

        @property
        def control(self) -> ScheduleTable:
            return self.table

    @property
    def selected_name(self) -> str | None:
        return self.selected_key

    def select_name(self, name: str) -> bool:
        return self.select_key(name)

    def update_schedule(self, infos: Iterable[PeriodicInfo], now: float) -> None:
        """Show exactly these periodic tasks (the full list, as engine.schedule() returns it)."""
        infos = list(infos)  # read twice: a generator would be spent by the first
        self._begin()
        wanted = {info.name for info in infos}
        self._remove([name for name in self._cells if name not in wanted])
        for info in infos:
            self._upsert(info.name, info.name, schedule_cells(info, now))
        self._finish()

    def _highlight_message(self, key: str | None) -> Message:
        return self.PeriodicHighlighted(self, key)

    def _selected_message(self, key: str) -> Message:
        return self.PeriodicSelected(self, key)
