"""Teacher weights from elsewhere: a timm pretrained tag or a local checkpoint / safetensors file.

Accepted sources (``load_pretrained(model, source, num_classes)``):

* a timm pretrained tag, ``architecture.tag`` (e.g. ``tf_efficientnet_b0.ns_jft_in1k``, the
  released Noisy Student weights), ``hf-hub:org/repo``, or ``local-dir:PATH`` (a folder written
  by timm's ``save_for_hf`` or ``noisystudent export``: ``config.json`` + weights); loaded by
  timm's own ``timm.models.load_pretrained`` (download or timm's cache, so a tag or hub model
  needs internet once; a local folder never does);
* a local file: ``.safetensors``, or anything ``torch.load`` reads with ``weights_only=True``
  (``.pt``/``.pth``/``.bin``/``.ckpt``) holding a plain state dict (timm's format), our own
  checkpoint (:func:`noisystudent.models.checkpoint.save_model`), or a wrapper ``{"state_dict": ...}``,
  ``{"model": ...}``, ``{"model_state_dict": ...}``. ``module.`` (DDP) and ``_orig_mod.``
  (``torch.compile``) prefixes are removed.

The weights' preprocessing (:func:`pretrained_data_config`: mean, std, interpolation, crop, from
the tag's or folder's ``pretrained_cfg``, or what a checkpoint or a ``config.json`` beside a file
records) is what a stage starting from them trains, labels and evaluates with.

Every tensor outside the classifier must fit the model by name and shape; otherwise the file is
for another architecture and a one-line :class:`~noisystudent.runtime.errors.CheckpointError` names the
file and the mismatch. The classifier is loaded when its class count matches; otherwise it is
replaced by a new, randomly initialised head for ``num_classes`` and a warning says so. A first
convolution trained on another number of input channels (RGB weights, grayscale data) is adapted
with timm's ``adapt_input_conv`` (summed for one channel), also with a warning.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..runtime.errors import CheckpointError, DataError, error_reason
from ..runtime.files import read_torch_file

log = logging.getLogger("noisystudent")

LOCAL_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".tar")
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")
_PREFIXES = ("module.", "_orig_mod.")
HUB_PREFIXES = ("hf-hub:", "hf_hub:")
LOCAL_DIR_PREFIX = "local-dir:"
_TIMM_SOURCE_PREFIXES = (*HUB_PREFIXES, LOCAL_DIR_PREFIX)  # names timm.create_model resolves itself


def model_architecture(model: nn.Module) -> str:
    """The registered name a model was built from (timm's ``pretrained_cfg['architecture']``)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def is_local_source(source: str) -> bool:
    """A path (existing, or with a weight-file suffix or a path separator), not a timm tag nor a
    ``hf-hub:`` / ``local-dir:`` name."""
    if source.startswith(_TIMM_SOURCE_PREFIXES):
        return False
    p = Path(source).expanduser()
    return p.exists() or p.suffix.lower() in LOCAL_SUFFIXES or "/" in source or "\\" in source


# ------------------------------------------------------------------------------ reading


def _torch_load(path: Path, mmap: bool = False) -> object:
    # timm's training checkpoints also hold the argparse Namespace of the run: allow that one class.
    return read_torch_file(path, "weight file", mmap=mmap, allow=[argparse.Namespace])


def _safetensors_load(path: Path, meta: bool) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        if not meta:
            return load_file(str(path), device="cpu")
        with safe_open(str(path), framework="pt") as f:  # the header alone: names, shapes, dtypes
            return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types for foreign files
        raise CheckpointError(f"not a safetensors weight file: {path} ({error_reason(e)})") from None


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], str | None]:
    """The tensors of a local weight file and, when the file names it, its architecture."""
    state, arch, _ = read_weight_file(path)
    return state, arch


