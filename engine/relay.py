"""Cluster-wide events: what every relay does, wherever the events travel.

A relay publishes this node's bus to a place every node can read (a Redis
stream, a PostgreSQL table) and reads every node's events back into its own
:attr:`EventRelay.bus`, each with the ``node`` that emitted it. This module
holds what does not depend on that place:

- the outgoing buffer: events wait in a bounded queue (what does not fit, and
  what is still in it when a stop gives up sending, is counted as
  ``unsent``) and go out in batches, after a short linger; within
  a batch, progress events of one run are coalesced to the newest (counted
  as ``coalesced``); a run's start or end this node only read from the store
  is not sent (the node that ran it sends its own); the record sent after
  such events says how many were left out, so readers do not take them for
  lost;
- the reader's accounting: every node numbers its events (each process of it
  on its own bus, so a restart, or two processes started under one id by
  mistake, are followed apart), so a gap in a bus's numbers that coalescing
  does not explain (the shared place was trimmed past what this reader had
  read, or the node could not send them) is counted as ``missed`` for that
  node and announced on the cluster bus as a ``bus.dropped`` event naming the
  node;
- :meth:`EventRelay.nodes`: each node as its events show it (last event,
  leadership, running runs, CPU and RSS from its health samples); a node
  silent for a few of its health intervals is ``unknown`` (killed, cut off,
  or this reader cannot reach the shared place); until two samples give the
  interval, it is taken from the node's start to its first sample, or else
  as the engine's default.

The cluster bus is separate from the engine's own bus on purpose: the
engine's bus numbers *this* node's events (``seq``) and snapshots resume from
those numbers; events from other nodes have their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError

from .hop import spawn
from .jsonsafe import safe_str
from .bus import DEFAULT_REPLAY, EventBus, check_event
from .events import BaseEvent, EventsDropped, event_from_json, event_to_json
from .logs import OutageLog

log = logging.getLogger("taskwatch.events")

BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
#: what a relay does, as its log lines say it: each has outages of its own
PUBLISHING = "publishing events to"
READING = "reading events from"

#: a node silent for this many of its health intervals (plus the slack, for batching and a
#: reader's poll) shows as unknown: a node killed with ``kill -9`` never says it stopped
SILENT_SAMPLES = 3
SILENT_SLACK = 1.0
#: the interval assumed between a node's health samples until it can be measured (the engine's
#: default ``health_interval``): a node killed right after its first sample is judged too
ASSUMED_HEALTH_INTERVAL = 1.0
#: the buses of one node whose numbering is followed (restarts, or processes sharing its id)
BUSES_PER_NODE = 16


def cancelling() -> bool:
    """Whether someone asked to cancel the current task (some drivers swallow the cancel)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class ClusterNode(BaseModel):
    """One node of the cluster: as its events show it, and (from a cluster store) as the
    nodes table records it."""

    model_config = ConfigDict(frozen=True)

    node: str
    last_ts: float = 0.0
    last_kind: str = ""
    events: int = 0
    missed: int = 0
    #: events the node left out on purpose (not lost): progress events a newer one of the
    #: run replaced, and runs' starts and ends it read from the store, which the node that
    #: ran them sent
    coalesced: int = 0
    is_leader: bool | None = None
    term: int | None = None
    running: int | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    stopped: bool = False
    #: silent for longer than the store's node TTL (from the nodes table)
    dead: bool = False
    #: up when the nodes table was last read, and silent for longer than the node TTL since,
    #: while the watcher cannot read the table again (the database is out of reach); or, as
    #: its events show it, silent for a few of its health intervals (killed, cut off, or the
    #: reader cut off from the shared place): it may be up or dead; its role and load are
    #: not known either
    unknown: bool = False
    incarnation: str | None = None
    version: str | None = None
    started_at: float | None = None
    last_heartbeat: float | None = None

    @property
    def state(self) -> str:
        """``stopped``, ``dead``, ``unknown`` (see :attr:`unknown`) or ``up``."""
        return "stopped" if self.stopped else "dead" if self.dead else "unknown" if self.unknown else "up"


