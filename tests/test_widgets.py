"""Each taskwatch widget alone in a tiny host app, checked the way a user would notice."""

from __future__ import annotations

import io
import time
from enum import Enum
from typing import Any

import pytest
from pydantic import BaseModel, Field
from rich.console import Console, RenderableType
from taskwatch.engine import (
    BaseEvent,
    ClusterNode,
    Leadership,
    PeriodicInfo,
    Progress,
    QueueInfo,
    RunError,
    RunRecord,
    RunStatus,
    StoredRun,
    TaskInfo,
    TriggerKeyState,
    TriggerState,
    WorkerInfo,
    event_from_dict,
)
from taskwatch.engine.events import HealthSample
from taskwatch.widgets import (
    ClusterRunsTable,
    CountsBar,
    EventLog,
    FailuresList,
    HealthSparklines,
    LeaderBadge,
    NodesTable,
    ParamsForm,
    ParamsFormError,
    QueuesTable,
    RunDetail,
    RunsTable,
    ScheduleTable,
    StoreNodesTable,
    TriggersTable,
    WorkersTable,
)
from textual import on
from textual.app import App, ComposeResult
from textual.message import Message
from textual.widget import Widget
from textual.widgets import Input, Select, Sparkline, Static, Switch

from .helpers import eventually

SIZE = (120, 40)
T0 = 1_700_000_000.0


# ---------------------------------------------------------------- helpers


class Host(App[None]):
    """Composes the given widgets and records the messages they post."""

    def __init__(self, *widgets: Widget) -> None:
        super().__init__()
        self._hosted = widgets
        self.messages: list[Message] = []

    def compose(self) -> ComposeResult:
        yield from self._hosted

    @on(RunsTable.RunHighlighted)
    @on(RunsTable.RunSelected)
    @on(ScheduleTable.PeriodicSelected)
    @on(FailuresList.FailureSelected)
    @on(ParamsForm.Submitted)
    @on(EventLog.EventChosen)
    def _record(self, message: Message) -> None:
        self.messages.append(message)

    def of(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]


def plain(renderable: RenderableType | Any, width: int = 200) -> str:
    """A renderable as plain text (what the user reads)."""
    console = Console(file=io.StringIO(), width=width, color_system=None, legacy_windows=False)
    with console.capture() as capture:
        console.print(renderable)
    return capture.get()


def run(
    run_id: str,
    created: float,
    *,
    task: str = "send_email",
    status: RunStatus = RunStatus.SUCCEEDED,
    started: float | None = None,
    finished: float | None = None,
    attempt: int = 1,
    max_attempts: int = 1,
    progress: Progress | None = None,
    error: RunError | None = None,
    params: dict[str, Any] | None = None,
    result: Any = None,
) -> RunRecord:
    return RunRecord(
        id=run_id,
        task=task,
        params=params or {},
        status=status,
        attempt=attempt,
        max_attempts=max_attempts,
        created_at=T0 + created,
        started_at=None if started is None else T0 + started,
        finished_at=None if finished is None else T0 + finished,
        progress=progress or Progress(),
        error=error,
        result=result,
    )


def failure() -> RunError:
    try:
        1 / 0
    except ZeroDivisionError as exc:
        return RunError.from_exception(exc)
    raise AssertionError("unreachable")


def cell(table: Any, row: str, column: str) -> str:
    return str(table.get_cell(row, column))


# ---------------------------------------------------------------- the cluster's tables


async def test_store_nodes_table_shows_state_heartbeat_load_leader_and_version() -> None:
    table = StoreNodesTable()
    nodes = [
        ClusterNode(node="a", is_leader=True, term=4, running=3, cpu_percent=37.4, rss_bytes=96 << 20,
                    version="1.2.0", last_heartbeat=T0 - 1.5, events=10),
        ClusterNode(node="b", is_leader=False, running=0, cpu_percent=2.0, rss_bytes=80 << 20,
                    version="1.1.0", last_heartbeat=T0 - 95, dead=True, missed=4),
        ClusterNode(node="c", stopped=True, version="1.2.0", last_heartbeat=T0 - 30),
    ]  # fmt: skip
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_nodes(nodes, T0)
        await pilot.pause()
        assert table.shown_keys == ["a", "b", "c"]
        assert [cell(table, n, "state") for n in "abc"] == ["up", "dead", "stopped"]
        assert table.get_cell("b", "state").style == "bold red"
        assert [cell(table, n, "role") for n in "abc"] == ["LEADER t4", "follower", "—"]
        assert cell(table, "a", "heartbeat") == "1.5s ago" and cell(table, "b", "heartbeat") == "1m35s ago"
        assert (cell(table, "a", "cpu"), cell(table, "a", "rss"), cell(table, "a", "running")) == ("37%", "96.0 MiB", "3")
        assert (cell(table, "c", "cpu"), cell(table, "c", "rss")) == ("—", "—")
        assert [cell(table, n, "version") for n in "abc"] == ["1.2.0", "1.1.0", "1.2.0"]
        assert cell(table, "b", "missed") == "4"


def relay_nodes() -> list[ClusterNode]:
    return [
        ClusterNode(node="api-1", is_leader=True, term=2, running=2, cpu_percent=41.5, rss_bytes=212 << 20,
                    last_kind="health", last_ts=T0 - 2, events=13),
        ClusterNode(node="api-2", is_leader=False, running=1, cpu_percent=12.3, rss_bytes=148 << 20,
                    last_kind="health", last_ts=T0 - 1, events=10),
        ClusterNode(node="api-3", is_leader=False, term=1, stopped=True, running=0, cpu_percent=3.1,
                    rss_bytes=131 << 20, last_kind="engine.stopped", last_ts=T0 - 21, events=9, missed=27),
    ]  # fmt: skip


async def test_nodes_table_fits_80_columns_by_leaving_out_the_last_event() -> None:
    table = NodesTable()
    async with Host(table).run_test(size=(80, 24)) as pilot:
        table.update_nodes(relay_nodes(), T0)
        await pilot.pause()
        assert [column.key.value for column in table.ordered_columns] == [
            "node", "role", "state", "running", "cpu", "rss", "events", "missed"
        ]  # fmt: skip
        # nothing hides past the right edge: the missed counts are in sight
        assert table.virtual_size.width <= table.size.width
        assert cell(table, "api-3", "missed") == "27"
        header, first = (table.render_line(y).text for y in (0, 1))
        assert header.index("leader") == first.index("LEADER t2") and header.index("missed") < len(first)

        await pilot.resize_terminal(140, 24)
        await pilot.pause()
        assert [column.key.value for column in table.ordered_columns] == [c.key for c in NodesTable.COLUMNS]
        assert (cell(table, "api-3", "last"), cell(table, "api-3", "ago")) == ("engine.stopped", "21s ago")
        assert table.virtual_size.width <= table.size.width


async def test_a_stopped_node_has_no_role_and_its_last_load_is_dimmed() -> None:
    table = NodesTable()
    async with Host(table).run_test(size=(140, 24)) as pilot:
        table.update_nodes(relay_nodes(), T0)
        await pilot.pause()
        assert [cell(table, n, "role") for n in ("api-1", "api-2", "api-3")] == ["LEADER t2", "follower", "—"]
        assert (cell(table, "api-3", "cpu"), cell(table, "api-3", "rss")) == ("3%", "131.0 MiB")
        assert table.get_cell("api-3", "cpu").style == "dim" and table.get_cell("api-1", "cpu").style == ""


async def test_cluster_runs_table_names_each_runs_node() -> None:
    table = ClusterRunsTable()
    on_a = StoredRun(id="a" * 16, task="t", status=RunStatus.RUNNING, created_at=T0, started_at=T0, node="node-a")
    waiting = StoredRun(id="b" * 16, task="t", status=RunStatus.PENDING, created_at=T0 + 1)
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs([on_a, waiting], now=T0 + 2)
        await pilot.pause()
        assert table.shown_keys == ["b" * 16, "a" * 16]
        assert (cell(table, "a" * 16, "node"), cell(table, "b" * 16, "node")) == ("node-a", "—")
        assert (cell(table, "a" * 16, "status"), cell(table, "a" * 16, "duration")) == ("running", "2.0s")
        table.update_runs([on_a.model_copy(update={"status": RunStatus.CANCELLED, "finished_at": T0 + 3})], now=T0 + 4)
        await pilot.pause()
        assert cell(table, "a" * 16, "status") == "cancelled" and cell(table, "a" * 16, "node") == "node-a"


# ---------------------------------------------------------------- RunsTable


