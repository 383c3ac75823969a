"""One call that runs the robustness suites on any dataset and returns a JSON-ready dict."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..runtime.progress import progress_bar
from . import _ops as ops
from .attacks import NormalizedModel, fgsm, pgd
from .corruptions import ALL_CORRUPTIONS, corrupt, resolve_preset
from .metrics import ALEXNET_FLIP_PROBS, flip_probability, flip_rates, mfr, top5_distance, topk_hits
from .perturbations import NOISE_PERTURBATIONS, PERTURBATIONS, perturbation_sequence
from .released import _WNID, _corruption_summary, evaluate_image_folder, evaluate_imagenet_a

SUITES: tuple[str, ...] = ("clean", "corruptions", "perturbations", "natural-adversarial", "fgsm", "pgd")


def _seed(*parts) -> int:
    """A stable 63-bit seed from the run seed and the position (suite, name, severity, batch), so
    every batch's randomness is reproducible whatever else runs."""
    return int(hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()[:15], 16)


def _normalise_suites(suites: Sequence[str] | str) -> list[str]:
    if isinstance(suites, str):
        suites = [s for s in suites.split(",") if s.strip()]
    out = []
    for s in suites:
        s = s.strip().lower().replace("_", "-")
        if s not in SUITES:
            raise ValueError(f"unknown suite {s!r}; choose from {SUITES}")
        out.append(s)
    return out


@dataclass(frozen=True)
class RobustnessSettings:
    """What the suites run and how; every default is the paper's.

    suites: any of "clean", "corruptions", "perturbations", "natural-adversarial", "fgsm", "pgd"
        (a list or a comma-separated string).
    severities: corruption severities to run. corruptions / perturbations: subsets (default: all
        19 corruptions, all 10 perturbations). preset: their parameter set ("auto" picks by image size).
    normalizer: "alexnet" adds CE / mCE / relative mCE and FR / mFR normalised by AlexNet
        (meaningful for ImageNet models only); None reports raw errors and flip probabilities.
    fgsm_eps / pgd_eps: attack sizes in 0-255 pixel units (``pgd_eps`` defaults to ``fgsm_eps``);
        ``pgd_step_size`` too (default 2.5 * eps / steps).
    natural_adversarial_root: folder for "natural-adversarial": ImageNet-A (WordNet id folders,
        1000-class model) or a labelled folder of hard images.
    max_images: evaluate only the first ``max_images`` images. seed: all corruption, perturbation
        and PGD randomness derives from it. batch_size / num_workers: the DataLoader's.
    """

    suites: Sequence[str] | str = ("clean", "corruptions", "perturbations", "fgsm", "pgd")
    severities: Sequence[int] = (1, 2, 3, 4, 5)
    corruptions: Sequence[str] | None = None
    perturbations: Sequence[str] | None = None
    preset: str = "auto"
    normalizer: str | None = None
    fgsm_eps: Sequence[float] = (0, 2, 4, 8, 16)
    pgd_eps: Sequence[float] | None = None
    pgd_steps: int = 10
    pgd_step_size: float | None = None
    natural_adversarial_root: str | Path | None = None
    max_images: int | None = None
    seed: int = 0
    batch_size: int = 256
    num_workers: int = 0


