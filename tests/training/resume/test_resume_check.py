"""A rerun against its checkpoint's run state: each class of change (refused, applied and named,
unchecked) on run states built from real configs; the latest registered checkpoint's state read back."""

from __future__ import annotations

import json
import shutil

import pytest

from kto_ray.config import load_config
from kto_ray.errors import UserError
from kto_ray.integrity import write_file_list
from kto_ray.rundir import CHECKPOINTS, RunDir
from kto_ray.training.resume.resume_check import REFUSED, compare
from kto_ray.training.resume.run_state import RUN_STATE_FILE, build_run_state, saved_state

# A run state records the stage that ran (stage auto is resolved before it is built): 3 here.
ONLINE = [
    "reference.mode=online",
    "cluster.workers=2",
    "train.micro_batch_size=4",
    "train.max_steps=8",
    "deepspeed.stage=3",
]


@pytest.fixture(scope="module")
def rows():
    import pyarrow as pa

    from kto_ray.store.format import SCHEMA

    n = 40
    columns = {f.name: [] for f in SCHEMA}
    for i in range(n):
        columns["id"].append(i)
        columns["prompt_ids"].append([1, 2])
        columns["completion_ids"].append([3] * (1 + i % 5))
        columns["kl_completion_ids"].append([4])
        columns["kl_id"].append((i + 1) % n)
        columns["label"].append(i % 2 == 0)
        columns["split"].append("train")
        columns["ref_logps"].append(0.0)
        columns["ref_kl_logps"].append(0.0)
    return pa.table({f.name: pa.array(columns[f.name], f.type) for f in SCHEMA}, schema=SCHEMA)


def _state(rows, *overrides: str, global_batch: int | None = None, steps: int | None = None, lam_d=1.0):
    cfg = load_config(None, [*ONLINE, "model.path=hub/some-model", *overrides])
    batch = global_batch or cfg.first_global_batch
    return build_run_state(cfg, rows, batch, steps or cfg.train.max_steps, lam_d)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.seed=7", "train.seed is 42 there and 7 now"),
        ("train.group_by_length=false", "train.group_by_length is True there and False now"),
        ("data.max_length=1024", "data.max_length is 512 there and 1024 now"),
        ("data.seed=3", "data.seed"),
        ("train.beta=0.2", "train.beta is 0.1 there and 0.2 now"),
        ("lora.enabled=true", "lora.enabled"),
        ("lora.r=8", "lora.r"),
        ("deepspeed.stage=2", "deepspeed.stage is 3 there and 2 now"),
        ("model.path=hub/other", "model.path (its weights) is hub/some-model@main there and hub/other@main"),
        ("train.global_batch_size=16", "train.global_batch_size is 8 there and 16 now"),
        ("train.max_steps=4", "the run's length (train.max_steps) is 8 steps there and 4 steps now"),
    ],
)
def test_a_change_that_breaks_the_data_position_or_the_weights_is_refused_in_one_line(rows, override, named):
    saved = _state(rows)
    new = _state(rows, override, global_batch=saved["global_batch"])
    with pytest.raises(UserError) as err:
        compare("step_00000004", saved, new)
    line = str(err.value)
    assert len(line.splitlines()) == 1 and line.startswith("cannot resume from step_00000004: ")
    assert named in line and "new run with another run.name" in line


def test_other_rows_are_refused(rows):
    saved = _state(rows)
    with pytest.raises(UserError, match=r"the train split .* is rows:"):
        compare("step_1", saved, _state(rows.slice(0, 36), global_batch=saved["global_batch"]))


def test_a_resolved_desirable_weight_that_moved_is_refused(rows):
    with pytest.raises(UserError, match=r"train\.desirable_weight \(lambda_D, resolved\) is 1\.0 there"):
        compare("step_1", _state(rows), _state(rows, lam_d=1.25))


def test_the_table_holds_every_key_the_issue_lists():
    # Store fingerprint, model, data seed, group_by_length, max_length, LoRA, ZeRO stage (the global
    # batch and the run's length are compared on their own).
    paths = {key.path for key in REFUSED}
    issue = {"train_rows", "model", "config.data.seed", "config.train.seed", "config.train.group_by_length"}
    issue |= {"config.data.max_length", "config.lora.r", "config.lora.enabled", "config.deepspeed.stage"}
    assert issue <= paths


def test_nothing_changed_says_nothing(rows):
    assert compare("step_1", _state(rows), _state(rows)) is None


def test_safe_changes_are_applied_and_named_in_one_line(rows):
    saved = _state(rows)
    new = _state(
        rows,
        "cluster.workers=1",
        "train.max_steps=12",
        "train.log_every=5",
        "train.lr=1e-6",
        global_batch=saved["global_batch"],
    )
    line = compare("step_00000004", saved, new)
    assert len(line.splitlines()) == 1 and line.startswith("resuming from step_00000004 with changes: ")
    assert "train.max_steps: 8 -> 12 steps (learning-rate schedule recomputed for the new total)" in line
    assert "cluster.workers: 2 -> 1 (global batch 8 kept, accumulation derived per worker count)" in line
    assert "train.log_every: 1 -> 5" in line
    assert "train.lr: 5e-06 -> 1e-06 (applied to the restored optimizer)" in line


def test_a_global_batch_size_that_keeps_the_global_batch_is_safe(rows):
    saved = _state(rows)  # null: 2 workers x 4 = 8
    new = _state(rows, "cluster.workers=1", "train.global_batch_size=8", global_batch=saved["global_batch"])
    line = compare("step_1", saved, new)
    assert "train.global_batch_size: None -> 8 (global batch 8 kept, accumulation derived per" in line
    # A smaller micro-batch re-splits the same 8 rows: 2 workers x 2 x 2 micro-batches.
    new = _state(rows, "train.micro_batch_size=2", global_batch=saved["global_batch"])
    assert "train.micro_batch_size: 4 -> 2 (global batch 8 kept" in compare("step_1", saved, new)