async def test_runs_table_shows_newest_first_with_formatted_cells() -> None:
    table = RunsTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs(
            [
                run("a" * 16, 1, started=1, finished=3.5, attempt=2, max_attempts=3),
                run("b" * 16, 3, status=RunStatus.PENDING),
                run("c" * 16, 2, status=RunStatus.RUNNING, started=2, progress=Progress(done=3, total=5)),
                # a count with no total: how far it got, as the detail pane says it
                run("d" * 16, 0, status=RunStatus.RUNNING, started=0.5, progress=Progress(done=42)),
            ],
            now=T0 + 6,
        )
        await pilot.pause()
        assert table.shown_keys == ["b" * 16, "c" * 16, "a" * 16, "d" * 16]
        assert cell(table, "d" * 16, "progress") == "42 done"
        assert cell(table, "a" * 16, "id") == "aaaaaaaa"
        assert cell(table, "a" * 16, "attempt") == "2/3"
        assert cell(table, "a" * 16, "duration") == "2.5s"
        assert cell(table, "c" * 16, "progress") == "████░░░  60%"  # 7 blocks: the 80-column layout
        assert cell(table, "c" * 16, "duration") == "4.0s"  # live: now - started
        assert cell(table, "b" * 16, "progress") == "—"
        assert cell(table, "b" * 16, "started") == "—"
        assert table.get_cell("c" * 16, "status").style == "bold yellow"

        # a newer run goes on top, an older one to the bottom
        table.update_runs([run("d" * 16, 10), run("e" * 16, 0)], now=T0 + 11)
        await pilot.pause()
        assert table.shown_keys == ["d" * 16, "b" * 16, "c" * 16, "a" * 16, "e" * 16]


async def test_runs_table_renders_a_cell_once_and_again_only_when_it_changes() -> None:
    table = RunsTable()
    records = [
        run("r1", 1, status=RunStatus.FAILED, started=1, finished=2),
        run("r2", 2, status=RunStatus.RUNNING, started=2),
        run("r3", 3, status=RunStatus.PENDING),
    ]
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs(records, now=T0 + 4)
        await pilot.pause()
        drawn = table.cells_rendered
        assert 0 < drawn <= 4 * len(RunsTable.COLUMNS)  # the header and three rows

        # the same data again (even as new objects), and the whole table repainted: nothing is rendered
        table.update_runs([r.model_copy() for r in records], now=T0 + 4)
        table.refresh()
        await pilot.pause()
        assert table.cells_rendered == drawn

        # time passes: only the running run's duration ticks (and it is not passed in)
        table.update_runs([], now=T0 + 9)
        await pilot.pause()
        assert table.cells_rendered == drawn + 1
        assert cell(table, "r2", "duration") == "7.0s"
        assert "7.0s" in table.render_line(2).text

        # one status change: one cell
        table.update_runs([records[0].model_copy(update={"status": RunStatus.CANCELLED})], now=T0 + 9)
        await pilot.pause()
        assert table.cells_rendered == drawn + 2
        assert cell(table, "r1", "status") == "cancelled"
        assert table.row_count == 3


async def test_runs_table_of_5000_runs_draws_a_screenful_and_reaches_the_oldest_run() -> None:
    table = RunsTable(max_rows=5000)
    ids = [f"abcdef01-r{i:07d}" for i in range(5000)]  # the last 8 characters show
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs([run(run_id, i) for i, run_id in enumerate(ids)], now=T0 + 5000)
        await pilot.pause()
        assert table.row_count == 5000
        lines = table.size.height
        assert lines < 100
        # drawing the screen renders what is in view, not 5,000 rows
        assert table.cells_rendered <= lines * len(RunsTable.COLUMNS)
        assert table.render_line(1).text.split()[0] == "r0004999"  # the newest first

        table.focus()
        await pilot.press("G")
        assert table.selected_run_id == ids[0] and table.cursor_row == 4999
        assert table.render_line(lines - 1).text.split()[0] == "r0000000"  # the oldest, in view

        await pilot.press("g")
        assert table.selected_run_id == ids[-1]
        assert table.render_line(1).text.split()[0] == "r0004999"
        await pilot.press("pagedown")
        page = table.cursor_row
        assert 0 < page < lines
        shown = [table.render_line(y).text.split()[0] for y in range(1, lines)]
        assert ids[4999 - page][-8:] in shown  # the cursor's run is on screen
        assert table.cells_rendered <= 4 * lines * len(RunsTable.COLUMNS)


async def test_runs_table_keeps_the_chosen_run_while_a_thousand_newer_runs_arrive() -> None:
    table = RunsTable(max_rows=5000)
    host = Host(table)
    async with host.run_test(size=SIZE) as pilot:
        table.update_runs([run(f"0000000-old{i:05d}", i) for i in range(200)], now=T0 + 200)
        await pilot.pause()
        chosen = "0000000-old00120"
        table.focus()
        assert table.select_run(chosen)
        await pilot.pause()
        before = table.cursor_row
        for batch in range(10):
            table.update_runs(
                [run(f"0000000-new{batch}{i:04d}", 1000 + batch * 100 + i) for i in range(100)], now=T0 + 2000
            )
            await pilot.pause()
            assert table.selected_run_id == chosen
        assert table.cursor_row == before + 1000
        # the view followed the run: it is drawn, on the cursor's line
        lines = [table.render_line(y).text for y in range(table.size.height)]
        assert any(line.split()[:1] == ["old00120"] for line in lines)
        assert host.of(RunsTable.RunHighlighted)[-1].run_id == chosen
        await pilot.press("enter")
        await pilot.pause()
        assert [m.run_id for m in host.of(RunsTable.RunSelected)] == [chosen]


async def test_runs_table_click_puts_the_cursor_on_a_run_and_a_second_click_opens_it() -> None:
    table = RunsTable()
    host = Host(table)
    async with host.run_test(size=SIZE) as pilot:
        table.update_runs([run("first-run-000000", 1), run("second-run-00000", 2), run("third-run-000000", 3)], now=T0 + 4)
        await pilot.pause()
        assert table.selected_run_id == "third-run-000000"
        await pilot.click(table, offset=(3, 3))  # line 0 is the header: the third row
        await pilot.pause()
        assert table.selected_run_id == "first-run-000000"
        assert host.of(RunsTable.RunHighlighted)[-1].run_id == "first-run-000000"
        assert host.of(RunsTable.RunSelected) == []
        await pilot.click(table, offset=(30, 3))
        await pilot.pause()
        assert [m.run_id for m in host.of(RunsTable.RunSelected)] == ["first-run-000000"]
        await pilot.click(table, offset=(3, 0))  # the header chooses nothing
        await pilot.pause()
        assert table.selected_run_id == "first-run-000000"
        assert len(host.of(RunsTable.RunSelected)) == 1


async def test_runs_table_filters_by_status_and_text() -> None:
    table = RunsTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs(
            [
                run("f00d0001", 1, task="send_email", status=RunStatus.FAILED),
                run("f00d0002", 2, task="resize_image", status=RunStatus.SUCCEEDED),
                run("beef0003", 3, task="send_email", status=RunStatus.RUNNING, started=3),
                run("beef0004", 4, task="resize_image", status=RunStatus.FAILED),
            ],
            now=T0 + 5,
        )
        table.set_filter({"failed"}, "")
        await pilot.pause()
        assert table.shown_keys == ["beef0004", "f00d0001"]

        table.set_filter(None, "EMAIL")
        assert table.shown_keys == ["beef0003", "f00d0001"]

        table.set_filter({"failed", "running"}, "beef")  # id substring
        assert table.shown_keys == ["beef0004", "beef0003"]

        # a run that stops matching leaves; a new matching one appears in order
        table.update_runs(
            [run("beef0003", 3, task="send_email", status=RunStatus.SUCCEEDED, started=3, finished=4),
             run("beef0005", 5, status=RunStatus.FAILED)],
            now=T0 + 6,
        )
        assert table.shown_keys == ["beef0005", "beef0004"]

        table.set_filter(None, "")
        await pilot.pause()
        assert table.shown_keys == ["beef0005", "beef0004", "beef0003", "f00d0002", "f00d0001"]


