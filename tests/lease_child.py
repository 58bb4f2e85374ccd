"""An engine electing its leader on Redis, in its own process, for ``test_redis_failover.py``
and ``bench/failover.py``.

::

    python -m tests.lease_child REDIS_URL --node a --ttl 1 --passes passes.log

Every line it prints on stdout is one JSON object with an ``ev`` field,
flushed at once, so a test acts on what the process has really done:

``{"ev": "started", "pid": ..., "leader": bool}``
    ``engine.start()`` returned (the first election is decided).
``{"ev": "lease", "kind": "acquired" | "lost" | "released", "term", "holder", "previous_holder", "previous_term", "t"}``
    The engine published that lease event (``renewed`` only with ``--renewed``).
``{"ev": "worker", "state": "started", "term"}`` / ``{..., "state": "stopped", "reason"}`` / ``{..., "state": "crashed", "error"}``
    The leader-only worker ``guarded`` was started, stopped or crashed.
``{"ev": "pass", "term", "t"}``
    The first time ``guarded`` passed ``ctx.ensure_leader()`` in a term.
``{"ev": "not_leader", "t"}``
    ``ctx.ensure_leader()`` raised inside ``guarded``.
``{"ev": "cancelled", "ensure_leader": "passed" | "raised"}``
    ``guarded`` was cancelled; it called ``ensure_leader()`` once more and says how that went.
``{"ev": "check", "term": N | null}``
    Answer to a ``check`` line on stdin: ``ensure_leader()`` from outside any worker.
``{"ev": "stopped"}``
    stdin was closed and ``engine.stop()`` returned.

``guarded`` calls ``ensure_leader()`` every ``--step`` seconds and appends each
pass to the ``--passes`` file as ``{"node", "pid", "term", "t0", "t1"}``: ``t0``
just before the call, ``t1`` just after it returned (one ``os.write`` on an
``O_APPEND`` descriptor, which a SIGKILL cannot take back once it returned).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from typing import Any

from taskwatch.engine import Engine, NotLeader, RedisLease, TaskContext


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def build(args: argparse.Namespace) -> Engine:
    lease = RedisLease(args.url, key=args.key, ttl=args.ttl, renew_interval=args.renew)
    engine = Engine(node_id=args.node, lease=lease, health_interval=None)
    fd = os.open(args.passes, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if args.passes else None
    announced: set[int] = set()

    @engine.supervised(name="guarded", leader_only=True, backoff=0.05, backoff_max=0.2)
    async def guarded(ctx: TaskContext) -> None:
        try:
            while True:
                t0 = time.time()
                try:
                    term = await ctx.ensure_leader()
                except NotLeader:
                    emit(ev="not_leader", t=time.time())
                    raise
                t1 = time.time()
                if fd is not None:
                    line = {"node": args.node, "pid": os.getpid(), "term": term, "t0": t0, "t1": t1}
                    os.write(fd, (json.dumps(line) + "\n").encode())
                if term not in announced:
                    announced.add(term)
                    emit(ev="pass", term=term, t=t1)
                await asyncio.sleep(args.step)
        except asyncio.CancelledError:
            try:
                await ctx.ensure_leader()
                verdict = "passed"
            except NotLeader:
                verdict = "raised"
            emit(ev="cancelled", ensure_leader=verdict)
            raise

    def report(event: Any) -> None:
        kind = event.kind
        if kind.startswith("lease."):
            if kind == "lease.renewed" and not args.renewed:
                return
            emit(
                ev="lease",
                kind=kind.removeprefix("lease."),
                term=event.term,
                holder=event.holder,
                previous_holder=event.previous_holder,
                previous_term=event.previous_term,
                t=time.time(),
            )
        elif kind == "worker.started":
            emit(ev="worker", state="started", term=event.term)
        elif kind == "worker.stopped":
            emit(ev="worker", state="stopped", reason=event.reason)
        elif kind == "worker.crashed":
            emit(ev="worker", state="crashed", error=event.error.type)

    engine.bus.add_callback(report, ["lease.", "worker."])
    return engine


async def main(args: argparse.Namespace) -> None:
    engine = build(args)
    await engine.start()
    emit(ev="started", pid=os.getpid(), leader=engine.leadership().is_leader)
    probe = TaskContext(engine, None, "probe")
    loop = asyncio.get_running_loop()
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        if line.strip() == "check":
            try:
                term: int | None = await probe.ensure_leader()
            except NotLeader:
                term = None
            emit(ev="check", term=term)
    await engine.stop(2.0)
    emit(ev="stopped")


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.lease_child")
    p.add_argument("url")
    p.add_argument("--node", required=True)
    p.add_argument("--key", default="taskwatch:test:leader")
    p.add_argument("--ttl", type=float, default=1.0)
    p.add_argument("--renew", type=float, default=None)
    p.add_argument("--step", type=float, default=0.02, help="seconds between ensure_leader() calls")
    p.add_argument("--passes", default=None, help="file every ensure_leader() pass is appended to")
    p.add_argument("--renewed", action="store_true", help="also print lease.renewed events")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
