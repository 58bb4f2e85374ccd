"""The engine's modules import only downward, layer by layer.

Models and events at the bottom; the bus; stores and leases; the loops that
execute and schedule; the engine as composition root; the edges (control
server, wire, remote client, background thread, displays) on top. A module
may import its own layer and the ones below, never one above: checked here on
every module-level import (imports under ``TYPE_CHECKING`` are for type hints
only and are not counted; an import inside a function is how the engine's
convenience facades -- ``start_background()``, ``serve()``, notebook reprs --
reach the edge layer on demand, and is allowed only for those).
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"

LAYERS: list[set[str]] = [
    {"version", "errors", "jsonsafe", "hop", "runs", "events", "options", "tasks", "nodeid", "trusted", "urls",
     "logs"},
    {"bus"},
    {"store", "lease", "postgres_lease", "redis_lease"},
    {"executor", "execution", "index", "context", "handle", "scheduler", "queues", "triggers", "supervisor", "health",
     "wakeups", "relay",
     "redis_events", "postgres_events", "memory_events"},
    {"engine", "snapshot", "observer"},
    {"server", "wire", "operations", "remote", "background", "display", "__init__"},
]

#: the facades on Engine and its records that open an edge-layer module when called
LAZY_UPWARD = {
    ("engine", "background"),
    ("engine", "server"),
    ("engine", "display"),
    ("runs", "display"),
}


def layer_of(module: str) -> int:
    top = module.split(".")[0]
    for index, members in enumerate(LAYERS):
        if top in members:
            return index
    raise AssertionError(f"engine module {module!r} is in no layer; add it to LAYERS in {__file__}")


def engine_modules() -> dict[str, Path]:
    modules = {}
    for path in ENGINE.rglob("*.py"):
        rel = path.relative_to(ENGINE).with_suffix("")
        parts = list(rel.parts)
        modules[".".join(parts)] = path
    return modules


def imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """(imported engine module, at module level?) for every relative import in ``path``."""
    tree = ast.parse(path.read_text())
    package = module.split(".")[:-1]
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.level > 0:
                base = package[: len(package) - (child.level - 1)] if child.level > 1 else package
                target = ".".join([*base, child.module]) if child.module else ".".join(base)
                if not target:  # "from . import x"
                    found.extend((alias.name, top_level) for alias in child.names)
                else:
                    found.append((target, top_level))
            inner = top_level and not isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            visit(child, inner)

    visit(tree, True)
    return found


def test_every_engine_module_imports_only_its_layer_and_below() -> None:
    wrong: list[str] = []
    for module, path in engine_modules().items():
        mine = layer_of(module)
        for target, top_level in imports(path, module):
            theirs = layer_of(target)
            if theirs <= mine:
                continue
            if not top_level and (module.split(".")[0], target.split(".")[0]) in LAZY_UPWARD:
                continue
            wrong.append(f"{module} (layer {mine}) imports {target} (layer {theirs})")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_an_upward_import(tmp_path: Path) -> None:
    # the check itself must be able to fail: a bus that imported the engine would be caught
    fake = tmp_path / "bus.py"
    fake.write_text("from .engine import Engine\n")
    assert imports(fake, "bus") == [("engine", True)]
    assert layer_of("engine") > layer_of("bus")
