"""From a config to the rows the reference model (or online training) consumes.

read + validate (driver, text only) -> KL pairing and split (driver, seeded) -> tokenization
(`tokenize_rows`, run in Ray Data tasks by precompute). The fingerprint of everything the reference
log-probs depend on is computed here too, so precompute and training compute it the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kto_ray.config import KTOConfig
from kto_ray.data.pairing import kl_partners, split_assignment
from kto_ray.data.sources import IngestReport, content_fingerprint, read_examples
from kto_ray.data.tokenize import TRUNCATION_POLICY, tokenize_batch
from kto_ray.models.loading import resolve_dtype
from kto_ray.reference.store import sha256_text, tokenizer_fingerprint, weights_fingerprint


@dataclass(frozen=True)
class PreparedText:
    """One row per example: id, prompt, completion, kl_completion (text), kl_id, label, split."""

    table: pa.Table
    report: IngestReport
    data_digest: str


def prepare_text(cfg: KTOConfig, tokenizer) -> PreparedText:
    examples, report = read_examples(cfg.data.paths, tokenizer=tokenizer, hf_split=cfg.data.hf_split)
    prompts = [e.prompt for e in examples]
    partners = kl_partners(prompts, cfg.data.seed)
    splits = split_assignment(len(examples), cfg.data.eval_fraction, cfg.data.seed)
    table = pa.table(
        {
            "id": pa.array(range(len(examples)), pa.int64()),
            "prompt": prompts,
            "completion": [e.completion for e in examples],
            "kl_completion": [examples[j].completion for j in partners],
            "kl_id": pa.array(partners, pa.int64()),
            "label": pa.array([e.label for e in examples], pa.bool_()),
            "split": splits,
        }
    )
    return PreparedText(table, report, content_fingerprint(examples))


def tokenize_rows(
    batch: dict[str, Any], tokenizer, max_length: int, max_prompt_length: int
) -> dict[str, Any]:
    """Tokenize a batch of text rows; rows whose completion has no token left are dropped."""
    limits = {"max_length": max_length, "max_prompt_length": max_prompt_length}
    own = tokenize_batch(tokenizer, list(batch["prompt"]), list(batch["completion"]), **limits)
    kl = tokenize_batch(tokenizer, list(batch["prompt"]), list(batch["kl_completion"]), **limits)
    keep = [i for i, tok in enumerate(own) if tok is not None]
    return {
        "id": [batch["id"][i] for i in keep],
        "prompt_ids": [own[i].prompt_ids for i in keep],
        "completion_ids": [own[i].completion_ids for i in keep],
        "kl_completion_ids": [kl[i].completion_ids if kl[i] is not None else [] for i in keep],
        "kl_id": [batch["kl_id"][i] for i in keep],
        "label": [bool(batch["label"][i]) for i in keep],
        "split": [batch["split"][i] for i in keep],
    }


def resolve_model_dir(path: str, revision: str | None = None) -> Path:
    """Local folder of a model: the path itself, or the hub snapshot (weights + configs only)."""
    if Path(path).expanduser().is_dir():
        return Path(path).expanduser()
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, revision=revision, allow_patterns=["*.json", "*.safetensors"]))


def store_fingerprint(cfg: KTOConfig, data_digest: str, tokenizer) -> tuple[dict[str, str], dict[str, Any]]:
    """Fingerprint components (hashes) and their human-readable inputs, for the manifest."""
    dtype = str(resolve_dtype(cfg.precompute.dtype, cfg.precompute.gpus_per_actor > 0)).removeprefix("torch.")
    truncation = {
        "max_length": cfg.data.max_length,
        "max_prompt_length": cfg.data.max_prompt_length,
        "policy": TRUNCATION_POLICY,
    }
    pairing = {"seed": cfg.data.seed, "eval_fraction": cfg.data.eval_fraction}
    ref_dir = resolve_model_dir(cfg.reference_path, cfg.model.revision)
    inputs = {
        "data": cfg.data.paths,
        "reference": cfg.reference_path,
        "truncation": truncation,
        "pairing": pairing,
        "dtype": dtype,
    }
    components = {
        "data": data_digest,
        "reference_weights": weights_fingerprint(ref_dir, cfg.model.allow_pickle_weights),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "truncation": sha256_text(truncation),
        "pairing": sha256_text(pairing),
        "dtype": sha256_text(dtype),
    }
    return components, inputs
