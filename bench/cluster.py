"""Cluster mode on PostgreSQL: throughput, bulk enqueue, two nodes against one, recovery time.

Starts a throwaway PostgreSQL server from the system's binaries (as the
tests do), or uses ``--url``. Each figure gets a fresh database. Prints:

- end-to-end no-op runs/s through one engine (concurrency 10): ``submit_many``
  of all runs, then every one claimed, executed and finished in the database;
- bulk enqueue: ``submit_many`` runs/s into the database (nothing claims them);
- the same no-op workload drained by two node processes against one;
- recovery time after ``kill -9`` of a node holding runs: from the kill until
  the other node has taken every one back, p50 and max over the trials,
  beside the lease TTL.

    python bench/cluster.py [--runs 5000] [--bulk 50000] [--trials 5] [--url postgresql://...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from taskwatch.engine import Engine, TaskContext  # noqa: E402

from tests.postgres_server import PostgresServer, start_server  # noqa: E402
from tests.test_durable import Child  # noqa: E402


class Databases:
    """Fresh databases on one server (ours, or the one ``--url`` names)."""

    def __init__(self, server: PostgresServer | None, url: str | None) -> None:
        self.server = server
        self.url = url
        self.n = 0

    @contextmanager
    def fresh(self) -> Iterator[str]:
        if self.server is None:
            assert self.url is not None
            yield self.url  # the caller's database: used as it is
            return
        self.n += 1
        name = f"bench_{self.n}"
        self.server.sql(f"CREATE DATABASE {name} TEMPLATE tw_template STRATEGY FILE_COPY")
        try:
            yield self.server.url(name)
        finally:
            self.server.sql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def end_to_end(url: str, n: int) -> tuple[float, float]:
    """(runs/s from submit to the last finish, submit_many runs/s) for ``n`` no-op runs."""
    engine = Engine(store=url, node_id="bench", max_concurrency=10, max_queue=n + 1, history=1000, health_interval=None)
    done = asyncio.Event()
    finished = 0

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    def count(event: object) -> None:
        nonlocal finished
        finished += 1
        if finished == n:
            done.set()

    engine.bus.add_callback(count, ["run.succeeded"])
    async with engine:
        start = time.perf_counter()
        await engine.submit_many([("nothing", None)] * n)
        submitted = time.perf_counter()
        await done.wait()
        end = time.perf_counter()
    return n / (end - start), n / (submitted - start)


async def bulk_enqueue(url: str, n: int, batch: int = 5000) -> float:
    """``submit_many`` runs/s while nothing is claimed (the only slot is held by a run that waits)."""
    engine = Engine(store=url, node_id="bench", max_concurrency=1, max_queue=n + 10, history=100, health_interval=None)
    gate = asyncio.Event()
    started = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        started.set()
        await gate.wait()

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    async with engine:
        await engine.submit("hold")
        await started.wait()
        begin = time.perf_counter()
        for i in range(0, n, batch):
            await engine.submit_many([("nothing", None)] * min(batch, n - i))
        elapsed = time.perf_counter() - begin
        gate.set()
        await engine.stop(timeout=0.1)
    return n / elapsed


def drain_with(url: str, nodes: int, n: int) -> float:
    """Runs/s of ``n`` no-op runs drained by ``nodes`` processes (one submits them all)."""
    common = ("--quiet", "--max-concurrency", "10", "--lease-ttl", "10", "--poll", "1")
    drain = ("run", "--until-drained", "--expect", str(n))
    helpers = [Child(url, f"helper-{i}", *common, *drain) for i in range(nodes - 1)]  # type: ignore[arg-type]
    for h in helpers:
        h.event("started", timeout=60)
    main = Child(url, "submitter", *common, "run", "--submit", "work", "--count", str(n),  # type: ignore[arg-type]
                 "--until-drained", "--expect", str(n))  # fmt: skip
    main.event("started", timeout=60)
    begin = time.perf_counter()  # the submit starts right after "started"
    main.event("drained", timeout=600)
    elapsed = time.perf_counter() - begin
    for child in (main, *helpers):
        child.event("stopped", timeout=60)
        child.proc.wait(timeout=60)
    return n / elapsed


def recovery_time(url: str, ttl: float) -> float:
    """Seconds from ``kill -9`` of a node holding runs until the survivor recovered all of them."""
    common = ("--sleep", "30", "--max-concurrency", "4", "--lease-ttl", str(ttl), "--poll", "0.2")
    victim = Child(url, "victim", *common, "run", "--submit", "work", "--count", "4")  # type: ignore[arg-type]
    victim.event("submitted", timeout=60)
    survivor = Child(url, "survivor", *common, "run")  # type: ignore[arg-type]
    survivor.event("started", timeout=60)
    time.sleep(0.5)  # let the victim claim its runs: nothing here is asserted, only measured
    os.kill(victim.proc.pid, signal.SIGKILL)
    killed = time.time()
    victim.proc.wait(timeout=30)
    for _ in range(4):
        survivor.event("recovered", timeout=60)
    last = max(line["t"] for line in survivor.of("recovered"))
    survivor.proc.kill()
    survivor.proc.wait(timeout=30)
    return last - killed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5000)
    p.add_argument("--bulk", type=int, default=50_000)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--ttl", type=float, default=1.0, help="lease TTL in the recovery trials")
    p.add_argument("--url", default=None, help="an existing database (else a throwaway server is started)")
    args = p.parse_args()

    server = None if args.url else start_server()
    dbs = Databases(server, args.url)
    try:
        version = (server.sql("SHOW server_version") if server else "?").split()[0]
        print(f"taskwatch cluster bench  {time.strftime('%Y-%m-%d')}  Python {platform.python_version()}  "
              f"PostgreSQL {version}  {os.cpu_count()} CPUs")  # fmt: skip
        with dbs.fresh() as url:
            e2e, submit = asyncio.run(end_to_end(url, args.runs))
        print(f"end to end, 1 node, concurrency 10: {e2e:10,.0f} no-op runs/s  ({args.runs:,} runs; their submit_many {submit:,.0f}/s)")
        with dbs.fresh() as url:
            bulk = asyncio.run(bulk_enqueue(url, args.bulk))
        print(f"bulk enqueue (submit_many):         {bulk:10,.0f} runs/s  ({args.bulk:,} runs, batches of 5,000)")
        with dbs.fresh() as url:
            one = drain_with(url, 1, args.runs)
        with dbs.fresh() as url:
            two = drain_with(url, 2, args.runs)
        print(f"1 node process:                     {one:10,.0f} runs/s")
        print(f"2 node processes:                   {two:10,.0f} runs/s  (x{two / one:.2f})")
        times = []
        for _ in range(args.trials):
            with dbs.fresh() as url:
                times.append(recovery_time(url, args.ttl))
        print(f"recovery after kill -9 (ttl {args.ttl:g} s):  p50 {statistics.median(times):.2f} s, "
              f"max {max(times):.2f} s over {len(times)} trials")  # fmt: skip
    finally:
        if server is not None:
            server.stop("fast")
            import shutil

            shutil.rmtree(server.root, ignore_errors=True)


if __name__ == "__main__":
    main()
