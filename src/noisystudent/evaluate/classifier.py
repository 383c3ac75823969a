"""Stage 7 (clean part): top-1 / top-5 accuracy. Robustness suites live in ``noisystudent.robustness``."""

from __future__ import annotations

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
from ..runtime.rundir import write_json_atomic
from ..data.transforms import pixel_transform


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
                         known_clean: dict[str, dict] | None = None) -> dict:
    """Run the configured robustness suites on each checkpoint (e.g. teacher and final student),
    side by side; writes ``robustness.json`` and plots into ``out_dir``. ``images`` is an
    :class:`~noisystudent.data.datasets.ImageSet` with targets (usually the test split). ``known_clean``:
    ``{name: {"top1", "top5"}}`` already measured on all of ``images`` at the checkpoint's test
    size, reused instead of another clean pass (ignored with ``cfg.max_images``)."""
    results = {}
    for name, path in checkpoints.items():
        model, meta = load_model(path)
        size = meta.get("test_size") or meta["image_size"]
        dataset = TransformedSet(images, pixel_transform(size, channels))
        results[name] = evaluate_robustness(
            model.to(device), dataset, suites=cfg.suites, mean=meta["mean"], std=meta["std"], device=device,
            batch_size=cfg.batch_size, fgsm_eps=cfg.fgsm_eps, pgd_steps=cfg.pgd_steps,
            severities=cfg.severities, max_images=cfg.max_images, seed=seed, progress=progress,
            normalizer=cfg.normalizer, natural_adversarial_root=cfg.natural_adversarial_dir,
            class_names=meta.get("classes"),
            clean=(known_clean or {}).get(name) if cfg.max_images is None else None)
        results[name]["checkpoint"] = str(path)
    out_dir = Path(out_dir)
    write_json_atomic(out_dir / "robustness.json", results)
    plot_robustness(results, out_dir)
    return results
