"""Every shipped YAML config loads; the real-model ones fit their GPUs according to the planner."""

from __future__ import annotations

from pathlib import Path

import pytest

from kto_ray.config import load_config
from kto_ray.tools.plan import plan
from tests.tools.test_plan import save_llama_8b, save_qwen_32b

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# Real-model configs -> an offline architecture with the public dimensions (no hub access in tests).
REAL = {"llama3-8b.yaml": save_llama_8b, "qwen2.5-32b.yaml": save_qwen_32b}


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_config_loads(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.train.beta > 0


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
    # GPU training, ZeRO-3, bf16, the paper's hyperparameters and a global batch of 32-64.
    assert cfg.cluster.use_gpu and cfg.deepspeed.stage == 3 and cfg.deepspeed.bf16 is True
    assert (cfg.train.beta, cfg.train.lr, cfg.train.warmup_ratio) == (0.1, 5e-6, 0.1)
    assert 32 <= cfg.cluster.workers * cfg.train.micro_batch_size * cfg.train.grad_accumulation <= 64
    # Store and run dir on storage every node shares (the store is a local-filesystem folder).
    assert cfg.store.path.startswith("/mnt/shared/") and cfg.run.dir.startswith("/mnt/shared/")
    assert all(path.startswith("/mnt/shared/") for path in cfg.data.paths)


def test_the_32b_config_spans_several_nodes():
    cfg = load_config(CONFIGS / "qwen2.5-32b.yaml")
    assert cfg.cluster.workers >= 16 and cfg.precompute.gpus_per_actor >= 1
