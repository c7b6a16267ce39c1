"""Errors the CLI reports as one line without a traceback, each with its exit code."""


class KtoRayError(Exception):
    exit_code = 1


class UserError(KtoRayError):
    """A bad config, input file, store or path; the message names the file, row or key. Exit 2."""

    exit_code = 2


class StorageError(KtoRayError):
    """Storage failed (unreachable server, permissions) for a store or a run dir; one line naming the
    location, never its credentials. Exit 1: the inputs were valid, the storage was not there."""


class TrainingStopped(KtoRayError):
    """The run stopped on purpose (e.g. a non-finite loss); the message names the step and the last
    good checkpoint. Exit 1: the inputs were valid, the run needs a look (lower lr, check the data)."""


class WorkerFailure(RuntimeError):
    """A failure a training worker raises on purpose, which the driver turns into one of the errors
    above. Ray Train pickles it from the worker to the driver (`TrainingFailedError.worker_failures`),
    so each kind keeps its facts as attributes and rebuilds itself from them (`__reduce__`): the driver
    tells the kinds apart by type and reads the attributes, never the message."""

    def _fields(self) -> tuple:
        raise NotImplementedError

    def __reduce__(self):
        return (type(self), self._fields())


class NonFiniteStep(WorkerFailure):
    """Optimizer step `step` (1-based) had a non-finite loss or gradient norm; `detail` says which."""

    def __init__(self, step: int, detail: str):
        super().__init__(f"step {step}: {detail}")
        self.step, self.detail = step, detail

    def _fields(self) -> tuple:
        return (self.step, self.detail)


class CheckpointWriteFailed(WorkerFailure):
    """The checkpoint `checkpoint` of step `step` could not be written (`reason`, one line);
    `previous` names the last one written before it, None when there is none."""

    def __init__(self, step: int, checkpoint: str, reason: str, previous: str | None = None):
        last = f"the last one written is {previous}" if previous else "none was written before"
        super().__init__(f"step {step}: the checkpoint {checkpoint} could not be written ({reason}); {last}")
        self.step, self.checkpoint, self.reason, self.previous = step, checkpoint, reason, previous

    def _fields(self) -> tuple:
        return (self.step, self.checkpoint, self.reason, self.previous)


class CheckpointReshapeFailed(WorkerFailure):
    """The checkpoint `checkpoint` of step `step`, saved by `saved` workers, could not be reshaped for
    `world` workers (`reason`, one line, naming the scratch folder); the checkpoint itself is untouched."""

    def __init__(self, step: int, checkpoint: str, saved: int, world: int, reason: str):
        super().__init__(
            f"the checkpoint {checkpoint} (step {step}, {saved} workers) could not be reshaped for "
            f"{world} worker{'s' if world != 1 else ''} ({reason}); the checkpoint is left as it was"
        )
        self.step, self.checkpoint, self.reason = step, checkpoint, reason
        self.saved, self.world = saved, world

    def _fields(self) -> tuple:
        return (self.step, self.checkpoint, self.saved, self.world, self.reason)
