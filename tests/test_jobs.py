"""`ray job submit` of jobs/pipeline.py against a real Ray head on loopback, as a cluster user runs it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from .conftest import REPO, read_metrics

BIN = Path(sys.executable).parent


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


@pytest.fixture
def ray_head():
    """`ray start --head --block` in its own temp dir and ports; SIGTERM stops exactly what it started."""
    gcs, dashboard, agent, metrics, client = _free_ports(5)
    # Token auth as on a real cluster: head, job driver and the `ray job` client share one secret.
    env = os.environ | {
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    env.pop("RAY_ADDRESS", None)
    # Every process of this cluster (and the `ray job` client) asks this head's API server: on a host
    # with several Rays, the default lookup may find another one's (Ray Train's placement-group
    # cleaner would then ask it about our controller).
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard}"
    temp_dir = tempfile.mkdtemp(prefix="kto-ray-head-", dir="/tmp")  # short: Ray's socket paths are capped
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--dashboard-agent-listen-port={agent}", f"--metrics-export-port={metrics}",
         f"--ray-client-server-port={client}", f"--temp-dir={temp_dir}"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 300  # a loaded 2-core machine can take minutes
        while subprocess.run([BIN / "ray", "job", "list", "--address", address], env=env,
                             capture_output=True).returncode != 0:  # fmt: skip
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the job server did not come up in 300 s"
            time.sleep(2)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


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


@pytest.mark.slow
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
