"""What kto_ray/internals/ray_private.py relies on in Ray (written against ray 2.60.0): these fail
when an upgrade moves or changes it."""

from __future__ import annotations

import ray
import ray._private.state as ray_state
import ray.train.v2._internal.constants as train_constants
from ray.train import WorkerGroupError

from kto_ray.internals import ray_private


def _upgraded() -> str:
    return f"ray {ray.__version__} (ray_private.py was written against {ray_private.WRITTEN_AGAINST})"


def test_the_autoscaler_state_functions_are_where_they_were():
    for name in ("get_cluster_config", "get_max_resources_from_cluster_config"):
        assert callable(getattr(ray_state.state, name, None)), (
            f"ray._private.state.state.{name}: {_upgraded()}"
        )


def test_the_controller_callback_hook_and_its_variable_are_where_they_were():
    assert ray_private.CALLBACKS_ENV == train_constants.RAY_TRAIN_CALLBACKS_ENV_VAR, _upgraded()
    assert callable(getattr(ray_private.ControllerCallback, "after_controller_start", None)), _upgraded()


def test_worker_failures_come_back_by_rank_with_their_own_type():
    failure = KeyError("rows")
    err = WorkerGroupError("rank 1 failed", {1: failure})
    assert ray_private.worker_failures(err) == {1: failure}, _upgraded()
    assert ray_private.worker_failures(RuntimeError("controller")) == {}
