"""Serving at the edges: a socket path another server holds but does not answer at, a token
no hello can carry, and a client that reads slowly but steadily.

Each test serves a real engine on a real socket and talks to it over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from taskwatch.engine import ControlServer, Engine, RemoteEngine, TaskContext
from taskwatch.engine import server as server_module
from taskwatch.engine.errors import InvalidConfiguration, MessageTooLarge
from taskwatch.engine.wire import DEFAULT_MAX_HELLO, PROTOCOL_VERSION

from .helpers import eventually
from .raw_client import RawClient, serve

KIB = 1 << 10


def build_engine() -> Engine:
    engine = Engine(health_interval=None, cancel_grace=1.0)

    @engine.task
    async def bulky(ctx: TaskContext) -> str:
        return "b" * 15_000  # under max_value: whole in every snapshot

    return engine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = build_engine()
    async with engine:
        yield engine


# ---------------------------------------------------------------- a relative socket path


async def test_a_relative_socket_path_is_served_as_an_absolute_one(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # served as given, the address held only in the directory of the serving cell: after a
    # chdir (a notebook's %cd) clients were sent to a path with no socket, and the stop left its file
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path)
    server = await engine.serve("engine.sock", announce=False)
    address = server.info().address
    assert address == str(tmp_path / "engine.sock")
    monkeypatch.chdir(tmp_path / "elsewhere")
    remote = RemoteEngine(address, server.token, timeout=10)
    snap = await remote.connect()
    await remote.close()
    assert snap.node_id == engine.node_id
    await server.stop()
    assert not (tmp_path / "engine.sock").exists()


async def test_a_short_relative_socket_path_serves_from_a_directory_too_deep_for_its_absolute_one(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)  # its absolute socket path is over the kernel's limit
    deep.mkdir(parents=True)
    monkeypatch.chdir(deep)
    server = await engine.serve("tw.sock", announce=False)
    assert server.info().address == "tw.sock"  # as given: the path that fits
    remote = RemoteEngine("tw.sock", server.token, timeout=10)
    assert (await remote.connect()).node_id == engine.node_id
    await remote.close()
    await server.stop()
    assert not (deep / "tw.sock").exists()


# ---------------------------------------------------------------- a socket path held by a server that does not answer


@contextlib.contextmanager
def deaf_listener(path: str) -> Iterator[threading.Event]:
    """A server listening at ``path`` that accepts nothing (its process stopped, say) and whose
    backlog is full. The event it yields is set once a watchdog has accepted what waits, after
    a generous bound: so a connect that blocks is let go rather than hanging the test."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(0)
    queued: list[socket.socket] = []
    while True:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            client.connect(path)
        except BlockingIOError:
            client.close()
            break  # the backlog is full
        queued.append(client)
    freed = threading.Event()

    def free() -> None:
        freed.set()
        listener.setblocking(False)
        with contextlib.suppress(OSError):
            while True:
                listener.accept()[0].close()

    watchdog = threading.Timer(15.0, free)
    watchdog.start()
    try:
        yield freed
    finally:
        watchdog.cancel()
        for client in queued:
            client.close()
        listener.close()


async def test_serving_where_a_server_answers_nothing_is_refused_without_waiting_for_it(
    engine: Engine, tmp_path: Path
) -> None:
    path = str(tmp_path / "held.sock")
    with deaf_listener(path) as freed:
        with pytest.raises(OSError) as caught:
            await engine.serve(path, announce=False)
        # refused while that server still accepted nothing: the probe did not wait for it
        # (a blocking connect held the loop, and every run with it, until the watchdog let it go)
        assert not freed.is_set()
    assert caught.value.errno == errno.EADDRINUSE
    assert "another server is already listening" in str(caught.value)
    assert os.path.exists(path)  # its socket file is left alone
    # a path whose server is gone is served as before
    os.unlink(path)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a socket file nothing listens on
    stale.close()
    server = await serve(engine, path)
    async with RemoteEngine(server.address, timeout=10) as remote:
        assert await remote.ping() >= 0


