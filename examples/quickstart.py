"""The README's first example, runnable: `python examples/quickstart.py`."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel
from taskwatch.engine import Engine, TaskContext

engine = Engine(max_concurrency=8, max_queue=10_000, history=1_000, health_interval=None)


class EmbedParams(BaseModel):
    user_id: str
    contents: list[str]


@engine.task(name="embed_batch", retries=2, timeout=30.0, concurrency=2)
async def embed_batch(ctx: TaskContext, params: EmbedParams) -> dict[str, int]:
    for i, text in enumerate(params.contents, 1):
        await asyncio.sleep(0.05)
        await ctx.progress(i, len(params.contents), f"embedded {text!r}")
    return {"stored": len(params.contents)}


async def main() -> None:
    engine.bus.add_callback(lambda e: print(f"{e.seq:>3} {e.kind}"), kinds=["run."])
    async with engine:
        handle = await engine.submit("embed_batch", {"user_id": "u1", "contents": ["a", "b", "c"]})
        run = await handle.wait()
        print(run.status.value, run.result, f"{run.duration:.3f}s")
        later = await engine.submit("embed_batch", {"user_id": "u2", "contents": ["c"]})
        cancelled = await engine.cancel(later.id)
        print(later.id, cancelled.status.value, cancelled.cancel_reason)
        print(engine.get(handle.id).status.value, [r.id for r in engine.runs(status="cancelled", limit=50)])
        print(engine.stats().model_dump_json(indent=2))


if __name__ == "__main__":
    asyncio.run(main())
