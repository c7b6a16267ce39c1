"""What a checkpoint's steps mean, saved with it: `run_state.json`, next to `trainer_state.json`.

The driver builds the state before launch and rank 0 writes it into every checkpoint. On a rerun the
driver reads the state of the checkpoint Ray Train will resume from (`saved_state`) and compares it
with the new one (training/resume/resume_check.py) before anything is launched or written; the workers'
restore then resumes only a checkpoint under that state, so the checks and what is resumed cannot part.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kto_ray.config import KTOConfig, with_absolute_paths
from kto_ray.errors import CheckpointsDamaged, UserError
from kto_ray.integrity import size_problem
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.storage import first_line, is_uri, read_text
from kto_ray.store.fingerprint import sha256_text, weights_fingerprint
from kto_ray.store.format import read_manifest, row_lengths
from kto_ray.store.reader import SplitIndex
from kto_ray.training.resume.checkpoint_files import checkpoint_step, damage_line, older_than

RUN_STATE_FILE = "run_state.json"
STATE_VERSION = 1


@dataclass(frozen=True)
class SavedCheckpoint:
    """The checkpoint a rerun resumes from, and its saved run state."""

    name: str
    state: dict[str, Any]


def _model_identity(cfg: KTOConfig) -> str:
    """The policy's initial weights: their files' hash for a local folder (moving the folder is no
    change), the hub id and revision otherwise (not downloaded here)."""
    path = cfg.model.path
    if not is_uri(path) and Path(path).expanduser().is_dir():
        return "sha256:" + weights_fingerprint(Path(path).expanduser(), cfg.model.allow_pickle_weights)
    return f"{path}@{cfg.model.revision or 'main'}"


def _rows_identity(cfg: KTOConfig, train_rows: SplitIndex | pa.Table) -> str:
    """The train split: the store's fingerprint (data, tokenizer, truncation, pairing, reference,
    dtype) and the split's row count offline; online, a hash of the tokenized split's ids and lengths."""
    if isinstance(train_rows, SplitIndex):
        manifest = read_manifest(cfg.store.path)
        fingerprint = manifest.fingerprint if manifest is not None else {}
        return "store:" + sha256_text(fingerprint, train_rows.rows)[:16]
    ids = train_rows["id"].to_numpy(zero_copy_only=False).astype(np.int64)
    lengths = row_lengths(train_rows).astype(np.int64)
    return "rows:" + sha256_text(ids.tobytes().hex(), lengths.tobytes().hex())[:16]


def build_run_state(
    cfg: KTOConfig, train_rows: SplitIndex | pa.Table, global_batch: int, total_steps: int, lam_d: float
) -> dict[str, Any]:
    """The state this start's checkpoints carry: the values resume_check.KEYS compares, the global
    batch, the run's total steps, and the whole resolved config (for the line naming what changed)."""
    cfg = with_absolute_paths(cfg)
    return {
        "version": STATE_VERSION,
        "train_rows": _rows_identity(cfg, train_rows),
        "model": _model_identity(cfg),
        "desirable_weight": round(float(lam_d), 12),
        "global_batch": global_batch,
        "total_steps": total_steps,
        "config": cfg.model_dump(mode="json"),
    }


def whole_checkpoint(run_dir: RunDir, name: str, say=print) -> str:
    """`name`, or when its files are not all there at their sizes (a LIST each; the checksums are the
    workers' to check as they load), the newest older checkpoint that is whole, said in one line as
    the workers will resume from it. None whole: `CheckpointsDamaged`, exit 2."""
    names = [name, *older_than(name, run_dir.checkpoint_names())]
    first = None
    for candidate in names:
        problem = size_problem(run_dir.join(CHECKPOINTS, candidate))
        if problem is None:
            if first is not None:
                say(
                    f"{damage_line(name, first)}, resuming from step {checkpoint_step(candidate)}", flush=True
                )
            return candidate
        first = first or problem
    raise CheckpointsDamaged(
        f"{damage_line(name, first)} and no older checkpoint of {run_dir} is whole ({len(names)} checked): "
        "`kto-ray verify` lists what is wrong; a new run.name starts over"
    )


def latest_checkpoint(run_dir: RunDir) -> str | None:
    """The checkpoint Ray Train hands a rerun: the latest one it registered, read by Ray's own
    checkpoint manager (`ray.train.Result.from_path`, what the controller resumes from); None when it
    registered none. Folders it never registered (a partial upload, a copy) are never resumed."""
    import ray.train

    location = run_dir.join(CHECKPOINTS)
    try:
        result = ray.train.Result.from_path(location.path, storage_filesystem=location.fs)
    except RuntimeError:  # no such folder, or no checkpoint registered in it: a fresh run
        return None
    except Exception as err:  # e.g. a registered checkpoint's folder deleted: Ray's controller stops too
        where = run_dir.child(CHECKPOINTS)
        raise UserError(
            f"Ray Train cannot resume {where} ({first_line(err)}); a new run.name starts over"
        ) from None
    checkpoint = result.checkpoint
    return None if checkpoint is None else checkpoint.path.rstrip("/").rsplit("/", 1)[-1]


def saved_state(run_dir: RunDir) -> SavedCheckpoint | None:
    """The checkpoint of `run_dir` a rerun resumes (the latest registered, or the newest whole one
    before it when it is damaged) and its run state; None for a fresh run."""
    name = latest_checkpoint(run_dir)
    if name is None:
        return None
    name = whole_checkpoint(run_dir, name)
    text = read_text(run_dir.join(CHECKPOINTS, name, RUN_STATE_FILE))
    if text is None:  # every checkpoint kto-ray writes has one, listed in its file list
        raise UserError(
            f"{run_dir.child(CHECKPOINTS, name)} has no {RUN_STATE_FILE}: not a checkpoint of this kto-ray; "
            "a new run.name starts over"
        )
    try:
        state = json.loads(text)
    except ValueError as err:
        raise UserError(f"{run_dir.child(CHECKPOINTS, name, RUN_STATE_FILE)} cannot be read: {err}") from None
    if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
        raise UserError(
            f"{run_dir.child(CHECKPOINTS, name, RUN_STATE_FILE)} is not a run state this kto-ray reads "
            f"(version {state.get('version') if isinstance(state, dict) else None}, expected {STATE_VERSION})"
        )
    return SavedCheckpoint(name, state)
