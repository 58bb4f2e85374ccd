"""The package's type hints hold: mypy over engine, widgets and tui, and user code checked with ``--strict``:
what the README writes, and what a program reads of the API (event kinds, ``exc.sent``, ``bg.call``
results, widget updates given any iterable, ``Page``)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ForwardRef

import pytest
import taskwatch.engine
from taskwatch.engine import events

ROOT = Path(__file__).resolve().parent.parent


#: kept between runs: a cold check reads pydantic's hints for seconds, a warm one takes one
USER_CACHE = ROOT / ".mypy_cache" / "user-program"


#: a user's program as the README writes it; ``# expect: CODE`` marks the lines mypy must flag
USER_PROGRAM = '''\
from __future__ import annotations

from typing import Unpack, assert_type

from pydantic import BaseModel

from taskwatch.engine import (
    BackgroundEngine,
    BackgroundKwargs,
    ControlServer,
    Engine,
    Event,
    HealthSample,
    RunFailed,
    ServerInfo,
    TaskContext,
)

engine = Engine()


class Params(BaseModel):
    n: int


@engine.task
async def bare(ctx: TaskContext, params: Params) -> int:
    return params.n


@engine.task(name="called", retries=1)
async def called(ctx: TaskContext, params: Params) -> dict[str, int]:
    return {"n": params.n}


@engine.periodic(every=60.0)
async def tick(ctx: TaskContext) -> None: ...


@engine.supervised
async def worker(ctx: TaskContext) -> None: ...


@engine.supervised(name="leader", leader_only=True)
async def leader(ctx: TaskContext) -> None: ...


async def handle(job: dict[str, int]) -> None: ...


async def handle_with_ctx(ctx: TaskContext, job: Params) -> None: ...


async def compile_key(ctx: TaskContext, key: str) -> None: ...


def not_async_handler(job: dict[str, int]) -> None: ...


engine.queue("jobs", handle)
engine.queue("jobs_ctx", handle_with_ctx)
engine.trigger("compile", compile_key, size_threshold=3)


def on_health(event: HealthSample) -> None: ...


def start_quietly(**options: Unpack[BackgroundKwargs]) -> BackgroundEngine:
    return engine.start_background(**options)


def on_nothing() -> None: ...


async def use(ctx: TaskContext) -> None:
    assert_type(await bare(ctx, Params(n=1)), int)
    assert_type(await called(ctx, Params(n=1)), dict[str, int])
    await tick(ctx)
    await leader(ctx)
    server = await engine.serve("tcp://127.0.0.1:0")
    assert_type(server, ControlServer)
    assert_type(server.info(), ServerInfo)
    assert_type(engine.start_background(), BackgroundEngine)
    engine.trigger("t", compile_key, size_threshold=5, staleness=30.0)
    assert_type(await engine.serve("/tmp/x.sock", announce=False), ControlServer)
    bg = engine.start_background(call_timeout=2.0)
    assert_type(bg.serve("/tmp/y.sock", announce=False), ServerInfo)
    assert_type(await bg.aserve("/tmp/z.sock", max_message=1 << 20), ServerInfo)
    assert_type(start_quietly(stop_timeout=1.0), BackgroundEngine)
    engine.bus.add_callback(lambda event: print(event.kind, event.seq))
    engine.bus.add_callback(on_health, kinds=["health"])
    async for event in engine.bus.subscribe(kinds=["run."]):
        assert_type(event, Event)
        if event.kind == "run.failed":
            assert_type(event, RunFailed)
            print(event.error.message)
    for recent in engine.bus.recent():
        print(recent.kind)


async def misuse(ctx: TaskContext, event: Event) -> None:
    await bare(ctx, "not params")  # expect: arg-type
    await worker()  # expect: call-arg
    print(event.error)  # expect: union-attr
    engine.queue("bad", not_async_handler)  # expect: arg-type
    engine.trigger("bad", handle, size_threshold=3)  # expect: arg-type
    engine.bus.add_callback(on_nothing)  # expect: arg-type


async def misspelt_options(bg: BackgroundEngine) -> None:
    engine.trigger("t1", compile_key, size_treshold=5)  # expect: call-arg
    engine.trigger("t2", compile_key)  # expect: call-arg
    engine.trigger("t3", compile_key, size_threshold=5, staleness="30s")  # expect: arg-type
    engine.start_background(call_timout=1.0)  # expect: call-arg
    start_quietly(call_timeout="1s")  # expect: arg-type
    await engine.serve("/tmp/x.sock", anounce=False)  # expect: call-arg
    await engine.serve("/tmp/x.sock", max_message="big")  # expect: arg-type
    bg.serve("/tmp/y.sock", anounce=False)  # expect: call-arg
    bg.serve("/tmp/y.sock", max_message="big")  # expect: arg-type
    await bg.aserve("/tmp/z.sock", tokn="secret")  # expect: call-arg


@engine.task  # expect: type-var
def not_async(ctx: TaskContext) -> int:
    return 1


@engine.supervised(name="needs_more")  # expect: type-var
async def needs_more(ctx: TaskContext, extra: int) -> None: ...
'''


def test_mypy_finds_no_errors(tmp_path: Path) -> None:
    # checked as the installed packages, so widgets' and tui's imports of taskwatch.engine
    # are read (checking the folders themselves, mypy could not find that package)
    site = installed_layout(tmp_path)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "-p", "taskwatch.engine", "-p", "taskwatch.widgets", "-p", "taskwatch.tui"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "MYPYPATH": str(site)},
    )
    assert result.returncode == 0, result.stdout + result.stderr


def installed_layout(base: Path) -> Path:
    """A directory laid out as an install has it: ``taskwatch/engine`` and the others (the
    source, linked).

    The venv's editable install maps ``engine/`` to ``taskwatch.engine`` with an import
    hook, which mypy does not run, so mypy in the venv cannot find the package.
    """
    site = base / "site"
    (site / "taskwatch").mkdir(parents=True)
    for package in ("engine", "widgets", "tui"):
        (site / "taskwatch" / package).symlink_to(ROOT / package, target_is_directory=True)
    return site


def strict_mypy(tmp_path: Path, program: str, cache: Path) -> str:
    """What ``mypy --strict`` says of ``program``, a user's module importing taskwatch as installed."""
    site = installed_layout(tmp_path)
    # errors inside the package are not the user's: mypy hides them for an installed package too
    (tmp_path / "mypy.ini").write_text(
        f"[mypy]\nmypy_path = {site}\n\n[mypy-taskwatch.*]\nfollow_imports = silent\n"
    )
    (tmp_path / "user.py").write_text(program)
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--config-file", "mypy.ini",
         "--cache-dir", str(cache), "user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    return result.stdout + result.stderr


