"""RunDetail: everything about one run: its attempts, params, result, and the full traceback of a failure."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict
from rich.console import RenderableType
from rich.syntax import Syntax
from rich.table import Table
from rich.text import Text
from taskwatch.engine import RunError, RunRecord, RunStatus
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import ProgressBar, Static

from ._format import (
    DASH,
    fmt_clock,
    fmt_duration,
    pretty_json,
    printable,
    printable_lines,
    run_duration,
    status_style,
)
from ._format import attempt_budget

_UNSET: Any = object()

#: the colour of an attempt's outcome (run statuses, and "lost" for a lost worker)
_OUTCOME_STYLES = {"lost": "bold magenta", "retried": "yellow"}


class RunAttempt(BaseModel):
    """One attempt of a run, as far as it is known.

    ``outcome``: ``running``, ``succeeded``, ``failed``, ``retried`` (failed, with a
    retry to come), ``cancelled``, or ``lost`` (its worker was lost and recovery
    took the run back: ``recovery`` says how, e.g. ``requeued by recovery: node
    b-1 stopped heartbeating``).
    """

    model_config = ConfigDict(frozen=True)

    number: int
    started_at: float | None = None
    ended_at: float | None = None
    outcome: str = "running"
    error: RunError | None = None
    #: what came next: "retry in 2.0s", or how recovery took the run back
    note: str = ""
    recovery: str = ""
    #: the node the attempt was lost on, when recovery says so
    lost_on: str | None = None


def attempts_table(attempts: list[RunAttempt], now: float) -> Table:
    """The attempts, oldest first: number, start, end, time taken and what became of each."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="dim", no_wrap=True, justify="right")
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(no_wrap=True, justify="right")
    grid.add_column()
    for attempt in attempts:
        took = _duration(attempt.started_at, attempt.ended_at, now)
        outcome = Text(attempt.outcome, style=_OUTCOME_STYLES.get(attempt.outcome) or status_style(attempt.outcome))
        if attempt.lost_on:
            outcome.append(f" on {printable(attempt.lost_on)}", style="magenta")
        if attempt.error is not None:
            outcome.append(printable(f"  {attempt.error.type}: {attempt.error.message}"), style="red")
        if attempt.recovery:
            outcome.append(f"  {printable(attempt.recovery)}", style="magenta")
        if attempt.note:
            outcome.append(f"  {printable(attempt.note)}", style="dim")
        grid.add_row(f"#{attempt.number}", fmt_clock(attempt.started_at), fmt_clock(attempt.ended_at), took, outcome)
    return grid


def _duration(started_at: float | None, ended_at: float | None, now: float) -> str:
    """Time taken as shown: till ``now`` while not ended, a dash before the start."""
    if started_at is None:
        return DASH
    return fmt_duration((ended_at if ended_at is not None else now) - started_at)


def _update_part(
    part: Static,
    shown: tuple[Any, ...] | None,
    fixed: tuple[Any, ...],
    durations: tuple[str, ...],
    render: Callable[[], RenderableType],
) -> tuple[Any, ...]:
    """Update ``part`` only if what it shows changed: ``fixed`` (what it is drawn from) or the
    ``durations`` it shows as text; returns what it shows now. A live duration ticking on in
    text as wide as before is repainted without a layout (the part keeps its size)."""
    key = (fixed, durations)
    if key == shown:
        return key
    same_size = shown is not None and shown[0] == fixed and [len(d) for d in shown[1]] == [len(d) for d in durations]
    part.update(render(), layout=not same_size)
    return key


def _json_view(text: str) -> Syntax:
    return Syntax(text, "json", theme="ansi_dark", background_color="default", word_wrap=True)


