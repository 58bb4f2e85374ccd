"""Supervised workers are checked as tasks are: one that cannot be called as ``fn(ctx)`` is
refused at registration, and the engine's flags and resources are named as set_flag/provide
name them."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import Engine, InProcessLease, InvalidConfiguration, TaskContext, TaskDefinitionError

from .helpers import eventually, stray_tasks, stubborn_leader_engine


def engine_with(**options: object) -> Engine:
    return Engine(health_interval=None, **options)  # type: ignore[arg-type]


async def takes_nothing() -> None: ...


async def needs_a_db(ctx: TaskContext, db: object) -> None: ...


async def needs_a_db_by_keyword(ctx: TaskContext, *, db: object) -> None: ...


async def keywords_only(**kwargs: object) -> None: ...


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        (takes_nothing, "too many positional arguments"),
        (needs_a_db, "missing a required argument: 'db'"),
        # (Python 3.12 names it "a required keyword-only argument")
        (needs_a_db_by_keyword, "missing a required {}argument: 'db'"),
        (keywords_only, "too many positional arguments"),
    ],
)
async def test_a_worker_that_cannot_be_called_with_the_context_alone_is_refused(
    fn: Callable[..., Awaitable[None]], why: str
) -> None:
    engine = engine_with()

    with pytest.raises(TaskDefinitionError) as refused:
        engine.supervised(fn, name="sync_orders")  # type: ignore[arg-type]

    message = str(refused.value)
    assert "supervised worker 'sync_orders'" in message
    assert any(f"cannot be called as {fn.__name__}(ctx) ({why.format(kind)})" in message for kind in ("", "keyword-only "))
    assert f"`async def {fn.__name__}(ctx: TaskContext)`" in message
    # refused before anything is recorded: no worker to crash on every start, the name is free
    assert engine.workers() == []
    assert engine.stats().supervised == {}

    async def sync_orders(ctx: TaskContext, db: object = None) -> None: ...

    engine.supervised(sync_orders)  # a further parameter with a default is fine
    assert [w.name for w in engine.workers()] == ["sync_orders"]


def test_a_plain_function_is_refused_with_what_to_do_about_blocking_code() -> None:
    engine = engine_with()

    def poll(ctx: TaskContext) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"supervised worker 'poll' must be an `async def` function taking \(ctx\).*asyncio\.to_thread"):
        engine.supervised(poll)  # type: ignore[arg-type]
    assert engine.workers() == []


class Poller:
    """A worker kept as an object, as a task can be."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.names: list[str] = []

    async def __call__(self, ctx: TaskContext) -> None:
        self.names.append(ctx.name)
        self.started.set()
        await asyncio.Event().wait()


async def test_an_object_with_an_async_call_runs_as_a_worker_as_it_runs_as_a_task() -> None:
    engine = engine_with()
    poller = Poller()

    assert engine.supervised(poller, name="poller") is poller
    engine.task(Poller(), name="poll_once")  # accepted as a task already: the same for both
    async with engine:
        await asyncio.wait_for(poller.started.wait(), timeout=2.0)
        info = engine.workers()[0]
        assert (info.name, info.state, info.crashes) == ("poller", "running", 0)
    assert poller.names == ["poller"]
    assert not stray_tasks()


def test_an_object_whose_call_cannot_take_the_context_alone_is_refused() -> None:
    engine = engine_with()

    class NeedsDb:
        async def __call__(self, ctx: TaskContext, db: object) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"supervised worker 'needs_db' cannot be called .*'db'"):
        engine.supervised(NeedsDb(), name="needs_db")  # type: ignore[arg-type]
    assert engine.workers() == []


@pytest.mark.parametrize("fn", [Poller(), functools.partial(needs_a_db, db=None)], ids=["object", "partial"])
def test_a_worker_without_a_name_of_its_own_needs_name(fn: Any) -> None:
    # as a task does: a repr (memory address and all) would name it differently in every process
    engine = engine_with()

    with pytest.raises(TaskDefinitionError, match="has no __name__.*give the worker a name="):
        engine.supervised(fn)
    assert engine.workers() == []
    engine.supervised(fn, name="named")
    assert [w.name for w in engine.workers()] == ["named"]


