import os
from pathlib import Path

import pytest

# the PostgreSQL server fixtures (postgres_server, postgres_url)
pytest_plugins = ["tests.postgres_server"]

# deterministic, calm rendering for every Textual app a test starts
os.environ.setdefault("TEXTUAL_ANIMATIONS", "none")


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    """A Unix socket path short enough for any platform's limit."""
    return str(tmp_path / "tw.sock")
