"""The ``taskwatch`` command: version, help, loading a user's engine, the plain demo."""

from __future__ import annotations

import io
import logging
import os
import re
import select
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from taskwatch.engine import Engine, __version__
from taskwatch.tui.cli import AppPathError, load_engine
from taskwatch.tui.held_logs import HeldTerminalLogs

ROOT = Path(__file__).resolve().parent.parent


def taskwatch(
    *args: str, timeout: float = 60, env: dict[str, str] | None = None, terminal: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the command; with ``terminal``, its stdin and stdout are a pseudo-terminal (what a
    dashboard needs), and only stderr is captured."""
    master, slave = os.openpty() if terminal else (-1, -1)
    try:
        return subprocess.run(
            [sys.executable, "-m", "taskwatch.tui", *args], cwd=ROOT, text=True, timeout=timeout,
            stdin=slave if terminal else subprocess.DEVNULL,
            stdout=slave if terminal else subprocess.PIPE, stderr=subprocess.PIPE,
            env={**os.environ, **env} if env else None,
        )
    finally:
        if terminal:
            os.close(master)
            os.close(slave)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], message: str) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-600:]
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1, (result.returncode, result.stderr[-600:])
    assert lines[0].startswith("taskwatch: ") and message in lines[0], lines[0]


def test_version_and_help() -> None:
    version = taskwatch("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"taskwatch {__version__}"
    help_ = taskwatch("--help")
    assert help_.returncode == 0
    assert "PACKAGE.MODULE:ATTRIBUTE" in help_.stdout and "attach" in help_.stdout


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_module:engine", "module 'no_such_module' not found"),
        ("examples.service:nope", "module 'examples.service' has no attribute 'nope'"),
        ("examples.service:FakeCache", "calling 'examples.service:FakeCache' returned an object of type FakeCache, not"),
        ("examples", "module 'examples' has no attribute 'engine'; name the engine: examples:ATTRIBUTE"),
        (":engine", "expected PACKAGE.MODULE:ATTRIBUTE"),
        ("examples.service:random", "is a module, not a taskwatch Engine"),
    ],
)
def test_a_bad_app_path_is_one_clear_line(path: str, message: str) -> None:
    result = taskwatch(path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("taskwatch: ") and message in lines[0]
    assert "Traceback" not in result.stderr


def test_load_engine_takes_an_engine_or_a_factory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    engine = load_engine("examples.service:engine")
    assert isinstance(engine, Engine) and engine.node_id == "service-1"
    made = load_engine("taskwatch.tui.demo:build_demo_engine")
    assert isinstance(made, Engine) and "embed_batch" in made.tasks()
    with pytest.raises(AppPathError):
        load_engine("examples.service:")
    # without :ATTRIBUTE the engine is looked up as `engine`, as uvicorn looks up `app`
    assert load_engine("examples.service") is engine


def test_an_async_factory_is_refused_with_the_way_to_write_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "asyncapp.py").write_text(
        "from taskwatch.engine import Engine\n"
        "async def make():\n    return Engine()\n"
        "class Later:\n    def __await__(self):\n        yield\n"
        "def awaitable():\n    return Later()\n"
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AppPathError, match="is an async function; make the factory a plain def"):
        load_engine("asyncapp:make")
    with pytest.raises(AppPathError, match="returned an awaitable; return the Engine itself"):
        load_engine("asyncapp:awaitable")


def test_what_is_not_an_engine_is_named_in_plain_english(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "notengines.py").write_text("count = 3\ndef forgot_return():\n    Engine = None\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AppPathError) as an_int:
        load_engine("notengines:count")
    assert str(an_int.value) == "'notengines:count' is an object of type int, not a taskwatch Engine"
    # the factory's result is what is wrong, not the factory
    with pytest.raises(AppPathError) as none:
        load_engine("notengines:forgot_return")
    assert str(none.value) == "calling 'notengines:forgot_return' returned None, not a taskwatch Engine"


def test_help_says_where_the_token_options_apply() -> None:
    def help_of(*args: str) -> str:
        result = taskwatch(*args, "--help", timeout=30)
        assert result.returncode == 0, result.stderr
        return " ".join(result.stdout.split())  # as argparse wrapped it, on one line

    main = help_of()
    assert "--token TOKEN with --serve: access token" in main
    assert "--token-file PATH with --serve: read the access token" in main
    web = help_of("web")
    for option in ("--token TOKEN", "--token-file PATH"):
        assert f"{option} with attach ADDRESS (an engine's tcp:// or Unix socket address): " in web, web
    # both at once are refused, so neither is said to win over the other
    assert "from --token-file or --token (one of them, not both), else $TASKWATCH_TOKEN" in help_of("attach")


def test_attach_needs_an_address() -> None:
    result = taskwatch("attach")
    assert result.returncode == 2 and "address" in result.stderr


def test_plain_demo_prints_every_kind_of_loop() -> None:
    result = taskwatch("--plain", "--seconds", "4", "--seed", "7")
    assert result.returncode == 0, result.stderr
    kinds = {line.split()[1] for line in result.stdout.splitlines() if line.strip()}
    # one-shot runs, periodic tasks (two disabled), the queue, the trigger, the supervised worker
    assert {"run.submitted", "run.progress", "run.succeeded", "periodic.registered",
            "queue.stats", "trigger.fired", "worker.started", "health", "engine.stopped"} <= kinds
    assert "reason=flag kg_extraction is off" in result.stdout
    assert "reason=missing resource: redis" in result.stdout


def test_plain_prints_the_events_of_the_app_it_is_given() -> None:
    result = taskwatch("examples.service:engine", "--plain", "--seconds", "2")
    assert result.returncode == 0, result.stderr
    # the app's own loops are what is printed, not the demo's
    assert "engine.started" in result.stdout and "periodic.registered" in result.stdout and "name=warm_cache" in result.stdout
    assert "embed_batch" not in result.stdout and "chat_turns" not in result.stdout


def test_plain_output_piped_into_head_ends_quietly() -> None:
    """``taskwatch --plain | head``: the reader leaving ends the output without a traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskwatch.tui", "--plain", "--seconds", "30", "--seed", "1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    lines = [proc.stdout.readline() for _ in range(3)]
    assert all(lines)
    proc.stdout.close()  # as head does after its lines
    try:
        stderr = proc.stderr.read()
        code = proc.wait(timeout=30)
    finally:
        proc.kill()
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert code == 0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_web_serves_the_dashboard_page_at_the_printed_url() -> None:
    import queue
    import threading
    import time
    import urllib.error

    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskwatch.tui", "web", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or ()], daemon=True).start()
    try:
        deadline = time.monotonic() + 30
        url = None
        while url is None:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if match := re.match(rf"taskwatch web: open (http://127\.0\.0\.1:{port}/[\w-]{{43}}/) ", line):
                url = match[1]
        # printed once the server listens: the first request is served
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            page = response.read().decode()
        assert "taskwatch" in page
        # everything the page loads comes from this server: it works offline
        outside = [
            u for u in re.findall(r"https?://[^\s\"')]+", page)
            if not u.startswith(f"http://127.0.0.1:{port}/") and u != "http://www.w3.org/2000/svg"  # a namespace
        ]
        assert outside == [], outside
        font = re.search(r"url\(\"([^\"]+RobotoMono-VariableFont_wght\.ttf)\"\)", page)
        assert font is not None
        font_url = font[1] if font[1].startswith("http") else f"http://127.0.0.1:{port}{font[1]}"
        with urllib.request.urlopen(font_url, timeout=5) as response:
            assert response.status == 200 and len(response.read()) > 10_000
        # the same server without the secret in the path: refused
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
        assert refused.value.code == 403
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--serve", "tcp://0.0.0.0:7070"], {}, "refusing to serve on non-loopback host '0.0.0.0'"),
        (["--serve", "tcp://127.0.0.1:notaport"], {}, "port is not a number"),
        (["--serve", "http://127.0.0.1:7070"], {}, "bad address 'http://127.0.0.1:7070': only tcp:// and unix:"),
        (["--serve", "/no/such/dir/x.sock"], {}, "directory /no/such/dir does not exist"),
        (["--serve", "tcp://127.0.0.1:0", "--token", "short"], {}, "the control token is 5 bytes"),
        (["--serve", "tcp://127.0.0.1:0"], {"TASKWATCH_TOKEN": "short"}, "the control token is 5 bytes"),
        (["--seconds", "3"], {}, "--seconds goes with --plain"),
        (["--plain", "--serve", "tcp://0.0.0.0:1"], {}, "--serve goes with the dashboard, not --plain"),
        (["--plain", "--seconds", "1", "--no-confirm"], {}, "--no-confirm goes with the dashboard, not --plain"),
        (["examples.service", "--plain", "--no-confirm"], {}, "--no-confirm goes with the dashboard, not --plain"),
        (["examples.service", "--store", "sqlite:///x.db"], {}, "--store is for the demo; examples.service builds"),
        (["examples.service:engine", "--seed", "3", "--plain"], {}, "--seed is for the demo"),
        (["attach", "tcp://127.0.0.1:notaport"], {}, "port is not a number"),
        (["web", "a", "b", "c"], {}, "unexpected arguments 'b c'"),
        (["web", "attach", "tcp://127.0.0.1:notaport"], {}, "port is not a number"),
        (["web", "--port", "70000"], {}, "--port 70000 is not a port number"),
        (["web", "--host", ""], {}, "--host is empty; give 127.0.0.1"),
        # port 0 picks a free port when serving; there is nothing to attach to there
        (["attach", "tcp://127.0.0.1"], {}, "bad address 'tcp://127.0.0.1': it names no port to connect to"),
        (["attach", "tcp://localhost:0"], {}, "give the port the engine serves on: tcp://localhost:PORT"),
        (["web", "attach", "tcp://127.0.0.1"], {}, "it names no port to connect to"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_a_bad_option_is_one_clear_line(args: list[str], env: dict[str, str], message: str) -> None:
    """Refused before any engine, dashboard or web server starts (none would be left running)."""
    assert_one_clear_line(taskwatch(*args, env=env, timeout=30), message)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def test_serve_on_a_busy_port_stops_the_engine_and_is_one_clear_line(busy_port: int) -> None:
    # only binding finds this out, after the engine started: it is stopped and the process exits
    result = taskwatch("--serve", f"tcp://127.0.0.1:{busy_port}", timeout=30, terminal=True)
    assert_one_clear_line(result, f"cannot serve at tcp://127.0.0.1:{busy_port}")
    assert "address already in use" in result.stderr.lower()


def test_web_on_a_busy_port_prints_no_url_and_is_one_clear_line(busy_port: int) -> None:
    result = taskwatch("web", "--port", str(busy_port), timeout=30)
    assert_one_clear_line(result, f"cannot listen on http://127.0.0.1:{busy_port}: Address already in use")
    assert "http" not in result.stdout


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("no_such_module", "module 'no_such_module' not found"),
        ("examples.service:nope", "module 'examples.service' has no attribute 'nope'"),
    ],
)
def test_web_with_a_bad_app_path_serves_nothing_and_is_one_clear_line(app: str, message: str) -> None:
    # the app is loaded before the server listens: no URL to a blank page, no error per browser tab
    result = taskwatch("web", app, "--port", "0", timeout=30)
    assert_one_clear_line(result, message)
    assert result.stdout == ""


