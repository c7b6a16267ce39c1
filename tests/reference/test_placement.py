"""Where a precompute actor puts its reference: one device, or spread over its GPUs (device_map) when
`precompute.gpus_per_actor` > 1; and how many GPUs the planner says one actor needs."""

from __future__ import annotations

import pytest

from kto_ray.config import KTOConfig, load_config
from kto_ray.errors import UserError
from kto_ray.planning.plan import plan
from kto_ray.reference.scoring import SPREAD_WEIGHTS_SHARE, reference_placement

GIB = 2**30


def test_up_to_one_gpu_loads_whole_on_one_device():
    assert reference_placement(0, []) == {}
    assert reference_placement(0.5, [80 * GIB]) == {}
    assert reference_placement(1, [80 * GIB]) == {}


def test_several_gpus_spread_the_reference_with_room_for_a_batch():
    placement = reference_placement(2, [80 * GIB, 80 * GIB])
    assert placement["device_map"] == "balanced"
    assert placement["max_memory"] == {0: int(80 * GIB * SPREAD_WEIGHTS_SHARE), 1: int(80 * GIB * 0.8)}
    with pytest.raises(RuntimeError, match="asked for 2 GPUs but sees 1"):
        reference_placement(2, [80 * GIB])


def test_fractional_gpus_above_one_are_refused():
    with pytest.raises(UserError, match="whole number"):
        load_config(None, ["precompute.gpus_per_actor=1.5"])
    assert KTOConfig.model_validate({"precompute": {"gpus_per_actor": 2}}).precompute.gpus_per_actor == 2


LLAMA_70B = {
    "vocab_size": 128256,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "max_position_embeddings": 131072,
    "tie_word_embeddings": False,
}


@pytest.fixture(scope="module")
def llama_70b(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("llama-70b")
    LlamaConfig(**LLAMA_70B).save_pretrained(folder)
    return str(folder)


def _gpu_plan(model_config: str, *overrides: str):
    base = [
        "cluster.use_gpu=true",
        "cluster.workers=16",
        "data.max_length=2048",
        "data.max_prompt_length=512",
        "precompute.dtype=bfloat16",
        "precompute.batch_rows=8",
        "precompute.batch_tokens=8192",
    ]
    return plan(load_config(None, [*base, *overrides]), model_config=model_config, gpus_per_node=8)


def test_planner_says_a_70b_reference_needs_two_80gb_gpus(llama_70b):
    # ~141 GB of bf16 weights: no single 80 GiB GPU holds them; two do, with a batch beside each share.
    one = _gpu_plan(llama_70b, "precompute.gpus_per_actor=1")
    assert one.precompute_gpus_needed == 2 and not one.precompute_fits
    assert any("set precompute.gpus_per_actor: 2" in line for line in one.advice)
    two = _gpu_plan(llama_70b, "precompute.gpus_per_actor=2")
    assert two.precompute_fits
    assert not any("gpus_per_actor: 2" in line for line in two.advice)
