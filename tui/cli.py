"""The ``taskwatch`` command line.

    taskwatch                          demo engine + dashboard
    taskwatch PACKAGE.MODULE[:ATTR]    your Engine (or a function returning one) + dashboard;
                                       ATTR defaults to `engine`, as uvicorn looks for `app`
    taskwatch attach ADDRESS [--token-file PATH]      (or $TASKWATCH_TOKEN)
    taskwatch attach postgresql://... [--lease NAME] | redis://... [--stream KEY]   the whole cluster
    taskwatch web [APP | attach ADDRESS [--token-file PATH]] [--host H] [--port P]
    taskwatch [APP] --plain [--seconds S]   the demo's (or APP's) events printed, no dashboard

Tokens travel in $TASKWATCH_TOKEN or a 0600 file, never on a child's command
line, where ``ps`` shows them to every local user. ``--token T`` still works for
compatibility, with that exposure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import inspect
import math
import os
import select
import shlex
import signal
import stat
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from taskwatch.engine import (
    AuthenticationFailed,
    Engine,
    EngineUnreachable,
    InvalidAddress,
    RemoteEngine,
    TaskwatchError,
    WeakToken,
    __version__,
)
from taskwatch.engine.errors import install_hint
from taskwatch.engine.server import MIN_TOKEN_BYTES
from taskwatch.engine.wire import TcpAddress, UnixAddress, parse_address, parse_connect_address

from .demo import demo_failures_unlogged
from .held_logs import HeldTerminalLogs

if TYPE_CHECKING:
    import socket

    from taskwatch.engine.background import BackgroundEngine
    from textual.app import App

    from .web import DashboardServer


#: the attribute looked up when an app path has no ``:ATTRIBUTE``
DEFAULT_ATTRIBUTE = "engine"


class AppPathError(Exception):
    """A PACKAGE.MODULE:ATTRIBUTE path that does not lead to an Engine."""


def load_engine(path: str) -> Engine:
    """Import ``PACKAGE.MODULE:ATTRIBUTE`` and return the Engine it names.

    The attribute may be an :class:`Engine` or a callable returning one; without
    ``:ATTRIBUTE`` it is ``engine``. The current directory is importable, as
    with ``python -m``.
    """
    module_name, sep, attr = path.partition(":")
    named = bool(sep)
    if not sep:
        attr = DEFAULT_ATTRIBUTE
    if not module_name or not attr:
        raise AppPathError(f"expected PACKAGE.MODULE:ATTRIBUTE, got {path!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise AppPathError(f"module {exc.name!r} not found (from {path!r})") from None
        raise AppPathError(f"importing {module_name!r} failed: {exc}") from None
    except Exception as exc:  # the user's module raised while importing
        raise AppPathError(f"importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            if not named:
                raise AppPathError(
                    f"module {module_name!r} has no attribute {attr!r}; name the engine: {module_name}:ATTRIBUTE"
                ) from None
            raise AppPathError(f"module {module_name!r} has no attribute {attr!r}") from None
    called = callable(target) and not isinstance(target, Engine)
    if called:
        if inspect.iscoroutinefunction(target):
            raise AppPathError(
                f"{path!r} is an async function; make the factory a plain def that builds the Engine "
                "and returns it (the dashboard starts it)"
            )
        try:
            target = target()
        except Exception as exc:
            raise AppPathError(f"calling {path!r} failed: {type(exc).__name__}: {exc}") from None
    if inspect.isawaitable(target):
        if inspect.iscoroutine(target):
            target.close()  # never awaited, and said so here rather than in a RuntimeWarning
        raise AppPathError(f"calling {path!r} returned an awaitable; return the Engine itself from a plain def")
    if not isinstance(target, Engine):
        found = f"calling {path!r} returned" if called else f"{path!r} is"
        raise AppPathError(f"{found} {_described(target)}, not a taskwatch Engine")
    return target


def _described(value: object) -> str:
    """``value``'s kind as a sentence names it: "an object of type int", never "a int"."""
    if value is None:
        return "None"  # a factory that forgot its `return`
    if inspect.ismodule(value):
        return "a module"
    return f"an object of type {type(value).__qualname__}"


def _main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskwatch",
        description="Run and watch background work: an asyncio task engine with a live dashboard.",
        epilog="Also: `taskwatch attach ADDRESS [--token-file PATH]` and "
        "`taskwatch web [APP | attach ADDRESS] [--host H] [--port P]`.",
    )
    parser.add_argument(
        "app",
        nargs="?",
        help="PACKAGE.MODULE:ATTRIBUTE naming your Engine (ATTRIBUTE defaults to `engine`; default: the demo)",
    )
    parser.add_argument("--version", action="version", version=f"taskwatch {__version__}")
    parser.add_argument("--seed", type=int, default=None, help="seed for the demo's random choices")
    parser.add_argument(
        "--plain", action="store_true", help="print the engine's events, one a line, instead of opening the dashboard"
    )
    parser.add_argument("--seconds", type=float, default=None, help="with --plain: stop after this many seconds")
    parser.add_argument("--serve", metavar="ADDRESS", default=None, help="also serve the engine for `taskwatch attach`")
    _add_confirm_option(parser)
    _add_token_options(parser, "with --serve: ")
    parser.add_argument(
        "--store",
        metavar="URL",
        default=None,
        help="where the demo keeps its runs: memory (default) or sqlite:///path/file.db, "
        "which keeps history and queued work across restarts (an app's Engine(store=...) says where its own live)",
    )
    return parser


