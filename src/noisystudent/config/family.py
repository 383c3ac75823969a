"""The paper's model family as data, and the student chains built from it as presets.

EfficientNet-B0..B7 and L0/L1/L2 with the width/depth multipliers of the paper, its train and
test resolutions, dropout (B0/B1 0.2, B2/B3 0.3, B4/B5 0.4, B6/B7 and L0/L1/L2 0.5: L0 and L1 are
not in the official builder; being larger than B7 they get B7's and L2's 0.5) and stochastic depth
0.2 at the last block (survival 0.8). The small CPU nets (``ns_cnn_s/m/l``) are listed too, with
this package's own defaults (those of the built-in digits experiment), not the paper's.

Plain data, in the config layer: ``load_config`` expands a ``chain`` preset with it. Measuring the
models (parameters, multiply-adds) needs them built, which is the models layer's
(:mod:`noisystudent.models.zoo`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..runtime.errors import ConfigError


@dataclass(frozen=True)
class ModelSpec:
    """One model of the family, its paper defaults and (when measured) its size and cost."""

    name: str                   # registered model name (timm.create_model)
    label: str                  # the paper's name
    width: float | None         # width multiplier of EfficientNet-B0
    depth: float | None         # depth multiplier of EfficientNet-B0
    train_size: int             # training resolution (px)
    test_size: int              # evaluation resolution (px); above train_size -> fix-res fine-tune
    dropout: float              # dropout before the classifier
    drop_path: float            # stochastic depth at the last block (1 - survival)
    paper_params: float | None  # parameters in the paper's table (millions), for comparison
    pretrained: str | None      # timm tag of the released Noisy Student weights, if any
    num_classes: int = 1000     # classes and input channels the counts are measured at
    in_chans: int = 3
    params: int | None = None   # measured parameters
    macs: int | None = None     # measured multiply-adds of one image at train_size

    def stage(self, **overrides) -> dict:
        """A StageConfig-like dict with this model's defaults."""
        d = {"model": self.name, "image_size": self.train_size, "test_size": self.test_size,
             "dropout": self.dropout, "drop_path": self.drop_path}
        d.update(overrides)
        return d


def _effnet(v: str, w: float, d: float, train: int, test: int, dropout: float, params: float | None,
            ns: bool) -> ModelSpec:
    tf_name = f"tf_efficientnet_{v}.ns_jft_in1k" if ns else None
    return ModelSpec(name=f"efficientnet_{v}", label=f"EfficientNet-{v.upper()}", width=w, depth=d,
                     train_size=train, test_size=test, dropout=dropout, drop_path=0.2,
                     paper_params=params, pretrained=tf_name)


# Width/depth/resolution/dropout: EfficientNet's builder (B0-B7, L2) and the Noisy Student paper's
# table (L0, L1, L2 resolutions and parameter counts). L2 trains at 475 and is tested at 800.
FAMILY: tuple[ModelSpec, ...] = (
    _effnet("b0", 1.0, 1.0, 224, 224, 0.2, 5.3, True),
    _effnet("b1", 1.0, 1.1, 240, 240, 0.2, 7.8, True),
    _effnet("b2", 1.1, 1.2, 260, 260, 0.3, 9.2, True),
    _effnet("b3", 1.2, 1.4, 300, 300, 0.3, 12.0, True),
    _effnet("b4", 1.4, 1.8, 380, 380, 0.4, 19.0, True),
    _effnet("b5", 1.6, 2.2, 456, 456, 0.4, 30.0, True),
    _effnet("b6", 1.8, 2.6, 528, 528, 0.5, 43.0, True),
    _effnet("b7", 2.0, 3.1, 600, 600, 0.5, 66.0, True),
    _effnet("l0", 2.8, 3.7, 380, 600, 0.5, 140.0, False),
    _effnet("l1", 3.9, 3.7, 380, 600, 0.5, 273.0, False),
    _effnet("l2", 4.3, 5.3, 475, 800, 0.5, 480.0, True),
)
# CPU nets for 8-32 px images (10 classes, one channel as measured); defaults of configs/digits.yaml.
CPU_NETS: tuple[ModelSpec, ...] = tuple(
    ModelSpec(name=n, label=n, width=None, depth=None, train_size=16, test_size=16, dropout=0.3,
              drop_path=0.1, paper_params=None, pretrained=None, num_classes=10, in_chans=1)
    for n in ("ns_cnn_s", "ns_cnn_s_wide", "ns_cnn_m", "ns_cnn_l"))


