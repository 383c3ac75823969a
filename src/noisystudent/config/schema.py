"""Experiment configuration: typed dataclasses, YAML loading, ``--set`` overrides and validation.

Every key has a type, a default (the paper's where one applies) and a help line; the help lines
also generate ``docs/configuration.md`` (``noisystudent config --markdown``), so the reference
cannot drift from the schema.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..runtime.errors import ConfigError, error_reason
from .family import chain_preset, is_known_model
from .reader import build
from .values import changed_from_defaults, normalised_dict


def _opt(default: Any, help: str, *, min: float | None = None, max: float | None = None,
         choices: tuple | None = None, factory: Any = None) -> Any:
    meta = {"help": help, "min": min, "max": max, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


DATA_SOURCES = ("digits", "fashion-mnist", "image-folder", "torchvision")
DEDUP_MODES = ("val+test", "test", "none")  # pseudo.dedup: which held-out splits the pool is cleaned of

# The paper's ablations (``--ablation`` / config key ``ablation``), applied by apply_ablation.
ABLATIONS = {
    "no-noise": "students without noise: no augmentation, no dropout, no stochastic depth",
    "no-augmentation": "students without input noise (RandAugment, crop, flip)",
    "hard-labels": "hard (argmax) pseudo labels instead of soft",
    "soft-labels": "soft pseudo labels (the teacher's probabilities) instead of hard",
    "no-balancing": "no class balancing (threshold only)",
    "no-iteration": "a single student (the first of the chain)",
}


@dataclass
class DataConfig:
    source: str = _opt("digits", "Where images come from.", choices=DATA_SOURCES)
    root: str | None = _opt(None, "fashion-mnist: folder of IDX files (default: the Debian package's "
                            "/usr/share/datasets/fashion-mnist); torchvision: dataset root.")
    name: str | None = _opt(None, "torchvision dataset name: cifar10, cifar100, svhn, stl10.",
                            choices=(None, "cifar10", "cifar100", "svhn", "stl10"))
    download: bool = _opt(False, "Let torchvision download the dataset (needs internet).")
    train_dir: str | None = _opt(None, "image-folder: labeled images, one subfolder per class.")
    val_dir: str | None = _opt(None, "image-folder: validation images (default: held out from train_dir).")
    test_dir: str | None = _opt(None, "image-folder: test images, one subfolder per class.")
    unlabeled: str | None = _opt(None, "The unlabeled pool: a folder (searched recursively, streamed), a file "
                                 "list (.txt, one path per line, relative to the list's folder) or WebDataset "
                                 "shards (/data/pool-{000000..009999}.tar). Labels in it are ignored.")
    unlabeled_dir: str | None = _opt(None, "Alias of data.unlabeled (a folder of unlabeled images).")
    labels_per_class: int | None = _opt(None, "Keep N labels per class and move the rest of the labeled "
                                        "training images to the unlabeled pool, for a semi-supervised "
                                        "benchmark from a fully labeled source (null: keep every label).", min=1)
    val_per_class: int = _opt(20, "Validation images per class held out from the training images "
                              "(used for model selection; never the test split).", min=1)
    test_per_class: int | None = _opt(None, "Test images per class held out when the source has no "
                                      "test split (digits, an image folder without data.test_dir); "
                                      "unused, with a warning, where it has one.", min=1)
    max_unlabeled: int | None = _opt(None, "Use at most this many unlabeled images (random subset).", min=1)
    image_size: int = _opt(16, "Training resolution in pixels (square).", min=4)
    channels: int | None = _opt(None, "1 (grayscale) or 3 (RGB); null: the source's own.", choices=(None, 1, 3))
    flip: bool = _opt(False, "Random horizontal flips in training augmentation (off for digits).")
    num_workers: int = _opt(0, "DataLoader worker processes (0: load in the main process).", min=0)

    def own_test_split(self) -> str | None:
        """What the source's own test split is, where it has one (``test_per_class`` is then unused)."""
        return own_test_split(self.source, self.test_dir)


