"""The debug-event bus: typed events, bounded subscribers, replay, callbacks, JSON."""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError
from taskwatch.engine import (
    EVENT_KINDS,
    Engine,
    EventBus,
    InvalidConfiguration,
    LoopThreadError,
    MemoryStore,
    RemoteEngine,
    RunError,
    RunRecord,
    RunStatus,
    TaskContext,
    UnknownEventKind,
    event_from_json,
    event_to_json,
)
from taskwatch.engine import events as ev
from taskwatch.engine.bus import Subscription

from .helpers import eventually


def make_engine(**kwargs: object) -> Engine:
    engine = Engine(health_interval=None, **kwargs)  # type: ignore[arg-type]

    @engine.task
    async def noop(ctx: TaskContext) -> None:
        return None

    return engine


async def test_subscriber_reads_events_in_order() -> None:
    engine = make_engine()
    sub = engine.bus.subscribe(kinds=["run."])
    async with engine:
        handle = await engine.submit("noop")
        got = []
        async for event in sub:
            got.append(event)
            if event.kind == "run.succeeded":
                break
    assert [e.kind for e in got] == ["run.submitted", "run.started", "run.succeeded"]
    assert all(e.run_id == handle.id for e in got)
    assert [e.seq for e in got] == sorted(e.seq for e in got)
    assert all(e.node == engine.node_id and e.ts > 0 for e in got)


async def test_iteration_ends_when_the_engine_stops() -> None:
    engine = make_engine()
    sub = engine.bus.subscribe()
    async with engine:
        await (await engine.submit("noop")).wait(2)
    kinds = [e.kind async for e in sub]
    assert kinds[0] == "engine.started" and kinds[-1] == "engine.stopped"


async def test_slow_subscriber_drops_are_counted_and_the_engine_does_not_wait() -> None:
    engine = make_engine(max_queue=5_000)
    slow = engine.bus.subscribe(maxsize=50)  # never read while the runs go through
    fast_seen = []
    engine.bus.add_callback(fast_seen.append, kinds=["run.succeeded"])
    async with engine:
        handles = [await engine.submit("noop") for _ in range(1_000)]
        for h in handles:
            await h.wait(5)
        assert engine.stats().succeeded_total == 1_000
        assert len(fast_seen) == 1_000
        # the slow subscriber kept at most its buffer and counted the rest
        assert slow.pending() == 50
        published_after_subscribe = engine.bus.published
        assert slow.dropped == published_after_subscribe - 50
        assert engine.stats().bus["dropped"] == slow.dropped
        # it reads what it kept, then a notice saying where the gap starts and how long it is
        batch = slow.get_batch()
        assert all(e.kind != "bus.dropped" for e in batch[:50])
        assert batch[0].kind == "engine.started"
        notice = batch[50]
        assert notice.kind == "bus.dropped" and notice.count == slow.dropped
        assert notice.seq == batch[49].seq + 1
        assert len(batch) == 51


async def test_replay_gives_late_subscribers_recent_history() -> None:
    engine = make_engine(replay=100)
    async with engine:
        for _ in range(5):
            await (await engine.submit("noop")).wait(2)
        late = engine.bus.subscribe(replay=6, kinds=["run.succeeded"])
        replayed = late.get_batch()
        assert len(replayed) == 5  # only five matching events exist so far
        assert all(e.kind == "run.succeeded" for e in replayed)
        everything = engine.bus.subscribe(replay=1_000)
        assert len(everything.get_batch()) == engine.bus.published  # below the ring size
        late.close()
        everything.close()


def test_replay_ring_is_bounded() -> None:
    bus = EventBus(node="n", replay=10)
    for i in range(25):
        bus.emit(ev.EngineStarted)
    sub = bus.subscribe(replay=100)
    assert [e.seq for e in sub.get_batch()] == list(range(16, 26))


async def test_callback_errors_are_counted_not_raised() -> None:
    engine = make_engine()

    def broken(event: object) -> None:
        raise RuntimeError("subscriber bug")

    engine.bus.add_callback(broken)
    async with engine:
        run = await (await engine.submit("noop")).wait(2)
    assert run.status is RunStatus.SUCCEEDED
    assert engine.bus.callback_errors >= 3


async def test_unsubscribe_callback_and_close_subscription() -> None:
    engine = make_engine()
    seen: list[object] = []
    unsubscribe = engine.bus.add_callback(seen.append)
    sub = engine.bus.subscribe()
    async with engine:
        unsubscribe()
        sub.close()
        await (await engine.submit("noop")).wait(2)
    assert [e.kind for e in seen] == ["engine.started"]
    assert engine.bus.subscribers == 0


