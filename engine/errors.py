"""Every error taskwatch raises, in one place.

All of them derive from :class:`TaskwatchError`, so callers can catch the whole
family with one ``except``. Each message says what went wrong and what to do.
"""

from __future__ import annotations

import math
import os
import reprlib
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .urls import shown_url

if TYPE_CHECKING:
    from pydantic import ValidationError


class _Shown(reprlib.Repr):
    """reprlib's bounded repr, with an int too long for ``repr`` shown by its size."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.maxstring = self.maxlong = self.maxother = limit
        self.maxlevel = 3

    def repr_int(self, x: int, level: int) -> str:
        try:
            return super().repr_int(x, level)
        except ValueError:
            # past sys.get_int_max_str_digits(): repr refuses it, and the digits are no help anyway
            return f"<int of {_digits(x)} digits>"


def _digits(x: int) -> int:
    n = abs(x)
    digits = int(math.log10(n)) + 1
    # (a float log10 can be one off at a power of ten)
    if 10 ** (digits - 1) > n:
        digits -= 1
    elif 10**digits <= n:
        digits += 1
    return digits


#: the most characters of a caller's value an error message shows
SHOWN_LIMIT = 200
_SHOWN = _Shown(SHOWN_LIMIT)


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``repr(value)`` for an error message about it: at most ``limit`` characters, and cheap
    and safe for any value, which ``repr`` is not (an int past Python's 4300-digit limit
    raises ValueError, a long text or list is copied whole, a ``__repr__`` may raise anything)."""
    try:
        text = _SHOWN.repr(value)
    except BaseException:  # noqa: BLE001 - a broken __repr__ must not replace the error being raised
        text = f"<{type(value).__qualname__} object>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _rebuilt(cls: type[TaskwatchError], args: tuple[Any, ...]) -> TaskwatchError:
    """An error of ``cls`` holding ``args``, made without ``cls.__init__`` (see ``TaskwatchError.__reduce__``)."""
    # cls.__new__, not BaseException.__new__: an OSError subclass (ConnectionClosed) needs its own
    error = cls.__new__(cls, *args)
    error.args = args
    return error


class TaskwatchError(Exception):
    """Base class of every error raised by taskwatch.

    Every one pickles and copies (``pickle``, ``copy.copy``, a ``ProcessPoolExecutor``
    worker's raise) as the same class with the same message and attributes.
    """

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception's own __reduce__ calls cls(*self.args), which fails or garbles the message
        # for every subclass whose __init__ takes what the message is built from; so the
        # message and the attributes are restored as they are, without calling __init__
        return (_rebuilt, (type(self), self.args), self.__dict__ or None)


class TaskDefinitionError(TaskwatchError, TypeError):
    """A task function or decorator call is malformed (raised at registration time)."""


class DuplicateTask(TaskwatchError, ValueError):
    """A task, periodic task, queue or trigger name is already registered."""

    def __init__(self, kind: str, name: str, replaceable: bool = False) -> None:
        self.name = name
        if kind == "periodic task":
            # a notebook cell with @engine.periodic run again: replace=True is no way out
            super().__init__(
                f"a periodic task named {name!r} is already registered, and a periodic task cannot be replaced "
                "in place, as a plain task can be: the one registered goes on running as it "
                "was defined. To change it, register the new definition under another name (and "
                f"engine.pause_periodic({name!r}) pauses the old one), or build a new Engine and register its "
                "tasks again (in a notebook: stop the old one first, bg.stop())"
            )
            return
        super().__init__(
            f"a {kind} named {name!r} is already registered; pick another name"
            + (", or pass replace=True to redefine it (a notebook cell run again)" if replaceable else "")
        )


class UnknownTask(TaskwatchError, LookupError):
    """``submit`` named a task that is not registered."""

    def __init__(self, name: str, known: Iterable[str], kind: str | None = None) -> None:
        self.name = name
        self.known = sorted(known)
        #: set when ``name`` is registered, but as a task its own loop runs ("periodic", "trigger")
        self.kind = kind
        listing = ", ".join(self.known) if self.known else "none registered yet"
        if kind is not None:
            now = f"engine.run_periodic({name!r}) runs it now; " if kind == "periodic" else ""
            super().__init__(
                f"task {name!r} is a {kind} task, which the engine runs itself and which cannot be "
                f"submitted; {now}for runs on demand register an @engine.task. Submittable tasks: {listing}"
            )
            return
        super().__init__(
            f"unknown task {shown(name)}; register it with @engine.task first. Known tasks: {listing}"
        )


