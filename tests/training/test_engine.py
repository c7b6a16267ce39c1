"""The DeepSpeed config a worker builds: ZeRO-3 bucket sizes from the hidden size, overridable; the
accumulation the global batch derives."""

from __future__ import annotations

from kto_ray.config import KTOConfig
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


def test_set_sizes_win_and_unknown_hidden_size_keeps_deepspeed_defaults():
    zero = _zero(4096, reduce_bucket_size=1000, stage3_param_persistence_threshold=0)
    assert zero["reduce_bucket_size"] == 1000
    assert zero["stage3_param_persistence_threshold"] == 0
    assert zero["stage3_prefetch_bucket_size"] == 15_099_494
    assert not {"reduce_bucket_size", "stage3_prefetch_bucket_size"} & _zero(None).keys()


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
