"""What a start costs with many unfinished runs in a SQLite file: seconds, and memory.

A start reads every pending and running run of the file into the node's
index before it takes a run. This fills a file with ``--runs`` pending runs
(small params, as a queue of jobs has), then starts an engine on it in a fresh
child process, ``--rounds`` times, and prints the median time of
``engine.start()`` and the child's resident memory: before the start, at its
peak, and held once the start is over.

    python bench/start.py [--runs 100000] [--rounds 3]

Run it with ``PYTHONPATH`` naming an extracted earlier revision (``git archive
REV engine tui widgets``, under a ``taskwatch`` folder) to see that revision's
figures beside this checkout's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from taskwatch.engine.store import NewRun, SqliteStore

_CHILD = r"""
import asyncio, gc, json, resource, sys, time
from taskwatch.engine import Engine, TaskContext

def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20

async def main(db):
    engine = Engine(store=f"sqlite:///{db}", node_id="bench", max_concurrency=1, health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> None:
        await asyncio.Event().wait()  # holds its one slot: the start is all that is measured

    gc.collect()
    before = rss_mb()
    began = time.perf_counter()
    await engine.start()
    took = time.perf_counter() - began
    gc.collect()
    held = rss_mb()
    indexed = len(engine.runs(limit=None))
    await engine.stop(timeout=0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": took, "before": before, "peak": peak, "held": held, "indexed": indexed}))

asyncio.run(main(sys.argv[1]))
"""


async def fill(db: Path, n: int) -> None:
    async with SqliteStore(db) as store:
        for first in range(0, n, 10_000):
            await store.insert(
                [NewRun(task="job", params={"doc": f"doc-{i}", "n": i}) for i in range(first, min(n, first + 10_000))]
            )


def start_once(db: Path) -> dict[str, float]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(db)], capture_output=True, text=True, timeout=600, check=False
    )
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "runs.db"
        asyncio.run(fill(db, args.runs))
        results = [start_once(db) for _ in range(args.rounds)]
    assert all(r["indexed"] == args.runs for r in results), results
    seconds = statistics.median(r["seconds"] for r in results)
    before = statistics.median(r["before"] for r in results)
    peak = statistics.median(r["peak"] for r in results)
    held = statistics.median(r["held"] for r in results)
    print(f"python {platform.python_version()} on {platform.machine()}, {args.runs:,} pending runs in a SQLite file, "
          f"{args.rounds} starts (median), {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"engine.start()        : {seconds:>8.2f} s  ({seconds / args.runs * 1e6:.1f} us a run)")
    print(f"memory before start   : {before:>8.0f} MB")
    print(f"memory at its peak    : {peak:>8.0f} MB  (+{(peak - before) / args.runs * 2**20 / 1e3:.1f} KB a run)")
    print(f"memory held after it  : {held:>8.0f} MB  (+{(held - before) / args.runs * 2**20 / 1e3:.1f} KB a run)")


if __name__ == "__main__":
    main()
