"""Calling into an engine's event loop from another thread or another loop.

The engine is not thread-safe: everything it does happens on its loop. The
background thread's facade, the dashboard's local client and the notebook
displays all need the same step, so it lives here once: ship a call to the
loop (:meth:`LoopCall.ship`), run it there (awaiting its result there if it is awaitable), and hand
the result or the exception back to the caller's thread or loop. On the
engine's own loop (or before it has one) the call runs directly.

A caller that stops waiting (a timeout, a cancel, Ctrl-C) gives the call up
with :meth:`LoopCall.give_up`, which tells it whether the call had started:
one given up before its first step on the loop never takes it, so a submit
nobody waits for any more queues nothing.

It also holds the one way the engine starts a task, :func:`spawn` (its first step
on a later turn of the loop, whatever task factory the loop has), and the one way
a loop of the engine ends a task it owns: :func:`cancel_and_wait`.

It also tells the engine's own work from its callers': :func:`work_context` is the context an
engine's runs and queue consumers are made in (so every task they start inherits it), and
:func:`works_for` says whether the code running now is that work. A stopping engine still
takes puts and submits from its own work while it drains (see ``Engine._stop``), never from
its callers.

A fork of the process (``os.fork()``, a pre-forking server) copies an engine's loop,
which then looks running, but not the thread that runs it: a call shipped to it, or a
callback handed to it, would never be taken up. The engine notes the process its loop
runs in (:func:`home_here`), and every hand-off asks :func:`refuse_in_fork` first.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import os
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

from .errors import EngineInAnotherProcess, EngineNotRunning

T = TypeVar("T")

#: the process each engine's loop runs in, noted as the engine starts on it (weakly held:
#: a loop dropped is gone from here)
_homes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, int] = weakref.WeakKeyDictionary()


#: the engine whose own work runs in this context: its runs, its queues' handlers, and the tasks
#: and threads (``asyncio.to_thread``) they start, which copy the context they are made in
_working_for: contextvars.ContextVar[object | None] = contextvars.ContextVar("taskwatch_working_for", default=None)


def work_context(owner: object) -> contextvars.Context:
    """A copy of the current context in which :func:`works_for` ``(owner)`` is true: set once
    in the context an engine's runs and queue consumers are made in, it costs them nothing."""
    context = contextvars.copy_context()
    context.run(_working_for.set, owner)
    return context


def outside_work() -> contextvars.Context:
    """A copy of the current context in which :func:`works_for` is false for every owner: for
    what an engine starts on behalf of its own work that is not that work (a stop a run asked for)."""
    context = contextvars.copy_context()
    context.run(_working_for.set, None)
    return context


def works_for(owner: object) -> bool:
    """Whether the code running now is ``owner``'s own work (see :func:`work_context`)."""
    return _working_for.get() is owner


@contextlib.contextmanager
def working_for(owner: object) -> Iterator[None]:
    """Run the block as ``owner``'s own work (a trigger's fire, made by the engine itself
    whatever context the call that brought it on came from)."""
    token = _working_for.set(owner)
    try:
        yield
    finally:
        _working_for.reset(token)


def home_here(loop: asyncio.AbstractEventLoop) -> None:
    """Note that ``loop`` runs in this process (its engine starts on it here)."""
    _homes[loop] = os.getpid()


def refuse_in_fork(loop: asyncio.AbstractEventLoop | None) -> None:
    """Raise :class:`EngineInAnotherProcess` if ``loop`` runs in the process this one was forked from.

    The loop object came along into the fork and looks running, but no thread here runs it:
    whatever is handed to it waits for ever, or is lost without a word. A loop closed before
    the fork (its engine stopped) is left to its callers, who refuse it as any closed loop,
    and so is one no engine noted.
    """
    if loop is None:
        return
    home = _homes.get(loop)
    if home is not None and home != os.getpid() and not loop.is_closed():
        raise EngineInAnotherProcess(home)


def spawn(
    coro: Coroutine[Any, Any, T],
    *,
    name: str | None = None,
    context: contextvars.Context | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
) -> asyncio.Task[T]:
    """Start ``coro`` as a task of ``loop`` (the running one by default); its first step runs
    on a later turn of the loop, never inside this call.

    A loop's task factory may run a task's first step inside ``create_task`` (an eager one:
    ``asyncio.eager_task_factory``, which Textual's apps set on Python 3.12 and later). A run
    would start, and a quick one end, inside ``submit()``, before whoever submitted it knows
    its id; a loop's first step would run before the code that starts it has finished. So a
    loop with no factory gets asyncio's own task, and one with a factory (an eager one, or a
    user's: Sentry's and OpenTelemetry's give each task a scope of its own) gets its task made
    by the factory, around a coroutine whose first step only yields. The engine's order of
    events is the same on every loop and every Python.
    """
    loop = loop or asyncio.get_running_loop()
    if loop.get_task_factory() is None:
        return asyncio.Task(coro, loop=loop, name=name, context=context)
    task: asyncio.Task[T] = loop.create_task(_after_a_turn(coro), name=name, context=context)
    # cancelled before its first step, the wrapper never awaited ``coro``: closed unstarted, it
    # is not reported as never awaited
    task.add_done_callback(lambda _: coro.close())
    return task