def _traceback_view(traceback: str) -> Syntax:
    return Syntax(
        printable_lines(traceback.rstrip("\n")), "pytb", theme="ansi_dark", background_color="default", word_wrap=True
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
        #: the params and the result shown, each as (value, its JSON text)
        self._params: tuple[Any, str] | None = None
        self._result: tuple[Any, str] | None = None
        self._error: RunError | None | object = _UNSET
        self._attempts: list[RunAttempt] = []
        # What the summary, the attempts and the progress line show now (their inputs, with
        # the live durations as drawn): a running run is shown again every frame, and an
        # update of a part that shows the same forces a layout of the whole screen
        self._summary_key: tuple[Any, ...] | None = None
        self._attempts_key: tuple[Any, ...] | None = None
        self._progress_key: tuple[Any, ...] | None = None
        # Textual says a widget is mounted only once its on_mount has run: what is shown
        # before that is drawn by on_mount itself, so it needs its own word for "ready"
        self._ready = False

    def compose(self) -> ComposeResult:
        yield Static("No run selected.", id="run-detail-empty")
        with Vertical(id="run-detail-body"):
            yield Static(id="run-detail-summary")
            with Horizontal(id="run-detail-progress-row"):
                yield ProgressBar(total=100, show_eta=False, id="run-detail-progress")
                yield Static(id="run-detail-progress-message")
            yield Static("Attempts", classes="run-detail--heading")
            yield Static(id="run-detail-attempts")
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
        self._ready = True
        self.query_one("#run-detail-body").display = False
        pending, self._record = self._record, None
        if pending is not None:
            self.show(pending, attempts=self._attempts)

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

    @property
    def attempts(self) -> list[RunAttempt]:
        """The attempts shown for the run (oldest first)."""
        return list(self._attempts)

    def show(
        self, record: RunRecord | None, now: float | None = None, attempts: list[RunAttempt] | None = None
    ) -> None:
        """Show ``record``; ``now`` drives the live duration of a running run. ``attempts``
        is the run's history; without it, the record's own attempt is shown."""
        if attempts is None and record is not None:
            attempts = [attempt_of(record)]
        if not self._ready:
            self._record = record  # shown on mount
            self._attempts = attempts or []
            return
        previous = self._record
        running = record is not None and record.status is RunStatus.RUNNING
        same_attempts = attempts == self._attempts
        if record is previous and not running and same_attempts:
            return
        if record is not None and previous is not None and record == previous and not running and same_attempts:
            return
        self._record = record
        self._attempts = attempts or []
        body = self.query_one("#run-detail-body")
        empty = self.query_one("#run-detail-empty")
        if record is None:
            body.display = False
            empty.display = True
            self._params = self._result = None
            self._error = _UNSET
            self._summary_key = self._attempts_key = self._progress_key = None
            return
        body.display = True
        empty.display = False
        if previous is not None and previous.id != record.id:
            self.scroll_home(animate=False)
        now = time.time() if now is None else now
        self._show_summary(record, now)
        self._show_attempts(now)
        self._show_progress(record)
        # Keyed on the value, not the run id: attached, a run first arrives with its params
        # cut down by the wire and later, fetched in full, under the same id.
        self._params = self._show_json("#run-detail-params", record.params, self._params)
        self._show_result(record)
        self._show_error(record)

    # ------------------------------------------------------------ sections

    def _show_summary(self, record: RunRecord, now: float) -> None:
        duration = run_duration(record, now)
        key = (
            record.id, record.task, record.status, record.cancel_reason, record.attempt, record.max_attempts,
            getattr(record, "lost_count", 0),
            record.created_at, record.started_at, record.finished_at, record.key, record.source, record.node,
        )
        self._summary_key = _update_part(
            self.query_one("#run-detail-summary", Static), self._summary_key, key, (duration,),
            lambda: self._summary(record, now),
        )

    def _show_attempts(self, now: float) -> None:
        attempts = self._attempts
        took = tuple(_duration(a.started_at, a.ended_at, now) for a in attempts)
        self._attempts_key = _update_part(
            self.query_one("#run-detail-attempts", Static), self._attempts_key, tuple(attempts), took,
            lambda: attempts_table(attempts, now),
        )

    def _summary(self, record: RunRecord, now: float) -> RenderableType:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="dim", no_wrap=True)
        grid.add_column()
        status = Text(record.status.value, style=status_style(record.status.value))
        if record.cancel_reason is not None:
            status.append(f" ({printable(record.cancel_reason)})", style="dim")
        duration = run_duration(record, now)
        rows: list[tuple[str, RenderableType]] = [
            ("run", Text(printable(record.id), style="bold")),
            ("task", Text(printable(record.task), style="bold")),
            ("status", status),
            ("attempt", self._attempt(record)),
            ("created", Text(fmt_clock(record.created_at))),
            ("started", Text(fmt_clock(record.started_at))),
            ("finished", Text(fmt_clock(record.finished_at))),
            ("duration", Text(duration)),
            ("key", Text(printable(record.key or DASH))),
            ("source", Text(printable(record.source))),
            ("node", Text(printable(record.node or DASH))),
        ]
        for label, value in rows:
            grid.add_row(label, value)
        return grid

    @staticmethod
    def _attempt(record: RunRecord) -> Text:
        """"2 of 3": the attempt and the tries it may take (see :func:`attempt_budget`), and
        how many were lost with their node when the record says (a store's record does)."""
        text = Text(f"{record.attempt} of {attempt_budget(record)}")
        lost = getattr(record, "lost_count", 0)
        if isinstance(lost, int) and lost > 0:
            text.append(f" ({lost} lost with {'its node' if lost == 1 else 'their nodes'})", style="dim")
        return text

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
            parts.append(printable(progress.message))
        shown = " · ".join(parts)
        if self._progress_key != (shown,):
            self._progress_key = (shown,)
            message.update(Text(shown, style="italic"))
        self.query_one("#run-detail-progress-row").display = fraction is not None or bool(parts)

    def _show_result(self, record: RunRecord) -> None:
        section = self.query_one("#run-detail-result-section")
        has_result = record.status is RunStatus.SUCCEEDED or record.result is not None
        section.display = has_result
        if has_result:
            self._result = self._show_json("#run-detail-result", record.result, self._result)

    def _show_json(self, part: str, value: Any, shown: tuple[Any, str] | None) -> tuple[Any, str]:
        """Show ``value`` as JSON in ``part`` unless it is there already (``shown``: the value and
        text shown last). Told apart by their text: ``True``, ``1`` and ``1.0`` are equal in
        Python, and a run's ``true`` must not stay on screen for the next run's ``1``."""
        if shown is not None and shown[0] is value:
            return shown
        text = pretty_json(value)
        if shown is None or shown[1] != text:
            self.query_one(part, Static).update(_json_view(text))
        return value, text

    def _show_error(self, record: RunRecord) -> None:
        error = record.error
        section = self.query_one("#run-detail-error-section")
        section.display = error is not None
        if error is None or error == self._error:
            return
        self._error = error
        self.query_one("#run-detail-error", Static).update(
            Text.assemble((printable(error.type), "bold red"), ": ", printable_lines(error.message))
        )
        traceback = self.query_one("#run-detail-traceback", Static)
        if error.traceback:
            traceback.update(_traceback_view(error.traceback))
            traceback.display = True
        else:
            traceback.display = False


def attempt_of(record: RunRecord) -> RunAttempt:
    """The record's current (or last) attempt, when nothing more is known of its history."""
    status = record.status
    if status is RunStatus.PENDING:
        outcome = "pending"
    elif status is RunStatus.FAILED and record.started_at is None:
        outcome = "failed"
    else:
        outcome = status.value
    note = f"attempts 1-{record.attempt - 1} not seen" if record.attempt > 2 else (
        "attempt 1 not seen" if record.attempt == 2 else ""
    )
    return RunAttempt(
        number=record.attempt,
        started_at=record.started_at,
        ended_at=record.finished_at,
        outcome=outcome,
        error=record.error if status is RunStatus.FAILED else None,
        note=note,
    )
