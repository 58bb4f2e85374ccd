"""Instructions per no-op run, counted by valgrind's callgrind: a figure the machine's load cannot move.

Wall-clock and CPU-time figures on a shared two-core machine move by tens of
percent from one minute to the next; instruction counts do not (the same
script gives the same count, whatever else runs). Each variant runs twice in
a child process under ``valgrind --tool=callgrind``, with N and 2N runs, and
the difference divided by N is what one run costs, start-up and imports
cancelled out. The garbage collector is off in the children, so the counts
are the code's own.

Variants (memory store, ``max_concurrency`` 8, the batch pattern of
``bench/throughput.py``: submit in a loop, one subscriber):

``bare``      one ``asyncio.create_task`` of a no-op coroutine, gathered
``silent``    the engine with its bus's ``post`` replaced by a no-op: admission, claim, the task, finish
``unread``    the engine, its three events per run posted, the subscriber filtering them all out
``read``      the engine, the subscriber reading (building) all three events

    python bench/instructions.py [--runs 2000] [--rev REV]

``--rev REV`` counts an earlier revision's engine instead (its packages
extracted with ``git archive``, as ``bench/versus.py`` does), with this
script's variants, so two revisions' counts compare like for like.

Needs valgrind (Debian: ``apt-get install valgrind``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = ("bare", "silent", "unread", "read")


#: a kind no event of these runs has: a subscriber that holds nothing
_NEVER_HERE = ["lease.lost"]


async def noop() -> None:
    return None


async def child(variant: str, n: int) -> None:
    if variant == "bare":
        await asyncio.gather(*[asyncio.create_task(noop()) for _ in range(n)])
        return
    from taskwatch.engine import Engine, TaskContext

    engine = Engine(max_queue=n + 1, history=1_000, health_interval=None)

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    if variant == "silent":
        engine.bus.post = lambda cls, **fields: None  # type: ignore[method-assign]
    sub = engine.bus.subscribe(kinds=["run."] if variant == "read" else _NEVER_HERE, maxsize=4 * n)

    async def reader() -> None:
        while await sub.wait():
            sub.get_batch()

    async with engine:
        reading = asyncio.create_task(reader())
        handles = [await engine.submit("nothing") for _ in range(n)]
        await handles[-1].wait()
        sub.close()
        await reading


def count(variant: str, n: int, path: str | None = None) -> int:
    env = dict(os.environ, PYTHONPATH=path) if path else None
    out = subprocess.run(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, __file__,
         "--child", variant, "--runs", str(n)],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    found = re.search(r"Collected : (\d+)", out.stderr)
    if found is None:
        raise RuntimeError(f"callgrind printed no count for {variant}:\n{out.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=2_000)
    parser.add_argument("--rev", help="count this git revision's engine instead of the checkout's")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        gc.disable()
        asyncio.run(child(args.child, args.runs))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed: apt-get install valgrind")
    n = args.runs
    with tempfile.TemporaryDirectory() as scratch:
        path = None
        if args.rev:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from versus import extract

            path = str(extract(args.rev, Path(scratch)))
        per_run = {variant: (count(variant, 2 * n, path) - count(variant, n, path)) / n for variant in VARIANTS}
    which = f"revision {args.rev}" if args.rev else "this checkout"
    print(f"python {platform.python_version()} on {platform.machine()}, {which}, instructions per no-op run "
          f"(callgrind, {n} and {2 * n} runs, gc off)")  # fmt: skip
    for variant in VARIANTS:
        print(f"{variant:<8}: {per_run[variant]:>10,.0f}  ({per_run[variant] / per_run['bare']:.1f} x bare)")
    print(f"three events posted  : {per_run['unread'] - per_run['silent']:>10,.0f}")
    print(f"three events read    : {per_run['read'] - per_run['unread']:>10,.0f}")
    print(f"the rest of the engine: {per_run['silent'] - per_run['bare']:>9,.0f}  (admission, claim, finish, index)")
    print(f"bare / read (the batch pattern's ratio, in instructions): {per_run['bare'] / per_run['read']:.2f}")


if __name__ == "__main__":
    main()
