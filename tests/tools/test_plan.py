"""The memory planner on offline architecture configs with the real public dimensions (no weights)."""

from __future__ import annotations

from pathlib import Path

import pytest

from kto_ray.config import load_config
from kto_ray.errors import UserError
from kto_ray.planning.advice import format_plan
from kto_ray.planning.host_release import HostRelease, decide_release
from kto_ray.planning.plan import GIB, SETTINGS, Setting, choose_stage, plan
from kto_ray.training.resume.stage import resolve_release

LLAMA_8B = dict(
    hidden_size=4096,
    num_hidden_layers=32,
    intermediate_size=14336,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    tie_word_embeddings=False,
)
QWEN_32B = dict(
    hidden_size=5120,
    num_hidden_layers=64,
    intermediate_size=27648,
    num_attention_heads=40,
    num_key_value_heads=8,
    vocab_size=152064,
    tie_word_embeddings=False,
)
# Qwen3-30B-A3B's published config.json (the shapes; rope and token ids do not change the plan).
QWEN3_30B_A3B = dict(
    hidden_size=2048,
    num_hidden_layers=48,
    intermediate_size=6144,  # unused: every layer is sparse (decoder_sparse_step 1, no mlp_only_layers)
    moe_intermediate_size=768,
    num_experts=128,
    num_experts_per_tok=8,
    num_attention_heads=32,
    num_key_value_heads=4,
    head_dim=128,
    vocab_size=151936,
    max_position_embeddings=40960,
    tie_word_embeddings=False,
)


def save_llama_8b(folder: Path) -> Path:
    from transformers import LlamaConfig

    LlamaConfig(**LLAMA_8B).save_pretrained(folder)
    return folder


def save_qwen_32b(folder: Path) -> Path:
    from transformers import Qwen2Config

    Qwen2Config(**QWEN_32B).save_pretrained(folder)  # Qwen2 always has q/k/v biases
    return folder


def save_qwen3_30b_a3b(folder: Path) -> Path:
    from transformers import Qwen3MoeConfig

    Qwen3MoeConfig(**QWEN3_30B_A3B).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> str:
    return str(save_qwen3_30b_a3b(tmp_path_factory.mktemp("qwen3-30b-a3b")))


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return str(save_llama_8b(tmp_path_factory.mktemp("llama-3.1-8b")))


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> str:
    # A config.json file (not its folder) is accepted too.
    return str(save_qwen_32b(tmp_path_factory.mktemp("qwen2.5-32b")) / "config.json")


GPU_RUN = [  # ZeRO-3 as configured: the plan's advice is about that setting (stage auto: test_stage.py)
    "deepspeed.stage=3",
    "cluster.use_gpu=true",
    "deepspeed.bf16=true",
    "data.max_length=2048",
    "data.max_prompt_length=512",
    "train.micro_batch_size=2",
    "deepspeed.gradient_checkpointing=true",
    "precompute.gpus_per_actor=1",
]


def gpu_config(*overrides: str):
    return load_config(None, [*GPU_RUN, *overrides])


def test_parameter_counts_match_the_public_models(llama, qwen):
    p = plan(gpu_config(), model_config=llama)
    assert p.arch.total_params == pytest.approx(8.03e9, rel=2e-3)
    assert p.arch.largest_layer_params == 128256 * 4096  # embedding (= lm_head, untied)
    assert (p.arch.hidden, p.arch.layers, p.arch.vocab, p.arch.gated_mlp) == (4096, 32, 128256, True)
    q = plan(gpu_config(), model_config=qwen)
    assert q.arch.total_params == pytest.approx(32.76e9, rel=2e-3)
    assert q.arch.largest_layer_params == 152064 * 5120


