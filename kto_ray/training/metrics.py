"""metrics.jsonl: one JSON object per optimizer step, written by rank 0; the driver shows progress from it.

The file is replaced whole at each step (an atomic rename locally, one PUT on object storage), so a
reader never sees part of a line, wherever the run dir is.
"""

from __future__ import annotations

import json

from kto_ray.rundir import RunDir

METRICS_FILE = "metrics.jsonl"


def parse_metrics(text: str | None) -> list[dict]:
    """The records of a metrics.jsonl text; lines that do not parse (an older writer's cut line) are
    skipped."""
    records = []
    for line in (text or "").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class MetricsLog:
    """Holds the run's lines and rewrites the file per step; on resume, drops lines past the restored
    step so no step repeats."""

    def __init__(self, run_dir: RunDir, resume_step: int):
        self.run_dir = run_dir
        found = parse_metrics(run_dir.read_text(METRICS_FILE))
        self.lines = [json.dumps(r) for r in found if r["step"] <= resume_step]
        self._flush()

    def write(self, record: dict) -> None:
        self.lines.append(json.dumps(record))
        self._flush()

    def _flush(self) -> None:
        self.run_dir.write_text(METRICS_FILE, "".join(f"{line}\n" for line in self.lines))