def own_test_split(source: str | None, test_dir: str | None) -> str | None:
    """The test split a data source brings, in words, or None where ``data.test_per_class`` holds
    one out of the training images (digits, an image folder without ``data.test_dir``)."""
    if source in ("fashion-mnist", "torchvision"):
        return "its official test split"
    if source == "image-folder" and test_dir:
        return f"data.test_dir {test_dir}"
    return None


@dataclass
class NoiseConfig:
    augment: bool = _opt(True, "Input noise: RandAugment plus random crop (and flip if data.flip).")
    randaugment_ops: int = _opt(2, "RandAugment: operations per image (paper: 2).", min=0)
    randaugment_magnitude: float = _opt(27, "RandAugment magnitude on the official scale, where 10 is "
                                        "the nominal maximum and the paper uses 27.", min=0, max=30)
    dropout: float = _opt(0.5, "Model noise: dropout before the classifier (paper: 0.5 for B7/L2).",
                          min=0, max=0.95)
    drop_path: float = _opt(0.2, "Model noise: stochastic depth drop rate at the last block "
                            "(1 - survival 0.8), linearly smaller for earlier blocks.", min=0, max=0.95)


@dataclass
class TrainConfig:
    epochs: float = _opt(30, "Epochs; one epoch is a pass over the larger of the labeled stream and "
                         "the pseudo-labeled stream.", min=0)
    batch_size: int = _opt(64, "Labeled images per step (global, over all processes; must divide by the "
                           "number of processes).", min=1)
    unlabeled_ratio: float = _opt(3, "Pseudo-labeled images per labeled image in each joint batch "
                                  "(paper: 1 for small models, 3 for B7/L0/L1/L2); round(batch_size x ratio) must "
                                  "also divide by the number of processes.", min=0)
    optimizer: str = _opt("sgd", "Any optimizer timm.optim.create_optimizer_v2 knows "
                          "(paper: rmsproptf).")
    lr: float = _opt(0.05, "Peak learning rate.", min=0)
    weight_decay: float = _opt(5e-4, "Weight decay (paper: 1e-5 with RMSProp).", min=0)
    momentum: float = _opt(0.9, "Optimizer momentum.", min=0, max=1)
    scheduler: str = _opt("cosine", "cosine, or step (paper: x0.97 every 2.4 epochs).",
                          choices=("cosine", "step"))
    decay_epochs: float = _opt(2.4, "step scheduler: epochs between decays.", min=0)
    decay_rate: float = _opt(0.97, "step scheduler: multiplier per decay.", min=0, max=1)
    warmup_epochs: float = _opt(0, "Linear warm-up epochs.", min=0)
    label_smoothing: float = _opt(0.1, "Label smoothing on labeled images (paper: 0.1).", min=0, max=1)
    eval_every: int = _opt(1, "Evaluate on the validation split every N epochs; the best epoch is kept.",
                           min=1)
    patience: int | None = _opt(None, "Early stopping: end a stage when validation top-1 has not improved for this "
                                "many evaluations in a row (null: off). epochs stays the cap and the learning-rate "
                                "schedule spans it; the best epoch is kept either way.", min=1)
    precision: str = _opt("auto", "auto (bf16 autocast on CUDA where supported; on a CPU, bf16 only if a "
                          "few timed steps of the model find it >= 1.05x faster than fp32, else fp32), fp32, "
                          "bf16 (autocast, CPU or CUDA), fp16 (autocast + gradient scaler, CUDA).",
                          choices=("auto", "fp32", "bf16", "fp16"))
    channels_last: bool = _opt(False, "Use the channels_last memory format.")
    compile: bool = _opt(False, "torch.compile the model.")
    ema: bool = _opt(False, "Keep an exponential moving average of the weights (timm ModelEmaV3); it is "
                     "evaluated and becomes the next teacher.")
    ema_decay: float = _opt(0.9999, "EMA decay per step (paper: 0.9999).", min=0, max=1)
    sync_bn: bool = _opt(False, "Synchronise BatchNorm statistics across processes (CUDA only).")
    warm_start: bool = _opt(False, "A student of its teacher's architecture and training size starts from the "
                            "teacher's weights instead of from scratch (the paper trains students from scratch); "
                            "a larger student, and the baseline, always start from scratch.")
    checkpoint_every: int = _opt(200, "Write a resumable training checkpoint every N steps to "
                                 "<run>/checkpoints/<stage>/ (0: only at the end of the stage); an interrupted "
                                 "stage resumes from its latest one.", min=0)
    keep_checkpoints: int = _opt(2, "Resumable checkpoints kept per stage.", min=1)


