"""Evaluation during training: `kto-ray evaluate`'s metrics on the eval split, sharded over the ranks.

Separate from the loop so it runs with stand-ins (a plain module, gloo process groups; no Ray, no
DeepSpeed). The split is sorted by length (little padding), rank r takes rows r, r + world, ...;
every rank then runs the SAME number of micro-batches, because under ZeRO-3 a forward is a collective
(each layer's parameters are all-gathered): a rank with fewer runs the split's shortest row in their
place, its results dropped (`distributed.evened_out`, as the training step's token-budget fillers).
The other collectives are fixed: one all-reduce of [KL sum, count] for the global z0
(`distributed.global_kl`, as the training step), one of the metric sums (`kto_ray.objective.KTOSums`);
a rank without rows adds zeros.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from kto_ray.models.logprobs import DEFAULT_CHUNK_TOKENS, sequence_logps
from kto_ray.objective import EVAL_KEYS, KTOSums
from kto_ray.store.format import row_lengths
from kto_ray.training.distributed import Reduce, evened_out, global_kl
from kto_ray.training.schedule.batching import KTOBatch, collate
from kto_ray.training.step import LossSettings, ReferenceFn


def shard_batches(rows: int, rank: int, world: int, micro_batch_size: int, lengths: np.ndarray) -> list:
    """Row indices of `rank`'s eval micro-batches (none empty; the last may be short)."""
    order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a micro-batch
    shard = order[rank::world]
    return [shard[i : i + micro_batch_size] for i in range(0, len(shard), micro_batch_size)]


def most_batches(rows: int, world: int, micro_batch_size: int) -> int:
    """The micro-batches of the largest shard: no rank has more."""
    return math.ceil(math.ceil(rows / world) / micro_batch_size)


@torch.no_grad()
def eval_metrics(
    model: torch.nn.Module,
    table: pa.Table,
    rank: int,
    world: int,
    micro_batch_size: int,
    pad_id: int,
    settings: LossSettings,
    reduce: Reduce,
    reference: ReferenceFn | None = None,
    device: torch.device | str = "cpu",
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    packed: bool = False,
) -> dict[str, float]:
    """Global eval metrics (the keys and values of `kto_ray.tools.evaluate.evaluate`) of `model` on
    `table`; every rank must call it with the same table. Restores the model's train/eval mode."""
    if len(table) == 0:
        raise ValueError("the eval split is empty")
    lengths = row_lengths(table)
    batches = shard_batches(len(table), rank, world, micro_batch_size, lengths)
    real = len(batches)
    filler = np.array([int(np.argmin(lengths))])  # the split's shortest row
    batches = evened_out(batches, filler, most_batches(len(table), world, micro_batch_size), reduce, device)
    was_training = model.training
    model.eval()  # no dropout: the same numbers `kto-ray evaluate` gets from the exported model
    try:
        # Each micro-batch is collated as it is scored: the shard never sits on the device whole.
        scored = (collate(table, rows, pad_id, packed).to(device) for rows in batches)
        shard = _score_shard(model, scored, real, reference, device, chunk_tokens)
    finally:
        model.train(was_training)
    z0, kl_raw, _ = global_kl(shard.kl_sum, len(shard.desirable), reduce)
    out = settings.loss(shard.policy, shard.ref, shard.desirable, z0)
    sums = KTOSums.zeros(device)
    sums.add(out, shard.policy, shard.ref, shard.desirable, z0)  # a rank without rows adds zeros
    return sums.reduce(reduce).to_metrics(z0.item(), EVAL_KEYS, kl_raw=kl_raw.item())


@dataclass(frozen=True)
class _ShardScores:
    """One rank's real eval rows: policy and reference log-probs, labels, and its KL-pair log-ratio sum."""

    policy: torch.Tensor
    ref: torch.Tensor
    desirable: torch.Tensor
    kl_sum: torch.Tensor


def _score_shard(
    model: torch.nn.Module,
    batches: Iterable[KTOBatch],
    real: int,
    reference: ReferenceFn | None,
    device: torch.device | str,
    chunk_tokens: int | None,
) -> _ShardScores:
    """Scores of the first `real` micro-batches; the rest are fillers, run for their forwards only."""
    policy, ref, desirable = [], [], []
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    for k, mb in enumerate(batches):
        ref_y, ref_kl = reference(mb) if reference is not None else (mb.ref_logps, mb.ref_kl_logps)
        logps = sequence_logps(model, mb.policy, chunk_tokens).float()
        kl_logps = sequence_logps(model, mb.kl, chunk_tokens).float()
        if k < real:
            policy.append(logps)
            ref.append(ref_y.float())
            desirable.append(mb.desirable)
            kl_sum += (kl_logps - ref_kl.float()).sum()
    if not policy:
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        return _ShardScores(empty, empty, torch.zeros(0, dtype=torch.bool, device=device), kl_sum)
    return _ShardScores(torch.cat(policy), torch.cat(ref), torch.cat(desirable), kl_sum)