async def test_runs_table_task_filter_names_a_task_exactly() -> None:
    table = RunsTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs(
            [
                run("aaaa0001", 1, task="db"),
                run("aaaa06db", 2, task="email"),  # its id ends in "db"
                run("aaaa0003", 3, task="fail", status=RunStatus.FAILED),
                run("aaaa0004", 4, task="deep_fail", status=RunStatus.FAILED),
            ],
            now=T0 + 5,
        )
        table.set_filter(None, "", tasks={"db"})
        await pilot.pause()
        assert table.shown_keys == ["aaaa0001"]
        table.set_filter(None, "", tasks={"fail"})
        assert table.shown_keys == ["aaaa0003"]
        table.set_filter(None, "", tasks={"fail", "db"})
        assert table.shown_keys == ["aaaa0003", "aaaa0001"]
        table.set_filter({"succeeded"}, "", tasks={"fail", "db"})
        assert table.shown_keys == ["aaaa0001"]
        # free text still matches task names and ids in part
        table.set_filter(None, "db")
        assert table.shown_keys == ["aaaa06db", "aaaa0001"]


async def test_runs_table_keeps_a_bounded_number_of_rows_trimmed_in_batches() -> None:
    table = RunsTable(max_rows=20, trim_batch=5)
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs([run(f"r{i:03d}", i) for i in range(25)], now=T0 + 30)
        await pilot.pause()
        assert table.row_count == 25  # within the slack: no trim yet

        table.update_runs([run("r025", 25)], now=T0 + 30)
        await pilot.pause()
        assert table.row_count == 20
        assert table.shown_keys == [f"r{i:03d}" for i in range(25, 5, -1)]  # the oldest went
        assert table.record("r000") is None

        # an untouched cursor follows the newest run; the user moves it onto r024 to hold it
        assert table.selected_run_id == "r025"
        table.focus()
        await pilot.press("j")
        assert table.selected_run_id == "r024"
        # many runs at once never leave more than max_rows + trim_batch behind
        table.update_runs([run(f"s{i:03d}", 100 + i) for i in range(100)], now=T0 + 300)
        await pilot.pause()
        # the newest 20, and the run under the cursor: it stays where the user put it
        assert table.shown_keys == [f"s{i:03d}" for i in range(99, 79, -1)] + ["r024"]
        assert table.selected_run_id == "r024"


async def test_runs_table_never_trims_a_pending_or_running_run_nor_the_selected_one() -> None:
    table = RunsTable(max_rows=5, trim_batch=2)
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs(
            [run("queued", 1, status=RunStatus.PENDING), run("busy", 2, status=RunStatus.RUNNING, started=2),
             run("done", 3), run("chosen", 4)],
            now=T0 + 5,
        )
        assert table.select_run("chosen")
        table.update_runs([run(f"r{i:03d}", 10 + i) for i in range(40)], now=T0 + 60)
        await pilot.pause()
        newest = [f"r{i:03d}" for i in range(39, 34, -1)]
        assert table.shown_keys == [*newest, "chosen", "busy", "queued"]
        assert table.record("done") is None  # finished, unselected: trimmed as before
        # once finished and no longer selected, they go with the next trim
        table.update_runs(
            [run("queued", 1, status=RunStatus.CANCELLED), run("busy", 2, started=2, finished=70)], now=T0 + 70
        )
        table.action_scroll_top()  # the cursor on r039
        await pilot.pause()
        table.update_runs([run(f"s{i:03d}", 100 + i) for i in range(8)], now=T0 + 120)
        await pilot.pause()
        assert table.shown_keys == [*(f"s{i:03d}" for i in range(7, 2, -1)), "r039"]


async def test_runs_table_never_trims_a_marked_run() -> None:
    table = RunsTable(max_rows=5, trim_batch=2)
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs([run(f"old-{i}", i) for i in range(3)], now=T0 + 5)
        table.focus()
        await pilot.press("space", "space")  # marks old-2 and old-1
        await pilot.press("g")  # the cursor back on the newest: it keeps nothing listed
        table.update_runs([run(f"r{i:03d}", 10 + i) for i in range(40)], now=T0 + 60)
        await pilot.pause()
        assert table.shown_keys == [*(f"r{i:03d}" for i in range(39, 34, -1)), "old-2", "old-1"]
        assert table.marked == ["old-2", "old-1"]
        assert cell(table, "old-2", "id") == "old-2" and table.get_cell("old-1", "id").style == "bold black on yellow"
        # unmarked, they go with the next trim
        table.clear_marks()
        table.update_runs([run(f"s{i:03d}", 100 + i) for i in range(3)], now=T0 + 120)
        await pilot.pause()
        assert "old-1" not in table.shown_keys and "old-2" not in table.shown_keys


def first_shown(table: RunsTable) -> str:
    """The id (its last 8 characters) on the first line under the header: what the user reads first."""
    return table.render_line(1).text.split()[0]


async def test_runs_table_follows_the_newest_run_until_the_user_moves_the_cursor() -> None:
    table = RunsTable()
    host = Host(table)
    async with host.run_test(size=SIZE) as pilot:
        table.update_runs([run(f"run-{i:04d}", i) for i in range(3)], now=T0 + 4)
        await pilot.pause()
        assert table.selected_run_id == "run-0002"

        # untouched, the table shows the newest runs as they come, well past a screenful
        screenful = table.size.height
        for i in range(3, 3 + 3 * screenful):
            table.update_runs([run(f"run-{i:04d}", i)], now=T0 + i)
            await pilot.pause()
        newest = f"run-{2 + 3 * screenful:04d}"
        assert table.selected_run_id == newest and table.cursor_row == 0
        assert table.scroll_y == 0 and first_shown(table) == newest[-8:]
        assert host.of(RunsTable.RunHighlighted)[-1].run_id == newest

        # a cursor the user moved holds its run (and the view keeps it in sight)
        table.focus()
        await pilot.press("j")
        chosen = table.selected_run_id
        assert chosen is not None and chosen != newest and not table.following
        for i in range(100, 100 + 2 * screenful):
            table.update_runs([run(f"new-{i:04d}", 1000 + i)], now=T0 + 2000)
            await pilot.pause()
        assert table.selected_run_id == chosen and table.cursor_row == 1 + 2 * screenful
        lines = [table.render_line(y).text for y in range(table.size.height)]
        assert any(line.split()[:1] == [chosen[-8:]] for line in lines)
        await pilot.press("enter")
        await pilot.pause()
        assert [m.run_id for m in host.of(RunsTable.RunSelected)] == [chosen]

        # g goes to the newest run and follows again
        await pilot.press("g")
        await pilot.pause()
        assert table.following and table.scroll_y == 0
        table.update_runs([run("latest-0", 5000)], now=T0 + 5000)
        await pilot.pause()
        assert table.selected_run_id == "latest-0" and first_shown(table) == "latest-0"

        # a run chosen by the program (the one just submitted) is held even on the top row
        assert table.select_run("latest-0")
        table.update_runs([run("latest-1", 5001)], now=T0 + 5001)
        await pilot.pause()
        assert table.selected_run_id == "latest-0" and table.cursor_row == 1
        assert table.select_run("nope") is False


async def test_runs_table_clears_the_selection_when_the_chosen_run_is_removed() -> None:
    table = RunsTable()
    host = Host(table)
    async with host.run_test(size=SIZE) as pilot:
        table.update_runs([run(f"run-{i}", i) for i in range(5)], now=T0 + 5)
        table.focus()
        await pilot.press("j", "j")
        assert table.selected_run_id == "run-2"
        table.remove_runs(["run-2"])
        await pilot.pause()
        # no neighbour takes its place: a key acting on "the selected run" finds none
        assert table.selected_run_id is None
        assert host.of(RunsTable.RunHighlighted)[-1].run_id is None
        table.update_runs([run("run-9", 9)], now=T0 + 9)
        await pilot.pause()
        assert table.selected_run_id is None
        await pilot.press("j")  # the next move puts the cursor back on the line it was on
        assert table.selected_run_id == "run-3" and table.cursor_row == 2


# ---------------------------------------------------------------- RunDetail


async def test_run_detail_shows_a_failure_with_its_traceback() -> None:
    detail = RunDetail()
    error = failure()
    record = run(
        "0123456789abcdef",
        1,
        task="charge_card",
        status=RunStatus.FAILED,
        started=1,
        finished=2,
        attempt=3,
        max_attempts=3,
        params={"amount": 42, "currency": "EUR"},
        progress=Progress(done=1, total=4, message="contacting bank"),
        error=error,
    )
    async with Host(detail).run_test(size=SIZE) as pilot:
        assert "No run selected" in plain(detail.query_one("#run-detail-empty", Static).content)
        detail.show(record)
        await pilot.pause()
        summary = plain(detail.query_one("#run-detail-summary", Static).content)
        assert "0123456789abcdef" in summary and "charge_card" in summary
        assert "failed" in summary and "3 of 3" in summary
        assert '"currency": "EUR"' in plain(detail.query_one("#run-detail-params", Static).content)
        assert "contacting bank" in plain(detail.query_one("#run-detail-progress-message", Static).content)
        assert detail.query_one("#run-detail-error-section").display
        assert not detail.query_one("#run-detail-result-section").display
        assert "ZeroDivisionError: division by zero" in plain(detail.query_one("#run-detail-error", Static).content)
        traceback = plain(detail.query_one("#run-detail-traceback", Static).content)
        assert "Traceback (most recent call last)" in traceback
        assert "1 / 0" in traceback
        assert detail.traceback_text == error.traceback

        success = run("feedfacefeedface", 2, status=RunStatus.SUCCEEDED, started=2, finished=3, result={"ok": True})
        detail.show(success)
        await pilot.pause()
        assert not detail.query_one("#run-detail-error-section").display
        assert '"ok": true' in plain(detail.query_one("#run-detail-result", Static).content)

        detail.show(None)
        await pilot.pause()
        assert not detail.query_one("#run-detail-body").display


