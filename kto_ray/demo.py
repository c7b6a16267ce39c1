"""`kto-ray demo`: the whole pipeline on the embedded default, with a before/after table."""

from __future__ import annotations

import shutil
import time

from kto_ray.assets import ensure_tiny_model
from kto_ray.config import KTOConfig
from kto_ray.evaluate import evaluate, format_table
from kto_ray.precompute import precompute
from kto_ray.raycluster import ray_session
from kto_ray.trainer import train


def run_demo(cfg: KTOConfig) -> dict[str, dict[str, float]]:
    start = time.perf_counter()
    model_dir = ensure_tiny_model(cfg.model.path)
    print(f"embedded model and tokenizer: {model_dir}; data: {', '.join(cfg.data.paths)}", flush=True)
    if cfg.run_dir.exists():
        # The demo always trains from the start; real runs resume instead (same run.name).
        shutil.rmtree(cfg.run_dir)
    with ray_session(cfg.cluster.address):
        store = precompute(cfg).store
        before = evaluate(cfg)
        result = train(cfg)
        after = evaluate(cfg, str(result.run_dir / "final"))
    table = {"before": before, "after": after}
    print(f"\nheld-out eval split of {store.path} ({int(before['rows'])} rows):")
    print(format_table(table))
    print(f"demo finished in {time.perf_counter() - start:.0f}s; trained model: {result.run_dir / 'final'}")
    return table
