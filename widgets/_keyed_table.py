"""KeyedTable: a DataTable whose rows are keyed and updated by diffing.

The dashboard calls the table update methods 10-20 times a second, so the base
class keeps the last (text, style) pair of every shown cell and only touches
the DataTable where something changed: ``update_cell`` for a changed cell,
``add_row`` for a new key, one ``sort`` when rows were added or reordered, and
batched removals (a full rebuild when many rows go at once, since every
``remove_row`` re-indexes all rows and re-lays out the widget).

Row order is carried by the first cell of each row: an ``_OrderedText`` with an
``order`` attribute, so ``DataTable.sort`` can order rows without a visible
sort column.

The cursor stays on its row (by key) as rows come, go or move. A table with
``FOLLOWS_FIRST_ROW`` (a list sorted newest first) keeps it on the first row
instead until the user moves it, as ``VirtualTable`` does: then the row the user
chose is held, and when that row goes no row is selected (``selected_key`` is None,
no cursor drawn) rather than a neighbour, until the user moves the cursor again.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any, ClassVar

from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.coordinate import Coordinate
from textual.widgets import DataTable
from textual.widgets.data_table import CellDoesNotExist

from ._format import clip, printable
from ._keyed_rows import Cell, Column, KeyedRows

__all__ = ["Cell", "Column", "KeyedTable"]


class _OrderedText(Text):
    """A Text that also carries its row's sort position (invisible)."""

    def __init__(self, text: str, order: Any, **kwargs: Any) -> None:
        super().__init__(text, **kwargs)
        self.order = order


