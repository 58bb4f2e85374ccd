"""RemoteEngine against an engine served from another process: what its failures say and where it may be used.

Each test starts ``tests/served_engine.py`` as a subprocess (``Served``, as
``test_attach`` does) and pauses it with ``SIGSTOP`` where an engine must stop
reading or answering; the engine's own state is read back afterwards through a
fresh connection.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import (
    CommandTimeout,
    ConnectionClosed,
    EngineUnreachable,
    InvalidAddress,
    InvalidConfiguration,
    LoopThreadError,
    MessageTooLarge,
    RemoteEngine,
    TaskwatchError,
)

from .helpers import eventually
from .test_attach import REPO, TIMEOUT, Served, ServeFn, frozen, remote_until, serve  # noqa: F401

#: params over the unix socket's buffers, so that one command fills the connection
BIG_NAME = "A" + "x" * 900_000


async def runs_of(served: Served, task: str, at_least: int = 0) -> int:
    """How many runs of ``task`` the served engine has once it has ``at_least`` (bounded wait),
    read through a connection of its own."""
    async with served.remote() as check:
        snap = await remote_until(check, lambda s: sum(r.task == task for r in s.runs) >= at_least)
        return sum(1 for run in snap.runs if run.task == task)


# ---------------------------------------------------------------- 1: sent or not, said so


async def test_a_timed_out_submit_says_it_was_sent_and_the_engine_may_still_run_it(
    serve: ServeFn, tmp_path: Path
) -> None:
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    async with RemoteEngine(served.address, timeout=0.5) as remote:
        with frozen(served):
            with pytest.raises(TimeoutError) as caught:
                await remote.submit("quick")
        assert caught.value.sent is True  # type: ignore[attr-defined]
        said = str(caught.value)
        assert "no reply" in said and "'submit' was sent" in said and "may still carry it out" in said
        assert "key=" in said  # how to make a repeat safe
        # and it did: the engine ran the submit whose caller heard nothing back
        assert await runs_of(served, "quick", at_least=1) == 1


async def test_a_command_lost_with_its_connection_says_whether_it_was_sent(serve: ServeFn, tmp_path: Path) -> None:
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    remote = RemoteEngine(served.address, timeout=TIMEOUT)
    await remote.connect()
    with frozen(served):
        call = asyncio.create_task(remote.submit("quick"))
        await eventually(lambda: remote._pending)  # written, waiting for its reply
        await remote.close()
        with pytest.raises(ConnectionClosed) as caught:
            await call
    assert caught.value.sent is True  # type: ignore[attr-defined]
    assert "closed before the reply" in str(caught.value) and "may still carry it out" in str(caught.value)
    with pytest.raises(ConnectionClosed) as refused:
        await remote.ping()
    assert refused.value.sent is False  # type: ignore[attr-defined]
    assert "'ping' was not sent" in str(refused.value)


# ---------------------------------------------------------------- 2: the whole call is bounded


async def test_commands_behind_a_full_connection_time_out_unsent_and_the_stream_stays_whole(
    serve: ServeFn, tmp_path: Path
) -> None:
    """With the engine paused, one big submit fills the socket's buffers; the calls behind it
    (a ping too) used to wait, unbounded, for room to write. Each now ends within its timeout,
    unsent, and the bytes already handed to the connection still arrive whole."""
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    async with RemoteEngine(served.address, timeout=1.0) as remote:
        with frozen(served):
            calls = [remote.submit("greet", {"name": BIG_NAME}) for _ in range(3)] + [remote.ping()]
            async with asyncio.timeout(TIMEOUT):  # the bound the calls used to wait past
                results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, TimeoutError) for r in results), results
        sent = [r.sent for r in results]  # type: ignore[union-attr]
        assert sent[0] is True and sent[-1] is False, sent
        unsent = next(r for r in results if r.sent is False)  # type: ignore[union-attr]
        assert "could not send" in str(unsent) and "was not sent" in str(unsent)
        # resumed: the same connection answers, and each sent line reached the engine whole
        assert await remote.ping() >= 0
        assert (await remote.submit("quick")).task == "quick"
        assert await runs_of(served, "greet", at_least=sent.count(True)) == sent.count(True)
        assert remote.connected


# ---------------------------------------------------------------- 3: one event loop


@pytest.fixture
def other_loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop running on a thread of its own, stopped and closed at the end."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True, name="other-loop")
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


async def test_a_remote_engine_used_from_another_loop_says_so_at_once(
    serve: ServeFn, tmp_path: Path, other_loop: asyncio.AbstractEventLoop
) -> None:
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    remote = RemoteEngine(served.address, timeout=60.0)

    def on_other(coro: Any) -> Any:
        return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, other_loop))

    await on_other(remote.connect())
    try:
        async with asyncio.timeout(TIMEOUT):  # well within the 60 s each call used to stall for
            with pytest.raises(LoopThreadError, match="one RemoteEngine per event loop") as caught:
                await remote.submit("quick")
            with pytest.raises(LoopThreadError):
                await remote.wait(timeout=30)
            with pytest.raises(LoopThreadError):
                await remote.close()
        assert isinstance(caught.value, RuntimeError) and "connected on" in str(caught.value)
        assert remote.connected
        assert (await on_other(remote.submit("quick"))).task == "quick"  # on its own loop it works
    finally:
        await on_other(remote.close())
    assert await runs_of(served, "quick") == 1  # the refused submit was never sent


def test_one_instance_reconnects_in_a_later_asyncio_run_after_the_engine_dropped_it(tmp_path: Path) -> None:
    """The connection ended on a loop that has since closed: connect() in the next loop starts clean."""
    address = str(tmp_path / "e.sock")
    remote = RemoteEngine(address, timeout=TIMEOUT)
    servers: list[Served] = []

    def start() -> Served:
        served = Served([address, "--interval", "0"])
        servers.append(served)
        return asyncio.run(served.started())

    async def session(served: Served) -> None:
        await remote.connect()
        assert await remote.ping() >= 0
        served.terminate()  # the engine goes: it closes the connection
        async with asyncio.timeout(TIMEOUT):
            await remote.disconnected.wait()

    try:
        asyncio.run(session(start()))
        asyncio.run(session(start()))  # raised RuntimeError('Event loop is closed') from connect()
        asyncio.run(session(start()))
    finally:
        for served in servers:
            served.terminate()
    assert not remote.connected


# ---------------------------------------------------------------- 5: plaintext only to loopback


def test_a_non_loopback_host_is_refused_before_connecting() -> None:
    for address in ("tcp://192.0.2.2:7070", "tcp://10.1.2.3:7070", "tcp://example.com:7070", "tcp://[2001:db8::1]:7070"):
        with pytest.raises(InvalidAddress, match="non-loopback") as caught:
            RemoteEngine(address, token="s3cret-token-0123456789abcdef")
        assert "ssh" in str(caught.value) and "allow_remote=True" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    for address in ("tcp://127.0.0.1:7070", "tcp://localhost:7070", "tcp://[::1]:7070"):
        RemoteEngine(address, token="x" * 32)  # loopback: fine
    for address in ("tcp://127.0.0.1", "tcp://127.0.0.1:0"):
        # nothing to connect to: refused now, rather than retried for good
        with pytest.raises(InvalidAddress, match="no port"):
            RemoteEngine(address, token="x" * 32)


async def test_allow_remote_lets_a_non_loopback_host_through_to_connecting() -> None:
    # 192.0.2.0/24 is reserved for documentation: nothing answers there. Refused unless
    # allowed; allowed, the client goes on to connect, and says it could not
    with pytest.raises(InvalidAddress):
        RemoteEngine("tcp://192.0.2.2:7070", token="s3cret-token-0123456789abcdef")
    remote = RemoteEngine("tcp://192.0.2.2:7070", token="s3cret-token-0123456789abcdef", allow_remote=True, timeout=0.5)
    with pytest.raises(EngineUnreachable, match="192.0.2.2"):
        await remote.connect()


def test_cli_attach_refuses_a_non_loopback_host_before_connecting() -> None:
    for command in (["attach", "tcp://192.0.2.2:7070"], ["web", "attach", "tcp://192.0.2.2:7070"]):
        proc = subprocess.run(
            [sys.executable, "-m", "taskwatch.tui", *command],
            check=False, cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            env={**os.environ, "TASKWATCH_TOKEN": "s3cret-token-0123456789abcdef"},
        )
        assert proc.returncode == 2, proc.stderr
        assert "non-loopback host '192.0.2.2'" in proc.stderr and "ssh" in proc.stderr
        assert "s3cret" not in proc.stderr


# ---------------------------------------------------------------- 6: messages that say what to do


async def test_a_command_over_the_engines_limit_names_the_engines_max_message(serve: ServeFn, tmp_path: Path) -> None:
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    # this client's own limit is far higher: it is not the one that matters
    async with RemoteEngine(served.address, max_message=256 << 20) as remote:
        with pytest.raises(MessageTooLarge) as caught:
            await remote.submit("greet", {"name": "A" + "x" * (2 << 20)})
        said = str(caught.value)
        assert "the engine at" in said and "engine.serve(..., max_message=" in said and "not sent" in said
        assert caught.value.sent is False  # type: ignore[attr-defined]
        assert caught.value.limit == 1 << 20
        assert remote.connected and await remote.ping() >= 0
    assert await runs_of(served, "greet") == 0


async def test_connect_failures_name_the_address_and_what_to_check(serve: ServeFn, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.sock")
    with pytest.raises(EngineUnreachable) as no_socket:
        await RemoteEngine(missing, timeout=5).connect()
    assert missing in str(no_socket.value) and "no socket file" in str(no_socket.value)
    assert isinstance(no_socket.value.__cause__, FileNotFoundError)

    # a port bound but not listening refuses every connection
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(EngineUnreachable) as refused:
            await RemoteEngine(f"tcp://127.0.0.1:{port}", token="x" * 32, timeout=5).connect()
    assert f"port {port}" in str(refused.value) and "Connection refused" in str(refused.value)
    assert isinstance(refused.value.__cause__, ConnectionRefusedError)

    served = await serve(str(tmp_path / "e.sock"), interval=0)
    with frozen(served):
        with pytest.raises(EngineUnreachable) as paused:
            await RemoteEngine(served.address, timeout=0.5).connect()
    assert served.address in str(paused.value) and "no welcome" in str(paused.value)
    assert isinstance(paused.value.__cause__, TimeoutError)

    for caught in (no_socket, refused, paused):
        assert isinstance(caught.value, TaskwatchError) and isinstance(caught.value, ConnectionError)
        assert "engine.serve(" in str(caught.value) and "--serve" in str(caught.value)
    # and the engine is fine for the next attempt
    async with served.remote() as remote:
        assert await remote.ping() >= 0


# ---------------------------------------------------------------- 7: a Unix socket's full backlog


def fill_backlog(path: str, fillers: list[socket.socket]) -> None:
    """Connect plain sockets that say nothing to ``path`` (into ``fillers``) until its accept
    backlog is full: the next connect would fail with EAGAIN."""
    for _ in range(10_000):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return
        fillers.append(sock)
    raise AssertionError(f"{path}'s backlog never filled up")


async def test_connect_waits_out_a_full_unix_backlog_and_gets_in_once_the_engine_accepts(
    serve: ServeFn, tmp_path: Path
) -> None:
    """The engine's loop stalls while clients pile up: the next connect used to fail at once with
    "Connection lost" (asyncio took the EAGAIN for a connection in progress). It keeps trying."""
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    remote = RemoteEngine(served.address, timeout=TIMEOUT)
    fillers: list[socket.socket] = []
    try:
        with frozen(served):
            fill_backlog(served.address, fillers)
            connecting = asyncio.create_task(remote.connect())
            done, _ = await asyncio.wait({connecting}, timeout=0.5)
            assert not done, connecting.exception()  # still trying, not failed
        snapshot = await connecting
        assert snapshot.node_id == remote.node_id and await remote.ping() >= 0
    finally:
        for sock in fillers:
            sock.close()
        await remote.close()


async def test_a_unix_backlog_full_until_the_timeout_is_named_with_what_to_do(tmp_path: Path) -> None:
    path = str(tmp_path / "busy.sock")
    fillers: list[socket.socket] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(1)  # and never accepts
        try:
            fill_backlog(path, fillers)
            with pytest.raises(EngineUnreachable) as caught:
                await RemoteEngine(path, timeout=0.3).connect()
        finally:
            for sock in fillers:
                sock.close()
    said = str(caught.value)
    assert path in said and "accepts no more connections now" in said and "backlog" in said
    assert "stayed full for 0.3 s" in said and "longer timeout" in said
    assert isinstance(caught.value.__cause__, TimeoutError)


# ---------------------------------------------------------------- 8: options checked when given


def test_remote_engine_options_out_of_range_are_refused_when_given(tmp_path: Path) -> None:
    address = str(tmp_path / "e.sock")
    bad: list[dict[str, Any]] = [
        {"timeout": 0},
        {"timeout": -1},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"timeout": True},
        {"timeout": "5"},
        {"max_message": True},
        {"max_message": 10},
        {"max_message": 1.5e6},
        {"buffer": 0},
        {"buffer": True},
        {"allow_remote": 1},
    ]
    for options in bad:
        [name] = options
        with pytest.raises(InvalidConfiguration, match=f"RemoteEngine: {name}=") as caught:
            RemoteEngine(address, **options)
        assert caught.value.where == "RemoteEngine", options
    said = []
    for token in (b"t" * 32, 12345, "\udcff" * 20):
        with pytest.raises(InvalidConfiguration, match="RemoteEngine: token") as refused:
            RemoteEngine(address, token=token)  # type: ignore[arg-type]
        said.append(str(refused.value))
        # a secret, even a mistyped one, is never quoted
        assert "ttttt" not in said[-1] and "12345" not in said[-1]
    assert "decode it" in said[0] and "not int" in said[1] and "UTF-8" in said[2]
    RemoteEngine(address, token="é" * 8, timeout=0.1, max_message=32 * 1024, buffer=1)  # the least allowed


async def test_a_remote_command_timing_out_is_a_timeout_error_saying_it_was_sent(
    serve: ServeFn, tmp_path: Path
) -> None:
    served = await serve(str(tmp_path / "e.sock"), interval=0)
    async with RemoteEngine(served.address, timeout=0.5) as remote:
        caught: TimeoutError | None = None
        with frozen(served):
            try:
                await remote.ping()
            except TimeoutError as exc:  # as code written for the builtin one catches it
                caught = exc
        assert isinstance(caught, CommandTimeout) and isinstance(caught, TaskwatchError)
        assert caught.sent is True
        assert "'ping' was sent" in str(caught)