def test_drop_notices_sit_at_each_gap_and_count_within_the_limit() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe(maxsize=2)
    for _ in range(5):
        bus.emit(ev.EngineStarted)  # seq 1, 2 kept; 3, 4, 5 dropped
    assert [e.seq for e in sub.get_batch(limit=1)] == [1]
    bus.emit(ev.EngineStarted)  # seq 6 fits again
    for _ in range(2):
        bus.emit(ev.EngineStarted)  # full again (2 and 6): 7 and 8 dropped
    items = sub.get_batch(limit=10)
    kinds = [(e.kind, e.seq, getattr(e, "count", None)) for e in items]
    assert kinds == [
        ("engine.started", 2, None),
        ("bus.dropped", 3, 3),
        ("engine.started", 6, None),
        ("bus.dropped", 7, 2),
    ]
    assert sub.dropped == 5
    for _ in range(3):
        bus.emit(ev.EngineStarted)
    assert len(sub.get_batch(limit=2)) == 2


async def test_every_waiting_coroutine_wakes() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    first = asyncio.ensure_future(sub.wait(timeout=2))
    second = asyncio.ensure_future(sub.wait(timeout=2))
    await asyncio.sleep(0)
    bus.emit(ev.EngineStarted)
    assert await asyncio.wait_for(asyncio.gather(first, second), 1) == [True, True]


async def test_a_cancelled_or_timed_out_waiter_leaves_the_others_waiting() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    cancelled = asyncio.ensure_future(sub.wait())
    patient = asyncio.ensure_future(sub.wait())
    assert await sub.wait(timeout=0.01) is False  # timed out, nothing published
    cancelled.cancel()
    await asyncio.sleep(0)
    assert cancelled.cancelled() and not patient.done()
    bus.emit(ev.EngineStarted)
    assert await asyncio.wait_for(patient, 1) is True
    sub.get_batch()
    sub.close()
    assert await sub.wait() is False  # closed and drained: no waiting forever


async def test_waiting_subscriber_wakes_on_publish() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    waiter = asyncio.ensure_future(sub.wait(timeout=2))
    await asyncio.sleep(0)
    bus.emit(ev.EngineStarted)
    assert await waiter is True
    assert await sub.wait(timeout=0.01) is True  # still buffered
    sub.get_batch()
    assert await sub.wait(timeout=0.01) is False


def test_every_kind_is_listed_once() -> None:
    assert len(EVENT_KINDS) == len(set(EVENT_KINDS))
    assert {"run.submitted", "run.progress", "run.failed", "health", "lease.acquired"} <= set(EVENT_KINDS)


SAMPLES = [
    ev.RunSubmitted(run_id="r", task="t", params={"a": [1, 2], "b": {"c": None}}, key="k"),
    ev.RunStarted(run_id="r", task="t", attempt=2),
    ev.RunProgressed(run_id="r", task="t", done=1, total=3, message="one"),
    ev.RunRetrying(run_id="r", task="t", attempt=2, delay=0.25, error=RunError(type="E", message="m", traceback="tb")),
    ev.RunSucceeded(run_id="r", task="t", duration=0.5, result={"x": 1.5}),
    ev.RunFailed(run_id="r", task="t", error=RunError(type="E", message="m")),
    ev.RunCancelled(run_id="r", task="t", reason="shutdown", was_running=True),
    ev.EventsDropped(count=3, total=9),
    ev.HealthSample(
        cpu_percent=1.5, rss_bytes=10, threads=2, open_fds=5, loop_lag_ms=0.3,
        running=1, queue_depth=0, queue_depths={"q": 1}, finished_per_s=2.0, failed_per_s=0.0,
    ),
    ev.LeaseAcquired(holder="a", term=3, expires_at=12.5),
]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.kind)
def test_events_round_trip_through_json(event: ev.BaseEvent) -> None:
    stamped = event.model_copy(update={"seq": 42, "ts": 1700000000.123456, "node": "n1"})
    again = event_from_json(event_to_json(stamped))
    assert again == stamped and type(again) is type(stamped)
    json.loads(event_to_json(stamped))


@given(
    seq=st.integers(min_value=0, max_value=2**53),
    ts=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    message=st.text(),
    done=st.floats(allow_nan=False, allow_infinity=False),
)
def test_progress_events_round_trip_losslessly(seq: int, ts: float, message: str, done: float) -> None:
    event = ev.RunProgressed(seq=seq, ts=ts, node="n", run_id="r", task="t", done=done, message=message)
    assert event_from_json(event_to_json(event)) == event


def test_malformed_event_json_is_rejected() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        event_from_json('{"kind": "run.nonsense", "seq": 1}')
    with pytest.raises(ValidationError):
        event_from_json('{"kind": "run.started"}')  # missing run_id and task


async def test_publishing_while_nobody_listens_still_fills_the_ring() -> None:
    engine = make_engine()
    async with engine:
        await (await engine.submit("noop")).wait(2)
        await eventually(lambda: any(e.kind == "run.succeeded" for e in engine.bus.recent()))