class InvalidParams(TaskwatchError, ValueError):
    """Params did not validate against the task's pydantic model. Nothing was queued."""

    def __init__(self, task: str, errors: list[dict[str, Any]]) -> None:
        self.task = task
        #: pydantic's error list (``ValidationError.errors()``), JSON-serialisable.
        self.errors = errors
        lines = []
        for err in errors:
            loc = ".".join(str(part) for part in err.get("loc", ())) or "(params)"
            lines.append(f"  {loc}: {err.get('msg', 'invalid')}")
        super().__init__(
            f"invalid params for task {task!r}; nothing was queued. Fix these fields:\n"
            + "\n".join(lines)
        )


class QueueFull(TaskwatchError):
    """A bounded queue is at its limit; the item was not accepted."""

    def __init__(
        self, queue: str, limit: int, waiting: int | None = None, *, option: str | None = None, adding: int = 1
    ) -> None:
        self.queue = queue
        self.limit = limit
        raise_it = "its limit" if option is None else f"its limit ({option})"
        #: how many items wait: more than ``limit`` where items taken up from a store are never held back
        self.waiting = limit if waiting is None else waiting
        #: whether ``waiting`` was counted (False: a store that does not say took it to be ``limit``)
        self.counted = waiting is not None
        #: how many items were given at once (a batch: ``submit_many``)
        self.adding = adding
        if adding > 1 and waiting is None:
            super().__init__(
                f"{queue} has no room for the {adding} items given at once (its limit is {limit}); nothing was "
                f"queued. Give fewer at once, retry once it has drained, or raise {raise_it}"
            )
        elif adding > 1 and self.waiting < limit:
            room = limit - self.waiting
            super().__init__(
                f"{queue} has room for {room} more ({self.waiting} of {limit} waiting), not the {adding} given "
                f"at once; nothing was queued. Give at most {room} at once, retry once it has drained, or raise {raise_it}"
            )
        elif self.waiting > limit:
            super().__init__(
                f"{queue} is full ({self.waiting} items waiting, more than its limit of {limit}: jobs "
                "taken up from the store count too); nothing was queued. Retry once it has drained "
                f"below its limit, or raise {raise_it}"
            )
        else:
            super().__init__(
                f"{queue} is full ({limit} {'item' if limit == 1 else 'items'} waiting); nothing was queued. "
                f"Retry later, or raise {raise_it}"
            )


