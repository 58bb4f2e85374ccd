"""Rendering for notebooks and terminals: compact HTML and Rich views of engines and runs.

``_repr_html_`` (Jupyter) and ``__rich__`` (Rich consoles, IPython with
Rich's pretty printer) on :class:`~taskwatch.engine.Engine`,
:class:`~taskwatch.engine.runs.RunRecord`, run lists and the background
engine all end up here. The HTML uses inline styles only (notebook front ends
strip or scope ``<style>`` differently) and escapes every piece of user data:
task names, params, error messages and progress messages are all
attacker-controllable text as far as a browser is concerned.
"""

from __future__ import annotations

import html
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import EngineInAnotherProcess
from .hop import call_blocking
from .runs import EngineStats, RunRecord, RunStatus

if TYPE_CHECKING:
    from rich.console import RenderableType

    from .engine import Engine

T = TypeVar("T")

#: runs shown in an engine's view, newest first
RECENT_RUNS = 10
#: failed runs listed with their error line
RECENT_FAILURES = 5

_STATUS_ORDER = (
    RunStatus.PENDING,
    RunStatus.RUNNING,
    RunStatus.SUCCEEDED,
    RunStatus.FAILED,
    RunStatus.CANCELLED,
)

_HTML_COLOURS = {
    RunStatus.PENDING: "#8a8a8a",
    RunStatus.RUNNING: "#1f6feb",
    RunStatus.SUCCEEDED: "#1a7f37",
    RunStatus.FAILED: "#cf222e",
    RunStatus.CANCELLED: "#9a6700",
}

_RICH_STYLES = {
    RunStatus.PENDING: "dim",
    RunStatus.RUNNING: "bold blue",
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "bold red",
    RunStatus.CANCELLED: "yellow",
}


@dataclass(frozen=True, slots=True)
class EngineView:
    """What an engine's rendering shows, gathered in one go on the engine's thread."""

    node_id: str
    state: str
    stats: EngineStats
    recent: list[RunRecord]
    failures: list[RunRecord]


@dataclass(frozen=True, slots=True)
class BusyEngineView:
    """An engine whose loop did not answer in time: what its rendering says instead."""

    node_id: str
    state: str
    timeout: float


@dataclass(frozen=True, slots=True)
class ForkedEngineView:
    """An engine that runs in the process this one was forked from: nothing here can read it."""

    node_id: str
    #: the process the engine runs in
    started_in: int
    #: this process
    pid: int


#: what an engine's rendering can show
AnyEngineView = EngineView | BusyEngineView | ForkedEngineView

#: seconds a rendering waits for the engine's loop before it shows the engine as busy
DISPLAY_TIMEOUT = 5.0


def engine_view(engine: Engine) -> AnyEngineView:
    """Gather an :class:`EngineView`, hopping to the engine's loop thread if another thread owns it.

    A loop that does not answer within :data:`DISPLAY_TIMEOUT` (a task running
    blocking code on it) gives a :class:`BusyEngineView`: a display that raised
    would fail its notebook cell, and stop a "Run All" there. In a fork of the
    process the engine runs in, a :class:`ForkedEngineView`, at once: no thread
    here runs its loop, so waiting could only end in "busy".
    """
    timeout = DISPLAY_TIMEOUT
    try:
        return on_engine_thread(engine, _gather, timeout=timeout)
    except TimeoutError:
        # node_id and state are plain attributes: read here without the loop
        return BusyEngineView(node_id=engine.node_id, state=engine.state, timeout=timeout)
    except EngineInAnotherProcess as exc:
        return ForkedEngineView(node_id=engine.node_id, started_in=exc.started_in, pid=os.getpid())


def _gather(engine: Engine) -> EngineView:
    return EngineView(
        node_id=engine.node_id,
        state=engine.state,
        stats=engine.stats(),
        recent=list(engine.runs(limit=RECENT_RUNS)),
        failures=list(engine.runs(RunStatus.FAILED, limit=RECENT_FAILURES)),
    )


def on_engine_thread(engine: Engine, fn: Callable[[Engine], T], timeout: float = 5.0) -> T:
    """Call ``fn(engine)`` where it is safe: the engine is not thread-safe.

    A notebook usually runs the engine on its own loop (same thread: call
    directly); ``start_background`` runs it on a loop in another thread (ask
    that loop and wait for the answer).
    """
    return call_blocking(engine.loop, fn, engine, timeout=timeout)


