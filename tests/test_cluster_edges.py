"""A cluster at its edges, on real servers: leadership during a stop, nodes paused, killed,
restarted under their id or led through another lease, and what the cluster dashboards show
of them.

Checked here:

- a stopping leader releases the lease once its leader-only work has stopped, so another
  node leads while it still drains its runs; a stopping node never takes the lease;
- a node held up while another fired its periodic slots counts none of them missed;
- a process restarted under a node's id is not shown leading while the lease of the process
  it replaced runs out;
- a node killed without a word shows as ``unknown`` on the PostgreSQL dashboard once its
  events stop, however long the dashboard's node TTL; and an unknown node's role is not
  known on the Redis dashboard either;
- a node paused (SIGSTOP) past its claims' lease, whose runs another node took back, cancels
  each of them once when it runs again: a task's own cleanup after its ``CancelledError`` runs
  to its end, as after a user's cancel, and the lost claim is logged once per run;
- runs that recovery fails (``on_lost="fail"``) or cancels (a cancel asked for while their
  node was dead) are announced once on the cluster bus, by the node that recovered them, even
  when that node waits on them (and so reads their end back from the store as well);
- a node killed right after its first health sample, before a second one gave its interval,
  still shows as ``unknown`` once it has been silent for a few intervals;
- ``taskwatch attach postgresql://...`` on a cluster led through a :class:`RedisLease` shows
  the leader from the nodes' lease events, in the Nodes view and the header alike; when
  nothing says who leads, the header says ``leader unknown``, not ``no leader``;
- a leader whose lease lapsed (its loop blocked past it) is told so by ``NotLeader``, which
  does not name the node itself as the lease's holder.

The node processes run this module: ``python -m tests.test_cluster_edges URL --node NAME ...``
prints one JSON line per thing it did (see :func:`_node`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from rich.text import Text
from taskwatch.engine import (
    ClusterObserver,
    Engine,
    InProcessLease,
    LeaseState,
    NotLeader,
    PostgresEventRelay,
    RedisLease,
    TaskContext,
)
from taskwatch.engine.redis_events import RedisEventRelay
from taskwatch.engine.relay import ClusterNode
from taskwatch.tui.cluster import ClusterApp
from taskwatch.widgets import StoreNodesTable
from textual.widgets import Static

from .helpers import Recorder, eventually, stray_tasks
from .postgres_server import PostgresServer
from .processes import JsonLineProcess, Line
from .redis_server import RedisServer
from .test_durable import Child

TIMEOUT = 30.0


RENEW = 0.05


class RefusingLease(InProcessLease):
    """An in-process lease that never lets the nodes in ``refused`` take it, counting their tries."""

    def __init__(self, *args: Any, refused: tuple[str, ...] = (), **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.refused = refused
        self.tries: dict[str, int] = {}

    async def acquire(self, node_id: str) -> LeaseState | None:
        self.tries[node_id] = self.tries.get(node_id, 0) + 1
        return None if node_id in self.refused else await super().acquire(node_id)


def leading_engine(lease: InProcessLease, node: str, started: list[str], gate: asyncio.Event) -> Engine:
    """An engine with a leader-only worker (noting each start) and a task that runs until ``gate``."""
    engine = Engine(node_id=node, lease=lease, health_interval=None)

    @engine.supervised(name="dedup", leader_only=True, backoff=0.01)
    async def dedup(ctx: TaskContext) -> None:
        await ctx.ensure_leader()
        started.append(node)
        await asyncio.Event().wait()

    @engine.task
    async def drain_me(ctx: TaskContext) -> str:
        await gate.wait()
        try:
            await ctx.ensure_leader()
        except NotLeader:
            return "not leader"
        return "leader"

    return engine


# ---------------------------------------------------------------- leadership during a stop


async def test_a_stopping_leader_hands_the_lease_over_while_it_still_drains_a_run() -> None:
    # a ttl far longer than the test: a takeover can only come from a release
    lease = InProcessLease(ttl=60.0, renew_interval=RENEW)
    gate = asyncio.Event()
    started: list[str] = []
    a = leading_engine(lease, "a", started, gate)
    b = leading_engine(lease, "b", started, gate)
    rec_a = Recorder(a, kinds=("lease.",))
    stop_a: asyncio.Task[None] | None = None
    try:
        await a.start()
        await b.start()
        await eventually(lambda: started == ["a"])
        handle = await a.submit("drain_me")
        await eventually(lambda: a.get(handle.id).status.value == "running")

        stop_a = asyncio.create_task(a.stop(30.0))
        # b leads, and runs the leader-only work, while a's run is still draining
        await eventually(lambda: b.leadership().is_leader and "b" in started)
        assert a.state == "stopping" and not stop_a.done()
        assert [e.kind for e in rec_a.events][-1] == "lease.released"
        assert not a.leadership().is_leader

        gate.set()
        await stop_a
        # the run that drained after the handover is told it does not lead
        assert (await a.fetch_run(handle.id)).result == "not leader"
    finally:
        gate.set()
        if stop_a is not None:
            await stop_a
        await a.stop(1.0)
        await b.stop(1.0)
    assert not stray_tasks()


async def test_a_stopping_follower_never_takes_the_lease() -> None:
    # c keeps trying for the lease and is always refused: its tries pace the test
    lease = RefusingLease(ttl=60.0, renew_interval=RENEW, refused=("c",))
    gate = asyncio.Event()
    started: list[str] = []
    a, b, c = (leading_engine(lease, node, started, gate) for node in ("a", "b", "c"))
    rec_b = Recorder(b, kinds=("lease.",))
    stop_b: asyncio.Task[None] | None = None
    try:
        for engine in (a, b, c):
            await engine.start()
        await eventually(lambda: started == ["a"])
        handle = await b.submit("drain_me")
        await eventually(lambda: b.get(handle.id).status.value == "running")

        stop_b = asyncio.create_task(b.stop(30.0))
        await eventually(lambda: b.state == "stopping")
        await a.stop(1.0)  # the lease is free now
        assert await lease.holder() is None
        tries = lease.tries["c"]
        # b tries every renew interval, as c does: it had many chances to take the lease
        await eventually(lambda: lease.tries["c"] >= tries + 10)
        assert rec_b.of("lease.acquired") == []
        assert await lease.holder() is None
        assert not b.leadership().is_leader and started == ["a"]
        assert not stop_b.done()
    finally:
        gate.set()
        if stop_b is not None:
            await stop_b
        for engine in (a, b, c):
            await engine.stop(1.0)
    assert not stray_tasks()


# ---------------------------------------------------------------- missed periodic slots on a shared store


async def test_a_node_held_up_while_another_fired_its_slots_counts_none_missed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    every, held_for = 0.2, 1.5
    fired: list[str] = []
    unblocked: list[float] = []

    def node(name: str) -> Engine:
        engine = Engine(store=url, node_id=name, health_interval=None)

        @engine.periodic(every=every, name="tick")
        async def tick(ctx: TaskContext) -> None:
            fired.append(name)

        return engine

    held = node("held")

    @held.task
    async def block(ctx: TaskContext) -> None:
        time.sleep(held_for)  # noqa: ASYNC251 - holds this node's event loop, as SIGSTOP would
        unblocked.append(held.clock())

    other = node("other")
    await other.start()
    bg = held.start_background()
    try:
        await eventually(lambda: "held" in fired and "other" in fired, timeout=10.0)
        caplog.set_level(logging.INFO, logger="taskwatch.scheduler")
        await asyncio.to_thread(bg.submit, "block")
        await eventually(lambda: unblocked, timeout=10.0)
        fired_meanwhile = len([n for n in fired if n == "other"])

        def ticked_after_the_hold() -> Any:
            info = next(p for p in bg.schedule() if p.name == "tick")
            return info.next_due is not None and info.next_due > unblocked[0] and info

        info = await eventually(ticked_after_the_hold, timeout=10.0)
        assert fired_meanwhile >= 3  # the other node kept the schedule while this one was held up
        assert info.missed == 0
        assert not [r for r in caplog.records if "passed without a run" in r.getMessage()]
        assert [r for r in caplog.records if "fired its slots meanwhile" in r.getMessage()]
    finally:
        await asyncio.to_thread(bg.stop, 5.0)
        await other.stop(2.0)


# ---------------------------------------------------------------- the PostgreSQL dashboard

COMMON = ("--events", "postgres", "--health", "0.2", "--leader", "--poll", "0.2")


def node_named(observer: ClusterObserver, name: str) -> ClusterNode | None:
    return next((n for n in observer.nodes() if n.node == name), None)


#: the lease outlives the test: the killed process's term is still running when the new one is up
LONG_LEASE = (*COMMON, "--lease-ttl", "60", "run")


async def leading_n1(postgres_url: str, nodes: list[Child]) -> Child:
    """Node n1 in a process of its own, once it holds the lease (term 1)."""
    first = Child(postgres_url, "n1", *LONG_LEASE)  # type: ignore[arg-type]
    nodes.append(first)
    await asyncio.to_thread(first.event, "lease.acquired", TIMEOUT)
    return first


async def test_a_process_restarted_under_the_leaders_id_is_not_shown_leading_on_the_old_lease(
    postgres_url: str, nodes: list[Child]
) -> None:
    first = await leading_n1(postgres_url, nodes)
    async with ClusterObserver(postgres_url, refresh_interval=0.2) as observer:
        before = await eventually(lambda: (n := node_named(observer, "n1")) is not None and n.is_leader and n,
                                  timeout=TIMEOUT)  # fmt: skip
        assert before.term == 1

        await asyncio.to_thread(first.sigkill)
        second = Child(postgres_url, "n1", *LONG_LEASE)  # type: ignore[arg-type]
        nodes.append(second)
        await asyncio.to_thread(second.event, "started", TIMEOUT)

        def restarted() -> ClusterNode | None:
            n = node_named(observer, "n1")
            return n if n is not None and n.incarnation != before.incarnation and n.state == "up" else None

        now = await eventually(restarted, timeout=TIMEOUT)
        # the lease names n1 and term 1: the killed process's, running out; not the new process's
        assert observer.leader is not None and (observer.leader.holder, observer.leader.term) == ("n1", 1)
        assert (now.is_leader, now.term) == (False, None)


async def test_a_dashboard_opened_after_a_restart_does_not_show_the_new_process_leading_on_the_old_lease(
    postgres_url: str, nodes: list[Child]
) -> None:
    # the dashboard never saw the killed process lead: only the store can say whose the term is
    first = await leading_n1(postgres_url, nodes)
    # its lease.acquired is in the events table before it dies (events go out in batches)
    told = "SELECT count(*) FROM events WHERE node = 'n1' AND body LIKE '%\"kind\":\"lease.acquired\"%'"
    probe = await asyncpg.connect(postgres_url)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not await probe.fetchval(told):
            assert time.monotonic() < deadline, "n1's lease.acquired never reached the events table"
            await asyncio.sleep(0.05)
    finally:
        await probe.close()
    await asyncio.to_thread(first.sigkill)
    second = Child(postgres_url, "n1", *LONG_LEASE)  # type: ignore[arg-type]
    nodes.append(second)
    await asyncio.to_thread(second.event, "started", TIMEOUT)

    app = ClusterApp(ClusterObserver(postgres_url, refresh_interval=0.2))
    async with app.run_test(size=(160, 45)):
        observer = app.observer
        assert observer is not None
        table = app.query_one(StoreNodesTable)

        # the newest process of n1 (the one shown) is the one started after the kill
        now = await eventually(lambda: (n := node_named(observer, "n1")) is not None and n.state == "up" and n,
                               timeout=TIMEOUT)  # fmt: skip
        # the lease names n1 and term 1: the killed process's, running out; not the new process's
        assert observer.leader is not None and (observer.leader.holder, observer.leader.term) == ("n1", 1)
        assert (now.is_leader, now.term) == (False, None)
        await eventually(lambda: "n1" in table.shown_keys, timeout=TIMEOUT)
        assert str(table.get_cell("n1", "role")) == "follower"


async def test_a_killed_node_shows_unknown_once_its_events_stop_whatever_the_dashboards_node_ttl(
    postgres_url: str, nodes: list[Child]
) -> None:
    # the nodes' TTL is 3 s, the dashboard's the default 30 s: the nodes table alone would show
    # the killed node up for half a minute
    doomed = Child(postgres_url, "doomed", *COMMON, "--lease-ttl", "3", "run")  # type: ignore[arg-type]
    nodes.append(doomed)
    await asyncio.to_thread(doomed.event, "lease.acquired", TIMEOUT)
    async with ClusterObserver(postgres_url, refresh_interval=0.2) as observer:
        assert observer.store.node_ttl == 30
        await eventually(lambda: (n := node_named(observer, "doomed")) is not None and n.state == "up"
                         and n.events > 2, timeout=TIMEOUT)  # fmt: skip
        await asyncio.to_thread(doomed.sigkill)
        killed_at = time.monotonic()
        gone = await eventually(lambda: (n := node_named(observer, "doomed")) is not None and n.state != "up" and n,
                                timeout=10.0)  # fmt: skip
        assert gone.state == "unknown" and time.monotonic() - killed_at < 10.0
        assert gone.running is None


async def test_a_node_killed_before_the_dashboard_opened_shows_unknown_whatever_the_dashboards_node_ttl(
    postgres_url: str, nodes: list[Child]
) -> None:
    # no event of it ever reaches this dashboard: before, it showed up, with its last reported
    # runs, for the dashboard's 30 s node TTL; its heartbeat has stopped, as the others' beat shows
    survivor, doomed = (Child(postgres_url, name, *COMMON, "--lease-ttl", "3", "run") for name in ("survivor", "doomed"))  # type: ignore[arg-type]
    nodes += [survivor, doomed]
    for child in (survivor, doomed):
        await asyncio.to_thread(child.event, "started", TIMEOUT)
    await asyncio.to_thread(doomed.sigkill)
    async with ClusterObserver(postgres_url, refresh_interval=0.2) as observer:
        assert observer.store.node_ttl == 30
        gone = await eventually(lambda: (n := node_named(observer, "doomed")) is not None and n.state != "up" and n,
                                timeout=12.0)  # fmt: skip
        assert (gone.state, gone.running) == ("unknown", None)
        alive = node_named(observer, "survivor")
        assert alive is not None and alive.state == "up"


# ---------------------------------------------------------------- the Redis dashboard

#: an engine leading on Redis, publishing its events (and health) there, in a process of its own
LEADER = """
import asyncio, json, sys
from taskwatch.engine import Engine, RedisLease