class RunNotFound(TaskwatchError, LookupError):
    """No run with that id is known (never submitted, or evicted from history)."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"no run with id {run_id!r}; it was never submitted here or has been evicted "
            "from history (raise Engine(history=...) to keep more)"
        )


class RunNotCancellable(TaskwatchError):
    """Cancel was asked for a run that has already finished."""

    def __init__(self, run_id: str, status: str) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(f"run {run_id} is already {status}; only pending or running runs can be cancelled")


class RunNotRetryable(TaskwatchError):
    """Retry was asked for a run that is not finished."""

    def __init__(self, run_id: str, status: str, reason: str | None = None) -> None:
        self.run_id = run_id
        self.status = status
        super().__init__(
            f"run {run_id} cannot be retried: {reason}"
            if reason
            else f"run {run_id} is {status}; only failed or cancelled runs can be retried"
        )


class EngineNotRunning(TaskwatchError, RuntimeError):
    """The engine is not started, or is stopping, so it accepts no work."""

    def __init__(self, state: str, message: str | None = None) -> None:
        self.state = state
        if message is None:
            if state == "stopping":
                # (the advice to start it would be wrong: its stop is under way)
                message = (
                    "the engine is stopping and accepts no new work (what it holds drains until the "
                    "stop's timeout); give it work again once it has been started again"
                )
            else:
                message = (
                    f"the engine is {state} and accepts no work; use `async with engine:` "
                    "or `await engine.start()` first"
                )
        super().__init__(message)


class EngineLoopClosed(EngineNotRunning):
    """The event loop the engine was started on closed under it, without ``engine.stop()``.

    An ``asyncio.run()`` that returned, say: ``asyncio.run(engine.start())`` and then
    ``asyncio.run(main())``. The engine's loops and runs ended with that loop, so nothing
    would ever take up new work; it is refused at once instead of waiting for good.
    Nothing was done.
    """

    def __init__(self) -> None:
        super().__init__(
            "loop closed",
            "the event loop this engine was started on has closed without engine.stop(), or before "
            "it finished (did an asyncio.run() return?): its loops and runs ended with that loop, and nothing would take up "
            "new work; nothing was done. Keep an engine on one loop for its life: start and stop it in "
            "the coroutine that uses it (`async with engine:` inside the one asyncio.run()), or use "
            "engine.start_background() to call it from plain code. `await engine.stop()` tidies this "
            "one up (its store is closed); it cannot start again: build a new Engine",
        )


class EngineInAnotherProcess(EngineNotRunning):
    """The engine runs in the process this one was forked from (``os.fork()``, a pre-forking
    server such as gunicorn with ``--preload``, ``multiprocessing`` with the fork method).

    Its event loop and loop thread did not come along into the fork, so nothing here could
    ever answer a call; it raises at once instead of waiting for an answer that never comes.
    Nothing was done, in this process or in the other one.
    """

    def __init__(self, started_in: int) -> None:
        self.started_in = started_in
        super().__init__(
            "forked",
            f"this engine was started in process {started_in}, and this process (pid {os.getpid()}) is a "
            "fork of it: the engine's event loop and its thread stay in that process, so nothing here can "
            "run or answer for it. Start the engine after the fork, in each process that needs one (it may "
            "be built and its tasks registered before): with gunicorn --preload, in a post_fork hook or the "
            "app's startup, not at import",
        )


class EngineAlreadyRunning(TaskwatchError, RuntimeError):
    """``start_background()`` on an engine already started (or starting, or stopping)
    elsewhere: under another ``BackgroundEngine``, or on another event loop. Nothing was started."""

    def __init__(self, state: str, holder: str | None = None) -> None:
        self.state = state
        self.holder = holder
        if holder is not None:
            said = (
                f"the engine is already {state} under {holder}; use the `bg` that start_background() "
                "returned then, or call bg.stop() first"
            )
        else:
            said = (
                f"the engine is already {state} on another event loop (`await engine.start()` or "
                "`async with engine:` there, or start_background()'s thread); use it on that loop "
                "(through the `bg` that start_background() returned), or stop it there (bg.stop()) first"
            )
        super().__init__(said + "; nothing was started")


class StoppedBeforeDone(EngineNotRunning):
    """The engine stopped while a wait was open, before what it waited for was done.

    With a durable store the work is kept (``kept``) and goes on at the next
    start; with the memory store it was dropped, counted where it was.
    """

    def __init__(self, what: str, kept: bool, elsewhere: str | None = None) -> None:
        self.state = "stopped"
        self.what = what
        self.kept = kept
        #: the node executing it when this one stopped: it goes on there
        self.elsewhere = elsewhere
        if elsewhere is not None:
            then = (
                f"it goes on on node {elsewhere}, which shares the store; read how it ended with "
                "fetch_run() once the engine runs again, or on another node"
            )
        elif kept:
            then = "kept in the store for the next start; wait again once the engine runs"
        else:
            then = "dropped (counted in the engine's stats)"
        RuntimeError.__init__(self, f"the engine stopped before {what} finished: {then}")


class NotLeader(TaskwatchError):
    """This node does not hold the leader lease (or lost it); stop destructive work."""

    def __init__(self, node_id: str, holder: str | None, reason: str | None = None, *, lapsed: bool = False) -> None:
        self.node_id = node_id
        self.holder = holder
        self.reason = reason
        #: this node led, and its lease ran out (a pause, a slow store) before it was renewed
        self.lapsed = lapsed
        if lapsed:
            held = "its lease lapsed before it was renewed"
        elif holder is not None and holder == node_id:
            # a process that never led here, seeing its own node id hold the lease: the one it
            # replaced (killed, restarted), whose lease the others wait out too
            held = (
                "the lease is held under this node id by an earlier process (one this process replaced); "
                "it is free once that lease runs out"
            )
        else:
            held = f"lease held by {holder!r}" if holder else "lease not held by anyone"
        why = f"; {reason}" if reason else ""
        super().__init__(
            f"node {node_id!r} is not the leader ({held}{why}); leader-only work must stop here"
        )


class UnknownPeriodic(TaskwatchError, LookupError):
    """No periodic task with that name is registered."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        listing = ", ".join(sorted(known)) or "none registered"
        super().__init__(f"no periodic task named {name!r}; known periodic tasks: {listing}")


class PeriodicNotRunnable(TaskwatchError):
    """``run_periodic`` was asked for a periodic task that cannot run now: a run of it is
    still pending or running (``run_id``), or its needs are unmet (``reason``). Nothing was queued."""

    def __init__(self, name: str, *, run_id: str | None = None, status: str | None = None,
                 reason: str | None = None) -> None:  # fmt: skip
        self.name = name
        #: the run still going, which a second one would overlap
        self.run_id = run_id
        self.status = status
        #: why the task is disabled (``missing resource: redis``)
        self.reason = reason
        if run_id is not None:
            super().__init__(
                f"periodic task {name!r} cannot be run now: its run {run_id} is still {status or 'going'}, "
                f"and runs of a periodic task never overlap; nothing was queued. Wait for it to finish, "
                f"or cancel it (cancel({run_id!r})) and run the task again"
            )
        else:
            super().__init__(
                f"periodic task {name!r} cannot be run now: it is disabled ({reason}); nothing was queued. "
                "Give it what it needs (engine.provide(...), engine.set_flag(...)) and run it again"
            )


