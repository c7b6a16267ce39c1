"""The docs stay true to the repository: the generated references equal what the code gives today, and
every relative link and every repository path the Markdown names exists.

Which spans count as repository paths (in `code`, outside fenced blocks), and which do not:
- checked: a span with a `/` whose first part is a file or folder at the repository root (`kto_ray/...`,
  `tests/...`, `configs/...`, `docs/...`), and any span with a `/` ending in `.py` (so a partial path
  such as `training/x.py` fails: name modules by their full path); a bare file name ending in `.py`,
  `.yaml` or `.md` must be the name of some file in the repository (a test named without its folder);
- skipped: URIs (`s3://`, `https://`), placeholders and globs (`<run>/final`, `jobs/*.py`), absolute and
  home paths, command lines (spaces), `path::test` keeps only its path, run-time folders (RUNTIME_ROOTS)
  and the files a run writes (RUNTIME_FILES), whose names are examples, not repository files.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from scripts import reference_docs as docs

REPO = Path(__file__).resolve().parents[1]
# What commands create at run time, under the repository root or a run dir; never in a clean clone.
RUNTIME_ROOTS = {"runs", "stores", "artifacts", ".venv"}
RUNTIME_FILES = {"config.yaml", "summary.md", "samples.md"}
# Folders the basename search leaves out: run-time output and tools' caches.
_NOT_SOURCE = RUNTIME_ROOTS | {".git", ".pytest_cache", ".ruff_cache", "__pycache__", "node_modules"}
_SUFFIXES = (".py", ".yaml", ".md")


def markdown_files() -> list[Path]:
    top = [REPO / name for name in ("README.md", "DESIGN.md", "CHANGELOG.md", "BENCHMARKS.md")]
    return [p for p in top if p.is_file()] + sorted((REPO / "docs").rglob("*.md"))


def _repo_file_names() -> set[str]:
    names = set()
    for path in REPO.rglob("*"):
        if path.is_file() and not _NOT_SOURCE & set(path.relative_to(REPO).parts):
            names.add(path.name)
    return names


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def _links(text: str) -> list[str]:
    return re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _without_fences(text))


def _spans(text: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", _without_fences(text))


def repo_path(span: str) -> str | None:
    """The repository path a code span names, or None when it names none (see the module's rules)."""
    span = span.split("::")[0]
    if not span or re.search(r"[\s<>*?{}$=:@,()'\"\[\]|]", span) or span[0] in "/~-":
        return None
    if "/" in span:
        top = span.split("/")[0]
        if top in RUNTIME_ROOTS or top in ("", ".", ".."):
            return None
        if (REPO / top).exists() or span.endswith(".py"):
            return span
        return None
    if span.endswith(_SUFFIXES) and span not in RUNTIME_FILES:
        return span
    return None


def missing_paths(doc: Path, names: set[str]) -> list[str]:
    text = doc.read_text()
    missing = []
    for link in _links(text):
        if "://" in link or link.startswith(("#", "mailto:")):
            continue
        target = link.split("#")[0]
        if target and not (doc.parent / target).exists():
            missing.append(f"link ({link})")
    for span in _spans(text):
        path = repo_path(span)
        if path is None:
            continue
        found = (REPO / path).exists() if "/" in path else path in names
        if not found:
            missing.append(f"`{span}`")
    return sorted(set(missing))


def test_the_generated_references_are_what_the_code_says():
    stale = [str(path) for path, text in docs.generated().items() if (REPO / path).read_text() != text]
    assert not stale, (
        f"{', '.join(stale)} differ from the code: run `{docs.REGENERATE}` and commit the result"
    )


def test_every_link_and_repository_path_in_the_markdown_exists():
    names = _repo_file_names()
    problems = {str(doc.relative_to(REPO)): missing_paths(doc, names) for doc in markdown_files()}
    problems = {doc: missing for doc, missing in problems.items() if missing}
    assert not problems, "Markdown names paths that do not exist: " + "; ".join(
        f"{doc}: {', '.join(missing)}" for doc, missing in problems.items()
    )


@pytest.mark.parametrize(
    ("span", "expected"),
    [
        ("kto_ray/objective.py", "kto_ray/objective.py"),
        ("tests/test_docs.py::test_x", "tests/test_docs.py"),
        ("training/x.py", "training/x.py"),
        ("test_docs.py", "test_docs.py"),
        ("configs/", "configs/"),
        ("s3://bucket/runs", None),
        ("<run dir>/final", None),
        ("jobs/*.py", None),
        ("runs/demo-sweep", None),
        ("final/", None),
        ("metrics/000001.jsonl", None),
        ("config.yaml", None),
        ("kto-ray train --config x.yaml", None),
        (".ci/run", ".ci/run"),
        ("/mnt/shared/runs", None),
    ],
)
def test_what_counts_as_a_repository_path(span, expected):
    assert repo_path(span) == expected


def test_the_readme_keeps_the_test_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    for command in ("make test", "make test-extended", "make test-gpu"):
        assert f"`{command}`" in readme or f"    {command}" in readme, command
