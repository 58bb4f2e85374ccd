"""The engine on its own event loop in a daemon thread, usable from any thread.

::

    bg = engine.start_background()          # returns once the engine has started
    handle = bg.submit("embed_batch", {"user_id": "u1"})
    run = handle.wait(timeout=10)           # blocking, from any thread
    run = await handle                      # or awaited, on any other event loop
    bg.stop()                               # also runs at interpreter exit

The engine is not thread-safe, so every call -- queries included -- is
shipped to the engine's loop with :meth:`~taskwatch.engine.hop.LoopCall.ship` and its
outcome (value or exception) shipped back. Blocking methods wait on that
future; ``a``-prefixed methods (``await bg.asubmit(...)``) await it via
:func:`asyncio.wrap_future` for code already inside an event loop (a notebook
cell, a web handler). Blocking on the engine's own loop thread would wait
forever, so it raises :class:`~taskwatch.engine.errors.LoopThreadError`.

A call the caller gives up (``call_timeout``, a cancelled ``await``, Ctrl-C)
before the engine's loop took it up never runs there, so a timed-out submit
queues nothing; one that had started may have done its work (its
``TimeoutError`` says so).
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import concurrent.futures.thread  # noqa: F401 - its exit hook registers first, so ours runs before it
import dataclasses
import errno
import functools
import inspect
import ipaddress
import logging
import math
import operator
import os
import re
import secrets
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import types
import urllib.parse
import warnings
import weakref
from collections.abc import Awaitable, Callable, Generator, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Concatenate, NamedTuple, ParamSpec, TypedDict, TypeVar, Unpack, overload

from pydantic import BaseModel

from .errors import (
    EngineAlreadyRunning,
    EngineLoopClosed,
    EngineCrashed,
    EngineInAnotherProcess,
    EngineNotRunning,
    InvalidConfiguration,
    LoopThreadError,
)
from .execution import checked_grace, checked_timeout
from .handle import caller_bound, no_answer_in_time
from .hop import Escaped, LoopCall, call_apart, fail_waiting, unheard
from .options import BackgroundOptions, WaitOptions, check_option_names, check_options
from .runs import RunRecord, RunStatus

if TYPE_CHECKING:
    from .display import AnyEngineView
    from .engine import Engine
    from .handle import RunHandle
    from .lease import Leadership
    from .queues import QueueInfo, QueuePurge
    from .runs import EngineStats
    from .scheduler import PeriodicInfo
    from .server import ServeKwargs, ServerInfo
    from .snapshot import Snapshot
    from .supervisor import WorkerInfo
    from .tasks import TaskInfo
    from .triggers import TriggerFire, TriggerState

log = logging.getLogger("taskwatch.background")

_P = ParamSpec("_P")
_R = TypeVar("_R")

_UNSET: Any = object()

#: extra seconds a blocking wait allows beyond the engine-side timeout it asked for
_SLACK = 5.0

#: rounds of ``cancel_grace`` a task left on the loop at its end gets, cancelled again each round
#: (as many as Engine.stop gives the runs it cuts), before it is abandoned
_END_ROUNDS = 3
#: the rounds of ``cancel_grace`` the engine's stop gives each kind of code it cuts
_STOP_ROUNDS = 3

#: the longest drain a stop at interpreter exit waits for, unless start_background() was given a
#: stop_timeout (in a Jupyter kernel, even then): a Jupyter kernel told to restart or shut down is
#: SIGTERMed by jupyter_client after shutdown_wait_time / 2 (2.5 s by default), and a stop cut
#: there runs no task's ``finally`` and hands back no run
EXIT_STOP_TIMEOUT = 1.0

#: what the interpreter's exit waits for an engine's stop beyond its drain and one ``cancel_grace``
#: (the time the runs it cuts have to end): the dashboards' end and the last writes. Not the rounds
#: a stop() waits through: past this, something blocks the loop (or a run ignores cancellation),
#: and the exit goes on without the engine rather than hang for a minute
EXIT_SLACK = 1.0

#: how long a wait on a stopped engine waits at a time before it looks again: the engine
#: may be started again meanwhile, and the wait must then go to the engine's new loop
_STOPPED_SLICE = 1.0

_STOP_ON_LOOP = (
    "BackgroundEngine.{method}() ends the engine's loop thread and waits for it to end, and this is "
    "that thread, so it would wait forever. Call bg.stop() from another thread, or `await bg.astop()` "
    "on another event loop"
)
_STOP_ON_EXECUTOR = (
    "BackgroundEngine.{method}() waits for the engine's loop to end, and the loop's end waits for "
    "the threads of its executor, this one (asyncio.to_thread from a run) among them. Return from "
    "this thread and stop the engine from another, or `await bg.astop()` on another event loop"
)
_DASHBOARD_ON_LOOP = (
    "BackgroundEngine.dashboard() waits for the engine's loop (it serves the engine there first), and "
    "this is that loop's own thread, so it would wait forever. Call it from another thread"
)

# run in a subprocess by dashboard(): textual-serve blocks its thread and owns
# its own aiohttp loop and signal handlers, so a process is the clean way to stop it.
# taskwatch.tui.web puts it behind a secret, which arrives in the environment
# (_WEB_SECRET_ENV), not argv: ps shows every process's argv to every local user.
# Its stdin is a pipe this process holds open and never writes to: when this process
# dies, however (SIGKILL, a kernel killed), the server reads EOF and exits
_WEB_SERVER_SCRIPT = """\
import sys
from taskwatch.tui.web import exit_when_stdin_closes, serve
exit_when_stdin_closes()
serve(sys.argv[1], host=sys.argv[2], port=int(sys.argv[3]))
"""
#: the same names as taskwatch.tui.web.SECRET_ENV and the attach CLI's token variable;
#: not imported, so the engine never loads textual or textual-serve
_WEB_SECRET_ENV = "TASKWATCH_WEB_SECRET"
_TOKEN_ENV = "TASKWATCH_TOKEN"


def attach_command(info: ServerInfo) -> tuple[list[str], dict[str, str]]:
    """The command a web dashboard runs to attach to ``info``'s endpoint, and the
    environment variables to add for it.

    The token goes in ``$TASKWATCH_TOKEN``, never in the argv, which ``ps``
    shows to every local user.
    """
    argv = [sys.executable, "-m", "taskwatch.tui", "attach", info.address]
    env = {_TOKEN_ENV: info.token} if info.token else {}
    return argv, env


class BackgroundRunHandle:
    """A run submitted through a :class:`BackgroundEngine`; wait for it from any thread or loop."""

    __slots__ = ("_bg", "_handle", "id")

    def __init__(self, bg: BackgroundEngine, handle: RunHandle) -> None:
        self._bg = bg
        self._handle = handle
        self.id = handle.id

    def wait(self, timeout: float | None = None) -> RunRecord:
        """Block until the run has finished; ``TimeoutError`` if still going after ``timeout`` s.

        ``timeout=math.inf`` is no timeout. After :meth:`BackgroundEngine.stop`
        it answers as a stopped engine's handle does: the finished record, or
        ``StoppedBeforeDone`` for a run the stop left undone. Once the engine
        runs again (a later ``start_background()``), it waits there.
        """
        self._refuse_on_loop("wait")
        return self._bg._wait_run(self._handle, checked_timeout("BackgroundRunHandle.wait()", timeout))

    async def finished(self, timeout: float | None = None) -> RunRecord:
        """Await the finished record, on any event loop."""
        return await self._bg._await_run(self._handle, checked_timeout("BackgroundRunHandle.finished()", timeout))

    def __await__(self) -> Generator[Any, None, RunRecord]:
        return self.finished().__await__()

    def record(self) -> RunRecord:
        """The run's current record (read on the engine's loop, or from its records once stopped)."""
        self._refuse_on_loop("record")
        return self._bg._read("record", self._handle.record)

    def _refuse_on_loop(self, method: str) -> None:
        # as the facade's own blocking calls refuse there, naming what a handle offers instead
        if self._bg._on_loop_thread():
            raise LoopThreadError(
                f"BackgroundRunHandle.{method}",
                f"BackgroundRunHandle.{method}() blocks until the engine's loop answers, and this is that loop's "
                "own thread, so it would wait forever. Code running on the engine's loop should `await "
                "handle.finished()` (or `await handle`), or use the Engine's own handle: `engine.handle(run_id)`",
            )

    @property
    def status(self) -> RunStatus:
        return self.record().status

    @property
    def done(self) -> bool:
        return self.record().status.finished

    def cancel(self, grace: float | None = None) -> RunRecord:
        return self._bg.cancel(self.id, grace)

    async def acancel(self, grace: float | None = None) -> RunRecord:
        return await self._bg.acancel(self.id, grace)

    def __repr__(self) -> str:
        return f"<BackgroundRunHandle {self.id}>"


class BackgroundKwargs(TypedDict, total=False):
    """The options of ``engine.start_background(**options)``: :class:`BackgroundEngine`'s
    keyword-only parameters, so a type checker catches a misspelt option or a wrong type where it
    is written.

    Values are still checked when the facade is made (a type does not say -1 is too small).
    """

    call_timeout: float | None
    stop_timeout: float
    start_timeout: float


class BackgroundEngine:
    """A thread-safe facade over an :class:`~taskwatch.engine.Engine` running on its own loop.

    Create it with ``engine.start_background(**options)``. Options:
    ``call_timeout`` (seconds a blocking call waits for the loop; default 60,
    None waits forever -- note the inline backend's ``submit`` waits for the
    run), ``stop_timeout`` (default drain time for :meth:`stop`, 10 s; the
    stop at interpreter exit drains at most :data:`EXIT_STOP_TIMEOUT` unless
    ``stop_timeout`` is given, and in a Jupyter kernel whatever is given) and
    ``start_timeout`` (30 s).
    """

    def __init__(
        self,
        engine: Engine,
        *,
        call_timeout: float | None = 60.0,
        stop_timeout: float = 10.0,
        start_timeout: float = 30.0,
    ) -> None:
        given = {"call_timeout": call_timeout, "stop_timeout": stop_timeout, "start_timeout": start_timeout}
        _refuse_nan("start_background()", **given)
        checked = check_options(BackgroundOptions, "start_background()", **given)
        self.engine = engine
        #: the process whose thread runs the loop: a fork of it has neither (see _schedule)
        self._pid = os.getpid()
        self.call_timeout = checked.call_timeout
        self.stop_timeout = checked.stop_timeout
        self.start_timeout = checked.start_timeout
        self._loop: asyncio.AbstractEventLoop | None = None
        self._main_task: asyncio.Task[None] | None = None
        self._stop_requested: asyncio.Event | None = None
        self._drain_timeout = self.stop_timeout
        #: why the drain asked for is shorter than stop_timeout, and how to make it longer, when the
        #: interpreter's exit shortened it: the engine's warning about runs it leaves undone says so
        self._drain_note: str | None = None
        #: stop_timeout was given to start_background(): the stop at interpreter exit drains as long
        #: (the caller chose it for that exit too; the default is cut to EXIT_STOP_TIMEOUT)
        self._stop_timeout_given = False
        #: the drain the engine's stop began with, once it began (None before): fixed from then on
        self._drain_begun: float | None = None
        self._ready = threading.Event()
        #: set as the loop thread's last step. Not ``thread.is_alive()``: on Python 3.11 a
        #: ``join()`` cut short by Ctrl-C marks the thread stopped while it still runs (bpo-45274)
        self._ended = threading.Event()
        #: the launch gave up waiting for the start: whatever got started is stopped
        self._aborted = False
        self._start_error: BaseException | None = None
        self._stop_error: BaseException | None = None
        #: what ended the loop while the engine ran (None unless it died)
        self._crash: BaseException | None = None
        # futures handed to callers; failed on thread exit so no caller waits forever
        self._lock = threading.RLock()
        self._outstanding: set[concurrent.futures.Future[Any]] = set()
        self._finished = False
        self._stopping = False
        #: the loop's end has begun (_end_loop): no call is shipped to it any more
        self._ending = False
        #: the interpreter's exit went on without the loop (blocked), failing the calls left
        self._left_at_exit = False
        #: the endpoint serve() made last
        self._server_info: ServerInfo | None = None
        #: the endpoint a dashboard() made for the dashboards' sessions when serve() had made none they
        #: can attach to, and the private directory its socket is in (removed once the engine has stopped)
        self._dashboard_endpoint: ServerInfo | None = None
        self._dashboard_dir: str | None = None
        self._dashboard_endpoint_lock = threading.Lock()
        self._dashboards: list[subprocess.Popen[bytes]] = []
        #: where each dashboard listens and what dashboard() returned for it, by its process id
        self._dashboard_shown: dict[int, _WebDashboard] = {}
        # the loop thread starts with a context of its own, not the launcher's: in a notebook the
        # kernel keeps the cell that ran in a context variable, and runs would print (and the
        # engine log) into the cell that started the engine, long finished, instead of the one running
        self._thread = threading.Thread(
            target=self._thread_main, name=f"taskwatch-{engine.node_id}", daemon=True
        )

    @classmethod
    def launch(cls, engine: Engine, **options: Unpack[BackgroundKwargs]) -> BackgroundEngine:
        """Start ``engine`` on a new loop thread; returns once ``engine.start()`` completed there.

        If ``engine.start()`` raises, the thread ends and the error is re-raised here.
        An engine started (or starting, or stopping) under another facade or on
        another event loop raises :class:`EngineAlreadyRunning`.
        """
        bg = cls(engine, **options)  # options checked first: a bad one starts nothing
        bg._stop_timeout_given = "stop_timeout" in options
        claimed = False
        try:
            with _launch_lock:
                # claimed under the lock, before the thread starts: of two launches at once, one starts it
                current = _facades.get(id(engine))
                if current is not None and current.engine is engine and not current._finished:
                    if current._forked():
                        raise EngineInAnotherProcess(current._pid)
                    raise EngineAlreadyRunning(current._phase(), repr(current))
                if engine.loop_lost:
                    raise EngineLoopClosed()
                if engine.state not in ("new", "stopped"):
                    raise EngineAlreadyRunning(engine.state)
                _facades[id(engine)] = bg
                claimed = True
                bg._thread.start()
            if not bg._ready.wait(_thread_timeout(bg.start_timeout)):
                store = f"its store ({engine.store.describe()}), " if engine.durable else ""
                raise TimeoutError(
                    f"the engine did not start within {bg.start_timeout:g} s; the start was given up "
                    f"and what it had started was stopped. A start waits for {store}its lease and its "
                    "event relay to answer: check that they are up and reachable from here, or give a "
                    "slower one more time with start_background(start_timeout=...)"
                )
            if bg._start_error is not None:
                bg._thread.join()
                raise bg._start_error
            _stop_at_interpreter_exit(bg)
            _warn_of_others(bg)
        except BaseException:
            # also when cut short (Ctrl-C, a notebook's Interrupt): the caller gets no `bg`, so the
            # engine must not go on running, taking runs and holding the claim a next start needs
            if claimed:
                _give_up_start(bg)
            raise
        return bg

    # ------------------------------------------------------------------ the loop thread

    def _thread_main(self) -> None:
        loop: asyncio.AbstractEventLoop | None = None
        try:
            # not asyncio.Runner: its close() waits without bound for every task left on the
            # loop, and for the default executor's threads, so one run that swallows every
            # cancel (or one blocking call in to_thread) would keep this thread, and the
            # engine's claim, alive for good. The end here is bounded (_end_loop).
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            # the executor asyncio.to_thread uses, ours so that its end can be bounded
            executor = concurrent.futures.ThreadPoolExecutor(
                thread_name_prefix="asyncio", initializer=_serving.__setattr__, initargs=("engine", self)
            )
            loop.set_default_executor(executor)
            try:
                loop.run_until_complete(self._main())
            except BaseException as exc:  # noqa: BLE001 - reported to the caller, not lost
                if not isinstance(exc, asyncio.CancelledError):
                    loop.set_exception_handler(functools.partial(_reported_once, exc))
                if self._start_error is None and not self._ready.is_set():
                    self._start_error = exc
                elif not isinstance(exc, asyncio.CancelledError):
                    self._crashed(loop, exc)
            finally:
                self._end_loop(loop, executor)
        except BaseException as exc:  # noqa: BLE001
            if self._crash is None and self._ready.is_set() and not isinstance(exc, asyncio.CancelledError):
                self._crash = exc
                log.error("the background engine's loop failed", exc_info=exc)
        finally:
            if loop is not None:
                asyncio.set_event_loop(None)
                loop.close()
            self._fail_outstanding()
            self._remove_dashboard_dir()
            self._ready.set()
            # last: whoever waits for the end (stop(), the state) learns of it only once all is done
            self._ended.set()

    def _end_loop(self, loop: asyncio.AbstractEventLoop, executor: concurrent.futures.ThreadPoolExecutor) -> None:
        """What ``asyncio.run`` does at its end, each step bounded: cancel and await what is
        left on the loop, close async generators, shut the loop's executor down.

        A task still going after :data:`_END_ROUNDS` rounds of ``cancel_grace`` (cancelled
        again each round) is logged and abandoned, as ``Engine.stop`` abandons such a run;
        those ``Engine.stop`` gave up on after as many rounds are not waited for again; so are executor threads still in
        blocking code after one ``cancel_grace``: the loop closes and the thread ends anyway.
        """
        grace = self.engine.cancel_grace
        # no call is shipped from here on (reads asked meanwhile are asked of the records once the
        # loop has ended), and those shipped before are taken up now: their tasks are among what
        # is ended below, not made as the async generators close, never to take a step
        with self._lock:
            self._ending = True
        loop.run_until_complete(asyncio.sleep(0))
        # the engine's stop cancelled these for as many rounds already, and said so: waiting
        # for them again would only double how long a stubborn run holds the exit
        given_up = set(self.engine.given_up_tasks())
        cancelled: set[asyncio.Task[Any]] = set()
        left = [task for task in _unfinished(loop) if task not in given_up]
        for _ in range(_END_ROUNDS):
            if not left:
                break
            for task in left:
                task.cancel()
            cancelled.update(left)
            loop.run_until_complete(asyncio.wait(left, timeout=grace))
            left = [task for task in _unfinished(loop) if task not in given_up]  # with any that those ending started
        for task in cancelled:
            if task.done() and not task.cancelled() and task.exception() is not None:
                loop.call_exception_handler(
                    {"message": "unhandled exception while the background engine's loop ended",
                     "exception": task.exception(), "task": task}
                )
        if left:
            log.warning(
                "%d task(s) on the background engine's loop ignored cancellation for %.3g s and were "
                "abandoned as the loop closed: %s",
                len(left), _END_ROUNDS * grace, ", ".join(sorted(task.get_name() for task in left)),
            )
            # held, so that they are not reported again as "destroyed but pending" when collected
            _abandoned.extend(left)
        _abandoned.extend(task for task in given_up if not task.done())
        closing = loop.create_task(loop.shutdown_asyncgens())
        loop.run_until_complete(asyncio.wait([closing], timeout=grace))
        if not closing.done():
            closing.cancel()
            _abandoned.append(closing)
            log.warning("async generators on the background engine's loop did not close within %.3g s", grace)
        elif not closing.cancelled() and (failed := closing.exception()) is not None:
            log.warning("closing the async generators on the background engine's loop failed", exc_info=failed)
        # a thread still in a blocking call cannot be cancelled, and loop.shutdown_default_executor()
        # would wait for it without bound: waited for here up to cancel_grace, on a thread of its own
        shutting = threading.Thread(
            target=executor.shutdown, kwargs={"cancel_futures": True}, name=f"{self._thread.name}-executor", daemon=True
        )
        try:
            shutting.start()
        except RuntimeError:
            # no new thread while the interpreter exits (Python 3.12.0 to 3.12.2, gh-113964):
            # the executor's queued calls are dropped and its threads told to end, unwaited
            executor.shutdown(wait=False, cancel_futures=True)
            return
        shutting.join(grace)
        if shutting.is_alive():
            log.warning(
                "a thread of the background engine's executor (asyncio.to_thread) was still in a blocking "
                "call %.3g s after the loop ended; it was left running", grace
            )

    def _remove_dashboard_dir(self) -> None:
        # the engine's stop has closed the dashboards' endpoint (and removed its socket)
        with self._lock:
            private, self._dashboard_dir = self._dashboard_dir, None
        if private is not None:
            shutil.rmtree(private, ignore_errors=True)

    def _crashed(self, loop: asyncio.AbstractEventLoop, exc: BaseException) -> None:
        """The loop died under a running engine: say so, then stop the engine on that loop.

        The stop still drains nothing (timeout 0) but cancels and awaits every
        run and loop, publishes the stop events and closes the control servers,
        so clients see the end instead of a silent hang.
        """
        self._crash = exc
        log.error("the background engine's event loop died: %s: %s", type(exc).__qualname__, exc, exc_info=exc)
        with self._lock:
            self._finished = True  # refuse new calls with EngineCrashed from here on
        try:
            loop.run_until_complete(self.engine.stop(0))
        except BaseException:  # noqa: BLE001
            log.exception("stopping the engine after its loop died failed")

    async def _main(self) -> None:
        loop = asyncio.get_running_loop()
        with self._lock:
            # under the lock that _abort_start takes: it either sees this task to cancel,
            # or this sees that the launch gave up
            self._loop = loop
            self._main_task = asyncio.current_task()
            self._stop_requested = asyncio.Event()
            if self._aborted:
                return
            if self._stopping:
                self._stop_requested.set()  # asked before there was a loop to tell
        try:
            await self.engine.start()
            if self.engine.loop is not loop:
                # an `await engine.start()` on another loop got there first: not ours to run or stop
                raise EngineAlreadyRunning(self.engine.state)
        except BaseException as exc:
            self._start_error = exc
            if isinstance(exc, asyncio.CancelledError) and (task := asyncio.current_task()) is not None:
                task.uncancel()  # the launch's own cancel, taken: the stop below must not see it
            # a start cut short by an aborted launch may have got as far as running
            await self._stop_engine(0.0)
            return
        finally:
            self._ready.set()
        try:
            await self._stop_requested.wait()
        finally:
            # a cancel from a launch that gave up just as the start completed lands here too:
            # the engine never outlives its loop
            with self._lock:
                # from here the engine's own deadline holds: a later, shorter stop() hurries it
                # (engine.hurry_stop), as _request_stop does
                drain = self._drain_begun = self._drain_timeout
                note = self._drain_note
            await self._stop_engine(drain, note)

    async def _stop_engine(self, timeout: float, note: str | None = None) -> None:
        if self.engine.loop is not asyncio.get_running_loop():
            return  # started (or being started) on another loop: that one stops it
        try:
            await self.engine.stop(timeout, drain_advice=note)
        except BaseException as exc:
            self._stop_error = exc

    def _abort_start(self) -> None:
        with self._lock:
            self._aborted = True
            self._stopping = True  # the launch's engine, given up: it takes no work
            if self._drain_begun is None:
                # a start given up drains nothing: runs it took up (recovered from the store, say)
                # go back to the store now, not after a stop_timeout nobody waits for
                self._drain_timeout = 0.0
                self._drain_note = None
            loop, task = self._loop, self._main_task
        if loop is not None and task is not None:
            try:
                loop.call_soon_threadsafe(task.cancel)
            except RuntimeError:
                pass  # the loop already closed
        if self._thread.ident is None:
            # its start failed (or was cut short): it never ran, or sees _aborted and does nothing
            with self._lock:
                self._finished = True  # the claim is released
            return
        self._ended.wait(_SLACK)

    def _phase(self) -> str:
        if self._stopping:
            return "stopping"
        return "running" if self._ready.is_set() else "starting"

    def _loop_thread_ended(self) -> bool:
        return self._ended.is_set() or self._thread.ident is None  # (None: never started)

    def _fail_outstanding(self, error: EngineNotRunning | None = None) -> None:
        with self._lock:
            self._finished = True
            if error is not None:
                # the interpreter's exit gave up on a loop still blocked: no read waits for its end
                self._left_at_exit = True
            pending, self._outstanding = self._outstanding, set()
        for fut in pending:
            try:
                fut.set_exception(error or self._not_running())
            except concurrent.futures.InvalidStateError:
                # answered meanwhile: at an exit the loop may still be alive, blocked, and answer
                # a call between a look and the set; the rest must still be failed
                pass

    def _not_running(self) -> EngineNotRunning:
        if self._crash is not None:
            return EngineCrashed(self._crash)
        current = _facades.get(id(self.engine))
        if current is not None and current is not self and current.engine is self.engine and current.running:
            return EngineNotRunning(
                "stopped",
                f"this BackgroundEngine was stopped, and the engine runs again under another BackgroundEngine "
                f"({current!r}, from a later start_background()): use that one",
            )
        if not self._finished:
            return EngineNotRunning(
                "stopping",
                "this BackgroundEngine is stopping and accepts no work; once bg.stop() has returned, "
                "engine.start_background() starts the engine again",
            )
        return EngineNotRunning(
            "stopped",
            "this BackgroundEngine was stopped and accepts no work; engine.start_background() starts the engine again",
        )

    def _untrack(self, fut: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._outstanding.discard(fut)

    # ------------------------------------------------------------------ calling into the loop

    @property
    def running(self) -> bool:
        """True until :meth:`stop` (or a failure) ended the loop thread (so also while it stops);
        False in a fork of the process it runs in."""
        return not self._finished and not self._loop_thread_ended() and not self._forked()

    @property
    def state(self) -> str:
        """``running``; ``stopping`` from :meth:`stop` until the loop thread has ended (also
        after a stop cut short by Ctrl-C: the engine goes on stopping); ``stopped``; or
        ``failed`` when the loop died (see :attr:`error`)."""
        if self._crash is not None:
            return "failed"
        if not self.running:
            return "stopped"
        return "stopping" if self._stopping else "running"

    @property
    def error(self) -> BaseException | None:
        """What ended the engine's loop, if it died rather than being stopped."""
        return self._crash

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        return self._loop

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def _on_loop_thread(self) -> bool:
        # the thread itself, not its ident: once the loop's thread has ended, a new thread (a
        # waiter on a handle of this facade, say) may be given the same ident
        return threading.current_thread() is self._thread

    def _forked(self) -> bool:
        """Whether this process is a fork of the one the engine runs in: the loop and its thread
        stayed there, and a call shipped to the loop object copied here would wait forever."""
        return self._pid != os.getpid()

    def _schedule(self, call: LoopCall, *, read_: bool = False) -> None:
        """Ship ``call`` to the engine's loop. Its caller made it first and calls this inside
        the ``try`` that gives it up, so that an interrupt landing anywhere in here leaves
        nothing on the loop that nobody waits for."""
        if self._forked():
            raise EngineInAnotherProcess(self._pid)
        # before the lock: on a future already given up it runs at once, and takes the lock
        call.future.add_done_callback(self._untrack)
        with self._lock:
            loop = self._loop
            # a stop under way takes no more work, but its engine still answers reads (as an
            # Engine does while it stops) until its loop ends
            if self._finished or self._ending or (self._stopping and not read_) or loop is None:
                raise self._not_running()
            self._outstanding.add(call.future)
            try:
                call.ship(loop)
            except RuntimeError:
                raise self._not_running() from None

    def _call(
        self,
        method: str,
        fn: Callable[..., Any],
        *args: Any,
        timeout_: Any = _UNSET,
        changes_: bool = True,
        **kwargs: Any,
    ) -> Any:
        if self._on_loop_thread():
            raise LoopThreadError(method)
        call = LoopCall(fn, args, kwargs)
        fut = call.future
        timeout = _thread_timeout(self.call_timeout if timeout_ is _UNSET else timeout_)
        try:
            self._schedule(call, read_=not changes_)
            concurrent.futures.wait((fut,), timeout)
        except BaseException as exc:
            # interrupted (Ctrl-C, a notebook's interrupt): the call is given up, so is its
            # coroutine on the engine's loop, which would otherwise go on as long as its run
            if not call.give_up() and changes_:
                # it had started: what it did stands, which the bare interrupt would not say
                exc.add_note(f"{method}() had started on the engine when interrupted, {self._may_stand(method)}")
            raise
        if timeout is not None and not fut.done():  # (without a timeout the wait ended with the call)
            if call.give_up():
                raise TimeoutError(
                    f"the engine did not take up {method}() within {timeout:g} s (its loop is busy or blocked); "
                    "the call was withdrawn before it started and did nothing, so it can be made again"
                )
            # it had started: still going, or ended by that give-up's own cancel, unless it answered meanwhile
            if not fut.done() or isinstance(fut.exception(), concurrent.futures.CancelledError):
                raise TimeoutError(self._started_too_long(method, timeout, changes_))
        try:
            return fut.result()  # a TimeoutError here is the call's own (a run's wait)
        except concurrent.futures.CancelledError:
            raise self._not_running() from None
        except Escaped as escaped:
            raise escaped.exc from None

    @classmethod
    def _started_too_long(cls, method: str, timeout: float, changes: bool) -> str:
        said = f"{method}() started on the engine but did not answer within {timeout:g} s"
        if not changes:
            return said + " (its loop is busy or blocked)"
        return f"{said}, {cls._may_stand(method)}"

    @staticmethod
    def _may_stand(method: str) -> str:
        """What a call given up after it started leaves: a store write under way when the cancel
        comes still lands (see Engine._insert)."""
        said = "so it may have been applied (if still under way it is cancelled, but what it did stands)"
        if method == "submit":
            said += "; pass key= to submit() so that a retry returns the run it may have queued, not another"
        return said

    def _read(self, method: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A read (``get``, ``runs``, ``stats``...): on the engine's loop while it runs, directly once stopped.

        After a clean :meth:`stop` the loop thread is gone and the engine keeps
        its records, so what ran can still be looked at; once the engine was
        started again under another facade, the read goes to that one's loop.
        After a crash every call raises :class:`EngineCrashed`.
        """
        while True:
            with _launch_lock:
                target = self._target()
                if target is None:
                    # the engine is stopped, and no start_background() can begin while the lock is held
                    return fn(*args, **kwargs)
            try:
                return _ready(target)._call(method, fn, *args, changes_=False, **kwargs)
            except EngineNotRunning:
                if not target._ended_under_read():
                    raise
                # the loop ended under the read (a stop): asked again, of the records now

    async def _aread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        while True:
            with _launch_lock:
                target = self._target()
                if target is None:
                    result = fn(*args, **kwargs)  # here, on the caller's loop: the engine's is gone
            if target is None:
                return await result if inspect.isawaitable(result) else result
            try:
                return await (await _aready(target))._acall(fn, *args, read_=True, **kwargs)
            except EngineNotRunning:
                if not await asyncio.to_thread(target._ended_under_read):
                    raise

    def _ended_under_read(self) -> bool:
        """After a read was refused as not running: whether this facade's loop has ended (or is
        ending) cleanly, so the read is to be asked again, of the records a stopped engine keeps.
        A stop's reads race its end: the documented promise is that they are answered."""
        if self._forked():
            return False  # (EngineInAnotherProcess: its loop ends in the other process, if ever)
        with self._lock:
            if self._crash is not None or self._left_at_exit or not (self._finished or self._stopping or self._ending):
                return False
        # its end comes right after (the loop's last steps); bounded: a blocked loop never ends
        return self._ended.wait(_SLACK)

    def _target(self) -> BackgroundEngine | None:
        """The facade whose loop a read or a wait goes to, or None while the engine is stopped.

        This one until its loop has ended (a crashed one then refuses with
        EngineCrashed); after, the one the engine was started under since.
        Called with ``_launch_lock`` held, so that no launch begins meanwhile.
        """
        with self._lock:
            if not self._finished or self._crash is not None or not self._loop_thread_ended():
                return self
        current = _facades.get(id(self.engine))
        if current is not None and current is not self and current.engine is self.engine:
            with current._lock:
                if not current._finished or current._crash is not None:
                    return current
        if self.engine.state not in ("new", "stopped"):
            raise EngineNotRunning(
                self.engine.state,
                "this BackgroundEngine was stopped, and the engine was started again on another event loop, "
                "outside any BackgroundEngine: ask the Engine on that loop (engine.get(run_id), "
                "await engine.handle(run_id))",
            )
        return None

    def _wait_run(self, handle: RunHandle, timeout: float | None) -> RunRecord:
        left = timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with _launch_lock:
                target = self._target()
            if target is not None:
                # a little past the wait's own timeout, for the engine's answer to come back (and
                # never more than call_timeout past it: a loop a task blocks answers nothing)
                slack = _SLACK if self.call_timeout is None else min(_SLACK, self.call_timeout)
                budget = None if left is None else left + slack
                try:
                    record: RunRecord = _ready(target)._call("wait", handle.wait, left, timeout_=budget, changes_=False)
                except EngineNotRunning:
                    if not target._ended_under_read():
                        raise
                    # the loop ended under the wait (a stop): the rest of it is asked of the records
                    if deadline is not None:
                        left = max(0.0, deadline - time.monotonic())
                    continue
                return record
            # a stopped engine answers at once (the record, or StoppedBeforeDone); waited on a piece at
            # a time all the same, so that a start meanwhile sends the rest of the wait to its loop
            piece = _STOPPED_SLICE if left is None else min(left, _STOPPED_SLICE)
            try:
                return call_apart(handle.wait, piece)  # type: ignore[no-any-return]
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())

    async def _await_run(self, handle: RunHandle, timeout: float | None) -> RunRecord:
        left = timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with _launch_lock:
                target = self._target()
            if target is not None:
                engine = await _aready(target)
                # the timeout kept on this loop too: one blocked by a task would not end a wait timed there
                bound = caller_bound(left)
                try:
                    async with bound:
                        awaited: RunRecord = await engine._acall(handle.wait, left, read_=True, timeout_=None)
                except TimeoutError:
                    if not bound.expired():
                        raise
                    raise no_answer_in_time(handle.id, timeout) from None
                except EngineNotRunning:
                    if not await asyncio.to_thread(target._ended_under_read):
                        raise
                    if deadline is not None:
                        left = max(0.0, deadline - time.monotonic())
                    continue
                return awaited
            piece = _STOPPED_SLICE if left is None else min(left, _STOPPED_SLICE)
            try:
                return await handle.wait(piece)  # here, on the caller's loop: the engine's is gone
            except TimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            if deadline is not None:
                left = max(0.0, deadline - time.monotonic())

    async def _acall(
        self, fn: Callable[..., Any], *args: Any, read_: bool = False, timeout_: Any = _UNSET, **kwargs: Any
    ) -> Any:
        """:meth:`_call` for a caller on another event loop, bounded alike (``call_timeout``, or ``timeout_``)."""
        call = LoopCall(fn, args, kwargs)
        timeout = self.call_timeout if timeout_ is _UNSET else timeout_
        answer = asyncio.wrap_future(call.future)
        try:
            self._schedule(call, read_=read_)
            if timeout is not None and not (await asyncio.wait([answer], timeout=timeout))[0]:
                # kept on this loop: the engine's, blocked by a task, would not end the call
                method = getattr(fn, "__name__", "call")
                answer.add_done_callback(unheard)
                if call.give_up():
                    raise TimeoutError(
                        f"the engine did not take up {method}() within {timeout:g} s (its loop is busy or blocked); "
                        "the call was withdrawn before it started and did nothing, so it can be made again"
                    )
                raise TimeoutError(self._started_too_long(method, timeout, not read_))
            return await answer
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if call.cut and (me is None or not me.cancelling()):
                raise self._not_running() from None  # the engine's loop ended under the call
            # this caller was cancelled (asyncio.wait_for, say): a call not started yet never
            # starts (wrap_future cancelled its future); one under way ends at its next await
            call.give_up()
            # what the given-up call still ends with is nobody's to hear now (as call_on says)
            answer.add_done_callback(unheard)
            raise
        except Escaped as escaped:
            raise escaped.exc from None
        except BaseException:
            if not call.future.done():
                call.give_up()  # never shipped (the engine takes no more work), or interrupted
            raise

    # the awaitable form first: a coroutine function's result is what it returns once awaited
    @overload
    def call(
        self, fn: Callable[Concatenate[Engine, _P], Awaitable[_R]], *args: _P.args, **kwargs: _P.kwargs
    ) -> _R: ...
    @overload
    def call(self, fn: Callable[Concatenate[Engine, _P], _R], *args: _P.args, **kwargs: _P.kwargs) -> _R: ...
    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``fn(engine, *args, **kwargs)`` on the engine's loop and return its result.

        An awaitable result is awaited there first. The way to do anything the
        facade has no method for, e.g. ``bg.call(lambda e: e.queue("q", handler))``.
        """
        return self._call("call", fn, self.engine, *args, **kwargs)

    @overload
    async def acall(
        self, fn: Callable[Concatenate[Engine, _P], Awaitable[_R]], *args: _P.args, **kwargs: _P.kwargs
    ) -> _R: ...
    @overload
    async def acall(self, fn: Callable[Concatenate[Engine, _P], _R], *args: _P.args, **kwargs: _P.kwargs) -> _R: ...
    async def acall(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Awaitable :meth:`call`, for code inside an event loop."""
        return await self._acall(fn, self.engine, *args, **kwargs)

    # ------------------------------------------------------------------ commands

    def submit(
        self, task: str, params: BaseModel | dict[str, Any] | None = None, *, key: str | None = None
    ) -> BackgroundRunHandle:
        """Validate and queue a run; raises ``InvalidParams``/``UnknownTask``/... here."""
        handle = self._call("submit", self.engine.submit, task, params, key=key)
        return BackgroundRunHandle(self, handle)

    async def asubmit(
        self, task: str, params: BaseModel | dict[str, Any] | None = None, *, key: str | None = None
    ) -> BackgroundRunHandle:
        handle = await self._acall(self.engine.submit, task, params, key=key)
        return BackgroundRunHandle(self, handle)

    def submit_many(
        self, submissions: Iterable[tuple[str, BaseModel | dict[str, Any] | None] | Mapping[str, Any]]
    ) -> list[BackgroundRunHandle]:
        """Validate and queue many runs in one store write (see :meth:`Engine.submit_many`)."""
        # a list here: a generator would otherwise be read on the engine's thread
        handles = self._call("submit_many", self.engine.submit_many, list(submissions))
        return [BackgroundRunHandle(self, handle) for handle in handles]

    async def asubmit_many(
        self, submissions: Iterable[tuple[str, BaseModel | dict[str, Any] | None] | Mapping[str, Any]]
    ) -> list[BackgroundRunHandle]:
        handles = await self._acall(self.engine.submit_many, list(submissions))
        return [BackgroundRunHandle(self, handle) for handle in handles]

    def cancel(self, run_id: str, grace: float | None = None) -> RunRecord:
        # checked here first: the budget is reckoned from it (a str would fail that with a TypeError)
        grace = checked_grace("BackgroundEngine.cancel()", grace)
        budget = self._budget(self.engine.cancel_grace if grace is None else grace)
        return self._call("cancel", self.engine.cancel, run_id, grace, timeout_=budget)

    async def acancel(self, run_id: str, grace: float | None = None) -> RunRecord:
        grace = checked_grace("BackgroundEngine.acancel()", grace)
        budget = self._budget(self.engine.cancel_grace if grace is None else grace)
        return await self._acall(self.engine.cancel, run_id, grace, timeout_=budget)

    def retry(self, run_id: str) -> BackgroundRunHandle:
        return BackgroundRunHandle(self, self._call("retry", self.engine.retry, run_id))

    async def aretry(self, run_id: str) -> BackgroundRunHandle:
        return BackgroundRunHandle(self, await self._acall(self.engine.retry, run_id))

    def pause_periodic(self, name: str) -> PeriodicInfo:
        return self._call("pause_periodic", self.engine.pause_periodic, name)

    async def apause_periodic(self, name: str) -> PeriodicInfo:
        return await self._acall(self.engine.pause_periodic, name)

    def resume_periodic(self, name: str) -> PeriodicInfo:
        return self._call("resume_periodic", self.engine.resume_periodic, name)

    async def aresume_periodic(self, name: str) -> PeriodicInfo:
        return await self._acall(self.engine.resume_periodic, name)

    def run_periodic(self, name: str) -> BackgroundRunHandle:
        """Queue one run of a periodic task now (see :meth:`Engine.run_periodic`)."""
        return BackgroundRunHandle(self, self._call("run_periodic", self.engine.run_periodic, name))

    async def arun_periodic(self, name: str) -> BackgroundRunHandle:
        return BackgroundRunHandle(self, await self._acall(self.engine.run_periodic, name))

    def restart_worker(self, name: str) -> WorkerInfo:
        budget = self._budget(self.engine.cancel_grace * 3)
        return self._call("restart_worker", self.engine.restart_worker, name, timeout_=budget)

    async def arestart_worker(self, name: str) -> WorkerInfo:
        budget = self._budget(self.engine.cancel_grace * 3)
        return await self._acall(self.engine.restart_worker, name, timeout_=budget)

    def stop_worker(self, name: str) -> WorkerInfo:
        budget = self._budget(self.engine.cancel_grace * 3)
        return self._call("stop_worker", self.engine.stop_worker, name, timeout_=budget)

    async def astop_worker(self, name: str) -> WorkerInfo:
        budget = self._budget(self.engine.cancel_grace * 3)
        return await self._acall(self.engine.stop_worker, name, timeout_=budget)

    def start_worker(self, name: str) -> WorkerInfo:
        return self._call("start_worker", self.engine.start_worker, name)

    async def astart_worker(self, name: str) -> WorkerInfo:
        return await self._acall(self.engine.start_worker, name)

    def pause_queue(self, name: str) -> QueueInfo:
        return self._call("pause_queue", self.engine.pause_queue, name)

    async def apause_queue(self, name: str) -> QueueInfo:
        return await self._acall(self.engine.pause_queue, name)

    def resume_queue(self, name: str) -> QueueInfo:
        return self._call("resume_queue", self.engine.resume_queue, name)

    async def aresume_queue(self, name: str) -> QueueInfo:
        return await self._acall(self.engine.resume_queue, name)

    def purge_queue(self, name: str) -> QueuePurge:
        return self._call("purge_queue", self.engine.purge_queue, name)

    async def apurge_queue(self, name: str) -> QueuePurge:
        return await self._acall(self.engine.purge_queue, name)

    def fire_trigger(self, name: str, key: str) -> TriggerFire:
        return self._call("fire_trigger", self.engine.fire_trigger, name, key)

    async def afire_trigger(self, name: str, key: str) -> TriggerFire:
        return await self._acall(self.engine.fire_trigger, name, key)

    def _budget(self, seconds: float) -> float | None:
        if self.call_timeout is None:
            return None
        return max(self.call_timeout, seconds + _SLACK)

    # ------------------------------------------------------------------ queries (on the loop too)

    def get(self, run_id: str) -> RunRecord:
        return self._read("get", self.engine.get, run_id)

    async def aget(self, run_id: str) -> RunRecord:
        return await self._aread(self.engine.get, run_id)

    def runs(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        *,
        task: str | None = None,
        limit: int | None = 50,
    ) -> list[RunRecord]:
        return self._read("runs", self.engine.runs, status, task=task, limit=limit)

    async def aruns(
        self,
        status: RunStatus | str | Iterable[RunStatus | str] | None = None,
        *,
        task: str | None = None,
        limit: int | None = 50,
    ) -> list[RunRecord]:
        return await self._aread(self.engine.runs, status, task=task, limit=limit)

    def stats(self) -> EngineStats:
        return self._read("stats", self.engine.stats)

    async def astats(self) -> EngineStats:
        return await self._aread(self.engine.stats)

    def schedule(self) -> list[PeriodicInfo]:
        return self._read("schedule", self.engine.schedule)

    async def aschedule(self) -> list[PeriodicInfo]:
        return await self._aread(self.engine.schedule)

    def leadership(self) -> Leadership:
        return self._read("leadership", self.engine.leadership)

    async def aleadership(self) -> Leadership:
        return await self._aread(self.engine.leadership)

    def snapshot(self, runs_limit: int = 500) -> Snapshot:
        return self._read("snapshot", self.engine.snapshot, runs_limit)

    async def asnapshot(self, runs_limit: int = 500) -> Snapshot:
        return await self._aread(self.engine.snapshot, runs_limit)

    def rates(self, seconds: float = 1.0) -> tuple[float, float]:
        return self._read("rates", self.engine.rates, seconds)

    async def arates(self, seconds: float = 1.0) -> tuple[float, float]:
        return await self._aread(self.engine.rates, seconds)

    def catalog(self) -> list[TaskInfo]:
        return self._read("catalog", self.engine.catalog)

    async def acatalog(self) -> list[TaskInfo]:
        return await self._aread(self.engine.catalog)

    def queues(self) -> list[QueueInfo]:
        return self._read("queues", self.engine.queues)

    async def aqueues(self) -> list[QueueInfo]:
        return await self._aread(self.engine.queues)

    def triggers(self, keys_limit: int | None = None) -> list[TriggerState]:
        # asked of the loop only to hear that the engine answers (not crashed, not its own
        # thread); the listing is made here: each trigger's keys are read on the loop a step at
        # a time and listed in this thread (Trigger.state()), where run whole on the loop a
        # trigger of a million keys held it for seconds
        self._read("triggers", _answers)
        return self.engine.triggers(keys_limit)

    async def atriggers(self, keys_limit: int | None = None) -> list[TriggerState]:
        await self._aread(_answers)
        # (in a thread of its own: the listing waits on the engine's loop between its steps)
        return await asyncio.to_thread(self.engine.triggers, keys_limit)

    def workers(self) -> list[WorkerInfo]:
        return self._read("workers", self.engine.workers)

    async def aworkers(self) -> list[WorkerInfo]:
        return await self._aread(self.engine.workers)

    # ------------------------------------------------------------------ serving and dashboards

    def serve(self, address: str | None = None, **options: Unpack[ServeKwargs]) -> ServerInfo:
        """Start a control endpoint (see ``Engine.serve``); returns its address and token."""
        from .server import ControlServer

        # checked here as well, so that the error names the method called, not Engine.serve()
        check_option_names("BackgroundEngine.serve()", options, ControlServer)
        server = self._call("serve", self.engine.serve, address, **options)
        info: ServerInfo = server.info()
        self._server_info = info
        return info

    async def aserve(self, address: str | None = None, **options: Unpack[ServeKwargs]) -> ServerInfo:
        from .server import ControlServer

        check_option_names("BackgroundEngine.aserve()", options, ControlServer)
        server = await self._acall(self.engine.serve, address, **options)
        info: ServerInfo = server.info()
        self._server_info = info
        return info

    def dashboard(self, port: int = 8000, *, host: str = "127.0.0.1", ready_timeout: float = 60.0) -> Any:
        """Serve the Textual dashboard in a browser; returns an IPython ``IFrame`` (or the URL).

        ``port=0`` takes a free port (the URL says which). Called again for a
        ``host`` and ``port`` this engine's dashboard still listens on (or with
        ``port=0`` while one listens on that host), it returns that dashboard's
        view, same URL, and starts nothing: a notebook cell run again shows the
        dashboard it started. A port something else listens on (another
        engine's dashboard too) raises :class:`OSError` (``EADDRINUSE``). The web server
        has ``ready_timeout`` seconds to start (a first start on a busy machine
        compiles Textual's modules: it may take many), else :class:`TimeoutError`.

        The dashboards attach to the endpoint :meth:`serve` made last, if
        ``taskwatch attach`` takes it (a Unix socket, or TCP on loopback);
        otherwise the first dashboard serves the engine on a Unix socket of
        their own, in a directory only this user can enter. Then a
        textual-serve web server starts (a subprocess in a session of its own,
        stopped by :meth:`stop`) whose sessions run ``taskwatch attach
        ADDRESS`` with the token in their environment. The URL
        carries a secret made for this dashboard: the server refuses (403)
        every request without it, and websockets opened by other web sites.
        ``host`` is where it listens; keep it loopback unless others must reach
        it (any other host warns: the URL is then the only key, over plain HTTP).
        """
        problems = []
        if isinstance(port, str) and port.strip().isdigit():
            port = int(port)  # from the environment, say
        elif not isinstance(port, bool | int) and hasattr(port, "__index__"):
            port = operator.index(port)  # a numpy integer
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            # a port past 65535 would be taken modulo 65536 by the resolver: another port, silently
            problems.append(f"port={port!r}: a TCP port, from 0 (a free one) to 65535")
        if not isinstance(host, str) or not host:
            problems.append(f"host={host!r}: an address to listen on, such as '127.0.0.1'")
        if isinstance(ready_timeout, bool) or not isinstance(ready_timeout, (int, float)) or not (
            math.isfinite(ready_timeout) and ready_timeout > 0
        ):
            problems.append(f"ready_timeout={ready_timeout!r}: the seconds the web server has to start, above 0")
        if problems:
            raise InvalidConfiguration("BackgroundEngine.dashboard()", problems)
        if self._on_loop_thread():
            raise LoopThreadError("dashboard", _DASHBOARD_ON_LOOP)
        with self._lock:
            if self._stopping or self._finished:
                raise self._not_running()  # a server started now would outlive the stop
        running = self._running_dashboard(host, port)
        if running is not None:
            return running.view
        argv, attach_env = attach_command(self._dashboard_server())
        secret = secrets.token_urlsafe(32)
        # sessions inherit the server's environment: theirs is the token of this endpoint or none
        env = {key: value for key, value in os.environ.items() if key != _TOKEN_ENV}
        env.update(attach_env)
        env[_WEB_SECRET_ENV] = secret
        # files, not pipes: nobody reads the server's output once it listens, and a full pipe would block it
        with tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-c", _WEB_SERVER_SCRIPT, shlex.join(argv), host, str(port)],
                stdin=subprocess.PIPE,
                stdout=out_file,
                stderr=log_file,
                env=env,
                # out of this process's group: a notebook's Interrupt (and a terminal's Ctrl+C) signals
                # the whole group, which would end the server under a live IFrame; and ipykernel's
                # shutdown ends every child in its group and waits until none is left, which ours,
                # never reaped, never is: Jupyter then SIGTERMs the kernel before its stop at exit has
                # handed back the runs. The stdin pipe still ends the server when this process goes
                start_new_session=True,
            )
            with self._lock:
                # a stop that began meanwhile has stopped the dashboards it knew of: not this one
                ended = self._stopping or self._finished
                if not ended:
                    self._dashboards.append(proc)
            if ended:
                _end_process(proc)
                raise self._not_running()
            try:
                url = _wait_for_url(proc, host, port, ready_timeout, out_file, log_file)
            except BaseException as exc:
                if self._stopping and isinstance(exc, Exception):
                    raise self._not_running() from None  # the stop ended the server as it started
                # interrupted too (a notebook's Interrupt): a server whose URL nobody was given
                # would hold its port until the engine stops; its closed stdin ends it
                _close_stdin(proc)
                if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
                    # the same dashboard() from another thread may have taken the port meanwhile
                    running = self._running_dashboard(host, port)
                    if running is not None:
                        return running.view
                    raise OSError(errno.EADDRINUSE, _port_in_use(self, host, port)) from None
                raise
        view = _dashboard_view(url)
        with self._lock:
            self._dashboard_shown[proc.pid] = _WebDashboard(host, urllib.parse.urlsplit(url).port or port, view)
        if not _is_loopback_host(host):
            # the server says so too, but on its stderr, which nobody reads
            warnings.warn(
                f"bg.dashboard(host={host!r}) listens "
                f"{'on every interface' if _is_wildcard_host(host) else 'beyond this machine'}: anyone who can "
                "reach this machine there and has the dashboard's URL can cancel runs and submit tasks; the URL "
                "is the only key and the connection is unencrypted (plain HTTP). Keep the default host "
                "(127.0.0.1) unless others must reach it, and then only on a network you trust",
                RuntimeWarning,
                stacklevel=2,
            )
        return view

    def _dashboard_server(self) -> ServerInfo:
        """The endpoint the dashboards' sessions attach to: the one :meth:`serve` made last,
        unless that is TCP beyond loopback, which ``taskwatch attach`` refuses (the protocol is
        plaintext); else one made once, on a Unix socket in a private directory, with a token."""
        from .server import new_token
        from .wire import TcpAddress, parse_address

        served = self._server_info
        if served is not None:
            target = parse_address(served.address)
            if not isinstance(target, TcpAddress) or target.is_loopback:
                return served
        with self._dashboard_endpoint_lock:
            if self._dashboard_endpoint is None:
                # mode 0700; named as taskwatch.tui.web names its own (pid, then random), so that one
                # this process could not remove (killed outright) is removed by a later `taskwatch web`
                private = tempfile.mkdtemp(prefix=f"taskwatch-web-{os.getpid()}-")
                try:
                    server = self._call(
                        "dashboard", self.engine.serve, os.path.join(private, "engine.sock"),
                        token=new_token(), announce=False,
                    )
                except BaseException:
                    shutil.rmtree(private, ignore_errors=True)
                    raise
                with self._lock:
                    # the loop thread's end removes the directory; one that already ran it cannot
                    ended = self._finished
                    if not ended:
                        self._dashboard_dir = private
                if ended:
                    shutil.rmtree(private, ignore_errors=True)
                    raise self._not_running()
                self._dashboard_endpoint = server.info()
            return self._dashboard_endpoint

    def _stop_dashboards(self) -> None:
        with self._lock:
            procs = list(self._dashboards)
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()  # textual-serve exits gracefully on SIGTERM
        for proc in procs:
            try:
                proc.wait(_SLACK)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            _close_stdin(proc)
            # forgotten only once ended: a stop cut short leaves the rest to the next stop
            with self._lock:
                if proc in self._dashboards:
                    self._dashboards.remove(proc)
                self._dashboard_shown.pop(proc.pid, None)

    def _running_dashboards(self) -> list[_WebDashboard]:
        """This facade's dashboards still running, oldest first."""
        with self._lock:
            return [
                shown
                for proc in self._dashboards
                if (shown := self._dashboard_shown.get(proc.pid)) is not None and proc.poll() is None
            ]

    def _running_dashboard(self, host: str, port: int) -> _WebDashboard | None:
        """This facade's dashboard still running on ``host`` and ``port`` (port 0: any port, the
        newest), which another dashboard() there returns rather than failing on its port."""
        for shown in reversed(self._running_dashboards()):
            if shown.host == host and port in (0, shown.port):
                return shown
        return None

    def _dashboard_on(self, port: int) -> str | None:
        """The host a dashboard of this facade's, still running, listens on at ``port`` (None: none does)."""
        return next((shown.host for shown in self._running_dashboards() if shown.port == port), None)

    # ------------------------------------------------------------------ stopping

    def stop(self, timeout: float | None = None) -> None:
        """Stop the engine (draining up to ``timeout`` s), end its loop and join its thread.

        Idempotent; safe from any thread but the engine's own and its executor's (a
        run's ``asyncio.to_thread``), whose ends the loop's end waits for (:meth:`astop`
        from code on another event loop). A stop cut short (Ctrl-C) goes on in
        the background: :attr:`state` says ``stopping`` until it is done, and
        ``stop()`` again waits for it. A later call's shorter ``timeout`` shortens the
        drain (hurries it, see ``Engine.hurry_stop``, once the engine has begun stopping);
        ``stop()`` without one only waits.
        """
        if self._on_loop_thread():
            raise LoopThreadError("stop", _STOP_ON_LOOP.format(method="stop"))
        if getattr(_serving, "engine", None) is self:
            raise LoopThreadError("stop", _STOP_ON_EXECUTOR.format(method="stop"))
        if self._forked():
            return  # the engine runs on in the process this one was forked from: that one stops it
        drain = self.stop_timeout if timeout is None else _seconds("BackgroundEngine.stop()", timeout)
        self._request_stop(drain, hurry=timeout is not None)
        self._wait_stopped()

    def _request_stop(self, drain: float, note: str | None = None, *, hurry: bool = False) -> None:
        """Ask the loop to stop the engine and stop the dashboards, without waiting for the engine.

        Each step every time, not only the first: a stop cut short (Ctrl-C while a dashboard
        ends, say) leaves the rest to the next one -- the stop() again, the interpreter's exit
        -- which must not find the loop never told. ``note``: why ``drain`` is short, for the
        engine's warning, if this request's drain is the one the stop takes. ``hurry``: a shorter
        ``drain`` shortens one begun already (an explicit timeout, the interpreter's exit; a
        stop() again without one only waits).
        """
        with self._lock:
            first = not self._stopping
            self._stopping = True
            # the shortest drain asked for before the stop began
            if self._drain_begun is None and (first or drain < self._drain_timeout):
                self._drain_timeout = drain
                self._drain_note = note
            # and one begun already ends sooner if asked: a kernel's exit after an interrupted
            # bg.stop(60) has the second or so Jupyter gives it, and cut there by its SIGTERM the
            # stop would hand no run back
            # (_drain_begun stays: the stop's phases before its drain are not cut, and the wait
            # for the loop's end must not take them for a blocked loop)
            hurry = hurry and self._drain_begun is not None and drain < self._drain_begun
            loop, requested = self._loop, self._stop_requested
        # the loop first: ending a dashboard waits for its process, which an interrupt can cut short
        if loop is not None and requested is not None:
            try:
                loop.call_soon_threadsafe(requested.set)
                if hurry:
                    loop.call_soon_threadsafe(functools.partial(self.engine.hurry_stop, drain, drain_advice=note))
            except RuntimeError:
                pass  # the loop already closed
        # none may outlive the engine it shows
        self._stop_dashboards()

    def _wait_stopped(self, exit_deadline: float | None = None) -> None:
        """Wait for the stop under way to end the loop thread; raise what the engine's stop raised.

        ``exit_deadline`` (a :func:`time.monotonic` time: the interpreter is exiting) ends the wait
        there if that is sooner.
        """
        budget = self._stop_budget()
        if exit_deadline is not None:
            budget = min(budget, max(0.0, exit_deadline - time.monotonic()))
        if not self._ended.wait(_thread_timeout(budget)):
            if exit_deadline is not None:
                raise TimeoutError(
                    "the background engine's loop did not end within the time the interpreter's exit gives it "
                    "(its drain, at most background.EXIT_STOP_TIMEOUT unless start_background() was given a "
                    "stop_timeout, plus its cancel_grace and "
                    "background.EXIT_SLACK): code running on it blocks it (a task calling blocking code "
                    "without await?) or a run ignores cancellation. The process exits without it: the runs "
                    "it had not handed back stay as its store has them"
                )
            raise TimeoutError(
                f"the background engine's loop did not end within {budget:g} s: code running on it blocks it "
                "(a task calling blocking code without await?), or ignores cancellation past every round of "
                "cancel_grace; the engine goes on stopping once that returns, and bg.stop() again waits for it"
            )
        self._thread.join(_SLACK)  # its last steps, after _ended was set
        # only now: a stop cut short (Ctrl-C) is still the interpreter exit's to wait for
        _running.discard(self)
        with self._lock:
            error, self._stop_error = self._stop_error, None  # raised once, to the first call to see the end
        if error is not None:
            raise error

    def _stop_budget(self) -> float:
        """How long a stop may take before something blocks the loop: the drain, the rounds of
        ``cancel_grace`` the engine gives the runs it cuts and the loop's end gives what is left
        (plus its async generators and executor), and some slack for the last writes."""
        with self._lock:
            drain = self._drain_begun if self._drain_begun is not None else self._drain_timeout
        # the engine's stop gives three kinds of stubborn code their rounds one after another
        # (supervised workers, then queue handlers, then runs)
        return drain + (3 * _STOP_ROUNDS + _END_ROUNDS + 2) * self.engine.cancel_grace + 2 * _SLACK

    async def astop(self, timeout: float | None = None) -> None:
        """Awaitable :meth:`stop`, for code on another event loop: that loop goes on while the engine stops."""
        if self._on_loop_thread():
            raise LoopThreadError("astop", _STOP_ON_LOOP.format(method="astop"))
        await asyncio.to_thread(self.stop, timeout)

    def __enter__(self) -> BackgroundEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ display

    def _repr_html_(self) -> str:
        from .display import engine_html

        return engine_html(self._view())

    def __rich__(self) -> Any:
        from .display import engine_rich

        return engine_rich(self._view())

    def _view(self) -> AnyEngineView:
        """The engine's view, stating this facade's state: an earlier facade of an engine started
        again under a later one is stopped (its submits refused), whatever the engine is."""
        from .display import BusyEngineView, EngineView, engine_view

        view = engine_view(self.engine)
        state = self.state
        # (a facade still running shows its engine's state: stopped from a call on its loop, say)
        if isinstance(view, (EngineView, BusyEngineView)) and state != "running" and view.state != state:
            if state == "stopped" and view.state == "running":
                state = "stopped (the engine runs again under a later start_background(): use that one)"
            view = dataclasses.replace(view, state=state)
        return view

    def __repr__(self) -> str:
        return f"<BackgroundEngine {self.engine.node_id} {self.state}>"


