"""Cluster-wide events: every node's bus relayed through one capped Redis stream.

An engine made with ``events="redis://host:6379/0"`` runs a
:class:`RedisEventRelay`. It publishes every event of this node's bus to the
stream (``XADD <stream> MAXLEN ~ N``), in batches (one pipelined round trip
per batch, after a short linger), and reads the stream back (``XREAD`` from
the last id it read, blocking) into :attr:`RedisEventRelay.bus`: an
:class:`~.bus.EventBus` holding the events of every node sharing the stream,
each with the ``node`` that emitted it. A dashboard or any other subscriber
watches the whole cluster there; :meth:`RedisEventRelay.nodes` sums it up
per node (last event, leadership, running runs, CPU and RSS from its health
samples).

The cluster bus is separate from the engine's own bus on purpose: the
engine's bus numbers *this* node's events (``seq``) and snapshots resume from
those numbers; events from other nodes have their own.

Nothing is lost silently. Events that do not fit the outgoing buffer while
Redis is unreachable are counted (``unsent``). Each node numbers its events,
so a reader that finds a gap in a node's numbers (the stream was trimmed past
what it had read, or the node could not send them) counts them as ``missed``,
per node, and announces them on the cluster bus as a ``bus.dropped`` event
naming that node. Connection failures back off (doubling up to 2 s) and the
reader resumes from its last id.

redis-py is imported when a relay is made (``pip install 'taskwatch[redis]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import BaseModel, ConfigDict, ValidationError

from .bus import DEFAULT_REPLAY, EventBus
from .errors import InvalidConfiguration, MissingDependency
from .events import BaseEvent, EventsDropped, event_from_json, event_to_json
from .redis_lease import redact_url

if TYPE_CHECKING:
    from collections.abc import Callable

log = logging.getLogger("taskwatch.events.redis")

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0


def _import_redis() -> tuple[Any, Any]:
    try:
        import redis.asyncio as redis_asyncio
        import redis.exceptions as redis_errors
    except ImportError as exc:
        raise MissingDependency("events='redis://...'", "redis", "redis") from exc
    return redis_asyncio, redis_errors


def _split_options(url: str) -> tuple[str, dict[str, str]]:
    """``url`` without the relay's own query options (``stream``, ``maxlen``), and those."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    mine = {key: value for key, value in query if key in ("stream", "maxlen")}
    rest = urlencode([(key, value) for key, value in query if key not in mine])
    return urlunsplit((parts.scheme, parts.netloc, parts.path, rest, parts.fragment)), mine


def _cancelling() -> bool:
    """Whether someone asked to cancel the current task."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class ClusterNode(BaseModel):
    """One node as the cluster's event stream shows it."""

    model_config = ConfigDict(frozen=True)

    node: str
    last_ts: float
    last_kind: str
    events: int
    missed: int = 0
    is_leader: bool | None = None
    term: int | None = None
    running: int | None = None
    cpu_percent: float | None = None
    rss_bytes: int | None = None
    stopped: bool = False


class RelayStats(BaseModel):
    """The relay's counters: what it sent, what it read, and what was lost on the way."""

    model_config = ConfigDict(frozen=True)

    stream: str
    connected: bool
    published: int
    unsent: int
    pending: int
    batches: int
    received: int
    missed: int
    malformed: int
    errors: int


class _NodeView:
    __slots__ = ("node", "last_seq", "last_ts", "last_kind", "events", "missed", "is_leader", "term",
                 "running", "cpu_percent", "rss_bytes", "stopped")

    def __init__(self, node: str) -> None:
        self.node = node
        self.last_seq: int | None = None
        self.last_ts = 0.0
        self.last_kind = ""
        self.events = 0
        self.missed = 0
        self.is_leader: bool | None = None
        self.term: int | None = None
        self.running: int | None = None
        self.cpu_percent: float | None = None
        self.rss_bytes: int | None = None
        self.stopped = False

    def model(self) -> ClusterNode:
        return ClusterNode(**{name: getattr(self, name) for name in ClusterNode.model_fields})


