"""`kto-ray verify` on run dirs and sweep folders built here (no Ray, no training), and the driver's
choice of the checkpoint a rerun resumes: the newest whole one, said in one line; none whole, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kto_ray.cli import main
from kto_ray.errors import CheckpointsDamaged
from kto_ray.integrity import write_file_list
from kto_ray.rundir import RunDir
from kto_ray.tools.verify import VerifyFailed, verify
from kto_ray.training.resume.checkpoint import checkpoint_name
from kto_ray.training.resume.checkpoint_files import older_than
from kto_ray.training.resume.run_state import whole_checkpoint
from tests.helpers import write_store


def _checkpoint(run: Path, step: int, world: int = 2) -> Path:
    """A checkpoint folder as `world` ranks write one: each rank's files, then its list."""
    folder = run / "checkpoints" / f"step_{step:08d}"
    for rank in range(world):
        mine = folder / f"rank{rank}"
        (mine / "zero").mkdir(parents=True)
        (mine / "zero" / f"shard_{rank}.pt").write_bytes(bytes(range(256)) * (rank + 1))
        (mine / f"rng_rank{rank}.pt").write_bytes(b"rng")
        write_file_list(mine, step, rank, world)
        for path in mine.rglob("*"):  # what Ray Train's upload does: every rank's files into one folder
            if path.is_file():
                target = folder / path.relative_to(mine)
                target.parent.mkdir(parents=True, exist_ok=True)
                path.rename(target)
    for rank in range(world):
        for sub in sorted((folder / f"rank{rank}").rglob("*"), reverse=True):
            sub.rmdir()
        (folder / f"rank{rank}").rmdir()
    return folder


def _run(root: Path, name: str = "run") -> Path:
    run = root / name
    for step in (2, 4):
        _checkpoint(run, step)
    with RunDir(str(run)).staging("final") as staged:
        (staged / "config.json").write_text("{}")
        (staged / "model.safetensors").write_bytes(b"weights" * 100)
    return run