def read_weight_file(path: str | Path, *, lazy: bool = False
                     ) -> tuple[dict[str, torch.Tensor], str | None, list[str] | None]:
    """One read of a local weight file: its tensors, its architecture and its class names (the
    last two when the file names them, as our own checkpoints do). ``lazy``: for checks of names
    and shapes only; tensors are memory-mapped (PyTorch zip files) or meta tensors (safetensors),
    so even a file of many GB costs little."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"pretrained weights not found: {path}")
    if path.suffix.lower() == ".safetensors":
        obj: object = _safetensors_load(path, meta=lazy)
    else:
        obj = _torch_load(path, mmap=lazy)
    arch, classes = None, None
    if isinstance(obj, dict) and isinstance(obj.get("classes"), (list, tuple)):
        classes = [str(c) for c in obj["classes"]]
    for _ in range(3):  # unwrap {"state_dict": {...}} and the like, at most a few levels
        if not isinstance(obj, dict) or _all_tensors(obj):
            break
        if isinstance(obj.get("model"), str):
            arch = obj["model"]  # our own checkpoint format names its architecture
        elif isinstance(obj.get("arch"), str):
            arch = obj["arch"]
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj or not _all_tensors(obj):
        raise CheckpointError(f"{path} holds no state dict (expected tensors by name, or a "
                              f"'state_dict'/'model' entry holding them)")
    return _strip_prefixes(obj), arch, classes


def check_class_names(source: str, theirs: list[str], ours: list[str], used_as_is: bool) -> None:
    """Weights that name their classes must name the data's, in order; a model used without
    training (epochs 0) must also have as many. (Weights that do not name them, e.g. ImageNet
    ones, only get their head replaced when the class count differs.)"""
    if len(theirs) == len(ours) and list(theirs) != list(ours):
        raise DataError(f"teacher checkpoint {source} was trained on classes {list(theirs)}, "
                        f"but the data has {list(ours)}")
    if used_as_is and len(theirs) != len(ours):
        raise DataError(f"teacher checkpoint {source} has {len(theirs)} classes and the data {len(ours)}; "
                        "a teacher used without training (epochs 0) needs the same classes")


def _all_tensors(d: dict) -> bool:
    return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def timm_pretrained_cfg(tag: str):
    """timm's record of a pretrained tag, checked without any download: the architecture exists
    and timm knows weights for the tag. Raises :class:`CheckpointError` otherwise."""
    from timm.models import get_pretrained_cfg, is_model, split_model_name_tag

    arch, _ = split_model_name_tag(tag)
    if not is_model(arch):
        raise CheckpointError(f"unknown pretrained source {tag!r}: not a file, and {arch!r} is not a timm model")
    try:
        cfg = get_pretrained_cfg(tag, allow_unregistered=False)
    except RuntimeError as e:
        raise CheckpointError(f"unknown pretrained tag {tag!r}: {e}") from None
    if cfg is None or not cfg.has_weights:
        raise CheckpointError(f"timm has no pretrained weights for {tag!r}")
    return cfg


def local_dir_pretrained_cfg(source: str) -> dict:
    """timm's ``pretrained_cfg`` of a ``local-dir:PATH`` folder (its ``config.json``, read by
    timm's ``load_model_config_from_path``), pointing timm's loader at the folder's weights."""
    from timm.models import _hub

    folder = Path(source[len(LOCAL_DIR_PREFIX):]).expanduser()
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{source}: {folder} is not a model folder (no config.json; timm's save_for_hf "
                              "and noisystudent export write one)")
    if not hasattr(_hub, "load_model_config_from_path"):  # added to timm with local-dir: names
        import timm

        raise CheckpointError(f"{source}: local-dir: sources need a newer timm than {timm.__version__}")
    try:
        cfg, architecture, _ = _hub.load_model_config_from_path(folder)
    except Exception as e:  # noqa: BLE001 - a foreign or broken config.json
        raise CheckpointError(f"{folder / 'config.json'} is not a timm model config ({error_reason(e)})") from None
    return {**cfg, "architecture": architecture, "file": str(folder), "source": "local-dir"}


