"""No private name of a library outside kto_ray/internals/: an attribute or import whose name starts
with `_` on anything but our own objects, getattr of such a name, an assignment into sys.modules, or
one of the internals that cannot be told by their shape (BY_NAME)."""

from __future__ import annotations

import ast
from pathlib import Path

import kto_ray

PACKAGE = Path(kto_ray.__file__).parent
INTERNALS = PACKAGE / "internals"
# Internals whose names look public: a method DeepSpeed's engine calls for itself, its converter's CLI
# entry point, Ray's private snapshot file and its callback variable.
BY_NAME = (
    "clear_backward_seen_flag",
    "ds_to_universal",
    "checkpoint_manager_snapshot",
    "RAY_TRAIN_CALLBACKS",
)
OWN = ("self", "cls")
ATTRIBUTE_CALLS = ("getattr", "setattr", "hasattr")


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _imported_names(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if (node.module or "").startswith("kto_ray") or node.module == "__future__":
        return []
    return [node.module or "", *(alias.name for alias in node.names)]


def _found_in(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):
        own = isinstance(node.value, ast.Name) and node.value.id in OWN
        return not own and (_private(node.attr) or node.attr == "__compatible_ops__")
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return any(_private(part) for name in _imported_names(node) for part in name.split("."))
    if (
        isinstance(node, ast.Call)
        and getattr(node.func, "id", None) in ATTRIBUTE_CALLS
        and len(node.args) > 1
    ):
        name = node.args[1]
        return isinstance(name, ast.Constant) and _private(str(name.value))
    if isinstance(node, ast.Subscript):
        return ast.unparse(node.value) == "sys.modules" and isinstance(node.ctx, ast.Store)
    return False


def _without_docstrings(tree: ast.Module) -> str:
    """The code as ast writes it back: no comments, and docstrings emptied (they may name an internal
    to say why it is avoided)."""
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        first = body[0] if isinstance(body, list) and body else None
        if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
            first.value.value = ""
    return ast.unparse(tree)


def hits(path: Path, root: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    where = path.relative_to(root)
    found = [f"{where}:{node.lineno}: {ast.unparse(node)}" for node in ast.walk(tree) if _found_in(node)]
    code = _without_docstrings(tree)
    return found + [f"{where}: {name}" for name in BY_NAME if name in code]


def test_no_private_library_name_outside_the_internals_modules():
    paths = [path for path in sorted(PACKAGE.rglob("*.py")) if INTERNALS not in path.parents]
    found = [hit for path in paths for hit in hits(path, PACKAGE.parent)]
    assert found == [], "private names of a library belong in kto_ray/internals/:\n" + "\n".join(found)


def test_the_rule_finds_each_kind(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text(
        '"""Docstrings may say clear_backward_seen_flag."""\n'
        "import ray._private.state\n"
        "from ray.train.v2._internal import constants\n"
        "from kto_ray._own import thing\n"
        "x = engine._config\n"
        "y = self._mine\n"
        "z = getattr(model, '_supports_sdpa', True)\n"
        "sys.modules['mlflow'] = None\n"
        "opt.clear_backward_seen_flag()  # a comment: ds_to_universal\n"
    )
    found = hits(sample, tmp_path)
    assert [hit.split(": ", 1)[1] for hit in found] == [
        "import ray._private.state",
        "from ray.train.v2._internal import constants",
        "engine._config",
        "getattr(model, '_supports_sdpa', True)",
        "sys.modules['mlflow']",
        "clear_backward_seen_flag",
    ]
