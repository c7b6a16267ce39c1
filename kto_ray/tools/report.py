"""Offline report of a run dir: PNG curves and summary.md from metrics.jsonl; optional TensorBoard replay."""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from kto_ray.errors import UserError
from kto_ray.integrity import model_folder_problems
from kto_ray.objective import EVAL_KEYS
from kto_ray.rundir import WORKERS_FILE, RunDir
from kto_ray.rundir.metrics import METRICS_FILE, SEGMENTS, read_metrics
from kto_ray.rundir.worker_groups import kept_steps, parse_groups
from kto_ray.storage import first_line

SMOOTH_MIN_STEPS = 20  # below this an EMA hides nothing and just doubles the lines
CONFIG_KEYS = "model.path train.beta train.lr train.micro_batch_size train.global_batch_size cluster.workers"
# (file stem, title, y label, metrics keys) of the single-axes figures; a legend label is the key's last part.
FIGURES = (
    ("loss", "KTO loss", "loss", ("loss",)),
    ("kl", "KL estimate: z0 (clamped at 0) and before the clamp", "kl", ("kl", "kl/raw")),
    ("rewards", "Rewards: chosen vs rejected", "reward", ("rewards/chosen", "rewards/rejected")),
    ("margins", "Reward margin (chosen - rejected)", "margin", ("rewards/margins",)),
)
Lines = list[tuple[str, list[float]]]  # (legend label, values per step)
TRAINING_PANELS = (("learning_rate", "learning rate"), ("grad_norm", "grad norm"), ("samples/s", "samples/s"))
# train.eval_every: `eval/<key>` on the steps that evaluated, drawn over the training curve of <key>.
EVAL_PREFIX = "eval/"
EVAL_COLORS = ("tab:purple", "tab:orange", "tab:olive")
EVAL_SUMMARY_KEYS = tuple(key for key in EVAL_KEYS if key != "rows")  # the summary's eval table


@dataclass(frozen=True)
class ReportResult:
    figures: list[Path]
    summary: Path
    problems: list[str] = field(default_factory=list)  # exported model folders not as their lists say


def _read(run_dir: RunDir, name: str) -> str | None:
    try:
        return run_dir.read_text(name)
    except OSError as err:
        raise UserError(f"cannot read {run_dir.child(name)}: {first_line(err)}") from None


def load_metrics(run_dir: str | Path | RunDir) -> list[dict[str, Any]]:
    """Records in step order, each step once; lines cut by a crash are skipped."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    where = run_dir.child(f"{SEGMENTS}/" if run_dir.is_remote else METRICS_FILE)  # where a user finds it
    try:
        records = read_metrics(run_dir)
        found = bool(records) or run_dir.exists(SEGMENTS if run_dir.is_remote else METRICS_FILE)
    except OSError as err:
        raise UserError(f"cannot read {where}: {first_line(err)}") from None
    if not found:
        raise UserError(f"{where}: not found (is {run_dir} a training run directory?)")
    if not records:
        raise UserError(f"{where}: no parsable metric lines")
    return records


def _series(records: list[dict[str, Any]], key: str) -> list[float]:
    # None (e.g. no grad norm from the engine) and missing keys become NaN: a gap in the plot.
    return [float(r[key]) if isinstance(r.get(key), (int, float)) else math.nan for r in records]


def _ema(values: list[float], span: int) -> list[float]:
    alpha, acc, out = 2.0 / (span + 1), math.nan, []
    for value in values:
        if math.isfinite(value):
            acc = value if math.isnan(acc) else acc + alpha * (value - acc)
        out.append(acc)
    return out


def _mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _fmt(value: float) -> str:
    return f"{value:.3e}" if value and math.isfinite(value) and abs(value) < 1e-3 else f"{value:.4f}"


def _draw(ax: Any, steps: list[int], lines: Lines, bounds: list[int], smooth: bool = True) -> None:
    from matplotlib.ticker import MaxNLocator

    span, few = max(5, len(steps) // 25), len(steps) < SMOOTH_MIN_STEPS
    for color, (label, values) in zip(("tab:blue", "tab:red", "tab:green"), lines):
        if smooth and not few:
            ax.plot(steps, values, color=color, alpha=0.3, lw=1, label=f"{label} (raw)")
            ax.plot(steps, _ema(values, span), color=color, lw=2, label=f"{label} (EMA span {span})")
        else:
            ax.plot(steps, values, color=color, lw=1.5, marker="o" if few else None, ms=3, label=label)
    for i, step in enumerate(bounds):  # epoch starts: curves often jump when the data order restarts
        ax.axvline(step, color="gray", ls=":", lw=1, label="_" if i else "epoch start")
    ax.set_xlabel("optimizer step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers, even on a short run
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def _eval_points(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `eval/<key>` where it was computed (every train.eval_every steps)."""
    points = [(int(r["step"]), v) for r, v in zip(records, _series(records, EVAL_PREFIX + key))]
    return [s for s, v in points if math.isfinite(v)], [v for _, v in points if math.isfinite(v)]


