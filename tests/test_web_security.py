"""The browser dashboard's access rules and where tokens travel, against real processes.

Each test starts the real web server (``taskwatch web`` or ``bg.dashboard()``)
on a free loopback port and talks to it over real sockets with aiohttp:

- nothing is served without the per-launch secret in the path, and nothing
  without it spawns a dashboard process;
- a websocket from another origin is refused even with the secret; one from
  the page's own origin (or a non-browser client, without ``Origin``) runs
  the dashboard;
- the engine's token reaches the ``taskwatch attach`` session through its
  environment: no process the server starts has it in its argv (read from
  ``/proc/PID/cmdline``), and the session still authenticates -- the engine's
  bus gains its subscriber;
- a token file others can read is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from taskwatch.engine import AuthenticationFailed, RemoteEngine
from taskwatch.engine.background import attach_command
from taskwatch.engine.server import ServerInfo
from taskwatch.tui.cli import _attach_parser, resolve_token

from .served_engine import build_engine

REPO = Path(__file__).resolve().parent.parent
START_TIMEOUT = 20.0
#: a dashboard session starts a Python process running a Textual app: generous on a loaded machine
SESSION_TIMEOUT = 30.0

pytestmark = pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")


# ---------------------------------------------------------------- processes, read from /proc


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []  # it already exited
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (part.decode(errors="replace").partition("=") for part in raw.split(b"\0") if part)
    return {key: value for key, _, value in pairs}


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        kids = children(todo.pop())
        out += kids
        todo += kids
    return out


async def attach_session(server_pid: int) -> tuple[int, list[int]]:
    """Wait for the ``taskwatch.tui attach`` process a session spawned; (its pid, all descendants)."""
    deadline = time.monotonic() + SESSION_TIMEOUT
    while True:
        procs = descendants(server_pid)
        for pid in procs:
            argv = cmdline(pid)
            if argv[1:4] == ["-m", "taskwatch.tui", "attach"]:
                return pid, procs
        assert time.monotonic() < deadline, f"no attach process under {server_pid}: {[cmdline(p) for p in procs]}"
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(proc: subprocess.Popen[str], port: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        assert proc.poll() is None, f"the web server exited with {proc.returncode}"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listened on port {port} within {START_TIMEOUT} s"
        await asyncio.sleep(0.05)


def stop(proc: subprocess.Popen[str]) -> str:
    """SIGTERM (then kill), and what it printed on stdout."""
    if proc.poll() is None:
        proc.terminate()
    try:
        out, _ = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
    return out or ""


class Web:
    def __init__(self, proc: subprocess.Popen[str], port: int, secret: str) -> None:
        self.proc, self.port, self.secret = proc, port, secret
        self.origin = f"http://127.0.0.1:{port}"
        self.url = f"{self.origin}/{secret}/"
        self.ws_url = f"ws://127.0.0.1:{port}/{secret}/ws?width=100&height=30"


async def start_web(
    args: list[str], *, env: dict[str, str] | None = None, secret: str | None = None
) -> Web:
    """``taskwatch web ARGS --port P`` with its secret given in $TASKWATCH_WEB_SECRET."""
    port = free_port()
    secret = secret or secrets.token_urlsafe(32)
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskwatch.tui", "web", *args, "--port", str(port)],
        cwd=REPO,
        env={**os.environ, **(env or {}), "TASKWATCH_WEB_SECRET": secret},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    web = Web(proc, port, secret)
    await wait_listening(proc, port)
    return web


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def served() -> Iterator[dict[str, Any]]:
    """An engine served over TCP from its own process, with a token; its printed info."""
    token = secrets.token_urlsafe(32)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.served_engine", "tcp://127.0.0.1:0", f"--token={token}", "--interval", "0"],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # its first line, printed once serving (EOF if it died)
        info = json.loads(line)
        assert info["token"] == token
        yield info
    finally:
        stop(proc)


async def status(http: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with http.get(url, headers=headers, allow_redirects=False) as response:
        return response.status


async def ws_refused(http: aiohttp.ClientSession, url: str, origin: str | None = None) -> int:
    """Open a websocket that must be refused; the handshake's HTTP status."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        async with http.ws_connect(url, origin=origin):
            pass
    return refused.value.status


async def subscribers(remote: RemoteEngine) -> int:
    return int((await remote.snapshot()).stats.bus["subscribers"])


