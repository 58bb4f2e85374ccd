"""The engine: registers tasks, admits runs into its store, answers queries, runs its loops.

One :class:`Engine` is the composition root. The
:class:`~taskwatch.engine.store.Store` owns every run row (in memory, or in a
SQLite or PostgreSQL database that outlives the process); the
:class:`~taskwatch.engine.index.RunIndex` is this node's bounded view of the
runs it knows (what the sync queries and dashboards read); the
:class:`~taskwatch.engine.execution.Execution` and its executor claim due runs
for this node's free slots, run their attempts and publish what happens. The
engine validates and admits submissions, answers queries, and starts and
stops the scheduler, queues, triggers, supervised workers and leadership.
``async with engine`` (or ``start()`` / ``stop()``) bounds its life: ``stop``
drains, then cancels, then awaits, so no asyncio task outlives it.
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import logging
import os
import reprlib
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Coroutine, Iterable, Mapping, Sequence
from threading import get_ident
from typing import TYPE_CHECKING, Any, Concatenate, Literal, ParamSpec, TypeVar, overload

from pydantic import BaseModel

from .bus import DEFAULT_REPLAY, EventBus
from .context import TaskContext
from .errors import (
    DuplicateRunId,
    DuplicateTask,
    EngineAlreadyRunning,
    EngineLoopClosed,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidKey,
    InvalidParams,
    InvalidSubmission,
    LoopThreadError,
    QueueFull,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    StoreUnavailable,
    UnknownQueue,
    UnknownTask,
    UnknownTrigger,
    shown,
)
from .events import (
    EngineStarted,
    EngineStopped,
    EngineStopping,
    NodeSuperseded,
)
from .execution import Execution, RunWait, checked_timeout
from .handle import RunHandle
from .health import HealthSampler
from .hop import (
    as_future, call_blocking, call_on, cancel_and_wait, current_loop, home_here, outside_work, refuse_in_fork, spawn,
    work_context,
    works_for,
)
from .index import (
    RunIndex,
    check_query,
    limit_problem,
    runs_limit_problem,
    since_problem,
    task_problem,
    wanted_statuses,
)
from .jsonsafe import check_run_key, name_problem
from .lease import LeaderElector, Leadership
from .memory_events import MemoryEventRelay, MemoryEventStream
from .nodeid import hold_default_node_id
from .options import EngineOptions, StopOptions, TaskOptions, check_option_names, check_options
from .postgres_events import PostgresEventRelay
from .queues import QueueInfo, QueuePurge, WorkQueue
from .redis_events import RedisEventRelay
from .relay import EventRelay
from .runs import (
    CancelReason,
    EngineStats,
    Run,
    RunList,
    RunRecord,
    RunStatus,
)
from .scheduler import PeriodicInfo, Scheduler
from .snapshot import Snapshot
from .store import (
    Inserted,
    NewRun,
    OnLost,
    Page,
    PostgresStore,
    Store,
    StoredRun,
    StoreError,
    make_store,
)
from .store.base import at_exit, gone_incarnations, new_run_id
from .supervisor import Supervisor, WorkerInfo
from .tasks import TaskFn, TaskInfo, TaskSpec, params_model_of, registered_name
from .triggers import Trigger, TriggerFire, TriggerState
from .trusted import float_clock
from .version import __version__
from .wakeups import StoreWakeups

if TYPE_CHECKING:
    from typing import Unpack

    from .triggers import TriggerKwargs

    # the edge layer, for annotations only: start_background() and serve() import it when called
    from .background import BackgroundEngine, BackgroundKwargs
    from .server import ControlServer, ServeKwargs

#: a decorated task or periodic function, handed back as it was so it keeps its own type
F = TypeVar("F", bound=TaskFn)
#: a decorated supervised worker: ``async def worker(ctx)``
W = TypeVar("W", bound=Callable[[TaskContext], Awaitable[Any]])

log = logging.getLogger("taskwatch.engine")

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_SUCCEEDED = RunStatus.SUCCEEDED
_FAILED = RunStatus.FAILED
_CANCELLED = RunStatus.CANCELLED

#: ``backend=`` values kept as aliases: both run on the store; inline makes submit wait
_BACKENDS = ("asyncio", "inline")
#: what a submit_many mapping may hold
_SUBMISSION_FIELDS = frozenset({"task", "params", "key"})

#: seconds a stop's store writes may go on retrying an unreachable store after its drain and cancel grace
_STOP_WRITE_GRACE = 1.0

#: what a DuplicateTask calls a task of each kind that holds the name
_KIND_NAMES = {"task": "task", "periodic": "periodic task", "trigger": "trigger's task"}

#: a queue's or trigger's late start that failed is tried again after this, doubling up to the max
_LATE_RETRY_FIRST, _LATE_RETRY_MAX = 0.5, 30.0

#: engines on a durable store started in this process and not stopped since (see
#: _hand_over_at_exit); held, not weakly: one only reference cycles hold once its loop is gone
#: would be collected with what it accepted
_running_engines: set[Engine] = set()


def _hand_over_at_exit() -> None:
    """The last chance for what an engine that never stopped accepted and did not write yet:
    a second Ctrl-C (any exception) out of the loop's teardown ends it before the
    teardown's own hand-over ran. The stores write out what this hands over right after
    (see store.base.at_exit). A Ctrl-C here is said and the hand-over goes on; a second
    one gives up."""
    interrupted = False
    for engine in list(_running_engines):
        for what, hand_over in engine._what_to_hand_over():
            while True:
                try:
                    hand_over()
                    break
                except KeyboardInterrupt:
                    if interrupted:
                        log.error("gave up handing what the engine accepted to the store (a second Ctrl-C): it is lost")
                        return
                    interrupted = True
                    log.warning(
                        "handing what the engine accepted to the store before the process exits "
                        "(Ctrl-C again gives up, and loses it)"
                    )
                except Exception:  # noqa: BLE001 - the others are handed over all the same
                    log.exception("%s could not be handed to the store as the process exited", what)
                    break


def _hand_over_before_exit(engine: Engine) -> None:
    _running_engines.add(engine)
    at_exit("hand over", _hand_over_at_exit)


#: the failed runs a snapshot carries however old (a dashboard's failures list holds as many)
SNAPSHOT_FAILURES = 200
#: a snapshot lists at most this many keys per trigger, the hottest (a dashboard shows as many)
SNAPSHOT_TRIGGER_KEYS = 500

#: seconds a read or loop action called from another thread waits for the engine's loop (a
#: ``BackgroundEngine`` call's default ``call_timeout``), and how often meanwhile it looks whether
#: the loop closed (a stop ending), which would never take the call up
_HOP_TIMEOUT = 60.0

_P = ParamSpec("_P")
_R = TypeVar("_R")


def _on_loop(method: Callable[Concatenate[Engine, _P], _R]) -> Callable[Concatenate[Engine, _P], _R]:
    """``method`` made on the engine's loop, its answer handed back, when called from another thread.

    The index, the memory store and the records of queues, triggers, workers and periodic tasks
    change on the engine's loop alone, and these methods walk them: walked from another thread (a
    notebook cell beside ``start_background()``) while the loop changes them, a dict raises
    "changed size during iteration", or the interpreter crashes. On the loop's thread (the
    dashboards', the server's and the facade's reads) the check is one comparison; with no loop
    running the call is made here.
    """

    @functools.wraps(method)
    def hopped(self: Engine, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if get_ident() == self._loop_thread:
            return method(self, *args, **kwargs)
        return self._hop(method.__name__, method, self, *args, **kwargs)

    return hopped


def _on_loop_async(
    method: Callable[Concatenate[Engine, _P], Coroutine[Any, Any, _R]],
) -> Callable[Concatenate[Engine, _P], Coroutine[Any, Any, _R]]:
    """``method`` awaited on the engine's loop when awaited on another (a notebook's beside
    ``start_background()``): its tasks, futures and locks are that loop's. As :func:`_on_loop`,
    on the engine's own loop (or with none running) it is awaited here."""

    @functools.wraps(method)
    async def hopped(self: Engine, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        loop = self._loop
        if loop is None or get_ident() == self._loop_thread or not loop.is_running():
            return await method(self, *args, **kwargs)
        self._refuse_in_fork()
        result: _R = await call_on(loop, method, self, *args, **kwargs)
        return result

    return hopped


def _answers() -> None:
    """A call that does nothing: the engine's loop taking it up is what is asked."""


def _cancel_recorded(run_id: str, request: asyncio.Future[Any]) -> None:
    if not request.cancelled() and (exc := request.exception()) is not None:
        log.warning("cancel of run %s: the request could not be recorded in the store (%s)", run_id, exc)


#: the longest run id of your own (``run_id_factory``), in UTF-8 bytes: ids travel in every
#: event and wire message, and a store indexes them
MAX_RUN_ID_BYTES = 256


def _checked_ids(factory: Callable[[], str]) -> Callable[[], str]:
    """``factory`` whose every id is checked before a run takes it: a non-empty str of printable
    text UTF-8 can encode, of at most :data:`MAX_RUN_ID_BYTES` (a store would put an id of its
    own in place of ``""``, keep ``42`` beside ``"42"``, and PostgreSQL cannot keep a NUL)."""

    def made() -> str:
        run_id = factory()
        problem = None
        if type(run_id) is not str:
            problem = f"it returned {shown(run_id)}, a {type(run_id).__qualname__}, where a run id is a str"
        elif not run_id:
            problem = "it returned an empty id"
        elif not run_id.isprintable():
            problem = f"it returned {shown(run_id)}, which holds a control character (a newline, a NUL, ...)"
        else:
            try:
                size = len(run_id.encode("utf-8"))
            except UnicodeEncodeError:
                problem = f"it returned {shown(run_id)}, which holds characters UTF-8 cannot encode"
            else:
                if size > MAX_RUN_ID_BYTES:
                    problem = f"it returned an id of {size} bytes in UTF-8, over the {MAX_RUN_ID_BYTES} a run id may have"
        if problem is not None:
            raise InvalidConfiguration(
                "Engine(run_id_factory=...)", [f"{problem}; nothing was queued: make it return unique, non-empty text"]
            )
        return run_id

    return made


def _on_lost(run: Run) -> OnLost:
    """What recovery does with ``run`` when its worker is lost (its task says; a run of a task
    this node does not know is retried)."""
    return run.spec.on_lost if run.spec is not None else "retry"


class Engine:
    """An asyncio background-task engine.

    Parameters
    ----------
    max_concurrency:
        Runs executing at once, across all tasks.
    max_queue:
        Runs waiting for a slot; ``submit`` raises :class:`QueueFull` beyond it.
        A durable store holds it across every process sharing it (the
        cluster's pending runs are counted when runs are written);
        ``submit_nowait`` checks this node's count at once and the store's
        when its batch is written.
    history:
        Finished runs kept, in the store and in the in-memory index the sync
        queries read; older ones are pruned oldest-finished first.
    retention:
        Seconds a finished run is kept in the store (None: no age limit).
        Pending and running runs are never pruned.
    store:
        Where runs live: ``"memory"`` (default: fastest, gone with the
        process), ``"sqlite:///path/to/file.db"`` (durable: queued, retrying
        and running runs survive ``kill -9`` and are recovered at the next
        start), ``"postgresql://user@host/db"`` (durable and shared: every
        node on the database draws from one queue and one history), or a
        :class:`~taskwatch.engine.store.Store` instance.
    backend:
        Kept as an alias: ``"asyncio"`` (the default behaviour) or
        ``"inline"`` (``submit`` returns only once the run has finished).
    node_id:
        This engine's name in events, claims and leader election. Keep it
        the same across restarts (default: host and app name): each start
        gets a fresh :attr:`incarnation`, and the previous incarnation's
        runs are recognised as orphaned and recovered at once.
    lease:
        Leader election for leader-only supervised workers: an
        :class:`~taskwatch.engine.InProcessLease`, a
        :class:`~taskwatch.engine.RedisLease` or a
        :class:`~taskwatch.engine.PostgresLease` (None: this node leads alone).
    events:
        Relays this node's events to every node and reads every node's back
        into :attr:`cluster`: ``"postgres"`` through the PostgreSQL store's
        database (or ``"postgresql://..."``, another one), ``"redis://host:6379/0"``
        through a capped Redis stream (needs redis-py, the ``redis`` extra),
        or a :class:`~taskwatch.engine.MemoryEventStream` shared by engines of
        this process; ``None`` (default) keeps them local.
    lease_ttl:
        Seconds a claim on a running run lives without a heartbeat; a run
        whose worker stops heartbeating for this long is recovered (default:
        the store's, 30 unless its URL or constructor says otherwise;
        heartbeats go out every third of it). Given here and differently to
        the store, it is refused.
    poll_interval:
        Seconds between two looks at a shared store for runs to claim when
        no notification came (a fallback: PostgreSQL notifies at once).
    resources:
        Named objects a periodic task ``requires=``, passed to it by name; a
        task whose needs are not all here is registered disabled, with the reason.
        Change them while the engine runs with :meth:`provide` and :meth:`withdraw`
        (``engine.resources`` is there to read).
    flags:
        Feature flags (strict bools) that ``opt_in=`` periodic tasks wait for;
        change one while the engine runs with :meth:`set_flag`.
    replay:
        Events the bus keeps for late subscribers (``subscribe(replay=N)``).
    cancel_grace:
        Seconds a cancelled running run gets to finish its cleanup.
    throughput_window:
        Seconds over which ``stats()`` measures runs finished per second.
    health_interval:
        Seconds between two health samples (CPU, RSS, loop lag) published as
        ``health`` events; None turns sampling off.
    clock:
        Wall clock (UNIX seconds) for every timestamp recorded; replace it to
        freeze time in tests and screenshots.
    run_id_factory:
        Makes run ids (default: 16 hex digits counting up from a random start); ids must be unique,
        non-empty printable text of at most 256 bytes in UTF-8: a submit whose id is not raises
        :class:`InvalidConfiguration` and queues nothing.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 8,
        max_queue: int = 10_000,
        history: int = 1_000,
        retention: float | None = None,
        store: str | Store = "memory",
        backend: str = "asyncio",
        node_id: str | None = None,
        lease: Any = None,
        events: str | MemoryEventStream | None = None,
        lease_ttl: float | None = None,
        poll_interval: float = 1.0,
        resources: dict[str, Any] | None = None,
        flags: dict[str, bool] | None = None,
        replay: int = DEFAULT_REPLAY,
        cancel_grace: float = 5.0,
        throughput_window: float = 10.0,
        health_interval: float | None = 1.0,
        clock: Callable[[], float] = time.time,
        run_id_factory: Callable[[], str] | None = None,
    ) -> None:
        check_options(
            EngineOptions,
            "the engine",
            max_concurrency=max_concurrency,
            max_queue=max_queue,
            history=history,
            retention=retention,
            replay=replay,
            lease_ttl=lease_ttl,
            poll_interval=poll_interval,
            cancel_grace=cancel_grace,
            throughput_window=throughput_window,
            health_interval=health_interval,
            flags=flags or {},
        )
        if resources is not None and not isinstance(resources, Mapping):
            raise InvalidConfiguration(
                "Engine()", [f"resources={resources!r}: a dict of resource name to resource is needed"]
            )
        # the names set_flag() and provide() would refuse: every event and snapshot naming a
        # flag or a missing resource carries them
        names = [("flag name", n) for n in flags or {}] + [("resource name", n) for n in resources or {}]
        if problems := [p for option, n in names if (p := name_problem(option, n)) is not None]:
            raise InvalidConfiguration("Engine()", problems)
        if backend not in _BACKENDS:
            raise InvalidConfiguration(
                "Engine",
                [f"backend={backend!r}: choose one of {', '.join(_BACKENDS)}, or pass store= for where runs live"],
            )
        if not isinstance(store, (str, Store)):
            # checked before the node id is held: a refused engine holds nothing
            raise InvalidConfiguration("Engine", [
                f"store={store!r}: pass 'memory' (the default), a URL such as 'sqlite:///path/to/file.db' or "
                "'postgresql://user@host/db', or a Store instance (SqliteStore(...), PostgresStore(...))"
            ])  # fmt: skip
        if node_id is not None and node_id != "":  # "" (an unset environment variable, say) means the default
            # every event, heartbeat, claim and log line names it: a NUL would make a PostgreSQL
            # store refuse the node's registration, and a non-str breaks every event
            problem = name_problem("node_id", node_id)
            if problem is not None:
                raise InvalidConfiguration("Engine", [problem])
        # the default is held for as long as this engine lives: a second copy of the program
        # running beside this one gets the next id, a restart after this one ends gets this one
        self.node_id = node_id or hold_default_node_id(self)
        self._default_id = node_id is None
        #: this start's identity: claims name it, so a restart can tell its old runs apart
        self.incarnation = os.urandom(8).hex()
        #: the process the id and the incarnation belong to (a fork makes new ones), and whether
        #: this incarnation has started already (a start after a stop makes a new one)
        self._pid = os.getpid()
        self._started_once = False
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.retention = retention
        self.cancel_grace = cancel_grace
        self.resources: dict[str, Any] = dict(resources or {})
        self.flags: dict[str, bool] = dict(flags or {})
        self.health_interval = health_interval
        clock = float_clock(clock)
        #: wall clock for every timestamp the engine records (replaceable for tests)
        self.clock = clock
        # the default's ids need no look; one of your own is checked as each run takes its id
        self._new_id = new_run_id if run_id_factory is None else _checked_ids(run_id_factory)
        self._inline = backend == "inline"
        self.bus = EventBus(node=self.node_id, replay=replay, clock=clock)
        self._store = self._store_for(store, clock, lease_ttl)
        #: the claims' lease, as the store keeps it (heartbeats go by it)
        self.lease_ttl = self._store.lease_ttl
        #: never changed in place (a definition replaces it, as it replaces _queues and _triggers):
        #: the loop walks it (snapshots, catalog()) while another thread defines a task
        self._tasks: dict[str, TaskSpec] = {}
        #: held while a task, queue or trigger is added: of two threads defining at once, neither's is lost
        self._defining = threading.RLock()
        self._limits: dict[str, int | None] = {}
        #: the run index: every run this node knows, pending and running ones always
        self._index = RunIndex(history, throughput_window)
        self._run = Execution(
            self,
            self._store,
            self._index,
            self._tasks,
            self._claim_limits,
            max_concurrency=max_concurrency,
            poll_interval=poll_interval,
            lease_ttl=self.lease_ttl,
            node_load=self._node_load,
            # a durable store may be shared: it checks the queue limit against every node's runs
            max_queue=max_queue,
        )
        self._index.set_evicted(self._run.evicted, self._run.prune_every)
        self._executor = self._run.executor
        self._executor.on_superseded = self._superseded
        #: the memory store, whose operations the hot path calls without coroutines; None for a durable store
        self._memory = self._run.memory
        self._durable = self._run.durable
        #: other nodes' inserts, cancels and finishes, pushed by a cluster store, wake the
        #: executor and bring this node's view of those runs up to date
        self._wakeups = StoreWakeups(self._store, self._executor, self._run.caught_up)
        self._state = "new"
        self._shutdown: asyncio.Task[None] | None = None
        #: the stop's drain: when it ends (loop time), and what a shorter stop asked sets, once
        #: that time has come, to end the waits for the runs and queues there (see hurry_stop)
        self._stop_deadline: float | None = None
        self._drain_cut: asyncio.Future[None] | None = None
        self._cut_timer: asyncio.TimerHandle | None = None
        #: what the stop's warning of runs left undone advises (stop()'s drain_advice, or a hurry's)
        self._drain_advice: str | None = None
        #: a stop() waits for the start under way before it sets its drain's end: a hurry_stop()
        #: made meanwhile (loop time, advice) is kept for that drain
        self._stops_waiting_start = 0
        self._early_hurry: tuple[float, str | None] | None = None
        #: a durable store's stop on a node alone on its store: no run pending here starts again
        #: before the next start, so a wait on one is answered at once (see :meth:`_keep_pending`)
        self._pending_kept = False
        #: a stop is draining the queues and runs: their own work (see :meth:`_require_running`) may
        #: still put into a queue and submit runs
        self._draining = False
        #: resolved once the start under way has ended (a second start() waits for it)
        self._starting: asyncio.Future[None] | None = None
        self._loop_thread: int | None = None
        #: the loop closed under the engine and stop() tidied up what was left (see loop_lost)
        self._loop_lost = False
        #: a start's open of the store while under way, and whether a stop gave it up
        self._opening: asyncio.Task[None] | None = None
        self._open_cut = False
        #: starts of queues and triggers made while the engine runs (a durable store's take
        #: reads and writes the store); the stop waits for them before stopping those
        self._late_starts: set[asyncio.Task[None]] = set()
        #: late starts that failed, waiting to be tried again
        self._late_retries: dict[WorkQueue | Trigger, asyncio.Task[None]] = {}
        self._started_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leader = LeaderElector(self, lease)
        #: the cluster-wide event relay (events=...), started first and stopped last
        self._relay = self._make_relay(events)
        self._scheduler = Scheduler(self, limits_changed=self._refresh_limits)
        self._queues: dict[str, WorkQueue] = {}
        self._triggers: dict[str, Trigger] = {}
        self._supervisor = Supervisor(self)
        self._health = HealthSampler(self, health_interval)
        # control endpoints listening on this engine (serve()'s, and any ControlServer started
        # on it: see keep_server); stopped last so clients see the shutdown
        self._servers: list[ControlServer] = []

    # ------------------------------------------------------------------ registry

    # bare ``@engine.task`` (or ``engine.task(fn, ...)``) hands back ``fn``; called with
    # options only, it hands back the decorator; either way the function keeps its type
    @overload
    def task(
        self,
        fn: F,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        concurrency: int | None = None,
        params: type[BaseModel] | None = None,
        backoff: float = 0.5,
        backoff_max: float = 60.0,
        description: str | None = None,
        on_lost: Literal["retry", "fail"] = "retry",
        replace: bool = False,
    ) -> F: ...

    @overload
    def task(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        concurrency: int | None = None,
        params: type[BaseModel] | None = None,
        backoff: float = 0.5,
        backoff_max: float = 60.0,
        description: str | None = None,
        on_lost: Literal["retry", "fail"] = "retry",
        replace: bool = False,
    ) -> Callable[[F], F]: ...

    def task(
        self,
        fn: F | None = None,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        concurrency: int | None = None,
        params: type[BaseModel] | None = None,
        backoff: float = 0.5,
        backoff_max: float = 60.0,
        description: str | None = None,
        on_lost: Literal["retry", "fail"] = "retry",
        replace: bool = False,
    ) -> F | Callable[[F], F]:
        """Register an ``async def task(ctx, params)`` function. Usable bare or with options.

        ``on_lost``: what recovery does with a run whose worker died mid-run:
        run it again (``"retry"``, the default; delivery is at-least-once, see
        ``ctx.attempt``), or fail it as ``WorkerLost`` (``"fail"``, for work
        that must not run twice).

        ``replace``: a task of that name already registered is redefined (a
        notebook cell run again): attempts started from now on run the new
        function with the new options; those under way finish on the old one.
        Without it a name taken raises :class:`DuplicateTask`.
        """

        def decorate(func: F) -> F:
            self.register(
                func,
                name=name,
                retries=retries,
                timeout=timeout,
                concurrency=concurrency,
                params=params,
                backoff=backoff,
                backoff_max=backoff_max,
                description=description,
                on_lost=on_lost,
                replace=replace,
            )
            return func

        return decorate(fn) if fn is not None else decorate

    def register(
        self,
        fn: TaskFn,
        *,
        name: str | None = None,
        retries: int = 0,
        timeout: float | None = None,
        concurrency: int | None = None,
        params: type[BaseModel] | None = None,
        backoff: float = 0.5,
        backoff_max: float = 60.0,
        description: str | None = None,
        kind: str = "task",
        resources: tuple[str, ...] = (),
        on_lost: Literal["retry", "fail"] = "retry",
        replace: bool = False,
    ) -> TaskSpec:
        task_name = registered_name(fn, name, kind)
        if (problem := name_problem("name", task_name)) is not None:
            raise InvalidConfiguration(f"{kind} {task_name!r}", [problem])
        self._refuse_taken(task_name, kind, replace)
        # its values, not the given ones, are kept: "5" is read as 5.0, as every option is
        opts = check_options(
            TaskOptions,
            f"task {task_name!r}",
            retries=retries,
            timeout=timeout,
            concurrency=concurrency,
            backoff=backoff,
            backoff_max=backoff_max,
            on_lost=on_lost,
        )
        model = None if kind == "periodic" else params_model_of(fn, params, task_name, resources)
        spec = TaskSpec(
            name=task_name,
            fn=fn,
            params_model=model,
            retries=opts.retries,
            timeout=opts.timeout,
            concurrency=opts.concurrency,
            backoff=opts.backoff,
            backoff_max=opts.backoff_max,
            kind=kind,
            resources=resources,
            description=description or (fn.__doc__ or "").strip().split("\n")[0],
            on_lost=on_lost,
        )
        with self._defining:
            taken = self._refuse_taken(task_name, kind, replace)  # (again: another thread may have defined it)
            if taken is not None:
                taken.replaced = True
            tasks = {**self._tasks, task_name: spec}
            # the executor's first: a run the new mapping lets a submit make finds its task there
            self._run.tasks = tasks
            self._tasks = tasks
            # here: of two definitions at once, the limits worked out last hold both tasks
            self._refresh_limits()
        return spec

    def _refuse_taken(self, name: str, kind: str, replace: bool) -> TaskSpec | None:
        """The task registered as ``name`` that a definition of ``kind`` may replace (None: none
        is); :class:`DuplicateTask` when one is there that it may not."""
        taken = self._tasks.get(name)
        if taken is not None and not (replace and taken.kind == kind == "task"):
            # a periodic task's, a queue's or a trigger's runs belong to a loop it drives: only
            # a plain task is redefined in place
            raise DuplicateTask(_KIND_NAMES.get(taken.kind, taken.kind), name, replaceable=taken.kind == kind == "task")
        return taken

    def _refresh_limits(self) -> None:
        # a task needing a resource this node lacks is left to the nodes sharing the store
        # that have it: claimed here, its run could only fail. A periodic task whose opt_in
        # flag is off here is turned off on this node: its runs already queued (or left in the
        # store by a stop) wait as well, for the flag or for a node where it is on. A new
        # mapping each time: the executor notices a change by identity
        have = self.resources
        opted_out = self._scheduler.opted_out()
        self._limits = {
            name: spec.concurrency
            for name, spec in self._tasks.items()
            if all(resource in have for resource in spec.resources) and name not in opted_out
        }

    def tasks(self) -> dict[str, TaskSpec]:
        """Registered tasks by name (read-only view)."""
        return dict(self._tasks)

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> str:
        """``new``, ``running``, ``stopping`` or ``stopped`` (also once its loop closed under
        it: see :attr:`loop_lost`)."""
        return "stopped" if self.loop_lost else self._state

    @property
    def history(self) -> int:
        """Finished runs kept in the store and the index (set it to keep more or fewer from now on).

        Safe to set from any thread: off the engine's running loop, the runs beyond a lowered
        count are let go there, a moment later."""
        return self._index.history

    @history.setter
    def history(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidConfiguration("the engine", [f"history={value!r}: a count of finished runs to keep (0 or more)"])
        # lowered, the runs beyond it go at once: runs(), get() and stats() must not show
        # runs the store prunes meanwhile. The index and the memory store are the loop's: from
        # another thread (a notebook cell beside start_background()) only the number is set
        # here, and the eviction is handed to the loop, where nothing iterates them meanwhile
        loop = self._loop
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            refuse_in_fork(loop)  # the trim handed over below would never run there
            self._index.history = value
            try:
                # trim, not set_history(value): a later setting made before this runs must stand
                loop.call_soon_threadsafe(self._index.trim)
                return
            except RuntimeError:
                pass  # closed meanwhile: nothing iterates them any more
        self._index.set_history(value)

    @property
    def store(self) -> Store:
        """Where this engine's runs live."""
        return self._store

    @property
    def durable(self) -> bool:
        """True when the store outlives the process (runs, queue jobs and trigger counts survive it)."""
        return self._durable

    @property
    def cluster(self) -> EventRelay | None:
        """Every node's events and a per-node summary (with ``events=...``), else None."""
        return self._relay

    @staticmethod
    def _store_for(store: str | Store, clock: Callable[[], float], lease_ttl: float | None) -> Store:
        """The store ``store`` names; ``lease_ttl`` given both here and to the store must agree."""
        if isinstance(store, str):
            made = make_store(store, clock=clock, **({} if lease_ttl is None else {"lease_ttl": lease_ttl}))
        else:
            made = store
        if lease_ttl is not None and made.lease_ttl != lease_ttl:
            raise InvalidConfiguration(
                "the engine",
                [f"lease_ttl={lease_ttl!r} but its store keeps claims for {made.lease_ttl!r} s; give it in one place"],
            )
        return made

    def _make_relay(self, events: str | MemoryEventStream | None) -> EventRelay | None:
        if events is None:
            return None
        if isinstance(events, MemoryEventStream):
            return MemoryEventRelay(events, self.bus)
        if events in ("postgres", "postgresql"):
            if not isinstance(self._store, PostgresStore):
                raise InvalidConfiguration("the engine", [
                    f"events={events!r} relays events through the run store's database, and this engine's "
                    f"store is {self._store.describe()}: use store='postgresql://...', or give events a "
                    "postgresql:// or redis:// URL"
                ])  # fmt: skip
            return PostgresEventRelay(self._store.url, self.bus)
        if isinstance(events, str) and events.startswith(("postgresql://", "postgres://")):
            return PostgresEventRelay(events, self.bus)
        if isinstance(events, str) and events.startswith(("redis://", "rediss://", "unix://")):
            return RedisEventRelay(events, self.bus)
        raise InvalidConfiguration("the engine", [
            f"events must be 'postgres' (the PostgreSQL store's own database), a postgresql:// URL, "
            f"a redis://, rediss:// or unix:// URL, or a MemoryEventStream; got {events!r}"
        ])  # fmt: skip

    @property
    def elector(self) -> LeaderElector:
        """The leader election this engine takes part in (who leads, the term, listeners)."""
        return self._leader

    def get_queue(self, name: str) -> WorkQueue:
        """The queue created with ``engine.queue(name, ...)``; :class:`UnknownQueue` (a
        ``LookupError``) naming the queues there are if there is none."""
        return self._queue_named(name)

    def get_trigger(self, name: str) -> Trigger:
        """The trigger created with ``engine.trigger(name, ...)``; :class:`UnknownTrigger` (a
        ``LookupError``) naming the triggers there are if there is none."""
        trigger = self._triggers.get(name)
        if trigger is None:
            raise UnknownTrigger(name, self._triggers)
        return trigger

    @property
    def backend(self) -> str:
        """``"inline"`` when ``submit`` waits for the outcome, else ``"asyncio"``."""
        return "inline" if self._inline else "asyncio"

    @property
    def started_at(self) -> float | None:
        return self._started_at

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine was started on (None before the first start)."""
        return self._loop

    @property
    def starting(self) -> asyncio.Future[None] | None:
        """The start under way, a future of its loop that its end resolves (None when no start is)."""
        return self._starting

    async def start(self) -> None:
        """Open the store, take back the runs a previous incarnation left, then start every loop.

        A second caller while a start is under way waits for that same start
        (and sees its error, if it fails). Awaited on another event loop than the one the
        engine runs or starts on (a notebook's, beside ``start_background()``), it raises
        :class:`EngineAlreadyRunning` and starts nothing.
        """
        if self.loop_lost:
            raise EngineLoopClosed()
        starting = self._starting
        if starting is not None and starting.get_loop() is not asyncio.get_running_loop():
            raise EngineAlreadyRunning("starting")
        if self._state == "running":
            self._refuse_in_fork()
            if self._loop is not asyncio.get_running_loop():
                # its tasks and futures are that loop's: none of them would serve this one
                raise EngineAlreadyRunning(self._state)
            return
        if self._state == "stopping":
            raise EngineNotRunning("stopping")
        if self._starting is not None:
            await asyncio.shield(self._starting)
            return
        starting = self._starting = asyncio.get_running_loop().create_future()
        try:
            await self._start()
        except BaseException as exc:
            starting.set_exception(exc if isinstance(exc, Exception) else EngineNotRunning("not started"))
            starting.exception()  # nobody else may be waiting: retrieved, not logged as lost
            raise
        else:
            starting.set_result(None)
        finally:
            self._starting = None

    async def _start(self) -> None:
        self._loop = self.bus.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        home_here(self._loop)
        forked = self._pid != os.getpid()
        if forked:
            # built before a fork (a web server preloading the app): each forked copy starting
            # here is a process of its own, and two processes under one incarnation would each
            # take the other's runs for its own. A default id is the parent's too: it holds one
            self._pid = os.getpid()
            if self._default_id:
                self.node_id = self.bus.node = self._executor.node = hold_default_node_id(self)
        if forked or self._started_once:
            # started again, it is a new incarnation as a new process is: the previous one's runs
            # are then orphaned at once, whatever its stop could or could not write
            self.incarnation = self._executor.incarnation = os.urandom(8).hex()
        self._started_once = True
        # before the store's recovery, which counts the runs it settles: every total is this start's
        self._index.new_start()
        self._refresh_limits()  # resources may have been added since the tasks registered
        # what runs execute in: everything they start is the engine's own work (see _require_running)
        self._run.base_context = work_context(self)
        await self._open_store()
        try:
            registered_at = time.monotonic()  # sent from here on: the store's clock reads no earlier
            await self._store.register_node(self.node_id, self.incarnation, __version__)
            # runs held by this node's previous incarnation are provably orphaned now
            recovered = await self._store.recover()
            await self._load_index()
        except BaseException:
            await self._store.close()
            raise
        self.bus.reopen()
        self._state = "running"
        if self._durable:
            _hand_over_before_exit(self)
        self._started_at = self.clock()
        self.bus.emit(EngineStarted, backend=self._store.name)
        if recovered:
            await self._run.on_recovered(recovered)
        self._executor.start(registered_at)
        started: list[Any] = []
        try:
            for service in self._services_in_start_order():
                await service.start()
                started.append(service)
        except BaseException:
            deadline = self._loop.time() + 1.0
            for service in reversed(started):
                await service.stop(deadline)
            await self._executor.stop()
            await self._store.close()
            self._state = "stopped"
            _running_engines.discard(self)
            self.bus.close()
            raise
        self._store.started()

    async def _open_store(self) -> None:
        """Open the store as a task a stop may cut: until it is open nothing has started, so a
        stop meanwhile need not wait past its own timeout for a server that does not answer (or
        a file another process holds locked); the start then raises :class:`EngineNotRunning`."""
        opening = self._opening = spawn(self._store.open(), name="taskwatch-store-open")
        try:
            await opening  # (a cancel of the start's caller cancels the open with it)
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if self._open_cut and (me is None or not me.cancelling()):
                raise EngineNotRunning(
                    "stopped",
                    f"engine.stop() was called while the engine was opening its store ({self._store.describe()}), "
                    "so the open was given up and nothing was started; start it again to go on",
                ) from None
            raise
        finally:
            self._opening = None
            self._open_cut = False

    def _cut_open(self) -> None:
        """A stop during a start, past its timeout: give up the store's open if still under way."""
        opening = self._opening
        if opening is not None and not opening.done():
            self._open_cut = True
            opening.cancel()

    async def _load_index(self) -> None:
        """Fill the run index from the store: its recent history and everything unfinished."""
        if not self._durable:
            return  # a memory store starts empty with its engine
        # a restart of this engine object: the store is the truth, start the index over
        self._index.clear()
        self._run.forget_claims()
        # every unfinished run (the index always holds them all), page by page, and apart
        # from them the newest `history` finished ones: one query across statuses would let
        # unfinished runs use up the history's quota. Pending before running: a run claimed
        # between the two reads shows in both (the later read wins), never in neither
        # Each page becomes index entries at once (its rows, read for this alone, handed
        # over as they are): only one page of rows is held at a time, not every row
        # beside every entry made from it
        tasks = self._tasks
        unfinished: dict[str, Run] = {}
        for status in (RunStatus.PENDING, RunStatus.RUNNING):
            before: str | None = None
            while True:
                page = await self._store.query(status=status.value, limit=10_000, before=before)
                for stored in page.runs:
                    unfinished[stored.id] = Run.from_record(stored, tasks.get(stored.task), own=True)
                if page.next is None:
                    break
                before = page.next
        finished: list[StoredRun] = []
        if self.history > 0:
            for status in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED):
                page = await self._store.query(status=status.value, limit=self.history)
                finished.extend(page.runs)
            finished.sort(key=lambda r: (r.finished_at or 0.0, r.seq), reverse=True)
            del finished[self.history :]
            for stored in finished:
                unfinished.pop(stored.id, None)  # it finished while the reads went on
        runs = [*unfinished.values(), *(Run.from_record(r, tasks.get(r.task), own=True) for r in finished)]
        runs.sort(key=lambda run: run.created_at)
        for run in runs:
            self._index.add(run)
        await self._tell_of_runs_left_waiting(runs)

    async def _tell_of_runs_left_waiting(self, records: list[Run]) -> None:
        """Say so when pending runs in the store are of tasks this node does not run (a task
        removed from the code, or missing a resource): they wait until a node runs them."""
        waiting = Counter(r.task for r in records if r.status is RunStatus.PENDING and r.task not in self._limits)
        if not waiting:
            return
        now = self._store.clock()
        gone = gone_incarnations(nodes := await self._store.nodes(), now, self._store.node_ttl)
        others = [n for n in nodes if n.incarnation != self.incarnation and n.incarnation not in gone]
        # on a store other live nodes share, those may run them: worth a line, not a warning
        log.log(
            logging.INFO if others else logging.WARNING,
            "%d pending run(s) in %s are of tasks node %s does not run (%s): they wait for a node "
            "that registers the task (with the resources it requires, and its opt_in flag on); "
            "register it, or cancel them",
            sum(waiting.values()), self._store.describe(), self.node_id,
            ", ".join(f"{task!r}: {n}" for task, n in waiting.most_common()),
        )

    def _services_in_start_order(self) -> list[Any]:
        # leadership first so leader-only workers see the outcome of the first
        # election; the scheduler last so nothing it submits finds a half-started engine
        return [
            *([self._relay] if self._relay is not None else []),
            self._leader,
            self._health,
            self._wakeups,
            *self._queues.values(),
            *self._triggers.values(),
            self._supervisor,
            self._scheduler,
        ]

    async def stop(self, timeout: float = 10.0, *, drain_advice: str | None = None) -> None:
        """Stop accepting work, drain for up to ``timeout`` seconds, cancel the rest, await all.

        The queues and the runs drain together: until the timeout nothing closes while one of
        them still works, and the engine's own work (a queue's handler, a run, what either
        starts, a trigger's fire) may still put into its queues and submit runs meanwhile, so a
        pipeline drains through; callers outside the engine are refused at once. A durable
        store's stop starts no pending run, so there a submit is refused to that work too, and
        the handler or run that made it is cut short and kept for the next start.

        With a durable store, pending runs stay queued for the next start, and
        runs cut short by the stop are put back to pending; with the memory
        store they end ``cancelled`` with ``cancel_reason="shutdown"``, and a
        warning says how many. ``drain_advice`` is what that warning advises in place
        of giving stop() time to drain them (the background engine's stop at
        interpreter exit says why its drain was short, and how to make it longer).

        The shutdown runs as one task of the engine's own: a second caller waits
        for the same shutdown, and a caller that is itself cancelled does not
        leave the engine half stopped. A ``timeout`` that is no finite number of
        seconds >= 0 raises :class:`InvalidConfiguration` before anything stops. Awaited on
        another event loop than the running one the engine is started (or starting, or
        stopping) on, it raises :class:`LoopThreadError` and stops nothing. Awaited by the
        engine's own work (a run, a queue's handler, a task either started), it starts the stop
        and returns at once: the stop drains that work as any other, so it cannot wait for its end.
        During a start it waits for that start, then stops what it started; a start still opening
        its store when ``timeout`` has passed is given up instead (it raises
        :class:`EngineNotRunning`): nothing has started yet, and a store that does not answer
        would otherwise hold the stop for as long as its own timeouts.
        """
        timeout = check_options(StopOptions, "Engine.stop()", timeout=timeout).timeout
        if self.loop_lost:
            if not self._loop_lost:
                await self._tidy_after_loop_lost()
            return
        self._require_own_loop_to_stop()
        starting = self._starting
        if starting is not None:
            # stop what is being started, once it is (a start that fails leaves nothing to stop)
            self._stops_waiting_start += 1
            try:
                if not (await asyncio.wait([starting], timeout=timeout))[0]:
                    # one still opening its store by the stop's timeout has started nothing: that
                    # open (a server that does not answer, a file another process holds locked)
                    # is given up rather than waited for past the time the stop was given
                    self._cut_open()
                    await asyncio.wait([starting])
            finally:
                self._stops_waiting_start -= 1
                early = self._early_hurry
                if not self._stops_waiting_start:
                    self._early_hurry = None  # (a stop cancelled meanwhile leaves none behind)
        else:
            early = None
        if self._state in ("new", "stopped"):
            return
        if self._shutdown is None:
            self._state = "stopping"
            self._draining = True
            # set now, not at the shutdown's first step: a hurry_stop() in between must find them
            loop = asyncio.get_running_loop()
            self._stop_deadline = loop.time() + max(0.0, timeout)
            self._drain_cut = loop.create_future()
            self._drain_advice = drain_advice
            if early is not None:
                self._hurry_to(*early)
            # not in the caller's context: a stop a run asked for is not that run's own work
            self._shutdown = spawn(self._stop(timeout), name="taskwatch-shutdown", context=outside_work())
        if works_for(self):
            # asked by the engine's own work (a run, a queue's handler, what either started): the
            # stop drains that work too, so awaiting its end here would wait for itself until the
            # timeout cut it short
            return
        await asyncio.shield(self._shutdown)

    @property
    def loop_lost(self) -> bool:
        """True once the event loop the engine was started on has closed under it, without
        :meth:`stop` (an ``asyncio.run()`` that returned): its loops and runs ended with that
        loop. Work is then refused with :class:`EngineLoopClosed`, :meth:`stop` tidies up what is
        left, and the engine cannot start again."""
        if self._loop_lost:
            return True
        loop = self._loop
        return self._state in ("running", "stopping") and loop is not None and loop.is_closed()

    async def _tidy_after_loop_lost(self) -> None:
        """The part of a stop that needs no loop of the engine's: its store closed (its thread
        joined), its subscribers told the bus has ended. What the store holds stays there: a
        durable store's next start (another Engine's, or another process's) takes back the runs
        this one had, as after a crash."""
        self._loop_lost = True
        closed = "its store's close was cut short"
        try:
            await self._store.close()
            closed = "its store is closed now"
        except Exception as exc:  # noqa: BLE001 - a store tied to the closed loop may not close from another
            closed = f"its store could not be closed from this loop ({type(exc).__name__}: {exc}); it closes with the process"
        finally:
            log.warning(
                "engine %s: the event loop it was started on closed without engine.stop(), and its runs and "
                "loops ended with it; %s. Keep an engine on one loop for its life (`async with engine:` "
                "inside the one asyncio.run()); build a new Engine to go on",
                self.node_id, closed,
            )
            self._state = "stopped"
            _running_engines.discard(self)
            self._draining = False
            try:
                self.bus.close()
            except RuntimeError:
                pass  # a subscriber's waiter belonged to the closed loop: it ended with that loop

    @_on_loop
    def hurry_stop(self, timeout: float, *, drain_advice: str | None = None) -> None:
        """End the drain of the stop under way within ``timeout`` seconds from now, if that is
        sooner than its own timeout (a second ``stop()`` only waits for the one under way).

        For a stop that must end sooner than it was asked to (a Jupyter kernel's shutdown after
        an interrupted ``bg.stop(60)``): the waits for the runs and queues to finish end then,
        and what is left is cut short as at the end of any drain (put back to pending on a
        durable store, ended cancelled with the memory store). From another thread it is made
        on the engine's loop. Made while the stop waits for a start under way, it holds for the
        drain that follows. It does nothing when no stop is under way, and raises
        :class:`InvalidConfiguration` for a ``timeout`` that is no finite number of seconds >= 0.
        ``drain_advice`` replaces the stop's own in its warning of runs left undone (see
        :meth:`stop`): the hurry is why they were.
        """
        timeout = check_options(StopOptions, "Engine.hurry_stop()", timeout=timeout).timeout
        loop = self._loop
        if loop is None:
            return
        sooner = loop.time() + timeout
        if self._stop_deadline is None:
            if self._stops_waiting_start:
                early = self._early_hurry
                if early is None or sooner < early[0]:
                    # as on a drain: a hurry that gives no advice leaves the one given before
                    if drain_advice is None and early is not None:
                        drain_advice = early[1]
                    self._early_hurry = (sooner, drain_advice)
            return
        self._hurry_to(sooner, drain_advice)

    def _hurry_to(self, sooner: float, drain_advice: str | None) -> None:
        """End the drain under way at ``sooner`` (loop time), if that is before its own end."""
        loop, ends = self._loop, self._stop_deadline
        if loop is None or ends is None or self._drain_cut is None or self._drain_cut.done():
            return
        if sooner >= ends:
            return
        self._stop_deadline = sooner
        if drain_advice is not None:
            self._drain_advice = drain_advice
        if self._cut_timer is not None:
            self._cut_timer.cancel()
        self._cut_timer = loop.call_at(sooner, self._cut_drain)

    def _cut_drain(self) -> None:
        self._cut_timer = None
        if self._drain_cut is not None and not self._drain_cut.done():
            self._drain_cut.set_result(None)

    async def _until_drain_cut(self, drain: Coroutine[Any, Any, None], name: str) -> None:
        """Await ``drain`` (a wait for work to finish), ended early by :meth:`hurry_stop`."""
        cut = self._drain_cut
        task = spawn(drain, name=name)
        try:
            await asyncio.wait([task] if cut is None else [task, cut], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                await cancel_and_wait(task)
        if not task.cancelled():
            task.result()

    def _require_own_loop_to_stop(self) -> None:
        """Refuse a stop awaited on another loop than the engine's, while that one runs it.

        The shutdown is a task of the engine's loop, cancelling that loop's tasks and awaiting
        its futures: made from another loop it fails half way, leaving the engine "stopped"
        with its loops still going. Not hopped there either: an engine that a
        ``BackgroundEngine`` runs stops with the facade, which ends its thread as well.
        """
        loop = self._loop
        if loop is None or loop is current_loop() or not loop.is_running():
            return
        if self._state in ("new", "stopped") and self._starting is None:
            return  # nothing to stop (a stopped engine's loop may still be ending)
        self._refuse_in_fork()
        raise LoopThreadError(
            "stop",
            f"Engine.stop() was awaited on another event loop than the engine's, which runs in another "
            f"thread; nothing was stopped (the engine is {self._state}). An engine started with "
            "start_background() stops with `bg.stop()` (`await bg.astop()` from an event loop); "
            "one started with `await engine.start()` on a loop of its own stops on that loop",
        )

    async def _stop(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        assert self._stop_deadline is not None  # (set by stop(), which made this task)
        deadline = self._stop_deadline
        # a stopping node cannot start leader-only work: were it to take the lease, no node
        # would do that work until its stop ended
        self._leader.stop_competing()
        done = False
        try:
            self.bus.emit(
                EngineStopping,
                timeout=timeout,
                pending=self._index.counts[_PENDING],
                running=self._index.counts[_RUNNING],
            )
            # producers stop first, so the drains below have a fixed amount of work. Supervised
            # workers (feeding queues, triggers and runs) are cancelled before anything here
            # awaits: none goes on into the stop to have its puts refused (and be restarted after
            # that "crash"); their cleanup gets up to the deadline, queues and runs still going
            # meanwhile (a cleanup may wait for what it fed). Then the periodic scheduler
            self._supervisor.halt()
            retries = list(self._late_retries.values())
            self._late_retries.clear()
            for retry in retries:
                await cancel_and_wait(retry)
            await self._scheduler.stop(deadline)
            await self._supervisor.stop(deadline)
            # its leader-only work has ended: let another node lead while this one drains its
            # queues and runs (a queue's handler or a run calling ctx.ensure_leader() from here
            # on is told it does not lead). Leader-only code that ignored every cancel still
            # runs: handed over now, the lease would let another node's copy run beside it;
            # left to lapse, it buys that code its ttl
            still = self._supervisor.leader_only_running()
            if still and self._leader.is_leader:
                log.warning(
                    "node %s stops while leader-only worker(s) %s still run (they ignored every cancel): "
                    "the lease is left to lapse at the end of its ttl rather than handed over now",
                    self.node_id, ", ".join(still),
                )
            await self._leader.resign(loop.time() + 1.0, release=not still)
            if self._late_starts:
                # a queue or trigger still taking up what the store holds: let it, or it would
                # stop before it started
                await asyncio.wait(self._late_starts, timeout=max(0.0, deadline - loop.time()))
                for late in list(self._late_starts):
                    await cancel_and_wait(late)
            # A network that drops packets holds a call to the store (a look for gone nodes' keys
            # or jobs, a rollback) without end, where an outage holds it for the store's retry
            # period: until the writes of what exists nowhere else are done, every call gives up
            # past that period after the drain and the cut runs' cleanup (the cut runs get up to
            # three rounds of cancel_grace: Execution.await_tasks), so those writes still wait out
            # an outage as long as any write does, and nothing waits for ever
            past_drain = max(0.0, deadline - loop.time()) + 3 * self.cancel_grace + _STOP_WRITE_GRACE
            retry_period = self._store.retry_period
            if retry_period is not None:
                self._store.give_up_after(time.monotonic() + past_drain + retry_period)
            # snapshots: a queue or trigger made meanwhile (by a run still draining) is not
            # started, so there is nothing of it to stop. A trigger's sweeps end here; what its
            # runs ending (or a handler's notifies) bring due meanwhile fires while the drain lasts
            for trigger in list(self._triggers.values()):
                await trigger.stop(deadline, saved_again=True)  # (by the save below, after the drain)
            if self._durable:
                # what is queued waits in the store for the next start; what runs is seen through.
                # Claims end before the drain: a run cut short meanwhile (refused a submit) goes
                # back to pending, and must not be claimed again here, over and over
                self._executor.stop_claiming()
                await self._keep_pending(deadline)
            # the queues and the runs drain together: a handler may put into another queue or
            # submit a run, a run may put into a queue, so none is done while another still works
            await self._until_drain_cut(self._drain(deadline), "taskwatch-stop-drain")
            deadline = min(deadline, self._stop_deadline)  # (a stop that hurried this one)
            # side by side: each cuts its handlers and gives them their rounds of cancel_grace, and
            # one after another a stubborn handler in each queue held the stop that long again
            await asyncio.gather(*(queue.stop(deadline) for queue in list(self._queues.values())))
            if self._durable:
                await self._executor.flush()
            # the writes of what exists nowhere else (queued jobs, runs not written yet, trigger
            # counts) are done: what is left (outcomes, the cut runs put back, the node's end)
            # gives up past the drain, the cut runs' cleanup and a moment, and what it leaves
            # undone is recovery's to do
            give_up = time.monotonic() + max(0.0, deadline - loop.time()) + 3 * self.cancel_grace + _STOP_WRITE_GRACE
            self._store.give_up_after(give_up)
            # (what the runs still do when there is no queue, or past the deadline)
            await self._until_drain_cut(self._drain_runs(deadline), "taskwatch-stop-runs")
            self._draining = False  # from now on their own work is refused as any caller's
            self._executor.stop_claiming()
            cancelled_pending = 0
            if not self._durable:
                cancelled_pending = await self._cancel_pending("shutdown")
            tasks = self._run.cut_running("shutdown")
            self._run.give_up(await self._run.await_tasks(tasks))
            if not self._durable and (cancelled_pending or tasks):
                # work a caller was promised is gone (a script ending with no stop() of its own
                # gets this one at exit): never silently
                log.warning(
                    "engine %s stopped with %d pending and %d running run(s) not done: they ended "
                    "cancelled (shutdown), and the memory store keeps nothing across a stop; %s, or use "
                    "a SQLite store to keep them for the next start",
                    self.node_id, cancelled_pending, len(tasks), self._drain_advice or "give stop() time to drain them",
                )
            # what the drained queues and the runs notified after the triggers' own stop saved
            # (a queue's handler notifying a trigger) would be lost at the next start otherwise
            for trigger in list(self._triggers.values()):
                await trigger.save_changes()
            self._store.give_up_after(min(give_up, time.monotonic() + _STOP_WRITE_GRACE))
            await self._executor.stop()
            await self._wakeups.stop()
            await self._run.await_writes()
            await self._leader.stop(loop.time() + 1.0)
            await self._health.stop(loop.time())
            self.bus.emit(EngineStopped, cancelled_pending=cancelled_pending, cancelled_running=len(tasks))
            if self._relay is not None:
                await self._relay.stop(loop.time() + 1.0)
            # side by side: each gives its slow readers up to a second to take their last lines
            await asyncio.gather(*(server.stop() for server in self._servers))
            self._servers.clear()
            try:
                await self._store.node_stopped(self.incarnation)
            except StoreError as exc:
                # the stop itself is done; the others tell this incarnation is gone once it
                # has been silent for node_ttl instead of at once
                log.warning("could not tell the store that node %s stopped: %s", self.node_id, exc)
            done = True
        finally:
            self._draining = False
            self._pending_kept = False
            if not done:
                # cut short (the loop's teardown cancels this task: a second Ctrl-C, a wait_for
                # around stop() running out): the queue jobs and runs accepted and not written yet
                # exist nowhere else; handed to the store before it closes, a store that writes
                # what it was handed (SQLite's writer) keeps them for the next start. The engine's
                # loops and tasks ended with that loop half stopped: it cannot start again, as
                # one whose loop closed with no stop cannot
                self._loop_lost = True
                log.warning(
                    "engine %s: its stop was cut short by the end of its event loop (a Ctrl-C while it "
                    "drained?): runs it had not put back are left to recovery at the next start, and what it "
                    "had not written was handed to the store; it cannot start again: build a new Engine",
                    self.node_id,
                )
                for _, hand_over in self._hand_overs():
                    hand_over()
            try:
                await self._store.close()
            finally:
                self.bus.close()
                self._state = "stopped"
                _running_engines.discard(self)
                self._shutdown = None
                self._stop_deadline = self._drain_cut = self._drain_advice = None
                if self._cut_timer is not None:
                    self._cut_timer.cancel()
                    self._cut_timer = None
                self._run.stopped_before_done()
                for trigger in self._triggers.values():
                    trigger.engine_stopped()

    async def _drain_runs(self, deadline: float) -> None:
        """Until ``deadline`` (loop time), wait for this node's runs to finish; a run's end may bring
        on another (a trigger's key due again fires a turn after its run's end event)."""
        loop = asyncio.get_running_loop()
        while await self._run.wait_idle(deadline - loop.time()):
            await asyncio.sleep(0)  # a bare yield: what the last end scheduled is taken up
            if not self._run.local_work():
                break

    async def _keep_pending(self, deadline: float) -> None:
        """A durable store's stop, which claims no more runs: when no other node is alive on the
        store to take them up, no run pending here starts before the next start. Whoever waits on
        one hears so now (:class:`StoppedBeforeDone`, kept), not at the stop's end: a queue's
        handler awaiting a run it had submitted held the drain to its timeout, and was cut short
        then all the same. With another node alive the waits go on: it may run them meanwhile."""
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return  # no drain to spare a wait: the stop's end answers them
        try:
            # (bounded: a store out of reach or locked by another process says nothing in time)
            nodes = await asyncio.wait_for(self._store.nodes(), min(1.0, left))
        except (StoreError, TimeoutError) as exc:
            log.debug("node %s stops without knowing whether another node takes up its pending runs: %s", self.node_id, exc)
            return
        # judged as recovery judges them: right after an outage no node could heartbeat, so a
        # silence then proves no node gone (and a node id's earlier incarnation is)
        store = self._store
        gone = gone_incarnations(nodes, store.clock(), store.node_ttl, answering_since=store.answering_since())
        others = sorted({n.node for n in nodes if n.incarnation != self.incarnation and n.incarnation not in gone})
        if others:
            log.debug("node %s stops beside live node(s) %s: waits on its pending runs go on", self.node_id, ", ".join(others))
            return
        log.debug("node %s stops alone on its store: waits on its pending runs are answered now", self.node_id)
        self._pending_kept = True
        self._run.pending_kept()

    async def _drain(self, deadline: float) -> None:
        """Until ``deadline`` (loop time), wait while a queue (its waiting jobs aside when it is
        paused) or the runs still have work. Nothing closes meanwhile, so work the queues and
        runs hand each other (a pipeline of queues, in whatever order they were made; a
        handler submitting runs) goes through within the stop's timeout."""
        if not self._queues:
            # the runs alone: they drain once the store is told how long it may retry (the
            # queues' writes, which are never cut short, are done then)
            return
        loop = asyncio.get_running_loop()
        while (left := deadline - loop.time()) > 0:
            waits: list[asyncio.Future[Any]] = [
                w for queue in list(self._queues.values()) if (w := queue.drained()) is not None
            ]
            runs = spawn(self._run.wait_idle(left), name="taskwatch-stop-runs") if self._run.local_work() else None
            if runs is not None:
                waits.append(runs)
            if not waits:
                return
            try:
                # all of them: one done may get work again from another still going, so each
                # round looks at every one afresh
                _, pending = await asyncio.wait(waits, timeout=left)
            finally:
                for fut in waits:
                    if fut is not runs:
                        fut.cancel()
                await cancel_and_wait(runs)  # (its own end clears the runs' idle waiter)
            if pending:
                return
            # a bare yield before the next look: what the last end scheduled (a trigger's key due
            # again fires a turn after its run's end event) is taken up first
            await asyncio.sleep(0)

    async def _cancel_pending(self, reason: CancelReason) -> int:
        """End every pending run this node knows as cancelled (the memory store's shutdown)."""
        pending = self._index.pending()
        for run in pending:
            if not self._executor.drop_unwritten(run.id):
                await self._store.request_cancel(run.id, reason)
            self._run.finish_cancelled(run, reason, was_running=False)
        return len(pending)

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ submit

    def _require_running(self) -> None:
        """Refuse work unless the engine runs. While a stop drains its queues and runs, their own
        work (a handler's put or submit, a run's, a task either started, a trigger's fire) is
        still taken: refused, it would fail the job or run that feeds it, and a longer drain
        would destroy more work than a short one. Callers outside the engine are refused.

        Only with the memory store, whose stop runs what is pending: a durable store's stop
        claims no more runs, so a run submitted then would only wait for the next start while
        what submitted it (a handler awaiting its result) waited out the whole timeout and ran
        again at that start, submitting it twice. Refused there, the job or run that submits
        is left undone as the stop's cut leaves it, kept for the next start (see
        ``WorkQueue`` and ``Execution``)."""
        if self._state != "running" and not (self._draining and not self._durable and works_for(self)):
            raise EngineLoopClosed() if self._loop_lost else EngineNotRunning(self._state)
        if self._loop.is_closed():  # type: ignore[union-attr]  # (running: it has one)
            raise EngineLoopClosed()

    def _refuse_in_fork(self) -> None:
        """Raise if the engine runs in the process this one was forked from: its loop looks
        running (the loop object came along) but no thread here runs it, so a call shipped to
        it would wait forever. Called on the paths that would ship a call, never on a run's.
        The check every hand-off to the loop makes (queues' and triggers' too): hop's."""
        refuse_in_fork(self._loop)

    def _require_loop_thread(self, method: str) -> None:
        # the index, the executor and the memory store are the loop's alone: a submit from
        # another thread would record half a run (claimed, never started) and hold its slot
        if threading.get_ident() != self._loop_thread:
            self._refuse_in_fork()
            # submit_nowait is no coroutine: what another thread waits for is a submit (and
            # BackgroundEngine.call() would await the handle it returns, i.e. the run's end)
            coro = "submit" if method == "submit_nowait" else method
            facade = f"{coro}(...)"
            on_loop = "`engine.submit_nowait(...)` or " if method == "submit_nowait" else ""
            raise LoopThreadError(
                method,
                f"Engine.{method}() was called from a thread other than the engine's event loop's, "
                f"which alone may queue runs; nothing was queued. On the engine's loop, "
                f"{on_loop}`await engine.{coro}(...)`; from another thread, use the background engine's "
                f"`{facade}` (`engine.start_background()`), or "
                f"`asyncio.run_coroutine_threadsafe(engine.{coro}(...), engine.loop).result()`",
            )

    def _hop(self, method: str, fn: Callable[..., _R], *args: Any, **kwargs: Any) -> _R:
        """``fn(*args, **kwargs)`` (no coroutine) made on the engine's loop from another thread, waited
        for here (:func:`~taskwatch.engine.hop.call_blocking`), at most :data:`_HOP_TIMEOUT` seconds.

        With no loop running nothing changes what ``fn`` reads, so it is then made here; once
        shipped, it waits for the loop until that loop closes (a stop ending), not only until it
        stops running: a loop driven in pieces takes it up in its next one."""
        loop = self._loop
        if loop is None or not loop.is_running():
            return fn(*args, **kwargs)
        return call_blocking(loop, fn, *args, timeout=_HOP_TIMEOUT, gone=loop.is_closed, what=method, **kwargs)

    def _prepare(
        self,
        task: str,
        params: BaseModel | dict[str, Any] | None,
        key: str | None,
        source: str,
        internal: bool = False,
        *,
        method: str,
    ) -> Run:
        """Validate a submission and make its run, recorded nowhere yet; raises before anything changes.

        ``method`` is the public method called, named by the refusal from another thread.

        Periodic and trigger tasks are submitted by their own loops only (``internal``).
        """
        self._require_running()
        if get_ident() != self._loop_thread:  # (the check inline: this is every run's path)
            self._require_loop_thread(method)
        spec = self._tasks.get(task)
        if spec is None or not (spec.submittable or internal):
            raise UnknownTask(
                task, (n for n, s in self._tasks.items() if s.submittable), None if spec is None else spec.kind
            )
        model, dumped = spec.validate_params(params)
        if key is not None:
            check_run_key(f"task {spec.name!r}", key)
        return Run(self._new_id(), spec.name, spec, dumped, model, self.clock(), key, source, spec.retries + 1)

    def handle(self, run_id: str) -> RunHandle:
        """A handle of the run ``run_id`` (one from before a restart, say, or another node's):
        it keeps this node's entry of the run, as the submitter's does, so waiting on it works
        after the index has let the run go. An id no store knows raises ``RunNotFound`` once
        the handle is read or awaited."""
        return RunHandle(self, run_id, self._index.runs.get(run_id))

    def _key_holder(self, run: Run) -> Run | None:
        """The pending run already holding ``run``'s dedup key, where this node's index can tell.

        With the memory store the index and the store share each run's entry,
        so the index is the truth. A durable store may be shared: a run this
        node indexes as pending may have been claimed by another node since
        (this node hears of it at its next catch-up), and answering from the
        index would drop the new submit; there only a run not written yet is
        answered here, and the store's insert decides the rest atomically.
        """
        holder = self._index.pending_holder(run)
        if holder is None or self._memory is not None or self._executor.unwritten(holder.id):
            return holder
        return None

    def _check_room(self, extra: int = 1) -> None:
        pending = self._index.counts[_PENDING]
        if pending + extra > self.max_queue:
            raise QueueFull("the engine's run queue", self.max_queue, pending, option="Engine(max_queue=...)", adding=extra)

    def _shared_queue_full(self, full: QueueFull) -> QueueFull:
        """A durable store holds ``max_queue`` across every node sharing it: say so (with what the
        store said of its pending runs, where it counted them)."""
        return QueueFull(
            f"the run queue shared by every node of {self._store.describe()}", self.max_queue,
            full.waiting if full.counted else None,
            option="Engine(max_queue=...)", adding=full.adding,
        )  # fmt: skip

    @staticmethod
    def _new_row(run: Run) -> NewRun:
        return NewRun(
            task=run.task,
            params=run.params,
            key=run.key,
            source=run.source,
            max_attempts=run.max_attempts,
            on_lost=_on_lost(run),
            id=run.id,
            created_at=run.created_at,
        )

    async def _insert(self, runs: list[Run], slot: tuple[float, float] | None = None) -> list[Inserted]:
        """Write new runs to a durable store, checking the queue limit every node shares.

        With ``slot`` (``(slot, gap)``), the one run is its periodic task's for that slot,
        claimed in the same transaction (nothing is written when the slot is taken).
        A caller that gives up meanwhile (a control client that disconnected,
        a timeout around ``submit``) does not take back a write that may land:
        the runs the store took are then read back, indexed and announced, as
        if the caller had waited, so no stored run goes unseen here.
        """
        self._run.writing(runs)
        rows = [self._new_row(run) for run in runs]
        if slot is None:
            sent = self._store.insert(rows, max_pending=self.max_queue)
        else:
            sent = self._store.claim_periodic_run(runs[0].task, *slot, rows[0], max_pending=self.max_queue)
        write = as_future(sent)
        try:
            # awaited as it is (no shield: that costs a loop turn per submit), so a cancel
            # here cancels the write's future too and its answer is lost (see _admit_late)
            inserted = await write
        except asyncio.CancelledError:
            self._run.keep_write(write, functools.partial(self._admit_late, runs))
            raise
        except QueueFull as full:
            self._run.written(runs)
            raise self._shared_queue_full(full) from None
        except BaseException:
            self._run.written(runs)
            raise
        self._run.written(runs)
        return inserted

    def _admit_late(self, runs: list[Run], write: asyncio.Future[list[Inserted]]) -> None:
        """The write of a submit given up on is over: admit what it wrote after all."""
        if self._state != "running":
            self._run.written(runs)
            return  # a stopped engine: its next start reads them back
        if write.cancelled():
            # its answer went with the cancel, not necessarily the write (SQLite's writer
            # thread does it all the same; PostgreSQL may have committed first): read back
            check = as_future(self._store.get_many([run.id for run in runs]))
            self._run.keep_write(check, functools.partial(self._admit_found, runs))
            return
        self._run.written(runs)
        if write.exception() is None:
            self._admit_stored(runs, {result.id for result in write.result() if result.new})

    def _admit_found(self, runs: list[Run], check: asyncio.Future[dict[str, Any]]) -> None:
        self._run.written(runs)
        if not check.cancelled() and check.exception() is None and self._state == "running":
            self._admit_stored(runs, check.result().keys())

    def _admit_stored(self, runs: list[Run], stored: Collection[str]) -> None:
        """Admit those of ``runs`` the store has (``stored``: their ids), as their submit would have."""
        with self._run.starts_held():
            for run in runs:
                if run.id in stored:
                    self._admitted(run)
        self._run.start_soon()

    def _admitted(self, run: Run) -> None:
        """``run`` is in the store (or on its way there): index it and say so, once."""
        self._run.admit(run)

    async def submit(
        self,
        task: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        key: str | None = None,
    ) -> RunHandle:
        """Validate ``params`` and queue a run of ``task``; returns its handle once the store has it.

        With ``key``, a pending run of the same task holding the same key is
        returned instead of queueing a second one (across every process
        sharing the store). Raises :class:`UnknownTask`, :class:`InvalidParams`,
        :class:`InvalidKey`, :class:`QueueFull` or :class:`EngineNotRunning`,
        and in each case nothing is queued. (With ``backend="inline"`` it
        returns only once the run has finished.)
        """
        handle = await self._submit(self._prepare(task, params, key, "submit", method="submit"))
        if self._inline:
            await handle.wait()
        return handle

    async def _holders_written(self, runs: list[Run]) -> None:
        """Write the submit_nowait runs not written yet that hold these runs' keys, first.

        Such a run's write may find its key held in the store (by a run this node sees
        as written and pending), and it then ends cancelled (KeyHeld): a submit that
        can wait is answered by the store once that write is over, never with a run
        that will not do the work. (Shielded: a cancel of this submit must not cut the
        batch write, which other runs' submitters are waiting on.)
        """
        if self._memory is None and any(run.key is not None and self._key_holder(run) is not None for run in runs):
            await asyncio.shield(self._executor.flush())

    async def _submit(self, run: Run) -> RunHandle:
        if run.key is not None:
            await self._holders_written([run])
            holder = self._key_holder(run)
            if holder is not None:
                return RunHandle(self, holder.id, holder)
        memory = self._memory
        if memory is not None:
            self._check_room()
            held = memory.admit(run, _on_lost(run))
            if held is not None:
                return self.handle(held)  # another engine's pending run holds the key
        else:
            [inserted] = await self._insert([run])
            if not inserted.new:
                return self.handle(inserted.id)  # another process's pending run holds the key
        self._admitted(run)
        self._run.start_soon()
        return RunHandle(self, run.id, run)

    async def submit_many(
        self, submissions: Iterable[tuple[str, BaseModel | dict[str, Any] | None] | Mapping[str, Any]]
    ) -> list[RunHandle]:
        """Queue many runs in one store write (one transaction in a durable store).

        Each item is ``(task, params)`` or a mapping with ``task``, ``params``
        and ``key``. Every item is validated first: one bad item raises and
        nothing is queued.
        """
        if self._state == "running":
            # (an empty batch too: its start_soon() would claim runs from this thread)
            self._require_loop_thread("submit_many")
        runs: list[Run] = []
        for index, item in enumerate(submissions):
            try:
                if isinstance(item, Mapping):
                    unknown = sorted(str(k) for k in item if k not in _SUBMISSION_FIELDS)
                    if unknown:
                        raise InvalidSubmission(index, f"has field(s) {', '.join(unknown)}, which a submission has not")
                    if "task" not in item:
                        raise InvalidSubmission(index, "names no task")
                    runs.append(self._prepare(item["task"], item.get("params"), item.get("key"), "submit", method="submit_many"))
                elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)) and len(item) == 2:
                    task, params = item  # a tuple, or a list (read from JSON, say)
                    runs.append(self._prepare(task, params, None, "submit", method="submit_many"))
                else:
                    raise InvalidSubmission(index, f"is {reprlib.repr(item)}")
            except (InvalidParams, InvalidKey, UnknownTask) as exc:
                # in a batch of many, the message says which item to fix (the error's own
                # fields, such as InvalidParams.errors, stay as a single submit has them)
                exc.args = (f"item {index} of submit_many: {exc}", *exc.args[1:])
                raise
        await self._holders_written(runs)
        fresh: list[Run] = []
        handles: list[RunHandle | None] = []
        for run in runs:
            holder = self._key_holder(run)
            handles.append(RunHandle(self, holder.id, holder) if holder is not None else None)
            if holder is None:
                fresh.append(run)
        if not fresh:
            inserted: list[Inserted] = []
        elif self._memory is not None:
            # runs of one key in this batch queue once: the others get the first one's handle
            keyed = {(run.task, run.key) for run in fresh if run.key is not None}
            self._check_room(sum(run.key is None for run in fresh) + len(keyed))
            inserted = await self._store.insert([self._new_row(run) for run in fresh])
        else:
            inserted = await self._insert(fresh)
        written = iter(zip(fresh, inserted, strict=True))
        out: list[RunHandle] = []
        admitted: list[Run] = []
        for handle in handles:
            if handle is not None:
                out.append(handle)
                continue
            run, result = next(written)
            if result.new and result.id == run.id:
                if not self._run.admitted_already(run):  # else claimed (and admitted) first
                    self._index.admitted(run)
                    admitted.append(run)
                out.append(RunHandle(self, run.id, run))
            else:
                out.append(self.handle(result.id))  # the run holding its key (maybe in this batch)
        # every run is indexed before the first event goes out, and none starts before the
        # last: a bus callback that submits must find the whole batch where the store has it
        with self._run.starts_held():
            for run in admitted:
                self._run.announce(run)
        self._run.start_soon()
        return out

    def submit_nowait(
        self,
        task: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        key: str | None = None,
        source: str = "submit",
        internal: bool = False,
    ) -> RunHandle:
        """Like :meth:`submit`, for synchronous code on the engine's loop; never waits.

        The run is indexed and announced at once and written to the store with
        the next batch (a moment later). With a ``key`` held by a pending run
        in a store other nodes share, that write finds out: this run then ends
        ``cancelled`` with ``error.type == "KeyHeld"`` naming the holder (a
        pending run of this node's not written yet is answered at once;
        :meth:`submit` waits for that run's write first). Only on the engine's
        loop: from another thread it raises :class:`LoopThreadError` and queues
        nothing. ``internal`` lets the engine's own
        loops (periodic tasks, triggers) submit the tasks they registered,
        which users cannot submit directly. ``source`` (what the dashboard's run
        detail names as where the run came from) is plain text, else
        :class:`InvalidConfiguration`.
        """
        if source != "submit" and (problem := name_problem("source", source)) is not None:
            # it goes into the run's row: a NUL made a PostgreSQL store refuse the write
            raise InvalidConfiguration("submit_nowait()", [problem])
        run = self._prepare(task, params, key, source, internal, method="submit_nowait")
        holder = self._key_holder(run)
        if holder is not None:
            return RunHandle(self, holder.id, holder)
        self._check_room()
        memory = self._memory
        if memory is None:
            if run.id in self._index.runs:
                # (a run_id_factory's id used before) refused here, as the store would refuse its
                # write a moment later: indexed meanwhile, it would have stood in for the run
                # already under that id, and that write's failure failed the run it replaced
                raise DuplicateRunId(run.id)
            self._admitted(run)
            self._executor.insert_later(self._new_row(run))
            return RunHandle(self, run.id, run)
        held = memory.admit(run, _on_lost(run))
        if held is not None:
            return self.handle(held)
        self._admitted(run)
        self._run.start_soon()
        return RunHandle(self, run.id, run)

    async def submit_periodic(self, task: str, slot: float, gap: float) -> tuple[RunHandle, bool] | None:
        """The scheduler's submit: claim ``slot`` of the periodic ``task`` and queue its run.

        Returns the slot's run and True; or, when a durable store finds a run of
        the task still pending or running (another node's, or an earlier
        start's), that run and False: the slot is claimed and passes without one.
        None when the slot is taken (an earlier start, or another node sharing
        the store, fired it). A durable store claims the slot and stores the
        run in one transaction, so a crash cannot leave a slot that counts as
        fired and never ran; a full queue raises :class:`QueueFull` and then
        leaves the slot unclaimed there (the memory store, which nothing outlives,
        has claimed it: the tick is skipped).
        """
        source = f"periodic:{task}"
        if self._memory is not None:
            # in this process only: nothing outlives a crash to be left half done, and no
            # other node runs this task (this node's own run the scheduler follows itself)
            self._require_running()
            if not await self._store.claim_periodic(task, slot, gap):
                return None
            return self.submit_nowait(task, None, source=source, internal=True), True
        run = self._prepare(task, None, None, source, internal=True, method="submit_periodic")
        inserted = await self._insert([run], (slot, gap))
        if not inserted:
            return None
        going = inserted[0].id
        if going != run.id:
            return RunHandle(self, going), False
        self._admitted(run)
        self._run.start_soon()
        return RunHandle(self, run.id, run), True

    async def retry(self, run_id: str) -> RunHandle:
        """Submit a new run of a failed or cancelled run's task with the same params and key.

        The key keeps its meaning: while a run of the task with that key is pending
        (submitted since), its handle is returned instead of queueing a second one.
        """
        if self._state == "running":
            # before the run is read: a durable store's read is a future of the engine's loop
            self._require_loop_thread("retry")
        old = await self.fetch_run(run_id)
        if old.status not in (_FAILED, _CANCELLED):
            raise RunNotRetryable(run_id, old.status.value)
        spec = self._tasks.get(old.task)
        if spec is not None and not spec.submittable:
            raise RunNotRetryable(
                run_id, old.status.value, f"it belongs to the {spec.kind} {spec.name!r}, which runs it again itself"
                + (f"; to run it now, use run_periodic({spec.name!r})" if spec.kind == "periodic" else ""),
            )
        # an empty key, which submits took before they refused one, is retried as no key
        key = old.key or None
        handle = await self._submit(self._prepare(old.task, old.params, key, f"retry:{run_id}", method="retry"))
        if self._inline:
            await handle.wait()
        return handle

    # ------------------------------------------------------------------ cancel

    @_on_loop_async
    async def cancel(self, run_id: str, grace: float | None = None) -> RunRecord:
        """Cancel a pending or running run and return its record.

        A pending run is cancelled at once. A running run is cancelled
        cooperatively (its ``await`` raises ``CancelledError``) and given
        ``grace`` seconds (default ``cancel_grace``) to finish; if it is still
        running after that, the record returned says so. A run executing on
        another node sharing the store is cancelled by that node, which learns
        of it with its next heartbeat. Raises :class:`RunNotFound` or
        :class:`RunNotCancellable`, and :class:`InvalidConfiguration` for a ``grace``
        that is no finite number of seconds >= 0 (before anything is cancelled).
        """
        grace = self._run.checked_grace(grace)
        run = self._index.runs.get(run_id)
        if run is None:
            return await self._cancel_elsewhere(run_id, grace)
        if run.status.finished:
            raise RunNotCancellable(run_id, run.status.value)
        recorded = False
        if run.status is _PENDING:
            if self._executor.drop_unwritten(run_id):
                self._run.finish_cancelled(run, "user", was_running=False)
                return run.record()
            result = await self._store.request_cancel(run_id, "user")
            if result.action == "cancelled":
                # the store's record: a run another node tried and holds back for a retry has
                # its attempt, start and error there, not in this node's entry
                self._run.apply_stored(run, result.run.to_record(), announced=False)
                return run.record()
            if result.action == "finished":
                self._run.apply_stored(run, result.run.to_record())  # ended elsewhere: as it ended
                raise RunNotCancellable(run_id, result.run.status.value)
            # claimed in the meantime (the store has noted the request): cancel it as running
            if run.handle is None:
                return await self._cancelled_elsewhere(run, result.run.to_record(), grace)
            recorded = True
        elif run.handle is None:
            # running on another node: its owner cancels it as soon as it is told (unless it
            # finished meanwhile, which this node has not heard of yet)
            result = await self._store.request_cancel(run_id, "user")
            if result.action == "finished":
                self._run.apply_stored(run, result.run.to_record())
                raise RunNotCancellable(run_id, result.run.status.value)
            if result.action == "cancelled" and not run.status.finished:
                # it was pending there after all (this node's own run, between an attempt
                # that failed and its retry being written): ended here too, not left
                # pending in the index until the next catch-up
                self._run.apply_stored(run, result.run.to_record(), announced=False)
                return run.record()
            return await self._cancelled_elsewhere(run, result.run.to_record(), grace)
        # cancelled already and cleaning up (a button clicked twice, a request retried): it is only
        # waited for, as the cleanup keeps the time that cancel gave it, and another would cut it short
        if run.cancel_reason is None:
            run.cancel_reason = "user"  # set first: the store's notice of the request below then cancels nothing again
            run.handle.cancel()
            # its cleanup gets the engine's cancel_grace (as a stop's and a timeout's cancel give it),
            # or the caller's grace if longer; a caller's shorter grace is how long it waits here
            self._run.keep_cancelling(run, after=max(grace, self.cancel_grace))
            if self._durable and not recorded:
                # while the task cleans up, the store holds the request too: a crash meanwhile must
                # not bring the run back as pending (recovery ends a run whose cancel was requested).
                # Written beside the grace, not before it: a busy store must not lengthen the wait
                request = as_future(self._store.request_cancel(run_id, "user"))
                self._run.keep_write(request, functools.partial(_cancel_recorded, run_id))
        await self._run.wait_finished(run, self.cancel_grace if grace is None else grace)
        return run.record()

    async def _cancelled_elsewhere(self, run: Run, asked: RunRecord, grace: float | None) -> RunRecord:
        """A run another node executes has its cancel requested: as with a run of this node's,
        wait up to ``grace`` for it to end (its owner hears at once on a store that pushes
        changes, at its next heartbeat otherwise), and return the record as it is then.

        :class:`RunNotCancellable` if it ended otherwise than cancelled: its outcome was on its
        way before the request (this node's own run, whose write waited on a busy store, or
        another node's that ended before it heard), so the cancel did nothing."""
        self._run.apply_stored(run, asked)
        await self._run.wait_finished(run, self.cancel_grace if grace is None else grace)
        record = run.record()
        if record.status.finished and record.status is not RunStatus.CANCELLED:
            raise RunNotCancellable(run.id, record.status.value)
        return record

    async def _cancel_elsewhere(self, run_id: str, grace: float | None) -> RunRecord:
        result = await self._store.request_cancel(run_id, "user")  # RunNotFound if the store has none
        if result.action == "finished":
            raise RunNotCancellable(run_id, result.run.status.value)
        if result.action == "cancelled":
            return result.run.to_record()
        return await self._poll_store(run_id, self.cancel_grace if grace is None else grace)

    # ------------------------------------------------------------------ queries

    def _lookup(self, run_id: str) -> Run:
        run = self._index.runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def current(self, run_id: str, known: Run | None = None) -> Run | None:
        """The index's entry for ``run_id``, or ``known`` (a handle's) if that one has finished.

        A handle keeps the entry it was made with, so waiting on it costs no
        lookup; the index wins while the run goes on (a restart of this engine
        object reads its runs back from the store into new entries), and a
        finished entry stays right after the index has evicted it.
        """
        indexed = self._index.runs.get(run_id)
        if indexed is not None:
            return indexed
        return known if known is not None and known.status.finished else None

    @_on_loop
    def get(self, run_id: str) -> RunRecord:
        """The current record of a run this node knows. Raises :class:`RunNotFound` for
        unknown or evicted ids (:meth:`fetch_run` also reads the store)."""
        return self._lookup(run_id).record()

    @_on_loop_async
    async def fetch_run(self, run_id: str) -> RunRecord:
        """A run's record from the index, or else from the store (runs of other processes,
        runs pruned from the index but still stored). Raises :class:`RunNotFound`."""
        run = self._index.runs.get(run_id)
        if run is not None:
            # another node's run is as the store has it now, not as this node last heard
            await self._run.refresh(run)
            if self._index.runs.get(run_id) is run or run.status.finished:
                return run.record()
        stored = await self._store.get(run_id)
        if stored is None:
            raise RunNotFound(run_id)
        return stored.to_record()

    @_on_loop_async
    async def query_runs(
        self,
        *,
        status: RunStatus | str | None = None,
        task: str | None = None,
        since: float | None = None,
        limit: int = 50,
        before: str | None = None,
    ) -> Page:
        """Runs in the store, newest first, one page at a time: pass ``page.next`` as ``before``.

        Raises :class:`InvalidQuery` for a ``since`` that is no finite time, a ``limit``
        under 1, a ``task`` that is no text or a ``before`` that is no page's cursor, and
        :class:`InvalidStatus` for a status that names none.
        """
        check_query(
            since_problem(since), limit_problem("limit", limit, 1, "how many runs a page holds"), task_problem(task)
        )
        return await self._store.query(status=status, task=task, since=since, limit=limit, before=before)

    def wait_for(
        self, run_id: str, timeout: float | None = None, *, run: Run | None = None
    ) -> Awaitable[RunRecord]:
        """Await the run's record once it has finished, or as it is after ``timeout`` seconds.

        Resolves from this node's own finish, or by reading the store for a
        run another process executes. Without a timeout, for a run this node
        holds, the awaitable is a future resolved by the finish itself
        (:class:`~taskwatch.engine.execution.RunWait`, a coroutine as well):
        ``gather`` over many of them starts no task per run.
        """
        timeout = checked_timeout("Engine.wait_for()", timeout)
        run = self.current(run_id, run)
        if run is None:
            return self._poll_store(run_id, timeout)
        if (self._state == "stopped" and self._run.left_undone(run)) or (self._pending_kept and run.status is _PENDING):
            # kept in the store for the next start, which reads it back as a new entry:
            # nothing would ever resolve a wait on this one
            refused: asyncio.Future[RunRecord] = RunWait(loop=asyncio.get_running_loop())
            refused.set_exception(self._run.stopped_error(run))
            return refused
        if timeout is None:
            return self._run.finished_future(run)
        return self._run.wait_finished(run, timeout)

    async def _poll_store(self, run_id: str, timeout: float | None) -> RunRecord:
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        delay = 0.01
        last: RunRecord | None = None
        while True:
            try:
                record = last = await self.fetch_run(run_id)
            except StoreUnavailable:
                # an outage (each read tries for the store's reconnect_timeout): the run goes on
                # on its node, so a wait with time left goes on too, rather than ending early
                if self._state != "running":
                    raise  # a stop: nothing here reads the store again
                if deadline is not None and loop.time() >= deadline:
                    if last is None:
                        raise
                    return last  # as it was last read: the wait's TimeoutError says it goes on
                await asyncio.sleep(1.0 if deadline is None else min(1.0, max(0.0, deadline - loop.time())))
                continue
            if record.status.finished or (deadline is not None and loop.time() >= deadline):
                return record
            run = self._index.runs.get(run_id)
            if run is not None:  # claimed here meanwhile: its finish wakes us
                left = None if deadline is None else max(0.0, deadline - loop.time())
                return await self._run.wait_finished(run, left)
            pause = delay if deadline is None else min(delay, max(0.0, deadline - loop.time()))
            await asyncio.sleep(pause)  # another process's run: nothing here to wake us
            delay = min(delay * 2, 0.5)

    @_on_loop
    def runs(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        *,
        task: str | None = None,
        limit: int | None = 50,
    ) -> RunList:
        """Runs this node knows, newest first, optionally filtered by status(es) and task name.

        Raises :class:`InvalidStatus` for a status that names none, and :class:`InvalidQuery`
        for a ``task`` that is no text or a ``limit`` that is neither None nor an int of 0 or more.
        """
        wanted = wanted_statuses(status)
        check_query(
            task_problem(task),
            None if limit is None else limit_problem("limit", limit, 0, "how many runs to list (None for all)"),
        )
        return self._index.select(wanted, task, limit)

    @property
    def executing(self) -> int:
        """How many runs this node is executing now: its own claims, not the runs it
        submitted that other nodes of a shared store execute."""
        return self._executor.running

    def still_going(self, task: str) -> list[tuple[asyncio.Task[Any], str, dict[str, Any]]]:
        """The runs of ``task`` a stop gave up on (code that ignores cancellation) whose code
        still runs, with the memory store, each as its asyncio task, its id and its params. Their
        records say they ended (cancelled by the shutdown); a schedule's next run, and a
        trigger key's, wait for their real end, so as never to overlap them. (A durable
        store keeps such runs ``running`` until recovery takes them back, at the node's next
        start at the latest, and the code of one may then still run beside its next attempt.)"""
        return self._run.still_going(task)

    @_on_loop
    def given_up_tasks(self) -> list[asyncio.Task[Any]]:
        """The tasks of runs, queue handlers and supervised workers the last stop cancelled for every round of
        ``cancel_grace`` and then left going (code that ignores cancellation); logged by the
        stop. Whoever closes the loop need not wait for them again."""
        tasks = list(self._run.left_going)
        for queue in list(self._queues.values()):
            tasks.extend(queue.left_going)
        tasks.extend(self._supervisor.left_going())
        return [task for task in tasks if not task.done()]

    @_on_loop
    def stats(self) -> EngineStats:
        index = self._index
        counts = index.counts
        return EngineStats(
            node_id=self.node_id,
            state=self.state,
            by_status={s.value: n for s, n in counts.items()},
            queue_depth=counts[_PENDING],
            running=counts[_RUNNING],
            submitted_total=index.submitted_total,
            finished_total=index.finished_total,
            succeeded_total=index.totals[_SUCCEEDED],
            failed_total=index.totals[_FAILED],
            cancelled_total=index.totals[_CANCELLED],
            retries_total=index.retries_total,
            throughput=index.throughput(),
            throughput_window=index.throughput_window,
            cut_off_for=self._executor.cut_off_for(),
            queues={
                q.name: {
                    "depth": q.depth,
                    "in_flight": q.in_flight,
                    "processed": q.processed,
                    "failed": q.failed,
                    "rejected": q.rejected,
                    "purged": q.purged,
                    "paused": int(q.paused),
                    # what a stop left undone, and of it (or of the store's writes) what was not kept
                    "abandoned": q.abandoned,
                    "lost": q.lost,
                }
                for q in (queue.info() for queue in self._queues.values())
            },
            # counted, not listed: a trigger may hold a key per user
            triggers={t.name: {"keys": t.key_count, "fired": t.fired} for t in self._triggers.values()},
            supervised={
                w.name: {"state": w.state, "restarts": w.restarts, "crashes": w.crashes}
                for w in self._supervisor.workers()
            },
            bus=self.bus.stats(),
        )

    @_on_loop
    def rates(self, seconds: float = 1.0) -> tuple[float, float]:
        """Runs finished and failed per second over the last ``seconds`` whole seconds
        (:class:`InvalidQuery` for a ``seconds`` that is no finite number of 1 or more)."""
        return self._index.rates(seconds)

    @_on_loop
    def leadership(self) -> Leadership:
        """Who leads, as this node sees it."""
        return self._leader.snapshot()

    @_on_loop
    def snapshot(self, runs_limit: int = 500) -> Snapshot:
        """Everything a dashboard needs to draw itself, in one JSON-serialisable model.

        ``runs`` holds the newest ``runs_limit`` runs and, however old, every running
        run and the newest :data:`SNAPSHOT_FAILURES` failed ones (none with ``runs_limit=0``).
        Raises :class:`InvalidQuery` for a ``runs_limit`` that is no int of 0 or more.
        """
        check_query(runs_limit_problem(runs_limit), what="snapshot query")
        runs = self.runs(limit=runs_limit)
        if runs_limit > 0:
            # however old: running runs, which a dashboard must be able to see and cancel,
            # and the newest failures, which its failures list must not lose to newer runs
            shown = {r.id for r in runs}
            for older in (self.runs(status=_RUNNING, limit=None), self.runs(status=_FAILED, limit=SNAPSHOT_FAILURES)):
                runs.extend(r for r in older if r.id not in shown)
                shown.update(r.id for r in older)
        return Snapshot(
            node_id=self.node_id,
            version=__version__,
            state=self.state,
            started_at=self._started_at,
            runs=runs,
            tasks=self.catalog(),
            schedule=self.schedule(),
            queues=self.queues(),
            triggers=self.triggers(keys_limit=SNAPSHOT_TRIGGER_KEYS),
            workers=self.workers(),
            stats=self.stats(),
            leadership=self.leadership(),
            last_seq=self.bus.last_seq,
            store=self._store.describe(),
            incarnation=self.incarnation,
        )

    # ------------------------------------------------------------------ elsewhere: threads, sockets

    def start_background(self, **options: Unpack[BackgroundKwargs]) -> BackgroundEngine:
        """Run this engine on its own event loop in a daemon thread; returns a thread-safe facade."""
        from .background import BackgroundEngine

        check_option_names("Engine.start_background()", options, BackgroundEngine)
        return BackgroundEngine.launch(self, **options)

    @_on_loop_async
    async def serve(self, address: str | None = None, **options: Unpack[ServeKwargs]) -> ControlServer:
        """Expose this engine to dashboards in other processes (Unix socket or tcp://127.0.0.1:PORT).

        Awaited on another loop than the engine's (a notebook cell's, beside ``start_background()``),
        the server is made on the engine's: its connections read the engine's bus there."""
        from .server import ControlServer

        check_option_names("Engine.serve()", options, ControlServer)
        self._require_running()
        server = ControlServer(self, address, **options)
        await server.start()  # which hands it to keep_server: this engine's stop() stops it
        return server

    @_on_loop
    def keep_server(self, server: ControlServer) -> None:
        """Stop ``server`` at this engine's next :meth:`stop`: what a :class:`ControlServer`
        listening on this engine calls once it listens (from :meth:`serve` or a start of its own,
        a restarted engine's included). :class:`EngineNotRunning` unless the engine runs: a server
        started on an engine that is stopping would outlive it, serving a stopped engine and
        holding its address."""
        if self._state != "running":
            raise EngineNotRunning(self._state)
        if server not in self._servers:
            self._servers.append(server)

    @_on_loop
    def forget_server(self, server: ControlServer) -> None:
        """``server`` stopped by itself: this engine's stop has nothing more to stop there."""
        if server in self._servers:
            self._servers.remove(server)

    @_on_loop
    def catalog(self) -> list[TaskInfo]:
        """Every registered task with its params schema (what a submit form needs)."""
        return [spec.info() for spec in self._tasks.values()]

    # ------------------------------------------------------------------ periodic tasks

    @overload
    def periodic(
        self,
        fn: F,
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
    ) -> F: ...

    @overload
    def periodic(
        self,
        fn: None = None,
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
    ) -> Callable[[F], F]: ...

    def periodic(
        self,
        fn: F | None = None,
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
    ) -> F | Callable[[F], F]:
        """Register ``async def fn(ctx, **resources)`` to run on an interval or a cron expression.

        ``every`` is seconds between runs, measured from the end of one run to
        the start of the next (``fixed_rate=True``: from start to start, on a
        fixed grid; not with ``cron``). ``cron`` is a five-field expression
        (``"0 3 * * *"``) or a six-field one with seconds first
        (``"*/10 * * * * *"``), read in the local time zone, or in ``tz`` (an
        IANA name: ``"Europe/Berlin"``, ``"UTC"``; give it where nodes sharing a
        store may run in different zones, or each fires the expression at its
        own local times): a time the clocks skip when DST starts runs an hour
        later that day (``30 2 * * *`` at 03:30), a time they repeat when it ends runs once. ``jitter`` is a
        fraction from 0 to 1: each tick is delayed by a random part of up to
        that fraction of the interval (for cron, of the gap to its next time).
        ``initial_delay`` holds the first tick after every start.

        ``requires`` names resources from ``Engine(resources=...)`` passed in by
        name; ``opt_in`` names a flag from ``Engine(flags=...)`` that must be
        true. A task whose needs are not met is registered disabled, with the
        reason shown in :meth:`schedule` and published as a
        ``periodic.registered`` event; :meth:`provide`, :meth:`withdraw` and
        :meth:`set_flag` enable or disable it at once. Bad options raise
        :class:`InvalidConfiguration` and record nothing.
        """

        def decorate(func: F) -> F:
            self._scheduler.add(
                func,
                every=every,
                cron=cron,
                name=name,
                initial_delay=initial_delay,
                requires=requires,
                opt_in=opt_in,
                jitter=jitter,
                fixed_rate=fixed_rate,
                retries=retries,
                timeout=timeout,
                tz=tz,
            )
            return func

        return decorate(fn) if fn is not None else decorate

    @_on_loop
    def schedule(self) -> list[PeriodicInfo]:
        """Every periodic task: trigger, enabled or why not, next due, last outcome, counts."""
        return self._scheduler.schedule()

    def pause_periodic(self, name: str) -> PeriodicInfo:
        return self._scheduler.pause(name)

    def resume_periodic(self, name: str) -> PeriodicInfo:
        self._refresh_limits()  # the needs are checked again: which tasks' runs this node may claim too
        return self._scheduler.resume(name)

    async def run_periodic(self, name: str) -> RunHandle:
        """Queue one run of the periodic task ``name`` now, off its schedule (say, to re-run
        a failed nightly backup); returns its handle once the store has it.

        Its source is ``periodic:NAME:manual``. A paused task may be run; the
        schedule is left as it was (a tick coming due while this run goes is
        skipped and counted, as for any overlap). Raises :class:`UnknownPeriodic`,
        :class:`EngineNotRunning`, :class:`QueueFull`, and :class:`PeriodicNotRunnable`
        while the task's needs are unmet or a run of it is pending or running (on
        a store nodes share, as far as the store says when asked: a tick another
        node fires in the same moment can still overlap it); nothing is queued then.
        """

        if self._state == "running":
            # before the scheduler looks: it reads the index and awaits the store, which are the loop's
            self._require_loop_thread("run_periodic")

        def submit(source: str) -> Awaitable[RunHandle]:
            return self._submit(self._prepare(name, None, None, source, internal=True, method="run_periodic"))

        handle = await self._scheduler.run_now(name, submit)
        if self._inline:
            await handle.wait()
        return handle

    def provide(self, name: str, resource: Any) -> None:
        """Make ``resource`` the engine's resource ``name`` (replacing one of that name).

        Periodic tasks that were disabled for want of it (and need nothing else)
        are enabled at once, as at a start, each with a ``periodic.registered``
        event; a shared store's runs of tasks requiring it are claimed here from now
        on. Safe from any thread: off the engine's loop the change is made there, and
        this returns once it holds.
        """
        if (problem := name_problem("name", name)) is not None:
            raise InvalidConfiguration("a resource", [problem])
        self._change_needs("provide", self.resources.__setitem__, name, resource)

    def withdraw(self, name: str) -> Any:
        """Take the resource ``name`` away and return it.

        Periodic tasks requiring it are disabled at once (a run in progress
        finishes, keeping it), with the reason and a ``periodic.registered`` event;
        no run is claimed with it once this has returned (one claimed just before,
        in the same turn of the loop, may still take its first step with it). Raises
        :class:`InvalidConfiguration` when no resource of that name is provided. Safe
        from any thread, as :meth:`provide` is: the object returned is the one taken
        away, whatever was provided just before from any thread.
        """
        return self._change_needs("withdraw", self._take_resource, name)

    def _take_resource(self, name: str) -> Any:
        if not isinstance(name, str) or name not in self.resources:
            known = sorted(str(r) for r in self.resources)
            near = difflib.get_close_matches(name, known, n=1) if isinstance(name, str) else []
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise InvalidConfiguration(
                f"resource {name!r}",
                [f"no resource of that name is provided{hint}; provided: {', '.join(known) or 'none'}"],
            )
        return self.resources.pop(name)

    def set_flag(self, name: str, on: bool) -> None:
        """Turn the flag ``name`` on or off; ``opt_in`` periodic tasks follow at once.

        Raises :class:`InvalidConfiguration` for a name that is no plain text and
        for ``on`` that is not a bool (``"false"`` is not taken as true). Safe from
        any thread, as :meth:`provide` is.
        """
        problems = [problem] if (problem := name_problem("name", name)) is not None else []
        if not isinstance(on, bool):
            problems.append(f"on={on!r}: a flag is True or False")
        if problems:
            raise InvalidConfiguration(f"flag {name!r}", problems)
        self._change_needs("set_flag", self.flags.__setitem__, name, on)

    def _change_needs(self, what: str, change: Callable[..., _R], *args: Any) -> _R:
        """``change(*args)`` on the resources or flags, then what follows from it, made on the
        engine's loop (see :meth:`on_its_loop`): the scheduler and the claims read those dicts
        there, so a change (and a withdraw's check of what is provided) made from another
        thread waits its turn behind the changes made before it, and holds once this returns."""
        return self.on_its_loop(self._apply_needs, change, args, what=what)

    def on_its_loop(self, fn: Callable[..., _R], *args: Any, what: str, idle_ok: bool = False) -> _R:
        """``fn(*args)`` (not async) made on the engine's loop and returned from there: for what
        starts, cancels or reads tasks and state of that loop (the scheduler's, the supervisor's,
        the resources). From another thread it waits for it (5 s at most, else TimeoutError and
        nothing made), also for the loop's next piece on a loop a program drives with
        ``run_until_complete`` while the engine runs. Made here when no loop will take it: the
        loop is closed, or it is idle while the engine does not need it (a stop's last moments
        included). On the loop's own thread between two such pieces, while the engine runs,
        it raises :class:`LoopThreadError` at once: nothing else can run that loop, and the
        call would only wait out its 5 s; unless ``idle_ok`` says ``fn`` needs no running loop
        (it only cancels tasks, which the loop's next piece sees through), and it is made here."""
        loop = self._loop
        if (
            loop is not None
            and not loop.is_closed()
            and not loop.is_running()
            and threading.get_ident() == self._loop_thread
            and self._needs_its_loop()
        ):
            if idle_ok:
                return fn(*args)
            raise LoopThreadError(
                what,
                f"Engine.{what}() was called on the engine's loop's thread while that loop does not run "
                "(between two run_until_complete calls, say): what it does is made on that loop, which "
                "nothing runs now. Call it from a coroutine or callback on the running loop, or from "
                "another thread; nothing was changed",
            )

        def gone() -> bool:
            assert loop is not None
            return not self._needs_its_loop() and not loop.is_running()

        return call_blocking(loop, fn, *args, gone=gone)

    def _needs_its_loop(self) -> bool:
        """Whether the engine's tasks and state live on its loop now (it starts, runs or stops)."""
        return self._state in ("running", "stopping") or self._starting is not None

    def _apply_needs(self, change: Callable[..., _R], args: tuple[Any, ...]) -> _R:
        result = change(*args)
        self._refresh_limits()
        self._scheduler.needs_changed()
        # a run of a task its resource was withdrawn from waits here: claim it now, not at the next poll
        self._executor.wake()
        return result

    # ------------------------------------------------------------------ queues and triggers

    def queue(
        self,
        name: str,
        handler: Callable[[Any], Awaitable[Any]] | Callable[[TaskContext, Any], Awaitable[Any]],
        *,
        concurrency: int = 1,
        maxsize: int = 1000,
    ) -> WorkQueue:
        """Create a named queue whose jobs ``handler(job)`` consumes with ``concurrency`` workers."""
        # checked first: every snapshot and event carries the name, and a bad one would break them all
        if (problem := name_problem("name", name)) is not None:
            raise InvalidConfiguration(f"queue {name!r}", [problem])
        # before anything is made: in a fork its start, handed to the loop, would never come
        self._refuse_in_fork()
        with self._defining:
            if name in self._queues:
                raise DuplicateTask("queue", name)
            queue = WorkQueue(self, name, handler, concurrency=concurrency, maxsize=maxsize, executor=self._executor)
            # a new mapping, never one changed in place: the loop may be walking the old one
            # (a snapshot) while a notebook cell makes a queue on its own thread
            self._queues = {**self._queues, name: queue}
        if self._state == "running":
            self._start_late(queue, f"queue {name!r}")
        return queue

    def _start_late(self, service: WorkQueue | Trigger, what: str) -> None:
        """Start a queue or trigger made while the engine runs, as a start would have.

        With the memory store that is launching its loops, at once. A durable
        store's start also takes up what an earlier start left in the store (a
        queue's jobs, a trigger's counts) and saves from then on: that is a task
        of the engine's, which its stop waits for. From another thread the start
        is handed to the engine's loop.
        """
        loop = self._loop
        assert loop is not None and self._loop_thread is not None
        if threading.get_ident() == self._loop_thread:
            self._begin_late(service, what)
            return
        # what the caller does next (notify, put) goes to the loop too, queued behind the start
        service.bind_loop(loop, self._loop_thread)
        loop.call_soon_threadsafe(self._begin_late, service, what)

    def _what_to_hand_over(self) -> list[tuple[str, Callable[[], None]]]:
        """The process exits and this engine did not stop, its loop gone: what hands the store
        what its queues and runs accepted and did not write (each once: what the loop's
        teardown handed over already is not handed again). Nothing while its loop still runs
        (another thread's), and nothing in a fork of the process that started it."""
        if self._state not in ("running", "stopping") or self._pid != os.getpid():
            return []
        if self._loop is not None and self._loop.is_running():
            return []
        return self._hand_overs()

    def _hand_overs(self) -> list[tuple[str, Callable[[], None]]]:
        """What each hands the store what the queues and the runs accepted and did not write
        (as the loop ends, or the process), and what it is, as a log would say it."""
        parts: list[tuple[str, Callable[[], None]]] = [
            (f"what queue {queue.name!r} accepted", queue.hand_over_unwritten) for queue in list(self._queues.values())
        ]
        parts.append((f"the runs node {self.node_id} accepted", self._executor.hand_over_unwritten))
        return parts

    def _hand_over_if_torn_down(self, service: WorkQueue | Trigger) -> None:
        """A late start of ``service``, or the wait to try it again, was cancelled: by the loop's
        teardown with no stop (a stop is "stopping" before it cancels them), a queue's jobs put
        since it was made are in no store yet."""
        if self._state == "running" and isinstance(service, WorkQueue):
            service.hand_over_unwritten()

    def _begin_late(self, service: WorkQueue | Trigger, what: str, delay: float = _LATE_RETRY_FIRST) -> None:
        if self._state != "running":
            return  # stopped meanwhile: the next start starts it with the rest
        if not self._durable:
            service.launch()
            return
        task = spawn(service.start(), name=f"taskwatch-start-{what}")
        self._late_starts.add(task)
        task.add_done_callback(functools.partial(self._late_started, service, what, delay))

    def _late_started(self, service: WorkQueue | Trigger, what: str, delay: float, task: asyncio.Task[None]) -> None:
        self._late_starts.discard(task)
        if task.cancelled():
            self._hand_over_if_torn_down(service)
            return
        if (exc := task.exception()) is None:
            return
        if self._state != "running" or self._loop is None:
            log.error("%s made while node %s runs could not start: %s", what, self.node_id, exc, exc_info=exc)
            return
        # the store failing for a moment (a restart, a lock, a cut) must not leave a queue with
        # no consumers or a trigger with no sweep until the next engine start: try again
        log.error("%s made while node %s runs could not start (trying again in %.3g s): %s",
                  what, self.node_id, delay, exc, exc_info=exc)  # fmt: skip
        # a task, not a timer: the loop's teardown cancels a task, and a queue waiting for its
        # retry holds jobs that are in no store yet (a timer would be dropped unsaid)
        retry = spawn(asyncio.sleep(delay), name=f"taskwatch-retry-start-{what}")
        self._late_retries[service] = retry
        retry.add_done_callback(functools.partial(self._late_retry_due, service, what, min(delay * 2, _LATE_RETRY_MAX)))

    def _late_retry_due(self, service: WorkQueue | Trigger, what: str, delay: float, retry: asyncio.Task[None]) -> None:
        if self._late_retries.get(service) is retry:
            del self._late_retries[service]
        if retry.cancelled():
            self._hand_over_if_torn_down(service)
        else:
            self._begin_late(service, what, delay)

    @_on_loop
    def queues(self) -> list[QueueInfo]:
        return [q.info() for q in self._queues.values()]

    def _queue_named(self, name: str) -> WorkQueue:
        queue = self._queues.get(name)
        if queue is None:
            raise UnknownQueue(name, self._queues)
        return queue

    @_on_loop
    def pause_queue(self, name: str) -> QueueInfo:
        """Stop the queue's consumers taking jobs; ``put`` still accepts jobs up to ``maxsize``.

        Jobs being handled finish. Raises :class:`UnknownQueue` for a name no
        queue has. Published as ``queue.paused``.
        """
        return self._queue_named(name).pause()

    @_on_loop
    def resume_queue(self, name: str) -> QueueInfo:
        """Let a paused queue's consumers take jobs again (``queue.resumed``)."""
        return self._queue_named(name).resume()

    async def purge_queue(self, name: str) -> QueuePurge:
        """Drop every job waiting in the queue, and its row in a durable store; returns how many.

        Jobs being handled finish. The count is kept in ``QueueInfo.purged``
        and published as ``queue.purged``. Raises :class:`UnknownQueue` for a
        name no queue has.
        """
        return await self._queue_named(name).purge()

    def trigger(
        self, name: str, fn: Callable[[TaskContext, str], Awaitable[Any]], **options: Unpack[TriggerKwargs]
    ) -> Trigger:
        """Create a threshold trigger: ``notify(key)`` counts; a key runs ``fn`` when due.

        Options: ``size_threshold``, ``staleness`` (timedelta or seconds),
        ``staleness_min``, ``check_interval``, ``retries``, ``timeout``,
        ``save_interval``, ``forget_after`` (how long an idle key is kept).
        """
        if (problem := name_problem("name", name)) is not None:
            raise InvalidConfiguration(f"trigger {name!r}", [problem])
        check_option_names("Engine.trigger()", options, Trigger)
        self._refuse_in_fork()  # (as queue())
        with self._defining:
            if name in self._triggers:
                raise DuplicateTask("trigger", name)
            trigger = Trigger(self, name, fn, self._executor, **options)
            self._triggers = {**self._triggers, name: trigger}  # (copied as queue() copies)
        if self._state == "running":
            self._start_late(trigger, f"trigger {name!r}")
        return trigger

    def triggers(self, keys_limit: int | None = None) -> list[TriggerState]:
        """Every trigger with all its keys, or with the ``keys_limit`` hottest of each
        (queued or running first, then the biggest counts). Raises :class:`InvalidQuery`
        for a ``keys_limit`` that is neither None nor an int of 0 or more."""
        if keys_limit is not None:
            check_query(
                limit_problem("keys_limit", keys_limit, 0, "how many keys of each trigger to list (None for all)"),
                what="triggers query",
            )
        if get_ident() != self._loop_thread:
            # from another thread the loop is asked to answer first, as by every read hopped there
            # (a held loop: the same TimeoutError); the listing itself is not made there whole:
            # each state() reads its keys on the loop a step at a time and lists them in this
            # thread. (The triggers' dict is replaced, never changed, when one is made.)
            self._hop("triggers", _answers)
        return [t.state(keys_limit) for t in self._triggers.values()]

    def fire_trigger(self, name: str, key: str) -> TriggerFire:
        """Queue a run of trigger ``name`` for ``key`` now, whatever its count.

        A key with a run queued or running already gets no second one
        (``fired=False`` names that run). Published as ``trigger.fired`` with
        reason ``manual``. Raises :class:`UnknownTrigger`, :class:`InvalidKey`,
        :class:`QueueFull` or :class:`EngineNotRunning`; nothing changes then.
        """
        trigger = self._triggers.get(name)
        if trigger is None:
            raise UnknownTrigger(name, self._triggers)
        return trigger.fire(key)

    # ------------------------------------------------------------------ supervised workers

    @overload
    def supervised(
        self,
        fn: W,
        *,
        name: str | None = None,
        leader_only: bool = False,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
    ) -> W: ...

    @overload
    def supervised(
        self,
        fn: None = None,
        *,
        name: str | None = None,
        leader_only: bool = False,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
    ) -> Callable[[W], W]: ...

    def supervised(
        self,
        fn: W | None = None,
        *,
        name: str | None = None,
        leader_only: bool = False,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
    ) -> W | Callable[[W], W]:
        """Register a long-lived ``async def worker(ctx)`` restarted with backoff when it crashes.

        Raises :class:`TaskDefinitionError` for a worker that cannot be called as ``fn(ctx)``
        (an object whose ``__call__`` is such a function is one), as a task's is checked.
        """

        def decorate(func: W) -> W:
            self._supervisor.add(
                func, name=name, leader_only=leader_only, backoff=backoff, backoff_max=backoff_max
            )
            return func

        return decorate(fn) if fn is not None else decorate

    @_on_loop
    def workers(self) -> list[WorkerInfo]:
        return self._supervisor.workers()

    @_on_loop_async
    async def restart_worker(self, name: str) -> WorkerInfo:
        """Cancel a supervised worker and start it again now, its backoff forgotten.

        A stopped worker is started. A leader-only worker can be restarted only
        on the node that leads: elsewhere :class:`WorkerNotLeading` is raised.
        Raises :class:`UnknownWorker` for an unknown name; nothing changes on an
        error. Published as ``worker.stopped`` (reason ``restart``) and ``worker.started``.
        """
        return await self._supervisor.restart(name)

    @_on_loop_async
    async def stop_worker(self, name: str) -> WorkerInfo:
        """Cancel a supervised worker and keep it stopped until ``start_worker`` or ``restart_worker``.

        It stays stopped across crashes and leadership changes; its info says
        ``state="stopped"`` and ``stopped_by_user``. Published as ``worker.stopped``
        (reason ``user``).
        """
        return await self._supervisor.stop_worker(name)

    @_on_loop
    def start_worker(self, name: str) -> WorkerInfo:
        """Let a worker stopped with :meth:`stop_worker` run again: now, or (leader-only) once this node leads.

        Published as ``worker.resumed``; a worker that is not stopped is left as it is.
        """
        return self._supervisor.start_worker(name)


    # ------------------------------------------------------------------ execution (the executor's callbacks)

    def _node_load(self) -> tuple[float | None, int | None]:
        """CPU and RSS of the last health sample, written to the nodes table with each heartbeat."""
        sample = self._health.last
        return (None, None) if sample is None else (sample.cpu_percent, sample.rss_bytes)

    def _superseded(self, tokens: Collection[str], lost: Sequence[str]) -> None:
        """A later process registered under this node's id: the store counts this incarnation
        gone, and every node recovers what it claims at once. The executor claims no more and
        gives up ``tokens``; leading on would make two leaders of one id. Loud, since only the
        operator can end it (this process does not stop by itself)."""
        stopped = [*lost, *self._run.claimed_runs(tokens)]
        self._leader.suspend()
        for queue in self._queues.values():
            queue.node_superseded()
        dropped = f"; it stopped the {len(stopped)} run(s) it was executing, which other nodes take over" if stopped else ""
        log.error(
            "node %s: a newer process started with the same node_id and replaced this process's incarnation "
            "(%s) in %s. This process (pid %d) no longer claims runs, starts stored queue jobs or leads%s. "
            "Stop this process, or give each process its own node_id",
            self.node_id, self.incarnation, self._store.describe(), os.getpid(), dropped,
        )  # fmt: skip
        self.bus.emit(NodeSuperseded, store=self._store.describe(), incarnation=self.incarnation, stopped=stopped)

    def _claim_limits(self) -> dict[str, int | None]:
        """Every task this node can execute, with its concurrency limit (kept as tasks register)."""
        return self._limits

    def __repr__(self) -> str:
        return (
            f"<Engine {self.node_id} {self._state} tasks={len(self._tasks)} "
            f"pending={self._index.counts[_PENDING]} running={self._index.counts[_RUNNING]}>"
        )

    def _repr_html_(self) -> str:
        """Counts by status, recent runs and failures, for notebooks."""
        from .display import engine_html, engine_view

        return engine_html(engine_view(self))

    def __rich__(self) -> Any:
        """The same view as a Rich panel, for terminals."""
        from .display import engine_rich, engine_view

        return engine_rich(engine_view(self))
