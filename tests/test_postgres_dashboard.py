"""``taskwatch attach postgresql://...``: the cluster dashboard on the cluster's database, driven by Pilot.

Two node processes (``tests.durable_child --events postgres --leader``, one
run at a time each) share a real PostgreSQL database; one of them submits
two runs that never end on their own, so each node holds one. The dashboard
in the test process runs no tasks: it must show both nodes from the nodes
table (up, heartbeat, CPU, RSS, version, one leader with its term), each run
with the node it runs on, both nodes' events, and its cancel and retry must
act on a run another process holds.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rich.text import Text
from taskwatch.engine import ClusterObserver, __version__
from taskwatch.tui.cli import main as cli_main
from taskwatch.tui.cluster import ClusterApp
from taskwatch.tui.screens import ConfirmScreen
from taskwatch.widgets import ClusterRunsTable, EventLog, StoreNodesTable
from textual.widgets import Static

from .helpers import eventually
from .processes import Line
from .test_durable import Child

TIMEOUT = 30.0


async def line(child: Child, ev: str, timeout: float = TIMEOUT, **match: Any) -> Line:
    return await asyncio.to_thread(
        child.wait_for, lambda x: x.get("ev") == ev and all(x.get(k) == v for k, v in match.items()), timeout
    )


def cell(table: Any, key: str, column: str) -> str:
    return str(table.get_cell(key, column).plain)


def header(app: ClusterApp) -> str:
    rendered = app.query_one("#cluster-header", Static).render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


async def test_the_dashboard_shows_both_nodes_their_runs_and_cancels_and_retries_across_nodes(
    postgres_url: str, nodes: list[Child]
) -> None:
    common = ("--events", "postgres", "--health", "0.2", "--leader", "--lease-ttl", "10", "--poll", "0.2",
              "--max-concurrency", "1")  # fmt: skip
    b = Child(postgres_url, "node-b", *common, "run")  # type: ignore[arg-type]
    nodes.append(b)
    await line(b, "started")
    app = ClusterApp(ClusterObserver(postgres_url))
    async with app.run_test(size=(160, 45)) as pilot:
        a = Child(postgres_url, "node-a", *common, "run", "--submit", "hang", "--count", "2")  # type: ignore[arg-type]
        nodes.append(a)
        ids = (await line(a, "submitted"))["ids"]

        nodes_table = app.query_one(StoreNodesTable)
        runs_table = app.query_one(ClusterRunsTable)
        await eventually(lambda: nodes_table.shown_keys == ["node-a", "node-b"], timeout=TIMEOUT)
        # CPU and RSS come from the nodes table, written with each node's heartbeat
        await eventually(
            lambda: all("%" in cell(nodes_table, n, "cpu") and "MiB" in cell(nodes_table, n, "rss")
                        for n in ("node-a", "node-b")),
            timeout=TIMEOUT,
        )  # fmt: skip
        await eventually(lambda: sum(cell(nodes_table, n, "role").startswith("LEADER t") for n in ("node-a", "node-b")) == 1,
                         timeout=TIMEOUT)  # fmt: skip
        for n in ("node-a", "node-b"):
            assert cell(nodes_table, n, "state") == "up"
            assert cell(nodes_table, n, "heartbeat").endswith("ago")
            assert cell(nodes_table, n, "version") == __version__

        # one run on each node (each runs one at a time), each shown with its node
        def owners() -> dict[str, str]:
            return {run_id: cell(runs_table, run_id, "node") for run_id in ids if run_id in runs_table.shown_keys
                    and cell(runs_table, run_id, "status") == "running"}  # fmt: skip

        await eventually(lambda: sorted(owners().values()) == ["node-a", "node-b"], timeout=TIMEOUT)
        on_b = next(run_id for run_id, owner in owners().items() if owner == "node-b")
        text = header(app)
        assert "2 nodes" in text and "leader node-" in text and "0 missed" in text
        logged = [entry.text for entry in app.query_one(EventLog).lines]
        assert any("node-a" in entry for entry in logged) and any("node-b" in entry for entry in logged)

        # cancel the run node-b holds: asked first, then node-b hears of it and stops it
        assert runs_table.select_run(on_b)
        await pilot.press("c")
        await eventually(lambda: isinstance(app.screen, ConfirmScreen), timeout=TIMEOUT)
        assert on_b in app.screen.question and "node-b" in app.screen.question  # type: ignore[attr-defined]
        await pilot.press("y")
        assert (await line(b, "cancelled", id=on_b))["id"] == on_b
        await eventually(lambda: cell(runs_table, on_b, "status") == "cancelled", timeout=TIMEOUT)

        # retry it: a new run with the same params, which node-b (free again) takes
        runs_table.select_run(on_b)
        await pilot.press("r")

        def retried() -> list[str]:
            return [r.id for r in app.observer.runs() if r.source == f"retry:{on_b}"]  # type: ignore[union-attr]

        await eventually(retried, timeout=TIMEOUT)
        (again,) = retried()
        await eventually(lambda: again in runs_table.shown_keys and cell(runs_table, again, "status") == "running"
                         and cell(runs_table, again, "node") == "node-b", timeout=TIMEOUT)  # fmt: skip
        assert cell(runs_table, ids[0] if ids[0] != on_b else ids[1], "status") == "running"  # node-a's, untouched
    # the nodes hold runs that never end: the fixture kills them rather than wait out a stop


def test_attach_to_an_unreachable_database_says_so(capsys: Any) -> None:
    assert cli_main(["attach", "postgresql://nobody@127.0.0.1:1/none?reconnect_timeout=0.2"]) == 2
    err = capsys.readouterr().err
    assert "cannot watch postgresql://nobody@127.0.0.1:1/none" in err
