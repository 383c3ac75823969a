"""Robustness plots (matplotlib): several models on the same axes.

Figures are made with matplotlib's object API (``Figure``, which renders with Agg), not pyplot: no
global backend switch on import, no figure registry to close, and matplotlib is imported only when
a plot is drawn, so commands that draw none do not pay for it at start-up.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping


def _figure(figsize: tuple[float, float]):
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _models_with(results_by_model: Mapping[str, dict], key: str) -> dict[str, dict]:
    return {name: res[key] for name, res in results_by_model.items() if isinstance(res, dict) and key in res}


def plot_corruptions(results_by_model: Mapping[str, dict], path: Path) -> Path | None:
    """Error (%) against severity, one panel per corruption, one line per model."""
    data = _models_with(results_by_model, "corruptions")
    if not data:
        return None
    names = list(dict.fromkeys(n for d in data.values() for n in d["error"]))
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure((3.0 * cols, 2.5 * rows))
    axes = fig.subplots(rows, cols, squeeze=False, sharey=True)
    for ax, name in zip(axes.flat, names):
        for model, d in data.items():
            if name in d["error"]:
                ax.plot(d.get("severities", range(1, 6)), d["error"][name], marker="o", label=model)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel("severity", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("error (%)")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_attacks(results_by_model: Mapping[str, dict], path: Path) -> Path | None:
    """Top-1 accuracy (%) against eps (0-255 units): FGSM solid, PGD dashed, one colour per model."""
    if not any(k in res for res in results_by_model.values() for k in ("fgsm", "pgd")):
        return None
    fig = _figure((5, 3.5))
    ax = fig.subplots()
    for i, (model, res) in enumerate(results_by_model.items()):
        colour = f"C{i}"
        if "fgsm" in res:
            ax.plot(res["fgsm"]["eps"], res["fgsm"]["top1"], marker="o", color=colour, label=f"{model} FGSM")
        if "pgd" in res:
            ax.plot(res["pgd"]["eps"], res["pgd"]["top1"], marker="s", ls="--", color=colour,
                    label=f"{model} PGD-{res['pgd'].get('steps', '')}")
    ax.set_xlabel("eps (0-255 pixel units)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_perturbations(results_by_model: Mapping[str, dict], path: Path) -> Path | None:
    """Flip rate (AlexNet-normalised, when present) or flip probability (%) per perturbation,
    grouped bars, one colour per model."""
    data = _models_with(results_by_model, "perturbations")
    if not data:
        return None
    key = "fr" if all("fr" in d for d in data.values()) else "flip_prob"
    names = list(dict.fromkeys(n for d in data.values() for n in d[key]))
    width = 0.8 / len(data)
    fig = _figure((max(5, 0.8 * len(names) + 2), 3.5))
    ax = fig.subplots()
    for i, (model, d) in enumerate(data.items()):
        xs = [j + (i - (len(data) - 1) / 2) * width for j in range(len(names))]
        ax.bar(xs, [d[key].get(n, float("nan")) for n in names], width=width, label=model)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_", " ") for n in names], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("flip rate (% of AlexNet)" if key == "fr" else "flip probability (%)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_robustness(results_by_model: Mapping[str, dict], out_dir: str | Path) -> list[Path]:
    """Write the plots the results allow (corruption error vs severity, accuracy vs eps, flip
    rate per perturbation) as PNGs in ``out_dir``; e.g. ``{"teacher": res, "student": res}``.

    Returns the paths written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [plot_corruptions(results_by_model, out_dir / "corruption_error_vs_severity.png"),
               plot_attacks(results_by_model, out_dir / "adversarial_accuracy_vs_eps.png"),
               plot_perturbations(results_by_model, out_dir / "perturbation_flip_rate.png")]
    return [p for p in written if p is not None]