async def test_a_run_recovered_past_its_tries_shows_its_attempt_against_what_it_may_take() -> None:
    # lost with its node, a run allowed one try comes back as its second attempt (recovery
    # raises no max_attempts): "2/2", its last try, never "2/1"
    record = run("0123456789abcdef", 1, status=RunStatus.RUNNING, started=1, attempt=2, max_attempts=1)
    table, detail = RunsTable(), RunDetail()
    async with Host(table, detail).run_test(size=SIZE) as pilot:
        table.update_runs([record], now=T0 + 2)
        detail.show(record)
        await pilot.pause()
        assert cell(table, record.id, "attempt") == "2/2"
        summary = plain(detail.query_one("#run-detail-summary", Static).content)
        assert "2 of 2" in summary and "of 1" not in summary


async def test_a_run_waiting_for_its_retry_shows_no_duration_counting_on() -> None:
    # pending again as its attempt 2, with its first attempt's start: it is not running, and its
    # wait is no time taken (the attempts list has each attempt's); the table and the detail
    # pane say the same, however the clock moves
    waiting = run("0123456789abcdef", 0, status=RunStatus.PENDING, started=1, attempt=2, max_attempts=3)
    running = run("feedfacefeedface", 0, status=RunStatus.RUNNING, started=1)
    table, detail = RunsTable(), RunDetail()
    async with Host(table, detail).run_test(size=SIZE) as pilot:
        table.update_runs([waiting, running], now=T0 + 1.5)
        for later in (10, 600):
            table.update_runs([], now=T0 + 1.5 + later)
            detail.show(waiting, now=T0 + 1.5 + later)
            await pilot.pause()
            assert cell(table, waiting.id, "duration") == "—"
            assert cell(table, running.id, "duration") != "—"  # (the running one counts on)
            summary = plain(detail.query_one("#run-detail-summary", Static).content)
            assert "duration" in summary and "—" in summary.split("duration", 1)[1].splitlines()[0]
        # a run the filter hides is no row of the table
        table.set_filter("running")
        await pilot.pause()
        with pytest.raises(KeyError):
            table.get_row(waiting.id)
        assert cell(table, running.id, "status") == "running"


async def test_run_detail_replaces_cut_down_params_once_the_full_record_arrives() -> None:
    # attached, a run first comes with its large params cut by the wire, then in full
    detail = RunDetail()
    cut = {"__truncated__": True, "bytes": 90_000, "preview": '{"rows": [1, 2'}
    async with Host(detail).run_test(size=SIZE) as pilot:
        detail.show(run("0123456789abcdef", 1, params=cut))
        await pilot.pause()
        assert "__truncated__" in plain(detail.query_one("#run-detail-params", Static).content)

        detail.show(run("0123456789abcdef", 1, params={"rows": [1, 2, 3], "table": "orders"}))
        await pilot.pause()
        shown = plain(detail.query_one("#run-detail-params", Static).content)
        assert "__truncated__" not in shown
        assert '"table": "orders"' in shown


async def test_run_detail_shows_each_runs_own_params_and_result_where_python_finds_them_equal() -> None:
    # True == 1 == 1.0 in Python: a run with params {"limit": true} returning true, shown after
    # one with {"limit": 1.0} returning 1, kept that run's params and result on screen
    detail = RunDetail()
    ready = run("0123456789abcdef", 1, status=RunStatus.SUCCEEDED, started=1, finished=2,
                params={"limit": True}, result=True)  # fmt: skip
    count = run("feedfacefeedface", 2, status=RunStatus.SUCCEEDED, started=1, finished=2,
                params={"limit": 1.0}, result=1)  # fmt: skip

    def shown() -> tuple[str, str]:
        params = plain(detail.query_one("#run-detail-params", Static).content)
        return " ".join(params.split()), plain(detail.query_one("#run-detail-result", Static).content).strip()

    async with Host(detail).run_test(size=SIZE) as pilot:
        for record, expected in [(count, ('{ "limit": 1.0 }', "1")), (ready, ('{ "limit": true }', "true")),
                                 (count, ('{ "limit": 1.0 }', "1"))]:  # fmt: skip
            detail.show(record)
            await pilot.pause()
            assert shown() == expected, record.task


# ---------------------------------------------------------------- ParamsForm


class Inner(BaseModel):
    x: int


class SampleParams(BaseModel):
    user_id: str
    contents: list[str]
    count: int = 3
    ratio: float = 0.5
    tags: list[str] = ["a"]
    meta: dict[str, int] = {}
    notify: bool = True
    note: str | None = None
    inner: Inner | None = None


def sample_task() -> TaskInfo:
    return TaskInfo(
        name="sample",
        kind="task",
        description="A sample task.",
        submittable=True,
        retries=0,
        timeout=None,
        concurrency=None,
        params_schema=SampleParams.model_json_schema(),
    )


async def test_params_form_builds_labelled_inputs_with_defaults() -> None:
    form = ParamsForm(sample_task())
    async with Host(form).run_test(size=SIZE) as pilot:
        await pilot.pause()
        labels = {spec.name: spec.label for spec in form.fields}
        assert labels["user_id"] == "user_id: string *"
        assert labels["contents"] == "contents: list (JSON) *"
        assert labels["count"] == "count: int"
        assert labels["meta"] == "meta: dict (JSON)"
        assert labels["note"] == "note: string, optional"
        assert labels["inner"] == "inner: Inner (JSON), optional"

        assert isinstance(form.field_widget("notify"), Switch)
        assert form.field_widget("notify").value is True
        widgets = {spec.name: form.field_widget(spec.name) for spec in form.fields}
        values = {name: w.value for name, w in widgets.items() if isinstance(w, Input)}
        assert values == {
            "user_id": "",
            "contents": "",
            "count": "3",
            "ratio": "0.5",
            "tags": '["a"]',
            "meta": "{}",
            "note": "",
            "inner": "",
        }
        shown_labels = [str(label.content) for label in form.query(".params-form--label").results(Static)]
        assert "user_id: string *" in shown_labels


async def test_params_form_collects_parsed_values() -> None:
    form = ParamsForm(sample_task())
    async with Host(form).run_test(size=SIZE) as pilot:
        form.field_widget("user_id").value = "u-1"
        form.field_widget("contents").value = '["x", "y"]'
        form.field_widget("count").value = "7"
        form.field_widget("inner").value = '{"x": 1}'
        form.field_widget("notify").value = False
        await pilot.pause()
        params = form.collect()
        assert params == {
            "user_id": "u-1",
            "contents": ["x", "y"],
            "count": 7,
            "ratio": 0.5,
            "tags": ["a"],
            "meta": {},
            "notify": False,
            "note": None,
            "inner": {"x": 1},
        }
        assert SampleParams(**params).count == 7  # what the engine will validate


async def test_params_form_shows_parse_errors_inline() -> None:
    form = ParamsForm(sample_task())
    async with Host(form).run_test(size=SIZE) as pilot:
        form.field_widget("contents").value = '["x",'
        form.field_widget("count").value = "abc"
        form.field_widget("meta").value = "[1]"
        await pilot.pause()
        with pytest.raises(ParamsFormError) as caught:
            form.collect()
        await pilot.pause()
        by_field = {err["loc"][0]: err["msg"] for err in caught.value.errors}
        assert set(by_field) == {"user_id", "contents", "count", "meta"}
        assert form.field_error("user_id") == "this field is required"
        assert form.field_error("contents").startswith("invalid JSON")
        assert form.field_error("count") == "not an integer: 'abc'"
        assert form.field_error("meta").startswith("expected a JSON object")
        assert form.field_error("tags") == ""
        assert form.field_widget("contents").has_class("-invalid")

        # fixing them clears the messages
        form.field_widget("user_id").value = "u"
        form.field_widget("contents").value = "[]"
        form.field_widget("count").value = "1"
        form.field_widget("meta").value = "{}"
        assert form.collect()["count"] == 1
        assert form.field_error("contents") == ""
        assert not form.field_widget("contents").has_class("-invalid")


