"""`taskwatch attach`: the dashboard driven (Pilot) against an engine served from another process.

Every test starts ``tests/served_engine.py`` as a subprocess, attaches the same
app ``taskwatch attach`` builds -- ``TaskwatchApp(RemoteClient(address,
token=token))`` -- and checks what the dashboard shows against the engine's own
state, read through an independent ``RemoteEngine`` connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from taskwatch.engine import RemoteEngine, RunStatus, Snapshot
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.remote_client import RemoteClient
from taskwatch.tui.screens import SubmitScreen
from taskwatch.widgets import CountsBar, LeaderBadge, ParamsForm, RunDetail, RunsTable, ScheduleTable, StoreBadge
from textual.widgets import Select

from .helpers import eventually, screen_shown

SIZE = (140, 42)
REPO = Path(__file__).resolve().parent.parent
#: generous bounds for a loaded machine; a passing run takes a fraction of them
START_TIMEOUT = 15.0
TIMEOUT = 20.0


# ---------------------------------------------------------------- the served engine process


class Served:
    """One ``python -m tests.served_engine`` process and what it printed."""

    def __init__(self, args: list[str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.served_engine", *args],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.info: dict[str, Any] | None = None
        #: every JSON line after the first, in order ({"submitted": id, "task": ...} or {"error": ...})
        self.lines: list[dict[str, Any]] = []
        self._reader = threading.Thread(target=self._read, daemon=True, name="served-stdout")
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"raw": raw}
            if self.info is None and "address" in payload:
                self.info = payload
            else:
                self.lines.append(payload)

    async def started(self) -> Served:
        deadline = time.monotonic() + START_TIMEOUT
        while self.info is None:
            if self.proc.poll() is not None:
                raise AssertionError(f"the served engine exited with {self.proc.returncode} before serving")
            if time.monotonic() > deadline:
                raise AssertionError(f"the served engine printed no address within {START_TIMEOUT} s")
            await asyncio.sleep(0.01)
        return self

    @property
    def address(self) -> str:
        assert self.info is not None
        return str(self.info["address"])

    @property
    def token(self) -> str | None:
        assert self.info is not None
        return self.info["token"]

    @property
    def node_id(self) -> str:
        assert self.info is not None
        return str(self.info["node_id"])

    def submitted(self, task: str | None = None) -> list[str]:
        """Ids of the runs this process submitted itself, oldest first."""
        return [
            line["submitted"]
            for line in list(self.lines)
            if "submitted" in line and (task is None or line.get("task") == task)
        ]

    def send(self, command: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()

    def remote(self) -> RemoteEngine:
        """An independent connection to the same engine, for checking its real state."""
        return RemoteEngine(self.address, token=self.token, timeout=5.0)

    def terminate(self) -> int:
        """SIGTERM and wait (killing it if it does not stop); returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        return self.proc.returncode


ServeFn = Callable[..., Awaitable[Served]]


@pytest.fixture
def serve() -> Iterator[ServeFn]:
    """``await serve(address, token=..., node_id=..., interval=...)``: a started served engine,
    terminated when the test ends."""
    started: list[Served] = []

    async def start(
        address: str, *, token: str | None = None, node_id: str | None = None, interval: float = 0.2
    ) -> Served:
        args = [address, "--interval", str(interval)]
        if token is not None:
            args.append(f"--token={token}")  # "=": a generated token may begin with "-"
        if node_id is not None:
            args += ["--node-id", node_id]
        served = Served(args)
        started.append(served)
        return await served.started()

    yield start
    for served in started:
        served.terminate()


@pytest.fixture
def sock_path(tmp_path: Path) -> Path:
    path = tmp_path / "engine.sock"
    assert len(os.fsencode(path)) < 100, "tmp_path too long for a Unix socket"
    return path


# ---------------------------------------------------------------- helpers


def attach(served_address: str, token: str | None) -> TaskwatchApp:
    """The app exactly as ``taskwatch attach ADDRESS --token T`` builds it."""
    return TaskwatchApp(RemoteClient(served_address, token=token))


