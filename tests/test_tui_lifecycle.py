"""How the dashboard starts and ends: signals, exit statuses, the engine stopping under it,
and the token read from a pipe.

The terminal cases run ``taskwatch`` as a person's shell does: in a pseudo-terminal that is
its controlling terminal, so closing it sends SIGHUP as closing a terminal window does.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import re
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from taskwatch.engine import Engine, TaskContext
from taskwatch.tui.app import TaskwatchApp
from taskwatch.tui.cli import TokenError, read_token_file
from taskwatch.tui.client import LocalClient
from taskwatch.tui.remote_client import RemoteClient
from taskwatch.tui.terminal import TerminalStream
from taskwatch.widgets import CountsBar, LeaderBadge
from textual.drivers._writer_thread import MAX_QUEUED_WRITES, WriterThread
from textual.drivers.linux_driver import LinuxDriver

from .helpers import eventually, wait_until

#: a process's exit, or a screen's first frame, on a loaded machine
TIMEOUT = 30.0

#: makes the terminal it is given the controlling one (as a login shell's is), then runs the command
_WITH_CONTROLLING_TTY = (
    "import fcntl, os, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); os.execv(sys.argv[1], sys.argv[1:])"
)
#: what a dashboard sends when it gives the terminal back (leaves the alternate screen)
LEAVE_ALT_SCREEN = b"\x1b[?1049l"
ENTER_ALT_SCREEN = b"\x1b[?1049h"


class Terminal:
    """``taskwatch ARGS`` in a pseudo-terminal of its own; everything it writes is kept."""

    def __init__(self, args: list[str], cwd: Path, cols: int = 120, rows: int = 30) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WITH_CONTROLLING_TTY, sys.executable, "-m", "taskwatch.tui", *args],
            stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, start_new_session=True,
        )
        os.close(slave)
        self.master: int | None = master
        self.output = bytearray()
        self._eof = False
        self._changed = threading.Condition()
        self._closing = threading.Event()
        self._reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self._reader.start()

    def _read(self, fd: int) -> None:
        while True:
            # never blocked in read() while close() may want the terminal gone: a read in
            # progress holds the master open, and the kernel hangs up (SIGHUP) only when the
            # last hold is dropped (which, on a screen with nothing to redraw, is never)
            if self._closing.is_set():
                data = b""
            elif not select.select([fd], [], [], 0.05)[0]:
                continue
            else:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # EIO: the last writer is gone
                    data = b""
            with self._changed:
                if data:
                    self.output += data
                else:
                    self._eof = True
                self._changed.notify_all()
            if not data:
                return

    def wait_for(self, needle: bytes, start: int = 0, timeout: float = TIMEOUT) -> int:
        """Wait until ``needle`` was written (after ``start``); where it ends."""
        with self._changed:
            found = self._changed.wait_for(lambda: needle in self.output[start:] or self._eof, timeout)
            at = self.output.find(needle, start)
        assert found and at >= 0, f"{needle!r} never written; got {bytes(self.output[-2000:])!r}"
        return at + len(needle)

    def press(self, keys: str) -> None:
        assert self.master is not None
        os.write(self.master, keys.encode())

    def close(self) -> None:
        """Close the terminal, as closing its window does (its process gets SIGHUP)."""
        if self.master is not None:
            self._closing.set()
            self._reader.join(TIMEOUT)
            os.close(self.master)
            self.master = None

    def wait_exit(self, timeout: float = TIMEOUT) -> int:
        """The exit status, as a shell shows it (a negative number: killed by that signal)."""
        try:
            return self.proc.wait(timeout)
        finally:
            self._reader.join(timeout)

    def text(self) -> str:
        return bytes(self.output).decode("utf-8", "replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close()


LONG_APP = '''
import asyncio
from taskwatch.engine import Engine, TaskContext

engine = Engine(node_id="lifecycle", store="sqlite:///{db}", health_interval=None)


@engine.task(name="long")
async def long(ctx: TaskContext) -> None:
    # works until the engine begins to stop, then ends: a stop need not wait out its drain
    while engine.state == "running":
        await asyncio.sleep(0.02)


@engine.periodic(every=3600, initial_delay=0, name="kick")
async def kick(ctx: TaskContext) -> None:
    await engine.submit("long")
'''

CRASHING_APP = '''
from taskwatch.engine import Engine


class BrokenEngine(Engine):
    def snapshot(self, runs_limit: int = 500):
        raise LookupError("a bug in this engine's snapshot")


engine = BrokenEngine(node_id="broken", health_interval=None)
'''


def statuses(db: Path, task: str = "long") -> list[str]:
    with sqlite3.connect(db) as conn:
        return [row[0] for row in conn.execute("select status from runs where task = ?", (task,))]


@pytest.fixture
def long_app(tmp_path: Path) -> Iterator[tuple[Terminal, Path]]:
    """``taskwatch lifecycle_app`` in a terminal, its dashboard drawn and its `long` run running."""
    db = tmp_path / "runs.db"
    (tmp_path / "lifecycle_app.py").write_text(LONG_APP.format(db=db))
    term = Terminal(["lifecycle_app"], cwd=tmp_path)
    try:
        term.wait_for(ENTER_ALT_SCREEN)
        term.wait_for(b"LEADER")
        wait_until(lambda: db.exists() and statuses(db) == ["running"], timeout=TIMEOUT)
        yield term, db
    finally:
        term.kill()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_ends_the_dashboard_as_q_does(long_app: tuple[Terminal, Path], signum: int) -> None:
    term, db = long_app
    sent_at = len(term.output)
    term.proc.send_signal(signum)
    # the status a shell gives a process a signal ended; the terminal is given back and the
    # engine stopped, so no run is left `running` in the store for a recovery to find
    assert term.wait_exit() == 128 + signum
    assert LEAVE_ALT_SCREEN in term.output[sent_at:]
    assert "running" not in statuses(db)


def test_closing_the_terminal_window_stops_the_engine(long_app: tuple[Terminal, Path]) -> None:
    term, db = long_app
    term.close()  # SIGHUP, and nothing to draw on any more
    assert term.wait_exit() == 128 + signal.SIGHUP
    assert "running" not in statuses(db)


def test_the_dashboards_screen_writer_outlives_a_closed_terminal() -> None:
    # closing the window ends the terminal, and the frames drawn before SIGHUP is handled (a
    # loaded machine, a dashboard at 15 frames a second) must not fill the writer's queue of
    # 30: a write past that would block the app's loop for good, and the engine never stop
    app = TaskwatchApp(LocalClient(Engine(health_interval=None)))
    driver = app.get_driver_class()
    assert issubclass(driver, LinuxDriver) and driver is not LinuxDriver
    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w")
    try:
        writer = WriterThread(TerminalStream(terminal))
        writer.start()
        os.close(master)  # the window closed
        drawn = threading.Event()

        def draw() -> None:
            for n in range(4 * MAX_QUEUED_WRITES):
                writer.write(f"frame {n}\n")
            writer.stop()  # the driver's close(): returns once the queue is drained
            drawn.set()

        threading.Thread(target=draw, daemon=True).start()
        assert drawn.wait(TIMEOUT), "the writer died with the terminal, and its full queue blocked the app"
    finally:
        with contextlib.suppress(OSError):  # what it still buffers has nowhere to go
            terminal.close()


def test_quitting_with_a_run_going_says_what_the_wait_is_for(long_app: tuple[Terminal, Path]) -> None:
    term, db = long_app
    quit_at = len(term.output)
    term.press("q")
    assert term.wait_exit() == 0
    after = bytes(term.output[quit_at:])
    left = after.rfind(LEAVE_ALT_SCREEN)
    assert left >= 0
    # said on the shell's screen, after the dashboard's is gone, before the wait
    assert "stopping the engine: 1 run still running (up to 5 s to finish" in after[left:].decode()
    assert "running" not in statuses(db)


STUBBORN_APP = '''
import asyncio, pathlib
from taskwatch.engine import Engine, TaskContext

engine = Engine(node_id="stubborn", health_interval=None, cancel_grace=0.2)


@engine.task(name="stubborn")
async def stubborn(ctx: TaskContext) -> None:
    pathlib.Path(f"started-{ctx.run_id}").touch()
    while True:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            pass  # a bug in the task: it ignores cancellation


@engine.periodic(every=3600, initial_delay=0, name="kick")
async def kick(ctx: TaskContext) -> None:
    for _ in range(2):
        await engine.submit("stubborn")
'''


def test_quitting_while_runs_ignore_cancellation_says_how_long_it_can_take_and_when_it_cancels(
    tmp_path: Path,
) -> None:
    (tmp_path / "stubborn_app.py").write_text(STUBBORN_APP)
    term = Terminal(["stubborn_app"], cwd=tmp_path)
    try:
        term.wait_for(ENTER_ALT_SCREEN)
        term.wait_for(b"LEADER")
        wait_until(lambda: len(list(tmp_path.glob("started-*"))) == 2, timeout=TIMEOUT)
        quit_at = len(term.output)
        term.press("q")
        said_at = term.wait_for(b"stopping the engine: 2 runs still running", start=quit_at)
        said = time.monotonic()
        assert term.wait_exit() == 0
        took = time.monotonic() - said
        after = bytes(term.output[said_at:]).decode("utf-8", "replace")
    finally:
        term.kill()
    # the whole wait, as the engine's options make it: the drain (5 s), then the three rounds
    # of cancel_grace (0.2 s) the engine's stop gives a run that ignores cancellation
    assert (
        "up to 5 s to finish, then cancelled; a run that ignores cancellation holds the stop up to 5.6 s in all"
    ) in after
    # and a second line once the wait for them ends
    assert "cancelling the runs still going after 5 s (up to 0.6 s more)" in after
    assert took < 5.6 + 4.0  # the bound said, and a moment for a loaded machine


SLOW_TO_STOP_APP = '''
import asyncio, os
from taskwatch.engine import Engine, TaskContext

engine = Engine(node_id="slow", store="sqlite:///{db}", health_interval=None)


@engine.task(name="long")
async def long(ctx: TaskContext) -> None:
    # goes on past the engine's stop until the test lets it end
    while not os.path.exists({release!r}):
        await asyncio.sleep(0.02)


@engine.periodic(every=3600, initial_delay=0, name="kick")
async def kick(ctx: TaskContext) -> None:
    await engine.submit("long")
'''


def test_ctrl_c_while_the_engine_stops_lets_the_stop_finish_without_a_traceback(tmp_path: Path) -> None:
    db, release = tmp_path / "runs.db", tmp_path / "release"
    (tmp_path / "slow_app.py").write_text(SLOW_TO_STOP_APP.format(db=db, release=str(release)))
    term = Terminal(["slow_app"], cwd=tmp_path)
    try:
        term.wait_for(ENTER_ALT_SCREEN)
        term.wait_for(b"LEADER")
        wait_until(lambda: db.exists() and statuses(db) == ["running"], timeout=TIMEOUT)
        quit_at = len(term.output)
        term.press("q")
        term.wait_for(b"stopping the engine: 1 run still running", start=quit_at)
        term.proc.send_signal(signal.SIGINT)  # Ctrl-C at the shell's prompt line, impatient
        release.touch()
        assert term.wait_exit() == 0
        after = bytes(term.output[quit_at:]).decode("utf-8", "replace")
        assert "Traceback" not in after and "KeyboardInterrupt" not in after, after
        assert statuses(db) == ["succeeded"]  # the stop was not cut short: the run ended as it does
    finally:
        term.kill()


def test_ctrl_c_while_the_engine_starts_ends_the_dashboard_at_once(tmp_path: Path) -> None:
    import socket

    # a PostgreSQL address where connections are taken and never answered: the start hangs
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        (tmp_path / "hung_app.py").write_text(
            "from taskwatch.engine import Engine\n"
            f"engine = Engine(store='postgresql://u@127.0.0.1:{port}/db', health_interval=None)\n"
        )
        term = Terminal(["hung_app"], cwd=tmp_path)
        try:
            silent.settimeout(TIMEOUT)
            conn, _ = silent.accept()  # the engine's start is waiting on it now
            with conn:
                term.proc.send_signal(signal.SIGINT)
                assert term.wait_exit() == 128 + signal.SIGINT  # not after its 30 s start timeout
            assert "Traceback" not in term.text(), term.text()[-3000:]
        finally:
            term.kill()


def test_q_typed_before_the_dashboard_is_drawn_quits_cleanly(tmp_path: Path) -> None:
    db = tmp_path / "runs.db"
    (tmp_path / "lifecycle_app.py").write_text(LONG_APP.format(db=db))
    term = Terminal(["lifecycle_app"], cwd=tmp_path)
    try:
        term.wait_for(ENTER_ALT_SCREEN)
        term.press("q")  # typed ahead, while the screen is still being built
        assert term.wait_exit() == 0, term.text()[-3000:]
        assert "Traceback" not in term.text()
    finally:
        term.kill()


def test_a_dashboard_that_crashed_exits_with_a_failure_status(tmp_path: Path) -> None:
    (tmp_path / "crashing_app.py").write_text(CRASHING_APP)
    term = Terminal(["crashing_app"], cwd=tmp_path)
    try:
        assert term.wait_exit() == 1
        assert "a bug in this engine's snapshot" in term.text()  # its traceback is shown
    finally:
        term.kill()


LOGGING_APP = '''
import asyncio, logging, pathlib
from taskwatch.engine import Engine, TaskContext

# as a service module often does at import: a handler holding the real stderr, the terminal
logging.basicConfig(level=logging.INFO)
log = logging.getLogger("logging_app")
engine = Engine(node_id="logging", health_interval=None)


@engine.task(name="explode")
async def explode(ctx: TaskContext) -> None:
    raise ValueError("the reactor is on fire")


@engine.periodic(every=3600, initial_delay=0, name="kick")
async def kick(ctx: TaskContext) -> None:
    while not pathlib.Path("go").exists():  # the test says when the dashboard is drawn
        await asyncio.sleep(0.02)
    log.info("kick submits a task that fails")
    await (await engine.submit("explode")).wait(timeout=30)
    pathlib.Path("logged").touch()  # logging writes as it is called: the failure is logged by now
'''


def test_log_lines_written_while_the_dashboard_is_open_come_after_it_closes(tmp_path: Path) -> None:
    (tmp_path / "logging_app.py").write_text(LOGGING_APP)
    term = Terminal(["logging_app"], cwd=tmp_path)
    try:
        term.wait_for(ENTER_ALT_SCREEN)
        term.wait_for(b"LEADER")
        (tmp_path / "go").touch()
        wait_until(lambda: (tmp_path / "logged").exists(), timeout=TIMEOUT)
        term.press("q")
        assert term.wait_exit() == 0, term.text()[-3000:]
        output = bytes(term.output)
    finally:
        term.kill()
    opened, closed = output.find(ENTER_ALT_SCREEN), output.rfind(LEAVE_ALT_SCREEN)
    assert 0 <= opened < closed
    # nothing written over the dashboard's screen (whose footer may name its `t` key "Traceback")
    during = output[opened:closed].decode("utf-8", "replace")
    for logged in (
        "INFO:logging_app", "WARNING:taskwatch.runs", "Traceback (most recent call last)", 'raise ValueError("the reactor'
    ):
        assert logged not in during, during[-3000:]
    # and nothing lost: once the shell's screen is back, each line, after one saying how many
    shell = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", output[closed:].decode("utf-8", "replace"))  # its modes reset
    after = shell.replace("\r\n", "\n").splitlines()
    headers = [i for i, line in enumerate(after) if " log lines were written while the dashboard was open:" in line]
    assert len(headers) == 1, after
    header = after[headers[0]]
    assert re.fullmatch(r"taskwatch: \d+ log lines were written while the dashboard was open:", header), header
    held = after[headers[0] + 1 : headers[0] + 1 + int(header.split()[1])]
    assert "INFO:logging_app:kick submits a task that fails" in held
    failed = next(i for i, line in enumerate(held) if line.startswith("WARNING:taskwatch.runs:run "))
    assert "of task 'explode' failed on try 1 of 1: ValueError: the reactor is on fire" in held[failed]
    assert held[failed + 1] == "Traceback (most recent call last):"
    assert "ValueError: the reactor is on fire" in held[failed + 2 :], held  # the traceback's end


# ---------------------------------------------------------------------- the engine stops under it


def holding_engine() -> Engine:
    engine = Engine(node_id="stops", health_interval=None)
    engine.resources["release"] = asyncio.Event()

    @engine.task(name="hold")
    async def hold(ctx: TaskContext) -> None:
        await ctx.progress(1, 4, "holding")
        await engine.resources["release"].wait()

    return engine


def header(app: TaskwatchApp) -> str:
    """The header's first line as drawn (what is hidden is not in it)."""
    parts = [app.main.query_one(LeaderBadge), *app.main.query("#top-line > #engine-state")]
    return "  ".join(str(w.render()) for w in parts if w.display)


