"""Micro-batches by token budget (`train.micro_batch_tokens`): the same rows per step, fewer forwards.

The schedule still fixes which rows each rank takes in a step, so the global batch, z0 and the loss
normalisation stay as they are; only how a rank's rows are cut into forwards changes (greedily, longest
first: `models.logprobs.length_buckets`). A row's length (`store.format.row_lengths`) is the longer of
its (x, y) and (x, y_kl) sequences, so the budget bounds the KL forward as well as the policy forward.
Ranks then differ in their number of micro-batches, which `train_step` evens out with fillers.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from kto_ray.models.logprobs import length_buckets
from kto_ray.store.format import row_lengths
from kto_ray.training.schedule.batching import KTOBatch, collate


def budget_batches(
    table: pa.Table, budget: int, pad_id: int, packed: bool = False
) -> tuple[list[KTOBatch], KTOBatch]:
    """A rank's rows of one step (`table`) as token-budget micro-batches, and the filler `train_step`
    runs in place of the micro-batches other ranks have more of (one row: the shortest)."""
    lengths = row_lengths(table)
    batches = [
        collate(table, rows, pad_id, packed)
        for rows in length_buckets(lengths, max_tokens=budget, packed=packed)
    ]
    filler = collate(table, np.array([int(np.argmin(lengths))]), pad_id, packed)
    return batches, filler
