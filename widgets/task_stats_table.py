"""TaskStatsTable: per task, runs submitted, succeeded and failed, the failure rate, p50/p95
durations, the last failure and the failures grouped by exception type."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field
from textual.message import Message

from ._format import DASH, fmt_clock, fmt_duration
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable


class TaskStats(BaseModel):
    """One task's figures, as the dashboard counted them."""

    model_config = ConfigDict(frozen=True)

    task: str
    submitted: int = 0
    succeeded: int = 0
    failed: int = 0
    cancelled: int = 0
    retried: int = 0
    #: failed / (succeeded + failed); None before any run finished
    failure_rate: float | None = None
    p50: float | None = None
    p95: float | None = None
    last_failure_at: float | None = None
    last_failure: str = ""
    #: failures by exception type, most frequent first
    errors: dict[str, int] = Field(default_factory=dict)


def _count(value: int, style: str) -> Cell:
    return (f"{value:,}", style if value else "dim")


def _errors(errors: dict[str, int], limit: int = 60) -> str:
    text = "  ".join(f"{kind} ×{count:,}" for kind, count in errors.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def stats_cells(stats: TaskStats) -> tuple[Cell, ...]:
    rate = stats.failure_rate
    if rate is None:
        rate_cell: Cell = (DASH, "dim")
    else:
        rate_cell = (f"{rate * 100:.1f}%", "bold red" if rate >= 0.1 else ("red" if rate > 0 else "green"))
    return (
        (stats.task, "bold"),
        _count(stats.submitted, ""),
        _count(stats.succeeded, "green"),
        _count(stats.failed, "bold red"),
        rate_cell,
        (fmt_duration(stats.p50), ""),
        (fmt_duration(stats.p95), ""),
        _count(stats.retried, "yellow"),
        (fmt_clock(stats.last_failure_at), "red" if stats.last_failure_at else "dim"),
        (_errors(stats.errors) or DASH, "red" if stats.errors else "dim"),
    )


class TaskStatsTable(KeyedTable):
    """One row per task, sorted by name."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("task", "task", max_width=NAME_WIDTH),
        Column("submitted", "submitted", 9, "right"),
        Column("succeeded", "succeeded", 9, "right"),
        Column("failed", "failed", 7, "right"),
        Column("rate", "fail %", 6, "right"),
        Column("p50", "p50", 7, "right"),
        Column("p95", "p95", 7, "right"),
        Column("retried", "retries", 7, "right"),
        Column("last", "last fail", 9),
        Column("errors", "failures by type"),
    )

    class TaskHighlighted(Message):
        """The cursor moved to another task (None when the table emptied)."""

        def __init__(self, table: TaskStatsTable, task: str | None) -> None:
            self.table = table
            self.task = task
            super().__init__()

        @property
        def control(self) -> TaskStatsTable:
            return self.table

    class TaskSelected(Message):
        """A task was chosen with Enter or a click."""

        def __init__(self, table: TaskStatsTable, task: str) -> None:
            self.table = table
            self.task = task
            super().__init__()

        @property
        def control(self) -> TaskStatsTable:
            return self.table

    @property
    def selected_task(self) -> str | None:
        return self.selected_key

    def update_stats(self, rows: Iterable[TaskStats]) -> None:
        """Show exactly these tasks."""
        self.set_rows((row.task, row.task, stats_cells(row)) for row in rows)

    def update_tasks(self, rows: Iterable[TaskStats]) -> None:
        """Show these tasks' figures, as new rows or in place of their old ones; the other
        rows stay as they are (with thousands of tasks, only the few whose figures moved
        are given, and only their cells that changed are touched)."""
        self._begin()
        for row in rows:
            self._upsert(row.task, row.task, stats_cells(row))
        self._finish()

    def _highlight_message(self, key: str | None) -> Message:
        return self.TaskHighlighted(self, key)

    def _selected_message(self, key: str) -> Message:
        return self.TaskSelected(self, key)