class RelayStats(BaseModel):
    """The relay's counters: what it sent, what it read, and what was lost on the way."""

    model_config = ConfigDict(frozen=True)

    #: where the events travel: the Redis stream's key, or the PostgreSQL table
    stream: str
    connected: bool
    published: int
    unsent: int
    #: events of the batch a stop gave up waiting for the answer to: written to the transport
    #: or not, they may still reach readers (a hung server that comes back runs what it got)
    unconfirmed: int = 0
    pending: int
    batches: int
    #: progress events left out because a newer one of the same run went in the same batch
    coalesced: int = 0
    #: events this node could not encode (a value no JSON carries, published unchecked):
    #: left out, and counted as missed by every reader
    unencodable: int = 0
    received: int
    missed: int
    malformed: int
    errors: int
    #: while not connected, why the last round trip failed (shown beside DISCONNECTED)
    last_error: str | None = None


@dataclass(slots=True)
class Outgoing:
    """One event on its way out: its JSON, and how many coalesced events of its node it follows."""

    seq: int
    ts: float
    data: str
    skipped: int = 0


class _NodeView:
    __slots__ = ("node", "seqs", "last_ts", "last_kind", "events", "missed", "coalesced", "is_leader", "term",
                 "running", "cpu_percent", "rss_bytes", "stopped", "stopped_buses", "heard_at", "health_ts",
                 "health_every", "started_ts")

    def __init__(self, node: str) -> None:
        self.node = node
        #: the last seq read from each bus that numbered this node's events (None: the shared
        #: place does not say), the most recent last; two processes started with one node id
        #: by mistake number their events each on its own, and a restart begins again at 1
        self.seqs: dict[str | None, int] = {}
        self.last_ts = 0.0
        self.last_kind = ""
        self.events = 0
        self.missed = 0
        self.coalesced = 0
        self.is_leader: bool | None = None
        self.term: int | None = None
        self.running: int | None = None
        self.cpu_percent: float | None = None
        self.rss_bytes: int | None = None
        self.stopped = False
        #: the buses (of ``seqs``) whose process said it stopped, or was superseded: one under
        #: the same id that has not, heard from later, is up (a superseded process stopped
        #: beside its successor)
        self.stopped_buses: set[str | None] = set()
        #: when (this process's monotonic clock) the last event of the node was read
        self.heard_at = 0.0
        #: the node's clock at its last health sample, and the interval between its last two
        #: (None: not known yet, or the node's clock stands still)
        self.health_ts: float | None = None
        self.health_every: float | None = None
        #: the node's clock at its last engine.started (its sampler starts after it: the first
        #: sample comes a whole interval later)
        self.started_ts: float | None = None

    def silent(self, now: float) -> bool:
        """Whether the node missed a few health samples in a row (as read here, at ``now``):
        killed, cut off, or the reader cannot reach the shared place. A node that samples no
        health is never judged."""
        every = self.health_every
        if every is None and self.health_ts is not None:
            every = ASSUMED_HEALTH_INTERVAL  # one sample read: it does sample, at a rate not known yet
        return not self.stopped and every is not None and now - self.heard_at > SILENT_SAMPLES * every + SILENT_SLACK

    def model(self, now: float) -> ClusterNode:
        hidden = ("seqs", "heard_at", "health_ts", "health_every", "started_ts")
        fields = {name: getattr(self, name) for name in self.__slots__ if name not in hidden}
        return ClusterNode(**fields, unknown=self.silent(now))


class Coalesced(NamedTuple):
    """A batch of events as records to send (see :func:`coalesce`)."""

    records: list[Outgoing]
    #: events left out at the end of the batch, for the next batch's first record to count
    carried: int
    #: events no JSON can carry, left out so that readers count them as missed
    unencodable: int


def coalesce(events: list[BaseEvent], carried: int = 0, before: list[int] | None = None) -> Coalesced:
    """``events`` as records to send.

    Left out: events this node read from the store of a run another node started
    or ended (that node sends its own: sent here too, the cluster would see the
    run start and end twice). Each record counts the events left out just before
    it, so readers do not take them for lost; ``carried`` are left out at the end
    of the previous batch, and ``before[i]`` (if given) just before ``events[i]``,
    by the caller (progress a newer figure replaced while it waited: see
    ``EventRelay._offer``, which keeps one per run, so a batch never holds two). An
    event that cannot be encoded (a value posted unchecked) is left out uncounted:
    readers see the gap and count it missed, where raising would lose the whole
    batch and stop the relay.
    """
    out: list[Outgoing] = []
    skipped = carried
    unencodable = 0
    for i, event in enumerate(events):
        if before is not None:
            skipped += before[i]
        if getattr(event, "from_store", False):
            skipped += 1
            continue
        try:
            data = event_to_json(event)
        except (ValueError, TypeError, RecursionError) as exc:  # pydantic's serialization error is a ValueError
            unencodable += 1
            log.warning("a %s event (seq %d) cannot be encoded; left out, readers count it missed: %s",
                        getattr(event, "kind", "?"), event.seq, exc)
            continue
        out.append(Outgoing(event.seq, event.ts, data, skipped))
        skipped = 0
    return Coalesced(out, skipped, unencodable)


