"""Held-out metrics of a model against the store's eval split (KTO loss, z0, reward accuracy, margins)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kto_ray.config import KTOConfig, with_absolute_paths
from kto_ray.integrity import check_model_folder
from kto_ray.kto_metrics import EVAL_KEYS, KTOSums
from kto_ray.loss import kl_z0
from kto_ray.models.loading import load_causal_lm, load_tokenizer, resolve_dtype
from kto_ray.models.logprobs import length_buckets, pad_sequences, sequence_logps
from kto_ray.models.packing import pack_sequences
from kto_ray.reference.check import checked_store
from kto_ray.training.driver import desirable_weight
from kto_ray.training.step import LossSettings


def _score(
    model, prompts, completions, pad_id: int, batch_rows: int, chunk_tokens: int | None, packed: bool
) -> torch.Tensor:
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    out = np.zeros(len(lengths), dtype=np.float32)
    layout = pack_sequences if packed else pad_sequences
    with torch.inference_mode():
        for rows in length_buckets(lengths, batch_rows):
            batch = layout([prompts[i] for i in rows], [completions[i] for i in rows], pad_id)
            out[rows] = sequence_logps(model, batch, chunk_tokens).float().numpy()
    return torch.from_numpy(out)


def evaluate(cfg: KTOConfig, model_path: str | None = None, split: str = "eval") -> dict[str, float]:
    """Score `model_path` (default: the policy) on a split of the checked store, on this process's CPU."""
    cfg = with_absolute_paths(cfg)
    tokenizer = load_tokenizer(cfg.model)
    store = checked_store(cfg, tokenizer)
    part = store.read_split(split).to_pydict()
    check_model_folder(model_path or cfg.model.path)  # a run's final/: its file list, read whole
    model = load_causal_lm(cfg.model, resolve_dtype("float32", False), model_path or cfg.model.path).eval()
    batch_rows, chunk, pad = cfg.precompute.batch_rows, cfg.model.logprob_chunk_tokens, tokenizer.pad_token_id
    scoring = (pad, batch_rows, chunk, cfg.model.packed_batches)
    policy = _score(model, part["prompt_ids"], part["completion_ids"], *scoring)
    policy_kl = _score(model, part["prompt_ids"], part["kl_completion_ids"], *scoring)
    ref, ref_kl = torch.tensor(part["ref_logps"]), torch.tensor(part["ref_kl_logps"])
    desirable = torch.tensor(part["label"], dtype=torch.bool)
    z0 = kl_z0(policy_kl, ref_kl)
    # The weight training used: `auto` comes from the train split's label counts, not this split's.
    labels = store.read_split("train", columns=["id", "label"])["label"].to_numpy(zero_copy_only=False)
    lam_d = desirable_weight(cfg, labels, warn=False)
    out = LossSettings(cfg.train.beta, lam_d, cfg.train.undesirable_weight).loss(policy, ref, desirable, z0)
    sums = KTOSums.zeros()  # the same sums and metric definitions as eval during training
    sums.add(out, policy, ref, desirable, z0)
    return sums.to_metrics(z0.item(), EVAL_KEYS)


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A readable table: one row per metric, one column per evaluated model."""
    names = list(columns)
    keys = list(next(iter(columns.values())))
    lines = [f"{'metric':<18}" + "".join(f"{n:>14}" for n in names)]
    for key in keys:
        lines.append(f"{key:<18}" + "".join(f"{columns[n][key]:>14.4f}" for n in names))
    return "\n".join(lines)


def write_json(metrics: dict, path: Path) -> None:
    path.write_text(json.dumps(metrics, indent=2))