TOKEN_ENV = "TASKWATCH_TOKEN"
#: `attach redis://`'s stream and `attach postgresql://`'s lease when not given (the engine's defaults)
DEFAULT_STREAM = "taskwatch:events"
DEFAULT_LEASE = "leader"


def _add_confirm_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-confirm",
        dest="confirm",
        action="store_false",
        help="cancel runs without asking first (the dashboard asks by default, naming the run)",
    )


def _add_token_options(parser: argparse.ArgumentParser, only: str = "") -> None:
    """--token and --token-file; ``only`` starts their help with where they apply ("with --serve: ")."""
    parser.add_argument(
        "--token",
        default=None,
        help=f"{only}access token; visible to every local user in `ps`, so prefer ${TOKEN_ENV} or --token-file",
    )
    parser.add_argument(
        "--token-file",
        metavar="PATH",
        default=None,
        help=f"{only}read the access token from PATH, which only you may read (chmod 600)",
    )


def _attach_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskwatch attach",
        description="Open the dashboard on an engine served elsewhere.",
        epilog=f"The token is taken from --token-file or --token (one of them, not both), else ${TOKEN_ENV}.",
    )
    parser.add_argument(
        "address",
        help="a Unix socket path, tcp://127.0.0.1:PORT, postgresql://USER@HOST/DB for a whole cluster "
        "on PostgreSQL (its nodes, runs and events: nodes made with events='postgres'), or "
        "redis://HOST:PORT/DB for the cluster's events (engines made with events='redis://...')",
    )
    # None when not given, so that one given where it does not apply is refused, not ignored
    parser.add_argument(
        "--stream", default=None, help=f"with redis://: the event stream's key (default {DEFAULT_STREAM})"
    )
    parser.add_argument(
        "--lease",
        default=None,
        help=f"with postgresql://: the name of the nodes' PostgresLease (default {DEFAULT_LEASE}; '' for none)",
    )
    _add_token_options(parser)
    _add_confirm_option(parser)
    return parser


def _web_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskwatch web",
        description="Serve the dashboard in a browser (textual-serve). Open the printed URL: "
        "it carries a secret made for this launch, and nothing is served without it. "
        "APP (default: the demo) runs here, once; every browser tab watches that one engine.",
    )
    parser.add_argument("target", nargs="*", help="APP, or: attach ADDRESS")
    _add_token_options(parser, "with attach ADDRESS (an engine's tcp:// or Unix socket address): ")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000; 0 picks a free one)")
    return parser


class TokenError(Exception):
    """A token option that cannot be used as given."""


#: how long ``--token-file`` waits for a pipe's writer (``<(pass show x)``) to give the token
TOKEN_PIPE_TIMEOUT = 30.0
#: more than this is no token: a path given by mistake (a log, a device) is refused, not read whole
TOKEN_MAX_BYTES = 64 * 1024


def read_token_file(path: str, pipe_timeout: float = TOKEN_PIPE_TIMEOUT) -> str:
    """The token in ``path`` (surrounding whitespace dropped); refuses a file others can access.

    ``path`` is a regular file or a pipe (``--token-file <(pass show taskwatch)``, or a FIFO
    something writes the token to); a pipe is read until its writer closes it, for at most
    ``pipe_timeout`` seconds. Permissions are read from the opened file, so the file checked
    is the file read; it is opened without blocking, as a FIFO nobody writes to would
    otherwise hold the open forever.
    """
    try:
        # (Windows has neither O_NONBLOCK nor FIFOs)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        pipe = stat.S_ISFIFO(st.st_mode)
        if not (stat.S_ISREG(st.st_mode) or pipe):
            raise TokenError(f"token file {path} is not a regular file or a pipe")
        if st.st_mode & 0o077:
            raise TokenError(
                f"token file {path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):04o}); "
                f"run: chmod 600 {shlex.quote(path)}"
            )
        data = _read_pipe(fd, path, pipe_timeout) if pipe else _read_regular(fd, path)
    except OSError as exc:
        raise TokenError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
    try:
        token = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenError(f"token file {path} is not text") from None
    if not token:
        raise TokenError(f"token file {path} is empty")
    return token


def _too_large(path: str) -> TokenError:
    return TokenError(f"token file {path} holds more than {TOKEN_MAX_BYTES // 1024} KiB: that is no token; check the path")


