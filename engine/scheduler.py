"""Periodic tasks: the decorator registry, interval and cron triggers, pause/resume.

``@engine.periodic(...)`` records a function here and registers it as an
engine task of kind ``"periodic"``, so every tick is an ordinary engine run
(statuses, retries, timeout, progress, events) with source ``periodic:NAME``.

Time model
----------
Due times are wall-clock UNIX seconds read from the engine's clock, the same
clock its run timestamps use (so a frozen engine clock freezes the schedule).
Cron expressions are evaluated in the **local time zone**, like cron itself:
``"0 3 * * *"`` means 03:00 local wall-clock time (six fields put seconds first:
``"*/10 * * * * *"``; a time the clocks skip when DST starts fires an hour
later that day, one they repeat fires once, in its first pass: see
:func:`next_cron_due`, which reads any other zone given it by the same rules).
A slot whose submit fails (the store unreachable) is tried again shortly as
that same slot. Intervals are measured from
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
once per interval across the cluster, and each node counts them from the end
of the task's previous run on any node: a node whose slot another node fired,
or that starts while another node's run of the task goes, follows that run
(the latest the store holds) and counts its next interval from its end (from
when it finds no run going, if the store cannot say which run that is).

Overlap
-------
A tick that comes due while the previous run of the same task is still going
is skipped and counted (``PeriodicSkipped``); runs of one periodic task never
overlap. With the default end-based interval this cannot happen by
construction, except right after a resume while a run started before the
pause is still going. On a durable store the store says whether a run is
going, on any node, as the slot is claimed: this node's view of a run it does
not execute (another node's, or one read back at its start) lags the store's,
and never hears the end of one the store pruned first (the engine lets such a
run go, and so does the schedule).

Run now
-------
``Engine.run_periodic`` queues one run by hand (source
``periodic:NAME:manual``), paused or not, and leaves the schedule as it was.
It is refused while a run of the task is pending or running: one this node
fired or knows of, or one the store holds (other nodes' too). That last
look and the insert are two steps, so on a store nodes share a tick another
node fires between them can still overlap it.

Pause
-----
A pause (or a disable) stops the loop at once, except while its tick is
writing the slot's run to the store (waiting for a SQLite file's write lock,
say): that write cannot be taken back (it may commit whatever this node does),
so it is let end, and a run it stored goes, shown and counted as any fired
run (``runs``, ``running_run_id``, ``last_run_id``, ``last_status``); no
tick comes after it until the resume. A resume computes the next tick from
its moment: a cron task's next time, an end-based interval's one interval
later, and a ``fixed_rate`` task's next slot of the grid it had (as a task
enabled again keeps it, see "Needs").

Missed slots
------------
A loop held up (a blocked event loop, a suspended process, an engine that was
stopped) fires the slot it was waiting for once, late, and then goes back to
its schedule: the slots that passed meanwhile are not made up, in a burst or
otherwise. They are counted in ``PeriodicInfo.missed`` (and logged): for cron
and ``fixed_rate`` tasks the slots of their grid that passed unfired, for an
end-based interval the whole intervals the tick was late by. On a store nodes
share, only those after the last slot the store says a node fired count: a
node held up while another fired its slots missed none. A task's first late
tick is warned of at once, the next ones at most once a minute, each warning
saying how many came since the previous one (a loop that cannot keep up is
late at every tick); ``missed`` counts every one.

Registration on a running engine
--------------------------------
A task registered while the engine runs is taken up as one registered before
the start: its loop starts once the store has told its last slot fired and its
last run (it plans no tick until then), so its missed slot fires late, a
fixed-rate grid holds and its last run shows. Its last run is the store's newest
finished one, at a start too: the engine's index keeps only the newest
``history`` runs of all tasks. Once it is pruned from the store as well, an
end-based interval counts from the latest it can have ended (see
``Scheduler._ended_by``), never from its slot.

Needs
-----
``requires`` and ``opt_in`` are checked at start, at registration, at a
resume, whenever ``Engine.provide``/``withdraw``/``set_flag`` change them, and
at every tick: a tick whose resource has gone (or whose flag was turned off)
runs nothing and disables its task with the reason. The runs of a task
disabled at a start or by ``withdraw``/``set_flag`` that are already queued (or
left in a durable store) wait, unclaimed on this node, until its needs are met
again (``limits_changed``); a run by hand is refused meanwhile, and a
periodic task is never submitted by name. A task enabled again keeps
its schedule: it takes it up at its next slot after that moment (an end-based
interval from the end of its last run, or of the run that went on meanwhile),
with no ``initial_delay`` unless the start's still holds. The slots that passed
while it was disabled are no held-up loop's: neither fired late nor counted missed.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import TYPE_CHECKING, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError
from pydantic import BaseModel, ConfigDict

from .hop import spawn
from .errors import (
    EngineNotRunning,
    InvalidConfiguration,
    PeriodicNotRunnable,
    QueueFull,
    RunNotFound,
    TaskDefinitionError,
    UnknownPeriodic,
)
from .jsonsafe import name_problem
from .options import PeriodicOptions, check_options
from .logs import OutageLog
from .tasks import async_signature, registered_name
from .events import (
    FINISHED_RUN_KINDS,
    BaseEvent,
    PeriodicPaused,
    PeriodicRegistered,
    PeriodicResumed,
    PeriodicSkipped,
)
from .runs import RunRecord, RunStatus
from .store.rows import FIRE_AHEAD

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
#: cron slots counted one by one when a loop missed some; past this many the rest are estimated
_MISSED_CRON_COUNT = 1000
_NEVER_AGAIN = "cron expression never matches again"
_DAY = 86400.0
#: newest runs of a periodic task a run by hand looks through, in the store, for one still going
_GOING_LOOKED_AT = 10
#: seconds between two warnings of late ticks of one task: the late ticks between them are counted
#: into the next (or told at the stop), not logged one by one
_LATE_WARNING_EVERY = 60.0


class _Throttle:
    """Paces one kind of warning to at most one every ``_LATE_WARNING_EVERY`` seconds, counting
    the occurrences held back in between (and a figure summed over them) for the next one.

    The process's own clock, not the engine's (which may be frozen, or jump): this paces the
    log lines as they are read, not the schedule."""

    __slots__ = ("warned", "held", "held_sum")

    def __init__(self) -> None:
        self.warned: float | None = None
        self.held = 0
        self.held_sum = 0

    def take(self, amount: int = 0) -> tuple[int, int, float] | None:
        """One more occurrence (bringing ``amount``): None when it is held back, else to be
        warned of now, with the held-back occurrences, their ``amount`` summed, and the seconds
        since the previous warning (0 held back after none)."""
        now = time.monotonic()
        if self.warned is not None and now - self.warned < _LATE_WARNING_EVERY:
            self.held += 1
            self.held_sum += amount
            return None
        told = (self.held, self.held_sum, 0.0 if self.warned is None else now - self.warned)
        self.warned, self.held, self.held_sum = now, 0, 0
        return told

    def left(self) -> tuple[int, int, float] | None:
        """At a stop: what was held back since the last warning (None for nothing), which no later
        warning will tell now; the next start's first occurrence is warned of at once."""
        told = (self.held, self.held_sum, time.monotonic() - self.warned) if self.held and self.warned is not None else None
        self.warned, self.held, self.held_sum = None, 0, 0
        return told


class PeriodicInfo(BaseModel):
    """One periodic task as ``engine.schedule()`` reports it. Times are UNIX seconds."""

    model_config = ConfigDict(frozen=True)

    name: str
    trigger: str  # human form: "every 60s", "cron 0 3 * * *"
    trigger_kind: Literal["interval", "cron"]
    every: float | None = None
    cron: str | None = None
    #: the zone a cron task's times are read in (an IANA name); None: the node's local zone
    tz: str | None = None
    fixed_rate: bool = False
    enabled: bool
    reason: str | None = None  # why disabled
    paused: bool = False
    #: None while disabled or paused, and while an end-based interval's run is going
    next_due: float | None = None
    #: the run in progress, if any
    running_run_id: str | None = None
    #: that run's status as this node knows it: ``"pending"`` while it waits for a slot or its
    #: due time (queued, not running yet), ``"running"``, or None when it is not in this node's
    #: index (another node's run)
    running_status: str | None = None
    #: the most recently *finished* run: id, final status, start time and duration
    last_run_id: str | None = None
    last_status: str | None = None
    last_started: float | None = None
    last_duration: float | None = None
    #: runs submitted, runs that ended failed, ticks that passed without a run (a run still
    #: going, or the run queue full), and of those the ones the full run queue refused
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    refused: int = 0
    #: slots that passed without a tick while the loop was held up (a blocked event loop,
    #: a suspended process, a stopped engine; not the task disabled): the late tick fired once
    #: for all of them. Slots up to the last one another node sharing the store fired are not counted
    missed: int = 0
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


