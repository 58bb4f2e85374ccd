"""No-op runs per second through the full engine, beside bare asyncio, in one process.

For each round: N bare ``asyncio.create_task`` no-ops, then N no-op runs
through the engine (submit, validate, dispatch, run, finish, three events
each, one subscriber reading every event). Prints both rates and their ratio,
plus the cost of publishing one event. Rounds alternate so machine noise hits
both sides alike; the median round is reported.

    python bench/throughput.py [--runs 50000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import sys
import time

from taskwatch.engine import Engine, EventBus, TaskContext
from taskwatch.engine.events import RunStarted


async def noop() -> None:
    return None


async def bare_asyncio(n: int) -> float:
    start = time.perf_counter()
    tasks = [asyncio.create_task(noop()) for _ in range(n)]
    await asyncio.wait(tasks)
    return n / (time.perf_counter() - start)


async def through_engine(n: int) -> tuple[float, int, int]:
    engine = Engine(max_queue=n + 1, history=1_000, health_interval=None, replay=1_000)

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    sub = engine.bus.subscribe(kinds=["run."], maxsize=4 * n)
    finished = asyncio.Event()
    seen = 0

    async def reader() -> None:
        nonlocal seen
        succeeded = 0
        while await sub.wait():
            for event in sub.get_batch():
                seen += 1
                if event.kind == "run.succeeded":
                    succeeded += 1
                    if succeeded == n:
                        finished.set()

    async with engine:
        reading = asyncio.create_task(reader())
        start = time.perf_counter()
        for _ in range(n):
            await engine.submit("nothing")
        await finished.wait()
        elapsed = time.perf_counter() - start
        sub.close()
        await reading
    return n / elapsed, seen, sub.dropped


def publish_cost(n: int = 200_000, batch: int = 1_000) -> float:
    """Microseconds to build, stamp and fan out one event to a subscriber that keeps up."""
    bus = EventBus(node="bench", replay=1_000)
    sub = bus.subscribe(maxsize=batch + 1)
    received = 0
    start = time.perf_counter()
    for i in range(n):
        bus.emit(RunStarted, run_id="0123456789abcdef", task="nothing", attempt=1)
        if i % batch == batch - 1:
            received += len(sub.get_batch())
    elapsed = time.perf_counter() - start
    assert received == n and sub.dropped == 0
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    bare: list[float] = []
    eng: list[float] = []
    for _ in range(args.rounds):
        bare.append(asyncio.run(bare_asyncio(args.runs)))
        rate, seen, dropped = asyncio.run(through_engine(args.runs))
        assert seen == 3 * args.runs and dropped == 0, (seen, dropped)
        eng.append(rate)
    b, e = statistics.median(bare), statistics.median(eng)
    cost = statistics.median(publish_cost() for _ in range(3))
    print(f"python {platform.python_version()} on {platform.machine()}, {args.runs} no-ops x {args.rounds} rounds (median)")
    print(f"bare asyncio.create_task : {b:>10,.0f} runs/s")
    print(f"taskwatch engine         : {e:>10,.0f} runs/s  (3 events per run, 1 subscriber reading)")
    print(f"ratio engine / bare      : {e / b:>10.2f}  (target >= 0.33)")
    print(f"publish one event        : {cost:>10.2f} us  (1 subscriber, ring buffer)")
    sys.exit(0 if e / b >= 1 / 3 else 1)


if __name__ == "__main__":
    main()