def _read_regular(fd: int, path: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
        size += len(chunk)
        if size > TOKEN_MAX_BYTES:
            raise _too_large(path)
    return b"".join(chunks)


def _read_pipe(fd: int, path: str, timeout: float) -> bytes:
    """What the pipe's writer writes until it closes its end, within ``timeout`` seconds.

    A FIFO nobody has opened for writing yet polls as not ready (and reads as empty): the
    wait covers a writer that starts after us, as ``echo $T > fifo &`` may."""
    deadline = time.monotonic() + timeout
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    chunks: list[bytes] = []
    size = 0
    if not poller.poll(min(timeout, 1.0) * 1000):
        # a FIFO whose writer has not come yet: say what this is waiting for, not hang mutely
        _say(f"waiting for the token on the pipe {path} (up to {timeout:g} s)…")
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(left * 1000):
            raise TokenError(
                f"no token came through the pipe {path} within {timeout:g} s "
                "(read until its writer closes it); write the token to it, or give a regular file (chmod 600)"
            )
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        size += len(chunk)
        if size > TOKEN_MAX_BYTES:
            raise _too_large(path)


def resolve_token(opts: argparse.Namespace) -> str | None:
    """--token-file, else --token, else $TASKWATCH_TOKEN, else None."""
    if opts.token_file is not None and opts.token is not None:
        raise TokenError("give --token or --token-file, not both")
    if opts.token_file is not None:
        return read_token_file(opts.token_file)
    return opts.token if opts.token is not None else os.environ.get(TOKEN_ENV) or None


def fail(message: str) -> int:
    print(f"taskwatch: {message}", file=sys.stderr)
    return 2


def check_serve_address(address: str, token: str | None) -> None:
    """Refuse what ``--serve ADDRESS`` (with ``token``) could not serve, before an engine starts.

    Raises ``ValueError`` (a :class:`WeakToken` for a short token) saying what to give instead.
    """
    target = parse_address(address)
    if isinstance(target, TcpAddress) and not target.is_loopback:
        raise ValueError(
            f"refusing to serve on non-loopback host {target.host!r}: the protocol is unencrypted and "
            "clients can submit and cancel work; use tcp://127.0.0.1:PORT (and an SSH tunnel)"
        )
    if isinstance(target, UnixAddress):
        directory = os.path.dirname(target.path) or "."
        if not os.path.isdir(directory):
            raise ValueError(f"cannot serve at {target.path}: directory {directory} does not exist; create it first")
    if token is not None and len(token.encode()) < MIN_TOKEN_BYTES:
        raise WeakToken(len(token.encode()), MIN_TOKEN_BYTES)


def weak_token_message(exc: WeakToken) -> str:
    """:class:`WeakToken`'s advice as it is true for ``taskwatch --serve``.

    The library announces a generated token when it serves; the dashboard shows it only in
    its "Attach command" dialog, never on a line of output, so the error's own wording
    ("generated and printed") would send the user looking for it in the terminal.
    """
    return (
        f"the control token is {exc.length} bytes; it must be at least {exc.minimum}. Use "
        "secrets.token_urlsafe(32), or give no token (over TCP the dashboard then makes one and shows "
        'it only in its "Attach command" dialog, ctrl+p; a Unix socket is already private to your user)'
    )


AttachKind = Literal["engine", "redis", "postgresql"]

#: how messages name each kind of `attach` address (never the address: a URL may hold a password)
_ATTACH_KIND_NAMES: dict[AttachKind, str] = {
    "engine": "an engine's address (tcp:// or a Unix socket)",
    "redis": "a redis:// address",
    "postgresql": "a postgresql:// address",
}
_ENGINE_ONLY = "an engine's tcp:// or Unix socket address (redis:// and postgresql:// take credentials in the URL)"
#: each `attach` option, the address kinds it applies to, and those kinds in words
ATTACH_OPTION_KINDS: dict[str, tuple[frozenset[AttachKind], str]] = {
    "--stream": (frozenset({"redis"}), "redis:// addresses (the key of the cluster's event stream)"),
    "--lease": (frozenset({"postgresql"}), "postgresql:// addresses (the name of the nodes' lease)"),
    "--token": (frozenset({"engine"}), _ENGINE_ONLY),
    "--token-file": (frozenset({"engine"}), _ENGINE_ONLY),
    "--no-confirm": (
        frozenset({"engine", "postgresql"}),
        "dashboards that cancel runs (on an engine's tcp:// or Unix socket address, or postgresql://; "
        "redis:// shows events only)",
    ),
}


#: every kind of address `attach` takes (``attach_kind`` and ``parse_connect_address`` spell them)
ATTACH_TAKES = (
    "`attach` takes tcp://, unix: (or a socket path), postgresql:// (or postgres://) and redis:// (or rediss://) "
    "addresses"
)
ATTACH_EXAMPLES = (
    "use tcp://127.0.0.1:PORT or a socket path for an engine, postgresql://USER@HOST/DB or redis://HOST:PORT/DB "
    "for a cluster"
)


def attach_kind(address: str) -> AttachKind:
    if address.startswith(("redis://", "rediss://")):
        return "redis"
    if address.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    return "engine"


def check_attach_address(address: str) -> None:
    """Raise ``ValueError`` unless ``address`` is something ``attach`` can connect to.

    A ``tcp://`` host that is not loopback is refused, as ``--serve`` refuses one: the
    protocol is plaintext, and the token would be the first thing to cross the network.
    """
    if attach_kind(address) == "engine":
        if "://" in address and not address.startswith(("tcp://", "unix:")):
            # the engine's own refusal names only what it can serve; attach also takes cluster URLs
            raise InvalidAddress(address, ATTACH_TAKES, ATTACH_EXAMPLES)
        target = parse_connect_address(address)
        if isinstance(target, TcpAddress) and not target.is_loopback:
            raise ValueError(
                f"refusing to attach to non-loopback host {target.host!r}: the protocol is unencrypted, "
                "so the token and every command would cross the network readable; forward a loopback "
                f"port over SSH (ssh -N -L 7070:127.0.0.1:{target.port} {target.host}) and attach to "
                "tcp://127.0.0.1:7070"
            )


def check_attach_options(address: str, given: Sequence[str]) -> None:
    """Raise ``ValueError`` naming the first of the ``given`` options that ``address`` would ignore."""
    kind = attach_kind(address)
    for option in given:
        kinds, applies_to = ATTACH_OPTION_KINDS[option]
        if kind not in kinds:
            raise ValueError(f"{option} applies only to {applies_to}, not to {_ATTACH_KIND_NAMES[kind]}")


def _given_token_options(opts: argparse.Namespace) -> list[str]:
    return [name for name, value in (("--token", opts.token), ("--token-file", opts.token_file)) if value is not None]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "attach":
        return _attach(_attach_parser().parse_args(args[1:]))
    if args and args[0] == "web":
        return _web(_web_parser().parse_args(args[1:]))
    opts = _main_parser().parse_args(args)
    if opts.seconds is not None and not opts.plain:
        return fail("--seconds goes with --plain (the dashboard runs until you quit it)")
    if opts.seconds is not None and not (math.isfinite(opts.seconds) and opts.seconds > 0):
        return fail(
            f"--seconds {opts.seconds:g} is not a number of seconds above 0; "
            "leave it out to print events until Ctrl-C"
        )
    if opts.plain and opts.serve:
        return fail("--serve goes with the dashboard, not --plain; to watch from elsewhere, serve from your app")
    if opts.plain and not opts.confirm:
        return fail("--no-confirm goes with the dashboard, not --plain (which only prints events: nothing asks to confirm)")
    if opts.app:
        # every option is used or refused: one silently ignored would show the demo's setup as the app's
        for given, name in ((opts.store, "--store"), (opts.seed, "--seed")):
            if given is not None:
                return fail(f"{name} is for the demo; {opts.app} builds its own Engine (and says where its runs live)")
    if not opts.serve and (token_options := _given_token_options(opts)):
        return fail(
            f"{token_options[0]} goes with --serve (the token `taskwatch attach` must give); "
            "nothing is served without it"
        )
    try:
        token = resolve_token(opts) if opts.serve else None
        if opts.serve:
            check_serve_address(opts.serve, token)
    except WeakToken as exc:
        return fail(weak_token_message(exc))
    except (TokenError, ValueError) as exc:
        return fail(str(exc))
    if opts.app:
        try:
            engine = load_engine(opts.app)
        except AppPathError as exc:
            return fail(str(exc))
    else:
        from .demo import build_demo_engine

        try:
            engine = build_demo_engine(opts.seed, store=opts.store or "memory")
        except TaskwatchError as exc:
            return fail(str(exc))
    with contextlib.nullcontext() if opts.app else demo_failures_unlogged():
        if opts.plain:
            return _print_plain(engine, opts.seconds)
        if not _has_terminal():
            # before the engine starts: its runs would start only to be stopped again
            return fail(NO_TERMINAL)
        return _run_local(engine, opts.serve, confirm=opts.confirm, token=token)


def _print_plain(engine: Engine, seconds: float | None) -> int:
    """Print the engine's events until ``seconds`` pass, the reader goes away, or a signal
    ends it: SIGTERM and SIGHUP (what cron, nohup and service managers send) stop the engine
    as Ctrl-C does, so a durable store's runs are handed back, not left `running`."""
    from .demo import print_events

    async def plain(catch: EndingSignals) -> None:
        stopping: list[asyncio.Task[None]] = []
        loop = asyncio.get_running_loop()

        def end(signum: int) -> None:
            if not stopping:  # a second signal does not cut the stop short
                stopping.append(asyncio.ensure_future(engine.stop()))

        def started(event: object) -> None:
            # Ctrl-C cuts a start short; once the engine runs it stops the engine as SIGTERM
            # does, so the stop's events (engine.stopped among them) are printed too
            catch.take_interrupts()
            catch.on_loop(loop, end)

        catch.on_loop(loop, end)
        engine.bus.add_callback(started, ["engine.started"])
        try:
            await print_events(engine, seconds)
        finally:
            if stopping:
                await stopping[0]

    with EndingSignals() as catch:
        try:
            asyncio.run(plain(catch))
        except KeyboardInterrupt:
            pass
        except BrokenPipeError:
            # the reader went away (`taskwatch --plain | head`): that ends the output, quietly;
            # stdout goes to devnull so the interpreter's final flush does not fail again
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except TaskwatchError as exc:
            return fail(str(exc))
        finally:
            catch.resume()
    if catch.signum is not None:
        return 128 + catch.signum
    return 128 + signal.SIGINT if catch.interrupted else 0


#: signals that end a dashboard as `q` does: the terminal is given back and the engine stopped
#: (the exit status is then 128 + the signal's number, as a shell reports a process it ended)
ENDING_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)
)