def _draw_eval(ax: Any, records: list[dict[str, Any]], keys: tuple[str, ...]) -> None:
    """Held-out points over the training curves (no EMA: evaluations are few and not noisy per row)."""
    for color, key in zip(EVAL_COLORS, keys):
        steps, values = _eval_points(records, key)
        if steps:
            label = f"eval {key.split('/')[-1]}"
            ax.plot(steps, values, color=color, ls="--", lw=1.5, marker="s", ms=4, label=label)
            ax.legend(loc="best", fontsize="small")


def _plot(records: list[dict[str, Any]], out_dir: Path, name: str) -> list[Path]:
    try:
        # Figure + the Agg canvas directly, no pyplot: no display, no global figure registry to leak into.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as err:
        raise UserError("matplotlib is not installed: pip install 'kto-ray[report]'") from err
    steps = [int(r["step"]) for r in records]
    epochs = [r.get("epoch") for r in records]
    bounds = [steps[i] for i in range(1, len(steps)) if epochs[i] != epochs[i - 1]]
    paths = []
    for stem, title, ylabel, keys in FIGURES:
        fig = FigureCanvasAgg(Figure(figsize=(8, 4.5), dpi=100, layout="tight")).figure
        ax = fig.add_subplot()
        _draw(ax, steps, [(key.split("/")[-1], _series(records, key)) for key in keys], bounds)
        _draw_eval(ax, records, keys)
        if stem in ("rewards", "margins"):
            ax.axhline(0.0, color="black", lw=0.8)
        ax.set(title=f"{name}: {title}", ylabel=ylabel)
        paths.append(out_dir / f"{stem}.png")
        fig.savefig(paths[-1])
    fig = FigureCanvasAgg(Figure(figsize=(8, 8), dpi=100, layout="tight")).figure
    for i, (key, label) in enumerate(TRAINING_PANELS):
        ax = fig.add_subplot(len(TRAINING_PANELS), 1, i + 1)
        # No EMA on the learning rate: it is a deterministic schedule, smoothing would only add lag.
        _draw(ax, steps, [(label, _series(records, key))], bounds, smooth=key != "learning_rate")
        ax.set(title=f"{name}: {label}", ylabel=label)
    paths.append(out_dir / "training.png")
    fig.savefig(paths[-1])
    if _eval_points(records, "reward_accuracy")[0]:
        # Only evaluations have an accuracy: its own figure, with the 0.5 of a model that learned nothing.
        fig = FigureCanvasAgg(Figure(figsize=(8, 4.5), dpi=100, layout="tight")).figure
        ax = fig.add_subplot()
        _draw_eval(ax, records, ("reward_accuracy",))
        ax.axhline(0.5, color="black", lw=0.8)
        ax.set(title=f"{name}: eval implied-reward accuracy", ylabel="accuracy", xlabel="optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        paths.append(out_dir / "eval.png")
        fig.savefig(paths[-1])
    return paths


def _config_rows(run_dir: RunDir) -> list[tuple[str, str]]:
    text = _read(run_dir, "config.yaml")
    if text is None:
        return []
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError:
        return [("config.yaml", "unreadable")]
    rows = []
    for dotted in CONFIG_KEYS.split():
        value: Any = config
        for part in dotted.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        rows.append((dotted, "—" if value is None else str(value)))
    return rows


def _eval_summary(records: list[dict[str, Any]]) -> list[str]:
    """The held-out metrics at the first and the last evaluation (none in a run that did not evaluate)."""
    evaluated = [r for r in records if isinstance(r.get(EVAL_PREFIX + "loss"), (int, float))]
    if not evaluated:
        return []
    first, last = evaluated[0], evaluated[-1]
    lines = [
        "",
        f"## Eval ({len(evaluated)} evaluations on the eval split)",
        "",
        f"| metric | first (step {first['step']}) | last (step {last['step']}) |",
        "|---|---|---|",
    ]
    for key in (k for k in EVAL_SUMMARY_KEYS if EVAL_PREFIX + k in first or EVAL_PREFIX + k in last):
        values = [_series([r], EVAL_PREFIX + key)[0] for r in (first, last)]
        lines.append(f"| eval/{key} | {_fmt(values[0])} | {_fmt(values[1])} |")
    return lines


def _worker_rows(run_dir: RunDir, last_step: int) -> list[str]:
    """Which worker group ran which steps, and where each rank of the last group ran (workers.json,
    one entry per start of the group: `rundir/worker_groups.py`)."""
    groups = parse_groups(_read(run_dir, WORKERS_FILE))
    if not groups:
        return []
    lines = []
    if groups[-1].start_step is not None:
        lines += ["", f"## Worker groups ({len(groups)})", ""]
        lines += ["| group | resumed at step | steps kept | workers | nodes |", "|---|---|---|---|---|"]
        for number, (group, span) in enumerate(zip(groups, kept_steps(groups, last_step)), 1):
            kept = f"{span[0]}-{span[1]}" if span else "none (redone)"
            nodes = len({w.get("node_id") for w in group.workers})
            lines.append(f"| {number} | {group.start_step} | {kept} | {group.world_size} | {nodes} |")
    workers = groups[-1].workers
    nodes = {w.get("node_id") for w in workers}
    lines += ["", f"## Workers ({len(workers)} ranks on {len(nodes)} node{'s' * (len(nodes) != 1)})", ""]
    lines += ["| rank | node | node IP | host | pid |", "|---|---|---|---|---|"]
    for w in workers:
        node = str(w.get("node_id", "—"))[:12]
        lines.append(
            f"| {w.get('rank')} | {node} | {w.get('node_ip')} | {w.get('hostname')} | {w.get('pid')} |"
        )
    return lines


def _summary(run_dir: RunDir, records: list[dict[str, Any]], figures: list[Path]) -> str:
    n = len(records)
    tail = max(1, math.ceil(n / 10))  # the last 10% of steps, at least one
    loss = _series(records, "loss")
    finite = [(v, r["step"]) for v, r in zip(loss, records) if math.isfinite(v)]
    low, low_step = min(finite) if finite else (math.nan, "—")
    steady = records[1:] or records  # the first step pays for warm-up (allocations, compilation)
    seconds = sum(v for v in _series(records, "step_time") if math.isfinite(v))
    epochs = {r["epoch"] for r in records if "epoch" in r}
    checkpoints = run_dir.checkpoint_names()
    lines = [
        f"# KTO run report: {run_dir.name}",
        "",
        "| | |",
        "|---|---|",
        f"| steps | {n} (step {records[0]['step']} to {records[-1]['step']}) |",
        f"| epochs | {len(epochs)} |",
        f"| loss first / last / min | {_fmt(loss[0])} / {_fmt(loss[-1])} / {_fmt(low)} (step {low_step}) |",
        f"| mean samples/s (steady state) | {_mean(_series(steady, 'samples/s')):.1f} |",
        f"| mean tokens/s (steady state) | {_mean(_series(steady, 'tokens/s')):.1f} |",
        f"| training time (sum of step_time) | {seconds:.1f} s ({timedelta(seconds=round(seconds))}) |",
        f"| checkpoints | {', '.join(checkpoints) or 'none'} |",
        f"| final/ exported | {'yes' if run_dir.exists('final') else 'no'} |",
        "",
        "## Final values",
        "",
        f"| metric | last step | mean of last {tail} steps (10%) |",
        "|---|---|---|",
    ]
    for key in ("kl", "kl/raw", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        values = _series(records, key)
        label = "kl (z0)" if key == "kl" else key
        lines.append(f"| {label} | {_fmt(values[-1])} | {_fmt(_mean(values[-tail:]))} |")
    lines += _eval_summary(records)
    lines += _worker_rows(run_dir, int(records[-1]["step"]))
    config = _config_rows(run_dir)
    if config:
        lines += ["", "## Config", "", "| key | value |", "|---|---|"]
        lines += [f"| {key} | `{value}` |" for key, value in config]
    lines += ["", "## Figures", ""]
    lines += [f"![{p.stem}]({p.name})\n" for p in figures]  # summary.md sits next to the PNGs
    return "\n".join(lines)


def write_report(run_dir: str | Path | RunDir, out_dir: Path | None = None) -> ReportResult:
    """Write the PNG curves and summary.md for `run_dir` (a local folder or a URI) into `out_dir`
    (default: `RunDir.report_dir`)."""
    run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
    records = load_metrics(run_dir)
    out_dir = run_dir.report_dir() if out_dir is None else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = _plot(records, out_dir, run_dir.name)
    summary = out_dir / "summary.md"
    summary.write_text(_summary(run_dir, records, figures))
    problems = [
        f"{run_dir.child(name)} is damaged (file {p.path}, {p.what}): `kto-ray verify {run_dir}` lists all"
        for name in ("final", "merged")
        for p in model_folder_problems(run_dir.join(name))
    ]
    return ReportResult(figures=figures, summary=summary, problems=problems)


def write_tensorboard(run_dir: str | Path | RunDir, log_dir: Path) -> Path:
    """Replay metrics.jsonl as TensorBoard scalars (same names as the JSON keys) into `log_dir`."""
    if importlib.util.find_spec("tensorboard") is None:
        raise UserError("tensorboard is not installed: pip install tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    records = load_metrics(run_dir)
    writer = SummaryWriter(log_dir=str(log_dir))
    try:
        for record in records:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, global_step=int(record["step"]))
    finally:
        writer.close()
    return Path(log_dir)
