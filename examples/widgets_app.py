"""The README's widgets example, runnable: `python -m examples.widgets_app` (q quits).

taskwatch's widgets in an application's own Textual app: counts, runs and the
event log of an engine the app starts and stops, redrawn four times a second.
Press s to submit a run, Enter on a run to be told its id.
"""

from __future__ import annotations

import time

from pydantic import BaseModel
from taskwatch.engine import Engine, RunNotFound, TaskContext
from taskwatch.widgets import CountsBar, EventLog, RunsTable
from textual.app import App, ComposeResult
from textual.binding import Binding

engine = Engine(health_interval=None)


class Fetch(BaseModel):
    url: str


@engine.task
async def fetch(ctx: TaskContext, params: Fetch) -> int:
    await ctx.progress(1, 1, params.url)
    return len(params.url)


class Jobs(App[None]):
    BINDINGS = [Binding("s", "submit", "Submit"), Binding("q", "quit", "Quit")]

    def compose(self) -> ComposeResult:
        yield CountsBar()
        yield RunsTable()
        yield EventLog()

    async def on_mount(self) -> None:
        await engine.start()
        self.events = engine.bus.subscribe()  # read at the redraw rate, never per event
        self.set_interval(1 / 4, self.redraw)

    def redraw(self) -> None:
        if not self.is_running:
            return  # the app is closing: its widgets may be gone before this timer is
        stats = engine.stats()
        self.query_one(CountsBar).update(stats.by_status, self.events.dropped, paused=False)
        table = self.query_one(RunsTable)
        runs = engine.runs(limit=200)
        # rows shown going that newer runs pushed out of those 200: read again, to their ends
        for run_id in table.active_run_ids - {r.id for r in runs}:
            try:
                runs.append(engine.get(run_id))
            except RunNotFound:
                table.remove_runs([run_id])  # let go by the engine's history
        table.update_runs(runs, now=time.time())
        self.query_one(EventLog).add_events(self.events.get_batch())

    def on_runs_table_run_selected(self, message: RunsTable.RunSelected) -> None:
        self.notify(f"run {message.run_id}")

    async def action_submit(self) -> None:
        await engine.submit("fetch", Fetch(url="https://example.org"))

    async def on_unmount(self) -> None:
        await engine.stop()


if __name__ == "__main__":
    Jobs().run()
