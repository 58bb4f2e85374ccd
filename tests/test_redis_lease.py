"""The Redis lease against a real redis-server, in one process.

The compare-and-set semantics of every operation, the term counter, what
``ensure_leader()`` asks Redis, what ``leadership()`` and the lease events
say, and how an engine rides out Redis going away and coming back. The
multi-process failover tests (kill -9, SIGSTOP, random schedules) are in
``test_redis_failover.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from taskwatch.engine import (
    Engine,
    InvalidConfiguration,
    LeaseUnavailable,
    NotLeader,
    RedisLease,
    TaskContext,
)
from taskwatch.engine.errors import LeaseRefused

from .cutting_proxy import CuttingProxy
from .helpers import Recorder, eventually, stray_tasks
from .processes import REPO
from .redis_server import RedisServer

KEY = "test:leader"


@pytest.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Any]:
    """A plain client to look at (and tamper with) what the lease wrote."""
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


def lease_for(server: RedisServer, ttl: float = 2.0, **kwargs: Any) -> RedisLease:
    return RedisLease(server.url, key=KEY, ttl=ttl, **kwargs)


# ---------------------------------------------------------------- the lease operations


async def test_acquire_sets_the_key_with_a_ttl_and_a_new_term(redis_server: RedisServer, raw: Any) -> None:
    lease = lease_for(redis_server)
    try:
        before = lease.now()
        state = await lease.acquire("a")

        assert state is not None and (state.holder, state.term) == ("a", 1)
        # the deadline is taken from the moment of sending, minus the safety margin
        assert before + 2.0 - lease.safety_margin <= state.expires_at <= lease.now() + 2.0 - lease.safety_margin
        assert await raw.get(KEY) == f"1:{lease.token}:a"
        assert 0 < await raw.pttl(KEY) <= 2000
        assert await raw.get(f"{KEY}:term") == "1"
        seen = await lease.holder()
        assert seen is not None and (seen.holder, seen.term) == ("a", 1)
    finally:
        await lease.close()


async def test_only_the_holder_of_the_term_renews_or_releases(redis_server: RedisServer, raw: Any) -> None:
    a, b = lease_for(redis_server), lease_for(redis_server)
    try:
        state = await a.acquire("a")
        assert state is not None

        assert await b.acquire("b") is None
        assert await b.renew("b", state.term) is None
        # the same node id from another process (another lease object) is someone else
        assert await b.renew("a", state.term) is None
        assert await b.release("a", state.term) is False
        assert await a.renew("a", state.term + 1) is None
        assert await a.release("a", state.term - 1) is False
        assert (await b.holder()).holder == "a"  # type: ignore[union-attr]

        assert await a.renew("a", state.term) is not None
        assert await a.check("a", state.term) and not await b.check("a", state.term)
        assert await a.release("a", state.term) is True
        assert await raw.get(KEY) is None
        assert await a.release("a", state.term) is False
        assert await b.holder() is None
    finally:
        await a.close()
        await b.close()


async def test_terms_grow_across_release_expiry_and_reacquire(redis_server: RedisServer, raw: Any) -> None:
    a, b = lease_for(redis_server), lease_for(redis_server)
    try:
        first = await a.acquire("a")
        again = await a.acquire("a")  # its own lease: taken again, the old term fenced off
        assert first is not None and again is not None and again.term > first.term
        assert await a.renew("a", first.term) is None
        assert await a.release("a", again.term)
        taken = await b.acquire("b")
        assert taken is not None and taken.term > again.term

        await raw.delete(KEY)  # as if it expired
        after = await a.acquire("a")
        assert after is not None and after.term > taken.term
    finally:
        await a.close()
        await b.close()


async def test_a_term_counter_lost_with_redis_data_never_hands_a_term_out_again(
    redis_server: RedisServer, raw: Any
) -> None:
    lease = lease_for(redis_server)
    try:
        for _ in range(3):
            await lease.acquire("a")
        assert await raw.get(f"{KEY}:term") == "3"

        await raw.flushall()  # what a restart without persistence does

        assert await lease.renew("a", 3) is None  # the holder's next renew finds no key
        state = await lease.acquire("a")
        assert state is not None and state.term == 4
    finally:
        await lease.close()


async def test_a_holder_that_released_waits_like_any_other_after_redis_lost_its_data(
    redis_server: RedisServer, raw: Any
) -> None:
    # it gave the lease up, so another node may hold a newer term it never saw: after the loss
    # it took the lease back at once, under that node's term, and two workers ran
    a, b = lease_for(redis_server), lease_for(redis_server)
    try:
        first = await a.acquire("a")
        assert first is not None and await a.release("a", first.term)
        taken = await b.acquire("b")
        assert taken is not None and taken.term == first.term + 1

        await raw.flushall()  # what a restart without persistence does

        assert await a.acquire("a") is None  # a ttl first, as for any node that saw a term
        assert await b.renew("b", taken.term) is None  # b steps down, finding the key gone
    finally:
        await a.close()
        await b.close()


def test_bad_options_are_refused_with_every_problem_named() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        RedisLease("http://example", key="", ttl=1.0, safety_margin=5.0)
    message = str(info.value)
    assert "redis://" in message and "key" in message and "safety_margin" in message
    for bad in ({"ttl": 0}, {"ttl": True}, {"ttl": float("nan")}, {"ttl": 15, "renew_interval": 10}):
        with pytest.raises(InvalidConfiguration, match="RedisLease"):
            RedisLease("redis://127.0.0.1:1/0", **bad)


@pytest.mark.parametrize(
    ("url", "named"),
    [
        ("redis://127.0.0.1:99999/0", "Port out of range"),
        ("redis://127.0.0.1:port/0", "Port could not be cast"),
        ("redis://127.0.0.1:6379/abc", "'abc'"),  # redis-py would quietly use database 0
        ("redis://127.0.0.1:6379/-1", "'-1'"),
        ("redis://127.0.0.1:6379/0?db=-2", "db=-2"),
        ("redis://127.0.0.1:6379/1?db=2", "in one place"),
        ("redis://127.0.0.1:6379/0?bogus=1", "bogus"),  # redis-py would fail every connection with a TypeError
        ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
        ("unix://", "socket"),
        ("http://user:s3cret@127.0.0.1/0", "redis://"),
        ("redis:127.0.0.1", "redis://"),
    ],
)
def test_a_url_that_could_never_work_is_refused_when_the_lease_is_made(url: str, named: str) -> None:
    with pytest.raises(InvalidConfiguration, match="RedisLease") as info:
        RedisLease(url)
    assert named in str(info.value)
    assert "s3cret" not in str(info.value)


def test_the_url_and_key_are_judged_with_the_ttl() -> None:
    with pytest.raises(InvalidConfiguration) as info:
        RedisLease("redis://127.0.0.1:99999/0", key="", ttl=0)
    message = str(info.value)
    assert "Port out of range" in message and "key" in message and "ttl=0" in message


def test_a_short_ttl_needs_no_backoff_of_its_own() -> None:
    # the default backoff (50 ms) is never more than the cap the ttl sets (its renew interval)
    lease = RedisLease("redis://127.0.0.1:1/0", ttl=0.1)
    assert lease.backoff == lease.backoff_max == pytest.approx(0.1 / 3)
    assert RedisLease("redis://127.0.0.1:1/0", ttl=15).backoff == 0.05
    with pytest.raises(InvalidConfiguration, match="backoff must be at most backoff_max"):
        RedisLease("redis://127.0.0.1:1/0", ttl=0.1, backoff=0.05)


def test_backoffs_and_margins_are_read_as_the_other_options_are() -> None:
    # a str is read as its number, as ttl and every other option is; a bool or NaN is refused
    lease = RedisLease(
        "redis://127.0.0.1:1/0", ttl=15, backoff="0.05", backoff_max="1", safety_margin="0.5"  # type: ignore[arg-type]
    )
    assert (lease.backoff, lease.backoff_max, lease.safety_margin) == (0.05, 1.0, 0.5)
    for option, bad in (("backoff", True), ("backoff", "fast"), ("backoff_max", float("nan")), ("safety_margin", -1.0)):
        with pytest.raises(InvalidConfiguration, match=f"RedisLease: {option}="):
            RedisLease("redis://127.0.0.1:1/0", ttl=15, **{option: bad})


def test_without_redis_py_the_engine_imports_and_the_lease_names_the_extra() -> None:
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import taskwatch.engine as tw\n"
        "try:\n"
        "    tw.RedisLease('redis://127.0.0.1:6379/0')\n"
        "except tw.MissingDependency as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "pip install 'redis>=5.0' (taskwatch's 'redis' extra)" in out.stdout


async def test_an_unreachable_redis_fails_fast_with_backoff(redis_server: RedisServer) -> None:
    lease = lease_for(redis_server, backoff=0.2, backoff_max=0.4)
    redis_server.stop()
    try:
        with pytest.raises(LeaseUnavailable) as first:
            await lease.acquire("a")
        assert redis_server.url in str(first.value)
        # within the backoff the network is not touched again
        with pytest.raises(LeaseUnavailable) as second:
            await lease.holder()
        assert second.value.__cause__ is None
        assert lease.failures == 1
        assert "unreachable" in lease.describe()
    finally:
        await lease.close()


# ---------------------------------------------------------------- a Redis that refuses the lease


async def test_a_database_index_the_server_does_not_have_fails_the_start(redis_server: RedisServer) -> None:
    # redis-server has 16 databases unless configured otherwise: SELECT 99 is refused, every time
    lease = RedisLease(f"redis://127.0.0.1:{redis_server.port}/99", key=KEY, ttl=1.0)
    engine, contexts = leader_engine(lease, "a")
    with pytest.raises(LeaseRefused, match="DB index is out of range") as info:
        await engine.start()
    assert f"127.0.0.1:{redis_server.port}/99" in str(info.value)
    assert engine.state == "stopped" and contexts == []
    assert not stray_tasks()


async def test_a_wrong_password_fails_the_start(redis_server: RedisServer, raw: Any) -> None:
    await raw.config_set("requirepass", "right")
    lease = RedisLease(redis_server.url.replace("redis://", "redis://:s3cret@"), key=KEY, ttl=1.0)
    engine, _ = leader_engine(lease, "a")
    with pytest.raises(LeaseRefused, match="AuthenticationError") as info:
        await engine.start()
    assert "s3cret" not in str(info.value)
    assert engine.state == "stopped"
    assert not stray_tasks()


async def test_an_unreachable_redis_does_not_fail_the_start(redis_server: RedisServer) -> None:
    # unlike a refusal, an outage passes: the node starts as a follower and leads once Redis is back
    redis_server.stop()
    lease = lease_for(redis_server, ttl=1.0)
    engine, contexts = leader_engine(lease, "a")
    try:
        await engine.start()
        assert not engine.leadership().is_leader
        assert "unreachable" in (engine.leadership().backend or "")
        redis_server.start()
        await eventually(lambda: contexts, timeout=10.0)
    finally:
        await engine.stop(2.0)
    assert not stray_tasks()


async def test_a_redis_that_starts_refusing_is_shown_in_the_backend_and_logged_once(
    redis_server: RedisServer, raw: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="taskwatch.lease")
    lease = lease_for(redis_server, ttl=1.0)
    engine, contexts = leader_engine(lease, "a")
    rec = Recorder(engine)

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "AuthenticationError" in r.getMessage()]

    try:
        await engine.start()
        await eventually(lambda: contexts)
        # the lease's connections were made without a password: the next one is refused
        await raw.config_set("requirepass", "now-needed")
        await raw.client_kill_filter(_type="normal", skipme=True)

        await eventually(lambda: rec.of("lease.lost"))
        await eventually(lambda: lease.refusals >= 6, timeout=10.0)
        backend = engine.leadership().backend or ""
        assert "refused: AuthenticationError" in backend and "unreachable" not in backend
        assert len(refusals()) == 1, refusals()
        assert engine.workers()[0].state == "waiting_for_leadership"

        await raw.config_set("requirepass", "")
        await eventually(lambda: engine.leadership().is_leader)
        assert "refused" not in (engine.leadership().backend or "")
    finally:
        await engine.stop(2.0)
    assert not stray_tasks()


# ---------------------------------------------------------------- a Redis that lost its data


@contextlib.asynccontextmanager
async def two_leases(server: RedisServer, ttl: float) -> AsyncIterator[tuple[RedisLease, RedisLease]]:
    """Nodes a and b on one lease key of ``server``, closed after."""
    a, b = lease_for(server, ttl=ttl), lease_for(server, ttl=ttl)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def when_answered(lease: RedisLease, call: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    """``call()`` (an operation of ``lease``) tried until Redis answers (it may be restarting):
    what it answered and the lease's clock when it did."""
    deadline = lease.now() + 10.0
    while True:
        try:
            return await call(), lease.now()
        except LeaseUnavailable:
            assert lease.now() < deadline, "Redis did not come back"
            await asyncio.sleep(0.02)


