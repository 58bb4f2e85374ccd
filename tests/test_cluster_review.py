"""Cluster fixes from a review: leadership during a stop, missed periodic slots on a shared
store, and what the cluster dashboards show of a restarted, killed or silent node.

- a stopping leader releases the lease once its leader-only work has stopped, so another
  node leads while it still drains its runs; a stopping node never takes the lease;
- a node held up while another fired its periodic slots counts none of them missed;
- a process restarted under a node's id is not shown leading while the lease of the process
  it replaced runs out;
- a node killed without a word shows as ``unknown`` on the PostgreSQL dashboard once its
  events stop, however long the dashboard's node TTL; and an unknown node's role is not
  known on the Redis dashboard either.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    ClusterObserver,
    Engine,
    InProcessLease,
    LeaseState,
    NotLeader,
    RedisLease,
    TaskContext,
)
from taskwatch.engine.redis_events import RedisEventRelay
from taskwatch.engine.relay import ClusterNode

from .helpers import Recorder, eventually, stray_tasks
from .postgres_server import PostgresServer
from .processes import JsonLineProcess
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
        await eventually(lambda: started == ["a"], timeout=2.0)
        handle = await a.submit("drain_me")
        await eventually(lambda: a.get(handle.id).status.value == "running", timeout=2.0)

        stop_a = asyncio.create_task(a.stop(30.0))
        # b leads, and runs the leader-only work, while a's run is still draining
        await eventually(lambda: b.leadership().is_leader and "b" in started, timeout=5.0)
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
        await eventually(lambda: started == ["a"], timeout=2.0)
        handle = await b.submit("drain_me")
        await eventually(lambda: b.get(handle.id).status.value == "running", timeout=2.0)

        stop_b = asyncio.create_task(b.stop(30.0))
        await eventually(lambda: b.state == "stopping", timeout=2.0)
        await a.stop(1.0)  # the lease is free now
        assert await lease.holder() is None
        tries = lease.tries["c"]
        # b tries every renew interval, as c does: it had many chances to take the lease
        await eventually(lambda: lease.tries["c"] >= tries + 10, timeout=5.0)
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


async def test_a_process_restarted_under_the_leaders_id_is_not_shown_leading_on_the_old_lease(
    postgres_url: str, nodes: list[Child]
) -> None:
    # the lease outlives the test: the killed process's term is still running when the new one is up
    args = (*COMMON, "--lease-ttl", "60", "run")
    first = Child(postgres_url, "n1", *args)  # type: ignore[arg-type]
    nodes.append(first)
    await asyncio.to_thread(first.event, "lease.acquired", TIMEOUT)
    async with ClusterObserver(postgres_url, refresh_interval=0.2) as observer:
        before = await eventually(lambda: (n := node_named(observer, "n1")) is not None and n.is_leader and n,
                                  timeout=TIMEOUT)  # fmt: skip
        assert before.term == 1

        await asyncio.to_thread(first.sigkill)
        second = Child(postgres_url, "n1", *args)  # type: ignore[arg-type]
        nodes.append(second)
        await asyncio.to_thread(second.event, "started", TIMEOUT)

        def restarted() -> ClusterNode | None:
            n = node_named(observer, "n1")
            return n if n is not None and n.incarnation != before.incarnation and n.state == "up" else None

        now = await eventually(restarted, timeout=TIMEOUT)
        # the lease names n1 and term 1: the killed process's, running out; not the new process's
        assert observer.leader is not None and (observer.leader.holder, observer.leader.term) == ("n1", 1)
        assert (now.is_leader, now.term) == (False, None)


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
