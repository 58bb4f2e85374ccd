"""Named work queues drained by N consumer tasks, off the request path.

``engine.queue(name, handler, concurrency=N, maxsize=M)`` returns a
:class:`WorkQueue`. Producers call ``put_nowait(job)`` (sync; safe on the
engine's loop and from other threads) or ``await put(job)``; N consumer tasks
call ``await handler(job)`` (or ``await handler(ctx, job)`` when the handler
takes two positional arguments) in FIFO order.

Jobs are pydantic models or JSON-serialisable values (usually dicts); anything
else is refused at put time so a failure report can always carry the job. The
handler receives the job object as it was put, except when its job parameter is
annotated with a pydantic model: a job is then validated into that model at put
(:class:`InvalidJob` if it does not fit, or would not read back from its JSON as
put: a ``SecretStr``, a field excluded from dumps, a serialization alias the
model does not read; an instance of the model is passed as is). Nothing is ever dropped silently: a full queue raises :class:`QueueFull`
(and counts it), a failing job is published as ``QueueJobFailed`` with its
traceback, and jobs still undone when ``engine.stop`` times out are reported in
``QueueDrainIncomplete``. A cancel of a consumer that is not the engine's (the
application cancelling a handler's task) fails that job and ends that consumer,
as any cancelled task ends; another takes its place once there is work.

With a durable store every job is also kept in the store until its handler
has run (delivery is at least once): ``await put(job)`` returns once the job
is committed, ``put_nowait`` within one group commit after; jobs put before the
engine's start are written by that start before it returns. A write the store
refuses (locked too long, unreachable) is retried; a ``put`` whose job no
consumer has taken yet withdraws it and raises the store's error instead, so
the caller may simply retry. A write is never cut short: a stop waits for the
one under way, then writes what is left. Jobs left when the process dies or
the stop times out are taken up again at the next start, or by another node
once their holder is known to be gone. A job read back from the store reaches
the handler as the pydantic model its job parameter is annotated with
(validated again), or else in its JSON form.

A node holds the stored jobs it took (put, or took up) only while its
heartbeats reach the store: silent for ``node_ttl`` (cut off, paused, its
loop stalled), it counts as gone and another node takes its jobs up. So a job
taken from the store is started only while this node's last heartbeat that
went through is fresher than ``node_ttl`` by the local clock, and none was
missed since the job was taken (a *lapse*). On a lapse the jobs waiting
here are set aside, not started; once a heartbeat gets through again the
store says which are still this node's (those run here, the others are
given up: another node has them). A job already running when the hold
lapses goes on, as a run does, unless the node is cut off from the store
(it is cancelled there and set aside too) or the store has given it to
another node (it is cancelled: it runs there).
A process replaced by a later start under its node id holds nothing any
more: it starts none of its stored jobs again (see ``node_superseded``).

While the engine stops, the queues and the runs drain together (see ``Engine._stop``): a
handler (a run, a task or thread either started) may still put into a queue that has not
closed yet, which callers outside the engine may not (see ``hop.works_for``). A stop cancels
the handlers still running at its timeout: a job whose handler catches that cancel and
returns, or raises something else instead, is left undone all the same (kept in a durable
store), as is one whose handler the stopping engine refused a put or submit once its drain
was over; neither is counted processed or failed, both are reported left. The stop gives a
handler that swallows the cancel three rounds of ``cancel_grace`` (cancelled again each
round), as it does a run: then it goes on without it, logs it as a bug in
the handler and counts it in ``QueueInfo.ignored_cancel``. What such a
handler does afterwards is not counted, nor acknowledged in the store.

An operator can pause a queue's consumers (puts are still accepted up to
``maxsize``; jobs being handled finish), resume them, and purge the jobs
waiting (their rows are deleted from a durable store too). Each is published
as an event, and purged jobs are counted in :class:`QueueInfo`.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Secret, SecretBytes, SecretStr, ValidationError

from .context import TaskContext
from .errors import (
    EngineLoopClosed,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidJob,
    JobNotSerializable,
    QueueFull,
    StoppedBeforeDone,
    TaskDefinitionError,
)
from .execution import checked_timeout
from .hop import call_on, cancel_and_wait, current_loop, going_here, refuse_in_fork, spawn, work_context, works_for
from .jsonsafe import NotJsonSafe, jsonable, safe_str
from .options import PutOptions, QueueOptions, check_options
from .logs import OutageLog, log_safely, log_text, traceback_block
from .events import QueueDrainIncomplete, QueueJobFailed, QueuePaused, QueuePurged, QueueResumed
from .runs import RunError
from .store import StoredJob
from .store.base import on_its_way
from .store.rows import UNREADABLE
from .tasks import NotReadBack, async_signature, params_from_record, read_back, resolve_annotation

if TYPE_CHECKING:
    from .engine import Engine
    from .executor import Executor

log = logging.getLogger("taskwatch.queues")

#: seconds past its drain a stopping queue waits for a delete of handled jobs held up by a
#: store out of reach (those jobs run again at the next start if it is given up)
_STOP_DELETE_GRACE = 1.0

_CLOSED_STATES = ("stopping", "stopped")

#: a write of jobs failed and left nothing to write again: how the log says it
_TAKEN_BACK = "the put() waiting for the jobs' write took them back and raised its error: nothing is left to write"

#: what ``_try_put`` answers when there is no room
_FULL = object()


class _Transit:
    """A job on its way from another thread to the loop (compared by identity).

    ``sent``: its handover to the loop is queued, so its ``put_nowait`` has returned (or is
    returning): from then on the loop may land it ahead of its handover (see ``_land``).
    """

    __slots__ = ("job", "sent")

    def __init__(self, job: Any) -> None:
        self.job = job
        self.sent = False


def _settle(fut: asyncio.Future[None], exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _wake(fut: asyncio.Future[None], exc: BaseException | None = None) -> None:
    """Resolve a waiter's future from any thread. A join or put awaited on another loop before
    the engine started waits on that loop, and only a wake made there reaches it."""
    loop = fut.get_loop()
    if loop is current_loop():
        _settle(fut, exc)
        return
    try:
        loop.call_soon_threadsafe(_settle, fut, exc)
    except RuntimeError:
        pass  # that loop is closed: nobody waits there any more


class QueueInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    concurrency: int
    maxsize: int
    depth: int
    in_flight: int
    processed: int
    failed: int
    rejected: int = 0
    #: jobs accepted by put/put_nowait since creation
    accepted: int = 0
    #: jobs left undone (queued or cancelled mid-run) when a stop timed out
    abandoned: int = 0
    #: of those, jobs kept in the durable store for the next start
    kept: int = 0
    #: jobs taken up from the store: left by an earlier start or a node that is gone
    adopted: int = 0
    #: the consumers take no jobs (``pause_queue``); puts are still accepted
    paused: bool = False
    #: waiting jobs dropped by ``purge_queue`` since creation
    purged: int = 0
    #: writes to the durable store that failed; their jobs stayed here and were written again
    write_failures: int = 0
    #: jobs not kept in the durable store (logged): the store refused their write until the stop ended
    #: (neither handled nor kept), or the job was changed after its put into something not JSON-safe
    #: (it runs on this node only, and not again after a crash)
    lost: int = 0
    #: handlers that ignored every cancel of a stop (three rounds of ``cancel_grace``): the stop
    #: went on without them (logged as a bug in the handler)
    ignored_cancel: int = 0
    #: consumer tasks cancelled from outside the engine (their jobs counted failed), each replaced
    consumers_replaced: int = 0
    #: times this node's hold on its stored jobs lapsed (no heartbeat reached the store for ``node_ttl``)
    hold_lapses: int = 0
    #: jobs set aside by a lapse, not started until the store says whether they are still this node's
    set_aside: int = 0
    #: jobs another node took up during a lapse: dropped here unstarted, or cancelled mid-run
    given_up: int = 0


class QueuePurge(BaseModel):
    """What ``purge_queue`` did: ``purged`` waiting jobs dropped, ``from_store`` of them
    deleted from the durable store, and the queue as it is now."""

    model_config = ConfigDict(frozen=True)

    queue: str
    purged: int
    from_store: int = 0
    info: QueueInfo


class _Kept:
    """A job of a queue on a durable store, and its row once written (``id``)."""

    __slots__ = ("job", "id", "done", "epoch", "cut", "lost", "unstorable", "attempt", "handed", "dropped")

    def __init__(self, job: Any, job_id: int | None = None, epoch: int = -1, attempt: int = 1) -> None:
        self.job = job
        self.id = job_id
        #: 1 + the times it was handed out again (``TaskContext.attempt``)
        self.attempt = attempt
        #: handled before its row was written: the row is deleted as soon as it exists
        self.done = False
        #: the queue's hold epoch when this node took its row (-1: while the hold may have
        #: lapsed); started only while it is the current one (see ``WorkQueue._may_start``)
        self.epoch = epoch
        #: its handler was cancelled because its hold ran out or another node took it
        self.cut = False
        #: the store gave it to another node while it ran here
        self.lost = False
        #: changed after its put into something not JSON-safe: it runs here, but has no row (counted lost)
        self.unstorable = False
        #: handed to the store as the loop tore down: resolved once that write landed (as
        #: ``WorkQueue._written`` is for the usual writes), for a put() waiting for it
        self.handed: asyncio.Future[BaseException | None] | None = None
        #: that hand-over failed: no write of it is to come (counted lost)
        self.dropped = False


class _Unreadable:
    """A stored job whose row holds no JSON (changed by hand, say): failed as it is, never
    handed to the handler, so it holds up no other job."""

    __slots__ = ("text", "error")

    def __init__(self, text: Any, why: str) -> None:
        #: what the row holds, shown as the failed job
        self.text = text
        self.error = RunError(type=UNREADABLE, message=f"{why}; the job is dropped: put it again")


def _job_from_record(model: type[BaseModel], stored: Any) -> BaseModel:
    """The job a handler that takes ``model`` gets from ``stored`` (its job as the store keeps it,
    ``jsonable(job)``); raises ValidationError. Put checks a job with this, so a job that is
    accepted is one that reads back. Read as a run's params are: a strict model takes a datetime,
    UUID, enum or tuple from the record's JSON text."""
    return params_from_record(model, stored)