def counts(app: TaskwatchApp) -> str:
    return str(app.main.query_one(CountsBar).render())


def release(engine: Engine) -> None:
    loop = engine.loop
    assert loop is not None
    loop.call_soon_threadsafe(engine.resources["release"].set)


async def test_the_header_says_when_an_in_process_engine_is_stopping_and_when_it_stopped() -> None:
    engine = holding_engine()
    bg = engine.start_background()
    app = TaskwatchApp(LocalClient(engine), overview_interval=0.2)
    try:
        async with app.run_test(size=(140, 30)):
            await eventually(lambda: app.state.node_id == "stops", timeout=TIMEOUT)
            bg.submit("hold")
            await eventually(lambda: "running 1" in counts(app), timeout=TIMEOUT)
            assert "STOPP" not in header(app)

            stopping = asyncio.get_running_loop().run_in_executor(None, lambda: bg.stop(timeout=TIMEOUT))
            await eventually(lambda: "■ STOPPING" in header(app), timeout=TIMEOUT)
            assert "LEADER" in header(app)  # still leading while its runs finish
            release(engine)
            await stopping

            # stopped for good: an in-process engine does not come back, so nothing says it will
            await eventually(lambda: "■ STOPPED" in header(app), timeout=TIMEOUT)
            shown = header(app)
            assert "stops" in shown and "reconnecting" not in shown and "LEADER" not in shown
            # the counts follow the events that came as it stopped
            await eventually(lambda: "running 0" in counts(app) and "succeeded 1" in counts(app), timeout=TIMEOUT)
    finally:
        bg.stop(timeout=5)


