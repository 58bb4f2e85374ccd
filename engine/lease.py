"""Leader leases and the elector that holds one for an engine.

A :class:`Lease` is the shared record that says which node leads: acquired
with a TTL, kept alive by renewing, released on shutdown. Every successful
acquire starts a new *term*, a number that only ever grows; it is the fencing
token leader-only work attaches to destructive writes, so a store can refuse
writes from a stale leader. Every operation that changes the lease is a
compare-and-set on (holder, term), and times are UNIX seconds on the lease's
own clock (:meth:`Lease.now`), so the same interface can sit on a shared store
(Redis, a database row) and be read by other processes.
:class:`InProcessLease` is the in-memory version: several engines in one
process that share one object elect one leader; ``RedisLease``
(``engine/redis_lease.py``) elects one across processes and hosts.

:class:`LeaderElector` is the engine's side: it makes a first acquire attempt
at start, then one background task renews the lease (or, as a follower, tries
to acquire it) every ``renew_interval`` seconds, publishes every change as an
event and tells its listeners (the supervisor) when leadership starts or
ends. A leader also wakes when its own view of the lease lapses, so it steps
down then even if a renew is late, and :meth:`LeaderElector.verify` asks the
lease itself before ``ctx.ensure_leader()`` lets destructive work go on.
Without a lease an engine leads from its start to its stop whatever other nodes
do: no lease granted that, so nothing stops another node from leading too. Its
:class:`Leadership` says so with ``backend=None`` (and ``expires_at=None``);
its ``term`` is 1 on every such node, a placeholder that fences nothing. Nodes
sharing a store without a lease all lead and all run every leader-only worker
(the supervisor logs a warning when it sees another live node on the store).
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError

from .hop import as_future, cancel_and_wait, spawn
from .errors import InvalidConfiguration, LeaseRefused, LeaseUnavailable, NotATaskwatchStore
from .events import LeaseAcquired, LeaseEvent, LeaseLost, LeaseReleased, LeaseRenewed
from .options import MIN_INTERVAL, LeaseOptions, PositiveSeconds, Seconds, check_options

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("taskwatch.lease")

T = TypeVar("T")

#: how long after a seen holder's lease lapses a follower tries to take it
_TAKEOVER_SLACK = 0.01

#: lease calls that only read: one answered says nothing of the others (a store may let a node
#: read the lease and refuse it the writes that take or keep it)
_READS = frozenset({"holder lookup", "check"})

#: called with True when this node becomes leader, False when it stops being one
LeadershipListener = Callable[[bool], None]

#: the elector a lease call is made for (None: made outside any, by a test or an operator): what
#: tells an :class:`InProcessLease`'s holders apart, as a remote lease's token does its processes'
_CALLER: ContextVar[object | None] = ContextVar("taskwatch_lease_caller", default=None)

_SECONDS = TypeAdapter(Seconds)
_POSITIVE_SECONDS = TypeAdapter(PositiveSeconds)


def seconds_option(option: str, value: object, problems: list[str], *, positive: bool = True) -> float | None:
    """``value`` read as seconds the way the options models read them (a finite number, not a
    bool; above 0 when ``positive``, else at least 0), or None with the problem added to ``problems``."""
    try:
        return (_POSITIVE_SECONDS if positive else _SECONDS).validate_python(value)
    except ValidationError as exc:
        message = exc.errors(include_url=False)[0]["msg"].removeprefix("Value error, ")
        problems.append(f"{option}={value!r}: {message}")
        return None


class Leadership(BaseModel):
    """Who leads, as seen from one node.

    ``term`` and ``expires_at`` are this node's own when it leads, otherwise
    those of the holder it last saw (``None`` when it has seen none).
    ``backend`` says where the lease lives. Without a lease it is ``None``, and
    then nobody elected this node: it leads because nothing can stop it, and so
    does every other node without one, even on a shared store (``is_leader``
    True, ``holder`` itself, ``expires_at`` ``None``, and ``term`` 1 on each of
    them: no lease granted that term, and it fences nothing).
    """

    model_config = ConfigDict(frozen=True)

    node_id: str
    is_leader: bool
    holder: str | None
    term: int
    expires_at: float | None = None
    backend: str | None = None


class LeaseState(BaseModel):
    """One term of a lease: who holds it, its fencing token, when it lapses (UNIX seconds)."""

    model_config = ConfigDict(frozen=True)

    holder: str
    term: int
    expires_at: float


class Lease(ABC):
    """A leader lease shared by the nodes that compete for leadership.

    Implementations must make each method atomic with respect to other nodes
    and must keep terms strictly increasing over the lease's whole life
    (release included), so no two leaders ever share a fencing token.

    ``ttl`` is how long an acquire or renew keeps the lease; ``renew_interval``
    (default ``ttl / 3``) is how often a holder renews. It must leave room for
    at least one more renew before the lease lapses, so it is at most ``ttl / 2``.
    """

    def __init__(self, ttl: float, *, renew_interval: float | None = None) -> None:
        # the checked values, not the given ones: "2" is read as 2.0, as every option is
        options = check_options(LeaseOptions, type(self).__name__, ttl=ttl, renew_interval=renew_interval)
        ttl = options.ttl
        interval = ttl / 3 if options.renew_interval is None else options.renew_interval
        if interval > ttl / 2:
            raise InvalidConfiguration(
                type(self).__name__,
                [
                    f"renew_interval={interval!r}: at most half the ttl ({ttl / 2:g} s), "
                    "so a holder gets a second chance to renew"
                ],
            )
        if interval < MIN_INTERVAL:
            # the elector wakes once per interval: below a millisecond it only burns CPU and events
            problem = (
                f"ttl={ttl!r}: its renew interval (a third of it) is under {MIN_INTERVAL:g} s; "
                f"use a ttl of at least {3 * MIN_INTERVAL:g} s"
                if options.renew_interval is None
                else f"renew_interval={interval!r}: Input should be greater than or equal to {MIN_INTERVAL:g}"
            )
            raise InvalidConfiguration(type(self).__name__, [problem])
        self.ttl = ttl
        self.renew_interval = interval

    def now(self) -> float:
        """The lease's clock (UNIX seconds); expiry is judged against it."""
        return time.time()

    @abstractmethod
    async def acquire(self, node_id: str) -> LeaseState | None:
        """Take the lease for ``node_id`` if it is free, expired, or already ``node_id``'s.

        Success always starts a new, higher term. Returns ``None`` when another
        node holds an unexpired lease.
        """

    @abstractmethod
    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        """Extend the lease by ``ttl`` if ``node_id`` still holds ``term`` unexpired, else ``None``."""

    @abstractmethod
    async def release(self, node_id: str, term: int) -> bool:
        """Give the lease up if ``node_id`` still holds ``term`` unexpired; says whether it did."""

    @abstractmethod
    async def holder(self) -> LeaseState | None:
        """The current unexpired term, or ``None`` if nobody holds the lease."""

    # optional: a lease on a remote store overrides these

    async def check(self, node_id: str, term: int) -> bool:
        """Whether ``node_id`` holds ``term`` unexpired right now, asked of the lease itself.

        ``ctx.ensure_leader()`` calls this before destructive work; a shared
        store answers from its own record, not from this node's last view.
        """
        state = await self.holder()
        return state is not None and state.holder == node_id and state.term == term

    def describe(self) -> str:
        """Where the lease lives, for ``engine.leadership().backend`` (no secrets)."""
        return f"{type(self).__name__}(ttl={self.ttl:g}s)"

    def timed_out(self, operation: str, after: float) -> None:
        """The caller gave up waiting for ``operation`` after ``after`` seconds.

        The elector bounds every call by what is left of the lease, usually
        well before a client's own socket timeout: a hung or blackholed store
        then raises nothing to the lease, so it is told here. A lease on a
        remote store counts it as the failure it is (and backs off).
        """

    async def close(self) -> None:
        """Let go of connections; called when the engine stops. A later call reconnects."""