class UnknownQueue(TaskwatchError, LookupError):
    """No queue with that name was created with ``engine.queue``. Nothing was changed."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listing = ", ".join(self.known) or "none created"
        super().__init__(f"no queue named {name!r}; nothing was changed. Known queues: {listing}")


class UnknownTrigger(TaskwatchError, LookupError):
    """No trigger with that name was created with ``engine.trigger``. Nothing was changed."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listing = ", ".join(self.known) or "none created"
        super().__init__(f"no trigger named {name!r}; nothing was changed. Known triggers: {listing}")


class UnknownWorker(TaskwatchError, LookupError):
    """No supervised worker with that name is registered. Nothing was changed."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        listing = ", ".join(self.known) or "none registered"
        super().__init__(
            f"no supervised worker named {name!r}; nothing was changed. Known workers: {listing}"
        )


class WorkerNotLeading(NotLeader):
    """A leader-only supervised worker was asked to restart on a node that does not lead.

    It runs only on the leader, so it can be restarted only there; nothing was changed.
    """

    def __init__(self, worker: str, node_id: str, holder: str | None) -> None:
        self.worker = worker
        self.node_id = node_id
        self.holder = holder
        self.reason = "leader-only worker"
        held = f"the leader is {holder!r}" if holder else "no node leads right now"
        TaskwatchError.__init__(
            self,
            f"supervised worker {worker!r} is leader-only and node {node_id!r} does not lead "
            f"({held}), so it was not restarted; restart it on the leader",
        )


class InvalidConfiguration(TaskDefinitionError, ValueError):
    """An option given to the engine, a task, a loop or a worker is out of range.

    Raised when the option is given (registration or construction), never
    later at run time; nothing was registered. (One exception: what a
    ``run_id_factory`` returns is checked as each submit takes an id, and a
    bad one refuses that submit, queueing nothing.)
    """

    def __init__(self, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        super().__init__(f"invalid configuration for {where}: " + "; ".join(problems))


class InvalidStatus(TaskwatchError, ValueError):
    """A run status filter names no status. Nothing was selected."""

    def __init__(self, value: object, known: Iterable[str]) -> None:
        self.value = value
        super().__init__(f"{shown(value)} is not a run status; use one of {', '.join(known)}")


class UnknownEventKind(TaskwatchError, ValueError):
    """An events filter (``kinds=``) names a kind no event has. Nothing was subscribed."""

    def __init__(self, kind: object, why: str) -> None:
        self.kind = kind
        super().__init__(
            f"{why}; give kinds such as 'run.failed' (every kind is in EVENT_KINDS) or a prefix "
            "ending in '.' such as 'run.' (no wildcards); nothing was subscribed"
        )


class InvalidSubmission(TaskwatchError, ValueError):
    """An item of ``submit_many`` is not ``(task, params)`` nor a mapping of ``task``,
    ``params`` and ``key``. Nothing was queued."""

    def __init__(self, index: int, why: str) -> None:
        self.index = index
        super().__init__(
            f"item {index} of submit_many {why}; give (task, params) or "
            "{'task': ..., 'params': ..., 'key': ...}; nothing was queued"
        )


class InvalidQuery(TaskwatchError, ValueError):
    """A read's argument cannot select anything (a cursor not from a page, a ``since`` that
    is no time, a limit under 1): of a runs query, a snapshot, ``rates()`` or ``triggers()``.
    Nothing was read."""

    def __init__(self, problems: Iterable[str], what: str = "runs query") -> None:
        self.problems = list(problems)
        super().__init__(f"invalid {what}: " + "; ".join(self.problems))


class InvalidAddress(TaskwatchError, ValueError):
    """A control endpoint address cannot be used; nothing was opened or connected."""

    def __init__(
        self, address: object, why: str, advice: str = "use tcp://127.0.0.1:PORT, unix:/path/to/socket or a socket path"
    ) -> None:
        # a password written into the address (``postgresql://u:pw@db``) is never echoed
        self.address = shown_url(address) if isinstance(address, str) else address
        super().__init__(f"bad address {shown(self.address)}: {why}" + (f"; {advice}" if advice else ""))


class InvalidKey(TaskwatchError, TypeError, ValueError):
    """A dedup key (or trigger key) is not a JSON-safe string. Nothing was queued.

    A ``TypeError`` for a key that is no ``str``, and a ``ValueError`` as well: a ``str``
    holding a NUL or a lone surrogate is a bad value, which ``except ValueError`` expects to catch.
    """

    def __init__(self, owner: str, key: object, why: str) -> None:
        self.owner = owner
        self.key = shown(key)
        super().__init__(f"invalid key {self.key} for {owner}: {why}; nothing was queued")


class InvalidCount(TaskwatchError, ValueError):
    """An amount of work counted for a trigger key is not a whole number from 1 to 2**62. Nothing was counted."""

    def __init__(self, owner: str, n: object) -> None:
        self.owner = owner
        self.n = shown(n)
        super().__init__(
            f"invalid count {self.n} for {owner}: n must be an int from 1 to 2**62; nothing was counted"
        )


class InvalidProgress(TaskwatchError, ValueError):
    """A task reported progress that is not a finite number (or a message that is not text).
    The run's progress stays as it was."""

    def __init__(self, run_id: str, problems: Iterable[str], fields: Iterable[str] = ("done",)) -> None:
        self.run_id = run_id
        self.problems = list(problems)
        # the advice fits what was wrong: the numbers, the message, or both
        wrong = set(fields)
        wants = []
        if wrong - {"message"}:
            wants.append("done and total as finite numbers")
        if "message" in wrong:
            wants.append("the message as text (a str)")
        super().__init__(
            f"invalid progress for run {run_id}: {'; '.join(self.problems)}; report {' and '.join(wants)}, "
            "such as ctx.progress(3, 10, 'pages'); the run's progress is unchanged"
        )

    @classmethod
    def refused(cls, run_id: str, exc: ValidationError) -> InvalidProgress:
        """The error for a report the progress event's validation refused, a line per field."""
        errors = exc.errors()
        return cls(run_id, [
            f"{e['loc'][0]} {e['msg'].removeprefix('Input ').removeprefix('Value error, ')}, got {shown(e['input'])}"[:300]
            for e in errors
        ], [str(e["loc"][0]) for e in errors])  # fmt: skip


