"""Bad input from callers and tasks: refused with a typed error, or contained to one run.

Whatever a caller submits or a task returns, raises or reports, the engine's
state stays valid: ``runs()``, ``snapshot()`` and a fresh dashboard attach keep
working, and nothing half-recorded is left behind.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from taskwatch.engine import (
    Engine,
    EngineCrashed,
    InProcessLease,
    InvalidAddress,
    InvalidConfiguration,
    InvalidCount,
    InvalidKey,
    InvalidParams,
    InvalidProgress,
    InvalidQuery,
    InvalidStatus,
    InvalidSubmission,
    JobNotSerializable,
    PostgresLease,
    RemoteEngine,
    RunStatus,
    TaskContext,
    TaskDefinitionError,
    TaskwatchError,
    is_truncated,
)

from taskwatch.engine.store import NewRun

from .helpers import Recorder, eventually, stray_tasks

SURROGATE = os.fsdecode(b"report-\xff.csv")  # what a non-UTF-8 file name decodes to


class FileParams(BaseModel):
    name: str


def make_engine(**options: Any) -> Engine:
    options.setdefault("health_interval", None)
    engine = Engine(**options)

    @engine.task
    async def work(ctx: TaskContext, params: FileParams) -> str:
        return params.name

    @engine.task
    async def noop(ctx: TaskContext) -> None:
        return None

    return engine


def assert_consistent(engine: Engine) -> None:
    """What every dashboard attach needs works, and every run's state is a valid one."""
    runs = engine.runs(limit=None)
    snapshot = engine.snapshot()
    snapshot.model_dump_json()  # what the control endpoint sends on attach
    counts = engine.stats().by_status
    for status in RunStatus:
        assert counts[status.value] == sum(1 for r in runs if r.status is status), status
    for run in runs:
        assert run.status.finished == (run.finished_at is not None)


async def attach_works(engine: Engine, path: Path) -> None:
    server = await engine.serve(str(path), announce=False)
    try:
        remote = RemoteEngine(server.address)
        try:
            snapshot = await remote.connect()
            assert {r.id for r in snapshot.runs} == {r.id for r in engine.runs(limit=500)}
            assert (await remote.snapshot()).node_id == engine.node_id
        finally:
            await remote.close()
    finally:
        await server.stop()


# ---------------------------------------------------------------- refused at submit


async def test_a_key_that_is_not_a_str_is_refused_before_anything_is_recorded() -> None:
    engine = make_engine(max_concurrency=1, max_queue=1)
    gate = asyncio.Event()

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    async with engine:
        await engine.submit("hold")
        before = engine.stats()
        with pytest.raises(InvalidKey, match="must be a str") as caught:
            await engine.submit("work", {"name": "a"}, key=42)  # type: ignore[arg-type]
        assert isinstance(caught.value, TaskwatchError)
        after = engine.stats()
        assert after.submitted_total == before.submitted_total
        assert after.by_status == before.by_status
        assert_consistent(engine)
        # the refused submit took no place in the queue: the one free place is still free
        handle = await engine.submit("work", {"name": "a"}, key="k")
        assert handle.status is RunStatus.PENDING
        gate.set()
        assert (await handle.wait(5)).status is RunStatus.SUCCEEDED
    assert engine.stats().by_status["pending"] == 0


async def test_an_empty_dedup_key_is_refused_not_taken_as_one_key_for_every_submit() -> None:
    # an empty form field passed on as key="": every such submit got the first one's run back,
    # whatever its params, in submit, submit_many and submit_nowait alike
    engine = make_engine()
    async with engine:
        refusals = {
            "submit": lambda: engine.submit("work", {"name": "a"}, key=""),
            "submit_many": lambda: engine.submit_many([{"task": "work", "params": {"name": "a"}, "key": ""}]),
            "submit_nowait": lambda: engine.submit_nowait("work", {"name": "a"}, key=""),
            "remote submit": lambda: RemoteEngine("tcp://127.0.0.1:9").submit("work", {"name": "a"}, key=""),
        }
        for what, call in refusals.items():
            with pytest.raises(InvalidKey, match="an empty key would make every submit given it the same run"):
                outcome = call()
                if asyncio.iscoroutine(outcome):
                    await outcome
            assert engine.runs() == [], what
        first = await engine.submit("work", {"name": "a"}, key=None)
        second = await engine.submit("work", {"name": "b"}, key=None)
        assert first.id != second.id


async def test_a_run_stored_with_an_empty_key_before_they_were_refused_is_retried_as_keyless(tmp_path: Path) -> None:
    # a store keeps runs submitted with key="" when that was taken: retry() of one raised
    # InvalidKey, from the API, the dashboard and the control endpoint alike
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}")
    async with engine:
        # not due for an hour: it stays pending until its cancel
        (old,) = await engine.store.insert([NewRun("work", params={"name": "a"}, key="", delay=3600)])
        await engine.store.request_cancel(old.id, "user")
        again = await engine.retry(old.id)
        assert (again.record().key, again.record().params) == (None, {"name": "a"})


class Upload(BaseModel):
    name: str
    header: bytes = b""
    parts: list[dict[str, bytes]] = []