class KeyedTable(KeyedRows, DataTable[Text]):
    """Base class of the keyed, diff-updated tables (not meant to be used directly)."""

    COLUMNS: ClassVar[tuple[Column, ...]] = ()
    #: the cursor follows the first row until the user moves it (see the module's doc)
    FOLLOWS_FIRST_ROW: ClassVar[bool] = False

    #: the keys of less, vim and k9s, beside the arrows, Home and End
    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("g", "scroll_top", "First row", show=False),
        Binding("G", "scroll_bottom", "Last row", show=False),
    ]

    def __init__(
        self,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(
            cursor_type="row",
            zebra_stripes=True,
            name=name,
            id=id,
            classes=classes,
            disabled=disabled,
        )
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._orders: dict[str, Any] = {}
        self._first_cells: dict[str, _OrderedText] = {}
        self._reorder = False
        self._rebuild_pending = False
        self._selection_before: str | None = None
        self._last_highlighted: str | None = None
        #: the DataTable has the shown columns (only possible once mounted: see _ensure_columns)
        self._columns_ready = False
        self._mounted = False
        self._select_on_mount: str | None = None
        #: the columns on screen: COLUMNS, or the selection of them a subclass chose to show
        self.shown_columns: tuple[Column, ...] = self.COLUMNS
        #: with FOLLOWS_FIRST_ROW: the cursor is on the first row and stays there as rows arrive
        self._following = self.FOLLOWS_FIRST_ROW
        #: the row the cursor was held on went: no row is selected until the user moves it
        self._cursor_cleared = False

    # ------------------------------------------------------------ public

    @property
    def following(self) -> bool:
        """Whether the cursor follows the first row (only a table with ``FOLLOWS_FIRST_ROW``
        does: at start and after ``g``, until the user moves it)."""
        return self._following

    @property
    def selected_key(self) -> str | None:
        """The key of the row under the cursor, or ``None`` when the table is empty (or, with
        ``FOLLOWS_FIRST_ROW``, when the row the cursor was held on went)."""
        if not self.row_count or not self.columns or self._cursor_cleared:
            return None
        try:
            cell_key = self.coordinate_to_cell_key(Coordinate(self.cursor_row, 0))
        except CellDoesNotExist:
            return None
        return cell_key.row_key.value

    @property
    def shown_keys(self) -> list[str]:
        """Row keys in display order."""
        return [row.key.value for row in self.ordered_rows if row.key.value is not None]

    def select_key(self, key: str) -> bool:
        """Move the cursor to the row ``key`` (and hold it there); False when that row is not shown."""
        if key not in self._cells:
            return False
        self._hold()
        if not self._columns_ready:
            self._select_on_mount = key  # the rows are drawn on mount; the cursor goes there then
            return True
        if self._rebuild_pending:
            self._apply_rebuild()
        self.move_cursor(row=self.get_row_index(key))
        self._sync_highlight()
        return True

    # ------------------------------------------------------------ for subclasses

    def _begin(self) -> None:
        """Start a batch of changes: remember the selection so it survives reordering."""
        self._selection_before = self.selected_key

    def _upsert(self, key: str, order: Any, cells: tuple[Cell, ...]) -> bool:
        """Show ``cells`` in row ``key``, placed by ``order`` (ascending; orders of one
        table must compare with each other); returns True when the row is new."""
        if not self._ensure_columns():
            # not mounted yet: the rows are kept and drawn on mount
            self._rebuild_pending = True
        previous = self._cells.get(key)
        if previous is None:
            self._cells[key] = cells
            self._orders[key] = order
            if not self._rebuild_pending:
                self._add(key)
                self._reorder = True
            return True
        if self._orders[key] != order:
            self._orders[key] = order
            first = self._first_cells.get(key)
            if first is not None:
                first.order = order
            self._reorder = True
        if previous == cells:
            return False
        self._cells[key] = cells
        if self._rebuild_pending:
            return False
        for index, (column, new, old) in enumerate(zip(self.shown_columns, cells, previous)):
            if new == old:
                continue
            value = self._make_text(key, column, new, index)
            self.update_cell(key, column.key, value, update_width=column.width is None)
        return False

    def _remove(self, keys: Collection[str]) -> None:
        """Remove rows; many at once become one rebuild instead of N re-indexings."""
        gone = [key for key in keys if key in self._cells]
        if not gone:
            return
        for key in gone:
            del self._cells[key]
            del self._orders[key]
            self._first_cells.pop(key, None)
        if self._rebuild_pending:
            return
        # each remove_row re-indexes every row (about 2 ms for 500 rows) where a
        # rebuild costs one measurement per cell: past a few rows, rebuild
        if len(gone) > 8:
            self._rebuild_pending = True
            return
        for key in gone:
            self.remove_row(key)

    def _clear_rows(self) -> None:
        self._cells.clear()
        self._orders.clear()
        self._first_cells.clear()
        self._reorder = False
        self._rebuild_pending = False
        if self._columns_ready:
            self.clear()

    def _show_columns(self, columns: tuple[Column, ...]) -> None:
        """Show ``columns`` from now on: columns with the keys of some of COLUMNS, the
        first one included, in order (a subclass may fix a width COLUMNS leaves open).

        The rows go with the old columns: the next update gives every row's cells
        again, one per shown column.
        """
        if columns == self.shown_columns:
            return
        self._clear_rows()
        if self._columns_ready:
            self.clear(columns=True)
        self.shown_columns = columns
        self._columns_ready = False

    def _finish(self) -> None:
        """End a batch: apply one rebuild or sort, keep the cursor on its row, post messages."""
        if not self._ensure_columns():
            self._selection_before = None
            return  # not mounted yet: on_mount draws the rows
        if self._rebuild_pending:
            self._apply_rebuild()
        elif self._reorder:
            self._reorder = False
            if self.row_count > 1:
                self.sort(self.shown_columns[0].key, key=_order_of)
        selected = self._selection_before
        self._selection_before = None
        if self._following:
            # nobody moved the cursor: it shows what arrives on the first row
            if self.row_count and self.cursor_row != 0:
                self.move_cursor(row=0)
        elif selected is not None and selected in self._cells:
            index = self.get_row_index(selected)
            if index != self.cursor_row:
                self.move_cursor(row=index)
        elif selected is not None and self.FOLLOWS_FIRST_ROW:
            # the row the user chose went: a neighbour under the cursor would be acted on
            # by a key meant for the row chosen
            self._clear_cursor()
        self._sync_highlight()

    # ------------------------------------------------------------ following the first row

    def _hold(self) -> None:
        """The user (or ``select_key``) put the cursor somewhere: it stays on that row."""
        self._following = False
        if self._cursor_cleared:
            self._cursor_cleared = False
            self.show_cursor = True

    def _clear_cursor(self) -> None:
        self._following = False
        self._cursor_cleared = True
        self.show_cursor = False

    def _moved_by_user(self) -> bool:
        """Before a key moves the cursor: hold it from now on. True when the key may move it;
        False when there was no cursor (its row went), which the key brings back where it was."""
        cleared = self._cursor_cleared
        self._hold()
        if cleared:
            self._sync_highlight()
        return not cleared

    def action_cursor_up(self) -> None:
        if self._moved_by_user():
            super().action_cursor_up()

    def action_cursor_down(self) -> None:
        if self._moved_by_user():
            super().action_cursor_down()

    def action_page_up(self) -> None:
        if self._moved_by_user():
            super().action_page_up()

    def action_page_down(self) -> None:
        if self._moved_by_user():
            super().action_page_down()

    def action_scroll_bottom(self) -> None:
        if self._moved_by_user():
            super().action_scroll_bottom()

    def action_scroll_top(self) -> None:
        self._hold()
        super().action_scroll_top()
        # g: the newest again, and the rows arriving after it
        self._following = self.FOLLOWS_FIRST_ROW
        self._sync_highlight()

    def action_select_cursor(self) -> None:
        # the row opened is the one chosen: held, so that a key then acts on it and not on
        # a newer row that arrived meanwhile
        if not self._cursor_cleared:
            self._following = False
        super().action_select_cursor()

    def on_click(self, event: events.Click) -> None:
        # before DataTable's own handler (Textual calls each class's, subclass first), which
        # moves no cursor that is hidden; a click on the header moves none
        if event.style.meta.get("row", -1) >= 0:
            self._hold()

    # ------------------------------------------------------------ internals

    def _ensure_columns(self) -> bool:
        """Add the shown columns if they are not there yet; False while that cannot be done."""
        # Columns are added lazily: add_column measures labels with the app's console,
        # which a widget can only reach once it is mounted in a running app.
        if self._columns_ready:
            return True
        if not self._mounted:
            return False
        for column in self.shown_columns:
            self.add_column(column.label, key=column.key, width=column.width)
        self._columns_ready = True
        return True

    def on_mount(self) -> None:
        self._mounted = True
        self._ensure_columns()
        if self._rebuild_pending:
            # rows given before mount: drawn now, as one batch
            self._apply_rebuild()
            wanted, self._select_on_mount = self._select_on_mount, None
            if wanted is not None and wanted in self._cells:
                self.move_cursor(row=self.get_row_index(wanted))
            self._sync_highlight()

    def _make_text(self, key: str, column: Column, cell: Cell, index: int) -> Text:
        text, style = cell
        # every cell may hold text from tasks, events or other nodes: escaped here, once for all tables
        text = printable(text)
        if column.max_width is not None:
            text = clip(text, column.max_width)
        if index == 0:
            ordered = _OrderedText(
                text, self._orders[key], style=style, justify=column.justify, no_wrap=True, overflow="ellipsis", end=""
            )
            self._first_cells[key] = ordered
            return ordered
        return Text(text, style=style, justify=column.justify, no_wrap=True, overflow="ellipsis", end="")

    def _add(self, key: str) -> None:
        cells = self._cells[key]
        values = [
            self._make_text(key, column, cell, index) for index, (column, cell) in enumerate(zip(self.shown_columns, cells))
        ]
        self.add_row(*values, key=key)

    def _apply_rebuild(self) -> None:
        self._rebuild_pending = False
        self._reorder = False
        self._first_cells.clear()
        self.clear()
        for key in sorted(self._cells, key=self._orders.__getitem__):
            self._add(key)

    def _sync_highlight(self) -> None:
        current = self.selected_key
        if current != self._last_highlighted:
            self._last_highlighted = current
            message = self._highlight_message(current)
            if message is not None:
                self.post_message(message)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        # Re-posted as the subclass's own message, and only when the row really changed:
        # reordering moves the cursor with its row, which DataTable reports again.
        event.stop()
        self._sync_highlight()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        event.stop()
        key = event.row_key.value
        if key is not None and key in self._cells:
            message = self._selected_message(key)
            if message is not None:
                self.post_message(message)


def _order_of(cell: Any) -> Any:
    return cell.order