async def acquire_when_answered(lease: RedisLease, node: str) -> tuple[Any, float]:
    return await when_answered(lease, lambda: lease.acquire(node))


async def renew_when_answered(lease: RedisLease, node: str, term: int) -> Any:
    return (await when_answered(lease, lambda: lease.renew(node, term)))[0]


async def test_a_redis_restarted_without_persistence_gives_no_second_leader_before_the_first_ones_deadline(
    redis_server: RedisServer,
) -> None:
    async with two_leases(redis_server, ttl=2.0) as (a, b):
        held = await a.acquire("a")
        assert held is not None
        assert await b.acquire("b") is None  # b follows a: it saw a's term

        redis_server.restart()  # no persistence: the lease key and the term counter are gone

        # b tries as often as a follower would; as long as a may think it leads, b must not
        taken, said = None, set()
        while taken is None:
            taken, at = await acquire_when_answered(b, "b")
            if taken is None:
                assert a.now() < held.expires_at + 5.0, "b never took the lease"
                said.add(b.describe())
                await asyncio.sleep(0.02)
        assert at >= held.expires_at
        assert any("Redis lost the lease's data" in backend for backend in said), said
        assert taken.term > held.term  # the counter was raised past the term b saw


async def test_the_holder_itself_takes_its_lease_back_at_once_after_redis_lost_it(redis_server: RedisServer) -> None:
    # (a ttl the restart fits in with room to spare: its lease still holds when it is back)
    async with two_leases(redis_server, ttl=10.0) as (a, b):
        held = await a.acquire("a")
        assert held is not None and await b.acquire("b") is None
        redis_server.restart()
        # a's renew finds no key, in its term: a steps down and competes again. Nobody else
        # can lead in its term, so it need not wait its own deadline out
        assert await renew_when_answered(a, "a", held.term) is None
        again, at = await acquire_when_answered(a, "a")
        assert again is not None and again.term > held.term and at < held.expires_at
        assert (await acquire_when_answered(b, "b"))[0] is None


