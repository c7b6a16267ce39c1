"""store.json: a run with checkpoints does not resume on a store whose fingerprint changed (an append)."""

from __future__ import annotations

import json

import pytest

from kto_ray.errors import UserError
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.store.format import MANIFEST
from kto_ray.training.resume.store_pin import STORE_PIN, pin_store
from tests.helpers import make_config, write_store


def test_a_resume_on_a_changed_store_refuses_and_a_new_run_pins_the_new_one(tmp_path):
    cfg = make_config(tmp_path / "model", tmp_path / "data.jsonl", tmp_path)
    write_store(cfg.store.path, [64], 100)
    run_dir = RunDir.of(cfg)
    pin_store(cfg, run_dir)
    pinned = json.loads(run_dir.read_text(STORE_PIN))
    assert pinned["train_rows"] > 0 and pinned["fingerprint"]["data"]
    (run_dir.local_path / CHECKPOINTS / "step_00000001").mkdir(parents=True)
    pin_store(cfg, run_dir)  # the same store: the resume goes on

    manifest_file = tmp_path / "store" / MANIFEST
    manifest = json.loads(manifest_file.read_text())
    manifest["fingerprint"]["data"] = "grown"
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"started on reference store .*\(its data changed.*new run\.name"):
        pin_store(cfg, run_dir)
    assert json.loads(run_dir.read_text(STORE_PIN)) == pinned  # the refused resume changed nothing

    fresh = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": "fresh"})})
    pin_store(fresh, RunDir.of(fresh))  # no checkpoint: a new run pins the store as it is now
    assert json.loads(RunDir.of(fresh).read_text(STORE_PIN))["fingerprint"]["data"] == "grown"


def test_an_online_run_pins_nothing(tmp_path):
    cfg = make_config(tmp_path / "model", tmp_path / "data.jsonl", tmp_path, reference={"mode": "online"})
    write_store(cfg.store.path, [64], 100)
    pin_store(cfg, RunDir.of(cfg))
    assert RunDir.of(cfg).read_text(STORE_PIN) is None
