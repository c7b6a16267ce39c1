"""Packed vs padded batches (`model.packed_batches`), interleaved in one process on the same rows.

Length-skewed data tokenized as precompute does, scored with the `small` Llama on 1 thread:
1. the reference pass's model batches: `length_buckets` of the (x, y) and (x, y_kl) sequences of each
   `--bucket-rows` rows (precompute's own loop, under inference_mode);
2. training micro-batches of `--batch` rows from kto-ray's schedule, random (`group_by_length: false`,
   the default) and grouped by length: the KL pass (no grad) and the policy pass (forward + backward).
Each layout runs once per round, padded and packed alternating, so machine load hits both alike;
tokens/s counts real tokens.

    .venv/bin/python bench/packing.py [--rows 512] [--batch 16] [--rounds 2] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time

import common


def _rows(cfg):
    from transformers import AutoTokenizer

    from kto_ray.data.prepare import prepare_text, tokenize_rows

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    text = prepare_text(cfg, tokenizer)
    rows = tokenize_rows(text.table.to_pydict(), tokenizer, cfg.data.max_length, cfg.data.max_prompt_length)
    return rows, tokenizer.pad_token_id


def reference_batches(rows, batch: int, bucket_rows: int):
    """(prompts, completions) of each model batch precompute's ReferenceLogprobs forms."""
    from kto_ray.models.logprobs import length_buckets

    out = []
    for start in range(0, len(rows["id"]), bucket_rows):
        part = slice(start, start + bucket_rows)
        prompts = list(rows["prompt_ids"][part]) * 2
        completions = list(rows["completion_ids"][part]) + list(rows["kl_completion_ids"][part])
        lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
        for chosen in length_buckets(lengths, batch):
            out.append(([prompts[i] for i in chosen], [completions[i] for i in chosen]))
    return out


def training_batches(rows, batch: int, group: bool):
    """(prompts, completions, kl completions) of the step schedule's micro-batches (1 worker)."""
    import numpy as np

    from kto_ray.training.schedule.batching import Schedule

    lengths = np.asarray([len(p) + len(c) for p, c in zip(rows["prompt_ids"], rows["completion_ids"])])
    schedule = Schedule(len(lengths), 1, batch, 1, seed=42, lengths=lengths if group else None)
    out = []
    for step in range(schedule.steps_per_epoch):
        (chosen,) = schedule.rows_for(step, 0)
        out.append(
            tuple([rows[k][i] for i in chosen] for k in ("prompt_ids", "completion_ids", "kl_completion_ids"))
        )
    return out


def time_reference(model, batches, layout, pad_id) -> tuple[int, float]:
    import torch

    from kto_ray.models.logprobs import sequence_logps

    tokens, began = 0, time.perf_counter()
    with torch.inference_mode():
        for prompts, completions in batches:
            packed = layout(prompts, completions, pad_id)
            sequence_logps(model, packed)
            tokens += packed.tokens
    return tokens, time.perf_counter() - began


def time_training(model, batches, layout, pad_id) -> tuple[int, float]:
    import torch

    from kto_ray.models.logprobs import sequence_logps

    tokens, began = 0, time.perf_counter()
    for prompts, completions, kl_completions in batches:
        kl = layout(prompts, kl_completions, pad_id)
        with torch.no_grad():
            sequence_logps(model, kl)
        policy = layout(prompts, completions, pad_id)
        sequence_logps(model, policy).sum().backward()
        tokens += kl.tokens + policy.tokens
    model.zero_grad(set_to_none=True)
    return tokens, time.perf_counter() - began


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kto_ray.models.logprobs import pad_sequences
    from kto_ray.models.packing import pack_sequences

    torch.set_num_threads(1)
    spec = common.SPECS[args.model]
    model_dir = common.build_model(spec)
    data = common.write_dataset("skewed", args.rows)
    cfg = common.bench_config(model_dir, data, common.scratch_dir("bench-packing-"))
    rows, pad_id = _rows(cfg)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(model_dir):,} parameters, 1 thread")
    print(f"skewed data: {common.length_summary(data)}")
    cases = {
        "reference pass (precompute's batches)": (
            time_reference,
            reference_batches(rows, args.batch, args.bucket_rows),
            lambda: model.eval(),
        ),
        "training, random micro-batches": (
            time_training,
            training_batches(rows, args.batch, False),
            model.train,
        ),
        "training, grouped by length": (time_training, training_batches(rows, args.batch, True), model.train),
    }
    layouts = {"padded": pad_sequences, "packed": pack_sequences}
    table = []
    for name, (timer, batches, mode) in cases.items():
        mode()
        rates: dict[str, list[float]] = {k: [] for k in layouts}
        for _ in range(args.rounds):
            for layout_name, layout in layouts.items():
                tokens, seconds = timer(model, batches, layout, pad_id)
                rates[layout_name].append(tokens / seconds)
        padded, packed = (statistics.mean(rates[k]) for k in layouts)
        print(f"{name}: padded {rates['padded']}, packed {rates['packed']} tokens/s", flush=True)
        table.append([name, len(batches), padded, packed, f"{packed / padded:.2f}x"])
    common.print_table(
        ["case", "model batches", "padded tokens/s", "packed tokens/s", "packed / padded"],
        table,
        title=f"{args.rows} skewed rows, batch {args.batch} rows, mean of {args.rounds} interleaved rounds",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--bucket-rows", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(
        parser, {"rows": 64, "batch": 8, "bucket_rows": 64, "rounds": 1, "model": "tiny"}
    )
    main()
