"""The global batch (rows per optimizer step) is a run's contract, whatever its number of workers.

It is fixed at the run's first start (`KTOConfig.first_global_batch`); a start on W workers with
micro-batch m accumulates global / (W x m) micro-batches. The schedule's steps depend only on the rows
per step and z0 and the loss are normalised over the global batch, so a step is the same rows and the
same computation on any worker count the global batch divides.
"""

from __future__ import annotations

from kto_ray.errors import UserError


def accumulation(global_batch: int, workers: int, micro_batch_size: int) -> int:
    """Micro-batches per optimizer step on `workers` workers; UserError when they cannot split it."""
    per_micro = workers * micro_batch_size
    if global_batch % per_micro:
        raise UserError(
            f"a global batch of {global_batch} rows cannot be split over {workers} worker"
            f"{'s' if workers != 1 else ''} x train.micro_batch_size {micro_batch_size}: "
            "choose a micro-batch (and worker counts) whose product divides it"
        )
    return global_batch // per_micro


def check_worker_range(global_batch: int, worker_range: tuple[int, int], micro_batch_size: int) -> None:
    """Before launch: every worker count of `worker_range` must split the global batch, in one line
    naming the counts that cannot."""
    low, high = worker_range
    bad = [w for w in range(low, high + 1) if global_batch % (w * micro_batch_size)]
    if not bad:
        return
    if low == high:
        accumulation(global_batch, low, micro_batch_size)  # raises its own line
    raise UserError(
        f"a global batch of {global_batch} rows cannot be split over {', '.join(map(str, bad))} "
        f"worker{'s' if bad != [1] else ''} x train.micro_batch_size {micro_batch_size} "
        f"(cluster.workers {low}-{high}): narrow the range or choose a micro-batch that divides "
        f"{global_batch} for every count in it"
    )
