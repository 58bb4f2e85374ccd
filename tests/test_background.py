"""The engine on its own loop thread, driven from other threads and other event loops."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dis
import errno
import functools
import gc
import html
import logging
import math
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import taskwatch.engine
from pydantic import BaseModel
from rich.console import Console
from taskwatch.engine import (
    BackgroundEngine,
    Engine,
    EngineNotRunning,
    InvalidConfiguration,
    InvalidParams,
    LoopThreadError,
    RemoteEngine,
    RunList,
    RunNotCancellable,
    RunNotFound,
    RunStatus,
    StoppedBeforeDone,
    TaskwatchError,
    UnknownTask,
)
from taskwatch.engine.display import on_engine_thread
from taskwatch.engine.errors import EngineAlreadyRunning

from .helpers import taskwatch_threads, wait_until


class EmbedParams(BaseModel):
    user_id: str
    contents: list[str]


def build_engine() -> Engine:
    engine = Engine(health_interval=None, cancel_grace=1.0)

    @engine.task
    async def embed_batch(ctx: Any, p: EmbedParams) -> int:
        await ctx.progress(len(p.contents), len(p.contents))
        return len(p.contents)

    @engine.task
    async def boom(ctx: Any) -> None:
        raise ValueError('<script>alert("x")</script> went wrong\nsecond line of detail')

    @engine.task
    async def forever(ctx: Any) -> None:
        await asyncio.Event().wait()

    return engine


@pytest.fixture
def bg() -> Iterator[BackgroundEngine]:
    before = taskwatch_threads()
    bg = build_engine().start_background()
    yield bg
    bg.stop(timeout=5)
    assert bg.thread not in threading.enumerate()
    assert taskwatch_threads() <= before


GOOD = {"user_id": "u1", "contents": ["a", "b"]}


def test_start_background_returns_a_ready_engine() -> None:
    before = taskwatch_threads()
    engine = build_engine()
    bg = engine.start_background()
    try:
        # no waiting: the engine started on its thread before start_background returned
        assert bg.running
        assert engine.state == "running"
        assert bg.thread.daemon and bg.thread.is_alive()
        assert bg.thread is not threading.current_thread()
        assert bg.stats().state == "running"
    finally:
        bg.stop(timeout=5)
    assert engine.state == "stopped"
    assert bg.thread not in threading.enumerate()
    assert taskwatch_threads() <= before


def test_start_error_is_raised_in_the_caller() -> None:
    before = taskwatch_threads()
    engine = build_engine()

    async def broken_start() -> None:
        raise RuntimeError("database unreachable")

    engine.start = broken_start  # type: ignore[method-assign]
    with pytest.raises(RuntimeError, match="database unreachable"):
        engine.start_background()
    assert taskwatch_threads() <= before


def test_submit_and_wait_from_the_main_thread(bg: BackgroundEngine) -> None:
    handle = bg.submit("embed_batch", GOOD)
    run = handle.wait(timeout=10)
    assert run.status is RunStatus.SUCCEEDED
    assert run.result == 2
    assert bg.get(handle.id).status is RunStatus.SUCCEEDED
    assert handle.id in {r.id for r in bg.runs()}
    assert bg.stats().succeeded_total == 1
    assert handle.done and handle.status is RunStatus.SUCCEEDED


def test_a_subscription_awaited_on_another_loop_says_so_and_reads_on_the_engines(bg: BackgroundEngine) -> None:
    # a notebook cell: its own loop beside the engine's; nothing there could ever wake the wait
    async def in_a_cell() -> None:
        sub = bg.engine.bus.subscribe(kinds=["run.succeeded"])
        bg.submit("embed_batch", GOOD).wait(timeout=10)
        assert sub.get_batch()[0].kind == "run.succeeded"  # taken as it is, without waiting
        with pytest.raises(LoopThreadError) as wrong:
            await asyncio.wait_for(anext(aiter(sub)), 10)
        assert "bg.acall(watch)" in str(wrong.value)
        sub.close()

        subscribed = threading.Event()

        async def watch(engine: Engine) -> str:
            async with engine.bus.subscribe(kinds=["run.succeeded"]) as events:
                subscribed.set()
                async for event in events:
                    return event.kind
            return "ended"

        reading = asyncio.ensure_future(bg.acall(watch))
        assert await asyncio.to_thread(subscribed.wait, 10)
        bg.submit("embed_batch", GOOD)
        assert await asyncio.wait_for(reading, 10) == "run.succeeded"

    asyncio.run(in_a_cell())


def test_an_endpoint_served_from_another_loop_serves_on_the_engines(bg: BackgroundEngine) -> None:
    # `await engine.serve()` in a notebook cell: made on the cell's loop, the endpoint read the
    # engine's bus there, and dropped every client's command (the reason only in a log line)
    async def in_a_cell() -> None:
        server = await bg.engine.serve("tcp://127.0.0.1:0", announce=False)
        address = server.info().address
        remote = RemoteEngine(address, server.token, timeout=10)
        await remote.connect()
        try:
            submitted = await remote.submit("embed_batch", GOOD)
            async with asyncio.timeout(10):
                while (record := await remote.get(submitted.id)).status is not RunStatus.SUCCEEDED:
                    await asyncio.sleep(0.02)  # polled: the run's end is what is waited for
            assert record.result == 2
        finally:
            await remote.close()
        await server.stop()  # on the engine's loop too, where its connections' tasks are
        assert await server_gone(address)

    asyncio.run(in_a_cell())


async def server_gone(address: str) -> bool:
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    try:
        _, writer = await asyncio.open_connection(host, int(port))
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def test_submit_and_wait_from_other_threads(bg: BackgroundEngine) -> None:
    results: list[Any] = []
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            for i in range(5):
                h = bg.submit("embed_batch", {"user_id": f"u{n}", "contents": ["x"] * i})
                results.append(h.wait(timeout=10))
        except BaseException as exc:  # surfaced by the asserts below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert errors == []
    assert len(results) == 20
    assert all(r.status is RunStatus.SUCCEEDED for r in results)
    assert sorted(r.result for r in results) == sorted(list(range(5)) * 4)
    assert bg.stats().succeeded_total == 20


def test_engine_errors_reach_the_caller(bg: BackgroundEngine) -> None:
    with pytest.raises(InvalidParams) as bad:
        bg.submit("embed_batch", {"user_id": "u1", "contents": "not a list"})
    assert [tuple(e["loc"]) for e in bad.value.errors] == [("contents",)]
    with pytest.raises(UnknownTask):
        bg.submit("no_such_task")
    with pytest.raises(RunNotFound):
        bg.get("missing")
    done = bg.submit("embed_batch", GOOD).wait(timeout=10)
    with pytest.raises(RunNotCancellable):
        bg.cancel(done.id)
    assert bg.stats().submitted_total == 1  # nothing bad was queued


def test_cancel_from_another_thread(bg: BackgroundEngine) -> None:
    handle = bg.submit("forever")
    wait_until(lambda: handle.status is RunStatus.RUNNING)
    record = bg.cancel(handle.id)
    assert record.status is RunStatus.CANCELLED
    assert handle.wait(timeout=5).cancel_reason == "user"


def test_await_handle_on_a_different_loop(bg: BackgroundEngine) -> None:
    handle = bg.submit("embed_batch", GOOD)

    async def main() -> tuple[Any, Any]:
        assert asyncio.get_running_loop() is not bg.loop
        return await handle, await handle.finished(timeout=5)

    first, second = asyncio.run(main())
    assert first.status is RunStatus.SUCCEEDED and second.id == handle.id


async def test_awaitable_variants_inside_a_running_loop(bg: BackgroundEngine) -> None:
    # this test body is itself a coroutine on pytest's loop, like a notebook cell
    handle = await bg.asubmit("embed_batch", GOOD)
    record = await handle
    assert record.result == 2
    assert (await bg.aget(handle.id)).status is RunStatus.SUCCEEDED
    assert [r.id for r in await bg.aruns()] == [handle.id]
    assert (await bg.astats()).succeeded_total == 1
    with pytest.raises(InvalidParams):
        await bg.asubmit("embed_batch", {"user_id": 1})
    sleeper = await bg.asubmit("forever")
    assert (await bg.acancel(sleeper.id)).status is RunStatus.CANCELLED
    assert (await bg.asnapshot()).stats.cancelled_total == 1


def test_blocking_call_on_the_engines_own_loop_raises(bg: BackgroundEngine) -> None:
    with pytest.raises(LoopThreadError, match="submit"):
        bg.call(lambda engine: bg.submit("embed_batch", GOOD))
    with pytest.raises(LoopThreadError):
        bg.call(lambda engine: bg.stats())
    with pytest.raises(LoopThreadError):
        bg.call(lambda engine: bg.stop())
    # a handle's blocking methods name what a handle offers there (there is no BackgroundEngine.wait())
    done = bg.submit("embed_batch", GOOD)
    done.wait(timeout=10)
    for method in ("wait", "record"):
        with pytest.raises(LoopThreadError, match=rf"BackgroundRunHandle\.{method}\(\).*`await handle.finished\(\)`"):
            bg.call(lambda engine: getattr(done, method)())
    # the awaitable variants are fine there, and the engine is unharmed
    stats = bg.call(lambda engine: bg.astats())
    assert stats.state == "running"
    assert bg.call(lambda engine: done.finished()).status is RunStatus.SUCCEEDED
    assert bg.submit("embed_batch", GOOD).wait(timeout=10).status is RunStatus.SUCCEEDED


def test_stop_is_idempotent_and_leaves_no_thread() -> None:
    before = taskwatch_threads()
    bg = build_engine().start_background()
    sleeper = bg.submit("forever")
    waited: list[Any] = []
    waiter = threading.Thread(target=lambda: waited.append(sleeper.wait(timeout=30)))
    waiter.start()
    wait_until(lambda: sleeper.status is RunStatus.RUNNING)

    bg.stop(timeout=0.1)
    bg.stop(timeout=0.1)
    waiter.join(timeout=5)
    assert not bg.running
    assert taskwatch_threads() <= before
    # the blocked waiter was answered, not left hanging: its run was cancelled by the stop
    assert [r.cancel_reason for r in waited] == ["shutdown"]
    with pytest.raises(EngineNotRunning):
        bg.submit("embed_batch", GOOD)
    with pytest.raises(EngineNotRunning):
        bg.cancel(sleeper.id)
    # what ran can still be looked at, as on a stopped Engine
    assert bg.get(sleeper.id).cancel_reason == "shutdown"
    assert [r.id for r in bg.runs(status="cancelled")] == [sleeper.id]
    assert bg.stats().state == "stopped" and bg.snapshot().stats.by_status["cancelled"] == 1
    assert "forever" in bg._repr_html_()
    assert asyncio.run(bg.aget(sleeper.id)).status is RunStatus.CANCELLED


def test_the_engines_view_says_its_finished_counts_are_since_the_start(tmp_path: Path) -> None:
    # a kernel restarted on the same store: the view lists the runs of the session before,
    # which the engine's own totals do not count
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    first = Engine(store=store, health_interval=None)

    @first.task
    async def boom(ctx: Any) -> None:
        raise ValueError("bad input")

    bg = first.start_background()
    try:
        assert bg.submit("boom").wait(timeout=10).status is RunStatus.FAILED
    finally:
        bg.stop(timeout=10)
    second = Engine(store=store, health_interval=None)
    second.task(boom)
    bg = second.start_background()
    try:
        html = bg._repr_html_()
        assert "bad input" in html  # the earlier run is listed...
        # ...and the counts beside it say what they count
        assert "0 submitted since start" in html
        assert re.search(r"since start:.*data-status=\"failed\" data-count=\"0\"", html)
        console = Console(record=True, width=160, color_system=None)
        console.print(bg)
        assert "since start: succeeded 0   failed 0" in console.export_text()
    finally:
        bg.stop(timeout=10)


def test_html_repr_shows_counts_and_failures_escaped(bg: BackgroundEngine) -> None:
    bg.submit("embed_batch", GOOD).wait(timeout=10)
    bg.submit("embed_batch", {"user_id": "<b>u2</b>", "contents": []}).wait(timeout=10)
    failed = bg.submit("boom").wait(timeout=10)
    assert failed.status is RunStatus.FAILED

    html = bg._repr_html_()
    assert 'data-status="succeeded" data-count="2"' in html
    assert 'data-status="failed" data-count="1"' in html
    assert "ValueError: &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; went wrong" in html
    assert "<script>" not in html
    assert "second line of detail" not in html  # only the error line

    run_html = bg.get(failed.id)._repr_html_()
    assert "&lt;script&gt;" in run_html and "<script>" not in run_html
    listing = RunList(bg.runs())._repr_html_()
    assert 'data-status="succeeded" data-count="2"' in listing
    assert "&lt;b&gt;u2" not in listing  # params are not in the list view...
    assert "&lt;b&gt;u2&lt;/b&gt;" in bg.runs(task="embed_batch")[0]._repr_html_()  # ...but in a run's

    console = Console(record=True, width=120, color_system=None)
    console.print(bg)
    console.print(RunList(bg.runs()))
    text = console.export_text()
    assert "failed 1" in text and "succeeded 2" in text
    assert 'ValueError: <script>alert("x")</script> went wrong' in text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_dashboard_serves_http_until_stopped(tmp_path: Path) -> None:
    before = taskwatch_threads()
    bg = build_engine().start_background()
    try:
        info = bg.serve(str(tmp_path / "c.sock"), announce=False)
        assert info.address.endswith("c.sock")
        port = _free_port()
        frame = bg.dashboard(port=port, host="127.0.0.1")
        url = getattr(frame, "src", frame)
        # a per-launch secret in the path: nothing is served without it
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/[\w-]{{43}}/", url), url
        assert str(frame) == url  # print(bg.dashboard()) in a script shows where to go

        def answers() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    return response.status == 200
            except OSError:
                return False

        wait_until(answers, timeout=15)
    finally:
        bg.stop(timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert taskwatch_threads() <= before


def test_dashboard_on_port_zero_takes_a_free_port_and_a_taken_port_is_refused(tmp_path: Path) -> None:
    bg = build_engine().start_background()
    try:
        bg.serve(str(tmp_path / "c.sock"), announce=False)
        frame = bg.dashboard(port=0)
        url = getattr(frame, "src", frame)
        port = int(re.fullmatch(r"http://127\.0\.0\.1:(\d+)/[\w-]{43}/", url)[1])  # type: ignore[index]
        assert port != 0
        with urllib.request.urlopen(url, timeout=5) as response:
            assert response.status == 200
        # asked for again on the same host: that dashboard; the same port on another host is refused, naming it
        assert bg.dashboard(port=port) is frame
        own = r"already in use by this engine's own dashboard on 127\.0\.0\.1:\d+.*pass another port"
        with pytest.raises(OSError, match=own) as refused:
            bg.dashboard(port=port, host="localhost")
        assert refused.value.errno == errno.EADDRINUSE
    finally:
        bg.stop(timeout=5)


def test_an_interrupted_blocking_call_leaves_nothing_going_on_the_engines_loop(bg: BackgroundEngine) -> None:
    # Ctrl-C (or a notebook's interrupt) during a blocking wait: the wait is given up, and so
    # is its coroutine on the engine's loop, which would otherwise last as long as the run
    handle = bg.submit("forever")
    wait_until(lambda: handle.status is RunStatus.RUNNING)

    def tasks() -> int:
        return int(bg.call(lambda engine: len(asyncio.all_tasks())))

    before = tasks()

    def interrupt() -> None:
        wait_until(lambda: tasks() > before)  # the wait is under way
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    for _ in range(3):
        interrupter = threading.Thread(target=interrupt)
        interrupter.start()
        with pytest.raises(KeyboardInterrupt):
            handle.wait()
        interrupter.join()
        # gone before the next round, whose interrupter would otherwise count it as that round's wait
        wait_until(lambda: tasks() == before)
    assert handle.status is RunStatus.RUNNING
    assert bg.cancel(handle.id).status is RunStatus.CANCELLED


def test_an_interrupt_landing_anywhere_in_a_blocking_call_leaves_nothing_on_the_engines_loop(
    bg: BackgroundEngine,
) -> None:
    # a real Ctrl-C lands wherever the caller's thread happens to be, and the signal above
    # mostly finds it in the wait. Here the interrupt is raised at each place in the engine's
    # code before the wait where Python checks for a signal, in turn: on entering a function
    # and after a call returns. One that landed after the call was shipped, but before the code
    # that gives it up, left its coroutine on the loop for as long as the run
    handle = bg.submit("forever")
    wait_until(lambda: handle.status is RunStatus.RUNNING)

    def tasks() -> int:
        return int(bg.call(lambda engine: len(asyncio.all_tasks())))

    before = tasks()
    engine_dir = str(Path(taskwatch.engine.__file__).parent)
    waits = concurrent.futures.wait.__code__

    @functools.cache
    def after_calls(code: types.CodeType) -> frozenset[int]:
        steps = list(dis.get_instructions(code))
        return frozenset(step.offset for last, step in zip(steps, steps[1:]) if last.opname == "CALL")

    landed: list[str] = []
    point = 0
    while not landed or landed[-1] != "the wait":
        point += 1
        seen = [0]

        def interrupt_at(frame: types.FrameType) -> None:
            seen[0] += 1
            if seen[0] == point:
                sys.settrace(None)
                landed.append(f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
                raise KeyboardInterrupt

        def in_engine(frame: types.FrameType, event: str, arg: Any) -> Any:
            if event == "opcode" and frame.f_lasti in after_calls(frame.f_code):
                interrupt_at(frame)
            return in_engine

        def on_call(frame: types.FrameType, event: str, arg: Any) -> Any:
            if frame.f_code is waits:
                sys.settrace(None)
                landed.append("the wait")
                raise KeyboardInterrupt
            if not frame.f_code.co_filename.startswith(engine_dir):
                return None
            interrupt_at(frame)
            frame.f_trace_lines = False
            frame.f_trace_opcodes = True
            return in_engine

        sys.settrace(on_call)
        try:
            with pytest.raises(KeyboardInterrupt):
                handle.wait()
        finally:
            sys.settrace(None)
        try:
            wait_until(lambda: tasks() == before, timeout=5)
        except AssertionError:
            pytest.fail(f"an interrupt at {landed[-1]} left the call's coroutine on the engine's loop")
    assert len(landed) > 10, landed  # all the way, not only in the wait
    assert handle.status is RunStatus.RUNNING
    assert bg.cancel(handle.id).status is RunStatus.CANCELLED


def hold_loop(bg: BackgroundEngine) -> threading.Event:
    """Block the engine's loop (a callback waiting on a threading.Event) until the returned event is set."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(30)

    assert bg.loop is not None
    bg.loop.call_soon_threadsafe(hold)
    assert entered.wait(5)
    return release


