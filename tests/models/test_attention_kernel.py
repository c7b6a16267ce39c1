"""The attention kernel of a model class without sdpa (Gemma 2, whose attention logits are soft-capped):
the default `sdpa` loads it with eager, saying so once, instead of transformers refusing the load."""

from __future__ import annotations

import warnings

import pytest
import torch

from kto_ray.config import ModelConfig
from kto_ray.models import loading
from kto_ray.models.loading import load_causal_lm
from tests.zoo import build_family


def test_default_sdpa_loads_a_model_without_sdpa_with_eager_and_says_so_once(tmp_path, monkeypatch):
    monkeypatch.setattr(
        loading, "_EAGER_WARNED", set()
    )  # an earlier test of this process may have loaded one
    folder = build_family("gemma2", tmp_path / "gemma2")
    config = ModelConfig(path=str(folder))
    assert config.attn_implementation == "sdpa"
    with pytest.warns(UserWarning, match="Gemma2ForCausalLM has no sdpa attention: loading it with eager"):
        model = load_causal_lm(config, torch.float32)
    assert model.config._attn_implementation == "eager"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*no sdpa attention")  # once per process
        load_causal_lm(config, torch.float32)


def test_a_model_with_sdpa_keeps_it(tmp_path):
    model = load_causal_lm(ModelConfig(path=str(build_family("gemma3", tmp_path / "gemma3"))), torch.float32)
    assert model.config._attn_implementation == "sdpa"
