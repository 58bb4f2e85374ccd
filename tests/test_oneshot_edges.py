"""One-shot runs at the edges of what a task raises, takes and returns: an exception that cannot
be printed, strict params models, params and results nested past any reader, result keys that
run together as JSON, and values too big for ``repr`` in an error message."""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import math
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr, computed_field, field_validator
from taskwatch.engine import (
    Engine,
    EngineCrashed,
    InvalidCount,
    InvalidKey,
    InvalidParams,
    InvalidProgress,
    InvalidStatus,
    RunStatus,
    TaskContext,
)
from taskwatch.engine.jsonsafe import jsonable, non_finite_problem, safe_str
from taskwatch.engine.store import NewRun, SqliteStore

from .helpers import eventually

TIMEOUT = 10


def make_engine(**options: Any) -> Engine:
    options.setdefault("health_interval", None)
    return Engine(**options)


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


# ------------------------------------------------------------ an exception that cannot be printed


class Boom(BaseException):
    """A BaseException of the user's own, as a library's __str__ might raise."""


class StrRaises(Exception):
    def __str__(self) -> str:
        raise Boom("from __str__")


class NotesRaise(Exception):
    """Formatting its traceback reads __notes__, which raises."""

    @property
    def __notes__(self) -> list[str]:  # type: ignore[override]
        raise Boom("from __notes__")


class Text(str):
    """A str whose own methods raise: what a __str__ may return."""

    def encode(self, *args: Any, **kwargs: Any) -> bytes:
        raise Boom("from encode")

    def __contains__(self, part: object) -> bool:
        raise Boom("from __contains__")


class StrIsOdd(Exception):
    def __str__(self) -> str:
        return Text("disk full")


@pytest.mark.parametrize(
    ("error", "message"),
    [
        (StrRaises, "<unprintable StrRaises>"),
        (NotesRaise, ""),
        (StrIsOdd, "disk full"),
    ],
)
async def test_an_exception_whose_own_code_raises_a_base_exception_fails_its_run_and_is_retried(
    error: type[Exception], message: str
) -> None:
    engine = make_engine()
    attempts: list[int] = []

    @engine.task(retries=1, backoff=0.01)
    async def flaky(ctx: TaskContext) -> None:
        attempts.append(ctx.attempt)
        raise error()

    @engine.task
    async def fine(ctx: TaskContext) -> int:
        return 1

    async with engine:
        record = await (await engine.submit("flaky")).wait(TIMEOUT)
        assert record.status is RunStatus.FAILED and record.cancel_reason is None
        assert attempts == [1, 2] and record.attempt == 2
        assert record.error is not None
        assert (record.error.type, record.error.message) == (error.__qualname__, message)
        assert "in flaky" in record.error.traceback and "raise error()" in record.error.traceback
        assert type(record.error.message) is str
        assert (await (await engine.submit("fine")).wait(TIMEOUT)).result == 1
        assert engine.stats().by_status["failed"] == 1


