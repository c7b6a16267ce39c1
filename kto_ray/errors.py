"""Errors a user can fix: the CLI prints their one-line message and exits 2, without a traceback."""


class UserError(Exception):
    """A bad config, input file, store or path; the message names the file, row or key."""

    exit_code = 2
