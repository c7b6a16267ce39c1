"""`ray job submit` of jobs/pipeline.py against a real Ray head on loopback, as a cluster user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import REPO, read_metrics
from .nodes import BIN, ray_cluster


@pytest.fixture
def ray_head():
    """A Ray head of its own (tests/nodes.py: own temp dir and ports, token auth, stopped by pid), with
    the job server: (its address, the environment its clients use)."""
    with ray_cluster(head_cpus=2) as cluster:
        yield cluster.address, cluster.env


@pytest.mark.parametrize("script", ["precompute_ref.py", "train_kto.py", "pipeline.py"])
def test_job_scripts_are_the_cli(script, tmp_path):
    # Run directly, as `ray job submit` runs them: a bad config is refused by the CLI (exit 2, one line).
    job = subprocess.run(
        [sys.executable, REPO / "jobs" / script, "--config", tmp_path / "missing.yaml"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert job.returncode == 2
    assert job.stderr.strip() == f"kto-ray: error: config file not found: {tmp_path / 'missing.yaml'}"


@pytest.mark.extended
def test_submitted_pipeline_builds_the_store_and_trains(ray_head, tiny_model, small_data, tmp_path):
    address, env = ray_head
    overrides = {
        "model.path": tiny_model,
        "data.paths": json.dumps([str(small_data)]),
        "store.path": tmp_path / "store",
        "run.dir": tmp_path / "runs",
        "run.name": "submitted",
        "train.max_steps": 3,
        "train.micro_batch_size": 4,
        "run.checkpoint_every": 2,
    }
    sets = [arg for key, value in overrides.items() for arg in ("--set", f"{key}={value}")]
    job = subprocess.run(
        [BIN / "ray", "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
         "python", "jobs/pipeline.py", "--config", "configs/demo.yaml", *sets],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-4000:]
    assert "succeeded" in job.stdout
    assert "held-out eval split" in job.stdout  # the job's own output reached the submitter

    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    assert sum(manifest["counts"]["train"].values()) > 0
    run_dir = tmp_path / "runs" / "submitted"
    assert [m["step"] for m in read_metrics(run_dir)] == [1, 2, 3]
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) == [
        "step_00000002",
        "step_00000003",
    ]
    assert (run_dir / "final" / "model.safetensors").is_file()
