"""Stage 2 on the driver: check the store, size the run, launch the Ray Train TorchTrainer.

The driver reads the store's train split (token ids and two floats per row) once, and the eval split
when `train.eval_every` is set, and hands them to the workers through the object store, so workers need
no access to the store's file system. It also checks `run.report_to`'s trackers before launching.
"""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from dataclasses import dataclass

import pyarrow as pa

from kto_ray.config import KTOConfig, dump_config, with_absolute_paths
from kto_ray.console import TrainingProgress
from kto_ray.data.prepare import checked_store, prepare_text, tokenize_rows
from kto_ray.errors import TrainingStopped, UserError
from kto_ray.lease import Lease
from kto_ray.models.loading import check_context_length, load_tokenizer
from kto_ray.raycluster import ray_session
from kto_ray.reference.store import SCHEMA, StorageError
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.storage import first_line
from kto_ray.training.batching import Schedule
from kto_ray.training.tracking import prepare_tracking

log = logging.getLogger(__name__)

# Failures a worker raises on purpose, each naming its step: a non-finite loss, a checkpoint write.
_NON_FINITE = re.compile(r"(step \d+: non-finite [^\n]*)")
_CHECKPOINT_WRITE = re.compile(r"(step \d+: the checkpoint \S+ could not be written [^\n]*)")


@dataclass(frozen=True)
class TrainResult:
    run_dir: RunDir
    steps: int
    metrics: dict


def train_table(cfg: KTOConfig, split: str = "train") -> pa.Table:
    """The rows to train on: from the checked store (offline) or tokenized here (online, no log-probs)."""
    return split_tables(cfg, (split,))[split]


def split_tables(cfg: KTOConfig, splits: tuple[str, ...]) -> dict[str, pa.Table]:
    """`train_table` of several splits, checking the store (or tokenizing) once for all of them."""
    tokenizer = load_tokenizer(cfg.model)
    check_context_length(cfg.model, cfg.data.max_length)
    if cfg.reference.mode == "offline":
        # The store holds everything training needs (ids, labels, splits, log-probs): the raw data is
        # only re-read when its files' stats no longer match the ones the store recorded.
        store = checked_store(cfg, tokenizer)
        return {split: store.read_split(split) for split in splits}
    text = prepare_text(cfg, tokenizer)
    columns = tokenize_rows(
        text.table.to_pydict(), tokenizer, cfg.data.max_length, cfg.data.max_prompt_length
    )
    nan = [float("nan")] * len(columns["id"])
    columns.update(ref_logps=nan, ref_kl_logps=nan)
    table = pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)
    return {split: table.filter(pa.compute.equal(table["split"], split)) for split in splits}


def desirable_weight(cfg: KTOConfig, table: pa.Table, warn: bool = True) -> float:
    """lambda_D, from the config or (`auto`) from the label counts; warns outside the paper's range."""
    n_desirable = int(pa.compute.sum(table["label"]).as_py() or 0)
    n_undesirable = len(table) - n_desirable
    lam_u = cfg.train.undesirable_weight
    if cfg.train.desirable_weight == "auto":
        return lam_u * n_undesirable / n_desirable if n_desirable and n_undesirable else 1.0
    lam_d = float(cfg.train.desirable_weight)
    if warn and n_desirable and n_undesirable:
        ratio = lam_d * n_desirable / (lam_u * n_undesirable)
        if not 1.0 <= ratio <= 4 / 3:
            warnings.warn(
                f"lambda_D n_D / (lambda_U n_U) = {ratio:.2f} is outside the paper's [1, 4/3] "
                f"({n_desirable} desirable, {n_undesirable} undesirable rows); "
                "consider train.desirable_weight: auto",
                stacklevel=2,
            )
    return lam_d


def total_steps(cfg: KTOConfig, rows: int) -> int:
    schedule = Schedule(rows, cfg.cluster.workers, cfg.train.micro_batch_size, cfg.train.grad_accumulation, 0)
    if schedule.steps_per_epoch == 0:
        raise UserError(
            f"{rows} training rows cannot fill one step of {schedule.rows_per_step} rows "
            "(cluster.workers x train.micro_batch_size x train.grad_accumulation)"
        )
    return cfg.train.max_steps or cfg.train.epochs * schedule.steps_per_epoch


