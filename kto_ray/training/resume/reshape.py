"""A checkpoint saved by one number of workers, loaded by another: DeepSpeed's universal checkpoint.

ZeRO saves each rank's partition of the optimizer state (and, at stage 3, of the weights), which
DeepSpeed refuses to load into a different world size. Its converter (`ds_to_universal`) rewrites
them as one folder per parameter that any world size loads.

Where: a scratch folder on each node (`run.scratch_dir`, by default the node's temp dir), never the
checkpoint itself. Who: the lowest rank on each Ray node converts for the node's ranks. Memory: the
converter holds at most one saved shard plus one parameter, never the whole model state.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.train

from kto_ray.errors import CheckpointReshapeFailed
from kto_ray.internals.deepspeed_private import convert_to_universal
from kto_ray.storage import first_line
from kto_ray.training.distributed import gather_objects

# One process each: a shard (extract) or a parameter (merge) in RAM at a time, and no process pool
# forked inside a Ray worker that holds a torch process group.
_EXTRACT_WORKERS = 1
_MERGE_WORKERS = 1


def saved_world_size(folder: Path, tag: str) -> int:
    """The number of ranks that wrote a checkpoint: one ZeRO optimizer shard file per data-parallel
    rank (`zero_pp_rank_<r>_mp_rank_00_optim_states.pt`, `bf16_` in front under bf16 at stage 1/2)."""
    return len(list((folder / tag).glob("*zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def to_universal(source: Path, target: Path, tag: str) -> None:
    """DeepSpeed's converter: `source/tag` (a ZeRO-2 or ZeRO-3 checkpoint) into `target/tag` and
    `target/latest_universal`."""
    target.mkdir(parents=True)
    convert_to_universal(source / tag, target / tag, _EXTRACT_WORKERS, _MERGE_WORKERS)


def scratch_folder(checkpoint_path: str, scratch_dir: str | None) -> Path:
    """This node's scratch folder for one checkpoint: the same for every rank of the node, distinct
    across nodes that share a disk (two Ray nodes on one host)."""
    node = ray.get_runtime_context().get_node_id()
    key = hashlib.sha256(f"{checkpoint_path}\0{node}".encode()).hexdigest()[:16]
    return Path(scratch_dir or tempfile.gettempdir()) / f"kto-reshape-{key}"


@contextlib.contextmanager
def reshaped(
    folder: Path, tag: str, step: int, checkpoint_name: str, saved: int, world: int, scratch_dir: str | None
) -> Iterator[Path]:
    """Collective: yields a universal copy of the checkpoint in `folder` (saved by `saved` ranks) for
    this world; raises CheckpointReshapeFailed on every rank when any node's conversion failed."""
    converts = _first_on_its_node()
    scratch = scratch_folder(str(folder), scratch_dir)
    failure = None
    if converts:
        try:
            shutil.rmtree(scratch, ignore_errors=True)  # a previous attempt's remains
            to_universal(folder, scratch, tag)
        except Exception as err:  # any failure of the converter: disk full, I/O, its own checks
            shutil.rmtree(scratch, ignore_errors=True)
            reason = first_line(err)  # an OSError names the path already
            failure = reason if str(scratch) in reason else f"{scratch}: {reason}"
    failures = [reason for reason in gather_objects(failure) if reason]  # also the barrier
    if failures:
        raise CheckpointReshapeFailed(step, checkpoint_name, saved, world, failures[0])
    try:
        yield scratch
        gather_objects(None)  # every rank of every node has loaded before the copy goes
    finally:
        if converts:
            shutil.rmtree(scratch, ignore_errors=True)


def _first_on_its_node() -> bool:
    """Collective: whether this rank is the lowest of the ranks on its Ray node (the one that converts
    there). By Ray node id, not Ray Train's local rank, which counts ranks per IP: two Ray nodes on one
    host (tests/nodes.py) share an IP but not a scratch folder."""
    node = ray.get_runtime_context().get_node_id()
    nodes = gather_objects(node)
    return nodes.index(node) == ray.train.get_context().get_world_rank()
