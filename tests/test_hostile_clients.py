"""Hostile clients against a real control endpoint: idle and over-long handshakes,
clients that ask for more than they read, runs too large for a line, weak tokens.

Every test serves a real engine on a real socket and talks to it with
:class:`RemoteEngine` or with a hand-rolled client that sends what
RemoteEngine never would.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import random
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel
from taskwatch.engine import (
    ControlServer,
    Engine,
    MessageTooLarge,
    RemoteEngine,
    RunNotFound,
    RunStatus,
    Snapshot,
    TaskwatchError,
    TooManyConnections,
)
from taskwatch.engine.errors import ReplyTooLarge, WeakToken
from taskwatch.engine.snapshot import is_truncated
from taskwatch.engine.wire import PROTOCOL_VERSION

from .helpers import eventually, stray_tasks
from .raw_client import RawClient, serve

KIB = 1 << 10
MIB = 1 << 20

#: the repository, where ``python -m tests.raw_client`` runs
REPO = Path(__file__).resolve().parent.parent


class DataParams(BaseModel):
    data: str


class ChattyParams(BaseModel):
    events: int


def build_engine() -> Engine:
    engine = Engine(health_interval=None, max_concurrency=16, cancel_grace=1.0)

    @engine.task
    async def echo(ctx: Any, p: DataParams) -> str:
        return p.data

    @engine.task
    async def boom(ctx: Any, p: DataParams) -> None:
        raise ValueError(p.data)

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

    @engine.task
    async def ticker(ctx: Any) -> None:
        # one event at a time, a few milliseconds apart: a dashboard's usual stream
        pace = random.Random(7)
        for i in itertools.count():
            await ctx.progress(i, None, "tick")
            await asyncio.sleep(pace.random() * 0.004)

    return engine


@pytest.fixture
async def engine() -> AsyncIterator[Engine]:
    engine = build_engine()
    async with engine:
        yield engine
    # engine.stop() stopped every server: no connection task may outlive it
    assert stray_tasks() == set()


async def finished(engine: Engine, task: str, data: str) -> str:
    handle = await engine.submit(task, {"data": data})
    await eventually(lambda: engine.get(handle.id).status.finished)
    return handle.id


# ---------------------------------------------------------------- 7: handshakes


@pytest.mark.parametrize("said", [b"", b"\n", b" \r\n\n"], ids=["nothing", "a blank line", "blank lines"])
async def test_idle_sockets_before_hello_do_not_lock_out_real_clients(engine: Engine, sock_path: str, said: bytes) -> None:
    # the reported attack: more idle token-less sockets than max_connections (on a Unix
    # socket: over TCP the kernel does not even hand the server a socket that says nothing).
    # Blank lines are no hello: a socket that sent a newline was kept as one whose hello had
    # come, never closed to make room, and 64 of them kept real clients out
    server = await serve(engine, sock_path, max_connections=2, max_handshakes=16, hello_timeout=30)
    idle = []
    for _ in range(40):
        idle.append(raw := await RawClient.open(server.address))
        raw.writer.write(said)  # (the bytes go out as it connects: it may be closed by the next ones)
    await eventually(lambda: server.stats()["connections"] == 40)
    stats = server.stats()
    # they wait in the handshake pool (16 here), the oldest closed to make room
    assert (stats["handshaking"], stats["handshakes_evicted"], stats["active"]) == (16, 24, 0)

    first = RemoteEngine(server.address, token=server.token, timeout=5)
    snapshot = await first.connect()
    assert snapshot.node_id == engine.node_id
    second = RemoteEngine(server.address, token=server.token, timeout=5)
    await second.connect()
    assert server.stats()["active"] == 2
    # the authenticated pool is max_connections, counted only after a valid hello
    with pytest.raises(TooManyConnections):
        await RemoteEngine(server.address, token=server.token, timeout=5).connect()
    assert server.stats()["refused"] == 1

    # an evicted socket was told why before it was closed
    told = await idle[0].recv()
    assert (told["type"], told["error_type"]) == ("error", "TooManyHandshakes")
    assert await idle[0].closed_by_server()
    for raw in idle:
        await raw.close()
    await first.close()
    await second.close()


async def test_a_pool_of_sockets_reopened_as_they_drop_still_lets_real_clients_in(engine: Engine, sock_path: str) -> None:
    server = await serve(engine, sock_path, max_connections=2, max_handshakes=16, hello_timeout=30)
    opened: list[RawClient] = []

    async def hog_a_slot() -> None:
        # one attacker socket: idle until the server closes it, then opened again
        while True:
            raw = await RawClient.open(server.address)
            opened.append(raw)
            await raw.closed_by_server(timeout=60)

    hogs = [asyncio.ensure_future(hog_a_slot()) for _ in range(16)]
    try:
        await eventually(lambda: server.stats()["handshaking"] == 16)
        for _ in range(3):
            async with RemoteEngine(server.address, token=server.token, timeout=5) as remote:
                assert (await remote.ping()) >= 0
        assert server.stats()["handshakes_evicted"] >= 3
    finally:
        for hog in hogs:
            hog.cancel()
        await asyncio.gather(*hogs, return_exceptions=True)
        for raw in opened:
            await raw.close()


async def test_a_connect_flood_that_never_speaks_keeps_no_real_client_out(engine: Engine) -> None:
    # a local user without the token: another process connecting as fast as it can,
    # holding 200 sockets that never send a byte (over TCP: a Unix socket admits its owner only)
    server = await serve(engine, "tcp://127.0.0.1:0")
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.raw_client", "flood", server.address,
        stdout=asyncio.subprocess.PIPE, cwd=REPO,
    )
    try:
        assert attacker.stdout is not None
        assert await asyncio.wait_for(attacker.stdout.readline(), 30) == b"ready\n"
        failures: list[str] = []
        for _ in range(10):
            remote = RemoteEngine(server.address, token=server.token, timeout=5)
            try:
                await remote.connect()
                await remote.ping()
            except (TimeoutError, OSError, TaskwatchError) as exc:
                failures.append(type(exc).__name__)
            finally:
                await remote.close()
        assert failures == []
        # and the engine goes on with its work meanwhile
        assert (await (await engine.submit("echo", {"data": "during"})).wait(10)).result == "during"
        assert attacker.returncode is None  # the flood was on all along
    finally:
        attacker.kill()
        await attacker.wait()
    await eventually(lambda: server.stats()["handshaking"] == 0, timeout=10)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_forty_dashboards_reconnecting_at_once_all_attach(
    engine: Engine, sock_path: str, transport: str
) -> None:
    # what follows an engine restart: every dashboard comes back at the same moment,
    # each saying hello at once; more of them than the old handshake pool held
    server = await serve(engine, "tcp://127.0.0.1:0" if transport == "tcp" else sock_path)
    remotes = [RemoteEngine(server.address, token=server.token, timeout=10) for _ in range(40)]
    try:
        results = await asyncio.gather(*(remote.connect() for remote in remotes), return_exceptions=True)
        assert [type(r).__name__ for r in results if isinstance(r, BaseException)] == []
        assert (server.stats()["active"], server.stats()["handshakes_evicted"]) == (40, 0)
    finally:
        for remote in remotes:
            await remote.close()


async def test_an_endless_hello_line_is_refused_at_the_hello_limit(engine: Engine, sock_path: str) -> None:
    assert ControlServer(engine, sock_path).hello_timeout <= 5  # a short deadline by default
    server = await serve(engine, sock_path, hello_timeout=30)  # so only the line limit can refuse it
    raw = await RawClient.open(sock_path)
    started = time.monotonic()
    raw.writer.write(b'{"type":"hello","version":1,"token":"' + b"x" * (64 * KIB))  # and never a newline
    await raw.writer.drain()
    reply = await raw.recv(timeout=3)
    assert (reply["type"], reply["error_type"]) == ("error", "MessageTooLarge")
    assert reply["details"]["limit"] == 4096 and "raise max_hello" in reply["message"]
    assert await raw.closed_by_server(timeout=3)
    assert time.monotonic() - started < 3
    assert server.stats()["oversized"] == 1
    await eventually(lambda: server.stats()["handshaking"] == 0)
    await raw.close()

    # a hello and a first command in one write still both count (nothing read ahead is lost)
    raw = await RawClient.open(sock_path)
    hello = {"type": "hello", "version": PROTOCOL_VERSION}
    await raw.send(json.dumps(hello).encode() + b'\n{"type":"ping","id":1}\n')
    assert [(await raw.recv())["type"] for _ in range(3)] == ["welcome", "snapshot", "ok"]
    await raw.close()


async def test_blank_lines_before_the_hello_count_towards_its_limit(engine: Engine, sock_path: str) -> None:
    # read from a full buffer, they came without a pause: a client that never said hello, only
    # sent blank lines, held the engine's loop for about a second at a time
    server = await serve(engine, sock_path, hello_timeout=30)  # so only the line limit can refuse it
    raw = await RawClient.open(sock_path)
    await raw.send(b"\n" * (64 * KIB))
    reply = await raw.recv(timeout=3)
    assert (reply["type"], reply["error_type"]) == ("error", "MessageTooLarge")
    assert reply["details"]["limit"] == 4096
    assert "4096 of them blank lines before it" in reply["message"] and "raise max_hello" in reply["message"]
    assert await raw.closed_by_server(timeout=3)
    assert server.stats()["oversized"] == 1
    await raw.close()

    # a few before a hello are harmless (an Enter typed into nc first)
    raw = await RawClient.open(sock_path)
    hello = {"type": "hello", "version": PROTOCOL_VERSION}
    await raw.send(b"\n \r\n\n" + json.dumps(hello).encode() + b"\n")
    assert (await raw.recv())["type"] == "welcome"
    await raw.close()


async def test_a_flood_of_blank_lines_leaves_the_loop_turns_while_it_is_read(engine: Engine, sock_path: str) -> None:
    # a quarter MiB read at once is a quarter million blank lines, each skipped without a pause:
    # the engine's loop was held for as long as that took (a second, loaded), for every client
    await serve(engine, sock_path)
    flood = await RawClient.authenticated(sock_path)
    turns = 0
    reading = True

    async def count_turns() -> None:
        nonlocal turns
        while reading:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    lines = 1 << 20
    await flood.send(b"\n" * lines + b'{"type":"ping","id":1}\n')
    reply = await flood.reply(timeout=30)
    reading = False
    await counter
    assert (reply["type"], reply["id"]) == ("ok", 1)  # and nothing else came back for them
    assert turns >= lines // 1024, turns  # a turn of the loop at least every thousand lines
    await flood.close()


# ---------------------------------------------------------------- 8: outgoing bytes


async def test_a_client_that_asks_for_more_than_it_reads_is_cut_off_at_the_byte_bound(
    engine: Engine, sock_path: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.server")
    for _ in range(20):
        await finished(engine, "echo", "x" * 4000)  # each snapshot is about 170 KB
    server = await serve(engine, sock_path, max_send=512 * KIB, max_outgoing_bytes=1 * MIB, write_timeout=30)
    hog = await RawClient.authenticated(sock_path)
    hog.reading(False)  # reads nothing more: what it asks for piles up
    for i in range(300):
        hog.writer.write(json.dumps({"type": "snapshot", "id": i}).encode() + b"\n")
    await hog.writer.drain()
    await eventually(lambda: server.stats()["overflow_disconnects"] == 1)
    assert server.stats()["slow_disconnects"] == 0  # cut off at the bound, not after write_timeout
    # said once, not again for each of its commands still in flight then
    dropped = [r for r in caplog.records if "replies unread" in r.getMessage()]
    assert len(dropped) == 1, [r.getMessage() for r in dropped]
    hog.reading(True)
    assert await hog.closed_by_server()
    await eventually(lambda: server.stats()["active"] == 0)

    # nobody else noticed
    async with RemoteEngine(sock_path, timeout=5) as other:
        record = await other.submit("echo", {"data": "still here"})
        await eventually(lambda: engine.get(record.id).status is RunStatus.SUCCEEDED)
        assert (await other.snapshot()).stats.succeeded_total == 21
    await hog.close()


async def test_events_a_client_does_not_read_are_dropped_with_a_notice_not_a_disconnect(
    engine: Engine, sock_path: str
) -> None:
    server = await serve(
        engine, sock_path, max_send=512 * KIB, max_outgoing_bytes=1 * MIB, buffer=100, write_timeout=30
    )
    slow = await RawClient.authenticated(sock_path)
    slow.reading(False)
    handle = await engine.submit("chatty", {"events": 5000})  # about 1.5 MB of events
    assert (await handle.wait(10)).status is RunStatus.SUCCEEDED
    await eventually(lambda: server.stats()["events_dropped"] > 0)
    assert server.stats()["overflow_disconnects"] == 0
    slow.reading(True)
    kinds: set[str] = set()
    async with asyncio.timeout(5):
        while "bus.dropped" not in kinds:
            kinds.add((await slow.recv())["event"]["kind"])
    await slow.send({"type": "ping", "id": 1})
    while (msg := await slow.recv())["type"] == "event":
        pass
    assert msg == {"type": "ok", "id": 1, "result": None}
    await slow.close()


async def test_a_client_limit_below_the_engines_lines_says_which_limit_would_do(
    engine: Engine, sock_path: str
) -> None:
    for _ in range(20):
        await finished(engine, "echo", "x" * 4000)  # the first snapshot is about 170 KB
    await serve(engine, sock_path)
    with pytest.raises(MessageTooLarge) as caught:
        await RemoteEngine(sock_path, max_message=64 * KIB, timeout=5).connect()
    said = str(caught.value)
    # the engine keeps to no less than 32 * max_value (16 KiB): 512 KiB, whatever the client asks
    assert "first snapshot" in said and f"max_message of {64 * KIB}" in said
    assert f"pass max_message={512 * KIB} or more" in said
    async with RemoteEngine(sock_path, max_message=512 * KIB, timeout=5) as remote:
        assert len((await remote.snapshot()).runs) == 20


async def attach_raw(address: str) -> tuple[RawClient, int]:
    """A raw client past its welcome, and the ``last_seq`` of its first snapshot."""
    client = await RawClient.open(address)
    await client.send({"type": "hello", "version": PROTOCOL_VERSION})
    assert (await client.recv())["type"] == "welcome"
    snapshot = await client.recv()
    return client, snapshot["snapshot"]["last_seq"]


async def event_stream(client: RawClient, after: int, through: int) -> tuple[list[tuple[int, int]], int]:
    """Read events until ``through`` is accounted for: the seq ranges received or announced
    dropped, in the order they came (each event one range), and how many were dropped."""
    ranges: list[tuple[int, int]] = []
    dropped = 0
    while not ranges or ranges[-1][1] < through:
        msg = await client.recv()
        assert msg["type"] == "event"
        event = msg["event"]
        if event["kind"] == "bus.dropped":
            ranges.append((event["seq"], event["seq"] + event["count"] - 1))
            dropped += event["count"]
        else:
            ranges.append((event["seq"], event["seq"]))
    assert ranges[0][0] == after + 1
    return ranges, dropped


async def test_every_client_gets_each_event_once_in_order_or_a_notice_counting_it(
    engine: Engine, sock_path: str
) -> None:
    server = await serve(engine, sock_path, buffer=200, max_send=512 * KIB, max_outgoing_bytes=1 * MIB, write_timeout=30)
    readers = [await attach_raw(sock_path) for _ in range(4)]
    slow, slow_after = await attach_raw(sock_path)
    slow.reading(False)  # reads nothing while the run goes on: it must lose events, alone
    handle = await engine.submit("chatty", {"events": 5000})
    assert (await handle.wait(10)).status is RunStatus.SUCCEEDED
    through = engine.bus.last_seq

    dropped = 0
    for client, after in readers:
        ranges, lost = await event_stream(client, after, through)
        # every event once, in seq order: each range starts where the one before ended
        assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))
        dropped += lost
    await eventually(lambda: server.stats()["events_dropped"] > dropped)
    slow.reading(True)
    ranges, lost = await event_stream(slow, slow_after, through)
    assert all(b[0] == a[1] + 1 for a, b in zip(ranges, ranges[1:]))
    assert lost > 0
    # whatever was dropped was announced to the client that lost it, and counted
    assert server.stats()["events_dropped"] == dropped + lost
    for client, _ in [*readers, (slow, 0)]:
        await client.close()


async def test_a_dashboard_that_stops_sending_commands_keeps_getting_events(engine: Engine, sock_path: str) -> None:
    # replies and events share one writer, which also forwards events after each write:
    # a reply written just as an event arrived must not leave the stream waiting for
    # the next command (a read-only dashboard sends none)
    await serve(engine, sock_path)
    client, _ = await attach_raw(sock_path)
    received = 0

    async def read() -> None:
        nonlocal received
        while True:
            if (await client.recv(30))["type"] == "event":
                received += 1

    reading = asyncio.create_task(read())
    chatter = await engine.submit("ticker")
    try:
        pace = random.Random(11)
        for i in range(1500):  # commands while events flow, at an irregular pace
            await client.send({"type": "ping", "id": i})
            await asyncio.sleep(pace.random() * 0.004)
        quiet_from, got = engine.bus.last_seq, received
        # then only reading: every event published from here reaches it
        await eventually(lambda: engine.bus.last_seq > quiet_from + 200, timeout=10.0)
        await eventually(lambda: received - got >= 200, timeout=10.0)
    finally:
        reading.cancel()
        await engine.cancel(chatter.id)
        await client.close()


# ---------------------------------------------------------------- 9: values too large for a line


async def test_a_fresh_dashboard_attaches_to_an_engine_with_huge_runs(engine: Engine, sock_path: str) -> None:
    big = "x" * 200_000
    run_ids = [await finished(engine, "echo", big) for _ in range(80)]  # 32 MB of params and results
    server = await serve(engine, sock_path)
    remote = RemoteEngine(sock_path, max_message=4 * MIB, timeout=5)
    snapshot = await remote.connect()
    assert {run.id for run in snapshot.runs} == set(run_ids)
    assert snapshot.runs_omitted == 0
    for run in snapshot.runs:
        assert is_truncated(run.params) and is_truncated(run.result)
        assert run.params["bytes"] > 200_000
        assert run.params["preview"].startswith('{"data":"xxxx')
    assert server.stats()["values_truncated"] == 160

    full = await remote.get(run_ids[0])
    assert full.params == {"data": big} and full.result == big
    with pytest.raises(RunNotFound):
        await remote.get("no-such-run")

    # live events are bounded the same way
    handle = await engine.submit("echo", {"data": big})
    seen: dict[str, Any] = {}
    async for event in remote.events():
        if getattr(event, "run_id", None) == handle.id:
            seen[event.kind] = event
            if event.kind == "run.succeeded":
                break
    assert is_truncated(seen["run.submitted"].params)
    assert is_truncated(seen["run.succeeded"].result)
    await remote.close()


async def test_a_snapshot_still_too_long_leaves_out_the_oldest_finished_runs(
    engine: Engine, sock_path: str
) -> None:
    sleeper = await engine.submit("sleepy")  # the oldest run, and running: it must stay
    await eventually(lambda: engine.get(sleeper.id).status is RunStatus.RUNNING)
    # 12 KB each is under max_value, so kept whole: 60 of them are over 700 KB
    run_ids = [await finished(engine, "echo", "y" * 6000) for _ in range(60)]
    server = await serve(engine, sock_path)
    async with RemoteEngine(sock_path, max_message=512 * KIB, timeout=5) as remote:
        snapshot = await remote.snapshot()
        kept = [run.id for run in snapshot.runs]
        assert snapshot.runs_omitted > 0
        assert len(kept) + snapshot.runs_omitted == 61
        assert sleeper.id in kept
        # the newest finished runs are the ones kept
        assert set(kept) - {sleeper.id} == set(run_ids[snapshot.runs_omitted:])
        assert not any(is_truncated(run.params) for run in snapshot.runs)
    # the welcome snapshot and the one asked for
    assert server.stats()["runs_omitted"] == 2 * snapshot.runs_omitted

    # a raw client that asks for no smaller lines gets them all in the server's own limit
    raw = await RawClient.open(sock_path)
    await raw.send({"type": "hello", "version": PROTOCOL_VERSION})
    assert (await raw.recv())["max_send"] == 16 * MIB
    assert len((await raw.recv())["snapshot"]["runs"]) == 61
    await raw.close()
    await engine.cancel(sleeper.id)


async def test_get_returns_a_full_record_or_says_it_is_too_large(engine: Engine, sock_path: str) -> None:
    await serve(engine, sock_path)
    async with RemoteEngine(sock_path, max_message=512 * KIB, timeout=5) as remote:
        # a 600 KB command line arrives whole (gathered past the 4 KiB hello limit)
        record = await remote.submit("echo", {"data": "z" * 600_000})
        assert is_truncated(record.params)
        await eventually(lambda: engine.get(record.id).status is RunStatus.SUCCEEDED)
        with pytest.raises(ReplyTooLarge) as too_large:
            await remote.get(record.id)
        assert too_large.value.size > 1_200_000 and too_large.value.limit < 512 * KIB
        assert remote.connected
        small = await remote.submit("echo", {"data": "small"})
        await eventually(lambda: engine.get(small.id).status is RunStatus.SUCCEEDED)
        assert (await remote.get(small.id)).result == "small"


async def test_huge_errors_and_results_are_cut_in_events_within_the_clients_limit(
    engine: Engine, sock_path: str
) -> None:
    await serve(engine, sock_path)
    message = "head " + "e" * 600_000 + " tail"
    async with RemoteEngine(sock_path, max_message=512 * KIB, timeout=5) as remote:
        failing = await engine.submit("boom", {"data": message})
        echoed = await engine.submit("echo", {"data": message})
        seen: dict[tuple[str | None, str], Any] = {}
        async for event in remote.events():
            run_id = getattr(event, "run_id", None)
            seen[(run_id, event.kind)] = event
            if (failing.id, "run.failed") in seen and (echoed.id, "run.succeeded") in seen:
                break
        error = seen[(failing.id, "run.failed")].error
        assert is_truncated(error.message) and is_truncated(error.traceback)
        assert error.message.startswith("head ") and error.message.endswith(" tail")
        assert len(error.message) < 20_000
        assert error.traceback.rstrip().endswith(" tail")  # the end names the error
        assert is_truncated(seen[(echoed.id, "run.succeeded")].result)
        assert remote.connected
    # a client with room for the whole record can have it: the result whole, the error as the
    # engine keeps it (itself cut to a bound where the failure was recorded)
    async with RemoteEngine(sock_path, timeout=5) as roomy:
        full = await roomy.get(failing.id)
        kept = engine.get(failing.id).error
        assert full.error is not None and kept is not None and full.error.message == kept.message
        assert (await roomy.get(echoed.id)).result == message


# ---------------------------------------------------------------- 10: tokens


async def test_short_tokens_are_refused_with_advice(engine: Engine, sock_path: str) -> None:
    for short in ("a", "", "fifteen-bytes!!"):
        with pytest.raises(WeakToken, match=r"secrets\.token_urlsafe\(32\)") as weak:
            ControlServer(engine, "tcp://127.0.0.1:0", token=short)
        assert isinstance(weak.value, ValueError)
    ControlServer(engine, "tcp://127.0.0.1:0", token="sixteen-bytes!!!")
    ControlServer(engine, sock_path, token="\u00e9" * 8)  # 16 bytes of UTF-8
    ControlServer(engine, sock_path)  # no token on a private Unix socket


def test_generated_tokens_never_look_like_a_command_line_option() -> None:
    from taskwatch.engine.server import new_token

    tokens = [new_token() for _ in range(2_000)]  # about 30 would start with "-" if drawn plainly
    assert all(len(t) >= 32 and not t.startswith("-") for t in tokens)
    assert len(set(tokens)) == len(tokens)


# ---------------------------------------------------------------- 11: heavy commands pipelined


async def test_a_client_with_many_snapshots_in_flight_holds_one_place_in_the_line_for_heavy_work(
    engine: Engine, sock_path: str
) -> None:
    # heavy work (a snapshot, a full record) is done a piece per turn, in the order it was asked
    # for: a client keeping sixteen snapshots in flight put all sixteen ahead of another client's
    # get or attach, and a few such clients kept a fresh dashboard waiting for seconds
    # runs enough for a snapshot to take a while (and the rest after it three times as long)
    handles = [await engine.submit("echo", {"data": "x" * 100}) for _ in range(300)]
    await eventually(lambda: all(engine.get(h.id).status.finished for h in handles))
    await serve(engine, sock_path)
    hog = await RawClient.authenticated(sock_path)
    other = await RawClient.authenticated(sock_path)
    arrived: list[str] = []

    async def replies(client: RawClient, name: str, count: int) -> None:
        for _ in range(count):
            assert (await client.reply(timeout=30))["type"] == "ok"
            arrived.append(name)

    await hog.send(b"".join(json.dumps({"type": "snapshot", "id": i}).encode() + b"\n" for i in range(16)))
    await replies(hog, "hog", 1)  # the other fifteen wait in line now
    hogs = asyncio.create_task(replies(hog, "hog", 15))
    await other.send({"type": "get", "id": 1, "run_id": handles[0].id})
    await asyncio.gather(hogs, replies(other, "other", 1))
    # behind the one snapshot of the hog's in line before it (and a few more at most, served
    # while the get was on its way), not behind all fifteen
    assert arrived.index("other") <= 5, arrived
    await hog.close()
    await other.close()


async def test_pipelined_snapshots_leave_the_loop_a_turn_between_them(
    engine: Engine, sock_path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A snapshot holds the engine's loop, with no await, for as long as it takes (a quarter
    of a second for 10,000 runs). Sixteen read from one client's buffer at once (a dashboard's
    ``gather`` of snapshot() calls) ran back to back in one turn: no timer fell due and no
    other client was read until the last. A task woken by a timer during one runs before the next."""
    for _ in range(3):
        await finished(engine, "echo", "x")
    await serve(engine, sock_path)
    hog = await RawClient.authenticated(sock_path)
    loop = asyncio.get_running_loop()
    taking = engine.snapshot
    #: per snapshot: whether the task waiting for the timer the one before it set has run
    had_its_turn: list[bool] = []
    woken = [True]
    waiters: list[asyncio.Task[None]] = []

    async def on_timer(due: asyncio.Future[None]) -> None:
        await due
        woken[0] = True

    def snapshot(runs_limit: int = 500) -> Snapshot:
        had_its_turn.append(woken[0])
        woken[0] = False
        # a timer falling due while the snapshot is taken, as a sleeping run's or a heartbeat's
        # does: the loop wakes its task in the next turn, and the task runs in the one after
        due: asyncio.Future[None] = loop.create_future()
        loop.call_later(0, due.set_result, None)
        waiters.append(asyncio.ensure_future(on_timer(due)))
        return taking(runs_limit)

    monkeypatch.setattr(engine, "snapshot", snapshot)
    # one write: the server reads the sixteen commands (its max_inflight) in one turn
    await hog.send(b"".join(json.dumps({"type": "snapshot", "id": i}).encode() + b"\n" for i in range(16)))
    replies = [await hog.reply() for _ in range(16)]
    assert sorted(reply["id"] for reply in replies) == list(range(16))
    assert {reply["type"] for reply in replies} == {"ok"}
    assert had_its_turn == [True] * 16
    await asyncio.gather(*waiters)
    await hog.close()
