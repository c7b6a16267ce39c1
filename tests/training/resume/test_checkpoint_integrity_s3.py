"""The checkpoint fallback with the run dir on the S3 test server (moto): a truncated optimizer shard in
the newest checkpoint (step 4 of 2 and 4) is said in one line and the rerun resumes from step 2, with
final weights equal to the run's own before the damage (1e-5); `kto-ray verify s3://...` names the
shard. One store and one run on the server, shared by the module."""

from __future__ import annotations

import io
import os
import shutil
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from kto_ray.cli import main
from kto_ray.config import dump_config
from kto_ray.reference.precompute import precompute
from kto_ray.rundir import RunDir, fetch_folder
from kto_ray.store.format import open_store
from kto_ray.tools.verify import VerifyFailed, verify
from kto_ray.training.launch.driver import train
from tests.conftest import assert_same_weights, make_config, own_lines, read_metrics
from tests.store.test_integrity import _page_middle, _read, _write

pytestmark = [pytest.mark.slow, pytest.mark.extended]

RUNS = "s3://kto/integrity-runs"


@pytest.fixture(scope="module")
def fallback(ray_with_s3, tiny_model, small_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("s3integrity")
    os.environ["KTO_RAY_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # fetched model folders
    cfg = make_config(
        tiny_model,
        small_data,
        root,
        store={"path": "s3://kto/stores/integrity"},
        train={"max_steps": 4, "micro_batch_size": 4, "lr": 1e-3, "warmup_ratio": 0.0},
        run={"dir": RUNS, "name": "run", "checkpoint_every": 2, "max_failures": 0, "keep_checkpoints": 4},
        cluster={"workers": 2},
    )
    precompute(cfg)
    run_dir = train(cfg).run_dir
    uninterrupted = root / "uninterrupted-final"
    shutil.copytree(fetch_folder(run_dir.child("final")), uninterrupted)
    step_4 = run_dir.join("checkpoints", "step_00000004")
    shard = "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    with step_4.fs.open_input_stream(step_4.join(shard).path) as stream:
        data = stream.read()
    with step_4.fs.open_output_stream(step_4.join(shard).path) as stream:
        stream.write(data[: len(data) // 2])
    said = io.StringIO()
    with redirect_stdout(said):
        rerun = train(cfg)
    return run_dir, uninterrupted, shard, len(data), said.getvalue(), rerun, cfg


def test_on_s3_a_truncated_shard_falls_back_in_one_line_and_matches(fallback):
    run_dir, uninterrupted, shard, size, said, rerun, _cfg = fallback
    lines = [line for line in own_lines(said) if "damaged" in line]  # the driver's (workers' aside)
    assert lines == [
        f"checkpoint step 4 is damaged (file {shard}, size {size // 2}, expected {size}), "
        "resuming from step 2"
    ]
    assert rerun.steps == 4
    assert [m["step"] for m in read_metrics(str(run_dir))] == [1, 2, 3, 4]
    assert_same_weights(fetch_folder(run_dir.child("final")), Path(uninterrupted))


def test_verify_on_s3_names_the_truncated_shard(fallback):
    run_dir, _uninterrupted, shard, size, *_ = fallback
    lines: list[str] = []
    with pytest.raises(VerifyFailed, match="1 problem in"):
        verify(str(run_dir), lines.append)
    assert lines == [
        f"{RunDir(str(run_dir))}/checkpoints/step_00000004: {shard}: size {size // 2}, expected {size}"
    ]


def test_on_s3_train_on_a_store_with_a_flipped_log_prob_bit_is_one_line_exit_2(fallback, tmp_path, capsys):
    """`kto-ray train` on the S3 store after one bit of a ref_logps page flipped (pyarrow alone decodes it
    to another number): the driver's scan meets it before anything trains, one line, exit 2, naming the
    store and the file. Last in the module: it damages the module's store."""
    *_, cfg = fallback
    store = open_store(cfg.store.path)
    path = store.files()[0]
    data = _read(store.location, path)
    damaged = bytearray(data)
    damaged[_page_middle(data, "ref_logps", group=0)] ^= 0x01  # row groups of 256: the file has one
    _write(store.location, path, bytes(damaged))
    config = tmp_path / "cfg.yaml"
    config.write_text(dump_config(cfg))
    capsys.readouterr()
    assert main(["train", "--config", str(config), "--set", "run.name=damaged-store"]) == 2
    (line,) = own_lines(capsys.readouterr().err)
    file = path.rsplit("/", 2)[-2] + "/" + path.rsplit("/", 1)[-1]
    assert line.startswith(f"kto-ray: error: reference store {cfg.store.path}: file {file} is damaged ("), (
        line
    )
    assert "CRC checksum verification failed" in line and "kto-ray precompute --overwrite" in line
