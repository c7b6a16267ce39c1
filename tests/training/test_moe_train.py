"""A tiny random Qwen3-MoE (8 experts, top-2, config asking for router logits) through precompute and
2-worker ZeRO-3 training for 2 steps on a local Ray: no rank hangs while the ranks route their own rows
to their own experts, and every step logs the router's aux_loss."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from kto_ray.assets.tiny_model import build_tokenizer
from kto_ray.reference.precompute import precompute
from kto_ray.training.launch.driver import train
from tests.conftest import read_metrics
from tests.helpers import make_config

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def _save_tiny_moe(folder) -> None:
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    config = transformers.Qwen3MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = transformers.Qwen3MoeForCausalLM(config)
    with torch.no_grad():  # routers start at zero; sharp random ones send tokens to few experts
        for name, param in model.named_parameters():
            if name.endswith("gate.weight"):
                param.normal_(0, 3.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_two_worker_zero3_moe_trains_with_aux_loss(small_data, tmp_path):
    model_dir = tmp_path / "tiny-qwen3-moe"
    _save_tiny_moe(model_dir)
    cfg = make_config(
        model_dir,
        small_data,
        tmp_path,
        train={"max_steps": 2, "micro_batch_size": 4, "warmup_ratio": 0.0, "lr": 1e-3},
        cluster={"workers": 2},
        run={"name": "moe", "checkpoint_every": 100, "export": False},
    )
    assert cfg.deepspeed.stage == 3 and cfg.train.router_aux_loss
    precompute(cfg)
    result = train(cfg)
    records = read_metrics(result.run_dir.local_path)
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        # Transformers' load-balancing loss: top_k (2.0) for perfectly balanced routing.
        assert math.isfinite(record["aux_loss"]) and record["aux_loss"] > 0
    # Policy == reference at step 0: the store's forward and the training forward agree for an MoE.
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-4)
