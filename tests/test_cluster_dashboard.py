"""``taskwatch attach redis://...``: the cluster dashboard, driven by Textual's Pilot.

Three engines publish their events to one Redis stream; one dashboard reads
it and must show each node (with the leader's badge and health figures) and
each node's events under its id. A dashboard opened after most of a node's
events were trimmed away says how many it missed.
"""

from __future__ import annotations

import uuid
from typing import Any

from rich.text import Text
from taskwatch.engine import Engine, InProcessLease, RedisEventRelay, TaskContext
from taskwatch.tui.cli import main as cli_main
from taskwatch.tui.cluster import ClusterApp
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


def test_attach_names_the_extra_when_the_url_is_bad(capsys: Any) -> None:
    assert cli_main(["attach", "redis://127.0.0.1:1/0", "--stream", ""]) != 0
    assert "stream" in capsys.readouterr().err
