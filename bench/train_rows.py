"""Real training runs, old vs new way of getting the train split to the workers: peak memory per
process and steady step time.

- "table" (old, still online mode's): the driver reads the whole split (`Store.read_split("train")`)
  and `fit` `ray.put`s it; every worker `ray.get`s the whole table (`TableRows`).
- "index" (new, offline mode's): the driver builds a `SplitIndex` (a few bytes per row) that travels
  in the loop config; each worker reads its own micro-batches' rows from the store by Parquet row
  group, with read-ahead (`RowReader`).

Both feed identical batches. Each case is a fresh subprocess (a clean driver) that starts its own
local Ray inside `kto_ray.training.launch.driver.fit` and trains the tiny model (configs/demo.yaml: 2 workers
x 0.5 CPU, ZeRO-3, micro-batch 16; no checkpoint before the final one, no export). Figures:
- driver peak: VmHWM of the subprocess, and its rise above the point just before the case started
  (imports, store opened, VmHWM reset through /proc/self/clear_refs);
- worker peak: the highest sampled VmRSS (every 0.2 s) of each RayTrainWorker process, max over the
  2 workers, with its anonymous / shared-memory parts at that sample (a table `ray.get` from the
  object store is mapped shared memory, not anonymous memory);
- handed over: what leaves the driver, the table's Arrow bytes (stored once in Ray's object store)
  or the pickled index;
- step time: the median `step_time` of metrics.jsonl (rank 0) after the first `--skip` steps;
- worker CPU s: user + system seconds of the 2 workers over the whole run (start-up included), which
  a loaded machine stretches less than it stretches step times; groups/step: the distinct row groups
  holding rank 0's rows of a step (what its reader reads per step when nothing is cached);
- load: the 1-minute load average when the run ended.

Synthetic stores (tests.helpers.write_store, cached under --out/stores/, reused by later runs): rows with
20-60 prompt, completion and KL completion tokens of the tiny model's vocabulary, random reference
log-probs, 60% desirable, 90% train, ids shuffled across files of 1,024 rows in row groups of 256
(precompute's), laid out as StoreWriter commits a store.

`--demo`: the demo config's own store (configs/demo.yaml, tiny model, built by `precompute` under
--out/demo-store/ and reused), both paths alternating (table, index, table, index, ...) with the same
config; median step time per path over all runs' steady steps, and index/table. On a shared machine
the neighbours' load comes in phases that slow every step of a stretch of a run by ~1.5x, so the
10th-percentile step time and the workers' CPU seconds are printed too: both shrug that off better.
Each run's figures (per worker process, every step time) are kept in --out/logs/<case>.json, its output
in --out/logs/<case>.log.

    .venv/bin/python bench/train_rows.py [--rows 20000 200000] [--steps 30] [--paths table index]
    .venv/bin/python bench/train_rows.py --demo [--steps 60] [--repeats 2]
    .venv/bin/python bench/train_rows.py --smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import common
import numpy as np

MARK = "TRAIN_ROWS "
WORKERS, CPUS_PER_WORKER, MICRO_BATCH = 2, 0.5, 16
CHILD_TIMEOUT_S = 600
TINY_MODEL = common.REPO / "artifacts" / "tiny-llama"


# ------------------------------------------------------------------------------------ synthetic stores


def synthetic_store(root: Path, rows: int) -> str:
    """A committed store of `rows` synthetic rows at root/stores/rows-<n> (built once, then reused)."""
    from kto_ray.assets.tiny_model import ALPHABET, SPECIAL_TOKENS
    from kto_ray.store.format import open_store, read_manifest

    path = root / "stores" / f"rows-{rows}"
    if read_manifest(path) is not None:  # committed by an earlier run: reuse it
        return str(open_store(path).path)
    started = time.perf_counter()
    characters = range(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + len(ALPHABET))  # no special tokens
    common.bench_store(path, rows, characters)
    print(f"built {path}: {rows:,} rows in {time.perf_counter() - started:.1f}s", flush=True)
    return str(path)


# ------------------------------------------------------------------------------------------- configs


def run_config(store: str, run_root: Path, name: str, steps: int):
    """configs/demo.yaml with the tiny model, the given store and run dir, `steps` steps, 2 workers."""
    return common.make_config(
        TINY_MODEL,
        common.REPO / "data" / "arithmetic.jsonl",
        run_root,
        defaults={},
        store={"path": store},
        run={"dir": str(run_root), "name": name, "checkpoint_every": steps + 10**6, "export": False},
        cluster={"workers": WORKERS, "cpus_per_worker": CPUS_PER_WORKER, "address": None},
        train={"micro_batch_size": MICRO_BATCH, "max_steps": steps, "log_every": 10},
    )


# -------------------------------------------------------------------------------------- the child


class WorkerPeaks(common.PeakMemory):
    """`common.PeakMemory`, keeping per worker the sample of highest VmRSS with its RssAnon and
    RssShmem, the worker's parent pid and its CPU time so far."""

    KEYS = ("VmRSS", "RssAnon", "RssShmem")

    def __init__(self, marker: str = "RayTrainWorker", interval: float = 0.2):
        super().__init__(marker, interval)

    def _sample(self, child) -> None:
        import psutil

        sample: dict[str, Any] = common.status_kib(child.pid, self.KEYS)
        try:
            cpu = sum(child.cpu_times()[:2])  # user + system, this process only
            ppid = child.ppid()
        except psutil.Error:
            return
        peak = self.peaks.setdefault(child.pid, {"VmRSS": 0, "ppid": ppid})
        peak["cpu_s"] = max(peak.get("cpu_s", 0.0), cpu)
        if sample["VmRSS"] > peak["VmRSS"]:
            peak.update(sample)