async def remote_until(
    remote: RemoteEngine, predicate: Callable[[Snapshot], Any], timeout: float = TIMEOUT
) -> Snapshot:
    """Poll the engine's own snapshot until ``predicate`` holds (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        snap = await remote.snapshot()
        if predicate(snap):
            return snap
        if time.monotonic() > deadline:
            raise AssertionError(f"remote engine state did not satisfy {predicate} within {timeout} s")
        await asyncio.sleep(0.02)


def run_of(snap: Snapshot, run_id: str) -> Any:
    return next((r for r in snap.runs if r.id == run_id), None)


def shown(app: TaskwatchApp) -> set[str]:
    return set(app.main.query_one(RunsTable).shown_keys)


def badge(app: TaskwatchApp) -> LeaderBadge:
    return app.main.query_one(LeaderBadge)


def notifications(app: TaskwatchApp) -> list[tuple[str, str]]:
    return [(n.message, n.severity) for n in app._notifications]


async def open_submit(app: TaskwatchApp, pilot: Any, task: str) -> tuple[SubmitScreen, ParamsForm]:
    """Press ``s``, pick ``task`` in the Select and return the screen and its generated form."""
    await eventually(lambda: app.state.tasks, timeout=TIMEOUT)
    await pilot.press("s")
    screen = await screen_shown(app, SubmitScreen)
    screen.query_one("#submit-task", Select).value = task

    def form_for_task() -> ParamsForm | None:
        forms = screen.query(ParamsForm)
        return forms.first() if forms and forms.first().task_info.name == task else None

    form = await eventually(form_for_task)
    await pilot.pause()
    return screen, form


# ---------------------------------------------------------------- tests


async def test_attach_over_tcp_shows_remote_runs_and_their_real_statuses(serve: ServeFn) -> None:
    served = await serve("tcp://127.0.0.1:0", token="s3cret-token-0123456789")
    app = attach(served.address, served.token)
    async with app.run_test(size=SIZE), served.remote() as remote:
        await eventually(lambda: app.client.connected and app.state.node_id, timeout=TIMEOUT)
        # the title names where it is attached, the node and where that node keeps its runs
        await eventually(lambda: app.sub_title == f"{served.address} · node {served.node_id} · store memory")
        await eventually(lambda: badge(app).state == "leader")
        assert badge(app).node_id == served.node_id

        # runs the other process submits from now on reach the table as live events
        before = len(served.submitted())
        await eventually(lambda: len(served.submitted()) >= before + 3, timeout=TIMEOUT)
        live = served.submitted()[before : before + 3]
        await eventually(lambda: set(live) <= shown(app), timeout=TIMEOUT)

        # every run the engine says is finished shows that same status in the table
        snap = await remote_until(remote, lambda s: sum(r.status.finished for r in s.runs) >= 3)
        finished = {r.id: r.status for r in snap.runs if r.status.finished}
        table = app.main.query_one(RunsTable)

        def table_agrees() -> bool:
            return all((rec := table.record(i)) is not None and rec.status is st for i, st in finished.items())

        await eventually(table_agrees, timeout=TIMEOUT)
        assert set(finished) <= shown(app)
        assert all(st is RunStatus.SUCCEEDED for st in finished.values())


async def test_submit_from_the_dashboard_runs_on_the_remote_engine(serve: ServeFn) -> None:
    served = await serve("tcp://127.0.0.1:0", token="s3cret-token-0123456789")
    app = attach(served.address, served.token)
    async with app.run_test(size=SIZE) as pilot, served.remote() as remote:
        _, form = await open_submit(app, pilot, "greet")
        form.field_widget("name").value = "Ada"
        form.field_widget("times").value = "3"
        await pilot.click("#submit-ok")

        await eventually(lambda: app.screen is app.main, timeout=TIMEOUT)
        table = app.main.query_one(RunsTable)
        run_id = await eventually(
            lambda: (rid := table.selected_run_id) and app.state.runs[rid].task == "greet" and rid
        )
        # a notification is shown a message later than the table row: waited for, as the row was
        await eventually(lambda: any(msg == f"submitted greet as run {run_id}" for msg, _ in notifications(app)))

        snap = await remote_until(remote, lambda s: (r := run_of(s, run_id)) is not None and r.status.finished)
        record = run_of(snap, run_id)
        assert record.task == "greet"
        assert record.params == {"name": "Ada", "times": 3}
        assert record.status is RunStatus.SUCCEEDED
        assert record.result == "hello Ada hello Ada hello Ada"
        # the dashboard follows, and the new run stays selected while traffic arrives above it
        await eventually(
            lambda: (r := table.record(run_id)) is not None and r.status is RunStatus.SUCCEEDED, timeout=TIMEOUT
        )
        assert table.selected_run_id == run_id


async def test_cancel_from_the_dashboard_cancels_the_remote_run(serve: ServeFn) -> None:
    served = await serve("tcp://127.0.0.1:0", token="s3cret-token-0123456789")
    app = attach(served.address, served.token)
    async with app.run_test(size=SIZE) as pilot, served.remote() as remote:
        await eventually(lambda: app.client.connected, timeout=TIMEOUT)
        served.send("submit forever")  # submitted by the other process itself
        run_id = (await eventually(lambda: served.submitted("forever"), timeout=TIMEOUT))[0]
        table = app.main.query_one(RunsTable)
        await eventually(
            lambda: (r := table.record(run_id)) is not None and r.status is RunStatus.RUNNING and r.progress.done > 0,
            timeout=TIMEOUT,
        )

        assert table.select_run(run_id)
        await pilot.press("c", "y")  # confirmed in the dialog naming the run

        snap = await remote_until(remote, lambda s: (r := run_of(s, run_id)) is not None and r.status.finished)
        record = run_of(snap, run_id)
        assert record.status is RunStatus.CANCELLED
        assert record.cancel_reason == "user"
        await eventually(lambda: table.record(run_id).status is RunStatus.CANCELLED, timeout=TIMEOUT)
        await eventually(lambda: (f"run {run_id} cancelled", "information") in notifications(app))
        assert app.state.runs[run_id].status is RunStatus.CANCELLED


async def test_invalid_params_are_refused_over_the_wire_and_shown_beside_the_field(serve: ServeFn) -> None:
    served = await serve("tcp://127.0.0.1:0", token="s3cret-token-0123456789", interval=0)  # no traffic: nothing else runs
    app = attach(served.address, served.token)
    async with app.run_test(size=SIZE) as pilot, served.remote() as remote:
        screen, form = await open_submit(app, pilot, "greet")
        # a string, so the form sends it; only the engine knows names start with a capital
        form.field_widget("name").value = "bob"
        form.field_widget("times").value = "2"
        await pilot.click("#submit-ok")

        error = await eventually(lambda: form.field_error("name"), timeout=TIMEOUT)
        assert "capital letter" in error
        assert form.field_error("times") == ""
        assert app.screen is screen  # the dialog stays open for a fix
        snap = await remote.snapshot()
        assert snap.runs == []
        assert snap.stats.submitted_total == 0

        # fixing the field submits it (once the button's press effect, which ignores clicks, is over)
        form.field_widget("name").value = "Bob"
        button = screen.query_one("#submit-ok")
        await eventually(lambda: not button.has_class("-active"))
        await pilot.click("#submit-ok")
        await eventually(lambda: app.screen is app.main, timeout=TIMEOUT)
        assert form.field_error("name") == ""
        snap = await remote_until(remote, lambda s: s.runs)
        assert [(r.task, r.params) for r in snap.runs] == [("greet", {"name": "Bob", "times": 2})]
        assert snap.stats.submitted_total == 1


async def test_attach_over_a_unix_socket(serve: ServeFn, sock_path: Path) -> None:
    served = await serve(str(sock_path), node_id="unix-node")
    assert served.address == str(sock_path) and served.token is None
    app = attach(served.address, None)
    async with app.run_test(size=SIZE):
        await eventually(lambda: badge(app).state == "leader", timeout=TIMEOUT)
        assert badge(app).node_id == "unix-node"
        before = len(served.submitted())
        await eventually(lambda: len(served.submitted()) >= before + 2, timeout=TIMEOUT)
        await eventually(lambda: set(served.submitted()[before:]) <= shown(app), timeout=TIMEOUT)


async def test_a_run_cut_off_with_its_engine_is_not_shown_going_on(serve: ServeFn, sock_path: Path) -> None:
    served = await serve(str(sock_path), node_id="doomed", interval=60.0)
    later = [0.0]  # seconds the dashboard's clock is moved on by
    app = TaskwatchApp(RemoteClient(served.address, token=None), clock=lambda: time.time() + later[0])
    async with app.run_test(size=SIZE):
        served.send("submit forever")
        await eventually(lambda: served.submitted("forever"), timeout=TIMEOUT)
        [run_id] = served.submitted("forever")
        table = app.main.query_one(RunsTable)
        await eventually(lambda: run_id in shown(app) and str(table.get_cell(run_id, "status")) == "running",
                         timeout=TIMEOUT)
        served.proc.kill()  # SIGKILL: no word of the run's end will ever come
        await eventually(lambda: badge(app).state == "disconnected", timeout=TIMEOUT)
        frames = app.frames
        await eventually(lambda: app.frames > frames + 1)
        took = str(table.get_cell(run_id, "duration"))
        later[0] = 3600.0
        frames = app.frames
        await eventually(lambda: app.frames > frames + 2)
        # an hour on, the run the dashboard cannot see end does not read an hour longer
        assert str(table.get_cell(run_id, "duration")) == took


async def test_reconnects_and_resynchronises_when_the_engine_comes_back(serve: ServeFn, sock_path: Path) -> None:
    first = await serve(str(sock_path), node_id="first")
    app = attach(first.address, None)
    async with app.run_test(size=SIZE):
        await eventually(lambda: badge(app).state == "leader" and badge(app).node_id == "first", timeout=TIMEOUT)
        await eventually(lambda: len(first.submitted()) >= 2 and set(first.submitted()) <= shown(app), timeout=TIMEOUT)

        assert first.terminate() == 0
        first_runs = set(first.submitted())
        await eventually(lambda: badge(app).state == "disconnected", timeout=TIMEOUT)
        assert "DISCONNECTED" in str(badge(app).render())
        assert app.is_running

        second = await serve(str(sock_path), node_id="second")
        await eventually(lambda: badge(app).state == "leader" and badge(app).node_id == "second", timeout=15.0)
        assert app.state.node_id == "second"
        # resynchronised from the new engine's snapshot, then kept current by its events
        await eventually(
            lambda: len(second.submitted()) >= 2 and set(second.submitted()) <= shown(app), timeout=TIMEOUT
        )
        async with second.remote() as remote:
            snap = await remote.snapshot()
        assert snap.node_id == "second"
        await eventually(lambda: {r.id for r in snap.runs} <= shown(app), timeout=TIMEOUT)
        # runs of the engine that went away are not shown as if they still existed
        assert not first_runs & shown(app)
        assert not first_runs & set(app.state.runs)
        assert app.client.connections == 2


async def test_a_paused_view_still_says_which_engine_answers_after_a_restart(serve: ServeFn, sock_path: Path) -> None:
    first = await serve(str(sock_path), node_id="first")
    app = attach(first.address, None)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: badge(app).state == "leader" and badge(app).node_id == "first", timeout=TIMEOUT)
        await pilot.press("p")  # the view holds still: the runs as they were
        assert first.terminate() == 0
        await eventually(lambda: badge(app).state == "disconnected", timeout=TIMEOUT)
        await serve(str(sock_path), node_id="second")
        # not left saying "reconnecting" to the engine that went away
        await eventually(lambda: badge(app).state == "leader" and badge(app).node_id == "second", timeout=TIMEOUT)
        assert app.view_paused and "second" in str(badge(app).render())


async def test_a_dropped_connection_to_the_same_engine_comes_back_with_the_selection_kept(serve: ServeFn) -> None:
    # more runs than the dashboard adds to its table in one frame, so the refill takes a few
    served = await serve("tcp://127.0.0.1:0", token="s3cret-token-0123456789", interval=0.01)
    app = attach(served.address, served.token)
    async with app.run_test(size=SIZE):
        await eventually(lambda: len(served.submitted()) >= app.rows_per_frame + 40, timeout=TIMEOUT)
        first = served.submitted()[: app.rows_per_frame + 40]
        await eventually(lambda: set(first) <= shown(app), timeout=TIMEOUT)
        table = app.main.query_one(RunsTable)
        picked = first[0]  # an old run, far below the top row
        assert table.select_run(picked)
        assert table.cursor_row > app.rows_per_frame

        remote = app.client._remote
        assert remote is not None
        await remote.close()  # the connection drops; the engine stays up
        await eventually(lambda: app.client.connections == 2 and app.client.connected, timeout=TIMEOUT)
        before = len(served.submitted())
        await eventually(lambda: len(served.submitted()) >= before + 2, timeout=TIMEOUT)
        await eventually(lambda: set(served.submitted()[before:]) <= shown(app), timeout=TIMEOUT)
        assert badge(app).state == "leader"
        # the table is refilled from the fresh snapshot (newest rows first, a few frames) and
        # the run the user had picked is selected again
        await eventually(lambda: set(first) <= shown(app), timeout=TIMEOUT)
        await eventually(lambda: table.selected_run_id == picked, timeout=TIMEOUT)


async def test_no_event_is_lost_while_the_old_connection_is_still_closing(serve: ServeFn, sock_path: Path) -> None:
    # plenty of events on the first engine, so its sequence numbers are ahead of the new one's
    first = await serve(str(sock_path), node_id="first", interval=0.01)
    app = attach(first.address, None)
    async with app.run_test(size=SIZE):
        await eventually(lambda: app.client.connected and app.state.node_id == "first", timeout=TIMEOUT)
        await eventually(lambda: len(first.submitted()) >= 40, timeout=TIMEOUT)
        await eventually(lambda: set(first.submitted()[:40]) <= set(app.state.runs), timeout=TIMEOUT)
        old = app.client._remote
        assert old is not None
        close = old.close

        async def slow_close() -> None:
            await close()
            await asyncio.sleep(0.5)  # a peer that takes its time to finish closing

        old.close = slow_close  # type: ignore[method-assign]
        assert first.terminate() == 0
        await eventually(lambda: badge(app).state == "disconnected", timeout=TIMEOUT)

        second = await serve(str(sock_path), node_id="second", interval=0.02)
        await eventually(lambda: app.state.node_id == "second" and app.client.connections == 2, timeout=15.0)
        await eventually(lambda: len(second.submitted()) >= 40, timeout=TIMEOUT)
        async with second.remote() as remote:
            snap = await remote.snapshot()
        # every run the new engine has reaches the dashboard, including those submitted while
        # the dashboard was still closing its old connection
        await eventually(lambda: {r.id for r in snap.runs} <= set(app.state.runs), timeout=TIMEOUT)
        await eventually(lambda: {r.id for r in snap.runs} <= shown(app), timeout=TIMEOUT)


async def test_attach_before_the_engine_is_up_connects_once_it_is(serve: ServeFn, sock_path: Path) -> None:
    app = attach(str(sock_path), None)
    async with app.run_test(size=SIZE):
        await eventually(lambda: any(sev == "error" for _, sev in notifications(app)), timeout=TIMEOUT)
        assert badge(app).state == "disconnected"

        served = await serve(str(sock_path), node_id="late")
        await eventually(lambda: badge(app).state == "leader" and badge(app).node_id == "late", timeout=15.0)
        await eventually(
            lambda: len(served.submitted()) >= 1 and set(served.submitted()) <= shown(app), timeout=TIMEOUT
        )
        # the once-a-second overview (schedule, queues...) runs too, not only the event stream
        schedule = app.main.query_one(ScheduleTable)
        await eventually(lambda: "tick" in schedule.shown_keys, timeout=TIMEOUT)


def free_port() -> int:
    """A loopback port nothing listens on (bound, then let go)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def visible(widget: Any) -> str:
    """The widget's first line as drawn on screen (cut where the screen cuts it)."""
    return str(widget.render_line(0).text)