# ---------------------------------------------------------------- text helpers


def short_id(run_id: str) -> str:
    """The last 8 characters: the default run ids of one process count up, so their
    first digits are the same."""
    return run_id[-8:]


def error_line(run: RunRecord) -> str:
    """``Type: first line of the message`` -- what a list of failures shows."""
    if run.error is None:
        return ""
    first = run.error.message.strip().splitlines()[0] if run.error.message.strip() else ""
    return f"{run.error.type}: {first}" if first else run.error.type


def _fraction(run: RunRecord) -> float | None:
    """Progress in [0, 1]; None (an indeterminate bar) only for a running run without a total."""
    frac = run.progress.fraction
    if frac is not None:
        return frac
    if run.status is RunStatus.SUCCEEDED:
        return 1.0
    if run.status is RunStatus.RUNNING:
        return None
    return 0.0


def _duration(run: RunRecord, now: float) -> str:
    if run.started_at is None:
        return ""
    end = run.finished_at if run.finished_at is not None else now
    seconds = max(0.0, end - run.started_at)
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min"


def _detail(run: RunRecord) -> str:
    if run.status is RunStatus.FAILED:
        return error_line(run)
    if run.status is RunStatus.CANCELLED and run.cancel_reason:
        return f"cancelled ({run.cancel_reason})"
    return run.progress.message


def _counts(stats: EngineStats) -> dict[RunStatus, int]:
    # finished runs counted since the start, not those the history still holds: the counts
    # then add up to the "N submitted" beside them, failures evicted from the history included
    return {
        RunStatus.PENDING: stats.by_status.get(RunStatus.PENDING.value, 0),
        RunStatus.RUNNING: stats.by_status.get(RunStatus.RUNNING.value, 0),
        RunStatus.SUCCEEDED: stats.succeeded_total,
        RunStatus.FAILED: stats.failed_total,
        RunStatus.CANCELLED: stats.cancelled_total,
    }


def _counts_of(runs: Sequence[RunRecord]) -> dict[RunStatus, int]:
    counts = {status: 0 for status in _STATUS_ORDER}
    for run in runs:
        counts[run.status] += 1
    return counts


# ---------------------------------------------------------------- HTML

_e = html.escape

_BOX = (
    "font-family: var(--jp-ui-font-family, system-ui, sans-serif); font-size: 13px; "
    "border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 10px; max-width: 920px"
)
_CELL = "padding: 2px 8px; text-align: left; border-bottom: 1px solid #eaeef2"


def _badges_html(counts: dict[RunStatus, int], since_start: bool = False) -> str:
    parts = []
    for status, count in counts.items():
        if since_start and status is RunStatus.SUCCEEDED:
            # the engine's totals: runs of earlier starts the table lists (a durable store's) are not in them
            parts.append('<span style="margin-right: 6px; color: #8a8a8a">since start:</span>')
        colour = _HTML_COLOURS[status]
        parts.append(
            f'<span data-status="{status.value}" data-count="{count}" '
            f'style="display: inline-block; margin-right: 10px; color: {colour}">'
            f"{status.value}&nbsp;<b>{count}</b></span>"
        )
    return "<div>" + "".join(parts) + "</div>"


def _progress_html(run: RunRecord) -> str:
    frac = _fraction(run)
    if frac is None:
        bar = '<progress style="width: 110px"></progress>'  # indeterminate
    else:
        bar = f'<progress style="width: 110px" value="{frac:.3f}" max="1"></progress>'
    total = run.progress.total
    label = f" {run.progress.done:g}/{total:g}" if total else ""
    return bar + _e(label)


