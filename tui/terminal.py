"""The dashboard's terminal driver: one that lets the dashboard end when its terminal is closed.

Textual's Linux driver writes the screen from a thread fed through a queue of 30 writes. When
the terminal goes away (its window closed, an SSH session dropped), the next write raises EIO,
which ends that thread; the queue then fills with the frames drawn before SIGHUP is handled,
and the write after that blocks the app's event loop for good: the dashboard never ends, and
the engine it runs is never stopped (a durable store's runs stay `running` until recovery).
:func:`hangup_safe` gives the apps a driver whose writes to a terminal that is gone are dropped.
"""

from __future__ import annotations

from typing import Any, TextIO

from textual.driver import Driver
from textual.drivers.linux_driver import LinuxDriver


class TerminalStream:
    """The terminal's stream as the driver's writer thread sees it: once a write or flush fails
    (EIO: nothing is there to draw on), the rest is dropped, so the thread keeps draining."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        #: whether the terminal was found gone
        self.gone = False

    def write(self, text: str) -> int:
        if not self.gone:
            try:
                return self._stream.write(text)
            except OSError:
                self.gone = True
        return len(text)

    def flush(self) -> None:
        if not self.gone:
            try:
                self._stream.flush()
            except OSError:
                self.gone = True

    def fileno(self) -> int:
        return self._stream.fileno()

    def isatty(self) -> bool:
        return self._stream.isatty()


class HangupSafeLinuxDriver(LinuxDriver):
    """Textual's Linux driver, writing through a :class:`TerminalStream`."""

    def __init__(self, app: Any, **options: Any) -> None:
        super().__init__(app, **options)
        # the stream Textual's driver hands its writer thread (textual is pinned exactly; a
        # release that renames it fails tests/test_tui_lifecycle.py), which only writes, flushes
        # and asks for its fileno: a TerminalStream does all three
        if self._file is not None:
            self._file = TerminalStream(self._file)  # type: ignore[assignment]


def hangup_safe(driver_class: type[Driver]) -> type[Driver]:
    """``driver_class``, or, for Textual's Linux driver, the one whose writer thread outlives
    the terminal (the web and headless drivers have no terminal to lose)."""
    return HangupSafeLinuxDriver if driver_class is LinuxDriver else driver_class
