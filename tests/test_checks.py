"""Checks on the repository itself, so a clean clone's ``make test`` runs them.

The code names nothing it does not define or import and imports nothing it
does not use (ruff's F401, F841 and F821).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_no_unused_import_or_variable_and_no_undefined_name() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F401,F841,F821", "--line-length", "120",
         "engine", "tui", "widgets", "tests", "bench", "examples"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr

