"""The console: library chatter switched off unless asked for, and what the real CLI prints (bars on a
terminal, plain lines in a log). Training progress itself: tests/training/launch/test_progress.py."""

from __future__ import annotations

import os

import pytest

from kto_ray import console


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