def test_posted_events_are_built_once_by_their_first_reader_and_read_the_same_everywhere() -> None:
    from taskwatch.engine.bus import Posted, built

    bus = EventBus(node="n1", replay=10)
    sub = bus.subscribe()
    raw: list[object] = []
    bus.add_callback(raw.append, unbuilt=True)
    bus.post(ev.RunStarted, run_id="r1", task="t", attempt=2)
    [item] = raw
    assert isinstance(item, Posted) and item.kind == "run.started"  # nothing built for the callback
    [event] = sub.get_batch()
    assert built(item) is event  # built once, by the first reader, and shared
    assert (event.seq, event.node, event.run_id, event.attempt) == (1, "n1", "r1", 2)
    assert bus.recent() == [event] and bus.subscribe(replay=5).get_batch() == [event]


def test_an_event_that_cannot_be_built_costs_its_reader_only_itself() -> None:
    from pydantic import ValidationError
    from taskwatch.engine.bus import EventBuffer, Posted, shape_of

    buffer = EventBuffer(maxsize=3)
    bus = EventBus(node="n")
    good = bus.make(ev.RunStarted, run_id="r", task="t")
    bad = Posted(shape_of(ev.RunStarted), {"run_id": "r", "task": "t", "attempt": "not a number"}, 2, 0.0, "n")
    for item in (good, bad, good):
        assert buffer.offer(item)
    with pytest.raises(ValidationError):
        buffer.take()
    assert buffer.pending == 1  # the good event after the bad one is still there to read
    assert buffer.offer(good) and buffer.offer(good)  # and the buffer has its room back
    assert [e.kind for e in buffer.take()] == ["run.started"] * 3


async def test_a_refused_event_takes_no_seq() -> None:
    bus = EventBus()
    sub = bus.subscribe()
    bus.emit(ev.EngineStarted)
    with pytest.raises(ValidationError):
        bus.emit(ev.RunProgressed, run_id="r", task="t", done="not a number")
    bus.emit(ev.EngineStarted)
    assert [e.seq for e in sub.get_batch()] == [1, 2] and bus.last_seq == 2 and sub.dropped == 0


@pytest.mark.parametrize("fields", [{"done": float("nan")}, {"done": 1.0, "total": float("inf")}])
async def test_a_non_finite_progress_amount_is_refused_as_every_non_finite_number_is(fields: dict[str, float]) -> None:
    # progress amounts are declared finite, so pydantic refused them first, with its own error
    bus = EventBus()
    sub = bus.subscribe()
    with pytest.raises(InvalidConfiguration, match="RunProgressed.(done|total)=.*JSON has no NaN or infinity"):
        bus.emit(ev.RunProgressed, run_id="r", task="t", **fields)
    with pytest.raises(InvalidConfiguration, match="RunSucceeded.duration=nan"):
        bus.emit(ev.RunSucceeded, run_id="r", task="t", duration=float("nan"))
    bus.emit(ev.EngineStarted)
    assert [e.seq for e in sub.get_batch()] == [1] and bus.last_seq == 1


async def test_callbacks_see_events_in_seq_order_when_a_callback_publishes() -> None:
    bus = EventBus()
    seen: list[int] = []

    def chain(event: ev.BaseEvent) -> None:
        if event.kind == "engine.started":
            bus.emit(ev.EngineStopping, timeout=1.0)  # published while this one is handed out

    bus.add_callback(chain)
    bus.add_callback(lambda event: seen.append(event.seq))
    bus.emit(ev.EngineStarted)
    bus.emit(ev.EngineStarted)
    assert seen == [1, 2, 3, 4]


