"""User-facing errors: the CLI prints these as one line and exits non-zero (no traceback)."""


class R1VError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class CheckpointError(R1VError):
    """A checkpoint directory that cannot be read as an R1V model."""
