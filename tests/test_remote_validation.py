"""Bad arguments to a RemoteEngine get the typed error the in-process call raises, before anything is sent.

Every case runs the same call against an engine in-process and through a
RemoteEngine connected to it over a real Unix socket; the server's
``commands`` counter, read after a ping's round trip, shows whether the bad
call put anything on the wire.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from pydantic import BaseModel, Field, SecretStr
from taskwatch.engine import (
    ControlServer,
    Engine,
    InvalidKey,
    InvalidParams,
    MalformedMessage,
    RemoteEngine,
    RunStatus,
    TaskwatchError,
)

from .raw_client import serve


class Num(BaseModel):
    x: float = 0.0


class Finite(BaseModel):
    x: float = Field(default=0.0, allow_inf_nan=False)


class Secret(BaseModel):
    password: SecretStr


def build_engine() -> Engine:
    engine = Engine(health_interval=None, cancel_grace=1.0)

    @engine.task
    async def num(ctx: Any, p: Num) -> float:
        return p.x

    @engine.task
    async def plain(ctx: Any) -> None:
        pass

    @engine.task
    async def secret(ctx: Any, p: Secret) -> None:
        pass

    @engine.task
    async def finite(ctx: Any, p: Finite) -> None:
        pass

    async def t(ctx: Any, key: str, n: int = 1) -> None:
        pass

    engine.trigger("t", t, size_threshold=1000)
    return engine


Pair = tuple[Engine, RemoteEngine, ControlServer]


@pytest.fixture
async def pair(sock_path: str) -> AsyncIterator[Pair]:
    engine = build_engine()
    async with engine:
        server = await serve(engine, sock_path)
        async with RemoteEngine(sock_path) as remote:
            yield engine, remote, server


async def sent_commands(remote: RemoteEngine, server: ControlServer) -> int:
    """Commands the server has received, not counting the ping that makes sure it has read them all."""
    await remote.ping()  # answered after every earlier line on this connection was handled
    return server.stats()["commands"] - 1


SURROGATE = "report-\udcff.csv"

# (label, call, in-process error): the remote call must raise the same type, sending nothing
SAME_ERROR: list[tuple[str, Callable[[Any], Awaitable[Any]], type[TaskwatchError]]] = [
    ("int key", lambda e: e.submit("plain", None, key=42), InvalidKey),
    ("surrogate key", lambda e: e.submit("plain", None, key=SURROGATE), InvalidKey),
    ("surrogate in params", lambda e: e.submit("num", {"x": SURROGATE}), InvalidParams),
    ("list as params", lambda e: e.submit("num", [1]), InvalidParams),
    ("masked secret", lambda e: e.submit("secret", Secret(password=SecretStr("hunter2"))), InvalidParams),
    ("int trigger key", lambda e: e.fire_trigger("t", 7), InvalidKey),
]


@pytest.mark.parametrize(("label", "call", "error"), SAME_ERROR, ids=[case[0] for case in SAME_ERROR])
async def test_bad_submit_arguments_raise_the_in_process_error(
    pair: Pair, label: str, call: Callable[[Any], Awaitable[Any]], error: type[TaskwatchError]
) -> None:
    engine, remote, server = pair
    with pytest.raises(error) as local:
        await call(engine)
    before = await sent_commands(remote, server)
    with pytest.raises(error) as far:
        await call(remote)
    assert await sent_commands(remote, server) == before + 1  # the ping only: the bad call sent nothing
    if error is InvalidKey:
        assert str(far.value) == str(local.value)
    else:
        assert str(far.value).startswith(f"invalid params for task {far.value.task!r}; nothing was queued")
    assert engine.runs() == []
    assert remote.connected  # the connection is fine for the next call
    await remote.ping()


async def test_params_a_model_or_a_dict_with_int_keys_are_sent_as_their_json(pair: Pair) -> None:
    engine, remote, _ = pair
    for params in (Num(x=1.5), {1: 2, "x": 2.5}):
        local = (await engine.submit("num", params)).record()
        far = await remote.submit("num", params)
        assert far.status in (RunStatus.PENDING, RunStatus.RUNNING, RunStatus.SUCCEEDED)
        assert far.params == local.params == engine.get(far.id).params


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
async def test_nan_and_infinity_get_the_in_process_verdict(pair: Pair, value: float) -> None:
    """The client sends what it was given (not JSON null), so the engine decides as it does in-process."""
    engine, remote, _ = pair
    with pytest.raises(InvalidParams) as local:
        await engine.submit("num", {"x": value})
    with pytest.raises(InvalidParams) as far:
        await remote.submit("num", {"x": value})
    assert "JSON cannot carry" in str(local.value)
    assert [e["msg"] for e in far.value.errors] == [e["msg"] for e in local.value.errors]
    assert engine.runs() == []


async def test_a_model_refusing_nan_gives_the_in_process_reason(pair: Pair) -> None:
    engine, remote, _ = pair
    with pytest.raises(InvalidParams) as local:
        await engine.submit("finite", {"x": math.nan})
    with pytest.raises(InvalidParams) as far:
        await remote.submit("finite", {"x": math.nan})
    assert [e["msg"] for e in far.value.errors] == [e["msg"] for e in local.value.errors]
    assert "finite" in str(far.value)


async def test_a_remote_params_error_has_its_fields_named_as_in_process(pair: Pair) -> None:
    engine, remote, _ = pair
    with pytest.raises(InvalidParams) as local:
        await engine.submit("num", {"x": "many"})
    with pytest.raises(InvalidParams) as far:
        await remote.submit("num", {"x": "many"})
    # a loc is a tuple in-process: `("x",) in locs` must find it the same over the wire
    assert [e["loc"] for e in far.value.errors] == [e["loc"] for e in local.value.errors] == [("x",)]


@pytest.mark.parametrize(
    ("label", "call", "field"),
    [
        ("int run id", lambda r: r.cancel(5), "run_id"),
        ("bytes run id", lambda r: r.retry(b"x"), "run_id"),  # was sent as the str 'x'
        ("None run id", lambda r: r.get(None), "run_id"),
        # a negative runs_limit raises the engine's own InvalidQuery, before sending: test_query_args
        ("int task name", lambda r: r.submit(42), "task"),
        ("surrogate periodic name", lambda r: r.pause_periodic(SURROGATE), "UTF-8"),
    ],
)
async def test_other_bad_arguments_raise_a_typed_error_naming_them(
    pair: Pair, label: str, call: Callable[[Any], Awaitable[Any]], field: str
) -> None:
    _, remote, server = pair
    before = await sent_commands(remote, server)
    with pytest.raises(MalformedMessage, match="nothing was sent") as caught:
        await call(remote)
    assert field in str(caught.value)
    assert await sent_commands(remote, server) == before + 1
