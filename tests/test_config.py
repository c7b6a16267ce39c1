"""Configs: every shipped YAML validates and round-trips, the real-model ones fit their GPUs according to
the planner; user errors exit 2 with one line; overrides are typed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from kto_ray.cli import main
from kto_ray.config import KTOConfig, config_from_dict, dump_config, load_config
from kto_ray.errors import UserError
from kto_ray.planning.plan import plan
from kto_ray.rundir import RunDir
from kto_ray.training.resume.global_batch import accumulation, check_worker_range
from tests.conftest import own_lines
from tests.tools.test_plan import save_llama_8b, save_qwen3_30b_a3b, save_qwen_32b

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
# Real-model configs -> an offline architecture with the public dimensions (no hub access in tests).
REAL = {
    "llama3-8b.yaml": save_llama_8b,
    "qwen2.5-32b.yaml": save_qwen_32b,
    "qwen3-30b-a3b.yaml": save_qwen3_30b_a3b,
}
# What `deepspeed.stage: auto` picks for each on its cluster: ZeRO-2 where the 16-bit model fits a GPU.
AUTO_STAGE = {"llama3-8b.yaml": 2, "qwen2.5-32b.yaml": 3, "qwen3-30b-a3b.yaml": 3}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates_and_round_trips(path):
    # Loading refuses unknown keys and bad values; what the run dir records must load back the same.
    cfg = load_config(path)
    assert config_from_dict(yaml.safe_load(dump_config(cfg))) == cfg


def test_real_model_configs_are_shipped():
    assert set(REAL) <= {p.name for p in CONFIGS.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_model_config_fits_its_cluster(name, tmp_path):
    cfg = load_config(CONFIGS / name)
    p = plan(cfg, model_config=str(REAL[name](tmp_path)))
    setting = p.setting(p.configured)
    assert setting.fits, f"{name}: {setting.gpu_total / 2**30:.1f} GiB per GPU"
    assert p.precompute_fits
    # The configured offload is the planner's advice: the fastest setting that fits.
    assert p.configured == next(s.name for s in p.settings if s.fits)
    # GPU training, the planner's stage (ZeRO-3 where ZeRO-2 does not fit), bf16, the paper's
    # hyperparameters and a global batch of 32-64.
    assert cfg.cluster.use_gpu and cfg.deepspeed.stage == "auto" and cfg.deepspeed.bf16 is True
    assert p.choice.stage == AUTO_STAGE[name], p.choice.reason
    assert (cfg.train.beta, cfg.train.lr, cfg.train.warmup_ratio) == (0.1, 5e-6, 0.1)
    assert 32 <= cfg.first_global_batch <= 64
    check_worker_range(cfg.first_global_batch, cfg.cluster.worker_range, cfg.train.micro_batch_size)
    # Store and run dir on storage every node shares (the store is a local-filesystem folder).
    assert cfg.store.path.startswith("/mnt/shared/") and cfg.run.dir.startswith("/mnt/shared/")
    assert all(path.startswith("/mnt/shared/") for path in cfg.data.paths)


def test_stage_auto_picks_the_offload_itself():
    with pytest.raises(UserError, match="stage auto picks the offload too"):
        load_config(None, ["deepspeed.stage=auto", "deepspeed.offload_optimizer=cpu"])
    assert load_config(None, ["deepspeed.stage=auto"]).deepspeed.stage == "auto"


def test_the_32b_config_spans_several_nodes():
    cfg = load_config(CONFIGS / "qwen2.5-32b.yaml")
    assert cfg.cluster.workers >= 16 and cfg.precompute.gpus_per_actor >= 1


def test_every_field_is_documented():
    for section_name, section in KTOConfig.model_fields.items():
        model = section.annotation
        for name, field in model.model_fields.items():
            assert field.description, f"{section_name}.{name} has no description"


def test_overrides_are_typed_like_yaml():
    cfg = load_config(
        REPO / "configs" / "demo.yaml", ["train.beta=0.2", "cluster.workers=3", "train.max_steps=null"]
    )
    assert cfg.train.beta == 0.2 and isinstance(cfg.train.beta, float)
    assert cfg.cluster.workers == 3
    assert cfg.train.max_steps is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [("3", (3, 3)), ("[1, 2]", (1, 2)), ("{min: 8, max: 16}", (8, 16)), ("[2, 2]", (2, 2))],
)
def test_workers_are_a_count_or_a_range(value, expected):
    cfg = load_config(None, [f"cluster.workers={value}"])
    assert cfg.cluster.worker_range == expected
    # What the run dir records loads back the same.
    assert config_from_dict(yaml.safe_load(dump_config(cfg))).cluster.worker_range == expected


@pytest.mark.parametrize("value", ["[2, 1]", "0", "[1, 2, 3]", "{min: 1}", "true", "1.5", "[0, 2]"])
def test_a_bad_worker_range_is_refused(value):
    with pytest.raises(UserError, match=r"cluster\.workers: .*1 <= min <= max"):
        load_config(None, [f"cluster.workers={value}"])


def test_eval_runs_every_eval_every_steps_and_after_the_last_with_either_setting():
    def evaluated(**train) -> list[int]:
        cfg = load_config(None, [f"train.{key}={value}" for key, value in train.items()])
        return [done for done in range(1, 8) if cfg.train.evaluates_after(done, total_steps=7)]

    assert evaluated() == []  # a plain `kto-ray train`: no eval unless asked
    assert evaluated(eval_at_end="true") == [7]  # a sweep's trial: once, after the last step
    assert evaluated(eval_every=3) == [3, 6, 7]
    assert evaluated(eval_every=3, eval_at_end="true") == [3, 6, 7]  # the last is evaluated once
    assert evaluated(eval_every=7) == [7]
    assert not load_config(None, []).train.evaluates


def test_global_batch_size_fixes_the_rows_per_step_and_the_accumulation_follows():
    cfg = load_config(None, ["cluster.workers=2", "train.micro_batch_size=4", "train.global_batch_size=16"])
    global_batch = cfg.first_global_batch
    # 16 rows over 2 workers x 4 rows: 2 micro-batches each; over 1 worker: 4.
    assert (global_batch, accumulation(global_batch, 2, 4), accumulation(global_batch, 1, 4)) == (16, 2, 4)
    # null: 2 workers x 4 rows, no accumulation.
    cfg = load_config(None, ["cluster.workers=2", "train.micro_batch_size=4"])
    assert cfg.train.global_batch_size is None and cfg.first_global_batch == 8
    assert accumulation(cfg.first_global_batch, 2, 4) == 1


def test_desirable_weight_accepts_auto():
    assert load_config(None, ["train.desirable_weight=auto"]).train.desirable_weight == "auto"


@pytest.mark.parametrize(
    ("packed", "attention", "mixed", "expected"),
    [
        ("auto", "sdpa", False, False),  # length-sorted batches: little padding to save
        ("auto", "sdpa", True, True),  # ungrouped training steps mix lengths
        ("auto", "flash_attention_2", False, True),  # one sequence per batch, no padding at all
        ("auto", "eager", True, True),
        ("false", "flash_attention_2", True, False),
        ("true", "sdpa", False, True),
    ],
)
def test_packing_auto_packs_where_it_pays(packed, attention, mixed, expected):
    cfg = load_config(None, [f"model.packed_batches={packed}", f"model.attn_implementation={attention}"])
    assert cfg.model.packs(mixed_lengths=mixed) is expected


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--set", "train.betta=0.2"], "unknown key 'train.betta'"),
        (["--set", "train.beta=high"], "train.beta"),
        (["--set", "nosuchsection.x=1"], "unknown key 'nosuchsection'"),
        (["--set", "train.beta"], "key.sub=value"),
        (["--config", "does/not/exist.yaml"], "config file not found: does/not/exist.yaml"),
        (["--set", "data.max_prompt_length=900"], "max_prompt_length must be smaller"),
        (["--set", "cluster.workers=[3, 1]"], "cluster.workers: Value error, expected a worker count"),
        (["--set", "cluster.workers=0"], "1 <= min <= max"),
        (["--set", "cluster.workers={min: 1}"], "cluster.workers"),
        (["--set", "train.global_batch_size=0"], "train.global_batch_size"),
        (["--set", "train.grad_accumulation=2"], "unknown key 'train.grad_accumulation'"),
        (["--set", "data.pairing=shuffle"], "unknown key 'data.pairing'"),
    ],
)
def test_bad_config_exits_2_with_one_line(args, needle, capsys):
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(own_lines(err)) == 1, err
    assert needle in err


def test_invalid_yaml_is_a_user_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(UserError, match="invalid YAML"):
        load_config(bad)


def test_console_entry_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "kto_ray", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for command in ("demo", "precompute", "train", "evaluate"):
        assert command in out


def test_object_storage_run_dirs_and_stores():
    cfg = load_config(None, ["run.dir=s3://bucket/runs/", "run.name=r1", "store.path=s3://bucket/stores/x"])
    assert cfg.store.path == "s3://bucket/stores/x"
    run_dir = RunDir.of(cfg)
    assert run_dir.is_remote and str(run_dir) == "s3://bucket/runs/r1"
    assert run_dir.child("final") == "s3://bucket/runs/r1/final"
    assert run_dir.folder is None
    # TensorBoard writes local event files: refused in one line with what to do instead.
    with pytest.raises(UserError, match=r"tensorboard writes event files to a local folder"):
        load_config(None, ["run.dir=s3://bucket/runs", "run.report_to=[tensorboard]"])
