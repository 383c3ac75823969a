"""The model card (``README.md``) written beside an exported model: Hugging Face's format, YAML
front matter then Markdown, rendered with Jinja2 from the run's own records.

What it says comes from the run directory: ``summary.json`` (every stage's accuracy, the final
model and why, the Noisy Student gain over the same architecture on the labels alone, the
robustness headlines), ``config.yaml`` (the data and the recipe), ``data.json`` (the split sizes
the run used) and the exported ``config.json`` (classes, preprocessing). Nothing is measured here.
"""

from __future__ import annotations

import math
import re

import jinja2
import yaml

# timm's own cards start with these tags; the architecture and the method follow.
_BASE_TAGS = ("image-classification", "timm", "noisy-student")
# data.source values that are datasets on the Hugging Face hub (front matter ``datasets:``)
_HUB_DATASETS = {"digits": None, "fashion-mnist": "zalando-datasets/fashion_mnist", "fashion_mnist":
                 "zalando-datasets/fashion_mnist", "mnist": "ylecun/mnist", "cifar10": "uoft-cs/cifar10",
                 "cifar-10": "uoft-cs/cifar10"}

_TEMPLATE = """\
---
library_name: timm
license: {{ license_id }}
pipeline_tag: image-classification
tags:
{%- for tag in tags %}
- {{ tag }}
{%- endfor %}
{%- if datasets %}
datasets:
{%- for d in datasets %}
- {{ d }}
{%- endfor %}
{%- endif %}
metrics:
- accuracy
---

# {{ title }}

An image classifier ({{ architecture }}, {{ num_classes }} classes) trained with **Noisy Student**
self-training (Xie et al., *Self-training with Noisy Student improves ImageNet classification*,
CVPR 2020) with noisystudent: a teacher trained on the
labeled images labels the unlabeled ones, and a student of equal or larger size learns from both
under noise (RandAugment, dropout, stochastic depth); the student then teaches the next one.
This is the run's **{{ stage }}** model{% if reason %} ({{ reason }}){% endif %}.

## Data

| | |
|---|---|
| source | `{{ data.source }}` |
| classes | {{ num_classes }}: {{ classes | join(", ") }} |
{%- for key, value in data_rows %}
| {{ key }} | {{ value }} |
{%- endfor %}

## Training chain

| stage | model | params | train / test px | val top-1 | test top-1 |
|---|---|---:|---|---:|---:|
{%- for s in stages %}
| {{ s.name }}{% if s.name == stage %} **(exported)**{% endif %} | {{ s.model }} | {{ s.params }} | {{ s.sizes }} | {{ s.val }} | {{ s.test }} |
{%- endfor %}
{% if gain %}
**Noisy Student gain**: {{ gain.test }} test top-1 ({{ gain.val }} val) for {{ gain.student }} ({{ gain.student_model }})
over the same architecture trained on the labeled images alone ({{ gain.baseline }}, {{ gain.baseline_model }}).
{% endif %}
{%- if robustness %}

## Robustness

| model | {{ robustness.columns | join(" | ") }} |
|---|{% for _ in robustness.columns %}---:|{% endfor %}
{%- for row in robustness.rows %}
| {{ row.name }} | {{ row["values"] | join(" | ") }} |
{%- endfor %}
{% endif %}

## Preprocessing

Images are resized to {{ test_size }} px (`{{ pre.interpolation }}`{% if pre.crop %}, {{ pre.crop }}{% endif %}),
scaled to [0, 1] and normalised with mean {{ pre.mean }} and std {{ pre.std }}
({{ pre.channels }} channel{{ "s" if pre.channels != 1 else "" }}). `config.json`'s `pretrained_cfg` holds the same,
so `timm.data.resolve_model_data_config(model)` gives it back.

## How to use

{%- if timm_native %}

With timm alone:

```python
import timm
import torch
from PIL import Image

model = timm.create_model("{{ load_name }}", pretrained=True).eval()
config = timm.data.resolve_model_data_config(model)
transform = timm.data.create_transform(**config, is_training=False)
image = Image.open("image.png").convert("{{ pil_mode }}")
with torch.no_grad():
    probabilities = model(transform(image).unsqueeze(0)).softmax(-1)
print(model.pretrained_cfg["label_names"][probabilities.argmax().item()])
```
{%- else %}

The architecture (`{{ architecture }}`) is registered with timm by noisystudent
(`pip install noisystudent`); once `noisystudent.models.factory` is imported, timm builds it:

```python
import noisystudent.models.factory  # registers {{ architecture }} with timm
import timm

model = timm.create_model("{{ load_name }}", pretrained=True).eval()
```
{%- endif %}

With noisystudent (any architecture; the same preprocessing as the run's evaluation):

```python
from noisystudent.models.export import load_exported

model, config = load_exported("{{ local_dir }}")
```
{%- if hub_name %}

(`{{ local_dir }}` is a local copy: `huggingface_hub.snapshot_download("{{ hub_name }}")`.)
{%- endif %}
{%- if onnx %}

`model.onnx` takes `image` (N x {{ pre.channels }} x {{ test_size }} x {{ test_size }}, normalised as above; N is dynamic) and gives
`logits`; it was checked against the PyTorch model at export (max abs difference {{ onnx }}).
{%- endif %}

## Training configuration

```yaml
{{ config_yaml }}```
"""


