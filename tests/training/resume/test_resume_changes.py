"""A rerun that changed its config, on a local Ray with real DeepSpeed: a refused change exits 2 with its
one line before anything is launched or written, and leaves the checkpoint untouched; a longer run
resumes with its learning-rate schedule recomputed for the new total from the first resumed step."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from kto_ray.cli import main
from kto_ray.config import dump_config
from kto_ray.training.engine import lr_lambda
from kto_ray.training.launch.driver import train
from kto_ray.training.resume.run_state import RUN_STATE_FILE
from tests.conftest import own_lines, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]


def _tree(folder: Path) -> dict[str, str]:
    """Every file below `folder`, by its content's hash and mtime."""
    return {
        str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {p.stat().st_mtime_ns}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def two_steps(built_store, tmp_path_factory):
    """2 steps on 1 worker, cosine after one warmup step, checkpointed at step 2; and its config file."""
    cfg, _store = built_store
    root = tmp_path_factory.mktemp("resume")
    tree = cfg.model_dump(mode="json")
    tree["train"] |= {"max_steps": 2, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.2}
    tree["run"] |= {"name": "grows", "dir": str(root), "checkpoint_every": 2, "export": False}
    tree["cluster"] |= {"workers": 1}
    cfg = cfg.model_validate(tree)
    result = train(cfg)
    config_file = root / "grows.yaml"
    config_file.write_text(dump_config(cfg))
    return cfg, config_file, result.run_dir.local_path


def test_the_checkpoint_carries_its_run_state(two_steps):
    _cfg, _file, run_dir = two_steps
    state = json.loads((run_dir / "checkpoints" / "step_00000002" / RUN_STATE_FILE).read_text())
    assert (state["global_batch"], state["total_steps"], state["world_size"]) == (4, 2, 1)
    assert state["config"]["train"]["seed"] == 42 and state["train_rows"].startswith("store:")


def test_a_changed_seed_exits_2_in_one_line_and_leaves_the_checkpoint_untouched(two_steps, capsys):
    _cfg, config_file, run_dir = two_steps
    before = _tree(run_dir)
    capsys.readouterr()
    assert main(["train", "--config", str(config_file), "--set", "train.seed=7"]) == 2
    lines = own_lines(capsys.readouterr().err)
    assert len(lines) == 1
    (err,) = lines
    assert "cannot resume from step_00000002: train.seed is 42 there and 7 now" in err
    assert "run.name" in err
    assert _tree(run_dir) == before  # the checkpoint, config.yaml, metrics: not a byte or an mtime


def test_a_longer_run_resumes_with_the_schedule_recomputed(two_steps, capsys):
    cfg, config_file, run_dir = two_steps
    # A newer step folder Ray Train never registered (a copy, a partial upload), written under another
    # seed by 2 workers: neither the checks nor the stage nor the reshape look at it, and Ray does not
    # resume it. The checks are made against step 2, the one resumed.
    registered = run_dir / "checkpoints" / "step_00000002"
    stray = run_dir / "checkpoints" / "step_00000009"
    shutil.copytree(registered, stray)
    state = json.loads((stray / RUN_STATE_FILE).read_text())
    state["config"]["train"]["seed"], state["world_size"] = 7, 2
    (stray / RUN_STATE_FILE).write_text(json.dumps(state))
    capsys.readouterr()
    try:
        assert main(["train", "--config", str(config_file), "--set", "train.max_steps=4"]) == 0
    finally:
        shutil.rmtree(stray)
    out = capsys.readouterr().out
    assert "resuming from step_00000002 with changes: train.max_steps: 2 -> 4 steps" in out
    assert "step_00000009" not in out and "reshap" not in out
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # Steps 1-2 ran under the 2-step schedule; 3-4 under the 4-step one, from the first resumed step
    # (the restored optimizer alone would apply the old schedule's rate, 0 after its last step).
    old, new = lr_lambda(cfg, 2), lr_lambda(cfg, 4)
    expected = [cfg.train.lr * f for f in (old(0), old(1), new(2), new(3))]
    assert [r["learning_rate"] for r in records] == pytest.approx(expected, rel=1e-6)
    assert expected[2] > 0
    state = json.loads((run_dir / "checkpoints" / "step_00000004" / RUN_STATE_FILE).read_text())
    assert state["total_steps"] == 4


def test_a_whole_checkpoint_without_a_run_state_is_refused_in_one_line(two_steps, capsys):
    # Every checkpoint kto-ray writes has its run state, listed in its file list: one without (listed
    # as whole, so the damage check passes it) is none of ours, and the rerun stops before it launches.
    _cfg, config_file, run_dir = two_steps
    latest = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    (latest / RUN_STATE_FILE).unlink()
    listed = json.loads((latest / "files_rank0.json").read_text())
    listed["files"] = [f for f in listed["files"] if f["path"] != RUN_STATE_FILE]
    (latest / "files_rank0.json").write_text(json.dumps(listed))
    capsys.readouterr()
    assert main(["train", "--config", str(config_file), "--set", "train.max_steps=4"]) == 2
    err = capsys.readouterr().err
    assert f"{latest} has no {RUN_STATE_FILE}: not a checkpoint of this kto-ray" in err
    assert len(own_lines(err)) == 1, err