async def test_params_form_says_why_a_huge_integer_is_refused_without_echoing_it_whole() -> None:
    form = ParamsForm(sample_task())
    async with Host(form).run_test(size=SIZE) as pilot:
        form.field_widget("count").value = "9" * 5000
        form.field_widget("ratio").value = "x" * 5000
        await pilot.pause()
        with pytest.raises(ParamsFormError):
            form.collect()
        assert form.field_error("count") == (
            "integer too long: 5000 digits, more than the 4300 that Python reads from text (its int limit)"
        )
        ratio = form.field_error("ratio")
        assert ratio.startswith("not a number: 'xxxx") and "(5000 characters)" in ratio and len(ratio) < 100


async def test_params_form_show_errors_puts_messages_below_their_fields() -> None:
    form = ParamsForm(sample_task())
    async with Host(form).run_test(size=SIZE) as pilot:
        form.show_errors(
            [
                {"loc": ("count",), "msg": "Input should be greater than 0", "type": "greater_than"},
                {"loc": ["tags", 1], "msg": "Input should be a valid string"},
                {"loc": (), "msg": "Value error, user must exist"},
                {"loc": ("bogus",), "msg": "Extra inputs are not permitted"},
            ]
        )
        await pilot.pause()
        assert form.field_error("count") == "Input should be greater than 0"
        assert form.field_error("tags") == "1: Input should be a valid string"
        assert form.field_error("user_id") == ""
        assert "Value error, user must exist" in form.general_error
        assert "bogus: Extra inputs are not permitted" in form.general_error

        # the message sits right below its input
        children = list(form.children)
        count_input = form.field_widget("count")
        below = children[children.index(count_input) + 1]
        assert below.display and str(below.content) == "Input should be greater than 0"

        form.clear_errors()
        assert form.field_error("count") == "" and form.general_error == ""


async def test_params_form_enter_submits_parsed_params() -> None:
    form = ParamsForm(sample_task(), values={"user_id": "u-9", "contents": ["z"]})
    host = Host(form)
    async with host.run_test(size=SIZE) as pilot:
        form.field_widget("user_id").focus()
        await pilot.press("enter")
        await pilot.pause()
        [submitted] = host.of(ParamsForm.Submitted)
        assert submitted.params["user_id"] == "u-9" and submitted.params["contents"] == ["z"]


class Tree(BaseModel):
    name: str
    children: list[Tree] = []


class Toggles(BaseModel):
    dry_run: bool = False


def info_of(name: str, model: type[BaseModel]) -> TaskInfo:
    return TaskInfo(
        name=name, kind="task", description="", submittable=True, retries=0, timeout=None, concurrency=None,
        params_schema=model.model_json_schema(),
    )


async def test_params_form_takes_a_model_that_refers_to_itself_and_submits_without_a_text_field() -> None:
    # a tree's schema is all in $defs, its top a $ref: the form said "This task takes no params."
    # and gave {}, which the engine refused; and a form of switches only could not post Submitted
    assert set(Tree.model_json_schema()) == {"$defs", "$ref"}
    tree, toggles = ParamsForm(info_of("tree", Tree)), ParamsForm(info_of("toggles", Toggles))
    host = Host(tree, toggles)
    async with host.run_test(size=SIZE) as pilot:
        assert [spec.name for spec in tree.fields] == ["name", "children"]
        tree.field_widget("name").value = "root"
        tree.field_widget("children").value = '[{"name": "leaf"}]'
        assert tree.submit()
        toggles.field_widget("dry_run").value = True
        assert toggles.submit()
        await pilot.pause()
        assert [m.params for m in host.of(ParamsForm.Submitted)] == [
            {"name": "root", "children": [{"name": "leaf"}]},
            {"dry_run": True},
        ]
        assert Tree.model_validate(host.of(ParamsForm.Submitted)[0].params).children[0].name == "leaf"
        tree.field_widget("children").value = "[not json"
        assert not tree.submit()  # told under its field, nothing posted
        await pilot.pause()
        assert len(host.of(ParamsForm.Submitted)) == 2 and tree.field_error("children")


# ---------------------------------------------------------------- EventLog


def ev(kind: str, seq: int, **fields: Any) -> Any:
    defaults: dict[str, dict[str, Any]] = {
        "run.submitted": {"run_id": f"run{seq:05d}", "task": "send_email"},
        "run.failed": {"run_id": f"run{seq:05d}", "task": "send_email", "error": {"type": "KeyError", "message": "x"}},
        "worker.crashed": {"name": "poller", "error": {"type": "OSError", "message": "boom"}, "restarts": 1, "restart_in": 0.5},
        "health": {
            "cpu_percent": 1.0, "rss_bytes": 1, "threads": 1, "open_fds": 1, "loop_lag_ms": 0.1,
            "running": 0, "queue_depth": 0, "finished_per_s": 0.0, "failed_per_s": 0.0,
        },
    }
    return event_from_dict({"kind": kind, "seq": seq, "ts": T0 + seq, **defaults[kind], **fields})


def log_text(log: EventLog) -> list[str]:
    return [strip.text.rstrip() for strip in log.lines]


async def test_event_log_writes_one_line_per_event_and_filters_by_kind() -> None:
    log = EventLog()
    async with Host(log).run_test(size=SIZE) as pilot:
        log.add_events([ev("run.submitted", 1), ev("health", 2), ev("worker.crashed", 3), ev("run.failed", 4)])
        await pilot.pause()
        lines = log_text(log)
        assert len(lines) == 4
        assert "#1" in lines[0] and "run.submitted" in lines[0] and "run=run00001" in lines[0]
        assert "error=OSError: boom" in lines[2]

        log.set_filter({"run."})
        await pilot.pause()
        assert [line.split()[2] for line in log_text(log)] == ["run.submitted", "run.failed"]

        log.set_filter({"worker.crashed", "health"})
        log.add_events([ev("run.submitted", 5), ev("health", 6)])
        await pilot.pause()
        assert [line.split()[2] for line in log_text(log)] == ["health", "worker.crashed", "health"]

        log.set_filter(None)
        await pilot.pause()
        assert len(log_text(log)) == 6


async def test_event_log_pause_buffers_and_resume_loses_nothing() -> None:
    log = EventLog()
    async with Host(log).run_test(size=SIZE) as pilot:
        log.add_events([ev("run.submitted", 1)])
        await pilot.pause()
        log.paused = True
        log.add_events([ev("run.submitted", seq) for seq in range(2, 7)])
        log.add_events([ev("run.submitted", 7)])
        await pilot.pause()
        assert len(log.lines) == 1  # the view is frozen
        assert log.buffered == 6 and log.not_shown == 0

        log.paused = False
        await pilot.pause()
        assert [line.split()[1] for line in log_text(log)] == [f"#{seq}" for seq in range(1, 8)]
        assert log.buffered == 0


async def test_event_log_counts_what_overflows_the_pause_buffer() -> None:
    log = EventLog(buffer_cap=3)
    async with Host(log).run_test(size=SIZE) as pilot:
        log.paused = True
        log.add_events([ev("run.submitted", seq) for seq in range(1, 11)])
        assert log.buffered == 3 and log.not_shown == 7
        log.paused = False
        await pilot.pause()
        lines = log_text(log)
        assert "7 events not shown" in lines[0]
        assert [line.split()[1] for line in lines[1:]] == ["#8", "#9", "#10"]


async def test_event_log_draws_a_floods_newest_lines_and_says_how_many_it_left_out() -> None:
    # formatting every line of a flood (most scrolled away at once) was most of a frame's cost
    log = EventLog(draw_cap=5)
    async with Host(log).run_test(size=SIZE) as pilot:
        log.add_events([ev("run.submitted", seq) for seq in range(1, 13)])
        await pilot.pause()
        lines = log_text(log)
        assert "7 events not shown (arriving faster than drawn" in lines[0]
        assert [line.split()[1] for line in lines[1:]] == ["#8", "#9", "#10", "#11", "#12"]
        assert log.total_events == 12
        log.add_events([ev("health", 13), ev("run.failed", 14)])  # a batch within the cap: all of it
        await pilot.pause()
        assert [line.split()[1] for line in log_text(log)[-2:]] == ["#13", "#14"]
        log.set_filter({"run."})  # the history kept them all: a filter draws them
        await pilot.pause()
        assert [line.split()[1] for line in log_text(log)] == [f"#{seq}" for seq in (*range(1, 13), 14)]