NO_TERMINAL_HERE = (
    "the dashboard needs a terminal, and stdin or stdout is not one (a pipe, a file, /dev/null); run it in a terminal"
)
NO_TERMINAL = f"{NO_TERMINAL_HERE}, or use --plain to print the events, or `taskwatch web` for a dashboard in the browser"


class EndingSignals:
    """While entered, SIGTERM and SIGHUP quit the dashboard :meth:`run` runs, as `q` does
    (or, through :meth:`on_loop`, whatever else a loop runs: the web server).

    Outside the dashboard (starting, and stopping the engine after it) they are only noted:
    killed there, the process would leave a durable store's runs `running` until recovery
    and the terminal in the dashboard's modes. A second one does not cut the stop short
    (it is bounded: SIGKILL is for not waiting at all). After :meth:`take_interrupts`,
    SIGINT (Ctrl+C) is handled too: it sets :attr:`interrupted`, not :attr:`signum`.
    """

    def __init__(self) -> None:
        #: the first ending signal that came, or None
        self.signum: int | None = None
        #: whether SIGINT came (only handled after take_interrupts())
        self.interrupted = False
        self._signals = ENDING_SIGNALS
        self._previous: dict[int, Any] = {}

    def _note(self, signum: int, frame: Any = None) -> None:
        if signum == signal.SIGINT:
            self.interrupted = True
        elif self.signum is None:
            self.signum = signum

    def _install(self) -> None:
        for sig in self._signals:
            previous = signal.signal(sig, self._note)
            self._previous.setdefault(sig, previous)

    def take_interrupts(self) -> None:
        """From now on, until this is left, Ctrl-C (SIGINT) is noted and (on a loop given to
        :meth:`on_loop`) quits, instead of raising: taken up once what Ctrl-C should still cut
        short (an engine's start) is done, before what it must not (the engine's stop, which
        cut short would leave a durable store's runs `running` and print a traceback)."""
        if signal.SIGINT not in self._signals:
            self._signals += (signal.SIGINT,)
            self._install()

    @property
    def came(self) -> bool:
        """Whether any of the signals handled came."""
        return self.signum is not None or self.interrupted

    def on_loop(self, loop: asyncio.AbstractEventLoop, end: Callable[[int], None]) -> None:
        """On ``loop``, each signal is noted and then calls ``end(signum)``, which may stop what
        the loop runs. Closing the loop puts the defaults back: call :meth:`resume` after it."""

        def on_signal(signum: int) -> None:
            self._note(signum)
            end(signum)

        for sig in self._signals:
            loop.add_signal_handler(sig, on_signal, sig)

    def resume(self) -> None:
        """Only note the signals again, once the loop given to :meth:`on_loop` has closed."""
        self._install()

    def __enter__(self) -> EndingSignals:
        self._install()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def run(self, app: App[Any], *, no_terminal: str = NO_TERMINAL) -> int:
        """Run ``app`` in this terminal until it quits; its exit status: 128 + the signal's
        number if an ending signal ended it, 1 if it crashed, else 0 (2, and ``no_terminal``
        said, if there is no terminal to run it in)."""
        if not _in_browser(app) and not _has_terminal():
            # Textual would draw to nothing and spin on a stdin that never blocks (cron, nohup)
            return fail(no_terminal)

        async def run_app() -> None:
            # on the loop (not a plain handler): it may tell the app to exit
            self.on_loop(asyncio.get_running_loop(), lambda signum: app.exit(return_code=128 + signum))
            if _in_browser(app):
                _quit_when_stdin_hangs_up(app)
            if self.signum is None:  # one that came while starting ends it before it takes the screen
                await app.run_async()

        # in a browser, the screen is not this process's terminal: nothing written there lands on it
        hold: contextlib.AbstractContextManager[object] = (
            contextlib.nullcontext() if _in_browser(app) else HeldTerminalLogs()
        )
        try:
            with hold:
                asyncio.run(run_app())
        finally:
            # closing the loop put the defaults back: the engine's stop must not be killed either
            self.resume()
        if self.signum is not None:
            return 128 + self.signum
        return app.return_code or 0


