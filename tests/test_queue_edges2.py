"""Queue edges: jobs that would not read back from the store as put, and a queue awaited on
another event loop than the engine's.

- a job model whose job would reach the handler as other values once read back from the
  store (a ``SecretStr`` is stored masked, a field with ``exclude=True`` left out) is
  refused at put with :class:`InvalidJob` naming the field and why, on every store, and
  nothing is queued, stored, or handled after a restart; a model that reads back as put
  (an alias, a tuple, an aware datetime) is still accepted and read back equal;
- ``await put()``, ``join()`` and ``purge()`` awaited on the application's loop while
  the engine runs on its own (``start_background()``, a notebook) behave as on the
  engine's loop: a join returns once the work is done, a put waiting for room returns
  once room frees, a durable put returns once its job is committed or raises the
  store's error, and a caller cancelled on its loop queues nothing.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from pydantic.dataclasses import dataclass as pydantic_dataclass
from taskwatch.engine import BackgroundEngine, Engine, EngineNotRunning, InvalidJob, StoreBusy

from .helpers import eventually

#: generous bounds for a loaded machine; a passing run takes a fraction of them
TIMEOUT = 10.0


# ---------------------------------------------------------------- jobs that would not read back as put


class Mail(BaseModel):
    to: str
    api_token: SecretStr
    priority: int = Field(default=0, exclude=True)


class Shipment(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    order_id: str = Field(alias="orderId")
    size: tuple[int, int]
    due: dt.datetime


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str | None]:
    if request.param == "memory":
        yield None
    elif request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'q.db'}"
    else:
        yield request.getfixturevalue("postgres_url")


def _engine(store: str | None) -> Engine:
    if store is None:
        return Engine(health_interval=None)
    return Engine(store=store, node_id="n1", health_interval=None)


async def test_a_job_whose_secret_or_excluded_field_would_not_survive_the_store_is_refused_at_put(
    store: str | None,
) -> None:
    handled: list[Mail] = []

    async def send(job: Mail) -> None:
        handled.append(job)

    engine = _engine(store)
    queue = engine.queue("mail", send)
    async with engine:
        with pytest.raises(InvalidJob) as refused:
            await queue.put({"to": "a@x", "api_token": "real-token", "priority": 7})
        with pytest.raises(InvalidJob):
            queue.put_nowait(Mail(to="b@x", api_token=SecretStr("real-token")))
        info = queue.info()
    message = str(refused.value)
    assert "nothing was queued" in message
    assert "api_token: a secret's JSON dump is masked" in message
    assert "priority: excluded from dumps (exclude=True)" in message
    assert {e["loc"] for e in refused.value.errors} == {("api_token",), ("priority",)}
    assert (info.accepted, info.depth, info.processed) == (0, 0, 0)
    assert handled == []
    if store is None:
        return
    # nothing was stored either: a restart has no job to hand the handler (masked)
    engine = _engine(store)
    queue = engine.queue("mail", send)
    async with engine:
        await queue.join(timeout=TIMEOUT)
        assert queue.info().adopted == 0
    assert handled == []


async def test_a_job_model_that_reads_back_as_put_is_accepted_and_read_back_equal(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'q.db'}"
    job = Shipment(orderId="o1", size=(2, 3), due=dt.datetime(2024, 5, 1, 12, tzinfo=dt.timezone(dt.timedelta(hours=2))))
    got: list[Any] = []
    held = asyncio.Event()

    async def ship_it(shipment: Shipment) -> None:
        got.append(shipment)
        held.set()
        await asyncio.Event().wait()  # still running when the first engine stops: kept for the next

    engine = _engine(db)
    queue = engine.queue("ship", ship_it)
    async with engine:
        await queue.put(job)
        await asyncio.wait_for(held.wait(), TIMEOUT)
        await engine.stop(timeout=0.1)

    async def done(shipment: Shipment) -> None:
        got.append(shipment)

    engine = _engine(db)
    queue = engine.queue("ship", done)
    async with engine:
        await queue.join(timeout=TIMEOUT)
    assert got == [job, job]
    assert isinstance(got[1], Shipment)


# ---------------------------------------------------------------- awaited on another loop than the engine's


@pytest.fixture
def stoppers() -> Iterator[list[BackgroundEngine]]:
    started: list[BackgroundEngine] = []
    yield started
    for bg in started:
        bg.stop(timeout=5)


def _gated(engine: Engine, name: str, **options: Any) -> tuple[Any, asyncio.Event, list[Any]]:
    """A queue whose handler holds each job until ``gate`` is set (from any thread, via the engine's loop)."""
    gate = asyncio.Event()
    handled: list[Any] = []

    async def handler(job: Any) -> None:
        await gate.wait()
        handled.append(job)

    return engine.queue(name, handler, **options), gate, handled


def _open(engine: Engine, gate: asyncio.Event) -> None:
    loop = engine.loop
    assert loop is not None
    loop.call_soon_threadsafe(gate.set)


def test_join_on_another_loop_returns_once_the_work_is_done(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, gate, handled = _gated(engine, "q")
    stoppers.append(engine.start_background())

    async def app() -> None:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        join = asyncio.ensure_future(queue.join())
        await asyncio.sleep(0)  # the join is waiting before the job may end
        _open(engine, gate)
        started = time.monotonic()
        await asyncio.wait_for(join, TIMEOUT)
        # before: answered only when something else woke this loop (here the wait_for's timer)
        assert time.monotonic() - started < TIMEOUT / 2

    asyncio.run(app())
    assert handled == [1]


def test_put_on_another_loop_returns_as_soon_as_room_frees(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, gate, handled = _gated(engine, "q", concurrency=1, maxsize=1)
    stoppers.append(engine.start_background())

    async def app() -> None:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        queue.put_nowait(2)  # full now
        put = asyncio.ensure_future(queue.put(3, timeout=600))
        await asyncio.sleep(0)  # the put is waiting for room before any frees
        _open(engine, gate)
        started = time.monotonic()
        # the put may wait up to 600 s: it is answered once room frees, not when this loop
        # happens to wake (before: the wait_for's timer)
        await asyncio.wait_for(put, TIMEOUT)
        assert time.monotonic() - started < TIMEOUT / 2
        await asyncio.wait_for(queue.join(), TIMEOUT)

    asyncio.run(app())
    assert handled == [1, 2, 3]


def test_a_put_on_another_loop_cancelled_by_its_caller_queues_nothing(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, gate, handled = _gated(engine, "q", concurrency=1, maxsize=1)
    stoppers.append(engine.start_background())

    async def app() -> None:
        queue.put_nowait(1)
        await eventually(lambda: queue.in_flight == 1, TIMEOUT)
        queue.put_nowait(2)
        # the caller gives up while the put waits for room (on the engine's loop by then, or not yet)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(queue.put(3, timeout=600), 0.3)
        _open(engine, gate)
        await asyncio.wait_for(queue.join(), TIMEOUT)

    asyncio.run(app())
    assert handled == [1, 2]
    assert queue.info().accepted == 2


def test_a_durable_put_on_another_loop_raises_the_stores_error_and_returns_once_committed(
    tmp_path: Path, stoppers: list[BackgroundEngine]
) -> None:
    db = tmp_path / "q.db"
    engine = Engine(store=f"sqlite:///{db}?busy_timeout=200", node_id="n1", health_interval=None)
    queue, _gate, _handled = _gated(engine, "q")
    bg = engine.start_background()
    stoppers.append(bg)
    bg.pause_queue("q")  # no consumer takes the job: the put waits for its own write
    lock = sqlite3.connect(db, isolation_level=None, timeout=0)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the store is busy past its busy_timeout

        async def refused() -> None:
            with pytest.raises(StoreBusy):
                await asyncio.wait_for(queue.put({"i": 1}), TIMEOUT)  # before: returned at once

        asyncio.run(refused())
        assert queue.info().depth == 0  # taken back: nothing queued, so the caller may retry
        lock.execute("ROLLBACK")
        asyncio.run(queue.put({"i": 2}))
        # committed once the put returned: in the file for any other connection to read
        stored = lock.execute("SELECT job FROM queue_jobs").fetchall()
        assert [json.loads(row[0]) for row in stored] == [{"i": 2}]
    finally:
        lock.close()


def test_purge_on_another_loop_drops_the_waiting_jobs(stoppers: list[BackgroundEngine]) -> None:
    engine = Engine(health_interval=None)
    queue, _gate, handled = _gated(engine, "q")
    bg = engine.start_background()
    stoppers.append(bg)
    bg.pause_queue("q")
    for i in range(3):
        queue.put_nowait(i)

    async def app() -> int:
        await eventually(lambda: queue.depth == 3, TIMEOUT)
        purge = await asyncio.wait_for(queue.purge(), TIMEOUT)
        return purge.purged

    assert asyncio.run(app()) == 3
    assert queue.info().purged == 3 and queue.depth == 0 and handled == []


def test_a_put_on_another_loop_after_the_engine_stopped_raises_engine_not_running() -> None:
    engine = Engine(health_interval=None)
    queue, _gate, _handled = _gated(engine, "q")
    engine.start_background().stop(timeout=5)

    async def app() -> None:
        with pytest.raises(EngineNotRunning):
            await queue.put(1)

    asyncio.run(app())


# ---------------------------------------------------------------- checked against what the store keeps


@pydantic_dataclass
class Customer:
    customer_id: int = Field(alias="customerId")


class Invoice(BaseModel):
    customer: Customer
    lines: list[int]


class Refund(BaseModel):
    # read by one name, stored (serialised) by another: the stored job would not read back
    refund_id: int = Field(validation_alias="rid", serialization_alias="refundId")


class Urgent(Invoice):
    reason: str


async def test_a_job_with_a_nested_aliased_dataclass_is_accepted_and_read_back_after_a_restart(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'q.db'}"
    got: list[Any] = []
    held = asyncio.Event()

    async def bill(invoice: Invoice) -> None:
        got.append(invoice)
        held.set()
        await asyncio.Event().wait()  # still running when the first engine stops: kept for the next

    engine = _engine(db)
    queue = engine.queue("bill", bill)
    async with engine:
        await queue.put({"customer": {"customerId": 1}, "lines": [1, 2]})
        queue.put_nowait(Invoice(customer=Customer(customerId=2), lines=[3]))
        await asyncio.wait_for(held.wait(), TIMEOUT)
        await engine.stop(timeout=0.1)

    async def done(invoice: Invoice) -> None:
        got.append(invoice)

    engine = _engine(db)
    queue = engine.queue("bill", done)
    async with engine:
        await queue.join(timeout=TIMEOUT)
    first, second = Invoice(customer=Customer(customerId=1), lines=[1, 2]), Invoice(customer=Customer(customerId=2), lines=[3])
    assert got == [first, first, second]
    assert all(isinstance(job, Invoice) for job in got)


async def test_a_job_stored_by_a_name_its_model_does_not_read_or_of_a_subclass_is_refused_at_put(
    store: str | None,
) -> None:
    handled: list[Any] = []

    async def refund(job: Refund) -> None:
        handled.append(job)

    async def bill(job: Invoice) -> None:
        handled.append(job)

    engine = _engine(store)
    refunds = engine.queue("refunds", refund)
    invoices = engine.queue("invoices", bill)
    async with engine:
        with pytest.raises(InvalidJob) as aliased:
            await refunds.put({"rid": 5})
        with pytest.raises(InvalidJob):
            refunds.put_nowait(Refund(rid=5))  # type: ignore[call-arg]
        with pytest.raises(InvalidJob) as subclass:
            await invoices.put(Urgent(customer=Customer(customerId=1), lines=[], reason="late"))
        infos = [refunds.info(), invoices.info()]
    assert [e["loc"] for e in aliased.value.errors] == [("rid",)]
    assert "rid: the stored job holds it as 'refundId' (its serialization alias)" in str(aliased.value)
    assert "the handler would get the job as plain JSON, not a Refund" in str(aliased.value)
    assert "reads back as a Invoice, not the Urgent given" in str(subclass.value)
    assert "put a Invoice (or annotate the handler's job with Urgent)" in str(subclass.value)
    assert [(i.accepted, i.depth) for i in infos] == [(0, 0), (0, 0)]
    if store is not None:
        # nothing was stored: a restart hands the handlers nothing
        engine = _engine(store)
        refunds, invoices = engine.queue("refunds", refund), engine.queue("invoices", bill)
        async with engine:
            await refunds.join(timeout=TIMEOUT)
            await invoices.join(timeout=TIMEOUT)
            assert refunds.info().adopted == invoices.info().adopted == 0
    assert handled == []