class Base64Upload(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    body: bytes


async def test_params_holding_bytes_that_are_no_utf8_text_are_refused_at_their_field() -> None:
    # the error said "params: ... can't decode byte 0x89 in position 0", naming no field of a
    # model with several bytes fields, nor how a model carries any bytes
    engine = make_engine()

    @engine.task
    async def upload(ctx: TaskContext, params: Upload) -> None: ...

    @engine.task
    async def carried(ctx: TaskContext, params: Base64Upload) -> int:
        return len(params.body)

    async with engine:
        for params, field, path in [
            ({"name": "a", "header": b"\x89PNG"}, "header", "header"),
            ({"name": "a", "header": b"ok", "parts": [{"x": b"ok"}, {"x": b"\xff"}]}, "parts", "parts.1.x"),
        ]:
            with pytest.raises(InvalidParams) as refused:
                await engine.submit("upload", params)
            assert refused.value.errors[0]["loc"] == (field,)
            assert f"{path} holds bytes that are no UTF-8 text" in str(refused.value)
            assert "ser_json_bytes='base64'" in str(refused.value)
        assert engine.runs() == []
        handle = await engine.submit("carried", {"body": b"\x89PNG"})  # as the error advises
        assert (await handle.wait(5)).result == 4


async def test_params_and_keys_no_dashboard_could_decode_are_refused(tmp_path: Path) -> None:
    engine = make_engine()
    recorder = Recorder(engine)
    async with engine:
        with pytest.raises(InvalidParams, match="UTF-8"):
            await engine.submit("work", {"name": SURROGATE})
        with pytest.raises(InvalidParams, match="UTF-8"):
            await engine.submit("work", FileParams(name=SURROGATE))
        with pytest.raises(InvalidKey, match="surrogate"):
            await engine.submit("work", {"name": "ok"}, key=SURROGATE)
        assert engine.runs() == []
        assert "run.submitted" not in recorder.kinds()
        await attach_works(engine, tmp_path / "e.sock")


#: the most UTF-8 bytes of a key and of a name, on every store, as the README says
MAX_KEY_BYTES = 2048
MAX_NAME_BYTES = 512
#: keys as long in UTF-8 as a key may be, and a byte longer (two-byte characters: the limit is in
#: bytes, not characters), and names likewise
LONGEST_KEY = "é" * (MAX_KEY_BYTES // 2)
TOO_LONG_KEY = "k" + LONGEST_KEY
LONGEST_NAME = "n" * MAX_NAME_BYTES
#: a trigger's task is named ``trigger:NAME``, which is a name too
LONGEST_TRIGGER = "t" * (MAX_NAME_BYTES - len("trigger:"))


async def test_a_key_too_long_for_every_store_is_refused_at_once_and_the_longest_kept(tmp_path: Path) -> None:
    # a PostgreSQL store indexes keys beside their task's or trigger's name: a longer one failed
    # every save of its trigger there, retried for ever, losing all its keys' counts at a restart.
    # Refused on every store alike, a SQLite file's here, so code tried on one works on the other
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    engine = make_engine(store=db)

    async def compile_key(ctx: TaskContext, key: str) -> None:
        await asyncio.Event().wait()

    trigger = engine.trigger(LONGEST_TRIGGER, compile_key, size_threshold=100, save_interval=0.05)
    assert len(TOO_LONG_KEY) < MAX_KEY_BYTES < len(TOO_LONG_KEY.encode())
    async with engine:
        refusals = {
            "submit": lambda: engine.submit("work", {"name": "a"}, key=TOO_LONG_KEY),
            "notify": lambda: trigger.notify(TOO_LONG_KEY),
            "fire": lambda: trigger.fire(TOO_LONG_KEY),
            "fire_trigger": lambda: engine.fire_trigger(LONGEST_TRIGGER, TOO_LONG_KEY),
            "remote submit": lambda: RemoteEngine("tcp://127.0.0.1:9").submit("work", {"name": "a"}, key=TOO_LONG_KEY),
            "remote fire": lambda: RemoteEngine("tcp://127.0.0.1:9").fire_trigger(LONGEST_TRIGGER, TOO_LONG_KEY),
        }
        for what, call in refusals.items():
            with pytest.raises(InvalidKey) as caught:
                outcome = call()
                if asyncio.iscoroutine(outcome):
                    await outcome
            said = str(caught.value)
            assert f"{MAX_KEY_BYTES + 1} bytes long in UTF-8, over the {MAX_KEY_BYTES}" in said, what
            assert "hashlib.sha256" in said, what
            assert isinstance(caught.value, ValueError)
        assert engine.runs() == [] and trigger.key_count == 0
        handle = await engine.submit("work", {"name": "a"}, key=LONGEST_KEY)
        assert (await handle.wait(5)).status is RunStatus.SUCCEEDED
        trigger.notify(LONGEST_KEY, 3)
        await eventually(lambda: trigger.state().keys[0].count == 3)
    # the longest key, beside the longest name, was saved and is read back by the next start
    again = make_engine(store=db)
    kept = again.trigger(LONGEST_TRIGGER, compile_key, size_threshold=100)
    async with again:
        assert [(k.key, k.count) for k in kept.state().keys] == [(LONGEST_KEY, 3)]
        assert [r.key for r in again.runs()] == [LONGEST_KEY]


async def test_a_name_too_long_to_index_beside_a_key_is_refused() -> None:
    engine = make_engine()
    too_long = "é" * (MAX_NAME_BYTES // 2) + "x"

    async def handler(job: Any) -> None:
        return None

    makers = {
        "task": lambda: engine.task(name=too_long)(handler),
        "queue": lambda: engine.queue(too_long, handler),
        "trigger": lambda: engine.trigger(too_long, handler),
    }
    for what, make in makers.items():
        with pytest.raises(InvalidConfiguration, match=f"{MAX_NAME_BYTES + 1} bytes long in UTF-8") as caught:
            make()
        assert f"over the {MAX_NAME_BYTES} a name may have" in str(caught.value), what
    with pytest.raises(InvalidConfiguration, match="bytes long"):
        Engine(node_id=too_long, health_interval=None)
    engine.queue(LONGEST_NAME, handler)  # as long as a name may be


class Measure(BaseModel):
    value: float
    extra: dict[str, Any] = {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
async def test_params_and_results_json_cannot_carry_are_refused_not_shown_as_null(bad: float, tmp_path: Path) -> None:
    # JSON has no NaN or infinity: dashboards would see null where the run holds another value
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}")

    @engine.task
    async def measure(ctx: TaskContext, params: Measure) -> None: ...

    @engine.task
    async def loss(ctx: TaskContext) -> dict[str, Any]:
        return {"loss": bad, "epochs": 3}

    recorder = Recorder(engine)
    async with engine:
        with pytest.raises(InvalidParams, match="value is .*JSON cannot carry"):
            await engine.submit("measure", {"value": bad})
        # named where it is, at its field (a form shows it there), not as "reads back as another value"
        with pytest.raises(InvalidParams, match=r"extra\['deep'\]\[1\] is .*JSON cannot carry") as caught:
            await engine.submit("measure", Measure(value=1.0, extra={"deep": [0.5, bad]}))
        assert [e["loc"] for e in caught.value.errors] == [("extra",)]
        with pytest.raises(InvalidParams, match="value is .*JSON cannot carry") as caught:
            await engine.submit("measure", Measure(value=bad))
        assert [e["loc"] for e in caught.value.errors] == [("value",)]
        assert engine.runs() == [] and "run.submitted" not in recorder.kinds()
        record = await (await engine.submit("loss")).wait(5)
        assert record.status is RunStatus.FAILED and record.result is None
        assert record.error is not None and record.error.type == "ResultNotSerializable"
        assert "loss is" in record.error.message and "use None or a string" in record.error.message
        assert (await (await engine.submit("measure", {"value": 2.5})).wait(5)).status is RunStatus.SUCCEEDED
        assert_consistent(engine)
        await attach_works(engine, tmp_path / "e.sock")


def nested(depth: int) -> Any:
    """``depth`` dicts, each inside the one before."""
    value: Any = "leaf"
    for _ in range(depth):
        value = {"child": value}
    return value


class Blob(BaseModel):
    data: Any


#: one digit more than JSON readers take (and Python's int() from text, by default)
HUGE = 10**4300


@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_values_json_readers_refuse_are_refused_so_every_dashboard_can_still_attach(
    store: str, tmp_path: Path
) -> None:
    # the encoder writes values nested past a reader's depth, or ints past its digits; recorded,
    # each would stop every dashboard attaching for as long as its run is kept (and the SQLite
    # store from claiming anything after it)
    engine = make_engine(store=f"sqlite:///{tmp_path / 'runs.db'}" if store == "sqlite" else "memory")

    @engine.task
    async def echo(ctx: TaskContext, params: Blob) -> Any:
        return params.data

    @engine.task
    async def deep(ctx: TaskContext) -> Any:
        return nested(101)

    @engine.task
    async def huge(ctx: TaskContext) -> Any:
        return {"n": HUGE}

    recorder = Recorder(engine)
    async with engine:
        # params hold one level more than their data: nested(100) is 101 deep
        for bad, why in ((nested(100), "nested more than 100 levels"), (nested(300), "nested more than 100"),
                         ([1, -HUGE], "more than 4300 digits")):
            with pytest.raises(InvalidParams, match=why):
                await engine.submit("echo", {"data": bad})
            with pytest.raises(InvalidParams, match=why):
                await engine.submit_many([("echo", {"data": 1}), ("echo", {"data": bad})])
        assert engine.runs() == [] and "run.submitted" not in recorder.kinds()

        for task, why in (("deep", "nested more than 100 levels"), ("huge", "more than 4300 digits")):
            record = await (await engine.submit(task)).wait(5)
            assert record.status is RunStatus.FAILED and record.result is None, task
            assert record.error is not None and record.error.type == "ResultNotSerializable"
            assert why in record.error.message
        # right at the limits, values go through, and read back as they were
        fine = {"data": [nested(98), 10**4299, "9" * 10_000]}  # 100 levels: params, list, 98 dicts
        record = await (await engine.submit("echo", fine)).wait(5)
        assert record.status is RunStatus.SUCCEEDED and record.result == fine["data"]
        assert (await engine.fetch_run(record.id)).params == fine
        assert_consistent(engine)
        await attach_works(engine, tmp_path / "e.sock")

        async def handle(job: Any) -> None: ...

        queue = engine.queue("jobs", handle)
        with pytest.raises(JobNotSerializable, match="nested more than 100 levels"):
            await queue.put(nested(101))
        assert queue.depth == 0


class Handle:
    """Something pydantic validates by isinstance and makes no JSON schema for."""


class WithHandle(BaseModel):
    model_config = ConfigDict(arbitrary_types_allowed=True)

    handle: Handle | None = None
    n: int = 1


async def test_a_params_model_with_no_json_schema_runs_and_dashboards_still_attach(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine()

    @engine.task
    async def count(ctx: TaskContext, params: WithHandle) -> int:
        return params.n

    (warning,) = [r.getMessage() for r in caplog.records if "no JSON schema" in r.getMessage()]
    assert "'count'" in warning and "WithJsonSchema" in warning
    async with engine:
        (info,) = [t for t in engine.snapshot().tasks if t.name == "count"]
        assert "no JSON schema" in info.params_schema["description"]
        assert (await (await engine.submit("count", {"n": 3})).wait(5)).result == 3
        assert_consistent(engine)
        await attach_works(engine, tmp_path / "e.sock")


@pytest.mark.parametrize("n", [0.5, -3, 0, True, "2", None])
async def test_a_trigger_count_that_is_not_a_whole_number_is_refused(n: object, tmp_path: Path) -> None:
    engine = make_engine()

    async def compile_key(ctx: TaskContext, key: str) -> None:
        return None

    compile_ = engine.trigger("compile", compile_key, size_threshold=3)
    async with engine:
        compile_.notify("bank-1", 2)
        with pytest.raises(InvalidCount, match="nothing was counted") as caught:
            compile_.notify("bank-1", n)  # type: ignore[arg-type]
        assert isinstance(caught.value, TaskwatchError)
        with pytest.raises(InvalidCount):
            compile_.notify("bank-2", n)  # type: ignore[arg-type]
        # nothing counted, no key made; the trigger's state and the snapshot still read
        assert [(k.key, k.count) for k in compile_.state().keys] == [("bank-1", 2)]
        assert_consistent(engine)
        await attach_works(engine, tmp_path / "e.sock")
        compile_.notify("bank-1", numpy_like(1))
        await asyncio.wait_for(compile_.drain(), 5)
        assert compile_.state().fired == 1


class numpy_like:
    """An integer type that is not an int (numpy's are such): counted through ``__index__``."""

    def __init__(self, value: int) -> None:
        self.value = value

    def __index__(self) -> int:
        return self.value


class Tagged(BaseModel):
    n: int
    tags: list[str] = []


class Login(BaseModel):
    user: str
    password: SecretStr


class Hidden(BaseModel):
    a: int
    b: int = Field(exclude=True)


async def test_a_params_model_is_validated_and_the_task_runs_with_a_copy_of_its_own() -> None:
    engine = make_engine(max_concurrency=1)
    gate = asyncio.Event()
    seen: list[tuple[int, list[str]]] = []

    @engine.task
    async def hold(ctx: TaskContext) -> None:
        await gate.wait()

    @engine.task
    async def tagged(ctx: TaskContext, params: Tagged) -> None:
        seen.append((params.n, params.tags))

    async with engine:
        with pytest.raises(InvalidParams, match="n"):
            await engine.submit("tagged", Tagged.model_construct(n="not a number"))
        assert engine.runs() == []
        await engine.submit("hold")
        params = Tagged(n=1, tags=["a"])
        handle = await engine.submit("tagged", params)
        params.tags.append("b")  # the caller's object changes after the submit
        gate.set()
        record = await handle.wait(5)
    assert seen == [(1, ["a"])]
    assert record.params == {"n": 1, "tags": ["a"]}


@pytest.mark.parametrize(
    ("model", "params", "field"),
    [(Login, {"user": "ann", "password": "s3cret"}, "password"), (Hidden, {"a": 1, "b": 2}, "b")],
)
async def test_params_that_do_not_read_back_from_their_record_are_refused(
    model: type[BaseModel], params: dict[str, Any], field: str
) -> None:
    # a retry, a durable store's next start and another node run the task with the params
    # read back from the record: a masked secret or a dropped field would run as another value
    engine = make_engine()

    async def task(ctx: TaskContext, p: BaseModel) -> None:
        return None

    engine.task(name="lossy", params=model)(task)
    async with engine:
        for given in (params, model(**params)):
            with pytest.raises(InvalidParams, match="once recorded as JSON") as caught:
                await engine.submit("lossy", given)
            assert field in str(caught.value)
        assert engine.runs() == []


class Aliased(BaseModel):
    user_id: str = Field(alias="userId")


class Spans(BaseModel):
    model_config = ConfigDict(extra="allow")
    spans: dict[str, Any]
    inner: Tagged | None = None


async def test_params_that_read_back_as_the_same_values_are_taken_as_they_come() -> None:
    # an alias-only field, tuples (JSON has lists), extra fields: a retry or another node
    # reads them back as the same values, so they are taken, and recorded by alias
    engine = make_engine()
    seen: list[BaseModel] = []

    async def task(ctx: TaskContext, p: BaseModel) -> None:
        seen.append(p)

    engine.task(name="aliased", params=Aliased)(task)
    engine.task(name="spans", params=Spans)(task)
    async with engine:
        record = await (await engine.submit("aliased", {"userId": "u1"})).wait(5)
        assert record.params == {"userId": "u1"} and seen[-1] == Aliased(userId="u1")
        given = Spans(spans={"a": (1, 2)}, inner=Tagged(n=1, tags=["x"]), note="kept")
        record = await (await engine.submit("spans", given)).wait(5)
        assert record.status is RunStatus.SUCCEEDED
        assert record.params == {"spans": {"a": [1, 2]}, "inner": {"n": 1, "tags": ["x"]}, "note": "kept"}
        assert seen[-1].model_extra == {"note": "kept"}


# ---------------------------------------------------------------- contained to the run


async def test_a_result_no_dashboard_could_decode_fails_that_run_only(tmp_path: Path) -> None:
    engine = make_engine()

    @engine.task
    async def listing(ctx: TaskContext) -> list[str]:
        return [SURROGATE]

    @engine.task
    async def raw_bytes(ctx: TaskContext) -> bytes:
        return b"\xff\xfe"

    @engine.task
    async def noisy(ctx: TaskContext) -> None:
        await ctx.progress(1, 2, f"reading {SURROGATE}")
        raise ValueError(f"cannot open {SURROGATE}")

    async with engine:
        for task in ("listing", "raw_bytes"):
            record = await (await engine.submit(task)).wait(5)
            assert record.status is RunStatus.FAILED, task
            assert record.error is not None and record.error.type == "ResultNotSerializable", record.error
            assert record.result is None
        record = await (await engine.submit("noisy")).wait(5)
        assert record.status is RunStatus.FAILED
        assert record.error is not None
        assert "\\udcff" in record.error.message  # escaped, still readable
        assert "\\udcff" in record.progress.message
        assert (await (await engine.submit("work", {"name": "fine"})).wait(5)).result == "fine"
        assert_consistent(engine)
        await attach_works(engine, tmp_path / "e.sock")


async def test_a_progress_report_the_event_refuses_leaves_the_record_valid() -> None:
    engine = make_engine()

    @engine.task
    async def bad_progress(ctx: TaskContext) -> None:
        await ctx.progress("lots")  # type: ignore[arg-type]

    async with engine:
        record = await (await engine.submit("bad_progress")).wait(5)
        assert record.status is RunStatus.FAILED
        assert record.progress.done == 0
        assert_consistent(engine)


@pytest.mark.parametrize("done", [float("nan"), float("inf"), -float("inf")])
async def test_a_progress_report_that_is_not_a_finite_number_changes_nothing(done: float, tmp_path: Path) -> None:
    # JSON has no NaN or infinity: taken, it would reach every attached dashboard as null
    engine = make_engine()
    reported = asyncio.Event()
    release = asyncio.Event()
    raised: list[BaseException] = []

    @engine.task
    async def odd_progress(ctx: TaskContext) -> None:
        await ctx.progress(1, 4, "a quarter")
        for value in ({"done": done}, {"done": 2, "total": done}, {"done": 2, "message": 3}):
            try:
                await ctx.progress(**value)  # type: ignore[arg-type]
            except InvalidProgress as exc:
                raised.append(exc)
        reported.set()
        await release.wait()

    async with engine:
        handle = await engine.submit("odd_progress")
        await asyncio.wait_for(reported.wait(), 5)
        assert [str(exc).split(": ", 1)[1].split(";")[0] for exc in raised] == [
            f"done should be a finite number, got {done!r}",
            f"total should be a finite number, got {done!r}",
            "message should be a valid string, got 3",
        ]
        assert all(isinstance(exc, TaskwatchError) and "ctx.progress(3, 10" in str(exc) for exc in raised)
        progress = engine.get(handle.id).progress
        assert (progress.done, progress.total, progress.message) == (1, 4, "a quarter")
        assert_consistent(engine)
        await attach_works(engine, tmp_path / "e.sock")
        release.set()
        assert (await handle.wait(5)).status is RunStatus.SUCCEEDED


@pytest.mark.parametrize("done", ["3", True, b"3"])
async def test_a_progress_amount_given_as_text_or_a_bool_is_refused(done: Any) -> None:
    # "3" converted and True read as 1: neither is an amount of work the task meant
    engine = make_engine()
    raised: list[BaseException] = []

    @engine.task
    async def wordy(ctx: TaskContext) -> None:
        await ctx.progress(1, 4, "a quarter")
        for value in ({"done": done}, {"done": 2, "total": done}):
            try:
                await ctx.progress(**value)
            except InvalidProgress as exc:
                raised.append(exc)

    async with engine:
        record = await (await engine.submit("wordy")).wait(5)
        assert [str(exc).split(": ", 1)[1].split(";")[0] for exc in raised] == [
            f"done should be a number, not a bool or text, got {done!r}",
            f"total should be a number, not a bool or text, got {done!r}",
        ]
        assert (record.progress.done, record.progress.total) == (1, 4)


async def test_progress_reported_after_the_run_ended_changes_nothing() -> None:
    engine = make_engine()
    recorder = Recorder(engine, ("run.",))
    contexts: list[TaskContext] = []

    @engine.task
    async def quick(ctx: TaskContext) -> str:
        contexts.append(ctx)  # kept by something the task leaves behind
        await ctx.progress(1, 2)
        return "done"

    async with engine:
        record = await (await engine.submit("quick")).wait(5)
        await contexts[0].progress(2, 2, "late")
        after = engine.get(record.id)
        assert (after.progress.done, after.progress.message) == (1, "")
        assert recorder.kinds()[-1] == "run.succeeded"


async def test_a_task_that_swallows_its_timeout_and_returns_fails_with_a_timeout() -> None:
    engine = make_engine()
    swallowed = asyncio.Event()

    @engine.task(timeout=0.05)
    async def stubborn(ctx: TaskContext) -> str:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            swallowed.set()
        return "finished anyway"

    async with engine:
        record = await (await engine.submit("stubborn")).wait(5)
        assert swallowed.is_set()
        assert record.status is RunStatus.FAILED
        assert record.error is not None and record.error.type == "TimeoutError"
        assert "0.05 s timeout" in record.error.message
        assert record.result is None
        assert_consistent(engine)


async def test_a_task_that_swallows_a_user_cancel_and_returns_ends_cancelled() -> None:
    engine = make_engine()
    started = asyncio.Event()
    recorder = Recorder(engine, ("run.",))

    @engine.task
    async def stubborn(ctx: TaskContext) -> str:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            pass
        return "finished anyway"

    async with engine:
        handle = await engine.submit("stubborn")
        await started.wait()
        record = await engine.cancel(handle.id, grace=5)
        assert record.status is RunStatus.CANCELLED
        assert record.cancel_reason == "user"
        assert record.result is None
        assert [e.kind for e in recorder.events if e.run_id == handle.id][-1] == "run.cancelled"
        assert engine.stats().succeeded_total == 0


async def test_a_queue_job_that_refers_to_itself_is_refused_with_a_typed_error() -> None:
    engine = make_engine()
    handled: list[Any] = []

    async def handler(job: Any) -> None:
        handled.append(job)

    async with engine:
        queue = engine.queue("jobs", handler)
        circular: list[Any] = []
        circular.append(circular)
        with pytest.raises(JobNotSerializable, match="circular"):
            await queue.put(circular)
        with pytest.raises(JobNotSerializable):
            await queue.put({"path": SURROGATE})
        assert queue.depth == 0
        await queue.put({"n": 1})
        await eventually(lambda: handled == [{"n": 1}])


# ---------------------------------------------------------------- BaseException from task code

_BASE_EXCEPTIONS_SCRIPT = textwrap.dedent(
    """
    import asyncio, json, sys
    from taskwatch.engine import Engine, TaskContext

    class Custom(BaseException):
        pass

    RAISERS = {
        "system_exit": lambda: SystemExit(3),
        "keyboard_interrupt": lambda: KeyboardInterrupt(),
        "generator_exit": lambda: GeneratorExit(),
        "custom": lambda: Custom("custom base exception"),
    }

    async def main():
        engine = Engine(health_interval=None)
        def raising(make):
            async def fn(ctx: TaskContext) -> None:
                raise make()
            return fn

        for name, make in RAISERS.items():
            engine.register(raising(make), name=name)

        @engine.task
        async def innocent(ctx: TaskContext) -> str:
            await asyncio.sleep(0.05)
            return "fine"

        async with engine:
            others = [await engine.submit("innocent") for _ in range(3)]
            handles = {name: await engine.submit(name) for name in RAISERS}
            out = {}
            for name, handle in handles.items():
                record = await handle.wait(5)
                out[name] = [record.status.value, record.error and record.error.type,
                             bool(record.error and record.error.traceback)]
            out["innocent"] = [(await h.wait(5)).status.value for h in others]
            out["after"] = (await (await engine.submit("innocent")).wait(5)).status.value
            out["state"] = engine.state
        print(json.dumps(out), flush=True)

    asyncio.run(main())
    """
)


def test_base_exceptions_from_tasks_fail_their_run_and_the_program_goes_on() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _BASE_EXCEPTIONS_SCRIPT], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert "never retrieved" not in proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["system_exit"] == ["failed", "SystemExit", True]
    assert out["keyboard_interrupt"] == ["failed", "KeyboardInterrupt", True]
    assert out["generator_exit"] == ["failed", "GeneratorExit", True]
    assert out["custom"] == ["failed", "Custom", True]
    assert out["innocent"] == ["succeeded"] * 3
    assert out["after"] == "succeeded"
    assert out["state"] == "running"


def _background_engine() -> tuple[Engine, asyncio.Event]:
    engine = make_engine(cancel_grace=1.0)
    gate = asyncio.Event()

    @engine.task
    async def exits(ctx: TaskContext) -> None:
        sys.exit(4)

    @engine.task
    async def innocent(ctx: TaskContext) -> None:
        await gate.wait()

    return engine, gate


def test_system_exit_in_a_background_task_leaves_the_loop_serving() -> None:
    engine, _ = _background_engine()
    bg = engine.start_background()
    try:
        innocent = bg.submit("innocent")
        record = bg.submit("exits").wait(5)
        assert record.status is RunStatus.FAILED
        assert record.error is not None and record.error.type == "SystemExit"
        assert bg.state == "running" and engine.state == "running"
        assert innocent.record().status is RunStatus.RUNNING
        # a facade call that raises SystemExit raises it here, in the caller's thread
        with pytest.raises(SystemExit):
            bg.call(lambda e: sys.exit(5))
        assert bg.state == "running"
        assert bg.submit("noop").wait(5).status is RunStatus.SUCCEEDED
    finally:
        bg.stop(timeout=0)


def test_a_dead_background_loop_says_so_and_callers_get_its_cause() -> None:
    engine, _ = _background_engine()
    recorder = Recorder(engine)
    bg = engine.start_background()
    innocent = bg.submit("innocent")
    assert bg.state == "running"

    def kill_the_loop(e: Engine) -> None:
        def boom() -> None:
            raise SystemExit("the loop's own callback exited")

        asyncio.get_running_loop().call_soon(boom)

    bg.call(kill_the_loop)
    bg.thread.join(10)
    assert not bg.thread.is_alive()
    assert bg.state == "failed"
    assert isinstance(bg.error, SystemExit)
    with pytest.raises(EngineCrashed, match="SystemExit") as caught:
        bg.submit("noop")
    assert "the loop's own callback exited" in str(caught.value)
    # the engine was stopped on its way out: runs ended, stop published, state true
    assert engine.state == "stopped"
    assert "engine.stopped" in recorder.kinds()
    cancelled = [e for e in recorder.of("run.cancelled") if e.run_id == innocent.id]
    assert cancelled and cancelled[0].reason == "shutdown"
    assert not any(t.name.startswith("taskwatch-") and t.is_alive() for t in threading.enumerate())
    bg.stop()  # idempotent after a crash


# ---------------------------------------------------------------- nonsense configuration


async def _tick(ctx: TaskContext) -> None: ...


async def _fn(ctx: TaskContext) -> None: ...


@pytest.mark.parametrize(
    ("register", "option"),
    [
        (lambda e: e.periodic(_tick, every=1e-9), "every"),
        (lambda e: e.periodic(_tick, every=True), "every"),
        (lambda e: e.periodic(_tick, every=math.inf), "every"),
        (lambda e: e.task(_fn, timeout=math.nan), "timeout"),
        (lambda e: e.task(_fn, timeout=0), "timeout"),
        (lambda e: e.task(_fn, backoff=-1.0), "backoff"),
        (lambda e: e.task(_fn, backoff=math.nan), "backoff"),
        (lambda e: e.task(_fn, backoff_max=math.nan), "backoff_max"),
        # a cap below the first delay would make every delay the cap, silently
        (lambda e: e.task(_fn, backoff=10, backoff_max=1), "backoff_max"),
        (lambda e: e.task(_fn, name="a\nb"), "name"),
        (lambda e: e.task(_fn, retries=True), "retries"),
        (lambda e: e.task(_fn, concurrency=0), "concurrency"),
        (lambda e: e.queue("q", _fn, concurrency=0), "concurrency"),
        (lambda e: e.trigger("t", _fn, size_threshold=5, staleness=math.nan), "staleness"),
        (lambda e: e.supervised(_tick, backoff=math.inf), "backoff"),
        (lambda e: e.task(_fn, name=""), "name"),
        (lambda e: e.task(_fn, name=["x"]), "name"),
        (lambda e: e.task(_fn, name="report-\udcff"), "name"),
    ],
)
def test_nonsense_configuration_is_refused_at_registration(register: Any, option: str) -> None:
    engine = Engine(health_interval=None)
    with pytest.raises(InvalidConfiguration, match=option) as caught:
        register(engine)
    assert isinstance(caught.value, TaskwatchError) and isinstance(caught.value, ValueError)
    assert engine.tasks() == {} and engine.schedule() == [] and engine.queues() == [] and engine.workers() == []


async def test_numbers_given_as_text_are_read_as_numbers_as_validated() -> None:
    # "0.5" passes the option check as 0.5; kept as the string, it broke the first retry
    engine = Engine(health_interval=None)
    calls: list[int] = []

    @engine.task(retries=1, backoff="0.01", timeout="5")  # type: ignore[arg-type]
    async def flaky(ctx: TaskContext) -> None:
        calls.append(ctx.attempt)
        if ctx.attempt == 1:
            raise RuntimeError("first try fails")

    spec = engine.tasks()["flaky"]
    assert (spec.retries, spec.backoff, spec.timeout) == (1, 0.01, 5.0)
    async with engine:
        record = await (await engine.submit("flaky")).wait(timeout=5)
    assert record.status == "succeeded" and calls == [1, 2]


@pytest.mark.parametrize("requires", ["redis", b"redis", ("redis", 1), 5])
def test_requires_that_is_not_a_tuple_of_names_is_refused_with_the_way_to_write_it(requires: Any) -> None:
    engine = Engine(health_interval=None)

    async def warm(ctx: TaskContext, redis: Any) -> None: ...

    with pytest.raises(TaskDefinitionError, match=r"requires takes a tuple of resource names, such as requires=\('redis',\)"):
        engine.periodic(every=5, requires=requires)(warm)
    assert engine.tasks() == {} and engine.schedule() == []
    engine.periodic(every=5, requires={"redis"})(warm)  # any collection of names will do
    engine.periodic(every=5, requires=(n for n in ["redis"]), name="warm2")(warm)  # a generator too, read once
    assert [p.requires for p in engine.schedule()] == [("redis",), ("redis",)]


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"cancel_grace": -1.0}, "cancel_grace"),
        ({"health_interval": -1.0}, "health_interval"),
        ({"health_interval": 0}, "health_interval"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"history": -1}, "history"),
        ({"throughput_window": math.nan}, "throughput_window"),
        ({"backend": "celery"}, "backend"),
        ({"lease": "redis://cache"}, "Lease"),
        ({"store": "sqlite:///runs.db?synchronous=fulll"}, "synchronous"),
        ({"store": "sqlite:///runs.db?busy_timeout=-1"}, "busy_timeout"),
        ({"store": "sqlite:///runs.db?lease_ttl=nan"}, "lease_ttl"),
        ({"store": "sqlite:///runs.db?lease_ttl=0.001"}, "lease_ttl"),
        ({"store": "sqlite:///runs.db?node_ttl=-1"}, "node_ttl"),
        ({"store": "postgresql://app@127.0.0.1/app?reconnect_timeout=-5"}, "reconnect_timeout"),
        ({"store": "postgresql://app@127.0.0.1/app?lease_ttl=inf"}, "lease_ttl"),
    ],
)
def test_nonsense_engine_options_are_refused(options: dict[str, Any], option: str) -> None:
    with pytest.raises(InvalidConfiguration, match=option):
        Engine(**options)


