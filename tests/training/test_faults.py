"""Faults a long run must survive: a SIGKILLed worker, a non-finite loss, a failed checkpoint write (a
killed driver: test_run_s3.py; killed precomputes and appends: tests/reference)."""

from __future__ import annotations

import os
import shutil
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from kto_ray.errors import TrainingStopped
from kto_ray.rundir import RunDir
from kto_ray.storage import resolve
from kto_ray.store.format import MANIFEST, WRITE_OPTIONS, list_files
from kto_ray.training.launch.driver import train
from kto_ray.training.schedule.batching import Schedule
from tests.conftest import assert_same_weights, read_metrics, registered_steps, wait_for
from tests.training.launch.test_tracking import mlflow_history, mlflow_status, wandb_exit_code

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_local")]

STEPS = 12
# Steps grouped by length: resuming must be exact with the grouped schedule too (the default
# shuffled one is what tests/training/test_train.py runs).
GROUPED = True


def _config(built_store, root: Path, name: str, **sections):
    cfg, _store = built_store
    tree = cfg.model_dump(mode="json")
    tree["train"] |= {"max_steps": STEPS, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0}
    tree["train"]["group_by_length"] = GROUPED
    tree["run"] |= {"name": name, "dir": str(root), "checkpoint_every": 4, "max_failures": 1}
    for section, values in sections.items():
        tree[section] |= values
    return cfg.model_validate(tree)


def _steps_logged(run_dir: Path) -> int:
    return len(read_metrics(run_dir))


def _descendants_named(name: str) -> list[int]:
    """Pids of this process's descendants (our own Ray only) whose process title contains `name`."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            parents[int(entry.name)] = (int(stat.rsplit(")", 1)[1].split()[1]), cmdline)
    me, found = os.getpid(), []
    for pid, (_ppid, cmdline) in parents.items():
        ancestor = pid
        while ancestor in parents and ancestor not in (me, 1):
            ancestor = parents[ancestor][0]
        if ancestor == me and name in cmdline:
            found.append(pid)
    return found


@pytest.fixture(scope="module")
def uninterrupted(built_store, tmp_path_factory):
    return train(_config(built_store, tmp_path_factory.mktemp("steady"), "steady")).run_dir.local_path


def test_sigkilled_worker_restarts_from_the_checkpoint_and_matches(built_store, uninterrupted, tmp_path):
    cfg = _config(built_store, tmp_path, "killed")
    outcome: dict = {}
    driver = threading.Thread(target=lambda: outcome.update(result=train(cfg)), daemon=True)
    driver.start()
    wait_for(
        lambda: _steps_logged(RunDir.of(cfg).local_path) >= 5, driver.is_alive
    )  # past the step-4 checkpoint
    workers = _descendants_named("RayTrainWorker")
    assert len(workers) == 2, workers
    os.kill(max(workers), signal.SIGKILL)
    driver.join(timeout=600)
    assert outcome["result"].steps == STEPS

    steps = [m["step"] for m in read_metrics(RunDir.of(cfg).local_path)]
    assert steps == list(range(1, STEPS + 1))  # nothing repeated, nothing missing
    assert_same_weights(RunDir.of(cfg).local_path / "final", uninterrupted / "final")


def _poisoned_store(built_store, root: Path, step: int, rank: int, workers: int) -> Path:
    """A copy of the store whose reference log-probs are NaN for exactly `rank`'s rows of `step`."""
    cfg, store = built_store
    copy = root / "poisoned"
    (copy / store.manifest.data_dir).mkdir(parents=True)
    shutil.copy(Path(store.path) / MANIFEST, copy / MANIFEST)
    train_rows = store.read_split("train")
    schedule = Schedule.for_table(train_rows, workers, 4, 1, cfg.train.seed, GROUPED)
    poisoned_ids = pa.array(train_rows["id"].take(schedule.rows_for(step - 1, rank)[0]))
    table = pa.concat_tables([store.read_split("train"), store.read_split("eval")])
    hit = pc.is_in(table["id"], poisoned_ids)
    nan = pa.array([float("nan")] * len(table), pa.float32())
    table = table.set_column(
        table.schema.get_field_index("ref_logps"), "ref_logps", pc.if_else(hit, nan, table["ref_logps"])
    )
    pq.write_table(table, copy / store.manifest.data_dir / "part-0.parquet", **WRITE_OPTIONS)
    files = list_files(resolve(str(copy)), store.manifest.data_dir)  # the copy's own files, listed
    (copy / MANIFEST).write_text(store.manifest.model_copy(update={"files": files}).model_dump_json())
    return copy


def test_non_finite_loss_stops_naming_the_step_keeps_the_good_checkpoint_and_fails_the_trackers(
    built_store, tmp_path, monkeypatch
):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # after Ray started: the loop config carries it
    monkeypatch.setenv("WANDB_MODE", "offline")
    store = _poisoned_store(built_store, tmp_path, step=3, rank=1, workers=2)
    run = {"checkpoint_every": 1, "max_failures": 0, "report_to": ["mlflow", "wandb"]}
    cfg = _config(built_store, tmp_path, "nan", store={"path": str(store)}, run=run)
    with pytest.raises(TrainingStopped, match=r"step 3: non-finite loss.*step_00000002") as stopped:
        train(cfg)  # only rank 1 sees the NaN: both ranks must stop, neither may hang
    assert "\n" not in str(stopped.value)
    assert [m["step"] for m in read_metrics(RunDir.of(cfg).local_path)] == [1, 2]
    assert sorted(p.name for p in (RunDir.of(cfg).local_path / "checkpoints").glob("step_*")) == [
        "step_00000001",
        "step_00000002",
    ]
    assert not (RunDir.of(cfg).local_path / "final").exists()
    # Rank 0, which holds the trackers, stopped on the all-reduced loss and closed them as failed.
    assert mlflow_status(uri, "nan") == "FAILED"
    assert mlflow_history(uri, "nan", "loss")[0].keys() == {1, 2}
    assert wandb_exit_code(RunDir.of(cfg).local_path) == 1
    resumed = cfg.model_copy(deep=True)
    resumed.store.path = built_store[0].store.path  # the clean store: the rerun resumes from step 2
    resumed.run.report_to = []
    # The run's length stays (a resume may not shorten it: README, "A resume checks what changed").
    assert [m["step"] for m in read_metrics(train(resumed).run_dir.local_path)] == list(range(1, STEPS + 1))


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(built_store, tmp_path):
    cfg = _config(built_store, tmp_path, "disk", train={"max_steps": 8}, run={"max_failures": 0})
    checkpoints = RunDir.of(cfg).local_path / "checkpoints"
    checkpoints.mkdir(parents=True)
    blocker = checkpoints / "step_00000008"
    blocker.write_text("a file where the step-8 checkpoint folder must go: writing it fails part-way")

    with pytest.raises(Exception, match="step_00000008"):
        train(cfg)
    before = read_metrics(RunDir.of(cfg).local_path)
    assert registered_steps(RunDir.of(cfg).local_path) == [4]
    assert {p.name for p in (checkpoints / "step_00000004").iterdir()} >= {"zero", "trainer_state.json"}

    blocker.unlink()  # the disk is writable again: the rerun resumes from the intact step-4 checkpoint
    after = read_metrics(train(cfg).run_dir.local_path)
    assert [m["step"] for m in after] == list(range(1, 9))
    assert after[:4] == before[:4]
    assert (RunDir.of(cfg).local_path / "final" / "model.safetensors").is_file()