async def test_a_probe_of_the_socket_path_that_gets_no_answer_is_taken_for_a_server_there(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # where connecting waits for an answer (elsewhere than Linux, or a server whose process is
    # stopped), no answer within the bound is no proof that nothing listens: the file is kept
    path = str(tmp_path / "quiet.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()

    async def no_answer(sock: socket.socket, address: object) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(server_module, "_STALE_PROBE_TIMEOUT", 0.2)
    monkeypatch.setattr(asyncio.get_running_loop(), "sock_connect", no_answer)
    with pytest.raises(OSError) as caught:
        await engine.serve(path, announce=False)
    assert caught.value.errno == errno.EADDRINUSE
    assert "another server is already listening" in str(caught.value) and "did not answer" in str(caught.value)
    assert os.path.exists(path)


# ---------------------------------------------------------------- a token no hello can carry


def longest_token(max_hello: int) -> str:
    """The longest token ``serve()`` takes with ``max_hello``: found by asking it."""
    low, high = 16, max_hello
    while low < high:
        middle = (low + high + 1) // 2
        try:
            ControlServer(Engine(health_interval=None), "tcp://127.0.0.1:0", token="k" * middle, max_hello=max_hello)
        except InvalidConfiguration:
            high = middle - 1
        else:
            low = middle
    return "k" * low


async def test_a_token_no_hello_can_carry_is_refused_when_serving(engine: Engine) -> None:
    for token, options in [("k" * 5000, {}), ('"' * 2100, {}), ("é" * 2100, {}), ("k" * 600, {"max_hello": 512})]:
        with pytest.raises(InvalidConfiguration) as caught:
            await engine.serve("tcp://127.0.0.1:0", token=token, announce=False, **options)
        said = str(caught.value)
        assert "max_hello" in said and token[:20] not in said  # the limit named, the token never quoted
    # the longest token taken fits every client's hello
    token = longest_token(DEFAULT_MAX_HELLO)
    assert len(token) > DEFAULT_MAX_HELLO - 100
    server = await serve(engine, "tcp://127.0.0.1:0", token=token)
    async with RemoteEngine(server.address, token, timeout=10) as remote:
        assert await remote.ping() >= 0
    assert server.stats()["oversized"] == 0


async def test_a_hello_over_the_limit_is_told_its_connection_is_closed(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path)
    raw = await RawClient.open(sock_path)
    await raw.send({"type": "hello", "version": PROTOCOL_VERSION, "token": "k" * (2 * DEFAULT_MAX_HELLO)})
    reply = await raw.recv()
    assert reply["error_type"] == MessageTooLarge.__name__
    assert "connection is closed" in reply["message"] and "discarded" not in reply["message"]
    assert "raise max_hello" in reply["message"]
    assert await raw.closed_by_server()
    await raw.close()
    assert server.stats()["oversized"] == 1


# ---------------------------------------------------------------- a client reading slowly but steadily


#: the paced reader's rate: what it reads shows in sends of 8 KiB, every two thirds of a
#: second; in buffers of about 36 KiB (the kernel's, of a larger send) only every 3 s
RATE = 12 * KIB
WRITE_TIMEOUT = 1.5


async def authenticated_socket(path: str) -> socket.socket:
    """A Unix socket past its hello, read by hand (a stream reader would read ahead in bursts)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    await loop.sock_connect(sock, path)
    hello = {"type": "hello", "version": PROTOCOL_VERSION}
    await loop.sock_sendall(sock, json.dumps(hello).encode() + b"\n")
    return sock


async def test_a_client_reading_slowly_but_steadily_is_served_and_one_reading_nothing_is_not(
    engine: Engine, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.server")
    # runs whose results make a first snapshot of about 400 KB: more than the socket holds, so
    # it waits for each client to read, sent in one piece
    for handle in [await engine.submit("bulky") for _ in range(25)]:
        await handle.wait(10)
    server = await serve(engine, sock_path, write_timeout=WRITE_TIMEOUT)
    loop = asyncio.get_running_loop()
    steady = await authenticated_socket(sock_path)
    stalled = await authenticated_socket(sock_path)  # says hello, then reads nothing
    try:
        taken = 0
        # four write_timeouts' worth of reading at RATE, then the stalled one is cut off
        while taken < 4 * WRITE_TIMEOUT * RATE:
            data = await asyncio.wait_for(loop.sock_recv(steady, 4 * KIB), timeout=30)
            assert data, f"the steady reader was cut off after {taken} bytes: {server.stats()}"
            taken += len(data)
            await asyncio.sleep(len(data) / RATE)  # the reader's pace, not synchronisation
        await eventually(lambda: server.stats()["slow_disconnects"] >= 1, timeout=15)
        assert server.stats()["slow_disconnects"] == 1, server.stats()
        assert server.stats()["active"] == 1  # the steady reader, still served
    finally:
        steady.close()
        stalled.close()
    said = [r.getMessage() for r in caplog.records if "dropping" in r.getMessage()]
    assert len(said) == 1 and "every 8 KiB read" in said[0], said
