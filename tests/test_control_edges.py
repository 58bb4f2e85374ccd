"""The control endpoint and RemoteEngine at their edges: a flood of one-byte connections,
addresses carrying secrets, concurrent connects, a service that is not taskwatch, a TCP port
already taken, ``taskwatch attach`` without a terminal, many large replies asked for at once,
events lost on both sides of a connection, clients that half-close, slow links, a server
started again, lines the engine's JSON reader refuses, a client limit below the engine's floor,
and refusals that say what to do (a wrong token, a path that is no socket).

Every test serves a real engine on a real socket, and talks to it with
:class:`RemoteEngine` (on a loop of its own where the client must stop reading,
as a busy dashboard process does) or with a hand-rolled client.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    AuthenticationFailed,
    ConnectionClosed,
    ControlServer,
    Engine,
    EngineNotRunning,
    EngineUnreachable,
    InvalidAddress,
    InvalidConfiguration,
    MalformedMessage,
    MessageTooLarge,
    RemoteEngine,
    ReplyTooLarge,
    RunStatus,
    TaskContext,
)
from taskwatch.engine import remote as remote_module
from taskwatch.engine import server as server_module
from taskwatch.engine.wire import PROTOCOL_VERSION, SnapshotMessage, Welcome, encode_message
from taskwatch.tui.client import LocalClient
from taskwatch.tui.remote_client import RemoteClient

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


#: a generated password: base64's '/', '+' and '=', and a password manager's '?' and '#'
PASSWORD = "Xk3/9s+Q?w#b=="


@pytest.mark.parametrize(
    ("url", "shown", "unescaped"),
    [
        (f"redis://:{PASSWORD}@cache:6379/0", "redis://***@cache:6379/0", True),
        ("redis://:Xk3#9sQw@cache:6379/0", "redis://***@cache:6379/0", True),
        (f"postgresql://app:{PASSWORD}@db/app", "postgresql://app:***@db/app", True),
        # a password whose head reads as a port, and one holding '@' as well
        ("postgresql://app:123/456@db:5432/app?password=x", "postgresql://app:***@db:5432/app?password=***", True),
        ("postgresql://app:123?456@db/app", "postgresql://app:***@db/app", True),
        ("postgresql://u:p@s/s@[::1]:5432/db", "postgresql://u:***@[::1]:5432/db", True),
        ("unix://:Xk3/9s@/run/redis.sock?db=0", "unix://***@/run/redis.sock?db=0", True),
        # as before: a password encoded, none, an '@' in a query value or a socket path
        ("redis://:Xk3%2F9s@cache:6379/0", "redis://***@cache:6379/0", False),
        ("redis://user@cache/0", "redis://user@cache/0", False),
        ("postgresql://db:5432/app?application_name=me@corp", "postgresql://db:5432/app?application_name=me@corp", False),
        ("postgresql://u:pw@db/app?application_name=me@corp", "postgresql://u:***@db/app?application_name=me@corp", False),
        ("unix:///run/r@dis.sock", "unix:///run/r@dis.sock", False),
    ],
)
def test_a_password_in_a_url_is_shown_as_stars_whatever_it_holds(url: str, shown: str, unescaped: bool) -> None:
    from taskwatch.engine.urls import password_problem, redact_url

    assert redact_url(url) == shown
    # a password holding '/', '?' or '#' as they are is no password any driver reads: said so,
    # without quoting it
    problem = password_problem(url)
    assert (problem is not None) == unescaped, problem
    if problem is not None:
        assert "percent-encode the password" in problem and "%2F" in problem


def test_an_address_given_with_such_a_password_is_refused_without_it() -> None:
    with pytest.raises(InvalidAddress) as caught:
        RemoteEngine(f"postgresql://app:{PASSWORD}@db/prod", timeout=1)
    assert caught.value.address == "postgresql://app:***@db/prod"
    assert "9s+Q" not in str(caught.value)


def test_a_store_or_lease_given_such_a_password_is_refused_without_it() -> None:
    from taskwatch.engine import PostgresEventRelay, PostgresLease, PostgresStore, RedisEventRelay, RedisLease, make_store

    for make in (
        lambda: RedisEventRelay(f"redis://:{PASSWORD}@cache:6379/0"),
        lambda: PostgresEventRelay(f"postgresql://app:{PASSWORD}@db/app"),
        lambda: RedisLease(f"redis://:{PASSWORD}@cache:6379/0", ttl=10),
        lambda: PostgresLease(f"postgresql://app:{PASSWORD}@db/app", ttl=10),
        lambda: PostgresStore(f"postgresql://app:{PASSWORD}@db/app"),
        lambda: make_store(f"postgresql://app:{PASSWORD}@db/app"),
    ):
        with pytest.raises(InvalidConfiguration) as caught:
            make()
        assert "percent-encode the password" in str(caught.value)
        assert "Xk3" not in str(caught.value) and "9s+Q" not in str(caught.value)


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


@pytest.mark.parametrize(
    ("command", "advice"),
    [
        ([], ["--plain", "`taskwatch web`"]),
        # attach has no --plain: its way without a terminal is the browser's, for an engine's address
        (["attach", "/nonexistent/tw.sock"], ["`taskwatch web attach /nonexistent/tw.sock`"]),
        (["attach", "redis://127.0.0.1:1/0"], []),
    ],
)
def test_a_dashboard_without_a_terminal_is_refused_in_one_line_with_advice_that_works(
    command: list[str], advice: list[str]
) -> None:
    # stdin /dev/null (cron, nohup): Textual would spin on it for good
    result = _no_terminal(*command, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr[-600:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a terminal" in lines[0], result.stderr[-600:]
    for way in advice:
        assert way in lines[0]
    if command:
        assert "--plain" not in lines[0] and ("web" in lines[0]) == bool(advice)
        if advice:
            # what it advises takes this address without a terminal: it goes on to look for the engine
            advised = _no_terminal(*advice[0].strip("`").split()[1:], stdin=subprocess.DEVNULL)
            assert "cannot reach an engine at /nonexistent/tw.sock" in advised.stderr, advised.stderr[-600:]


def test_attach_without_a_terminal_advises_the_browser_with_the_same_token_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret-token-of-the-test\n")
    token.chmod(0o600)
    result = _no_terminal("attach", "/nonexistent/tw.sock", "--token-file", str(token), stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr[-600:]
    advice = f"`taskwatch web attach /nonexistent/tw.sock --token-file {token}`"
    assert advice in result.stderr and "s3cret" not in result.stderr, result.stderr[-600:]
    # followed, it gets past the token to looking for the engine
    advised = _no_terminal(*advice.strip("`").split()[1:], stdin=subprocess.DEVNULL)
    assert "cannot reach an engine at /nonexistent/tw.sock" in advised.stderr, advised.stderr[-600:]


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


KIB = 1 << 10


MIB = 1 << 20


T = TypeVar("T")


class ChatterParams(BaseModel):
    #: characters in each progress message
    size: int = 200


class SizedParams(BaseModel):
    #: characters in the result
    size: int


class ClientLoop:
    """An event loop on a thread of its own, as a dashboard process has: blocked, it reads nothing."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-client-loop", daemon=True)
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def block(self) -> threading.Event:
        """Hold the loop (nothing on it runs, its sockets are not read) until the event is set."""
        held = threading.Event()
        self.loop.call_soon_threadsafe(held.wait, 30)
        return held

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def client_loop() -> Iterator[ClientLoop]:
    client = ClientLoop()
    yield client
    client.close()