async def test_a_stop_cutting_runs_short_is_counted() -> None:
    engine = holding_engine()
    bg = engine.start_background()
    app = TaskwatchApp(LocalClient(engine), overview_interval=0.2)
    try:
        async with app.run_test(size=(140, 30)):
            await eventually(lambda: app.state.node_id == "stops", timeout=TIMEOUT)
            bg.submit("hold")
            bg.submit("hold")
            await eventually(lambda: "running 2" in counts(app), timeout=TIMEOUT)
            # a drain too short for them: both are cancelled as the engine stops
            await asyncio.get_running_loop().run_in_executor(None, lambda: bg.stop(timeout=0.1))
            assert engine.stats().by_status["cancelled"] == 2
            await eventually(lambda: "■ STOPPED" in header(app), timeout=TIMEOUT)
            await eventually(lambda: "running 0" in counts(app) and "cancelled 2" in counts(app), timeout=TIMEOUT)
            # no rate is measured once nothing more can be asked
            assert "finished/s" not in counts(app)
    finally:
        bg.stop(timeout=5)


async def test_a_served_engine_that_stopped_is_reconnected_to_and_said_to_have_stopped(tmp_path: Path) -> None:
    engine = holding_engine()
    bg = engine.start_background()
    sock = tmp_path / "engine.sock"
    info = bg.serve(str(sock), announce=False)
    app = TaskwatchApp(RemoteClient(info.address, retry_interval=0.05))
    try:
        async with app.run_test(size=(160, 30)):
            await eventually(lambda: app.client.connected and app.state.node_id == "stops", timeout=TIMEOUT)
            await eventually(lambda: "LEADER" in header(app), timeout=TIMEOUT)
            assert "STOPP" not in header(app)
            await asyncio.get_running_loop().run_in_executor(None, lambda: bg.stop(timeout=5))
            await eventually(lambda: "reconnecting" in header(app), timeout=TIMEOUT)
            # it keeps trying (the engine may be started again), and says why it went away
            assert app.main.query_one(LeaderBadge).state == "disconnected"
            await eventually(lambda: "■ STOPPED" in header(app), timeout=TIMEOUT)
    finally:
        bg.stop(timeout=5)


