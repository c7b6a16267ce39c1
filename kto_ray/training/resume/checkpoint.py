"""Checkpoints through Ray Train: every rank saves its ZeRO shard, every rank reports (a barrier).

A checkpoint folder holds DeepSpeed's files (model, optimizer and scheduler shards of all ranks), one
RNG state file per rank, `trainer_state.json` (the optimizer step, which is also the data position),
`run_state.json` (what the steps mean: training/resume/run_state.py) and each rank's file list
(`checkpoint_files.py`), which a restore checks before it loads.
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.fs as pafs
import ray.train
import torch

from kto_ray.errors import CheckpointsLost, CheckpointWriteFailed, ResumeUnchecked
from kto_ray.integrity import Problem, check_entry, lists_at, write_file_list
from kto_ray.internals.deepspeed_private import universal_load
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.storage import first_line, remove_tree, resolve
from kto_ray.training.distributed import gather_objects
from kto_ray.training.resume.checkpoint_files import damage_line, older_than
from kto_ray.training.resume.reshape import reshaped, saved_world_size
from kto_ray.training.resume.run_state import RUN_STATE_FILE

TAG = "zero"
STATE_FILE = "trainer_state.json"


def _has_frozen_parameters(engine) -> bool:
    return any(not p.requires_grad for p in engine.module.parameters())


def checkpoint_name(step: int, damaged: tuple[str, ...] = ()) -> str:
    """`step_<n>`; after a fallback past a damaged `step_<n>`, `step_<n>-1` (and so on), so a redone
    step never writes into the damaged folder, which is left for inspection."""
    name, redo = f"step_{step:08d}", 0
    while name in damaged:
        redo += 1
        name = f"step_{step:08d}-{redo}"
    return name


@dataclass(frozen=True)
class Restored:
    """What `restore` loaded: the step (0: a fresh start) and the damaged checkpoints it skipped."""

    step: int
    damaged: tuple[str, ...] = ()


def _clear_unregistered(run_dir: RunDir, name: str, rank: int) -> None:
    """Collective, before the step's upload: rank 0 removes what a group that died left of this step's
    checkpoint folder (unregistered: a start resumes from the latest registered one). Ray Train uploads
    each rank's files over what is there, and a group of 2 leaves rank 1's shards, which a group of 1
    never overwrites: the saved world size, read from the shards, would be wrong."""
    if rank == 0:
        remove_tree(run_dir.join(CHECKPOINTS, name))
    gather_objects(None)  # a barrier: no rank uploads before the folder is gone


def save_and_report(
    engine,
    step: int,
    rank: int,
    metrics: dict,
    previous: int,
    run_state: Mapping[str, Any],
    run_dir: RunDir,
    world: int,
    damaged: tuple[str, ...],
) -> None:
    """Collective: all ranks write their shard, then all report the folder (Ray uploads and merges them
    into `checkpoints/step_<n>` of `run_dir`). `previous` is the last checkpointed step (for the error);
    a failed write raises CheckpointWriteFailed. Rank 0 also writes `run_state` with the world size.
    Every rank lists its files with their checksums (`files_rank<r>.json`) before the report.
    `damaged`: the checkpoints the restore skipped, whose folders a redone step does not write into.

    Frozen weights (the base under LoRA) are left out: they never change and every (re)start loads
    them from the model files, so a LoRA checkpoint holds only the adapters and their optimizer state."""
    with tempfile.TemporaryDirectory(prefix="kto-ckpt-") as tmp:
        engine.save_checkpoint(tmp, tag=TAG, exclude_frozen_parameters=_has_frozen_parameters(engine))
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        torch.save(rng, Path(tmp) / f"rng_rank{rank}.pt")
        if rank == 0:
            (Path(tmp) / STATE_FILE).write_text(json.dumps({"step": step}))
            state = dict(run_state, world_size=world)
            (Path(tmp) / RUN_STATE_FILE).write_text(json.dumps(state, indent=1))
        write_file_list(Path(tmp), step, rank, world)
        name = checkpoint_name(step, damaged)
        try:
            _clear_unregistered(run_dir, name, rank)
            ray.train.report(
                metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=name
            )
        except (OSError, RuntimeError) as err:  # pyarrow's upload errors; Ray wraps some in RuntimeError
            raise CheckpointWriteFailed(
                step, name, first_line(err), checkpoint_name(previous) if previous else None
            ) from None


def restore(
    engine,
    rank: int,
    world: int,
    scratch_dir: str | None,
    checked: tuple[str, Mapping[str, Any]] | None,
    run_state: Mapping[str, Any],
) -> Restored:
    """Load the latest checkpoint Ray Train hands this run (after a restart or a rerun), or, when it is
    damaged or incomplete, the newest whole one before it; returns the step already done (0 when
    starting fresh) and the damaged ones skipped. A collective: every rank checks a share of the
    files and all take the same checkpoint. A checkpoint saved by a different number of workers is
    reshaped first (`training/resume/reshape.py`, in `scratch_dir`). No whole one is a `CheckpointsLost`.

    The checkpoint must hold the run state the driver checked this start against (`checked`: its name
    and state) or this start's own `run_state` (a checkpoint this start wrote, handed back after a
    restart); anything else, before a single step, is a `ResumeUnchecked`.

    RNG states are restored only when the world size is unchanged; the data order never depends on
    them (the schedule is a function of the step and `train.seed`), only dropout would."""
    handed = ray.train.get_checkpoint()
    if handed is None:
        return Restored(0)
    damaged: list[tuple[str, Problem]] = []
    for checkpoint in _newest_first(handed):
        name = Path(checkpoint.path).name
        with checkpoint.as_directory() as folder:
            folder = Path(folder)
            problem = _whole(folder, rank, world)
            if problem is not None:
                damaged.append((name, problem))
                continue
            _check_resumed(folder, name, checked, run_state)
            step = _load_folder(engine, folder, name, rank, world, scratch_dir)
        if damaged and rank == 0:  # the driver says it before the launch when the sizes show it
            print(f"{damage_line(*damaged[0])}, resuming from step {step}", flush=True)
        return Restored(step, tuple(n for n, _ in damaged))
    raise CheckpointsLost(damage_line(*damaged[0]), len(damaged))


def _check_resumed(
    folder: Path, name: str, checked: tuple[str, Mapping[str, Any]] | None, run_state: Mapping[str, Any]
) -> None:
    """Every rank reads the same file and decides the same: no rank is left in a collective."""
    try:
        saved = _without_world(json.loads((folder / RUN_STATE_FILE).read_text()))
    except (OSError, ValueError):  # none, or unreadable: not under any state the driver checked
        saved = None
    accepted = [_without_world(run_state)] + ([_without_world(checked[1])] if checked else [])
    if saved not in accepted:
        raise ResumeUnchecked(name, checked[0] if checked else None)


def _without_world(state: Mapping[str, Any]) -> dict[str, Any]:
    # As JSON holds it (tuples read back as lists). The world size that wrote a checkpoint is a fact
    # of it, not a setting: a reshape changes it.
    return {key: value for key, value in json.loads(json.dumps(dict(state))).items() if key != "world_size"}


def _newest_first(handed: ray.train.Checkpoint) -> Iterator[ray.train.Checkpoint]:
    """The checkpoint Ray Train handed, then the older checkpoint folders beside it, newest first."""
    yield handed
    fs, path = handed.filesystem, handed.path.rstrip("/")
    parent, name = path.rsplit("/", 1)
    found = fs.get_file_info(pafs.FileSelector(parent, allow_not_found=True))
    names = [f.base_name for f in found if f.type == pafs.FileType.Directory]
    for other in older_than(name, names):
        yield ray.train.Checkpoint(f"{parent}/{other}", filesystem=fs)


def _whole(folder: Path, rank: int, world: int) -> Problem | None:
    """Collective: the first problem of the checkpoint in `folder` (rank order), the same on every rank.
    Saved rank k's files are checked by rank k % world (each rank its own when the count is the same)."""
    location = resolve(folder)
    lists = lists_at(location)
    problem = lists.problem
    if problem is None:
        for saved_rank in range(rank, lists.world_size, world):
            problem = next((p for e in lists.lists[saved_rank] if (p := check_entry(location, e))), None)
            if problem is not None:
                break
    return next((p for p in gather_objects(problem) if p is not None), None)


def _load_folder(engine, folder: Path, name: str, rank: int, world: int, scratch_dir: str | None) -> int:
    step = int(json.loads((folder / STATE_FILE).read_text())["step"])
    saved = saved_world_size(folder, TAG)
    if saved == world:
        _load(engine, folder, universal=False)
        rng_file = folder / f"rng_rank{rank}.pt"
        if rng_file.exists():
            # Our own file (RNG states are not plain tensors).
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])
        return step
    with reshaped(folder, TAG, step, name, saved, world, scratch_dir) as universal_folder:
        _load(engine, universal_folder, universal=True)
    return step


def _load(engine, folder: Path, universal: bool) -> None:
    """DeepSpeed's load of `folder/TAG`; `universal` for a converted checkpoint (set for this load only:
    the engine is built before the checkpoint is seen)."""
    with universal_load(engine, universal):
        engine.load_checkpoint(
            str(folder),
            tag=TAG,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            # The saved module state lacks the frozen weights (see save_and_report): they keep the
            # values just loaded from the model files.
            load_module_strict=not _has_frozen_parameters(engine),
        )
