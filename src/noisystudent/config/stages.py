"""Resolved stages: each training stage's settings, worked out once, in one place.

A config states a stage's settings in layers: ``data`` / ``noise`` / ``train`` give the shared
values, ``teacher`` and ``students[i]`` override them per stage, ``finetune`` describes the fix-res
stage. By the time a :class:`~noisystudent.config.schema.Config` exists, the ``chain`` preset and
then the ``ablation`` are already written into those keys (``load_config``: preset first, so the
no-noise ablation's zero dropout is not overwritten by the preset's). :func:`resolve_stages` folds
the layers into one flat :class:`ResolvedStage` per training stage (the teacher, every student,
the fix-res fine-tune when it runs), and the pipeline, ``noisystudent config`` and the tests all
read those records instead of repeating the fallbacks.

Fallbacks use ``is None`` tests only: an explicit ``0`` (``lr: 0``, ``dropout: 0``) is a value.
Seeds are derived from ``(cfg.seed, stage name)`` by SHA-256, so they are stable across processes
and Python versions, and independent per stage without magic offsets.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass

from ..runtime.rundir import BASELINE, FIXRES, TEACHER, select_stage, student_stage, teacher_member
from .schema import Config, NoiseConfig, StageConfig, TrainConfig

ROLES = ("teacher", "member", "baseline", "student", "fixres")


@dataclass(frozen=True)
class ResolvedLabeling:
    """How the teacher of iteration ``i`` labels the unlabeled pool for student ``i`` (in eval
    mode, on clean images) and the seed of that iteration's selection (the ``select-i`` stage)."""

    temperature: float
    hard: bool
    top_k: int
    batch_size: int
    select_seed: int
    ensemble: tuple[str, ...] = ()  # model files averaged with the teacher's labels (pseudo.ensemble; iteration 1)
    members: tuple[str, ...] = ()  # this run's further teachers averaged in (pseudo.ensemble_size; iteration 1)


@dataclass(frozen=True)
class ResolvedStage:
    """Everything one training stage needs, with every default and override applied.

    ``noise`` is the input noise in effect (``augment``, RandAugment ops and magnitude); its
    ``dropout`` / ``drop_path`` equal the stage's own. For the fix-res stage ``image_size`` is the
    resolution it fine-tunes at (the test resolution; the previous stage's ``image_size`` is the
    one the model was trained at), ``pretrained`` is None (it starts from the previous stage's
    weights) and ``frozen_blocks`` is ``finetune.frozen_blocks`` (None: the paper's recipe).
    """

    name: str  # "teacher", "student-1", ..., "fixres" (noisystudent.runtime.rundir names)
    role: str  # one of ROLES
    model: str
    image_size: int  # training resolution
    test_size: int  # evaluation resolution
    dropout: float
    drop_path: float
    noise: NoiseConfig
    lr: float
    epochs: float
    batch_size: int  # labeled images per step (global)
    seed: int
    pretrained: str | None
    frozen_blocks: int | None = None  # fixres only
    unlabeled_ratio: float = 0.0  # pseudo-labeled images per labeled image; students only
    labeling: ResolvedLabeling | None = None  # students only: how their pseudo labels are made
    config_key: str = ""  # where the stage's settings live in the config: "teacher", "students[0]", "finetune" (the
    # baseline: the final student's, where its model and pretrained weights come from)
    train: TrainConfig | None = None  # the stage's training recipe: the train section with its batch size, ratio, patience


