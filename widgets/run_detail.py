"""RunDetail: everything about one run, including the full traceback of a failure."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from taskwatch.engine import RunError, RunRecord, RunStatus
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import ProgressBar, Static

from ._format import DASH, fmt_clock, fmt_duration, pretty_json, status_style

_UNSET: Any = object()


def _json_view(value: Any) -> Syntax:
    return Syntax(pretty_json(value), "json", theme="ansi_dark", background_color="default", word_wrap=True)


def _traceback_view(traceback: str) -> Syntax:
    return Syntax(
        traceback.rstrip("\n"), "pytb", theme="ansi_dark", background_color="default", word_wrap=True
    )


class RunDetail(VerticalScroll):
    """Shows one run record; call ``show(record)`` (``None`` clears it)."""

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    def __init__(
        self,
        *,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        self._record: RunRecord | None = None
        # Last values per section: the params/result JSON and the traceback are only
        # re-highlighted when they change, not on every dashboard tick.
        self._params_of: str | None = None
        self._result: Any = _UNSET
        self._error: RunError | None | object = _UNSET

    def compose(self) -> ComposeResult:
        yield Static("No run selected.", id="run-detail-empty")
        with Vertical(id="run-detail-body"):
            yield Static(id="run-detail-summary")
            with Horizontal(id="run-detail-progress-row"):
                yield ProgressBar(total=100, show_eta=False, id="run-detail-progress")
                yield Static(id="run-detail-progress-message")
            yield Static("Params", classes="run-detail--heading")
            yield Static(id="run-detail-params")
            with Vertical(id="run-detail-result-section"):
                yield Static("Result", classes="run-detail--heading")
                yield Static(id="run-detail-result")
            with Vertical(id="run-detail-error-section"):
                yield Static("Error", classes="run-detail--heading")
                yield Static(id="run-detail-error")
                yield Static(id="run-detail-traceback")

    def on_mount(self) -> None:
        self.query_one("#run-detail-body").display = False
        pending, self._record = self._record, None
        if pending is not None:
            self.show(pending)

    @property
    def record(self) -> RunRecord | None:
        """The run currently shown."""
        return self._record

    @property
    def traceback_text(self) -> str:
        """The traceback of the shown run's failure, as plain text ("" when none)."""
        record = self._record
        if record is None or record.error is None:
            return ""
        return record.error.traceback

    def show(self, record: RunRecord | None, now: float | None = None) -> None:
        """Show ``record``; ``now`` drives the live duration of a running run."""
        if not self.is_mounted:
            self._record = record  # shown on mount
            return
        previous = self._record
        running = record is not None and record.status is RunStatus.RUNNING
        if record is previous and not running:
            return
        if record is not None and previous is not None and record == previous and not running:
            return
        self._record = record
        body = self.query_one("#run-detail-body")
        empty = self.query_one("#run-detail-empty")
        if record is None:
            body.display = False
            empty.display = True
            self._params_of = None
            self._result = _UNSET
            self._error = _UNSET
            return
        body.display = True
        empty.display = False
        if previous is not None and previous.id != record.id:
            self.scroll_home(animate=False)
        self.query_one("#run-detail-summary", Static).update(
            self._summary(record, time.time() if now is None else now)
        )
        self._show_progress(record)
        if self._params_of != record.id:
            self._params_of = record.id
            self.query_one("#run-detail-params", Static).update(_json_view(record.params))
        self._show_result(record)
        self._show_error(record)

    # ------------------------------------------------------------ sections

    def _summary(self, record: RunRecord, now: float) -> RenderableType:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        status = Text(record.status.value, style=status_style(record.status.value))
        if record.cancel_reason is not None:
            status.append(f" ({record.cancel_reason})", style="dim")
        if record.started_at is None:
            duration = DASH
        else:
            end = record.finished_at if record.finished_at is not None else now
            duration = fmt_duration(end - record.started_at)
        rows: list[tuple[str, RenderableType]] = [
            ("run", Text(record.id, style="bold")),
            ("task", Text(record.task, style="bold")),
            ("status", status),
            ("attempt", Text(f"{record.attempt} of {record.max_attempts}")),
            ("created", Text(fmt_clock(record.created_at))),
            ("started", Text(fmt_clock(record.started_at))),
            ("finished", Text(fmt_clock(record.finished_at))),
            ("duration", Text(duration)),
            ("key", Text(record.key or DASH)),
            ("source", Text(record.source)),
        ]
        for label, value in rows:
            grid.add_row(label, value)
        return grid

    def _show_progress(self, record: RunRecord) -> None:
        progress = record.progress
        bar = self.query_one("#run-detail-progress", ProgressBar)
        message = self.query_one("#run-detail-progress-message", Static)
        fraction = progress.fraction
        bar.display = fraction is not None
        if fraction is not None:
            bar.update(total=progress.total, progress=progress.done)
        parts: list[str] = []
        if fraction is None and progress.done:
            parts.append(f"{progress.done:g} done")
        if progress.message:
            parts.append(progress.message)
        message.update(Text(" · ".join(parts) if parts else "", style="italic"))
        self.query_one("#run-detail-progress-row").display = fraction is not None or bool(parts)

    def _show_result(self, record: RunRecord) -> None:
        section = self.query_one("#run-detail-result-section")
        has_result = record.status is RunStatus.SUCCEEDED or record.result is not None
        section.display = has_result
        if has_result and (self._result is _UNSET or self._result != record.result):
            self._result = record.result
            self.query_one("#run-detail-result", Static).update(_json_view(record.result))

    def _show_error(self, record: RunRecord) -> None:
        error = record.error
        section = self.query_one("#run-detail-error-section")
        section.display = error is not None
        if error is None or error == self._error:
            return
        self._error = error
        self.query_one("#run-detail-error", Static).update(
            Text.assemble((error.type, "bold red"), ": ", error.message)
        )
        traceback = self.query_one("#run-detail-traceback", Static)
        if error.traceback:
            traceback.update(_traceback_view(error.traceback))
            traceback.display = True
        else:
            traceback.display = False
