"""The Ray Train worker loop: build the DeepSpeed engine, restore, step, log, checkpoint, export.

Everything a worker needs arrives in its LoopConfig (`training/schedule/loop_config.py`), never through
globals or the ambient environment. Each worker reads only its own micro-batches' rows, the next
step's while the current one computes. The clean-up `_setup` registers (rows closed, trackers finished,
as failed when a step raised) runs on every exit; the export follows a run that finished.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from dataclasses import dataclass
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


@dataclass
class WorkerRun:
    """One worker's run, as `_setup` built it: what the step loop reads."""

    loop: LoopConfig
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

    @property
    def cfg(self) -> KTOConfig:
        return self.loop.config

    def prefetch(self, step: int) -> None:
        for rows in self.schedule.rows_for(step, self.rank):
            self.reader.prefetch(rows)


def train_loop(train_loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker: the driver's LoopConfig, unwrapped here only."""
    flush_denormals()  # on this thread, before its first op starts the intra-op threads (denormals.py)
    timeline = Timeline()
    timeline.mark("worker start, imports")
    loop = LoopConfig.from_train_loop_config(train_loop_config)
    with contextlib.ExitStack() as teardown:
        run = _setup(loop, teardown, timeline)
        _train(run)
        timeline.mark(f"steps {run.start_step + 1}-{run.loop.total_steps} and their checkpoints")
    timeline.mark("rows closed, trackers finished")
    if run.cfg.run.export:
        export_final(run.engine, run.tokenizer, run.cfg, run.rank)  # the full model, or the LoRA adapter
        timeline.mark("final export")
    if run.rank == 0:
        RunDir.of(run.cfg).write_text(RANK0_TIMINGS_FILE, timeline.as_json())


def _setup(loop: LoopConfig, teardown: contextlib.ExitStack, timeline: Timeline) -> WorkerRun:
    """Everything the steps need, in order; what needs closing goes on `teardown` as soon as it is
    opened, so a failure half-way closes what was opened before it."""
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    cfg = loop.config
    accumulation_steps = accumulation(loop.global_batch, world, cfg.train.micro_batch_size)
    torch.manual_seed(cfg.train.seed + rank)
    if cfg.cluster.release_host_memory is True:  # the driver resolved auto (planning/host_release.py)
        host_memory.fix_malloc_thresholds()  # before the model loads: freed tensors leave RSS
    init_deepspeed_comm(cfg.cluster.use_gpu)
    timeline.mark("deepspeed import, comm backend")
    device = _device(cfg)
    teardown.push(_stop_together)  # first on, so last off: after every other clean-up

    os.environ.update(loop.storage_env)  # before the store is opened here
    reader, schedule = _open_rows(loop.train_rows, cfg, world, accumulation_steps)
    teardown.callback(reader.close)
    tokenizer = load_tokenizer(cfg.model)
    timeline.mark("rows opened, tokenizer")
    engine = build_policy_engine(
        cfg,
        deepspeed_config(cfg, world, hidden_size=hidden_size_of(cfg.model), accumulation=accumulation_steps),
        loop.total_steps,
    )
    reference = online_reference(cfg, engine, world)  # with LoRA: the policy, adapters disabled
    host_memory.release()  # what loading and DeepSpeed's set-up freed
    timeline.mark("model load, deepspeed engine")

    # reshaped if `world` changed; only a checkpoint under a run state the driver checked
    restored = restore(engine, rank, world, cfg.run.scratch_dir, loop.checked, loop.run_state)
    start_step = restored.step
    if start_step:  # this start's learning rate, schedule and optimizer settings, not the checkpoint's
        refresh_optimizer_settings(engine, cfg)
    timeline.mark("checkpoint restore")
    run_dir = RunDir.of(cfg)
    placement = gather_objects(_where_am_i(rank))  # a collective: every rank
    if rank == 0:  # this group's entry in the run's history of worker groups
        record_group(run_dir, start_step, placement)
    trackers: list[Tracker] = []
    if rank == 0 and cfg.run.report_to:
        config = cfg.model_dump(mode="json")
        started = started_trackers(cfg.run.report_to, config, run_dir.folder, start_step, loop.tracking_env)
        trackers = teardown.enter_context(started)
    timeline.mark("workers.json, trackers")
    return WorkerRun(
        loop=loop,
        rank=rank,
        world=world,
        device=device,
        tokenizer=tokenizer,
        engine=engine,
        reference=reference,
        reader=reader,
        schedule=schedule,
        settings=LossSettings(cfg.train.beta, loop.desirable_weight, cfg.train.undesirable_weight),
        start_step=start_step,
        damaged=restored.damaged,
        log=MetricsLog(run_dir, start_step) if rank == 0 else None,
        eval_table=_whole(loop.eval_rows) if loop.eval_rows is not None else None,
        trackers=trackers,
    )


def _stop_together(exc_type, _exc, _tb) -> None:
    """Every rank raises NonFiniteStep at the same step (the flag is all-reduced), and Ray Train stops
    the whole group at the first error it sees: so the ranks wait here for each other's clean-up (rank
    0's trackers) before raising. Only on NonFiniteStep: on another error some rank may never come
    (it died, or waits in a checkpoint report), and the ones here would wait for nothing."""
    if exc_type is not None and issubclass(exc_type, NonFiniteStep):
        gather_objects(None)  # a barrier


def _train(run: WorkerRun) -> None:
    """The steps from the restored one to the last: each logged, evaluated and checkpointed when due."""
    cfg, total_steps = run.cfg, run.loop.total_steps
    run.engine.train()
    last_checkpoint = run.start_step
    if run.start_step < total_steps:
        run.prefetch(run.start_step)
    for step in range(run.start_step, total_steps):
        done = step + 1
        metrics = _step(run, step)
        if cfg.cluster.release_host_memory is True:
            host_memory.release()  # the step's freed gathers and activations (host_memory.py)
        if run.eval_table is not None and cfg.train.evaluates_after(done, total_steps):
            metrics.update({f"eval/{key}": value for key, value in _evaluate(run).items()})
        if run.log is not None:
            run.log.write(metrics)
        for tracker in run.trackers:  # rank 0 only: live, the same record as metrics.jsonl
            tracker.log(done, metrics)
        if done % cfg.run.checkpoint_every == 0 or done == total_steps:
            save_and_report(
                run.engine,
                done,
                run.rank,
                metrics,
                last_checkpoint,
                run.loop.run_state,
                run_dir=RunDir.of(cfg),
                world=run.world,
                damaged=run.damaged,
            )
            last_checkpoint = done


def _step(run: WorkerRun, step: int) -> dict[str, Any]:
    """One optimizer step (0-based `step`) and its metrics record; raises NonFiniteStep naming it."""
    began = time.perf_counter()
    learning_rate = run.engine.get_lr()[0]  # the rate this step applies
    parts = [run.reader.take(rows) for rows in run.schedule.rows_for(step, run.rank)]
    if step + 1 < run.loop.total_steps:  # read the next step's rows while this one computes
        run.prefetch(step + 1)
    packed = run.cfg.model.packs(mixed_lengths=not run.cfg.train.group_by_length)
    pad_id = run.tokenizer.pad_token_id
    budget, filler = run.cfg.train.micro_batch_tokens, None
    if budget is None:
        batches = [collate(part, np.arange(len(part)), pad_id, packed) for part in parts]
    else:  # the same rows, re-cut by tokens (training/schedule/token_budget.py)
        batches, filler = budget_batches(pa.concat_tables(parts), budget, pad_id, packed)
    try:
        metrics = train_step(
            run.engine,
            batches,
            run.settings,
            all_reduce_sum,
            run.world,
            run.reference,
            run.device,
            chunk_tokens=run.cfg.model.logprob_chunk_tokens,
            estimate_kl=run.cfg.train.loss == "kto",
            router_aux=router_aux(run.engine.module) if run.cfg.train.router_aux_loss else None,
            filler=filler,
        )
    except NonFiniteError as err:
        raise NonFiniteStep(step + 1, str(err)) from None
    seconds = time.perf_counter() - began
    metrics.update(
        {
            "step": step + 1,
            "epoch": step // run.schedule.steps_per_epoch,
            "learning_rate": learning_rate,
            "step_time": seconds,
            "samples/s": metrics["rows"] / seconds,
            "tokens/s": metrics["tokens"] / seconds,
        }
    )
    return metrics


def _evaluate(run: WorkerRun) -> dict[str, float]:
    """The eval split's metrics after this step's update (eval_step.py)."""
    return eval_metrics(
        run.engine.module,
        run.eval_table,
        run.rank,
        run.world,
        run.cfg.train.micro_batch_size,
        run.tokenizer.pad_token_id,
        run.settings,
        all_reduce_sum,
        run.reference,
        run.device,
        chunk_tokens=run.cfg.model.logprob_chunk_tokens,
        packed=run.cfg.model.packs(mixed_lengths=False),  # eval shards are sorted by length
    )
