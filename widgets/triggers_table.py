"""TriggersTable: one row per (trigger, key) counter, with how close it is to firing."""

from __future__ import annotations

from typing import ClassVar

from taskwatch.engine import TriggerKeyState, TriggerState

from ._format import DASH, fmt_ago
from ._keyed_table import Cell, Column, KeyedTable

_SEP = "\x1f"  # joins trigger and key into one row key; never typed by anyone


class TriggersTable(KeyedTable):
    """Trigger keys sorted by trigger then key; a trigger with no keys gets one placeholder row."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("trigger", "trigger"),
        Column("key", "key"),
        Column("count", "count", 7, "right"),
        Column("threshold", "threshold", 14, "right"),
        Column("last_run", "last run", 12, "right"),
        Column("state", "state", 8),
    )

    def __init__(
        self,
        *,
        max_rows: int = 500,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self.max_rows = max_rows

    @property
    def selected_trigger_key(self) -> tuple[str, str | None] | None:
        """(trigger name, key) of the highlighted row; key is None on a placeholder row."""
        row = self.selected_key
        if row is None:
            return None
        trigger, _, key = row.partition(_SEP)
        return trigger, (key or None)

    def select_trigger_key(self, trigger: str, key: str | None = None) -> bool:
        """Move the cursor to ``key`` of ``trigger`` (None: its no-keys row); False when not shown."""
        return self.select_key(f"{trigger}{_SEP}{key or ''}")

    def update_triggers(self, states: list[TriggerState], now: float) -> None:
        """Show exactly these triggers' keys (the hottest ``max_rows`` when there are more)."""
        rows: list[tuple[str, tuple[str, str], tuple[Cell, ...], tuple[bool, int]]] = []
        for state in states:
            threshold = str(state.size_threshold)
            if state.staleness is not None:
                threshold += f" or {state.staleness:g}s"
            if not state.keys:
                rows.append(
                    (
                        f"{state.name}{_SEP}",
                        (state.name, ""),
                        _placeholder(state, threshold),
                        (False, -1),
                    )
                )
            hidden = state.key_count - len(state.keys)
            if hidden > 0 and state.keys:
                # the engine sent only its hottest keys; say how many more it holds.
                # The row stands for the trigger (no key), as the no-keys row does
                rows.append(
                    (
                        f"{state.name}{_SEP}",
                        (state.name, "\uffff"),
                        _more(state, hidden, threshold),
                        (True, -1),
                    )
                )
            for key_state in state.keys:
                rows.append(
                    (
                        f"{state.name}{_SEP}{key_state.key}",
                        (state.name, key_state.key),
                        _key_cells(state, key_state, threshold, now),
                        (key_state.queued or key_state.running, key_state.count),
                    )
                )
        if len(rows) > self.max_rows:
            # keep what is about to fire: queued/running keys and the biggest counts
            rows.sort(key=lambda row: row[3], reverse=True)
            del rows[self.max_rows :]
        self._begin()
        wanted = {row[0] for row in rows}
        self._remove([key for key in self._cells if key not in wanted])
        for row_key, order, cells, _ in rows:
            self._upsert(row_key, order, cells)
        self._finish()


def _placeholder(state: TriggerState, threshold: str) -> tuple[Cell, ...]:
    return (
        (state.name, "bold"),
        ("(no keys)", "dim"),
        ("0", "dim"),
        (threshold, ""),
        (DASH, "dim"),
        (f"fired {state.fired}" if state.fired else "", "dim"),
    )


def _more(state: TriggerState, hidden: int, threshold: str) -> tuple[Cell, ...]:
    return (
        (state.name, "bold"),
        (f"(+{hidden:,} quieter keys)", "dim"),
        ("", ""),
        (threshold, "dim"),
        ("", ""),
        (f"fired {state.fired}" if state.fired else "", "dim"),
    )


def _key_cells(state: TriggerState, key: TriggerKeyState, threshold: str, now: float) -> tuple[Cell, ...]:
    if key.running:
        run_state: Cell = ("running", "bold yellow")
    elif key.queued:
        run_state = ("queued", "blue")
    else:
        run_state = ("", "")
    near = key.count >= state.size_threshold
    return (
        (state.name, "bold"),
        (key.key, ""),
        (str(key.count), "bold" if near else ""),
        (threshold, "dim"),
        (fmt_ago(key.last_run_at, now), "" if key.last_run_at is not None else "dim"),
        run_state,
    )
