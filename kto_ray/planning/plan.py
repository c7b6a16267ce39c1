"""Memory planner for ZeRO-3 training: does a config fit its GPUs, and with which offload settings?

The architecture is read without weights (config + a model built on the meta device), so planning a
32B model takes a second and needs no GPU. Model-state figures use DeepSpeed's own formulas
(`estimate_zero3_model_states_mem_needs`, zero_init=True because HfDeepSpeedConfig loads under
zero.Init); activations and logits are standard estimates, stated where they are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from kto_ray.config import KTOConfig
from kto_ray.planning.advice import plan_advice
from kto_ray.planning.architecture import Architecture, read_architecture
from kto_ray.planning.host_release import HostRelease, decide_release
from kto_ray.planning.memory import (
    CPU_BASELINE_GIB,
    GIB,
    OVERHEAD_GIB,
    activations_bytes,
    layer_activation_bytes,
    logits_bytes,
    lora_dropout_bytes,
    model_states,
    optimizer_step_bytes,
    zero2_model_states,
)

# Offload settings as DeepSpeed's estimator names them: (label, optimizer on CPU, params on CPU).
SETTINGS = (
    ("no offload", False, False),
    ("optimizer->CPU", True, False),
    ("optimizer+params->CPU", True, True),
)


@dataclass(frozen=True)
class Setting:
    name: str
    offload_optimizer: bool
    offload_params: bool
    gpu_params: float  # bytes per GPU, 16-bit parameter shard
    gpu_optimizer: float  # bytes per GPU, fp32 gradient shard + fp32 master weights + Adam moments
    gpu_buffer: float  # bytes per GPU, the gathered layer (16-bit params + grads)
    gpu_reference: float  # bytes per GPU of the online reference (0 in offline mode)
    gpu_total: float  # model states + reference + activations + logits + overhead
    cpu_per_node: float  # bytes of host memory per node
    fits: bool
    min_gpus: int | None  # fewest GPUs that fit (activations do not shrink with more GPUs: None = never)

    @property
    def gpu_model_states(self) -> float:
        return self.gpu_params + self.gpu_optimizer + self.gpu_buffer


@dataclass(frozen=True)
class StageChoice:
    """What `deepspeed.stage: auto` runs: the fastest setting that fits, and why."""

    stage: int
    offload_optimizer: bool
    offload_params: bool
    reason: str

    @property
    def setting(self) -> str:
        """The name of its offload setting (SETTINGS)."""
        return next(n for n, o, p in SETTINGS if (o, p) == (self.offload_optimizer, self.offload_params))

    @property
    def label(self) -> str:
        return f"ZeRO-{self.stage}" + ("" if self.setting == SETTINGS[0][0] else f" with {self.setting}")


@dataclass(frozen=True)
class Plan:
    model: str
    arch: Architecture
    gpus: int
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    bf16: bool
    seq_len: int
    micro_batch: int
    checkpointing: bool
    activations: float  # bytes per GPU, transformer layers in training
    logits: float  # bytes per GPU, [batch, seq, vocab] tensors of the log-prob computation
    kl_forward: float  # bytes per GPU of the no-grad KL pass (runs before the training forward)
    overhead: float  # GPU: the CUDA/NCCL allowance; CPU workers: the process baseline
    on_gpu: bool
    lora_params: int  # adapter parameters that train (0: full fine-tuning)
    settings: tuple[Setting, ...]
    configured: str
    precompute_gpu: float  # bytes per precompute actor (whole model on one device + its batch)
    precompute_gpus_needed: int | None  # GPUs per actor with the reference spread over them
    precompute_fits: bool
    zero2_model_states: float  # bytes per GPU at ZeRO-2 without offload (DeepSpeed's formula)
    zero2_total: float  # the same plus reference, activations, logits and overhead
    choice: StageChoice  # what deepspeed.stage auto picks
    release: HostRelease  # what cluster.release_host_memory auto picks, at the stage that runs
    advice: list[str]

    def setting(self, name: str) -> Setting:
        return next(s for s in self.settings if s.name == name)


def _precompute_parts(cfg: KTOConfig, arch: Architecture) -> tuple[float, float]:
    """(reference weights, one model batch's activations + logits) of a precompute actor, bytes: it
    holds the whole reference and scores one model batch at a time."""
    on_gpu, seq = cfg.precompute.gpus_per_actor > 0, cfg.data.max_length
    elem = {"float32": 4, "bfloat16": 2, "float16": 2}.get(cfg.precompute.dtype, 2 if on_gpu else 4)
    # Length bucketing caps a model batch at batch_rows rows and (if set) batch_tokens padded tokens.
    tokens = cfg.precompute.batch_rows * seq
    if cfg.precompute.batch_tokens:
        tokens = max(seq, min(tokens, cfg.precompute.batch_tokens))
    chunk = cfg.model.logprob_chunk_tokens
    batch = layer_activation_bytes(arch, tokens, 1, elem) + logits_bytes(arch, tokens, elem == 2, chunk)
    return arch.total_params * elem, batch


def rows_per_forward(cfg: KTOConfig) -> int:
    """Rows of max_length in the largest forward a worker runs: `train.micro_batch_size`, or with a token
    budget (`train.micro_batch_tokens`) as many max-length rows as the budget holds (at least one, at most
    the worker's rows of a step), since a budget micro-batch may take rows of several fixed ones. An
    elastic range at its fewest workers gives each the most rows of the fixed global batch."""
    budget, seq = cfg.train.micro_batch_tokens, cfg.data.max_length
    if budget is None:
        return cfg.train.micro_batch_size
    rows_per_worker = cfg.first_global_batch // cfg.cluster.worker_range[0]
    return max(1, min(rows_per_worker, budget // seq))


def plan(
    cfg: KTOConfig,
    *,
    model_config: str | None = None,
    gpus_per_node: int = 8,
    gpu_memory_gib: float = 80.0,
) -> Plan:
    """Per-GPU memory of `cfg`'s training on cluster.workers GPUs (an elastic range at its minimum: the
    fewest GPUs hold the largest shards) in DeepSpeed's three ZeRO-3 offload
    settings, the fewest GPUs each needs, the precompute actor's memory, and advice."""
    arch = read_architecture(cfg, model_config)
    gpus, budget = cfg.cluster.worker_range[0], gpu_memory_gib * GIB
    bf16 = cfg.cluster.use_gpu if cfg.deepspeed.bf16 == "auto" else bool(cfg.deepspeed.bf16)
    elem = 2 if bf16 else 4
    seq, batch, ckpt = cfg.data.max_length, rows_per_forward(cfg), cfg.deepspeed.gradient_checkpointing
    acts = activations_bytes(arch, seq, batch, elem, ckpt)
    if cfg.lora.enabled and cfg.lora.dropout > 0:
        acts += lora_dropout_bytes(arch, cfg.lora.target_modules, seq * batch, elem, ckpt)
    logits = logits_bytes(arch, seq * batch, bf16, cfg.model.logprob_chunk_tokens)
    # KTO's KL completions: a no-grad forward of the same batch shape, finished (and freed) before the
    # training forward, so it costs inference activations (one layer + logits) and never adds to them.
    kl = layer_activation_bytes(arch, seq, batch, elem) + logits
    overhead = (OVERHEAD_GIB if cfg.cluster.use_gpu else CPU_BASELINE_GIB) * GIB
    # LoRA: the adapters train (their states are sharded like any parameter); the base is frozen.
    lora = cfg.lora
    adapters = arch.lora_params(lora.r, lora.target_modules) if lora.enabled else 0
    trainable = adapters if lora.enabled else None

    # With LoRA and the policy as its own reference, the reference is the policy with adapters off.
    online = cfg.reference.mode == "online" and not (lora.enabled and cfg.reference_path == cfg.model.path)
    settings = []
    for name, opt, params in SETTINGS:
        gpu_params, gpu_opt, buffer, cpu = model_states(
            arch, gpus, gpus_per_node, opt, params, elem, trainable
        )
        # Online reference: a frozen ZeRO-3 copy, its shard (unless offloaded) + one gathered layer.
        ref_shard = elem if online and not params else 0
        ref_fixed = elem * arch.largest_layer_params if online else 0
        ref = ref_shard * arch.total_params / gpus + ref_fixed
        # The optimizer step's transient runs after the backward freed the activations and logits.
        step = optimizer_step_bytes(trainable or arch.total_params, gpus) if elem == 4 and not opt else 0
        working = buffer - step + max(step, acts + logits)
        total = gpu_params + gpu_opt + working + ref + overhead
        # What does not shrink with more GPUs, and the bytes that do.
        fixed = working + ref_fixed + overhead
        sharded = (gpu_params + gpu_opt) * gpus + ref_shard * arch.total_params
        min_gpus = None
        if fixed < budget:
            min_gpus = 1 if sharded == 0 else math.ceil(sharded / (budget - fixed))
        fits = total <= budget
        settings.append(
            Setting(name, opt, params, gpu_params, gpu_opt, buffer, ref, total, cpu, fits, min_gpus)
        )

    ds = cfg.deepspeed
    configured = SETTINGS[2 if ds.offload_params != "none" else int(ds.offload_optimizer != "none")][0]
    zero2 = zero2_model_states(arch, gpus, elem, trainable)
    zero2_ref = elem * arch.total_params if online else 0  # a full frozen copy per GPU
    zero2_total = zero2 + zero2_ref + acts + logits + overhead
    choice = choose_stage(zero2_total, settings, budget, "GPU" if cfg.cluster.use_gpu else "worker")
    if ds.stage == "auto":
        configured = choice.setting
    runs_zero2 = ds.stage == 2 or (ds.stage == "auto" and choice.stage == 2)
    peak = zero2_total if runs_zero2 else next(s.gpu_total for s in settings if s.name == configured)
    release = decide_release(cfg.cluster.use_gpu, peak, budget)
    weights, pre_batch = _precompute_parts(cfg, arch)
    pre = weights + pre_batch + (overhead if cfg.precompute.gpus_per_actor > 0 else 0)
    # Spread over GPUs (device_map), the weights divide; the batch and the overhead sit on each in turn.
    room = budget - pre_batch - overhead
    pre_gpus = math.ceil(weights / room) if room > 0 else None
    advice: list[str] = []
    result = Plan(
        model=cfg.model.path,
        arch=arch,
        gpus=gpus,
        nodes=math.ceil(gpus / gpus_per_node),
        gpus_per_node=gpus_per_node,
        gpu_memory_gib=gpu_memory_gib,
        bf16=bf16,
        seq_len=seq,
        micro_batch=batch,
        checkpointing=ckpt,
        activations=acts,
        logits=logits,
        kl_forward=kl,
        overhead=overhead,
        on_gpu=cfg.cluster.use_gpu,
        lora_params=adapters,
        settings=tuple(settings),
        configured=configured,
        precompute_gpu=pre,
        precompute_gpus_needed=pre_gpus,
        precompute_fits=cfg.precompute.gpus_per_actor == 0
        or (pre_gpus is not None and pre_gpus <= max(1, cfg.precompute.gpus_per_actor)),
        zero2_model_states=zero2,
        zero2_total=zero2_total,
        choice=choice,
        release=release,
        advice=advice,
    )
    advice.extend(plan_advice(cfg, result))
    return result


def choose_stage(zero2_total: float, zero3: list[Setting], budget: float, unit: str = "GPU") -> StageChoice:
    """The fastest setting that fits `budget` bytes per worker: ZeRO-2 (no per-layer parameter gathers:
    1.6x ZeRO-3 at 2 workers, BENCHMARKS.md) when the whole 16-bit model fits each worker beside its
    sharded grads and optimizer states; else ZeRO-3 without offload; else the first offload that fits
    (optimizer first: CPU Adam steps are slow, CPU parameters slower); the most offloaded when none does."""
    gib = f"{budget / GIB:.1f} GiB per {unit}"
    if zero2_total <= budget:
        return StageChoice(
            2, False, False, f"the 16-bit model and its sharded states need {zero2_total / GIB:.1f} of {gib}"
        )
    over = f"ZeRO-2 needs {zero2_total / GIB:.1f} GiB (the whole 16-bit model on each {unit})"
    fitting = next((s for s in zero3 if s.fits), None)
    if fitting is None:
        last = zero3[-1]
        return StageChoice(
            3,
            True,
            True,
            f"{over}; nothing fits {gib} by the plan, the most offloaded needs {last.gpu_total / GIB:.1f}",
        )
    if fitting is zero3[0]:
        return StageChoice(3, False, False, f"{over}; ZeRO-3 needs {fitting.gpu_total / GIB:.1f} of {gib}")
    return StageChoice(
        3,
        fitting.offload_optimizer,
        fitting.offload_params,
        f"{over}; ZeRO-3 without offload {zero3[0].gpu_total / GIB:.1f}, with {fitting.name} "
        f"{fitting.gpu_total / GIB:.1f} of {gib}",
    )
