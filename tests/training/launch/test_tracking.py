"""Live tracking (`run.report_to`), read back with each tracker's own reader; no network.

TensorBoard: its EventAccumulator. MLflow: a sqlite store in tmp_path, MlflowClient. W&B: offline mode;
wandb has no Python reader of its .wandb file any more (wandb-core writes it), so `wandb_records`
reads the format (W&B's LevelDB-style log of `wandb_internal_pb2.Record` protos) with wandb's protos.
Every test checks that every step's loss arrived, equal to metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest

from kto_ray.errors import UserError
from kto_ray.rundir import RunDir
from kto_ray.rundir.metrics import MetricsLog
from kto_ray.training.launch import tracking
from kto_ray.training.launch.tracking import (
    MlflowTracker,
    TensorBoardTracker,
    WandbTracker,
    prepare_tracking,
    started_trackers,
)
from tests.conftest import own_lines, read_metrics

STEPS = 6
CONFIG = {"model": {"path": "artifacts/tiny-llama"}, "train": {"beta": 0.1, "eval_every": 3}, "run": {}}


def _record(step: int) -> dict:
    """A worker's metrics record (as train_step + the loop build it), with eval/ keys every 3 steps."""
    record = {
        "loss": 0.5 - 0.01 * step,
        "kl": 0.02 * step,
        "rewards/chosen": 0.01 * step,
        "rewards/rejected": -0.02 * step,
        "rewards/margins": 0.03 * step,
        "logps/chosen": -12.0,
        "logps/rejected": -14.0,
        "count/chosen": 5,
        "count/rejected": 3,
        "grad_norm": math.nan if step == 2 else 0.3,  # an engine without a norm logs NaN
        "tokens": 900,
        "rows": 8,
        "step": step,
        "epoch": 0,
        "learning_rate": 1e-3,
        "step_time": 0.25,
        "samples/s": 32.0,
        "tokens/s": 3600.0,
    }
    if step % 3 == 0:
        record |= {"eval/loss": 0.6 - 0.01 * step, "eval/kl": 0.01, "eval/reward_accuracy": 0.5}
    return record


@pytest.fixture
def logged(tmp_path: Path) -> list[dict]:
    """The records as metrics.jsonl holds them: what each tracker must have received."""
    log = MetricsLog(RunDir(tmp_path), 0)
    for step in range(1, STEPS + 1):
        log.write(_record(step))
    return read_metrics(tmp_path)


def _drive(tracker, records: list[dict]) -> None:
    tracker.start(CONFIG)
    for record in records:
        tracker.log(record["step"], record)
    tracker.finish()


def _losses(records: list[dict], key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records if key in r}


# --- readers -------------------------------------------------------------------------------------


