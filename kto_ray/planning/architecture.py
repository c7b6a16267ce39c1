"""A model's architecture as the planner needs it, read without weights: config + a meta-device build.

Mixture-of-experts models store every expert (ZeRO partitions all of them) but run only
`experts_per_token` of them per token: total parameters drive memory, active parameters drive FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kto_ray.config import KTOConfig
from kto_ray.errors import UserError
from kto_ray.internals.transformers_private import attention_kernel

# How transformers' MoE configs name the expert count (Qwen3-MoE / OLMoE, Mixtral, DeepSeek).
_EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


@dataclass(frozen=True)
class Architecture:
    model_type: str
    total_params: int
    largest_layer_params: int  # the biggest single module's own params (DeepSpeed's largest_layer_params)
    hidden: int
    layers: int
    heads: int
    intermediate: int  # MLP width one token passes through (MoE: experts_per_token x expert width)
    vocab: int
    gated_mlp: bool
    eager_attention: bool
    expert_params: int = 0  # routed experts' weights, all layers (0: a dense model)
    experts: int = 0  # routed experts per MoE layer
    experts_per_token: int = 0
    # (module name, in_features, out_features) of every nn.Linear, for LoRA's adapter size.
    linears: tuple[tuple[str, int, int], ...] = ()

    def lora_params(self, r: int, targets: list[str] | str) -> int:
        """Parameters of rank-`r` adapters on the linear layers peft would wrap: every linear but the
        output head for "all-linear", else those whose name is or ends with a target."""
        return sum(r * (i + o) for i, o in self._lora_targets(targets))

    def lora_input_features(self, targets: list[str] | str) -> int:
        """The in_features of every linear layer peft would wrap, summed over the model."""
        return sum(i for i, _o in self._lora_targets(targets))

    def _lora_targets(self, targets: list[str] | str) -> list[tuple[int, int]]:
        if targets == "all-linear":
            return [(i, o) for name, i, o in self.linears if name.split(".")[-1] != "lm_head"]
        # peft's rule: a target names a module or the last parts of its dotted name.
        return [(i, o) for name, i, o in self.linears if any(f".{name}".endswith(f".{t}") for t in targets)]

    @property
    def active_params(self) -> int:
        """Parameters one token runs through: the dense part plus its share of the routed experts."""
        if not self.experts:
            return self.total_params
        idle = self.expert_params * (self.experts - self.experts_per_token) // self.experts
        return self.total_params - idle

    @property
    def training_flops_per_token(self) -> float:
        """6 x active parameters (forward 2, backward 4; attention's s^2 term left out)."""
        return 6.0 * self.active_params


def read_architecture(cfg: KTOConfig, model_config: str | None = None) -> Architecture:
    """Config only, weights never: AutoConfig, then the model built on the meta device to count params."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_config or cfg.model.path
    local = model_config is not None or source.startswith((".", "/", "~")) or Path(source).exists()
    if local and not Path(source).expanduser().exists():
        raise UserError(f"model architecture not found: {source}")
    try:
        config = AutoConfig.from_pretrained(
            str(Path(source).expanduser()) if local else source,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=None if model_config else cfg.model.revision,
        )
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        hint = "" if local else " (offline? plan with --model-config: a local config.json or its folder)"
        raise UserError(
            f"cannot read the architecture of {source}: {str(err).splitlines()[0]}{hint}"
        ) from None
    text = config.get_text_config()
    # parameters() yields a tied weight once; DeepSpeed dedups by data_ptr, which is 0 on meta.
    total = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    hidden = int(text.hidden_size)
    experts = next((int(v) for k in _EXPERT_COUNT_KEYS if (v := getattr(text, k, None))), 0)
    per_token = int(getattr(text, "num_experts_per_tok", 0) or 0) if experts else 0
    # Routed experts live under a module named `experts` (fused 3-D tensors or a ModuleList of MLPs);
    # shared experts (`shared_expert(s)`) run for every token and count as dense.
    expert_params = sum(p.numel() for name, p in model.named_parameters() if "experts" in name.split("."))
    intermediate = int(getattr(text, "intermediate_size", None) or 4 * hidden)
    if experts and expert_params:
        width = int(getattr(text, "moe_intermediate_size", None) or intermediate)
        shared = int(getattr(text, "shared_expert_intermediate_size", 0) or 0)
        intermediate = per_token * width + shared
    else:
        experts = per_token = expert_params = 0
    # A gate_proj module (Llama-style MLPs) or a fused gate_up_proj parameter (transformers' MoE experts).
    gated = any(n.endswith("gate_proj") for n, _ in model.named_modules()) or any(
        n.endswith("gate_up_proj") for n, _ in model.named_parameters()
    )
    return Architecture(
        model_type=str(config.model_type),
        total_params=total,
        largest_layer_params=largest,
        hidden=hidden,
        layers=int(text.num_hidden_layers),
        heads=int(text.num_attention_heads),
        intermediate=intermediate,
        vocab=int(text.vocab_size),
        gated_mlp=gated,
        eager_attention=attention_kernel(text) == "eager",
        expert_params=expert_params,
        experts=experts,
        experts_per_token=per_token,
        linears=tuple(
            (name, m.in_features, m.out_features)
            for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear)
        ),
    )
