"""The leader lease kept in Redis: one leader among engines in any number of processes and hosts.

:class:`RedisLease` implements :class:`~.lease.Lease` on redis-py's asyncio
client, the way services already elect their singleton workers, with the
holes of the hand-written versions closed:

- **Acquire** is one Lua script: if the key is free it ``INCR``\\ s the term
  counter and ``SET key value NX PX ttl``; if the key is this lease object's
  own (say the node stepped down after a slow renew and the key is still
  there) it takes it again with a new term; otherwise it refuses. The value is
  ``"<term>:<token>:<node_id>"``, where the token is random per
  :class:`RedisLease` object and process (made again in a forked child), so
  two processes misconfigured with one node id never take each other's lease.
- **Renew** and **release** are compare-and-set scripts on that whole value:
  only the holder of that term may extend or delete it (a plain ``PEXPIRE``
  would let a stale holder extend a lease someone else took).
- **Terms** come from ``INCR`` on ``<key>:term`` and only grow. A Redis that
  lost its data would start the counter again, so every acquire also passes
  the highest term this object has seen and the script raises the counter to
  it first. Keep the counter durable (``appendonly yes``, ``appendfsync
  always``) for the guarantee to hold across a Redis crash.
- **A Redis that lost its data** (restarted without persistence, flushed)
  has lost the key of a holder that may still think it leads, until its own
  deadline. The counter behind a term the claimant saw gives the loss away:
  a claimant that saw another holder since its own last term then takes the
  lease only a ttl after it first noticed, when that holder's deadline is
  surely past (its last renew was sent before the loss). The holder itself
  takes it back at once: it stepped down when its renew found no key.
- **Expiry** is judged on this host's monotonic clock: a holder's deadline is
  the moment it *sent* the acquire or renew plus the ttl, minus a safety
  margin for clock-rate drift and the time stepping down takes. Redis starts
  its own ttl only after receiving the command, so the key outlives the
  holder's deadline: a leader that cannot renew steps down before anyone else
  can acquire. Wall clocks of different hosts are never compared; ``now()``
  is the monotonic clock expressed in UNIX seconds, so ``expires_at`` reads
  like a time of day.
- **Refusals**: an error Redis answers with (a wrong password, a database
  index it does not have) is no outage: it raises :class:`LeaseRefused`,
  which fails ``engine.start()``, and is shown in ``leadership().backend``
  until a call succeeds. A URL that could never work (a port out of range, a
  database that is not a number, an option redis-py does not take) is refused
  when the lease is made.
- **Connections** are made lazily in the running loop, with no retries inside
  a call (the elector bounds each call itself); after a connection error, or
  a call the elector gave up waiting for (a hung or blackholed Redis raises
  nothing before that: see :meth:`RedisLease.timed_out`), the lease waits
  ``backoff`` seconds, doubling up to ``backoff_max``, before it touches the
  network again, failing fast with :class:`LeaseUnavailable` meanwhile, and
  reports Redis unreachable until a call is answered again (a call refused by
  this client's own full connection pool is neither: Redis was not asked). A command written
  to a Redis that hangs still runs when it resumes, but only the one in flight
  when it hung: the call given up on closes its connection, and a new one
  waits for Redis to answer its handshake before it sends anything. A Redis
  restart therefore costs the leader its leadership and runs a new election,
  without a crash or a stray task.

redis-py is an optional dependency (``pip install 'redis>=5.0'``, the ``redis`` extra): it is
imported when a :class:`RedisLease` is made, never by ``import taskwatch.engine``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
import re
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, urlsplit

from .errors import InvalidConfiguration, LeaseRefused, MissingDependency
from .lease import Lease, LeaseState, ReportsHealth, StoreHealth, seconds_option
from .urls import password_problem, redact_url

T = TypeVar("T")

#: the first wait after a failure (doubling up to backoff_max), unless the renew interval is shorter
_BACKOFF = 0.05

# KEYS[1] the lease, KEYS[2] its term counter
# ARGV[1] the claimant "<token>:<node_id>", ARGV[2] ttl in ms, ARGV[3] highest term the claimant saw,
# ARGV[4] "1" if it may take the lease even though Redis lost its data (see RedisLease.acquire)
# returns {1, value, ttl} taken; {0, value, pttl} held by another; {2, '', 0} data lost, not taken
_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if current then
  local claimant = string.sub(current, string.find(current, ':', 1, true) + 1)
  if claimant ~= ARGV[1] then
    return {0, current, redis.call('PTTL', KEYS[1])}
  end
end
if tonumber(redis.call('GET', KEYS[2]) or '0') < tonumber(ARGV[3]) then
  if ARGV[4] ~= '1' then
    return {2, '', 0}
  end
  redis.call('SET', KEYS[2], ARGV[3])
end
local value = redis.call('INCR', KEYS[2]) .. ':' .. ARGV[1]
if current then
  redis.call('SET', KEYS[1], value, 'XX', 'PX', ARGV[2])
else
  redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[2])
end
return {1, value, tonumber(ARGV[2])}
"""

