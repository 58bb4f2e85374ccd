"""The background facade at its edges: runs that will not end, a stop cut short, engines left
running by a notebook cell run again, a dashboard whose parent died, a submit whose run blocks
the loop at once.

Real threads and real processes throughout; waits are bounded polls or events.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    BackgroundEngine,
    Engine,
    EngineAlreadyRunning,
    EngineNotRunning,
    RunStatus,
)
from taskwatch.engine.background import stop_all_background

from .helpers import taskwatch_threads, wait_until
from .test_background import hold_loop
from .test_web_security import children, cmdline

REPO = Path(__file__).resolve().parent.parent


def build_engine(cancel_grace: float = 1.0) -> Engine:
    engine = Engine(health_interval=None, cancel_grace=cancel_grace)

    @engine.task
    async def forever(ctx: Any) -> None:
        await asyncio.Event().wait()

    @engine.task
    async def stubborn(ctx: Any) -> None:
        # a bug in a task: it swallows every cancel
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                pass

    return engine


@pytest.fixture(autouse=True)
def no_engine_left() -> Iterator[None]:
    before = taskwatch_threads()
    yield
    stop_all_background(timeout=0)
    assert taskwatch_threads() <= before


# ---------------------------------------------------------------- runs that ignore the stop


def test_a_run_that_swallows_every_cancel_does_not_keep_the_engine_from_stopping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = build_engine(cancel_grace=0.2)
    bg = engine.start_background()
    handle = bg.submit("stubborn")
    wait_until(lambda: handle.status is RunStatus.RUNNING)
    with caplog.at_level(logging.WARNING, logger="taskwatch"):
        bg.stop(timeout=0)  # used to raise TimeoutError, leaving the loop thread running for good
    assert "abandoned as the loop closed" in caplog.text and "taskwatch-run-" in caplog.text
    assert (bg.state, bg.running, engine.state) == ("stopped", False, "stopped")
    assert not bg.thread.is_alive()
    assert handle.record().cancel_reason == "shutdown"
    bg.stop()  # idempotent: no second timeout
    # and the engine is free to start again
    again = engine.start_background()
    assert again.running
    again.stop(timeout=0)


def test_a_run_blocked_in_to_thread_does_not_keep_the_engine_from_stopping() -> None:
    engine = Engine(health_interval=None, cancel_grace=0.2)
    release = threading.Event()
    entered = threading.Event()

    def blocking() -> None:
        entered.set()
        release.wait(60)

    @engine.task
    async def offloaded(ctx: Any) -> None:
        await asyncio.to_thread(blocking)

    bg = engine.start_background()
    try:
        bg.submit("offloaded")
        assert entered.wait(5)
        started = time.monotonic()
        bg.stop(timeout=0)  # the thread cannot be cancelled: it is left to finish on its own
        assert time.monotonic() - started < 3
        assert bg.state == "stopped" and not bg.thread.is_alive() and engine.state == "stopped"
    finally:
        release.set()
    # what was left to end the executor does so once the blocking call returns
    wait_until(lambda: not [t for t in taskwatch_threads() if t.name == f"{bg.thread.name}-executor"])


# ---------------------------------------------------------------- a stop cut short


def test_ctrl_c_during_stop_leaves_the_facade_stopping_until_the_engine_has_stopped() -> None:
    engine = build_engine()
    bg = engine.start_background(stop_timeout=30)
    handle = bg.submit("forever")
    wait_until(lambda: handle.status is RunStatus.RUNNING)

    def interrupt() -> None:
        wait_until(lambda: engine.state == "stopping")  # the drain is under way
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    interrupter = threading.Thread(target=interrupt)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt):
        bg.stop()
    interrupter.join()

    # the engine goes on draining: the facade says so, rather than "stopped"
    assert engine.state == "stopping"
    assert (bg.state, bg.running) == ("stopping", True)
    assert bg.thread.name in {t.name for t in taskwatch_threads()}
    with pytest.raises(EngineNotRunning, match="stopping"):
        bg.submit("forever")
    with pytest.raises(EngineAlreadyRunning, match="stopping"):
        engine.start_background()

    # the run ends (cancelled on the engine's own loop), so the drain does; stop() waits for that
    loop = engine.loop
    assert loop is not None
    asyncio.run_coroutine_threadsafe(engine.cancel(handle.id), loop).result(10)
    bg.stop(timeout=5)
    assert (bg.state, bg.running, engine.state) == ("stopped", False, "stopped")
    assert not bg.thread.is_alive()
    engine.start_background().stop(timeout=5)


def test_a_later_shorter_stop_shortens_a_drain_not_begun_yet() -> None:
    engine = build_engine()
    bg = engine.start_background()
    handle = bg.submit("forever")
    wait_until(lambda: handle.status is RunStatus.RUNNING)

    # the loop is busy (a callback blocking it), so the first stop's request waits there
    release = hold_loop(bg)
    first = threading.Thread(target=bg.stop, kwargs={"timeout": 60})
    first.start()
    wait_until(lambda: bg.state == "stopping")

    def release_once_shortened() -> None:
        # the second stop() below has taken its timeout (the only sign of it short of its end)
        wait_until(lambda: bg._drain_timeout == 0)
        release.set()

    releaser = threading.Thread(target=release_once_shortened)
    releaser.start()
    started = time.monotonic()
    try:
        bg.stop(timeout=0)
    finally:
        release.set()
        releaser.join()
    assert time.monotonic() - started < 10  # not the first call's 60 s drain
    first.join(10)
    assert not first.is_alive()
    assert bg.state == "stopped" and handle.record().cancel_reason == "shutdown"


# ---------------------------------------------------------------- a submit answers at once


def test_submit_returns_before_the_runs_first_step_blocks_the_loop() -> None:
    engine = Engine(health_interval=None, cancel_grace=1.0)
    release = threading.Event()

    @engine.task
    async def heavy(ctx: Any) -> str:
        release.wait(30)  # blocking work before the first await, as a CPU-bound step is
        return "done"

    bg = engine.start_background(call_timeout=2)
    try:
        # the run was queued: submit says so at once, not after the run's first step (nor a
        # TimeoutError claiming it may have been applied)
        handle = bg.submit("heavy")
        assert not release.is_set()
    finally:
        release.set()
    assert handle.wait(timeout=10).result == "done"
    bg.stop(timeout=5)


# ---------------------------------------------------------------- engines a cell run again left running


def test_starting_a_second_engine_warns_of_the_one_still_running_and_stop_all_stops_both(
    caplog: pytest.LogCaptureFixture,
) -> None:
    old = build_engine().start_background()
    with caplog.at_level(logging.WARNING, logger="taskwatch.background"):
        with pytest.warns(RuntimeWarning, match="another BackgroundEngine is still running") as warned:
            new = build_engine().start_background()
    (warning,) = warned
    message = str(warning.message)
    assert repr(old) in message and "stop_all_background()" in message
    assert warning.filename == __file__  # points at the line that started the engine
    assert repr(old) in caplog.text

    # said at every start, not once per line of code: a cell run again is the same line
    new.stop(timeout=0)
    with pytest.warns(RuntimeWarning, match="another BackgroundEngine is still running") as again:
        newer = build_engine().start_background()
    assert [str(w.message) for w in again] == [message]

    stopped = stop_all_background(timeout=0)
    assert set(stopped) == {old, newer}
    assert not old.running and not newer.running
    assert stop_all_background() == []


def test_a_dashboard_port_held_by_an_earlier_engine_names_it(tmp_path: Path) -> None:
    old = build_engine().start_background()
    old.serve(str(tmp_path / "old.sock"), announce=False)
    url = str(old.dashboard(port=0, ready_timeout=20))
    port = int(url.split("/")[2].rsplit(":", 1)[1])
    with pytest.warns(RuntimeWarning):
        new = build_engine().start_background()
    new.serve(str(tmp_path / "new.sock"), announce=False)
    with pytest.raises(OSError, match="already in use by the dashboard of") as refused:
        new.dashboard(port=port, ready_timeout=20)
    assert refused.value.errno == errno.EADDRINUSE
    assert repr(old) in str(refused.value) and "stop_all_background()" in str(refused.value)
    old.stop(timeout=0)
    # once the old engine is stopped, its port is free for the new one's dashboard
    assert f":{port}/" in str(new.dashboard(port=port, ready_timeout=20))
    new.stop(timeout=0)


# ---------------------------------------------------------------- a dashboard outliving its parent

PARENT = textwrap.dedent(
    """
    import json, sys
    from taskwatch.engine import Engine

    engine = Engine(health_interval=None)

    @engine.task
    async def noop(ctx) -> None:
        pass

    bg = engine.start_background()
    print(json.dumps({"url": str(bg.dashboard(port=0))}), flush=True)
    sys.stdin.read()  # until killed
    """
)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    except OSError:
        return True
    return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_the_dashboard_server_exits_when_its_parent_is_killed() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    servers: list[int] = []
    try:
        assert parent.stdout is not None
        # the line after dashboard() serving the engine says where (without a token)
        url = next(json.loads(line)["url"] for line in parent.stdout if line.startswith("{"))
        port = int(url.split("/")[2].rsplit(":", 1)[1])
        servers = [pid for pid in children(parent.pid) if "taskwatch.tui.web" in " ".join(cmdline(pid))]
        assert len(servers) == 1 and not refused(port)
        parent.kill()  # no exit hook runs: nothing stops the dashboard but the dashboard itself
        parent.wait(10)
        wait_until(lambda: refused(port), timeout=15)
        wait_until(lambda: not cmdline(servers[0]), timeout=15)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.communicate(timeout=10)
        for pid in servers:
            if cmdline(pid):  # left behind (the bug this test is about): do not leak it
                os.kill(pid, signal.SIGKILL)
