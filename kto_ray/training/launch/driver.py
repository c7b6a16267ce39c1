"""Stage 2 on the driver: check the store, size the run, launch the Ray Train TorchTrainer.

Offline, the workers get an index of the store's splits (a few bytes per row, `store/reader.py`) and
each reads its own micro-batches' rows from the store, so the store must be where every worker can
read it (object storage or a shared mount). Online there is no store: the driver tokenizes the data
and hands the table to the workers through the object store.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from kto_ray.config import KTOConfig, dump_config, with_absolute_paths
from kto_ray.data.prepare import prepare_text, tokenize_rows
from kto_ray.errors import UserError
from kto_ray.models.loading import check_context_length, load_tokenizer
from kto_ray.objective import desirable_weight
from kto_ray.raycluster import ray_session
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.rundir.lease import Lease
from kto_ray.rundir.timings import TIMINGS_FILE, Timeline
from kto_ray.storage import endpoint_env
from kto_ray.store.check import checked_store
from kto_ray.store.format import SCHEMA
from kto_ray.store.reader import SplitIndex
from kto_ray.training.launch.failures import interrupted, stopped_line, storage_errors
from kto_ray.training.launch.placement import Ask, placement_notices
from kto_ray.training.launch.progress import TrainingProgress
from kto_ray.training.launch.tracking import prepare_tracking
from kto_ray.training.resume.checkpoint_files import checkpoint_step
from kto_ray.training.resume.global_batch import check_worker_range
from kto_ray.training.resume.resume_check import compare
from kto_ray.training.resume.run_state import build_run_state, saved_state
from kto_ray.training.resume.stage import auto_plan, resolve_release, resolve_stage, stage_of_checkpoint
from kto_ray.training.resume.store_pin import pin_store
from kto_ray.training.schedule.loop_config import LoopConfig

log = logging.getLogger(__name__)

Rows = SplitIndex | pa.Table  # a split as the workers get it: see split_rows


@dataclass(frozen=True)
class TrainResult:
    run_dir: RunDir
    steps: int
    metrics: dict


def split_rows(cfg: KTOConfig, splits: tuple[str, ...]) -> dict[str, Rows]:
    """What the workers train on: an index of each split of the checked store (offline: nothing
    O(dataset) on the driver or in the object store), or online the tokenized tables (no log-probs)."""
    if cfg.reference.mode == "offline":
        check_context_length(cfg.model, cfg.data.max_length)
        store = checked_store(cfg, load_tokenizer(cfg.model))
        return {split: SplitIndex.build(store, split) for split in splits}
    tokenizer = load_tokenizer(cfg.model)
    check_context_length(cfg.model, cfg.data.max_length)
    text = prepare_text(cfg, tokenizer)
    columns = tokenize_rows(
        text.table.to_pydict(), tokenizer, cfg.data.max_length, cfg.data.max_prompt_length
    )
    nan = [float("nan")] * len(columns["id"])
    columns.update(ref_logps=nan, ref_kl_logps=nan)
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)
    return {split: table.filter(pa.compute.equal(table["split"], split)) for split in splits}


def row_count(rows: Rows) -> int:
    return rows.rows if isinstance(rows, SplitIndex) else len(rows)


def row_labels(rows: Rows) -> np.ndarray:
    return rows.labels if isinstance(rows, SplitIndex) else rows["label"].to_numpy(zero_copy_only=False)


def total_steps(cfg: KTOConfig, rows: int, global_batch: int | None = None) -> int:
    """Optimizer steps of the run: train.max_steps, or train.epochs of `global_batch`-row steps (the
    first start's global batch by default)."""
    global_batch = global_batch or cfg.first_global_batch
    if rows // global_batch == 0:
        raise UserError(
            f"{rows} training rows cannot fill one step of {global_batch} rows "
            "(train.global_batch_size, or null: the most cluster.workers x train.micro_batch_size)"
        )
    return cfg.train.max_steps or cfg.train.epochs * (rows // global_batch)


def train(cfg: KTOConfig) -> TrainResult:
    """Check the store (or tokenize, online), size the run, check a rerun against the run state of the
    checkpoint it resumes (`resume_check.py`), and fit it on Ray Train."""
    timeline = Timeline()
    timeline.mark("imports, config")
    run_dir = RunDir.of(cfg)
    with storage_errors(run_dir, "read"):
        saved = saved_state(run_dir)
    # A resumed run keeps its global batch (the contract); a fresh one fixes it now.
    resumed = saved is not None
    global_batch = saved.state["global_batch"] if resumed else cfg.first_global_batch
    try:
        check_worker_range(global_batch, cfg.cluster.worker_range, cfg.train.micro_batch_size)
    except UserError as err:
        if not resumed:
            raise
        raise UserError(f"{err} (the run's global batch, kept from {saved.name})") from None
    rows = split_rows(cfg, ("train", "eval") if cfg.train.evaluates else ("train",))
    timeline.mark("store checked, rows indexed")
    train_rows = rows["train"]
    steps = total_steps(cfg, row_count(train_rows), global_batch)
    lam_d = desirable_weight(cfg, row_labels(train_rows))
    if cfg.train.loss == "apo_zero_unpaired":
        warnings.warn(
            "train.loss: apo_zero_unpaired fixes z0 at 0 and skips the KL forward: not the paper's KTO "
            "(the same only while the mean policy/reference log-ratio is negative)",
            stacklevel=2,
        )
    if resumed and cfg.deepspeed.stage == "auto":
        cfg = stage_of_checkpoint(cfg, saved.name, saved.state)
    state = build_run_state(cfg, train_rows, global_batch, steps, lam_d)
    if resumed and (changes := compare(saved.name, saved.state, state)):
        print(changes, flush=True)
    launched = time.time()
    result = fit(
        cfg,
        train_rows,
        steps,
        lam_d,
        eval_rows=rows.get("eval"),
        global_batch=global_batch,
        run_state=state,
        checked=(saved.name, saved.state) if resumed else None,
        timeline=timeline,
    )
    if resumed:
        _say_workers_fallback(run_dir, checkpoint_step(saved.name) or 0, launched)
    return result


def _say_workers_fallback(run_dir: RunDir, predicted: int, since: float) -> None:
    """The workers resumed from an earlier step than the driver predicted: the checkpoint's checksums
    (which only they compute) showed damage its sizes did not. Said once the run is done."""
    from kto_ray.rundir.worker_groups import read_groups

    with contextlib.suppress(Exception):  # the history is informative only
        groups = [g for g in read_groups(run_dir) if (g.started_at or 0) >= since]
        if groups and groups[0].start_step is not None and groups[0].start_step < predicted:
            print(
                f"checkpoint step {predicted} was damaged (its checksums differ: `kto-ray verify "
                f"{run_dir}` names the file); the workers resumed from step {groups[0].start_step}",
                flush=True,
            )


def fit(
    cfg: KTOConfig,
    train_rows: Rows,
    steps: int,
    lam_d: float,
    eval_rows: Rows | None = None,
    global_batch: int | None = None,
    run_state: dict | None = None,
    checked: tuple[str, dict] | None = None,
    timeline: Timeline | None = None,
) -> TrainResult:
    """Launch the TorchTrainer on `train_rows` for `steps` optimizer steps of `global_batch` rows (the
    first start's by default); every checkpoint carries `run_state` (built here when not given: benches
    call fit directly); with `train.eval_every` or `eval_at_end`, the workers also evaluate on
    `eval_rows`. `timeline` gets the driver's phases, written to `timings.json`."""
    import ray

    timeline = timeline or Timeline()
    cfg = with_absolute_paths(cfg)
    global_batch = global_batch or cfg.first_global_batch
    check_worker_range(global_batch, cfg.cluster.worker_range, cfg.train.micro_batch_size)
    run_state = run_state or build_run_state(cfg, train_rows, global_batch, steps, lam_d)
    if cfg.train.evaluates and (eval_rows is None or row_count(eval_rows) == 0):
        asked = "train.eval_every" if cfg.train.eval_every else "train.eval_at_end"
        raise UserError(
            f"{asked} is set but the eval split is empty: raise data.eval_fraction "
            f"or set {asked}: {'null' if cfg.train.eval_every else 'false'}"
        )
    run_dir = RunDir.of(cfg)
    # Before anything is launched: a tracker that cannot start fails here, in one line.
    tracking_env = prepare_tracking(cfg.run.report_to, run_dir.folder)
    # One live run per run dir: a second `train` with the same run.name refuses in one line.
    with storage_errors(run_dir):
        lease = Lease(run_dir.location, "training run").acquire()
    try:
        with storage_errors(run_dir):
            pin_store(cfg, run_dir)  # a resume after the store changed (an append) refuses here
        timeline.mark("trackers, lease, store pin")
        # A worker group the cluster can never place is refused here; an autoscaling one is waited for.
        with ray_session(cfg.cluster.address), placement_notices(Ask.of(cfg)):
            timeline.mark("ray connected, placement checked")
            # The auto settings become the planner's picks (one plan, which may read the cluster's memory).
            # The run state records the stage that ran but keeps release_host_memory auto, so a resume
            # is not told it changed.
            planned = auto_plan(cfg)
            cfg, stage = resolve_stage(cfg, planned)
            run_state["config"]["deepspeed"] = cfg.deepspeed.model_dump(mode="json")
            cfg, release = resolve_release(cfg, planned)
            with storage_errors(run_dir):
                run_dir.write_text("config.yaml", dump_config(cfg))
            print(
                f"training {cfg.model.path} on {row_count(train_rows)} rows for {steps} steps "
                f"({_workers_text(cfg.cluster.worker_range)}, {global_batch} rows per step, "
                f"{stage}{release}, reference {cfg.reference.mode}) -> {run_dir}",
                flush=True,
            )
            loop = LoopConfig(
                config=cfg,
                train_rows=_shipped(train_rows),
                eval_rows=_shipped(eval_rows) if cfg.train.evaluates else None,
                total_steps=steps,
                global_batch=global_batch,
                desirable_weight=lam_d,
                run_state=run_state,
                checked=checked,
                tracking_env=tracking_env,
                storage_env=endpoint_env(),
            )
            progress = TrainingProgress(run_dir, steps, cfg.train.log_every)
            timeline.mark("stage resolved, config written")
            try:
                with progress:
                    result = _trainer(cfg, loop).fit()
                timeline.mark("trainer fit (workers: timings-rank0.json)")
            except (KeyboardInterrupt, SystemExit):
                # Ray Train's own SIGINT handler (registered by `fit` on the main thread) aborts the
                # controller and raises SystemExit(0) here; before it is registered, Ctrl-C is a
                # KeyboardInterrupt. Either way: the one line, exit 130.
                raise interrupted(run_dir) from None
            except ray.train.TrainingFailedError as err:
                if (stopped := stopped_line(err, run_dir, progress.shown)) is None:
                    raise
                raise stopped from None
            timeline.mark("progress closed")
        timeline.mark("ray shut down")
    finally:
        lease.release()
    timeline.mark("lease released")
    with storage_errors(run_dir):
        run_dir.write_text(TIMINGS_FILE, timeline.as_json())
    return TrainResult(run_dir, steps, dict(result.metrics or {}))


def _workers_text(worker_range: tuple[int, int]) -> str:
    low, high = worker_range
    return f"{low} worker{'s' if low != 1 else ''}" if low == high else f"{low}-{high} workers"


def _shipped(rows: Rows):
    """An index travels in the loop config itself (a few bytes per row); a table once through the
    object store."""
    import ray

    return rows if isinstance(rows, SplitIndex) else ray.put(rows)


def _trainer(cfg: KTOConfig, loop: LoopConfig):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from kto_ray.training.worker import train_loop

    return TorchTrainer(
        train_loop,
        train_loop_config=loop.as_train_loop_config(),
        scaling_config=_scaling(cfg),
        run_config=RunConfig(
            name=CHECKPOINTS,
            **RunDir.of(cfg).ray_storage(),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )


def _scaling(cfg: KTOConfig):
    """A fixed group, or with a range Ray Train's elastic one: it starts with as many workers as the
    cluster holds (at least the minimum), restarts on those that remain when one is lost, and grows
    once nodes join; each (re)start resumes from the last checkpoint, reshaped to the group's size."""
    from ray.train import ScalingConfig

    low, high = cfg.cluster.worker_range
    return ScalingConfig(
        num_workers=high if low == high else (low, high),
        elastic_resize_monitor_interval_s=cfg.cluster.resize_interval_s,
        use_gpu=cfg.cluster.use_gpu,
        resources_per_worker=cfg.cluster.worker_bundle,
        placement_strategy=cfg.cluster.placement_strategy,
    )
