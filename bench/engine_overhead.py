"""The training step in one process, no Ray: plain torch vs DeepSpeed ZeRO stage 0, 2 or 3 at world size 1.

Same batches (the uniform benchmark store), 1 torch thread, 8 steps; prints each step's seconds and the
median of steps 3-8. Run each engine in its own process, several times: on a shared machine the run-to-run
spread is 10-20%.

    .venv/bin/python bench/engine_overhead.py plain|0|2|3
"""

from __future__ import annotations

import os
import statistics
import sys
import time

import common


def main(engine_kind: str) -> None:
    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from kto_ray.reference.store import open_store
    from kto_ray.training.batching import Schedule, collate
    from kto_ray.training.step import LossSettings, train_step

    model_dir = common.build_model(common.SMALL)
    data = common.write_dataset("uniform", 144)
    cfg = common.make_config(
        model_dir, data, common.CACHE, store=common.shared_store(model_dir, data),
        cluster={"workers": 1}, train={"micro_batch_size": 16, "max_steps": 8},
    )  # fmt: skip
    table = open_store(cfg.store.path).read_split("train")  # built by bench/offline_vs_online.py
    schedule = Schedule(len(table), 1, 16, 1, cfg.train.seed)
    settings = LossSettings(cfg.train.beta, 1.0, 1.0)
    if engine_kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        engine = common.PlainEngine(model, optimizer, cfg.train.max_grad_norm)

        def reduce(t):
            return t
    else:
        import deepspeed

        from kto_ray.training.distributed import all_reduce_sum as reduce
        from kto_ray.training.engine import build_policy_engine, deepspeed_config

        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "RANK": "0", "WORLD_SIZE": "1"}
        os.environ.update(rendezvous, LOCAL_RANK="0")
        deepspeed.init_distributed()
        cfg.deepspeed.stage = int(engine_kind)
        engine = build_policy_engine(cfg, deepspeed_config(cfg, 1), 8)
        engine.train()
    times = []
    for step in range(8):
        start = time.perf_counter()
        batches = [collate(table, rows, 0) for rows in schedule.rows_for(step, 0)]
        train_step(engine, batches, settings, reduce, 1)
        times.append(time.perf_counter() - start)
    steps = " ".join(f"{t:.2f}" for t in times)
    print(f"{engine_kind}: step seconds {steps}; median of steps 3-8 {statistics.median(times[2:]):.2f}")


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ("plain", "0", "2", "3"):
        raise SystemExit(__doc__)
    main(sys.argv[1])
