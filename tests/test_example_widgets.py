"""The README's widgets example (examples/widgets_app.py) in a real Textual app driven by Pilot."""

from __future__ import annotations

from examples.widgets_app import Jobs, engine
from taskwatch.engine import RunStatus
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
