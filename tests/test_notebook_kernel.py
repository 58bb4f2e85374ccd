"""The background engine in a real IPython kernel, driven as Jupyter drives it: cells run
again, a cell interrupted, and a kernel shut down (or restarted) with a run still going.

The kernel is this interpreter (tests/test_notebook.py's ``kernel_dir`` fixture).
"""

from __future__ import annotations

import contextlib
import json
import socket
import sqlite3
import textwrap
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from .test_notebook import kernel_dir  # noqa: F401 - the fixture

CELL_TIMEOUT = 60.0


class Kernel:
    def __init__(self, cwd: Path) -> None:
        self.manager = KernelManager(kernel_name="python3")
        self.manager.start_kernel(cwd=str(cwd))
        self.client: BlockingKernelClient = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=CELL_TIMEOUT)

    def run(self, code: str, on_output: Callable[[], None] | None = None) -> dict[str, str]:
        """Execute a cell; what it wrote, by stream (``stdout``, ``stderr``), and ``error`` if it raised.

        ``on_output`` is called each time the cell writes something, while it runs.
        """
        out: dict[str, str] = {"stdout": "", "stderr": "", "error": ""}

        def hook(msg: dict[str, Any]) -> None:
            content = msg["content"]
            if msg["msg_type"] == "stream":
                out[content["name"]] += content["text"]
                if on_output is not None:
                    on_output()
            elif msg["msg_type"] == "error":
                out["error"] += f"{content['ename']}: {content['evalue']}"

        self.client.execute_interactive(textwrap.dedent(code), timeout=CELL_TIMEOUT, output_hook=hook)
        return out

    def close(self) -> None:
        self.client.stop_channels()
        if self.manager.has_kernel:
            self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(kernel_dir: Path) -> Iterator[Kernel]:  # noqa: F811 - the imported fixture
    k = Kernel(kernel_dir)
    try:
        yield k
    finally:
        k.close()


def running_long_run(db: Path, marker: Path) -> str:
    """A cell: a background engine on the SQLite file ``db`` with one run of a task that waits
    for good, running (`handle`); the run's cleanup appends its attempt to ``marker``."""
    return textwrap.dedent(
        f"""
        import asyncio, time
        from taskwatch.engine import Engine, TaskContext

        engine = Engine(store="sqlite:///{db}", health_interval=None)

        @engine.task
        async def long(ctx: TaskContext) -> None:
            try:
                await asyncio.sleep(3600)
            finally:
                with open({str(marker)!r}, "a") as f:
                    f.write(f"finally attempt={{ctx.attempt}}\\n")

        bg = engine.start_background()
        handle = bg.submit("long")
        deadline = time.monotonic() + 10
        while handle.status.value != "running":
            assert time.monotonic() < deadline, handle.status
            time.sleep(0.01)
        """
    )


def test_shutting_the_kernel_down_hands_a_running_run_back_cleanly(kernel: Kernel, tmp_path: Path) -> None:
    db, marker = tmp_path / "runs.db", tmp_path / "finally.txt"
    # the default stop_timeout (10 s): longer than Jupyter waits
    started = kernel.run(running_long_run(db, marker) + "print(handle.id)\n")
    assert not started["error"], started
    run_id = started["stdout"].strip()
    # what Jupyter's "Shut down kernel" / "Restart" does: ask, then SIGTERM after
    # shutdown_wait_time / 2 (2.5 s), SIGKILL after as long again
    kernel.manager.shutdown_kernel(now=False)
    # the stop at exit ran to its end: the task's cleanup ran, and the run went back to the
    # store's queue for the next start, rather than being left "running" for recovery to call lost
    assert (marker.read_text() if marker.exists() else "") == "finally attempt=1\n"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        status, lost, error = conn.execute(
            "SELECT status, lost_count, error FROM runs WHERE id = ?", (run_id,)
        ).fetchone()
    assert (status, lost) == ("pending", 0)
    assert json.loads(error)["type"] == "Shutdown"  # re-queued by the stop, not found lost later


def serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def test_an_interrupt_leaves_the_dashboard_up_and_a_shutdown_with_it_still_hands_the_run_back(
    kernel: Kernel, tmp_path: Path
) -> None:
    db, marker = tmp_path / "runs.db", tmp_path / "finally.txt"
    started = kernel.run(running_long_run(db, marker) + "print(handle.id, bg.dashboard(port=0))\n")
    assert not started["error"], started
    run_id, url = started["stdout"].splitlines()[-1].split()
    port = int(url.split("/")[2].rsplit(":", 1)[1])
    assert serves(url)

    # Jupyter's Interrupt button: SIGINT to the kernel's whole process group, here while a cell waits
    interrupted = kernel.run('print("waiting", flush=True); time.sleep(30)', on_output=kernel.manager.interrupt_kernel)
    assert interrupted["error"].startswith("KeyboardInterrupt"), interrupted
    # the cell stopped, the dashboard in the IFrame above it did not
    assert serves(url)

    # Jupyter's Restart / Shut down: ask, then SIGTERM after 2.5 s. The dashboard's web server is
    # not one of the children the kernel ends and waits for, so the stop at exit ran to its end
    kernel.manager.shutdown_kernel(now=False)
    assert (marker.read_text() if marker.exists() else "") == "finally attempt=1\n"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        status, error = conn.execute("SELECT status, error FROM runs WHERE id = ?", (run_id,)).fetchone()
    assert status == "pending" and json.loads(error)["type"] == "Shutdown"
    assert not listening(port)  # and the web server went with the kernel


ENGINE_CELL = """
from taskwatch.engine import Engine, TaskContext

engine = Engine(health_interval=None)

@engine.task
async def compute(ctx: TaskContext) -> str:
    return "v"

bg = engine.start_background()
"""


def test_running_the_engines_cell_again_warns_of_the_engine_left_running(kernel: Kernel) -> None:
    first = kernel.run(ENGINE_CELL)
    assert not first["error"] and "BackgroundEngine" not in first["stderr"], first
    old = kernel.run("print(repr(bg))")["stdout"].strip()
    again = kernel.run(ENGINE_CELL)
    assert not again["error"], again
    # the user sees it under the cell, naming the old engine and how to stop it
    assert "another BackgroundEngine is still running" in again["stderr"], again
    assert old in again["stderr"] and "stop_all_background()" in again["stderr"]
    stopped = kernel.run(
        """
        from taskwatch.engine.background import stop_all_background
        import threading
        print(len(stop_all_background()))
        print(sorted(t.name for t in threading.enumerate() if t.name.startswith("taskwatch-")))
        """
    )
    assert stopped["stdout"].split("\n")[:2] == ["2", "[]"], stopped
