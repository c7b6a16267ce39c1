"""Loading tokenizers and causal LMs the same way in every stage: local folders or hub ids.

Safe defaults: `trust_remote_code` off and safetensors weights only, unless the config says otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kto_ray.config import ModelConfig
from kto_ray.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return DTYPES[name]


def _check_exists(path: str) -> None:
    # A path-looking string that does not exist is a typo, not a hub id: say so instead of a hub 404.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix
    if looks_local and not Path(path).expanduser().exists():
        raise UserError(f"model path not found: {path}")


def load_tokenizer(model: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    path = path or model.path
    _check_exists(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=model.trust_remote_code, revision=model.revision
        )
    except OSError as err:
        raise UserError(f"cannot load tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model: ModelConfig, dtype: torch.dtype, path: str | None = None):
    """Load a causal LM for inference or training; under an active HfDeepSpeedConfig it loads sharded."""
    from transformers import AutoModelForCausalLM

    path = path or model.path
    _check_exists(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle_weights else True,
            revision=model.revision,
        )
    except OSError as err:
        raise UserError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None


def load_model_config(model: ModelConfig, path: str | None = None):
    from transformers import AutoConfig

    path = path or model.path
    _check_exists(path)
    return AutoConfig.from_pretrained(
        path, trust_remote_code=model.trust_remote_code, revision=model.revision
    )
