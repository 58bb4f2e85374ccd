"""What ``@engine.task`` accepts: every definition a run can call registers, every other one is
refused at registration; and params that JSON carries exactly are taken."""

from __future__ import annotations

import datetime as dt
import functools
import zoneinfo
from typing import Any

import pytest
from pydantic import BaseModel, RootModel
from taskwatch.engine import Engine, RunStatus, TaskContext, TaskDefinitionError


class Page(BaseModel):
    n: int = 1


class At(BaseModel):
    t: dt.datetime


async def ctx_only(ctx: TaskContext) -> int:
    return 0


async def params_keyword_only(ctx: TaskContext, *, params: Page) -> int:
    return params.n


async def params_keyword_only_defaulted(ctx: TaskContext, *, page: Page = Page()) -> int:
    return page.n


async def needs_a_keyword(ctx: TaskContext, params: Page, *, db: Any) -> int:
    return params.n


async def no_params_needs_a_keyword(ctx: TaskContext, *, db: Any) -> int:
    return 0


async def method_like(owner: object, ctx: TaskContext, params: Page) -> int:
    return params.n


REFUSED: dict[str, tuple[Any, dict[str, Any]]] = {
    "explicit params, function takes only ctx": (ctx_only, {"params": Page}),
    "params keyword-only": (params_keyword_only, {}),
    "params keyword-only with a default": (params_keyword_only_defaulted, {}),
    "an extra required keyword-only argument": (needs_a_keyword, {}),
    "a required keyword-only argument, no params": (no_params_needs_a_keyword, {}),
    "a partial leaving a required keyword-only argument": (
        functools.partial(needs_a_keyword),
        {"name": "partial_needs_a_keyword"},
    ),
    "a partial taking three positional arguments": (functools.partial(method_like), {"name": "three"}),
}


@pytest.mark.parametrize("label", list(REFUSED))
def test_a_definition_no_run_can_call_is_refused_at_registration(label: str) -> None:
    fn, options = REFUSED[label]
    engine = Engine(health_interval=None)
    with pytest.raises(TaskDefinitionError) as refused:
        engine.task(fn, **options)
    message = str(refused.value)
    # it shows the signature a task takes, with the user's function name
    assert "(ctx: TaskContext" in message or "(ctx) or (ctx, params)" in message, message
    assert engine.catalog() == []


async def test_the_keyword_only_params_error_says_they_come_second() -> None:
    engine = Engine(health_interval=None)
    with pytest.raises(TaskDefinitionError, match=r"second positional argument.*async def params_keyword_only\(ctx: TaskContext, params: \.\.\.\)"):
        engine.task(params_keyword_only)
    with pytest.raises(TaskDefinitionError, match=r"params=Page but its function takes only.*async def ctx_only\(ctx: TaskContext, params: Page\)"):
        engine.task(ctx_only, params=Page)
    with pytest.raises(TaskDefinitionError, match=r"keyword-only argument\(s\) db that no run fills"):
        engine.task(needs_a_keyword)


class Service:
    def __init__(self, add: int) -> None:
        self.add = add

    async def handle(self, ctx: TaskContext, params: Page) -> int:
        return params.n + self.add


async def test_every_form_a_run_can_call_registers_and_runs() -> None:
    engine = Engine(health_interval=None)

    @engine.task
    async def plain(ctx: TaskContext) -> int:
        return 0

    @engine.task
    async def typed(ctx: TaskContext, params: Page) -> int:
        return params.n

    @engine.task(params=Page)
    async def explicit(ctx, params):  # type: ignore[no-untyped-def]
        return params.n

    @engine.task
    async def optional_keywords(ctx: TaskContext, params: Page, *, scale: int = 10, **extra: Any) -> int:
        return params.n * scale

    @engine.task(params=Page)
    async def explicit_with_more(ctx: TaskContext, params: Any, more: int = 5) -> int:
        return params.n + more

    @engine.task(params=Page)
    async def explicit_as_varargs(ctx: TaskContext, *args: Any) -> int:
        return args[0].n

    engine.task(Service(100).handle, name="bound")
    engine.task(functools.partial(Service.handle, Service(1000)), name="partial")
    engine.task(functools.partial(method_like, None), name="partial_function")

    expected = {"plain": 0, "typed": 3, "explicit": 3, "optional_keywords": 30,
                "explicit_with_more": 8, "explicit_as_varargs": 3, "bound": 103, "partial": 1003, "partial_function": 3}
    async with engine:
        for name, result in expected.items():
            params = None if name == "plain" else {"n": 3}
            run = await (await engine.submit(name, params)).wait(timeout=5)
            assert (run.status, run.result) == (RunStatus.SUCCEEDED, result), (name, run.error)
    schema = {info.name: info.params_schema for info in engine.catalog()}
    assert schema["partial"]["properties"] == {"n": {"default": 1, "title": "N", "type": "integer"}}


BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


async def read_back(params: At | dict[str, Any]) -> dt.datetime:
    """The ``t`` a task receives for ``params`` (as a run reads them back from their record)."""
    engine = Engine(health_interval=None)
    got: list[dt.datetime] = []

    @engine.task
    async def at(ctx: TaskContext, params: At) -> None:
        got.append(params.t)

    async with engine:
        run = await (await engine.submit("at", params)).wait(timeout=5)
    assert run.status is RunStatus.SUCCEEDED
    [t] = got
    return t


