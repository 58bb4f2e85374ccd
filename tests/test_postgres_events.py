"""Cluster-wide events through PostgreSQL, without Redis: node processes on a real server.

Each node is ``python -m tests.durable_child postgresql://... --events postgres``
(an engine whose store and event relay share the database); the test process
reads the ``events`` table as a third party would, through a
:class:`PostgresEventRelay` or a :class:`ClusterObserver`. Checked here:

- two nodes' events reach each other's cluster bus and an observer's, each
  with the node that emitted it, and the nodes table holds each node's CPU
  and RSS from its health samples;
- a burst of progress events of one run goes out coalesced to the newest, in
  far fewer rows and notifications than events, and a reader accounts for
  every event of the node: read, or coalesced away, none missed;
- events pruned from the table before a reader got them are counted as
  missed for their node, announced with ``bus.dropped`` naming it, and make
  an observer read the runs again from the store;
- bad ``events=`` values are refused with a typed error naming what to use.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from taskwatch.engine import ClusterObserver, Engine, InvalidConfiguration, PostgresEventRelay, RunStatus

from .helpers import eventually, stray_tasks
from .postgres_server import PostgresServer
from .processes import Line
from .test_durable import Child

#: generous bounds for a loaded 2-core machine; a passing run takes a fraction of them
TIMEOUT = 30.0


def start_node(nodes: list[Child], url: str, name: str, *args: str, events: str = "postgres") -> Child:
    child = Child(url, name, "--events", events, "--lease-ttl", "10", "--poll", "0.2", *args)  # type: ignore[arg-type]
    nodes.append(child)
    return child


async def line(child: Child, ev: str, timeout: float = TIMEOUT, **match: Any) -> Line:
    """The child's first matching ``ev`` line, waited for off the event loop (the relays need it)."""
    return await asyncio.to_thread(
        child.wait_for, lambda x: x.get("ev") == ev and all(x.get(k) == v for k, v in match.items()), timeout
    )


async def stop_node(child: Child) -> Line:
    """Close its stdin (a graceful stop: its relay sends what it holds) and return its ``stopped`` line."""
    assert child.proc.stdin is not None
    child.proc.stdin.close()
    stopped = await line(child, "stopped")
    assert await asyncio.to_thread(child.proc.wait, 30) == 0
    return stopped


def database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def of_kind(relay: PostgresEventRelay, kind: str) -> list[Any]:
    return [e for e in relay.bus.recent() if e.kind == kind]  # type: ignore[attr-defined]


async def test_two_nodes_events_reach_each_other_and_an_observer(
    postgres_server: PostgresServer, postgres_url: str, nodes: list[Child]
) -> None:
    async with PostgresEventRelay(postgres_url) as observer:  # reads what is sent from now on
        a = start_node(nodes, postgres_url, "node-a", "--health", "0.2", "--sleep", "0.2", "run",
                       "--submit", "work", "--count", "2")  # fmt: skip
        b = start_node(nodes, postgres_url, "node-b", "--health", "0.2", "--sleep", "0.2", "run",
                       "--submit", "work", "--count", "2")  # fmt: skip
        ids = {*(await line(a, "submitted"))["ids"], *(await line(b, "submitted"))["ids"]}

        # every node's bus has the other's events, each with its node
        assert (await line(a, "cluster", node="node-b"))["node"] == "node-b"
        assert (await line(b, "cluster", node="node-a"))["node"] == "node-a"
        # and so has a third party's: who submitted what, every run's end, both nodes' health
        await eventually(lambda: {e.run_id for e in of_kind(observer, "run.succeeded")} == ids, timeout=TIMEOUT)
        submitted = {e.run_id: e.node for e in of_kind(observer, "run.submitted")}
        assert sorted(submitted.values()) == ["node-a", "node-a", "node-b", "node-b"]
        assert {e.node for e in of_kind(observer, "run.succeeded")} <= {"node-a", "node-b"}
        await eventually(lambda: {e.node for e in of_kind(observer, "health")} == {"node-a", "node-b"},
                         timeout=TIMEOUT)  # fmt: skip
        summary = {n.node: n for n in observer.nodes()}
        assert all(summary[n].rss_bytes and summary[n].missed == 0 for n in ("node-a", "node-b"))
        stats = observer.stats()
        assert stats.missed == 0 and stats.malformed == 0 and stats.connected

        # the nodes table keeps each node's CPU and RSS, written with its heartbeats
        def loads() -> list[str]:
            out = postgres_server.sql(
                "SELECT node FROM nodes WHERE cpu_percent IS NOT NULL AND rss_bytes > 0 ORDER BY node",
                database(postgres_url),
            )
            return out.split()

        await eventually(lambda: loads() == ["node-a", "node-b"], timeout=TIMEOUT, interval=0.2)
        for child in (a, b):
            await stop_node(child)
        # each node's last events went out at its stop, and reached the others
        await eventually(lambda: {n.node for n in observer.nodes() if n.stopped} == {"node-a", "node-b"},
                         timeout=TIMEOUT)  # fmt: skip
    assert not stray_tasks()


