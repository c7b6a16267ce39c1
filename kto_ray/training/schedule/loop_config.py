"""What the driver hands every Ray Train worker: one typed record, the whole of a worker's inputs.

Ray Train passes `train_loop_config` to the loop as a dict (its run state export walks it as one), so
the record travels as the only value of that dict: `as_train_loop_config` on the driver,
`from_train_loop_config` in the worker's entry point, nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kto_ray.config import KTOConfig
from kto_ray.store.reader import SplitIndex

if TYPE_CHECKING:
    import pyarrow as pa
    import ray

    # A split as the workers get it: an index of the store's rows (offline, each worker reads its own
    # rows from the store) or the tokenized table, put once into the object store (online).
    ShippedRows = SplitIndex | ray.ObjectRef[pa.Table]

_KEY = "loop"


@dataclass(frozen=True)
class LoopConfig:
    """A worker's inputs: on a cluster joined through RAY_ADDRESS the workers do not get the driver's
    environment or working directory."""

    # The validated config, local paths made absolute (workers do not share the driver's cwd).
    config: KTOConfig = field(repr=False)
    train_rows: ShippedRows = field(repr=False)
    # The eval split, with train.eval_every or eval_at_end; None without them.
    eval_rows: ShippedRows | None = field(repr=False)
    # Optimizer steps of the whole run (a resumed run continues to the same count).
    total_steps: int
    # Rows per optimizer step, the run's contract (training/resume/global_batch.py).
    global_batch: int
    # lambda_D, resolved on the driver (`auto` needs the whole split's label counts).
    desirable_weight: float
    # MLFLOW_* / WANDB_*, resolved by tracking.prepare_tracking; rank 0 sets them before its trackers.
    # Left out of repr: they may hold credentials, and Ray Train records the loop config's text.
    tracking_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # The S3 endpoint the store's rows are read from (storage.endpoint_env), set before the store opens.
    storage_env: Mapping[str, str] = field(default_factory=dict, repr=False)
    # What the steps mean (training/resume/run_state.py), written by rank 0 into every checkpoint.
    run_state: Mapping[str, Any] = field(default_factory=dict, repr=False)
    # The checkpoint the driver checked this start against and its run state (None: a fresh start).
    checked: tuple[str, Mapping[str, Any]] | None = field(default=None, repr=False)

    def as_train_loop_config(self) -> dict[str, LoopConfig]:
        return {_KEY: self}

    @staticmethod
    def from_train_loop_config(train_loop_config: Mapping[str, Any]) -> LoopConfig:
        loop = train_loop_config.get(_KEY)
        if not isinstance(loop, LoopConfig):
            raise TypeError(f"not a LoopConfig.as_train_loop_config(): keys {sorted(train_loop_config)}")
        return loop
