"""The commands a dashboard's keys have sent and still wait for: a key pressed again while
its command waits must not send it twice."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator


class CommandsInFlight:
    """The commands whose answers a dashboard's keys still wait for, by verb and target.

    A slow engine or database shows nothing for a while, and a key pressed again must not
    send its command twice (``r`` would retry the run twice): :meth:`sole` says whether a
    key may send, and tells the user (``say``) when an earlier one still waits for
    ``answer`` ("the engine's reply"). The engine dashboard and the cluster dashboard
    keep their keys by this one rule."""

    def __init__(self, say: Callable[[str], object], answer: str) -> None:
        self._say = say
        self.answer = answer
        self._acting: set[tuple[str, str]] = set()

    @contextlib.contextmanager
    def sole(self, verb: str, targets: Iterable[str], what: str) -> Iterator[bool]:
        """Whether a key may ``verb`` ``targets`` now (``what`` names them to the user): False,
        after a word, while an earlier ``verb`` of one of them still waits for its answer."""
        keys = {(verb, target) for target in targets}
        if keys & self._acting:
            self._say(f"{verb} {what}: still waiting for {self.answer} to the last one")
            yield False
            return
        self._acting |= keys
        try:
            yield True
        finally:
            self._acting -= keys
