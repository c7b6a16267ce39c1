"""`cluster.release_host_memory: auto`: whether CPU workers hand freed host memory back to the OS.

Releasing (`training/host_memory.py`) holds a CPU worker to the plan, but its steps ran 1.5x slower; glibc
keeping freed ZeRO-3 gathers and activations on its heap put peaks ~270-290 MiB higher, growing step to
step, and a 630M full fine-tune (plan 9.7 GiB per worker) ran out of memory at its third step without it
(docs/benchmarks/worker-memory-2026-12-01.md). So it is on only where the plan leaves little room for
that: a planned peak above NEAR_RAM of the worker's memory (a judgement, not a measured edge). GPU
workers hold their model states in GPU memory and gain little. One decision, used by the driver
(`resolve_release`) and `kto-ray plan`'s advice.
"""

from __future__ import annotations

from dataclasses import dataclass

from kto_ray.config import KTOConfig
from kto_ray.planning.cluster_memory import worker_memory_bytes
from kto_ray.planning.memory import GIB

# The share of a CPU worker's memory above which its planned peak is near it: the heap's growth
# (hundreds of MiB per worker, more on larger models) may then take it over.
NEAR_RAM = 0.8


@dataclass(frozen=True)
class HostRelease:
    on: bool
    reason: str


def decide_release(on_gpu: bool, planned_peak: float, worker_memory: float) -> HostRelease:
    """`auto`'s pick for workers whose plan peaks at `planned_peak` bytes of `worker_memory` each."""
    if on_gpu:
        return HostRelease(False, "GPU workers gain little")
    share = planned_peak / worker_memory
    near = share > NEAR_RAM
    where = "above" if near else "within"
    return HostRelease(
        near, f"planned peak {share:.0%} of {worker_memory / GIB:.1f} GiB per worker, {where} {NEAR_RAM:.0%}"
    )


def resolve_release(cfg: KTOConfig) -> tuple[KTOConfig, str]:
    """`cfg` with release_host_memory decided (its stage already resolved: the plan of the stage that
    runs), and the start line's words for it: said only when auto turns it on (it slows the steps)."""
    setting = cfg.cluster.release_host_memory
    if setting != "auto":
        return cfg, ""
    if cfg.cluster.use_gpu:
        release = decide_release(True, 0.0, 1.0)
    else:
        from kto_ray.models.loading import local_model_path
        from kto_ray.planning.plan import plan
        from kto_ray.storage import is_uri

        memory = (cfg.deepspeed.worker_memory_gib or 0) * GIB or worker_memory_bytes(cfg)
        architecture = local_model_path(cfg.model.path) if is_uri(cfg.model.path) else None
        release = plan(cfg, model_config=architecture, gpu_memory_gib=memory / GIB).release
    cluster = cfg.cluster.model_copy(update={"release_host_memory": release.on})
    words = f", host memory released (auto: {release.reason})" if release.on else ""
    return cfg.model_copy(update={"cluster": cluster}), words
