"""A sweep's table (trial, swept values, status, steps, final and best eval metric, time) and its
curves: every trial on shared axes, one figure per metric. `kto-ray sweep` prints the table and
writes it to the sweep dir's summary.md; `kto-ray report <sweep dir>` draws the figures too."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kto_ray.errors import UserError
from kto_ray.rundir import RunDir
from kto_ray.rundir.metrics import read_metrics

SWEEP_FILE = "sweep.json"  # in the sweep dir: the trials and their swept values, the ranking metric
TRIAL_FILE = "trial.json"  # in a trial's run dir: how it ended (finished or stopped), its steps and time
# (file stem, title, metrics key) of the shared-axes figures; eval keys only when some trial has them.
FIGURES = (
    ("loss", "training KTO loss", "loss"),
    ("margins", "training reward margin", "rewards/margins"),
    ("eval_loss", "eval KTO loss", "eval/loss"),
    ("eval_accuracy", "eval implied-reward accuracy", "eval/reward_accuracy"),
    ("eval_margins", "eval reward margin", "eval/rewards/margins"),
)


@dataclass(frozen=True)
class TrialRow:
    trial: str
    values: dict[str, Any]
    status: str  # finished, stopped, failed, unfinished
    steps: int
    final: float  # the ranking metric at the last eval (nan: none)
    best: float
    loss: float  # the last training loss
    seconds: float
    error: str = ""


def is_sweep_dir(run_dir: RunDir) -> bool:
    return run_dir.exists(SWEEP_FILE)


def _plan(sweep_dir: RunDir) -> dict[str, Any]:
    text = sweep_dir.read_text(SWEEP_FILE)
    try:
        return json.loads(text or "")
    except ValueError:
        raise UserError(f"{sweep_dir.child(SWEEP_FILE)} is not a sweep's plan") from None


def read_json(run_dir: RunDir, name: str) -> dict[str, Any] | None:
    """A small JSON file of the run dir (None when absent or unreadable)."""
    text = run_dir.read_text(name)
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def sweep_rows(
    sweep_dir: RunDir, plan: dict[str, Any], errors: dict[str, str] | None = None
) -> list[TrialRow]:
    """One row per trial, from its run dir (metrics.jsonl, trial.json); `errors`: the failed ones'."""
    errors = errors or {}
    metric, better = plan["metric"], min if plan.get("mode", "min") == "min" else max
    rows = []
    for trial, values in plan["trials"].items():
        run_dir = RunDir(sweep_dir.child(trial))
        records = read_metrics(run_dir)
        ended = read_json(run_dir, TRIAL_FILE) or {}
        evals = [float(r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
        status = "failed" if trial in errors else ended.get("status", "unfinished")
        rows.append(
            TrialRow(
                trial=trial,
                values=values,
                status=status,
                steps=int(records[-1]["step"]) if records else 0,
                final=evals[-1] if evals else math.nan,
                best=better(evals) if evals else math.nan,
                loss=float(records[-1]["loss"]) if records else math.nan,
                seconds=float(ended.get("seconds", math.nan)),
                error=errors.get(trial, ""),
            )
        )
    return rows


def _fmt(value: float) -> str:
    if not math.isfinite(value):
        return "-"
    return f"{value:.3e}" if value and abs(value) < 1e-3 else f"{value:.4f}"


def _values(values: dict[str, Any]) -> str:
    return " ".join(
        f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
        for key, value in values.items()
    )


def _cells(rows: list[TrialRow], metric: str) -> tuple[list[str], list[list[str]]]:
    header = ["trial", "config", "status", "steps", f"final {metric}", f"best {metric}", "final loss", "time"]
    body = [
        [
            r.trial,
            _values(r.values),
            r.status,
            str(r.steps),
            _fmt(r.final),
            _fmt(r.best),
            _fmt(r.loss),
            f"{r.seconds:.0f}s" if math.isfinite(r.seconds) else "-",
        ]
        for r in rows
    ]
    return header, body


def table_text(rows: list[TrialRow], metric: str) -> str:
    """The console table: aligned columns."""
    header, body = _cells(rows, metric)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in [header, *body]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def summary_markdown(sweep_dir: RunDir, rows: list[TrialRow], metric: str, figures: list[Path] = ()) -> str:
    header, body = _cells(rows, metric)
    lines = [f"# Sweep {sweep_dir}", "", f"{len(rows)} trials, ranked by {metric}.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    failed = [r for r in rows if r.error]
    if failed:
        lines += ["", "## Failed trials", ""] + [f"- {r.trial}: {r.error}" for r in failed]
    if figures:
        lines += ["", "## Curves", ""] + [f"![{f.stem}]({f.name})" for f in figures]
    return "\n".join(lines) + "\n"


def _plot(sweep_dir: RunDir, rows: list[TrialRow], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    curves = {r.trial: read_metrics(RunDir(sweep_dir.child(r.trial))) for r in rows}
    figures = []
    for stem, title, key in FIGURES:
        lines = []
        for row in rows:
            points = [
                (int(rec["step"]), float(rec[key]))
                for rec in curves[row.trial]
                if isinstance(rec.get(key), (int, float))
            ]
            if points:
                lines.append((f"{row.trial} {_values(row.values)} ({row.status})", points))
        if not lines:
            continue
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for label, points in lines:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, ms=3, lw=1.5, label=label)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="x-small")
        path = out_dir / f"{stem}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        figures.append(path)
    return figures


def write_sweep_report(sweep_dir: RunDir, out_dir: Path | None = None) -> tuple[list[Path], Path]:
    """The trials' curves on shared axes and the table, into `out_dir` (default `RunDir.report_dir`)."""
    plan = _plan(sweep_dir)
    rows = sweep_rows(sweep_dir, plan)
    out_dir = out_dir or sweep_dir.report_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _plot(sweep_dir, rows, out_dir)
    summary = out_dir / "summary.md"
    summary.write_text(summary_markdown(sweep_dir, rows, plan["metric"], figures))
    return figures, summary