def test_a_null_global_batch_size_keeps_the_runs_on_resume(rows):
    saved = _state(rows, "train.global_batch_size=16")  # 2 workers x 4 x 2 micro-batches
    # Null on 1 worker would fix 1 x 4 = 4 rows on a first start; on a resume it asks for nothing, and
    # the driver keeps the saved 16 (4 micro-batches of 4 on the one worker).
    new = _state(rows, "cluster.workers=1", global_batch=saved["global_batch"])
    line = compare("step_1", saved, new)
    assert "train.global_batch_size: 16 -> None (global batch 16 kept" in line
    assert "cluster.workers: 2 -> 1 (global batch 16 kept" in line


def _checkpoint(run_dir: RunDir, name: str, state: dict | None, registered: bool = True) -> None:
    folder = run_dir.local_path / CHECKPOINTS / name
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"step": int(name.split("_")[1])}))
    if state is not None:
        (folder / RUN_STATE_FILE).write_text(json.dumps(state))
    write_file_list(folder, int(name.split("_")[1]), 0, 1)  # as every rank lists its files
    if registered:  # Ray Train's record, as its checkpoint manager writes it (ray 2.60)
        result = {"checkpoint_dir_name": name, "metrics": {}}
        snapshot = {
            "checkpoint_results": [result],
            "checkpoint_report_indices": [0],
            "latest_checkpoint_result": result,
            "pending_training_results": [],
            "pending_validation_specs": [],
            "current_report_index": 1,
            "validated_checkpoint_dir_names": [],
            "timed_out_validation_checkpoint_dir_names": [],
            "failed_validation_checkpoint_dir_names": [],
        }
        (folder.parent / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))


def test_the_state_of_the_checkpoint_ray_train_resumes_is_read(tmp_path, rows):
    run_dir = RunDir(tmp_path / "run")
    assert saved_state(run_dir) is None  # a fresh run
    state = _state(rows)
    _checkpoint(run_dir, "step_00000002", state)
    _checkpoint(run_dir, "step_00000004", None, registered=False)  # a partial, unregistered upload
    saved = saved_state(run_dir)
    assert saved.name == "step_00000002" and saved.state == state


def test_the_restore_resumes_only_a_checkpoint_under_a_checked_run_state(tmp_path, rows):
    from kto_ray.errors import ResumeUnchecked
    from kto_ray.training.resume.checkpoint import _check_resumed

    checked, this_start = _state(rows), _state(rows, "train.max_steps=9")
    folder = tmp_path / "step_00000002"
    folder.mkdir()
    for written, accepted in ((checked, True), (this_start, True), (_state(rows, "train.seed=7"), False)):
        (folder / RUN_STATE_FILE).write_text(json.dumps(dict(written, world_size=3)))  # any world size
        if accepted:
            _check_resumed(folder, folder.name, ("step_00000002", checked), this_start)
        else:
            with pytest.raises(ResumeUnchecked, match="step_00000002 was written under other settings"):
                _check_resumed(folder, folder.name, ("step_00000002", checked), this_start)
    with pytest.raises(ResumeUnchecked, match="the run was checked as a fresh one"):
        _check_resumed(folder, folder.name, None, this_start)


def test_folders_ray_train_never_registered_are_a_fresh_run(tmp_path, rows):
    # No record of Ray Train's at all (it registered nothing): Ray starts the run over, and so do the
    # checks, however many step folders lie there.
    run_dir = RunDir(tmp_path / "run")
    _checkpoint(run_dir, "step_00000002", _state(rows), registered=False)
    assert saved_state(run_dir) is None


def test_a_registered_checkpoint_whose_folder_is_gone_is_one_line(tmp_path, rows):
    run_dir = RunDir(tmp_path / "run")
    _checkpoint(run_dir, "step_00000002", _state(rows))
    shutil.rmtree(run_dir.local_path / CHECKPOINTS / "step_00000002")
    with pytest.raises(
        UserError, match=r"Ray Train cannot resume .*checkpoints \(.*\); a new run.name starts over"
    ):
        saved_state(run_dir)


def test_a_checkpoint_without_a_run_state_is_refused_in_one_line(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    _checkpoint(run_dir, "step_00000002", None)
    with pytest.raises(UserError, match=f"step_00000002 has no {RUN_STATE_FILE}: not a checkpoint of this"):
        saved_state(run_dir)


def test_an_unreadable_run_state_is_one_line(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    _checkpoint(run_dir, "step_00000002", {"version": 99})
    with pytest.raises(UserError, match="is not a run state this kto-ray reads"):
        saved_state(run_dir)


def test_a_rerun_on_a_worker_count_that_cannot_split_the_kept_global_batch_is_refused(tmp_path, rows):
    from kto_ray.training.launch.driver import train

    run = ["run.name=split", f"run.dir={tmp_path}"]
    _checkpoint(RunDir(tmp_path / "split"), "step_00000002", _state(rows, *run))  # 2 x 4 x 1 = 8 rows
    cfg = load_config(None, [*ONLINE, *run, "cluster.workers=3"])
    with pytest.raises(UserError) as err:
        train(cfg)  # refused before the data is read or anything launched
    assert str(err.value).startswith("a global batch of 8 rows cannot be split over 3 workers")
    assert str(err.value).endswith("(the run's global batch, kept from step_00000002)")
