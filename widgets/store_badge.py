"""StoreBadge: which engine the dashboard watches, where its runs live, and how it is reached."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ._format import fmt_duration, printable


def shorten_middle(text: str, limit: int) -> str:
    """``text`` cut in its middle to ``limit`` characters; a path keeps its file name whole
    when there is room for it (``sqlite:/var/…/runs.db``)."""
    if len(text) <= limit:
        return text
    if limit <= 1:
        return "…"[:limit]
    name = text[text.rfind("/") :] if "/" in text else ""
    if name and len(name) + 2 <= limit:
        return f"{text[: limit - 1 - len(name)]}…{name}"
    head = (limit - 1) // 2
    tail = limit - 1 - head
    return f"{text[:head]}…{text[-tail:] if tail else ''}"


class StoreBadge(Widget):
    """One line: ``store sqlite:/var/app/runs.db · via tcp://127.0.0.1:7070 · incarnation 3f2a91c4``.

    Long store locations are shortened in the middle to fit, so the file name stays readable.
    """

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")

    store: reactive[str] = reactive("")
    incarnation: reactive[str] = reactive("")
    #: how the dashboard reaches the engine: "in-process" or the address attached to
    via: reactive[str] = reactive("")
    #: whole seconds the engine has not reached its store (stepped down: it claims and leads
    #: nothing); None while it reaches it
    cut_off_for: reactive[int | None] = reactive(None)

    def update(self, store: str, incarnation: str, via: str) -> None:
        """Show ``store`` (its description), ``incarnation`` and ``via``; ``TypeError`` for a
        value that is not text, and nothing changes (drawn, it would fail at the next repaint)."""
        for name, value in (("store", store), ("incarnation", incarnation), ("via", via)):
            if not isinstance(value, str):
                raise TypeError(f"StoreBadge.update: {name} is text; got {type(value).__name__}: {value!r:.80}")
        self.store = store
        self.incarnation = incarnation
        self.via = via

    def show_cut_off(self, seconds: float | None) -> None:
        """Say that the engine cannot reach its store, for ``seconds`` (an engine's
        ``stats().cut_off_for``); None: it reaches it."""
        if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))):
            raise TypeError(f"StoreBadge.show_cut_off: seconds is a number or None; got {type(seconds).__name__}")
        self.cut_off_for = None if seconds is None or seconds != seconds else int(seconds)

    def render(self) -> Text:
        width = max(1, self.content_region.width or 80)
        # what gives way first when the line is short: the incarnation, then how it is reached
        # escaped before measuring: a remote engine describes its own store and incarnation
        extras: list[tuple[str, str]] = []
        if self.via:
            extras.append(("via", printable(self.via)))
        if self.incarnation:
            extras.append(("incarnation", printable(self.incarnation[:8])))
        store = printable(self.store) or "?"
        # said first, whatever else gives way: the engine runs, but does no work
        warning = "" if self.cut_off_for is None else f"✖ OUT OF REACH {fmt_duration(self.cut_off_for)} "
        while True:
            tail = "".join(f" · {label} {value}" for label, value in extras)
            room = width - len(warning) - len("store ") - len(tail)
            if room >= min(len(store), 20) or not extras:
                break
            extras.pop()
        text = Text(no_wrap=True, overflow="ellipsis")
        if warning:
            text.append(warning, style="bold red")
        text.append("store ", style="dim")
        text.append(shorten_middle(store, max(1, room)), style="bold" if self.store else "dim")
        for label, value in extras:
            text.append(f" · {label} ", style="dim")
            text.append(value)
        return text
