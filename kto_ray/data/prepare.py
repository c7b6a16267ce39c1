"""From a config to the rows the reference model (or online training) consumes.

read + validate (driver, text only) -> KL pairing and split (driver, seeded) -> tokenization
(`tokenize_rows`, run in Ray Data tasks by precompute). The fingerprint of everything the reference
log-probs depend on is computed here too, so precompute and training compute it the same way.
Training and evaluation check a store with `checked_store`, which trusts the store's recorded data
digest while the data files' stats are unchanged, so a rerun does not re-read the dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from kto_ray.config import KTOConfig
from kto_ray.data.pairing import kl_partners, split_assignment
from kto_ray.data.sources import IngestReport, content_fingerprint, local_files, read_examples
from kto_ray.data.tokenize import TRUNCATION_POLICY, tokenize_batch
from kto_ray.models.loading import resolve_dtype
from kto_ray.reference.fingerprint import FileStat, sha256_text, tokenizer_fingerprint, weights_fingerprint
from kto_ray.reference.store import Store, open_store, read_manifest
from kto_ray.storage import display


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


def data_file_stats(cfg: KTOConfig) -> list[FileStat] | None:
    """Path, size and mtime_ns of every data file, in reading order; None for a Hugging Face dataset.

    Precompute takes them before it reads the files: a file changed during the read then differs
    from the recorded stat at the next check, which re-reads it, never the other way round.
    """
    files = local_files(cfg.data.paths)
    return None if files is None else [FileStat.of(f) for f in files]


def data_digest(cfg: KTOConfig, tokenizer) -> str:
    """The `data` component from the content: every row read, validated and rendered."""
    examples, _ = read_examples(cfg.data.paths, tokenizer=tokenizer, hf_split=cfg.data.hf_split)
    return content_fingerprint(examples)


def checked_store(cfg: KTOConfig, tokenizer) -> Store:
    """The store of `cfg`, refused (naming the component) unless its fingerprint matches the config.

    The `data` component is taken from the manifest when the data files' recorded stats all still
    match (no data byte is read); otherwise the data is read and its content compared, as a changed
    mtime alone (a copy, a `touch`) does not make different data.
    """
    manifest = read_manifest(cfg.store.path)
    if manifest is None:
        return open_store(cfg.store.path)  # raises the "run precompute first" error
    stats = data_file_stats(cfg)
    recorded = manifest.fingerprint.get("data")
    if stats is not None and manifest.data_files == stats and recorded is not None:
        expected, _ = store_fingerprint(cfg, recorded, tokenizer)
        return open_store(cfg.store.path, expected)
    expected, _ = store_fingerprint(cfg, data_digest(cfg, tokenizer), tokenizer)
    store = open_store(cfg.store.path, expected)
    if stats is not None:
        print(
            f"data files changed since {display(cfg.store.path)} recorded them (same content): rerun "
            "`kto-ray precompute` to record them and skip re-reading the data on later runs",
            flush=True,
        )
    return store
