"""A database outage longer than the node TTL, with two healthy nodes sharing one PostgreSQL store.

While the server is down no node can heartbeat, so when it answers again every node's last
heartbeat is older than the TTL. That silence is the database's, not the nodes': no node may
judge another dead for it. What the test proves, with real processes and the real server
stopped and started again:

- the runs cut off by the outage go back to pending once (handed back by their node, or
  recovered by either as their lease ran out: at most one loss), are run again once
  (attempt 2), and succeed; neither node takes them from the other as ``owner_silent``
  while the other is running them;
- attempt 2 starts only after attempt 1 was stopped: one node at a time runs a run.

And, store by store (two :class:`PostgresStore` objects stand for two nodes):

- a heartbeat that waited out the outage and got through at its end counts from then: a node
  that opens its store just after the outage takes nothing from the node that sent it (the
  heartbeat wrote the time its call began, so the node looked silent, and its renewed claims
  already expired); the outage is logged once (not once per operation meeting it);
- a node that saw the outage judges no other node silent until a node TTL has passed since
  the database answered it again (the other holds a claim from before the outage, and claims
  nothing more until a heartbeat of its own got through); a node that stays silent after that
  is judged so, and its run recovered.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, TaskContext
from taskwatch.engine.runs import RunStatus
from taskwatch.engine.store import NewRun, PostgresStore, Succeeded

from .cutting_proxy import StallingProxy
from .postgres_server import PostgresServer
from .test_cluster import database, executions, start, wait_until
from .helpers import eventually
from .test_durable import Child

#: the lease and node TTL of both nodes, and how long the server stays down (well past it)
TTL = 2.0
OUTAGE = 5.0


class Gated:
    """Registers the task "work" on ``engine``: each run counts itself (``ran``), says it
    ``started``, waits for ``finish`` and returns its count."""

    def __init__(self, engine: Engine) -> None:
        self.started, self.finish = asyncio.Event(), asyncio.Event()
        self.ran = 0

        @engine.task
        async def work(ctx: TaskContext) -> int:
            self.ran += 1
            self.started.set()
            await self.finish.wait()
            return self.ran


def run_rows(server: PostgresServer, url: str) -> dict[str, tuple[str, int, int]]:
    out = server.sql("SELECT id, status, attempt, lost_count FROM runs", database(url))
    rows = (line.split("|") for line in out.splitlines() if line)
    return {run_id: (status, int(attempt), int(lost)) for run_id, status, attempt, lost in rows}


async def test_an_outage_of_the_database_costs_each_run_one_attempt_and_no_node_takes_the_others_runs(
    postgres_server: PostgresServer, postgres_url: str, tmp_path: Path, nodes: list[Child]
) -> None:
    log = tmp_path / "exec.log"
    # runs of 4 to 12 s: each outlives the moment its node is cut off, and its next attempt ends soon after
    common = ("--sleep", "8", "--max-concurrency", "4", "--lease-ttl", str(TTL), "--poll", "0.2")
    b = start(nodes, postgres_url, "node-b", log, *common, "run")
    b.event("started")
    a = start(nodes, postgres_url, "node-a", log, *common, "run", "--submit", "work", "--count", "2")
    ids = set(a.event("submitted")["ids"])
    wait_until(lambda: {line["run"] for line in executions(log)} == ids, 30, "both runs started")

    await asyncio.to_thread(postgres_server.stop, "fast")
    down_at = time.time()
    try:
        # past the TTL: the owner is cut off and stops its runs, and every node's heartbeat is stale
        await asyncio.to_thread(wait_until, lambda: time.time() - down_at >= OUTAGE, OUTAGE + 5, "the outage")
    finally:
        await asyncio.to_thread(postgres_server.start)

    def ended() -> bool:
        rows = run_rows(postgres_server, postgres_url)
        return len(rows) == 2 and all(status in ("succeeded", "failed", "cancelled") for status, _, _ in rows.values())

    await asyncio.to_thread(wait_until, ended, 30, "both runs ended")
    rows = run_rows(postgres_server, postgres_url)
    recovered = [line for child in (a, b) for line in child.of("recovered")]
    # each run lost the attempt the outage cut, and only that one (counted as lost at most once)
    assert {run_id: (status, attempt) for run_id, (status, attempt, _) in rows.items()} == {
        run_id: ("succeeded", 2) for run_id in ids
    }, (rows, recovered)
    assert all(lost <= 1 for _, _, lost in rows.values()), (rows, recovered)
    assert all(line["reason"] != "owner_silent" for line in recovered), recovered
    runs: dict[str, list[int]] = defaultdict(list)
    started_at: dict[tuple[str, int], float] = {}
    for line in executions(log):
        runs[line["run"]].append(line["attempt"])
        started_at[line["run"], line["attempt"]] = line["t"]
    assert {run_id: sorted(attempts) for run_id, attempts in runs.items()} == {i: [1, 2] for i in ids}
    # attempt 1 was stopped where it ran before attempt 2 began (on either node)
    stopped = {line["id"]: line["t"] for child in (a, b) for line in child.of("interrupted", attempt=1)}
    assert set(stopped) == ids
    for run_id in ids:
        assert stopped[run_id] <= started_at[run_id, 2], (run_id, stopped[run_id], started_at[run_id, 2])
    for child in (a, b):
        assert child.proc.stdin is not None
        child.proc.stdin.close()
    for child in (a, b):
        child.event("stopped", timeout=30)


async def outage(server: PostgresServer, seconds: float, *during: Awaitable[Any]) -> list[Any]:
    """Stop the server for ``seconds`` (the length of the outage: no sleep stands in for a wait
    here); ``during`` are operations begun while it is down. Their results, once it is back."""
    await asyncio.to_thread(server.stop, "fast")
    try:
        pending = [asyncio.ensure_future(op) for op in during]
        await asyncio.sleep(seconds)
    finally:
        await asyncio.to_thread(server.start)
    return list(await asyncio.gather(*pending))


async def test_a_heartbeat_that_waited_out_an_outage_counts_from_when_it_got_through(
    postgres_server: PostgresServer, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    a = PostgresStore(postgres_url, lease_ttl=TTL, reconnect_timeout=30)
    async with a:
        await a.register_node("a", "ia", "test")
        (run,) = await a.insert([NewRun("t")])
        (claim,) = await a.claim("a", "ia", 1, {"t": None})
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            # the executor's two heartbeats, begun while the server is down and retried until it is back
            await outage(
                postgres_server, TTL + 1.5, a.heartbeat("ia", [claim.token]), a.node_heartbeat("ia", 1)
            )
        # (the driver's pool logs its own tries to restore its idle connection: not ours to word)
        said = [
            (r.name, r.getMessage())
            for r in caplog.records
            if r.levelno >= logging.WARNING and r.name.startswith("taskwatch")
        ]
        assert len(said) == 1 and said[0][0] == "taskwatch.store.postgres" and "unreachable" in said[0][1], said
        # a node starting now saw no outage: it judges by what the rows say
        async with PostgresStore(postgres_url, lease_ttl=TTL) as b:
            assert await b.recover() == []
            stored = await b.get(run.id)
            assert stored is not None and stored.claim_token == claim.token and stored.lost_count == 0


async def test_after_an_outage_no_node_is_judged_silent_until_it_could_have_been_heard(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    node_ttl = TTL
    # claims held far longer than the node TTL: only a node judged silent loses its run
    a = PostgresStore(postgres_url, lease_ttl=30, node_ttl=node_ttl, reconnect_timeout=30)
    b = PostgresStore(postgres_url, lease_ttl=30, node_ttl=node_ttl, reconnect_timeout=30)
    async with a, b:
        await a.register_node("a", "ia", "test")
        await b.register_node("b", "ib", "test")
        (run,) = await a.insert([NewRun("t")])
        (claim,) = await a.claim("a", "ia", 1, {"t": None})
        # b's heartbeat meets the outage, and gets through when the server is back
        await outage(postgres_server, node_ttl + 1.5, b.node_heartbeat("ib", 0))
        back = time.monotonic()
        # a's last heartbeat is older than the node TTL, as every node's is: not silent for that
        assert await b.recover() == []
        # (a itself claims nothing more until a heartbeat of its own gets through: the others
        # may count it gone once they have had a node TTL to hear from it)
        await a.insert([NewRun("t")])
        assert await a.claim("a", "ia", 1, {"t": None}) == []
        stored = await b.get(run.id)
        assert stored is not None and stored.claim_token == claim.token

        # a stays silent: once a node TTL has passed since the database answered b, a is silent
        async def recovered() -> list[Any]:
            deadline = time.monotonic() + node_ttl + 5
            while time.monotonic() < deadline:
                if found := await b.recover():
                    return found
                await asyncio.sleep(0.05)
            raise AssertionError(f"a's run was not recovered within {node_ttl + 5} s of the outage's end")

        (item,) = await recovered()
        assert (item.run_id, item.reason, item.action) == (run.id, "owner_silent", "requeued")
        assert time.monotonic() - back >= node_ttl - 0.5


async def test_after_an_outage_a_claim_that_ran_out_through_it_stays_its_live_owners(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # no claim can be renewed while the database is down: just after it, the node back first
    # took the other's claims as lease_expired, and runs that node had finished meanwhile ran
    # a second time, their outcomes refused
    node_ttl = 3 * TTL
    a = PostgresStore(postgres_url, lease_ttl=TTL, node_ttl=node_ttl, reconnect_timeout=30)
    b = PostgresStore(postgres_url, lease_ttl=TTL, node_ttl=node_ttl, reconnect_timeout=30)
    async with a, b:
        await a.register_node("a", "ia", "test")
        await b.register_node("b", "ib", "test")
        (run,) = await a.insert([NewRun("t")])
        (claim,) = await a.claim("a", "ia", 1, {"t": None})
        # the outage outlasts the claim's lease (and b's first call after it is a recovery)
        (found,) = await outage(postgres_server, TTL + 1.5, b.recover())
        assert found == []
        assert await b.recover() == []
        # a's outcome, finished while the database was down, lands with its claim's token
        assert await a.finish(claim.token, Succeeded(result=1)) is RunStatus.SUCCEEDED
        stored = await b.get(run.id)
        assert stored is not None and (stored.status, stored.attempt, stored.lost_count) == (RunStatus.SUCCEEDED, 1, 0)


async def test_a_run_that_finishes_during_a_long_outage_has_its_outcome_written_once_it_is_over(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # its outcome write gave up once the claim's lease had run out through the outage (8 tries):
    # the succeeded run was then recovered and ran a second time
    store = PostgresStore(postgres_url, lease_ttl=TTL, node_ttl=3 * TTL, reconnect_timeout=0.3)
    engine = Engine(store=store, health_interval=None)
    work = Gated(engine)
    started, finish = work.started, work.finish

    async with engine:
        handle = await engine.submit("work")
        await asyncio.wait_for(started.wait(), 10)
        await asyncio.to_thread(postgres_server.stop, "fast")
        try:
            finish.set()  # it finishes while the database is down
            down_at = time.monotonic()
            assert engine.stats().cut_off_for is None
            # a health check sees the node cut off (it said "running" and nothing more)
            await eventually(lambda: (engine.stats().cut_off_for or 0) > TTL, timeout=4 * TTL)
            # long past the lease, and the 8 tries the write used to get
            await asyncio.to_thread(wait_until, lambda: time.monotonic() - down_at >= 4 * TTL, 5 * TTL, "the outage")
        finally:
            await asyncio.to_thread(postgres_server.start)
        await eventually(lambda: engine.stats().cut_off_for is None, timeout=30)
        record = await handle.wait(30)
        assert (record.status, record.result, record.attempt) == (RunStatus.SUCCEEDED, 1, 1)
        stored = await store.get(handle.id)
        assert stored is not None and (stored.status, stored.attempt, stored.lost_count) == (RunStatus.SUCCEEDED, 1, 0)
    assert work.ran == 1


@pytest.mark.parametrize("silence", ["past_the_step_down", "a_lease_and_a_second"])
async def test_after_a_silent_database_a_node_takes_no_claim_of_a_live_node_that_finished_meanwhile(
    postgres_server: PostgresServer, postgres_url: str, silence: str
) -> None:
    """The server paused (SIGSTOP: it answers nothing and refuses nothing) past the lease, while
    node a's run finishes. No operation of node b failed, they only waited, so b knew of no
    outage: its first recovery once the server answered took a's claim, whose lease had run
    out through the silence, and the run a had finished ran a second time, its outcome
    refused. b's step-down (its heartbeats unanswered for a lease), or a heartbeat answered
    only after its lease ran out (a silence too short for a step-down), now counts as the
    outage. a reaches the server through a proxy held a while longer, so that b looks first."""
    async with StallingProxy(postgres_server.port) as a_network:
        a = Engine(store=PostgresStore(a_network.url(postgres_url), lease_ttl=TTL, node_ttl=3 * TTL), node_id="a",
                   health_interval=None)  # fmt: skip
        b_store = PostgresStore(postgres_url, lease_ttl=TTL, node_ttl=3 * TTL)
        b = Engine(store=b_store, node_id="b", health_interval=None)
        work = Gated(a)
        started, finish = work.started, work.finish

        async with a, b:
            handle = await a.submit("work")
            await asyncio.wait_for(started.wait(), 10)
            await asyncio.to_thread(postgres_server.pause)
            paused_at = time.monotonic()
            try:
                finish.set()  # it finishes while the database is silent
                if silence == "past_the_step_down":
                    # both nodes step down: their heartbeats got no answer for a lease
                    await eventually(lambda: all((n.stats().cut_off_for or 0) > TTL for n in (a, b)), timeout=4 * TTL)
                else:
                    # past a's claim's lease, not long enough for a probe more and a step-down
                    await asyncio.to_thread(wait_until, lambda: time.monotonic() - paused_at >= TTL + 1.0, 2 * TTL, "the silence")
                a_network.hold()
            finally:
                await asyncio.to_thread(postgres_server.resume)
            try:
                await eventually(lambda: b.stats().cut_off_for is None, timeout=30)
                assert await b_store.recover() == []  # as b's maintenance does: a is alive
            finally:
                a_network.release()
            record = await handle.wait(30)
            assert (record.status, record.result, record.attempt) == (RunStatus.SUCCEEDED, 1, 1)
    assert work.ran == 1
