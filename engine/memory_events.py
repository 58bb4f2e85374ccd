"""Cluster-wide events between engines of one process, through a capped in-memory stream.

Engines made with ``events=stream`` (one :class:`MemoryEventStream` shared by
all of them) each run a :class:`MemoryEventRelay`, as engines made with
``events="redis://..."`` run a Redis one: every node's bus goes out in
batches (after a short linger, progress events of one run coalesced to the
newest) and every node's events are read back into :attr:`EventRelay.bus`,
with the same per-node accounting. A cluster dashboard reads the stream with
a relay of its own (``MemoryEventRelay(stream)``, no bus). Tests, demos and
the dashboard's pictures use it to stage a cluster without a server.

Like a Redis stream, the stream keeps its newest ``maxlen`` entries (exactly,
where Redis trims in blocks): a reader that falls further behind, or starts
from the oldest kept entry (``since="0"``), finds gaps in a node's numbers
and counts them as missed. Appends and reads take a lock and wake readers on
their own event loops, so engines on different threads (a background engine,
say) can share one stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from dataclasses import dataclass

from .bus import DEFAULT_REPLAY, EventBus
from .errors import InvalidConfiguration
from .hop import current_loop
from .relay import EventRelay, Outgoing

__all__ = ["MemoryEventRelay", "MemoryEventStream"]


@dataclass(frozen=True, slots=True)
class StreamEntry:
    """One event in the stream: its place (ids count up from 1), its JSON, how many
    coalesced events of its node it follows, and the relay's bus that numbered it."""

    id: int
    data: str
    skipped: int
    bus: str | None = None


class MemoryEventStream:
    """A capped, ordered log of events that relays in one process append to and read.

    ``name`` is what dashboards show as the stream; ``maxlen`` is how many of the
    newest entries are kept.
    """

    def __init__(self, name: str = "taskwatch:events", *, maxlen: int = 10_000) -> None:
        problems = []
        if not isinstance(name, str) or not name:
            problems.append(f"name must be a non-empty string, got {name!r}")
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            problems.append(f"maxlen must be a positive count, got {maxlen!r}")
        if problems:
            raise InvalidConfiguration("the in-memory event stream", problems)
        self.name = name
        self.maxlen = maxlen
        self._entries: deque[StreamEntry] = deque()
        self._last_id = 0
        #: entries dropped to keep the stream at maxlen
        self.trimmed = 0
        self._lock = threading.Lock()
        self._readers: dict[asyncio.Event, asyncio.AbstractEventLoop] = {}

    @property
    def last_id(self) -> int:
        """The id of the newest entry ever appended (0: none yet)."""
        return self._last_id

    def __len__(self) -> int:
        return len(self._entries)

    def append(self, records: list[Outgoing], bus: str | None = None) -> None:
        """Add one batch, in order, trimming the oldest entries beyond ``maxlen``; ``bus``
        names the relay's bus that numbered it (readers follow each bus's numbers apart)."""
        with self._lock:
            for record in records:
                self._last_id += 1
                self._entries.append(StreamEntry(self._last_id, record.data, record.skipped, bus))
            excess = len(self._entries) - self.maxlen
            for _ in range(max(0, excess)):
                self._entries.popleft()
            self.trimmed += max(0, excess)
            readers = list(self._readers.items())
        for wake, loop in readers:
            _wake(wake, loop)

    def read(self, after: int, count: int) -> list[StreamEntry]:
        """Up to ``count`` entries with ids above ``after``, oldest first."""
        with self._lock:
            if not self._entries or after >= self._last_id:
                return []
            start = max(0, after - self._entries[0].id + 1)
            return [self._entries[i] for i in range(start, min(len(self._entries), start + count))]

    def watch(self, wake: asyncio.Event) -> None:
        """Set ``wake`` (on the loop running now) whenever entries are appended."""
        with self._lock:
            self._readers[wake] = asyncio.get_running_loop()

    def unwatch(self, wake: asyncio.Event) -> None:
        with self._lock:
            self._readers.pop(wake, None)

    def __repr__(self) -> str:
        return f"<MemoryEventStream {self.name!r} {len(self._entries)}/{self.maxlen} last_id={self._last_id}>"


def _wake(wake: asyncio.Event, loop: asyncio.AbstractEventLoop) -> None:
    if loop is current_loop():
        wake.set()
        return
    # a reader on another thread's loop; a loop that closed meanwhile has no reader left to wake
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(wake.set)


class MemoryEventRelay(EventRelay):
    """Publishes a bus to a :class:`MemoryEventStream` and reads every node's events back.

    ``bus`` is the node's own bus to publish (``None`` for a reader only, as a
    dashboard is). ``batch``, ``linger``, ``max_pending`` and ``replay`` mean
    what they mean for the Redis relay; ``since="$"`` reads from the moment the
    relay starts, ``"0"`` from the oldest entry the stream still holds (events
    of a node before that count as missed).
    """

    def __init__(
        self,
        stream: MemoryEventStream,
        bus: EventBus | None = None,
        *,
        batch: int = 500,
        linger: float = 0.02,
        max_pending: int = 50_000,
        since: str = "$",
        replay: int = DEFAULT_REPLAY,
    ) -> None:
        problems = []
        if not isinstance(stream, MemoryEventStream):
            problems.append(f"stream must be a MemoryEventStream, got {type(stream).__name__}")
        for name, value in (("batch", batch), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive count, got {value!r}")
        if isinstance(linger, bool) or not isinstance(linger, int | float) or not 0 <= linger <= 5:
            problems.append(f"linger must be between 0 and 5 seconds, got {linger!r}")
        if since not in ("$", "0"):
            problems.append(f"since must be '$' (from now) or '0' (the oldest kept), got {since!r}")
        if problems:
            raise InvalidConfiguration("the in-memory event relay", problems)
        super().__init__(
            bus, stream=stream.name, batch=batch, linger=linger, max_pending=max_pending, from_start=since == "0",
            replay=replay,
        )
        # nothing in between can fail: no error is worth a retry
        self.transient_errors = ()
        self.memory = stream
        self.since = since
        #: where reading goes on from; None until the first start
        self._last_id: int | None = None
        self._appended = asyncio.Event()

    @property
    def public_url(self) -> str:
        return "memory (this process)"

    async def _open(self) -> None:
        self._appended = asyncio.Event()
        self.memory.watch(self._appended)
        if self._last_id is None:
            self._last_id = self.memory.last_id if self.since == "$" else 0
        # else a restart reads on where it stopped: what came meanwhile is not missed
        self.connected = True

    async def _close(self) -> None:
        self.memory.unwatch(self._appended)

    async def _send(self, batch: list[Outgoing]) -> None:
        self.memory.append(batch, self.bus_id)
        # a turn for the readers after each batch, as a send over the network gives them: a
        # burst appended in one go was trimmed past them before they read any of it, where
        # the same burst over Redis reached them whole
        await asyncio.sleep(0)

    async def _read_loop(self) -> None:
        while True:
            # cleared before the read: an append during it wakes the next wait
            self._appended.clear()
            entries = self.memory.read(self._last_id or 0, self.batch)
            for entry in entries:
                self._last_id = entry.id
                self._take(entry.data, entry.skipped, entry.bus)
            if len(entries) < self.batch:
                await self._appended.wait()
            else:
                await asyncio.sleep(0)  # a long backlog: let the loop breathe between batches
