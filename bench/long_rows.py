"""Steps of long rows against the same batches through a plain transformers model: a step's time must
follow its padded shape, whatever the training did to the model (BENCHMARKS.md, "Long rows").

kto-ray trains `--steps` steps on 1 worker (1 CPU, ZeRO-2, `train.group_by_length`) on the length-skewed
arithmetic data, so the longest rows share a step. Then this process, at a Ray worker's niceness with 1
torch thread, replays each step's batches (kto-ray's own schedule and collate) through the untrained
transformers model: the KL batch forward without gradients, the (x, y) batch forward and backward of a
plain loss. That is the work of a step at a normal cost; the ratio kto-ray / plain shows a step that
costs more than its shape: subnormal floats (kto_ray/models/denormals.py) made the long steps of this
run 6-12x their replay before they were flushed. Each rank's `denormals_flushed` (workers.json) is
printed too.

    .venv/bin/python bench/long_rows.py [--steps 12] [--rows 96] [--batch 16] [--model small]
        [--check MAX_RATIO] [--smoke]

`--check R` exits 1 when a long-row step's ratio (a step of twice the median step's tokens or more) is
above R or a rank did not flush: tests/models/test_denormals.py runs it in CI, a ratio measured in one
run rather than an absolute time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import common


def kto_ray_steps(cfg) -> tuple[list[dict], list[dict]]:
    """kto-ray's metrics records and workers.json's ranks of one run of `cfg`."""
    from kto_ray.reference.precompute import precompute
    from kto_ray.training.launch.driver import train

    precompute(cfg)
    run_dir = train(cfg).run_dir.local_path
    groups = json.loads((run_dir / "workers.json").read_text())["groups"]
    return common.read_metrics(run_dir), groups[-1]["workers"]


def replay(model_dir: str, store: str, steps: int, batch: int, seed: int) -> list[float]:
    """Seconds of each step's batches through the plain model (in a fresh process, like a worker)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_ray.models.logprobs import sequence_logps
    from kto_ray.store.format import open_store
    from kto_ray.training.schedule.batching import Schedule, collate

    torch.set_num_threads(1)
    table = open_store(store).read_split("train")
    schedule = Schedule.for_table(table, 1, batch, 1, seed, group=True)
    pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    seconds = []
    for step in range(steps):
        mb = collate(table, schedule.rows_for(step, 0)[0], pad_id)
        began = time.perf_counter()
        with torch.no_grad():
            sequence_logps(model, mb.kl)
        (-sequence_logps(model, mb.policy).mean()).backward()
        model.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - began)
    return seconds


