"""Run stores side by side: memory vs SQLite (WAL, synchronous=normal), one process.

For each store: 10,000 inserts awaited one by one, the same from 10
concurrent submitters (group commit batches them), one bulk insert, then
claim+finish throughput (claims of 64, each finished). For SQLite also the
p50/p99 latency of a single insert awaited alone. Ratios are SQLite / memory
cost. Then the whole engine on each store (submit, claim, run, finish, every
transition committed), three alternating rounds, the median and each round's
ratio; its submit latency; and submit_many against sequential submits. Runs in
well under a minute.

    python bench/store.py [--runs 10000] [--sync normal|full]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from taskwatch.engine import Engine, TaskContext
from taskwatch.engine.store import MemoryStore, NewRun, SqliteStore, Store, Succeeded

Factory = Callable[[], Store]


async def timed(store_factory: Factory, body: Callable[[Store], Coroutine[Any, Any, int]]) -> float:
    """Runs per second of ``body`` on a fresh, open store."""
    store = store_factory()
    async with store:
        start = time.perf_counter()
        n = await body(store)
        return n / (time.perf_counter() - start)


def one_by_one(n: int) -> Callable[[Store], Coroutine[Any, Any, int]]:
    async def body(store: Store) -> int:
        for i in range(n):
            await store.insert([NewRun("a", {"i": i})])
        return n

    return body


def concurrent(n: int, submitters: int = 10) -> Callable[[Store], Coroutine[Any, Any, int]]:
    async def body(store: Store) -> int:
        async def submitter(k: int) -> None:
            for i in range(k, n, submitters):
                await store.insert([NewRun("a", {"i": i})])

        await asyncio.gather(*(submitter(k) for k in range(submitters)))
        return n

    return body


def bulk(n: int) -> Callable[[Store], Coroutine[Any, Any, int]]:
    async def body(store: Store) -> int:
        await store.insert([NewRun("a", {"i": i}) for i in range(n)])
        return n

    return body


async def claim_finish(store_factory: Factory, n: int, batch: int = 64) -> float:
    store = store_factory()
    async with store:
        await store.insert([NewRun("a", {"i": i}) for i in range(n)])
        start = time.perf_counter()
        done = 0
        while claims := await store.claim("bench", "bench-1", batch, {"a": None}):
            # finishes of one claim batch are awaited together, as an executor's tasks would end
            await asyncio.gather(*(store.finish(c.token, Succeeded()) for c in claims))
            done += len(claims)
        assert done == n
        return n / (time.perf_counter() - start)


async def insert_latency(store_factory: Factory, n: int) -> tuple[float, float]:
    store = store_factory()
    async with store:
        lat = []
        for i in range(n):
            t0 = time.perf_counter()
            await store.insert([NewRun("a", {"i": i})])
            lat.append(time.perf_counter() - t0)
    q = statistics.quantiles(lat, n=100)
    return q[49] * 1e6, q[98] * 1e6


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--sync", default="normal", choices=["normal", "full"])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="taskwatch-bench-") as tmp_dir:
        await run_all(args.runs, args.sync, Path(tmp_dir))


async def run_all(n: int, sync: str, tmp: Path) -> None:
    counter = iter(range(1_000_000))

    def sqlite_store() -> Store:
        return SqliteStore(tmp / f"bench-{next(counter)}.db", synchronous=sync)

    stores: dict[str, Factory] = {"memory": MemoryStore, f"sqlite ({sync})": sqlite_store}
    print(
        f"python {platform.python_version()} · sqlite {sqlite3.sqlite_version} · {platform.machine()} · "
        f"{n:,} runs"
    )
    rows: list[tuple[str, list[float]]] = [
        ("insert one by one, awaited (runs/s)", []),
        ("insert, 10 concurrent submitters (runs/s)", []),
        ("insert, one bulk call (runs/s)", []),
        ("claim 64 + finish each (runs/s)", []),
    ]
    for factory in stores.values():
        rows[0][1].append(await timed(factory, one_by_one(n)))
        rows[1][1].append(await timed(factory, concurrent(n)))
        rows[2][1].append(await timed(factory, bulk(n)))
        rows[3][1].append(await claim_finish(factory, n))
    names = list(stores)
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {names[0]:>14}  {names[1]:>16}  {'memory/sqlite':>13}")
    for label, (mem, sql) in rows:
        print(f"{label:{width}}  {mem:>14,.0f}  {sql:>16,.0f}  {mem / sql:>12.1f}x")
    p50, p99 = await insert_latency(sqlite_store, min(n, 3000))
    print(f"sqlite single insert latency, awaited alone: p50 {p50:,.0f} µs, p99 {p99:,.0f} µs")
    print(f"memory: {1e6 / rows[0][1][0]:.2f} µs per awaited single insert, {1e6 / rows[3][1][0]:.2f} µs per claim+finish")
    await engine_end_to_end(n, sync, tmp)


def bench_engine(store: str) -> Engine:
    engine = Engine(store=store, max_concurrency=50, max_queue=1_000_000, history=1_000, health_interval=None)

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    return engine


async def end_to_end(store: str, n: int, submitters: int = 10) -> tuple[float, list[float]]:
    """No-op runs/s through the whole engine (submit, claim, run, finish, each transition
    in the store), from ``submitters`` concurrent submitters; and each submit's latency."""
    engine = bench_engine(store)
    latencies: list[float] = []
    async with engine:

        async def submitter(count: int) -> list[Any]:
            handles = []
            for _ in range(count):
                began = time.perf_counter()
                handles.append(await engine.submit("nothing"))
                latencies.append(time.perf_counter() - began)
            return handles

        start = time.perf_counter()
        groups = await asyncio.gather(*(submitter(n // submitters) for _ in range(submitters)))
        await asyncio.gather(*(h.wait() for group in groups for h in group))
        elapsed = time.perf_counter() - start
    return submitters * (n // submitters) / elapsed, latencies


async def submit_many_vs_each(store: str, n: int) -> tuple[float, float]:
    """Seconds for ``n`` sequential submits, and for one submit_many of ``n``."""
    engine = bench_engine(store)
    async with engine:
        start = time.perf_counter()
        for _ in range(n):
            await engine.submit("nothing")
        each = time.perf_counter() - start
        start = time.perf_counter()
        await engine.submit_many([("nothing", None)] * n)
        many = time.perf_counter() - start
    return each, many


async def engine_end_to_end(n: int, sync: str, tmp: Path, rounds: int = 3) -> None:
    # alternating rounds, each store on a fresh engine (and SQLite on a fresh file): the
    # machine's noise hits both alike, and the median round is reported
    memories: list[float] = []
    sqlites: list[float] = []
    latencies: list[float] = []
    for k in range(rounds):
        memory, _ = await end_to_end("memory", n)
        sqlite, took = await end_to_end(f"sqlite:///{tmp / f'engine-{k}.db'}?synchronous={sync}", n)
        memories.append(memory)
        sqlites.append(sqlite)
        latencies += took
    memory, sqlite = statistics.median(memories), statistics.median(sqlites)
    print(f"engine end to end, 10 submitters, concurrency 50, median of {rounds} alternating rounds: "
          f"memory {memory:,.0f} runs/s, sqlite {sqlite:,.0f} runs/s, sqlite / memory {sqlite / memory:.2f} "
          f"(goal >= 0.25; rounds {', '.join(f'{s / m:.2f}' for s, m in zip(sqlites, memories, strict=True))})")
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1e6
    p99 = latencies[int(len(latencies) * 0.99)] * 1e6
    print(f"engine submit latency on sqlite (10 concurrent submitters): p50 {p50:,.0f} µs, p99 {p99:,.0f} µs")
    each, many = await submit_many_vs_each(f"sqlite:///{tmp / 'many.db'}?synchronous={sync}", n)
    print(f"sqlite: {n:,} sequential submits {each:.2f} s, one submit_many {many:.2f} s: "
          f"{each / many:.1f}x faster (goal >= 10x)")


if __name__ == "__main__":
    if sys.platform == "win32":
        asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())  # type: ignore[attr-defined]
    asyncio.run(main())
