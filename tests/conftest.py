import os
from pathlib import Path

import pytest

# the database servers the tests start (tests/postgres_server.py, tests/redis_server.py)
pytest_plugins = ["tests.postgres_server", "tests.redis_server"]

# deterministic, calm rendering for every Textual app a test starts
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A Unix socket path short enough for any platform's limit."""
    return str(tmp_path / "tw.sock")
