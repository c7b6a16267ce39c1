"""Writing a reference store (the layout is kto_ray/store/format.py's)."""

from __future__ import annotations

import contextlib
import time
import uuid
from pathlib import Path
from typing import Any

from pyarrow.fs import FileType

from kto_ray.errors import StorageError, UserError
from kto_ray.rundir.lease import Lease, LeaseHeld
from kto_ray.storage import (
    Location,
    children,
    first_line,
    info,
    read_text,
    remove_tree,
    resolve,
    write_text_atomically,
)
from kto_ray.store.format import DATA_PREFIX, MANIFEST, Manifest, StoredFile, list_files

_UNSEEN: Any = object()  # StoreWriter without `seen`


class StoreWriter:
    """Context manager that commits a store without renames, the same way on local disk and on object
    storage: the Parquet files go under a fresh prefix `data-<id>/`, then `manifest.json`, naming that
    prefix, replaces the previous one in one atomic write. Readers only ever follow the manifest, so
    a killed or failed run leaves the previous store readable. After a commit, prefixes no manifest
    names and older than this writer are removed; an uncommitted writer removes its own.

    One writer at a time: the store's lease is held from `__enter__` to `__exit__`. `seen` is the
    manifest the caller decided on (None: there was none), so `changed_meanwhile` reports a commit made
    between that look and this writer's start too; without it, the one found at `__enter__` is the
    baseline.
    """

    def __init__(self, path: str | Path, seen: Manifest | object | None = _UNSEEN, **lease_timing: float):
        self.location = resolve(path)
        self.seen, self.lease_timing = seen, lease_timing
        self.committed = False

    def __enter__(self) -> StoreWriter:
        self.lease = None
        try:
            found = info(self.location).type
            if found == FileType.File:
                raise UserError(f"store path is a file, not a folder: {self.location}")
            self.created_root = found == FileType.NotFound
            self.lease = Lease(self.location, "precompute", **self.lease_timing).acquire()
            # Named after the lease is taken, in UTC: every prefix named earlier is no live writer's.
            self.data_dir = (
                f"{DATA_PREFIX}{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:8]}"
            )
            self.data = self.location.join(self.data_dir)
            self.location.fs.create_dir(self.data.path, recursive=True)
            self.previous = read_text(self.location.join(MANIFEST))
        except (OSError, LeaseHeld) as err:
            self._release()
            if isinstance(err, LeaseHeld):
                raise
            raise StorageError(
                f"cannot write the reference store {self.location}: {first_line(err)}"
            ) from None
        return self

    def changed_meanwhile(self) -> Manifest | None:
        """The manifest another writer committed since the caller looked (`seen`) or, without
        `seen`, since this writer started; None when the store is as it was."""
        current = read_text(self.location.join(MANIFEST))
        if self.seen is not _UNSEEN:
            found = None if current is None else Manifest.model_validate_json(current)
            return None if found == self.seen else found
        if current is None or current == self.previous:
            return None
        return Manifest.model_validate_json(current)

    def commit(self, manifest: Manifest) -> None:
        """Commit `manifest`, its `files` made: this writer's prefix read back and checksummed, the
        kept segments' entries taken from the manifest it replaces."""
        self.lease.check()  # taken over (we looked dead to another writer): commit nothing
        manifest = manifest.model_copy(update={"data_dir": self.data_dir})
        manifest.files = self._files(manifest)
        write_text_atomically(self.location.join(MANIFEST), manifest.model_dump_json(indent=2))
        self.committed = True
        keep = {self.data_dir, *manifest.data_dirs()}  # an append keeps the earlier segments
        with contextlib.suppress(OSError):  # whatever manifest is there now keeps its files
            keep |= _data_dirs(read_text(self.location.join(MANIFEST)))
        replaced = _data_dirs(self.previous)
        for entry in children(self.location):
            name = entry.base_name
            if entry.type != FileType.Directory or not name.startswith(DATA_PREFIX) or name in keep:
                continue
            # The replaced store's, and prefixes named before this writer's own, which it named once
            # it held the lease: a dead writer's (a killed run's). A later one may be live.
            if name in replaced or _stamp(name) < _stamp(self.data_dir):
                _remove_quietly(Location(self.location.fs, entry.path, self.location.given))

    def _files(self, manifest: Manifest) -> list[StoredFile]:
        kept = _data_dirs(self.previous) & set(manifest.data_dirs())
        previous = Manifest.model_validate_json(self.previous).files if kept else []
        files = []
        for data_dir in dict.fromkeys([*manifest.data_dirs(), self.data_dir]):
            if data_dir == self.data_dir:
                files += list_files(self.location, data_dir)
            else:
                files += [f for f in previous if f.path.startswith(f"{data_dir}/")]
        return files

    def __exit__(self, *exc_info) -> None:
        if not self.committed:
            _remove_quietly(self.data)
        self._release()
        with contextlib.suppress(OSError):  # storage may be gone: the caller reports that
            if self.created_root and not children(self.location):
                _remove_quietly(self.location)  # leave no empty store folder behind either

    def _release(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def _data_dirs(manifest_text: str | None) -> set[str]:
    """The prefixes a manifest's text names (none: no manifest, or unreadable)."""
    with contextlib.suppress(ValueError):
        return set(Manifest.model_validate_json(manifest_text).data_dirs()) if manifest_text else set()
    return set()


def _stamp(prefix: str) -> str:
    """The time in a `data-<%Y%m%d-%H%M%S>-<id>` name (UTC)."""
    return prefix[len(DATA_PREFIX) : len(DATA_PREFIX) + 15]


def _remove_quietly(location: Location) -> None:
    with contextlib.suppress(OSError):
        remove_tree(location)
