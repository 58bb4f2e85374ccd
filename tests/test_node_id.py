"""The default node id: held by one live process at a time, taken over by a restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

from taskwatch.engine import Engine, RunStatus, TaskContext

from .helpers import eventually

#: prints its engine's default node id, then waits until stdin closes (or it is killed)
HOLDER = """
import sys
from taskwatch.engine import Engine
engine = Engine()
print(engine.node_id, flush=True)
sys.stdin.read()
"""


def start(script: Path) -> subprocess.Popen[str]:
    """Runs ``script`` with a temporary directory of its test's own: the locks on default ids
    are kept there, so tests running side by side do not take each other's ids."""
    locks = script.parent / "tmp"
    locks.mkdir(exist_ok=True)
    env = {**os.environ, "TMPDIR": str(locks)}
    pipe = subprocess.PIPE
    return subprocess.Popen([sys.executable, str(script)], stdin=pipe, stdout=pipe, text=True, env=env)


def holder(script: Path) -> tuple[subprocess.Popen[str], str]:
    proc = start(script)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_copies_running_side_by_side_get_their_own_id_and_a_restart_takes_the_dead_ones(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"  # the same program started several times on one host
    script.write_text(HOLDER)
    first, first_id = holder(script)
    second, second_id = holder(script)
    try:
        assert first_id.endswith("-worker") and second_id == f"{first_id}-2"
        first.send_signal(signal.SIGKILL)
        assert first.wait(10) == -signal.SIGKILL
        restarted, restarted_id = holder(script)  # the killed one's id is free again: taken over
        try:
            assert restarted_id == first_id
        finally:
            restarted.kill()
            restarted.wait(10)
    finally:
        for proc in (first, second):
            proc.kill()
            proc.wait(10)


async def test_two_engines_with_the_default_id_on_one_store_keep_each_others_runs(tmp_path: Path) -> None:
    # under one shared id the second start would take the first's running run for an orphan
    # of its own previous incarnation and run it again
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    first, second = Engine(store=url, health_interval=None), Engine(store=url, health_interval=None)
    assert first.node_id != second.node_id
    gate = asyncio.Event()
    attempts: list[int] = []
    recovered: list[object] = []

    for engine in (first, second):
        engine.bus.add_callback(recovered.append, ["run.recovered"])

        @engine.task
        async def slow(ctx: TaskContext) -> None:
            attempts.append(ctx.attempt)
            await gate.wait()

    async with first:
        handle = await first.submit("slow")
        await eventually(lambda: attempts == [1])
        async with second:
            gate.set()
            record = await handle.wait(10)
    assert (record.status, record.attempt) == (RunStatus.SUCCEEDED, 1)
    assert attempts == [1] and recovered == []


#: builds an engine, then forks twice; each child starts the engine it inherited
FORKED = """
import asyncio, os, sys
from taskwatch.engine import Engine
engine = Engine(health_interval=None)
print("parent", engine.node_id, engine.incarnation, flush=True)
children = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        async def main():
            async with engine:
                # one write per line: two children share the pipe, and print() writes its parts
                # one by one when Python runs unbuffered (PYTHONUNBUFFERED), so they interleave
                line = f"child {engine.node_id} {engine.bus.node} {engine.incarnation}\\n"
                os.write(1, line.encode())
                sys.stdin.readline()  # held until the parent has heard from both children
        asyncio.run(main())
        os._exit(0)
    children.append(pid)
    sys.stdout.flush()
sys.stdin.readline()
for pid in children:
    os.waitpid(pid, 0)
"""


def test_an_engine_built_before_a_fork_gets_an_id_of_its_own_in_each_child(tmp_path: Path) -> None:
    script = tmp_path / "app.py"
    script.write_text(FORKED)
    proc = start(script)
    assert proc.stdout is not None and proc.stdin is not None
    try:
        lines = [proc.stdout.readline().split() for _ in range(3)]
    finally:
        proc.stdin.write("\n\n\n")
        proc.stdin.close()
        assert proc.wait(20) == 0
    parent = [line[1:] for line in lines if line[0] == "parent"]
    children = [line[1:] for line in lines if line[0] == "child"]
    assert len(parent) == 1 and len(children) == 2
    ids = {child[0] for child in children}
    assert len(ids) == 2 and parent[0][0] not in ids, lines
    assert all(node_id == bus_node for node_id, bus_node, _ in children)
    # and an incarnation of its own: two processes under one would take each other's runs
    incarnations = {child[2] for child in children}
    assert len(incarnations) == 2 and parent[0][1] not in incarnations, lines


#: holds the default id, forks a child that lives on (say, a worker it started), then waits
PARENT_OF_A_LIVE_CHILD = """
import os, sys, time
from taskwatch.engine import Engine
engine = Engine()
pid = os.fork()
if pid == 0:
    sys.stdin.read()  # lives until the test closes its stdin
    os._exit(0)
print(engine.node_id, pid, flush=True)
sys.stdin.read()
"""


def test_a_forked_child_does_not_keep_its_parents_id_after_the_parent_dies(tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(PARENT_OF_A_LIVE_CHILD)
    parent = start(script)
    assert parent.stdout is not None and parent.stdin is not None
    node_id, child = parent.stdout.readline().split()
    try:
        parent.send_signal(signal.SIGKILL)
        assert parent.wait(10) == -signal.SIGKILL
        script.write_text(HOLDER)  # the same program started again, its child still alive
        restarted, restarted_id = holder(script)
        try:
            assert restarted_id == node_id
        finally:
            restarted.kill()
            restarted.wait(10)
    finally:
        parent.stdin.close()  # the orphaned child reads EOF and ends
        try:
            os.kill(int(child), signal.SIGKILL)
        except ProcessLookupError:
            pass
