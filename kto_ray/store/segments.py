"""A store that grows: each precompute of a data set that only grew at its end scores the new rows alone
and commits them as one more segment (its own prefix, data fingerprint and counts) of the same store.

A row's KL partner and split depend only on the row and the rows before it (kto_ray/data/pairing.py),
so the old rows' ids, pairs and splits are the ones a build of
the whole data from scratch would draw. Each segment keeps its rows' identities (`row_digest`) and
where they were read from in `rows.digests` (Parquet, beside its data; not `.parquet`, so no reader
takes it for rows): the next append checks that the data still starts with exactly those rows, and
names the first one changed or removed.
"""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kto_ray import __version__
from kto_ray.data.prepare import PreparedText
from kto_ray.data.sources import content_fingerprint
from kto_ray.errors import StoreDamaged, UserError
from kto_ray.integrity import check_entry
from kto_ray.storage import Location, first_line, resolve
from kto_ray.store.fingerprint import FileStat
from kto_ray.store.format import (
    FORMAT_VERSION,
    WRITE_OPTIONS,
    Manifest,
    Segment,
)

ROW_DIGESTS = "rows.digests"
_DIGESTS_SCHEMA = pa.schema([("digest", pa.binary(16)), ("source", pa.string())])


def write_row_digests(data: Location, text: PreparedText, first_id: int) -> None:
    """The identities and sources of the rows first_id.. of `text`, into a segment's prefix `data`."""
    table = pa.table(
        {
            "digest": pa.array(text.row_digests[first_id:], pa.binary(16)),
            "source": [e.source for e in text.examples[first_id:]],
        },
        schema=_DIGESTS_SCHEMA,
    )
    pq.write_table(
        table, data.join(ROW_DIGESTS).path, filesystem=data.fs, compression="zstd", **WRITE_OPTIONS
    )


def _stored_digests(path: str, manifest: Manifest, where: str) -> tuple[list[bytes], list[str]]:
    """Every stored row's identity and source, in id order, over all segments."""
    location = resolve(path)
    digests: list[bytes] = []
    sources: list[str] = []
    for segment in manifest.segments or []:
        listed = next((f for f in manifest.files if f.path == f"{segment.data_dir}/{ROW_DIGESTS}"), None)
        problem = check_entry(location, listed) if listed is not None else None  # read whole: small
        if problem is not None:
            raise StoreDamaged(where, problem.path, problem.what)
        try:
            digests_file = location.join(segment.data_dir, ROW_DIGESTS).path
            table = pq.read_table(digests_file, filesystem=location.fs)
        except (OSError, pa.ArrowException) as err:
            raise UserError(
                f"reference store {where}: segment {segment.data_dir} has no readable row digests "
                f"({first_line(err)}); pass --overwrite to rebuild the store"
            ) from None
        digests += table["digest"].to_pylist()
        sources += table["source"].to_pylist()
    return digests, sources


def kept_segments(path: str, existing: Manifest, text: PreparedText, where: str) -> list[Segment]:
    """The segments of `existing` that an append of `text` keeps: all of them, once the data is checked
    to start with exactly their rows. A row changed, removed or put before them is one line naming
    its file and line, with --overwrite as the way out."""
    if not existing.segments:
        raise UserError(
            f"reference store {where} was built without segments (by an earlier kto-ray) and cannot be "
            "appended to; pass --overwrite to rebuild it"
        )
    old, sources = _stored_digests(path, existing, where)
    new = text.row_digests
    end = existing.segments[-1].end_id
    if len(old) != end:
        raise UserError(f"reference store {where}: its row digests cover {len(old)} rows, its manifest {end}")
    differ = next((i for i, (a, b) in enumerate(zip(old, new)) if a != b), None)
    if differ is not None:
        raise UserError(
            f"{text.examples[differ].source}: differs from row {differ} of reference store {where} "
            f"(read from {sources[differ]}): a row the store holds was changed or removed, or new rows "
            "come before it (an append adds rows after the last one); pass --overwrite to rebuild the store"
        )
    if len(new) < end:
        raise UserError(
            f"{sources[len(new)]}: row {len(new)} of reference store {where} is gone from the data "
            "(removed or changed); pass --overwrite to rebuild the store"
        )
    return list(existing.segments)


def new_segment(data_dir: str, text: PreparedText, first_id: int, written: Any, seconds: float) -> Segment:
    """The segment of rows first_id.. of `text`, as the scoring pass wrote them under `data_dir`."""
    return Segment(
        data_dir=data_dir,
        first_id=first_id,
        end_id=len(text.examples),
        data=content_fingerprint(text.examples[first_id:]),
        counts=written.counts,
        tokens=written.tokens,
        seconds=round(seconds, 3),
        created=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def segmented_manifest(
    fingerprint: dict[str, str],
    inputs: dict[str, Any],
    segments: list[Segment],
    data_files: list[FileStat] | None,
) -> Manifest:
    """The manifest of a store of `segments`: counts, tokens and seconds summed over them (its `files`
    are listed by the writer's commit)."""
    counts: dict[str, dict[str, int]] = {}
    for segment in segments:
        for split, by_label in segment.counts.items():
            into = counts.setdefault(split, {})
            for label, n in by_label.items():
                into[label] = into.get(label, 0) + n
    return Manifest(
        format_version=FORMAT_VERSION,
        fingerprint=fingerprint,
        fingerprint_inputs=inputs,
        counts=counts,
        tokens=sum(s.tokens for s in segments),
        seconds=round(sum(s.seconds for s in segments), 3),
        created=segments[-1].created,
        kto_ray_version=__version__,
        data_files=data_files,
        segments=segments,
    )