def test_verify_a_good_run_dir_then_each_damage_is_one_line(tmp_path, capsys):
    run = _run(tmp_path)
    assert (run / "final" / "files_rank0.json").is_file()
    assert main(["verify", str(run)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith(f"verified run dir {run}: ") and out[0].endswith("no problems")

    shard = run / "checkpoints" / "step_00000004" / "zero" / "shard_1.pt"
    shard.write_bytes(shard.read_bytes()[:100])
    (run / "checkpoints" / "step_00000002" / "files_rank1.json").unlink()
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes().replace(b"w", b"W", 1))
    assert main(["verify", str(run)]) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [
        f"{run}/checkpoints/step_00000002: files_rank1.json: missing: the checkpoint is incomplete",
        f"{run}/checkpoints/step_00000004: zero/shard_1.pt: size 100, expected 512",
        f"{run}/final: model.safetensors: checksum " + captured.out.split("checksum ")[1].split("\n")[0],
    ]
    assert captured.out.splitlines()[2].endswith("(same size)")
    assert (
        captured.err.strip()
        == f"kto-ray: error: verify {run}: 3 problems in " + captured.err.split("problems in ")[1].strip()
    )


def test_verify_a_sweep_folder_checks_every_run_and_store_in_it(tmp_path):
    sweep = tmp_path / "sweep"
    _run(sweep, "trial-0")
    _run(sweep, "trial-1")
    write_store(str(sweep / "store"), [64], 100)
    report = verify(str(sweep), lambda line: None)
    assert len(report.checked) == 3 and not report.problems
    shard = sweep / "trial-1" / "checkpoints" / "step_00000002" / "zero" / "shard_0.pt"
    shard.write_bytes(b"")
    lines: list[str] = []
    with pytest.raises(VerifyFailed, match="1 problem in"):
        verify(str(sweep), lines.append)
    assert lines == [f"{sweep}/trial-1/checkpoints/step_00000002: zero/shard_0.pt: size 0, expected 256"]
    with pytest.raises(VerifyFailed.__mro__[1], match="nothing to verify at"):
        verify(str(tmp_path / "empty-does-not-exist"))


def test_the_driver_resumes_from_the_newest_whole_checkpoint_in_one_line(tmp_path):
    run = _run(tmp_path)
    said: list[str] = []
    assert whole_checkpoint(RunDir(str(run)), "step_00000004", lambda line, **_: said.append(line)) == (
        "step_00000004"
    )
    assert said == []
    shard = run / "checkpoints" / "step_00000004" / "zero" / "shard_0.pt"
    shard.write_bytes(shard.read_bytes()[:10])
    name = whole_checkpoint(RunDir(str(run)), "step_00000004", lambda line, **_: said.append(line))
    assert name == "step_00000002"
    assert said == [
        "checkpoint step 4 is damaged (file zero/shard_0.pt, size 10, expected 256), resuming from step 2"
    ]
    (run / "checkpoints" / "step_00000002" / "files_rank0.json").write_text("{not json")
    with pytest.raises(CheckpointsDamaged) as none:
        whole_checkpoint(RunDir(str(run)), "step_00000004")
    assert none.value.exit_code == 2 and "\n" not in str(none.value)
    assert str(none.value).startswith(
        "checkpoint step 4 is damaged (file zero/shard_0.pt, size 10, expected 256) and no older checkpoint "
        f"of {run} is whole (2 checked)"
    )


def test_a_redone_step_never_writes_into_a_damaged_folder():
    assert checkpoint_name(4) == "step_00000004"
    assert checkpoint_name(4, ("step_00000004",)) == "step_00000004-1"
    assert checkpoint_name(4, ("step_00000004-1", "step_00000004")) == "step_00000004-2"
    names = ["step_00000002", "step_00000004", "step_00000004-1", "step_00000006", "other"]
    assert older_than("step_00000004-1", names) == ["step_00000004", "step_00000002"]
    assert older_than("step_00000006", names) == ["step_00000004-1", "step_00000004", "step_00000002"]


def test_file_lists_are_json_with_sizes_and_crc32(tmp_path):
    folder = _checkpoint(tmp_path / "run", 2, world=1)
    listed = json.loads((folder / "files_rank0.json").read_text())
    assert listed["world_size"] == 1 and listed["step"] == 2
    assert [(f["path"], f["size"], len(f["crc32"])) for f in listed["files"]] == [
        ("rng_rank0.pt", 3, 8),
        ("zero/shard_0.pt", 256, 8),
    ]


def test_a_workers_damage_reaches_the_driver_as_one_line_exit_2(tmp_path):
    """A worker's StoreDamaged or CheckpointsLost, through pickle as fit() raises it, becomes the
    driver's one line (exit 2)."""
    import pickle

    import ray.train

    from kto_ray.errors import CheckpointsLost, StoreDamaged
    from kto_ray.training.launch.failures import _damaged

    def from_workers(failure: Exception):
        return pickle.loads(pickle.dumps(ray.train.WorkerGroupError("rank errors", {1: failure})))

    damaged = StoreDamaged("s3://kto/store", "data-x/part-1.parquet", "CRC checksum verification failed")
    line = _damaged(from_workers(damaged), RunDir(str(tmp_path)))
    assert str(line) == str(damaged) and line.exit_code == 2 and "\n" not in str(line)
    lost = CheckpointsLost("checkpoint step 4 is damaged (file zero/a.pt, size 1, expected 2)", 2)
    line = _damaged(from_workers(lost), RunDir(str(tmp_path)))
    assert isinstance(line, CheckpointsDamaged) and line.exit_code == 2
    assert str(line).startswith(
        "checkpoint step 4 is damaged (file zero/a.pt, size 1, expected 2), and no older"
    )


def test_evaluate_and_report_check_a_runs_final_folder(tmp_path):
    from kto_ray.errors import UserError
    from kto_ray.integrity import check_model_folder, model_folder_problems

    run = _run(tmp_path)
    check_model_folder(str(run / "final"))  # whole: nothing said
    check_model_folder("some-org/some-model")  # a hub id has no list
    weights = run / "final" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    with pytest.raises(
        UserError, match=r"final: file model.safetensors is damaged \(size 699, expected 700\)"
    ):
        check_model_folder(str(run / "final"))
    (problem,) = model_folder_problems(RunDir(str(run)).join("final"))
    assert problem.path == "model.safetensors"
    lines: list[str] = []  # the command the message points to, on the folder itself
    with pytest.raises(UserError, match="1 problem in"):
        verify(str(run / "final"), lines.append)
    assert lines == [f"{run / 'final'}: model.safetensors: size 699, expected 700"]
