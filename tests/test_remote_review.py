"""Control endpoint and RemoteEngine problems found in review, each against a real server:
a flood of one-byte connections, addresses carrying secrets, concurrent connects, a
service that is not taskwatch, a TCP port already taken, and ``taskwatch attach``
without a terminal."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, EngineUnreachable, InvalidAddress, RemoteEngine
from taskwatch.engine.wire import PROTOCOL_VERSION

from .helpers import eventually, stray_tasks
from .raw_client import RawClient, serve

#: the repository, where the test processes run
REPO = Path(__file__).resolve().parent.parent

#: a local process without the token: connections to 127.0.0.1:PORT as fast as it can
#: (up to RATE a second), each sending one byte and stalling, the newest 400 held open
ONE_BYTE_FLOOD = """
import collections, socket, sys, time
port, rate = int(sys.argv[1]), int(sys.argv[2])
held = collections.deque()
made = 0
start = time.monotonic()
while True:
    ahead = made / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
    s = socket.socket()
    s.setblocking(False)
    try:
        s.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    except OSError:
        s.close()
        continue
    try:
        s.send(b"{")
    except OSError:
        pass
    held.append(s)
    made += 1
    if made == 2000:
        print("ready", flush=True)
    if len(held) > 400:
        held.popleft().close()