class EngineCrashed(EngineNotRunning):
    """The background engine's event loop died; this facade takes no more calls.

    ``cause`` is the exception that ended the loop; its traceback was logged
    when it happened. The engine itself was stopped on the way out, so
    ``engine.start_background()`` starts it again, with a new facade.
    """

    def __init__(self, cause: BaseException) -> None:
        try:
            text = str(cause)
        except BaseException:  # noqa: BLE001 - the cause is the user's: its __str__ may raise anything
            text = "<unprintable>"
        self.cause = f"{type(cause).__qualname__}: {text}"
        TaskwatchError.__init__(
            self,
            f"the engine's event loop died ({self.cause}) and this BackgroundEngine accepts no more "
            "calls; fix the cause, then start the engine again with engine.start_background() and "
            "make your calls on the BackgroundEngine it returns",
        )
        self.state = "failed"


class ProtocolError(TaskwatchError, ValueError):
    """A wire message could not be decoded or is not allowed."""


class MalformedMessage(ProtocolError):
    """A wire message is not valid JSON, or does not match any message model."""

    reason = "malformed"


class MessageTooLarge(ProtocolError):
    """A wire message is longer than the receiver's ``max_message`` limit.

    Raised by a ``RemoteEngine`` command over the engine's limit, ``sent`` is False:
    the command was not sent, so the engine did nothing.
    """

    reason = "oversized"
    sent: bool = False

    def __init__(self, size: int, limit: int, setting: str = "max_message", *, head: bytes = b"") -> None:
        self.size = size
        self.limit = limit
        #: the first bytes of the message (as many as were read): where its id may be found
        self.head = head
        super().__init__(
            f"message of {size} bytes exceeds the {limit}-byte limit and was discarded; "
            f"send smaller messages or raise {setting}"
        )


class UnknownCommand(ProtocolError):
    """A wire message has a ``type`` this side does not understand (or not at this point)."""

    reason = "unknown"


class IncompatibleVersion(ProtocolError):
    """The two ends of a connection speak different protocol versions."""

    reason = "version"

    def __init__(self, ours: int, theirs: object) -> None:
        self.ours = ours
        self.theirs = theirs
        super().__init__(
            f"peer speaks protocol version {shown(theirs)}, this side speaks {ours}; "
            "install the same taskwatch version on both ends"
        )


class AuthenticationFailed(TaskwatchError, PermissionError):
    """A control connection presented a missing or wrong token; it was disconnected.

    ``token_given`` (when known) says which: the message then names it. Either way the
    message says where the engine's token goes.
    """

    def __init__(self, message: str | None = None, *, token_given: bool | None = None) -> None:
        if message is None:
            if token_given is None:
                what = "missing or wrong token"
            elif token_given:
                what = "the token given is not this engine's"
            else:
                what = "no token was given, and this engine requires one"
            message = (
                f"authentication failed: {what}. Pass the token the engine was served with (its "
                "token=, or the server's .token if generated): RemoteEngine(address, token=...), or "
                "$TASKWATCH_TOKEN or --token-file PATH for taskwatch attach"
            )
        super().__init__(message)


