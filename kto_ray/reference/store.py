"""The reference store: Parquet files plus `manifest.json`, fingerprinted, committed atomically, in a
local folder or at an object-storage URI (kto_ray.storage).

A store is exactly what its `manifest.json` names: the Parquet files under one `data-<id>/` prefix.
The manifest is written last, in one atomic write, so a reader never sees a partial store.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileType
from pydantic import BaseModel

from kto_ray import __version__
from kto_ray.errors import StorageError, UserError
from kto_ray.lease import Lease, LeaseHeld
from kto_ray.reference.fingerprint import FileStat
from kto_ray.storage import (
    Location,
    children,
    files_under,
    first_line,
    info,
    is_uri,
    read_text,
    remove_tree,
    resolve,
    write_text_atomically,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# A store of several segments: a reader that knows only `data_dir` would miss rows, so it must refuse.
SEGMENTED_FORMAT_VERSION = 2
READABLE_FORMATS = (FORMAT_VERSION, SEGMENTED_FORMAT_VERSION)
MANIFEST = "manifest.json"
DATA_PREFIX = "data-"
SPLITS = ("train", "eval")
_UNSEEN: Any = object()  # StoreWriter without `seen`

# The columns of DESIGN.md's contract, with the Arrow types training relies on.
SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("prompt_ids", pa.list_(pa.int32())),
        ("completion_ids", pa.list_(pa.int32())),
        ("kl_completion_ids", pa.list_(pa.int32())),
        ("kl_id", pa.int64()),  # the row whose completion is this row's KL completion
        ("label", pa.bool_()),
        ("ref_logps", pa.float32()),
        ("ref_kl_logps", pa.float32()),
        ("split", pa.string()),
    ]
)


def sequence_lengths(table: pa.Table) -> np.ndarray:
    """Tokens of each row's (x, y) sequence: what its policy forward and backward are padded to."""
    prompt = pc.list_value_length(table["prompt_ids"]).to_numpy(zero_copy_only=False)
    return prompt + pc.list_value_length(table["completion_ids"]).to_numpy(zero_copy_only=False)


# Names of the fingerprint components, in the order a mismatch is reported.
COMPONENTS = ("data", "reference_weights", "tokenizer", "truncation", "pairing", "dtype")


class Segment(BaseModel):
    """One precompute's rows of a store: ids first_id .. end_id - 1 (before truncation drops any)
    under their own prefix; a store grows by appending segments (kto_ray/reference/segments.py)."""

    data_dir: str
    first_id: int
    end_id: int
    data: str  # content_fingerprint of this segment's rows alone
    counts: dict[str, dict[str, int]]
    tokens: int
    seconds: float
    created: str


class Manifest(BaseModel):
    format_version: int
    fingerprint: dict[str, str]
    fingerprint_inputs: dict[str, Any]
    counts: dict[str, dict[str, int]]
    tokens: int
    seconds: float
    created: str
    kto_ray_version: str
    # The data files the `data` component was computed from, stat'ed before they were read: when they
    # all still match, training trusts `fingerprint["data"]` without re-reading the data. None for a
    # Hugging Face dataset (nothing to stat) and in manifests written before this field existed.
    data_files: list[FileStat] | None = None
    # The prefix (inside the store) that holds this store's Parquet files; None in the first layout,
    # whose files sit at the top of the store folder.
    data_dir: str | None = None
    # Every segment, in id order (the last is `data_dir`'s); None in stores written before segments.
    # The top-level counts, tokens and seconds are their sums, `fingerprint["data"]` covers all rows.
    segments: list[Segment] | None = None

    def data_dirs(self) -> list[str]:
        """The prefixes that hold this store's rows (empty: the first layout, files at the top)."""
        if self.segments:
            return [segment.data_dir for segment in self.segments]
        return [self.data_dir] if self.data_dir else []