TTA_MODES = ("none", "flip")
THRESHOLD_MODES = ("global", "per-class")


@dataclass
class PseudoLabelConfig:
    temperature: float = _opt(1.0, "Softmax temperature of the teacher's soft labels (paper: 1).", min=1e-3)
    hard: bool = _opt(False, "Hard labels (one-hot argmax) instead of soft probabilities.")
    threshold: float = _opt(0.3, "Drop images whose top-1 confidence is below this (paper: 0.3).",
                            min=0, max=1)
    balance: bool = _opt(True, "Balance classes: keep the K most confident images per class and "
                         "duplicate under-full classes up to K.")
    per_class: int | None = _opt(None, "K for balancing; null: images kept after the threshold / "
                                 "number of classes.", min=1)
    top_k: int = _opt(10, "Classes stored per image in the pseudo-label store.", min=1)
    batch_size: int = _opt(256, "Batch size for labeling.", min=1)
    shard_size: int = _opt(8192, "Images per shard of the pseudo-label store (folder, file-list and "
                           "in-dataset pools; a WebDataset pool keeps its own tar shards). A killed label "
                           "stage resumes at the first unfinished shard.", min=1)
    precision: str = _opt("auto", "Labeling precision: auto (bf16 autocast only where a calibration finds it "
                          "faster and agreeing with fp32 on >= 99.9% of top-1 labels), fp32 or bf16.",
                          choices=("auto", "fp32", "bf16"))
    dedup: str = _opt("val+test", "Pool hygiene: before selecting, drop pool images that copy a held-out image "
                      "(the same decoded pixels, or a perceptual hash within dedup_distance bits: resized or "
                      "re-encoded copies) of the validation and test splits (val+test) or the test split only "
                      "(test); none: keep them, and the labeler stores no image hashes. Checked for pools from "
                      "outside the labeled dataset (data.unlabeled, a torchvision dataset's unlabeled split); "
                      "the dataset's own training images moved to the pool are not.",
                      choices=DEDUP_MODES)
    dedup_distance: int = _opt(6, "Largest Hamming distance between 64-bit perceptual hashes (pHash) that counts "
                               "as a copy (0: identical hashes only). 6 finds 99.2% of JPEG q75 re-encodes of 28 px "
                               "test images (4: 98.9%) and drops 0.003% of a 10^5-image pool wrongly "
                               "(docs/benchmarks.md).", min=0, max=63)
    calibrate: bool = _opt(False, "Before the threshold, fit a temperature T_cal on the labeled validation split "
                           "(minimum NLL of the teacher's logits / T_cal), so a threshold of 0.3 means a "
                           "calibrated 30%; the pool is labeled at T_cal x temperature. The teacher's expected "
                           "calibration error before and after is in label-i/calibration.json and the report.")
    tta: str = _opt("none", "Test-time augmentation of the teacher's labels: flip averages its probabilities over "
                    "the clean image and its horizontal flip (needs data.flip: true, where a flip keeps the "
                    "label); none: the clean image only.", choices=TTA_MODES)
    ensemble_size: int = _opt(1, "Teachers that label the pool for student-1: the teacher and ensemble_size - 1 more "
                              "of its architecture and recipe on the same labels, each with its own seed (stages "
                              "teacher-2 ... teacher-N, trained after the teacher); their class probabilities are "
                              "averaged (an ensemble knows more than one of its members). The teacher alone "
                              "stays the baseline.", min=1)
    ensemble: list[str] = _opt(None, "Further teachers for the first labeling: this tool's model files (model.pt of "
                               "a run's stage) of the same classes and input, e.g. the teacher's architecture trained "
                               "on the same labels with another `teacher.seed`. Their class probabilities are "
                               "averaged with the teacher's (after `tta`) before the temperature, threshold and "
                               "selection; later iterations label with their student alone.",
                               factory=list)
    threshold_mode: str = _opt("global", "global: one threshold for every class; per-class: each predicted "
                               "class's threshold is the threshold x (its mean confidence / the mean confidence of "
                               "the whole pool), so classes the teacher is less sure of are not emptied (logged "
                               "in select-i/selection.json).", choices=THRESHOLD_MODES)