def evaluate_robustness(model: nn.Module, dataset: Dataset, settings: RobustnessSettings | None = None, *,
                        mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                        device: torch.device | str = "cpu", class_names: Sequence[str] | None = None,
                        clean: dict | None = None, progress: bool = True, **overrides) -> dict:
    """Evaluate ``model`` under the suites of ``settings`` (:class:`RobustnessSettings`; any of
    its fields may also be given as a keyword, e.g. ``suites=["clean", "fgsm"]``).

    Args:
        model: a classifier taking *normalised* images; ``mean``/``std`` (per channel) are applied
            inside (:class:`NormalizedModel`), so corruptions and attacks act on pixels in [0, 1].
        dataset: yields (image in [0, 1], C x H x W, int label), un-augmented.
        class_names: maps a natural-adversarial folder's names to model outputs.
        clean: this model's clean ``{"top1", "top5"}`` on the same images, already measured (the
            pipeline's test evaluation): reused instead of a second pass over the data.

    Returns:
        A JSON-serialisable dict with one entry per suite; accuracies, errors, CE and flip rates
        are percentages, top-5 distances are in ranks (0-5), eps in 0-255 units::

            {"clean": {"top1", "top5", "error", "n"},
             "corruptions": {"error": {name: [per severity]}, "mean_error", "clean_error",
                             ["ce", "mce", "relative_ce", "relative_mce"]},
             "perturbations": {"flip_prob": {name}, "mean_flip_prob", "t5d": {name}, "mt5d",
                               ["fr", "mfr"]},
             "fgsm": {"eps": [...], "top1": [...]}, "pgd": {"eps", "top1", "steps", "step_size"},
             "natural_adversarial": {"top1", "top5", "n", "kind", "num_classes"}}
    """
    st = dataclasses.replace(settings or RobustnessSettings(), **overrides)
    suites = _normalise_suites(st.suites)
    device = torch.device(device)
    if st.max_images is not None:
        dataset = Subset(dataset, range(min(st.max_images, len(dataset))))
    if len(dataset) == 0:
        raise ValueError("empty dataset")
    wrapped = NormalizedModel(model, mean, std).to(device)
    was_training = model.training
    wrapped.eval()
    loader = DataLoader(dataset, batch_size=st.batch_size, shuffle=False, num_workers=st.num_workers)
    results: dict = {"n_images": len(dataset), "seed": st.seed}
    try:
        if clean is not None:
            clean = {"top1": float(clean["top1"]), "top5": float(clean["top5"]),
                     "error": 100.0 - float(clean["top1"]), "n": len(dataset)}
        elif any(s in suites for s in ("clean", "corruptions")):
            clean = _clean(wrapped, loader, device, progress)
        if "clean" in suites:
            results["clean"] = clean
        if "corruptions" in suites:
            results["corruptions"] = _corruptions(wrapped, loader, device, st.corruptions or ALL_CORRUPTIONS,
                                                  st.severities, st.seed, st.preset, st.normalizer,
                                                  clean["error"] / 100, progress)
        if "perturbations" in suites:
            results["perturbations"] = _perturbations(wrapped, loader, device, st.perturbations or PERTURBATIONS,
                                                      st.batch_size, st.seed, st.preset, st.normalizer, progress)
        for attack, eps in (("fgsm", st.fgsm_eps), ("pgd", st.pgd_eps if st.pgd_eps is not None else st.fgsm_eps)):
            if attack in suites:
                results[attack] = _attack(wrapped, loader, device, attack, eps, st.pgd_steps, st.pgd_step_size,
                                          st.seed, progress)
        if "natural-adversarial" in suites:
            if st.natural_adversarial_root is None:
                raise ValueError("the natural-adversarial suite needs natural_adversarial_root")
            results["natural_adversarial"] = _natural_adversarial(
                model, Path(st.natural_adversarial_root), dataset, mean, std, class_names, device, st.batch_size,
                st.num_workers, progress)
    finally:
        model.train(was_training)
    return results


def _natural_adversarial(model, root, dataset, mean, std, class_names, device, batch_size, num_workers,
                         progress) -> dict:
    folders = [p.name for p in root.iterdir() if p.is_dir()] if root.is_dir() else []
    if folders and class_names is None and all(_WNID.match(f) for f in folders):
        # ImageNet-A protocol: resize 256, centre crop 224, logits restricted to the classes present
        return evaluate_imagenet_a(model, root, mean, std, device, batch_size, num_workers=num_workers,
                                   progress=progress)
    c, h, w = dataset[0][0].shape  # hard images are brought to the evaluation images' size
    return evaluate_image_folder(model, root, mean, std, class_names=class_names, device=device,
                                 batch_size=batch_size, image_size=min(h, w), resize=min(h, w), channels=c,
                                 num_workers=num_workers, progress=progress)


@torch.inference_mode()
def _clean(model, loader, device, progress) -> dict:
    top1 = top5 = n = 0
    for x, y in progress_bar(loader, desc="clean", unit="batch", enabled=progress):
        h1, h5 = topk_hits(model(x.to(device)).float(), y.to(device))
        top1, top5, n = top1 + h1.sum().item(), top5 + h5.sum().item(), n + len(y)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "error": 100.0 - 100.0 * top1 / n, "n": n}


