"""Checks before a run trains anything: every stage's pretrained weights fit its model, and the
model files its first labeling averages in exist."""

from __future__ import annotations

from pathlib import Path

import torch

from ..runtime.errors import CheckpointError, ConfigError, DataError
from .factory import create_model
from .pretrained import (HUB_PREFIXES, LOCAL_DIR_PREFIX, apply_state_dict, check_class_names, is_local_source,
                         local_dir_pretrained_cfg, read_weight_file, timm_pretrained_cfg, weights_source)


def check_pretrained_files(stages, *, num_classes: int, channels: int, classes: list[str] | None = None) -> None:
    """Check every stage's ``pretrained`` source before the first stage trains, so that a
    student's file for another architecture stops the run in seconds, not after the teacher.

    ``stages`` are the run's :class:`~noisystudent.config.stages.ResolvedStage` records
    (``resolve_stages(cfg)``); ``num_classes``, ``channels`` and ``classes`` are the data's. A
    local file must exist, be a weight file, fit the stage's model by name and shape (the rules of
    :func:`~noisystudent.models.pretrained.apply_state_dict`) and, when it names its classes, name
    the data's (:func:`~noisystudent.models.pretrained.check_class_names`; a stage of 0 epochs uses
    the weights as they are). Files are read lazily (memory-mapped tensors, or safetensors headers)
    and models are built on the meta device, so the check costs little even for L2. A timm tag is
    checked to exist in timm's registry; its weights are fetched only when the stage runs. Raises
    :class:`CheckpointError` or :class:`DataError` prefixed with the config key at fault.

    A student's ``pseudo.ensemble`` files must exist (:class:`ConfigError` naming the key); whether
    they label as the teacher does is known only once the teacher is trained, so the label stage
    checks that.
    """
    for stage in stages:
        for i, path in enumerate(stage.labeling.ensemble if stage.labeling else ()):
            if not Path(path).is_file():
                raise ConfigError(f"pseudo.ensemble[{i}]: checkpoint not found: {path}")
        source = weights_source(stage.model, stage.pretrained)
        if not source:
            continue
        try:
            if not is_local_source(source):
                if source.startswith(LOCAL_DIR_PREFIX):  # the folder and its config.json, no weights read
                    names = local_dir_pretrained_cfg(source).get("label_names")
                    if classes is not None and isinstance(names, (list, tuple)):
                        check_class_names(source, [str(c) for c in names], classes, stage.epochs == 0)
                elif not source.startswith(HUB_PREFIXES):
                    timm_pretrained_cfg(source)
                continue
            state, file_arch, file_classes = read_weight_file(source, lazy=True)
            if classes is not None and file_classes is not None:
                check_class_names(source, file_classes, classes, stage.epochs == 0)
            with torch.device("meta"):
                model = create_model(stage.model, num_classes, channels, pretrained=False)
            apply_state_dict(model, state, source=str(source), num_classes=num_classes, file_arch=file_arch,
                             check_only=True)
        except (CheckpointError, DataError) as e:
            raise type(e)(f"config key '{stage.config_key}.pretrained': {e}") from None
