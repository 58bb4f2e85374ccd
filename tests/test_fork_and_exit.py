"""A background engine in a fork of its process, at the interpreter's exit, and beside a notebook.

In a fork of a process running an engine (gunicorn --preload, ``os.fork()``), every hand-off to
the engine's loop -- a queue's put, a trigger's notify, ``provide()``, a wait on a run, a
display -- raises ``EngineInAnotherProcess`` at once rather than waiting for ever or dropping the
work. At exit, a ``stop_timeout`` given to ``start_background()`` is the drain, and a drain the
exit cut says so. A notebook cell defining tasks and queues while the engine's loop reads them
breaks nothing; the totals shown as "since start" start again with each start; a periodic task
defined again says what can be done.

Forks and exits happen in real subprocesses; waits are bounded (an alarm in a fork, a timeout on
each subprocess).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import DuplicateTask, Engine, TaskContext
from taskwatch.engine.background import stop_all_background

from .helpers import taskwatch_threads

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_engine_left() -> Iterator[None]:
    before = taskwatch_threads()
    yield
    stop_all_background(timeout=0)
    assert taskwatch_threads() <= before


def run_script(script: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


# ---------------------------------------------------------------- a fork of the engine's process

FORKED = """
    import asyncio, io, json, os, signal
    from rich.console import Console
    from taskwatch.engine import Engine, EngineInAnotherProcess

    engine = Engine(health_interval=None)
    handled = []

    async def handler(job):
        handled.append(job)

    async def on_fire(ctx, key):
        pass

    q = engine.queue("q", handler)
    tr = engine.trigger("tr", on_fire, size_threshold=1)

    @engine.task
    async def slow(ctx) -> None:
        await asyncio.Event().wait()

    @engine.task
    async def hello(ctx) -> int:
        return os.getpid()

    engine.provide("db", object())
    bg = engine.start_background()
    running = bg.submit("slow")

    class Hung(Exception):
        pass

    def hung(signum, frame):
        raise Hung()

    pid = os.fork()
    if pid == 0:  # the fork: the engine's loop and its thread stayed in the parent
        signal.signal(signal.SIGALRM, hung)
        calls = {
            "q.put": lambda: asyncio.run(q.put({"from": "fork"})),
            "q.put_nowait": lambda: q.put_nowait({"from": "fork"}),
            "q.join": lambda: asyncio.run(q.join(3)),
            "q.purge": lambda: asyncio.run(q.purge()),
            "tr.notify": lambda: tr.notify("key"),
            "engine.provide": lambda: engine.provide("cache", object()),
            "engine.withdraw": lambda: engine.withdraw("db"),
            "engine.set_flag": lambda: engine.set_flag("beta", True),
            "engine.history": lambda: setattr(engine, "history", 5),
            "engine.queue": lambda: engine.queue("late", handler),
            "engine.trigger": lambda: engine.trigger("late", on_fire, size_threshold=1),
            "engine.handle.wait": lambda: asyncio.run(engine.handle(running.id).wait(3)),
        }
        said = {}
        for name, call in calls.items():
            signal.alarm(10)  # a call that waits for the parent's loop would wait for ever
            try:
                call()
                said[name] = "answered"
            except EngineInAnotherProcess as exc:
                said[name] = "refused" if exc.started_in == os.getppid() else f"wrong pid {exc.started_in}"
            except Hung:
                said[name] = "hung"
            except BaseException as exc:
                said[name] = f"{type(exc).__name__}: {exc}"
            finally:
                signal.alarm(0)
        said["accepted"] = q.accepted
        signal.alarm(10)
        try:
            html = bg._repr_html_()
            out = io.StringIO()
            Console(file=out, width=400, color_system=None).print(bg)
            said["html"] = 'data-forked="true"' in html and f"runs in process {os.getppid()}" in html
            said["rich"] = f"runs in process {os.getppid()}" in out.getvalue()
        except Hung:
            said["html"] = said["rich"] = "hung"
        finally:
            signal.alarm(0)
        print(json.dumps(said), flush=True)
        os._exit(0)
    os.waitpid(pid, 0)
    # the parent's engine goes on as before: its queue takes and handles jobs
    q.put_nowait({"from": "parent"})
    asyncio.run(q.join(10))
    print(json.dumps({"parent": bg.submit("hello").wait(10).result == os.getpid(), "handled": handled}), flush=True)
    bg.stop(timeout=0)