# ------------------------------------------------------------------------------ chains


def _chain(models: list[str], **overrides) -> list[dict]:
    by_name = {s.name: s for s in FAMILY + CPU_NETS}
    return [by_name[m].stage(**overrides) for m in models]


def _cpu_fixres() -> list[dict]:
    # Train at 20 px, evaluate intermediate stages at their train size, and the last student at
    # 28 px (MNIST / Fashion-MNIST size): the fix-res fine-tune at 28 px ends the chain.
    chain = _chain(["ns_cnn_s", "ns_cnn_s", "ns_cnn_m", "ns_cnn_l"], image_size=20, test_size=20)
    chain[-1]["test_size"] = 28
    return chain


CHAIN_PRESETS: dict[str, tuple[str, object]] = {
    "paper": ("the paper's chain: EfficientNet-B7 teacher, then B7, L0, L1, L2, L2 students, each at "
              "its paper resolutions (L2: train 475, test 800)",
              lambda: _chain(["efficientnet_b7", "efficientnet_b7", "efficientnet_l0", "efficientnet_l1",
                              "efficientnet_l2", "efficientnet_l2"])),
    "cpu": ("CPU-sized, 16 px (digits): ns_cnn_s teacher, then ns_cnn_s, ns_cnn_m, ns_cnn_l",
            lambda: _chain(["ns_cnn_s", "ns_cnn_s", "ns_cnn_m", "ns_cnn_l"])),
    "cpu-fixres": ("CPU-sized, for 28 px images (Fashion-MNIST): ns_cnn_s teacher, then ns_cnn_s, "
                   "ns_cnn_m, ns_cnn_l, all trained at 20 px; the last is fine-tuned and tested at 28 px",
                   _cpu_fixres),
}


def format_chain_presets() -> str:
    """The chain presets, one block each: name, description, and the stages."""
    lines = []
    for name, (text, _) in CHAIN_PRESETS.items():
        stages = " -> ".join(f"{d['model']}@{d['image_size']}"
                             + (f"/{d['test_size']}" if d["test_size"] != d["image_size"] else "")
                             for d in chain_preset(name))
        lines += [f"{name}: {text}", f"    {stages}"]
    return "\n".join(lines)


def chain_preset(name: str) -> list[dict]:
    """A named chain as StageConfig-like dicts ``{model, image_size, test_size, dropout,
    drop_path}``: the first is the teacher, the rest the students in order."""
    if name not in CHAIN_PRESETS:
        raise ConfigError(f"unknown chain preset {name!r}; known: {', '.join(CHAIN_PRESETS)}")
    return [dict(d) for d in CHAIN_PRESETS[name][1]()]


# ------------------------------------------------------------------------------ model names

# timm's model sources: a name that is a Hugging Face hub repository or a local folder (config.json + weights)
MODEL_SOURCE_PREFIXES = ("hf-hub:", "hf_hub:", "local-dir:")
_ALIAS = re.compile(r"^(?:efficientnet[-_ ]?)?([bl])([0-9])$")


def _buildable(name: str) -> bool:
    """A model timm builds: one of its own, or one of the family this package registers with timm
    (EfficientNet-L0/L1, the ns_cnn nets) when noisystudent.models.factory is imported. Named here
    so that checking a config does not need the models layer. timm is imported here, when a name
    is checked, not with the module: importing the package must not load torch (configure_cpu)."""
    import timm

    return any(s.name == name for s in FAMILY + CPU_NETS) or timm.is_model(name)


def resolve_model_name(name: str) -> str:
    """Paper-style names to registered ones: ``B7``, ``EfficientNet-L0``, ``efficientnet-l2`` ->
    ``efficientnet_b7``, ``efficientnet_l0``, ``efficientnet_l2``. Other names pass unchanged."""
    m = _ALIAS.match(name.strip().lower())
    if m and not _buildable(name):
        candidate = f"efficientnet_{m.group(1)}{m.group(2)}"
        if _buildable(candidate):
            return candidate
    return name


def is_known_model(name: str) -> bool:
    """A name :func:`noisystudent.models.factory.create_model` can build: a registered model (paper
    aliases such as ``B7`` included), or a ``hf-hub:org/repo`` / ``local-dir:PATH`` source, whose
    architecture is read from its ``config.json`` when the model is built."""
    return name.startswith(MODEL_SOURCE_PREFIXES) or _buildable(resolve_model_name(name))
