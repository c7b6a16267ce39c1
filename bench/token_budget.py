"""Token-budget micro-batches (`train.micro_batch_tokens`) vs fixed micro-batches, on length-skewed rows.

kto-ray's own step (`kto_ray.training.step.train_step`, with `tests.helpers.PlainEngine` and AdamW in
place of DeepSpeed: one process, no Ray) on the `small` Llama, 1 thread. The same schedule (random
order, `group_by_length: false`) gives both settings the same rows per step, `--micro` x `--accumulation`:
- fixed: `--accumulation` micro-batches of `--micro` rows, each padded (or packed) as it comes;
- budget: the step's rows cut longest first into micro-batches of at most `--budget` tokens
  (training/schedule/token_budget.py).
Each setting is a fresh subprocess: samples/s over the steps after the first (`--steps` in all), and
peak memory, the subprocess's VmHWM and its rise over its RSS once the model and optimizer are built
(the activations' peak: set by the largest micro-batch). The losses of both must agree (the same math).

    .venv/bin/python bench/token_budget.py [--rows 256] [--micro 4] [--accumulation 4] [--budget 512]
        [--steps 4] [--packed]
"""

from __future__ import annotations

import argparse
import multiprocessing
import time

import common


def _table(cfg):
    import pyarrow as pa
    import torch
    from packing import _rows

    rows, pad_id = _rows(cfg)
    n = len(rows["id"])
    gen = torch.Generator().manual_seed(0)
    rows = {k: rows[k] for k in ("id", "prompt_ids", "completion_ids", "kl_completion_ids")}
    rows["label"] = [i % 2 == 0 for i in range(n)]
    rows["ref_logps"] = (-100 * torch.rand(n, generator=gen)).tolist()
    rows["ref_kl_logps"] = (-100 * torch.rand(n, generator=gen)).tolist()
    return pa.table(rows), pad_id


def run_setting(setting: str, args: argparse.Namespace, queue) -> None:
    import numpy as np
    import pyarrow as pa
    import torch
    from transformers import AutoModelForCausalLM

    from kto_ray.training.schedule.batching import Schedule, collate
    from kto_ray.training.schedule.token_budget import budget_batches
    from kto_ray.training.step import LossSettings, train_step

    torch.set_num_threads(1)
    model_dir = common.build_model(common.SPECS[args.model])
    data = common.write_dataset("skewed", args.rows)
    table, pad_id = _table(common.bench_config(model_dir, data, common.scratch_dir("bench-budget-")))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    engine = common.PlainEngine(model, torch.optim.AdamW(model.parameters(), lr=1e-5), args.accumulation)
    schedule = Schedule(len(table), 1, args.micro, args.accumulation, seed=42)
    settings = LossSettings(beta=0.1, desirable_weight=1.0, undesirable_weight=1.0)
    baseline = common.status_kib("self", ("VmRSS",))["VmRSS"] / 1024
    times, losses, forwards = [], [], 0
    for step in range(args.steps):
        parts = [table.take(pa.array(rows)) for rows in schedule.rows_for(step, 0)]
        filler = None
        if setting == "fixed":
            batches = [collate(part, np.arange(len(part)), pad_id, args.packed) for part in parts]
        else:
            batches, filler = budget_batches(pa.concat_tables(parts), args.budget, pad_id, args.packed)
        began = time.perf_counter()
        metrics = train_step(engine, batches, settings, lambda t: t, 1, filler=filler)
        times.append(time.perf_counter() - began)
        losses.append(metrics["loss"])
        forwards += len(batches)
    steady = times[1:] or times
    queue.put(
        {
            "samples/s": args.micro * args.accumulation * len(steady) / sum(steady),
            "micro-batches/step": forwards / args.steps,
            "peak MiB": common.self_peak_mib(),
            "rise MiB": common.self_peak_mib() - baseline,
            "losses": losses,
        }
    )


def main() -> None:
    context = multiprocessing.get_context("spawn")
    print(f"machine: {common.machine_line()}")
    print(f"skewed data: {common.length_summary(common.write_dataset('skewed', args.rows))}")
    results = {}
    for setting in ("fixed", "budget"):
        queue = context.Queue()
        process = context.Process(target=run_setting, args=(setting, args, queue))
        process.start()
        results[setting] = queue.get()
        process.join()
        print(f"{setting}: {results[setting]}", flush=True)
    for a, b in zip(results["fixed"]["losses"], results["budget"]["losses"]):
        assert abs(a - b) < 1e-4, (a, b)  # the same step: only the cut into forwards differs
    layout = "packed" if args.packed else "padded"
    label = {
        "fixed": f"fixed, {args.micro} rows x {args.accumulation}",
        "budget": f"budget, {args.budget} tokens",
    }
    common.print_table(
        ["micro-batches", "per step", "samples/s", "peak RSS MiB", "rise over model + optimizer MiB"],
        [
            [label[k], r["micro-batches/step"], r["samples/s"], r["peak MiB"], r["rise MiB"]]
            for k, r in results.items()
        ],
        title=f"{args.rows} skewed rows, {args.micro * args.accumulation} rows per step, {layout}, "
        f"{args.steps} steps (the first not timed)",
    )
    fixed, budget = results["fixed"], results["budget"]
    print(f"budget / fixed samples/s: {budget['samples/s'] / fixed['samples/s']:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--accumulation", type=int, default=4)
    parser.add_argument("--budget", type=int, default=512)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--packed", action="store_true")
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(
        parser, {"rows": 64, "micro": 2, "accumulation": 2, "budget": 128, "steps": 2, "model": "tiny"}
    )
    main()