# KEYS[1] the lease; ARGV[1] the exact value the holder wrote, ARGV[2] ttl in ms
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS[1] the lease; ARGV[1] the exact value the holder wrote
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] the lease: its value and remaining ms, read together
_READ = """
return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}
"""

_SCHEMES = ("redis", "rediss", "unix")

#: the path of a redis:// URL: nothing, or the database index
_DB_PATH = re.compile(r"/?[0-9]*")

#: answers from a Redis that cannot serve now but will (a replica until a failover ends, a full
#: memory, a cluster reconfiguring), counted as unreachable as a connection failure is
_PASSING = ("ReadOnlyError", "OutOfMemoryError", "TryAgainError", "ClusterDownError")

#: connection errors to redis-py that are the server refusing this client, not an outage
_REFUSED_CONNECTIONS = ("AuthenticationError", "AuthorizationError")

#: this client's own connection pool is full: Redis was not asked, and says nothing of being down
_POOL_FULL = ("MaxConnectionsError",)

#: Redis clients a forked process inherited from its parent's leases: never used, never collected
#: (see RedisLease._forked)
_INHERITED: list[Any] = []


def _classes(errors: Any, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    """The exception classes of ``names`` this redis-py has (an older one may lack some)."""
    return tuple(getattr(errors, name) for name in names if hasattr(errors, name))


def redis_refused(exc: BaseException, errors: Any) -> bool:
    """Whether Redis answered ``exc`` for good (an outage passes; a wrong password, a database
    index the server does not have, does not); ``errors`` is ``redis.exceptions``."""
    # redis-py counts a refused password as a connection error: it is no outage
    if isinstance(exc, _classes(errors, _REFUSED_CONNECTIONS)):
        return True
    if isinstance(exc, OSError | errors.ConnectionError | errors.TimeoutError):
        return False
    return not isinstance(exc, _classes(errors, _PASSING))


def _import_redis() -> tuple[Any, Any, Any, Any]:
    """redis-py's asyncio client, its exceptions, Retry and NoBackoff; a clear error without it."""
    try:
        import redis.asyncio as redis_asyncio
        import redis.exceptions as redis_errors
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        raise MissingDependency("RedisLease", "redis", "redis") from exc
    return redis_asyncio, redis_errors, Retry, NoBackoff


def redis_url_problems(url: object, redis_asyncio: Any) -> list[str]:
    """What makes ``url`` a Redis URL no connection could ever be made with, judged as
    redis-py reads it (which would otherwise fail every call, or quietly use database 0)."""
    if not isinstance(url, str) or urlsplit(url).scheme not in _SCHEMES:
        shown = redact_url(url) if isinstance(url, str) else url
        return [f"url must be a redis://, rediss:// or unix:// URL, got {shown!r}"]
    shown = redact_url(url)
    if (problem := password_problem(url)) is not None:
        return [f"url {shown}: {problem}"]  # before redis-py's reading, whose error quotes the password
    parts = urlsplit(url)
    try:
        # the port, the scheme's "//" and the values of the options redis-py knows
        options = redis_asyncio.connection.parse_url(url)
    except ValueError as exc:
        return [f"url {shown}: {exc}"]
    problems = []
    if parts.scheme == "unix":
        if not parts.path:
            problems.append(f"url {shown} names no socket: write unix:///path/to/redis.sock")
    elif not _DB_PATH.fullmatch(unquote(parts.path)):
        problems.append(
            f"url {shown}: its path names database {unquote(parts.path).lstrip('/')!r}; a database is "
            "given by its index, 0 or more (redis://host:6379/0)"
        )
    elif parts.path.strip("/") and any(name == "db" for name, _ in parse_qsl(parts.query)):
        problems.append(f"url {shown} gives the database both as its path and as ?db=; give it in one place")
    db = options.get("db", 0)
    if db < 0:
        problems.append(f"url {shown}: db={db}; a database index is 0 or more")
    if not problems:
        try:
            # what redis-py does with the URL's other options on every connection, done once
            # here, without connecting: an option it does not take fails it with a TypeError
            redis_asyncio.Redis.from_url(url).connection_pool.make_connection()
        except TypeError as exc:
            problems.append(f"url {shown}: an option redis-py does not take ({exc})")
    return problems


class RedisLease(ReportsHealth, Lease):
    """A leader lease in Redis, shared by every engine given the same ``url`` and ``key``.

    ``ttl`` is how long an acquire or renew keeps the lease (seconds);
    ``renew_interval`` defaults to a third of it. ``safety_margin`` (default 5 %
    of the ttl) is taken off every deadline this node computes. Give each
    engine its own :class:`RedisLease` (the object's token identifies the holder).
    """

    def __init__(
        self,
        url: str,
        *,
        key: str = "taskwatch:leader",
        ttl: float = 15.0,
        renew_interval: float | None = None,
        safety_margin: float | None = None,
        backoff: float | None = None,
        backoff_max: float | None = None,
    ) -> None:
        self._redis_module, self._redis_errors, self._retry, self._no_backoff = _import_redis()
        problems = redis_url_problems(url, self._redis_module)
        if not isinstance(key, str) or not key:
            problems.append(f"key must be a non-empty string, got {key!r}")
        try:
            super().__init__(ttl, renew_interval=renew_interval)
        except InvalidConfiguration as exc:
            # named together: fixing one only to be told of the next is a slow way to configure
            raise InvalidConfiguration("RedisLease", [*problems, *exc.problems]) from None
        # the checked values from here on: a str or a bool must not reach the arithmetic below
        margin = (
            self.ttl * 0.05
            if safety_margin is None
            else seconds_option("safety_margin", safety_margin, problems, positive=False)
        )
        if margin is not None and not margin < self.ttl - self.renew_interval:
            problems.append(
                f"safety_margin must be at least 0 and leave more than one renew interval of the ttl, got {margin!r}"
            )
        top = self.renew_interval if backoff_max is None else seconds_option("backoff_max", backoff_max, problems)
        # the default never exceeds the cap: a short ttl (a short renew interval) lowers both
        step = (
            (None if top is None else min(_BACKOFF, top))
            if backoff is None
            else seconds_option("backoff", backoff, problems)
        )
        if step is not None and top is not None and step > top:
            problems.append(f"backoff must be at most backoff_max ({top!r}), got {backoff!r}")
        if problems or margin is None or step is None or top is None:
            raise InvalidConfiguration("RedisLease", problems)
        self.url = url
        self.key = key
        self.term_key = f"{key}:term"
        self.safety_margin = margin
        self.backoff = step
        self.backoff_max = top
        self._token = os.urandom(8).hex()
        #: the process the token was made in (see token)
        self._token_pid = os.getpid()
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        # the monotonic clock, read as UNIX seconds: anchored once, never stepped by NTP
        self._anchor = time.time() - time.monotonic()
        self._highest_term = 0
        #: the term of this object's last acquire
        self._own_term = 0
        #: until when its last acquire or renew holds the lease, by this object's clock (Redis
        #: keeps the key at least that long: the safety margin is taken off)
        self._held_until = 0.0
        #: when Redis was found to have lost its data: no acquire before this (see acquire)
        self._hold_off_until: float | None = None
        self._where = redact_url(url)
        self._health = StoreHealth(self._where, step, top)

    # ------------------------------------------------------------------ clock and identity

    def now(self) -> float:
        return self._anchor + time.monotonic()

    @property
    def token(self) -> str:
        """The random token written beside the node id: what tells this holder from another
        process's under the same node id. Made again in a process forked from the one that made
        it: a preforking server builds its app (the engine and this lease) before it forks its
        workers, which would otherwise all be one holder, taking the lease from each other."""
        self._forked()
        return self._token

    def _forked(self) -> None:
        """In a process forked from the one that made the token: a token of its own."""
        if os.getpid() == self._token_pid:
            return
        self._token, self._token_pid = os.urandom(8).hex(), os.getpid()
        # what the parent took is not this process's to take back at once (see acquire), and
        # its connections are not this process's to use, nor to close: collected here, their
        # transports would close through the parent's copied event loop, taking the parent's
        # sockets out of the epoll the two processes share (the parent's renews then went
        # unanswered). So the inherited client is kept, unused, for this process's life
        self._own_term = 0
        self._held_until = 0.0
        if self._client is not None:
            _INHERITED.append(self._client)
        self._client, self._scripts = None, {}

    def _claimant(self, node_id: str) -> str:
        return f"{self.token}:{node_id}"

    def _value(self, node_id: str, term: int) -> str:
        return f"{term}:{self._claimant(node_id)}"

    def _parse(self, value: bytes | str | None, pttl: int, sent: float) -> LeaseState | None:
        """The state a stored value and its remaining ms describe, judged from ``sent``."""
        if value is None or pttl <= 0:
            return None
        text = value.decode() if isinstance(value, bytes) else value
        term, _token, holder = text.split(":", 2)
        self._highest_term = max(self._highest_term, int(term))
        return LeaseState(holder=holder, term=int(term), expires_at=sent + pttl / 1000)

    def describe(self) -> str:
        waiting = (
            ", Redis lost the lease's data: waiting out the last holder's lease"
            if self._hold_off_until is not None and self.now() < self._hold_off_until
            else ""
        )
        return f"redis {self._where} key={self.key} ttl={self.ttl:g}s{self._health.describe()}{waiting}"

    def timed_out(self, operation: str, after: float) -> None:
        # the elector's bound (at most the renew interval, less near the deadline) runs out
        # before the socket timeout: without this a hung Redis would never count as down
        self._health.failed(f"TimeoutError: no answer to {operation} within {after:.3g} s")

    # ------------------------------------------------------------------ connection

    def _redis(self) -> Any:
        self._forked()
        if self._client is None:
            self._client = self._redis_module.Redis.from_url(
                self.url,
                socket_timeout=self.renew_interval,
                socket_connect_timeout=self.renew_interval,
                # the elector bounds and repeats every call itself; a retry inside
                # one would outlast the deadline it is meant to meet
                retry=self._retry(self._no_backoff(), 0),
                health_check_interval=0,
            )
            self._scripts = {
                name: self._client.register_script(src)
                for name, src in (("acquire", _ACQUIRE), ("renew", _RENEW), ("release", _RELEASE), ("read", _READ))
            }
        return self._client

    async def _run(self, call: Callable[[Any, dict[str, Any]], Awaitable[T]]) -> T:
        """One call to Redis, with backoff after failures."""
        self._health.check()
        errors = self._redis_errors
        client = self._redis()
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        try:
            result = await call(client, self._scripts)
            if task is not None and task.cancelling() > cancels:
                # redis-py can swallow a cancel that lands mid-command: pass it on
                raise asyncio.CancelledError
        except (errors.RedisError, OSError) as exc:
            if task is not None and task.cancelling() > cancels:
                raise asyncio.CancelledError from exc
            if isinstance(exc, _classes(errors, _POOL_FULL)):
                # no backoff, no "unreachable": the next call may well get a connection
                raise
            error = f"{type(exc).__name__}: {exc}"
            if self._refused(exc):
                self._health.refused(error)
                raise LeaseRefused(self._where, error) from exc
            raise self._health.failed(error) from exc
        self._health.answered()
        return result

    def _refused(self, exc: BaseException) -> bool:
        return redis_refused(exc, self._redis_errors)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._scripts = {}
        if client is not None:
            await client.aclose()

    # ------------------------------------------------------------------ the Lease interface

    async def acquire(self, node_id: str) -> LeaseState | None:
        sent = self.now()
        ttl_ms = max(1, int(self.ttl * 1000))
        claimant = self._claimant(node_id)
        # after Redis lost its data, the last holder may think it leads until its own deadline,
        # which is within a ttl of the loss (its last renew was sent before it). This object may
        # take the lease at once if that holder was itself and its lease has not run out yet:
        # its key could not have expired, so no newer term can have been handed out since (it
        # stepped down when it found the key gone). Otherwise a ttl after it first saw the loss:
        # a holder paused or cut off past its lease may have missed a newer term
        hold_off = self._hold_off_until
        lost_own = self._own_term >= self._highest_term and sent < self._held_until
        may_take = lost_own or (hold_off is not None and sent >= hold_off)
        won, value, pttl = await self._run(
            lambda _c, s: s["acquire"](
                keys=[self.key, self.term_key], args=[claimant, ttl_ms, self._highest_term, int(may_take)]
            )
        )
        if won == 2:
            if hold_off is None:
                self._hold_off_until = sent + self.ttl
            return None
        self._hold_off_until = None
        if not won:
            self._parse(value, int(pttl), sent)  # remember the term it saw
            return None
        state = self._parse(value, int(pttl), sent)
        assert state is not None
        self._own_term = state.term
        self._held_until = sent + self.ttl - self.safety_margin
        return state.model_copy(update={"expires_at": self._held_until})

    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        sent = self.now()
        ttl_ms = max(1, int(self.ttl * 1000))
        value = self._value(node_id, term)
        done = await self._run(lambda _c, s: s["renew"](keys=[self.key], args=[value, ttl_ms]))
        if not done:
            return None
        self._held_until = sent + self.ttl - self.safety_margin
        return LeaseState(holder=node_id, term=term, expires_at=self._held_until)

    async def release(self, node_id: str, term: int) -> bool:
        # given up (whether Redis hears it or not): another node may take the lease from now on,
        # so after a loss of Redis's data this one no longer knows that no newer term went out
        # (see acquire), and waits a ttl like any other
        self._held_until = 0.0
        value = self._value(node_id, term)
        return bool(await self._run(lambda _c, s: s["release"](keys=[self.key], args=[value])))

    async def holder(self) -> LeaseState | None:
        sent = self.now()
        value, pttl = await self._run(lambda _c, s: s["read"](keys=[self.key]))
        return self._parse(value, int(pttl), sent)

    async def check(self, node_id: str, term: int) -> bool:
        value = self._value(node_id, term)
        current = await self._run(lambda c, _s: c.get(self.key))
        if current is None:
            return False
        text = current.decode() if isinstance(current, bytes) else current
        self._highest_term = max(self._highest_term, int(text.split(":", 1)[0]))
        return bool(text == value)

    def __repr__(self) -> str:
        return f"<RedisLease {self.describe()}>"
