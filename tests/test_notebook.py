"""examples/notebook.ipynb, executed top to bottom on a real IPython kernel.

The kernel is this interpreter (a ``python3`` kernelspec written to a temp
dir that ``JUPYTER_PATH`` puts before any installed one), so the notebook sees
the taskwatch under test. The checks read the outputs a user would look at.
Then ``bg.dashboard()`` run again, as a cell is: the dashboard it started comes back.
"""

from __future__ import annotations

import html
import json
import re
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
from ipykernel.kernelspec import write_kernel_spec
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient
from nbformat import NotebookNode
from taskwatch.engine import Engine, RemoteEngine

NOTEBOOK = Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"

ERROR_LINE = "ValueError: invalid literal for int() with base 10: 'n/a'"
# the token travels in the environment, where `ps` does not show it to other users
ATTACH = re.compile(
    r"^TASKWATCH_TOKEN=(?P<token>\S+) taskwatch attach (?P<address>tcp://127\.0\.0\.1:\d+)$", re.MULTILINE
)

# inserted before "stop" in the executed copy only: the embedded dashboard the serve cell mentions
DASHBOARD = "bg.dashboard(port={port})"

# appended to the executed copy only: what the kernel runs and which threads outlived bg.stop()
KERNEL_CHECK = """\
import json, sys, threading
print(json.dumps({"prefix": sys.prefix, "threads": sorted(t.name for t in threading.enumerate())}))
"""


@pytest.fixture
def kernel_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private Jupyter setup whose ``python3`` kernel runs this interpreter; returns the kernel's cwd."""
    data = tmp_path / "jupyter-data"
    write_kernel_spec(data / "kernels" / "python3")
    monkeypatch.setenv("JUPYTER_PATH", str(data))
    monkeypatch.setenv("JUPYTER_CONFIG_DIR", str(tmp_path / "jupyter-config"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "jupyter-runtime"))
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert Path(spec.resource_dir).is_relative_to(data)
    assert spec.argv[0] == sys.executable
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    return cwd


def cell(nb: NotebookNode, cell_id: str) -> NotebookNode:
    return next(c for c in nb.cells if c.get("id") == cell_id)


def stdout(c: NotebookNode) -> str:
    return "".join(o.text for o in c.outputs if o.output_type == "stream" and o.name == "stdout")


def result(c: NotebookNode, mime: str) -> str:
    (out,) = [o for o in c.outputs if o.output_type == "execute_result"]
    return out.data[mime]


def test_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata.kernelspec.name == "python3"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for c in code:
        assert c.outputs == [] and c.execution_count is None, c.id
    # every code cell is explained by a markdown cell before it
    for before, after in zip(nb.cells, nb.cells[1:]):
        if after.cell_type == "code":
            assert before.cell_type == "markdown", after.id