def tag_pretrained_cfg(tag: str) -> dict:
    """timm's ``pretrained_cfg`` for a tag, as the dict :func:`timm.models.load_pretrained` takes:
    from timm's registry (no download), for ``local-dir:PATH`` from the folder's ``config.json``,
    or, for ``hf-hub:org/repo``, from the repository's ``config.json`` (a download)."""
    if tag.startswith(LOCAL_DIR_PREFIX):
        return local_dir_pretrained_cfg(tag)
    if tag.startswith(HUB_PREFIXES):
        from timm.models import load_model_config_from_hf

        try:
            cfg, architecture, _ = load_model_config_from_hf(tag.split(":", 1)[1])
        except Exception as e:  # network, hub and cache errors
            raise CheckpointError(f"could not fetch pretrained weights {tag!r} ({error_reason(e)})") from None
        return {**cfg, "architecture": architecture, "hf_hub_id": tag.split(":", 1)[1], "source": "hf-hub"}
    return timm_pretrained_cfg(tag).to_dict()


def _load_timm_tag(model: nn.Module, tag: str, num_classes: int | None, tag_arch: str | None,
                   classes: list[str] | None = None, used_as_is: bool = False) -> list[str]:
    """Weights of a timm tag through timm's own loader (``timm.models.load_pretrained``: the
    download or timm's cache, input-conv adaptation, the classifier dropped on another class
    count), with this module's checks run on the fetched tensors first (its ``filter_fn``), so a
    mismatch is the same one-line error as for a local file."""
    from timm.models import load_pretrained as timm_load_pretrained

    pretrained_cfg = tag_pretrained_cfg(tag)
    label_names = pretrained_cfg.get("label_names")  # a config.json's (local-dir:, hf-hub:) class names
    if classes is not None and isinstance(label_names, (list, tuple)):
        check_class_names(tag, [str(c) for c in label_names], classes, used_as_is)
    messages: list[str] = []

    def check(state: dict, model: nn.Module) -> dict:
        state = _strip_prefixes(dict(state))
        messages.extend(apply_state_dict(model, state, source=tag, num_classes=num_classes, file_arch=tag_arch,
                                         check_only=True))  # also resets the head to num_classes
        return state

    first = _first_conv(model)
    in_chans = model.get_submodule(first).weight.shape[1] if first else 3
    try:
        timm_load_pretrained(model, pretrained_cfg=pretrained_cfg, in_chans=in_chans, filter_fn=check,
                             num_classes=_num_classes(model, _classifier(model)[1]) if num_classes is None
                             else num_classes)
    except (CheckpointError, DataError):
        raise
    except Exception as e:  # network, hub and cache errors
        if tag.startswith(LOCAL_DIR_PREFIX):
            raise CheckpointError(f"could not read pretrained weights {tag!r} ({error_reason(e)})") from None
        raise CheckpointError(f"could not fetch pretrained weights {tag!r} ({error_reason(e)}); offline? "
                              "download once where online, or pass a local file") from None
    for m in messages:
        log.warning(m)
    done = f"{tag}: loaded through timm into {model_architecture(model)}"
    log.info(done)
    return messages + [done]


# ------------------------------------------------------------------------------ loading


def _module_name(model: nn.Module, module: nn.Module | None) -> str | None:
    if module is None:
        return None
    for name, m in model.named_modules():
        if m is module:
            return name
    return None


def _classifier(model: nn.Module) -> tuple[str | None, nn.Module | None]:
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(head, nn.Module) and any(True for _ in head.parameters()):
        return _module_name(model, head), head
    return None, None