async def test_every_event_and_record_the_engine_makes_reads_exactly_as_a_validated_one() -> None:
    # run events are put together from the engine's own fields without validating them
    # again: each must hold every field, of the very type validation would give it (a
    # replaced clock of whole seconds included)
    class Params(BaseModel):
        n: int = 1

    # the engine's clock and its store's, both replaced by clocks of whole seconds
    engine = Engine(health_interval=None, clock=lambda: 1_700_000_000, store=MemoryStore(clock=lambda: 1_700_000_001))
    gate = asyncio.Event()

    @engine.task(retries=1, backoff=0)
    async def flaky(ctx: TaskContext, params: Params) -> dict[str, int]:
        if params.n < 0:
            raise ValueError("negative")
        await gate.wait()
        return {"doubled": 2 * params.n}

    sub = engine.bus.subscribe(kinds=["run."])
    async with engine:
        ok = await engine.submit("flaky", {"n": 2}, key="k")
        bad = await engine.submit("flaky", {"n": -1})
        running = await engine.submit("flaky", {"n": 3})
        await eventually(lambda: engine.get(running.id).status is RunStatus.RUNNING)
        await engine.cancel(running.id)
        gate.set()
        assert (await ok.wait()).result == {"doubled": 4}
        assert (await bad.wait()).status is RunStatus.FAILED
    events = sub.get_batch()
    kinds = {e.kind for e in events}
    assert {"run.submitted", "run.started", "run.retrying", "run.failed", "run.succeeded", "run.cancelled"} <= kinds
    for event in events:
        fields = type(event).model_fields
        again = type(event).model_validate(event.model_dump())
        assert set(event.__dict__) == set(fields), event
        assert again == event and event_from_json(event_to_json(event)) == event
        assert {n: type(getattr(event, n)) for n in fields} == {n: type(getattr(again, n)) for n in fields}, event
        assert "kind" not in event.model_fields_set
    # run records are put together the same way: each reads as a validated one, and its
    # params are its own (changing them changes nothing in the engine)
    records = [engine.get(h.id) for h in (ok, bad, running)] + list(engine.runs())
    records += [await ok.wait(), await bad.wait()]
    for record in records:
        fields = type(record).model_fields
        again = RunRecord.model_validate(record.model_dump())
        assert again == record and set(record.__dict__) == set(fields)
        assert {n: type(getattr(record, n)) for n in fields} == {n: type(getattr(again, n)) for n in fields}, record
    record = engine.get(ok.id)
    record.params["n"] = 99
    assert engine.get(ok.id).params == {"n": 2}


async def test_every_event_the_engine_posts_for_a_run_gives_every_field() -> None:
    # a posted event given fewer fields than its class has is validated when read, a third
    # of a run's cost: a field added to an event class must be given where the engine posts it
    from taskwatch.engine.bus import _STAMPED, Posted

    class Params(BaseModel):
        n: int

    engine = Engine(health_interval=None)
    short: list[str] = []

    def check(item: object) -> None:
        if type(item) is Posted and item.fields is not None and len(item.fields) + len(_STAMPED) != item.shape.size:
            short.append(item.kind)

    @engine.task(retries=1, backoff=0)
    async def job(ctx: TaskContext, params: Params) -> int:
        if params.n < 0 and ctx.attempt == 1:
            raise ValueError("once")
        if params.n < -1:
            raise ValueError("always")
        return params.n

    engine.bus.add_callback(check, unbuilt=True)
    async with engine:
        for n in (1, -1, -2):
            await (await engine.submit("job", {"n": n})).wait(5)
        slow = await engine.submit("job", {"n": 5})
        await engine.cancel(slow.id)
    assert short == []


@pytest.mark.parametrize(
    ("kinds", "said"),
    [
        (["queue.*"], "did you mean 'queue.'?"),
        (["queue.jobfailed"], "did you mean 'queue.job_failed'?"),
        (["run"], "did you mean 'run.'?"),
        (["nothing."], "no event has kind 'nothing.'"),
        ("run.", "pass ['run.']"),
        ([5], "kinds holds 5"),
        ([], "kinds=[] names no kind"),
    ],
)
async def test_a_kinds_filter_that_could_match_nothing_is_refused(kinds: object, said: str) -> None:
    # it would deliver nothing, silently: a typo or a glob must say so at once
    bus = EventBus(node="n")
    with pytest.raises(UnknownEventKind, match=re.escape(said)):
        bus.subscribe(kinds=kinds)  # type: ignore[arg-type]
    with pytest.raises(UnknownEventKind, match=re.escape(said)):
        bus.add_callback(print, kinds)  # type: ignore[arg-type]
    assert bus.stats()["subscribers"] == 0
    got: list[str] = []
    bus.add_callback(lambda e: got.append(e.kind), ["queue.", "run.failed", "health"])
    bus.emit(ev.QueuePaused, queue="q", depth=0)
    assert got == ["queue.paused"]


def test_the_bus_counts_a_dropped_drop_notice_as_the_events_it_stood_for() -> None:
    # a relay's notice that 40 events were lost upstream, dropped here too: the subscription and
    # the bus's own total both count the 40 (the bus once counted 1)
    bus = EventBus(node="n")
    sub = bus.subscribe(maxsize=1)
    bus.emit(ev.EngineStarted)  # fills the buffer
    bus.publish(ev.EventsDropped(node="far", count=40, total=40))
    bus.emit(ev.EngineStarted)
    assert sub.dropped == 41
    assert bus.stats()["dropped"] == 41


