"""Cluster-wide events: every node's bus relayed through one capped Redis stream.

An engine made with ``events="redis://host:6379/0"`` runs a
:class:`RedisEventRelay`. It publishes every event of this node's bus to the
stream (``XADD <stream> MAXLEN ~ N``), in batches (one pipelined round trip
per batch, after a short linger), and reads the stream back (``XREAD`` from
the last id it read, blocking) into :attr:`RedisEventRelay.bus`: an
:class:`~.bus.EventBus` holding the events of every node sharing the stream,
each with the ``node`` that emitted it. The buffering, coalescing, per-node
gap accounting and the per-node summary are the base's (``relay.py``); this
module says how events go through Redis. Connection failures back off
(doubling up to 2 s) and the reader resumes from its last id, also after the
relay is stopped and started again.

Every record names the bus that numbered it (``b``, the relay's
``bus_id``): a batch whose answer was lost (Redis stalled past the writer's
socket timeout, then ran it) is sent again, and readers leave the second copy
out instead of taking the numbers starting again for a restarted node.

redis-py is imported when a relay is made (``pip install 'redis>=5.0'``, the ``redis`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from .bus import DEFAULT_REPLAY, EventBus
from .errors import InvalidConfiguration, MissingDependency, RelayRefused
from .redis_lease import redis_refused, redis_url_problems
from .urls import password_problem, redact_url, shown_url
from .relay import READING, ClusterNode, EventRelay, Outgoing, RelayStats, cancelling

#: seconds the start asks Redis for the stream's newest entry before reading from "now" on anyway
_ASK_TIMEOUT = 1.0

__all__ = ["ClusterNode", "RedisEventRelay", "RelayStats"]


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


class RedisEventRelay(EventRelay):
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
        self._redis, self._errors = _import_redis()
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            shown = shown_url(url) if isinstance(url, str) else url
            problems.append(f"events must be a redis://, rediss:// or unix:// URL, got {shown!r}")
        elif (problem := password_problem(url)) is not None:
            # before the options are split off: a '?' in the password would split it
            problems.append(f"url {redact_url(url)}: {problem}")
        else:
            url, options = _split_options(url)
            # a port that is no number, a database index the path cannot be, an option value
            # redis-py cannot read: refused here, as a lease's URL is, not at every connect (with
            # a traceback whose locals hold the password)
            problems.extend(redis_url_problems(url, self._redis))
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
        super().__init__(
            bus, stream=stream, batch=batch, linger=linger, max_pending=max_pending, from_start=since == "0",
            replay=replay,
        )
        # every error Redis answers is retried, with its reason shown, as an outage is: one the
        # server keeps giving after the start (the stream's key made another type, a password
        # changed) must not end the loop that met it, leaving the relay deaf and "connected"
        self.transient_errors = (self._errors.RedisError, OSError)
        self.url = url
        self.maxlen = maxlen
        self.since = since
        self.read_block = read_block
        self._writer: Any = None
        self._reader: Any = None
        #: the id of the last entry read (None: not started yet; "$": Redis could not say)
        self._last_id: str | None = None

    @property
    def public_url(self) -> str:
        """The URL without its password, for headers and logs."""
        return redact_url(self.url)

    async def _open(self) -> None:
        self._writer = self._redis.Redis.from_url(self.url, socket_timeout=5.0, socket_connect_timeout=5.0)
        # the reader blocks in XREAD: its socket must wait longer than that
        self._reader = self._redis.Redis.from_url(
            self.url, socket_timeout=self.read_block + 5.0, socket_connect_timeout=5.0
        )
        if self._last_id is None or self._last_id == "$":
            try:
                # asked whatever `since` says: a server that refuses this relay says so here, at once
                newest = await self._current_last_id()
            except RelayRefused:
                await self._close()
                raise
            self._last_id = newest if self.since == "$" else "0-0"
        # otherwise a restart reads on from where the last run stopped: the per-node views
        # (last seqs) are still there, and what came while stopped is read, not taken for
        # missed, as long as the stream still has it

    async def _close(self) -> None:
        for client in (self._writer, self._reader):
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.aclose()
        self._writer = self._reader = None

    async def _send(self, batch: list[Outgoing]) -> None:
        pipe = self._writer.pipeline(transaction=False)
        for record in batch:
            fields: dict[str, Any] = {"e": record.data, "b": self.bus_id}
            if record.skipped:
                fields["c"] = record.skipped
            pipe.xadd(self.stream, fields, maxlen=self.maxlen, approximate=True)
        await pipe.execute()

    async def _current_last_id(self) -> str:
        try:
            # bounded well below the reader's socket timeout: the engine's start waits for this,
            # and a Redis that takes connections but does not answer (a stopped process) would
            # hold it for read_block + 5 s, where an unreachable one is passed over at once
            async with asyncio.timeout(_ASK_TIMEOUT):
                newest = await self._reader.xrevrange(self.stream, count=1)
        except TimeoutError:
            return "$"
        except self.transient_errors as exc:
            if redis_refused(exc, self._errors):
                # a wrong password, a database index the server does not have: no outage, which
                # would be retried for ever, showing the dashboard DISCONNECTED with no reason
                raise RelayRefused(self.public_url, f"{type(exc).__name__}: {exc}") from None
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
                self._went_through(READING)
                if cancelling():
                    # redis-py can swallow a cancel that lands in a blocking read
                    raise asyncio.CancelledError
            except self.transient_errors as exc:
                delay = await self._back_off(exc, delay, READING)
                continue
            for _stream, entries in reply or ():
                for entry_id, fields in entries:
                    self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
                    skipped = fields.get(b"c") or fields.get("c") or 0
                    try:
                        skipped = int(skipped)
                    except ValueError:
                        skipped = 0
                    # records written before buses were named have none: read as before
                    bus = fields.get(b"b") or fields.get("b")
                    if isinstance(bus, bytes):
                        bus = bus.decode(errors="replace")
                    self._take(fields.get(b"e") or fields.get("e"), skipped, bus)
