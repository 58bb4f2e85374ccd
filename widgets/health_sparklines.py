"""HealthSparklines: CPU, memory, loop lag, threads, open files, queue depth, throughput and
failures over the last minutes: a graph per metric with its current value, its range over
the window, and a time axis under the graphs."""

from __future__ import annotations

from bisect import bisect_right
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal, Vertical
from textual.reactive import reactive
from textual.widget import Widget
from textual.widgets import Label, Sparkline, Static

from ._format import fmt_bytes, fmt_duration

if TYPE_CHECKING:
    # only needed for annotations (taskwatch.engine exports it too)
    from taskwatch.engine.events import HealthSample


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    value: Callable[[HealthSample], float]
    text: Callable[[HealthSample], str]
    #: the same unit as ``text``, for the window's minimum and maximum
    scale: Callable[[float], str]


def _mib(value: float) -> str:
    return fmt_bytes(value * 1_048_576)


class HealthSparklines(Widget):
    """One graph per health metric: current value, min and max over the kept window, and a
    time axis saying how far back the graphs reach.

    ``paused`` freezes the graphs, not the history: samples added meanwhile are kept (up to
    ``history``) and drawn when it is set back to False.
    """

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    METRICS: ClassVar[tuple[Metric, ...]] = (
        Metric("cpu", "CPU", lambda s: s.cpu_percent, lambda s: f"{s.cpu_percent:.1f}%", lambda v: f"{v:.1f}%"),
        Metric("rss", "memory", lambda s: s.rss_bytes / 1_048_576, lambda s: fmt_bytes(s.rss_bytes), _mib),
        Metric("lag", "loop lag", lambda s: s.loop_lag_ms, lambda s: f"{s.loop_lag_ms:.1f} ms", lambda v: f"{v:.1f} ms"),
        Metric("threads", "threads", lambda s: s.threads, lambda s: str(s.threads), lambda v: f"{v:.0f}"),
        Metric("fds", "open files", lambda s: s.open_fds, lambda s: str(s.open_fds), lambda v: f"{v:.0f}"),
        Metric("queue", "queued", lambda s: s.queue_depth, lambda s: f"{s.queue_depth:,}", lambda v: f"{v:,.0f}"),
        Metric("throughput", "finished", lambda s: s.finished_per_s, lambda s: f"{s.finished_per_s:.1f}/s",
               lambda v: f"{v:.1f}/s"),
        Metric("failed", "failed", lambda s: s.failed_per_s, lambda s: f"{s.failed_per_s:.1f}/s",
               lambda v: f"{v:.1f}/s"),
    )

    paused: reactive[bool] = reactive(False, init=False)

    def __init__(
        self,
        *,
        history: int = 300,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        if history < 1:
            raise ValueError(f"history must be at least 1, got {history}")
        self.history_size = history
        self._history: dict[str, deque[float]] = {m.key: deque(maxlen=history) for m in self.METRICS}
        self._times: deque[float] = deque(maxlen=history)
        self._last: HealthSample | None = None

    def compose(self) -> ComposeResult:
        for metric in self.METRICS:
            with Horizontal(classes="health-row", id=f"health-{metric.key}"):
                yield Label(metric.label, classes="health-name")
                yield Sparkline([], classes="health-spark", id=f"health-spark-{metric.key}")
                with Vertical(classes="health-figures"):
                    yield Label("—", classes="health-value", id=f"health-value-{metric.key}")
                    yield Label("", classes="health-range", id=f"health-range-{metric.key}")
        with Horizontal(classes="health-row health-axis-row"):
            yield Label("", classes="health-name")
            yield Static("", id="health-axis", classes="health-axis")
            yield Label("", classes="health-figures")

    @property
    def last_sample(self) -> HealthSample | None:
        return self._last

    def history(self, metric: str) -> list[float]:
        """The kept values of one metric (oldest first); ``metric`` is a METRICS key."""
        return list(self._history[metric])

    @property
    def span(self) -> float:
        """Seconds between the oldest and the newest kept sample (what the graphs cover)."""
        return self._times[-1] - self._times[0] if len(self._times) > 1 else 0.0

    def add_sample(self, sample: HealthSample) -> None:
        """Add one sample in time order; the oldest falls off once ``history`` samples are
        kept. A sample older than the newest (delivered late) goes where its time puts it,
        or nowhere when it is older than the whole full window."""
        times = self._times
        index = bisect_right(times, sample.ts)
        if index < len(times):
            if index == 0 and len(times) == self.history_size:
                return  # it would be the first to fall off
            self._insert(index, sample)
        else:
            self._last = sample
            times.append(sample.ts)
            for metric in self.METRICS:
                self._history[metric.key].append(float(metric.value(sample)))
        if not self.is_mounted or self.paused:
            return  # values are kept and drawn on mount, or on resume
        self._redraw()

    def _insert(self, index: int, sample: HealthSample) -> None:
        # deque.insert refuses a full deque: make room at the old end first
        full = len(self._times) == self.history_size
        if full:
            index -= 1
        for values, value in (
            (self._times, sample.ts),
            *((self._history[metric.key], float(metric.value(sample))) for metric in self.METRICS),
        ):
            if full:
                values.popleft()
            values.insert(index, value)

    def watch_paused(self, paused: bool) -> None:
        if not paused and self.is_mounted:
            self._redraw()

    def on_mount(self) -> None:
        if self._last is not None:
            self._redraw()

    def axis_text(self, width: int) -> Text:
        """``-5m00s ·········· -2m30s ·········· now`` across ``width`` cells."""
        span = self.span
        left = f"-{fmt_duration(span)}" if span else ""
        middle = f"-{fmt_duration(span / 2)}" if span else ""
        right = "now"
        # too narrow for every label with room between them: the middle goes first, then the
        # left (a graph of a few cells under "-1.1s-0.5snow" read as nothing)
        if len(left) + len(middle) + len(right) + 2 > width:
            middle = ""
        if len(left) + len(right) + 1 > width:
            left = ""
        if len(right) > width:
            right = ""
        room = max(0, width - len(left) - len(middle) - len(right))
        gap1, gap2 = room // 2, room - room // 2
        return Text(f"{left}{' ' * gap1}{middle}{' ' * gap2}{right}", style="dim", no_wrap=True)

    def _redraw(self) -> None:
        sample = self._last
        if sample is None:
            return
        for metric in self.METRICS:
            values = self._history[metric.key]
            self.query_one(f"#health-spark-{metric.key}", Sparkline).data = list(values)
            self.query_one(f"#health-value-{metric.key}", Label).update(metric.text(sample))
            self.query_one(f"#health-range-{metric.key}", Label).update(
                Text(f"{metric.scale(min(values))}–{metric.scale(max(values))}", style="dim")
            )
        axis = self.query_one("#health-axis", Static)
        axis.update(self.axis_text(axis.size.width or 60))

    def on_resize(self) -> None:
        if self._last is not None:
            axis = self.query_one("#health-axis", Static)
            axis.update(self.axis_text(axis.size.width or 60))
