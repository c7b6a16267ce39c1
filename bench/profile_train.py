"""Profile a kto-ray training worker from outside with py-spy: where does a step's time go?

Starts a short training run (store built first), waits until the rank-0 Ray Train worker is past its
warm-up steps, records it with `py-spy record` for a fixed time and prints the functions that hold the
most samples, inclusive (anywhere on the stack) and by leaf frame. The raw collapsed stacks are kept
for a flame graph (e.g. https://www.speedscope.app or inferno).

    .venv/bin/python bench/profile_train.py [--mode offline|online] [--seconds 20] [--workers 1] [--smoke]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import common

PY_SPY = Path(sys.executable).with_name("py-spy")


def find_worker(timeout: float = 120.0) -> int:
    """Pid of this process's first descendant titled ray::RayTrainWorker."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process().children(recursive=True):
            try:
                if "RayTrainWorker" in " ".join(child.cmdline()):
                    return child.pid
            except psutil.Error:
                continue
        time.sleep(0.2)
    raise RuntimeError("no RayTrainWorker process appeared")


def wait_for_step(metrics: Path, step: int, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(common.read_metrics(metrics.parent)) >= step:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{metrics} never reached step {step}")


def record(pid: int, seconds: int, out: Path) -> None:
    cmd = [str(PY_SPY), "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "50"]
    cmd += ["--format", "raw", "--output", str(out), "--nonblocking"]
    subprocess.run(cmd, check=True, capture_output=True)


_FRAME = re.compile(r"^(?P<func>[^ ]+) \((?P<file>[^:]+)(?::\d+)?\)$")


def summarize(raw: Path, top: int) -> None:
    inclusive: collections.Counter[str] = collections.Counter()
    leaf: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        for frame in set(frames):
            inclusive[frame] += n
        leaf[frames[-1]] += n
    rows = [[f, n / total * 100] for f, n in inclusive.most_common(top)]
    common.print_table(["function (inclusive)", "% of samples"], rows, title=f"py-spy: {total} samples")
    rows = [[f, n / total * 100] for f, n in leaf.most_common(top)]
    common.print_table(["function (leaf)", "% of samples"], rows)


def _short(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    path = match["file"]
    for marker in ("site-packages/", "kto_ray/"):
        if marker in path:
            path = (
                path.split(marker, 1)[1] if marker == "site-packages/" else "kto_ray/" + path.split(marker)[1]
            )
            break
    return f"{match['func']} ({path})"


def main() -> None:
    from kto_ray.reference.precompute import precompute
    from kto_ray.rundir import RunDir
    from kto_ray.training.launch.driver import train

    model = common.build_model(common.SPECS[args.model])
    rows = args.steps * args.batch + args.batch
    data = common.write_dataset("uniform", rows)
    root = common.scratch_dir("bench-prof-")
    workers = args.workers
    cfg = common.bench_config(
        model,
        data,
        root,
        reference={"mode": args.mode},
        cluster={"workers": workers, "cpus_per_worker": 1.0 if workers == 1 else 0.5},
        train={"max_steps": args.steps, "micro_batch_size": args.batch // workers},
    )
    common.ray_init()
    if args.mode == "offline":
        precompute(cfg)
    raw = root / "profile.txt"

    def profile() -> None:
        pid = find_worker()
        wait_for_step(RunDir.of(cfg).local_path / "metrics.jsonl", args.warmup)
        record(pid, args.seconds, raw)

    thread = threading.Thread(target=profile)
    thread.start()
    train(cfg)
    thread.join()
    summarize(raw, args.top)
    kept = common.CACHE / f"profile-{args.mode}-{workers}w.txt"
    shutil.copy(raw, kept)
    print(f"collapsed stacks: {kept}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="offline", choices=("offline", "online"))
    parser.add_argument("--workers", type=int, default=1, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=2, help="steps to wait for before recording")
    parser.add_argument("--seconds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    # Enough steps of the tiny model (~0.03 s each) that the worker outlives the recording.
    smoke = {"steps": 150, "warmup": 2, "seconds": 1, "batch": 4, "workers": 1, "top": 5, "model": "tiny"}
    args = common.parse_args(parser, smoke)
    main()
