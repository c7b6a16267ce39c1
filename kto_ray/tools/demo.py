"""`kto-ray demo`: the whole pipeline on the embedded default, with a before/after table."""

from __future__ import annotations

import shutil
import time

from kto_ray.assets.tiny_model import ensure_tiny_model
from kto_ray.config import KTOConfig
from kto_ray.tools.pipeline import run_pipeline


def run_demo(cfg: KTOConfig) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    model_dir = ensure_tiny_model(cfg.model.path)
    print(f"embedded model and tokenizer: {model_dir}; data: {', '.join(cfg.data.paths)}", flush=True)
    if cfg.run_dir.exists():
        # The demo always trains from the start; real runs resume instead (same run.name).
        shutil.rmtree(cfg.run_dir)
    table = run_pipeline(cfg, evaluate_before=True)
    print(f"demo finished in {time.perf_counter() - start:.0f}s")
    return table