class EventRelay:
    """Publishes a bus to a shared place and reads every node's events back (a base class).

    ``bus`` is the node's own bus to publish (``None`` for a reader only, as a
    dashboard is). ``batch`` bounds events per round trip, ``linger`` is how
    long the publisher waits to fill a batch, ``max_pending`` bounds the events
    waiting to be sent. ``from_start``: the reader starts at the oldest event
    the shared place still holds (events of a node before that count as
    missed) instead of at the newest.

    A subclass says where events go: :meth:`_send` writes one batch,
    :meth:`_read_loop` reads and hands each event to :meth:`_take`,
    :meth:`_open` / :meth:`_close` manage connections, and
    :attr:`transient_errors` are the errors that mean "try again".
    """

    #: errors of the shared place that a retry (after a backoff) may cure
    transient_errors: tuple[type[BaseException], ...] = (OSError,)

    def __init__(
        self,
        bus: EventBus | None,
        *,
        stream: str,
        batch: int,
        linger: float,
        max_pending: int,
        from_start: bool,
        replay: int = DEFAULT_REPLAY,
    ) -> None:
        self.stream = stream
        self.batch = batch
        self.linger = linger
        self.max_pending = max_pending
        self.source = bus
        #: every node's events, as read back
        self.bus = EventBus(node="cluster", replay=replay)
        self._outgoing: deque[BaseEvent] = deque()
        #: each run's newest progress event waiting to be sent (in seq order), kept apart from
        #: ``_outgoing``: a newer figure takes the older one's place, so a task reporting in a
        #: tight loop holds one place, not thousands that push its run's end off the queue
        self._progress: OrderedDict[str, BaseEvent] = OrderedDict()
        #: the seqs of progress events a newer figure replaced: the next record sent after
        #: each counts it among the events left out before it
        self._replaced: list[int] = []
        #: a batch taken from the queue and not yet sent (sent again first after a failure)
        self._unsent_batch: list[Outgoing] | None = None
        self._wake = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._nodes: dict[str, _NodeView] = {}
        #: the last seq of the source bus handed to the publisher (so a restart resends nothing)
        self._sent_through = 0
        #: events left out at the end of the last batch: the next record sent counts them
        self._left_out_last = 0
        self._from_start = from_start
        self._opened = False
        self.connected = False
        #: the last batch could not be sent (the reader may still read): not connected either
        self._send_failing = False
        #: the log lines of each direction's outages ("publishing events to", "reading events from")
        self._outages: dict[str, OutageLog] = {}
        self.published = 0
        self.unsent = 0
        self.unconfirmed = 0
        self.batches = 0
        self.coalesced = 0
        self.unencodable = 0
        self.received = 0
        self.missed = 0
        self.malformed = 0
        self.errors = 0
        self.last_error: str | None = None
        #: events read a second time (written twice by their bus) and left out
        self.repeated = 0
        #: names the bus this relay publishes, in every record it writes: a batch written
        #: again after its answer was lost (it had arrived, the answer had not) is then told
        #: from a restarted node (another relay, seqs from 1 again) and read once
        self.bus_id = os.urandom(8).hex()

    # ------------------------------------------------------------------ for subclasses

    @property
    def public_url(self) -> str:
        """Where the events travel, without a password, for headers and logs."""
        raise NotImplementedError

    async def _open(self) -> None:
        """Make clients and find where reading starts (before any loop runs)."""

    async def _close(self) -> None:
        """Release the clients (after every loop ended and the last batch was sent)."""

    async def _send(self, batch: list[Outgoing]) -> None:
        """Write one batch, in order, or raise (nothing of it is then taken as sent)."""
        raise NotImplementedError

    async def _read_loop(self) -> None:
        """Read every node's events, in order, handing each to :meth:`_take`; forever."""
        raise NotImplementedError

    def _idle_timeout(self) -> float | None:
        """How long the publisher may wait for events before :meth:`_between_batches` is due."""
        return None

    async def _between_batches(self) -> None:
        """Housekeeping the publisher does when it is awake anyway (pruning, say)."""

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._send_failing = False
        await self._open()
        self._opened = True
        self.bus.reopen()
        self.bus.loop = asyncio.get_running_loop()
        self._tasks = [spawn(self._read_loop(), name=f"taskwatch-events-read-{self.stream}")]
        if self.source is not None:
            # what the bus published before this start (the engine's start event,
            # registrations) goes out first; no await from here to the subscription
            for event in self.source.recent():
                if event.seq > self._sent_through:
                    self._offer(event)
            self._unsubscribe = self.source.add_callback(self._offer)
            self._tasks.append(spawn(self._publish_loop(), name=f"taskwatch-events-send-{self.stream}"))

    async def stop(self, deadline: float | None = None) -> None:
        """Send what is still buffered (until ``deadline``, loop time; 1 s by default),
        then stop both loops and disconnect."""
        loop = asyncio.get_running_loop()
        if deadline is None:
            deadline = loop.time() + 1.0
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        if not self._opened:
            self.bus.close()
            return
        if self.source is not None and self.pending:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await self._flush()
            except (TimeoutError, *self.transient_errors) as exc:  # type: ignore[misc]
                # given up: counted with those the buffer had no room for, so the node's own
                # figures say what its readers never get (the node's last events, after which
                # nothing of it comes that would show them a gap)
                # a send refused is known not to have gone; one cut off waiting is not known
                in_flight = len(self._unsent_batch or ()) if isinstance(exc, TimeoutError) else 0
                left = self.pending - in_flight
                self.unsent += left
                self.unconfirmed += in_flight
                self._outgoing.clear()
                self._progress.clear()
                self._unsent_batch = None
                log.warning(
                    "%d events not sent to %s at stop (counted as unsent), and %d sent without an answer "
                    "(counted as unconfirmed: they may still reach readers): %r",
                    left, self.stream, in_flight, exc,
                )  # fmt: skip
        self._opened = False
        with contextlib.suppress(Exception):
            await self._close()
        self.connected = False
        self.bus.close()

    async def __aenter__(self) -> EventRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ what it knows

    @property
    def pending(self) -> int:
        """Events waiting to be sent."""
        return len(self._outgoing) + len(self._progress) + len(self._unsent_batch or ())

    def nodes(self) -> list[ClusterNode]:
        """Every node whose events were read, by name.

        A node that never said anything about the lease is a follower once
        another node has said it leads (followers publish no lease events).
        One not stopped whose events stopped coming for three of its health
        intervals and a second is ``unknown`` (a node killed with ``kill -9``
        never says it stopped): its role, term and running count are not known
        (``None``), as a cluster store's watcher shows such a node.
        """
        views = [self._nodes[name] for name in sorted(self._nodes)]
        someone_leads = any(view.is_leader for view in views)
        now = time.monotonic()
        out = []
        for view in views:
            info = view.model(now)
            if info.unknown:
                info = info.model_copy(update={"is_leader": None, "term": None, "running": None})
            elif someone_leads and info.is_leader is None:
                info = info.model_copy(update={"is_leader": False})
            out.append(info)
        return out

    def stats(self) -> RelayStats:
        connected = self.connected and not self._send_failing
        return RelayStats(
            stream=self.stream,
            connected=connected,
            published=self.published,
            unsent=self.unsent,
            unconfirmed=self.unconfirmed,
            pending=self.pending,
            batches=self.batches,
            coalesced=self.coalesced,
            unencodable=self.unencodable,
            received=self.received,
            missed=self.missed,
            malformed=self.malformed,
            errors=self.errors,
            last_error=None if connected else self.last_error,
        )

    # ------------------------------------------------------------------ publishing

    def _offer(self, event: BaseEvent) -> None:
        self._sent_through = max(self._sent_through, event.seq)
        progress = event.kind == "run.progress"
        if progress:
            older = self._progress.pop(event.run_id, None)  # type: ignore[attr-defined]
            if older is not None:
                # its place, now at the end of the line: readers count the older one left out
                self._progress[event.run_id] = event  # type: ignore[attr-defined]
                heapq.heappush(self._replaced, older.seq)
                self.coalesced += 1
                return
        waiting = len(self._outgoing) + len(self._progress)
        if waiting >= self.max_pending:
            self.unsent += 1
            return
        if progress:
            self._progress[event.run_id] = event  # type: ignore[attr-defined]
        else:
            self._outgoing.append(event)
        if waiting == 0 or waiting + 1 >= self.batch:
            self._wake.set()

    async def _publish_loop(self) -> None:
        delay = 0.0
        while True:
            try:
                async with asyncio.timeout(self._idle_timeout()):
                    await self._wake.wait()
            except TimeoutError:
                pass
            if self._wake.is_set():
                self._wake.clear()
                if self.linger and len(self._outgoing) + len(self._progress) < self.batch:
                    # a short wait turns a burst into one round trip instead of many
                    await asyncio.sleep(self.linger)
            try:
                await self._flush()
                await self._between_batches()
                delay = 0.0
                self._send_failing = False
                self._went_through(PUBLISHING)
                if cancelling():
                    # some clients swallow a cancel that lands in a round trip
                    raise asyncio.CancelledError
            except self.transient_errors as exc:
                self._send_failing = True
                delay = await self._back_off(exc, delay, PUBLISHING)
                self._wake.set()

    async def _back_off(self, exc: BaseException, delay: float, doing: str) -> float:
        """After a transient error: count it, say so, wait (doubling from 50 ms to 2 s); the next delay.

        A cancel can reach a client mid-round-trip as a connection error: it
        stays a cancel here.
        """
        if cancelling():
            raise asyncio.CancelledError from exc
        self.errors += 1
        self.connected = False
        self.last_error = f"{type(exc).__name__}: {safe_str(exc)}"
        delay = min(BACKOFF_MAX, delay * 2 if delay else BACKOFF_MIN)
        self._outage(doing).failed(exc, f"retrying in {delay:.2g} s, backing off to every {BACKOFF_MAX:g} s")
        await asyncio.sleep(delay)
        return delay

    def _went_through(self, doing: str) -> None:
        """A round trip of ``doing`` worked: the end of its outage, if any, is said once."""
        outage = self._outages.get(doing)
        if outage is not None:
            outage.succeeded()

    def _outage(self, doing: str) -> OutageLog:
        outage = self._outages.get(doing)
        if outage is None:
            outage = self._outages[doing] = OutageLog(log, f"{doing} {self.public_url}", self.transient_errors)
        return outage

    def _next_batch(self) -> list[Outgoing]:
        """The next ``batch`` events in seq order (the queue's and the runs' newest progress
        merged), as records, each counting the events left out just before it."""
        outgoing, progress, replaced = self._outgoing, self._progress, self._replaced
        events: list[BaseEvent] = []
        before: list[int] = []
        while len(events) < self.batch and (outgoing or progress):
            figure = next(iter(progress.values())) if progress else None
            if figure is not None and (not outgoing or figure.seq < outgoing[0].seq):
                event = progress.popitem(last=False)[1]
            else:
                event = outgoing.popleft()
            left = 0
            while replaced and replaced[0] < event.seq:
                heapq.heappop(replaced)
                left += 1
            events.append(event)
            before.append(left)
        batch = coalesce(events, self._left_out_last, before)
        self._left_out_last = batch.carried
        self.unencodable += batch.unencodable
        return batch.records

    async def _flush(self) -> None:
        while self._unsent_batch or self._outgoing or self._progress:
            if not self._unsent_batch:
                self._unsent_batch = self._next_batch()
            batch = self._unsent_batch
            if not batch:  # every event of it left out
                self._unsent_batch = None
                continue
            await self._send(batch)  # raises: the batch stays, to be sent first next time
            self._unsent_batch = None
            self.connected = True
            self.published += len(batch)
            self.batches += 1

    # ------------------------------------------------------------------ reading

    def _take(self, data: bytes | str | None, skipped: int = 0, bus: str | None = None) -> None:
        """One event as read back (its JSON), following ``skipped`` coalesced events of its node;
        ``bus`` names the bus that numbered it, where the shared place says."""
        try:
            if data is None:
                raise ValueError("an entry without an event")
            event = event_from_json(data)
            # JSON's reader lets NaN and infinity through, which no reader further on could
            # carry (only a foreign writer puts them there); all else decoded is JSON's own
            if _may_hold_non_finite(data):
                check_event(event, "an event read back from the cluster")
        except (ValueError, ValidationError):  # InvalidConfiguration is a ValueError
            self.malformed += 1
            return
        view = self._nodes.get(event.node)
        if view is None:
            view = self._nodes[event.node] = _NodeView(event.node)
        # each bus numbers its events on its own: a restart (a new bus, from 1 again), or a
        # second process started under the node's id, is followed apart from the others
        last = view.seqs.pop(bus, None)
        if last is None:
            if view.seqs:
                view.stopped = False  # a new bus under this name: a process of it is up
            if self._from_start:
                # reading from the oldest kept event: what came before it was trimmed away
                last = 0
            while len(view.seqs) >= BUSES_PER_NODE:
                oldest = next(iter(view.seqs))
                del view.seqs[oldest]
                view.stopped_buses.discard(oldest)
        if last is not None:
            gap = event.seq - last - 1 - max(0, skipped)
            if event.seq <= last:
                if bus is not None:
                    # the same bus does not number two events alike: this one was written
                    # twice (a batch sent again after its commit answer was lost), and read
                    view.seqs[bus] = last
                    self.repeated += 1
                    return
                # numbers start again where the shared place names no bus: the node restarted
                view.stopped = False
                view.stopped_buses.discard(bus)
            elif gap > 0:
                view.missed += gap
                self.missed += gap
                self.bus.publish(EventsDropped(node=event.node, ts=event.ts, count=gap, total=view.missed))
        view.coalesced += max(0, skipped)
        view.seqs[bus] = event.seq
        view.heard_at = time.monotonic()
        view.last_ts = event.ts
        view.last_kind = event.kind
        view.events += 1
        _note(view, event)
        if event.kind in ("engine.stopped", "node.superseded"):
            # (a superseded process runs on, but claims, leads and starts nothing: its samples
            # do not say the node is up)
            view.stopped_buses.add(bus)
        elif event.kind == "engine.started":
            view.stopped_buses.discard(bus)
        elif view.stopped and bus not in view.stopped_buses:
            view.stopped = False  # a process of this name that has not stopped speaks: it is up
        if view.is_leader and event.kind in ("lease.acquired", "lease.renewed"):
            self._one_leader(view)
        self.received += 1
        self.bus.publish(event, checked=True)

    def _one_leader(self, claimant: _NodeView) -> None:
        """Settle who leads after ``claimant`` said it leads: terms only grow and one node
        holds a term, so the higher term wins. A node killed while leading never says it
        lost the lease; without this it would show as leader next to its successor forever.
        A claim of a lower term than one already seen leading (sent late) is stale."""
        for view in self._nodes.values():
            if view is claimant or not view.is_leader or view.term is None or claimant.term is None:
                continue
            if view.term < claimant.term:
                view.is_leader = False
            elif view.term > claimant.term:
                claimant.is_leader = False