#: what a lease raises when its store answered and refuses it for good (a wrong password, a
#: database that does not exist): ``engine.start()`` fails with it, as a store's start would
REFUSALS: tuple[type[Exception], ...] = (LeaseRefused, NotATaskwatchStore)


class StoreHealth:
    """How a lease's remote store has been answering: for the failure counts, the backoff
    and what :meth:`Lease.describe` says.

    After a failure (a connection error, or no answer in time) calls fail fast
    with :class:`LeaseUnavailable` for ``backoff`` seconds, doubling up to
    ``backoff_max``; the store counts as unreachable until a call is answered
    again, not only while the backoff lasts, so ``leadership().backend`` says
    so for as long as it is true. A store that answers with an error (a wrong
    password, a database that does not exist) is reachable but *refuses*: that
    is said until a call succeeds, with no backoff (the elector's period paces it).
    """

    def __init__(self, where: str, backoff: float, backoff_max: float) -> None:
        self.where = where
        self.backoff = backoff
        self.backoff_max = backoff_max
        #: failed calls, recoveries after one, and the error of the last failure
        self.failures = 0
        self.reconnects = 0
        self.last_error: str | None = None
        #: since the last failure nothing was answered
        self.down = False
        #: calls the store answered with an error, and the last such error while it lasts
        self.refusals = 0
        self.refusal: str | None = None
        self._delay = 0.0
        self._retry_at = 0.0

    def check(self) -> None:
        """Raise :class:`LeaseUnavailable` while backing off (the network is not touched)."""
        left = self._retry_at - time.monotonic()
        if left > 0:
            raise LeaseUnavailable(self.where, self.last_error or "down", left)

    def failed(self, error: str) -> LeaseUnavailable:
        """Count a failure and start (or lengthen) the backoff; the error to raise for it."""
        self.failures += 1
        self.down = True
        self.last_error = error
        self._delay = min(self.backoff_max, self._delay * 2 if self._delay else self.backoff)
        self._retry_at = time.monotonic() + self._delay
        return LeaseUnavailable(self.where, error, self._delay)

    def answered(self) -> None:
        """The store answered a call: it is reachable again."""
        if self.down:
            self.reconnects += 1
        self.down = False
        self._delay = 0.0
        self.refusal = None

    def refused(self, error: str) -> None:
        """The store answered a call with ``error`` (not a connection failure)."""
        self.answered()
        self.refusals += 1
        self.refusal = error

    def describe(self) -> str:
        """``", unreachable: <last error>"`` while the store is down, ``", refused: <error>"``
        while it answers with an error, else nothing."""
        if self.down:
            return f", unreachable: {self.last_error}"
        return f", refused: {self.refusal}" if self.refusal is not None else ""


