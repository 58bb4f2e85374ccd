"""``taskwatch attach postgresql://...``: the cluster dashboard on the cluster's database, driven by Pilot.

Two node processes (``tests.durable_child --events postgres --leader``, one
run at a time each) share a real PostgreSQL database; one of them submits
two runs that never end on their own, so each node holds one. The dashboard
in the test process runs no tasks: it must show both nodes from the nodes
table (up, heartbeat, CPU, RSS, version, one leader with its term), each run
with the node it runs on, both nodes' events, and its cancel and retry must
act on a run another process holds.

Also: the dashboard only watches (it creates and migrates nothing, and says
why it cannot watch a database without taskwatch's tables or at another
schema version); it lists every running run; a dead node shows no role and
the runs it still holds; during an outage what it shows is marked stale; a
paused log says so; runs submitted together are newest first; Enter on a run
shows it in full (params, where it ran, a failure's traceback), kept current
while it is open, and ``r`` there retries it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel
from rich.text import Text
from taskwatch.engine import (
    ClusterObserver,
    Engine,
    EventBus,
    NotATaskwatchStore,
    PostgresEventRelay,
    Progress,
    RunError,
    RunProgressed,
    RunStatus,
    SchemaTooNew,
    StoreUnavailable,
    TaskContext,
    __version__,
)
from taskwatch.engine.store import Failed, NewRun, PostgresStore, Retry, Succeeded
from taskwatch.engine.store import queries as Q
from taskwatch.tui.cli import main as cli_main
from taskwatch.tui.cluster import ClusterApp
from taskwatch.tui.screens import ConfirmScreen, RunScreen
from taskwatch.widgets import ClusterRunsTable, EventLog, RunDetail, StoreNodesTable
from textual.screen import Screen
from textual.widgets import Label, Static

from .cutting_proxy import StallingProxy
from .helpers import eventually, screen_shown, stray_tasks
from .postgres_server import PostgresServer, schema_script
from .processes import Line
from .test_durable import Child
from .test_widgets import plain

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
        # a node's first heartbeat is due an interval after it registered (the table shows
        # its CPU from the registration on): on a busy machine the table may show none yet
        await eventually(lambda: all(cell(nodes_table, n, "heartbeat").endswith("ago") for n in ("node-a", "node-b")),
                         timeout=TIMEOUT)  # fmt: skip
        for n in ("node-a", "node-b"):
            assert cell(nodes_table, n, "state") == "up"
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
        await screen_shown(app, ConfirmScreen, timeout=TIMEOUT)
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
    # one plain line, said before any screen is drawn
    assert err.startswith("taskwatch: cannot watch postgresql://nobody@127.0.0.1:1/none") and err.count("\n") == 1
    assert "\x1b" not in err


# ---------------------------------------------------------------- it only watches

#: every object of the database outside PostgreSQL's own schemas: what a watcher must leave alone
_CONTENTS = """SELECT COALESCE(string_agg(n.nspname || '.' || c.relname, ',' ORDER BY n.nspname, c.relname), '')
FROM pg_namespace AS n LEFT JOIN pg_class AS c ON c.relnamespace = n.oid
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'"""


def database(url: str) -> str:
    return url.rsplit("/", 1)[1].split("?", 1)[0]


def versions(server: PostgresServer, url: str) -> list[str]:
    return server.sql("SELECT version FROM schema_migrations ORDER BY version", database(url)).split()


