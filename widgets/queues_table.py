"""QueuesTable: each work queue's state, depth, in-flight jobs, counters and throughput."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from typing import ClassVar

from taskwatch.engine import QueueInfo
from textual.message import Message

from ._format import DASH, fmt_rate
from ._keyed_rows import NAME_WIDTH
from ._keyed_table import Cell, Column, KeyedTable


class QueuesTable(KeyedTable):
    """Queues keyed by name; throughput is measured from successive updates."""

    COLUMNS: ClassVar[tuple[Column, ...]] = (
        Column("name", "queue", max_width=NAME_WIDTH),
        Column("state", "state", 6),
        Column("depth", "depth", 13, "right"),
        Column("in_flight", "in flight", 9, "right"),
        Column("processed", "processed", 10, "right"),
        Column("failed", "failed", 8, "right"),
        Column("rejected", "rejected", 8, "right"),
        Column("purged", "purged", 7, "right"),
        Column("rate", "rate", 9, "right"),
    )

    class QueueHighlighted(Message):
        """The cursor moved to another queue (None when the table emptied)."""

        def __init__(self, table: QueuesTable, name: str | None) -> None:
            self.table = table
            self.name = name
            super().__init__()

        @property
        def control(self) -> QueuesTable:
            return self.table

    class QueueSelected(Message):
        """A queue was chosen with Enter or a click."""

        def __init__(self, table: QueuesTable, name: str) -> None:
            self.table = table
            self.name = name
            super().__init__()

        @property
        def control(self) -> QueuesTable:
            return self.table

    def __init__(
        self,
        *,
        rate_window: float = 5.0,
        name: str | None = None,
        id: str | None = None,
        classes: str | None = None,
        disabled: bool = False,
    ) -> None:
        super().__init__(name=name, id=id, classes=classes, disabled=disabled)
        #: seconds of history the throughput is averaged over (smooths 10-20 Hz updates)
        self.rate_window = rate_window
        self._samples: dict[str, deque[tuple[float, int]]] = {}

    @property
    def selected_name(self) -> str | None:
        return self.selected_key

    def select_name(self, name: str) -> bool:
        return self.select_key(name)

    def throughput(self, queue: str) -> float | None:
        """Jobs processed (or failed) per second over the last ``rate_window`` seconds."""
        samples = self._samples.get(queue)
        if not samples or len(samples) < 2:
            return None
        (t0, n0), (t1, n1) = samples[0], samples[-1]
        if t1 <= t0:
            return None
        return max(0.0, (n1 - n0) / (t1 - t0))

    @property
    def measuring(self) -> bool:
        """Whether a rate is shown for some queue (see ``live`` in :meth:`update_queues`)."""
        return any(len(samples) >= 2 for samples in self._samples.values())

    def update_queues(self, infos: Iterable[QueueInfo], now: float | None = None, *, live: bool = True) -> None:
        """Show exactly these queues; ``now`` (monotonic seconds) defaults to the clock.

        ``live=False``: these are not counts of a running engine (it stopped, is out of reach or
        does not answer), so no rate is shown, rather than the last one measured; the next live
        update starts measuring anew.
        """
        infos = list(infos)  # read three times: a generator would be spent by the first
        now = time.monotonic() if now is None else now
        self._begin()
        wanted = {info.name for info in infos}
        self._remove([name for name in self._cells if name not in wanted])
        for gone in [name for name in self._samples if name not in wanted]:
            del self._samples[gone]
        if not live:
            self._samples.clear()
        for info in infos:
            if live:
                self._record(info, now)
            self._upsert(info.name, info.name, self._row(info))
        self._finish()

    def _highlight_message(self, key: str | None) -> Message:
        return self.QueueHighlighted(self, key)

    def _selected_message(self, key: str) -> Message:
        return self.QueueSelected(self, key)

    def _record(self, info: QueueInfo, now: float) -> None:
        samples = self._samples.setdefault(info.name, deque(maxlen=512))
        done = info.processed + info.failed
        if samples and done < samples[-1][1]:
            samples.clear()  # counters went backwards: the engine restarted
        samples.append((now, done))
        # keep one sample older than the window so the rate spans the whole window
        while len(samples) > 2 and now - samples[1][0] >= self.rate_window:
            samples.popleft()

    def _row(self, info: QueueInfo) -> tuple[Cell, ...]:
        if info.maxsize > 0:
            fill = info.depth / info.maxsize
            depth = (f"{info.depth}/{info.maxsize}", "bold red" if fill >= 0.9 else "yellow" if fill >= 0.5 else "")
        else:
            depth = (str(info.depth), "")
        rate = self.throughput(info.name)
        return (
            (info.name, "bold"),
            ("paused", "bold yellow") if info.paused else ("", ""),
            depth,
            (f"{info.in_flight}/{info.concurrency}", "yellow" if info.in_flight else "dim"),
            (str(info.processed), ""),
            (str(info.failed), "bold red" if info.failed else "dim"),
            (str(info.rejected), "bold red" if info.rejected else "dim"),
            (str(info.purged), "yellow" if info.purged else "dim"),
            (fmt_rate(rate) if rate is not None else DASH, ""),
        )
