"""One KTO optimizer step, separate from the loop so it can run with stand-ins (no Ray, no DeepSpeed).

For the global batch of one optimizer step (all workers, all accumulation micro-batches):
1. policy log-probs of the mismatched (x, y_kl) pairs without gradients, on every micro-batch;
2. one all-reduce of [KL sum, KL count, rows] gives the exact global z0 and row count;
3. per micro-batch: policy log-probs of (x, y) with gradients, KTO loss from `kto_ray.loss`, backward;
4. the engine steps (clip, optimizer, scheduler) once the accumulation boundary is reached.
The backward loss is sum(local row losses) / global rows * world size: DeepSpeed averages gradients over
ranks, so the result is the gradient of the mean loss over the global batch, however rows are split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from kto_ray.loss import kto_loss, z0_from_sum
from kto_ray.models.logprobs import DEFAULT_CHUNK_TOKENS, PaddedBatch, sequence_logps
from kto_ray.training.batching import KTOBatch
from kto_ray.training.distributed import Reduce

# (micro-batch) -> (reference logps of (x, y), reference logps of (x, y_kl)), for the online mode.
ReferenceFn = Callable[[KTOBatch], tuple[torch.Tensor, torch.Tensor]]


class Engine(Protocol):
    """What the step needs of a DeepSpeed engine (a plain module + optimizer stand-in works too)."""

    module: torch.nn.Module

    def backward(self, loss: torch.Tensor, scale_wrt_gas: bool = ...) -> None: ...
    def step(self) -> None: ...
    def get_global_grad_norm(self) -> float | None: ...


@dataclass(frozen=True)
class LossSettings:
    beta: float
    desirable_weight: float
    undesirable_weight: float


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf: the step must not be checkpointed."""


# Index of each global sum in the metrics all-reduce.
_SUMS = (
    "loss",
    "chosen_rewards",
    "rejected_rewards",
    "chosen_logps",
    "rejected_logps",
    "chosen",
    "rejected",
    "tokens",
)


def train_step(
    engine: Engine,
    micro_batches: Sequence[KTOBatch],
    settings: LossSettings,
    reduce: Reduce,
    world_size: int,
    reference: ReferenceFn | None = None,
    device: torch.device | str = "cpu",
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> dict[str, float]:
    """Run one optimizer step over this rank's micro-batches; returns global metrics (TRL's names).

    `chunk_tokens` is the log-prob chunking of `kto_ray.models.logprobs.sequence_logps`."""

    def policy_logps(batch: PaddedBatch) -> torch.Tensor:
        return sequence_logps(engine.module, batch, chunk_tokens)

    micro_batches = [mb.to(device) for mb in micro_batches]
    ref_logps: list[torch.Tensor] = []
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    kl_count = 0
    with torch.no_grad():
        for mb in micro_batches:
            ref_y, ref_kl = reference(mb) if reference is not None else (mb.ref_logps, mb.ref_kl_logps)
            ref_logps.append(ref_y.float())
            kl_sum += (policy_logps(mb.kl) - ref_kl.float()).sum()
            kl_count += len(mb)
    totals = reduce(torch.stack([kl_sum, torch.tensor(float(kl_count), device=device)]))
    z0 = z0_from_sum(totals[0], totals[1])
    global_rows = totals[1]

    sums = torch.zeros(len(_SUMS), dtype=torch.float32, device=device)
    for mb, ref_y in zip(micro_batches, ref_logps):
        policy = policy_logps(mb.policy)
        out = kto_loss(
            policy,
            ref_y,
            mb.desirable,
            z0,
            beta=settings.beta,
            desirable_weight=settings.desirable_weight,
            undesirable_weight=settings.undesirable_weight,
        )
        loss_sum = out.losses.sum()
        # Collective check: a rank that stopped alone would leave the others waiting in backward.
        non_finite = reduce((~torch.isfinite(loss_sum.detach())).float().reshape(1))
        if non_finite.item() > 0:
            raise NonFiniteError(f"non-finite loss on {int(non_finite.item())} of {world_size} ranks")
        engine.backward(loss_sum / global_rows * world_size, scale_wrt_gas=False)
        engine.step()
        chosen, rejected = mb.desirable, ~mb.desirable
        sums += torch.stack(
            [
                loss_sum.detach(),
                out.rewards[chosen].sum(),
                out.rewards[rejected].sum(),
                policy.detach()[chosen].sum(),
                policy.detach()[rejected].sum(),
                chosen.sum().float(),
                rejected.sum().float(),
                mb.policy.attention_mask.sum().float() + mb.kl.attention_mask.sum().float(),
            ]
        )
    norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if norm is None else float(norm)
    if norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm})")
    g = dict(zip(_SUMS, reduce(sums).tolist()))
    chosen_mean = g["chosen_rewards"] / g["chosen"] if g["chosen"] else 0.0
    rejected_mean = g["rejected_rewards"] / g["rejected"] if g["rejected"] else 0.0
    return {
        "loss": g["loss"] / max(global_rows.item(), 1.0),
        "kl": z0.item(),
        "rewards/chosen": chosen_mean,
        "rewards/rejected": rejected_mean,
        "rewards/margins": chosen_mean - rejected_mean,
        "logps/chosen": g["chosen_logps"] / g["chosen"] if g["chosen"] else 0.0,
        "logps/rejected": g["rejected_logps"] / g["rejected"] if g["rejected"] else 0.0,
        "count/chosen": int(g["chosen"]),
        "count/rejected": int(g["rejected"]),
        "grad_norm": grad_norm,
        "tokens": int(g["tokens"]),
        "rows": int(global_rows.item()),
    }
