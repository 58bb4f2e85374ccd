"""A repeatable dashboard scenario, and the script that pictures every screen.

``python -m taskwatch.tui.screenshots DIR`` (``make screenshots``) writes one
SVG per screen, the cluster dashboard's included (``cluster_screenshots``).
The snapshot tests play the same scenario. Everything that could vary
between runs is pinned: a frozen wall clock that only the scenario moves,
sequential run ids, health samples built from a formula, and failing task
code compiled under a fixed file name so tracebacks do not show where the
project happens to be checked out.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from taskwatch.engine import Engine, RunHandle, RunStatus, TaskContext
from taskwatch.engine.events import HealthSample
from taskwatch.widgets import FailuresList, RunsTable

from textual.app import App
from textual.pilot import Pilot
from textual.widgets import RichLog

from .app import TaskwatchApp
from .client import LocalClient
from .demo import CrunchParams, EmailParams, EmbedParams, ResizeParams, demo_failures_unlogged

#: 2026-11-23 09:00:00 UTC
EPOCH = 1_795_424_400.0
SIZE = (140, 42)


class FrozenClock:
    """A wall clock that stands still until told to move."""

    def __init__(self, now: float = EPOCH) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Ids:
    def __init__(self) -> None:
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"r{self.n:07d}"


# The tasks that fail, compiled under a stable file name so their tracebacks
# read the same wherever the project is checked out.
_FAILING_SOURCE = """
async def resize_image(ctx, params):
    await ctx.progress(1, 3, "decoding")
    clock.advance(0.8)
    return {"url": params.url, "format": decode_header(params.url)}

def decode_header(url):
    if url.endswith(".bmp"):
        raise ValueError("cannot decode bmp images: no codec installed")
    return "png"

async def send_email(ctx, params):
    clock.advance(0.2)
    if ctx.attempt < 3:
        raise ConnectionError(f"SMTP relay refused the connection (attempt {ctx.attempt})")
    return f"sent {params.subject!r} to {params.to}"

async def build_report(ctx, params):
    clock.advance(1.1)
    return ledger_balance(len(params.contents) * 7)

def ledger_balance(account_id):
    ledger = {i: i * 10 for i in range(100) if i % 7}
    return ledger[account_id % 100]

async def dedup_worker(ctx):
    await ctx.ensure_leader()
    raise RuntimeError("duplicate index is corrupt; rebuilding from scratch")