class RemoteError(TaskwatchError):
    """A remote engine reported an error this client has no matching class for."""

    def __init__(self, error_type: str, message: str, details: dict[str, Any] | None = None) -> None:
        self.error_type = error_type
        self.details = dict(details or {})
        super().__init__(f"{error_type}: {message}")


class ConnectionClosed(TaskwatchError, ConnectionError):
    """The connection to a remote engine closed (or was never opened).

    Raised by a ``RemoteEngine`` call, its ``sent`` attribute says whether the
    command had been sent: if so, the engine may still carry it out.
    """

    sent: bool = False


class CommandTimeout(TaskwatchError, TimeoutError):
    """A ``RemoteEngine`` command did not end within the client's ``timeout``: no reply
    came, or the engine read nothing more, so the command could not be sent.

    A ``TimeoutError``, so ``except TimeoutError`` catches it. ``sent`` says whether
    the command had been sent: if so, the engine may still carry it out.
    """

    # RemoteEngine always says; one that does not is taken as sent, as a dashboard takes a
    # timeout that does not say: "maybe done" is the answer that loses no run
    sent: bool = True


class EngineUnreachable(TaskwatchError, ConnectionError):
    """``RemoteEngine.connect`` found no engine answering at its address.

    ``__cause__`` is the operating system's error (or the timeout); ``reason``
    says it in words, ``check`` what to look at.
    """

    def __init__(self, address: str, reason: str, check: str) -> None:
        self.address = address
        self.reason = reason
        self.check = check
        super().__init__(
            f"cannot reach an engine at {address}: {reason}. Is one serving there "
            f"(engine.serve({address!r}) in its process, or `taskwatch APP --serve {address}`)? {check}"
        )


class LoopThreadError(TaskwatchError, RuntimeError):
    """An object was used from an event loop or thread it cannot serve: a blocking
    ``BackgroundEngine`` call from the engine's own loop thread, a ``RemoteEngine``
    from a loop other than the one it connected on, a bus subscription awaited on
    another loop than the engine's, or an ``Engine`` method that queues
    runs (``submit``, ``submit_many``, ``submit_nowait``, ``retry``, ``run_periodic``)
    from a thread other than its loop's; nothing was queued then (``method`` names the
    method, ``message`` says what to call instead)."""

    def __init__(self, method: str, message: str | None = None) -> None:
        self.method = method
        super().__init__(
            message
            or f"BackgroundEngine.{method}() blocks until the engine's loop answers, and this is "
            "that loop's own thread, so it would wait forever. Code running on the engine's "
            "loop should call the Engine itself, or await the `a`-prefixed variant"
        )


class JobNotSerializable(TaskwatchError, TypeError):
    """A queue job is neither a pydantic model nor JSON-serialisable. Nothing was queued."""

    def __init__(self, queue: str, type_name: str, detail: str) -> None:
        self.queue = queue
        self.type_name = type_name
        article = "an" if type_name[:1].lower() in ("a", "e", "i", "o", "u") else "a"
        super().__init__(
            f"{article} {type_name} job cannot be put into queue {queue!r}: jobs must be pydantic models "
            f"or JSON-serialisable values (dicts, lists, str, numbers); nothing was queued ({detail})"
        )


class InvalidJob(TaskwatchError, ValueError):
    """A queue job did not validate against the pydantic model its handler's job parameter is
    annotated with. Nothing was queued."""

    def __init__(self, queue: str, model: str, errors: list[dict[str, Any]]) -> None:
        self.queue = queue
        self.model = model
        #: pydantic's error list (``ValidationError.errors()``), without the input values
        self.errors = errors
        lines = []
        for err in errors:
            loc = ".".join(str(part) for part in err.get("loc", ())) or "(job)"
            lines.append(f"  {loc}: {err.get('msg', 'invalid')}")
        super().__init__(
            f"invalid job for queue {queue!r}: its handler takes a {model}; nothing was queued. "
            "Fix these fields:\n" + "\n".join(lines)
        )


class TooManyConnections(TaskwatchError, ConnectionError):
    """A control server refused a connection because it already serves its limit."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"the engine already serves {limit} dashboard connections; close one, "
            "or serve with a higher max_connections"
        )


class WeakToken(TaskwatchError, ValueError):
    """A control server was given a token too short to resist guessing."""

    def __init__(self, length: int, minimum: int) -> None:
        self.length = length
        self.minimum = minimum
        super().__init__(
            f"the control token is {length} bytes; it must be at least {minimum}. Use "
            "secrets.token_urlsafe(32), or omit the token (over TCP one is then generated: the "
            "server's .token; a Unix socket is already private to your user)"
        )


class TooManyHandshakes(TaskwatchError, ConnectionError):
    """A control server dropped a connection that had not authenticated, to make room for a newer one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(
            f"{limit} connections were already waiting to authenticate and this one had waited "
            "longest, so it was closed; send hello as soon as you connect, or serve with a "
            "higher max_handshakes"
        )


