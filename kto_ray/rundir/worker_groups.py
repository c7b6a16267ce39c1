"""workers.json: the history of a run's worker groups, one entry per (re)start of the group (an elastic
`cluster.workers: [min, max]` restarts it when a node is lost or joins; a rerun starts one too).

Group i ran the steps after its `start_step`; the ones metrics.jsonl keeps from it are those up to the
next group's `start_step` (that group resumed from a checkpoint and redid what came after it). A start
from an earlier checkpoint than a recorded group's drops that group, as metrics.jsonl drops its steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from kto_ray.rundir import WORKERS_FILE, RunDir


@dataclass(frozen=True)
class WorkerGroup:
    start_step: int | None  # None: an entry that does not say
    world_size: int
    started_at: float | None  # Unix time
    workers: list[dict[str, Any]]  # one record per rank


def parse_groups(text: str | None) -> list[WorkerGroup]:
    """The groups of a workers.json text, oldest first ([] for none or for text that does not parse)."""
    try:
        data = json.loads(text) if text else None
    except ValueError:
        return []
    if not isinstance(data, dict):
        return []
    return [
        WorkerGroup(g.get("start_step"), g.get("world_size", len(g.get("workers", []))), g.get("started_at"),
                    g.get("workers", []))
        for g in data.get("groups", [])
        if isinstance(g, dict)
    ]  # fmt: skip


def read_groups(run_dir: RunDir) -> list[WorkerGroup]:
    return parse_groups(run_dir.read_text(WORKERS_FILE))


def record_group(run_dir: RunDir, start_step: int, workers: list[dict[str, Any]]) -> list[WorkerGroup]:
    """Add this start's group to the run dir's history (rank 0, at each start) and return the history."""
    kept = [g for g in read_groups(run_dir) if g.start_step is not None and g.start_step <= start_step]
    groups = [*kept, WorkerGroup(start_step, len(workers), round(time.time(), 3), workers)]
    run_dir.write_text(WORKERS_FILE, json.dumps({"groups": [asdict(g) for g in groups]}, indent=2) + "\n")
    return groups


def kept_steps(groups: list[WorkerGroup], last_step: int) -> list[tuple[int, int] | None]:
    """For each group, the (first, last) step metrics.jsonl keeps from it, given the run's last logged
    step; None for a group whose steps were all redone by the next one (or whose start is unknown)."""
    spans: list[tuple[int, int] | None] = []
    for group, nxt in zip(groups, [*groups[1:], None]):
        start, redo = group.start_step, nxt.start_step if nxt else None
        end = last_step if redo is None else min(redo, last_step)
        spans.append((start + 1, end) if start is not None and end > start else None)
    return spans
