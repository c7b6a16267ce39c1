"""The KTO objective (DESIGN.md, "The math"): the loss as pure functions on tensors, z0 from sums, the
metrics as additive sums, and lambda_D. No model, no process group: the distributed z0
(`kto_ray.training.distributed.global_kl`) and the metrics' reduce function are passed in.

    r         = logp_policy(x, y) - logp_ref(x, y)              (summed completion log-probs)
    z0        = max(0, mean of logp_policy - logp_ref over the mismatched KL pairs), detached
    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))

`KTOSums` is the one definition of the metrics for the training step, eval during training and
`kto-ray evaluate` (DESIGN.md, "The run dir contract"): sums, not means, so a result does not depend on
how rows were split over micro-batches and ranks (a rank without rows adds zeros). When a class has no
row in the global batch or split, its `rewards/<class>` and `logps/<class>` are 0.0, and so are
`rewards/margins` and `logps/margin` (a margin against a class with no rows means nothing); `loss` and
`reward_accuracy` are over all rows, 0.0 when there are none. Implied-reward accuracy counts a desirable
row when r > z0, an undesirable one when r < z0, a tie r = z0 half. `aux_loss` (MoE training steps,
`kto_ray/models/moe.py`) is the mean over rows of their micro-batch's router load-balancing loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from kto_ray.config import KTOConfig


@dataclass(frozen=True)
class KTOLossOutput:
    """Per-row losses and implied rewards (beta * r), plus their mean loss."""

    losses: torch.Tensor
    loss: torch.Tensor
    rewards: torch.Tensor


def completion_logps(
    logits: torch.Tensor, input_ids: torch.Tensor, completion_mask: torch.Tensor
) -> torch.Tensor:
    """Sum of log p(token | prefix) over the completion tokens of each row.

    logits: [B, T, V] from a causal LM over `input_ids` [B, T]; completion_mask: [B, T], 1 where the
    token at that position belongs to the completion. Position t's token is predicted by logits[t-1].
    """
    logits = logits[:, :-1, :]
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least
    targets = input_ids[:, 1:]
    mask = completion_mask[:, 1:].to(logits.dtype)
    # gather - logsumexp keeps no [B, T, V] log-softmax tensor alive beyond the logits themselves.
    token_logps = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token_logps * mask).sum(dim=-1)


def kl_raw(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The KL estimate before the clamp: mean of the KL-pair log-ratios, detached (0 if empty). Logged
    as `kl/raw` beside z0, so a clamp at 0 can be told from a policy equal to its reference."""
    ratios = (policy_kl_logps - ref_kl_logps).detach().float()
    return mean_from_sum(ratios.sum(), ratios.numel())


