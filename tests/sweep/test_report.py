"""A sweep's table and shared-axes figures from its trials' run dirs (written here, no Ray): status from
trial.json, steps and the final and best eval metric from metrics.jsonl; `kto-ray report <sweep dir>`."""

from __future__ import annotations

import json
import math

from kto_ray.cli import main
from kto_ray.rundir import RunDir
from kto_ray.sweep.report import summary_markdown, sweep_rows, table_text


def _trial(sweep_dir, name, losses, ended=None):
    folder = sweep_dir / name
    folder.mkdir(parents=True)
    lines = [{"step": i + 1, "loss": 0.6 - 0.01 * i, "eval/loss": v} for i, v in enumerate(losses)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    if ended:
        (folder / "trial.json").write_text(json.dumps(ended))


def test_the_table_and_the_report_of_a_sweep(tmp_path, capsys):
    sweep_dir = tmp_path / "s-sweep"
    plan = {
        "trials": {
            "trial-000": {"train.lr": 1e-3},
            "trial-001": {"train.lr": 1e-9},
            "trial-002": {"train.lr": 5e-4},
        },
        "metric": "eval/loss",
        "mode": "min",
    }
    _trial(sweep_dir, "trial-000", [0.5, 0.4, 0.45], {"status": "finished", "steps": 3, "seconds": 12.0})
    _trial(sweep_dir, "trial-001", [0.5], {"status": "stopped", "steps": 1, "seconds": 3.0})
    _trial(sweep_dir, "trial-002", [0.49, 0.48])  # killed mid-run
    (sweep_dir / "sweep.json").write_text(json.dumps(plan))

    rows = sweep_rows(RunDir(sweep_dir), plan, errors={"trial-002": "boom"})
    assert [(r.trial, r.status, r.steps) for r in rows] == [
        ("trial-000", "finished", 3),
        ("trial-001", "stopped", 1),
        ("trial-002", "failed", 2),
    ]
    assert (rows[0].final, rows[0].best, rows[0].seconds) == (0.45, 0.4, 12.0)
    assert math.isnan(rows[2].seconds) and rows[2].error == "boom"
    table = table_text(rows, "eval/loss").splitlines()
    assert table[0].split()[:4] == ["trial", "config", "status", "steps"] and "best eval/loss" in table[0]
    assert table[2].split() == [
        "trial-000",
        "train.lr=0.001",
        "finished",
        "3",
        "0.4500",
        "0.4000",
        "0.5800",
        "12s",
    ]
    markdown = summary_markdown(RunDir(sweep_dir), rows, "eval/loss")
    assert "| trial-001 | train.lr=1e-09 | stopped | 1 | 0.5000 | 0.5000 | 0.6000 | 3s |" in markdown
    assert "- trial-002: boom" in markdown

    assert main(["report", str(sweep_dir)]) == 0
    assert "report of the sweep" in capsys.readouterr().out
    report = sweep_dir / "report"
    assert {p.name for p in report.glob("*.png")} == {"loss.png", "eval_loss.png"}
    summary = (report / "summary.md").read_text()
    assert "![eval_loss](eval_loss.png)" in summary and "| trial-002 |" in summary
