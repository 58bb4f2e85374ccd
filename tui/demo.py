"""The demo engine behind ``taskwatch`` with no arguments and ``make run``.

It exercises every pattern at once so the dashboard looks alive from the
first second: one-shot tasks of varied length with progress, failures with
real tracebacks, retries, periodic tasks (two disabled with a reason), a
queue, a threshold trigger and a leader-only supervised worker that crashes
now and then. ``seed`` makes the random choices repeatable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, Field
from taskwatch.engine import Engine, TaskContext
from taskwatch.widgets import printable


class EmbedParams(BaseModel):
    user_id: str = Field(description="whose memories to embed")
    contents: list[str] = Field(description="texts to embed")


class ResizeParams(BaseModel):
    url: str
    width: int = 512
    height: int = 512


class EmailParams(BaseModel):
    to: str
    subject: str = "Your weekly digest"
    urgent: bool = False


class CrunchParams(BaseModel):
    steps: int = Field(default=40, ge=1, le=10_000)
    step_seconds: float = Field(default=0.15, ge=0, le=10)


class ReportParams(BaseModel):
    account_id: int
    options: dict[str, Any] = Field(default_factory=dict)


class UnsupportedFormat(ValueError):
    pass


def _decode_header(url: str) -> str:
    if url.endswith((".bmp", ".tiff")):
        raise UnsupportedFormat(f"cannot decode {url.rsplit('.', 1)[-1]} images: no codec installed")
    return "png"


#: the loggers that report failing user code, each failure with its traceback
FAILURE_LOGGERS = ("taskwatch.runs", "taskwatch.queues", "taskwatch.supervisor")


@contextlib.contextmanager
def demo_failures_unlogged() -> Iterator[None]:
    """While the demo runs, its failures are not logged (unless a logger's level was set).

    The demo fails on purpose (a flaky SMTP relay, a bad queue job, a crashing worker), to
    show what failing looks like; each failure's traceback would fill ``--plain``'s stderr,
    the web server's log, or the terminal once the dashboard closes. Its events still say
    every failure. A context of its own, not part of :func:`build_demo_engine`, which tests
    build in their own process: the loggers are the process's.
    """
    quieted = [
        logger for name in FAILURE_LOGGERS if (logger := logging.getLogger(name)).level == logging.NOTSET
    ]
    for logger in quieted:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger in quieted:
            if logger.level == logging.ERROR:  # unless something else has set it since
                logger.setLevel(logging.NOTSET)


def build_demo_engine(seed: int | None = None, *, speed: float = 1.0, **options: Any) -> Engine:
    """Build (not start) the demo engine. ``speed`` > 1 makes everything faster."""
    rng = random.Random(seed)
    options.setdefault("node_id", "demo-node")
    options.setdefault("max_concurrency", 6)
    options.setdefault("flags", {"kg_extraction": False, "digest_emails": True})
    engine = Engine(**options)

    def pause(seconds: float) -> Any:
        return asyncio.sleep(seconds / speed)

    # ---------------------------------------------------------------- one-shot tasks

    @engine.task(name="embed_batch", retries=2, timeout=30.0, concurrency=2)
    async def embed_batch(ctx: TaskContext, params: EmbedParams) -> dict[str, Any]:
        """Embed a user's texts into the vector store."""
        for i, text in enumerate(params.contents, 1):
            await pause(0.2 + rng.random() * 0.4)
            await ctx.progress(i, len(params.contents), f"embedded {text!r}")
        return {"user_id": params.user_id, "stored": len(params.contents)}

    @engine.task(name="resize_image", timeout=10.0)
    async def resize_image(ctx: TaskContext, params: ResizeParams) -> dict[str, Any]:
        """Resize an image; .bmp and .tiff fail with a real traceback."""
        await ctx.progress(0, 3, "downloading")
        await pause(0.3 + rng.random())
        await ctx.progress(1, 3, "decoding")
        fmt = _decode_header(params.url)
        await pause(0.2)
        await ctx.progress(2, 3, f"resizing to {params.width}x{params.height}")
        await pause(0.3 + rng.random())
        await ctx.progress(3, 3, "uploaded")
        return {"url": params.url, "format": fmt, "size": [params.width, params.height]}

    @engine.task(name="send_email", retries=3, backoff=0.5)
    async def send_email(ctx: TaskContext, params: EmailParams) -> str:
        """Send an email through a flaky SMTP relay (retries on connection errors)."""
        await pause(0.1 + rng.random() * 0.3)
        if ctx.attempt < 3 and rng.random() < 0.5:
            raise ConnectionError(f"SMTP relay refused the connection (attempt {ctx.attempt})")
        return f"sent {params.subject!r} to {params.to}"

    @engine.task(name="crunch_numbers", timeout=120.0, concurrency=1)
    async def crunch_numbers(ctx: TaskContext, params: CrunchParams) -> dict[str, float]:
        """A long computation reporting progress at every step."""
        total = 0.0
        for step in range(1, params.steps + 1):
            await asyncio.sleep(params.step_seconds / speed)
            total += step**0.5
            await ctx.progress(step, params.steps, f"step {step}/{params.steps}")
        return {"sum_of_roots": round(total, 3)}

    @engine.task(name="build_report", timeout=5.0)
    async def build_report(ctx: TaskContext, params: ReportParams) -> dict[str, Any]:
        """Build an account report; account ids divisible by 7 hit a missing key."""
        await pause(0.5 + rng.random())
        ledger = {i: i * 10 for i in range(100) if i % 7}
        return {"account_id": params.account_id, "balance": ledger[params.account_id % 100]}

    # ---------------------------------------------------------------- periodic tasks

    @engine.periodic(every=3.0 / speed, initial_delay=0.5 / speed, name="traffic")
    async def traffic(ctx: TaskContext) -> int:
        """Submit a handful of demo runs so there is always something to watch."""
        submitted = 0
        for _ in range(rng.randint(1, 3)):
            choice = rng.random()
            if choice < 0.3:
                words = rng.sample(["alpha", "beta", "gamma", "delta", "omega", "sigma"], k=rng.randint(2, 5))
                await engine.submit("embed_batch", {"user_id": f"u{rng.randint(1, 50)}", "contents": words})
            elif choice < 0.55:
                ext = rng.choice(["png", "jpg", "jpg", "bmp"])
                await engine.submit("resize_image", {"url": f"https://cdn.example/{rng.randint(100, 999)}.{ext}"})
            elif choice < 0.75:
                await engine.submit("send_email", {"to": f"user{rng.randint(1, 99)}@example.com"})
            elif choice < 0.9:
                await engine.submit("build_report", {"account_id": rng.randint(1, 200)})
            else:
                await engine.submit("crunch_numbers", {"steps": rng.randint(10, 40)})
            submitted += 1
        return submitted

    @engine.periodic(every=5.0 / speed, name="cleanup_sessions", jitter=0.1)
    async def cleanup_sessions(ctx: TaskContext) -> dict[str, int]:
        """Expire idle sessions."""
        await pause(0.2)
        return {"expired": rng.randint(0, 12)}

    @engine.periodic(cron="0 3 * * *", name="nightly_backup", timeout=3600)
    async def nightly_backup(ctx: TaskContext) -> None:
        """Back up the database at 03:00 every night."""
        await pause(1.0)

    @engine.periodic(every=10.0, opt_in="kg_extraction", name="kg_extraction")
    async def kg_extraction(ctx: TaskContext) -> None:
        """Extract a knowledge graph (disabled: the kg_extraction flag is off)."""

    @engine.periodic(every=60.0, requires=("redis",), name="scheduled_prompt_tick")
    async def scheduled_prompt_tick(ctx: TaskContext, redis: Any) -> None:
        """Fire scheduled prompts (disabled: no redis resource in the demo)."""

    # ---------------------------------------------------------------- queue and trigger

    class SignificanceJob(BaseModel):
        turn_id: int
        text: str

    async def score_significance(job: SignificanceJob) -> None:
        await pause(0.05 + rng.random() * 0.1)
        if "error" in job.text:
            raise ValueError(f"cannot score turn {job.turn_id}: text contains an error marker")

    significance = engine.queue("significance", score_significance, concurrency=2, maxsize=500)

    async def run_compile(ctx: TaskContext, key: str) -> dict[str, str]:
        await ctx.progress(0, 1, f"compiling {key}")
        await pause(0.5 + rng.random())
        await ctx.progress(1, 1, "done")
        return {"bank": key}

    compile_trigger = engine.trigger(
        "compile", run_compile, size_threshold=5, staleness=timedelta(seconds=20 / speed), staleness_min=2
    )

    @engine.periodic(every=0.5 / speed, name="chat_turns", fixed_rate=True)
    async def chat_turns(ctx: TaskContext) -> int:
        """Feed the significance queue and the compile trigger like a chat backend would."""
        turns = rng.randint(2, 6)
        for _ in range(turns):
            turn = rng.randint(1, 10_000)
            text = rng.choice(["hello", "thanks", "an error happened", "what's new", "remind me"])
            significance.put_nowait(SignificanceJob(turn_id=turn, text=text))
            compile_trigger.notify(f"bank-{rng.randint(1, 4)}")
        return turns

    # ---------------------------------------------------------------- supervised worker

    @engine.supervised(name="dedup_worker", leader_only=True, backoff=1.0, backoff_max=8.0)
    async def dedup_worker(ctx: TaskContext) -> None:
        """Deduplicate memories; crashes now and then and is restarted with backoff."""
        while True:
            await pause(1.0)
            await ctx.ensure_leader()
            if rng.random() < 0.08:
                raise RuntimeError("duplicate index is corrupt; rebuilding from scratch")

    return engine


async def print_events(engine: Engine, seconds: float | None = None) -> None:
    """Run ``engine`` (the demo's or an app's) and print each event as a line (no dashboard)."""
    sub = engine.bus.subscribe(maxsize=50_000)
    async with engine:
        loop = asyncio.get_running_loop()
        end = None if seconds is None else loop.time() + seconds
        while end is None or loop.time() < end:
            timeout = None if end is None else max(0.0, end - loop.time())
            if not await sub.wait(timeout):
                if sub.closed:
                    break  # the app stopped its engine itself
                continue
            for event in sub.get_batch():
                print(format_event_line(event), flush=True)
    for event in sub.get_batch():
        print(format_event_line(event), flush=True)


def format_event_line(event: Any) -> str:
    fields = event.model_dump(exclude={"seq", "ts", "node", "kind"})
    for noisy in ("params", "result", "error"):
        value = fields.get(noisy)
        if isinstance(value, dict) and noisy == "error":
            fields[noisy] = f"{value.get('type')}: {value.get('message')}"
    body = " ".join(f"{k}={v}" for k, v in fields.items() if v not in (None, {}, []))
    # one line per event, and nothing in it a terminal would take for a command: a task's
    # error message or name may hold escape sequences
    return printable(f"{event.seq:>6} {event.kind:<22} {body}")
