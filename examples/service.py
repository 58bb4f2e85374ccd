"""An engine the dashboard can load: `taskwatch examples.service:engine`.

Shows the shape of a real service: tasks registered at import time, a
resource handed in by name, a periodic task gated by a flag.
"""

from __future__ import annotations

import asyncio
import random

from pydantic import BaseModel
from taskwatch.engine import Engine, TaskContext


class FakeCache:
    """Stands in for a Redis client or a database pool."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}


engine = Engine(node_id="service-1", resources={"cache": FakeCache()}, flags={"warm_cache": True})


class ThumbnailParams(BaseModel):
    image_id: int
    size: int = 256


@engine.task(retries=2, timeout=10)
async def thumbnail(ctx: TaskContext, params: ThumbnailParams) -> dict[str, int]:
    """Render a thumbnail."""
    for step in range(1, 5):
        await asyncio.sleep(0.2)
        await ctx.progress(step, 4, f"pass {step}")
    if params.image_id % 13 == 0:
        raise ValueError(f"image {params.image_id} is corrupt")
    return {"image_id": params.image_id, "size": params.size}


@engine.periodic(every=2.0, requires=("cache",), opt_in="warm_cache")
async def warm_cache(ctx: TaskContext, cache: FakeCache) -> int:
    """Keep hot keys warm."""
    cache.data[f"k{random.randint(1, 100)}"] = random.randint(1, 1000)
    return len(cache.data)
