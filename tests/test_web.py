"""`taskwatch web` as its user meets it: one engine for every tab, a prompt exit, URLs that work
however the page was reached.

Real processes throughout: the web server is ``python -m taskwatch.tui web ...``
(or ``bg.dashboard()``), browser tabs are aiohttp websockets, and what the
dashboards attach to is checked through a ``RemoteEngine`` of the test's own.
The helpers (processes read from ``/proc``, starting and stopping servers) are
tests/test_web_security.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import shlex
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from taskwatch.engine import RemoteEngine
from taskwatch.tui.web import remove_abandoned_directories

from .served_engine import build_engine
from .test_web_security import (
    REPO,
    SESSION_TIMEOUT,
    attach_session,
    children,
    cmdline,
    descendants,
    environ,
    free_port,
    http,  # noqa: F401 - the fixture
    served,  # noqa: F401 - the fixture
    session,
    start_web,
    status,
    stop,
    until_subscribers,
    wait_listening,
)

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")

#: how long the server may take to exit on SIGINT/SIGTERM with a tab open (it used to wait ~20 s
#: for the websocket's heartbeat); generous for a loaded machine, far below that
EXIT_BOUND = 15.0

#: the close code a tab gets when the server tells it it is going away (an abrupt end is 1006)
GOING_AWAY = 1001


def dashboards(server_pid: int) -> list[int]:
    """The dashboard processes (``python -m taskwatch.tui ...``) the server's sessions run.

    A session forked and not yet exec'd still has the server's own command line: not one yet."""
    server = cmdline(server_pid)
    return [
        pid for pid in descendants(server_pid) if (argv := cmdline(pid))[1:3] == ["-m", "taskwatch.tui"] and argv != server
    ]


async def until_dashboards(server_pid: int, count: int) -> list[int]:
    deadline = time.monotonic() + SESSION_TIMEOUT
    while len(found := dashboards(server_pid)) < count:
        assert time.monotonic() < deadline, f"{len(found)} dashboard processes under {server_pid}, expected {count}"
        await asyncio.sleep(0.05)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"  # a zombie has ended


async def until_gone(pids: list[int], within: float) -> None:
    deadline = time.monotonic() + within
    while left := [pid for pid in pids if alive(pid)]:
        assert time.monotonic() < deadline, f"still running: {[cmdline(pid) for pid in left]}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def tab(http: aiohttp.ClientSession, url: str, origin: str) -> AsyncIterator[asyncio.Future[int | None]]:
    """A browser tab's websocket; yields a future set to the close code once the server closed it."""
    closed: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()

    async def read() -> None:
        async for _ in ws:  # the screen's updates, read so the server never waits on a full socket
            pass
        closed.set_result(ws.close_code)

    async with http.ws_connect(url, origin=origin) as ws:
        reader = asyncio.create_task(read())
        try:
            yield closed
        finally:
            await ws.close()
            await asyncio.gather(reader, return_exceptions=True)


APP = """\
import asyncio
from taskwatch.engine import Engine, TaskContext

engine = Engine(node_id="web-app", store="sqlite:///{db}")


@engine.periodic(every=3600.0, name="kick")
async def kick(ctx: TaskContext) -> str:
    await asyncio.sleep(3600)
    return "done"
"""


