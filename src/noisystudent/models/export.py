"""Export a run's final model for use outside noisystudent: safetensors + timm config (+ ONNX).

``export_model(RUN, OUT)`` writes, from the last stage of the run (fix-res if it ran, else the
last student, else the teacher):

* ``OUT/model.safetensors``: the weights (a plain state dict, no pickled code);
* ``OUT/config.json``: timm's Hugging Face-style model config (``architecture``, ``num_classes``,
  ``label_names``, ``model_args`` and a ``pretrained_cfg`` with ``input_size``, ``test_input_size``,
  ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``), written by timm's own
  ``save_config_for_hf``, plus a ``noisystudent`` section (stage, accuracies, how to rebuild);
* ``OUT/model.onnx`` with ``onnx=True`` (``torch.onnx.export``; input ``image``, N x C x H x W
  at the test resolution, normalised with ``mean``/``std``; output ``logits``; N is dynamic).

Loading it back:

* any timm architecture (``efficientnet_b0``, ``resnet18``...), without noisystudent::

      timm.create_model("local-dir:OUT", pretrained=True)            # config.json + weights
      timm.create_model(arch, pretrained=True, num_classes=K, in_chans=C,
                        pretrained_cfg_overlay=dict(file="OUT/model.safetensors", num_classes=K))

* every model, including noisystudent's own architectures (the CPU nets ``ns_cnn_*``, which
  take no pretrained weights, and EfficientNet-L0/L1, known to timm once
  ``noisystudent.models.factory`` is imported; ``config.json`` says ``timm_native: false``):
  :func:`load_exported`, which calls ``noisystudent.models.factory.create_model`` and loads the
  safetensors file strictly.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn

from ..data.transforms import CENTER_CROP_FRACTION, SMALL_IMAGE
from ..runtime.errors import CheckpointError, NoisyStudentError, error_reason
from ..runtime.rundir import MODEL, SUMMARY, RunDir
from .checkpoint import eval_size, load_model
from .factory import create_model

log = logging.getLogger("noisystudent")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"

# pretrained_cfg fields that describe these weights; the others timm carries over from the
# architecture's default config (tag, license, origin_url, paper_ids...) describe ImageNet weights.
_CFG_FIELDS = ("input_size", "test_input_size", "fixed_input_size", "interpolation", "crop_pct",
               "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier", "custom_load")
_ONNX_SINGLE_FILE_BYTES = 1 << 30  # larger models keep their weights beside the graph (model.onnx.data)


def final_stage(run_dir: Path) -> str:
    """The stage whose model a run ends with: the last of ``summary.json``'s stages (fix-res if it
    ran, else the last student, else the teacher). A run without ``summary.json`` (still running,
    or stopped) falls back to its latest finished training stage in the manifest, with a warning.
    Raises :class:`CheckpointError` if there is no finished model."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise CheckpointError(f"export: {run.root} is not a run directory")
    summary = run.root / SUMMARY
    if summary.is_file():
        try:
            stages = json.loads(summary.read_text())["stages"]
            name = stages[-1]["name"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError):
            raise CheckpointError(f"export: {summary} lists no stages") from None
        if not run.file(name, MODEL).is_file():
            raise CheckpointError(f"export: {run.file(name, MODEL)} is missing (the last stage of {summary})")
        return name
    trained = [s for s in run.finished() if run.file(s, MODEL).is_file()]
    if not trained:
        raise CheckpointError(f"export: {run.root} has no finished model (no {SUMMARY}, no finished stage "
                              f"with a {MODEL})")
    log.warning(f"export: {run.root} has no {SUMMARY} (unfinished run); exporting its latest finished "
                f"stage, {trained[-1]}")
    return trained[-1]


def _data_config(meta: dict) -> dict:
    """The preprocessing of noisystudent's eval transform, in timm's terms."""
    c, size = meta["in_chans"], meta["image_size"]
    test = eval_size(meta)
    small = test < SMALL_IMAGE  # resized whole ("squash"); large images: resize + centre crop
    cfg = dict(input_size=(c, size, size), mean=tuple(meta["mean"]), std=tuple(meta["std"]),
               interpolation="bilinear", crop_pct=1.0 if small else CENTER_CROP_FRACTION,
               crop_mode="squash" if small else "center")
    if test != size:
        cfg["test_input_size"] = (c, test, test)
    return cfg