async def test_the_header_says_why_the_engine_cannot_be_reached_until_it_is(serve: ServeFn) -> None:
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    why = f"nothing listens on port {port} of 127.0.0.1"
    token = "s3cret-token-0123456789"
    app = attach(address, token)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: why in visible(badge(app)), timeout=TIMEOUT)
        said = visible(badge(app))
        assert said.startswith("✖ DISCONNECTED — reconnecting… to " + address), said
        assert badge(app).state == "disconnected" and app.client.retrying

        # a narrow terminal: the reason is cut to the line, and the store badge keeps its place
        await pilot.resize_terminal(80, 24)
        await eventually(lambda: visible(badge(app)).startswith("✖ DISCONNECTED — reconnecting… (nothing listens"))
        await pilot.pause()
        said, store = visible(badge(app)), visible(app.main.query_one(StoreBadge))
        assert said.rstrip().endswith("…)") and len(said) < 80, said
        assert store.strip().startswith("store"), store

        served = await serve(address, token=token, node_id="late")
        await eventually(lambda: badge(app).state == "leader" and badge(app).node_id == "late", timeout=TIMEOUT)
        await pilot.pause()
        assert "nothing listens" not in visible(badge(app)) and app.client.last_error is None

        # gone again: said anew, from the attempts that fail now
        assert served.terminate() == 0
        await eventually(lambda: badge(app).state == "disconnected", timeout=TIMEOUT)
        await eventually(lambda: "(nothing listens" in visible(badge(app)), timeout=TIMEOUT)