# ---------------------------------------------------------------------- --token-file from a pipe


def test_a_token_is_read_from_a_fifo_its_writer_opens_later(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)

    def write() -> None:
        with open(fifo, "w") as f:  # blocks until the reader has the FIFO open
            f.write("s3cret-token-from-a-pipe\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    assert read_token_file(str(fifo), pipe_timeout=TIMEOUT) == "s3cret-token-from-a-pipe"
    writer.join(TIMEOUT)


def test_a_fifo_nobody_writes_to_is_refused_in_time(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o600)
    outcome: list[BaseException | str] = []

    def read() -> None:
        try:
            outcome.append(read_token_file(str(fifo), pipe_timeout=0.3))
        except BaseException as exc:
            outcome.append(exc)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(TIMEOUT)
    # it used to block in open() until something opened the FIFO for writing: for ever
    assert not reader.is_alive(), "reading a FIFO nobody writes to hangs"
    assert isinstance(outcome[0], TokenError)
    assert "no token came through the pipe" in str(outcome[0])


def test_a_token_is_read_from_process_substitution() -> None:
    # `--token-file <(pass show taskwatch)`: the token never touches the disk
    token = "s3cret-token-0123456789-abcdefgh"
    script = (
        f"{sys.executable} -c 'import sys; from taskwatch.tui.cli import read_token_file; "
        f"print(read_token_file(sys.argv[1]))' <(printf %s {token})"
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == token


def test_a_token_fifo_others_can_read_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "token"
    os.mkfifo(fifo, 0o644)
    os.chmod(fifo, 0o644)  # whatever the umask
    started = time.monotonic()
    with pytest.raises(TokenError, match="accessible by group or others"):
        read_token_file(str(fifo), pipe_timeout=TIMEOUT)
    assert time.monotonic() - started < TIMEOUT / 2  # refused before any wait for a writer


def _sigint_default() -> None:
    # a child of a process that ignores SIGINT (a test worker may) inherits that: Ctrl-C as a
    # terminal sends it must reach the command
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["SIGTERM", "SIGHUP", "Ctrl-C"]
)
def test_a_signal_stops_the_plain_printer_as_ctrl_c_does(tmp_path: Path, signum: int) -> None:
    # --plain is what runs under cron, nohup and service managers, which stop it with SIGTERM:
    # the engine must stop then, or a durable store's run stays `running` until its lease
    # runs out and counts as lost, again at every such stop, until it fails as WorkerLost
    db = tmp_path / "runs.db"
    (tmp_path / "lifecycle_app.py").write_text(LONG_APP.format(db=db))
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskwatch.tui", "lifecycle_app", "--plain"],
        cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=_sigint_default,
    )
    assert proc.stdout is not None
    try:
        proc.stdout.readline()  # its first event: the store's tables are made
        wait_until(lambda: statuses(db) == ["running"], timeout=TIMEOUT)
        proc.send_signal(signum)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signum, err[-800:]
    assert "Traceback" not in err, err[-800:]
    assert "engine.stopped" in out  # the events of the stop are printed, as for --seconds
    assert "running" not in statuses(db)


def test_a_store_that_fails_at_the_start_is_said_in_one_line_by_the_dashboard(tmp_path: Path) -> None:
    # as --plain and `taskwatch web` say it: the dashboard never took the screen, nothing crashed
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the store's directory should be")
    term = Terminal(["--store", f"sqlite:///{blocked}/runs.db"], cwd=tmp_path)
    try:
        assert term.wait_exit() == 2
    finally:
        term.kill()
    text = term.text()
    assert "Traceback" not in text, text[-1500:]
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("taskwatch: "), text[-1500:]
    assert ENTER_ALT_SCREEN not in term.output