def _first_conv(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("first_conv")
    if isinstance(name, str):
        return name
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return n
    return None


def _shape(t: torch.Tensor) -> str:
    return "x".join(str(s) for s in t.shape) or "scalar"


def _num_classes(model: nn.Module, head: nn.Module | None) -> int | None:
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim >= 1:
        return int(weight.shape[0])
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def apply_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                     num_classes: int | None = None, file_arch: str | None = None,
                     check_only: bool = False) -> list[str]:
    """Load ``state`` into ``model``: strict outside the classifier, head replaced on a class-count
    change, first conv adapted on an input-channel change. Returns messages (also logged).
    ``check_only``: raise the same errors, but load nothing and log nothing (``state`` and
    ``model`` may then be meta tensors: only names and shapes are compared)."""
    arch = model_architecture(model)
    messages: list[str] = []
    head_name, head = _classifier(model)
    if num_classes is not None and head is not None and _num_classes(model, head) != num_classes:
        model.reset_classifier(num_classes)
        head_name, head = _classifier(model)
    model_sd = model.state_dict()
    head_keys = {f"{head_name}.{k}" if head_name else k for k in head.state_dict()} if head is not None else set()
    if head is None:  # a headless model (num_classes=0): the file's classifier is not needed
        cfg_head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if isinstance(cfg_head, str) and any(k.startswith(cfg_head + ".") for k in state):
            state = {k: v for k, v in state.items() if not k.startswith(cfg_head + ".")}
            messages.append(f"{source}: the model has no classifier; the file's ({cfg_head}) is not used")
    first_conv = _first_conv(model)
    first_key = f"{first_conv}.weight" if first_conv else None
    adapt_input = _check_body_fits(state, model_sd, head_keys, first_key,
                                   f"{source}: weights for another architecture than {arch}", file_arch, arch)

    load = {k: v for k, v in state.items() if k in model_sd and k not in head_keys}
    if adapt_input and first_key is not None and not check_only:
        from timm.models import adapt_input_conv

        old = state[first_key]
        in_chans = model_sd[first_key].shape[1]
        load[first_key] = adapt_input_conv(in_chans, old.float()).to(old.dtype)
        messages.append(f"{source}: first convolution {first_conv} adapted from {old.shape[1]} to "
                        f"{in_chans} input channels")
    if head_keys:
        head_load, message = _head_tensors(state, model_sd, head_name, head_keys, _num_classes(model, head),
                                           source, arch)
        load.update(head_load)
        messages += [message] if message else []
    if check_only:
        return messages
    result = model.load_state_dict(load, strict=False)
    leftover = [k for k in result.missing_keys if k not in head_keys and not _is_optional(k)]
    if leftover or result.unexpected_keys:  # guarded above; a safety net for exotic modules
        raise CheckpointError(f"{source}: weights do not fit {arch} (missing {leftover[:1]}, "
                              f"unexpected {result.unexpected_keys[:1]})")
    for m in messages:
        log.warning(m)
    done = f"{source}: loaded {len(load)} tensors into {arch}"
    log.info(done)
    return messages + [done]


def _is_optional(key: str) -> bool:
    """A buffer a file may lack (older BatchNorm saves have no batch counter)."""
    return key.endswith("num_batches_tracked")


def _check_body_fits(state: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], head_keys: set[str],
                     first_key: str | None, error: str, file_arch: str | None, arch: str) -> bool:
    """Raise ``error`` with what differs where the file's tensors outside the classifier are not
    the model's (names and shapes); True where only the first conv's input channels differ
    (adapted on load)."""
    missing = [k for k in model_sd if k not in state and k not in head_keys and not _is_optional(k)]
    unexpected = [k for k in state if k not in model_sd and k not in head_keys]
    wrong_shape, adapt_input = [], False
    for k, v in state.items():
        if k in head_keys or k not in model_sd or v.shape == model_sd[k].shape:
            continue
        target = model_sd[k]
        if (k == first_key and v.ndim == 4 and target.ndim == 4 and v.shape[0] == target.shape[0]
                and v.shape[2:] == target.shape[2:]):
            adapt_input = True
            continue
        wrong_shape.append(k)
    if not (missing or unexpected or wrong_shape):
        return adapt_input
    parts = []
    if file_arch and file_arch != arch:
        parts.append(f"the file is for {file_arch}")
    if wrong_shape:
        k = wrong_shape[0]
        parts.append(f"{len(wrong_shape)} tensors differ in shape (first: {k} is {_shape(state[k])} "
                     f"in the file, {_shape(model_sd[k])} in the model)")
    if missing:
        parts.append(f"{len(missing)} model tensors missing from the file (first: {missing[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} file tensors not in the model (first: {unexpected[0]})")
    raise CheckpointError(f"{error}: " + "; ".join(parts))


