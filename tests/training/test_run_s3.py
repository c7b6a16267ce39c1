"""A run dir on s3://, against a real S3 server (moto's, on 127.0.0.1): 2-worker training, a killed
driver and a rerun that resumes exactly, evaluate and report reading the URI, nothing of the run on
local disk; the server cut while a checkpoint uploads fails naming the step, and the rerun resumes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from kto_ray.errors import StorageError
from kto_ray.reference.precompute import precompute
from kto_ray.rundir import RunDir, fetch_folder
from kto_ray.rundir.metrics import read_metrics, segment_name
from kto_ray.rundir.worker_groups import parse_groups
from kto_ray.storage import files_under
from kto_ray.tools.evaluate import evaluate
from kto_ray.tools.report import write_report
from kto_ray.training.launch.driver import train
from tests.conftest import (
    REPO,
    assert_same_weights,
    kill_process_tree,
    make_config,
    registered_steps,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_with_s3")]

STEPS = 8
RUNS = "s3://kto/runs"


@pytest.fixture(scope="module")
def s3_cfg(ray_with_s3, tiny_model, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3run")
    os.environ["KTO_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # fetched model folders
    cfg = make_config(
        tiny_model,
        small_data,
        root,
        store={"path": "s3://kto/stores/for-runs"},
        train={"max_steps": STEPS, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0},
        run={"dir": RUNS, "name": "unset", "checkpoint_every": 4, "max_failures": 0},
    )
    precompute(cfg)
    return cfg, root


def _named(cfg, name: str, run_dir: str = RUNS):
    out = cfg.model_copy(deep=True)
    out.run.name, out.run.dir = name, run_dir
    return out


@pytest.fixture(scope="module")
def uninterrupted(s3_cfg, tmp_path_factory) -> Path:
    """The same run, uninterrupted, with a local run dir: the weights every resumed run must match."""
    cfg, _ = s3_cfg
    local = _named(cfg, "steady", str(tmp_path_factory.mktemp("local-runs")))
    return train(local).run_dir.local_path / "final"


def _metrics(run_dir: RunDir) -> list[dict]:
    return read_metrics(run_dir)


def test_run_dir_on_s3_survives_a_killed_driver(s3_cfg, uninterrupted, tmp_path):
    cfg, root = s3_cfg
    cfg = _named(cfg, "driver")
    run_dir = RunDir.of(cfg)
    config_file = tmp_path / "cfg.yaml"
    config_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    driver = subprocess.Popen(
        [sys.executable, "-m", "kto_ray", "train", "--config", str(config_file)],
        env=dict(os.environ, RAY_ADDRESS="local"),  # its own Ray, killed with it like a lost job
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Killed once Ray Train has registered the step-4 checkpoint and a later step is logged.
    wait_for(
        lambda: registered_steps(run_dir) and len(_metrics(run_dir)) > max(registered_steps(run_dir)),
        lambda: driver.poll() is None,
        timeout=400,
        interval=0.2,  # each poll is two GETs on the server
    )
    kill_process_tree(driver.pid)
    driver.wait()
    before, resume_step = _metrics(run_dir), max(registered_steps(run_dir))
    assert resume_step < STEPS, "the run finished before it could be killed"

    result = train(cfg)  # the same command again: resumes from the checkpoint on the server
    after = _metrics(result.run_dir)
    assert [m["step"] for m in after] == list(range(1, STEPS + 1))
    assert after[:resume_step] == before[:resume_step]
    assert after[resume_step]["step_time"] != before[resume_step]["step_time"]  # redone, not kept
    final = fetch_folder(run_dir.child("final"))
    assert_same_weights(final, uninterrupted)

    # The run's files are objects on the server: config, metrics (one segment: 8 short lines), where
    # each rank ran, checkpoints.
    prefix = run_dir.location
    objects = {path[len(prefix.path) + 1 :] for path in files_under(prefix, "")}
    assert {"config.yaml", segment_name(1), "workers.json", "final/model.safetensors"} <= objects
    assert any(o.startswith("checkpoints/step_00000008/") for o in objects)
    groups = parse_groups(run_dir.read_text("workers.json"))  # the killed start's group, then the resume's
    assert groups[0].start_step == 0 and groups[-1].start_step == resume_step
    assert [w["rank"] for w in groups[-1].workers] == [0, 1]

    # evaluate and report read the URI (the model folder is fetched into the local cache).
    metrics = evaluate(cfg, run_dir.child("final"))
    assert metrics["rows"] > 0 and all(v == v for v in metrics.values())
    report = write_report(str(run_dir), tmp_path / "report")
    summary = report.summary.read_text()
    assert "step_00000004, step_00000008" in summary and "| final/ exported | yes |" in summary
    assert "## Workers (2 ranks on 1 node)" in summary

    # Nothing of the store or the run on local disk (only the config file this test wrote).
    assert sorted(p.name for p in root.rglob("*")) == []
    assert {p.name for p in tmp_path.iterdir()} == {"cfg.yaml", "report"}
    assert not (REPO / "s3:").exists() and not Path("s3:").exists()


_CUT = (
    r"step 8: the checkpoint step_00000008 could not be written"
    r"|training stopped( \(last step seen: \d+\))?: Ray Train could not write to the run dir"
)


def test_server_cut_during_a_checkpoint_upload_fails_naming_the_step(s3, s3_cfg, uninterrupted, monkeypatch):
    cfg = _named(s3_cfg[0], "cut")
    run_dir = RunDir.of(cfg)
    # Ray Train's controller registers a reported checkpoint at its next poll of the workers, while
    # they train on: step 8's upload can start before step 4 is registered. The relay holds the step-8
    # upload (its client retries for about 11 s) until the snapshot lists step 4, then the storage
    # goes away with that upload in flight. A faster poll keeps the wait short on a loaded machine.
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    s3.relay.hold_on = b"/checkpoints/step_00000008/"
    run_over, seen = threading.Event(), {}

    def cut_once_step_4_is_registered() -> None:
        while not run_over.wait(0.1):
            with contextlib.suppress(OSError):
                if s3.relay.holding.is_set() and registered_steps(run_dir) == [4]:
                    seen["registered first"] = True
                    break
        s3.relay.cut()

    watcher = threading.Thread(target=cut_once_step_4_is_registered, daemon=True)
    watcher.start()
    try:
        with pytest.raises(StorageError, match=_CUT) as err:
            train(cfg)
    finally:
        run_over.set()
        watcher.join()
        s3.relay.hold_on = None
        s3.relay.restore()
    assert seen, "the run ended before step 4 was registered with step 8's upload held"
    message = str(err.value)
    assert "\n" not in message and RUNS in message
    if "step 8: the checkpoint" in message:
        assert "the last one written is step_00000004" in message
    assert "kto-ray-test-secret" not in message

    # The previous checkpoint is intact and registered.
    assert registered_steps(run_dir) == [4], (message, run_dir.checkpoint_names())
    before = _metrics(run_dir)
    result = train(cfg)  # storage is back: the rerun resumes from step 4
    after = _metrics(result.run_dir)
    assert [m["step"] for m in after] == list(range(1, STEPS + 1))
    assert after[:4] == before[:4]
    assert_same_weights(fetch_folder(run_dir.child("final")), uninterrupted)
