"""Periodic tasks: the decorator registry, interval and cron triggers, pause/resume.

``@engine.periodic(...)`` records a function here and registers it as an
engine task of kind ``"periodic"``, so every tick is an ordinary engine run
(statuses, retries, timeout, progress, events) with source ``periodic:NAME``.

Time model
----------
Due times are wall-clock UNIX seconds read from the engine's clock, the same
clock its run timestamps use (so a frozen engine clock freezes the schedule).
Cron expressions are evaluated in the **local time zone**, like cron itself:
``"0 3 * * *"`` means 03:00 local wall-clock time. Intervals are measured from
the end of the previous run by default, or from its scheduled start with
``fixed_rate=True``. The next-due arithmetic lives in small pure functions
(:func:`next_interval_due`, :func:`next_cron_due`, :func:`jitter_delay`) that
take explicit times, so it can be tested without a clock.

Clusters
--------
Nodes sharing a store (SQLite file, PostgreSQL) each run the schedule, and
the store records each slot once (``Store.claim_periodic``): the node that
records it fires it, the others skip it. Cron and ``fixed_rate`` slots are
the same on every node, so each fires once; end-based intervals fire at most
once per interval across the cluster.

Overlap
-------
A tick that comes due while the previous run of the same task is still going
is skipped and counted (``PeriodicSkipped``); runs of one periodic task never
overlap. With the default end-based interval this cannot happen by
construction, except right after a resume while a run started before the
pause is still going.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import TYPE_CHECKING, Any, Literal

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict

from .errors import EngineNotRunning, QueueFull, TaskDefinitionError, UnknownPeriodic
from .options import PeriodicOptions, check_options
from .events import (
    FINISHED_RUN_KINDS,
    BaseEvent,
    PeriodicPaused,
    PeriodicRegistered,
    PeriodicResumed,
    PeriodicSkipped,
)
from .runs import RunStatus

if TYPE_CHECKING:
    from .engine import Engine
    from .handle import RunHandle

log = logging.getLogger("taskwatch.scheduler")

_STATUS_OF_KIND = {
    "run.succeeded": RunStatus.SUCCEEDED,
    "run.failed": RunStatus.FAILED,
    "run.cancelled": RunStatus.CANCELLED,
}

#: longest single sleep: a wall-clock jump (suspend, NTP step) is noticed within this
_MAX_SLEEP = 30.0
#: pause before retrying after an unexpected error inside a loop, so it cannot spin
_ERROR_BACKOFF = 1.0
#: slots of an interval task this close to a full interval apart count as a full interval apart
_SLOT_TOLERANCE = 0.001


class PeriodicInfo(BaseModel):
    """One periodic task as ``engine.schedule()`` reports it. Times are UNIX seconds."""

    model_config = ConfigDict(frozen=True)

    name: str
    trigger: str  # human form: "every 60s", "cron 0 3 * * *"
    trigger_kind: Literal["interval", "cron"]
    every: float | None = None
    cron: str | None = None
    fixed_rate: bool = False
    enabled: bool
    reason: str | None = None  # why disabled
    paused: bool = False
    #: None while disabled or paused, and while an end-based interval's run is going
    next_due: float | None = None
    #: the run in progress, if any
    running_run_id: str | None = None
    #: the most recently *finished* run: id, final status, start time and duration
    last_run_id: str | None = None
    last_status: str | None = None
    last_started: float | None = None
    last_duration: float | None = None
    #: runs submitted, runs that ended failed, ticks skipped
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    requires: tuple[str, ...] = ()
    opt_in: str | None = None
    jitter: float = 0.0


# ---------------------------------------------------------------- pure next-due computation


def jitter_delay(span: float, fraction: float, rng: random.Random | None = None) -> float:
    """A random extra delay in ``[0, span * fraction]`` (0 when there is no jitter)."""
    if fraction <= 0 or span <= 0:
        return 0.0
    return (rng or random).uniform(0.0, span * fraction)


def next_interval_due(
    last_start: float | None,
    last_end: float | None,
    every: float,
    fixed_rate: bool = False,
    jitter_fraction: float = 0.0,
    rng: random.Random | None = None,
    *,
    now: float | None = None,
) -> float:
    """When an interval task is next due.

    End-based (default): ``last_end + every``. Fixed rate: ``last_start +
    every``, where ``last_start`` should be the previous *scheduled* time so
    ticks do not drift; with ``now`` given, slots already in the past are
    skipped except the latest one, so a loop held up for a while runs once
    rather than in a burst. Jitter adds a random delay of up to
    ``jitter_fraction * every``.
    """
    if fixed_rate:
        if last_start is None:
            raise ValueError("a fixed-rate interval needs the previous start time")
        due = last_start + every
        if now is not None and due < now:
            due += every * math.floor((now - due) / every)
    else:
        if last_end is None:
            raise ValueError("an end-based interval needs the previous end time")
        due = last_end + every
    return due + jitter_delay(every, jitter_fraction, rng)


def next_cron_due(expr: str, after: float, tz: tzinfo | None = None) -> float:
    """The first time strictly after ``after`` (UNIX seconds) that ``expr`` matches.

    With ``tz=None`` the expression is read in the local time zone, as cron
    does: naive local wall-clock times are converted with the platform's
    rules, so DST changes are honoured. Pass a ``tzinfo`` (e.g.
    ``datetime.timezone.utc``) to use another zone. Raises ``StopIteration``
    if the expression never matches again.
    """
    if tz is not None:
        # cronsim drops sub-second parts and then steps one second, so the result is > after
        return next(CronSim(expr, datetime.fromtimestamp(after, tz))).timestamp()
    # In the hour a DST change repeats, one wall-clock time names two instants (fold 0
    # and 1), and cronsim's naive results carry fold 0: from the second pass of that hour
    # its next match would lie before ``after``, and a schedule planned from it would
    # fire the same past slot again and again. The first instant after ``after`` wins.
    for wall in CronSim(expr, datetime.fromtimestamp(after)):
        for fold in (0, 1):
            due = wall.replace(fold=fold).timestamp()
            if due > after:
                return due
    raise StopIteration(f"cron expression {expr!r} never matches again")


def trigger_text(every: float | None, cron: str | None) -> str:
    return f"cron {cron}" if cron is not None else f"every {every:g}s"


# ---------------------------------------------------------------- validation


def _validate(
    fn: Any,
    name: str,
    every: float | None,
    cron: str | None,
    initial_delay: float,
    requires: tuple[str, ...],
    jitter: float,
) -> None:
    """Raise :class:`TaskDefinitionError` for anything that would fail only later."""
    if (every is None) == (cron is None):
        raise TaskDefinitionError(
            f"periodic task {name!r} needs exactly one of every= (seconds) or cron= (expression)"
        )
    check_options(PeriodicOptions, f"periodic task {name!r}", every=every, initial_delay=initial_delay, jitter=jitter)
    if cron is not None:
        try:
            CronSim(cron, datetime.now())
        except (CronSimError, ValueError, TypeError, AttributeError) as exc:
            raise TaskDefinitionError(
                f"cron= for periodic task {name!r} does not parse: {cron!r} ({exc})"
            ) from None
    _validate_signature(fn, name, requires)


def _validate_signature(fn: Any, name: str, requires: tuple[str, ...]) -> None:
    if not inspect.iscoroutinefunction(fn):
        raise TaskDefinitionError(
            f"periodic task {name!r} must be an `async def` function taking (ctx, **resources)"
        )
    params = list(inspect.signature(fn).parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise TaskDefinitionError(
            f"periodic task {name!r} must take a TaskContext as its first argument: "
            f"async def {getattr(fn, '__name__', name)}(ctx, ...)"
        )
    rest = params[1:]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in rest)
    by_keyword = {p.name for p in rest if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    not_accepted = [r for r in requires if r not in by_keyword and not takes_any]
    if not_accepted:
        raise TaskDefinitionError(
            f"periodic task {name!r} requires {', '.join(not_accepted)} but has no keyword "
            f"parameter of that name; add it to the signature: (ctx, {', '.join(requires)})"
        )
    unfilled = [
        p.name
        for p in rest
        if p.name not in requires
        and p.default is p.empty
        and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if unfilled:
        raise TaskDefinitionError(
            f"periodic task {name!r} has parameters {', '.join(unfilled)} that nothing fills; "
            "list them in requires=(...) to receive engine resources of those names"
        )


# ---------------------------------------------------------------- registry and loops


@dataclass(slots=True, eq=False)
class _Periodic:
    name: str
    every: float | None
    cron: str | None
    initial_delay: float
    requires: tuple[str, ...]
    opt_in: str | None
    jitter: float
    fixed_rate: bool
    enabled: bool = True
    reason: str | None = None
    paused: bool = False
    #: the nominal (un-jittered) time of the next tick, and when it is actually due
    slot: float | None = None
    next_due: float | None = None
    #: not due before this (``initial_delay`` after a start), whatever the slot says
    hold_until: float = 0.0
    current: RunHandle | None = None
    #: the run of this task another node (or an earlier start) has going, which the
    #: latest tick found and let pass: shown as the running run while it goes
    elsewhere: str | None = None
    #: the slot of the latest tick (kept in the engine's store)
    last_fire: float | None = None
    task: asyncio.Task[None] | None = None
    last_run_id: str | None = None
    last_status: str | None = None
    last_started: float | None = None
    last_duration: float | None = None
    runs: int = 0
    failures: int = 0
    skipped: int = 0

    @property
    def trigger(self) -> str:
        return trigger_text(self.every, self.cron)


class Scheduler:
    """Owns the periodic tasks of one engine and one asyncio task per enabled, unpaused one."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._engine = engine
        #: None: the engine's own wall clock, so due times agree with run timestamps
        self._fixed_clock = clock
        self._rng = rng or random.Random()
        self._entries: dict[str, _Periodic] = {}
        #: run id -> periodic task and handle, for runs not yet finished
        self._inflight: dict[str, tuple[_Periodic, RunHandle]] = {}
        #: every loop task not yet finished, including ones cancelled by pause
        self._tasks: set[asyncio.Task[None]] = set()
        self._running = False
        # the run-outcome listener is added with the first periodic task and kept
        # for the engine's life, so engines without periodic tasks pay nothing
        self._unsubscribe: Callable[[], None] | None = None

    # ------------------------------------------------------------ registry

    def add(
        self,
        fn: Any,
        *,
        every: float | None = None,
        cron: str | None = None,
        name: str | None = None,
        initial_delay: float = 0.0,
        requires: Iterable[str] = (),
        opt_in: str | None = None,
        jitter: float = 0.0,
        fixed_rate: bool = False,
        retries: int = 0,
        timeout: float | None = None,
    ) -> PeriodicInfo:
        """Validate and record a periodic task; raises :class:`TaskDefinitionError`.

        The engine task is registered now (so a name clash fails at decoration
        time); whether it is enabled is decided when the engine starts.
        """
        task_name = name or getattr(fn, "__name__", None) or repr(fn)
        # read once (a generator gives its names only once); tuple("redis") would be ('r', 'e', 'd', 'i', 's')
        names = None if isinstance(requires, (str, bytes)) or not isinstance(requires, Iterable) else tuple(requires)
        if names is None or not all(isinstance(r, str) for r in names):
            raise TaskDefinitionError(
                f"periodic task {task_name!r}: requires takes a tuple of resource names, "
                f"such as requires=('redis',), got {requires!r}"
            )
        requires = names
        _validate(fn, task_name, every, cron, initial_delay, requires, jitter)
        self._engine.register(
            fn, name=task_name, retries=retries, timeout=timeout, kind="periodic", resources=requires
        )
        entry = _Periodic(
            name=task_name,
            every=float(every) if every is not None else None,
            cron=cron,
            initial_delay=initial_delay,
            requires=requires,
            opt_in=opt_in,
            jitter=jitter,
            fixed_rate=fixed_rate,
        )
        entry.reason = self._unmet_needs(entry)
        entry.enabled = entry.reason is None
        self._entries[task_name] = entry
        if self._unsubscribe is None:
            self._unsubscribe = self._engine.bus.add_callback(self._on_run_finished, FINISHED_RUN_KINDS)
        if self._running:
            self._activate(entry)
        return self._info(entry)

    def _unmet_needs(self, p: _Periodic) -> str | None:
        engine = self._engine
        reasons = []
        missing = [r for r in p.requires if r not in engine.resources]
        if missing:
            noun = "resource" if len(missing) == 1 else "resources"
            reasons.append(f"missing {noun}: {', '.join(missing)}")
        if p.opt_in is not None and not engine.flags.get(p.opt_in, False):
            reasons.append(f"flag {p.opt_in} is off")
        return "; ".join(reasons) or None

    def _get(self, name: str) -> _Periodic:
        entry = self._entries.get(name)
        if entry is None:
            raise UnknownPeriodic(name, self._entries)
        return entry

    # ------------------------------------------------------------ queries and control

    def schedule(self) -> list[PeriodicInfo]:
        return [self._info(p) for p in self._entries.values()]

    def info(self, name: str) -> PeriodicInfo:
        return self._info(self._get(name))

    def _info(self, p: _Periodic) -> PeriodicInfo:
        current = p.current
        return PeriodicInfo(
            name=p.name,
            trigger=p.trigger,
            trigger_kind="cron" if p.cron is not None else "interval",
            every=p.every,
            cron=p.cron,
            fixed_rate=p.fixed_rate,
            enabled=p.enabled,
            reason=p.reason,
            paused=p.paused,
            next_due=p.next_due,
            running_run_id=(
                current.id if current is not None and (current.id in self._inflight or current.id == p.elsewhere) else None
            ),
            last_run_id=p.last_run_id,
            last_status=p.last_status,
            last_started=p.last_started,
            last_duration=p.last_duration,
            runs=p.runs,
            failures=p.failures,
            skipped=p.skipped,
            requires=p.requires,
            opt_in=p.opt_in,
            jitter=p.jitter,
        )

    def pause(self, name: str) -> PeriodicInfo:
        """Stop scheduling ``name`` (a run in progress finishes normally)."""
        p = self._get(name)
        if not p.paused:
            p.paused = True
            self._halt(p)
            self._engine.bus.emit(PeriodicPaused, name=p.name)
        return self._info(p)

    def resume(self, name: str) -> PeriodicInfo:
        """Schedule ``name`` again; its next due time is computed from now."""
        p = self._get(name)
        if p.paused:
            p.paused = False
            if self._running and p.enabled:
                self._launch(p, self._resume_slot(p))
            self._engine.bus.emit(PeriodicResumed, name=p.name, next_due=p.next_due)
        return self._info(p)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # the last slot each task fired, as the store remembers it (a durable store
        # remembers it across restarts, so a restart neither repeats a slot nor
        # makes up every slot it missed)
        store = self._engine.store
        for p in self._entries.values():
            p.last_fire = await store.get_periodic(p.name)
            self._seed(p)
        self._running = True
        for p in self._entries.values():
            self._activate(p)

    def _seed(self, p: _Periodic) -> None:
        """Take up what the engine's index knows of ``p``'s runs (read back from a durable
        store at a restart): its last finished run, and one still pending or running, which
        the schedule shows going and the next slot waits for, as for a run fired here."""
        engine = self._engine
        for record in engine.runs(task=p.name, limit=None):  # newest first
            if not record.status.finished:
                if p.current is None and record.id not in self._inflight:
                    p.current = handle = engine.handle(record.id)
                    self._inflight[record.id] = (p, handle)
            elif p.last_run_id is None:
                p.last_run_id = record.id
                p.last_status = record.status.value
                p.last_started = record.started_at
                p.last_duration = record.duration
                break

    async def stop(self, deadline: float) -> None:
        """Cancel and await every loop; runs already submitted are the engine's to drain."""
        self._running = False
        for p in self._entries.values():
            self._halt(p)
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            # the loops never swallow cancellation, so this returns promptly
            await asyncio.wait(tasks)
        self._tasks.clear()

    def _activate(self, p: _Periodic) -> None:
        """Decide enabled/disabled from the engine's resources and flags, start the loop, tell."""
        p.reason = self._unmet_needs(p)
        p.enabled = p.reason is None
        if p.enabled and not p.paused:
            self._launch(p, self._first_slot(p))
        self._engine.bus.emit(
            PeriodicRegistered,
            name=p.name,
            trigger=p.trigger,
            enabled=p.enabled,
            reason=p.reason,
            next_due=p.next_due,
        )

    def _launch(self, p: _Periodic, slot: float | None) -> None:
        self._halt(p)
        if slot is None:
            self._never_again(p)
            return
        self._plan(p, slot)
        task = asyncio.get_running_loop().create_task(self._loop(p), name=f"taskwatch-periodic-{p.name}")
        p.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _halt(self, p: _Periodic) -> None:
        p.next_due = None
        p.slot = None
        task, p.task = p.task, None
        if task is not None:
            task.cancel()  # stays in self._tasks until done, so stop() still awaits it

    # ------------------------------------------------------------ due times

    def _now(self) -> float:
        return (self._fixed_clock or self._engine.clock)()

    def _first_slot(self, p: _Periodic) -> float | None:
        now = self._now()
        # initial_delay is the service's time to warm up after a start: this one's too
        p.hold_until = now + p.initial_delay
        if p.last_fire is not None:
            # fired before this start: the slot after the last one, or at once if it
            # was missed while nothing ran (once, however many were missed)
            if p.every is not None:
                # another node's start may be later: its slot is then less than an interval
                # after this one's, and the store refuses it (see gap in _loop)
                return max(p.last_fire + p.every, p.hold_until)
            # a cron slot stays the nominal time every node claims (once, cluster-wide);
            # only when this node fires it waits for the warm-up
            return self._cron_after(p, p.last_fire)
        start = now + p.initial_delay
        # just before `start`, so a cron time that falls exactly on it still counts
        return start if p.cron is None else self._cron_after(p, start - 1e-6)

    def _resume_slot(self, p: _Periodic) -> float | None:
        now = self._now()
        return now + p.every if p.every is not None else self._cron_after(p, now)

    def _cron_after(self, p: _Periodic, after: float) -> float | None:
        assert p.cron is not None
        try:
            return next_cron_due(p.cron, after)
        except StopIteration:
            return None

    def _never_again(self, p: _Periodic) -> None:
        # only a cron expression can run out of future times (cronsim looks 50 years ahead)
        p.enabled = False
        p.reason = "cron expression never matches again"
        p.next_due = p.slot = None

    def _plan(self, p: _Periodic, slot: float) -> None:
        """Set the nominal slot and the jittered due time of the next tick."""
        p.slot = slot
        span = p.every
        if span is None and p.jitter > 0:
            following = self._cron_after(p, slot)
            span = following - slot if following is not None else 0.0
        p.next_due = max(slot + jitter_delay(span or 0.0, p.jitter, self._rng), p.hold_until)

    def _slot_after_tick(self, p: _Periodic, slot: float, end: float | None) -> float | None:
        now = self._now()
        if p.cron is not None:
            # from now, not from the slot: a loop that woke late fires once, not in a burst
            return self._cron_after(p, max(slot, now))
        assert p.every is not None
        if p.fixed_rate:
            due = next_interval_due(slot, None, p.every, True, now=now)
            # the latest slot already past is the one this late tick just fired for:
            # a loop held up for a while fires once, then keeps to the grid
            return due + p.every if due < now else due
        return next_interval_due(None, end if end is not None else now, p.every, False)

    # ------------------------------------------------------------ the loop

    async def _loop(self, p: _Periodic) -> None:
        while p.next_due is not None and p.slot is not None:
            try:
                await self._sleep_until(p.next_due)
                slot = p.slot
                # the store records each slot once: of the nodes sharing it, one fires it
                # (and an interval task fires at most once per interval, whichever node's
                # clock of the previous run's end its slots follow)
                gap = p.every - _SLOT_TOLERANCE if p.every is not None else 0.0
                await self._tick(p, slot, gap)
                p.last_fire = slot
                end = None
                if p.cron is None and not p.fixed_rate:
                    # end-based: the next interval starts when this run (or the
                    # one a skipped tick found still going) has finished
                    p.next_due = None
                    end = await self._wait_current(p)
                following = self._slot_after_tick(p, slot, end)
            except EngineNotRunning:
                return
            except Exception:
                # a bug here must not end the schedule; try again shortly
                log.exception("periodic task %r: scheduling error; retrying", p.name)
                following = self._now() + _ERROR_BACKOFF
            if following is None:
                self._never_again(p)
                return
            self._plan(p, following)

    async def _sleep_until(self, due: float) -> None:
        # at least one turn of the loop even for a slot already due: a schedule that falls
        # behind (or a clock that jumps) must never keep the event loop to itself
        await asyncio.sleep(0)
        while (delay := due - self._now()) > 0:
            await asyncio.sleep(min(delay, _MAX_SLEEP))

    async def _wait_current(self, p: _Periodic) -> float | None:
        current = p.current
        if current is None:
            return None
        record = await current.wait()
        p.elsewhere = None
        return record.finished_at

    async def _tick(self, p: _Periodic, slot: float, gap: float) -> None:
        """Fire ``slot`` unless another node (or an earlier start) did: submit its run, or
        skip it if the previous run is still going."""
        current = p.current
        if current is not None and current.id in self._inflight:  # its finished event has not come yet
            if await self._engine.store.claim_periodic(p.name, slot, gap):
                self._skip(p, current.id)  # the slot is this node's, and passes without a run
            return
        try:
            fired = await self._engine.submit_periodic(p.name, slot, gap)
        except QueueFull:
            log.warning("periodic task %r: engine run queue full; tick skipped", p.name)
            self._skip(p, None)
            fired = None
        if fired is None:
            # nothing runs for this slot: an end-based interval counts from now, not
            # again from the end of a run that finished before it (that end would give
            # this same slot back, refused again, at once and forever)
            p.current = p.elsewhere = None
            return
        handle, new = fired
        p.current = handle
        p.elsewhere = None if new else handle.id
        if not new:
            # a run of this task still goes (another node's, or an earlier start's): the
            # slot passes without overlapping it, and an end-based interval counts from its end
            self._skip(p, handle.id)
            return
        p.runs += 1
        self._inflight[handle.id] = (p, handle)

    def _skip(self, p: _Periodic, running_run_id: str | None) -> None:
        p.skipped += 1
        self._engine.bus.emit(PeriodicSkipped, name=p.name, running_run_id=running_run_id, skipped_total=p.skipped)

    def _on_run_finished(self, event: BaseEvent) -> None:
        """Bus callback: record the outcome of one of our runs as soon as it finishes."""
        found = self._inflight.pop(event.run_id, None)  # type: ignore[attr-defined]
        if found is None:
            return
        p, _ = found
        # from the event itself: with a small history the run may already be evicted
        status = _STATUS_OF_KIND[event.kind]  # type: ignore[attr-defined]
        duration: float | None = getattr(event, "duration", None)
        p.last_run_id = event.run_id  # type: ignore[attr-defined]
        p.last_status = status.value
        p.last_started = event.ts - duration if duration is not None else None
        p.last_duration = duration
        if status is RunStatus.FAILED:
            p.failures += 1
