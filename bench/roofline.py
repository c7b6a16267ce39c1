"""CPU roofline: this machine's matmul FLOP/s vs the FLOP/s a kto-ray training step achieves.

Peak: torch.matmul of large fp32 matrices (best of a few timed loops), on 1 and 2 threads, plus the
model's own GEMM shapes (what its Linear layers can reach at this batch). Achieved: a short offline
training run, FLOPs counted the usual way, 6N per policy token (forward + backward) + 2N per KL token
(forward only), N = all parameters, real tokens only (padding and attention FLOPs are not counted),
over the steady-state step_time of metrics.jsonl. Policy and KL token counts per step are recomputed
from the store with kto-ray's own batch schedule and checked against metrics.jsonl's `tokens`.

A Ray Train worker with 1 CPU runs torch on 1 thread, so 1 worker is held against the 1-thread peak
and 2 workers (0.5 CPU each, 1 thread each) against the 2-thread peak. The same step on a plain torch
module (kto_ray.training.step.train_step, torch AdamW, no Ray, no DeepSpeed; in a process of its own at the
niceness Ray gives its workers) shows what the framework costs.

    .venv/bin/python bench/roofline.py [--steps 8] [--batch 16] [--smoke]
"""

from __future__ import annotations

import argparse
import time

import common


def matmul_flops(m: int, k: int, n: int, threads: int, seconds: float = 1.5, reps: int = 3) -> float:
    """Best FLOP/s of (m x k) @ (k x n) fp32 over `reps` loops of ~`seconds` each."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.matmul(a, b)
        best = 0.0
        for _ in range(reps):
            count, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / reps:
                torch.matmul(a, b)
                count += 1
            best = max(best, 2 * m * k * n * count / (time.perf_counter() - start))
        return best
    finally:
        torch.set_num_threads(previous)


def linear_peak(spec: common.ModelSpec, tokens: int, threads: int, seconds: float) -> float:
    """FLOP/s of one decoder layer's Linear GEMMs at `tokens` rows (q, k, v, o; gate, up; down)."""
    h, i = spec.hidden, spec.intermediate
    shapes = {(tokens, h, h): 4, (tokens, h, i): 2, (tokens, i, h): 1}
    flops = {s: 2 * s[0] * s[1] * s[2] * n for s, n in shapes.items()}
    spent = sum(f / matmul_flops(*s, threads, seconds=seconds) for s, f in flops.items())
    return sum(flops.values()) / spent


def step_tokens(cfg, workers: int, steps: int) -> list[tuple[int, int]]:
    """(policy tokens, KL tokens) of every step, from the store and kto-ray's schedule."""
    import pyarrow.compute as pc

    from kto_ray.store.format import open_store
    from kto_ray.training.resume.global_batch import accumulation
    from kto_ray.training.schedule.batching import Schedule

    table = open_store(cfg.store.path).read_split("train")
    prompt = pc.list_value_length(table["prompt_ids"])
    own = pc.add(prompt, pc.list_value_length(table["completion_ids"])).to_numpy()
    kl = pc.add(prompt, pc.list_value_length(table["kl_completion_ids"])).to_numpy()
    t = cfg.train
    micro_batches = accumulation(cfg.first_global_batch, workers, t.micro_batch_size)
    schedule = Schedule.for_table(
        table, workers, t.micro_batch_size, micro_batches, t.seed, t.group_by_length
    )
    out = []
    for step in range(steps):
        rows = [r for rank in range(workers) for mb in schedule.rows_for(step, rank) for r in mb]
        out.append((int(own[rows].sum()), int(kl[rows].sum())))
    return out


def train_run(cfg, workers: int, skip: int, n_params: int) -> tuple[float, float]:
    """Achieved FLOP/s and samples/s of a real run (steady state)."""
    from kto_ray.training.launch.driver import train

    cfg = cfg.model_copy(deep=True)
    cfg.run.name = f"roofline-{workers}w"
    cfg.cluster.workers = workers
    cfg.cluster.cpus_per_worker = 1.0 if workers == 1 else 0.5
    cfg.train.micro_batch_size //= workers
    metrics = common.read_metrics(train(cfg).run_dir.local_path)
    tokens = step_tokens(cfg, workers, len(metrics))
    assert all(p + k == m["tokens"] for (p, k), m in zip(tokens, metrics)), "token counts differ from metrics"
    flops = sum(6 * n_params * p + 2 * n_params * k for p, k in tokens[skip:])
    seconds = sum(m["step_time"] for m in metrics[skip:])
    return flops / seconds, sum(m["rows"] for m in metrics[skip:]) / seconds