async def test_progress_is_coalesced_per_run_and_every_event_accounted_for(
    postgres_server: PostgresServer, postgres_url: str, nodes: list[Child]
) -> None:
    steps = 400
    async with PostgresEventRelay(postgres_url) as observer:
        node = start_node(nodes, postgres_url, "p", "--steps", str(steps), "run", "--submit", "steps", "--count", "1")
        (run_id,) = (await line(node, "submitted"))["ids"]
        await eventually(lambda: any(e.run_id == run_id for e in of_kind(observer, "run.succeeded")), timeout=TIMEOUT)
        stopped = await stop_node(node)
        await eventually(lambda: any(n.stopped for n in observer.nodes()), timeout=TIMEOUT)

        progress = [e for e in of_kind(observer, "run.progress") if e.run_id == run_id]
        # the reports of one loop turn went out as one: the newest, the final count
        assert progress and progress[-1].done == steps
        assert len(progress) < steps // 10
        (seen,) = observer.nodes()
        # every event the node published was read or coalesced away; none is counted missed
        assert seen.missed == 0 and observer.stats().missed == 0
        assert seen.coalesced == steps - len(progress)
        assert seen.events + seen.coalesced == stopped["seq"]
        assert not of_kind(observer, "bus.dropped")
        # in the table: far fewer rows than events, and one notification per batch, not per event
        db = database(postgres_url)
        rows = int(postgres_server.sql("SELECT COUNT(*) FROM events WHERE node = 'p'", db))
        assert rows == seen.events
        assert 0 < observer.notifications <= rows < stopped["seq"] // 5
    assert not stray_tasks()


async def test_pruned_events_are_counted_missed_and_the_observer_resyncs(
    postgres_server: PostgresServer, postgres_url: str, nodes: list[Child]
) -> None:
    runs = 150
    db = database(postgres_url)
    # a table capped at 20 events, pruned by the node on its timer
    node = start_node(nodes, postgres_url, "w", "run", "--submit", "work", "--count", str(runs),
                      events=f"{postgres_url}?keep=20")  # fmt: skip
    await line(node, "submitted")
    await eventually(
        lambda: postgres_server.sql("SELECT COUNT(*) FROM runs WHERE status = 'succeeded'", db) == str(runs),
        timeout=TIMEOUT, interval=0.1,
    )  # fmt: skip
    await eventually(lambda: int(postgres_server.sql("SELECT COUNT(*) FROM events", db)) <= 40,
                     timeout=TIMEOUT, interval=0.2)  # fmt: skip

    # an observer reading from the oldest event kept: most of w's events are gone
    async with ClusterObserver(postgres_url, since="0", lease=None) as observer:
        stopped = await stop_node(node)

        def accounted() -> bool:
            seen = {n.node: n for n in observer.relay.nodes()}.get("w")
            return seen is not None and seen.events + seen.missed + seen.coalesced >= stopped["seq"]

        await eventually(accounted, timeout=TIMEOUT)
        (seen,) = observer.relay.nodes()
        assert seen.missed > 0 and seen.events + seen.missed + seen.coalesced == stopped["seq"]
        notices = of_kind(observer.relay, "bus.dropped")
        assert notices and {n.node for n in notices} == {"w"} and sum(n.count for n in notices) == seen.missed
        # the dashboard's runs cannot be trusted after a gap: they were read again from the store
        await eventually(lambda: observer.resyncs >= 1, timeout=TIMEOUT)
        await eventually(lambda: len(observer.runs()) == runs, timeout=TIMEOUT)
        assert {r.status for r in observer.runs()} == {RunStatus.SUCCEEDED}
        assert {r.node for r in observer.runs()} == {"w"}
        await eventually(lambda: [(n.node, n.state, n.missed) for n in observer.nodes()] == [("w", "stopped", seen.missed)],
                         timeout=TIMEOUT)  # fmt: skip
    assert not stray_tasks()


