"""The package's import structure: no cycle between kto_ray's subpackages and top-level modules, and a
config with no storage dependency.

Imports are read from the source with `ast`, every one of them: at module level, inside functions
(lazy imports), under `if TYPE_CHECKING:`. A lazy import still makes the importer depend on the
imported package, so it counts. Each module maps to its node: a subpackage (`kto_ray.data`,
`kto_ray.store`, ...) or a top-level module (`kto_ray.config`, `kto_ray.storage`, ...).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import kto_ray

PACKAGE = Path(kto_ray.__file__).parent
ROOT = "kto_ray"
STORAGE = ("kto_ray.rundir", "kto_ray.storage", "kto_ray.rundir.lease", "pyarrow")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(tree: ast.Module, module: str, is_package: bool) -> list[tuple[str, int]]:
    """Every module name an import in `tree` names (`from a import b` names `a` and `a.b`), with its line."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = module.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            found += [(f"{name}.{alias.name}", node.lineno) for alias in node.names]
    return found


def _node(module: str) -> str | None:
    """The subpackage or top-level module of kto_ray that `module` is (or is in); None outside kto_ray
    and for names that are no module (`from kto_ray import __version__` names the root)."""
    parts = module.split(".")
    if parts[0] != ROOT or len(parts) < 2:
        return None
    if (PACKAGE / parts[1]).is_dir() or (PACKAGE / f"{parts[1]}.py").is_file():
        return f"{ROOT}.{parts[1]}"
    return None


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _edges() -> dict[tuple[str, str], set[str]]:
    """(importer node, imported node) -> where: `module:line` of each import making the edge."""
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for module, tree in _sources().items():
        source = _node(module)
        if source is None:  # kto_ray/__init__.py
            continue
        is_package = (PACKAGE.parent / module.replace(".", "/") / "__init__.py").is_file()
        for name, line in _imported(tree, module, is_package):
            target = _node(name)
            if target is not None and target != source:
                edges[source, target].add(f"{module}:{line}")
    return edges


def _cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each sorted."""
    graph: dict[str, list[str]] = defaultdict(list)
    for a, b in sorted(edges):
        graph[a].append(b)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted({n for edge in edges for n in edge}):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle():
    edges = {("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e")}
    assert _cycles(edges) == [["a", "b", "c"]]
    assert _cycles(edges - {("c", "a")}) == []


def test_every_import_is_counted_lazy_and_relative_ones_too():
    tree = ast.parse(
        "import kto_ray.storage\n"
        "from kto_ray.store import format\n"
        "def f():\n    from kto_ray.training.schedule.batching import Schedule\n"
        "from . import sibling\n"
    )
    names = {name for name, _ in _imported(tree, "kto_ray.data.prepare", is_package=False)}
    assert {"kto_ray.storage", "kto_ray.store.format", "kto_ray.training.schedule.batching"} <= names
    assert "kto_ray.data.sibling" in names
    assert _node("kto_ray.store.format") == "kto_ray.store" and _node("kto_ray.config") == "kto_ray.config"
    assert _node("kto_ray.__version__") is None and _node("numpy") is None


def test_no_import_cycle_between_subpackages_and_top_level_modules():
    edges = _edges()
    assert ("kto_ray.training", "kto_ray.store") in edges  # the graph is really built
    cycles = _cycles(set(edges))
    where = {
        " <-> ".join(cycle): {
            f"{a} -> {b}": sorted(edges[a, b]) for a, b in edges if a in cycle and b in cycle
        }
        for cycle in cycles
    }
    assert not cycles, json.dumps(where, indent=2)


def test_config_imports_no_storage_code():
    # Statically, every import of config's own source, and of what it imports within kto_ray.
    edges = _edges()
    reached, todo = set(), ["kto_ray.config"]
    while todo:
        node = todo.pop()
        reached.add(node)
        todo += [b for a, b in edges if a == node and b not in reached]
    assert not reached & set(STORAGE), sorted(reached)
    for module, tree in _sources().items():
        if _node(module) in reached:
            names = {name for name, _ in _imported(tree, module, is_package=False)}
            assert not [n for n in names if any(n == s or n.startswith(f"{s}.") for s in STORAGE)], module
    # And at run time, in a fresh interpreter: nothing of storage is loaded by importing the config.
    code = "import json, sys, kto_ray.config; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    loaded = json.loads(out.stdout)
    assert "kto_ray.config" in loaded
    assert not [m for m in loaded if any(m == s or m.startswith(f"{s}.") for s in STORAGE)], loaded
