"""Errors the CLI reports as one line without a traceback, each with its exit code."""

import inspect


class KtoRayError(Exception):
    exit_code = 1


class UserError(KtoRayError):
    """A bad config, input file, store or path; the message names the file, row or key. Exit 2."""

    exit_code = 2


class StoreDamaged(UserError):
    """A file of the reference store `store` is not what its manifest recorded (`what`: missing,
    another size, a checksum that differs, bytes that do not decode). Exit 2; nothing is trained on it.
    Raised on the driver or in a worker (pickled to the driver, so it keeps its facts)."""

    def __init__(self, store: str, file: str, what: str):
        super().__init__(
            f"reference store {store}: file {file} is damaged ({what}); check it with `kto-ray verify "
            f"{store}` and rebuild it with `kto-ray precompute --overwrite`"
        )
        self.store, self.file, self.what = store, file, what

    def __reduce__(self):
        return (type(self), (self.store, self.file, self.what))


class CheckpointsDamaged(UserError):
    """No checkpoint of a run that has some is whole: resuming would start over. Exit 2."""


class Interrupted(KtoRayError):
    """Ctrl-C: the message names the step reached and the checkpoint a rerun resumes from. Exit 130."""

    exit_code = 130


class StorageError(KtoRayError):
    """Storage failed (unreachable server, permissions) for a store or a run dir; one line naming the
    location, never its credentials. Exit 1: the inputs were valid, the storage was not there."""


class TrainingStopped(KtoRayError):
    """The run stopped on purpose (e.g. a non-finite loss); the message names the step and the last
    good checkpoint. Exit 1: the inputs were valid, the run needs a look (lower lr, check the data)."""


class WorkerFailure(RuntimeError):
    """A failure a training worker raises on purpose, which the driver turns into one of the errors
    above. Ray Train pickles it from the worker to the driver (`TrainingFailedError.worker_failures`),
    so each kind keeps every constructor argument as the attribute of that name and rebuilds itself
    from them (`__reduce__`): the driver tells the kinds apart by type and reads the attributes, never
    the message."""

    def __reduce__(self):
        names = inspect.signature(type(self)).parameters
        return (type(self), tuple(getattr(self, name) for name in names))


class NonFiniteStep(WorkerFailure):
    """Optimizer step `step` (1-based) had a non-finite loss or gradient norm; `detail` says which."""

    def __init__(self, step: int, detail: str):
        super().__init__(f"step {step}: {detail}")
        self.step, self.detail = step, detail


class CheckpointWriteFailed(WorkerFailure):
    """The checkpoint `checkpoint` of step `step` could not be written (`reason`, one line);
    `previous` names the last one written before it, None when there is none."""

    def __init__(self, step: int, checkpoint: str, reason: str, previous: str | None = None):
        last = f"the last one written is {previous}" if previous else "none was written before"
        super().__init__(f"step {step}: the checkpoint {checkpoint} could not be written ({reason}); {last}")
        self.step, self.checkpoint, self.reason, self.previous = step, checkpoint, reason, previous


class CheckpointsLost(WorkerFailure):
    """A restore found no whole checkpoint: `newest` says what is wrong with the newest (one line),
    `count` how many were checked."""

    def __init__(self, newest: str, count: int):
        super().__init__(f"{newest}, and no older checkpoint is whole ({count} checked)")
        self.newest, self.count = newest, count


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


class ResumeUnchecked(WorkerFailure):
    """The checkpoint `checkpoint` Ray Train handed (or the restore fell back to) was written under
    another run state than the one the driver checked this start against (`checked`, its name, None
    for a fresh start): resuming it would skip the checks."""

    def __init__(self, checkpoint: str, checked: str | None):
        against = (
            f"the run was checked against {checked}" if checked else "the run was checked as a fresh one"
        )
        super().__init__(f"the checkpoint {checkpoint} was written under other settings and {against}")
        self.checkpoint, self.checked = checkpoint, checked