def build_engine(**options: Any) -> Engine:
    engine = Engine(health_interval=None, max_concurrency=16, cancel_grace=5.0, **options)

    @engine.task
    async def big(ctx: TaskContext) -> str:
        return "x" * (4 * MIB)

    @engine.task
    async def medium(ctx: TaskContext) -> str:
        return "m" * (10 * KIB)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    @engine.task
    async def sized(ctx: TaskContext, p: SizedParams) -> str:
        return "s" * p.size

    @engine.task
    async def slow_to_cancel(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            # a little cleanup: the cancel command's reply comes after it
            await asyncio.sleep(0.2)
            raise

    @engine.task
    async def chatter(ctx: TaskContext, p: ChatterParams) -> None:
        i = 0
        while True:
            i += 1
            await ctx.progress(i, None, "t" * p.size)
            await asyncio.sleep(0.002)  # the task's own pace

    return engine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = build_engine()
    async with engine:
        yield engine
    assert stray_tasks() == set()


async def finished(engine: Engine, task: str, n: int) -> list[str]:
    handles = [await engine.submit(task) for _ in range(n)]
    for handle in handles:
        assert (await handle.wait(30)).status is RunStatus.SUCCEEDED
    return [handle.id for handle in handles]


# ---------------------------------------------------------------- 1: large replies asked for at once


async def test_a_client_that_reads_gets_every_large_reply_it_asked_for_at_once(engine: Engine, sock_path: str) -> None:
    big = await finished(engine, "big", 10)  # 40 MiB of full records: over the 32 MiB kept per client
    await finished(engine, "medium", 400)  # snapshots of about 4 MB each
    server = await serve(engine, sock_path)
    async with RemoteEngine(sock_path, timeout=30) as remote:
        records = await asyncio.gather(*(remote.get(run_id) for run_id in big))
        assert [len(record.result) for record in records] == [4 * MIB] * 10
        snapshots = await asyncio.gather(*(remote.snapshot(runs_limit=100_000) for _ in range(16)))
        assert [len(snapshot.runs) for snapshot in snapshots] == [410] * 16
        assert remote.connected and remote.close_reason is None
    assert server.stats()["overflow_disconnects"] == 0


async def test_a_client_that_asks_for_more_than_it_reads_is_told_why_it_is_cut_off(
    engine: Engine, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.server")
    big = await finished(engine, "big", 4)
    server = await serve(engine, sock_path, max_send=5 * MIB, max_outgoing_bytes=10 * MIB, write_timeout=30)
    hog = await RawClient.authenticated(sock_path)
    hog.reading(False)  # asks for 20 MiB of records, reads none of them
    for i, run_id in enumerate(big):
        await hog.send({"type": "get", "id": i, "run_id": run_id})
    await hog.send({"type": "ping", "id": 99})
    await hog.send({"type": "get", "id": 100, "run_id": big[0]})
    # told well before write_timeout: it holds all the engine keeps for it, and reads nothing
    await eventually(lambda: server.stats()["overflow_disconnects"] == 1, timeout=10)
    hog.reading(True)
    replies: list[dict[str, Any]] = []
    async with asyncio.timeout(10):
        while line := await hog.reader.readline():
            msg = json.loads(line)
            if msg["type"] != "event":
                replies.append(msg)
    # what was written before the cut arrives whole; the last line says why the stream ends
    assert replies, "the stream ended without a word"
    last = replies[-1]
    assert (last["type"], last["id"], last["error_type"]) == ("error", None, "ConnectionClosed")
    assert "read nothing for 2 s" in last["message"] and "ask for less at a time" in last["message"]
    assert all(reply["type"] == "ok" for reply in replies[:-1])
    assert server.stats()["slow_disconnects"] == 0
    said = [r.getMessage() for r in caplog.records if "replies unread" in r.getMessage()]
    assert len(said) == 1 and "took no bytes" in said[0], said
    await hog.close()


async def test_a_client_that_stops_reading_learns_why_its_connection_ended(
    engine: Engine, sock_path: str, client_loop: ClientLoop, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.server")
    server = await serve(engine, sock_path, write_timeout=1.0)
    remote = RemoteEngine(sock_path, timeout=10)
    await client_loop.run(remote.connect())
    held = client_loop.block()  # its process is busy: it reads nothing while events pour in
    chatter = await engine.submit("chatter")
    try:
        await eventually(lambda: server.stats()["slow_disconnects"] == 1, timeout=15)
    finally:
        held.set()
        await engine.cancel(chatter.id)

    async def gone() -> BaseException | None:
        await remote.disconnected.wait()
        return remote.close_reason

    reason = await client_loop.run(gone())
    assert isinstance(reason, ConnectionClosed)
    assert "read nothing of what was sent to it for 1 s" in str(reason) and "write_timeout" in str(reason)
    with pytest.raises(ConnectionClosed):
        await client_loop.run(remote.ping())
    await client_loop.run(remote.close())
    said = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("dropping a control client that took no bytes of what was written to it for 1 s ("), said


async def test_a_client_cut_off_that_reads_again_later_still_learns_why(engine: Engine, sock_path: str) -> None:
    # its socket is full of lines it has not read, the last one cut, the line saying why after
    # them in the engine's buffer: dropped a second after the cut, as it was, its stream ended
    # mid-line (the client said the engine sent a malformed message) and the reason was lost
    server = await serve(engine, sock_path, write_timeout=1.5)
    stalled = await RawClient.authenticated(sock_path)
    stalled.reading(False)
    chatter = await engine.submit("chatter", {"size": 4000})
    try:
        await eventually(lambda: server.stats()["slow_disconnects"] == 1, timeout=15)
        # its place is free at once (its reconnect is no connection over the limit) ...
        await eventually(lambda: server.stats()["active"] == 0)
    finally:
        await engine.cancel(chatter.id)
    # ... while its stream waits for it to read again
    stalled.reading(True)
    lines = []
    async with asyncio.timeout(10):
        while line := await stalled.reader.readline():
            lines.append(line)
    assert lines and all(line.endswith(b"\n") for line in lines)  # whole lines, to the end
    last = json.loads(lines[-1])
    assert (last["type"], last.get("id"), last.get("error_type")) == ("error", None, "ConnectionClosed"), last
    assert "read nothing of what was sent to it for 1.5 s" in last["message"]
    assert {json.loads(line)["type"] for line in lines[:-1]} == {"event"}
    await stalled.close()


async def test_a_stream_cut_mid_line_is_a_closed_connection_to_the_client(engine: Engine) -> None:
    # what a client reads last before the end of its stream may be part of a line (the engine
    # dropped it, or the link went): that is the connection ending, no malformed message
    cut = b'{"type":"event","event":{"kind":"run.progress","seq":'

    async def cut_short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()  # the hello
        writer.write(encode_message(Welcome(version=PROTOCOL_VERSION, node_id="cut")))
        writer.write(encode_message(SnapshotMessage(snapshot=engine.snapshot())))
        await reader.readline()  # the ping
        writer.write(cut)
        await writer.drain()
        writer.close()

    service = await asyncio.start_server(cut_short, "127.0.0.1", 0)
    port = service.sockets[0].getsockname()[1]
    try:
        remote = RemoteEngine(f"tcp://127.0.0.1:{port}", token="x" * 20, timeout=5)
        await remote.connect()
        with pytest.raises(ConnectionClosed) as caught:
            await remote.ping()
        await asyncio.wait_for(remote.disconnected.wait(), 5)
        assert isinstance(remote.close_reason, ConnectionClosed)
        assert "in the middle of a message" in str(remote.close_reason)
        assert "in the middle of a message" in str(caught.value)
        await remote.close()
    finally:
        service.close()
        await service.wait_closed()


# ---------------------------------------------------------------- 2: events lost on both sides, counted


async def test_events_lost_by_the_engine_and_by_the_client_are_all_counted(
    sock_path: str, client_loop: ClientLoop
) -> None:
    engine = build_engine(max_queue=100_000, history=100_000)
    async with engine:
        server = await serve(engine, sock_path, buffer=50, outgoing=4)
        remote = RemoteEngine(sock_path, buffer=20, timeout=10)  # a small local buffer, never read
        first = (await client_loop.run(remote.connect())).last_seq
        held = client_loop.block()  # it reads nothing: the engine drops events for it too
        try:
            await finished(engine, "quick", 3000)
            await eventually(lambda: server.stats()["events_dropped"] > 1000)
        finally:
            held.set()
        emitted = engine.bus.last_seq - first

        async def all_accounted() -> list[Any]:
            # every event after the snapshot is either here or counted as lost
            await eventually(lambda: remote.pending() + remote.dropped >= emitted, timeout=10)
            return remote.get_batch()

        taken = await client_loop.run(all_accounted())
        notices = [event for event in taken if event.kind == "bus.dropped"]
        events = [event for event in taken if event.kind != "bus.dropped"]
        lost = sum(notice.count for notice in notices)  # what a dashboard adds up
        assert len(events) == 20
        assert lost == remote.dropped == emitted - 20
        await client_loop.run(remote.close())


# ---------------------------------------------------------------- 3: half-closed connections


async def read_to_end(raw: RawClient) -> list[dict[str, Any]]:
    messages = []
    async with asyncio.timeout(20):
        while line := await raw.reader.readline():
            messages.append(json.loads(line))
    return messages


async def cancel_then_half_close(sock_path: str, cancel: dict[str, Any]) -> RawClient:
    """A client that sends its hello, ``cancel`` and a ping (id 8) in one go, then the end of
    what it sends, as `printf '...' | nc -N` does; it goes on reading."""
    raw = await RawClient.open(sock_path)
    lines = ({"type": "hello", "version": PROTOCOL_VERSION}, cancel, {"type": "ping", "id": 8})
    await raw.send(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    raw.writer.write_eof()
    return raw


async def test_a_client_that_half_closes_gets_every_reply_then_the_end(tmp_path: Path, sock_path: str) -> None:
    # `printf '...' | nc -N -U sock`: the commands, then the end of what the client sends
    engine = build_engine(store=f"sqlite:///{tmp_path / 'runs.db'}")
    async with engine:
        await serve(engine, sock_path)
        raw = await RawClient.open(sock_path)
        lines = [{"type": "hello", "version": PROTOCOL_VERSION}]
        lines += [{"type": "submit", "id": i, "task": "quick"} for i in range(20)]
        await raw.send(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        raw.writer.write_eof()
        messages = await read_to_end(raw)
        replies = {msg["id"]: msg for msg in messages if msg["type"] in ("ok", "error")}
        assert sorted(replies) == list(range(20))
        assert all(reply["type"] == "ok" for reply in replies.values())
        assert len(engine.runs(limit=100)) == 20
        await raw.close()


async def test_a_cancel_sent_before_a_half_close_is_answered_once_the_run_has_stopped(
    engine: Engine, sock_path: str
) -> None:
    handle = await engine.submit("slow_to_cancel")
    await eventually(lambda: engine.get(handle.id).status is RunStatus.RUNNING)
    await serve(engine, sock_path)
    raw = await cancel_then_half_close(sock_path, {"type": "cancel", "id": 7, "run_id": handle.id})
    replies = {msg["id"]: msg for msg in await read_to_end(raw) if msg["type"] in ("ok", "error")}
    assert sorted(replies) == [7, 8]
    assert replies[7]["type"] == "ok" and replies[7]["result"]["status"] == "cancelled"
    await raw.close()


async def test_a_command_still_going_long_after_a_half_close_gets_an_error_line_not_silence(
    sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # its reply was dropped without a word when the connection ended, and counted nowhere
    monkeypatch.setattr(server_module, "_EOF_GRACE", 0.3)
    engine = Engine(health_interval=None)
    release = asyncio.Event()

    @engine.task
    async def stubborn(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await release.wait()  # a cleanup that outlasts the grace the server gives
            raise

    async with engine:
        handle = await engine.submit("stubborn")
        await eventually(lambda: engine.get(handle.id).status is RunStatus.RUNNING)
        server = await serve(engine, sock_path)
        raw = await cancel_then_half_close(sock_path, {"type": "cancel", "id": 7, "run_id": handle.id, "grace": 30})
        try:
            replies = {msg["id"]: msg for msg in await read_to_end(raw) if msg["type"] in ("ok", "error")}
        finally:
            release.set()
        await raw.close()
        assert replies[8]["type"] == "ok"
        assert replies[7]["type"] == "error" and replies[7]["error_type"] == "ConnectionClosed"
        assert "'cancel' was still going" in replies[7]["message"] and "given up" in replies[7]["message"]
        assert server.stats()["replies_given_up"] == 1
        await eventually(lambda: engine.get(handle.id).status is RunStatus.CANCELLED)  # it was applied


# ---------------------------------------------------------------- 4: a server started again


async def test_a_stopped_server_serves_again_when_started(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path)
    await server.stop()
    with pytest.raises(EngineUnreachable):
        await RemoteEngine(sock_path, timeout=2).connect()
    with pytest.raises(RuntimeError, match="is stopped; start"):
        server.address  # noqa: B018  (nothing listens there)
    await server.start()
    assert server.address == sock_path
    async with RemoteEngine(server.address, timeout=5) as remote:
        assert await remote.ping() >= 0

    tcp = ControlServer(engine, "tcp://127.0.0.1:0", announce=False)
    async with tcp:
        pass
    async with tcp:  # a second `async with` serves again, at a port of its own
        async with RemoteEngine(tcp.address, tcp.token, timeout=5) as remote:
            assert await remote.ping() >= 0


# ---------------------------------------------------------------- 5: slow links


class SlowProxy:
    """A TCP proxy passing ``rate`` bytes/s from the engine to its client: an SSH tunnel over a
    poor link. It holds little itself, so the engine's bytes wait in the engine's socket."""

    def __init__(self, target: str, rate: int) -> None:
        host, port = target[len("tcp://"):].rsplit(":", 1)
        self.target = (host, int(port))
        self.rate = rate
        self.pumps: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"tcp://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self.server is not None
        self.server.close()
        for pump in self.pumps:
            pump.cancel()
        await asyncio.gather(*self.pumps, return_exceptions=True)
        await self.server.wait_closed()

    async def _pump(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, paced: bool) -> None:
        try:
            while data := await source.read(1024 if paced else 65536):
                sink.write(data)
                await sink.drain()
                if paced:
                    await asyncio.sleep(len(data) / self.rate)  # the link's pace, not synchronisation
        except ConnectionError:
            pass
        finally:
            sink.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream = socket.socket()
        upstream.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        upstream.setblocking(False)
        await asyncio.get_running_loop().sock_connect(upstream, self.target)
        engine_reader, engine_writer = await asyncio.open_connection(sock=upstream, limit=1024)
        for pump in (self._pump(engine_reader, writer, True), self._pump(reader, engine_writer, False)):
            task = asyncio.ensure_future(pump)
            self.pumps.add(task)


async def test_a_client_reading_steadily_over_a_slow_link_is_not_taken_for_stalled(engine: Engine) -> None:
    server = await serve(
        engine, "tcp://127.0.0.1:0", write_timeout=1.0, max_send=512 * KIB, max_outgoing_bytes=1 * MIB
    )
    proxy = SlowProxy(server.address, rate=16_000)
    address = await proxy.start()
    # about 1.5 MB/s of events: they soon fill every buffer on the way, and the link sets the pace
    chatter = await engine.submit("chatter", {"size": 4000})
    received = 0
    try:
        async with RemoteEngine(address, server.token, timeout=30) as remote:

            async def read() -> None:
                nonlocal received
                async for _ in remote.events():
                    received += 1

            reader = asyncio.create_task(read())
            try:
                # the engine drops events for it: the link is full, and the client reads all it carries
                await eventually(lambda: server.stats()["events_dropped"] or server.stats()["slow_disconnects"], 30)
                assert server.stats()["slow_disconnects"] == 0
                # a dozen more events of 4 KB: three times write_timeout of reading, never a second without
                at = received
                await eventually(lambda: received >= at + 12 or server.stats()["slow_disconnects"], timeout=30)
                assert server.stats()["slow_disconnects"] == 0
                assert remote.connected and remote.close_reason is None
            finally:
                reader.cancel()
                await engine.cancel(chatter.id)
    finally:
        await proxy.close()


async def test_runs_gone_from_the_history_are_not_kept_encoded_for_snapshots(tmp_path: Path) -> None:
    # each attach encodes the finished runs its snapshot lists; runs the history let go since
    # are listed by no snapshot again, and are let go here too instead of piling up to max_send
    engine = Engine(health_interval=None, history=50)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    async with engine:
        server = await engine.serve(str(tmp_path / "s.sock"), announce=False)
        for _ in range(6):
            for handle in [await engine.submit("quick") for _ in range(50)]:
                await handle.wait(10)
            remote = RemoteEngine(server.address)
            snapshot = await remote.connect()
            await remote.close()
            assert len(snapshot.runs) == 50
        stats = server.stats()
    # 300 runs were listed over time, at most 50 at once: at most twice that are kept
    assert 50 <= stats["cached_runs"] <= 100, stats
    assert stats["cached_bytes"] > 0


# ---------------------------------------------------------------- 6: lines the engine's JSON reader refuses


def nested(depth: int) -> list[Any]:
    """A list ``depth`` levels deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


async def test_a_command_the_engines_json_reader_refuses_is_answered_at_once_with_its_id(
    engine: Engine, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a client whose own checks let through what the engine's JSON reader refuses (another
    # version's, say): the reader stops short of the id, which must still be found
    monkeypatch.setattr(remote_module, "params_for_wire", lambda task, params: params)
    server = await serve(engine, sock_path)
    async with RemoteEngine(sock_path, timeout=5) as remote:
        for params, said in [
            ({"a": nested(200)}, "more than 200 levels deep"),
            ({"a": 10**4300}, "an integer of more than 4300 digits"),
        ]:
            # no CommandTimeout saying it may have run: the engine's own answer, at once
            with pytest.raises(MalformedMessage) as caught:
                await remote.submit("quick", params)
            assert said in str(caught.value) and "nothing in it was read" in str(caught.value)
        assert await remote.ping() >= 0
        assert engine.runs(limit=10) == []
        assert server.stats()["malformed"] == 2
    assert remote.close_reason is None


async def test_the_engine_finds_the_id_of_a_line_its_reader_refuses_and_shrugs_off_hostile_ones(
    engine: Engine, sock_path: str
) -> None:
    server = await serve(engine, sock_path)
    raw = await RawClient.authenticated(sock_path)
    deep = b"[" * 300 + b"]" * 300
    lines: list[tuple[bytes, Any, str]] = [
        (b'{"id":1,"type":"submit","task":"quick","params":{"a":' + deep + b"}}", 1, "levels deep"),
        # the id after the values the reader refuses, past strings holding brackets and quotes
        (
            b'{"type":"submit","task":"quick","params":{"s":"]}\\"{[","a":' + deep + b',"n":1e5},"id":"last"}',
            "last",
            "levels deep",
        ),
        (b'{"type": "submit", "\\u0069d": 3, "params": {"a": 1' + b"0" * 4300 + b"}}", 3, "4300 digits"),
        # hostile: half a million brackets before the id, a key that never ends, no object at all
        (b'{"params":' + b"[" * 500_000 + b',"id":4}', None, "levels deep"),
        (b'{"' + b"k" * 500_000, None, "malformed message"),
        (b"[" * 500_000, None, "levels deep"),
        (b'{"id":{"no":"object"},"type":"ping"}', None, "malformed message"),
    ]
    for line, message_id, said in lines:
        await raw.send(line + b"\n")
        reply = await raw.reply()
        assert (reply["type"], reply["id"], reply["error_type"]) == ("error", message_id, "MalformedMessage")
        assert said in reply["message"], reply["message"]
    # the connection and the engine go on
    await raw.send({"type": "ping", "id": 5})
    assert await raw.reply() == {"type": "ok", "id": 5, "result": None}
    assert server.stats()["malformed"] == len(lines) and server.stats()["active"] == 1
    await raw.close()


async def test_an_error_about_a_line_without_an_id_is_not_taken_for_why_the_connection_ended(
    engine: Engine, sock_path: str
) -> None:
    server = await serve(engine, sock_path)
    remote = RemoteEngine(sock_path, timeout=5)
    await remote.connect()
    # a line the engine can tell no id of, on this connection: its error answers no command
    assert remote._writer is not None
    remote._writer.write(b"not json\n")
    await eventually(lambda: server.stats()["malformed"] == 1)
    assert await remote.ping() >= 0  # answered after that error: the connection goes on
    assert remote.connected
    await server.stop()  # the end of the stream, with no parting words
    await asyncio.wait_for(remote.disconnected.wait(), 10)
    assert remote.close_reason is None
    await remote.close()


# ---------------------------------------------------------------- 7: a client limit below the engine's floor


async def test_a_client_limit_below_the_engines_floor_is_refused_when_connecting(
    engine: Engine, sock_path: str, tmp_path: Path
) -> None:
    record = await engine.submit("sized", {"size": 100_000})
    assert (await record.wait(10)).status is RunStatus.SUCCEEDED
    server = await serve(engine, sock_path)  # max_value 16 KiB: lines down to 512 KiB, not shorter
    # not connected, to lose the connection at the first reply over 32 KiB (get's 100 KB record)
    with pytest.raises(MessageTooLarge) as caught:
        await RemoteEngine(sock_path, max_message=32 * KIB, timeout=5).connect()
    said = str(caught.value)
    assert f"max_message of {32 * KIB}" in said and f"pass max_message={512 * KIB} or more" in said.lower()
    await eventually(lambda: server.stats()["active"] == 0)
    async with RemoteEngine(sock_path, max_message=512 * KIB, timeout=5) as remote:
        assert len((await remote.get(record.id)).result) == 100_000

    # an engine whose floor is lower keeps to the same client's limit: get says the record is too large
    small = await serve(engine, str(tmp_path / "small.sock"), max_value=1 * KIB)
    async with RemoteEngine(small.address, max_message=32 * KIB, timeout=5) as remote:
        with pytest.raises(ReplyTooLarge) as too_large:
            await remote.get(record.id)
        assert too_large.value.size > 100_000 and too_large.value.limit <= 32 * KIB
        assert remote.connected and await remote.ping() >= 0
        assert remote.close_reason is None


# ---------------------------------------------------------------- 8: messages that say what to do


async def test_a_missing_or_wrong_token_says_where_the_engines_token_goes(engine: Engine) -> None:
    server = await serve(engine, "tcp://127.0.0.1:0", token="the-right-token-0123456789")
    said = {}
    for label, token in [("missing", None), ("wrong", "not-the-token-0123456789")]:
        with pytest.raises(AuthenticationFailed) as caught:
            await RemoteEngine(server.address, token=token, timeout=5).connect()
        said[label] = str(caught.value)
        assert "authentication failed" in said[label]
        assert "token=" in said[label] and "TASKWATCH_TOKEN" in said[label] and "--token-file" in said[label]
        assert "not-the-token" not in said[label]
    assert "no token was given" in said["missing"]
    assert "not this engine's" in said["wrong"]
    assert server.stats()["auth_failures"] == 2


async def test_a_path_that_is_no_socket_is_named_for_what_it_is(tmp_path: Path) -> None:
    regular = tmp_path / "regular.file"
    regular.write_text("")
    for path, what in [(regular, "a regular file"), (tmp_path, "a directory")]:
        with pytest.raises(EngineUnreachable) as caught:
            await RemoteEngine(str(path), timeout=5).connect()
        said = str(caught.value)
        assert f"{path} is {what}, not a socket" in said and "has stopped" not in said
    # a socket file nothing listens on (its engine gone) is still told apart
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as left:
        left.bind(str(stale))
        with pytest.raises(EngineUnreachable) as caught:
            await RemoteEngine(str(stale), timeout=5).connect()
    assert "nothing listens on the socket file" in str(caught.value)


async def test_a_command_while_the_engine_stops_says_to_reconnect_not_to_start_it(sock_path: str) -> None:
    # what the engine tells its owner (`async with engine:`) a client cannot do
    engine = Engine(health_interval=None)
    finish = asyncio.Event()

    @engine.task
    async def draining(ctx: TaskContext) -> None:
        await finish.wait()

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    await engine.start()
    try:
        await serve(engine, sock_path)
        remote = RemoteEngine(sock_path, timeout=5)
        await remote.connect()
        run = await engine.submit("draining")
        await eventually(lambda: engine.get(run.id).status is RunStatus.RUNNING)
        stopping = asyncio.create_task(engine.stop(timeout=30))  # waits for the run to finish
        await eventually(lambda: engine.state == "stopping")
        with pytest.raises(EngineNotRunning) as caught:
            await remote.submit("quick")
        said = str(caught.value)
        assert caught.value.state == "stopping" and "the engine is stopping" in said
        assert "Reconnect once it runs again" in said
        assert "async with engine" not in said and "engine.start()" not in said
        finish.set()
        await stopping
        await remote.close()
    finally:
        finish.set()
        await engine.stop(timeout=5)


async def test_the_attached_dashboard_cancels_as_the_in_process_one_does(sock_path: str) -> None:
    # an engine whose cancel_grace is longer than the attached dashboard waits for a reply: the
    # in-process one answered after its own 2 s, the attached one timed out, the cancel done
    engine = Engine(health_interval=None, cancel_grace=120.0)
    cleaned_up = asyncio.Event()
    entered = asyncio.Event()

    @engine.task
    async def slow_cleanup(ctx: TaskContext) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await cleaned_up.wait()  # its cleanup lasts until the test ends it
            raise

    async with engine:
        server = await serve(engine, sock_path)
        answered = {}
        for client in (LocalClient(engine), RemoteClient(server.address, timeout=5)):
            await client.connect()
            entered.clear()
            run = await engine.submit("slow_cleanup")
            await asyncio.wait_for(entered.wait(), 10)
            answered[type(client).__name__] = (await client.cancel(run.id)).status
            await client.close()
        # both shown as still going (cancelling), neither as failed
        assert answered == {"LocalClient": RunStatus.RUNNING, "RemoteClient": RunStatus.RUNNING}
        cleaned_up.set()
