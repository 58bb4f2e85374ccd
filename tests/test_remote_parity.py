"""What a RemoteEngine submits and asks for, against what the same call does in-process.

Every case runs the call on an engine and through a RemoteEngine connected to that
engine over a real Unix socket, and compares: a strict params model takes its params
from the wire as in-process, params whose dicts would lose an entry as JSON are refused by
the client before anything is sent, values JSON has no type for travel as their JSON
stand-ins (refused in-process, where a retry would read back another value), and a snapshot's
``runs_limit`` has the same bounds both ways.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict
from taskwatch.engine import (
    ControlServer,
    Engine,
    InvalidParams,
    InvalidQuery,
    RemoteEngine,
    RunStatus,
    TaskContext,
)

from .raw_client import RawClient, serve


class Color(enum.Enum):
    RED = "red"


class Report(BaseModel):
    """A strict model: a date, UUID, enum or tuple from JSON's text only, never from a str or list."""

    model_config = ConfigDict(strict=True)
    day: dt.date
    at: dt.datetime
    uid: uuid.UUID
    color: Color
    pair: tuple[int, int]


class Loose(BaseModel):
    v: Any = None


class Names(BaseModel):
    names: dict[str, str] = {}


class Inner(BaseModel):
    x: int = 1


REPORT = Report(
    day=dt.date(2024, 1, 2), at=dt.datetime(2024, 1, 2, 3, 4, 5), uid=uuid.UUID(int=7), color=Color.RED, pair=(1, 2)
)


def build_engine() -> Engine:
    engine = Engine(health_interval=None)

    @engine.task
    async def report(ctx: TaskContext, p: Report) -> list[str]:
        # what the run got, type by type: the strict model's own values, not their text
        return [type(p.day).__name__, type(p.at).__name__, type(p.uid).__name__, type(p.color).__name__, repr(p.pair)]

    @engine.task
    async def loose(ctx: TaskContext, p: Loose) -> Any:
        return p.v

    @engine.task
    async def names(ctx: TaskContext, p: Names) -> dict[str, str]:
        return p.names

    return engine


Pair = tuple[Engine, RemoteEngine, ControlServer]


@pytest.fixture
async def pair(sock_path: str) -> AsyncIterator[Pair]:
    engine = build_engine()
    async with engine:
        server = await serve(engine, sock_path)
        async with RemoteEngine(sock_path, timeout=10) as remote:
            yield engine, remote, server


async def sent_commands(remote: RemoteEngine, server: ControlServer) -> int:
    """Commands the server has received, not counting the ping that makes sure it has read them all."""
    await remote.ping()  # answered after every earlier line on this connection was handled
    return server.stats()["commands"] - 1


TYPES_RUN_WITH = ["date", "datetime", "UUID", "Color", "(1, 2)"]


async def test_a_strict_model_is_submitted_over_the_wire_as_a_model_and_as_its_json(pair: Pair) -> None:
    engine, remote, _ = pair
    as_json = REPORT.model_dump(mode="json")
    assert as_json["day"] == "2024-01-02" and as_json["pair"] == [1, 2]  # text and lists, as a form sends
    local_model = await (await engine.submit("report", REPORT)).wait(10)
    local_dict = await (await engine.submit("report", as_json)).wait(10)
    far_model = await engine.handle((await remote.submit("report", REPORT)).id).wait(10)
    far_dict = await engine.handle((await remote.submit("report", as_json)).id).wait(10)
    for record in (local_model, local_dict, far_model, far_dict):
        assert record.status is RunStatus.SUCCEEDED, record.error
        assert record.result == TYPES_RUN_WITH
        assert record.params == as_json


async def test_a_dict_neither_reading_takes_is_refused_saying_what_is_wrong_in_it(pair: Pair) -> None:
    engine, remote, _ = pair
    bad_month = {**REPORT.model_dump(mode="json"), "day": "2024-13-02"}
    with pytest.raises(InvalidParams) as local:
        await engine.submit("report", bad_month)
    # the reasons of the JSON reading, which took the rest: not "should be an instance of UUID"
    # for every field a strict model's Python reading refuses in text
    assert [e["loc"] for e in local.value.errors] == [("day",)]
    assert "month" in local.value.errors[0]["msg"]
    with pytest.raises(InvalidParams) as far:
        await remote.submit("report", bad_month)
    assert [(e["loc"], e["msg"]) for e in far.value.errors] == [(e["loc"], e["msg"]) for e in local.value.errors]
    # the JSON reading loses no entry of a dict whose keys become one JSON key: still refused
    with pytest.raises(InvalidParams):
        await engine.submit("names", {"names": {1: "a", "1": "b"}})
    assert engine.runs() == []


