"""The keyed tables and the small widgets, each in a tiny host app, checked the way a user
(or the developer embedding them) would notice: the messages they post, what they show
for unusual data, what they do with bad input and with data given before they are mounted."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    ClusterNode,
    HealthSample,
    PeriodicInfo,
    QueueInfo,
    TaskInfo,
    TriggerKeyState,
    TriggerState,
    WorkerInfo,
)
from taskwatch.tui import cli
from taskwatch.widgets import (
    CountsBar,
    HealthSparklines,
    NodesTable,
    ParamsForm,
    ParamsFormError,
    QueuesTable,
    ScheduleTable,
    StoreBadge,
    StoreNodesTable,
    TaskStats,
    TaskStatsTable,
    TriggersTable,
    WorkersTable,
)
from textual import on
from textual.app import App, ComposeResult
from textual.message import Message
from textual.widget import Widget
from textual.widgets import DataTable, Input

from .helpers import eventually

SIZE = (140, 30)


T0 = 1_700_000_000.0


class Host(App[None]):
    """Composes the given widgets; :func:`recording` makes one that records messages."""

    def __init__(self, *widgets: Widget) -> None:
        super().__init__()
        self._hosted = widgets
        self.messages: list[Message] = []

    def compose(self) -> ComposeResult:
        yield from self._hosted

    def of(self, kind: type[Message]) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]


def recording(*kinds: type[Message]) -> type[Host]:
    """A Host that records every message of ``kinds`` reaching the app."""

    def record(self: Host, message: Message) -> None:
        self.messages.append(message)

    for kind in kinds:
        record = on(kind)(record)
    return type("RecordingHost", (Host,), {"_record": record})


def text(widget: Widget) -> str:
    return "\n".join(widget.render_line(y).text.rstrip() for y in range(widget.size.height))


def cell(table: DataTable[Any], row: str, column: str) -> str:
    return str(table.get_cell(row, column))


# ---------------------------------------------------------------- the tables' messages


def queue(name: str) -> QueueInfo:
    return QueueInfo(name=name, concurrency=1, maxsize=0, depth=0, in_flight=0, processed=0, failed=0)


def worker(name: str) -> WorkerInfo:
    return WorkerInfo(name=name, leader_only=False, state="running")


def periodic(name: str) -> PeriodicInfo:
    return PeriodicInfo(name=name, trigger="every 1s", trigger_kind="interval", enabled=True)


#: (table, fills it with the rows "a" and "b", the messages' names, what a message carries)
TABLES: list[tuple[type[Any], Callable[[Any], None], tuple[str, str], Callable[[Any], Any]]] = [
    (ScheduleTable, lambda t: t.update_schedule([periodic("a"), periodic("b")], T0),
     ("PeriodicHighlighted", "PeriodicSelected"), lambda m: m.name),
    (QueuesTable, lambda t: t.update_queues([queue("a"), queue("b")]),
     ("QueueHighlighted", "QueueSelected"), lambda m: m.name),
    (TriggersTable, lambda t: t.update_triggers(
        [TriggerState(name="t", size_threshold=3, keys=[TriggerKeyState(key=k, count=1) for k in "ab"])], T0),
     ("TriggerKeyHighlighted", "TriggerKeySelected"), lambda m: (m.trigger, m.key)),
    (WorkersTable, lambda t: t.update_workers([worker("a"), worker("b")], T0),
     ("WorkerHighlighted", "WorkerSelected"), lambda m: m.name),
    (TaskStatsTable, lambda t: t.update_stats([TaskStats(task="a"), TaskStats(task="b")]),
     ("TaskHighlighted", "TaskSelected"), lambda m: m.task),
    (NodesTable, lambda t: t.update_nodes([ClusterNode(node="a"), ClusterNode(node="b")], T0),
     ("NodeHighlighted", "NodeSelected"), lambda m: m.node),
    (StoreNodesTable, lambda t: t.update_nodes([ClusterNode(node="a"), ClusterNode(node="b")], T0),
     ("NodeHighlighted", "NodeSelected"), lambda m: m.node),
]  # fmt: skip


#: empties each table
EMPTY: dict[type[Any], Callable[[Any], None]] = {
    ScheduleTable: lambda t: t.update_schedule([], T0),
    QueuesTable: lambda t: t.update_queues([]),
    TriggersTable: lambda t: t.update_triggers([], T0),
    WorkersTable: lambda t: t.update_workers([], T0),
    TaskStatsTable: lambda t: t.update_stats([]),
    NodesTable: lambda t: t.update_nodes([], T0),
    StoreNodesTable: lambda t: t.update_nodes([], T0),
}


#: what the rows "a" and "b" of each table are called in its messages
ROW_A: dict[type[Any], Any] = {TriggersTable: ("t", "a")}


ROW_B: dict[type[Any], Any] = {TriggersTable: ("t", "b")}


@pytest.mark.parametrize(("cls", "fill", "names", "carried"), TABLES, ids=lambda v: getattr(v, "__name__", ""))
async def test_every_table_reports_cursor_moves_and_enter_once_each_with_the_rows_key(
    cls: type[Any], fill: Callable[[Any], None], names: tuple[str, str], carried: Callable[[Any], Any]
) -> None:
    highlighted, selected = (getattr(cls, name, None) for name in names)
    assert highlighted is not None and selected is not None, f"{cls.__name__} has no {names}"
    table = cls()
    host = recording(highlighted, selected, DataTable.RowHighlighted, DataTable.RowSelected)(table)
    async with host.run_test(size=SIZE) as pilot:
        fill(table)
        table.focus()
        await pilot.pause()
        await pilot.press("down", "enter")
        await eventually(lambda: host.of(selected))
        a, b = ROW_A.get(cls, "a"), ROW_B.get(cls, "b")
        assert [carried(m) for m in host.of(highlighted)] == [a, b]
        assert [carried(m) for m in host.of(selected)] == [b]
        assert all(m.control is table for m in host.messages)
        # the DataTable's own messages stay inside: one choice is reported once, as the table's
        assert not host.of(DataTable.RowHighlighted) and not host.of(DataTable.RowSelected)
        EMPTY[cls](table)
        await eventually(lambda: len(host.of(highlighted)) == 3)
        last = host.of(highlighted)[-1]
        assert (last.trigger, last.key) == (None, None) if cls is TriggersTable else carried(last) is None
        await pilot.pause()
        assert table.render_line(0).text.split()[0] == table.shown_columns[0].label  # the header stays


async def test_a_nodes_table_emptied_keeps_its_header_and_says_nothing_is_highlighted() -> None:
    table = NodesTable()
    host = recording(NodesTable.NodeHighlighted)(table)
    async with host.run_test(size=SIZE) as pilot:
        # the node column is as wide as the longest name: emptied, it narrows again
        table.update_nodes([ClusterNode(node="a-rather-long-node-name")], T0)
        await pilot.pause()
        table.update_nodes([], T0)
        highlighted = lambda: [m.node for m in host.of(NodesTable.NodeHighlighted)]  # noqa: E731
        await eventually(lambda: highlighted() == ["a-rather-long-node-name", None])
        await pilot.pause()
        assert table.render_line(0).text.split()[:3] == ["node", "leader", "state"]


# ---------------------------------------------------------------- a node in the `unknown` state


@pytest.mark.parametrize("cls", [NodesTable, StoreNodesTable], ids=lambda c: c.__name__)
async def test_a_node_whose_state_is_unknown_is_shown_as_unknown(cls: type[NodesTable]) -> None:
    node = ClusterNode(node="api-1", unknown=True, running=2, cpu_percent=40.0, last_heartbeat=T0 - 30)
    up = ClusterNode(node="api-2", running=1, last_heartbeat=T0 - 1)
    table = cls()
    async with Host(table).run_test(size=SIZE) as pilot:
        table.update_nodes([node, up], T0)
        await pilot.pause()
        assert table.shown_keys == ["api-1", "api-2"]
        state = table.get_cell("api-1", "state")
        assert str(state) == "unknown" and state.style == "bold yellow"
        assert table.get_cell("api-1", "cpu").style == "dim"  # the last load it reported
        assert table.get_cell("api-2", "cpu").style == ""
        if cls is StoreNodesTable:
            heartbeat = table.get_cell("api-1", "heartbeat")
            assert str(heartbeat) == "30s ago" and heartbeat.style == "yellow"


# ---------------------------------------------------------------- updated before being mounted


PREMOUNT: list[tuple[type[Any], Callable[[Any], None], str]] = [
    (ScheduleTable, lambda t: t.update_schedule([periodic("a"), periodic("b")], T0), "a"),
    (QueuesTable, lambda t: t.update_queues([queue("a"), queue("b")]), "a"),
    (TriggersTable, lambda t: t.update_triggers([TriggerState(name="a", size_threshold=3)], T0), "a"),
    (WorkersTable, lambda t: t.update_workers([worker("a"), worker("b")], T0), "a"),
    (TaskStatsTable, lambda t: t.update_stats([TaskStats(task="a"), TaskStats(task="b")]), "a"),
    (NodesTable, lambda t: t.update_nodes([ClusterNode(node="a"), ClusterNode(node="b")], T0), "a"),
    (StoreNodesTable, lambda t: t.update_nodes([ClusterNode(node="a"), ClusterNode(node="b")], T0), "a"),
]


@pytest.mark.parametrize(("cls", "fill", "first"), PREMOUNT, ids=lambda v: getattr(v, "__name__", ""))
async def test_a_table_updated_before_it_is_mounted_shows_those_rows_once_mounted(
    cls: type[Any], fill: Callable[[Any], None], first: str
) -> None:
    table = cls()
    fill(table)  # e.g. in the host's __init__ or compose, before the table is in the app
    host = Host(table)
    async with host.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert [column.key.value for column in table.ordered_columns] == [c.key for c in table.shown_columns]
        assert table.row_count >= 1 and table.selected_key is not None
        assert first in table.render_line(1).text
        fill(table)  # and it goes on updating as any table does
        await pilot.pause()
        assert first in table.render_line(1).text


LONG_NAME = "reindex_" + "x" * 292


#: the tables whose first column is a name a user chose, filled with one very long one and a short one
NAMED: list[tuple[type[Any], Callable[[Any], None]]] = [
    (ScheduleTable, lambda t: t.update_schedule([periodic(LONG_NAME), periodic("short")], T0)),
    (QueuesTable, lambda t: t.update_queues([queue(LONG_NAME), queue("short")])),
    (WorkersTable, lambda t: t.update_workers([worker(LONG_NAME), worker("short")], T0)),
    (TriggersTable, lambda t: t.update_triggers(
        [TriggerState(name=n, size_threshold=3, keys=[TriggerKeyState(key="k", count=1)])
         for n in (LONG_NAME, "short")], T0)),
    (TaskStatsTable, lambda t: t.update_stats([TaskStats(task=LONG_NAME), TaskStats(task="short")])),
]  # fmt: skip


@pytest.mark.parametrize(("cls", "fill"), NAMED, ids=lambda v: getattr(v, "__name__", ""))
async def test_one_long_name_is_cut_with_an_ellipsis_and_leaves_the_other_columns_in_sight(
    cls: type[Any], fill: Callable[[Any], None]
) -> None:
    table = cls()
    async with Host(table).run_test(size=(120, 20)) as pilot:
        fill(table)
        await pilot.pause()
        header = table.render_line(0).text
        # the last column's header is on screen, not pushed off it by the name
        assert table.shown_columns[-1].label in header, header
        shown = [table.render_line(y).text for y in (1, 2)]
        assert any("reindex_x" in line and "…" in line for line in shown), shown


async def test_a_row_selected_before_mount_is_under_the_cursor_once_mounted() -> None:
    table = WorkersTable()
    table.update_workers([worker("a"), worker("b"), worker("c")], T0)
    assert table.select_name("b")
    assert not table.select_name("zzz")
    host = recording(WorkersTable.WorkerHighlighted)(table)
    async with host.run_test(size=SIZE) as pilot:
        await eventually(lambda: host.of(WorkersTable.WorkerHighlighted))
        await pilot.pause()
        assert table.selected_name == "b"
        assert [m.name for m in host.of(WorkersTable.WorkerHighlighted)] == ["b"]


# ---------------------------------------------------------------- the trigger key ""


async def test_the_trigger_key_empty_string_has_its_own_row_distinct_from_the_quieter_keys() -> None:
    table = TriggersTable()
    # the engine sent its hottest key (""), and holds three more
    state = TriggerState(name="compile", size_threshold=100, keys=[TriggerKeyState(key="", count=5)], key_count=4)
    host = recording(TriggersTable.TriggerKeySelected)(table)
    async with host.run_test(size=SIZE) as pilot:
        table.update_triggers([state], T0)
        await pilot.pause()
        lines = [table.render_line(y).text for y in range(1, 1 + table.row_count)]
        assert len(lines) == 2, lines
        assert lines[0].split()[:3] == ["compile", '""', "5"]
        assert "(+3 quieter keys)" in lines[1]
        assert table.selected_trigger_key == ("compile", "")
        await pilot.press("down")
        assert table.selected_trigger_key == ("compile", None)
        assert table.select_trigger_key("compile", "")
        table.focus()
        await pilot.press("enter")
        await eventually(lambda: host.of(TriggersTable.TriggerKeySelected))
        assert [(m.trigger, m.key) for m in host.of(TriggersTable.TriggerKeySelected)] == [("compile", "")]


# ---------------------------------------------------------------- CountsBar refuses bad counts


@pytest.mark.parametrize(
    ("update", "error", "names"),
    [
        ({"by_status": {"pending": None}, "dropped": 0, "paused": False}, TypeError, "by_status['pending']"),
        ({"by_status": {"pending": "3"}, "dropped": 0, "paused": False}, TypeError, "by_status['pending']"),
        ({"by_status": {"pending": -1}, "dropped": 0, "paused": False}, ValueError, "by_status['pending']"),
        ({"by_status": {"pending": 1}, "dropped": None, "paused": False}, TypeError, "dropped"),
        ({"by_status": {"pending": 1}, "dropped": 0, "paused": False, "totals": {"failed": 1.5}}, TypeError,
         "totals['failed']"),
        ({"by_status": {"pending": 1}, "dropped": 0, "paused": False, "rate": math.nan}, ValueError, "rate"),
    ],
    ids=["none", "text", "negative", "dropped-none", "totals-float", "rate-nan"],
)
async def test_counts_bar_refuses_a_bad_count_and_keeps_showing_the_last_good_one(
    update: dict[str, Any], error: type[Exception], names: str
) -> None:
    bar = CountsBar()
    host = Host(bar)
    async with host.run_test(size=SIZE) as pilot:
        bar.update({"pending": 3, "running": 2}, 0, False)
        await pilot.pause()
        before = text(bar)
        with pytest.raises(error) as raised:
            bar.update(**update)
        assert names in str(raised.value)
        await pilot.pause()
        assert host.is_running and text(bar) == before and "pending 3" in before
    assert host.return_code in (None, 0)


# ---------------------------------------------------------------- ParamsForm


class Mixed(BaseModel):
    ratio: float = 0.5
    values: list[float] = []
    id_or_name: int | str = 3
    label: int | str = "hello"


def mixed_form() -> ParamsForm:
    info = TaskInfo(name="t", kind="task", submittable=True, retries=0, timeout=None, concurrency=None,
                    params_schema=Mixed.model_json_schema())  # fmt: skip
    return ParamsForm(info, cursor_blink=False)


@pytest.mark.parametrize("typed", ["nan", "inf", "-inf", "1e999"])
async def test_params_form_refuses_a_number_json_cannot_carry_at_the_field(typed: str) -> None:
    form = mixed_form()
    async with Host(form).run_test(size=(100, 50)) as pilot:
        ratio = form.field_widget("ratio")
        assert isinstance(ratio, Input)
        ratio.value = typed
        with pytest.raises(ParamsFormError):
            form.collect()
        await pilot.pause()
        assert "not a finite number" in form.field_error("ratio")


async def test_params_form_refuses_nan_inside_a_json_field() -> None:
    form = mixed_form()
    async with Host(form).run_test(size=(100, 50)) as pilot:
        values = form.field_widget("values")
        assert isinstance(values, Input)
        values.value = "[1.5, NaN]"
        with pytest.raises(ParamsFormError):
            form.collect()
        await pilot.pause()
        assert "NaN is not a JSON number" in form.field_error("values")
        values.value = "[1.5, 2]"
        assert form.collect()["values"] == [1.5, 2]


async def test_params_form_takes_plain_text_for_a_union_with_a_string() -> None:
    form = mixed_form()
    async with Host(form).run_test(size=(100, 50)) as pilot:
        field = form.field_widget("id_or_name")
        label = form.field_widget("label")
        assert isinstance(field, Input) and isinstance(label, Input)
        assert label.value == "hello"  # a string default reads as the text, not as JSON
        collected: list[Any] = []
        for typed in ("hello", "5", '"5"', "true", "two words"):
            field.value = typed
            collected.append(form.collect()["id_or_name"])
        # another member when the text reads as one, else the text itself ("5" quoted: the string)
        assert collected == ["hello", 5, "5", "true", "two words"]
        await pilot.pause()
        assert form.field_error("id_or_name") == ""
        assert Mixed.model_validate(form.collect()).id_or_name == "two words"


# ---------------------------------------------------------------- HealthSparklines


def sample(ts: float, cpu: float) -> HealthSample:
    return HealthSample(ts=ts, cpu_percent=cpu, rss_bytes=1 << 20, threads=3, open_fds=9, loop_lag_ms=0.5,
                        running=1, queue_depth=2, finished_per_s=1.0, failed_per_s=0.0)  # fmt: skip


async def test_health_sparklines_put_a_late_sample_in_time_order() -> None:
    graphs = HealthSparklines(history=3)
    async with Host(graphs).run_test(size=(100, 40)) as pilot:
        graphs.add_sample(sample(T0 + 100, 10.0))
        graphs.add_sample(sample(T0 + 50, 5.0))  # delivered late
        await pilot.pause()
        assert graphs.span == 50.0 and graphs.history("cpu") == [5.0, 10.0]
        assert graphs.last_sample is not None and graphs.last_sample.ts == T0 + 100
        axis = graphs.axis_text(60).plain
        assert axis.startswith("-50") and "-0" not in axis
        graphs.add_sample(sample(T0 + 75, 7.5))
        graphs.add_sample(sample(T0 + 10, 1.0))  # older than the full window: it would fall off first
        graphs.add_sample(sample(T0 + 90, 9.0))  # the window is full: the oldest goes
        await pilot.pause()
        assert graphs.history("cpu") == [7.5, 9.0, 10.0] and graphs.span == 25.0


async def test_health_sparklines_axis_keeps_what_fits_in_a_narrow_graph() -> None:
    # at 40 columns the graphs get a few cells: the axis ran its labels together ("-1.1s-0.5snow")
    graphs = HealthSparklines(history=10)
    async with Host(graphs).run_test(size=(100, 40)) as pilot:
        graphs.add_sample(sample(T0, 1.0))
        graphs.add_sample(sample(T0 + 2, 2.0))
        await pilot.pause()
        assert graphs.axis_text(30).plain.split() == ["-2.0s", "-1.0s", "now"]
        assert graphs.axis_text(13).plain.split() == ["-2.0s", "now"]
        assert graphs.axis_text(5).plain == "  now"
        assert graphs.axis_text(2).plain == "  "


# ---------------------------------------------------------------- StoreBadge


async def test_store_badge_draws_what_its_docstring_shows() -> None:
    doc = StoreBadge.__doc__ or ""
    example = doc.split("``")[1]
    badge = StoreBadge()
    async with Host(badge).run_test(size=(120, 5)) as pilot:
        badge.update("sqlite:/var/app/runs.db", "3f2a91c4deadbeef", "tcp://127.0.0.1:7070")
        await pilot.pause()
        assert text(badge).strip() == example


async def test_store_badge_says_first_how_long_the_engine_has_not_reached_its_store() -> None:
    badge = StoreBadge()
    async with Host(badge).run_test(size=(44, 5)) as pilot:
        badge.update("sqlite:/var/app/runs.db", "3f2a91c4deadbeef", "tcp://127.0.0.1:7070")
        with pytest.raises(TypeError, match="seconds is a number or None"):
            badge.show_cut_off("75")  # type: ignore[arg-type]
        badge.show_cut_off(75.4)
        await pilot.pause()
        # narrow: how it is reached and the incarnation give way, the warning and the store stay
        shown = text(badge).strip()
        assert shown.startswith("✖ OUT OF REACH 1m15s store sqlite") and shown.endswith("/runs.db"), shown
        assert "via" not in shown and "incarnation" not in shown
        badge.show_cut_off(None)
        await pilot.pause()
        assert "OUT OF REACH" not in text(badge)


# ---------------------------------------------------------------- `taskwatch --plain --seconds`


@pytest.mark.parametrize("seconds", ["-1", "nan", "0", "inf"])
def test_plain_refuses_seconds_that_are_not_a_positive_number(
    seconds: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(["--plain", "--seconds", seconds])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1, captured.err
    assert lines[0].startswith(f"taskwatch: --seconds {seconds} is not a number of seconds above 0")
    assert captured.out == ""  # refused before the demo engine ran


def _periodic(name: str) -> PeriodicInfo:
    return PeriodicInfo(name=name, trigger="every 1s", trigger_kind="interval", enabled=True)


def _queue(name: str) -> QueueInfo:
    return QueueInfo(name=name, concurrency=1, maxsize=0, depth=0, in_flight=0, processed=0, failed=0)


#: a table and how to fill it with the rows "a" and "b" given by a generator
FROM_GENERATORS: list[tuple[type[Any], Callable[[Any, Iterator[Any]], None], Callable[[str], Any]]] = [
    (ScheduleTable, lambda t, rows: t.update_schedule(rows, 0.0), _periodic),
    (QueuesTable, lambda t, rows: t.update_queues(rows), _queue),
    (NodesTable, lambda t, rows: t.update_nodes(rows, 0.0), lambda name: ClusterNode(node=name)),
]


@pytest.mark.parametrize(("cls", "fill", "make"), FROM_GENERATORS, ids=lambda v: getattr(v, "__name__", ""))
async def test_a_table_given_a_generator_shows_every_row(
    cls: type[Any], fill: Callable[[Any, Iterator[Any]], None], make: Callable[[str], Any]
) -> None:
    table = cls()
    async with Host(table).run_test(size=(140, 20)):
        fill(table, (make(name) for name in "ab"))
        await eventually(lambda: table.row_count == 2)
