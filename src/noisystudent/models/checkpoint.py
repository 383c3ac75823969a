"""Model checkpoints: weights plus what is needed to rebuild the model, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..runtime.errors import CheckpointError
from ..runtime.files import atomic_write, read_torch_file
from .factory import create_model


def save_model(path: Path, model: nn.Module, *, name: str, num_classes: int, in_chans: int,
               classes: list[str], image_size: int, mean: tuple, std: tuple, **extra) -> None:
    """Save weights and model metadata (loadable with ``weights_only=True``), atomically; a full
    disk is one :class:`~noisystudent.runtime.errors.StorageError` line and leaves no temp file."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": name, "num_classes": num_classes, "in_chans": in_chans, "classes": list(classes),
               "image_size": image_size, "mean": list(mean), "std": list(std), "state_dict": state, **extra}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint saved by :func:`save_model` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    payload = read_torch_file(path, "noisystudent checkpoint")
    if not isinstance(payload, dict) or "state_dict" not in payload or not isinstance(payload.get("model"), str):
        raise CheckpointError(f"not a noisystudent checkpoint: {path} (it lacks the "
                              "'model' and 'state_dict' entries that save_model writes)")
    return payload


def eval_size(meta: dict) -> int:
    """The resolution a checkpoint's model is evaluated at, and labels at: its test size (raised
    by fix-res or ``test_size``), else the size it trained at."""
    return meta.get("test_size") or meta["image_size"]


def clean_transform(meta: dict):
    """The un-augmented transform of a checkpoint's model: its evaluation size, channels and the
    normalisation it was trained with (the teacher's "without noise" view of an image)."""
    from ..data.transforms import eval_transform

    return eval_transform(eval_size(meta), meta["in_chans"], tuple(meta["mean"]), tuple(meta["std"]))


def load_model(path: Path, dropout: float = 0.0, drop_path: float = 0.0) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights."""
    payload = load_checkpoint(path)
    model = create_model(payload["model"], payload["num_classes"], payload["in_chans"], dropout, drop_path)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {payload['model']}: "
                              f"{str(e).splitlines()[0]}") from None
    return model, payload
