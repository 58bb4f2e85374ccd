"""Pictures of every screen, compared with the accepted ones in ``__snapshots__``.

The scenario (``taskwatch.tui.screenshots``) pins the clock, the run ids, the
health samples and the traceback file names, so a picture only changes when
what the dashboard draws changes. The cluster dashboard's Nodes view is
pictured on a staged cluster (``taskwatch.tui.cluster_screenshots``): three
engines sharing an in-memory event stream, on the same frozen clock. Accept a deliberate change with
``pytest tests/test_snapshots.py --snapshot-update`` and look at the report.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from taskwatch.tui.cluster_screenshots import CLUSTER_SCREENS, CLUSTER_SIZES, cluster_app, settle_cluster, staged_cluster
from taskwatch.tui.screenshots import BULK, SCREENS, SIZE, SIZES, press, scenario_app, settle
from textual.pilot import Pilot


@pytest.fixture(autouse=True)
def utc() -> Iterator[None]:
    # times on screen are local times: pin the zone for stable pictures
    old = os.environ.get("TZ")
    os.environ["TZ"] = "UTC"
    time.tzset()
    yield
    if old is None:
        del os.environ["TZ"]
    else:
        os.environ["TZ"] = old
    time.tzset()


@pytest.mark.parametrize("screen", list(SCREENS))
def test_screen(screen: str, snap_compare) -> None:  # type: ignore[no-untyped-def]
    app, engine, clock = scenario_app()

    async def play(pilot: Pilot) -> None:
        # the keys are pressed as `make screenshots` presses them, and the picture waits,
        # as there, until a tab just shown (the event log drawing its backlog) is still
        await settle(app, engine, clock, bulk=screen in BULK)
        await press(app, pilot, SCREENS[screen])

    assert snap_compare(app, terminal_size=SIZES.get(screen, SIZE), run_before=play)


@pytest.mark.parametrize("screen", list(CLUSTER_SCREENS))
def test_cluster_screen(screen: str, snap_compare) -> None:  # type: ignore[no-untyped-def]
    # three engines stand still on a loop of their own while the dashboard reads their stream
    with staged_cluster() as cluster:
        app = cluster_app(cluster)

        async def play(pilot: Pilot) -> None:
            await settle_cluster(app, cluster)
            await press(app, pilot, CLUSTER_SCREENS[screen])

        assert snap_compare(app, terminal_size=CLUSTER_SIZES[screen], run_before=play)
