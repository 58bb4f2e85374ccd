"""The dashboard across its engine's life, as a user watching it sees it.

- runs that end while an in-process dashboard connects (the engine busy in its own thread) are
  shown ended: the events that arrived before the first snapshot was loaded were applied to
  an empty model and then thrown away with it, and such a run showed running for good;
- an in-process engine that stopped shows its queues and periodic tasks as they ended, not as
  the last overview before the stop left them (and with no rate: the last one measured said
  nothing of a stopped queue); started again, it is shown as its new start
  (incarnation, runs read back) rather than as the first one;
- a memory store's engine that stopped ended every run it had: a dashboard that lost their
  cancel events (an attached one's buffer overflowing at the stop's burst) shows them ended.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from taskwatch.engine import Engine, RunStatus, Snapshot, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.state import DashboardState
from taskwatch.widgets import QueuesTable

from .helpers import eventually


class SlowHandOver(LocalClient):
    """A client whose first snapshot reaches the app only once the engine, going on in its own
    thread, has ended runs after it: the hop back to the app's loop, long."""

    async def connect(self, runs_limit: int = 500) -> Snapshot:
        snap = await super().connect(runs_limit)
        await eventually(lambda: self.engine.stats().finished_total >= snap.stats.finished_total + 3)
        return snap


async def test_runs_that_end_while_an_in_process_dashboard_connects_are_shown_ended() -> None:
    engine = Engine(node_id="busy", health_interval=None)

    @engine.periodic(every=0.02, name="tick")
    async def tick(ctx: TaskContext) -> None:
        await asyncio.sleep(0.01)

    bg = engine.start_background()
    try:
        app = TaskwatchApp(SlowHandOver(engine), refresh_hz=30.0, overview_interval=0.2, cursor_blink=False)
        async with app.run_test(size=(160, 40)):
            await eventually(lambda: app.state.node_id == "busy")

            def stuck() -> list[str]:
                # runs the engine has ended that the dashboard shows unended
                return [
                    f"{run_id}: shown {view.status.value}, ended {truth.status.value}"
                    for run_id, view in list(app.state.runs.items())
                    if (truth := engine.get(run_id)).status.finished and view.status is not truth.status
                ]

            bg.call(lambda engine: engine.pause_periodic("tick"))
            await eventually(lambda: engine.stats().running == 0)
            try:
                await eventually(lambda: not stuck(), timeout=5)
            except AssertionError:
                left = stuck()
                assert not left, left
    finally:
        bg.stop(timeout=5)


async def test_an_in_process_engine_that_stopped_shows_its_queues_and_schedule_as_they_ended() -> None:
    # the last overview before the stop stayed on the Scheduler tab: a queue still "in flight",
    # hundreds of jobs waiting, under a header saying STOPPED
    engine = Engine(node_id="ends", health_interval=None)

    @engine.periodic(every=3600, name="hourly")
    async def hourly(ctx: TaskContext) -> None:
        await asyncio.Event().wait()  # its first run, at the start, still runs at the stop

    async def handle(job: int) -> None:
        await asyncio.Event().wait()

    jobs = engine.queue("jobs", handle, concurrency=2, maxsize=1000)
    bg = engine.start_background()
    stopped = False
    try:
        app = TaskwatchApp(LocalClient(engine), refresh_hz=30.0, overview_interval=0.2, cursor_blink=False)
        async with app.run_test(size=(160, 40)):
            await eventually(lambda: app.state.node_id == "ends")
            for i in range(50):
                jobs.put_nowait(i)
            await eventually(
                lambda: [(q.depth, q.in_flight) for q in app.state.queues] == [(48, 2)]
                and [p.running_status for p in app.state.schedule] == ["running"]
            )
            table = app.main.query_one(QueuesTable)
            await eventually(lambda: str(table.get_cell("jobs", "rate")) == "0.0/s")  # measured: none done
            await asyncio.to_thread(bg.stop, timeout=0.1)
            stopped = True
            (ended,) = engine.queues()
            assert (ended.depth, ended.in_flight, ended.abandoned) == (0, 0, 50)
            await eventually(lambda: [(q.depth, q.in_flight, q.abandoned) for q in app.state.queues] == [(0, 0, 50)])
            # a stopped queue has no rate: the last one measured no longer says anything
            await eventually(lambda: str(table.get_cell("jobs", "rate")) == "—")
            assert [p.running_status for p in app.state.schedule] == [p.running_status for p in engine.schedule()] == [None]
    finally:
        if not stopped:
            bg.stop(timeout=5)