def train(cfg: KTOConfig) -> TrainResult:
    """Check the store (or tokenize, online), size the run and fit it on Ray Train."""
    tables = split_tables(cfg, ("train", "eval") if cfg.train.eval_every else ("train",))
    table = tables["train"]
    steps = total_steps(cfg, len(table))
    return fit(cfg, table, steps, desirable_weight(cfg, table), eval_table=tables.get("eval"))


def fit(
    cfg: KTOConfig, table: pa.Table, steps: int, lam_d: float, eval_table: pa.Table | None = None
) -> TrainResult:
    """Launch the TorchTrainer on `table` (store columns) for `steps` optimizer steps; with
    `train.eval_every`, the workers also evaluate on `eval_table` (the store's eval split)."""
    import ray

    cfg = with_absolute_paths(cfg)
    if cfg.train.eval_every and (eval_table is None or len(eval_table) == 0):
        raise UserError(
            "train.eval_every is set but the eval split is empty: raise data.eval_fraction "
            "or set train.eval_every: null"
        )
    run_dir = cfg.run_dir
    # Before anything is launched: a tracker that cannot start fails here, in one line.
    tracking_env = prepare_tracking(cfg.run.report_to, run_dir.folder)
    # One live run per run dir: a second `train` with the same run.name refuses in one line.
    with _storage_errors(run_dir):
        lease = Lease(run_dir.location, "training run").acquire()
    try:
        with _storage_errors(run_dir):
            run_dir.write_text("config.yaml", dump_config(cfg))
        print(
            f"training {cfg.model.path} on {len(table)} rows for {steps} steps "
            f"({cfg.cluster.workers} workers, ZeRO-{cfg.deepspeed.stage}, reference {cfg.reference.mode})"
            f" -> {run_dir}",
            flush=True,
        )
        with ray_session(cfg.cluster.address):
            loop_config = {
                "config": cfg.model_dump(mode="json"),
                "table": ray.put(table),
                "eval_table": ray.put(eval_table) if cfg.train.eval_every else None,
                # MLFLOW_* / WANDB_*, resolved: workers of a joined cluster do not get the driver's env.
                "tracking_env": tracking_env,
                "total_steps": steps,
                "desirable_weight": lam_d,
            }
            try:
                with TrainingProgress(run_dir, steps, cfg.train.log_every):
                    result = _trainer(cfg, loop_config).fit()
            except ray.train.TrainingFailedError as err:
                stopped = _stopped_by_non_finite(err, run_dir) or _stopped_by_storage(err, run_dir)
                if stopped is None:
                    raise
                raise stopped from None
    finally:
        lease.release()
    return TrainResult(run_dir, steps, dict(result.metrics or {}))


def _trainer(cfg: KTOConfig, loop_config: dict):
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from kto_ray.training.worker import train_loop

    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.cluster.workers,
            use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker}
            | ({"GPU": 1} if cfg.cluster.use_gpu else {}),
            placement_strategy=cfg.cluster.placement_strategy,
        ),
        run_config=RunConfig(
            name=CHECKPOINTS,
            **cfg.run_dir.ray_storage(),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
        ),
    )


@contextlib.contextmanager
def _storage_errors(run_dir: RunDir):
    """The run dir's storage failing outside the workers (config, lease): one line naming it."""
    try:
        yield
    except OSError as err:
        raise StorageError(f"cannot write the run dir {run_dir}: {first_line(err)}") from None


def _worker_failure(err: Exception, pattern: re.Pattern) -> re.Match | None:
    failures = getattr(err, "worker_failures", {}) or {}
    found = (pattern.search(str(e)) for e in [err, *failures.values()])
    return next((m for m in found if m), None)


def _stopped_by_storage(err: Exception, run_dir: RunDir) -> StorageError | None:
    """A checkpoint that could not be written, as one line naming the step and the run dir."""
    match = _worker_failure(err, _CHECKPOINT_WRITE)
    if match is None:
        return None
    return StorageError(
        f"training stopped at {match.group(1)} (run dir {run_dir}); rerun to resume once the storage "
        "is reachable"
    )


def _stopped_by_non_finite(err: Exception, run_dir: RunDir) -> TrainingStopped | None:
    """A worker's NonFiniteError as one line naming the step and the checkpoint a rerun resumes from."""
    match = _worker_failure(err, _NON_FINITE)
    if match is None:
        return None
    saved = run_dir.checkpoint_names()
    last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
    return TrainingStopped(
        f"training stopped at {match.group(1)}; nothing after it was saved and {last}. "
        "Lower train.lr or check the data, then rerun to resume."
    )
