"""A run resumed on a different number of workers: the checkpoint is reshaped (DeepSpeed's universal
checkpoint) and the run goes on at the same data position, equal to an uninterrupted run.

The global batch stays 8 rows per step: the uninterrupted run takes 2 workers x micro-batch 4; a rerun
keeps micro-batch 4, so on 1 worker its accumulation is derived as 2 (the global batch is the contract,
training/resume/global_batch.py). That 1 worker x 8 rows takes the step 2 workers x 4 take is
tests/training/test_train.py's (test_one_worker_equals_two_workers, test_accumulation_equals_more_workers);
a run resumed on 1 worker that ends with the 2-worker run's weights proves it over the resumed steps.
("both uninterrupted runs" in two tests' names: the 2-worker run, and through it the 1-worker run that
test_train proves equal; the names are kept as DESIGN.md cites them.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from safetensors.torch import load_file

from kto_ray.errors import StorageError
from kto_ray.training.launch.driver import train
from tests.conftest import assert_same_tensors, assert_same_weights, read_metrics

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

STEPS, HALF = 8, 4
LORA = {"enabled": True, "r": 4, "alpha": 8.0, "dropout": 0.0, "target_modules": "all-linear"}


def _config(
    built_store, root: Path, name: str, workers: int, steps: int = STEPS, micro: int | None = None, **sections
):
    cfg, _store = built_store
    tree = cfg.model_dump(mode="json")
    # Constant LR: a run stopped at step 4 and rerun to step 8 follows the 8-step run's schedule.
    tree["train"] |= {
        "max_steps": steps,
        "micro_batch_size": micro or 8 // workers,
        "global_batch_size": 8,  # every run and rerun here: the contract the module docstring names
        "lr": 1e-3,
        "warmup_ratio": 0.0,
        "schedule": "constant",
    }
    tree["cluster"] |= {"workers": workers}
    tree["run"] |= {"name": name, "dir": str(root), "checkpoint_every": HALF, "export": steps == STEPS}
    for section, values in sections.items():
        tree[section] |= values
    return cfg.model_validate(tree)


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _resumed(built_store, root: Path, name: str, first: int, then: int, **sections) -> Path:
    """`first` workers to step 4, then `then` workers to step 8 in the same run dir."""
    train(_config(built_store, root, name, first, steps=HALF, **sections))
    return train(_config(built_store, root, name, then, micro=4, **sections)).run_dir.local_path


@pytest.fixture(scope="module")
def steady(built_store, tmp_path_factory):
    """The uninterrupted 8-step run on 2 workers (a 1-worker one would re-prove test_train's 1 == 2)."""
    root = tmp_path_factory.mktemp("steady")
    return train(_config(built_store, root, "w2", 2)).run_dir.local_path


def _assert_every_step_once(run_dir: Path) -> None:
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, STEPS + 1))


def test_two_workers_then_one_matches_both_uninterrupted_runs(built_store, steady, tmp_path):
    train(_config(built_store, tmp_path, "shrunk", 2, steps=HALF))
    checkpoint = tmp_path / "shrunk" / "checkpoints" / f"step_{HALF:08d}"
    before = _digests(checkpoint)

    # A reshape that cannot write its scratch folder fails in one line and leaves the checkpoint as it was.
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(StorageError) as failed:
        train(
            _config(
                built_store, tmp_path, "shrunk", 1, micro=4, run={"scratch_dir": str(blocked / "scratch")}
            )
        )
    message = str(failed.value)
    assert "\n" not in message
    assert f"step_{HALF:08d} (step {HALF}, 2 workers) could not be reshaped for 1 worker" in message
    assert "left as it was" in message and "cluster.workers=2" in message
    assert _digests(checkpoint) == before

    run_dir = train(_config(built_store, tmp_path, "shrunk", 1, micro=4)).run_dir.local_path
    _assert_every_step_once(run_dir)
    assert _digests(checkpoint) == before or not checkpoint.exists()  # read, never written (or rotated)
    assert_same_weights(run_dir / "final", steady / "final")


def test_one_worker_then_two_matches_both_uninterrupted_runs(built_store, steady, tmp_path):
    run_dir = _resumed(built_store, tmp_path, "grown", 1, 2)
    _assert_every_step_once(run_dir)
    assert_same_weights(run_dir / "final", steady / "final")


def test_lora_on_zero2_two_workers_then_one_matches_the_uninterrupted_run(built_store, tmp_path):
    sections = {"lora": LORA, "deepspeed": {"stage": 2}}
    uninterrupted = train(_config(built_store, tmp_path, "steady", 2, **sections)).run_dir.local_path
    run_dir = _resumed(built_store, tmp_path, "shrunk", 2, 1, **sections)
    _assert_every_step_once(run_dir)
    adapter = "final/adapter_model.safetensors"
    assert_same_tensors(load_file(run_dir / adapter), load_file(uninterrupted / adapter))