async def _after_a_turn(coro: Coroutine[Any, Any, T]) -> T:
    await asyncio.sleep(0)  # a bare yield: an eager factory's first step ends here
    return await coro


def as_future(aw: Awaitable[T], *, loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Future[T]:
    """``aw`` as a future: a future as it is, a coroutine as a task :func:`spawn` starts."""
    if asyncio.iscoroutine(aw):
        return spawn(aw, loop=loop)
    return asyncio.ensure_future(aw, loop=loop)


class Escaped(Exception):
    """Carries a SystemExit or KeyboardInterrupt raised by a hopped call back to its caller, or
    a CancelledError the call's own code ended with (not a cancel of the call)."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(repr(exc))
        self.exc = exc


async def _invoke(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    try:
        result = fn(*args, **kwargs)
        if inspect.isawaitable(result):
            result = await result
    except (SystemExit, KeyboardInterrupt) as exc:
        # raised inside the loop these would end it for everyone; they belong to the caller
        raise Escaped(exc) from None
    return result


class LoopCall:
    """A call shipped to an event loop from another thread or loop: its future, and a way to give it up.

    Giving up and starting race under the future's own lock, so exactly one
    wins: the call's first step on the loop marks the future running, and a
    cancel of the future succeeds only before that. (``run_coroutine_threadsafe``
    has no such step: a future cancelled while the loop was busy still had its
    coroutine started once the loop got to it.)
    """

    __slots__ = ("future", "cut", "_fn", "_args", "_kwargs", "_loop", "_task", "_given_up")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        #: the loop cancelled the call (it was closing) without its caller giving it up
        self.cut = False
        self._fn = fn
        self._args = args
        self._kwargs = kwargs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._given_up = False

    def ship(self, loop: asyncio.AbstractEventLoop) -> None:
        """Schedule the call on ``loop`` from any thread; its result arrives in :attr:`future`.

        Made apart from the call so that its caller holds the call before anything is on the
        loop: shipped inside the ``try`` that gives it up, an interrupt (Ctrl-C) landing anywhere
        between the two can no longer leave a call on the loop that nobody waits for.

        Raises ``RuntimeError`` when ``loop`` is closed, :class:`EngineInAnotherProcess` (one too)
        in a fork of the process it runs in. A SystemExit or KeyboardInterrupt from the call
        arrives as :class:`Escaped`.
        """
        refuse_in_fork(loop)
        future = self.future
        with _unanswered_lock:
            waiting = _unanswered.get(loop)
            if waiting is None:
                waiting = _unanswered[loop] = set()
        # the callback before the entry: an interrupt between the two then leaves no entry that
        # nothing would ever remove (and the lock is not held: a done future calls back at once)
        future.add_done_callback(functools.partial(_answered, waiting))
        with _unanswered_lock:
            if not future.done():
                waiting.add(future)
        self._loop = loop
        try:
            loop.call_soon_threadsafe(self._create)
        except RuntimeError:
            future.cancel()  # never on the loop: answered, so nothing counts it as waiting
            raise

    def _create(self) -> None:
        if self.future.cancelled():
            return  # given up while it waited for the loop: not even a task
        assert self._loop is not None
        self._task = spawn(self._run(self._fn, self._args, self._kwargs), loop=self._loop)
        self._task.add_done_callback(self._settle)

    async def _run(self, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        # the handshake, in the same step as the call's own first one: nothing of the call
        # runs unless this wins against a cancel of the future
        try:
            if not self.future.set_running_or_notify_cancel():
                return
        except RuntimeError:
            return  # already answered (the loop's owner failed it while ending)
        # answered here, in the step the call returned in, not from the task's done callback:
        # that runs only after whatever the call scheduled meanwhile (a submitted run's first
        # step, which may block the loop for seconds before its first await)
        try:
            result = await _invoke(fn, args, kwargs)
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the call itself was cancelled (given up, or the loop's end): _settle says so
            # the call's own outcome (it awaited a task something else cancelled), which its
            # caller hears as it would awaiting the call there: taken for a cut call, it was
            # reported as a stopped engine, and a blocking caller ran it a second time
            _answer(self.future, Escaped(exc), failed=True)
        except Exception as exc:
            _answer(self.future, exc, failed=True)
        else:
            _answer(self.future, result, failed=False)

    def _settle(self, task: asyncio.Task[Any]) -> None:
        future = self.future
        if future.done():
            return  # answered by _run, or given up before it started
        try:
            if task.cancelled():
                self.cut = not self._given_up
                # a future still pending never started: cancelled like one given up
                if not future.cancel():
                    future.set_exception(concurrent.futures.CancelledError())
            elif (exc := task.exception()) is not None:
                future.set_exception(exc)
            else:
                future.set_result(task.result())
        except concurrent.futures.InvalidStateError:
            pass  # answered meanwhile from the caller's side: the first answer stands

    def give_up(self) -> bool:
        """Stop waiting for the call. True when it had not started: it never will.

        False when it had (or has finished): what it did so far stands, and a
        call still going is cancelled at its next ``await``.
        """
        if self.future.cancel():
            return True
        self._given_up = True
        if not self.future.done() and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._cancel_task)
            except RuntimeError:
                pass  # the loop closed, which ended the call
        return False

    def _cancel_task(self) -> None:
        # on the loop, after _create: the future was running, so the task exists
        if self._task is not None:
            self._task.cancel()


def _answer(future: concurrent.futures.Future[Any], value: Any, *, failed: bool) -> None:
    try:
        if failed:
            future.set_exception(value)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass  # answered meanwhile from the caller's side: the first answer stands


#: the futures of the calls shipped to each loop that are not answered yet (see fail_waiting)
_unanswered: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, set[concurrent.futures.Future[Any]]] = (
    weakref.WeakKeyDictionary()
)
_unanswered_lock = threading.Lock()


def _answered(waiting: set[concurrent.futures.Future[Any]], future: concurrent.futures.Future[Any]) -> None:
    with _unanswered_lock:
        waiting.discard(future)


def fail_waiting(loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
    """Answer every call shipped to ``loop`` and not answered yet with ``error``: the process
    exits without the loop (a task blocks it), and a thread still waiting on a call to it (an
    ``engine.get()`` from a request thread) would hold the exit for as long as it is blocked."""
    with _unanswered_lock:
        pending = list(_unanswered.get(loop, ()))
    for future in pending:
        try:
            future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            pass  # answered meanwhile: that answer stands


def call_apart(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` called and awaited on an event loop of its own, in a short-lived thread.

    For awaiting what a stopped engine still answers: its loop is gone, and
    this thread may run a loop of its own (a notebook's), where no other can run.
    """
    answer: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def run() -> None:
        try:
            answer.set_result(asyncio.run(_invoke(fn, args, kwargs)))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            answer.set_exception(exc)

    # a daemon thread, not joined when the caller is interrupted (Ctrl-C): the caller gets
    # its thread back at once, and a call that never ends does not hold the interpreter's exit
    thread = threading.Thread(target=run, name="taskwatch-apart", daemon=True)
    thread.start()
    try:
        result = answer.result()
    except Escaped as escaped:
        raise escaped.exc from None
    finally:
        if answer.done():
            thread.join()  # only its last steps are left
    return result


def current_loop() -> asyncio.AbstractEventLoop | None:
    """The event loop running in this thread, or None outside one."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


#: how often a caller on another loop looks whether the engine's loop closed under its call
_LOOP_CHECK = 1.0


async def call_on(loop: asyncio.AbstractEventLoop | None, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Await ``fn(*args, **kwargs)`` run on ``loop``, from a coroutine on any loop.

    It runs there exactly as if awaited there. A cancel of the caller gives the call up (one
    not started yet never starts; one under way is cancelled at its next await, as a caller
    cancelled on that loop would be). :class:`EngineNotRunning` if the loop ends first, and
    :class:`EngineInAnotherProcess` at once in a fork of the process it runs in.
    """
    if loop is None or loop is current_loop():
        result = fn(*args, **kwargs)
        return await result if inspect.isawaitable(result) else result
    # before the ship below, whose RuntimeError (which this one is too) means a closed loop
    refuse_in_fork(loop)
    call = LoopCall(fn, args, kwargs)
    try:
        call.ship(loop)
    except RuntimeError:
        raise EngineNotRunning("stopped") from None
    answer = asyncio.wrap_future(call.future)
    try:
        # a loop that closes drops a call still waiting for its first step, which nothing
        # would then answer: looked at now and then, as no callback says it closed
        while not (await asyncio.wait([answer], timeout=_LOOP_CHECK))[0]:
            if loop.is_closed():
                call.give_up()
                raise EngineNotRunning("stopped")
    except asyncio.CancelledError:
        call.give_up()  # this caller was cancelled: a call under way ends with it
        # what the given-up call still ends with is nobody's to hear now
        answer.add_done_callback(unheard)
        raise
    try:
        return answer.result()
    except asyncio.CancelledError:
        raise EngineNotRunning("stopped") from None  # the loop's end cancelled the call
    except Escaped as escaped:
        raise escaped.exc from None


def unheard(answer: asyncio.Future[Any]) -> None:
    """Keeps asyncio from reporting an answer nobody awaits any more as never retrieved."""
    if not answer.cancelled():
        answer.exception()


#: how often a thread waiting for a call on a loop looks whether that loop still runs
_LOOK_EVERY = 0.05


def call_blocking(
    loop: asyncio.AbstractEventLoop | None,
    fn: Callable[..., T],
    *args: Any,
    timeout: float | None = 5.0,
    gone: Callable[[], bool] | None = None,
    what: str | None = None,
    **kwargs: Any,
) -> T:
    """``fn(*args, **kwargs)`` run on ``loop``, waiting for it on this thread (``fn`` must not be async).

    On the loop's own thread, or when the loop takes no more calls, it runs here: when the loop
    is closed, or ``gone()`` says so (by default: when the loop is not running; a loop driven in
    pieces by ``run_until_complete`` is not running between them, and the caller may know it will
    run again). So it does when the loop stops taking calls before it took this one (an engine's
    loop ending under a ``bg.stop()``, which may also cancel the call before it started): shipped
    calls left on a loop that stopped are never run. ``TimeoutError`` after ``timeout`` seconds
    if the call has not started by then (it then never will), naming ``Engine.what()`` if given;
    one that started is waited for. In a fork of the process the loop runs in it raises
    :class:`EngineInAnotherProcess` at once.
    """

    def no_more() -> bool:
        assert loop is not None
        return loop.is_closed() or (not loop.is_running() if gone is None else gone())

    if loop is None or loop is current_loop() or no_more():
        return fn(*args, **kwargs)
    call = LoopCall(fn, args, kwargs)
    ends = None if timeout is None else time.monotonic() + timeout
    try:
        call.ship(loop)
        while True:
            left = _LOOK_EVERY if ends is None else min(_LOOK_EVERY, max(0.0, ends - time.monotonic()))
            if call.cut:
                # cancelled by the loop's owner before it started (ending the loop's last tasks,
                # as a background engine's stop does): it runs here once that is over
                if no_more():
                    return fn(*args, **kwargs)
                time.sleep(left)
            else:
                try:
                    return call.future.result(left)  # type: ignore[no-any-return]
                except concurrent.futures.CancelledError:
                    if not call.cut:
                        raise
                    continue
                except TimeoutError:
                    if call.cut:
                        continue  # cut meanwhile: see above
                    if call.future.done():
                        # answered between the wait's end and this look (its own error included)
                        return call.future.result(0)  # type: ignore[no-any-return]
                    if no_more() and call.give_up():
                        # never taken, and never will be: nothing runs on the loop meanwhile either
                        return fn(*args, **kwargs)
            if ends is not None and time.monotonic() >= ends:
                if call.cut or call.give_up():
                    waited = (
                        f"Engine.{what}() waited {timeout:g} s for the engine's event loop, which runs in another "
                        "thread, and it did not take the call up"
                        if what
                        else f"the engine's event loop did not answer within {timeout:g} s"
                    )
                    raise TimeoutError(
                        f"{waited}: it is busy or blocked (a task running blocking code on it?); the call did nothing"
                    )
                return call.future.result()  # type: ignore[no-any-return]  # it started: its answer
    except Escaped as escaped:
        raise escaped.exc from None
    except BaseException:
        if not call.future.done():
            call.give_up()  # interrupted: nobody waits for it any more
        raise


def going_here(task: asyncio.Task[Any]) -> bool:
    """Whether ``task`` still runs on the running loop: one left on a loop that has closed since
    (a background engine's, which gives such tasks up as it ends) never ends, and never runs."""
    return not task.done() and task.get_loop() is asyncio.get_running_loop()


async def cancel_and_wait(task: asyncio.Task[Any] | None) -> None:
    """Cancel ``task`` (if any) and wait until it has ended, without raising what it raised."""
    if task is None:
        return
    task.cancel()
    # asyncio.wait, unlike awaiting the task, leaves a cancel of the caller itself alone
    await asyncio.wait([task])