def _head_tensors(state: dict[str, torch.Tensor], model_sd: dict[str, torch.Tensor], head_name: str,
                  head_keys: set[str], model_classes: int | None, source: str,
                  arch: str) -> tuple[dict[str, torch.Tensor], str | None]:
    """The file's classifier where it fits the model's; else nothing (the model keeps its new,
    random head) and the message that says so. A head with another input width is another
    architecture: an error."""
    file_head = {k: state[k] for k in head_keys if k in state}
    if len(file_head) == len(head_keys) and all(file_head[k].shape == model_sd[k].shape for k in head_keys):
        return file_head, None
    if not file_head:
        return {}, (f"{source}: no classifier in the file; the head ({head_name}, {model_classes} "
                    "classes) is randomly initialised")
    wkey = f"{head_name}.weight"
    file_classes = int(file_head[wkey].shape[0]) if wkey in file_head and file_head[wkey].ndim else None
    if (wkey in file_head and file_head[wkey].ndim == 2 and model_sd[wkey].ndim == 2
            and file_head[wkey].shape[1] != model_sd[wkey].shape[1]):
        raise CheckpointError(f"{source}: weights for another architecture than {arch}: classifier "
                              f"{head_name} takes {file_head[wkey].shape[1]} features in the file, "
                              f"{model_sd[wkey].shape[1]} in the model")
    return {}, (f"{source}: checkpoint has {file_classes} classes, the model {model_classes}; "
                f"replaced the classifier head ({head_name}) with a new, randomly initialised one")


def load_pretrained(model: nn.Module, source: str, num_classes: int | None = None, *,
                    classes: list[str] | None = None, used_as_is: bool = False) -> list[str]:
    """Initialise ``model`` in place from ``source`` (a timm tag or a local weight file).

    ``num_classes``: the classes the model must end with (default: its current head). ``classes``:
    the data's class names, checked against a file that names its own (:func:`check_class_names`;
    ``used_as_is``: the model will not be trained). Returns the messages (head replaced, input
    conv adapted, tensors loaded); warnings are also logged. Raises :class:`CheckpointError` for a
    missing/unreadable file or another architecture, :class:`DataError` for other classes.
    """
    if is_local_source(source):
        state, file_arch, file_classes = read_weight_file(source)  # read once: L2 files are GBs
        if classes is not None and file_classes is not None:
            check_class_names(source, file_classes, classes, used_as_is)
        return apply_state_dict(model, state, source=str(source), num_classes=num_classes, file_arch=file_arch)
    from timm.models import split_model_name_tag

    tag_arch = None if source.startswith(_TIMM_SOURCE_PREFIXES) else split_model_name_tag(source)[0]
    messages = []
    arch = model_architecture(model)
    if tag_arch is not None and tag_arch != arch:
        messages.append(f"{source}: weights of {tag_arch} loaded into {arch}; the shapes must match, "
                        f"but layer details (padding, BN epsilon) may differ: prefer model {tag_arch}")
        log.warning(messages[-1])
    return messages + _load_timm_tag(model, source, num_classes, tag_arch, classes, used_as_is)


# ------------------------------------------------------------------------------ preprocessing