def _write_config(model: nn.Module, meta: dict, stage: str, metrics: dict, path: Path) -> dict:
    from timm.models._hub import save_config_for_hf

    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.setdefault("input_size", (meta["in_chans"], meta["image_size"], meta["image_size"]))  # ns_cnn_*
    model.pretrained_cfg = cfg
    save_config_for_hf(model, str(path), model_config={"label_names": list(meta["classes"])},
                       data_config=_data_config(meta))
    config = json.loads(path.read_text())
    config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k in _CFG_FIELDS}
    architecture = config["architecture"]
    ours = timm.models.model_entrypoint(architecture).__module__ == create_model.__module__
    config["noisystudent"] = {
        "stage": stage,
        "create_model": "noisystudent.models.factory.create_model",
        "load": "noisystudent.models.export.load_exported",
        "timm_native": not ours,  # ns_cnn_*, efficientnet_l0/l1: known to timm once noisystudent is imported
        "in_chans": meta["in_chans"], "train_size": meta.get("train_size") or meta["image_size"],
        "test_size": eval_size(meta),
        **{k: metrics[k] for k in ("val_top1", "val_top5", "test_top1", "test_top5") if k in metrics},
    }
    path.write_text(json.dumps(config, indent=2))
    return config


def _write_onnx(model: nn.Module, meta: dict, path: Path) -> None:
    size = eval_size(meta)
    example = torch.zeros(2, meta["in_chans"], size, size)
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > _ONNX_SINGLE_FILE_BYTES
    try:
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=big, verbose=False)
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; one line for the user
        raise NoisyStudentError(f"export: ONNX export of {meta['model']} failed: {error_reason(e)}") from None


def export_model(run_dir: Path, out_dir: Path, onnx: bool = False) -> dict:
    """Write a run's final model to ``out_dir`` as ``model.safetensors`` + ``config.json`` (and
    ``model.onnx`` with ``onnx``); see the module docstring for how to load them. The files are
    written to a temporary folder inside ``out_dir`` and moved in when all of them are complete.
    Returns ``{"stage", "architecture", "num_classes", "files": {"weights", "config"[, "onnx"]}}``.
    Raises :class:`CheckpointError` (one line) when the run has no finished model."""
    run = RunDir(run_dir)
    stage = final_stage(run.root)
    model, meta = load_model(run.file(stage, MODEL))
    model.eval()
    metrics_path = run.file(stage, "metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"weights": out / WEIGHTS, "config": out / CONFIG}
    with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
        tmp = Path(scratch)
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        safetensors.torch.save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        config = _write_config(model, meta, stage, metrics, tmp / CONFIG)
        if onnx:
            _write_onnx(model, meta, tmp / ONNX)
            files["onnx"] = out / ONNX
        for p in sorted(tmp.iterdir()):  # model.onnx.data (external weights) moves along with model.onnx
            os.replace(p, out / p.name)
    if not onnx:
        for stale in (out / ONNX, out / f"{ONNX}.data"):  # from an earlier export: they would not match
            stale.unlink(missing_ok=True)
    log.info(f"export: {stage} ({config['architecture']}) -> {out}")
    return {"stage": stage, "architecture": config["architecture"], "num_classes": config["num_classes"],
            "files": files}


def load_exported(directory: Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild an exported model (any architecture, ``ns_cnn_*`` included) and load its weights.
    Returns the model in eval mode and the parsed ``config.json``."""
    directory = Path(directory)
    cfg_path, weights = directory / CONFIG, directory / WEIGHTS
    if not cfg_path.is_file() or not weights.is_file():
        raise CheckpointError(f"{directory} is not an exported model (needs {CONFIG} and {WEIGHTS})")
    try:
        config = json.loads(cfg_path.read_text())
        arch, num_classes = config["architecture"], config["num_classes"]
        in_chans = config["pretrained_cfg"]["input_size"][0]
    except (json.JSONDecodeError, KeyError, IndexError, TypeError):
        raise CheckpointError(f"{cfg_path} is not a timm model config (architecture, num_classes, "
                              "pretrained_cfg.input_size)") from None
    model = create_model(arch, num_classes, in_chans)
    try:
        model.load_state_dict(safetensors.torch.load_file(str(weights)))
    except (RuntimeError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{weights}: weights do not fit {arch}: {error_reason(e)}") from None
    return model.to(device).eval(), config
