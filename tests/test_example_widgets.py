"""The README's widgets example (examples/widgets_app.py) in a real Textual app driven by Pilot."""

from __future__ import annotations

import asyncio

from examples.widgets_app import Jobs, engine
from taskwatch.engine import RunStatus, TaskContext
from taskwatch.widgets import CountsBar, EventLog, RunsTable

from .helpers import eventually, stray_tasks


async def test_the_widgets_example_shows_a_submitted_run_and_reports_the_one_chosen() -> None:
    app = Jobs()
    async with app.run_test(size=(120, 40), notifications=True) as pilot:
        await pilot.press("s")
        await eventually(lambda: engine.runs() and engine.runs()[0].status is RunStatus.SUCCEEDED)
        [run] = engine.runs()
        table = app.query_one(RunsTable)
        await eventually(lambda: (r := table.record(run.id)) is not None and r.status is RunStatus.SUCCEEDED)
        await eventually(lambda: "succeeded 1" in app.query_one(CountsBar).counts().plain)
        log = app.query_one(EventLog)
        await eventually(lambda: any("run.succeeded" in strip.text for strip in log.lines))
        table.focus()
        await pilot.press("enter")
        await eventually(lambda: any(n.message == f"run {run.id}" for n in app._notifications))
    assert engine.state == "stopped"
    assert not stray_tasks()


async def test_the_widgets_example_brings_runs_that_newer_ones_pushed_out_to_their_end() -> None:
    # it fed the table the newest 200 runs only: a run still going when 200 newer ones came
    # kept its "running" row for good, its duration ticking, after it had succeeded
    release = asyncio.Event()
    if "held" not in {t.name for t in engine.catalog()}:

        @engine.task(name="held")
        async def held(ctx: TaskContext) -> None:
            await release.wait()

    app = Jobs()
    async with app.run_test(size=(120, 40)):
        table = app.query_one(RunsTable)
        slow = [await engine.submit("held") for _ in range(3)]
        await eventually(lambda: all((r := table.record(h.id)) is not None and r.status is RunStatus.RUNNING for h in slow))
        burst = await engine.submit_many([{"task": "fetch", "params": {"url": f"u{i}"}} for i in range(250)])
        await asyncio.gather(*(h.wait(10) for h in burst))
        release.set()
        await asyncio.gather(*(h.wait(10) for h in slow))
        await eventually(lambda: all((r := table.record(h.id)) is not None and r.status is RunStatus.SUCCEEDED for h in slow))
        assert not table.active_run_ids
    assert not stray_tasks()