@pytest.mark.parametrize("refresh_hz", [30.0, 1.0], ids=["frames-often", "overview-before-the-frame"])
async def test_an_in_process_engine_started_again_is_shown_with_its_new_incarnation(tmp_path: Path, refresh_hz: float) -> None:
    # at one frame a second, an overview of the new start comes before the frame that applies
    # its events: it says "running" first, and the start was not noticed by the events alone
    engine = Engine(node_id="again", store=f"sqlite:///{tmp_path / 'runs.db'}", health_interval=None)

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    bg = engine.start_background()
    try:
        app = TaskwatchApp(LocalClient(engine), refresh_hz=refresh_hz, overview_interval=0.05, cursor_blink=False)
        async with app.run_test(size=(160, 40)):
            await eventually(lambda: app.state.node_id == "again")
            first = engine.incarnation
            assert app.state.incarnation == first
            run_id = bg.submit("slow").id
            await eventually(lambda: app.state.runs.get(run_id) is not None and app.state.runs[run_id].status.value == "running")
            await asyncio.to_thread(bg.stop, timeout=0.1)
            await eventually(lambda: app.state.engine_state == "stopped")
            bg = await asyncio.to_thread(engine.start_background)
            assert engine.incarnation != first
            # the header's incarnation, and the run its store read back, are the new start's
            await eventually(lambda: app.state.incarnation == engine.incarnation)
            await eventually(lambda: app.state.runs[run_id].status is engine.get(run_id).status)
    finally:
        bg.stop(timeout=5)


async def test_a_memory_engines_stop_ends_the_runs_whose_cancel_events_a_dashboard_lost() -> None:
    # an attached dashboard's connection buffer overflows at the stop's burst of run.cancelled
    # events, and a stopped engine gives no snapshot to reload from: its pending and running
    # runs stayed pending and running under STOPPED
    engine = Engine(node_id="burst", health_interval=None, max_concurrency=2, cancel_grace=0.05)

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    state = DashboardState()
    await engine.start()
    try:
        sub = engine.bus.subscribe(maxsize=10_000)
        ids = [(await engine.submit("slow")).id for _ in range(6)]
        await eventually(lambda: engine.stats().running == 2)
        state.load(engine.snapshot())
        sub.get_batch()  # (what the snapshot holds)
    finally:
        await engine.stop(timeout=0)
    events = sub.get_batch()
    assert [e.kind for e in events].count("run.cancelled") == 6 and events[-1].kind == "engine.stopped"
    # the stop's events but its cancellations, as a dashboard that lost them gets them
    state.apply([e for e in events if e.kind != "run.cancelled"])
    shown = {run_id: state.record(run_id) for run_id in ids}
    assert {(r.status, r.cancel_reason) for r in shown.values() if r is not None} == {(RunStatus.CANCELLED, "shutdown")}
    assert len([r for r in shown.values() if r is not None]) == 6
    assert (state.by_status["pending"], state.by_status["running"], state.by_status["cancelled"]) == (0, 0, 6)
    totals = state.totals()
    assert totals is not None and totals["cancelled"] == 6
    # the same, with every event: each run is counted once
    whole = DashboardState()
    whole.load(engine.snapshot())
    assert (whole.by_status["pending"], whole.by_status["running"], whole.by_status["cancelled"]) == (0, 0, 6)


async def test_the_finish_rate_after_the_engine_process_was_replaced_counts_only_the_new_ones() -> None:
    # an attached dashboard reloads from the process that replaced the one it watched (same
    # node id, a new start): the rate took the new process's total less the old one's over
    # a window spanning both, and read 44/s for a process finishing 90/s
    now = [0.0]
    state = DashboardState(clock=lambda: now[0])

    async def finished(engine: Engine, n: int) -> Snapshot:
        handles = [await engine.submit("noop") for _ in range(n)]
        for handle in handles:
            await handle.wait(timeout=10)
        return engine.snapshot()

    for n, later in [(3, 2), (200, 90)]:  # the old process, then the one that replaced it
        engine = Engine(node_id="web-1", health_interval=None)

        @engine.task
        async def noop(ctx: TaskContext) -> None: ...

        async with engine:
            now[0] += 100
            state.load(await finished(engine, n))
            now[0] += 1
            state.apply_overview(await finished(engine, later))
    assert state.finish_rate() == 90.0
