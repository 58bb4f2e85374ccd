"""Submitting at the edges: from the wrong thread, with a held key, with models whose input
and output differ (aliases, computed fields), with odd params, and lowering the history."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, computed_field
from pydantic.dataclasses import dataclass as pydantic_dataclass
from typing_extensions import TypedDict

from taskwatch.engine import (
    Engine,
    InvalidParams,
    LoopThreadError,
    RemoteEngine,
    RunNotFound,
    RunStatus,
    TaskContext,
)
from taskwatch.engine.store import NewRun, SqliteStore

from .helpers import in_thread


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return "memory" if request.param == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"


# ---------------------------------------------------------------- the engine's own thread


async def test_submits_from_another_thread_are_refused_and_record_nothing(store: str) -> None:
    engine = Engine(health_interval=None, store=store, max_concurrency=1)

    @engine.task
    async def t(ctx: TaskContext) -> str:
        return "ok"

    async with engine:
        nowait = await asyncio.to_thread(in_thread, lambda: engine.submit_nowait("t"))
        awaited = await asyncio.to_thread(in_thread, lambda: asyncio.run(engine.submit("t")))
        many = await asyncio.to_thread(in_thread, lambda: asyncio.run(engine.submit_many([("t", None)])))
        for error, method in ((nowait, "submit_nowait"), (awaited, "submit"), (many, "submit_many")):
            assert isinstance(error, LoopThreadError), error
            assert f"Engine.{method}()" in str(error)
            assert "nothing was queued" in str(error)
            assert "start_background()" in str(error) and "await engine.submit" in str(error)
        # nothing was recorded, so no run holds the one slot: the next submit runs at once
        assert engine.runs(limit=None) == []
        assert (await engine.query_runs()).runs == []
        record = await (await engine.submit("t")).wait(timeout=5)
        assert record.status is RunStatus.SUCCEEDED
    assert [r.status for r in engine.runs(limit=None)] == [RunStatus.SUCCEEDED]


# ---------------------------------------------------------------- dedup keys


def gated_engine(store: str, **options: Any) -> tuple[Engine, asyncio.Event]:
    """An engine running one run at a time of task "t", which waits for the gate returned."""
    engine = Engine(health_interval=None, store=store, max_concurrency=1, **options)
    gate = asyncio.Event()

    @engine.task
    async def t(ctx: TaskContext) -> int:
        await gate.wait()
        return 1

    return engine, gate


async def test_a_submit_with_a_key_returns_the_first_holder_after_a_submit_nowait(store: str) -> None:
    engine, gate = gated_engine(store, node_id="nk")
    async with engine:
        blocker = await engine.submit("t")
        first = await engine.submit("t", key="k")
        nowait = engine.submit_nowait("t", key="k")
        again = await engine.submit("t", key="k")
        assert again.id == first.id
        nowait_too = engine.submit_nowait("t", key="k")
        [batched] = await engine.submit_many([{"task": "t", "key": "k"}])
        assert batched.id == first.id
        if store == "memory":
            assert nowait.id == nowait_too.id == first.id
        gate.set()
        records = await asyncio.wait_for(
            asyncio.gather(*(h.wait() for h in (blocker, first, again, batched, nowait, nowait_too))), 5
        )
        assert [r.status for r in records[:4]] == [RunStatus.SUCCEEDED] * 4
        for record in records[4:]:
            if record.id != first.id:
                # a store other nodes may share decides at the write: the nowait run says who holds the key
                assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "key_held")
                assert record.error is not None and record.error.type == "KeyHeld"
                assert first.id in record.error.message
        assert engine.stats().by_status["succeeded"] == 2


async def test_a_submit_with_a_key_after_a_submit_nowait_returns_that_run(store: str) -> None:
    engine, gate = gated_engine(store)
    async with engine:
        blocker = await engine.submit("t")
        nowait = engine.submit_nowait("t", key="k")
        assert (await engine.submit("t", key="k")).id == nowait.id
        assert [h.id for h in await engine.submit_many([{"task": "t", "key": "k"}])] == [nowait.id]
        gate.set()
        for handle in (blocker, nowait):
            assert (await handle.wait(timeout=5)).status is RunStatus.SUCCEEDED
        assert engine.stats().submitted_total == 2


# ---------------------------------------------------------------- params models


class Aliased(BaseModel):
    user_id: str = Field(alias="userId")


class Team(BaseModel):
    members: list[Aliased]


async def test_an_instance_of_a_model_with_aliases_is_accepted(store: str) -> None:
    engine = Engine(health_interval=None, store=store)

    @engine.task
    async def greet(ctx: TaskContext, params: Aliased) -> str:
        return params.user_id

    @engine.task
    async def count(ctx: TaskContext, params: Team) -> int:
        return len(params.members)

    async with engine:
        handle = await engine.submit("greet", Aliased(userId="u1"))
        record = await handle.wait(timeout=5)
        assert record.status is RunStatus.SUCCEEDED and record.result == "u1"
        # recorded by the schema's names, as a dict submit gives them
        assert (await engine.fetch_run(handle.id)).params == {"userId": "u1"}
        assert (await (await engine.submit("greet", record.params)).wait(timeout=5)).result == "u1"
        handle = await engine.submit("count", Team(members=[Aliased(userId="a"), Aliased(userId="b")]))
        assert (await handle.wait(timeout=5)).result == 2
        assert (await engine.fetch_run(handle.id)).params == {"members": [{"userId": "a"}, {"userId": "b"}]}


class Doubled(BaseModel):
    a: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def double(self) -> int:
        return self.a * 2


class DoubledStrict(Doubled):
    model_config = ConfigDict(extra="forbid")


class DoubledExtra(Doubled):
    model_config = ConfigDict(extra="allow")


class Nested(BaseModel):
    model_config = ConfigDict(extra="forbid")
    items: list[DoubledStrict]


@pytest.mark.parametrize("model", [Doubled, DoubledStrict, DoubledExtra])
async def test_computed_fields_are_not_recorded_as_params(store: str, model: type[Doubled]) -> None:
    engine = Engine(health_interval=None, store=store)
    seen: list[BaseModel] = []

    @engine.task(params=model)
    async def twice(ctx: TaskContext, params: Doubled) -> int:
        seen.append(params)
        return params.double

    @engine.task
    async def many(ctx: TaskContext, params: Nested) -> int:
        return sum(item.double for item in params.items)

    async with engine:
        for given in ({"a": 1}, model(a=1)):
            handle = await engine.submit("twice", given)
            assert (await handle.wait(timeout=5)).result == 2
            assert (await engine.fetch_run(handle.id)).params == {"a": 1}
        assert all(params == model(a=1) for params in seen)  # no computed value came back as an extra
        handle = await engine.submit("many", {"items": [{"a": 1}, {"a": 2}]})
        assert (await handle.wait(timeout=5)).result == 6
        assert (await engine.fetch_run(handle.id)).params == {"items": [{"a": 1}, {"a": 2}]}


class Report(BaseModel):
    report_id: int = Field(serialization_alias="reportId")  # camelCase on output only


async def test_a_model_with_a_serialization_alias_can_be_submitted(store: str) -> None:
    engine = Engine(health_interval=None, store=store)

    @engine.task
    async def build(ctx: TaskContext, params: Report) -> int:
        return params.report_id

    async with engine:
        for given in ({"report_id": 7}, Report(report_id=7)):
            handle = await engine.submit("build", given)
            assert (await handle.wait(timeout=5)).result == 7
            # recorded by the name the model takes as input, so a retry reads it back
            assert (await engine.fetch_run(handle.id)).params == {"report_id": 7}


@pytest.mark.parametrize("params", [0, "", [], False, (), {"a": 1}])
async def test_a_task_without_params_refuses_any_params(params: Any) -> None:
    engine = Engine(health_interval=None)

    @engine.task
    async def bare(ctx: TaskContext) -> str:
        return "ok"

    async with engine:
        with pytest.raises(InvalidParams, match="takes no params") as caught:
            await engine.submit("bare", params)
        assert caught.value.errors[0]["loc"] == ("params",)
        assert engine.stats().submitted_total == 0
        nothing: tuple[dict[str, Any] | None, ...] = (None, {})
        for none in nothing:
            assert (await (await engine.submit("bare", none)).wait(timeout=5)).result == "ok"


class N(BaseModel):
    n: int


async def test_submit_many_names_the_item_with_bad_params(store: str) -> None:
    engine = Engine(health_interval=None, store=store)

    @engine.task
    async def t(ctx: TaskContext, params: N) -> int:
        return params.n

    async with engine:
        with pytest.raises(InvalidParams) as caught:
            await engine.submit_many([("t", {"n": 1}), ("t", {"n": 2}), ("t", {"n": "bad"})])
        assert str(caught.value).startswith("item 2 of submit_many: invalid params for task 't'")
        assert caught.value.task == "t" and [e["loc"] for e in caught.value.errors] == [("n",)]
        assert engine.runs(limit=None) == [] and (await engine.query_runs()).runs == []


# ---------------------------------------------------------------- registering


async def test_an_object_with_an_async_call_is_a_task() -> None:
    class Scaled:
        def __init__(self, factor: int) -> None:
            self.factor = factor

        async def __call__(self, ctx: TaskContext, params: N) -> int:
            return params.n * self.factor

    engine = Engine(health_interval=None)
    engine.task(Scaled(3), name="scaled")
    assert engine.tasks()["scaled"].params_model is N
    async with engine:
        assert (await (await engine.submit("scaled", {"n": 5})).wait(timeout=5)).result == 15


# ---------------------------------------------------------------- history


async def test_lowering_the_history_forgets_the_oldest_finished_runs_at_once(store: str) -> None:
    engine = Engine(health_interval=None, store=store, history=10)

    @engine.task
    async def q(ctx: TaskContext) -> str:
        return "q"

    async with engine:
        handles = [await engine.submit("q") for _ in range(10)]
        await asyncio.wait_for(asyncio.gather(*(h.wait() for h in handles)), 5)
        engine.history = 2
        kept = engine.runs(limit=None)
        assert len(kept) == 2
        assert engine.stats().by_status["succeeded"] == 2
        with pytest.raises(RunNotFound):
            engine.get(handles[0].id)
        assert engine.get(handles[-1].id).status is RunStatus.SUCCEEDED
        # a handle the submitter kept still reads its run
        assert (await handles[0].wait(timeout=5)).status is RunStatus.SUCCEEDED


class V2(BaseModel):
    n: int
    added: str  # a required field the recorded params (from the model before it) lack


async def test_a_run_whose_recorded_params_no_longer_fit_fails_once_saying_so(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    async with SqliteStore(str(tmp_path / "runs.db")) as store:
        # recorded by an engine whose model of "t" was {n: int}
        [inserted] = await store.insert([NewRun("t", {"n": 1}, max_attempts=3)])
    engine = Engine(store=url, health_interval=None)

    @engine.task(params=V2, retries=2, backoff=0.01)
    async def t(ctx: TaskContext, params: V2) -> int:
        return params.n

    async with engine:
        record = await engine.handle(inserted.id).wait(timeout=10)
    assert record.status is RunStatus.FAILED
    assert record.attempt == 1  # retrying cannot make old params fit: failed at once
    assert record.error is not None and record.error.type == "InvalidParams"
    assert "no longer fit" in record.error.message and "added" in record.error.message


async def test_a_task_with_over_a_thousand_retries_runs_every_one(store: str) -> None:
    # the backoff's exponent once reached 2 ** 1024, which overflows a float: the failure
    # handling itself raised, at attempt 1025
    engine = Engine(store=store, health_interval=None)

    @engine.task(retries=1100, backoff=0)
    async def always_fails(ctx: TaskContext) -> None:
        raise RuntimeError(f"attempt {ctx.attempt}")

    async with engine:
        record = await (await engine.submit("always_fails")).wait(timeout=60)
    assert record.status is RunStatus.FAILED and record.attempt == 1101
    assert record.error is not None and record.error.message == "attempt 1101"


# ---------------------------------------------------------------- aliases outside pydantic models


@pydantic_dataclass
class Account:
    user_id: int = Field(alias="userId")


class AccountDict(TypedDict):
    user_id: Annotated[int, Field(alias="userId")]


class ForAccount(BaseModel):
    account: Account


class ForAccountDict(BaseModel):
    account: AccountDict


def account_engine(store: str, **options: Any) -> tuple[Engine, list[Any]]:
    engine = Engine(health_interval=None, store=store, **options)
    seen: list[Any] = []

    @engine.task
    async def bill(ctx: TaskContext, params: ForAccount) -> int:
        seen.append(params.account)
        return params.account.user_id

    @engine.task
    async def bill_dict(ctx: TaskContext, params: ForAccountDict) -> int:
        seen.append(params.account)
        return params.account["user_id"]

    return engine, seen


async def test_a_nested_dataclass_or_typeddict_with_an_alias_is_accepted(store: str) -> None:
    engine, seen = account_engine(store)
    given = {"account": {"userId": 7}}
    async with engine:
        # (a ForAccountDict instance holds its TypedDict keyed by field name, which revalidating it
        # does not take: refused before as now)
        for task, params in (("bill", given), ("bill", ForAccount(account=Account(userId=7))), ("bill_dict", given)):
            handle = await engine.submit(task, params)
            assert (await handle.wait(timeout=5)).result == 7
            # recorded by the alias the dataclass or TypedDict takes, so it reads back
            recorded = (await engine.fetch_run(handle.id)).params
            assert recorded == given
            assert (await (await engine.submit(task, recorded)).wait(timeout=5)).result == 7
    assert seen == [Account(userId=7)] * 4 + [{"user_id": 7}] * 2


async def test_a_run_with_a_nested_aliased_dataclass_runs_from_its_record_at_the_next_start(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    engine, _ = account_engine(url, max_concurrency=1)
    held = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        held.set()
        await asyncio.Event().wait()

    async with engine:
        await engine.submit("hold")
        await asyncio.wait_for(held.wait(), 5)
        left = await engine.submit("bill", ForAccount(account=Account(userId=9)))  # behind hold: not run here
        await engine.stop(timeout=0)
    assert engine.get(left.id).status is RunStatus.PENDING

    engine, seen = account_engine(url)

    @engine.task(name="hold")
    async def hold_done(ctx: TaskContext) -> None:
        return None

    async with engine:
        record = await engine.handle(left.id).wait(timeout=10)
    assert record.status is RunStatus.SUCCEEDED and record.result == 9
    assert seen == [Account(userId=9)]


async def test_a_remote_submit_of_a_model_with_a_nested_aliased_dataclass_runs(sock_path: str) -> None:
    engine, seen = account_engine("memory")
    async with engine:
        await engine.serve(sock_path, announce=False)
        async with RemoteEngine(sock_path) as remote:
            far = await remote.submit("bill", ForAccount(account=Account(userId=3)))
        record = await engine.handle(far.id).wait(timeout=5)
    assert record.status is RunStatus.SUCCEEDED and record.result == 3
    assert record.params == {"account": {"userId": 3}}
    assert seen == [Account(userId=3)]
