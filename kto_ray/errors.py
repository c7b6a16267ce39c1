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
