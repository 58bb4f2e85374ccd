"""Executing runs: what a claim, an attempt and its outcome mean for this node.

The executor claims runs and keeps the claims alive; :class:`Execution` is
what it calls back into. It starts an asyncio task per claimed run, runs the
attempt (params validated, timeout, cancel), writes the outcome with the
claim's token, brings the run index up to date and publishes the run events.
It also applies what the store says of runs this node does not execute
(recovered elsewhere, finished by another node, cut off from us), and owns
every task it starts: ``stop`` waits on :meth:`wait_idle`, cancels what
:meth:`cut_running` returns and awaits it with :meth:`await_tasks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .hop import as_future, going_here, spawn
from .context import TaskContext
from .events import (
    RunCancelled,
    RunFailed,
    RunProgressed,
    RunRecovered,
    RunRetrying,
    RunStarted,
    RunSubmitted,
    RunSucceeded,
    StoreReachable,
    StoreUnreachable,
)
from .errors import EngineNotRunning, InvalidConfiguration, InvalidProgress, RunNotFound, StoppedBeforeDone
from .executor import Executor
from .index import RunIndex
from .jsonsafe import NotJsonSafe, cut_text, jsonable, safe_str, safe_text
from .logs import log_safely, log_text, traceback_block
from .options import CancelOptions, WaitOptions, check_options
from .runs import MAX_ERROR_MESSAGE, CancelReason, Progress, Run, RunError, RunRecord, RunStatus, detached
from .store import (
    Cancelled,
    Claim,
    Failed,
    Inserted,
    MemoryStore,
    NewRun,
    Outcome,
    Recovered,
    Retry,
    Store,
    StoreClosed,
    StoreError,
    StoredRun,
    StoreGaveUp,
    Succeeded,
)
from .store.memory import claim_of
from .tasks import TaskSpec, params_from_record

if TYPE_CHECKING:
    from .engine import Engine

log = logging.getLogger("taskwatch.engine")
#: failed attempts of runs: a retry at INFO, a run's final failure at WARNING with its traceback
runs_log = logging.getLogger("taskwatch.runs")

#: seconds between two prunes of the store's dead incarnations (they only grow per process start)
NODE_PRUNE_INTERVAL = 60.0

#: the store's errors that trying again cannot help: it is closed, or its stopping engine gave up on it
_GIVE_UP = (StoreClosed, StoreGaveUp)

#: an outcome write the store keeps failing is logged at each try until this one, which says it
#: is kept until the store answers; tried again at most every _OUTCOME_RETRY_MAX seconds
_OUTCOME_TRIES_TOLD = 8
_OUTCOME_RETRY_MAX = 1.0

_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_SUCCEEDED = RunStatus.SUCCEEDED
_FAILED = RunStatus.FAILED
_CANCELLED = RunStatus.CANCELLED
#: the outcome of every run that returned None (read, never changed: one object for them all)
_NO_RESULT = Succeeded(None)


class RunWait(asyncio.Future["RunRecord"]):
    """The future ``RunHandle.wait()`` gives for a run this node holds, resolved by its finish.

    A future, so ``gather`` over thousands of waits starts no task per run; and
    a coroutine too (``send``, ``throw``, ``close``), because ``create_task``
    and ``TaskGroup.create_task`` accept nothing else, and ``tg.create_task(
    handle.wait())`` is how much asyncio code is written. A task running it
    waits on the future itself, as a coroutine awaiting it would.
    """

    __slots__ = ()
    #: what a task running this wait shows in its repr
    __name__ = "RunHandle.wait"

    def send(self, value: None) -> asyncio.Future[RunRecord]:
        if not self.done():
            # what Future.__await__ yields: the task wakes when this future is done
            self._asyncio_future_blocking = True
            return self
        raise StopIteration(self.result())

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        # a task throws what cancelled it (or what its waited future raised) into the
        # coroutine it runs; a wait has nothing to clean up, so it ends with it
        raise typ if isinstance(typ, BaseException) else (typ() if val is None else val)

    def close(self) -> None:
        pass


class Execution:
    """Runs the attempts of the runs this node claims; owns the executor that claims them."""

    def __init__(
        self,
        engine: Engine,
        store: Store,
        index: RunIndex,
        tasks: Mapping[str, TaskSpec],
        limits: Callable[[], Mapping[str, int | None]],
        *,
        max_concurrency: int,
        poll_interval: float,
        lease_ttl: float,
        node_load: Callable[[], tuple[float | None, int | None]] | None = None,
        max_queue: int | None = None,
    ) -> None:
        self.engine = engine
        self.bus = engine.bus
        #: run tasks the last stop cancelled for every round of ``cancel_grace`` and left going
        self.left_going: list[asyncio.Task[Any]] = []
        #: of those, with the memory store, the run each one is (its record says it ended)
        self._left_going_runs: dict[asyncio.Task[Any], Run] = {}
        self.store = store
        self.index = index
        self.tasks = tasks
        #: the tasks whose runs this node may claim (those whose resources it has), by name
        self.limits = limits
        #: the memory store, whose operations the hot path calls without coroutines; None for a durable store
        self.memory: MemoryStore | None = store if isinstance(store, MemoryStore) else None
        self.durable = self.memory is None
        self.executor = Executor(
            store,
            node=engine.node_id,
            incarnation=engine.incarnation,
            max_concurrency=max_concurrency,
            limits=limits,
            launch=self.launch_all,
            claims=self.held_claims,
            cancel_requested=self.cancel_requested,
            claim_lost=self.claim_lost,
            inserted=self.inserted,
            recovered=self.on_recovered,
            next_due=index.next_due,
            clock=engine.clock,
            poll_interval=poll_interval,
            heartbeat_interval=lease_ttl / 3,
            maintenance_interval=min(1.0, lease_ttl / 3),
            prune=self.prune,
            node_load=node_load,
            # a durable store may be shared: it checks the queue limit against every node's runs
            max_pending=max_queue if self.durable else None,
            cut_off=self.cut_off,
            reconnected=self.reconnected,
        )
        #: claim token -> run, for the runs executing here
        self._claimed: dict[str, Run] = {}
        #: claims whose outcome is being written: a heartbeat that finds them ended is not news
        self._finishing: set[str] = set()
        #: outcome writes in flight, awaited by stop()
        self._writes: set[asyncio.Future[Any]] = set()
        #: runs a submit is writing to a durable store, by id (see launch)
        self._writing: dict[str, Run] = {}
        #: claim token -> the retry being written for it (what a new claim of the run, coming
        #: back before the write's answer, proves the store took)
        self._retrying: dict[str, tuple[Retry, RunError | None]] = {}
        #: finished runs the index evicts between two prunes of the memory store
        self.prune_every = max(64, index.history // 8)
        self._idle: asyncio.Future[None] | None = None
        #: a refill of freed slots is scheduled for the loop's next turn (memory store)
        self._dispatching = False
        #: what every run's context is a copy of: the context the engine started in (set by
        #: the engine's start). Never a submitter's: a run may execute on another node or
        #: after a restart, and one request's values must not reach another request's run
        self.base_context = contextvars.Context()
        #: start_soon is starting a batch; a nested call asks it to claim again at the end
        self._starting = False
        self._start_again = False
        #: when (time.monotonic()) the store's dead incarnations were last pruned
        self._nodes_pruned_at = float("-inf")
        #: ids of the runs this node's recovery is settling (see on_recovered)
        self._recovering: set[str] = set()
        #: periodic task -> its runs failed here in a row, and the error type whose traceback was
        #: logged last: a schedule failing the same way logs that traceback once, not each run
        self._failing: dict[str, tuple[int, str]] = {}

    def forget_claims(self) -> None:
        """A restart of the engine object: the store is the truth, no claim of ours survives."""
        self._claimed.clear()
        self._failing.clear()  # nor a streak: its runs may have succeeded elsewhere meanwhile
        self._retrying.clear()

    def start_soon(self) -> None:
        """Start new work: at once with the memory store (its claims never wait), else via the executor."""
        memory = self.memory
        if memory is None:
            self.executor.wake()
            return
        if self._starting:
            # called back while starting a batch (a bus callback that submits): the slots of
            # the batch's later runs are not counted yet, so the batch claims again at its end
            self._start_again = True
            return
        executor = self.executor
        if executor.running >= executor.max_concurrency:
            return  # every slot taken (most submits of a burst): room() would say so
        if executor.torn_down:
            # the loop's teardown (asyncio.run ending with no stop()) already collected the tasks
            # it cancels and awaits: a run started now would be destroyed pending with the loop
            return
        runs = self.index.runs
        self._starting = True
        try:
            while True:
                self._start_again = False
                free, tasks = executor.room()
                if not tasks:
                    return  # no free slot, or not claiming any more
                for row in memory.take_now(executor.node, executor.incarnation, free, tasks):
                    run = row.run
                    if run is not None and run.status is _PENDING and runs.get(row.id) is run:
                        # a run this engine admitted, as it indexed it: started without a Claim
                        self._start(run, row.token, row.attempt, row.started_at)  # type: ignore[arg-type]
                    else:
                        self.launch(claim_of(row))
                if not self._start_again:
                    return
        finally:
            self._starting = False

    def launch_all(self, claims: list[Claim]) -> None:
        """Start the runs of one claim. A start asked for meanwhile (a bus callback that submits)
        waits for the end of the batch, whose later runs' slots are not counted yet."""
        with self.starts_held():
            for claim in claims:
                self.launch(claim)

    @contextlib.contextmanager
    def starts_held(self) -> Iterator[None]:
        """Start nothing new from the memory store until the block ends, then whatever is due:
        a batch being launched or admitted is seen through before any start it triggers."""
        if self._starting:
            yield  # an enclosing batch starts what is due at its end
            return
        self._starting = True
        self._start_again = False
        try:
            yield
        finally:
            self._starting = False
        if self._start_again:
            self.start_soon()

    def evicted(self) -> None:
        """The index evicted :attr:`prune_every` finished runs: the memory store is pruned along,
        in small steps (rows it kept past history would only cost memory and garbage-collector time)."""
        memory = self.memory
        if memory is not None:
            memory.prune_now(keep=self.index.history, older_than=self.engine.retention)

    def cut_running(self, reason: CancelReason) -> list[asyncio.Task[None]]:
        """Cancel every attempt still executing here (a stop past its drain); returns their tasks."""
        cut = [run for run in self._claimed.values() if run.handle is not None and not run.handle.done()]
        tasks = [run.handle for run in cut if run.handle is not None]
        for run in cut:
            if run.status is _RUNNING and run.cancel_reason is None:
                run.cancel_reason = reason
            if run.handle is not None:
                run.handle.cancel()
        return tasks

    async def await_writes(self) -> None:
        """Every outcome write still in flight (runs that ended, hand-backs, cancels before a first step)."""
        while self._writes:  # until none is left: a landing write's callbacks may start another
            await asyncio.gather(*self._writes, return_exceptions=True)

    def _finish(self, run: Run, status: RunStatus, now: float) -> None:
        self.index.finished(run, status, now)
        if self._idle is not None:
            self._check_idle()

    def _check_idle(self) -> None:
        idle = self._idle
        if idle is not None and self.local_work() == 0 and not idle.done():
            idle.set_result(None)

    def launch(self, claim: Claim) -> None:
        """Start executing a run the executor claimed for this node.

        Marked running synchronously, before the task's first step, so a
        cancel or a stop that comes in between sees a running run with a task
        to cancel.
        """
        run = self.index.runs.get(claim.run_id)
        if run is None and (run := self._writing.pop(claim.run_id, None)) is not None:
            # a run this node's submit is writing, claimed before the submit has taken up the
            # write's answer (the store answered both in one batch): it is that run
            self.admit(run)
        elif run is None:
            # submitted by another process, or by this node's previous incarnation
            spec = self.tasks.get(claim.task)
            run = Run(
                claim.run_id, claim.task, spec, claim.params, None, claim.created_at,
                claim.key, claim.source, claim.max_attempts,
            )
            self.index.add(run)
        elif run.status.finished:
            # the index moved on (cancelled here while the claim was in flight): the store
            # must hear of it too, or the claim would sit unheartbeaten until it expires
            self._end_claim(run, claim.token, Cancelled(run.cancel_reason or "external"))
            return
        elif run.status is _RUNNING and run.token is not None and run.token in self._retrying:
            # given out again while the retry of the attempt before was on its way to the
            # store: the store has it (the run was pending again to be claimed), so it is
            # applied now, before the new attempt starts (its write's answer finds it done)
            retry, error = self._retrying.pop(run.token)
            self._apply_outcome(run, run.token, retry, error, _PENDING)
        if run.status is _RUNNING:
            # re-claimed after recovery took an older claim of ours away: that attempt is over
            if run.token is not None:
                self._claimed.pop(run.token, None)
                run.token = None
            if run.handle is not None and not run.handle.cancelling():
                # (one cancel: an attempt told of its lost claim already is cleaning up)
                run.handle.cancel()
            self.index.counts[_RUNNING] -= 1
            self.index.counts[_PENDING] += 1
            run.status = _PENDING
        # a cancel asked of an earlier attempt whose request never reached the store (it was out
        # of reach): this attempt's is the store's to tell, with the claim's heartbeats. Kept, it
        # made this attempt's success read as a cancel the task swallowed
        run.cancel_reason = None
        # the store's: a stop may have cut an attempt short elsewhere, which gave the run one more
        run.max_attempts = claim.max_attempts
        if claim.error is not None:
            # its last failed attempt ran elsewhere (another node, a previous incarnation): the
            # record keeps that error, as the node it failed on keeps it
            run.error = claim.error
        if not self.executor.claiming:
            # claimed while this node was stopping: not started, so handed back as it was
            note = RunError(type="Shutdown", message=f"node {self.engine.node_id!r} stopped before the run started")
            self._end_claim(run, claim.token, Retry(note, 0.0, next_attempt=False))
            return
        self._start(run, claim.token, claim.attempt, claim.started_at)

    def _start(self, run: Run, token: str, attempt: int, started_at: float) -> None:
        """Execute a pending run of the index that this node now holds the claim ``token`` of."""
        self.index.started(run, attempt, started_at, self.engine.node_id)
        # progress is an attempt's own: the last attempt's (a retry, a run recovered or handed
        # back at a stop) is not how far this one got. The store's claim cleared its row too
        run.done = 0
        run.total = None
        run.message = ""
        run.token = token
        self._claimed[token] = run
        self.executor.started(run.task)
        self.bus.post(RunStarted, run_id=run.id, task=run.task, attempt=attempt, from_store=False)
        ended = functools.partial(self._ended, run, token)
        # the task runs in a copy of its own; its end (which may start the next run) in
        # another, so a run's context variables never reach the run its freed slot starts next
        base = self.base_context
        context = base.copy()
        spec = run.spec
        if spec is None or spec.replaced:
            # read from the store before its task was registered here (a notebook's cells,
            # the tasks' after the engine's): the node claims a task's runs once it runs it;
            # or queued before its task was redefined: the new definition runs it, its params
            # validated by the new model
            spec = run.spec = self.tasks.get(run.task)
            run.model = None
        # taken now, with the claim: a resource withdrawn before the task's first step (a
        # callback between the two) stays the run's, as it does for a run under way
        given = self._resources_for(spec.resources) if spec is not None and spec.resources else None
        task = spawn(
            self._execute(run, token, ended, context, given), name=f"taskwatch-run-{run.id}", context=base.copy()
        )
        run.handle = task
        # also a callback: it runs for a task cancelled before its first step (see _execute)
        task.add_done_callback(ended, context=context)

    def _ended(self, run: Run, token: str, task: asyncio.Task[None]) -> None:
        if run.handle is task:
            run.handle = None
        # a claim whose outcome is on its way to the store ends with that write
        if token not in self._finishing:
            if run.status is _RUNNING and run.token == token:
                # cancelled before its first step: nothing recorded it
                run.token = None
                reason = run.cancel_reason or self._outside_cancel()
                if reason is None:
                    self._claimed.pop(token, None)  # left for recovery, as a killed process leaves it
                elif reason == "shutdown" and self.durable:
                    self._hand_back(run, token)
                else:
                    self.finish_cancelled(run, reason, was_running=True)
                    self._end_claim(run, token, Cancelled(reason))
            else:
                self._claimed.pop(token, None)
                if run.status is _RUNNING and run.token is None and run.handle is None:
                    self.index.unclaimed(run)  # the claim was lost: the run is another node's now
        self.executor.released(run.task)
        if self.memory is None:
            self.executor.wake()
        elif not self._dispatching:
            # the freed slot takes the next due run on the loop's next turn: runs ending in
            # the same turn (a burst) are refilled by one claim instead of one claim each
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                # no loop runs: a run task its closed loop left pending, whose coroutine the
                # garbage collector closes. Nothing can start any more
                pass
            else:
                self._dispatching = True
                loop.call_soon(self._dispatch)
        if self._idle is not None:
            self._check_idle()

    def _dispatch(self) -> None:
        self._dispatching = False
        self.start_soon()

    def _outside_cancel(self) -> CancelReason | None:
        """What a cancel from outside the engine (no cancel was asked for: no ``cancel_reason``)
        makes of a run executing here.

        On a durable store, None when it was the event loop's teardown: ``asyncio.run`` ending
        in an error or Ctrl-C with no ``engine.stop()``, and as well one ending while a stop
        drains (a second Ctrl-C, a ``wait_for`` around ``stop()`` running out), so the engine
        may be stopping, or even stopped if the interrupt ended the stop itself (its executor
        loops, cancelled only by the stop's last steps, tell). No one cancelled that run: it is
        not recorded as cancelled, and its claim is left for recovery to run again, as a killed
        process's is (nothing is written: the store may be closing under the teardown).
        ``"shutdown"`` for any other such cancel while the engine stops: the stop was going to
        cut the run short, which puts it back to pending, and so does this. ``"external"``
        while the engine goes on, or on the memory store, which keeps nothing across a stop."""
        if not self.durable:
            return "external"
        if self.executor.torn_down:
            return None
        return "shutdown" if self.engine.state == "stopping" else "external"

    def _hand_back(self, run: Run, token: str) -> None:
        """Give back a claim whose attempt never started (the node is stopping): pending, same attempt."""
        self.index.unclaimed(run)
        run.cancel_reason = None
        note = RunError(type="Shutdown", message=f"node {self.engine.node_id!r} stopped before the run started")
        self._end_claim(run, token, Retry(note, 0.0, next_attempt=False))

    def _end_claim(self, run: Run, token: str, outcome: Outcome) -> None:
        """Write ``outcome`` for a claim no attempt will record: the index already moved the run
        on (cancelled before its first step, handed back at a stop, or cancelled here while the
        claim was on its way).

        Like an attempt's outcome, the claim stays held and heartbeaten until the write lands,
        and a busy store is tried again: a claim let go unwritten would stay running in the
        store until recovery took it as lost and ran it once more.
        """
        memory = self.memory
        if memory is not None:
            self._claimed.pop(token, None)
            memory.finish_now(token, outcome)
            return
        self._claimed[token] = run
        self._finishing.add(token)
        self._send(run, token, outcome, None, again=False)

    def _write_later(self, token: str, outcome: Outcome) -> None:
        """Write an outcome once, for a claim whose lease already ran out (the store refuses it
        if another node took the run over meanwhile).

        The write is the engine's task: ``stop()`` awaits it before closing the store.
        """
        if self.engine.loop is None or self.engine.loop.is_closed():
            return
        try:
            write = as_future(self.store.finish(token, outcome), loop=self.engine.loop)
        except StoreError as exc:
            log.warning("writing a run's outcome to the store failed: %s", exc)
            return
        self.keep_write(write, _log_failed_outcome)

    def writing(self, runs: list[Run]) -> None:
        """A submit is writing these runs to a durable store."""
        for run in runs:
            self._writing[run.id] = run

    def written(self, runs: list[Run]) -> None:
        """The submit has the store's answer for these runs (or gave up on it)."""
        for run in runs:
            self._writing.pop(run.id, None)

    def admit(self, run: Run) -> None:
        """Index a run this node submitted and say so, once (its claim may have come first)."""
        if self.admitted_already(run):
            return
        self.index.admitted(run)
        self.announce(run)

    def admitted_already(self, run: Run) -> bool:
        """True for a run its claim admitted before its submit took up the store's answer: it is
        indexed, or went on from pending (and may even have finished and left the index)."""
        return self.index.runs.get(run.id) is run or run.status is not _PENDING

    def announce(self, run: Run) -> None:
        """Publish ``run.submitted`` for a run just indexed."""
        self.bus.post(
            RunSubmitted,
            run_id=run.id,
            task=run.task,
            # the event's own: a subscriber changing it changes no record (no call for none)
            params=detached(run.params) if run.params else {},
            key=run.key,
            source=run.source,
            max_attempts=run.max_attempts,
        )

    def keep_write(self, write: asyncio.Future[Any], then: Callable[[asyncio.Future[Any]], None]) -> None:
        """A write its caller stopped waiting for: ``then(write)`` once it has landed (or failed),
        and ``stop()`` awaits it before the store closes."""
        self._writes.add(write)

        def landed(done: asyncio.Future[Any]) -> None:
            self._writes.discard(done)
            then(done)

        write.add_done_callback(landed)


    def held_claims(self) -> dict[str, Progress]:
        return {token: Progress(done=run.done, total=run.total, message=run.message) for token, run in self._claimed.items()}

    def cancel_requested(self, token: str, reason: CancelReason) -> None:
        """Someone (any node) asked the store to cancel a run executing here."""
        run = self._claimed.get(token)
        if run is not None and run.handle is not None and run.cancel_reason is None:
            run.cancel_reason = reason
            run.handle.cancel()

    def claimed_runs(self, tokens: Iterable[str]) -> list[str]:
        """The ids of the runs this node's attempts hold the claims ``tokens`` of (a lost claim's
        run too, until its attempt has ended), leaving out those whose outcome is being written."""
        claimed, finishing = self._claimed, self._finishing
        return [run.id for token in tokens if (run := claimed.get(token)) is not None and token not in finishing]

    def claim_lost(self, token: str) -> str | None:
        """The store no longer counts this node as the run's owner (recovered elsewhere): stop
        it; the id of the run stopped, or None if there was none to stop."""
        run = self._claimed.get(token)
        if run is None or token in self._finishing:
            return None  # gone, or ended by our own finish, which the heartbeat crossed
        if run.token != token:
            # already let go (an earlier heartbeat said so, or a cut-off): the claim stays listed
            # until the task ends, so every heartbeat meanwhile reports it lost again. Cancelling
            # once more would cut short the task's own cleanup, which gets one cancel, as a user's does
            return None
        log.warning("lost the claim on run %s (recovered by another node); stopping it here", run.id)
        run.token = None  # nothing this attempt does may be recorded any more
        if run.handle is not None and not run.handle.cancelling():  # a user's cancel may be under way
            run.handle.cancel()
        return run.id

    def cut_off(self, seconds: float, tokens: Sequence[str], first: bool) -> None:
        """The store has been out of reach past the claims' lease: stop the runs whose claims ran
        out (another node may be running them by now), give up leadership, say so."""
        engine = self.engine
        stopped: list[str] = []
        note = RunError(
            type="StoreUnreachable",
            message=f"node {engine.node_id!r} could not reach the store to renew its claim for "
            f"{self.store.lease_ttl:g} s; stopped there and re-queued",
        )
        for token in tokens:
            run = self._claimed.get(token)
            if run is None or token in self._finishing:
                continue  # ended meanwhile: its own finish decides
            stopped.append(run.id)
            run.token = None  # nothing this attempt does may be recorded any more
            if run.handle is not None:
                run.handle.cancel()
            # back to pending as soon as the store answers, unless another node took it over
            self._write_later(token, Retry(note, 0.0))
        if stopped:
            log.warning("stopped %d run(s) whose claims ran out while the store was unreachable: %s",
                        len(stopped), ", ".join(stopped))  # fmt: skip
        if first:
            engine.elector.suspend()
        self.bus.emit(StoreUnreachable, store=self.store.describe(), seconds=seconds, stopped=stopped)

    def reconnected(self, seconds: float) -> None:
        """The store answers again: say so, and compete for leadership again."""
        self.bus.emit(StoreReachable, store=self.store.describe(), seconds=seconds)
        self.engine.elector.resume()

    def _resources_for(self, names: Sequence[str]) -> dict[str, Any] | None:
        """The resources ``names`` as the engine provides them now; None if one is missing."""
        provided = self.engine.resources
        return {name: provided[name] for name in names} if all(name in provided for name in names) else None

    async def _execute(
        self,
        run: Run,
        token: str,
        ended: Callable[[asyncio.Task[None]], None],
        context: contextvars.Context,
        given: dict[str, Any] | None = None,
    ) -> None:
        """Run one attempt of a claimed run and write its outcome with the claim's token."""
        window: asyncio.Timeout | None = None
        overran = False
        final = False  # the attempt failed in a way no retry can help
        try:
            spec = run.spec
            if spec is None:
                error = RunError(
                    type="UnknownTask",
                    message=f"task {run.task!r} is not registered on node {self.engine.node_id!r}; register it there, or run it elsewhere",
                )
                self._record(run, token, Failed(error), error)
                return
            try:
                model = run.model
                if model is None and spec.params_model is not None:
                    # a run read back from the store: its params are read again here, as submit
                    # read them (a copy: the model may share lists and dicts with what it was
                    # validated from)
                    try:
                        model = run.model = params_from_record(spec.params_model, detached(run.params))
                    except ValidationError as exc:
                        # the task's model changed since the run was recorded: no retry can help
                        error = RunError(type="InvalidParams", message=_params_no_longer_fit(spec.name, exc))
                        self._record(run, token, Failed(error), error)
                        return
                ctx = TaskContext(self.engine, run, spec.name, report=self.progress, attempt=run.attempt, token=token)
                args: tuple[Any, ...] = (ctx,) if model is None else (ctx, model)
                if spec.resources:
                    kwargs = given if given is not None else self._resources_for(spec.resources)
                    if kwargs is None:
                        missing = [name for name in spec.resources if name not in self.engine.resources]
                        raise LookupError(
                            f"resource {missing[0]!r} of task {spec.name!r} is not provided on node "
                            f"{self.engine.node_id!r}: provide it (engine.provide) and retry the run"
                        )
                    call = spec.fn(*args, **kwargs)
                else:
                    call = spec.fn(*args)
                if spec.timeout is None:
                    result = await call
                else:
                    window = asyncio.timeout(spec.timeout)
                    overrun: _Overrun | None = None
                    try:
                        async with window:
                            overrun = _Overrun(run, token, spec.timeout, window, self.engine.cancel_grace)
                            result = await call
                    except asyncio.CancelledError as cancelled:
                        # the timeout's own cancel after cancels again: a timeout still, unless
                        # a cancel from elsewhere is left once ours are taken back
                        if overrun is not None and overrun.end() and run.cancel_reason is None and not overrun.cancelled_elsewhere():
                            raise TimeoutError from cancelled
                        raise
                    finally:
                        if overrun is not None:
                            overrun.end()
                    when = window.when()
                    if window.expired() or (when is not None and asyncio.get_running_loop().time() >= when):
                        # the task swallowed its timeout's cancel and returned, or overran its
                        # deadline blocking the loop and never suspended after it: it still timed out
                        overran = True
                        raise TimeoutError
                if result is not None:
                    try:
                        result = jsonable(result, distinct_keys=True)
                    except NotJsonSafe as exc:
                        # told apart from a NotJsonSafe the task's own code raised, which fails as any
                        raise _ResultNotJson(exc.detail) from None
                    except Exception as exc:  # noqa: BLE001 - the value's own code, run by its conversion
                        # a computed field or a serializer of the value that raises: the attempt did
                        # its work all the same, and is not the task's own failure to retry
                        raise _ResultNotJson(
                            f"converting it raised {type(exc).__name__}: {safe_str(exc)}"
                        ) from None
            except asyncio.CancelledError as exc:
                current = asyncio.current_task()
                if run.cancel_reason is None and current is not None and not current.cancelling():
                    # nobody cancelled this task: it raised CancelledError itself (it awaited a
                    # task or future that was cancelled, say). A failure, retried as any: taken
                    # for a cancel from outside it ended the run as if it had done nothing, and a
                    # trigger fired the key again at once, over and over
                    error = _raised_cancelled(spec.name, exc)
                else:
                    reason = run.cancel_reason or "external"
                    if reason == "external" and run.token is not None:
                        # someone else's cancel: the task ends cancelled, as that caller expects
                        outside = self._outside_cancel()
                        if outside == "shutdown":
                            run.cancel_reason = outside  # as the stop's own cut would have marked it
                            self._record(run, token, self._cut_short(run, outside), None)
                        elif outside is not None:
                            self._record(run, token, Cancelled(outside), None)
                        raise
                    if run.token is not None:
                        self._record(run, token, self._cut_short(run, reason), None)
                    # our own cancel: the run is recorded, the task ends normally
                    if current is not None:
                        current.uncancel()
                    return
            except TimeoutError as exc:
                # the run's own timeout, not a TimeoutError the task raised itself
                if window is not None and (window.expired() or overran) and run.cancel_reason is None:
                    cause = exc.__cause__
                    error = RunError.timed_out(
                        f"run exceeded its {spec.timeout:g} s timeout",
                        cause if isinstance(cause, asyncio.CancelledError) else exc,
                    )
                else:
                    error = RunError.from_exception(exc)
            except _ResultNotJson as exc:
                # the task ran to its end: another attempt would do its work again (charge a card
                # twice) only to return the same kind of value, so the run fails without retries
                final = True
                error = RunError(
                    type="ResultNotSerializable",
                    message=f"task {spec.name!r} returned a value that cannot be sent as JSON: {exc.detail}; "
                    "return JSON data (dicts, lists, str, numbers) or a pydantic model. Not retried: the "
                    "attempt did its work, and another would do it again",
                )
            except EngineNotRunning as exc:
                if self.engine.state != "stopping" or run.cancel_reason is not None:
                    error = RunError.from_exception(exc)
                else:
                    # the stopping engine refused it a submit or a put (a durable store's stop
                    # takes no runs; a queue closed once the drain was over): no failure of its
                    # code, the stop cut it short, as it does a queue's handler in that spot
                    run.cancel_reason = "shutdown"
                    self._record(run, token, self._cut_short(run, "shutdown"), None)
                    return
            except BaseException as exc:  # noqa: BLE001
                # SystemExit, KeyboardInterrupt, GeneratorExit and the like raised by task
                # code fail that run: escaping here would take down the caller's loop
                error = RunError.from_exception(exc)
            else:
                if run.cancel_reason is not None:
                    # the task swallowed the cancel and returned: it was still cancelled
                    self._record(run, token, self._cut_short(run, run.cancel_reason), None)
                    return
                outcome = Succeeded(result) if result is not None else _NO_RESULT
                memory = self.memory
                if memory is not None and run.token == token:
                    # the memory store's finish never suspends: the run is done here and now
                    status = memory.finish_now(token, outcome)
                    if status is _SUCCEEDED:
                        run.token = None
                        self._claimed.pop(token, None)
                        self._succeeded(run, result)
                    else:
                        self._apply_outcome(run, token, outcome, None, status)
                    return
                self._record(run, token, outcome, None)
                return
            if run.cancel_reason is not None:
                # cancelled while it was failing: the user's intent wins
                self._record(run, token, self._cut_short(run, run.cancel_reason), None)
                return
            if not final and run.attempt < run.max_attempts and self.engine.state != "stopped":
                # (the exponent capped: 2.0 ** 1024 overflows, and the cap is reached long before)
                delay = min(spec.backoff_max, spec.backoff * 2.0 ** min(run.attempt - 1, 64))
                delay *= random.uniform(0.5, 1.0)  # jitter so retries of a burst spread out
                self._record(run, token, Retry(error, delay), error)
                return
            self._record(run, token, Failed(error), error)
        finally:
            # the attempt is over: its slot and claim are settled here, in its own last step,
            # instead of by the task's done callback a loop turn later (the callback stays for a
            # task cancelled before its first step, which never gets here)
            handle = run.handle
            if handle is not None and handle.remove_done_callback(ended):
                context.run(ended, handle)


    def _cut_short(self, run: Run, reason: CancelReason) -> Outcome:
        """A durable store keeps a run cut short by shutdown for the next start, with the retries
        it had (a stop is no failure of its code); else it is cancelled."""
        if reason == "shutdown" and self.durable:
            return Retry(
                RunError(type="Shutdown", message=f"node {self.engine.node_id!r} stopped while the run was executing; re-queued"),
                cut_short=True,
            )
        return Cancelled(reason)

    def _record(self, run: Run, token: str, outcome: Outcome, error: RunError | None) -> None:
        """Write ``outcome`` with the claim's token, then bring the index and the bus up to date.

        The memory store's finish never suspends: all of it happens now. A durable
        store's write goes out now and the outcome applies when the store has it: the
        attempt is over, so its task ends and its slot takes the next run while the write
        travels (that run's claim rides beside it). The claim stays held and heartbeaten
        until the write lands, and nothing cancels the write: what the store holds and
        what this node reports must agree.
        """
        if run.token != token:
            return  # the claim was lost: another node owns the run now
        memory = self.memory
        if memory is not None:
            self._apply_outcome(run, token, outcome, error, memory.finish_now(token, outcome))
            return
        self._finishing.add(token)
        if isinstance(outcome, Retry):
            self._retrying[token] = (outcome, error)
        self._send(run, token, outcome, error, again=False)

    def _send(self, run: Run, token: str, outcome: Outcome, error: RunError | None, *, again: bool) -> None:
        """Start writing an outcome: the store's own future first (no task per write); if the
        store is busy, a writer that tries again for a while."""
        write: asyncio.Future[RunStatus | None] | None = None
        if not again:
            try:
                sent = self.store.finish(token, outcome, _last_progress(run))
                # the store's own future as it is (ensure_future is two Python calls per run)
                write = sent if isinstance(sent, asyncio.Future) else as_future(sent)
            except StoreError:
                again = True
        if write is None:
            write = as_future(self._write_outcome(run, token, outcome))
        self._writes.add(write)
        write.add_done_callback(functools.partial(self._outcome_written, run, token, outcome, error, again))

    def _outcome_written(
        self, run: Run, token: str, outcome: Outcome, error: RunError | None, again: bool,
        write: asyncio.Future[RunStatus | None],
    ) -> None:
        self._writes.discard(write)
        exc = None if write.cancelled() else write.exception()
        if exc is not None and not again and isinstance(exc, StoreError) and not isinstance(exc, _GIVE_UP):
            self._send(run, token, outcome, error, again=True)  # the claim stays held and heartbeaten
            return
        failed = exc is not None or write.cancelled()
        if failed:
            log.error("writing the outcome of run %s failed (%s); recovery will run it again", run.id,
                      exc or "cancelled")  # fmt: skip
        self._finishing.discard(token)
        self._retrying.pop(token, None)
        try:
            self._apply_outcome(run, token, outcome, error, None if failed else write.result(), failed=failed)
        finally:
            self._claimed.pop(token, None)  # the claim ends with its write, whatever the store said
            self._check_idle()
            # a capped task's next claim may have been refused while the store still counted
            # this run as running: now it does not
            self.executor.wake()

    async def _write_outcome(self, run: Run, token: str, outcome: Outcome) -> RunStatus | None:
        """``store.finish``, tried again until the store answers it (or closes, or its stopping
        engine's time for last writes runs out: the store's error is raised then).

        The claim stays heartbeaten meanwhile, so a store that is merely busy keeps it alive.
        Through an outage that outlasts the claim's lease the outcome is kept too, and written
        once the store answers: the store takes it while the claim is still this attempt's (no
        other node takes a live node's claim just after an outage) and refuses it, with no
        harm, once another node has taken the run. Given up at the lease's end, as it was, a
        run that had finished ran a second time.
        """
        delay = 0.05
        tries = 0
        while True:
            try:
                return await self.store.finish(token, outcome, _last_progress(run))
            except StoreError as exc:
                if isinstance(exc, _GIVE_UP):
                    raise
                tries += 1
                # each try said, the later ones at DEBUG: an outage of minutes is one warning
                level = logging.INFO if tries < _OUTCOME_TRIES_TOLD else logging.DEBUG
                log.log(level, "writing the outcome of run %s: %s; trying again in %g s", run.id, exc, delay)
                if tries == _OUTCOME_TRIES_TOLD:
                    log.warning(
                        "writing the outcome of run %s keeps failing (%s): it is kept, and written once the "
                        "store answers (tried every %g s)", run.id, exc, _OUTCOME_RETRY_MAX,
                    )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, _OUTCOME_RETRY_MAX)

    def _apply_outcome(
        self, run: Run, token: str, outcome: Outcome, error: RunError | None, status: RunStatus | None,
        *, failed: bool = False,
    ) -> None:
        if run.token != token:
            return
        run.token = None
        self._claimed.pop(token, None)
        if run.status.finished:
            return  # cancelled meanwhile: the store had the retry pending, and cancelled it
        if status is None:
            if not failed:
                # the store gave the run to someone else while this attempt ran
                log.warning("the outcome of run %s was refused: its claim had expired", run.id)
            self.index.unclaimed(run)
            return
        now = self.engine.clock()
        if status is _PENDING:
            assert isinstance(outcome, Retry)
            tried = run.attempt
            self.index.requeued(run, outcome.error, now + outcome.delay)
            run.max_attempts += outcome.added_attempts  # as the store wrote it
            self.bus.post(
                RunRetrying, run_id=run.id, task=run.task, attempt=run.attempt, delay=float(outcome.delay),
                error=outcome.error, max_attempts=run.max_attempts, from_store=False,
            )
            self.executor.wake()
            # (no error: a run handed back at a stop, which is no failure of its code)
            if error is not None:
                _log_retry(run, tried, error, float(outcome.delay))
        elif status is _SUCCEEDED:
            self._succeeded(run, outcome.result if isinstance(outcome, Succeeded) else None)
        elif status is _FAILED:
            run.error = error
            self._finish(run, _FAILED, now)
            self.bus.post(
                RunFailed, run_id=run.id, task=run.task, attempt=run.attempt,
                duration=now - (run.started_at or now), error=error, from_store=False,
            )
            # logged here only, by the node whose attempt failed: the nodes that hear of the end
            # from the store or the relay stay silent, so a collector gets the traceback once
            if error is not None:
                self._log_failure(run, error)
        else:
            reason = outcome.reason if isinstance(outcome, Cancelled) else (run.cancel_reason or "user")
            self.finish_cancelled(run, reason, was_running=True)


    def _succeeded(self, run: Run, result: Any) -> None:
        """The store has the run succeeded: the index, its waiters and the bus hear of it."""
        now = self.engine.clock()
        run.result = result
        self._finish(run, _SUCCEEDED, now)
        self.bus.post(
            RunSucceeded, run_id=run.id, task=run.task, attempt=run.attempt,
            duration=now - (run.started_at or now), result=result if result is None else detached(result),
            from_store=False,
        )
        if self._failing:
            self._streak_ended(run)

    def _log_failure(self, run: Run, error: RunError) -> None:
        """A run that failed here, logged. Each run with its traceback, but a periodic task's
        that fails as its last run did: a schedule that fails every few seconds for the same
        reason (a database down, a bad setting) would bury everything else under its copies."""
        if not run.source.startswith("periodic:"):
            _log_failed(run, error)
            return
        failed, logged = self._failing.get(run.task, (0, ""))
        self._failing[run.task] = (failed + 1, error.type)
        if error.type != logged:
            _log_failed(run, error)
        else:
            _log_failed(run, error, streak=failed + 1)

    def _streak_ended(self, run: Run) -> None:
        streak = self._failing.pop(run.task, None) if run.source.startswith("periodic:") else None
        if streak is not None and runs_log.isEnabledFor(logging.INFO):
            log_safely(
                runs_log, logging.INFO, "periodic task %r succeeded again (run %s) after %d failed run(s) in a row",
                run.task, run.id, streak[0],
            )  # fmt: skip

    async def on_recovered(self, recovered: list[Recovered]) -> None:
        """Runs taken back from lost workers (any node's): update the index, publish what happened.

        A run recovery fails or cancels has no owner left to say it ended: this node, the one
        that recovered it, publishes its ``run.failed`` / ``run.cancelled`` as its own news
        (``from_store=False``, so its relay sends it to the cluster), whether or not it knew the run.
        """
        ids = [item.run_id for item in recovered]
        # until that news is out, a read-back of the store (the store's notice of their end, a
        # waiter's refresh, a catch-up) leaves these runs alone: it would end them here as read
        # from the store, which no relay sends, and the cluster would never hear how they ended
        self._recovering.update(ids)
        try:
            self._settle_recovered(recovered, await self.store.get_many(ids))  # one query for the lot
        finally:
            self._recovering.difference_update(ids)

    def _settle_recovered(self, recovered: list[Recovered], rows: Mapping[str, StoredRun]) -> None:
        for item in recovered:
            self.index.recovered_total += 1
            stored = rows.get(item.run_id)
            run = self.index.runs.get(item.run_id)
            untracked: Run | None = None
            if run is None:
                if stored is None:
                    continue  # pruned meanwhile
                # a previous incarnation's run, or another node's: the store's row says it all
                untracked = Run.from_record(stored, self.tasks.get(item.task), own=True)
                self.index.add(untracked)
            elif item.action == "requeued":
                if run.token is not None and run.attempt >= item.attempt:
                    pass  # claimed here since, as the attempt recovery made: it runs here now
                elif run.status is not _PENDING:
                    if run.token is not None and run.token not in self._finishing:
                        # an attempt still executing here whose claim the store has just taken
                        # back (this node's clock stepped past the lease, say): it is over. Left
                        # holding the run's token and handle, its later "claim lost" would stop
                        # the next attempt instead of itself
                        self._claimed.pop(run.token, None)
                        run.token = None
                        if run.handle is not None and not run.handle.cancelling():
                            run.handle.cancel()
                    self.index.requeued(run, stored.error if stored is not None else run.error, 0.0)
                    run.attempt = item.attempt
                else:
                    run.attempt = item.attempt
            self.bus.emit(
                RunRecovered, run_id=item.run_id, task=item.task, action=item.action, reason=item.reason,
                attempt=item.attempt, lost_count=item.lost_count, from_node=item.node,
            )
            ended = untracked if untracked is not None else run if run is not None and run.status.finished else None
            if ended is not None:
                # indexed as the store has it after the recovery (unknown here before, or read in
                # by this node's start, which recovers first): its end not yet told on this bus
                self._recovered_end(ended, item)
                continue
            if run is None:
                continue
            if item.action in ("failed", "cancelled"):
                # lost on another node after attempts this one never saw start: its end names
                # the attempt the store's record does
                run.attempt = max(run.attempt, item.attempt)
            if item.action == "failed":
                error = stored.error if stored is not None and stored.error is not None else RunError(
                    type="WorkerLost", message="its worker was lost"
                )
                self.fail_unstarted(run, error)
                _log_failed(run, error, traceback=False)  # the lost attempt's traceback is nowhere
            elif item.action == "cancelled":
                # its cancel was asked for (by a user, unless the store says otherwise): the
                # record here says what the store's does
                reason = stored.cancel_reason if stored is not None and stored.cancel_reason else "user"
                self.finish_cancelled(run, reason, was_running=True)

    def _recovered_end(self, run: Run, item: Recovered) -> None:
        """Publish how a run indexed as already ended ended at its recovery, if it was failed or cancelled."""
        if item.action == "failed" and run.status is _FAILED:
            error = run.error or RunError(type="WorkerLost", message="its worker was lost")
            finished = run.finished_at or self.engine.clock()
            self.bus.post(
                RunFailed, run_id=run.id, task=run.task, attempt=run.attempt,
                duration=max(0.0, finished - (run.started_at or finished)), error=error, from_store=False,
            )
            _log_failed(run, error, traceback=False)
        elif item.action == "cancelled" and run.status is _CANCELLED:
            self.bus.post(
                RunCancelled, run_id=run.id, task=run.task, attempt=run.attempt,
                reason=run.cancel_reason or "user", was_running=True, from_store=False,
            )

    async def prune(self) -> None:
        """Keep the store within ``history`` and ``retention`` (never touching unfinished runs),
        and bring the index up to date with runs other nodes execute."""
        retention = self.engine.retention
        await self.store.prune(keep=self.index.history, older_than=retention)
        if retention is not None:
            self.index.expire(self.engine.clock() - retention)
        now = time.monotonic()
        if now >= self._nodes_pruned_at + NODE_PRUNE_INTERVAL:
            self._nodes_pruned_at = now
            await self.store.prune_nodes(self.store.node_retention)
        if self.durable:
            await self._catch_up()

    async def _catch_up(self, limit: int = 256) -> None:
        """Runs this node knows but does not execute: apply what the store says of them.

        Another process sharing the store may have claimed, finished or
        cancelled a run this node submitted; without this its index (and a
        ``wait()`` on it) would show it pending for ever. Up to ``limit`` runs
        a round, those shown running elsewhere first.
        """
        foreign = [run for run in self.index.runs.values() if self._foreign(run)]
        foreign.sort(key=lambda run: run.status is not _RUNNING)
        await self._take_from_store(foreign[:limit])

    async def caught_up(self, run_ids: Iterable[str]) -> None:
        """The store says these runs finished on other nodes: apply that to the ones this
        node knows now, not at the next round of :meth:`_catch_up`."""
        runs = self.index.runs
        await self._take_from_store([run for i in run_ids if (run := runs.get(i)) is not None and self._foreign(run)])

    def _foreign(self, run: Run) -> bool:
        return not run.status.finished and run.token is None and run.handle is None

    async def refresh(self, run: Run) -> None:
        """Bring ``run``'s entry up to what the store holds, if another node executes it
        (this node's own runs are what it does; a run that vanished is let go)."""
        if self.durable and self._foreign(run):
            await self._take_from_store([run])

    def apply_stored(self, run: Run, stored: RunRecord, *, announced: bool = True) -> None:
        """Move ``run``'s entry to the store's record of it. ``announced``: the node that
        changed it published that; else (this node's own request did it) it is published here."""
        if announced or stored.status is not _CANCELLED or run.status.finished:
            self._apply_stored(run, stored)
            return
        self._copy_outcome(run, stored)
        self.finish_cancelled(run, stored.cancel_reason or "user", was_running=run.status is _RUNNING)

    async def _take_from_store(self, runs: list[Run]) -> None:
        recovering = self._recovering
        wanted = [run for run in runs if not self.executor.unwritten(run.id) and run.id not in recovering]
        if not wanted:
            return
        found = await self.store.get_many([run.id for run in wanted])  # one query for the lot
        incarnation = self.executor.incarnation
        vanished = []
        for run in wanted:
            if run.token is not None or run.status.finished or run.id in recovering:
                continue  # this node claimed, ended or is recovering it meanwhile
            stored = found.get(run.id)
            if stored is None:
                vanished.append(run)
            elif stored.attempt < run.attempt or (stored.status is _RUNNING and stored.incarnation == incarnation):
                # read before something this node has seen since: it claimed the run after the
                # read began, and ran an attempt of it (a claim of its own is the executor's to
                # start: a row saying this node runs it is as old as that claim, or older)
                continue
            else:
                self._apply_stored(run, stored.to_record(), stored.run_after)
        if vanished:
            self._vanished(vanished)

    def _vanished(self, runs: list[Run]) -> None:
        """Runs the store no longer has, although this node never saw them end: another node
        finished them and the store's history or retention pruned them before this node
        looked. How they ended is gone; shown pending for good, they would also hold
        places of ``max_queue`` and of every catch-up round. Their waiters hear RunNotFound."""
        for run in runs:
            self.index.forget(run)
            waiters, run.waiters = run.waiters, None
            for fut in waiters or ():
                if not fut.done():
                    fut.set_exception(RunNotFound(run.id))
        log.warning(
            "%d run(s) this node knew ended on other nodes and were pruned from %s before it "
            "learned how (%s%s); raise history= or retention= to keep finished runs longer",
            len(runs), self.store.describe(), ", ".join(run.id for run in runs[:5]), ", ..." if len(runs) > 5 else "",
        )

    @staticmethod
    def _copy_outcome(run: Run, stored: RunRecord) -> None:
        run.attempt = stored.attempt
        run.max_attempts = stored.max_attempts
        run.started_at = stored.started_at
        run.node = stored.node
        run.result = stored.result
        run.error = stored.error

    def _apply_stored(self, run: Run, stored: RunRecord, run_after: float = 0.0) -> None:
        """Move ``run``'s index entry to what the store holds, announcing each transition.
        ``run_after``: when a retry the store holds is due (the record does not say)."""
        if run.status.finished:
            # its end is known here already: this node's own, heard before the store's answer
            # to a cancel made while its outcome was being written (announced again, the run
            # ended twice on the bus and counted twice in the totals)
            return
        if stored.status is _RUNNING and run.status is _PENDING:
            self.index.started(run, stored.attempt, stored.started_at, stored.node)
            # the attempt's own progress (its claim cleared the row's), not the last attempt's
            progress = stored.progress
            run.done, run.total, run.message = progress.done, progress.total, progress.message
            self.bus.emit(RunStarted, run_id=run.id, task=run.task, attempt=run.attempt, from_store=True)
        elif stored.status is _PENDING and stored.attempt > run.attempt and stored.error is not None:
            # an attempt ended on another node, which wrote its retry (this node may not have
            # seen it start): with its error and due time, and said here too (that node
            # announced it to its own bus only)
            # not among the retries this node wakes for: it may have no room or no resources for
            # the task, and would look for it every few milliseconds until its next catch-up
            self.index.requeued(run, stored.error, 0.0)
            run.run_after = run_after
            run.attempt = stored.attempt
            run.max_attempts = stored.max_attempts  # more by one if its node's stop cut it short
            delay = max(0.0, run_after - self.engine.clock()) if run_after else 0.0
            self.bus.post(
                RunRetrying, run_id=run.id, task=run.task, attempt=run.attempt, delay=delay,
                error=stored.error, max_attempts=run.max_attempts, from_store=True,
            )
        elif stored.status is _PENDING and run.status is _RUNNING:
            self.index.unclaimed(run)
            run.attempt = stored.attempt
            run.max_attempts = stored.max_attempts  # more by one if its node's stop cut it short
        elif stored.status.finished:
            self._copy_outcome(run, stored)
            now = stored.finished_at or self.engine.clock()
            if stored.status is _CANCELLED:
                self.finish_cancelled(
                    run, stored.cancel_reason or "external", was_running=run.status is _RUNNING, from_store=True
                )
                return
            self._finish(run, stored.status, now)
            duration = now - (run.started_at or now)
            # posted, as the engine's own outcomes are: the values are the store's, checked
            # when they were recorded (a result encoded again here would cost as much as it is big)
            if stored.status is _SUCCEEDED:
                self.bus.post(
                    RunSucceeded, run_id=run.id, task=run.task, attempt=run.attempt, duration=duration,
                    result=detached(run.result), from_store=True,
                )
                if self._failing:
                    self._streak_ended(run)  # it works again, on another node
            else:
                error = run.error or RunError(type="Unknown", message="failed on another node")
                self.bus.post(
                    RunFailed, run_id=run.id, task=run.task, attempt=run.attempt, duration=duration, error=error,
                    from_store=True,
                )


    def progress(self, run: Run, token: str | None, done: float, total: float | None, message: str) -> None:
        if run.status is not _RUNNING or run.token != token:
            # from something an attempt left going after it ended (a thread a timeout could not
            # stop, say): a finished record stays as it ended, its run.progress events end
            # before its last event, and a later attempt's progress is that attempt's own
            return
        # the event is validated first: a value it refuses (not a finite number) raises in
        # the task and leaves the record as it was
        try:
            event = self.bus.emit(
                RunProgressed,
                run_id=run.id,
                task=run.task,
                done=done,
                total=total,
                # bound as an error message is: every event, record, snapshot and store row carries it
                message=cut_text(safe_text(message), MAX_ERROR_MESSAGE // 2, MAX_ERROR_MESSAGE // 2)
                if isinstance(message, str)
                else message,
            )
        except ValidationError as exc:
            raise InvalidProgress.refused(run.id, exc) from None
        except InvalidConfiguration as exc:
            # a NaN or infinity, which emit() refuses as InvalidConfiguration: a task is told of
            # its report as of every other bad value, InvalidProgress naming what it gave
            if isinstance(exc.__cause__, ValidationError):
                raise InvalidProgress.refused(run.id, exc.__cause__) from None
            raise
        run.done = event.done
        run.total = event.total
        run.message = event.message

    def finish_cancelled(self, run: Run, reason: CancelReason, *, was_running: bool, from_store: bool = False) -> None:
        if run.status.finished:
            return
        run.cancel_reason = reason
        self._finish(run, _CANCELLED, self.engine.clock())
        self.bus.post(
            RunCancelled,
            run_id=run.id,
            task=run.task,
            attempt=run.attempt,
            reason=reason,
            was_running=was_running,
            from_store=from_store,
        )


    def finished_future(self, run: Run) -> asyncio.Future[RunRecord]:
        """A future the run's finish resolves (no task per waiter); a coroutine too, see :class:`RunWait`."""
        fut: asyncio.Future[RunRecord] = RunWait(loop=asyncio.get_running_loop())
        if run.status.finished:
            fut.set_result(run.record())
        elif run.waiters is None:
            run.waiters = [fut]
        else:
            waiters = run.waiters
            size = len(waiters)
            if size >= 32 and not size & (size - 1):
                # waits given up (wait_for timeouts, say) leave cancelled futures: dropped at
                # each doubling, so polling a long run costs no memory (and O(1) a wait)
                waiters[:] = [w for w in waiters if not w.done()]
            waiters.append(fut)
        return fut

    def keep_cancelling(self, run: Run, *, after: float) -> None:
        """Once ``after`` seconds (the cancel's grace) have passed, cancel the task of ``run``'s
        attempt again every ``cancel_grace`` seconds until it ends, as a timeout and a stop do:
        one cancel is swallowed by a broad ``except``, and the task would then go on for as long
        as its work takes, holding its slot. A cleanup that ends within the grace is left alone."""
        task, token = run.handle, run.token
        if task is None or token is None:
            return
        every = max(self.engine.cancel_grace, _MIN_RECANCEL)
        loop = asyncio.get_running_loop()
        cancels = 0

        def again() -> None:
            nonlocal cancels
            if task.done() or run.token != token or self.engine.state == "stopped":
                # over, or no longer this attempt's; or the stop gave up on it, and said so
                return
            if task.cancel():
                cancels += 1
                if cancels == 1:
                    log.warning(
                        "run %s of task %r still runs %g s after its cancel; cancelling it again every %g s "
                        "until it ends (a task should let CancelledError propagate, after a short cleanup)",
                        run.id, run.task, after, every,
                    )  # fmt: skip
            loop.call_later(every, again)

        loop.call_later(max(after, _MIN_RECANCEL), again)

    def checked_grace(self, grace: float | None) -> float:
        """``Engine.cancel``'s ``grace`` checked before anything is cancelled, None as the engine's ``cancel_grace``."""
        checked = checked_grace("Engine.cancel()", grace)
        return self.engine.cancel_grace if checked is None else checked

    async def wait_finished(self, run: Run, timeout: float | None) -> RunRecord:
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


    def pending_kept(self) -> None:
        """A durable store's stop that nothing else will run this node's pending runs for (see
        ``Engine._keep_pending``): whoever waits on one hears now that it is kept for the next
        start, as at the stop's end."""
        self._tell_stopped(self.index.pending())

    def stopped_before_done(self) -> None:
        """The engine stopped: whoever waits on a run it leaves unfinished (pending in a
        durable store, for the next start) hears so instead of waiting on a future that
        nothing here will resolve (a restart reads the runs back as new objects)."""
        self._tell_stopped(run for run in self.index.runs.values() if run.waiters and self.left_undone(run))

    def _tell_stopped(self, runs: Iterable[Run]) -> None:
        """Answer the waiters of ``runs`` with :meth:`stopped_error`."""
        for run in runs:
            waiters, run.waiters = run.waiters, None
            for fut in waiters or ():
                if not fut.done():
                    fut.set_exception(self.stopped_error(run))

    def left_undone(self, run: Run) -> bool:
        """Whether nothing on this stopped engine will end ``run``. With the memory store a
        task that ignored its cancel and still executes when the stop ends will not run
        past the stop's own end: :meth:`give_up` ends it. A durable store's run cut short
        goes back to pending instead (and its store is closed)."""
        handle = run.handle
        return not run.status.finished and (self.durable or handle is None or handle.done())

    def stopped_error(self, run: Run) -> StoppedBeforeDone:
        node = run.node if run.status is _RUNNING and run.node != self.engine.node_id else None
        return StoppedBeforeDone(f"run {run.id}", kept=self.durable, elsewhere=node)

    def inserted(self, rows: list[NewRun], result: list[Inserted] | BaseException) -> None:
        """A batch queued with submit_nowait was written (or could not be)."""
        if isinstance(result, BaseException):
            log.error("writing %d queued run(s) to the store failed: %s", len(rows), result)
            for row in rows:
                run = self.index.runs.get(row.id or "")
                if run is not None and run.status is _PENDING:
                    error = RunError(type=type(result).__name__, message=f"the run could not be stored: {safe_str(result)}")
                    self.fail_unstarted(run, error)
            return
        for row, inserted in zip(rows, result, strict=True):
            if inserted.new:
                continue
            # another process's pending run held the key: this one never existed in the store
            run = self.index.runs.get(row.id or "")
            if run is not None and run.status is _PENDING:
                run.error = RunError(
                    type="KeyHeld",
                    message=f"run {inserted.id} held the key {run.key!r} of task {run.task!r} when this run was "
                    "written, so this one was not queued; that run does the work",
                )
                self.finish_cancelled(run, "key_held", was_running=False)

    def fail_unstarted(self, run: Run, error: RunError) -> None:
        run.error = error
        now = self.engine.clock()
        self._finish(run, _FAILED, now)
        self.bus.emit(RunFailed, run_id=run.id, task=run.task, attempt=run.attempt, duration=0.0, error=error)


    def local_work(self) -> int:
        """Runs this node still has to see through before it is idle: with the memory store,
        its pending runs too, but for those of tasks whose resources it lacks, which it cannot
        start (a stop would wait out its whole timeout for them)."""
        running = len(self._claimed)
        if self.durable:
            return running
        pending = self.index.counts[_PENDING]
        if pending and not running:
            # nothing runs, yet runs wait: perhaps only ones no one here can start. Counted
            # only then (the index is walked), and only while some task is held back
            claimable = self.limits()
            if len(claimable) < len(self.tasks):
                pending = sum(1 for run in self.index.runs.values() if run.status is _PENDING and run.task in claimable)
        return running + pending

    async def wait_idle(self, timeout: float) -> bool:
        if self.local_work() == 0:
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


    async def await_tasks(self, tasks: list[asyncio.Task[Any]]) -> list[asyncio.Task[Any]]:
        """Await cancelled tasks, cancelling again those that swallow the first cancel; returns
        those still going after three rounds of ``cancel_grace``."""
        remaining = [t for t in tasks if not t.done()]
        for _ in range(3):
            if not remaining:
                return []
            _, pending = await asyncio.wait(remaining, timeout=self.engine.cancel_grace)
            for t in pending:
                t.cancel()
            remaining = list(pending)
        if not remaining:
            return []
        # a task that ignores cancellation this long is a bug in that task; waiting
        # for it forever would hang every caller of stop(), so say so and go on
        log.warning(
            "%d run(s) ignored cancellation for %.3g s and are still running: %s",
            len(remaining), 3 * self.engine.cancel_grace, ", ".join(t.get_name() for t in remaining),
        )
        return remaining

    def give_up(self, tasks: list[asyncio.Task[Any]]) -> None:
        """The runs of ``tasks`` ignored every cancel of a stop, which goes on without them.

        With the memory store nothing would end them once the engine has stopped (such a
        task may loop for good): they end cancelled by the shutdown now, answering their
        waiters, and whatever their task does later is not recorded. A durable store
        keeps them for recovery, as any run of a stopped node.
        """
        self.left_going = list(tasks)
        if self.memory is None:
            return
        # an earlier stop's still going, too: a schedule's or a trigger key's next run waits for them
        self._left_going_runs = {t: run for t, run in self._left_going_runs.items() if going_here(t)}
        for token, run in list(self._claimed.items()):
            if run.handle in tasks:
                self._left_going_runs[run.handle] = run
                run.handle.add_done_callback(self._left_going_ended)
                self._record(run, token, Cancelled("shutdown"), None)

    def _left_going_ended(self, task: asyncio.Task[Any]) -> None:
        self._left_going_runs.pop(task, None)

    def still_going(self, task: str) -> list[tuple[asyncio.Task[Any], str, dict[str, Any]]]:
        """The runs of ``task`` a stop gave up on (memory store) whose code still runs, each as
        its asyncio task, its id and its params: their records say they ended, their code does not."""
        return [(t, run.id, run.params) for t, run in self._left_going_runs.items() if run.task == task and going_here(t)]


def _log_failed_outcome(write: asyncio.Future[Any]) -> None:
    if write.cancelled() or (exc := write.exception()) is None:
        return
    if isinstance(exc, StoreError):
        # the outage the store's own log reports, once: the run is not lost, its row goes back to
        # pending when a node recovers it (a traceback per run cut off said nothing more)
        log.info("a cut-off run's re-queue was not written (%s); a recovery re-queues it", exc)
        return
    log.warning("writing a run's outcome to the store failed", exc_info=exc)


def _last_progress(run: Run) -> Progress | None:
    """The attempt's last progress report, written with its outcome; None if it made none."""
    if not run.done and run.total is None and not run.message:
        return None
    return Progress(done=run.done, total=run.total, message=run.message)


def _log_retry(run: Run, tried: int, error: RunError, delay: float) -> None:
    if not runs_log.isEnabledFor(logging.INFO):
        return  # nothing formatted for a level nobody reads
    log_safely(
        runs_log, logging.INFO, "run %s of task %r failed on try %d of %d (%s: %s); trying again in %.3g s",
        run.id, run.task, tried, max(run.max_attempts, tried), log_text(error.type), log_text(error.message), delay,
    )  # fmt: skip


def _log_failed(run: Run, error: RunError, *, traceback: bool = True, streak: int = 0) -> None:
    if not runs_log.isEnabledFor(logging.WARNING):
        return
    if streak:
        tail = f" ({streak} runs of this periodic task failed in a row; the traceback was logged with the first of this kind)"
    else:
        tail = traceback_block(error) if traceback else ""
    log_safely(
        runs_log, logging.WARNING, "run %s of task %r failed on try %d of %d: %s: %s%s",
        # a run recovered from a lost node is on an attempt past max_attempts (the lost try counts,
        # bounded by max_lost instead): "try 2 of 2", as the dashboards show it, not "2 of 1"
        run.id, run.task, run.attempt, max(run.max_attempts, run.attempt), log_text(error.type),
        log_text(error.message), tail,
    )  # fmt: skip


def checked_timeout(where: str, timeout: float | None) -> float | None:
    """A wait's ``timeout`` checked before anything waits: infinity is no limit; NaN, negatives,
    bools and strings are refused with InvalidConfiguration (a NaN deadline in the loop's timer
    heap would stall every other timer of the process)."""
    if timeout is None or (type(timeout) in (int, float) and 0 <= timeout < math.inf):
        return timeout
    if isinstance(timeout, float) and timeout == math.inf:
        return None
    advice = "give the seconds to wait as a number >= 0, or None to wait without limit"
    return _checked_seconds(WaitOptions, where, "timeout", timeout, advice)


def checked_grace(where: str, grace: float | None) -> float | None:
    """A cancel's ``grace`` checked before anything is cancelled (None: the engine's ``cancel_grace``)."""
    if grace is None or (type(grace) in (int, float) and 0 <= grace < math.inf):
        return grace
    advice = "give the seconds to wait for the run to end as a finite number >= 0, or None for the engine's cancel_grace"
    return _checked_seconds(CancelOptions, where, "grace", grace, advice)


def _checked_seconds(model: type[WaitOptions | CancelOptions], where: str, name: str, value: object, advice: str) -> float | None:
    if isinstance(value, float) and math.isnan(value):
        # pydantic would say "should be greater than or equal to 0" of a NaN
        raise InvalidConfiguration(where, [f"{name}=nan: not a number of seconds; {advice}"])
    try:
        checked: float | None = getattr(check_options(model, where, **{name: value}), name)
    except InvalidConfiguration as exc:
        raise InvalidConfiguration(where, [f"{problem}; {advice}" for problem in exc.problems]) from None
    return checked


class _ResultNotJson(Exception):
    """The value an attempt returned cannot be sent as JSON (``detail`` says why)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


#: the shortest pause between two cancels of a task that ignores its timeout: cancel_grace=0 must not spin
_MIN_RECANCEL = 0.05


class _Overrun:
    """Cancels again, ``every`` seconds, the task of an attempt that ignored its timeout's cancel.

    asyncio's timeout cancels once; a task that swallows that cancel (a broad ``except``) would
    go on for good, holding its slot. As ``stop()`` does, it is cancelled again until it ends.
    The extra cancels are this object's own: :meth:`end` takes them back, so the timeout still
    reads as the run's timeout and not as a cancel from outside.
    """

    __slots__ = ("run", "token", "timeout", "task", "entered", "window", "every", "timer", "cancels")

    def __init__(self, run: Run, token: str, timeout: float, window: asyncio.Timeout, every: float) -> None:
        self.run = run
        self.token = token
        self.timeout = timeout
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self.entered = task.cancelling()
        self.window = window
        self.every = max(every, _MIN_RECANCEL)
        self.cancels = 0
        when = window.when()
        loop = asyncio.get_running_loop()
        self.timer: asyncio.TimerHandle | None = None if when is None else loop.call_at(when + self.every, self._check)

    def _check(self) -> None:
        self.timer = None
        if self.task.done() or self.run.token != self.token:
            return  # over, or no longer this node's to record
        if self.window.expired():
            if self.task.cancel():
                self.cancels += 1
            if self.cancels == 1:
                log.warning(
                    "run %s of task %r ignored the cancel of its %g s timeout; cancelling it again every %g s "
                    "until it ends (a task should let CancelledError propagate)",
                    self.run.id, self.run.task, self.timeout, self.every,
                )
        self.timer = asyncio.get_running_loop().call_later(self.every, self._check)

    def end(self) -> bool:
        """Stop cancelling; whether the task was cancelled again (and those cancels are taken back)."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        again = self.cancels > 0
        for _ in range(self.cancels):
            self.task.uncancel()
        self.cancels = 0
        return again

    def cancelled_elsewhere(self) -> bool:
        """Whether a cancel other than the timeout's and this object's is pending on the task."""
        return self.task.cancelling() > self.entered


def _raised_cancelled(task: str, exc: asyncio.CancelledError) -> RunError:
    """The failure of an attempt whose task raised CancelledError while nothing cancelled it."""
    error = RunError.from_exception(exc)
    detail = f" ({error.message})" if error.message else ""
    return error.model_copy(
        update={
            "message": f"task {task!r} raised CancelledError{detail} without being cancelled (it awaited a task "
            "or future that was cancelled, say): a failure of the run, not a cancel; catch it where it "
            "comes from, or let it fail the run"
        }
    )


def _params_no_longer_fit(task: str, exc: ValidationError) -> str:
    problems = "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'params'}: {problem['msg']}" for problem in exc.errors()[:5]
    )
    more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
    return (
        f"the params recorded for this run no longer fit the params model of task {task!r} ({problems}{more}): "
        "the model changed since the run was submitted, so retrying cannot help; submit it again with "
        "params that fit"
    )