def plain_run(cfg, steps: int, skip: int, n_params: int) -> tuple[float, float]:
    """The same steps (1-worker schedule) with kto_ray.training.step.train_step on a plain module, 1 thread
    (run it in a process of its own: it sets the torch thread count)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_ray.store.format import open_store
    from kto_ray.training.schedule.batching import Schedule, collate
    from kto_ray.training.step import LossSettings, train_step

    torch.set_num_threads(1)
    table = open_store(cfg.store.path).read_split("train")
    pad_id = AutoTokenizer.from_pretrained(cfg.model.path).pad_token_id
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=0.0)
    engine = common.PlainEngine(model, optimizer, max_grad_norm=cfg.train.max_grad_norm)
    schedule = Schedule(len(table), 1, cfg.train.micro_batch_size, 1, cfg.train.seed)
    settings = LossSettings(cfg.train.beta, 1.0, 1.0)
    times = []
    for step in range(steps):
        start = time.perf_counter()
        batches = [collate(table, rows, pad_id) for rows in schedule.rows_for(step, 0)]
        train_step(engine, batches, settings, lambda t: t, 1)
        times.append(time.perf_counter() - start)
    tokens = step_tokens(cfg, 1, steps)
    flops = sum(6 * n_params * p + 2 * n_params * k for p, k in tokens[skip:])
    return flops / sum(times[skip:]), cfg.train.micro_batch_size * (steps - skip) / sum(times[skip:])


def measure_peaks(spec: common.ModelSpec, tokens: int) -> tuple[dict[int, float], dict[int, float]]:
    """Large-matmul and model-GEMM FLOP/s on 1 and 2 threads."""
    size = args.peak_size
    peaks = {t: matmul_flops(size, size, size, t, seconds=args.peak_seconds) for t in (1, 2)}
    return peaks, {t: linear_peak(spec, tokens, t, seconds=0.4 * args.peak_seconds) for t in (1, 2)}


def _flops(achieved: float, peak: float, model_peak: float) -> list[float]:
    return [achieved / 1e9, peak / 1e9, achieved / peak, achieved / model_peak]


def main() -> None:
    from kto_ray.reference.precompute import precompute

    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    n_params = common.count_parameters(model)
    data = common.write_dataset("uniform", args.steps * args.batch + args.batch)
    root = common.scratch_dir("bench-roof-")
    cfg = common.bench_config(
        model,
        data,
        root,
        store=common.shared_store(model, data),
        train={"max_steps": args.steps, "micro_batch_size": args.batch},
    )
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {n_params:,} parameters; data {common.length_summary(data)}")

    tokens = args.batch * 136  # rows x tokens per sequence of the uniform data (134 characters + BOS + EOS)
    peaks, model_peak = measure_peaks(spec, tokens)

    common.ray_init()
    precompute(cfg)
    runs = []  # (name, threads, samples/s, achieved FLOP/s)
    for workers in args.workers:
        achieved, samples = train_run(cfg, workers, args.skip, n_params)
        runs.append((f"kto-ray, {workers} worker(s)", workers, samples, achieved))
    achieved, samples = common.run_like_a_worker(plain_run, cfg, args.steps, args.skip, n_params)
    runs.append(("same step, plain torch (no Ray/DeepSpeed)", 1, samples, achieved))
    # Peaks again after the runs, keeping the best: a neighbour's load during one measurement would
    # otherwise understate what the machine can do (and flatter the ratios).
    later = measure_peaks(spec, tokens)
    peaks = {t: max(peaks[t], later[0][t]) for t in peaks}
    model_peak = {t: max(model_peak[t], later[1][t]) for t in model_peak}
    rows = [
        [name, threads, samples, *_flops(achieved, peaks[threads], model_peak[threads])]
        for name, threads, samples, achieved in runs
    ]
    common.print_table(
        ["run", "threads", "samples/s", "achieved GFLOP/s", "peak GFLOP/s", "of peak", "of model-GEMM peak"],
        rows,
        title=(
            f"roofline: {spec.name}, batch {args.batch}, uniform data, steps {args.skip + 1}-{args.steps}; "
            f"peak = {args.peak_size}^3 fp32 matmul; model-GEMM peak = its Linear GEMMs at {tokens} tokens "
            f"({model_peak[1] / 1e9:.0f} / {model_peak[2] / 1e9:.0f} GFLOP/s on 1 / 2 threads)"
        ),
    )
    print("target: >= 0.5 of peak")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    parser.add_argument("--peak-size", type=int, default=2048, help="the peak's square matmul size")
    parser.add_argument("--peak-seconds", type=float, default=1.5, help="time per peak measurement")
    smoke = {"steps": 3, "skip": 1, "batch": 4, "model": "tiny", "workers": [1]}
    args = common.parse_args(parser, smoke | {"peak_size": 256, "peak_seconds": 0.1})
    main()
