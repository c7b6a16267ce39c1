"""Where a run's fixed costs go: wall-clock marks of one process's phases, kept in the run dir.

`kto-ray train` writes `timings.json` (the driver's phases) and rank 0 `timings-rank0.json` (its own,
from the worker process's start to the export): each a list of `{"phase", "at", "seconds"}`, `at` in
Unix seconds (so the two files line up) and `seconds` the time since the mark before. A mark costs a
clock read; the files are written once, at the end.
"""

from __future__ import annotations

import json
import time
from typing import Any

TIMINGS_FILE = "timings.json"
RANK0_TIMINGS_FILE = "timings-rank0.json"


class Timeline:
    """Phases of one process, each marked when it ends; the first mark is the process's start."""

    def __init__(self) -> None:
        import psutil

        self.marks: list[tuple[str, float]] = [("process start", psutil.Process().create_time())]

    def mark(self, phase: str) -> None:
        self.marks.append((phase, time.time()))

    def records(self) -> list[dict[str, Any]]:
        return [
            {"phase": phase, "at": round(at, 3), "seconds": round(at - self.marks[max(i - 1, 0)][1], 3)}
            for i, (phase, at) in enumerate(self.marks)
        ]

    def as_json(self) -> str:
        return json.dumps(self.records(), indent=1) + "\n"