"""


def _failing_tasks(clock: FrozenClock) -> dict[str, Any]:
    namespace: dict[str, Any] = {"clock": clock}
    exec(compile(_FAILING_SOURCE, "app/tasks.py", "exec"), namespace)
    return namespace


def build_scenario_engine(clock: FrozenClock) -> Engine:
    engine = Engine(
        node_id="demo-node",
        clock=clock,
        run_id_factory=Ids(),
        health_interval=None,
        max_concurrency=4,
        flags={"kg_extraction": False},
    )
    gate = asyncio.Event()  # never set: the long run stays running until stop cancels it

    @engine.task(name="embed_batch", retries=2, timeout=30.0, concurrency=2)
    async def embed_batch(ctx: TaskContext, params: EmbedParams) -> dict[str, Any]:
        """Embed a user's texts into the vector store."""
        for i, text in enumerate(params.contents, 1):
            clock.advance(0.4)
            await ctx.progress(i, len(params.contents), f"embedded {text!r}")
        return {"user_id": params.user_id, "stored": len(params.contents)}

    failing = _failing_tasks(clock)
    engine.register(
        failing["resize_image"], name="resize_image", params=ResizeParams, timeout=10.0,
        description="Resize an image; .bmp fails.",
    )
    engine.register(
        failing["send_email"], name="send_email", params=EmailParams, retries=2, backoff=0.001,
        description="Send an email through a flaky SMTP relay.",
    )
    engine.register(
        failing["build_report"], name="build_report", params=EmbedParams,
        description="Build an account report.",
    )

    @engine.task(name="crunch_numbers", concurrency=1)
    async def crunch_numbers(ctx: TaskContext, params: CrunchParams) -> None:
        """A long computation reporting progress at every step."""
        await ctx.progress(12, params.steps, f"step 12/{params.steps}")
        await gate.wait()

    @engine.periodic(every=300.0, initial_delay=300.0, name="cleanup_sessions", timeout=60)
    async def cleanup_sessions(ctx: TaskContext) -> None:
        """Expire idle sessions."""

    @engine.periodic(cron="0 3 * * *", name="nightly_backup")
    async def nightly_backup(ctx: TaskContext) -> None:
        """Back up the database at 03:00."""

    @engine.periodic(every=10.0, opt_in="kg_extraction", name="kg_extraction")
    async def kg_extraction(ctx: TaskContext) -> None:
        """Extract a knowledge graph."""

    @engine.periodic(every=60.0, requires=("redis",), name="scheduled_prompt_tick")
    async def scheduled_prompt_tick(ctx: TaskContext, redis: Any) -> None:
        """Fire scheduled prompts."""

    # first due long after the story ends: it is paused in the story, and must not fire before
    @engine.periodic(every=120.0, initial_delay=900.0, name="traffic")
    async def traffic(ctx: TaskContext) -> None:
        """Generate demo traffic."""

    async def score(job: dict[str, Any]) -> None:
        if "error" in job["text"]:
            raise ValueError(f"cannot score turn {job['turn_id']}: text contains an error marker")

    engine.queue("significance", score, concurrency=2, maxsize=500)

    async def run_compile(ctx: TaskContext, key: str) -> dict[str, str]:
        clock.advance(0.6)
        return {"bank": key}

    engine.trigger("compile", run_compile, size_threshold=3, staleness=3600.0, staleness_min=2, check_interval=3600.0)

    engine.supervised(failing["dedup_worker"], name="dedup_worker", leader_only=True, backoff=3600.0, backoff_max=3600.0)

    return engine


def health_sample(i: int) -> dict[str, Any]:
    """A plausible, repeatable health sample number ``i``."""
    wave = math.sin(i / 5.0)
    return {
        "cpu_percent": round(22 + 15 * wave + (i % 7), 1),
        "rss_bytes": int((88 + i * 0.35 + 3 * math.cos(i / 9.0)) * 1024 * 1024),
        "threads": 3,
        "open_fds": 17,
        "loop_lag_ms": round(0.4 + 0.3 * abs(wave) + (2.5 if i % 23 == 0 else 0), 2),
        "running": 1 + i % 3,
        "queue_depth": (i * 3) % 5,
        "queue_depths": {"significance": (i * 5) % 9},
        "finished_per_s": round(6 + 4 * math.sin(i / 4.0) + (i % 3), 1),
        "failed_per_s": float(1 if i % 11 == 0 else 0),
    }


