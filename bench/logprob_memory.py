"""Peak memory and time of one policy log-prob forward + backward: chunked LM head vs full logits.

A 2-layer Llama (hidden 256) with Qwen2.5's vocabulary (152,064 tokens, untied head) scores one row of
2,048 tokens (48 prompt + 2,000 completion), then back-propagates the summed log-prob. `--heads softcap`
does the same with a 2-layer Gemma 3 text model (hidden 256, tied head) at Gemma's vocabulary (262,144
tokens) and its tanh soft-capped logits (`final_logit_softcapping` 30). Each setting runs
in a process of its own, so no allocator state carries over. On CPU the peak is the process's resident
set high-water mark above its level just before the forward (reset through /proc/self/clear_refs); on
CUDA, torch.cuda.max_memory_allocated above the allocated memory before the forward.

    .venv/bin/python bench/logprob_memory.py [--device cpu|cuda] [--chunks 512 1024 2048] [--repeats 3]
        [--heads linear softcap]
    .venv/bin/python bench/logprob_memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

VOCAB = {"linear": 152_064, "softcap": 262_144}
HEAD_TITLES = {"linear": "linear head (Llama)", "softcap": "soft-capped head (Gemma 3, cap 30)"}
PROMPT, COMPLETION = 48, 2_000


def _rss_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def build_model(head: str, vocab: int):
    import transformers

    shape = dict(
        vocab_size=vocab,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
    )
    if head == "softcap":
        config = transformers.Gemma3TextConfig(**shape, head_dim=64, final_logit_softcapping=30.0)
        return transformers.Gemma3ForCausalLM(config)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape, tie_word_embeddings=False))


def measure(
    device: str, chunk: int | None, repeats: int, vocab: int, completion: int, head: str
) -> dict[str, float]:
    """In this process: peak memory of the first forward + backward, median time of `repeats`."""
    import torch

    from kto_ray.models.logprobs import pad_sequences, sequence_logps

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_model(head, vocab).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(4, vocab, (PROMPT + completion,), generator=gen).tolist()
    batch = pad_sequences([ids[:PROMPT]], [ids[PROMPT:]], pad_id=0).to(device)

    def once() -> float:
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        sequence_logps(model, batch, chunk_tokens=chunk).sum().backward()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        seconds = [once()]
        peak = torch.cuda.max_memory_allocated() - before
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _rss_kib("VmRSS") * 1024
        seconds = [once()]
        peak = _rss_kib("VmHWM") * 1024 - before
    seconds += [once() for _ in range(repeats - 1)]
    return {"peak_mib": peak / 2**20, "seconds": statistics.median(seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heads", nargs="+", default=["linear"], choices=list(VOCAB))
    parser.add_argument("--vocab", type=int, help="vocabulary (default: 152,064 linear, 262,144 softcap)")
    parser.add_argument("--completion", type=int, default=COMPLETION, help="completion tokens of the row")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    smoke = {"vocab": 4096, "completion": 256, "chunks": [64], "repeats": 1, "heads": list(VOCAB)}
    args = common.parse_args(parser, smoke=smoke)
    if args.child is not None:
        chunk = None if args.child == "full" else int(args.child)
        head = args.heads[0]
        print(json.dumps(measure(args.device, chunk, args.repeats, args.vocab, args.completion, head)))
        return

    print(f"machine: {common.machine_line()}")
    for head in args.heads:
        report(args, head, args.vocab or VOCAB[head])


def report(args: argparse.Namespace, head: str, vocab: int) -> None:
    tokens = f"{PROMPT + args.completion:,} tokens ({args.completion:,} completion)"
    print(f"\n{HEAD_TITLES[head]}: vocab {vocab:,}, one row of {tokens}, {args.device}")
    results = {}
    for setting in ["full", *map(str, args.chunks)]:
        command = [sys.executable, __file__, "--device", args.device, "--repeats", str(args.repeats)]
        command += ["--vocab", str(vocab), "--completion", str(args.completion), "--heads", head]
        out = subprocess.run([*command, "--child", setting], capture_output=True, text=True, check=True)
        results[setting] = json.loads(out.stdout.strip().splitlines()[-1])
    full = results["full"]
    rows = [
        [
            "full logits" if setting == "full" else f"chunked, {setting} tokens",
            r["peak_mib"],
            r["peak_mib"] / full["peak_mib"],
            r["seconds"],
            r["seconds"] / full["seconds"],
        ]
        for setting, r in results.items()
    ]
    common.print_table(
        ["log-probs", "peak MiB", "x full", "seconds (median)", "x full"],
        rows,
        title=f"{HEAD_TITLES[head]}: policy log-prob forward + backward, one process per setting",
    )


if __name__ == "__main__":
    main()