def test_a_str_raising_keyboard_interrupt_fails_the_run_and_the_program_goes_on() -> None:
    # in a child: on the old code the KeyboardInterrupt left the event loop, ending the program
    script = textwrap.dedent(
        """
        import asyncio
        from taskwatch.engine import Engine, TaskContext

        class Unprintable(Exception):
            def __str__(self):
                raise KeyboardInterrupt("from __str__")

        engine = Engine(health_interval=None)

        @engine.task
        async def t(ctx: TaskContext) -> None:
            raise Unprintable()

        async def main():
            async with engine:
                record = await (await engine.submit("t")).wait(10)
                print(record.status.value, record.error.type, record.error.message)

        asyncio.run(main())
        print("went on")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["failed Unprintable <unprintable Unprintable>", "went on"]


def test_safe_str_never_raises() -> None:
    assert safe_str(StrRaises()) == "<unprintable StrRaises>"
    text = safe_str(StrIsOdd())
    assert text == "disk full" and type(text) is str


def test_engine_crashed_names_a_cause_that_cannot_be_printed() -> None:
    error = EngineCrashed(StrRaises())
    assert error.cause == "StrRaises: <unprintable>"
    assert "the engine's event loop died (StrRaises: <unprintable>)" in str(error)


# ------------------------------------------------------------ strict params models


class Kind(enum.Enum):
    A = "a"
    B = "b"


class Report(BaseModel):
    model_config = ConfigDict(strict=True)

    since: dt.datetime
    user: uuid.UUID
    kind: Kind
    xy: tuple[int, int]
    pages: list[int] = []


def report_params() -> Report:
    return Report(
        since=dt.datetime(2024, 1, 1, 12, 30, tzinfo=dt.UTC),
        user=uuid.UUID(int=1),
        kind=Kind.B,
        xy=(1, 2),
        pages=[3, 4],
    )


def add_report(engine: Engine, got: list[Report]) -> None:
    @engine.task
    async def report(ctx: TaskContext, params: Report) -> str:
        got.append(params)
        return f"{params.since.isoformat()} {params.user} {params.kind.value} {params.xy} {params.pages}"


EXPECTED = "2024-01-01T12:30:00+00:00 00000000-0000-0000-0000-000000000001 b (1, 2) [3, 4]"


async def test_a_strict_params_model_with_a_datetime_uuid_enum_and_tuple_runs() -> None:
    engine = make_engine()
    got: list[Report] = []
    add_report(engine, got)
    given = report_params()
    async with engine:
        handle = await engine.submit("report", given)
        given.pages.append(5)  # the caller's later change reaches no run
        record = await handle.wait(TIMEOUT)
        assert record.status is RunStatus.SUCCEEDED, record.error
        assert record.result == EXPECTED
        assert record.params == {
            "since": "2024-01-01T12:30:00Z", "user": "00000000-0000-0000-0000-000000000001",
            "kind": "b", "xy": [1, 2], "pages": [3, 4],
        }  # fmt: skip
        [params] = got
        assert params is not given and params.pages == [3, 4] and type(params.xy) is tuple
        # params given as a dict of the model's own types are as good
        record = await (await engine.submit("report", dict(report_params()))).wait(TIMEOUT)
        assert record.result == EXPECTED


async def test_a_strict_params_model_runs_from_a_record_another_process_stored(tmp_path: Path) -> None:
    # the run reaches this node through the store: its params are read from the record
    path = str(tmp_path / "runs.db")
    record_of = report_params().model_dump(mode="json")
    async with SqliteStore(path) as store:
        [inserted] = await store.insert([NewRun("report", record_of, max_attempts=1)])
    engine = make_engine(store=f"sqlite:///{path}")
    got: list[Report] = []
    add_report(engine, got)
    async with engine:
        record = await engine.handle(inserted.id).wait(timeout=TIMEOUT)
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert record.result == EXPECTED


class StrictSecret(BaseModel):
    model_config = ConfigDict(strict=True)

    token: SecretStr


class StrictHidden(BaseModel):
    model_config = ConfigDict(strict=True)

    when: dt.datetime
    hidden: str = Field(exclude=True)


async def test_a_strict_params_model_that_does_not_read_back_as_itself_is_still_refused() -> None:
    engine = make_engine()

    @engine.task
    async def secret(ctx: TaskContext, params: StrictSecret) -> None:
        return None

    async with engine:
        # a SecretStr dumps masked: it would run with "**********"
        with pytest.raises(InvalidParams, match=r"token: reads back as another value"):
            await engine.submit("secret", StrictSecret(token=SecretStr("hunter2")))
        assert engine.stats().submitted_total == 0


async def test_a_strict_params_model_refused_from_json_too_names_what_json_lost() -> None:
    engine = make_engine()

    @engine.task
    async def when(ctx: TaskContext, params: StrictHidden) -> None:
        return None

    async with engine:
        # the field left out of dumps is lost; the datetime, which JSON carries, is no problem
        with pytest.raises(InvalidParams) as raised:
            await engine.submit("when", StrictHidden(when=dt.datetime(2024, 5, 1), hidden="h"))
        assert [e["loc"] for e in raised.value.errors] == [("hidden",)]
        assert "Field required once recorded as JSON" in str(raised.value)
        assert engine.stats().submitted_total == 0


# ------------------------------------------------------------ nested past every reader


class Tree(BaseModel):
    tree: Any = None


@pytest.mark.parametrize("leaf", [1, math.nan])
@pytest.mark.parametrize("depth", [150, 1000, 20_000])
async def test_params_nested_far_too_deep_raise_invalid_params(depth: int, leaf: float) -> None:
    engine = make_engine()

    @engine.task
    async def t(ctx: TaskContext, params: Tree) -> None:
        return None

    async with engine:
        with pytest.raises(InvalidParams) as raised:
            await engine.submit("t", {"tree": nested(depth, leaf)})
        assert "nested more than 100 levels deep" in str(raised.value)
        assert len(str(raised.value)) < 1000  # not a path a thousand levels long
        assert engine.stats().submitted_total == 0


@pytest.mark.parametrize("leaf", [1, math.nan])
@pytest.mark.parametrize("depth", [150, 1000, 20_000])
async def test_a_result_nested_far_too_deep_fails_its_run(depth: int, leaf: float) -> None:
    engine = make_engine()

    @engine.task
    async def t(ctx: TaskContext) -> Any:
        return nested(depth, leaf)

    async with engine:
        record = await (await engine.submit("t")).wait(TIMEOUT)
    assert record.status is RunStatus.FAILED and record.error is not None
    assert record.error.type == "ResultNotSerializable"
    assert "nested more than 100 levels deep" in record.error.message


def test_the_search_for_a_nan_takes_any_depth() -> None:
    assert non_finite_problem(nested(20_000, math.nan)) is None  # refused for its depth, not its NaN
    assert non_finite_problem({"a": [1, {"b": math.inf}], "c": math.nan}) == (
        "a[1]['b']", "a[1]['b'] is inf, which JSON cannot carry; use None or a string for it"
    )  # fmt: skip
    assert non_finite_problem({5: [2, math.nan]})[0] == "[5][1]"  # type: ignore[index]


# ------------------------------------------------------------ result keys that run together


@pytest.mark.parametrize(
    ("result", "key"),
    [
        ({1: 10, "1": 20}, "'1'"),
        ({None: 1, "None": 2}, "'None'"),
        ({True: 5, "true": 6}, "'true'"),
        ([{"a": 1}, {"counts": {2: 1, "2": 1}}], "'2'"),
        ({"by_kind": {Kind.A: 1, "a": 2}}, "'a'"),
    ],
)
async def test_a_result_whose_keys_run_together_as_json_fails_its_run(result: Any, key: str) -> None:
    engine = make_engine()
    attempts: list[int] = []

    @engine.task(retries=1, backoff=0.01)
    async def count(ctx: TaskContext) -> Any:
        attempts.append(ctx.attempt)
        return result

    async with engine:
        record = await (await engine.submit("count")).wait(TIMEOUT)
    assert record.status is RunStatus.FAILED and record.result is None
    assert attempts == [1]  # final: another attempt would do its work again
    assert record.error is not None and record.error.type == "ResultNotSerializable"
    assert f"the same JSON key {key}" in record.error.message


class Stamped(BaseModel):
    n: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def counter(self) -> int:
        # a different value each time it is read, as a clock or a random id is
        Stamped.reads += 1
        return Stamped.reads

    reads: ClassVar[int] = 0


async def test_results_whose_keys_stay_distinct_are_kept_whole() -> None:
    engine = make_engine()
    results: list[Any] = [
        {1: "a", 2: "b"},
        {"x": {None: 1, "y": 2}},
        Stamped(n=1),
        (item for item in [1, 2]),
    ]

    @engine.task
    async def give(ctx: TaskContext) -> Any:
        return results.pop(0)

    async with engine:
        got = [(await (await engine.submit("give")).wait(TIMEOUT)) for _ in range(4)]
    assert [r.status for r in got] == [RunStatus.SUCCEEDED] * 4, [r.error for r in got]
    assert got[0].result == {"1": "a", "2": "b"}
    assert got[1].result == {"x": {"None": 1, "y": 2}}
    assert got[2].result["n"] == 1
    assert got[3].result == [1, 2]


def test_jsonable_checks_keys_only_when_asked() -> None:
    assert jsonable({1: 1, "1": 2}) == {"1": 2}  # what queue jobs and events still get
    with pytest.raises(ValueError, match="the same JSON key '1'"):
        jsonable({1: 1, "1": 2}, distinct_keys=True)


# ------------------------------------------------------------ values too big to repr


async def test_progress_with_an_int_too_long_to_print_raises_invalid_progress() -> None:
    engine = make_engine()
    raised: list[BaseException] = []

    @engine.task
    async def t(ctx: TaskContext) -> None:
        await ctx.progress(1, 4)
        for done in (10**5000, -(10**5000)):
            try:
                await ctx.progress(done, None)
            except InvalidProgress as exc:
                raised.append(exc)

    async with engine:
        record = await (await engine.submit("t")).wait(TIMEOUT)
    assert record.status is RunStatus.SUCCEEDED, record.error
    assert (record.progress.done, record.progress.total) == (1, 4)
    assert len(raised) == 2
    assert "got <int of 5001 digits>" in str(raised[0]) and "got <int of 5001 digits>" in str(raised[1])


async def test_keys_counts_params_and_statuses_too_long_to_print_are_refused_with_their_own_errors() -> None:
    engine = make_engine()

    @engine.task
    async def plain(ctx: TaskContext) -> None:
        return None

    huge = 10**4300  # 4301 digits: one past what repr() takes
    async with engine:
        with pytest.raises(InvalidKey, match=r"invalid key <int of 4301 digits> for task 'plain'"):
            await engine.submit("plain", key=huge)  # type: ignore[arg-type]
        with pytest.raises(InvalidParams, match=r"not <int of 4301 digits>"):
            await engine.submit("plain", huge)  # type: ignore[arg-type]
        with pytest.raises(InvalidStatus, match=r"<int of 4301 digits> is not a run status"):
            engine.runs(status=huge)  # type: ignore[arg-type]
        assert engine.stats().submitted_total == 0
    with pytest.raises(InvalidCount, match=r"invalid count <int of 4301 digits>"):
        raise InvalidCount("trigger 't'", huge)


class Unrepresentable:
    def __repr__(self) -> str:
        raise Boom("from __repr__")


async def test_a_value_whose_repr_raises_is_named_by_its_type() -> None:
    engine = make_engine()

    @engine.task
    async def plain(ctx: TaskContext) -> None:
        return None

    async with engine:
        with pytest.raises(InvalidKey, match=r"invalid key <Unrepresentable object> for task 'plain'"):
            await engine.submit("plain", key=Unrepresentable())  # type: ignore[arg-type]
    long_key = "k" * 5000
    with pytest.raises(InvalidKey) as raised:
        raise InvalidKey("task 't'", long_key, "too long")
    assert len(raised.value.key) <= 200 and raised.value.key.startswith("'kkk")


REGIONS = {"eu": "eu-west-1"}


class Placed(BaseModel):
    region: str

    @field_validator("region")
    @classmethod
    def known(cls, value: str) -> str:
        REGIONS[value]  # a lookup: a KeyError, which pydantic passes through unreported
        return value


async def test_a_validator_raising_what_pydantic_does_not_report_refuses_the_params_and_queues_nothing() -> None:
    engine = make_engine()

    @engine.task
    async def deploy(ctx: TaskContext, p: Placed) -> str:
        return REGIONS[p.region]

    async with engine:
        with pytest.raises(InvalidParams) as refused:
            await engine.submit("deploy", {"region": "mars"})
        [problem] = refused.value.errors
        assert problem["type"] == "validator_raised" and "KeyError: 'mars'" in problem["msg"]
        assert isinstance(refused.value.__cause__, KeyError)  # the validator's own traceback, kept
        assert engine.runs() == []
        done = await (await engine.submit("deploy", {"region": "eu"})).wait(TIMEOUT)
        assert done.status is RunStatus.SUCCEEDED and done.result == "eu-west-1"


# ------------------------------------------------------------ a cancel made twice


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_second_cancel_leaves_the_cleanup_the_first_one_allowed(kind: str, tmp_path: Path) -> None:
    """A dashboard's button clicked twice, or a request retried: the second cancel of a run
    already cleaning up after the first cut that cleanup short at once, well within the
    engine's ``cancel_grace``. It now waits, as the first does."""
    store = "memory" if kind == "memory" else f"sqlite:///{tmp_path / 'runs.db'}"
    engine = make_engine(store=store, cancel_grace=30.0)
    began = asyncio.Event()
    cleanup_may_end = asyncio.Event()
    steps: list[str] = []

    @engine.task
    async def upload(ctx: TaskContext) -> None:
        began.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            steps.append("cleanup started")
            try:
                await cleanup_may_end.wait()  # removing the partial upload
            except asyncio.CancelledError:
                steps.append("cleanup cut short")
                raise
            steps.append("cleanup finished")
            raise

    async with engine:
        handle = await engine.submit("upload")
        await asyncio.wait_for(began.wait(), TIMEOUT)
        first = await handle.cancel(grace=0)
        await eventually(lambda: steps == ["cleanup started"])
        second = await handle.cancel(grace=0)
        for _ in range(20):  # loop turns enough for a cancel to reach the cleanup
            await asyncio.sleep(0)
        assert steps == ["cleanup started"]
        assert first.status is second.status is RunStatus.RUNNING
        cleanup_may_end.set()
        record = await handle.wait(TIMEOUT)
    assert steps == ["cleanup started", "cleanup finished"]
    assert (record.status, record.cancel_reason) == (RunStatus.CANCELLED, "user")
