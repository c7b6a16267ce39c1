"""The job scripts `ray job submit` runs are the CLI. Their submission to a real Ray head, as a cluster user
runs it, is tests/integration/test_multinode.py's (the pipeline job on two nodes, then train jobs)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .conftest import REPO


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