def test_web_on_port_0_prints_the_port_it_listens_on() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "taskwatch.tui", "web", "--port", "0"],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the test's timeout bounds this
        match = re.match(r"taskwatch web: open (http://127\.0\.0\.1:(\d+)/[\w-]{43}/) ", line)
        assert match is not None, line
        assert int(match[2]) != 0
        with urllib.request.urlopen(match[1], timeout=10) as response:  # listening once printed
            assert response.status == 200
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_serve_with_a_short_token_says_where_a_generated_one_is_shown() -> None:
    # the dashboard shows a generated token only in its "Attach command" dialog: never printed
    result = taskwatch("--serve", "tcp://127.0.0.1:0", env={"TASKWATCH_TOKEN": "short"}, timeout=30)
    assert_one_clear_line(result, "the control token is 5 bytes; it must be at least 16")
    assert '"Attach command" dialog' in result.stderr and "printed" not in result.stderr


#: each `attach` address kind (every spelling `attach` takes) and the options that apply to it
ATTACH_ADDRESSES: dict[str, tuple[list[str], set[str]]] = {
    "engine": (
        ["tcp://127.0.0.1:1", "unix:/tmp/tw-none.sock", "unix:///tmp/tw-none.sock", "/tmp/tw-none.sock"],
        {"--token", "--token-file", "--no-confirm"},
    ),
    "redis": (["redis://127.0.0.1:1/0", "rediss://127.0.0.1:1/0"], {"--stream"}),
    "postgresql": (["postgresql://u:pw@127.0.0.1:1/db", "postgres://u@127.0.0.1:1/db"], {"--lease", "--no-confirm"}),
}
ATTACH_OPTIONS: dict[str, list[str]] = {
    "--stream": ["--stream", "mykey"],
    "--lease": ["--lease", "myleader"],
    "--token": ["--token", "x" * 32],
    "--token-file": ["--token-file", "/no/such/token-file"],  # refused before it is read
    "--no-confirm": ["--no-confirm"],
}
APPLIES_TO = {
    "--stream": "applies only to redis:// addresses",
    "--lease": "applies only to postgresql:// addresses",
    "--token": "applies only to an engine's tcp:// or Unix socket address",
    "--token-file": "applies only to an engine's tcp:// or Unix socket address",
    "--no-confirm": "applies only to dashboards that cancel runs",
}


