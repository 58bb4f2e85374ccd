"""Supervised long-lived workers: restarted with backoff, optionally leader-only.

A supervised worker is an ``async def worker(ctx)`` meant to run for the
engine's whole life. Each one gets a supervising asyncio task that runs it and
restarts it:

* after a crash, with exponential backoff: ``backoff`` seconds doubling per
  consecutive crash up to ``backoff_max``. No jitter: only one node runs a
  leader-only worker, so there is no herd of restarts to spread out;
* after a clean return, after the base ``backoff`` (a supervised worker is
  meant to run forever, so returning is treated as "run me again"), with the
  crash streak reset; a ``worker.stopped`` event with reason ``returned`` says so;
* a run that lasted at least ``backoff_max`` before crashing also resets the
  streak, so a worker that crashes once a day is not stuck at the cap forever.

A ``leader_only`` worker runs only while this node holds the leader lease: the
supervisor listens to the engine's :class:`~.lease.LeaderElector`, cancels such
workers when leadership is lost (waiting for them as a stop does, re-cancelling
one that swallows the cancel; it is reported running until it has ended) and
starts them again when it is regained.

An operator can restart a worker now (cancel the running one, forget the
backoff, start again; a leader-only worker only where this node leads), stop
it (it stays stopped, whatever leadership does, until started or restarted)
and start it again. Each is published as an event.

The engine's stop cancels the workers first, before its queues, triggers and runs
drain (workers feed them), and starts none again. A worker the stopping engine
refused work just before it was cancelled (its ``put`` or ``submit`` raised
``EngineNotRunning``) was stopped by the shutdown, not crashed.

A worker whose cleanup outlasts every wait (an engine stop, a lost leadership,
an operator's stop or restart) is reported ``running`` until its code has
really ended, and is never started beside itself: when it ends, it is started
again if it should run by then (the engine was started again meanwhile, leadership
came back, a restart asked for it). Ending after the engine's stop, it is
``stopped`` with reason ``shutdown`` (``user`` if ``stop_worker`` stopped it).

Without a lease every engine leads: nodes sharing a store then all run every
leader-only worker. A node that has leader-only workers and no lease watches
the store's nodes table and logs a warning, once per start, when it sees
another live node there.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from .context import TaskContext
from .errors import (
    DuplicateTask,
    EngineNotRunning,
    InvalidConfiguration,
    NotLeader,
    UnknownWorker,
    WorkerNotLeading,
)
from .events import WorkerCrashed, WorkerResumed, WorkerStarted, WorkerStopped
from .logs import log_safely, log_text, traceback_block
from .hop import cancel_and_wait, spawn
from .jsonsafe import name_problem
from .options import MIN_INTERVAL, WorkerOptions, check_options
from .runs import RunError
from .store.base import gone_incarnations
from .tasks import check_worker_fn, registered_name

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from .engine import Engine

log = logging.getLogger("taskwatch.supervisor")

#: characters of a crash's message its log line shows at most (its traceback has the whole)
_CRASH_TEXT_LIMIT = 200

WorkerState = Literal["running", "backoff", "waiting_for_leadership", "stopped", "returned"]
StopReason = Literal["cancelled", "leadership_lost", "shutdown", "user", "restart"]

#: the crash streak's bound: ``backoff * 2.0 ** 1023`` is finite, and past every ``backoff_max``
_MAX_STREAK = 1024

#: how often stop() re-cancels a worker that keeps swallowing cancellation
#: before it waits for it without a bound (no task may outlive the engine)
_CANCEL_ROUNDS = 3


class WorkerInfo(BaseModel):
    """One supervised worker as ``engine.workers()`` reports it. Times are UNIX seconds.

    ``restarts`` counts starts after a crash or a clean return (not the first
    start, nor starts on regaining leadership or asked for with
    ``restart_worker``); ``crashes`` counts crashes. ``stopped_by_user``: stopped
    with ``stop_worker``; it stays stopped until ``start_worker`` or ``restart_worker``.
    A worker being stopped (by the engine's stop, a lost leadership, ``stop_worker``
    or ``restart_worker``) stays ``running`` until its code has ended, also when the
    stop gave up waiting for a cleanup that ignores cancellation.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    leader_only: bool
    state: str  # "running", "backoff", "waiting_for_leadership", "stopped", "returned"
    restarts: int = 0
    crashes: int = 0
    started_at: float | None = None
    last_error: RunError | None = None
    last_error_at: float | None = None
    next_restart_at: float | None = None
    stopped_by_user: bool = False