#: held while a launch claims an engine, and while a stopped engine is read directly (so that
#: no launch starts it meanwhile)
_launch_lock = threading.Lock()

#: ``engine``: the BackgroundEngine whose loop's executor (asyncio.to_thread) this thread serves
_serving = threading.local()
#: the facade each engine was last started under, by ``id(engine)``: the facade holds its
#: engine, so the id is that engine's as long as the entry lives
_facades: weakref.WeakValueDictionary[int, BackgroundEngine] = weakref.WeakValueDictionary()


def _after_fork_in_child() -> None:
    """A lock another thread of the parent held at the fork stays held in the child for good, that
    thread not having come along: a read there (``bg.get()``, ``handle.wait()``) hung on it instead
    of being told :class:`EngineInAnotherProcess`. The child gets its locks afresh."""
    global _launch_lock
    _launch_lock = threading.Lock()
    for bg in list(_facades.values()):
        bg._lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _give_up_start(bg: BackgroundEngine) -> None:
    """Stop what a launch that gave up (timed out, or cut short) had started."""
    bg._abort_start()
    if bg._loop_thread_ended():
        _running.discard(bg)  # (registered if what gave up came after the start)
    else:
        # still ending (a store call that cannot be cut short): the interpreter's exit waits for it
        _stop_at_interpreter_exit(bg)


