"""What `kto-ray plan` says about a plan: its advice and the printed table (planning/plan.py computes it)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from kto_ray.config import KTOConfig
from kto_ray.planning.memory import CPU_BASELINE_GIB, GIB, OVERHEAD_GIB

if TYPE_CHECKING:
    from kto_ray.planning.plan import Plan


def _nodes(gpus: int, per_node: int) -> str:
    nodes = math.ceil(gpus / per_node)
    return f"{gpus} GPU{'s' if gpus > 1 else ''} ({nodes} node{'s' if nodes > 1 else ''} of {per_node})"


def _count(n: float) -> str:
    return next(
        f"{n / d:.2f}{u}" for d, u in ((1e9, "B"), (1e6, "M"), (1e3, "K"), (1, "")) if n >= d or d == 1
    )


def plan_advice(cfg: KTOConfig, p: Plan) -> list[str]:
    """What `kto-ray plan` advises about `p`: the stage auto picks, offload, LoRA, the cluster."""
    ds, out = cfg.deepspeed, []
    if ds.stage == "auto":
        out.append(f"deepspeed.stage auto picks {p.choice.label}: {p.choice.reason}")
    elif ds.stage != 3:
        out.append(f"deepspeed.stage is {ds.stage}: these are ZeRO-3 figures")
    if not cfg.cluster.use_gpu:
        out.append(
            "cluster.use_gpu is false: read 'per GPU' as per worker process (CPU RAM, peak RSS); on GPUs "
            f"the {OVERHEAD_GIB:g} GiB CUDA/NCCL allowance replaces the {CPU_BASELINE_GIB:g} GiB baseline"
        )
        release = cfg.cluster.release_host_memory
        if release == "auto":
            out.append(
                f"cluster.release_host_memory auto is {'on' if p.release.on else 'off'}: {p.release.reason}"
            )
        elif release is False and p.release.on:
            # Measured (BENCHMARKS.md section 12): glibc keeps freed gathers and activations on its heap.
            out.append(
                f"CPU workers keep freed memory on glibc's heap, so they may peak above this plan "
                f"({p.release.reason}): cluster.release_host_memory: true holds them to it, at ~1.5x the "
                "step time"
            )
    if p.lora_params:
        out.append(
            f"LoRA: {_count(p.lora_params)} adapter params train (states sharded); the base is frozen "
            "(its shard only)"
        )
    if ds.offload_params != "none" and ds.offload_optimizer == "none":
        out.append("offload_params without offload_optimizer: estimated as optimizer+params offload")
    mine, cluster = p.setting(p.configured), _nodes(p.gpus, p.gpus_per_node)
    fit = "fits" if mine.fits else "does NOT fit"
    if ds.stage == "auto" and p.choice.stage == 2:
        out.append(f"as configured (ZeRO-2, {cluster}): {p.zero2_total / GIB:.1f} GiB per GPU, fits")
    else:
        out.append(
            f"as configured ({p.configured}, {cluster}): {mine.gpu_total / GIB:.1f} GiB per GPU, {fit}"
        )
    first = next((s for s in p.settings if s.fits), None)
    if first is None:
        ckpt = "" if p.checkpointing else ", enable deepspeed.gradient_checkpointing"
        out.append(f"fits in no offload setting: add GPUs, lower train.micro_batch_size or max_length{ckpt}")
    elif first is p.settings[0]:
        out.append(f"fits without offload on {p.gpus} GPUs: the fastest setting")
    else:
        out.append(
            f"needs {first.name} on {p.gpus} GPUs ({first.cpu_per_node / GIB:.0f} GiB CPU RAM per node)"
        )
    if ds.stage == 3 and p.zero2_total <= p.gpu_memory_gib * GIB:
        out.append(
            f"deepspeed.stage 2 also fits ({p.zero2_total / GIB:.1f} GiB per GPU) and skips ZeRO-3's "
            "per-layer parameter gathers: faster where memory allows (BENCHMARKS.md)"
        )
    if p.settings[0].min_gpus is not None:
        out.append(f"smallest cluster without offload: {_nodes(p.settings[0].min_gpus, p.gpus_per_node)}")
    if not p.checkpointing and p.activations > 0.25 * p.gpu_memory_gib * GIB:
        out.append("large activations: deepspeed.gradient_checkpointing saves most for ~30% more compute")
    if cfg.precompute.gpus_per_actor == 0:
        out.append(f"precompute and evaluate on CPU: ~{p.precompute_gpu / GIB:.0f} GiB of RAM per actor")
    else:
        fit = "fits" if p.precompute_fits else "does NOT fit"
        # evaluate and --generate run the same actors on the trained model (same architecture)
        whole = f"{p.precompute_gpu / GIB:.1f} GiB, {fit}"
        out.append(f"precompute / evaluate actor (whole model + one batch): {whole}")
        if p.precompute_gpus_needed is None:
            out.append(
                "precompute: one model batch alone exceeds a GPU: lower precompute.batch_rows/batch_tokens"
            )
        elif p.precompute_gpus_needed > max(1, cfg.precompute.gpus_per_actor):
            n = p.precompute_gpus_needed
            out.append(
                f"precompute and evaluate need {n} GPUs per actor: set precompute.gpus_per_actor: {n} (the "
                f"model is spread over them), or lower precompute.batch_rows/batch_tokens"
            )
    return out


def format_plan(p: Plan) -> str:
    """A table: rows are memory components, columns DeepSpeed's three offload settings; then advice."""
    a, st = p.arch, p.settings
    rows = [
        ("16-bit parameter shard", [s.gpu_params for s in st]),
        ("fp32 grads + Adam shard", [s.gpu_optimizer for s in st]),
        ("gathered largest layer", [s.gpu_buffer for s in st]),
        ("= model states (DeepSpeed)", [s.gpu_model_states for s in st]),
        ("online reference", [s.gpu_reference for s in st]),
        ("activations (layers)", [p.activations] * 3),
        ("logits (log-probs)", [p.logits] * 3),
        ("CUDA/NCCL/buckets overhead" if p.on_gpu else "worker process baseline", [p.overhead] * 3),
        ("= total per GPU", [s.gpu_total for s in st]),
        ("CPU RAM per node", [s.cpu_per_node for s in st]),
    ]
    moe = (
        f"; MoE: {a.experts} experts, {a.experts_per_token} per token, experts {_count(a.expert_params)} "
        "of the params (all stored and partitioned)"
        if a.experts
        else ""
    )
    lines = [
        f"model {p.model} ({a.model_type}): {_count(a.total_params)} params, largest layer "
        f"{_count(a.largest_layer_params)}; hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}",
        f"total params {_count(a.total_params)}, active {_count(a.active_params)}: training "
        f"~{a.training_flops_per_token / 1e9:.1f} GFLOP per token (6 x active){moe}",
        f"cluster {_nodes(p.gpus, p.gpus_per_node)}, {p.gpu_memory_gib:g} GiB each; "
        f"{'bf16' if p.bf16 else 'fp32'}, max_length {p.seq_len}, micro-batch {p.micro_batch}, "
        f"gradient checkpointing {'on' if p.checkpointing else 'off'}",
        "",
        f"{'GiB':<30}" + "".join(f"{s.name:>23}" for s in st),
        *(f"{label:<30}" + "".join(f"{v / GIB:>23.2f}" for v in values) for label, values in rows),
        f"{'fits in ' + format(p.gpu_memory_gib, 'g') + ' GiB':<30}"
        + "".join(f"{'yes' if s.fits else 'no':>23}" for s in st),
        f"{'fewest GPUs that fit':<30}" + "".join(f"{s.min_gpus or '-':>23}" for s in st),
        f"KL pass (no grad, done before the training forward, not additive): {p.kl_forward / GIB:.2f} GiB",
        f"ZeRO-2 without offload (all 16-bit params on every GPU): {p.zero2_total / GIB:.2f} GiB per GPU",
        f"fastest that fits (deepspeed.stage: auto): {p.choice.label}: {p.choice.reason}",
        "",
        *(f"- {line}" for line in p.advice),
    ]
    return "\n".join(lines)