def _has_terminal() -> bool:
    """Whether stdin and stdout are both a terminal (a dashboard reads keys and draws there)."""
    try:
        return sys.stdin is not None and sys.stdout is not None and sys.stdin.isatty() and sys.stdout.isatty()
    except ValueError:  # closed
        return False


def _in_browser(app: App[Any]) -> bool:
    """Whether ``app`` runs under textual-serve (``taskwatch web``, ``bg.dashboard()``)."""
    from textual.drivers.web_driver import WebDriver

    return issubclass(app.get_driver_class(), WebDriver)


def _quit_when_stdin_hangs_up(app: App[Any]) -> None:
    """Quit ``app`` once nothing can write to its stdin any more.

    Under textual-serve its stdin is a pipe from the web server, whose end closes however
    the server ends: SIGKILL and the OOM killer included. Textual's web driver only stops
    reading then, and the dashboard would go on for good, attached to its engine with no
    screen (and no server left to end it).
    """
    loop = asyncio.get_running_loop()

    def watch() -> None:
        poller = select.poll()
        # no event asked for: a hang-up is reported all the same, and nothing is read (the driver reads)
        poller.register(0, 0)
        poller.poll()
        with contextlib.suppress(RuntimeError):  # the loop has closed: the app has ended already
            loop.call_soon_threadsafe(app.exit)

    threading.Thread(target=watch, name="taskwatch-stdin-hangup", daemon=True).start()