def _ready(target: BackgroundEngine) -> BackgroundEngine:
    """``target``, once its loop is there to take calls (a facade just launched may not have it yet)."""
    if not target._ready.is_set():  # (a flag: no lock taken on every call once it is)
        target._ready.wait(_thread_timeout(target.start_timeout))
    return target


async def _aready(target: BackgroundEngine) -> BackgroundEngine:
    if not target._ready.is_set():
        await asyncio.to_thread(target._ready.wait, _thread_timeout(target.start_timeout))
    return target


def _answers() -> None:
    """A read that reads nothing: the engine's loop answering it is what is asked."""


def _thread_timeout(seconds: float | None) -> float | None:
    """``seconds`` as threading takes it: longer than it can wait is waiting without a timeout."""
    return None if seconds is None or seconds >= threading.TIMEOUT_MAX else seconds


def _refuse_nan(where: str, **values: Any) -> None:
    # pydantic would say "should be greater than 0" of a NaN, which reads as nonsense
    nans = [f"{name}=nan: not a number of seconds" for name, value in values.items() if _is_nan(value)]
    if nans:
        raise InvalidConfiguration(where, nans)


def _is_nan(value: object) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _seconds(where: str, timeout: float) -> float:
    _refuse_nan(where, timeout=timeout)
    checked: float = check_options(WaitOptions, where, timeout=timeout).timeout  # type: ignore[assignment]
    return checked


