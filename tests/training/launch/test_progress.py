"""Training progress drawn from metrics.jsonl (plain lines off a terminal, a tqdm bar on one), each step
shown once, however the file grows, is cut by a resume or split into segments on object storage."""

from __future__ import annotations

import io
import json

from kto_ray.rundir import RunDir
from kto_ray.training.launch.progress import TrainingProgress


def _record(step: int) -> str:
    metrics = {"step": step, "loss": 0.5 - step / 100, "kl": 0.0, "kl/raw": -0.25}
    metrics["rewards/margins"] = step / 10
    return json.dumps(metrics | {"samples/s": 100.0, "step_time": 0.1}) + "\n"


def test_plain_lines_every_log_every_steps_and_the_last(tmp_path):
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    progress = TrainingProgress(
        RunDir(tmp_path), total_steps=7, log_every=3, interactive=False, stream=out, poll_s=0.01
    )
    with progress, open(path, "a") as handle:
        for step in range(1, 8):
            handle.write(_record(step))
            handle.flush()
            progress.poll()  # the thread may or may not have seen it: a step is shown once either way
    lines = out.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/7", "6/7", "7/7"]
    expected = "step 3/7 loss 0.4700 kl 0.0000 (raw -0.2500) margin 0.3000 100.0 samples/s eta"
    assert lines[0].startswith(expected)


def test_a_line_cut_mid_write_waits_for_its_end(tmp_path):
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    progress = TrainingProgress(RunDir(tmp_path), total_steps=2, log_every=1, interactive=False, stream=out)
    record = _record(1)
    path.write_text(record[:10])
    progress.poll()
    assert out.getvalue() == ""
    path.write_text(record + _record(2))
    progress.poll()
    assert len(out.getvalue().splitlines()) == 2


def test_a_resume_rewrites_the_file_and_no_step_is_shown_twice(tmp_path):
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    progress = TrainingProgress(RunDir(tmp_path), total_steps=6, log_every=1, interactive=False, stream=out)
    path.write_text("".join(_record(s) for s in (1, 2, 3, 4)))
    progress.poll()
    path.write_text("".join(_record(s) for s in (1, 2)))  # resumed from the step-2 checkpoint
    progress.poll()
    path.write_text("".join(_record(s) for s in (1, 2, 3, 4, 5, 6)))
    progress.poll()
    assert [line.split()[1] for line in out.getvalue().splitlines()] == [f"{s}/6" for s in range(1, 7)]


def test_bar_on_a_terminal(tmp_path):
    path, out = tmp_path / "metrics.jsonl", io.StringIO()
    with TrainingProgress(
        RunDir(tmp_path), total_steps=4, log_every=1, interactive=True, stream=out, poll_s=0.01
    ):
        path.write_text("".join(_record(s) for s in (1, 2, 3, 4)))
    text = out.getvalue()
    assert "train: 100%" in text and "4/4" in text and "loss=0.4600" in text
    assert "step 4/4 loss" not in text  # the bar replaces the plain lines
