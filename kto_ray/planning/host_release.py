"""`cluster.release_host_memory: auto`: whether CPU workers hand freed host memory back to the OS.

Releasing (`training/host_memory.py`) holds a CPU worker to the plan, but its steps ran 1.5x slower; glibc
keeping freed ZeRO-3 gathers and activations on its heap put peaks ~270-290 MiB higher, growing step to
step, and a 630M full fine-tune (plan 9.7 GiB per worker) ran out of memory at its third step without it
(docs/benchmarks/worker-memory-2026-12-01.md). So it is on only where the plan leaves little room for
that: a planned peak above NEAR_RAM of the worker's memory (a judgement, not a measured edge). GPU
workers hold their model states in GPU memory and gain little. One decision, used by the driver
(`kto_ray/training/resume/stage.py`) and `kto-ray plan`'s advice.
"""

from __future__ import annotations

from dataclasses import dataclass

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
