"""The reference store: Parquet files plus `manifest.json`, fingerprinted, written atomically.

A store is complete exactly when its folder holds `manifest.json`: precompute writes into a hidden
temporary sibling and renames it into place only after the manifest is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel

from kto_ray import __version__
from kto_ray.errors import UserError
from kto_ray.reference.fingerprint import FileStat

# Fingerprinting moved to its own module; re-exported for code that imports it from here.
from kto_ray.reference.fingerprint import sha256_text as sha256_text
from kto_ray.reference.fingerprint import tokenizer_fingerprint as tokenizer_fingerprint
from kto_ray.reference.fingerprint import weights_fingerprint as weights_fingerprint

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "eval")

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

# Names of the fingerprint components, in the order a mismatch is reported.
COMPONENTS = ("data", "reference_weights", "tokenizer", "truncation", "pairing", "dtype")


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


def differing_components(expected: dict[str, str], found: dict[str, str]) -> list[str]:
    return [name for name in COMPONENTS if expected.get(name) != found.get(name)]


@dataclass(frozen=True)
class Store:
    path: Path
    manifest: Manifest

    def files(self) -> list[Path]:
        return sorted(self.path.glob("*.parquet"))

    def read_split(self, split: str, columns: list[str] | None = None) -> pa.Table:
        """The rows of one split, ordered by id (deterministic whatever the writers' file order)."""
        files = [str(f) for f in self.files()]
        table = pq.read_table(files, columns=columns, filters=[("split", "=", split)], schema=SCHEMA)
        return table.sort_by("id")

    def dataset(self, split: str):
        """The split as a Ray Dataset (streamed from the Parquet files)."""
        import ray.data

        return ray.data.read_parquet(str(self.path), file_extensions=["parquet"]).filter(
            expr=f"split == '{split}'"
        )

    def count(self, split: str, label: bool | None = None) -> int:
        counts = self.manifest.counts.get(split, {})
        if label is None:
            return sum(counts.values())
        return counts.get("desirable" if label else "undesirable", 0)


def read_manifest(path: str | Path) -> Manifest | None:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"store path is a file, not a folder: {path}")
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        return Manifest.model_validate_json(manifest.read_text())
    except ValueError as err:
        raise UserError(f"{manifest}: unreadable manifest ({str(err).splitlines()[0]})") from None


def open_store(path: str | Path, expected: dict[str, str] | None = None) -> Store:
    """Open a complete store; with `expected`, refuse one whose fingerprint differs, naming what."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"no reference store at {path} (run `kto-ray precompute` first)")
    if manifest.format_version != FORMAT_VERSION:
        raise UserError(f"{path}: store format {manifest.format_version}, expected {FORMAT_VERSION}")
    if expected is not None:
        differing = differing_components(expected, manifest.fingerprint)
        if differing:
            raise UserError(
                f"reference store {path} was built for a different {', '.join(differing)} "
                "(rerun `kto-ray precompute --overwrite` or point store.path elsewhere)"
            )
    return Store(path, manifest)


class StoreWriter:
    """Context manager: a temporary sibling folder that becomes `path` only on `commit`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.parent / f".{self.path.name}.tmp-{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> StoreWriter:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Leftovers of crashed earlier runs are never complete stores; clear them.
        for stale in self.path.parent.glob(f".{self.path.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        replaced = sorted(self.path.parent.glob(f".{self.path.name}.old-*"))
        if replaced and not self.path.exists():
            # A crash between commit's two renames: the previous store goes back in place.
            os.rename(replaced.pop(), self.path)
        for stale in replaced:
            shutil.rmtree(stale, ignore_errors=True)
        self.tmp.mkdir()
        return self

    def commit(self, manifest: Manifest) -> None:
        (self.tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        old = None
        if self.path.exists():
            old = self.path.parent / f".{self.path.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def __exit__(self, *exc_info) -> None:
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


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

    The manifest is replaced atomically (temporary file + rename), so the store never lacks one. The
    stats only save later runs a re-read of the data: a store that cannot be written (a read-only
    mount) keeps its old ones, with a warning.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise UserError(f"no reference store at {path} (run `kto-ray precompute` first)")
    updated = manifest.model_copy(update={"data_files": data_files})
    tmp = path / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(updated.model_dump_json(indent=2))
        os.replace(tmp, path / MANIFEST)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        log.warning("could not record the data file stats in %s (%s)", path / MANIFEST, err)