async def test_a_holder_whose_renew_met_the_restart_takes_its_lease_back_at_once(redis_server: RedisServer) -> None:
    async with two_leases(redis_server, ttl=10.0) as (a, b):
        held = await a.acquire("a")
        assert held is not None and await b.acquire("b") is None
        redis_server.stop()
        # a's renew meets Redis away, while a still holds the lease: a steps down
        with pytest.raises(LeaseUnavailable):
            await a.renew("a", held.term)
        redis_server.start()  # empty: no persistence
        again, at = await acquire_when_answered(a, "a")
        assert again is not None and again.term > held.term and at < held.expires_at


async def test_a_holder_cut_off_past_its_lease_waits_like_any_node_after_redis_lost_it(
    redis_server: RedisServer,
) -> None:
    # Redis stayed up, only a's way to it was cut: b took a newer term a never saw. Then Redis
    # lost its data: a must not take the lease back at once and hand that term out again
    async with CuttingProxy(redis_server.port) as proxy:
        a = RedisLease(proxy.url(redis_server.url), key=KEY, ttl=1.0)
        b = lease_for(redis_server, ttl=1.0)
        try:
            held = await a.acquire("a")
            assert held is not None
            proxy.refuse()
            with pytest.raises(LeaseUnavailable):
                await a.renew("a", held.term)
            await eventually(lambda: a.now() > held.expires_at + 0.2)
            taken = await b.acquire("b")
            assert taken is not None and taken.term == held.term + 1
            redis_server.restart()
            proxy.accept()
            again, at = await acquire_when_answered(a, "a")
            assert again is None and at < taken.expires_at  # b may still lead in its term
        finally:
            await a.close()
            await b.close()


