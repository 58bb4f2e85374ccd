"""CountsBar: runs now and since the engine started, the finish rate, dropped events and the
view's pause state on one line.

The pause and drop indicators are laid out first and the counts get what is
left of the width (cut with an ellipsis, or left out when fewer than a few
cells are left), so "paused" and "dropped N events" stay in sight however
large the counts grow; on a terminal too narrow even for them, they shorten
(``dropped 123,456 │ ⏸ paused (950)``) before they are cut.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ._format import STATUS_STYLES

_NOW = ("pending", "running")
_FINISHED = ("succeeded", "failed", "cancelled")
_ORDER = (*_NOW, *_FINISHED)
_SEPARATOR = ("  │  ", "dim")
_NARROW_SEPARATOR = (" │ ", "dim")
#: the status names of the narrowest form
#: the fewest cells the counts are cut to beside the indicators: fewer give way to them
_LEAST_COUNTS = 6
_SHORT = {"pending": "pend", "running": "run", "succeeded": "ok", "failed": "fail", "cancelled": "canc"}


def fmt_count(count: int) -> str:
    """``10482`` -> ``10,482``: three-digit groups read at a glance."""
    return f"{count:,}"


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number of 0 or more, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be 0 or more, got {value}")


def _counts(name: str, counts: Any) -> dict[str, int]:
    if not isinstance(counts, Mapping):
        raise TypeError(f"{name} must map statuses to counts, got {type(counts).__name__}")
    for status, count in counts.items():
        if not isinstance(status, str):
            raise TypeError(f"{name} must be keyed by status names, got the key {status!r}")
        _check_count(f"{name}[{status!r}]", count)
    return dict(counts)


class CountsBar(Widget):
    """``pending 3  running 2 │ since start  succeeded 10,482  failed 19  cancelled 0 │ 12.5/s``
    then, always visible, ``dropped 4 events │ ⏸ paused (12 buffered)``.

    ``totals`` are the finished runs since the engine started (not the runs its
    history happens to keep); without them, ``by_status`` is shown as it is.
    """

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    by_status: reactive[dict[str, int]] = reactive(dict)
    totals: reactive[dict[str, int] | None] = reactive(None)
    #: runs finished per second (recent window), None when unknown
    rate: reactive[float | None] = reactive(None)
    dropped: reactive[int] = reactive(0)
    paused: reactive[bool] = reactive(False)
    buffered: reactive[int] = reactive(0)

    def update(
        self,
        by_status: dict[str, int],
        dropped: int,
        paused: bool,
        view_paused_buffered: int = 0,
        *,
        totals: dict[str, int] | None = None,
        rate: float | None = None,
    ) -> None:
        """Show these figures. Raises TypeError or ValueError, naming the bad entry, for a
        count that is not a whole number of 0 or more (or a rate that is not a number);
        nothing changes then. A bad count would otherwise only fail at the next repaint,
        taking the app down with it."""
        by_status = _counts("by_status", by_status)
        totals = None if totals is None else _counts("totals", totals)
        _check_count("dropped", dropped)
        _check_count("view_paused_buffered", view_paused_buffered)
        if not isinstance(paused, bool):
            raise TypeError(f"paused must be True or False, got {paused!r}")
        if rate is not None:
            if isinstance(rate, bool) or not isinstance(rate, (int, float)):
                raise TypeError(f"rate must be a number of runs per second or None, got {rate!r}")
            if math.isnan(rate):
                raise ValueError("rate is nan; give None when the rate is not known")
        # reactives compare before repainting, so an unchanged update costs nothing
        self.by_status = by_status
        self.totals = totals
        self.rate = None if rate is None else round(rate, 1)
        self.dropped = dropped
        self.paused = paused
        self.buffered = view_paused_buffered

    def indicators(self, compact: int = 0, *, lead: bool = True) -> Text:
        """The part that is never cut: dropped events and the paused view.

        ``compact`` 1 narrows the separators, 2 also leaves out the words "events" and
        "buffered"; ``lead=False`` leaves out the separator before the first (nothing is
        shown before it)."""
        separator = _SEPARATOR if compact == 0 else _NARROW_SEPARATOR
        parts: list[Text] = []
        if self.dropped:
            count = fmt_count(self.dropped)
            parts.append(Text(f"dropped {count} events" if compact < 2 else f"dropped {count}", style="bold red"))
        if self.paused:
            part = Text("⏸ paused", style="bold yellow")
            if self.buffered:
                count = fmt_count(self.buffered)
                part.append(f" ({count} buffered)" if compact < 2 else f" ({count})", style="yellow")
            parts.append(part)
        text = Text(no_wrap=True)
        for index, part in enumerate(parts):
            if index or lead:
                text.append(*separator)
            text.append_text(part)
        return text

    def counts(self, compact: int = 0) -> Text:
        """Runs by status: now (pending, running), then finished since start, then the rate.

        ``compact`` 1 leaves out the "since start" label and narrows the separators; 2 also
        shortens the status names (``pend 3 run 2 │ ok 10,482 fail 19 canc 0 │ 12.5/s``):
        what a narrow terminal gets rather than losing the failures off its end.
        """
        text = Text(no_wrap=True)
        counts = self.by_status
        totals = self.totals
        names = _SHORT if compact >= 2 else None
        separator = _SEPARATOR if compact == 0 else _NARROW_SEPARATOR
        if totals is None:
            order = [*_ORDER, *sorted(k for k in counts if k not in _ORDER)]
            self._append_counts(text, order, counts, names)
            return text
        self._append_counts(text, list(_NOW), counts, names)
        text.append(*separator)
        if compact == 0:
            text.append("since start ", style="dim italic")
        self._append_counts(text, list(_FINISHED), totals, names)
        if self.rate is not None:
            text.append(*separator)
            text.append(f"{self.rate:g}", style="bold")
            text.append(" finished/s" if compact == 0 else "/s", style="dim")
        return text

    @staticmethod
    def _append_counts(
        text: Text, statuses: list[str], counts: dict[str, int], names: Mapping[str, str] | None = None
    ) -> None:
        gap = "  " if names is None else " "
        for index, status in enumerate(statuses):
            if index:
                text.append(gap)
            count = counts.get(status, 0)
            shown = status if names is None else names.get(status, status)
            text.append(shown, style=STATUS_STYLES.get(status, "") if count else "dim")
            text.append(f" {fmt_count(count)}", style="bold" if count else "dim")

    def render(self) -> Text:
        indicators = self.indicators()
        width = self.content_region.width
        counts = self.counts()
        if width:
            room = width - indicators.cell_len
            for compact in (1, 2):
                if counts.cell_len <= room:
                    break
                counts = self.counts(compact)
            if counts.cell_len > room:
                if not indicators or room >= _LEAST_COUNTS:
                    counts.truncate(max(1, room), overflow="ellipsis")
                else:
                    # the indicators need (nearly) the whole width: the counts give way
                    # entirely, and the indicators narrow as far as they must to stay in sight
                    counts = Text(no_wrap=True)
                    for compact in (0, 1, 2):
                        indicators = self.indicators(compact, lead=False)
                        if indicators.cell_len <= width:
                            break
                    indicators.truncate(width, overflow="ellipsis")
        counts.append_text(indicators)
        counts.no_wrap = True
        return counts
