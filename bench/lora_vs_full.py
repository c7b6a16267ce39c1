"""LoRA (peft) vs full fine-tuning: training samples/s and peak worker memory on the same run.

Same model, data, store, workers and steps; runs alternate (full, lora, full, lora, ...) in one Ray
session so drifting load on a shared machine hits both alike. The store is built once first.

What LoRA changes per worker (N base parameters, n adapter parameters, fp32 AdamW on CPU):
  memory: optimizer state 2 x 4N bytes -> 2 x 4n, gradients 4N -> 4n (ZeRO shards both by workers);
          the base weights (and activations) stay.
  compute: the backward skips the base weights' gradients (about a third of a step's FLOPs) but adds
          the adapters' small matmuls, so samples/s gains less than memory.

    .venv/bin/python bench/lora_vs_full.py [--rounds 2] [--steps 8] [--workers 2] [--rank 16] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics

import common


def run_one(cfg, name: str, lora: bool, skip: int) -> tuple[common.Steady, float, float]:
    from kto_ray.training.launch.driver import train

    cfg = cfg.model_copy(deep=True)
    cfg.run.name = name
    cfg.lora.enabled = lora
    with common.PeakMemory() as memory, common.timed() as wall:
        result = train(cfg)
    return common.steady_state(common.read_metrics(result.run_dir.local_path), skip), memory.max_mib, wall[0]


def main() -> None:
    from kto_ray.reference.precompute import precompute

    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    rows = args.steps * args.batch + args.batch  # one spare batch: max_steps always fits in one epoch
    data = common.write_dataset("uniform", rows)
    workers = args.workers
    root = common.scratch_dir("bench-lora-")
    cfg = common.bench_config(
        model,
        data,
        root,
        store=common.shared_store(model, data),
        cluster={"workers": workers, "cpus_per_worker": 1.0 if workers == 1 else 0.5},
        train={"max_steps": args.steps, "micro_batch_size": args.batch // workers},
        lora={"r": args.rank, "alpha": 2.0 * args.rank, "dropout": args.dropout},
        run={"export": False},
    )
    print(f"machine: {common.machine_line()}")
    print(
        f"model {spec.name}: {common.count_parameters(model):,} parameters; "
        f"LoRA r={args.rank}, all-linear, dropout {args.dropout}"
    )
    print(f"data: {common.length_summary(data)}")
    common.ray_init()
    with common.timed() as t:
        precompute(cfg)
    print(f"store ready in {t[0]:.1f}s (built once and reused; not in the figures)")

    table, speed, peaks = [], {"full": [], "lora": []}, {"full": [], "lora": []}
    for r in range(args.rounds):
        for kind in ("full", "lora"):
            steady, peak, wall = run_one(cfg, f"{kind}-{r}", kind == "lora", args.skip)
            speed[kind].append(steady.samples_per_s)
            peaks[kind].append(peak)
            table.append(
                [
                    f"{kind} #{r + 1}",
                    steady.samples_per_s,
                    statistics.median(steady.step_times),
                    wall,
                    peak,
                ]
            )
    common.print_table(
        ["run", "samples/s", "median s/step", "train() wall s", "peak RSS/worker MiB"],
        table,
        title=(
            f"LoRA vs full fine-tuning: {workers} worker(s), ZeRO-{cfg.deepspeed.stage}, global batch "
            f"{args.batch}, {args.steps} steps (first {args.skip} skipped)"
        ),
    )
    full, lora = statistics.mean(speed["full"]), statistics.mean(speed["lora"])
    print(
        f"lora/full samples/s: {lora / full:.2f}x; peak RSS/worker: full {min(peaks['full']):.0f} MiB, "
        f"lora {min(peaks['lora']):.0f} MiB (lora - full: {min(peaks['lora']) - min(peaks['full']):+.0f} MiB)"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="full+lora pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figure")
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    parser.add_argument("--workers", type=int, default=2, choices=(1, 2))
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank")
    # peft's dropout keeps a dropped copy of each adapted layer's input for backward: on a small model
    # these activations outweigh the optimizer state LoRA saves (0 isolates the model-state saving).
    parser.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (lora.dropout)")
    parser.add_argument("--model", default="medium", choices=sorted(common.SPECS))
    smoke = {"rounds": 1, "steps": 3, "skip": 1, "batch": 4, "workers": 1, "rank": 4, "model": "tiny"}
    args = common.parse_args(parser, smoke)
    main()
