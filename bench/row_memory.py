"""Peak memory of getting the train split to the workers: the whole table (today) vs a row index plus
rows read by position (kto_ray/store/reader.py), on synthetic stores of 20k and 200k rows.

The stores are written with tests.helpers.write_store (no model): three token lists of 20-60 int32 each
per row, 90% train, ids shuffled across files of 1,024 rows in row groups of 256 (precompute's layout). Each
case runs in a fresh process; the figure is its resident-set high-water mark (VmHWM), reset through
/proc/self/clear_refs after the imports, so "above imports" is what the case itself costs.
- old driver: `Store.read_split("train")`, lambda_D's label counts, the step count, and the table
  serialized as `ray.put` does (Arrow IPC; written to a file here, no Ray, so the plasma copy a real
  `ray.put` also makes is not counted: the old figures are a lower bound);
- old worker: the whole table deserialized (a `ray.get`), `Schedule.for_table` grouped by length, and
  `--steps` steps of rank 0's micro-batches collated;
- new driver: `SplitIndex.build` (one row group at a time), label counts, the index pickled (what
  the loop config carries);
- new worker: the index unpickled, `RowReader` with read-ahead of the next step, the same steps'
  micro-batches taken and collated. Its data wait is the time `take` blocked per step.

    .venv/bin/python bench/row_memory.py [--rows 20000 200000] [--steps 50] [--cache-mib 16] [--step-ms 100]
    .venv/bin/python bench/row_memory.py --smoke
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import time
from pathlib import Path

import common
import numpy as np
import pyarrow as pa

MARK = "ROW_MEMORY "
WORKERS, MICRO_BATCH, ACCUMULATION, SEED = 2, 16, 2, 0


def write_store(root: Path, rows: int) -> str:
    """A committed store of `rows` synthetic rows (manifest + data-<id>/ files), as precompute lays out."""
    path = root / f"store-{rows}"
    common.bench_store(path, rows, range(32_000))
    return str(path)


# --------------------------------------------------------------------------------------- the cases


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(case: str, store_path: str, handoff: str, steps: int, cache_mib: float, step_ms: float) -> dict:
    from kto_ray.store.format import open_store
    from kto_ray.store.reader import RowReader, SplitIndex
    from kto_ray.training.schedule.batching import Schedule, collate

    store = open_store(store_path)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: count what the case adds
    imports = _peak_mib()
    out: dict = {"imports_mib": imports}
    if case == "old-driver":
        table = store.read_split("train")
        out["desirable"] = int(pa.compute.sum(table["label"]).as_py())
        out["steps_per_epoch"] = Schedule(
            len(table), WORKERS, MICRO_BATCH, ACCUMULATION, SEED
        ).steps_per_epoch
        with pa.OSFile(handoff, "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)  # ray.put's serialization
    elif case == "old-worker":
        with pa.OSFile(handoff, "rb") as source:
            table = pa.ipc.open_stream(source).read_all()  # ray.get
        schedule = Schedule.for_table(table, WORKERS, MICRO_BATCH, ACCUMULATION, SEED, group=True)
        for step in range(steps):
            for rows in schedule.rows_for(step, 0):
                collate(table, rows, 0)
    elif case == "new-driver":
        index = SplitIndex.build(store, "train")
        out["desirable"] = int(index.labels.sum())
        out["steps_per_epoch"] = Schedule(
            index.rows, WORKERS, MICRO_BATCH, ACCUMULATION, SEED
        ).steps_per_epoch
        Path(handoff).write_bytes(payload := pickle.dumps(index))
        out["index_bytes_per_row"] = len(payload) / index.rows
    elif case == "new-worker":
        index = pickle.loads(Path(handoff).read_bytes())
        schedule = Schedule.for_index(index, WORKERS, MICRO_BATCH, ACCUMULATION, SEED, group=True)
        waited = 0.0
        with RowReader(index, cache_bytes=int(cache_mib * 2**20)) as reader:
            for rows in schedule.rows_for(0, 0):
                reader.prefetch(rows)
            for step in range(steps):
                micro = schedule.rows_for(step, 0)
                for rows in schedule.rows_for(step + 1, 0):  # read-ahead: the next step's rows
                    reader.prefetch(rows)
                for rows in micro:
                    began = time.perf_counter()
                    part = reader.take(rows)
                    waited += time.perf_counter() - began
                    collate(part, np.arange(len(rows)), 0)
                time.sleep(step_ms / 1000)  # the step's compute: the read-ahead runs meanwhile
            out["group_reads_per_step"] = reader.group_reads / steps
        out["wait_ms_per_step"] = 1000 * waited / steps
    else:
        raise SystemExit(f"unknown case {case}")
    out["peak_mib"] = _peak_mib()
    return out


def _run(case: str, store: str, handoff: Path, args: argparse.Namespace) -> dict:
    options = [str(x) for x in (args.steps, args.cache_mib, args.step_ms)]
    cmd = [sys.executable, __file__, "--child", case, store, str(handoff), *options]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{case} failed:\n{done.stdout}\n{done.stderr}")
    line = next(x for x in done.stdout.splitlines() if x.startswith(MARK))
    return json.loads(line.removeprefix(MARK))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--cache-mib", type=float, default=16, help="RowReader's row-group cache")
    parser.add_argument("--step-ms", type=float, default=100, help="compute time of a step (a sleep)")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = common.parse_args(parser, smoke={"rows": [1024], "steps": 3, "step_ms": 1.0})
    if args.child:
        case, store, handoff, steps, cache_mib, step_ms = args.child
        result = child(case, store, handoff, int(steps), float(cache_mib), float(step_ms))
        print(MARK + json.dumps(result), flush=True)
        return

    root = common.scratch_dir("kto-row-memory-")
    print(common.machine_line())
    results: dict[tuple[str, int], dict] = {}
    for rows in args.rows:
        store = write_store(root, rows)
        for path in ("old", "new"):
            handoff = root / f"{path}-{rows}.handoff"
            for role in ("driver", "worker"):
                results[path, role, rows] = _run(f"{path}-{role}", store, handoff, args)
    table = []
    small, large = min(args.rows), max(args.rows)
    for path in ("old", "new"):
        for role in ("driver", "worker"):
            above = {
                n: results[path, role, n]["peak_mib"] - results[path, role, n]["imports_mib"]
                for n in args.rows
            }
            extra = ""
            if (path, role) == ("new", "driver"):
                extra = f"index {results[path, role, large]['index_bytes_per_row']:.1f} B/row"
            elif (path, role) == ("new", "worker"):
                r = results[path, role, large]
                extra = f"{r['group_reads_per_step']:.1f} groups read/step, "
                extra += f"data wait {r['wait_ms_per_step']:.2f} ms/step"
            table.append(
                [f"{path} {role}"]
                + [f"{results[path, role, n]['peak_mib']:.0f} ({above[n]:+.0f})" for n in args.rows]
                + [f"{above[large] - above[small]:+.1f}", extra]
            )
    common.print_table(
        [
            "process",
            *(f"peak MiB at {n:,} rows (above imports)" for n in args.rows),
            f"{large:,} - {small:,} rows, MiB",
            "notes",
        ],
        table,
        title=f"Peak resident memory per process ({WORKERS} workers, micro-batch {MICRO_BATCH}, "
        f"accumulation {ACCUMULATION}, {args.steps} steps of rank 0)",
    )


if __name__ == "__main__":
    main()
