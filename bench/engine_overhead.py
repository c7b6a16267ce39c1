"""The training step in one process, no Ray: plain torch vs DeepSpeed ZeRO stage 0, 2 or 3 at world size 1.

Same batches (the uniform benchmark store, built by precompute when missing), 1 torch thread, 8 steps;
prints each step's seconds and the median of steps 3-8. Run each engine in its own process, several times:
on a shared machine the run-to-run spread is 10-20%.

    .venv/bin/python bench/engine_overhead.py plain|0|2|3 [--steps 8] [--batch 16]
    .venv/bin/python bench/engine_overhead.py --smoke      # ZeRO-3, the tiny model, 3 steps of 4 rows
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import common


def main(engine_kind: str, steps: int, batch: int, spec: common.ModelSpec) -> None:
    import torch

    from kto_ray.reference.precompute import precompute

    model_dir = common.build_model(spec)
    data = common.write_dataset("uniform", steps * batch + batch)
    cfg = common.bench_config(
        model_dir, data, common.CACHE, store=common.shared_store(model_dir, data),
        cluster={"workers": 1}, train={"micro_batch_size": batch, "max_steps": steps},
    )  # fmt: skip
    precompute(cfg)  # reuses the store when it is there (bench/offline_vs_online.py builds the same one)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM

    from kto_ray.store.format import open_store
    from kto_ray.training.schedule.batching import Schedule, collate
    from kto_ray.training.step import LossSettings, train_step

    table = open_store(cfg.store.path).read_split("train")
    schedule = Schedule(len(table), 1, batch, 1, cfg.train.seed)
    settings = LossSettings(cfg.train.beta, 1.0, 1.0)
    if engine_kind == "plain":
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model.config.use_cache = False
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
        engine = common.PlainEngine(model, optimizer, max_grad_norm=cfg.train.max_grad_norm)

        def reduce(t):
            return t
    else:
        import deepspeed

        from kto_ray.training.distributed import all_reduce_sum as reduce
        from kto_ray.training.engine import build_policy_engine, deepspeed_config

        rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555", "RANK": "0", "WORLD_SIZE": "1"}
        os.environ.update(rendezvous, LOCAL_RANK="0")
        from kto_ray.internals.deepspeed_private import skip_shm_comm_op

        skip_shm_comm_op(deepspeed)  # as the workers do: no JIT build of an op nothing calls
        deepspeed.init_distributed()
        cfg.deepspeed.stage = int(engine_kind)
        engine = build_policy_engine(cfg, deepspeed_config(cfg, 1), steps)
        engine.train()
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batches = [collate(table, rows, 0) for rows in schedule.rows_for(step, 0)]
        train_step(engine, batches, settings, reduce, 1)
        times.append(time.perf_counter() - start)
    common.print_table(
        ["engine", "step seconds", f"median of steps 3-{steps}"],
        [[engine_kind, " ".join(f"{t:.2f}" for t in times), statistics.median(times[2:])]],
        title=f"one training step in this process, 1 thread, micro-batch {batch}",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine", nargs="?", choices=("plain", "0", "2", "3"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch", type=int, default=16, help="rows per step (one micro-batch)")
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    args = common.parse_args(parser, smoke={"engine": "3", "steps": 3, "batch": 4, "model": "tiny"})
    if args.engine is None:
        parser.error("which engine: plain, 0, 2 or 3")
    main(args.engine, args.steps, args.batch, common.SPECS[args.model])