@pytest.mark.parametrize("lease", [InProcessLease, PostgresLease])
@pytest.mark.parametrize(
    "options", [{"ttl": 0}, {"ttl": -1.0}, {"ttl": True}, {"ttl": math.nan}, {"ttl": 1.0, "renew_interval": 0.6}]
)
def test_nonsense_lease_options_are_refused(lease: Any, options: dict[str, Any]) -> None:
    args = ("postgresql://app@127.0.0.1/app",) if lease is PostgresLease else ()
    with pytest.raises(InvalidConfiguration, match=lease.__name__):
        lease(*args, **options)


@pytest.mark.parametrize(
    "options",
    [
        {"hello_timeout": True}, {"hello_timeout": math.inf}, {"hello_timeout": 1e-9}, {"write_timeout": math.nan},
        {"write_timeout": -1}, {"write_timeout": "10"}, {"max_connections": True}, {"max_connections": "64"},
        {"max_inflight": 2.5}, {"snapshot_runs": -5}, {"outgoing": 1}, {"announce": "no"},
    ],
    ids=str,
)
async def test_nonsense_control_server_options_are_refused_and_nothing_is_served(
    options: dict[str, Any], tmp_path: Path
) -> None:
    engine = make_engine()
    sock = tmp_path / "c.sock"
    async with engine:
        (option,) = options
        with pytest.raises(InvalidConfiguration, match=f"ControlServer.*{option}="):
            await engine.serve(str(sock), **options)
        assert not sock.exists()
        server = await engine.serve(str(sock), announce=False)  # the engine serves as it would have
        assert sock.exists()
        await server.stop()


