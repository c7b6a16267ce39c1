"""How the driver turns Ray Train's failures into one line: Ray's own error types, built as Ray
builds them, no cluster."""

from __future__ import annotations

import ray.train

from kto_ray.errors import StorageError
from kto_ray.rundir import RunDir
from kto_ray.training.driver import _controller_storage_failure

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
