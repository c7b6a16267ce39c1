"""`kto-ray verify PATH`: every file of a reference store, a run dir (each checkpoint and `final/`) or a
sweep folder (each run dir and store in it) read whole and checked against its manifest: size and
CRC-32 (integrity.py). One line per problem, then a summary; problems exit 2 (`VerifyFailed`).

The fsck to run after an incident (a crash, a full disk, storage trouble) or before a long job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyarrow.fs import FileType

from kto_ray.errors import UserError
from kto_ray.integrity import Problem, check_entry, list_name, lists_at
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.storage import Location, children, first_line, info, resolve
from kto_ray.store.format import MANIFEST, READABLE_FORMATS, read_manifest

# The model folders a run dir may hold, each with its file list (rundir.RunDir.publish).
MODEL_FOLDERS = ("final", "merged")


class VerifyFailed(UserError):
    """`kto-ray verify` found problems (listed before this line)."""


@dataclass
class Report:
    checked: list[str] = field(default_factory=list)  # what was verified: "reference store X", ...
    files: int = 0
    size: int = 0
    problems: list[str] = field(default_factory=list)  # one line each: "<location>/<file>: <what>"

    def summary(self, where: str) -> str:
        what = (
            ", ".join(self.checked) if len(self.checked) <= 3 else f"{len(self.checked)} stores and folders"
        )
        counted = f"{self.files} files ({self.size / 2**20:,.1f} MiB)"
        if not self.problems:
            return f"verified {what}: {counted}, no problems"
        return f"verify {where}: {len(self.problems)} problem{'s' * (len(self.problems) != 1)} in {counted}"


def verify(path: str, say: Callable[[str], None] = print) -> Report:
    """Verify what is at `path`; each problem is said as it is found. Raises VerifyFailed when any."""
    location = resolve(path)
    report = Report()
    try:
        kind = _kind(location)
        if kind is None:
            raise UserError(
                f"nothing to verify at {location}: not a reference store, run dir or sweep folder"
            )
        for name, problem in _verify(location, kind, report):
            line = f"{name}: {problem}"
            report.problems.append(line)
            say(line)
    except OSError as err:
        raise UserError(f"cannot verify {location}: {first_line(err)}") from None
    if report.problems:
        raise VerifyFailed(report.summary(str(location)))
    return report


def _kind(location: Location) -> str | None:
    if info(location).type != FileType.Directory:
        return None
    if info(location.join(MANIFEST)).type == FileType.File:
        return "store"
    names = {e.base_name for e in children(location)}
    if list_name(0) in names:  # one checkpoint, or an exported model folder
        return "folder"
    if names & {CHECKPOINTS, *MODEL_FOLDERS, "config.yaml"}:
        return "run"
    if any(_kind(Location(location.fs, e.path, location.given)) for e in children(location)):
        return "sweep"
    return None


def _verify(location: Location, kind: str, report: Report) -> Iterator[tuple[str, Problem]]:
    if kind == "store":
        yield from _store(location, report)
    elif kind == "run":
        yield from _run(location, report)
    elif kind == "folder":
        report.checked.append(f"folder {location}")
        yield from _folder(location, str(location), report)
    else:
        for entry in children(location):
            child = Location(location.fs, entry.path, f"{str(location).rstrip('/')}/{entry.base_name}")
            inner = _kind(child)
            if inner in ("store", "run"):
                yield from _verify(child, inner, report)


def _store(location: Location, report: Report) -> Iterator[tuple[str, Problem]]:
    report.checked.append(f"reference store {location}")
    manifest = read_manifest(location.given)
    if manifest.format_version not in READABLE_FORMATS:
        yield str(location), Problem(MANIFEST, f"store format {manifest.format_version}: files not listed")
        return
    for entry in manifest.files:
        report.files, report.size = report.files + 1, report.size + entry.size
        problem = check_entry(location, entry)
        if problem is not None:
            yield str(location), problem


def _folder(location: Location, shown: str, report: Report) -> Iterator[tuple[str, Problem]]:
    lists = lists_at(location)
    if lists.problem is not None:
        yield shown, lists.problem
        return
    report.files += len(lists.lists)  # the lists themselves
    for entry in lists.entries():
        report.files, report.size = report.files + 1, report.size + entry.size
        problem = check_entry(location, entry)
        if problem is not None:
            yield shown, problem


def _run(location: Location, report: Report) -> Iterator[tuple[str, Problem]]:
    report.checked.append(f"run dir {location}")
    for name in RunDir(location.given).checkpoint_names():
        yield from _folder(location.join(CHECKPOINTS, name), f"{location}/{CHECKPOINTS}/{name}", report)
    for name in MODEL_FOLDERS:
        folder = location.join(name)
        if info(folder).type == FileType.Directory:
            yield from _folder(folder, f"{location}/{name}", report)
