"""StoreBadge: which engine the dashboard watches, where its runs live, and how it is reached."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text
from textual.reactive import reactive
from textual.widget import Widget

from ._format import printable


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

    def update(self, store: str, incarnation: str, via: str) -> None:
        """Show ``store`` (its description), ``incarnation`` and ``via``; ``TypeError`` for a
        value that is not text, and nothing changes (drawn, it would fail at the next repaint)."""
        for name, value in (("store", store), ("incarnation", incarnation), ("via", via)):
            if not isinstance(value, str):
                raise TypeError(f"StoreBadge.update: {name} is text; got {type(value).__name__}: {value!r:.80}")
        self.store = store
        self.incarnation = incarnation
        self.via = via

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
        while True:
            tail = "".join(f" · {label} {value}" for label, value in extras)
            room = width - len("store ") - len(tail)
            if room >= min(len(store), 20) or not extras:
                break
            extras.pop()
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append("store ", style="dim")
        text.append(shorten_middle(store, max(1, room)), style="bold" if self.store else "dim")
        for label, value in extras:
            text.append(f" · {label} ", style="dim")
            text.append(value)
        return text
