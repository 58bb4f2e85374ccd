"""The :class:`Store` interface every run store implements, and the rules they share.

A store is the sole owner of run records: the queue entry and the record are
one row. The engine inserts runs, claims due ones for its free slots, keeps
its claims alive with heartbeats and finishes them with the claim token; any
node recovers runs whose owner is gone. The decisions that do not depend on
where rows live (which owner is provably gone, what a lost run becomes) are
here, so the memory and SQL stores cannot drift apart.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import itertools
import os
import threading
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar

from ..options import StoreOptions, check_options
from ..runs import CancelReason, Progress, RunStatus
from ..trusted import float_clock
from .models import (
    CancelResult,
    Claim,
    Counts,
    HeartbeatResult,
    Inserted,
    LostReason,
    NewRun,
    NodeInfo,
    OnLost,
    Outcome,
    Page,
    Recovered,
    StoredJob,
    StoredRun,
    TriggerKeyRecord,
    Wakeup,
)

T = TypeVar("T")

Clock = Callable[[], float]

#: a run lost this many times is failed as WorkerLost instead of re-queued
MAX_LOST = 3


class Subscription:
    """Wakeups for one consumer (an executor, a waiter table): flags that coalesce until read."""

    __slots__ = ("_event", "_pending", "want_finished", "__weakref__")

    def __init__(self, want_finished: bool) -> None:
        self._event = asyncio.Event()
        self._pending = Wakeup()
        self.want_finished = want_finished

    def _post(self, work: bool, cancels: Iterable[str], finished: Iterable[str]) -> None:
        p = self._pending
        if work:
            p.work = True
        p.cancels.update(cancels)
        if self.want_finished:
            p.finished.update(finished)
        if p:
            self._event.set()

    def poll(self) -> Wakeup:
        """What happened since the last look (possibly nothing); never waits."""
        out, self._pending = self._pending, Wakeup()
        self._event.clear()
        return out

    async def wait(self, timeout: float | None = None) -> Wakeup:
        """Wait until something happens or ``timeout`` passes (then the wakeup is empty).

        Across processes (several engines on one SQLite file) nothing is pushed:
        wait with a timeout and claim after each return; that timeout is the
        slow poll that picks up other processes' work.
        """
        if not self._pending:
            try:
                async with asyncio.timeout(timeout):
                    await self._event.wait()
            except TimeoutError:
                pass
        return self.poll()


def in_outage_grace(now: float, node_ttl: float, answering_since: float | None) -> bool:
    """Whether the store began to answer again after an outage too recently for silence to prove
    anything: no node could heartbeat, nor renew a claim, while it was out of reach, and each
    gets ``node_ttl`` of an answering store to be heard from again (see :func:`gone_incarnations`)."""
    return answering_since is not None and answering_since > now - node_ttl


def gone_incarnations(
    nodes: Iterable[NodeInfo], now: float, node_ttl: float, *, answering_since: float | None = None
) -> dict[str, LostReason]:
    """Incarnations provably dead: stopped, silent for longer than ``node_ttl``, or
    replaced by a later incarnation of the same node id (a restarted process).

    ``answering_since``: when the store last began to answer the caller again after an
    outage (None: no outage known). While the store was out of reach, no node could
    heartbeat, so silence proves nothing until every node has had ``node_ttl`` of an
    answering store to be heard from: until then no node is judged silent.
    """
    gone: dict[str, LostReason] = {}
    silence_counts = not in_outage_grace(now, node_ttl, answering_since)
    newest: dict[str, NodeInfo] = {}
    rows = list(nodes)
    for n in rows:
        cur = newest.get(n.node)
        if cur is None or n.started_at >= cur.started_at:  # rows come in registration order: later wins ties
            newest[n.node] = n
    for n in rows:
        if n.stopped_at is not None:
            gone[n.incarnation] = "owner_stopped"
        elif silence_counts and n.last_heartbeat < now - node_ttl:
            gone[n.incarnation] = "owner_silent"
        elif newest[n.node] is not n:
            gone[n.incarnation] = "owner_restarted"
    return gone


def adoptable(holder: str, incarnation: str, own: bool, known: Collection[str], gone: Mapping[str, Any]) -> bool:
    """Whether ``incarnation`` may take a queue job held by ``holder`` (see ``Store.adopt_jobs``)."""
    if holder == incarnation:
        return own
    return holder in gone or holder not in known


def trigger_holders_taken(
    holders: Iterable[str], incarnation: str, own: bool, known: Collection[str], gone: Mapping[str, Any]
) -> list[str]:
    """The holders whose saved keys of a trigger ``incarnation`` takes up (see
    ``Store.adopt_trigger``): those :func:`adoptable` names, its own first (with ``own``), so
    the run its own row of a key follows is the one kept."""
    holders = list(holders)
    taking = [h for h in holders if h != incarnation and adoptable(h, incarnation, own, known, gone)]
    if own and incarnation in holders:
        taking.insert(0, incarnation)
    return taking


#: the largest count a saved key holds (a store keeps counts as 64-bit integers)
MAX_TRIGGER_COUNT = 2**63 - 1


def merge_trigger_records(first: TriggerKeyRecord, then: TriggerKeyRecord) -> TriggerKeyRecord:
    """One key of a trigger from two records of it (two holders' rows, or a trigger's own
    counts and a row it takes up): what the one who takes up keeps.

    Counts add: each holder counted notifies of its own. The key follows ``first``'s run if it
    has one, else ``then``'s, with the count that run fired with (taken off when it ends); a key
    follows one run at a time, so the count the other's run fired with stays counted and runs
    again (at least once, never lost). The first notify is the earlier, the last run the later.
    """
    seen = [t for t in (first.first_seen_at, then.first_seen_at) if t is not None]
    run_id, captured = (first.run_id, first.captured) if first.run_id is not None else (then.run_id, then.captured)
    last = then if _ran_later(then, first) else first
    return TriggerKeyRecord(
        count=min(first.count + then.count, MAX_TRIGGER_COUNT), captured=captured,
        first_seen_at=min(seen) if seen else None, last_run_at=last.last_run_at, run_id=run_id,
        last_run_id=last.last_run_id, last_status=last.last_status,
    )  # fmt: skip


def _ran_later(a: TriggerKeyRecord, b: TriggerKeyRecord) -> bool:
    if a.last_run_id is None and a.last_run_at is None:
        return False
    if b.last_run_id is None and b.last_run_at is None:
        return True
    return (a.last_run_at or float("-inf")) > (b.last_run_at or float("-inf"))


def trigger_record(row: Sequence[Any]) -> TriggerKeyRecord:
    """A saved key from its row's columns, in the order of ``queries.TRIGGER_KEY_COLUMNS``."""
    count, captured, first_seen_at, last_run_at, run_id, last_run_id, last_status = row
    return TriggerKeyRecord(
        count=count, captured=captured, first_seen_at=first_seen_at, last_run_at=last_run_at,
        run_id=run_id, last_run_id=last_run_id, last_status=last_status,
    )  # fmt: skip