def count_subnormals(model_dir: str, store: str, steps: int, batch: int, cfg_tree: dict, flush: bool):
    """kto-ray's own `train_step` on the run's batches in this process (a plain module and AdamW with
    the run's settings), counting the subnormal float32 values every op of each step produced; with
    `flush`, as the workers run now. Returns the counts per step and the final weights."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_ray.config import KTOConfig
    from kto_ray.store.format import open_store
    from kto_ray.training.schedule.batching import Schedule, collate
    from kto_ray.training.step import LossSettings, train_step

    tiny = torch.finfo(torch.float32).tiny

    class Subnormals(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.found, self.values = 0, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.is_view or func.name().startswith("aten::empty"):  # computed elsewhere, or garbage
                return out
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                    size = t.detach().abs()
                    self.found += int(((size > 0) & (size < tiny)).sum())
                    self.values += t.numel()
            return out

    torch.set_num_threads(1)
    torch.set_flush_denormal(flush)
    cfg = KTOConfig.model_validate(cfg_tree).train
    table = open_store(store).read_split("train")
    schedule = Schedule.for_table(table, 1, batch, 1, cfg.seed, group=True)
    pad_id = AutoTokenizer.from_pretrained(model_dir).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    engine = common.PlainEngine(model, optimizer, max_grad_norm=cfg.max_grad_norm)
    settings = LossSettings(cfg.beta, 1.0, cfg.undesirable_weight)
    counts = []
    for step in range(steps):
        mb = collate(table, schedule.rows_for(step, 0)[0], pad_id)
        with Subnormals() as mode:
            train_step(engine, [mb], settings, lambda t: t, 1)
        counts.append((mode.found, mode.values))
    return counts, torch.cat([p.detach().flatten() for p in model.parameters()])


def subnormal_table(model, cfg, metrics) -> None:
    replay_args = (str(model), cfg.store.path, args.steps, args.batch, cfg.model_dump(mode="json"))
    kept, weights_kept = common.run_like_a_worker(count_subnormals, *replay_args, False)
    flushed, weights_flushed = common.run_like_a_worker(count_subnormals, *replay_args, True)
    rows = [
        [m["step"], m["tokens"], f"{a:,} ({a / n:.1e})", f"{b:,}"]
        for m, (a, n), (b, _) in zip(metrics, kept, flushed)
    ]
    common.print_table(
        ["step", "tokens", "subnormal values computed (share)", "with flushing"],
        rows,
        title="kto-ray's train_step on the same batches in one process, every op's float32 outputs counted",
    )
    diff = float((weights_kept - weights_flushed).abs().max())
    print(f"weights after {args.steps} steps, flushed vs not: max abs difference {diff:.3g}")


def main() -> int:
    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    data = common.write_dataset("skewed", args.rows)
    root = common.scratch_dir("bench-long-rows-")
    train = {"max_steps": args.steps, "micro_batch_size": args.batch, "group_by_length": True}
    cfg = common.bench_config(
        model, data, root, train=train, deepspeed={"stage": 2}, cluster={"workers": 1, "cpus_per_worker": 1.0}
    )
    print(f"machine: {common.machine_line()}")
    print(f"versions: {common.versions_line()}")
    print(f"{spec.name}, skewed data: {common.length_summary(data)}")
    common.ray_init()
    metrics, ranks = kto_ray_steps(cfg)
    plain = common.run_like_a_worker(
        replay, str(model), cfg.store.path, args.steps, args.batch, cfg.train.seed
    )
    table, ratios = [], []
    for record, seconds in zip(metrics, plain):
        ratio = record["step_time"] / seconds
        ratios.append(ratio)
        table.append([record["step"], record["rows"], record["tokens"], record["step_time"], seconds, ratio])
    common.print_table(
        ["step", "rows", "tokens", "kto-ray s", "plain fwd+bwd s", "kto-ray / plain"],
        table,
        title=(
            f"{spec.name}, batch {args.batch}, 1 worker ZeRO-2, group_by_length: each step against the same "
            "batches through plain transformers (KL forward + forward/backward), 1 thread"
        ),
    )
    flushed = [rank.get("denormals_flushed") for rank in ranks]
    # The long-row steps: twice the median step's tokens or more (seconds long, so load noise is small).
    median_tokens = statistics.median(record["tokens"] for record in metrics)
    long_ratios = [r for r, m in zip(ratios, metrics) if m["tokens"] >= 2 * median_tokens] or ratios
    print(f"kto-ray / plain: median {statistics.median(ratios):.2f}x, max {max(ratios):.2f}x")
    print(f"kto-ray / plain on the long-row steps: max {max(long_ratios):.2f}x")
    print(f"denormals flushed on the ranks: {flushed}")
    if args.subnormals:
        subnormal_table(model, cfg, metrics)
    if args.check is not None and (max(long_ratios) > args.check or not all(flushed)):
        print(f"FAILED: a long step over {args.check}x its replay, or a rank not flushing", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rows", type=int, default=96, help="rows of skewed data (steps per epoch x batch)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    parser.add_argument(
        "--subnormals",
        action="store_true",
        help="also count the subnormal values each step computes, with and without flushing (slow)",
    )
    parser.add_argument("--check", type=float, default=None, help="exit 1 above this kto-ray/plain ratio")
    args = common.parse_args(parser, {"steps": 2, "rows": 8, "batch": 4, "model": "tiny"})
    sys.exit(main())