@torch.inference_mode()
def _corruptions(model, loader, device, names, severities, seed, preset, normalizer, clean_error, progress) -> dict:
    errors = {name: [] for name in names}
    jobs = [(name, s) for name in names for s in severities]
    for name, s in progress_bar(jobs, desc="corruptions", unit="set", enabled=progress):
        wrong = n = 0
        for b, (x, y) in enumerate(loader):
            g = ops.new_generator(_seed(seed, "corruption", name, s, b), device)
            xc = corrupt(x.to(device), name, s, generator=g, preset=preset)
            wrong += (model(xc).argmax(1) != y.to(device)).sum().item()
            n += len(y)
        errors[name].append(wrong / n)
    out = _corruption_summary(errors, severities, normalizer, clean_error)
    out["preset"] = resolve_preset(preset, *next(iter(loader))[0].shape[-2:])
    return out


@torch.inference_mode()
def _perturbations(model, loader, device, names, batch_size, seed, preset, normalizer, progress) -> dict:
    fp, t5d, frames = {}, {}, {}
    for name in progress_bar(list(names), desc="perturbations", unit="set", enabled=progress):
        noise = name in NOISE_PERTURBATIONS
        fp_sum = t5_sum = 0.0
        n = 0
        for b, (x, _) in enumerate(loader):
            g = ops.new_generator(_seed(seed, "perturbation", name, b), device)
            x = x.to(device)
            # render a few sequences at a time: a sequence is ~31 images
            chunk = None
            for start in range(0, len(x), max(1, batch_size // 31)):
                seq = perturbation_sequence(x[start:start + max(1, batch_size // 31)], name, generator=g, preset=preset)
                S, T = seq.shape[:2]
                logits = model(seq.flatten(0, 1)).float().view(S, T, -1)
                fp_sum += flip_probability(logits.argmax(-1), noise, reduce=False).sum().item()
                t5_sum += top5_distance(logits, noise, reduce=False).sum().item()
                n += S
                chunk = T
            frames[name] = chunk
        fp[name], t5d[name] = fp_sum / n, t5_sum / n
    out: dict = {"flip_prob": {k: 100.0 * v for k, v in fp.items()},
                 "mean_flip_prob": 100.0 * sum(fp.values()) / len(fp),
                 "t5d": t5d, "mt5d": sum(t5d.values()) / len(t5d), "frames": frames,
                 "preset": resolve_preset(preset, *next(iter(loader))[0].shape[-2:])}
    if normalizer is not None:
        if normalizer != "alexnet":
            raise ValueError(f"unknown normalizer {normalizer!r} (only 'alexnet')")
        fr = flip_rates(fp, ALEXNET_FLIP_PROBS)
        out["normalizer"] = normalizer
        out["fr"] = {k: 100.0 * v for k, v in fr.items()}
        if fr:
            out["mfr"] = 100.0 * mfr(fr)
    return out


def _attack(model, loader, device, kind, eps_list, steps, step_size, seed, progress) -> dict:
    top1 = []
    for eps in progress_bar(list(eps_list), desc=kind, unit="eps", enabled=progress):
        correct = n = 0
        for b, (x, y) in enumerate(loader):
            x, y = x.to(device), y.to(device)
            e = float(eps) / 255
            if kind == "fgsm":
                adv = fgsm(model, x, y, e)
            else:
                g = ops.new_generator(_seed(seed, "pgd", eps, b), device)
                adv = pgd(model, x, y, e, steps=steps,
                          step_size=None if step_size is None else float(step_size) / 255, generator=g)
            with torch.inference_mode():
                correct += (model(adv).argmax(1) == y).sum().item()
            n += len(y)
        top1.append(100.0 * correct / n)
    out: dict = {"eps": [float(e) for e in eps_list], "top1": top1}
    if kind == "pgd":
        out["steps"] = steps
        out["step_size"] = [float(step_size) if step_size is not None else 2.5 * float(e) / max(steps, 1)
                            for e in eps_list]
    return out


def save_results(results: dict, path: str | Path) -> Path:
    """Write ``results`` as indented JSON (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, sort_keys=False) + "\n")
    return path