async def test_a_missing_socket_is_named_as_written_in_the_header(tmp_path: Path) -> None:
    # the address is the user's own text: drawn as written, brackets and all, never read as markup
    path = tmp_path / "[b]gone[/b].sock"
    app = attach(str(path), None)
    async with app.run_test(size=(len(str(path)) * 2 + 120, 24)):
        said = await eventually(lambda: "no socket file" in visible(badge(app)) and visible(badge(app)), timeout=TIMEOUT)
        assert f"(there is no socket file at {path} (No such file or directory))" in said, said


async def test_wrong_token_is_final_reported_and_the_app_keeps_running(serve: ServeFn) -> None:
    served = await serve("tcp://127.0.0.1:0", token="the-right-token-0123456789")
    app = attach(served.address, "not-the-token")
    async with app.run_test(size=SIZE) as pilot:
        message = await eventually(
            lambda: next((m for m, sev in notifications(app) if sev == "error"), None), timeout=TIMEOUT
        )
        assert "authentication failed" in message and "not retrying" in message
        assert app.is_running
        # a refused token is final: no silent retries behind a "reconnecting..." that never ends
        assert not app.client.retrying
        await eventually(lambda: badge(app).state == "failed", timeout=TIMEOUT)
        shown = str(badge(app).render())
        assert "authentication failed" in shown and "not retrying" in shown and "reconnecting" not in shown
        assert "not-the-token" not in shown and "not-the-token" not in message  # never shown
        assert not app.client.connected
        # the dashboard still answers keys
        await pilot.press("s")
        await eventually(lambda: ("not connected to an engine yet", "warning") in notifications(app))
        assert app.screen is app.main
        assert app.is_running


