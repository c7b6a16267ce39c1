"""One KTO optimizer step, separate from the loop so it can run with stand-ins (no Ray, no DeepSpeed).

For the global batch of one optimizer step (all workers, all accumulation micro-batches):
1. policy log-probs of the mismatched (x, y_kl) pairs without gradients, on every micro-batch;
2. one all-reduce of [KL sum, KL count] gives the exact global z0 and row count (`distributed.global_kl`);
3. per micro-batch: policy log-probs of (x, y) with gradients, KTO loss from `kto_ray.objective`, backward;
   for an MoE model with `router_aux`, this pass also adds `router_aux_loss_coef x aux_loss` (the
   family's load-balancing loss of this forward's router logits, `kto_ray.models.moe`), per row;
4. the engine steps (clip, optimizer, scheduler) once the accumulation boundary is reached;
5. one all-reduce of the metric sums (`kto_ray.objective.KTOSums`).
With token-budget micro-batches (training/schedule/token_budget.py) ranks bring different numbers of
micro-batches: `distributed.evened_out` agrees on the most, and a rank with fewer runs its `filler` row
in their place through both passes (a zero loss), its results dropped.
The backward loss is sum(local row losses) / global rows * world size: DeepSpeed averages gradients over
ranks, so the result is the gradient of the mean loss over the global batch, however rows are split. The
aux term counts once per row of its micro-batch, so it too is a mean over the global batch's rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from kto_ray.internals.deepspeed_private import begin_micro_step
from kto_ray.models.logprobs import DEFAULT_CHUNK_TOKENS, sequence_logps, sequence_logps_and_router_logits
from kto_ray.models.moe import RouterAux
from kto_ray.models.packing import PackedBatch
from kto_ray.objective import TRAIN_KEYS, KTOLossOutput, KTOSums, kto_loss
from kto_ray.training.distributed import Reduce, evened_out, global_kl
from kto_ray.training.schedule.batching import KTOBatch

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
    """`kto_loss`'s keyword arguments, by their names."""

    beta: float
    desirable_weight: float
    undesirable_weight: float

    def loss(
        self, policy_logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, z0: torch.Tensor
    ) -> KTOLossOutput:
        """`kto_loss` of these rows with these settings (the step, eval and `evaluate` alike)."""
        return kto_loss(policy_logps, ref_logps, desirable, z0, **asdict(self))


class NonFiniteError(RuntimeError):
    """The loss or gradient norm became NaN/inf: the step must not be checkpointed."""


def train_step(
    engine: Engine,
    micro_batches: Sequence[KTOBatch],
    settings: LossSettings,
    reduce: Reduce,
    world_size: int,
    reference: ReferenceFn | None = None,
    device: torch.device | str = "cpu",
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    estimate_kl: bool = True,
    router_aux: RouterAux | None = None,
    filler: KTOBatch | None = None,
) -> dict[str, float]:
    """Run one optimizer step over this rank's micro-batches; returns global metrics (TRL's names, and
    `aux_loss` with `router_aux`). `chunk_tokens` is `sequence_logps`'s chunking. Without `estimate_kl`
    (`train.loss: apo_zero_unpaired`) the KL forward is skipped and z0 is 0: the all-reduce still runs,
    on a zero sum, so the collectives are the same either way."""
    micro_batches = [mb.to(device) for mb in micro_batches]
    real, rows = len(micro_batches), sum(len(mb) for mb in micro_batches)
    if filler is not None:  # every rank has `rows` rows, so at most `rows` micro-batches
        micro_batches = evened_out(micro_batches, filler.to(device), rows, reduce, device)
    ref_logps, kl_sum = _kl_pass(
        engine.module, micro_batches, reference, chunk_tokens, device, estimate_kl, real
    )
    z0, kl_raw, global_rows = global_kl(kl_sum, rows, reduce)
    sums = KTOSums.zeros(device)
    for k, (mb, ref_y) in enumerate(zip(micro_batches, ref_logps)):
        _begin_forward(engine, last=k == len(micro_batches) - 1)
        aux = None
        if router_aux is None:
            policy = sequence_logps(engine.module, mb.policy, chunk_tokens)
        else:
            policy, router_logits = sequence_logps_and_router_logits(engine.module, mb.policy, chunk_tokens)
            # A packed policy batch with router logits runs padded.
            padded = mb.policy.padded() if isinstance(mb.policy, PackedBatch) else mb.policy
            aux = router_aux(router_logits, padded.attention_mask)
        out = settings.loss(policy, ref_y, mb.desirable, z0)
        loss_sum = out.losses.sum()
        if aux is not None:
            loss_sum = loss_sum + router_aux.coef * aux * len(mb)
        if k >= real:  # a filler: zero loss and zero gradient, only in step with the other ranks
            loss_sum = loss_sum * 0.0
        _check_finite_on_every_rank(loss_sum, reduce, world_size)
        engine.backward(loss_sum / global_rows * world_size, scale_wrt_gas=False)
        engine.step()
        if k < real:
            tokens = mb.policy.tokens + (mb.kl.tokens if estimate_kl else 0)  # what its forwards ran on
            sums.add(out, policy, ref_y, mb.desirable, z0, tokens=tokens, aux_loss=aux)
    grad_norm = _checked_grad_norm(engine)
    keys = TRAIN_KEYS if router_aux is None else (*TRAIN_KEYS, "aux_loss")
    return sums.reduce(reduce).to_metrics(z0.item(), keys, kl_raw=kl_raw.item(), grad_norm=grad_norm)


