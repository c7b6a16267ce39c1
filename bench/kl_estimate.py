"""`train.kl_estimate: zero` vs the paper's batch estimator: what skipping the KL forward saves.

Same model, uniform data, 2 workers x 0.5 CPU, global batch 16; runs alternate the two settings in one
Ray session. z0 = 0 is not the paper's estimator (README, "Training"): this is the price of the exact one.

    .venv/bin/python bench/kl_estimate.py [--rounds 2] [--steps 8] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics

import common


def main() -> None:
    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    data = common.write_dataset("uniform", args.steps * args.batch + args.batch)
    root = common.scratch_dir("bench-kl-")
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(model):,} parameters")
    common.ray_init()
    table, rates = common.alternating_runs(
        model,
        data,
        root,
        {estimate: {"train": {"kl_estimate": estimate}} for estimate in ("batch", "zero")},
        args.rounds,
        args.skip,
        cluster={"workers": 2, "cpus_per_worker": 0.5},
        train={"max_steps": args.steps, "micro_batch_size": args.batch // 2},
    )
    common.print_table(
        ["kl_estimate", "samples/s", "median s/step"],
        table,
        title=f"2 workers, {spec.name}, global batch {args.batch}, steps {args.skip + 1}-{args.steps}",
    )
    ratio = statistics.mean(rates["zero"]) / statistics.mean(rates["batch"])
    print(f"zero / batch samples/s: {ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="batch + zero pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figure")
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(parser, smoke={"rounds": 1, "steps": 3, "skip": 1, "batch": 4, "model": "tiny"})
    main()