def merge_taken(rows: Iterable[tuple[str, TriggerKeyRecord]]) -> dict[str, TriggerKeyRecord]:
    """The rows an adoption takes up (key, record), one record per key: rows of one key merged
    in the order they come (:func:`merge_trigger_records`)."""
    out: dict[str, TriggerKeyRecord] = {}
    for key, rec in rows:
        had = out.get(key)
        out[key] = rec if had is None else merge_trigger_records(had, rec)
    return out


def lost_reason(
    incarnation: str | None,
    lease_until: float | None,
    now: float,
    gone: Mapping[str, LostReason],
    live: Collection[str] | None,
    held: Collection[str] = (),
) -> LostReason | None:
    """Why a running run is lost, or None while its owner may still hold it.

    A missing node row proves nothing (it may have been pruned or never
    written), so such a run is recovered only once its lease expired.
    ``held``: owners whose leases running out proves nothing yet (live node rows, just after
    an outage through which no claim could be renewed: see :func:`in_outage_grace`); their
    finished runs' outcomes and renewals are on their way.
    """
    if incarnation is not None:
        why = gone.get(incarnation)
        if why is not None:
            return why
        if live is not None and incarnation not in live:
            return "owner_not_live"
    if lease_until is None or lease_until < now:
        return None if incarnation in held else "lease_expired"
    return None


