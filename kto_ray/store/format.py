"""The reference store: Parquet files plus `manifest.json`, in a local folder or at an object-storage URI.

A store is exactly what its manifest names: the files it lists (path, size, CRC-32) under its
segments' `data-<id>/` prefixes. The manifest is written last, in one atomic write
(kto_ray/store/writer.py), so a reader never sees a partial store. Readers check each file against it
as they open and decode it (`open_parquet`); a file that disagrees is one `StoreDamaged` line.
"""

from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow.fs import FileType
from pydantic import BaseModel

from kto_ray.errors import StorageError, StoreDamaged, UserError
from kto_ray.integrity import FileEntry, check_sizes, crc32_hex, entry_of, sizes_under
from kto_ray.storage import (
    Location,
    display,
    files_under,
    first_line,
    info,
    is_uri,
    read_text,
    resolve,
    write_text_atomically,
)
from kto_ray.store.fingerprint import FileStat

log = logging.getLogger(__name__)

# 3: every file listed with its size and checksums, Parquet page checksums written (1 and 2 had none).
FORMAT_VERSION = 3
READABLE_FORMATS = (FORMAT_VERSION,)
# Written into every Parquet file of a store (pyarrow's page CRC), and verified by every read.
WRITE_OPTIONS = {"write_page_checksum": True}
READ_OPTIONS = {"page_checksum_verification": True}
_FOOTER_READ = 64 << 10  # the tail read at open: the footer of a store file fits (pyarrow reads as much)
MANIFEST = "manifest.json"
DATA_PREFIX = "data-"

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


def row_lengths(table: pa.Table) -> np.ndarray:
    """A row's length, the one definition: the tokens of its longer forward, prompt + the longer of its
    completion and its KL completion (what a micro-batch holding it is padded to). Length grouping,
    eval's sort, token budgets and the reader's index all use it."""

    def tokens(column: str) -> np.ndarray:
        return pc.list_value_length(table[column]).to_numpy(zero_copy_only=False).astype(np.int64)

    return tokens("prompt_ids") + np.maximum(tokens("completion_ids"), tokens("kl_completion_ids"))


# Names of the fingerprint components, in the order a mismatch is reported.
COMPONENTS = ("data", "reference_weights", "tokenizer", "truncation", "pairing", "dtype")


class Segment(BaseModel):
    """One precompute's rows of a store: ids first_id .. end_id - 1 (before truncation drops any)
    under their own prefix; a store grows by appending segments (kto_ray/store/segments.py)."""

    data_dir: str
    first_id: int
    end_id: int
    data: str  # content_fingerprint of this segment's rows alone
    counts: dict[str, dict[str, int]]
    tokens: int
    seconds: float
    created: str


class StoredFile(FileEntry):
    """A file of the store (path relative to the store) and, for Parquet, the CRC-32 of its footer
    (the metadata, not covered by page checksums), which a reader checks at open with no extra read."""

    footer_crc32: str | None = None


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
    # Hugging Face dataset (nothing to stat).
    data_files: list[FileStat] | None = None
    data_dir: str | None = None  # the prefix of the newest segment's files (None: files at the top)
    # Every segment, in id order (the last is `data_dir`'s). The top-level counts, tokens and seconds
    # are their sums, `fingerprint["data"]` covers all rows.
    segments: list[Segment] | None = None
    # Every file of the store, segment after segment: what readers open and `kto-ray verify` checks.
    files: list[StoredFile] = []

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
        """Paths inside `location.fs` of the store's Parquet files, as the manifest lists them."""
        location = self.location
        return [location.join(f.path).path for f in self.manifest.files if f.path.endswith(".parquet")]

    def relative(self, path: str) -> str:
        """One of `files()` as the manifest names it (relative to the store)."""
        return path[len(self.location.path.rstrip("/")) + 1 :]

    def entry(self, path: str) -> StoredFile:
        """The manifest's entry of one of `files()`."""
        return next(f for f in self.manifest.files if f.path == self.relative(path))

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """The rows of one split, ordered by id (deterministic whatever the writers' file order); every
        file checked as it is read (`open_parquet`)."""
        wanted = list(columns or SCHEMA.names)
        read = wanted if "split" in wanted else [*wanted, "split"]
        schema = pa.schema([SCHEMA.field(name) for name in wanted])
        parts = []
        for path in self.files():
            with open_parquet(self, path) as parquet:
                table = checked_read(
                    self, path, lambda p=parquet: p.file().read(columns=read, use_threads=False)
                )
            table = table.filter(pc.fill_null(pc.equal(table["split"], split), False))
            parts.append(table.select(wanted).cast(schema))
        table = pa.concat_tables(parts) if parts else schema.empty_table()
        return table.sort_by("id") if "id" in wanted else table

    def count(self, split: str, label: bool | None = None) -> int:
        counts = self.manifest.counts.get(split, {})
        if label is None:
            return sum(counts.values())
        return counts.get("desirable" if label else "undesirable", 0)


