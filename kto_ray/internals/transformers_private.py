"""transformers' private names and patterns that kto-ray relies on. Written against transformers 5.24.0.

- `config._attn_implementation`: the attention kernel a loaded model runs (flash, sdpa, eager).
- `PreTrainedModel._supports_sdpa`: whether a model class has an sdpa attention.
- a module's `forward` replaced on the instance for one call: the chunked log-probs run the head's
  weight through their own function while DeepSpeed's hooks on the module still gather it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

WRITTEN_AGAINST = "5.24.0"


def attention_kernel(config, default: str | None = None) -> str | None:
    """The attention implementation a model config was loaded with (`default` when it says none)."""
    return getattr(config, "_attn_implementation", default)


def supports_sdpa(model_class) -> bool:
    """Whether a model class has an sdpa attention (classes that do not say are taken to)."""
    return bool(getattr(model_class, "_supports_sdpa", True))


@contextmanager
def forward_replaced(module, forward) -> Iterator[None]:
    """Within: calls of `module` run `forward` (through the module's hooks). An instance-level forward
    may already be there (accelerate's device hooks wrap it): it is restored after."""
    previous = module.__dict__.get("forward")
    module.forward = forward
    try:
        yield
    finally:
        if previous is None:
            del module.forward  # back to the class's forward
        else:
            module.forward = previous