def test_a_snapshot_covers_only_the_part_of_a_run_of_losses_before_it() -> None:
    from taskwatch.engine.bus import EventBuffer

    # what a connection's buffer holds when its snapshot (taken at seq 20) arrives: an event, a
    # notice from the engine of 10 lost from seq 12, an event, then 8 lost here from seq 23
    buffer = EventBuffer(maxsize=2)
    buffer.offer(ev.EngineStarted(seq=11, ts=0.0, node="n"))
    buffer.offer(ev.EventsDropped(seq=12, ts=0.0, node="n", count=10, total=10))
    for seq in range(23, 31):
        buffer.offer(ev.EngineStarted(seq=seq, ts=0.0, node="n"))
    buffer.discard_through(20)
    left = buffer.take()
    # the losses after seq 20 are still announced, from seq 21 on; seq 11 is covered
    assert [(e.kind, e.seq, getattr(e, "count", None)) for e in left] == [
        ("bus.dropped", 21, 1), ("bus.dropped", 23, 8)
    ]
    assert buffer.dropped == 8  # lost all the same


def test_a_callback_unsubscribing_itself_or_another_costs_no_other_callback_an_event() -> None:
    bus = EventBus(node="n")
    seen: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    unsubscribe: dict[str, Any] = {}

    def make(name: str) -> Any:
        def on_event(event: Any) -> None:
            seen[name].append(event.seq)
            if name == "a":
                unsubscribe["a"]()  # once is enough: it goes on its first event
            if name == "b" and event.seq == 2:
                unsubscribe["c"]()  # from the next event on

        return on_event

    for name in seen:
        unsubscribe[name] = bus.add_callback(make(name))
    for _ in range(3):
        bus.emit(ev.EngineStarted, backend="asyncio")
    assert seen == {"a": [1], "b": [1, 2, 3], "c": [1, 2]}


def test_recent_gives_the_newest_events_and_refuses_a_limit_that_is_no_count() -> None:
    from taskwatch.engine import InvalidConfiguration

    bus = EventBus(node="n", replay=10)
    for _ in range(4):
        bus.emit(ev.EngineStarted, backend="asyncio")
    assert [e.seq for e in bus.recent()] == [1, 2, 3, 4]
    assert [e.seq for e in bus.recent(2)] == [3, 4]
    assert bus.recent(0) == []
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(InvalidConfiguration, match="limit="):
            bus.recent(bad)  # type: ignore[arg-type]


# ---------------------------------------------------------------- what no reader could take


class _OwnEvent(ev.BaseEvent):
    kind: Literal["my.event"] = "my.event"
    x: int = 0


class _LookAlike(ev.BaseEvent):
    # the kind of RunProgressed without its fields: a reader would decode it as one, and fail
    kind: Literal["run.progress"] = "run.progress"


@pytest.mark.parametrize(
    ("cls", "said"),
    [
        (_OwnEvent, "_OwnEvent has kind 'my.event', which is not one of the engine's event kinds"),
        (_LookAlike, "_LookAlike has the kind 'run.progress' of RunProgressed without being a RunProgressed"),
        (ev.RunEvent, "RunEvent has no kind"),
        ("run.progress", "'run.progress' is no event class"),
    ],
)
def test_emit_refuses_an_event_class_no_attached_client_could_read(cls: Any, said: str) -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    with pytest.raises(InvalidConfiguration, match=re.escape(said)) as caught:
        bus.emit(cls, run_id="r", task="t")
    assert "nothing was published" in str(caught.value)
    if isinstance(cls, type):
        assert "or keep events of your own on an EventBus() of your own" in str(caught.value)
        with pytest.raises(InvalidConfiguration, match=re.escape(said)):
            bus.publish(cls(run_id="r", task="t"))
    assert bus.last_seq == 0 and sub.get_batch() == [] and bus.recent() == []
    bus.emit(ev.EngineStarted)
    assert [e.seq for e in sub.get_batch()] == [1]  # no hole where the refused ones were


def test_emit_escapes_lone_surrogates_as_progress_does_and_refuses_nan_before_any_seq() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    event = bus.emit(ev.RunProgressed, run_id="r", task="t\udcfe", message="bad\udcff é")
    assert (event.task, event.message) == ("t\\udcfe", "bad\\udcff é")
    assert event_from_json(event_to_json(event)) == event  # a reader takes it as it is
    recovered = ev.RunRecovered(run_id="r", task="t", action="requeued", reason="gone\udcff", attempt=2, lost_count=1)
    assert bus.publish(recovered).reason == "gone\\udcff"  # type: ignore[union-attr]
    refused: list[tuple[type[ev.BaseEvent], str, dict[str, Any]]] = [
        (ev.EngineStopping, "timeout", {"timeout": float("nan")}),
        (ev.StoreReachable, "seconds", {"store": "s", "seconds": float("inf")}),
        (ev.PeriodicResumed, "next_due", {"name": "p", "next_due": "-inf"}),  # pydantic reads it as a float
    ]
    for cls, name, fields in refused:
        with pytest.raises(InvalidConfiguration, match=rf"{cls.__name__}\.{name}=.*JSON has no NaN or infinity"):
            bus.emit(cls, **fields)
    assert [e.seq for e in sub.get_batch()] == [1, 2] and bus.last_seq == 2


