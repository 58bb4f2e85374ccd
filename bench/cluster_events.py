"""Cluster-wide events: PostgreSQL (``events="postgres"``) beside Redis (``events="redis://..."``).

Starts a throwaway PostgreSQL server and a throwaway redis-server (as the
tests do). For each transport, one engine publishes its events and a reader
(a relay with no bus of its own, as ``taskwatch attach`` is) reads them back
in the same process, on the same clock. Prints, side by side:

- latency: runs submitted one at a time, 50 ms apart; from each
  ``run.succeeded`` event's timestamp to the moment the reader has it
  (p50, p99, max; the goal is well under a second);
- a flood: ``--runs`` no-op runs in one ``submit_many``, each reporting
  progress ``--steps`` times; events the engine published, events the reader
  received, progress events coalesced away, batches written (for PostgreSQL
  each batch is one transaction and one NOTIFY), events missed, and how long
  until the reader had the last one.

    python bench/cluster_events.py [--runs 2000] [--steps 20] [--samples 100]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from taskwatch.engine import Engine, EventRelay, PostgresEventRelay, RedisEventRelay, TaskContext  # noqa: E402

from tests.postgres_server import start_server  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def engine_for(events: str, store: str, steps: int) -> Engine:
    engine = Engine(store=store, node_id="bench", events=events, max_concurrency=20, max_queue=1_000_000,
                    health_interval=None, lease_ttl=30)  # fmt: skip

    @engine.task
    async def work(ctx: TaskContext) -> None:
        for i in range(1, steps + 1):
            await ctx.progress(i, steps)

    return engine


async def measure(events: str, store: str, reader: EventRelay, runs: int, steps: int, samples: int) -> dict[str, Any]:
    latencies: list[float] = []
    last_seen = 0.0

    def on_event(event: Any) -> None:
        nonlocal last_seen
        last_seen = time.time()
        if event.kind == "run.succeeded":
            latencies.append(last_seen - event.ts)

    async with reader:
        reader.bus.add_callback(on_event)
        engine = engine_for(events, store, 0)
        async with engine:
            for _ in range(samples):
                await (await engine.submit("work")).wait()
                await asyncio.sleep(0.05)
            deadline = time.monotonic() + 30
            while len(latencies) < samples and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
        idle = sorted(latencies)

        flood = engine_for(events, store, steps)
        async with flood:
            relay = flood.cluster
            assert relay is not None
            before = reader.stats().received
            begin = time.time()
            handles = await flood.submit_many([("work", None)] * runs)
            for handle in handles:
                await handle.wait()
            published = flood.bus.last_seq
        deadline = time.monotonic() + 60
        stopped = flood.bus.last_seq
        while time.monotonic() < deadline:
            got = reader.stats().received - before
            if got + relay.stats().coalesced >= stopped:
                break
            await asyncio.sleep(0.01)
        stats = reader.stats()
        # read once the reader has caught up: the relay may still have been sending before
        sent = relay.stats()
    return {
        "p50": statistics.median(idle),
        "p99": idle[min(len(idle) - 1, int(len(idle) * 0.99))],
        "max": idle[-1],
        "published": published,
        "received": stats.received - before,
        "coalesced": sent.coalesced,
        "batches": sent.batches,
        "missed": stats.missed,
        "drain": last_seen - begin,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=2000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--samples", type=int, default=100)
    args = p.parse_args()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server is not installed; install it with: sudo apt-get install -y redis-server")
    pg = start_server()
    tmp = tempfile.mkdtemp()
    redis = RedisServer(redis_bin, Path(tmp) / "redis")
    redis.start()
    try:
        pg.sql("CREATE DATABASE bench_events TEMPLATE tw_template STRATEGY FILE_COPY")
        url = pg.url("bench_events")
        version = pg.sql("SHOW server_version").split()[0]
        print(f"taskwatch cluster events bench  {time.strftime('%Y-%m-%d %H:%M')}  Python {platform.python_version()}  "
              f"PostgreSQL {version}  {os.cpu_count()} CPUs; {args.samples} latency samples, flood of {args.runs:,} "
              f"runs x {args.steps} progress reports")  # fmt: skip
        rows = {
            "postgres": asyncio.run(measure("postgres", url, PostgresEventRelay(url), args.runs, args.steps, args.samples)),
            "redis": asyncio.run(measure(f"{redis.url}?stream=bench:events&maxlen=1000000", url,
                                         RedisEventRelay(redis.url, stream="bench:events"),
                                         args.runs, args.steps, args.samples)),  # fmt: skip
        }
    finally:
        redis.stop()
        pg.stop("fast")
        shutil.rmtree(pg.root, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print("| transport | latency p50 | p99 | max | events published | received | coalesced | batches | missed | reader has all after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, r in rows.items():
        print(f"| {name} | {r['p50'] * 1000:.0f} ms | {r['p99'] * 1000:.0f} ms | {r['max'] * 1000:.0f} ms "
              f"| {r['published']:,} | {r['received']:,} | {r['coalesced']:,} | {r['batches']:,} | {r['missed']} "
              f"| {r['drain']:.2f} s |")  # fmt: skip
    pg_row, redis_row = rows["postgres"], rows["redis"]
    print(f"\npostgres / redis: latency p50 x{pg_row['p50'] / redis_row['p50']:.2f}, "
          f"flood drained in x{pg_row['drain'] / redis_row['drain']:.2f} the time")


if __name__ == "__main__":
    main()