KIND_NAMES = {
    "engine": "not to an engine's address (tcp:// or a Unix socket)",
    "redis": "not to a redis:// address",
    "postgresql": "not to a postgresql:// address",
}


@pytest.mark.parametrize(
    ("kind", "address", "option"),
    [
        (kind, address, option)
        for kind, (addresses, applies) in ATTACH_ADDRESSES.items()
        for address in addresses
        for option in ATTACH_OPTIONS
        if option not in applies
    ],
)
def test_an_attach_option_the_address_would_ignore_is_one_clear_line(kind: str, address: str, option: str) -> None:
    """Refused before connecting: nothing listens at these addresses, and no dashboard starts."""
    result = taskwatch("attach", address, *ATTACH_OPTIONS[option], timeout=30)
    assert_one_clear_line(result, f"{option} {APPLIES_TO[option]}")
    assert KIND_NAMES[kind] in result.stderr, result.stderr
    assert "pw" not in result.stderr  # the address is named by its kind, never echoed with its password


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        (["attach", "http://127.0.0.1:7070"], "'http://127.0.0.1:7070'"),
        (["attach", "mysql://u:pw@db/app"], "'mysql://u:***@db/app'"),
        (["attach", "rediss-typo://x"], "'rediss-typo://x'"),
        (["web", "attach", "mysql://db/app"], "'mysql://db/app'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_an_address_attach_cannot_take_is_refused_naming_every_kind_it_takes(args: list[str], shown: str) -> None:
    result = taskwatch(*args, timeout=30)
    assert_one_clear_line(result, f"bad address {shown}: `attach` takes tcp://, unix: (or a socket path), ")
    # every spelling attach_kind accepts is named, so none looks unsupported
    for scheme in ("postgresql://", "postgres://", "redis://", "rediss://"):
        assert scheme in result.stderr, result.stderr
    assert "pw" not in result.stderr


def test_every_attach_option_is_taken_where_it_applies() -> None:
    from taskwatch.tui.cli import ATTACH_OPTION_KINDS, check_attach_options

    assert set(ATTACH_OPTION_KINDS) == set(ATTACH_OPTIONS)  # a new option gets a row in the test above
    for addresses, applies in ATTACH_ADDRESSES.values():
        for address in addresses:
            check_attach_options(address, sorted(applies))


def test_an_engine_address_reads_the_token_file_it_is_given() -> None:
    # --token-file is taken with an engine's address: the file is read (here, and missing)
    result = taskwatch("attach", "tcp://127.0.0.1:1", "--token-file", "/no/such/token-file", timeout=30)
    assert_one_clear_line(result, "cannot read token file /no/such/token-file")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["web", "attach", "redis://127.0.0.1:1/0", "--token", "x" * 32], "--token applies only to an engine's"),
        (["web", "attach", "postgresql://127.0.0.1:1/db", "--token-file", "/no/such"], "--token-file applies only"),
        (["web", "examples.service", "--token", "x" * 32], "--token goes with `taskwatch web attach ADDRESS`"),
        (["web", "--token-file", "/no/such"], "--token-file goes with `taskwatch web attach ADDRESS`"),
        (["--token", "x" * 32], "--token goes with --serve"),
        (["examples.service", "--plain", "--token-file", "/no/such"], "--token-file goes with --serve"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else "",
)
def test_a_token_option_nothing_would_use_is_one_clear_line(args: list[str], message: str) -> None:
    assert_one_clear_line(taskwatch(*args, timeout=30), message)


