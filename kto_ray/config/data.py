"""What a reference store is built from: the model, the reference, the data, the store and precompute."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kto_ray.config.section import Section


class ModelConfig(Section):
    path: str = Field("artifacts/tiny-llama", description="Policy: a local folder or a Hugging Face hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype: auto = bfloat16 on GPU, float32 on CPU."
    )
    trust_remote_code: bool = Field(False, description="Run model code shipped with the checkpoint.")
    allow_pickle_weights: bool = Field(
        False, description="Also accept .bin (pickle) weights; off means safetensors only."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa",
        description="Attention kernel for every model load (policy, reference, evaluate); "
        "flash_attention_2 needs the flash-attn package and a GPU.",
    )
    logprob_chunk_tokens: int | None = Field(
        512,
        ge=1,
        description="Completion tokens per chunk through the LM head when computing log-probs (logits "
        "recomputed in backward), so memory grows with chunk x vocab, not rows x length x vocab; "
        "null computes the full logits (the slower, larger path, kept for comparison).",
    )
    packed_batches: bool | Literal["auto"] = Field(
        "auto",
        description="Run each model batch (precompute, the KL and policy passes, evaluation) with its "
        "rows packed back to back, no padding (kto_ray/models/packing.py): one sequence per batch "
        "with flash_attention_2, lanes as wide as the batch's longest row with sdpa/eager. Same "
        "log-probs; models that cannot keep packed rows apart stay padded (said once). auto = on "
        "with flash_attention_2, and for training micro-batches that mix lengths "
        "(train.group_by_length false: 2.06x tokens/s on CPU); off for length-sorted batches "
        "(precompute, evaluation, grouped steps: 1.10-1.16x, within noise; "
        "docs/benchmarks/packing-2026-12-01.md).",
    )

    def packs(self, mixed_lengths: bool) -> bool:
        """Whether model batches run packed: `packed_batches`, with auto resolved for batches whose rows
        mix lengths (`mixed_lengths`) or are sorted by length."""
        if self.packed_batches != "auto":
            return self.packed_batches
        return self.attn_implementation == "flash_attention_2" or mixed_lengths


class ReferenceConfig(Section):
    path: str | None = Field(None, description="Reference model; null means the policy's initial weights.")
    mode: Literal["offline", "online"] = Field(
        "offline",
        description="offline: read reference log-probs from the store; online: run the reference "
        "on the training workers every step (no store needed for the log-probs).",
    )


class DataConfig(Section):
    paths: list[str] = Field(
        default_factory=lambda: ["data/arithmetic.jsonl"],
        description="Files or folders (.jsonl/.json/.parquet/.csv) or one Hugging Face dataset name.",
    )
    hf_split: str = Field("train", description="Split to read when a path is a Hugging Face dataset name.")
    max_length: int = Field(512, gt=1, description="Maximum prompt + completion tokens.")
    max_prompt_length: int = Field(256, gt=0, description="Prompts longer than this keep their last tokens.")
    eval_fraction: float = Field(
        0.05,
        ge=0.0,
        lt=1.0,
        description="Fraction of rows held out as 'eval', each by a seeded hash of its content: about this "
        "fraction, not exactly.",
    )
    seed: int = Field(
        0,
        description="Seed of the KL pairing and the eval split. A row's split depends on its content and its "
        "KL partner on the rows before it, so new rows at the end of the data leave the others as they "
        "were and `kto-ray precompute` appends them to the store.",
    )

    @model_validator(mode="after")
    def _prompt_fits(self) -> DataConfig:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("data.max_prompt_length must be smaller than data.max_length")
        return self


class StoreConfig(Section):
    path: str = Field(
        "stores/demo",
        description="The reference store (Parquet + manifest.json): a folder, or an s3:// or gs:// URI "
        "(endpoint and credentials from the standard AWS/GCP environment, never from the config).",
    )


class PrecomputeConfig(Section):
    actors: int = Field(1, ge=1, description="Reference-model actors (one model copy each).")
    gpus_per_actor: float = Field(
        0.0,
        ge=0.0,
        description="GPUs per actor; 0 runs on CPU. Above 1 (a whole number), the actor's reference is "
        "spread over its GPUs (transformers' device_map), for references too big for one GPU.",
    )
    cpus_per_actor: float = Field(1.0, gt=0.0, description="CPUs reserved per actor.")
    batch_rows: int = Field(16, ge=1, description="Most rows per model batch (after length bucketing).")
    batch_tokens: int | None = Field(
        None, ge=1, description="Most padded tokens per model batch; null limits by batch_rows only."
    )
    bucket_rows: int = Field(
        1024, ge=1, description="Rows sorted together by length before batching (bigger = less padding)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Reference dtype: auto = bfloat16 on GPU, float32 on CPU. Part of the fingerprint.",
    )

    @model_validator(mode="after")
    def _whole_gpus_to_spread_over(self) -> PrecomputeConfig:
        if self.gpus_per_actor > 1 and not float(self.gpus_per_actor).is_integer():
            raise ValueError("precompute.gpus_per_actor above 1 must be a whole number of GPUs")
        return self
