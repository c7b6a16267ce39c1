"""`train.loss: apo_zero_unpaired` (z0 = 0) vs KTO's batch estimator: what skipping the KL forward saves.

Same model, uniform data, 2 workers x 0.5 CPU, global batch 16; runs alternate the two settings in one
Ray session. z0 = 0 is not the paper's estimator (README, "Training"): this is the price of the exact one.

    .venv/bin/python bench/loss_kind.py [--rounds 2] [--steps 8] [--smoke]
"""

from __future__ import annotations

import argparse

import common


def main() -> None:
    common.two_variant_bench(
        args,
        "bench-kl-",
        "train.loss",
        {loss: {"train": {"loss": loss}} for loss in ("kto", "apo_zero_unpaired")},
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2, help="kto + apo_zero_unpaired pairs")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2, help="warm-up steps left out of the figure")
    parser.add_argument("--batch", type=int, default=16, help="global batch (rows per optimizer step)")
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(parser, smoke={"rounds": 1, "steps": 3, "skip": 1, "batch": 4, "model": "tiny"})
    main()
