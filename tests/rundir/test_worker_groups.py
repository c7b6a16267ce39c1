"""workers.json's history of worker groups: one entry per start, later ones dropped by a resume from an
earlier checkpoint, the old single-list file read as one group, and the report's table of who ran what."""

from __future__ import annotations

import json
from pathlib import Path

from kto_ray.rundir import WORKERS_FILE, RunDir
from kto_ray.rundir.worker_groups import kept_steps, parse_groups, read_groups, record_group
from kto_ray.tools.report import write_report


def _ranks(count: int, node: str) -> list[dict]:
    return [{"rank": r, "node_id": f"{node}{r}" * 4, "node_ip": "10.0.0.1", "hostname": "h", "pid": 100 + r}
            for r in range(count)]  # fmt: skip


def test_each_start_adds_a_group_and_an_earlier_resume_drops_the_later_ones(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path / "run")
    record_group(run_dir, 0, _ranks(2, "a"))
    record_group(run_dir, 4, _ranks(1, "b"))  # a node lost after the step-4 checkpoint
    record_group(run_dir, 8, _ranks(2, "c"))  # it joined again
    groups = read_groups(run_dir)
    assert [(g.start_step, g.world_size) for g in groups] == [(0, 2), (4, 1), (8, 2)]
    assert groups[1].workers == _ranks(1, "b") and all(g.started_at for g in groups)
    assert kept_steps(groups, 12) == [(1, 4), (5, 8), (9, 12)]
    # The step-8 group died before its first checkpoint: the next start redoes its steps.
    assert kept_steps([*groups, groups[-1]], 12) == [(1, 4), (5, 8), None, (9, 12)]
    # A rerun resumed from the step-4 checkpoint (the later ones were deleted): the step-8 group's
    # steps are no longer in metrics.jsonl, nor its entry in the history.
    groups = record_group(run_dir, 4, _ranks(1, "d"))
    assert [(g.start_step, g.workers[0]["node_id"][:1]) for g in groups] == [(0, "a"), (4, "b"), (4, "d")]
    assert kept_steps(groups, 6) == [(1, 4), None, (5, 6)]


def test_a_file_that_is_no_history_reads_as_none_and_a_start_begins_one(tmp_path: Path) -> None:
    (tmp_path / WORKERS_FILE).write_text(json.dumps(_ranks(2, "a")))  # a list: no history
    assert read_groups(RunDir(tmp_path)) == []
    assert parse_groups("not json") == [] and parse_groups(None) == []
    assert [g.start_step for g in record_group(RunDir(tmp_path), 0, _ranks(1, "b"))] == [0]


def test_the_report_shows_which_group_ran_which_steps(tmp_path: Path) -> None:
    run_dir = RunDir(tmp_path)
    records = [{"step": s, "loss": 0.5, "step_time": 1.0, "rows": 8, "samples/s": 8.0} for s in range(1, 13)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    record_group(run_dir, 0, _ranks(2, "a"))
    record_group(run_dir, 4, _ranks(1, "b"))
    summary = write_report(tmp_path, tmp_path / "report").summary.read_text()
    assert "## Worker groups (2)" in summary
    assert "| 1 | 0 | 1-4 | 2 | 2 |" in summary and "| 2 | 4 | 5-12 | 1 | 1 |" in summary
    assert "## Workers (1 ranks on 1 node)" in summary  # the last group's ranks
