"""LoRA with peft: wrap the policy, and export the adapter (PEFT's format) and, optionally, the merged
model.

The wrapping happens before DeepSpeed initializes the model: under ZeRO-3 the base weights are already
partitioned by zero.Init (peft reads a layer's shape from its in/out features, never from its weight),
and the adapters peft adds are ordinary tensors that deepspeed.initialize converts to ZeRO parameters.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kto_ray.config import KTOConfig, LoraConfig
from kto_ray.rundir import RunDir
from kto_ray.training.distributed import gathered_state


def peft_config(lora: LoraConfig):
    """peft's LoraConfig for the `lora` section (task CAUSAL_LM, so PeftModelForCausalLM)."""
    import peft

    return peft.LoraConfig(
        task_type="CAUSAL_LM",
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=list(lora.modules_to_save) or None,
    )


def wrap_policy(model: torch.nn.Module, cfg: KTOConfig) -> torch.nn.Module:
    """The policy as a PeftModel: base weights frozen, only the adapters (and modules_to_save) train."""
    import peft

    # Seeded alike on every rank, whatever the worker count. fork_rng restores the worker's CPU stream
    # afterwards; seeding only the CPU generator (where peft creates the adapter weights) leaves CUDA's.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(cfg.train.seed)
        return peft.get_peft_model(model, peft_config(cfg.lora))


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the optimizer gets: with LoRA the adapters only, so no optimizer state for frozen weights."""
    return [p for p in model.parameters() if p.requires_grad]


def export_adapter(engine, tokenizer, cfg: KTOConfig, run_dir: RunDir, rank: int) -> None:
    """`<run dir>/final/`: the adapter in PEFT's format (adapter_config.json + adapter_model.safetensors,
    the base recorded as `base_model_name_or_path`) with the tokenizer; with run.merge_lora, also
    `<run dir>/merged/`, the base with the adapter merged, as a plain Hugging Face model. A collective
    (the trainable weights are gathered); rank 0 writes each folder through RunDir.staging."""
    model = engine.module
    state = gathered_state(model, rank, trainable_only=True)  # adapters, modules_to_save
    if rank != 0:
        return
    with run_dir.staging("final") as adapter_dir:
        # save_embedding_layers=False: peft's "auto" would inspect the (partitioned) embedding and the
        # base config; embeddings trained via modules_to_save are saved with the adapter anyway.
        model.save_pretrained(
            adapter_dir, state_dict=state, safe_serialization=True, save_embedding_layers=False
        )
        tokenizer.save_pretrained(adapter_dir)
        if cfg.run.merge_lora:
            with run_dir.staging("merged") as merged_dir:
                export_merged(cfg, adapter_dir, merged_dir, tokenizer)


def export_merged(cfg: KTOConfig, adapter_dir: Path, merged_dir: Path, tokenizer) -> None:
    """Base + adapter merged into plain weights, saved in `merged_dir`. The base is frozen during
    training, so it is read from its files (float32 for the merge, saved in the training dtype) rather
    than gathered from the ranks."""
    from peft import PeftModel

    from kto_ray.models.loading import load_causal_lm, resolve_dtype

    base = load_causal_lm(cfg.model, torch.float32)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    merged = merged.to(resolve_dtype(cfg.model.dtype, cfg.cluster.use_gpu))
    merged.save_pretrained(merged_dir, safe_serialization=True)
    tokenizer.save_pretrained(merged_dir)