@pytest.mark.parametrize("model", ["llama", "qwen"])
@pytest.mark.parametrize(("gpus_per_node", "nodes"), [(1, 1), (4, 1), (8, 1), (8, 2), (8, 4)])
def test_model_states_agree_with_deepspeed(request, model, gpus_per_node, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    arch_path = request.getfixturevalue(model)
    p = plan(
        gpu_config(f"cluster.workers={gpus_per_node * nodes}"),
        model_config=arch_path,
        gpus_per_node=gpus_per_node,
    )
    for setting in p.settings:
        cpu, gpu, _ = estimate_zero3_model_states_mem_needs(
            total_params=p.arch.total_params,
            largest_layer_params=p.arch.largest_layer_params,
            num_gpus_per_node=gpus_per_node,
            num_nodes=nodes,
            cpu_offload=setting.offload_optimizer,
            cpu_offload_params=setting.offload_params,
            zero_init=True,  # HfDeepSpeedConfig loads the model under zero.Init
        )
        assert setting.gpu_model_states == pytest.approx(gpu, rel=0.10), setting.name
        assert setting.cpu_per_node == pytest.approx(cpu, rel=0.10), setting.name


def test_activations_grow_with_length_and_shrink_with_checkpointing(llama):
    def acts(length: int, ckpt: bool, micro: int = 2, chunk: str = "null") -> tuple[float, float]:
        p = plan(
            gpu_config(
                f"data.max_length={length}",
                f"deepspeed.gradient_checkpointing={str(ckpt).lower()}",
                f"train.micro_batch_size={micro}",
                f"model.logprob_chunk_tokens={chunk}",
            ),
            model_config=llama,
        )
        return p.activations, p.logits

    short, long = acts(1024, True), acts(4096, True)
    assert long[0] > 3.9 * short[0] and long[1] == pytest.approx(4 * short[1])
    assert acts(2048, False)[0] > 5 * acts(2048, True)[0]
    assert acts(2048, True, micro=4)[0] == pytest.approx(2 * acts(2048, True, micro=2)[0])
    # Full logits: micro 2 x 2048 tokens x 128256 vocab x (2 bytes bf16 + two fp32 copies).
    assert acts(2048, True)[1] == 2 * 2048 * 128256 * 10
    # Chunked: one chunk of 512 tokens x 128256 x (2 bytes bf16 + three fp32 tensors), whatever the length.
    assert acts(2048, True, chunk="512")[1] == acts(4096, True, chunk="512")[1] == 512 * 128256 * 14


def test_a_token_budget_plans_the_rows_it_can_gather(llama):
    # train.micro_batch_tokens re-cuts a worker's rows of a step (global_batch_size / workers): the
    # largest forward holds budget // max_length max-length rows (at least one, at most all 8).
    def planned(*overrides: str) -> tuple[int, float]:
        p = plan(
            gpu_config("data.max_length=2048", "model.logprob_chunk_tokens=null", *overrides),
            model_config=llama,
        )
        return p.micro_batch, p.logits

    fixed = ("train.micro_batch_size=2", "train.global_batch_size=16")  # 2 workers x 2 x 4 micro-batches
    assert planned(*fixed) == (2, 2 * 2048 * 128256 * 10)
    assert planned(*fixed, "train.micro_batch_tokens=8192")[0] == 4  # 8192 // 2048
    assert planned(*fixed, "train.micro_batch_tokens=100000")[0] == 8  # every row of the step
    assert planned(*fixed, "train.micro_batch_tokens=1000") == (1, 1 * 2048 * 128256 * 10)  # a long row alone
    # An elastic [4, 8] group on 4 workers: each takes 16 of the global batch's 8 x 8 rows.
    elastic = ("train.global_batch_size=64", "train.micro_batch_tokens=100000", "cluster.workers=[4,8]")
    assert planned(*elastic)[0] == 16


def test_advice_for_the_8b_model(llama):
    p = plan(gpu_config("cluster.workers=8"), model_config=llama)
    none = p.setting("no offload")
    assert none.fits and p.configured == "no offload"
    assert any("fits without offload on 8 GPUs" in line for line in p.advice)
    # The fewest GPUs is the boundary: it fits there and not on one fewer.
    assert 1 < none.min_gpus < 8
    assert plan(gpu_config(f"cluster.workers={none.min_gpus}"), model_config=llama).settings[0].fits
    assert not plan(gpu_config(f"cluster.workers={none.min_gpus - 1}"), model_config=llama).settings[0].fits
    # One GPU: only offloading fits, and the advice says so with the CPU RAM it needs.
    one = plan(gpu_config("cluster.workers=1"), model_config=llama)
    assert not one.settings[0].fits and one.settings[1].fits
    assert any("needs optimizer->CPU on 1 GPU" in line and "CPU RAM" in line for line in one.advice)
    assert any("does NOT fit" in line for line in one.advice)


@pytest.mark.parametrize("gpus", [1, 8, 16])
def test_zero2_model_states_agree_with_deepspeed(llama, gpus):
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    p = plan(gpu_config(f"cluster.workers={gpus}"), model_config=llama)
    _cpu, gpu = estimate_zero2_model_states_mem_needs(
        p.arch.total_params, num_gpus_per_node=gpus, num_nodes=1, cpu_offload=False
    )
    assert p.zero2_model_states == gpu


def test_stage_2_is_advised_only_where_it_fits(llama, qwen):
    # 8B on 8 x 80 GiB: a full 16-bit copy (15 GiB) plus sharded states fits, so stage 2 is offered.
    eight_b = plan(gpu_config("cluster.workers=8"), model_config=llama)
    assert eight_b.zero2_total < 80 * GIB
    assert any(line.startswith("deepspeed.stage 2 also fits") for line in eight_b.advice)
    # 32B on 16 GPUs: 61 GiB of 16-bit params per GPU alone leave no room: ZeRO-3 only.
    thirty_two_b = plan(gpu_config("cluster.workers=16"), model_config=qwen)
    assert thirty_two_b.zero2_total > 80 * GIB
    assert not any("stage 2" in line for line in thirty_two_b.advice)
    # Already on stage 2: no advice to move there.
    on_two = plan(gpu_config("cluster.workers=8", "deepspeed.stage=2"), model_config=llama)
    assert not any("stage 2 also fits" in line for line in on_two.advice)


def test_advice_for_the_32b_model(qwen):
    eight = plan(gpu_config("cluster.workers=8"), model_config=qwen)
    assert not eight.settings[0].fits and eight.settings[1].fits
    assert eight.settings[0].min_gpus > 8  # without offload it takes more than one node
    sixteen = plan(gpu_config("cluster.workers=16"), model_config=qwen)
    assert sixteen.settings[0].fits and sixteen.nodes == 2
    # A smaller GPU memory needs more GPUs.
    small = plan(gpu_config("cluster.workers=16"), model_config=qwen, gpu_memory_gib=40)
    assert small.settings[0].min_gpus > sixteen.settings[0].min_gpus
    assert (small.settings[0].fits, small.settings[1].fits) == (False, True)


def test_nothing_fits_when_activations_alone_are_too_big(qwen):
    p = plan(
        gpu_config(
            "data.max_length=16384", "train.micro_batch_size=8", "deepspeed.gradient_checkpointing=false"
        ),
        model_config=qwen,
    )
    assert not any(s.fits for s in p.settings) and all(s.min_gpus is None for s in p.settings)
    assert any("fits in no offload setting" in line and "gradient_checkpointing" in line for line in p.advice)


def test_online_reference_and_configured_offload(llama):
    offline = plan(gpu_config("cluster.workers=8"), model_config=llama)
    online = plan(gpu_config("cluster.workers=8", "reference.mode=online"), model_config=llama)
    extra = online.settings[0].gpu_total - offline.settings[0].gpu_total
    assert extra == pytest.approx(2 * online.arch.total_params / 8 + 2 * online.arch.largest_layer_params)
    p = plan(gpu_config("deepspeed.offload_optimizer=cpu"), model_config=llama)
    assert p.configured == "optimizer->CPU"
    p = plan(
        gpu_config("deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu"), model_config=llama
    )
    assert p.configured == "optimizer+params->CPU"


def test_precompute_actor_memory(qwen):
    ok = plan(gpu_config("precompute.batch_rows=8", "precompute.batch_tokens=4096"), model_config=qwen)
    assert ok.precompute_fits and ok.precompute_gpu > 32.76e9 * 2
    big = plan(gpu_config("precompute.batch_rows=64"), model_config=qwen)
    assert not big.precompute_fits
    assert any("precompute" in line and "does NOT fit" in line for line in big.advice)


def test_format_plan_is_a_readable_table(llama):
    text = format_plan(plan(gpu_config("cluster.workers=8"), model_config=llama))
    for needle in (
        "8.03B params",
        "no offload",
        "optimizer->CPU",
        "optimizer+params->CPU",
        "= total per GPU",
        "CPU RAM per node",
        "fewest GPUs that fit",
        "KL pass",
        "- fits without offload",
    ):
        assert needle in text, needle
    assert max(len(line) for line in text.splitlines()) < 140


def test_user_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plan(gpu_config(), model_config=str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read the architecture"):
        plan(gpu_config(), model_config=str(bad))
    (bad / "config.json").write_text('{"hidden_size": 8}')  # no model_type
    with pytest.raises(UserError, match="cannot read the architecture"):
        plan(gpu_config(), model_config=str(bad))
    with pytest.raises(UserError):
        plan(gpu_config(f"model.path={tmp_path / 'nowhere'}"))
    with pytest.raises(UserError) as err:
        plan(gpu_config("model.path=no-such-org/no-such-model"))  # a hub id, offline in tests
    assert "\n" not in str(err.value)


def test_plan_on_the_tiny_local_model(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    p = plan(load_config(None, [f"model.path={tiny_model}"]))
    real = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    assert p.arch.total_params == sum(t.numel() for t in real.parameters())
    assert p.settings[0].fits and not p.bf16  # the CPU demo: fp32
    assert any("use_gpu is false" in line for line in p.advice)
    assert p.settings[0].gpu_total < 5 * GIB
    assert "tiny-llama" in format_plan(p)


def test_cli_plans_the_shipped_32b_config(qwen, capsys):
    from kto_ray.cli import main

    assert main(["plan", "--config", "configs/qwen2.5-32b.yaml", "--model-config", qwen]) == 0
    out = capsys.readouterr().out
    assert "Qwen/Qwen2.5-32B-Instruct" in out and "fits without offload on 16 GPUs" in out


def test_moe_total_and_active_parameters(moe):
    p = plan(gpu_config("cluster.workers=8"), model_config=moe)
    a = p.arch
    # Published: 30.5B total, 3.3B active.
    assert a.total_params == pytest.approx(30.53e9, rel=2e-3)
    assert a.active_params == pytest.approx(3.35e9, rel=5e-3)
    # Every layer's 128 experts: fused gate+up (2 x 768 x 2048) and down (2048 x 768) tensors.
    per_layer = 128 * 3 * 768 * 2048
    assert (a.experts, a.experts_per_token, a.expert_params) == (128, 8, 48 * per_layer)
    assert a.active_params == a.total_params - 48 * per_layer * 120 // 128
    # The largest module ZeRO-3 gathers whole is one layer's fused experts (0.6B), not the embedding.
    assert a.largest_layer_params == per_layer > 151936 * 2048
    assert a.intermediate == 8 * 768 and a.gated_mlp
    # All experts are stored and partitioned: model states scale with total params, FLOPs with active.
    assert p.settings[0].gpu_params == 2 * a.total_params / 8
    assert a.training_flops_per_token == 6 * a.active_params
    text = format_plan(p)
    assert "total params 30.53B, active 3.35B" in text and "128 experts, 8 per token" in text


def test_the_moe_model_needs_one_node(moe):
    # The shipped configs/qwen3-30b-a3b.yaml: 8 GPUs is the fewest that fit without offload.
    eight = plan(gpu_config("cluster.workers=8"), model_config=moe)
    assert eight.settings[0].fits and eight.settings[0].min_gpus == 8
    assert not plan(gpu_config("cluster.workers=7"), model_config=moe).settings[0].fits
    assert eight.choice.stage == 3 and eight.zero2_total > 80 * GIB


def test_a_dense_model_has_all_its_parameters_active(llama):
    a = plan(gpu_config(), model_config=llama).arch
    assert a.active_params == a.total_params and a.expert_params == a.experts == 0


def zero3_settings(totals_gib: tuple[float, float, float], budget_gib: float) -> list[Setting]:
    """DeepSpeed's three ZeRO-3 settings with only their totals set (what the choice reads)."""
    return [
        Setting(name, opt, params, 0, 0, 0, 0, t * GIB, 0, t <= budget_gib, None)
        for (name, opt, params), t in zip(SETTINGS, totals_gib, strict=True)
    ]


@pytest.mark.parametrize(
    ("zero2", "zero3", "picked", "reason"),
    [
        (70, (50, 20, 10), (2, False, False), "need 70.0 of 80.0 GiB per GPU"),
        (80, (50, 20, 10), (2, False, False), "need 80.0 of 80.0 GiB"),  # exactly full still fits
        (90, (50, 20, 10), (3, False, False), "ZeRO-2 needs 90.0 GiB"),
        (90, (85, 30, 10), (3, True, False), "with optimizer->CPU 30.0 of 80.0"),
        (200, (150, 85, 60), (3, True, True), "with optimizer+params->CPU 60.0 of 80.0"),
        (200, (150, 100, 90), (3, True, True), "nothing fits 80.0 GiB per GPU"),
    ],
)
def test_stage_auto_picks_the_fastest_setting_that_fits(zero2, zero3, picked, reason):
    choice = choose_stage(zero2 * GIB, zero3_settings(zero3, 80), 80 * GIB)
    assert (choice.stage, choice.offload_optimizer, choice.offload_params) == picked
    assert reason in choice.reason
    assert choice.label == {2: "ZeRO-2", 3: "ZeRO-3"}[picked[0]] + (
        "" if not picked[1] else f" with {'optimizer+params->CPU' if picked[2] else 'optimizer->CPU'}"
    )


def test_stage_auto_in_the_plan(llama, qwen):
    # 8B on 8 GPUs: ZeRO-2 = 2 bytes x 8.03B on each + 18 bytes x 8.03B / 8 = 34.1e9 bytes of states.
    eight_b = plan(gpu_config("cluster.workers=8", "deepspeed.stage=auto"), model_config=llama)
    n = eight_b.arch.total_params
    assert eight_b.zero2_model_states == 2 * n + int(18 * n / 8)
    assert eight_b.choice.stage == 2
    assert any(line.startswith("deepspeed.stage auto picks ZeRO-2") for line in eight_b.advice)
    assert "fastest that fits (deepspeed.stage: auto): ZeRO-2" in format_plan(eight_b)
    # 32B on 16 GPUs: 2 x 32.76B = 61 GiB of 16-bit params alone on every GPU: ZeRO-3.
    thirty_two = plan(gpu_config("cluster.workers=16", "deepspeed.stage=auto"), model_config=qwen)
    assert thirty_two.choice.stage == 3 and thirty_two.configured == "no offload"
    # On 8 GPUs ZeRO-3 needs the optimizer offloaded: auto picks that, and the plan is of it.
    offloaded = plan(gpu_config("cluster.workers=8", "deepspeed.stage=auto"), model_config=qwen)
    assert offloaded.choice.label == "ZeRO-3 with optimizer->CPU"
    assert offloaded.configured == "optimizer->CPU"


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory) -> str:
    from transformers import LlamaConfig

    folder = tmp_path_factory.mktemp("small-llama")
    LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=1000,
        tie_word_embeddings=False,
    ).save_pretrained(folder)
    return str(folder)


def test_cpu_workers_plan_fp32_states_and_a_process_baseline(small_llama):
    from kto_ray.planning.memory import CPU_BASELINE_GIB

    p = plan(load_config(None, ["cluster.workers=2"]), model_config=small_llama)
    n, largest = p.arch.total_params, p.arch.largest_layer_params
    none = p.settings[0]
    # fp32 params (4 bytes) beside DeepSpeed's fp32 master copy, grads and Adam moments (16).
    assert (none.gpu_params, none.gpu_optimizer) == (4 * n / 2, 16 * n / 2)
    # The gathered head and its gradient (fp32), and the optimizer step's flattened fp32 gradients and
    # Adam's two fp32 temporaries of the worker's partition (one sub-group: far below SUB_GROUP_ELEMENTS).
    assert none.gpu_buffer == 8 * largest + 12 * n / 2 and largest == 1000 * 64
    assert p.overhead == CPU_BASELINE_GIB * GIB and not p.on_gpu
    assert "worker process baseline" in format_plan(p)
    assert any("GiB CUDA/NCCL allowance replaces" in line for line in p.advice)


def test_lora_plans_the_adapters_states_and_the_frozen_base(small_llama):
    full = plan(load_config(None, ["cluster.workers=2"]), model_config=small_llama)
    # Without adapter dropout, whose input copies outweigh the optimizer states at this tiny width (they
    # have a test of their own below).
    lora = plan(
        load_config(None, ["cluster.workers=2", "lora.enabled=true", "lora.dropout=0"]),
        model_config=small_llama,
    )
    # r=16 on every linear but the head: q, k, v, o (64 -> 64) and gate, up (64 -> 128), down (128 -> 64).
    assert lora.lora_params == 16 * (4 * (64 + 64) + 3 * (64 + 128)) == 17408
    targeted = plan(
        load_config(None, ["cluster.workers=2", "lora.enabled=true", "lora.target_modules=[q_proj, v_proj]"]),
        model_config=small_llama,
    )
    assert targeted.lora_params == 16 * 2 * (64 + 64)
    n, largest = lora.arch.total_params, lora.arch.largest_layer_params
    s = lora.settings[0]
    assert (s.gpu_params, s.gpu_optimizer) == (4 * n / 2, 16 * 17408 / 2)
    # The gathered frozen head (no grad), the adapters' flat grads and Adam's temporaries at the step.
    assert s.gpu_buffer == 4 * largest + 12 * 17408 / 2
    assert s.gpu_total < full.settings[0].gpu_total and full.lora_params == 0
    assert any(line.startswith("LoRA: 17.41K adapter params") for line in lora.advice)


def test_optimizer_step_memory_is_one_sub_group_of_flat_grads_and_adam_temporaries():
    from kto_ray.planning.memory import SUB_GROUP_ELEMENTS, optimizer_step_bytes
    from kto_ray.training.engine import deepspeed_config

    # A partition below one sub-group: 4 (flat fp32 grads) + 8 (sqrt(v), then sqrt(v) / bias correction).
    assert optimizer_step_bytes(1_000_000, 2) == 12 * 500_000
    # 630M params on 2 workers: 315M each, stepped 25M at a time (0.3 GB), not all at once (3.8 GB).
    assert SUB_GROUP_ELEMENTS == 25_000_000
    assert optimizer_step_bytes(630_000_000, 2) == 12 * 25_000_000 == 300_000_000
    # The engine configures the sub-group the planner assumes.
    cfg = load_config(None, ["cluster.workers=2", "deepspeed.stage=3"])
    zero = deepspeed_config(cfg, 2, hidden_size=64)["zero_optimization"]
    assert zero["sub_group_size"] == SUB_GROUP_ELEMENTS


def test_lora_dropout_keeps_a_copy_of_every_adapted_input_and_its_mask(small_llama):
    def acts(*overrides: str) -> float:
        return plan(
            load_config(None, ["cluster.workers=2", *overrides]), model_config=small_llama
        ).activations

    full = plan(load_config(None, ["cluster.workers=2"]), model_config=small_llama)
    tokens = full.seq_len * full.micro_batch
    # Adapted inputs per token: q, k, v, o, gate, up (64 each) and down (128) = 512; fp32 copy + mask.
    assert acts("lora.enabled=true") - full.activations == tokens * 512 * (4 + 1)
    assert acts("lora.enabled=true", "lora.target_modules=[q_proj, down_proj]") - full.activations == (
        tokens * (64 + 128) * 5
    )
    # No dropout: peft's adapter reads the input the layer already keeps.
    assert acts("lora.enabled=true", "lora.dropout=0") == full.activations


def test_the_optimizer_step_transient_and_the_backward_working_set_do_not_add_up(small_llama):
    p = plan(load_config(None, ["cluster.workers=2"]), model_config=small_llama)
    n, largest, s = p.arch.total_params, p.arch.largest_layer_params, p.settings[0]
    step = 12 * n / 2  # the step runs after the backward freed activations and logits: the larger counts
    expected = s.gpu_params + s.gpu_optimizer + 8 * largest + max(step, p.activations + p.logits) + p.overhead
    assert s.gpu_total == pytest.approx(expected, rel=1e-12)
    assert s.gpu_total < s.gpu_model_states + p.activations + p.logits + p.overhead


def test_release_host_memory_auto_is_on_only_for_cpu_workers_planned_near_their_ram():
    # On above 80% of the worker's memory: 8.1 of 10 GiB is 81%, 8 of 10 exactly 80%.
    assert decide_release(False, 8.1 * GIB, 10 * GIB) == HostRelease(
        True, "planned peak 81% of 10.0 GiB per worker, above 80%"
    )
    assert decide_release(False, 8 * GIB, 10 * GIB) == HostRelease(
        False, "planned peak 80% of 10.0 GiB per worker, within 80%"
    )
    assert not decide_release(True, 79 * GIB, 80 * GIB).on  # GPU workers: off however near


def test_the_plan_decides_release_from_the_peak_of_the_stage_that_runs(small_llama):
    cpu = ["cluster.use_gpu=false", "cluster.workers=2"]
    roomy = plan(load_config(None, cpu), model_config=small_llama, gpu_memory_gib=80)
    assert roomy.choice.stage == 2 and not roomy.release.on  # a tiny model in 80 GiB
    peak = roomy.zero2_total  # stage auto runs ZeRO-2 at any budget above it
    near = plan(load_config(None, cpu), model_config=small_llama, gpu_memory_gib=peak / GIB / 0.81)
    far = plan(load_config(None, cpu), model_config=small_llama, gpu_memory_gib=peak / GIB / 0.79)
    assert near.choice.stage == far.choice.stage == 2
    assert near.release.on and not far.release.on
    # ZeRO-3 as configured: the peak is its setting's (no offload here), below ZeRO-2's (params sharded).
    zero3 = load_config(None, [*cpu, "deepspeed.stage=3"])
    peak3 = plan(zero3, model_config=small_llama).settings[0].gpu_total
    assert peak3 < peak
    assert plan(zero3, model_config=small_llama, gpu_memory_gib=peak3 / GIB / 0.81).release.on
    assert not plan(zero3, model_config=small_llama, gpu_memory_gib=peak3 / GIB / 0.79).release.on


def test_the_driver_resolves_auto_once_and_says_it(small_llama):
    """resolve_release (the driver's, after the stage is resolved): the worker gets a bool."""
    base = ["cluster.use_gpu=false", "cluster.workers=2", f"model.path={small_llama}", "deepspeed.stage=2"]
    peak = plan(load_config(None, base), gpu_memory_gib=80).zero2_total / GIB
    near, words = resolve_release(load_config(None, [*base, f"deepspeed.worker_memory_gib={peak / 0.81}"]))
    assert near.cluster.release_host_memory is True and words.startswith(", host memory released (auto: ")
    far, words = resolve_release(load_config(None, [*base, f"deepspeed.worker_memory_gib={peak / 0.5}"]))
    assert far.cluster.release_host_memory is False and words == ""  # said only when released
    gpu, words = resolve_release(load_config(None, [*base, "cluster.use_gpu=true"]))
    assert gpu.cluster.release_host_memory is False and words == ""
    chosen = load_config(None, [*base, "cluster.release_host_memory=true"])
    assert resolve_release(chosen) == (chosen, "")  # not auto: as set, no planning


def test_cpu_workers_near_their_ram_are_told_to_release_host_memory(small_llama):
    # Measured: 630M full fine-tuning peaked at 9.3 GiB per worker with cluster.release_host_memory (plan
    # 9.7 GiB) and ran out of this machine's RAM without it; the plan says so when it nears the RAM.
    line = "cluster.release_host_memory: true holds them to it"
    cpu = ["cluster.use_gpu=false", "cluster.workers=2"]
    peak = plan(load_config(None, cpu), model_config=small_llama).zero2_total / GIB
    near, far = peak / 0.9, peak / 0.5

    def advice(*keys: str, memory: float) -> str:
        return format_plan(
            plan(load_config(None, [*cpu, *keys]), model_config=small_llama, gpu_memory_gib=memory)
        )

    assert line in advice("cluster.release_host_memory=false", memory=near)
    assert line not in advice("cluster.release_host_memory=false", memory=far)
    assert line not in advice("cluster.release_host_memory=true", memory=near)
    assert "cluster.release_host_memory auto is on: planned peak" in advice(memory=near)
    assert "cluster.release_host_memory auto is off: planned peak" in advice(memory=far)