def _may_hold_non_finite(data: bytes | str) -> bool:
    """Whether JSON text may hold a NaN or an infinity (a substring search; true also when
    a text merely says so, which only costs a check)."""
    if isinstance(data, str):
        return "NaN" in data or "Infinity" in data
    return b"NaN" in data or b"Infinity" in data


def _note(view: _NodeView, event: Any) -> None:
    kind = event.kind
    if kind == "health":
        if view.health_ts is not None and event.ts > view.health_ts:
            view.health_every = event.ts - view.health_ts
        elif view.health_ts is None and view.started_ts is not None and event.ts > view.started_ts:
            # the first sample of a process seen starting: an interval after its start, or a bit more
            view.health_every = event.ts - view.started_ts
        view.health_ts = event.ts
        view.running = event.running
        view.cpu_percent = event.cpu_percent
        view.rss_bytes = event.rss_bytes
    elif kind in ("lease.acquired", "lease.renewed"):
        view.is_leader, view.term = True, event.term
    elif kind in ("lease.lost", "lease.released"):
        view.is_leader, view.term = False, event.term
    elif kind == "engine.stopped":
        view.stopped = True
    elif kind == "engine.started":
        view.stopped = False
        # a new process of this name holds no lease (an earlier one's may still be running out):
        # what it holds, its own lease events say
        view.is_leader = view.term = None
        # a new process: its samples are timed afresh (not from the last one before the restart)
        view.started_ts = event.ts
        view.health_ts = view.health_every = None
