"""Options misspelled, left out or of the wrong kind, met where the user called: a typed error
naming the method they called and the option, with nothing registered, started or recorded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from taskwatch.engine import (
    Engine,
    InvalidConfiguration,
    InvalidKey,
    RunStatus,
    TaskContext,
    TaskwatchError,
)

from .helpers import Recorder, taskwatch_threads


def make_engine() -> Engine:
    engine = Engine(health_interval=None)

    @engine.task
    async def job(ctx: TaskContext) -> str:
        return "done"

    return engine


async def on_key(ctx: TaskContext, key: str) -> None:
    return None


# ---------------------------------------------------------------- a key is a value


async def test_a_nul_in_a_key_is_caught_by_except_value_error_and_records_nothing() -> None:
    engine = make_engine()
    recorder = Recorder(engine)
    async with engine:
        before = engine.stats()
        caught: ValueError | None = None
        try:
            await engine.submit("job", key="dedup\x00")
        except ValueError as exc:  # what code written for bad values already catches
            caught = exc
        assert isinstance(caught, InvalidKey) and isinstance(caught, TaskwatchError)
        assert "NUL" in str(caught)
        # a key that is no str at all is a wrong type: except TypeError still catches it
        with pytest.raises(TypeError):
            await engine.submit("job", key=42)  # type: ignore[arg-type]
        after = engine.stats()
        assert after.submitted_total == before.submitted_total
        assert after.by_status == before.by_status
        assert engine.runs() == []
        assert "run.submitted" not in recorder.kinds()
        # the same key without its NUL is taken
        handle = await engine.submit("job", key="dedup")
        assert (await handle.wait(5)).status is RunStatus.SUCCEEDED


# ---------------------------------------------------------------- engine.trigger


def test_a_misspelled_trigger_option_names_engine_trigger_and_the_option_meant() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration) as caught:
        engine.trigger("compile", on_key, size_treshold=5)
    message = str(caught.value)
    assert "Engine.trigger()" in message and "Trigger.__init__" not in message
    assert "size_treshold: no such option (did you mean size_threshold?)" in message
    # the misspelling is the one problem: the size_threshold it meant is not said to be missing too
    assert caught.value.problems == ["size_treshold: no such option (did you mean size_threshold?)"]
    assert isinstance(caught.value, TypeError)  # as Python's own error for it was
    assert engine.triggers() == []
    assert [t.name for t in engine.catalog()] == ["job"]
    # nothing was registered: the name is still free
    assert engine.trigger("compile", on_key, size_threshold=5).size_threshold == 5


def test_a_trigger_without_size_threshold_is_told_to_pass_it() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration) as caught:
        engine.trigger("compile", on_key, staleness=60)
    assert caught.value.where == "Engine.trigger()"
    assert caught.value.problems == ["size_threshold: required and not given; pass size_threshold=..."]
    assert engine.triggers() == []


def test_an_unknown_trigger_option_nothing_like_a_real_one_lists_them_all() -> None:
    engine = make_engine()
    with pytest.raises(InvalidConfiguration) as caught:
        engine.trigger("compile", on_key, size_threshold=5, bogus=1, timout=3)
    problems = caught.value.problems
    assert problems[0].startswith("bogus: no such option; the options are size_threshold, staleness,")
    assert "forget_after" in problems[0]
    assert problems[1] == "timout: no such option (did you mean timeout?)"
    assert engine.triggers() == []


# ---------------------------------------------------------------- engine.start_background


def test_a_misspelled_start_background_option_names_it_and_starts_nothing() -> None:
    before = taskwatch_threads()
    engine = make_engine()
    with pytest.raises(InvalidConfiguration) as caught:
        engine.start_background(calltimeout=5)
    assert caught.value.where == "Engine.start_background()"
    assert caught.value.problems == ["calltimeout: no such option (did you mean call_timeout?)"]
    assert engine.state == "new"
    assert taskwatch_threads() <= before
    bg = engine.start_background(call_timeout=5)
    try:
        assert bg.submit("job").wait(timeout=5).status is RunStatus.SUCCEEDED
    finally:
        bg.stop(timeout=5)


# ---------------------------------------------------------------- engine.serve and bg.serve


async def test_a_misspelled_serve_option_names_engine_serve_and_serves_nothing(tmp_path: Path) -> None:
    engine = make_engine()
    path = str(tmp_path / "e.sock")
    async with engine:
        with pytest.raises(InvalidConfiguration) as caught:
            await engine.serve(path, max_mesage=100_000, announce=False)
        assert caught.value.where == "Engine.serve()"
        assert caught.value.problems == ["max_mesage: no such option (did you mean max_message?)"]
        assert "ControlServer" not in str(caught.value)
        assert not os.path.exists(path)
        server = await engine.serve(path, max_message=100_000, announce=False)
        assert os.path.exists(path)
        await server.stop()


def test_a_misspelled_option_of_a_background_engines_serve_names_that_serve(tmp_path: Path) -> None:
    path = str(tmp_path / "bg.sock")
    bg = make_engine().start_background()
    try:
        with pytest.raises(InvalidConfiguration) as caught:
            bg.serve(path, anounce=False)
        assert caught.value.where == "BackgroundEngine.serve()"
        assert caught.value.problems == ["anounce: no such option (did you mean announce?)"]
        assert not os.path.exists(path)
        assert bg.serve(path, announce=False).address.endswith("bg.sock")
    finally:
        bg.stop(timeout=5)


async def test_a_misspelled_option_of_a_background_engines_aserve_names_that_aserve(tmp_path: Path) -> None:
    path = str(tmp_path / "bg.sock")
    bg = make_engine().start_background()
    try:
        with pytest.raises(InvalidConfiguration) as caught:
            await bg.aserve(path, tokn="secret-enough-for-a-test-0123456789")
        assert caught.value.where == "BackgroundEngine.aserve()"
        assert caught.value.problems == ["tokn: no such option (did you mean token?)"]
        assert not os.path.exists(path)
    finally:
        await bg.astop(timeout=5)
