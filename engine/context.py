"""The context object handed to every running task."""

from __future__ import annotations

import asyncio

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from .errors import InvalidProgress, NotLeader
from .events import RunProgressed
from .runs import detached

if TYPE_CHECKING:
    from .engine import Engine
    from .runs import Run


class TaskContext:
    """What a task may know and do about its own run.

    ``await ctx.progress(done, total, message)`` publishes progress;
    ``await ctx.ensure_leader()`` raises :class:`NotLeader` unless this node
    holds the leader lease at that moment; ``ctx.term`` is the fencing token to attach to
    destructive writes so a stale leader's writes can be refused.
    """

    __slots__ = ("_engine", "_run", "_report", "_attempt", "_token", "_params", "name")

    def __init__(
        self,
        engine: Engine,
        run: Run | None,
        name: str,
        report: Callable[[Run, str | None, float, float | None, str], None] | None = None,
        attempt: int = 1,
        token: str | None = None,
    ) -> None:
        self._engine = engine
        self._run = run
        #: how the engine that runs this task takes its progress reports
        self._report = report
        #: fixed when the attempt starts: an attempt that outlives its claim (recovered from
        #: under it) must not read the number of the attempt that replaced it
        self._attempt = attempt
        #: the claim this attempt runs under: its reports count while it is the run's current
        #: one (a thread an attempt left going must not overwrite the next attempt's progress)
        self._token = token
        #: this attempt's own copy of its run's params, made when first asked for
        self._params: dict[str, Any] | None = None
        self.name = name

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    @property
    def attempt(self) -> int:
        """Which execution this is, from 1: more than 1 when the work may have run before.

        For a run, its attempt (a retry, or a run recovered from a node that died). For a
        queue job, 1 plus the times it was handed out again: taken up after the process
        that held it ended or was cut off, or started again after its handler was cut
        short. Delivery is at least once, so an earlier delivery may have run the
        handler, wholly or in part (or not at all: it may have been waiting).
        """
        return self._attempt

    @property
    def params(self) -> dict[str, Any]:
        """The run's params as JSON data: this attempt's own copy, so what the task changes in
        it stays in the task (the run's recorded params, and a retry's, are as submitted)."""
        params = self._params
        if params is None:
            params = self._params = detached(self._run.params) if self._run is not None else {}
        return params

    @property
    def node_id(self) -> str:
        return self._engine.node_id

    @property
    def is_leader(self) -> bool:
        """Whether this node leads by its own view, now: False once its lease ran out unrenewed
        (its loop blocked, the process paused), even before the elector has stepped down.
        :meth:`ensure_leader` asks the lease itself."""
        return self._engine.elector.leads()

    @property
    def term(self) -> int:
        """The fencing token of this node's current leadership term (0 if not leader, as for
        :attr:`is_leader`)."""
        elector = self._engine.elector
        return elector.term if elector.leads() else 0

    async def progress(self, done: float, total: float | None = None, message: str = "") -> None:
        """Report progress; published as a ``run.progress`` event.

        ``done`` and ``total`` are finite numbers and ``message`` text (anything
        else raises :class:`InvalidProgress` here and changes nothing); a report made
        after the run has ended, or by an attempt that is no longer the run's current one
        (it timed out and left a thread reporting, its claim was lost), changes nothing
        either. A queue handler's context
        has no run: its reports are checked the same way, and publish nothing.
        """
        if self._run is not None and self._report is not None:
            self._report(self._run, self._token, done, total, message)
            return
        try:
            # the checks a run's report gets, so a handler's bad report fails wherever it runs
            RunProgressed(run_id=self.name, task=self.name, done=done, total=total, message=message)
        except ValidationError as exc:
            raise InvalidProgress.refused(self.name, exc) from None

    async def ensure_leader(self) -> int:
        """Return the current fencing token, or raise :class:`NotLeader` if leadership is lost.

        Asks the lease itself (for a Redis or PostgreSQL lease: the holder and
        term in the shared record at this moment), so call it right before work that must never run
        twice, and attach the returned term to that work.
        """
        leader = self._engine.elector
        led = leader.is_leader
        term = await leader.verify()
        if term is None:
            # a node whose own lease ran out steps down with no holder known: it is named
            # itself, which NotLeader reads as "lapsed before it was renewed"
            # this process's own term, whether its view just lapsed or a stop left it to lapse
            # (not an earlier process's under the same node id: see NotLeader)
            lapsed = (led and not leader.is_leader and not leader.lease_valid()) or (
                leader.holder == self._engine.node_id and leader.term == leader.own_term
            )
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                # this check found the loss, and stepping down cancelled this very task (a
                # leader-only worker): the cancel is taken here, at this await, as one from
                # elsewhere would be, not left to cut the worker's cleanup at its first await
                await asyncio.sleep(0)
            raise NotLeader(self._engine.node_id, None if lapsed else leader.holder, lapsed=lapsed)
        return term

    def __repr__(self) -> str:
        return f"<TaskContext {self.name} run={self.run_id} attempt={self.attempt}>"
