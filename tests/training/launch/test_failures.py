"""How the driver turns Ray Train's failures into one line: Ray's own error types, built as Ray
builds them, no cluster. A worker's failure reaches the driver pickled (worker -> controller ->
driver), so the tests send theirs through pickle too."""

from __future__ import annotations

import pickle

import pytest
import ray.train

from kto_ray.errors import (
    CheckpointReshapeFailed,
    CheckpointWriteFailed,
    NonFiniteStep,
    StorageError,
    TrainingStopped,
)
from kto_ray.rundir import RunDir
from kto_ray.training.launch.failures import _controller_storage_failure, _stopped

RUN_DIR = RunDir("s3://kto/runs/cut")
# pyarrow's message when the endpoint went away while Ray Train's controller wrote its record.
UNREACHABLE = OSError(
    "When initiating multiple part upload for key 'runs/cut/checkpoints/checkpoint_manager_snapshot.json' "
    "in bucket 'kto': AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, "
    "Could not connect to server\nDetails: Failed to connect to 127.0.0.1:33125 after 0 ms"
)


def test_controller_storage_failure_is_one_line_naming_the_run_dir_and_the_last_step_seen():
    stopped = _controller_storage_failure(ray.train.ControllerError(UNREACHABLE), RUN_DIR, last_step=6)
    assert isinstance(stopped, StorageError)
    assert str(stopped) == (
        "training stopped (last step seen: 6): Ray Train could not write to the run dir "
        "s3://kto/runs/cut (When initiating multiple part upload for key "
        "'runs/cut/checkpoints/checkpoint_manager_snapshot.json' in bucket 'kto': "
        "AWS Error NETWORK_CONNECTION during CreateMultipartUpload operation: curlCode: 7, "
        "Could not connect to server); "
        "rerun to resume from its last checkpoint once the storage is reachable"
    )


def test_no_step_seen_is_not_called_step_0():
    stopped = _controller_storage_failure(ray.train.ControllerError(UNREACHABLE), RUN_DIR, last_step=0)
    assert str(stopped).startswith(
        "training stopped: Ray Train could not write to the run dir s3://kto/runs/cut ("
    )


def test_other_controller_failures_are_left_to_ray():
    failure = ray.train.ControllerError(RuntimeError("scheduling failed"))
    assert _controller_storage_failure(failure, RUN_DIR, last_step=3) is None
    assert _controller_storage_failure(ValueError("not Ray's"), RUN_DIR, last_step=3) is None


def _from_workers(failures: dict[int, Exception]) -> ray.train.WorkerGroupError:
    """As fit() raises it on the driver: Ray's WorkerGroupError, through pickle."""
    return pickle.loads(pickle.dumps(ray.train.WorkerGroupError("rank errors", failures)))


@pytest.mark.parametrize(
    "failure",
    [
        NonFiniteStep(3, "non-finite loss on 1 of 2 ranks"),
        CheckpointWriteFailed(8, "step_00000008", "Connection refused", "step_00000004"),
        CheckpointWriteFailed(4, "step_00000004", "Permission denied"),
        CheckpointReshapeFailed(4, "step_00000004", 2, 1, "/tmp/kto-reshape-ab: No space left on device"),
    ],
)
def test_worker_failures_arrive_with_their_type_and_facts(failure):
    (arrived,) = _from_workers({1: failure}).worker_failures.values()
    assert type(arrived) is type(failure)
    assert vars(arrived) == vars(failure) and str(arrived) == str(failure)


def test_non_finite_step_is_one_line_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    (tmp_path / "checkpoints" / "step_00000002").mkdir(parents=True)
    err = _from_workers(
        {
            0: NonFiniteStep(3, "non-finite loss on 1 of 2 ranks"),
            1: NonFiniteStep(3, "non-finite loss on 1 of 2 ranks"),
        }
    )
    stopped = _stopped(err, RunDir(tmp_path))
    assert isinstance(stopped, TrainingStopped)
    assert str(stopped) == (
        "training stopped at step 3: non-finite loss on 1 of 2 ranks; nothing after it was saved and "
        "the last good checkpoint is step_00000002. Lower train.lr or check the data, then rerun to resume."
    )
    assert "no checkpoint was written" in str(_stopped(err, RunDir(tmp_path / "fresh")))


def test_failed_checkpoint_write_is_one_line_naming_the_step_and_the_last_checkpoint():
    err = _from_workers(
        {
            0: ValueError("another rank's failure"),
            1: CheckpointWriteFailed(8, "step_00000008", "Connection refused", "step_00000004"),
        }
    )
    stopped = _stopped(err, RUN_DIR)
    assert isinstance(stopped, StorageError)
    assert str(stopped) == (
        "training stopped at step 8: the checkpoint step_00000008 could not be written (Connection refused); "
        "the last one written is step_00000004 (run dir s3://kto/runs/cut); rerun to resume once the storage "
        "is reachable"
    )


def test_other_worker_failures_are_left_to_ray():
    # Found by type, not by its words: a message that reads like ours is not ours.
    err = _from_workers({0: RuntimeError("step 3: non-finite loss on 1 of 2 ranks")})
    assert _stopped(err, RUN_DIR) is None
    assert _stopped(ray.train.ControllerError(UNREACHABLE), RUN_DIR) is None


def test_failed_reshape_is_one_line_naming_the_checkpoint_the_counts_and_the_ways_out():
    reason = "/tmp/kto-reshape-ab: [Errno 28] No space left on device"
    err = _from_workers({0: CheckpointReshapeFailed(4, "step_00000004", 2, 1, reason)})
    stopped = _stopped(err, RUN_DIR)
    assert isinstance(stopped, StorageError)
    assert str(stopped) == (
        "training stopped: the checkpoint step_00000004 (step 4, 2 workers) could not be reshaped for 1 "
        "worker (/tmp/kto-reshape-ab: [Errno 28] No space left on device); the checkpoint is left as it "
        "was. Free space there or set run.scratch_dir, then rerun; or rerun with cluster.workers=2"
    )
    assert _stopped(_from_workers({0: RuntimeError("could not be reshaped")}), RUN_DIR) is None
