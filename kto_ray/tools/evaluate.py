"""Held-out metrics of a model against the store's eval split (KTO loss, z0, reward accuracy, margins).

The model scores the split on the cluster's actors (`kto_ray/reference/scoring.py`, the stage that
precompute runs, on the same resources and dtype); this process reads the split and reduces the sums.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kto_ray.config import KTOConfig, with_absolute_paths
from kto_ray.integrity import check_model_folder
from kto_ray.models.loading import load_tokenizer
from kto_ray.objective import EVAL_KEYS, KTOSums, desirable_weight, kl_raw
from kto_ray.raycluster import ray_session
from kto_ray.reference.scoring import score_on_actors
from kto_ray.store.check import checked_store
from kto_ray.training.launch.placement import Ask, placement_notices
from kto_ray.training.step import LossSettings


@contextlib.contextmanager
def on_the_cluster(cfg: KTOConfig) -> Iterator[None]:
    """A Ray session whose cluster can place precompute's actor pool, where evaluate and generation
    run; a pool it can never place is refused in one line (exit 2), as a worker group is."""
    with ray_session(cfg.cluster.address), placement_notices(Ask.of_actors(cfg)):
        yield


def evaluate(cfg: KTOConfig, model_path: str | None = None, split: str = "eval") -> dict[str, float]:
    """Score `model_path` (default: the policy) on a split of the checked store, on the actors."""
    cfg = with_absolute_paths(cfg)
    store = checked_store(cfg, load_tokenizer(cfg.model))
    part = store.read_split(split)
    check_model_folder(model_path or cfg.model.path)  # a run's final/: its file list, read whole
    with on_the_cluster(cfg):
        policy, policy_kl = score_on_actors(cfg, model_path or cfg.model.path, part)
    ref, ref_kl = torch.tensor(part["ref_logps"].to_numpy()), torch.tensor(part["ref_kl_logps"].to_numpy())
    desirable = torch.tensor(part["label"].to_pylist(), dtype=torch.bool)
    raw = kl_raw(policy_kl, ref_kl)
    z0 = raw.clamp(min=0.0)
    # The weight training used: `auto` comes from the train split's label counts, not this split's.
    labels = store.read_split("train", columns=["id", "label"])["label"].to_numpy(zero_copy_only=False)
    lam_d = desirable_weight(cfg, labels, warn=False)
    out = LossSettings(cfg.train.beta, lam_d, cfg.train.undesirable_weight).loss(policy, ref, desirable, z0)
    sums = KTOSums.zeros()  # the same sums and metric definitions as eval during training
    sums.add(out, policy, ref, desirable, z0)
    return sums.to_metrics(z0.item(), EVAL_KEYS, kl_raw=raw.item())


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A readable table: one row per metric, one column per evaluated model."""
    names = list(columns)
    keys = list(next(iter(columns.values())))
    lines = [f"{'metric':<18}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        lines.append(f"{key:<18}" + "".join(f"{columns[n][key]:>14.4f}" for n in names))
    return "\n".join(lines)