async def test_every_tab_watches_the_one_engine_the_server_runs(http: aiohttp.ClientSession, tmp_path: Path) -> None:
    # a fixed node_id on SQLite: a second engine would take the first one's running run as lost
    (tmp_path / "webapp_one_engine.py").write_text(APP.format(db=tmp_path / "runs.db"))
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    web = await start_web(["webapp_one_engine"], env=env)
    try:
        async with session(http, web.ws_url, origin=web.origin), session(http, web.ws_url, origin=web.origin):
            pids = await until_dashboards(web.proc.pid, 2)
            argvs = [cmdline(pid) for pid in pids]
            # each tab's dashboard attaches; none loads the app (which would start an engine of its own)
            assert all(argv[3:4] == ["attach"] for argv in argvs), argvs
            assert len({argv[4] for argv in argvs}) == 1, argvs
            address, token = argvs[0][4], environ(pids[0]).get("TASKWATCH_TOKEN")
            assert token and all(token not in " ".join(argv) for argv in argvs)
            remote = RemoteEngine(address, token=token, timeout=5.0)
            try:
                snap = await remote.connect()
                assert snap.node_id == "web-app"
                await until_subscribers(remote, 3)  # both tabs and this test, on the one engine
                kicks = [run for run in (await remote.snapshot()).runs if run.task == "kick"]
                assert [run.status.value for run in kicks] == ["running"], kicks
                assert kicks[0].attempt == 1
            finally:
                await remote.close()
    finally:
        stop(web.proc)
    # the engine stopped with the server, and took its private socket with it
    assert not Path(address).exists() and not Path(address).parent.exists()


@pytest.mark.parametrize(
    ("sig", "args"), [(signal.SIGTERM, ["examples.service:engine"]), (signal.SIGINT, [])], ids=["TERM app", "INT demo"]
)
async def test_a_signal_to_the_server_ends_every_session_and_exits_promptly(
    sig: signal.Signals, args: list[str], http: aiohttp.ClientSession
) -> None:
    web = await start_web(args)
    try:
        async with tab(http, web.ws_url, web.origin) as closed:
            await until_dashboards(web.proc.pid, 1)
            sessions = descendants(web.proc.pid)
            web.proc.send_signal(sig)  # the server only, as a service manager or `kill` does
            deadline = time.monotonic() + EXIT_BOUND
            while web.proc.poll() is None:
                assert time.monotonic() < deadline, f"the server still runs {EXIT_BOUND} s after {sig.name}"
                await asyncio.sleep(0.05)
            # Ctrl+C is the way to quit; SIGTERM's status says a signal ended it, as a shell reports
            assert web.proc.returncode == (0 if sig == signal.SIGINT else 128 + sig)
            # the tab was told, not left to find out from a dead connection
            assert await asyncio.wait_for(closed, 5) == GOING_AWAY
        await until_gone(sessions, within=2)  # no dashboard outlives the server
    finally:
        stop(web.proc)


