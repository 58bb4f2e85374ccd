"""Log lines held off the terminal while a dashboard draws on it, and written once it is done.

A dashboard draws the whole screen: a line a logging handler writes on the terminal itself
(``logging.basicConfig()`` in an app's module keeps the real stderr) lands in the middle of
it, from the engine's thread, and garbles it. :class:`HeldTerminalLogs` holds such lines in a
bounded :class:`HeldLog` while it is entered, and writes them on stderr once it is left.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import deque
from typing import Any

#: the most log text kept while a dashboard has the terminal (the newest whole lines are)
HELD_LOG_LIMIT = 1024 * 1024


class HeldLog:
    """Log text held while a dashboard has the terminal, to be written once it has closed.

    A stream for logging's handlers, written from any thread (a local engine logs from its
    own). It keeps the newest whole lines within ``limit`` characters and counts the older
    lines it lets go.
    """

    def __init__(self, limit: int = HELD_LOG_LIMIT) -> None:
        if limit < 2:
            raise ValueError(f"limit {limit} holds no line; give at least 2 characters")
        self.limit = limit
        self._lock = threading.Lock()
        self._lines: deque[str] = deque()
        self._size = 0  # of the lines kept, each with its newline
        self._partial = ""  # the last line, until its newline comes
        self._dropped = 0

    def write(self, text: str) -> int:
        width = self.limit - 1
        with self._lock:
            *complete, partial = (self._partial + text).split("\n")
            for line in complete:
                self._keep(line[:width])  # a line longer than all that is kept: its start
            # a handler that ends no record with a newline: its text is held in lines that fit
            while len(partial) > width:
                self._keep(partial[:width])
                partial = partial[width:]
            self._partial = partial
        return len(text)

    def flush(self) -> None:
        """Nothing to flush: the text is held until :meth:`take` takes it."""

    def _keep(self, line: str) -> None:
        self._lines.append(line)
        self._size += len(line) + 1
        while self._size > self.limit:
            self._size -= len(self._lines.popleft()) + 1
            self._dropped += 1

    def take(self) -> tuple[list[str], int]:
        """The lines held (an unfinished last one too) and how many older ones were let go;
        it holds nothing afterwards."""
        with self._lock:
            lines = [*self._lines, *([self._partial] if self._partial else [])]
            dropped = self._dropped
            self._lines.clear()
            self._size, self._partial, self._dropped = 0, "", 0
        return lines, dropped


def _amount(chars: int) -> str:
    for unit, size in (("MiB", 1024 * 1024), ("KiB", 1024)):
        if chars % size == 0:
            return f"{chars // size} {unit}"
    return f"{chars} characters"


def _is_terminal(stream: object) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return callable(isatty) and bool(isatty())
    except (ValueError, OSError):  # closed
        return False


def _stream_handlers() -> list[logging.StreamHandler[Any]]:
    """Each StreamHandler (not a FileHandler) of the root logger and of every logger made so far, once."""
    made = list(logging.Logger.manager.loggerDict.values())  # placeholders too: names only a child's was made under
    loggers = [logging.getLogger(), *(logger for logger in made if isinstance(logger, logging.Logger))]
    found: dict[int, logging.StreamHandler[Any]] = {}
    for logger in loggers:
        for handler in list(logger.handlers):
            if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
                found.setdefault(id(handler), handler)
    return list(found.values())


class HeldTerminalLogs:
    """While entered, log lines that would be written on the terminal are held; once left (the
    dashboard has given the screen back), they are written on stderr after a line saying how many.

    A dashboard draws the whole screen: a line a logging handler writes on the terminal itself
    (``logging.basicConfig()`` in an app's module keeps the real stderr) lands in the middle of
    it, from the engine's thread, and garbles it. So each StreamHandler whose stream is a
    terminal writes to the hold instead, as does ``logging.lastResort``, which writes to
    ``sys.stderr`` as it is when a line comes: Textual's capture then, where the line is lost.
    Files, and a stderr that is not a terminal (``2>log``), get their lines as they come.
    """

    def __init__(self, limit: int = HELD_LOG_LIMIT) -> None:
        self.held = HeldLog(limit)
        self._swapped: list[tuple[logging.StreamHandler[Any], Any]] = []
        self._last_resort: logging.Handler | None = None
        self._held_last_resort: logging.Handler | None = None

    def __enter__(self) -> HeldTerminalLogs:
        for handler in _stream_handlers():
            stream = handler.stream
            if not _is_terminal(stream):
                continue
            try:
                handler.setStream(self.held)
            except AttributeError:  # a stream it looks up as it writes (lastResort's kind): not one to swap
                continue
            self._swapped.append((handler, stream))
        if logging.lastResort is not None:  # None: the program asked for no last resort
            held = logging.StreamHandler(self.held)
            held.setLevel(logging.lastResort.level)
            held.setFormatter(logging.lastResort.formatter)
            self._last_resort, self._held_last_resort = logging.lastResort, held
            logging.lastResort = held
        return self

    def __exit__(self, *exc: object) -> None:
        for handler, stream in self._swapped:
            if handler.stream is self.held:  # unless something else has set it since
                handler.setStream(stream)
        self._swapped.clear()
        if self._held_last_resort is not None and logging.lastResort is self._held_last_resort:
            logging.lastResort = self._last_resort
        self._last_resort = self._held_last_resort = None
        self.write_held()

    def write_held(self) -> None:
        """Write what is held on stderr, after a line saying how much; nothing if nothing is."""
        lines, dropped = self.held.take()
        if not lines and not dropped:
            return
        written = len(lines) + dropped
        said = f"{written} log line was" if written == 1 else f"{written} log lines were"
        header = f"{said} written while the dashboard was open"
        if dropped:
            header += f" (the first {dropped} left out, to keep the last {_amount(self.held.limit)})"
        try:
            print(f"taskwatch: {header}:", *lines, sep="\n", file=sys.stderr, flush=True)
        except OSError:
            pass  # the terminal is gone (SIGHUP: its window was closed)
