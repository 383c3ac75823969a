"""Export a run's final model for use outside noisystudent: safetensors + timm config + model card
(+ ONNX), and optionally push the folder to the Hugging Face hub.

``export_model(RUN, OUT)`` writes, from the run's final model (``summary.json``'s ``final``
stage: best on validation by default, see ``final_model``; a run without it: its last stage):

* ``OUT/model.safetensors`` and ``OUT/config.json``, written by timm's public
  ``timm.models.save_for_hf``: the weights (a plain state dict, no pickled code) and timm's
  Hugging Face-style config (``architecture``, ``num_classes``, ``label_names``, ``model_args``
  and a ``pretrained_cfg`` with ``input_size``, ``test_input_size``, ``mean``, ``std``,
  ``interpolation``, ``crop_pct``, ``crop_mode``: the checkpoint's recorded data config, so a
  model started from pretrained weights keeps their preprocessing), plus a ``noisystudent``
  section (stage, accuracies, how to rebuild);
* ``OUT/README.md``: the model card (:mod:`noisystudent.models.model_card`);
* ``OUT/model.onnx`` with ``onnx=True`` (``torch.onnx.export`` with the dynamo exporter, or its
  TorchScript exporter where the dynamo one fails, as in torch 2.5 and 2.6 with current
  onnxscript; input ``image``, N x C x H x W at the test resolution, normalised with
  ``mean``/``std``; output ``logits``; N is dynamic), run by onnxruntime on a batch against the PyTorch model when
  onnxruntime is installed: the max abs difference is reported, and above ``onnx_tolerance`` the
  export fails.

Files are mode 0644. ``OUT`` may be new or a folder; a file there that this export would write
and that an earlier export did not write (or that was changed since) stops the export with a
one-line error, so nothing of the user's is overwritten. ``OUT/.noisystudent-export.json``
records what was written (and is not pushed). A failed export leaves no files of its own behind
(and removes ``OUT`` if it made it), so nothing half-written looks like an export.

Loading it back:

* any timm architecture (``efficientnet_b0``, ``resnet18``...), without noisystudent::

      timm.create_model("local-dir:OUT", pretrained=True)            # config.json + weights
      timm.create_model("hf-hub:ORG/REPO", pretrained=True)          # after --push-to-hub

* every model, including noisystudent's own architectures (the CPU nets ``ns_cnn_*``, which
  take no pretrained weights, and EfficientNet-L0/L1, known to timm once
  ``noisystudent.models.factory`` is imported; ``config.json`` says ``timm_native: false``):
  :func:`load_exported`, which calls ``noisystudent.models.factory.create_model`` and loads the
  safetensors file strictly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import safetensors.torch
import timm
import torch
import torch.nn as nn
import yaml

from ..data.transforms import eval_crop
from ..runtime.errors import CheckpointError, NoisyStudentError, error_reason
from ..runtime.rundir import CONFIG as RUN_CONFIG
from ..runtime.rundir import DATA as RUN_DATA
from ..runtime.rundir import MODEL, SUMMARY, RunDir, write_json_atomic
from .checkpoint import data_config, eval_size, load_model
from .factory import create_model
from .model_card import render_model_card

log = logging.getLogger("noisystudent")

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ONNX = "model.onnx"
ONNX_DATA = "model.onnx.data"  # the weights of a large model, beside the graph
CARD = "README.md"
RECORD = ".noisystudent-export.json"  # what this export wrote (name -> sha256): the only files it replaces
ONNX_INSTALL = "pip install 'noisystudent[onnx]'"
ONNX_TOLERANCE = 1e-4  # max abs logit difference accepted between onnxruntime and PyTorch (fp32)

# pretrained_cfg fields that describe these weights; the others timm carries over from the
# architecture's default config (tag, license, origin_url, paper_ids...) describe ImageNet weights.
_CFG_FIELDS = ("input_size", "test_input_size", "fixed_input_size", "interpolation", "crop_pct",
               "crop_mode", "mean", "std", "num_classes", "pool_size", "first_conv", "classifier", "custom_load")
_ARCH_FIELDS = ("architecture", "first_conv", "classifier", "fixed_input_size", "pool_size")
_ONNX_SINGLE_FILE_BYTES = 1 << 30  # larger models keep their weights beside the graph (model.onnx.data)


class OnnxCheckError(NoisyStudentError):
    """The ONNX file itself failed its check: onnxruntime cannot run it, or it computes otherwise."""


def final_stage(run_dir: Path) -> str:
    """The stage whose model a run hands over: ``summary.json``'s ``final`` stage (or, in a summary
    without one, its last stage: fix-res if it ran, else the last student, else the teacher). A
    run without ``summary.json`` (still running, or stopped) falls back to its latest finished
    training stage in the manifest, with a warning. Raises :class:`CheckpointError` if there is
    no finished model."""
    run = RunDir(run_dir)
    if not run.root.is_dir():
        raise CheckpointError(f"export: {run.root} is not a run directory")
    summary = run.root / SUMMARY
    if summary.is_file():
        try:
            content = json.loads(summary.read_text())
            final = content.get("final") or {}
            name = final["stage"] if isinstance(final, dict) and final.get("stage") else content["stages"][-1]["name"]
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, AttributeError):
            raise CheckpointError(f"export: {summary} lists no stages") from None
        if not run.file(name, MODEL).is_file():
            raise CheckpointError(f"export: {run.file(name, MODEL)} is missing (the final stage of {summary})")
        return name
    trained = [s for s in run.finished() if run.file(s, MODEL).is_file()]
    if not trained:
        raise CheckpointError(f"export: {run.root} has no finished model (no {SUMMARY}, no finished stage "
                              f"with a {MODEL})")
    log.warning(f"export: {run.root} has no {SUMMARY} (unfinished run); exporting its latest finished "
                f"stage, {trained[-1]}")
    return trained[-1]


def timm_data_config(meta: dict) -> dict:
    """A checkpoint's preprocessing (:func:`~noisystudent.models.checkpoint.data_config`) in timm's
    ``pretrained_cfg`` terms, with the crop its eval transform applies at its sizes."""
    c, size = meta["in_chans"], meta["image_size"]
    test = eval_size(meta)
    pre = data_config(meta)
    crop_pct, crop_mode = eval_crop(test, pre["crop_pct"], pre["crop_mode"])
    cfg = dict(input_size=(c, size, size), mean=tuple(pre["mean"]), std=tuple(pre["std"]),
               interpolation=pre["interpolation"], crop_pct=crop_pct, crop_mode=crop_mode)
    if test != size:
        cfg["test_input_size"] = (c, test, test)
    return cfg


def _write_weights_and_config(model: nn.Module, meta: dict, stage: str, metrics: dict, folder: Path) -> dict:
    """model.safetensors + config.json through timm's public ``save_for_hf``: the model's
    ``pretrained_cfg`` is set to describe these weights (the architecture's fields plus the
    checkpoint's data config) first, which every timm version writes out as it is."""
    from timm.models import save_for_hf

    arch_cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    model.pretrained_cfg = {**{k: arch_cfg[k] for k in _ARCH_FIELDS if k in arch_cfg},
                            **timm_data_config(meta), "num_classes": meta["num_classes"]}
    try:
        save_for_hf(model, str(folder), model_config={"label_names": list(meta["classes"])},
                    model_args={"in_chans": meta["in_chans"]}, safe_serialization=True)
    except Exception as e:  # noqa: BLE001 - timm's writer: one line for the user
        raise NoisyStudentError(f"export: timm could not save {meta['model']} ({error_reason(e)})") from None
    path = folder / CONFIG
    config = json.loads(path.read_text())
    config["pretrained_cfg"] = {k: v for k, v in config["pretrained_cfg"].items() if k in _CFG_FIELDS}
    architecture = config["architecture"]
    ours = timm.models.model_entrypoint(architecture).__module__ == create_model.__module__
    recorded = meta.get("data_config") or {}
    config["noisystudent"] = {
        "stage": stage,
        "create_model": "noisystudent.models.factory.create_model",
        "load": "noisystudent.models.export.load_exported",
        "timm_native": not ours,  # ns_cnn_*, efficientnet_l0/l1: known to timm once noisystudent is imported
        "in_chans": meta["in_chans"], "train_size": meta.get("train_size") or meta["image_size"],
        "test_size": eval_size(meta), "preprocessing_from": recorded.get("source", "data"),
        **{k: metrics[k] for k in ("val_top1", "val_top5", "test_top1", "test_top5") if k in metrics},
    }
    path.write_text(json.dumps(config, indent=2))
    return config


def _check_onnx_installed() -> None:
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise NoisyStudentError(f"export --onnx needs {' and '.join(missing)}: {ONNX_INSTALL}")


def _write_onnx(model: nn.Module, meta: dict, path: Path, tolerance: float) -> tuple[str, float | None]:
    """Write ``path`` with torch's dynamo exporter and check it against PyTorch with onnxruntime;
    where that exporter fails (torch 2.5 and 2.6 with the onnxscript releases after them fail on
    batch norm, see docs/user-guide.md) or its file fails the check, write it again with the
    TorchScript exporter and check that. Both with a dynamic batch axis. Returns the exporter used
    ("dynamo" or "torchscript") and the max abs difference (None without onnxruntime)."""
    size = eval_size(meta)
    example = torch.zeros(2, meta["in_chans"], size, size)
    big = sum(t.numel() * t.element_size() for t in model.state_dict().values()) > _ONNX_SINGLE_FILE_BYTES
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    # torch 2.5/2.6 warn about every torchvision op they register ("Missing annotation for parameter
    # 'rois'..."), none of them the user's model; what matters is said below, and onnxruntime checks
    exporter_log.setLevel(logging.ERROR)
    try:  # dynamic_shapes is the dynamo exporter's argument: ask for it by name on every torch
        torch.onnx.export(model, (example,), str(path), input_names=["image"], output_names=["logits"],
                          dynamo=True, dynamic_shapes=({0: torch.export.Dim("batch")},), external_data=big,
                          verbose=False)
        dynamo_error = None
    except Exception as e:  # noqa: BLE001 - the exporter raises many types; try the other one
        dynamo_error = _root_reason(e)
    finally:
        exporter_log.setLevel(level)
    if dynamo_error is None:
        try:
            return "dynamo", check_onnx(model, path, meta, tolerance=tolerance)
        except OnnxCheckError as e:  # a file onnxruntime cannot run, or one that computes otherwise
            dynamo_error = f"its file failed the check: {str(e).removeprefix('export: ')}"
    for leftover in (path, path.with_name(ONNX_DATA)):  # what the failed attempt may have written
        leftover.unlink(missing_ok=True)
    try:
        _write_onnx_torchscript(model, example, path, big)
    except Exception as e:  # noqa: BLE001 - one line for the user, naming both exporters' reasons
        raise NoisyStudentError(f"export: ONNX export of {meta['model']} failed (torch {torch.__version__}): dynamo "
                                f"exporter: {dynamo_error}; TorchScript exporter: {_root_reason(e)}") from None
    log.warning(f"export: torch {torch.__version__}'s dynamo ONNX exporter failed ({dynamo_error}); "
                f"{path.name} was written by its TorchScript exporter instead")
    return "torchscript", check_onnx(model, path, meta, tolerance=tolerance)


def _root_reason(e: BaseException) -> str:
    """The first line of the error that started it all: torch's exporters wrap the cause in a
    generic "Failed to convert ... Next steps:" error, coloured for a terminal."""
    seen = {id(e)}
    while e.__cause__ is not None and id(e.__cause__) not in seen:
        e = e.__cause__
        seen.add(id(e))
    return re.sub(r"\x1b\[[0-9;]*m", "", error_reason(e, with_type=True))


def _write_onnx_torchscript(model: nn.Module, example: torch.Tensor, path: Path, big: bool) -> None:
    """torch's TorchScript ONNX exporter (``dynamo=False``, ``dynamic_axes``), deprecated since
    torch 2.9, whose warnings are silenced here: it is the fallback. A large model's weights are
    gathered into one ``model.onnx.data`` beside the graph, as the dynamo exporter writes them
    (the TorchScript exporter writes one file per tensor past 2 GB)."""
    import warnings

    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".onnx-") as scratch:
        graph = Path(scratch) / path.name
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (example,), str(graph), input_names=["image"], output_names=["logits"],
                              dynamo=False, dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                              verbose=False)
        if not big:
            os.replace(graph, path)
            return
        import onnx

        proto = onnx.load(str(graph))  # reads the per-tensor files beside it
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=ONNX_DATA)


