"""Model checkpoints: weights plus what is needed to rebuild the model, written atomically."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn as nn

from ..runtime.errors import CheckpointError
from .factory import create_model


def save_model(path: Path, model: nn.Module, *, name: str, num_classes: int, in_chans: int,
               classes: list[str], image_size: int, mean: tuple, std: tuple, **extra) -> None:
    """Save weights and model metadata (loadable with ``weights_only=True``)."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"model": name, "num_classes": num_classes, "in_chans": in_chans, "classes": list(classes),
               "image_size": image_size, "mean": list(mean), "std": list(std), "state_dict": state, **extra}
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Read a checkpoint saved by :func:`save_model` (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt files
        raise CheckpointError(f"unreadable checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(payload, dict) or "state_dict" not in payload or "model" not in payload:
        raise CheckpointError(f"{path} is not a noisystudent checkpoint (no 'model'/'state_dict')")
    return payload


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