def test_notebook_runs_top_to_bottom(kernel_dir: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(KERNEL_CHECK, id="kernel-check"))
    port = _free_port()
    stop_at = next(i for i, c in enumerate(nb.cells) if c.get("id") == "stop")
    nb.cells.insert(stop_at, nbformat.v4.new_code_cell(DASHBOARD.format(port=port), id="dashboard"))
    attached: dict[str, Any] = {}

    async def attach_after_serve(cell: NotebookNode, cell_index: int, **_: Any) -> None:
        if cell.get("id") == "dashboard":
            # the IFrame's URL carries the dashboard's secret; the bare server refuses
            src = re.search(r'<iframe[^>]* src="([^"]+)"', result(cell, "text/html"))
            assert src, cell.outputs
            attached["dashboard"] = src[1], _status(src[1]), _status(f"http://127.0.0.1:{port}/")
            return
        # what `TASKWATCH_TOKEN=T taskwatch attach ADDRESS` does first, from this other process
        if cell.get("id") != "serve":
            return
        match = ATTACH.search(stdout(cell))
        assert match, stdout(cell)
        remote = RemoteEngine(match["address"], token=match["token"], timeout=10)
        try:
            attached["snapshot"] = await remote.connect()
        finally:
            await remote.close()

    client = NotebookClient(
        nb,
        timeout=60,
        kernel_name="python3",
        resources={"metadata": {"path": str(kernel_dir)}},
        on_cell_executed=attach_after_serve,
    )
    client.execute()

    logged = ""
    for c in nb.cells:
        if c.cell_type == "code":
            kinds = [(o.output_type, o.get("name")) for o in c.outputs]
            assert ("error", None) not in kinds, (c.id, c.outputs)
            logged += "".join(o.text for o in c.outputs if o.output_type == "stream" and o.get("name") == "stderr")
    # on stderr only the failed import_csv run, logged once by the engine with its traceback
    assert re.fullmatch(
        r"run \w+ of task 'import_csv' failed on try 1 of 1: ValueError: invalid literal for int\(\) with "
        r"base 10: 'n/a'\nTraceback \(most recent call last\):\n.*in parse_row\n.*\nValueError: invalid literal[^\n]*\n",
        logged, re.S,
    ), logged

    # the kernel ran this interpreter, and bg.stop() ended the engine's thread
    check = json.loads(stdout(cell(nb, "kernel-check")))
    assert check["prefix"] == sys.prefix
    assert not [name for name in check["threads"] if name.startswith("taskwatch-")], check["threads"]
    assert stdout(cell(nb, "stop")).strip() == "running: False"

    # blocking submits and waits, then top-level await
    assert result(cell(nb, "submit"), "text/plain") == "['succeeded', 'succeeded', 'failed']"
    assert stdout(cell(nb, "await")).strip() == "succeeded {'site': 'c.example', 'pages': 3}"

    # progress read while the run worked: it moved forward, then the run succeeded
    lines = stdout(cell(nb, "progress")).strip().splitlines()
    percents = [int(m[1]) for line in lines if (m := re.match(r"\s*(\d+)%", line))]
    assert len(percents) == 5, lines
    assert percents == sorted(percents) and percents[-1] > percents[0], lines
    assert 0 <= percents[0] and percents[-1] <= 100
    assert any("fetched docs.example page" in line for line in lines)
    assert lines[-1] == "succeeded {'site': 'docs.example', 'pages': 10}"

    # bad params: pydantic's message for the field, and nothing queued
    invalid = stdout(cell(nb, "invalid"))
    assert "invalid params for task 'crawl'; nothing was queued" in invalid
    assert "pages: Input should be greater than or equal to 1" in invalid

    # the engine's HTML: counts by status, and the failed run's error line
    engine_html = result(cell(nb, "display"), "text/html")
    assert 'class="taskwatch-engine"' in engine_html
    assert "5 submitted" in engine_html
    for status, count in {"pending": 0, "running": 0, "succeeded": 4, "failed": 1, "cancelled": 0}.items():
        assert f'data-status="{status}" data-count="{count}"' in engine_html, status
    assert html.escape(ERROR_LINE) in engine_html

    runs_html = result(cell(nb, "runs"), "text/html")
    assert "<b>5 runs</b>" in runs_html and html.escape(ERROR_LINE) in runs_html

    failed_html = result(cell(nb, "failed"), "text/html")
    assert 'class="taskwatch-run"' in failed_html and "import_csv" in failed_html
    assert html.escape(ERROR_LINE) in failed_html

    # the whole traceback, starting at the task's own code
    traceback = stdout(cell(nb, "traceback")).strip()
    assert traceback.startswith("Traceback (most recent call last):")
    assert re.findall(r'File ".*", line \d+, in (\w+)', traceback) == ["import_csv", "parse_row"]
    assert traceback.endswith(ERROR_LINE)

    # the printed attach command worked from another process while the engine ran
    match = ATTACH.search(stdout(cell(nb, "serve")))
    assert match and len(match["token"]) >= 32
    snapshot = attached["snapshot"]
    node_id = re.fullmatch(r"<BackgroundEngine (\S+) running>", result(cell(nb, "display"), "text/plain"))
    assert node_id and snapshot.node_id == node_id[1]
    assert snapshot.state == "running"
    assert snapshot.stats.by_status.get("succeeded") == 4
    assert snapshot.stats.by_status.get("failed") == 1
    assert sorted(run.task for run in snapshot.runs) == ["crawl"] * 4 + ["import_csv"]

    # bg.dashboard(): its IFrame URL holds a per-launch secret, and bg.stop() ended its server
    url, with_secret, without = attached["dashboard"]
    assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/[A-Za-z0-9_-]{{43}}/", url), url
    assert (with_secret, without) == (200, 403)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_a_dashboard_cell_run_again_shows_the_dashboard_it_started() -> None:
    before = set(_web_servers())  # of other tests, in this test process

    def started() -> set[int]:
        return set(_web_servers()) - before

    bg = Engine(node_id="notebook", health_interval=None).start_background()
    try:
        port = _free_port()
        first = bg.dashboard(port=port)
        url = str(first)
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/[A-Za-z0-9_-]{{43}}/", url), url
        assert _status(url) == 200
        servers = started()
        assert len(servers) == 1

        # the cell run again, and a port=0 one: the dashboard running, no second server
        assert bg.dashboard(port=port) is first
        assert bg.dashboard(port=0) is first
        assert str(bg.dashboard(port=port)) == url
        assert started() == servers
        assert _status(url) == 200

        # another port, asked for by its number: a dashboard there too
        other_port = _free_port()
        other = str(bg.dashboard(port=other_port))
        assert other != url and other.startswith(f"http://127.0.0.1:{other_port}/"), other
        assert _status(other) == 200 and _status(url) == 200
        assert len(started()) == 2
    finally:
        bg.stop(timeout=5)
    assert started() == set()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def _web_servers() -> list[int]:
    """The web servers bg.dashboard() started in this process that still run."""
    found = []
    for child in psutil.Process().children():
        try:
            argv = child.cmdline()
            if child.status() != psutil.STATUS_ZOMBIE and argv[1:2] == ["-c"] and "taskwatch.tui.web" in argv[2]:
                found.append(child.pid)
        except (psutil.NoSuchProcess, IndexError):
            pass
    return sorted(found)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