async def test_a_status_or_an_address_that_names_nothing_is_refused_with_a_typed_error() -> None:
    engine = make_engine()
    async with engine:
        await engine.submit("work", {"name": "a"})
        with pytest.raises(InvalidStatus, match="use one of pending, running, succeeded, failed, cancelled"):
            engine.runs(status="done")
        with pytest.raises(InvalidStatus, match="'done'"):
            engine.runs(status=["failed", "done"])
        for address, why in [
            ("tcp://127.0.0.1:http", "port"),
            ("tcp://:8080", "no host"),
            ("unix:", "empty"),
            ("http://127.0.0.1:80", "only tcp:// and unix:"),
            ("tcp://0.0.0.0:0", "non-loopback"),
        ]:
            with pytest.raises(InvalidAddress, match=why):
                await engine.serve(address)
        server = await engine.serve("tcp://127.0.0.1:0")  # the refusals left nothing half open
        async with RemoteEngine(server.address, token=server.token) as remote:
            assert await remote.ping() >= 0
    assert stray_tasks() == set()


async def test_a_refused_address_never_echoes_a_password_and_names_what_was_written() -> None:
    engine = make_engine()
    async with engine:
        for address, shown, why in [
            ("postgresql://app:s3cret@db/prod", "postgresql://app:***@db/prod", "only tcp:// and unix:"),
            # a tcp:// address takes no user part at all: none of it is shown (a token may be the user)
            ("tcp://app:s3cret@127.0.0.1:99999", "tcp://***@127.0.0.1:99999", "no user part"),
            ("tcp://app:s3cret@[::1:7070", "tcp://…", "IPv6"),  # too malformed to find the password in
            ("unix://", "unix://", "empty"),
        ]:
            with pytest.raises(InvalidAddress, match=why) as caught:
                await engine.serve(address)
            assert f"bad address {shown!r}" in str(caught.value)
            assert "s3cret" not in str(caught.value) and "s3cret" not in repr(caught.value.address)
        with pytest.raises(InvalidAddress, match="IPv6"):
            RemoteEngine("tcp://[::1:7070")