@pytest.mark.parametrize(
    ("options", "shown"),
    [
        ({"flags": {"": True}}, "flag name='': a name must not be empty"),
        ({"flags": {"kg\x00": True}}, "flag name='kg\\x00': it holds the control character"),
        ({"resources": {3: object()}}, "resource name=3: a name must be a str, not int"),
        ({"resources": {"": object()}}, "resource name='': a name must not be empty"),
        ({"resources": {"db\n": object()}}, "resource name='db\\n': it holds the control character"),
    ],
)
def test_the_engine_refuses_flag_and_resource_names_set_flag_and_provide_refuse(
    options: dict[str, dict[Any, Any]], shown: str
) -> None:
    with pytest.raises(InvalidConfiguration) as refused:
        engine_with(**options)
    assert refused.value.where == "Engine()"
    assert shown in str(refused.value)

    # the same name is refused afterwards too, for the same reason
    engine = engine_with()
    [(name, value)] = next(iter(options.values())).items()
    with pytest.raises(InvalidConfiguration, match="a name must|control character"):
        if "flags" in options:
            engine.set_flag(name, value)
        else:
            engine.provide(name, value)
    assert (engine.flags, engine.resources) == ({}, {})


def test_resources_that_are_no_dict_are_refused() -> None:
    with pytest.raises(InvalidConfiguration, match=r"Engine\(\): resources=\['db'\]: a dict of resource name"):
        engine_with(resources=["db"])



# ---------------------------------------------------------------- a leader that steps down hands over after its cleanup


async def test_a_leader_replaced_under_its_node_id_hands_the_lease_over_only_after_its_workers_cleanup(
    tmp_path: Path,
) -> None:
    # stepping down because a newer process took over its node id (or its store went away),
    # the leader's worker is cancelled and cleans up: until that ends, no other node may start
    # the same singleton beside it, so the lease is kept (renewed) and only then released
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    lease = InProcessLease(ttl=0.4, renew_interval=0.05)
    timeline: list[tuple[str, str]] = []
    cleanup_may_end = asyncio.Event()

    def build(node_id: str, with_lease: bool) -> Engine:
        engine = Engine(store=url, node_id=node_id, lease=lease if with_lease else None, lease_ttl=1.0, health_interval=None)

        @engine.supervised(name="poller", leader_only=True)
        async def poller(ctx: TaskContext) -> None:
            timeline.append((node_id, "start"))
            try:
                await asyncio.Event().wait()
            finally:
                await cleanup_may_end.wait()  # finishing its current batch
                timeline.append((node_id, "ended"))

        return engine

    old, follower = build("x", True), build("y", True)
    newer = Engine(store=url, node_id="x", lease_ttl=1.0, health_interval=None)
    replaced: list[Any] = []
    old.bus.add_callback(replaced.append, ["node.superseded"])
    released: list[Any] = []
    old.bus.add_callback(released.append, ["lease.released"])
    await old.start()
    try:
        await follower.start()
        await eventually(lambda: timeline == [("x", "start")], 5)
        await newer.start()
        await eventually(lambda: replaced, 10)
        gave_up = await lease.holder()
        assert gave_up is not None and gave_up.holder == "x", "released while its worker was still cleaning up"

        async def renewed_past_its_expiry_or_taken() -> bool:
            state = await lease.holder()
            return ("y", "start") in timeline or (
                state is not None and state.expires_at > gave_up.expires_at + lease.ttl
            )

        deadline = asyncio.get_running_loop().time() + 5
        while not await renewed_past_its_expiry_or_taken():
            assert asyncio.get_running_loop().time() < deadline, "the lease neither renewed nor taken"
            await asyncio.sleep(0.01)
        assert timeline == [("x", "start")], "the follower started the worker beside the old leader's cleanup"
        assert not old.elector.is_leader

        cleanup_may_end.set()
        await eventually(lambda: ("y", "start") in timeline, 5)
        assert timeline == [("x", "start"), ("x", "ended"), ("y", "start")]
        # said once freed, so a dashboard need not wait for its next look to see it free
        assert [(e.previous_holder, e.term, e.holder) for e in released] == [("x", 1, None)]
    finally:
        cleanup_may_end.set()
        for engine in (newer, follower, old):
            await engine.stop(1.0)


