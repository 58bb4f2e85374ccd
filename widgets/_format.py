"""Small, allocation-light formatters shared by the widgets.

They return plain strings (and Rich style names) rather than renderables so the
tables can compare cheap tuples and only build a ``Text`` for cells that changed.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any, Protocol

from rich.cells import cell_len, set_cell_size
from taskwatch.engine import RunStatus

#: Run status colours, as ``celery events`` users expect them.
STATUS_STYLES: dict[str, str] = {
    "pending": "blue",
    "running": "bold yellow",
    "succeeded": "green",
    "failed": "bold red",
    "cancelled": "magenta",
}

DASH = "—"

# What text from tasks must not hand the terminal: C0 and C1 controls and DEL (ESC, BEL and
# CSI start commands: a retitled window, colours, a cleared screen), line and paragraph
# separators, the bidirectional overrides that reorder what is drawn, and lone surrogates
# (they cannot be encoded for the terminal at all).
_OTHER_UNSAFE = r"\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_CHARS = re.compile(rf"[\x00-\x1f{_OTHER_UNSAFE}]")
#: the same, but newlines and tabs are left to a multi-line view
_UNSAFE_IN_LINES = re.compile(rf"[\x00-\x08\x0b-\x1f{_OTHER_UNSAFE}]")
_NAMED_ESCAPES = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED_ESCAPES.get(char)
    if named is not None:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: str) -> str:
    """``text`` safe to draw on one line: every control character shown as its Python escape
    (ESC as ``\\x1b``, a newline as ``\\n``), so text that came from a task can neither send
    the terminal a command nor pass for other lines. Cheap when there is nothing to escape."""
    if text.isprintable():
        return text
    return _UNSAFE_CHARS.sub(_escaped, text)


def printable_lines(text: str) -> str:
    """Like :func:`printable` for a view of several lines (a traceback): newlines stay, tabs
    become spaces, a CR before a newline goes."""
    if text.isprintable():
        return text
    if "\r\n" in text:
        text = text.replace("\r\n", "\n")
    if "\t" in text:
        text = text.expandtabs(4)
    return _UNSAFE_IN_LINES.sub(_escaped, text)


def json_text(value: Any) -> str:
    """``value`` as one line of JSON that parses back to the same value and is safe to draw:
    JSON escapes C0 controls in strings itself; what it leaves raw there (DEL, C1 such as
    CSI, the bidirectional overrides, line separators, lone surrogates) is written as a
    ``\\uXXXX`` escape too, which a JSON parser reads back as that very character."""
    text = json.dumps(value, ensure_ascii=False, default=str)
    if text.isprintable():
        return text
    # only strings in JSON can hold these, so each escape lands inside a string literal
    return _UNSAFE_CHARS.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def clip(text: str, width: int) -> str:
    """``text`` cut to at most ``width`` cells, ending in an ellipsis where it was cut."""
    if len(text) <= width // 2 or cell_len(text) <= width:
        return text
    return set_cell_size(text, width - 1).rstrip() + "…"


def status_style(status: str | None) -> str:
    return STATUS_STYLES.get(status or "", "")


def short_id(run_id: str | None, length: int = 8) -> str:
    # the end of an id tells runs apart: the default ids of one process count up, so they share their first digits
    return run_id[-length:] if run_id else DASH


#: a time or duration that cannot be written (infinite, or a time past the platform's calendar)
UNKNOWN = "?"


def fmt_clock(ts: float | None) -> str:
    """Local wall-clock time as HH:MM:SS."""
    if ts is None:
        return DASH
    try:
        return time.strftime("%H:%M:%S", time.localtime(ts))
    except (OverflowError, OSError, ValueError):
        # a widget redraws on every update: one unwritable time must not break all of them
        return UNKNOWN


def fmt_clock_ms(ts: float) -> str:
    """Local wall-clock time with milliseconds, for the event log."""
    clock = fmt_clock(ts)
    if clock == UNKNOWN:
        return clock
    return f"{clock}.{int((ts % 1) * 1000):03d}"


class _Timed(Protocol):
    """What :func:`run_duration` reads: a record, or a table's row of one."""

    @property
    def status(self) -> RunStatus: ...

    @property
    def started_at(self) -> float | None: ...

    @property
    def finished_at(self) -> float | None: ...


