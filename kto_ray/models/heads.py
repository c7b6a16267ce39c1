"""What a causal LM's logits are, as a function of its linear LM head's output z: the one place that
knows which model families transform z and how (`_FAMILIES`, read from transformers 5.24's modeling
code). Granite divides by `logits_scaling` and HyperCLOVA X multiplies by it (same name, opposite use):
hence a table of classes, not of config attributes. A model of another class whose config sets one of
the known transform attributes may transform its logits in a way the table does not know: it takes the
full-logits path (`head_transform` returns None).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadTransform:
    """logits = cap * tanh(z * multiplier / divisor / cap), or z * multiplier / divisor without a cap.

    The operations run in the modeling code's order (multiply, divide, then cap), so float64 results
    match the model's own forward to rounding."""

    multiplier: float = 1.0
    divisor: float = 1.0
    cap: float | None = None

    def logits_and_slope(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The logits of z and d logits / d z (a tensor for a cap, else a constant); reuses z."""
        logits = self._scaled(z)
        scale = self.multiplier / self.divisor
        if self.cap is None:
            return logits, scale
        tanh = logits.div_(self.cap).tanh_()
        # d/dz cap * tanh(s z / cap) = s (1 - tanh^2): one more chunk-sized buffer, built in place.
        slope = tanh.square().neg_().add_(1).mul_(scale)
        return tanh.mul_(self.cap), slope

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """The logits of z (reuses z); no slope, so forward holds one chunk-sized buffer less."""
        logits = self._scaled(z)
        return logits if self.cap is None else logits.div_(self.cap).tanh_().mul_(self.cap)

    def _scaled(self, z: torch.Tensor) -> torch.Tensor:
        if self.multiplier != 1:
            z = z.mul_(self.multiplier)
        if self.divisor != 1:
            z = z.div_(self.divisor)
        return z


PLAIN_HEAD = HeadTransform()


# Causal LM class name -> (HeadTransform field, the config attribute that sets it), checked against forward.
_SOFTCAP = ("cap", "final_logit_softcapping")
_COHERE = ("multiplier", "logit_scale")
_GRANITE = ("divisor", "logits_scaling")
_FAMILIES: dict[str, tuple[str, str]] = {
    "Gemma2ForCausalLM": _SOFTCAP,
    "Gemma3ForCausalLM": _SOFTCAP,
    "VaultGemmaForCausalLM": _SOFTCAP,
    "NanoChatForCausalLM": _SOFTCAP,
    "CohereForCausalLM": _COHERE,
    "Cohere2ForCausalLM": _COHERE,
    "Cohere2MoeForCausalLM": _COHERE,
    "GraniteForCausalLM": _GRANITE,
    "GraniteMoeForCausalLM": _GRANITE,
    "GraniteMoeSharedForCausalLM": _GRANITE,
    "GraniteMoeHybridForCausalLM": _GRANITE,
    "GraniteSWAForCausalLM": _GRANITE,
    "GraniteMoeSWAForCausalLM": _GRANITE,
    "HyperCLOVAXForCausalLM": ("multiplier", "logits_scaling"),
}

# Config attributes that transform the logits in the families above and in others (muse_spark's
# output_multiplier): set on a class outside the table, they send the model to the full path.
TRANSFORM_ATTRIBUTES = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier")

_said: set[tuple[type, str]] = set()


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (the model itself otherwise)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def head_transform(model: torch.nn.Module) -> HeadTransform | None:
    """How `model`'s logits follow from its linear head's output; None when not known."""
    base = base_model(model)
    config = base.config.get_text_config() if hasattr(base, "config") else None
    for cls in type(base).__mro__:
        if cls.__name__ in _FAMILIES:
            field, attribute = _FAMILIES[cls.__name__]
            return HeadTransform(**{field: getattr(config, attribute)})
    transforms = [name for name in TRANSFORM_ATTRIBUTES if getattr(config, name, None) not in (None, 1, 1.0)]
    if transforms:
        say_once(
            base,
            f"its config sets {', '.join(transforms)}, a logit transform kto-ray does not know for "
            f"{type(base).__name__}",
        )
        return None
    return PLAIN_HEAD


def say_once(model: torch.nn.Module, reason: str) -> None:
    """Warn, once per model class and reason, that log-probs take the full-logits path."""
    key = (type(model), reason)
    if key not in _said:
        _said.add(key)
        warnings.warn(
            f"{type(model).__name__}: log-probs take the full-logits path (memory grows with rows x "
            f"length x vocabulary, not chunk x vocabulary): {reason}",
            stacklevel=3,
        )
