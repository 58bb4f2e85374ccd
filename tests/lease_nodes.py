"""Nodes electing a leader on Redis as real processes (``tests/lease_child.py``), and the
checks every failover test makes on what they recorded.

Shared by ``tests/test_redis_failover.py`` and ``bench/failover.py``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .processes import JsonLineProcess, Line

#: generous bounds for a loaded 2-core machine; a passing run takes a fraction of them
START_TIMEOUT = 30.0


class LeaseNode(JsonLineProcess):
    """One ``python -m tests.lease_child`` process and every JSON line it printed."""

    def __init__(self, url: str, node: str, *, ttl: float, renew: float | None = None,
                 passes: Path | None = None, key: str = "taskwatch:test:leader", renewed: bool = False) -> None:
        self.node = node
        cmd = [sys.executable, "-m", "tests.lease_child", url, "--node", node, "--ttl", str(ttl), "--key", key]
        if renew is not None:
            cmd += ["--renew", str(renew)]
        if passes is not None:
            cmd += ["--passes", str(passes)]
        if renewed:
            cmd.append("--renewed")
        super().__init__(cmd, f"node {node}", START_TIMEOUT)
        self.paused = False

    def lease(self, kind: str) -> list[Line]:
        return self.of("lease", kind=kind)

    def leads(self) -> bool:
        """Whether its last lease event says it leads (and it is alive and running)."""
        with self._cond:
            events = [line for line in self.lines if line.get("ev") == "lease"]
        return bool(events) and events[-1]["kind"] in ("acquired", "renewed") and self.alive and not self.paused

    def worker_running(self) -> bool:
        with self._cond:
            events = [line for line in self.lines if line.get("ev") == "worker"]
        return bool(events) and events[-1]["state"] == "started"

    def acquired_terms(self) -> list[int]:
        return [line["term"] for line in self.lease("acquired")]

    # ------------------------------------------------------------------ what is done to it

    def check(self, timeout: float = START_TIMEOUT) -> int | None:
        """``ensure_leader()`` in the node, now: its term, or ``None`` if it raised ``NotLeader``."""
        start = self.mark()
        self.send("check")
        return self.wait_for(lambda line: line.get("ev") == "check", timeout, start=start)["term"]

    def kill(self) -> None:
        self.resume()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self._reader.join(timeout=10)

    def pause(self) -> None:
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        if self.paused:
            self.proc.send_signal(signal.SIGCONT)
            self.paused = False

    def close(self, timeout: float = START_TIMEOUT) -> int:
        """Stop it gracefully (close stdin), killing it if it does not exit in time."""
        self.resume()
        if self.alive:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=10)
        return self.proc.returncode


def start_nodes(url: str, names: list[str], **kwargs: Any) -> list[LeaseNode]:
    """Start the nodes together; returns once every one of them has started."""
    nodes = [LeaseNode(url, name, **kwargs) for name in names]
    for node in nodes:
        node.wait_for(lambda line: line.get("ev") == "started")
    return nodes


def wait_until(predicate: Callable[[], Any], timeout: float = START_TIMEOUT, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s: {predicate}")
        time.sleep(interval)


def sole_leader(nodes: list[LeaseNode]) -> tuple[LeaseNode, int] | None:
    """The one node whose ``ensure_leader()`` passes right now, with its term, if exactly one
    live node's does (asked of each in turn); ``None`` otherwise."""
    answers = [(node, node.check()) for node in nodes if node.alive and not node.paused]
    leaders = [(node, term) for node, term in answers if term is not None]
    return leaders[0] if len(leaders) == 1 else None


# ---------------------------------------------------------------- the checks


@dataclass(frozen=True)
class Pass:
    """One ``ensure_leader()`` that returned ``term`` on ``node``, between ``t0`` and ``t1``."""

    node: str
    pid: int
    term: int
    t0: float
    t1: float


def read_passes(path: Path) -> list[Pass]:
    if not path.exists():
        return []
    passes = []
    for raw in path.read_text().splitlines():
        try:
            data = json.loads(raw)
        except ValueError:
            continue  # never happens with O_APPEND writes, but a torn line is not a pass
        passes.append(Pass(data["node"], data["pid"], data["term"], data["t0"], data["t1"]))
    return passes


def fencing_violations(passes: list[Pass]) -> list[str]:
    """What breaks "one holder per term, and a term never passes after a newer one did".

    Each term must have been passed by one process only. And since Redis holds
    one term at a time and terms only grow, a check that confirmed term T1
    reached Redis before one that confirmed T2 > T1: so a T1 pass must have
    *started* before every T2 pass *ended*. A stale leader that passed
    ``ensure_leader()`` after a newer leader had would break that.
    """
    wrong: list[str] = []
    holders: dict[int, set[tuple[str, int]]] = {}
    for p in passes:
        holders.setdefault(p.term, set()).add((p.node, p.pid))
    for term, who in sorted(holders.items()):
        if len(who) > 1:
            wrong.append(f"term {term} passed by several processes: {sorted(who)}")
    latest_start = {term: max(p.t0 for p in passes if p.term == term) for term in holders}
    earliest_end = {term: min(p.t1 for p in passes if p.term == term) for term in holders}
    terms = sorted(holders)
    for i, older in enumerate(terms):
        for newer in terms[i + 1:]:
            if latest_start[older] >= earliest_end[newer]:
                wrong.append(
                    f"term {older} passed at {latest_start[older]:.3f}, after term {newer} "
                    f"had passed at {earliest_end[newer]:.3f}"
                )
    return wrong