async def until_subscribers(remote: RemoteEngine, at_least: int) -> None:
    deadline = time.monotonic() + SESSION_TIMEOUT
    while (count := await subscribers(remote)) < at_least:
        assert time.monotonic() < deadline, f"the engine has {count} subscribers, expected {at_least}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def session(
    http: aiohttp.ClientSession, url: str, origin: str | None = None
) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A dashboard websocket that must be accepted; its output is read and dropped meanwhile."""

    async def drain() -> None:
        # the session's screen updates: read so the server never waits on a full socket
        async for _ in ws:
            pass

    async with http.ws_connect(url, origin=origin) as ws:
        reader = asyncio.create_task(drain())
        try:
            yield ws
        finally:
            await ws.close()
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)


# ---------------------------------------------------------------- A: the secret and the Origin rule


async def test_nothing_is_served_without_the_secret(http: aiohttp.ClientSession) -> None:
    web = await start_web([])
    try:
        base = web.origin
        wrong = secrets.token_urlsafe(32)
        for path in ("/", "/ws", "/static/js/textual.js", f"/{wrong}/", f"/{wrong}/ws", f"/{web.secret[:-1]}/"):
            assert await status(http, base + path) == 403, path
        for path in ("/ws", f"/{wrong}/ws", f"/{web.secret}x/ws"):
            assert await ws_refused(http, f"ws://127.0.0.1:{web.port}{path}") == 403, path
        assert descendants(web.proc.pid) == []  # no dashboard process was started

        async with http.get(web.url) as response:
            assert response.status == 200
            assert response.headers["Referrer-Policy"] == "no-referrer"
            page = await response.text()
        # the page's own websocket and assets carry the secret (textual-serve builds them from the router)
        assert re.search(r'data-session-websocket-url="([^"]+)"', page)[1] == (  # type: ignore[index]
            f"ws://127.0.0.1:{web.port}/{web.secret}/ws"
        )
        assert f'src="{web.url}static/js/textual.js"' in page
        assert await status(http, f"{web.url}static/js/textual.js") == 200
    finally:
        printed = stop(web.proc)
    assert f"taskwatch web: open {web.url} " in printed  # the URL shown to the user carries the secret


async def test_a_websocket_from_another_origin_is_refused(http: aiohttp.ClientSession) -> None:
    web = await start_web([])
    try:
        other_port = free_port()
        for origin in ("http://evil.example", "null", f"http://127.0.0.1:{other_port}", f"http://evil.example:{web.port}"):
            assert await ws_refused(http, web.ws_url, origin=origin) == 403, origin
            # the page itself too: another site may not read it through CORS either
            assert await status(http, web.url, Origin=origin) == 403, origin
        assert descendants(web.proc.pid) == []  # refused before any dashboard process started
        # the secret was right: only the origin was wrong
        assert await status(http, web.url, Origin=web.origin) == 200
        assert await status(http, web.url, Origin=f"http://localhost:{web.port}") == 200
    finally:
        stop(web.proc)


@pytest.mark.parametrize("given", ["--token", "env", "--token-file"])
async def test_the_session_attaches_with_the_token_kept_off_argv(
    given: str, http: aiohttp.ClientSession, served: dict[str, Any], tmp_path: Path
) -> None:
    token, address = served["token"], served["address"]
    args, env = ["attach", address], {}
    if given == "--token":
        args += [f"--token={token}"]  # the user's own choice for this process; its children must not show it
    elif given == "env":
        env["TASKWATCH_TOKEN"] = token
    else:
        path = tmp_path / "token"
        path.write_text(token + "\n")
        path.chmod(0o600)
        args += ["--token-file", str(path)]
    web = await start_web(args, env=env)
    remote = RemoteEngine(address, token=token, timeout=5.0)
    try:
        await remote.connect()
        alone = await subscribers(remote)
        if given != "--token":
            assert token not in " ".join(cmdline(web.proc.pid))
        # same origin, as the served page's own script connects
        async with session(http, web.ws_url, origin=web.origin):
            attach_pid, procs = await attach_session(web.proc.pid)
            for pid in [*procs, *descendants(attach_pid)]:
                argv = " ".join(cmdline(pid))
                assert token not in argv and web.secret not in argv, argv
            assert environ(attach_pid).get("TASKWATCH_TOKEN") == token
            # the session authenticated with that token: the engine streams to one more subscriber
            await until_subscribers(remote, alone + 1)
    finally:
        await remote.close()
        stop(web.proc)


async def test_a_client_without_origin_needs_only_the_secret(
    http: aiohttp.ClientSession, served: dict[str, Any]
) -> None:
    web = await start_web(["attach", served["address"]], env={"TASKWATCH_TOKEN": served["token"]})
    try:
        async with session(http, web.ws_url):  # aiohttp sends no Origin unless told
            await attach_session(web.proc.pid)
    finally:
        stop(web.proc)


async def test_a_short_secret_is_refused() -> None:
    port = free_port()
    result = subprocess.run(
        [sys.executable, "-m", "taskwatch.tui", "web", "--port", str(port)],
        cwd=REPO,
        env={**os.environ, "TASKWATCH_WEB_SECRET": "guessable"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "at least 22 URL-safe characters" in result.stderr


# ---------------------------------------------------------------- the notebook's bg.dashboard()


async def test_dashboard_url_carries_the_secret_and_no_process_shows_the_token(
    http: aiohttp.ClientSession,
) -> None:
    bg = build_engine().start_background()
    try:
        info = bg.serve("tcp://127.0.0.1:0", announce=False)
        assert info.token
        port = free_port()
        frame = bg.dashboard(port=port)  # default host: loopback
        url = getattr(frame, "src", frame)
        match = re.fullmatch(rf"http://127\.0\.0\.1:{port}/([A-Za-z0-9_-]{{43}})/", url)
        assert match, url
        secret = match[1]
        (server_pid,) = [pid for pid in children(os.getpid()) if "taskwatch.tui.web" in " ".join(cmdline(pid))]
        server_argv = " ".join(cmdline(server_pid))
        assert info.token not in server_argv and secret not in server_argv, server_argv

        assert await status(http, f"http://127.0.0.1:{port}/") == 403
        assert await status(http, url) == 200
        ws_url = f"ws://127.0.0.1:{port}/{secret}/ws?width=100&height=30"
        assert await ws_refused(http, ws_url, origin="http://evil.example") == 403
        assert descendants(server_pid) == []

        alone = bg.snapshot().stats.bus["subscribers"]
        # the notebook's IFrame page connects from its own origin, here spelled "localhost"
        async with session(http, ws_url, origin=f"http://localhost:{port}"):
            attach_pid, procs = await attach_session(server_pid)
            for pid in procs:
                assert info.token not in " ".join(cmdline(pid))
            assert environ(attach_pid).get("TASKWATCH_TOKEN") == info.token
            deadline = time.monotonic() + SESSION_TIMEOUT
            while bg.snapshot().stats.bus["subscribers"] <= alone:
                assert time.monotonic() < deadline, "the dashboard session never attached"
                await asyncio.sleep(0.05)
    finally:
        bg.stop(timeout=5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ---------------------------------------------------------------- B: token hygiene


def test_attach_command_passes_the_token_in_the_environment() -> None:
    argv, env = attach_command(ServerInfo(address="tcp://127.0.0.1:7070", token="s3cret-token", node_id="n"))
    assert argv == [sys.executable, "-m", "taskwatch.tui", "attach", "tcp://127.0.0.1:7070"]
    assert env == {"TASKWATCH_TOKEN": "s3cret-token"}
    argv, env = attach_command(ServerInfo(address="/tmp/x.sock", token=None, node_id="n"))
    assert env == {} and "--token" not in argv


async def test_attach_takes_the_token_from_a_private_file_or_the_environment(
    served: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    address, token = served["address"], served["token"]
    path = tmp_path / "token"
    path.write_text(token + "\n")
    path.chmod(0o600)
    monkeypatch.delenv("TASKWATCH_TOKEN", raising=False)

    async def connects(args: list[str]) -> None:
        resolved = resolve_token(_attach_parser().parse_args([address, *args]))
        remote = RemoteEngine(address, token=resolved, timeout=5.0)
        try:
            assert (await remote.connect()).node_id == served["node_id"]
        finally:
            await remote.close()

    await connects(["--token-file", str(path)])
    monkeypatch.setenv("TASKWATCH_TOKEN", token)
    await connects([])
    # and the token really is checked: a file with another token is turned away
    path.write_text("not-the-token")
    with pytest.raises(AuthenticationFailed):
        await connects(["--token-file", str(path)])


@pytest.mark.parametrize("command", [["attach", "tcp://127.0.0.1:9"], ["web", "attach", "tcp://127.0.0.1:9"]])
def test_a_token_file_others_can_read_is_refused(command: list[str], tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("s3cret-token\n")
    path.chmod(0o644)

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "taskwatch.tui", *command, *extra],
            cwd=REPO, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
        )

    result = run("--token-file", str(path))
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"taskwatch: token file {path} is accessible by group or others (mode 0644); run: chmod 600 {path}"
    )
    result = run("--token-file", str(path), "--token", "x")
    assert result.returncode == 2 and "give --token or --token-file, not both" in result.stderr


def _without_token() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key != "TASKWATCH_TOKEN"}


@pytest.mark.parametrize("case", ["no engine there", "wrong token", "no token"])
def test_web_attach_tries_the_engine_once_and_refuses_what_no_tab_could_attach_to(
    case: str, served: dict[str, Any], tmp_path: Path
) -> None:
    address, env = served["address"], _without_token()
    if case == "no engine there":
        address = str(tmp_path / "engine.sock")
        expected = f"cannot reach an engine at {address}: "
    elif case == "wrong token":
        env["TASKWATCH_TOKEN"] = secrets.token_urlsafe(32)
        expected = f"the engine at {address} turned the token away: it is not that engine's token"
    else:
        expected = f"the engine at {address} asks for a token: give it in $TASKWATCH_TOKEN or --token-file PATH"
    result = subprocess.run(
        [sys.executable, "-m", "taskwatch.tui", "web", "attach", address, "--port", str(free_port())],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL,
    )
    # one line and status 2, as every refusal: no URL to a page whose every tab would only fail
    assert result.returncode == 2 and result.stdout == "", (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(f"taskwatch: {expected}"), result.stderr