def test_a_thread_given_the_ended_loop_threads_ident_is_not_taken_for_it() -> None:
    # thread idents are reused once a thread has ended: a waiter on a stopped facade's handle
    # that got its loop thread's ident was refused as if it ran on that loop (LoopThreadError)
    bg = build_engine().start_background()
    done = bg.submit("embed_batch", GOOD)
    done.wait(timeout=10)
    ended = bg.thread
    bg.stop(timeout=5)
    assert not ended.is_alive()
    answers: list[Any] = []

    def ask() -> None:
        try:
            answers.append((threading.get_ident(), done.wait(timeout=5).status, bg.get(done.id).status))
        except Exception as exc:  # noqa: BLE001 - the answer under test
            answers.append((threading.get_ident(), exc, None))

    for _ in range(20):  # until one of them is given the ended thread's ident (Linux: the first)
        worker = threading.Thread(target=ask)
        worker.start()
        worker.join(10)
        if answers[-1][0] == ended.ident:
            break
    else:
        pytest.skip("no thread was given the ended loop thread's ident here")
    assert all(answer[1:] == (RunStatus.SUCCEEDED, RunStatus.SUCCEEDED) for answer in answers), answers


def test_a_call_given_up_before_the_engines_loop_took_it_up_never_runs() -> None:
    bg = build_engine().start_background(call_timeout=0.2)
    try:
        release = hold_loop(bg)
        try:
            with pytest.raises(TimeoutError, match=r"did not take up submit\(\).*did nothing"):
                bg.submit("embed_batch", GOOD)

            async def cancelled_asubmit() -> None:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(bg.asubmit("embed_batch", GOOD), 0.05)

            asyncio.run(cancelled_asubmit())
        finally:
            release.set()
        # a round trip once the loop is free: whatever was shipped before it has been taken up by now
        bg.call(lambda engine: None)
        assert bg.stats().submitted_total == 0 and bg.runs() == []
        assert bg.submit("embed_batch", GOOD).wait(timeout=10).status is RunStatus.SUCCEEDED
    finally:
        bg.stop(timeout=5)