@contextlib.contextmanager
def frozen(served: Served) -> Iterator[None]:
    """The served engine's process stopped (``SIGSTOP``: a hung process, or a network path gone
    silent): its socket stays open but nothing answers. Resumed on the way out."""
    os.kill(served.proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(served.proc.pid, signal.SIGCONT)


async def test_a_full_record_that_does_not_come_in_time_is_a_warning_not_a_crash(serve: ServeFn, sock_path: Path) -> None:
    """A run whose params came cut down is fetched in full when selected; an engine that does not
    answer in time (RemoteEngine raises CommandTimeout, a TimeoutError) must not take the dashboard down."""
    served = await serve(str(sock_path), node_id="big", interval=0)
    served.send("submit greet " + json.dumps({"name": "A" + "x" * 40_000, "times": 1}))
    big = (await eventually(lambda: served.submitted("greet"), timeout=TIMEOUT))[0]
    served.send("submit quick")
    other = (await eventually(lambda: served.submitted("quick"), timeout=TIMEOUT))[0]
    app = TaskwatchApp(RemoteClient(served.address, timeout=0.5), refresh_hz=30.0, overview_interval=0.2)
    async with app.run_test(size=SIZE) as pilot:
        table = app.main.query_one(RunsTable)
        await eventually(lambda: {big, other} <= shown(app), timeout=TIMEOUT)
        assert table.select_run(other)
        await pilot.pause()
        with frozen(served):
            assert table.select_run(big)  # the detail pane asks for the whole record
            message = await eventually(
                lambda: next((m for m, sev in notifications(app) if "in full" in m and sev == "warning"), None)
            )
            assert big in message and "no reply" in message
            assert app.is_running
        # answered again: choosing the run again loads it in full
        assert table.select_run(other) and table.select_run(big)
        detail = app.main.query_one(RunDetail)
        await eventually(
            lambda: detail.record is not None and detail.record.id == big and len(detail.record.params.get("name", "")) > 40_000,
            timeout=TIMEOUT,
        )


async def test_an_engine_that_stops_answering_is_shown_as_not_responding_until_it_answers(
    serve: ServeFn, sock_path: Path
) -> None:
    """The socket stays open, so only silence tells: the overview request waits (skipped, not
    cancelled and sent again, while it does) and the header counts how long it has waited."""
    served = await serve(str(sock_path), node_id="hung", interval=0.05)
    app = TaskwatchApp(RemoteClient(served.address), refresh_hz=30.0, overview_interval=0.2, unresponsive_after=0.5)
    async with app.run_test(size=SIZE) as pilot:
        await eventually(lambda: badge(app).state == "leader", timeout=TIMEOUT)
        counts = app.main.query_one(CountsBar)
        await eventually(lambda: counts.rate is not None, timeout=TIMEOUT)  # measured between overviews
        with frozen(served):
            await eventually(lambda: badge(app).state == "unresponsive", timeout=TIMEOUT)
            # a hung engine finishes nothing: the rate last measured no longer stands for it
            await eventually(lambda: counts.rate is None)
            waiting = [w for w in app.workers if w.group == "overview" and not w.is_finished]
            await eventually(lambda: (badge(app).silent_for or 0) >= 1, timeout=TIMEOUT)  # five ticks later
            assert [w for w in app.workers if w.group == "overview" and not w.is_finished] == waiting
            assert len(waiting) == 1  # the one request, still waiting: not cancelled, not sent again
            await pilot.pause()
            said = badge(app).render_line(0).text
            assert "NOT RESPONDING for" in said and "hung" in said and "last seen leader, term 1" in said
            assert "● LEADER" not in said
            assert app.client.connected  # nothing closed: silence is all there is
            assert counts.rate is None
        await eventually(lambda: badge(app).state == "leader", timeout=TIMEOUT)  # answered again


async def test_requests_that_time_out_do_not_count_as_the_engine_answering(
    serve: ServeFn, sock_path: Path
) -> None:
    # a request with no reply in time is silence too: the badge keeps counting through each one
    served = await serve(str(sock_path), node_id="hung", interval=0.05)
    client = RemoteClient(served.address, timeout=0.3)
    app = TaskwatchApp(client, refresh_hz=30.0, overview_interval=0.2, unresponsive_after=0.5)
    async with app.run_test(size=SIZE):
        await eventually(lambda: badge(app).state == "leader", timeout=TIMEOUT)
        with frozen(served):
            # several overview requests sent and timed out meanwhile
            await eventually(lambda: (badge(app).silent_for or 0) >= 1.5, timeout=TIMEOUT)
            assert badge(app).state == "unresponsive"
        await eventually(lambda: badge(app).state == "leader", timeout=TIMEOUT)


def test_cli_attach_without_an_address_is_a_usage_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "taskwatch.tui", "attach"],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 2
    assert "usage: taskwatch attach" in proc.stderr
    assert "address" in proc.stderr
