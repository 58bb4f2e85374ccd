"""RunsTable: the live list of runs, newest first, keyed by run id.

``update_runs`` takes any batch of run records (all of them or only the ones
that changed) and diffs them against what is shown. It keeps each run's
fields in a compact row (not the record given, whose model holds a dict of
them) and makes a row's texts only when the row is drawn: a deep queue of
waiting runs costs the table a few hundred bytes a run. Space marks runs (their
id shows highlighted) for actions on several at once: ``marked``. The table keeps
the newest ``max_rows`` runs (plus a small slack, so trimming happens in batches)
and, however old, every pending or running run, the selected one and the
marked ones: those must stay in sight to be cancelled or acted on. It has a
status/text filter.

Until the user moves the cursor, it follows the newest run and the view stays
at the top, so an untouched table shows runs as they arrive. Once the user
puts it on a run, it stays on that run while newer runs push its row down: a
key that acts on "the selected run" acts on the run the user chose, never on
whatever arrived last (also a run on the top row the user moved the cursor
to). ``g`` (or ctrl+home) follows the newest again.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from operator import attrgetter, itemgetter
from typing import Any, ClassVar, NamedTuple

from taskwatch.engine import InvalidStatus, Progress, RunError, RunRecord, RunStatus, StoredRun
from textual.binding import Binding
from textual.message import Message

from ._format import DASH, attempt_budget, fmt_clock, progress_bar, run_duration, short_id, status_style
from ._keyed_table import Cell, Column
from ._virtual_table import VirtualTable

#: Order of a run row: newest first, ties broken by id so the order is total.
_RunOrder = tuple[float, str]


#: rows whose cells are kept between two changes: a few screenfuls (the rows in view have theirs)
_DRAWN_CELLS_KEPT = 1_000

#: how a marked run's id cell looks
MARKED_STYLE = "bold black on yellow"

#: progress bar cells: 7 blocks and " 100%" fill the 12-wide progress column
_BAR_WIDTH = 7


class RunRow(NamedTuple):
    """What a runs table keeps of one run: the fields of its record (references to the
    record's values, in a tuple: a pydantic model holds them in a dict of its own, and a
    table of a deep queue holds a row for every waiting run), where the row goes, and the
    record itself when it is more than those fields say (a subclass such as ``StoredRun``,
    or a record given only some of its fields)."""

    id: str
    task: str
    params: dict[str, Any]
    status: RunStatus
    attempt: int
    max_attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    progress: Progress
    result: Any
    error: RunError | None
    key: str | None
    source: str
    cancel_reason: str | None
    node: str | None
    order: Any
    whole: RunRecord | None


_RECORD_FIELDS = tuple(RunRecord.model_fields)
if RunRow._fields[: len(_RECORD_FIELDS)] != _RECORD_FIELDS:  # pragma: no cover - RunRecord changed
    raise ImportError(f"RunRow's fields must be RunRecord's, in order: {_RECORD_FIELDS}")
#: a record's field values, in RunRow's order, from its ``__dict__``
_record_values = itemgetter(*_RECORD_FIELDS)
#: every field given: the fields set of a record the row holds in full (and of its rebuilt record)
_EVERY_FIELD = set(_RECORD_FIELDS)
_order = attrgetter("order")


def _row_of(record: RunRecord, order: Any) -> RunRow:
    fields_set = record.__pydantic_fields_set__
    plain = type(record) is RunRecord and (fields_set is _EVERY_FIELD or fields_set == _EVERY_FIELD)
    return RunRow._make((*_record_values(record.__dict__), order, None if plain else record))


def _same(row: RunRow, record: RunRecord) -> bool:
    """Whether ``record`` says what the row does (as ``==`` between the records would)."""
    whole = row.whole
    if whole is not None:
        return whole is record or whole == record
    return type(record) is RunRecord and row[: len(_RECORD_FIELDS)] == _record_values(record.__dict__)


def run_cells(record: RunRecord | RunRow, now: float, marked: bool = False) -> tuple[Cell, ...]:
    """The (text, style) of every column for one run."""
    status = record.status.value
    style = status_style(status)
    fraction = record.progress.fraction
    duration = run_duration(record, now)
    attempt_style = "yellow" if record.attempt > 1 else ""
    return (
        (short_id(record.id), MARKED_STYLE if marked else "dim"),
        (record.task, "bold"),
        (status, style),
        _progress_cell(record, fraction, style),
        (duration, ""),
        (f"{record.attempt}/{attempt_budget(record)}", attempt_style),
        (fmt_clock(record.started_at), ""),
    )


def _progress_cell(record: RunRecord | RunRow, fraction: float | None, style: str) -> Cell:
    if fraction is not None:
        return (progress_bar(fraction, width=_BAR_WIDTH), style)
    done = record.progress.done
    # a count with no total (items so far of a stream) says as much as the detail pane does
    return (f"{done:g} done", style) if done else (DASH, "dim")


class RunsTable(VirtualTable):
    """Runs newest first, with coloured status, progress bar, attempt and live duration.

    Only the rows in view are drawn, so thousands of runs cost a frame no more than a screenful.
    """

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("id", "id", 8),
        # fixed, so the columns never shift as runs of longer-named tasks arrive (and nothing is
        # measured); longer names end in an ellipsis. Task and progress are one narrower than
        # they might be so that at 80 columns, beside a vertical scrollbar, the started time
        # still shows its seconds
        Column("task", "task", 15),
        Column("status", "status", 9),
        Column("progress", "progress", 12),
        Column("duration", "duration", 8, "right"),
        Column("attempt", "try", 5, "right"),
        Column("started", "started", 8),
    )

    BINDINGS = [Binding("space", "toggle_mark", "Mark", show=False)]

    class RunHighlighted(Message):
        """The cursor moved to another run (``run_id`` is None when the table emptied)."""

        def __init__(self, table: RunsTable, run_id: str | None) -> None:
            self.table = table
            self.run_id = run_id
            super().__init__()

        @property
        def control(self) -> RunsTable:
            return self.table

    class RunSelected(Message):
        """A run was chosen with Enter or a click."""

        def __init__(self, table: RunsTable, run_id: str) -> None:
            self.table = table
            self.run_id = run_id
            super().__init__()

        @property
        def control(self) -> RunsTable:
            return self.table

    def __init__(
        self,
        *,
        max_rows: int = 500,
        trim_batch: int | None = None,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self.max_rows = max_rows
        #: how far the table may overshoot max_rows before one batch trim
        self.trim_batch = trim_batch if trim_batch is not None else max(1, min(200, max_rows // 4))
        #: every run we know about (shown or filtered out), bounded like the table
        self._runs: dict[str, RunRow] = {}
        #: the cells of rows drawn since the last change (only rows in view have cells made)
        self._drawn_cells: dict[str, tuple[Cell, ...]] = {}
        #: how many of them are pending or running: those are never trimmed away
        self._active = 0
        self._statuses: frozenset[str] | None = None
        self._text = ""
        self._tasks: frozenset[str] | None = None
        self._now = 0.0
        self._marked: dict[str, None] = {}  # insertion-ordered set

    # ------------------------------------------------------------ public API

    @property
    def selected_run_id(self) -> str | None:
        return self.selected_key

    def select_run(self, run_id: str) -> bool:
        """Move the cursor to ``run_id`` and keep it there; False when that run is not shown."""
        return self.select_key(run_id)

    @property
    def marked(self) -> list[str]:
        """The runs marked with space, in the order they were marked."""
        return list(self._marked)

    def mark(self, run_id: str, marked: bool = True) -> bool:
        """Mark or unmark a shown run; False when that run is not in the table."""
        row = self._runs.get(run_id)
        if row is None:
            return False
        if marked:
            self._marked[run_id] = None
        else:
            self._marked.pop(run_id, None)
        if self._matches(row):
            self._begin()
            self._upsert(run_id, row.order, None)
            self._finish()
        return True

    def clear_marks(self) -> None:
        for run_id in list(self._marked):
            self.mark(run_id, False)

    def action_toggle_mark(self) -> None:
        """Space: mark the run under the cursor (or unmark it) and move down, as in mc or ranger."""
        run_id = self.selected_run_id
        if run_id is None:
            return
        self.mark(run_id, run_id not in self._marked)
        self.action_cursor_down()

    @property
    def statuses(self) -> frozenset[str] | None:
        return self._statuses

    @property
    def filter_text(self) -> str:
        return self._text

    @property
    def active_run_ids(self) -> frozenset[str]:
        """The runs the table shows pending or running. A feed of the newest runs only (an
        engine's ``runs(limit=N)``) leaves out one that a burst of newer runs pushed past ``N``
        while it went on: read these again by id, or their rows keep an end they never get."""
        return frozenset(row.id for row in self._runs.values() if not row.status.finished)

    def record(self, run_id: str) -> RunRecord | None:
        """The last record passed in for ``run_id`` (shown or filtered out), or one equal to it."""
        row = self._runs.get(run_id)
        if row is None:
            return None
        if row.whole is not None:
            return row.whole
        return RunRecord.model_construct(_EVERY_FIELD, **dict(zip(_RECORD_FIELDS, row)))

    def has_run(self, run_id: str) -> bool:
        """Whether the table holds ``run_id`` (shown or filtered out): ``record`` without
        building one."""
        return run_id in self._runs

    def update_runs(self, records: Iterable[RunRecord], now: float) -> None:
        """Show these runs (new or changed ones; unchanged ones cost a comparison).

        Records of one run are taken in the order given: when a batch holds several for
        the same id, the last one given is the one kept and shown, so give them oldest first.

        Raises ``TypeError`` when an item is no ``RunRecord`` or ``now`` is no time, and
        ``ValueError`` when ``now`` or a record's time is nan or infinite; then nothing changes."""
        batch = list(records)
        for index, record in enumerate(batch):
            if not isinstance(record, RunRecord):
                raise TypeError(
                    f"RunsTable.update_runs takes RunRecord objects; item {index} is {type(record).__name__}: "
                    f"{record!r:.80}; nothing was shown"
                )
        if isinstance(now, bool) or not isinstance(now, (int, float)):
            raise TypeError(f"RunsTable.update_runs: now must be a UNIX time (float), got {now!r:.80}")
        if not math.isfinite(now):
            raise ValueError(f"RunsTable.update_runs: now must be a finite UNIX time, got {now!r}; nothing was shown")
        for index, record in enumerate(batch):
            _check_times(record, index)
        self._now = now
        self._begin()
        changed: list[str] = []
        known = self._runs
        for record in batch:
            previous = known.get(record.id)
            if previous is not None and _same(previous, record):
                continue
            known[record.id] = _row_of(record, self.order_of(record))
            changed.append(record.id)
            # counted, not listed: a set of a deep queue's ids would cost more than its rows
            self._active += (not record.status.finished) - (previous is not None and not previous.status.finished)
        # the runs trimming may drop are the finished ones: trim once they overflow
        if len(known) - self._active > self.max_rows + self.trim_batch:
            self._trim()
        hidden: list[str] = []
        for run_id in changed:
            row = known.get(run_id)
            if row is None:  # trimmed just now
                continue
            if self._matches(row):
                self._upsert(run_id, row.order, None)
            else:
                hidden.append(run_id)
        if hidden and not self.following and self.selected_key in hidden:
            # the run the user chose left the filter (its status changed): no run is selected
            # then, rather than its neighbour, which a key acting on "the selected run" would hit
            self.clear_cursor()
        self._remove(hidden)
        self._finish()

    def order_of(self, record: RunRecord) -> tuple[Any, ...]:
        """Where ``record`` goes: the table is sorted on this key, and trimmed from its end.
        Newest first; a subclass that knows more of the order (a store's insertion order)
        may say so."""
        return _newest_first(record)

    def _cells_of(self, record: RunRecord | RunRow) -> tuple[Cell, ...]:
        return run_cells(record, self._now, record.id in self._marked)

    def _row_cells(self, key: str) -> tuple[Cell, ...]:
        cells = self._drawn_cells.get(key)
        if cells is None:
            row = self._runs.get(key)
            if row is None or key not in self._orders:  # (a run the filter hides is no row)
                return super()._row_cells(key)
            drawn = self._drawn_cells
            if len(drawn) >= _DRAWN_CELLS_KEPT:  # scrolled far with nothing changing
                drawn.clear()
            cells = drawn[key] = self._cells_of(row)
        return cells

    def _begin(self) -> None:
        # whatever changes now (a run, a mark, the time running durations count to) is drawn anew
        self._drawn_cells.clear()
        super()._begin()

    def set_filter(
        self,
        statuses: str | Iterable[str] | None,
        text: str = "",
        tasks: str | Iterable[str] | None = None,
    ) -> None:
        """Show only runs whose status is in ``statuses`` (None or empty: any), whose task
        is one of ``tasks`` exactly (None or empty: any) and whose task name or id contains
        ``text`` (case-insensitive). One status or task may be given as a plain string.

        Raises :class:`InvalidStatus` for a status that names none (as ``engine.runs``
        does) and ``TypeError`` for values that are no strings; then the filter stays."""
        new_statuses = _status_filter(statuses)
        new_tasks = _names(tasks, "tasks")
        if not isinstance(text, str):
            raise TypeError(f"RunsTable.set_filter: text must be a str, got {text!r:.80}; the filter stays")
        new_text = text.strip().lower()
        if new_statuses == self._statuses and new_text == self._text and new_tasks == self._tasks:
            return
        self._statuses = new_statuses
        self._tasks = new_tasks
        self._text = new_text
        self._begin()
        hidden: list[str] = []
        for run_id, row in self._runs.items():
            if self._matches(row):
                self._upsert(run_id, row.order, None)
            else:
                hidden.append(run_id)
        self._remove(hidden)
        self._finish()

    def remove_runs(self, run_ids: Iterable[str]) -> None:
        """Forget these runs (say, the dashboard's model let them go)."""
        gone = [run_id for run_id in run_ids if run_id in self._runs]
        if not gone:
            return
        if self.selected_key in gone and not self.following:
            # the run the user chose is going: then no run is selected, rather than a
            # neighbour that a key acting on "the selected run" would act on instead
            self.clear_cursor()
        self._begin()
        for run_id in gone:
            row = self._runs.pop(run_id, None)
            if row is not None and not row.status.finished:
                self._active -= 1
            self._marked.pop(run_id, None)
        self._remove(gone)
        self._finish()

    def clear_runs(self) -> None:
        """Forget every run (e.g. after reconnecting to another engine)."""
        self._runs.clear()
        self._drawn_cells.clear()
        self._active = 0
        self._marked.clear()
        self._clear_rows()
        self._sync_highlight()

    # ------------------------------------------------------------ internals

    def _matches(self, record: RunRow) -> bool:
        if self._statuses is not None and record.status.value not in self._statuses:
            return False
        if self._tasks is not None and record.task not in self._tasks:
            return False
        text = self._text
        if text and text not in record.task.lower() and text not in record.id.lower():
            return False
        return True

    def _trim(self) -> None:
        """Drop the finished runs older than the newest max_rows finished ones (one batch, so
        one re-layout). Pending and running runs are never dropped, nor counted: a queue of
        thousands would otherwise push out every run the moment it finished. Nor is the one
        under the cursor or a marked one (the user chose those to act on)."""
        newest_first = sorted((r for r in self._runs.values() if r.status.finished), key=_order)
        selected = self.selected_key
        marked = self._marked
        dropped = [
            row.id for row in newest_first[self.max_rows :]
            if row.id != selected and row.id not in marked
        ]
        for run_id in dropped:
            del self._runs[run_id]
            self._marked.pop(run_id, None)
        self._remove(dropped)

    def _highlight_message(self, key: str | None) -> Message:
        return self.RunHighlighted(self, key)

    def _selected_message(self, key: str) -> Message:
        return self.RunSelected(self, key)


def _check_times(record: RunRecord, index: int) -> None:
    # a nan created_at compares with nothing, so the rows sorted by it would fall out of
    # order; an infinite time has no clock or duration to draw
    for name in ("created_at", "started_at", "finished_at"):
        value = getattr(record, name)
        if value is None and name != "created_at":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(
                f"RunsTable.update_runs: item {index} (run {record.id!r:.40}) has {name}={value!r:.40}; "
                "times must be finite UNIX times; nothing was shown"
            )


def _newest_first(record: RunRecord) -> _RunOrder:
    return (-record.created_at, record.id)


def _names(values: str | Iterable[str] | None, what: str) -> frozenset[str] | None:
    """A filter's values: one string is one value (not its letters); None or empty: no filter."""
    if values is None:
        return None
    if isinstance(values, str):
        return frozenset((values,)) if values else None
    if not isinstance(values, Iterable):
        raise TypeError(f"RunsTable.set_filter: {what} must be a str or strings, got {values!r:.80}; the filter stays")
    names: set[str] = set()
    for name in values:
        if not isinstance(name, str):
            raise TypeError(f"RunsTable.set_filter: {what} must be strings, got {name!r:.80}; the filter stays")
        names.add(name)
    return frozenset(names) or None


def _status_filter(statuses: str | Iterable[str] | None) -> frozenset[str] | None:
    names = _names(statuses, "statuses")
    if names is None:
        return None
    valid = [status.value for status in RunStatus]
    for name in names:
        if name not in valid:
            raise InvalidStatus(name, valid)
    return frozenset(RunStatus(name).value for name in names)


class ClusterRunsTable(RunsTable):
    """:class:`RunsTable` for the runs of a whole cluster: a node column says where each runs
    (or ran); runs not yet claimed show none. Space marks nothing: the cluster dashboard's
    commands act on the run under the cursor, and a mark would promise otherwise."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        *RunsTable.COLUMNS[:2],
        Column("node", "node", 12),
        *RunsTable.COLUMNS[2:],
    )

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action == "toggle_mark":
            return False
        return super().check_action(action, parameters)

    def order_of(self, record: RunRecord) -> tuple[Any, ...]:
        # runs created at one time (submitted together) newest first too: by the store's
        # insertion order, which ids do not follow
        return (-record.created_at, -record.seq if isinstance(record, StoredRun) else 0, record.id)

    def _cells_of(self, record: RunRecord | RunRow) -> tuple[Cell, ...]:
        cells = run_cells(record, self._now, record.id in self._marked)
        node = record.node
        return (*cells[:2], (node or DASH, "" if node else "dim"), *cells[2:])
