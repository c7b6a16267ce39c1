"""Evaluation during training: `kto-ray evaluate`'s metrics on the eval split, sharded over the ranks.

Separate from the loop so it runs with stand-ins (no Ray, no DeepSpeed). The split is sorted by length
(little padding), rank r takes rows r, r + world, ...; every rank then runs the SAME number of
micro-batches, because under ZeRO-3 a forward is a collective: a rank with fewer runs the split's
shortest row in their place, its results dropped (`distributed.evened_out`).
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from kto_ray.models.logprobs import DEFAULT_CHUNK_TOKENS, sequence_logps
from kto_ray.objective import EVAL_KEYS, KTOSums
from kto_ray.store.format import row_lengths
from kto_ray.training.distributed import Reduce, evened_out, global_kl
from kto_ray.training.schedule.batching import collate
from kto_ray.training.step import LossSettings, ReferenceFn


def shard_batches(rank: int, world: int, micro_batch_size: int, lengths: np.ndarray) -> list:
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
    batches = shard_batches(rank, world, micro_batch_size, lengths)
    real = len(batches)
    filler = np.array([int(np.argmin(lengths))])  # the split's shortest row
    batches = evened_out(batches, filler, most_batches(len(table), world, micro_batch_size), reduce, device)
    # This rank's real rows; starting empty, so a rank without rows adds zeros.
    policy, ref = [torch.zeros(0, device=device)], [torch.zeros(0, device=device)]
    desirable = [torch.zeros(0, dtype=torch.bool, device=device)]
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    was_training = model.training
    model.eval()  # no dropout: the same numbers `kto-ray evaluate` gets from the exported model
    try:
        for k, rows in enumerate(batches):
            # Collated as it is scored: the shard never sits on the device whole.
            mb = collate(table, rows, pad_id, packed).to(device)
            ref_y, ref_kl = reference(mb) if reference is not None else (mb.ref_logps, mb.ref_kl_logps)
            logps = sequence_logps(model, mb.policy, chunk_tokens).float()
            kl_logps = sequence_logps(model, mb.kl, chunk_tokens).float()
            if k < real:  # the rest are fillers, run for their forwards only
                policy.append(logps)
                ref.append(ref_y.float())
                desirable.append(mb.desirable)
                kl_sum += (kl_logps - ref_kl.float()).sum()
    finally:
        model.train(was_training)
    policy, ref, desirable = torch.cat(policy), torch.cat(ref), torch.cat(desirable)
    z0, kl_raw, _ = global_kl(kl_sum, len(desirable), reduce)
    sums = KTOSums.zeros(device)
    sums.add(settings.loss(policy, ref, desirable, z0), policy, ref, desirable, z0)
    return sums.reduce(reduce).to_metrics(z0.item(), EVAL_KEYS, kl_raw=kl_raw.item())