@dataclass(slots=True, eq=False)
class _Worker:
    """The supervisor's mutable record of one worker."""

    name: str
    fn: Callable[[TaskContext], Awaitable[Any]]
    leader_only: bool
    backoff: float
    backoff_max: float
    state: WorkerState = "stopped"
    restarts: int = 0
    crashes: int = 0
    #: crashes since the last clean return or long healthy run; sets the next delay
    streak: int = 0
    started_at: float | None = None
    last_error: RunError | None = None
    last_error_at: float | None = None
    next_restart_at: float | None = None
    #: the loop time a crash's backoff ends, while one is owed: kept when leadership is lost
    #: during the wait, so regaining it does not restart a crashing worker early
    backoff_ends: float | None = None
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    #: set by whoever cancels ``task``, so the task can tell why it ends
    stop_reason: StopReason | None = None
    #: stopped with stop_worker: not started again until start_worker or restart_worker
    held: bool = False
    #: ``task`` has taken its first step (one cancelled before that never ran its own cleanup)
    began: bool = False
    #: held by restart_worker and stop_worker, so two issued together act one after the other
    lock: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False)

    def delay_after_crash(self) -> float:
        return min(self.backoff_max, self.backoff * 2.0 ** (self.streak - 1))

    def info(self) -> WorkerInfo:
        return WorkerInfo(
            name=self.name,
            leader_only=self.leader_only,
            state=self.state,
            restarts=self.restarts,
            crashes=self.crashes,
            started_at=self.started_at,
            last_error=self.last_error,
            last_error_at=self.last_error_at,
            next_restart_at=self.next_restart_at,
            stopped_by_user=self.held,
        )


