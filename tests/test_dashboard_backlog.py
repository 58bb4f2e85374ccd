"""The dashboard on an engine with a queue deeper than the snapshots hold: runs queued before
the snapshot's newest are listed from their first event on (started, failed, cancelled...),
so each can be found, cancelled and retried, every failure reaches the Failures tab and the
Tasks tab never counts more runs ended than submitted.

Every test drives the real app with Pilot on a live engine, in this process or attached.
"""

from __future__ import annotations

from typing import Any

import pytest
from taskwatch.engine import Engine, RunStatus, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.widgets import FailuresList, TaskStatsTable
from textual.widgets import Input

from .helpers import eventually
from .test_dashboard import make_engine, shown_status, table
from .test_dashboard_use import LARGE, cell_text

QUEUED = 25
MAX_ROWS = 10


def backlog_engine() -> Engine:
    # one run at a time: the oldest queued runs wait outside the newest MAX_ROWS
    engine = make_engine(max_concurrency=1)
    release = engine.resources["release"]

    @engine.task(name="late_failure")
    async def late_failure(ctx: TaskContext) -> None:
        await release.wait()
        raise ValueError("failed once released")

    return engine


@pytest.mark.parametrize("attached", [False, True], ids=["in-process", "attached"])
async def test_runs_queued_before_the_snapshots_newest_are_listed_once_they_start_and_every_failure_too(
    attached: bool, tmp_path: Any
) -> None:
    from taskwatch.tui.remote_client import RemoteClient

    engine = backlog_engine()
    async with engine:
        ids = [(await engine.submit("late_failure")).id for _ in range(QUEUED)]
        if attached:
            # the handshake's snapshot holds no more runs than the dashboard's own
            server = await engine.serve(str(tmp_path / "e.sock"), announce=False, snapshot_runs=MAX_ROWS)
            client: Any = RemoteClient(server.address)
        else:
            client = LocalClient(engine)
        app = TaskwatchApp(client, refresh_hz=30.0, overview_interval=0.2, max_rows=MAX_ROWS, confirm=False)
        async with app.run_test(size=LARGE) as pilot:
            await eventually(lambda: app.state.node_id == "dash-test")
            # the snapshot: the newest MAX_ROWS runs and the running one, not the ones queued between
            assert ids[1] not in app.state.runs
            await eventually(lambda: shown_status(app, ids[0]) == "running")

            # the oldest queued run starts: listed, found by the filter, cancelled with c
            await engine.cancel(ids[0])
            await eventually(lambda: shown_status(app, ids[1]) == "running")
            await pilot.press("slash")
            app.main.query_one("#runs-filter", Input).value = "status:running"
            await pilot.press("enter")
            await eventually(lambda: table(app).shown_keys == [ids[1]])
            await pilot.press("c")
            await eventually(lambda: engine.get(ids[1]).status is RunStatus.CANCELLED)
            # what its events did not carry comes with its record: where it belongs among the runs
            await eventually(lambda: not app.state.is_partial(ids[1]))
            assert app.state.runs[ids[1]].created_at == engine.get(ids[1]).created_at

            # every one of the rest fails: each failure is listed, however old its run
            engine.resources["release"].set()
            failed = ids[2:]
            await eventually(lambda: all(engine.get(i).status is RunStatus.FAILED for i in failed))
            await pilot.press("2")
            failures = app.main.query_one(FailuresList)
            await eventually(lambda: set(failures.table.shown_keys) == {f"run:{i}" for i in failed})
            # and retried from there, the oldest too
            assert failures.select("run", failed[0])
            await pilot.press("r")
            await eventually(lambda: [r for r in engine.runs(limit=None) if r.source == f"retry:{failed[0]}"])

            # the Tasks tab counts each run submitted once, those first seen late included
            await pilot.press("6")
            stats = app.main.query_one(TaskStatsTable)
            await eventually(lambda: "late_failure" in stats.shown_keys)
            await eventually(lambda: cell_text(stats, "late_failure", "failed") == str(len(failed) + 1))
            # (and the two cancelled ones)
            assert cell_text(stats, "late_failure", "submitted") == str(QUEUED + 1)
            await app.action_quit()


async def test_runs_that_finish_stay_listed_while_more_runs_wait_than_the_dashboard_keeps_finished() -> None:
    # the model counted waiting runs against its limit of runs kept: with more than that
    # waiting, every run was let go in the frame it finished, and the Runs tab showed none
    from taskwatch.tui.state import DEFAULT_MAX_RUNS

    engine = make_engine(max_concurrency=1, max_queue=DEFAULT_MAX_RUNS + 500)
    async with engine:
        app = TaskwatchApp(LocalClient(engine), refresh_hz=30.0, overview_interval=0.2, confirm=False)
        async with app.run_test(size=LARGE):
            await eventually(lambda: app.state.node_id == "dash-test")
            waiting = await engine.submit_many([("hold", None)] * (DEFAULT_MAX_RUNS + 100))
            # the newest waiting runs are cancelled: each ends, one after the other
            ended = [h.id for h in waiting[-5:]]
            for run_id in ended:
                await engine.cancel(run_id)
            await eventually(lambda: all(shown_status(app, run_id) == "cancelled" for run_id in ended), timeout=20)
            assert all(app.state.runs[run_id].status is RunStatus.CANCELLED for run_id in ended)
            # and they are still there a few frames on, while the queue still waits
            frames = app.frames
            await eventually(lambda: app.frames >= frames + 5)
            assert [shown_status(app, run_id) for run_id in ended] == ["cancelled"] * 5
            assert engine.stats().queue_depth >= DEFAULT_MAX_RUNS
        engine.resources["release"].set()
