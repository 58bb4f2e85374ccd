"""The README's web-service example (examples/web_app.py) under a real uvicorn, talked to over HTTP.

Each server is ``python -m uvicorn examples.web_app:app`` in a subprocess, serving on a
listening socket the test bound itself and handed over with ``--fd``: a request made before
the app's startup is over waits in the socket's backlog, so there is no port to race for
and nothing to poll before the first request.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# the test extra installs both; imported here so a missing one fails by name, never skips
import fastapi  # noqa: F401
import pytest
import uvicorn  # noqa: F401
from taskwatch.engine import RemoteEngine

from .helpers import wait_until

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "web_app.py"
#: generous for a loaded machine; a passing request takes milliseconds
HTTP_TIMEOUT = 10.0
#: the engine's stop drains for up to 10 s (Engine.stop's default), then uvicorn exits
EXIT_TIMEOUT = 20.0
#: never through an http_proxy the environment may set: the server is on loopback
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class WebApp:
    """One uvicorn process serving the example, with its stderr kept in a file."""

    def __init__(self, workdir: Path, name: str, env: dict[str, str]) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        self.base = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.stderr_path = workdir / f"{name}.stderr"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("TASKWATCH_")}
        with self.stderr_path.open("w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "examples.web_app:app", "--fd", str(listener.fileno())],
                cwd=ROOT,  # so `examples` imports, as it does for a reader in the repository
                env={**environ, **env},
                pass_fds=(listener.fileno(),),
                stdout=subprocess.DEVNULL,
                stderr=stderr,
            )
        listener.close()  # the server holds its own copy

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, dict[str, str], Any]:
        """Status, headers and JSON body of one request (an error status is an answer too)."""
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with OPENER.open(request, timeout=HTTP_TIMEOUT) as response:
                return response.status, lowered(response.headers), decoded(response.read())
        except urllib.error.HTTPError as answer:
            with answer:
                return answer.code, lowered(answer.headers), decoded(answer.read())

    def run(self, run_id: str) -> dict[str, Any]:
        status, _, record = self.call("GET", f"/runs/{run_id}")
        assert status == 200, record
        return dict(record)

    def submit(self, **params: Any) -> str:
        status, _, body = self.call("POST", "/reports", params)
        assert status == 202, body
        return str(body["run_id"])

    def run_ids(self) -> list[str]:
        status, _, records = self.call("GET", "/runs?limit=1000")
        assert status == 200, records
        return [record["id"] for record in records]

    def terminate(self) -> int:
        """SIGTERM, as a process manager stops a server, and wait (bounded) for the exit."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=EXIT_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=EXIT_TIMEOUT)


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Any]:
    """``start(**env)``: a served example; any still running at the test's end is killed."""
    started: list[WebApp] = []

    def start_one(**env: str) -> WebApp:
        app = WebApp(tmp_path, f"uvicorn-{len(started)}", env)
        started.append(app)
        return app

    yield start_one
    for app in started:
        app.kill()


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebApp]:
    """One server on the memory store, shared by the tests that only submit, read and cancel."""
    app = WebApp(tmp_path_factory.mktemp("web"), "uvicorn", {})
    yield app
    app.kill()


def lowered(headers: Any) -> dict[str, str]:
    """Headers by their lower-case names: HTTP names are case-insensitive, a dict's keys are not."""
    return {name.lower(): value for name, value in headers.items()}


def decoded(body: bytes) -> Any:
    """JSON as the app answers it, or the text of an answer that is not (a 500's)."""
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")


def clean_shutdown(stderr: str) -> bool:
    return "Application shutdown complete." in stderr and not any(
        bad in stderr for bad in ("Traceback", "Task was destroyed", "Exception ignored", "ERROR")
    )


# ---------------------------------------------------------------- requests


def test_a_report_submitted_over_http_runs_and_its_record_shows_the_result(web: WebApp) -> None:
    status, headers, body = web.call("POST", "/reports", {"user_id": "u1", "pages": 3})
    assert status == 202
    assert headers["location"] == f"/runs/{body['run_id']}"
    record = wait_until(lambda: (r := web.call("GET", headers["location"])[2])["status"] == "succeeded" and r)
    assert record["task"] == "render_report"
    assert record["params"] == {"user_id": "u1", "pages": 3, "delay": 0.0}
    assert record["result"] == {"user_id": "u1", "pages": 3}
    assert record["progress"] == {"done": 3.0, "total": 3.0, "message": "rendered page 3"}
    missing = web.call("GET", "/runs/0000000000000000")
    assert missing[0] == 404 and "no run with id '0000000000000000'" in missing[2]["detail"]