def test_a_wait_with_a_timeout_on_a_blocked_loop_gives_up_within_call_timeout_of_it() -> None:
    # it waited its timeout and a fixed 5 s more, whatever call_timeout said
    bg = build_engine().start_background(call_timeout=0.25)
    try:
        done = bg.submit("embed_batch", GOOD)
        done.wait(timeout=10)
        release = hold_loop(bg)
        try:
            with pytest.raises(TimeoutError, match=r"did not take up wait\(\) within 0.45 s.*did nothing"):
                done.wait(timeout=0.2)
        finally:
            release.set()
        assert done.wait(timeout=0.2).status is RunStatus.SUCCEEDED
    finally:
        bg.stop(timeout=5)


def test_a_submit_that_started_but_did_not_answer_in_time_says_it_may_have_been_applied(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=30000", health_interval=None, cancel_grace=1.0)

    @engine.task
    async def quick(ctx: Any) -> int:
        return 1

    bg = engine.start_background(call_timeout=1.0)
    try:
        # another connection holds the file's write lock: the store's write of the run waits for it
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            with pytest.raises(TimeoutError, match=r"submit\(\) started on the engine.*may have been applied.*key="):
                bg.submit("quick")
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        # the submit given up on was cancelled before the store's writer took it up, so it
        # was not written once the lock was free: only the next submit's run is there
        after = bg.submit("quick")
        assert after.wait(timeout=10).status is RunStatus.SUCCEEDED
        assert [run.id for run in bg.runs(task="quick", limit=None)] == [after.id]
    finally:
        bg.stop(timeout=5)


def test_a_handle_answers_its_reads_after_stop_as_a_stopped_engines_handle_does(tmp_path: Path) -> None:
    engine = Engine(
        store=f"sqlite:///{tmp_path / 'runs.db'}", max_concurrency=1, health_interval=None, cancel_grace=1.0
    )

    @engine.task
    async def quick(ctx: Any) -> int:
        return 1

    @engine.task
    async def forever(ctx: Any) -> None:
        await asyncio.Event().wait()

    bg = engine.start_background()
    finished = bg.submit("quick")
    finished.wait(timeout=10)
    held = bg.submit("forever")
    wait_until(lambda: held.status is RunStatus.RUNNING)
    left = bg.submit("quick")  # behind the held slot: still pending at the stop
    bg.stop(timeout=0)

    assert finished.record().status is RunStatus.SUCCEEDED
    assert finished.status is RunStatus.SUCCEEDED and finished.done
    assert finished.wait(1).result == 1 and finished.wait().result == 1

    async def awaited() -> tuple[Any, Any]:
        # a blocking wait from a thread that runs an event loop (a notebook cell) too
        return await finished, finished.wait(1)

    first, second = asyncio.run(awaited())
    assert first.result == 1 and second.result == 1

    # a run the stop left undone (kept in the store for the next start): as in-process
    assert left.status is RunStatus.PENDING and not left.done
    with pytest.raises(StoppedBeforeDone, match="kept in the store"):
        left.wait(1)
    with pytest.raises(StoppedBeforeDone):
        left.wait()
    with pytest.raises(StoppedBeforeDone):
        asyncio.run(left.finished(1))
    # actions still refuse
    with pytest.raises(EngineNotRunning) as refused:
        left.cancel()
    assert not isinstance(refused.value, StoppedBeforeDone)


AT_EXIT = textwrap.dedent(
    """
    import asyncio, threading, time
    from taskwatch.engine import Engine

    engine = Engine(health_interval=None, cancel_grace=1.0)

    @engine.task
    async def polls(ctx) -> None:
        while True:  # blocking work the way the docs say to write it
            await asyncio.to_thread(time.sleep, 0.02)

    bg = engine.start_background(stop_timeout=0.2)  # the run never ends: a short drain
    handle = bg.submit("polls")

    def wait() -> None:
        run = handle.wait(timeout=60)
        print("waiter got", run.status.value, run.cancel_reason, run.error and run.error.type, flush=True)

    # a plain (non-daemon) thread still waiting on the run, as a script's worker would be
    threading.Thread(target=wait).start()
    while handle.status.value != "running":
        time.sleep(0.01)
    print("main ends without stopping", flush=True)
    """
)


def test_interpreter_exit_without_stop_stops_the_engine_like_stop_does(tmp_path: Path) -> None:
    script = tmp_path / "forgot_to_stop.py"
    script.write_text(AT_EXIT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    # the waiting thread was answered (not left hanging the exit), and the run was
    # cancelled by the stop, not failed by an executor already shut down
    assert "waiter got cancelled shutdown None" in proc.stdout, proc.stdout + proc.stderr


def test_reads_answer_while_a_stop_drains_and_new_work_is_refused() -> None:
    engine = build_engine()
    bg = engine.start_background()
    handle = bg.submit("forever")
    wait_until(lambda: bg.get(handle.id).status is RunStatus.RUNNING)
    stopping = threading.Thread(target=bg.stop, kwargs={"timeout": 30})
    stopping.start()
    try:
        wait_until(lambda: engine.state == "stopping")
        # as an Engine does while it stops: what runs can still be looked at
        assert bg.get(handle.id).status is RunStatus.RUNNING
        assert bg.stats().running == 1 and handle.status is RunStatus.RUNNING
        with pytest.raises(EngineNotRunning):
            bg.submit("embed_batch", GOOD)
    finally:
        # the drain would wait for the run as long as the stop's timeout: cancel it (on the
        # engine's loop itself, as the facade takes no action while it stops)
        loop = engine.loop
        assert loop is not None
        asyncio.run_coroutine_threadsafe(engine.cancel(handle.id), loop).result(10)
        stopping.join(30)
    assert not stopping.is_alive() and bg.get(handle.id).status is RunStatus.CANCELLED


# ---------------------------------------------------------------- started again, and started twice


def gated_engine(db: Path, released: threading.Event) -> Engine:
    engine = Engine(store=f"sqlite:///{db}", health_interval=None, cancel_grace=1.0)

    @engine.task(concurrency=1)
    async def gated(ctx: Any) -> str:
        # the work itself: it goes on once the test lets it, one run at a time
        while not released.is_set():
            await asyncio.sleep(0.01)
        return "ok"

    return engine


def test_a_handle_from_an_earlier_start_answers_once_the_engine_runs_again(tmp_path: Path) -> None:
    released = threading.Event()
    engine = gated_engine(tmp_path / "runs.db", released)
    old = engine.start_background()
    first = old.submit("gated")
    wait_until(lambda: first.status is RunStatus.RUNNING)
    left = old.submit("gated")  # behind the first (the task runs one at a time)
    old.stop(timeout=0)
    assert left.status is RunStatus.PENDING  # kept in the store for the next start
    released.set()

    bg = engine.start_background()
    try:
        # a blocking wait without a timeout, from another thread: it must end with the run
        waited: list[Any] = []
        waiter = threading.Thread(target=lambda: waited.append(left.wait()), daemon=True)
        waiter.start()
        waiter.join(15)
        assert not waiter.is_alive(), "the old handle's wait() never returned"
        assert waited[0].status is RunStatus.SUCCEEDED
        assert asyncio.run(left.finished(5)).status is RunStatus.SUCCEEDED
        assert left.wait(math.inf).status is RunStatus.SUCCEEDED
        assert left.done and old.get(left.id).status is RunStatus.SUCCEEDED
        assert first.id in {r.id for r in old.runs(status="succeeded")}
        # actions stay refused on the old facade, which says where the engine runs now
        with pytest.raises(EngineNotRunning, match="another BackgroundEngine") as refused:
            old.submit("gated")
        assert "async with" not in str(refused.value)
    finally:
        bg.stop(timeout=5)


def test_the_old_facades_reads_go_through_the_engines_loop_once_it_runs_again() -> None:
    engine = build_engine()
    old = engine.start_background()
    handle = old.submit("embed_batch", GOOD)
    handle.wait(timeout=10)
    old.stop(timeout=5)
    bg = engine.start_background(call_timeout=0.2)
    try:
        release = hold_loop(bg)
        try:
            # read from this thread while the engine's loop holds the engine, they would race it
            with pytest.raises(TimeoutError, match=r"did not take up get\(\)"):
                old.get(handle.id)
            with pytest.raises(TimeoutError, match=r"did not take up stats\(\)"):
                old.stats()
        finally:
            release.set()
        assert old.get(handle.id).status is RunStatus.SUCCEEDED
        assert old.stats().state == "running"
        # what a notebook shows for the old facade is its own state (its submits are refused),
        # and where the engine runs now; the new facade's says running
        assert "stopped (the engine runs again under a later start_background()" in html_text(old._repr_html_())
        assert " · running · " in html_text(bg._repr_html_())
    finally:
        bg.stop(timeout=5)
    # both stopped: the reads answer from the stopped engine's records again
    assert old.get(handle.id).status is RunStatus.SUCCEEDED
    assert handle.wait(1).status is RunStatus.SUCCEEDED


def test_a_running_facade_whose_engine_was_stopped_on_its_loop_shows_it_stopped() -> None:
    bg = build_engine().start_background()
    try:
        bg.call(lambda engine: engine.stop())
        assert bg.state == "running"  # its loop thread goes on
        assert " · stopped · " in html_text(bg._repr_html_())  # the engine's state, as it is
    finally:
        bg.stop(timeout=5)


def html_text(markup: str) -> str:
    """The text an HTML display shows: its tags gone, its entities read."""
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", markup)))


def test_starting_a_running_engine_again_is_refused_with_what_to_do() -> None:
    engine = build_engine()
    bg = engine.start_background()
    try:
        with pytest.raises(EngineAlreadyRunning, match=r"use the `bg`.*bg\.stop\(\) first") as refused:
            engine.start_background()
        assert isinstance(refused.value, TaskwatchError)
        assert bg.submit("embed_batch", GOOD).wait(timeout=10).status is RunStatus.SUCCEEDED
    finally:
        bg.stop(timeout=5)
    again = engine.start_background()  # stopped: it may be started again
    again.stop(timeout=5)

    async def on_a_loop_of_its_own() -> None:
        async with engine:
            with pytest.raises(EngineAlreadyRunning, match="another event loop"):
                await asyncio.to_thread(engine.start_background)

    asyncio.run(on_a_loop_of_its_own())


def test_start_background_from_two_threads_at_once_starts_the_engine_once() -> None:
    for _ in range(10):
        before = taskwatch_threads()
        engine = build_engine()
        barrier = threading.Barrier(2)
        got: list[Any] = []

        def start() -> None:
            barrier.wait()
            try:
                got.append(engine.start_background())
            except EngineAlreadyRunning as exc:
                got.append(exc)

        threads = [threading.Thread(target=start) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        started = [g for g in got if isinstance(g, BackgroundEngine)]
        assert len(started) == 1 and len(got) == 2, got
        assert started[0].loop is engine.loop
        started[0].stop(timeout=5)
        assert taskwatch_threads() <= before


def test_a_start_that_timed_out_leaves_no_engine_running() -> None:
    before = taskwatch_threads()
    for _ in range(20):
        engine = build_engine()
        try:
            bg = engine.start_background(start_timeout=1e-4)
        except TimeoutError:
            assert engine.state in ("new", "stopped")
            assert taskwatch_threads() <= before
            engine.start_background().stop(timeout=5)  # and it can be started for real
        else:
            bg.stop(timeout=5)
    assert taskwatch_threads() <= before


@pytest.mark.parametrize(
    "options",
    [
        {"call_timeout": -1},
        {"call_timeout": 0},
        {"call_timeout": "5"},
        {"call_timeout": math.nan},
        {"stop_timeout": -5},
        {"stop_timeout": True},
        {"start_timeout": 0},
        {"start_timeout": math.inf},
    ],
)
def test_nonsense_facade_options_are_refused_and_start_nothing(options: dict[str, Any]) -> None:
    before = taskwatch_threads()
    engine = build_engine()
    (name,) = options
    with pytest.raises(InvalidConfiguration, match=rf"start_background\(\).*{name}="):
        engine.start_background(**options)
    assert engine.state == "new" and taskwatch_threads() <= before


def test_wait_takes_an_infinite_timeout_and_refuses_nonsense_ones(bg: BackgroundEngine) -> None:
    handle = bg.submit("embed_batch", GOOD)
    assert handle.wait(timeout=math.inf).status is RunStatus.SUCCEEDED
    assert asyncio.run(handle.finished(math.inf)).status is RunStatus.SUCCEEDED
    for bad in (math.nan, -1, True, "5"):
        with pytest.raises(InvalidConfiguration, match="timeout="):
            handle.wait(timeout=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidConfiguration, match="timeout="):
            asyncio.run(handle.finished(bad))  # type: ignore[arg-type]


# ---------------------------------------------------------------- stopping, dashboards, display


def test_a_dashboard_of_a_stopped_engine_is_refused_and_starts_no_server(tmp_path: Path) -> None:
    bg = build_engine().start_background()
    bg.serve(str(tmp_path / "c.sock"), announce=False)
    bg.stop(timeout=5)
    with pytest.raises(EngineNotRunning, match="stopped") as refused:
        bg.dashboard(port=0)
    assert "async with" not in str(refused.value)
    assert bg._dashboards == []


async def test_astop_stops_without_freezing_the_callers_loop() -> None:
    bg = build_engine().start_background()
    handle = await bg.asubmit("forever")
    while (await bg.aget(handle.id)).status is not RunStatus.RUNNING:
        await asyncio.sleep(0.005)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0)
            ticks += 1

    ticking = asyncio.create_task(ticker())
    await bg.astop(timeout=0.2)  # the run ignores nothing, but the stop gives it its grace
    ticking.cancel()
    assert ticks > 0 and not bg.running and not bg.thread.is_alive()
    assert (await bg.aget(handle.id)).cancel_reason == "shutdown"


def test_stop_and_dashboard_on_the_engines_loop_say_what_to_do(bg: BackgroundEngine) -> None:
    with pytest.raises(LoopThreadError, match=r"astop\(\)") as stop:
        bg.call(lambda engine: bg.stop())
    with pytest.raises(LoopThreadError, match="another thread") as dashboard:
        bg.call(lambda engine: bg.dashboard(port=0))
    assert "variant" not in str(stop.value) and "variant" not in str(dashboard.value)


def test_a_blocked_loop_makes_the_display_say_so(bg: BackgroundEngine) -> None:
    release = hold_loop(bg)
    try:
        with pytest.raises(TimeoutError, match=r"event loop did not answer within 0\.2 s"):
            on_engine_thread(bg.engine, lambda engine: engine.stats(), timeout=0.2)
    finally:
        release.set()
    assert on_engine_thread(bg.engine, lambda engine: engine.stats().state) == "running"


def test_the_html_counts_include_runs_evicted_from_the_history() -> None:
    engine = build_engine()
    engine.history = 3
    bg = engine.start_background()
    try:
        for _ in range(2):
            bg.submit("boom").wait(timeout=10)
        for _ in range(10):
            bg.submit("embed_batch", GOOD).wait(timeout=10)
        html = bg._repr_html_()
    finally:
        bg.stop(timeout=5)
    assert "12 submitted" in html
    assert 'data-status="succeeded" data-count="10"' in html
    assert 'data-status="failed" data-count="2"' in html


CTRL_C_APART = """
import asyncio, json, signal, threading
from taskwatch.engine.hop import call_apart

entered, release = threading.Event(), threading.Event()

async def stuck():
    entered.set()
    await asyncio.to_thread(release.wait)

def interrupt():
    entered.wait(30)
    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

threading.Thread(target=interrupt, daemon=True).start()
try:
    call_apart(stuck)
    said = "returned"
except KeyboardInterrupt:
    # only release, set below, ends the call it gave up: the caller was freed before it ended
    said = "interrupted while the call still waited"
release.set()
print(json.dumps(said), flush=True)
"""


def test_ctrl_c_during_a_wait_on_a_loop_apart_frees_the_caller_at_once() -> None:
    # what a wait on a stopped engine runs on: Ctrl-C must not then wait for that loop to end.
    # In a process of its own: what Ctrl-C does depends on the process's signal state, which
    # a test runner's may not be (a fresh interpreter's is the user's)
    child = subprocess.run(
        [sys.executable, "-c", CTRL_C_APART], capture_output=True, text=True, timeout=60
    )
    assert child.returncode == 0, child.stderr[-2000:]
    assert child.stdout.strip() == '"interrupted while the call still waited"', child.stdout + child.stderr[-2000:]


async def test_an_awaited_call_cancelled_while_under_way_leaves_no_error_logged(
    bg: BackgroundEngine, caplog: pytest.LogCaptureFixture
) -> None:
    # the given-up call's end (a CancelledError) reached this loop's future of its answer, which
    # nobody retrieved: asyncio logged "Future exception was never retrieved" once per cancel
    def on_loop() -> int:
        return int(bg.call(lambda engine: len(asyncio.all_tasks())))

    before = await asyncio.to_thread(on_loop)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        for _ in range(3):
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(bg.acall(lambda engine: asyncio.sleep(30)), 0.2)
        # the given-up calls have ended on the engine's loop (their answers came back meanwhile)
        assert await asyncio.to_thread(lambda: wait_until(lambda: on_loop() == before))
        gc.collect()
    assert not [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
