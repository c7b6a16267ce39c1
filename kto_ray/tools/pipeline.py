"""Precompute (or reuse) the reference store, train, evaluate the result: the whole job in one Ray session."""

from __future__ import annotations

from kto_ray.config import KTOConfig
from kto_ray.raycluster import ray_session
from kto_ray.reference.precompute import precompute
from kto_ray.storage import display
from kto_ray.tools.evaluate import evaluate, format_table
from kto_ray.training.launch.driver import train


def run_pipeline(cfg: KTOConfig) -> dict[str, dict[str, float]]:
    """Returns held-out metrics by model ("after", when the run exports); prints them as a table."""
    table: dict[str, dict[str, float]] = {}
    with ray_session(cfg.cluster.address):
        store = precompute(cfg).store
        result = train(cfg)
        if cfg.run.export:  # on the cluster's actors, as precompute scored the reference
            table["after"] = evaluate(cfg, result.run_dir.child("final"))
    if table:
        rows = int(table["after"]["rows"])
        print(f"\nheld-out eval split of {display(store.path)} ({rows} rows):")
        print(format_table(table))
    print(f"trained {result.steps} steps; run dir {result.run_dir}", flush=True)
    return table