class _WebDashboard(NamedTuple):
    """A web server ``BackgroundEngine.dashboard()`` started: where it listens, and the view
    of it that call returned."""

    host: str
    port: int
    view: Any


def _dashboard_view(url: str) -> Any:
    """An IPython ``IFrame`` of ``url`` that prints as the URL (or the URL itself, without IPython)."""
    try:
        from IPython.display import IFrame
    except ImportError:
        return url

    class Dashboard(IFrame):  # type: ignore[misc]
        def __str__(self) -> str:
            return str(self.src)

        def __repr__(self) -> str:
            return f"<taskwatch dashboard {self.src}>"

    return Dashboard(url, width="100%", height=640)


def _is_loopback_host(host: str) -> bool:
    """Whether ``host`` is this machine only (as taskwatch.tui.web judges it: a name other than
    localhost's may resolve anywhere)."""
    name = host.strip().strip("[]").lower()
    if name in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_wildcard_host(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_unspecified
    except ValueError:
        return False


def _end_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(_SLACK)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    _close_stdin(proc)


def _close_stdin(proc: subprocess.Popen[bytes]) -> None:
    if proc.stdin is not None:
        try:
            proc.stdin.close()
        except OSError:
            pass  # closing a pipe whose reader has gone


def _port_in_use(bg: BackgroundEngine, host: str, port: int) -> str:
    """Why ``port`` is taken, naming the dashboard of this process that holds it if one does."""
    advice = "pass another port to dashboard(), or port=0 for a free one"
    own = bg._dashboard_on(port)
    if own is not None:
        # on another host (the same host and port return that dashboard): the port is taken all the same
        return (
            f"{host}:{port} is already in use by this engine's own dashboard on {own}:{port} (an earlier "
            f"bg.dashboard(host={own!r}), which that call returns again); {advice}"
        )
    for other in list(_facades.values()):
        if other is not bg and other._dashboard_on(port) is not None:
            return (
                f"{host}:{port} is already in use by the dashboard of {other!r}, started earlier in this "
                "process (a notebook cell run again?) and still running: stop that engine with its "
                f"bg.stop(), or every one with {_STOP_ALL}; or {advice}"
            )
    return f"{host}:{port} is already in use; {advice}"


#: tasks a loop's end gave up on (they ignored every cancel), held so that their collection is
#: not reported as "Task was destroyed but it is pending": _end_loop has said what happened
_abandoned: list[asyncio.Future[Any]] = []


def _reported_once(crash: BaseException, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The exception handler of a loop that ``crash`` ended, which was reported then.

    A ``SystemExit`` or ``KeyboardInterrupt`` that leaves a task's step through the loop is
    also kept as that task's outcome, which nothing awaits any more (asyncio.all_tasks no
    longer lists a finished task, to read it there): without this its collection, at any
    later time, would log it again as "Task exception was never retrieved". Only that one
    exception object is let go; anything else is the default handler's.
    """
    if context.get("exception") is crash:
        return
    loop.default_exception_handler(context)


def _unfinished(loop: asyncio.AbstractEventLoop) -> list[asyncio.Task[Any]]:
    return [task for task in asyncio.all_tasks(loop) if not task.done()]


#: background engines still running, stopped when the interpreter exits (weakly held:
#: one stopped and dropped is gone from here)
_running: weakref.WeakSet[BackgroundEngine] = weakref.WeakSet()
_exit_hook_registered = False
_exit_hook_lock = threading.Lock()


def _stop_at_interpreter_exit(bg: BackgroundEngine) -> None:
    """Stop ``bg`` when the interpreter exits, unless it was stopped (or collected) before.

    A threading exit hook, not :mod:`atexit`: Python joins non-daemon threads
    and shuts down the executors ``asyncio.to_thread`` uses before it runs atexit
    hooks, so a thread still waiting on a run would hang the exit, and a task in
    ``to_thread`` would fail its run instead of being cancelled by the stop.
    One hook for them all, registered once: hooks cannot be taken back.
    """
    global _exit_hook_registered
    _running.add(bg)
    with _exit_hook_lock:
        if _exit_hook_registered:
            return
        # threading has no public way to run a hook before that join (concurrent.futures
        # uses this one); elsewhere, atexit is the best there is
        register = getattr(threading, "_register_atexit", atexit.register)
        try:
            register(_stop_all_at_exit)
        except RuntimeError:
            return  # the interpreter is already exiting: nothing would run the hook
        _exit_hook_registered = True


def _stop_together(
    engines: list[BackgroundEngine],
    drain: Callable[[BackgroundEngine], float],
    give_up_after: Callable[[BackgroundEngine], float] | None = None,
    note: Callable[[BackgroundEngine], str | None] = lambda bg: None,
    hurry: bool = False,
) -> list[Exception]:
    """Stop ``engines``, each draining ``drain(bg)`` seconds: all asked first, then waited
    for, so their drains run at once. Every one is stopped; what failed is logged and returned.
    ``give_up_after(bg)``: the seconds, from its ask, after which the wait for ``bg`` ends;
    ``note(bg)``: why that drain is short, for the engine's warning of runs left undone."""
    errors: list[Exception] = []
    deadlines: dict[BackgroundEngine, float] = {}
    for step in ("ask", "wait"):
        for bg in engines:
            try:
                if step == "ask":
                    if give_up_after is not None:
                        deadlines[bg] = time.monotonic() + give_up_after(bg)
                    bg._request_stop(drain(bg), note(bg), hurry=hurry)
                else:
                    bg._wait_stopped(deadlines.get(bg))
            except Exception as exc:
                log.warning("stopping %r failed: %s", bg, exc)
                errors.append(exc)
    return errors


def _in_jupyter_kernel() -> bool:
    """Whether this process is a Jupyter (IPython) kernel, which its shutdown SIGTERMs 2.5 s in."""
    kernelapp = sys.modules.get("ipykernel.kernelapp")  # never imported here: only a kernel has it running
    if kernelapp is None:
        return False
    try:
        return bool(kernelapp.IPKernelApp.initialized())
    except Exception:  # noqa: BLE001 - an ipykernel unlike the ones known: taken for a kernel, the safe side
        return True


def _exit_drain(bg: BackgroundEngine) -> float:
    """The drain of ``bg``'s stop at interpreter exit: its stop_timeout when start_background()
    was given one, else at most :data:`EXIT_STOP_TIMEOUT`. A Jupyter kernel's always at most that:
    Jupyter SIGTERMs the kernel 2.5 s into a shutdown or restart, and a stop cut there runs no
    task's ``finally`` and hands no run back, so a longer drain would lose more, not less."""
    if bg._stop_timeout_given and not _in_jupyter_kernel():
        return bg.stop_timeout
    return min(bg.stop_timeout, EXIT_STOP_TIMEOUT)


def _exit_note(bg: BackgroundEngine) -> str | None:
    """Why the exit drains ``bg`` for less than its stop_timeout (None: it does not), and how to
    drain longer: told by the engine's warning when the short drain leaves runs undone."""
    drain = _exit_drain(bg)
    if drain >= bg.stop_timeout:
        return None
    if _in_jupyter_kernel():
        return (
            f"the kernel's exit stopped the engine with a drain of {drain:g} s, not its stop_timeout of "
            f"{bg.stop_timeout:g} s (in a Jupyter kernel an exit drains at most background.EXIT_STOP_TIMEOUT: "
            "Jupyter SIGTERMs a kernel 2.5 s into its shutdown); to drain longer, run bg.stop(timeout) in a "
            "cell before shutting the kernel down or restarting it"
        )
    return (
        f"the interpreter's exit stopped the engine with a drain of {drain:g} s, not its stop_timeout of "
        f"{bg.stop_timeout:g} s (an exit drains at most background.EXIT_STOP_TIMEOUT unless "
        "start_background() is given a stop_timeout; it stops the engine before atexit handlers run, so "
        "an atexit.register(bg.stop, ...) comes too late); to drain longer, call bg.stop(timeout) before "
        "the script ends, or pass start_background(stop_timeout=...)"
    )


def _stop_all_at_exit() -> None:
    # the drain within the time Jupyter gives a kernel it shuts down, unless the caller chose one;
    # the wait bounded as well (a forked process's exit leaves the engines of the process it was
    # forked from alone)
    ours = [bg for bg in list(_running) if not bg._forked()]
    _stop_together(
        ours, _exit_drain, lambda bg: _exit_drain(bg) + bg.engine.cancel_grace + EXIT_SLACK, note=_exit_note,
        hurry=True,
    )
    for bg in ours:
        if not bg._loop_thread_ended():
            # the exit goes on without that loop (its thread is a daemon): a thread still waiting
            # on a call to it (a request thread's handle.wait()) would otherwise hold the exit for
            # as long as the loop stays blocked, Python joining it before the process ends
            given_up = EngineNotRunning(
                "stopped",
                "the interpreter is exiting, and the background engine's loop did not end within the time "
                "the exit gives it (its stop still drains, or code running on it blocks it); this call was "
                "given up without an answer",
            )
            bg._fail_outstanding(given_up)
            if (loop := bg.loop) is not None:
                # and the calls made through the Engine itself (engine.get() from a thread, an
                # engine.handle(id).wait() awaited on another loop), which the facade does not track
                fail_waiting(loop, given_up)


#: where the messages point a user to stop_all_background(): reachable whatever taskwatch.engine exports
_STOP_ALL = "taskwatch.engine.stop_all_background()"


def stop_all_background(timeout: float | None = None) -> list[BackgroundEngine]:
    """Stop every :class:`BackgroundEngine` still running in this process; returns them.

    For the engines a notebook cell run again left behind: its variables name
    the new engine, and the old one goes on running (its periodic tasks, its
    dashboard, and with the same store the runs submitted to the new one,
    with its old task code). Each is stopped as :meth:`BackgroundEngine.stop`
    does, with ``timeout`` (None: each one's ``stop_timeout``), all at once;
    if any stop raises, the others are still stopped and the first error is
    raised at the end.
    """
    drain = None if timeout is None else _seconds("stop_all_background()", timeout)
    running = [bg for bg in list(_facades.values()) if bg.running]
    if any(bg._on_loop_thread() for bg in running):
        raise LoopThreadError(
            "stop_all_background",
            "stop_all_background() ends every background engine's loop thread and waits for them to end, and "
            "this is one of those threads, so it would wait forever. Call it from another thread",
        )
    errors = _stop_together(running, lambda bg: bg.stop_timeout if drain is None else drain, hurry=drain is not None)
    if errors:
        raise errors[0]
    return running


def _warn_of_others(bg: BackgroundEngine) -> None:
    """Say so when ``bg`` is not the only background engine running in this process.

    The usual cause is a notebook cell run again: the cell's ``engine`` and
    ``bg`` now name new ones, and nothing names the old engine any more, which
    goes on running (with a shared store, taking the new one's runs with its
    old task code) and keeps its dashboard's port.
    """
    others = [other for other in list(_facades.values()) if other is not bg and other.running]
    if not others:
        return
    named = ", ".join(repr(other) for other in others)
    message = (
        f"another BackgroundEngine is still running in this process: {named} (started by an earlier "
        "start_background(); a notebook cell run again?). It goes on running the tasks as they were when it "
        "started (with the same store, it also takes runs submitted here), and a dashboard it opened keeps "
        f"its port. Stop it with bg.stop() on it, or all of them with {_STOP_ALL}"
    )
    if log.hasHandlers():
        # not otherwise: logging's last resort would print it on stderr a second time
        log.warning("%s", message)
    frame = _callers_frame()
    if frame is None:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return
    # explicit, with no registry: shown for every start, not once per line (the line of a cell
    # run again is the same line, and the engine left running then is another one)
    # the globals let the warning show the line's source; since Python 3.12 they are refused
    # (ValueError) without a loader, as a notebook's __main__ has none (IPython keeps the
    # cell's source where the warning finds it anyway)
    spec = frame.f_globals.get("__spec__")
    loaded = frame.f_globals.get("__loader__") is not None or getattr(spec, "loader", None) is not None
    warnings.warn_explicit(
        message,
        RuntimeWarning,
        frame.f_code.co_filename,
        frame.f_lineno,
        module=frame.f_globals.get("__name__", "<unknown>"),
        module_globals=frame.f_globals if loaded else None,
    )


def _callers_frame() -> types.FrameType | None:
    """The first frame outside taskwatch.engine: the line of the user's code (a notebook
    cell's) that started the engine."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame = inspect.currentframe()
    while frame is not None and os.path.dirname(os.path.abspath(frame.f_code.co_filename)) == here:
        frame = frame.f_back
    return frame


#: what the web server prints once it listens (taskwatch.tui.web), with the port it bound
_LISTENING = re.compile(rb"taskwatch web: open (http://\S+/)")


def _wait_for_url(
    proc: subprocess.Popen[bytes], host: str, port: int, timeout: float, out_file: Any, log_file: Any
) -> str:
    """The URL the web server prints once it listens; fail with its stderr if it exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out_file.seek(0)
        if (found := _LISTENING.search(out_file.read())) is not None:
            return found[1].decode()
        if proc.poll() is not None:
            log_file.seek(0)
            tail = log_file.read()[-2000:].decode(errors="replace")
            if "address already in use" in tail.lower():
                raise OSError(errno.EADDRINUSE, f"{host}:{port} is already in use")  # dashboard() says by what
            missing = "textual_serve" in tail and "ModuleNotFoundError" in tail
            hint = " (textual-serve is not installed: pip install 'taskwatch[web]')" if missing else ""
            raise RuntimeError(f"the dashboard web server exited with code {proc.returncode}{hint}:\n{tail}")
        time.sleep(0.05)  # a subprocess starting up: nothing to wait on but its output
    proc.terminate()
    raise TimeoutError(f"the dashboard web server did not listen on {host}:{port} within {timeout:g} s")