"""


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = Engine(health_interval=None)

    @engine.task()
    async def quick(ctx: Any) -> int:
        return 1

    async with engine:
        yield engine
    assert stray_tasks() == set()


# ---------------------------------------------------------------- 1: one-byte connection flood


async def test_a_flood_of_one_byte_connections_keeps_no_real_client_out(engine: Engine) -> None:
    server = await serve(engine, "tcp://127.0.0.1:0")
    port = server.address.rsplit(":", 1)[1]
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ONE_BYTE_FLOOD, port, "10000", stdout=asyncio.subprocess.PIPE
    )
    try:
        assert attacker.stdout is not None
        assert await asyncio.wait_for(attacker.stdout.readline(), 10) == b"ready\n"
        # 2000 connections in, the flood goes on at its pace
        remotes = [RemoteEngine(server.address, token=server.token, timeout=6) for _ in range(5)]
        started = time.monotonic()
        results = await asyncio.gather(*(remote.connect() for remote in remotes), return_exceptions=True)
        took = time.monotonic() - started
        assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == []
        assert took < 6
        for remote in remotes:
            assert await remote.ping() >= 0
            await remote.close()
        assert attacker.returncode is None  # the flood was on all along
    finally:
        attacker.kill()
        await attacker.wait()
    await eventually(lambda: server.stats()["handshaking"] == 0, timeout=10)
    assert server.stats()["active"] == 0


async def test_a_hello_sent_in_pieces_or_without_its_newline_is_still_answered(engine: Engine, sock_path: str) -> None:
    # what the server now holds as bytes before a hello is whole must reach the hello's reader
    server = await serve(engine, sock_path)
    hello = json.dumps({"type": "hello", "version": PROTOCOL_VERSION}).encode()
    raw = await RawClient.open(sock_path)
    for piece in (hello[:1], hello[1:10], hello[10:] + b'\n{"type":"ping","id":1}'):
        await raw.send(piece)
        await eventually(lambda: server.stats()["handshaking"] == 1)
    await raw.send(b"\n")
    assert [(await raw.recv())["type"] for _ in range(3)] == ["welcome", "snapshot", "ok"]
    await raw.close()

    # printf '{"type":"hello",...}' | nc -N -U sock: no newline, then the end of what it sends
    raw = await RawClient.open(sock_path)
    await raw.send(hello)
    raw.writer.write_eof()
    assert [(await raw.recv())["type"] for _ in range(2)] == ["welcome", "snapshot"]
    await raw.close()
    await eventually(lambda: server.stats()["active"] == 0)


# ---------------------------------------------------------------- 2: addresses that carry secrets

TOKEN = "the-real-token-1234567890abcdef"


@pytest.mark.parametrize(
    "address",
    [
        f"tcp://:{TOKEN}@127.0.0.1:7070",  # as redis:// and postgresql:// take a password
        f"tcp://{TOKEN}@127.0.0.1:7070",  # a user part with no password: no URL redaction hides it
        f"tcp://user:{TOKEN}@[::1]:7070",
        f"tcp://127.0.0.1:7070/{TOKEN}",
        f"tcp://127.0.0.1:7070?token={TOKEN}",
        f"tcp://127.0.0.1:7070#{TOKEN}",
    ],
)
async def test_a_tcp_address_with_a_user_part_path_query_or_fragment_is_refused_unquoted(
    engine: Engine, address: str
) -> None:
    with pytest.raises(InvalidAddress) as caught:
        RemoteEngine(address, timeout=1)
    assert TOKEN not in str(caught.value) and TOKEN not in str(caught.value.address)
    assert "tcp://HOST:PORT" in str(caught.value) or "write it as tcp://" in str(caught.value)
    serving = address.replace(":7070", ":0")
    with pytest.raises(InvalidAddress) as caught:
        await engine.serve(serving, token="t" * 32, announce=False)
    assert TOKEN not in str(caught.value)


def test_attach_with_the_token_in_the_address_refuses_without_showing_it() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "taskwatch.tui", "attach", f"tcp://:{TOKEN}@127.0.0.1:7070"],
        cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "no user part" in proc.stderr and TOKEN not in proc.stderr + proc.stdout


# ---------------------------------------------------------------- 3: concurrent connect() calls


async def test_two_concurrent_connects_share_one_connection_that_stays_up(engine: Engine) -> None:
    server = await serve(engine, "tcp://127.0.0.1:0")
    remote = RemoteEngine(server.address, token=server.token, timeout=5)
    first, second = await asyncio.gather(remote.connect(), remote.connect())
    assert first is second  # one connect, its snapshot to both callers
    assert remote.connected and not remote.disconnected.is_set()
    assert server.stats()["active"] == 1
    record = await remote.submit("quick")
    assert record.task == "quick"
    assert (await remote.ping()) >= 0
    await remote.close()
    await eventually(lambda: server.stats()["active"] == 0)


async def test_a_failed_connect_fails_both_concurrent_callers_alike(sock_path: str) -> None:
    remote = RemoteEngine(sock_path, timeout=1)  # nothing serves there
    results = await asyncio.gather(remote.connect(), remote.connect(), return_exceptions=True)
    assert [type(r).__name__ for r in results] == ["EngineUnreachable", "EngineUnreachable"]
    assert not remote.connected


async def test_a_connect_waiting_for_a_cancelled_one_connects_for_itself(engine: Engine) -> None:
    server = await serve(engine, "tcp://127.0.0.1:0")
    remote = RemoteEngine(server.address, token=server.token, timeout=5)
    first = asyncio.ensure_future(remote.connect())
    await asyncio.sleep(0)  # let it start (an ordering step, not a wait for an outcome)
    second = asyncio.ensure_future(remote.connect())
    first.cancel()
    snapshot = await asyncio.wait_for(second, 10)
    assert snapshot.node_id == engine.node_id and remote.connected
    with pytest.raises(asyncio.CancelledError):
        await first
    await remote.close()


# ---------------------------------------------------------------- 4: something that is not taskwatch


@pytest.mark.parametrize(
    ("first_line", "shown"),
    [
        (b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", "SSH-2.0-OpenSSH_9.6"),
        (b'{"jsonrpc":"2.0","id":1,"result":null}\n', "jsonrpc"),
    ],
)
async def test_connecting_to_another_service_says_it_is_no_taskwatch_endpoint(first_line: bytes, shown: str) -> None:
    async def other_service(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(first_line)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
            await reader.read()  # until the client leaves
        writer.close()

    service = await asyncio.start_server(other_service, "127.0.0.1", 0)
    port = service.sockets[0].getsockname()[1]
    try:
        with pytest.raises(EngineUnreachable) as caught:
            await RemoteEngine(f"tcp://127.0.0.1:{port}", token="x" * 20, timeout=5).connect()
        said = str(caught.value)
        assert f"tcp://127.0.0.1:{port}" in said and "not a taskwatch control endpoint" in said
        assert shown in said
    finally:
        service.close()
        await service.wait_closed()


# ---------------------------------------------------------------- 5: a TCP port already taken


async def test_serving_on_a_taken_tcp_port_names_the_address(engine: Engine) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"tcp://127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError) as caught:
            await engine.serve(address, announce=False)
    assert caught.value.errno == errno.EADDRINUSE
    assert f"already listening at {address}" in str(caught.value) and "another port" in str(caught.value)


# ---------------------------------------------------------------- 7: a dashboard without a terminal


def _no_terminal(*args: str, stdin: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskwatch.tui", *args],
        cwd=REPO, stdin=stdin, capture_output=True, text=True, timeout=20,
    )


@pytest.mark.parametrize("command", [["attach", "/nonexistent/tw.sock"], []])
def test_a_dashboard_without_a_terminal_is_refused_in_one_line(command: list[str]) -> None:
    # stdin /dev/null (cron, nohup): Textual would spin on it for good
    result = _no_terminal(*command, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr[-600:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a terminal" in lines[0] and "--plain" in lines[0], result.stderr[-600:]


def test_a_demo_refused_for_want_of_a_terminal_starts_nothing(tmp_path: Path) -> None:
    # refused before the engine starts: no store opened, no demo run started only to be stopped
    db = tmp_path / "demo.db"
    result = _no_terminal("--store", f"sqlite:///{db}", stdin=subprocess.DEVNULL)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr[-600:]
    assert "needs a terminal" in result.stderr
    assert not db.exists()


def test_a_dashboard_with_a_terminal_stdin_but_stdout_piped_is_refused() -> None:
    master, slave = os.openpty()
    try:
        result = _no_terminal("attach", "/nonexistent/tw.sock", stdin=slave)
    finally:
        os.close(slave)
        os.close(master)
    assert result.returncode == 2 and "needs a terminal" in result.stderr, result.stderr[-600:]


def test_plain_output_still_works_without_a_terminal() -> None:
    result = _no_terminal("--plain", "--seconds", "0.5", stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-600:]
    assert "engine.started" in result.stdout