@dataclass
class StageConfig:
    model: str = _opt("ns_cnn_s", "Model name: any timm model or a noisystudent model "
                      "(ns_cnn_s/m/l for small images; see `noisystudent models`).")
    epochs: float | None = _opt(None, "Override train.epochs for this stage.", min=0)
    image_size: int | None = _opt(None, "Override data.image_size (training resolution).", min=4)
    dropout: float | None = _opt(None, "Override noise.dropout for this stage.", min=0, max=0.95)
    drop_path: float | None = _opt(None, "Override noise.drop_path for this stage.", min=0, max=0.95)
    augment: bool | None = _opt(None, "Override noise.augment for this stage (input noise).")
    randaugment_magnitude: float | None = _opt(None, "Override noise.randaugment_magnitude for this stage.",
                                               min=0)
    lr: float | None = _opt(None, "Override train.lr for this stage.", min=0)
    patience: int | None = _opt(None, "Override train.patience for this stage (early stopping).", min=1)
    eval_every: int | None = _opt(None, "Override train.eval_every for this stage: a teacher of many short "
                                  "epochs (200 passes over 1,000 labels) spends as long validating every epoch "
                                  "as training; every 4th still finds its plateau.", min=1)
    test_size: int | None = _opt(None, "Evaluation resolution (default: the training resolution); above "
                                 "it, a fix-res fine-tune runs at the end of the chain.", min=4)
    seed: int | None = _opt(None, "This stage's own seed (initialisation, augmentation, batch order); null: derived "
                            "from the run's `seed` and the stage's name. The splits always follow `seed`, so "
                            "models of one split can differ only in their initialisation.")
    pretrained: str | None = _opt(None, "Initial weights: a timm pretrained tag (e.g. "
                                  "tf_efficientnet_b0.ns_jft_in1k, needs internet) or a local "
                                  ".pt/.pth/.safetensors file. For the teacher, training starts from it.")


@dataclass
class FinetuneConfig:
    enabled: bool | None = _opt(None, "Fix-res fine-tune of the last student at its test resolution on "
                                "un-augmented labeled images (null: on when test_size > image_size).")
    epochs: float = _opt(1.5, "Fine-tune epochs over the labeled images (paper: 1.5 on ImageNet).", min=0)
    lr: float | None = _opt(None, "Fine-tune learning rate (null: the last stage's lr / 10).", min=0)
    frozen_blocks: int | None = _opt(None, "Shallow blocks kept frozen (null: the paper's recipe, all "
                                     "but the last stage's blocks and the head).", min=0)
    batch_size: int | None = _opt(None, "Fine-tune batch size (null: train.batch_size).", min=1)


@dataclass
class BaselineConfig:
    enabled: bool = _opt(True, "Train the baseline stage: the final student's architecture on the labeled images "
                         "alone with the teacher's recipe (noise, epochs, lr), so the run reports the Noisy "
                         "Student gain over it (the paper's comparison). Nothing extra trains when the final "
                         "architecture is the teacher's: the teacher is the baseline. Turn off for runs at scale.")
    epochs: float | None = _opt(None, "Baseline epochs (null: the teacher's). With train.patience it stops "
                                "when validation stops improving.", min=0)


FINAL_MODEL_RULES = ("best-val", "last")


@dataclass
class EvaluateConfig:
    suites: list[str] = _opt(None, "Evaluation suites run on the teacher and final student at the end "
                             "(clean, corruptions, perturbations, fgsm, pgd).",
                             factory=lambda: ["clean"])
    max_images: int | None = _opt(None, "Evaluate robustness on at most this many test images.", min=1)
    severities: list[int] = _opt(None, "Corruption severities.", factory=lambda: [1, 2, 3, 4, 5])
    fgsm_eps: list[float] = _opt(None, "FGSM / PGD sizes in 0-255 pixel units (paper: 0, 2, 4, 8, 16).",
                                 factory=lambda: [0.0, 2.0, 4.0, 8.0, 16.0])
    pgd_steps: int = _opt(10, "PGD iterations (paper: 10).", min=1)
    normalizer: str | None = _opt(None, "alexnet: report CE / mCE / FR normalised by AlexNet (ImageNet "
                                  "models only); null: raw errors and flip probabilities.",
                                  choices=(None, "alexnet"))
    natural_adversarial_dir: str | None = _opt(None, "Folder for the natural-adversarial suite: "
                                               "ImageNet-A (WordNet-id folders) or a labeled folder of "
                                               "hard images.")
    batch_size: int = _opt(256, "Evaluation batch size.", min=1)