async def test_a_leader_that_steps_down_keeps_the_lease_while_a_cleanup_ignoring_every_cancel_still_runs() -> None:
    # re-cancelled three times over and still going, the old leader's worker is still this
    # node's leader-only code: released then, the lease would start it on the follower beside it
    lease = InProcessLease(ttl=0.4, renew_interval=0.05)
    timeline: list[tuple[str, str]] = []
    swallowed: list[str] = []
    cleanup_may_end = asyncio.Event()

    def build(node_id: str) -> Engine:
        return stubborn_leader_engine(
            node_id, lease, cleanup_may_end, swallowed,
            started=lambda node: timeline.append((node, "start")), ended=lambda node: timeline.append((node, "ended")),
        )  # fmt: skip

    old, follower = build("x"), build("y")
    await old.start()
    try:
        await follower.start()
        await eventually(lambda: timeline == [("x", "start")], 5)
        gave_up = await lease.holder()
        assert gave_up is not None and gave_up.holder == "x"
        old.elector.suspend()  # what the engine does when its store is out of reach
        # every re-cancel has come and gone, and the term has been renewed past a whole ttl since
        await eventually(lambda: len(swallowed) >= 3, 5)

        async def renewed_past_a_ttl() -> bool:
            state = await lease.holder()
            return ("y", "start") in timeline or (state is not None and state.expires_at > gave_up.expires_at + 2 * lease.ttl)

        deadline = asyncio.get_running_loop().time() + 5
        while not await renewed_past_a_ttl():
            assert asyncio.get_running_loop().time() < deadline, "the lease neither renewed nor taken"
            await asyncio.sleep(0.01)
        assert timeline == [("x", "start")], "the follower started the worker beside the old leader's"

        cleanup_may_end.set()
        await eventually(lambda: ("y", "start") in timeline, 5)
        assert timeline == [("x", "start"), ("x", "ended"), ("y", "start")]
    finally:
        cleanup_may_end.set()
        for engine in (follower, old):
            await engine.stop(1.0)
    assert stray_tasks() == set()


# ---------------------------------------------------------------- a lapse of the lease during a backoff


async def test_a_crashing_worker_that_loses_and_regains_leadership_still_waits_out_its_backoff() -> None:
    # a flaky lease store must not turn every dropped renew into a restart without backoff
    # against whatever the worker keeps crashing on
    offset = [0.0]
    lease = InProcessLease(ttl=0.6, renew_interval=0.05, clock=lambda: time.time() + offset[0])
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    terms: list[int] = []
    engine.bus.add_callback(lambda event: terms.append(event.term), ["lease.acquired"])

    @engine.supervised(name="poller", leader_only=True, backoff=30, backoff_max=60)
    async def poller(ctx: TaskContext) -> None:
        raise RuntimeError("the feed is down")

    async with engine:
        await eventually(lambda: engine.workers()[0].state == "backoff", 5)
        owed_until = engine.workers()[0].next_restart_at
        assert owed_until is not None
        offset[0] += 1.0  # the lease lapses, as when renews do not get through
        await eventually(lambda: len(terms) == 2 and engine.workers()[0].state == "backoff", 5)
        worker = engine.workers()[0]
        assert (worker.crashes, worker.restarts) == (1, 0)
        assert worker.next_restart_at is not None and abs(worker.next_restart_at - owed_until) < 1.0


@pytest.mark.parametrize("then", ["engine.stop", "stop_worker"])
async def test_a_worker_winding_down_after_a_lost_leadership_keeps_its_cleanup_when_stopped(then: str) -> None:
    # a second cancel from the stop would land in the middle of the cleanup it is waiting for
    engine = Engine(node_id="a", lease=InProcessLease(ttl=0.5, renew_interval=0.05), health_interval=None)
    said: list[str] = []

    @engine.supervised(name="poller", leader_only=True)
    async def poller(ctx: TaskContext) -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            said.append("cleanup begins")
            try:
                await asyncio.sleep(0.3)  # the cleanup's own work: flushing what it holds
            except asyncio.CancelledError:
                said.append("cleanup cut")
                raise
            said.append("cleanup finished")
            raise

    await engine.start()
    try:
        await eventually(lambda: engine.workers()[0].state == "running" and engine.elector.is_leader, 5)
        engine.elector.suspend()  # what the engine does when its store is out of reach
        await eventually(lambda: said == ["cleanup begins"], 5)
        if then == "stop_worker":
            await engine.stop_worker("poller")
    finally:
        await engine.stop(5.0)
    assert said == ["cleanup begins", "cleanup finished"]
    assert stray_tasks() == set()
