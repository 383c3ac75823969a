"""Errors a user can cause. The CLI prints them as one line and exits non-zero."""

import re
from pathlib import Path

_FILE_OBJECT = re.compile(r"<_io\.\w+ object at 0x[0-9a-fA-F]+>")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def error_reason(e: BaseException, *, with_type: bool = False) -> str:
    """The first line of an error's message (its type's name when it has none), to quote a
    library's error inside one of ours: the one helper for it in the package.

    Object addresses are dropped (``<_io.BytesIO object at 0x..>`` reads ``<bytes>``), so the same
    error gives the same line in every run (a labeler's list of unreadable images compares equal
    across reruns). ``with_type``: prefixed with the error's type, ``"OSError: ..."``.
    """
    text = str(e).strip()
    line = _ADDRESS.sub("", _FILE_OBJECT.sub("<bytes>", text.splitlines()[0])) if text else ""
    if with_type:
        return f"{type(e).__name__}: {line}"
    return line or type(e).__name__


class NoisyStudentError(Exception):
    """Base class for errors caused by input (config, data, checkpoints), not by bugs."""


class ConfigError(NoisyStudentError):
    """An unknown, mistyped or out-of-range configuration key."""


class DataError(NoisyStudentError):
    """A missing, empty or unreadable dataset, image or class list."""


class DamagedOutputError(DataError):
    """A finished stage's files are missing or damaged (a shard deleted, a file cut short): the
    stage that wrote them writes them again when the run resumes (runtime.runner)."""


class CheckpointError(NoisyStudentError):
    """A checkpoint that cannot be loaded into the requested model."""


class StorageError(NoisyStudentError):
    """A file that could not be written: a full disk, a quota, a read-only or locked folder."""


class DistributedError(NoisyStudentError):
    """A collective operation failed because another process of the job stopped."""


class TrainingPreempted(NoisyStudentError):
    """SIGTERM arrived during training: a checkpoint was written and training stopped cleanly."""

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint
