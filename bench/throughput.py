"""No-op runs per second through the engine (memory store), beside bare asyncio and aiojobs, in one process.

Two patterns, each measured for every contender in the same round, rounds
alternating so machine noise hits all sides alike; the median round is
reported.

``batch``
    Submit N runs in a loop without keeping handles; one subscriber reads
    every event in batches; done when it has seen N ``run.succeeded``.
    Bare asyncio: N ``create_task`` then ``asyncio.wait``.
``user``
    What an application writes: ``handles = [await engine.submit(...) ...]``
    then ``gather(h.wait() ...)``, with one dashboard-style subscriber doing
    ``async for event in sub``. ``Engine(max_concurrency=1000)``. Peers:
    bare asyncio (``create_task`` + ``gather``) and aiojobs (``spawn`` then
    ``wait`` on every job, ``limit=1000``).

Also prints the cost of publishing one event to one subscriber, and to none.

    python bench/throughput.py [--runs 20000] [--rounds 5]
    python bench/throughput.py --profile [--top 30]
    python bench/throughput.py --parts

``--parts`` prints what one run costs, in microseconds of CPU, per part:
admission (``submit``: validation, store insert, index, its event posted),
dispatch to finish (claim, the task, its outcome, two events posted), a bare
``asyncio`` task beside it, the events built and read by one subscriber, and
how much of it all is the garbage collector's.

``--profile`` prints the top of a cProfile of the user pattern instead, so
the next person sees where a run's time goes (the profiler slows every
Python call alike: read it for proportions, not absolute costs).

aiojobs comes with the ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import platform
import pstats
import statistics
import time
from collections.abc import Awaitable, Callable

from taskwatch.engine import Engine, EventBus, TaskContext
from taskwatch.engine.events import RunStarted

try:
    import aiojobs
except ImportError:  # optional: the bench extra
    aiojobs = None


#: a kind no event of these runs has: a subscriber that holds nothing
_NEVER_HERE = ["lease.lost"]

async def noop() -> None:
    return None


# ---------------------------------------------------------------- batch pattern


async def batch_bare(n: int) -> float:
    start = time.perf_counter()
    tasks = [asyncio.create_task(noop()) for _ in range(n)]
    await asyncio.wait(tasks)
    return n / (time.perf_counter() - start)


async def batch_engine(n: int) -> float:
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
    assert seen == 3 * n and sub.dropped == 0, (seen, sub.dropped)
    return n / elapsed


# ---------------------------------------------------------------- user pattern


async def user_bare(n: int) -> float:
    start = time.perf_counter()
    tasks = [asyncio.create_task(noop()) for _ in range(n)]
    await asyncio.gather(*tasks)
    return n / (time.perf_counter() - start)


async def user_aiojobs(n: int) -> float:
    scheduler = aiojobs.Scheduler(limit=1_000, pending_limit=n + 1)
    start = time.perf_counter()
    jobs = [await scheduler.spawn(noop()) for _ in range(n)]
    await asyncio.gather(*(job.wait() for job in jobs))
    elapsed = time.perf_counter() - start
    await scheduler.close()
    return n / elapsed


async def user_engine(n: int) -> float:
    engine = Engine(max_concurrency=1_000, max_queue=2 * n, history=1_000, health_interval=None)

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    seen = 0
    sub = engine.bus.subscribe(maxsize=4 * n)

    async def dashboard() -> None:
        nonlocal seen
        async for _ in sub:
            seen += 1

    async with engine:
        watching = asyncio.create_task(dashboard())
        start = time.perf_counter()
        handles = [await engine.submit("nothing") for _ in range(n)]
        records = await asyncio.gather(*(h.wait() for h in handles))
        elapsed = time.perf_counter() - start
    await watching  # the subscription ends when the engine stops
    assert all(r.status == "succeeded" for r in records)
    assert seen >= 3 * n, seen
    return n / elapsed


# ---------------------------------------------------------------- events


def publish_cost(subscribers: int, n: int = 200_000, batch: int = 1_000) -> float:
    """Microseconds for the engine's side of one run event: ``post`` it and fan it out.

    Subscribers are read back between batches, outside the timing: building
    the event is the reader's cost (see :func:`build_cost`).
    """
    bus = EventBus(node="bench", replay=1_000)
    subs = [bus.subscribe(maxsize=batch + 1) for _ in range(subscribers)]
    post = bus.post
    elapsed = 0.0
    for _ in range(n // batch):
        start = time.perf_counter()
        for _ in range(batch):
            post(RunStarted, run_id="0123456789abcdef", task="nothing", attempt=1, from_store=False)
        elapsed += time.perf_counter() - start
        for sub in subs:
            sub.get_batch()
    assert all(sub.dropped == 0 for sub in subs)
    return elapsed / n * 1e6


def build_cost(n: int = 100_000) -> float:
    """Microseconds for a reader to build one posted event (put together from its fields, once)."""
    bus = EventBus(node="bench", replay=0)
    sub = bus.subscribe(maxsize=n + 1)
    for _ in range(n):
        bus.post(RunStarted, run_id="0123456789abcdef", task="nothing", attempt=1, from_store=False)
    start = time.perf_counter()
    events = sub.get_batch()
    elapsed = time.perf_counter() - start
    assert len(events) == n
    return elapsed / n * 1e6


# ---------------------------------------------------------------- cost per part


async def parts_once(n: int, read: bool) -> tuple[float, float]:
    """CPU seconds per run of admission and of dispatch-to-finish (max_concurrency 8).

    Eight held runs fill every slot, so the ``n`` submits are admission alone;
    releasing them then drains the ``n`` runs, every freed slot taking the next.
    """
    engine = Engine(max_queue=n + 16, history=1_000, health_interval=None)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    sub = engine.bus.subscribe(kinds=["run."] if read else _NEVER_HERE, maxsize=4 * n)

    async def reader() -> None:
        while await sub.wait():
            sub.get_batch()

    async with engine:
        reading = asyncio.create_task(reader())
        held = [await engine.submit("hold") for _ in range(engine.max_concurrency)]
        await asyncio.sleep(0)  # reader catches up before the clock starts
        start = time.process_time()
        handles = [await engine.submit("nothing") for _ in range(n)]
        admitted = time.process_time()
        gate.set()
        await asyncio.gather(*(h.wait() for h in held))
        await handles[-1].wait()
        while sub.pending():
            await asyncio.sleep(0)
        finished = time.process_time()
        sub.close()
        await reading
    return (admitted - start) / n, (finished - admitted) / n


async def bare_task_cost(n: int) -> float:
    start = time.process_time()
    await asyncio.gather(*(asyncio.create_task(noop()) for _ in range(n)))
    return (time.process_time() - start) / n


def parts(n: int, rounds: int) -> None:
    rows: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        rows.setdefault(name, []).append(seconds * 1e6)

    for _ in range(rounds):
        for collect in (True, False):
            (gc.enable if collect else gc.disable)()
            try:
                quiet = asyncio.run(parts_once(n, read=False))
                loud = asyncio.run(parts_once(n, read=True))
                bare = asyncio.run(bare_task_cost(n))
            finally:
                gc.enable()
            tag = "" if collect else " (gc off)"
            add("admission" + tag, quiet[0])
            add("dispatch to finish" + tag, quiet[1])
            add("bare asyncio task" + tag, bare)
            add("events read by 1 subscriber" + tag, loud[0] + loud[1] - quiet[0] - quiet[1])
            add("whole run, read" + tag, loud[0] + loud[1])
    m = {name: statistics.median(v) for name, v in rows.items()}
    print(f"python {platform.python_version()} on {platform.machine()}, {n} no-op runs x {rounds} rounds (median), "
          "CPU microseconds per run, memory store, max_concurrency 8")
    print(f"{'part':<32}{'gc on':>8}{'gc off':>8}")
    for name in ("admission", "dispatch to finish", "bare asyncio task", "events read by 1 subscriber", "whole run, read"):
        print(f"{name:<32}{m[name]:>8.1f}{m[name + ' (gc off)']:>8.1f}")
    print("admission: submit (validation, store insert, index, run.submitted posted); dispatch to finish: claim,\n"
          "launch, the task, its outcome in the store and the index, run.started and run.succeeded posted;\n"
          "events read: building (putting together) and handing over the three events of a run.")


def median_rounds(rounds: int, contenders: dict[str, Callable[[], Awaitable[float]]]) -> dict[str, float]:
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():
            results[name].append(asyncio.run(run()))  # type: ignore[arg-type]
    return {name: statistics.median(rates) for name, rates in results.items()}


def profile(n: int, top: int) -> None:
    prof = cProfile.Profile()
    prof.enable()
    rate = asyncio.run(user_engine(n))
    prof.disable()
    stats = pstats.Stats(prof)
    calls = stats.total_calls  # type: ignore[attr-defined]
    print(f"{n} no-op runs, user pattern: {rate:,.0f} runs/s under the profiler, {calls / n:.0f} Python calls per run")
    stats.sort_stats("tottime").print_stats(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true", help="profile the user pattern instead")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--parts", action="store_true", help="print what one run costs, per part")
    args = parser.parse_args()
    n = args.runs
    if args.profile:
        profile(n, args.top)
        return
    if args.parts:
        parts(n, args.rounds)
        return

    contenders: dict[str, Callable[[], Awaitable[float]]] = {
        "batch: bare asyncio": lambda: batch_bare(n),
        "batch: taskwatch": lambda: batch_engine(n),
        "user: bare asyncio": lambda: user_bare(n),
        "user: taskwatch": lambda: user_engine(n),
    }
    if aiojobs is not None:
        contenders["user: aiojobs"] = lambda: user_aiojobs(n)
    m = median_rounds(args.rounds, contenders)
    one = statistics.median(publish_cost(1) for _ in range(3))
    none = statistics.median(publish_cost(0) for _ in range(3))

    print(f"python {platform.python_version()} on {platform.machine()}, {n} no-op runs x {args.rounds} rounds (median)")
    for name, rate in m.items():
        print(f"{name:<22}: {rate:>10,.0f} runs/s")
    print(f"batch taskwatch / bare : {m['batch: taskwatch'] / m['batch: bare asyncio']:>10.2f}  (goal >= 0.5)")
    print(f"user taskwatch / bare  : {m['user: taskwatch'] / m['user: bare asyncio']:>10.2f}")
    if aiojobs is not None:
        print(f"user taskwatch / aiojobs: {m['user: taskwatch'] / m['user: aiojobs']:>9.2f}  (goal >= 1)")
    else:
        print("aiojobs not installed: pip install -e '.[bench]' to measure it")
    print(f"publish one event      : {one:>10.2f} us to 1 subscriber, {none:.2f} us to none (goal < 1 us)")
    print(f"build one event        : {build_cost():>10.2f} us (put together once, by its first reader)")


if __name__ == "__main__":
    main()
