"""GPU checks (`make test-gpu`; skipped without CUDA): bf16 precompute and training on one GPU over
NCCL, the chunked log-probs on CUDA (values and peak memory), a reference spread over 2 GPUs, and the
MFU benchmark's code paths. The product and `make test` never need a GPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, make_config, read_metrics

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _llama(vocab: int, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        tie_word_embeddings=tied,
    )
    return LlamaForCausalLM(config).to("cuda", torch.bfloat16)


def _long_row(vocab: int, prompt: int = 48, completion: int = 2000):
    from kto_ray.models.logprobs import pad_sequences

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (prompt + completion,), generator=gen).tolist()
    return pad_sequences([ids[:prompt]], [ids[prompt:]], pad_id=0).to("cuda")


def _peak_of_forward_backward(model, batch, chunk_tokens) -> tuple[torch.Tensor, int]:
    from kto_ray.models.logprobs import sequence_logps

    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    logps = sequence_logps(model, batch, chunk_tokens=chunk_tokens)
    logps.sum().backward()
    torch.cuda.synchronize()
    return logps.detach().float().cpu(), torch.cuda.max_memory_allocated() - before


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_chunked_logprobs_on_cuda_equal_the_full_path_in_a_quarter_of_the_memory(tied):
    vocab = 152_064
    model, batch = _llama(vocab, tied), _long_row(vocab)
    full, full_peak = _peak_of_forward_backward(model, batch, None)
    full_grad = model.lm_head.weight.grad.float().clone()
    chunked, chunked_peak = _peak_of_forward_backward(model, batch, 512)
    # bf16 matmuls in a different blocking: equal to bf16 precision over a 2,000-token sum.
    torch.testing.assert_close(chunked, full, rtol=2e-3, atol=0.5)
    grad = model.lm_head.weight.grad.float()
    assert (grad - full_grad).norm() <= 2e-2 * full_grad.norm()
    assert chunked_peak <= 0.25 * full_peak, (chunked_peak, full_peak)


@pytest.mark.usefixtures("ray_local_gpu")
def test_bf16_precompute_and_training_on_one_gpu(tiny_model, small_data, tmp_path):
    from kto_ray.reference.precompute import precompute
    from kto_ray.training.launch.driver import train

    cfg = make_config(
        tiny_model,
        small_data,
        tmp_path,
        precompute={"gpus_per_actor": 1, "cpus_per_actor": 1, "dtype": "bfloat16"},
        cluster={"workers": 1, "use_gpu": True, "cpus_per_worker": 1},
        deepspeed={"bf16": True},
        model={"dtype": "bfloat16"},
        train={"max_steps": 3, "micro_batch_size": 8},
    )
    store = precompute(cfg).store
    assert store.manifest.fingerprint_inputs["dtype"] == "bfloat16"
    result = train(cfg)
    metrics = read_metrics(result.run_dir.local_path)
    assert [m["step"] for m in metrics] == [1, 2, 3]
    # Step 1: policy == reference, both bf16 on the same GPU kernels: rewards ~0.
    assert abs(metrics[0]["rewards/chosen"]) < 0.05 and abs(metrics[0]["rewards/rejected"]) < 0.05
    assert (result.run_dir.local_path / "final" / "model.safetensors").is_file()
    # kto-ray evaluate of the export on the same bf16 GPU actor as precompute (the driver loads nothing),
    # against the same model scored in float32 on CPU actors: equal to bf16's precision.
    from kto_ray.tools.evaluate import evaluate

    final = str(result.run_dir.local_path / "final")
    on_gpu = evaluate(cfg, final)
    on_cpu_cfg = cfg.model_copy(deep=True)
    on_cpu_cfg.precompute.gpus_per_actor, on_cpu_cfg.precompute.dtype = 0.0, "float32"
    on_cpu_cfg.store.path = str(tmp_path / "store-fp32")
    precompute(on_cpu_cfg)
    on_cpu = evaluate(on_cpu_cfg, final)
    assert on_gpu["rows"] == on_cpu["rows"] > 0
    assert on_gpu["reward_accuracy"] == pytest.approx(on_cpu["reward_accuracy"], abs=0.1)
    assert on_gpu["loss"] == pytest.approx(on_cpu["loss"], abs=0.05)


@pytest.mark.usefixtures("ray_local_gpu")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_evaluate_with_the_model_spread_over_two_gpus_equals_one_gpu(real_model, tmp_path):
    from kto_ray.reference.precompute import precompute
    from kto_ray.tools.evaluate import evaluate

    data = REPO / "data" / "chat_sample.jsonl"
    one = make_config(
        real_model, data, tmp_path, precompute={"gpus_per_actor": 1, "cpus_per_actor": 1, "actors": 1}
    )
    precompute(one)
    two = one.model_copy(deep=True)
    two.precompute.gpus_per_actor = 2
    spread, single = evaluate(two), evaluate(one)
    for key in ("loss", "kl/raw", "rewards/margins"):
        assert spread[key] == pytest.approx(single[key], abs=2e-2), key


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_a_reference_spread_over_two_gpus_scores_like_one(real_model):
    from kto_ray.config import ModelConfig
    from kto_ray.models.loading import load_causal_lm
    from kto_ray.models.logprobs import pad_sequences, sequence_logps
    from kto_ray.reference.scoring import reference_placement

    sizes = [torch.cuda.get_device_properties(i).total_memory for i in range(2)]
    spread = load_causal_lm(
        ModelConfig(path=str(real_model)), torch.bfloat16, **reference_placement(2, sizes)
    )
    assert {p.device.index for p in spread.parameters()} == {0, 1}
    whole = load_causal_lm(ModelConfig(path=str(real_model)), torch.bfloat16).to("cuda:0")
    batch = pad_sequences([[1, 2, 3, 4]] * 2, [[5, 6, 7], [8, 9, 10, 11]], pad_id=0)
    with torch.inference_mode():
        a = sequence_logps(spread.eval(), batch.to(spread.get_input_embeddings().weight.device)).float().cpu()
        b = sequence_logps(whole.eval(), batch.to("cuda:0")).float().cpu()
    torch.testing.assert_close(a, b, rtol=1e-2, atol=0.1)


def test_gpu_mfu_benchmark_runs():
    out = subprocess.run(
        [
            sys.executable,
            "bench/gpu_mfu.py",
            "--steps",
            "3",
            "--rows",
            "512",
            "--seq",
            "1024",
            "--batch",
            "4",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "MFU" in out.stdout
