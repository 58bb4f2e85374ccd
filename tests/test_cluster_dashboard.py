"""``taskwatch attach redis://...``: the cluster dashboard, driven by Textual's Pilot.

Three engines publish their events to one Redis stream; one dashboard reads
it and must show each node (with the leader's badge and health figures) and
each node's events under its id. A dashboard opened after most of a node's
events were trimmed away says how many it missed, and entries in the stream
that are no event are counted in the header. On an in-process stream (no
server): the log keeps its newest event in view when the space above it
changes, and at 80 columns every node's state and missed count stays in
sight, as does each event's text after a node id of a hundred characters
and more.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

import redis
import redis.asyncio as aioredis
from rich.cells import cell_len
from rich.text import Text
from taskwatch.engine import Engine, InProcessLease, MemoryEventRelay, MemoryEventStream, RedisEventRelay, TaskContext
from taskwatch.tui.cli import main as cli_main
from taskwatch.tui.cluster import ClusterApp, join_parts
from taskwatch.widgets import EventLog, NodesTable
from textual.widgets import Static

from .helpers import eventually, stray_tasks
from .redis_server import RedisServer


def node_engine(url: str, node: str, stream: str, maxlen: int = 10_000, **kwargs: Any) -> Engine:
    engine = Engine(node_id=node, events=f"{url}?stream={stream}&maxlen={maxlen}", health_interval=0.1, **kwargs)
    assert engine.cluster is not None and engine.cluster.stream == stream

    @engine.task
    async def hello(ctx: TaskContext) -> str:
        return ctx.node_id

    return engine


def log_lines(app: ClusterApp) -> list[str]:
    return [line.text for line in app.query_one(EventLog).lines]


def header(app: ClusterApp) -> str:
    rendered = app.query_one("#cluster-header", Static).render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


async def test_events_from_three_nodes_reach_one_dashboard_with_their_node_ids(redis_server: RedisServer) -> None:
    stream = f"test:{uuid.uuid4().hex[:8]}:events"
    lease = InProcessLease(ttl=2.0)
    engines = [node_engine(redis_server.url, node, stream, lease=lease) for node in ("api-1", "api-2", "api-3")]
    app = ClusterApp(RedisEventRelay(redis_server.url, stream=stream))
    try:
        async with app.run_test(size=(150, 40)) as pilot:
            for engine in engines:
                await engine.start()
            for engine in engines:
                await (await engine.submit("hello")).wait()

            table = app.query_one(NodesTable)
            await eventually(lambda: table.shown_keys == ["api-1", "api-2", "api-3"], timeout=10.0)

            def succeeded_nodes() -> set[str]:
                return {
                    node
                    for line in log_lines(app)
                    for node in ("api-1", "api-2", "api-3")
                    if node in line and "run.succeeded" in line
                }

            await eventually(lambda: succeeded_nodes() == {"api-1", "api-2", "api-3"}, timeout=10.0)
            await eventually(lambda: "%" in table.get_cell("api-3", "cpu").plain, timeout=10.0)
            await pilot.pause()
            assert table.get_cell("api-1", "role").plain == "LEADER t1"
            assert table.get_cell("api-2", "role").plain == "follower"
            assert all(table.get_cell(n, "missed").plain == "0" for n in ("api-1", "api-2", "api-3"))
            assert all("MiB" in table.get_cell(n, "rss").plain for n in ("api-1", "api-2", "api-3"))
            text = header(app)
            assert stream in text and "3 nodes" in text and "0 missed" in text and "connected" in text

            await engines[1].stop(2.0)
            await eventually(lambda: table.get_cell("api-2", "state").plain == "stopped", timeout=10.0)
    finally:
        for engine in engines:
            await engine.stop(2.0)
    assert not stray_tasks()


async def test_a_dashboard_opened_after_a_trim_counts_what_it_missed(redis_server: RedisServer) -> None:
    stream = f"test:{uuid.uuid4().hex[:8]}:events"
    engine = node_engine(redis_server.url, "w", stream, maxlen=100)
    try:
        await engine.start()
        for handle in await engine.submit_many([("hello", None)] * 300):
            await handle.wait()
        await eventually(lambda: engine.cluster.stats().pending == 0, timeout=10.0)  # type: ignore[union-attr]

        app = ClusterApp(RedisEventRelay(redis_server.url, stream=stream, since="0"))
        async with app.run_test(size=(150, 40)) as pilot:
            table = app.query_one(NodesTable)
            await eventually(lambda: table.shown_keys == ["w"] and table.get_cell("w", "missed").plain != "0",
                             timeout=10.0)
            await pilot.pause()
            missed = int(table.get_cell("w", "missed").plain)
            assert f"{missed} missed" in header(app)
            assert any("bus.dropped" in line and "w" in line for line in log_lines(app))
    finally:
        await engine.stop(2.0)
    assert not stray_tasks()


async def test_the_header_says_connecting_until_the_first_connection_succeeds_or_fails(
    redis_server: RedisServer,
) -> None:
    # a listener that takes the connection and never answers: the first connection is still under
    # way, which is no outage; a server that refuses it outright is one
    silent = socket.create_server(("127.0.0.1", 0))
    try:
        port = silent.getsockname()[1]
        app = ClusterApp(RedisEventRelay(f"redis://127.0.0.1:{port}/0", stream="test:silent"))
        async with app.run_test(size=(150, 40)):
            await eventually(lambda: "connecting…" in header(app), timeout=10.0)
            assert "DISCONNECTED" not in header(app)
    finally:
        silent.close()
    refused = socket.create_server(("127.0.0.1", 0))
    port = refused.getsockname()[1]
    refused.close()  # nothing listens there now
    app = ClusterApp(RedisEventRelay(f"redis://127.0.0.1:{port}/0", stream="test:refused"))
    async with app.run_test(size=(150, 40)):
        # and says why: the header said "(retrying)" and nothing more, whatever the cause
        await eventually(lambda: "DISCONNECTED (retrying: ConnectionError: " in header(app), timeout=10.0)
        assert f"127.0.0.1:{port}" in header(app)
    app = ClusterApp(RedisEventRelay(redis_server.url, stream=f"test:{uuid.uuid4().hex[:8]}"))
    async with app.run_test(size=(150, 40)):
        await eventually(lambda: "connected" in header(app) and "connecting" not in header(app), timeout=10.0)
    assert not stray_tasks()


async def test_a_stream_the_server_stops_serving_after_the_start_is_retried_and_shown(
    redis_server: RedisServer,
) -> None:
    # an error Redis answers after the start (the stream's key made another type) ended the
    # loop that met it: the dashboard read nothing more and went on saying "connected"
    stream = f"test:{uuid.uuid4().hex[:8]}"
    engine = node_engine(redis_server.url, "api-1", stream)
    app = ClusterApp(RedisEventRelay(redis_server.url, stream=stream))
    sync = redis.Redis(port=redis_server.port)
    try:
        async with engine, app.run_test(size=(150, 40)):
            await eventually(lambda: "connected" in header(app) and "connecting" not in header(app), timeout=10.0)
            sync.delete(stream)
            sync.set(stream, "not a stream")
            await eventually(lambda: "DISCONNECTED (retrying: ResponseError: WRONGTYPE" in header(app), timeout=10.0)
            sync.delete(stream)
            await engine.submit("hello")  # its events reach the dashboard again
            await eventually(lambda: any("run.succeeded" in line for line in log_lines(app)), timeout=10.0)
            assert "DISCONNECTED" not in header(app)
    finally:
        sync.close()
    assert not stray_tasks()


def test_attach_names_the_extra_when_the_url_is_bad(capsys: Any) -> None:
    assert cli_main(["attach", "redis://127.0.0.1:1/0", "--stream", ""]) != 0
    assert "stream" in capsys.readouterr().err


def test_a_redis_url_or_password_the_server_refuses_is_one_line_that_never_shows_the_password(
    redis_server: RedisServer, capsys: Any
) -> None:
    # a port that is no number, an option value redis-py cannot read and a database index the
    # server does not have crashed attach with a traceback whose locals showed the password; a
    # wrong password was retried for ever, the header saying DISCONNECTED and nothing more
    secret = "Hunter2Secret"
    sync = redis.Redis(port=redis_server.port)
    sync.config_set("requirepass", secret)
    sync.close()
    port = redis_server.port
    refusals = {
        f"redis://:{secret}@127.0.0.1:notaport/0": "Port could not be cast to integer value",
        f"redis://:{secret}@127.0.0.1:{port}/0?socket_timeout=abc": "Invalid value for 'socket_timeout'",
        f"redis://:{secret}@127.0.0.1:{port}/99": "refused this relay (ResponseError: DB index is out of range)",
        f"redis://:wrong-{secret}@127.0.0.1:{port}/0": "refused this relay (AuthenticationError: ",
        f"redis://127.0.0.1:{port}/0": "refused this relay (AuthenticationError: ",
    }
    for url, said in refusals.items():
        for argv in (["attach", url], ["web", "attach", url]):
            assert cli_main(argv) == 2, (argv, capsys.readouterr())
            out, err = capsys.readouterr()
            assert said in err and err.count("\n") == 1, (argv, err)
            assert secret not in out + err
    assert cli_main(["attach", f"redis://:wrong@127.0.0.1:{port}/0", "--stream", "s"]) == 2
    assert "wrong" not in capsys.readouterr().err


# ---------------------------------------------------------------- on an in-process stream


def memory_engine(node: str, stream: MemoryEventStream) -> Engine:
    engine = Engine(node_id=node, events=stream, health_interval=None)

    @engine.task
    async def hello(ctx: TaskContext) -> str:
        return ctx.node_id

    return engine


async def test_the_log_keeps_its_newest_event_in_view_when_the_space_above_changes() -> None:
    stream = MemoryEventStream()
    engine = memory_engine("w", stream)
    app = ClusterApp(MemoryEventRelay(stream))
    try:
        async with app.run_test(size=(120, 30)) as pilot:
            await engine.start()
            for handle in await engine.submit_many([("hello", None)] * 20):
                await handle.wait()
            log = app.query_one(EventLog)
            await eventually(lambda: any("run.succeeded" in line for line in log_lines(app)[-1:]), timeout=10.0)
            await eventually(lambda: log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y)
            # less room for the log (a smaller terminal, a nodes table that grew): still at its end
            await pilot.resize_terminal(120, 20)
            await pilot.pause()
            await pilot.pause()
            assert log.scroll_y == log.max_scroll_y
    finally:
        await engine.stop(1.0)
    assert not stray_tasks()


def test_the_header_wraps_between_figures_never_inside_one() -> None:
    parts = ["[b]taskwatch:events[/] on memory (this process)", "connected", "3 nodes", "32 events",
             "[bold red]27 missed[/]"]  # fmt: skip
    assert join_parts(parts, 200) == "  ".join(parts)
    lines = Text.from_markup(join_parts(parts, 78)).plain.split("\n")
    assert lines == ["taskwatch:events on memory (this process)  connected  3 nodes  32 events", "27 missed"]
    assert join_parts(parts, 0) == "  ".join(parts)  # width not known yet: one line


async def test_a_narrow_dashboard_shows_every_nodes_missed_count() -> None:
    stream = MemoryEventStream(maxlen=40)  # api-2's events and the last few of api-1's
    engines = [memory_engine(node, stream) for node in ("api-1", "api-2")]
    try:
        for engine in engines:
            await engine.start()
            for handle in await engine.submit_many([("hello", None)] * 10):
                await handle.wait()
            await eventually(lambda e=engine: e.cluster is not None and e.cluster.pending == 0)
        app = ClusterApp(MemoryEventRelay(stream, since="0"))
        async with app.run_test(size=(80, 24)) as pilot:
            table = app.query_one(NodesTable)
            await eventually(lambda: table.shown_keys == ["api-1", "api-2"]
                             and table.get_cell("api-1", "missed").plain != "0")  # fmt: skip
            await pilot.pause()
            missed = table.get_cell("api-1", "missed").plain
            assert table.virtual_size.width <= table.size.width  # no column past the right edge
            assert f"{missed} missed" in header(app).split("\n")[-1]
    finally:
        for engine in engines:
            await engine.stop(1.0)
    assert not stray_tasks()


async def test_entries_that_are_no_event_are_counted_in_the_header(redis_server: RedisServer) -> None:
    stream = f"test:{uuid.uuid4().hex[:8]}:events"
    engine = node_engine(redis_server.url, "api-1", stream)
    raw = aioredis.Redis.from_url(redis_server.url)
    app = ClusterApp(RedisEventRelay(redis_server.url, stream=stream))
    try:
        async with app.run_test(size=(150, 40)):
            await engine.start()
            await (await engine.submit("hello")).wait()
            await eventually(lambda: any("run.succeeded" in line for line in log_lines(app)), timeout=10.0)
            assert "malformed" not in header(app)
            # a foreign writer's entries: one that is not JSON, one without the event field
            await raw.xadd(stream, {"e": "not json"})
            await raw.xadd(stream, {"x": "no event here"})
            await eventually(lambda: "2 malformed" in header(app), timeout=10.0)
            assert "0 missed" in header(app)  # none of api-1's events went missing for it
    finally:
        await engine.stop(1.0)
        await raw.aclose()
    assert not stray_tasks()


#: node ids of the length pods and hosts get (the engine takes any length)
LONG_IDS = ("taskwatch-worker-7f9c8d6b5-x2k4p.prod-eu-west-1.internal-0001", "node-" + "x" * 150 + "-end")


async def test_long_node_ids_leave_each_nodes_state_and_missed_and_each_events_text_in_sight() -> None:
    stream = MemoryEventStream()
    engines = [memory_engine(node, stream) for node in ("api-1", *LONG_IDS)]
    try:
        for engine in engines:
            await engine.start()
            await (await engine.submit("hello")).wait()
        app = ClusterApp(MemoryEventRelay(stream, since="0"))
        async with app.run_test(size=(80, 24)):
            table = app.query_one(NodesTable)
            await eventually(lambda: len(table.shown_keys) == 3)
            # no column past the right edge (once laid out for the three)
            await eventually(lambda: 0 < table.virtual_size.width <= table.size.width)
            assert {"state", "missed"} <= {column.key for column in table.shown_columns}
            for node in LONG_IDS:
                shown = table.get_cell(node, "node").plain
                assert cell_len(shown) <= 24 and shown.endswith("…") and node.startswith(shown[:-1])
                assert table.get_cell(node, "state").plain == "up"
                assert table.get_cell(node, "missed").plain == "0"
            assert table.get_cell("api-1", "node").plain == "api-1"

            log = app.query_one(EventLog)

            def succeeded_lines() -> list[str]:
                return [line for line in log_lines(app) if "run.succeeded" in line]

            await eventually(lambda: len(succeeded_lines()) == 3)
            succeeded = succeeded_lines()
            for line in succeeded:
                # the event's own text starts on screen, not past a node id wider than the log
                assert line.index("run=") + len("run=") < log.size.width
    finally:
        for engine in engines:
            await engine.stop(1.0)
    assert not stray_tasks()
