"""kto-ray vs TRL's KTOTrainer (precompute_ref_log_probs=True): same model, data, batch and machine.

1. Same computation first: on one batch, with a policy that differs from the reference, TRL's loss, z0
   (its `kl`) and gradient are compared with kto-ray's `train_step` (run on a plain module) given the
   same rows and the same KL pairs; token ids and reference log-probs are compared too.
2. Speed on two datasets (uniform and length-skewed lengths): kto-ray on 1 worker (1 CPU, so 1 torch
   thread) against TRL in one process with 1 thread, and kto-ray on 2 workers (0.5 CPU each, 1 thread
   each) against TRL with 2 threads, and against TRL as its multi-GPU users run it: `accelerate launch`
   with 2 processes of 1 thread under DeepSpeed ZeRO-3 and ZeRO-2 (gloo on CPU). Each system runs as
   its users would: kto-ray with `train.group_by_length: true` (as in its real-model configs), TRL
   with its default random sampler. kto-ray's ZeRO stage is `--stage` (default `auto`: the fastest
   setting that fits, as `deepspeed.stage: auto` picks it for a user) and `--packed` turns on
   `model.packed_batches`.
   Both train two epochs of a dataset of `steps` batches; samples/s is over the second epoch, so every
   row counts once whatever order a system visits rows in. Wall times are the whole `train()` /
   `trainer.train()` call, setup is the reference pass.

    .venv/bin/python bench/trl_compare.py [--steps 6] [--batch 16] [--model small] [--trl-zero 3 2]
        [--stage auto|2|3] [--packed] [--smoke]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import yaml

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
    model_dir: Path, rows: list[dict] | Path, batch: int, out: Path, ref_dir: Path | None = None, **extra
):
    """TRL's KTOTrainer on `rows` (a list, or a JSON-lines file: under `accelerate launch` the processes
    must share the dataset's cache files, which a file-backed dataset keeps beside `out`)."""
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
        train_dataset=(
            Dataset.from_list(rows)
            if isinstance(rows, list)
            else Dataset.from_json(str(rows), cache_dir=str(out / "datasets-cache"))
        ),
        processing_class=tokenizer,
    )


def trl_child(spec: dict[str, Any]) -> None:
    """Runs in its own process (its own thread count and memory, Ray's worker niceness): prints one
    JSON line of figures."""
    common.at_worker_niceness()
    import torch
    from transformers import TrainerCallback

    if spec["flush_denormals"]:  # as kto-ray's workers do: a process flag any TRL user can set too
        torch.set_flush_denormal(True)
    torch.set_num_threads(spec["threads"])
    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            ends.append(time.perf_counter())

    start = time.perf_counter()
    trainer = trl_trainer(
        Path(spec["model"]), Path(spec["rows"]), spec["batch"], Path(spec["out"]), max_steps=spec["steps"]
    )
    setup = time.perf_counter() - start
    trainer.add_callback(StepClock())
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    steps = [b - a for a, b in itertools.pairwise(ends)]
    result = {"setup": setup, "wall": wall, "step_times": steps, "peak_mib": common.self_peak_mib()}
    if int(os.environ.get("RANK", "0")) == 0:
        print("RESULT " + json.dumps(result), flush=True)


