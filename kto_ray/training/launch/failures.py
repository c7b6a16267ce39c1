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
    WorkerFailure,
)
from kto_ray.internals.ray_private import worker_failures
from kto_ray.rundir import RunDir
from kto_ray.storage import first_line
from kto_ray.training.resume.checkpoint_files import checkpoint_step
from kto_ray.training.resume.run_state import latest_checkpoint

Failure = TypeVar("Failure", bound=WorkerFailure)


def stopped_line(err: Exception, run_dir: RunDir, last_step: int) -> Exception | None:
    """The one-line error for a run Ray Train reports failed (`last_step`: the last step the driver
    saw), or None when the failure is none of kto-ray's typed ones (then it is raised as it is)."""
    return (
        _damaged(err, run_dir)
        or _stopped_by_non_finite(err, run_dir)
        or _stopped_by_storage(err, run_dir)
        or _stopped_by_reshape(err)
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
    failures = worker_failures(err)
    store = next((failures[r] for r in sorted(failures) if isinstance(failures[r], StoreDamaged)), None)
    if store is not None:
        return store
    unchecked = _worker_failure(err, ResumeUnchecked)
    if unchecked is not None:
        return UserError(
            f"{unchecked} in {run_dir}: `kto-ray verify` lists its checkpoints; a new run.name starts over"
        )
    lost = _worker_failure(err, CheckpointsLost)
    if lost is None:
        return None
    return CheckpointsDamaged(
        f"{lost} in {run_dir}: `kto-ray verify` lists what is wrong; a new run.name starts over"
    )


def _stopped_by_storage(err: Exception, run_dir: RunDir) -> StorageError | None:
    """A checkpoint that could not be written, as one line naming the step and the run dir."""
    failure = _worker_failure(err, CheckpointWriteFailed)
    if failure is None:
        return None
    return StorageError(
        f"training stopped at {failure} (run dir {run_dir}); rerun to resume once the storage is reachable"
    )


def _stopped_by_reshape(err: Exception) -> StorageError | None:
    """A checkpoint that could not be reshaped for the new worker count, as one line with the ways out."""
    failure = _worker_failure(err, CheckpointReshapeFailed)
    if failure is None:
        return None
    return StorageError(
        f"training stopped: {failure}. Free space there or set run.scratch_dir, then rerun; or rerun "
        f"with cluster.workers={failure.saved}"
    )


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


def _stopped_by_non_finite(err: Exception, run_dir: RunDir) -> TrainingStopped | None:
    """A worker's NonFiniteStep as one line naming the step and the checkpoint a rerun resumes from."""
    failure = _worker_failure(err, NonFiniteStep)
    if failure is None:
        return None
    saved = run_dir.checkpoint_names()
    last = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
    return TrainingStopped(
        f"training stopped at {failure}; nothing after it was saved and {last}. "
        "Lower train.lr or check the data, then rerun to resume."
    )