def test_emit_refuses_a_nested_value_no_json_can_carry_before_any_seq() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    error = ev.RunError(type="E", message="m")
    refused: list[tuple[type[ev.BaseEvent], str, dict[str, Any]]] = [
        (ev.RunSucceeded, "result", {"run_id": "r", "task": "t", "result": {"text": "x\udcff"}}),
        (ev.RunSucceeded, "result", {"run_id": "r", "task": "t", "result": [1.0, float("nan")]}),
        (ev.RunSubmitted, "params", {"run_id": "r", "task": "t", "params": {"when": object()}}),
        (ev.QueueJobFailed, "job", {"queue": "q", "job": {"\udcff": 1}, "error": error}),
    ]
    for cls, name, fields in refused:
        with pytest.raises(InvalidConfiguration, match=rf"{cls.__name__}\.{name} holds a value JSON cannot carry"):
            bus.emit(cls, **fields)
        with pytest.raises(InvalidConfiguration, match=rf"{cls.__name__}\.{name} holds a value JSON cannot carry"):
            bus.publish(cls.model_construct(**fields))
    assert bus.last_seq == 0 and sub.get_batch() == []
    kept = bus.emit(ev.QueueJobFailed, queue="q", job={"text": "é", "n": [1.5]}, error=error)
    assert [e.seq for e in sub.get_batch()] == [1] and event_from_json(event_to_json(kept)) == kept


async def test_an_event_no_json_can_carry_never_cuts_off_an_attached_client(tmp_path: Path) -> None:
    # once, one such event made the server's event pump raise: every client was disconnected
    # without a reason and got nothing more
    engine = make_engine()
    async with engine:
        server = await engine.serve(str(tmp_path / "e.sock"), announce=False)
        remote = RemoteEngine(server.address, timeout=5)
        try:
            await remote.connect()
            engine.bus.emit(ev.RunProgressed, run_id="r", task="t", message="bad\udcff")
            with pytest.raises(InvalidConfiguration):
                engine.bus.emit(_OwnEvent, x=1)  # a client would refuse it and drop its connection
            # posted unchecked, as only the engine's own values are: the server sends a drop notice in its place
            engine.bus.post(ev.RunSucceeded, run_id="r", task="t", from_store=False, result={"a": "x\udcff"})
            unencodable_seq = engine.bus.last_seq
            handle = await engine.submit("noop")
            await handle.wait()
            got: list[Any] = []

            async def read() -> None:
                async for event in remote.events():
                    got.append(event)
                    if event.kind == "run.succeeded" and event.run_id == handle.id:
                        return

            await asyncio.wait_for(read(), 5)
            assert remote.connected and remote.close_reason is None
            progress = next(e for e in got if e.kind == "run.progress")
            assert progress.message == "bad\\udcff"
            notice = next(e for e in got if e.seq == unencodable_seq)
            assert notice.kind == "bus.dropped" and notice.count == 1
            assert [e.kind for e in got if e.kind.startswith("run.") and e.run_id == handle.id] == [
                "run.submitted", "run.started", "run.succeeded"
            ]
            assert server.stats()["events_unencodable"] == 1
        finally:
            await remote.close()
            await server.stop()


# ---------------------------------------------------------------- subscribe's options


def test_a_replay_larger_than_the_buffer_keeps_the_newest_events_and_drops_nothing() -> None:
    bus = EventBus(node="n", replay=100)
    for _ in range(20):
        bus.emit(ev.EngineStarted)
    sub = bus.subscribe(replay=20, maxsize=3)
    assert [e.seq for e in sub.get_batch()] == [18, 19, 20]
    assert sub.dropped == 0 and bus.stats()["dropped"] == 0
    bus.emit(ev.EngineStarted)  # and the buffer takes live events again
    assert [e.seq for e in sub.get_batch()] == [21]


@pytest.mark.parametrize(
    ("options", "said"),
    [
        ({"maxsize": "10"}, "maxsize='10'"),
        ({"maxsize": True}, "maxsize=True"),
        ({"maxsize": 1.5}, "maxsize=1.5"),
        ({"replay": "5"}, "replay='5'"),
        ({"replay": -1}, "replay=-1"),
        ({"replay": False}, "replay=False"),
    ],
)
def test_subscribe_refuses_options_that_are_no_counts(options: dict[str, Any], said: str) -> None:

    bus = EventBus(node="n")
    bus.emit(ev.EngineStarted)
    with pytest.raises(InvalidConfiguration, match=re.escape(f"bus.subscribe(): {said}")):
        bus.subscribe(**options)
    assert bus.subscribers == 0
    bus.emit(ev.EngineStarted)
    assert bus.stats()["dropped"] == 0


# ---------------------------------------------------------------- threads, and changes during a publish


