"""KTO math as pure functions on tensors: no model, no process group (DESIGN.md, "The math").

    r         = logp_policy(x, y) - logp_ref(x, y)              (summed completion log-probs)
    z0        = max(0, mean of logp_policy - logp_ref over the mismatched KL pairs), detached
    desirable:   lambda_D * (1 - sigmoid(beta * (r - z0)))
    undesirable: lambda_U * (1 - sigmoid(beta * (z0 - r)))

The distributed z0 (one all-reduce of sum and count, `kto_ray.training.distributed.global_kl`) is
computed there and passed in; the metrics built from these outputs are in `kto_ray.kto_metrics`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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


def kl_z0(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """Reference point for one process: clamped mean of the KL-pair log-ratios, detached (0 if empty)."""
    return kl_raw(policy_kl_logps, ref_kl_logps).clamp(min=0.0)


def kl_raw(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """The KL estimate before the clamp: mean of the KL-pair log-ratios, detached (0 if empty). Logged
    as `kl/raw` beside z0, so a clamp at 0 can be told from a policy equal to its reference."""
    ratios = (policy_kl_logps - ref_kl_logps).detach().float()
    return mean_from_sum(ratios.sum(), ratios.numel())


def mean_from_sum(ratio_sum: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Unclamped mean from a sum and a count (the form an all-reduce produces); 0 for no pairs."""
    count = torch.as_tensor(count, dtype=torch.float32, device=ratio_sum.device)
    return ratio_sum.detach().float() / count.clamp(min=1.0)


def z0_from_sum(ratio_sum: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """Clamped mean from a sum and a count."""
    return mean_from_sum(ratio_sum, count).clamp(min=0.0)


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
    """KTO loss of each row (Ethayarajh et al. 2024, eq. 8), as TRL and HALOs compute it.

    Rows of either class may be absent: the result is finite for one-class and empty batches (the
    mean of no rows is 0).
    """
    log_ratio = policy_logps.float() - ref_logps.float()
    z0 = torch.as_tensor(z0, dtype=log_ratio.dtype, device=log_ratio.device).detach()
    desirable = desirable.to(device=log_ratio.device, dtype=torch.bool)
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (log_ratio - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - log_ratio)))
    losses = torch.where(desirable, desirable_losses, undesirable_losses)
    loss = losses.sum() / max(losses.numel(), 1)
    return KTOLossOutput(losses=losses, loss=loss, rewards=(beta * log_ratio).detach())
