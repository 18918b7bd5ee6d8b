"""The package's shape: the folders are the pipeline's stages, and each imports only the stages
below it (server/__init__.py draws the picture). Read from the source, so a new import that points
up the pipeline, or a cycle, fails here rather than in review."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from testing.live_server import ROOT

SERVER = ROOT / "server"

# What each part of server/ may import besides itself. The entry points (app, cli, __main__,
# serve_ray) assemble everything and may import anything.
ALLOWED = {
    "config": set(),
    "numerics": set(),
    "text": set(),
    "models": {"backends", "config"},  # a Hub repo's files: each backend kind says which are its
    "backends": {"config", "numerics", "text"},
    "engine": {"backends", "numerics", "text"},
    "http": {"config"},
    "serving": {"engine", "http", "numerics", "text"},  # handed a ServerState, typed under TYPE_CHECKING only
    "observability": {"backends", "config", "engine", "http", "models", "numerics"},  # beside the pipeline
    "state": {"backends", "config", "engine", "models", "observability"},
    "api": {"engine", "http", "serving", "state"},
    "scale": {"config"},  # Ray Serve's routing, splitting and forwarding (serve_ray assembles them)
}
ENTRY_POINTS = {"app", "cli", "__main__", "serve_ray", "settings_reference", "__init__"}
LARGEST_CLASS = 150  # lines


def _part(module: str) -> str:
    """server.engine.loop -> engine; server.state -> state."""
    return module.split(".")[1] if module.count(".") >= 1 else "__init__"


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.Module) -> list[str]:
    """Modules of `server` imported anywhere in the file, except under `if TYPE_CHECKING:`."""
    skip = {
        id(n)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
        for n in ast.walk(node)
    }
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom) and node.level:
            found.append(f"relative import (level {node.level}) of {node.module}")  # none allowed: see below
        elif isinstance(node, ast.ImportFrom) and node.module == "server":
            found += [f"server.{alias.name}" for alias in node.names]  # from server import engine
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("server."):
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("server")]
    return found


def _graph() -> dict[str, list[str]]:
    return {_module_name(p): _imports(ast.parse(p.read_text())) for p in sorted(SERVER.rglob("*.py"))}


def test_every_import_points_down_the_pipeline():
    wrong = []
    for module, imported in _graph().items():
        part = _part(module)
        if part in ENTRY_POINTS and module.count(".") <= 1:
            continue
        for target in imported:
            if target.startswith("relative import"):
                wrong.append(f"{module}: {target}; import server.… absolutely")
                continue
            if target == "server" or _part(target) == part:
                continue
            if _part(target) not in ALLOWED[part]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_in_a_cycle():
    graph = _graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in graph.get(module, []):
            if state.get(target) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path[path.index(target) :], target]))
            if target in graph and state.get(target) is None:
                visit(target, [*path, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_class_is_over_150_lines():
    long = [
        f"{path.relative_to(ROOT)}: {node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for path in SERVER.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > LARGEST_CLASS
    ]
    assert not long, "\n".join(long)


def test_bench_and_testing_import_nothing_from_tests():
    offenders = [
        f"{path.relative_to(ROOT)}: {module}"
        for folder in ("bench", "testing")
        for path in (ROOT / folder).rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom)
        for module in [node.module or ""]
        if module == "tests" or module.startswith("tests.")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_package_map_draws_the_import_rule():
    """server/__init__.py's picture lists the parts top to bottom; each may import only parts drawn
    below it (ALLOWED above), so the picture and this test say the same."""
    import server

    order = []
    for line in (server.__doc__ or "").splitlines():
        for name in re.findall(r"([a-z_]+)(?:\.py|/)", line.strip().split("  ")[0] if line.startswith("    ") else ""):
            if name in ALLOWED and name not in order:
                order.append(name)
    assert set(order) == set(ALLOWED), f"parts missing from the map: {set(ALLOWED) - set(order)}"
    pipeline = [part for part in order if part != "scale"]  # drawn last, "beside it all": Ray's parts
    above = [(p, t) for p in pipeline for t in ALLOWED[p] if pipeline.index(t) < pipeline.index(p)]
    assert not above, f"drawn above what imports them: {above}"
