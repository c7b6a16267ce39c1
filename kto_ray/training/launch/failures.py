"""How a stopped training run becomes one line: Ctrl-C, the run dir's storage, and the typed failures
the workers raise (Ray Train V2 hands each worker's exception over in its WorkerGroupError), each
naming the step, the run dir and what a rerun does."""

from __future__ import annotations

import contextlib
from typing import TypeVar

from kto_ray.errors import (
    CheckpointReshapeFailed,
    CheckpointsDamaged,
    CheckpointsLost,
    CheckpointWriteFailed,
    Interrupted,
    NonFiniteStep,
    ResumeUnchecked,
    StorageError,
    StoreDamaged,
    TrainingStopped,
    UserError,
)
from kto_ray.internals.ray_private import worker_failures
from kto_ray.rundir import RunDir
from kto_ray.storage import first_line
from kto_ray.training.resume.checkpoint_files import checkpoint_step
from kto_ray.training.resume.run_state import latest_checkpoint

Failure = TypeVar("Failure", bound=Exception)


def stopped_line(err: Exception, run_dir: RunDir, last_step: int) -> Exception | None:
    """The one-line error for a run Ray Train reports failed (`last_step`: the last step the driver
    saw), or None when the failure is none of kto-ray's typed ones (then it is raised as it is)."""
    return (
        _damaged(err, run_dir)
        or _stopped(err, run_dir)
        or _controller_storage_failure(err, run_dir, last_step)
    )


def interrupted(run_dir: RunDir) -> Interrupted:
    """Ctrl-C: one line naming the last step logged and the checkpoint a rerun resumes from."""
    from kto_ray.rundir.metrics import read_metrics

    with contextlib.suppress(Exception):  # what can be read of the run dir: the line is best effort
        records = read_metrics(run_dir)
        step = f" at step {records[-1]['step']}" if records else " before the first step"
        saved = latest_checkpoint(run_dir)
        resumes = (
            f"a rerun resumes from checkpoint step {checkpoint_step(saved) or saved} ({saved})"
            if saved
            else "no checkpoint was written: a rerun starts over"
        )
        return Interrupted(f"interrupted{step}; {resumes}")
    return Interrupted("interrupted; rerun the same command to resume from the last checkpoint")


@contextlib.contextmanager
def storage_errors(run_dir: RunDir, doing: str = "write"):
    """The run dir's storage failing outside the workers (config, lease, the checkpoint's run state):
    one line naming it."""
    try:
        yield
    except OSError as err:
        raise StorageError(f"cannot {doing} the run dir {run_dir}: {first_line(err)}") from None


def _worker_failure(err: Exception, kind: type[Failure]) -> Failure | None:
    """The lowest rank's failure of `kind`. Ray Train V2 hands each worker's exception over as itself
    (unpickled, its own wrapper removed) in `WorkerGroupError.worker_failures`; a ControllerError has none."""
    failures = worker_failures(err)
    return next((failures[rank] for rank in sorted(failures) if isinstance(failures[rank], kind)), None)


def _damaged(err: Exception, run_dir: RunDir) -> UserError | None:
    """A damaged store file a worker met (it trains on none of it), no whole checkpoint, or a checkpoint
    the driver did not check the run against: one line."""
    if (store := _worker_failure(err, StoreDamaged)) is not None:
        return store
    if (unchecked := _worker_failure(err, ResumeUnchecked)) is not None:
        return UserError(
            f"{unchecked} in {run_dir}: `kto-ray verify` lists its checkpoints; a new run.name starts over"
        )
    if (lost := _worker_failure(err, CheckpointsLost)) is not None:
        return CheckpointsDamaged(
            f"{lost} in {run_dir}: `kto-ray verify` lists what is wrong; a new run.name starts over"
        )
    return None


def _stopped(err: Exception, run_dir: RunDir) -> TrainingStopped | StorageError | None:
    """A worker's non-finite step, unwritten checkpoint or failed reshape as one line naming the step
    and what a rerun does."""
    if (non_finite := _worker_failure(err, NonFiniteStep)) is not None:
        saved = run_dir.checkpoint_names()
        last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        return TrainingStopped(
            f"training stopped at {non_finite}; nothing after it was saved and {last}. "
            "Lower train.lr or check the data, then rerun to resume."
        )
    if (unwritten := _worker_failure(err, CheckpointWriteFailed)) is not None:
        return StorageError(
            f"training stopped at {unwritten} (run dir {run_dir}); "
            "rerun to resume once the storage is reachable"
        )
    if (reshape := _worker_failure(err, CheckpointReshapeFailed)) is not None:
        return StorageError(
            f"training stopped: {reshape}. Free space there or set run.scratch_dir, then rerun; or rerun "
            f"with cluster.workers={reshape.saved}"
        )
    return None


def _controller_storage_failure(err: Exception, run_dir: RunDir, last_step: int) -> StorageError | None:
    """Ray Train's controller failing to write its own state to the run dir (its checkpoint record):
    when storage goes away during a checkpoint, this can surface before the workers' own error."""
    failure = getattr(err, "controller_failure", None)
    if not isinstance(failure, OSError):
        return None
    # The step the progress follower last read (it lags by up to one poll): said only when there is one.
    seen = f" (last step seen: {last_step})" if last_step else ""
    return StorageError(
        f"training stopped{seen}: Ray Train could not write to the run dir "
        f"{run_dir} ({first_line(failure)}); rerun to resume from its last checkpoint once the storage "
        "is reachable"
    )
