"""The memory one worker may use on the connected Ray cluster."""

from __future__ import annotations

from kto_ray.config import KTOConfig


def worker_memory_bytes(cfg: KTOConfig) -> float:
    """What `deepspeed.stage: auto` and `cluster.release_host_memory: auto` plan against (unless
    `deepspeed.worker_memory_gib` says it): one GPU's total memory (a zero-CPU task on one GPU), or on
    CPU workers the RAM Ray reports for all nodes (`memory` + `object_store_memory`) over the most workers."""
    import ray

    if cfg.cluster.use_gpu:
        return float(ray.get(ray.remote(num_gpus=1, num_cpus=0)(_gpu_memory).remote()))
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    ram = sum(r.get("memory", 0) + r.get("object_store_memory", 0) for r in nodes)
    return ram / cfg.cluster.worker_range[1]


def _gpu_memory() -> int:
    import torch

    return torch.cuda.get_device_properties(0).total_memory