def next_cron_due(expr: str, after: float, tz: tzinfo | str | None = None, *, fired: float | None = None) -> float:
    """The first time strictly after ``after`` (UNIX seconds) that ``expr`` matches.

    ``after`` (and ``fired``) are UNIX seconds, an int or float as ``time.time()`` gives
    (for a ``datetime``, pass its ``.timestamp()``); so is the answer. ``expr`` names
    wall-clock times of ``tz``: with ``tz=None`` the local time zone, as cron reads it;
    pass a ``tzinfo`` (``datetime.timezone.utc``, a ``ZoneInfo``) or a zone name
    (``"Europe/Berlin"``, read with ``zoneinfo``) for another. Any other value, or an
    expression that does not parse, raises :class:`InvalidConfiguration`. Every zone
    follows the same rules at its DST changes:

    * a time the clocks skip when DST starts is taken as late as the clocks jumped (an
      hour later that day: ``30 2 * * *`` at 03:30, ``0,30 2 * * *`` at 03:00 and 03:30);
      one that lands on a time the expression also names is that one time, once;
    * a time the clocks repeat when DST ends is its first pass. Its second pass is taken
      only when ``after`` is an earlier time of that second pass (a schedule that starts
      or wakes there goes on from there, not back), and then not when its first pass is
      at or before ``fired``, the slot last fired (a time whose first pass was fired, or
      let pass for a later slot, is not fired again).

    Raises ``StopIteration`` if the expression never matches again.
    """
    problems = [
        f"{name}={value!r}: {problem}"
        for name, value in (("after", after), ("fired", fired))
        if value is not None and (problem := _seconds_problem(value)) is not None
    ]
    if not isinstance(expr, str):
        problems.append(f"expr={expr!r}: a cron expression is a str, such as '0 3 * * *'")
    zone = _cron_zone(tz)
    if isinstance(zone, str):
        problems.append(zone)
        zone = None
    tz = zone
    if problems:
        raise InvalidConfiguration("next_cron_due()", problems)
    # both passes of the repeated hour and the times the clocks skip are worked out here, on
    # naive wall-clock times, the same way for every zone (cronsim's own handling of an aware
    # zone differs: a skipped 02:30 at 03:00, a repeated 02:00 twice)
    start = _wall(after, tz) - _just_skipped(after, tz)
    # a slot fired in the second pass tells nothing of the first: times after it were not served
    served = fired if fired is not None and not _wall(fired, tz).fold else None
    try:
        slots = CronSim(expr, start.replace(fold=0))
    except (CronSimError, ValueError, TypeError, AttributeError) as exc:
        raise InvalidConfiguration("next_cron_due()", [
            f"expr={expr!r} does not parse ({exc}); its fields are minute hour day month weekday, "
            "as in '0 3 * * *', with an optional seconds field first ('*/10 * * * * *')"
        ]) from None  # fmt: skip
    best: float | None = None
    best_wall: datetime | None = None
    for wall in slots:
        if best_wall is not None and wall > best_wall:
            break  # no later wall-clock time is an earlier instant
        first = _instant(wall, 0, tz)
        due = first
        if due <= after:
            second = _instant(wall, 1, tz)
            if second <= first or (served is not None and first <= served):
                continue  # not a repeated time, or one whose first pass was served
            due = second
        if due <= after or (best is not None and due >= best):
            continue
        best, best_wall = due, _wall(due, tz)
        if best_wall <= wall:
            break  # it was taken as written: times after it come later
    if best is None:
        raise StopIteration(f"cron expression {expr!r} never matches again")
    return best


def _cron_zone(tz: object) -> tzinfo | str | None:
    """``tz`` as :func:`next_cron_due` reads it (a zone name looked up with ``zoneinfo``), or
    what is wrong with it, as a str."""
    if tz is None or isinstance(tz, tzinfo):
        return tz
    if isinstance(tz, str):
        try:
            return ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError, OSError):
            problem = "no time zone has that name"
    else:
        problem = f"not a time zone nor a zone name (got {type(tz).__qualname__})"
    return (
        f"tz={tz!r}: {problem}; give an IANA zone name such as 'Europe/Berlin' or 'UTC', a tzinfo "
        "(datetime.timezone.utc, a zoneinfo.ZoneInfo), or None for the local time zone"
    )


def _seconds_problem(value: object) -> str | None:
    """Why ``value`` is not UNIX seconds :func:`next_cron_due` can read, or None."""
    if isinstance(value, datetime):
        return "a datetime is not UNIX seconds; pass its .timestamp()"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"not UNIX seconds (got {type(value).__qualname__}); give an int or float, as time.time() gives"
    if not math.isfinite(value):
        return "not a finite number; give UNIX seconds, as time.time() gives"
    if not _EARLIEST <= value < _LATEST:
        # milliseconds, the likeliest slip, land here (time.time() * 1000 is past year 50000)
        return "not a date of years 2 to 8999; give UNIX seconds (not milliseconds), as time.time() gives"
    return None


# the dates datetime reads in every zone, with room for cronsim's look ahead (50 years)
_EARLIEST = datetime(2, 1, 1, tzinfo=timezone.utc).timestamp()
_LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc).timestamp()


def _wall(t: float, tz: tzinfo | None) -> datetime:
    """The naive wall-clock time of ``t`` in ``tz`` (None: local), its ``fold`` telling the pass."""
    return datetime.fromtimestamp(t) if tz is None else datetime.fromtimestamp(t, tz).replace(tzinfo=None)


def _instant(wall: datetime, fold: int, tz: tzinfo | None) -> float:
    # a skipped time with fold=0 is read with the offset before the change (PEP 495): as late as the clocks jumped
    if tz is None:
        return wall.replace(fold=fold).timestamp()
    return wall.replace(tzinfo=tz, fold=fold).timestamp()


def _offset(t: float, tz: tzinfo | None) -> timedelta:
    aware = datetime.fromtimestamp(t, timezone.utc).astimezone(tz)  # astimezone(None): the local zone
    return aware.utcoffset() or timedelta(0)


def _just_skipped(after: float, tz: tzinfo | None) -> timedelta:
    """How far before ``after``'s wall-clock time a time the clocks just skipped may lie and still
    be due after it: a skipped time is taken as late as the clocks jumped, so in the first moments
    after a jump forward its skipped times come after wall-clock times already past."""
    now = _offset(after, tz)
    jump = now - _offset(after - _DAY, tz)
    if jump <= timedelta(0) or _offset(after - jump.total_seconds(), tz) >= now:
        return timedelta(0)
    return jump


def trigger_text(every: float | None, cron: str | None, tz: str | None = None) -> str:
    if cron is None:
        return f"every {every:g}s"
    return f"cron {cron}" if tz is None else f"cron {cron} ({tz})"


# ---------------------------------------------------------------- validation


def _validate(
    fn: Any,
    name: str,
    every: float | None,
    cron: str | None,
    initial_delay: float,
    requires: tuple[str, ...],
    jitter: float,
    opt_in: str | None,
    fixed_rate: bool,
    tz: str | None = None,
) -> PeriodicOptions:
    """Raise :class:`InvalidConfiguration` for a bad value (naming every one) and
    :class:`TaskDefinitionError` for a function that could not be called, before
    anything is recorded; return the options as they are to be kept."""
    where = f"periodic task {name!r}"
    problems: list[str] = []
    if (problem := name_problem("name", name)) is not None:
        problems.append(problem)
    if (every is None) == (cron is None):
        problems.append("needs exactly one of every= (seconds) or cron= (expression)")
    opts: PeriodicOptions | None = None
    try:
        opts = check_options(
            PeriodicOptions, where,
            every=every, initial_delay=initial_delay, jitter=jitter, opt_in=opt_in, fixed_rate=fixed_rate,
        )
    except InvalidConfiguration as exc:
        problems.extend(exc.problems)
    if cron is not None:
        if not isinstance(cron, str):
            problems.append(f"cron={cron!r}: a cron expression is a str, such as cron='0 3 * * *'")
        else:
            try:
                CronSim(cron, datetime.now())
            except (CronSimError, ValueError, TypeError, AttributeError) as exc:
                problems.append(
                    f"cron={cron!r} does not parse ({exc}); its fields are minute hour day month weekday, "
                    "as in '0 3 * * *', with an optional seconds field first ('*/10 * * * * *')"
                )
        if fixed_rate is True:
            problems.append(
                "fixed_rate=True: a cron task fires at its expression's times, there is no rate to fix; "
                "drop fixed_rate, or use every= with it"
            )
    if tz is not None:
        if cron is None:
            problems.append(f"tz={tz!r}: a time zone is for a cron task's times; an interval counts seconds")
        elif not isinstance(tz, str):
            problems.append(f"tz={tz!r}: give the zone's IANA name, such as tz='Europe/Berlin' or tz='UTC'")
        elif isinstance(zone := _cron_zone(tz), str):
            problems.append(zone)
    if isinstance(opt_in, str) and opt_in and (problem := name_problem("opt_in", opt_in)) is not None:
        problems.append(problem)
    # every event and snapshot naming a missing resource carries these names
    problems.extend(p for r in requires if (p := name_problem("requires", r)) is not None)
    if problems or opts is None:
        raise InvalidConfiguration(where, problems)
    _validate_signature(fn, name, requires)
    return opts