class RedisEventRelay:
    """Publishes a bus to a Redis stream and reads every node's events back from it.

    ``bus`` is the node's own bus to publish (``None`` for a reader only, as
    ``taskwatch attach redis://...`` is). ``stream`` and ``maxlen`` may also
    come in the URL's query (``redis://host:6379/0?stream=myapp:events&maxlen=50000``),
    which is how ``Engine(events=...)`` takes them. ``maxlen`` caps the stream
    (approximately: Redis trims whole blocks). ``batch`` bounds events per
    round trip, ``linger`` is how long the publisher waits to fill a batch,
    ``max_pending`` bounds the events waiting to be sent. ``since="$"`` reads
    from the moment the relay starts, ``"0"`` from the oldest event the stream
    still holds (events of a node before that count as missed).
    """

    def __init__(
        self,
        url: str,
        bus: EventBus | None = None,
        *,
        stream: str = "taskwatch:events",
        maxlen: int = 10_000,
        batch: int = 500,
        linger: float = 0.02,
        max_pending: int = 50_000,
        since: str = "$",
        replay: int = DEFAULT_REPLAY,
        read_block: float = 1.0,
    ) -> None:
        problems = []
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            problems.append(f"events must be a redis://, rediss:// or unix:// URL, got {url!r}")
        else:
            url, options = _split_options(url)
            stream = options.get("stream", stream)
            try:
                maxlen = int(options.get("maxlen", maxlen))
            except ValueError:
                problems.append(f"maxlen in the URL must be a count, got {options['maxlen']!r}")
        if not isinstance(stream, str) or not stream:
            problems.append(f"stream must be a non-empty string, got {stream!r}")
        for name, value in (("maxlen", maxlen), ("batch", batch), ("max_pending", max_pending)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                problems.append(f"{name} must be a positive count, got {value!r}")
        if not 0 <= linger <= 5:
            problems.append(f"linger must be between 0 and 5 seconds, got {linger!r}")
        if since not in ("$", "0"):
            problems.append(f"since must be '$' (from now) or '0' (the oldest kept), got {since!r}")
        if problems:
            raise InvalidConfiguration("the Redis event relay", problems)
        self._redis, self._errors = _import_redis()
        self.url = url
        self.stream = stream
        self.maxlen = maxlen
        self.batch = batch
        self.linger = linger
        self.max_pending = max_pending
        self.since = since
        self.read_block = read_block
        self.source = bus
        #: every node's events, as read from the stream
        self.bus = EventBus(node="cluster", replay=replay)
        self._outgoing: deque[str] = deque()
        self._wake = asyncio.Event()
        self._unsubscribe: Callable[[], None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writer: Any = None
        self._reader: Any = None
        self._nodes: dict[str, _NodeView] = {}
        self._last_id = "$"
        #: the last seq of the source bus handed to the publisher (so a restart resends nothing)
        self._sent_through = 0
        self._from_start = since == "0"
        self.connected = False
        self.published = 0
        self.unsent = 0
        self.batches = 0
        self.received = 0
        self.missed = 0
        self.malformed = 0
        self.errors = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._tasks:
            return
        self._wake = asyncio.Event()
        self._writer = self._redis.Redis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=5.0)
        # the reader blocks in XREAD: its socket must wait longer than that
        self._reader = self._redis.Redis.from_url(
            self.url, socket_timeout=self.read_block + 5.0, socket_connect_timeout=5.0
        )
        if self.since == "$":
            self._last_id = await self._current_last_id()
        else:
            self._last_id = "0-0"
        self.bus.reopen()
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read_loop(), name=f"taskwatch-events-read-{self.stream}")]
        if self.source is not None:
            # what the bus published before this start (the engine's start event,
            # registrations) goes out first; no await from here to the subscription
            for event in self.source.recent():
                if event.seq > self._sent_through:
                    self._offer(event)
            self._unsubscribe = self.source.add_callback(self._offer)
            self._tasks.append(loop.create_task(self._publish_loop(), name=f"taskwatch-events-send-{self.stream}"))

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
        if self._writer is not None and self._outgoing:
            try:
                async with asyncio.timeout(max(0.05, deadline - loop.time())):
                    await self._flush()
            except (TimeoutError, self._errors.ConnectionError, self._errors.TimeoutError, OSError) as exc:
                log.warning("%d events not sent to %s at stop: %r", len(self._outgoing), self.stream, exc)
        for client in (self._writer, self._reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._writer = self._reader = None
        self.connected = False
        self.bus.close()

    async def __aenter__(self) -> RedisEventRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ what it knows

    @property
    def public_url(self) -> str:
        """The URL without its password, for headers and logs."""
        return redact_url(self.url)

    def nodes(self) -> list[ClusterNode]:
        """Every node seen on the stream, by name.

        A node that never said anything about the lease is a follower once
        another node has said it leads (followers publish no lease events).
        """
        views = [self._nodes[name] for name in sorted(self._nodes)]
        someone_leads = any(view.is_leader for view in views)
        out = []
        for view in views:
            info = view.model()
            if someone_leads and info.is_leader is None:
                info = info.model_copy(update={"is_leader": False})
            out.append(info)
        return out

    def stats(self) -> RelayStats:
        return RelayStats(
            stream=self.stream,
            connected=self.connected,
            published=self.published,
            unsent=self.unsent,
            pending=len(self._outgoing),
            batches=self.batches,
            received=self.received,
            missed=self.missed,
            malformed=self.malformed,
            errors=self.errors,
        )

    # ------------------------------------------------------------------ publishing

    def _offer(self, event: BaseEvent) -> None:
        self._sent_through = max(self._sent_through, event.seq)
        if len(self._outgoing) >= self.max_pending:
            self.unsent += 1
            return
        self._outgoing.append(event_to_json(event))
        if len(self._outgoing) == 1 or len(self._outgoing) >= self.batch:
            self._wake.set()

    async def _publish_loop(self) -> None:
        delay = 0.0
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.linger and len(self._outgoing) < self.batch:
                # a short wait turns a burst into one round trip instead of many
                await asyncio.sleep(self.linger)
            try:
                await self._flush()
                delay = 0.0
                if _cancelling():
                    # redis-py can swallow a cancel that lands in a round trip
                    raise asyncio.CancelledError
            except (self._errors.ConnectionError, self._errors.TimeoutError, OSError) as exc:
                if _cancelling():
                    raise asyncio.CancelledError from exc
                self.errors += 1
                self.connected = False
                delay = min(_BACKOFF_MAX, delay * 2 if delay else _BACKOFF_MIN)
                log.warning("publishing events to %s failed (%r); retrying in %.2g s", self.stream, exc, delay)
                await asyncio.sleep(delay)
                self._wake.set()

    async def _flush(self) -> None:
        while self._outgoing:
            batch = [self._outgoing.popleft() for _ in range(min(self.batch, len(self._outgoing)))]
            try:
                pipe = self._writer.pipeline(transaction=False)
                for data in batch:
                    pipe.xadd(self.stream, {"e": data}, maxlen=self.maxlen, approximate=True)
                await pipe.execute()
            except BaseException:
                # not sent: back to the front, in order, for the next attempt
                self._outgoing.extendleft(reversed(batch))
                raise
            self.connected = True
            self.published += len(batch)
            self.batches += 1

    # ------------------------------------------------------------------ reading

    async def _current_last_id(self) -> str:
        try:
            newest = await self._reader.xrevrange(self.stream, count=1)
        except (self._errors.ConnectionError, self._errors.TimeoutError, OSError):
            return "$"
        if not newest:
            return "0-0"
        entry_id = newest[0][0]
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    async def _read_loop(self) -> None:
        delay = 0.0
        while True:
            try:
                reply = await self._reader.xread(
                    {self.stream: self._last_id}, count=self.batch, block=int(self.read_block * 1000)
                )
                self.connected = True
                delay = 0.0
                if _cancelling():
                    # redis-py can swallow a cancel that lands in a blocking read
                    raise asyncio.CancelledError
            except (self._errors.ConnectionError, self._errors.TimeoutError, OSError) as exc:
                if _cancelling():
                    # redis-py turns a cancel in mid-read into a connection error
                    raise asyncio.CancelledError from exc
                self.errors += 1
                self.connected = False
                delay = min(_BACKOFF_MAX, delay * 2 if delay else _BACKOFF_MIN)
                log.warning("reading events from %s failed (%r); retrying in %.2g s", self.stream, exc, delay)
                await asyncio.sleep(delay)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    self._take(fields.get(b"e") or fields.get("e"))

    def _take(self, data: bytes | str | None) -> None:
        try:
            if data is None:
                raise ValueError("stream entry without an 'e' field")
            event = event_from_json(data)
        except (ValueError, ValidationError):
            self.malformed += 1
            return
        view = self._nodes.get(event.node)
        if view is None:
            view = self._nodes[event.node] = _NodeView(event.node)
            # reading from the oldest kept event: what came before it was trimmed away
            view.last_seq = 0 if self._from_start else None
        if view.last_seq is not None:
            if event.seq > view.last_seq + 1:
                gap = event.seq - view.last_seq - 1
                view.missed += gap
                self.missed += gap
                self.bus.publish(EventsDropped(node=event.node, ts=event.ts, count=gap, total=view.missed))
            elif event.seq <= view.last_seq:
                # numbers start again: the node restarted (a new engine, a new bus)
                view.stopped = False
        view.last_seq = event.seq
        view.last_ts = event.ts
        view.last_kind = event.kind  # type: ignore[attr-defined]
        view.events += 1
        self._note(view, event)
        self.received += 1
        self.bus.publish(event)

    @staticmethod
    def _note(view: _NodeView, event: Any) -> None:
        kind = event.kind
        if kind == "health":
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
