"""Leader election on Redis across real processes, killed and paused with real signals.

Each node is ``python -m tests.lease_child`` (an engine with a
:class:`RedisLease` and a leader-only worker, ``guarded``, that calls
``ctx.ensure_leader()`` every 20 ms and appends every pass, with its term and
the time just before and just after the call, to one shared file). The tests
act on the lines the nodes print and on ``ensure_leader()`` answers asked of
them over stdin; nothing waits by sleeping.

After every test the passes file is checked (:func:`fencing_violations`):
each term was passed by one process only, and no pass of an older term began
after a pass of a newer term had ended, so no two nodes ever acted as leader
in the same term or overlapped across a takeover.

Takeover times are not asserted here (the machine is shared and noisy);
``bench/failover.py`` measures them.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .lease_nodes import LeaseNode, fencing_violations, read_passes, sole_leader, start_nodes, wait_until
from .redis_server import RedisServer

TTL = 1.0
RENEW = 0.25


class Cluster:
    """Nodes sharing one lease key and one passes file; closes them all at the end."""

    def __init__(self, server: RedisServer, directory: Path, ttl: float = TTL, renew: float = RENEW) -> None:
        self.server = server
        self.passes = directory / f"passes-{uuid.uuid4().hex[:8]}.log"
        self.key = f"test:{uuid.uuid4().hex[:8]}:leader"
        self.ttl = ttl
        self.renew = renew
        self.nodes: list[LeaseNode] = []
        self.retired: list[LeaseNode] = []

    def start(self, *names: str) -> list[LeaseNode]:
        nodes = start_nodes(
            self.server.url, list(names), ttl=self.ttl, renew=self.renew, passes=self.passes, key=self.key
        )
        self.nodes.extend(nodes)
        return nodes

    def node(self, name: str) -> LeaseNode:
        return next(n for n in self.nodes if n.node == name)

    def replace(self, node: LeaseNode) -> LeaseNode:
        """Start a new process with ``node``'s name (after it was killed)."""
        self.nodes.remove(node)
        self.retired.append(node)
        (fresh,) = self.start(node.node)
        return fresh

    def leader(self, timeout: float = 30.0) -> tuple[LeaseNode, int]:
        """Wait until exactly one live node passes ``ensure_leader()``; it and its term."""
        return wait_until(lambda: sole_leader(self.nodes), timeout)  # type: ignore[no-any-return]

    def every_node(self) -> list[LeaseNode]:
        return self.retired + self.nodes

    def close(self) -> None:
        for node in self.every_node():
            node.close()

    def check_fencing(self) -> None:
        passes = read_passes(self.passes)
        assert passes, "the leader-only worker never passed ensure_leader()"
        assert fencing_violations(passes) == []

    def check_terms(self) -> None:
        """Each term was acquired once, by one process; every process's terms only grew."""
        acquired = [(line["t"], line["term"], id(node)) for node in self.every_node() for line in node.lease("acquired")]
        terms = [term for _, term, _ in acquired]
        assert len(terms) == len(set(terms)), f"a term was acquired twice: {sorted(acquired)}"
        for node in self.every_node():
            own = node.acquired_terms()
            assert own == sorted(own), f"{node.node}'s terms went down: {own}"
        assert not [line for node in self.every_node() for line in node.of("worker", state="crashed")]


