"""A run dir in a local folder or under an object-storage URI (s3://, gs://), through kto_ray.storage.

Small files (`config.yaml`, `workers.json`) are replaced whole, so a reader never sees part of one;
model folders (`final/`, `merged/`) are uploaded with `config.json` or `adapter_config.json` last, so
a folder that loads is complete. Readers on another machine fetch what they need into a local cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from kto_ray.integrity import write_file_list
from kto_ray.storage import (
    Location,
    cache_dir,
    children,
    display,
    info,
    is_uri,
    read_text,
    remove_tree,
    resolve,
    write_text_atomically,
)

if TYPE_CHECKING:  # only for the type: the config itself knows nothing of storage
    from kto_ray.config import KTOConfig

CHECKPOINTS = "checkpoints"
WORKERS_FILE = "workers.json"  # each worker group's start step, size and ranks (rundir/worker_groups.py)
# Written last when a model folder is uploaded: transformers and peft cannot load a folder without them.
LAST_FILES = ("config.json", "adapter_config.json")


class RunDir:
    """One run's folder: `run.dir/run.name`, local or a URI."""

    def __init__(self, location: str | Path):
        self.given = str(location)
        self.location: Location = resolve(location)

    @classmethod
    def of(cls, cfg: KTOConfig) -> RunDir:
        """The run dir a config names: `run.dir/run.name`."""
        return cls(f"{cfg.run.dir.rstrip('/')}/{cfg.run.name}")

    def __str__(self) -> str:
        return display(self.given) if self.is_remote else self.location.path

    @property
    def is_remote(self) -> bool:
        return is_uri(self.given) and not self.location.is_local

    @property
    def local_path(self) -> Path:
        """The folder on this machine; only for local run dirs."""
        if self.is_remote:
            raise ValueError(f"{self} is not a local folder")
        return Path(self.location.path)

    @property
    def folder(self) -> Path | None:
        """The folder on this machine, or None for a run dir on object storage."""
        return None if self.is_remote else Path(self.location.path)

    @property
    def name(self) -> str:
        """The last part of its path: the run's (or the sweep's) name."""
        return self.location.path.rstrip("/").rsplit("/", 1)[-1]

    def report_dir(self) -> Path:
        """Where a report goes: <run dir>/report locally; ./<name>-report (to look at here) for a run
        dir on object storage."""
        return self.folder / "report" if self.folder else Path(f"{self.name}-report").absolute()

    def child(self, *parts: str) -> str:
        """A file or folder inside the run dir, as a string a user can read (URI or local path)."""
        return "/".join([str(self).rstrip("/"), *parts])

    def join(self, *parts: str) -> Location:
        return self.location.join(*parts)

    def exists(self, *parts: str) -> bool:
        return info(self.join(*parts) if parts else self.location).type != pafs.FileType.NotFound

    def read_text(self, name: str) -> str | None:
        return read_text(self.join(name))

    def write_text(self, name: str, text: str) -> None:
        """Replace a small file whole (an atomic rename locally, one PUT on object storage)."""
        write_text_atomically(self.join(name), text)

    def checkpoint_names(self) -> list[str]:
        """Ray Train's checkpoint folders (`step_<n>`), oldest first."""
        return sorted(
            e.base_name
            for e in children(self.join(CHECKPOINTS))
            if e.type == pafs.FileType.Directory and e.base_name.startswith("step_")
        )

    def ray_storage(self) -> dict:
        """Ray Train's RunConfig storage arguments; on object storage our configured file system, so an
        S3 endpoint set in the environment is used for checkpoints too."""
        remote = {"storage_filesystem": self.location.fs} if self.is_remote else {}
        return {"storage_path": self.location.path, **remote}

    def publish(self, staged: Path, name: str) -> None:
        """Put the local folder `staged` at `<run dir>/<name>`, replacing what was there: locally a
        rename, on object storage an upload with LAST_FILES last. It first gets its file list
        (`files_rank0.json`, a checkpoint's format), which `evaluate`, `report` and `verify` check."""
        write_file_list(staged, 0, 0, 1)
        target = self.join(name)
        if not self.is_remote:
            if Path(target.path).exists():
                shutil.rmtree(target.path)
            Path(target.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(staged), target.path)
            return
        remove_tree(target)
        files = sorted((p for p in staged.rglob("*") if p.is_file()), key=lambda p: p.name in LAST_FILES)
        for file in files:
            relative = file.relative_to(staged).as_posix()
            with file.open("rb") as src, target.fs.open_output_stream(target.join(relative).path) as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A local folder to write `<name>` into, published when the block ends without an error."""
        base = self.folder  # the run dir (publishing is a rename on one file system), or the temp folder
        if base is not None:
            base.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=base))
        try:
            yield tmp
            self.publish(tmp, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def fetch_folder(uri: str) -> Path:
    """A local copy of a model folder at a URI (cached by URI and the files' sizes). Copies go to a
    temporary folder renamed into place, so processes that fetch the same folder at once each see a
    complete copy."""
    location = resolve(uri)
    if location.is_local:
        return Path(location.path)
    found = location.fs.get_file_info(pafs.FileSelector(location.path, recursive=True, allow_not_found=True))
    files = sorted((f.path, f.size) for f in found if f.type == pafs.FileType.File)
    key = hashlib.sha256(repr((display(uri), files)).encode()).hexdigest()[:16]
    target = cache_dir() / "folders" / key
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{key}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        for path, _ in files:
            out = tmp / path[len(location.path) + 1 :]
            out.parent.mkdir(parents=True, exist_ok=True)
            with location.fs.open_input_stream(path) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, length=8 << 20)
        with contextlib.suppress(OSError):  # another process finished first: its copy is the same
            tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
