"""Named work queues drained by N consumer tasks, off the request path.

``engine.queue(name, handler, concurrency=N, maxsize=M)`` returns a
:class:`WorkQueue`. Producers call ``put_nowait(job)`` (sync; safe on the
engine's loop and from other threads) or ``await put(job)``; N consumer tasks
call ``await handler(job)`` (or ``await handler(ctx, job)`` when the handler
takes two positional arguments) in FIFO order.

Jobs are pydantic models or JSON-serialisable values (usually dicts); anything
else is refused at put time so a failure report can always carry the job. The
handler receives the job object as it was put. Nothing is ever dropped
silently: a full queue raises :class:`QueueFull` (and counts it), a failing
job is published as ``QueueJobFailed`` with its traceback, and jobs still
undone when ``engine.stop`` times out are reported in ``QueueDrainIncomplete``.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from collections import deque
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict

from .context import TaskContext
from .errors import EngineNotRunning, JobNotSerializable, QueueFull, TaskDefinitionError
from .jsonsafe import NotJsonSafe, jsonable
from .options import QueueOptions, check_options
from .events import QueueDrainIncomplete, QueueJobFailed
from .runs import RunError

if TYPE_CHECKING:
    from .engine import Engine

_CLOSED_STATES = ("stopping", "stopped")


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


def _wants_context(handler: Any, name: str) -> bool:
    """True for ``handler(ctx, job)``, False for ``handler(job)``; else TaskDefinitionError."""
    if not inspect.iscoroutinefunction(handler):
        raise TaskDefinitionError(
            f"the handler of queue {name!r} must be an `async def handler(job)` "
            "(or `async def handler(ctx, job)`) function"
        )
    params = inspect.signature(handler).parameters.values()
    required = [
        p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    if len(required) == 1 or (not required and any(p.kind is p.VAR_POSITIONAL for p in params)):
        return False
    if len(required) == 2:
        return True
    raise TaskDefinitionError(
        f"the handler of queue {name!r} takes {len(required)} required positional arguments; "
        "it must take (job) or (ctx, job)"
    )


class WorkQueue:
    """A bounded FIFO of jobs consumed by ``concurrency`` tasks on the engine's loop.

    ``put`` waits at most ``timeout`` seconds (default 0: not at all) for room
    and then raises :class:`QueueFull`, so a producer can never block forever.
    On ``engine.stop`` the queue drains within the stop timeout; whatever is
    still undone then (queued plus in-flight jobs, which are cancelled) is
    reported as ``QueueDrainIncomplete(left=N)`` and counted in ``abandoned``.
    """

    def __init__(
        self, engine: Engine, name: str, handler: Any, *, concurrency: int = 1, maxsize: int = 1000
    ) -> None:
        check_options(QueueOptions, f"queue {name!r}", concurrency=concurrency, maxsize=maxsize)
        self._engine = engine
        self.name = name
        self.handler = handler
        self.concurrency = concurrency
        self.maxsize = maxsize
        self._with_ctx = _wants_context(handler, name)
        self._items: deque[Any] = deque()
        # put paths on different threads check room and append under this lock;
        # consumers only ever shrink the deque, which needs no lock
        self._lock = threading.Lock()
        #: jobs accepted from other threads that have not reached the loop yet
        self._in_transit = 0
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
        self._closing = False
        self._abandon = False

    # ------------------------------------------------------------ producers

    def put_nowait(self, job: Any) -> None:
        """Queue ``job`` now, or raise. Safe from sync code and from any thread.

        Raises :class:`EngineNotRunning` once the engine is stopping or
        stopped, :class:`JobNotSerializable` for jobs that are not pydantic
        models or JSON-serialisable, and :class:`QueueFull` when ``maxsize``
        jobs are waiting. Before the engine starts, jobs wait for it.
        """
        self._check_open()
        self._check_serialisable(job)
        if not self._try_put(job):
            self.rejected += 1
            raise QueueFull(f"queue {self.name!r}", self.maxsize)

    async def put(self, job: Any, *, timeout: float = 0.0) -> None:
        """Queue ``job``, waiting up to ``timeout`` seconds for room; then raise QueueFull.

        The default ``timeout=0`` never waits. Await this on the engine's loop;
        other threads use :meth:`put_nowait`.
        """
        self._check_open()
        self._check_serialisable(job)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while not self._try_put(job):
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.rejected += 1
                raise QueueFull(f"queue {self.name!r}", self.maxsize)
            await self._wait_for_room(remaining)
            self._check_open()

    def _check_open(self) -> None:
        state = self._engine.state
        if state in _CLOSED_STATES:
            raise EngineNotRunning(state)
        if self._closing:
            raise EngineNotRunning("stopping")

    def _check_serialisable(self, job: Any) -> None:
        try:
            jsonable(job)
        except NotJsonSafe as exc:
            raise JobNotSerializable(self.name, type(job).__qualname__, exc.detail) from None

    def _try_put(self, job: Any) -> bool:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            return self._put_from_thread(loop, job)
        with self._lock:
            if len(self._items) + self._in_transit >= self.maxsize:
                return False
            self._items.append(job)
            self.accepted += 1
        self._wake_one(self._getters)
        return True

    def _put_from_thread(self, loop: asyncio.AbstractEventLoop, job: Any) -> bool:
        with self._lock:
            if len(self._items) + self._in_transit >= self.maxsize:
                return False
            # reserve the slot now so the caller learns about QueueFull synchronously
            self._in_transit += 1
            self.accepted += 1
        try:
            loop.call_soon_threadsafe(self._arrive, job)
        except RuntimeError:  # the loop is closed
            with self._lock:
                self._in_transit -= 1
                self.accepted -= 1
            raise EngineNotRunning("stopped") from None
        return True

    def _arrive(self, job: Any) -> None:
        """On the loop: a job put from another thread lands in the queue."""
        with self._lock:
            self._in_transit -= 1
            if self._abandon:
                # stop already counted and reported it as left undone
                return
            self._items.append(job)
        self._wake_one(self._getters)

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
                fut.set_result(None)
                return

    # ------------------------------------------------------------ consumers

    async def _consume(self) -> None:
        loop = asyncio.get_running_loop()
        ctx = TaskContext(self._engine, None, f"queue:{self.name}") if self._with_ctx else None
        while True:
            while not self._items:
                # a job accepted from another thread is still on its way: wait for it
                if self._closing and not self._in_transit:
                    return
                fut = loop.create_future()
                self._getters.append(fut)
                try:
                    await fut
                finally:
                    if not fut.done():
                        fut.cancel()
            if self._abandon:
                return
            job = self._items.popleft()
            self._wake_one(self._putters)
            self._in_flight += 1
            try:
                await self._handle(ctx, job)
            finally:
                self._in_flight -= 1
                self._maybe_idle()

    async def _handle(self, ctx: TaskContext | None, job: Any) -> None:
        try:
            if ctx is None:
                await self.handler(job)
            else:
                await self.handler(ctx, job)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own stop: the job counts as left undone
            self._failed(job, asyncio.CancelledError("the job's handler was cancelled"))
        except BaseException as exc:  # noqa: BLE001 - SystemExit from a handler fails its job only
            self._failed(job, exc)
        else:
            self.processed += 1

    def _failed(self, job: Any, exc: BaseException) -> None:
        self.failed += 1
        try:
            data = jsonable(job)
        except NotJsonSafe:
            data = repr(job)  # mutated into something unserialisable since it was put
        self._engine.bus.emit(QueueJobFailed, queue=self.name, job=data, error=RunError.from_exception(exc))

    # ------------------------------------------------------------ waiting for idle

    @property
    def depth(self) -> int:
        return len(self._items) + self._in_transit

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _is_idle(self) -> bool:
        return not self._items and not self._in_transit and not self._in_flight

    def _maybe_idle(self) -> None:
        if self._idle_waiters and self._is_idle():
            waiters, self._idle_waiters = self._idle_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    async def join(self, timeout: float | None = None) -> None:
        """Wait until nothing is queued or in flight; ``TimeoutError`` after ``timeout``."""
        while not self._is_idle():
            fut = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(fut)
            # a job arriving from another thread can land after the idle signal: re-check
            async with asyncio.timeout(timeout):
                await fut

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
        )

    def launch(self) -> None:
        """Start the consumer tasks on the running loop (sync: usable after engine start)."""
        if self._consumers:
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._closing = self._abandon = False
        self._consumers = [
            loop.create_task(self._consume(), name=f"taskwatch-queue-{self.name}-{i}")
            for i in range(self.concurrency)
        ]

    async def start(self) -> None:
        self.launch()

    async def stop(self, deadline: float) -> None:
        """Drain until ``deadline`` (loop time), then cancel what is in flight and report the rest."""
        self._closing = True
        loop = asyncio.get_running_loop()
        if self._consumers:
            # wake idle consumers so they see `_closing` and exit
            for fut in self._getters:
                if not fut.done():
                    fut.set_result(None)
            await self._wait_idle(deadline - loop.time())
        with self._lock:
            left = self.depth + self._in_flight
            self._abandon = True
            self._items.clear()
        consumers, self._consumers = self._consumers, []
        for t in consumers:
            t.cancel()
        if consumers:
            await asyncio.wait(consumers)
        for fut in self._putters:
            if not fut.done():
                fut.set_result(None)  # waiting producers re-check and raise EngineNotRunning
        if left:
            self.abandoned += left
            self._engine.bus.emit(QueueDrainIncomplete, queue=self.name, left=left)

    async def _wait_idle(self, timeout: float) -> None:
        if timeout <= 0:
            return
        try:
            await self.join(timeout)
        except TimeoutError:
            pass

    def __repr__(self) -> str:
        return f"<WorkQueue {self.name} depth={self.depth} in_flight={self._in_flight}>"
