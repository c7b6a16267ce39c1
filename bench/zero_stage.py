"""ZeRO-3 vs ZeRO-2 on 2 workers: what ZeRO-3's per-layer parameter gathers cost when the model fits.

Same model, uniform data, 2 workers x 0.5 CPU, global batch 16; runs alternate stage 3 and stage 2 in
one Ray session. Not part of `make bench` (it is the measurement behind `kto-ray plan`'s stage-2 advice).

    .venv/bin/python bench/zero_stage.py [--rounds 2] [--steps 8] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics

import common


def main() -> None:
    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    data = common.write_dataset("uniform", args.steps * args.batch + args.batch)
    root = common.scratch_dir("bench-zero-")
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(model):,} parameters")
    common.ray_init()
    table, rates = common.alternating_runs(
        model,
        data,
        root,
        {f"ZeRO-{stage}": {"deepspeed": {"stage": stage}} for stage in (3, 2)},
        args.rounds,
        args.skip,
        cluster={"workers": 2, "cpus_per_worker": 0.5},
        train={"max_steps": args.steps, "micro_batch_size": args.batch // 2},
    )
    common.print_table(
        ["run", "samples/s", "median s/step"],
        table,
        title=f"2 workers, {spec.name}, global batch {args.batch}, steps {args.skip + 1}-{args.steps}",
    )
    ratio = statistics.mean(rates["ZeRO-2"]) / statistics.mean(rates["ZeRO-3"])
    print(f"ZeRO-2 / ZeRO-3 samples/s: {ratio:.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="stage 3 + stage 2 pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figure")
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(parser, smoke={"rounds": 1, "steps": 3, "skip": 1, "batch": 4, "model": "tiny"})
    main()
