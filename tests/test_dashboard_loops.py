"""The dashboard's keys for the other loops, pressed on a real app over a live engine:
restart, stop and start a worker, pause, resume and purge a queue (after a question naming
the queue and the count), fire a trigger key; and an event's JSON from the event log.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from taskwatch.engine import Engine, InProcessLease, TaskContext, event_to_dict
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.remote_client import RemoteClient
from taskwatch.tui.screens import ChooseKeyScreen, ConfirmScreen, EventScreen, HelpScreen, TracebackScreen
from taskwatch.widgets import EventLog, QueuesTable, TriggersTable, WorkersTable
from textual.pilot import Pilot
from textual.widgets import Input, OptionList

from .helpers import Recorder, eventually, screen_shown
from .raw_client import serve

SIZE = (140, 42)


def loops_engine(node_id: str = "dash-loops", **options: Any) -> tuple[Engine, dict[str, Any]]:
    options.setdefault("health_interval", None)
    engine = Engine(node_id=node_id, cancel_grace=1.0, **options)
    seen: dict[str, Any] = {"starts": 0, "jobs": [], "keys": [], "release": asyncio.Event()}

    @engine.supervised(name="indexer")
    async def indexer(ctx: TaskContext) -> None:
        seen["starts"] += 1
        await asyncio.Event().wait()

    async def mail(job: int) -> None:
        seen["jobs"].append(job)

    async def compile_bank(ctx: TaskContext, key: str) -> None:
        seen["keys"].append(key)

    async def notify_user(ctx: TaskContext, key: str) -> None:
        seen["keys"].append(f"notify:{key}")

    engine.queue("mail", mail, maxsize=100)
    engine.trigger("compile", compile_bank, size_threshold=100)
    engine.trigger("notify", notify_user, size_threshold=100)
    return engine, seen


@asynccontextmanager
async def dashboard(engine: Engine, client: Any = None, **options: Any) -> AsyncIterator[tuple[TaskwatchApp, Pilot]]:
    options.setdefault("refresh_hz", 30.0)
    options.setdefault("overview_interval", 0.2)
    app = TaskwatchApp(client or LocalClient(engine, manage=True), **options)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: app.state.node_id == engine.node_id)
        await pilot.pause()
        yield app, pilot


def notes(app: TaskwatchApp) -> list[str]:
    return [str(n.message) for n in app._notifications]


def footer_keys(app: TaskwatchApp) -> set[str]:
    return {key for key, active in app.screen.active_bindings.items() if active.binding.show}


async def on_scheduler(app: TaskwatchApp, pilot: Pilot) -> None:
    await pilot.press("3")
    await eventually(lambda: app.state.workers and app.state.queues and app.state.triggers)
    await pilot.pause()


# ---------------------------------------------------------------- workers


async def test_x_restarts_and_shift_x_stops_and_starts_the_selected_worker() -> None:
    engine, seen = loops_engine()
    async with dashboard(engine) as (app, pilot):
        await on_scheduler(app, pilot)
        workers = app.main.query_one(WorkersTable)
        await eventually(lambda: workers.selected_name == "indexer" and seen["starts"] == 1)
        await pilot.press("x")
        await eventually(lambda: seen["starts"] == 2)
        await eventually(lambda: "worker indexer restarted" in notes(app))

        await pilot.press("X")
        await eventually(lambda: engine.workers()[0].stopped_by_user)
        await eventually(lambda: str(workers.get_cell("indexer", "state")) == "stopped by user")
        assert engine.workers()[0].state == "stopped"
        await pilot.press("X")
        await eventually(lambda: seen["starts"] == 3 and not engine.workers()[0].stopped_by_user)
        await eventually(lambda: str(workers.get_cell("indexer", "state")) == "running")


async def test_t_on_the_scheduler_tab_shows_the_selected_workers_last_traceback() -> None:
    engine, _ = loops_engine()

    @engine.supervised(name="flaky", backoff=3600.0, backoff_max=3600.0)
    async def flaky(ctx: TaskContext) -> None:
        raise ConnectionError("the index server hung up")

    async with dashboard(engine) as (app, pilot):
        await on_scheduler(app, pilot)
        workers = app.main.query_one(WorkersTable)
        await eventually(lambda: any(w.name == "flaky" and w.crashes for w in app.state.workers))
        await eventually(lambda: workers.select_name("flaky"))
        await pilot.press("t")
        screen = await screen_shown(app, TracebackScreen)
        assert "worker flaky: ConnectionError: the index server hung up" in str(screen.query_one("#traceback-title").render())
        await pilot.press("escape")
        await eventually(lambda: app.screen is app.main)
        workers.select_name("indexer")
        await pilot.press("t")
        await eventually(lambda: "the selected worker has not crashed" in notes(app))


async def test_x_on_a_follower_says_the_worker_restarts_only_on_the_leader() -> None:
    # a long lease: the leader stays the leader however long a loaded machine holds its loop up
    lease = InProcessLease(ttl=30.0, renew_interval=0.1)
    leader, _ = loops_engine("leader", lease=lease)
    follower = Engine(node_id="follower", lease=lease, health_interval=None)

    @follower.supervised(name="dedup", leader_only=True)
    async def dedup(ctx: TaskContext) -> None:
        await asyncio.Event().wait()

    async with leader:
        await eventually(lambda: leader.leadership().is_leader)
        async with dashboard(follower) as (app, pilot):
            await pilot.press("3")
            workers = app.main.query_one(WorkersTable)
            await eventually(lambda: workers.selected_name == "dedup")
            await pilot.press("x")
            await eventually(lambda: any("leader-only" in n and "restart it on the leader" in n for n in notes(app)))
            assert follower.workers()[0].state == "waiting_for_leadership"
            assert str(workers.get_cell("dedup", "state")) == "waits for lead"


# ---------------------------------------------------------------- queues


async def test_shift_p_pauses_and_resumes_the_selected_queue() -> None:
    engine, seen = loops_engine()
    async with dashboard(engine) as (app, pilot):
        await on_scheduler(app, pilot)
        queues = app.main.query_one(QueuesTable)
        await eventually(lambda: queues.selected_name == "mail")
        await pilot.press("P")
        await eventually(lambda: engine.queues()[0].paused)
        await eventually(lambda: str(queues.get_cell("mail", "state")) == "paused")
        for i in range(3):
            engine.get_queue("mail").put_nowait(i)
        await pilot.press("P")
        await eventually(lambda: sorted(seen["jobs"]) == [0, 1, 2])
        assert not engine.queues()[0].paused


async def test_shift_d_asks_naming_the_queue_and_its_count_then_purges() -> None:
    engine, seen = loops_engine()
    async with dashboard(engine) as (app, pilot):
        await on_scheduler(app, pilot)
        engine.pause_queue("mail")
        for i in range(7):
            engine.get_queue("mail").put_nowait(i)
        await eventually(lambda: any(q.depth == 7 for q in app.state.queues))
        await pilot.press("D")
        dialog = await screen_shown(app, ConfirmScreen)
        assert "mail" in dialog.question and "7 jobs" in dialog.question
        await pilot.press("n")  # no: nothing is dropped
        await eventually(lambda: app.screen is app.main)
        assert engine.queues()[0].depth == 7 and engine.queues()[0].purged == 0

        await pilot.press("D")
        await screen_shown(app, ConfirmScreen)
        await pilot.press("y")
        await eventually(lambda: engine.queues()[0].purged == 7)
        assert engine.queues()[0].depth == 0 and seen["jobs"] == []
        await eventually(lambda: "purged 7 jobs from queue mail" in notes(app))
        queues = app.main.query_one(QueuesTable)
        await eventually(lambda: str(queues.get_cell("mail", "purged")) == "7")


async def test_purge_through_a_dashboard_attached_over_the_control_endpoint(sock_path: str) -> None:
    engine, _ = loops_engine()
    async with engine:
        server = await serve(engine, sock_path)
        engine.pause_queue("mail")
        for i in range(4):
            engine.get_queue("mail").put_nowait(i)
        async with dashboard(engine, RemoteClient(server.address)) as (app, pilot):
            await on_scheduler(app, pilot)
            await eventually(lambda: any(q.depth == 4 for q in app.state.queues))
            await pilot.press("D")
            dialog = await screen_shown(app, ConfirmScreen)
            assert "4 jobs" in dialog.question
            await pilot.press("enter")
            await eventually(lambda: engine.queues()[0].purged == 4)
            await pilot.press("P")
            await eventually(lambda: not engine.queues()[0].paused)


# ---------------------------------------------------------------- triggers


async def test_f_fires_the_selected_key_or_asks_which_key() -> None:
    engine, seen = loops_engine()
    fired = Recorder(engine, ("trigger.fired",))
    async with dashboard(engine) as (app, pilot):
        trigger = engine.get_trigger("compile")
        trigger.notify("bank-1", 2)
        trigger.notify("bank-2", 5)
        await on_scheduler(app, pilot)
        table = app.main.query_one(TriggersTable)
        await eventually(lambda: table.select_trigger_key("compile", "bank-2"))
        await pilot.press("f")
        await eventually(lambda: seen["keys"] == ["bank-2"])
        await eventually(lambda: any("trigger compile fired for key bank-2" in n for n in notes(app)))

        # a trigger without keys: the key is typed in
        assert table.select_trigger_key("notify")
        await pilot.press("f")
        chooser = await screen_shown(app, ChooseKeyScreen)
        await eventually(lambda: isinstance(app.focused, Input))
        assert not chooser.query(OptionList)
        await pilot.press(*"user-9", "enter")
        await eventually(lambda: "notify:user-9" in seen["keys"])

        # from the palette, for a trigger with several keys: chosen from a list
        typed_in = chooser
        command = next(c for c in app.get_system_commands(app.main) if c.title == "Fire trigger compile")
        command.callback()
        # the dialog the key was typed into may not have closed yet: this is a new one
        chooser = await screen_shown(app, ChooseKeyScreen, other_than=typed_in)
        options = chooser.query_one(OptionList)
        await eventually(lambda: app.focused is options)
        assert [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)] == ["bank-1", "bank-2"]
        await pilot.press("enter")  # the first: bank-1
        await eventually(lambda: "bank-1" in seen["keys"])
    assert [(e.trigger, e.key, e.reason) for e in fired.events] == [
        ("compile", "bank-2", "manual"), ("notify", "user-9", "manual"), ("compile", "bank-1", "manual"),
    ]


# ---------------------------------------------------------------- keys, footer, help, palette


async def test_the_scheduler_keys_show_and_act_only_on_the_scheduler_tab() -> None:
    engine, _ = loops_engine()
    async with dashboard(engine) as (app, pilot):
        scheduler_keys = {"P", "D", "f", "x", "X"}
        assert not scheduler_keys & footer_keys(app)
        assert {"c", "r"} <= footer_keys(app)
        engine.pause_queue("mail")
        engine.get_queue("mail").put_nowait(1)
        await pilot.press("D")  # not on the Scheduler tab: no question, nothing purged
        await pilot.pause()
        assert app.screen is app.main and engine.queues()[0].purged == 0
        await on_scheduler(app, pilot)
        await eventually(lambda: scheduler_keys <= footer_keys(app))
        # the run keys apply to nothing shown there
        assert not {"c", "r"} & footer_keys(app)
        # and none of the new keys takes a key that was already bound
        bound = [b.key for b in app.main.BINDINGS]  # type: ignore[union-attr]
        assert len(bound) == len(set(bound))

        await pilot.press("question_mark")
        help_screen = await screen_shown(app, HelpScreen)
        text = str(help_screen.query_one("#help-body").render())
        for line in ("purge a queue's waiting jobs", "fire the selected trigger key", "restart a supervised worker",
                     "stop a worker", "pause / resume a queue's consumers", "the event's full JSON"):
            assert line in text, line
        await pilot.press("escape")
        await eventually(lambda: app.screen is app.main)
        # the Events tab's footer names its own key; the run keys are back on the Runs tab
        await pilot.press("5")
        await eventually(lambda: "enter" in footer_keys(app))
        assert not ({"c", "r"} | scheduler_keys) & footer_keys(app)
        await pilot.press("1")
        await eventually(lambda: {"c", "r"} <= footer_keys(app))
        titles = {c.title for c in app.get_system_commands(app.main)}
        assert {"Restart worker indexer", "Stop worker indexer", "Resume queue mail", "Purge queue mail",
                "Fire trigger compile", "Fire trigger notify"} <= titles


# ---------------------------------------------------------------- the event log


async def test_enter_on_an_event_shows_its_json_and_c_copies_it() -> None:
    engine, _ = loops_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("5")
        log = app.main.query_one(EventLog)
        await eventually(lambda: app.focused is log and log.chosen is not None)
        engine.pause_queue("mail")
        await eventually(lambda: log.chosen is not None and log.chosen.kind == "queue.paused")  # type: ignore[attr-defined]
        event = log.chosen
        await pilot.press("enter")
        screen = await screen_shown(app, EventScreen)
        assert json.loads(screen.json) == event_to_dict(event)
        assert '\n  "kind": "queue.paused"' in screen.json  # pretty-printed
        await pilot.press("c")
        await eventually(lambda: app.clipboard == screen.json)
        await eventually(lambda: any("copied event" in n for n in notes(app)))
        await pilot.press("escape")
        await eventually(lambda: app.screen is app.main)

        # an older line, chosen with the cursor keys or a click
        await pilot.press("k")
        older = log.chosen
        assert older is not None and older.seq < event.seq  # type: ignore[union-attr]
        await pilot.press("enter")
        screen = await screen_shown(app, EventScreen)
        assert json.loads(screen.json)["seq"] == older.seq
        await pilot.press("escape")
        await eventually(lambda: app.screen is app.main)
        await pilot.click(EventLog, offset=(10, 0))
        screen = await screen_shown(app, EventScreen)
        first = app.main.query_one(EventLog)
        assert json.loads(screen.json)["seq"] == first.chosen.seq  # type: ignore[union-attr]


async def test_the_event_log_is_still_drawn_at_the_frame_rate_not_per_event() -> None:
    engine, _ = loops_engine()
    async with dashboard(engine) as (app, pilot):
        await pilot.press("5")
        log = app.main.query_one(EventLog)
        writes: list[int] = []
        original = log.write

        def counting(*args: Any, **kwargs: Any) -> Any:
            writes.append(1)
            return original(*args, **kwargs)

        log.write = counting  # type: ignore[method-assign]
        frames = app.frames
        for _ in range(200):
            engine.pause_queue("mail")
            engine.resume_queue("mail")
        await eventually(lambda: log.total_events >= 400)
        await pilot.pause()
        # one write per frame that had events, never one per event
        assert len(writes) <= app.frames - frames + 1
        assert len(writes) < 400
