"""Evaluation during training: `kto-ray evaluate`'s metrics on the eval split, sharded over the ranks.

Separate from the loop so it runs with stand-ins (a plain module, gloo process groups; no Ray, no
DeepSpeed). The split is sorted by length (little padding), rank r takes rows r, r + world, ...;
every rank then runs the SAME number of micro-batches, because under ZeRO-3 a forward is a collective
(each layer's parameters are all-gathered): a rank with fewer rows runs a dummy micro-batch (one real
row whose results are dropped) rather than skip a forward its peers are waiting in. The collectives
are fixed too: one all-reduce of [KL sum, count] for the global z0 (as the training step), one of the
metric sums; a rank without rows contributes zeros.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import torch

from kto_ray.loss import kto_loss, z0_from_sum
from kto_ray.models.logprobs import DEFAULT_CHUNK_TOKENS, sequence_logps
from kto_ray.reference.store import sequence_lengths
from kto_ray.training.batching import collate
from kto_ray.training.distributed import Reduce
from kto_ray.training.step import LossSettings, ReferenceFn

# Index of each global sum in the metrics all-reduce.
_SUMS = (
    "loss",
    "accuracy",
    "chosen_rewards",
    "rejected_rewards",
    "chosen_logps",
    "rejected_logps",
    "chosen",
    "rejected",
)


def shard_batches(rows: int, rank: int, world: int, micro_batch_size: int, lengths: np.ndarray) -> list:
    """Row indices of `rank`'s eval micro-batches; the same count on every rank (some may be empty)."""
    order = np.argsort(-lengths, kind="stable")  # longest first: similar lengths share a micro-batch
    shard = order[rank::world]
    per_rank = math.ceil(rows / world)  # the largest shard: every rank runs its number of batches
    count = math.ceil(per_rank / micro_batch_size)
    return [shard[i * micro_batch_size : (i + 1) * micro_batch_size] for i in range(count)]


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
) -> dict[str, float]:
    """Global eval metrics (the keys and values of `kto_ray.tools.evaluate.evaluate`) of `model` on
    `table`; every rank must call it with the same table. Restores the model's train/eval mode."""
    if len(table) == 0:
        raise ValueError("the eval split is empty")
    was_training = model.training
    model.eval()  # no dropout: the same numbers `kto-ray evaluate` gets from the exported model
    try:
        policy, ref, desirable = [], [], []
        kl_sum = torch.zeros((), dtype=torch.float32, device=device)
        kl_count = 0
        for rows in shard_batches(len(table), rank, world, micro_batch_size, sequence_lengths(table)):
            real = len(rows)
            mb = collate(table, rows if real else np.zeros(1, dtype=np.int64), pad_id).to(device)
            ref_y, ref_kl = reference(mb) if reference is not None else (mb.ref_logps, mb.ref_kl_logps)
            logps = sequence_logps(model, mb.policy, chunk_tokens).float()
            kl_logps = sequence_logps(model, mb.kl, chunk_tokens).float()
            if real:  # a dummy batch only keeps the forwards in step with the other ranks
                policy.append(logps)
                ref.append(ref_y.float())
                desirable.append(mb.desirable)
                kl_sum += (kl_logps - ref_kl.float()).sum()
                kl_count += real
    finally:
        model.train(was_training)
    totals = reduce(torch.stack([kl_sum, torch.tensor(float(kl_count), device=device)]))
    z0 = z0_from_sum(totals[0], totals[1])

    sums = torch.zeros(len(_SUMS), dtype=torch.float32, device=device)
    if policy:
        logps, ref_logps, labels = torch.cat(policy), torch.cat(ref), torch.cat(desirable)
        out = kto_loss(
            logps,
            ref_logps,
            labels,
            z0,
            beta=settings.beta,
            desirable_weight=settings.desirable_weight,
            undesirable_weight=settings.undesirable_weight,
        )
        # Implied-reward accuracy as evaluate: desirable above the reference point, undesirable below.
        r = logps - ref_logps
        signed = torch.where(labels, r - z0, z0 - r)
        chosen, rejected = labels, ~labels
        sums += torch.stack(
            [
                out.losses.sum(),
                ((signed > 0).float() + 0.5 * (signed == 0).float()).sum(),
                out.rewards[chosen].sum(),
                out.rewards[rejected].sum(),
                logps[chosen].sum(),
                logps[rejected].sum(),
                chosen.sum().float(),
                rejected.sum().float(),
            ]
        )
    g = dict(zip(_SUMS, reduce(sums).tolist()))
    rows = g["chosen"] + g["rejected"]

    def mean(key: str, count: str) -> float:
        return g[key] / g[count] if g[count] else 0.0

    both = g["chosen"] > 0 and g["rejected"] > 0
    return {
        "rows": int(rows),
        "loss": g["loss"] / rows,
        "kl": z0.item(),
        "reward_accuracy": g["accuracy"] / rows,
        "rewards/chosen": mean("chosen_rewards", "chosen"),
        "rewards/rejected": mean("rejected_rewards", "rejected"),
        "rewards/margins": mean("chosen_rewards", "chosen") - mean("rejected_rewards", "rejected")
        if both
        else 0.0,
        "logps/chosen": mean("chosen_logps", "chosen"),
        "logps/rejected": mean("rejected_logps", "rejected"),
        "logps/margin": mean("chosen_logps", "chosen") - mean("rejected_logps", "rejected") if both else 0.0,
    }
