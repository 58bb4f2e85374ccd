"""A run record is a snapshot: what a caller or a task does to the values it was handed stays its own.

A caller post-processing ``(await handle).result`` in place, or a task
writing into ``ctx.params`` or its params model, must not change what the
engine shows of the run afterwards (``get``, ``runs``, ``snapshot``,
``fetch_run``, ``query_runs``), nor make that differ from a SQLite store's
row; a value JSON cannot carry put into a handed-out value must not break
the snapshot's JSON or a dashboard's attach.
"""

from __future__ import annotations

import asyncio
import datetime
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import Engine, RemoteEngine, RunRecord, RunStatus, TaskContext

PARAMS = {"tags": ["a"], "data": {"nested": [1, {"deep": "x"}]}}
RESULT = {"name": "ada", "created": "2024-01-01T00:00:00", "items": [1, {"deep": [2]}]}


class Params(BaseModel):
    tags: list[str] = []
    # Any inside: pydantic keeps those values as given, so the model shares them with its input
    data: dict[str, Any] = {}


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"


def make_engine(store: str) -> Engine:
    engine = Engine(health_interval=None, store=store)

    @engine.task
    async def fetch_user(ctx: TaskContext, params: Params) -> dict[str, Any]:
        return {"name": "ada", "created": "2024-01-01T00:00:00", "items": [1, {"deep": [2]}]}

    return engine


async def every_view(engine: Engine, run_id: str) -> list[tuple[str, RunRecord]]:
    """The run as each way of reading it shows it (the store's own row included)."""
    return [
        ("get", engine.get(run_id)),
        ("runs", next(r for r in engine.runs() if r.id == run_id)),
        ("snapshot", next(r for r in engine.snapshot().runs if r.id == run_id)),
        ("fetch_run", await engine.fetch_run(run_id)),
        ("query_runs", next(r for r in (await engine.query_runs()).runs if r.id == run_id)),
    ]


def assert_as_run(views: list[tuple[str, RunRecord]], params: dict[str, Any], result: Any) -> None:
    for where, record in views:
        assert (where, record.params, record.result) == (where, params, result)


async def test_changing_a_finished_runs_result_and_params_in_place_changes_nothing_the_engine_shows(
    store: str,
) -> None:
    engine = make_engine(store)
    async with engine:
        handle = await engine.submit("fetch_user", PARAMS)
        record = await handle
        assert record.status is RunStatus.SUCCEEDED
        user = record.result
        user["created"] = datetime.datetime.fromisoformat(user["created"])  # the caller post-processes it
        user["items"][1]["deep"].append("mine")
        record.params["tags"].append("mine")
        record.params["data"]["nested"][1]["deep"] = "mine"
        # and every other record handed out is the caller's too
        for _, other in await every_view(engine, handle.id):
            other.result["items"].clear()
            other.params["data"].clear()
        assert_as_run(await every_view(engine, handle.id), PARAMS, RESULT)


async def test_a_task_changing_its_params_leaves_the_runs_params_as_submitted(store: str) -> None:
    engine = Engine(health_interval=None, store=store)
    seen: list[dict[str, Any]] = []

    @engine.task(retries=1, backoff=0.001, backoff_max=0.001)
    async def meddle(ctx: TaskContext, params: Params) -> str:
        seen.append(ctx.params)
        ctx.params["injected"] = "by task"
        ctx.params["tags"].append("by task")
        params.data["nested"].append("by task")  # its model's Any values
        # what it wrote it reads back within this attempt
        assert ctx.params["injected"] == "by task"
        if ctx.attempt == 1:
            raise RuntimeError("fail once, so the retry shows the params it gets")
        return "ok"

    async with engine:
        handle = await engine.submit("meddle", PARAMS)
        record = await handle.wait(timeout=10)
        assert record.status is RunStatus.SUCCEEDED and record.attempt == 2
        assert record.params == PARAMS
        assert_as_run(await every_view(engine, handle.id), PARAMS, "ok")
    # each attempt started from the params as submitted
    assert len(seen) == 2
    assert all(p == {**PARAMS, "tags": ["a", "by task"], "injected": "by task"} for p in seen)


async def attached_runs(engine: Engine, sock_path: str) -> dict[str, RunRecord]:
    """The runs a dashboard attaching now is shown (the handshake's snapshot), by id."""
    engine.snapshot().model_dump_json()  # raises if a value JSON cannot carry got in
    await engine.serve(sock_path)
    remote = RemoteEngine(sock_path, timeout=10)
    try:
        return {run.id: run for run in (await remote.connect()).runs}
    finally:
        await remote.close()


async def test_a_value_json_cannot_carry_put_into_a_handed_out_result_breaks_no_dashboard(
    store: str, sock_path: str
) -> None:
    engine = make_engine(store)
    async with engine:
        handle = await engine.submit("fetch_user", PARAMS)
        (await handle).result["db"] = object()
        (await handle).params["conn"] = object()
        attached = await attached_runs(engine, sock_path)
        assert (attached[handle.id].params, attached[handle.id].result) == (PARAMS, RESULT)


async def test_a_value_json_cannot_carry_put_into_ctx_params_breaks_no_dashboard(store: str, sock_path: str) -> None:
    engine = Engine(health_interval=None, store=store)

    @engine.task
    async def stuff(ctx: TaskContext) -> str:
        ctx.params["when"] = object()
        return "ok"

    async with engine:
        record = await (await engine.submit("stuff")).wait(timeout=10)
        assert record.status is RunStatus.SUCCEEDED
        record.model_dump_json()
        attached = await attached_runs(engine, sock_path)
        assert (attached[record.id].params, engine.get(record.id).params) == ({}, {})


async def test_a_subscriber_changing_an_events_values_changes_no_record(store: str) -> None:
    # an event is handed to every subscriber: its params and result are its own as well
    engine = make_engine(store)
    async with engine:
        events = engine.bus.subscribe(kinds=("run.submitted", "run.succeeded"))
        handle = await engine.submit("fetch_user", PARAMS)
        await handle.wait(timeout=10)
        seen = [await asyncio.wait_for(anext(events), 5) for _ in range(2)]
        submitted, succeeded = sorted(seen, key=lambda e: e.kind)  # run.submitted < run.succeeded
        submitted.params["data"]["nested"].append("changed")
        succeeded.result["items"][1]["deep"].append("changed")
        assert_as_run(await every_view(engine, handle.id), PARAMS, RESULT)