async def test_a_holder_paused_past_its_lease_waits_like_any_node_after_redis_lost_it(
    redis_server: RedisServer,
) -> None:
    # it may have missed a newer term (another node led while it was paused): taking the lease
    # back at once would hand that term out a second time, the fencing token of two leaders
    async with two_leases(redis_server, ttl=1.0) as (a, b):
        held = await a.acquire("a")
        assert held is not None
        await eventually(lambda: a.now() > held.expires_at + 0.2)  # a is paused past its lease
        taken = await b.acquire("b")
        assert taken is not None and taken.term == held.term + 1  # a never hears of this term
        redis_server.restart()
        assert await renew_when_answered(a, "a", held.term) is None  # a resumes: its lease is gone
        again, at = await acquire_when_answered(a, "a")
        assert again is None and at < taken.expires_at  # b may still think it leads in its term
        while again is None:
            assert a.now() < taken.expires_at + 5.0, "a never took the lease"
            await asyncio.sleep(0.02)
            again, at = await acquire_when_answered(a, "a")
        assert at >= taken.expires_at or again.term > taken.term


# ---------------------------------------------------------------- an engine on the lease


def leader_engine(lease: RedisLease, node: str) -> tuple[Engine, list[TaskContext]]:
    engine = Engine(node_id=node, lease=lease, health_interval=None)
    contexts: list[TaskContext] = []

    @engine.supervised(name="guarded", leader_only=True, backoff=0.05)
    async def guarded(ctx: TaskContext) -> None:
        contexts.append(ctx)
        while True:
            await ctx.ensure_leader()
            await __import__("asyncio").sleep(0.02)

    return engine, contexts


