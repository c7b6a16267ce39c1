"""Collectives of the training step. The loss module stays pure: these results are passed into it."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

Reduce = Callable[[torch.Tensor], torch.Tensor]


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over all ranks (identity without a process group); returns a new tensor."""
    out = tensor.detach().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_objects(obj: object) -> list[object]:
    """Every rank's `obj`, in rank order (just `[obj]` without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
