"""The ``taskwatch`` command line.

    taskwatch                          demo engine + dashboard
    taskwatch PACKAGE.MODULE:ATTR      your Engine (or a function returning one) + dashboard
    taskwatch attach ADDRESS [--token T]
    taskwatch web [APP | attach ADDRESS [--token T]] [--host H] [--port P]
    taskwatch --plain [--seconds S]    demo events printed to the terminal, no dashboard
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import shlex
import sys
from collections.abc import Sequence
from typing import Any

from taskwatch.engine import Engine, __version__


class AppPathError(Exception):
    """A PACKAGE.MODULE:ATTRIBUTE path that does not lead to an Engine."""


def load_engine(path: str) -> Engine:
    """Import ``PACKAGE.MODULE:ATTRIBUTE`` and return the Engine it names.

    The attribute may be an :class:`Engine` or a callable returning one. The
    current directory is importable, as with ``python -m``.
    """
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
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
            raise AppPathError(f"module {module_name!r} has no attribute {attr!r}") from None
    if callable(target) and not isinstance(target, Engine):
        try:
            target = target()
        except Exception as exc:
            raise AppPathError(f"calling {path!r} failed: {type(exc).__name__}: {exc}") from None
    if not isinstance(target, Engine):
        raise AppPathError(f"{path!r} is a {type(target).__name__}, not a taskwatch Engine")
    return target


def _main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskwatch",
        description="Run and watch background work: an asyncio task engine with a live dashboard.",
        epilog="Also: `taskwatch attach ADDRESS [--token T]` and `taskwatch web [APP | attach ADDRESS] [--port P]`.",
    )
    parser.add_argument("app", nargs="?", help="PACKAGE.MODULE:ATTRIBUTE naming your Engine (default: the demo)")
    parser.add_argument("--version", action="version", version=f"taskwatch {__version__}")
    parser.add_argument("--seed", type=int, default=None, help="seed for the demo's random choices")
    parser.add_argument("--plain", action="store_true", help="print the demo's events instead of opening the dashboard")
    parser.add_argument("--seconds", type=float, default=None, help="with --plain: stop after this many seconds")
    parser.add_argument("--serve", metavar="ADDRESS", default=None, help="also serve the engine for `taskwatch attach`")
    return parser


def _attach_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskwatch attach", description="Open the dashboard on an engine served elsewhere.")
    parser.add_argument("address", help="a Unix socket path or tcp://127.0.0.1:PORT")
    parser.add_argument("--token", default=os.environ.get("TASKWATCH_TOKEN"), help="access token (or $TASKWATCH_TOKEN)")
    return parser


def _web_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="taskwatch web", description="Serve the dashboard in a browser (textual-serve).")
    parser.add_argument("target", nargs="*", help="APP, or: attach ADDRESS")
    parser.add_argument("--token", default=os.environ.get("TASKWATCH_TOKEN"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    return parser


def fail(message: str) -> int:
    print(f"taskwatch: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "attach":
        return _attach(_attach_parser().parse_args(args[1:]))
    if args and args[0] == "web":
        return _web(_web_parser().parse_args(args[1:]))
    opts = _main_parser().parse_args(args)
    if opts.plain:
        from .demo import print_events

        try:
            asyncio.run(print_events(opts.seconds, opts.seed))
        except KeyboardInterrupt:
            pass
        return 0
    if opts.app:
        try:
            engine = load_engine(opts.app)
        except AppPathError as exc:
            return fail(str(exc))
    else:
        from .demo import build_demo_engine

        engine = build_demo_engine(opts.seed)
    return _run_local(engine, opts.serve)


def _run_local(engine: Engine, serve: str | None) -> int:
    from .app import TaskwatchApp
    from .client import LocalClient

    bg = engine.start_background()
    try:
        if serve:
            info = bg.serve(serve)
            print(f"taskwatch: serving on {info}", file=sys.stderr)
        TaskwatchApp(LocalClient(engine)).run()
    finally:
        bg.stop(timeout=5)
    return 0


def _attach(opts: argparse.Namespace) -> int:
    from .app import TaskwatchApp
    from .remote_client import RemoteClient

    TaskwatchApp(RemoteClient(opts.address, token=opts.token)).run()
    return 0


def _web(opts: argparse.Namespace) -> int:
    try:
        from textual_serve.server import Server
    except ImportError:
        return fail("`taskwatch web` needs textual-serve: pip install 'taskwatch[web]'")
    command = [sys.executable, "-m", "taskwatch.tui"]
    if opts.target[:1] == ["attach"]:
        if len(opts.target) != 2:
            return fail("usage: taskwatch web attach ADDRESS [--token T]")
        command += ["attach", opts.target[1]]
        if opts.token:
            command += ["--token", opts.token]
    elif opts.target:
        command += [opts.target[0]]
    Server(shlex.join(command), host=opts.host, port=opts.port, title="taskwatch").serve()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
