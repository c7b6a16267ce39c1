"""metrics.jsonl (one JSON object per optimizer step) and the progress line of rank 0."""

from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Appends one line per step; on resume, drops lines past the restored step so no step repeats."""

    def __init__(self, path: Path, resume_step: int):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line)
                except (ValueError, KeyError):
                    continue  # a line cut by a crash
        path.write_text("".join(f"{line}\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")


class Progress:
    def __init__(self, total_steps: int, start_step: int):
        self.total, self.start, self.t0 = total_steps, start_step, time.perf_counter()

    def line(self, step: int, metrics: dict) -> str:
        elapsed = time.perf_counter() - self.t0
        done = step - self.start
        eta = elapsed / done * (self.total - step) if done else float("nan")
        return (
            f"step {step}/{self.total} loss {metrics['loss']:.4f} kl {metrics['kl']:.4f} "
            f"margin {metrics['rewards/margins']:.4f} {metrics['samples/s']:.1f} samples/s eta {eta:.0f}s"
        )
