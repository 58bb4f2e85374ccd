"""A program on the memory store that ends without ``engine.stop()`` while runs wait for a slot:
an exception out of ``asyncio.run(main())``, or Ctrl-C. The loop's teardown cancels every task
it finds, the engine's runs and queue consumers among them; a freed slot must not start the
next waiting run then (its task, made after the teardown collected the tasks it awaits, would
be destroyed pending), and a consumer cancelled by it is no one's cancel: none takes its place,
and nothing says so. The program exits with its own error, and nothing else on stderr.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

_CHILD = """
import asyncio, sys
from taskwatch.engine import Engine, TaskContext

engine = Engine(store="memory", max_concurrency=4)
started = 0
runs_going = asyncio.Event()
job_going = asyncio.Event()


@engine.task(name="long")
async def long(ctx: TaskContext) -> None:
    global started
    started += 1
    print("run started", flush=True)
    if started == 4:
        runs_going.set()
    await asyncio.Event().wait()


async def handle(job: int) -> None:
    job_going.set()
    await asyncio.Event().wait()


# two consumers: one handling a job when the program ends, one waiting for the next
jobs = engine.queue("jobs", handle, concurrency=2)


async def main() -> None:
    await engine.start()  # no `async with`, and no stop()
    for _ in range(12):
        await engine.submit("long")
    await jobs.put(1)
    await runs_going.wait()
    await job_going.wait()
    print("going", flush=True)
    if sys.argv[1] == "raise":
        raise RuntimeError("a bug elsewhere in the program")
    await asyncio.Event().wait()  # until Ctrl-C


asyncio.run(main())
"""

#: what a teardown that starts runs or replaces consumers left on stderr: runs destroyed pending
#: (and failed by the GeneratorExit that closes them), a callback with no loop, a consumer
#: "replaced", the job it was handling counted as failed
_NOISE = ("Task was destroyed", "Exception ignored", "another takes its place", "failed")


def _end_child(tmp_path: Path, how: str) -> tuple[list[str], str, int]:
    """Run the child until its first 4 runs and its job are going, end it ``how``; its stdout
    lines, its stderr and its exit code."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), how], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while (line := proc.stdout.readline()) and line.strip() != "going":
            lines.append(line.strip())
        assert line, f"the child ended before its runs were going: {lines} {proc.communicate()[1]}"
        if how == "sigint":
            proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return lines + out.splitlines(), err, proc.returncode


@pytest.mark.parametrize("how", ["raise", "sigint"])
def test_a_program_ending_without_stop_starts_no_run_and_says_nothing_of_its_own(tmp_path: Path, how: str) -> None:
    out, err, code = _end_child(tmp_path, how)
    noise = [said for said in _NOISE if said in err]
    assert (out.count("run started"), noise) == (4, []), err
    if how == "raise":
        assert code == 1
        assert "Traceback" in err and "RuntimeError: a bug elsewhere in the program" in err, err
    else:
        assert code == -signal.SIGINT
        assert "KeyboardInterrupt" in err, err
