"""Text from tasks on screen: drawn as written, never as terminal commands or markup; and
the widgets' inputs (before mount, bad items, one filter value, a paused log's order)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest
from pydantic import BaseModel, field_validator
from taskwatch.engine import (
    ClusterNode,
    Engine,
    InvalidParams,
    InvalidStatus,
    Leadership,
    PeriodicInfo,
    Progress,
    QueueInfo,
    RunError,
    RunRecord,
    RunStatus,
    TaskContext,
    TriggerKeyState,
    TriggerState,
    WorkerInfo,
    event_from_dict,
)
from taskwatch.engine.events import EngineStarted
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.tui.demo import format_event_line, print_events
from taskwatch.tui.screens import TracebackScreen
from taskwatch.widgets import (
    EventLog,
    FailuresList,
    LeaderBadge,
    NodesTable,
    ParamsForm,
    QueuesTable,
    RunAttempt,
    RunDetail,
    RunsTable,
    ScheduleTable,
    StoreBadge,
    TaskStats,
    TaskStatsTable,
    TriggersTable,
    WorkersTable,
)
from textual.app import App, ComposeResult
from textual.geometry import Region
from textual.widget import Widget

from .helpers import eventually, screen_shown

T0 = 1_700_000_000.0
#: what a terminal takes for a command (newlines never appear inside a drawn line either)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
#: an error message echoing hostile input: retitles the window, rings, blinks red, clears
#: the screen with an 8-bit CSI; and Rich markup, one tag of it unbalanced
EVIL = "X\x1b]2;PWNED\x07Y\x1b[5;31mBLINK\x9b2J"
MARKUP = "[red]red[/red] [/path]"


class Host(App[None]):
    def __init__(self, *widgets: Widget) -> None:
        super().__init__()
        self._hosted = widgets

    def compose(self) -> ComposeResult:
        yield from self._hosted


def drawn_lines(widget: Widget) -> list[str]:
    """The text of every line the widget, and every widget in it, draws."""
    lines: list[str] = []
    for shown in (widget, *widget.query("*")):
        width, height = shown.size
        if width and height:
            lines.extend(strip.text for strip in shown.render_lines(Region(0, 0, width, height)))
    return lines


def assert_no_control(lines: list[str]) -> str:
    for line in lines:
        assert CONTROL.search(line) is None, repr(line)
    return "\n".join(lines)


def record(run_id: str, task: str = "fetch", **fields: Any) -> RunRecord:
    fields.setdefault("status", RunStatus.SUCCEEDED)
    fields.setdefault("created_at", T0)
    return RunRecord(id=run_id, task=task, **fields)


def evil_error() -> RunError:
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "app.py", line 3, in fetch\n'
        "\traise ValueError(name)\n"
        f"ValueError: {EVIL}\n"
    )
    return RunError(type="ValueError", message=f"{EVIL} {MARKUP}", traceback=traceback)


# ---------------------------------------------------------------- text from tasks


async def test_event_log_shows_control_characters_escaped_and_markup_as_written() -> None:
    log = EventLog()
    async with Host(log).run_test(size=(220, 20)) as pilot:
        log.add_events([
            event_from_dict({"kind": "run.failed", "seq": 1, "ts": T0, "run_id": "r1", "task": "fetch",
                             "error": {"type": "ValueError", "message": EVIL}}),
            event_from_dict({"kind": "run.submitted", "seq": 2, "ts": T0, "run_id": "r2", "task": "t\x1b[5mZ",
                             "params": {"name": "\x9b2J"}}),
            event_from_dict({"kind": "run.progress", "seq": 3, "ts": T0, "run_id": "r2", "task": "t",
                             "message": MARKUP}),
        ])
        await pilot.pause()
        text = assert_no_control([strip.text for strip in log.lines] + drawn_lines(log))
        assert "X\\x1b]2;PWNED\\x07Y\\x1b[5;31mBLINK" in text
        assert "task=t\\x1b[5mZ" in text and "\\x9b2J" in text
        assert f"message={MARKUP}" in text
        assert len(log.lines) == 3  # one line per event still


async def test_runs_table_shows_a_task_name_with_a_newline_or_escape_on_one_line() -> None:
    table = RunsTable()
    async with Host(table).run_test(size=(100, 10)) as pilot:
        table.update_runs([
            record("run-1", task="a\nb", created_at=T0 + 1),
            record("run-2", task="\x1b[5mZ", created_at=T0),
        ], now=T0 + 5)
        await pilot.pause()
        text = assert_no_control(drawn_lines(table))
        rows = text.splitlines()
        assert "a\\nb" in rows[1] and "\\x1b[5mZ" in rows[2]
        assert table.row_count == 2


async def test_run_detail_shows_a_hostile_error_escaped_and_the_traceback_on_its_lines() -> None:
    detail = RunDetail()
    failed = record(
        "run-1", task="fe\x1btch", status=RunStatus.FAILED, started_at=T0, finished_at=T0 + 1,
        error=evil_error(), params={"name": "\x9b2J"}, progress=Progress(done=1, total=2, message=MARKUP),
        node="n\x07ode",
    )
    attempts = [RunAttempt(number=1, started_at=T0, ended_at=T0 + 1, outcome="failed", error=failed.error,
                           recovery="requeued: \x1b[2J")]
    async with Host(detail).run_test(size=(200, 80)) as pilot:
        detail.show(failed, now=T0 + 2, attempts=attempts)
        await pilot.pause()
        lines = drawn_lines(detail)
        text = assert_no_control(lines)
        assert "X\\x1b]2;PWNED\\x07Y\\x1b[5;31mBLINK\\x9b2J" in text
        assert MARKUP in text  # the message, the progress message: markup shown, not applied
        assert "fe\\x1btch" in text and "n\\x07ode" in text and "\\x9b2J" in text and "\\x1b[2J" in text
        # the traceback keeps its lines
        assert any(line.strip().startswith('File "app.py", line 3') for line in lines)
        assert any(line.strip().startswith("raise ValueError(name)") for line in lines)
        assert failed.error is not None and detail.traceback_text == failed.error.traceback  # the data stays whole


async def test_failures_list_shows_hostile_runs_and_workers_escaped() -> None:
    failures = FailuresList()
    failed = record("run-1", task="fe\x1btch", status=RunStatus.FAILED, error=evil_error())
    worker = WorkerInfo(name="po\x1b]0;x\x07ller", leader_only=False, state="backoff", crashes=1,
                        last_error=evil_error(), last_error_at=T0 + 5)
    async with Host(failures).run_test(size=(200, 60)) as pilot:
        failures.update([failed], [worker])
        await pilot.pause()
        assert failures.table.row_count == 2
        for kind, ident in (("worker", worker.name), ("run", failed.id)):
            assert failures.select(kind, ident)  # type: ignore[arg-type]
            await pilot.pause()
            text = assert_no_control(drawn_lines(failures))
            assert "X\\x1b]2;PWNED" in text and MARKUP in text
            title, traceback = failures.selected_traceback() or ("", "")
            assert CONTROL.search(title) is None and "\\x1b]2;PWNED" in title
            assert CONTROL.search(traceback.replace("\n", "")) is None and "\\x1b[5;31m" in traceback
        assert "fe\\x1btch" in text and "po\\x1b]0;x\\x07ller" in text


def test_the_plain_printer_writes_one_escaped_line_per_event() -> None:
    line = format_event_line(event_from_dict({
        "kind": "run.failed", "seq": 7, "ts": T0, "run_id": "r1", "task": "fetch",
        "error": {"type": "ValueError", "message": f"{EVIL}\nsecond line"},
    }))
    assert CONTROL.search(line) is None
    assert "X\\x1b]2;PWNED\\x07Y\\x1b[5;31mBLINK\\x9b2J\\nsecond line" in line


async def test_plain_output_of_a_real_engine_holds_no_escape_sequence(capsys: pytest.CaptureFixture[str]) -> None:
    engine = Engine(health_interval=None)

    @engine.periodic(every=3600.0, initial_delay=0.0, name="fetch")
    async def fetch(ctx: TaskContext) -> None:
        raise ValueError(EVIL)

    stopping: list[asyncio.Task[None]] = []  # referred to until the end: never collected pending

    def stop_after_failure(event: Any) -> None:
        stopping.append(asyncio.get_running_loop().create_task(engine.stop()))

    engine.bus.add_callback(stop_after_failure, ("run.failed",))
    await asyncio.wait_for(print_events(engine), timeout=30)
    out = capsys.readouterr().out
    failed = [line for line in out.splitlines() if " run.failed " in line]
    assert failed and "X\\x1b]2;PWNED\\x07Y\\x1b[5;31mBLINK\\x9b2J" in failed[0]
    assert CONTROL.search(out.replace("\n", "")) is None


async def test_dashboard_traceback_and_notifications_hold_no_escape_sequence() -> None:
    engine = Engine(node_id="text-test", health_interval=None)

    @engine.task(name="fetch")
    async def fetch(ctx: TaskContext) -> None:
        raise ValueError(f"{EVIL} {MARKUP}")  # the traceback screen's title quotes it

    app = TaskwatchApp(LocalClient(engine, manage=True), refresh_hz=30.0, overview_interval=0.2)
    async with app.run_test(size=(160, 44), notifications=True) as pilot:
        await eventually(lambda: app.state.node_id == "text-test")
        failed = await (await engine.submit("fetch")).wait(5)
        table = app.main.query_one(RunsTable)
        await eventually(lambda: table.record(failed.id) is not None and table.select_run(failed.id))
        await pilot.press("t")
        screen = await screen_shown(app, TracebackScreen)
        await pilot.pause()
        text = assert_no_control(drawn_lines(screen))
        assert "X\\x1b]2;PWNED\\x07Y\\x1b[5;31mBLINK" in text
        assert "[red]red[/red]" in text  # the title as written, not read as markup
        await pilot.press("escape")
        await eventually(lambda: not isinstance(app.screen, TracebackScreen))
        # a notification quoting a key or an error: escaped, and its brackets no markup to fail on
        app.notify(f"trigger compile fired for key {EVIL} {MARKUP}")
        await eventually(lambda: any("fired for key" in line for line in drawn_lines(app.screen)))
        text = assert_no_control(drawn_lines(app.screen))
        toast = text[text.index("fired for key"):]
        assert "X\\x1b]2;PWNED" in toast and "[red]red[/red]" in toast  # as written
        assert app.is_running


# ---------------------------------------------------------------- what the widgets are given


async def test_run_detail_shown_before_mount_is_drawn_once_mounted() -> None:
    detail = RunDetail()
    shown = record("run-early-1", status=RunStatus.FAILED, error=RunError(type="KeyError", message="gone"))
    detail.show(shown)
    async with Host(detail).run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert detail.record == shown
        assert not detail.query_one("#run-detail-empty").display
        text = "\n".join(drawn_lines(detail))
        assert "run-early-1" in text and "KeyError: gone" in text and "No run selected." not in text
        detail.show(shown)  # the same again: still shown
        await pilot.pause()
        assert "run-early-1" in "\n".join(drawn_lines(detail))


async def test_failures_list_updated_before_mount_shows_them_once_mounted() -> None:
    failures = FailuresList()
    failures.update([record("run-early-1", status=RunStatus.FAILED, error=RunError(type="KeyError", message="gone"))], [])
    async with Host(failures).run_test(size=(120, 40)) as pilot:
        await pilot.pause()
        assert failures.table.row_count == 1
        assert "KeyError: gone" in "\n".join(drawn_lines(failures))


async def test_failures_list_shows_a_recovered_runs_tries_as_the_other_widgets_do() -> None:
    # recovery runs a run allowed one try as its attempt 2 (the lost try counts): the runs table
    # and the detail said "2/2", the failures list "2/1", in its row and its detail line
    failures = FailuresList()
    lost = record(
        "run-lost-1", status=RunStatus.FAILED, attempt=2, max_attempts=1, error=RunError(type="WorkerLost", message="x")
    )
    async with Host(failures).run_test(size=(120, 40)) as pilot:
        failures.update([lost], [])
        await pilot.pause()
        text = "\n".join(drawn_lines(failures))
        assert "2/2" in text and "2/1" not in text


async def test_event_log_and_store_badge_refuse_what_they_could_not_draw_and_change_nothing() -> None:
    log, badge = EventLog(), StoreBadge()
    async with Host(log, badge).run_test(size=(100, 12)) as pilot:
        good = EngineStarted(seq=1, ts=T0, node="n")
        with pytest.raises(TypeError, match="takes events; item 1 is str"):
            log.add_events([good, "x"])  # type: ignore[list-item]
        assert log.total_events == 0
        log.set_filter(["engine."])  # redraws the history: nothing bad was kept in it
        log.add_events([good])
        await pilot.pause()
        assert log.total_events == 1
        with pytest.raises(TypeError, match="store is text; got int"):
            badge.update(1, "i", "in-process")  # type: ignore[arg-type]
        badge.update("memory", "abcdef0123", "in-process")
        await pilot.pause()
        assert "store memory" in "".join(drawn_lines(badge))
        assert pilot.app.is_running


async def test_runs_table_refuses_a_batch_with_a_bad_item_and_changes_nothing() -> None:
    table = RunsTable()
    async with Host(table).run_test(size=(100, 10)) as pilot:
        good = record("run-1")
        with pytest.raises(TypeError, match="takes RunRecord objects; item 1 is NoneType"):
            table.update_runs([good, None], now=T0)  # type: ignore[list-item]
        await pilot.pause()
        assert table.row_count == 0 and table.record("run-1") is None
        with pytest.raises(TypeError, match="now must be a UNIX time"):
            table.update_runs([good], now="soon")  # type: ignore[arg-type]
        assert table.row_count == 0
        table.update_runs([good], now=T0)
        await pilot.pause()
        assert table.row_count == 1 and "fetch" in drawn_lines(table)[1]


async def test_filters_take_one_string_as_one_value_and_refuse_unknown_statuses() -> None:
    table = RunsTable()
    log = EventLog()
    async with Host(table, log).run_test(size=(120, 30)) as pilot:
        table.update_runs([
            record("run-1", task="etl", status=RunStatus.FAILED),
            record("run-2", task="e", status=RunStatus.SUCCEEDED, created_at=T0 + 1),
        ], now=T0)
        log.add_events([
            event_from_dict({"kind": "run.failed", "seq": 1, "ts": T0, "run_id": "r1", "task": "etl",
                             "error": {"type": "E", "message": "m"}}),
            event_from_dict({"kind": "run.submitted", "seq": 2, "ts": T0, "run_id": "r2", "task": "e"}),
        ])
        await pilot.pause()
        table.set_filter("failed")
        await pilot.pause()
        assert table.statuses == {"failed"} and table.row_count == 1
        table.set_filter(None, tasks="e")  # the task "e", not every task with an e in its name
        await pilot.pause()
        assert table.row_count == 1 and table.selected_run_id == "run-2"
        with pytest.raises(InvalidStatus, match="'failled' is not a run status; use one of pending"):
            table.set_filter({"failled"})
        with pytest.raises(TypeError, match="tasks must be strings"):
            table.set_filter(None, tasks=[3])  # type: ignore[list-item]
        await pilot.pause()
        assert table.statuses is None and table.row_count == 1  # the filter stayed
        log.set_filter("run.failed")
        await pilot.pause()
        assert log.filter_kinds == {"run.failed"} and len(log.lines) == 1


async def test_event_log_keeps_the_order_of_events_that_came_while_paused() -> None:
    log = EventLog()
    async with Host(log).run_test(size=(120, 20)) as pilot:
        def ev(kind: str, seq: int) -> Any:
            extra = {"error": {"type": "E", "message": "m"}} if kind == "run.failed" else {}
            return event_from_dict({"kind": kind, "seq": seq, "ts": T0 + seq, "run_id": f"r{seq}", "task": "t", **extra})

        def shown() -> list[str]:
            return [strip.text.split()[1] for strip in log.lines]

        log.add_events([ev("run.submitted", 1)])
        log.set_filter(["run.failed"])
        log.paused = True
        log.add_events([ev("run.failed", 2), ev("run.submitted", 3), ev("run.failed", 4)])
        await pilot.pause()
        assert shown() == []  # frozen
        log.paused = False
        await pilot.pause()
        assert shown() == ["#2", "#4"]
        log.set_filter(None)
        await pilot.pause()
        assert shown() == ["#1", "#2", "#3", "#4"]

        # the filter changed while paused: the view stays on what came before the pause,
        # and the resume draws what came since as the new filter has it
        log.set_filter(["run.failed"])
        log.paused = True
        log.add_events([ev("run.submitted", 5), ev("run.failed", 6)])
        log.set_filter(None)
        await pilot.pause()
        assert shown() == ["#1", "#2", "#3", "#4"]
        log.paused = False
        await pilot.pause()
        assert shown() == ["#1", "#2", "#3", "#4", "#5", "#6"]


# ---------------------------------------------------------------- the keyed tables, the form, the badges


async def test_every_keyed_table_shows_names_from_tasks_and_nodes_escaped_on_one_line() -> None:
    name = f"n{EVIL}\nZ"
    triggers, queues, workers, schedule, nodes, stats = (
        TriggersTable(), QueuesTable(), WorkersTable(), ScheduleTable(), NodesTable(), TaskStatsTable()
    )
    tables = (triggers, queues, workers, schedule, nodes, stats)
    async with Host(*tables).run_test(size=(400, 60)) as pilot:
        triggers.update_triggers(
            [TriggerState(name="t", size_threshold=5, keys=[TriggerKeyState(key=name, count=1)], key_count=1)], now=T0
        )
        queues.update_queues(
            [QueueInfo(name=name, concurrency=1, maxsize=0, depth=1, in_flight=0, processed=0, failed=0)]
        )
        workers.update_workers([WorkerInfo(name=name, leader_only=False, state="running")], now=T0)
        schedule.update_schedule(
            [PeriodicInfo(name=name, trigger="every 1s", trigger_kind="interval", enabled=False, reason=f"r{EVIL}")],
            now=T0,
        )
        nodes.update_nodes([ClusterNode(node=name)], now=T0)
        stats.update_stats([TaskStats(task=name)])
        await pilot.pause()
        for table in tables:
            lines = drawn_lines(table)
            text = assert_no_control(lines)
            assert "nX\\x1b]2;PWNED\\x07Y" in text, (type(table).__name__, table.size, text)
            assert table.row_count == 1
        assert "disabled: rX\\x1b]2;PWNED" in "\n".join(drawn_lines(schedule))  # why it is disabled, too


class Url(BaseModel):
    url: str

    @field_validator("url")
    @classmethod
    def check(cls, value: str) -> str:
        raise ValueError(f"not a URL: {value}")  # echoes what was typed, as validators do


async def test_params_form_shows_error_messages_escaped() -> None:
    engine = Engine(health_interval=None)

    @engine.task(name="fetch")
    async def fetch(ctx: TaskContext, params: Url) -> None:
        pass

    info = next(task for task in engine.catalog() if task.name == "fetch")
    await engine.start()
    try:
        with pytest.raises(InvalidParams) as refused:
            await engine.submit("fetch", {"url": EVIL})
    finally:
        await engine.stop()
    form = ParamsForm(info, cursor_blink=False)
    async with Host(form).run_test(size=(120, 30)) as pilot:
        errors = [*refused.value.errors, {"loc": ("elsewhere",), "msg": f"general {EVIL}\nsecond line"}]
        form.show_errors(errors)
        await pilot.pause()
        text = assert_no_control(drawn_lines(form))
        assert "not a URL: X\\x1b]2;PWNED\\x07Y\\x1b[5;31mBLINK\\x9b2J" in text
        assert "elsewhere: general X\\x1b]2;PWNED" in text
        assert any(line.strip() == "second line" for line in drawn_lines(form))  # its own line, as written


async def test_leader_and_store_badges_show_names_from_other_processes_escaped() -> None:
    leader, follower, lost, failed, store = LeaderBadge(), LeaderBadge(), LeaderBadge(), LeaderBadge(), StoreBadge()
    async with Host(leader, follower, lost, failed, store).run_test(size=(300, 12)) as pilot:
        leadership = Leadership(node_id=f"node{EVIL}", is_leader=False, holder=f"h{EVIL}", term=3, expires_at=T0 + 5)
        leader.update(leadership.model_copy(update={"is_leader": True}), started_at=T0 - 10, now=T0)
        follower.update(leadership, started_at=T0 - 10, now=T0)
        lost.update(leadership, started_at=T0 - 10, now=T0)
        lost.update_disconnected(f"tcp://{EVIL}")
        failed.update_failed(f"refused: {EVIL}")
        store.update(f"sqlite:/x/{EVIL}", f"i{EVIL}", f"tcp://{EVIL}")
        await pilot.pause()
        for badge, shown in (
            (leader, "LEADER  nodeX\\x1b]2;PWNED"),
            (follower, "leader hX\\x1b]2;PWNED"),
            (lost, "to tcp://X\\x1b]2;PWNED"),
            (failed, "refused: X\\x1b]2;PWNED"),
            (store, "via tcp://X\\x1b]2;PWNED"),
        ):
            assert shown in assert_no_control(drawn_lines(badge))
        assert "last seen nodeX\\x1b]2;PWNED" in "".join(drawn_lines(lost))
        assert "store sqlite:/x/X\\x1b]2;PWNED" in "".join(drawn_lines(store))
