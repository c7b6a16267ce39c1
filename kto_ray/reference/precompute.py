"""Stage 1: a Ray Data pipeline that computes the reference log-probs once into the reference store."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq

from kto_ray.config import KTOConfig, with_absolute_paths
from kto_ray.console import RowProgress, configure_ray_data
from kto_ray.data.prepare import PreparedText, prepare_text, tokenize_rows
from kto_ray.errors import StorageError, UserError
from kto_ray.models.loading import check_context_length, load_tokenizer
from kto_ray.raycluster import ray_session
from kto_ray.reference.scoring import ActorModel, ProgressCounter, ReferenceLogprobs, on_actors
from kto_ray.rundir.lease import ensure_free
from kto_ray.rundir.timings import Timeline
from kto_ray.storage import Location, display, files_under, first_line, info, resolve
from kto_ray.store.check import data_file_stats, store_fingerprint
from kto_ray.store.fingerprint import FileStat
from kto_ray.store.format import (
    WRITE_OPTIONS,
    Manifest,
    Segment,
    Store,
    check_files,
    differing_components,
    open_store,
    read_manifest,
    record_data_files,
)
from kto_ray.store.segments import kept_segments, new_segment, segmented_manifest, write_row_digests
from kto_ray.store.writer import StoreWriter

log = logging.getLogger(__name__)


# Rows per Parquet row group of the store. Training workers read their micro-batches' rows by row group
# (kto_ray/store/reader.py) and the schedule draws rows at random, so nearly every row a worker needs
# sits in a different group and costs a read of the whole group: the smaller the group, the less is
# read for nothing. At 256 rows a group of typical rows (a few hundred tokens in each of three int32
# lists, ~4 KB) is ~1 MB: one ranged GET on object storage, where below a few MB a request's latency,
# not its size, sets its cost, so reading the group costs about what reading the row alone would.
# Smaller groups save little more and grow the footers (metadata per group and column) readers keep.
# Stores written before (a group per Ray Data block, up to precompute.bucket_rows) still read right.
ROW_GROUP_ROWS = 256


@dataclass(frozen=True)
class PrecomputeResult:
    store: Store
    reused: bool
    timings: list[dict[str, Any]] = field(default_factory=list)  # the phases of a build (rundir/timings.py)


@dataclass(frozen=True)
class _Plan:
    """What precompute knows before any model work: the config's text rows and the fingerprint they
    give, and the store found at store.path (None: there is none)."""

    cfg: KTOConfig
    tokenizer: Any
    text: PreparedText
    fingerprint: dict[str, str]
    inputs: dict[str, Any]  # the fingerprint's human-readable inputs, for the manifest
    data_files: list[FileStat] | None
    existing: Manifest | None

    @property
    def where(self) -> str:
        return display(self.cfg.store.path)


@dataclass(frozen=True)
class _Written:
    counts: dict[str, dict[str, int]]  # rows per split and label
    tokens: int

    @property
    def rows(self) -> int:
        return sum(sum(c.values()) for c in self.counts.values())

    def rows_in(self, split: str) -> int:
        return sum(self.counts[split].values())


def _store_stats(data: Location) -> _Written:
    files = files_under(data, ".parquet")
    if not files:  # an append whose every new row truncation dropped: an empty segment
        return _Written({split: {"desirable": 0, "undesirable": 0} for split in ("train", "eval")}, 0)
    table = pq.read_table(
        files,
        columns=["prompt_ids", "completion_ids", "kl_completion_ids", "label", "split"],
        filesystem=data.fs,
    )
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "eval"):
        labels = table.filter(pc.equal(table["split"], split))["label"]
        desirable = int(pc.sum(labels).as_py() or 0)
        counts[split] = {"desirable": desirable, "undesirable": len(labels) - desirable}
    prompt_len = pc.list_value_length(table["prompt_ids"])
    tokens = sum(
        int(pc.sum(pc.add(prompt_len, pc.list_value_length(table[c]))).as_py() or 0)
        for c in ("completion_ids", "kl_completion_ids")
    )
    return _Written(counts, tokens)


def _storage_failure(writer: StoreWriter, err: Exception) -> Exception:
    """A write that failed because the store's storage went away becomes one line naming it; any
    other failure (a model error in an actor, say) is passed on as it is."""
    try:
        info(writer.location)
    except OSError as unreachable:
        return StorageError(f"cannot write the reference store {writer.location}: {first_line(unreachable)}")
    return err


def _committed_meanwhile(writer: StoreWriter, plan: _Plan) -> PrecomputeResult | None:
    """Another precompute's store, committed since this one looked: reused when it has our fingerprint,
    else a one-line error (nothing of ours is committed)."""
    other = writer.changed_meanwhile()
    if other is None:
        return None
    if differing_components(plan.fingerprint, other.fingerprint):
        raise StorageError(
            f"another precompute committed a different reference store at {plan.where} while this "
            "one ran; nothing was written: rerun (with --overwrite to replace it)"
        )
    print(f"reference store {plan.where} was committed by another precompute meanwhile: reusing it")
    return PrecomputeResult(open_store(writer.location.given, plan.fingerprint), reused=True)


def precompute(cfg: KTOConfig, overwrite: bool = False) -> PrecomputeResult:
    """Build (or reuse) the reference store of `cfg`; returns it opened and checked.

    plan (read and fingerprint the data; reuse or refuse the store there) -> lease (one writer per
    store) -> scoring (the Ray Data pass, into the writer's fresh prefix) -> commit (the manifest,
    unless another precompute committed meanwhile).
    """
    start = time.perf_counter()
    timeline = Timeline()
    timeline.mark("imports, config")
    plan = _plan(with_absolute_paths(cfg))
    timeline.mark("data read, tokenizer, fingerprint")
    reused = _reuse(plan, overwrite)
    if reused is not None:
        return reused
    path = plan.cfg.store.path
    # An append keeps the store's segments (a store whose rows the data no longer starts with is
    # refused in one line naming the row: segments.py); a build or --overwrite, none.
    kept: list[Segment] = []
    if plan.existing is not None and not overwrite:
        kept = kept_segments(path, plan.existing, plan.text, plan.where)
    first_id = kept[-1].end_id if kept else 0
    ensure_free(resolve(path))  # another precompute writing this store: one line, before Ray
    with ray_session(plan.cfg.cluster.address), StoreWriter(path, seen=plan.existing) as writer:
        # The other one may have committed between our look above and taking the store's lease.
        committed = _committed_meanwhile(writer, plan)
        if committed is not None:
            return committed
        timeline.mark("ray started, store lease")
        written = _score(plan, first_id, writer)
        timeline.mark("Ray Data pass: tokenize, score, write")
        if written.rows == 0 and not kept:
            raise UserError("no example has a completion token left under data.max_length; nothing to store")
        write_row_digests(writer.data, plan.text, first_id)
        seconds = time.perf_counter() - start
        segment = new_segment(writer.data_dir, plan.text, first_id, written, seconds)
        committed = _committed_meanwhile(writer, plan)  # or while this one scored
        if committed is not None:
            return committed
        manifest = segmented_manifest(plan.fingerprint, plan.inputs, [*kept, segment], plan.data_files)
        try:
            writer.commit(manifest)
        except OSError as err:
            raise _storage_failure(writer, err) from None
        timeline.mark("row digests, commit")
    timeline.mark("ray shut down")
    dropped = len(plan.text.table) - first_id - written.rows
    what = f"appended segment {len(kept) + 1} to reference store" if kept else "reference store"
    print(
        f"{what} {plan.where}: {written.rows} rows (train {written.rows_in('train')}, "
        f"eval {written.rows_in('eval')}, dropped {dropped} with no completion token left), "
        f"{written.tokens} tokens in {seconds:.1f}s ({written.tokens / seconds:,.0f} tokens/s)",
        flush=True,
    )
    store = open_store(path, plan.fingerprint)
    if kept:
        rows = sum(store.count(s) for s in ("train", "eval"))
        print(f"reference store {plan.where} now holds {rows} rows in {len(kept) + 1} segments", flush=True)
    return PrecomputeResult(store, reused=False, timings=timeline.records())


def _plan(cfg: KTOConfig) -> _Plan:
    tokenizer = load_tokenizer(cfg.model, cfg.reference_path)
    check_context_length(cfg.model, cfg.data.max_length, cfg.reference_path)
    data_files = data_file_stats(cfg)  # before the read: see data_file_stats
    text = prepare_text(cfg, tokenizer)
    print(text.report.summary(), flush=True)
    fingerprint, inputs = store_fingerprint(cfg, text.data_digest, tokenizer)
    return _Plan(cfg, tokenizer, text, fingerprint, inputs, data_files, read_manifest(cfg.store.path))


def _reuse(plan: _Plan, overwrite: bool) -> PrecomputeResult | None:
    """The store there when its fingerprint matches the plan's (its data file stats brought up to
    date); None when there is none or `overwrite` replaces it; else a one-line error."""
    existing, path = plan.existing, plan.cfg.store.path
    if existing is None:
        return None
    differing = differing_components(plan.fingerprint, existing.fingerprint)
    if differing:
        if overwrite or differing == ["data"]:  # only the data differs: an append (rows keep their pairs)
            return None
        raise UserError(
            f"reference store {plan.where} exists with a different {', '.join(differing)}; "
            "pass --overwrite to replace it"
        )
    if existing.data_files != plan.data_files:  # same content, new stats: training can trust them
        record_data_files(path, plan.data_files)
    store = open_store(path, plan.fingerprint)
    check_files(store)  # a damaged store is not reused: one line naming the file
    rows = sum(store.count(s) for s in ("train", "eval"))
    print(f"reference store {plan.where} matches the config ({rows} rows): reusing it", flush=True)
    return PrecomputeResult(store, reused=True)


def _score(plan: _Plan, first_id: int, writer: StoreWriter) -> _Written:
    """Tokenize the rows from first_id on (what an append scores), score them with the reference actor
    pool and write the Parquet files under the writer's prefix, with a progress bar; a failure because
    the storage went away is one line."""
    import ray.data

    configure_ray_data()
    counter = ray.remote(num_cpus=0)(ProgressCounter).remote()
    cfg, table = plan.cfg, plan.text.table.slice(first_id)
    # Ray Data bundles blocks up to batch_size rows: cap the bucket so every actor gets rows.
    bucket_rows = max(1, min(cfg.precompute.bucket_rows, -(-len(table) // cfg.precompute.actors)))
    blocks = max(2 * cfg.precompute.actors, len(table) // bucket_rows + 1)
    ds = ray.data.from_arrow(table).repartition(blocks)
    ds = ds.map_batches(
        tokenize_rows,
        fn_kwargs={
            "tokenizer": plan.tokenizer,
            "max_length": cfg.data.max_length,
            "max_prompt_length": cfg.data.max_prompt_length,
        },
        batch_size=bucket_rows,
        num_cpus=0.25,
    )
    spec = ActorModel.of(cfg, cfg.reference_path, plan.tokenizer.pad_token_id)
    ds = on_actors(ds, ReferenceLogprobs, cfg, bucket_rows, spec=spec, progress=counter)
    try:
        with RowProgress(lambda: ray.get(counter.read.remote()), len(table), "reference"):
            ds.write_parquet(
                writer.data.path,
                filesystem=writer.location.fs,
                row_group_size=ROW_GROUP_ROWS,
                **WRITE_OPTIONS,  # page checksums, verified by every read (store.open_parquet)
            )
        return _store_stats(writer.data)
    except Exception as err:
        raise _storage_failure(writer, err) from None