#: params whose Any field holds a value JSON has no type for: in-process the engine refuses it
#: (a retry, or another node, would read back another value); a RemoteEngine sends JSON, so it
#: travels as its JSON stand-in, which every attempt then gets alike
AS_JSON: list[tuple[str, dict[Any, Any], Any]] = [
    ("set", {"v": {1, 2}}, [1, 2]),
    ("date", {"v": dt.date(2020, 1, 2)}, "2020-01-02"),
    ("datetime", {"v": dt.datetime(2020, 1, 1, 12)}, "2020-01-01T12:00:00"),
    ("decimal", {"v": decimal.Decimal("1.5")}, "1.5"),
    ("uuid", {"v": uuid.UUID(int=5)}, str(uuid.UUID(int=5))),
    ("enum", {"v": Color.RED}, "red"),
    ("int keys", {"v": {1: "a"}}, {"1": "a"}),
    ("nested", {"v": {"a": [{"b": {2, 3}}]}}, {"a": [{"b": [2, 3]}]}),
    ("model", {"v": Inner()}, {"x": 1}),
]


@pytest.mark.parametrize(("label", "params", "arrives"), AS_JSON, ids=[case[0] for case in AS_JSON])
async def test_a_value_json_has_no_type_for_travels_as_its_json(
    pair: Pair, label: str, params: dict[Any, Any], arrives: Any
) -> None:
    engine, remote, _ = pair
    with pytest.raises(InvalidParams):
        await engine.submit("loose", params)
    far = await engine.handle((await remote.submit("loose", params)).id).wait(10)
    assert far.status is RunStatus.SUCCEEDED
    assert far.params == {"v": arrives} and far.result == arrives


#: params that read back from JSON as themselves: taken both ways, alike
AS_GIVEN: list[tuple[str, dict[Any, Any]]] = [
    ("tuple", {"v": (1, [2, "x"])}),
    ("json data", {"v": {"a": None, "b": [1.5, True]}}),
    ("big int", {"v": 10**30}),
    # a key that is no str names no field: the model at the other end decides on it (this one
    # ignores it, as in-process), whatever it holds
    ("a key naming no field", {1: dt.date(2020, 1, 2), "v": 1}),
]


@pytest.mark.parametrize(("label", "params"), AS_GIVEN, ids=[case[0] for case in AS_GIVEN])
async def test_what_json_carries_as_it_is_is_run_alike_both_ways(pair: Pair, label: str, params: dict[Any, Any]) -> None:
    engine, remote, _ = pair
    local = await (await engine.submit("loose", params)).wait(10)
    far = await engine.handle((await remote.submit("loose", params)).id).wait(10)
    assert local.status is far.status is RunStatus.SUCCEEDED
    assert (far.params, far.result) == (local.params, local.result)


#: dicts whose keys become one JSON key: sent, they would arrive with an entry lost
COLLIDING: list[tuple[str, dict[Any, Any]]] = [
    ("at the top of a value", {"v": {1: "a", "1": "b"}}),
    ("deep in a value", {"v": [{"k": {None: 1, "None": 2}}]}),
]


@pytest.mark.parametrize(("label", "params"), COLLIDING, ids=[case[0] for case in COLLIDING])
async def test_keys_that_would_become_one_are_refused_before_anything_is_sent(
    pair: Pair, label: str, params: dict[Any, Any]
) -> None:
    engine, remote, server = pair
    with pytest.raises(InvalidParams):
        await engine.submit("loose", params)
    before = await sent_commands(remote, server)
    with pytest.raises(InvalidParams) as refused:
        await remote.submit("loose", params)
    assert await sent_commands(remote, server) == before + 1  # the ping only: nothing else was sent
    [error] = refused.value.errors
    assert "become the same JSON key" in error["msg"] and "would be lost" in error["msg"]
    assert engine.runs() == []
    assert remote.connected


async def test_a_snapshot_takes_the_runs_limits_engine_snapshot_takes(pair: Pair) -> None:
    engine, remote, server = pair
    await (await engine.submit("loose", {"v": 1})).wait(10)
    for limit in (100_001, 200_000, 2**63 - 1):
        assert len(engine.snapshot(limit).runs) == 1
        assert len((await remote.snapshot(runs_limit=limit)).runs) == 1
    for limit in (2**63, -1):
        with pytest.raises(InvalidQuery):
            engine.snapshot(limit)
        before = await sent_commands(remote, server)
        with pytest.raises(InvalidQuery):
            await remote.snapshot(runs_limit=limit)
        assert await sent_commands(remote, server) == before + 1  # the ping only
    # a client that sends past the bound anyway is told so, and stays connected
    raw = await RawClient.authenticated(server.address)
    await raw.send({"type": "snapshot", "id": 1, "runs_limit": 2**63})
    reply = await raw.reply()
    assert (reply["id"], reply["error_type"]) == (1, "MalformedMessage")
    await raw.send({"type": "snapshot", "id": 2, "runs_limit": 100_001})
    reply = await raw.reply()
    assert (reply["id"], reply["type"]) == (2, "ok")
    await raw.close()