def check_onnx(model: nn.Module, path: Path, meta: dict, *, batch: int = 4,
               tolerance: float = ONNX_TOLERANCE) -> float | None:
    """Run ``path`` with onnxruntime on a batch of ``batch`` normalised-image-like inputs (a
    fixed seed) and compare with ``model``: returns the max abs logit difference, or None when
    onnxruntime is not installed (with a warning naming the install command). Raises
    :class:`OnnxCheckError` when onnxruntime cannot run the file or it differs above ``tolerance``
    (:class:`NoisyStudentError` when onnxruntime is installed but broken)."""
    try:
        import onnxruntime as ort
    except ImportError:
        log.warning(f"export: {path.name} not checked against PyTorch (onnxruntime is not installed: {ONNX_INSTALL})")
        return None
    except Exception as e:  # noqa: BLE001 - installed but broken: onnxruntime 1.18 under numpy 2 ("_ARRAY_API not found")
        raise NoisyStudentError(f"export: onnxruntime is installed but cannot be imported ({_root_reason(e)}), so "
                                f"{path.name} cannot be checked; pip install --upgrade onnxruntime") from None
    size = eval_size(meta)
    x = torch.randn(batch, meta["in_chans"], size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(x).float().numpy()
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        (got,) = session.run(["logits"], {"image": x.numpy()})
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors: one line
        raise OnnxCheckError(f"export: onnxruntime cannot run {path.name}: {error_reason(e)}") from None
    diff = float(abs(got - expected).max())
    if not diff <= tolerance:
        raise OnnxCheckError(f"export: {path.name} differs from the PyTorch model by {diff:.3g} (max abs logit "
                             f"difference on a batch of {batch}; tolerance {tolerance:g})")
    log.info(f"export: {path.name} matches PyTorch on a batch of {batch} (max abs difference {diff:.2e})")
    return diff


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _written_before(out: Path) -> dict:
    try:
        record = json.loads((out / RECORD).read_text())
        return dict(record["files"]) if isinstance(record.get("files"), dict) else {}
    except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        return {}


def _check_out(out: Path, names: list[str]) -> None:
    """``out`` must be a folder (or not exist), and every file of ``names`` in it must be one an
    earlier export wrote, unchanged since: the export replaces only its own files."""
    if out.exists() and not out.is_dir():
        raise NoisyStudentError(f"export: --out {out} is a file; give a folder (new or one an earlier export wrote)")
    ours = _written_before(out)
    for name in names:
        path = out / name
        if path.exists() and (not path.is_file() or ours.get(name) != _sha256(path)):
            raise NoisyStudentError(f"export: {path} exists and was not written by noisystudent export (or was changed "
                                    "since); choose another --out folder or move it away")


def _make_folder(out: Path) -> list[Path]:
    """Create ``out`` (and missing parents); returns the folders created, deepest first."""
    created = []
    for folder in (out, *out.parents):
        if folder.exists():
            break
        created.append(folder)
    out.mkdir(parents=True, exist_ok=True)
    return created


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty: rmdir never takes a file with it,
    so anything someone else put there meanwhile stays, and so does the folder holding it."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


def export_model(run_dir: Path, out_dir: Path, onnx: bool = False, *, license_id: str = "apache-2.0",
                 repo_id: str | None = None, onnx_tolerance: float = ONNX_TOLERANCE) -> dict:
    """Write a run's final model to ``out_dir`` as ``model.safetensors`` + ``config.json`` +
    ``README.md`` (and ``model.onnx`` with ``onnx``, checked by onnxruntime when installed); see the
    module docstring. The files are written to a temporary folder inside ``out_dir`` and moved in
    when all of them are complete. ``repo_id``: the hub repository the folder is meant for (the
    card's loading example names it; :func:`push_to_hub` pushes). Returns ``{"stage",
    "architecture", "num_classes", "files": {"weights", "config", "card"[, "onnx"]},
    "onnx_max_abs_diff", "onnx_exporter"}`` (``"dynamo"``, ``"torchscript"`` or None). A failed
    export removes what it wrote and the folders it made; ``out_dir``'s other files stay. Raises
    :class:`CheckpointError` (one line) when the run has no finished model,
    :class:`NoisyStudentError` for an ``out_dir`` holding files it did not write."""
    run = RunDir(run_dir)
    stage = final_stage(run.root)
    out = Path(out_dir)
    names = [WEIGHTS, CONFIG, CARD, ONNX, ONNX_DATA]  # ONNX files are written, or removed as stale
    _check_out(out, names)
    if onnx:
        _check_onnx_installed()
    model, meta = load_model(run.file(stage, MODEL))
    model.eval()
    metrics_path = run.file(stage, "metrics.json")
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
    created = _make_folder(out)
    files = {"weights": out / WEIGHTS, "config": out / CONFIG, "card": out / CARD}
    diff = exporter = None
    moved: list[Path] = []
    try:
        with tempfile.TemporaryDirectory(dir=out, prefix=".export-") as scratch:
            tmp = Path(scratch)
            config = _write_weights_and_config(model, meta, stage, metrics, tmp)
            if onnx:
                exporter, diff = _write_onnx(model, meta, tmp / ONNX, onnx_tolerance)
                files["onnx"] = out / ONNX
            (tmp / CARD).write_text(_card(run, config, stage, license_id, repo_id, diff, out), encoding="utf-8")
            written = sorted(p for p in tmp.iterdir() if p.is_file())
            for p in written:
                p.chmod(0o644)  # files for others to read (tempfile makes them private)
            record = {p.name: _sha256(p) for p in written}
            for p in written:  # model.onnx.data (external weights) moves along with model.onnx
                os.replace(p, out / p.name)
                moved.append(out / p.name)
        if not onnx:
            for stale in (out / ONNX, out / ONNX_DATA):  # from an earlier export (checked above): they would not match
                stale.unlink(missing_ok=True)
        write_json_atomic(out / RECORD, {"run": str(run.root), "stage": stage, "files": record})
        (out / RECORD).chmod(0o644)
    except BaseException:
        # A failed (or interrupted) export leaves nothing that looks like a finished one: the files
        # it moved in go (no record would vouch for them), and so do the folders it made, once
        # empty; a folder that was there before keeps everything else it held.
        for path in moved:
            path.unlink(missing_ok=True)
        _remove_empty(created)
        raise
    log.info(f"export: {stage} ({config['architecture']}) -> {out}")
    return {"stage": stage, "architecture": config["architecture"], "num_classes": config["num_classes"],
            "files": files, "onnx_max_abs_diff": diff, "onnx_exporter": exporter}


def _card(run: RunDir, config: dict, stage: str, license_id: str, repo_id: str | None, diff: float | None,
          out: Path) -> str:
    def read(path: Path, parse) -> dict:
        try:
            return parse(path.read_text()) or {} if path.is_file() else {}
        except (OSError, ValueError, yaml.YAMLError):
            return {}

    return render_model_card(summary=read(run.root / SUMMARY, json.loads),
                             config=read(run.root / RUN_CONFIG, yaml.safe_load), export_config=config, stage=stage,
                             license_id=license_id, repo_id=repo_id, onnx_max_abs_diff=diff, local_dir=str(out),
                             splits=read(run.root / RUN_DATA, json.loads))


def push_to_hub(out_dir: Path, repo_id: str, *, private: bool = False, token: str | None = None,
                commit_message: str = "Add model (noisystudent export)") -> str:
    """Upload an exported folder (what :func:`export_model` wrote, as recorded) to the Hugging Face
    hub repository ``repo_id``, created if needed, through ``huggingface_hub``'s ``create_repo`` and
    ``upload_folder`` (its login or ``token``). Returns the commit URL. One-line
    :class:`NoisyStudentError` on failure (offline, not logged in); the local files stay."""
    import huggingface_hub

    out = Path(out_dir)
    files = sorted(_written_before(out))
    if not files:
        raise NoisyStudentError(f"export: {out} holds no export to push ({RECORD} is missing)")
    try:
        repo = huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, token=token)
        commit = huggingface_hub.upload_folder(repo_id=getattr(repo, "repo_id", repo_id), folder_path=str(out),
                                               allow_patterns=files, commit_message=commit_message, token=token)
    except Exception as e:  # noqa: BLE001 - network, auth and hub errors: one line
        raise NoisyStudentError(f"export: push to the hub repository {repo_id} failed ({error_reason(e)}); "
                                f"the export is in {out}") from None
    url = str(getattr(commit, "commit_url", None) or commit)
    log.info(f"export: pushed {len(files)} files to {repo_id}")
    return url


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
