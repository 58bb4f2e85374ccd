"""An engine served from its own process, for tests that attach a dashboard to it.

::

    python -m tests.served_engine tcp://127.0.0.1:0 --token SECRET
    python -m tests.served_engine /tmp/x/engine.sock --node-id first

Once serving, it prints one JSON line on stdout::

    {"address": "tcp://127.0.0.1:40123", "token": "SECRET", "node_id": "...", "pid": 1234}

then keeps submitting a ``quick`` run every ``--interval`` seconds (0: never)
so there is live traffic, printing ``{"submitted": RUN_ID}`` for each. Lines on
stdin ask for more: ``submit TASK [JSON-PARAMS]`` submits once and prints
``{"submitted": RUN_ID, "task": TASK}`` (or ``{"error": ...}``). It stops
cleanly -- engine and endpoint shut down, the socket file removed -- on
SIGTERM, SIGINT, or when stdin is closed.

Tests check the engine's real state through their own ``RemoteEngine``
connection to the same address (``await remote.snapshot()``), independently
of the dashboard under test.

Tasks:

``quick``
    No params; finishes at once with a small result.
``forever``
    No params; reports progress every 50 ms until it is cancelled.
``greet``
    Params ``GreetParams(name: str, times: int in 1..5)``: the form checks
    ``times`` against its schema limits; only the engine knows a name must
    start with a capital letter (a validator the schema does not describe).
``tick``
    A periodic task due in an hour: something for the Scheduler tab.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
from typing import Any

from pydantic import BaseModel, Field, field_validator
from taskwatch.engine import Engine, TaskContext, TaskwatchError


class GreetParams(BaseModel):
    name: str = Field(description="who to greet")
    times: int = Field(1, ge=1, le=5, description="how many greetings (1-5)")

    @field_validator("name")
    @classmethod
    def _capitalised(cls, name: str) -> str:
        if not name[:1].isupper():
            raise ValueError("a name starts with a capital letter")
        return name


def build_engine(node_id: str | None = None) -> Engine:
    engine = Engine(max_concurrency=16, history=2_000, health_interval=None, node_id=node_id)

    @engine.task(description="finishes at once")
    async def quick(ctx: TaskContext) -> dict[str, int]:
        return {"ok": 1}

    @engine.task(description="runs and reports progress until cancelled")
    async def forever(ctx: TaskContext) -> None:
        step = 0
        while True:
            step += 1
            await ctx.progress(step % 100, 100, f"step {step}")
            await asyncio.sleep(0.05)

    @engine.task(description="greets someone a few times")
    async def greet(ctx: TaskContext, params: GreetParams) -> str:
        return " ".join(f"hello {params.name}" for _ in range(params.times))

    @engine.periodic(every=3600.0, initial_delay=3600.0, name="tick")
    async def tick(ctx: TaskContext) -> None:
        """hourly; never due while a test runs"""

    return engine


def emit(payload: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(payload) + "\n")
    sys.stdout.flush()


def _watch_stdin(loop: asyncio.AbstractEventLoop, commands: asyncio.Queue[str | None]) -> None:
    """Forward stdin lines to the loop; None once stdin is closed (a daemon thread)."""
    try:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
    except (OSError, ValueError):
        pass
    with contextlib.suppress(RuntimeError):  # the loop may already be closed
        loop.call_soon_threadsafe(commands.put_nowait, None)


async def _traffic(engine: Engine, interval: float) -> None:
    while True:
        # pacing of the generated load, not synchronisation
        await asyncio.sleep(interval)
        try:
            handle = await engine.submit("quick")
        except TaskwatchError as exc:
            emit({"error": str(exc)})
            continue
        emit({"submitted": handle.id, "task": "quick"})


async def _command(engine: Engine, line: str) -> None:
    parts = line.strip().split(maxsplit=2)
    if not parts:
        return
    if parts[0] != "submit" or len(parts) < 2:
        emit({"error": f"unknown command: {line.strip()!r}"})
        return
    try:
        params = json.loads(parts[2]) if len(parts) > 2 else None
        handle = await engine.submit(parts[1], params)
    except (TaskwatchError, ValueError) as exc:
        emit({"error": str(exc)})
        return
    emit({"submitted": handle.id, "task": parts[1]})


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.served_engine")
    parser.add_argument("address", help="a Unix socket path or tcp://127.0.0.1:PORT (0: any free port)")
    parser.add_argument("--token", default=None)
    parser.add_argument("--node-id", default=None)
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between generated runs; 0: none")
    opts = parser.parse_args(argv)

    engine = build_engine(opts.node_id)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    commands: asyncio.Queue[str | None] = asyncio.Queue()
    threading.Thread(target=_watch_stdin, args=(loop, commands), daemon=True, name="stdin").start()

    await engine.start()
    background: list[asyncio.Task[Any]] = []
    try:
        server = await engine.serve(opts.address, token=opts.token, announce=False)
        info = server.info()
        emit({"address": info.address, "token": info.token, "node_id": info.node_id, "pid": os.getpid()})
        if opts.interval > 0:
            background.append(loop.create_task(_traffic(engine, opts.interval)))

        async def read_commands() -> None:
            while (line := await commands.get()) is not None:
                await _command(engine, line)
            stop.set()  # stdin closed: whoever started us is gone

        background.append(loop.create_task(read_commands()))
        await stop.wait()
    finally:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        # stops the control endpoints too (they are closed last) and removes the socket file
        await engine.stop(timeout=2.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
