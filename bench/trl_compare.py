"""kto-ray vs TRL's KTOTrainer (precompute_ref_log_probs=True): same model, data, batch and machine.

1. Same computation first: on one batch, with a policy that differs from the reference, TRL's loss, z0
   (its `kl`) and gradient are compared with kto-ray's `train_step` (run on a plain module) given the
   same rows and the same KL pairs; token ids and reference log-probs are compared too.
2. Speed on two datasets (uniform and length-skewed lengths): kto-ray on 1 worker (1 CPU, so 1 torch
   thread) against TRL in one process with 1 thread, and kto-ray on 2 workers (0.5 CPU each, 1 thread
   each) against TRL with 2 threads. Each system runs as its users would: kto-ray with
   `train.group_by_length: true` (as in its real-model configs), TRL with its default random sampler.
   Both train two epochs of a dataset of `steps` batches; samples/s is over the second epoch, so every
   row counts once whatever order a system visits rows in. Wall times are the whole `train()` /
   `trainer.train()` call, setup is the reference pass.

    .venv/bin/python bench/trl_compare.py [--steps 6] [--batch 16] [--model small] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common

TRL_ARGS = {
    "beta": 0.1,
    "desirable_weight": 1.0,
    "undesirable_weight": 1.0,
    "learning_rate": 3e-4,  # configs/demo.yaml's train.lr
    "lr_scheduler_type": "constant",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "max_length": 512,
    "precompute_ref_log_probs": True,
    "use_cpu": True,
    "bf16": False,  # TRL's KTOConfig defaults to bf16 and gradient checkpointing; kto-ray on CPU uses neither
    "gradient_checkpointing": False,
    "report_to": [],
    "save_strategy": "no",
    "logging_steps": 10**6,
    "disable_tqdm": True,
    "dataloader_num_workers": 0,
    "seed": 42,
}


# ------------------------------------------------------------------------------------------- TRL side


def trl_trainer(
    model_dir: Path, rows: list[dict], batch: int, out: Path, ref_dir: Path | None = None, **extra
):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    from trl import KTOConfig, KTOTrainer

    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32) if ref_dir else None
    args = KTOConfig(output_dir=str(out), per_device_train_batch_size=batch, **(TRL_ARGS | extra))
    return KTOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def trl_child(spec: dict[str, Any]) -> None:
    """Runs in its own process (its own thread count and memory, Ray's worker niceness): prints one
    JSON line of figures."""
    common.at_worker_niceness()
    import torch
    from transformers import TrainerCallback

    torch.set_num_threads(spec["threads"])
    rows = [json.loads(line) for line in Path(spec["rows"]).read_text().splitlines()]
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    start = time.perf_counter()
    trainer = trl_trainer(
        Path(spec["model"]), rows, spec["batch"], Path(spec["out"]), max_steps=spec["steps"]
    )
    setup = time.perf_counter() - start
    trainer.add_callback(StepClock())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steps = [b - a for a, b in itertools.pairwise(ends)]
    result = {"setup": setup, "wall": wall, "step_times": steps, "peak_mib": common.self_peak_mib()}
    print("RESULT " + json.dumps(result), flush=True)


def run_trl(model: Path, rows_file: Path, threads: int, steps: int, batch: int, out: Path) -> dict[str, Any]:
    spec = {"model": str(model), "rows": str(rows_file), "threads": threads, "steps": steps}
    spec |= {"batch": batch, "out": str(out)}
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    proc = subprocess.run(
        [sys.executable, __file__, "--trl-child", json.dumps(spec)], env=env, capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"TRL run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


# ---------------------------------------------------------------------------------- same computation


def _grad_norm(model) -> float:
    import torch

    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def _sft_policy(spec: common.ModelSpec, rows: list[dict], steps: int = 8) -> Path:
    """The reference after a few supervised steps on `rows`: every completion (also the mismatched KL
    pairs') gets likelier, so z0 > 0 and the rewards differ by row: a check that can fail."""
    out = common.CACHE / f"{spec.name}-s0-sft{steps}"
    if (out / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kto_ray.data.tokenize import tokenize_batch
    from kto_ray.models.logprobs import pad_sequences, sequence_logps

    ref_dir = common.build_model(spec)
    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    model = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    toks = tokenize_batch(
        tokenizer,
        [r["prompt"] for r in rows],
        [r["completion"] for r in rows],
        max_length=512,
        max_prompt_length=256,
    )
    batch = pad_sequences(
        [t.prompt_ids for t in toks], [t.completion_ids for t in toks], tokenizer.pad_token_id
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = -sequence_logps(model, batch).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def same_loss_check(spec: common.ModelSpec, batch: int, root: Path) -> None:
    """kto-ray's step and TRL's loss on TRL's first batch, with a policy != reference."""
    import torch

    from kto_ray.data.tokenize import tokenize_batch
    from kto_ray.models.logprobs import pad_sequences, sequence_logps
    from kto_ray.training.batching import KTOBatch
    from kto_ray.training.step import LossSettings, train_step

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    ref_dir = common.build_model(spec)
    rows = common.arithmetic_rows(2 * batch, seed=7, skew="skewed")
    policy_dir = _sft_policy(spec, rows)
    weights = {"desirable_weight": 1.25, "undesirable_weight": 0.8}
    trainer = trl_trainer(policy_dir, rows, batch, root / "trl-check", ref_dir=ref_dir, **weights)
    policy, reference = trainer.model, trainer.ref_model
    first = trainer.train_dataset[:batch]
    inputs = next(iter(trainer.get_train_dataloader()))

    policy.train()
    policy.zero_grad(set_to_none=True)
    trl_loss = trainer.compute_loss(policy, inputs)
    trl_loss.backward()
    trl_metrics = trainer._metrics["train"]
    trl_grad, trl_kl, trl_loss = _grad_norm(policy), trl_metrics["kl"][-1], trl_loss.item()

    tokenizer = trainer.processing_class
    ours = tokenize_batch(
        tokenizer,
        [r["prompt"] for r in rows[:batch]],
        [r["completion"] for r in rows[:batch]],
        max_length=512,
        max_prompt_length=256,
    )
    same_ids = sum(
        t is not None and t.prompt_ids == p and t.completion_ids == c
        for t, p, c in zip(ours, first["prompt_ids"], first["completion_ids"])
    )
    pad = tokenizer.pad_token_id
    policy_batch = pad_sequences(first["prompt_ids"], first["completion_ids"], pad)
    kl_batch = pad_sequences(first["prompt_ids"], first["KL_completion_ids"], pad)
    with torch.no_grad():
        ref_y, ref_kl = sequence_logps(reference, policy_batch), sequence_logps(reference, kl_batch)
    ref_diff = max(
        float((ref_y - torch.tensor(first["ref_logps"])).abs().max()),
        float((ref_kl - torch.tensor(first["ref_KL_logps"])).abs().max()),
    )
    mb = KTOBatch(
        policy=policy_batch,
        kl=kl_batch,
        desirable=torch.tensor(first["label"], dtype=torch.bool),
        ref_logps=ref_y,
        ref_kl_logps=ref_kl,
        ids=torch.arange(batch),
    )
    policy.zero_grad(set_to_none=True)
    settings = LossSettings(TRL_ARGS["beta"], weights["desirable_weight"], weights["undesirable_weight"])
    ours_metrics = train_step(common.PlainEngine(policy), [mb], settings, lambda t: t, 1)
    ours_grad = _grad_norm(policy)

    table = [
        ["token ids equal (rows)", f"{batch}", f"{same_ids}/{batch}", ""],
        ["reference log-probs", "TRL precompute", "kto-ray sequence_logps", f"max abs diff {ref_diff:.2e}"],
        ["loss", trl_loss, ours_metrics["loss"], f"{abs(trl_loss - ours_metrics['loss']):.2e}"],
        ["z0 (TRL: kl)", trl_kl, ours_metrics["kl"], f"{abs(trl_kl - ours_metrics['kl']):.2e}"],
        *[
            [
                name,
                trl_metrics[name][-1],
                ours_metrics[name],
                f"{abs(trl_metrics[name][-1] - ours_metrics[name]):.2e}",
            ]
            for name in ("rewards/chosen", "rewards/rejected")
        ],
        ["grad norm", trl_grad, ours_grad, f"rel {abs(trl_grad - ours_grad) / trl_grad:.2e}"],
    ]
    common.print_table(
        ["quantity", "TRL", "kto-ray", "difference"],
        table,
        title=(
            f"same computation on one batch of {batch} skewed rows (policy = reference after 8 SFT steps, "
            "beta 0.1, lambda_D 1.25, lambda_U 0.8, TRL's KL pairs fed to both)"
        ),
    )


# ------------------------------------------------------------------------------------------------ speed


def kto_ray_runs(cfg, batch: int, rows_by_id: list[dict], root: Path):
    """Store (timed), then TRL's rows in the order of kto-ray's seeded shuffle (TRL builds its KL pairs
    within consecutive batches of its dataset, so it gets a shuffled one, as a user would give it)."""
    from kto_ray.reference.precompute import precompute
    from kto_ray.training.batching import Schedule

    with common.timed() as setup:
        store = precompute(cfg).store
    ids = store.read_split("train", columns=["id"])["id"].to_pylist()
    order = Schedule(len(ids), 1, batch, 1, cfg.train.seed).permutation(0)
    rows_file = root / f"trl-rows-{Path(cfg.data.paths[0]).stem}.jsonl"
    rows_file.write_text("".join(json.dumps(rows_by_id[ids[i]]) + "\n" for i in order))
    return setup[0], rows_file


def train_kto_ray(cfg, workers: int, batch: int, skip: int) -> tuple[common.Steady, float, float]:
    """Train `cfg` on `workers` workers; steady state over the steps after `skip`."""
    from kto_ray.training.driver import train

    cfg = cfg.model_copy(deep=True)
    cfg.run.name = f"kto-ray-{workers}w"
    cfg.cluster.workers = workers
    cfg.cluster.cpus_per_worker = 1.0 if workers == 1 else 0.5
    cfg.train.micro_batch_size = batch // workers
    with common.PeakMemory() as memory, common.timed() as wall:
        result = train(cfg)
    return common.steady_state(common.read_metrics(result.run_dir.local_path), skip), wall[0], memory.max_mib


HEADERS = [
    "data",
    "system",
    "samples/s",
    "s/step",
    "setup s",
    "train s",
    "total s",
    "peak RSS MiB",
    "kto-ray/TRL",
]


def speed(
    spec: common.ModelSpec,
    skews: list[common.Skew],
    steps: int,
    batch: int,
    root: Path,
    worker_counts: list[int],
):
    model = common.build_model(spec)
    table = []
    train = {"max_steps": 2 * steps, "micro_batch_size": batch, "group_by_length": True}
    for skew in skews:
        data = common.write_dataset(skew, steps * batch)  # one epoch = `steps` steps
        print(f"{skew}: {common.length_summary(data)}", flush=True)
        rows_by_id = [json.loads(line) for line in data.read_text().splitlines()]
        cfg = common.bench_config(model, data, root / skew, train=train)
        setup, rows_file = kto_ray_runs(cfg, batch, rows_by_id, root)
        for workers in worker_counts:
            trl = run_trl(model, rows_file, workers, 2 * steps, batch, root / f"trl-{skew}-{workers}")
            times = trl["step_times"][steps:]
            trl_rate = batch * len(times) / sum(times)
            total = trl["setup"] + trl["wall"]
            step = sum(times) / len(times)
            table.append(
                [
                    skew,
                    f"TRL, {workers} thread(s)",
                    trl_rate,
                    step,
                    trl["setup"],
                    trl["wall"],
                    total,
                    trl["peak_mib"],
                    "",
                ]
            )
            ours, wall, peak = train_kto_ray(cfg, workers, batch, skip=steps)
            ratio = f"{ours.samples_per_s / trl_rate:.2f}x"
            step = ours.seconds / ours.steps
            name = f"kto-ray, {workers} worker(s)"
            table.append([skew, name, ours.samples_per_s, step, setup, wall, setup + wall, peak, ratio])
    common.print_table(
        HEADERS,
        table,
        title=(
            f"kto-ray (group_by_length) vs TRL {_trl_version()} (random sampler): {spec.name}, batch "
            f"{batch}, 2 epochs of {steps} steps (samples/s over the second). setup = reference pass "
            "(kto-ray: precompute, one store for 1 and 2 workers; TRL: KTOTrainer init); "
            "train = train() / trainer.train(); kto-ray peak RSS is per worker"
        ),
    )


def _trl_version() -> str:
    import trl

    return trl.__version__


def main() -> None:
    spec = common.SPECS[args.model]
    root = common.scratch_dir("bench-trl-")
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(common.build_model(spec)):,} parameters")
    same_loss_check(spec, args.batch, root)
    common.ray_init()
    speed(spec, args.datasets, args.steps, args.batch, root, args.workers)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--trl-child":
        trl_child(json.loads(sys.argv[2]))
        raise SystemExit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6, help="steps per epoch (two epochs are run)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    parser.add_argument("--datasets", nargs="+", default=["uniform", "skewed"], choices=["uniform", "skewed"])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], choices=(1, 2))
    smoke = {"steps": 2, "batch": 4, "model": "tiny", "datasets": ["uniform"], "workers": [1]}
    args = common.parse_args(parser, smoke)
    main()
