"""Takeover times of the Redis leader lease after ``kill -9`` and after ``SIGSTOP`` of the leader.

Two nodes (``python -m tests.lease_child``, each an engine with a
``RedisLease`` and a leader-only worker) share a lease on a throwaway
``redis-server``. Each trial signals the current leader and measures, on this
host's clock, the time until the follower's ``lease.acquired`` event and until
its leader-only worker first passes ``ensure_leader()``. A killed node is
replaced by a fresh process before the next trial; a paused one is resumed
once the takeover happened (it then finds itself fenced off and follows).

The figures are printed next to the ttl and ttl + renew interval, the bound
the design promises: the old key lapses at most a ttl after its last renew,
and the follower tries once every renew interval.

    python bench/failover.py [--trials 10] [--config 1.0:0.25 --config 3.0:1.0]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.lease_nodes import LeaseNode, fencing_violations, read_passes, sole_leader, wait_until  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


def trial(nodes: list[LeaseNode], how: str, url: str, args: dict[str, Any]) -> tuple[float, float, list[LeaseNode]]:
    """Signal the leader; (seconds to the follower's acquire, to its worker's first pass, nodes after)."""
    leader, term = wait_until(lambda: sole_leader(nodes))
    leader.wait_for(lambda line: line.get("ev") == "pass" and line["term"] == term)
    (follower,) = [n for n in nodes if n is not leader]
    # strike at a random point of the renew cycle, as a real crash would
    time.sleep(random.uniform(0, args["renew"]))
    mark = follower.mark()
    t0 = time.time()
    if how == "kill -9":
        leader.kill()
    else:
        leader.pause()
    acquired = follower.wait_for(lambda line: line.get("ev") == "lease" and line["kind"] == "acquired", start=mark)
    worked = follower.wait_for(lambda line: line.get("ev") == "pass" and line["term"] == acquired["term"], start=mark)
    if how == "kill -9":
        replacement = LeaseNode(url, leader.node, **args)
        replacement.wait_for(lambda line: line.get("ev") == "started")
        nodes = [follower, replacement]
    else:
        lost = leader.mark()
        leader.resume()
        leader.wait_for(lambda line: line.get("ev") == "lease" and line["kind"] == "lost", start=lost)
    return acquired["t"] - t0, worked["t"] - t0, nodes


Row = tuple[float, float, str, list[float], list[float]]


def run_config(server: RedisServer, ttl: float, renew: float, trials: int, workdir: Path) -> list[Row]:
    passes = workdir / f"passes-{ttl}-{renew}.log"
    args: dict[str, Any] = {"ttl": ttl, "renew": renew, "passes": passes, "key": f"bench:{uuid.uuid4().hex[:8]}"}
    nodes = [LeaseNode(server.url, name, **args) for name in ("a", "b")]
    for node in nodes:
        node.wait_for(lambda line: line.get("ev") == "started")
    rows: list[Row] = []
    everyone = list(nodes)
    try:
        for how in ("kill -9", "SIGSTOP"):
            takeovers: list[float] = []
            resumes: list[float] = []
            for _ in range(trials):
                took, worked, nodes = trial(nodes, how, server.url, args)
                everyone.extend(n for n in nodes if n not in everyone)
                takeovers.append(took)
                resumes.append(worked)
            rows.append((ttl, renew, how, takeovers, resumes))
    finally:
        for node in everyone:
            node.close()
    wrong = fencing_violations(read_passes(passes))
    if wrong:
        raise SystemExit(f"fencing violated: {wrong}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--config", action="append", default=None, help="TTL:RENEW in seconds (repeatable)")
    opts = parser.parse_args()
    configs = [tuple(float(x) for x in c.split(":")) for c in (opts.config or ["1.0:0.25", "3.0:1.0"])]
    binary = next((p for p in (os.environ.get("REDIS_SERVER"), "/usr/bin/redis-server") if p and Path(p).exists()), None)
    if binary is None:
        raise SystemExit("redis-server is not installed; install it with: sudo apt-get install -y redis-server")
    print(f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores; "
          f"{opts.trials} trials each; times from the signal to the follower's event, this host's clock")
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(binary, Path(tmp) / "redis")
        server.start()
        try:
            rows = [row for ttl, renew in configs for row in run_config(server, ttl, renew, opts.trials, Path(tmp))]
        finally:
            server.stop(signal.SIGTERM)
    print()
    print("| ttl | renew | leader got | takeover p50 | takeover max | worker resumes p50 | worker resumes max | ttl + renew |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for ttl, renew, how, took, worked in rows:
        print(
            f"| {ttl:g} s | {renew:g} s | {how} | {statistics.median(took):.2f} s | {max(took):.2f} s "
            f"| {statistics.median(worked):.2f} s | {max(worked):.2f} s | {ttl + renew:g} s |"
        )


if __name__ == "__main__":
    main()