async def test_the_tab_closes_when_its_dashboard_process_ends(http: aiohttp.ClientSession) -> None:
    # a session command that fails at once, as a dashboard that cannot start does
    port, secret = free_port(), secrets.token_urlsafe(32)
    failing = f"{sys.executable} -c 'raise SystemExit(3)'"
    proc = subprocess.Popen(
        [sys.executable, "-c", f"from taskwatch.tui.web import serve; serve({failing!r}, port={port})"],
        cwd=REPO, env={**os.environ, "TASKWATCH_WEB_SECRET": secret},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        await wait_listening(proc, port)
        origin = f"http://127.0.0.1:{port}"
        async with tab(http, f"ws://127.0.0.1:{port}/{secret}/ws?width=80&height=24", origin) as closed:
            await asyncio.wait_for(closed, 15)  # not a blank page left open for good
        assert children(proc.pid) == []
    finally:
        stop(proc)


class Forward:
    """A TCP port forward to ``port``, as ``ssh -L OTHER:127.0.0.1:PORT`` gives the browser."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.tasks: set[asyncio.Task[None]] = set()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
        for pipe in (self._pipe(reader, up_writer), self._pipe(up_reader, writer)):
            task = asyncio.create_task(pipe)
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    @contextlib.asynccontextmanager
    async def open(self) -> AsyncIterator[int]:
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            for task in list(self.tasks):
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_the_page_works_through_a_port_forward(http: aiohttp.ClientSession, served: dict[str, Any]) -> None:
    web = await start_web(["attach", served["address"]], env={"TASKWATCH_TOKEN": served["token"]})
    try:
        async with Forward(web.port).open() as port:
            origin = f"http://127.0.0.1:{port}"
            async with http.get(f"{origin}/{web.secret}/") as response:
                assert response.status == 200
                page = await response.text()
            # the page sends the browser back the way it came, not to the server's own port
            ws_url = re.search(r'data-session-websocket-url="([^"]+)"', page)[1]  # type: ignore[index]
            assert ws_url == f"ws://127.0.0.1:{port}/{web.secret}/ws"
            assert f'src="{origin}/{web.secret}/static/js/textual.js"' in page
            async with http.ws_connect(f"{ws_url}?width=80&height=24", origin=origin):
                await attach_session(web.proc.pid)  # accepted: the dashboard started
    finally:
        stop(web.proc)


async def test_on_every_interface_the_printed_url_names_this_machine(served: dict[str, Any]) -> None:
    port, secret = free_port(), secrets.token_urlsafe(32)
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskwatch.tui", "web", "attach", served["address"], "--host", "0.0.0.0",
         "--port", str(port)],
        cwd=REPO, env={**os.environ, "TASKWATCH_WEB_SECRET": secret, "TASKWATCH_TOKEN": served["token"]},
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = proc.stdout.readline()  # the test's timeout bounds this
        # 0.0.0.0 is where it listens, not an address a browser can open
        assert line.startswith(f"taskwatch web: open http://{socket.gethostname()}:{port}/{secret}/ "), line
        note = proc.stderr.readline()
        assert "listening on every interface (0.0.0.0)" in note and "unencrypted" in note, note
    finally:
        stop(proc)


async def test_the_url_without_its_final_slash_is_redirected(
    http: aiohttp.ClientSession, served: dict[str, Any]
) -> None:
    web = await start_web(["attach", served["address"]], env={"TASKWATCH_TOKEN": served["token"]})
    try:
        base = f"{web.origin}/{web.secret}"
        for query in ("", "?fontsize=20"):
            async with http.get(base + query, allow_redirects=False) as response:
                assert response.status == 302
                assert response.headers["Location"] == f"/{web.secret}/{query}"
        async with http.get(base) as response:  # followed, as a browser does
            assert response.status == 200 and str(response.url) == f"{base}/"
        # only the secret itself: anything else is still refused
        for path in (f"/{web.secret}x", f"/{web.secret[:-1]}", "/"):
            assert await status(http, web.origin + path) == 403, path
        assert await status(http, base, Origin="http://evil.example") == 403
    finally:
        stop(web.proc)


async def test_stopping_a_background_engine_ends_its_dashboard_sessions(http: aiohttp.ClientSession) -> None:
    bg = build_engine().start_background()
    try:
        url = getattr(frame := bg.dashboard(port=0), "src", frame)
        secret, port = url.rstrip("/").rsplit("/", 1)[1], int(url.split("/")[2].rsplit(":", 1)[1])
        (server_pid,) = [pid for pid in children(os.getpid()) if "taskwatch.tui.web" in " ".join(cmdline(pid))]
        ws_url = f"ws://127.0.0.1:{port}/{secret}/ws?width=100&height=30"
        async with tab(http, ws_url, f"http://127.0.0.1:{port}") as closed:
            await attach_session(server_pid)
            sessions = descendants(server_pid)
            await asyncio.to_thread(bg.stop, 5)
            # the web server ended its sessions on its own SIGTERM, telling the tab, rather than
            # being killed once bg.stop's patience ran out (which left the sessions behind)
            assert await asyncio.wait_for(closed, 5) == GOING_AWAY
        await until_gone([server_pid, *sessions], within=2)
    finally:
        bg.stop(timeout=5)


async def test_a_killed_server_leaves_no_dashboard_running_and_the_next_removes_its_directory(
    http: aiohttp.ClientSession,
) -> None:
    # its own temporary directory: another test's server, starting meanwhile, would sweep the
    # killed server's directory from the shared one before the assertion below could see it
    parent = tempfile.mkdtemp(prefix="tw-")  # short: a socket path has a length limit
    private = {"TMPDIR": parent}
    web = await start_web([], env=private)
    sessions: list[int] = []
    try:
        async with http.ws_connect(web.ws_url, origin=web.origin) as ws:
            async for message in ws:  # until the tab shows the engine: its dashboard runs
                if isinstance(message.data, bytes) and b"demo-node" in message.data:
                    break
            (dashboard,) = dashboards(web.proc.pid)
            sessions = descendants(web.proc.pid)
            directory = Path(cmdline(dashboard)[4]).parent  # where the engine's socket is
            web.proc.kill()  # SIGKILL, as the OOM killer sends: nothing of the server's own runs
            web.proc.wait()
            # the sessions' stdin closed with the server: no dashboard goes on attached to nothing
            await until_gone(sessions, within=5)
    finally:
        stop(web.proc)
        for pid in sessions:  # what a failure above left running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert directory.parent == Path(parent)
    assert directory.is_dir()  # nothing could remove it then
    second = await start_web([], env=private)
    try:
        assert not directory.exists()  # the next server did, its own server being gone
        (own,) = Path(parent).glob(f"taskwatch-web-{second.proc.pid}-*")
        remove_abandoned_directories(parent)
        assert own.is_dir()  # a running server's is kept
    finally:
        stop(second.proc)
    assert not own.exists()
    os.rmdir(parent)  # nothing else was left in it


def test_only_a_directory_whose_server_is_gone_is_removed() -> None:
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # a pid no process has
    with tempfile.TemporaryDirectory() as parent:  # short: a socket path has a length limit
        dead = Path(parent, f"taskwatch-web-{ended.pid}-abc_12")
        alive = Path(parent, f"taskwatch-web-{os.getpid()}-def34")
        other = Path(parent, "taskwatch-web-notapid")
        for directory in (dead, alive, other):
            directory.mkdir(mode=0o700)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(dead / "engine.sock"))
            listener.listen()
            # its pid is gone, but something answers on its socket (another PID namespace's server)
            assert remove_abandoned_directories(parent) == []
        finally:
            listener.close()
        assert remove_abandoned_directories(parent) == [str(dead)]
        assert not dead.exists() and alive.is_dir() and other.is_dir()


SLOW_STOP_APP = """\
import asyncio
from pathlib import Path

from taskwatch.engine import Engine, TaskContext

engine = Engine(node_id="web-stop", store="sqlite:///{db}")
FILES = Path({files!r})


@engine.periodic(every=3600.0, name="slow")
async def slow(ctx: TaskContext) -> str:
    (FILES / "started").touch()
    while not (FILES / "release").exists():
        await asyncio.sleep(0.02)
    return "done"
"""


async def until_exists(path: Path, within: float) -> None:
    deadline = time.monotonic() + within
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {within} s"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize(
    ("sig", "status"), [(signal.SIGHUP, 129), (signal.SIGTERM, 143), (signal.SIGINT, 0)], ids=["HUP", "TERM", "INT"]
)
async def test_a_signal_ends_the_web_server_and_a_second_one_does_not_cut_the_engines_stop_short(
    sig: signal.Signals, status: int, tmp_path: Path
) -> None:
    db = tmp_path / "runs.db"
    (tmp_path / "webapp_slow_stop.py").write_text(SLOW_STOP_APP.format(db=db, files=str(tmp_path)))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])),
        "TASKWATCH_WEB_SECRET": secrets.token_urlsafe(32),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taskwatch.tui", "web", "webapp_slow_stop", "--port", "0",
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), SESSION_TIMEOUT)
        assert line.startswith(b"taskwatch web: open "), line
        await until_exists(tmp_path / "started", within=SESSION_TIMEOUT)
        proc.send_signal(sig)  # an SSH session closing (HUP), `kill`, Ctrl+C
        said = b""
        while b"stopping the engine: 1 run still running" not in said:
            said = await asyncio.wait_for(proc.stderr.readline(), EXIT_BOUND)
            assert said, f"the server ended (status {await proc.wait()}) before stopping its engine"
        proc.send_signal(sig)  # while the stop waits for the run
        (tmp_path / "release").touch()  # the run ends on its own: the stop was not cut short
        rest = await asyncio.wait_for(proc.stderr.read(), EXIT_BOUND)
        assert await asyncio.wait_for(proc.wait(), EXIT_BOUND) == status
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert b"Traceback" not in rest, rest.decode()
    with contextlib.closing(sqlite3.connect(db)) as store:
        assert store.execute("SELECT status FROM runs WHERE task = 'slow'").fetchall() == [("succeeded",)]
    # the engine's private directory went with it
    assert list(Path(tempfile.gettempdir()).glob(f"taskwatch-web-{proc.pid}-*")) == []


async def test_ctrl_c_while_the_engine_starts_ends_the_web_server_at_once(tmp_path: Path) -> None:
    # a PostgreSQL address where connections are taken and never answered: the start hangs
    silent = socket.create_server(("127.0.0.1", 0))
    port = silent.getsockname()[1]
    (tmp_path / "webapp_hung_start.py").write_text(
        "from taskwatch.engine import Engine\n"
        f"engine = Engine(store='postgresql://u@127.0.0.1:{port}/db', health_interval=None)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")]))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "taskwatch.tui", "web", "webapp_hung_start", "--port", "0",
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        silent.settimeout(SESSION_TIMEOUT)
        conn, _ = await asyncio.to_thread(silent.accept)  # the engine's start is waiting on it now
        with conn:
            proc.send_signal(signal.SIGINT)
            _, err = await asyncio.wait_for(proc.communicate(), EXIT_BOUND)  # not its 30 s start timeout
        assert proc.returncode == 128 + signal.SIGINT
        assert b"Traceback" not in err, err.decode()
    finally:
        silent.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


#: a session's process that floods its output: once the server has not read it for half a second
#: (stuck sending to a browser that does not read), it says so in a file and exits, as a dashboard
#: quit meanwhile does
FLOOD = """\
import os, select, sys
os.write(1, b"__GANGLION__\\n")
packet = b"D" + (65536).to_bytes(4, "big") + b"x" * 65536
os.set_blocking(1, False)
writable = select.poll()
writable.register(1, select.POLLOUT)
left = b""
while writable.poll(500):
    left = left or packet
    try:
        left = left[os.write(1, left):]
    except BlockingIOError:
        pass
open(sys.argv[1], "w").close()
"""


async def test_a_browser_that_stopped_reading_leaves_nothing_to_report_at_exit(tmp_path: Path) -> None:
    port, secret = free_port(), secrets.token_urlsafe(32)
    blocked = tmp_path / "blocked"
    command = shlex.join([sys.executable, "-c", FLOOD, str(blocked)])
    proc = subprocess.Popen(
        [sys.executable, "-W", "always::ResourceWarning", "-c",
         f"from taskwatch.tui.web import serve; serve({command!r}, port={port})"],
        cwd=REPO, env={**os.environ, "TASKWATCH_WEB_SECRET": secret},
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        await wait_listening(proc, port)
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.sendall(
                f"GET /{secret}/ws?width=80&height=24 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n".encode()
            )  # and never reads a byte
            await until_exists(blocked, within=SESSION_TIMEOUT)
            proc.terminate()
            _, stderr = await asyncio.to_thread(proc.communicate, timeout=EXIT_BOUND)
    finally:
        stop(proc)
    assert proc.returncode == 0
    # the session's process transport was closed on the server's loop: not collected unclosed
    # (a ResourceWarning, shown here), nor after the loop closed ("Event loop is closed")
    assert "SubprocessTransport" not in stderr and "Event loop is closed" not in stderr, stderr