@dataclass(frozen=True)
class TRLSetup:
    """How TRL runs: one process with `threads` torch threads, or `accelerate launch` with `processes`
    processes of one thread each under DeepSpeed ZeRO `zero_stage` (gloo on CPU), as its multi-GPU
    users run it."""

    threads: int = 1
    processes: int = 1
    zero_stage: int | None = None

    @property
    def name(self) -> str:
        if self.zero_stage is None:
            return f"TRL, {self.threads} thread(s)"
        return f"TRL, accelerate {self.processes} proc ZeRO-{self.zero_stage}"

    def command(self, spec: dict[str, Any]) -> list[str]:
        child = [__file__, "--trl-child", json.dumps(spec)]
        if self.zero_stage is None:
            return [sys.executable, *child]
        launch = ["--num_processes", str(self.processes), "--num_machines", "1", "--mixed_precision", "no"]
        launch += [
            "--use_deepspeed",
            "--zero_stage",
            str(self.zero_stage),
            "--num_cpu_threads_per_process",
            "1",
        ]
        launch += ["--main_process_port", str(_free_port())]
        return [sys.executable, "-m", "accelerate.commands.launch", *launch, *child]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_trl(
    model: Path, rows_file: Path, setup: TRLSetup, steps: int, batch: int, out: Path, flush: bool
) -> dict[str, Any]:
    """One TRL run as `setup` says; `batch` is the global batch (split over the processes); `flush`:
    subnormal floats flushed to zero in every process, as kto-ray flushes them."""
    spec = {"model": str(model), "rows": str(rows_file), "threads": setup.threads, "steps": steps}
    spec |= {"flush_denormals": flush}
    spec |= {"batch": batch // setup.processes, "out": str(out)}
    env = os.environ | {"OMP_NUM_THREADS": str(setup.threads), "TQDM_DISABLE": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(setup.command(spec), env=env, capture_output=True, text=True)
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
    from kto_ray.training.schedule.batching import KTOBatch
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
    from kto_ray.training.schedule.batching import Schedule

    with common.timed() as setup:
        store = precompute(cfg).store
    ids = store.read_split("train", columns=["id"])["id"].to_pylist()
    order = Schedule(len(ids), 1, batch, 1, cfg.train.seed).permutation(0)
    rows_file = root / f"trl-rows-{Path(cfg.data.paths[0]).stem}.jsonl"
    rows_file.write_text("".join(json.dumps(rows_by_id[ids[i]]) + "\n" for i in order))
    return setup[0], rows_file


def train_kto_ray(cfg, workers: int, batch: int, skip: int) -> tuple[common.Steady, float, float, str]:
    """Train `cfg` on `workers` workers; steady state over the steps after `skip`, and the ZeRO stage
    the run used (what `auto` resolved to)."""
    from kto_ray.training.launch.driver import train

    cfg = cfg.model_copy(deep=True)
    cfg.run.name = f"kto-ray-{workers}w"
    cfg.cluster.workers = workers
    cfg.cluster.cpus_per_worker = 1.0 if workers == 1 else 0.5
    cfg.train.micro_batch_size = batch // workers
    with common.PeakMemory() as memory, common.timed() as wall:
        result = train(cfg)
    run_dir = result.run_dir.local_path
    stage = yaml.safe_load((run_dir / "config.yaml").read_text())["deepspeed"]["stage"]
    return common.steady_state(common.read_metrics(run_dir), skip), wall[0], memory.max_mib, str(stage)


HEADERS = [
    "data",
    "system",
    "samples/s",
    "s/step",
    "setup s",
    "train s",
    "total s",
    "peak RSS MiB",
    "s/step min / median / max",
    "kto-ray/TRL samples/s",
    "TRL/kto-ray total s",
]


def trl_setups(workers: int, zero_stages: list[int]) -> list[TRLSetup]:
    """TRL beside kto-ray on `workers` workers: one process with as many threads, and at 2 workers also
    `accelerate launch` with 2 processes under each of `zero_stages`."""
    setups = [TRLSetup(threads=workers)]
    if workers > 1:
        setups += [TRLSetup(processes=workers, zero_stage=stage) for stage in zero_stages]
    return setups


def spread(step_times: list[float] | tuple[float, ...]) -> str:
    """min / median / max seconds per step: an outlier step shows here, not only in the mean."""
    return f"{min(step_times):.2f} / {statistics.median(step_times):.2f} / {max(step_times):.2f}"


def speed(
    spec: common.ModelSpec,
    skews: list[common.Skew],
    steps: int,
    batch: int,
    root: Path,
    worker_counts: list[int],
    zero_stages: list[int],
    stage: str,
    packed: bool,
    trl_flush: bool,
):
    model = common.build_model(spec)
    table = []
    train = {"max_steps": 2 * steps, "micro_batch_size": batch, "group_by_length": True}
    kto_sections = {
        "deepspeed": {"stage": stage if stage == "auto" else int(stage)},
        "model": {"packed_batches": packed},
    }
    for skew in skews:
        data = common.write_dataset(skew, steps * batch)  # one epoch = `steps` steps
        print(f"{skew}: {common.length_summary(data)}", flush=True)
        rows_by_id = [json.loads(line) for line in data.read_text().splitlines()]
        cfg = common.bench_config(model, data, root / skew, train=train, **kto_sections)
        setup, rows_file = kto_ray_runs(cfg, batch, rows_by_id, root)
        for workers in worker_counts:
            trl_runs = []
            for trl_setup in trl_setups(workers, zero_stages):
                out = root / f"trl-{skew}-{len(trl_runs)}-{workers}"
                trl = run_trl(model, rows_file, trl_setup, 2 * steps, batch, out, trl_flush)
                trl_runs.append((trl_setup, trl))
            ours, wall, peak, used_stage = train_kto_ray(cfg, workers, batch, skip=steps)
            for trl_setup, trl in trl_runs:
                times = trl["step_times"][steps:]
                trl_rate = batch * len(times) / sum(times)
                total = trl["setup"] + trl["wall"]
                row = [skew, trl_setup.name, trl_rate, sum(times) / len(times), trl["setup"], trl["wall"]]
                row += [total, trl["peak_mib"], spread(times), f"{ours.samples_per_s / trl_rate:.2f}x"]
                table.append([*row, f"{total / (setup + wall):.2f}x"])
            name = f"kto-ray, {workers} worker(s) ZeRO-{used_stage}" + (", packed" if packed else "")
            step = ours.seconds / ours.steps
            row = [skew, name, ours.samples_per_s, step, setup, wall, setup + wall, peak]
            table.append([*row, spread(ours.step_times), "", ""])
    common.print_table(
        HEADERS,
        table,
        title=(
            f"kto-ray (group_by_length) vs TRL {_trl_version()} (random sampler): {spec.name}, global batch "
            f"{batch}, 2 epochs of {steps} steps (samples/s over the second). setup = reference pass "
            "(kto-ray: precompute, one store for 1 and 2 workers; TRL: KTOTrainer init); "
            "train = train() / trainer.train(); peak RSS is per process (kto-ray: per worker); "
            f"subnormal floats flushed in TRL's processes: {'yes' if trl_flush else 'no'} (kto-ray: always); "
            "ratios above 1 favour kto-ray"
        ),
    )


def _trl_version() -> str:
    import trl

    return trl.__version__


def main() -> None:
    spec = common.SPECS[args.model]
    root = common.scratch_dir("bench-trl-")
    print(f"machine: {common.machine_line()}")
    print(f"versions: {common.versions_line()}")
    print(f"model {spec.name}: {common.count_parameters(common.build_model(spec)):,} parameters")
    same_loss_check(spec, args.batch, root)
    common.ray_init()
    speed(
        spec,
        args.datasets,
        args.steps,
        args.batch,
        root,
        args.workers,
        args.trl_zero,
        args.stage,
        args.packed,
        not args.trl_no_flush,
    )


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
    parser.add_argument(
        "--trl-zero",
        type=int,
        nargs="*",
        default=[3, 2],
        choices=(2, 3),
        help="ZeRO stages of the `accelerate launch` TRL rows at 2 workers (none: no such rows)",
    )
    parser.add_argument(
        "--stage",
        default="auto",
        choices=("auto", "2", "3"),
        help="kto-ray's deepspeed.stage (auto: the fastest that fits, as a user's `stage: auto` picks)",
    )
    parser.add_argument("--packed", action="store_true", help="kto-ray with model.packed_batches on")
    parser.add_argument(
        "--trl-no-flush",
        action="store_true",
        help="TRL as shipped: without torch.set_flush_denormal(True), which kto-ray's processes set",
    )
    smoke = {
        "steps": 2,
        "batch": 4,
        "model": "tiny",
        "datasets": ["uniform"],
        "workers": [2],
        "trl_zero": [],  # `accelerate launch` under ZeRO-3 is TRL's own path, the slowest part
    }
    args = common.parse_args(parser, smoke)
    main()
