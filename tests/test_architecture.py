"""The package's shape, checked: layers and protected imports (import-linter), no import cycle
even counting function-level imports, short functions, and a new tier that is one module plus
one registry entry."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
from conftest import ROOT

PACKAGE = ROOT / "toybox_backupd"
MAX_FUNCTION_LINES = 50


def test_import_contracts_hold() -> None:
    """Layers basics → … → cli; docker only in docker_api, sqlite3 only in the store, psycopg only
    in database; the tiers never import the registry or the runner."""
    command = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))
    result = subprocess.run([command], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout and "BROKEN" not in result.stdout, result.stdout


def test_every_module_has_a_layer() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [layers] = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {part.strip() for layer in layers for part in layer.replace(":", "|").split("|")}
    graph = grimp.build_graph("toybox_backupd")
    top = {".".join(module.split(".")[:2]) for module in graph.modules} - {"toybox_backupd"}
    assert top - named == set(), f"modules in no layer of pyproject.toml: {sorted(top - named)}"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in edges.get(node, ()):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle_anywhere() -> None:
    """Module to module (function-level imports included; a package's own __init__ aside)."""
    graph = grimp.build_graph("toybox_backupd")
    edges = {module: {other for other in graph.find_modules_directly_imported_by(module)
                      if not module.startswith(other + ".")}
             for module in graph.modules}
    assert _cycles(edges) == []
    # the checker itself finds a planted cycle
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def _long_functions(root: Path, limit: int) -> list[str]:
    long = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > limit:
                    long.append(f"{path.relative_to(root.parent)}:{node.lineno} {node.name} "
                                f"({lines} lines)")
    return long


def test_functions_are_short() -> None:
    assert _long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_no_print_outside_the_cli() -> None:
    printing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "print" and not _is_main_guard(path, node)):
                printing.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert printing == []


def _is_main_guard(path: Path, call: ast.Call) -> bool:
    """`if __name__ == "__main__": print(...)` (settings.py prints the docs' settings table)."""
    source = path.read_text().splitlines()
    return any(line.startswith('if __name__ == "__main__":')
               for line in source[max(0, call.lineno - 3):call.lineno])


def test_the_root_holds_the_entry_points_only() -> None:
    """One package per layer: at the package's root only the console script and the CLI."""
    modules = {path.name for path in PACKAGE.glob("*.py")} - {"__init__.py"}
    assert modules == {"launcher.py", "cli.py"}, sorted(modules)
    layers = {path.name for path in PACKAGE.iterdir() if (path / "__init__.py").is_file()}
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    [contract] = [c["layers"] for c in config["contracts"] if c["type"] == "layers"]
    named = {part.strip().removeprefix("toybox_backupd.") for layer in contract
             for part in layer.split("|")}
    assert layers <= named, f"packages in no layer: {sorted(layers - named)}"
    assert all("." not in name for name in named), f"the layers name modules: {sorted(named)}"
