"""The console: training progress drawn from metrics.jsonl (plain lines off a terminal, a tqdm bar on
one), never doubled, and library chatter switched off unless asked for."""

from __future__ import annotations

import io
import json
import os

import pytest

from kto_ray import console
from kto_ray.console import TrainingProgress
from kto_ray.rundir import RunDir


def _record(step: int) -> str:
    metrics = {"step": step, "loss": 0.5 - step / 100, "kl": 0.0, "rewards/margins": step / 10}
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
    assert lines[0].startswith("step 3/7 loss 0.4700 kl 0.0000 margin 0.3000 100.0 samples/s eta")


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


@pytest.fixture
def clean_env(monkeypatch):
    for name in (
        console.VERBOSE_ENV,
        "TRANSFORMERS_VERBOSITY",
        "HF_HUB_DISABLE_PROGRESS_BARS",
        "RAY_BACKEND_LOG_LEVEL",
    ):
        monkeypatch.delenv(name, raising=False)
    import warnings

    with warnings.catch_warnings():  # configure() installs filters: keep them inside this test
        yield monkeypatch


def test_quiet_by_default_verbose_on_request(clean_env):
    assert console.configure(verbose=False) is False
    assert os.environ["TRANSFORMERS_VERBOSITY"] == "error"
    assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert console.ray_init_options()["log_to_driver"] is False


def test_verbose_flag_or_environment_keeps_everything(clean_env):
    assert console.configure(verbose=True) is True
    assert "TRANSFORMERS_VERBOSITY" not in os.environ
    assert console.ray_init_options()["log_to_driver"] is True
    clean_env.delenv(console.VERBOSE_ENV)
    clean_env.setenv(console.VERBOSE_ENV, "1")  # the way to ask under `ray job submit`
    assert console.configure(verbose=False) is True


# ------------------------------------------------------------------ the real CLI (slow: Ray, DeepSpeed)

NOISE = ("Traceback", "WARNING", "INFO", "Warning:", "RayTrainWorker", "Loading weights", "PlacementGroup")


def _pipeline_command(tmp_path) -> list[str]:
    from tests.conftest import REPO

    small = tmp_path / "small.jsonl"
    small.write_text("".join((REPO / "data" / "arithmetic.jsonl").read_text().splitlines(True)[:240]))
    return [
        str(REPO / ".venv" / "bin" / "kto-ray"),
        "pipeline",
        f"--set=data.paths=[{small}]",
        f"--set=store.path={tmp_path / 'store'}",
        f"--set=run.dir={tmp_path / 'runs'}",
        "--set=train.max_steps=6",
        "--set=train.desirable_weight=auto",
        "--set=precompute.bucket_rows=64",
    ]


def _environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    return env | {"TERM": "xterm-256color", "PYTHONWARNINGS": ""}


@pytest.mark.slow
def test_pipeline_on_a_terminal_shows_bars_and_the_table(tmp_path):
    """In tmux (a real terminal): one bar per stage, the results table, nothing from the libraries."""
    import shlex
    import shutil
    import subprocess
    import time

    from tests.conftest import REPO

    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    socket, done = f"kto-ray-test-{os.getpid()}", tmp_path / "exit-code"
    command = shlex.join(_pipeline_command(tmp_path))
    tmux = ["tmux", "-L", socket]
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-s",
            "t",
            "-x",
            "160",
            "-y",
            "50",
            f"{command}; echo $? > {done}; sleep 600",
        ],
        check=True,
        cwd=REPO,
        env=_environment(),
    )
    try:
        deadline = time.monotonic() + 600
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(1)
        pane = subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-t", "t", "-S", "-"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    assert done.read_text().strip() == "0", pane
    lines = [line for line in pane.splitlines() if line.strip()]
    assert any(
        line.startswith("reference: 100%") and "240/240" in line and "tokens/s" in line for line in lines
    )
    assert any(line.startswith("train: 100%") and "6/6" in line and "loss=" in line for line in lines), pane
    assert "reward_accuracy" in pane and "held-out eval split" in pane
    assert not [line for line in lines if any(word in line for word in NOISE)], pane
    assert not [line for line in lines if line.startswith("step ")]  # the bar, not plain lines
    assert len(lines) <= 24, pane


@pytest.mark.slow
def test_demo_off_a_terminal_fits_in_60_lines(tmp_path):
    """`kto-ray demo` with its output piped (CI, `ray job logs`): plain lines, each step line once."""
    import subprocess

    from tests.conftest import REPO

    command = [
        str(REPO / ".venv" / "bin" / "kto-ray"),
        "demo",
        f"--set=store.path={tmp_path / 'store'}",
        f"--set=run.dir={tmp_path / 'runs'}",
        "--set=train.max_steps=20",
        "--set=train.log_every=5",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=900
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) <= 60, output
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == ["5/20", "10/20", "15/20", "20/20"], output
    assert not [line for line in lines if any(word in line for word in NOISE)], output
    assert "\r" not in output  # no bar redraws in a log
