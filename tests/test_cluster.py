"""A cluster end to end: engines in separate processes sharing one PostgreSQL database.

Each node is ``python -m tests.durable_child postgresql://...`` (the same
child the SQLite crash tests drive), killed with real signals where the test
says so. The tasks append one line per execution to a shared log, and the
database is read with psql after the nodes are gone, so what is checked is
what happened, not what a node believed.

What each test proves:

- three nodes execute every one of a few thousand runs exactly once, and
  each node executes a fair part of them;
- after ``kill -9`` of one node mid-run, the others take its runs over once
  its lease has expired and finish every one: none lost, none left running;
- an idle node starts a run another node inserted when it is told (LISTEN/
  NOTIFY), not at its next poll (a minute away);
- a node paused (SIGSTOP) past its lease has its runs taken over; resumed,
  it hears that its claims are gone (or has its late finish refused by the
  claim token), and what the database records is the other node's;
- a PostgreSQL restart under load: the nodes reconnect and every run ends
  succeeded, none lost, none stuck;
- a cancel issued on a node that does not own the run (here: an engine in
  the test process that cannot even run the task) stops it on its owner;
- a periodic task registered on three nodes fires once per slot;
- a task declared with ``concurrency=3`` never has more than three runs
  going at once across two nodes that could run two each (the runs count
  themselves in a table), and both nodes run some of them;
- ``max_queue`` holds across two nodes submitting at once: together they
  queue exactly that many runs, and each is refused the next one;
- a node cut off from the database (the server stopped) for longer than the
  lease TTL steps down: it stops the runs whose claims ran out, gives up
  leadership and says so; when the server is back it says that too, leads
  again and runs those runs once more. With a lease the node can still
  reach (here an in-process one), it releases the lease and does not
  compete for it until the database answers again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, InProcessLease, RunNotCancellable, RunNotFound, RunStatus, TaskContext
from taskwatch.engine.store import NewRun, PostgresStore

from .helpers import eventually
from .postgres_server import PostgresServer
from .test_durable import Child

#: runs in the three-node test; TASKWATCH_CLUSTER_RUNS=N to change it
CLUSTER_RUNS = int(os.environ.get("TASKWATCH_CLUSTER_RUNS", "5000"))
#: generous bounds for a loaded 2-core machine; a passing run takes a fraction of them
DRAIN_TIMEOUT = 120.0


def start(nodes: list[Child], url: str, node: str, log: Path, *args: str) -> Child:
    child = Child(url, node, *args, log=log)  # type: ignore[arg-type]
    nodes.append(child)
    return child


def executions(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.02)


def database(url: str) -> str:
    return url.rsplit("/", 1)[1]


def by_status(server: PostgresServer, url: str) -> dict[str, int]:
    out = server.sql("SELECT status, COUNT(*) FROM runs GROUP BY status", database(url))
    return {s: int(n) for s, n in (line.split("|") for line in out.splitlines() if line)}


def test_three_nodes_execute_each_run_once_and_share_the_work(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    log = tmp_path / "exec.log"
    # runs that take a while (20 ms on average, 5 at a time per node): the three need about
    # 4 s, so a node the machine's load holds back for a moment still gets its share
    common = ("--quiet", "--sleep", "0.02", "--max-concurrency", "5", "--lease-ttl", "30", "--poll", "1")
    drain = ("run", "--until-drained", "--expect", str(CLUSTER_RUNS))
    a = start(nodes, postgres_url, "node-a", log, *common, *drain)
    b = start(nodes, postgres_url, "node-b", log, *common, *drain)
    a.event("started")
    b.event("started")
    # the third node submits everything in one batch; the others hear of it by notification
    c = start(nodes, postgres_url, "node-c", log, *common, "run", "--submit", "work", "--count", str(CLUSTER_RUNS),
              "--until-drained", "--expect", str(CLUSTER_RUNS))  # fmt: skip
    for child in (a, b, c):
        child.event("stopped", timeout=DRAIN_TIMEOUT)
        assert child.proc.wait(timeout=30) == 0

    lines = executions(log)
    per_run = Counter(line["run"] for line in lines)
    assert len(per_run) == CLUSTER_RUNS
    assert set(per_run.values()) == {1}, [r for r, n in per_run.items() if n > 1][:5]
    per_node = Counter(line["node"] for line in lines)
    reports = [child.of("drained") + child.of("recovered")[:3] for child in (a, b, c)]
    assert set(per_node) == {"node-a", "node-b", "node-c"}, reports
    assert min(per_node.values()) >= CLUSTER_RUNS // 20, per_node
    assert by_status(postgres_server, postgres_url) == {"succeeded": CLUSTER_RUNS}
    assert postgres_server.sql("SELECT COUNT(*) FROM runs WHERE attempt <> 1", database(postgres_url)) == "0"


def test_a_killed_nodes_runs_finish_on_the_others(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    ttl = 1.0
    runs = 240
    log = tmp_path / "exec.log"
    common = ("--quiet", "--sleep", "0.3", "--max-concurrency", "8", "--lease-ttl", str(ttl), "--poll", "0.2")
    drain = ("run", "--until-drained", "--expect", str(runs))
    victim = start(nodes, postgres_url, "victim", log, *common, *drain)
    b = start(nodes, postgres_url, "node-b", log, *common, *drain)
    victim.event("started")
    b.event("started")
    a = start(nodes, postgres_url, "node-a", log, *common, "run", "--submit", "work", "--count", str(runs),
              "--until-drained", "--expect", str(runs))  # fmt: skip

    def victim_busy() -> bool:
        return sum(1 for line in executions(log) if line["node"] == "victim") >= 10

    try:
        wait_until(victim_busy, 60, "the victim executed some runs")
    except AssertionError as exc:
        per_node = Counter(line["node"] for line in executions(log))
        raise AssertionError(
            f"{exc}; executions per node: {dict(per_node)}; victim's last lines: {victim.lines[-8:]}"
        ) from None
    os.kill(victim.proc.pid, signal.SIGKILL)
    killed_at = time.time()
    assert victim.proc.wait(timeout=30) == -signal.SIGKILL
    for child in (a, b):
        child.event("stopped", timeout=DRAIN_TIMEOUT)

    assert by_status(postgres_server, postgres_url) == {"succeeded": runs}
    lines = executions(log)
    by_victim = {line["run"] for line in lines if line["node"] == "victim"}
    recovered = [line for child in (a, b) for line in child.of("recovered")]
    assert recovered, "the victim held runs when it was killed"
    assert all(r["action"] == "requeued" for r in recovered)
    # the victim's claims: runs it was executing, and runs claimed in its last batch whose
    # attempt had not begun (nothing logged yet) when the kill came
    assert all(r["from_node"] == "victim" for r in recovered), recovered
    assert {r["id"] for r in recovered} & by_victim, "it was executing some of them"
    # each run it held was run again elsewhere, as attempt 2, and succeeded there
    again = [line for line in lines if line["run"] in {r["id"] for r in recovered} and line["node"] != "victim"]
    assert {line["run"] for line in again} == {r["id"] for r in recovered}
    assert all(line["attempt"] == 2 for line in again)
    # recovered once the lease ran out (plus one heartbeat, and slack for a loaded machine)
    latest = max(r["t"] for r in recovered)
    assert latest - killed_at < ttl + ttl / 3 + 5.0


def test_a_paused_nodes_late_finish_is_refused(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    ttl = 1.0
    log = tmp_path / "exec.log"
    common = ("--quiet", "--max-concurrency", "4", "--lease-ttl", str(ttl), "--poll", "0.2")
    # its runs take 2 to 6 s: none can end before the pause, however slow the machine
    paused = start(nodes, postgres_url, "paused", log, *common, "--sleep", "4", "run", "--submit", "work", "--count", "4")
    paused.event("submitted")
    wait_until(lambda: len(executions(log)) >= 4, 30, "the paused node runs all four")
    os.kill(paused.proc.pid, signal.SIGSTOP)
    try:
        other = start(nodes, postgres_url, "other", log, *common, "--sleep", "0.2", "run", "--until-drained", "--expect", "4")
        other.event("drained", timeout=60)  # it recovered and finished all four
    finally:
        os.kill(paused.proc.pid, signal.SIGCONT)
    # resumed: its attempts end (or learn from a heartbeat that their claims are gone); none is recorded
    assert paused.proc.stdin is not None
    paused.proc.stdin.close()
    paused.event("stopped", timeout=30)
    db = database(postgres_url)
    rows = postgres_server.sql("SELECT status, owner_node, attempt FROM runs ORDER BY seq", db).splitlines()
    assert rows == ["succeeded|other|2"] * 4
    assert not paused.of("succeeded")  # --quiet prints none; the check is the database's


async def test_a_server_restart_under_load_loses_no_run(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    runs = 600
    log = tmp_path / "exec.log"
    common = ("--quiet", "--sleep", "0.05", "--max-concurrency", "8", "--lease-ttl", "3", "--poll", "0.2")
    drain = ("run", "--until-drained", "--expect", str(runs))
    b = start(nodes, postgres_url, "node-b", log, *common, *drain)
    b.event("started")
    a = start(nodes, postgres_url, "node-a", log, *common, "run", "--submit", "work", "--count", str(runs),
              "--until-drained", "--expect", str(runs))  # fmt: skip
    wait_until(lambda: len(executions(log)) >= runs // 5, 60, "a fifth of the runs executed")
    await asyncio.to_thread(postgres_server.restart)  # every connection of both nodes is cut
    for child in (a, b):
        child.event("stopped", timeout=DRAIN_TIMEOUT)
        assert child.proc.wait(timeout=30) == 0
    assert by_status(postgres_server, postgres_url) == {"succeeded": runs}
    assert {line["run"] for line in executions(log)} == set(
        postgres_server.sql("SELECT id FROM runs", database(postgres_url)).split()
    )


async def test_an_idle_node_is_woken_by_another_nodes_insert(postgres_url: str) -> None:
    worker = Engine(store=postgres_url, node_id="worker", poll_interval=60, lease_ttl=30, health_interval=None)
    ran = asyncio.Event()

    @worker.task
    async def job(ctx: TaskContext) -> None:
        ran.set()

    producer = PostgresStore(postgres_url)  # a node that only inserts (a web app, say)
    # the worker's first claim (finding nothing) went out while the producer was connecting
    async with worker, producer:
        await producer.insert([NewRun("job")])
        # the worker polls once a minute: a run started this soon was pushed to it
        async with asyncio.timeout(10):
            await ran.wait()


async def test_a_capped_tasks_backlog_runs_on_without_waiting_for_a_poll(postgres_url: str) -> None:
    # one at a time: each run's slot frees as its attempt ends, before the store has its
    # outcome; the next claim must follow the outcome's write, not the next poll a minute on
    engine = Engine(store=postgres_url, node_id="capped", poll_interval=60, lease_ttl=30, health_interval=None)

    @engine.task(concurrency=1)
    async def one_at_a_time(ctx: TaskContext) -> None:
        return None

    async with engine:
        handles = await engine.submit_many([("one_at_a_time", None)] * 5)
        async with asyncio.timeout(20):
            records = await asyncio.gather(*(h.wait() for h in handles))
    assert [r.status.value for r in records] == ["succeeded"] * 5


async def test_every_retry_is_recorded_even_when_its_run_is_claimed_again_at_once(postgres_url: str) -> None:
    # with no backoff, a failed attempt's run is pending again the moment the store has its
    # outcome, and the next claim (another round trip) can come back before this node hears
    # that the write landed: the retry must still be counted and published, before attempt 2
    engine = Engine(store=postgres_url, node_id="n", max_concurrency=16, poll_interval=0.02, health_interval=None)
    order: dict[str, list[str]] = {}
    engine.bus.add_callback(lambda ev: order.setdefault(ev.run_id, []).append(f"{ev.kind}:{getattr(ev, 'attempt', '')}"),
                            kinds=["run.retrying", "run.started"])  # fmt: skip

    @engine.task(retries=1, backoff=0.0)
    async def flaky(ctx: TaskContext) -> str:
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt fails")
        return "ok"

    async with engine:
        handles = await engine.submit_many([("flaky", None)] * 1_000)
        async with asyncio.timeout(60):
            records = await asyncio.gather(*(h.wait() for h in handles))
        retries = engine.stats().retries_total
    assert {(r.status.value, r.attempt) for r in records} == {("succeeded", 2)}
    assert retries == 1_000
    wrong = {run_id: kinds for run_id, kinds in order.items()
             if kinds != ["run.started:1", "run.retrying:2", "run.started:2"]}  # fmt: skip
    assert not wrong and len(order) == 1_000, list(wrong.items())[:3]


async def test_cancel_from_a_node_that_does_not_own_the_run(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    log = tmp_path / "exec.log"
    # heartbeats 10 s apart: a cancel seen sooner came by notification
    owner = start(nodes, postgres_url, "owner", log, "--lease-ttl", "30", "run", "--submit", "hang", "--count", "1")
    owner.event("started")
    (run_id,) = owner.event("submitted")["ids"]
    wait_until(lambda: any(line["run"] == run_id for line in executions(log)), 30, "the owner runs it")

    observer = Engine(store=postgres_url, node_id="observer", lease_ttl=30, health_interval=None)
    async with observer:
        record = await observer.cancel(run_id)
        # its owner stops it when told, and the cancel waits for that, as for a run of its own
        assert record.status.value == "cancelled" and record.node == "owner"
        line = owner.event("cancelled", timeout=10.0)
        assert line["id"] == run_id
        stored = await observer.store.get(run_id)
        assert stored is not None and stored.status.value == "cancelled" and stored.node == "owner"
    assert owner.proc.stdin is not None
    owner.proc.stdin.close()
    owner.event("stopped", timeout=30)


async def test_runs_finished_elsewhere_and_pruned_before_this_node_looked_do_not_stay_pending(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    # the node that submitted them hears of them only after the executing node's history has
    # pruned them: their outcome is gone, but a wait must end, and they must not stay pending
    # here for good (holding places of max_queue and of every catch-up round)
    log = tmp_path / "exec.log"
    worker = start(nodes, postgres_url, "worker", log, "--history", "5", "--quiet", "run")
    worker.event("started")
    submitter = Engine(store=postgres_url, node_id="submitter", max_queue=30, health_interval=None)

    async def work(ctx: TaskContext) -> None: ...

    submitter.register(work, name="work", resources=("a resource only the worker has",))
    async with submitter:
        handles = await submitter.submit_many([("work", None)] * 20)
        # held up (synchronous code on its loop, say) while the worker runs them and prunes
        db = database(postgres_url)
        wait_until(lambda: len(executions(log)) == 20, 60, "the worker ran them all")
        wait_until(lambda: postgres_server.sql("SELECT COUNT(*) FROM runs", db) == "5", 30, "history pruned")
        async with asyncio.timeout(30):
            outcomes = await asyncio.gather(*(h.wait() for h in handles), return_exceptions=True)
        assert all(isinstance(o, RunNotFound) or o.status.value == "succeeded" for o in outcomes), outcomes
        assert sum(isinstance(o, RunNotFound) for o in outcomes) >= 15
        await eventually(lambda: submitter.stats().by_status["pending"] == 0, timeout=10)
        # the places they held are free again
        more = await submitter.submit_many([("work", None)] * 30)
        assert len(more) == 30


def test_a_periodic_slot_fires_once_across_three_nodes(
    postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    every = 1.0
    log = tmp_path / "exec.log"
    common = ("--periodic", str(every), "--lease-ttl", "10", "--poll", "0.1", "run")

    def ticks() -> list[dict[str, Any]]:
        return [line for line in executions(log) if line["task"] == "tick"]

    first = start(nodes, postgres_url, "node-a", log, *common)
    wait_until(lambda: len(ticks()) >= 1, 30, "the first tick")
    # the others start from the slot the store recorded, so all three follow the same slots
    others = [start(nodes, postgres_url, f"node-{n}", log, *common) for n in "bc"]
    for child in others:
        child.event("started")
    seen = len(ticks())
    wait_until(lambda: len(ticks()) >= seen + 5, 30, "five more ticks")
    for child in (first, *others):
        assert child.proc.stdin is not None
        child.proc.stdin.close()
    for child in (first, *others):
        child.event("stopped", timeout=30)

    fired = ticks()
    times = sorted(line["t"] for line in fired)
    t0 = times[0]
    # three nodes, one schedule: about one tick per slot, not three
    assert len(fired) <= round((times[-1] - t0) / every) + 1, times
    # a slot fired by two nodes would run twice within moments (they wake at the same
    # slot time); slots are a second apart, and a tick late by most of a second on a
    # loaded machine still leaves its successor more than this gap behind it
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert min(gaps) > 0.1 * every, [(round(a - t0, 3), round(b - t0, 3)) for a, b in zip(times, times[1:])]


def test_a_tasks_concurrency_holds_across_nodes(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    runs = 24
    db = database(postgres_url)
    postgres_server.sql("CREATE TABLE gauge (running INTEGER NOT NULL, peak INTEGER NOT NULL)", db)
    postgres_server.sql("INSERT INTO gauge VALUES (0, 0)", db)
    log = tmp_path / "exec.log"
    # the nodes have room for 4 runs at once together (2 each); the task allows 3 in the whole
    # cluster. Neither node can fill the cap alone, so the other always has room for at least
    # one run however the claims race: both execute, and a cap held per node only would show
    # as a peak of 4
    common = ("--quiet", "--sleep", "0.2", "--cap", "3", "--lease-ttl", "30", "--poll", "0.05")
    drain = ("run", "--until-drained", "--expect", str(runs))
    b = start(nodes, postgres_url, "node-b", log, *common, "--max-concurrency", "2", *drain)
    b.event("started")
    a = start(nodes, postgres_url, "node-a", log, *common, "--max-concurrency", "2", "run", "--submit", "capped",
              "--count", str(runs), "--until-drained", "--expect", str(runs))  # fmt: skip
    for child in (a, b):
        child.event("stopped", timeout=DRAIN_TIMEOUT)
        assert child.proc.wait(timeout=30) == 0
    assert by_status(postgres_server, postgres_url) == {"succeeded": runs}
    running, peak = (int(v) for v in postgres_server.sql("SELECT running, peak FROM gauge", db).split("|"))
    assert running == 0 and peak <= 3, peak
    per_node = Counter(line["node"] for line in executions(log))
    assert set(per_node) == {"node-a", "node-b"}, per_node


def test_max_queue_holds_across_nodes(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    limit = 40
    # one slot per node, taken by a run that never ends: everything else stays queued
    # (the stop does not wait out its default drain for those)
    common = ("--wait-go", "--max-concurrency", "1", "--max-queue", str(limit), "--lease-ttl", "30", "--stop-timeout", "0.5")
    fillers = [start(nodes, postgres_url, f"node-{n}", tmp_path / "exec.log", *common, "fill") for n in "ab"]
    for child in fillers:
        child.event("ready")
    for child in fillers:
        child.go()
    reports = [child.event("full", timeout=60) for child in fillers]
    db = database(postgres_url)
    # a node's one slot may be taken only after both were refused (its executor claims on its
    # own schedule), so look once each node runs its one run: every accepted submit is then
    # either running or pending, and the refusals came with the cluster's queue at the limit
    # (less at most the runs claimed since)
    wait_until(lambda: postgres_server.sql("SELECT COUNT(*) FROM runs WHERE status = 'running'", db) == "2", 30, "each node runs one")
    pending = int(postgres_server.sql("SELECT COUNT(*) FROM runs WHERE status = 'pending'", db))
    assert sum(r["accepted"] for r in reports) == pending + 2
    assert limit - 2 <= pending <= limit, pending
    for r in reports:
        assert f"({limit} items waiting)" in r["error"] and "every node" in r["error"], r["error"]
    for child in fillers:
        assert child.proc.stdin is not None
        child.proc.stdin.close()
    for child in fillers:
        child.event("stopped", timeout=30)


def test_a_node_cut_off_from_the_database_steps_down_and_comes_back(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    ttl = 1.0
    log = tmp_path / "exec.log"
    node = start(nodes, postgres_url, "node-a", log, "--leader", "--sleep", "60", "--max-concurrency", "4",
                 "--lease-ttl", str(ttl), "--poll", "0.2", "--stop-timeout", "0.5",
                 "run", "--submit", "work", "--count", "2")  # fmt: skip
    node.event("lease.acquired")
    ids = set(node.event("submitted")["ids"])
    wait_until(lambda: {line["run"] for line in executions(log)} == ids, 30, "both runs started")
    mark = node.mark()
    postgres_server.stop("fast")
    try:
        down = node.wait_for(lambda line: line.get("ev") == "store.unreachable", 30, start=mark)
        assert set(down["stopped"]) == ids
        assert down["seconds"] >= ttl
        # both attempts were cancelled where they ran, and the node no longer leads
        wait_until(lambda: {line["id"] for line in node.since(mark, "interrupted")} == ids, 10, "both runs stopped")
        node.wait_for(lambda line: line.get("ev") == "lease.lost", 10, start=mark)
    finally:
        postgres_server.start()
    back = node.wait_for(lambda line: line.get("ev") == "store.reachable", 30, start=mark)
    assert back["seconds"] >= ttl
    node.wait_for(lambda line: line.get("ev") == "lease.acquired", 30, start=node.lines.index(back))
    # the runs it stopped are queued again and run once more, as their next attempt
    wait_until(lambda: Counter(line["run"] for line in executions(log)) == {i: 2 for i in ids}, 30, "both ran again")
    assert sorted(line["attempt"] for line in executions(log)) == [1, 1, 2, 2]
    assert node.proc.stdin is not None
    node.proc.stdin.close()
    node.event("stopped", timeout=30)


async def test_a_node_cut_off_from_the_database_gives_up_a_lease_it_could_keep(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    lease = InProcessLease(ttl=0.6)  # always reachable: only the database is not
    engine = Engine(store=postgres_url, node_id="a", lease=lease, lease_ttl=1.0, health_interval=None)
    seen: list[Any] = []
    engine.bus.add_callback(seen.append, ["lease.", "store."])

    async def until(kind: str, timeout: float = 30.0) -> None:
        async with asyncio.timeout(timeout):
            while not any(e.kind == kind for e in seen):
                await asyncio.sleep(0.02)

    async with engine:
        assert engine.leadership().is_leader
        await asyncio.to_thread(postgres_server.stop, "fast")
        try:
            await until("store.unreachable")
            assert not engine.leadership().is_leader
            async with asyncio.timeout(5):
                while await lease.holder() is not None:  # released, not left to lapse
                    await asyncio.sleep(0.02)
        finally:
            await asyncio.to_thread(postgres_server.start)
        await until("store.reachable")
        async with asyncio.timeout(10):
            while not engine.leadership().is_leader:
                await asyncio.sleep(0.02)
    kinds = [e.kind for e in seen if e.kind != "lease.renewed"]
    down, up = kinds.index("store.unreachable"), kinds.index("store.reachable")
    assert kinds[0] == "lease.acquired" and "lease.lost" in kinds[:down + 1]
    # it competed for nothing while it was cut off, and led again once back
    assert "lease.acquired" not in kinds[down:up] and "lease.acquired" in kinds[up:]


async def test_runs_cut_off_by_an_outage_are_requeued_without_a_traceback_each(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the outage is reported once (store.unreachable, and the store's own log): each run cut off
    # is not worth a warning and a driver traceback of its own, as it is not lost
    engine = Engine(store=postgres_url, node_id="a", lease_ttl=1.0, health_interval=None)
    seen: list[Any] = []
    engine.bus.add_callback(seen.append, ["store."])
    started: list[int] = []

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        started.append(ctx.attempt)
        await asyncio.Event().wait()

    async with engine:
        handles = [await engine.submit("slow") for _ in range(4)]
        await eventually(lambda: len(started) == 4, timeout=30)
        caplog.clear()
        caplog.set_level(logging.INFO, "taskwatch.engine")

        def requeue_given_up() -> bool:
            # the write putting a cut-off run back gave up on the database (it tries for lease_ttl)
            return any("re-queue was not written" in r.getMessage() or "outcome to the store failed" in r.getMessage()
                       for r in caplog.records)  # fmt: skip

        await asyncio.to_thread(postgres_server.stop, "fast")
        try:
            await eventually(lambda: any(e.kind == "store.unreachable" for e in seen), timeout=30)
            await eventually(requeue_given_up, timeout=30)
        finally:
            await asyncio.to_thread(postgres_server.start)
        # back once the database answers: each run runs again, as attempt 2
        await eventually(lambda: sorted(started) == [1] * 4 + [2] * 4, timeout=60)
        cut = next(e for e in seen if e.kind == "store.unreachable")
        assert sorted(cut.stopped) == sorted(h.id for h in handles)
        for handle in handles:
            await engine.cancel(handle.id)
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING and r.exc_info is not None]
    assert noisy == [], [r.getMessage() for r in noisy]


async def test_a_stop_while_the_database_is_down_keeps_what_it_accepted_and_leaves_the_rest_to_recovery(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # lease_ttl 30 s: each write retries for up to 30 s. Accepted work that exists nowhere else yet
    # (runs from submit_nowait, queued jobs) waits for the database as long as that; the stop's own
    # writes (the outcomes of the runs it cuts, putting them back, the node's end) do not, each
    # one used to take a whole period
    engine = Engine(store=postgres_url, node_id="a", lease_ttl=30.0, cancel_grace=0.5, health_interval=None)
    started: list[int] = []
    handled: list[int] = []

    @engine.task
    async def slow(ctx: TaskContext) -> None:
        started.append(ctx.attempt)
        await asyncio.Event().wait()

    @engine.task
    async def quick(ctx: TaskContext) -> None:
        pass

    async def handle(job: dict[str, int]) -> None:
        handled.append(job["i"])

    queue = engine.queue("jobs", handle)
    await engine.start()
    cut = await engine.submit_many([("slow", None)] * 3)
    async with asyncio.timeout(10):
        while len(started) < 3:
            await asyncio.sleep(0.02)
    await asyncio.to_thread(postgres_server.stop, "fast")
    try:
        engine.pause_queue("jobs")
        accepted = [engine.submit_nowait("quick") for _ in range(3)]
        for i in range(3):
            queue.put_nowait({"i": i})

        async def back_soon() -> None:
            await asyncio.sleep(3.0)  # a restart well within reconnect_timeout
            await asyncio.to_thread(postgres_server.start)

        restart = asyncio.ensure_future(back_soon())
        async with asyncio.timeout(20):  # the old stop took about 3 x 30 s here
            await engine.stop(0.5)
        assert engine.state == "stopped"
    finally:
        await restart
    # the same engine object starts again: its runs are taken back at once, not after their lease
    engine.resume_queue("jobs")
    async with engine:
        async with asyncio.timeout(15):
            while len(started) < 6 or len(handled) < 3:
                await asyncio.sleep(0.02)
            for handle in accepted:
                assert (await engine.wait_for(handle.id, timeout=10)).status is RunStatus.SUCCEEDED
        assert sorted(started) == [1, 1, 1, 2, 2, 2] and sorted(handled) == [0, 1, 2]
        for handle in cut:
            await engine.cancel(handle.id)


async def test_runs_taken_over_from_a_killed_node_show_running_with_progress_on_the_survivor(
    postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    # the survivor's claim loop may take a recovered run before the recovery's own note of it
    # is read: the run then runs here, and must be shown running here, its progress told (a
    # race: a survivor that read the note too late showed such runs pending, about one run in three)
    log = tmp_path / "exec.log"
    count = 40
    victim = start(nodes, postgres_url, "victim", log, "--quiet", "--sleep", "60", "--max-concurrency", str(count),
                   "--lease-ttl", "1.0", "--poll", "0.2", "run", "--submit", "work", "--count", str(count))  # fmt: skip
    wait_until(lambda: len(executions(log)) >= count, 60, "the victim runs every run")
    release = asyncio.Event()
    survivor = Engine(store=f"{postgres_url}?lease_ttl=1.0", node_id="survivor", max_concurrency=2 * count,
                      poll_interval=0.01, health_interval=None)  # fmt: skip
    progressed: set[str] = set()

    @survivor.task
    async def work(ctx: TaskContext) -> None:
        await ctx.progress(1, 2, "taken over")
        await release.wait()

    survivor.bus.add_callback(lambda event: progressed.add(event.run_id), ["run.progress"])  # type: ignore[union-attr]
    async with survivor:
        os.kill(victim.proc.pid, signal.SIGKILL)
        assert victim.proc.wait(timeout=30) == -signal.SIGKILL
        ids = {line["run"] for line in executions(log)}
        try:
            await eventually(lambda: progressed == ids, timeout=30.0)
            assert {survivor.get(run_id).status for run_id in ids} == {RunStatus.RUNNING}
            assert {survivor.get(run_id).node for run_id in ids} == {"survivor"}
            assert survivor.stats().running == count and survivor.stats().queue_depth == 0
        finally:
            release.set()
        for run_id in ids:
            assert (await survivor.handle(run_id).wait(10)).attempt == 2


async def test_a_cancel_from_another_node_leaves_the_record_the_store_has(postgres_url: str) -> None:
    # the run failed its first attempt on the worker and waits there for its retry: the node
    # that cancels it must show that attempt, its start and its error, as the store does
    worker = Engine(store=postgres_url, node_id="worker", health_interval=None)
    asker = Engine(store=postgres_url, node_id="asker", health_interval=None)
    tried = asyncio.Event()

    @worker.task(retries=1, backoff=60.0, name="flaky")
    async def flaky(ctx: TaskContext) -> None:
        tried.set()
        raise RuntimeError("the first attempt fails")

    async def elsewhere(ctx: TaskContext) -> None: ...

    # the submitting node's declaration is the one a run carries (its attempts, here two)
    asker.register(elsewhere, name="flaky", retries=1, backoff=60.0, resources=("a resource only the worker has",))
    async with worker, asker:
        handle = await asker.submit("flaky")
        async with asyncio.timeout(10):
            await tried.wait()
        await eventually(lambda: worker.get(handle.id).attempt == 2, timeout=10)
        record = await asker.cancel(handle.id)
        stored = await asker.store.get(handle.id)
        assert stored is not None
        assert record.status.value == "cancelled" and record.attempt == 2 == stored.attempt
        assert record.error is not None and record.error.message == "the first attempt fails"
        assert record.started_at == stored.started_at is not None
        assert (await handle.wait()).status.value == "cancelled"

        # a run that finished there before the cancel came: refused, and shown as it ended
        @worker.task(name="quick")
        async def quick(ctx: TaskContext) -> str:
            return "done"

        asker.register(elsewhere, name="quick", resources=("a resource only the worker has",))
        done = await asker.submit("quick")
        async with asyncio.timeout(10):
            while (await worker.fetch_run(done.id)).status.value != "succeeded":
                await asyncio.sleep(0.01)
        with pytest.raises(RunNotCancellable):
            await asker.cancel(done.id)
        assert asker.get(done.id).status.value == "succeeded" and asker.get(done.id).result == "done"


def test_a_paused_node_replaced_by_a_restart_under_its_id_steps_down_when_resumed(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    # node-b hangs (SIGSTOP) and is restarted under the same node id; then the hung process comes
    # back to life. The store counts its incarnation gone, so whatever it claimed would be taken
    # over at once and run twice: it must notice, claim nothing more, and say so
    runs = 40
    log = tmp_path / "exec.log"
    common = ("--quiet", "--sleep", "0.3", "--max-concurrency", "4", "--lease-ttl", "1", "--poll", "0.1")
    old = start(nodes, postgres_url, "node-b", log, *common, "--errors", "run")
    old.event("started")
    os.kill(old.proc.pid, signal.SIGSTOP)
    try:
        new = start(nodes, postgres_url, "node-b", log, *common, "run")
        new.event("started")
    finally:
        os.kill(old.proc.pid, signal.SIGCONT)
    a = start(nodes, postgres_url, "node-a", log, *common, "run", "--submit", "work", "--count", str(runs),
              "--until-drained", "--expect", str(runs))  # fmt: skip
    a.event("stopped", timeout=60)

    lines = executions(log)
    per_run = Counter(line["run"] for line in lines)
    assert len(per_run) == runs
    assert set(per_run.values()) == {1}, {r: n for r, n in per_run.items() if n > 1}
    assert old.proc.pid not in {line["pid"] for line in lines}
    assert by_status(postgres_server, postgres_url) == {"succeeded": runs}
    assert postgres_server.sql("SELECT COUNT(*) FROM runs WHERE attempt <> 1", database(postgres_url)) == "0"
    # the old process announced it, told the operator what to do, and lives on until stopped
    assert old.of("node.superseded") and not new.of("node.superseded")
    told = [line["message"] for line in old.of("log") if "same node_id" in line["message"]]
    assert told and "no longer claims" in told[0], old.of("log")
    assert old.proc.poll() is None
    for child in (old, new):
        assert child.proc.stdin is not None
        child.proc.stdin.close()
    for child in (old, new):
        child.event("stopped", timeout=30)
