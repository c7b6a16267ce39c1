"""Typed run configuration: one pydantic model per concern, loaded from YAML, unknown keys refused.

Every field carries its default and a description; `kto-ray <cmd> --config X --set a.b=v` applies
overrides parsed as YAML scalars, so `--set train.beta=0.2` is a float like it would be in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from kto_ray.errors import UserError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="Seeded fraction held out as 'eval'.")
    seed: int = Field(0, description="Seed of the shuffle that fixes the KL pairing and the eval split.")
    pairing: Literal["shuffle", "stream"] = Field(
        "stream",
        description="How KL pairs and the eval split are drawn. shuffle: from a seeded shuffle of all rows "
        "(exact eval_fraction; any new row redraws them all). stream: each row's split from a seeded hash "
        "of its content and its KL partner from the rows before it, so new rows at the end of the data "
        "leave the others as they were and `kto-ray precompute` appends them to the store.",
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


class TrainConfig(Section):
    beta: float = Field(0.1, gt=0.0, description="KTO beta: scale of the implied reward.")
    desirable_weight: float | Literal["auto"] = Field(
        "auto", description="lambda_D; auto sets it so lambda_D n_D / (lambda_U n_U) = 1 from the store."
    )
    undesirable_weight: float = Field(1.0, gt=0.0, description="lambda_U.")
    lr: float = Field(5e-6, gt=0.0, description="Peak AdamW learning rate (the paper's 5e-6).")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    schedule: Literal["constant", "cosine"] = Field("cosine", description="LR after warmup.")
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Fraction of steps of linear warmup.")
    micro_batch_size: int = Field(4, ge=1, description="Rows per worker per forward/backward.")
    global_batch_size: int | None = Field(
        None,
        ge=1,
        description="Rows per optimizer step over all workers: the run's contract, fixed at its first "
        "start (a resume that changes it is refused). On W workers each accumulates "
        "global_batch_size / (W x micro_batch_size) micro-batches per step, so W x micro_batch_size must "
        "divide it for every W of cluster.workers. null: the most workers x micro_batch_size (no "
        "accumulation at the most workers); a resume keeps the run's.",
    )
    micro_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Token budget per forward: a worker's rows of a step (global_batch_size / "
        "workers, the global batch unchanged) are re-cut, longest first, into micro-batches of "
        "at most this many tokens (padded: rows x longest; packed_batches: their sum); a longer row runs "
        "alone, and ranks with fewer run masked dummies. The step's loss and gradient are unchanged "
        "(an MoE router_aux_loss, taken per forward, depends on the cut as on micro_batch_size). "
        "`kto-ray plan` plans its largest forward: budget // max_length rows of max_length. "
        "null: micro_batch_size rows per forward.",
    )
    epochs: int = Field(1, ge=1, description="Passes over the train split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    seed: int = Field(42, description="Seed of the per-epoch shuffle and of the workers' RNGs.")
    group_by_length: bool = Field(
        True,
        description=(
            "Fill each step with rows of similar length, drawn from a window of 64 shuffled steps: "
            "little padding on length-skewed data (faster), but a step's rows are no longer a uniform "
            "sample, so rewards, z0 and the label mix vary more from step to step."
        ),
    )
    loss: Literal["kto", "apo_zero_unpaired"] = Field(
        "kto",
        description="The objective. kto = the paper's: z0 = max(0, mean policy/reference log-ratio of "
        "the step's KL pairs) over the global batch. apo_zero_unpaired = z0 fixed at 0 and the KL "
        "forward skipped (TRL's loss_type of that name): another objective, faster, equal to KTO's only "
        "while that mean is negative. Eval and `kto-ray evaluate` estimate z0 either way.",
    )
    router_aux_loss: bool = Field(
        True,
        description="MoE models whose config sets output_router_logits: add router_aux_loss_coef x the "
        "router's load-balancing loss (transformers' own function for the family) to the policy pass, "
        "logged as aux_loss in metrics.jsonl, as TRL does. false: train on the KTO loss alone.",
    )
    log_every: int = Field(1, ge=1, description="Print a progress line every this many steps.")
    eval_every: int | None = Field(
        None,
        ge=1,
        description="Every this many steps (and after the last), all ranks compute `kto-ray evaluate`'s "
        "metrics on the store's eval split (z0 over the whole split); logged as eval/... "
        "in metrics.jsonl. null: no evaluation during training.",
    )
    eval_at_end: bool = Field(
        False,
        description="Evaluate on the store's eval split after the last step even with eval_every null "
        "(one eval/... record, on the last step's line). `kto-ray sweep` sets it on every trial, so its "
        "table ranks trials that set no eval_every.",
    )

    @property
    def evaluates(self) -> bool:
        """Whether the run evaluates at all (the driver then ships the eval split to the workers)."""
        return self.eval_every is not None or self.eval_at_end

    def evaluates_after(self, done: int, total_steps: int) -> bool:
        """Whether the workers evaluate after optimizer step `done` (1-based) of `total_steps`."""
        if done == total_steps:
            return self.evaluates
        return self.eval_every is not None and done % self.eval_every == 0


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all the weights.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32.0, gt=0.0, description="LoRA alpha: the adapter's output is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names (or suffixes) that get adapters; all-linear = every linear layer but "
        "the output head, as peft defines it.",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. [lm_head, embed_tokens]).",
    )


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


class RunConfig(Section):
    name: str = Field("demo", description="Run name; rerunning with the same name resumes.")
    dir: str = Field(
        "runs",
        description="Parent of run dirs: a local or mounted folder, or an s3:// / gs:// URI (multi-node "
        "clusters need one every node reaches: object storage or a shared mount).",
    )
    checkpoint_every: int = Field(50, ge=1, description="Checkpoint every this many optimizer steps.")
    max_failures: int = Field(
        0, ge=-1, description="Worker-group restarts from the last checkpoint (-1: no limit)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept on storage.")
    scratch_dir: str | None = Field(
        None,
        description="Local folder on each node where a checkpoint saved by a different number of workers "
        "is reshaped before it loads (DeepSpeed's universal checkpoint: up to about twice the checkpoint's "
        "size while converting, removed after the load); null: the node's temp dir.",
    )
    export: bool = Field(True, description="Save the trained model to <run dir>/final/ in safetensors.")
    merge_lora: bool = Field(
        False,
        description="With lora.enabled: also save the base with the adapter merged, to <run dir>/merged/.",
    )
    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Live experiment trackers rank 0 logs every step to (optional extras: pip install "
        "kto-ray[tensorboard|mlflow|wandb]). TensorBoard writes to <run dir>/tensorboard; MLflow and "
        "W&B read their usual environment (MLFLOW_TRACKING_URI, WANDB_PROJECT, WANDB_MODE, ...).",
    )

    @model_validator(mode="after")
    def _tensorboard_needs_a_folder(self) -> RunConfig:
        if "://" in self.dir and "tensorboard" in self.report_to:
            raise ValueError(
                "run.report_to: tensorboard writes event files to a local folder and run.dir is a URI: "
                "use mlflow or wandb, or `kto-ray report --tensorboard DIR` after the run"
            )
        return self


class KTOConfig(Section):
    model: ModelConfig = Field(default_factory=ModelConfig)
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    precompute: PrecomputeConfig = Field(default_factory=PrecomputeConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @property
    def reference_path(self) -> str:
        return self.reference.path or self.model.path


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"--set {dotted}: '{key}' is not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set expects key.sub=value, got '{item}'")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise UserError(f"--set {key}: cannot parse value '{raw}': {err}") from None
    return key.strip(), value


def describe_invalid(err: ValidationError, source: str) -> str:
    """A pydantic error as the one line a user reads: the first problem, where it is and what was given."""
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{source}: unknown key '{where}'"
    return f"{source}: {where}: {first['msg']} (got {first.get('input')!r})"


def config_from_dict(tree: dict[str, Any], source: str = "config") -> KTOConfig:
    try:
        return KTOConfig.model_validate(tree)
    except ValidationError as err:
        raise UserError(describe_invalid(err, source)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> KTOConfig:
    """Read YAML (or the defaults when path is None), apply `key.sub=value` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise UserError(f"config file not found: {path}")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(f"{path}: invalid YAML: {str(err).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return config_from_dict(tree, source)


def dump_config(cfg: KTOConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def with_absolute_paths(cfg: KTOConfig) -> KTOConfig:
    """Copy of `cfg` whose existing local paths are absolute: Ray workers may not share our cwd."""

    def absolute(path: str | None) -> str | None:
        if path is None or "://" in path:
            return path
        return str(Path(path).expanduser().absolute()) if Path(path).expanduser().exists() else path

    out = cfg.model_copy(deep=True)
    out.model.path = absolute(cfg.model.path)
    out.reference.path = absolute(cfg.reference.path)
    out.data.paths = [absolute(p) for p in cfg.data.paths]
    out.store.path = str(Path(cfg.store.path).absolute()) if "://" not in cfg.store.path else cfg.store.path
    out.run.dir = str(Path(cfg.run.dir).absolute()) if "://" not in cfg.run.dir else cfg.run.dir
    return out