@pytest.mark.parametrize(
    ("params", "field", "says"),
    [
        ({"user_id": "u1", "pages": 0}, "pages", "Input should be greater than or equal to 1"),
        ({"pages": 3}, "user_id", "Field required"),
        ({"user_id": "u" * 201}, "user_id", "String should have at most 200 characters"),
    ],
)
def test_bad_params_answer_422_with_taskwatchs_message_and_record_nothing(
    web: WebApp, params: dict[str, Any], field: str, says: str
) -> None:
    before = web.run_ids()
    status, headers, body = web.call("POST", "/reports", params)
    assert status == 422 and "location" not in headers
    assert body["detail"].startswith("invalid params for task 'render_report'; nothing was queued")
    assert f"  {field}: {says}" in body["detail"]
    assert [e["loc"] for e in body["errors"]] == [[field]]
    assert web.run_ids() == before


def test_delete_cancels_a_running_report_and_a_second_delete_answers_409(web: WebApp) -> None:
    run_id = web.submit(user_id="u2", pages=2, delay=10)
    wait_until(lambda: web.run(run_id)["status"] == "running")
    status, _, record = web.call("DELETE", f"/runs/{run_id}")
    assert status == 200 and record["status"] == "cancelled" and record["cancel_reason"] == "user"
    assert web.run(run_id)["status"] == "cancelled"
    again = web.call("DELETE", f"/runs/{run_id}")
    assert again[0] == 409
    assert again[2]["detail"] == f"run {run_id} is already cancelled; only pending or running runs can be cancelled"


def test_a_full_queue_answers_503_with_retry_after_and_records_nothing(start: Any) -> None:
    app = start()
    # the task runs two at a time and the engine queues 100: a report past those has no room
    running = [app.submit(user_id="u3", delay=30) for _ in range(2)]
    wait_until(lambda: all(app.run(run_id)["status"] == "running" for run_id in running))
    for _ in range(100):
        app.submit(user_id="u3", delay=30)
    status, headers, body = app.call("POST", "/reports", {"user_id": "u3"})
    assert status == 503 and headers["retry-after"] == "5"
    assert "full (100 items waiting); nothing was queued" in body["detail"] and "max_queue" in body["detail"]
    assert len(app.run_ids()) == 102


# ---------------------------------------------------------------- the lifespan


def test_sigterm_stops_the_engine_and_uvicorn_exits_cleanly(start: Any, sock_path: str) -> None:
    app = start(TASKWATCH_CONTROL=sock_path)
    run_id = app.submit(user_id="u4", pages=2, delay=0.5)
    wait_until(lambda: app.run(run_id)["status"] == "running")
    assert os.path.exists(sock_path)
    # uvicorn (0.29 and later) raises the signal it handled again once its shutdown is done, so
    # the process ends as SIGTERM's default would: what systemd or docker expect of a clean stop
    assert app.terminate() == -signal.SIGTERM
    assert clean_shutdown(app.stderr), app.stderr
    assert not os.path.exists(sock_path), "the engine's stop closes its control socket"


def test_a_sqlite_store_keeps_the_runs_across_a_restart(start: Any, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'runs.db'}"
    first = start(TASKWATCH_STORE=store)
    done = first.submit(user_id="u5", pages=1)
    wait_until(lambda: first.run(done)["status"] == "succeeded")
    in_flight = first.submit(user_id="u5", pages=2, delay=0.5)
    wait_until(lambda: first.run(in_flight)["status"] == "running")
    assert first.terminate() == -signal.SIGTERM
    assert clean_shutdown(first.stderr), first.stderr
    again = start(TASKWATCH_STORE=store)
    assert again.run(done)["result"] == {"user_id": "u5", "pages": 1}
    # the shutdown let the run in flight finish, so it is not run a second time
    finished = again.run(in_flight)
    assert (finished["status"], finished["attempt"], finished["result"]) == (
        "succeeded", 1, {"user_id": "u5", "pages": 2}
    )


def test_an_attached_client_sees_the_runs_submitted_over_http(start: Any, tmp_path: Path) -> None:
    # "{pid}" in the path: each worker process of `uvicorn --workers N` serves a socket of its own
    app = start(TASKWATCH_CONTROL=str(tmp_path / "web-{pid}.sock"))
    run_id = app.submit(user_id="u6", pages=1)
    served = str(tmp_path / f"web-{app.proc.pid}.sock")

    async def attached() -> Any:
        async with RemoteEngine(served, timeout=HTTP_TIMEOUT) as remote:
            return await remote.get(run_id)

    record = asyncio.run(attached())
    assert (record.task, record.params["user_id"]) == ("render_report", "u6")


# ---------------------------------------------------------------- the README


def test_the_readmes_web_service_snippet_is_the_example() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### In a web service") :]
    start = section.index("```python\n") + len("```python\n")
    snippet = section[start : section.index("\n```", start)]
    example = set(EXAMPLE.read_text().splitlines())
    assert [line for line in snippet.splitlines() if line.strip() and line not in example] == []
    assert len(snippet.splitlines()) > 10