def test_the_demos_staged_failures_print_no_traceback() -> None:
    result = taskwatch("--plain", "--seconds", "4", "--seed", "7")
    assert result.returncode == 0, result.stderr
    kinds = {line.split()[1] for line in result.stdout.splitlines() if line.strip()}
    assert "queue.job_failed" in kinds  # a bad job fails within the window, as the demo means it to
    # the demo fails on purpose: its events say so; its stderr stays for what goes wrong
    assert "Traceback" not in result.stderr and "failed" not in result.stderr, result.stderr[-2000:]


def test_log_lines_bound_for_the_terminal_are_held_then_written_saying_how_many_were_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    master, slave = os.openpty()
    terminal = os.fdopen(slave, "w")
    piped = io.StringIO()
    handlers: list[logging.Handler] = [
        on_terminal := logging.StreamHandler(terminal),
        logging.StreamHandler(piped),  # stderr sent to a pipe or a file: not the dashboard's screen
        logging.FileHandler(tmp_path / "app.log"),
    ]
    logger = logging.getLogger("test_cli.held")
    logger.propagate, logger.level = False, logging.INFO
    for handler in handlers:
        logger.addHandler(handler)
    lines = [f"line {n:03d} {'x' * 22}" for n in range(100)]  # 32 characters each, with its newline
    try:
        with HeldTerminalLogs(limit=1024):
            for line in lines:
                logger.info(line)
            assert not select.select([master], [], [], 0)[0]  # nothing reached the terminal
            assert capsys.readouterr().err == ""  # nor, yet, stderr
        err = capsys.readouterr().err.splitlines()
        # the stream given back: lines reach the terminal again
        logger.info("after")
        assert os.read(master, 100) == b"after\r\n"
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
            handler.close()
        os.close(master)
    # the newest whole lines that fit in the limit, after a line saying what was left out
    assert err[0] == (
        "taskwatch: 100 log lines were written while the dashboard was open "
        "(the first 68 left out, to keep the last 1 KiB):"
    )
    assert err[1:] == lines[68:]
    assert (tmp_path / "app.log").read_text().splitlines() == [*lines, "after"] == piped.getvalue().splitlines()
    assert on_terminal.stream is terminal


def test_what_the_last_resort_handler_would_write_is_held_too() -> None:
    # no handler anywhere: logging's last resort writes on sys.stderr as it is then (under the
    # dashboard, Textual's capture, where the line is lost)
    script = (
        "import logging, sys\n"
        "from taskwatch.tui.held_logs import HeldTerminalLogs\n"
        "with HeldTerminalLogs():\n"
        "    logging.getLogger('app').warning('disk almost full')\n"
        "    logging.getLogger('app').info('not a warning: not for the last resort')\n"
        "    print('closing', file=sys.stderr)\n"
        "with HeldTerminalLogs():\n"
        "    print('nothing held', file=sys.stderr)\n"
        "logging.getLogger('app').warning('after')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], text=True, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "closing",
        "taskwatch: 1 log line was written while the dashboard was open:",
        "disk almost full",
        "nothing held",
        "after",
    ]
