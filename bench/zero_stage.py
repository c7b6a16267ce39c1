"""ZeRO-3 vs ZeRO-2 on 2 workers: what ZeRO-3's per-layer parameter gathers cost when the model fits.

Same model, uniform data, 2 workers x 0.5 CPU, global batch 16; runs alternate stage 3 and stage 2 in
one Ray session. Not part of `make bench` (it is the measurement behind `kto-ray plan`'s stage-2 advice).

    .venv/bin/python bench/zero_stage.py [--rounds 2] [--steps 8] [--smoke]
"""

from __future__ import annotations

import argparse

import common


def main() -> None:
    common.two_variant_bench(
        args, "bench-zero-", "run", {f"ZeRO-{stage}": {"deepspeed": {"stage": stage}} for stage in (3, 2)}
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="stage 3 + stage 2 pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figure")
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(parser, smoke={"rounds": 1, "steps": 3, "skip": 1, "batch": 4, "model": "tiny"})
    main()
