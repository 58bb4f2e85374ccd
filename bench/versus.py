"""The batch pattern of ``bench/throughput.py``, this checkout beside an earlier revision.

Each round runs the pattern (``batch_bare`` and ``batch_engine`` of
``bench/throughput.py``) once for this checkout and once for the
revision, each in a fresh child process (the two packages cannot share one
process), alternating, so machine noise hits both alike. A child measures
bare asyncio and the engine one after the other and reports the engine's
ratio to bare; the median of the rounds is printed for each side.

    python bench/versus.py REV [--rounds 5] [--runs 20000]

The revision's ``engine/``, ``widgets/`` and ``tui/`` are extracted with
``git archive`` into a temporary directory and imported from there; the
revision must accept what the pattern uses (``Engine(max_queue=, history=,
health_interval=, replay=)``, ``bus.subscribe(kinds=, maxsize=)``,
``Subscription.wait()`` and ``get_batch()``): every revision since the
event bus took batches does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def child(n: int) -> None:
    # the pattern as bench/throughput.py measures it, with whichever taskwatch is on the path
    sys.path.insert(0, str(ROOT / "bench"))
    import taskwatch.engine
    from throughput import batch_bare, batch_engine

    bare = await batch_bare(n)
    engine = await batch_engine(n)
    print(json.dumps({"bare": bare, "engine": engine, "from": taskwatch.engine.__file__}))


def extract(rev: str, into: Path) -> Path:
    """``rev``'s packages under ``into``, importable as ``taskwatch.*`` with ``into/pkg`` on the path."""
    src = into / "src"
    src.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev, "engine", "widgets", "tui"],
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(src)], input=archive, check=True)
    pkg = into / "pkg" / "taskwatch"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    for name in ("engine", "widgets", "tui"):
        (pkg / name).symlink_to(src / name)
    return into / "pkg"


def run_child(n: int, path: Path | None) -> dict[str, float]:
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = str(path)
    out = subprocess.run([sys.executable, __file__, "--child", "--runs", str(n)],
                         env=env, capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rev", nargs="?", help="the git revision to compare with")
    parser.add_argument("--runs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        asyncio.run(child(args.runs))
        return
    if not args.rev:
        parser.error("name the revision to compare with")
    with tempfile.TemporaryDirectory(prefix="taskwatch-versus-") as tmp:
        path = extract(args.rev, Path(tmp))
        ratios: dict[str, list[float]] = {"this checkout": [], args.rev: []}
        for _ in range(args.rounds):
            for side, where in (("this checkout", None), (args.rev, path)):
                got = run_child(args.runs, where)
                if where is not None and not got["from"].startswith(tmp):
                    sys.exit(f"the child imported {got['from']}, not the revision's engine")
                ratios[side].append(got["engine"] / got["bare"])
    print(f"python {platform.python_version()} on {platform.machine()}, batch pattern, {args.runs} no-op runs, "
          f"{args.rounds} alternating rounds, each side in a fresh process")  # fmt: skip
    medians = {side: statistics.median(values) for side, values in ratios.items()}
    for side, values in ratios.items():
        shown = " ".join(f"{v:.3f}" for v in values)
        print(f"{side:<16}: engine / bare asyncio {medians[side]:.3f} (median of {shown})")
    print(f"this checkout / {args.rev}: {medians['this checkout'] / medians[args.rev]:.2f}")


if __name__ == "__main__":
    main()