@torch.no_grad()
def _kl_pass(
    module: torch.nn.Module,
    micro_batches: Sequence[KTOBatch],
    reference: ReferenceFn | None,
    chunk_tokens: int | None,
    device: torch.device | str,
    estimate_kl: bool,
    real: int,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Reference log-probs of (x, y) per micro-batch and this rank's sum of KL-pair log-ratios (0
    without `estimate_kl`) over the first `real` micro-batches (the rest are fillers, run for their
    forwards only)."""
    ref_logps = []
    kl_sum = torch.zeros((), dtype=torch.float32, device=device)
    for k, mb in enumerate(micro_batches):
        ref_y, ref_kl = reference(mb) if reference is not None else (mb.ref_logps, mb.ref_kl_logps)
        ref_logps.append(ref_y.float())
        if estimate_kl:
            log_ratios = sequence_logps(module, mb.kl, chunk_tokens) - ref_kl.float()
            if k < real:
                kl_sum += log_ratios.sum()
    return ref_logps, kl_sum


def _begin_forward(engine: Engine, last: bool) -> None:
    """What DeepSpeed's `engine.forward` does first: its ZeRO optimizer counts the micro-step there
    (ZeRO-3 copies the first micro-batch's gradient into its partition and adds the later ones by that
    count). The log-probs call the module itself (the chunked head needs the decoder), so without this
    every backward of an accumulated step overwrote the ones before it. Then the accumulation boundary:
    `last` (this rank's last micro-batch), as token-budget micro-batches do not keep to DeepSpeed's count."""
    begin_micro_step(engine)
    boundary = getattr(engine, "set_gradient_accumulation_boundary", None)
    if boundary is not None:
        boundary(last)


def _check_finite_on_every_rank(loss_sum: torch.Tensor, reduce: Reduce, world_size: int) -> None:
    # Collective check: a rank that stopped alone would leave the others waiting in backward.
    non_finite = reduce((~torch.isfinite(loss_sum.detach())).float().reshape(1))
    if non_finite.item() > 0:
        raise NonFiniteError(f"non-finite loss on {int(non_finite.item())} of {world_size} ranks")


def _checked_grad_norm(engine: Engine) -> float:
    """The step's global gradient norm (NaN when the engine has none); raises when it is not finite."""
    norm = engine.get_global_grad_norm()
    grad_norm = float("nan") if norm is None else float(norm)
    if norm is not None and not math.isfinite(grad_norm):
        raise NonFiniteError(f"non-finite gradient norm ({grad_norm})")
    return grad_norm