class ReportsHealth:
    """For a lease on a remote store: how that store has been answering, from its
    :class:`StoreHealth` (``_health``)."""

    _health: StoreHealth

    @property
    def failures(self) -> int:
        """Calls that failed to reach the store, and calls the elector gave up waiting for."""
        return self._health.failures

    @property
    def reconnects(self) -> int:
        """Times the store answered again after a failure."""
        return self._health.reconnects

    @property
    def last_error(self) -> str | None:
        """The error of the last failure (kept after the store answers again)."""
        return self._health.last_error

    @property
    def refusals(self) -> int:
        """Calls the store answered with an error (a wrong password, a missing database, ...)."""
        return self._health.refusals


class InProcessLease(Lease):
    """A lease kept in memory: engines in one process sharing this object elect one leader.

    Its holders are the electors that took it, not their node ids: two engines given the same
    ``node_id`` by mistake are two holders, and neither takes the other's lease.

    ``clock`` (default :func:`time.time`) lets tests expire a lease without sleeping.
    """

    def __init__(
        self,
        ttl: float = 2.0,
        *,
        renew_interval: float | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        super().__init__(ttl, renew_interval=renew_interval)
        self._clock = clock or time.time
        self._state: LeaseState | None = None
        #: the elector that took the lease in its current term (None: a call outside any)
        self._taker: object | None = None
        # the last term handed out; kept across releases so terms never repeat
        self._last_term = 0

    def now(self) -> float:
        return self._clock()

    def _current(self) -> LeaseState | None:
        state = self._state
        if state is not None and state.expires_at <= self.now():
            return None
        return state

    def _holds(self, node_id: str, term: int) -> bool:
        current = self._current()
        return current is not None and current.holder == node_id and current.term == term and self._taken_by_caller()

    def _taken_by_caller(self) -> bool:
        """Whether the call comes from the elector that took the lease: two engines sharing this
        lease under one node id by mistake are two holders, and neither takes, renews or releases
        the other's term. A call made outside any elector (a test, an operator) goes by node id
        and term alone."""
        caller = _CALLER.get()
        return caller is None or self._taker is None or caller is self._taker

    # no awaits inside these methods, so each one is atomic on the event loop

    async def acquire(self, node_id: str) -> LeaseState | None:
        current = self._current()
        if current is not None and (current.holder != node_id or not self._taken_by_caller()):
            return None
        self._last_term += 1
        self._state = LeaseState(holder=node_id, term=self._last_term, expires_at=self.now() + self.ttl)
        self._taker = _CALLER.get()
        return self._state

    async def renew(self, node_id: str, term: int) -> LeaseState | None:
        if not self._holds(node_id, term):
            return None
        self._state = LeaseState(holder=node_id, term=term, expires_at=self.now() + self.ttl)
        return self._state

    async def release(self, node_id: str, term: int) -> bool:
        if not self._holds(node_id, term):
            return False
        self._state = self._taker = None
        return True

    async def holder(self) -> LeaseState | None:
        return self._current()

    async def check(self, node_id: str, term: int) -> bool:
        # through holder(), as the base class's: a subclass standing for a store changes that alone
        state = await self.holder()
        return state is not None and state.holder == node_id and state.term == term and self._taken_by_caller()

    def __repr__(self) -> str:
        return f"<InProcessLease ttl={self.ttl:g} state={self._current()!r}>"


class LeaderElector:
    """Holds (or competes for) the leader lease on behalf of one engine."""

    def __init__(self, engine: Engine, lease: Lease | None = None) -> None:
        if lease is not None and not isinstance(lease, Lease):
            raise InvalidConfiguration(
                "Engine",
                [f"lease must be a taskwatch Lease (e.g. InProcessLease(ttl=2.0)), got {type(lease).__name__}"],
            )
        self._engine = engine
        self.lease = lease
        self._listeners: list[LeadershipListener] = []
        #: what must end before a term given up is released (leader-only work winding down)
        self._release_holds: list[Callable[[], Awaitable[None]]] = []
        self._task: asyncio.Task[None] | None = None
        if lease is None:
            # nothing to compete through: this engine leads, for good, whatever other nodes do
            # (term 1 is no granted term: every engine without a lease has it)
            self.is_leader = True
            self.term = 1
            self.holder: str | None = engine.node_id
        else:
            self.is_leader = False
            self.term = 0
            self.holder = None
        self.expires_at: float | None = None
        #: the last term this elector took (0: none): a lease its node id holds in that term is
        #: this process's own, given up or lapsed, not an earlier process's under the same id
        self.own_term = self.term
        #: set while this node must not lead (it cannot reach its store): no acquire attempts
        self._suspended = False
        #: set once the engine stops: it never takes the lease again until the next start
        #: (a stopping node cannot run leader-only work, so leading would only leave the
        #: cluster leaderless); until :meth:`resign` a follower still looks up who leads
        self._stopping = False
        #: a term given up by :meth:`suspend`, released by the renew loop when it can
        self._to_release: int | None = None
        #: an acquire is on its way, and whether the last one got no answer (an error, or none
        #: in time): a store may have applied it all the same, the lease then held in this
        #: node's name with nobody to renew or release it
        self._acquiring = False
        self._unanswered_acquire = False
        #: whether the last lease call failed (raised, or no answer in time)
        self._call_failed = False
        #: the renew loop ends after the step under way (see _end_elections)
        self._exit = False
        #: who this elector is to an InProcessLease shared with engines under the same node id
        self._caller = object()
        #: the last lease check ensure_leader() began, shared by its callers (see _shared_check)
        self._check: asyncio.Task[tuple[int, bool | None]] | None = None
        self._wake = asyncio.Event()
        #: what the last failed lease call was logged as (None: the last call succeeded)
        self._logged: str | None = None
        #: the lease store's refusal, if the last failed call met one
        self._refusal: Exception | None = None

    @property
    def node_id(self) -> str:
        return self._engine.node_id

    @property
    def renew_interval(self) -> float | None:
        return self.lease.renew_interval if self.lease is not None else None

    def lease_valid(self) -> bool:
        """Whether the lease this node last saw has not lapsed (always true without a lease)."""
        if self.expires_at is None or self.lease is None:
            return True
        return self.expires_at > self.lease.now()

    def leads(self) -> bool:
        """Whether this node leads and its lease, as it last renewed it, has not run out: between
        the lapse and the elector's next look (a blocked loop, a paused process) another node may
        already lead, and what this node says of itself must not claim otherwise."""
        return self.is_leader and self.lease_valid()

    def snapshot(self) -> Leadership:
        return Leadership(
            node_id=self.node_id,
            is_leader=self.leads(),
            holder=self.holder,
            term=self.term,
            expires_at=self.expires_at,
            backend=self.lease.describe() if self.lease is not None else None,
        )

    def _time_left(self) -> float:
        """Seconds until this node's view of its lease lapses (the renew interval if none)."""
        assert self.lease is not None
        if self.expires_at is None:
            return self.lease.renew_interval
        return self.expires_at - self.lease.now()

    async def verify(self) -> int | None:
        """This node's term if it leads by its own view *and* by the lease's, else ``None``.

        The lease is asked after this call (bounded by what is left of the
        lease; concurrent calls share one check, see :meth:`_shared_check`), so
        a node that was paused, or lost the lease without noticing yet, is told
        so before it does destructive work. Without a lease it is always 1, on
        every node: nothing was asked, so it proves nothing.
        """
        if self.lease is None:
            return self.term
        if self._suspended or not self.is_leader:
            return None
        if not self.lease_valid():
            # this node's own view lapsed (a stalled loop, a late renew) before the elector woke to
            # notice: step down here, as the elector would. Left to its next wake, the step-down
            # would cancel a leader-only worker in the middle of the cleanup this refusal began
            self._lapsed()
            return None
        term = self.term
        checked, ok = await self._shared_check()
        if not self.is_leader or self.term != term or checked != term:
            return None  # stepped down (or another term began) while the check was on its way
        if not self.lease_valid():
            # lapsed while the check was on its way: its answer came too late to count
            self._lapsed()
            return None
        if ok is True:
            return term
        # the lease says otherwise, or cannot say: step down now, as a failed
        # renew would, so leader-only workers are cancelled rather than crash
        log.warning("lease of %s (term %d) not confirmed by the lease store; stepping down", self.node_id, term)
        self._lose()
        return None

    async def _shared_check(self) -> tuple[int, bool | None]:
        """The answer of a lease check begun after this call: the term it asked about and what
        the lease said (None: it could not say).

        Concurrent callers share one: a worker fanning out hundreds of ``ensure_leader()`` calls
        must not open hundreds of connections to the store (a full client pool, a server out of
        connections), each failure stepping the leader down. A check already on its way when
        this is called may have been answered before the call, so it says nothing of the lease
        since: it is waited out, and the first of its waiters to wake begins the next, which the
        others join. So at most one check is on its way at a time, and a caller waits for two at most.
        """
        seen = self._check
        if seen is not None and not seen.done():
            await asyncio.wait([seen])
        # one begun since (by another of its waiters) began after this call: it answers for it too
        check = self._check
        if check is None or check is seen:
            check = self._check = spawn(self._check_lease(), name=f"taskwatch-lease-check-{self.node_id}")
        await asyncio.wait([check])
        if check.cancelled():
            return 0, None  # the engine stops: no term's answer (term 0 is never one)
        return check.result()

    async def _check_lease(self) -> tuple[int, bool | None]:
        assert self.lease is not None
        term = self.term
        if not self.is_leader or not self.lease_valid():
            return term, None  # the callers find that out themselves
        ok = await self._call(
            self.lease.check(self.node_id, term), min(self.lease.renew_interval, self._time_left()), "check"
        )
        return term, ok

    @property
    def suspended(self) -> bool:
        """True while this node stands aside (see :meth:`suspend`)."""
        return self._suspended

    def suspend(self) -> None:
        """Stand aside: give up leadership now and compete no more until :meth:`resume`.

        The engine calls it when this node cannot reach its store: a leader
        whose work depends on a database it cannot reach should not lead.
        Leader-only workers are cancelled at once (``lease.lost``); the lease
        itself is released in the background once they have wound down (see
        :meth:`hold_release`), so another node may lead before it would have expired.
        """
        if self.lease is None or self._suspended:
            return
        self._suspended = True
        if self.is_leader:
            self._to_release = self.term
            self._lose()
        self._wake.set()

    def resume(self) -> None:
        """Compete for leadership again (the next attempt is made at once)."""
        if not self._suspended:
            return
        self._suspended = False
        self._wake.set()

    def add_listener(self, listener: LeadershipListener) -> Callable[[], None]:
        """Call ``listener(is_leader)`` on every change of leadership; returns a remover."""
        self._listeners.append(listener)

        def remove() -> None:
            if listener in self._listeners:
                self._listeners.remove(listener)

        return remove

    def hold_release(self, wait: Callable[[], Awaitable[None]]) -> None:
        """Release a term :meth:`suspend` gave up only once ``wait()`` has returned.

        The supervisor's leader-only workers are cancelled when leadership is lost, and may
        take a while to clean up; released at once, the lease would let another node start
        the same work beside them. Meanwhile the term is renewed, as a stopping leader's is,
        so it does not lapse in the middle of the cleanup either.
        """
        self._release_holds.append(wait)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Make the first election, then keep the lease (or compete for it) in the background.

        Raises what the lease raised if its store refuses it (:class:`LeaseRefused`, or
        :class:`NotATaskwatchStore`): that does not pass by waiting. A store that cannot be
        reached does: this node then starts as a follower and leads once it answers.
        """
        if self.lease is None or self._task is not None:
            return
        self._wake = asyncio.Event()
        # a start reaches the store (it registers there first): whatever suspended this node
        # before its last stop, such as losing the store, is over
        self._suspended = False
        self._stopping = False
        self._unanswered_acquire = self._exit = False
        # one attempt before returning, so the engine's other components (and
        # the caller) start with the outcome of the first election
        self._refusal = None
        await self._try_acquire()
        refusal = self._refusal
        if refusal is not None:
            # a store that refuses this lease (a wrong password, no such database) will refuse
            # it at every try: fail the start, as a store's own start does. An unreachable
            # store is another matter: it comes back, and the node leads then
            await self._close()
            raise refusal
        self._task = spawn(
            self._run(), name=f"taskwatch-lease-{self.node_id}"
        )

    def stop_competing(self) -> None:
        """The engine is stopping: never take the lease from now on (a leader keeps it until
        :meth:`resign`, as its leader-only work is still being stopped)."""
        self._stopping = True

    async def resign(self, deadline: float, *, release: bool = True) -> None:
        """Release the lease now if this node holds it, and compete no more until the next start.

        The engine calls it once its leader-only work has stopped, before draining its runs,
        so another node leads during that drain instead of a whole drain later. Elections
        end here for this node: :meth:`stop` then only closes the lease. ``release=False``
        (leader-only code still runs, having ignored every cancel): the lease is not handed
        over but left to lapse at the end of its ttl, renewed no more; so is a term this node
        gave up (:meth:`suspend`) and still held for that code's cleanup.
        """
        self.stop_competing()
        if self.lease is None:
            return
        await self._end_elections(deadline)
        if self._to_release is not None:
            if release:
                await self._release_given_up(deadline)
            else:
                await self._abandon_given_up(deadline)
        await self._release_unanswered(deadline)
        if release:
            await self._step_down(deadline)
        elif self.is_leader:
            self._change(False, LeaseLost, holder=self.node_id, term=self.term, expires_at=self.expires_at)

    async def stop(self, deadline: float) -> None:
        self._stopping = True
        await self._end_elections(deadline)
        try:
            if self._to_release is not None:
                await self._release_given_up(deadline)
            await self._release_unanswered(deadline)
            await self._step_down(deadline)
        finally:
            check, self._check = self._check, None
            await cancel_and_wait(check)
            await self._close()

    async def _end_elections(self, deadline: float) -> None:
        """End the renew loop, for no renew to be on its way while the release is.

        An acquire under way is let answer first (within its own bound, the renew interval):
        a store applies one sent before the cancel all the same (Redis runs the script it
        read), and cancelled it would leave the lease held in this node's name for a whole
        ttl, with no leader meanwhile. Answered while stopping, its term is released.
        """
        task, self._task = self._task, None
        if task is None:
            return
        if self._acquiring and self.lease is not None:
            self._exit = True
            left = deadline - asyncio.get_running_loop().time()
            await asyncio.wait([task], timeout=max(0.0, min(left, self.lease.renew_interval)))
        task.cancel()
        # asyncio.wait, unlike awaiting the task, leaves a cancel of the caller itself alone
        await asyncio.wait([task])
        self._exit = False

    async def _release_unanswered(self, deadline: float) -> None:
        """Release the lease if an acquire that got no answer took it after all (best effort:
        one short lookup and release; a store still out of reach lets it lapse at its ttl)."""
        if not self._unanswered_acquire or self.is_leader or self.lease is None:
            return
        self._unanswered_acquire = False
        lease = self.lease
        loop = asyncio.get_running_loop()
        # within the stop's deadline, lookup and release together: unlike a leader's release,
        # this one is only a chance (most such acquires took nothing), not worth a longer stop
        ends = min(deadline, loop.time() + lease.renew_interval)
        if ends <= loop.time():
            return
        seen = await self._call(lease.holder(), ends - loop.time(), "holder lookup")
        if seen is None or seen.holder != self.node_id or seen.expires_at <= lease.now() or ends <= loop.time():
            return
        if await self._call(lease.release(self.node_id, seen.term), ends - loop.time(), "release"):
            self._engine.bus.emit(
                LeaseReleased, holder=None, term=seen.term, expires_at=None,
                previous_holder=self.node_id, previous_term=seen.term,
            )  # fmt: skip

    async def _step_down(self, deadline: float) -> None:
        if self.lease is None or not self.is_leader:
            return
        lease, term = self.lease, self.term
        remaining = deadline - asyncio.get_running_loop().time()
        # bounded like every lease call; past the deadline a release still gets
        # one short try, as it saves the other nodes a whole ttl of waiting
        timeout = min(remaining, lease.renew_interval) if remaining > 0 else lease.renew_interval
        released = await self._call(lease.release(self.node_id, term), timeout, "release")
        event: type[LeaseEvent] = LeaseReleased if released else LeaseLost
        self._change(False, event, holder=None, term=term, expires_at=None if released else self.expires_at)

    async def _close(self) -> None:
        """Close the lease's connections: the engine is stopping (a restart reconnects)."""
        if self.lease is not None:
            try:
                await self.lease.close()
            except Exception:
                log.exception("closing the lease of %s failed", self.node_id)

    # ------------------------------------------------------------------ the renew loop

    async def _run(self) -> None:
        assert self.lease is not None
        while True:
            # a fixed period, on this task's own timer; a leader also wakes when
            # its lease lapses, so it steps down then even if a renew is late
            # (ensure_leader() checks the expiry itself meanwhile)
            wait: float | None = self.lease.renew_interval
            if self._suspended and self._to_release is None:
                wait = None  # until resumed
            elif self.is_leader:
                wait = max(0.0, min(self.lease.renew_interval, self._time_left()))
            elif self.expires_at is not None:
                # a follower tries again just after the holder's lease lapses, not
                # up to a whole interval later (the slack covers the lookup's latency)
                wait = max(0.0, min(self.lease.renew_interval, self._time_left() + _TAKEOVER_SLACK))
            if not self._wake.is_set():
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    pass
            self._wake.clear()
            try:
                if self._to_release is not None:
                    await self._release_given_up()
                elif self._suspended:
                    pass
                elif self.is_leader:
                    await self._renew()
                elif self._stopping:
                    await self._look_up_holder()
                else:
                    await self._try_acquire()
            except Exception:
                # a bug in a listener or an event callback must not end elections
                # for this node; a leader that stops renewing loses its lease anyway
                log.exception("leader election step failed on %s", self.node_id)
            if self._exit:
                return  # ended by _end_elections once the acquire under way was answered
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # a lease client that swallowed the stop's cancel must not keep this loop alive
                raise asyncio.CancelledError

    async def _renew(self) -> None:
        assert self.lease is not None
        # judged by the local view too, as ensure_leader() is: once that fails,
        # leader-only workers must be cancelled, not left to crash on NotLeader
        if not self.lease_valid():
            self._lapsed()
            return
        # a renew answered after the lease lapsed is worthless: bound it by what is left
        state = await self._call(
            self.lease.renew(self.node_id, self.term),
            min(self.lease.renew_interval, self._time_left()),
            "renew",
        )
        if not self.is_leader:
            return  # stepped aside (suspend) while the renew was on its way
        if state is None or state.holder != self.node_id or state.expires_at <= self.lease.now():
            self._lose()
            return
        previous_term = self.term
        self.term, self.expires_at = state.term, state.expires_at
        # a renew changes only the expiry: the lease before it was this node's, in this term
        self._engine.bus.emit(
            LeaseRenewed,
            holder=self.node_id,
            term=state.term,
            expires_at=state.expires_at,
            previous_holder=self.node_id,
            previous_term=previous_term,
        )

    async def _release_given_up(self, deadline: float | None = None) -> None:
        """Release the term :meth:`suspend` gave up once what holds it has ended, if the lease can
        be reached (best effort: otherwise it lapses at its ttl, as a silent leader's would).

        Meanwhile the term is renewed. ``deadline`` (loop time; the renew loop has none) bounds
        the wait: a hold still going then (leader-only code ignoring every cancel as the engine
        stops) leaves the term to lapse, not released.
        """
        assert self.lease is not None
        term = self._to_release
        if term is None:
            return
        loop = asyncio.get_running_loop()
        held = True
        for hold in self._release_holds:
            waiting = as_future(hold())
            try:
                while not waiting.done():
                    wait = self.lease.renew_interval
                    if deadline is not None:
                        if deadline <= loop.time():
                            await self._abandon_given_up(deadline)
                            return
                        wait = min(wait, deadline - loop.time())
                    await asyncio.wait([waiting], timeout=wait)
                    if held and not waiting.done() and (deadline is None or loop.time() < deadline):
                        renewed = await self._call(self.lease.renew(self.node_id, term), self.lease.renew_interval, "renew")
                        held = renewed is not None
            finally:
                # cancelled itself (the engine stops): the stop waits for the work, then releases
                # (or, if that work outlasts the stop, leaves the term to lapse)
                waiting.cancel()
        self._to_release = None
        # even when a renew failed: the release names its term, so it frees nothing another node took
        released = await self._call(self.lease.release(self.node_id, term), self.lease.renew_interval, "release")
        if released:
            # lease.lost said this node stopped leading; this says the lease is free now (a
            # dashboard would otherwise show this node holding it until its next look)
            self._engine.bus.emit(
                LeaseReleased, holder=None, term=term, expires_at=None, previous_holder=self.node_id, previous_term=term
            )

    async def _abandon_given_up(self, deadline: float) -> None:
        """The engine stops while leader-only code still runs in the term :meth:`suspend` gave up:
        released, the lease would let another node start that work beside it, so the term is left
        to lapse, as a stopping leader's is. Renewed once more first if ``deadline`` (loop time)
        leaves time for it: its last renew may be up to two renew intervals old, and the code
        still running then gets a whole ttl from now (a store that does not answer holds the
        stop no longer than its deadline)."""
        term, self._to_release = self._to_release, None
        if term is None or self.lease is None:
            return
        left = min(self.lease.renew_interval, deadline - asyncio.get_running_loop().time())
        if left > 0:
            await self._call(self.lease.renew(self.node_id, term), left, "renew")
        log.warning(
            "node %s stops while leader-only work of the term %d it gave up still runs (it ignored "
            "every cancel): the lease is left to lapse at the end of its ttl rather than released now",
            self.node_id, term,
        )  # fmt: skip

    async def _try_acquire(self) -> None:
        assert self.lease is not None
        lease = self.lease
        # until it answers (cancelled, it never does): a store may apply it all the same
        self._unanswered_acquire = self._acquiring = True
        try:
            state = await self._call(lease.acquire(self.node_id), lease.renew_interval, "acquire")
            self._unanswered_acquire = self._call_failed
        finally:
            self._acquiring = False
        if state is not None and (self._suspended or self._stopping):
            # told to stand aside, or the engine began to stop, while this was on its way
            self._to_release = state.term
            self._wake.set()
            return
        if state is not None and state.holder == self.node_id and state.expires_at > lease.now():
            self._change(
                True, LeaseAcquired, holder=self.node_id, term=state.term, expires_at=state.expires_at
            )
            return
        await self._look_up_holder()

    async def _look_up_holder(self) -> None:
        assert self.lease is not None
        lease = self.lease
        # a follower only reports who leads (unknown if the lookup fails); the
        # term it saw stays, so a dashboard can tell how far elections have gone
        seen = await self._call(lease.holder(), lease.renew_interval, "holder lookup")
        self.holder = seen.holder if seen is not None else None
        self.expires_at = seen.expires_at if seen is not None else None
        if seen is not None:
            self.term = seen.term

    async def _call(self, op: Awaitable[T], timeout: float, what: str) -> T | None:
        """Await one lease operation, bounded; an error or a timeout counts as failure.

        A call that outlives the renew interval is as good as failed: by the time
        it returned, the lease it reports on could have changed hands.
        """
        bound = asyncio.timeout(timeout)
        self._call_failed = True
        caller = _CALLER.set(self._caller)
        try:
            async with bound:
                result = await op
        except Exception as exc:  # includes TimeoutError
            # again, after the await: a check on its way beside this call may have ended meanwhile
            self._call_failed = True
            expired = bound.expired()
            if expired and self.lease is not None:
                # a store that answers nothing raises nothing: the lease only learns it here
                self.lease.timed_out(what, timeout)
            self._failed(what, exc, f"no answer within {timeout:.3g} s" if expired else None)
            return None
        finally:
            _CALLER.reset(caller)
        self._call_failed = False
        if what not in _READS:
            if self._logged is not None:
                log.info("the lease store of %s answers again", self.node_id)
            self._logged = None
            self._refusal = None
        return result

    def _failed(self, what: str, exc: Exception, timed_out: str | None) -> None:
        """Note a failed lease call; log it only when it is news.

        A store that stays down, or keeps refusing, is tried every renew interval (and the
        acquire and the holder lookup fail together): one line per failure would bury the
        log. So a failure is logged when it differs from the last one logged since a call
        that takes, keeps or gives up the lease last succeeded (a read may succeed while the
        writes are refused); an unreachable store by the kind of error only, as its message
        changes from try to try (the operation, the backoff left).
        """
        self._refusal = exc if isinstance(exc, REFUSALS) else None
        if timed_out is not None:
            key = "TimeoutError"
        elif isinstance(exc, LeaseUnavailable):
            key = exc.cause.partition(":")[0]
        else:
            key = f"{type(exc).__name__}: {exc}"
        if key == self._logged:
            return
        self._logged = key
        log.warning("lease %s by %s failed: %s", what, self.node_id, timed_out or f"{type(exc).__name__}: {exc}")

    def _lose(self) -> None:
        self._change(False, LeaseLost, holder=None, term=self.term, expires_at=self.expires_at)

    def _lapsed(self) -> None:
        """Step down: this node's own view of its lease ran out before it was renewed."""
        log.warning("lease of %s (term %d) lapsed before it was renewed", self.node_id, self.term)
        self._lose()

    def _change(
        self,
        is_leader: bool,
        event: type[LeaseEvent],
        *,
        holder: str | None,
        term: int,
        expires_at: float | None,
    ) -> None:
        """Record a change of leadership, publish it, and tell the listeners."""
        # what this node saw before: the holder it followed, or itself when it led
        previous_holder = self.holder
        previous_term = self.term if (self.holder is not None or self.term) else None
        self.is_leader = is_leader
        self.holder = holder
        self.term = term
        self.expires_at = expires_at
        if is_leader:
            self.own_term = term
        self._engine.bus.emit(
            event,
            holder=holder,
            term=term,
            expires_at=expires_at,
            previous_holder=previous_holder,
            previous_term=previous_term,
        )
        for listener in list(self._listeners):
            try:
                listener(is_leader)
            except Exception:
                log.exception("leadership listener %r raised", listener)

    def __repr__(self) -> str:
        return f"<LeaderElector {self.node_id} leader={self.is_leader} term={self.term}>"
