"""The row protocol the keyed tables share: rows by key, each placed by an order.

``KeyedTable`` (on Textual's DataTable) and ``VirtualTable`` (drawing only the
rows in view) keep their rows differently but are fed the same way: a batch
of changes opens with ``_begin``, rows come and change with ``_upsert`` and go
with ``_remove``, and ``_finish`` puts the batch on screen. ``set_rows`` is
that batch for a whole new set of rows; subclasses say which messages to post
when a row is highlighted or chosen.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rich.console import JustifyMethod
from textual.message import Message

#: What a table shows in one cell: the text and a Rich style ("" for none).
Cell = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Column:
    key: str
    label: str
    #: fixed width in cells; ``None`` fits the content (only for cells that rarely change:
    #: re-measuring an auto-width column can scan the whole column)
    width: int | None = None
    justify: JustifyMethod = "left"
    #: for a column that fits its content: the most cells it takes; longer text ends in an
    #: ellipsis (one long name must not push every other column off screen)
    max_width: int | None = None


#: the widest a name column (task, queue, periodic task) grows: the full name is in the detail
NAME_WIDTH = 24


class KeyedRows:
    """Mixed into a table widget that implements the batch methods."""

    _cells: dict[str, tuple[Cell, ...]]

    if TYPE_CHECKING:

        def _begin(self) -> None: ...

        def _upsert(self, key: str, order: Any, cells: tuple[Cell, ...]) -> bool: ...

        def _remove(self, keys: Collection[str]) -> None: ...

        def _finish(self) -> None: ...

    def set_rows(self, rows: Iterable[tuple[str, Any, tuple[Cell, ...]]]) -> None:
        """Show exactly these rows: ``(key, order, cells)`` each; rows of other keys go.

        Orders sort ascending and must compare with each other; the cursor stays on
        its row (by key) when rows come, go or move.
        """
        self._begin()
        wanted: dict[str, tuple[Any, tuple[Cell, ...]]] = {key: (order, cells) for key, order, cells in rows}
        self._remove([key for key in self._row_keys() if key not in wanted])
        for key, (order, cells) in wanted.items():
            self._upsert(key, order, cells)
        self._finish()

    def _row_keys(self) -> Collection[str]:
        """The keys of every row shown."""
        return self._cells.keys()

    def _highlight_message(self, key: str | None) -> Message | None:
        """The message to post when the highlighted row changes (override)."""
        return None

    def _selected_message(self, key: str) -> Message | None:
        """The message to post when a row is chosen with Enter or a click (override)."""
        return None
