"""A queue and a trigger on a SQLite file in their own process, for ``test_durable_loops.py``.

::

    python -m tests.loops_child DB --node N --log LOG put --count N
    python -m tests.loops_child DB --node N --log LOG drain
    python -m tests.loops_child DB --node N notify --key K --count N
    python -m tests.loops_child DB --node N --log LOG notify --key K --count N --threshold T --hold

Prints one JSON line per step, flushed at once: ``ready``, ``started``
(with ``adopted``: jobs taken up from the store), ``all_put`` (every
``await put`` returned, so every job is committed), ``notified``, and
``drained`` (the queue holds nothing and runs nothing), then ``stopped``.
``notified`` carries the trigger's ``fired`` count and the key's ``run_id``.

With ``--hold`` the trigger's task appends ``{"key", "run", "attempt", "pid"}``
to ``--log`` as it starts and then never ends; its saves come every
``--save-interval`` s (default 0.1).

The handler of queue ``mail`` appends ``{"i", "attempt", "pid"}`` to ``--log`` with one
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
    notify.add_argument("--threshold", type=int, default=1_000_000)
    notify.add_argument("--save-interval", type=float, default=0.1)
    notify.add_argument("--hold", action="store_true")
    args = parser.parse_args()

    engine = Engine(store=f"sqlite:///{args.db}", node_id=args.node, lease_ttl=2.0, health_interval=None)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) if args.log else None

    async def send(ctx: TaskContext, job: dict[str, Any]) -> None:
        if fd is not None:
            line = {"i": job["i"], "attempt": ctx.attempt, "pid": os.getpid()}
            os.write(fd, (json.dumps(line) + "\n").encode())
        await asyncio.sleep(args.sleep)

    queue = engine.queue("mail", send, concurrency=4, maxsize=100_000)

    hold = args.mode == "notify" and args.hold

    async def compile_key(ctx: TaskContext, key: str) -> None:
        if hold and fd is not None:
            line = {"key": key, "run": ctx.run_id, "attempt": ctx.attempt, "pid": os.getpid()}
            os.write(fd, (json.dumps(line) + "\n").encode())
            await asyncio.Event().wait()

    trigger = engine.trigger(
        "compile", compile_key,
        size_threshold=args.threshold if args.mode == "notify" else 1_000_000,
        save_interval=args.save_interval if args.mode == "notify" else 0.1,
    )  # fmt: skip
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
            [state] = [k for k in trigger.state().keys if k.key == args.key]
            emit(ev="notified", fired=trigger.fired, run_id=state.run_id)
            await asyncio.Event().wait()
        else:
            await queue.join(timeout=120)
            emit(ev="drained", info=queue.info().model_dump())
    emit(ev="stopped")


if __name__ == "__main__":
    asyncio.run(main())
