"""A store against a config: the fingerprint a config expects, and the store of a config, checked.

Precompute records `store_fingerprint` (with `data_file_stats`) in the manifest; training, evaluation
and samples open a store with `checked_store`, which trusts the store's recorded data digest while the
data files' stats are unchanged, so a rerun does not re-read the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kto_ray.config import KTOConfig
from kto_ray.data.pairing import RULE as PAIRING_RULE
from kto_ray.data.sources import content_fingerprint, local_files, read_examples
from kto_ray.data.tokenize import TRUNCATION_POLICY
from kto_ray.models.loading import resolve_dtype
from kto_ray.storage import display
from kto_ray.store.fingerprint import FileStat, sha256_text, tokenizer_fingerprint, weights_fingerprint
from kto_ray.store.format import Store, check_files, open_store, read_manifest


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
    pairing = {"seed": cfg.data.seed, "eval_fraction": cfg.data.eval_fraction, "rule": PAIRING_RULE}
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
    store = _checked_store(cfg, tokenizer)
    check_files(store)  # every file there at its size (a LIST); pages are checked as they are read
    return store


def _checked_store(cfg: KTOConfig, tokenizer) -> Store:
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
