"""The driver's `auto` memory settings, decided from one plan: `deepspeed.stage` (the planner's fastest
setting that fits each worker's memory, `deepspeed.worker_memory_gib` or the running cluster's) and
`cluster.release_host_memory` (`kto_ray.planning.host_release`). The pick is a pure function of the
architecture, the config and that memory, so a rerun on the same cluster keeps its checkpoints' stage.
"""

from __future__ import annotations

from typing import Any

from kto_ray.config import KTOConfig
from kto_ray.models.loading import local_model_path
from kto_ray.planning.cluster_memory import worker_memory_bytes
from kto_ray.planning.host_release import decide_release
from kto_ray.planning.plan import GIB, Plan, plan
from kto_ray.storage import is_uri


def auto_plan(cfg: KTOConfig) -> Plan | None:
    """The plan both auto settings are decided from (with stage auto, its release is that of the stage
    the plan picks), made once; None when neither needs one."""
    releases_by_plan = cfg.cluster.release_host_memory == "auto" and not cfg.cluster.use_gpu
    if cfg.deepspeed.stage != "auto" and not releases_by_plan:
        return None
    budget = cfg.deepspeed.worker_memory_gib or worker_memory_bytes(cfg) / GIB
    # An object-storage model folder is read from its local copy (the one training loads too).
    architecture = local_model_path(cfg.model.path) if is_uri(cfg.model.path) else None
    return plan(cfg, model_config=architecture, gpu_memory_gib=budget)


def resolve_stage(cfg: KTOConfig, planned: Plan | None = None) -> tuple[KTOConfig, str]:
    """`cfg` with its stage (and offload) decided, and the start line's words for it."""
    ds = cfg.deepspeed
    if ds.stage != "auto":
        return cfg, f"ZeRO-{ds.stage}"
    choice = (planned or auto_plan(cfg)).choice
    offload = {True: "cpu", False: "none"}
    picked = ds.model_copy(
        update={
            "stage": choice.stage,
            "offload_optimizer": offload[choice.offload_optimizer],
            "offload_params": offload[choice.offload_params],
        }
    )
    return cfg.model_copy(update={"deepspeed": picked}), f"{choice.label} (stage auto: {choice.reason})"


def resolve_release(cfg: KTOConfig, planned: Plan | None = None) -> tuple[KTOConfig, str]:
    """`cfg` with release_host_memory decided (from `planned`, the plan of the stage that runs), and the
    start line's words for it: said only when auto turns it on (it slows the steps)."""
    if cfg.cluster.release_host_memory != "auto":
        return cfg, ""
    on_gpu = cfg.cluster.use_gpu
    release = decide_release(True, 0.0, 1.0) if on_gpu else (planned or auto_plan(cfg)).release
    cluster = cfg.cluster.model_copy(update={"release_host_memory": release.on})
    words = f", host memory released (auto: {release.reason})" if release.on else ""
    return cfg.model_copy(update={"cluster": cluster}), words


def stage_of_checkpoint(cfg: KTOConfig, checkpoint: str, run_state: dict[str, Any]) -> KTOConfig:
    """`deepspeed.stage: auto` on a resume: the stage (and offload) `checkpoint` was written in, which its
    shards need, whatever the planner would pick on today's cluster (the driver records the stage that
    ran in the run state)."""
    written = run_state["config"]["deepspeed"]
    if written["stage"] == "auto":  # not resolved in the state: nothing to keep
        return cfg
    kept = {key: written[key] for key in ("stage", "offload_optimizer", "offload_params")}
    print(
        f"deepspeed.stage: auto keeps ZeRO-{kept['stage']}, the stage {checkpoint} was written in", flush=True
    )
    return cfg.model_copy(update={"deepspeed": cfg.deepspeed.model_copy(update=kept)})
