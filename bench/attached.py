"""What attached dashboards and a connect flood cost the engine they watch.

Runs a submit loop (batches of 50 no-op runs, three events each) on an engine
served over TCP and prints runs/s in one-second windows, side by side:

* ``readers``: with 0, 1, 4 and 10 attached clients in another process,
  each reading every event as fast as it can (what a dashboard does);
* ``flood``: with another process connecting without the token as fast as it
  can, holding 200 sockets that never send a byte, and how many of 10 real
  attaches (``RemoteEngine`` with the token) succeed meanwhile.

    python bench/attached.py [--seconds 3] [--readers 0,1,4,10] [--no-flood]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

from taskwatch.engine import Engine, RemoteEngine, TaskContext, TaskwatchError
from taskwatch.engine.wire import PROTOCOL_VERSION

REPO = Path(__file__).resolve().parent.parent

#: run in a child process: N clients that say hello, then read everything until killed
READERS = """
import asyncio, json, sys
host, port = sys.argv[1][len("tcp://"):].rsplit(":", 1)
hello = (json.dumps({"type": "hello", "version": %d, "token": sys.argv[2]}) + "\\n").encode()
async def reader():
    r, w = await asyncio.open_connection(host, int(port), limit=64 << 20)
    w.write(hello)
    await w.drain()
    print("attached", flush=True)
    while await r.read(1 << 20):
        pass
async def main():
    await asyncio.gather(*(reader() for _ in range(int(sys.argv[3]))))
asyncio.run(main())
""" % PROTOCOL_VERSION


def build_engine() -> Engine:
    engine = Engine(node_id="bench", max_concurrency=16, history=2_000, health_interval=None)

    @engine.task
    async def quick(ctx: TaskContext) -> dict[str, int]:
        return {"ok": 1}

    return engine


async def rate(engine: Engine, seconds: float) -> float:
    started = time.perf_counter()
    runs = 0
    while time.perf_counter() - started < seconds:
        handles = [await engine.submit("quick") for _ in range(50)]
        for handle in handles:
            await handle
        runs += 50
    return runs / (time.perf_counter() - started)


async def rates(engine: Engine, seconds: int) -> list[int]:
    return [round(await rate(engine, 1.0)) for _ in range(seconds)]


async def with_readers(engine: Engine, address: str, token: str, n: int, seconds: int) -> list[int]:
    if n == 0:
        return await rates(engine, seconds)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", READERS, address, token, str(n), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert child.stdout is not None
        for _ in range(n):
            await asyncio.wait_for(child.stdout.readline(), 10)
        return await rates(engine, seconds)
    finally:
        child.kill()
        await child.wait()


async def attaches(address: str, token: str, tries: int = 10) -> tuple[int, list[str]]:
    ok, failures = 0, []
    for _ in range(tries):
        remote = RemoteEngine(address, token=token, timeout=5)
        try:
            await remote.connect()
            ok += 1
        except (OSError, TimeoutError, TaskwatchError) as exc:
            failures.append(type(exc).__name__)
        finally:
            await remote.close()
    return ok, failures


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--readers", default="0,1,4,10")
    parser.add_argument("--no-flood", action="store_true")
    args = parser.parse_args()
    engine = build_engine()
    async with engine:
        server = await engine.serve("tcp://127.0.0.1:0", announce=False)
        assert server.token is not None
        await rate(engine, 1.0)  # warm up
        for n in (int(x) for x in args.readers.split(",")):
            got = await with_readers(engine, server.address, server.token, n, args.seconds)
            print(f"{n:3d} reading clients: runs/s {got}  median {statistics.median(got):,.0f}", flush=True)
        if not args.no_flood:
            flood = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.raw_client", "flood", server.address,
                stdout=asyncio.subprocess.PIPE, cwd=REPO,
            )
            try:
                assert flood.stdout is not None
                await asyncio.wait_for(flood.stdout.readline(), 30)
                got = await rates(engine, args.seconds)
                ok, failures = await attaches(server.address, server.token)
            finally:
                flood.kill()
                await flood.wait()
            print(f"connect flood:      runs/s {got}  median {statistics.median(got):,.0f}; "
                  f"real attaches {ok}/10 {failures or ''}", flush=True)
        print(json.dumps({k: v for k, v in server.stats().items() if v}))


if __name__ == "__main__":
    asyncio.run(main())