class ReplyTooLarge(TaskwatchError):
    """A reply would be longer than its connection's line limit, so it was not sent."""

    def __init__(self, what: str, size: int, limit: int) -> None:
        self.what = what
        self.size = size
        self.limit = limit
        super().__init__(
            f"{what} is {size} bytes, over this connection's {limit}-byte line limit, so it was "
            "not sent; read it in the engine's own process, or raise the server's max_send "
            "and the client's max_message"
        )


#: what each of taskwatch's optional extras installs (pyproject.toml's optional-dependencies;
#: a test holds the two equal). Errors name the packages themselves: taskwatch is installed
#: from its source, and ``pip install 'taskwatch[redis]'`` would fetch another project of
#: that name from PyPI
EXTRAS = {
    "web": "textual-serve>=1.1,<1.2",
    "postgres": "asyncpg>=0.30",
    "redis": "redis>=5.0",
}


def install_hint(extra: str) -> str:
    """How to install what taskwatch's optional ``extra`` needs, into the running environment."""
    return f"pip install '{EXTRAS[extra]}' (taskwatch's {extra!r} extra)"


class MissingDependency(TaskwatchError, ImportError):
    """An optional feature was used without the package it runs on."""

    def __init__(self, feature: str, package: str, extra: str) -> None:
        self.feature = feature
        self.package = package
        self.extra = extra
        super().__init__(
            f"{feature} needs the {package!r} package, which is not installed; "
            f"install it with: {install_hint(extra)}"
        )


class LeaseUnavailable(TaskwatchError, ConnectionError):
    """The store that keeps the leader lease cannot be reached right now.

    No leadership is held or granted while it is unreachable; the elector keeps
    trying, with backoff, and leads again once an acquire succeeds.
    """

    def __init__(self, where: str, cause: str, retry_in: float) -> None:
        self.where = where
        self.cause = cause
        self.retry_in = retry_in
        super().__init__(
            f"the lease store {where} cannot be reached ({cause}); next attempt in "
            f"{retry_in:.3g} s. Check that it is running and reachable from this host"
        )


class LeaseRefused(TaskwatchError):
    """The store that keeps the leader lease answered, but refuses this lease: a wrong user or
    password, a database (or Redis database index) that does not exist, a connection option
    the server does not know, a table of another application's.

    Unlike :class:`LeaseUnavailable` it does not pass by itself. ``engine.start()`` raises it
    when the first election meets it (nothing is started); met later, the node stops leading,
    ``leadership().backend`` says ``refused: <cause>`` and the elector keeps trying.
    """

    def __init__(self, where: str, cause: str) -> None:
        self.where = where
        self.cause = cause
        super().__init__(
            f"the lease store {where} refused the lease ({cause}). Check the lease's URL (user, "
            "password, database, options) against the server's settings"
        )


class RelayRefused(TaskwatchError):
    """The server that carries cluster-wide events answered, but refuses this relay: a wrong
    user or password, a Redis database index the server does not have. Unlike an outage it does
    not pass by itself: the relay's start (the engine's, a dashboard's) raises it."""

    def __init__(self, where: str, cause: str) -> None:
        self.where = where
        self.cause = cause
        super().__init__(
            f"the event stream's server {where} refused this relay ({cause}). Check the URL (user, "
            "password, database, options) against the server's settings"
        )


# ---------------------------------------------------------------- run stores


class StoreError(TaskwatchError):
    """Base class of the errors a run store raises."""


class UnknownStore(StoreError, ValueError):
    """``make_store`` was given a spec it does not understand."""

    def __init__(self, spec: object, detail: str = "") -> None:
        # a URL's password never reaches a message, a log or a traceback
        self.spec = shown_url(spec) if isinstance(spec, str) else spec
        super().__init__(
            f"unknown run store {shown(self.spec)}{': ' + detail if detail else ''}; use 'memory', "
            "'sqlite:///relative/path.db', 'sqlite:////absolute/path.db' (optionally "
            "'?synchronous=full&busy_timeout=5000'), 'postgresql://user@host/database' "
            "(optionally '?pool_size=8') or pass a Store instance"
        )


class StoreDriverMissing(StoreError, ImportError):
    """The store asked for needs a database driver that is not installed."""

    def __init__(self, store: str, driver: str, extra: str) -> None:
        self.extra = extra
        super().__init__(
            f"the {store} run store needs the {driver} driver, which is not installed; "
            f"install it with: {install_hint(extra)}"
        )


