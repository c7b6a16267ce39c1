"""How a run trains and where it writes: the objective and its schedule, LoRA, the run dir."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kto_ray.config.section import Section


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