def _validate_signature(fn: Any, name: str, requires: tuple[str, ...]) -> None:
    shape = f"a periodic task is `async def {getattr(fn, '__name__', name)}(ctx: TaskContext, **resources)`"
    # an object whose `__call__` is an `async def` is one, as for task() and supervised()
    _, sig = async_signature(fn, f"periodic task {name!r}", "(ctx, **resources)", shape)
    params = list(sig.parameters.values())
    if not params or params[0].kind not in (params[0].POSITIONAL_ONLY, params[0].POSITIONAL_OR_KEYWORD):
        raise TaskDefinitionError(
            f"periodic task {name!r} must take a TaskContext as its first argument: "
            f"async def {getattr(fn, '__name__', name)}(ctx, ...)"
        )
    if params[0].name in requires and params[0].kind is params[0].POSITIONAL_OR_KEYWORD:
        # passed as a keyword beside the TaskContext in that place: every run would fail
        raise TaskDefinitionError(
            f"periodic task {name!r} requires a resource named {params[0].name!r}, the name of its first "
            f"parameter, which receives the TaskContext: rename that parameter (or the resource)"
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
    #: the zone a cron task's times are read in (its IANA name), None for the local one
    tz: str | None
    initial_delay: float
    requires: tuple[str, ...]
    opt_in: str | None
    jitter: float
    fixed_rate: bool
    enabled: bool = True
    reason: str | None = None
    paused: bool = False
    #: the nominal (un-jittered) time of the next tick, that time with its jitter, and
    #: when it is actually due (not before ``hold_until``)
    slot: float | None = None
    planned: float | None = None
    next_due: float | None = None
    #: no tick yet since the loop was started: a slot it missed was missed while the engine
    #: was stopped (or the task disabled), which is no news
    fresh: bool = True
    #: the first slot after a start, when it came due within the start's warm-up: fired at the
    #: warm-up's end, it is not late, and the slots the warm-up let pass are not missed
    warming: float | None = None
    #: not due before this (``initial_delay`` after a start), whatever the slot says
    hold_until: float = 0.0
    #: the slot the loop was waiting for when the task was disabled: enabled again, it
    #: keeps to that schedule (a fixed-rate grid stays where it was)
    kept: float | None = None
    current: RunHandle | None = None
    #: the run of this task another node (or an earlier start) has going, which the
    #: latest tick found and let pass: shown as the running run while it goes
    elsewhere: str | None = None
    #: the slot of the latest tick (kept in the engine's store)
    last_fire: float | None = None
    task: asyncio.Task[None] | None = None
    #: registered on a running engine: the task reading what the store knows of it (its last
    #: slot fired, its last run) before its loop may start. Not ``task``: a pause or a disable
    #: halts the loop, and must not cancel this read (the task would never be taken up)
    seeding: asyncio.Task[None] | None = None
    #: the loop whose tick is writing its slot's run to the store: a halt lets that write
    #: end (it may commit whatever this node does) and the loop follow its run, then stop
    writer: asyncio.Task[Any] | None = None
    last_run_id: str | None = None
    last_status: str | None = None
    last_started: float | None = None
    last_duration: float | None = None
    #: when the most recently finished run ended: an end-based interval counts from it
    last_end: float | None = None
    #: read at a start with no finished run of the task left (the store and the index let
    #: it go): the latest its last run can have ended, which an end-based interval counts from
    ended_by: float | None = None
    runs: int = 0
    failures: int = 0
    skipped: int = 0
    refused: int = 0
    missed: int = 0
    #: the warnings of late ticks and of ticks the full queue refused, paced: a loop that cannot
    #: keep up (every=0.001) is late at every tick, a queue that stays full refuses every tick,
    #: and one line each would flood the log
    late_log: _Throttle = field(default_factory=_Throttle)
    refused_log: _Throttle = field(default_factory=_Throttle)
    #: a node sharing the store was seen firing this cron task off this node's times (warned
    #: once a start)
    other_grid_told: bool = False
    #: held by a tick and by a run by hand from their look at the run going to the
    #: submit of theirs: each awaits the store between the two, and must see the other's run
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def trigger(self) -> str:
        return trigger_text(self.every, self.cron, self.tz)


class Scheduler:
    """Owns the periodic tasks of one engine and one asyncio task per enabled, unpaused one."""

    def __init__(
        self,
        engine: Engine,
        *,
        clock: Callable[[], float] | None = None,
        rng: random.Random | None = None,
        limits_changed: Callable[[], None] | None = None,
    ) -> None:
        self._engine = engine
        #: tells the engine to work out again which tasks' runs this node claims: an entry
        #: recorded, or its opt_in flag read, changes that (see opted_out())
        self._limits_changed = limits_changed or (lambda: None)
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
        tz: str | None = None,
    ) -> PeriodicInfo:
        """Validate and record a periodic task; raises :class:`InvalidConfiguration` for a bad
        option and :class:`TaskDefinitionError` for a function it could not call.

        Everything is checked before anything is recorded, so a refused task
        leaves nothing behind (the corrected call goes through). The engine task
        is registered now (so a name clash fails at decoration time); whether it
        is enabled is decided when the engine starts, and again whenever its
        needs change (see :meth:`needs_changed`).
        """
        # an empty name is refused (below), as for task() and supervised(), not replaced
        # (a repr for a name would differ on every node and at every restart: the store's
        # once-per-slot claim and the last slot it keeps would never match)
        task_name = registered_name(fn, name, "periodic task")
        # read once (a generator gives its names only once); tuple("redis") would be ('r', 'e', 'd', 'i', 's')
        names = None if isinstance(requires, (str, bytes)) or not isinstance(requires, Iterable) else tuple(requires)
        if names is None or not all(isinstance(r, str) for r in names):
            raise TaskDefinitionError(
                f"periodic task {task_name!r}: requires takes a tuple of resource names, "
                f"such as requires=('redis',), got {requires!r}"
            )
        requires = names
        opts = _validate(fn, task_name, every, cron, initial_delay, requires, jitter, opt_in, fixed_rate, tz)
        # the validated values: "5" given for seconds is kept as 5.0, as every option is
        entry = _Periodic(
            name=task_name,
            every=opts.every,
            cron=cron,
            tz=tz,
            initial_delay=opts.initial_delay,
            requires=requires,
            opt_in=opts.opt_in,
            jitter=opts.jitter,
            fixed_rate=opts.fixed_rate,
        )
        # the engine's registry, this one and the task's loop belong to the engine's loop: from
        # another thread (start_background) the rest is done there, its error raised here
        return self._engine.on_its_loop(self._record, fn, entry, retries, timeout, what="periodic")

    def _record(self, fn: Any, entry: _Periodic, retries: int, timeout: float | None) -> PeriodicInfo:
        task_name = entry.name
        # the last check (clash, retries, timeout); it records the task only once they pass,
        # and nothing after it can fail
        self._engine.register(
            fn, name=task_name, retries=retries, timeout=timeout, kind="periodic", resources=entry.requires
        )
        entry.reason = self._unmet_needs(entry)
        entry.enabled = entry.reason is None
        # a new mapping, never one changed in place: a task registered on another thread walks it
        # there meanwhile (engine.register() -> opted_out())
        self._entries = {**self._entries, task_name: entry}
        # the engine's claim limits again, now that the entry is here: register() computed them
        # before it was, so with its opt_in flag off its runs queued (left in a durable store
        # from before) would be claimed, see opted_out()
        self._limits_changed()
        if self._unsubscribe is None:
            self._unsubscribe = self._engine.bus.add_callback(self._on_run_finished, FINISHED_RUN_KINDS)
        if self._running:
            # as a task registered before the start: what the store knows of it first (start()
            # reads it for those), then its loop
            self._take_up(entry)
        return self._info(entry)

    def opted_out(self) -> set[str]:
        """The periodic tasks whose ``opt_in`` flag is off (or not set): their runs already
        queued wait on this node (the engine does not claim them) until it is on again, as
        those of a task whose required resource was withdrawn."""
        flags = self._engine.flags
        return {p.name for p in self._entries.values() if p.opt_in is not None and not flags.get(p.opt_in)}

    def _unmet_needs(self, p: _Periodic) -> str | None:
        engine = self._engine
        reasons = []
        missing = [r for r in p.requires if r not in engine.resources]
        if missing:
            noun = "resource" if len(missing) == 1 else "resources"
            have = [str(r) for r in engine.resources]
            reasons.append(f"missing {noun}: {', '.join(_with_suggestion(r, have) for r in missing)}")
        if p.opt_in is not None:
            if p.opt_in not in engine.flags:
                flags = sorted(str(f) for f in engine.flags)
                known = f"the engine's flags: {', '.join(flags)}" if flags else "the engine has no flags"
                reasons.append(f"flag {_with_suggestion(p.opt_in, flags)} is not set; {known}")
            elif not engine.flags[p.opt_in]:
                reasons.append(f"flag {p.opt_in} is off")
        return "; ".join(reasons) or None

    def _looks_misspelled(self, p: _Periodic) -> bool:
        """True when a resource ``p`` needs is missing, or its flag is not set at all, and the
        engine has one of a close name."""
        engine = self._engine
        have = [str(r) for r in list(engine.resources)]
        flags = [str(f) for f in list(engine.flags)]
        missing = [r for r in p.requires if r not in engine.resources]
        if p.opt_in is not None and p.opt_in not in engine.flags and _near(p.opt_in, flags):
            return True
        return any(_near(r, have) for r in missing)

    def _recheck(self, p: _Periodic) -> bool:
        """Decide again whether ``p``'s needs are met; True when that changed ``p``'s state or reason."""
        if p.reason == _NEVER_AGAIN:
            return False
        reason = self._unmet_needs(p)
        if reason == p.reason:
            return False
        p.reason = reason
        p.enabled = reason is None
        return True

    def needs_changed(self) -> None:
        """The engine's resources or flags changed: enable the tasks whose needs are met now
        (their loop takes up their schedule at once, see :meth:`_reenable`) and disable those
        whose needs are not (a run in progress finishes), each told with a
        ``periodic.registered`` event."""
        for p in self._entries.values():
            if p.seeding is not None:
                continue  # not taken up yet: its activation decides and tells, as at a start
            was_enabled = p.enabled
            if not self._recheck(p) or not self._running:
                continue  # not running: the start decides and tells
            if not p.enabled:
                self._disable(p)
                if was_enabled:
                    log.warning("periodic task %r disabled: %s", p.name, p.reason)
                else:
                    # disabled already (and told so): only the reason changed
                    log.info("periodic task %r stays disabled: %s", p.name, p.reason)
            elif not p.paused:
                self._reenable(p)
            self._emit_registered(p)

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

    def _status_of(self, run_id: str) -> str | None:
        try:
            return self._engine.get(run_id).status.value
        except RunNotFound:
            return None  # another node's run, not in this node's index

    def _info(self, p: _Periodic) -> PeriodicInfo:
        current = p.current
        running = current if current is not None and (current.id in self._inflight or current.id == p.elsewhere) else None
        return PeriodicInfo(
            name=p.name,
            trigger=p.trigger,
            trigger_kind="cron" if p.cron is not None else "interval",
            every=p.every,
            cron=p.cron,
            tz=p.tz,
            fixed_rate=p.fixed_rate,
            enabled=p.enabled,
            reason=p.reason,
            paused=p.paused,
            next_due=p.next_due,
            running_run_id=None if running is None else running.id,
            running_status=None if running is None else self._status_of(running.id),
            last_run_id=p.last_run_id,
            last_status=p.last_status,
            last_started=p.last_started,
            last_duration=p.last_duration,
            runs=p.runs,
            failures=p.failures,
            skipped=p.skipped,
            refused=p.refused,
            missed=p.missed,
            requires=p.requires,
            opt_in=p.opt_in,
            jitter=p.jitter,
        )

    def pause(self, name: str) -> PeriodicInfo:
        """Stop scheduling ``name`` (a run in progress finishes normally, and so does a tick's
        write of its run under way: see the module's "Pause"). Callable from any thread: the
        loop it cancels is the engine's, so the pause is made there."""
        return self._engine.on_its_loop(self._pause, name, what="pause_periodic", idle_ok=True)

    def _pause(self, name: str) -> PeriodicInfo:
        p = self._get(name)
        if not p.paused:
            p.paused = True
            if p.slot is not None and p.next_due is not None:
                # the slot its loop was waiting for: a fixed-rate grid resumes where it was
                p.kept = p.slot
            self._halt(p)
            self._engine.bus.emit(PeriodicPaused, name=p.name)
        return self._info(p)

    def resume(self, name: str) -> PeriodicInfo:
        """Schedule ``name`` again: its next due time is computed from now (a cron task's next
        time, an end-based interval's one interval later), a ``fixed_rate`` task's as the next
        slot after now on the grid it had, as a task enabled again keeps it.

        Its needs are checked again: a resource withdrawn meanwhile leaves it
        disabled (with the reason), one provided meanwhile enables it. Callable from
        any thread: its loop is started on the engine's, so the resume is made there."""
        return self._engine.on_its_loop(self._resume, name, what="resume_periodic")

    def _resume(self, name: str) -> PeriodicInfo:
        p = self._get(name)
        if p.seeding is not None:
            # registered on the running engine and not taken up yet: its loop starts once the
            # store told what it knows of it (not before: it would fire from no schedule), and
            # the needs are checked then
            if p.paused:
                p.paused = False
                self._engine.bus.emit(PeriodicResumed, name=p.name, next_due=p.next_due)
            return self._info(p)
        if p.paused:
            p.paused = False
            changed = self._running and self._recheck(p)
            if self._running and p.enabled:
                self._launch(p, self._resume_slot(p))
            if changed:
                self._emit_registered(p)
            self._engine.bus.emit(PeriodicResumed, name=p.name, next_due=p.next_due)
        elif self._running and self._recheck(p):
            # not paused, yet resumed: its needs are checked again all the same (a resource
            # put back into engine.resources by hand is found here)
            if p.enabled:
                self._reenable(p)
            else:
                self._disable(p)
            self._emit_registered(p)
        return self._info(p)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        # the last slot each task fired, as the store remembers it (a durable store
        # remembers it across restarts, so a restart neither repeats a slot nor
        # makes up every slot it missed)
        store = self._engine.store
        # the runs followed before a stop are read back from the store as new entries, or not at
        # all when they ended meanwhile (with no finish event here): the index tells which still go
        self._inflight.clear()
        for p in self._entries.values():
            p.current = p.elsewhere = p.kept = p.seeding = None
            p.other_grid_told = False
        seeded: set[str] = set()
        # a task added while this reads (from another thread, handed to this loop between the
        # reads) is read too, before the loops begin: after that, an added task starts itself
        while todo := [p for p in self._entries.values() if p.name not in seeded]:
            for p in todo:
                seeded.add(p.name)
                # a lock once waited on belongs to that loop: an engine started again may run on another
                p.lock = asyncio.Lock()
                indexed = self._follow_unfinished(p)
                p.last_fire = await store.get_periodic(p.name)
                await self._seed_last_run(p, indexed)
        self._running = True
        for p in list(self._entries.values()):
            self._activate(p)

    def _take_up(self, p: _Periodic) -> None:
        """Start ``p``, registered on the running engine, as :meth:`start` starts the others:
        what the store knows of it is read first (in a task of this scheduler's, which
        :meth:`stop` cancels), and only then is its loop started."""
        indexed = self._follow_unfinished(p)
        task = spawn(self._seed_then_activate(p, indexed), name=f"taskwatch-periodic-{p.name}-seed")
        p.seeding = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _seed_then_activate(self, p: _Periodic, indexed: RunRecord | None) -> None:
        me = _current_task()
        trouble = OutageLog(log, f"periodic task {p.name!r}: reading its last slot from the store")
        try:
            while True:
                try:
                    # without it a missed slot would not fire late, nor a fixed-rate grid
                    # hold, and another node's slot could be taken for this one's to come:
                    # the task waits for it, as a start does
                    p.last_fire = await self._engine.store.get_periodic(p.name)
                    break
                except Exception as exc:
                    trouble.failed(exc, f"its schedule waits; trying again every {_ERROR_BACKOFF:g} s")
                    await asyncio.sleep(_ERROR_BACKOFF)
            trouble.succeeded()
            await self._seed_last_run(p, indexed)
        finally:
            if p.seeding is me:
                p.seeding = None
        if self._running and self._entries.get(p.name) is p:
            self._activate(p)

    def _follow_unfinished(self, p: _Periodic) -> RunRecord | None:
        """Take up the run of ``p`` still pending or running that the engine's index holds (every
        unfinished run, read back from a durable store at a restart), which the schedule shows
        going and the next slot waits for, as for a run fired here. Returns the index's last
        finished run of ``p`` (the index keeps only the ``history`` newest runs of all tasks)."""
        engine = self._engine
        for record in engine.runs(task=p.name, limit=None):  # newest first
            if record.status.finished:
                return record
            if p.current is None and record.id not in self._inflight:
                p.current = handle = engine.handle(record.id)
                self._follow(p, handle)
        return None

    async def _seed_last_run(self, p: _Periodic, indexed: RunRecord | None) -> None:
        """Take up ``p``'s last finished run, the one the store holds: the index may have let
        it go for ``history`` runs of other tasks since (an end-based interval would then count
        from the last slot, its start). ``indexed`` (the index's) stands in if the store fails."""
        store = self._engine.store
        try:
            # the newest run of each final status: the one of them that ended last is the last
            # (with no filter on the status, the newest runs may all still be pending)
            found: list[RunRecord] = [
                page.runs[0]
                for status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)
                if (page := await store.query(task=p.name, status=status, limit=1)).runs
            ]
        except Exception as exc:
            log.debug("periodic task %r: the store could not say which run of it ended last: %s", p.name, exc)
            found = []
        if indexed is not None:
            found.append(indexed)
        p.ended_by = None
        if found:
            self._take_last(p, max(found, key=lambda r: r.finished_at or 0.0))
        elif p.last_fire is not None and p.every is not None and not p.fixed_rate:
            p.ended_by = self._ended_by()

    def _ended_by(self) -> float:
        """The latest a run no longer held anywhere can have ended: finished runs are let go
        (from the index and the store, after ``history`` newer ones or ``retention``) oldest
        end first, so no later than the oldest one kept; and no later than now. The start of
        its slot would do for its end only as long as the run took no time."""
        finished = (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED)
        ends = [r.finished_at for r in self._engine.runs(finished, limit=None) if r.finished_at is not None]
        return min([self._now(), *ends])

    def _take_last(self, p: _Periodic, record: RunRecord) -> None:
        """``record`` is ``p``'s last finished run as read at a start, unless one that ended
        later is known here (one this node heard end while the store was read)."""
        end = record.finished_at
        if p.last_end is not None and (end is None or end <= p.last_end):
            return
        p.last_run_id = record.id
        p.last_status = record.status.value
        p.last_started = record.started_at
        p.last_duration = record.duration
        p.last_end = end

    async def stop(self, deadline: float) -> None:
        """Cancel and await every loop; runs already submitted are the engine's to drain.

        Pauses end here: a pause lasts until its resume or until the engine stops (it
        is not kept in the store, so a restarted process would not have it either)."""
        self._running = False
        for p in self._entries.values():
            self._halt(p)
            p.paused = False
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        if tasks:
            # the loops never swallow cancellation, so this returns promptly
            await asyncio.wait(tasks)
        self._tasks.clear()
        for p in self._entries.values():
            self._tell_late_held(p)

    def _activate(self, p: _Periodic) -> None:
        """Decide enabled/disabled from the engine's resources and flags, start the loop, tell."""
        p.reason = self._unmet_needs(p)
        p.enabled = p.reason is None
        # initial_delay is the service's time to warm up after a start (or after the task's
        # registration on a running engine): a task enabled later within it waits for it too
        p.hold_until = self._now() + p.initial_delay
        if p.enabled and not p.paused:
            if self._counts_from_current(p):
                # a run read back at the start, or another node's, goes: an end-based interval
                # counts from its end, not from the slot it fired for (which would fire the
                # next one an interval after that slot, however long the run took)
                self._halt(p)
                p.kept = None
                self._spawn(p, fresh=True, after_current=True)
            else:
                self._launch(p, self._first_slot(p))
        elif not p.enabled:
            # a misspelled resource or flag name would otherwise leave no trace in the log; one
            # that looks misspelled is warned of, where the default logging shows it (a need
            # not met yet is no news: a resource provided later, a flag left off)
            level = logging.WARNING if self._looks_misspelled(p) else logging.INFO
            log.log(level, "periodic task %r is disabled until its needs are met: %s", p.name, p.reason)
        self._emit_registered(p)

    def _emit_registered(self, p: _Periodic) -> None:
        self._engine.bus.emit(
            PeriodicRegistered,
            name=p.name,
            trigger=p.trigger,
            enabled=p.enabled,
            reason=p.reason,
            next_due=p.next_due,
        )

    def _launch(self, p: _Periodic, slot: float | None, *, fresh: bool = True) -> None:
        """Start ``p``'s loop, its first tick at ``slot``. ``fresh``: as at a start, the time
        since its last tick is no news (a late first tick is logged at INFO)."""
        self._halt(p)
        p.kept = None  # a schedule taken up anew: what a disable left is no longer it
        if slot is None:
            self._never_again(p)
            return
        self._plan(p, slot)
        self._spawn(p, fresh=fresh)

    def _spawn(self, p: _Periodic, *, fresh: bool, after_current: bool = False) -> None:
        p.fresh = fresh
        task = spawn(self._loop(p, after_current=after_current), name=f"taskwatch-periodic-{p.name}")
        p.task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _disable(self, p: _Periodic) -> None:
        if p.slot is not None and p.next_due is not None:
            # the slot its loop was waiting for (not one it fired, whose run it waits on)
            p.kept = p.slot
        self._halt(p)

    def _reenable(self, p: _Periodic) -> None:
        """``p``'s needs are met again: its loop takes up its schedule where it was (see the
        module's "Needs"), no slot of the time it was disabled fired late or counted missed."""
        self._halt(p)
        if self._counts_from_current(p):
            # an end-based interval whose run went on meanwhile counts from that run's end, as
            # if the task had never been disabled (no tick skipped for it, none late)
            p.kept = None
            self._spawn(p, fresh=False, after_current=True)
            return
        self._launch(p, self._enable_slot(p), fresh=False)

    def _counts_from_current(self, p: _Periodic) -> bool:
        """Whether ``p`` is an end-based interval whose run known here still goes."""
        current = p.current
        return p.every is not None and not p.fixed_rate and current is not None and self._going(current.id, p)

    def _going(self, run_id: str, p: _Periodic) -> bool:
        """Whether ``run_id``, a run of ``p``, is one this scheduler knows is still going."""
        return run_id in self._inflight or run_id == p.elsewhere

    def _halt(self, p: _Periodic) -> None:
        p.next_due = p.planned = p.slot = None
        task, p.task = p.task, None
        # a loop that disables its own task returns instead, and so does one writing its slot's
        # run: cancelled there, the write would go on unseen (a SQLite writer waiting for the
        # file's lock still commits) and its run go uncounted, shown nowhere in the schedule
        if task is not None and task is not _current_task() and task is not p.writer:
            task.cancel()  # stays in self._tasks until done, so stop() still awaits it

    # ------------------------------------------------------------ due times

    def _now(self) -> float:
        return (self._fixed_clock or self._engine.clock)()

    def _first_slot(self, p: _Periodic) -> float | None:
        """The first slot after a start (or the task's registration on a running engine)."""
        slot = self._slot_after_last(p)
        started = p.hold_until - p.initial_delay
        # one that comes due within the warm-up, not while nothing ran (a deploy's quick
        # restart), fires at the warm-up's end as a fresh start's first slot does: not late,
        # and the slots the warm-up let pass are not missed (see _count_missed)
        p.warming = slot if slot is not None and p.last_fire is not None and started <= slot < p.hold_until else None
        return slot

    def _slot_after_last(self, p: _Periodic) -> float | None:
        """The slot after the last one fired before this start (or the first one, if none was)."""
        if p.last_fire is not None:
            # fired before this start: the slot after the last one, or at once if it
            # was missed while nothing ran (once, however many were missed)
            if p.every is not None:
                base = p.last_fire
                if not p.fixed_rate and p.last_end is not None and p.last_end > base:
                    # end-based: from the end of the last run, as without the restart
                    base = p.last_end
                elif not p.fixed_rate and p.ended_by is not None:
                    # its last run is known nowhere any more: from the latest it can have
                    # ended, never sooner than an interval after its end (the slot, its start,
                    # would be that much too soon), and at once if that time has passed
                    base = max(base, p.ended_by)
                # the slot it was waiting for, as its schedule has it, even when it passed
                # meanwhile: it then fires late (not before hold_until, see _plan), the slots
                # passed since are counted missed, and a fixed-rate grid stays where it was.
                # Every node sharing the store names the same slot, and one claims it
                return base + p.every
            # a cron slot stays the nominal time every node claims (once, cluster-wide);
            # only when this node fires it waits for the warm-up
            return self._cron_after(p, p.last_fire)
        start = p.hold_until
        # just before `start`, so a cron time that falls exactly on it still counts
        return start if p.cron is None else self._cron_after(p, start - 1e-6)

    def _enable_slot(self, p: _Periodic) -> float | None:
        """The slot a task enabled again takes its schedule up at: the next one from now (not
        within the start's warm-up, which still holds): those that passed while it was
        disabled are let go, not fired late."""
        ref = max(self._now(), p.hold_until)
        kept, p.kept = p.kept, None
        if p.cron is not None:
            return self._cron_after(p, ref - 1e-6)
        every = p.every
        assert every is not None
        if p.fixed_rate:
            # the grid of the slot it was waiting for (or of the last one fired), where it was
            anchor = kept if kept is not None else p.last_fire
            return ref if anchor is None else _grid_slot(anchor, every, ref)
        # end-based: the slot it was waiting for, else an interval after the last run ended
        # (or the last slot fired); at once if that time has come
        due = [kept] if kept is not None else [t + every for t in (p.last_fire, p.last_end) if t is not None]
        return max([ref, *due])

    def _resume_slot(self, p: _Periodic) -> float | None:
        now = self._now()
        kept, p.kept = p.kept, None
        if p.every is None:
            return self._cron_after(p, now)
        if p.fixed_rate:
            # the grid of the slot the pause (or a disable) left waiting, or of the last one
            # fired: its next slot after now, as a task enabled again takes it up (see the
            # module's "Needs"). With no slot planned yet there is no grid to keep
            anchor = kept if kept is not None else p.last_fire
            if anchor is not None:
                return _grid_slot(anchor, p.every, now)
        return now + p.every

    def _cron_after(self, p: _Periodic, after: float) -> float | None:
        assert p.cron is not None
        try:
            # a time of the repeated hour whose first pass this task fired (here, or on a node
            # sharing the store, as the store told at the start) is not fired in its second
            return next_cron_due(p.cron, after, p.tz, fired=p.last_fire)
        except StopIteration:
            return None

    def _never_again(self, p: _Periodic) -> None:
        # only a cron expression can run out of future times (cronsim looks 50 years ahead)
        p.enabled = False
        p.reason = _NEVER_AGAIN
        p.next_due = p.planned = p.slot = None

    def _plan(self, p: _Periodic, slot: float) -> None:
        """Set the nominal slot and the jittered due time of the next tick."""
        p.slot = slot
        span = p.every
        if span is None and p.jitter > 0:
            following = self._cron_after(p, slot)
            span = following - slot if following is not None else 0.0
        p.planned = slot + jitter_delay(span or 0.0, p.jitter, self._rng)
        p.next_due = max(p.planned, p.hold_until)

    def _slot_after_tick(self, p: _Periodic, slot: float, planned: float, end: float | None) -> float | None:
        now = self._now()
        # how late the loop is, as on the grid: a tick its jitter put near the next slot (up to
        # a whole interval later with jitter=1.0) is not late, and that next slot stands
        behind = now - (planned - slot)
        if p.cron is not None:
            # from now, not from the slot: a loop that woke late fires once, not in a burst
            return self._cron_after(p, max(slot, behind))
        assert p.every is not None
        if p.fixed_rate:
            due = next_interval_due(slot, None, p.every, True, now=behind)
            # the latest slot already past is the one this late tick just fired for:
            # a loop held up for a while fires once, then keeps to the grid
            return due + p.every if due < behind else due
        # an end that gives no slot after this one (a run read from a store other nodes' clocks
        # wrote, or an older one than the slot's, pruned first) cannot be the end of the run
        # this slot followed: the interval counts from now, when no run of the task goes
        if end is None or end + p.every <= slot:
            end = now
        return next_interval_due(None, end, p.every, False)

    # ------------------------------------------------------------ the loop

    async def _loop(self, p: _Periodic, *, after_current: bool = False) -> None:
        """Tick ``p`` at its slots. ``after_current``: an end-based interval whose next slot
        is an interval after the end of its run still going (``p.current``)."""
        trouble = OutageLog(log, f"periodic task {p.name!r}: scheduling")
        me = _current_task()
        if held := self._engine.still_going(p.name):
            # a run a stop gave up on (its code ignored every cancel) still runs, though its
            # record ended: runs of one task never overlap, and an end-based interval counts
            # from its real end
            await asyncio.wait([task for task, _, _ in held])
            if p.every is not None and p.cron is None and not p.fixed_rate:
                after_current = False
                self._plan(p, next_interval_due(None, self._now(), p.every, False))
        if after_current:
            assert p.every is not None
            try:
                end = await self._wait_current(p)
            except EngineNotRunning:
                return
            except Exception as exc:
                trouble.failed(exc, "its interval counts from now")
                end = None
            self._plan(p, next_interval_due(None, end if end is not None else self._now(), p.every, False))
        while p.next_due is not None and p.slot is not None and p.planned is not None:
            try:
                await self._sleep_until(p.next_due)
                if self._recheck(p) and not p.enabled:
                    # a resource deleted from engine.resources (or a flag turned off) behind
                    # the scheduler's back: the run could only fail, so none is made
                    self._disable(p)
                    log.warning("periodic task %r disabled: %s", p.name, p.reason)
                    self._emit_registered(p)
                    return
                slot, planned, fired_at = p.slot, p.planned, self._now()
                # the store records each slot once: of the nodes sharing it, one fires it
                # (and an interval task fires at most once per interval, whichever node's
                # clock of the previous run's end its slots follow)
                gap = p.every - _SLOT_TOLERANCE if p.every is not None else 0.0
                await self._tick(p, slot, gap)
                p.last_fire = slot
                if p.task is not me:
                    # halted (paused, disabled) while the tick wrote its run, which it let end:
                    # that run, if the store took it, is followed and counted as any other.
                    # The slot fired, so a disable's is no longer the one waited for
                    if p.kept == slot:
                        p.kept = None
                    return
                end = None
                if p.cron is None and not p.fixed_rate:
                    # end-based: the next interval starts when this run (or the
                    # one a skipped tick found still going) has finished
                    p.next_due = None
                    end = await self._wait_current(p)
                following = self._slot_after_tick(p, slot, planned, end)
                if following is not None:
                    await self._count_missed(p, slot, planned, fired_at, following)
            except EngineNotRunning:
                return
            except Exception as exc:
                if p.task is not me:
                    # halted during a write that failed: nothing to try again
                    log.warning("periodic task %r: scheduling failed as it was halted: %s", p.name, exc)
                    return
                # a store that failed (or a bug) must not end the schedule. The same slot is
                # tried again shortly, not a new one: the store then refuses it if another node
                # (or this one, before the error) fired it, and cron and fixed-rate slots stay
                # on their grid
                trouble.failed(exc, f"trying the same slot again every {_ERROR_BACKOFF:g} s")
                p.next_due = self._now() + _ERROR_BACKOFF
                continue
            trouble.succeeded()
            if following is None:
                self._never_again(p)
                return
            self._plan(p, following)

    async def _count_missed(
        self, p: _Periodic, slot: float, planned: float, fired_at: float, following: float
    ) -> None:
        """Count the slots the tick just made (late) for ``slot`` let pass, and no node fired."""
        missed = self._slots_passed(p, slot, planned, fired_at, following)
        fresh, p.fresh = p.fresh, False
        warming, p.warming = p.warming, None
        if missed <= 0 or warming == slot:
            return
        # on a store nodes share, this loop being held up is no missed slot if another node fired
        # meanwhile: the store tells the last slot any node fired (the ones before it are not
        # known one by one, so they are not counted missed either)
        last = await self._last_fired(p)
        if last is not None and last > slot:
            due = last + p.every if p.every is not None else last
            missed = self._slots_passed(p, last, due, fired_at, following)
            p.missed += missed
            if missed > 0:
                self._warn_late(
                    p, missed,
                    "periodic task %r: this node's tick came %.3g s late; %d slot(s) since the last one a "
                    "node sharing the store fired (%.3g s ago) passed without a run",
                    p.name, max(0.0, fired_at - planned), missed, max(0.0, fired_at - last),
                )  # fmt: skip
            else:
                log.info(
                    "periodic task %r: this node's tick came %.3g s late; a node sharing the store fired "
                    "its slots meanwhile (the last %.3g s ago): none was missed",
                    p.name, max(0.0, fired_at - planned), max(0.0, fired_at - last),
                )  # fmt: skip
            return
        p.missed += missed
        # the first tick after a start makes up for the time the engine was stopped, as
        # documented; later, a loop was held up (blocked, suspended), which is news
        text = "periodic task %r fired %.3g s late; %d slot(s) passed without a run (fired once for them all)"
        if fresh:
            log.info(text, p.name, max(0.0, fired_at - planned), missed)
        else:
            self._warn_late(p, missed, text, p.name, max(0.0, fired_at - planned), missed)

    def _warn_late(self, p: _Periodic, missed: int, text: str, *args: object) -> None:
        """Log a late tick of ``p`` that missed ``missed`` slots at WARNING: the first one at
        once, and then at most one every ``_LATE_WARNING_EVERY`` seconds, with how many were
        held back since the previous (a loop that cannot keep up is late at every tick, a
        thousand times a second at every=0.001). ``p.missed`` counts every slot all the same."""
        told = p.late_log.take(missed)
        if told is None:
            return
        held, held_missed, ago = told
        if held:
            text += (
                "; before it, %d more late tick(s) since the previous warning %.0f s ago, %d slot(s) passed "
                "without a run in all (late ticks are logged at most once every %g s)"
            )
            args = (*args, held, ago, held_missed, _LATE_WARNING_EVERY)
        log.warning(text, *args)

    def _tell_late_held(self, p: _Periodic) -> None:
        """At a stop: the late ticks of ``p``, and the ticks the full queue refused, held back
        since their last warnings, which no later one will tell now."""
        if (late := p.late_log.left()) is not None:
            held, held_missed, ago = late
            log.warning(
                "periodic task %r: %d more late tick(s) since the warning %.0f s ago, %d slot(s) passed "
                "without a run in all (late ticks are logged at most once every %g s)",
                p.name, held, ago, held_missed, _LATE_WARNING_EVERY,
            )  # fmt: skip
        if (refused := p.refused_log.left()) is not None:
            held, _, ago = refused
            log.warning(
                "periodic task %r: %d more tick(s) refused by the full run queue since the warning %.0f s ago",
                p.name, held, ago,
            )  # fmt: skip

    def _slots_passed(self, p: _Periodic, slot: float, planned: float, fired_at: float, following: float) -> int:
        """The slots between ``slot`` (planned for ``planned``), fired at ``fired_at``, and ``following``."""
        if p.cron is not None:
            return _cron_slots_between(p.cron, slot, following, p.tz)
        if p.fixed_rate:
            # the grid slots between this one and the next one planned
            return max(0, round((following - slot) / p.every) - 1) if p.every else 0
        # no grid: the whole intervals the tick was late by
        return max(0, math.floor((fired_at - planned) / p.every)) if p.every else 0

    async def _last_fired(self, p: _Periodic) -> float | None:
        """The last slot of ``p`` the store recorded fired, by any node; None if it cannot say."""
        try:
            return await self._engine.store.get_periodic(p.name)
        except Exception as exc:
            # only the count depends on it: the schedule goes on
            log.debug("periodic task %r: the store could not say which slot fired last: %s", p.name, exc)
            return None

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
        try:
            record = await current.wait()
        except RunNotFound:
            # another node's run, pruned from the store before this node saw it end: it is
            # over, when is not known (the interval counts from now)
            self._let_go(current.id)
            return None
        p.elsewhere = None
        return record.finished_at

    async def _tick(self, p: _Periodic, slot: float, gap: float) -> None:
        """Fire ``slot`` unless another node (or an earlier start) did: submit its run, or
        skip it if the previous run is still going."""
        async with p.lock:
            await self._tick_locked(p, slot, gap)

    async def _tick_locked(self, p: _Periodic, slot: float, gap: float) -> None:
        current = p.current
        going = current is not None and current.id in self._inflight  # its finished event has not come yet
        if going and not self._engine.durable:
            assert current is not None
            # the memory store: the run is this node's own, whose end this node always hears
            if await self._engine.store.claim_periodic(p.name, slot, gap):
                self._skip(p, current.id)  # the slot is this node's, and passes without a run
            return
        if p.cron is not None and not p.other_grid_told and self._engine.durable:
            await self._tell_of_another_grid(p)
        # a durable store looks for a run of the task going on any node as it claims the slot,
        # in one transaction: what this node knows of a run it does not execute (one read at
        # its start, or another node's) lags the store, and may never hear its end at all (a
        # run pruned from the store first), so the store's word decides, not this node's
        me = p.writer = _current_task()
        try:
            fired = await self._engine.submit_periodic(p.name, slot, gap)
        except QueueFull:
            self._refused(p)
            fired = None
        finally:
            if p.writer is me:
                p.writer = None
        if fired is None:
            if not going:
                # the slot is not this node's: an end-based interval counts from the end of
                # the run the node that fired it started, not again from the end of a run that
                # finished before it (that end would give this same slot back, refused again,
                # at once and forever), nor from this node's tick
                p.current = p.elsewhere = None
                if p.every is not None and not p.fixed_rate and self._engine.durable and p.task is me:
                    await self._take_up_latest(p)
            return
        handle, new = fired
        if not new:
            # a run of this task still goes (this node's, another node's, or an earlier
            # start's): the slot passes without overlapping it, and an end-based interval
            # counts from its end
            if current is None or current.id != handle.id:
                p.current = handle
            p.elsewhere = None if handle.id in self._inflight else handle.id
            self._skip(p, handle.id)
            return
        p.current = handle
        p.elsewhere = None
        p.runs += 1
        self._follow(p, handle)

    async def _tell_of_another_grid(self, p: _Periodic) -> None:
        """Warn (once a start) when a node sharing the store fired the cron task ``p`` since this
        node's last look at a time its cron names not here. The store records slots: it cannot
        tell that two nodes reading the cron in different zones (a container on UTC beside a
        host on local time), or after a rolling deploy changed the expression, each fire it
        at their own times."""
        last = await self._last_fired(p)
        if last is None or p.last_fire is None or last <= p.last_fire or last > self._now() + FIRE_AHEAD:
            # none since (this node fired last, or none it knows of before), or one a clock far
            # ahead wrote, which the claim takes over and logs as such
            return
        assert p.cron is not None
        try:
            ours = next_cron_due(p.cron, last - _SLOT_TOLERANCE, p.tz, fired=p.last_fire)
        except (StopIteration, InvalidConfiguration):
            return
        if ours == last:
            return
        p.other_grid_told = True
        zone = p.tz or f"this node's local zone, {datetime.now().astimezone().tzname()}"
        log.warning(
            "periodic task %r: a node sharing the store fired it for %s UTC, which is no time of "
            "its cron %r in %s: nodes whose zones or cron expressions differ each fire it at their "
            "own times; give every node the same cron and tz=",
            p.name, datetime.fromtimestamp(last, timezone.utc).strftime("%Y-%m-%d %H:%M:%S"), p.cron, zone,
        )  # fmt: skip

    async def _take_up_latest(self, p: _Periodic) -> None:
        """Another node fired this slot (or one less than an interval before it): take up the
        run of ``p`` the store holds last, as the one the loop waits for. That node claimed its
        slot with that run (in one transaction), or while that run went, and runs of one task
        never overlap: its end is the one that node counts the interval from too. If the store
        cannot say, the interval counts from now, when this node finds no run of the task going."""
        try:
            page = await self._engine.store.query(task=p.name, limit=1)
        except Exception as exc:
            log.debug("periodic task %r: the store could not say which run its slot started: %s", p.name, exc)
            return
        if not page.runs:
            return
        latest = page.runs[0]
        followed = self._inflight.get(latest.id)
        p.current = followed[1] if followed is not None else self._engine.handle(latest.id)
        if followed is None and not latest.status.finished:
            p.elsewhere = latest.id  # shown going, as a run a tick found going is

    async def run_now(self, name: str, submit: Callable[[str], Awaitable[RunHandle]]) -> RunHandle:
        """Queue one run of ``name`` now with ``submit(source)`` (the engine's), off its schedule.

        A paused task may be run (an operator's explicit act); its next tick stays as it
        was, and one coming due while this run goes is skipped and counted, as for any
        overlap. Raises :class:`UnknownPeriodic`, :class:`EngineNotRunning`, and
        :class:`PeriodicNotRunnable` while its needs are unmet or a run of it is pending
        or running (see the module's "Run now" for how far that look reaches).
        """
        p = self._get(name)
        state = self._engine.state
        if state != "running":
            raise EngineNotRunning(state)
        # looked at now, not taken from the last tick's: a resource deleted from
        # engine.resources directly is only found missing at a tick
        reason = self._unmet_needs(p)
        if reason is not None:
            raise PeriodicNotRunnable(p.name, reason=reason)
        async with p.lock:
            await self._refresh_current(p)
            self._refuse_if_going(p)
            await self._refuse_if_stored(p)
            handle = await submit(f"periodic:{p.name}:manual")
            p.current = handle
            p.elsewhere = None
            p.runs += 1
            self._follow(p, handle)
        return handle

    async def _refresh_current(self, p: _Periodic) -> None:
        """Bring what this node knows of ``p``'s run going up to what a durable store says:
        one another node executes may have ended there unheard here, or been pruned."""
        current = p.current
        if current is None or not self._engine.durable or not self._going(current.id, p):
            return
        try:
            # reads the store for a run of another node's, and announces its end if it came
            await self._engine.fetch_run(current.id)
        except RunNotFound:
            self._let_go(current.id)

    def _follow(self, p: _Periodic, handle: RunHandle) -> None:
        """Count ``handle``'s run as ``p``'s in flight until it ends (its finished event), or until
        the engine lets it go unfinished: a run of another node's that the store pruned before
        this node heard how it ended has no finished event, only a wait that raises RunNotFound."""
        self._inflight[handle.id] = (p, handle)
        engine = self._engine
        if not engine.durable or engine.current(handle.id) is None:
            return  # the memory store's runs all end here; a run not indexed has no wait to hear
        ended = asyncio.ensure_future(engine.wait_for(handle.id))  # a future, no task, for an indexed run
        ended.add_done_callback(functools.partial(self._follow_ended, handle.id))

    def _follow_ended(self, run_id: str, ended: asyncio.Future[RunRecord]) -> None:
        if ended.cancelled():
            return
        # read, so an error is never left unretrieved: a finished run is the finished event's
        # to record, one left pending at a stop the next start's to read back
        if isinstance(ended.exception(), RunNotFound):
            self._let_go(run_id)

    def _let_go(self, run_id: str) -> None:
        """``run_id`` is over, how it ended unknown (gone from the store): no slot waits for it."""
        found = self._inflight.pop(run_id, None)
        if found is None:
            return
        p, _ = found
        if p.current is not None and p.current.id == run_id:
            p.current = None
        if p.elsewhere == run_id:
            p.elsewhere = None

    def _refuse_if_going(self, p: _Periodic) -> None:
        current = p.current
        if current is not None and current.id in self._inflight:
            try:
                status: str | None = current.record().status.value
            except RunNotFound:  # another node's, pruned from the store before this node saw it end
                status = None
            raise PeriodicNotRunnable(p.name, run_id=current.id, status=status)
        # also a run read back at a start, or one of another node's this node took up
        for record in self._engine.runs((RunStatus.PENDING, RunStatus.RUNNING), task=p.name, limit=1):
            raise PeriodicNotRunnable(p.name, run_id=record.id, status=record.status.value)

    async def _refuse_if_stored(self, p: _Periodic) -> None:
        """The store may hold a run of ``p`` another node (or engine of this process) queued, unknown here."""
        engine = self._engine
        # one query, not one per status: a run claimed between two would pass both unseen. Runs
        # of the task are not queued while one goes, so one going is among the newest
        page = await engine.store.query(task=p.name, limit=_GOING_LOOKED_AT)
        for stored in page.runs:
            if stored.status.finished:
                continue
            known = engine.current(stored.id)
            # this node's own run, finished here before its end reached the store, is over
            if known is None or not known.status.finished:
                raise PeriodicNotRunnable(p.name, run_id=stored.id, status=stored.status.value)

    def _skip(self, p: _Periodic, running_run_id: str | None) -> None:
        p.skipped += 1
        self._engine.bus.emit(PeriodicSkipped, name=p.name, running_run_id=running_run_id, skipped_total=p.skipped)

    def _refused(self, p: _Periodic) -> None:
        """A tick the engine's full run queue refused: skipped, counted apart, and warned of as
        late ticks are (at most once every ``_LATE_WARNING_EVERY`` seconds, with how many)."""
        p.skipped += 1
        p.refused += 1
        if (told := p.refused_log.take()) is not None:
            held, _, ago = told
            since = (
                f"; {held} more tick(s) refused since the previous warning {ago:.0f} s ago "
                f"(logged at most once every {_LATE_WARNING_EVERY:g} s)"
                if held
                else ""
            )
            log.warning("periodic task %r: the engine's run queue is full (max_queue); tick skipped%s", p.name, since)
        self._engine.bus.emit(
            PeriodicSkipped, name=p.name, running_run_id=None, skipped_total=p.skipped, reason="queue_full"
        )

    def _on_run_finished(self, event: BaseEvent) -> None:
        """Bus callback: record the outcome of one of our runs as soon as it finishes."""
        found = self._inflight.pop(event.run_id, None)  # type: ignore[attr-defined]
        if found is None:
            return
        p, handle = found
        status = _STATUS_OF_KIND[event.kind]
        if status is RunStatus.FAILED:
            p.failures += 1
        try:
            # the record's times (a handle keeps its run's entry after the index let it go), the
            # node's that ran it: a cancel's event has no duration, another node's is heard late
            record = handle.record()
            started, duration, end = record.started_at, record.duration, record.finished_at or event.ts
        except RunNotFound:
            duration = getattr(event, "duration", None)
            started = event.ts - duration if duration is not None else None
            end = event.ts
        if p.current is not handle and p.last_end is not None and end < p.last_end:
            # a run of another node's whose end this node heard only after the end of a later
            # run (runs of one task never overlap: the later end is the later run)
            return
        p.last_run_id = event.run_id  # type: ignore[attr-defined]
        p.last_status = status.value
        p.last_started = started
        p.last_duration = duration
        # the end the loop's next due time counts from too
        p.last_end = end


