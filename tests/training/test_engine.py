"""The DeepSpeed config a worker builds: ZeRO-3 bucket sizes from the hidden size; deepspeed.config on top;
the accumulation the global batch derives."""

from __future__ import annotations

import json
import re

import pytest

from kto_ray.config import KTOConfig, load_config
from kto_ray.errors import UserError
from kto_ray.training.engine import deepspeed_config
from kto_ray.training.resume.global_batch import accumulation


def _zero(hidden_size: int | None, **deepspeed) -> dict:
    cfg = KTOConfig.model_validate({"deepspeed": {"stage": 3, **deepspeed}})  # resolved, as workers see it
    return deepspeed_config(cfg, world_size=2, hidden_size=hidden_size)["zero_optimization"]


def test_auto_bucket_sizes_follow_the_hidden_size():
    zero = _zero(4096)  # Llama-3-8B
    assert zero["reduce_bucket_size"] == 16_777_216
    assert zero["stage3_prefetch_bucket_size"] == 15_099_494
    assert zero["stage3_param_persistence_threshold"] == 40_960


def test_deepspeed_config_wins_key_by_key_and_unknown_hidden_size_keeps_deepspeed_defaults():
    raw = {"zero_optimization": {"reduce_bucket_size": 1000, "stage3_param_persistence_threshold": 0}}
    zero = _zero(4096, config=raw | {"communication_data_type": "fp32"})
    assert zero["reduce_bucket_size"] == 1000
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_prefetch_bucket_size"] == 15_099_494  # kept: the override merges, not replaces
    assert zero["stage"] == 3 and zero["contiguous_gradients"] is True
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size"} & _zero(None).keys()
    cfg = KTOConfig.model_validate({"deepspeed": {"stage": 2, "config": {"communication_data_type": "fp32"}}})
    assert deepspeed_config(cfg, world_size=2)["communication_data_type"] == "fp32"


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps: train.global_batch_size"),
        ({"zero_optimization": {"stage": 2}}, "zero_optimization.stage: deepspeed.stage"),
        ({"bf16": {"enabled": True}}, "bf16: deepspeed.bf16"),
        ({"optimizer": {"type": "Adam"}}, "optimizer: train.lr"),
    ],
)
def test_keys_kto_ray_derives_are_refused_naming_the_setting(raw, named):
    with pytest.raises(UserError, match=r"deepspeed\.config: .*" + re.escape(named)):
        load_config(None, [f"deepspeed.config={json.dumps(raw)}"])


def test_stage_2_gets_no_stage_3_keys():
    zero = _zero(1024, stage=2)
    assert zero["reduce_bucket_size"] == 1024 * 1024
    assert not [key for key in zero if key.startswith("stage3_")]


def test_deepspeed_gets_the_accumulation_the_global_batch_derives():
    # A global batch of 16 over 2 workers x micro-batch 4: 2 micro-batches each, 16 rows per step.
    cfg = KTOConfig.model_validate({"train": {"micro_batch_size": 4, "global_batch_size": 16}})
    config = deepspeed_config(cfg, world_size=2, accumulation=accumulation(16, 2, 4))
    assert (config["gradient_accumulation_steps"], config["train_batch_size"]) == (2, 16)
    assert config["train_micro_batch_size_per_gpu"] == 4