async def test_an_emit_from_another_thread_is_refused_while_the_engine_runs_and_takes_no_seq() -> None:
    engine = Engine(health_interval=None)
    async with engine:
        before = engine.bus.last_seq
        with pytest.raises(LoopThreadError, match="call_soon_threadsafe"):
            await asyncio.to_thread(engine.bus.emit, ev.PeriodicPaused, name="p")
        assert engine.bus.last_seq == before
        event = ev.PeriodicPaused(seq=0, ts=0.0, node="x", name="p")
        with pytest.raises(LoopThreadError):
            await asyncio.to_thread(engine.bus.publish, event)
        assert engine.bus.last_seq == before
        # on its loop, as the message says
        engine.bus.emit(ev.PeriodicPaused, name="p")
        assert engine.bus.last_seq == before + 1


def test_a_published_event_with_a_nan_time_is_refused() -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    event = ev.PeriodicPaused(seq=0, ts=float("nan"), node="n", name="p")
    with pytest.raises(InvalidConfiguration, match="ts=nan"):
        bus.publish(event)
    assert bus.last_seq == 0 and sub.get_batch() == []


def test_a_callback_added_while_an_event_is_handed_out_gets_the_events_after_it() -> None:
    bus = EventBus(node="n")
    got: list[tuple[str, int]] = []

    def late(event: Any) -> None:
        got.append(("late", event.seq))

    def registrar(event: Any) -> None:
        got.append(("registrar", event.seq))
        if event.seq == 1:
            bus.add_callback(late)

    bus.add_callback(registrar)
    for _ in range(2):
        bus.emit(ev.PeriodicPaused, name="p")
    assert got == [("registrar", 1), ("registrar", 2), ("late", 2)]


async def test_subscriptions_closed_from_another_thread_make_no_other_subscriber_miss_an_event() -> None:
    # a close removed its subscription from the very list a publish was going over, and the
    # next subscriber in it missed that event, uncounted
    engine = Engine(health_interval=None)
    async with engine:
        bus = engine.bus
        doomed: list[Subscription] = []
        watchers: list[Subscription] = []
        for i in range(1, 401):
            doomed.append(bus.subscribe(maxsize=10))
            if i % 10 == 0:  # among them: any close before one of these shifts it in the list
                watchers.append(bus.subscribe(maxsize=1_000_000))
        first = bus.last_seq + 1

        def close_all() -> None:
            for sub in doomed:
                sub.close()
                time.sleep(0)  # lets the loop's thread publish between two closes

        closing = asyncio.create_task(asyncio.to_thread(close_all))
        emitted = 0
        # bounded: the closes are slow to get the GIL from this busy thread, and events
        # piling up by the million would make garbage collection the bottleneck
        while not closing.done() and emitted < 20_000:
            for _ in range(50):
                bus.emit(ev.PeriodicPaused, name="p")
            emitted += 50
            await asyncio.sleep(0)
        await closing
        last = bus.last_seq
        for watcher in watchers:
            seqs = [e.seq for e in watcher.get_batch()]
            assert watcher.dropped == 0
            assert seqs == list(range(first, last + 1))


@pytest.mark.parametrize("timeout", [float("nan"), "1", True])
async def test_a_subscription_wait_refuses_a_timeout_that_is_no_number_of_seconds(timeout: Any) -> None:
    # a NaN waited for good; "1" failed later with a plain TypeError
    bus = EventBus(node="n")
    sub = bus.subscribe()
    with pytest.raises(InvalidConfiguration, match="timeout="):
        await sub.wait(timeout)
    bus.emit(ev.PeriodicPaused, name="p")
    assert await sub.wait(0) and [e.seq for e in sub.get_batch()] == [1]


@pytest.mark.parametrize("limit", [-1, "2", 1.5])
def test_get_batch_refuses_a_limit_that_is_no_count_and_takes_nothing(limit: Any) -> None:
    bus = EventBus(node="n")
    sub = bus.subscribe()
    bus.emit(ev.PeriodicPaused, name="p")
    with pytest.raises(InvalidConfiguration, match="limit="):
        sub.get_batch(limit)
    assert [e.seq for e in sub.get_batch()] == [1]


def test_a_callback_that_cannot_be_called_or_kinds_that_are_no_list_are_refused_where_given() -> None:
    bus = EventBus(node="n")
    with pytest.raises(InvalidConfiguration, match="not callable"):
        bus.add_callback("print")  # type: ignore[arg-type]
    with pytest.raises(UnknownEventKind, match="takes a list of kinds"):
        bus.subscribe(kinds=5)  # type: ignore[arg-type]
    assert bus.subscribers == 0
    bus.emit(ev.PeriodicPaused, name="p")
    assert bus.callback_errors == 0


# ---------------------------------------------------------------- from other threads, and across a restart