class SchemaTooNew(StoreError):
    """The database was written by a newer taskwatch than this one."""

    def __init__(self, where: str, found: int, supported: int) -> None:
        self.where = where
        self.found = found
        self.supported = supported
        super().__init__(
            f"the run store {where} has schema version {found}, but this taskwatch only knows "
            f"versions up to {supported}; install the newer taskwatch that wrote it (from its source: "
            "`pip install /path/to/taskwatch`; `pip install taskwatch` fetches another project of that name) "
            "on every node that opens it. Nothing was changed"
        )


class SchemaInUse(StoreError):
    """The store would be migrated to this taskwatch's schema under nodes of an earlier one that
    still run on it (``nodes``: their node ids): their writes would fail from then on, and what
    they counted would be lost. Nothing was changed."""

    def __init__(self, where: str, found: int, supported: int, nodes: list[str], node_ttl: float) -> None:
        self.where = where
        self.found = found
        self.supported = supported
        self.nodes = nodes
        super().__init__(
            f"the run store {where} has schema version {found}, which this taskwatch would migrate to "
            f"{supported}, but node(s) {', '.join(nodes)} of an earlier taskwatch still run on it (a "
            f"heartbeat less than node_ttl={node_ttl:g} s ago): migrated under them, their writes would "
            "fail and what they counted would be lost. Stop every node of the earlier version first (a "
            "crashed one counts as gone node_ttl after its last heartbeat), then start this one. Nothing "
            "was changed"
        )


class NotATaskwatchStore(StoreError):
    """The store's file (or PostgreSQL schema) already holds another application's tables:
    taskwatch refuses it whole. ``advice``: where to put taskwatch instead (default: SQLite's)."""

    def __init__(self, where: str, tables: Iterable[str], *, advice: str | None = None) -> None:
        self.where = where
        self.tables = list(tables)
        shown = ", ".join(self.tables[:10])
        if len(self.tables) > 10:
            shown += f" and {len(self.tables) - 10} more"
        super().__init__(
            f"the run store {where} is not a taskwatch database: it has tables taskwatch did not "
            f"create ({shown}); nothing was changed. "
            + (advice or "Give taskwatch a file of its own, e.g. a new path (sqlite:///taskwatch.db), "
               "which is created at start")
        )


class StoreClosed(StoreError, RuntimeError):
    """An operation reached a store that is not open."""

    def __init__(self, where: str) -> None:
        self.where = where
        # most users never handle the store: the engine opens it at start and closes it at stop
        super().__init__(
            f"the run store {where} is not open; start the engine that uses it (`async with engine:` "
            "or `await engine.start()`) first, or, for a store used on its own, `async with store:` "
            "or `await store.open()`"
        )


class StoreBusy(StoreError):
    """Another process held the database's write lock longer than ``busy_timeout``."""

    def __init__(self, where: str, timeout_ms: int, locked_for: float | None = None) -> None:
        #: how long the file has stayed locked, as far as this process has waited for it (seconds)
        self.locked_for = timeout_ms / 1000 if locked_for is None else max(locked_for, timeout_ms / 1000)
        if self.locked_for > timeout_ms / 1000 * 1.5:
            # an operation that came while another waited for the lock waited for both
            how_long = (
                f"for {self.locked_for:.1f} s so far (each try waits up to busy_timeout, {timeout_ms} ms, and an "
                "operation that arrived while another try waited waited for both)"
            )
        else:
            how_long = f"for more than {timeout_ms} ms"
        super().__init__(
            f"the run store {where} stayed locked by another process {how_long}; "
            "nothing was written. Retry, raise busy_timeout (sqlite:///...?busy_timeout=MS), or "
            "check for a process holding a long transaction"
        )


class StoreUnavailable(StoreError):
    """The store's backend failed (disk full, file removed, I/O error); ``__cause__`` says how."""

    def __init__(self, where: str, detail: str, advice: str = "Check the disk and the file, then restart the engine") -> None:
        super().__init__(f"the run store {where} failed: {detail}; the operation was not applied. {advice}")


class StoreGaveUp(StoreUnavailable):
    """The store was still out of reach when its stopping engine's time for last writes ran out.

    Whether the operation was applied is unknown (its answer may be what was
    lost). Nothing is lost for good: a run whose outcome was not written is
    recovered (and run again) once its claim lapses, as after a crash.
    """

    def __init__(self, where: str, detail: str) -> None:
        StoreError.__init__(
            self,
            f"the stopping engine's time for its last writes to the run store {where} ran out before the "
            f"store answered ({detail}); whether the operation was applied is unknown. Runs it left "
            "unwritten are recovered once their claims lapse",
        )


class DuplicateRunId(StoreError, ValueError):
    """``insert`` was given an explicit id that a stored run already has."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        super().__init__(
            f"a run with id {run_id!r} is already stored; nothing was inserted. Ids must be unique: "
            "make the engine's run_id_factory return ids never used before (or leave it unset for "
            "random ones); given to a store directly, leave NewRun.id unset for a random one"
        )