async def test_every_refusal_leaves_no_task_behind() -> None:
    engine = make_engine()
    async with engine:
        for bad in ({"name": 1}, {"name": SURROGATE}, {"nope": 1}):
            with pytest.raises(InvalidParams):
                await engine.submit("work", bad)
        assert engine.runs() == []
        assert_consistent(engine)
    assert stray_tasks() == set()


async def test_a_huge_error_is_kept_cut_to_a_bound_that_says_so() -> None:
    # every event, record, snapshot and store row carries a failure: a 20 MB message (or a chain
    # thousands deep) must not make each of them megabytes, and what is kept says it was cut
    engine = Engine(health_interval=None)

    @engine.task
    async def loud(ctx: TaskContext) -> None:
        raise ValueError("spam " * 4_000_000)

    @engine.task
    async def chained(ctx: TaskContext) -> None:
        error: Exception = KeyError("the first failure")
        for n in range(2_000):
            try:
                raise error
            except Exception as exc:
                error = RuntimeError(f"while handling level {n}")
                error.__cause__ = exc
        raise error

    async with engine:
        big = await (await engine.submit("loud")).wait()
        deep = await (await engine.submit("chained")).wait()
        assert big.status is RunStatus.FAILED and big.error is not None
        assert big.error.message.startswith("spam spam") and big.error.message.endswith("spam ")
        assert is_truncated(big.error.message)  # cut as the wire cuts text: dashboards say so
        assert len(big.error.message) < 10_000 and len(big.error.traceback) < 70_000
        assert deep.error is not None and is_truncated(deep.error.traceback)
        assert "the first failure" in deep.error.traceback  # the chain's start
        assert deep.error.traceback.rstrip().endswith("RuntimeError: while handling level 1999")  # and its end
        assert len(engine.snapshot().model_dump_json()) < 1_000_000