class Supervisor:
    """Runs the engine's supervised workers and keeps them running."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._workers: dict[str, _Worker] = {}
        self._running = False
        #: waits for leader-only workers cancelled on a lost leadership (the listener cannot await)
        self._winding_down: set[asyncio.Task[None]] = set()
        #: the workers' tasks the last stop gave up on (code that ignored every cancel)
        self._left_going: list[asyncio.Task[None]] = []
        #: looks for other live nodes on the store while leader-only workers run without a lease
        self._other_leaders_watch: asyncio.Task[None] | None = None
        engine.elector.add_listener(self.on_leadership)
        engine.elector.hold_release(self.wound_down)

    # ------------------------------------------------------------------ registry

    def add(
        self,
        fn: Callable[[TaskContext], Awaitable[Any]],
        *,
        name: str | None = None,
        leader_only: bool = False,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
    ) -> WorkerInfo:
        """Register a worker; started at once if the engine is already running.

        Everything is checked before anything is recorded: a refused worker leaves
        no trace. Callable from any thread: on an engine running on another
        thread's loop (``start_background``) the worker is added, and started, there.
        """
        worker_name = registered_name(fn, name, "worker")
        where = f"supervised worker {worker_name!r}"
        check_worker_fn(fn, worker_name)
        problems: list[str] = []
        if (problem := name_problem("name", worker_name)) is not None:
            problems.append(problem)
        if not isinstance(leader_only, bool):
            problems.append(f"leader_only={leader_only!r}: True or False is needed")
        options: WorkerOptions | None = None
        try:
            # its values, not the given ones, are kept: "0.1" is read as 0.1, as every option is
            options = check_options(WorkerOptions, where, backoff=backoff, backoff_max=backoff_max)
        except InvalidConfiguration as exc:
            problems.extend(exc.problems)
        if problems or options is None:
            raise InvalidConfiguration(where, problems)
        worker = _Worker(worker_name, fn, leader_only, options.backoff, options.backoff_max)
        # the registry and the worker's task belong to the engine's loop
        return self._engine.on_its_loop(self._register, worker, what="supervised")

    def _register(self, worker: _Worker) -> WorkerInfo:
        if worker.name in self._workers:
            raise DuplicateTask("supervised worker", worker.name)
        self._workers[worker.name] = worker
        if self._running:
            self._reconcile(worker)
            self._watch_for_other_leaders()
        return worker.info()

    def workers(self) -> list[WorkerInfo]:
        return [w.info() for w in self._workers.values()]

    def _get(self, name: str) -> _Worker:
        worker = self._workers.get(name)
        if worker is None:
            raise UnknownWorker(name, self._workers)
        return worker

    # ------------------------------------------------------------------ operator actions

    async def restart(self, name: str) -> WorkerInfo:
        """Cancel the worker's current run (or its backoff wait) and start it again now.

        The crash streak is forgotten, so a later crash waits the base backoff.
        A stopped worker is started. Raises :class:`UnknownWorker`,
        :class:`EngineNotRunning`, or :class:`WorkerNotLeading` for a
        leader-only worker on a node that does not lead; nothing changes then.
        """
        worker = self._get(name)
        async with worker.lock:
            # checked once the actions issued before this one are done: they may have changed it
            if not self._running:
                raise EngineNotRunning(self._engine.state)
            if worker.leader_only and not self._leads():
                raise WorkerNotLeading(name, self._engine.node_id, self._engine.elector.holder)
            worker.held = False
            worker.streak = 0
            worker.backoff_ends = None
            try:
                await self._end(worker, "restart")
            finally:
                # also when the caller gave up waiting for the cleanup: the worker is not left
                # ended (a copy still unwinding is started again by its done-callback)
                self._start_now(worker)
            return worker.info()

    async def stop_worker(self, name: str) -> WorkerInfo:
        """Cancel the worker and keep it stopped (across leadership changes) until started again."""
        worker = self._get(name)
        async with worker.lock:
            if worker.held:
                return worker.info()
            worker.held = True
            if not await self._end(worker, "user"):
                # nothing was running (a backoff wait or a wait for leadership has a task: not here)
                worker.state = "stopped"
                worker.next_restart_at = None
                self._engine.bus.emit(WorkerStopped, name=worker.name, reason="user")
            return worker.info()

    def start_worker(self, name: str) -> WorkerInfo:
        """Let a worker stopped with :meth:`stop_worker` run again (now, or once this node leads).

        A worker not stopped that way is left as it is, except one with nothing of it left
        running on a running engine (its task was cancelled from outside): that one is started.
        """
        worker = self._get(name)
        if not worker.held:
            if self._running and (worker.task is None or worker.task.done()):
                # a copy still ending is not touched: its done-callback starts the next one
                self._start_now(worker)
            return worker.info()
        worker.held = False
        worker.streak = 0
        worker.backoff_ends = None
        self._start_now(worker)
        self._engine.bus.emit(WorkerResumed, name=worker.name, state=worker.state)
        return worker.info()

    def _leads(self) -> bool:
        return self._engine.elector.leads()

    def _start_now(self, worker: _Worker) -> None:
        if not self._running:
            return  # the engine's start starts it
        self._reconcile(worker)
        if worker.task is not None and not worker.task.done():
            left = self._backoff_left(worker)
            if left:
                # it first waits out the backoff its last crash earned
                worker.state = "backoff"
                worker.next_restart_at = self._engine.clock() + left
            else:
                # its task runs on the next loop turn; say so from now on
                worker.state = "running"
                worker.started_at = self._engine.clock()

    async def _end(self, worker: _Worker, reason: StopReason) -> bool:
        """Cancel ``worker``'s task (``reason`` says why) and wait for it; False when none ran."""
        task = self._cancel(worker, reason)
        if task is None:
            return False
        loop = asyncio.get_running_loop()
        await self._await_cancelled([task], loop.time() + self._engine.cancel_grace)
        return True

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._running = True
        self._left_going = []
        for worker in self._workers.values():
            # one whose last copy still runs (its cleanup outlasted the last stop) is
            # started by that copy's done-callback once it has ended
            self._reconcile(worker)
        self._watch_for_other_leaders()

    def halt(self) -> None:
        """The engine's stop has begun: cancel every worker now and start none again.

        No await: the engine calls it before anything of its stop awaits, so a worker never
        runs on into the stop (its puts and submits refused) before it is cancelled.
        :meth:`stop` waits for the workers' cleanup.
        """
        self._running = False
        if self._other_leaders_watch is not None:
            self._other_leaders_watch.cancel()
        for worker in self._workers.values():
            self._cancel(worker, "shutdown")

    async def stop(self, deadline: float) -> None:
        """Cancel every worker (if :meth:`halt` has not) and wait for their cleanup until
        ``deadline`` (loop time), re-cancelling one that swallows the cancel."""
        self.halt()
        watch, self._other_leaders_watch = self._other_leaders_watch, None
        await cancel_and_wait(watch)
        tasks = [t for w in self._workers.values() if (t := self._cancel(w, "shutdown")) is not None]
        await self._await_cancelled(tasks, deadline)
        self._left_going = [t for t in tasks if not t.done()]
        # the workers they wait for were just waited for (and warned about) here
        for waiter in list(self._winding_down):
            await cancel_and_wait(waiter)
        for worker in self._workers.values():
            worker.next_restart_at = None
            worker.backoff_ends = None  # the next start starts it at once
            if worker.task is None or worker.task.done():
                worker.state = "stopped"
            # else its code still runs (a cleanup that ignored every cancel): it says "running"
            # until it ends, when it says "stopped" (and starts again if the engine runs by then)

    def left_going(self) -> list[asyncio.Task[None]]:
        """The workers' tasks still going after the last :meth:`stop` gave up on them (code that
        ignored every cancel): whoever closes the loop need not cancel them again."""
        return [t for t in self._left_going if not t.done()]

    def leader_only_running(self) -> list[str]:
        """The leader-only workers whose code still runs (after a stop: a cleanup that
        ignored every cancel), by name."""
        return sorted(w.name for w in self._running_leader_only())

    def on_leadership(self, is_leader: bool) -> None:
        """The elector's listener: start or cancel the leader-only workers."""
        if not self._running:
            # the elector outlives the supervisor at shutdown; nothing to do then
            return
        for worker in self._workers.values():
            if not worker.leader_only or worker.held:
                continue
            if is_leader:
                self._reconcile(worker)
                continue
            task = self._cancel(worker, "leadership_lost")
            if task is None:
                worker.state = "waiting_for_leadership"
                worker.next_restart_at = None
            else:
                # a worker that swallows the cancel would go on as a second leader: wait for it,
                # re-cancelling, as a stop does; its state changes once its task has ended
                self._wind_down(task)

    async def wound_down(self) -> None:
        """Return once no leader-only worker's code runs any more: those cancelled on a lost
        leadership have ended, however long a cleanup that ignores every cancel takes.

        It waits on the workers' own tasks, not on the waiters that re-cancel them: a stop
        ends those waiters (the stop re-cancels the workers itself), not the code still running,
        and a term released when they end would start the worker on another node beside it.
        """
        while running := [w.task for w in self._running_leader_only() if w.task is not None]:
            await asyncio.wait(running)

    def _running_leader_only(self) -> list[_Worker]:
        return [w for w in self._workers.values() if w.leader_only and w.task is not None and not w.task.done()]

    def _wind_down(self, task: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        waiter = spawn(self._outlast(task, loop.time() + self._engine.cancel_grace), name=f"{task.get_name()}-winding-down")
        self._winding_down.add(waiter)
        waiter.add_done_callback(self._winding_down.discard)

    async def _outlast(self, task: asyncio.Task[None], deadline: float) -> None:
        """Re-cancel a leader-only worker that lost its leadership (warning of one that ignores
        every cancel). Code still running after that is still this node's leader-only code:
        :meth:`wound_down` waits for it, so the term given up stays held (renewed) until it ends,
        or another node would start the worker beside it. Only the engine's stop gives up on
        it, at its deadline (the term then lapses at its ttl rather than being handed over)."""
        await self._await_cancelled([task], deadline)

    # ------------------------------------------------------------------ leaders without a lease

    def _watch_for_other_leaders(self) -> None:
        """Without a lease every node leads: watch for other live nodes on the store while
        this one has leader-only workers (once started, until the engine stops)."""
        if self._engine.elector.lease is not None or self._other_leaders_watch is not None:
            return
        if not any(w.leader_only for w in self._workers.values()):
            return
        self._other_leaders_watch = spawn(
            self._look_for_other_leaders(), name=f"taskwatch-other-leaders-{self._engine.node_id}"
        )

    async def _look_for_other_leaders(self) -> None:
        """Warn, once, when another live node shares the store: it leads too, and may run the
        same leader-only workers beside these. Its nodes table is all that says so; a node that
        starts later is seen within a third of ``node_ttl``."""
        store = self._engine.store
        interval = max(MIN_INTERVAL, store.node_ttl / 3)
        while True:
            others = await self._other_live_nodes()
            workers = sorted(w.name for w in self._workers.values() if w.leader_only and not w.held)
            if others and workers:
                log.warning(
                    "node %s has no lease, so it leads whatever other nodes do, and other live nodes "
                    "share its store %s: %s. Leader-only workers (here %s) run on every node without a "
                    "lease at once. Give every node the same lease (lease=RedisLease(...) or "
                    "lease=PostgresLease(...)), or register leader-only workers on one node only",
                    self._engine.node_id, store.describe(), ", ".join(map(repr, others)), ", ".join(map(repr, workers)),
                )  # fmt: skip
                return
            await asyncio.sleep(interval)

    async def _other_live_nodes(self) -> list[str]:
        """The ids of the other live incarnations on this engine's store (none if it cannot say)."""
        store = self._engine.store
        try:
            nodes = await store.nodes()
        except Exception:  # noqa: BLE001 - out of reach or refusing: the executor logs that; look again later
            log.debug("node %s: reading the nodes table failed", self._engine.node_id, exc_info=True)
            return []
        gone = gone_incarnations(nodes, store.clock(), store.node_ttl)
        me = self._engine.incarnation
        return sorted({n.node for n in nodes if n.incarnation != me and n.incarnation not in gone})

    # ------------------------------------------------------------------ internals

    def _may_run(self, worker: _Worker) -> bool:
        if not self._running or worker.held:
            return False
        if not worker.leader_only:
            return True
        return self._leads()

    def _reconcile(self, worker: _Worker) -> None:
        """Start ``worker`` if it should run and is not running already."""
        if worker.task is not None and not worker.task.done():
            # still unwinding from a cancel: its done-callback reconciles again
            return
        if not self._may_run(worker):
            if worker.held:
                worker.state = "stopped"
            elif worker.leader_only and self._running:
                worker.state = "waiting_for_leadership"
            return
        worker.stop_reason = None
        worker.began = False
        task = spawn(
            self._supervise(worker), name=f"taskwatch-worker-{worker.name}"
        )
        worker.task = task
        task.add_done_callback(lambda t: self._task_done(worker, t))

    def _task_done(self, worker: _Worker, task: asyncio.Task[None]) -> None:
        if worker.task is task:
            worker.task = None
            if task.cancelled() and not worker.began:
                # cancelled before its first step (stopped right after a start): say so as _supervise would
                self._stopped(worker, worker.stop_reason or "cancelled")
        # what ended it may have been undone while it unwound: leadership came back,
        # start_worker was called during a stop_worker, a restart's caller stopped waiting
        # for (or gave up on) a cleanup longer than its cancel rounds, or the engine was
        # started again after a stop that gave up on it (its start left this to us)
        if worker.stop_reason in ("leadership_lost", "user", "restart", "shutdown"):
            self._start_now(worker)

    def _cancel(self, worker: _Worker, reason: StopReason) -> asyncio.Task[None] | None:
        task = worker.task
        if task is None or task.done():
            return None
        if worker.stop_reason is not None:
            # already told to stop, and cleaning up: a second cancel would cut that cleanup
            # short (the waiters re-cancel one that swallows the first, once its time is up).
            # stop_worker's stop overrides why, and the engine's stop does unless stop_worker's
            # (which outlives it) did it: a worker whose lost leadership or restart ends after
            # either is not waiting for leadership nor restarted, it was stopped, and its
            # worker.stopped says by whom
            if reason == "user" or (reason == "shutdown" and worker.stop_reason != "user"):
                worker.stop_reason = reason
            return task
        worker.stop_reason = reason
        task.cancel()
        return task

    async def _await_cancelled(self, tasks: list[asyncio.Task[None]], deadline: float) -> None:
        """Await cancelled worker tasks; re-cancel ones that swallow cancellation."""
        loop = asyncio.get_running_loop()
        pending = {t for t in tasks if not t.done()}
        for _ in range(_CANCEL_ROUNDS):
            if not pending:
                return
            # cleanup gets until the deadline, or the engine's grace once it has passed
            remaining = deadline - loop.time()
            timeout = remaining if remaining > 0 else self._engine.cancel_grace
            _, pending = await asyncio.wait(pending, timeout=timeout)
            for task in pending:
                task.cancel()
        if pending:
            # a worker that ignores cancellation this long is a bug in that worker; waiting for
            # it forever would hang stop() and stop_worker(), so say so and go on (as for runs)
            log.warning(
                "node %s: supervised workers %s ignored cancellation %d times and are still running",
                self._engine.node_id, sorted(t.get_name() for t in pending), _CANCEL_ROUNDS,
            )

    async def _supervise(self, worker: _Worker) -> None:
        """Run ``worker`` until cancelled, restarting it after crashes and returns."""
        worker.began = True
        delay: float | None = self._backoff_left(worker) or None
        if delay is not None:
            worker.state = "backoff"
        try:
            while True:
                if delay is not None:
                    await self._pause(worker, delay)
                    if not self._may_run(worker):
                        # leadership lapsed during the pause; the elector's
                        # notification (or a later one) starts it again
                        worker.state = "waiting_for_leadership"
                        return
                    worker.restarts += 1
                delay = await self._run_once(worker)
                if delay is None:
                    return
        except asyncio.CancelledError:
            self._stopped(worker, worker.stop_reason or "cancelled")
            raise

    async def _pause(self, worker: _Worker, delay: float) -> None:
        worker.next_restart_at = self._engine.clock() + delay
        worker.backoff_ends = asyncio.get_running_loop().time() + delay
        try:
            await asyncio.sleep(delay)
            worker.backoff_ends = None
        finally:
            worker.next_restart_at = None

    @staticmethod
    def _backoff_left(worker: _Worker) -> float:
        """Seconds left of the backoff ``worker`` still owes (0 if none)."""
        if worker.backoff_ends is None:
            return 0.0
        return max(0.0, worker.backoff_ends - asyncio.get_running_loop().time())

    async def _run_once(self, worker: _Worker) -> float | None:
        """Run the worker function once; return the delay before the next start, or None to end."""
        engine = self._engine
        leader = engine.elector
        worker.state = "running"
        worker.started_at = self._engine.clock()
        engine.bus.emit(
            WorkerStarted,
            name=worker.name,
            restarts=worker.restarts,
            term=leader.term if worker.leader_only else None,
        )
        started = asyncio.get_running_loop().time()
        try:
            await worker.fn(TaskContext(engine, None, worker.name))
        except asyncio.CancelledError as exc:
            if _cancel_requested():
                raise
            # raised by the worker's own code, not a cancel of this task: a crash
            error: BaseException = exc
        except NotLeader as exc:
            if worker.leader_only and not self._may_run(worker):
                # ensure_leader() noticed the lost lease before the elector did (or the
                # worker was being stopped anyway: that reason stands)
                worker.stop_reason = worker.stop_reason or "leadership_lost"
                self._stopped(worker, worker.stop_reason)
                return None
            error = exc
        except BaseException as exc:  # noqa: BLE001
            # SystemExit or KeyboardInterrupt from a worker is that worker's crash,
            # not the process's: restarting it with backoff is the supervisor's job
            error = exc
        else:
            if worker.stop_reason is not None:
                # swallowed a cancel and returned: it was stopped all the same
                self._stopped(worker, worker.stop_reason)
                return None
            worker.streak = 0
            worker.state = "returned"
            engine.bus.emit(WorkerStopped, name=worker.name, reason="returned")
            return worker.backoff
        if worker.stop_reason is not None:
            # failed while cleaning up after a cancel: stopping wins, no restart, but what
            # the cleanup left undone must not go unseen
            worker.last_error = RunError.from_exception(error)
            worker.last_error_at = self._engine.clock()
            self._stopped(worker, worker.stop_reason)
            log_safely(
                log, logging.WARNING, "supervised worker %r raised %s while it was being stopped (%s): %s",
                worker.name, log_text(worker.last_error.type), worker.stop_reason,
                log_text(worker.last_error.message, _CRASH_TEXT_LIMIT), exc_info=error,
            )  # fmt: skip
            return None
        if self._refused_by_the_stop(error):
            # the engine began to stop just before it cancelled this worker, and refused what the
            # worker fed it (a put, a submit): the stop ended it, it did not crash. Not started
            # again either (no stop_reason: the done-callback leaves it to the stop)
            log.info(
                "supervised worker %r ended as the engine stops (%s)", worker.name, log_text(type(error).__name__)
            )
            self._stopped(worker, "shutdown")
            return None
        ran_for = asyncio.get_running_loop().time() - started
        return self._crashed(worker, error, ran_for)

    def _refused_by_the_stop(self, error: BaseException) -> bool:
        """Whether ``error`` is (or was raised from) the engine refusing work because it stops."""
        if self._engine.state == "running":
            return False
        seen: set[int] = set()
        cause: BaseException | None = error
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, EngineNotRunning):
                return True
            seen.add(id(cause))
            cause = cause.__cause__
        return False

    def _crashed(self, worker: _Worker, exc: BaseException, ran_for: float) -> float:
        # a run that stayed up as long as the longest delay was healthy; start over. The streak
        # stops growing long past any cap (2.0 ** 1024 would raise OverflowError, ending the
        # supervision of a worker that crashes all night while it still said "running")
        worker.streak = 1 if ran_for >= worker.backoff_max else min(worker.streak + 1, _MAX_STREAK)
        worker.crashes += 1
        delay = worker.delay_after_crash()
        error = RunError.from_exception(exc)
        worker.state = "backoff"
        worker.last_error = error
        worker.last_error_at = self._engine.clock()
        self._engine.bus.emit(
            WorkerCrashed, name=worker.name, error=error, restarts=worker.restarts, restart_in=delay
        )
        # logged last, and guarded: a log handler that raises must not keep the restart from
        # being scheduled. The traceback once per streak: a worker crashing the same way all
        # night logs one line per restart after the first
        if log.isEnabledFor(logging.WARNING):
            log_safely(
                log, logging.WARNING, "supervised worker %r crashed (%s: %s); restart in %.3g s%s",
                worker.name, log_text(error.type), log_text(error.message, _CRASH_TEXT_LIMIT), delay,
                traceback_block(error) if worker.streak == 1 else "",
            )  # fmt: skip
        return delay

    def _stopped(self, worker: _Worker, reason: StopReason) -> None:
        # stop_worker may have come while it was ending for leadership: then it stays stopped;
        # so it does once the engine has stopped
        waits = reason == "leadership_lost" and not worker.held and self._running
        worker.state = "waiting_for_leadership" if waits else "stopped"
        worker.next_restart_at = None
        self._engine.bus.emit(WorkerStopped, name=worker.name, reason=reason)


def _cancel_requested() -> bool:
    """Whether someone asked to cancel the current task (rather than code inside it raising)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
