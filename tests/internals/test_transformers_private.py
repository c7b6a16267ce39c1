"""What kto_ray/internals/transformers_private.py relies on in transformers (written against 5.24.0)."""

from __future__ import annotations

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

from kto_ray.internals import transformers_private

UPGRADED = f"transformers {transformers.__version__} (written against {transformers_private.WRITTEN_AGAINST})"


def _model(kernel: str) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
    )
    return LlamaForCausalLM._from_config(config, attn_implementation=kernel)


def test_the_loaded_kernel_is_read_off_the_config():
    assert transformers_private.attention_kernel(_model("eager").config) == "eager", UPGRADED
    assert transformers_private.attention_kernel(_model("sdpa").config) == "sdpa", UPGRADED
    assert transformers_private.attention_kernel(object(), "unknown") == "unknown"


def test_sdpa_support_is_a_class_attribute():
    assert "_supports_sdpa" in dir(LlamaForCausalLM), UPGRADED
    assert transformers_private.supports_sdpa(LlamaForCausalLM) is True


def test_a_replaced_forward_runs_through_the_module_and_is_put_back():
    head = torch.nn.Linear(2, 2)
    calls = []
    head.register_forward_pre_hook(lambda module, args: calls.append("hook"))
    with transformers_private.forward_replaced(head, lambda x: x * 0):
        assert torch.equal(head(torch.ones(1, 2)), torch.zeros(1, 2))
    assert calls == ["hook"]
    assert "forward" not in head.__dict__