def differing_components(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return [name for name in COMPONENTS if expected.get(name) != found.get(name)]


@dataclass(frozen=True)
class Store:
    """A committed store: its location (local folder or URI) and manifest; its rows are the Parquet
    files under the data prefix the manifest names."""

    path: str
    manifest: Manifest

    @property
    def location(self) -> Location:
        return resolve(self.path)

    def files(self) -> list[str]:
        """Paths inside `location.fs` of the store's Parquet files."""
        location = self.location
        dirs = self.manifest.data_dirs()
        if dirs:  # every segment's files, segment after segment
            return [f for d in dirs for f in files_under(location.join(d), ".parquet")]
        found = files_under(location, ".parquet")  # first layout: files at the top, no prefix
        return [f for f in found if "/" not in f[len(location.path) + 1 :]]

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """The rows of one split, ordered by id (deterministic whatever the writers' file order)."""
        table = pq.read_table(
            self.files(),
            columns=columns,
            filters=[("split", "=", split)],
            schema=SCHEMA,
            filesystem=self.location.fs,
        )
        return table.sort_by("id")

    def dataset(self, split: str):
        """The split as a Ray Dataset (streamed from the Parquet files)."""
        import ray.data

        return ray.data.read_parquet(self.files(), filesystem=self.location.fs).filter(
            expr=f"split == '{split}'"
        )

    def count(self, split: str, label: bool | None = None) -> int:
        counts = self.manifest.counts.get(split, {})
        if label is None:
            return sum(counts.values())
        return counts.get("desirable" if label else "undesirable", 0)


def read_manifest(path: str | Path) -> Manifest | None:
    """The store's manifest, or None when there is no committed store at `path`."""
    location = resolve(path)
    try:
        if info(location).type == FileType.File:
            raise UserError(f"store path is a file, not a folder: {location}")
        text = read_text(location.join(MANIFEST))
    except OSError as err:
        raise UserError(f"cannot read the reference store {location}: {str(err).splitlines()[0]}") from None
    if text is None:
        return None
    try:
        return Manifest.model_validate_json(text)
    except ValueError as err:
        raise UserError(f"{location}/{MANIFEST}: unreadable manifest ({str(err).splitlines()[0]})") from None


def open_store(path: str | Path, expected: dict[str, str] | None = None) -> Store:
    """Open a complete store; with `expected`, refuse one whose fingerprint differs, naming what."""
    location = resolve(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"no reference store at {location} (run `kto-ray precompute` first)")
    if manifest.format_version not in READABLE_FORMATS:
        expected = " or ".join(map(str, READABLE_FORMATS))
        raise UserError(f"{location}: store format {manifest.format_version}, expected {expected}")
    if expected is not None:
        differing = differing_components(expected, manifest.fingerprint)
        if differing:
            raise UserError(
                f"reference store {location} was built for a different {', '.join(differing)} "
                "(rerun `kto-ray precompute --overwrite` or point store.path elsewhere)"
            )
    return Store(str(path) if is_uri(str(path)) else location.path, manifest)


class StoreWriter:
    """Context manager that commits a store without renames, the same way on local disk and on object
    storage: the Parquet files go under a fresh prefix `data-<id>/`, then `manifest.json`, naming that
    prefix, replaces the previous one in one atomic write. Readers only ever follow the manifest, so
    a killed or failed run leaves the previous store readable and no manifest pointing at partial
    data. After a commit, prefixes no manifest names and older than this writer are removed; an
    uncommitted writer removes its own.

    One writer at a time: the store's lease (kto_ray.lease) is held from `__enter__` to `__exit__`, so
    a second precompute of the same store fails in one line naming the first (host, pid, since).
    `seen` is the manifest the caller decided on (None: there was none), so `changed_meanwhile`
    reports a commit made between that look and this writer's start too; without it, the one found
    at `__enter__` is the baseline.
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
            self.data_dir = f"{DATA_PREFIX}{_utc_stamp()}-{uuid.uuid4().hex[:8]}"
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
        self.lease.check()  # taken over (we looked dead to another writer): commit nothing
        manifest = manifest.model_copy(update={"data_dir": self.data_dir})
        write_text_atomically(self.location.join(MANIFEST), manifest.model_dump_json(indent=2))
        self.committed = True
        keep = {self.data_dir, *manifest.data_dirs()}  # an append keeps the earlier segments
        with contextlib.suppress(OSError):  # whatever manifest is there now keeps its files
            keep |= _data_dirs(read_text(self.location.join(MANIFEST)))
        replaced = _data_dirs(self.previous)
        for entry in children(self.location):
            name = entry.base_name
            if entry.type == FileType.Directory and name.startswith(DATA_PREFIX) and name not in keep:
                # The replaced store's, and prefixes named before this writer's own, which it named
                # once it held the lease: a dead writer's (a killed run's). A later one may be live.
                if name in replaced or _stamp(name) < _stamp(self.data_dir):
                    _remove_quietly(Location(self.location.fs, entry.path, self.location.given))
            elif entry.type == FileType.File and name.endswith(".parquet"):
                self.location.fs.delete_file(entry.path)  # the first layout's files, now replaced

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


def _utc_stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _data_dirs(manifest_text: str | None) -> set[str]:
    """The prefixes a manifest's text names (none: no manifest, the first layout, or unreadable)."""
    with contextlib.suppress(ValueError):
        return set(Manifest.model_validate_json(manifest_text).data_dirs()) if manifest_text else set()
    return set()


def _stamp(prefix: str) -> str:
    """The time in a `data-<%Y%m%d-%H%M%S>-<id>` name (UTC; local time in stores written before)."""
    return prefix[len(DATA_PREFIX) : len(DATA_PREFIX) + 15]


def _remove_quietly(location: Location) -> None:
    with contextlib.suppress(OSError):
        remove_tree(location)


def build_manifest(
    fingerprint: dict[str, str],
    inputs: dict[str, Any],
    table_stats: dict[str, dict[str, int]],
    tokens: int,
    seconds: float,
    data_files: list[FileStat] | None = None,
) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        counts=table_stats,
        tokens=tokens,
        seconds=round(seconds, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        kto_ray_version=__version__,
        data_files=data_files,
    )


def record_data_files(path: str | Path, data_files: list[FileStat] | None) -> None:
    """Replace the data file stats of a complete store whose content fingerprint was just rechecked.

    The manifest is replaced atomically, so the store never lacks one. The stats only save later runs
    a re-read of the data: a store that cannot be written (a read-only mount) keeps its old ones, with
    a warning.
    """
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"no reference store at {resolve(path)} (run `kto-ray precompute` first)")
    updated = manifest.model_copy(update={"data_files": data_files})
    target = resolve(path).join(MANIFEST)
    try:
        write_text_atomically(target, updated.model_dump_json(indent=2))
    except OSError as err:
        log.warning("could not record the data file stats in %s (%s)", target, first_line(err))