async def play(engine: Engine, clock: FrozenClock, bulk: bool = False) -> None:
    """Drive the engine through a fixed story; returns once it is quiescent.

    ``bulk`` first runs a few hundred quick runs, so the counts have three digits.
    """
    # the leader-only worker crashes as soon as this node leads: its crash shows the start
    # time only if it happens before the story moves the clock (on a loaded machine the
    # election can come later than the first steps of the story)
    await _until(lambda: any(w.crashes for w in engine.workers()))
    if bulk:
        for i in range(360):
            clock.advance(0.01)
            if i % 3 == 2:
                handle = await engine.submit("resize_image", {"url": f"https://cdn.example/{i}.bmp"})
            else:
                handle = await engine.submit("embed_batch", {"user_id": f"u{i}", "contents": []})
            await _finished(handle, clock)
    for i in range(90):
        clock.advance(1.0)
        engine.bus.emit(HealthSample, **health_sample(i))
    steps: list[tuple[str, dict[str, Any]]] = [
        ("embed_batch", {"user_id": "u7", "contents": ["alpha", "beta", "gamma"]}),
        ("resize_image", {"url": "https://cdn.example/412.png"}),
        ("send_email", {"to": "ada@example.com"}),
        ("resize_image", {"url": "https://cdn.example/977.bmp"}),
        ("build_report", {"user_id": "acct-3", "contents": ["q1"]}),
        ("embed_batch", {"user_id": "u12", "contents": ["delta", "omega"]}),
        ("send_email", {"to": "grace@example.com", "subject": "Invoice"}),
    ]
    for task, params in steps:
        clock.advance(2.0)
        await _finished(await engine.submit(task, params), clock)
    queue = engine.get_queue("significance")
    for turn, text in [(101, "hello"), (102, "an error happened"), (103, "thanks")]:
        queue.put_nowait({"turn_id": turn, "text": text})
    await queue.join(timeout=5)
    trigger = engine.get_trigger("compile")
    for key in ["bank-1", "bank-2", "bank-2", "bank-3", "bank-1", "bank-1"]:
        trigger.notify(key)
    await trigger.drain(timeout=5)
    clock.advance(3.0)
    long = await engine.submit("crunch_numbers", {"steps": 40})
    await _until(lambda: long.record().progress.done == 12)
    clock.advance(0.5)
    await engine.submit("crunch_numbers", {"steps": 10})  # waits behind the first: pending
    engine.pause_periodic("traffic")
    await _until(lambda: any(w.crashes for w in engine.workers()))
    clock.advance(1.5)


async def _finished(handle: RunHandle, clock: FrozenClock) -> None:
    """Wait for a run, moving the frozen clock past each retry's backoff once (retries are due by it)."""
    waited: set[int] = set()

    def done() -> bool:
        record = handle.record()
        if record.status is RunStatus.PENDING and record.attempt > 1 and record.attempt not in waited:
            waited.add(record.attempt)
            clock.advance(0.01)
        return record.status.finished

    await _until(done)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the screenshot scenario did not settle")
        await asyncio.sleep(0.005)


def scenario_app() -> tuple[TaskwatchApp, Engine, FrozenClock]:
    """The dashboard on the scenario engine, both on the app's own loop."""
    clock = FrozenClock()
    engine = build_scenario_engine(clock)
    engine.incarnation = "5ca1ab1e0ddba11s"  # shown in the header: the same in every picture
    app = TaskwatchApp(
        LocalClient(engine, manage=True, stop_timeout=0.1), clock=clock, overview_interval=3600.0, cursor_blink=False
    )
    return app, engine, clock


async def settle(app: TaskwatchApp, engine: Engine, clock: FrozenClock, bulk: bool = False) -> None:
    """Play the scenario inside a running app and wait until the screen shows all of it."""
    # the dashboard's first snapshot comes before the story, never part-way through it:
    # the event log, the finish rate and the Tasks tab's "since" all start from it
    await _until(lambda: engine.state == "running" and app.state.stats is not None)
    await play(engine, clock, bulk)
    await app.refresh_overview().wait()
    app.redraw(full=True)
    await _until(lambda: app.client.pending_events() == 0 and app.state.last_seq == engine.bus.last_seq)
    app.redraw(full=True)
    app.refresh_tables()
    # the cursors land where the story's updates left them; put them somewhere fixed
    app.main.query_one(RunsTable).select_run("r0000009" if not bulk else engine.runs(status="running")[0].id)
    app.main.query_one(FailuresList).select("run", "r0000005")
    app.redraw(full=True)


# screen name -> keys pressed after the scenario has played
SCREENS: dict[str, list[str]] = {
    "runs": [],
    "attempts": ["down", "down"],  # send_email, which succeeded on its third attempt
    "failures": ["2"],
    "scheduler": ["3"],
    "health": ["4"],
    "events": ["5"],
    "tasks": ["6"],
    "submit": ["s"],
    "submit_invalid": ["s", "tab", "u", "7", "tab", "left_square_bracket", "enter"],
    "traceback": ["2", "t"],
    "help": ["question_mark"],
    "runs_80x24": [],
    "runs_160x48": ["p"],  # three-digit counts beside the paused indicator
    "detail_80x24": ["down", "down", "enter"],
    "scheduler_80x24": ["3"],
    # the fields scroll; the wrong one, its error and the buttons stay in sight
    "submit_80x24": ["s", "tab", "u", "7", "tab", "left_square_bracket", "enter"],
}


