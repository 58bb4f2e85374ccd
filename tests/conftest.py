import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# the database servers the tests start (tests/postgres_server.py, tests/redis_server.py)
pytest_plugins = ["tests.postgres_server", "tests.redis_server"]

# deterministic, calm rendering for every Textual app a test starts
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A Unix socket path short enough for any platform's limit."""
    return str(tmp_path / "tw.sock")


@pytest.fixture
def nodes() -> Iterator[list[Any]]:
    """Child processes a test starts (each with its ``proc``); any still alive at its end are killed."""
    started: list[Any] = []
    yield started
    for child in started:
        if child.proc.poll() is None:
            child.proc.kill()
        child.proc.wait(timeout=30)