@pytest.mark.parametrize(
    ("item", "said"),
    [
        ({"task": "noop", "kye": "dedup"}, "has field(s) kye"),
        ({"params": {}}, "names no task"),
        ("noop", "is 'noop'"),
        (("noop", None, "extra"), "is ("),
    ],
)
@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_malformed_submit_many_item_is_refused_and_nothing_is_queued(
    item: Any, said: str, store: str, tmp_path: Path
) -> None:
    # a misspelled key would have queued the run without its dedup key, silently
    engine = make_engine(store="memory" if store == "memory" else f"sqlite:///{tmp_path / 'runs.db'}")
    async with engine:
        with pytest.raises(InvalidSubmission, match=re.escape(f"item 1 of submit_many {said}")):
            await engine.submit_many([("noop", None), item])
        assert engine.runs(limit=None) == [] and (await engine.query_runs()).runs == []
        # a pair as a list (read from JSON, say) is a pair all the same
        [handle] = await engine.submit_many([["noop", None]])
        assert (await handle.wait(5)).status is RunStatus.SUCCEEDED


@pytest.mark.parametrize(
    ("query", "said"),
    [
        ({"before": "nope"}, "before='nope' is no page's cursor"),
        ({"since": "yesterday"}, "since='yesterday' is no time"),
        ({"since": math.nan}, "since=nan is no time"),
        ({"limit": -5}, "limit=-5"),
        ({"limit": True}, "limit=True"),
        ({"limit": 10**30}, "limit=1000000000000000000000000000000"),
        ({"before": "99999999999999999999"}, "before='99999999999999999999' is no page's cursor"),
        ({"task": 5}, "task=5"),
    ],
)
@pytest.mark.parametrize("store", ["memory", "sqlite"])
async def test_a_runs_query_that_can_select_nothing_says_why(
    query: dict[str, Any], said: str, store: str, tmp_path: Path
) -> None:
    engine = make_engine(store="memory" if store == "memory" else f"sqlite:///{tmp_path / 'runs.db'}")
    async with engine:
        await (await engine.submit("noop")).wait()
        with pytest.raises(InvalidQuery, match=re.escape(said)):
            await engine.query_runs(**query)
        page = await engine.query_runs(limit=1)
        assert len(page.runs) == 1  # a good query still reads


@pytest.mark.parametrize("node_id", [5, "api\x001", "api\n1", "report-\udcff"])
def test_a_node_id_no_event_or_store_could_carry_is_refused(node_id: Any) -> None:
    # a NUL made a PostgreSQL store refuse the node at start with a "check the server is up"
    # error; an int broke every event naming the node
    with pytest.raises(InvalidConfiguration, match="node_id"):
        Engine(node_id=node_id, health_interval=None)


def test_an_empty_node_id_means_the_default() -> None:
    # (an unset environment variable, read as "", must not name a node "")
    assert Engine(node_id="", health_interval=None).node_id != ""


async def test_a_source_no_store_could_keep_is_refused_and_queues_nothing() -> None:
    engine = Engine(health_interval=None)

    @engine.task
    async def t(ctx: TaskContext) -> None: ...

    async with engine:
        for source in ("x\x00y", 5):
            with pytest.raises(InvalidConfiguration, match="source"):
                engine.submit_nowait("t", source=source)  # type: ignore[arg-type]
        assert engine.runs() == []
        assert engine.submit_nowait("t", source="import:batch-7").record().source == "import:batch-7"
