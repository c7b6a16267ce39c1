"""The Ray Train worker loop: build the DeepSpeed engine, restore, step, log, checkpoint, export.

Everything a worker needs arrives in the loop config (the validated config as a dict, the train split
as a store index or, online, a table's object ref, the step count), never through globals or the
ambient environment. Each worker reads only its own micro-batches' rows, the next step's while the
current one computes.
"""

from __future__ import annotations

import json
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
from kto_ray.models.loading import hidden_size_of, load_tokenizer
from kto_ray.reference.reader import RowReader, SplitIndex
from kto_ray.rundir import WORKERS_FILE, RunDir
from kto_ray.training.batching import Schedule, collate
from kto_ray.training.checkpoint import restore, save_and_report
from kto_ray.training.distributed import all_reduce_sum, gather_objects
from kto_ray.training.engine import build_policy_engine, deepspeed_config, export_final, online_reference
from kto_ray.training.eval_step import eval_metrics
from kto_ray.training.metrics import MetricsLog
from kto_ray.training.rows import TableRows
from kto_ray.training.step import LossSettings, NonFiniteError, train_step
from kto_ray.training.tracking import start_trackers


def _device(cfg: KTOConfig) -> torch.device:
    if cfg.cluster.use_gpu:
        return torch.device("cuda", ray.train.torch.get_device().index or 0)
    return torch.device("cpu")


def _open_rows(source, cfg: KTOConfig, world: int) -> tuple[RowReader | TableRows, Schedule]:
    """This worker's view of the train split and the step schedule over it: a store index, read by
    row group (offline), or a table the driver put in the object store (online)."""
    train = cfg.train
    settings = (world, train.micro_batch_size, train.grad_accumulation, train.seed, train.group_by_length)
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
    }


def train_loop(loop_config: dict[str, Any]) -> None:
    import deepspeed

    cfg = KTOConfig.model_validate(loop_config["config"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(cfg.train.seed + rank)
    deepspeed.init_distributed()
    device = _device(cfg)

    os.environ.update(loop_config.get("storage_env") or {})  # before the store is opened here
    reader, schedule = _open_rows(loop_config["train_rows"], cfg, world)
    total_steps = loop_config["total_steps"]
    tokenizer = load_tokenizer(cfg.model)
    hidden_size = hidden_size_of(cfg.model)
    engine = build_policy_engine(cfg, deepspeed_config(cfg, world, hidden_size=hidden_size), total_steps)
    reference = online_reference(cfg, engine, world)  # with LoRA: the policy, adapters disabled

    start_step = restore(engine, rank)
    placement = gather_objects(_where_am_i(rank))  # a collective: every rank
    if rank == 0:
        RunDir.of(cfg).write_text(WORKERS_FILE, json.dumps(placement, indent=2) + "\n")
    settings = LossSettings(cfg.train.beta, loop_config["desirable_weight"], cfg.train.undesirable_weight)
    log = MetricsLog(RunDir.of(cfg), start_step) if rank == 0 else None
    # train.eval_every: the whole eval split, on every rank (eval_metrics shards it over the ranks).
    eval_table = _whole(loop_config["eval_rows"]) if loop_config.get("eval_rows") is not None else None
    trackers = (
        start_trackers(
            cfg.run.report_to,
            loop_config["config"],
            RunDir.of(cfg).folder,
            start_step,
            loop_config["tracking_env"],
        )
        if rank == 0 and cfg.run.report_to
        else []
    )

    engine.train()
    last_checkpoint = start_step
    if start_step < total_steps:
        for rows in schedule.rows_for(start_step, rank):
            reader.prefetch(rows)
    for step in range(start_step, total_steps):
        began = time.perf_counter()
        learning_rate = engine.get_lr()[0]  # the rate this step applies
        parts = [reader.take(rows) for rows in schedule.rows_for(step, rank)]
        if step + 1 < total_steps:  # read the next step's rows while this one computes
            for rows in schedule.rows_for(step + 1, rank):
                reader.prefetch(rows)
        batches = [collate(part, np.arange(len(part)), tokenizer.pad_token_id) for part in parts]
        try:
            metrics = train_step(
                engine,
                batches,
                settings,
                all_reduce_sum,
                world,
                reference,
                device,
                chunk_tokens=cfg.model.logprob_chunk_tokens,
            )
        except NonFiniteError as err:
            raise NonFiniteError(f"step {step + 1}: {err}") from None
        seconds = time.perf_counter() - began
        metrics.update(
            {
                "step": step + 1,
                "epoch": step // schedule.steps_per_epoch,
                "learning_rate": learning_rate,
                "step_time": seconds,
                "samples/s": metrics["rows"] / seconds,
                "tokens/s": metrics["tokens"] / seconds,
            }
        )
        if eval_table is not None and ((step + 1) % cfg.train.eval_every == 0 or step + 1 == total_steps):
            # Every rank, the same forwards (ZeRO-3); z0 over the whole eval split; after the update.
            scores = eval_metrics(
                engine.module,
                eval_table,
                rank,
                world,
                cfg.train.micro_batch_size,
                tokenizer.pad_token_id,
                settings,
                all_reduce_sum,
                reference,
                device,
                chunk_tokens=cfg.model.logprob_chunk_tokens,
            )
            metrics.update({f"eval/{key}": value for key, value in scores.items()})
        if log is not None:
            log.write(metrics)
        for tracker in trackers:  # rank 0 only: live, the same record as metrics.jsonl
            tracker.log(step + 1, metrics)
        if (step + 1) % cfg.run.checkpoint_every == 0 or step + 1 == total_steps:
            save_and_report(engine, step + 1, rank, metrics, previous=last_checkpoint)
            last_checkpoint = step + 1

    reader.close()
    for tracker in trackers:
        tracker.finish()
    if cfg.run.export:
        export_final(engine, tokenizer, cfg, rank)  # the full model, or the LoRA adapter (+ merged)
