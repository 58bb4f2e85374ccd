"""The control endpoint over real sockets: handshake, snapshot + events, commands, abuse."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from taskwatch.engine import (
    AuthenticationFailed,
    ConnectionClosed,
    ControlServer,
    Engine,
    InvalidAddress,
    InvalidConfiguration,
    InvalidParams,
    ProtocolError,
    RemoteEngine,
    RemoteError,
    RunNotCancellable,
    RunNotFound,
    RunStatus,
    UnknownPeriodic,
    UnknownTask,
)
from taskwatch.engine.remote import error_from_reply
from taskwatch.engine.wire import (
    PROTOCOL_VERSION,
    ErrorReply,
    WireMessage,
    decode_client_message,
    decode_server_message,
    read_line,
)

from .helpers import eventually, stray_tasks
from .raw_client import RawClient, serve


class AddParams(BaseModel):
    a: int
    b: int


class ChattyParams(BaseModel):
    events: int


def build_engine() -> Engine:
    engine = Engine(health_interval=None, max_concurrency=16, cancel_grace=1.0)

    @engine.task
    async def add(ctx: Any, p: AddParams) -> int:
        return p.a + p.b

    @engine.task
    async def sleepy(ctx: Any) -> None:
        await asyncio.Event().wait()

    @engine.task
    async def chatty(ctx: Any, p: ChattyParams) -> int:
        for i in range(p.events):
            await ctx.progress(i + 1, p.events, "x" * 200)
            if i % 100 == 0:
                await asyncio.sleep(0)
        return p.events

    @engine.periodic(every=3600, initial_delay=3600)
    async def nightly(ctx: Any) -> None:
        pass

    return engine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = build_engine()
    async with engine:
        yield engine
    # engine.stop() stopped every server: nothing of theirs may outlive it
    assert stray_tasks() == set()


# ---------------------------------------------------------------- sockets and addresses


async def test_unix_socket_is_private_and_removed_on_stop(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path)
    mode = os.stat(sock_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600
    assert server.address == sock_path
    await server.stop()
    assert not os.path.exists(sock_path)


async def test_default_address_is_in_a_private_runtime_dir(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    server = await serve(engine, None)  # type: ignore[arg-type]
    path = Path(server.address)
    assert path.parent == tmp_path / "taskwatch"
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    async with RemoteEngine(server.address) as remote:
        assert (await remote.ping()) >= 0


async def test_tcp_needs_a_token_and_loopback(engine: Engine) -> None:
    with pytest.raises(InvalidAddress, match="non-loopback"):
        ControlServer(engine, "tcp://0.0.0.0:0")
    ControlServer(engine, "tcp://0.0.0.0:0", allow_remote=True)  # allowed when asked for
    server = await serve(engine, "tcp://127.0.0.1:0")
    assert server.token and len(server.token) >= 32
    assert not server.address.endswith(":0")  # the real port, not the requested 0
    async with RemoteEngine(server.address, token=server.token) as remote:
        assert remote.node_id == engine.node_id


async def test_a_socket_path_in_a_folder_that_cannot_hold_it_is_refused_with_the_path(
    engine: Engine, tmp_path: Path
) -> None:
    missing = tmp_path / "no-such-dir" / "e.sock"
    with pytest.raises(InvalidAddress) as caught:
        await serve(engine, str(missing))
    said = str(caught.value)
    assert str(missing) in said and f"the folder {missing.parent} does not exist" in said
    assert "mkdir -p" in said and "pass no address" in said
    (tmp_path / "a-file").write_text("")
    with pytest.raises(InvalidAddress, match="is not a folder"):
        await serve(engine, str(tmp_path / "a-file" / "e.sock"))


async def test_a_token_that_is_not_text_is_refused_before_serving(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "e.sock"
    for token, why in ((12345678901234567890, "not int"), (b"x" * 32, "decode it"), ("\udcff" * 20, "UTF-8")):
        for address in (str(path), "tcp://127.0.0.1:0"):
            with pytest.raises(InvalidConfiguration, match=f"ControlServer: token: .*{why}") as caught:
                await serve(engine, address, token=token)
            assert "xxxxx" not in str(caught.value) and "1234567" not in str(caught.value)
    assert not path.exists()  # nothing was served


async def test_stale_socket_file_is_replaced(engine: Engine, sock_path: str) -> None:
    first = await serve(engine, sock_path)
    with pytest.raises(OSError, match="already listening"):
        await serve(engine, sock_path)
    await first.stop()
    Path(sock_path).write_text("not a socket")
    with pytest.raises(FileExistsError):
        await serve(engine, sock_path)


# ---------------------------------------------------------------- authentication


async def test_bad_token_is_refused_disconnected_and_counted(engine: Engine) -> None:
    server = await serve(engine, "tcp://127.0.0.1:0")
    with pytest.raises(AuthenticationFailed):
        await RemoteEngine(server.address, token="wrong").connect()
    with pytest.raises(AuthenticationFailed):
        await RemoteEngine(server.address).connect()

    raw = await RawClient.open(server.address)
    await raw.send({"type": "hello", "version": PROTOCOL_VERSION, "token": "nope\u00e9"})
    reply = await raw.recv()
    assert reply["type"] == "error"
    assert reply["error_type"] == "AuthenticationFailed"
    assert await raw.at_eof()
    await raw.close()

    assert server.stats()["auth_failures"] == 3
    await eventually(lambda: server.stats()["active"] == 0)
    async with RemoteEngine(server.address, token=server.token) as remote:
        assert (await remote.submit("add", {"a": 1, "b": 2})).task == "add"


async def test_first_message_must_be_hello(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path, hello_timeout=0.2)
    raw = await RawClient.open(sock_path)
    await raw.send({"type": "ping", "id": 1})
    reply = await raw.recv()
    assert (reply["type"], reply["error_type"]) == ("error", "UnknownCommand")
    assert await raw.at_eof()
    await raw.close()

    silent = await RawClient.open(sock_path)  # says nothing: dropped after hello_timeout
    assert (await silent.recv())["type"] == "error"
    assert await silent.at_eof()
    await silent.close()
    assert server.stats()["unknown"] == 1


# ---------------------------------------------------------------- snapshot and events


async def test_snapshot_then_live_events(engine: Engine, sock_path: str) -> None:
    earlier = await (await engine.submit("add", {"a": 1, "b": 1})).wait(5)
    await serve(engine, sock_path)
    remote = RemoteEngine(sock_path)
    snapshot = await remote.connect()
    assert snapshot.node_id == engine.node_id
    assert earlier.id in {run.id for run in snapshot.runs}
    assert [t.name for t in snapshot.tasks if t.name == "add"] == ["add"]

    handle = await engine.submit("add", {"a": 2, "b": 3})  # in-process
    seen: list[Any] = []

    async def collect() -> None:
        async for event in remote.events():
            if getattr(event, "run_id", None) == handle.id:
                seen.append(event)
                if event.kind == "run.succeeded":
                    return

    await asyncio.wait_for(collect(), 5)
    assert [e.kind for e in seen] == ["run.submitted", "run.started", "run.succeeded"]
    assert seen[-1].result == 5
    assert all(e.seq > snapshot.last_seq for e in seen)
    await remote.close()
    assert remote.disconnected.is_set()


async def test_local_overflow_is_reported_and_snapshot_resyncs(engine: Engine, sock_path: str) -> None:
    await serve(engine, sock_path)
    remote = RemoteEngine(sock_path, buffer=10)
    await remote.connect()
    await (await engine.submit("chatty", {"events": 300})).wait(5)
    await eventually(lambda: remote.dropped > 0)
    batch = remote.get_batch()
    # the ten events that fit, then the notice of what was lost after them
    assert all(e.kind != "bus.dropped" for e in batch[:10])
    notice = batch[10]
    assert notice.kind == "bus.dropped" and notice.count == remote.dropped
    assert notice.seq == batch[9].seq + 1
    fresh = await remote.snapshot()
    assert fresh.stats.succeeded_total == 1
    # everything still buffered is newer than the snapshot, and the loss is forgiven
    assert all(e.seq > fresh.last_seq for e in remote.get_batch())
    await remote.close()


# ---------------------------------------------------------------- commands


async def test_commands_with_typed_errors(engine: Engine) -> None:
    server = await serve(engine, "tcp://127.0.0.1:0")
    async with RemoteEngine(server.address, token=server.token) as remote:
        record = await remote.submit("add", {"a": 20, "b": 22})
        assert record.task == "add" and record.params == {"a": 20, "b": 22}
        assert (await _finished(engine, record.id)).result == 42

        with pytest.raises(InvalidParams) as bad:
            await remote.submit("add", {"a": "one"})
        assert bad.value.task == "add"
        assert {tuple(e["loc"]) for e in bad.value.errors} == {("a",), ("b",)}
        with pytest.raises(UnknownTask) as unknown:
            await remote.submit("nope")
        assert "add" in unknown.value.known

        sleeper = await remote.submit("sleepy")
        await eventually(lambda: engine.get(sleeper.id).status is RunStatus.RUNNING)
        cancelled = await remote.cancel(sleeper.id)
        assert cancelled.status is RunStatus.CANCELLED
        with pytest.raises(RunNotCancellable):
            await remote.cancel(sleeper.id)
        with pytest.raises(RunNotFound) as missing:
            await remote.cancel("no-such-run")
        assert missing.value.run_id == "no-such-run"

        again = await remote.retry(sleeper.id)
        assert again.source == f"retry:{sleeper.id}" and again.id != sleeper.id
        await remote.cancel(again.id)

        paused = await remote.pause_periodic("nightly")
        assert paused.paused
        assert engine.schedule()[0].paused
        assert not (await remote.resume_periodic("nightly")).paused
        with pytest.raises(UnknownPeriodic):
            await remote.pause_periodic("weekly")
        assert server.stats()["commands"] == 12
        assert server.stats()["errors"] == 5


async def test_a_cancel_waits_for_the_run_as_long_as_the_client_says(sock_path: str) -> None:
    # the engine's own cancel_grace can be longer than a client waits for a reply: the client
    # says how long it waits (a dashboard, 2 s), validated as Engine.cancel validates it
    engine = Engine(health_interval=None, cancel_grace=120.0)
    entered = asyncio.Event()
    cancelling = asyncio.Event()
    cleaned_up = asyncio.Event()

    @engine.task
    async def slow_cleanup(ctx: Any) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelling.set()
            await cleaned_up.wait()  # its cleanup lasts until the test ends it
            raise

    async with engine:
        server = await serve(engine, sock_path)
        raw = await RawClient.authenticated(sock_path)
        run = await engine.submit("slow_cleanup")
        await asyncio.wait_for(entered.wait(), 10)
        cancel = b'{"type":"cancel","id":%d,"run_id":"%s","grace":%s}\n'
        for i, grace in enumerate([b"-1", b'"2"', b"true", b"NaN", b"Infinity", b"1e999"]):
            await raw.send(cancel % (i, run.id.encode(), grace))
            reply = await raw.reply()
            assert (reply["type"], reply["id"], reply["error_type"]) == ("error", i, "MalformedMessage"), reply
            assert "grace" in reply["message"]
        assert not cancelling.is_set()  # refused before anything was cancelled
        await raw.send(cancel % (10, run.id.encode(), b"0.1"))
        reply = await raw.reply()
        assert (reply["type"], reply["id"], reply["result"]["status"]) == ("ok", 10, "running")
        assert cancelling.is_set()
        cleaned_up.set()
        assert (await run.wait(10)).status is RunStatus.CANCELLED
        assert server.stats()["malformed"] == 6
        await raw.close()


async def _finished(engine: Engine, run_id: str) -> Any:
    await eventually(lambda: engine.get(run_id).status.finished)
    return engine.get(run_id)


def test_unknown_error_types_become_remote_errors() -> None:
    exc = error_from_reply(
        ErrorReply(id=1, error_type="KeyboardInterrupt", message="m", details={"x": 1})
    )
    assert isinstance(exc, RemoteError)
    assert exc.error_type == "KeyboardInterrupt" and exc.details == {"x": 1}
    # a detail may not replace a method of the rebuilt class
    nf = error_from_reply(
        ErrorReply(id=1, error_type="RunNotFound", message="gone", details={"run_id": "r", "with_traceback": 1})
    )
    assert isinstance(nf, RunNotFound) and nf.run_id == "r" and str(nf) == "gone"
    assert callable(nf.with_traceback)


# ---------------------------------------------------------------- bad input


async def test_malformed_lines_get_errors_and_the_connection_keeps_working(
    engine: Engine, sock_path: str
) -> None:
    server = await serve(engine, sock_path)
    raw = await RawClient.authenticated(sock_path)
    await raw.send(b"{not json\n")
    reply = await raw.reply()
    assert (reply["type"], reply["error_type"], reply["id"]) == ("error", "MalformedMessage", None)
    await raw.send({"type": "cancel", "id": 7})  # run_id missing
    reply = await raw.reply()
    assert (reply["error_type"], reply["id"]) == ("MalformedMessage", 7)
    assert "run_id" in reply["message"]
    await raw.send({"type": "ping", "id": 8})
    assert await raw.reply() == {"type": "ok", "id": 8, "result": None}
    assert server.stats()["malformed"] == 2
    await raw.close()


async def test_unknown_command_gets_an_error(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path)
    raw = await RawClient.authenticated(sock_path)
    await raw.send({"type": "frobnicate", "id": 3})
    reply = await raw.reply()
    assert (reply["error_type"], reply["id"]) == ("UnknownCommand", 3)
    assert "frobnicate" in reply["message"]
    await raw.send({"type": "hello", "version": PROTOCOL_VERSION})  # not twice
    assert (await raw.reply())["error_type"] == "UnknownCommand"
    await raw.send({"type": "ping", "id": 4})
    assert (await raw.reply())["id"] == 4
    assert server.stats()["unknown"] == 2
    await raw.close()


async def test_oversized_line_is_discarded_and_counted(engine: Engine, sock_path: str) -> None:
    # documented behaviour: the line is dropped up to its newline; the connection stays open
    server = await serve(engine, sock_path, max_message=1024)
    raw = await RawClient.authenticated(sock_path)
    big = b'{"type":"ping","id":1,"pad":"' + b"x" * 300_000 + b'"}\n'
    for start in range(0, len(big), 65_536):  # arrives over many reads
        await raw.send(big[start:start + 65_536])
    await raw.send({"type": "ping", "id": 2})
    reply = await raw.reply()
    assert (reply["error_type"], reply["details"]["limit"]) == ("MessageTooLarge", 1024)
    assert reply["details"]["size"] == len(big) - 1
    assert reply["id"] == 1  # read from the line's first bytes: its sender knows which was refused
    assert await raw.reply() == {"type": "ok", "id": 2, "result": None}
    assert server.stats()["oversized"] == 1
    await raw.close()
    # and the engine did not notice
    assert (await (await engine.submit("add", {"a": 1, "b": 1})).wait(5)).result == 2


async def test_a_hello_of_another_version_is_counted_and_blank_lines_before_a_hello_are_harmless(
    engine: Engine, sock_path: str
) -> None:
    server = await serve(engine, sock_path)
    raw = await RawClient.open(sock_path)
    await raw.send({"type": "hello", "version": PROTOCOL_VERSION + 1})
    assert (await raw.recv())["error_type"] == "IncompatibleVersion"
    await raw.close()
    assert server.stats()["incompatible"] == 1  # counted, as every other refused hello is
    # an Enter typed into nc before the hello, as after it: no MalformedMessage, no closed connection
    raw = await RawClient.open(sock_path)
    await raw.send(b"\r\n\n")
    await raw.send({"type": "hello", "version": PROTOCOL_VERSION})
    assert (await raw.recv())["type"] == "welcome"
    assert server.stats()["malformed"] == 0
    await raw.close()


async def test_an_id_that_is_no_int_or_text_and_a_lone_surrogate_are_refused_in_plain_words(
    engine: Engine, sock_path: str
) -> None:
    await serve(engine, sock_path)
    raw = await RawClient.authenticated(sock_path)
    # taken for 1, it was echoed as an id its client never sent, which never saw its reply
    await raw.send(b'{"type":"ping","id":true}\n')
    reply = await raw.reply()
    assert (reply["type"], reply["error_type"], reply["id"]) == ("error", "MalformedMessage", None)
    # what json.dumps writes for a file name os.fsdecode read: the JSON reader's own words
    # ("unexpected end of hex escape") said nothing of it
    await raw.send(b'{"type":"submit","id":5,"task":"add","params":{"name":"\\ud800"}}\n')
    reply = await raw.reply()
    assert (reply["error_type"], reply["id"]) == ("MalformedMessage", 5)
    assert "surrogate" in reply["message"] and "hex escape" not in reply["message"], reply["message"]
    await raw.send({"type": "ping", "id": 6})
    assert await raw.reply() == {"type": "ok", "id": 6, "result": None}
    await raw.close()


def ended_stream(data: bytes) -> asyncio.StreamReader:
    """A stream that held ``data`` and then ended, as a connection closed after sending it."""
    reader = asyncio.StreamReader(limit=16)  # a line over the limit is gathered in pieces too
    reader.feed_data(data)
    reader.feed_eof()
    return reader


async def test_a_stream_ending_mid_line_is_a_closed_connection_not_a_message() -> None:
    # a client cut off, or a peer gone, in the middle of a line: what came of it is no message
    # (taken for one, it failed to decode, and the client said the engine sent a malformed one)
    cut = b'{"type":"ok","id":1,"result":null}\n{"type":"event","event":{"kind":"run.prog'
    reader = ended_stream(cut)
    assert await read_line(reader, 1 << 20) == b'{"type":"ok","id":1,"result":null}'
    with pytest.raises(ConnectionClosed, match="in the middle of a message: 41 bytes"):
        await read_line(reader, 1 << 20)
    # a stream that ends between lines ends cleanly
    reader = ended_stream(b'{"type":"ok","id":1,"result":null}\n')
    assert await read_line(reader, 1 << 20) is not None
    assert await read_line(reader, 1 << 20) is None
    # the server's reading of a client that sends its last command without a newline, then the
    # end of what it sends (printf '...' | nc -N): that line is still answered
    reader = ended_stream(b'{"type":"ping","id":2}')
    assert await read_line(reader, 1 << 20, unterminated=True) == b'{"type":"ping","id":2}'
    assert await read_line(reader, 1 << 20, unterminated=True) is None


async def test_remote_engine_refuses_to_send_oversized_commands(engine: Engine, sock_path: str) -> None:
    await serve(engine, sock_path, max_message=256)
    async with RemoteEngine(sock_path) as remote:
        with pytest.raises(ProtocolError):
            await remote.submit("add", {"a": 1, "b": 2, "pad": "x" * 1000})
        assert remote.connected


# ---------------------------------------------------------------- misbehaving and many clients


async def test_abrupt_and_stalled_clients_never_block_the_engine(engine: Engine, sock_path: str) -> None:
    baseline = engine.bus.subscribers
    # the buffer lets megabytes through, more than the socket holds: the writer stalls
    server = await serve(engine, sock_path, buffer=5000, outgoing=8, write_timeout=0.5)
    stalled = await RawClient.authenticated(sock_path)
    stalled.writer.transport.pause_reading()  # never reads again: the socket fills up
    quitters = [await RawClient.authenticated(sock_path) for _ in range(5)]
    handles = [await engine.submit("chatty", {"events": 4000}) for _ in range(5)]
    for quitter in quitters:
        await quitter.recv()  # mid-stream...
        quitter.writer.transport.abort()  # ...gone without a goodbye
    results = [await h.wait(10) for h in handles]
    assert [r.status for r in results] == [RunStatus.SUCCEEDED] * 5
    await eventually(lambda: server.stats()["slow_disconnects"] == 1)
    await eventually(lambda: server.stats()["active"] == 0)
    assert server.stats()["events_dropped"] > 0
    assert engine.bus.subscribers == baseline  # every connection unsubscribed
    await stalled.close()


async def test_hundreds_of_reconnects_lose_no_run(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path)
    submitted: list[str] = []

    async def producer() -> None:
        for i in range(200):
            submitted.append((await engine.submit("add", {"a": i, "b": 0})).id)
            await asyncio.sleep(0)

    async def churn() -> None:
        for i in range(300):
            if i % 2:  # drop the socket without a clean close
                raw = await RawClient.authenticated(sock_path)
                raw.writer.transport.abort()
                continue
            async with RemoteEngine(sock_path) as remote:
                if i % 10 == 0:
                    submitted.append((await remote.submit("add", {"a": i, "b": 1})).id)

    await asyncio.wait_for(asyncio.gather(producer(), churn()), 20)
    assert len(submitted) == 230
    await eventually(lambda: all(engine.get(r).status is RunStatus.SUCCEEDED for r in submitted), timeout=10)
    assert engine.state == "running"
    assert server.stats()["connections"] == 300
    await eventually(lambda: server.stats()["active"] == 0)


async def test_stop_closes_clients_and_leaves_nothing(sock_path: str) -> None:
    engine = build_engine()
    await engine.start()
    await serve(engine, sock_path)
    remotes = [RemoteEngine(sock_path) for _ in range(3)]
    for remote in remotes:
        await remote.connect()
    await engine.stop()
    for remote in remotes:
        await asyncio.wait_for(remote.disconnected.wait(), 5)
        assert not remote.connected
        await remote.close()
    assert not os.path.exists(sock_path)
    assert stray_tasks() == set()


# ---------------------------------------------------------------- decoders never crash


def _json_values() -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20)
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


_TYPES = st.sampled_from(
    ["hello", "submit", "cancel", "retry", "pause", "resume", "snapshot", "ping",
     "welcome", "event", "ok", "error", "bogus"]
)


def _check_decoders(line: bytes) -> None:
    for decode in (decode_client_message, decode_server_message):
        for limit in (4096, 16):
            try:
                message = decode(line, limit)
            except ProtocolError as exc:
                assert getattr(exc, "reason", None) in {"malformed", "oversized", "unknown"}
            else:
                assert isinstance(message, WireMessage)
                assert len(line.rstrip(b"\r\n")) <= limit


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_decoders_on_random_bytes(line: bytes) -> None:
    _check_decoders(line)


@settings(max_examples=300, deadline=None)
@given(_TYPES, st.dictionaries(st.sampled_from(["id", "version", "token", "task", "params", "key", "run_id", "name", "event", "snapshot", "result", "error_type", "message", "details"]), _json_values(), max_size=6))
def test_decoders_on_random_json_objects(kind: str, fields: dict[str, Any]) -> None:
    _check_decoders(json.dumps({"type": kind, **fields}).encode())


async def test_clients_see_the_engine_stop_before_the_connection_closes(sock_path: str) -> None:
    engine = build_engine()
    await engine.start()
    await serve(engine, sock_path)
    remote = RemoteEngine(sock_path)
    await remote.connect()
    kinds: list[str] = []

    async def collect() -> None:
        async for event in remote.events():
            kinds.append(event.kind)

    reading = asyncio.ensure_future(collect())
    await engine.stop()
    await asyncio.wait_for(reading, 5)
    assert kinds[-1] == "engine.stopped" and "engine.stopping" in kinds
    await remote.close()
    assert stray_tasks() == set()


async def test_connections_beyond_the_limit_are_told_and_counted(engine: Engine, sock_path: str) -> None:
    from taskwatch.engine import TooManyConnections

    server = await serve(engine, sock_path, max_connections=2)
    first, second = RemoteEngine(sock_path), RemoteEngine(sock_path)
    await first.connect()
    await second.connect()
    with pytest.raises(TooManyConnections, match="max_connections"):
        await RemoteEngine(sock_path).connect()
    assert server.stats()["refused"] == 1
    await first.close()
    await eventually(lambda: server.stats()["active"] == 1)
    third = RemoteEngine(sock_path)
    await third.connect()  # room again
    for remote in (second, third):
        await remote.close()


async def test_serving_never_prints_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    # a service's standard output is its log: a token printed there, given (from a secret
    # store, the environment) or made here, would be read by whoever reads the logs
    engine = Engine(health_interval=None)
    given = "a-token-from-the-secret-store-0042"
    async with engine:
        server = await engine.serve("tcp://127.0.0.1:0", token=given)
        info = server.info()
        # what a notebook cell ending in bg.serve() shows, and its saved file keeps
        assert info.token == given and given not in repr(info) and given not in str(info)
        await server.stop()
        made = await engine.serve("tcp://127.0.0.1:0")
        await made.stop()
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 2 and all("serving at tcp://127.0.0.1:" in line for line in printed), printed
    assert given not in printed[0] and "token" not in printed[0]
    assert made.token is not None and made.token not in printed[1]
    assert printed[1].endswith("(with a token made here: the returned server's .token)")
