"""The package installs under one import name and keeps its layers apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_imports_as_taskwatch_from_anywhere_and_engine_never_pulls_textual(tmp_path: Path) -> None:
    ok = run_python(
        "import sys, taskwatch.engine, taskwatch.widgets, taskwatch.tui; "
        "print('textual' in sys.modules)",
        tmp_path,
    )
    assert ok.returncode == 0, ok.stderr
    bare = run_python("import sys, taskwatch.engine; print('textual' in sys.modules)", tmp_path)
    assert bare.stdout.strip() == "False", "taskwatch.engine must not import Textual"
    for name in ("engine", "tui", "widgets"):
        missing = run_python(f"import {name}", tmp_path)
        assert missing.returncode != 0 and "ModuleNotFoundError" in missing.stderr


def test_a_regular_install_ships_only_the_taskwatch_package(tmp_path: Path) -> None:
    target = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(target), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    top = {p.name for p in target.iterdir() if not p.name.endswith((".dist-info", ".egg-info"))}
    assert top - {"bin"} == {"taskwatch"}
    installed = target / "taskwatch"
    for sub in ("engine", "tui", "widgets"):
        assert (installed / sub / "py.typed").exists()
    assert list((installed / "widgets").glob("*.tcss")), "widget styles ship as .tcss files"
    assert (installed / "engine" / "store" / "sqlite.py").exists(), "the run stores ship with the engine"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_dependency_direction_is_tui_to_widgets_to_engine() -> None:
    for path in (ROOT / "engine").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith(("textual", "taskwatch.tui", "taskwatch.widgets")), (path, name)
    for path in (ROOT / "widgets").rglob("*.py"):
        for name in _imports(path):
            assert not name.startswith("taskwatch.tui"), (path, name)
            # the public surface is taskwatch.engine and its event models module
            if name.startswith("taskwatch.engine.") and name != "taskwatch.engine.events":
                raise AssertionError(f"{path} reaches into engine internals ({name}); use taskwatch.engine")


def test_the_readme_quick_example_runs_as_written(tmp_path: Path) -> None:
    # examples/quickstart.py is the README's first engine example; a reader copies it as is
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "succeeded {'stored': 3}" in "\n".join(lines)
    [cancel] = [line for line in lines if line.endswith(" cancelled user")]
    later = cancel.split()[0]
    assert f"succeeded ['{later}']" in lines  # runs(status="cancelled") lists the cancelled run
    readme = (ROOT / "README.md").read_text()
    for line in ('later = await engine.submit("embed_batch"', "await engine.cancel(later.id)", 'runs(status="cancelled"'):
        assert line in readme and line in (ROOT / "examples" / "quickstart.py").read_text()


def test_the_readme_names_every_exported_error_and_event_kind() -> None:
    # the errors table and the bus's list of kinds are what a reader catches and filters by
    import inspect

    import taskwatch.engine as api

    readme = (ROOT / "README.md").read_text()
    errors = [n for n in api.__all__ if inspect.isclass(getattr(api, n)) and issubclass(getattr(api, n), Exception)]
    assert len(errors) > 40
    assert [n for n in errors if f"`{n}`" not in readme] == []
    bus = readme[readme.index("### The debug-event bus") :]
    bus = bus[: bus.index("```")]
    listed = {kind for kind in api.EVENT_KINDS if f"`{kind}`" in bus or f"`{kind.split('.')[0]}.*`" in bus}
    assert sorted(set(api.EVENT_KINDS) - listed) == []


def test_errors_name_the_packages_each_optional_extra_installs() -> None:
    # errors name the packages, not 'taskwatch[extra]', which pip would fetch from PyPI, where
    # the name is another project's
    import tomllib

    from taskwatch.engine.errors import EXTRAS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {name: " ".join(extras[name]) for name in EXTRAS} == EXTRAS
