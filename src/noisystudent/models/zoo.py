"""The paper's model family measured: sizes and costs, and the ``noisystudent models`` table.

The family itself (names, resolutions, noise defaults) and the chain presets are plain data in
:mod:`noisystudent.config.family` (``load_config`` expands presets, and config sits below models);
they are re-exported here.

Parameter and multiply-add counts are measured, never copied: each model is built on PyTorch's
``meta`` device (shapes only, no memory, no arithmetic) and one forward pass at the training
resolution runs under ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions and
matrix products (2 FLOPs per multiply-add; the EfficientNet papers' "FLOPs" are multiply-adds,
which is what the table shows).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..config.family import CHAIN_PRESETS, CPU_NETS, FAMILY, ModelSpec, chain_preset, format_chain_presets
from .factory import create_model, resolve_model_name

__all__ = ["ModelSpec", "CHAIN_PRESETS", "chain_preset", "format_chain_presets", "measure_model", "model_family",
           "model_spec", "stage_defaults", "format_model_table"]


def measure_model(name: str, size: int, num_classes: int = 1000, in_chans: int = 3) -> tuple[int, int]:
    """(parameters, multiply-adds per image at ``size`` px), built and run on the meta device."""
    with torch.device("meta"):
        model = create_model(name, num_classes, in_chans)
        model.eval()
        x = torch.empty(1, in_chans, size, size)
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
    params = sum(p.numel() for p in model.parameters())
    return params, counter.get_total_flops() // 2


@functools.lru_cache(maxsize=None)
def _measured(spec: ModelSpec) -> ModelSpec:
    params, macs = measure_model(spec.name, spec.train_size, spec.num_classes, spec.in_chans)
    return dataclasses.replace(spec, params=params, macs=macs)


def model_family(measure: bool = True, include_cpu: bool = True,
                 names: list[str] | None = None) -> list[ModelSpec]:
    """The paper's family (B0..B7, L0, L1, L2), then the CPU nets; with ``measure``, parameters and
    multiply-adds filled in (a few seconds for the whole family; cached per process)."""
    specs = list(FAMILY) + (list(CPU_NETS) if include_cpu else [])
    if names is not None:
        wanted = [resolve_model_name(n) for n in names]
        specs = [s for s in specs if s.name in wanted]
    return [_measured(s) for s in specs] if measure else specs


def model_spec(name: str) -> ModelSpec | None:
    """The family entry (unmeasured) for a model name or paper alias (``L0``), else None."""
    name = resolve_model_name(name)
    return next((s for s in FAMILY + CPU_NETS if s.name == name), None)


def stage_defaults(name: str) -> dict:
    """StageConfig-like defaults of a family model: image_size, test_size, dropout, drop_path.
    Empty for models outside the family (any other timm model)."""
    spec = model_spec(name)
    if spec is None:
        return {}
    d = spec.stage()
    d.pop("model")
    return d


def _fmt_count(n: int | None, unit: float) -> str:
    if n is None:
        return "-"
    x = n / unit
    return f"{x:.4f}" if x < 0.1 else f"{x:.2f}" if x < 10 else f"{x:.1f}"


def format_model_table(names: list[str] | None = None) -> str:
    """The `noisystudent models` listing: the family with measured size and cost, resolutions and
    noise defaults, and the released Noisy Student weights."""
    head = (f"{'model':<17} {'paper name':<16} {'w':>4} {'d':>4} {'params':>8} {'paper':>6} "
            f"{'GMACs':>8} {'train':>5} {'test':>5} {'dropout':>7} {'drop path':>9}  pretrained (timm tag)")
    lines = [head, "-" * len(head)]
    specs = model_family(names=names)
    for i, s in enumerate(specs):
        if i and s.name.startswith("ns_cnn") and not specs[i - 1].name.startswith("ns_cnn"):
            lines.append("")  # the CPU nets after the paper's family
        lines.append(
            f"{s.name:<17} {s.label:<16} {'-' if s.width is None else f'{s.width:g}':>4} "
            f"{'-' if s.depth is None else f'{s.depth:g}':>4} {_fmt_count(s.params, 1e6) + 'M':>8} "
            f"{'-' if s.paper_params is None else f'{s.paper_params:g}M':>6} "
            f"{_fmt_count(s.macs, 1e9):>8} "
            f"{s.train_size:>5} {s.test_size:>5} {s.dropout:>7g} {s.drop_path:>9g}  {s.pretrained or '-'}")
    lines += ["",
              "params: measured at 1000 classes and 3 channels (ns_cnn: 10 classes, 1 channel); GMACs:",
              "multiply-adds of one image at the train resolution (the EfficientNet papers' FLOPs), counted",
              "by torch FlopCounterMode on the meta device. drop path: stochastic depth at the last block",
              "(survival 1 - p, linear from 1.0 at the first). A test size above the train size means a",
              "fix-res fine-tune at the test size ends the chain. Pretrained tags need internet; any model",
              "also takes a local .pt/.pth/.safetensors file (StageConfig.pretrained)."]
    return "\n".join(lines)