def _pct(value) -> str:
    return "–" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:.2f}"


def _signed(value) -> str:
    return "–" if not isinstance(value, (int, float)) or math.isnan(value) else f"{value:+.2f}"


def _params(n) -> str:
    return "–" if not n else f"{n / 1e6:.2f}M"


def _stage_rows(summary: dict) -> list[dict]:
    rows = []
    for s in summary.get("stages") or []:
        train = s.get("train_size") or s.get("image_size")
        test = s.get("test_size") or s.get("image_size")
        rows.append({"name": s.get("name", "?"), "model": s.get("model", "?"), "params": _params(s.get("params")),
                     "sizes": f"{train} / {test}", "val": _pct(s.get("val_top1")), "test": _pct(s.get("test_top1"))})
    return rows


def _natural(key: str) -> list:
    """Sort key reading the numbers in a name as numbers: fgsm.top1@eps2 before fgsm.top1@eps16."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+(?:\.\d+)?)", key))]


def _robustness(summary: dict) -> dict | None:
    """The summary's robustness headlines as one table: a row per model, a column per figure."""
    figures = summary.get("robustness") or {}
    keys = sorted({k for values in figures.values() if isinstance(values, dict) for k in values}, key=_natural)
    if not keys:
        return None
    rows = [{"name": name, "values": [_pct(values.get(k)) for k in keys]}
            for name, values in figures.items() if isinstance(values, dict)]
    return {"columns": keys, "rows": rows}


def _count(total, per_class) -> str:
    """``200 (20 per class)``, or with a range when the classes differ."""
    sizes = [n for n in per_class or [] if isinstance(n, int)]
    if not sizes:
        return str(total)
    each = str(sizes[0]) if min(sizes) == max(sizes) else f"{min(sizes)}-{max(sizes)}"
    return f"{total} ({each} per class)"