async def test_leadership_shows_the_redis_backend_without_the_password(redis_server: RedisServer) -> None:
    url = redis_server.url.replace("redis://", "redis://:s3cret@")
    lease = RedisLease(url, key=KEY, ttl=2.0)
    engine = Engine(node_id="a", lease=lease, health_interval=None)
    assert "s3cret" not in repr(lease)
    backend = engine.leadership().backend
    assert backend is not None and backend.startswith("redis ") and KEY in backend and "s3cret" not in backend


async def test_ensure_leader_asks_redis_at_that_moment(redis_server: RedisServer, raw: Any) -> None:
    lease = lease_for(redis_server, ttl=5.0)
    engine, contexts = leader_engine(lease, "a")
    rec = Recorder(engine)
    try:
        await engine.start()
        await eventually(lambda: contexts)
        probe = TaskContext(engine, None, "probe")
        term = await probe.ensure_leader()
        assert term == engine.leadership().term

        # someone else's term in Redis (its counter with it, as a real acquire leaves it), while
        # this node's own view is still valid
        await raw.set(f"{KEY}:term", term + 7)
        await raw.set(KEY, f"{term + 7}:feedfeedfeedfeed:b", px=5000)
        assert engine.elector.lease_valid()
        with pytest.raises(NotLeader):
            await probe.ensure_leader()

        # the node steps down at once: its leader-only worker is stopped, not crashed
        assert rec.of("lease.lost")
        await eventually(lambda: rec.of("worker.stopped"))
        assert [e.reason for e in rec.of("worker.stopped")] == ["leadership_lost"]
        assert not rec.of("worker.crashed")
        await raw.delete(KEY)
        await eventually(lambda: engine.leadership().is_leader)
        assert engine.leadership().term > term + 7
    finally:
        await engine.stop(2.0)
    assert not stray_tasks()


