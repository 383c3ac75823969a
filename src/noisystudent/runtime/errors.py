"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""


def error_reason(e: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none), to quote a
    library's error inside one of ours."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class NoisyStudentError(Exception):
    """Base class for errors caused by input (config, data, checkpoints), not by bugs."""


class ConfigError(NoisyStudentError):
    """An unknown, mistyped or out-of-range configuration key."""


class DataError(NoisyStudentError):
    """A missing, empty or unreadable dataset, image or class list."""


class CheckpointError(NoisyStudentError):
    """A checkpoint that cannot be loaded into the requested model."""


class StorageError(NoisyStudentError):
    """A file that could not be written: a full disk, a quota, a read-only or locked folder."""


class DistributedError(NoisyStudentError):
    """A collective operation failed because another process of the job stopped."""
