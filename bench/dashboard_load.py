"""How many events per second the headless dashboard absorbs, at what CPU cost.

The engine runs on its own thread (as under ``taskwatch``) and a paced
producer submits no-op runs (three events each) at a set rate; the dashboard
runs headless in the main thread, draining and redrawing at its fixed rate.
For each offered rate it prints the events absorbed per second, the ratio of
absorbed to offered, events dropped, the process's CPU use, the redraws per
second the dashboard achieved while the flood went on (each one drains the
buffer and updates the screen; the timer asks for 15) with their
ratio to that target and the median time one took, and how long a key press
(switching tabs) takes to be handled.

    python bench/dashboard_load.py [--seconds 4] [--rates 2500,5000,10000,20000] [--repeat 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import psutil
from taskwatch.engine import Engine, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.client import LocalClient
from textual.widgets import TabbedContent

EVENTS_PER_RUN = 3
#: the redraw rate the dashboard asks for (its default)
REFRESH_HZ = 15.0


def build_engine(max_queue: int) -> Engine:
    engine = Engine(node_id="bench", max_queue=max_queue, history=5_000, health_interval=1.0)

    @engine.task
    async def nothing(ctx: TaskContext) -> None:
        return None

    return engine


async def produce(engine: Engine, events_per_second: float, seconds: float) -> int:
    """Submit runs on the engine's loop at a steady pace; returns runs submitted."""
    runs_per_second = events_per_second / EVENTS_PER_RUN
    loop = asyncio.get_running_loop()
    start = loop.time()
    submitted = 0
    while (elapsed := loop.time() - start) < seconds:
        due = int(elapsed * runs_per_second) - submitted
        for _ in range(due):
            engine.submit_nowait("nothing")
        submitted += max(0, due)
        await asyncio.sleep(0.005)
    return submitted


async def measure(rate: float, seconds: float) -> dict[str, float]:
    engine = build_engine(max_queue=int(rate * seconds) + 10)
    bg = engine.start_background()
    app = TaskwatchApp(LocalClient(engine), refresh_hz=REFRESH_HZ)
    proc = psutil.Process()
    # how long each redraw takes: wrapped before the app starts its timer with it
    redraw_seconds: list[float] = []
    redraw = app.redraw

    def timed_redraw(full: bool = False) -> None:
        started = time.perf_counter()
        redraw(full)
        redraw_seconds.append(time.perf_counter() - started)

    app.redraw = timed_redraw  # type: ignore[method-assign]
    try:
        async with app.run_test(size=(140, 42)) as pilot:
            while not app.state.node_id:
                await pilot.pause(0.01)
            seen0, frames0, redraws0 = app.events_seen, app.frames, len(redraw_seconds)
            cpu0, wall0 = proc.cpu_times(), time.perf_counter()
            producing = asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(produce(engine, rate, seconds), bg.loop)
            )
            latencies = []
            tabs = app.main.query_one(TabbedContent)
            keys = ["2", "1"]
            while not producing.done():
                key = keys[len(latencies) % 2]
                pressed = time.perf_counter()
                # measured until the tab has switched, not until the app is idle
                # (under a flood it never is)
                pressing = asyncio.ensure_future(pilot.press(key))
                while tabs.active != {"1": "runs", "2": "failures"}[key]:
                    await asyncio.sleep(0.001)
                latencies.append(time.perf_counter() - pressed)
                await pressing
                await asyncio.sleep(0.2)
            submitted = await producing
            # redraws while the flood went on (the catch-up after it is quieter)
            flood_wall = time.perf_counter() - wall0
            flood_frames = app.frames - frames0
            flood_redraws = redraw_seconds[redraws0:]
            offered_events = submitted * EVENTS_PER_RUN
            # let the dashboard catch up with what was published, then stop the clock
            deadline = time.perf_counter() + 30
            while (
                app.state.events_applied - 0 < 1 or app.client.pending_events() > 0 or bg.stats().running > 0
            ) and time.perf_counter() < deadline:
                await asyncio.sleep(0.01)
            wall = time.perf_counter() - wall0
            cpu1 = proc.cpu_times()
            absorbed = app.events_seen - seen0
    finally:
        bg.stop(timeout=5)
    cpu = (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / wall * 100
    return {
        "offered": offered_events / seconds,
        "absorbed": absorbed / wall,
        "ratio": absorbed / max(1, offered_events),
        "dropped": float(app.client.dropped + app.state.dropped),
        "cpu": cpu,
        "fps": flood_frames / flood_wall,
        "fps_ratio": flood_frames / flood_wall / REFRESH_HZ,
        "redraw_ms": statistics.median(flood_redraws) * 1000 if flood_redraws else float("nan"),
        "key_ms": statistics.median(latencies) * 1000 if latencies else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rates", default="2500,5000,10000,20000")
    parser.add_argument("--repeat", type=int, default=1, help="rounds over all rates (the machine is noisy)")
    args = parser.parse_args()
    print(
        f"{'offered ev/s':>13} {'absorbed ev/s':>14} {'absorbed/offered':>17} {'dropped':>8} {'CPU %':>6} "
        f"{'redraws/s':>10} {'/ target':>9} {'redraw ms':>10} {'key press ms':>13}"
    )
    for _ in range(args.repeat):
        for rate in (float(r) for r in args.rates.split(",")):
            r = asyncio.run(measure(rate, args.seconds))
            print(
                f"{r['offered']:>13,.0f} {r['absorbed']:>14,.0f} {r['ratio']:>17.2f} {r['dropped']:>8,.0f} "
                f"{r['cpu']:>6.0f} {r['fps']:>10.1f} {r['fps_ratio']:>9.2f} {r['redraw_ms']:>10.1f} {r['key_ms']:>13.1f}",
                flush=True,
            )
    print("CPU % is the whole process (engine thread + dashboard), 100 = one core.")
    print(f"redraws/s is counted while runs are submitted; the target is {REFRESH_HZ:g} a second.")


if __name__ == "__main__":
    main()