def run_dashboard(app: App[Any], *, no_terminal: str = NO_TERMINAL) -> int:
    """Run ``app`` in this terminal until it quits or SIGTERM or SIGHUP ends it; its exit status
    (2, and ``no_terminal`` said, when there is no terminal to run it in)."""
    with EndingSignals() as catch:
        return catch.run(app, no_terminal=no_terminal)


def _say(message: str) -> None:
    """A line on stderr, unless the terminal is gone (SIGHUP: its window was closed)."""
    try:
        print(f"taskwatch: {message}", file=sys.stderr, flush=True)
    except OSError:
        pass


#: how long quitting the dashboard lets runs still going finish before the engine stops them
STOP_TIMEOUT = 5.0

#: rounds of ``cancel_grace`` a run that ignores cancellation can hold a stop up: ``Engine.stop``'s
#: three (the background engine's loop then ends without waiting for it again)
CANCEL_ROUNDS = 3


def _stop_engine(bg: BackgroundEngine, timeout: float = STOP_TIMEOUT, *, announce: bool = True) -> None:
    """Stop the dashboard's engine; when runs are still going, say first what the wait is for
    and how long it can last, then again when the wait for them ends and they are cancelled
    (unless ``announce`` is False: a refusal already said, in its one line, why it ends)."""
    if not announce:
        bg.stop(timeout=timeout)
        return
    try:
        running = bg.stats().running
    except (TaskwatchError, TimeoutError):
        running = 0  # crashed, or too busy to say: the stop goes on all the same
    if not running:
        bg.stop(timeout=timeout)
        return
    runs = "1 run" if running == 1 else f"{running} runs"
    cancelling = CANCEL_ROUNDS * bg.engine.cancel_grace
    _say(
        f"stopping the engine: {runs} still running (up to {timeout:g} s to finish, then cancelled; "
        f"a run that ignores cancellation holds the stop up to {timeout + cancelling:g} s in all)…"
    )
    stopped = threading.Event()

    def say_when_cancelling() -> None:
        if not stopped.wait(timeout):
            _say(f"cancelling the runs still going after {timeout:g} s (up to {cancelling:g} s more)…")

    # a daemon: it says one line, or nothing when the stop ends first, and never holds the exit
    threading.Thread(target=say_when_cancelling, name="taskwatch-stop-notice", daemon=True).start()
    try:
        bg.stop(timeout=timeout)
    finally:
        stopped.set()


def _run_local(engine: Engine, serve: str | None, *, confirm: bool = True, token: str | None = None) -> int:
    with EndingSignals() as catch:
        status = _run_local_app(engine, serve, catch, confirm=confirm, token=token)
    # one that came while the engine started or stopped ended the process too
    return status if catch.signum is None else 128 + catch.signum


def _run_local_app(
    engine: Engine, serve: str | None, catch: EndingSignals, *, confirm: bool, token: str | None
) -> int:
    from .app import TaskwatchApp
    from .client import LocalClient

    try:
        bg = engine.start_background()
    except KeyboardInterrupt:
        return 128 + signal.SIGINT  # Ctrl-C while it started (a store that does not answer, say)
    except (TaskwatchError, TimeoutError) as exc:
        # a store refused or silent: said in one line, as --plain and `taskwatch web` say it
        # (the dashboard never took the screen; this is no crash of it)
        return fail(str(exc))
    refused = False
    try:
        info = None
        if serve:
            # nothing printed: the dashboard is about to take the screen; it shows the
            # attach command itself (ctrl+p, "Attach command")
            try:
                info = bg.serve(serve, announce=False, token=token or None)
            except (ValueError, OSError, TaskwatchError) as exc:
                # checked before the engine started; this is what only binding finds out
                # (a port in use, a socket path taken); `finally` stops the engine
                reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                refused = True
                return fail(f"cannot serve at {serve}: {reason}")
        status = catch.run(TaskwatchApp(LocalClient(engine), confirm=confirm, serving=info))
        if info is not None:
            _say(f"served {engine.node_id} at {info}")
    finally:
        catch.take_interrupts()
        _stop_engine(bg, announce=not refused)
    return status