async def test_a_dashboard_on_a_database_without_taskwatch_tables_creates_none_and_says_so(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    db = database(postgres_url)
    before = postgres_server.sql(_CONTENTS, db)
    with pytest.raises(StoreUnavailable, match=r"schema public holds no taskwatch run store.*Watch the cluster's own"):
        await ClusterObserver(postgres_url).start()
    # the nodes keep their tables in a schema of their own, and the URL names another one
    with pytest.raises(StoreUnavailable, match=r'schema "elsewhere" does not exist.*\?schema=NAME its nodes use'):
        await ClusterObserver(f"{postgres_url}?schema=elsewhere").start()
    with pytest.raises(StoreUnavailable, match="holds no taskwatch run store"):
        await PostgresEventRelay(postgres_url, migrate=False).start()

    app = ClusterApp(ClusterObserver(postgres_url))
    async with app.run_test(size=(160, 45)):
        await eventually(lambda: app.return_code is not None, timeout=TIMEOUT)
    assert app.return_code == 2
    assert postgres_server.sql(_CONTENTS, db) == before  # no table, no schema
    assert not stray_tasks()


async def test_a_dashboard_leaves_an_older_or_newer_clusters_database_as_it_is(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    db = database(postgres_url)
    postgres_server.sql(";\n".join(schema_script(4)), db)
    older = rf"schema version 4, older than this taskwatch's {Q.SCHEMA_VERSION}.*Upgrade the cluster's nodes"
    with pytest.raises(StoreUnavailable, match=older):
        await ClusterObserver(postgres_url).start()
    with pytest.raises(StoreUnavailable, match="schema version 4"):
        await PostgresEventRelay(postgres_url, migrate=False).start()
    assert versions(postgres_server, postgres_url) == ["1", "2", "3", "4"]

    future = Q.SCHEMA_VERSION + 1
    rows = ", ".join(f"({v}, 'later', 0)" for v in range(5, future + 1))
    postgres_server.sql(f"INSERT INTO schema_migrations VALUES {rows}", db)
    with pytest.raises(SchemaTooNew, match=f"schema version {future}"):
        await ClusterObserver(postgres_url).start()
    assert versions(postgres_server, postgres_url) == [str(v) for v in range(1, future + 1)]
    assert not stray_tasks()


async def test_a_dashboard_refuses_another_applications_tables_naming_them(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    db = database(postgres_url)
    postgres_server.sql("CREATE TABLE events (id serial PRIMARY KEY, title text)", db)
    before = postgres_server.sql(_CONTENTS, db)
    with pytest.raises(NotATaskwatchStore, match=r"\(events\).*Watch the cluster's own database"):
        await ClusterObserver(postgres_url).start()
    assert postgres_server.sql(_CONTENTS, db) == before


@pytest.mark.timeout(60)  # (a dashboard that went on watching would never return)
def test_attach_to_an_older_cluster_says_what_to_do_and_migrates_nothing(
    postgres_server: PostgresServer, postgres_url: str, capsys: Any
) -> None:
    postgres_server.sql(";\n".join(schema_script(4)), database(postgres_url))
    assert cli_main(["attach", postgres_url]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"taskwatch: cannot watch {postgres_url}") and err.count("\n") == 1
    assert "schema version 4" in err and "Upgrade the cluster's nodes first" in err
    assert versions(postgres_server, postgres_url) == ["1", "2", "3", "4"]


# ---------------------------------------------------------------- what it shows

COMMON = ("--events", "postgres", "--health", "0.2", "--leader", "--poll", "0.2")


async def test_every_running_run_is_listed_however_many_and_a_bound_says_how_many_are_not(
    postgres_url: str, nodes: list[Child]
) -> None:
    node = Child(postgres_url, "w", *COMMON, "--lease-ttl", "10", "--max-concurrency", "30",  # type: ignore[arg-type]
                 "run", "--submit", "hang", "--count", "25")  # fmt: skip
    nodes.append(node)
    ids = (await line(node, "submitted"))["ids"]

    def running(app: ClusterApp) -> set[str]:
        table = app.query_one(ClusterRunsTable)
        return {key for key in table.shown_keys if cell(table, key, "status") == "running"}

    # more running runs than the newest runs_limit: every one of them is listed
    app = ClusterApp(ClusterObserver(postgres_url, runs_limit=5))
    async with app.run_test(size=(160, 60)):
        await eventually(lambda: running(app) == set(ids), timeout=TIMEOUT)
        assert "not listed" not in header(app)

    # bounded lower than that: never silently
    app = ClusterApp(ClusterObserver(postgres_url, runs_limit=5, running_limit=10))
    async with app.run_test(size=(160, 60)):
        await eventually(lambda: len(running(app)) == 10, timeout=TIMEOUT)
        await eventually(lambda: "15 more running not listed" in header(app), timeout=TIMEOUT)


async def test_a_dead_node_whose_runs_were_taken_over_shows_no_role_and_no_runs(
    postgres_url: str, nodes: list[Child]
) -> None:
    common = (*COMMON, "--lease-ttl", "3")
    a = Child(postgres_url, "node-a", *common, "--max-concurrency", "4",  # type: ignore[arg-type]
              "run", "--submit", "hang", "--count", "4")  # fmt: skip
    nodes.append(a)
    ids = (await line(a, "submitted"))["ids"]
    await line(a, "lease.acquired")
    b = Child(postgres_url, "node-b", *common, "--max-concurrency", "8", "run")  # type: ignore[arg-type]
    nodes.append(b)
    await line(b, "started")

    app = ClusterApp(ClusterObserver(f"{postgres_url}?node_ttl=3"))
    async with app.run_test(size=(160, 45)):
        nodes_table = app.query_one(StoreNodesTable)
        runs_table = app.query_one(ClusterRunsTable)

        def on(node: str) -> bool:
            return all(key in runs_table.shown_keys and cell(runs_table, key, "status") == "running"
                       and cell(runs_table, key, "node") == node for key in ids)  # fmt: skip

        await eventually(lambda: on("node-a") and cell(nodes_table, "node-a", "running") == "4", timeout=TIMEOUT)
        await eventually(lambda: cell(nodes_table, "node-b", "role") == "follower", timeout=TIMEOUT)
        assert cell(nodes_table, "node-a", "role") == "LEADER t1"

        await asyncio.to_thread(a.sigkill)
        # node-b takes node-a's runs over once their claims lapse, and the lease with them
        await eventually(lambda: on("node-b"), timeout=TIMEOUT)
        await eventually(lambda: cell(nodes_table, "node-b", "role").startswith("LEADER t"), timeout=TIMEOUT)
        await eventually(lambda: cell(nodes_table, "node-a", "state") == "dead", timeout=TIMEOUT)
        assert cell(nodes_table, "node-a", "role") == "—"  # not a follower: it takes no part
        await eventually(lambda: cell(nodes_table, "node-a", "running") == "0", timeout=TIMEOUT)
        # a node's count is what its last heartbeat wrote: node-b's may come a beat after the runs
        await eventually(lambda: cell(nodes_table, "node-b", "running") == "4", timeout=TIMEOUT)


async def test_during_an_outage_what_was_read_before_is_marked_stale(
    postgres_server: PostgresServer, postgres_url: str, nodes: list[Child]
) -> None:
    node = Child(postgres_url, "w", *COMMON, "--lease-ttl", "3", "run")  # type: ignore[arg-type]
    nodes.append(node)
    await line(node, "lease.acquired")
    app = ClusterApp(ClusterObserver(f"{postgres_url}?node_ttl=3&reconnect_timeout=1"))
    async with app.run_test(size=(200, 45)):
        table = app.query_one(StoreNodesTable)
        await eventually(lambda: cell(table, "w", "state") == "up" and cell(table, "w", "role") == "LEADER t1",
                         timeout=TIMEOUT)  # fmt: skip
        assert "stale" not in header(app) and "leader w t1" in header(app)
        await asyncio.to_thread(postgres_server.stop)
        try:
            # no heartbeat read for longer than the node TTL (by the dashboard's clock): not "up"
            await eventually(lambda: cell(table, "w", "state") == "unknown", timeout=TIMEOUT)
            # and once the lease it held when last read has lapsed: who leads is not known
            await eventually(lambda: cell(table, "w", "role") == "—", timeout=TIMEOUT)
            await eventually(lambda: "DISCONNECTED" in header(app), timeout=TIMEOUT)
            text = header(app)
            assert "stale: as read" in text and "leader unknown" in text and "leader w" not in text
        finally:
            await asyncio.to_thread(postgres_server.start)
        # back: the node is seen again, and leads again
        await eventually(lambda: cell(table, "w", "state") == "up" and cell(table, "w", "role").startswith("LEADER"),
                         timeout=TIMEOUT)  # fmt: skip
        await eventually(lambda: "stale" not in header(app) and "leader w t" in header(app), timeout=TIMEOUT)


def hello_node(url: str) -> Engine:
    engine = Engine(store=url, node_id="n", events="postgres", health_interval=None, lease_ttl=10)

    @engine.task
    async def hello(ctx: TaskContext) -> str:
        return "hi"

    return engine


async def test_p_pauses_the_log_and_the_header_says_so_with_what_it_holds_back(postgres_url: str) -> None:
    async with hello_node(postgres_url) as engine:
        app = ClusterApp(ClusterObserver(postgres_url, lease=None))
        async with app.run_test(size=(160, 45)) as pilot:
            log = app.query_one(EventLog)
            await (await engine.submit("hello")).wait()
            await eventually(lambda: any("run.succeeded" in entry.text for entry in log.lines), timeout=TIMEOUT)
            assert "paused" not in header(app)
            await pilot.press("p")
            await eventually(lambda: "⏸ log paused" in header(app), timeout=TIMEOUT)
            shown = len(log.lines)
            await (await engine.submit("hello")).wait()
            await eventually(lambda: log.buffered > 0 and f"⏸ log paused ({log.buffered} buffered)" in header(app),
                             timeout=TIMEOUT)  # fmt: skip
            assert len(log.lines) == shown
            await pilot.press("p")
            await eventually(lambda: "paused" not in header(app) and len(log.lines) > shown, timeout=TIMEOUT)
    assert not stray_tasks()


async def test_runs_submitted_together_are_listed_newest_first(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as submitter:  # a client that submits, with no node to run them
        first = await submitter.insert([NewRun(task="later", params={})])
        batch = await submitter.insert([NewRun(task="later", params={"n": n}) for n in range(8)])
        app = ClusterApp(ClusterObserver(postgres_url, lease=None))
        async with app.run_test(size=(160, 45)):
            table = app.query_one(ClusterRunsTable)
            await eventually(lambda: len(table.shown_keys) == 9, timeout=TIMEOUT)
            assert table.shown_keys == [r.id for r in reversed(batch)] + [first[0].id]
            assert [r.id for r in app.observer.runs()] == table.shown_keys  # type: ignore[union-attr]


async def test_r_on_a_keyed_run_keeps_its_key_and_hands_back_the_run_that_waits_with_it(postgres_url: str) -> None:
    """The dashboard's retry is Engine.retry's: same params and dedup key, so a keyed run already
    waiting is the one that comes back, and no unkeyed copy of the work is queued beside it."""
    async with PostgresStore(postgres_url) as submitter, ClusterObserver(postgres_url, lease=None) as observer:
        (failed,) = await submitter.insert([NewRun(task="charge", params={"order": 42}, key="order-42")])
        await submitter.register_node("worker", "w1", __version__)
        (claim,) = await submitter.claim("worker", "w1", 1, {"charge": None})
        await submitter.finish(claim.token, Failed(RunError(type="CardDeclined", message="declined")))
        assert (await observer.get(failed.id)).status is RunStatus.FAILED

        again = await observer.retry(failed.id)
        assert again.key == "order-42" and again.params == {"order": 42} and again.status is RunStatus.PENDING
        # asked twice while the first retry waits: that one comes back
        assert (await observer.retry(failed.id)).id == again.id
        page = await submitter.query(task="charge", status=RunStatus.PENDING, limit=10)
        assert [(r.id, r.key) for r in page.runs] == [(again.id, "order-42")]


class ParseParams(BaseModel):
    path: str
    strict: bool = True


async def test_enter_on_a_run_shows_it_in_full_and_keeps_it_current(postgres_url: str) -> None:
    # a failed run's traceback, its params and where it ran; a run that goes on from running to
    # succeeded changes before the reader's eyes; and r retries the run being read
    engine = Engine(store=postgres_url, node_id="worker", events="postgres", health_interval=None, lease_ttl=10)
    gate = asyncio.Event()

    @engine.task
    async def parse(ctx: TaskContext, params: ParseParams) -> None:
        raise ValueError(f"line 3 of {params.path}: unexpected token")

    @engine.task
    async def slow(ctx: TaskContext) -> str:
        await gate.wait()
        return "finally"

    async with engine:
        failed = await (await engine.submit("parse", {"path": "/data/in.csv"})).wait()
        app = ClusterApp(ClusterObserver(postgres_url, lease=None), confirm=False)
        async with app.run_test(size=(160, 45)) as pilot:
            table = app.query_one(ClusterRunsTable)
            await eventually(lambda: failed.id in table.shown_keys, timeout=TIMEOUT)
            assert table.select_run(failed.id)
            await pilot.press("enter")
            await screen_shown(app, RunScreen, timeout=TIMEOUT)
            screen = app.screen
            assert isinstance(screen, RunScreen)
            detail = screen.query_one(RunDetail)
            title = screen.query_one("#run-title", Label).render()
            assert str(title) == f"Run {failed.id}: parse, failed on worker"
            assert detail.record is not None and detail.record.params == {"path": "/data/in.csv", "strict": True}
            assert "unexpected token" in detail.traceback_text and "Traceback" in detail.traceback_text

            # r on the run being read: a new run with its params
            await pilot.press("r")

            def retried() -> list[str]:
                return [r.id for r in app.observer.runs() if r.source == f"retry:{failed.id}"]  # type: ignore[union-attr]

            await eventually(retried, timeout=TIMEOUT)
            await pilot.press("escape")
            await eventually(lambda: not isinstance(app.screen, RunScreen), timeout=TIMEOUT)

            # a running run, read while it finishes
            going = await engine.submit("slow")
            await eventually(lambda: going.id in table.shown_keys and cell(table, going.id, "status") == "running",
                             timeout=TIMEOUT)  # fmt: skip
            assert table.select_run(going.id)
            await pilot.press("enter")
            await screen_shown(app, RunScreen, timeout=TIMEOUT)
            shown = app.screen.query_one(RunDetail)
            assert shown.record is not None and shown.record.status.value == "running"
            gate.set()
            await going.wait()
            await eventually(lambda: shown.record is not None and shown.record.result == "finally", timeout=TIMEOUT)
            assert shown.record.status.value == "succeeded"
    assert not stray_tasks()


async def test_a_backlogs_runs_that_start_and_end_stay_listed_and_an_open_one_stays_current(postgres_url: str) -> None:
    # runs_limit 3: the newest runs submitted wait behind the early ones, which start and end
    # behind them, as the oldest runs of a backlog do
    async with PostgresStore(postgres_url) as node:  # a node's part, played by hand
        early = await node.insert([NewRun(task="early", params={"n": n}) for n in range(8)])
        later = await node.insert([NewRun(task="later", params={"n": n}) for n in range(6)])
        await node.register_node("worker", "w1", __version__)
        tokens = {claim.run_id: claim.token for claim in await node.claim("worker", "w1", 8, {"early": None})}
        assert set(tokens) == {r.id for r in early}
        observer = ClusterObserver(postgres_url, lease=None, runs_limit=3, refresh_interval=0.1, runs_interval=0.2)
        app = ClusterApp(observer)
        async with app.run_test(size=(160, 45)) as pilot:
            table = app.query_one(ClusterRunsTable)
            first = early[0].id
            await eventually(lambda: first in table.shown_keys and cell(table, first, "status") == "running",
                             timeout=TIMEOUT)  # fmt: skip
            assert table.select_run(first)
            await pilot.press("enter")
            screen = await screen_shown(app, RunScreen, timeout=TIMEOUT)

            # it ends first, and the seven after it push it out of the three that ended last
            await node.finish(tokens[first], Succeeded("done"))
            await node.finish(tokens[early[1].id], Failed(RunError(type="ValueError", message="bad row")))
            for run in early[2:]:
                await node.finish(tokens[run.id], Succeeded(None))
            # the open run is read by id: it does not stay "running"
            await eventually(lambda: screen.record.status is RunStatus.SUCCEEDED, timeout=TIMEOUT)
            assert screen.record.result == "done"
            await pilot.press("escape")

            def listed() -> bool:
                shown = table.shown_keys
                return (early[1].id in shown and cell(table, early[1].id, "status") == "failed"
                        and all(r.id in shown and cell(table, r.id, "status") == "succeeded" for r in early[5:]))  # fmt: skip

            # the failure, and the runs that ended last, whatever their place in the queue
            await eventually(listed, timeout=TIMEOUT)
            assert {r.id for r in later[3:]} <= set(table.shown_keys)  # the newest submitted, as ever


async def test_a_running_runs_progress_from_its_events_is_not_set_back_by_its_older_row(postgres_url: str) -> None:
    async with PostgresStore(postgres_url) as node:
        (long,) = await node.insert([NewRun(task="long", params={})])
        await node.register_node("worker", "w1", __version__)
        (claim,) = await node.claim("worker", "w1", 1, {"long": None})
        # a heartbeat wrote 2 of 10: the row holds that until the next one
        await node.heartbeat("w1", [claim.token], {claim.token: Progress(done=2, total=10)})
        bus = EventBus(node="worker")
        app = ClusterApp(ClusterObserver(postgres_url, lease=None))
        async with app.run_test(size=(160, 45)):
            observer = app.observer
            assert observer is not None
            table = app.query_one(ClusterRunsTable)
            await eventually(lambda: long.id in table.shown_keys and cell(table, long.id, "progress").endswith("20%"),
                             timeout=TIMEOUT)  # fmt: skip
            async with PostgresEventRelay(postgres_url, bus=bus):  # the node's events
                bus.emit(RunProgressed, run_id=long.id, task="long", done=7, total=10)

                def told() -> float | None:
                    record = observer.record(long.id)
                    return None if record is None else record.progress.done

                await eventually(lambda: told() == 7, timeout=TIMEOUT)
                await observer.refresh()  # the runs read again: the row still says 2
                assert told() == 7
                await eventually(lambda: cell(table, long.id, "progress").endswith("70%"), timeout=TIMEOUT)

                # its next attempt starts from nothing: the last attempt's events say nothing of it
                await node.finish(claim.token, Retry(RunError(type="Flaky", message="again")))
                (again,) = await node.claim("worker", "w1", 1, {"long": None})
                assert again.attempt == 2
                await observer.refresh()
                assert told() == 0


async def test_r_pressed_again_while_its_retry_waits_sends_nothing_and_r_on_the_detail_acts_on_the_retry(
    postgres_url: str,
) -> None:
    async with PostgresStore(postgres_url) as node:
        first, second = await node.insert([NewRun(task="charge", params={"n": n}) for n in range(2)])
        await node.register_node("worker", "w1", __version__)
        for claim in await node.claim("worker", "w1", 2, {"charge": None}):
            await node.finish(claim.token, Failed(RunError(type="CardDeclined", message="declined")))

    async def retries_of(run_id: str) -> int:
        async with PostgresStore(postgres_url) as store:
            return sum(r.source == f"retry:{run_id}" for r in (await store.query(limit=50)).runs)

    def acting(app: ClusterApp) -> bool:
        return any(worker.group == "actions" for worker in app.workers)

    app = ClusterApp(ClusterObserver(postgres_url, lease=None))
    async with app.run_test(size=(160, 45)) as pilot:
        table = app.query_one(ClusterRunsTable)
        await eventually(lambda: all(r.id in table.shown_keys and cell(table, r.id, "status") == "failed"
                                     for r in (first, second)), timeout=TIMEOUT)  # fmt: skip
        assert table.select_run(first.id)
        # the database is slow to answer: the runs table is locked by another session
        blocker = await asyncpg.connect(postgres_url)
        try:
            lock = blocker.transaction()
            await lock.start()
            await blocker.execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")
            await pilot.press("r")
            await pilot.press("r")
            await eventually(lambda: said(app, f"retry run {first.id}: still waiting for the database's answer "
                                               "to the last one"), timeout=TIMEOUT)  # fmt: skip
            await lock.rollback()
        finally:
            await blocker.close()
        await eventually(lambda: said(app, "retrying charge as run") and not acting(app), timeout=TIMEOUT)
        assert await retries_of(first.id) == 1

        # on the run's own screen, a retry shows the new run: r again acts on that one
        assert table.select_run(second.id)
        await pilot.press("enter")
        screen = await screen_shown(app, RunScreen, timeout=TIMEOUT)
        await pilot.press("r")
        await eventually(lambda: screen.run_id != second.id, timeout=TIMEOUT)
        retry = screen.run_id
        assert screen.record.status is RunStatus.PENDING and said(app, f"retrying charge as run {retry}")
        await eventually(lambda: not acting(app), timeout=TIMEOUT)
        await pilot.press("r")
        await eventually(lambda: said(app, f"run {retry} is pending; only failed or cancelled runs can be retried"),
                         timeout=TIMEOUT)  # fmt: skip
        await eventually(lambda: not acting(app), timeout=TIMEOUT)
        assert await retries_of(second.id) == 1


async def test_a_run_recovered_from_a_lost_node_shows_its_try_against_what_it_may_take(postgres_url: str) -> None:
    # allowed one try, lost with its node: recovery puts it back as its second attempt, which
    # the engine runs (losses are bounded by max_lost) and does not retry if it fails
    async with PostgresStore(postgres_url) as node:
        (lost,) = await node.insert([NewRun(task="once", params={}, max_attempts=1)])
        await node.register_node("worker", "w1", __version__)
        await node.claim("worker", "w1", 1, {"once": None})
        await node.register_node("worker", "w2", __version__)  # the node restarted: w1's claim is lost
        (recovered,) = await node.recover()
        assert recovered.action == "requeued"
        (claim,) = await node.claim("worker", "w2", 1, {"once": None})
        assert (claim.attempt, claim.max_attempts, claim.lost_count) == (2, 1, 1)
        app = ClusterApp(ClusterObserver(postgres_url, lease=None))
        async with app.run_test(size=(160, 45)) as pilot:
            table = app.query_one(ClusterRunsTable)
            await eventually(lambda: lost.id in table.shown_keys and cell(table, lost.id, "status") == "running",
                             timeout=TIMEOUT)  # fmt: skip
            assert cell(table, lost.id, "attempt") == "2/2"
            assert table.select_run(lost.id)
            await pilot.press("enter")
            screen = await screen_shown(app, RunScreen, timeout=TIMEOUT)
            text = plain(screen.query_one("#run-detail-summary", Static).content)
            assert "2 of 2 (1 lost with its node)" in text and "of 1" not in text


# ---------------------------------------------------------------- keys while the database is away


def messages(app: ClusterApp) -> list[str]:
    return [str(note.message) for note in app._notifications]


def said(app: ClusterApp, text: str) -> bool:
    return any(text in message for message in messages(app))


async def test_while_the_database_is_down_enter_shows_the_run_as_read_and_c_and_r_refuse_at_once(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with PostgresStore(postgres_url) as submitter:  # no node runs these: one waits, one was cancelled
        (waiting,) = await submitter.insert([NewRun(task="later", params={"n": 1})])
        (cancelled,) = await submitter.insert([NewRun(task="later", params={"n": 2})])
        await submitter.request_cancel(cancelled.id)
    # the store retries for 30 s before it gives up: no key may wait that long
    app = ClusterApp(ClusterObserver(f"{postgres_url}?reconnect_timeout=30", lease=None))
    async with app.run_test(size=(160, 45)) as pilot:
        table = app.query_one(ClusterRunsTable)
        await eventually(lambda: cancelled.id in table.shown_keys and cell(table, cancelled.id, "status") == "cancelled"
                         and waiting.id in table.shown_keys, timeout=TIMEOUT)  # fmt: skip
        await asyncio.to_thread(postgres_server.stop)
        try:
            await eventually(lambda: "stale" in header(app), timeout=TIMEOUT)
            assert table.select_run(waiting.id)
            await pilot.press("enter")
            await screen_shown(app, RunScreen)
            assert app.screen.run_id == waiting.id  # type: ignore[attr-defined]
            # the notice is a message of its own, handled after the screen was pushed
            await eventually(lambda: said(app, f"the database is unreachable: run {waiting.id} is shown as read"))
            assert said(app, "before the outage")
            await pilot.press("escape")
            await eventually(lambda: not isinstance(app.screen, RunScreen))

            # c refuses before asking: nothing could be sent
            await pilot.press("c")
            await eventually(lambda: said(app, f"cannot cancel run {waiting.id}: the database is unreachable: "
                                               "nothing was sent; try again once it answers"), timeout=2.0)  # fmt: skip
            assert not isinstance(app.screen, ConfirmScreen)
            assert table.select_run(cancelled.id)
            await pilot.press("r")
            await eventually(lambda: said(app, f"cannot retry run {cancelled.id}: the database is unreachable"))  # fmt: skip
        finally:
            await asyncio.to_thread(postgres_server.start)
        await eventually(lambda: "stale" not in header(app), timeout=TIMEOUT)
        assert not isinstance(app.screen, (RunScreen, ConfirmScreen))
    # and nothing was carried out once it answered again: the run waits, no retry was queued
    async with PostgresStore(postgres_url) as store:
        run = await store.get(waiting.id)
        assert run is not None and run.status is RunStatus.PENDING
        assert {r.id for r in (await store.query(limit=10)).runs} == {waiting.id, cancelled.id}
    assert not stray_tasks()


def detail_open(app: ClusterApp) -> bool:
    """Whether the read of a run Enter asked for is still under way."""
    return any(worker.group == "detail" for worker in app.workers)


async def test_a_database_that_does_not_answer_is_waited_for_briefly_and_a_late_answer_opens_nothing(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    async with PostgresStore(postgres_url) as submitter:
        (waiting,) = await submitter.insert([NewRun(task="later", params={})])
    async with StallingProxy(postgres_server.port) as proxy:
        # a network that delivers nothing and refuses nothing: the observer cannot tell yet (it
        # reads every 5 s, so it takes what it read as current for 15 s: the whole test, loaded)
        observer = ClusterObserver(proxy.url(postgres_url), lease=None, refresh_interval=5.0)
        app = ClusterApp(observer, answer_timeout=0.5)
        async with app.run_test(size=(160, 45)) as pilot:
            table = app.query_one(ClusterRunsTable)
            await eventually(lambda: waiting.id in table.shown_keys, timeout=TIMEOUT)
            assert table.select_run(waiting.id)
            proxy.hold()
            try:
                await pilot.press("c")
                await screen_shown(app, ConfirmScreen)
                await pilot.press("y")
                # given up on after the bound, and said so: the cancel may have reached the database
                await eventually(lambda: said(app, f"cancel of run {waiting.id}: no answer from the database within "
                                                   "0.5 s; it may still have been carried out"))  # fmt: skip

                # Enter: after the bound, the run as read last
                await pilot.press("enter")
                await screen_shown(app, RunScreen)
                await eventually(lambda: said(app, f"cannot read run {waiting.id} (no answer from the database within 0.5 s)"))
                await pilot.press("escape")
                await eventually(lambda: not isinstance(app.screen, RunScreen))
                assert "stale" not in header(app)  # all of this within what the observer still takes as current

                # Enter, then c while the read is under way: its answer does not cover the question
                app.answer_timeout = 10.0
                await pilot.press("enter")
                await eventually(lambda: detail_open(app))
                await pilot.press("c")
                await screen_shown(app, ConfirmScreen)
            finally:
                proxy.release()
            await eventually(lambda: not detail_open(app), timeout=TIMEOUT)
            await pilot.pause()
            assert isinstance(app.screen, ConfirmScreen)
            await pilot.press("n")
    assert not stray_tasks()


async def test_a_redraw_due_while_the_dashboard_closes_its_last_screens_is_no_error(postgres_url: str) -> None:
    # the redraw timer can tick after a shutdown has taken every screen off the stack, while
    # a screen kept off it (installed, popped, still closing) holds the shutdown there: with
    # no screen to ask which one is open, a redraw draws nothing and is no error
    app: ClusterApp
    late = asyncio.Event()

    def clock() -> float:
        if not app.is_running and not app.screen_stack:
            late.set()
        return time.time()

    class Closing(Screen[None]):
        async def on_unmount(self) -> None:
            # holds the shutdown until a redraw has come (bounded: one that draws nothing reads no clock)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await late.wait()

    async with PostgresStore(postgres_url) as submitter:
        (run,) = await submitter.insert([NewRun(task="later", params={})])
    app = ClusterApp(ClusterObserver(postgres_url, lease=None), refresh_hz=50, clock=clock)
    async with app.run_test(size=(160, 45)):
        table = app.query_one(ClusterRunsTable)
        await eventually(lambda: run.id in table.shown_keys, timeout=TIMEOUT)
        app.install_screen(Closing(), "closing")
        await app.push_screen("closing")
        await app.pop_screen()
    assert app.return_code in (None, 0)
    assert not stray_tasks()


async def test_space_marks_no_run_in_the_cluster_runs_table(postgres_url: str) -> None:
    # c and r act on the run under the cursor: a mark would say they act on the marked ones
    async with PostgresStore(postgres_url) as submitter:
        batch = await submitter.insert([NewRun(task="later", params={"n": n}) for n in range(3)])
    app = ClusterApp(ClusterObserver(postgres_url, lease=None))
    async with app.run_test(size=(160, 45)) as pilot:
        table = app.query_one(ClusterRunsTable)
        await eventually(lambda: len(table.shown_keys) == 3, timeout=TIMEOUT)
        top = table.shown_keys[0]
        assert table.select_run(top)
        await pilot.press("space")
        await pilot.press("space")
        assert table.marked == []
        assert table.selected_run_id == top  # nor did the cursor move as marking moves it
        await pilot.press("c")
        await screen_shown(app, ConfirmScreen)
        assert top in app.screen.question  # type: ignore[attr-defined]
        await pilot.press("n")
    assert {r.id for r in batch} == set(table.shown_keys)