async def test_event_log_cursor_follows_the_newest_line_and_enter_or_a_click_chooses_an_event() -> None:
    log = EventLog(max_lines=50)
    host = Host(log)
    async with host.run_test(size=(120, 12)) as pilot:
        log.add_events([ev("run.submitted", seq) for seq in range(1, 31)])
        log.focus()
        await pilot.pause()
        # until moved, the cursor is on the newest line and stays there as lines arrive
        assert log.chosen is not None and log.chosen.seq == 30
        log.add_events([ev("run.submitted", 31)])
        await pilot.pause()
        assert log.chosen.seq == 31
        await pilot.press("enter")
        await pilot.press("k", "up")
        await pilot.press("enter")
        await pilot.pause()
        assert [m.event.seq for m in host.of(EventLog.EventChosen)] == [31, 29]
        # moved up, it stays on its event while newer ones arrive and older ones go off the top
        log.add_events([ev("run.submitted", seq) for seq in range(32, 62)])
        await pilot.pause()
        assert log.chosen is not None and log.chosen.seq == 29
        assert len(log.lines) == 50 and log.cursor_index == 29 - 12
        # the chosen line is drawn highlighted
        assert not log.auto_scroll
        await pilot.press("g")
        assert log.chosen.seq == 12
        await pilot.press("G")
        assert log.chosen.seq == 61 and log.auto_scroll
        # a click on a line chooses its event
        top = round(log.scroll_offset.y)
        await pilot.click(EventLog, offset=(5, 2))
        await pilot.pause()
        clicked = log_text(log)[top + 2].split()[1]
        assert f"#{host.of(EventLog.EventChosen)[-1].event.seq}" == clicked
        assert log.chosen.seq == host.of(EventLog.EventChosen)[-1].event.seq
        # a new filter draws the lines anew; the cursor follows the newest again
        log.set_filter({"run."})
        await pilot.pause()
        assert log.chosen is not None and log.chosen.seq == 61


async def test_an_event_log_line_chosen_that_goes_off_the_top_leaves_nothing_chosen() -> None:
    # the cursor landed on the oldest line left, and Enter chose an event never picked
    log = EventLog(max_lines=20)
    host = Host(log)
    async with host.run_test(size=(120, 12)) as pilot:
        log.add_events([ev("run.submitted", seq) for seq in range(1, 21)])
        log.focus()
        await pilot.press("up", "up")
        assert log.chosen is not None and log.chosen.seq == 18
        log.add_events([ev("run.submitted", seq) for seq in range(21, 45)])  # 18 goes off the top
        await pilot.pause()
        assert log.chosen is None and log.cursor_index is None
        await pilot.press("enter")
        await pilot.pause()
        assert host.of(EventLog.EventChosen) == []
        await pilot.press("down")  # a key starts again from the oldest line
        assert log.chosen is not None and log.chosen.seq == 25


async def test_event_log_draws_its_cursor_line_highlighted_only_with_focus() -> None:
    log = EventLog()
    host = Host(log)
    async with host.run_test(size=(120, 12)) as pilot:
        log.add_events([ev("run.submitted", seq) for seq in range(1, 4)])
        host.set_focus(None)
        await pilot.pause()
        last = round(log.scroll_offset.y)
        row = 2 - last

        def backgrounds(y: int) -> set[Any]:
            return {seg.style.bgcolor for seg in log.render_line(y) if seg.style is not None}

        assert backgrounds(row) == backgrounds(row - 1)
        log.focus()
        await pilot.pause()
        assert backgrounds(row) != backgrounds(row - 1)


async def test_event_log_caps_lines_and_skips_rendering_while_hidden() -> None:
    log = EventLog(max_lines=50)
    async with Host(log).run_test(size=SIZE) as pilot:
        log.add_events([ev("health", seq) for seq in range(1, 121)])
        await pilot.pause()
        assert len(log.lines) == 50
        assert log_text(log)[-1].split()[1] == "#120"

        log.display = False
        await pilot.pause()
        before = list(log.lines)
        log.add_events([ev("run.submitted", 121)])
        await pilot.pause()
        assert log.lines == before  # nothing rendered while hidden

        log.display = True
        await eventually(lambda: log_text(log)[-1].split()[1] == "#121", timeout=10)
        assert len(log.lines) == 50


# ---------------------------------------------------------------- LeaderBadge, CountsBar


async def test_leader_badge_shows_leader_follower_and_disconnected() -> None:
    badge = LeaderBadge()
    async with Host(badge).run_test(size=SIZE) as pilot:
        now = T0 + 100
        badge.update(Leadership(node_id="node-a", is_leader=True, holder="node-a", term=7, expires_at=now + 4.25), T0, now)
        await pilot.pause()
        text = str(badge.render())
        assert "LEADER" in text and "node-a" in text and "term 7" in text and "lease 4.2s" in text
        assert "up 1m40s" in text
        assert badge.has_class("-leader")

        badge.update(Leadership(node_id="node-b", is_leader=False, holder="node-a", term=8, expires_at=now - 1), T0, now)
        await pilot.pause()
        text = str(badge.render())
        assert "follower" in text and "leader node-a" in text and "lease expired" in text
        assert badge.has_class("-follower") and not badge.has_class("-leader")

        badge.update(Leadership(node_id="node-b", is_leader=False, holder=None, term=8), T0, now, connected=False)
        await pilot.pause()
        assert "DISCONNECTED — reconnecting…" in str(badge.render())
        assert badge.state == "disconnected" and badge.has_class("-disconnected")

        badge.update_disconnected("tcp://10.0.0.5:7400")
        await pilot.pause()
        assert "reconnecting… to tcp://10.0.0.5:7400" in str(badge.render())


async def test_counts_bar_shows_counts_dropped_and_paused() -> None:
    bar = CountsBar()
    async with Host(bar).run_test(size=SIZE) as pilot:
        bar.update({"running": 2, "failed": 1}, dropped=0, paused=False)
        await pilot.pause()
        text = str(bar.render())
        assert "running 2" in text and "failed 1" in text and "pending 0" in text
        assert "dropped" not in text and "paused" not in text
        bar.update({"running": 2}, dropped=5, paused=True, view_paused_buffered=12)
        await pilot.pause()
        text = str(bar.render())
        assert "dropped 5 events" in text and "paused (12 buffered)" in text


# ---------------------------------------------------------------- HealthSparklines


def sample(i: int) -> HealthSample:
    return HealthSample(
        seq=i, ts=T0 + i, cpu_percent=float(i), rss_bytes=(100 + i) * 1_048_576, threads=4, open_fds=10,
        loop_lag_ms=0.5 * i, running=1, queue_depth=0, finished_per_s=2.0 * i, failed_per_s=0.1,
    )


async def test_health_sparklines_keep_bounded_history_and_show_current_values() -> None:
    health = HealthSparklines(history=10)
    async with Host(health).run_test(size=SIZE) as pilot:
        for i in range(25):
            health.add_sample(sample(i))
        await pilot.pause()
        assert health.history("cpu") == [float(i) for i in range(15, 25)]
        assert len(health.query_one("#health-spark-lag", Sparkline).data or []) == 10
        assert str(health.query_one("#health-value-cpu", Static).content) == "24.0%"
        assert str(health.query_one("#health-value-rss", Static).content) == "124.0 MiB"
        assert str(health.query_one("#health-value-throughput", Static).content) == "48.0/s"
        # each graph says its range over the window, and the axis how far back the graphs reach
        assert str(health.query_one("#health-range-cpu", Static).content) == "15.0%–24.0%"
        assert str(health.query_one("#health-value-threads", Static).content) == "4"
        assert str(health.query_one("#health-value-fds", Static).content) == "10"
        assert str(health.query_one("#health-value-queue", Static).content) == "0"
        assert health.span == 9.0
        axis = str(health.query_one("#health-axis", Static).content)
        assert axis.startswith("-9.0s") and "-4.5s" in axis and axis.rstrip().endswith("now")


# ---------------------------------------------------------------- ScheduleTable, QueuesTable, TriggersTable


def periodic(name: str, **fields: Any) -> PeriodicInfo:
    base: dict[str, Any] = {"trigger": "every 60s", "trigger_kind": "interval", "every": 60.0, "enabled": True}
    return PeriodicInfo(name=name, **{**base, **fields})


