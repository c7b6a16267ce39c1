"""Loading tokenizers and causal LMs the same way in every stage: local folders or hub ids.

Safe defaults: `trust_remote_code` off and safetensors weights only, unless the config says otherwise.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import torch

from kto_ray.config import ModelConfig
from kto_ray.errors import UserError
from kto_ray.internals.transformers_private import supports_sdpa
from kto_ray.models.denormals import flush_denormals
from kto_ray.rundir import fetch_folder
from kto_ray.storage import display, first_line, is_uri


def resolve_dtype(name: str, on_gpu: bool) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if on_gpu else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
# What marks a LoRA adapter folder in PEFT's format (a LoRA run's final/).
ADAPTER_CONFIG = "adapter_config.json"


def local_model_path(path: str) -> str:
    """A model folder at an object-storage URI (a run's final/ on s3://) as a local copy, fetched once
    per content into the kto-ray cache; local paths and hub ids pass through."""
    if not is_uri(path) or path.startswith("file://"):
        return path
    try:
        folder = fetch_folder(path)
    except OSError as err:
        raise UserError(f"cannot fetch the model folder {display(path)}: {first_line(err)}") from None
    if not any(folder.iterdir()):
        raise UserError(f"model path not found: {display(path)}")
    return str(folder)


def _check_exists(path: str) -> None:
    # A path-looking string that does not exist is a typo, not a hub id: say so instead of a hub 404.
    looks_local = path.startswith((".", "/", "~")) or path.count("/") > 1 or Path(path).suffix
    folder = Path(path).expanduser()
    if looks_local and not folder.exists():
        raise UserError(f"model path not found: {path}")
    if folder.is_dir():
        _check_model_folder(folder)


def _check_model_folder(folder: Path) -> None:
    """Refuse folders transformers would fail on with a confusing message (a slow-tokenizer conversion
    error for an empty folder, a missing-file trace for a folder without weights)."""
    if (folder / ADAPTER_CONFIG).is_file():
        # A LoRA export: its tokenizer is there; the model is its base + adapter (load_causal_lm).
        if not (folder / "adapter_model.safetensors").is_file():
            raise UserError(f"adapter folder {folder} has no adapter_model.safetensors")
        return
    if not (folder / "config.json").is_file():
        gguf = sorted(p.name for p in folder.glob("*.gguf"))
        if gguf:
            raise UserError(
                f"model folder {folder} holds only GGUF weights ({gguf[0]}): convert it to a Hugging Face "
                "folder (config.json + safetensors; transformers reads GGUF: from_pretrained(gguf_file=...))"
            )
        raise UserError(f"model folder {folder} has no config.json: not a Hugging Face model folder")
    if not any(next(folder.glob(pattern), None) for pattern in _WEIGHTS):
        raise UserError(f"model folder {folder} has no weight files (*.safetensors)")


def _from_pretrained(auto: Any, model: ModelConfig, path: str | None, failure: str, errors: Any = OSError):
    """`auto.from_pretrained` of the model's local copy; its errors as one line after `failure`."""
    path = local_model_path(path or model.path)
    _check_exists(path)
    try:
        return auto.from_pretrained(path, trust_remote_code=model.trust_remote_code, revision=model.revision)
    except errors as err:
        raise UserError(f"{failure} {path}: {str(err).splitlines()[0]}") from None


def load_tokenizer(model: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    tokenizer = _from_pretrained(AutoTokenizer, model, path, "cannot load tokenizer from")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_adapter(model: ModelConfig, dtype: torch.dtype, path: str, **placement: Any):
    """Base (as `base_model_name_or_path` names it, with the same safety settings) + the adapter,
    merged into plain weights: callers get an ordinary causal LM, as from a full export."""
    from peft import PeftModel

    folder = Path(path).expanduser()
    base_path = json.loads((folder / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    if not base_path:
        raise UserError(f"adapter folder {path}: {ADAPTER_CONFIG} names no base_model_name_or_path")
    _check_model_folder(folder)
    base = load_causal_lm(model, dtype, base_path, **placement)
    try:
        return PeftModel.from_pretrained(base, folder, is_trainable=False).merge_and_unload()
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the adapter in {path}: {str(err).splitlines()[0]}") from None


def load_causal_lm(model: ModelConfig, dtype: torch.dtype, path: str | None = None, **placement: Any):
    """Load a causal LM for inference or training; under an active HfDeepSpeedConfig it loads sharded.
    A LoRA adapter folder loads as its base with the adapter merged (safetensors only, always).

    `placement`: transformers' device_map / max_memory, to spread one model over several GPUs."""
    from transformers import AutoModelForCausalLM

    flush_denormals()  # the caller computes with it on this thread next (kto_ray/models/denormals.py)
    path = local_model_path(path or model.path)
    if (Path(path).expanduser() / ADAPTER_CONFIG).is_file():
        return _load_adapter(model, dtype, path, **placement)
    _check_exists(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            attn_implementation=attention_kernel(model, path),
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle_weights else True,
            revision=model.revision,
            **placement,
        )
    except OSError as err:
        raise UserError(f"cannot load model from {path}: {str(err).splitlines()[0]}") from None


def load_model_config(model: ModelConfig, path: str | None = None):
    from transformers import AutoConfig

    return _from_pretrained(AutoConfig, model, path, "cannot read the model config of", (OSError, ValueError))


def hidden_size_of(model: ModelConfig, path: str | None = None) -> int | None:
    """The (text) hidden size from the model's config.json, for DeepSpeed's bucket sizes."""
    size = getattr(load_model_config(model, path).get_text_config(), "hidden_size", None)
    return int(size) if size is not None else None


def check_context_length(model: ModelConfig, max_length: int, path: str | None = None) -> None:
    """Refuse a data.max_length the model cannot attend over: positions past its limit are garbage."""
    limit = getattr(load_model_config(model, path).get_text_config(), "max_position_embeddings", None)
    if limit is not None and max_length > int(limit):
        raise UserError(
            f"data.max_length {max_length} is above the model's max_position_embeddings {limit} "
            f"({path or model.path})"
        )


def attention_kernel(model: ModelConfig, path: str) -> str:
    """`model.attn_implementation`, except `sdpa` for a model class without it (Gemma 2: its attention
    logits are soft-capped): that one loads with `eager` and says so once, not with transformers'
    refusal. A class transformers does not map (remote code) keeps the configured kernel."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    if model.attn_implementation != "sdpa":
        return model.attn_implementation
    config = load_model_config(model, path)
    try:
        model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        return model.attn_implementation
    if supports_sdpa(model_class):
        return "sdpa"
    if model_class.__name__ not in _EAGER_WARNED:
        _EAGER_WARNED.add(model_class.__name__)
        warnings.warn(f"{model_class.__name__} has no sdpa attention: loading it with eager", stacklevel=2)
    return "eager"


_EAGER_WARNED: set[str] = set()  # model classes already reported by attention_kernel, per process
