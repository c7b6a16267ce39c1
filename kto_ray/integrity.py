"""What was written is what is read: files listed with their size and CRC-32, checked where they are read.

A manifest entry (`FileEntry`) is a path relative to its folder (a store, a checkpoint, `final/`), the
file's size and the CRC-32 of its bytes (zlib's: ~4 GB/s on one core here, ten times sha256; it
finds damage, not tampering). Readers check what costs them nothing extra: a file is there and has its
size (one LIST or the size an open returns anyway); the checksum of a whole file is recomputed where the
whole file is read anyway (a checkpoint restore, `final/` loaded by evaluate) and by `kto-ray verify`.
Parquet files also carry page checksums that pyarrow verifies as it decodes (store/format.py).
"""

from __future__ import annotations

import json
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pyarrow.fs as pafs
from pydantic import BaseModel

from kto_ray.errors import UserError
from kto_ray.storage import Location, first_line, is_uri, read_text, resolve


class FileEntry(BaseModel):
    path: str  # relative to the folder the manifest describes, '/'-separated
    size: int
    crc32: str  # 8 hex digits


@dataclass(frozen=True)
class Problem:
    """One file that is not as its manifest says: `what` is the one-line reason."""

    path: str  # relative to the folder checked
    what: str

    def __str__(self) -> str:
        return f"{self.path}: {self.what}"


def crc32_hex(value: int) -> str:
    return f"{value & 0xFFFFFFFF:08x}"


def entry_of(location: Location, relative: str) -> FileEntry:
    """The entry of `<location>/<relative>`, read through its file system (local or object storage) in
    8 MiB chunks."""
    crc, size = 0, 0
    with location.fs.open_input_stream(location.join(relative).path) as stream:
        while chunk := stream.read(8 << 20):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return FileEntry(path=relative, size=size, crc32=crc32_hex(crc))


def sizes_under(location: Location) -> dict[str, int]:
    """Every file below `location` (one recursive LIST on object storage): relative path -> size."""
    selector = pafs.FileSelector(location.path, recursive=True, allow_not_found=True)
    start = len(location.path.rstrip("/")) + 1
    return {
        f.path[start:]: f.size for f in location.fs.get_file_info(selector) if f.type == pafs.FileType.File
    }


def entry_size_problem(entry: FileEntry, size: int | None) -> Problem | None:
    if size is None:
        return Problem(entry.path, f"missing (expected {entry.size} bytes)")
    if size != entry.size:
        return Problem(entry.path, f"size {size}, expected {entry.size}")
    return None


def check_sizes(entries: Iterable[FileEntry], sizes: dict[str, int]) -> list[Problem]:
    """Each entry against the sizes found (`sizes_under`): missing or another size."""
    return [p for e in entries if (p := entry_size_problem(e, sizes.get(e.path))) is not None]


def check_entry(location: Location, entry: FileEntry) -> Problem | None:
    """One file read whole: missing, another size or another checksum."""
    try:
        found = entry_of(location, entry.path)
    except FileNotFoundError:
        return entry_size_problem(entry, None)
    except OSError as err:
        return Problem(entry.path, f"unreadable ({first_line(err)})")
    if found.size != entry.size:
        return entry_size_problem(entry, found.size)
    if found.crc32 != entry.crc32:
        return Problem(entry.path, f"checksum {found.crc32}, expected {entry.crc32} (same size)")
    return None


# A folder's file lists: a checkpoint's (one per rank) and an exported model folder's (`final/`,
# `merged/`: one, as rank 0 of a world of 1).
LIST_PREFIX = "files_rank"
LIST_VERSION = 1
_LIST = re.compile(r"^files_rank(\d+)\.json$")


def list_name(rank: int) -> str:
    return f"{LIST_PREFIX}{rank}.json"


def write_file_list(folder: Path, step: int, rank: int, world: int) -> None:
    """Rank `rank`'s list of the files in its local checkpoint folder (every file but the lists)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    entries = [entry_of(resolve(folder), name) for name in names if not _LIST.match(name)]
    text = {
        "version": LIST_VERSION,
        "step": step,
        "rank": rank,
        "world_size": world,
        "files": [e.model_dump() for e in entries],
    }
    (folder / list_name(rank)).write_text(json.dumps(text, indent=1))


@dataclass(frozen=True)
class FileLists:
    """The lists found in one checkpoint folder, or the problem that makes it incomplete."""

    lists: dict[int, list[FileEntry]]  # rank -> its files
    world_size: int
    problem: Problem | None = None

    def entries(self) -> list[FileEntry]:
        return [e for rank in sorted(self.lists) for e in self.lists[rank]]


def _parse(location: Location, rank: int) -> tuple[int, list[FileEntry]] | Problem:
    name = list_name(rank)
    text = read_text(location.join(name))
    if text is None:
        return Problem(name, "missing: the checkpoint is incomplete")
    try:
        found = json.loads(text)
        return int(found["world_size"]), [FileEntry(**e) for e in found["files"]]
    except (ValueError, KeyError, TypeError):
        return Problem(name, "unreadable file list")


def lists_at(location: Location) -> FileLists:
    """The file lists of a checkpoint (or an exported model folder) at `location`."""
    first = _parse(location, 0)
    if isinstance(first, Problem):
        return FileLists({}, 0, first)
    world, files = first
    lists = {0: files}
    for rank in range(1, world):
        found = _parse(location, rank)
        if isinstance(found, Problem):
            return FileLists(lists, world, found)
        lists[rank] = found[1]
    return FileLists(lists, world)


def size_problem(location: Location) -> Problem | None:
    """The first problem of a checkpoint at `location` found without reading its files: a missing
    list, a missing file or another size (one LIST of the folder)."""
    lists = lists_at(location)
    return lists.problem or next(iter(check_sizes(lists.entries(), sizes_under(location))), None)


def check_model_folder(path: str) -> None:
    """A model folder a run exported (`final/`, `merged/`: it has a file list) read whole against its
    list before it is loaded: a damaged file is a UserError naming it. Other folders (a hub id, a
    model of your own) have no list and are loaded as they are."""
    if not is_uri(path) and not Path(path).expanduser().is_dir():
        return  # a hub id
    location = resolve(path)
    if read_text(location.join(list_name(0))) is None:
        return
    lists = lists_at(location)
    problem = lists.problem or next((p for e in lists.entries() if (p := check_entry(location, e))), None)
    if problem is not None:
        raise UserError(
            f"model folder {location}: file {problem.path} is damaged ({problem.what}); "
            f"`kto-ray verify {location}` lists every problem"
        )


def model_folder_problems(location: Location) -> list[Problem]:
    """A run's exported model folder checked by a LIST (sizes, no read): what `kto-ray report` says."""
    if read_text(location.join(list_name(0))) is None:
        return []
    problem = size_problem(location)
    return [problem] if problem is not None else []
