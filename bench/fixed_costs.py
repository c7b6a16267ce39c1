"""Where the fixed costs of `kto-ray train` and `kto-ray precompute` go: a breakdown of the seconds
before the first step and after the last one, from the timings the commands record themselves.

Each command runs as a fresh process (`python -m kto_ray ...`, as a user runs it). `train` writes
`timings.json` (the driver's phases) and `timings-rank0.json` (rank 0's) in its run dir
(kto_ray/rundir/timings.py); precompute's phases come back in its result, printed by a child process here.
Each train phase is the time since the mark before it, on one clock across the processes; the steps
are split with metrics.jsonl's step times into the first step, the others, and what follows the last
(the final checkpoint and the metrics record).

    .venv/bin/python bench/fixed_costs.py [--model small] [--steps 2] [--workers 1 2] [--repeats 1] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import common

MARK = "FIXED_COSTS "


def child_precompute(config: str) -> None:
    """`kto-ray precompute --config config` through the CLI; prints the phases its result holds."""
    import kto_ray.reference.precompute as precompute
    from kto_ray import cli

    results = []
    real = precompute.precompute

    def recording(*args, **kwargs):
        results.append(real(*args, **kwargs))
        return results[-1]

    precompute.precompute = recording  # the CLI imports it when the command runs
    assert cli.main(["precompute", "--config", config]) == 0
    print(MARK + json.dumps(results[0].timings), flush=True)


def _run(cmd: list[str]) -> tuple[float, float, str]:
    """(start, end) Unix seconds of a fresh process running `cmd`, and its stdout; fails loudly."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(common.REPO), os.environ.get("PYTHONPATH", "")])}
    started = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=common.REPO)
    ended = time.time()
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return started, ended, done.stdout


def _phases(records: list[dict], where: str) -> list[tuple[str, float]]:
    return [(f"{where}: {r['phase']}", r["at"]) for r in records[1:]]


def train_breakdown(config: Path, run_dir: Path) -> dict[str, float]:
    """Seconds per phase of one `kto-ray train`, in the order they happen."""
    started, ended, _ = _run([sys.executable, "-m", "kto_ray", "train", "--config", str(config)])
    driver = json.loads((run_dir / "timings.json").read_text())
    rank0 = json.loads((run_dir / "timings-rank0.json").read_text())
    steps = [m["step_time"] for m in common.read_metrics(run_dir)]
    marks = [("driver: interpreter start", driver[0]["at"]), *_phases(driver, "driver")]
    fit_done = next(at for name, at in marks if "trainer fit" in name)
    marks = [*(m for m in marks if m[1] < fit_done), ("rank 0: worker process start", rank0[0]["at"])]
    marks += _phases(rank0, "rank 0") + [m for m in _phases(driver, "driver") if m[1] >= fit_done]
    marks.sort(key=lambda m: m[1])
    # The launch is the origin (the OS's process start time is coarse, and Python's start is ours too).
    out, previous = {}, started
    for name, at in marks[1:]:
        if name.startswith("rank 0: steps"):
            last_step_end = previous + sum(steps)
            out["rank 0: first step"] = steps[0]
            out[f"rank 0: steps 2-{len(steps)}"] = sum(steps[1:])
            out["rank 0: final checkpoint, metrics"] = at - last_step_end
        elif name == "driver: imports, config":
            out["driver: python start, imports, config"] = at - previous
        elif "trainer fit" in name:
            out["Ray Train: finish (controller poll, worker group shutdown)"] = at - previous
        else:
            # A worker process Ray started ahead of the run shows no time of its own here.
            out[name] = max(0.0, at - previous)
        previous = max(previous, at)
    out["driver: interpreter exit"] = ended - previous
    out["total wall"] = ended - started
    return out


def precompute_breakdown(config: Path) -> dict[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-precompute", str(config)]
    started, ended, stdout = _run(cmd)
    records = json.loads(next(line for line in stdout.splitlines() if line.startswith(MARK))[len(MARK) :])
    out = {"python start, imports, config": records[1]["at"] - started}
    out |= {r["phase"]: r["seconds"] for r in records[2:]}
    out["interpreter exit"] = ended - records[-1]["at"]
    out["total wall"] = ended - started
    return out


def _median_table(runs: list[dict[str, float]]) -> list[list]:
    names = list(dict.fromkeys(name for run in runs for name in run))
    return [[name, statistics.median(run.get(name, 0.0) for run in runs)] for name in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small", choices=sorted(common.SPECS))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="global batch (rows per step)")
    parser.add_argument("--rows", type=int, default=64, help="rows in the data set (precompute)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting; the table has medians")
    parser.add_argument("--export", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--child-precompute", metavar="CONFIG", help=argparse.SUPPRESS)
    args = common.parse_args(parser, {"model": "tiny", "workers": [1], "rows": 32})
    if args.child_precompute:
        return child_precompute(args.child_precompute)
    from kto_ray.config import dump_config

    spec = common.SPECS[args.model]
    model = common.build_model(spec)
    data = common.write_dataset("uniform", args.rows)
    root = common.scratch_dir("kto-fixed-costs-")
    print(f"machine: {common.machine_line()}")
    print(f"model {spec.name}: {common.count_parameters(model):,} parameters; {args.rows} rows")

    pre_runs = []
    for r in range(args.repeats):
        cfg = common.bench_config(model, data, root, store={"path": str(root / f"store-{r}")})
        config = root / f"precompute-{r}.yaml"
        config.write_text(dump_config(cfg))
        pre_runs.append(precompute_breakdown(config))
    common.print_table(["phase", "seconds"], _median_table(pre_runs), title="kto-ray precompute")

    columns, tables = [], []
    for workers in args.workers:
        runs = []
        for r in range(args.repeats):
            name = f"w{workers}-{r}"
            cfg = common.bench_config(
                model,
                data,
                root,
                store={"path": str(root / "store-0")},
                run={"name": name, "export": args.export},
                cluster={"workers": workers, "cpus_per_worker": 1},
                train={"max_steps": args.steps, "micro_batch_size": args.batch // workers},
            )
            config = root / f"train-{name}.yaml"
            config.write_text(dump_config(cfg))
            runs.append(train_breakdown(config, root / "runs" / name))
        columns.append(f"{workers} worker(s) s")
        tables.append(dict(_median_table(runs)))
    names = list(dict.fromkeys(name for table in tables for name in table))
    common.print_table(
        ["phase", *columns],
        [[name, *(table.get(name, 0.0) for table in tables)] for name in names],
        title=f"kto-ray train, {args.steps} steps of {args.batch} rows, export {args.export}",
    )


if __name__ == "__main__":
    main()
