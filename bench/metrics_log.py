"""metrics.jsonl: what one step costs rank 0 to write and the driver's progress to read, by run length,
on local disk and on an S3 server (moto's, on 127.0.0.1: tests/s3server.py).

- before: the writer this replaced, which kept every line and replaced the whole file each step (a
  rename locally, one PUT of the whole file on S3), and a follower that read the whole file each poll;
  reproduced here (`WholeFileLog`, `whole_file_poll`) so both are measured on the same machine.
- after: `kto_ray.rundir.metrics` (MetricsLog appends locally, rewrites only the newest bounded
  segment on S3; MetricsFollower reads what is new).

For each run length N the run dir is filled with N steps (in the layout the writer leaves), then:
write = mean seconds of one more step's write (over `--writes` steps); poll = mean seconds of a
follower's poll that finds one new step; full read = `read_metrics` of the whole run (what `kto-ray
report` does once); resume = opening the writer with a restored step 100 steps back.

    .venv/bin/python bench/metrics_log.py [--steps 1000 10000 100000] [--writes 10]
    .venv/bin/python bench/metrics_log.py --smoke   # a few seconds: the code paths, not figures
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kto_ray.rundir import RunDir, metrics  # noqa: E402
from kto_ray.rundir.metrics import METRICS_FILE, MetricsFollower, MetricsLog, parse_metrics  # noqa: E402

KEYS = ("loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen")
KEYS += ("logps/rejected", "grad_norm", "learning_rate", "step_time", "samples/s", "tokens/s")


def record(step: int, rng: random.Random) -> dict:
    """A record shaped like the worker's (same keys, full-precision floats): about 500 bytes."""
    out = {key: rng.uniform(-20, 20) for key in KEYS}
    counts = {"count/chosen": 15, "count/rejected": 17, "rows": 32, "tokens": 6000, "epoch": 0}
    return out | counts | {"step": step}


def lines(first: int, last: int) -> list[str]:
    rng = random.Random(first)
    return [json.dumps(record(step, rng)) + "\n" for step in range(first, last + 1)]


# ------------------------------------------------------------------------------ before: the whole file


class WholeFileLog:
    """The replaced writer: all lines in memory, the whole file replaced at each step."""

    def __init__(self, run_dir: RunDir, existing: list[str]):
        self.run_dir, self.lines = run_dir, list(existing)

    def write(self, line: str) -> None:
        self.lines.append(line)
        self.run_dir.write_text(METRICS_FILE, "".join(self.lines))


def whole_file_poll(run_dir: RunDir) -> list[dict]:
    return parse_metrics(run_dir.read_text(METRICS_FILE))


# ------------------------------------------------------------------------------- after: fill the layout


def fill(run_dir: RunDir, existing: list[str]) -> None:
    """The layout MetricsLog leaves after these lines: one file locally, full segments on S3."""
    if not run_dir.is_remote:
        run_dir.local_path.mkdir(parents=True, exist_ok=True)
        (run_dir.local_path / METRICS_FILE).write_text("".join(existing))
        return
    number, segment, size = 1, [], 0
    for line in existing:
        segment.append(line)
        size += len(line)
        if size >= metrics.SEGMENT_BYTES:
            run_dir.write_text(metrics.segment_name(number), "".join(segment))
            number, segment, size = number + 1, [], 0
    if segment:
        run_dir.write_text(metrics.segment_name(number), "".join(segment))


def timed(action: Callable[[], object]) -> float:
    began = time.perf_counter()
    action()
    return time.perf_counter() - began


def measure(run_dir: RunDir, steps: int, writes: int) -> dict[str, float]:
    existing, more = lines(1, steps), lines(steps + 1, steps + writes)
    out: dict[str, float] = {}

    before = RunDir(f"{run_dir.given}/before")
    fill_before = WholeFileLog(before, [])
    fill_before.lines = existing[:-1]
    fill_before.write(existing[-1])
    write_s, poll_s = [], []
    for line in more:
        write_s.append(timed(lambda line=line: fill_before.write(line)))
        poll_s.append(timed(lambda: whole_file_poll(before)))
    out["write before"], out["poll before"] = statistics.mean(write_s), statistics.mean(poll_s)

    after = RunDir(f"{run_dir.given}/after")
    fill(after, existing)
    out["full read"] = timed(lambda: metrics.read_metrics(after))
    follower = MetricsFollower(after)
    follower.poll()
    log = MetricsLog(after, steps)  # nothing past `steps` to drop
    write_s, poll_s = [], []
    for line in more:
        step = json.loads(line)
        write_s.append(timed(lambda step=step: log.write(step)))
        poll_s.append(timed(follower.poll))
    out["write after"], out["poll after"] = statistics.mean(write_s), statistics.mean(poll_s)
    out["resume"] = timed(lambda: MetricsLog(after, steps - 100))  # drops the last 100 + `writes`
    assert [r["step"] for r in metrics.read_metrics(after)] == list(range(1, steps - 99))
    return out


@contextlib.contextmanager
def s3_bucket() -> Iterator[str]:
    from kto_ray.training.launch.tracking import environment
    from tests.s3server import s3_server

    with s3_server() as server, environment(server.environment()):
        server.create_bucket("bench")
        yield "s3://bench/metrics"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}" if seconds < 1 else f"{seconds * 1000:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--writes", type=int, default=10, help="steps written and polled per measure")
    parser.add_argument("--smoke", action="store_true", help="small runs, a few seconds: code paths only")
    args = parser.parse_args()
    steps, writes = ([150, 1000], 3) if args.smoke else (args.steps, args.writes)
    columns = ("write before", "write after", "poll before", "poll after", "full read", "resume")
    print("| storage | steps | " + " | ".join(f"{c} (ms)" for c in columns) + " |")
    print("|---|---:|" + "---:|" * len(columns))
    with tempfile.TemporaryDirectory(prefix="kto-bench-metrics-") as tmp, s3_bucket() as bucket:
        for storage, root in (("local", tmp), ("s3 (moto)", bucket)):
            for n in steps:
                row = measure(RunDir(f"{root}/n{n}"), n, writes)
                cells = " | ".join(ms(row[c]) for c in columns)
                print(f"| {storage} | {n:,} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
