"""EventLog: the raw engine event stream, one line per event, filterable and pausable.

Pausing freezes the view, not the stream: matching events are buffered (up to
``buffer_cap``) and written when the view resumes; events beyond the cap are
counted and reported as "N events not shown" at the gap. While the widget is
not on screen nothing is rendered; the last ``max_lines`` events are kept and
drawn when it is shown again (or when the filter changes).

Routine kinds (``quiet_kinds``, by default ``lease.renewed``, which a leader
publishes several times a second) are kept but not shown unless the filter
names them; how many were held back is said under the log.

A cursor picks a line (up/down, j/k, g/G, or a click; it follows the newest
line until moved): Enter or a click posts :class:`EventLog.EventChosen` with
that line's event. Each drawn line's entry is kept beside it, bounded like
the lines, so choosing one costs nothing while events stream in.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from itertools import islice
from pathlib import Path
from typing import Any, TypeAlias

from rich.segment import Segment
from rich.text import Text
from taskwatch.engine import BaseEvent, RunError
from textual import events
from textual.binding import Binding
from textual.events import Hide, Show
from textual.message import Message
from textual.reactive import reactive
from textual.strip import Strip
from textual.widgets import RichLog

from ._format import clip, compact, fmt_bytes, fmt_clock, fmt_clock_ms, fmt_duration, printable, short_id
from ._keyed_rows import NAME_WIDTH

#: colour per event family (the part of the kind before the dot) ...
FAMILY_STYLES: dict[str, str] = {
    "run": "blue",
    "engine": "bold cyan",
    "bus": "bold red",
    "periodic": "cyan",
    "queue": "bright_blue",
    "trigger": "bright_magenta",
    "worker": "yellow",
    "lease": "bright_cyan",
    "store": "bright_cyan",
    "health": "dim",
}
#: ... and for the kinds that deserve their own
KIND_STYLES: dict[str, str] = {
    "run.started": "yellow",
    "run.succeeded": "green",
    "run.failed": "bold red",
    "run.retrying": "bold yellow",
    "run.cancelled": "magenta",
    "worker.crashed": "bold red",
    "queue.job_failed": "red",
    "queue.drain_incomplete": "red",
    "lease.lost": "bold red",
    "store.unreachable": "bold red",
    "store.reachable": "green",
    "node.superseded": "bold red",
}

_BASE_FIELDS = frozenset({"seq", "ts", "node", "kind"})
_SECONDS_FIELDS = frozenset({"duration", "delay", "restart_in", "timeout", "seconds"})
#: fields holding a wall-clock time (UNIX seconds)
_TIME_FIELDS = frozenset({"expires_at", "next_due", "due", "started_at", "finished_at", "last_run"})
#: what the log leaves out unless the filter asks for it
QUIET_KINDS = frozenset({"lease.renewed"})


def fmt_value(name: str, value: Any) -> str:
    """A field's value as people read it: clock times, byte sizes, durations, grouped digits."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        if name in _TIME_FIELDS or name.endswith("_at"):
            return fmt_clock(value)
        if name in _SECONDS_FIELDS:
            return fmt_duration(value)
        if name.endswith("_bytes"):
            return fmt_bytes(value)
        if name.endswith("_ms"):
            return f"{value:.1f}ms" if isinstance(value, float) else f"{value}ms"
        if name.endswith("_percent"):
            return f"{value:.1f}%"
        if isinstance(value, int) or float(value).is_integer() and abs(value) >= 1e4:
            return f"{int(value):,}"
        return f"{value:,.1f}" if abs(value) >= 100 else f"{round(value, 3):g}"
    return compact(value)


def kind_style(kind: str) -> str:
    style = KIND_STYLES.get(kind)
    if style is None:
        style = FAMILY_STYLES.get(kind.partition(".")[0], "")
    return style


def summarize(event: BaseEvent, limit: int = 160) -> str:
    """The event's own fields as ``name=value`` pairs: short ids, truncated values, and
    fields still at their default left out (``attempt=2`` is news, ``attempt=1`` is not)."""
    parts: list[str] = []
    for name, field in type(event).model_fields.items():
        if name in _BASE_FIELDS:
            continue
        value: Any = getattr(event, name)
        if value is None or value == {} or value == [] or (not field.is_required() and value == field.default):
            continue
        if name == "run_id" or name.endswith("_run_id"):
            parts.append(f"{name.removesuffix('_id')}={printable(short_id(value))}")
        elif isinstance(value, RunError):
            parts.append(f"{name}={compact(f'{value.type}: {value.message}', 60)}")
        else:
            parts.append(f"{name}={fmt_value(name, value)}")
    line = " ".join(parts)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def format_event(event: BaseEvent, show_node: bool = False) -> Text:
    kind: str = getattr(event, "kind", type(event).__name__)
    # a cluster-wide log names the node each event came from instead of its number (a long id
    # clipped as in the Nodes view, so the event's own text stays in sight: its JSON has it whole)
    # one line per event: the log maps its lines to events by position
    where = (f"{clip(printable(event.node), NAME_WIDTH):<12}", "bold") if show_node else (f"#{event.seq:<6}", "dim")
    return Text.assemble(
        (fmt_clock_ms(event.ts), "dim"),
        " ",
        where,
        " ",
        (f"{kind:<22}", kind_style(kind)),
        " ",
        summarize(event),
    )


