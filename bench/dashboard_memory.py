"""What an open dashboard holds per waiting run, in bytes.

An in-process engine (memory store, two runs at a time, each holding until
the end) gets N runs submitted while a headless dashboard watches; once the
dashboard's model and its runs table list every one of them, the memory
grown since before the submissions is taken. The same engine with no
dashboard, in the same run, gives what the engine itself holds per run; the
difference, divided by N, is the dashboard's bytes per waiting run.

Two ways of measuring, side by side in one run:

``tracemalloc`` (the default)
    The Python allocations still held, and the top sites of what the dashboard
    holds per run: each allocation is put on the innermost line of the
    dashboard's own code (``tui/``, ``widgets/``) that led to it, else on the
    innermost line of any code (the engine's, pydantic's...).
``--rss``
    The process's resident memory, each side in a fresh child process (a
    process that ran one side first keeps its freed memory for the next).
    What the operating system sees, the allocator's overhead included; noisier.

    python bench/dashboard_memory.py [--runs 20000] [--top 15] [--rss]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import linecache
import logging
import os
import subprocess
import sys
import time
import tracemalloc
from collections import defaultdict
from collections.abc import Callable

import psutil
from taskwatch.engine import Engine, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from taskwatch.widgets import RunsTable

#: runs submitted between two chances for the dashboard to drain its events
CHUNK = 500
#: frames of each allocation's stack kept by tracemalloc: enough to reach the dashboard's
#: line from inside pydantic, Rich or Textual
FRAMES = 30


def _dashboard_dirs() -> tuple[str, ...]:
    import taskwatch.tui
    import taskwatch.widgets

    return tuple(
        os.path.dirname(os.path.abspath(module.__file__ or "")) + os.sep for module in (taskwatch.tui, taskwatch.widgets)
    )


def build_engine(runs: int) -> Engine:
    engine = Engine(node_id="bench", max_concurrency=2, max_queue=runs + 100, health_interval=None)
    #: never set: the two runs started hold their slots, so every other run waits
    release = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await release.wait()

    return engine


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def held_now(rss: bool) -> int:
    gc.collect()
    if rss:
        return psutil.Process().memory_info().rss
    return tracemalloc.get_traced_memory()[0]


async def submit(engine: Engine, runs: int) -> list[str]:
    """Submit ``runs`` runs a chunk at a time, letting the loop (and a dashboard) run between."""
    ids: list[str] = []
    while len(ids) < runs:
        for _ in range(min(CHUNK, runs - len(ids))):
            ids.append(engine.submit_nowait("hold").id)
        await asyncio.sleep(0.01)
    return ids


async def side(runs: int, dashboard: bool, rss: bool, trace: bool) -> dict[str, object]:
    """Bytes held after submitting ``runs`` runs, with or without a dashboard watching;
    with ``trace``, also the top sites of what grew."""
    engine = build_engine(runs)
    out: dict[str, object] = {}
    async with engine:
        if not dashboard:
            before = held_now(rss)
            await submit(engine, runs)
            await until(lambda: engine.stats().by_status.get("pending", 0) >= runs - 2, 60, "the engine to queue every run")
            after = held_now(rss)
            out["bytes"] = after - before
        else:
            # many rows a frame, so the runs table lists every run soon (the memory held once it
            # has is the same whatever the pace)
            app = TaskwatchApp(LocalClient(engine), refresh_hz=15.0, rows_per_frame=2_000, cursor_blink=False)
            async with app.run_test(size=(140, 42)):
                await until(lambda: app.state.node_id == "bench", 30, "the dashboard to connect")
                await asyncio.sleep(0.5)
                before = held_now(rss)
                first = tracemalloc.take_snapshot() if trace else None
                ids = await submit(engine, runs)
                table = app.main.query_one(RunsTable)
                await until(
                    lambda: table.row_count >= runs and all(run_id in app.state.runs for run_id in ids),
                    300,
                    "the dashboard to list every run",
                )
                if app.state.dropped or app.client.dropped:
                    raise SystemExit("the dashboard dropped events: the figure would not be of every run")
                # a frame or two more, so nothing in flight is counted
                await asyncio.sleep(0.3)
                after = held_now(rss)
                out["bytes"] = after - before
                if first is not None:
                    out["sites"] = _sites(tracemalloc.take_snapshot().compare_to(first, "traceback"), runs)
        # the runs still waiting end cancelled with the engine: that is expected here
        logging.getLogger("taskwatch.engine").setLevel(logging.ERROR)
    return out


def _sites(diffs: list[tracemalloc.StatisticDiff], runs: int) -> list[tuple[str, float, float]]:
    """(site and its source line, bytes per run, blocks per run) of what grew, each allocation
    put on the innermost line of the dashboard's own code that led to it, else on its
    innermost line."""
    mine = _dashboard_dirs()
    size: dict[tuple[str, int, bool], int] = defaultdict(int)
    count: dict[tuple[str, int, bool], int] = defaultdict(int)
    for diff in diffs:
        frames = list(reversed(diff.traceback))  # innermost first
        frame = next((f for f in frames if f.filename.startswith(mine)), None)
        where = (frame.filename, frame.lineno, True) if frame else (frames[0].filename, frames[0].lineno, False)
        size[where] += diff.size_diff
        count[where] += diff.count_diff
    ranked = sorted(size, key=lambda site: size[site], reverse=True)
    return [(_site(*site), size[site] / runs, count[site] / runs) for site in ranked]


def _site(filename: str, line: int, dashboard: bool) -> str:
    code = linecache.getline(filename, line).strip()
    return f"{'' if dashboard else '(elsewhere) '}{_short(filename)}:{line}  {code[:70]}"


def _short(filename: str) -> str:
    for marker in ("site-packages" + os.sep, os.sep + "taskwatch" + os.sep, os.sep + "main" + os.sep):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def run_child(which: str, runs: int) -> int:
    """One side's RSS growth, in a fresh process."""
    cmd = [sys.executable, __file__, "--child", which, "--runs", str(runs)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20_000, help="waiting runs submitted")
    parser.add_argument("--top", type=int, default=15, help="allocation sites listed")
    parser.add_argument("--rss", action="store_true", help="measure resident memory, each side in its own process")
    parser.add_argument("--child", choices=("engine", "dashboard"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    runs = args.runs

    if args.child:
        result = asyncio.run(side(runs, args.child == "dashboard", rss=True, trace=False))
        print(json.dumps({"bytes": result["bytes"]}))
        return

    if args.rss:
        engine_only = run_child("engine", runs)
        with_dashboard = run_child("dashboard", runs)
        how = "RSS growth, each side in its own process"
        sites: list[tuple[str, float, float]] = []
    else:
        tracemalloc.start(FRAMES)
        engine_only = int(asyncio.run(side(runs, False, rss=False, trace=False))["bytes"])  # type: ignore[call-overload]
        measured = asyncio.run(side(runs, True, rss=False, trace=True))
        tracemalloc.stop()
        with_dashboard = int(measured["bytes"])  # type: ignore[call-overload]
        sites = measured["sites"]  # type: ignore[assignment]
        how = "Python allocations held (tracemalloc)"

    print(f"{runs:,} waiting runs; {how}")
    print(f"  engine alone          {engine_only / runs:>9,.0f} B a run  ({engine_only / 2**20:,.1f} MiB)")
    print(f"  engine + dashboard    {with_dashboard / runs:>9,.0f} B a run  ({with_dashboard / 2**20:,.1f} MiB)")
    dashboard = with_dashboard - engine_only
    print(f"  the dashboard         {dashboard / runs:>9,.0f} B a run  ({dashboard / 2**20:,.1f} MiB)")
    print(f"  at 100,000 waiting runs the dashboard holds about {dashboard / runs * 100_000 / 1e6:,.0f} MB")
    if sites:
        print("\ntop sites of what grew with the dashboard watching (engine's own included), per run:")
        print(f"{'bytes':>8} {'blocks':>7}  site")
        for site, size, blocks in sites[: args.top]:
            print(f"{size:>8,.0f} {blocks:>7.2f}  {site}")


if __name__ == "__main__":
    main()