def test_a_subscription_made_from_another_thread_misses_and_repeats_no_event() -> None:
    """``subscribe(replay=...)`` from a thread while the engine's loop publishes: the replay was
    picked there and the subscription registered after it, so events published in between were
    lost (a hole in ``seq`` no drop notice announced) or given twice."""
    engine = Engine(health_interval=None)

    @engine.task
    async def chatty(ctx: TaskContext) -> None:
        i = 0
        while True:
            i += 1
            await ctx.progress(i, None, "x")
            if i % 50 == 0:
                await asyncio.sleep(0)

    bg = engine.start_background()
    try:
        for _ in range(4):
            bg.submit("chatty")
        bad: list[str] = []
        for attempt in range(300):
            sub = engine.bus.subscribe(replay=1000, maxsize=1_000_000)
            for _ in range(3):
                time.sleep(0)  # lets the loop's thread publish after the subscription
            got = bg.call(lambda e: sub.get_batch())  # read on the engine's loop
            sub.close()
            seqs = [e.seq for e in got]
            assert sub.dropped == 0 and all(e.kind != "bus.dropped" for e in got)
            if seqs != list(range(seqs[0], seqs[0] + len(seqs))):
                bad.append(f"subscription {attempt}: {[b - a for a, b in zip(seqs, seqs[1:]) if b - a != 1][:3]}")
        assert bad == []
    finally:
        bg.stop(5)


def test_a_subscription_closed_from_another_thread_ends_its_reader_on_the_engines_loop() -> None:
    """The close woke the reader's future from the closing thread: never called back on its
    loop (in asyncio's debug mode it raised in ``close()``), the reader neither ended nor
    could be cancelled, and held the engine's stop."""
    engine = Engine(health_interval=None)
    bg = engine.start_background()
    try:
        bg.call(lambda e: asyncio.get_running_loop().set_debug(True))  # it checks every call's thread
        sub = engine.bus.subscribe()
        # in a list: an awaitable answer would be awaited by the call
        [reading] = bg.call(lambda e: [asyncio.ensure_future(_read_all(sub))])
        bg.call(lambda e: None)  # shipped after the reader's first step: it waits now
        sub.close()
        seen = bg.call(lambda e: asyncio.wait_for(asyncio.shield(reading), 10))
        assert seen == []
    finally:
        bg.stop(5)


async def _read_all(sub: Subscription) -> list[Any]:
    return [event async for event in sub]


async def test_a_callback_raising_cancelled_error_is_counted_and_the_engine_goes_on() -> None:
    """A callback reading a cancelled future's result raises ``CancelledError``, which went
    through the bus: the submit raised it although its run was queued (and ran), or a run's
    start stopped half way, its run left ``running`` with nothing executing it."""
    engine = Engine(health_interval=None)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    gone = asyncio.get_running_loop().create_future()
    gone.cancel()

    def reads_a_cancelled_future(event: Any) -> None:
        gone.result()

    engine.bus.add_callback(reads_a_cancelled_future, ["run.submitted", "run.started"])
    async with engine:
        record = await (await engine.submit("quick")).wait(10)
        stats = engine.stats()
    assert (record.status, record.result) == (RunStatus.SUCCEEDED, 1)
    assert engine.bus.callback_errors == 2 and stats.by_status["running"] == 0


async def test_a_subscription_made_while_the_engine_is_stopped_is_fed_by_its_next_start() -> None:
    """``sub = engine.bus.subscribe(); await engine.start()`` works for the first start; after a
    stop the same code got a subscription ended at once, which missed every event, silently."""
    engine = Engine(health_interval=None)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    for start in (1, 2):
        sub = engine.bus.subscribe()
        async with engine:
            await (await engine.submit("quick")).wait(10)
        kinds = [e.kind for e in sub.get_batch() if e.kind.startswith("run.")]
        assert kinds == ["run.submitted", "run.started", "run.succeeded"], f"start {start}"
        assert sub.closed  # the stop ended it, as it ends every subscription


def test_a_subscription_made_from_another_thread_while_the_loop_is_blocked_is_had_at_once() -> None:
    """A task blocking the engine's loop held a subscribe from another thread for 5 s, then
    failed it with a TimeoutError: the registration is the loop's to make, not to wait for."""
    engine = Engine(health_interval=None)

    @engine.task
    async def quick(ctx: TaskContext) -> int:
        return 1

    bg = engine.start_background()
    gate = threading.Event()
    try:
        bg.loop.call_soon_threadsafe(gate.wait)  # blocking code on the engine's loop
        sub = engine.bus.subscribe(kinds=["run."])  # the loop is held meanwhile
        gate.set()
        bg.submit("quick").wait(10)
        kinds = [e.kind for e in bg.call(lambda e: sub.get_batch())]
        assert kinds == ["run.submitted", "run.started", "run.succeeded"]
    finally:
        gate.set()
        bg.stop(5)