"""


@pytest.mark.timeout(300)
def test_in_a_fork_every_hand_off_to_the_engines_loop_is_refused_at_once() -> None:
    proc = run_script(FORKED, timeout=280)
    assert proc.returncode == 0, proc.stderr
    child, parent = (json.loads(line) for line in proc.stdout.splitlines())
    refused = [
        "q.put", "q.put_nowait", "q.join", "q.purge", "tr.notify", "engine.provide", "engine.withdraw",
        "engine.set_flag", "engine.history", "engine.queue", "engine.trigger", "engine.handle.wait",
    ]  # fmt: skip
    assert {name: child[name] for name in refused} == dict.fromkeys(refused, "refused")
    assert child["accepted"] == 0  # nothing counted as queued in the fork
    # shown at once as an engine of another process, not as "running · busy" after 5 s
    assert child["html"] is True and child["rich"] is True
    assert parent == {"parent": True, "handled": [{"from": "parent"}]}


# ---------------------------------------------------------------- the interpreter's exit

EXITING = """
    import asyncio, atexit, threading
    from taskwatch.engine import Engine, TaskContext
    from taskwatch.engine.background import EXIT_STOP_TIMEOUT

    engine = Engine(health_interval=None)
    done = []
    started = threading.Event()

    @engine.task
    async def work(ctx: TaskContext) -> None:
        started.set()
        # work that outlasts the drain an exit gives by default
        await asyncio.sleep(3 * EXIT_STOP_TIMEOUT)
        done.append(1)

    bg = engine.start_background({options})
    {before_exit}
    atexit.register(lambda: print(f"done={{len(done)}}", flush=True))
    bg.submit("work")
    assert started.wait(10)  # running when the script ends
    print("exiting", flush=True)
