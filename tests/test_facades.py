"""Every way of driving an engine offers the operations declared in ``taskwatch.engine.operations``.

The engine itself, the background thread's facade (blocking and awaitable),
the remote client and the dashboard's clients: each has a method per
operation, named as declared, taking the declared parameters first and in
order. The control endpoint has a command per operation, and no other.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import pytest
from taskwatch.engine import BackgroundEngine, Engine, RemoteEngine
from taskwatch.engine.operations import OPERATIONS, Operation
from taskwatch.engine.wire import ClientMessage, Hello, PingCommand
from taskwatch.tui.client import DashboardClient, LocalClient
from taskwatch.tui.remote_client import RemoteClient

FACADES: dict[str, Callable[[str], str]] = {
    "Engine": lambda name: name,
    "BackgroundEngine": lambda name: name,
    "BackgroundEngine (awaitable)": lambda name: "a" + name,
    "RemoteEngine": lambda name: name,
    "DashboardClient": lambda name: name,
    "LocalClient": lambda name: name,
    "RemoteClient": lambda name: name,
}
CLASSES: dict[str, type] = {
    "Engine": Engine,
    "BackgroundEngine": BackgroundEngine,
    "BackgroundEngine (awaitable)": BackgroundEngine,
    "RemoteEngine": RemoteEngine,
    "DashboardClient": DashboardClient,
    "LocalClient": LocalClient,
    "RemoteClient": RemoteClient,
}


def leading_params(fn: Any) -> list[str]:
    return [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.name != "self" and p.kind is not p.VAR_KEYWORD and p.kind is not p.VAR_POSITIONAL
    ]


@pytest.mark.parametrize("facade", list(FACADES))
@pytest.mark.parametrize("op", list(OPERATIONS.values()), ids=list(OPERATIONS))
def test_every_facade_offers_every_operation_with_its_parameters(facade: str, op: Operation) -> None:
    cls = CLASSES[facade]
    method = getattr(cls, FACADES[facade](op.name), None)
    assert method is not None, f"{facade} has no {FACADES[facade](op.name)}(): add it (see engine/operations.py)"
    params = leading_params(method)
    assert params[: len(op.params)] == list(op.params), (
        f"{facade}.{FACADES[facade](op.name)}{inspect.signature(method)} must take {op.params} first"
    )
    if facade != "Engine" and facade != "BackgroundEngine":
        assert inspect.iscoroutinefunction(method), f"{facade}.{op.name} must be awaitable"


def test_the_control_endpoint_has_a_command_per_operation_and_no_other() -> None:
    union = typing.get_args(typing.get_args(ClientMessage)[0])
    commands = {c for c in union if c not in (Hello, PingCommand)}
    assert commands == {op.command for op in OPERATIONS.values()}
    for op in OPERATIONS.values():
        fields = set(op.command.model_fields) - {"id", "type"}
        assert fields == set(op.params), f"the {op.name} command carries {fields}, not {op.params}"