def lost_action(
    cancel_requested: bool, lost_count: int, on_lost: OnLost, max_lost: int
) -> Literal["requeued", "failed", "cancelled"]:
    """What a lost run becomes; ``lost_count`` already counts this loss."""
    if cancel_requested:
        return "cancelled"
    if on_lost == "fail" or lost_count >= max_lost:
        return "failed"
    return "requeued"


class Store(ABC):
    """Durable (or not) home of every run row. All methods are coroutines unless noted.

    ``clock`` gives UNIX seconds for every timestamp (tests move it instead of
    sleeping). ``lease_ttl``: how long a claim lives without a heartbeat.
    ``node_ttl``: how long a node may stay silent before its incarnation is
    presumed dead (default: ``lease_ttl``). ``max_lost``: losses before a run
    is failed as WorkerLost.
    """

    name: ClassVar[str]
    #: True when :meth:`subscribe` also hears other processes' inserts and cancels
    #: (a cluster store); otherwise other processes' work is found by polling
    pushes_remote_changes: ClassVar[bool] = False
    #: seconds the row of a stopped or silent incarnation stays listed (the engine then prunes it)
    node_retention: float = 24 * 3600.0

    def __init__(
        self,
        *,
        clock: Clock = time.time,
        lease_ttl: float = 30.0,
        node_ttl: float | None = None,
        max_lost: int = MAX_LOST,
    ) -> None:
        check_options(StoreOptions, type(self).__name__, lease_ttl=lease_ttl, node_ttl=node_ttl, max_lost=max_lost)
        self.clock = float_clock(clock)
        self.lease_ttl = lease_ttl
        self.node_ttl = lease_ttl if node_ttl is None else node_ttl
        self.max_lost = max_lost
        self._subs: weakref.WeakSet[Subscription] = weakref.WeakSet()
        #: set once anyone subscribes; a plain bool is much cheaper to test per run than the WeakSet
        self._notifying = False
        #: set once anyone subscribes to finished run ids (a store may skip looking them up before)
        self._notifying_finished = False

    def describe(self) -> str:
        """Where the runs live, for people: ``memory``, ``sqlite:/path/to/file.db``."""
        return self.name

    @property
    def unreachable_since(self) -> float | None:
        """Since when (``time.monotonic()``) operations have been failing to reach the store,
        or None while the last one got through. A store on a server says so; others never do."""
        return None

    def answering_since(self) -> float | None:
        """When (by :attr:`clock`) the store last began to answer this node again after an outage,
        or None when no outage is known: until every node has had ``node_ttl`` of an answering
        store to heartbeat, silence proves no node gone (see :func:`gone_incarnations`). A store
        on a server says so; others never do."""
        return None

    def heard_nothing(self, since: float) -> None:
        """This node's heartbeats have had no answer since ``since`` (``time.monotonic()``) for a
        whole lease: count an outage from then, as one that refused connections would be. A server
        that goes silent (paused, or a network that drops packets) raises nothing, it only leaves
        operations waiting until they are given up, and without an outage known the first recovery
        after it took the claims of live nodes whose leases ran out through it (a run finished
        meanwhile ran again). Stores on no server ignore it."""

    @property
    def retry_period(self) -> float | None:
        """How long one call waits out an unreachable store before it gives up (a server's
        ``reconnect_timeout``), or None for a store that has no outage to wait out. A stopping
        engine gives its last writes this long past the drain (see :meth:`give_up_after`)."""
        return None

    def give_up_after(self, deadline: float | None) -> None:
        """From now on, stop retrying an unreachable store at ``deadline`` (``time.monotonic()``).

        A stopping engine sets this, so that its last writes during an outage
        cannot hold its stop for a retry period each (what they leave undone,
        recovery does); ``None`` (and :meth:`open`) lifts it. Stores with
        nothing to retry ignore it.
        """

    # ---------------------------------------------------------------- lifecycle

    async def open(self) -> None:
        """Make the store usable (open files, start threads, migrate the schema)."""

    async def close(self) -> None:
        """Release everything :meth:`open` took; idempotent."""

    def started(self) -> None:
        """The engine's start is over: until then (from :meth:`open`), a failure ends the start,
        and the store's errors say to start the engine again; from now on, they say what
        retries them. A store opened on its own (``async with store``) is started at once."""

    async def __aenter__(self) -> Store:
        await self.open()
        self.started()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------- wakeups

    def subscribe(self, *, finished: bool = False) -> Subscription:
        """Wakeups for inserted work and cancel requests (and finished run ids with ``finished``).

        Only this process's operations are pushed; keep the subscription
        referenced (it is held weakly).
        """
        sub = Subscription(finished)
        self._subs.add(sub)
        self._notifying = True
        self._notifying_finished = self._notifying_finished or finished
        return sub

    def _notify(self, work: bool = False, cancels: Iterable[str] = (), finished: Iterable[str] = ()) -> None:
        for sub in self._subs:
            sub._post(work, cancels, finished)

    # ---------------------------------------------------------------- runs

    @abstractmethod
    def insert(self, runs: Sequence[NewRun], *, max_pending: int | None = None) -> Awaitable[list[Inserted]]:
        """Insert ``runs`` in one transaction, in order.

        A run whose ``key`` is held by a pending run of the same task is not
        inserted: that run's id comes back with ``new=False``. With
        ``max_pending``, raises :class:`QueueFull` (nothing inserted) when the
        new runs would take the pending count above it. Like :meth:`finish`,
        a store may hand back a future already on its way (every durable
        submit awaits one insert). Cancelling what it hands back before the
        store has begun the write inserts nothing (a submitter that gave up):
        a caller whose runs were promised to someone already shields it.
        """

    @abstractmethod
    async def claim(
        self,
        node: str,
        incarnation: str,
        slots: int,
        tasks: Mapping[str, int | None],
        *,
        limits: Mapping[str, int] | None = None,
    ) -> list[Claim]:
        """Move up to ``slots`` due pending runs to running, oldest first, and return them.

        ``tasks`` maps each task this node may run to its free slots (None:
        no per-task limit); tasks not listed are left for other nodes.
        ``limits`` maps tasks with a concurrency limit that holds across every
        process sharing the store to that limit: a claim never takes a
        task's run while that many of its runs are running, whoever runs
        them (claims of limited tasks are serialised for that).
        """

    @abstractmethod
    async def heartbeat(
        self, incarnation: str, tokens: Sequence[str], progress: Mapping[str, Progress] | None = None
    ) -> HeartbeatResult:
        """Extend the leases of claims still held; report cancel requests and lost claims.

        ``progress`` (token -> progress) is written to those rows.
        """

    @abstractmethod
    def finish(self, token: str, outcome: Outcome, progress: Progress | None = None) -> Awaitable[RunStatus | None]:
        """Record the outcome of a claimed attempt (and ``progress``, its last report, if it
        made any: heartbeats write progress only now and then, so the last may be unwritten).

        Resolves to the status written, or None when ``token`` is not the run's
        current claim (nothing is written). A :class:`Retry` gives PENDING, or
        CANCELLED when a cancel was requested meanwhile (the user's intent wins).
        A store may hand back a future already on its way (a coroutine is fine
        too): the engine writes every run's outcome this way, and a future
        spares it a task per write.
        """

    @abstractmethod
    async def request_cancel(self, run_id: str, reason: CancelReason = "user") -> CancelResult:
        """Cancel a pending run at once, or flag a running one for its owner.

        Raises :class:`RunNotFound` for an unknown id; a finished run is left
        as it is and reported with ``action="finished"``.
        """

    @abstractmethod
    async def recover(self, live_incarnations: Collection[str] | None = None) -> list[Recovered]:
        """Take back running runs whose claim expired or whose owner is provably gone.

        Each is re-queued (attempt + 1, lost_count + 1), failed as WorkerLost
        (lost ``max_lost`` times, or its task declared ``on_lost="fail"``), or
        cancelled (a cancel had been requested). With ``live_incarnations``,
        the owner of any other incarnation counts as gone.
        """

    @abstractmethod
    async def get(self, run_id: str) -> StoredRun | None:
        """The run's row, or None."""

    async def get_many(self, run_ids: Collection[str]) -> dict[str, StoredRun]:
        """The rows of those of ``run_ids`` that exist, by id (SQL stores: one query)."""
        found: dict[str, StoredRun] = {}
        for run_id in run_ids:
            row = await self.get(run_id)
            if row is not None:
                found[run_id] = row
        return found

    @abstractmethod
    async def query(
        self,
        *,
        status: RunStatus | str | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> Page:
        """Runs newest first (by insertion), created at or after ``since``; page with ``before=page.next``."""

    @abstractmethod
    async def counts(self) -> Counts:
        """Runs held per status, and lifetime totals."""

    @abstractmethod
    async def prune(self, *, keep: int | None = None, older_than: float | None = None) -> int:
        """Delete finished runs beyond the newest ``keep`` finished, and those finished
        more than ``older_than`` seconds ago. Pending and running runs are never deleted.
        Returns how many were deleted."""

    # ---------------------------------------------------------------- nodes

    @abstractmethod
    async def register_node(self, node: str, incarnation: str, version: str) -> NodeInfo:
        """Record a starting process; earlier incarnations of ``node`` count as gone from now."""

    @abstractmethod
    async def node_heartbeat(
        self, incarnation: str, running: int, *, cpu_percent: float | None = None, rss_bytes: int | None = None
    ) -> bool:
        """Tell the others this incarnation is alive, how many runs it holds and its load.

        Returns True when a later start of the same node id has registered since
        (see :func:`gone_incarnations`): every other node counts this incarnation
        gone and recovers whatever it claims at once, so its process must stop
        acting as that node. False for an incarnation without a row.
        """

    @abstractmethod
    async def node_stopped(self, incarnation: str) -> None:
        """Record a clean stop: this incarnation's remaining claims are recoverable at once."""

    @abstractmethod
    async def nodes(self) -> list[NodeInfo]:
        """Every recorded incarnation, oldest first."""

    @abstractmethod
    async def prune_nodes(self, older_than: float) -> int:
        """Delete the rows of incarnations that stopped more than ``older_than`` seconds
        ago, and of those silent that long whose node id has started again since;
        returns how many.

        Every process start adds a row, so a service restarted often would
        otherwise grow the table (and the dashboards' node list) without end.
        Nothing depends on a dead incarnation's row: a run it still claims is
        recovered when its lease expires, and its queue jobs count as unheld.
        A silent incarnation that nothing replaced stays: it may be a process
        that was only suspended, and its heartbeats would find no row.
        """

    # ---------------------------------------------------------------- small durable state

    @abstractmethod
    async def get_periodic(self, name: str) -> float | None:
        """When the periodic task ``name`` last fired (UNIX seconds), or None."""

    @abstractmethod
    async def set_periodic(self, name: str, fired_at: float) -> None: ...

    async def claim_periodic(self, name: str, slot: float, gap: float = 0.0) -> bool:
        """Record that the periodic task ``name`` fires its ``slot``; False when the slot recorded
        last (by this node or another) is not more than ``gap`` seconds before it: then this
        slot is not fired here.

        Stores shared by several processes override this with one atomic statement.
        """
        last = await self.get_periodic(name)
        if last is not None and last >= slot - gap:
            return False
        await self.set_periodic(name, slot)
        return True

    def claim_periodic_run(
        self, name: str, slot: float, gap: float, run: NewRun, *, max_pending: int | None = None
    ) -> Awaitable[list[Inserted]]:
        """:meth:`claim_periodic`, then insert the slot's ``run``: both or neither.

        Returns the insert's result, or ``[]`` (nothing inserted, nothing
        claimed) when the slot was taken. A full queue raises
        :class:`QueueFull` and leaves the slot unclaimed. Durable stores do both
        in one transaction: a crash between a claim and its run's insert would
        leave a slot that counts as fired and never ran. A store several nodes
        share also claims the slot without inserting while a run of the task is
        pending or running (on any node: one node's run must not overlap
        another's), and returns that run as ``[Inserted(its_id, new=False)]``.
        """
        return self._claim_then_insert(name, slot, gap, run, max_pending)

    async def _claim_then_insert(
        self, name: str, slot: float, gap: float, run: NewRun, max_pending: int | None
    ) -> list[Inserted]:
        if not await self.claim_periodic(name, slot, gap):
            return []
        return list(await self.insert([run], max_pending=max_pending))

    @abstractmethod
    async def adopt_trigger(
        self, trigger: str, incarnation: str, *, own: bool = False
    ) -> dict[str, TriggerKeyRecord]:
        """Hand ``incarnation`` the saved keys of ``trigger`` whose holder is gone, in one
        transaction; with ``own``, its own rows too (an engine object started again, or a start
        tried again). Returns each key taken once: the rows taken for it merged
        (:func:`merge_trigger_records`; with ``own``, its own row first).

        Gone is as for :meth:`adopt_jobs`: stopped, silent for longer than ``node_ttl``,
        replaced by a later start of its node, or never registered (rows saved before keys
        had holders have none). A row is taken once: two callers at the same moment never
        both get it. The rows taken are held by ``incarnation`` from then on, as one row per
        key: its own row of the key (if it had one) merged with what it took, so a crash
        before its next save neither loses the counts taken nor counts them twice.
        """

    @abstractmethod
    async def trigger_keys_elsewhere(self, trigger: str, incarnation: str) -> set[str]:
        """The keys of ``trigger`` that a holder other than ``incarnation`` has saved (a node
        that counts them too: its runs of those keys may be its own)."""

    @abstractmethod
    async def trigger_keys_held(self, trigger: str, incarnation: str) -> set[str]:
        """The keys of ``trigger`` that ``incarnation`` holds rows of: those it saved or took
        up, less those another node took up while it looked gone."""

    @abstractmethod
    async def save_trigger(
        self, trigger: str, incarnation: str, keys: Mapping[str, TriggerKeyRecord], forget: Collection[str] = (),
        *, held: Collection[str] = (),
    ) -> set[str]:
        """Delete ``incarnation``'s rows of the keys in ``forget``, then insert or replace its rows
        of the given keys of ``trigger``, in one transaction. Other holders' rows, and its
        other keys, stay as they are.

        ``held`` names keys whose row ``incarnation`` saved or took up before: each of those is
        replaced only if that row is still there. Another node that counted ``incarnation`` gone
        (paused, cut off, replaced) may have taken it up meanwhile, with its count, and writing
        the key again would count that twice. Returns those of ``held`` whose row was gone, and
        were not saved."""

    # ---------------------------------------------------------------- queue jobs

    @abstractmethod
    def put_jobs(self, queue: str, incarnation: str, jobs: Sequence[Any]) -> Awaitable[list[int]]:
        """Keep JSON ``jobs`` for ``queue``, held by ``incarnation``; their ids, in order.

        Like :meth:`insert`, a store may hand back a future already on its way, which
        writes the jobs whatever becomes of its caller (a queue whose loop tears down
        leaves its jobs to it, and hands it those not yet written).
        """

    @abstractmethod
    async def done_jobs(self, ids: Sequence[int]) -> None:
        """Forget jobs that were handled (done or failed and reported)."""

    @abstractmethod
    async def adopt_jobs(self, queue: str, incarnation: str, *, own: bool = False) -> list[StoredJob]:
        """Hand ``incarnation`` the jobs of ``queue`` whose holder is gone, oldest first.

        A holder is gone when its incarnation stopped, fell silent for longer
        than ``lease_ttl``, was replaced by a later start of its node, or was
        never registered. With ``own``, jobs ``incarnation`` itself holds are
        returned too (an engine object started again). A job whose row holds no
        JSON (changed by hand) is handed over all the same, marked ``unreadable``.
        """


#: what the process's exit does for the stores, in this order whatever the order things
#: were registered in: engines hand over what they accepted and did not write, then stores
#: write out what they were handed
ExitStep = Literal["hand over", "write out"]
_exit_steps: dict[ExitStep, list[Callable[[], None]]] = {"hand over": [], "write out": []}
_exit_lock = threading.Lock()
#: the process the exit steps are registered for, and the one they last ran in (a fork
#: inherits both from its parent)
_exit_registered_in: int | None = None
_exit_ran_in: int | None = None


def at_exit(step: ExitStep, action: Callable[[], None]) -> None:
    """Run ``action`` (once, however often registered) at the process's exit, in ``step``."""
    global _exit_registered_in
    with _exit_lock:
        if action not in _exit_steps[step]:
            _exit_steps[step].append(action)
        pid = os.getpid()
        if _exit_registered_in == pid:
            return
        if _exit_registered_in is None:
            atexit.register(_run_exit_steps)  # (a fork has its parent's registration)
        _exit_registered_in = pid
        import multiprocessing.util  # (here: a program that never uses it does not pay its import)

        if multiprocessing.parent_process() is not None:
            # a multiprocessing child: fork and forkserver ones end with os._exit, which runs no
            # atexit hook, after running these finalizers (a spawned one runs both: once is done)
            multiprocessing.util.Finalize(None, _run_exit_steps_in_a_child, exitpriority=0)


def _run_exit_steps_in_a_child() -> None:
    """A multiprocessing child runs its finalizers before it joins its threads: first what an
    interpreter's exit does before its atexit hooks (the threads' own exit hooks, a
    BackgroundEngine's stop among them, then joining the threads still running), as the child
    does itself right after (it is done once); then the steps."""
    shutdown = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        shutdown()
    _run_exit_steps()


def _run_exit_steps() -> None:
    global _exit_ran_in
    if _exit_ran_in == os.getpid():
        return
    _exit_ran_in = os.getpid()
    for step in ("hand over", "write out"):
        for action in list(_exit_steps[step]):
            action()


def on_its_way(write: Awaitable[T]) -> asyncio.Future[T] | None:
    """What a store call handed back, if it is a write already on its way: a future of the
    store's own (SQLite's writer queue writes it, also once the loop is gone). A coroutine
    would run only on a loop going away: it is closed unstarted, and None says the write
    will not happen."""
    if isinstance(write, asyncio.Future):
        return write
    if inspect.iscoroutine(write):
        write.close()
    return None


def counter_from_random_start() -> Callable[[], int]:
    """A counter (call it for the next number) from a random start below 2**63: numbers
    unique within the process, and apart from other processes' with no system call each."""
    # from os.urandom, never from a random.seed() the application made: two processes
    # seeded alike would count alike; below 2**63, so 2**63 ids fit before 16 digits wrap
    return itertools.count(int.from_bytes(os.urandom(8), "big") >> 1).__next__


_count = counter_from_random_start()


def _count_afresh_in_child() -> None:
    global _count
    _count = counter_from_random_start()  # a forked child would count on with its parent


os.register_at_fork(after_in_child=_count_afresh_in_child)


def new_run_id() -> str:
    """16 hex digits: this process's counter, from a random start.

    A process's ids sort in the order it made them, so a store's index of ids
    grows where that process's last id went instead of rewriting a random
    page per insert: SQLite commits fewer pages per batch. Two processes'
    ids meet only if one's run of ids reaches the other's random start: a
    chance of about (ids the two made) / 2**63. No system call per id: one would
    release the GIL, and a busy store thread could then keep the loop waiting
    to get it back.
    """
    return f"{_count():016x}"
