"""A cluster at more of its edges: nodes paused, killed or led through another lease, on real servers.

Checked here:

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

The node processes run this module: ``python -m tests.test_cluster_edges2 URL --node NAME ...``
prints one JSON line per thing it did (see :func:`_node`).
"""

from __future__ import annotations

import argparse
import asyncio
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

from rich.text import Text
from taskwatch.engine import (
    ClusterObserver,
    Engine,
    InProcessLease,
    NotLeader,
    PostgresEventRelay,
    RedisLease,
    TaskContext,
)
from taskwatch.engine.redis_events import RedisEventRelay
from taskwatch.tui.cluster import ClusterApp
from textual.widgets import Static

from .helpers import Recorder, eventually, stray_tasks
from .processes import Line
from .redis_server import RedisServer
from .test_durable import Child

#: generous bounds for a loaded machine; a passing run takes a fraction of them
TIMEOUT = 30.0
MODULE = "tests.test_cluster_edges2"


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
        lease = RedisLease(redis_server.url, key=key, ttl=3.0)
        return Engine(store=postgres_url, node_id=name, lease=lease, events=events, health_interval=None, lease_ttl=3)

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
    lease = RedisLease(redis_server.url, key=f"edges2:{uuid.uuid4().hex[:8]}", ttl=3.0)
    async with Engine(store=postgres_url, node_id="quiet", lease=lease, health_interval=None, lease_ttl=3) as engine:
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

    @engine.task
    async def guarded(ctx: TaskContext) -> None:
        await ctx.ensure_leader()
        time.sleep(0.5)  # the node stalls (a blocking call, a GC pause) past its lease
        try:
            await ctx.ensure_leader()
        except NotLeader as exc:
            caught.append(exc)

    async with engine:
        await eventually(lambda: engine.leadership().is_leader, timeout=TIMEOUT)
        await (await engine.submit("guarded")).wait(timeout=TIMEOUT)
    (exc,) = caught
    assert "lapsed" in str(exc) and "held by 'solo'" not in str(exc)
    assert str(exc).startswith("node 'solo' is not the leader")


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
