"""The Ray Train worker: a `Trainer` that builds the DeepSpeed engine, restores, steps, logs, checkpoints
and exports.

Everything a worker needs arrives in its LoopConfig (`training/schedule/loop_config.py`), never through
globals or the ambient environment. Each worker reads only its own micro-batches' rows, the next
step's while the current one computes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import ray.train
import torch

from kto_ray.config import KTOConfig
from kto_ray.errors import NonFiniteStep
from kto_ray.models.denormals import denormals_flushed, flush_denormals
from kto_ray.models.loading import hidden_size_of, load_tokenizer
from kto_ray.models.moe import router_aux
from kto_ray.rundir import RunDir
from kto_ray.rundir.metrics import MetricsLog
from kto_ray.rundir.timings import RANK0_TIMINGS_FILE, Timeline
from kto_ray.rundir.worker_groups import record_group
from kto_ray.store.reader import RowReader, SplitIndex
from kto_ray.training import host_memory
from kto_ray.training.distributed import all_reduce_sum, gather_objects, init_deepspeed_comm
from kto_ray.training.engine import (
    build_policy_engine,
    deepspeed_config,
    export_final,
    online_reference,
    refresh_optimizer_settings,
)
from kto_ray.training.eval_step import eval_metrics
from kto_ray.training.launch.tracking import Tracker, started_trackers
from kto_ray.training.resume.checkpoint import restore, save_and_report
from kto_ray.training.resume.global_batch import accumulation
from kto_ray.training.schedule.batching import Schedule, collate
from kto_ray.training.schedule.loop_config import LoopConfig
from kto_ray.training.schedule.rows import TableRows
from kto_ray.training.schedule.token_budget import budget_batches
from kto_ray.training.step import LossSettings, NonFiniteError, train_step


def _device(cfg: KTOConfig) -> torch.device:
    if cfg.cluster.use_gpu:
        return torch.device("cuda", ray.train.torch.get_device().index or 0)
    return torch.device("cpu")


def _open_rows(
    source, cfg: KTOConfig, world: int, accumulation_steps: int
) -> tuple[RowReader | TableRows, Schedule]:
    """This worker's view of the train split and the step schedule over it: a store index, read by
    row group (offline), or a table the driver put in the object store (online)."""
    train = cfg.train
    settings = (world, train.micro_batch_size, accumulation_steps, train.seed, train.group_by_length)
    if isinstance(source, SplitIndex):
        return RowReader(source), Schedule.for_index(source, *settings)
    table = ray.get(source)
    return TableRows(table), Schedule.for_table(table, *settings)


def _whole(source) -> pa.Table:
    """A whole split (the eval split): read from the store, or fetched from the object store."""
    if isinstance(source, SplitIndex):
        with RowReader(source) as reader:
            return reader.take(np.arange(source.rows))
    return ray.get(source)


def _where_am_i(rank: int) -> dict[str, Any]:
    context = ray.get_runtime_context()
    return {
        "rank": rank,
        "node_id": context.get_node_id(),
        "node_ip": ray.util.get_node_ip_address(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "gpus": [str(g) for g in context.get_accelerator_ids().get("GPU", [])],
        "denormals_flushed": denormals_flushed(),
    }


class Trainer:
    """One worker's training (torchtitan's `Trainer`, torchtune's recipe): the components below, which
    `setup` builds in the order they must be made; `train` runs the steps (`step`, then `evaluate` and
    `save` when due); `close` (or leaving `with`) closes what `setup` opened, in reverse order, on every
    exit: rows closed, trackers finished (as failed when a step raised); `finish` exports a finished run.
    """

    rank: int
    world: int
    device: torch.device
    tokenizer: Any
    engine: Any  # the DeepSpeed engine around the policy
    reference: Any  # the online reference model (None offline; with LoRA, the policy's own base)
    reader: RowReader | TableRows
    schedule: Schedule
    settings: LossSettings
    start_step: int  # optimizer steps already done (a restored checkpoint's)
    damaged: tuple[str, ...]  # damaged checkpoints the restore skipped: redone steps save beside them
    log: MetricsLog | None  # rank 0 only
    eval_table: pa.Table | None  # with train.eval_every or eval_at_end: the whole eval split, every rank
    trackers: list[Tracker]  # rank 0 only

    def __init__(self, loop: LoopConfig, timeline: Timeline):
        self.loop, self.cfg, self.timeline = loop, loop.config, timeline
        self.run_dir = RunDir.of(self.cfg)
        self._teardown = contextlib.ExitStack()

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        return self.close(exc_type, exc, tb)

    def setup(self) -> None:
        """Every component, in order; what needs closing goes on the teardown as soon as it is opened, so
        a failure half-way closes what was opened before it."""
        loop, cfg, timeline, teardown = self.loop, self.cfg, self.timeline, self._teardown
        context = ray.train.get_context()
        self.rank, self.world = rank, world = context.get_world_rank(), context.get_world_size()
        accumulation_steps = accumulation(loop.global_batch, world, cfg.train.micro_batch_size)
        torch.manual_seed(cfg.train.seed + rank)
        if cfg.cluster.release_host_memory is True:  # the driver resolved auto (planning/host_release.py)
            host_memory.fix_malloc_thresholds()  # before the model loads: freed tensors leave RSS
        init_deepspeed_comm(cfg.cluster.use_gpu)
        timeline.mark("deepspeed import, comm backend")
        self.device = _device(cfg)
        teardown.push(_stop_together)  # first on, so last off: after every other clean-up

        os.environ.update(loop.storage_env)  # before the store is opened here
        self.reader, self.schedule = _open_rows(loop.train_rows, cfg, world, accumulation_steps)
        teardown.callback(self.reader.close)
        self.tokenizer = load_tokenizer(cfg.model)
        timeline.mark("rows opened, tokenizer")
        hidden_size = hidden_size_of(cfg.model)
        ds_config = deepspeed_config(cfg, world, hidden_size=hidden_size, accumulation=accumulation_steps)
        self.engine = build_policy_engine(cfg, ds_config, loop.total_steps)
        self.reference = online_reference(cfg, self.engine, world)  # with LoRA: the policy, adapters off
        host_memory.release()  # what loading and DeepSpeed's set-up freed
        timeline.mark("model load, deepspeed engine")

        # reshaped if `world` changed; only a checkpoint under a run state the driver checked
        restored = restore(self.engine, rank, world, cfg.run.scratch_dir, loop.checked, loop.run_state)
        self.start_step, self.damaged = restored.step, restored.damaged
        if (
            self.start_step
        ):  # this start's learning rate, schedule and optimizer settings, not the checkpoint's
            refresh_optimizer_settings(self.engine, cfg)
        timeline.mark("checkpoint restore")
        placement = gather_objects(_where_am_i(rank))  # a collective: every rank
        if rank == 0:  # this group's entry in the run's history of worker groups
            record_group(self.run_dir, self.start_step, placement)
        self.trackers = []
        if rank == 0 and cfg.run.report_to:
            config = cfg.model_dump(mode="json")
            folder, env = self.run_dir.folder, loop.tracking_env
            started = started_trackers(cfg.run.report_to, config, folder, self.start_step, env)
            self.trackers = teardown.enter_context(started)
        timeline.mark("workers.json, trackers")
        self.settings = LossSettings(cfg.train.beta, loop.desirable_weight, cfg.train.undesirable_weight)
        self.log = MetricsLog(self.run_dir, self.start_step) if rank == 0 else None
        self.eval_table = _whole(loop.eval_rows) if loop.eval_rows is not None else None

    def train(self) -> None:
        """The steps from the restored one to the last: each logged, evaluated and checkpointed when due."""
        cfg, total_steps = self.cfg, self.loop.total_steps
        self.engine.train()
        self._last_checkpoint = self.start_step
        if self.start_step < total_steps:
            self._prefetch(self.start_step)
        for step in range(self.start_step, total_steps):
            done = step + 1
            metrics = self.step(step)
            if cfg.cluster.release_host_memory is True:
                host_memory.release()  # the step's freed gathers and activations (host_memory.py)
            if self.eval_table is not None and cfg.train.evaluates_after(done, total_steps):
                metrics.update({f"eval/{key}": value for key, value in self.evaluate().items()})
            if self.log is not None:
                self.log.write(metrics)
            for tracker in self.trackers:  # rank 0 only: live, the same record as metrics.jsonl
                tracker.log(done, metrics)
            if done % cfg.run.checkpoint_every == 0 or done == total_steps:
                self.save(done, metrics)
        self.timeline.mark(f"steps {self.start_step + 1}-{total_steps} and their checkpoints")

    def step(self, step: int) -> dict[str, Any]:
        """One optimizer step (0-based `step`) and its metrics record; raises NonFiniteStep naming it."""
        cfg = self.cfg
        began = time.perf_counter()
        learning_rate = self.engine.get_lr()[0]  # the rate this step applies
        parts = [self.reader.take(rows) for rows in self.schedule.rows_for(step, self.rank)]
        if step + 1 < self.loop.total_steps:  # read the next step's rows while this one computes
            self._prefetch(step + 1)
        packed = cfg.model.packs(mixed_lengths=not cfg.train.group_by_length)
        pad_id = self.tokenizer.pad_token_id
        budget, filler = cfg.train.micro_batch_tokens, None
        if budget is None:
            batches = [collate(part, np.arange(len(part)), pad_id, packed) for part in parts]
        else:  # the same rows, re-cut by tokens (training/schedule/token_budget.py)
            batches, filler = budget_batches(pa.concat_tables(parts), budget, pad_id, packed)
        try:
            metrics = train_step(
                self.engine,
                batches,
                self.settings,
                all_reduce_sum,
                self.world,
                self.reference,
                self.device,
                chunk_tokens=cfg.model.logprob_chunk_tokens,
                estimate_kl=cfg.train.loss == "kto",
                router_aux=router_aux(self.engine.module) if cfg.train.router_aux_loss else None,
                filler=filler,
            )
        except NonFiniteError as err:
            raise NonFiniteStep(step + 1, str(err)) from None
        seconds = time.perf_counter() - began
        metrics.update(
            {
                "step": step + 1,
                "epoch": step // self.schedule.steps_per_epoch,
                "learning_rate": learning_rate,
                "step_time": seconds,
                "samples/s": metrics["rows"] / seconds,
                "tokens/s": metrics["tokens"] / seconds,
            }
        )
        return metrics

    def evaluate(self) -> dict[str, float]:
        """The eval split's metrics after this step's update (eval_step.py)."""
        return eval_metrics(
            self.engine.module,
            self.eval_table,
            self.rank,
            self.world,
            self.cfg.train.micro_batch_size,
            self.tokenizer.pad_token_id,
            self.settings,
            all_reduce_sum,
            self.reference,
            self.device,
            chunk_tokens=self.cfg.model.logprob_chunk_tokens,
            packed=self.cfg.model.packs(mixed_lengths=False),  # eval shards are sorted by length
        )

    def save(self, done: int, metrics: dict[str, Any]) -> None:
        """Checkpoint after `done` steps and report it to Ray Train (a collective: every rank)."""
        save_and_report(
            self.engine,
            done,
            self.rank,
            metrics,
            self._last_checkpoint,
            self.loop.run_state,
            run_dir=self.run_dir,
            world=self.world,
            damaged=self.damaged,
        )
        self._last_checkpoint = done

    def close(self, exc_type=None, exc=None, tb=None) -> bool:
        """Close what `setup` opened, in reverse order (told the exception a step raised, if any)."""
        suppressed = self._teardown.__exit__(exc_type, exc, tb)
        self.timeline.mark("rows closed, trackers finished")
        return suppressed

    def finish(self) -> None:
        """After a run that finished: the export (the full model, or the LoRA adapter), rank 0's timings."""
        if self.cfg.run.export:
            export_final(self.engine, self.tokenizer, self.cfg, self.rank)
            self.timeline.mark("final export")
        if self.rank == 0:
            self.run_dir.write_text(RANK0_TIMINGS_FILE, self.timeline.as_json())

    def _prefetch(self, step: int) -> None:
        for rows in self.schedule.rows_for(step, self.rank):
            self.reader.prefetch(rows)


def train_loop(train_loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: the driver's LoopConfig, unwrapped here only."""
    flush_denormals()  # on this thread, before its first op starts the intra-op threads (denormals.py)
    timeline = Timeline()
    timeline.mark("worker start, imports")
    with Trainer(LoopConfig.from_train_loop_config(train_loop_config), timeline) as trainer:
        trainer.setup()
        trainer.train()
    trainer.finish()


def _stop_together(exc_type, _exc, _tb) -> None:
    """Every rank raises NonFiniteStep at the same step (the flag is all-reduced), and Ray Train stops
    the whole group at the first error it sees: so the ranks wait here for each other's clean-up (rank
    0's trackers) before raising. Only on NonFiniteStep: on another error some rank may never come
    (it died, or waits in a checkpoint report), and the ones here would wait for nothing."""
    if exc_type is not None and issubclass(exc_type, NonFiniteStep):
        gather_objects(None)  # a barrier
