"""Model checkpoints: weights plus what is needed to rebuild the model, written atomically."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..runtime.errors import CheckpointError, error_reason
from ..runtime.files import atomic_write, read_torch_file
from .factory import MODEL_SOURCE_PREFIXES, create_model, model_architecture


# The preprocessing a checkpoint records, in timm's data-config terms (crop_pct / crop_mode None:
# noisystudent's rule by image size, data.transforms.eval_crop).
DATA_CONFIG_KEYS = ("mean", "std", "interpolation", "crop_pct", "crop_mode")


def save_model(path: Path, model: nn.Module, *, name: str, num_classes: int, in_chans: int,
               classes: list[str], image_size: int, mean: tuple, std: tuple, data_config: dict | None = None,
               **extra) -> None:
    """Save weights and model metadata (loadable with ``weights_only=True``), atomically; a full
    disk is one :class:`~noisystudent.runtime.errors.StorageError` line and leaves no temp file.

    ``data_config``: how the model's images are preprocessed beyond ``mean``/``std``
    (``interpolation``, ``crop_pct``, ``crop_mode``, and ``source``: where it came from, e.g. the
    pretrained weights); recorded as the checkpoint's ``data_config``, which labeling,
    evaluation, predict and export read through :func:`data_config`."""
    if name.startswith(MODEL_SOURCE_PREFIXES):  # a hub or folder name: record the architecture it built
        name = model_architecture(model)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    recorded = {"interpolation": "bilinear", "crop_pct": None, "crop_mode": None, "source": "data",
                **(data_config or {}), "mean": [float(m) for m in mean], "std": [float(s) for s in std]}
    payload = {"model": name, "num_classes": num_classes, "in_chans": in_chans, "classes": list(classes),
               "image_size": image_size, "mean": list(mean), "std": list(std), "data_config": recorded,
               "state_dict": state, **extra}
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


def data_config(meta: dict) -> dict:
    """A checkpoint's preprocessing: ``mean``, ``std``, ``interpolation``, ``crop_pct``,
    ``crop_mode`` (the keyword arguments of :func:`noisystudent.data.transforms.eval_transform`).
    Checkpoints written before ``data_config`` was recorded read as bilinear with the default crop."""
    recorded = meta.get("data_config") or {}
    return {"mean": tuple(meta["mean"]), "std": tuple(meta["std"]),
            "interpolation": recorded.get("interpolation") or "bilinear",
            "crop_pct": recorded.get("crop_pct"), "crop_mode": recorded.get("crop_mode")}


def clean_transform(meta: dict):
    """The un-augmented transform of a checkpoint's model: its evaluation size, channels and the
    preprocessing it was trained with (:func:`data_config`: the teacher's "without noise" view of
    an image; a model from pretrained weights sees images as those weights were trained on)."""
    from ..data.transforms import eval_transform

    return eval_transform(eval_size(meta), meta["in_chans"], **data_config(meta))


def clean_view(meta: dict) -> tuple:
    """What :func:`clean_transform` does to an image, as a value to compare: channels, resize and
    crop, interpolation, normalisation. Two checkpoints with equal views see every image alike (a
    crop the weights record but small images never take does not count)."""
    from ..data.transforms import eval_geometry

    cfg = data_config(meta)
    return (meta["in_chans"], eval_geometry(eval_size(meta), cfg["crop_pct"], cfg["crop_mode"]),
            cfg["interpolation"], cfg["mean"], cfg["std"])


def clean_pixel_transform(meta: dict):
    """:func:`clean_transform` without the normalisation: float pixels in [0, 1] at the same size
    and crop, for the robustness suites (which corrupt pixels and normalise inside the model)."""
    from ..data.transforms import pixel_transform

    cfg = data_config(meta)
    return pixel_transform(eval_size(meta), meta["in_chans"], cfg["interpolation"], cfg["crop_pct"], cfg["crop_mode"])


def load_model(path: Path, dropout: float = 0.0, drop_path: float = 0.0) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights."""
    payload = load_checkpoint(path)
    model = create_model(payload["model"], payload["num_classes"], payload["in_chans"], dropout, drop_path)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path}: weights do not fit model {payload['model']}: "
                              f"{error_reason(e)}") from None
    return model, payload
