"""TriggersTable: one row per (trigger, key) counter, with how close it is to firing."""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

from taskwatch.engine import TriggerKeyState, TriggerState
from textual.message import Message

from ._format import DASH, fmt_ago
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable

_SEP = "\x1f"  # joins trigger and key into one row key; never typed by anyone
#: how the key "" reads: a blank cell would pass for a row that has no key
_EMPTY_KEY: Cell = ('""', "dim")


def _row_key(trigger: str, key: str | None) -> str:
    # a row standing for the whole trigger (no keys, or "+N quieter keys") has no separator,
    # so the key "" gets a row of its own
    return trigger if key is None else f"{trigger}{_SEP}{key}"


class TriggersTable(KeyedTable):
    """Trigger keys sorted by trigger then key; a trigger with no keys gets one placeholder row."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("trigger", "trigger", max_width=NAME_WIDTH),
        Column("key", "key"),
        Column("count", "count", 7, "right"),
        Column("threshold", "threshold", 14, "right"),
        Column("last_run", "last run", 12, "right"),
        Column("state", "state", 8),
    )

    class TriggerKeyHighlighted(Message):
        """The cursor moved to another row: ``trigger`` and ``key`` as in
        :attr:`TriggersTable.selected_trigger_key` (both None when the table emptied)."""

        def __init__(self, table: TriggersTable, trigger: str | None, key: str | None) -> None:
            self.table = table
            self.trigger = trigger
            #: None on a row that stands for the whole trigger (no keys, or the quieter keys)
            self.key = key
            super().__init__()

        @property
        def control(self) -> TriggersTable:
            return self.table

    class TriggerKeySelected(Message):
        """A row was chosen with Enter or a click (``key`` None: the trigger's own row)."""

        def __init__(self, table: TriggersTable, trigger: str, key: str | None) -> None:
            self.table = table
            self.trigger = trigger
            self.key = key
            super().__init__()

        @property
        def control(self) -> TriggersTable:
            return self.table

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
        """(trigger name, key) of the highlighted row; key is None on a row that stands for
        the whole trigger (its no-keys row, or its quieter keys)."""
        row = self.selected_key
        return None if row is None else _split(row)

    def select_trigger_key(self, trigger: str, key: str | None = None) -> bool:
        """Move the cursor to ``key`` of ``trigger`` (None: its no-keys row); False when not shown."""
        return self.select_key(_row_key(trigger, key))

    def update_triggers(self, states: Iterable[TriggerState], now: float) -> None:
        """Show exactly these triggers' keys (the hottest ``max_rows`` when there are more)."""
        rows: list[tuple[str, tuple[str, str], tuple[Cell, ...], tuple[bool, int]]] = []
        for state in states:
            threshold = str(state.size_threshold)
            if state.staleness is not None:
                threshold += f" or {state.staleness:g}s"
            if not state.keys:
                rows.append(
                    (
                        _row_key(state.name, None),
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
                        _row_key(state.name, None),
                        (state.name, "\uffff"),
                        _more(state, hidden, threshold),
                        (True, -1),
                    )
                )
            for key_state in state.keys:
                rows.append(
                    (
                        _row_key(state.name, key_state.key),
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

    def _highlight_message(self, key: str | None) -> Message:
        trigger, key_name = (None, None) if key is None else _split(key)
        return self.TriggerKeyHighlighted(self, trigger, key_name)

    def _selected_message(self, key: str) -> Message:
        trigger, key_name = _split(key)
        return self.TriggerKeySelected(self, trigger, key_name)


def _split(row_key: str) -> tuple[str, str | None]:
    trigger, sep, key = row_key.partition(_SEP)
    return trigger, (key if sep else None)


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
        (key.key, "") if key.key else _EMPTY_KEY,
        (str(key.count), "bold" if near else ""),
        (threshold, "dim"),
        (fmt_ago(key.last_run_at, now), "" if key.last_run_at is not None else "dim"),
        run_state,
    )
