"""Mixture-of-experts models: the router's load-balancing loss (as TRL's trainers add it, with
transformers' own `load_balancing_loss_func` of the family, called as the family's causal LM calls it)
and ZeRO-3's expert blocks.

ZeRO-3: in transformers 5.24 every MoE family keeps its experts as one fused module (3-D parameters,
no per-expert submodules) whose forward runs on every rank whatever the routing, so ZeRO-3 gathers the
same parameters in the same order on every rank. Flagging each block that owns `experts` as a ZeRO-3
leaf (`deepspeed.utils.set_z3_leaf_modules`, DeepSpeed's own default for Mixtral and Qwen2/3-MoE)
makes that hold for every family, also one with per-expert modules that only routed tokens reach.
"""

from __future__ import annotations

import functools
import inspect
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from kto_ray.models.heads import base_model

# How a family's causal LM calls its load-balancing function (mixtral, qwen2/3_moe, olmoe, ...).
_AUX_PARAMETERS = ("gate_logits", "num_experts", "top_k", "attention_mask")

_said: set[type] = set()


@dataclass(frozen=True)
class RouterAux:
    """The family's load-balancing loss and its coefficient (`router_aux_loss_coef`)."""

    loss_fn: Callable[..., torch.Tensor | int]
    num_experts: int
    top_k: int
    coef: float

    def __call__(self, router_logits: Sequence[torch.Tensor], attention_mask: torch.Tensor) -> torch.Tensor:
        """aux_loss (without the coefficient) of one forward's router logits (one tensor per layer)."""
        aux = self.loss_fn(tuple(router_logits), self.num_experts, self.top_k, attention_mask)
        return torch.as_tensor(aux, dtype=torch.float32, device=attention_mask.device)


def router_aux(model: torch.nn.Module) -> RouterAux | None:
    """The load-balancing loss to add on `model`'s policy pass: None when its config does not ask for
    router logits, or (said once) when its family has no load-balancing function kto-ray can call."""
    base = base_model(model)
    config = getattr(base, "config", None)
    if not getattr(config, "output_router_logits", False):
        return None
    loss_fn = _load_balancing_fn(type(base))
    num_experts = getattr(base, "num_experts", None)
    top_k = getattr(base, "num_experts_per_tok", None)
    if loss_fn is None or not isinstance(num_experts, int) or not isinstance(top_k, int):
        if type(base) not in _said:
            _said.add(type(base))
            warnings.warn(
                f"{type(base).__name__}: the config sets output_router_logits, but transformers has no "
                "load-balancing loss kto-ray can call for this family: it trains without the router's "
                "aux loss",
                stacklevel=2,
            )
        return None
    return RouterAux(loss_fn, num_experts, top_k, float(getattr(config, "router_aux_loss_coef", 0.0)))


@functools.cache
def _load_balancing_fn(model_type: type) -> Callable[..., torch.Tensor | int] | None:
    module = sys.modules.get(model_type.__module__)
    loss_fn = getattr(module, "load_balancing_loss_func", None)
    if loss_fn is None:
        return None
    names = tuple(inspect.signature(loss_fn).parameters)[: len(_AUX_PARAMETERS)]
    return loss_fn if names == _AUX_PARAMETERS else None


def mark_expert_blocks_as_z3_leaves(model: torch.nn.Module) -> list[str]:
    """Flag every module that owns `experts` as a ZeRO-3 leaf (before `deepspeed.initialize`); returns
    the flagged class names."""
    from deepspeed.utils import set_z3_leaf_modules

    classes = {type(m) for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module)}
    if classes:
        set_z3_leaf_modules(model, sorted(classes, key=lambda c: c.__name__))
    return sorted(c.__name__ for c in classes)
