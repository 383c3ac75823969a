"""Stage 7 (clean part): top-1 / top-5 accuracy. Robustness suites live in ``noisystudent.robustness``."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ..models.checkpoint import clean_pixel_transform, load_model
from ..config.schema import EvaluateConfig
from ..data.datasets import ImageSet, TransformedSet
from ..data.device_input import EvalCache, eval_batch_size, eval_batches, wants_channels_last
from ..runtime.distributed import DistContext, all_reduce_sum
from ..runtime.progress import progress_bar
from ..robustness import RobustnessSettings, evaluate_robustness, plot_robustness
from ..runtime.files import write_error
from ..runtime.rundir import write_json_atomic

log = logging.getLogger("noisystudent")


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, dataset: Dataset, device: torch.device, *, batch_size: int | None = None,
                        num_workers: int = 0, ctx: DistContext | None = None, progress: bool = False,
                        desc: str = "eval", channels_last: bool | None = None,
                        cache: EvalCache | None = None) -> dict:
    """Top-1 and top-5 accuracy (in %) of ``model`` in eval mode; sharded over ranks if distributed.

    Images come through the one device input path (:func:`noisystudent.data.device_input.eval_batches`:
    uint8 from the workers, normalised on the device, kept there in ``cache`` after the first pass
    when the set is un-augmented and fits; None: read every time). ``channels_last``: the input's
    layout (None: as the model's weights). Hits are counted on the device and read once, at the end.
    ``batch_size``: None, the device's (:func:`~noisystudent.data.device_input.eval_batch_size`:
    small on a CPU, whose caches are what a large batch overflows).
    """
    device = torch.device(device)
    batch_size = batch_size or eval_batch_size(device)
    ctx = ctx or DistContext(device=device)
    if channels_last is None:
        channels_last = wants_channels_last(model)
    was_training = model.training
    model.eval()
    hits = torch.zeros(2, dtype=torch.int64, device=device)
    seen = 0
    batches = eval_batches(dataset, device, batch_size=batch_size, num_workers=num_workers, ctx=ctx,
                           channels_last=channels_last, cache=cache)
    for x, y in progress_bar(batches, desc=desc, unit="batch", enabled=progress):
        logits = model(x).float()
        hit = logits.topk(min(5, logits.shape[1]), dim=1).indices == y.to(logits.device).view(-1, 1)
        hits += torch.stack([hit[:, 0].sum(), hit.any(1).sum()]).to(hits.device)
        seen += len(y)
    model.train(was_training)
    # On ctx.device: NCCL reduces GPU tensors only, gloo CPU ones.
    counts = all_reduce_sum(torch.cat([hits.to(ctx.device), torch.tensor([seen], device=ctx.device)]), ctx).tolist()
    n = max(1, counts[2])
    return {"top1": 100.0 * counts[0] / n, "top5": 100.0 * counts[1] / n, "n": int(counts[2])}


def evaluate_checkpoints(checkpoints: dict[str, Path], images: ImageSet, cfg: EvaluateConfig, *, channels: int,
                         device: torch.device, out_dir: Path, seed: int = 0, progress: bool = True,
                         known_clean: dict[str, dict] | None = None, progress_dir: Path | None = None) -> dict:
    """Run the configured robustness suites on each checkpoint (e.g. teacher and final student),
    side by side; writes ``robustness.json`` and plots into ``out_dir``. ``images`` is an
    :class:`~noisystudent.data.datasets.ImageSet` with targets (usually the test split). ``known_clean``:
    ``{name: {"top1", "top5"}}`` already measured on all of ``images`` at the checkpoint's test
    size, reused instead of another clean pass (ignored with ``cfg.max_images``).

    Crash safety: each finished (suite, model) pair is written at once, atomically, to
    ``<suite>/<model>.json`` in ``progress_dir`` (default: ``out_dir``) and in ``out_dir``; a rerun
    with the same ``progress_dir`` reuses every pair whose checkpoint file and settings are
    unchanged, so a killed evaluation continues where it stopped. The pipeline, whose ``out_dir``
    is a scratch folder wiped on restart, passes a persistent ``progress_dir``.
    """
    out_dir = Path(out_dir)
    progress_dir = Path(progress_dir) if progress_dir is not None else out_dir
    settings = robustness_settings(cfg, seed)
    results = {}
    for name, path in checkpoints.items():
        key = _result_key(path, images, settings)
        loaded = None  # the model is loaded only if some suite still has to run
        clean = (known_clean or {}).get(name) if cfg.max_images is None else None
        merged: dict = {}
        for suite in cfg.suites:
            done = _read_result(progress_dir, suite, name, key)
            if done is None:
                if loaded is None:
                    loaded = _load_for_robustness(path, images, channels, device)
                model, meta, dataset = loaded
                done = evaluate_robustness(model, dataset, dataclasses.replace(settings, suites=[suite]),
                                           mean=meta["mean"], std=meta["std"], device=device,
                                           class_names=meta.get("classes"), clean=clean, progress=progress)
                _write_result(progress_dir, suite, name, key, done)
            else:
                log.info(f"[evaluate] {suite} on {name}: finished earlier ({progress_dir / suite / (name + '.json')})")
            if progress_dir != out_dir:
                _write_result(out_dir, suite, name, key, done)
            if "clean" in done and clean is None:  # later suites (corruptions) reuse the clean error
                clean = done["clean"]
            merged.update(done)
        merged["checkpoint"] = str(path)
        results[name] = merged
    write_json_atomic(out_dir / "robustness.json", results)
    plot_robustness(results, out_dir)
    return results


def robustness_settings(cfg: EvaluateConfig, seed: int = 0) -> RobustnessSettings:
    """The ``evaluate`` section as the robustness suites take it."""
    return RobustnessSettings(suites=tuple(cfg.suites), severities=tuple(cfg.severities), normalizer=cfg.normalizer,
                              fgsm_eps=tuple(cfg.fgsm_eps), pgd_steps=cfg.pgd_steps,
                              natural_adversarial_root=cfg.natural_adversarial_dir, max_images=cfg.max_images,
                              seed=seed, batch_size=cfg.batch_size)


def _load_for_robustness(path: Path, images: ImageSet, channels: int, device: torch.device):
    model, meta = load_model(path)
    return model.to(device), meta, TransformedSet(images, clean_pixel_transform(meta))


def _result_key(path: Path, images: ImageSet, settings: RobustnessSettings) -> dict:
    """What a saved (suite, model) result depends on: the checkpoint file (by size and time, not
    by hashing gigabytes), the images, and every setting that changes the numbers (all of the
    suites' settings but which suites run and how they are batched), as JSON reads them back."""
    st = Path(path).stat()
    unused = ("suites", "batch_size", "num_workers")
    numbers = {k: v for k, v in dataclasses.asdict(settings).items() if k not in unused}
    return {"checkpoint": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "n_images": len(images),
            **json.loads(json.dumps(numbers, default=str))}


def _result_path(folder: Path, suite: str, name: str) -> Path:
    return folder / suite / f"{name}.json"


def _read_result(folder: Path, suite: str, name: str, key: dict) -> dict | None:
    path = _result_path(folder, suite, name)
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):  # absent, or not ours: evaluate again
        return None
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("result"), dict):
        return None
    return saved["result"]


def _write_result(folder: Path, suite: str, name: str, key: dict, result: dict) -> None:
    path = _result_path(folder, suite, name)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(e, path.parent) from None
    write_json_atomic(path, {"key": key, "result": result})
