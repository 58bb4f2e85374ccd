"""Threshold triggers: per-key counters that enqueue one run per key when due.

``engine.trigger("compile", run_compile, size_threshold=50, staleness=...)``
returns a :class:`Trigger`. ``notify(key)`` counts work for a key on the hot
path (O(1), never blocks). A key fires a run of ``fn(ctx, key)`` when

* its count reaches ``size_threshold`` (checked inline by ``notify``), or
* its last run (or, if it never ran, its first notify) is older than
  ``staleness`` and its count is at least ``staleness_min`` (checked by a
  sweep every ``check_interval`` seconds, or by calling :meth:`Trigger.check`).

Each fire is an ordinary engine run of the task ``trigger:NAME`` (params
``{"key": ...}``, source ``trigger:NAME``), published as ``TriggerFired``. A
key never has two runs queued or running at once; notifies keep counting
meanwhile. When a run succeeds or fails, the key's count drops by the count
captured when it fired (notifies that arrived during the run are kept) and
its last-run time is recorded. A run cancelled before doing its work (e.g. by
shutdown) leaves the count as it was, so the key fires again later.

While the engine stops, a key that comes due (its run ended inside the stop's drain, a
handler notified it) still fires as long as the stop drains its runs: with the memory store
the run runs within the stop's timeout; a durable store's stop takes no run, and the key keeps
its count for the next start.
Once the stop takes no more runs, such a key keeps its count (saved, on a durable store) for
the next start, and ``drain()`` raises ``StoppedBeforeDone`` rather than return as if it ran.

Keys due that a full run queue refused keep their counts and wait in line, tried again as
the queue makes room (counted once each in ``TriggerState.rejected``). So does a key whose
run a shared store refused after this node's queue took it: that run failed ``QueueFull``
without starting, did no work, and takes nothing off.

With a durable store the keys' state (counts, last runs, the run a key is
waiting on) is saved at most ``save_interval`` seconds after it changes and
at stop (once more after the engine's queues and runs have finished, so what
they notified is kept), and loaded at start: a crash loses at most that last
interval of notifies, and a key whose run was still queued follows that run
again. So does a key whose run fired in that last interval, not named by its
saved record; one such run that finished takes the saved count off. Until the
start has taken the keys up, notifies count but fire nothing (nor does
``fire``): a key fired then could go beside the run it waits on. Saves and loads
of many keys go in steps, and the loop's other work runs between them.

Nodes sharing a store share its rows by trigger name, each row held by the incarnation that
saved it: a node saves and forgets only its own, takes up at its start its own and those of
holders that are gone, and at its saves, now and then, those of holders gone since (merged
into its keys: counts add, a key waiting on no run follows the one its row follows). So the
same trigger on every node fires a key once per notifying node's counts, not once per node.
A node that looked gone (paused, cut off, replaced under its node id) may have had its rows
taken up meanwhile: a save writes a key's row over its own only if that row is still there,
and it fires nothing until the store has said which keys are still its own.

A key untouched for ``forget_after`` seconds (no notify, no run ended, and no
run queued or running) is forgotten by the sweep, whatever its count: dropped
from memory, the dashboard and a durable store, and counted in
``TriggerState.forgotten``. A key due by size or staleness fires instead. A
store keeps no notify times: a start counts as touching the keys it loads with
a count. Without ``forget_after`` every key ever notified is kept, which suits
a bounded set of keys (users, documents) but not keys drawn from an unbounded
space (request ids, timestamps).

An operator can fire a key now (``fire(key)``, ``engine.fire_trigger``)
whatever its count, published as ``TriggerFired`` with reason ``manual``;
a key that has a run queued or running already is not queued twice.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import operator
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Required, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from .context import TaskContext
from .errors import (
    EngineLoopClosed,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidCount,
    LoopThreadError,
    QueueFull,
    RunNotFound,
    StoppedBeforeDone,
    TaskDefinitionError,
)
from .hop import Escaped, LoopCall, call_on, cancel_and_wait, current_loop, refuse_in_fork, spawn, working_for
from .events import BaseEvent, TriggerFired
from .execution import checked_timeout
from .index import check_query, limit_problem
from .jsonsafe import check_key
from .options import TriggerOptions, check_options
from .logs import OutageLog, log_safely, log_text
from .runs import RunRecord, RunStatus
from .store import StoredRun, TriggerKeyRecord
from .store.base import merge_trigger_records
from .tasks import async_signature

if TYPE_CHECKING:
    from .engine import Engine
    from .executor import Executor
    from .handle import RunHandle
    from .runs import Run

log = logging.getLogger("taskwatch.triggers")

#: the sweep never waits longer than this, whatever the staleness
_MAX_CHECK_INTERVAL = 60.0

#: after a full queue refused a run, due keys are tried again this soon, doubling up to the cap
#: (sooner when a run leaves this engine's queue: the timer is for room this node does not hear of)
_RETRY_FIRST, _RETRY_MAX = 0.05, 5.0

#: the most one notify may count, and (saturating) a key's count: a store keeps counts as
#: 64-bit integers, and a count beyond them would make every save of the trigger fail
_MAX_N = 2**62
_MAX_COUNT = 2**63 - 1

_RUN_KINDS = ("run.started", "run.retrying", "run.succeeded", "run.failed", "run.cancelled")

#: keys the staleness sweep looks at between two yields to the loop: a sweep of a million keys
#: in one step would hold up every other task of the loop for about a second
_SWEEP_STEP = 4096
#: runs a sweep fires between two yields to the loop at most: each submits a run, which costs
#: as much as looking at many keys
_FIRES_PER_STEP = 128
#: runs a start reads from the store in one request when it takes up the keys' runs
_READ_STEP = 1000
#: keys a save hands a durable store in one request: the store turns each into a row on the
#: loop, and a hundred thousand changed keys in one request held the loop for a second
_SAVE_STEP = 512
#: keys a listing asked from another thread (``state()``) reads per step of the engine's loop: the
#: models are built in the caller's thread, and the loop's other work runs between the steps
_LIST_STEP = 4096
#: how long such a listing waits for the loop to take its next step before it gives up (the loop
#: is blocked); a listing that goes on, however long, is waited for
_LIST_PATIENCE = 5.0

#: what a listing reads of a key on the loop: key, count, last_run_at, first_seen_at, run_id,
#: running, last_run_id, last_status (atoms only: the collector stops tracking such a tuple)
_Row = tuple[str, int, float | None, float | None, str | None, bool, str | None, str | None]


def _whole_count(owner: str, n: object) -> int:
    """``n`` as an int of at least 1 (numpy's ints too), or :class:`InvalidCount`."""
    if isinstance(n, bool):
        raise InvalidCount(owner, n)
    try:
        whole = operator.index(n)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidCount(owner, n) from None
    if not 1 <= whole <= _MAX_N:
        raise InvalidCount(owner, n)
    return whole


class TriggerKeyState(BaseModel):
    model_config = ConfigDict(frozen=True)

    key: str
    count: int
    last_run_at: float | None = None
    first_seen_at: float | None = None
    queued: bool = False
    running: bool = False
    #: the run queued or running for this key now, else the last one that finished
    run_id: str | None = None
    last_status: str | None = None


class TriggerState(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    size_threshold: int
    staleness: float | None = None  # seconds
    staleness_min: int = 1
    fired: int = 0
    keys: list[TriggerKeyState] = Field(default_factory=list)
    check_interval: float | None = None
    #: keys a full run queue refused (this engine's, or a shared store's), each counted once
    #: until the queue takes it: they are tried again as it makes room
    rejected: int = 0
    forget_after: float | None = None  # seconds
    #: idle keys dropped after ``forget_after``, since the engine object was made
    forgotten: int = 0
    #: every key the trigger holds; ``keys`` lists them all, or the hottest few when a
    #: limit was asked for (a snapshot's): those queued or running, then the biggest counts
    key_count: int = 0
    #: on a store nodes share, since the engine object was made: keys taken up from holders
    #: gone while it ran, times its own hold may have lapsed (it looked gone), and keys whose
    #: saved counts another node took meanwhile (they fire there)
    adopted: int = 0
    hold_lapses: int = 0
    given_up: int = 0
    #: counts notified since their key's last save that the engine's last stop could not save
    #: (its durable store out of reach to the end): lost, and logged at ERROR
    lost_at_stop: int = 0


class TriggerFire(BaseModel):
    """What ``fire_trigger`` did for one key.

    ``fired`` is False when the key already had a run queued or running: a key
    never has two, so ``run_id`` is that run (``running`` says which).
    """

    model_config = ConfigDict(frozen=True)

    trigger: str
    key: str
    fired: bool
    run_id: str
    running: bool = False
    #: the key's count when it fired (or now, when it did not)
    count: int = 0


class TriggerKey(BaseModel):
    """The params of a trigger's engine task: which key to process."""

    key: str


@dataclass(slots=True, eq=False)
class _Key:
    count: int = 0
    first_seen_at: float | None = None
    last_run_at: float | None = None
    last_status: str | None = None
    #: the run queued or running for this key (None when idle)
    run_id: str | None = None
    last_run_id: str | None = None
    running: bool = False
    #: the count when the current run fired; subtracted when it finishes
    captured: int = 0
    #: notifies since the store last had this key's count (a durable store's): what a start
    #: adds to the count it reads back, and only that (the rest the store has already)
    unsaved: int = 0
    #: the count and the run this node's row of the key held when the store last had it: what
    #: another node took, if it took the row up while this node looked gone (see Trigger._retake)
    saved: int = 0
    saved_run: str | None = None
    #: the last notify (kept only when the trigger forgets keys: it costs a clock read)
    touched_at: float | None = None
    #: a full queue refused the key and no run of it has started or ended since: counted
    #: in ``rejected`` once, however often it is tried meanwhile
    refused: bool = False


def _heat(item: tuple[str, _Key]) -> tuple[bool, int]:
    return item[1].run_id is not None, item[1].count


def _counted(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 run", "2 runs"."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _seconds(staleness: timedelta | float | None) -> float | None:
    if staleness is None:
        return None
    # not float(): a bool must reach validation as it was given, to be refused there
    return staleness.total_seconds() if isinstance(staleness, timedelta) else staleness


def _check_fn(fn: Any, name: str) -> None:
    """Refuse a trigger function a run cannot call as ``fn(ctx, key)``, the only call it makes:
    otherwise every run would fail. Accepted as tasks are: a ``functools.partial``, an object
    whose ``__call__`` is async."""
    what = f"the function of trigger {name!r}"
    fn_name = getattr(fn, "__name__", None) or "fn"
    shape = f"a trigger's function is `async def {fn_name}(ctx, key: str)`"
    _, sig = async_signature(fn, what, "(ctx, key)", shape)
    try:
        sig.bind(None, "key")
    except TypeError as exc:
        params = sig.parameters.values()
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        # a run passes (ctx, key) and nothing else: a parameter more without a default fails every run
        required = [p.name for p in positional[2:] if p.default is p.empty]
        required += [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
        if required:
            raise TaskDefinitionError(
                f"{what} is called with (ctx, key) only, so its parameter {', '.join(required)} would never "
                f"get a value and every run would fail: give it a default, or take it out "
                f"(async def {fn_name}(ctx, key: str))"
            ) from None
        raise TaskDefinitionError(f"{what} cannot be called as {fn_name}(ctx, key) ({exc}); {shape}") from None


class TriggerKwargs(TypedDict, total=False):
    """The options of ``engine.trigger(name, fn, **options)``: :class:`Trigger`'s keyword-only
    parameters, so a type checker catches a misspelt option or a wrong type where it is written.

    Values are still checked when the trigger is made (a type does not say 0 is too small).
    """

    size_threshold: Required[int]
    staleness: timedelta | float | None
    staleness_min: int | None
    check_interval: float | None
    retries: int
    timeout: float | None
    clock: Callable[[], float] | None
    save_interval: float
    forget_after: timedelta | float | None


class Trigger:
    """Per-key counters that fire engine runs on size or staleness. See the module docstring.

    Options: ``size_threshold`` (required), ``staleness`` (timedelta or
    seconds; None disables staleness), ``staleness_min`` (default 1),
    ``check_interval`` (default ``min(staleness / 10, 60)`` seconds),
    ``retries``, ``timeout`` (for the engine task), ``clock`` (a
    ``time.time``-like callable, so tests can move time without sleeping;
    default: the engine's clock), ``save_interval`` (seconds between
    saves of changed keys to a durable store; default 1), and
    ``forget_after`` (timedelta or seconds an idle key is kept; default None:
    kept for good).
    """

    def __init__(
        self,
        engine: Engine,
        name: str,
        fn: Any,
        executor: Executor | None = None,
        *,
        size_threshold: int,
        staleness: timedelta | float | None = None,
        staleness_min: int | None = None,
        check_interval: float | None = None,
        retries: int = 0,
        timeout: float | None = None,
        clock: Callable[[], float] | None = None,
        save_interval: float = 1.0,
        forget_after: timedelta | float | None = None,
    ) -> None:
        stale = _seconds(staleness)
        forget = _seconds(forget_after)
        # None: left out (1); told apart from a 1 given, which without staleness is refused as any value is
        given_min = staleness_min
        staleness_min = 1 if staleness_min is None else staleness_min
        opts = check_options(
            TriggerOptions,
            f"trigger {name!r}",
            size_threshold=size_threshold,
            staleness=stale,
            staleness_min=staleness_min,
            check_interval=check_interval,
            save_interval=save_interval,
            forget_after=forget,
        )
        stale, forget = opts.staleness, opts.forget_after
        problems = []
        if opts.size_threshold > _MAX_COUNT:
            problems.append(
                f"size_threshold={size_threshold!r}: a key's count stops at 2**63-1, so a key would "
                "never reach it; use at most 2**63-1 (which leaves firing to staleness in practice)"
            )
        if opts.check_interval is not None and stale is None and forget is None:
            # nothing to sweep for: the interval would be ignored without a word
            problems.append(
                f"check_interval={check_interval!r}: the sweep only looks for stale keys (staleness=) "
                "and idle ones (forget_after=); give one of those, or leave check_interval out"
            )
        if stale is None and given_min is not None:
            # only staleness reads it: without staleness it would be ignored without a word
            problems.append(
                f"staleness_min={staleness_min!r}: it is the count a key needs to fire by staleness, "
                "and this trigger has no staleness=; give staleness= too, or leave staleness_min out"
            )
        if clock is not None and not callable(clock):
            # found out only at the first notify otherwise, as a TypeError of every notify
            problems.append(
                f"clock={clock!r}: pass a callable taking no arguments that returns UNIX seconds "
                "(time.time, or a test's fake clock), or None for the engine's clock"
            )
        if opts.staleness_min > opts.size_threshold:
            # a key reaching staleness_min has passed the size threshold first, and fired by size
            problems.append(
                f"staleness_min={staleness_min!r}: above size_threshold={size_threshold!r}, a key fires "
                f"by size before it counts that many, so staleness could never fire it; use at most "
                f"{size_threshold!r}"
            )
        if problems:
            raise InvalidConfiguration(f"trigger {name!r}", problems)
        _check_fn(fn, name)
        self._engine = engine
        self.name = name
        self.fn = fn
        self.size_threshold = size_threshold
        self.staleness = stale
        self.staleness_min = staleness_min
        self.forget_after = forget
        # the sweep runs when there is something to sweep for: stale keys, idle keys
        spans = [span / 10 for span in (stale, forget) if span is not None]
        self.check_interval = (opts.check_interval or min(spans + [_MAX_CHECK_INTERVAL])) if spans else None
        #: None: the engine's own wall clock, read at each use
        self._fixed_clock = clock
        self.task_name = f"trigger:{name}"
        self.source = f"trigger:{name}"
        engine.register(
            self._run_key,
            name=self.task_name,
            retries=retries,
            timeout=timeout,
            kind="trigger",
            params=TriggerKey,
            description=f"runs {getattr(fn, '__name__', fn)!s} for one key of trigger {name!r}",
        )
        self._keys: dict[str, _Key] = {}
        #: run id -> key, for runs queued or running
        self._active: dict[str, str] = {}
        self.fired = 0
        self.rejected = 0
        self.forgotten = 0
        #: keys forgotten since the last save: a durable store deletes them
        self._forget: set[str] = set()
        #: a durable store saves the keys: only then are changes and forgotten keys noted for it
        #: (else those sets would hold every key ever notified)
        self._saved = engine.durable
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: keys due that a full run queue refused, tried again by ``_retry_refused`` (first
        #: refused first; an OrderedDict, whose front pops in O(1) however many went before)
        self._refused: OrderedDict[str, None] = OrderedDict()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        #: while no loop counts (before the start, after the stop) notifies from several threads
        #: count under it; reentrant: a fire's event may reach a callback that notifies
        self._lock = threading.RLock()
        #: the start's sweep of keys that reached their threshold before it, not run yet
        self._first_check: asyncio.Task[None] | None = None
        #: drains waiting for this trigger's start (made while the engine runs), on the engine's loop
        self._launch_waiters: list[asyncio.Future[None]] = []
        #: the start has launched the sweeps (until the stop)
        self._launched = False
        #: the last start raised (a durable store's read failed): no launch is coming for drains to wait for
        self._start_failed = False
        self._sweeper: asyncio.Task[None] | None = None
        #: the next try of the refused keys: after ``_retry_delay``, and on the loop's next turn
        #: once a run left the queue (room for them) or a try stopped to let the loop breathe
        self._retry: asyncio.TimerHandle | None = None
        self._soon: asyncio.Handle | None = None
        #: a shared store refused runs this node's queue had taken (the node cannot see the
        #: other nodes' runs): tries send at most this many keys each, doubling while none comes
        #: back refused, since the store refuses a whole write of runs that does not fit
        #: (None: no such refusal since the store last took them)
        self._window: int | None = None
        #: the runs the last of those tries sent, not refused so far
        self._probes: set[str] = set()
        #: keys whose run is being submitted now (see :meth:`_queue_run`): a bus callback of that
        #: submit's own events may notify or fire the key before the submit has returned its run
        self._submitting: set[str] = set()
        #: the TriggerFired events of fires a callback made during another key's submit, published
        #: after that key's own (see :meth:`_queue_run`)
        self._held_fired: list[dict[str, Any]] = []
        #: runs of this trigger the engine's stop cancelled (memory store), since the last start
        self._cut_at_stop = 0
        #: keys that came due while the engine stopped and that it took no run for any more (its
        #: drain was over), since the last start: they keep their counts for the next start
        self._due_at_stop: set[str] = set()
        self._retry_delay = _RETRY_FIRST
        #: durable store only: keys changed since the last save, and the task that saves them
        self.save_interval = opts.save_interval
        self._dirty: set[str] = set()
        self._saver: asyncio.Task[None] | None = None
        #: the last start read the store's keys: only then may a save write over them
        self._loaded = False
        #: keys taken up while running from holders gone meanwhile, since the engine object was made
        self.adopted = 0
        #: the node's claims and heartbeats: whether it may look gone to others (see :meth:`_hold_fresh`)
        self._executor = executor
        #: the executor's last renewal as the last look saw it (see :meth:`_hold_fresh`)
        self._seen_renewal = 0.0
        #: this node may have looked gone since its last save: another node may have taken up its
        #: rows. Saves and fires wait until the store says which are still its own (:meth:`_retake`)
        self._lapsed = False
        #: times this node's hold on its saved keys may have lapsed, and keys whose saved counts
        #: another node took up meanwhile (they fire there), since the engine object was made
        self.hold_lapses = 0
        self.given_up = 0
        #: counts the last stop could not save (see :class:`TriggerState`)
        self.lost_at_stop = 0
        #: a later process registered under this node's id (said once): its hold is gone for good
        self._replaced = False
        #: keys that came due while the hold may have lapsed, not fired: the retake fires them,
        #: and a drain waits for it (see :meth:`_waits`)
        self._withheld: set[str] = set()
        #: the look at the hold that runs on a timer of its own (see :meth:`_watch`)
        self._watch_handle: asyncio.TimerHandle | None = None
        #: the save loop looks at the hold (durable store, from its first step to its end): a
        #: fire looks too, as the renewal it last saw is set
        self._hold_watched = False
        #: an adoption under way: a stop waits for it (the store may have handed the keys over)
        self._adopting: asyncio.Task[None] | None = None
        #: tasks reading the end of runs taken up with keys that this node's index does not hold
        self._watchers: set[asyncio.Task[None]] = set()
        engine.bus.add_callback(self._on_run_event, _RUN_KINDS)

    async def _run_key(self, ctx: TaskContext, params: TriggerKey) -> Any:
        return await self.fn(ctx, params.key)

    # ------------------------------------------------------------ hot path

    def notify(self, key: str, n: int = 1) -> None:
        """Count ``n`` units of work for ``key``; fires at once if it reaches the size threshold.

        O(1) and non-blocking. From another thread the count is handed to the
        engine's loop. Raises :class:`InvalidKey` for a key that is not a str
        and :class:`InvalidCount` for an ``n`` that is not an int of at least 1,
        in a fork of the process the engine runs in :class:`EngineInAnotherProcess`, and
        once the engine's loop closed under it :class:`EngineLoopClosed`; either way
        nothing is counted.
        """
        check_key(f"trigger {self.name!r}", key)
        if self._engine.loop_lost:
            raise EngineLoopClosed()  # nothing would ever fire it: counted, it would only mislead
        if type(n) is not int or not 1 <= n <= _MAX_N:
            # checked here, on the caller's thread: a bad count raises to its caller, not later
            # on the loop, and a count of 0.5 or -3 would break the key's record
            n = _whole_count(f"trigger {self.name!r}", n)
        if self._loop is not None and threading.get_ident() == self._loop_thread:
            self._count(key, n)
        else:
            self._count_elsewhere(key, n)

    def _count_elsewhere(self, key: str, n: int) -> None:
        """Count off the loop: handed to the loop when there is one, else here under the lock."""
        loop = self._loop
        if loop is not None:
            # before the try, which reads a RuntimeError (as this refusal is) as a closed loop: in a
            # fork the count would be handed to a loop nothing runs here
            refuse_in_fork(loop)
            try:
                loop.call_soon_threadsafe(self._count, key, n)
                return
            except RuntimeError:
                pass  # the loop is closed: it counts nothing any more
        with self._lock:
            if self._loop is not loop and self._loop is not None:
                # the start took a loop while this thread waited: that loop counts from now on
                self._count_elsewhere(key, n)
                return
            # no fire here: runs are queued on the engine's loop only. A key that is due now
            # fires at the start's first sweep (the engine may be starting this very moment)
            self._count(key, n, False)

    def _count(self, key: str, n: int, fire: bool = True) -> None:
        st = self._keys.get(key)
        if st is None:
            st = self._keys[key] = _Key(first_seen_at=self._now())
        elif self.forget_after is not None:
            st.touched_at = self._now()
        st.count = min(st.count + n, _MAX_COUNT)
        st.unsaved = min(st.unsaved + n, _MAX_COUNT)
        self._changed(key)
        if st.count >= self.size_threshold and st.run_id is None and fire:
            self._fire(key, st, "size")

    def _now(self) -> float:
        return (self._fixed_clock or self._engine.clock)()

    # ------------------------------------------------------------ firing

    def fire(self, key: str) -> TriggerFire:
        """Queue a run for ``key`` now, whatever its count (a key not seen before included).

        A key with a run queued or running already gets no second one: the
        result names that run with ``fired=False``. Raises :class:`InvalidKey`
        for a key that is not a str, and :class:`QueueFull` or
        :class:`EngineNotRunning` when the engine takes no run; nothing changes then.
        Call it on the engine's loop; :class:`LoopThreadError` from another thread.
        """
        check_key(f"trigger {self.name!r}", key)
        if self._engine.loop_lost:
            raise EngineLoopClosed()
        loop = self._engine.loop
        if self._engine.state == "running" and loop is not None and current_loop() is not loop:
            # said here: the engine's own refusal would name submit_nowait(), which nobody called
            raise LoopThreadError(
                "fire",
                f"Trigger.fire() was called from a thread other than the engine's event loop's, which "
                f"alone may queue runs; nothing was queued. On the engine's loop, `trigger.fire(key)` or "
                f"`engine.fire_trigger({self.name!r}, key)`; from another thread, the background engine's "
                f"`bg.fire_trigger({self.name!r}, key)` (`bg = engine.start_background()`)",
            )
        if self._held():
            # the key may wait on a run its saved record names, not known yet: a run queued now
            # could go beside it
            raise EngineNotRunning(
                "starting",
                f"trigger {self.name!r} is still taking up the keys its store saved (and the runs they "
                f"wait on), so nothing was queued; fire once it has started (`await trigger.drain()` "
                f"waits for its start)",
            )
        st = self._keys.get(key)
        if st is not None and st.run_id is not None:
            return TriggerFire(
                trigger=self.name, key=key, fired=False, run_id=st.run_id, running=st.running, count=st.count
            )
        if key in self._submitting:
            return self._being_queued(key)
        handle = self._queue_run(key, "manual", own=False)
        st = self._keys[key]
        return TriggerFire(
            trigger=self.name, key=key, fired=True, run_id=handle.id, running=st.running, count=st.captured
        )

    def _being_queued(self, key: str) -> TriggerFire:
        """:meth:`fire` called back by an event of ``key``'s own submit (its ``run.submitted``, its
        ``run.started``): the run that submit queued is the key's, though the submit has not
        returned it yet. It is in the engine's index already, among the newest runs."""
        st = self._keys.get(key)
        for limit in (16, None):
            for run in self._engine.runs((RunStatus.PENDING, RunStatus.RUNNING), task=self.task_name, limit=limit):
                if run.params.get("key") == key and run.id not in self._active:
                    return TriggerFire(
                        trigger=self.name, key=key, fired=False, run_id=run.id,
                        running=run.status is RunStatus.RUNNING, count=0 if st is None else st.count,
                    )  # fmt: skip
        # (the engine indexes a run before it publishes any event of it)
        raise RuntimeError(
            f"trigger {self.name!r}: key {key!r} is being queued, but its run is not in the engine's index"
        )

    def _queue_run(self, key: str, reason: str, *, own: bool) -> RunHandle:
        """Submit a run for ``key`` and make it the key's run; raises what the submit raises.

        The submit publishes the run's ``run.submitted`` (and ``run.started``, given a free
        slot) to the bus's callbacks before it returns the run, and a callback may notify this
        key, fire it or sweep (a callback may submit runs). Until the key has its run it counts
        as queued already: a notify meanwhile counts toward its next run (a second run now
        would go beside this one, both taking the same count off), and the count this run
        takes off is the one the key had before the submit. A fire such a callback makes of
        another key publishes its ``trigger.fired`` after this key's, so they come in the
        order of their runs' ``run.submitted``.
        """
        st = self._keys.get(key)
        captured = 0 if st is None else st.count
        outermost = not self._submitting
        self._submitting.add(key)
        try:
            try:
                handle = self._submit(key, own=own)
            except BaseException:
                self._submitting.discard(key)
                st = self._keys.get(key)
                if st is not None and st.count > captured and st.run_id is None and self._loop is not None:
                    # notified meanwhile, maybe past its threshold: the notify fired nothing
                    self._loop.call_soon(self._refire, key)
                raise
            self._submitting.discard(key)
            st = self._keys.get(key)
            if st is None:  # (a key fired by hand that no notify has made)
                st = self._keys[key] = _Key(first_seen_at=self._now())
            self._fired(key, st, handle, reason, captured)
        finally:
            if outermost:
                self._publish_held()
        return handle

    def _publish_held(self) -> None:
        held, self._held_fired = self._held_fired, []
        for fields in held:
            self._engine.bus.emit(TriggerFired, **fields)

    def _submit(self, key: str, *, own: bool = False) -> RunHandle:
        """Queue a run for ``key``. ``own``: the trigger's own fire (due by size or staleness, a
        refused key tried again), which is the engine's work whatever call brought it on (a run
        ending, a notify from anywhere): a stopping engine still takes it while it drains its
        runs, so a key that comes due then runs within the stop's timeout (see
        ``Engine._require_running``). A fire by hand (:meth:`fire`) is its caller's."""
        params = TriggerKey(key=key)
        if own and self._engine.state == "stopping":
            with working_for(self._engine):
                return self._engine.submit_nowait(self.task_name, params, source=self.source, internal=True)
        return self._engine.submit_nowait(self.task_name, params, source=self.source, internal=True)

    def _held(self) -> bool:
        """Whether fires wait: on a durable store, until the start has taken up the saved keys
        (a start that failed included, until one tried again has). A key may wait on a run its
        saved record names, or on one fired after the last save, which a run fired before the
        key follows it would go beside; the start's first sweep fires what came due meanwhile."""
        return self._saved and not self._launched and self._engine.state == "running"

    def _waits(self) -> bool:
        """Whether keys that come due wait to fire: until the start has taken up the saved keys
        (:meth:`_held`), and while another node may be taking up this node's (:meth:`_retake`
        fires them). A key fired by hand does not wait for the latter."""
        return self._lapsed or self._held()

    def _fire(self, key: str, st: _Key, reason: str) -> RunHandle | None:
        if self._hold_watched and not self._lapsed and self._launched:
            # a pause that just ended may not have been looked at yet (the first callbacks of
            # the loop after a SIGSTOP run before the timer that looks): another node may have
            # taken up this key's row meanwhile, and fires it
            self._hold_fresh()
        if self._waits():
            if self._lapsed and self._launched and not self._replaced:
                # a drain waits for the retake, which fires it (a replaced process has none:
                # its keys fire on the process that replaced it)
                self._withheld.add(key)
            return None  # counted: the start's first sweep (or the retake) fires it
        if self._submitting and key in self._submitting:
            return None  # its run is being queued: the count is for the next one (see _queue_run)
        if self._launched and self._refused:
            # keys a full queue refused wait for room already: this one waits behind them. Tried
            # now, it would be refused too (validated and built for nothing), or take the room
            # they wait for
            self._refuse(key, st)
            return None
        return self._submit_due(key, st, reason)

    def _submit_due(self, key: str, st: _Key, reason: str) -> RunHandle | None:
        try:
            return self._queue_run(key, reason, own=True)
        except QueueFull:
            # the count stays, and the key is tried again soon: without that a trigger
            # with no staleness sweep would wait for this key's next notify, maybe forever
            self._refuse(key, st)
            return None
        except EngineNotRunning:
            # the stop's drain is over: the count stays for the next start, and a drain waiting
            # on this trigger hears that the key did not run (not that all is done)
            self._due_at_stop.add(key)
            return None
        except InvalidConfiguration as exc:
            # the engine's run_id_factory made an id no store could keep: the notify that brought
            # the key due is no caller's mistake (it raises only InvalidKey, InvalidCount). The
            # count stays and the key waits in line, tried again as a full queue's keys are
            self._misconfigured(exc)
            self._refuse(key, st)
            return None

    def _misconfigured(self, exc: InvalidConfiguration) -> None:
        log_safely(log, logging.ERROR, "trigger %r: a due key's run could not be queued, and is tried again: %s",
                   self.name, log_text(str(exc)))  # fmt: skip

    def _refuse(self, key: str, st: _Key) -> None:
        """A full queue refused ``key``: it waits in line for room, counted once."""
        if not st.refused:
            st.refused = True
            self.rejected += 1
        self._refused[key] = None
        self._retry_later()

    def _may_retry(self) -> bool:
        # not once the trigger stopped: its stop told the drains that nothing tries them any more
        loop = self._loop
        return (
            loop is not None and not loop.is_closed() and (self._launched or self._engine.state == "running")
            and not self._waits()
        )  # fmt: skip

    def _retry_later(self) -> None:
        if self._retry is not None or not self._may_retry():
            return
        assert self._loop is not None
        self._retry = self._loop.call_later(self._retry_delay, self._retry_timer)
        self._retry_delay = min(self._retry_delay * 2, _RETRY_MAX)

    def _retry_soon(self) -> None:
        if self._soon is not None or not self._refused or not self._may_retry():
            return
        assert self._loop is not None
        self._soon = self._loop.call_soon(self._retry_now)

    def _retry_timer(self) -> None:
        self._retry = None
        self._retry_refused()

    def _retry_now(self) -> None:
        self._soon = None
        self._retry_refused()

    def _retry_refused(self) -> None:
        """Fire the keys a full queue refused, first refused first, until it refuses one again.

        The rest would be refused as well: they wait for the next try, which a run leaving
        the queue brings on at once (the timer is for room this node does not hear of). A try
        fires at most ``_FIRES_PER_STEP`` keys and then lets the loop's other work run first.
        """
        if self._waits():
            return  # the launch (or the retake) tries every key due, these too
        budget = _FIRES_PER_STEP
        if self._window is not None:
            if self._probes:
                # the keys the last try sent have not come back refused: the store took them
                self._probes.clear()
                self._retry_delay = _RETRY_FIRST
                self._window *= 2
                if self._window >= _FIRES_PER_STEP:
                    self._window = None
            budget = self._window or budget
        now = self._now()
        fired = step = 0
        full = False
        refused = self._refused
        while refused and fired < budget and step < _SWEEP_STEP:
            key, _ = refused.popitem(last=False)
            st = self._keys.get(key)
            reason = None if st is None or st.run_id is not None else self._due_reason(st, now)
            if st is None or reason is None:
                # forgotten, fired by hand, or no longer due (its count taken by a run that
                # ended meanwhile): nothing to wait for
                if st is not None and st.run_id is None:
                    st.refused = False
                step += 1
                continue
            try:
                handle = self._queue_run(key, reason, own=True)
            except (QueueFull, EngineNotRunning, InvalidConfiguration) as exc:
                if isinstance(exc, InvalidConfiguration):
                    self._misconfigured(exc)
                refused[key] = None
                refused.move_to_end(key, last=False)  # still the first in line
                full = True
                break
            if self._window is not None:
                self._probes.add(handle.id)
            fired += 1
            step += _SWEEP_STEP // _FIRES_PER_STEP
        if not refused:
            if self._probes:
                self._retry_later()  # to see whether the store takes them
            else:
                self._window = None
                self._retry_delay = _RETRY_FIRST
            if not self._active:
                self._wake_drainers()  # they waited on these keys alone
            return
        # set while keys wait: the next try may be refused with no run of this node left to end
        self._retry_later()
        if not full and self._window is None:
            self._retry_soon()  # only the step was spent: go on once the loop's other work ran

    def _fired(self, key: str, st: _Key, handle: RunHandle, reason: str, captured: int) -> None:
        self._refused.pop(key, None)
        st.run_id = handle.id
        st.captured = captured
        self._changed(key)
        # a free slot starts the run at once, before this trigger hears of it
        st.running = handle.status is RunStatus.RUNNING
        self._active[handle.id] = key
        self.fired += 1
        # published after the run's own run.submitted (and run.started, given a free slot): the
        # event names the run, whose id exists only once the engine has taken it, and one sent
        # before the submit would claim a fire that a full queue then refuses
        fields: dict[str, Any] = {
            "trigger": self.name, "key": key, "reason": reason, "count": captured, "run_id": handle.id
        }
        if self._submitting:
            # fired by a callback of another key's submit: published after that key's own
            self._held_fired.append(fields)
        else:
            self._engine.bus.emit(TriggerFired, **fields)

    def check(self) -> int:
        """Run the sweep once: fire every idle key that is due by size or staleness, and
        forget the keys untouched for ``forget_after`` (whatever their count).

        Returns how many runs were fired. Call it on the engine's loop while it runs:
        :class:`LoopThreadError` from another thread, and nothing is fired or forgotten.
        """
        loop = self._loop or self._engine.loop
        if loop is not None and loop.is_running() and current_loop() is not loop:
            # said here: the engine's own refusal, at the first key due, would name submit_nowait(),
            # which nobody called; and the keys are the loop's to change
            raise LoopThreadError(
                "check",
                "Trigger.check() was called from a thread other than the engine's event loop's, which "
                "alone may queue runs and change the keys; nothing was fired or forgotten. On the engine's "
                "loop, `trigger.check()`; from another thread, the background engine's "
                "`bg.call(lambda engine: trigger.check())` (`bg = engine.start_background()`)",
            )
        now = self._now()
        fired = 0
        for key, st in list(self._keys.items()):
            fired += self._check_key(key, st, now)
        return fired

    async def _check_stepwise(self) -> int:
        """:meth:`check`, yielding to the loop every ``_SWEEP_STEP`` keys looked at, or sooner,
        every ``_FIRES_PER_STEP`` runs fired: a fire submits a run, which costs far more."""
        now = self._now()
        fired = 0
        step = 0
        for key in list(self._keys):
            if step >= _SWEEP_STEP:
                step = 0
                await asyncio.sleep(0)
            # forgotten, or forgotten and notified afresh, while the sweep yielded
            st = self._keys.get(key)
            if st is None:
                step += 1
            elif self._check_key(key, st, now):
                fired += 1
                step += _SWEEP_STEP // _FIRES_PER_STEP
            else:
                step += 1
        return fired

    def _check_key(self, key: str, st: _Key, now: float) -> bool:
        """Fire ``key`` if it is idle and due, else forget it if untouched too long; True if it fired."""
        if st.run_id is not None or (self._submitting and key in self._submitting):
            return False  # (a key whose run is being queued is not idle: see _queue_run)
        reason = self._due_reason(st, now) if st.count > 0 else None
        if reason is not None:
            # refused by a full queue: tried again, not forgotten
            return self._fire(key, st, reason) is not None
        if self.forget_after is not None and self._untouched_for(st, now) >= self.forget_after:
            del self._keys[key]
            if self._saved:
                self._forget.add(key)
            self.forgotten += 1
        return False

    def _due_reason(self, st: _Key, now: float) -> str | None:
        if st.count >= self.size_threshold:
            return "size"
        if self.staleness is None or st.count < self.staleness_min:
            return None
        # (staleness is above 0: a key with neither time is never stale)
        if self._idle_for(st, now) >= self.staleness:
            return "staleness"
        return None

    @staticmethod
    def _idle_for(st: _Key, now: float) -> float:
        """Seconds since the key's last run, or else its first notify (0 with neither)."""
        since = st.last_run_at if st.last_run_at is not None else st.first_seen_at
        return 0.0 if since is None else now - since

    @staticmethod
    def _untouched_for(st: _Key, now: float) -> float:
        """Seconds since the key's last notify, last run or first notify, the latest of them."""
        times = [t for t in (st.touched_at, st.last_run_at, st.first_seen_at) if t is not None]
        return now - max(times) if times else 0.0

    def _changed(self, key: str) -> None:
        if self._saved:
            self._dirty.add(key)

    def _on_run_event(self, event: BaseEvent) -> None:
        """Bus callback: follow our runs from queued to running to finished."""
        kind: str = event.kind
        if self._refused and self._window is None and (kind == "run.started" or kind == "run.cancelled"):
            # a run (of any task) left this engine's queue, or a slot: room for a refused key
            self._retry_soon()
        key = self._active.get(event.run_id)  # type: ignore[attr-defined]
        if key is None:
            return
        st = self._keys[key]
        if kind == "run.started":
            st.running = True
            st.refused = False  # the queue took it
            if self._window is None:
                self._retry_delay = _RETRY_FIRST
            return
        if kind == "run.retrying":
            st.running = False
            return
        del self._active[event.run_id]  # type: ignore[attr-defined]
        if kind == "run.failed" and self._store_refused(event, st):
            self._given_back(key, st)
            if not self._active:
                self._wake_drainers()  # (they go on waiting for the key, now refused)
            return
        st.refused = False
        if kind == "run.cancelled" and getattr(event, "reason", None) == "shutdown":
            self._cut_at_stop += 1  # a drain waiting on it hears it did not run
        self._ended(key, st, kind.removeprefix("run."), self._now())
        cancelled_by_user = kind == "run.cancelled" and getattr(event, "reason", None) == "user"
        # a user who cancels a key's run means it: wait for the next notify or sweep
        if st.count >= self.size_threshold and not cancelled_by_user:
            if self._loop is not None:
                # notifies during the run reached the threshold again; fire after this
                # event has been delivered, so events stay in order for every listener
                self._loop.call_soon(self._refire, key)
            else:
                self._due_at_stop.add(key)  # the engine has stopped: nothing fires it before the next start
        if not self._active:
            self._wake_drainers()

    def _store_refused(self, event: BaseEvent, st: _Key) -> bool:
        """Whether the failed run was one a shared store's full queue refused when it was
        written (this node's queue had taken it): it never started, so it did no work."""
        error = getattr(event, "error", None)
        if error is None or error.type != QueueFull.__name__ or st.running or getattr(event, "attempt", 1) != 1:
            return False
        # a handler may raise QueueFull too (a submit of its own refused), but only after it started
        run = self._engine.current(event.run_id)  # type: ignore[attr-defined]
        return run is None or run.started_at is None

    def _given_back(self, key: str, st: _Key) -> None:
        """The key's run was refused by the store: the count it fired with stays, and the key
        waits for room as a key this node's queue refused does."""
        st.running = False
        if st.saved_run == st.run_id:
            st.saved_run = None  # (its saved count stays whole: see _ended)
        st.run_id, st.captured = None, 0
        self._changed(key)
        # the store refuses a whole write that does not fit: from now on, try few keys at a time
        self._window, self._probes = 1, set()
        if self._due_reason(st, self._now()) is not None:
            self._refuse(key, st)
        # else fired by hand below its threshold: that run failed QueueFull, as a submit's does

    def _ended(self, key: str, st: _Key, status: str, at: float) -> None:
        """The key's run ended with ``status``: a run that did its work takes its count off."""
        st.running = False
        if status != RunStatus.CANCELLED.value:
            # the count a run takes off is the oldest first, the saved part with it: what is left
            # of the saved part is what a retake gives up if another node took the row meanwhile
            # (which takes the count of the run it names off when that run ends, as here)
            st.saved = max(0, st.saved - st.captured)
        if st.saved_run is not None and st.saved_run == st.run_id:
            st.saved_run = None
        st.last_run_id, st.run_id = st.run_id, None
        st.last_status = status
        if status != RunStatus.CANCELLED.value:
            st.count = max(0, st.count - st.captured)
            st.last_run_at = at
        st.captured = 0
        self._changed(key)

    def _refire(self, key: str) -> None:
        st = self._keys.get(key)
        if st is not None and st.run_id is None and st.count >= self.size_threshold:
            self._fire(key, st, "size")

    # ------------------------------------------------------------ waiting and state

    async def drain(self, timeout: float | None = None) -> None:
        """Wait until no run of this trigger is queued or running (``TimeoutError`` after ``timeout``).

        Keys that reached their threshold before the start count: they fire first; so do keys
        due that a full run queue refused (they are tried again until it takes them). With keys
        due while the engine is not started (new, or stopped) and no start is under way, it
        raises :class:`EngineNotRunning` at once, as nothing runs them before a start; they keep
        their counts, and fire at that start. A start under way is waited for, then the runs;
        with no key due it returns at once, started or not. From a
        loop other than the engine's (a ``start_background()`` engine) the wait is made on
        the engine's loop, which is the one that hears the runs end. A trigger made while
        the engine runs waits for its start first; a start that failed (logged) is not
        waited for, only the runs fired already are (on a durable store, keys notified since
        fire once a start tried again has taken up the saved keys). :class:`InvalidConfiguration` for a
        ``timeout`` that is no number of seconds >= 0.
        """
        timeout = checked_timeout("Trigger.drain()", timeout)
        # the engine's loop while it runs: this trigger's may not be bound yet (made a moment ago)
        loop = self._engine.loop if self._engine.state in ("running", "stopping") else self._loop
        if loop is not None and loop.is_closed():
            loop = None
        # the timeout kept on the caller's loop: a blocked engine loop would not end a drain
        # timed there (a call on it given up is cancelled at its next await there)
        async with asyncio.timeout(timeout):
            await call_on(loop, self._drain_here)

    async def _drain_here(self, looked_again: bool = False) -> None:
        # (within drain()'s timeout, kept on the caller's loop: see drain())
        if self._engine.loop_lost:
            raise EngineLoopClosed()  # its runs and sweeps ended with that loop: none will come
        loop = asyncio.get_running_loop()
        if not self._launched and not self._start_failed and self._engine.state == "running":
            # made while the engine runs: its start is a task of the loop, not run yet
            launched = loop.create_future()
            self._launch_waiters.append(launched)
            await launched
        if (first := self._first_check) is not None:
            # the start's own sweep may not have reached those keys yet: a drain right after
            # the start would find nothing queued and return before they ran. (A wait, not
            # an await: a drain that times out or is cancelled leaves the sweep going)
            await asyncio.wait([first])
        while self._active or self._refused or self._withheld:
            if self._engine.state == "stopped" and self._engine.durable and self._active:
                raise self._left_at_stop()
            if not self._active and self._withheld and not self._launched:
                # came due while the hold lapsed, and the trigger stopped before the store
                # answered: they keep their counts for the next start
                raise self._due_when_stopped(len(self._withheld))
            if (
                not self._active and self._refused and self._retry is None and self._soon is None
                and not (self._lapsed and self._launched)
            ):  # fmt: skip
                # the trigger stopped, which cancelled the retry: nothing runs them now (while
                # the hold lapsed, none is set: the retake tries them again)
                raise self._refused_at_stop()
            fut = loop.create_future()
            self._drain_waiters.append(fut)
            # a refire after the last finish is scheduled before this wake-up,
            # so `_active` already holds it when the loop re-checks
            await fut
        if self._engine.state != "running":
            if self._cut_at_stop:
                raise self._left_at_stop()
            due = [key for key in self._due_at_stop if (st := self._keys.get(key)) is not None and st.run_id is None]
            if due:
                raise self._due_when_stopped(len(due))
            if not self._launched and self._engine.state in ("new", "stopped") and (waiting := self._due_unfired()):
                starting = self._engine.starting
                if starting is None:
                    if looked_again:
                        raise self._not_started(waiting)
                    # a start made in a task just before (an app's `async with engine:`) takes its
                    # first step on this turn: looked for once more after it
                    await asyncio.sleep(0)
                    await self._drain_here(looked_again=True)
                    return
                # its end launches the trigger, whose first sweep fires them: drained as usual then
                # (a start that fails leaves them due: that drain raises)
                if starting.get_loop() is loop:
                    await asyncio.wait([starting])
                else:
                    # (under way on another loop: a start_background() engine's, whose future only
                    # a wait there may await)
                    await call_on(starting.get_loop(), asyncio.wait, [starting])
                await self.drain()  # (within the caller's timeout: this runs on its loop)

    def _due_unfired(self) -> int:
        """How many keys are due (by size or staleness) with no run, while the engine is not
        started: nothing fires them before a start (a key due then waits for its first sweep)."""
        now = self._now()
        # (no loop counts before a start: other threads count under the lock)
        with self._lock:
            return sum(
                1 for st in self._keys.values()
                if st.run_id is None and st.count > 0 and self._due_reason(st, now) is not None
            )  # fmt: skip

    def _not_started(self, due: int) -> EngineNotRunning:
        """What a drain on ``due`` keys is told while the engine is not started and no start is
        under way: returning would say they ran."""
        if self._engine.loop_lost:
            return EngineLoopClosed()  # it cannot start again: the advice below would be wrong
        state = self._engine.state
        them, kept = ("it", "it keeps its count") if due == 1 else ("them", "they keep their counts")
        return EngineNotRunning(
            state,
            f"trigger {self.name!r} has {_counted(due, 'key')} due, and the engine is {state}: nothing "
            f"runs {them} before it starts, so drain() would return as if {them} had run. Start the "
            f"engine first (`async with engine:` or `await engine.start()`), then drain(); {kept} "
            f"for that start, which fires {them}",
        )

    def engine_stopped(self) -> None:
        """The engine has stopped: drains still waiting on runs it left pending (kept in a
        durable store for the next start) hear so instead of waiting for good. (With the
        memory store a run still here is one that ignored its cancel: its end answers them.)"""
        with self._lock:
            # no loop counts any more: notifies from any thread count under the lock
            self._loop = self._loop_thread = None
        self._wake_launch_waiters()  # stopped before this trigger started: nothing will run
        if not self._active or not self._engine.durable:
            return
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_exception(self._left_at_stop())

    def _refused_at_stop(self) -> StoppedBeforeDone:
        # their counts stay with the trigger (and a durable store): the next start fires them
        return StoppedBeforeDone(
            f"the {_counted(len(self._refused), 'key')} of trigger {self.name!r} that a full run queue refused",
            kept=True,
        )

    def _due_when_stopped(self, due: int) -> StoppedBeforeDone:
        # their counts stay with the trigger (saved by the stop, on a durable store): the next
        # start fires them
        return StoppedBeforeDone(
            f"the {_counted(due, 'key')} of trigger {self.name!r} that came due once the stop had "
            "stopped taking runs",
            kept=True,
        )

    def _left_at_stop(self) -> StoppedBeforeDone:
        if self._active:
            return StoppedBeforeDone(f"the {_counted(len(self._active), 'run')} of trigger {self.name!r}", kept=True)
        # the memory store's stop cancelled them: no key ran, the counts stay
        return StoppedBeforeDone(f"the {_counted(self._cut_at_stop, 'run')} of trigger {self.name!r}", kept=False)

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if fut.done():
                continue
            if self._cut_at_stop:
                fut.set_exception(self._left_at_stop())
            else:
                fut.set_result(None)

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    @property
    def key_count(self) -> int:
        return len(self._keys)

    def state(self, keys_limit: int | None = None) -> TriggerState:
        """The trigger and its keys: all of them, or the ``keys_limit`` hottest (queued or
        running first, then the biggest counts; ``key_count`` says how many there are).

        Callable from any thread: from one other than the engine's loop's the keys are read on
        that loop. Raises :class:`InvalidQuery` for a ``keys_limit`` that is neither None nor
        an int of 0 or more.
        """
        if keys_limit is not None:
            check_query(
                limit_problem("keys_limit", keys_limit, 0, "how many keys to list (None for all)"),
                what="triggers query",
            )
        # the loop changes the keys as notifies arrive: read beside it, a walk over them would
        # meet a dict that changed size. (Without a running loop, threads count under the lock.)
        loop = self._loop if self._loop is not None else self._engine.loop
        if loop is None or loop.is_closed() or not loop.is_running() or loop is current_loop():
            with self._lock:
                rows = self._rows(keys_limit)
        else:
            rows = self._rows_from(loop, keys_limit)
        # built outside the lock, and off the loop when called from another thread: a model per
        # key costs far more than reading the key (seconds for a million keys)
        return self._built(*rows)

    def _rows_from(self, loop: asyncio.AbstractEventLoop, keys_limit: int | None) -> tuple[dict[str, Any], list[_Row]]:
        """:meth:`_rows` read on the running ``loop`` from this other thread, in steps
        (:meth:`_rows_stepwise`). Waited for as long as the loop takes its steps: a million keys
        are no reason to give up, a loop that takes no step for ``_LIST_PATIENCE`` seconds is."""
        progress = [0]
        call = LoopCall(self._rows_stepwise, (keys_limit, progress), {})
        seen = 0
        try:
            call.ship(loop)
            while True:
                try:
                    result: tuple[dict[str, Any], list[_Row]] = call.future.result(_LIST_PATIENCE)
                    return result
                except TimeoutError:
                    if progress[0] == seen:
                        raise
                    seen = progress[0]
        except Escaped as escaped:
            raise escaped.exc from None
        except BaseException as exc:
            if call.future.done():
                if call.cut and not loop.is_running():
                    # the loop ended under the call (the engine stopped): the keys are read here now
                    with self._lock:
                        return self._rows(keys_limit)
                raise  # the call's own error
            call.give_up()  # timed out or interrupted: nobody waits for it any more
            if isinstance(exc, TimeoutError):
                raise TimeoutError(
                    f"the engine's event loop took no step of the listing of trigger {self.name!r}'s keys "
                    f"for {_LIST_PATIENCE:g} s: it is busy or blocked (a task running blocking code on it?)"
                ) from None
            raise

    async def _rows_stepwise(self, keys_limit: int | None, progress: list[int]) -> tuple[dict[str, Any], list[_Row]]:
        """:meth:`_rows`, on the loop, reading ``_LIST_STEP`` keys per step (``progress`` counts
        the steps): the loop's other work runs between them. Each key is read as it is at its
        step: one forgotten meanwhile is left out (or listed afresh if notified again since), one
        notified for the first time meanwhile is not listed, and ``key_count`` is the keys listed."""
        progress[0] += 1
        with self._lock:
            if keys_limit is not None and len(self._keys) > keys_limit:
                # the hottest are chosen in one step (a walk over every key: tens of ms a million)
                return self._rows(keys_limit)
            # (a tuple of str: the collector stops tracking it at its first look, and then never
            # walks its million items again)
            names = tuple(self._keys)
        keys = self._keys
        rows: list[_Row] = []
        for start in range(0, len(names), _LIST_STEP):
            if start:
                await asyncio.sleep(0)
                progress[0] += 1
            with self._lock:
                for key in names[start : start + _LIST_STEP]:
                    st = keys.get(key)
                    if st is not None:  # (else forgotten meanwhile)
                        rows.append(
                            (key, st.count, st.last_run_at, st.first_seen_at, st.run_id, st.running, st.last_run_id,
                             st.last_status)
                        )
        with self._lock:
            head = self._head()
        head["key_count"] = len(rows)
        return head, rows

    def _rows(self, keys_limit: int | None) -> tuple[dict[str, Any], list[_Row]]:
        """What :meth:`state` lists, read in one step: the trigger's own fields, and a row per key
        (all of them in the order they came, or the ``keys_limit`` hottest by name)."""
        keys = self._keys
        items: Iterable[tuple[str, _Key]] = keys.items()
        if keys_limit is not None and len(keys) > keys_limit:
            items = [(key, keys[key]) for key in self._hottest(keys_limit)]
        rows: list[_Row] = [
            (key, st.count, st.last_run_at, st.first_seen_at, st.run_id, st.running, st.last_run_id, st.last_status)
            for key, st in items
        ]
        return self._head(), rows

    def _hottest(self, limit: int) -> list[str]:
        """The ``limit`` hottest keys by name: those queued or running first, then the biggest
        counts; between keys alike, the one that came first. (The order of ``heapq.nlargest``
        with the key ``_heat``, which took four times as long: a Python call per key.)

        One walk over the keys, each looked at inline: a key queued or running is set aside (they
        are few), and an idle key is kept in a heap of the ``limit`` biggest counts only if its
        count beats the smallest kept, its tuple made only then."""
        if limit <= 0:
            return []
        active: list[tuple[str, _Key]] = []
        # (count, order, key): a later key has a lower order, so of two counts alike the later one
        # is the first to make room, as with heapq.nlargest
        heap: list[tuple[int, int, str]] = []
        push, replace = heapq.heappush, heapq.heapreplace
        top = -1  # the smallest count kept, once the heap is full (counts are 0 or more)
        order = 0
        for key, st in self._keys.items():
            if st.run_id is not None:
                active.append((key, st))
            elif st.count > top:
                order -= 1
                if len(heap) < limit:
                    push(heap, (st.count, order, key))
                    if len(heap) == limit:
                        top = heap[0][0]
                else:
                    replace(heap, (st.count, order, key))
                    top = heap[0][0]
        if len(active) >= limit:
            chosen = [key for key, _ in heapq.nlargest(limit, active, key=_heat)]
        else:
            # the heap holds the `limit` biggest idle counts: the first of them fill the rest
            chosen = [key for key, _ in active] + [key for _, _, key in heapq.nlargest(limit - len(active), heap)]
        chosen.sort()
        return chosen

    def _head(self) -> dict[str, Any]:
        """The fields of :class:`TriggerState` other than ``keys``, as they are now."""
        return {
            "name": self.name,
            "size_threshold": self.size_threshold,
            "staleness": self.staleness,
            "staleness_min": self.staleness_min,
            "fired": self.fired,
            "check_interval": self.check_interval,
            "rejected": self.rejected,
            "forget_after": self.forget_after,
            "forgotten": self.forgotten,
            "key_count": len(self._keys),
            "adopted": self.adopted,
            "hold_lapses": self.hold_lapses,
            "given_up": self.given_up,
            "lost_at_stop": self.lost_at_stop,
        }

    @staticmethod
    def _built(head: dict[str, Any], rows: list[_Row]) -> TriggerState:
        return TriggerState(
            **head,
            keys=[
                TriggerKeyState(
                    key=key,
                    count=count,
                    last_run_at=last_run_at,
                    first_seen_at=first_seen_at,
                    queued=run_id is not None and not running,
                    running=running,
                    run_id=run_id or last_run_id,
                    last_status=last_status,
                )
                for key, count, last_run_at, first_seen_at, run_id, running, last_run_id, last_status in rows
            ],
        )

    # ------------------------------------------------------------ lifecycle

    def bind_loop(self, loop: asyncio.AbstractEventLoop, thread_id: int) -> None:
        """Take ``loop`` (run by thread ``thread_id``) as the engine's before the start has
        run there: calls from other threads are handed to it from now on, after the start."""
        with self._lock:
            # a thread counting under the lock finishes first: from now on only the loop counts
            self._loop, self._loop_thread = loop, thread_id

    def launch(self) -> None:
        """Start the staleness sweep on the running loop (sync: usable after engine start)."""
        loop = asyncio.get_running_loop()
        self.bind_loop(loop, threading.get_ident())
        self._cut_at_stop = 0
        self._due_at_stop.clear()
        self._retry_delay = _RETRY_FIRST
        self._refused.clear()  # the first sweep, just below, tries every key due
        self._withheld.clear()
        self._window, self._probes = None, set()
        if not self._engine.durable:
            self._follow_left_going()
        # keys that reached their threshold before the engine ran fire now, once the rest of
        # the engine has started
        if self._first_check is None:
            self._first_check = spawn(self._check_first(), name=f"taskwatch-trigger-{self.name}-first")
        self._launched = True
        self._wake_launch_waiters()
        if self.check_interval is not None and self._sweeper is None:
            self._sweeper = spawn(self._sweep(self.check_interval), name=f"taskwatch-trigger-{self.name}")

    def _follow_left_going(self) -> None:
        """Make each run of this trigger a stop gave up on (its code ignored every cancel, and
        still runs) its key's run again until its code ends: its record ended with the stop,
        and the key, still due, fired a second run beside it at the next start. (A durable
        store keeps such a run ``running``, and the start's take-up follows it.)"""
        for going, run_id, params in self._engine.still_going(self.task_name):
            key = params.get("key")
            st = self._keys.get(key) if isinstance(key, str) else None
            if st is None or st.run_id is not None or run_id in self._active:
                continue
            assert isinstance(key, str)
            st.run_id, st.running = run_id, True
            self._active[run_id] = key
            going.add_done_callback(functools.partial(self._left_going_ended, key, run_id))

    def _left_going_ended(self, key: str, run_id: str, _: asyncio.Task[Any]) -> None:
        if self._active.get(run_id) != key:
            return
        del self._active[run_id]
        st = self._keys.get(key)
        if st is not None and st.run_id == run_id:
            # its outcome was recorded by the stop (cancelled: the count stays)
            st.running = False
            st.last_run_id, st.run_id = run_id, None
            if st.count >= self.size_threshold:
                if self._loop is not None:
                    self._loop.call_soon(self._refire, key)
                else:
                    self._due_at_stop.add(key)
        if not self._active:
            self._wake_drainers()

    def _wake_launch_waiters(self) -> None:
        waiters, self._launch_waiters = self._launch_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def _check_first(self) -> None:
        try:
            # stepwise as every sweep: a durable store may hand the start a million keys
            await self._check_stepwise()
        except Exception:
            log.exception("trigger %r: the start's sweep failed", self.name)
        finally:
            if self._first_check is asyncio.current_task():
                self._first_check = None

    async def start(self) -> None:
        self._start_failed = False
        # counts made by other threads from now on go to this loop, between the load's steps
        # (as this loop's own notifies do), never beside it
        self.bind_loop(asyncio.get_running_loop(), threading.get_ident())
        try:
            if self._engine.durable:
                self._loaded = False
                # a lapse before a stop is over: the start reads back what is still this node's
                self._lapsed = self._replaced = False
                await self._load()
                self._loaded = True
                if self._saver is None:
                    self._saver = spawn(
                        self._save_loop(), name=f"taskwatch-trigger-{self.name}-store"
                    )
            self.launch()
        except BaseException:
            # notifies go on counting, and fire once a start tried again has loaded the keys: a
            # drain waits for the runs fired already, not for a launch that may be long in coming
            # (it waited until the engine stopped)
            self._start_failed = True
            self._wake_launch_waiters()
            raise

    async def _load(self) -> None:
        """Take up, at the start, the keys saved in the store under this trigger's name by this
        engine object's earlier start and by holders that are gone (a node that stopped or died);
        notifies made since are added on top.

        Rows of holders still alive are theirs: they fire them. What the store had of a key is
        the store's: a key starts again from the notifies the store never had (``unsaved``) and
        takes the rest from the rows taken up (another node may have taken up this object's rows
        while it was stopped, and fired them). Stepwise, yielding to the loop every
        ``_SWEEP_STEP`` keys: a trigger made while the engine runs may take up a hundred
        thousand keys under its other work. Notifies that arrive meanwhile count (their fires
        wait for the launch, see :meth:`_held`)."""
        await self._drop_saved()
        saved = await self._engine.store.adopt_trigger(self.name, self._engine.incarnation, own=True)
        await self._take_up_saved(saved, at_start=True)

    async def _drop_saved(self) -> None:
        """Keep of each key only what the store never had: its notifies since the last save (the
        store's part comes back with the rows a start takes up, if they are still this node's)."""
        step = 0
        for key, st in list(self._keys.items()):
            if step >= _SWEEP_STEP:
                step = 0
                await asyncio.sleep(0)
            step += 1
            if st.run_id is not None and self._active.get(st.run_id) == key:
                del self._active[st.run_id]
            st.run_id, st.captured, st.running = None, 0, False
            st.count = st.unsaved
            st.saved, st.saved_run = 0, None

    async def _take_up_saved(self, saved: Mapping[str, TriggerKeyRecord], *, at_start: bool) -> None:
        """Merge keys taken up from the store into this trigger's, at the start and at a save
        that found holders gone since, by :func:`merge_trigger_records`: counts add, and a key
        following no run follows the one its row follows (read as it is now: it may have ended).

        At the start, runs of the trigger that no saved key names are taken up too (see
        :meth:`_follow_unrecorded`), and the start's first sweep fires the keys due; later, the
        keys due among those taken up fire at once, and the merged keys are saved next."""
        following: list[tuple[str, _Key]] = []
        step = 0
        for key, rec in saved.items():
            if step >= _SWEEP_STEP:
                step = 0
                await asyncio.sleep(0)
            step += 1
            st = self._keys.get(key)
            if st is None:
                st = self._keys[key] = _Key()
            merged = merge_trigger_records(self._record(st), rec)
            st.count, st.first_seen_at = merged.count, merged.first_seen_at
            # the store's row of the key now: the rows taken, merged with this node's own
            if at_start:
                st.saved, st.saved_run = rec.count, rec.run_id
            else:
                st.saved, st.saved_run = min(st.saved + rec.count, _MAX_COUNT), st.saved_run or rec.run_id
            st.last_run_at, st.last_run_id, st.last_status = merged.last_run_at, merged.last_run_id, merged.last_status
            if st.count > 0 and self.forget_after is not None and st.touched_at is None:
                # the store keeps no notify times: its last may have been just before the stop
                st.touched_at = self._now()
            if not at_start:
                self._changed(key)  # the store merged the rows too: this record is the one to keep
            if st.run_id is not None or merged.run_id is None:
                continue
            # the run the row's key waited on when its holder last saved: follow it, or take its
            # outcome. Followed from here on, so an end told while the runs are read below is heard
            st.run_id, st.captured = merged.run_id, merged.captured
            self._active[merged.run_id] = key
            following.append((key, st))
        try:
            if following:
                await self._take_up(following)
            if at_start:
                await self._follow_unrecorded(saved)
        except BaseException:
            # a start is tried again, and takes up the rows again (its own now); later, the counts
            # stay and the keys fire again rather than wait on runs nobody reads
            for key, st in following:
                if st.run_id is not None and self._active.get(st.run_id) == key:
                    del self._active[st.run_id]
                    st.run_id, st.captured, st.running = None, 0, False
                    self._changed(key)
            raise
        if not at_start:
            await self._fire_due(saved)
            if not self._active:
                self._wake_drainers()  # runs taken up had ended, as a run's event would have said

    async def _fire_due(self, keys: Iterable[str]) -> None:
        """Fire those of ``keys`` that are idle and due, yielding to the loop as a sweep does."""
        now = self._now()
        step = 0
        for key in list(keys):
            if step >= _SWEEP_STEP:
                step = 0
                await asyncio.sleep(0)
            st = self._keys.get(key)
            if st is not None and st.run_id is None and st.count > 0 and self._due_reason(st, now) is not None:
                self._check_key(key, st, now)
                step += _SWEEP_STEP // _FIRES_PER_STEP
            else:
                step += 1

    def _hold_fresh(self) -> bool:
        """Whether this node's hold on its saved keys is fresh now, as a queue's on its jobs: its
        last heartbeat that reached the store was sent less than ``node_ttl`` ago, none was missed
        since the last look, and it is neither cut off nor replaced. Not fresh, it may look gone
        to the other nodes, which then take up its rows: the lapse is noted, and until
        :meth:`_retake` has asked the store what is still this node's, it saves and fires nothing."""
        executor = self._executor
        if executor is None:
            return True
        ttl = self._engine.store.node_ttl
        renewed = executor.renewed_at
        now = time.monotonic()
        seen, self._seen_renewal = self._seen_renewal, renewed
        missed = renewed - seen > ttl
        fresh = self._alive() and not missed
        if executor.superseded:
            if not self._replaced:
                self._replaced = True
                if not self._lapsed:
                    self._lapsed = True
                    self.hold_lapses += 1
                log.warning(
                    "trigger %r: a later process started under this node's id and replaced this one: the store "
                    "counts it gone, and other nodes (that process first) take up its saved counts. It fires none "
                    "of its keys any more; its stop gives up the counts taken and saves the rest for them", self.name,
                )  # fmt: skip
                if self._withheld:
                    # no retake is coming to fire them here: drains waiting on them end
                    self._withheld.clear()
                    if not self._active:
                        self._wake_drainers()
        elif not fresh and not self._lapsed:
            self._lapsed = True
            self.hold_lapses += 1
            log.warning(
                "trigger %r: no heartbeat of this node has reached the store for %.1f s (node_ttl %g s): "
                "another node may take up its saved counts. Saves and fires wait until the store says "
                "which keys are still this node's", self.name, renewed - seen if missed else now - renewed, ttl,
            )  # fmt: skip
        return fresh

    def _alive(self) -> bool:
        """Whether the store counts this node alive now: its last heartbeat that reached the
        store was sent less than ``node_ttl`` ago, and it is neither cut off nor replaced."""
        executor = self._executor
        if executor is None:
            return True
        live_until = executor.renewed_at + self._engine.store.node_ttl
        return time.monotonic() < live_until and not executor.cut_off and not executor.superseded

    async def _look(self) -> None:
        """Once a third of ``lease_ttl``: take up the keys of holders gone since, or after a
        lapse, first give up those another node took meanwhile."""
        if not self._hold_fresh():
            return
        if self._lapsed:
            await self._retake()
        await self._adopt()

    def _watch(self, probe: float) -> None:
        """Look at the hold when it runs out, and every ``probe`` while it is lapsed (a loop
        callback, as a queue's): the save loop looks only between its requests to the store, and
        one held up by an outage held up the look with it, so the trigger went on firing while it
        looked gone. Lapsed, it fires nothing until the store has said which keys are its own."""
        self._watch_handle = None
        executor = self._executor
        if executor is None:
            return
        fresh = self._hold_fresh()
        if executor.superseded:
            return  # gone for good: nothing left to look for
        if fresh and not self._lapsed:
            delay = executor.renewed_at + self._engine.store.node_ttl - time.monotonic() + 0.001
        else:
            delay = probe
        self._watch_handle = asyncio.get_running_loop().call_later(max(0.0, delay), self._watch, probe)

    async def _retake(self, *, at_stop: bool = False) -> None:
        """After a lapse, once a heartbeat got through again: give up what another node took.

        A key whose row the store no longer holds for this node was taken up by a node that
        counted this one gone: its saved count (and the run the row named, with the count that
        run took) went there, and fires there. What this node counted since its last save stays
        here, and is saved as its row again. The keys that came due meanwhile fire now.

        A stop asks too for a process replaced under its node id, whose heartbeats never get
        through again: the rows still there are kept (its save writes them for the others to
        take), and a row taken after this answer is one its save finds gone (see :meth:`_save`).
        """
        held = await self._engine.store.trigger_keys_held(self.name, self._engine.incarnation)
        if not self._lapsed or not ((self._alive() or self._superseded()) if at_stop else self._hold_fresh()):
            return  # retaken meanwhile (a stop's), or lapsed again: asked again at the next look
        given = step = 0
        for key, st in list(self._keys.items()):
            if step >= _SWEEP_STEP:
                step = 0
                await asyncio.sleep(0)
            step += 1
            if key in held or (st.saved == 0 and st.saved_run is None):
                continue
            given += 1
            self._give_up(key, st)
        self._lapsed = False
        self.given_up += given
        if given:
            log.warning(
                "trigger %r: another node took up the saved counts of %d key(s) while this node looked gone: "
                "they fire there; what this node counted since its last save stays here", self.name, given,
            )  # fmt: skip
        if self._launched:  # (a stop's retake fires nothing: the next start fires what is due)
            self._withheld.clear()
            await self._fire_due(list(self._keys))
            self._retry_soon()
        if not self._active:
            self._wake_drainers()  # a drain waiting on a run the taker follows now waits no more

    def _give_up(self, key: str, st: _Key) -> None:
        """Another node took up this node's row of ``key`` while this node looked gone: the
        row's count, and the run it named with the count that run took, went there."""
        if st.run_id is not None and st.run_id == st.saved_run:
            # the taker follows this run, and takes its count off when it ends
            if self._active.get(st.run_id) == key:
                del self._active[st.run_id]
            st.run_id, st.captured, st.running = None, 0, False
        else:
            # a run fired here after the save took the saved count with it: the taker fires it again
            st.captured = max(0, st.captured - st.saved)
        st.count = max(0, st.count - st.saved)
        st.saved, st.saved_run = 0, None
        self._changed(key)

    def _given_up_at_save(self, given: int) -> None:
        """A save found ``given`` rows of this node's gone: another node took them up, so this
        one looked gone (however short the lapse, and whether or not a look saw it)."""
        self.given_up += given
        if not self._lapsed:
            # its other rows may have gone too: the next look asks the store, and fires wait for it
            self._lapsed = True
            self.hold_lapses += 1
        log.warning(
            "trigger %r: another node took up the saved counts of %d key(s) while this node looked gone (found "
            "by a save, which wrote none of them back): they fire there; what this node counted since its last "
            "save stays here", self.name, given,
        )  # fmt: skip
        if not self._active:
            self._wake_drainers()

    def _superseded(self) -> bool:
        return self._executor is not None and self._executor.superseded

    async def _retake_at_stop(self, deadline: float) -> None:
        """A stop while lapsed: the save it makes must not write back what another node took,
        so the store is asked first, once it has had a heartbeat of this node since the lapse
        (sent now if the executor's own has not gone yet: a node stopped right after a pause).
        A process replaced under its node id sends none: the store answers it as it is."""
        executor = self._executor
        if not self._alive() and executor is not None and not executor.superseded:
            async with asyncio.timeout(max(0.0, deadline - asyncio.get_running_loop().time())):
                await executor.heartbeat()
        if self._alive() or self._superseded():
            # (not waiting for a second look, as a running node does: its stop cannot)
            await self._retake(at_stop=True)

    async def _adopt(self) -> None:
        """Take up the keys of holders gone since the start (a node that stopped or died with
        counts saved): they fire here, once."""
        if self._lapsed or not self._hold_fresh():
            return  # the retake comes first: this node's own rows may have gone to another
        taken = await self._engine.store.adopt_trigger(self.name, self._engine.incarnation, own=False)
        if taken:
            self.adopted += len(taken)
            await self._take_up_saved(taken, at_start=False)

    async def _take_up(self, following: list[tuple[str, _Key]]) -> None:
        """Follow the saved runs of these keys as they are now, read from the store in a few
        requests (one per run held up a start of many keys for seconds)."""
        for i in range(0, len(following), _READ_STEP):
            part = following[i : i + _READ_STEP]
            ids = [st.run_id for _, st in part if st.run_id is not None]
            stored = await self._engine.store.get_many(ids)
            for key, st in part:
                self._take_up_key(key, st, stored)

    def _take_up_key(self, key: str, st: _Key, stored: Mapping[str, StoredRun]) -> None:
        run_id = st.run_id
        if run_id is None or self._active.get(run_id) != key:
            return  # it ended while the runs were read: the key has heard so
        here = self._engine.current(run_id)
        row = stored.get(run_id)
        if here is not None and (here.status.finished or row is None):
            # this node's own end is in its index before the store has it (and a run not
            # written yet only there)
            status, finished_at = here.status, here.finished_at
        elif row is not None:
            status, finished_at = row.status, row.finished_at
        else:
            # pruned meanwhile: the count stays, the key fires again
            del self._active[run_id]
            st.run_id, st.captured = None, 0
            return
        if status.finished:
            del self._active[run_id]
            self._ended(key, st, status.value, finished_at or self._now())
        else:
            # another node's claim is in the store before this node hears of it
            st.running = RunStatus.RUNNING in (status, here.status if here is not None else None)
            if here is None:
                # not in this node's index (fired by a holder gone while this node ran, and run
                # elsewhere): no event of it reaches this node, so its end is read from the store
                watch = spawn(self._watch_elsewhere(key, run_id), name=f"taskwatch-trigger-{self.name}-watch")
                self._watchers.add(watch)
                watch.add_done_callback(self._watchers.discard)

    async def _watch_elsewhere(self, key: str, run_id: str) -> None:
        """Wait for the end of ``key``'s run ``run_id``, which this node's index does not hold,
        and take it as the run's event would (if no event of it came first: claimed here)."""
        try:
            record: RunRecord | None = await self._engine.wait_for(run_id)
        except RunNotFound:
            record = None  # pruned meanwhile: the count stays, the key fires again
        except Exception:
            log.exception("trigger %r: following run %s of key %r failed; the key fires again", self.name, run_id, key)
            record = None
        st = self._keys.get(key)
        if st is None or self._active.get(run_id) != key:
            return  # its end was heard here already
        del self._active[run_id]
        if record is None:
            st.run_id, st.captured, st.running = None, 0, False
            self._changed(key)
        else:
            self._ended(key, st, record.status.value, record.finished_at or self._now())
        if st.count >= self.size_threshold:
            self._refire(key)
        if not self._active:
            self._wake_drainers()

    async def _follow_unrecorded(self, saved: Mapping[str, TriggerKeyRecord]) -> None:
        """Take up the runs of this trigger's task that no saved key names: fired after the
        last save, before the process died.

        One not finished is followed: firing its key again now would run the key twice at
        once. One that finished did its key's work: the count saved before it fired is taken
        to be in it and comes off (firing the key again would redo that work), and the key's
        last run is that one. The engine's index has them (read back from the store at the
        start: every unfinished run, and the newest finished ones), and this trigger hears
        their events from it, so a key never waits on a run nobody reports.

        A key another node (one still holding rows of this trigger) has saved too is left out:
        its runs may be that node's, fired for that node's counts, and taking them for the
        saver's would drop counts nobody ran. A run a dead node fired after its last save may
        then run again beside a run fired here (at least once, never lost).
        """
        by_key: dict[str, list[RunRecord]] = {}
        for run in self._engine.runs(task=self.task_name, limit=None):
            key = run.params.get("key")
            if not isinstance(key, str) or run.id in self._active or not self._unrecorded(run, saved.get(key)):
                continue
            if run.status.finished and key not in saved:
                # no saved count to take off; and a key forgotten since (its record deleted) is
                # not brought back by a run it had before
                continue
            by_key.setdefault(key, []).append(run)
        if by_key:
            # (read only when there is a run to place: most starts have none)
            for key in await self._engine.store.trigger_keys_elsewhere(self.name, self._engine.incarnation):
                by_key.pop(key, None)
        step = 0
        for key, runs in by_key.items():
            if step >= _SWEEP_STEP:
                step = 0
                # (a run ending meanwhile is heard by no key yet: each is read as it is now, below)
                await asyncio.sleep(0)
            step += len(runs)
            st = self._keys.get(key)
            if st is None:
                st = self._keys[key] = _Key()
            # runs of a key go one after another: the first to end after the save took its count
            runs.sort(key=operator.attrgetter("created_at"))
            for record in runs:
                if st.run_id is not None:
                    break  # following a run already (a run of this key's going on before these)
                found: Run | RunRecord = self._engine.current(record.id) or record
                if found.status is RunStatus.FAILED and self._never_started(found):
                    continue  # refused by a shared store's full queue: it did no work
                # what the store had of the count (notifies since come on top): in this run
                st.run_id, st.captured = found.id, max(0, st.count - st.unsaved)
                if not found.status.finished:
                    st.running = found.status is RunStatus.RUNNING
                    self._active[found.id] = key
                    self._changed(key)
                    break
                self._ended(key, st, found.status.value, found.finished_at or self._now())

    def _unrecorded(self, run: RunRecord, rec: TriggerKeyRecord | None) -> bool:
        """Whether ``run`` of a key fired after ``rec``, its key's saved record, was saved.

        A key's runs go one after another, so the run its record names last (the one it
        waits on, else its last) tells: a run made after that one is unknown to the record.
        The index holds the newest finished runs: one named but no longer there is older than
        any of them. A record naming no run is older than the runs made since its first notify
        (a key forgotten and notified afresh keeps no runs of before)."""
        if rec is None:
            return True
        named = rec.run_id or rec.last_run_id
        if run.id == rec.run_id or run.id == rec.last_run_id:
            return False
        if named is not None:
            known = self._engine.current(named)
            return known is None or run.created_at > known.created_at
        if rec.first_seen_at is None or self._fixed_clock is not None:
            # (a clock of the trigger's own is not the one runs are stamped with)
            return True
        return run.created_at >= rec.first_seen_at

    @staticmethod
    def _never_started(run: Run | RunRecord) -> bool:
        error = run.error
        return error is not None and error.type == QueueFull.__name__ and run.started_at is None and run.attempt == 1

    async def _save(self, *, guarded: bool = False) -> int:
        """Save the keys changed since the last save (and delete those forgotten), handing the
        store ``_SAVE_STEP`` of each per request: the store turns each into a row on the loop,
        so a request of all of them held it up for as long as that took.

        Each key's record is made just before its request: notifies meanwhile are in it, or
        change the key again and are saved next time. Keys a failed or cancelled request left
        are saved next time too. ``guarded`` (the save loop's saves): no request goes out once
        the hold may have lapsed; the keys left are saved after the retake.

        A key this node's row held already is written only over that row (``held`` of
        ``Store.save_trigger``): a pause or an outage may have lasted past ``node_ttl``, however
        short ago it ended or whether or not a look saw it (it may begin after the last look,
        with the request under way), and another node may have taken the row up meanwhile.
        Written again, its count would fire on both nodes. Such a key gives up what the row
        held (:meth:`_give_up`) and is saved next with what this node counted since. Returns how
        many keys did so."""
        dirty, self._dirty = self._dirty, set()
        forget, self._forget = self._forget, set()
        keys, gone = list(dirty), list(forget)
        done = done_gone = given = 0
        save = self._engine.store.save_trigger
        incarnation = self._engine.incarnation
        try:
            while done < len(keys) or done_gone < len(gone):
                if guarded and (self._lapsed or not self._hold_fresh()):
                    break
                # a key notified again after it was forgotten is saved afresh, not deleted
                deleting = [key for key in gone[done_gone : done_gone + _SAVE_STEP] if key not in self._keys]
                records: dict[str, TriggerKeyRecord] = {}
                held: list[str] = []
                unsaved: list[tuple[str, _Key, int, TriggerKeyRecord]] = []
                for key in keys[done : done + _SAVE_STEP]:
                    st = self._keys.get(key)
                    if st is not None:
                        rec = records[key] = self._record(st)
                        unsaved.append((key, st, st.unsaved, rec))
                        if st.saved or st.saved_run is not None:
                            held.append(key)
                taken: set[str] | None = None
                if held:
                    taken = await save(self.name, incarnation, records, deleting, held=held)
                elif records or deleting:
                    # (no held=: a store wrapped with save_trigger's older signature saves these alike)
                    await save(self.name, incarnation, records, deleting)
                done_gone += _SAVE_STEP
                done += _SAVE_STEP
                for key, st, n, rec in unsaved:
                    if taken and key in taken:
                        if self._keys.get(key) is st:
                            self._give_up(key, st)
                            given += 1
                        continue
                    # notifies during the write stay unsaved (and a save made meanwhile, by a
                    # save_changes(), may have taken its share off already)
                    st.unsaved = max(0, st.unsaved - n)
                    if rec.run_id is not None and st.run_id != rec.run_id:
                        # the run the row follows ended during the request, and took its count
                        # off here (see _ended); whoever reads the row takes it off there too, so
                        # the row holds the rest (given up whole, the count notified since would
                        # go with it if another node took the row before the next save)
                        took = st.last_run_id == rec.run_id and st.last_status != RunStatus.CANCELLED.value
                        st.saved, st.saved_run = (max(0, rec.count - rec.captured) if took else rec.count), None
                    else:
                        st.saved, st.saved_run = rec.count, rec.run_id
        finally:
            self._dirty.update(keys[done:])  # saved next time
            self._forget.update(gone[done_gone:])
            if given:
                self._given_up_at_save(given)
        return given

    @staticmethod
    def _record(st: _Key) -> TriggerKeyRecord:
        # (validated: pydantic's model_construct, in Python, takes twice as long as its validation)
        return TriggerKeyRecord(
            count=st.count, captured=st.captured, first_seen_at=st.first_seen_at, last_run_at=st.last_run_at,
            run_id=st.run_id, last_run_id=st.last_run_id, last_status=st.last_status,
        )

    async def save_changes(self) -> None:
        """Save the keys changed since the last save to a durable store now; a failure is logged.

        The engine's stop calls it once its queues and runs have finished: what they
        notified, after the trigger's own stop saved, is kept for the next start.
        """
        await self._save_changes(last=True)

    async def _save_changes(self, *, last: bool) -> None:
        """:meth:`save_changes`; a failure is said at ERROR, with the counts lost, by the
        ``last`` save of a stop only (the engine's, once its runs drained, tries again what
        the trigger's own stop could not save)."""
        if not self._loaded or (not self._dirty and not self._forget):
            # (a start that never read the store's counts must not write its own over them)
            return
        try:
            if await self._save():
                # what those keys counted since their rows were taken: rows of their own again
                await self._save()
        except Exception as exc:
            if not last:
                log.debug("trigger %r: its stop's save failed (%s: %s); tried again once the runs drained",
                          self.name, type(exc).__name__, exc)
                return
            # nothing after the stop saves them: what was counted since the last save is gone,
            # counted and said
            keys = [st for key in self._dirty if (st := self._keys.get(key)) is not None]
            self.lost_at_stop = sum(st.unsaved for st in keys)
            log.error(
                "trigger %r: its store took none of its changes at this stop (%s: %s): %d count(s) notified "
                "on %d key(s) since their last save are lost, and those keys start the next run from "
                "their last saved counts (the store's reconnect_timeout is how long a save waits out an outage)",
                self.name, type(exc).__name__, exc, self.lost_at_stop, len(keys),
            )  # fmt: skip
        else:
            self.lost_at_stop = 0

    async def _save_loop(self) -> None:
        trouble = OutageLog(log, f"trigger {self.name!r}: saving its counts")
        loop = asyncio.get_running_loop()
        # as often as a queue looks for jobs of gone holders: each look is a write transaction
        every = min(max(self._engine.lease_ttl / 3, 0.5), 10.0)
        # on a clock of its own, not the saves': a look at most every third of node_ttl also
        # tells a heartbeat missed (see _hold_fresh) from the plain gap between two looks, which
        # with a save_interval past node_ttl would read as one every time and take nothing up
        # (after a lapse, looked at again as often as the executor's watchdog probes)
        probe = min(1.0, self._engine.store.node_ttl / 3)
        next_save = loop.time() + self.save_interval
        next_adopt = loop.time() + every
        self._seen_renewal = self._executor.renewed_at if self._executor is not None else time.monotonic()
        # the look at the hold on a timer of its own: this loop's looks wait on the store
        self._watch(probe)
        self._hold_watched = True
        try:
            while True:
                await asyncio.sleep(max(0.0, min(next_save, next_adopt) - loop.time()))
                now = loop.time()
                adopting = now >= next_adopt
                saving = now >= next_save and bool(self._dirty or self._forget)
                if now >= next_save:
                    next_save = now + self.save_interval
                if not adopting and not saving:
                    continue
                try:
                    if adopting:
                        next_adopt = now + every
                        # not cut short by a stop: the store may hand the keys over all the same, and
                        # counts it holds for this node that this node does not know would be lost
                        # at its next save. The stop waits for it, then saves
                        self._adopting = spawn(self._look(), name=f"taskwatch-trigger-{self.name}-adopt")
                        await asyncio.shield(self._adopting)
                        self._adopting = None
                    if saving and not self._lapsed and self._hold_fresh():
                        # (lapsed, fires and saves wait for the retake)
                        await self._save(guarded=True)
                    if self._lapsed:
                        next_adopt = min(next_adopt, loop.time() + probe)
                    trouble.succeeded()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    trouble.failed(exc, f"trying again within {min(self.save_interval, every):g} s")
        finally:
            self._hold_watched = False
            watch, self._watch_handle = self._watch_handle, None
            if watch is not None:
                watch.cancel()


    async def _sweep(self, interval: float) -> None:
        trouble = OutageLog(log, f"trigger {self.name!r}: the staleness sweep")
        while True:
            await asyncio.sleep(interval)
            try:
                await self._check_stepwise()
                trouble.succeeded()
            except Exception as exc:
                # one bad sweep must not end staleness checks for good
                trouble.failed(exc, f"sweeping again every {interval:g} s")

    async def stop(self, deadline: float, *, saved_again: bool = False) -> None:
        """Stop the sweep. Runs already fired are engine runs: the engine drains them.
        ``saved_again``: the caller saves once more after this (:meth:`save_changes`), and
        that save alone says what a store out of reach lost."""
        self._launched = False
        sweeper, self._sweeper = self._sweeper, None
        await cancel_and_wait(sweeper)
        first, self._first_check = self._first_check, None
        # the engine takes no run any more: the next start fires those keys
        await cancel_and_wait(first)
        retry, self._retry = self._retry, None
        soon, self._soon = self._soon, None
        for handle in (retry, soon):
            if handle is not None:
                handle.cancel()
        if (self._refused or self._withheld) and not self._active:
            self._wake_drainers()  # those waiting on the refused keys hear no retry is coming
        saver, self._saver = self._saver, None
        if saver is not None:
            await cancel_and_wait(saver)
            adopting, self._adopting = self._adopting, None
            if adopting is not None:
                await asyncio.wait([adopting])
                if not adopting.cancelled() and adopting.exception() is not None:
                    log.warning("trigger %r: taking up the keys of gone holders failed: %s", self.name, adopting.exception())
            if not self._lapsed:
                self._hold_fresh()  # a pause that just ended may not have been looked at yet
            if self._lapsed:
                try:
                    await self._retake_at_stop(deadline)
                except Exception as exc:
                    log.warning(
                        "trigger %r: asking the store which saved keys are still this node's failed (%s: %s); "
                        "saving its counts all the same", self.name, type(exc).__name__, exc,
                    )  # fmt: skip
            # still lapsed (the store out of reach), saved all the same: a count may then fire on
            # two nodes (a store out of reach to the end of the engine's last save loses them:
            # counted and said there)
            await self._save_changes(last=not saved_again)
        watchers, self._watchers = self._watchers, set()
        for watch in watchers:
            await cancel_and_wait(watch)  # the next start reads those runs again
