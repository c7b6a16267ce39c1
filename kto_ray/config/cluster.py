"""Where a run trains: the Ray workers and DeepSpeed."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from kto_ray.config.section import Section


class WorkerRange(Section):
    min: int = Field(description="Fewest workers the run goes on with.")
    max: int = Field(description="Most workers; the global batch is sized for these.")


def _worker_count(value: Any) -> int | WorkerRange:
    """`cluster.workers` as written: n, [min, max] or {min: .., max: ..}, 1 <= min <= max."""
    bounds = None
    if isinstance(value, WorkerRange):
        bounds = (value.min, value.max)
    elif isinstance(value, int) and not isinstance(value, bool):
        bounds = (value, value)
    elif isinstance(value, list | tuple) and len(value) == 2:
        bounds = tuple(value)
    elif isinstance(value, dict) and set(value) == {"min", "max"}:
        bounds = (value["min"], value["max"])
    if (
        bounds is None
        or not all(isinstance(b, int) and not isinstance(b, bool) for b in bounds)
        or not 1 <= bounds[0] <= bounds[1]
    ):
        raise ValueError("expected a worker count n, [min, max] or {min: .., max: ..} with 1 <= min <= max")
    return value if isinstance(value, int) else WorkerRange(min=bounds[0], max=bounds[1])


class ClusterConfig(Section):
    workers: Annotated[int | WorkerRange, BeforeValidator(_worker_count)] = Field(
        2,
        description="Ray Train workers (one per GPU on GPU clusters): a count, or a range [min, max] "
        "(also {min: .., max: ..}) for an elastic worker group. The global batch (rows per optimizer "
        "step) is train.global_batch_size (null: max x train.micro_batch_size), fixed at the run's "
        "first start; on W workers, accumulation is global / (W x micro-batch).",
    )
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(
        0.5, gt=0.0, description="CPUs per worker; fractional on small CPU boxes so Ray Data is not starved."
    )
    address: str | None = Field(None, description="Ray address; null starts or joins a local Ray.")
    release_host_memory: bool | Literal["auto"] = Field(
        "auto",
        description="Workers hand freed host memory back to the OS (glibc's mmap threshold fixed at 1 MiB, "
        "malloc_trim after each step): CPU workers peak 7-11% lower, but their steps ran 1.5x slower "
        "(every large tensor is a fresh mmap). auto: on for CPU workers whose planned peak is above 80% "
        "of their share of the nodes' RAM (the driver decides with the memory planner, as for "
        "deepspeed.stage auto, and the start line says which), off on GPU workers (they gain little).",
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="How Ray places the workers' bundles: PACK fills nodes first (fewest cross-node "
        "links); STRICT_SPREAD puts every worker on a different node.",
    )
    worker_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each worker asks for besides its CPUs and GPU, e.g. {slot: 1} on "
        "nodes started with --resources='{\"slot\": 1}' for one worker per node. An elastic range counts "
        "the workers each node holds from these asks (placement_strategy is not consulted there).",
    )
    resize_interval_s: float = Field(
        60.0,
        gt=0,
        description="With a worker range: how often Ray Train checks whether a healthy group can grow "
        "(a lost worker restarts the group at once, on the workers that remain).",
    )

    @property
    def worker_range(self) -> tuple[int, int]:
        """(fewest, most) workers: (n, n) for a fixed count."""
        if isinstance(self.workers, WorkerRange):
            return self.workers.min, self.workers.max
        return self.workers, self.workers

    @property
    def worker_bundle(self) -> dict[str, float]:
        """The Ray resources one worker asks for."""
        gpu = {"GPU": 1.0} if self.use_gpu else {}
        return {"CPU": self.cpus_per_worker} | gpu | self.worker_resources


# The DeepSpeed keys kto-ray derives, and the setting each comes from (deepspeed.config refuses them).
DEEPSPEED_KEY_OWNERS = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (workers x train.micro_batch_size)",
    "gradient_clipping": "train.max_grad_norm",
    "bf16": "deepspeed.bf16",
    "fp16": "deepspeed.bf16 (fp16 is not supported)",
    "optimizer": "train.lr, train.adam_betas, train.weight_decay",
    "scheduler": "train.schedule, train.warmup_ratio",
    "zero_optimization.stage": "deepspeed.stage",
    "zero_optimization.offload_optimizer": "deepspeed.offload_optimizer",
    "zero_optimization.offload_param": "deepspeed.offload_params",
}
DERIVED_DEEPSPEED_KEYS = [k for k in DEEPSPEED_KEY_OWNERS if "." not in k]
DERIVED_ZERO_KEYS = [k.split(".", 1)[1] for k in DEEPSPEED_KEY_OWNERS if k.startswith("zero_optimization.")]


class DeepSpeedConfig(Section):
    stage: Literal[0, 1, 2, 3, "auto"] = Field(
        "auto",
        description="ZeRO stage; auto = the planner's fastest setting that fits each worker's memory: "
        "ZeRO-2, else ZeRO-3, else ZeRO-3 with offload (the start line says which and why).",
    )
    offload_optimizer: Literal["none", "cpu", "nvme"] = Field("none", description="Optimizer offload.")
    offload_params: Literal["none", "cpu", "nvme"] = Field("none", description="Parameter offload (stage 3).")
    nvme_path: str = Field("/local_nvme", description="Folder for NVMe offload.")
    bf16: bool | Literal["auto"] = Field("auto", description="bf16 mixed precision; auto = on with GPUs.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in backward.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="DeepSpeed's own settings, merged last over the config kto-ray builds (mappings "
        "merge key by key), e.g. {zero_optimization: {reduce_bucket_size: 500000000}}. kto-ray sets "
        "ZeRO's reduce_bucket_size (hidden_size^2), stage3_prefetch_bucket_size (0.9 x hidden_size^2) "
        "and stage3_param_persistence_threshold (10 x hidden_size) as transformers does. Keys kto-ray "
        "derives from its own settings are refused, naming the setting: the batch sizes, "
        "zero_optimization.stage and the offloads, bf16/fp16, gradient_clipping, optimizer, scheduler.",
    )
    worker_memory_gib: float | None = Field(
        None,
        gt=0,
        description="GiB per worker that stage auto plans against; null = read from the cluster: one GPU's "
        "memory, or on CPU workers the cluster's RAM divided by cluster.workers.",
    )

    @field_validator("config")
    @classmethod
    def _no_derived_keys(cls, value: dict[str, Any]) -> dict[str, Any]:
        zero = value.get("zero_optimization", {})
        found = [k for k in DERIVED_DEEPSPEED_KEYS if k in value] + [
            f"zero_optimization.{k}" for k in DERIVED_ZERO_KEYS if isinstance(zero, dict) and k in zero
        ]
        if found:
            owners = "; ".join(f"{key}: {DEEPSPEED_KEY_OWNERS[key]}" for key in found)
            raise ValueError(f"kto-ray sets these from its own settings ({owners})")
        return value

    @model_validator(mode="after")
    def _auto_picks_the_offload(self) -> DeepSpeedConfig:
        if self.stage == "auto" and (self.offload_optimizer, self.offload_params) != ("none", "none"):
            raise ValueError(
                "deepspeed.stage auto picks the offload too: leave offload_optimizer and offload_params "
                "at none (or set the stage)"
            )
        return self