def run_duration(record: _Timed, now: float) -> str:
    """How long a run has taken, as shown: up to ``now`` while it runs, a dash before its
    start and while it waits for its next attempt (a retry, or a run put back by recovery,
    keeps its first start, and counting from it would make waiting look like work; the
    attempts list gives the time of each)."""
    started = record.started_at
    if started is None:
        return DASH
    finished = record.finished_at
    if finished is not None:
        return fmt_duration(finished - started)
    if record.status is not RunStatus.RUNNING:
        return DASH
    return fmt_duration(now - started)


def fmt_duration(seconds: float | None) -> str:
    """A compact duration whose resolution shrinks as it grows (so it ticks less often)."""
    if seconds is None:
        return DASH
    if not math.isfinite(seconds):
        return UNKNOWN
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f}s"
    if seconds < 60:
        return f"{int(seconds)}s"
    if seconds < 3600:
        minutes, secs = divmod(int(seconds), 60)
        return f"{minutes}m{secs:02d}s"
    if seconds < 86400:
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours}h{rest // 60:02d}m"
    days, rest = divmod(int(seconds), 86400)
    return f"{days}d{rest // 3600:02d}h"


def fmt_ago(ts: float | None, now: float) -> str:
    if ts is None:
        return DASH
    return f"{fmt_duration(now - ts)} ago"


def progress_bar(fraction: float | None, width: int = 8) -> str:
    """A text bar such as ``██████░░  75%``; an em dash when the total is unknown."""
    if fraction is None:
        return DASH
    fraction = max(0.0, min(1.0, fraction))
    filled = int(round(fraction * width))
    return f"{'█' * filled}{'░' * (width - filled)} {fraction * 100:3.0f}%"


def fmt_bytes(count: float) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"  # pragma: no cover - loop always returns


def fmt_rate(per_second: float | None) -> str:
    if per_second is None:
        return DASH
    return f"{per_second:.1f}/s"


def pretty_json(value: Any, limit: int = 20_000) -> str:
    """Indented JSON for display; anything unserialisable falls back to ``str``.

    Capped at ``limit`` characters because a huge result would otherwise cost a
    full re-highlight on every refresh.
    """
    try:
        text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}\n… ({len(text) - limit} more characters)"
    # JSON escapes C0 controls in strings but not DEL, C1 (CSI) or the separators
    return printable_lines(text)


def compact(value: Any, limit: int = 40) -> str:
    """One-line rendering of a value, truncated for summaries (control characters escaped)."""
    if isinstance(value, str):
        text = value
    elif isinstance(value, float):
        text = f"{round(value, 3):g}"
    elif isinstance(value, (dict, list, tuple)):
        try:
            text = json.dumps(value, ensure_ascii=False, default=str, separators=(",", ":"))
        except (TypeError, ValueError):
            text = repr(value)
    else:
        text = str(value)
    text = printable(text)
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


class _Tries(Protocol):
    """What :func:`attempt_budget` reads: a record, or a table's row of one."""

    @property
    def attempt(self) -> int: ...

    @property
    def max_attempts(self) -> int: ...


def attempt_budget(record: _Tries) -> int:
    """The tries ``record`` may take, the ones taken counted: its ``max_attempts``, or its
    attempt when that is higher. Recovery puts a run whose node was lost back as its next
    attempt without raising ``max_attempts`` (the lost try counts; losses are bounded by the
    store's ``max_lost`` instead), so a run allowed one try can be on its second. A failure is
    retried while the attempt is below this, as the engine judges it (``attempt <
    max_attempts``); shown as "2/2", not "2/1"."""
    return max(record.max_attempts, record.attempt)