def _checkpoint_pretrained_cfg(path: Path) -> dict | None:
    """What a local weight file says of its preprocessing: our checkpoint's record (mean, std and
    its ``data_config``), a ``pretrained_cfg`` entry in the file, or the ``pretrained_cfg`` of a
    timm ``config.json`` in the same folder (``save_for_hf`` / ``noisystudent export`` output).
    None for a bare state dict."""
    if path.suffix.lower() != ".safetensors":
        obj = _torch_load(path, mmap=True)  # tensors memory-mapped: only the metadata is read
        if isinstance(obj, dict) and isinstance(obj.get("mean"), (list, tuple)) and isinstance(obj.get("std"), (list, tuple)):
            recorded = obj.get("data_config") if isinstance(obj.get("data_config"), dict) else {}
            size = obj.get("test_size") or obj.get("image_size")
            cfg = {k: recorded.get(k) for k in ("interpolation", "crop_pct", "crop_mode") if recorded.get(k)}
            return {**cfg, "mean": tuple(obj["mean"]), "std": tuple(obj["std"]),
                    **({"input_size": (obj.get("in_chans", len(obj["mean"])), size, size)} if size else {})}
        if isinstance(obj, dict) and isinstance(obj.get("pretrained_cfg"), dict):
            return dict(obj["pretrained_cfg"])
    if (path.parent / "config.json").is_file():
        try:
            return local_dir_pretrained_cfg(f"{LOCAL_DIR_PREFIX}{path.parent}")
        except CheckpointError:
            return None  # some other tool's config.json: the file alone decides
    return None


def _fit_channels(values, channels: int) -> tuple:
    """Per-channel statistics for ``channels`` inputs: RGB statistics averaged for grayscale (the
    first convolution is summed over RGB by ``adapt_input_conv``), one value repeated for more."""
    values = tuple(float(v) for v in values)
    if len(values) == channels:
        return values
    if channels == 1:
        return (sum(values) / len(values),)
    return (values * channels)[:channels] if len(values) == 1 else values


def weights_source(model_name: str, pretrained: str | None) -> str | None:
    """Where a stage's weights come from: its ``pretrained`` source, else its model name when that
    is a ``hf-hub:`` / ``local-dir:`` source (:func:`noisystudent.models.factory.create_model`)."""
    if pretrained:
        return pretrained
    return model_name if model_name.startswith(_TIMM_SOURCE_PREFIXES) else None


def pretrained_data_config(source: str | None, model: nn.Module) -> dict | None:
    """The preprocessing the weights of ``source`` were trained with, resolved for ``model`` by
    timm (``timm.data.resolve_model_data_config`` over the source's ``pretrained_cfg``):
    ``mean``, ``std`` (fitted to the model's input channels), ``interpolation``, ``crop_pct``,
    ``crop_mode``, ``pretrained_input_size`` (the weights' resolution) and ``source``. None when
    the source does not say (no source, or a bare state dict without a config)."""
    if not source:
        return None
    from timm.data import resolve_model_data_config

    if is_local_source(source):
        cfg = _checkpoint_pretrained_cfg(Path(source).expanduser())
    else:
        cfg = tag_pretrained_cfg(source)
    if cfg is None:
        return None
    resolved = resolve_model_data_config(model, pretrained_cfg=cfg)
    first = _first_conv(model)
    channels = model.get_submodule(first).weight.shape[1] if first else len(resolved["mean"])
    return {"mean": _fit_channels(resolved["mean"], channels), "std": _fit_channels(resolved["std"], channels),
            "interpolation": resolved["interpolation"], "crop_pct": float(resolved["crop_pct"]),
            "crop_mode": resolved["crop_mode"], "pretrained_input_size": list(resolved["input_size"]),
            "source": source}


def stage_data_config(model_name: str, pretrained: str | None, model: nn.Module, *, mean: tuple,
                      std: tuple) -> dict:
    """The data config of a training stage (its ``model`` name, its ``pretrained`` source, the
    built model): its weights' own (:func:`pretrained_data_config`) when it starts from weights
    that say, else the data's ``mean``/``std`` with noisystudent's interpolation and crop
    (``source: "data"``). The keys are those :func:`noisystudent.models.checkpoint.save_model`
    records."""
    source = weights_source(model_name, pretrained)
    weights = pretrained_data_config(source, model)
    if weights is None:
        return {"mean": tuple(mean), "std": tuple(std), "interpolation": "bilinear", "crop_pct": None,
                "crop_mode": None, "source": "data"}
    log.info(f"{source}: preprocessing as the weights were trained: mean {_fmt(weights['mean'])}, std "
             f"{_fmt(weights['std'])}, {weights['interpolation']}, crop {weights['crop_pct']:g} "
             f"({weights['crop_mode']})")
    return weights


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"
