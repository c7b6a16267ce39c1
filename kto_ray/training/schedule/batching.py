"""Deterministic batch schedule over a split: the same global batches whatever the number of workers.

Each optimizer step consumes `workers * micro_batch_size * accumulation` rows (the global batch) of a
seeded per-epoch permutation. Accumulation index k of a step owns a contiguous global micro-batch, and rank r
takes its r-th slice, so 1 worker with micro-batch 2b sees exactly the rows 2 workers with b see
together. Incomplete global batches are dropped, so every rank takes the same number of steps
(ZeRO-3 hangs otherwise), and a step index alone is the data position to resume from.

With lengths given (`train.group_by_length`), each window of `GROUP_WINDOW_STEPS` steps of the
permutation is sorted by length, cut into steps, and the steps are shuffled within the window: little
padding on length-skewed data while the epoch stays shuffled (and still a function of seed and epoch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import torch

from kto_ray.models.logprobs import PaddedBatch, pad_sequences
from kto_ray.models.packing import PackedBatch, pack_sequences
from kto_ray.store.format import row_lengths

if TYPE_CHECKING:
    from kto_ray.store.reader import SplitIndex


@dataclass(frozen=True)
class KTOBatch:
    """One worker's micro-batch: policy and KL sequences plus what the store knows about them."""

    policy: PaddedBatch | PackedBatch
    kl: PaddedBatch | PackedBatch
    desirable: torch.Tensor
    ref_logps: torch.Tensor
    ref_kl_logps: torch.Tensor
    ids: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)

    def to(self, device: torch.device | str) -> KTOBatch:
        return KTOBatch(*(value.to(device) for value in vars(self).values()))  # every field


# Steps per length-sorted window: wide enough to find rows of similar length, narrow enough that the
# order stays random at the scale of an epoch (Hugging Face's LengthGroupedSampler uses 50 batches).
GROUP_WINDOW_STEPS = 64


@dataclass(frozen=True)
class Schedule:
    rows: int
    workers: int
    micro_batch_size: int
    accumulation: int
    seed: int
    # Per-row lengths (store.format.row_lengths); when given, steps are grouped by length (module docstring).
    lengths: np.ndarray | None = field(default=None, compare=False, repr=False)
    _orders: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def for_table(
        cls,
        table: pa.Table,
        workers: int,
        micro_batch_size: int,
        accumulation: int,
        seed: int,
        group: bool,
    ) -> Schedule:
        lengths = row_lengths(table) if group else None
        return cls(len(table), workers, micro_batch_size, accumulation, seed, lengths)

    @classmethod
    def for_index(
        cls,
        index: SplitIndex,
        workers: int,
        micro_batch_size: int,
        accumulation: int,
        seed: int,
        group: bool,
    ) -> Schedule:
        """What `for_table(store.read_split(index.split), ...)` returns, without the table."""
        lengths = index.lengths if group else None
        return cls(index.rows, workers, micro_batch_size, accumulation, seed, lengths)

    @property
    def rows_per_step(self) -> int:
        return self.workers * self.micro_batch_size * self.accumulation

    @property
    def steps_per_epoch(self) -> int:
        return self.rows // self.rows_per_step

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's row order; consecutive runs of `rows_per_step` rows are its steps."""
        if epoch not in self._orders:
            self._orders.clear()  # steps visit epochs in order: keep one
            self._orders[epoch] = self._order(epoch)
        return self._orders[epoch]

    def _order(self, epoch: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.rows)
        if self.lengths is None:
            return order
        order = order[: self.steps_per_epoch * self.rows_per_step]
        window = GROUP_WINDOW_STEPS * self.rows_per_step
        grouped = []
        for start in range(0, len(order), window):
            rows = order[start : start + window]
            rows = rows[np.argsort(-self.lengths[rows], kind="stable")]
            steps = rows.reshape(-1, self.rows_per_step)
            grouped.append(steps[rng.permutation(len(steps))].reshape(-1))
        return np.concatenate(grouped) if grouped else order

    def rows_for(self, step: int, rank: int) -> list[np.ndarray]:
        """Row indices of `rank`'s micro-batches for global optimizer step `step` (0-based)."""
        epoch, index = divmod(step, self.steps_per_epoch)
        step_rows = self.permutation(epoch)[index * self.rows_per_step : (index + 1) * self.rows_per_step]
        global_micro = self.workers * self.micro_batch_size
        start = rank * self.micro_batch_size
        return [
            step_rows[k * global_micro + start : k * global_micro + start + self.micro_batch_size]
            for k in range(self.accumulation)
        ]


def collate(table: pa.Table, rows: np.ndarray, pad_id: int, packed: bool = False) -> KTOBatch:
    """The selected rows of a store table, padded to the batch's own longest sequence (or, `packed`,
    back to back without padding: `kto_ray.models.packing`)."""
    part = table.take(pa.array(rows, pa.int64())).to_pydict()
    layout = pack_sequences if packed else pad_sequences
    return KTOBatch(
        policy=layout(part["prompt_ids"], part["completion_ids"], pad_id),
        kl=layout(part["prompt_ids"], part["kl_completion_ids"], pad_id),
        desirable=torch.tensor(part["label"], dtype=torch.bool),
        ref_logps=torch.tensor(part["ref_logps"], dtype=torch.float32),
        ref_kl_logps=torch.tensor(part["ref_kl_logps"], dtype=torch.float32),
        ids=torch.tensor(part["id"], dtype=torch.int64),
    )
