"""Checkpoints carry their file lists, and a resume checks them: a truncated optimizer shard in the
newest checkpoint (step 4 of checkpoints 2 and 4) makes the rerun say one line and resume from step 2,
leaving the damaged folder as it was, with final weights equal to the uninterrupted run's (1e-5); a
byte flipped at the same size is found by the workers' checksums, with the same fallback; none whole
is one line, exit 2; `kto-ray verify` on the good and the damaged run dir; Ctrl-C is one line, exit 130.
One training run (plus its reruns) shared by the module."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kto_ray.integrity import LIST_PREFIX, lists_at, size_problem
from kto_ray.rundir import RunDir
from kto_ray.tools.verify import VerifyFailed, verify
from kto_ray.training.launch.driver import train
from tests.conftest import REPO, assert_same_weights, own_lines, read_metrics, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.extended, pytest.mark.usefixtures("ray_local")]

STEPS = 4


def _config(built_store, root: Path, name: str, steps: int = STEPS):
    cfg, _store = built_store
    tree = cfg.model_dump(mode="json")
    tree["train"] |= {"max_steps": steps, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0}
    tree["run"] |= {"name": name, "dir": str(root), "checkpoint_every": 2, "max_failures": 0}
    tree["run"]["keep_checkpoints"] = 10  # every checkpoint stays: the fallbacks below walk back to step 2
    tree["cluster"] |= {"workers": 2}
    return cfg.model_validate(tree)


def _cli(cfg, *args: str, **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    config = Path(cfg.run.dir) / f"{cfg.run.name}.yaml"
    config.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    command = [sys.executable, "-m", "kto_ray", *args, "--config", str(config)]
    env = dict(os.environ, RAY_ADDRESS="local")  # its own Ray
    if popen:
        return subprocess.Popen(command, cwd=REPO, env=env, text=True, **popen)
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _shard(checkpoint: Path) -> Path:
    return sorted((checkpoint / "zero").glob("*optim_states.pt"))[-1]


@pytest.fixture(scope="module")
def fallback(built_store, tmp_path_factory):
    """The run, its final weights kept aside, verify of the good run dir, then step 4's last optimizer
    shard truncated to half and the same command rerun."""
    root = tmp_path_factory.mktemp("integrity")
    cfg = _config(built_store, root, "run")
    run_dir = train(cfg).run_dir.local_path
    uninterrupted = root / "uninterrupted-final"
    shutil.copytree(run_dir / "final", uninterrupted)
    good = verify(str(run_dir), lambda line: None)
    before = read_metrics(run_dir)
    shard = _shard(run_dir / "checkpoints" / "step_00000004")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size // 2])
    rerun = _cli(cfg, "train")
    return cfg, run_dir, uninterrupted, good, before, shard, size, rerun


def test_every_rank_lists_its_files_before_the_checkpoint_is_registered(fallback):
    _cfg, run_dir, _uninterrupted, good, *_ = fallback
    step_2 = RunDir(str(run_dir)).join("checkpoints", "step_00000002")
    lists = lists_at(step_2)
    assert lists.problem is None and lists.world_size == 2 and sorted(lists.lists) == [0, 1]
    names = [e.path for e in lists.entries()]
    assert len(names) == len(set(names))  # no file listed by two ranks
    on_disk = {
        p.relative_to(run_dir / "checkpoints" / "step_00000002").as_posix()
        for p in (run_dir / "checkpoints" / "step_00000002").rglob("*")
        if p.is_file()
    }
    assert on_disk == set(names) | {f"{LIST_PREFIX}0.json", f"{LIST_PREFIX}1.json"}
    assert not good.problems and good.checked == [f"run dir {run_dir}"]


def test_a_truncated_shard_falls_back_to_the_last_good_checkpoint_in_one_line(fallback):
    _cfg, run_dir, uninterrupted, _good, before, shard, size, rerun = fallback
    assert rerun.returncode == 0, rerun.stderr
    relative = shard.relative_to(shard.parents[1]).as_posix()
    said = [line for line in own_lines(rerun.stdout) if "damaged" in line]
    assert said == [
        f"checkpoint step 4 is damaged (file {relative}, size {size // 2}, expected {size}), "
        "resuming from step 2"
    ]
    after = read_metrics(run_dir)
    assert [m["step"] for m in after] == list(range(1, STEPS + 1))  # steps 3 and 4 redone, once each
    assert after[:2] == before[:2] and after[2]["step_time"] != before[2]["step_time"]
    assert_same_weights(run_dir / "final", uninterrupted)
    # The damaged folder is left as it was; the redone step 4 is saved beside it, whole.
    assert shard.stat().st_size == size // 2
    assert size_problem(RunDir(str(run_dir)).join("checkpoints", "step_00000004-1")) is None


def test_verify_names_the_damaged_shard_and_final_is_listed(fallback):
    _cfg, run_dir, _uninterrupted, _good, _before, shard, size, _rerun = fallback
    lines: list[str] = []
    with pytest.raises(VerifyFailed, match=r"1 problem in \d+ files"):
        verify(str(run_dir), lines.append)
    relative = shard.relative_to(shard.parents[1]).as_posix()
    assert lines == [f"{run_dir}/checkpoints/step_00000004: {relative}: size {size // 2}, expected {size}"]
    assert lists_at(RunDir(str(run_dir)).join("final")).problem is None


def test_a_flipped_byte_is_found_by_the_workers_and_none_whole_is_exit_2(fallback, capsys):
    """Same size, another byte: the driver's listing cannot see it, the workers' checksums do and fall
    back past both damaged step-4 folders to step 2. Then with step 2 damaged too: exit 2, one line."""
    cfg, run_dir, uninterrupted, *_ = fallback
    redo = _shard(run_dir / "checkpoints" / "step_00000004-1")
    data = bytearray(redo.read_bytes())
    data[len(data) // 2] ^= 0xFF
    redo.write_bytes(bytes(data))
    capsys.readouterr()
    result = train(cfg)  # the fallback is the workers': the driver says it once the run is done
    assert result.steps == STEPS
    assert [line for line in own_lines(capsys.readouterr().out) if "damaged" in line] == [
        f"checkpoint step 4 was damaged (its checksums differ: `kto-ray verify {run_dir}` names the file); "
        "the workers resumed from step 2"
    ]
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, STEPS + 1))
    assert_same_weights(run_dir / "final", uninterrupted)
    assert (run_dir / "checkpoints" / "step_00000004-2").is_dir() and redo.read_bytes() == bytes(data)

    for name in ("step_00000002", "step_00000004-1", "step_00000004-2"):
        shard = _shard(run_dir / "checkpoints" / name)
        shard.write_bytes(shard.read_bytes()[:100])
    refused = _cli(cfg, "train")  # the driver's listing finds none whole: before Ray starts
    assert refused.returncode == 2
    (line,) = own_lines(refused.stderr)
    assert line.startswith("kto-ray: error: checkpoint step 4 is damaged (file zero/")
    assert line.endswith(
        f"no older checkpoint of {run_dir} is whole (4 checked): `kto-ray verify` lists "
        "what is wrong; a new run.name starts over"
    )


def test_ctrl_c_names_the_step_and_the_checkpoint_a_rerun_resumes_from(built_store, tmp_path):
    cfg = _config(built_store, tmp_path, "interrupted", steps=40)
    run_dir = tmp_path / "interrupted"
    driver = _cli(cfg, "train", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    snapshot = run_dir / "checkpoints" / "checkpoint_manager_snapshot.json"

    def registered() -> int:
        try:
            return len(json.loads(snapshot.read_text())["checkpoint_results"])
        except (OSError, ValueError, KeyError):
            return 0

    wait_for(lambda: registered() and len(read_metrics(run_dir)) >= 3, lambda: driver.poll() is None)
    driver.send_signal(signal.SIGINT)
    _out, err = driver.communicate(timeout=120)
    assert driver.returncode == 130, err
    last = own_lines(err)[-1]
    assert last.startswith("kto-ray: error: interrupted at step "), err
    assert "; a rerun resumes from checkpoint step " in last and "(step_0000" in last