async def test_schedule_table_shows_state_next_due_and_selection() -> None:
    table = ScheduleTable()
    host = Host(table)
    async with host.run_test(size=SIZE) as pilot:
        now = T0
        infos = [
            periodic("reindex", next_due=now + 42, last_status="failed", last_duration=1.5, runs=10, failures=2,
                     skipped=1, missed=3),
            periodic("cleanup", paused=True, next_due=now + 5),
            periodic("billing", enabled=False, reason="leader only", trigger="cron 0 3 * * *", trigger_kind="cron"),
            periodic("ticker", enabled=False, reason="flag tick is off", paused=True),
            periodic("beat", skipped=7, refused=5),
        ]
        table.update_schedule(infos, now)
        await pilot.pause()
        assert table.shown_keys == ["beat", "billing", "cleanup", "reindex", "ticker"]
        # ticks the full run queue refused are no overlaps: the note says how many of the skipped
        assert cell(table, "beat", "note") == "5 of the skipped refused: run queue full"
        assert cell(table, "reindex", "note") == ""
        assert cell(table, "reindex", "next") == "42s"
        assert cell(table, "reindex", "last") == "failed"
        assert cell(table, "reindex", "failures") == "2"
        # overlapped ticks and slots that passed while the loop was held up are told apart
        assert cell(table, "reindex", "skipped") == "1"
        assert cell(table, "reindex", "missed") == "3"
        assert cell(table, "cleanup", "missed") == "0"
        assert cell(table, "cleanup", "state") == "paused"
        assert cell(table, "cleanup", "next") == "—"
        assert cell(table, "billing", "state") == "disabled"
        assert cell(table, "billing", "note") == "disabled: leader only"
        # a disabled task that was paused says so (the pause holds once it is enabled)
        assert cell(table, "ticker", "state") == "paused"
        assert cell(table, "ticker", "note") == "disabled: flag tick is off"

        table.update_schedule(infos[:1], now + 40)
        await pilot.pause()
        assert table.shown_keys == ["reindex"]
        assert cell(table, "reindex", "next") == "2.0s"
        assert table.selected_name == "reindex"

        table.focus()
        await pilot.press("enter")
        await pilot.pause()
        assert [m.name for m in host.of(ScheduleTable.PeriodicSelected)] == ["reindex"]


async def test_queues_table_shows_counters_and_throughput() -> None:
    table = QueuesTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        def info(processed: int, depth: int = 3) -> QueueInfo:
            return QueueInfo(name="emails", concurrency=4, maxsize=10, depth=depth, in_flight=2, processed=processed, failed=1)

        table.update_queues([info(10)], now=100.0)
        await pilot.pause()
        assert cell(table, "emails", "depth") == "3/10"
        assert cell(table, "emails", "in_flight") == "2/4"
        assert cell(table, "emails", "rate") == "—"
        table.update_queues([info(30, depth=9)], now=102.0)
        await pilot.pause()
        assert cell(table, "emails", "rate") == "10.0/s"
        assert table.get_cell("emails", "depth").style == "bold red"  # 90 % full
        # counts of an engine that stopped or does not answer: no rate, rather than the last one
        table.update_queues([info(30, depth=9)], now=102.5, live=False)
        await pilot.pause()
        assert cell(table, "emails", "rate") == "—" and not table.measuring
        table.update_queues([info(40)], now=104.0)  # live again: measured anew
        table.update_queues([info(50)], now=105.0)
        await pilot.pause()
        assert cell(table, "emails", "rate") == "10.0/s" and table.measuring
        table.update_queues([], now=106.0)
        await pilot.pause()
        assert table.row_count == 0


async def test_triggers_table_shows_one_row_per_key() -> None:
    table = TriggersTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        now = T0
        states = [
            TriggerState(
                name="digest",
                size_threshold=10,
                staleness=30.0,
                keys=[
                    TriggerKeyState(key="user-2", count=4, last_run_at=now - 90, running=True),
                    TriggerKeyState(key="user-1", count=10, queued=True),
                ],
            ),
            TriggerState(name="idle", size_threshold=5),
        ]
        table.update_triggers(states, now)
        await pilot.pause()
        assert table.row_count == 3
        rows = [[str(c) for c in table.get_row(key)] for key in table.shown_keys]
        assert rows[0][:2] == ["digest", "user-1"] and rows[0][5] == "queued"
        assert rows[1][:4] == ["digest", "user-2", "4", "10 or 30s"]
        assert rows[1][4] == "1m30s ago" and rows[1][5] == "running"
        assert rows[2][:2] == ["idle", "(no keys)"]
        assert table.selected_trigger_key == ("digest", "user-1")


async def test_triggers_table_says_how_many_keys_the_engine_did_not_send() -> None:
    table = TriggersTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        state = TriggerState(
            name="digest", size_threshold=10, key_count=100_002, fired=3,
            keys=[TriggerKeyState(key="user-1", count=9), TriggerKeyState(key="user-2", count=8)],
        )
        table.update_triggers([state], T0)
        await pilot.pause()
        rows = [[str(c) for c in table.get_row(key)] for key in table.shown_keys]
        assert [r[1] for r in rows] == ["user-1", "user-2", "(+100,000 quieter keys)"]
        table.update_triggers([state.model_copy(update={"key_count": 2})], T0)
        await pilot.pause()
        assert table.row_count == 2


async def test_queues_table_shows_a_paused_queue_and_what_was_purged() -> None:
    table = QueuesTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        info = QueueInfo(name="emails", concurrency=1, maxsize=10, depth=4, in_flight=0, processed=1, failed=0,
                         paused=True, purged=7)
        table.update_queues([info], now=100.0)
        await pilot.pause()
        assert cell(table, "emails", "state") == "paused" and cell(table, "emails", "purged") == "7"
        assert table.selected_name == "emails"
        table.update_queues([info.model_copy(update={"paused": False})], now=101.0)
        await pilot.pause()
        assert cell(table, "emails", "state") == ""


async def test_workers_table_shows_each_workers_state_and_crashes() -> None:
    table = WorkersTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        now = T0 + 100
        infos = [
            WorkerInfo(name="poller", leader_only=False, state="running", started_at=T0 + 40, restarts=2),
            WorkerInfo(name="dedup", leader_only=True, state="backoff", crashes=3, next_restart_at=now + 8,
                       last_error=RunError(type="OSError", message="socket closed")),
            WorkerInfo(name="mailer", leader_only=False, state="stopped", stopped_by_user=True),
            WorkerInfo(name="sync", leader_only=True, state="waiting_for_leadership"),
            # stop_worker gave up waiting for a cleanup that ignores cancels: its code still runs
            WorkerInfo(name="flush", leader_only=False, state="running", started_at=T0 + 90, stopped_by_user=True),
        ]
        table.update_workers(infos, now)
        await pilot.pause()
        assert table.shown_keys == ["poller", "dedup", "mailer", "sync", "flush"]
        assert cell(table, "poller", "state") == "running" and cell(table, "poller", "up") == "1m00s"
        assert cell(table, "poller", "restarts") == "2" and cell(table, "poller", "runs_on") == "all"
        assert cell(table, "dedup", "runs_on") == "leader" and cell(table, "dedup", "next") == "8.0s"
        assert cell(table, "dedup", "error") == "OSError: socket closed"
        assert cell(table, "mailer", "state") == "stopped by user"
        assert cell(table, "sync", "state") == "waits for lead"
        assert (cell(table, "flush", "state"), cell(table, "flush", "up")) == ("stopping (user)", "10s")
        table.select_name("mailer")
        assert table.selected_name == "mailer"
        table.update_workers(infos[1:], now + 1)
        await pilot.pause()
        assert table.selected_name == "mailer"


# ---------------------------------------------------------------- FailuresList


async def test_failures_list_shows_failed_runs_and_crashed_workers_with_tracebacks() -> None:
    failures = FailuresList()
    host = Host(failures)
    error = failure()
    async with host.run_test(size=SIZE) as pilot:
        failed = run("deadbeefdeadbeef", 1, task="charge", status=RunStatus.FAILED, started=1, finished=2,
                     attempt=3, max_attempts=3, error=error)
        crashed = WorkerInfo(
            name="poller", leader_only=False, state="backoff", restarts=2, crashes=3,
            last_error=RunError(type="OSError", message="socket closed", traceback="Traceback ...\nOSError: socket closed\n"),
            last_error_at=T0 + 5,
        )
        healthy = WorkerInfo(name="ticker", leader_only=False, state="running")
        failures.update([failed], [crashed, healthy])
        await pilot.pause()
        table = failures.table
        assert table.shown_keys == ["worker:poller", "run:deadbeefdeadbeef"]  # newest error first
        assert cell(table, "run:deadbeefdeadbeef", "tries") == "3/3"
        assert cell(table, "worker:poller", "tries") == "2 restarts"
        assert "OSError: socket closed" in cell(table, "worker:poller", "error")
        detail = plain(failures.query_one("#failures-traceback", Static).content)
        assert "socket closed" in detail and "restarts 2" in detail

        assert failures.select("run", "deadbeefdeadbeef")
        await pilot.pause()
        detail = plain(failures.query_one("#failures-traceback", Static).content)
        assert "Traceback (most recent call last)" in detail and "ZeroDivisionError" in detail
        assert failures.selected == ("run", "deadbeefdeadbeef")
        picked = failures.selected_traceback()
        assert picked is not None and picked == (
            "charge deadbeefdeadbeef: ZeroDivisionError: division by zero", error.traceback
        )

        table.focus()
        await pilot.press("enter")
        await pilot.pause()
        [chosen] = host.of(FailuresList.FailureSelected)
        assert (chosen.kind, chosen.ident) == ("run", "deadbeefdeadbeef")

        failures.update([], [])
        await pilot.pause()
        assert table.row_count == 0
        assert "No failures" in plain(failures.query_one("#failures-traceback", Static).content)


