"""Cluster-wide events at their edges, on real servers: a node paused inside its batch, a
transport that does not answer, a stop that cannot send, two processes under one id, a
node killed without a word, skewed clocks, options given in the store's URL, and what a
node's health sample says it runs.

Checked here:

- a node paused (SIGSTOP) inside its batch's transaction, holding the lock every node's
  batches take, stops the other nodes' events for a bounded time only (the server ends its
  session), and once it runs again its own events arrive too, none missed;
- a batch that cannot be sent (another session holds that lock for good) is given up after
  ``send_timeout``: the relay says it is not connected and counts the errors, and sends
  the batch once it can;
- events still waiting when a stop gives up sending are counted as ``unsent``;
- two processes started under one node id by mistake are not taken for a node losing
  events: each process's numbering is followed on its own;
- a node killed with SIGKILL, which never says it stopped, shows as ``unknown`` once it
  has missed a few of its health samples, in ``nodes()`` and on the cluster dashboard,
  while a live node beside it stays up;
- pruning judges events' age by the server's clock at both ends: a node whose clock runs
  ahead does not delete the other nodes' fresh events, and one whose clock runs behind keeps
  its own;
- ``?keep=N&max_age=S`` on the store's URL caps the table with ``events="postgres"``;
- a node's health sample counts the runs it executes, not those it submitted that others
  execute.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import redis as redis_py
from taskwatch.engine import Engine, EventBus, PostgresEventRelay, TaskContext
from taskwatch.engine.events import EngineStarted
from taskwatch.engine.redis_events import RedisEventRelay
from taskwatch.tui.cluster import ClusterApp
from taskwatch.widgets import NodesTable

from .cutting_proxy import StallingProxy
from .helpers import eventually, stray_tasks
from .postgres_server import PostgresServer
from .redis_server import RedisServer
from .test_postgres_events import TIMEOUT, database, line, start_node, stop_node
from .test_durable import Child

#: a session holding the events lock while its next statement (the insert) waits for the table
INSIDE_A_BATCH = """
SELECT count(*) FROM pg_locks held JOIN pg_locks waiting ON held.pid = waiting.pid
WHERE held.locktype = 'advisory' AND held.granted AND waiting.locktype = 'relation' AND NOT waiting.granted
"""


def events_of(relay: Any, node: str, kind: str | None = None) -> list[Any]:
    return [e for e in relay.bus.recent() if e.node == node and (kind is None or e.kind == kind)]


def seen(relay: Any, node: str) -> Any:
    return {n.node: n for n in relay.nodes()}.get(node)


async def test_a_node_paused_inside_its_batch_holds_up_the_others_events_for_a_bounded_time(
    postgres_server: PostgresServer, postgres_url: str, nodes: list[Child]
) -> None:
    async with PostgresEventRelay(postgres_url) as observer:
        paused = start_node(nodes, postgres_url, "paused", "--health", "0.05", "run")
        await line(paused, "started")
        await eventually(lambda: len(events_of(observer, "paused", "health")) >= 2, timeout=TIMEOUT)

        # the table held, the node's next batch takes the events lock and waits at its insert;
        # then the node is paused, and the insert let through: its session sits idle inside
        # the transaction, holding the lock, as a node stopped between two statements does
        probe = await asyncpg.connect(postgres_url)
        blocker = await asyncpg.connect(postgres_url)
        try:
            hold = blocker.transaction()
            await hold.start()
            await blocker.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            deadline = time.monotonic() + TIMEOUT
            while not await probe.fetchval(INSIDE_A_BATCH):
                assert time.monotonic() < deadline, "the node's batch never reached the held table"
                await asyncio.sleep(0.01)
            os.kill(paused.proc.pid, signal.SIGSTOP)
            try:
                await hold.commit()
                other = Engine(store=postgres_url, node_id="other", events="postgres", health_interval=0.05)
                async with other:
                    stalled_at = time.monotonic()
                    # the server ends the paused session after its idle timeout: the others'
                    # events flow again, long before the node is let go
                    await eventually(lambda: len(events_of(observer, "other", "health")) >= 3, timeout=20)
                    assert time.monotonic() - stalled_at < 20
                    other_cluster = other.cluster
                    assert other_cluster is not None
                    await eventually(lambda: other_cluster.stats().pending == 0, timeout=TIMEOUT)
            finally:
                os.kill(paused.proc.pid, signal.SIGCONT)
        finally:
            await blocker.close()
            await probe.close()

        # let go, the node finds its session ended and sends its batch again: nothing of it is lost
        heard = seen(observer, "paused").events
        await eventually(lambda: seen(observer, "paused").events > heard + 5, timeout=TIMEOUT)
        stopped = await stop_node(paused)

        def accounted() -> bool:
            view = seen(observer, "paused")
            return view is not None and view.events + view.coalesced + view.missed >= stopped["seq"]

        await eventually(accounted, timeout=TIMEOUT)
        assert seen(observer, "paused").missed == 0 and seen(observer, "other").missed == 0
        assert observer.stats().missed == 0
    assert not stray_tasks()


async def test_a_batch_that_cannot_be_sent_is_given_up_after_send_timeout_and_sent_later(
    postgres_url: str,
) -> None:
    bus = EventBus(node="n")
    async with PostgresEventRelay(postgres_url) as observer, PostgresEventRelay(
        postgres_url, bus, send_timeout=0.5, linger=0
    ) as relay:
        bus.emit(EngineStarted)
        await eventually(lambda: len(events_of(observer, "n")) == 1, timeout=TIMEOUT)
        # another application's session takes the events lock and keeps it
        other = await asyncpg.connect(postgres_url)
        try:
            await other.execute("SELECT pg_advisory_lock(7418990304)")
            for _ in range(3):
                bus.emit(EngineStarted)
            # the relay says it cannot send, instead of waiting for the lock for good
            await eventually(lambda: relay.stats().errors >= 2 and not relay.stats().connected, timeout=TIMEOUT)
            assert relay.stats().pending == 3 and relay.stats().unsent == 0
        finally:
            await other.close()
        await eventually(lambda: len(events_of(observer, "n")) == 4, timeout=TIMEOUT)
        await eventually(lambda: relay.stats().connected and relay.stats().pending == 0, timeout=TIMEOUT)
        assert observer.stats().missed == 0
    assert not stray_tasks()


async def test_events_left_waiting_when_a_stop_gives_up_count_as_unsent(redis_server: RedisServer) -> None:
    bus = EventBus(node="n")
    relay = RedisEventRelay(f"{redis_server.url}?stream=edges:{uuid.uuid4().hex[:8]}", bus, linger=0)
    await relay.start()
    bus.emit(EngineStarted)
    await eventually(lambda: relay.stats().published == 1, timeout=TIMEOUT)
    await asyncio.to_thread(redis_server.stop)
    for _ in range(5):
        bus.emit(EngineStarted)
    await relay.stop(asyncio.get_running_loop().time() + 0.3)
    stats = relay.stats()
    # given up, and said so in the node's own figures
    assert (stats.published, stats.unsent, stats.pending) == (1, 5, 0)
    assert not stray_tasks()


async def test_a_batch_a_stop_gave_up_waiting_on_counts_as_unconfirmed_not_unsent(redis_server: RedisServer) -> None:
    # Redis hung (SIGSTOP) with a batch written to it: it runs that batch when it comes back,
    # so counting it as never sent would tell readers' figures a gap that is not there
    stream = f"edges:{uuid.uuid4().hex[:8]}"
    bus = EventBus(node="n")
    relay = RedisEventRelay(f"{redis_server.url}?stream={stream}", bus, linger=0)
    await relay.start()
    bus.emit(EngineStarted)
    await eventually(lambda: relay.stats().published == 1, timeout=TIMEOUT)
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        for _ in range(5):
            bus.emit(EngineStarted)
        await eventually(lambda: relay.stats().errors >= 1 or relay.stats().pending == 5, timeout=TIMEOUT)
        await relay.stop(asyncio.get_running_loop().time() + 0.3)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    stats = relay.stats()
    assert stats.published == 1 and stats.pending == 0
    assert stats.unsent + stats.unconfirmed == 5 and stats.unconfirmed > 0
    raw = redis_py.Redis.from_url(redis_server.url)
    try:
        # what reached the stream is never more than what was published or unconfirmed
        await eventually(lambda: raw.xlen(stream) == 1 + stats.unconfirmed, timeout=TIMEOUT)
    finally:
        raw.close()
    assert not stray_tasks()


async def test_two_processes_under_one_node_id_are_not_taken_for_lost_events(
    postgres_url: str, redis_server: RedisServer
) -> None:
    stream = f"edges:{uuid.uuid4().hex[:8]}"
    for where, events in (("postgres", postgres_url), ("redis", f"{redis_server.url}?stream={stream}")):
        reader: Any = PostgresEventRelay(postgres_url) if where == "postgres" else RedisEventRelay(events)
        # each its own process, started under one id by mistake (memory stores: no nodes table)
        twins = [Engine(node_id="twin", events=events, health_interval=0.02) for _ in range(2)]
        async with reader:
            for twin in twins:
                await twin.start()
            try:
                # both numbers run from 1 and interleave on the way
                await eventually(lambda: len(events_of(reader, "twin", "health")) >= 40, timeout=TIMEOUT)
                assert (where, reader.stats().missed, seen(reader, "twin").missed) == (where, 0, 0)
                assert not events_of(reader, "twin", "bus.dropped")
            finally:
                for twin in twins:
                    await twin.stop(2.0)
    assert not stray_tasks()


async def state_once_sampled_after_a_stop(reader: Any, node: str) -> str:
    """The state ``reader`` gives ``node`` once it has read the node's engine.stopped and three
    health samples after it (from a process of the node still running)."""
    await eventually(lambda: events_of(reader, node, "engine.stopped"), timeout=TIMEOUT)
    heard = len(events_of(reader, node, "health"))
    await eventually(lambda: len(events_of(reader, node, "health")) >= heard + 3, timeout=TIMEOUT)
    return str(seen(reader, node).state)


async def test_one_of_two_processes_under_one_node_id_stopping_leaves_the_node_shown_up(
    postgres_url: str, redis_server: RedisServer
) -> None:
    # a hung process replaced under its id, then stopped as it is told to: its engine.stopped
    # is that process's, and the node goes on running in its successor
    stream = f"edges:{uuid.uuid4().hex[:8]}"
    for where, events in (("postgres", postgres_url), ("redis", f"{redis_server.url}?stream={stream}")):
        reader: Any = PostgresEventRelay(postgres_url) if where == "postgres" else RedisEventRelay(events)
        superseded, successor = (Engine(node_id="twin", events=events, health_interval=0.05) for _ in range(2))
        async with reader:
            await superseded.start()
            await successor.start()
            try:
                await superseded.stop(2.0)
                # the successor's samples are read after the stop: the node is up, and stays up
                assert (where, await state_once_sampled_after_a_stop(reader, "twin")) == (where, "up")
            finally:
                await successor.stop(2.0)
            # and once the last process of the name has stopped, it shows as stopped
            await eventually(lambda: seen(reader, "twin").state == "stopped", timeout=TIMEOUT)
    assert not stray_tasks()


async def test_a_node_whose_current_process_stopped_shows_stopped_though_a_superseded_one_runs_on(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    # the earlier process of the id, superseded by the later (one store tells), claims, leads and
    # starts nothing: its samples do not make the node up once the later one has stopped
    stream = f"edges:{uuid.uuid4().hex[:8]}"
    events = f"{redis_server.url}?stream={stream}"
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    async with RedisEventRelay(events) as reader:
        earlier, later = (
            Engine(node_id="twin", store=store, events=events, health_interval=0.05, lease_ttl=1.0) for _ in range(2)
        )
        await earlier.start()
        try:
            await later.start()
            try:
                await eventually(lambda: events_of(reader, "twin", "node.superseded"), timeout=TIMEOUT)
            finally:
                await later.stop(2.0)
            # the superseded process samples on, and is read
            assert await state_once_sampled_after_a_stop(reader, "twin") == "stopped"
        finally:
            await earlier.stop(2.0)
    assert not stray_tasks()


async def test_a_node_killed_without_a_word_shows_as_unknown_once_it_missed_its_health_samples(
    redis_server: RedisServer, tmp_path: Path, nodes: list[Child]
) -> None:
    stream = f"edges:{uuid.uuid4().hex[:8]}"
    events = f"{redis_server.url}?stream={stream}"
    alive = Engine(node_id="alive", events=events, health_interval=0.1)
    async with RedisEventRelay(events) as watcher:
        await alive.start()
        try:
            doomed = Child(tmp_path / "doomed.db", "doomed", "--events", events, "--health", "0.1", "run")  # type: ignore[arg-type]
            nodes.append(doomed)
            await line(doomed, "started")
            await eventually(lambda: len(events_of(watcher, "doomed", "health")) >= 3, timeout=TIMEOUT)
            assert seen(watcher, "doomed").state == "up"
            app = ClusterApp(watcher, manage=False)  # taskwatch attach redis://...
            async with app.run_test(size=(150, 40)):
                table = app.query_one(NodesTable)
                await eventually(lambda: table.get_cell("doomed", "state").plain == "up", timeout=TIMEOUT)
                await asyncio.to_thread(doomed.sigkill)
                killed_at = time.monotonic()
                # three missed samples (0.3 s) and a second's slack later, it is no longer shown as up
                await eventually(lambda: seen(watcher, "doomed").state == "unknown", timeout=TIMEOUT)
                assert time.monotonic() - killed_at < 5
                # the node still sending its samples is shown up (again, if a loaded machine held
                # one of them up past its interval)
                await eventually(lambda: seen(watcher, "alive").state == "up", timeout=TIMEOUT)
                # its last figures stay, for what they are worth
                assert seen(watcher, "doomed").rss_bytes
                await eventually(lambda: table.get_cell("doomed", "state").plain == "unknown", timeout=TIMEOUT)
                await eventually(lambda: table.get_cell("alive", "state").plain == "up", timeout=TIMEOUT)
        finally:
            await alive.stop(2.0)
        # a node stopped properly says so, and shows as stopped, not unknown, however long after
        await eventually(lambda: seen(watcher, "alive").state == "stopped", timeout=TIMEOUT)
    assert not stray_tasks()


async def test_pruning_judges_age_by_the_servers_clock_whatever_the_nodes_clocks(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # an event's age is the server's now() less the server's time when it was stored: every
    # pruner judges alike, and a node whose clock runs behind keeps its fresh events
    db = database(postgres_url)
    hour = 3600.0
    fresh = EventBus(node="fresh")
    behind = EventBus(node="behind", clock=lambda: time.time() - 2 * hour)
    stale = EventBus(node="stale")
    legacy = EventBus(node="legacy", clock=lambda: time.time() - 2 * hour)
    ahead = EventBus(node="ahead", clock=lambda: time.time() + 2 * hour)
    # only "ahead" prunes (often); the others would not for an hour
    relays = [PostgresEventRelay(postgres_url, bus, prune_interval=hour) for bus in (fresh, behind, stale, legacy)]
    for relay in relays:
        await relay.start()
    try:
        for bus in (fresh, behind, stale, legacy):
            for _ in range(5):
                bus.emit(EngineStarted)
        await eventually(lambda: all(r.stats().published == 5 for r in relays), timeout=TIMEOUT)
        # rows stored two hours ago, and rows from before the server's time was kept (only the
        # emitter's time stamp, two hours behind, to go by)
        postgres_server.sql("UPDATE events SET stored_at = stored_at - 7200 WHERE node = 'stale'", db)
        postgres_server.sql("UPDATE events SET stored_at = NULL WHERE node = 'legacy'", db)
        async with PostgresEventRelay(postgres_url, ahead, prune_interval=0.1) as pruner:
            ahead.emit(EngineStarted)

            def rows() -> dict[str, int]:
                out = postgres_server.sql("SELECT node, count(*) FROM events GROUP BY node", db)
                return {node: int(n) for node, n in (row.split("|") for row in out.split())}

            # what the server stored two hours ago is pruned...
            await eventually(lambda: "stale" not in rows() and "legacy" not in rows(), timeout=TIMEOUT, interval=0.1)
            assert pruner.pruned == 10
            # ...and what it stored just now is kept, whatever the emitting or pruning node's clock says
            assert rows() == {"fresh": 5, "behind": 5, "ahead": 1}
    finally:
        for relay in relays:
            await relay.stop()
    assert not stray_tasks()


async def test_keep_and_max_age_on_the_store_url_cap_the_events_table(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    engine = Engine(store=f"{postgres_url}?keep=20&max_age=600", node_id="n", events="postgres",
                    health_interval=None)  # fmt: skip

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        return None

    cluster = engine.cluster
    assert isinstance(cluster, PostgresEventRelay) and (cluster.keep, cluster.max_age) == (20, 600.0)
    db = database(postgres_url)
    async with engine:
        handles = await engine.submit_many([("quick", {}) for _ in range(100)])
        for handle in handles:
            await handle.wait()
        await eventually(lambda: cluster.stats().pending == 0, timeout=TIMEOUT)
        assert int(postgres_server.sql("SELECT count(*) FROM events", db)) > 100
        # pruned on the relay's timer, to about the newest 20
        await eventually(lambda: int(postgres_server.sql("SELECT count(*) FROM events", db)) <= 20 + 5,
                         timeout=TIMEOUT, interval=0.2)  # fmt: skip
    assert not stray_tasks()


async def test_a_nodes_health_sample_counts_the_runs_it_executes(postgres_url: str) -> None:
    release = asyncio.Event()
    executing: Counter[str] = Counter()

    def node(name: str, slots: int) -> Engine:
        engine = Engine(store=postgres_url, node_id=name, events="postgres", health_interval=0.05,
                        max_concurrency=slots, poll_interval=0.05)  # fmt: skip

        @engine.task
        async def hold(ctx: TaskContext) -> None:
            executing[ctx.node_id] += 1
            await release.wait()

        return engine

    # "a" runs one run at a time: of the three it submits, "b" executes the others
    a, b = node("a", 1), node("b", 4)
    try:
        await a.start()
        await b.start()
        await a.submit_many([("hold", {}) for _ in range(3)])
        await eventually(lambda: sum(executing.values()) == 3, timeout=TIMEOUT)
        # "a" knows all three are running: the one it executes and the two it submitted
        await eventually(lambda: a.stats().running == 3, timeout=TIMEOUT)
        assert executing["a"] <= 1 and executing["b"] >= 2
        cluster = a.cluster
        assert cluster is not None
        # samples taken from now on, as the cluster reads them (ts: the sampling node's clock)
        since = time.time()

        def sampled_since() -> dict[str, int]:
            newest = {}
            for event in cluster.bus.recent():
                if event.kind == "health" and event.ts > since:  # type: ignore[attr-defined]
                    newest[event.node] = event.running  # type: ignore[attr-defined]
            return newest

        await eventually(lambda: len(sampled_since()) == 2, timeout=TIMEOUT)
        assert sampled_since() == {"a": executing["a"], "b": executing["b"]}
        assert {n.node: n.running for n in cluster.nodes()} == {"a": executing["a"], "b": executing["b"]}
    finally:
        release.set()
        await a.stop(5.0)
        await b.stop(5.0)
    assert not stray_tasks()


async def test_a_reader_on_a_network_gone_silent_says_it_is_not_connected_and_reads_again_after(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # a silent network answers nothing and refuses nothing: an unbounded read would wait for
    # good, the relay saying it is connected while it hears no event
    writer_bus = EventBus(node="writer")
    async with StallingProxy(postgres_server.port) as proxy, PostgresEventRelay(postgres_url, writer_bus):
        reader = PostgresEventRelay(proxy.url(postgres_url), since="0", poll_interval=0.1, send_timeout=0.5)
        async with reader:
            writer_bus.emit(EngineStarted)
            await eventually(lambda: events_of(reader, "writer", "engine.started"), timeout=TIMEOUT)
            assert reader.stats().connected
            proxy.hold()
            try:
                await eventually(lambda: not reader.stats().connected, timeout=TIMEOUT)
            finally:
                proxy.release()
            writer_bus.emit(EngineStarted)
            await eventually(lambda: len(events_of(reader, "writer", "engine.started")) == 2, timeout=TIMEOUT)
            assert reader.stats().connected
    assert not stray_tasks()
