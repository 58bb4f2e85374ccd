"""Cluster mode on PostgreSQL: throughput beside procrastinate and SAQ, bulk enqueue, two
nodes against one, recovery time.

Starts a throwaway PostgreSQL server from the system's binaries (as the
tests do), or uses ``--url``. Each figure gets a fresh database. Prints:

- end-to-end no-op jobs/s with one worker at concurrency 10, for taskwatch,
  procrastinate and SAQ's PostgreSQL queue, measured one after the other in
  this run on the same server (peers from the ``bench`` extra; one that is
  not installed is skipped and says so). The worker is up and idle; the
  clock runs from the first enqueue (each library's batch call: taskwatch's
  ``submit_many``, procrastinate's ``batch_defer_async``; SAQ has none, so
  20 ``enqueue`` calls in flight, as SAQ's own benchmark does) until the
  database records the last job done. Then the same with every job queued
  before the worker starts (drain), and taskwatch's ratio to the faster peer
  for both. Each library runs once per round, rounds alternate, and the
  medians are printed (a shared machine's load moves between runs);
- bulk enqueue: ``submit_many`` runs/s into the database (nothing claims them);
- the same no-op workload drained by two node processes against one;
- recovery time after ``kill -9`` of a node holding runs: from the kill until
  the other node has taken every one back, p50 and max over the trials,
  beside the lease TTL.

    python bench/cluster.py [--runs 5000] [--rounds 3] [--bulk 50000] [--trials 5] [--url postgresql://...]
    python bench/cluster.py --only peers [--profile]   # just the side-by-side figures
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import os
import platform
import pstats
import signal
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from taskwatch.engine import Engine, TaskContext  # noqa: E402
from taskwatch.engine.store import NewRun, PostgresStore  # noqa: E402

from tests.postgres_server import PostgresServer, start_server  # noqa: E402
from tests.test_durable import Child  # noqa: E402

#: enqueues SAQ has in flight at once (it has no batch enqueue; its own benchmark uses 20)
SAQ_IN_FLIGHT = 20
#: how often a peer's table is polled, once its task has run N times, for the last finish
DONE_POLL = 0.005


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


# ---------------------------------------------------------------- taskwatch


def _engine(store: str | PostgresStore, n: int) -> tuple[Engine, asyncio.Event]:
    """One node, concurrency 10, a no-op task; the event is set at the n-th recorded success."""
    engine = Engine(store=store, node_id="bench", max_concurrency=10, max_queue=n + 1, history=1000, health_interval=None)
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

    # published once the database has the outcome
    engine.bus.add_callback(count, ["run.succeeded"])
    return engine, done


async def end_to_end(url: str, n: int) -> tuple[float, float]:
    """(jobs/s from the submit to the last recorded finish, submit_many runs/s) for ``n`` no-op runs."""
    engine, done = _engine(url, n)
    async with engine:
        start = time.perf_counter()
        await engine.submit_many([("nothing", None)] * n)
        submitted = time.perf_counter()
        await done.wait()
        end = time.perf_counter()
    return n / (end - start), n / (submitted - start)


async def drain(url: str, n: int) -> float:
    """Jobs/s of a node started on ``n`` queued no-op runs, until the last is recorded."""
    store = PostgresStore(url)
    await store.open()
    for i in range(0, n, 5000):
        await store.insert([NewRun("nothing") for _ in range(min(5000, n - i))])
    engine, done = _engine(store, n)
    start = time.perf_counter()
    async with engine:  # closes the store too
        await done.wait()
        end = time.perf_counter()
    return n / (end - start)


# ---------------------------------------------------------------- peers


async def _until_empty(url: str, sql: str) -> None:
    """Poll ``sql`` (a count of unfinished jobs) until it says none is left."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        while await conn.fetchval(sql):
            await asyncio.sleep(DONE_POLL)
    finally:
        await conn.close()


async def procrastinate_run(url: str, n: int, queued_first: bool) -> tuple[float, float]:
    """(jobs/s, enqueue jobs/s) of one procrastinate worker at concurrency 10."""
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url))
    ran = 0
    all_ran = asyncio.Event()

    @app.task(name="noop")
    async def noop() -> None:
        nonlocal ran
        ran += 1
        if ran == n:
            all_ran.set()

    async def work() -> None:
        await app.run_worker_async(concurrency=10, wait=True, install_signal_handlers=False)

    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        worker = None
        if not queued_first:
            worker = asyncio.create_task(work())
            await asyncio.sleep(1.0)  # up and listening: not measured
        begin = time.perf_counter()
        await noop.batch_defer_async(*([{}] * n))
        enqueued = time.perf_counter()
        start = begin
        if worker is None:
            start = time.perf_counter()
            worker = asyncio.create_task(work())
        await all_ran.wait()
        await _until_empty(url, "SELECT COUNT(*) FROM procrastinate_jobs WHERE status <> 'succeeded'")
        end = time.perf_counter()
        worker.cancel()
        await asyncio.gather(worker, return_exceptions=True)
    return n / (end - start), n / (enqueued - begin)