def _groups_per_step(index, cfg, steps: int) -> float:
    """Distinct row groups holding rank 0's rows of a step, mean over the run's steps: the groups its
    reader reads per step when nothing is cached."""
    from kto_ray.training.resume.global_batch import accumulation, first_global_batch
    from kto_ray.training.schedule.batching import Schedule

    train = cfg.train
    micro_batches = accumulation(first_global_batch(cfg), WORKERS, train.micro_batch_size)
    schedule = Schedule.for_index(
        index, WORKERS, train.micro_batch_size, micro_batches, train.seed, train.group_by_length
    )
    counts = [
        len(np.unique(np.concatenate([index.row_group[rows] for rows in schedule.rows_for(step, 0)])))
        for step in range(steps)
    ]
    return float(np.mean(counts))


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run: read the rows the `spec["path"]` way, fit, measure."""
    import pickle

    import ray.train.torch  # noqa: F401 - imported before the baseline: what every driver loads

    from kto_ray.objective import desirable_weight
    from kto_ray.store.format import open_store
    from kto_ray.store.reader import SplitIndex
    from kto_ray.training.launch.driver import fit, row_count, row_labels, split_rows, split_tables

    cfg = run_config(spec["store"], Path(spec["run_root"]), spec["name"], spec["steps"])
    store = open_store(spec["store"])
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: the case's own peak from here
    before = common.status_kib("self", ("VmRSS",))["VmRSS"] / 1024
    began = time.perf_counter()
    if spec["demo"]:  # the product's own readers: the store checked against the config
        read = split_rows if spec["path"] == "index" else split_tables
        train_rows = read(cfg, ("train",))["train"]
    elif spec["path"] == "index":
        train_rows = SplitIndex.build(store, "train")
    else:
        train_rows = store.read_split("train")
    read_s = time.perf_counter() - began
    # What leaves the driver: the pickled index, or the table's Arrow buffers (what ray.put stores).
    indexed = isinstance(train_rows, SplitIndex)
    handed = len(pickle.dumps(train_rows)) if indexed else train_rows.nbytes
    lam_d = desirable_weight(cfg, row_labels(train_rows), warn=False)
    groups = _groups_per_step(train_rows, cfg, spec["steps"]) if indexed else None
    with WorkerPeaks() as workers:
        began = time.perf_counter()
        result = fit(cfg, train_rows, spec["steps"], lam_d)
        fit_s = time.perf_counter() - began
    driver = common.status_kib("self", ("VmHWM",))["VmHWM"] / 1024
    records = common.read_metrics(result.run_dir.local_path)
    steady = [float(r["step_time"]) for r in records[spec["skip"] :]]
    return {
        "rows": row_count(train_rows),
        "driver_peak_mib": driver,
        "driver_before_mib": before,
        "workers": {
            str(pid): {k: v / 1024 if k in WorkerPeaks.KEYS else v for k, v in p.items()}
            for pid, p in workers.peaks.items()
        },
        "handed_bytes": handed,
        "groups_per_step": groups,
        "read_s": read_s,
        "fit_s": fit_s,
        "steps": len(records),
        "step_times": steady,
        "load": os.getloadavg()[0],
    }


def run_case(args: argparse.Namespace, spec: dict[str, Any]) -> dict[str, Any]:
    """`child(spec)` in a fresh interpreter with a private local Ray; its output goes to a log file."""
    out = Path(args.out)
    run_root = out / "runs"
    shutil.rmtree(run_root / spec["name"], ignore_errors=True)  # a leftover would be resumed
    spec = {**spec, "run_root": str(run_root), "skip": args.skip}
    env = dict(os.environ)
    # A private Ray, never another process's: "local" starts one. RAY_ADDRESS makes ray_session skip its
    # no_state_api_lookup, so point Ray Train's state-API lookup nowhere here, as it does.
    env["RAY_ADDRESS"] = "local"
    env["RAY_API_SERVER_ADDRESS"] = "http://127.0.0.1:9"
    log = out / "logs" / f"{spec['name']}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--child", json.dumps(spec)]
    print(f"  {spec['name']} ... ", end="", flush=True)
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: it and the Ray it started
            proc.wait()
            raise SystemExit(f"{spec['name']} ran past {CHILD_TIMEOUT_S}s; see {log}") from None
    lines = log.read_text().splitlines()
    found = [x for x in lines if x.startswith(MARK)]
    if code != 0 or not found:
        raise SystemExit(
            f"{spec['name']} failed (exit {code}); last lines of {log}:\n" + "\n".join(lines[-30:])
        )
    result = json.loads(found[-1].removeprefix(MARK))
    (out / "logs" / f"{spec['name']}.json").write_text(json.dumps(result, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(run_root / spec["name"], ignore_errors=True)
    print(
        f"{result['fit_s']:.0f}s fit, median step {_median(result['step_times']):.3f}s, "
        f"load {result['load']:.1f}",
        flush=True,
    )
    _check_workers(spec["name"], result)
    return result


# ----------------------------------------------------------------------------------------- reporting


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _decile(values: list[float]) -> float:
    """The 10th percentile."""
    return statistics.quantiles(values, n=10)[0] if len(values) > 1 else _median(values)


def _above(result: dict[str, Any]) -> float:
    """The driver's peak above its resident size when the case started, MiB."""
    return result["driver_peak_mib"] - result["driver_before_mib"]


