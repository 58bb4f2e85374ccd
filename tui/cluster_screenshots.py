"""A staged cluster for the cluster dashboard's pictures (the Nodes view).

Three real engines share one :class:`~taskwatch.engine.MemoryEventStream`
(``events=stream``), so their events go out and come back through the same
relay code as on Redis, batching and per-node accounting included, with no
server. The story, on a frozen clock: ``api-3`` leads (term 1), does its
work and stops, handing the lease on; ``api-1`` takes it (term 2) and
``api-2`` follows; both run work, some of it still running, and report CPU
and RSS. The stream keeps only its newest entries, so the dashboard, which
attaches afterwards reading from the oldest entry still kept, finds the start
of ``api-3``'s numbers gone and counts them as missed.

The cluster plays on an event loop of its own and stands still (that loop
idle, the clock frozen) while the dashboard runs on another and reads the
stream, as it would watch nodes in other processes; the engines stop once
the picture is taken.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from taskwatch.engine import Engine, InProcessLease, MemoryEventRelay, MemoryEventStream, RunStatus, TaskContext
from taskwatch.engine.events import HealthSample
from taskwatch.widgets import NodesTable

from .cluster import ClusterApp
from .demo import CrunchParams, EmbedParams, ResizeParams
from .screenshots import FrozenClock, press

#: entries the stream keeps: the dashboard reads these, and api-3's older ones count as missed
STREAM_MAXLEN = 32

#: screen name -> keys pressed once the dashboard shows the whole stream
CLUSTER_SCREENS: dict[str, list[str]] = {
    "nodes": [],
    "nodes_80x24": [],
}

#: the size of each picture
CLUSTER_SIZES: dict[str, tuple[int, int]] = {
    "nodes": (140, 42),
    "nodes_80x24": (80, 24),
}

#: a lease nobody renews while the picture is taken (renewals follow the real clock)
LEASE_TTL = 3600.0


class RunIds:
    """Sequential run ids that say which node made them: ``a1-00001``."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.n = 0

    def __call__(self) -> str:
        self.n += 1
        return f"{self.tag}-{self.n:05d}"


def node_engine(node: str, stream: MemoryEventStream, lease: InProcessLease, clock: FrozenClock,
                gate: asyncio.Event) -> Engine:  # fmt: skip
    """One node of the staged cluster: the same tasks on every node, as a deployment has."""
    engine = Engine(
        node_id=node,
        events=stream,
        lease=lease,
        clock=clock,
        run_id_factory=RunIds(f"a{node[-1]}"),
        health_interval=None,
        max_concurrency=4,
    )

    @engine.task(name="embed_batch")
    async def embed_batch(ctx: TaskContext, params: EmbedParams) -> dict[str, Any]:
        """Embed a user's texts into the vector store."""
        clock.advance(0.3 * len(params.contents))
        return {"user_id": params.user_id, "stored": len(params.contents)}

    @engine.task(name="resize_image", timeout=10.0)
    async def resize_image(ctx: TaskContext, params: ResizeParams) -> str:
        """Resize an image; .bmp fails."""
        clock.advance(0.5)
        if params.url.endswith(".bmp"):
            raise ValueError("cannot decode bmp images: no codec installed")
        return params.url

    @engine.task(name="crunch_numbers", concurrency=2)
    async def crunch_numbers(ctx: TaskContext, params: CrunchParams) -> None:
        """A long computation: runs until the cluster stops."""
        await gate.wait()

    return engine


#: each node's health figures (CPU %, RSS in MiB, open files) as its last sample reports them
LOAD: dict[str, tuple[float, float, int]] = {
    "api-1": (41.5, 212.4, 23),
    "api-2": (12.3, 148.0, 19),
    "api-3": (3.1, 131.6, 17),
}


def health(node: str, running: int) -> dict[str, Any]:
    """A health sample of ``node`` with ``running`` runs going."""
    cpu, rss_mib, open_fds = LOAD[node]
    return {
        "cpu_percent": cpu,
        "rss_bytes": int(rss_mib * 1024 * 1024),
        "threads": 4,
        "open_fds": open_fds,
        "loop_lag_ms": 0.4,
        "running": running,
        "queue_depth": 0,
        "finished_per_s": 0.0 if running else 0.5,
        "failed_per_s": 0.0,
    }


