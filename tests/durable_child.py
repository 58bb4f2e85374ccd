"""An engine on a SQLite file (or a PostgreSQL database) in its own process, for the crash
tests in ``test_durable.py`` and the cluster tests in ``test_cluster.py``.

::

    python -m tests.durable_child DB --node worker-1 --log exec.log [options] run [--submit TASK --count N] [--until-drained]
    python -m tests.durable_child DB --node worker-1 [options] burst --batch 100

``DB`` is a SQLite file path, or a ``postgresql://`` URL.

Every line it prints on stdout is one JSON object with an ``ev`` field, flushed
at once, so the test can act on what the process has really done:

``{"ev": "ready", "pid": ...}``
    The engine is built (imports done); with ``--wait-go`` it now waits for a
    line on stdin before starting, so a test can have a process ready to take
    over the moment it kills another.
``{"ev": "started", "t": UNIX_SECONDS}``
    ``engine.start()`` returned: the previous incarnation's runs are recovered.
``{"ev": "submitted", "ids": [...]}``
    ``submit_many`` returned: every id is committed to the file.
``{"ev": "batch", "ids": [...]}``
    (``burst``) one more ``submit_many`` returned.
``{"ev": "succeeded" | "retrying" | "failed" | "recovered", "id": ..., ...}``
    The engine published that event, which it does only once the store has
    committed the change. ``succeeded`` lines carry ``n``, the count so far.
``{"ev": "drained", "counts": {...}, "notified": N}``, then ``{"ev": "stopped"}``
    (``--until-drained``) the store holds no pending or running run any more
    (and at least ``--expect`` runs were inserted); the engine was then stopped
    gracefully and the process exits 0. ``notified``: notifications heard
    from other nodes (PostgreSQL).
``{"ev": "cancelled", "id": ..., "t": ...}``, ``{"ev": "lease.acquired" | "lease.lost" | "lease.released", "term": ...}``
    A run ended cancelled; (``--leader``) leadership changed.
``{"ev": "store.unreachable", "stopped": [...]}``, ``{"ev": "store.reachable"}``
    The node stepped down because it could not reach its store (the runs
    it stopped), and came back.
``{"ev": "node.superseded", "incarnation": ..., "stopped": [...]}``
    A later process started with this node's id: this one stepped down (the
    runs it stopped).
``{"ev": "log", "level": "ERROR", "logger": ..., "message": ...}``
    (``--errors``) an ERROR record of a ``taskwatch`` logger (also written to stderr).
``{"ev": "interrupted", "id": ..., "attempt": ...}``
    A ``work`` run was cancelled in the middle of its sleep.
``{"ev": "cluster", "node": ..., "kind": ...}``
    (``--events``) the first event of another node reached this node's cluster bus.

Tasks (the same in every process, as a real deployment would have):

``work``
    Appends one execution line to the ``--log`` file, then sleeps between half
    and one and a half ``--sleep`` s (spread, so runs do not finish in lockstep
    waves and a kill always finds some in flight).
``flaky``
    ``retries=1``, ``backoff=backoff_max=--backoff``: attempt 1 raises, attempt 2 succeeds.
``suicide`` / ``suicide_fail``
    SIGKILL their own process (``on_lost="retry"`` / ``"fail"``).
``hang``
    Logs, then waits until cancelled (a ``cancelled`` line is printed).
``tick``
    (with ``--periodic SECONDS``) a fixed-rate periodic task that logs.
``capped``
    ``concurrency=--cap`` (default 2): logs, adds one to the ``running``
    column of the one-row table ``gauge`` in the PostgreSQL database (raising
    ``peak`` to it if higher), sleeps like ``work``, then takes the one off
    again. ``peak`` is how many ran at once across every node, as the runs
    themselves counted it. The test creates the table.
``steps``
    Reports progress ``--steps`` times in a row (no await between), then returns.

With ``--events SPEC`` the engine relays its events (``events=SPEC``, e.g.
``postgres``), and with ``--health SECONDS`` it samples its health (CPU and
RSS reach the nodes table and the events). ``stopped`` lines carry ``seq``,
the last number of the node's own bus.

``fill`` mode: once started (after ``--wait-go``'s line, if given), submits
one run of ``--task`` at a time until the engine raises ``QueueFull``, then
prints ``{"ev": "full", "accepted": N, "error": MESSAGE}`` and waits for
stdin to close.

With ``--leader`` the engine competes for a :class:`PostgresLease` (ttl
``--lease-ttl``) and prints ``lease.acquired`` / ``lease.lost`` /
``lease.released`` lines with the term.

Each execution line is ``{"run", "attempt", "node", "pid", "task", "t"}``,
written with one ``os.write`` on an ``O_APPEND`` descriptor before the task
does anything else: once the syscall returns the line is in the kernel's page
cache, which a SIGKILL of this process cannot take back (``--fsync`` also
forces it to the disk, which only a power cut would need).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import signal
import sys
import time
from typing import Any

from taskwatch.engine import Engine, PostgresLease, QueueFull, TaskContext


def emit(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


class ExecLog:
    def __init__(self, path: str | None, node: str, fsync: bool) -> None:
        self.fd = None if path is None else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.node = node
        self.fsync = fsync

    def write(self, ctx: TaskContext) -> None:
        if self.fd is None:
            return
        line = {
            "run": ctx.run_id,
            "attempt": ctx.attempt,
            "node": self.node,
            "pid": os.getpid(),
            "task": ctx.name,
            "t": time.time(),
        }
        os.write(self.fd, (json.dumps(line) + "\n").encode())
        if self.fsync:
            os.fsync(self.fd)


class ErrorLines(logging.Handler):
    """ERROR records as lines on stdout, so a test can check what an operator is told."""

    def emit(self, record: logging.LogRecord) -> None:
        emit(ev="log", level=record.levelname, logger=record.name, message=record.getMessage(), t=time.time())


def build(args: argparse.Namespace) -> Engine:
    if args.errors:
        taskwatch_log = logging.getLogger("taskwatch")
        # a handler of its own would silence the default one on stderr: kept there too
        taskwatch_log.addHandler(logging.StreamHandler())
        taskwatch_log.addHandler(ErrorLines(logging.ERROR))
    engine = Engine(
        store=args.db if "://" in args.db else f"sqlite:///{os.path.abspath(args.db)}",
        node_id=args.node,
        lease_ttl=args.lease_ttl,
        poll_interval=args.poll,
        max_concurrency=args.max_concurrency,
        max_queue=args.max_queue,
        history=args.history,
        health_interval=args.health,
        lease=PostgresLease(args.db, ttl=args.lease_ttl) if args.leader else None,
        events=args.events,
    )
    log = ExecLog(args.log, args.node, args.fsync)
    pause = args.sleep

    @engine.task
    async def work(ctx: TaskContext) -> None:
        log.write(ctx)
        if pause > 0:
            try:
                await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            except asyncio.CancelledError:
                emit(ev="interrupted", id=ctx.run_id, attempt=ctx.attempt, t=time.time())
                raise

    @engine.task(retries=1, backoff=args.backoff, backoff_max=args.backoff)
    async def flaky(ctx: TaskContext) -> str:
        log.write(ctx)
        if ctx.attempt == 1:
            raise RuntimeError("the first attempt always fails")
        return "ok"

    @engine.task
    async def suicide(ctx: TaskContext) -> None:
        log.write(ctx)
        os.kill(os.getpid(), signal.SIGKILL)

    @engine.task(on_lost="fail")
    async def suicide_fail(ctx: TaskContext) -> None:
        log.write(ctx)
        os.kill(os.getpid(), signal.SIGKILL)

    @engine.task
    async def hang(ctx: TaskContext) -> None:
        log.write(ctx)
        await asyncio.Event().wait()

    gauge: Any = None

    @engine.task(concurrency=args.cap)
    async def capped(ctx: TaskContext) -> None:
        nonlocal gauge
        log.write(ctx)
        if gauge is None:
            import asyncpg

            gauge = await asyncpg.create_pool(args.db, min_size=1, max_size=args.cap + 1)
        # one statement each way: the row lock orders them, so ``peak`` is exact
        await gauge.execute("UPDATE gauge SET running = running + 1, peak = GREATEST(peak, running + 1)")
        try:
            if pause > 0:
                await asyncio.sleep(pause * random.uniform(0.5, 1.5))
        finally:
            await gauge.execute("UPDATE gauge SET running = running - 1")

    steps = args.steps

    @engine.task(name="steps")
    async def steps_task(ctx: TaskContext) -> int:
        for i in range(1, steps + 1):
            await ctx.progress(i, steps)
        return steps

    if args.periodic:

        @engine.periodic(every=args.periodic, fixed_rate=True, name="tick")
        async def tick(ctx: TaskContext) -> None:
            log.write(ctx)

    succeeded = 0

    def report(event: Any) -> None:
        nonlocal succeeded
        kind = event.kind.removeprefix("run.")
        if kind == "succeeded":
            succeeded += 1
            if not args.quiet:
                emit(ev=kind, id=event.run_id, attempt=event.attempt, n=succeeded)
        elif kind == "retrying":
            emit(ev=kind, id=event.run_id, attempt=event.attempt, delay=event.delay)
        elif kind == "failed":
            emit(ev=kind, id=event.run_id, attempt=event.attempt, error=event.error.type)
        elif kind == "recovered":
            emit(
                ev=kind, id=event.run_id, action=event.action, reason=event.reason, attempt=event.attempt,
                from_node=event.from_node, t=time.time(),
            )
        elif kind == "cancelled":
            emit(ev=kind, id=event.run_id, t=time.time())

    engine.bus.add_callback(report, ["run.succeeded", "run.retrying", "run.failed", "run.recovered", "run.cancelled"])

    def leadership(event: Any) -> None:
        emit(ev=event.kind, holder=event.holder, term=event.term, t=time.time())

    engine.bus.add_callback(leadership, ["lease.acquired", "lease.lost", "lease.released"])

    def store_state(event: Any) -> None:
        emit(ev=event.kind, stopped=getattr(event, "stopped", []), seconds=event.seconds, t=time.time())

    engine.bus.add_callback(store_state, ["store.unreachable", "store.reachable"])

    def superseded(event: Any) -> None:
        emit(ev=event.kind, incarnation=event.incarnation, stopped=event.stopped, t=time.time())

    engine.bus.add_callback(superseded, ["node.superseded"])

    heard: set[str] = set()

    def from_the_cluster(event: Any) -> None:
        if event.node not in heard and event.node not in (args.node, ""):
            heard.add(event.node)
            emit(ev="cluster", node=event.node, kind=event.kind)

    if engine.cluster is not None:
        engine.cluster.bus.add_callback(from_the_cluster)
    return engine


async def wait_drained(engine: Engine, expect: int) -> dict[str, int]:
    """Poll the store (shared with other processes) until nothing is left to do."""
    while True:
        counts = await engine.store.counts()
        if counts.inserted_total >= expect and counts.pending == 0 and counts.running == 0:
            return counts.by_status
        await asyncio.sleep(0.05)


async def main(args: argparse.Namespace) -> None:
    engine = build(args)
    emit(ev="ready", pid=os.getpid())
    if args.wait_go:
        await asyncio.to_thread(sys.stdin.readline)
    await engine.start()
    emit(ev="started", t=time.time())
    if args.mode == "fill":
        accepted = 0
        try:
            while True:
                await engine.submit(args.task)
                accepted += 1
        except QueueFull as exc:
            emit(ev="full", accepted=accepted, error=str(exc))
    if args.mode == "burst":
        while True:
            handles = await engine.submit_many([("work", None)] * args.batch)
            emit(ev="batch", ids=[h.id for h in handles])
    if getattr(args, "submit", None):
        handles = await engine.submit_many([(args.submit, None)] * args.count)
        emit(ev="submitted", ids=[h.id for h in handles])
    if getattr(args, "until_drained", False):
        counts = await wait_drained(engine, args.expect)
        emit(ev="drained", counts=counts, notified=getattr(engine.store, "notifications_received", None))
        await engine.stop()
        emit(ev="stopped", seq=engine.bus.last_seq)
        return
    await asyncio.to_thread(sys.stdin.read)  # until the test closes stdin (or kills us)
    await engine.stop(args.stop_timeout)
    emit(ev="stopped", seq=engine.bus.last_seq)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.durable_child")
    p.add_argument("db")
    p.add_argument("--node", required=True)
    p.add_argument("--log", default=None, help="execution log (one line per attempt started)")
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--lease-ttl", type=float, default=1.0)
    p.add_argument("--poll", type=float, default=0.05)
    p.add_argument("--max-concurrency", type=int, default=16)
    p.add_argument("--max-queue", type=int, default=1_000_000)
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds each work run takes")
    p.add_argument("--backoff", type=float, default=2.0)
    p.add_argument("--wait-go", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no line per succeeded run")
    p.add_argument("--leader", action="store_true", help="compete for a PostgresLease on DB (a postgresql:// URL)")
    p.add_argument("--periodic", type=float, default=0.0, help="register the fixed-rate periodic task 'tick'")
    p.add_argument("--cap", type=int, default=2, help="the concurrency of the task 'capped'")
    p.add_argument("--events", default=None, help="relay the engine's events (events=..., e.g. postgres)")
    p.add_argument("--health", type=float, default=None, help="sample the engine's health every SECONDS")
    p.add_argument("--steps", type=int, default=400, help="progress reports of one 'steps' run")
    p.add_argument("--errors", action="store_true", help="print ERROR log records of taskwatch as lines")
    p.add_argument("--stop-timeout", type=float, default=10.0, help="what the final engine.stop() drains for")
    sub = p.add_subparsers(dest="mode", required=True)
    run = sub.add_parser("run")
    run.add_argument("--submit", default=None, help="task to submit --count runs of, in one submit_many")
    run.add_argument("--count", type=int, default=1)
    run.add_argument("--until-drained", action="store_true")
    run.add_argument("--expect", type=int, default=0, help="with --until-drained: runs inserted before it may end")
    fill = sub.add_parser("fill")
    fill.add_argument("--task", default="hang")
    burst = sub.add_parser("burst")
    burst.add_argument("--batch", type=int, default=100)
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse(sys.argv[1:])))
