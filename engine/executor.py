"""The executor: claims due runs from the store for this node's free slots, and keeps its claims alive.

It owns three loops, each cancelled and awaited by :meth:`Executor.stop`:

- the claim loop: writes runs queued without waiting (``submit_nowait``) in
  one batch, then claims as many due runs as there are free slots (global
  and per task) and hands each claim to the engine to execute. It sleeps
  until woken (new work, a freed slot) or until the next delayed retry is
  due, and never longer than ``poll_interval``, which is how it notices work
  other processes put into a shared store. Cancelled from outside (the event
  loop's teardown with no stop), it hands the runs still queued to the store
  as they are, which a SQLite store writes before the process exits;
- the heartbeat loop: extends the lease of every claim this node holds,
  writes their progress, and learns which of them someone asked to cancel
  and which were taken away;
- the maintenance loop: recovers runs whose worker was lost (anywhere, not
  only here) and prunes finished runs beyond the retention limits;
- the watchdog (durable stores): when a claim's lease runs out without a
  renewal (the store cannot be reached), and one more quick heartbeat fails
  too, this node is cut off: it stops claiming, hands the runs whose claims
  ran out to the engine to stop (another node will recover them), tells the
  engine (which gives up leadership), and keeps looking for the store;
  the first heartbeat that goes through again ends it.

A node heartbeat may also tell that a later process started under this node's id
(a restart of a process that was only paused): the others recover this
incarnation's claims at once, so it stops claiming for good, gives up what it
holds and tells the engine (which gives up leadership and says so). While its
own registration has lapsed (a pause, say) a node claims nothing until a
heartbeat has gone through: the others may count it gone by then.

What a claim means for a run (events, the run index, waiters) is the
engine's: the executor calls back into it through the functions it was given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from .hop import spawn
from .jsonsafe import safe_str
from .logs import OutageLog
from .runs import CancelReason, Progress
from .errors import DuplicateRunId, StoreBusy, StoreGaveUp, StoreUnavailable
from .store import Claim, Inserted, MemoryStore, NewRun, Recovered, Store
from .store.base import on_its_way

log = logging.getLogger("taskwatch.executor")

#: store errors a write of submit_nowait's runs waits out (tried again next round), as opposed to
#: a refusal (QueueFull, a duplicate id) or a stop's give-up, which fail the runs
_PASSING = (StoreBusy, StoreUnavailable)

#: how long the claim loop waits before trying again for a run that is due but could not be
#: claimed while slots are free (its task at its cap, say)
_OVERDUE_PAUSE = 0.01

#: no task has room (shared, never changed)
_NONE: Mapping[str, int | None] = {}


class Executor:
    def __init__(
        self,
        store: Store,
        *,
        node: str,
        incarnation: str,
        max_concurrency: int,
        limits: Callable[[], Mapping[str, int | None]],
        launch: Callable[[list[Claim]], None],
        claims: Callable[[], Mapping[str, Progress]],
        cancel_requested: Callable[[str, CancelReason], None],
        claim_lost: Callable[[str], str | None],
        inserted: Callable[[list[NewRun], list[Inserted] | BaseException], None],
        recovered: Callable[[list[Recovered]], Awaitable[None]],
        next_due: Callable[[], float | None],
        clock: Callable[[], float],
        poll_interval: float,
        heartbeat_interval: float,
        maintenance_interval: float,
        prune: Callable[[], Awaitable[None]],
        node_load: Callable[[], tuple[float | None, int | None]] | None = None,
        max_pending: int | None = None,
        cut_off: Callable[[float, Sequence[str], bool], None] | None = None,
        reconnected: Callable[[float], None] | None = None,
    ) -> None:
        self.store = store
        #: a store other processes may share counts every node's runs against the limits
        self._shared = not isinstance(store, MemoryStore)
        #: the queue limit written batches are checked against in the store (None: not there)
        self.max_pending = max_pending
        self.node = node
        self.incarnation = incarnation
        self.max_concurrency = max_concurrency
        self._limits = limits
        self._launch = launch
        self._claims = claims
        self._cancel_requested = cancel_requested
        self._claim_lost = claim_lost
        self._inserted = inserted
        self._recovered = recovered
        self._next_due = next_due
        self._clock = clock
        self._prune = prune
        #: this process's CPU and RSS for the nodes table (the engine's last health sample)
        self._node_load = node_load
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self.maintenance_interval = maintenance_interval
        #: attempts executing here, in all and per task
        self.running = 0
        self._per_task: dict[str, int] = {}
        self._seen_limits: Mapping[str, int | None] | None = None
        self._unlimited = False
        #: the tasks with a concurrency limit, which a shared store holds across every node
        self._caps: dict[str, int] = {}
        self._cut_off = cut_off
        self._reconnected = reconnected
        #: called once when a later start of this node id replaced this incarnation, with the
        #: claim tokens this node still held (it gives them up right after)
        #: called with the claims given up and the ids of the runs stopped just before, as lost
        self.on_superseded: Callable[[Sequence[str], Sequence[str]], None] | None = None
        #: a later start of this node id replaced this incarnation: it claims nothing any more
        self._superseded = False
        self._ttl = store.lease_ttl
        #: claim token -> when (time.monotonic()) its lease, as last written, runs out
        self._until: dict[str, float] = {}
        #: when the last heartbeat that went through was sent: every claim it carried was
        #: renewed until then + ttl
        self._renewed_at = time.monotonic()
        #: since when this node counts as cut off from its store (None: it is not)
        self._cut_since: float | None = None
        #: runs queued without waiting, written by the claim loop in one batch
        self._unwritten: list[NewRun] = []
        #: runs whose insert (on a store writing on the loop) the loop's end cut short
        self._cut_write: list[NewRun] = []
        self._wake = asyncio.Event()
        self._claiming = True
        #: resolved once the claim now in flight has returned and its runs are launched
        self._in_flight: asyncio.Future[None] | None = None
        #: resolved when the batch of ``_unwritten`` runs being written has landed
        self._flushing: asyncio.Future[None] | None = None
        #: the ids of that batch: not in the store yet either
        self._writing: frozenset[str | None] = frozenset()
        self._loops: list[asyncio.Task[None]] = []
        self._heartbeat: asyncio.Task[None] | None = None
        # one line per outage for each loop, not a traceback per try
        self._claims_log = OutageLog(log, "claiming runs")
        self._queued_log = OutageLog(log, "writing runs queued with submit_nowait")
        self._heartbeat_log = OutageLog(log, "the heartbeat")
        self._maintenance_log = OutageLog(log, "recovery or pruning")

    # ------------------------------------------------------------------ lifecycle

    def start(self, registered_at: float | None = None) -> None:
        """Start the loops; ``registered_at`` is when (``time.monotonic()``) the engine's start
        sent this node's registration, which the store counts as its first heartbeat."""
        self._wake = asyncio.Event()
        self._claiming = True
        self._until.clear()
        # not now: recovery and loading the index ran since, and a node that counted its hold
        # from here would think it held its jobs for longer than the store does
        self._renewed_at = time.monotonic() if registered_at is None else registered_at
        self._cut_since = None
        self._superseded = False  # a start registers a new incarnation
        # the heartbeat loop is kept by name too: nothing of the engine's cancels it while the
        # engine runs, which makes it the first one torn_down looks at
        self._heartbeat = spawn(self._heartbeat_loop(), name="taskwatch-executor-heartbeat")
        claim = spawn(self._claim_rounds(), name="taskwatch-executor-claim")
        # at the loop's end, however it ends: a task cancelled before its first step (a
        # SystemExit out of the loop right after the start, the teardown then cancelling what
        # is left) runs no handler of its own, and the runs submit_nowait accepted were lost
        claim.add_done_callback(self.hand_over_unwritten)
        self._loops = [
            claim,
            self._heartbeat,
            spawn(self._maintenance_loop(), name="taskwatch-executor-maintenance"),
        ]
        if self._shared:
            self._loops.append(spawn(self._watch_loop(), name="taskwatch-executor-watchdog"))

    @property
    def renewed_at(self) -> float:
        """When (``time.monotonic()``) the last heartbeat of this node that reached the store was
        sent: the store counts the node alive, and its claims and queue jobs held, from then on."""
        return self._renewed_at

    @property
    def torn_down(self) -> bool:
        """True once this executor's own loops were cancelled from outside the engine: the event
        loop is being torn down (``asyncio.run`` ending with no ``engine.stop()``, or while one
        drains), which cancels every task at once; :meth:`stop` lets go of the loops before it
        cancels them, so its own cancel never counts. All of them, not any: the claim loop's
        own timeout cancels it for a moment too, and taken for a teardown that would stall the
        engine's starts.

        A loop that has ended counts as torn down too: none ends by itself while it runs, so it
        was ended by a ``KeyboardInterrupt`` (a second Ctrl-C raises it in whatever task runs
        then) or a ``SystemExit``, which leaves it done, never cancelled, and the teardown that
        follows cancels only the others."""
        heartbeat, loops = self._heartbeat, self._loops
        return (
            bool(loops)
            and heartbeat is not None
            and (heartbeat.cancelling() > 0 or heartbeat.done())
            and all(loop.cancelling() or loop.done() for loop in loops)
        )

    @property
    def cut_off(self) -> bool:
        """True while this node cannot renew its claims (see the watchdog)."""
        return self._cut_since is not None

    def cut_off_for(self) -> float | None:
        """Seconds since this node last renewed its claims, while it is cut off; None otherwise."""
        return None if self._cut_since is None else time.monotonic() - self._renewed_at

    @property
    def superseded(self) -> bool:
        """True once the store said a later start of this node id replaced this incarnation."""
        return self._superseded

    @property
    def claiming(self) -> bool:
        """False once the engine began to stop, or this incarnation was replaced: runs claimed
        after that are handed back."""
        return self._claiming and not self._superseded

    def stop_claiming(self) -> None:
        """Take no new runs from now on (runs already executing carry on)."""
        self._claiming = False

    async def settle(self) -> None:
        """Wait until no claim is in flight, so its runs reach the engine (which hands them
        back when it is stopping). Cancelling the claim loop mid-claim would drop them while
        the store still commits the claim: they would stay running under this node, unrun,
        and the next start would recover them as lost (attempt + 1, one loss counted)."""
        while self._in_flight is not None:
            await asyncio.shield(self._in_flight)

    async def stop(self) -> None:
        """Write what is still unwritten, let a claim in flight land, then cancel and await every loop."""
        self._claiming = False
        await self.flush()
        await self.settle()
        loops, self._loops = self._loops, []
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)

    # ------------------------------------------------------------------ called by the engine

    def wake(self) -> None:
        self._wake.set()

    def insert_later(self, run: NewRun) -> None:
        """Queue ``run`` for the next batch write (for callers that cannot wait)."""
        self._unwritten.append(run)
        self._wake.set()

    def unwritten(self, run_id: str) -> bool:
        """Whether the run is queued to be written, or being written: the store has no row yet."""
        return run_id in self._writing or any(r.id == run_id for r in self._unwritten)

    def drop_unwritten(self, run_id: str) -> bool:
        """Forget a queued run that was never written (cancelled before its batch)."""
        for i, run in enumerate(self._unwritten):
            if run.id == run_id:
                del self._unwritten[i]
                return True
        return False

    def started(self, task: str) -> None:
        self.running += 1
        if task in self._caps:  # only capped tasks need their own count (see room)
            self._per_task[task] = self._per_task.get(task, 0) + 1

    def released(self, task: str) -> None:
        """An attempt of ``task`` ended here: its slot is free (the engine then starts what is due)."""
        self.running -= 1
        if task in self._caps:
            left = self._per_task.get(task, 0) - 1
            if left > 0:
                self._per_task[task] = left
            else:
                self._per_task.pop(task, None)

    async def flush(self) -> None:
        """Write every run queued with :meth:`insert_later` in one batch.

        Returns once they are written, also those of a batch another caller
        (the claim loop) is writing: the stop relies on it, then cancels that loop.
        While the node claims, a batch the store is too busy (or too far) to take
        is put back for the next round instead.
        """
        while True:
            writing = self._flushing
            if writing is not None:
                await asyncio.shield(writing)
                continue
            if not self._unwritten:
                return
            batch, self._unwritten = self._unwritten, []
            done = self._flushing = asyncio.get_running_loop().create_future()
            self._writing = frozenset(r.id for r in batch)
            write: Awaitable[list[Inserted]] | None = None
            try:
                write = self.store.insert(batch, max_pending=self.max_pending)
                # shielded: these runs were accepted already (each submit_nowait gave a handle),
                # and a store skips an insert cancelled before it begins the write (a submit
                # given up on), so a cancel of this loop (a teardown) must leave it to land
                inserted: list[Inserted] | BaseException = await (
                    asyncio.shield(write) if isinstance(write, asyncio.Future) else write
                )
            except Exception as exc:  # noqa: BLE001 - the engine records each run's failure
                inserted = exc
            except asyncio.CancelledError:
                if not isinstance(write, asyncio.Future):
                    # a store that writes on the loop, cut short by its teardown: the insert may
                    # have been committed or not (said so at the hand-over)
                    self._cut_write.extend(batch)
                raise
            finally:
                self._flushing = None
                self._writing = frozenset()
                done.set_result(None)
            if self._claiming and isinstance(inserted, _PASSING) and not isinstance(inserted, StoreGaveUp):
                # busy (another process's lock) or away for now: the runs exist nowhere else,
                # so they wait here for the claim loop's next round rather than fail (a stop,
                # no longer claiming, tries once more and fails what is left)
                self._unwritten[:0] = batch
                self._queued_log.failed(inserted, "the runs stay queued here until it answers")
                return
            if isinstance(inserted, DuplicateRunId) and len(batch) > 1:
                # one run's id is a stored run's already (a run_id_factory's, used before): that run
                # is refused alone, and the rest of the batch, which the refusal left unwritten,
                # goes in the next one rather than failing with it
                refused = [r for r in batch if r.id == inserted.run_id]
                if refused:
                    self._unwritten[:0] = [r for r in batch if r.id != inserted.run_id]
                    self._inserted(refused, inserted)
                    continue
            if not isinstance(inserted, BaseException):
                self._queued_log.succeeded()
            self._inserted(batch, inserted)

    def room(self) -> tuple[int, Mapping[str, int | None]]:
        """Free slots in all, and per task this node can run (None: no limit of its own)."""
        free = self.max_concurrency - self.running
        if free <= 0 or not self._claiming or self._cut_since is not None or self._superseded:
            return 0, _NONE
        if self._shared and time.monotonic() >= self._renewed_at + self._ttl:
            # no heartbeat went through for a whole lease (this process was paused, say): the
            # others may count it gone, or a later start of its node id may have replaced it.
            # Claims wait for the heartbeat that tells (it wakes the claim loop)
            return 0, _NONE
        limits = self._limits()
        if limits is not self._seen_limits:
            # the engine hands out a new mapping whenever a task registers
            self._seen_limits = limits
            self._unlimited = all(limit is None for limit in limits.values())
            self._caps = {name: limit for name, limit in limits.items() if limit is not None}
        if self._unlimited:
            return free, limits
        per_task = self._per_task
        tasks: dict[str, int | None] = {}
        for name, limit in limits.items():
            if limit is None:
                tasks[name] = None
            elif (room := limit - per_task.get(name, 0)) > 0:
                tasks[name] = room
        return free, tasks

    def _start_all(self, claims: list[Claim]) -> int:
        if claims:
            self._launch(claims)
        return len(claims)

    async def claim_now(self) -> int:
        """Claim due runs for every free slot and launch them; returns how many."""
        free, tasks = self.room()
        if not tasks:
            return 0
        done = self._in_flight = asyncio.get_running_loop().create_future()
        try:
            caps = self._caps if self._shared and self._caps else None
            sent = time.monotonic()
            claims = await self.store.claim(self.node, self.incarnation, free, tasks, limits=caps)
            # said here, where the store answered: a round with no free slot (or one cut off
            # from the store) asks it nothing, which says nothing of an outage
            self._claims_log.succeeded()
            if self._shared:
                until = sent + self._ttl  # the store's lease counts from about when this was sent
                for claim in claims:
                    self._until[claim.token] = until
            return self._start_all(claims)
        finally:
            self._in_flight = None
            done.set_result(None)

    # ------------------------------------------------------------------ loops

    def hand_over_unwritten(self, _claim_loop: asyncio.Task[None] | None = None) -> None:
        """The claim loop ends, or a stop was cut short: give the store the runs still queued,
        without waiting for it. A stop wrote them already; the loop's teardown (``asyncio.run``
        ending with no ``engine.stop()``, or cutting a stop short) cancels this loop wherever it
        is, and the runs it accepted would be lost. A store whose insert is under way once
        called (SQLite's writer queue) writes them, also once the loop is gone; with any other,
        they stay unwritten."""
        cut, self._cut_write = self._cut_write, []
        if cut:
            log.error(
                "node %s: the insert of %d run(s) accepted as the program ended was cut short by the loop's "
                "end; they may or may not be in the store (look them up before submitting them again)",
                self.node, len(cut),
            )  # fmt: skip
        batch = self._unwritten
        if not batch:
            return
        why = "the store writes on the engine's loop, which is gone"
        try:
            write = on_its_way(self.store.insert(batch, max_pending=self.max_pending))
        except Exception as exc:  # noqa: BLE001 - a store closed or failing: said below
            write, why = None, safe_str(exc)
        self._unwritten = []
        if write is None:
            log.error(
                "node %s: %d run(s) accepted as the program ended could not be handed to the store (%s); "
                "they are lost", self.node, len(batch), why,
            )  # fmt: skip
            return

        def landed(done: asyncio.Future[list[Inserted]]) -> None:
            if not done.cancelled():
                exc = done.exception()
                self._inserted(batch, done.result() if exc is None else exc)

        write.add_done_callback(landed)

    async def _claim_rounds(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self.flush()
                claimed = await self.claim_now()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # a store that fails now (disk full, file locked too long) may work
                # on the next round; the error must not end the loop for good
                self._claims_log.failed(exc, f"trying again every {self.poll_interval:g} s")
                claimed = 0
            if claimed and self.max_concurrency - self.running > 0:
                continue  # more may be due: claim again before sleeping
            timeout = self.poll_interval
            due = self._next_due()
            if due is not None:
                wait = due - self._clock()
                if wait <= 0 and not claimed:
                    # due, yet not claimed. With no free slot at all, the slot that frees wakes
                    # this loop; else (its task at its cap, or the store's due time a moment
                    # later than this node's) a short pause, so other runs coming due are not
                    # held up, and no spinning
                    wait = self.poll_interval if self.max_concurrency - self.running <= 0 else _OVERDUE_PAUSE
                timeout = min(timeout, max(0.0, wait))
            if self._wake.is_set():
                continue
            try:
                async with asyncio.timeout(timeout):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _heartbeat_loop(self) -> None:
        # the first is due an interval after the registration, however long the start took since
        delay = self._renewed_at + self.heartbeat_interval - time.monotonic()
        while True:
            await asyncio.sleep(max(0.0, delay))
            delay = self.heartbeat_interval
            try:
                await self.heartbeat()
                self._heartbeat_log.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._heartbeat_log.failed(exc, "this node's claims expire unless a later one succeeds")

    async def heartbeat(self) -> None:
        """Extend every claim this node holds; act on cancels and lost claims."""
        sent = time.monotonic()
        claims = self._claims()
        lost: Sequence[str] = ()
        stopped: list[str] = []
        renewed: Mapping[str, object] = claims
        if claims:
            result = await self.store.heartbeat(self.incarnation, list(claims), dict(claims))
            for token, reason in result.cancel.items():
                self._cancel_requested(token, reason)
            lost = result.lost
            for token in lost:
                if (run_id := self._claim_lost(token)) is not None:
                    stopped.append(run_id)
            if result.busy:
                renewed = {t: p for t, p in claims.items() if t not in result.busy}
        cpu, rss = self._node_load() if self._node_load is not None else (None, None)
        replaced = await self.store.node_heartbeat(self.incarnation, self.running, cpu_percent=cpu, rss_bytes=rss)
        if replaced and not self._superseded:
            self._supersede(lost, stopped)
        if self._shared:
            self._renewed(sent, renewed, lost)

    def _supersede(self, lost: Sequence[str], stopped: Sequence[str]) -> None:
        """A later start of this node id registered: every node (this one too) counts this
        incarnation gone and recovers its claims at once, so taking more would only run them
        twice. Stop claiming for good and give up what it holds (their late finishes are
        refused by their claim tokens)."""
        self._superseded = True
        held = [token for token in self._claims() if token not in lost]  # those are being stopped already
        if self.on_superseded is not None:
            # the runs the same heartbeat found lost too: the newer process recovered them at
            # its start, so they are runs this one was executing
            self.on_superseded(held, stopped)
        for token in held:
            self._claim_lost(token)

    def _renewed(self, sent: float, renewed: Mapping[str, object], lost: Sequence[str]) -> None:
        """A heartbeat sent at ``sent`` went through: its claims hold until then + ttl."""
        until = sent + self._ttl
        until_of = self._until
        for token in renewed:
            if until_of.get(token, 0.0) < until:
                until_of[token] = until
        for token in lost:
            until_of.pop(token, None)
        held = self._claims()
        for token in [t for t in until_of if t not in held]:
            del until_of[token]  # finished or handed back since
        now = time.monotonic()
        lapsed = now >= self._renewed_at + self._ttl
        if lapsed:
            # a whole lease without a renewal, and no step-down yet (it takes a probe more): a
            # server gone silent raises nothing the store would count as an outage, and the
            # claims that ran out through it are those of live nodes (this one's among them)
            self.store.heard_nothing(self._renewed_at)
        if sent > self._renewed_at:
            self._renewed_at = sent
        if lapsed and now < self._renewed_at + self._ttl:
            self._wake.set()  # heard of again: room() lets the claim loop claim once more
        cut_since = self._cut_since
        if cut_since is not None and now < self._renewed_at + self._ttl:
            # a fresh heartbeat: the store answers again
            self._cut_since = None
            if self._superseded:
                # it claims and leads no more all the same: no "claiming again" to say
                log.warning("node %s reaches its store again; its incarnation was replaced, so it stays out", self.node)
                return
            log.warning("node %s reaches its store again after %.1f s; claiming again", self.node, now - cut_since)
            if self._reconnected is not None:
                self._reconnected(now - cut_since)
            self._wake.set()

    async def _watch_loop(self) -> None:
        """Stop what this node can no longer hold when the store stays out of reach."""
        probe = min(1.0, self._ttl / 3)
        while True:
            if self._cut_since is None:
                # the first lease to run out: the node's own (its last renewal) or a claim's
                due = min(self._renewed_at + self._ttl, *self._until.values()) if self._until else self._renewed_at + self._ttl
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                    continue
            # a lease ran out unrenewed, or this node is cut off: one more heartbeat decides. It
            # gets a moment when the store already says it cannot be reached; a store that is
            # merely slow gets a whole lease (its late renewal still holds if nobody took over)
            cut = self._cut_since is not None or self.store.unreachable_since is not None
            renewed_before = self._renewed_at
            went_through = await self._probe(probe if cut else self._ttl)
            # the heartbeat loop's own heartbeat may get through while this probe waits out a
            # reconnect backoff: the store answers, and that renewal counts as the probe's
            went_through = went_through or self._renewed_at > renewed_before
            if went_through and self._cut_since is None:
                if self._until and min(self._until.values()) <= time.monotonic():
                    # the store answered but could not renew a claim (its row held by another
                    # session): looked at again a beat later, not at once, round after round
                    await asyncio.sleep(probe)
                continue
            now = time.monotonic()
            first = self._cut_since is None
            if first:
                self._cut_since = self._renewed_at
                # a silent server raises nothing the store would count as an outage: this does
                self.store.heard_nothing(self._renewed_at)
                log.warning(
                    "node %s has not reached its store for %.1f s (the claim lease is %g s): it stops "
                    "claiming and stepping down until the store answers again",
                    self.node, now - self._renewed_at, self._ttl,
                )
            held = self._claims()
            expired = [t for t, until in self._until.items() if until <= now and t in held]
            for token in expired:
                del self._until[token]
            if (first or expired) and self._cut_off is not None:
                self._cut_off(now - self._renewed_at, expired, first)

    async def _probe(self, timeout: float) -> bool:
        """One heartbeat, given at most ``timeout`` seconds; whether it went through."""
        began = time.monotonic()
        try:
            async with asyncio.timeout(timeout):
                await self.heartbeat()
            return True
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            return False
        except Exception:  # noqa: BLE001 - unreachable, refused, timed out: all say the same here
            # a store that fails at once must not make this a busy loop
            await asyncio.sleep(max(0.0, timeout - (time.monotonic() - began)))
            return False

    async def _maintenance_loop(self) -> None:
        while True:
            await asyncio.sleep(self.maintenance_interval)
            try:
                # our own heartbeat first: a loop that stalled (or a clock that jumped)
                # must not make this node look dead to its own recovery
                await self.heartbeat()
                await self.recover()
                await self._prune()
                self._maintenance_log.succeeded()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._maintenance_log.failed(exc, f"trying again every {self.maintenance_interval:g} s")

    async def recover(self) -> list[Recovered]:
        recovered = await self.store.recover()
        if recovered:
            await self._recovered(recovered)
            self._wake.set()
        return recovered

    def __repr__(self) -> str:
        return f"<Executor {self.node} running={self.running} unwritten={len(self._unwritten)}>"
