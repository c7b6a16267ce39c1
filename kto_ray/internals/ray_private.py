"""Ray's private names and files that kto-ray relies on. Written against ray 2.60.0.

- `ray._private.state`: the autoscaler's node groups, for "can this cluster ever place the workers".
- `ray.train.v2._internal...ControllerCallback` and the `RAY_TRAIN_CALLBACKS` variable: the hook a
  sweep trial uses to reach its Ray Train controller (to abort it when Tune stops the trial).
- `WorkerGroupError.worker_failures`: the exceptions of the failed workers, by rank.
"""

from __future__ import annotations

WRITTEN_AGAINST = "2.60.0"

# ray.train.v2._internal.constants.RAY_TRAIN_CALLBACKS_ENV_VAR: import paths of extra controller callbacks.
CALLBACKS_ENV = "RAY_TRAIN_CALLBACKS"


def __getattr__(name: str):
    # Ray Train's callback base class, imported on first use (it pulls in ray.train).
    if name == "ControllerCallback":
        from ray.train.v2._internal.execution.callback import ControllerCallback

        return ControllerCallback
    raise AttributeError(name)


def autoscaler_limits() -> dict[str, float] | None:
    """The most resources the autoscaler may bring up (inf where unbounded), or None when the cluster
    cannot grow. A private API: if it moved, the cluster counts as fixed (the safe answer)."""
    try:
        import ray._private.state as ray_state

        config = ray_state.state.get_cluster_config()
        if config is None or not any(
            group.max_count == -1 or group.max_count > group.min_count
            for group in config.node_group_configs
            if group.resources and group.max_count != 0
        ):
            return None
        most = ray_state.state.get_max_resources_from_cluster_config() or {}
    except Exception:
        return None
    return {key: float("inf") if value is None or value < 0 else float(value) for key, value in most.items()}


def worker_failures(err: Exception) -> dict[int, BaseException]:
    """The failed workers' own exceptions by rank (Ray Train V2 unpickles each and removes its wrapper);
    empty for a controller error or anything else."""
    return getattr(err, "worker_failures", None) or {}
