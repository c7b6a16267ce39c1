"""The run report: PNG curves and summary.md from a synthetic metrics.jsonl (fast: no Ray, no training)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import yaml

from kto_ray.errors import UserError
from kto_ray.tools.report import load_metrics, write_report, write_tensorboard

STEPS = 60
STEPS_PER_EPOCH = 30


def _record(step: int) -> dict:
    """One optimizer step of a run that learns: loss falls, the margin grows, a little noise on top."""
    wiggle = 0.01 * math.sin(step)
    chosen, rejected = 0.02 * step + wiggle, -0.03 * step - wiggle
    step_time = 2.0 if step == 1 else 0.5  # the first step is slow (warm-up)
    return {
        "loss": 0.5 - 0.003 * step + wiggle,
        "kl": max(0.0, 0.05 + 0.001 * step),
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/margins": chosen - rejected,
        "logps/chosen": -12.0 + 0.01 * step,
        "logps/rejected": -12.0 - 0.02 * step,
        "count/chosen": 15,
        "count/rejected": 17,
        "grad_norm": 0.2 + 0.01 * step,
        "tokens": 6000,
        "rows": 32,
        "step": step,
        "epoch": (step - 1) // STEPS_PER_EPOCH,
        "learning_rate": 3e-4 * min(1.0, step / 5),
        "step_time": step_time,
        "samples/s": 32 / step_time,
        "tokens/s": 6000 / step_time,
    }


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "my-run"
    (run / "checkpoints" / "step_00000050").mkdir(parents=True)
    lines = [json.dumps(_record(step)) for step in range(1, STEPS + 1)]
    # A crash mid-write leaves a cut last line; it must be skipped, not fail the report.
    (run / "metrics.jsonl").write_text("\n".join(lines) + '\n{"loss": 0.1, "kl": 0.0, "rewa')
    config = {
        "model": {"path": "artifacts/tiny-llama"},
        "train": {"beta": 0.1, "lr": 3e-4, "micro_batch_size": 16, "global_batch_size": 64},
        "cluster": {"workers": 2},
    }
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def _check_png(path: Path) -> None:
    from matplotlib.image import imread

    pixels = imread(path)
    height, width = pixels.shape[:2]
    assert width >= 400 and height >= 200, (path, pixels.shape)
    assert pixels.var() > 0, f"{path} is blank"


def test_report_writes_images_and_summary(run_dir: Path) -> None:
    result = write_report(run_dir)
    assert result.summary == run_dir / "report" / "summary.md"
    names = {p.name for p in result.figures}
    assert {"loss.png", "kl.png", "rewards.png", "margins.png", "training.png"} <= names
    for path in result.figures:
        assert path.parent == run_dir / "report"
        _check_png(path)

    summary = result.summary.read_text()
    last = _record(STEPS)
    assert "# KTO run report: my-run" in summary
    assert f"| steps | {STEPS} (step 1 to {STEPS}) |" in summary
    assert "| epochs | 2 |" in summary
    assert f"/ {last['loss']:.4f} /" in summary  # last loss, and not the cut line's 0.1
    assert "0.1000" not in summary.split("| loss first")[1].split("\n")[0]
    assert f"{last['rewards/margins']:.4f}" in summary
    tail_margin = sum(_record(s)["rewards/margins"] for s in range(55, STEPS + 1)) / 6
    assert "mean of last 6 steps" in summary and f"{tail_margin:.4f}" in summary
    assert "| mean samples/s (steady state) | 64.0 |" in summary  # step 1 (16 samples/s) excluded
    assert f"| training time (sum of step_time) | {2.0 + 0.5 * (STEPS - 1):.1f} s" in summary
    assert "step_00000050" in summary
    assert "| final/ exported | no |" in summary
    assert "| train.beta | `0.1` |" in summary and "| cluster.workers | `2` |" in summary
    assert "| train.global_batch_size | `64` |" in summary
    for path in result.figures:
        assert f"]({path.name})" in summary  # relative links, next to summary.md


def test_report_custom_out_dir_few_steps_and_final(tmp_path: Path) -> None:
    # A short run without config.yaml: no smoothing, no config section, final/ present.
    run = tmp_path / "short"
    (run / "final").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(_record(s)) + "\n" for s in range(1, 4)))
    result = write_report(run, tmp_path / "out")
    assert result.summary == tmp_path / "out" / "summary.md"
    for path in result.figures:
        _check_png(path)
    summary = result.summary.read_text()
    assert "| steps | 3 (step 1 to 3) |" in summary
    assert "| final/ exported | yes |" in summary and "| checkpoints | none |" in summary
    assert "## Config" not in summary


def test_missing_or_empty_metrics_is_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"metrics\.jsonl"):
        write_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"loss": 0.5, "st\nnot json\n')
    with pytest.raises(UserError, match="no parsable"):
        write_report(tmp_path)


def test_load_metrics_sorts_and_keeps_last_of_a_repeated_step(tmp_path: Path) -> None:
    lines = [_record(2), _record(1), {**_record(2), "loss": 0.25}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    records = load_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2] and records[1]["loss"] == 0.25


def test_tensorboard(run_dir: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "tb"
    if importlib.util.find_spec("tensorboard") is None:
        with pytest.raises(UserError, match="pip install tensorboard"):
            write_tensorboard(run_dir, log_dir)
        return
    write_tensorboard(run_dir, log_dir)
    assert list(log_dir.glob("events.out.tfevents*"))


def test_cli_report(run_dir: Path, capsys) -> None:
    from kto_ray.cli import main

    assert main(["report", str(run_dir)]) == 0
    assert str(run_dir / "report" / "summary.md") in capsys.readouterr().out
    _check_png(run_dir / "report" / "loss.png")


def _with_eval(step: int) -> dict:
    """A run with train.eval_every 10: eval/... keys on every 10th step's line."""
    record = _record(step)
    if step % 10 == 0:
        record |= {
            "eval/loss": 0.55 - 0.002 * step,
            "eval/kl": 0.03,
            "eval/reward_accuracy": 0.5 + 0.005 * step,
            "eval/rewards/chosen": 0.01 * step,
            "eval/rewards/rejected": -0.01 * step,
            "eval/rewards/margins": 0.02 * step,
        }
    return record


def test_report_draws_eval_metrics(run_dir: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    plain = write_report(run_dir, tmp_path / "plain")
    assert "eval.png" not in {p.name for p in plain.figures}
    assert "## Eval" not in plain.summary.read_text()

    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps(_with_eval(s)) + "\n" for s in range(1, STEPS + 1))
    )
    result = write_report(run_dir, tmp_path / "eval")
    names = {p.name for p in result.figures}
    assert {"loss.png", "kl.png", "rewards.png", "margins.png", "training.png", "eval.png"} == names
    for path in result.figures:
        _check_png(path)
    # The eval points are drawn over the training curves: the same figure, other pixels.
    for stem in ("loss", "kl", "rewards", "margins"):
        assert (imread(tmp_path / "plain" / f"{stem}.png") != imread(tmp_path / "eval" / f"{stem}.png")).any()
    summary = result.summary.read_text()
    assert "## Eval (6 evaluations on the eval split)" in summary
    assert "| metric | first (step 10) | last (step 60) |" in summary
    assert f"| eval/loss | {0.55 - 0.02:.4f} | {0.55 - 0.12:.4f} |" in summary
    assert f"| eval/reward_accuracy | {0.55:.4f} | {0.8:.4f} |" in summary
    assert "![eval](eval.png)" in summary