def stage_seed(seed: int, name: str) -> int:
    """The seed of stage ``name`` in a run seeded ``seed``: 31 bits of SHA-256 of both, so the same
    in every process (unlike the salted built-in ``hash``) and valid for random, NumPy and torch."""
    digest = hashlib.sha256(f"noisystudent:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFF_FFFF


def _or(value, default):
    return default if value is None else value


def fixres_enabled(enabled: bool | None, train_size: int, test_size: int | None) -> bool:
    """``finetune.enabled``: explicit, or (null) on when the test resolution exceeds the train one."""
    if enabled is not None:
        return enabled
    return test_size is not None and test_size > train_size


def _training_stage(cfg: Config, stage: StageConfig, name: str, role: str, **extra) -> ResolvedStage:
    image_size = _or(stage.image_size, cfg.data.image_size)
    dropout = _or(stage.dropout, cfg.noise.dropout)
    drop_path = _or(stage.drop_path, cfg.noise.drop_path)
    noise = dataclasses.replace(cfg.noise, augment=_or(stage.augment, cfg.noise.augment),
                                randaugment_magnitude=_or(stage.randaugment_magnitude,
                                                          cfg.noise.randaugment_magnitude),
                                dropout=dropout, drop_path=drop_path)
    return ResolvedStage(name=name, role=role, model=stage.model, image_size=image_size,
                         test_size=_or(stage.test_size, image_size), dropout=dropout, drop_path=drop_path,
                         noise=noise, lr=_or(stage.lr, cfg.train.lr), epochs=_or(stage.epochs, cfg.train.epochs),
                         batch_size=cfg.train.batch_size, seed=_or(stage.seed, stage_seed(cfg.seed, name)),
                         pretrained=stage.pretrained, train=_stage_train(cfg, stage, extra.get("unlabeled_ratio", 0.0)),
                         **extra)


def _stage_train(cfg: Config, stage: StageConfig, unlabeled_ratio: float) -> TrainConfig:
    """The ``train`` section as one stage trains: its unlabeled ratio (0 without pseudo labels),
    its patience and validation cadence (``stage.patience`` / ``stage.eval_every``, else the
    ``train`` section's)."""
    return dataclasses.replace(cfg.train, unlabeled_ratio=unlabeled_ratio,
                               patience=_or(stage.patience, cfg.train.patience),
                               eval_every=_or(stage.eval_every, cfg.train.eval_every))


def fixres_train_config(train: TrainConfig, batch_size: int | None = None) -> TrainConfig:
    """The training settings of the fix-res fine-tune: the run's optimizer, weight decay, label
    smoothing, precision and checkpointing, with its own batch size (None: ``train.batch_size``)
    and a short schedule of its own: cosine from the lr to 0 without warm-up, no EMA, no early
    stopping, no pseudo labels. ``sync_bn`` is off: it would replace the frozen BatchNorm layers by
    new ones that no longer stay in eval mode."""
    return dataclasses.replace(train, batch_size=batch_size or train.batch_size, unlabeled_ratio=0.0,
                               scheduler="cosine", warmup_epochs=0.0, ema=False, sync_bn=False, patience=None)


def _fixres_stage(cfg: Config, last: ResolvedStage) -> ResolvedStage:
    """The fix-res fine-tune of ``last`` at its test resolution: un-augmented labeled images, the
    model noise ``last`` trained with, lr ``finetune.lr`` (null: ``last.lr / 10``)."""
    ft = cfg.finetune
    return ResolvedStage(name=FIXRES, role="fixres", model=last.model, image_size=last.test_size,
                         test_size=last.test_size, dropout=last.dropout, drop_path=last.drop_path,
                         noise=dataclasses.replace(last.noise, augment=False), lr=_or(ft.lr, last.lr / 10),
                         epochs=ft.epochs, batch_size=_or(ft.batch_size, cfg.train.batch_size),
                         seed=stage_seed(cfg.seed, FIXRES), pretrained=None, frozen_blocks=ft.frozen_blocks,
                         config_key="finetune", train=fixres_train_config(cfg.train, ft.batch_size))


def _baseline_stage(cfg: Config, teacher: ResolvedStage, final: ResolvedStage) -> ResolvedStage:
    """The final student's architecture (model, resolutions, pretrained weights) trained on the
    labeled images alone with the teacher's recipe (noise, lr, epochs unless ``baseline.epochs``)."""
    return dataclasses.replace(teacher, name=BASELINE, role="baseline", model=final.model,
                               image_size=final.image_size, test_size=final.test_size,
                               pretrained=final.pretrained, epochs=_or(cfg.baseline.epochs, teacher.epochs),
                               seed=stage_seed(cfg.seed, BASELINE),
                               config_key=final.config_key)  # its model and weights are the final student's


def _member_stage(cfg: Config, teacher: ResolvedStage, k: int) -> ResolvedStage:
    """Teacher ``k`` of the ensemble: the teacher's stage under another name and seed (derived from
    ``teacher.seed`` when it is set, else from ``seed``), so only its initialisation and data order differ."""
    name = teacher_member(k)
    return dataclasses.replace(teacher, name=name, role="member",
                               seed=stage_seed(_or(cfg.teacher.seed, cfg.seed), name))


def epochs_key(stage: ResolvedStage) -> str:
    """The config key that sets ``stage``'s length: its own section's ``epochs`` (the baseline's
    is ``baseline.epochs``; its ``config_key`` names the final student, whose model it trains)."""
    return "baseline.epochs" if stage.role == "baseline" else f"{stage.config_key}.epochs"


def baseline_of(stages: list[ResolvedStage]) -> ResolvedStage | None:
    """The stage the Noisy Student gain is measured against: the baseline stage when the run has
    one, else the teacher when it has the final student's architecture; None otherwise."""
    students = [s for s in stages if s.role == "student"]
    own = next((s for s in stages if s.role == "baseline"), None)
    if own is not None or not students:
        return own
    teacher = stages[0]
    same = (teacher.model, teacher.image_size, teacher.pretrained) == \
        (students[-1].model, students[-1].image_size, students[-1].pretrained)
    return teacher if same else None


def resolve_stages(cfg: Config) -> list[ResolvedStage]:
    """The run's training stages in order: the teacher, the baseline (``baseline.enabled`` and the
    final architecture not the teacher's), each student, then fix-res when it runs
    (``finetune.enabled``, or by default when the last stage's test resolution is above its
    training resolution)."""
    pseudo = cfg.pseudo
    stages = [_training_stage(cfg, cfg.teacher, TEACHER, "teacher", config_key="teacher")]
    members = [_member_stage(cfg, stages[0], k) for k in range(2, pseudo.ensemble_size + 1)]
    for i, student in enumerate(cfg.students, start=1):
        labeling = ResolvedLabeling(temperature=pseudo.temperature, hard=pseudo.hard, top_k=pseudo.top_k,
                                    batch_size=pseudo.batch_size,
                                    select_seed=stage_seed(cfg.seed, select_stage(i)),
                                    ensemble=tuple(pseudo.ensemble) if i == 1 else (),
                                    members=tuple(m.name for m in members) if i == 1 else ())
        stages.append(_training_stage(cfg, student, student_stage(i), "student",
                                      unlabeled_ratio=cfg.train.unlabeled_ratio, labeling=labeling,
                                      config_key=f"students[{i - 1}]"))
    last = stages[-1]
    if cfg.baseline.enabled and len(stages) > 1 and baseline_of(stages) is None:
        stages.insert(1, _baseline_stage(cfg, stages[0], last))
    stages[1:1] = members
    if fixres_enabled(cfg.finetune.enabled, last.image_size, last.test_size):
        stages.append(_fixres_stage(cfg, last))
    return stages


def format_stages(stages: list[ResolvedStage]) -> str:
    """One row per stage: model, train / test size, dropout, drop path, augmentation (RandAugment
    ops x magnitude, or off), lr, epochs, batch size, seed."""
    head = (f"{'stage':<10} {'model':<22} {'size':>5} {'test':>5} {'dropout':>7} {'drop path':>9} "
            f"{'augment':>8} {'lr':>8} {'epochs':>6} {'batch':>5} {'seed':>10}")
    lines = [head, "-" * len(head)]
    for s in stages:
        augment = f"{s.noise.randaugment_ops}x{s.noise.randaugment_magnitude:g}" if s.noise.augment else "off"
        lines.append(f"{s.name:<10} {s.model:<22} {s.image_size:>5} {s.test_size:>5} {s.dropout:>7g} "
                     f"{s.drop_path:>9g} {augment:>8} {s.lr:>8g} {s.epochs:>6g} {s.batch_size:>5} {s.seed:>10}")
    return "\n".join(lines)