async def test_events_sent_across_a_server_restart_arrive(postgres_server: PostgresServer, postgres_url: str) -> None:
    node = Engine(store=postgres_url, node_id="n", events="postgres", health_interval=None, lease_ttl=10)

    @node.task
    async def hello(ctx: Any) -> str:
        return "hi"

    async with PostgresEventRelay(postgres_url) as observer, node:
        await (await node.submit("hello")).wait()
        await eventually(lambda: len(of_kind(observer, "run.succeeded")) == 1, timeout=TIMEOUT)
        await asyncio.to_thread(postgres_server.restart)  # every connection of both relays is cut
        await (await node.submit("hello")).wait()
        # both relays reconnect; what the node published meanwhile reaches the observer, in order
        await eventually(lambda: len(of_kind(observer, "run.succeeded")) == 2, timeout=TIMEOUT)
        assert observer.stats().missed == 0 and not of_kind(observer, "bus.dropped")
        # and nothing stays behind: events the node posts after that run (its store answering
        # again, say) may still be lingering for their batch, but they go out
        cluster = node.cluster
        assert cluster is not None
        await eventually(lambda: cluster.stats().pending == 0, timeout=TIMEOUT)
    assert not stray_tasks()


async def test_an_engine_started_again_reads_on_and_reports_nothing_missed(postgres_url: str) -> None:
    # a password in the URL's query is used (trust auth lets it through) and never shown
    url = f"{postgres_url}?password=s3cret"
    a = Engine(node_id="a", events=url, health_interval=None)
    b = Engine(node_id="b", events=url, health_interval=None)
    for engine in (a, b):
        engine.task(name="hello")(_hello)
    cluster = a.cluster
    assert cluster is not None and "password=***" in cluster.public_url and "s3cret" not in cluster.public_url

    def read_all(node: str, engine: Engine) -> bool:
        seen = {n.node: n for n in cluster.nodes()}.get(node)
        # every event of the node read, coalesced away or counted missed
        return seen is not None and seen.events + seen.coalesced + seen.missed >= engine.bus.last_seq

    try:
        await a.start()
        await b.start()
        await (await b.submit("hello")).wait()
        await eventually(lambda: read_all("b", b), timeout=TIMEOUT)
        await a.stop(2.0)
        # while a is stopped: its own last events (sent at its stop) and b's new ones wait in the table
        await (await b.submit("hello")).wait()
        b_cluster = b.cluster
        assert b_cluster is not None
        await eventually(lambda: b_cluster.stats().pending == 0, timeout=TIMEOUT)

        await a.start()
        await (await a.submit("hello")).wait()
        await (await b.submit("hello")).wait()
        await eventually(lambda: read_all("a", a) and read_all("b", b), timeout=TIMEOUT)
        assert {n.node: n.missed for n in cluster.nodes()} == {"a": 0, "b": 0}
        assert cluster.stats().missed == 0 and not of_kind(cluster, "bus.dropped")
        assert len([e for e in of_kind(cluster, "run.succeeded") if e.node == "b"]) == 3
    finally:
        await a.stop(2.0)
        await b.stop(2.0)
    assert not stray_tasks()


async def _hello(ctx: Any) -> str:
    return "hi"


def test_bad_event_options_are_refused_naming_what_to_use(postgres_url: str) -> None:
    with pytest.raises(InvalidConfiguration, match="store='postgresql://"):
        Engine(events="postgres", health_interval=None)  # the memory store has no database
    with pytest.raises(InvalidConfiguration, match="postgresql://"):
        Engine(events="mysql://db/app", health_interval=None)
    with pytest.raises(InvalidConfiguration) as info:
        PostgresEventRelay(f"{postgres_url}?keep=lots", batch=0, linger=-1, since="later")
    assert all(word in str(info.value) for word in ("keep", "batch", "linger", "since"))
    with pytest.raises(InvalidConfiguration, match="postgresql://"):
        ClusterObserver("redis://127.0.0.1:1/0")
    # the relay's own options leave the URL the driver gets; so do the store's
    relay = PostgresEventRelay("postgresql://u:pw@db:5433/app?keep=50&max_age=60&node_ttl=5&sslmode=disable")
    assert (relay.keep, relay.max_age, relay.url) == (50, 60.0, "postgresql://u:pw@db:5433/app?sslmode=disable")
    assert relay.public_url == "postgresql://u:***@db:5433/app?sslmode=disable"
    assert Engine(store=postgres_url, events="postgres", health_interval=None).cluster is not None
