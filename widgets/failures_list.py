"""FailuresList: failed runs and crashed supervised workers, with the traceback of the highlighted one."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar, Literal, TypeAlias

from rich.console import Group, RenderableType
from rich.syntax import Syntax
from rich.text import Text
from taskwatch.engine import RunError, RunRecord, WorkerInfo
from textual import on
from textual.app import ComposeResult
from textual.containers import Vertical, VerticalScroll
from textual.message import Message
from textual.widgets import Static

from ._format import DASH, attempt_budget, fmt_clock, printable, printable_lines, short_id
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable

FailureKind = Literal["run", "worker"]
_Item: TypeAlias = RunRecord | WorkerInfo


def _error_line(error: RunError | None, limit: int = 60) -> str:
    if error is None:
        return DASH
    text = printable(f"{error.type}: {error.message}")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _run_time(record: RunRecord) -> float:
    return record.finished_at if record.finished_at is not None else record.created_at


class _FailuresTable(KeyedTable):
    # newest first: an untouched list shows, and r acts on, the newest failure
    FOLLOWS_FIRST_ROW = True

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("kind", "kind", 6),
        Column("name", "task / worker", max_width=NAME_WIDTH),
        Column("ident", "id / state", 12),
        Column("tries", "tries", 11, "right"),
        Column("error", "error"),
        Column("when", "last error", 10),
    )

    class Highlighted(Message):
        def __init__(self, key: str | None) -> None:
            self.key = key
            super().__init__()

    class Selected(Message):
        def __init__(self, key: str) -> None:
            self.key = key
            super().__init__()

    def _highlight_message(self, key: str | None) -> Message:
        return self.Highlighted(key)

    def _selected_message(self, key: str) -> Message:
        return self.Selected(key)


class FailuresList(Vertical):
    """Failed runs and crashed workers, newest first; the highlighted one's traceback below.

    Until the user moves it, the cursor follows the newest failure; once moved (or after
    ``select``), it stays on the failure chosen as newer ones arrive, and when that failure
    leaves the list (pushed out by ``max_items`` newer ones) none is selected until the
    cursor is moved again (``g`` follows the newest again)."""

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    class FailureSelected(Message):
        """Enter/click on a failure: ``ident`` is the run id or the worker name."""

        def __init__(self, failures: FailuresList, kind: FailureKind, ident: str) -> None:
            self.failures = failures
            self.kind: FailureKind = kind
            self.ident = ident
            super().__init__()

        @property
        def control(self) -> FailuresList:
            return self.failures

    def __init__(
        self,
        *,
        max_items: int = 200,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self.max_items = max_items
        self._items: dict[str, _Item] = {}
        #: what the detail pane shows: (key, item, whether any failure is listed)
        self._detail_shown: tuple[str | None, _Item | None, bool] | None = None
        self._early_update: tuple[list[RunRecord], list[WorkerInfo]] | None = None
        # Textual says a widget is mounted only once its on_mount has run, and on_mount
        # draws the early update: the table is there from then on
        self._ready = False

    def compose(self) -> ComposeResult:
        yield _FailuresTable(id="failures-table")
        with VerticalScroll(id="failures-detail"):
            yield Static("No failures.", id="failures-traceback")

    def on_mount(self) -> None:
        self._ready = True
        if self._early_update is not None:
            early, self._early_update = self._early_update, None
            self.update(*early)

    @property
    def table(self) -> KeyedTable:
        return self.query_one(_FailuresTable)

    @property
    def selected(self) -> tuple[FailureKind, str] | None:
        """(kind, run id or worker name) of the highlighted failure."""
        key = self.table.selected_key
        return _split_key(key) if key is not None else None

    def selected_traceback(self) -> tuple[str, str] | None:
        """(title, traceback text) of the highlighted failure, e.g. for a full-screen view:
        ready to draw, with the control characters a task's message may hold escaped."""
        key = self.table.selected_key
        item = self._items.get(key) if key is not None else None
        if item is None:
            return None
        if isinstance(item, RunRecord):
            error, title = item.error, f"{item.task} {item.id}"
        else:
            error, title = item.last_error, f"worker {item.name}"
        if error is None:
            return printable(title), ""
        return printable(f"{title}: {error.type}: {error.message}"), printable_lines(error.traceback)

    def select(self, kind: FailureKind, ident: str) -> bool:
        return self.table.select_key(f"{kind}:{ident}")

    def update(self, failed_runs: Iterable[RunRecord], workers: Iterable[WorkerInfo]) -> None:
        """Show these failed runs and every worker that has crashed at least once."""
        if not self._ready:
            # the table does not exist yet; copied, so that what is drawn then is what was given now
            self._early_update = (list(failed_runs), list(workers))
            return
        entries: list[tuple[float, str, _Item]] = []
        for record in failed_runs:
            entries.append((_run_time(record), f"run:{record.id}", record))
        for worker in workers:
            if worker.last_error is not None:
                entries.append((worker.last_error_at or 0.0, f"worker:{worker.name}", worker))
        entries.sort(key=lambda entry: (-entry[0], entry[1]))
        del entries[self.max_items :]

        table = self.query_one(_FailuresTable)
        self._items = {key: item for _, key, item in entries}
        table.set_rows((key, (-when, key), _cells(item)) for when, key, item in entries)
        # the highlighted failure may have crashed again with a new traceback
        self._show_detail(table.selected_key)

    @on(_FailuresTable.Highlighted)
    def _failure_highlighted(self, event: _FailuresTable.Highlighted) -> None:
        event.stop()
        self._show_detail(event.key)

    @on(_FailuresTable.Selected)
    def _failure_selected(self, event: _FailuresTable.Selected) -> None:
        event.stop()
        kind, ident = _split_key(event.key)
        self.post_message(self.FailureSelected(self, kind, ident))

    def _show_detail(self, key: str | None) -> None:
        item = self._items.get(key) if key is not None else None
        shown = (key, item, bool(self._items))
        if shown == self._detail_shown:
            return
        self._detail_shown = shown
        self.query_one("#failures-traceback", Static).update(_detail(item, listed=shown[2]))


