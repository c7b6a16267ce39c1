"""GPU: MFU of the policy forward + backward of a ~1B Llama in bf16, and precompute tokens/s.

The model has Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, vocab
128256, tied embeddings), built from its config with random weights: no hub access needed.

1. Policy step: kto-ray's `sequence_logps` (the training forward: chunked LM head, summed completion
   log-probs) and backward of their sum, on random token ids, bf16 weights. MFU = 6 N tokens / time
   / peak, N = parameters (also shown with the causal attention FLOPs, 6 L T d per token).
2. Precompute: `kto_ray.reference.precompute.precompute` with one GPU actor over generated arithmetic
   rows (the character tokenizer, so ids use few rows of the embedding); tokens/s and its MFU at 2 N
   per token.

Peak dense bf16 FLOP/s comes from the device name (H100/H200 SXM 989 TFLOP/s, H100 PCIe 756, A100 312,
L40S 362, L4 121) or --peak-tflops. Needs a CUDA machine:

    python bench/gpu_mfu.py [--batch 8] [--seq 2048] [--rows 8192]
    python bench/gpu_mfu.py --smoke      # tiny model (on CPU without a GPU): the code paths, no figures
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import common

PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "L4": 121.0}
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 8192,
}
TINY = LLAMA_1B | {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
}


def peak_flops(device, override: float | None) -> float:
    import torch

    if override:
        return override * 1e12
    if device.type != "cuda":
        return float("nan")
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():  # "H100 PCIe" is checked before "H100"
        if key in name:
            return tflops * 1e12
    raise SystemExit(f"unknown GPU {name!r}: pass --peak-tflops (dense bf16)")


def build(shape: dict, out: Path, dtype) -> Path:
    """Random-weight Llama of `shape` with the char tokenizer, saved for the precompute actors."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kto_ray.assets.tiny_model import build_tokenizer

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def policy_mfu(model_dir: Path, device, dtype, batch: int, seq: int, steps: int, peak: float) -> list:
    import torch
    from transformers import AutoModelForCausalLM

    from kto_ray.models.logprobs import PaddedBatch, sequence_logps

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).train()
    model.config.use_cache = False
    n = sum(p.numel() for p in model.parameters())
    cfg = model.config
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    ones = torch.ones_like(ids)
    completion = torch.zeros_like(ids)
    completion[:, seq // 4 :] = 1  # a quarter prompt, the rest completion (all tokens run fwd + bwd)
    padded = PaddedBatch(ids, ones, completion)

    def step() -> None:
        sequence_logps(model, padded).sum().backward()
        model.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    tokens = batch * seq
    dense = 6 * n * tokens
    attention = 6 * cfg.num_hidden_layers * seq * cfg.hidden_size * tokens  # causal: half of 12 L T d
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    mfu = [dense / seconds / peak, (dense + attention) / seconds / peak]
    return [n, f"{batch} x {seq}", seconds, tokens / seconds, *mfu, memory]


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precompute_rate(
    model_dir: Path, root: Path, rows: int, batch_rows: int, use_gpu: bool, n: int, peak: float
):
    import ray

    from kto_ray.reference.precompute import precompute

    data = common.write_dataset("uniform", rows)
    cfg = common.bench_config(
        model_dir,
        data,
        root,
        precompute={
            "actors": 1,
            "gpus_per_actor": 1.0 if use_gpu else 0.0,
            "cpus_per_actor": 1.0,
            "batch_rows": batch_rows,
            "bucket_rows": 1024,
            "dtype": "bfloat16",
        },
    )
    common.ray_init(num_cpus=min(8, os.cpu_count() or 1), num_gpus=1 if use_gpu else 0)
    try:
        with common.timed() as wall:
            store = precompute(cfg).store
    finally:
        ray.shutdown()
    tokens = store.manifest.tokens
    return [rows, batch_rows, tokens, wall[0], tokens / wall[0], 2 * n * tokens / wall[0] / peak]


def main() -> None:
    import torch

    if args.smoke:  # the tiny model, on the GPU when there is one
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        shape = TINY
    else:
        if not torch.cuda.is_available():
            raise SystemExit(
                "no CUDA device: this benchmark needs a GPU (or --smoke for a CPU code-path check)"
            )
        device, shape = torch.device("cuda", 0), LLAMA_1B
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    name += " (smoke: figures mean nothing)" if args.smoke else ""
    print(f"device: {name}, peak {peak / 1e12:.0f} TFLOP/s dense bf16; torch {torch.__version__}")
    root = common.scratch_dir("bench-gpu-")
    model_dir = build(shape, root / "model", torch.bfloat16)
    row = policy_mfu(model_dir, device, torch.bfloat16, args.batch, args.seq, args.steps, peak)
    common.print_table(
        ["parameters", "batch x seq", "s/step", "tokens/s", "MFU (6N)", "MFU (6N + attention)", "peak GiB"],
        [row],
        title="policy forward + backward (kto_ray.models.logprobs.sequence_logps, bf16)",
    )
    if device.type == "cuda":
        torch.cuda.empty_cache()
    rate = precompute_rate(model_dir, root, args.rows, args.batch_rows, device.type == "cuda", row[0], peak)
    common.print_table(
        ["rows", "batch rows", "tokens", "wall s", "tokens/s", "MFU (2N)"],
        [rate],
        title="precompute: 1 actor x 1 GPU, bf16, end to end (Ray Data, tokenize, score, write Parquet)",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rows", type=int, default=8192, help="precompute rows (uniform arithmetic data)")
    parser.add_argument("--batch-rows", type=int, default=64, help="precompute.batch_rows")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak, TFLOP/s")
    args = common.parse_args(parser, smoke={"batch": 2, "seq": 64, "steps": 2, "rows": 64})
    main()
