"""Trigger keys saved in a store several nodes share are held by the incarnation that saved them.

The same trigger registered on every node fires a key once per notifying node's counts, never
once per node: a node takes up at its start its own rows and those of holders that are gone, and
while it runs the rows of holders gone since (at its saves). Real SQLite files, a real PostgreSQL
server and a real child process killed with SIGKILL (``tests/loops_child.py``).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
from pathlib import Path
from collections.abc import Callable
from typing import Any, TypeVar

import asyncpg
import pytest
from taskwatch.engine import Engine, RunStatus, TaskContext
from taskwatch.engine.store import PostgresStore, Store, TriggerKeyRecord, make_store
from taskwatch.engine.store import queries as Q
from taskwatch.engine.triggers import Trigger

from .cutting_proxy import StallingProxy
from .helpers import Recorder, eventually
from .test_durable import Child
from .test_queue_faults import TIMEOUT as QTIMEOUT
from .test_queue_faults import TTL as QTTL
from .test_queue_faults import LoopThread, frozen_until_it_looks_gone
from .test_store_contract import TTL, FakeClock, clock, store  # noqa: F401 - the stores' fixtures
from .test_triggers import Clock
from .postgres_server import PostgresServer

T = TypeVar("T")


@pytest.fixture(params=["sqlite", "postgres"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a store two engines of the test share."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'shared.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def node(url: str, node_id: str, ran: list[str], wall: Clock, **options: Any) -> tuple[Engine, Trigger]:
    """An engine with trigger "compile" due by staleness on ``wall`` (moved by the test, and
    swept by its ``check()``); its runs append their key to ``ran``."""
    engine = Engine(store=url, node_id=node_id, health_interval=None, **options)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    trigger = engine.trigger(
        "compile", compile_key, size_threshold=1000, staleness=10, check_interval=3600, clock=wall,
        save_interval=3600,
    )  # fmt: skip
    return engine, trigger


async def trigger_runs(engine: Engine) -> list[Any]:
    """Every run of trigger "compile" in the store, whichever node fired it."""
    return (await engine.query_runs(task="trigger:compile", limit=100)).runs


async def test_the_same_trigger_on_two_nodes_fires_a_key_once_when_one_node_is_notified(shared: str) -> None:
    wall = Clock(1000.0)
    ran: list[str] = []
    a, ta = node(shared, "a", ran, wall)
    b, tb = node(shared, "b", ran, wall)
    engines = [a, b]
    await a.start()
    await b.start()
    try:
        ta.notify("k", 2)
        await ta.save_changes()
        # b starts again while a runs: what a saved is a's, to fire, not b's
        await b.stop()
        b, tb = node(shared, "b", ran, wall)
        engines.append(b)
        await b.start()
        assert tb.key_count == 0
        wall.now += 11  # stale on both nodes' clock
        assert ta.check() + tb.check() == 1
        await ta.drain(timeout=10)
        assert ran == ["k"]

        # notified again and not saved before the stop, which saves it; a is gone then, and b's
        # next start takes its counts up, once
        ta.notify("k", 2)
        await a.stop()
        await b.stop()
        b, tb = node(shared, "b", ran, wall)
        engines.append(b)
        await b.start()
        assert [(k.key, k.count) for k in tb.state().keys] == [("k", 2)]
        wall.now += 11
        assert tb.check() == 1
        await tb.drain(timeout=10)
        assert ran == ["k", "k"]

        # a back: b holds those counts now (and ran them), a has none to fire
        a, ta = node(shared, "a", ran, wall)
        engines.append(a)
        await a.start()
        assert ta.key_count == 0
        wall.now += 11
        assert ta.check() + tb.check() == 0
        runs = await trigger_runs(a)
        assert [r.status for r in runs] == [RunStatus.SUCCEEDED] * 2
        assert ran == ["k", "k"]
    finally:
        for engine in engines:
            await engine.stop()


async def test_each_node_fires_the_counts_it_was_notified_of(shared: str) -> None:
    wall = Clock(1000.0)
    ran: list[str] = []
    a, ta = node(shared, "a", ran, wall)
    b, tb = node(shared, "b", ran, wall)
    await a.start()
    await b.start()
    try:
        ta.notify("k", 2)
        tb.notify("k", 3)
        await ta.save_changes()
        await tb.save_changes()
        wall.now += 11
        assert ta.check() + tb.check() == 2  # one run per notified node
        await ta.drain(timeout=10)
        await tb.drain(timeout=10)
        assert sorted(r.status for r in await trigger_runs(a)) == [RunStatus.SUCCEEDED] * 2
        assert [k.count for k in ta.state().keys] == [0] and [k.count for k in tb.state().keys] == [0]
    finally:
        await a.stop()
        await b.stop()


async def test_a_restart_takes_no_run_another_node_fired_for_a_key_as_its_own(shared: str) -> None:
    # a's run of k did a's counts: b's saved counts of k, taken up at b's restart, still fire
    ran: list[str] = []

    def threshold_node(node_id: str) -> tuple[Engine, Trigger]:
        engine = Engine(store=shared, node_id=node_id, health_interval=None)

        async def compile_key(ctx: TaskContext, key: str) -> None:
            ran.append(key)

        return engine, engine.trigger("compile", compile_key, size_threshold=3, save_interval=3600)

    (a, ta), (b, tb) = threshold_node("a"), threshold_node("b")
    engines = [a, b]
    await a.start()
    await b.start()
    try:
        tb.notify("k", 2)
        await tb.save_changes()
        ta.notify("k", 3)
        await ta.drain(timeout=10)
        await ta.save_changes()
        assert ran == ["k"]
        await b.stop()
        b, tb = threshold_node("b")
        engines.append(b)
        await b.start()
        assert [(k.key, k.count) for k in tb.state().keys] == [("k", 2)]
        tb.notify("k")
        await tb.drain(timeout=10)
        assert ran == ["k", "k"]
    finally:
        for engine in engines:
            await engine.stop()


# ---------------------------------------------------------------- a node killed while another runs


async def test_a_killed_nodes_saved_counts_fire_once_on_a_node_that_keeps_running(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    fired: list[str] = []
    survivor = Engine(store=f"sqlite:///{db}", node_id="survivor", lease_ttl=3.0, health_interval=None)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        fired.append(key)

    trigger = survivor.trigger("compile", compile_key, size_threshold=7, save_interval=0.1)
    await survivor.start()
    # the child's trigger never fires (its threshold is a million): it saves 7 for doc-1, then dies
    child = Child(db, "killed", "notify", "--key", "doc-1", "--count", "7", module="tests.loops_child")
    try:
        await asyncio.to_thread(child.event, "notified")

        def saved() -> list[tuple[int]]:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT count FROM trigger_keys WHERE counter_key = 'doc-1'").fetchall()

        assert await eventually(saved, timeout=30) == [(7,)]
        assert trigger.fired == 0  # the child's counts, while it lives
        await asyncio.to_thread(child.sigkill)
        # silent past the survivor's node_ttl: its next save takes the counts up, and they fire
        await eventually(lambda: trigger.fired == 1, timeout=30)
        await trigger.drain(timeout=10)
        assert fired == ["doc-1"]
        assert [(k.key, k.count, k.last_status) for k in trigger.state().keys] == [("doc-1", 0, "succeeded")]
        runs = await trigger_runs(survivor)
    finally:
        child.close()
        await survivor.stop()
    assert [r.status for r in runs] == [RunStatus.SUCCEEDED]
    assert trigger.adopted == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT holder, count FROM trigger_keys").fetchall() == [(survivor.incarnation, 0)]


async def test_a_stopped_nodes_counts_are_taken_up_even_when_saves_are_rarer_than_node_ttl(shared: str) -> None:
    # saves once a minute (fewer writes), heartbeats good for a second: the looks for gone
    # holders keep their own pace, and the gap between two looks is not taken for a missed beat
    fired: list[str] = []

    def make(node_id: str) -> tuple[Engine, Trigger]:
        engine = Engine(store=shared, node_id=node_id, lease_ttl=1.0, health_interval=None)

        async def compile_key(ctx: TaskContext, key: str) -> None:
            fired.append(f"{node_id}:{key}")

        return engine, engine.trigger("compile", compile_key, size_threshold=3, save_interval=60)

    a, ta = make("a")
    b, tb = make("b")
    await a.start()
    await b.start()
    try:
        ta.notify("k", 2)
        await a.stop()  # saves k=2 as a's, and a is gone
        tb.notify("k", 1)  # b's own 1, with a's 2 once taken up: 3, the threshold
        await eventually(lambda: tb.fired == 1, timeout=30)
        await tb.drain(timeout=10)
    finally:
        await a.stop()
        await b.stop()
    assert fired == ["b:k"]
    assert tb.adopted == 1


async def test_a_key_taken_up_while_running_follows_its_run_to_its_end_on_a_third_node(tmp_path: Path) -> None:
    # x fires k and stops while c runs that run; b takes up x's key at its next save: b's index
    # never held the run, and b still hears it end (else k would wait on it for good)
    url = f"sqlite:///{tmp_path / 't.db'}"
    gate = asyncio.Event()
    ran: list[str] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)
        await gate.wait()

    async def blocker(ctx: TaskContext) -> None:
        await gate.wait()

    def make(node_id: str, *, busy: bool, lease_ttl: float = 1.5) -> tuple[Engine, Trigger]:
        engine = Engine(store=url, node_id=node_id, lease_ttl=lease_ttl, health_interval=None, max_concurrency=1)
        if busy:  # its one slot goes to a blocker: the key's run goes to c
            engine.task(name="blocker")(blocker)
        return engine, engine.trigger("compile", compile_key, size_threshold=3, save_interval=0.05)

    # (c looks for gone holders every 10 s, b every 0.5 s: b is the one to take k up)
    (x, tx), (b, tb), (c, _) = make("x", busy=True), make("b", busy=True), make("c", busy=False, lease_ttl=60)
    engines = [x, b, c]
    for engine in engines:
        await engine.start()
    try:
        for engine in (x, b):
            await engine.submit("blocker")
        await eventually(lambda: x.executing == 1 and b.executing == 1)
        tx.notify("k", 3)
        await eventually(lambda: c.executing == 1 and ran == ["k"])
        [state] = tx.state().keys
        run_id = state.run_id
        await x.stop(timeout=0.1)  # saves k, waiting on that run
        await eventually(lambda: tb.adopted == 1)
        assert [(k.key, k.run_id, k.count) for k in tb.state().keys] == [("k", run_id, 3)]
        gate.set()
        await tb.drain(timeout=10)
        assert [(k.key, k.run_id, k.count, k.last_status) for k in tb.state().keys] == [("k", run_id, 0, "succeeded")]
        assert ran == ["k"]
    finally:
        gate.set()
        for engine in engines:
            await engine.stop()


# ---------------------------------------------------------------- two nodes starting at once


async def test_two_postgres_nodes_taking_up_a_gone_holders_keys_at_once_never_both_take_one(
    postgres_url: str,
) -> None:
    keys = {f"doc-{i}": TriggerKeyRecord(count=i + 1, first_seen_at=5.0) for i in range(300)}
    rounds = 12
    gone = PostgresStore(postgres_url, lease_ttl=TTL)
    async with gone:
        await gone.register_node("x", "ix", "1")
        for r in range(rounds):
            await gone.save_trigger(f"t{r}", "ix", keys)
        await gone.node_stopped("ix")
    stores = [PostgresStore(postgres_url, lease_ttl=TTL) for _ in range(2)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        await stores[0].register_node("a", "ia", "1")
        await stores[1].register_node("b", "ib", "1")
        for r in range(rounds):
            got_a, got_b = await asyncio.gather(
                stores[0].adopt_trigger(f"t{r}", "ia", own=True), stores[1].adopt_trigger(f"t{r}", "ib", own=True)
            )
            assert not got_a.keys() & got_b.keys()
            assert {**got_a, **got_b} == keys
            # each key is held once, by the node that took it
            assert await stores[0].adopt_trigger(f"t{r}", "ia", own=True) == got_a
            assert await stores[1].adopt_trigger(f"t{r}", "ib", own=True) == got_b
    finally:
        await asyncio.gather(*(s.close() for s in stores))


async def test_a_postgres_node_skips_the_rows_another_node_is_taking_up(postgres_url: str) -> None:
    keys = {f"doc-{i}": TriggerKeyRecord(count=1) for i in range(10)}
    s = PostgresStore(postgres_url, lease_ttl=TTL)
    async with s:
        await s.register_node("x", "ix", "1")
        await s.save_trigger("t", "ix", keys)
        await s.node_stopped("ix")
        await s.register_node("a", "ia", "1")
        other = await asyncpg.connect(postgres_url)
        try:
            # another node's adoption holds these rows, in a transaction not committed yet
            tx = other.transaction()
            await tx.start()
            await other.execute(
                "SELECT 1 FROM trigger_keys WHERE holder = 'ix' AND counter_key = ANY($1) FOR UPDATE",
                ["doc-0", "doc-1", "doc-2"],
            )
            got = await asyncio.wait_for(s.adopt_trigger("t", "ia"), 10)  # neither waits nor takes them
            assert set(got) == set(keys) - {"doc-0", "doc-1", "doc-2"}
            await tx.rollback()
        finally:
            await other.close()
        assert set(await s.adopt_trigger("t", "ia")) == {"doc-0", "doc-1", "doc-2"}


async def test_two_postgres_engines_starting_at_once_share_a_gone_nodes_keys_out_once(postgres_url: str) -> None:
    # first seen just now on the nodes' clock: none is due, so none fires (and is counted 0)
    # while the other node still starts
    keys = {f"doc-{i}": TriggerKeyRecord(count=1, first_seen_at=1000.0) for i in range(2000)}
    gone = PostgresStore(postgres_url, lease_ttl=TTL)
    async with gone:
        await gone.register_node("x", "ix", "1")
        await gone.save_trigger("compile", "ix", keys)
        await gone.node_stopped("ix")
    wall = Clock(1000.0)
    ran: list[str] = []
    (a, ta), (b, tb) = node(postgres_url, "a", ran, wall), node(postgres_url, "b", ran, wall)
    await asyncio.gather(a.start(), b.start())
    try:
        counted = {k.key: k.count for k in ta.state().keys}
        for k in tb.state().keys:
            assert k.key not in counted
            counted[k.key] = k.count
        assert counted == {key: 1 for key in keys}
    finally:
        await asyncio.gather(a.stop(), b.stop())


# ---------------------------------------------------------------- a node that only looked gone


def paused_pair(
    url: str, fired: list[str], gate: threading.Event | None = None
) -> tuple[LoopThread, Engine, Trigger, Engine, Trigger]:
    """Nodes a (on a loop of its own, which the test can freeze) and b, with trigger "compile"
    of threshold 10, saving often, and heartbeats good for QTTL seconds; its runs wait for
    ``gate``, if given."""
    node_a = LoopThread()
    engines: list[tuple[Engine, Trigger]] = []
    for name in ("a", "b"):
        engine = Engine(store=url, node_id=name, lease_ttl=QTTL, health_interval=None)

        async def compile_key(ctx: TaskContext, key: str, name: str = name) -> None:
            fired.append(f"{name}:{key}")
            if gate is not None:
                await asyncio.to_thread(gate.wait, QTIMEOUT)

        engines.append((engine, engine.trigger("compile", compile_key, size_threshold=10, save_interval=0.05)))
    (a, ta), (b, tb) = engines
    return node_a, a, ta, b, tb


async def paused_until(node: LoopThread, done: Callable[[], bool]) -> None:
    """``node``'s loop blocked, as a paused process's, until ``done()``."""
    thaw = await node.freeze(lambda: None)
    try:
        await eventually(done, timeout=QTIMEOUT)
    finally:
        thaw.set()


async def fire_and_save(url: str, node: LoopThread, trigger: Trigger) -> None:
    """Notify ``trigger`` (on ``node``) of key k 12 times, which fires k, and save k's row
    naming that run once the store has the run (a shared store's writes lag)."""
    await on(node, lambda: trigger.notify("k", 12))
    [run_id] = await on(node, lambda: [k.run_id for k in trigger.state().keys])
    async with make_store(url, lease_ttl=QTTL) as looker:
        async with asyncio.timeout(QTIMEOUT):
            while run_id not in await looker.get_many([run_id]):
                await asyncio.sleep(0.02)
    await node.run(trigger.save_changes())


async def on(node: LoopThread, fn: Callable[[], T]) -> T:
    """``fn()`` called on ``node``'s loop (a trigger is counted and read there)."""

    async def call() -> T:
        return fn()

    return await node.run(call())


async def saved_by(url: str, engine: Engine, keys: set[str]) -> None:
    """Wait until ``engine``'s rows of trigger "compile" in the store at ``url`` are ``keys``."""
    async with make_store(url, lease_ttl=QTTL) as looker:
        async with asyncio.timeout(QTIMEOUT):
            while await looker.trigger_keys_held("compile", engine.incarnation) != keys:
                await asyncio.sleep(0.02)


async def test_a_node_paused_while_another_took_up_its_counts_gives_them_up_when_it_is_back(shared: str) -> None:
    fired: list[str] = []
    node_a, a, ta, b, tb = paused_pair(shared, fired)
    c = Engine(store=shared, node_id="c", health_interval=None)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        fired.append(f"c:{key}")

    tc = c.trigger("compile", compile_key, size_threshold=10)
    try:
        await node_a.run(a.start())
        await on(node_a, lambda: ta.notify("k", 6))
        await saved_by(shared, a, {"k"})
        await b.start()
        # a paused past its heartbeats' ttl: b takes its saved 6 up
        await paused_until(node_a, lambda: tb.adopted == 1)
        assert [(k.key, k.count) for k in tb.state().keys] == [("k", 6)]
        # back, a asks the store which keys are still its own, and gives k's saved 6 up
        await eventually(lambda: ta.given_up == 1, timeout=QTIMEOUT)
        state = await on(node_a, ta.state)
        assert state.hold_lapses >= 1 and state.given_up == 1
        assert [(k.key, k.count) for k in state.keys] == [("k", 0)]
        assert tb.state().adopted == 1
        # 4 more on each node: only b's 6 + 4 reach the threshold, and fire once
        await on(node_a, lambda: ta.notify("k", 4))
        tb.notify("k", 4)
        await tb.drain(timeout=QTIMEOUT)
        # (either node may run it: they share the store's queue)
        assert len(fired) == 1
        assert (ta.fired, tb.fired) == (0, 1)
        assert await on(node_a, lambda: [(k.key, k.count) for k in ta.state().keys]) == [("k", 4)]
        await b.stop()
        await node_a.run(a.stop())
        # what the store holds of k when both are gone: a's 4, not run yet (not the 6 b ran too)
        await c.start()
        assert [(k.key, k.count) for k in tc.state().keys] == [("k", 4)]
    finally:
        await c.stop()
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


async def test_a_paused_node_leaves_the_run_its_taken_row_named_to_the_node_that_took_it(shared: str) -> None:
    gate = threading.Event()
    node_a, a, ta, b, tb = paused_pair(shared, [], gate)

    def keys(trigger: Trigger) -> list[tuple[str, int, bool]]:
        return [(k.key, k.count, k.queued or k.running) for k in trigger.state().keys]

    try:
        await node_a.run(a.start())
        await fire_and_save(shared, node_a, ta)  # fires with 12: the row names the run
        await b.start()
        await paused_until(node_a, lambda: tb.adopted == 1)
        # b follows the run with the 12 it took; a, back, gives both up
        assert keys(tb) == [("k", 12, True)]
        await eventually(lambda: ta.given_up == 1, timeout=QTIMEOUT)
        assert await on(node_a, lambda: keys(ta)) == [("k", 0, False)]
        await on(node_a, lambda: ta.notify("k", 3))
        gate.set()
        # the run's end takes its 12 off on b; a keeps the 3 it counted since
        await eventually(lambda: keys(tb) == [("k", 0, False)], timeout=QTIMEOUT)
        assert await on(node_a, lambda: keys(ta)) == [("k", 3, False)]
        assert (ta.fired, tb.fired) == (1, 0)
    finally:
        gate.set()
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


async def test_a_drain_on_a_run_the_taker_follows_now_ends_with_the_stop_of_the_paused_node(shared: str) -> None:
    gate = threading.Event()
    node_a, a, ta, b, tb = paused_pair(shared, [], gate)
    try:
        await node_a.run(a.start())
        await fire_and_save(shared, node_a, ta)  # its drain waits on that run
        draining = asyncio.run_coroutine_threadsafe(ta.drain(), node_a.loop)
        await b.start()
        thaw = await node_a.freeze(lambda: None)
        try:
            await eventually(lambda: tb.adopted == 1, timeout=QTIMEOUT)
            # (the run still waits on the gate: unless a saw its claim lost first, the stop
            # gives it its timeout, then cuts it)
            stopping = asyncio.run_coroutine_threadsafe(a.stop(timeout=1), node_a.loop)
        finally:
            thaw.set()
        await asyncio.wrap_future(stopping)
        # b follows the run now: a's drain has nothing here to wait for
        assert ta.given_up == 1
        async with asyncio.timeout(QTIMEOUT):
            assert await asyncio.wrap_future(draining) is None
    finally:
        gate.set()
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


@pytest.mark.parametrize("wait", ["trigger drain", "queue join"])
async def test_a_drain_from_another_loop_ends_at_its_timeout_while_the_engines_loop_is_blocked(
    tmp_path: Path, wait: str
) -> None:
    # the timeout was kept on the engine's loop alone, which a blocked loop never runs
    node_a, a, ta, _, _ = paused_pair(f"sqlite:///{tmp_path / 'blocked.db'}", [])
    queue = a.queue("q", nothing)
    try:
        await node_a.run(a.start())
        thaw = await node_a.freeze(lambda: None)
        try:
            draining = asyncio.ensure_future(ta.drain(timeout=0.2) if wait == "trigger drain" else queue.join(timeout=0.2))
            await asyncio.wait([draining], timeout=QTIMEOUT)
            assert draining.done() and isinstance(draining.exception(), TimeoutError)
        finally:
            thaw.set()
    finally:
        await node_a.run(a.stop())
        node_a.close()


async def test_a_lone_node_paused_past_its_heartbeats_ttl_keeps_its_counts(tmp_path: Path) -> None:
    db = tmp_path / "lone.db"
    fired: list[str] = []
    node_a, a, ta, _, _ = paused_pair(f"sqlite:///{db}", fired)
    try:
        await node_a.run(a.start())
        await on(node_a, lambda: ta.notify("k", 6))
        await saved_by(f"sqlite:///{db}", a, {"k"})
        await frozen_until_it_looks_gone(node_a, db, "a", lambda: None)
        # nobody took its row: the store says k is still a's, and its 6 stay
        await eventually(lambda: ta.hold_lapses >= 1, timeout=QTIMEOUT)
        await on(node_a, lambda: ta.notify("k", 4))
        await eventually(lambda: fired == ["a:k"], timeout=QTIMEOUT)
        assert ta.given_up == 0
    finally:
        await node_a.run(a.stop())
        node_a.close()


# ---------------------------------------------------------------- what the store does


async def test_a_trigger_key_is_taken_up_only_from_a_holder_that_is_gone(
    store: Store, clock: FakeClock  # noqa: F811 - the fixtures
) -> None:
    await store.register_node("n1", "i1", "1")
    await store.register_node("n2", "i2", "1")
    await store.save_trigger("t", "i1", {"k": TriggerKeyRecord(count=2, first_seen_at=7.0)})
    await store.save_trigger("t", "i2", {"k": TriggerKeyRecord(count=1, first_seen_at=9.0), "j": TriggerKeyRecord(count=5)})
    # both alive: each holds its own
    assert await store.adopt_trigger("t", "i2") == {}
    assert await store.adopt_trigger("t", "i2", own=True) == {
        "k": TriggerKeyRecord(count=1, first_seen_at=9.0), "j": TriggerKeyRecord(count=5),
    }  # fmt: skip
    assert (await store.trigger_keys_held("t", "i1"), await store.trigger_keys_held("t", "i2")) == ({"k"}, {"k", "j"})
    assert await store.trigger_keys_elsewhere("t", "i1") == {"k", "j"}
    await store.node_stopped("i1")
    # i1's row of k comes back alone, and is merged into i2's own row in the store
    assert await store.adopt_trigger("t", "i2") == {"k": TriggerKeyRecord(count=2, first_seen_at=7.0)}
    assert (await store.trigger_keys_held("t", "i1"), await store.trigger_keys_held("t", "i2")) == (set(), {"k", "j"})
    assert await store.trigger_keys_held("other", "i2") == set()
    assert await store.adopt_trigger("t", "i2") == {}
    assert await store.adopt_trigger("t", "i1", own=True) == {}
    assert await store.adopt_trigger("t", "i2", own=True) == {
        "k": TriggerKeyRecord(count=3, first_seen_at=7.0), "j": TriggerKeyRecord(count=5),
    }  # fmt: skip
    # a later save of i2 replaces its row
    await store.save_trigger("t", "i2", {"k": TriggerKeyRecord(count=0)}, forget=["j"])
    assert await store.adopt_trigger("t", "i2", own=True) == {"k": TriggerKeyRecord(count=0)}


@pytest.mark.parametrize("how", ["silent", "replaced", "never registered"])
async def test_every_kind_of_gone_holder_gives_up_its_trigger_keys(
    store: Store, clock: FakeClock, how: str  # noqa: F811 - the fixtures
) -> None:
    await store.register_node("n2", "i2", "1")
    if how != "never registered":
        await store.register_node("n1", "i1", "1")
    await store.save_trigger("t", "i1", {"k": TriggerKeyRecord(count=2)})
    if how == "silent":
        clock.advance(TTL / 2)
        await store.node_heartbeat("i2", 0)
        assert await store.adopt_trigger("t", "i2") == {}
        clock.advance(TTL / 2 + 1)
        await store.node_heartbeat("i2", 0)
    elif how == "replaced":
        assert await store.adopt_trigger("t", "i2") == {}
        await store.register_node("n1", "i1-again", "1")
    assert await store.adopt_trigger("t", "i2") == {"k": TriggerKeyRecord(count=2)}


async def test_a_save_writes_a_key_it_held_only_over_its_row_still_there(
    store: Store, clock: FakeClock  # noqa: F811 - the fixtures
) -> None:
    await store.register_node("n1", "i1", "1")
    await store.register_node("n2", "i2", "1")
    await store.save_trigger("t", "i1", {"k": TriggerKeyRecord(count=6), "j": TriggerKeyRecord(count=2)})
    await store.save_trigger("t", "i2", {"k": TriggerKeyRecord(count=1)})
    clock.advance(TTL + 1)
    await store.node_heartbeat("i2", 0)
    # i1 looked gone: i2 took up its rows, merged into i2's own
    assert set(await store.adopt_trigger("t", "i2")) == {"k", "j"}
    await store.node_heartbeat("i1", 0)
    # i1, back, saves k and j (rows it held) and a key new to the store: only the new one is written
    keys = {"k": TriggerKeyRecord(count=7), "j": TriggerKeyRecord(count=2), "n": TriggerKeyRecord(count=1)}
    assert await store.save_trigger("t", "i1", keys, held=["k", "j"]) == {"k", "j"}
    assert await store.trigger_keys_held("t", "i1") == {"n"}
    # a row still there is written over; a key forgotten in the same save is no row to look for
    assert await store.save_trigger("t", "i1", {"n": TriggerKeyRecord(count=3)}, held=["n"]) == set()
    assert await store.save_trigger("t", "i1", {"k": TriggerKeyRecord(count=1)}, forget=["n"]) == set()
    assert await store.adopt_trigger("t", "i1", own=True) == {"k": TriggerKeyRecord(count=1)}
    assert await store.adopt_trigger("t", "i2", own=True) == {
        "k": TriggerKeyRecord(count=7), "j": TriggerKeyRecord(count=2),
    }  # fmt: skip


async def test_a_taken_row_that_follows_a_run_keeps_following_it(store: Store) -> None:  # noqa: F811 - the fixture
    await store.register_node("n2", "i2", "1")
    await store.save_trigger("t", "i2", {"k": TriggerKeyRecord(count=1, last_run_id="r0", last_run_at=3.0)})
    gone = TriggerKeyRecord(count=4, captured=3, run_id="r1", last_run_id="r00", last_run_at=2.0)
    await store.save_trigger("t", "ghost", {"k": gone})
    assert await store.adopt_trigger("t", "i2") == {"k": gone}
    assert await store.adopt_trigger("t", "i2", own=True) == {
        "k": TriggerKeyRecord(count=5, captured=3, run_id="r1", last_run_id="r0", last_run_at=3.0)
    }


# ---------------------------------------------------------------- keys saved before they had holders

#: the trigger_keys of schema 7, with keys saved by an older taskwatch (no holder)
OLD_ROWS = [
    (
        "INSERT INTO trigger_keys (trigger_name, counter_key, count, captured, first_seen_at) VALUES "
        "('compile', 'k', 3, 0, 5.0), ('compile', 'j', 1, 0, 5.0), ('other', 'k', 9, 0, NULL)"
    ),
]


def old_sqlite_file(path: Path) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(Q.CREATE_MIGRATIONS)
        for version, name, statements in Q.MIGRATIONS[:7]:
            for sql in statements:
                conn.execute(sql)
            conn.execute(Q.RECORD_MIGRATION, {"version": version, "name": name, "now": 0.0})
        for sql in OLD_ROWS:
            conn.execute(sql)


async def test_a_sqlite_file_of_schema_7_keeps_its_trigger_keys_and_the_first_start_takes_them_up(
    tmp_path: Path,
) -> None:
    db = tmp_path / "old.db"
    old_sqlite_file(db)
    ran: list[str] = []
    engine = Engine(store=f"sqlite:///{db}", node_id="n", health_interval=None)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    trigger = engine.trigger("compile", compile_key, size_threshold=3)
    async with engine:
        await trigger.drain(timeout=10)
        assert ran == ["k"]  # due at the start: fired once
        assert sorted((k.key, k.count) for k in trigger.state().keys) == [("j", 1), ("k", 0)]
        incarnation = engine.incarnation
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT MAX(version) FROM schema_migrations").fetchone() == (Q.SCHEMA_VERSION,)
        rows = conn.execute("SELECT trigger_name, holder, counter_key, count FROM trigger_keys ORDER BY 1, 3").fetchall()
    # the other trigger's keys wait, without a holder, for a node that has that trigger
    assert rows == [("compile", incarnation, "j", 1), ("compile", incarnation, "k", 0), ("other", "", "k", 9)]


async def test_a_postgres_database_of_schema_7_keeps_its_trigger_keys(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(Q.CREATE_MIGRATIONS)
        for version, name, statements in Q.MIGRATIONS[:7]:
            for sql in statements:
                await conn.execute(Q.postgres_ddl(sql))
            await conn.execute("INSERT INTO schema_migrations VALUES ($1, $2, 0)", version, name)
        for sql in OLD_ROWS:
            await conn.execute(sql)
    finally:
        await conn.close()
    s = PostgresStore(postgres_url, lease_ttl=TTL)
    async with s:
        await s.register_node("n", "i1", "1")
        assert await s.adopt_trigger("compile", "i1") == {
            "k": TriggerKeyRecord(count=3, first_seen_at=5.0), "j": TriggerKeyRecord(count=1, first_seen_at=5.0),
        }  # fmt: skip
        # counts are 64-bit now
        await s.save_trigger("compile", "i1", {"k": TriggerKeyRecord(count=2**63 - 1)})
        assert (await s.adopt_trigger("compile", "i1", own=True))["k"].count == 2**63 - 1



# ---------------------------------------------------------------- a stop with the store out of reach


async def test_a_stop_with_the_store_out_of_reach_counts_and_says_the_counts_it_could_not_save(
    postgres_server: Any, postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # nothing saves them after the stop: they were logged as a traceback and counted nowhere
    url = f"{postgres_url}?reconnect_timeout=0.5"
    ran: list[str] = []
    engine, trigger = node(url, "solo", ran, Clock(0.0))
    await engine.start()
    try:
        for _ in range(10):
            trigger.notify("k")
        await trigger.save_changes()  # these 10 reached the store
        postgres_server.stop("fast")
        try:
            trigger.notify("k", 5)
            trigger.notify("j", 2)
            with caplog.at_level(logging.ERROR, logger="taskwatch.triggers"):
                await engine.stop(timeout=0.2)
        finally:
            postgres_server.start()
    finally:
        await engine.stop()
    assert trigger.state().lost_at_stop == 7
    told = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR and "took none of its changes" in r.getMessage()]
    # once, with the figure of the engine's last save (the trigger's own stop saved first)
    assert len(told) == 1 and "7 count(s) notified on 2 key(s) since their last save are lost" in told[0]
    again, trigger2 = node(url, "solo", ran, Clock(0.0))
    async with again:
        assert {k.key: k.count for k in trigger2.state().keys} == {"k": 10}  # as the state said
        assert trigger2.state().lost_at_stop == 0


# ---------------------------------------------------------------- a pause across a save, a replaced process


async def nothing(ctx: TaskContext, key: str) -> None:
    return None


class PausedSave:
    """Freezes ``engine``'s loop, as a paused process's, in its next trigger save once armed:
    the save's records are made, and its request has not gone out."""

    def __init__(self, engine: Engine) -> None:
        self.armed, self.paused, self.thaw = threading.Event(), threading.Event(), threading.Event()
        real = engine.store.save_trigger

        async def save_trigger(trigger: str, incarnation: str, keys: Any, forget: Any = (), **kw: Any) -> Any:
            if self.armed.is_set():
                self.armed.clear()
                self.paused.set()
                self.thaw.wait(QTIMEOUT)  # the whole node stopped here, its loop with it
            return await real(trigger, incarnation, keys, forget, **kw)

        engine.store.save_trigger = save_trigger  # type: ignore[method-assign]


async def paused_in_a_save(node: LoopThread, trigger: Trigger, pause: PausedSave) -> None:
    """Count 1 more of key k on ``node``: its next save begins, and the node is paused in it."""
    pause.armed.set()
    await on(node, lambda: trigger.notify("k", 1))
    assert await asyncio.to_thread(pause.paused.wait, QTIMEOUT)


async def test_a_save_under_way_across_a_pause_writes_back_none_of_what_another_node_took(shared: str) -> None:
    # the pause began with a's save of k under way: the save went out once a was back, and wrote
    # back the row b had taken up meanwhile. a's retake then found k still its own, and kept the
    # 6 b held too: they fired on both nodes
    fired: list[str] = []
    node_a, a, ta, b, tb = paused_pair(shared, fired)
    pause = PausedSave(a)
    c = Engine(store=shared, node_id="c", health_interval=None)
    tc = c.trigger("compile", nothing, size_threshold=10)
    try:
        await node_a.run(a.start())
        await on(node_a, lambda: ta.notify("k", 6))
        await saved_by(shared, a, {"k"})
        await b.start()
        await paused_in_a_save(node_a, ta, pause)
        try:
            await eventually(lambda: tb.adopted == 1, timeout=QTIMEOUT)
        finally:
            pause.thaw.set()
        # the save found k's row gone, and wrote none of it: a gives up the 6 b took, keeps its 1
        await eventually(lambda: ta.given_up == 1, timeout=QTIMEOUT)
        state = await on(node_a, ta.state)
        assert state.hold_lapses >= 1 and [(k.key, k.count) for k in state.keys] == [("k", 1)]
        await node_a.run(a.stop())
        await b.stop()
        # what the store holds of k when both are gone: b's 6 and a's 1, each once
        await c.start()
        assert [(k.key, k.count) for k in tc.state().keys] == [("k", 7)]
        assert fired == []
    finally:
        pause.thaw.set()
        await c.stop()
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


async def test_a_node_back_from_a_pause_fires_nothing_another_node_took_before_it_has_asked_the_store(
    shared: str,
) -> None:
    # a notify queued while a was paused (a timer of the application's, due meanwhile) ran first
    # once a was back, before anything had looked at its hold: a fired k with the 9 b had taken
    # up, and b fired them too
    fired: list[str] = []
    node_a, a, ta, b, tb = paused_pair(shared, fired)
    try:
        await node_a.run(a.start())
        await on(node_a, lambda: ta.notify("k", 9))
        await saved_by(shared, a, {"k"})
        await b.start()
        thaw = await node_a.freeze(lambda: None)
        try:
            await eventually(lambda: tb.adopted == 1, timeout=QTIMEOUT)
            node_a.loop.call_soon_threadsafe(ta.notify, "k", 1)
        finally:
            thaw.set()
        await eventually(lambda: ta.given_up == 1, timeout=QTIMEOUT)
        tb.notify("k", 1)
        await eventually(lambda: tb.fired == 1, timeout=QTIMEOUT)
        await tb.drain(timeout=QTIMEOUT)
        # fired once, by b (either node may run it: they share the store's queue)
        assert len(fired) == 1 and await on(node_a, lambda: ta.fired) == 0
        # a keeps its 1, counted after its last save
        assert [(k.key, k.count) for k in (await on(node_a, ta.state)).keys] == [("k", 1)]
    finally:
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


async def test_a_run_that_ends_during_a_save_of_its_key_leaves_the_counts_since_to_the_node_after_a_pause(
    shared: str,
) -> None:
    # the save's answer marked the row as holding the 10 the run had taken off meanwhile: after
    # the pause, a gave up those 10 from the 9 counted since, and the 9 were lost everywhere
    fired: list[str] = []
    gate = threading.Event()
    node_a, a, ta, b, tb = paused_pair(shared, fired, gate)
    armed, paused, thaw = threading.Event(), threading.Event(), threading.Event()
    real = a.store.save_trigger

    async def save_trigger(trigger: str, incarnation: str, keys: Any, forget: Any = (), **kw: Any) -> Any:
        if not (armed.is_set() and "k" in keys and keys["k"].run_id is not None):
            return await real(trigger, incarnation, keys, forget, **kw)
        armed.clear()
        gate.set()  # k's run ends while this save of the row that follows it is under way
        async with asyncio.timeout(QTIMEOUT):
            while (k := ta.state().keys[0]).queued or k.running:
                await asyncio.sleep(0.01)
        taken = await real(trigger, incarnation, keys, forget, **kw)
        ta.notify("k", 9)
        paused.set()
        thaw.wait(QTIMEOUT)  # then the whole node is paused, its loop with it
        return taken

    a.store.save_trigger = save_trigger  # type: ignore[method-assign]
    c = Engine(store=shared, node_id="c", health_interval=None)
    tc = c.trigger("compile", nothing, size_threshold=10)
    try:
        await node_a.run(a.start())
        await b.start()
        armed.set()
        await on(node_a, lambda: ta.notify("k", 10))  # fires k with 10
        assert await asyncio.to_thread(paused.wait, QTIMEOUT)
        try:
            await eventually(lambda: tb.adopted == 1, timeout=QTIMEOUT)
        finally:
            thaw.set()
        # back, a asks the store what is still its own, and saves k again as its own row
        await eventually(lambda: ta.hold_lapses >= 1, timeout=QTIMEOUT)
        await saved_by(shared, a, {"k"})
        await node_a.run(a.stop())
        await b.stop()
        await c.start()
        # 19 notified: 10 fired once (by a; either node may have run it), the 9 since are left
        assert len(fired) == 1 and (ta.fired, tb.fired) == (1, 0)
        assert [(k.key, k.count) for k in tc.state().keys] == [("k", 9)]
    finally:
        thaw.set()
        gate.set()
        await c.stop()
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


@pytest.mark.parametrize("paused", ["idle", "in a save"])
async def test_a_node_stopped_as_soon_as_it_is_back_from_a_pause_writes_back_none_of_what_another_took(
    shared: str, paused: str
) -> None:
    # the usual end of a node that stopped answering: its service manager stops it. The stop's
    # save must not write back the 6 that b took up meanwhile (b would fire them twice). Paused in
    # a save, its stop checked the lapse flag only, which no look had set yet: it asked the store
    # nothing, and the save under way wrote k's row back with the 6 b took
    fired: list[str] = []
    node_a, a, ta, b, tb = paused_pair(shared, fired)
    pause = PausedSave(a)
    thaw = pause.thaw
    try:
        await node_a.run(a.start())
        await on(node_a, lambda: ta.notify("k", 6))
        await saved_by(shared, a, {"k"})
        await b.start()
        if paused == "in a save":
            await paused_in_a_save(node_a, ta, pause)  # with 1 more of k counted
        else:
            thaw = await node_a.freeze(lambda: None)
        try:
            await eventually(lambda: tb.adopted == 1, timeout=QTIMEOUT)
            if paused == "idle":
                # queued while a is paused: they run the moment it is back, before any heartbeat of it
                node_a.loop.call_soon_threadsafe(ta.notify, "k", 1)
            stopping = asyncio.run_coroutine_threadsafe(a.stop(timeout=10), node_a.loop)
        finally:
            thaw.set()
        await asyncio.wrap_future(stopping)
        assert (ta.hold_lapses, ta.given_up) == (1, 1)
        # b takes up what a left at its stop: its 1, with the 6 b holds already, 7 in all
        await eventually(lambda: tb.adopted == 2, timeout=QTIMEOUT)
        assert [(k.key, k.count) for k in tb.state().keys] == [("k", 7)]
        assert tb.fired == 0 and fired == []
    finally:
        thaw.set()
        pause.thaw.set()
        await b.stop()
        await node_a.run(a.stop())
        node_a.close()


async def test_a_process_replaced_under_its_node_id_gives_up_at_its_stop_the_counts_the_later_one_took(
    shared: str, caplog: pytest.LogCaptureFixture
) -> None:
    # replaced, it is never alive again: its stop asked the store nothing and wrote back every
    # count, the 6 the later process took at its start included
    engines = [Engine(store=shared, node_id=node_id, lease_ttl=QTTL, health_interval=None) for node_id in ("a", "a", "r")]
    old, new, reader = engines
    t_old, t_new, t_reader = (e.trigger("compile", nothing, size_threshold=100, save_interval=0.05) for e in engines)
    replaced = Recorder(old, ("node.superseded",))
    try:
        await old.start()
        t_old.notify("k", 6)
        await saved_by(shared, old, {"k"})
        await new.start()
        assert [(k.key, k.count) for k in t_new.state().keys] == [("k", 6)]
        await eventually(lambda: replaced.of("node.superseded"), timeout=QTIMEOUT)
        t_old.notify("k", 1)
        with caplog.at_level(logging.WARNING, logger="taskwatch.triggers"):
            await old.stop()
        assert t_old.given_up == 1 and t_old.fired == 0
        told = [r.getMessage() for r in caplog.records if r.name == "taskwatch.triggers"]
        assert any("replaced this one" in m for m in told) and not any("no heartbeat" in m for m in told), told
        await new.stop()
        # the later process's 6 and the 1 counted here after it took them: 7, each once
        await reader.start()
        assert [(k.key, k.count) for k in t_reader.state().keys] == [("k", 7)]
    finally:
        for engine in engines:
            await engine.stop()


async def test_a_trigger_cut_off_from_postgres_counts_the_lapse_and_fires_nothing_until_the_store_answers(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    # its looks at the hold were made between its requests to the store, and the one under way
    # waited out the outage: it never saw the lapse, and went on firing as if it held its keys
    ran: list[str] = []

    async def compile_key(ctx: TaskContext, key: str) -> None:
        ran.append(key)

    async with StallingProxy(postgres_server.port) as proxy:
        engine = Engine(store=proxy.url(postgres_url), node_id="a", lease_ttl=QTTL, health_interval=None)
        trigger = engine.trigger("compile", compile_key, size_threshold=10, save_interval=0.05)
        await engine.start()
        try:
            trigger.notify("k", 3)
            await saved_by(postgres_url, engine, {"k"})
            proxy.hold()
            try:
                await eventually(lambda: trigger.hold_lapses == 1, timeout=QTIMEOUT)
                trigger.notify("k", 7)  # due: it waits for the store to say k is still this node's
                [k] = trigger.state().keys
                assert (k.count, k.queued, trigger.fired) == (10, False, 0)
            finally:
                proxy.release()
            await trigger.drain(timeout=QTIMEOUT)
            assert ran == ["k"] and trigger.given_up == 0
        finally:
            proxy.release()
            await engine.stop(5)


async def test_a_drain_during_a_lapse_waits_for_a_key_that_came_due_meanwhile(tmp_path: Path) -> None:
    # it waited only for runs queued or running and keys a full queue refused: a key held back
    # until the store answers was neither, and the drain returned before its run was even queued
    db = tmp_path / "lone.db"
    url = f"sqlite:///{db}"
    fired: list[str] = []
    node_a, a, ta, _, _ = paused_pair(url, fired)
    draining, answer = threading.Event(), threading.Event()
    real = a.store.trigger_keys_held

    async def trigger_keys_held(trigger: str, incarnation: str) -> set[str]:
        # the store's answer after the lapse comes once the drain is under way
        await asyncio.to_thread(answer.wait, QTIMEOUT)
        return await real(trigger, incarnation)

    a.store.trigger_keys_held = trigger_keys_held  # type: ignore[method-assign]

    async def drained() -> list[str]:
        await eventually(lambda: ta.hold_lapses == 1, timeout=QTIMEOUT)
        ta.notify("k", 10)
        draining.set()
        await ta.drain(timeout=QTIMEOUT)
        return list(fired)  # the runs done when the drain returned

    try:
        await node_a.run(a.start())
        await on(node_a, lambda: ta.notify("k", 6))
        await saved_by(url, a, {"k"})
        await frozen_until_it_looks_gone(node_a, db, "a", lambda: None)
        done = asyncio.run_coroutine_threadsafe(drained(), node_a.loop)
        try:
            assert await asyncio.to_thread(draining.wait, QTIMEOUT)
        finally:
            answer.set()
        assert await asyncio.wrap_future(done) == ["a:k"]
        assert ta.given_up == 0
    finally:
        answer.set()
        await node_a.run(a.stop())
        node_a.close()


async def test_a_drain_in_a_process_replaced_under_its_node_id_does_not_wait_for_keys_it_never_fires(
    shared: str,
) -> None:
    # such a key fires on the process that replaced it: no retake ever comes here to fire it,
    # and the drain waited for one until the replaced process stopped
    engines = [Engine(store=shared, node_id="a", lease_ttl=QTTL, health_interval=None) for _ in range(2)]
    old, new = engines
    t_old, _ = (e.trigger("compile", nothing, size_threshold=1) for e in engines)
    replaced = Recorder(old, ("node.superseded",))
    try:
        await old.start()
        await new.start()
        await eventually(lambda: replaced.of("node.superseded"), timeout=QTIMEOUT)
        await eventually(lambda: t_old.state().hold_lapses == 1, timeout=QTIMEOUT)
        t_old.notify("k")
        async with asyncio.timeout(QTIMEOUT):
            await t_old.drain()
        assert t_old.fired == 0
    finally:
        await new.stop()
        await old.stop()