#: screens pictured at another terminal size than SIZE
SIZES: dict[str, tuple[int, int]] = {
    "runs_80x24": (80, 24),
    "runs_160x48": (160, 48),
    "detail_80x24": (80, 24),
    "scheduler_80x24": (80, 24),
    "submit_80x24": (80, 24),
}


#: screens played with a few hundred runs first (three-digit counts)
BULK = frozenset({"runs_160x48"})


def _pin_environment() -> None:
    os.environ["TZ"] = "UTC"
    time.tzset()
    os.environ["TEXTUAL_ANIMATIONS"] = "none"


async def press(app: App[None], pilot: Pilot[None], keys: list[str]) -> None:
    """Press ``keys`` as a user would, then wait until the screen is still.

    A log shown for the first time writes its backlog and scrolls to its end
    a refresh later; on a loaded machine the picture could catch it one line
    short, so the wait lasts until every visible log sits at its end.
    """
    await pilot.pause()
    for key in keys:
        await pilot.press(key)
        await pilot.pause()
    await pilot.wait_for_scheduled_animations()
    await pilot.pause()
    logs = [log for log in app.screen.query(RichLog) if log.display and log.region.height]
    await _until(lambda: all(log.scroll_y >= log.max_scroll_y for log in logs))
    await pilot.pause()
    # a key's work travels as messages (Enter in a field: Input.Submitted, then the form's
    # Submitted, then the errors laid out, then a scroll after the refresh), and a pause
    # only waits for what was queued when it began; on a loaded machine the picture could
    # catch the chain half way. A chain under way always has a message queued somewhere,
    # so the picture waits until every message pump has been seen empty (the dashboard's
    # redraw timer keeps some busy now and then, so not at every look) and no scroll offset
    # has moved since
    await _until_still(app, pilot)


def _pending_messages(app: App[None]) -> int:
    pumps: list[Any] = [app]
    for screen in app.screen_stack:
        pumps.extend(screen.walk_children(with_self=True))
    return sum(pump.message_queue_size for pump in pumps)


async def _until_still(app: App[None], pilot: Pilot[None], timeout: float = 30.0) -> None:
    offsets = None
    emptied = False
    still = 0
    deadline = time.monotonic() + timeout
    while not (emptied and still >= 2):
        if time.monotonic() > deadline:
            raise TimeoutError("the dashboard did not come to rest for its picture")
        await pilot.pause()
        now = [(w.scroll_x, w.scroll_y) for w in app.screen.query("*") if w.is_scrollable]
        if now == offsets:
            still += 1
        else:
            still, emptied = 0, False
        emptied = emptied or not _pending_messages(app)
        offsets = now


async def capture(name: str, keys: list[str]) -> str:
    app, engine, clock = scenario_app()
    async with app.run_test(size=SIZES.get(name, SIZE)) as pilot:
        await settle(app, engine, clock, bulk=name in BULK)
        await press(app, pilot, keys)
        svg = app.export_screenshot(title=f"taskwatch — {name}")
    return svg


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "screenshots")
    out.mkdir(parents=True, exist_ok=True)
    _pin_environment()
    with demo_failures_unlogged():  # the pictures' failures are staged, as the demo's are
        return _capture_all(out)


def _capture_all(out: Path) -> int:
    for name, keys in SCREENS.items():
        svg = asyncio.run(capture(name, keys))
        (out / f"{name}.svg").write_text(svg)
        print(f"wrote {out / name}.svg")
    # the cluster dashboard's pictures build on this module's clock and key presses
    from .cluster_screenshots import CLUSTER_SCREENS, capture_cluster, staged_cluster

    for name, keys in CLUSTER_SCREENS.items():
        with staged_cluster() as cluster:
            svg = asyncio.run(capture_cluster(cluster, name, keys))
        (out / f"{name}.svg").write_text(svg)
        print(f"wrote {out / name}.svg")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