async def test_event_log_formats_values_and_keeps_lease_renewals_out_of_sight() -> None:
    from taskwatch.engine.events import LeaseAcquired, LeaseRenewed
    from taskwatch.widgets.event_log import summarize

    health = sample(3)
    line = summarize(health)
    assert "rss_bytes=103.0 MiB" in line and "cpu_percent=3.0%" in line and "loop_lag_ms=1.5ms" in line
    acquired = LeaseAcquired(seq=1, ts=T0, holder="a", term=2, expires_at=T0 + 3600)
    assert "expires_at=" + time.strftime("%H:%M:%S", time.localtime(T0 + 3600)) in summarize(acquired)
    assert "e+09" not in summarize(acquired)

    log = EventLog()
    async with Host(log).run_test(size=SIZE) as pilot:
        renewals = [LeaseRenewed(seq=i, ts=T0 + i, holder="a", term=2, expires_at=T0 + 9) for i in range(2, 40)]
        log.add_events([acquired, *renewals, ev("run.submitted", 40)])
        await pilot.pause()
        shown = log_text(log)
        assert len(shown) == 2 and "lease.acquired" in shown[0] and "run.submitted" in shown[1]
        assert "38 lease.renewed not shown" in str(log.border_subtitle)
        log.set_filter(["lease."])  # asked for by name: every renewal is there
        await pilot.pause()
        assert sum("lease.renewed" in line for line in log_text(log)) == 38


# ---------------------------------------------------------------- the submit form, item by item


class Size(str, Enum):
    small = "small"
    large = "large"


class LimitedParams(BaseModel):
    name: str = Field(min_length=2, max_length=8, description="who it is for")
    count: int = Field(5, ge=1, le=10)
    size: Size = Size.small
    tags: list[str] = Field(default_factory=list, max_length=2)


def limited_task() -> TaskInfo:
    return TaskInfo(
        name="limited", kind="task", description="", submittable=True, retries=0, timeout=None,
        concurrency=None, params_schema=LimitedParams.model_json_schema(),
    )


async def test_params_form_offers_enums_shows_limits_and_reports_every_error_at_once() -> None:
    form = ParamsForm(limited_task())
    async with Host(form).run_test(size=SIZE) as pilot:
        await pilot.pause()
        size = form.field_widget("size")
        assert isinstance(size, Select) and size.value == "small"  # a pick, not free text
        hints = [str(h.content) for h in form.query(".params-form--hint").results(Static)]
        assert any("who it is for" in h and "at least 2 characters, at most 8 characters" in h for h in hints)
        assert any("≥ 1, ≤ 10" in h for h in hints)
        # an emptied field says it means the default, rather than falling back silently
        count = form.field_widget("count")
        assert isinstance(count, Input) and "the default, 5" in count.placeholder
        # one round reports every error the form can know of
        form.field_widget("name").value = "x"
        count.value = "50"
        form.field_widget("tags").value = '["a", "b", "c"]'
        with pytest.raises(ParamsFormError) as caught:
            form.collect()
        assert {e["loc"][0] for e in caught.value.errors} == {"name", "count", "tags"}
        await pilot.pause()
        assert "at least 2 characters" in form.field_error("name")
        assert "≤ 10" in form.field_error("count") and "at most 2 items" in form.field_error("tags")
        form.field_widget("name").value = "ada"
        count.value = ""
        form.field_widget("tags").value = "[]"
        size.value = "large"
        assert form.collect() == {"name": "ada", "size": "large", "tags": []}


# ---------------------------------------------------------------- times and events the widgets cannot use


async def test_runs_table_shows_a_time_it_cannot_write_as_unknown_and_keeps_updating() -> None:
    table = RunsTable()
    far = run("far", 1, status=RunStatus.RUNNING, started=1e20)  # past any calendar: no clock to draw
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs([run("a", 0)], now=T0 + 5)
        table.update_runs([far], now=T0 + 5)
        await pilot.pause()
        assert cell(table, "far", "started") == "?"
        # the running row is redrawn on every update: later ones still work
        for i in range(3):
            table.update_runs([run(f"b{i}", 2 + i)], now=T0 + 6 + i)
        await pilot.pause()
        assert table.shown_keys == ["b2", "b1", "b0", "far", "a"]


@pytest.mark.parametrize(
    ("bad", "now", "what"),
    [
        ({"created_at": float("nan")}, T0, "created_at=nan"),
        ({"started_at": float("inf")}, T0, "started_at=inf"),
        ({"finished_at": float("-inf")}, T0, "finished_at=-inf"),
        ({}, float("nan"), "now must be a finite UNIX time"),
        ({}, float("inf"), "now must be a finite UNIX time"),
    ],
    ids=["nan-created", "inf-started", "-inf-finished", "nan-now", "inf-now"],
)
async def test_runs_table_refuses_a_batch_with_a_time_that_is_no_time_and_changes_nothing(
    bad: dict[str, float], now: float, what: str
) -> None:
    table = RunsTable()
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_runs([run(f"r{i}", i) for i in range(5)], now=T0 + 10)
        broken = run("x", 2.5, status=RunStatus.RUNNING, started=3).model_copy(update=bad)
        with pytest.raises(ValueError, match=what):
            table.update_runs([run("new", 9), broken], now=now)
        await pilot.pause()
        assert table.record("x") is None and table.record("new") is None
        table.update_runs([run("new", 9), run("x", 2.5, status=RunStatus.RUNNING, started=3)], now=T0 + 10)
        await pilot.pause()
        assert table.shown_keys == ["new", "r4", "r3", "x", "r2", "r1", "r0"]  # newest first, in order


async def test_event_log_refuses_an_event_without_a_kind_and_keeps_filtering() -> None:
    log = EventLog()
    async with Host(log).run_test(size=SIZE) as pilot:
        good = event_from_dict({"kind": "run.submitted", "seq": 1, "ts": T0, "run_id": "r1", "task": "t"})
        with pytest.raises(TypeError, match="item 1 is BaseEvent without one"):
            log.add_events([good, BaseEvent(seq=2, ts=T0)])
        assert log.total_events == 0
        log.add_events([good])
        log.set_filter("run.")  # redraws the history: nothing without a kind was kept in it
        await pilot.pause()
        assert log.total_events == 1 and len(log.lines) == 1


async def test_runs_table_keeps_its_newest_finished_runs_however_many_newer_runs_wait() -> None:
    # the trim counted waiting runs against max_rows: with more of them than that, every run
    # older than the newest waiting ones was dropped the moment it finished
    table = RunsTable(max_rows=20, trim_batch=5)
    async with Host(table).run_test(size=SIZE) as pilot:
        first = [run(f"0000000-fin{i:05d}", i, status=RunStatus.RUNNING, started=T0 + i) for i in range(40)]
        waiting = [run(f"0000000-wait{i:04d}", 100 + i, status=RunStatus.PENDING) for i in range(100)]
        table.update_runs(first + waiting, now=T0 + 200)
        finished = [
            r.model_copy(update={"status": RunStatus.SUCCEEDED, "finished_at": T0 + 150 + i}) for i, r in enumerate(first)
        ]
        table.update_runs(finished, now=T0 + 200)
        await pilot.pause()
        shown = table.shown_keys
        kept = [r.id for r in finished if r.id in shown]
        # the newest 20 finished runs, listed in order below every waiting run, which all stay
        assert sorted(kept) == sorted(r.id for r in finished[20:])
        assert all(r.id in shown for r in waiting)
        assert shown == sorted(shown, key=lambda key: table.order_of(table.record(key)))  # type: ignore[arg-type]
        assert table.row_count == 120
