"""A queue and a trigger on a SQLite file in their own process, for ``test_durable_loops.py``.

::

    python -m tests.loops_child DB --node N --log LOG put --count N
    python -m tests.loops_child DB --node N --log LOG drain
    python -m tests.loops_child DB --node N notify --key K --count N

Prints one JSON line per step, flushed at once: ``ready``, ``started``
(with ``adopted``: jobs taken up from the store), ``all_put`` (every
``await put`` returned, so every job is committed), ``notified``, and
``drained`` (the queue holds nothing and runs nothing), then ``stopped``.

The handler of queue ``mail`` appends the job's ``i`` to ``--log`` with one
``os.write`` on an ``O_APPEND`` descriptor (a SIGKILL cannot take it back),
then sleeps ``--sleep`` s.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from taskwatch.engine import Engine, TaskContext


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--node", required=True)
    parser.add_argument("--log")
    parser.add_argument("--sleep", type=float, default=0.05)
    sub = parser.add_subparsers(dest="mode", required=True)
    put = sub.add_parser("put")
    put.add_argument("--count", type=int, required=True)
    sub.add_parser("drain")
    notify = sub.add_parser("notify")
    notify.add_argument("--key", required=True)
    notify.add_argument("--count", type=int, required=True)
    args = parser.parse_args()

    engine = Engine(store=f"sqlite:///{args.db}", node_id=args.node, lease_ttl=2.0, health_interval=None)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if args.log else None

    async def send(job: dict[str, Any]) -> None:
        if fd is not None:
            os.write(fd, (json.dumps({"i": job["i"], "pid": os.getpid()}) + "\n").encode())
        await asyncio.sleep(args.sleep)

    queue = engine.queue("mail", send, concurrency=4, maxsize=100_000)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        return None

    trigger = engine.trigger("compile", compile_key, size_threshold=1_000_000, save_interval=0.1)
    emit(ev="ready", pid=os.getpid())
    async with engine:
        emit(ev="started", adopted=queue.info().adopted)
        if args.mode == "put":
            for i in range(args.count):
                await queue.put({"i": i})
            emit(ev="all_put")
            await asyncio.Event().wait()  # until killed
        elif args.mode == "notify":
            for _ in range(args.count):
                trigger.notify(args.key)
            emit(ev="notified")
            await asyncio.Event().wait()
        else:
            await queue.join(timeout=120)
            emit(ev="drained", info=queue.info().model_dump())
    emit(ev="stopped")


if __name__ == "__main__":
    asyncio.run(main())