def tensorboard_scalars(log_dir: Path, key: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {e.step: e.value for e in events.Scalars(key)}


def _mlflow_run(uri: str, run_name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(tracking.DEFAULT_PROJECT)
    (run,) = client.search_runs([experiment.experiment_id], f"attributes.run_name = '{run_name}'")
    return client, run


def mlflow_history(uri: str, run_name: str, key: str) -> tuple[dict[int, float], dict[str, str]]:
    client, run = _mlflow_run(uri, run_name)
    history = client.get_metric_history(run.info.run_id, key)
    return {m.step: m.value for m in history}, run.data.params


def mlflow_status(uri: str, run_name: str) -> str:
    """The run's status: RUNNING until it is terminated, then FINISHED or FAILED."""
    return _mlflow_run(uri, run_name)[1].info.status


def wandb_exit_code(directory: Path) -> int | None:
    """The exit code the run's finish() recorded in its .wandb file; None when it was never finished."""
    (path,) = (directory / "wandb").glob("offline-run-*/run-*.wandb")
    exits = [r.exit.exit_code for r in wandb_records(path) if r.WhichOneof("record_type") == "exit"]
    return exits[-1] if exits else None


def wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: 7-byte file header, then 32 KiB blocks of chunks, each
    with a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, block, pos = path.read_bytes(), 32768, 7
    assert data[:4] == b":W&B"
    records, parts = [], []
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block trailer padding
            pos += left
            continue
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def wandb_history(directory: Path, key: str) -> tuple[dict[int, float], dict[str, object]]:
    (path,) = (directory / "wandb").glob("offline-run-*/run-*.wandb")
    history, config = {}, {}
    for record in wandb_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if key in items:
                history[int(items["_step"])] = items[key]
        elif kind == "run":
            config |= {i.key: json.loads(i.value_json) for i in record.run.config.update}
    return history, config


# --- unit: each tracker driven with the records --------------------------------------------------


def test_tensorboard_has_every_step(tmp_path, logged):
    _drive(TensorBoardTracker(tmp_path / "tb"), logged)
    assert tensorboard_scalars(tmp_path / "tb", "loss") == pytest.approx(_losses(logged))
    assert tensorboard_scalars(tmp_path / "tb", "eval/loss") == pytest.approx(_losses(logged, "eval/loss"))
    assert sorted(tensorboard_scalars(tmp_path / "tb", "rewards/margins")) == list(range(1, STEPS + 1))


def test_mlflow_has_every_step_and_the_config(tmp_path, logged):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _drive(MlflowTracker(uri, "unit-run", experiment=tracking.DEFAULT_PROJECT), logged)
    history, params = mlflow_history(uri, "unit-run", "loss")
    assert history == pytest.approx(_losses(logged))
    assert mlflow_history(uri, "unit-run", "eval/loss")[0] == pytest.approx(_losses(logged, "eval/loss"))
    assert params["train.beta"] == "0.1" and params["model.path"] == "artifacts/tiny-llama"


def test_wandb_offline_has_every_step_and_the_config(tmp_path, logged, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _drive(WandbTracker("unit-run", tmp_path, project=tracking.DEFAULT_PROJECT), logged)
    history, config = wandb_history(tmp_path, "loss")
    assert history == pytest.approx(_losses(logged))
    assert wandb_history(tmp_path, "eval/loss")[0] == pytest.approx(_losses(logged, "eval/loss"))
    assert config["train"]["beta"] == 0.1


def test_tensorboard_resume_hides_the_steps_a_failed_attempt_logged_past_the_checkpoint(tmp_path, logged):
    first = TensorBoardTracker(tmp_path / "tb")
    first.start(CONFIG)
    for record in logged:
        first.log(record["step"], {**record, "loss": 9.0})  # an attempt that died after step 6
    first.finish()
    resumed = TensorBoardTracker(tmp_path / "tb", resume_step=3)  # its checkpoint was step 3
    resumed.start(CONFIG)
    for record in logged[3:]:
        resumed.log(record["step"], record)
    resumed.finish()
    scalars = tensorboard_scalars(tmp_path / "tb", "loss")
    assert scalars == pytest.approx({1: 9.0, 2: 9.0, 3: 9.0} | {s: _losses(logged)[s] for s in (4, 5, 6)})


def test_started_trackers_finish_as_failed_when_the_block_raises(tmp_path, monkeypatch, logged):
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    env = {"MLFLOW_TRACKING_URI": uri, "WANDB_DIR": str(tmp_path)}
    for key, value in env.items():  # started_trackers sets them in this process: restored after the test
        monkeypatch.setenv(key, value)
    config = CONFIG | {"run": {"name": "raised"}}
    names = ["tensorboard", "mlflow", "wandb"]
    with (
        pytest.raises(RuntimeError, match="a step failed"),
        started_trackers(names, config, tmp_path, 0, env) as trackers,
    ):
        for tracker in trackers:
            tracker.log(1, logged[0])
        raise RuntimeError("a step failed")
    assert mlflow_status(uri, "raised") == "FAILED"
    assert wandb_exit_code(tmp_path) == 1
    assert tensorboard_scalars(tmp_path / "tensorboard", "loss") == pytest.approx({1: logged[0]["loss"]})


def test_wandb_finished_run_records_exit_code_0(tmp_path, monkeypatch, logged):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _drive(WandbTracker("unit-run", tmp_path, project=tracking.DEFAULT_PROJECT), logged)
    assert wandb_exit_code(tmp_path) == 0


# --- the driver's checks and the environment it hands to rank 0 --------------------------------


def test_prepare_resolves_paths_for_the_workers(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "WANDB_DIR", "WANDB_SILENT", "KTO_RAY_VERBOSE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run_dir = tmp_path / "runs" / "r1"
    env = prepare_tracking(["mlflow", "wandb"], run_dir)
    assert env["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    assert env["WANDB_DIR"] == str(run_dir) and env["WANDB_MODE"] == "offline"
    assert env["WANDB_SILENT"] == "true"  # -v-less console: no W&B banners
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///rel/m.db")
    (tmp_path / "rel").mkdir()
    assert prepare_tracking(["mlflow"], run_dir)["MLFLOW_TRACKING_URI"] == f"sqlite:///{tmp_path}/rel/m.db"
    monkeypatch.setenv("WANDB_SERVICE", "3-1-unix-/tmp/wandb-1/socket")  # the driver's own W&B service
    env = prepare_tracking(["tensorboard"], run_dir)
    assert "WANDB_SERVICE" not in env and "WANDB_DIR" not in env and env["WANDB_MODE"] == "offline"


def test_start_trackers_uses_the_resolved_environment(tmp_path, monkeypatch, logged):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = f"sqlite:///{tmp_path / 'm.db'}"
    config = CONFIG | {"run": {"name": "from-env"}}
    with started_trackers(["mlflow"], config, tmp_path, 0, {"MLFLOW_TRACKING_URI": uri}) as (tracker,):
        tracker.log(1, logged[0])
    assert mlflow_history(uri, "from-env", "loss")[0] == pytest.approx({1: logged[0]["loss"]})
    assert mlflow_status(uri, "from-env") == "FINISHED"


def test_unreachable_mlflow_fails_on_the_driver_in_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # discard port: refused at once
    with pytest.raises(
        UserError, match=r"^run\.report_to: mlflow cannot use MLFLOW_TRACKING_URI=http"
    ) as err:
        prepare_tracking(["mlflow"], tmp_path)
    assert "\n" not in str(err.value) and err.value.exit_code == 2


def test_a_tracker_that_is_not_installed_is_named(tmp_path, monkeypatch):
    monkeypatch.setitem(tracking.PACKAGES, "wandb", "kto_ray_no_such_package")
    with pytest.raises(UserError, match=r"run\.report_to: wandb is not installed .*kto-ray\[wandb\]"):
        prepare_tracking(["tensorboard", "wandb"], tmp_path)


def test_bad_wandb_mode_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offlne")
    with pytest.raises(UserError, match="WANDB_MODE='offlne'"):
        prepare_tracking(["wandb"], tmp_path)


def test_cli_train_with_an_unreachable_tracker_exits_2_before_training(
    tiny_model, small_data, tmp_path, monkeypatch, capsys
):
    from kto_ray.cli import main
    from kto_ray.config import dump_config
    from tests.helpers import make_config

    # Online reference: the driver only tokenizes (no store, no Ray) before it checks the trackers.
    cfg = make_config(tiny_model, small_data, tmp_path, reference={"mode": "online"})
    (tmp_path / "config.yaml").write_text(dump_config(cfg))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    code = main(
        ["train", "--config", str(tmp_path / "config.yaml"), "--set", "run.report_to=[tensorboard, mlflow]"]
    )
    err = own_lines(capsys.readouterr().err)
    assert code == 2
    assert len(err) == 1 and err[0].startswith("kto-ray: error: run.report_to: mlflow cannot use"), err
    assert not (tmp_path / "runs").exists()  # nothing written, nothing launched


# The real run (2 Ray Train workers, ZeRO-3, all three trackers, every step's loss and eval loss read back
# with these readers) is in tests/training/test_eval_step.py
# (test_ray_train_eval_equals_kto_ray_evaluate_of_the_export), which shares its run with the eval test's.