async def main(url, key, events):
    engine = Engine(node_id="a", lease=RedisLease(url, key=key, ttl=1.0), events=events, health_interval=0.2)
    await engine.start()
    print(json.dumps({"ev": "started", "leader": engine.leadership().is_leader}), flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

asyncio.run(main(*sys.argv[1:4]))
"""


async def test_a_killed_node_on_the_redis_dashboard_has_no_role_once_unknown(redis_server: RedisServer) -> None:
    stream = f"test:{uuid.uuid4().hex[:8]}:events"
    events = f"{redis_server.url}?stream={stream}"
    key = f"test:{uuid.uuid4().hex[:8]}:leader"
    killed = JsonLineProcess([sys.executable, "-c", LEADER, redis_server.url, key, events], "leader-a", 30.0)
    b = Engine(node_id="b", lease=RedisLease(redis_server.url, key=key, ttl=1.0), events=events, health_interval=0.2)
    watcher = RedisEventRelay(redis_server.url, stream=stream, since="0")
    try:
        assert (await asyncio.to_thread(killed.event, "started"))["leader"]
        await b.start()
        await watcher.start()

        def seen(name: str) -> ClusterNode | None:
            return next((n for n in watcher.nodes() if n.node == name), None)

        # leading, and sampling its health: a node that samples none is never judged silent
        await eventually(lambda: (n := seen("a")) is not None and n.is_leader and n.cpu_percent is not None,
                         timeout=10.0)  # fmt: skip
        killed.proc.kill()  # no lease.lost, no engine.stopped: a just goes silent
        await eventually(lambda: (n := seen("b")) is not None and n.is_leader, timeout=10.0)
        a = await eventually(lambda: (n := seen("a")) is not None and n.state == "unknown" and n, timeout=10.0)
        # it may be up or dead: neither a follower nor a leader of any term, as on PostgreSQL
        assert (a.is_leader, a.term, a.running) == (None, None, None)
    finally:
        if killed.proc.poll() is None:
            killed.proc.kill()
        killed.proc.wait(timeout=30)
        await watcher.stop()
        await b.stop(2.0)
    assert not stray_tasks()


async def test_a_refresh_reads_who_leads_now(postgres_url: str, nodes: list[Child]) -> None:
    # refresh() says "now": right after a takeover it must not show the killed leader
    args = (*COMMON, "--lease-ttl", "2", "run")
    first = Child(postgres_url, "n1", *args)  # type: ignore[arg-type]
    nodes.append(first)
    await asyncio.to_thread(first.event, "lease.acquired", TIMEOUT)
    second = Child(postgres_url, "n2", *args)  # type: ignore[arg-type]
    nodes.append(second)
    await asyncio.to_thread(second.event, "started", TIMEOUT)
    async with ClusterObserver(postgres_url, refresh_interval=0.2) as observer:
        await observer.refresh()
        assert observer.leader is not None and observer.leader.holder == "n1"
        await asyncio.to_thread(first.sigkill)
        await asyncio.to_thread(second.event, "lease.acquired", TIMEOUT)
        await observer.refresh()
        assert observer.leader is not None and (observer.leader.holder, observer.leader.term) == ("n2", 2)


async def test_after_an_outage_a_node_that_was_up_is_not_shown_dead_before_it_could_heartbeat(
    postgres_server: PostgresServer, postgres_url: str, nodes: list[Child]
) -> None:
    # an outage longer than the node TTL leaves every heartbeat old: the first read after it
    # proves nothing about who is alive, so a live node is "unknown" until it could be heard
    node = Child(postgres_url, "w", *COMMON, "--lease-ttl", "3", "run")  # type: ignore[arg-type]
    nodes.append(node)
    await asyncio.to_thread(node.event, "lease.acquired", TIMEOUT)
    async with ClusterObserver(f"{postgres_url}?node_ttl=3&reconnect_timeout=1", refresh_interval=0.2) as observer:

        def state() -> str | None:
            n = node_named(observer, "w")
            return None if n is None else "dead" if n.dead else "unknown" if n.unknown else "up"

        await eventually(lambda: state() == "up", timeout=TIMEOUT)
        await asyncio.to_thread(postgres_server.stop)
        try:
            await eventually(lambda: state() == "unknown", timeout=TIMEOUT)
        finally:
            await asyncio.to_thread(postgres_server.start)
        seen: list[str | None] = []
        await eventually(lambda: seen.append(state()) or seen[-1] == "up", timeout=TIMEOUT)
        assert "dead" not in seen, seen


MODULE = "tests.test_cluster_edges"


def node(url: str | Path, name: str, *args: str) -> Child:
    return Child(url, name, *args, module=MODULE)  # type: ignore[arg-type]


async def line(child: Child, ev: str, timeout: float = TIMEOUT, **match: Any) -> Line:
    """The child's first matching ``ev`` line, waited for off the event loop (the engines need it)."""
    return await asyncio.to_thread(
        child.wait_for, lambda x: x.get("ev") == ev and all(x.get(k) == v for k, v in match.items()), timeout
    )


def header(app: ClusterApp) -> str:
    rendered = app.query_one("#cluster-header", Static).render()
    return rendered.plain if isinstance(rendered, Text) else str(rendered)


# ---------------------------------------------------------------- a paused node's lost claims


async def test_a_node_paused_past_its_lease_stops_each_lost_run_once_and_lets_its_cleanup_finish(
    postgres_url: str, nodes: list[Child]
) -> None:
    # each run's cleanup (after its CancelledError) takes 1.2 s: a few heartbeats of a 1.5 s lease
    paused = node(postgres_url, "paused", "--lease-ttl", "1.5", "--cleanup", "1.2", "--submit", "tidy=3")
    nodes.append(paused)
    ids = (await line(paused, "submitted"))["ids"]
    for run_id in ids:
        await line(paused, "start", run=run_id)
    # registers no task: it takes the runs back and leaves them pending
    survivor = Engine(store=postgres_url, node_id="survivor", lease_ttl=1.5, health_interval=None)
    async with survivor:
        recovered = Recorder(survivor, ("run.recovered",))
        os.kill(paused.proc.pid, signal.SIGSTOP)
        try:
            await eventually(lambda: {e.run_id for e in recovered.of("run.recovered")} == set(ids), timeout=TIMEOUT)
        finally:
            os.kill(paused.proc.pid, signal.SIGCONT)
        # running again, it hears its claims are gone: each run is cancelled, once, and cleans up
        for run_id in ids:
            await line(paused, "cleanup-done", run=run_id, attempt=1)
        assert paused.of("cleanup-interrupted") == []
        lost = Counter(
            run_id for entry in paused.of("log") for run_id in ids if f"lost the claim on run {run_id}" in entry["message"]
        )
        assert lost == Counter(ids)
    assert not stray_tasks()


# ---------------------------------------------------------------- recovery's ends on the cluster bus


async def test_runs_recovery_fails_or_cancels_are_announced_once_on_the_cluster_bus(
    postgres_url: str, nodes: list[Child]
) -> None:
    common = ("--lease-ttl", "2", "--events", "postgres")
    # one run the survivor knows from its start, and two submitted after it, which it does not know
    early = node(postgres_url, "early", *common, "--submit", "fragile=1")
    nodes.append(early)
    (known,) = (await line(early, "submitted"))["ids"]
    async with PostgresEventRelay(postgres_url) as watcher:  # a third party reading the cluster's events
        # registers no task: it takes the runs back and runs none
        survivor = Engine(store=postgres_url, node_id="survivor", lease_ttl=2, events="postgres", health_interval=None)
        async with survivor:
            own = Recorder(survivor, ("run.failed", "run.cancelled"))
            late = node(postgres_url, "late", *common, "--submit", "fragile=1", "--submit", "hang=1")
            nodes.append(late)
            unknown, hang_id = (await line(late, "submitted"))["ids"]
            ids = [known, unknown, hang_id]
            # either node may run either's runs
            await eventually(lambda: {e["run"] for c in (early, late) for e in c.of("start")} == set(ids), timeout=TIMEOUT)
            await asyncio.gather(asyncio.to_thread(early.sigkill), asyncio.to_thread(late.sigkill))
            # its cancel is asked for while its node is dead: recovery ends it cancelled
            assert (await survivor.cancel(hang_id, grace=0)).status.value == "running"
            # waiting on them, the survivor also reads their ends back from the store
            records = await asyncio.gather(*(survivor.handle(i).wait(timeout=TIMEOUT) for i in ids))
            assert [r.status.value for r in records] == ["failed", "failed", "cancelled"]
            assert all(r.error is not None and r.error.type == "WorkerLost" for r in records[:2])
        # the survivor stopped, its last events sent: the watcher has read all of them
        await eventually(lambda: any(n.node == "survivor" and n.stopped for n in watcher.nodes()), timeout=TIMEOUT)
        ends = Counter(
            (e.run_id, e.kind, e.node) for e in watcher.bus.recent() if e.kind in ("run.failed", "run.cancelled")
        )
        assert ends == Counter({(known, "run.failed", "survivor"): 1, (unknown, "run.failed", "survivor"): 1,
                                (hang_id, "run.cancelled", "survivor"): 1})  # fmt: skip
        # and on the survivor's own bus, once each, as its own news
        assert sorted((e.run_id, e.from_store) for e in own.events) == sorted((i, False) for i in ids)
    assert not stray_tasks()


# ---------------------------------------------------------------- a node killed after one health sample


async def test_a_node_killed_after_its_first_health_sample_shows_as_unknown(
    redis_server: RedisServer, tmp_path: Path, nodes: list[Child]
) -> None:
    events = f"{redis_server.url}?stream=edges2:{uuid.uuid4().hex[:8]}"
    async with RedisEventRelay(events) as watcher:
        doomed = node(tmp_path / "doomed.db", "doomed", "--events", events, "--health", "1")
        nodes.append(doomed)
        await line(doomed, "started")

        def health_samples() -> int:
            return sum(1 for e in watcher.bus.recent() if e.node == "doomed" and e.kind == "health")

        await eventually(lambda: health_samples() >= 1, timeout=TIMEOUT)
        await asyncio.to_thread(doomed.sigkill)  # before its second sample (a second later)
        killed_at = time.monotonic()
        await eventually(lambda: {n.node: n for n in watcher.nodes()}["doomed"].state == "unknown", timeout=TIMEOUT)
        # three intervals (measured from its start to its first sample) and a second's slack
        assert time.monotonic() - killed_at < 8
        assert health_samples() == 1  # it died before a second sample could give its interval
    assert not stray_tasks()


# ---------------------------------------------------------------- the leader of a cluster led through Redis


async def test_attach_on_a_cluster_led_through_redis_shows_the_leader_its_events_name(
    postgres_url: str, redis_server: RedisServer
) -> None:
    key = f"edges2:{uuid.uuid4().hex[:8]}"

    def member(name: str, events: str | None) -> Engine:
        lease = RedisLease(redis_server.url, key=key, ttl=30.0)
        return Engine(store=postgres_url, node_id=name, lease=lease, events=events, health_interval=None, lease_ttl=30)

    leader, follower = member("r1", "postgres"), member("r2", "postgres")
    async with leader, follower:
        await eventually(lambda: leader.leadership().is_leader, timeout=TIMEOUT)
        for lease in ("leader", None):  # the default lease name (no such PostgresLease), and none
            app = ClusterApp(ClusterObserver(postgres_url, lease=lease, since="0"))
            async with app.run_test(size=(200, 45)):
                assert app.observer is not None
                observer = app.observer

                def roles() -> dict[str, bool | None]:
                    return {n.node: n.is_leader for n in observer.nodes()}

                await eventually(lambda: roles() == {"r1": True, "r2": False}, timeout=TIMEOUT)
                await eventually(lambda: "leader r1 t1" in header(app), timeout=TIMEOUT)
                assert "no leader" not in header(app)
    assert not stray_tasks()


async def test_attach_says_leader_unknown_when_nothing_says_who_leads(postgres_url: str, redis_server: RedisServer) -> None:
    # led through Redis, publishing no events: neither a lease row nor events say who leads
    lease = RedisLease(redis_server.url, key=f"edges2:{uuid.uuid4().hex[:8]}", ttl=30.0)
    async with Engine(store=postgres_url, node_id="quiet", lease=lease, health_interval=None, lease_ttl=30) as engine:
        await eventually(lambda: engine.leadership().is_leader, timeout=TIMEOUT)
        app = ClusterApp(ClusterObserver(postgres_url))
        async with app.run_test(size=(200, 45)):
            await eventually(lambda: "1 nodes" in header(app), timeout=TIMEOUT)
            assert "leader unknown" in header(app) and "no leader" not in header(app)
    assert not stray_tasks()


# ---------------------------------------------------------------- NotLeader after a lapsed lease


async def test_not_leader_after_a_lapsed_lease_says_it_lapsed_not_that_the_node_holds_it() -> None:
    engine = Engine(node_id="solo", lease=InProcessLease(ttl=0.3), health_interval=None)
    caught: list[NotLeader] = []
    stale: list[object] = []

    @engine.task
    async def guarded(ctx: TaskContext) -> None:
        await ctx.ensure_leader()
        time.sleep(0.5)  # the node stalls (a blocking call, a GC pause) past its lease
        # before the elector has looked again, what the node says of itself already counts the
        # lapse: a worker guarding with `if ctx.is_leader:` would act while another node leads
        stale.extend([ctx.is_leader, ctx.term, engine.leadership().is_leader])
        try:
            await ctx.ensure_leader()
        except NotLeader as exc:
            caught.append(exc)

    async with engine:
        await eventually(lambda: engine.leadership().is_leader, timeout=TIMEOUT)
        await (await engine.submit("guarded")).wait(timeout=TIMEOUT)
    (exc,) = caught
    assert stale == [False, 0, False]
    assert exc.lapsed and "lapsed" in str(exc) and "held by 'solo'" not in str(exc)
    assert str(exc).startswith("node 'solo' is not the leader")


async def test_not_leader_in_a_stop_that_left_this_processs_lease_to_lapse_says_it_lapsed() -> None:
    # the stop left the lease to lapse (its leader-only worker ignored the cancels): the lease
    # naming this node is this process's own term, not an earlier process's under its id
    engine = Engine(node_id="a", lease=InProcessLease(ttl=30.0), cancel_grace=0.05, health_interval=None)
    caught: list[NotLeader] = []
    release = asyncio.Event()

    @engine.supervised(name="flusher", leader_only=True)
    async def flusher(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            while not release.is_set():  # a final flush that goes on through the stop's cancels
                with contextlib.suppress(asyncio.CancelledError):
                    await release.wait()
            try:
                await ctx.ensure_leader()
            except NotLeader as exc:
                caught.append(exc)

    await engine.start()
    await eventually(lambda: engine.leadership().is_leader, timeout=TIMEOUT)
    await engine.stop(timeout=0.1)  # the worker is left going, the lease left to lapse
    release.set()
    await eventually(lambda: bool(caught), timeout=TIMEOUT)
    (exc,) = caught
    assert exc.lapsed and "lapsed" in str(exc) and "earlier process" not in str(exc), str(exc)


# ---------------------------------------------------------------- the node program


def _emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class _Warnings(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        _emit(ev="log", level=record.levelname, message=record.getMessage())


async def _node(args: argparse.Namespace) -> None:
    """An engine whose tasks say what they do: ``start``, and for ``tidy`` after its cancel,
    ``cleanup-start`` then ``cleanup-done`` (or ``cleanup-interrupted`` if cancelled again)."""
    logging.getLogger("taskwatch").addHandler(_Warnings(logging.WARNING))
    db = args.db if "://" in args.db else f"sqlite:///{os.path.abspath(args.db)}"
    engine = Engine(store=db, node_id=args.node, lease_ttl=args.lease_ttl, events=args.events,
                    health_interval=args.health, poll_interval=0.1)  # fmt: skip

    async def forever(ctx: TaskContext) -> None:
        _emit(ev="start", run=ctx.run_id, attempt=ctx.attempt)
        await asyncio.Event().wait()

    @engine.task
    async def tidy(ctx: TaskContext) -> None:
        try:
            await forever(ctx)
        except asyncio.CancelledError:
            _emit(ev="cleanup-start", run=ctx.run_id, attempt=ctx.attempt)
            try:
                await asyncio.sleep(args.cleanup)  # release a lock, roll back a transaction
            except asyncio.CancelledError:
                _emit(ev="cleanup-interrupted", run=ctx.run_id, attempt=ctx.attempt)
                raise
            _emit(ev="cleanup-done", run=ctx.run_id, attempt=ctx.attempt)
            raise

    @engine.task(on_lost="fail")
    async def fragile(ctx: TaskContext) -> None:
        await forever(ctx)

    @engine.task
    async def hang(ctx: TaskContext) -> None:
        await forever(ctx)

    await engine.start()
    _emit(ev="started")
    ids: list[str] = []
    for spec in args.submit:
        task, count = spec.split("=")
        ids += [h.id for h in await engine.submit_many([(task, None)] * int(count))]
    if ids:
        _emit(ev="submitted", ids=ids)
    await asyncio.to_thread(sys.stdin.read)  # until the test closes stdin (or kills us)
    await engine.stop()
    _emit(ev="stopped")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}")
    parser.add_argument("db")
    parser.add_argument("--node", required=True)
    parser.add_argument("--lease-ttl", type=float, default=1.5)
    parser.add_argument("--events", default=None)
    parser.add_argument("--health", type=float, default=None)
    parser.add_argument("--cleanup", type=float, default=1.0, help="seconds tidy's cleanup takes")
    parser.add_argument("--submit", action="append", default=[], help="TASK=COUNT, in that order")
    asyncio.run(_node(parser.parse_args()))
