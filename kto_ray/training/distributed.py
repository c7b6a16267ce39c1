"""Collectives of the training step. The loss module stays pure: these results are passed into it."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from kto_ray.internals.deepspeed_private import import_deepspeed, skip_shm_comm_op
from kto_ray.objective import mean_from_sum

Reduce = Callable[[torch.Tensor], torch.Tensor]
T = TypeVar("T")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity without a process group); returns a new tensor."""
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class GlobalKL(NamedTuple):
    z0: torch.Tensor  # max(0, raw): the reference point the loss uses
    raw: torch.Tensor  # the global mean log-ratio of the KL pairs, before the clamp (`kl/raw`)
    count: torch.Tensor  # KL pairs over all ranks (one per row)


def global_kl(kl_sum: torch.Tensor, kl_count: int, reduce: Reduce) -> GlobalKL:
    """z0, the unclamped estimate and the KL-pair count over every rank's KL pairs, from ONE `reduce` of
    [sum, count]. A collective: a rank without KL pairs calls it with a zero sum and count."""
    totals = reduce(torch.stack([kl_sum.float(), torch.tensor(float(kl_count), device=kl_sum.device)]))
    raw = mean_from_sum(totals[0], totals[1])
    return GlobalKL(raw.clamp(min=0.0), raw, totals[1])


def most_over_ranks(count: int, bound: int, reduce: Reduce, device: torch.device | str = "cpu") -> int:
    """The largest `count` of any rank (0 <= count <= `bound`, the same bound on every rank), from ONE
    `reduce` (a sum) of a histogram of the counts. A collective: every rank calls it."""
    if not 0 <= count <= bound:
        raise ValueError(f"count {count} is outside 0..{bound}")
    histogram = torch.zeros(bound + 1, dtype=torch.float32, device=device)
    histogram[count] = 1.0
    return int(torch.nonzero(reduce(histogram)).max())


def evened_out(
    micro_batches: list[T], filler: T, bound: int, reduce: Reduce, device: torch.device | str
) -> list[T]:
    """`micro_batches` followed by `filler`s up to the most micro-batches any rank has (at most `bound`,
    the same on every rank). Under ZeRO-3 every forward and backward gathers parameters, so all ranks
    must run the same number; the caller drops what the fillers (always last) compute. A collective."""
    most = most_over_ranks(len(micro_batches), bound, reduce, device)
    return [*micro_batches, *[filler] * (most - len(micro_batches))]


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gathered_state(
    model: torch.nn.Module, rank: int, trainable_only: bool = False
) -> dict[str, torch.Tensor]:
    """The model's parameters (with `trainable_only`, those that train) gathered from their ZeRO-3
    partitions one at a time, as CPU copies on rank 0 (empty elsewhere). A collective."""
    import deepspeed

    state: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        if trainable_only and not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True).contiguous()
    return state


def init_deepspeed_comm(use_gpu: bool) -> None:
    """DeepSpeed's communication backend over the process group Ray Train made. On CPU, DeepSpeed
    would JIT-build (tens of seconds on a fresh node, a ninja check and a load on every start after)
    and load its shared-memory all-reduce op; training never calls it, so it is marked unavailable."""
    deepspeed = import_deepspeed()
    if not use_gpu:
        skip_shm_comm_op(deepspeed)
    deepspeed.init_distributed()
