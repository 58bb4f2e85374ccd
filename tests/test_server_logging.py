"""What a control endpoint tells the log: where it serves (printed only if asked) and refused
tokens (rate-limited, with the peer and never the token). Real engine, real sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from taskwatch.engine import Engine, RemoteEngine
from taskwatch.engine import server as server_module
from taskwatch.engine.wire import PROTOCOL_VERSION

from .helpers import stray_tasks
from .raw_client import RawClient

TOKEN = "the-right-token-" + "R" * 24
LOGGER = "taskwatch.server"


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = Engine(health_interval=None)
    async with engine:
        yield engine
    assert stray_tasks() == set()


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "tw.sock")


def server_records(caplog: pytest.LogCaptureFixture, level: int) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == level]


def everything_logged(caplog: pytest.LogCaptureFixture) -> str:
    return "\n".join(r.getMessage() for r in caplog.records)


async def wrong_hello(address: str, token: str) -> str:
    """Say hello with ``token``, expect the refusal; the client's own ``host:port``, as the server sees it."""
    client = await RawClient.open(address)
    try:
        await client.send({"type": "hello", "version": PROTOCOL_VERSION, "token": token})
        reply = await client.recv()
        assert reply["type"] == "error" and reply["error_type"] == "AuthenticationFailed", reply
        sockname = client.writer.get_extra_info("sockname")
        return f"{sockname[0]}:{sockname[1]}" if isinstance(sockname, tuple) else ""
    finally:
        client.writer.close()


async def test_not_announced_prints_nothing_and_logs_the_address(
    engine: Engine, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # a service whose standard output is its JSON log gets no plain-text line in it
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await engine.serve("tcp://127.0.0.1:0", announce=False)
    address = server.address
    await server.stop()
    assert capsys.readouterr().out == ""
    infos = [r.getMessage() for r in server_records(caplog, logging.INFO)]
    assert any(f"serving at {address}" in m and engine.node_id in m for m in infos), infos
    assert server.token is not None and server.token not in everything_logged(caplog)


async def test_announced_by_default_prints_and_logs_the_address(
    engine: Engine, sock_path: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    server = await engine.serve(sock_path, token=TOKEN)
    await server.stop()
    assert capsys.readouterr().out == f"taskwatch: engine {engine.node_id} serving at {sock_path}\n"
    infos = [r.getMessage() for r in server_records(caplog, logging.INFO)]
    assert any(f"serving at {sock_path}" in m for m in infos), infos
    assert TOKEN not in everything_logged(caplog)


async def test_a_flood_of_wrong_tokens_logs_one_warning_naming_the_first_peer(
    engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    server = await engine.serve("tcp://127.0.0.1:0", token=TOKEN, announce=False)
    wrong = [f"guess-{i:02d}-" + "G" * 24 for i in range(21)]
    peers = [await wrong_hello(server.address, token) for token in wrong]
    assert server.stats()["auth_failures"] == 21  # every one counted, though logged once

    warnings = server_records(caplog, logging.WARNING)
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    message = warnings[0].getMessage()
    assert peers[0] in message and "wrong token" in message, message
    logged = everything_logged(caplog)
    assert not any(token in logged for token in wrong)

    # the endpoint still serves whoever has the right token
    async with RemoteEngine(server.address, token=TOKEN) as remote:
        assert remote.node_id == engine.node_id
    assert len(server_records(caplog, logging.WARNING)) == 1
    assert TOKEN not in everything_logged(caplog)
    await server.stop()


async def test_a_wrong_token_over_a_unix_socket_is_logged(
    engine: Engine, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = await engine.serve(sock_path, token=TOKEN, announce=False)
    await wrong_hello(sock_path, "not-the-token-" + "N" * 20)
    await wrong_hello(sock_path, "not-the-token-" + "M" * 20)
    warnings = [r.getMessage() for r in server_records(caplog, logging.WARNING)]
    assert len(warnings) == 1 and "unix socket" in warnings[0] and sock_path in warnings[0], warnings
    assert "N" * 20 not in warnings[0]
    await server.stop()


async def test_refusals_between_warnings_are_summed_up_in_the_next(
    engine: Engine, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a minute is the real interval; a short one shows the same within a test
    interval = 0.3
    monkeypatch.setattr(server_module, "AUTH_WARNING_INTERVAL", interval)
    caplog.set_level(logging.WARNING, logger=LOGGER)
    server = await engine.serve("tcp://127.0.0.1:0", token=TOKEN, announce=False)
    for i in range(5):
        await wrong_hello(server.address, f"early-guess-{i}-" + "E" * 20)
    assert len(server_records(caplog, logging.WARNING)) == 1
    # the interval itself is what is tested: let it pass
    await asyncio.sleep(interval * 1.5)
    late_peer = await wrong_hello(server.address, "late-guess-" + "L" * 20)

    warnings = [r.getMessage() for r in server_records(caplog, logging.WARNING)]
    assert len(warnings) == 2, warnings
    assert late_peer in warnings[1] and "4 more refused since" in warnings[1], warnings
    assert server.stats()["auth_failures"] == 6
    await server.stop()
