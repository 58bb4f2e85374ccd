"""HealthSparklines: CPU, memory, loop lag, throughput and failures over the last minutes."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widget import Widget
from textual.widgets import Label, Sparkline

from ._format import fmt_bytes

if TYPE_CHECKING:
    # not re-exported by taskwatch.engine; only needed for annotations
    from taskwatch.engine.events import HealthSample


@dataclass(frozen=True, slots=True)
class Metric:
    key: str
    label: str
    value: Callable[[HealthSample], float]
    text: Callable[[HealthSample], str]


class HealthSparklines(Widget):
    """One sparkline per health metric with its current value beside it."""

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    METRICS: ClassVar[tuple[Metric, ...]] = (
        Metric("cpu", "CPU", lambda s: s.cpu_percent, lambda s: f"{s.cpu_percent:.1f}%"),
        Metric("rss", "memory", lambda s: s.rss_bytes / 1_048_576, lambda s: fmt_bytes(s.rss_bytes)),
        Metric("lag", "loop lag", lambda s: s.loop_lag_ms, lambda s: f"{s.loop_lag_ms:.1f} ms"),
        Metric("throughput", "finished", lambda s: s.finished_per_s, lambda s: f"{s.finished_per_s:.1f}/s"),
        Metric("failed", "failed", lambda s: s.failed_per_s, lambda s: f"{s.failed_per_s:.1f}/s"),
    )

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
        self._last: HealthSample | None = None

    def compose(self) -> ComposeResult:
        for metric in self.METRICS:
            with Horizontal(classes="health-row", id=f"health-{metric.key}"):
                yield Label(metric.label, classes="health-name")
                yield Sparkline([], classes="health-spark", id=f"health-spark-{metric.key}")
                yield Label("—", classes="health-value", id=f"health-value-{metric.key}")

    @property
    def last_sample(self) -> HealthSample | None:
        return self._last

    def history(self, metric: str) -> list[float]:
        """The kept values of one metric (oldest first); ``metric`` is a METRICS key."""
        return list(self._history[metric])

    def add_sample(self, sample: HealthSample) -> None:
        """Append one sample; the oldest falls off once ``history`` samples are kept."""
        self._last = sample
        for metric in self.METRICS:
            self._history[metric.key].append(float(metric.value(sample)))
        if not self.is_mounted:
            return  # values are kept and drawn on mount
        self._redraw()

    def on_mount(self) -> None:
        if self._last is not None:
            self._redraw()

    def _redraw(self) -> None:
        sample = self._last
        if sample is None:
            return
        for metric in self.METRICS:
            self.query_one(f"#health-spark-{metric.key}", Sparkline).data = list(self._history[metric.key])
            self.query_one(f"#health-value-{metric.key}", Label).update(metric.text(sample))
