"""One live run per run dir: a second `kto-ray train` with the same run.name refuses in one line while
the first runs, and a rerun after the first is killed takes the run over (its lease is stale)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml

from kto_ray.rundir.lease import LEASE, Lease
from kto_ray.storage import resolve
from tests.conftest import kill_process_tree

pytestmark = pytest.mark.slow


def _train(config_file, **kwargs):
    return [sys.executable, "-m", "kto_ray", "train", "--config", str(config_file)], dict(
        env=dict(os.environ, RAY_ADDRESS="local"), cwd=config_file.parent, **kwargs
    )


def test_a_second_train_with_the_same_run_name_refuses_while_the_first_runs(built_store, tmp_path):
    cfg, _ = built_store
    tree = cfg.model_dump(mode="json")
    tree["run"] |= {"dir": str(tmp_path / "runs"), "name": "shared"}
    tree["train"] |= {"max_steps": 200, "micro_batch_size": 4}  # longer than the test lasts
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(tree))
    lease_file = tmp_path / "runs" / "shared" / LEASE

    args, kwargs = _train(config_file, start_new_session=True)
    first = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kwargs)
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "runs" / "shared" / "config.yaml").exists():  # written once the lease is held
            assert first.poll() is None, "the first run exited"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        holder = json.loads(lease_file.read_text())
        assert holder["pid"] == first.pid and holder["what"] == "training run"

        args, kwargs = _train(config_file, capture_output=True, text=True, timeout=300)
        second = subprocess.run(args, **kwargs)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("kto-ray: error:")]
        assert len(errors) == 1 and "Traceback" not in second.stderr, second.stderr
        assert f"{tmp_path / 'runs' / 'shared'} is in use by another training run" in errors[0]
        assert f"pid {first.pid}" in errors[0]
        assert first.poll() is None  # the first run goes on
    finally:
        kill_process_tree(first.pid)
        first.wait()
    # The killed run's lease names a dead pid on this host: the next run takes it over at once.
    assert json.loads(lease_file.read_text())["pid"] == first.pid
    lease = Lease(resolve(tmp_path / "runs" / "shared"), "training run", settle=0.1).acquire()
    lease.release()
    assert not lease_file.exists()