async def saq_run(url: str, n: int, queued_first: bool) -> tuple[float, float]:
    """(jobs/s, enqueue jobs/s) of one SAQ worker (PostgreSQL queue) at concurrency 10."""
    from saq import Worker
    from saq.queue.postgres import PostgresQueue

    queue = PostgresQueue.from_url(url)
    ran = 0
    all_ran = asyncio.Event()

    async def noop(ctx: object) -> None:
        nonlocal ran
        ran += 1
        if ran == n:
            all_ran.set()

    await queue.connect()
    worker = Worker(queue=queue, functions=[("noop", noop)], concurrency=10)
    gate = asyncio.Semaphore(SAQ_IN_FLIGHT)

    async def one() -> None:
        async with gate:
            await queue.enqueue("noop")

    running = None
    if not queued_first:
        running = asyncio.create_task(worker.start())
        await asyncio.sleep(1.0)
    begin = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    enqueued = time.perf_counter()
    start = begin
    if running is None:
        start = time.perf_counter()
        running = asyncio.create_task(worker.start())
    await all_ran.wait()
    await _until_empty(url, "SELECT COUNT(*) FROM saq_jobs WHERE status <> 'complete'")
    end = time.perf_counter()
    await worker.stop()
    await asyncio.gather(running, return_exceptions=True)
    await queue.disconnect()
    return n / (end - start), n / (enqueued - begin)


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


Measure = Callable[[str, int, bool], Awaitable[tuple[float, float]]]


def _peer(name: str, module: str, fn: Measure) -> tuple[str, str | None, Measure]:
    try:
        version: str | None = metadata.version(module)
    except metadata.PackageNotFoundError:
        version = None
    return name, version, fn


async def _taskwatch(url: str, n: int, queued_first: bool) -> tuple[float, float]:
    if queued_first:
        return await drain(url, n), 0.0
    return await end_to_end(url, n)


def side_by_side(dbs: Databases, n: int, rounds: int, profile: bool) -> None:
    """taskwatch, procrastinate and SAQ on the same server, end to end and draining a full queue:
    ``rounds`` alternating rounds (each library once per round), the median of each."""
    # the peers log every job at INFO, and a warning per worker start: keep the output to figures
    logging.basicConfig(level=logging.ERROR)
    who = [
        _peer("taskwatch", "taskwatch", _taskwatch),
        _peer("procrastinate", "procrastinate", procrastinate_run),
        _peer("SAQ (PostgreSQL queue)", "saq", saq_run),
    ]
    print(f"one worker, concurrency 10, {n:,} no-op jobs each, a fresh database each, "
          f"{rounds} alternating round(s), medians:")  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {}
    for _ in range(rounds):
        for name, version, fn in who:
            if version is None:
                continue
            got = samples.setdefault(name, {"e2e": [], "enqueue": [], "drain": []})
            with dbs.fresh() as url:
                e2e, enqueue = asyncio.run(fn(url, n, False))
            with dbs.fresh() as url:
                full, _ = asyncio.run(fn(url, n, True))
            got["e2e"].append(e2e)
            got["enqueue"].append(enqueue)
            got["drain"].append(full)
    print(f"  {'':30} {'end to end':>12} {'enqueue':>12} {'drain':>12}")
    figures: dict[str, dict[str, float]] = {}
    for name, version, _fn in who:
        if version is None:
            print(f"  {name:30} not installed (pip install -e '.[bench]')")
            continue
        med = {k: statistics.median(v) for k, v in samples[name].items()}
        figures[name] = med
        label = f"{name} {version}"
        print(f"  {label:30} {med['e2e']:8,.0f} /s {med['enqueue']:8,.0f} /s {med['drain']:8,.0f} /s")
    peers = {k: v for k, v in figures.items() if k != "taskwatch"}
    if "taskwatch" in figures and peers:
        ours = figures["taskwatch"]
        for what in ("e2e", "drain"):
            best = max(peers, key=lambda k: peers[k][what])
            ratio = ours[what] / peers[best][what]
            label = "end to end" if what == "e2e" else "drain"
            print(f"  taskwatch / fastest peer ({best}), {label}: {ratio:.1f} x  (goal >= 10 x)")
    if profile:
        with dbs.fresh() as url:
            prof = cProfile.Profile()
            prof.enable()
            asyncio.run(end_to_end(url, n))
            prof.disable()
        print("\nwhere taskwatch's end-to-end time goes (cProfile, by own time):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5000)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of the side-by-side figures")
    p.add_argument("--bulk", type=int, default=50_000)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--ttl", type=float, default=1.0, help="lease TTL in the recovery trials")
    p.add_argument("--url", default=None, help="an existing database (else a throwaway server is started)")
    p.add_argument("--only", choices=("peers",), default=None, help="measure only the side-by-side figures")
    p.add_argument("--profile", action="store_true", help="then profile taskwatch's end-to-end run")
    args = p.parse_args()

    server = None if args.url else start_server()
    dbs = Databases(server, args.url)
    try:
        version = (server.sql("SHOW server_version") if server else "?").split()[0]
        print(f"taskwatch cluster bench  {time.strftime('%Y-%m-%d %H:%M')}  Python {platform.python_version()}  "
              f"PostgreSQL {version}  {os.cpu_count()} CPUs")  # fmt: skip
        side_by_side(dbs, args.runs, args.rounds, args.profile)
        if args.only == "peers":
            return
        with dbs.fresh() as url:
            bulk = asyncio.run(bulk_enqueue(url, args.bulk))
        print(f"bulk enqueue (submit_many):         {bulk:10,.0f} runs/s  ({args.bulk:,} runs, batches of 5,000; goal >= 20,000)")
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
