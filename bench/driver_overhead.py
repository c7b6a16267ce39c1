"""`kto-ray train` on a rerun that reuses the store: seconds from the command's start to the TorchTrainer
launch, with a 5 GiB model folder (the tiny Llama plus a sparse 5 GiB `extra-00002.safetensors`).

The extra file is hashed by the fingerprint (it matches `*.safetensors`) but never loaded: transformers
loads `model.safetensors` (or the shards an index names), so the store is built from the real tiny
model. A sparse file reads from no disk, so the figures are the hashing (CPU) cost; on a real disk a
cold fingerprint is also bound by its read speed.

Each measurement is a fresh process running the real CLI (`kto_ray.cli.main(["train", ...])`) whose
`driver.fit` (the function that builds and launches the TorchTrainer) is replaced by a stopwatch, so
everything before the launch is timed and nothing after it runs. Three codes are measured:
- before: the committed kto_ray (`git archive HEAD`), which hashes every weight file and re-reads the
  data on every run;
- after, cold: this checkout with an empty digest cache (a first run, or a new model);
- after, warm: this checkout again, with the cache the cold run left (every rerun).

    .venv/bin/python bench/driver_overhead.py [--size-gib 5] [--repeats 3] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

MARK = "DRIVER_OVERHEAD "


def child(config: str) -> None:
    """Run `kto-ray train --config config` up to the TorchTrainer launch; print the phases as JSON."""
    started = time.perf_counter()
    import importlib

    import kto_ray.cli as cli
    import kto_ray.training.launch.driver as driver

    phases = {"weights_fingerprint": 0.0, "data_read": 0.0, "data_reads": 0}

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                phases[name] += time.perf_counter() - t
                if name == "data_read":
                    phases["data_reads"] += 1

        return wrapper

    # Each module calls these through its own namespace: data/prepare.py (and, before the store check
    # moved out of it, the check too) and store/check.py, where the code measured has one.
    for name in ("kto_ray.data.prepare", "kto_ray.store.check"):
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        for attr, phase in (("weights_fingerprint", "weights_fingerprint"), ("read_examples", "data_read")):
            if hasattr(module, attr):
                setattr(module, attr, timed(phase, getattr(module, attr)))

    def launch(cfg, table, steps, lam_d, **_):  # and fit's keywords (eval_rows=)
        phases["to_launch"] = time.perf_counter() - started
        phases["rows"] = driver.row_count(table)  # a table or a SplitIndex
        return driver.TrainResult(Path(cfg.run.dir), steps, {})

    driver.fit = launch
    assert cli.main(["train", "--config", config]) == 0
    phases["kto_ray"] = str(Path(cli.__file__).parent)
    print(MARK + json.dumps(phases), flush=True)


def _measure(config: Path, env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(config)], env=env, capture_output=True, text=True
    )
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stdout}\n{out.stderr}")
    line = next(x for x in out.stdout.splitlines() if x.startswith(MARK))
    return json.loads(line.removeprefix(MARK))


def main(size_gib: float, repeats: int, rows: int | None) -> None:
    import yaml

    from kto_ray.assets.tiny_model import ensure_tiny_model

    scratch = common.scratch_dir("kto-driver-overhead-")
    model = scratch / "model"
    shutil.copytree(ensure_tiny_model(common.REPO / "artifacts" / "tiny-llama"), model)
    with open(model / "extra-00002.safetensors", "wb") as f:
        f.truncate(int(size_gib * 2**30))  # sparse: no disk used
    data = common.REPO / "data" / "arithmetic.jsonl"
    if rows is not None:
        data = scratch / "data.jsonl"
        lines = (common.REPO / "data" / "arithmetic.jsonl").read_text().splitlines(keepends=True)
        data.write_text("".join(lines[:rows]))
    cfg = common.bench_config(model, data, scratch)
    config = scratch / "config.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    env = dict(os.environ, KTO_RAY_CACHE=str(scratch / "cache-build"), RAY_ADDRESS="local")
    print(f"building the store ({data.name}, model folder {size_gib:g} GiB + tiny model) ...", flush=True)
    subprocess.run(
        [sys.executable, "-m", "kto_ray", "precompute", "--config", str(config)], env=env, check=True
    )

    # The committed code, for the "before" figure; this checkout's code is on sys.path otherwise.
    before = scratch / "before"
    before.mkdir()
    archive = subprocess.run(
        ["git", "archive", "HEAD", "kto_ray"], cwd=common.REPO, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(before)], input=archive.stdout, check=True)

    runs: list[tuple[str, dict[str, str]]] = [
        ("before (HEAD)", dict(env, PYTHONPATH=str(before))),
        ("after, cold cache", dict(env, KTO_RAY_CACHE=str(scratch / "cache-fresh"))),
    ]
    runs += [("after, warm cache", dict(env, KTO_RAY_CACHE=str(scratch / "cache-fresh")))] * repeats
    results: dict[str, list[dict]] = {}
    for label, run_env in runs:
        result = _measure(config, run_env)
        results.setdefault(label, []).append(result)
        print(
            f"{label:<18} to launch {result['to_launch']:6.2f}s  weights fingerprint "
            f"{result['weights_fingerprint']:6.2f}s  data read {result['data_read']:5.2f}s "
            f"({result['data_reads']}x)  [{result['kto_ray']}]",
            flush=True,
        )
    print(f"\n{'':<18} {'to launch (s)':>14} {'weights fp (s)':>15} {'data read (s)':>14}")
    for label, rows in results.items():
        med = {
            k: statistics.median(r[k] for r in rows)
            for k in ("to_launch", "weights_fingerprint", "data_read")
        }
        print(
            f"{label:<18} {med['to_launch']:>14.2f} {med['weights_fingerprint']:>15.3f} "
            f"{med['data_read']:>14.2f}   (median of {len(rows)})"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", type=int, default=None, help="the first rows of the shipped data (all)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = common.parse_args(parser, smoke={"size_gib": 0.01, "repeats": 1, "rows": 240})
    if args.child:
        child(args.child)
    else:
        main(args.size_gib, args.repeats, args.rows)
