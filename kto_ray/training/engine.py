"""DeepSpeed on a Ray Train worker: the config, the sharded policy (and frozen reference), the export."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from kto_ray.config import KTOConfig
from kto_ray.internals.torch_private import set_reported_lr
from kto_ray.models.loading import hidden_size_of, load_causal_lm, resolve_dtype
from kto_ray.models.logprobs import sequence_logps
from kto_ray.models.moe import mark_expert_blocks_as_z3_leaves
from kto_ray.planning.memory import SUB_GROUP_ELEMENTS
from kto_ray.rundir import RunDir
from kto_ray.training.distributed import gathered_state
from kto_ray.training.lora import (
    export_adapter,
    trainable_parameters,
    wrap_policy,
)
from kto_ray.training.step import ReferenceFn


def _offload(device: str, nvme_path: str) -> dict[str, Any]:
    return {"device": device, "pin_memory": True} | ({"nvme_path": nvme_path} if device == "nvme" else {})


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` on top, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        both_mappings = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both_mappings else value
    return out


def deepspeed_config(
    cfg: KTOConfig,
    world_size: int,
    train: bool = True,
    hidden_size: int | None = None,
    accumulation: int = 1,
) -> dict[str, Any]:
    """The DeepSpeed config of a worker, deepspeed.config merged last; `hidden_size` sizes the buckets,
    `accumulation` is the micro-batches per optimizer step on `world_size` workers
    (global_batch.accumulation)."""
    ds = cfg.deepspeed
    bf16 = cfg.cluster.use_gpu if ds.bf16 == "auto" else ds.bf16
    zero: dict[str, Any] = {
        "stage": ds.stage,
        "contiguous_gradients": True,
        "overlap_comm": cfg.cluster.use_gpu,
    }
    # Bucket and persistence sizes from the hidden size, the way transformers' DeepSpeed integration
    # fills its "auto" values (DeepSpeed's defaults without one); deepspeed.config may replace them.
    if hidden_size is not None:
        zero["reduce_bucket_size"] = hidden_size * hidden_size
    if ds.stage == 3:
        if hidden_size is not None:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden_size * hidden_size)
            zero["stage3_param_persistence_threshold"] = 10 * hidden_size
        zero["stage3_gather_16bit_weights_on_model_save"] = False
        # The step's flattened fp32 gradients: one sub-group at a time, not the whole partition.
        zero["sub_group_size"] = SUB_GROUP_ELEMENTS
        if ds.offload_params != "none":
            zero["offload_param"] = _offload(ds.offload_params, ds.nvme_path)
    micro = cfg.train.micro_batch_size
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro * accumulation * world_size,
        "gradient_clipping": cfg.train.max_grad_norm,
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": zero,
        # A client torch AdamW on CPU boxes; DeepSpeed's own (CPU Adam) only when it offloads.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if ds.offload_optimizer != "none" and train:
        zero["offload_optimizer"] = _offload(ds.offload_optimizer, ds.nvme_path)
        adam = {
            "lr": cfg.train.lr,
            "betas": list(cfg.train.adam_betas),
            "weight_decay": cfg.train.weight_decay,
        }
        config["optimizer"] = {"type": "AdamW", "params": adam}
    return _merged(config, ds.config)


def lr_lambda(cfg: KTOConfig, total_steps: int):
    """Linear warmup, then constant or cosine decay to 0 (multiplier of the peak LR)."""
    warmup = math.ceil(cfg.train.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def refresh_optimizer_settings(engine, cfg: KTOConfig) -> None:
    """After a restore: the optimizer's hyperparameters and the scheduler's base rate come back from
    the checkpoint, and the rate of the next step is the old schedule's. Set them from `cfg` (the
    scheduler's own lambda is this start's, for this start's total steps), so a changed train.lr,
    schedule, warmup, weight decay, betas or run length takes effect from the first resumed step."""
    scheduler = engine.lr_scheduler
    scheduler.base_lrs = [cfg.train.lr for _ in scheduler.base_lrs]
    rates = [
        base * factor(scheduler.last_epoch) for base, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas)
    ]
    for group, rate in zip(scheduler.optimizer.param_groups, rates):
        group.update(lr=rate, weight_decay=cfg.train.weight_decay, betas=tuple(cfg.train.adam_betas))
    set_reported_lr(scheduler, rates)  # the rates the scheduler reports until its next step


def disable_dropout(model: torch.nn.Module) -> None:
    """Dropout off in the model's own layers (GPT-2 ships with 0.1), as TRL's `disable_dropout` does:
    the policy's training forward must score as the reference did in eval mode, or the log-ratios,
    rewards and z0 carry dropout noise (at step 1, policy == reference, the rewards would not be 0)."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def build_policy_engine(cfg: KTOConfig, ds_config: dict[str, Any], total_steps: int):
    """Load the policy sharded (zero.Init via HfDeepSpeedConfig when stage 3) and wrap it in an engine."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = load_causal_lm(cfg.model, resolve_dtype(cfg.model.dtype, cfg.cluster.use_gpu))
    disable_dropout(model)  # before LoRA: lora.dropout, the adapters' own, stays as configured
    if cfg.lora.enabled:
        model = wrap_policy(model, cfg)  # under ZeRO-3: around the partitioned base, see lora.py
    if cfg.deepspeed.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if ds_config["zero_optimization"]["stage"] == 3:
        mark_expert_blocks_as_z3_leaves(model)  # MoE: the same gathers on every rank (models/moe.py)
    # Only what trains gets optimizer state: all the weights, or with LoRA the adapters alone.
    params = trainable_parameters(model)
    optimizer = None
    if "optimizer" not in ds_config:
        optimizer = torch.optim.AdamW(
            params,
            lr=cfg.train.lr,
            betas=cfg.train.adam_betas,
            weight_decay=cfg.train.weight_decay,
        )
    engine, *_ = deepspeed.initialize(
        model=model,
        model_parameters=params if optimizer is None else None,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total_steps)),
        config=ds_config,
    )
    del keep_alive
    return engine


def build_reference_engine(cfg: KTOConfig, world_size: int, hidden_size: int | None = None):
    """Frozen reference for `reference.mode: online`: ZeRO-3 inference, no optimizer state."""
    import deepspeed
    from transformers.integrations import HfDeepSpeedConfig

    ds_config = deepspeed_config(cfg, world_size, train=False, hidden_size=hidden_size)
    keep_alive = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    model = load_causal_lm(cfg.model, resolve_dtype(cfg.model.dtype, cfg.cluster.use_gpu), cfg.reference_path)
    model.requires_grad_(False)
    if ds_config["zero_optimization"]["stage"] != 3:
        return model.to(torch.device("cuda") if cfg.cluster.use_gpu else torch.device("cpu")).eval()
    ds_config["zero_optimization"].pop("offload_optimizer", None)
    mark_expert_blocks_as_z3_leaves(model)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config)
    engine.eval()
    del keep_alive
    return engine.module


def online_reference(cfg: KTOConfig, engine, world_size: int) -> ReferenceFn | None:
    """The reference of `reference.mode: online` (None offline: the store has its log-probs). With
    LoRA and the policy's own initial weights as the reference, it is the policy with its adapters
    disabled, so no reference model is built; otherwise a frozen copy of the reference weights."""
    if cfg.reference.mode != "online":
        return None
    if cfg.lora.enabled and cfg.reference_path == cfg.model.path:
        ref_model, disabled = engine.module, engine.module.disable_adapter
    else:
        hidden_size = hidden_size_of(cfg.model, cfg.reference_path)
        ref_model, disabled = build_reference_engine(cfg, world_size, hidden_size), contextlib.nullcontext
    chunk = cfg.model.logprob_chunk_tokens

    def reference(mb):
        # A fixed function of the reference weights: no gradient, no adapter dropout.
        with torch.no_grad(), disabled():
            return sequence_logps(ref_model, mb.policy, chunk), sequence_logps(ref_model, mb.kl, chunk)

    return reference


def export_final(engine, tokenizer, cfg: KTOConfig, rank: int) -> None:
    """`<run dir>/final/`: the full model as a Hugging Face model in safetensors, or with LoRA the adapter
    (and `merged/` with run.merge_lora). A collective: every rank calls it; rank 0 writes."""
    run_dir = RunDir.of(cfg)
    if cfg.lora.enabled:  # not an isinstance check: importing peft costs ~110 MiB per worker
        export_adapter(engine, tokenizer, cfg, run_dir, rank)
        return
    state = gathered_state(engine.module, rank)
    if rank == 0:
        with run_dir.staging("final") as staged:  # published whole
            engine.module.save_pretrained(staged, state_dict=state, safe_serialization=True)
            tokenizer.save_pretrained(staged)
