"""VirtualTable: a keyed table that draws only the rows in view.

Textual's DataTable measures every cell it is given, re-indexes its rows on
every sort, insertion or removal and renders rows again after any change; with
hundreds of rows arriving every frame that takes most of the frame. This table
keeps its rows in one list sorted by ``(order, key)``: an update costs a
comparison per changed row and a binary search per moved one, and a frame
costs the rows in view, however many rows the table holds. Columns have fixed
widths, so nothing is measured; a cell is rendered once per text, stripe,
cursor and hover state, and reused by every row that shows the same and while
rows scroll or move.

It looks like DataTable (the same component classes and styles) and has the
keys and the update protocol of the DataTable-based ``KeyedTable``:
subclasses call ``_begin``, ``_upsert``/``_remove``, ``_finish``, and say which
messages to post through ``_highlight_message``/``_selected_message``.

The cursor follows the first row (the newest, in a table sorted newest first)
until the user moves it, like a log that follows its newest line:
an untouched table shows what arrives, and a row the user chose (with any
other key, a click, or ``select_key``) stays under the cursor however many
rows arrive above it, also the first row. ``g`` (ctrl+home) follows again.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Collection
from pathlib import Path
from typing import Any, ClassVar

from rich.padding import Padding
from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.binding import Binding
from textual.cache import LRUCache
from textual.geometry import Region, Size
from textual.renderables.styled import Styled
from textual.scroll_view import ScrollView
from textual.strip import Strip

from ._format import printable
from ._keyed_rows import Cell, Column, KeyedRows

#: the index of the header line among the rows (as in DataTable)
HEADER_ROW = -1
#: horizontal padding on each side of every cell (DataTable's default)
CELL_PADDING = 1
#: rendered cells kept for reuse; a screenful is a few hundred, most of them alike
CELLS_CACHED = 4096

_Segments = list[Segment]

#: metadata of the blank past the last column (apart from the cells, as in DataTable)
_PAST_COLUMNS = Style.from_meta({"column": 0, "out_of_bounds": True})


class VirtualTable(KeyedRows, ScrollView, can_focus=True):
    """Base class of the keyed tables that draw only the rows in view (not meant to be used directly).

    Every column of ``COLUMNS`` must have a fixed width.
    """

    COLUMNS: ClassVar[tuple[Column, ...]] = ()

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    COMPONENT_CLASSES: ClassVar[set[str]] = {
        "datatable--cursor",
        "datatable--hover",
        "datatable--fixed",
        "datatable--fixed-cursor",
        "datatable--header",
        "datatable--header-cursor",
        "datatable--header-hover",
        "datatable--odd-row",
        "datatable--even-row",
    }

    ALLOW_SELECT = False

    #: DataTable's keys, and those of less, vim and k9s beside them
    BINDINGS = [
        Binding("enter", "select_cursor", "Select", show=False),
        Binding("up", "cursor_up", "Cursor up", show=False),
        Binding("down", "cursor_down", "Cursor down", show=False),
        Binding("pageup", "page_up", "Page up", show=False),
        Binding("pagedown", "page_down", "Page down", show=False),
        Binding("ctrl+home", "scroll_top", "Top", show=False),
        Binding("ctrl+end", "scroll_bottom", "Bottom", show=False),
        Binding("home", "scroll_home", "Home", show=False),
        Binding("end", "scroll_end", "End", show=False),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("g", "scroll_top", "First row", show=False),
        Binding("G", "scroll_bottom", "Last row", show=False),
    ]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        loose = [column.key for column in cls.COLUMNS if column.width is None]
        if loose:
            raise TypeError(f"{cls.__name__}: every column of a VirtualTable needs a width; {loose} have none")

    def __init__(
        self,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self._cells: dict[str, tuple[Cell, ...]] = {}
        self._orders: dict[str, Any] = {}
        #: ``(order, key)`` of every row, ascending: the display order
        self._rows: list[tuple[Any, str]] = []
        #: the key the cursor is on (it follows its row), and its index when last placed
        self._cursor_key: str | None = None
        self._cursor_index = 0
        #: the cursor stays on the first row and the view at the top as rows arrive: on at
        #: start and after ``g``, off once the cursor is put anywhere else (even on row 0)
        self._following = True
        self._hover_index: int | None = None
        self._show_hover = False
        self._rebuild_pending = False
        #: the rows changed in number and the new size is not laid out yet
        self._resizing = False
        self._scroll_after_resize = False
        self._selection_before: str | None = None
        self._last_highlighted: str | None = None
        self._cell_cache: LRUCache[tuple[Any, ...], _Segments] = LRUCache(CELLS_CACHED)
        self._style_cache: dict[tuple[Any, ...], tuple[Style, Style]] = {}
        self._row_styles: dict[tuple[Any, str], Style] = {}
        self._extend_styles: dict[tuple[Any, ...], Style] = {}
        #: (row index, key) drawn on each line of the widget, for the mouse
        self._drawn_lines: dict[int, tuple[int, str | None]] = {}
        self._base_style = Style()
        #: the widget's pseudo classes (focus, hover...) as of the lines being drawn
        self._state: Any = None
        self._header: tuple[Text, ...] = tuple(Text.from_markup(column.label) for column in self.COLUMNS)
        self._column_meta = tuple(Style.from_meta({"column": index}) for index in range(len(self.COLUMNS)))
        self._widths = tuple((column.width or 0) + 2 * CELL_PADDING for column in self.COLUMNS)
        self._table_width = sum(self._widths)
        #: the view when a repaint was last asked for (see ``_visible``)
        self._drawn: tuple[int, list[tuple[str, tuple[Cell, ...]]]] | None = None
        #: cells rendered since the table was made (a cell already rendered is reused while
        #: it scrolls or moves, and by every row that shows the same); for tests and benches
        self.cells_rendered = 0

    def on_mount(self) -> None:
        self._resize_virtual()

    # ------------------------------------------------------------ public

    @property
    def row_count(self) -> int:
        return len(self._rows)

    @property
    def cursor_row(self) -> int:
        """The index (in display order) of the row under the cursor."""
        key = self._cursor_key
        if key is None:
            return 0
        return self._index_of(key)

    @property
    def following(self) -> bool:
        """Whether the cursor follows the first row (True at start and after ``follow_first_row``)."""
        return self._following

    @property
    def selected_key(self) -> str | None:
        """The key of the row under the cursor, or ``None`` when the table is empty."""
        return self._cursor_key

    @property
    def shown_keys(self) -> list[str]:
        """Row keys in display order."""
        self._apply_rebuild()
        return [key for _, key in self._rows]

    def get_cell(self, key: str, column: str) -> Text:
        """The text (with its style) shown in row ``key``, column ``column``; KeyError when missing."""
        cells = self._row_cells(key)
        for index, spec in enumerate(self.COLUMNS):
            if spec.key == column:
                return self._make_text(spec, cells[index])
        raise KeyError(column)

    def get_row(self, key: str) -> list[Text]:
        """The texts of row ``key``, one per column; KeyError when missing."""
        return [self._make_text(spec, cell) for spec, cell in zip(self.COLUMNS, self._row_cells(key))]

    def select_key(self, key: str) -> bool:
        """Move the cursor to the row ``key`` and hold it there (it no longer follows the
        first row, even if ``key`` is the first row now); False when that row is not shown."""
        if key not in self._orders:
            return False
        self._apply_rebuild()
        self._following = False
        self._place_cursor(self._index_of(key))
        self._sync_highlight()
        return True

    def move_cursor(self, *, row: int, scroll: bool = True) -> None:
        """Put the cursor on the row at ``row`` (clamped to the rows there are) and hold it on
        that row as others arrive (it no longer follows the first row)."""
        self._apply_rebuild()
        self._following = False
        self._place_cursor(row, scroll=scroll)
        self._sync_highlight()

    def follow_first_row(self) -> None:
        """Put the cursor on the first row and the view at the top, and keep them there as
        rows arrive (until the cursor is moved again)."""
        self._apply_rebuild()
        self._following = True
        self._place_cursor(0)
        self._sync_highlight()

    def clear_cursor(self) -> None:
        """Take the cursor off every row (``selected_key`` becomes None) until the user moves it.

        For a row the cursor was held on that has to go: moved to a neighbour instead, the
        cursor would silently put another row where a key that acts on "the selected row"
        acts.
        """
        self._following = False
        if self._cursor_key is not None:
            self._cursor_key = None
            self.refresh()
        self._sync_highlight()

    # ------------------------------------------------------------ for subclasses

    def _begin(self) -> None:
        """Start a batch of changes: remember the selection so it survives reordering."""
        self._selection_before = self._cursor_key

    def _upsert(self, key: str, order: Any, cells: tuple[Cell, ...] | None) -> bool:
        """Show ``cells`` in row ``key``, placed by ``order`` (ascending; orders of one
        table must compare with each other); returns True when the row is new. Cells of
        None: the subclass makes the row's cells when it is drawn (see ``_row_cells``)."""
        if cells is not None:
            self._cells[key] = cells
        if key not in self._orders:
            self._orders[key] = order
            if not self._rebuild_pending:
                insort(self._rows, (order, key))
            return True
        previous = self._orders[key]
        if previous != order:
            self._orders[key] = order
            if not self._rebuild_pending:
                del self._rows[bisect_left(self._rows, (previous, key))]
                insort(self._rows, (order, key))
        return False

    def _remove(self, keys: Collection[str]) -> None:
        """Remove rows; many at once become one pass over the rows."""
        gone = [key for key in keys if key in self._orders]
        if not gone:
            return
        if len(gone) > 8:
            self._rebuild_pending = True
        for key in gone:
            self._cells.pop(key, None)
            order = self._orders.pop(key)
            if not self._rebuild_pending:
                del self._rows[bisect_left(self._rows, (order, key))]

    def _clear_rows(self) -> None:
        self._cells.clear()
        self._orders.clear()
        self._rows.clear()
        self._rebuild_pending = False
        self._cursor_key = None
        self._cursor_index = 0
        self._hover_index = None
        self._drawn = None
        self._cell_cache.clear()
        self.scroll_to(0, 0, animate=False, immediate=True)
        self._resize_virtual()
        self.refresh()

    def _finish(self) -> None:
        """End a batch: keep the cursor on its row, repaint if what is in view changed, post messages."""
        self._apply_rebuild()
        self._resize_virtual()
        selected = self._selection_before
        self._selection_before = None
        if self._following:
            # nobody moved the cursor off the first row: show what arrives there
            self._place_cursor(0)
        elif selected is not None and selected in self._orders:
            index = self._index_of(selected)
            if index != self._cursor_index or self._cursor_key != selected:
                self._place_cursor(index)
        elif self._cursor_key is not None:
            # the cursor's row went (filtered out): the cursor keeps its place, as in DataTable
            self._place_cursor(self._cursor_index)
        self._refresh_if_changed()
        self._sync_highlight()

    # ------------------------------------------------------------ rows and cursor

    def _row_cells(self, key: str) -> tuple[Cell, ...]:
        """The cells of row ``key`` (KeyError when missing). A subclass that keeps what its
        rows show passes no cells to ``_upsert`` and makes them here: only the rows drawn
        need them, and a table of 100,000 rows would otherwise hold every row's texts."""
        return self._cells[key]

    def _row_keys(self) -> Collection[str]:
        return self._orders.keys()

    def _index_of(self, key: str) -> int:
        self._apply_rebuild()
        return bisect_left(self._rows, (self._orders[key], key))

    def _apply_rebuild(self) -> None:
        if self._rebuild_pending:
            self._rebuild_pending = False
            # the rows still there keep their sorted order: one pass drops the others, and
            # only the rows added or moved meanwhile are sorted in (a sort of every row cost a
            # table of 100,000 runs 200 ms a frame)
            orders = self._orders
            rows = [row for row in self._rows if orders.get(row[1]) == row[0]]
            if len(rows) != len(orders):
                placed = {key for _, key in rows}
                rows += [(order, key) for key, order in orders.items() if key not in placed]
                rows.sort()  # a sorted run and a short tail: a merge, to Python's sort
            self._rows = rows

    def _place_cursor(self, index: int, scroll: bool = True) -> None:
        """Put the cursor on the row at ``index`` (clamped) and bring it into view."""
        rows = self._rows
        before = self._cursor_key, self._cursor_index
        if not rows:
            self._cursor_key, self._cursor_index = None, 0
        else:
            index = max(0, min(index, len(rows) - 1))
            self._cursor_key, self._cursor_index = rows[index][1], index
            if scroll:
                self._scroll_to_cursor()
                # a table still growing to its full height scrolls again once it has it
                self._scroll_after_resize = self._resizing
        if (self._cursor_key, self._cursor_index) != before:
            self.refresh()

    def _resize_virtual(self) -> None:
        size = Size(self._table_width, 1 + len(self._rows))
        if self.virtual_size != size:
            self.virtual_size = size
            self._resizing = True
            self.call_after_refresh(self._resized)

    def _resized(self) -> None:
        self._resizing = False
        if self._scroll_after_resize:
            self._scroll_after_resize = False
            self._scroll_to_cursor()

    def _rows_in_view(self) -> int:
        return max(0, self.scrollable_content_region.height - 1)

    def _scroll_to_cursor(self) -> None:
        if self._cursor_key is None or self._cursor_key not in self._orders:
            return
        index = self._index_of(self._cursor_key)
        top = round(self.scroll_y)
        in_view = self._rows_in_view()
        if index < top:
            target = index
        elif in_view and index >= top + in_view:
            target = index - in_view + 1
        else:
            return
        self.scroll_to(y=target, animate=False, force=True, immediate=True)

    def _visible(self) -> tuple[int, list[tuple[str, tuple[Cell, ...]]]]:
        """Where the view starts, and the keys and cells of the rows in it."""
        top = round(self.scroll_y)
        rows = self._rows[top : top + self._rows_in_view()]
        cells = self._row_cells
        return top, [(key, cells(key)) for _, key in rows]

    def _refresh_if_changed(self) -> None:
        visible = self._visible()
        if visible != self._drawn:
            self._drawn = visible
            self.refresh()

    def _sync_highlight(self) -> None:
        current = self._cursor_key
        if current != self._last_highlighted:
            self._last_highlighted = current
            message = self._highlight_message(current)
            if message is not None:
                self.post_message(message)

    # ------------------------------------------------------------ actions

    def action_cursor_up(self) -> None:
        self._set_hover(False)
        # without a cursor (its row went), the first move puts it back where it was
        step = 0 if self._cursor_key is None else -1
        self.move_cursor(row=self._cursor_index if step == 0 else self.cursor_row + step)

    def action_cursor_down(self) -> None:
        self._set_hover(False)
        step = 0 if self._cursor_key is None else 1
        self.move_cursor(row=self._cursor_index if step == 0 else self.cursor_row + step)

    def action_scroll_top(self) -> None:
        self._set_hover(False)
        self.follow_first_row()

    def action_scroll_bottom(self) -> None:
        self._set_hover(False)
        self.move_cursor(row=self.row_count - 1)

    def action_page_down(self) -> None:
        self._page(1)

    def action_page_up(self) -> None:
        self._page(-1)

    def _page(self, direction: int) -> None:
        """The view and the cursor one screenful down (1) or up (-1)."""
        self._set_hover(False)
        page = direction * max(1, self._rows_in_view())
        self.scroll_to(y=round(self.scroll_y) + page, animate=False, force=True, immediate=True)
        self.move_cursor(row=self.cursor_row + page)

    def action_scroll_home(self) -> None:
        self._set_hover(False)
        self.scroll_x = 0

    def action_scroll_end(self) -> None:
        self._set_hover(False)
        self.scroll_x = self.max_scroll_x

    def action_select_cursor(self) -> None:
        self._set_hover(False)
        # the row opened is the one chosen: held, as a row moved to is, so that what the
        # opened row's detail shows (and what a key then acts on) is not the next newest row
        if self._cursor_key is not None:
            self._following = False
        self._post_selected()

    def _post_selected(self) -> None:
        key = self._cursor_key
        if key is not None:
            message = self._selected_message(key)
            if message is not None:
                self.post_message(message)

    # ------------------------------------------------------------ mouse

    def _set_hover(self, shown: bool) -> None:
        if shown != self._show_hover:
            self._show_hover = shown
            self.refresh()

    def _row_at(self, event: events.MouseEvent) -> tuple[int, str | None] | None:
        """(index, key) of the row drawn where the mouse is (the header: ``HEADER_ROW``, None)."""
        offset = event.get_content_offset(self)
        if offset is None:
            return None
        return self._drawn_lines.get(offset.y)

    def on_mouse_move(self, event: events.MouseMove) -> None:
        row = self._row_at(event)
        hover = None if row is None else row[0]
        if hover != self._hover_index or self._show_hover != (hover is not None):
            self._hover_index = hover
            self._show_hover = hover is not None
            self.refresh()

    def on_leave(self, event: events.Leave) -> None:
        self._set_hover(False)

    def on_click(self, event: events.Click) -> None:
        self._set_hover(True)
        row = self._row_at(event)
        # the run drawn under the pointer, even if newer rows have pushed it down since
        key = None if row is None else row[1]
        if key is None or key not in self._orders:
            return
        event.stop()
        if key == self._cursor_key:
            self._post_selected()
            return
        self.select_key(key)

    # ------------------------------------------------------------ drawing

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._cell_cache.clear()
        self._style_cache.clear()
        self._row_styles.clear()
        self._extend_styles.clear()
        self.refresh()

    def render_lines(self, crop: Region) -> list[Strip]:
        self._state = self.get_pseudo_class_state()
        self._base_style = self.rich_style
        return super().render_lines(crop)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        scroll_x, scroll_y = self.scroll_offset
        if y == 0:
            index, key, cells = HEADER_ROW, None, None
        else:
            index = scroll_y + y - 1
            if index >= len(self._rows):
                self._drawn_lines.pop(y, None)
                return Strip.blank(width, self._base_style)
            key = self._rows[index][1]
            cells = self._row_cells(key)
        self._drawn_lines[y] = (index, key)
        cursor = index == self._cursor_index and key is not None and key == self._cursor_key
        hover = self._show_hover and index == self._hover_index
        row_style = self._row_style(index)
        segments: _Segments = []
        for cell_segments in self._rendered_row(key, cells, row_style, cursor, hover):
            segments.extend(cell_segments)
        segments.append(Segment(" " * max(0, width - self._table_width), self._extend_style(row_style, index, cursor, hover)))
        strip = Strip(segments, max(width, self._table_width))
        if scroll_x or self._table_width > width:
            strip = strip.crop(scroll_x, scroll_x + width)
        return strip.adjust_cell_length(width, self._base_style)

    def _extend_style(self, row_style: Style, index: int, cursor: bool, hover: bool) -> Style:
        """The style of the row's blank past the last column (the cursor and stripe run on)."""
        cache_key = (self._state, row_style, index == HEADER_ROW, cursor, hover)
        style = self._extend_styles.get(cache_key)
        if style is None:
            extend, _ = self._cell_styles(index == HEADER_ROW, hover, cursor)
            style = self._extend_styles[cache_key] = row_style + extend + _PAST_COLUMNS
        return style

    def _row_style(self, index: int) -> Style:
        """The header's style, or a row's stripe."""
        if index == HEADER_ROW:
            name = "datatable--header"
        else:
            name = "datatable--odd-row" if index % 2 else "datatable--even-row"
        cache_key = (self._state, name)
        style = self._row_styles.get(cache_key)
        if style is None:
            style = self._row_styles[cache_key] = self.get_component_styles(name).rich_style
        return style

    def _rendered_row(
        self, key: str | None, cells: tuple[Cell, ...] | None, row_style: Style, cursor: bool, hover: bool
    ) -> list[_Segments]:
        """The segments of every cell of a row.

        Cells are rendered once per (text, style, stripe, cursor, hover): most cells of a
        runs table (task, status, progress, try) repeat from row to row.
        """
        is_header = key is None
        component, post = self._cell_styles(is_header, hover, cursor)
        cache = self._cell_cache
        state = self._state
        rendered: list[_Segments] = []
        for index, column in enumerate(self.COLUMNS):
            cell = None if cells is None else cells[index]
            cache_key = (index, cell, row_style, component, post, state)
            segments = cache.get(cache_key)
            if segments is None:
                self.cells_rendered += 1
                text = self._header[index] if cell is None else self._make_text(column, cell)
                # the column in each cell's metadata keeps neighbouring cells apart, as in
                # DataTable: what simplifies a line then merges no more than it does there
                pre = row_style + self._column_meta[index] + component
                line = self.app.console.render_lines(
                    Styled(Padding(text, (0, CELL_PADDING)), pre_style=pre, post_style=post),
                    self.app.console_options.update(no_wrap=True).update_dimensions(self._widths[index], 1),
                )[0]
                segments = list(Segment.simplify(line))
                cache[cache_key] = segments
            rendered.append(segments)
        return rendered

    def _cell_styles(self, is_header: bool, hover: bool, cursor: bool) -> tuple[Style, Style]:
        """DataTable's cursor and hover styles: (style under the cell's own, colour over it)."""
        cache_key = (self._state, is_header, hover, cursor)
        styles = self._style_cache.get(cache_key)
        if styles is not None:
            return styles
        get_component = self.get_component_rich_style
        component = Style()
        if hover:
            component += get_component("datatable--hover")
            if is_header:
                component += get_component("datatable--header-hover")
        if cursor:
            component += get_component("datatable--cursor")
            if is_header:
                component += get_component("datatable--header-cursor")
        # the cursor's foreground wins over the cell's colour; its background does not
        styles = (component, Style.from_color(color=component.color))
        self._style_cache[cache_key] = styles
        return styles

    @staticmethod
    def _make_text(column: Column, cell: Cell) -> Text:
        text, style = cell
        # cells show what tasks named and said: a control character must neither reach the
        # terminal nor cut the cell at a newline (only a cell not in the cache gets here)
        return Text(printable(text), style=style, justify=column.justify, no_wrap=True, overflow="ellipsis", end="")