async def test_a_process_that_replaced_the_leader_under_its_node_id_is_told_so_not_that_its_lease_lapsed(
    redis_server: RedisServer,
) -> None:
    # the earlier process (killed, say) still holds the lease under the same node id: the new
    # one never led, so "its lease lapsed before it was renewed" sent its reader the wrong way
    earlier, _ = leader_engine(lease_for(redis_server, ttl=30.0), "a")
    later = Engine(node_id="a", lease=lease_for(redis_server, ttl=30.0), health_interval=None)
    try:
        await earlier.start()
        await eventually(lambda: earlier.leadership().is_leader)
        await later.start()
        await eventually(lambda: later.leadership().holder == "a")
        with pytest.raises(NotLeader) as refused:
            await TaskContext(later, None, "probe").ensure_leader()
        said = str(refused.value)
        assert "held under this node id by an earlier process" in said and "lapsed" not in said, said
        assert not refused.value.lapsed
    finally:
        await later.stop(2.0)
        await earlier.stop(2.0)


async def test_leader_change_events_carry_old_and_new_holder_and_term(redis_server: RedisServer) -> None:
    a, _ = leader_engine(lease_for(redis_server), "a")
    b, _ = leader_engine(lease_for(redis_server, renew_interval=0.1), "b")
    rec_a, rec_b = Recorder(a, kinds=("lease.",)), Recorder(b, kinds=("lease.",))
    try:
        await a.start()
        await b.start()
        assert b.leadership().holder == "a"
        (acquired_a,) = rec_a.of("lease.acquired")
        assert (acquired_a.holder, acquired_a.term, acquired_a.previous_holder) == ("a", 1, None)

        await a.stop(2.0)

        (released,) = rec_a.of("lease.released")
        assert (released.previous_holder, released.previous_term, released.holder) == ("a", 1, None)
        await eventually(lambda: rec_b.of("lease.acquired"))
        (acquired_b,) = rec_b.of("lease.acquired")
        assert (acquired_b.holder, acquired_b.term) == ("b", 2)
        assert (acquired_b.previous_holder, acquired_b.previous_term) == ("a", 1)
        assert b.leadership().backend is not None and "redis" in b.leadership().backend  # type: ignore[operator]
    finally:
        await a.stop(2.0)
        await b.stop(2.0)
    assert not stray_tasks()


async def test_redis_going_away_makes_the_leader_step_down_and_come_back(
    persistent_redis_server: RedisServer,
) -> None:
    server = persistent_redis_server
    lease = RedisLease(server.url, key=KEY, ttl=1.0)
    engine, contexts = leader_engine(lease, "a")
    rec = Recorder(engine)
    try:
        await engine.start()
        await eventually(lambda: contexts)
        first_term = engine.leadership().term

        server.stop()

        await eventually(lambda: rec.of("lease.lost"))
        await eventually(lambda: rec.of("worker.stopped"))
        assert engine.workers()[0].state == "waiting_for_leadership"
        with pytest.raises(NotLeader):
            await TaskContext(engine, None, "probe").ensure_leader()

        server.start()

        await eventually(lambda: engine.leadership().is_leader, timeout=10.0)
        await eventually(lambda: len(contexts) == 2)
        assert engine.leadership().term > first_term
        assert lease.failures >= 1 and lease.reconnects >= 1
        assert not rec.of("worker.crashed")
    finally:
        await engine.stop(2.0)
    assert not stray_tasks()