def _near(name: str, known: list[str]) -> str | None:
    """The nearest of ``known`` when ``name`` looks like a typo of one."""
    near = difflib.get_close_matches(name, known, n=1)
    return near[0] if near else None


def _with_suggestion(name: str, known: list[str]) -> str:
    """``name``, with the nearest of ``known`` when it looks like a typo of one."""
    near = _near(name, known)
    return f"{name} (did you mean {near}?)" if near else name


def _grid_slot(anchor: float, every: float, ref: float) -> float:
    """The first slot at or after ``ref`` of the grid of ``anchor``, every ``every`` seconds."""
    if anchor >= ref:
        return anchor
    return anchor + every * math.ceil((ref - anchor) / every)


def _cron_slots_between(expr: str, after: float, before: float, tz: str | None = None) -> int:
    """How many times ``expr`` matches strictly between ``after`` and ``before``.

    Counted one by one up to ``_MISSED_CRON_COUNT``; past that (a process suspended for
    days under a every-second expression) the rest is estimated at the rate counted."""
    count, t = 0, after
    while count < _MISSED_CRON_COUNT:
        try:
            t = next_cron_due(expr, t, tz, fired=t)
        except StopIteration:
            return count
        if t >= before:
            return count
        count += 1
    rate = (t - after) / count
    return count + int((before - t) / rate) if rate > 0 else count


def _current_task() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no loop running (a pause before the engine starts)
        return None
