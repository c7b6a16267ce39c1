"""metrics.jsonl: one JSON object per optimizer step, written by rank 0; the driver shows progress from it."""

from __future__ import annotations

import json
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