def test_user_code_keeps_its_types_under_mypy_strict(tmp_path: Path) -> None:
    output = strict_mypy(tmp_path, USER_PROGRAM, USER_CACHE)
    expected = {
        (number, line.split("# expect: ")[1])
        for number, line in enumerate(USER_PROGRAM.splitlines(), 1)
        if "# expect: " in line
    }
    found = {(int(m[1]), m[2]) for m in re.finditer(r"^user\.py:(\d+): error: .*\[([a-z-]+)\]$", output, re.M)}
    assert found == expected, output


@pytest.mark.parametrize(
    ("options", "constructor"),
    [
        ("TriggerKwargs", taskwatch.engine.Trigger),
        ("BackgroundKwargs", taskwatch.engine.BackgroundEngine),
        ("ServeKwargs", taskwatch.engine.ControlServer),
    ],
)
def test_each_options_type_is_the_keyword_options_its_constructor_takes(options: str, constructor: type) -> None:
    # what mypy checks a user's options against cannot drift from what the constructor accepts
    typed = getattr(taskwatch.engine, options)
    params = {p.name: p for p in inspect.signature(constructor).parameters.values() if p.kind is p.KEYWORD_ONLY}
    assert set(typed.__annotations__) == set(params)
    for name, param in params.items():
        # both read as written (the modules postpone annotations); Required exactly where there is no default
        hint = typed.__annotations__[name]
        written = hint.__forward_arg__ if isinstance(hint, ForwardRef) else hint
        expected = f"Required[{param.annotation}]" if param.default is param.empty else param.annotation
        assert written == expected, name


def test_every_event_class_is_exported() -> None:
    classes = {
        name for name, obj in vars(events).items()
        if inspect.isclass(obj) and issubclass(obj, events.BaseEvent) and obj.__module__ == events.__name__
    }
    assert classes - set(taskwatch.engine.__all__) == set()
    assert all(getattr(taskwatch.engine, name) is getattr(events, name) for name in classes)


#: kept between runs: a cold check reads pydantic's and Textual's hints for seconds
API_CACHE = ROOT / ".mypy_cache" / "user-api-program"


#: a user's program reading what the README says the API gives
API_PROGRAM = '''\
from __future__ import annotations

import time
from typing import Any, assert_type

from taskwatch.engine import (
    CommandTimeout,
    ConnectionClosed,
    Engine,
    MessageTooLarge,
    Page,
    QueuePurge,
    RemoteEngine,
    RunEvent,
    StoredRun,
    WorkQueue,
)
from taskwatch.widgets import EventLog, FailuresList, ScheduleTable
from textual.app import App

engine = Engine()


async def handler(job: dict[str, Any]) -> None: ...


class Dashboard(App[None]):
    def on_event_log_event_chosen(self, message: EventLog.EventChosen) -> None:
        assert_type(message.event.kind, str)
        if isinstance(message.event, RunEvent):
            print(message.event.kind, message.event.run_id)
        chosen = self.query_one(EventLog).chosen
        if chosen is not None and chosen.kind == "run.failed":
            print(chosen.seq)

    async def show_failures(self) -> None:
        page = await engine.query_runs(status="failed", limit=200)
        assert_type(page, Page)
        assert_type(page.runs, list[StoredRun])
        self.query_one(FailuresList).update(page.runs, engine.workers())
        due = (info for info in engine.schedule() if info.enabled)
        self.query_one(ScheduleTable).update_schedule(due, time.time())


def in_a_thread() -> None:
    bg = engine.start_background()
    queue = bg.call(lambda e: e.queue("q", handler))
    assert_type(queue, WorkQueue)
    queue.put_nowait({"a": 1})
    assert_type(bg.call(Engine.purge_queue, "q"), QueuePurge)


async def in_another_loop() -> None:
    bg = engine.start_background()
    assert_type(await bg.acall(Engine.purge_queue, "q"), QueuePurge)
    assert_type(await bg.acall(lambda e: e.queue("q2", handler)), WorkQueue)


async def remote_submit(address: str) -> None:
    async with RemoteEngine(address) as remote:
        try:
            await remote.submit("embed_batch", {"user_id": "u1"})
        except (CommandTimeout, ConnectionClosed, MessageTooLarge) as exc:
            if not exc.sent:
                await remote.submit("embed_batch", {"user_id": "u1"})
            raise
'''


def test_a_users_program_reads_the_api_under_mypy_strict(tmp_path: Path) -> None:
    output = strict_mypy(tmp_path, API_PROGRAM, API_CACHE)
    assert "Success: no issues found" in output, output
