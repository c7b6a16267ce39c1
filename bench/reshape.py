"""Reshaping a ZeRO checkpoint for a new worker count: time and extra disk per GB of checkpoint.

Saves a real checkpoint of the policy engine at `--from` ranks (one optimizer step on gloo, CPU, fp32,
each rank its own process), converts it with kto-ray's reshape (DeepSpeed's `ds_to_universal`) in a
fresh process, then loads the universal copy at `--to` ranks as a resumed run does. Prints the
checkpoint's size, the universal copy's, the scratch folder's peak size per GiB of checkpoint (the
converter's fragments and the merged files exist at once), the conversion's seconds, seconds per GiB
and peak RSS, and the load's seconds.

    .venv/bin/python bench/reshape.py [--model small|medium] [--stage 2|3] [--from 2] [--to 1]
    .venv/bin/python bench/reshape.py --smoke      # the tiny model, ZeRO-3, 2 -> 1
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import threading
import time
from pathlib import Path

import common

TAG = "zero"
HEADERS = (
    "checkpoint GiB",
    "universal GiB",
    "peak scratch / GiB",
    "convert s",
    "s / GiB",
    "convert RSS MiB",
    "load s",
)


def _rank(rank: int, world: int, port: int, cfg_json: str, folder: str, universal: bool, out) -> None:
    """One rank: build the engine; save after one step (`universal` False) or load the copy (True)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK="0"
    )
    import deepspeed
    import torch

    from kto_ray.config import KTOConfig
    from kto_ray.training.engine import build_policy_engine, deepspeed_config
    from kto_ray.training.resume.checkpoint import _load

    torch.set_num_threads(1)
    from kto_ray.internals.deepspeed_private import skip_shm_comm_op

    skip_shm_comm_op(deepspeed)  # as the workers do: no JIT build of an op nothing calls
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = KTOConfig.model_validate_json(cfg_json)
    engine = build_policy_engine(cfg, deepspeed_config(cfg, world), 10)
    if not universal:
        ids = torch.randint(0, 64, (cfg.train.micro_batch_size, 32))
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
        engine.save_checkpoint(folder, tag=TAG)
    else:
        began = time.perf_counter()
        _load(engine, Path(folder), universal=True)
        out.put((rank, time.perf_counter() - began))
    torch.distributed.barrier()


def _group(world: int, port: int, cfg_json: str, folder: Path, universal: bool) -> float:
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    procs = [
        context.Process(target=_rank, args=(r, world, port, cfg_json, str(folder), universal, out))
        for r in range(world)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        assert proc.exitcode == 0, f"a rank exited {proc.exitcode}"
    return max(out.get()[1] for _ in procs) if universal else 0.0


def _convert(source: str, target: str) -> tuple[float, float, float]:
    """kto-ray's conversion in this (fresh) process: seconds, peak RSS in MiB above the RSS of the
    imports (torch, DeepSpeed) it starts with, and the scratch folder's peak size in GiB (sampled)."""
    import deepspeed.checkpoint.ds_to_universal  # noqa: F401 - in the baseline, not the figure

    from kto_ray.training.resume.reshape import to_universal

    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak, done = [0.0], threading.Event()

    def sample() -> None:  # the fragments of the extract pass and the merged files exist at once
        while not done.wait(0.2):
            with contextlib.suppress(OSError):
                peak[0] = max(peak[0], _gib(Path(target)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    began = time.perf_counter()
    to_universal(Path(source), Path(target), TAG)
    seconds = time.perf_counter() - began
    done.set()
    sampler.join()
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    return seconds, rss, max(peak[0], _gib(Path(target)))


def _gib(folder: Path) -> float:
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(OSError):  # a file the converter removes while we look
            total += path.stat().st_size if path.is_file() else 0
    return total / 2**30


def main(args: argparse.Namespace) -> None:
    spec = common.SPECS[args.model]
    model_dir = common.build_model(spec)
    root = common.scratch_dir("kto-bench-reshape-")
    data = common.write_dataset("uniform", 32)
    cfg = common.bench_config(
        model_dir, data, root, deepspeed={"stage": args.stage}, train={"micro_batch_size": 2}
    )
    saved, universal = root / "saved", root / "universal"
    began = time.perf_counter()
    _group(args.from_, 29561, cfg.model_dump_json(), saved, universal=False)
    save_seconds = time.perf_counter() - began
    seconds, peak_mib, peak_gib = common.run_like_a_worker(_convert, str(saved), str(universal))
    load_seconds = _group(args.to, 29562, cfg.model_dump_json(), universal, universal=True)
    size, extra = _gib(saved), _gib(universal)
    common.print_table(
        HEADERS,
        [[size, extra, peak_gib / size, seconds, seconds / size, peak_mib, load_seconds]],
        title=(
            f"reshape {args.from_} -> {args.to} ranks, ZeRO-{args.stage}, {spec.name} "
            f"({common.count_parameters(model_dir):,} parameters, fp32; save {save_seconds:.1f} s)"
        ),
    )
    print(common.machine_line())


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(common.SPECS), default="medium")
    parser.add_argument("--stage", type=int, choices=(2, 3), default=3)
    parser.add_argument("--from", dest="from_", type=int, default=2)
    parser.add_argument("--to", type=int, default=1)
    main(common.parse_args(parser, {"model": "tiny", "stage": 3, "from_": 2, "to": 1}))