@pytest.mark.parametrize(
    "when",
    [
        dt.datetime(2024, 10, 27, 2, 30, tzinfo=BERLIN),  # the first 02:30 of the autumn fold
        dt.datetime(2024, 10, 27, 2, 30, fold=1, tzinfo=BERLIN),  # the second one
        dt.datetime(2024, 3, 31, 2, 30, tzinfo=BERLIN),  # in the spring gap
        dt.datetime(2024, 6, 1, 12, 0, tzinfo=BERLIN),
    ],
)
async def test_an_aware_datetime_in_a_dst_fold_or_gap_is_taken_as_its_instant(when: dt.datetime) -> None:
    got = await read_back(At(t=when))
    assert got.utcoffset() == when.utcoffset()
    assert got.astimezone(dt.timezone.utc) == when.astimezone(dt.timezone.utc)


async def test_a_naive_datetime_still_reads_back_naive() -> None:
    assert await read_back({"t": dt.datetime(2024, 10, 27, 2, 30)}) == dt.datetime(2024, 10, 27, 2, 30)


async def test_a_task_given_resources_takes_them_as_keyword_only_arguments() -> None:
    # resources are passed to a run as keywords: a keyword-only argument they fill is no problem
    engine = Engine(health_interval=None, resources={"db": "the database"})

    async def lookup(ctx: TaskContext, *, db: str) -> str:
        return f"read from {db}"

    engine.register(lookup, resources=("db",))
    async with engine:
        assert (await (await engine.submit("lookup")).wait()).result == "read from the database"


def test_a_partial_without_a_name_is_asked_for_one() -> None:
    engine = Engine(health_interval=None)

    async def scaled(ctx: TaskContext, factor: int = 1) -> int:
        return factor

    with pytest.raises(TaskDefinitionError, match="give the task a name="):
        engine.register(functools.partial(scaled, factor=2))
    assert engine.tasks() == {}
    engine.register(functools.partial(scaled, factor=2), name="doubled")
    assert list(engine.tasks()) == ["doubled"]


async def test_a_resource_may_be_taken_as_a_positional_or_keyword_argument() -> None:
    # resources are passed by keyword: an argument they fill is none a run must fill by position
    class Lookup(BaseModel):
        key: str

    engine = Engine(health_interval=None, resources={"db": {"a": 1}})

    async def lookup(ctx: TaskContext, params: Lookup, db: dict[str, int]) -> int:
        return db[params.key]

    engine.register(lookup, params=Lookup, resources=("db",))
    async with engine:
        assert (await (await engine.submit("lookup", {"key": "a"})).wait()).result == 1


@pytest.mark.parametrize(
    ("decorator", "example"),
    [("task", "@engine.task(retries=3)"), ("periodic", "@engine.periodic(every=60)"),
     ("supervised", "@engine.supervised(name='indexer')")],
)
def test_an_option_given_by_position_is_refused_with_how_options_are_written(decorator: str, example: str) -> None:
    # @engine.periodic(60) takes 60 for the function: the error must not send the user to name=
    engine = Engine()
    with pytest.raises(TaskDefinitionError, match="60 is not a function") as caught:
        getattr(engine, decorator)(60)
    assert example in str(caught.value) and "name=" not in str(caught.value).replace(example, "")
    assert engine.tasks() == {} and engine.schedule() == [] and engine.workers() == []


class Ids(RootModel[list[int]]):
    pass


class Limit(RootModel[int]):
    pass


class Counts(RootModel[dict[str, int]]):
    pass


class WrappedPage(RootModel[Page]):
    pass


async def test_a_root_model_params_is_taken_only_when_its_params_are_a_json_object() -> None:
    # a RootModel of a list registered, and its run was queued and ran, but every read of
    # the engine (runs(), snapshot(), the run's record, wait()) then raised AttributeError,
    # and a SQLite store failed the run as a row "changed by hand"
    engine = Engine(health_interval=None)

    async def by_ids(ctx: TaskContext, params: Ids) -> int:
        return len(params.root)

    async def capped(ctx: TaskContext, params: Any) -> int:
        return 0

    with pytest.raises(TaskDefinitionError, match=r"Ids of task 'by_ids' is a RootModel of a JSON array"):
        engine.task(by_ids)
    with pytest.raises(TaskDefinitionError, match=r"Limit of task 'capped' is a RootModel of a JSON integer"):
        engine.task(capped, params=Limit)
    assert engine.catalog() == []

    @engine.task
    async def tally(ctx: TaskContext, params: Counts) -> int:
        return sum(params.root.values())

    @engine.task
    async def wrapped(ctx: TaskContext, params: WrappedPage) -> int:
        return params.root.n

    async with engine:
        counted = await (await engine.submit("tally", {"a": 1, "b": 2})).wait(5)
        paged = await (await engine.submit("wrapped", {"n": 4})).wait(5)
        assert [(r.params, r.result) for r in (counted, paged)] == [({"a": 1, "b": 2}, 3), ({"n": 4}, 4)]
        assert len(engine.runs()) == 2