def _attach(opts: argparse.Namespace) -> int:
    given = [
        *(["--stream"] if opts.stream is not None else []),
        *(["--lease"] if opts.lease is not None else []),
        *_given_token_options(opts),
        *(["--no-confirm"] if not opts.confirm else []),
    ]
    try:
        # before connecting: an option the address would ignore is refused, not dropped
        check_attach_address(opts.address)
        check_attach_options(opts.address, given)
    except ValueError as exc:
        return fail(str(exc))
    kind = attach_kind(opts.address)
    if kind == "redis":
        return _attach_cluster(opts.address, DEFAULT_STREAM if opts.stream is None else opts.stream)
    if kind == "postgresql":
        return _attach_database(opts.address, DEFAULT_LEASE if opts.lease is None else opts.lease, confirm=opts.confirm)
    try:
        token = resolve_token(opts)
    except TokenError as exc:
        return fail(str(exc))
    from .app import TaskwatchApp
    from .remote_client import RemoteClient

    # attach has no --plain; an engine's address has a dashboard in the browser, given the same token
    advised = ["taskwatch", "web", "attach", opts.address]
    if opts.token_file is not None:
        advised += ["--token-file", opts.token_file]
    token_note = " with the token in $TASKWATCH_TOKEN" if opts.token is not None else ""
    in_browser = f"{NO_TERMINAL_HERE}, or `{shlex.join(advised)}`{token_note} for its dashboard in the browser"
    return run_dashboard(
        TaskwatchApp(RemoteClient(opts.address, token=token), confirm=opts.confirm), no_terminal=in_browser
    )


def _attach_cluster(url: str, stream: str) -> int:
    from taskwatch.engine import RedisEventRelay

    from .cluster import ClusterApp

    if (refused := _cannot_watch(url, stream=stream)) is not None:
        return fail(refused)
    return run_dashboard(ClusterApp(RedisEventRelay(url, stream=stream)), no_terminal=NO_TERMINAL_HERE)


def _attach_database(url: str, lease: str, *, confirm: bool) -> int:
    from taskwatch.engine import ClusterObserver

    from .cluster import ClusterApp

    if (refused := _cannot_watch(url, lease=lease)) is not None:
        return fail(refused)
    return run_dashboard(ClusterApp(ClusterObserver(url, lease=lease or None), confirm=confirm), no_terminal=NO_TERMINAL_HERE)


def _cannot_watch(url: str, *, stream: str = DEFAULT_STREAM, lease: str = DEFAULT_LEASE) -> str | None:
    """Why the cluster at ``url`` (a Redis stream, a PostgreSQL database) cannot be watched, on
    one plain line before a screen is taken or a browser tab opened; None if it can be.

    The source is opened once and closed: a URL that cannot be read, a password or database
    the server refuses, and a database that is no cluster's are told here. A Redis server out
    of reach is not: the dashboard shows it DISCONNECTED, with why, until it answers.
    """
    from taskwatch.engine import ClusterObserver, RedisEventRelay

    try:
        source: Any = (
            RedisEventRelay(url, stream=stream) if attach_kind(url) == "redis" else ClusterObserver(url, lease=lease or None)
        )
    except TaskwatchError as exc:
        return str(exc)
    try:
        asyncio.run(_open_and_close(source))
    except (TaskwatchError, OSError) as exc:
        return f"cannot watch {source.public_url}: {exc}"
    return None


async def _open_and_close(source: Any) -> None:
    """Start ``source`` (a ClusterObserver checks the database's tables and schema version and
    reads the cluster once; a relay asks its stream for its newest entry) and stop it again."""
    await source.start()
    await source.stop()


