"""The benchmark scripts the README quotes still run against the engine as it is.

Each runs as a user would run it, with a few hundred runs (what they print is
not checked against any figure: timings belong to the scripts, on a quiet
machine, not to the test suite). An API change that breaks one shows here,
not the next time someone re-measures.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=180, cwd=BENCH.parent)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_throughput_prints_both_patterns_and_the_event_costs() -> None:
    out = run(str(BENCH / "throughput.py"), "--runs", "300", "--rounds", "1")
    assert "batch taskwatch / bare" in out and "user taskwatch / bare" in out and "publish one event" in out


def test_throughput_parts_prints_what_a_run_costs_per_part() -> None:
    out = run(str(BENCH / "throughput.py"), "--parts", "--runs", "300", "--rounds", "1")
    for part in ("admission", "dispatch to finish", "bare asyncio task", "events read by 1 subscriber"):
        assert part in out


def test_store_compares_sqlite_with_memory() -> None:
    out = run(str(BENCH / "store.py"), "--runs", "300")
    assert "sqlite / memory" in out and "submit_many" in out


@pytest.mark.parametrize("variant", ["bare", "silent", "unread", "read"])
def test_each_instructions_variant_runs(variant: str) -> None:
    # what callgrind counts, run without it (valgrind is not needed to see the variant works)
    run(str(BENCH / "instructions.py"), "--child", variant, "--runs", "200")


def test_start_prints_what_a_start_with_many_pending_runs_costs() -> None:
    out = run(str(BENCH / "start.py"), "--runs", "300", "--rounds", "1")
    assert "engine.start()" in out and "memory held after it" in out


def test_dashboard_memory_prints_what_the_dashboard_holds_per_waiting_run() -> None:
    out = run(str(BENCH / "dashboard_memory.py"), "--runs", "300", "--top", "3")
    assert "the dashboard" in out and "B a run" in out
