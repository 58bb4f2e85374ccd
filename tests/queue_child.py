"""A durable queue on a SQLite file in its own process, driven line by line, for ``test_durable_loops.py``.

::

    python -m tests.queue_child DB --node N [--busy-timeout MS] [--paused]

The test holds the file's write lock from its own process (a plain
``sqlite3`` connection in ``BEGIN EXCLUSIVE``) to make the queue's writes
wait or fail, and kills this process with SIGKILL. Commands, one a line on
stdin:

- ``put I [hold]``: ``await queue.put({"i": I})`` in a task of its own, then
  ``{"ev": "put", "i": I, "error": null | "StoreBusy", ...}``;
- ``put_nowait I [I ...]``: the jobs put in one go, then ``{"ev": "put_nowait"}``;
- ``pause``, ``release`` (every held job finishes), ``stop TIMEOUT``:
  ``{"ev": "stopping"}`` as the engine starts stopping, then ``{"ev": "stopped",
  "info": ..., "incomplete": [...]}`` and the process ends.

The handler prints ``{"ev": "handled", "i": I}`` (a job put with ``hold``
first waits for ``release``). Every line logged by the queue, debug included (a
store outage's later failures are debug lines), is printed as ``{"ev": "log", "msg": ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from typing import Any

from taskwatch.engine import Engine


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class Printed(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        emit(ev="log", level=record.levelname, msg=record.getMessage())


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("db")
    parser.add_argument("--node", required=True)
    parser.add_argument("--busy-timeout", type=int, default=5000)
    parser.add_argument("--paused", action="store_true")
    args = parser.parse_args()
    queues_log = logging.getLogger("taskwatch.queues")
    queues_log.addHandler(Printed(logging.DEBUG))
    queues_log.setLevel(logging.DEBUG)

    engine = Engine(
        store=f"sqlite:///{args.db}?busy_timeout={args.busy_timeout}", node_id=args.node, health_interval=None
    )
    release = asyncio.Event()

    async def handler(job: dict[str, Any]) -> None:
        if job.get("hold"):
            await release.wait()
        emit(ev="handled", i=job["i"])

    queue = engine.queue("q", handler)
    incomplete: list[dict[str, Any]] = []
    engine.bus.add_callback(lambda e: incomplete.append({"left": e.left, "kept": e.kept}), ["queue.drain_incomplete"])
    engine.bus.add_callback(lambda e: emit(ev="stopping"), ["engine.stopping"])

    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read() -> None:  # a daemon thread: a blocked readline never holds up the exit
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)

    threading.Thread(target=read, daemon=True).start()

    async def put(i: int, hold: bool) -> None:
        job: dict[str, Any] = {"i": i, "hold": True} if hold else {"i": i}
        try:
            await queue.put(job)
        except Exception as exc:  # noqa: BLE001 - reported to the test
            emit(ev="put", i=i, error=type(exc).__name__, message=str(exc))
        else:
            emit(ev="put", i=i, error=None)

    puts: set[asyncio.Task[None]] = set()
    await engine.start()
    if args.paused:
        engine.pause_queue("q")
    emit(ev="ready")
    while True:
        cmd, *rest = (await commands.get()).split()
        if cmd == "put":
            task = asyncio.create_task(put(int(rest[0]), rest[1:] == ["hold"]))
            puts.add(task)
            task.add_done_callback(puts.discard)
        elif cmd == "put_nowait":
            for i in rest:
                queue.put_nowait({"i": int(i)})
            emit(ev="put_nowait")
        elif cmd == "pause":
            engine.pause_queue("q")
            emit(ev="paused")
        elif cmd == "release":
            release.set()
        elif cmd == "stop":
            await engine.stop(timeout=float(rest[0]))
            emit(ev="stopped", info=queue.info().model_dump(), incomplete=incomplete)
            return


if __name__ == "__main__":
    asyncio.run(main())