def _web(opts: argparse.Namespace) -> int:
    try:
        from . import web
    except ImportError:
        return fail(f"`taskwatch web` needs textual-serve: {install_hint('web')}")
    attach = opts.target[:1] == ["attach"]
    if attach:
        if len(opts.target) != 2:
            return fail("usage: taskwatch web attach ADDRESS [--token-file PATH]")
        try:
            check_attach_address(opts.target[1])
            check_attach_options(opts.target[1], _given_token_options(opts))
            token = resolve_token(opts)
        except (TokenError, ValueError) as exc:
            return fail(str(exc))
    elif len(opts.target) > 1:
        return fail(f"unexpected arguments {' '.join(opts.target[1:])!r}; usage: taskwatch web [APP | attach ADDRESS]")
    elif given := _given_token_options(opts):
        # the engine runs in this process, served to its sessions privately: there is no server to give a token to
        return fail(f"{given[0]} goes with `taskwatch web attach ADDRESS` (an engine's tcp:// or Unix socket address)")
    if not opts.host.strip():
        return fail("--host is empty; give 127.0.0.1 (this machine only, the default) or 0.0.0.0 (every interface)")
    if not 0 <= opts.port <= 65535:
        return fail(f"--port {opts.port} is not a port number (0-65535; 0 picks a free one)")
    try:
        server = web.DashboardServer("", secret=web.take_secret(), host=opts.host, port=opts.port)
    except (web.SecretError, ValueError) as exc:
        return fail(str(exc))
    engine = None
    if not attach:
        # loaded before anything listens: a bad APP is one line here, not a blank page per browser tab
        try:
            engine = load_engine(opts.target[0]) if opts.target else _demo_engine()
        except (AppPathError, TaskwatchError) as exc:
            return fail(str(exc))
    elif attach_kind(opts.target[1]) == "engine" and (refused := _cannot_attach(opts.target[1], token)):
        # tried once here: an engine that is not there, or turns the token away, is one line, not a failed tab each
        return fail(refused)
    elif attach_kind(opts.target[1]) != "engine" and (refused := _cannot_watch(opts.target[1])) is not None:
        # so is a cluster that cannot be watched: each tab would close blank, saying nothing
        return fail(refused)
    try:
        socks = server.bind()
    except OSError as exc:
        # nothing was printed or started: the address is bound before the URL is shown
        return fail(f"cannot listen on {web.base_url(opts.host, opts.port)}: {exc.strerror or exc}")
    try:
        if engine is None:
            server.command = shlex.join([sys.executable, "-m", "taskwatch.tui", "attach", opts.target[1]])
            # the sessions' environment, not their argv, which `ps` shows to every local user
            server.env = {TOKEN_ENV: token} if token else {}
            with EndingSignals() as catch:
                catch.take_interrupts()  # Ctrl+C quits it: no engine of its own to start here
                _serve_web(server, socks, catch)
            return 0 if catch.signum is None else 128 + catch.signum
        with contextlib.nullcontext() if opts.target else demo_failures_unlogged():
            return _web_engine(server, socks, engine)
    finally:
        for sock in socks:
            sock.close()


#: how long `taskwatch web attach` gives the engine to answer its check
ATTACH_CHECK_TIMEOUT = 10.0


def _cannot_attach(address: str, token: str | None) -> str | None:
    """Why a dashboard could not attach to the engine at ``address`` with ``token``, or None if
    one can: connects, authenticates, and disconnects."""

    async def attach_once() -> None:
        remote = RemoteEngine(address, token=token, timeout=ATTACH_CHECK_TIMEOUT)
        try:
            await remote.connect()
        finally:
            await remote.close()

    try:
        asyncio.run(attach_once())
    except EngineUnreachable as exc:
        return str(exc)  # it names the address, and what to check
    except AuthenticationFailed:
        if token is None:
            return f"the engine at {address} asks for a token: give it in ${TOKEN_ENV} or --token-file PATH"
        return f"the engine at {address} turned the token away: it is not that engine's token"
    except (TaskwatchError, OSError) as exc:
        return f"cannot attach to {address}: {exc}"
    return None


def _serve_web(server: DashboardServer, socks: list[socket.socket], catch: EndingSignals) -> None:
    """Serve until Ctrl+C or an ending signal (``catch``'s) asks the server to exit.

    After it, until ``catch`` is left, they are only noted: a second one does not cut short
    the sessions' end or the engine's stop.
    """
    if catch.came:
        return  # one came while the engine started: nothing is served

    def on_loop(loop: asyncio.AbstractEventLoop) -> None:
        catch.on_loop(loop, lambda signum: server.request_exit())
        if catch.came:  # one that came just now, before the loop took the signals
            loop.call_soon(server.request_exit)

    try:
        server.serve(sockets=socks, on_loop=on_loop)
    finally:
        catch.resume()


def _demo_engine() -> Engine:
    from .demo import build_demo_engine

    return build_demo_engine(None, store="memory")


def _web_engine(server: DashboardServer, socks: list[socket.socket], engine: Engine) -> int:
    """Run ``engine`` here, once, and serve it to every browser tab.

    Each tab's dashboard attaches to it over a Unix socket in a directory only
    this user can enter, with a token in its environment: every tab sees the
    same engine (one leader, one scheduler), as a terminal dashboard would.
    """
    from taskwatch.engine.background import attach_command
    from taskwatch.engine.server import new_token

    from . import web

    # SIGTERM and SIGHUP end it as they end the terminal dashboard: the engine stopped, its
    # directory removed, exit status 128 + the signal's number
    with EndingSignals() as catch, web.private_directory() as private:
        try:
            bg = engine.start_background()
        except (TaskwatchError, OSError) as exc:
            return fail(f"the engine did not start: {exc}")
        except KeyboardInterrupt:
            return 128 + signal.SIGINT  # Ctrl-C while it started (a store that does not answer, say)
        # Ctrl-C quits from now on, as the sessions' end and the engine's stop, which it must not cut short
        catch.take_interrupts()
        try:
            try:
                info = bg.serve(os.path.join(private, web.ENGINE_SOCKET), token=new_token(), announce=False)
            except (ValueError, OSError, TaskwatchError) as exc:
                return fail(f"cannot serve the engine to the browser sessions: {exc}")
            argv, env = attach_command(info)
            server.command, server.env = shlex.join(argv), env
            _serve_web(server, socks, catch)
        finally:
            # after the web server: its sessions are gone, none sees the engine stop
            _stop_engine(bg)
    return 0 if catch.signum is None else 128 + catch.signum


if __name__ == "__main__":
    raise SystemExit(main())
