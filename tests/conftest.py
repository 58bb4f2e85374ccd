import os
from pathlib import Path

import pytest

# a real redis-server per test that needs one (tests/redis_server.py)
pytest_plugins = ["tests.redis_server"]

# deterministic, calm rendering for every Textual app a test starts
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A Unix socket path short enough for any platform's limit."""
    return str(tmp_path / "tw.sock")
