"""Model loading options: the attention kernel a config asks for is the one every load uses."""

from __future__ import annotations

import pytest
import torch

from kto_ray.config import ModelConfig
from kto_ray.models.loading import load_causal_lm
from kto_ray.models.logprobs import pad_sequences, sequence_logps

PROMPTS = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14]]
COMPLETIONS = [[20, 21, 2], [22, 23, 24, 25, 26, 2], [27, 2]]


def test_eager_and_sdpa_attention_give_equal_logprobs(tiny_model):
    batch = pad_sequences(PROMPTS, COMPLETIONS, pad_id=0)
    logps = {}
    for kernel in ("eager", "sdpa"):
        model = load_causal_lm(ModelConfig(path=str(tiny_model), attn_implementation=kernel), torch.float32)
        assert model.config._attn_implementation == kernel
        with torch.no_grad():
            logps[kernel] = sequence_logps(model.eval(), batch)
    torch.testing.assert_close(logps["eager"], logps["sdpa"], rtol=1e-4, atol=1e-4)


def test_unknown_attention_kernel_is_refused():
    with pytest.raises(ValueError, match="attn_implementation"):
        ModelConfig(attn_implementation="flash_attention_3")
