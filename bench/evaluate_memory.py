"""The memory of `kto-ray evaluate`'s driver process: the model's weights belong on the actors.

Builds a random Llama of ~0.57B parameters (the character tokenizer, float32 safetensors, 2.3 GB),
precomputes a small store with it as the reference, then runs `kto-ray evaluate --model <it>` as a user
would (its own local Ray) and samples the driver process's RSS every 0.1 s, and the actors' (processes
titled `PolicyLogprobs`). `--code DIR` runs the CLI from another checkout (PYTHONPATH), for a before /
after comparison with the code that scored on the driver.

    .venv/bin/python bench/evaluate_memory.py [--rows 24] [--code DIR ...] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import common

# ~0.57B parameters: the size of the model the issue measured (0.63B), float32 on CPU.
LARGE = common.ModelSpec("llama-570m", hidden=1536, layers=20, intermediate=4096, heads=12, kv_heads=12)


def peak_rss_mib(pid: int, stop: threading.Event, out: dict[str, float], marker: str) -> None:
    """Sample the process's RSS and the largest RSS of its descendants titled `marker`, until `stop`."""
    import psutil

    root = psutil.Process(pid)
    while not stop.is_set():
        try:
            out["driver"] = max(out.get("driver", 0.0), root.memory_info().rss / 2**20)
            for child in root.children(recursive=True):
                if marker in " ".join(child.cmdline()):
                    out["actor"] = max(out.get("actor", 0.0), child.memory_info().rss / 2**20)
        except psutil.Error:
            pass
        stop.wait(0.1)


def evaluate_driver(config: Path, model: Path, code: str | None) -> dict[str, float]:
    env = dict(os.environ, RAY_ADDRESS="local")
    if code:
        env["PYTHONPATH"] = code
    cmd = [sys.executable, "-m", "kto_ray", "evaluate", "--config", str(config), "--model", str(model)]
    cmd += ["--json", str(config.with_suffix(".metrics.json"))]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    stop, peaks = threading.Event(), {}
    sampler = threading.Thread(target=peak_rss_mib, args=(proc.pid, stop, peaks, "PolicyLogprobs"))
    sampler.start()
    output, _ = proc.communicate()
    stop.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"evaluate failed ({proc.returncode}):\n{output[-3000:]}")
    metrics = json.loads(config.with_suffix(".metrics.json").read_text())
    return peaks | {"seconds": time.perf_counter() - began, "loss": metrics["loss"]}


def main() -> None:
    from kto_ray.config import dump_config
    from kto_ray.reference.precompute import precompute

    spec = common.SPECS["tiny"] if args.smoke else LARGE
    model = common.build_model(spec)
    params = common.count_parameters(model)
    data = common.write_dataset("uniform", args.rows)
    root = common.scratch_dir("bench-evaluate-memory-")
    cfg = common.bench_config(model, data, root, data={"eval_fraction": 0.5})
    print(f"machine: {common.machine_line()}")
    print(f"versions: {common.versions_line()}")
    print(f"model {spec.name}: {params:,} parameters, {params * 4 / 2**30:.2f} GiB in float32")
    common.ray_init()
    precompute(cfg)
    import ray

    ray.shutdown()  # the CLI below starts its own Ray, as a user's would
    config = root / "evaluate.yaml"
    config.write_text(dump_config(cfg))
    rows = []
    for code in args.code or [None]:
        run = evaluate_driver(config, model, code)
        name = code or "this checkout"
        actor = f"{run['actor']:,.0f}" if "actor" in run else "none"
        rows.append([name, f"{run['driver']:,.0f}", actor, f"{run['seconds']:.0f}", f"{run['loss']:.6f}"])
    common.print_table(
        ["code", "driver peak RSS MiB", "actor peak RSS MiB", "seconds", "eval loss"],
        rows,
        title=f"kto-ray evaluate --model <{spec.name}>: {args.rows // 2} eval rows, 1 CPU actor, float32",
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=24, help="rows of data (half of them the eval split)")
    parser.add_argument("--code", nargs="*", help="checkouts to run the CLI from (PYTHONPATH), in turn")
    args = common.parse_args(parser, {"rows": 8})
    main()
