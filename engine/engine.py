"""The engine: registers tasks, admits and tracks runs, publishes events.

One :class:`Engine` owns every run it accepted and every loop it started; the
backend executes runs, the bus carries what happens to them. ``async with
engine`` (or ``start()`` / ``stop()``) bounds its life: ``stop`` drains, then
cancels, then awaits, so no asyncio task outlives it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from .backends import Backend, make_backend
from .bus import DEFAULT_REPLAY, EventBus
from .context import TaskContext
from .errors import (
    DuplicateTask,
    EngineNotRunning,
    InvalidParams,
    QueueFull,
    RunNotCancellable,
    RunNotFound,
    RunNotRetryable,
    UnknownTask,
)
from .events import (
    EngineStarted,
    EngineStopped,
    EngineStopping,
    RunCancelled,
    RunFailed,
    RunProgressed,
    RunRetrying,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
)
from .handle import RunHandle
from .health import HealthSampler
from .jsonsafe import NotJsonSafe, check_jsonable, check_key, jsonable, safe_str, safe_text
from .lease import LeaderElector, Leadership
from .options import EngineOptions, TaskOptions, check_options
from .queues import QueueInfo, WorkQueue
from .runs import (
    CancelReason,
    EngineStats,
    Run,
    RunError,
    RunList,
    RunRecord,
    RunStatus,
)
from .scheduler import PeriodicInfo, Scheduler
from .snapshot import Snapshot
from .supervisor import Supervisor, WorkerInfo
from .tasks import TaskFn, TaskInfo, TaskSpec, params_model_of
from .triggers import Trigger, TriggerState
from .version import __version__

F = TypeVar("F", bound=TaskFn)

log = logging.getLogger("taskwatch.engine")

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_SUCCEEDED = RunStatus.SUCCEEDED
_FAILED = RunStatus.FAILED
_CANCELLED = RunStatus.CANCELLED


def _random_id() -> str:
    return os.urandom(8).hex()


class Engine:
    """An asyncio background-task engine.

    Parameters
    ----------
    max_concurrency:
        Runs executing at once, across all tasks.
    max_queue:
        Runs waiting for a slot; ``submit`` raises :class:`QueueFull` beyond it.
    history:
        Finished runs kept for queries; older ones are evicted oldest-finished first.
    backend:
        ``"asyncio"`` (default), ``"inline"``, or a :class:`Backend` instance.
    node_id:
        This engine's name in events and leader election (default: host-pid).
    cancel_grace:
        Seconds a cancelled running run gets to finish its cleanup.
    clock:
        Wall clock (UNIX seconds) for every timestamp recorded; replace it to
        freeze time in tests and screenshots.
    run_id_factory:
        Makes run ids (default: 16 random hex digits); ids must be unique.
    """

    def __init__(
        self,
        *,
        max_concurrency: int = 8,
        max_queue: int = 10_000,
        history: int = 1_000,
        backend: str | Backend = "asyncio",
        node_id: str | None = None,
        lease: Any = None,
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
            replay=replay,
            cancel_grace=cancel_grace,
            throughput_window=throughput_window,
            health_interval=health_interval,
        )
        self.node_id = node_id or f"{socket.gethostname()}-{os.getpid()}"
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.history = history
        self.cancel_grace = cancel_grace
        self.resources: dict[str, Any] = dict(resources or {})
        self.flags: dict[str, bool] = dict(flags or {})
        self.health_interval = health_interval
        #: wall clock for every timestamp the engine records (replaceable for tests)
        self.clock = clock
        self._new_id = run_id_factory or _random_id
        self.bus = EventBus(node=self.node_id, replay=replay, clock=clock)
        self._backend = make_backend(backend)
        self._backend.bind(self)
        self._tasks: dict[str, TaskSpec] = {}
        self._runs: dict[str, Run] = {}
        self._finished: OrderedDict[str, None] = OrderedDict()
        # (task, dedup key) -> the pending run holding it
        self._keys: dict[tuple[str, str], Run] = {}
        self._counts: dict[RunStatus, int] = {s: 0 for s in RunStatus}
        self._retry_timers: set[Run] = set()
        self._submitted_total = 0
        self._finished_total = 0
        self._totals = {_SUCCEEDED: 0, _FAILED: 0, _CANCELLED: 0}
        self._retries_total = 0
        self._tp_window = throughput_window
        # per-second buckets of [second, finished, failed] for throughput figures
        self._tp: deque[list[int]] = deque()
        self._idle: asyncio.Future[None] | None = None
        self._state = "new"
        self._shutdown: asyncio.Task[None] | None = None
        self._started_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._leader = LeaderElector(self, lease)
        self._scheduler = Scheduler(self)
        self._queues: dict[str, WorkQueue] = {}
        self._triggers: dict[str, Trigger] = {}
        self._supervisor = Supervisor(self)
        self._health = HealthSampler(self, health_interval)
        # control endpoints started by serve(); stopped last so clients see the shutdown
        self._servers: list[Any] = []

    # ------------------------------------------------------------------ registry

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
    ) -> Any:
        """Register an ``async def task(ctx, params)`` function. Usable bare or with options."""

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
    ) -> TaskSpec:
        task_name = name or fn.__name__
        if task_name in self._tasks:
            raise DuplicateTask("task", task_name)
        check_options(
            TaskOptions,
            f"task {task_name!r}",
            retries=retries,
            timeout=timeout,
            concurrency=concurrency,
            backoff=backoff,
            backoff_max=backoff_max,
        )
        model = None if kind == "periodic" else params_model_of(fn, params, task_name)
        spec = TaskSpec(
            name=task_name,
            fn=fn,
            params_model=model,
            retries=retries,
            timeout=timeout,
            concurrency=concurrency,
            backoff=backoff,
            backoff_max=backoff_max,
            kind=kind,
            resources=resources,
            description=description or (fn.__doc__ or "").strip().split("\n")[0],
        )
        self._tasks[task_name] = spec
        return spec

    def tasks(self) -> dict[str, TaskSpec]:
        """Registered tasks by name (read-only view)."""
        return dict(self._tasks)

    # ------------------------------------------------------------------ lifecycle

    @property
    def state(self) -> str:
        """``new``, ``running``, ``stopping`` or ``stopped``."""
        return self._state

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def started_at(self) -> float | None:
        return self._started_at

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the engine was started on (None before the first start)."""
        return self._loop

    async def start(self) -> None:
        if self._state == "running":
            return
        if self._state == "stopping":
            raise EngineNotRunning("stopping")
        self._loop = asyncio.get_running_loop()
        self.bus.reopen()
        self._state = "running"
        self._started_at = self.clock()
        self.bus.emit(EngineStarted, backend=self._backend.name)
        started: list[Any] = []
        try:
            for service in self._services_in_start_order():
                await service.start()
                started.append(service)
        except BaseException:
            deadline = self._loop.time() + 1.0
            for service in reversed(started):
                await service.stop(deadline)
            self._state = "stopped"
            self.bus.close()
            raise

    def _services_in_start_order(self) -> list[Any]:
        # leadership first so leader-only workers see the outcome of the first
        # election; the scheduler last so nothing it submits finds a half-started engine
        return [
            self._leader,
            self._health,
            *self._queues.values(),
            *self._triggers.values(),
            self._supervisor,
            self._scheduler,
        ]

    async def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting work, drain for up to ``timeout`` seconds, cancel the rest, await all.

        The shutdown runs as one task of the engine's own: a second caller waits
        for the same shutdown, and a caller that is itself cancelled does not
        leave the engine half stopped.
        """
        if self._state in ("new", "stopped"):
            return
        if self._shutdown is None:
            self._state = "stopping"
            self._shutdown = asyncio.get_running_loop().create_task(
                self._stop(timeout), name="taskwatch-shutdown"
            )
        await asyncio.shield(self._shutdown)

    async def _stop(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        try:
            self.bus.emit(
                EngineStopping,
                timeout=timeout,
                pending=self._counts[_PENDING],
                running=self._counts[_RUNNING],
            )
            # producers stop first so the drain below has a fixed amount of work;
            # queues drain within the deadline, supervised workers are cancelled
            await self._scheduler.stop(deadline)
            for trigger in self._triggers.values():
                await trigger.stop(deadline)
            for queue in self._queues.values():
                await queue.stop(deadline)
            await self._supervisor.stop(deadline)
            await self._wait_idle(deadline - loop.time())
            cancelled_pending = 0
            for run in list(self._retry_timers):
                self._cancel_retry_timer(run)
                self._finish_cancelled(run, "shutdown", was_running=False, discard=False)
                cancelled_pending += 1
            for run in self._backend.drain_pending():
                self._finish_cancelled(run, "shutdown", was_running=False, discard=False)
                cancelled_pending += 1
            tasks = [t for t in self._backend.running_tasks() if not t.done()]
            for t in tasks:
                owner = self._run_of_task(t)
                if owner is not None and owner.status is _RUNNING and owner.cancel_reason is None:
                    owner.cancel_reason = "shutdown"
                t.cancel()
            await self._await_tasks(tasks)
            await self._leader.stop(loop.time() + 1.0)
            await self._health.stop(loop.time())
            self.bus.emit(EngineStopped, cancelled_pending=cancelled_pending, cancelled_running=len(tasks))
            for server in self._servers:
                await server.stop()
            self._servers.clear()
        finally:
            self.bus.close()
            self._state = "stopped"
            self._shutdown = None

    async def _await_tasks(self, tasks: list[asyncio.Task[Any]]) -> None:
        """Await cancelled tasks, cancelling again those that swallow the first cancel."""
        remaining = [t for t in tasks if not t.done()]
        for _ in range(3):
            if not remaining:
                return
            _, pending = await asyncio.wait(remaining, timeout=self.cancel_grace)
            for t in pending:
                t.cancel()
            remaining = list(pending)
        if remaining:
            # a task that ignores cancellation this long is a bug in that task; waiting
            # for it forever would hang every caller of stop(), so say so and go on
            log.warning(
                "%d run(s) ignored cancellation for %.0f s and are still running: %s",
                len(remaining), 3 * self.cancel_grace, ", ".join(t.get_name() for t in remaining),
            )

    def _run_of_task(self, task: asyncio.Task[Any]) -> Run | None:
        name = task.get_name()
        if name.startswith("taskwatch-run-"):
            return self._runs.get(name[len("taskwatch-run-"):])
        return None

    async def _wait_idle(self, timeout: float) -> bool:
        if self._counts[_PENDING] + self._counts[_RUNNING] == 0:
            return True
        if timeout <= 0:
            return False
        self._idle = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._idle), timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self._idle = None

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ submit

    def _require_running(self) -> None:
        if self._state != "running":
            raise EngineNotRunning(self._state)

    def _admit(
        self,
        task: str,
        params: BaseModel | dict[str, Any] | None,
        key: str | None,
        source: str,
        internal: bool = False,
    ) -> tuple[Run, bool]:
        """Validate and create a pending run; or return the pending run of this task holding ``key``.

        The flag says whether the run is new (and so must be queued). Periodic and
        trigger tasks are submitted by their own loops only (``internal``).
        """
        self._require_running()
        spec = self._tasks.get(task)
        if spec is None or not (spec.submittable or internal):
            raise UnknownTask(task, (n for n, s in self._tasks.items() if s.submittable))
        model, dumped = self._validate(spec, params)
        if key is not None:
            check_key(f"task {spec.name!r}", key)
            existing = self._keys.get((spec.name, key))
            if existing is not None and existing.status is _PENDING:
                return existing, False
        if self._counts[_PENDING] >= self.max_queue:
            raise QueueFull("the engine's run queue", self.max_queue)
        now = self.clock()
        run = Run(self._new_id(), spec, dumped, model, now, key, source)
        self._runs[run.id] = run
        self._counts[_PENDING] += 1
        self._submitted_total += 1
        if key is not None:
            self._keys[(spec.name, key)] = run
        self.bus.emit(
            RunSubmitted,
            run_id=run.id,
            task=spec.name,
            params=dumped,
            key=key,
            source=source,
            max_attempts=spec.retries + 1,
        )
        return run, True

    @staticmethod
    def _validate(
        spec: TaskSpec, params: BaseModel | dict[str, Any] | None
    ) -> tuple[BaseModel | None, dict[str, Any]]:
        """The params as the task's model and as JSON-ready data; raises InvalidParams."""
        model_cls = spec.params_model
        if model_cls is None:
            if params:
                raise InvalidParams(
                    spec.name,
                    [{"loc": ("params",), "msg": f"task {spec.name!r} takes no params", "type": "extra_forbidden"}],
                )
            return None, {}
        try:
            if isinstance(params, model_cls):
                model = params
            elif isinstance(params, BaseModel):
                model = model_cls.model_validate(params.model_dump())
            else:
                model = model_cls.model_validate(params if params is not None else {})
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_context=False, include_input=False)
            raise InvalidParams(spec.name, [dict(e) for e in errors]) from None
        try:
            dumped = model.model_dump(mode="json")
            check_jsonable(dumped)
            return model, dumped
        except (NotJsonSafe, PydanticSerializationError, ValueError, TypeError) as exc:
            # the model accepted a value no dashboard could receive (a lone surrogate,
            # say): refused here so nothing undecodable is ever recorded or published
            detail = exc.detail if isinstance(exc, NotJsonSafe) else safe_str(exc)
            raise InvalidParams(
                spec.name,
                [{"loc": ("params",), "msg": f"not encodable as UTF-8 JSON: {detail}", "type": "json_unsafe"}],
            ) from None

    async def submit(
        self,
        task: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        key: str | None = None,
    ) -> RunHandle:
        """Validate ``params`` and queue a run of ``task``; returns its handle at once.

        With ``key``, a pending run of the same task holding the same key is
        returned instead of queueing a second one. Raises :class:`UnknownTask`,
        :class:`InvalidParams`, :class:`QueueFull` or :class:`EngineNotRunning`,
        and in each case nothing is queued. (The inline backend returns only
        once the run has finished.)
        """
        run, new = self._admit(task, params, key, "submit")
        if new:
            self._backend.enqueue(run)
            await self._backend.settle(run)
        return RunHandle(self, run)

    def submit_nowait(
        self,
        task: str,
        params: BaseModel | dict[str, Any] | None = None,
        *,
        key: str | None = None,
        source: str = "submit",
        extra_args: tuple[Any, ...] = (),
        internal: bool = False,
    ) -> RunHandle:
        """Like :meth:`submit`, for synchronous code on the engine's loop; never waits.

        ``internal`` lets the engine's own loops (periodic tasks, triggers) submit
        the tasks they registered, which users cannot submit directly.
        """
        run, new = self._admit(task, params, key, source, internal)
        if new:
            run.extra_args = extra_args
            self._backend.enqueue(run)
        return RunHandle(self, run)

    async def retry(self, run_id: str) -> RunHandle:
        """Submit a new run of a failed or cancelled run's task with the same params."""
        old = self._lookup(run_id)
        if old.status not in (_FAILED, _CANCELLED):
            raise RunNotRetryable(run_id, old.status.value)
        if not old.spec.submittable:
            raise RunNotRetryable(
                run_id, old.status.value, f"it belongs to the {old.spec.kind} {old.spec.name!r}, which runs it again itself"
            )
        run, new = self._admit(old.spec.name, old.params, None, f"retry:{run_id}")
        if new:
            run.extra_args = old.extra_args
            self._backend.enqueue(run)
            await self._backend.settle(run)
        return RunHandle(self, run)

    # ------------------------------------------------------------------ cancel

    async def cancel(self, run_id: str, grace: float | None = None) -> RunRecord:
        """Cancel a pending or running run and return its record.

        A pending run is cancelled at once. A running run is cancelled
        cooperatively (its ``await`` raises ``CancelledError``) and given
        ``grace`` seconds (default ``cancel_grace``) to finish; if it is still
        running after that, the record returned says so. Raises
        :class:`RunNotFound` or :class:`RunNotCancellable`.
        """
        run = self._lookup(run_id)
        if run.status.finished:
            raise RunNotCancellable(run_id, run.status.value)
        if run.status is _PENDING:
            if run in self._retry_timers:
                self._cancel_retry_timer(run)
                self._finish_cancelled(run, "user", was_running=False, discard=False)
            else:
                self._finish_cancelled(run, "user", was_running=False)
            return run.record()
        run.cancel_reason = "user"
        if run.task is not None:
            run.task.cancel()
        await self._wait_finished(run, self.cancel_grace if grace is None else grace)
        return run.record()

    # ------------------------------------------------------------------ queries

    def _lookup(self, run_id: str) -> Run:
        run = self._runs.get(run_id)
        if run is None:
            raise RunNotFound(run_id)
        return run

    def get(self, run_id: str) -> RunRecord:
        """The current record of a run. Raises :class:`RunNotFound` for unknown or evicted ids."""
        return self._lookup(run_id).record()

    def runs(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        *,
        task: str | None = None,
        limit: int | None = 50,
    ) -> RunList:
        """Known runs, newest first, optionally filtered by status(es) and task name."""
        wanted: set[RunStatus] | None
        if status is None:
            wanted = None
        elif isinstance(status, str):
            wanted = {RunStatus(status)}
        else:
            wanted = {RunStatus(s) for s in status}
        out = RunList()
        if limit is not None and limit <= 0:
            return out
        for run in reversed(self._runs.values()):
            if wanted is not None and run.status not in wanted:
                continue
            if task is not None and run.spec.name != task:
                continue
            out.append(run.record())
            if limit is not None and len(out) >= limit:
                break
        return out

    def stats(self) -> EngineStats:
        now = int(time.monotonic())
        window = self._tp_window
        finished = sum(b[1] for b in self._tp if b[0] > now - window)
        return EngineStats(
            node_id=self.node_id,
            state=self._state,
            by_status={s.value: n for s, n in self._counts.items()},
            queue_depth=self._backend.queue_depth,
            running=self._counts[_RUNNING],
            submitted_total=self._submitted_total,
            finished_total=self._finished_total,
            succeeded_total=self._totals[_SUCCEEDED],
            failed_total=self._totals[_FAILED],
            cancelled_total=self._totals[_CANCELLED],
            retries_total=self._retries_total,
            throughput=finished / window,
            throughput_window=window,
            queues={
                q.name: {
                    "depth": q.depth,
                    "in_flight": q.in_flight,
                    "processed": q.processed,
                    "failed": q.failed,
                    "rejected": q.rejected,
                }
                for q in (queue.info() for queue in self._queues.values())
            },
            triggers={
                t.name: {"keys": len(t.keys), "fired": t.fired}
                for t in (trigger.state() for trigger in self._triggers.values())
            },
            supervised={
                w.name: {"state": w.state, "restarts": w.restarts, "crashes": w.crashes}
                for w in self._supervisor.workers()
            },
            bus=self.bus.stats(),
        )

    def rates(self, seconds: float = 1.0) -> tuple[float, float]:
        """Runs finished and failed per second over the last ``seconds`` whole seconds."""
        now = int(time.monotonic())
        span = max(1, int(seconds))
        done = failed = 0
        for second, fin, fail in self._tp:
            if now - span <= second < now:
                done += fin
                failed += fail
        return done / span, failed / span

    def leadership(self) -> Leadership:
        """Who leads, as this node sees it."""
        return self._leader.snapshot()

    def snapshot(self, runs_limit: int = 500) -> Snapshot:
        """Everything a dashboard needs to draw itself, in one JSON-serialisable model."""
        runs = self.runs(limit=runs_limit)
        if runs_limit > 0:
            # running runs are what a dashboard must be able to see and cancel, however old
            shown = {r.id for r in runs}
            runs.extend(r for r in self.runs(status=_RUNNING, limit=None) if r.id not in shown)
        return Snapshot(
            node_id=self.node_id,
            version=__version__,
            state=self._state,
            started_at=self._started_at,
            runs=runs,
            tasks=self.catalog(),
            schedule=self.schedule(),
            queues=self.queues(),
            triggers=self.triggers(),
            workers=self.workers(),
            stats=self.stats(),
            leadership=self.leadership(),
            last_seq=self.bus.last_seq,
        )

    # ------------------------------------------------------------------ elsewhere: threads, sockets

    def start_background(self, **options: Any) -> Any:
        """Run this engine on its own event loop in a daemon thread; returns a thread-safe facade."""
        from .background import BackgroundEngine

        return BackgroundEngine.launch(self, **options)

    async def serve(self, address: str | None = None, **options: Any) -> Any:
        """Expose this engine to dashboards in other processes (Unix socket or tcp://127.0.0.1:PORT)."""
        from .server import ControlServer

        self._require_running()
        server = ControlServer(self, address, **options)
        await server.start()
        self._servers.append(server)
        return server

    def catalog(self) -> list[TaskInfo]:
        """Every registered task with its params schema (what a submit form needs)."""
        return [spec.info() for spec in self._tasks.values()]

    # ------------------------------------------------------------------ periodic tasks

    def periodic(
        self,
        fn: Any = None,
        *,
        every: float | None = None,
        cron: str | None = None,
        name: str | None = None,
        initial_delay: float = 0.0,
        requires: tuple[str, ...] | list[str] = (),
        opt_in: str | None = None,
        jitter: float = 0.0,
        fixed_rate: bool = False,
        retries: int = 0,
        timeout: float | None = None,
    ) -> Any:
        """Register ``async def fn(ctx, **resources)`` to run on an interval or a cron expression.

        ``requires`` names resources from ``Engine(resources=...)`` passed in by
        name; ``opt_in`` names a flag from ``Engine(flags=...)`` that must be
        true. A task whose needs are not met is registered disabled, with the
        reason shown in :meth:`schedule` and published as an event.
        """

        def decorate(func: Any) -> Any:
            self._scheduler.add(
                func,
                every=every,
                cron=cron,
                name=name,
                initial_delay=initial_delay,
                requires=tuple(requires),
                opt_in=opt_in,
                jitter=jitter,
                fixed_rate=fixed_rate,
                retries=retries,
                timeout=timeout,
            )
            return func

        return decorate(fn) if fn is not None else decorate

    def schedule(self) -> list[PeriodicInfo]:
        """Every periodic task: trigger, enabled or why not, next due, last outcome, counts."""
        return self._scheduler.schedule()

    def pause_periodic(self, name: str) -> PeriodicInfo:
        return self._scheduler.pause(name)

    def resume_periodic(self, name: str) -> PeriodicInfo:
        return self._scheduler.resume(name)

    # ------------------------------------------------------------------ queues and triggers

    def queue(
        self, name: str, handler: Any, *, concurrency: int = 1, maxsize: int = 1000
    ) -> WorkQueue:
        """Create a named queue whose jobs ``handler(job)`` consumes with ``concurrency`` workers."""
        if name in self._queues:
            raise DuplicateTask("queue", name)
        queue = WorkQueue(self, name, handler, concurrency=concurrency, maxsize=maxsize)
        self._queues[name] = queue
        if self._state == "running":
            queue.launch()
        return queue

    def queues(self) -> list[QueueInfo]:
        return [q.info() for q in self._queues.values()]

    def trigger(self, name: str, fn: Any, **options: Any) -> Trigger:
        """Create a threshold trigger: ``notify(key)`` counts; a key runs ``fn`` when due.

        Options: ``size_threshold``, ``staleness`` (timedelta or seconds),
        ``staleness_min``, ``check_interval``, ``retries``, ``timeout``.
        """
        if name in self._triggers:
            raise DuplicateTask("trigger", name)
        trigger = Trigger(self, name, fn, **options)
        self._triggers[name] = trigger
        if self._state == "running":
            trigger.launch()
        return trigger

    def triggers(self) -> list[TriggerState]:
        return [t.state() for t in self._triggers.values()]

    # ------------------------------------------------------------------ supervised workers

    def supervised(
        self,
        fn: Any = None,
        *,
        name: str | None = None,
        leader_only: bool = False,
        backoff: float = 1.0,
        backoff_max: float = 60.0,
    ) -> Any:
        """Register a long-lived ``async def worker(ctx)`` restarted with backoff when it crashes."""

        def decorate(func: Any) -> Any:
            self._supervisor.add(
                func, name=name, leader_only=leader_only, backoff=backoff, backoff_max=backoff_max
            )
            return func

        return decorate(fn) if fn is not None else decorate

    def workers(self) -> list[WorkerInfo]:
        return self._supervisor.workers()


    # ------------------------------------------------------------------ execution

    def _begin(self, run: Run) -> None:
        """Mark ``run`` running; the backend calls this as it creates the run's task.

        Done synchronously, before the task's first step, so a cancel or a stop
        that comes in between sees a running run with a task to cancel.
        """
        counts = self._counts
        counts[_PENDING] -= 1
        counts[_RUNNING] += 1
        run.status = _RUNNING
        run.started_at = self.clock()
        self._release_key(run)
        self.bus.emit(RunStarted, run_id=run.id, task=run.spec.name, attempt=run.attempt)

    def _task_done(self, run: Run) -> None:
        """The backend's task for ``run`` ended; record it if it ended without a word.

        A task cancelled before its first step never runs ``_execute``, so
        nothing recorded its end.
        """
        if run.status is _RUNNING:
            self._finish_cancelled(run, run.cancel_reason or "external", was_running=True)

    async def _execute(self, run: Run) -> None:
        """Run one attempt of a run marked running by :meth:`_begin`, and record its outcome."""
        spec = run.spec
        if run.status is not _RUNNING:
            return
        try:
            ctx = TaskContext(self, run, spec.name)
            args: tuple[Any, ...] = (ctx,) if run.model is None else (ctx, run.model)
            kwargs = {name: self.resources[name] for name in spec.resources} if spec.resources else {}
            if spec.timeout is None:
                result = await spec.fn(*args, **kwargs)
            else:
                async with asyncio.timeout(spec.timeout):
                    result = await spec.fn(*args, **kwargs)
            if result is not None:
                result = jsonable(result)
        except asyncio.CancelledError:
            reason = run.cancel_reason or "external"
            self._finish_cancelled(run, reason, was_running=True)
            if reason == "external":
                raise
            # our own cancel: the run is recorded, the task ends normally
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return
        except TimeoutError as exc:
            if spec.timeout is not None and run.cancel_reason is None:
                error = RunError(
                    type="TimeoutError",
                    message=f"run exceeded its {spec.timeout:g} s timeout",
                    traceback=RunError.from_exception(exc).traceback,
                )
            else:
                error = RunError.from_exception(exc)
        except NotJsonSafe as exc:
            error = RunError(
                type="ResultNotSerializable",
                message=f"task {spec.name!r} returned a value that cannot be sent as JSON: {exc.detail}; "
                "return JSON data (dicts, lists, str, numbers) or a pydantic model",
            )
        except BaseException as exc:  # noqa: BLE001
            # SystemExit, KeyboardInterrupt, GeneratorExit and the like raised by task
            # code fail that run: escaping here would take down the caller's loop
            error = RunError.from_exception(exc)
        else:
            if run.cancel_reason is not None:
                # the task swallowed the cancel and returned: it was still cancelled
                self._finish_cancelled(run, run.cancel_reason, was_running=True)
                return
            now = self.clock()
            run.result = result
            self._finish(run, _SUCCEEDED, now)
            self.bus.emit(
                RunSucceeded,
                run_id=run.id,
                task=spec.name,
                attempt=run.attempt,
                duration=now - (run.started_at or now),
                result=result,
            )
            return
        if run.cancel_reason is not None:
            # cancelled while it was failing: the user's intent wins
            self._finish_cancelled(run, run.cancel_reason, was_running=True)
            return
        run.error = error
        if run.attempt <= spec.retries and self._state != "stopped":
            self._schedule_retry(run, error)
            return
        now = self.clock()
        self._finish(run, _FAILED, now)
        self.bus.emit(
            RunFailed,
            run_id=run.id,
            task=spec.name,
            attempt=run.attempt,
            duration=now - (run.started_at or now),
            error=error,
        )

    def _release_key(self, run: Run) -> None:
        if run.key is not None and self._keys.get((run.spec.name, run.key)) is run:
            del self._keys[(run.spec.name, run.key)]

    def _schedule_retry(self, run: Run, error: RunError) -> None:
        spec = run.spec
        delay = min(spec.backoff_max, spec.backoff * 2 ** (run.attempt - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter so retries of a burst spread out
        self._counts[_RUNNING] -= 1
        self._counts[_PENDING] += 1
        run.status = _PENDING
        run.attempt += 1
        self._retries_total += 1
        if run.key is not None:
            self._keys.setdefault((run.spec.name, run.key), run)
        self.bus.emit(
            RunRetrying, run_id=run.id, task=spec.name, attempt=run.attempt, delay=delay, error=error
        )
        loop = asyncio.get_running_loop()
        run.retry_handle = loop.call_later(delay, self._retry_due, run)
        self._retry_timers.add(run)

    def _retry_due(self, run: Run) -> None:
        run.retry_handle = None
        self._retry_timers.discard(run)
        if run.status is _PENDING:
            self._backend.enqueue(run)

    def _cancel_retry_timer(self, run: Run) -> None:
        if run.retry_handle is not None:
            run.retry_handle.cancel()
            run.retry_handle = None
        self._retry_timers.discard(run)

    def _progress(self, run: Run, done: float, total: float | None, message: str) -> None:
        # the event is validated first: a value it refuses raises in the task and
        # leaves the record as it was
        event = self.bus.emit(
            RunProgressed,
            run_id=run.id,
            task=run.spec.name,
            done=done,
            total=total,
            message=safe_text(message) if isinstance(message, str) else message,
        )
        run.done = event.done
        run.total = event.total
        run.message = event.message

    def _finish_cancelled(
        self, run: Run, reason: CancelReason, *, was_running: bool, discard: bool = True
    ) -> None:
        if run.status.finished:
            return
        if not was_running and discard:
            self._backend.discard(run)
        run.cancel_reason = reason
        self._finish(run, _CANCELLED, self.clock())
        self.bus.emit(
            RunCancelled,
            run_id=run.id,
            task=run.spec.name,
            attempt=run.attempt,
            reason=reason,
            was_running=was_running,
        )

    def _finish(self, run: Run, status: RunStatus, now: float) -> None:
        counts = self._counts
        counts[run.status] -= 1
        counts[status] += 1
        run.status = status
        run.finished_at = now
        self._release_key(run)
        self._finished_total += 1
        self._totals[status] += 1
        second = int(time.monotonic())
        tp = self._tp
        if tp and tp[-1][0] == second:
            bucket = tp[-1]
        else:
            bucket = [second, 0, 0]
            tp.append(bucket)
            horizon = second - max(self._tp_window, 60)
            while tp[0][0] < horizon:
                tp.popleft()
        bucket[1] += 1
        if status is _FAILED:
            bucket[2] += 1
        waiters = run.waiters
        if waiters:
            run.waiters = None
            record = run.record()
            for fut in waiters:
                if not fut.done():
                    fut.set_result(record)
        finished = self._finished
        finished[run.id] = None
        if len(finished) > self.history:
            evicted, _ = finished.popitem(last=False)
            old = self._runs.pop(evicted, None)
            if old is not None:
                counts[old.status] -= 1
        idle = self._idle
        if idle is not None and counts[_PENDING] + counts[_RUNNING] == 0 and not idle.done():
            idle.set_result(None)

    async def _wait_finished(self, run: Run, timeout: float | None) -> RunRecord:
        if run.status.finished:
            return run.record()
        fut: asyncio.Future[RunRecord] = asyncio.get_running_loop().create_future()
        if run.waiters is None:
            run.waiters = []
        run.waiters.append(fut)
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            return run.record()
        finally:
            if run.waiters is not None and fut in run.waiters:
                run.waiters.remove(fut)

    def __repr__(self) -> str:
        return (
            f"<Engine {self.node_id} {self._state} tasks={len(self._tasks)} "
            f"pending={self._counts[_PENDING]} running={self._counts[_RUNNING]}>"
        )

    def _repr_html_(self) -> str:
        """Counts by status, recent runs and failures, for notebooks."""
        from .display import engine_html, engine_view

        return engine_html(engine_view(self))

    def __rich__(self) -> Any:
        """The same view as a Rich panel, for terminals."""
        from .display import engine_rich, engine_view

        return engine_rich(engine_view(self))
