"""Random params, keys, results and wire lines: the engine's state stays valid whatever comes in.

After any sequence of submits (valid or not), task outcomes (odd results,
exceptions of every kind), cancels and raw protocol lines from a logged-in
client, ``engine.runs()``, ``engine.snapshot()`` and a fresh dashboard attach
work, and every run is in a valid state.
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from taskwatch.engine import Engine, RemoteEngine, RunStatus, TaskContext, TaskwatchError

from .helpers import eventually, stray_tasks

SURROGATE = os.fsdecode(b"x-\xff")


class Echo(BaseModel):
    i: int = 0
    value: Any = None


def _circular() -> list[Any]:
    loop: list[Any] = []
    loop.append(loop)
    return loop


class _Opaque:
    pass


class _BadStr:
    def __str__(self) -> str:
        raise RuntimeError("no str for you")


#: what an ``echo`` run returns, by its ``i``; the odd ones must fail their run only
RESULTS: list[Any] = [
    None,
    "fine",
    {"nested": [1, 2.5, None, True]},
    SURROGATE,
    [SURROGATE],
    {SURROGATE: 1},
    b"\xff\xfe",
    b"plain ascii bytes",
    {1, 2},
    _circular(),
    _Opaque(),
    float("nan"),
    10**40,
    "x" * 10_000,
]

#: what a ``boom`` run raises, by its ``i``
RAISES: list[Any] = [
    lambda: ValueError(f"bad {SURROGATE}"),
    lambda: SystemExit(2),
    lambda: KeyboardInterrupt(),
    lambda: GeneratorExit(),
    lambda: type("Custom", (BaseException,), {})(),
    lambda: asyncio.CancelledError(),
    lambda: TimeoutError(),
    lambda: RuntimeError(_BadStr()),
]

json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.binary(max_size=4),
    st.just(SURROGATE),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
keys = st.one_of(st.none(), st.text(max_size=4), st.integers(), st.just(SURROGATE), st.binary(max_size=2))

wire_samples = [
    b'{"type":"submit","id":1,"task":"echo","params":{"value":"\\udcff"}}',
    b'{"type":"submit","id":2,"task":"echo","params":{"i":3}}',
    b'{"type":"submit","id":3,"task":"echo","key":"\\ud800"}',
    b'{"type":"submit","id":4,"task":"nope"}',
    b'{"type":"snapshot","id":5,"runs_limit":-1}',
    b'{"type":"cancel","id":6,"run_id":7}',
    b'{"type":"hello","version":1}',
    b'{"type":"ping","id":{"nested":true}}',
    b'\xff\xfe{',
    b"[1,2,3]",
    b'"just a string"',
]
wire_command = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["submit", "cancel", "retry", "pause", "resume", "snapshot", "ping", "get", "bogus"]),
        "id": st.one_of(st.integers(), st.text(max_size=3), st.none()),
    },
    optional={
        "task": st.sampled_from(["echo", "boom", "slow", "missing"]),
        "params": json_value,
        "key": keys.filter(lambda k: not isinstance(k, bytes)),
        "run_id": st.text(max_size=4),
        "name": st.text(max_size=4),
        "runs_limit": st.integers(),
    },
)
wire_line = st.one_of(
    st.sampled_from(wire_samples),
    st.binary(max_size=64).map(lambda b: b.replace(b"\n", b" ")),
    wire_command.map(lambda d: json.dumps(d, default=repr).encode()),
)

operation = st.one_of(
    st.tuples(st.just("submit"), st.sampled_from(["echo", "boom", "slow", "missing"]), json_value, keys),
    st.tuples(st.just("echo"), st.integers(0, len(RESULTS) - 1), keys),
    st.tuples(st.just("boom"), st.integers(0, len(RAISES) - 1)),
    st.tuples(st.just("cancel"), st.integers(0, 20)),
    st.tuples(st.just("wire"), st.lists(wire_line, max_size=6)),
)


def build_engine() -> Engine:
    engine = Engine(health_interval=None, cancel_grace=0.2, max_queue=50, history=30)

    @engine.task
    async def echo(ctx: TaskContext, params: Echo) -> Any:
        return RESULTS[params.i % len(RESULTS)] if params.value is None else params.value

    @engine.task
    async def boom(ctx: TaskContext, params: Echo) -> None:
        raise RAISES[params.i % len(RAISES)]()

    @engine.task
    async def slow(ctx: TaskContext, params: Echo) -> None:
        await ctx.progress(1, 2, f"waiting {params.value!r}"[:50])
        await asyncio.Event().wait()

    return engine


async def send_wire(path: str, lines: list[bytes]) -> None:
    """Log in, send ``lines``, then a ping, and read until its reply (the server stays usable)."""
    reader, writer = await asyncio.open_unix_connection(path, limit=1 << 26)
    try:
        writer.write(b'{"type":"hello","version":1}\n')
        for line in lines:
            writer.write(line + b"\n")
        writer.write(b'{"type":"ping","id":"fuzz-end"}\n')
        await writer.drain()
        async with asyncio.timeout(10):
            while True:
                raw = await reader.readline()
                assert raw, "the server closed a logged-in client's connection over bad lines"
                msg = json.loads(raw)
                if msg.get("type") == "ok" and msg.get("id") == "fuzz-end":
                    return
    finally:
        writer.close()
        await writer.wait_closed()


def assert_valid(engine: Engine) -> None:
    runs = engine.runs(limit=None)
    engine.snapshot().model_dump_json()
    counts = engine.stats().by_status
    for status in RunStatus:
        assert counts[status.value] == sum(1 for r in runs if r.status is status)
    for run in runs:
        assert run.status.finished == (run.finished_at is not None)
        run.model_dump_json()
        if run.status is RunStatus.SUCCEEDED:
            json.dumps(run.result)


async def play(ops: list[tuple[Any, ...]], path: str) -> None:
    engine = build_engine()
    await engine.start()
    try:
        server = await engine.serve(path, announce=False)
        ids: list[str] = []
        for op in ops:
            try:
                match op:
                    case ("submit", task, params, key):
                        ids.append((await engine.submit(task, params, key=key)).id)
                    case ("echo", i, key):
                        ids.append((await engine.submit("echo", {"i": i}, key=key)).id)
                    case ("boom", i):
                        ids.append((await engine.submit("boom", {"i": i})).id)
                    case ("cancel", n) if ids:
                        await engine.cancel(ids[n % len(ids)], grace=0.2)
                    case ("wire", lines):
                        await send_wire(server.address, lines)
            except TaskwatchError:
                pass  # refused with a typed error: fine, as long as state stays valid
            assert_valid(engine)
        # everything but the deliberately endless runs finishes on its own
        await eventually(
            lambda: all(r.status.finished or r.task == "slow" for r in engine.runs(limit=None)), timeout=10
        )
        assert_valid(engine)
        remote = RemoteEngine(server.address)
        try:
            snapshot = await remote.connect()
            assert snapshot.stats.submitted_total == engine.stats().submitted_total
        finally:
            await remote.close()
    finally:
        # the endless runs are cut at once: no drain wait per example
        await engine.stop(timeout=0)
    assert engine.state == "stopped"
    assert stray_tasks() == set()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operation, max_size=12))
def test_random_input_never_leaves_the_engine_in_a_bad_state(ops: list[tuple[Any, ...]], tmp_path: Path) -> None:
    path = tmp_path / "fuzz.sock"
    path.unlink(missing_ok=True)
    asyncio.run(play(ops, str(path)))