def _why_unrecordable(model: type[BaseModel], job: BaseModel, problem: dict[str, Any]) -> str:
    """What a job's field that does not read back from the job's JSON record turns into, and what to do."""
    loc = problem.get("loc") or ()
    name = loc[0] if loc and isinstance(loc[0], str) else None
    later = "after a restart or on another node, the handler would get"
    if not loc and type(job) is not model:
        return (
            f"{problem.get('msg', 'reads back as another value')}: the store keeps the job as JSON, and "
            f"{later} a {model.__qualname__} made from it; put a {model.__qualname__} (or annotate the "
            f"handler's job with {type(job).__qualname__})"
        )
    field, field_name = None, name
    if name is not None:
        field = model.model_fields.get(name)
        if field is None:
            field_name, field = next(
                ((n, f) for n, f in model.model_fields.items() if name in (f.alias, f.validation_alias, f.serialization_alias)),
                (name, None),
            )
    if field is not None and field_name is not None and len(loc) == 1 and problem.get("type") == "missing":
        stored_as = field.serialization_alias or field.alias or field_name
        if stored_as != name and field.exclude is not True:
            # the store keeps the job by its serialization aliases, the model reads it by its
            # validation aliases
            return (
                f"the stored job holds it as {stored_as!r} (its serialization alias), which the model does not "
                f"read it by: {later} the job as plain JSON, not a {model.__qualname__}; give the field one "
                f"alias for both (Field(alias=...)), or let it read {stored_as!r} too "
                f"(validation_alias=AliasChoices({name!r}, {stored_as!r}))"
            )
    if field is not None and field.exclude:
        instead = f"the job as plain JSON, not a {model.__qualname__}" if field.is_required() else "its default"
        return (
            f"excluded from dumps (exclude=True), so the stored job leaves it out: {later} {instead}; "
            "drop exclude=True, or keep the value out of the job"
        )
    if field_name is not None and isinstance(getattr(job, field_name, None), (SecretStr, SecretBytes, Secret)):
        return (
            f"a secret's JSON dump is masked ('**********'), so the stored job holds the mask: {later} "
            "that; put a reference the handler looks the secret up by instead (or a plain str)"
        )
    return (
        f"reads back from the stored JSON job as another value: {later} that; use a type whose "
        "JSON dump reads back as the same value"
    )


