"""The house rules of docs/architecture.md, checked on the source: each stage imports only the
stages below it, no module imports in a circle, and no import of the relay hides inside a
function (or behind TYPE_CHECKING) to dodge one."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "relay"

# docs/architecture.md, "The pipeline": a package may import packages of a lower layer only
# (and itself). Packages on one layer do not import each other.
LAYERS: dict[str, int] = {
    "core": 0,
    "config": 1,
    "oauth": 1,
    "policy": 2,
    "events": 2,
    "notify": 3,
    "spool": 2,
    "delivery": 2,
    "smtp": 2,
    "limits": 3,
    "scheduler": 4,
    "bounce": 5,
    "intake": 6,
    "ops": 7,
    "runtime": 8,
    "cli": 9,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(tree: ast.Module, modules: dict[str, Path]) -> list[tuple[str, ast.stmt, bool]]:
    """(imported relay module, the statement, whether it sits at module level)."""
    top = set(map(id, tree.body))
    found: list[tuple[str, ast.stmt, bool]] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from relay.delivery import outcome` imports the submodule when there is one
            names = [
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            ]
        for n in names:
            if n == "relay" or n.startswith("relay."):
                found.append((n, node, id(node) in top))
    return found


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    hidden: list[str] = []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        for target, node, at_top in _imports(tree, modules):
            if not at_top:
                hidden.append(f"{path.relative_to(ROOT.parent)}:{node.lineno}: {target}")
            graph[name].add(target)
    return graph, hidden


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def test_every_package_has_a_layer() -> None:
    packages = {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert packages == set(LAYERS), "name the new package's layer here and in docs/architecture.md"
    loose = sorted(p.name for p in ROOT.glob("*.py") if p.name != "__init__.py")
    assert loose == [], "every module belongs to a stage's package"


def test_stages_import_only_lower_stages() -> None:
    graph, _ = _graph()
    upward = []
    for module, targets in graph.items():
        src = _package(module)
        for target in targets:
            dst = _package(target)
            if src is None or dst is None or src == dst:
                continue
            if LAYERS[dst] >= LAYERS[src]:
                upward.append(f"{module} (layer {LAYERS[src]}) imports {target} (layer {LAYERS[dst]})")
    assert upward == []


def test_no_import_circles() -> None:
    graph, _ = _graph()
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                circles.append([*path[path.index(t):], t])
            elif t not in state:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert circles == []


def test_no_relay_import_hides_in_a_function() -> None:
    _, hidden = _graph()
    assert hidden == []


def test_the_cli_imports_no_heavy_library_it_may_not_need() -> None:
    """redis-py (~70 ms), numpy (~60 ms), MSAL and google-auth (~0.1 s) load where they are
    used (a Redis client made, a listener started, a token asked for), so that `relay queue
    summary` and every other command start without them. Measured in a fresh interpreter."""
    probe = (
        "import sys, relay.cli.main; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'redis', 'numpy', 'msal', 'google'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "[]", out