class _Gap:
    """A marker in the history (or only on screen): this many events were not shown."""

    __slots__ = ("count", "why")

    def __init__(self, count: int, why: str = "pause buffer full") -> None:
        self.count = count
        self.why = why

    def text(self) -> Text:
        noun = "event" if self.count == 1 else "events"
        return Text(f"⋯ {self.count:,} {noun} not shown ({self.why}) ⋯", style="bold yellow")


_Entry: TypeAlias = BaseEvent | _Gap


class EventLog(RichLog):
    """The event stream: ``add_events(batch)``, ``set_filter(kinds)``, ``paused``; Enter opens a line."""

    DEFAULT_CSS = Path(__file__).with_suffix(".tcss").read_text(encoding="utf-8")
    COMPONENT_CLASSES = {"event-log--cursor"}

    BINDINGS = [
        Binding("up,k", "cursor_up", "Up", show=False),
        Binding("down,j", "cursor_down", "Down", show=False),
        Binding("home,g", "cursor_first", "Oldest", show=False),
        Binding("end,G", "cursor_last", "Newest", show=False),
        Binding("enter", "choose", "Event JSON"),
    ]

    class EventChosen(Message):
        """An event's line was chosen with Enter or a click."""

        def __init__(self, log: EventLog, event: BaseEvent) -> None:
            self.log = log
            self.event = event
            super().__init__()

        @property
        def control(self) -> EventLog:
            return self.log

    paused: reactive[bool] = reactive(False)

    def __init__(
        self,
        *,
        max_lines: int = 2000,
        buffer_cap: int | None = None,
        draw_cap: int = 300,
        kinds: Iterable[str] | None = None,
        show_node: bool = False,
        quiet_kinds: Iterable[str] = QUIET_KINDS,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(
            max_lines=max_lines, wrap=False, markup=False, highlight=False,
            name=name, id=id, classes=classes, disabled=disabled,
        )
        #: how many events a paused view holds before counting the rest as not shown
        self.buffer_cap = buffer_cap if buffer_cap is not None else max_lines
        #: the most lines one batch draws (a flood's newest, after a marker for the rest)
        self.draw_cap = draw_cap
        self._history: deque[_Entry] = deque(maxlen=max_lines)
        self._pending: deque[BaseEvent] = deque()
        self._not_shown = 0
        #: events that arrived while paused: the newest entries of the history, not drawn yet
        self._held = 0
        self._kinds: tuple[frozenset[str], tuple[str, ...]] | None = None
        self._match_cache: dict[str, bool] = {}
        self._on_screen = False
        # What a hidden log owes its view: the newest `_backlog` history entries, or a
        # full redraw after a filter change (or before the first showing).
        self._backlog = 0
        self._full_redraw = True
        self.total_events = 0
        #: name each event's node instead of its number (a log of several nodes' events)
        self.show_node = show_node
        self.quiet_kinds = frozenset(quiet_kinds)
        #: quiet events kept out of sight so far (said under the log)
        self.quiet_hidden = 0
        #: what each drawn line shows, in line order (bounded like the lines)
        self._shown: deque[_Entry] = deque(maxlen=max_lines)
        #: lines that went off the top since the last clear: _shown[0] is line number _dropped
        self._dropped = 0
        #: the chosen line's number (counting from the last clear), or None: the newest line
        self._cursor: int | None = None
        if kinds is not None:
            self.set_filter(kinds)

    # ------------------------------------------------------------ public API

    @property
    def buffered(self) -> int:
        """Events waiting for the view to resume."""
        return len(self._pending)

    @property
    def not_shown(self) -> int:
        """Events dropped from the pause buffer since the view was paused."""
        return self._not_shown

    @property
    def filter_kinds(self) -> frozenset[str] | None:
        if self._kinds is None:
            return None
        exact, prefixes = self._kinds
        return exact | frozenset(prefixes)

    def matches(self, kind: str) -> bool:
        """Whether events of ``kind`` pass the filter."""
        cached = self._match_cache.get(kind)
        if cached is None:
            if self._kinds is None:
                cached = kind not in self.quiet_kinds
            else:
                exact, prefixes = self._kinds
                cached = kind in exact or kind.startswith(prefixes)
            self._match_cache[kind] = cached
        return cached

    def set_filter(self, kinds: str | Iterable[str] | None) -> None:
        """Show only these kinds: exact ("run.failed") or prefixes ("run." or "run.*").

        ``None`` (or an empty set) shows everything; one kind may be given as a plain
        string. The kept history is redrawn. Raises ``TypeError`` for kinds that are no
        strings; then the filter stays.
        """
        if kinds is None:
            new = None
        else:
            if isinstance(kinds, str):
                kinds = (kinds,)  # one kind, not its letters
            elif not isinstance(kinds, Iterable):
                raise TypeError(f"EventLog.set_filter: kinds must be a str or strings, got {kinds!r:.80}; the filter stays")
            exact: set[str] = set()
            prefixes: list[str] = []
            for kind in kinds:
                if not isinstance(kind, str):
                    raise TypeError(f"EventLog.set_filter: kinds must be strings, got {kind!r:.80}; the filter stays")
                kind = kind.strip()
                if kind.endswith("*"):
                    kind = kind[:-1]
                if kind.endswith("."):
                    prefixes.append(kind)
                elif kind:
                    exact.add(kind)
            new = (frozenset(exact), tuple(sorted(prefixes))) if exact or prefixes else None
        if new == self._kinds:
            return
        self._kinds = new
        self._match_cache.clear()
        self._redraw()

    def add_events(self, events: Iterable[BaseEvent]) -> None:
        """Append a batch of events (one write for the whole batch).

        Raises ``TypeError`` for a batch holding anything but events (each with a ``kind``
        string, as every event class of the engine has), and adds none of it: kept in the
        history, one would break every later redraw (a filter change)."""
        events = list(events)
        for i, event in enumerate(events):
            if not isinstance(event, BaseEvent):
                raise TypeError(f"EventLog.add_events takes events; item {i} is {type(event).__name__}: {event!r:.80}")
            if not isinstance(getattr(event, "kind", None), str):
                raise TypeError(
                    f"EventLog.add_events takes events with a kind (a str, such as 'run.failed'); item {i} is "
                    f"{type(event).__name__} without one: {event!r:.80}; give an event class of taskwatch.engine.events"
                    " or a subclass of BaseEvent with a kind field"
                )
        fresh: list[_Entry] = []
        if self.paused:
            pending = self._pending
            history = self._history
            for event in events:
                self.total_events += 1
                # into the history as it comes, matching or not: a filter change redraws the
                # history, which must keep the order events came in
                history.append(event)
                self._held += 1
                if not self.matches(event.kind):
                    continue
                if len(pending) >= self.buffer_cap:
                    pending.popleft()  # keep the newest: the gap sits where the marker will be
                    self._not_shown += 1
                pending.append(event)
            return
        quiet = self.quiet_kinds
        hidden = 0
        for event in events:
            self.total_events += 1
            self._history.append(event)
            fresh.append(event)
            if event.kind in quiet and not self.matches(event.kind):
                hidden += 1
        if hidden:
            self.quiet_hidden += hidden
            self._say_quiet()
        self._render_entries(fresh, cap=self.draw_cap)

    def _say_quiet(self) -> None:
        kinds = ", ".join(sorted(self.quiet_kinds))
        first = sorted(self.quiet_kinds)[0].partition(".")[0] + "."
        self.border_subtitle = f"{self.quiet_hidden:,} {kinds} not shown · filter {first} to see them"

    @property
    def cursor_index(self) -> int | None:
        """The chosen line's position among the lines drawn now (None when there are none, or
        when the chosen line went off the top: no other line is taken for it)."""
        if not self._shown:
            return None
        if self._cursor is None:
            return len(self._shown) - 1
        if self._cursor < self._dropped:
            return None
        return self._cursor - self._dropped

    @property
    def chosen(self) -> BaseEvent | None:
        """The event on the cursor's line (None on a gap marker or an empty log)."""
        index = self.cursor_index
        entry = None if index is None else self._shown[index]
        return entry if isinstance(entry, BaseEvent) else None

    def clear(self) -> EventLog:
        super().clear()
        self._shown.clear()
        self._dropped = 0
        self._cursor = None
        self.auto_scroll = True
        return self

    def clear_events(self) -> None:
        self._history.clear()
        self._pending.clear()
        self._not_shown = 0
        self._held = 0
        self._backlog = 0
        self.clear()

    def toggle_pause(self) -> None:
        self.paused = not self.paused

    # ------------------------------------------------------------ internals

    def watch_paused(self, paused: bool) -> None:
        if paused:
            return
        held = min(self._held, len(self._history))
        self._held = 0
        if not self._on_screen:
            # drawn from the history when shown: the held events are its newest entries
            self._backlog += held
            self._pending.clear()
            self._not_shown = 0
            return
        # the gap marker is for this view only: the events it stands for are in the history,
        # so a redraw shows them
        entries: list[_Entry] = []
        if self._not_shown:
            entries.append(_Gap(self._not_shown))
        entries.extend(self._pending)
        self._pending.clear()
        self._not_shown = 0
        self._render_entries(entries)

    def _render_entries(self, entries: list[_Entry], cap: int | None = None) -> None:
        """Draw ``entries``; with ``cap``, a batch with more lines than that (a flood) draws its
        newest ``cap`` after a marker saying how many it left out: formatting every line of a
        flood, most of which scrolled away at once, was most of what the log cost a frame."""
        if not self._on_screen:
            self._backlog += len(entries)  # drawn when shown
            return
        if cap is not None and len(entries) > cap:
            matching = [e for e in entries if isinstance(e, _Gap) or self.matches(e.kind)]
            if len(matching) > cap:
                entries = [_Gap(len(matching) - cap, "arriving faster than drawn; pause or filter to read them"),
                           *matching[-cap:]]  # fmt: skip
        lines: list[Text] = []
        drawn: list[_Entry] = []
        for entry in entries[-(self.max_lines or len(entries)) :]:
            if isinstance(entry, _Gap):
                lines.append(entry.text())
                drawn.append(entry)
            elif self.matches(entry.kind):
                lines.append(format_event(entry, self.show_node))
                drawn.append(entry)
        if lines:
            # one write per batch: RichLog re-slices its line list on every write at the cap
            self.write(Text("\n").join(lines))
            for entry in drawn:
                if len(self._shown) == self._shown.maxlen:
                    self._dropped += 1
                self._shown.append(entry)

    def _redraw(self) -> None:
        self.clear()
        history = list(self._history)
        held = min(self._held, len(history))
        if held:
            # paused: the view shows what came before the pause; what came since is drawn
            # at the resume, as far as the filter (maybe new) lets it
            history, arrived = history[: len(history) - held], history[len(history) - held :]
            matching = [e for e in arrived if isinstance(e, BaseEvent) and self.matches(e.kind)]
            self._not_shown = max(0, len(matching) - self.buffer_cap)
            self._pending = deque(matching[self._not_shown :])
        if not self._on_screen:
            self._full_redraw = True
            self._backlog = 0
            return
        self._render_entries(history)

    def on_show(self, event: Show) -> None:
        self._on_screen = True
        if self._full_redraw:
            self._full_redraw = False
            self._backlog = 0
            self._redraw()
        elif self._backlog:
            # the lines drawn before hiding are still right: only append what came since
            # (and before a pause: what came during it waits for the resume)
            history = self._history
            end = len(history) - min(self._held, len(history))
            backlog = min(self._backlog, end)
            self._backlog = 0
            self._render_entries(list(islice(history, end - backlog, end)))

    def on_hide(self, event: Hide) -> None:
        self._on_screen = False

    # ------------------------------------------------------------ the cursor

    def _move_to(self, index: int) -> None:
        last = len(self._shown) - 1
        if last < 0:
            return
        index = max(0, min(index, last))
        # on the newest line the cursor follows new lines again
        self._cursor = None if index == last else self._dropped + index
        self.auto_scroll = self._cursor is None
        height = self.scrollable_content_region.height
        top = round(self.scroll_offset.y)
        if index < top:
            self.scroll_to(y=index, animate=False, immediate=True)
        elif height and index >= top + height:
            self.scroll_to(y=index - height + 1, animate=False, immediate=True)
        self.refresh()

    def action_cursor_up(self) -> None:
        index = self.cursor_index
        if index is not None:
            self._move_to(index - 1)
        else:
            self._move_to(0)  # the chosen line went off the top: start again from the oldest

    def action_cursor_down(self) -> None:
        index = self.cursor_index
        if index is not None:
            self._move_to(index + 1)
        else:
            self._move_to(0)

    def action_cursor_first(self) -> None:
        self._move_to(0)

    def action_cursor_last(self) -> None:
        self._move_to(len(self._shown) - 1)

    def action_choose(self) -> None:
        event = self.chosen
        if event is not None:
            self.post_message(self.EventChosen(self, event))

    def on_click(self, event: events.Click) -> None:
        offset = event.get_content_offset(self)
        if offset is None or len(self._shown) != len(self.lines):
            return
        index = round(self.scroll_offset.y) + offset.y
        if 0 <= index < len(self._shown):
            self._move_to(index)
            self.action_choose()

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        if not self.has_focus or len(self._shown) != len(self.lines):
            return strip
        if round(self.scroll_offset.y) + y != self.cursor_index:
            return strip
        # over the log's own background, which every segment carries by now
        style = self.get_component_rich_style("event-log--cursor")
        return Strip(Segment.apply_style(strip, post_style=style), strip.cell_length)