def _split_key(key: str) -> tuple[FailureKind, str]:
    kind, _, ident = key.partition(":")
    return ("worker" if kind == "worker" else "run"), ident


def _cells(item: _Item) -> tuple[Cell, ...]:
    if isinstance(item, RunRecord):
        return (
            ("run", "red"),
            (printable(item.task), "bold"),
            (printable(short_id(item.id)), "dim"),
            (f"{item.attempt}/{attempt_budget(item)}", "yellow" if item.attempt > 1 else ""),
            (_error_line(item.error), "red"),
            (fmt_clock(_run_time(item)), ""),
        )
    return (
        ("worker", "yellow"),
        (printable(item.name), "bold"),
        (printable(item.state), "bold red" if item.state == "backoff" else ""),
        (f"{item.restarts} restart{'s' if item.restarts != 1 else ''}", "yellow" if item.restarts else ""),
        (_error_line(item.last_error), "red"),
        (fmt_clock(item.last_error_at), ""),
    )


def _detail(item: _Item | None, listed: bool = False) -> RenderableType:
    if item is None:
        if listed:
            # the failure chosen left the list: say so, rather than that there are none
            return Text("No failure selected: move the cursor to one (g: the newest).", style="dim italic")
        return Text("No failures.", style="dim italic")
    if isinstance(item, RunRecord):
        title = Text.assemble(
            ("run ", "dim"), (printable(item.id), "bold"), ("  task ", "dim"), (printable(item.task), "bold"),
            ("  attempt ", "dim"), f"{item.attempt}/{attempt_budget(item)}",
            ("  failed at ", "dim"), fmt_clock(_run_time(item)),
        )
        error = item.error
    else:
        title = Text.assemble(
            ("worker ", "dim"), (printable(item.name), "bold"), ("  state ", "dim"), printable(item.state),
            ("  restarts ", "dim"), str(item.restarts), ("  crashes ", "dim"), str(item.crashes),
            ("  last error at ", "dim"), fmt_clock(item.last_error_at),
        )
        error = item.last_error
    if error is None:
        return title
    parts: list[RenderableType] = [
        title, Text.assemble((printable(error.type), "bold red"), ": ", printable_lines(error.message))
    ]
    if error.traceback:
        traceback = printable_lines(error.traceback.rstrip("\n"))
        parts.append(Syntax(traceback, "pytb", theme="ansi_dark", background_color="default", word_wrap=True))
    return Group(*parts)