def _handler_shape(handler: Any, name: str) -> tuple[bool, type[BaseModel] | None]:
    """Whether ``handler`` is called as ``handler(ctx, job)`` (else ``handler(job)``), and the
    pydantic model its job parameter is annotated with, if any; else TaskDefinitionError."""
    what = f"the handler of queue {name!r}"
    shape = "a queue's handler is `async def handler(job)` or `async def handler(ctx, job)`"
    # a functools.partial and an object whose `__call__` is async are called as tasks' are
    target, sig = async_signature(handler, what, "(job) or (ctx, job)", shape)
    params = sig.parameters.values()
    required = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(required) > 2 or (not required and not any(p.kind is p.VAR_POSITIONAL for p in params)):
        raise TaskDefinitionError(
            f"the handler of queue {name!r} takes {len(required)} required positional arguments; "
            "it must take (job) or (ctx, job)"
        )
    # a consumer passes (job) or (ctx, job) and nothing else: a keyword-only parameter with no
    # default would never get a value, and every job would fail
    unfilled = [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    if unfilled:
        raise TaskDefinitionError(
            f"{what} is called with (job) or (ctx, job) only, so its keyword-only parameter "
            f"{', '.join(unfilled)} would never get a value and every job would fail: give it a default, "
            f"or take it out; {shape}"
        )
    with_ctx = len(required) == 2
    job = required[-1] if required else None
    if job is None or job.annotation is job.empty:
        return with_ctx, None
    # an annotation that does not resolve is refused: ignored, it would let through every job
    # the model would have refused, and hand the handler dicts instead of the model
    hint = resolve_annotation(
        target, job.name, f"the job parameter {job.name!r} of {what}",
        "drop the annotation (the handler then gets each job as put, unchecked)",
    )  # fmt: skip
    return with_ctx, hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


class WorkQueue:
    """A bounded FIFO of jobs consumed by ``concurrency`` tasks on the engine's loop.

    ``put`` waits at most ``timeout`` seconds (default 0: not at all) for room
    and then raises :class:`QueueFull`, so a producer can never block forever.
    Jobs taken up from a durable store are never held back by ``maxsize``: the
    queue may then hold more, and puts wait or are refused until it is below.
    On ``engine.stop`` the queue drains within the stop timeout; whatever is
    still undone then (queued plus in-flight jobs, which are cancelled) is
    reported as ``QueueDrainIncomplete(left=N)`` and counted in ``abandoned``.
    """

    def __init__(
        self, engine: Engine, name: str, handler: Any, *, concurrency: int = 1, maxsize: int = 1000,
        executor: Executor | None = None,
    ) -> None:
        check_options(QueueOptions, f"queue {name!r}", concurrency=concurrency, maxsize=maxsize)
        self._engine = engine
        #: the engine's claims and heartbeats: whether this node still holds what it took from the store
        self._executor = executor
        self.name = name
        self.handler = handler
        self.concurrency = concurrency
        self.maxsize = maxsize
        #: the pydantic model the handler's job parameter is annotated with, if any:
        #: jobs read back from a durable store are validated into it again
        self._with_ctx, self._job_model = _handler_shape(handler, name)
        self._items: deque[Any] = deque()
        # put paths on different threads check room and append under this lock;
        # consumers only ever shrink the deque, which needs no lock
        self._lock = threading.Lock()
        #: jobs accepted from other threads that have not reached the loop yet, in the order
        #: their puts took the lock (a dict as an ordered set): they land in that order
        self._transits: dict[_Transit, None] = {}
        self._in_flight = 0
        self.processed = 0
        self.failed = 0
        self.rejected = 0
        self.accepted = 0
        self.abandoned = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._consumers: list[asyncio.Task[None]] = []
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()
        self._idle_waiters: list[asyncio.Future[None]] = []
        #: the engine's stop waiting for the consumers to have nothing left to do (see :meth:`drained`)
        self._drain_waiters: list[asyncio.Future[None]] = []
        #: jobs whose handler the stopping engine refused a put or submit (its drain was over): left
        #: undone as the stop leaves a job it cuts (kept in a durable store), counted by the stop
        self._undone = 0
        self._closing = False
        self._abandon = False
        #: what a join hears once a stop left jobs undone, until the next start; and
        #: whether a stop is clearing the queue (joins then wait for its verdict)
        self._left_at_stop: tuple[str, bool] | None = None
        self._stop_answers_joins = False
        #: resolved when the last job in transit from another thread lands (stop() waits for it)
        self._landed: asyncio.Future[None] | None = None
        #: pause_queue: consumers wait; puts are still accepted
        self.paused = False
        self.purged = 0
        #: durable store only: jobs not yet written, rows of handled jobs not yet deleted
        self._durable = False
        self.kept = 0
        self.adopted = 0
        self.write_failures = 0
        # the store's outages as the log says them: once when one starts, once when a write
        # or a read of this queue's jobs goes through again
        self._store_trouble = OutageLog(log, f"queue {name!r}: writing to the store")
        self.lost = 0
        self._unwritten: list[_Kept] = []
        self._handled: list[int] = []
        #: resolved by the next write of ``_unwritten``: None once written, else why it failed
        self._written: asyncio.Future[BaseException | None] | None = None
        #: the same for the write under way (its jobs are in neither list meanwhile)
        self._writing: asyncio.Future[BaseException | None] | None = None
        #: the store write under way (put, then delete), and whether it is at its delete
        self._write_task: asyncio.Task[None] | None = None
        self._deleting = False
        #: the keeper is asked to end (after the write it is doing); stop writes the rest
        self._keeper_stop = False
        #: the loop tears down: what is put is handed to the store as it comes (see
        #: hand_over_unwritten); and the write the stop cut short on purpose (at a delete)
        self._handing_over = False
        self._cut_write: asyncio.Task[None] | None = None
        #: one write to the store at a time: a purge then knows which jobs have rows
        self._store_lock = asyncio.Lock()
        self._kick: asyncio.Event | None = None
        self._keeper: asyncio.Task[None] | None = None
        #: bumped by each stop: a consumer of an earlier one (its handler ignored the stop's
        #: cancels) no longer counts anything when its handler ends, nor takes another job
        self._generation = 0
        self.ignored_cancel = 0
        #: handler tasks the last stop cancelled for every round of ``cancel_grace`` and left going
        self.left_going: list[asyncio.Task[Any]] = []
        #: the consumer task -> the stored job it is handling
        self._running: dict[asyncio.Task[None], _Kept] = {}
        #: durable store: this node's hold on the jobs it took from the store. ``_epoch`` grows with
        #: each lapse; ``_lapsed``: the store is to say which jobs are still this node's before any
        #: job taken from it starts; ``_hold_ok``: the last look found the hold fresh
        self._epoch = 0
        self._lapsed = False
        self._hold_ok = True
        #: the executor's last renewal as last seen: one further on by more than node_ttl means a lapse
        self._seen_renewal = 0.0
        self._watch_handle: asyncio.Handle | None = None
        #: jobs a lapse set aside (by row id), in the order they were put
        self._aside: dict[int, _Kept] = {}
        self.hold_lapses = 0
        self.given_up = 0
        #: a later process registered under this node's id: no job kept in the store starts here
        self._superseded = False
        #: consumers cancelled from outside the engine, to be replaced once there is work
        self._lost = 0
        self.consumers_replaced = 0
        self._names = itertools.count(concurrency)
        #: the consumers run (from the launch until the stop)
        self._launched = False
        #: puts and joins waiting for the start of a queue made while the engine runs
        self._launch_waiters: list[asyncio.Future[None]] = []
        #: the last start raised (the engine tries a late one again): no launch is coming to wait for
        self._start_failed = False

    # ------------------------------------------------------------ producers

    def put_nowait(self, job: Any) -> None:
        """Queue ``job`` now, or raise. Safe from sync code and from any thread.

        Raises :class:`EngineNotRunning` once the engine is stopping or
        stopped, :class:`JobNotSerializable` for jobs that are not pydantic
        models or JSON-serialisable, :class:`InvalidJob` for one that does not
        validate against the model the handler's job parameter is annotated
        with (or would not read back from its JSON record as put), and :class:`QueueFull` when ``maxsize`` jobs
        (or more: jobs taken up from a durable store are never held back) are waiting. Before
        the engine starts, jobs wait for it. In a fork of the process the engine runs in,
        :class:`EngineInAnotherProcess`: the job would be handed to a loop nothing runs here.
        """
        # first, and before any lock: one the engine's thread held at the fork is held for good
        refuse_in_fork(self._loop if self._loop is not None else self._engine.loop)
        self._check_open()
        job = self._checked(job)
        if self._try_put(job) is _FULL:
            self.rejected += 1
            raise self._full()

    async def put(self, job: Any, *, timeout: float = 0.0) -> None:
        """Queue ``job``, waiting up to ``timeout`` seconds for room; then raise QueueFull.

        The default ``timeout=0`` never waits; a timeout that is not a finite number
        of seconds, 0 or more (None, inf, NaN, a bool, a str, a negative), raises
        :class:`InvalidConfiguration`. Awaited on another loop than the engine's
        (a BackgroundEngine's caller), it runs on the engine's loop all the same;
        a cancel of the caller gives it up there. Jobs are checked as by :meth:`put_nowait`.

        On a durable store it returns once the job is committed (or already
        handled). A write the store refuses is retried, and this waits for it
        while a consumer has the job; a job no consumer has taken yet is taken
        back and the store's error is raised (:class:`StoreBusy` or
        :class:`StoreUnavailable`): nothing was queued, so retry the put. On a
        queue made while the engine runs, it first waits for the queue's start
        (which takes up the jobs the store holds), and while the engine's start
        is under way, for that start. A start that failed (logged; the
        engine tries it again) is not waited for: the job is kept here, and written
        and handled once a start succeeds. Awaited before the engine's start, it
        returns at once (that start may be the caller's next line), and the start
        writes the job before it returns.
        """
        if (home := self._elsewhere()) is not None:
            await call_on(home, self.put, job, timeout=timeout)
            return
        wait = self._put_timeout(timeout)
        self._check_open()
        job = self._checked(job)
        if self._engine.durable:
            # queued before the start, the job would not be written yet when this returns
            await self._start_under_way()
            await self._late_start()
            self._check_open()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (item := self._try_put(job)) is _FULL:
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.rejected += 1
                raise self._full()
            await self._wait_for_room(remaining)
            self._check_open()
            if (home := self._elsewhere()) is not None:
                # waited on this loop before the engine started on another: the rest is put there
                # (on a durable store, it waits there for the job's write)
                await call_on(home, self.put, job, timeout=max(0.0, deadline - loop.time()))
                return
        if type(item) is _Kept and self._keeper is not None:
            await self._until_written(item)

    async def _until_written(self, kept: _Kept) -> None:
        """Return once ``kept`` is committed (or handled); raise if its write failed and it was taken back."""
        failure: BaseException | None = None
        answered: asyncio.Future[BaseException | None] | None = None
        while kept.id is None and not kept.done:
            pending = kept.handed or self._written or self._writing
            if pending is None or pending is answered:
                # no write is to come any more (the stop's last one failed, a hand-over failed)
                raise failure or EngineNotRunning("stopped")
            outcome = await asyncio.shield(pending)
            answered = pending
            if outcome is None or kept.id is not None or kept.done:
                continue
            failure = outcome
            if self._withdraw(kept):
                raise outcome
            if kept.dropped:
                self._refused_after_all(kept)
                raise outcome
            # a consumer has the job already (or a new write of it is under way): wait for the next write

    def _full(self) -> QueueFull:
        # jobs taken up from the store are never held back by maxsize: the depth may be above it
        return QueueFull(
            f"queue {self.name!r}", self.maxsize, max(self.depth, self.maxsize), option="the maxsize= of engine.queue()"
        )

    async def _late_start(self) -> None:
        """A queue made while the engine runs is started by a task of the engine's loop (on a
        durable store, once it took up the jobs the store holds): wait for that start, unless
        it failed (the engine tries it again later; what is queued here waits for that)."""
        if not self._launched and not self._start_failed and self._engine.state == "running":
            fut = asyncio.get_running_loop().create_future()
            self._launch_waiters.append(fut)
            await fut

    async def _start_under_way(self) -> None:
        """Wait for an engine start under way on this loop that has not launched this queue yet.

        The start writes the jobs queued before it (see :meth:`start`), so a put that waited
        for it returns with its job committed. A put awaited before any start cannot wait so:
        the start may be its caller's next line; that start writes the job before it returns.
        """
        if self._launched or self._engine.state == "running":
            return  # running: :meth:`_late_start` waits for this queue's own start, if it is to come
        starting = self._engine.starting
        if starting is not None and starting.get_loop() is asyncio.get_running_loop():
            # its outcome is the start's caller's to hear: a start that failed leaves the job queued
            # here, as before any start
            await asyncio.wait([starting])

    def _wake_launch_waiters(self) -> None:
        waiters, self._launch_waiters = self._launch_waiters, []
        for fut in waiters:
            _wake(fut)

    def _refused_after_all(self, kept: _Kept) -> None:
        """``kept``'s hand-over to the store failed (counted lost) and its put() raises: the
        job was not queued after all, and is not counted as accepted or lost."""
        if self._take_out(kept):
            self.lost -= 1
        # (else a consumer has it: it runs here, with no row: lost, as counted)

    def _take_out(self, kept: _Kept) -> bool:
        """Take ``kept`` out of the waiting jobs, its put no longer accepted; False if a consumer has it."""
        with self._lock:
            for i, item in enumerate(self._items):
                if item is kept:
                    del self._items[i]
                    self.accepted -= 1
                    return True
        return False

    def _withdraw(self, kept: _Kept) -> bool:
        """Take back a job whose write failed, if no consumer and no write has it; True if taken."""
        if not any(k is kept for k in self._unwritten) or not self._take_out(kept):
            return False
        self._unwritten = [k for k in self._unwritten if k is not kept]
        if not self._unwritten and not self._handled and self._writing is None:
            # (said once the keeper has said the failure it would try again: else the keeper says it)
            self._store_trouble.given_up(_TAKEN_BACK)
        self._wake_one(self._putters)
        self._maybe_idle()
        return True

    def _elsewhere(self) -> asyncio.AbstractEventLoop | None:
        """The engine's loop when it runs and the caller awaits on another one (a BackgroundEngine's
        caller, a notebook's), else None: the queue's futures belong to the engine's loop, and one
        resolved from there would not wake the caller's."""
        loop = self._loop
        if loop is None and self._engine.state == "running":
            loop = self._engine.loop  # made while the engine runs: its start is on the way there
        if loop is None or not loop.is_running() or loop is asyncio.get_running_loop():
            return None
        return loop

    def _check_open(self) -> None:
        state = self._engine.state
        if state in _CLOSED_STATES and not (state == "stopping" and self._launched and works_for(self._engine)):
            if self._engine.loop_lost:
                # (its state says stopped) its consumers ended with that loop: the job would wait for good
                raise EngineLoopClosed()
            # the engine's own work (a handler, a run) still puts while the stop drains, until
            # this queue closes: refused, the job or run feeding it would fail (see Engine._stop)
            raise EngineNotRunning(state)
        if self._closing:
            raise EngineNotRunning("stopping")

    def _checked(self, job: Any) -> Any:
        """``job`` as its handler is to get it; raises InvalidJob or JobNotSerializable (nothing is queued)."""
        model = self._job_model
        if model is not None and not isinstance(job, model):
            # checked here, not by the handler: the producer learns of it, and the handler gets
            # the model it declares whether the job ran in-process or was read back from the store
            try:
                job = model.model_validate(job)
            except ValidationError as exc:
                problems = [dict(e) for e in exc.errors(include_url=False, include_context=False, include_input=False)]
                raise InvalidJob(self.name, model.__qualname__, problems) from None
        try:
            # (distinct keys: a dict whose keys became one JSON key would reach the handler short)
            stored = jsonable(job, distinct_keys=True)
        except NotJsonSafe as exc:
            raise JobNotSerializable(self.name, type(job).__qualname__, exc.detail) from None
        if model is not None:
            self._refuse_unrecordable(model, job, stored)
        return job

    def _refuse_unrecordable(self, model: type[BaseModel], job: BaseModel, stored: Any) -> None:
        """Raise :class:`InvalidJob` for a job that does not read back from ``stored`` (what the
        store keeps of it) as put.

        A durable store hands the handler the job read back from that record (after a restart,
        on another node): a ``SecretStr`` would arrive masked, a field with ``exclude=True`` as
        its default, a field stored by a serialization alias the model does not read as plain
        JSON, silently. Refused on every store, as task params are, so that a job model is
        accepted or refused the same wherever the queue runs.
        """
        try:
            read_back(job, stored, lambda data: _job_from_record(model, data))
        except NotReadBack as exc:
            problems = [{**p, "msg": _why_unrecordable(model, job, p), "type": "json_round_trip"} for p in exc.problems]
            raise InvalidJob(self.name, model.__qualname__, problems) from None

    def _put_timeout(self, timeout: object) -> float:
        where = f"put() on queue {self.name!r}"
        try:
            return check_options(PutOptions, where, timeout=timeout).timeout
        except InvalidConfiguration:
            # one message for every wrong kind (pydantic calls a NaN "not >= 0"), saying what to pass
            raise InvalidConfiguration(
                where,
                [
                    f"timeout={timeout!r}: pass how many seconds to wait for room, a finite number of 0 "
                    "or more (0, the default, does not wait); a put never waits without limit"
                ],
            ) from None

    def _try_put(self, job: Any) -> Any:
        """The item queued (``job``, or its :class:`_Kept`), True if sent from another thread, or ``_FULL``."""
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            return True if self._put_from_thread(loop, job) else _FULL
        if self._transits:
            # jobs other threads' puts queued before this one (they have returned) go first:
            # their handovers, still to come, would put them after it
            self._land()
        with self._lock:
            if len(self._items) + len(self._transits) >= self.maxsize:
                return _FULL
            if self._durable and self._handing_over:
                item = self._hand_over_one(job)
            else:
                item = self._keep(job) if self._durable else job
            self._items.append(item)
            self.accepted += 1
        self._work_arrived()
        return item

    def _keep(self, job: Any) -> _Kept:
        """Durable store: wrap ``job`` and queue it for the next write (on the loop)."""
        kept = _Kept(job)
        self._unwritten.append(kept)
        if self._written is None and self._loop is not None:
            self._written = self._loop.create_future()
        if self._kick is not None:
            self._kick.set()
        return kept

    def _hand_over_one(self, job: Any) -> _Kept:
        """The loop tears down: give ``job``, put on the loop, to the store's writer at once, or
        refuse it (EngineNotRunning): nothing would write it any more (see hand_over_unwritten)."""
        kept = _Kept(job)
        put = self._give_to_store(job)
        self._await_landing(put, [kept], None)
        return kept

    def _give_to_store(self, job: Any) -> asyncio.Future[list[int]]:
        """Hand ``job`` to the store's writer as the loop tears down (any thread), or refuse it
        (EngineNotRunning, saying why the store cannot take it)."""
        try:
            return self._to_writer([jsonable(job)])
        except Exception as exc:  # noqa: BLE001 - a store closed or failing, a job changed since: refused
            raise EngineNotRunning(
                "stopping",
                f"queue {self.name!r} no longer accepts jobs: the program is ending, and the store cannot "
                f"take them any more ({safe_str(exc)})",
            ) from None

    def _to_writer(self, encoded: list[Any]) -> asyncio.Future[list[int]]:
        """Hand the ``encoded`` jobs to the store's writer as the loop tears down: the writer's
        future, or raises what keeps the store from taking them (closed, failing, or writing
        on the loop that is ending)."""
        put = on_its_way(self._engine.store.put_jobs(self.name, self._engine.incarnation, encoded))
        if put is None:
            raise EngineNotRunning("stopping", "the store writes on the engine's loop, which is ending")
        return put

    def _put_from_thread(self, loop: asyncio.AbstractEventLoop, job: Any) -> bool:
        # (put_nowait asked already; a put waiting for room gets here too) before the slot is
        # taken and before the try, which reads a RuntimeError, as this refusal is, as a closed loop
        refuse_in_fork(loop)
        transit = _Transit(job)
        try:
            with self._lock:
                # decided under the lock stop() takes to close the queue: a job is either refused here
                # or in transit, which stop() waits to see land (see stop())
                if self._closing:
                    raise EngineNotRunning("stopping")
                if len(self._items) + len(self._transits) >= self.maxsize:
                    return False
                if self._durable and self._handing_over:
                    # the loop tears down, and may have had its last turn: no handover lands now
                    self._hand_from_thread(loop, job)
                    self.accepted += 1
                    return True
                # the slot is taken now, so the caller learns about QueueFull synchronously; one
                # dict operation, so an interrupt can never leave half a reservation behind
                self._transits[transit] = None
                self.accepted += 1
            loop.call_soon_threadsafe(self._land, transit)
            # after the handover is queued, never before: a transit the loop lands ahead of its
            # handover is one whose put cannot be withdrawn below any more
            transit.sent = True
            if self._durable and self._handing_over:
                # the teardown began meanwhile, and landed the transits sent by then: this one,
                # if still here, is the thread's to hand over (whoever takes it first, under the lock)
                with self._lock:
                    if transit in self._transits:
                        self._hand_from_thread(loop, job)
                        del self._transits[transit]
                self._check_landed()
        except BaseException as exc:
            # the loop is closed, or the thread was interrupted (Ctrl-C) with the handover maybe
            # queued: the put did not happen, and a handover that still comes is ignored
            with self._lock:
                if transit in self._transits:
                    del self._transits[transit]
                    self.accepted -= 1
            self._check_landed()
            if isinstance(exc, RuntimeError) and not isinstance(exc, EngineNotRunning):
                raise EngineNotRunning("stopped") from None
            raise
        return True

    def _land(self, arriving: _Transit | None = None) -> None:
        """On the loop: land ``arriving`` and every job whose put from another thread has
        returned, in the order their puts took the lock.

        Called by each handover, and before anything on the loop that must come after those
        puts (a put made here, a purge): a handover is a callback the loop runs when its turn
        comes, and a put that returned is queued from that moment on, not from its handover's.
        A transit that is missing (withdrawn: its put was interrupted and raised, or landed
        already) is left alone, as is one whose put is still under way on its thread.
        """
        with self._lock:
            transits = self._transits
            if not transits:
                return
            landing = [t for t in transits if t.sent or t is arriving]
            for transit in landing:
                del transits[transit]
                job = transit.job
                self._items.append(self._keep(job) if self._durable else job)
        for _ in landing:
            self._work_arrived()
        if landing:
            self._check_landed()
            if self._handing_over and self._durable:
                self._hand_over_now()  # nothing writes them otherwise any more

    def _hand_from_thread(self, loop: asyncio.AbstractEventLoop, job: Any) -> None:
        """The loop tears down: give ``job``, put from another thread, to the store's writer
        from here, or refuse it (EngineNotRunning). Its handover to the loop could come after
        the loop's last turn, and be dropped with the loop unsaid."""
        put = self._give_to_store(job)
        kept = _Kept(job)
        try:
            loop.call_soon_threadsafe(self._await_landing, put, [kept], None)
        except RuntimeError:
            pass  # the loop is closed: the store's writer logs a write of it that fails

    def _check_landed(self) -> None:
        """Resolve stop()'s wait once nothing is in transit from other threads (any thread)."""
        landed = self._landed
        if landed is not None and not self._transits and not landed.done():
            _wake(landed)  # on stop()'s loop, from whichever thread landed the last job

    async def _wait_for_room(self, timeout: float) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._putters.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            if not fut.done():
                fut.cancel()

    @staticmethod
    def _wake_one(waiters: deque[asyncio.Future[None]]) -> None:
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                _wake(fut)
                return

    # ------------------------------------------------------------ consumers

    async def _consume(self, generation: int, after: asyncio.Task[Any] | None = None) -> None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        if after is not None and not after.done():
            # a handler the last stop left going (it ignored every cancel) holds this slot until
            # it ends: a start right after would otherwise run one more handler than `concurrency`
            try:
                await asyncio.wait([after])
            except asyncio.CancelledError:
                if not self._abandon and generation == self._generation and not self._torn_down():
                    self._consumer_lost()
                raise
        # a first delivery's context says attempt 1 whoever keeps it: one serves them all
        first = TaskContext(self._engine, None, f"queue:{self.name}") if self._with_ctx else None
        while True:
            while not self._items or self.paused:
                # a job accepted from another thread is still on its way: wait for it
                # (a paused queue leaves its jobs where they are when the engine stops)
                if self._closing and (self.paused or not self._transits):
                    return
                fut = loop.create_future()
                self._getters.append(fut)
                try:
                    await fut
                except asyncio.CancelledError:
                    if not self._abandon and generation == self._generation and not self._torn_down():
                        self._consumer_lost()
                    raise
                finally:
                    if not fut.done():
                        fut.cancel()
            if self._abandon:
                return
            item = self._items.popleft()
            self._wake_one(self._putters)
            kept = item if type(item) is _Kept else None
            if kept is not None and (self._superseded or (kept.id is not None and not self._may_start(kept))):
                self._set_aside(kept)
                self._maybe_idle()  # (given up, it may have been the last job)
                continue
            job = item if kept is None else kept.job
            ctx = first
            if ctx is not None and kept is not None and kept.attempt > 1:
                ctx = TaskContext(self._engine, None, ctx.name, attempt=kept.attempt)  # a job's own
            self._in_flight += 1
            if kept is not None:
                self._running[task] = kept
            try:
                try:
                    failure = job.error if type(job) is _Unreadable else await self._call(ctx, job)
                    if task.cancelling() and (self._abandon or self._torn_down()):
                        # the stop's cancel (or the loop's teardown's), which the handler caught and
                        # returned, or raised something else from its cleanup: handled below as the
                        # cancel it swallowed, so the job is left undone all the same (its row stays,
                        # and the stop counted it already)
                        if isinstance(failure, BaseException):
                            error = RunError.from_exception(failure)
                            log_safely(
                                log, logging.WARNING, "queue %r: a handler cut short by the stop raised %s: %s "
                                "instead of its cancel; its job is left undone", self.name,
                                log_text(error.type), log_text(error.message),
                            )  # fmt: skip
                        raise asyncio.CancelledError
                except asyncio.CancelledError as cancel:
                    cut = kept is not None and kept.cut
                    if cut and task.uncancel() == 0:
                        # the queue's own cancel of a cut job, and no other: it runs again where held
                        if generation != self._generation:
                            return
                        self._cut_short(kept)  # type: ignore[arg-type]
                        continue
                    if not self._abandon and generation == self._generation and not self._torn_down():
                        # not the stop's: the application cancelled this consumer (a handler
                        # cancelling its own task, say). The task ends, as a cancelled task must
                        # (asyncio.run() waits for it), the job counted as failed (or, cut, run
                        # where it is held), and another consumer takes its place
                        if cut:
                            self._cut_short(kept)  # type: ignore[arg-type]
                        else:
                            self._failed(job, cancel, kept)
                            if kept is not None:
                                self._done(kept)
                        self._consumer_lost()
                    raise  # the stop's cancel, or the loop's teardown's: the job counts as left undone
                if kept is not None and kept.cut:
                    task.uncancel()  # the handler swallowed its cut's cancel
                    if failure is not None and generation == self._generation:
                        self._cut_short(kept)  # it raised something else instead: cut short all the same
                        continue
                if generation != self._generation:
                    return  # a stop went on without this handler: nothing it did counts any more
                if isinstance(failure, EngineNotRunning) and self._engine.state == "stopping":
                    # refused a put or submit once the stop's drain was over (the queue it fed had
                    # closed): the job did not fail, the stop cut it short. Left undone as a job the
                    # stop cancels: its row stays for the next start, and the stop counts it
                    self._undone += 1
                    continue
                if failure is None:
                    self.processed += 1
                else:
                    self._failed(job, failure, kept)
                if kept is not None:
                    self._done(kept)  # not reached when stop cancels it: the job stays kept
            finally:
                if generation == self._generation:
                    self._running.pop(task, None)
                    self._in_flight -= 1
                    self._maybe_idle()

    def _work_context(self) -> contextvars.Context:
        """A consumer's context: its handler (and what that starts) is the engine's own work, which
        a stopping engine still takes puts and submits from while it drains."""
        return work_context(self._engine)

    def _consumer_lost(self) -> None:
        """A consumer was cancelled from outside the engine and ends: another takes its place
        as soon as there is work (at once if jobs wait), so the queue never stalls for it."""
        self._lost += 1
        self.consumers_replaced += 1
        log.warning("queue %r: a consumer task was cancelled from outside the engine; another takes its place",
                    self.name)  # fmt: skip
        if self._items and self._loop is not None:
            self._loop.call_soon(self._replace_lost)

    def _torn_down(self) -> bool:
        """Whether the event loop is being torn down under the running engine (``asyncio.run``
        ending with no ``engine.stop()``): its cancel is no one's, every consumer gets it and
        none would take another's place, and a job being handled is left undone, as by a stop."""
        return self._executor is not None and self._executor.torn_down

    def _replace_lost(self) -> None:
        """Start consumers in place of those cancelled from outside the engine (none while stopping)."""
        lost, self._lost = self._lost, 0
        loop = self._loop
        if not lost or self._closing or self._abandon or loop is None or loop.is_closed() or not self._consumers:
            return
        live = [t for t in self._consumers if not t.done()]
        self._consumers = live + [
            spawn(
                self._consume(self._generation), name=f"taskwatch-queue-{self.name}-{next(self._names)}",
                context=self._work_context(),
            )
            for _ in range(lost)
        ]

    def _work_arrived(self) -> None:
        self._wake_one(self._getters)
        if self._lost:
            self._replace_lost()

    def _done(self, item: _Kept) -> None:
        if item.id is None:
            item.done = True  # its write is still to come (or in flight): delete right after
        else:
            self._handled.append(item.id)
            if self._kick is not None:
                self._kick.set()

    # ------------------------------------------------------------ the durable store

    async def _flush(self, deletes: bool = True) -> None:
        """Write queued jobs and delete handled ones (unless ``deletes`` is False): one store call each.

        The write runs in a task of its own that cancelling the caller does not
        cancel: cut short, a write may commit all the same (SQLite's writer
        thread) or be rolled back (PostgreSQL), and either way the queue would
        no longer know which. Whoever writes next waits for it (the store lock).
        """
        write = self._write_task = spawn(self._flush_locked(deletes))
        write.add_done_callback(_retrieved)
        write.add_done_callback(self._write_ended)
        await asyncio.shield(write)

    def _storable(self, batch: list[_Kept]) -> tuple[list[_Kept], list[Any]]:
        """The jobs of ``batch`` still to write, and their JSON. One no longer JSON-safe is left
        out for good (counted lost): written again and again it would hold up every other job."""
        fresh: list[_Kept] = []
        encoded: list[Any] = []
        for kept in batch:
            if kept.done:
                continue
            try:
                encoded.append(jsonable(kept.job))
            except NotJsonSafe:
                # changed since it was put
                kept.done = kept.unstorable = True
                self.lost += 1
                log.error("queue %r: a job is no longer JSON-safe; it runs here but is not kept (counted "
                          "in info().lost)", self.name)  # fmt: skip
                continue
            fresh.append(kept)
        return fresh, encoded

    async def _flush_locked(self, deletes: bool) -> None:
        async with self._store_lock:
            await self._flush_now(deletes)

    async def _flush_now(self, deletes: bool = True) -> None:
        store = self._engine.store
        batch, self._unwritten = self._unwritten, []
        written, self._written = self._written, None
        self._writing = written
        failure: BaseException | None = None
        try:
            fresh, encoded = self._storable(batch)
            if fresh:
                stamp = self._stamp()
                put = store.put_jobs(self.name, self._engine.incarnation, encoded)
                if isinstance(put, asyncio.Future):
                    try:
                        ids = await asyncio.shield(put)
                    except asyncio.CancelledError:
                        # the loop's teardown (nothing else cuts a put short): the store's writer has
                        # the jobs and writes them, at the process's exit if need be; put back for
                        # another write, they would be stored twice. A put() waiting for them
                        # returns once they are written
                        on_its_way_for = written
                        put.add_done_callback(lambda done: self._put_landed(done, fresh, stamp, on_its_way_for))
                        batch, written = [], None
                        raise
                else:
                    ids = await put
                self._store_trouble.succeeded()
                for kept, job_id in zip(fresh, ids):
                    kept.id = job_id
                    kept.epoch = stamp
                    if kept.done:
                        self._handled.append(job_id)
        except BaseException as exc:
            # not written (or, cut off, not known to be): the jobs stay queued for the next write, ahead of
            # newer ones; at worst one is stored twice, never lost
            failure = exc if isinstance(exc, Exception) else EngineNotRunning("stopping")
            self._unwritten[:0] = [k for k in batch if not k.done]
            self.write_failures += 1
            if self._written is None and self._unwritten and self._loop is not None:
                self._written = self._loop.create_future()
            raise
        finally:
            self._writing = None
            if written is not None and not written.done():
                written.set_result(failure)
        if not deletes:
            return
        handled, self._handled = self._handled, []
        if handled:
            self._deleting = True
            try:
                await store.done_jobs(handled)
                self._store_trouble.succeeded()
            except BaseException:
                self._handled[:0] = handled  # their rows stay: deleted at the next write
                self.write_failures += 1
                raise
            finally:
                self._deleting = False

    async def _keep_loop(self, kick: asyncio.Event) -> None:
        """Write puts and acks as they come; take up jobs of gone holders now and then.

        Ends when ``_keeper_stop`` is set, never in the middle of a store call.
        """
        loop = asyncio.get_running_loop()
        interval = min(max(self._engine.lease_ttl / 3, 0.5), 10.0)
        next_adopt = loop.time() + interval
        retry: float | None = None  # after a failed write: how soon to try again
        while not self._keeper_stop:
            wait = next_adopt - loop.time()
            if retry is not None and (self._unwritten or self._handled):
                wait = min(wait, retry)
            if self._lapsed:
                wait = min(wait, self._probe())  # the watch kicks it too, once the hold is fresh
            try:
                async with asyncio.timeout(max(0.0, wait)):
                    await kick.wait()
            except TimeoutError:
                pass
            if self._keeper_stop:
                return  # the stop writes what is left
            kick.clear()
            writing = True
            try:
                # while the hold may have lapsed the rows of handled jobs stay until the retake has
                # asked whose they are: deleted now, one another node took up (and runs again) would
                # be gone from the store without this node ever saying it ran on both
                await self._flush(deletes=self._observe() and not self._lapsed)
                writing = False
                retry = None
                if self._lapsed:
                    await self._retake()
                elif loop.time() >= next_adopt and not self._closing:
                    next_adopt = loop.time() + interval
                    await self._adopt()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if writing and not self._unwritten and not self._handled:
                    # the put() calls waiting for the jobs' write took them back, and raised
                    self._store_trouble.failed(exc, _TAKEN_BACK, ends=True)
                else:
                    # a busy or failing store may work on the next round: the jobs stay queued here
                    self._store_trouble.failed(exc, "the jobs stay queued here, trying again in up to 1 s")
                retry = 0.05 if retry is None else min(retry * 2, 1.0)
                next_adopt = max(next_adopt, loop.time() + retry)

    def _put_landed(
        self,
        done: asyncio.Future[list[int]],
        kept: list[_Kept],
        epoch: int,
        written: asyncio.Future[BaseException | None] | None,
    ) -> None:
        """A put handed to the store's writer landed: its jobs have rows (ids) from now on, one
        handled meanwhile is deleted at the next write (as :meth:`_flush_now` does), and the
        ``put()`` calls waiting for them (on ``written``) return, or raise its failure."""
        failure = EngineNotRunning("stopped") if done.cancelled() else done.exception()
        if failure is None:
            for job, job_id in zip(kept, done.result()):
                job.id = job_id
                job.epoch = epoch
                if job.done:
                    self._handled.append(job_id)
        else:
            self.lost += len(kept)
            for job in kept:
                job.dropped = True
            log.error(
                "queue %r: the store could not write %d job(s) handed to it as the program ended (%s); a "
                "put() waiting for one raises the error, the others are lost (counted in info().lost)",
                self.name, len(kept), safe_str(failure),
            )  # fmt: skip
        if written is not None and not written.done():
            written.set_result(failure)

    def _keeper_ended(self, keeper: asyncio.Task[None]) -> None:
        # cancelled while still the keeper: the loop's teardown with no stop (a stop takes the
        # keeper first, and writes what is left itself)
        if keeper is self._keeper and keeper.cancelled():
            self.hand_over_unwritten()

    def _write_ended(self, write: asyncio.Task[None]) -> None:
        # cut short by anything but the stop giving up on a delete: the loop's teardown (of a
        # keeper's write, a start's or a stop's); what the write put back (a PostgreSQL put
        # cut short, a failed one), and whatever was put meanwhile, is handed over once it ends
        if (write.cancelled() and write is not self._cut_write) or self._handing_over:
            self.hand_over_unwritten()

    def hand_over_unwritten(self) -> None:
        """The loop tears down (``asyncio.run`` ending with no ``engine.stop()``, or cutting a
        stop short): give the store the jobs put here and not yet written, without waiting for
        it. Once called, every later put is handed over as it comes (another thread's puts
        still land while the loop waits for its executor).

        A store whose put is under way once called (SQLite's writer queue) writes them, also
        once the loop is gone; with any other, they stay unwritten, as runs do. A write under
        way is not waited for: its jobs are not among these, and the store (about to close,
        at a stop cut short) takes this put after it; a write that fails puts its jobs back,
        and its end calls this again.
        """
        if not self._engine.durable:
            return  # nothing to hand over: the memory store keeps nothing past the process
        with self._lock:
            # under the lock other threads' puts take: each later one hands its job over itself
            self._handing_over = True
        self._keep_queued()  # a queue whose start never came (made while the engine ran) has plain jobs
        self._land()  # the jobs of other threads' puts that returned: their handovers may never run
        self._hand_over_now()

    def _hand_over_now(self) -> None:
        # nothing changes here before the store has the jobs or refused them: a Ctrl-C in the
        # middle (their encoding takes a while) leaves them for the exit's hand-over
        fresh, encoded = self._storable(self._unwritten)
        why: Exception | None = None
        try:
            put = self._to_writer(encoded) if fresh else None
        except Exception as exc:  # noqa: BLE001 - a store closed or failing: said and counted below
            put, why = None, exc
        self._unwritten = []
        written, self._written = self._written, None
        if put is None and why is None:
            if written is not None and not written.done():
                written.set_result(None)
            return
        if put is None:
            self.lost += len(fresh)
            for kept in fresh:
                kept.dropped = True
            log.error(
                "queue %r: %d job(s) accepted as the program ended could not be handed to the store (%s); "
                "they are lost (counted in info().lost)", self.name, len(fresh), safe_str(why),
            )  # fmt: skip
            if written is not None and not written.done():
                written.set_result(why)
            return
        self._await_landing(put, fresh, written)

    def _await_landing(
        self, put: asyncio.Future[list[int]], kept: list[_Kept], written: asyncio.Future[BaseException | None] | None
    ) -> None:
        """On the loop: ``kept``, handed to the store's writer by ``put``, get their rows once it
        lands; ``put()`` calls waiting for them return then (see _until_written)."""
        stamp = self._stamp()
        if written is None and self._loop is not None:
            written = self._loop.create_future()
        for job in kept:
            job.handed = written
        put.add_done_callback(lambda done: self._put_landed(done, kept, stamp, written))

    def _revive(self, job: StoredJob, epoch: int) -> _Kept:
        """A job read back from the store, as the handler expects it (its model, when it names one)."""
        value = job.job
        if job.unreadable is not None:
            value = _Unreadable(value, job.unreadable)
        elif self._job_model is not None:
            try:
                value = _job_from_record(self._job_model, value)
            except ValidationError:
                pass  # the model changed since it was put: the handler gets the JSON, and decides
        return _Kept(value, job.id, epoch, job.handovers + 1)

    async def _adopt(self) -> None:
        """Take up the jobs of holders that are gone (not while this node may look gone itself)."""
        if self._lapsed or not self._observe():
            return  # the retake takes them up, once the store has this node's heartbeat again
        stamp = self._stamp()
        adopted = await self._engine.store.adopt_jobs(self.name, self._engine.incarnation, own=False)
        self._store_trouble.succeeded()
        if adopted:
            with self._lock:
                self._items.extend(self._revive(j, stamp) for j in adopted)
            self.adopted += len(adopted)
            for _ in adopted:
                self._work_arrived()

    # ------------------------------------------------------------ the hold on stored jobs

    def _ttl(self) -> float:
        return self._engine.store.node_ttl

    def _probe(self) -> float:
        """How often a lapsed hold is looked at again (the executor's watchdog probes as often)."""
        return min(1.0, self._ttl() / 3)

    def _renewed_at(self) -> float:
        """When (``time.monotonic()``) the last heartbeat of this node that reached the store was sent."""
        # the executor keeps it for its own claims; the store counts this node alive from then on
        # for node_ttl, and so holds its queue jobs for it
        return self._executor.renewed_at if self._executor is not None else time.monotonic()

    def _cut_off(self) -> bool:
        return self._executor is not None and self._executor.cut_off

    def _hold_begins(self) -> None:
        """A start: the node just registered (the executor counts that as a renewal)."""
        self._lapsed = False
        self._hold_ok = True
        self._superseded = False
        self._seen_renewal = self._renewed_at()

    def _observe(self) -> bool:
        """Whether this node's hold on the jobs it took from the store is fresh now; notes a lapse.

        Fresh: its last heartbeat that went through was sent less than ``node_ttl`` ago, the
        executor does not count it cut off, and none was missed since the last look (two
        renewals seen further apart than ``node_ttl``: a pause or a stalled loop in between,
        however short ago it ended, left room for another node to take the jobs up).
        """
        if self._superseded:
            return False
        renewed = self._renewed_at()
        now = time.monotonic()
        ttl = self._ttl()
        seen = self._seen_renewal
        missed = self._hold_ok and renewed - seen > ttl
        fresh = not self._cut_off() and now < renewed + ttl and not missed
        self._seen_renewal = renewed
        if fresh != self._hold_ok:
            self._hold_ok = fresh
            if fresh:
                if self._kick is not None:
                    self._kick.set()  # the keeper asks the store which jobs are still this node's
            else:
                # a missed renewal: the silence was the gap between the two, since made good
                self._lapse(renewed - seen if missed else now - renewed)
        return fresh

    def _stamp(self) -> int:
        """The epoch for rows taken from now on: -1 while the hold may have lapsed."""
        return self._epoch if self._hold_ok and not self._lapsed else -1

    def _may_start(self, kept: _Kept) -> bool:
        """Whether the job with a row, ``kept``, may start here now (see :meth:`_observe`)."""
        return self._observe() and not self._lapsed and kept.epoch == self._epoch

    def _lapse(self, silent: float) -> None:
        """The hold may have lapsed: set the waiting jobs with rows aside until the store answers."""
        self._epoch += 1
        self._lapsed = True
        self.hold_lapses += 1
        with self._lock:
            waiting = [i for i in self._items if type(i) is _Kept and i.id is not None]
            if waiting:
                self._items = deque(i for i in self._items if not (type(i) is _Kept and i.id is not None))
        for kept in waiting:
            self._aside[kept.id] = kept  # type: ignore[index]
        for _ in waiting:
            self._wake_one(self._putters)
        log.log(
            logging.WARNING if waiting or self._running else logging.INFO,
            "queue %r: no heartbeat of this node has reached the store for %.1f s (node_ttl %g s): another "
            "node may take up its jobs. %d waiting job(s) set aside, %d running; the store says which are "
            "still this node's once it answers", self.name, silent, self._ttl(), len(waiting), len(self._running),
        )  # fmt: skip
        if self._kick is not None:
            self._kick.set()

    def _set_aside(self, kept: _Kept) -> None:
        """A job popped whose hold may have lapsed: not started until the store says it is this node's."""
        if self._superseded:
            # written already, or by the next write: under an incarnation the store counts gone,
            # so another node (the process that replaced this one, at least) takes it up
            self.given_up += 1
            return
        self._aside[kept.id] = kept  # type: ignore[index]
        if not self._lapsed:
            # taken before the last retake and missed by it (defensive): ask the store again
            self._lapsed = True
            if self._kick is not None:
                self._kick.set()

    def _watch(self) -> None:
        """Look at the hold when it runs out, and every probe while it is lapsed (a loop callback)."""
        self._watch_handle = None
        if not self._consumers or self._loop is None or self._superseded:
            return
        fresh = self._observe()
        if not fresh and self._cut_off():
            self._cut_running()
        if fresh and not self._lapsed:
            delay = self._renewed_at() + self._ttl() - time.monotonic() + 0.001
        else:
            delay = self._probe()
        self._watch_handle = self._loop.call_later(max(0.0, delay), self._watch)

    def _cut_running(self) -> None:
        """Cut off from the store past the hold: cancel the running jobs with rows, as a cut-off
        node does its runs (another node may be running them by now)."""
        cut = 0
        for task, kept in self._running.items():
            if kept.id is None or kept.cut or kept.epoch == self._epoch:
                continue
            kept.cut = True
            task.cancel()
            cut += 1
        if cut:
            log.warning(
                "queue %r: stopped %d job(s) whose hold ran out while the store was unreachable; they run "
                "again on the node the store gives them to (this one, if no other took them)", self.name, cut,
            )  # fmt: skip

    def node_superseded(self) -> None:
        """A later process registered under this node's id: the store counts this incarnation
        gone, and other nodes (that process first) take up every job it kept there at once.

        Starting any of them here would run it twice, so none starts here any more: waiting
        ones are given up, running ones cancelled (they run where they were taken up), and jobs
        put from now on are only written, for the others to take. Puts go on being accepted.
        """
        if not self._durable or self._superseded:
            return
        self._superseded = True
        # the hold is gone for good (no retake, no adoption): see _observe
        self._epoch += 1
        self._hold_ok = False
        with self._lock:
            waiting = [i for i in self._items if type(i) is _Kept]
            if waiting:
                self._items = deque(i for i in self._items if type(i) is not _Kept)
        given = len(waiting) + len(self._aside)
        self._aside.clear()
        cut = 0
        for task, kept in self._running.items():
            if not kept.lost:
                cut += _hand_over(task, kept)
        self.given_up += given
        for _ in range(given):
            self._wake_one(self._putters)
        if given or cut:
            log.warning(
                "queue %r: this process was replaced under its node id: %d waiting job(s) dropped here and "
                "%d running cancelled; the process that replaced it takes them up", self.name, given, cut,
            )  # fmt: skip
        self._maybe_idle()

    def _cut_short(self, kept: _Kept) -> None:
        """A job's handler ended on its cut: run it again where it is still held."""
        if kept.lost:
            self.given_up += 1  # it runs on the node that took it (the store counts that handover)
            return
        kept.attempt += 1
        # its cut is over: the next run of its handler ends as any other does (a failure counts as
        # one), not as a cut again, which would run it again at once, and so on without end
        kept.cut = False
        if kept.epoch == self._epoch and not self._lapsed:
            # the store said it is still this node's since: it runs again here
            with self._lock:
                self._items.appendleft(kept)
            self._work_arrived()
        else:
            self._aside[kept.id] = kept  # type: ignore[index]

    async def _retake(self) -> None:
        """After a lapse, once a heartbeat got through: ask the store which of its jobs this node
        still holds (taking up those of gone holders too), and start those only.

        Jobs set aside that another node took meanwhile are given up; a running job another
        node took is cancelled here (it runs there), as a run whose claim was lost.
        """
        async with self._store_lock:  # no write under way: every row this node wrote has its id here
            if not self._lapsed or self._abandon or not self._observe():
                return
            epoch = self._epoch
            jobs = await self._engine.store.adopt_jobs(self.name, self._engine.incarnation, own=True)
            self._store_trouble.succeeded()
            if epoch != self._epoch or not self._hold_ok or self._abandon:
                # lapsed again meanwhile (asked again once the store answers), or the stop counted
                # what was set aside: the rows stay this node's, for the next start
                return
            self._lapsed = False
            mine = {job.id: job for job in jobs}
            known: set[int] = set(self._handled)  # handled; their rows are deleted at the next write
            # handled here, their rows not deleted yet, and taken up by another node meanwhile: they
            # run there too (the handler's end came too late to say this node had them)
            twice = sum(1 for job_id in self._handled if job_id not in mine)
            lost = 0
            for task, kept in self._running.items():
                if kept.id is None:
                    continue
                known.add(kept.id)
                if kept.id in mine:
                    kept.epoch = epoch
                elif not kept.lost:
                    lost += _hand_over(task, kept)
            with self._lock:
                # written while the hold was lapsed: another node may have taken them at once
                gone = [i for i in self._items if type(i) is _Kept and i.id is not None and i.id not in mine]
                if gone:
                    self._items = deque(
                        i for i in self._items if not (type(i) is _Kept and i.id is not None and i.id not in mine)
                    )
                for item in self._items:
                    if type(item) is _Kept and item.id is not None:
                        item.epoch = epoch
                        known.add(item.id)
                back = [self._aside.pop(i) for i in sorted(self._aside) if i in mine]
                given = len(self._aside) + len(gone)
                self._aside.clear()
                for kept in back:
                    kept.epoch = epoch
                    known.add(kept.id)  # type: ignore[arg-type]
                new = [self._revive(job, epoch) for job in jobs if job.id not in known]
                self._items.extendleft(reversed(back))  # they were put first
                self._items.extend(new)
            self.adopted += len(new)
            self.given_up += given + twice
            for _ in range(len(back) + len(new)):
                self._work_arrived()
            for _ in range(given):
                self._wake_one(self._putters)
            if given or lost or twice:
                log.warning(
                    "queue %r: another node took up %d job(s) of this node while its hold was lapsed: %d set aside "
                    "dropped here, %d running cancelled here (they run there), %d handled here meanwhile (they may "
                    "run there a second time)", self.name, given + lost + twice, given, lost, twice,
                )  # fmt: skip
            self._maybe_idle()

    async def _call(self, ctx: TaskContext | None, job: Any) -> BaseException | None:
        """Await the handler on ``job``: None once it returned, else what it raised. A cancel of
        the consumer itself (a stop's, or a cut of a job whose hold was lost) is raised."""
        try:
            if ctx is None:
                await self.handler(job)
            else:
                await self.handler(ctx, job)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return asyncio.CancelledError("the job's handler was cancelled")
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a handler fails its job only
            return exc
        return None

    def _failed(self, job: Any, exc: BaseException | RunError, kept: _Kept | None) -> None:
        self.failed += 1
        if type(job) is _Unreadable:
            data: Any = job.text
        else:
            try:
                data = jsonable(job)
            except NotJsonSafe:
                data = safe_str(job, repr)  # mutated into something unserialisable since it was put
        error = exc if isinstance(exc, RunError) else RunError.from_exception(exc)
        self._engine.bus.emit(QueueJobFailed, queue=self.name, job=data, error=error)
        # after the event, and guarded: a raising log handler must not take the consumer down.
        # Never the job itself: its contents are the application's (secrets, personal data)
        # a row that holds no JSON is a job lost, not one its handler failed
        level = logging.ERROR if type(job) is _Unreadable else logging.WARNING
        if log.isEnabledFor(level):
            job_id = None if kept is None else kept.id
            delivery = "" if kept is None or kept.attempt == 1 else f" (delivery {kept.attempt})"
            log_safely(
                log, level, "queue %r: %s%s failed (a queue never retries a job): %s: %s%s",
                self.name, "a job" if job_id is None else f"job {job_id}", delivery,
                log_text(error.type), log_text(error.message), traceback_block(error),
            )  # fmt: skip

    # ------------------------------------------------------------ operator actions

    def pause(self) -> QueueInfo:
        """Stop the consumers taking jobs (those being handled finish); puts are still accepted."""
        if not self.paused:
            self.paused = True
            self._engine.bus.emit(QueuePaused, queue=self.name, depth=self.depth)
            self._maybe_idle()  # a stop draining it waits no more for the jobs left waiting
        return self.info()

    def resume(self) -> QueueInfo:
        """Let the consumers take jobs again."""
        if self.paused:
            self.paused = False
            for fut in self._getters:
                if not fut.done():
                    fut.set_result(None)
            if self._items and self._lost:
                self._replace_lost()
            self._engine.bus.emit(QueueResumed, queue=self.name, depth=self.depth)
        return self.info()

    async def purge(self) -> QueuePurge:
        """Drop every waiting job (jobs being handled finish); delete their rows from a durable store.

        Returns how many were dropped. Those include jobs another thread put
        before the purge (its ``put_nowait`` returned) whose handover to the
        engine's loop has not run yet: they were queued, and counted in the
        depth, as soon as their put returned.
        """
        if (home := self._elsewhere()) is not None:
            return await call_on(home, self.purge)
        async with self._store_lock:
            # no write is under way: a job has a row exactly when it has an id. Jobs landed
            # here are kept with no id yet, so the write below leaves them out (done)
            self._land()
            with self._lock:
                dropped = list(self._items)
                self._items.clear()
            kept = [item for item in dropped if type(item) is _Kept]
            stored = [item.id for item in kept if item.id is not None]
            unwritten = [item for item in kept if item.id is None]
            for item in unwritten:
                # the next write leaves it out, and so does a hand-over to the store should the
                # loop's teardown cut the delete below short (the delete may commit all the same,
                # SQLite's writer's does: the purge stands)
                item.done = True
            if stored:
                try:
                    await self._engine.store.done_jobs(stored)
                except asyncio.CancelledError:
                    raise
                except BaseException:
                    # the rows stay, so the jobs would come back at the next start: keep them queued
                    for item in unwritten:
                        item.done = False
                    with self._lock:
                        self._items.extendleft(reversed(dropped))
                    raise
        for _ in dropped:
            self._wake_one(self._putters)
        self.purged += len(dropped)
        self._maybe_idle()
        self._engine.bus.emit(QueuePurged, queue=self.name, purged=len(dropped), from_store=len(stored))
        return QueuePurge(queue=self.name, purged=len(dropped), from_store=len(stored), info=self.info())

    # ------------------------------------------------------------ waiting for idle

    @property
    def depth(self) -> int:
        return len(self._items) + len(self._transits)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _settled(self) -> bool:
        """Nothing waiting, landing from another thread, set aside or being handled."""
        return not self._items and not self._transits and not self._in_flight and not self._aside

    def _is_idle(self) -> bool:
        # a job the stopping engine refused work is not done: the stop's end answers the joins
        return not self._undone and self._settled()

    def _nothing_to_do(self) -> bool:
        """The consumers have nothing left to handle: nothing waiting (a paused queue's waiting
        jobs stay where they are) and nothing being handled."""
        if self._in_flight:
            return False
        return self.paused or (not self._items and not self._transits and not self._aside)

    def drained(self) -> asyncio.Future[None] | None:
        """For the engine's stop: a future of the running loop resolved once the consumers have
        nothing left to do (see :meth:`_nothing_to_do`), or None if they have nothing now, or
        there are none to do it. It may get work again afterwards: ask again."""
        if not self._consumers or self._nothing_to_do():
            return None
        fut = asyncio.get_running_loop().create_future()
        self._drain_waiters.append(fut)
        return fut

    def _maybe_idle(self) -> None:
        if self._drain_waiters and self._nothing_to_do():
            drains, self._drain_waiters = self._drain_waiters, []
            for fut in drains:
                _wake(fut)
        # a stop that cleared what was left is no drain: its end answers the joins
        if self._idle_waiters and self._is_idle() and not self._stop_answers_joins:
            with self._lock:
                waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                _wake(fut)
        elif self._idle_waiters and self._only_undone():
            with self._lock:
                waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                _wake(fut, self._undone_at_stop())

    def _only_undone(self) -> bool:
        """All that is left is jobs the stopping engine refused work (see ``_undone``): nothing
        here will do them before the next start, so a join waiting on them is told so now (a
        worker's cleanup awaiting it would otherwise hold the stop to its timeout)."""
        return bool(self._undone) and self._settled()

    def _undone_at_stop(self) -> StoppedBeforeDone:
        count = self._undone
        return StoppedBeforeDone(
            f"the {count} {'job' if count == 1 else 'jobs'} of queue {self.name!r} the stopping engine refused work",
            kept=self._durable,
        )

    def _idle_waiter(self) -> asyncio.Future[None] | None:
        """A future resolved once the queue is idle; None if it is now."""
        fut = asyncio.get_running_loop().create_future()
        # under the lock _maybe_idle takes the waiters by: a join on another loop before the
        # engine started (on a thread of its own) sees the queue go idle, or is woken by it
        with self._lock:
            if self._is_idle() and not self._stop_answers_joins:
                return None
            self._idle_waiters.append(fut)
        return fut

    async def join(self, timeout: float | None = None) -> None:
        """Wait until nothing is queued or in flight; ``TimeoutError`` after ``timeout``.

        Raises :class:`StoppedBeforeDone` if the engine stops (or stopped) with jobs
        of this queue left undone. With jobs not done while the engine is not started
        (new, or stopped: a start that failed leaves it so) and no start is under way, it
        raises :class:`EngineNotRunning` at once rather than wait for a start that may never
        come; the jobs stay queued for the next start. A start under way on the caller's
        loop is waited for, then the jobs. With nothing queued it returns at once, started
        or not; once the engine's loop closed under it, it raises :class:`EngineLoopClosed`.
        Awaited on another loop than the engine's, it
        waits on the engine's loop. :class:`InvalidConfiguration` for a ``timeout`` that
        is no number of seconds >= 0 (as ``RunHandle.wait``'s).
        """
        timeout = checked_timeout(f"queue {self.name!r} join()", timeout)
        if (home := self._elsewhere()) is not None:
            # the timeout kept here too: a blocked engine loop would not end the join it runs there
            async with asyncio.timeout(timeout):
                await call_on(home, self.join, timeout)
            return
        async with asyncio.timeout(timeout):
            # made while the engine runs: what the store holds is taken up by its start, which
            # is still to come (a start that failed is not waited for: the jobs put here are)
            await self._late_start()
            # a job arriving from another thread can land after the idle signal: re-check
            if self._engine.loop_lost:
                # its consumers ended with that loop, cutting what they held: nothing handles
                # the jobs any more, and a join that returned would say they were
                raise EngineLoopClosed()
            looked_again = False
            while (fut := self._idle_waiter()) is not None:
                if self._only_undone():
                    fut.cancel()
                    raise self._undone_at_stop()
                if not self._launched and self._engine.state in ("new", "stopped"):
                    starting = self._engine.starting
                    self._drop_idle_waiter(fut)
                    if starting is None:
                        if looked_again:
                            raise self._not_started()
                        # a start made in a task just before (an app's `async with engine:`)
                        # takes its first step on this turn: looked for once more after it
                        looked_again = True
                        await asyncio.sleep(0)
                        continue
                    # its launch comes at its end (a start that fails leaves the jobs here: the
                    # next turn raises); one under way on another loop (start_background()) is
                    # waited for there, where its future belongs
                    if starting.get_loop() is asyncio.get_running_loop():
                        await asyncio.wait([starting])
                    else:
                        await call_on(starting.get_loop(), asyncio.wait, [starting])
                    continue
                await fut
        if self._left_at_stop is not None:
            raise StoppedBeforeDone(*self._left_at_stop)

    def _drop_idle_waiter(self, fut: asyncio.Future[None]) -> None:
        """Take back a join's waiter it will not await (a failed join must not leave one behind)."""
        fut.cancel()
        with self._lock:
            if fut in self._idle_waiters:
                self._idle_waiters.remove(fut)

    def _not_started(self) -> EngineNotRunning:
        """What a join on jobs left is told while the engine is not started and no start is
        under way: it would wait for good, as nothing handles them before a start."""
        if self._engine.loop_lost:
            return EngineLoopClosed()  # it cannot start again: the advice below would be wrong
        state = self._engine.state
        left = self.depth + self._in_flight + len(self._aside)
        jobs, them, are = (f"{left} job", "it", "is") if left == 1 else (f"{left} jobs", "them", "are")
        return EngineNotRunning(
            state,
            f"queue {self.name!r} has {jobs} not done, and the engine is {state}: nothing handles "
            f"{them} before it starts, so join() would wait for good. Start the engine first "
            f"(`async with engine:` or `await engine.start()`), then join(); the {jobs} {are} "
            "kept for that start",
        )

    # ------------------------------------------------------------ lifecycle

    def info(self) -> QueueInfo:
        return QueueInfo(
            name=self.name,
            concurrency=self.concurrency,
            maxsize=self.maxsize,
            depth=self.depth,
            in_flight=self._in_flight,
            processed=self.processed,
            failed=self.failed,
            rejected=self.rejected,
            accepted=self.accepted,
            abandoned=self.abandoned,
            kept=self.kept,
            adopted=self.adopted,
            paused=self.paused,
            purged=self.purged,
            write_failures=self.write_failures,
            lost=self.lost,
            ignored_cancel=self.ignored_cancel,
            consumers_replaced=self.consumers_replaced,
            hold_lapses=self.hold_lapses,
            set_aside=len(self._aside),
            given_up=self.given_up,
        )

    def bind_loop(self, loop: asyncio.AbstractEventLoop, thread_id: int) -> None:
        """Take ``loop`` (run by thread ``thread_id``) as the engine's before the start has
        run there: calls from other threads are handed to it from now on, after the start."""
        self._loop, self._loop_thread = loop, thread_id

    def launch(self) -> None:
        """Start the consumer tasks on the running loop (sync: usable after engine start).

        On a durable store, jobs already queued here are written first; jobs
        left in the store by an earlier start are taken up by :meth:`start`.
        """
        if self._consumers:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._handing_over = False
        self._closing = self._abandon = self._stop_answers_joins = False
        self._left_at_stop = None
        self._lost = 0
        self._undone = 0
        self._keep_queued()
        if self._durable:
            self._keeper_stop = False
            self._kick = asyncio.Event()
            if self._unwritten:
                self._kick.set()
                if self._written is None:
                    self._written = loop.create_future()
            self._keeper = spawn(self._keep_loop(self._kick), name=f"taskwatch-queue-{self.name}-store")
            # at the keeper's end, however it ends: the loop's teardown cancels it with no stop
            self._keeper.add_done_callback(self._keeper_ended)
            self._hold_begins()
        held = [t for t in self.left_going if going_here(t)]
        self._consumers = [
            spawn(
                self._consume(self._generation, held[i] if i < len(held) else None),
                name=f"taskwatch-queue-{self.name}-{i}", context=self._work_context(),
            )
            for i in range(self.concurrency)
        ]
        if self._durable:
            self._watch_handle = loop.call_soon(self._watch)
        self._launched = True
        self._start_failed = False
        self._wake_launch_waiters()

    def _keep_queued(self) -> None:
        """Durable store: make the jobs put before the first start kept ones (queued for a write)."""
        if self._engine.durable and not self._durable:
            self._durable = True
            with self._lock:
                # jobs put before the start; those taken up from the store are kept already
                self._items = deque(job if type(job) is _Kept else self._keep(job) for job in self._items)

    async def start(self) -> None:
        """Start the queue; on a durable store, first take up the jobs the store holds for this
        node, and write the jobs put before the start: once the engine's start returns, a crash
        loses none of them (an ``await put()`` made before the start returns at once, its job
        unwritten: this write is what keeps it)."""
        self._start_failed = False
        taken: list[_Kept] = []
        try:
            if self._engine.durable and not self._consumers:
                self._hold_begins()
                stamp = self._stamp()
                # jobs an earlier start left (or queued and never ran) go first
                adopted = await self._engine.store.adopt_jobs(self.name, self._engine.incarnation, own=True)
                if self._handled:
                    # handled, and their rows not deleted yet (the stop could not): not run again
                    done = set(self._handled)
                    adopted = [job for job in adopted if job.id not in done]
                if adopted:
                    taken = [self._revive(j, stamp) for j in adopted]
                    with self._lock:
                        self._items.extendleft(reversed(taken))
                    self.adopted += len(taken)
                self._keep_queued()
                if self._unwritten:
                    # a write that fails fails the start (the engine's, or a late start tried again):
                    # the jobs stay queued here, written by the next start
                    await self._flush(deletes=False)
            self.launch()
        except BaseException:
            if taken:
                # still in the store: the next start takes them up again, with the rest (kept here
                # as well, each would run twice)
                again = set(map(id, taken))
                with self._lock:
                    self._items = deque(item for item in self._items if id(item) not in again)
                self.adopted -= len(taken)
            # puts and joins waiting for this start go on, not waiting for a launch that is not coming
            self._start_failed = True
            self._wake_launch_waiters()
            raise

    async def stop(self, deadline: float) -> None:
        """Drain until ``deadline`` (loop time), then cancel what is in flight and report the rest."""
        loop = asyncio.get_running_loop()
        landed = None
        with self._lock:
            self._closing = True
            if self._transits:
                landed = self._landed = loop.create_future()
        # a start still to come (made while the engine ran) is not coming any more
        self._wake_launch_waiters()
        if landed is not None:
            # jobs other threads put before the queue closed are on their way (the count cannot grow
            # any more): let them land, so they are handled, or counted below, like any other
            await asyncio.wait([landed], timeout=max(0.0, deadline - loop.time()) + 1.0)
        with self._lock:
            # a handover that has not come by now (its thread stalled) must not hang the stop: those
            # jobs are lost, counted and said so, and their late arrival is ignored
            stranded = len(self._transits)
            self._transits.clear()
        if stranded:
            log.error("queue %r: %d jobs put from other threads did not arrive before the stop; they are lost",
                      self.name, stranded)  # fmt: skip
        if self._consumers:
            # wake idle consumers so they see `_closing` and exit
            for fut in self._getters:
                if not fut.done():
                    fut.set_result(None)
            if self.paused:
                # nothing waiting is taken: only the jobs being handled get until the deadline
                await asyncio.wait(self._consumers, timeout=max(0.0, deadline - loop.time()))
            else:
                await self._wait_idle(deadline - loop.time())
        unlaunched_lost = await self._write_unlaunched() if self._keeper is None else None
        with self._lock:
            # jobs set aside by a lapse keep their rows: the next start (or another node) takes them up;
            # so do jobs whose handler the stopping engine refused work
            left = self.depth + self._in_flight + len(self._aside) + self._undone
            self._undone = 0
            # of those, jobs with no row yet: the last write below says whether they can have one
            unrowed = [k for k in (*self._items, *self._running.values()) if type(k) is _Kept and k.id is None]
            self._abandon = True
            self._items.clear()
            self._aside.clear()
        # joins waiting on what is left are answered below, once it is known whether it is
        # kept: not woken as if the queue had drained when its consumers are cancelled
        self._stop_answers_joins = True
        consumers, self._consumers = self._consumers, []
        self._launched = False
        for t in consumers:
            t.cancel()
        stuck = await self._await_consumers(consumers)
        if self._watch_handle is not None:
            self._watch_handle.cancel()
            self._watch_handle = None
        # a consumer still going belongs to no queue any more: its handler's end counts nothing
        self._generation += 1
        self._in_flight -= len(stuck)
        self.ignored_cancel += len(stuck)
        # with those an earlier stop left and still going: they hold slots at the next start too
        self.left_going = [*stuck, *(t for t in self.left_going if going_here(t))]
        self._running.clear()
        for fut in self._putters:
            _wake(fut)  # waiting producers re-check and raise EngineNotRunning
        lost = await self._stop_keeping(deadline)
        if lost is None:
            lost = unlaunched_lost
        with self._lock:
            # taken up from the store while the keeper was stopping: their rows stay for the next start
            left += len(self._items)
            self._items.clear()
        # changed after their put into something not JSON-safe: counted lost when their write was tried
        unstorable = sum(1 for k in unrowed if k.unstorable)
        kept = True
        if left or lost or stranded:
            self.abandoned += left + stranded
            if lost is not None:
                self.kept += max(0, left - lost - unstorable)
                self.lost += lost
            self.lost += stranded
            kept = lost == 0 and not stranded and not unstorable
            self._engine.bus.emit(QueueDrainIncomplete, queue=self.name, left=left + stranded, kept=kept)
        if left or stranded:
            count = left + stranded
            self._left_at_stop = (f"the {count} {'job' if count == 1 else 'jobs'} left in queue {self.name!r}", kept)
        self._stop_answers_joins = False
        with self._lock:
            joins, self._idle_waiters = self._idle_waiters, []
        for fut in joins:
            _wake(fut, None if self._left_at_stop is None else StoppedBeforeDone(*self._left_at_stop))

    async def _write_unlaunched(self) -> int | None:
        """A queue on a durable store that never launched (made while the engine ran, its start
        failed and not tried again yet) holds its jobs in no store: written at its stop, as a
        launched queue's keeper writes what is left. How many could not be (lost); None when
        the store keeps nothing."""
        if not self._engine.durable:
            return None
        self._keep_queued()
        if not self._unwritten:
            return 0
        try:
            await self._flush(deletes=False)
        except Exception as exc:  # noqa: BLE001 - said, and counted lost by the stop
            log.error("queue %r: its start never went through, and the stop could not write its %d job(s): %s",
                      self.name, len(self._unwritten), safe_str(exc))  # fmt: skip
            return len(self._unwritten)
        return 0

    async def _await_consumers(self, consumers: list[asyncio.Task[None]]) -> list[asyncio.Task[None]]:
        """Await the cancelled consumers, cancelling again those whose handler swallows the cancel;
        returns those still going after three rounds of ``cancel_grace`` (as the stop does runs)."""
        remaining = [t for t in consumers if not t.done()]
        grace = self._engine.cancel_grace
        for _ in range(3):
            if not remaining:
                return []
            _, pending = await asyncio.wait(remaining, timeout=grace)
            for t in pending:
                t.cancel()
            remaining = list(pending)
        if remaining:
            # a handler that ignores cancellation this long is a bug in that handler; waiting
            # for it forever would hang every caller of stop(), so say so and go on
            log.warning(
                "queue %r: %d handler(s) ignored cancellation for %.3g s and are still running: %s",
                self.name, len(remaining), 3 * grace, ", ".join(t.get_name() for t in remaining),
            )  # fmt: skip
        return remaining

    async def _stop_keeping(self, deadline: float) -> int | None:
        """Durable store: stop the keeper, then write what is still unwritten.

        Returns how many jobs could not be written (lost), or None without a
        durable store. The keeper finishes the write it is doing; a write is
        never cut short, even once ``deadline`` has passed (see :meth:`_flush`).
        """
        keeper, self._keeper = self._keeper, None
        if keeper is None:
            return None
        try:
            return await self._write_out(keeper, deadline)
        except asyncio.CancelledError:
            # the loop's teardown cut the stop short (a second Ctrl-C while it drains, a wait_for
            # around stop() running out): what it had not written is handed over, as a
            # teardown's with no stop is
            self.hand_over_unwritten()
            raise

    async def _write_out(self, keeper: asyncio.Task[None], deadline: float) -> int:
        """:meth:`_stop_keeping`'s work, once it has taken the keeper."""
        loop = asyncio.get_running_loop()
        self._keeper_stop = True
        if self._kick is not None:
            self._kick.set()
        await asyncio.wait([keeper], timeout=max(0.0, deadline - loop.time()))
        # past the deadline it may still be taking up jobs (cut short, they stay in the store for the next
        # start) or waiting for its write, which goes on and which the writes below wait for
        await cancel_and_wait(keeper)
        failure: Exception | None = None
        write = self._write_task
        while write is not None and not write.done():
            await asyncio.wait([write], timeout=max(0.0, deadline - loop.time()) + _STOP_DELETE_GRACE)
            if not write.done() and self._deleting:
                # held up deleting handled jobs (a store out of reach retries for its whole
                # reconnect_timeout), which no job depends on: given up, their rows stay and
                # they run again at the next start. A put of jobs is never cut short
                self._cut_write = write
                await cancel_and_wait(write)
        async with self._store_lock:
            pass  # a write another thread's put began meanwhile ends first
        # a store out of reach holds each write for its whole retry period: then only the jobs
        # that exist nowhere else are worth one (handled jobs whose rows stay just run again)
        deletes = self._engine.store.unreachable_since is None
        for _ in range(3):  # again for jobs that arrived from other threads during a write
            if not (self._unwritten or (deletes and self._handled)):
                break
            try:
                await self._flush(deletes)
            except Exception as exc:  # noqa: BLE001 - logged and counted below
                failure = exc
                break
        lost = [k for k in self._unwritten if not k.done]
        if lost:
            log.error(
                "queue %r: %d jobs could not be written to the store before the stop ended; they are lost",
                self.name, len(lost), exc_info=failure,
            )
        if self._handled:
            log.error(
                "queue %r: %d handled jobs could not be deleted from the store; they run again at the next start",
                self.name, len(self._handled), exc_info=failure,
            )
        self._unwritten, self._handled = [], []
        pending, self._written = self._written, None
        if pending is not None and not pending.done():
            pending.set_result(failure or EngineNotRunning("stopped"))
        return len(lost)

    async def _wait_idle(self, timeout: float) -> None:
        if timeout <= 0:
            return
        try:
            async with asyncio.timeout(timeout):
                # a job arriving from another thread can land after the wake-up: re-check
                while (fut := self.drained()) is not None:
                    await fut
        except TimeoutError:
            pass

    def __repr__(self) -> str:
        return f"<WorkQueue {self.name} depth={self.depth} in_flight={self._in_flight}>"


def _hand_over(task: asyncio.Task[None], kept: _Kept) -> bool:
    """A running job another node holds now: cancel it here (it runs there). Whether this
    cancelled it (a job already cut was cancelled before)."""
    kept.lost = True
    if kept.cut:
        return False
    kept.cut = True
    task.cancel()
    return True


def _retrieved(task: asyncio.Task[None]) -> None:
    """A write's failure is handled by whoever awaits it; this keeps asyncio from calling it unretrieved."""
    if not task.cancelled():
        task.exception()
