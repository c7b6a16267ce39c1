"""Stopping a trial's Ray Train run when Tune stops the trial, the way Ctrl-C stops `kto-ray train`.

The trial's actor calls `TorchTrainer.fit` (in `kto_ray.training.launch.driver`), which keeps the controller's
handle to itself. Ray Train V2 builds extra controller callbacks from `RAY_TRAIN_CALLBACKS` (import paths),
so the trial's actor names `SendHandle` there: built in the actor, it carries a small queue, and once
the controller starts it puts the controller's own handle in it. When Tune stops the trial (the
trainable's `cleanup`, run in the actor before it exits), the actor calls the controller's `abort`: the
worker group is shut down and its placement group removed. Left to Ray, the actor's exit would take
the controller and workers with it, but not the placement group, which lives as long as the sweep's
driver (Ray Train's own cleaner cannot see the controller die without the state API, which a local Ray
without a dashboard does not serve).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

from kto_ray.internals.ray_private import CALLBACKS_ENV, ControllerCallback

log = logging.getLogger(__name__)

_mailbox: Any = None  # this trial actor's queue, set by `controller_mailbox`


class SendHandle(ControllerCallback):
    """Built in the trial's actor (from RAY_TRAIN_CALLBACKS), run in the controller."""

    def __init__(self):
        self.mailbox = _mailbox

    def after_controller_start(self, train_run_context) -> None:
        import ray

        if self.mailbox is not None:
            self.mailbox.put(ray.get_runtime_context().current_actor)


def controller_mailbox():
    """In the trial's actor, before `train`: the queue the controller's handle will arrive in."""
    global _mailbox
    from ray.util.queue import Queue

    _mailbox = Queue(actor_options={"num_cpus": 0})
    path = f"{SendHandle.__module__}.{SendHandle.__name__}"
    others = [p for p in os.environ.get(CALLBACKS_ENV, "").split(",") if p.strip() and p.strip() != path]
    os.environ[CALLBACKS_ENV] = ",".join([*others, path])
    return _mailbox


def abort_run(mailbox, timeout_s: float = 60.0) -> bool:
    """Abort the Ray Train run whose controller sent its handle; False when none had (nothing to stop)."""
    import ray
    from ray.util.queue import Empty

    try:
        controller = mailbox.get(block=False)
    except Empty:
        return False
    with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        ray.get(controller.abort.remote(), timeout=timeout_s)  # it exits itself: an actor error here
    return True
