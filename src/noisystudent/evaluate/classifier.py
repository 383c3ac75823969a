"""Stage 7 (clean part): top-1 / top-5 accuracy. Robustness suites live in ``noisystudent.robustness``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..models.checkpoint import load_model
from ..config.schema import EvaluateConfig
from ..data.datasets import ImageSet, TransformedSet
from ..runtime.distributed import DistContext, all_reduce_sum, shard_indices
from ..runtime.progress import progress_bar
from ..robustness import evaluate_robustness, plot_robustness
from ..runtime.files import write_error
from ..runtime.rundir import write_json_atomic
from ..data.transforms import pixel_transform

log = logging.getLogger("noisystudent")


@torch.inference_mode()
def evaluate_classifier(model: nn.Module, dataset: Dataset, device: torch.device, *, batch_size: int = 256,
                        num_workers: int = 0, ctx: DistContext | None = None, progress: bool = False,
                        desc: str = "eval") -> dict:
    """Top-1 and top-5 accuracy (in %) of ``model`` in eval mode; sharded over ranks if distributed."""
    ctx = ctx or DistContext(device=device)
    part = Subset(dataset, list(shard_indices(len(dataset), ctx))) if ctx.distributed else dataset
    loader = DataLoader(part, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)
    for x, y in progress_bar(loader, desc=desc, unit="batch", enabled=progress):
        logits = model(x.to(device, non_blocking=True)).float().cpu()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk == y.view(-1, 1)
        counts += torch.tensor([hit[:, 0].sum().item(), hit.any(1).sum().item(), len(y)], dtype=torch.float64)
    model.train(was_training)
    counts = all_reduce_sum(counts, ctx)
    n = max(1.0, counts[2].item())
    return {"top1": 100.0 * counts[0].item() / n, "top5": 100.0 * counts[1].item() / n, "n": int(counts[2].item())}


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
    results = {}
    for name, path in checkpoints.items():
        key = _result_key(path, images, cfg, seed)
        loaded = None  # the model is loaded only if some suite still has to run
        clean = (known_clean or {}).get(name) if cfg.max_images is None else None
        merged: dict = {}
        for suite in cfg.suites:
            done = _read_result(progress_dir, suite, name, key)
            if done is None:
                if loaded is None:
                    loaded = _load_for_robustness(path, images, channels, device)
                model, meta, dataset = loaded
                done = evaluate_robustness(
                    model, dataset, suites=[suite], mean=meta["mean"], std=meta["std"], device=device,
                    batch_size=cfg.batch_size, fgsm_eps=cfg.fgsm_eps, pgd_steps=cfg.pgd_steps,
                    severities=cfg.severities, max_images=cfg.max_images, seed=seed, progress=progress,
                    normalizer=cfg.normalizer, natural_adversarial_root=cfg.natural_adversarial_dir,
                    class_names=meta.get("classes"), clean=clean)
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


def _load_for_robustness(path: Path, images: ImageSet, channels: int, device: torch.device):
    model, meta = load_model(path)
    size = meta.get("test_size") or meta["image_size"]
    return model.to(device), meta, TransformedSet(images, pixel_transform(size, channels))


def _result_key(path: Path, images: ImageSet, cfg: EvaluateConfig, seed: int) -> dict:
    """What a saved (suite, model) result depends on: the checkpoint file (by size and time, not
    by hashing gigabytes) and every setting that changes the numbers."""
    st = Path(path).stat()
    return {"checkpoint": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "n_images": len(images),
            "seed": seed, "max_images": cfg.max_images, "severities": list(cfg.severities),
            "fgsm_eps": list(cfg.fgsm_eps), "pgd_steps": cfg.pgd_steps, "normalizer": cfg.normalizer,
            "natural_adversarial_dir": cfg.natural_adversarial_dir}


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