class ParquetOpened:
    """An open store file whose size and footer agree with the manifest (`open_parquet`)."""

    def __init__(self, handle: pa.NativeFile, metadata: pq.FileMetaData):
        self.handle, self.metadata = handle, metadata

    def file(self, **options) -> pq.ParquetFile:
        return pq.ParquetFile(self.handle, metadata=self.metadata, **READ_OPTIONS, **options)

    def __enter__(self) -> ParquetOpened:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.handle.close()


def damaged(store: Store, path: str, what: str) -> StoreDamaged:
    return StoreDamaged(display(store.path), store.relative(path), what)


def _unreadable(store: Store, err: OSError | pa.ArrowException) -> StorageError:
    return StorageError(f"cannot read the reference store {display(store.path)}: {first_line(err)}")


def open_parquet(store: Store, path: str, fs=None) -> ParquetOpened:
    """Open one of the store's Parquet files, checked against its manifest entry: its size (what the
    open returns anyway) and its footer's CRC-32 (the tail is read in one request, as pyarrow would).
    Reads from it verify every page's CRC (`READ_OPTIONS`); a mismatch is a `StoreDamaged`."""
    entry = store.entry(path)
    try:
        handle = (fs or store.location.fs).open_input_file(path)
    except FileNotFoundError:
        raise damaged(store, path, "missing") from None
    except OSError as err:
        raise _unreadable(store, err) from None
    try:
        size = handle.size()
        if size != entry.size:
            raise damaged(store, path, f"size {size}, expected {entry.size}")
        footer = checked_read(store, path, lambda: _read_footer(handle, size))
        if entry.footer_crc32 is not None and crc32_hex(zlib.crc32(footer)) != entry.footer_crc32:
            raise damaged(store, path, "footer checksum differs")
        try:
            metadata = pq.read_metadata(pa.BufferReader(b"PAR1" + footer))
        except (OSError, pa.ArrowException) as err:
            raise damaged(store, path, first_line(err)) from None
    except BaseException:
        handle.close()
        raise
    return ParquetOpened(handle, metadata)


def _read_footer(handle: pa.NativeFile, size: int) -> bytes:
    """The footer (metadata, its length and the magic) of an open file: one read of its tail, a second
    only for a larger footer. Of a file that is not Parquet, its last 8 bytes (their checksum differs)."""
    tail = handle.read_at(min(size, _FOOTER_READ), size - min(size, _FOOTER_READ))
    length = int.from_bytes(tail[-8:-4], "little") + 8 if len(tail) >= 12 else -1
    if length < 8 or tail[-4:] != b"PAR1" or length + 4 > size:
        return tail[-8:]
    return tail[-length:] if length <= len(tail) else handle.read_at(length, size - length)


def checked_read(store: Store, path: str, read):
    """`read()` of an opened store file: a decode error (a page checksum, a truncated page) while the
    storage answers is a damaged file; storage that does not answer is a StorageError."""
    try:
        return read()
    except (OSError, pa.ArrowException) as err:
        try:
            store.location.fs.get_file_info(path)
        except OSError:
            raise _unreadable(store, err) from None
        raise damaged(store, path, first_line(err)) from None


def stored_file(location: Location, relative: str) -> StoredFile:
    """The manifest entry of a file just written under the store at `location` (read back whole)."""
    footer = None
    if relative.endswith(".parquet"):
        with location.fs.open_input_file(location.join(relative).path) as handle:
            footer = crc32_hex(zlib.crc32(_read_footer(handle, handle.size())))
    return StoredFile(**entry_of(location, relative).model_dump(), footer_crc32=footer)


def list_files(location: Location, data_dir: str) -> list[StoredFile]:
    """The entries of every file under one prefix of the store, sorted by path."""
    start = len(location.path.rstrip("/")) + 1
    return [stored_file(location, f[start:]) for f in files_under(location.join(data_dir), "")]


def check_files(store: Store) -> None:
    """Every file the manifest lists is there with its size (one recursive LIST; no data read): what
    precompute's reuse, train and evaluate check first. The first one that is not is a StoreDamaged."""
    location = store.location
    try:
        sizes = sizes_under(location)
    except OSError as err:
        raise _unreadable(store, err) from None
    problems = check_sizes(store.manifest.files, sizes)
    if problems:
        raise StoreDamaged(display(store.path), problems[0].path, problems[0].what)


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


def record_data_files(path: str | Path, data_files: list[FileStat] | None) -> None:
    """Replace the data file stats of a complete store whose content fingerprint was just rechecked
    (atomically). They only save later runs a re-read of the data: a store that cannot be written (a
    read-only mount) keeps its old ones, with a warning."""
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"no reference store at {resolve(path)} (run `kto-ray precompute` first)")
    updated = manifest.model_copy(update={"data_files": data_files})
    target = resolve(path).join(MANIFEST)
    try:
        write_text_atomically(target, updated.model_dump_json(indent=2))
    except OSError as err:
        log.warning("could not record the data file stats in %s (%s)", target, first_line(err))