"""


@pytest.mark.timeout(120)
def test_a_stop_timeout_given_to_start_background_is_the_drain_at_exit() -> None:
    proc = run_script(EXITING.format(options="stop_timeout=30", before_exit=""))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "done=1", (proc.stdout, proc.stderr)
    assert "not done" not in proc.stderr, proc.stderr

    # in a Jupyter kernel, which Jupyter SIGTERMs 2.5 s into its shutdown, the exit's cap stays
    kernel = (
        "import sys, types\n"
        "app = types.SimpleNamespace(IPKernelApp=types.SimpleNamespace(initialized=lambda: True))\n"
        "sys.modules['ipykernel.kernelapp'] = app\n"
    )
    proc = run_script(kernel + textwrap.dedent(EXITING.format(options="stop_timeout=30", before_exit="")))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "done=0", (proc.stdout, proc.stderr)
    assert "the kernel's exit stopped the engine with a drain of 1 s, not its stop_timeout of 30 s" in proc.stderr
    assert "run bg.stop(timeout) in a cell before shutting the kernel down" in proc.stderr


@pytest.mark.timeout(120)
def test_a_drain_the_exit_cut_says_so_and_how_to_drain_longer() -> None:
    # the engine's exit stop comes before atexit handlers: this one finds it stopped
    proc = run_script(EXITING.format(options="", before_exit="atexit.register(bg.stop, 30)"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "done=0", (proc.stdout, proc.stderr)
    warning = next(line for line in proc.stderr.splitlines() if "not done" in line)
    assert "the interpreter's exit stopped the engine with a drain of 1 s, not its stop_timeout of 10 s" in warning
    assert "before atexit handlers run" in warning
    assert "call bg.stop(timeout) before the script ends, or pass start_background(stop_timeout=...)" in warning
    assert "give stop() time" not in warning


# ---------------------------------------------------------------- a notebook beside the engine


class Shape(BaseModel):
    a: int
    b: str
    c: list[int] = []


@pytest.mark.timeout(120)
def test_tasks_and_queues_defined_on_threads_while_the_loop_reads_them() -> None:
    engine = Engine(health_interval=None)
    bg = engine.start_background()
    errors: list[str] = []
    reading = threading.Event()
    done = threading.Event()

    def reader() -> None:
        # what every attaching dashboard is sent, read on the engine's loop
        while not done.is_set():
            try:
                bg.snapshot(runs_limit=0)
                bg.catalog()
            except Exception as exc:  # noqa: BLE001 - what the test reports
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            reading.set()

    async def handler(job: Any) -> None:
        return None

    def define(prefix: str, count: int) -> None:
        # notebook cells run on threads of their own beside the loop
        for n in range(count):
            if errors:
                return

            @engine.task(name=f"{prefix}_{n}")
            async def cell(ctx: TaskContext, p: Shape) -> None:
                return None

            if n % 10 == 0:
                engine.queue(f"{prefix}_q{n}", handler)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # thread switches as often as can be: the races show at once
    threads = [threading.Thread(target=reader, daemon=True)]
    threads += [threading.Thread(target=define, args=(prefix, 400), daemon=True) for prefix in ("one", "two")]
    try:
        threads[0].start()
        assert reading.wait(10)
        for thread in threads[1:]:
            thread.start()
        for thread in threads[1:]:
            thread.join(60)
            assert not thread.is_alive()
    finally:
        done.set()
        threads[0].join(10)
        sys.setswitchinterval(switch)
    assert errors == []
    # of two threads defining at once, neither's definitions were lost
    names = {info.name for info in bg.catalog()}
    assert all(f"{prefix}_{n}" in names for prefix in ("one", "two") for n in range(400))
    assert len(bg.queues()) == 80
    bg.stop()


def visible(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub("<[^>]+>", " ", html).replace("&nbsp;", " "))


def test_since_start_counts_the_latest_start_only() -> None:
    engine = Engine(health_interval=None)

    @engine.task
    async def boom(ctx: TaskContext) -> None:
        raise ValueError("x")

    bg = engine.start_background()
    for _ in range(3):
        bg.submit("boom").wait(5)
    assert (bg.stats().submitted_total, bg.stats().failed_total) == (3, 3)
    bg.stop()

    bg = engine.start_background()  # started again: "since start" is since this start
    stats = bg.stats()
    assert (stats.submitted_total, stats.finished_total, stats.failed_total, stats.retries_total) == (0, 0, 0, 0)
    shown = visible(bg._repr_html_())
    assert "0 submitted since start" in shown
    assert "failed 0" in shown
    # the history the memory store keeps is still listed, and counted by status
    assert [run.status.value for run in bg.runs()] == ["failed"] * 3
    assert stats.by_status["failed"] == 3
    bg.submit("boom").wait(5)
    assert (bg.stats().submitted_total, bg.stats().failed_total) == (1, 1)
    bg.stop()


def test_a_periodic_task_defined_again_says_what_it_is_and_what_to_do() -> None:
    engine = Engine(health_interval=None)
    bg = engine.start_background()

    @engine.periodic(every=60)
    async def refresh_cache(ctx: TaskContext) -> None:
        return None

    with pytest.raises(DuplicateTask) as again:  # the cell run a second time

        @engine.periodic(every=60)
        async def refresh_cache(ctx: TaskContext) -> None:
            return None

    message = str(again.value)
    assert message.startswith("a periodic task named 'refresh_cache' is already registered")
    assert "cannot be replaced in place" in message
    assert "engine.pause_periodic('refresh_cache')" in message and "under another name" in message
    assert "pick another name" not in message

    # a plain task over it: the name is a periodic task's
    with pytest.raises(DuplicateTask, match="^a periodic task named 'refresh_cache'"):
        engine.task(refresh_cache, replace=True)
    bg.stop()