def _data_rows(summary: dict, config: dict, splits: dict | None) -> list[tuple[str, str]]:
    """The data table: the split sizes the run used (``data.json``), else what the config asked
    for; the config's ``test_per_class`` only with ``data.json``, which says whether it applied
    (a source with its own test split ignores it)."""
    data = config.get("data") or {}
    rows = []
    if splits and splits.get("num_labeled") is not None:
        for key, label in (("labeled", "labeled images"), ("val", "validation images"), ("test", "test images")):
            if splits.get(f"num_{key}") is not None:
                rows.append((label, _count(splits[f"num_{key}"], splits.get(f"{key}_per_class"))))
    else:
        for key, label in (("labels_per_class", "labels per class"), ("val_per_class", "validation images per class")):
            if data.get(key) is not None:
                rows.append((label, str(data[key])))
    if data.get("image_size") is not None:
        rows.append(("image size (px)", str(data["image_size"])))
    if data.get("unlabeled"):
        rows.append(("unlabeled images", f"`{data['unlabeled']}`"))
    pool = summary.get("pool") or {}
    if pool.get("listed") is not None:
        rows.append(("unlabeled pool", f"{pool['listed']} images ({pool.get('kind', '?')})"))
    return rows


def render_model_card(*, summary: dict, config: dict, export_config: dict, stage: str, license_id: str = "apache-2.0",
                      repo_id: str | None = None, onnx_max_abs_diff: float | None = None,
                      local_dir: str = "path/to/export", splits: dict | None = None) -> str:
    """The model card (Markdown with YAML front matter) of an exported model.

    ``summary``: the run's ``summary.json`` (may be ``{}`` for an unfinished run); ``config``: its
    ``config.yaml`` as a dict; ``export_config``: the exported ``config.json``; ``stage``: the
    exported stage; ``license_id``: the front matter's license (the hub's identifiers);
    ``repo_id``: the hub repository it is pushed to, if any (the loading example then names
    ``hf-hub:REPO_ID``, else ``local-dir:``); ``onnx_max_abs_diff``: the ONNX check's
    result, when ``model.onnx`` was written; ``splits``: the run's ``data.json`` (the split sizes
    it used), when there is one.
    """
    cfg = export_config["pretrained_cfg"]
    ns = export_config.get("noisystudent") or {}
    architecture = export_config["architecture"]
    data = config.get("data") or {}
    source = str(data.get("source", "?"))
    dataset = _HUB_DATASETS.get(source.lower())
    channels = int(cfg["input_size"][0])
    crop = (f"centre crop {cfg['crop_pct']:g}" if cfg.get("crop_mode", "center") == "center"
            else f"{cfg['crop_mode']} {cfg['crop_pct']:g}") if cfg.get("crop_pct") not in (None, 1.0) else ""
    final = summary.get("final") or {}
    gain = summary.get("ns_gain")
    if gain:
        gain = {**gain, "test": _signed(gain.get("test")), "val": _signed(gain.get("val"))}
    title = f"{architecture} (Noisy Student, {source})" if not repo_id else repo_id.split("/")[-1]
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    return env.from_string(_TEMPLATE).render(
        license_id=license_id, tags=[*_BASE_TAGS, architecture], datasets=[dataset] if dataset else [],
        title=title, architecture=architecture, num_classes=export_config["num_classes"],
        classes=[str(c) for c in export_config.get("label_names") or []], stage=stage,
        reason=final.get("reason") if final.get("stage") == stage else None,
        data={"source": source}, data_rows=_data_rows(summary, config, splits), stages=_stage_rows(summary),
        gain=gain or None, robustness=_robustness(summary), test_size=ns.get("test_size", cfg["input_size"][-1]),
        pre={"interpolation": cfg.get("interpolation", "bilinear"), "crop": crop, "channels": channels,
             "mean": _vector(cfg["mean"]), "std": _vector(cfg["std"])},
        timm_native=bool(ns.get("timm_native", True)),
        load_name=f"hf-hub:{repo_id}" if repo_id else f"local-dir:{local_dir}",
        hub_name=repo_id, local_dir=local_dir, pil_mode="L" if channels == 1 else "RGB",
        onnx=None if onnx_max_abs_diff is None else f"{onnx_max_abs_diff:.2e}",
        config_yaml=yaml.safe_dump(config, sort_keys=False, default_flow_style=False))


def _vector(values) -> str:
    return "(" + ", ".join(f"{float(v):.4f}" for v in values) + ")"
