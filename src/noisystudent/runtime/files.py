"""Reading and writing a run's files, with one error path for each direction.

* Writes go through :func:`atomic_write`: a hidden temporary file beside the target, renamed over
  it once complete, so a reader (or a resumed run) sees the old file or the whole new one. Any
  ``OSError`` while writing (a full disk, a quota, a read-only or vanished folder) removes the
  temporary file and becomes one :class:`~noisystudent.runtime.errors.StorageError` line that says
  what ran out and where (:func:`write_error`).
* PyTorch files are read through :func:`read_torch_file`, with ``weights_only=True`` always, and
  every way a file can be wrong (empty, not a PyTorch file, truncated, holding Python objects
  that loading could run) becomes one :class:`~noisystudent.runtime.errors.CheckpointError` line
  naming the file, never PyTorch's advice to load it unsafely.
"""

from __future__ import annotations

import errno
import os
import warnings
from pathlib import Path
from typing import IO, Any, Callable, Sequence

from .errors import CheckpointError, StorageError

Writer = Callable[[IO[bytes]], None]


def temp_path(path: Path) -> Path:
    """The temporary name :func:`atomic_write` uses for ``path``: hidden, in the same folder, and
    this process's own, so ranks writing the same file (each the same bytes) never collide."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write(path: str | Path, data: bytes | str | Writer, *, fsync: bool = False) -> None:
    """Write ``data`` (bytes, text, or a function that writes into a binary file) to ``path``
    atomically. ``fsync``: flush the file to the disk before the rename (checkpoints, whose
    rename must never expose a file whose bytes are still in the page cache).

    Raises :class:`StorageError` (from :func:`write_error`) on any ``OSError``, after removing the
    temporary file; on any other exception the temporary file is removed too, and it propagates.
    """
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself may be gone; the error below names it
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        if isinstance(e, RuntimeError) and _oserror_inside(e) is not None:
            # torch.save reports a failed write as RuntimeError("... file write failed")
            raise write_error(_oserror_inside(e), path) from None
        raise


def _oserror_inside(e: BaseException) -> OSError | None:
    """The OSError that caused ``e``, if any (torch wraps write failures in RuntimeError)."""
    seen = 0
    while e is not None and seen < 5:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


_RUN_OUT = {
    errno.ENOSPC: "disk full: no space left on the device holding {where}",
    errno.EDQUOT: "disk quota exceeded on the device holding {where}",
}


def write_error(e: OSError, path: str | Path | None) -> StorageError:
    """The one-line error for an ``OSError`` raised while writing ``path`` (None: unknown)."""
    if e.errno in _RUN_OUT:
        where = "a folder this command writes to" if path is None else Path(path).parent
        done = "" if path is None else f" (while writing {Path(path).name})"
        return StorageError(_RUN_OUT[e.errno].format(where=where) + done +
                            "; free some space there and run the command again (a run continues with: "
                            "noisystudent run --resume RUN_DIR)")
    path = Path(path) if path is not None else "a file"
    if e.errno == errno.EROFS:
        return StorageError(f"cannot write {path}: the filesystem is read-only")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {path}: permission denied")
    reason = e.strerror or str(e) or type(e).__name__
    return StorageError(f"cannot write {path}: {reason}")


def is_storage_error(e: BaseException) -> bool:
    """Whether ``e`` is an ``OSError`` that a full disk or a quota raises (the CLI's safety net for
    writes that do not go through :func:`atomic_write`, e.g. a log file)."""
    return isinstance(e, OSError) and e.errno in _RUN_OUT


# ------------------------------------------------------------------------------ reading


def read_torch_file(path: str | Path, what: str, *, mmap: bool = False,
                    allow: Sequence[type] = ()) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, with one-line errors naming ``path``.

    ``what`` names the expected kind of file in the error ("noisystudent checkpoint"); ``mmap``
    maps tensors instead of reading them (files in PyTorch's zip format; others are read);
    ``allow``: extra classes the file may hold (e.g. ``argparse.Namespace`` in timm's files).
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"not a {what}: {path} (empty file)")
    with open(path, "rb") as f:
        is_zip = f.read(4) == b"PK\x03\x04"
    try:
        with warnings.catch_warnings():  # torch warns about odd pickle protocols in foreign files
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(list(allow)):
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and is_zip)
    except Exception as e:  # noqa: BLE001 - torch raises many types for foreign or damaged files
        raise CheckpointError(_read_reason(path, what, e, is_zip)) from None


def _read_reason(path: Path, what: str, e: Exception, is_zip: bool) -> str:
    text = str(e)
    # torch words it "Unsupported global", "unsupported GLOBAL ... is blocked", "not an allowed global"
    if "unsupported global" in text.lower() or "not an allowed global" in text.lower():
        name = text.split("GLOBAL", 1)[1].split()[0] if "GLOBAL" in text else "an object"
        return (f"not a {what}: {path} (it holds Python objects, such as {name}, besides tensors; "
                "they are not loaded, since loading them could run code)")
    if is_zip:
        return f"damaged {what}: {path} (truncated or corrupt PyTorch file; write it again)"
    return f"not a {what}: {path} (not a file written by torch.save)"