def _actors(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The RayTrainWorker actors' samples. A process a worker forks (without exec) carries its title
    for a moment, with the parent's pages shared copy-on-write: not a worker, not counted."""
    workers = result["workers"]
    return [p for p in workers.values() if str(p["ppid"]) not in workers]


def _worker_peak(result: dict[str, Any]) -> dict[str, float]:
    """The worker with the highest peak VmRSS: its sample (VmRSS, RssAnon, RssShmem), MiB."""
    return max(
        _actors(result), key=lambda p: p["VmRSS"], default=dict.fromkeys(WorkerPeaks.KEYS, float("nan"))
    )


def _worker_cpu(result: dict[str, Any]) -> float:
    """CPU seconds (user + system) of the workers over the whole run, summed."""
    return sum(p.get("cpu_s", 0.0) for p in _actors(result))


def _check_workers(name: str, result: dict[str, Any]) -> None:
    actors, seen = len(_actors(result)), len(result["workers"])
    if actors != WORKERS:
        print(f"  note: {name}: {actors} RayTrainWorker actors seen (expected {WORKERS})")
    if seen > actors:
        print(f"  note: {name}: {seen - actors} short-lived forks of a worker seen (not counted)")


def rows_mode(args: argparse.Namespace) -> None:
    out = Path(args.out)
    results: dict[tuple[int, str], dict[str, Any]] = {}
    for rows in args.rows:
        store = synthetic_store(out, rows)
        for path in args.paths:
            spec = {
                "store": store,
                "path": path,
                "steps": args.steps,
                "demo": False,
                "name": f"{path}-{rows}",
            }
            results[rows, path] = run_case(args, spec)
    table = []
    for (rows, path), r in results.items():
        worker = _worker_peak(r)
        table.append(
            [
                f"{rows:,}",
                path,
                f"{r['driver_peak_mib']:.0f} ({_above(r):+.0f})",
                f"{worker['VmRSS']:.0f}",
                f"{worker['RssAnon']:.0f} / {worker['RssShmem']:.0f}",
                f"{r['handed_bytes'] / 2**20:.2f}",
                f"{r['read_s']:.2f}",
                "-" if r["groups_per_step"] is None else f"{r['groups_per_step']:.1f}",
                f"{_worker_cpu(r):.1f}",
                f"{_median(r['step_times']):.3f}",
                f"{r['load']:.1f}",
            ]
        )
    common.print_table(
        [
            "store rows",
            "path",
            "driver peak MiB (above start)",
            "worker peak MiB",
            "anon / shmem MiB",
            "handed over MiB",
            "driver read s",
            "groups/step (rank 0)",
            "worker CPU s",
            "median step s",
            "load",
        ],
        table,
        title=(
            f"Real training, tiny model, {WORKERS} workers x {CPUS_PER_WORKER} CPU, ZeRO-3, micro-batch "
            f"{MICRO_BATCH}, {args.steps} steps (step time: median after the first {args.skip})"
        ),
    )
    small, large = min(args.rows), max(args.rows)
    if small == large:
        return
    diffs = []
    for path in args.paths:
        a, b = results[small, path], results[large, path]
        wa, wb = _worker_peak(a), _worker_peak(b)
        diffs.append(
            [
                path,
                f"{b['driver_peak_mib'] - a['driver_peak_mib']:+.0f}",
                f"{_above(b) - _above(a):+.0f}",
                f"{wb['VmRSS'] - wa['VmRSS']:+.0f}",
                f"{wb['RssAnon'] - wa['RssAnon']:+.0f} / {wb['RssShmem'] - wa['RssShmem']:+.0f}",
                f"{(b['handed_bytes'] - a['handed_bytes']) / 2**20:+.2f}",
            ]
        )
    common.print_table(
        ["path", "driver peak", "driver above start", "worker peak", "worker anon / shmem", "handed over"],
        diffs,
        title=f"{large:,} - {small:,} rows, MiB per process",
    )


def demo_mode(args: argparse.Namespace) -> None:
    out = Path(args.out)
    store = str(out / "demo-store")
    run_precompute(store)
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in args.paths}
    for repeat in range(args.repeats):
        for path in args.paths:
            name = f"demo-{path}-{repeat}"
            spec = {"store": store, "path": path, "steps": args.steps, "demo": True, "name": name}
            results[path].append(run_case(args, spec))
    table = []
    for path, runs in results.items():
        pooled = [t for r in runs for t in r["step_times"]]
        table.append(
            [
                path,
                runs[0]["rows"],
                ", ".join(f"{_median(r['step_times']):.3f}" for r in runs),
                f"{_median(pooled):.3f}",
                f"{min(pooled):.3f}",
                ", ".join(f"{_worker_peak(r)['VmRSS']:.0f}" for r in runs),
                ", ".join(f"{_worker_cpu(r):.1f}" for r in runs),
                ", ".join(f"{r['load']:.1f}" for r in runs),
            ]
        )
    common.print_table(
        [
            "path",
            "train rows",
            "median step s per run",
            "median step s (all runs)",
            "fastest step s",
            "worker peak MiB per run",
            "worker CPU s per run",
            "load per run",
        ],
        table,
        title=(
            f"Demo config's store, tiny model, {WORKERS} workers, ZeRO-3, micro-batch {MICRO_BATCH}, "
            f"{args.steps} steps per run, runs alternating {' / '.join(args.paths)} x {args.repeats}"
        ),
    )
    if {"table", "index"} <= set(results):
        medians = {p: _median([t for r in results[p] for t in r["step_times"]]) for p in ("table", "index")}
        per_run = [
            f"{_median(i['step_times']) / _median(t['step_times']):.3f}"
            for t, i in zip(results["table"], results["index"])
        ]
        print(
            f"median step time index/table: {medians['index'] / medians['table']:.3f} "
            f"(per repeat: {', '.join(per_run)}); target within 5%"
        )
        # On a shared machine the neighbours' load comes in phases that slow every step of a stretch
        # of a run by ~1.5x, whichever the path: the medians above compare phases as much as paths.
        # Less sensitive to that: the fast steps (a slowed step is never faster than its uncontended
        # time) and the CPU the workers used.
        fast = {p: _decile([t for r in results[p] for t in r["step_times"]]) for p in medians}
        cpu = {p: statistics.mean(_worker_cpu(r) for r in results[p]) for p in medians}
        print(
            f"10th-percentile step time index/table: {fast['index'] / fast['table']:.3f} "
            f"({fast['table']:.3f}s vs {fast['index']:.3f}s); "
            f"worker CPU s per run index/table: {cpu['index'] / cpu['table']:.3f}"
        )


def _precompute_child(store: str) -> None:
    from kto_ray.reference.precompute import precompute

    cfg = run_config(store, common.REPO / "runs", "unused", 1)
    precompute(cfg)


def run_precompute(store: str) -> None:
    """The demo store, built (or reused when it matches) by `precompute` in a fresh process."""
    env = dict(os.environ, RAY_ADDRESS="local", RAY_API_SERVER_ADDRESS="http://127.0.0.1:9")
    cmd = [sys.executable, __file__, "--precompute", store]
    print(f"demo store {store} (precompute) ... ", flush=True)
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    tail = [x for x in (done.stdout + done.stderr).splitlines() if "reference store" in x]
    if done.returncode != 0:
        raise SystemExit(f"precompute failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    print("  " + (tail[-1] if tail else "done"), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--steps", type=int, default=None, help="steps per run (default 30; 60 with --demo)")
    parser.add_argument("--paths", nargs="+", default=["table", "index"], choices=("table", "index"))
    parser.add_argument("--out", default=str(common.CACHE / "train-rows"), help="stores, runs, logs")
    parser.add_argument("--skip", type=int, default=5, help="warm-up steps left out of the step time")
    parser.add_argument("--demo", action="store_true", help="the demo config's store, paths alternating")
    parser.add_argument("--repeats", type=int, default=2, help="--demo: runs per path")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs under --out/runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--precompute", help=argparse.SUPPRESS)
    smoke = {"rows": [2048], "steps": 3, "skip": 1, "out": str(common.CACHE / "train-rows-smoke")}
    args = common.parse_args(parser, smoke)
    if args.child:
        print(MARK + json.dumps(child(json.loads(args.child))), flush=True)
        return
    if args.precompute:
        _precompute_child(args.precompute)
        return
    if args.steps is None:
        args.steps = 60 if args.demo else 30
    if args.steps <= args.skip:
        parser.error(f"--steps must be more than --skip ({args.skip})")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    from kto_ray.assets.tiny_model import ensure_tiny_model

    ensure_tiny_model(TINY_MODEL)
    print(f"machine: {os.cpu_count()} cores, load average {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    if args.demo:
        demo_mode(args)
    else:
        rows_mode(args)
    print(f"load average at the end: {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