async def test_a_hung_redis_counts_as_unreachable_until_it_answers_and_gets_no_stale_acquires(
    redis_server: RedisServer, raw: Any
) -> None:
    lease = lease_for(redis_server, ttl=1.0)
    engine, contexts = leader_engine(lease, "a")
    rec = Recorder(engine)
    assert redis_server.proc is not None
    backends: list[str] = []

    def hung_for_a_while() -> bool:
        # every few ms from the first failure on: between backoff windows too
        if lease.failures:
            backends.append(engine.leadership().backend or "")
        return lease.failures >= 4

    try:
        await engine.start()
        await eventually(lambda: contexts)
        first_term = engine.leadership().term

        redis_server.proc.send_signal(signal.SIGSTOP)  # accepts connections, answers nothing
        try:
            await eventually(lambda: rec.of("lease.lost"))
            # the elector gives up on each call before redis-py's socket timeout would: the
            # lease counts those as failures and backs off, as it does for a refused connection
            await eventually(hung_for_a_while, timeout=10.0)
            assert lease.last_error is not None and lease.last_error.startswith("TimeoutError")
            assert backends and all("unreachable: TimeoutError" in backend for backend in backends)
        finally:
            redis_server.proc.send_signal(signal.SIGCONT)

        await eventually(lambda: engine.leadership().is_leader, timeout=10.0)
        assert "unreachable" not in (engine.leadership().backend or "")
        assert lease.reconnects >= 1
        # no acquire left waiting in the hung Redis took a term when it resumed: the term after
        # the stall is the very next one, and the counter in Redis says no other was handed out
        assert engine.leadership().term == first_term + 1
        assert await raw.get(f"{KEY}:term") == str(first_term + 1)
        assert not rec.of("worker.crashed")
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        await engine.stop(2.0)
    assert not stray_tasks()


async def test_a_password_in_the_url_query_is_never_shown(redis_server: RedisServer, raw: Any) -> None:
    await raw.config_set("requirepass", "s3cret")  # the real server checks it from now on
    url = f"{redis_server.url}?password=s3cret"
    lease = RedisLease(url, key=KEY, ttl=1.0)
    engine = Engine(node_id="a", lease=lease, events=url, health_interval=None)
    try:
        await engine.start()
        assert engine.leadership().is_leader  # the password reached Redis
        assert engine.cluster is not None
        shown = [engine.leadership().backend or "", engine.cluster.public_url, repr(lease)]
        assert all("password=***" in text and "s3cret" not in text for text in shown), shown

        redis_server.stop()
        await eventually(lambda: lease.failures > 0 and not engine.leadership().is_leader)
        with pytest.raises(LeaseUnavailable) as info:
            await lease.holder()
        assert "s3cret" not in str(info.value) and "s3cret" not in (engine.leadership().backend or "")
    finally:
        await engine.stop(1.0)
    assert not stray_tasks()


# ---------------------------------------------------------------- the redis-server fixture


@pytest.mark.parametrize(("ci", "outcome", "rc"), [("true", "1 error", 1), ("1", "1 error", 1), ("", "1 skipped", 0)])
def test_a_missing_redis_server_fails_under_ci_and_skips_elsewhere(
    tmp_path: Any, ci: str, outcome: str, rc: int
) -> None:
    # only the interpreter's own directory on PATH: no redis-server to be found
    env = {"PATH": str(Path(sys.executable).parent), "CI": ci, "HOME": str(tmp_path)}
    test = "tests/test_redis_lease.py::test_only_the_holder_of_the_term_renews_or_releases"
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", test],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )
    assert outcome in out.stdout, out.stdout[-2000:]
    assert out.returncode == rc
    assert "apt-get install -y redis-server" in out.stdout