def mean_from_sum(ratio_sum: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Unclamped mean from a sum and a count (the form an all-reduce produces); 0 for no pairs."""
    count = torch.as_tensor(count, dtype=torch.float32, device=ratio_sum.device)
    return ratio_sum.detach().float() / count.clamp(min=1.0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    z0: torch.Tensor | float,
    *,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> KTOLossOutput:
    """KTO loss of each row (Ethayarajh et al. 2024, eq. 8), as TRL and HALOs compute it; finite for
    one-class and empty batches (the mean of no rows is 0)."""
    log_ratio = policy_logps.float() - ref_logps.float()
    z0 = torch.as_tensor(z0, dtype=log_ratio.dtype, device=log_ratio.device).detach()
    desirable = desirable.to(device=log_ratio.device, dtype=torch.bool)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - log_ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    loss = losses.sum() / max(losses.numel(), 1)
    return KTOLossOutput(losses=losses, loss=loss, rewards=(beta * log_ratio).detach())


# What a training step reports (TRL's names; `grad_norm` comes from the engine), in this order.
TRAIN_KEYS = (
    "loss",
    "kl",
    "kl/raw",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "count/chosen",
    "count/rejected",
    "grad_norm",
    "tokens",
    "rows",
)
# What `kto-ray evaluate` and eval during training report, in this order.
EVAL_KEYS = (
    "rows",
    "loss",
    "kl",
    "kl/raw",
    "reward_accuracy",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "logps/margin",
)


@dataclass
class KTOSums:
    """Sums over rows (float32 scalar tensors on one device); `chosen` = desirable rows."""

    loss: torch.Tensor
    accuracy: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    tokens: torch.Tensor
    aux_loss: torch.Tensor  # sum over micro-batches of (load-balancing loss x rows)

    @classmethod
    def zeros(cls, device: torch.device | str = "cpu") -> KTOSums:
        return cls.from_stacked(torch.zeros(len(fields(cls)), dtype=torch.float32, device=device))

    @classmethod
    def from_stacked(cls, values: torch.Tensor) -> KTOSums:
        return cls(*values.unbind())

    def stacked(self) -> torch.Tensor:
        return torch.stack([getattr(self, f.name) for f in fields(self)])

    def add(
        self,
        out: KTOLossOutput,
        policy_logps: torch.Tensor,
        ref_logps: torch.Tensor,
        desirable: torch.Tensor,
        z0: torch.Tensor | float,
        tokens: torch.Tensor | int = 0,
        aux_loss: torch.Tensor | None = None,
    ) -> None:
        """Accumulate one micro-batch: `out` is `kto_loss` of these rows at `z0`; `tokens` its padded
        sequence tokens (policy and KL), when counted; `aux_loss` its router load-balancing loss."""
        policy = policy_logps.detach().float()
        log_ratio = policy - ref_logps.detach().float()
        z0 = torch.as_tensor(z0, dtype=log_ratio.dtype, device=log_ratio.device).detach()
        chosen = desirable.to(device=policy.device, dtype=torch.bool)
        rejected = ~chosen
        signed = torch.where(chosen, log_ratio - z0, z0 - log_ratio)
        rewards = out.rewards.detach().float()
        added = torch.stack(
            [
                out.losses.detach().float().sum(),
                ((signed > 0).float() + 0.5 * (signed == 0).float()).sum(),
                chosen.sum().float(),
                rejected.sum().float(),
                rewards[chosen].sum(),
                rewards[rejected].sum(),
                policy[chosen].sum(),
                policy[rejected].sum(),
                torch.as_tensor(tokens, device=policy.device).float(),
                torch.zeros((), device=policy.device)
                if aux_loss is None
                else aux_loss.detach().float().to(policy.device) * len(policy),
            ]
        )
        for f, value in zip(fields(self), (self.stacked() + added).unbind()):
            setattr(self, f.name, value)

    def reduce(self, reduce_fn: Callable[[torch.Tensor], torch.Tensor]) -> KTOSums:
        """The sums over all ranks: ONE call of `reduce_fn` (a collective: every rank must call it)."""
        return KTOSums.from_stacked(reduce_fn(self.stacked()))

    def to_metrics(
        self, kl: float, keys: Sequence[str] = EVAL_KEYS, kl_raw: float | None = None, **others: float
    ) -> dict[str, float]:
        """The metrics named in `keys`, in that order; `kl` is z0 and `kl_raw` the mean KL-pair
        log-ratio before z0's clamp at 0 (`kl` itself when not given), `others` the ones not made from
        sums (the training step's `grad_norm`)."""
        s = dict(zip((f.name for f in fields(self)), self.stacked().tolist()))
        rows = s["chosen"] + s["rejected"]
        both = s["chosen"] > 0 and s["rejected"] > 0

        def mean(total: float, count: float) -> float:
            return total / count if count else 0.0

        rewards = mean(s["chosen_rewards"], s["chosen"]), mean(s["rejected_rewards"], s["rejected"])
        logps = mean(s["chosen_logps"], s["chosen"]), mean(s["rejected_logps"], s["rejected"])
        metrics = {
            "rows": int(rows),
            "loss": mean(s["loss"], rows),
            "kl": kl,
            "kl/raw": kl if kl_raw is None else kl_raw,
            "reward_accuracy": mean(s["accuracy"], rows),
            "rewards/chosen": rewards[0],
            "rewards/rejected": rewards[1],
            "rewards/margins": rewards[0] - rewards[1] if both else 0.0,
            "logps/chosen": logps[0],
            "logps/rejected": logps[1],
            "logps/margin": logps[0] - logps[1] if both else 0.0,
            "count/chosen": int(s["chosen"]),
            "count/rejected": int(s["rejected"]),
            "tokens": int(s["tokens"]),
            "aux_loss": mean(s["aux_loss"], rows),
            **others,
        }
        return {key: metrics[key] for key in keys}


def desirable_weight(cfg: KTOConfig, labels: np.ndarray, warn: bool = True) -> float:
    """lambda_D, from the config or (`auto`) from the label counts; warns outside the paper's range."""
    n_desirable = int(np.count_nonzero(labels))
    n_undesirable = len(labels) - n_desirable
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
