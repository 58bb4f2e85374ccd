"""CountsBar: runs by status, dropped events and the view's pause state on one line."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ._format import STATUS_STYLES

_ORDER = ("pending", "running", "succeeded", "failed", "cancelled")


class CountsBar(Widget):
    """One line: ``pending 3  running 2  succeeded 10 … │ dropped 4 │ ⏸ paused (12 buffered)``."""

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    by_status: reactive[dict[str, int]] = reactive(dict)
    dropped: reactive[int] = reactive(0)
    paused: reactive[bool] = reactive(False)
    buffered: reactive[int] = reactive(0)

    def update(
        self,
        by_status: dict[str, int],
        dropped: int,
        paused: bool,
        view_paused_buffered: int = 0,
    ) -> None:
        # reactives compare before repainting, so an unchanged update costs nothing
        self.by_status = dict(by_status)
        self.dropped = dropped
        self.paused = paused
        self.buffered = view_paused_buffered

    def render(self) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        counts = self.by_status
        names = [*_ORDER, *sorted(k for k in counts if k not in _ORDER)]
        for index, status in enumerate(names):
            if index:
                text.append("  ")
            count = counts.get(status, 0)
            text.append(status, style=STATUS_STYLES.get(status, "") if count else "dim")
            text.append(f" {count}", style="bold" if count else "dim")
        if self.dropped:
            text.append("  │  ", style="dim")
            text.append(f"dropped {self.dropped} events", style="bold red")
        if self.paused:
            text.append("  │  ", style="dim")
            text.append("⏸ paused", style="bold yellow")
            if self.buffered:
                text.append(f" ({self.buffered} buffered)", style="yellow")
        return text
