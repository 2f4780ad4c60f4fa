"""The package's floors: each imports only floors below it, and no module imports itself in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import lora_fx

ROOT = Path(lora_fx.__file__).parent
# Lowest first. errors, patterns and config are the ground; lora_fx/__init__, demo and __main__
# sit on top.
FLOORS = (
    "errors",
    "patterns",
    "config",
    "core",
    "math",
    "sites",
    "capture",
    "passes",
    "generation",
    "exporters",
    "cli",
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts).removesuffix(".__init__")


def _is_module(name: str) -> bool:
    path = ROOT.parent / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """lora_fx modules `path` imports at run time (anywhere in the file; not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lora_fx"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if _is_module(full) else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lora_fx")}
    return found


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in sorted(ROOT.rglob("*.py"))}


def _floor(module: str) -> int | None:
    parts = module.split(".")
    return FLOORS.index(parts[1]) if len(parts) > 1 and parts[1] in FLOORS else None


def test_every_floor_imports_only_floors_below_it():
    upward = []
    for module, deps in _graph().items():
        mine = _floor(module)
        for dep in deps:
            theirs = _floor(dep)
            if mine is not None and theirs is not None and theirs > max(mine, 1):
                upward.append(f"{module} -> {dep}")
    assert not upward


def test_no_import_circle():
    graph = _graph()
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    # a package's __init__ importing its own modules is how packages re-export: not a circle
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in edges.items()}
    circles = []
    for start in edges:
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in edges[node]:
                if nxt == start:
                    circles.append(" -> ".join([*path, start]))
                elif nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))
    assert not circles