@pytest.fixture
def cluster(redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(redis_server, tmp_path)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def durable_cluster(persistent_redis_server: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(persistent_redis_server, tmp_path)
    try:
        yield c
    finally:
        c.close()


def passes_span(path: Path, term: int) -> float:
    times = [p.t1 for p in read_passes(path) if p.term == term]
    return max(times) - min(times) if times else 0.0


def wait_worker(node: LeaseNode, term: int) -> None:
    node.wait_for(lambda line: line.get("ev") == "pass" and line["term"] == term)


# ---------------------------------------------------------------- steady state


def test_three_nodes_elect_exactly_one_leader_and_run_the_worker_there_alone(cluster: Cluster) -> None:
    nodes = cluster.start("a", "b", "c")

    leader, term = cluster.leader()
    wait_worker(leader, term)
    # once its worker has been passing ensure_leader() for longer than a ttl
    # (several renewals), it still leads, alone, and only its worker runs
    wait_until(lambda: passes_span(cluster.passes, term) > 1.5 * TTL)
    again, same_term = cluster.leader()
    assert (again, same_term) == (leader, term)
    assert leader.worker_running()
    followers = [n for n in nodes if n is not leader]
    assert all(not n.worker_running() for n in followers)
    assert all(n.check() is None for n in followers)
    assert {p.node for p in read_passes(cluster.passes)} == {leader.node}

    # stopping one by one hands the lease on (released, then taken at once)
    for node in nodes:
        assert node.close() == 0
    cluster.check_fencing()
    cluster.check_terms()


# ---------------------------------------------------------------- failover


def test_kill_9_of_the_leader_hands_leadership_to_a_follower_with_a_higher_term(cluster: Cluster) -> None:
    cluster.start("a", "b", "c")
    old, old_term = cluster.leader()
    wait_worker(old, old_term)

    old.kill()

    new, new_term = cluster.leader()
    assert new is not old and new_term > old_term
    wait_worker(new, new_term)
    acquired = new.lease("acquired")[-1]
    assert acquired["term"] == new_term
    assert (acquired["previous_holder"], acquired["previous_term"]) == (old.node, old_term)

    cluster.close()
    cluster.check_fencing()
    cluster.check_terms()


def test_a_leader_paused_past_its_ttl_is_fenced_off_when_it_resumes(cluster: Cluster) -> None:
    a, b = cluster.start("a", "b")
    # two nodes: one leads, and its worker runs there alone
    old, old_term = cluster.leader()
    follower = b if old is a else a
    wait_worker(old, old_term)
    assert old.worker_running() and not follower.worker_running()
    assert follower.check() is None
    mark = old.mark()

    old.pause()  # SIGSTOP: its renew timer, its worker, everything stops mid-flight

    took = follower.wait_for(lambda line: line.get("ev") == "lease" and line["kind"] == "acquired")
    assert took["term"] > old_term
    wait_worker(follower, took["term"])

    old.resume()  # SIGCONT: it wakes up believing it still leads

    # its worker finds out at the next ensure_leader() (or is cancelled first and
    # then finds out), and is stopped for lost leadership, never restarted
    ending = old.wait_for(lambda line: line.get("ev") in ("not_leader", "cancelled"), start=mark)
    assert ending.get("ensure_leader", "raised") == "raised"
    old.wait_for(lambda line: line.get("ev") == "worker" and line["state"] == "stopped", start=mark)
    assert old.wait_for(lambda line: line.get("ev") == "worker", start=mark)["reason"] == "leadership_lost"
    old.wait_for(lambda line: line.get("ev") == "lease" and line["kind"] == "lost", start=mark)
    assert old.check() is None
    assert cluster.leader() == (follower, took["term"])
    assert not old.worker_running()

    cluster.close()
    cluster.check_fencing()
    cluster.check_terms()


def test_a_redis_restart_mid_lease_ends_in_a_new_election_without_a_crash(durable_cluster: Cluster) -> None:
    cluster = durable_cluster
    a, b = cluster.start("a", "b")
    old, old_term = cluster.leader()
    wait_worker(old, old_term)
    mark = old.mark()

    cluster.server.stop(signal.SIGKILL)
    # the leader cannot renew: it steps down and stops its worker
    old.wait_for(lambda line: line.get("ev") == "lease" and line["kind"] == "lost", start=mark)
    old.wait_for(lambda line: line.get("ev") == "worker" and line["state"] == "stopped", start=mark)
    cluster.server.start()

    new, new_term = cluster.leader()
    assert new_term > old_term
    wait_worker(new, new_term)
    assert a.alive and b.alive

    cluster.close()
    assert a.proc.returncode == 0 and b.proc.returncode == 0
    cluster.check_fencing()
    cluster.check_terms()


# ---------------------------------------------------------------- random schedules

Action = tuple[str, int]
actions = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["pause", "kill"]), st.integers(0, 2)),
        st.just(("redis", 0)),
    ),
    min_size=2,
    max_size=3,
)


@settings(
    max_examples=3,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(schedule=actions)
def test_random_pauses_kills_and_redis_restarts_keep_one_holder_per_term(
    persistent_redis_server: RedisServer, tmp_path: Path, schedule: list[Action]
) -> None:
    server = persistent_redis_server
    if not server.running:
        server.start()
    cluster = Cluster(server, tmp_path, ttl=0.8, renew=0.2)
    try:
        cluster.start("a", "b", "c")
        for what, index in schedule:
            leader, term = cluster.leader()
            # index 0 is the leader, the others its followers
            live = [leader] + [n for n in cluster.nodes if n.alive and n is not leader]
            target = live[index % len(live)]
            others = [n for n in live if n is not target]
            if what == "kill" and others:
                target.kill()
            elif what in ("kill", "pause"):
                marks = {id(n): n.mark() for n in others}
                target.pause()
                if target is leader and others:
                    # someone else must take over before it comes back
                    wait_until(lambda: any(
                        line["term"] > term for n in others for line in n.since(marks[id(n)], "lease", kind="acquired")
                    ))
                target.resume()
            else:
                server.restart(signal.SIGKILL)
        # whatever happened, the cluster settles on one leader that runs the worker
        leader, term = cluster.leader()
        wait_worker(leader, term)
    finally:
        cluster.close()
    cluster.check_fencing()
    cluster.check_terms()