TRACKERS = ("tensorboard", "mlflow", "wandb")  # the `tracking` backends (noisystudent.tracking)


@dataclass
class TrackerConfig:
    run_name: str | None = _opt(None, "The run's name in MLflow and W&B (null: the run directory's name).")
    step_every: int = _opt(10, "Log the training loss, learning rate and img/s every this many steps.", min=1)
    mlflow_uri: str | None = _opt(None, "MLflow tracking URI: a server (http://host:5000), a database "
                                  "(sqlite:///mlflow.db), ... (null: MLFLOW_TRACKING_URI, else MLflow's default).")
    mlflow_experiment: str | None = _opt(None, "MLflow experiment, created if missing (null: MLFLOW_EXPERIMENT_NAME, "
                                         "else noisystudent).")
    wandb_project: str | None = _opt(None, "W&B project (null: WANDB_PROJECT, else noisystudent).")
    wandb_entity: str | None = _opt(None, "W&B entity, a user or team (null: WANDB_ENTITY, else your default).")
    wandb_mode: str | None = _opt(None, "W&B mode: online; offline (files in <run>/wandb, upload later with `wandb "
                                  "sync`); disabled (null: WANDB_MODE, else online).",
                                  choices=(None, "online", "offline", "disabled"))


@dataclass
class Config:
    seed: int = _opt(0, "Random seed for splits, initialisation, augmentation and selection.")
    device: str = _opt("auto", "auto (CUDA if available, else CPU), cpu, cuda, cuda:N.")
    tracking: list[str] = _opt(None, "Experiment trackers the run logs to, from rank 0: the config as parameters, "
                               "per-step loss, lr and img/s, per-epoch validation, each stage's summary, each "
                               "iteration's labeling and selection statistics, the report as an artifact. Each is an "
                               "extra: pip install 'noisystudent[mlflow]' (or [wandb], [tensorboard]); settings under "
                               "`tracker`.", factory=list, choices=TRACKERS)
    tensorboard: bool = _opt(False, "Alias: true adds tensorboard to `tracking` (logs in <run>/tensorboard).")
    tracker: TrackerConfig = _opt(None, "Settings of the experiment trackers listed in `tracking`.",
                                  factory=TrackerConfig)
    data: DataConfig = _opt(None, "Data sources and splits.", factory=DataConfig)
    noise: NoiseConfig = _opt(None, "Input and model noise of every training stage "
                               "(per-stage overrides under teacher / students[i]).", factory=NoiseConfig)
    train: TrainConfig = _opt(None, "Optimisation, shared by all stages.", factory=TrainConfig)
    pseudo: PseudoLabelConfig = _opt(None, "Pseudo labeling and selection.", factory=PseudoLabelConfig)
    teacher: StageConfig = _opt(None, "The first teacher, trained on labeled images only.",
                                factory=StageConfig)
    students: list[StageConfig] = _opt(None, "The student chain; each student becomes the next teacher "
                                       "(empty: train the supervised teacher only).",
                                       factory=lambda: [StageConfig()])
    chain: str | None = _opt(None, "A preset chain that fills teacher and students (paper: B7 -> B7 -> L0 "
                             "-> L1 -> L2 -> L2; cpu: ns_cnn_s -> ns_cnn_s -> ns_cnn_m -> ns_cnn_l at 16 px; "
                             "cpu-fixres: the same at 20 px, the last tested at 28 px). The preset sets the "
                             "number of students and each stage's model, image_size, test_size, dropout and "
                             "drop_path; other keys written per stage (epochs, lr, pretrained) still apply.")
    ablation: str | None = _opt(None, "One of the paper's ablations (`--ablation`), applied after the chain "
                                "preset; the noise ablations change the students only: " +
                                "; ".join(f"{k}: {v}" for k, v in ABLATIONS.items()) + ".",
                                choices=(None, *ABLATIONS))
    finetune: FinetuneConfig = _opt(None, "Fix-res fine-tune at the end of the chain.", factory=FinetuneConfig)
    baseline: BaselineConfig = _opt(None, "The yardstick: the final architecture on the labels alone.",
                                    factory=BaselineConfig)
    final_model: str = _opt("best-val", "Which model the run hands over (summary's result, export, evaluate): "
                            "best-val: the stage with the best validation top-1 among the teacher, the students, "
                            "fix-res and the baseline (so never one worse on validation than the labels alone "
                            "gave); last: the chain's last stage, as in the paper.", choices=FINAL_MODEL_RULES)
    stop_iterating: bool = _opt(False, "Stop the chain early when a student's validation top-1 is not above its "
                                "teacher's (the remaining iterations are skipped and reported).")
    evaluate: EvaluateConfig = _opt(None, "Final evaluation.", factory=EvaluateConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Hash of the resolved config, used to refuse resuming a run made by another config (and
        to key the accuracy benchmark's cache).

        Hashed over the values that differ from the schema's defaults, coerced to their schema
        types (:func:`changed_from_defaults`): a config equals itself reloaded from its
        ``config.yaml`` (a default ``0`` of a float key reads back as ``0.0``), and a run made
        before an upgrade that adds keys (at their defaults) still resumes.
        """
        blob = json.dumps(changed_from_defaults(self), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def save(self, path: Path) -> None:
        """Write this config as YAML to ``path`` (:func:`save_config`)."""
        save_config(self, path)


def config_from_dict(raw: dict) -> Config:
    """Build a validated :class:`Config` from a plain dict (e.g. parsed YAML): the ``chain`` preset
    first, then the ``ablation``."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("config must be a mapping of keys to values")
    raw = expand_chain(raw)
    if raw.get("ablation") is not None:  # after the preset, which would undo the noise ablations
        raw = apply_ablation(raw, raw["ablation"])
    cfg = build(Config, raw)
    _check_consistency(cfg)
    _check_registry_names(cfg)
    return cfg


def _check_registry_names(cfg: Config) -> None:
    """Keys that name a registry entry (optimizer, model, device) are checked against the registry
    the run will look them up in, so ``noisystudent config`` refuses them too, before any run
    directory exists. The scheduler is a fixed choice, checked by its key's ``choices``."""
    import timm.optim
    import torch

    # torch.device's own parser (availability of a CUDA device is checked when the run starts)
    if cfg.device != "auto":
        try:
            torch.device(cfg.device)
        except (RuntimeError, ValueError):
            raise ConfigError(f"config key 'device': {cfg.device!r} is not a device torch knows; "
                              "use auto, cpu, cuda or cuda:N") from None
    # timm.optim.create_optimizer_v2 reads "[lookahead_]name"; its registry lists the names (timm >= 1.0.12)
    list_optimizers = getattr(timm.optim, "list_optimizers", None)
    if list_optimizers is not None:
        known = set(list_optimizers())
        parts = cfg.train.optimizer.lower().split("_")
        if parts[-1] not in known or (len(parts) > 1 and parts[:-1] != ["lookahead"]):
            close = difflib.get_close_matches(cfg.train.optimizer.lower(), sorted(known), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"config key 'train.optimizer': unknown optimizer {cfg.train.optimizer!r}{hint}; "
                              "see timm.optim.list_optimizers()")
    # the rule create_model applies (paper aliases such as B7, then timm's registry, where this
    # package registers its own models; hf-hub:/local-dir: names are read when the model is built)
    for key, stage in (("teacher", cfg.teacher), *((f"students[{i}]", s) for i, s in enumerate(cfg.students))):
        if not is_known_model(stage.model):
            raise ConfigError(f"config key '{key}.model': unknown model {stage.model!r}; "
                              "see `noisystudent models` or timm.list_models()")


def expand_chain(raw: dict) -> dict:
    """Apply the ``chain`` preset (:func:`noisystudent.config.family.chain_preset`): it decides the model, image_size,
    test_size, dropout and drop_path of the teacher and of every student, and the number of
    students; other keys written under ``teacher`` / ``students[i]`` (epochs, lr, pretrained) stay."""
    name = raw.get("chain")
    if name is None:
        return raw
    if not isinstance(name, str):
        raise ConfigError(f"config key 'chain' must be a string, got {name!r}")
    try:
        stages = chain_preset(name)
    except ConfigError as e:
        raise ConfigError(f"config key 'chain': {e}") from None
    written = [raw.get("teacher") or {}] + list(raw.get("students") or [])
    for i, w in enumerate(written):
        if not isinstance(w, dict):
            key = "teacher" if i == 0 else f"students[{i - 1}]"
            raise ConfigError(f"config key '{key}' must be a mapping, got {w!r}")
    merged = [{**(written[i] if i < len(written) else {}), **stage} for i, stage in enumerate(stages)]
    return {**raw, "teacher": merged[0], "students": merged[1:]}


def _check_consistency(cfg: Config) -> None:
    if cfg.data.unlabeled and cfg.data.unlabeled_dir and cfg.data.unlabeled != cfg.data.unlabeled_dir:
        raise ConfigError("config keys 'data.unlabeled' and 'data.unlabeled_dir' (its alias) name different "
                          f"pools ({cfg.data.unlabeled!r}, {cfg.data.unlabeled_dir!r}); set one")
    if cfg.data.source == "torchvision" and not cfg.data.name:
        raise ConfigError("config key 'data.name' is required when data.source is torchvision")
    if cfg.data.source == "image-folder" and not cfg.data.train_dir:
        raise ConfigError("config key 'data.train_dir' is required when data.source is image-folder")
    if cfg.pseudo.ensemble_size > 1 and cfg.teacher.epochs == 0:
        raise ConfigError("config key 'pseudo.ensemble_size': the extra teachers train as the teacher does, and "
                          "teacher.epochs is 0, so they would be copies of its weights; train the teacher, or "
                          "give trained members as pseudo.ensemble files")
    if cfg.pseudo.tta == "flip" and not cfg.data.flip:  # refused, not ignored: the user asked for it
        raise ConfigError("config key 'pseudo.tta': flip averages over mirrored images, which keeps the label "
                          "only where data.flip is true (set it, or pseudo.tta: none)")
    known = {"clean", "corruptions", "perturbations", "natural-adversarial", "fgsm", "pgd"}
    for s in cfg.evaluate.suites:
        if s not in known:
            raise ConfigError(f"config key 'evaluate.suites' has unknown suite {s!r}; "
                              f"known: {', '.join(sorted(known))}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML so numbers, booleans and lists work."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value, got {item!r}")
    key, _, text = item.partition("=")
    try:
        value = yaml.safe_load(text) if text != "" else None
    except yaml.YAMLError:
        value = text
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``--set`` overrides to a raw config dict. ``students.1.model=x`` indexes lists."""
    raw = json.loads(json.dumps(raw or {}))  # deep copy of plain data
    for item in overrides:
        path, value = parse_override(item)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            dotted = ".".join(path[: i + 1])
            if isinstance(node, list):
                node = _list_item(node, part, dotted)
            else:
                if part == "students" and "students" not in node:
                    node["students"] = [dataclasses.asdict(s) for s in Config().students]
                node = node.setdefault(part, {})
        last = path[-1]
        if isinstance(node, list):
            idx = _list_index(node, last, ".".join(path))
            node[idx] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"--set {'.'.join(path)}: '{'.'.join(path[:-1])}' is not a section")
    return raw


def _list_index(node: list, part: str, dotted: str) -> int:
    try:
        idx = int(part)
    except ValueError:
        raise ConfigError(f"--set {dotted}: list index must be an integer") from None
    if not -len(node) <= idx < len(node):
        raise ConfigError(f"--set {dotted}: index out of range (list has {len(node)} items)")
    return idx


def _list_item(node: list, part: str, dotted: str) -> Any:
    return node[_list_index(node, part, dotted)]


def apply_ablation(raw: dict, name: str) -> dict:
    """A copy of the raw config changed for one of the paper's ablations (see ``ABLATIONS``).

    :func:`config_from_dict` applies the config key ``ablation`` with it *after* the chain preset
    (the preset sets each stage's dropout and drop path, so the other order would undo no-noise).
    The noise ablations write the students' own keys (``students[i].augment``, ``dropout``,
    ``drop_path``): the teacher and the ``noise`` section keep the config's noise. Applying an
    ablation twice changes nothing more, so a saved ``config.yaml`` loads back to the same config.
    """
    if not isinstance(name, str) or name not in ABLATIONS:
        raise ConfigError(f"config key 'ablation': unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    raw = json.loads(json.dumps(raw))  # deep copy of plain data
    if name in ("hard-labels", "soft-labels"):
        return apply_overrides(raw, [f"pseudo.hard={str(name == 'hard-labels').lower()}"])
    if name == "no-balancing":
        return apply_overrides(raw, ["pseudo.balance=false"])
    students = raw["students"] if "students" in raw else [dataclasses.asdict(s) for s in Config().students]
    if not isinstance(students, list):
        return raw  # build names the bad key
    if name == "no-iteration":
        students = students[:1]
    quiet = {"no-noise": {"augment": False, "dropout": 0.0, "drop_path": 0.0},
             "no-augmentation": {"augment": False}}.get(name, {})
    raw["students"] = [{**s, **quiet} if isinstance(s, dict) else s for s in students]
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                ablation: str | None = None) -> Config:
    """Load a YAML config (``None``: the built-in digits default), apply ``--set`` overrides, record
    ``ablation`` (the config key of the same name), then build: chain preset first, then the
    ablation (:func:`config_from_dict`), then validation."""
    raw: dict = {}
    if path is not None:
        from .packaged import resolve_config_path

        p = resolve_config_path(path)  # a file, else a packaged config by name: fashion-mnist, configs/digits.yaml
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML ({error_reason(e)})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{p}: config must be a mapping of keys to values")
    else:
        raw = default_config_dict()
    raw = apply_overrides(raw, overrides or [])
    if path is None:
        raw = _demo_split_keys_stay_with_digits(raw, overrides or [])
    if ablation:
        recorded = raw.get("ablation")
        if recorded is not None and recorded != ablation:
            raise ConfigError(f"--ablation {ablation}: the config already applies ablation {recorded!r} "
                              "(config key 'ablation'); one ablation at a time")
        raw = {**raw, "ablation": ablation}
    return config_from_dict(raw)


def _demo_split_keys_stay_with_digits(raw: dict, overrides: list[str]) -> dict:
    """The built-in demo's split keys belong to the digits source. Its ``data.labels_per_class``
    (5) makes the digits a semi-supervised benchmark: when ``--set data.source=...`` replaces the
    source and the user did not set ``data.labels_per_class`` too, it goes back to the schema
    default (null: every label of the user's data is kept). Its ``data.test_per_class`` (40) goes
    too where the new source has a test split of its own (Fashion-MNIST, torchvision, an image
    folder with ``data.test_dir``), so only a test_per_class the user set can be unused (and the
    data stage says so); an image folder without a test folder still holds out the demo's 40."""
    data = raw.get("data")
    if not isinstance(data, dict) or data.get("source") == default_config_dict()["data"]["source"]:
        return raw
    set_keys = [parse_override(o)[0] for o in overrides]
    if ["data"] in set_keys:  # the user replaced the whole data section: every key in it is theirs
        return raw
    demo_keys = ["labels_per_class"]
    if own_test_split(data.get("source"), data.get("test_dir")):
        demo_keys.append("test_per_class")
    drop = {k for k in demo_keys if ["data", k] not in set_keys}
    return {**raw, "data": {k: v for k, v in data.items() if k not in drop}}


def default_config_dict() -> dict:
    """The built-in experiment: digits, used by ``noisystudent run`` with no arguments."""
    here = Path(__file__).parent.parent / "configs" / "digits.yaml"
    return yaml.safe_load(here.read_text())


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config as YAML (atomically: a full disk is one clear error)."""
    from ..runtime.files import atomic_write

    atomic_write(path, yaml.safe_dump(normalised_dict(cfg), sort_keys=False))