def _runs_table_html(runs: Sequence[RunRecord], now: float) -> str:
    if not runs:
        return '<div style="color: #8a8a8a">no runs yet</div>'
    head = "".join(
        f'<th style="{_CELL}">{name}</th>'
        for name in ("run", "task", "status", "progress", "time", "detail")
    )
    rows = []
    for run in runs:
        colour = _HTML_COLOURS[run.status]
        rows.append(
            "<tr>"
            f'<td style="{_CELL}"><code title="{_e(run.id)}">{_e(short_id(run.id))}</code></td>'
            f'<td style="{_CELL}">{_e(run.task)}</td>'
            f'<td style="{_CELL}; color: {colour}">{_e(run.status.value)}</td>'
            f'<td style="{_CELL}">{_progress_html(run)}</td>'
            f'<td style="{_CELL}">{_e(_duration(run, now))}</td>'
            f'<td style="{_CELL}">{_e(_detail(run))}</td>'
            "</tr>"
        )
    return (
        '<table style="border-collapse: collapse; margin-top: 6px">'
        f"<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _failures_html(failures: Sequence[RunRecord]) -> str:
    if not failures:
        return ""
    items = "".join(
        f'<li><code>{_e(short_id(run.id))}</code> {_e(run.task)}: '
        f'<span style="color: {_HTML_COLOURS[RunStatus.FAILED]}">{_e(error_line(run))}</span></li>'
        for run in failures
    )
    return f'<div style="margin-top: 6px"><b>failures</b><ul style="margin: 2px 0">{items}</ul></div>'


def _busy_text(view: BusyEngineView) -> str:
    return (
        f"busy: the engine's loop did not answer within {view.timeout:g} s (a task running blocking code "
        "on it?); display it again once it is free"
    )


def _forked_text(view: ForkedEngineView) -> str:
    return (
        f"this process (pid {view.pid}) is a fork of the one the engine runs in, which keeps its loop and "
        "thread: nothing here can show or run its runs. Start an engine after the fork in each process "
        "that needs one"
    )


def _forked_state(view: ForkedEngineView) -> str:
    return f"runs in process {view.started_in}"


def engine_html(view: AnyEngineView) -> str:
    if isinstance(view, ForkedEngineView):
        return (
            f'<div class="taskwatch-engine" data-forked="true" style="{_BOX}">'
            f"<div><b>taskwatch engine</b> <code>{_e(view.node_id)}</code> &middot; {_e(_forked_state(view))}</div>"
            f'<div style="color: {_HTML_COLOURS[RunStatus.PENDING]}">{_e(_forked_text(view))}</div></div>'
        )
    if isinstance(view, BusyEngineView):
        return (
            f'<div class="taskwatch-engine" data-busy="true" style="{_BOX}">'
            f"<div><b>taskwatch engine</b> <code>{_e(view.node_id)}</code> &middot; {_e(view.state)}</div>"
            f'<div style="color: {_HTML_COLOURS[RunStatus.CANCELLED]}">{_e(_busy_text(view))}</div></div>'
        )
    stats = view.stats
    header = (
        f"<div><b>taskwatch engine</b> <code>{_e(view.node_id)}</code> &middot; {_e(view.state)}"
        f" &middot; {stats.submitted_total} submitted since start, {stats.throughput:.2f} runs/s</div>"
    )
    return (
        f'<div class="taskwatch-engine" style="{_BOX}">'
        + header
        + _badges_html(_counts(stats), since_start=True)
        + _runs_table_html(view.recent, time.time())
        + _failures_html(view.failures)
        + "</div>"
    )


def runs_html(runs: Sequence[RunRecord]) -> str:
    failures = [run for run in runs if run.status is RunStatus.FAILED][:RECENT_FAILURES]
    return (
        f'<div class="taskwatch-runs" style="{_BOX}">'
        f"<div><b>{len(runs)} run{'' if len(runs) == 1 else 's'}</b></div>"
        + _badges_html(_counts_of(runs))
        + _runs_table_html(runs, time.time())
        + _failures_html(failures)
        + "</div>"
    )


def run_html(run: RunRecord) -> str:
    colour = _HTML_COLOURS[run.status]
    rows = [
        ("task", _e(run.task)),
        ("status", f'<span style="color: {colour}">{_e(run.status.value)}</span>'),
        ("attempt", f"{run.attempt}/{run.max_attempts}"),
        ("progress", _progress_html(run)),
        ("time", _e(_duration(run, time.time()))),
    ]
    if run.progress.message:
        rows.append(("message", _e(run.progress.message)))
    if run.params:
        rows.append(("params", f"<code>{_e(_short_json(run.params))}</code>"))
    if run.error is not None:
        rows.append(("error", f'<span style="color: {colour}">{_e(error_line(run))}</span>'))
    body = "".join(
        f'<tr><th style="{_CELL}">{name}</th><td style="{_CELL}">{value}</td></tr>'
        for name, value in rows
    )
    return (
        f'<div class="taskwatch-run" style="{_BOX}">'
        f"<div><b>run</b> <code>{_e(run.id)}</code></div>"
        f'<table style="border-collapse: collapse">{body}</table></div>'
    )


def _short_json(value: Any, limit: int = 200) -> str:
    from pydantic_core import to_json

    text = to_json(value, fallback=repr).decode()
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ---------------------------------------------------------------- Rich


def _rich_progress(run: RunRecord) -> RenderableType:
    from rich.progress_bar import ProgressBar
    from rich.table import Table
    from rich.text import Text

    frac = _fraction(run)
    bar = ProgressBar(total=None if frac is None else 1.0, completed=frac or 0.0, width=12)
    if not run.progress.total:
        return bar
    grid = Table.grid(padding=(0, 1))
    grid.add_row(bar, Text(f"{run.progress.done:g}/{run.progress.total:g}"))
    return grid


def _rich_counts(counts: dict[RunStatus, int], since_start: bool = False) -> RenderableType:
    from rich.text import Text

    text = Text()
    for status, count in counts.items():
        if since_start and status is RunStatus.SUCCEEDED:
            text.append("│ since start: ", style="dim")
        text.append(f"{status.value} ", style=_RICH_STYLES[status])
        text.append(f"{count}   ", style="bold")
    return text


def runs_rich(runs: Sequence[RunRecord], title: str | None = None) -> RenderableType:
    from rich.table import Table
    from rich.text import Text

    now = time.time()
    table = Table(title=title, expand=False, show_edge=False, pad_edge=False)
    for name in ("run", "task", "status", "progress", "time", "detail"):
        table.add_column(name, no_wrap=name != "detail")
    for run in runs:
        # Text, not str: user data must not be parsed as Rich markup
        table.add_row(
            Text(short_id(run.id), style="dim"),
            Text(run.task),
            Text(run.status.value, style=_RICH_STYLES[run.status]),
            _rich_progress(run),
            Text(_duration(run, now)),
            Text(_detail(run), style="red" if run.status is RunStatus.FAILED else ""),
        )
    return table


def _rich_failures(failures: Sequence[RunRecord]) -> RenderableType | None:
    from rich.text import Text

    if not failures:
        return None
    text = Text("failures", style="bold")
    for run in failures:
        text.append(f"\n{short_id(run.id)} ", style="dim")
        text.append(f"{run.task}: ")
        text.append(error_line(run), style="red")
    return text


def engine_rich(view: AnyEngineView) -> RenderableType:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    if isinstance(view, ForkedEngineView):
        title = Text(f"taskwatch engine {view.node_id} · {_forked_state(view)}")
        return Panel(Text(_forked_text(view), style="dim"), title=title, title_align="left", expand=False)
    if isinstance(view, BusyEngineView):
        title = Text(f"taskwatch engine {view.node_id} · {view.state}")
        return Panel(Text(_busy_text(view), style="yellow"), title=title, title_align="left", expand=False)
    parts: list[RenderableType] = [_rich_counts(_counts(view.stats), since_start=True)]
    parts.append(runs_rich(view.recent) if view.recent else Text("no runs yet", style="dim"))
    failures = _rich_failures(view.failures)
    if failures is not None:
        parts.append(failures)
    title = Text(f"taskwatch engine {view.node_id} · {view.state}")
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


def runs_list_rich(runs: Sequence[RunRecord]) -> RenderableType:
    from rich.console import Group
    from rich.panel import Panel
    from rich.text import Text

    failures = [run for run in runs if run.status is RunStatus.FAILED][:RECENT_FAILURES]
    parts: list[RenderableType] = [_rich_counts(_counts_of(runs)), runs_rich(runs)]
    extra = _rich_failures(failures)
    if extra is not None:
        parts.append(extra)
    title = Text(f"{len(runs)} run{'' if len(runs) == 1 else 's'}")
    return Panel(Group(*parts), title=title, title_align="left", expand=False)


def run_rich(run: RunRecord) -> RenderableType:
    from rich.panel import Panel
    from rich.table import Table
    from rich.text import Text

    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("task", Text(run.task))
    grid.add_row("status", Text(run.status.value, style=_RICH_STYLES[run.status]))
    grid.add_row("attempt", Text(f"{run.attempt}/{run.max_attempts}"))
    grid.add_row("progress", _rich_progress(run))
    grid.add_row("time", Text(_duration(run, time.time())))
    if run.progress.message:
        grid.add_row("message", Text(run.progress.message))
    if run.params:
        grid.add_row("params", Text(_short_json(run.params)))
    if run.error is not None:
        grid.add_row("error", Text(error_line(run), style="red"))
    return Panel(grid, title=Text(f"run {run.id}"), title_align="left", expand=False)