class StagedCluster:
    """Three engines on an event loop of their own, sharing one in-memory event stream.

    ``play()`` starts them and plays the story; ``stop()`` stops them. Between
    the two the loop is idle, so the cluster stands still for the picture.
    """

    NODES = ("api-1", "api-2", "api-3")

    def __init__(self) -> None:
        self.clock = FrozenClock()
        self.stream = MemoryEventStream("taskwatch:events", maxlen=STREAM_MAXLEN)
        self.loop = asyncio.new_event_loop()
        self.engines: dict[str, Engine] = {}
        self._gate: asyncio.Event | None = None

    def play(self) -> None:
        self.loop.run_until_complete(self._play())

    def stop(self) -> None:
        try:
            self.loop.run_until_complete(self._stop())
        finally:
            self.loop.close()

    async def _play(self) -> None:
        clock = self.clock
        self._gate = gate = asyncio.Event()  # never set: long runs keep running until the stop
        lease = InProcessLease(ttl=LEASE_TTL, clock=clock)
        self.engines = {node: node_engine(node, self.stream, lease, clock, gate) for node in self.NODES}
        api1, api2, api3 = (self.engines[node] for node in self.NODES)

        # api-3 leads first and works through a batch of embeddings, then leaves
        await api3.start()
        for i in range(10):
            clock.advance(1.5)
            await _finished(await api3.submit("embed_batch", {"user_id": f"u{40 + i}", "contents": ["a", "b"]}))
        clock.advance(2.0)
        api3.bus.emit(HealthSample, **health("api-3", 0))
        clock.advance(3.0)
        await api3.stop(1.0)

        # api-1 takes the lease it released; api-2 finds it taken and follows
        clock.advance(4.2)
        await api1.start()
        await self._sent()
        clock.advance(1.1)
        await api2.start()
        await self._sent()
        steps: list[tuple[Engine, str, dict[str, Any]]] = [
            (api1, "embed_batch", {"user_id": "u7", "contents": ["alpha", "beta", "gamma"]}),
            (api2, "embed_batch", {"user_id": "u12", "contents": ["delta"]}),
            (api1, "resize_image", {"url": "https://cdn.example/977.bmp"}),
            (api2, "resize_image", {"url": "https://cdn.example/412.png"}),
        ]
        for engine, task, params in steps:
            clock.advance(2.0)
            await _finished(await engine.submit(task, params))
            await self._sent()
        for engine in (api1, api2, api1):
            clock.advance(1.0)
            handle = await engine.submit("crunch_numbers", {"steps": 40})
            await _until(lambda: handle.record().status is RunStatus.RUNNING)
            await self._sent()
        for engine in (api1, api2):
            clock.advance(0.7)
            engine.bus.emit(HealthSample, **health(engine.node_id, engine.stats().running))
            await self._sent()
        clock.advance(1.3)

    async def _sent(self) -> None:
        """Wait until every running node's events are in the stream.

        Each step waits for this before the next, so the stream holds the nodes'
        events in the order they happened, however the relays batch them.
        """
        relays = [engine.cluster for engine in self.engines.values() if engine.state == "running"]
        await _until(lambda: all(relay is None or relay.pending == 0 for relay in relays))

    async def _stop(self) -> None:
        for engine in self.engines.values():
            await engine.stop(0.1)


async def _finished(handle: Any) -> None:
    await _until(lambda: handle.record().status.finished)


async def _until(predicate: Callable[[], Any], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("the staged cluster did not settle")
        await asyncio.sleep(0.005)


@contextmanager
def staged_cluster() -> Iterator[StagedCluster]:
    """The cluster after its story, standing still until the block ends."""
    cluster = StagedCluster()
    try:
        cluster.play()
        yield cluster
    finally:
        cluster.stop()


def cluster_app(cluster: StagedCluster) -> ClusterApp:
    """The cluster dashboard on the staged cluster's stream, read from its oldest entry."""
    return ClusterApp(MemoryEventRelay(cluster.stream, since="0"), clock=cluster.clock)


async def settle_cluster(app: ClusterApp, cluster: StagedCluster) -> None:
    """Wait until the dashboard has read every entry of the stream and drawn it.

    The dashboard drains its events into the log before it draws the nodes, so
    once the nodes table shows every node's final count the log has them all.
    """
    relay = app.source
    await _until(lambda: relay.stats().received == len(cluster.stream))
    expected = {info.node: str(info.events) for info in relay.nodes()}
    table = app.query_one(NodesTable)

    def drawn() -> bool:
        return table.shown_keys == sorted(expected) and all(
            table.get_cell(node, "events").plain == count for node, count in expected.items()
        )

    await _until(drawn)


async def capture_cluster(cluster: StagedCluster, name: str, keys: list[str]) -> str:
    app = cluster_app(cluster)
    async with app.run_test(size=CLUSTER_SIZES[name]) as pilot:
        await settle_cluster(app, cluster)
        await press(app, pilot, keys)
        svg = app.export_screenshot(title=f"taskwatch — {name}")
    return svg
