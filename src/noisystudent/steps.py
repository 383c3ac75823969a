"""The stages' work: one function per kind of stage, each a plain function of its inputs and an
output folder, run by the plan in :mod:`noisystudent.pipeline` through the stage runner.

    train_stage     teacher, baseline and students: the one trainer, then val/test at the test size
    label_stage     the teacher, without noise, labels the pool into a sharded store (+ the val probe)
    select_stage    threshold + balance (+ drop copies of val/test images), one DuckDB query
    fixres_stage    fine-tune the last model at its test resolution, shallow blocks frozen
    evaluate_stage  the robustness suites on the compared models

:class:`Env` is what every stage may need besides its inputs: the ranks, the run directory, the
config, the data splits and the run's shared caches and trackers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .config.schema import Config
from .config.stages import ResolvedLabeling, ResolvedStage
from .data.datasets import TransformedSet
from .data.splits import DataSplits
from .data.pool import ImageSetSource, UnlabeledSource
from .data.device_input import EvalCache, eval_batches
from .data.transforms import eval_transform, train_transform
from .evaluate.classifier import evaluate_checkpoints, evaluate_classifier
from .label.calibration import calibration_summary
from .label.hashing import write_heldout_hashes
from .label.inference import label_to_store, model_fingerprint
from .label.select import Selection, dedup_wanted, select_from_store
from .label.store import LabelStore
from .label.tta import labeling_model
from .models.checkpoint import (clean_transform, clean_view, data_config, eval_size, load_checkpoint, load_model,
                                save_model)
from .models.factory import count_parameters, create_model
from .models.pretrained import stage_data_config
from .runtime import rundir as layout
from .runtime.distributed import DistContext
from .runtime.errors import CheckpointError, ConfigError, DataError
from .runtime.files import atomic_write
from .runtime.phases import PhaseClock, training_breakdown
from .runtime.rundir import RunDir, write_json_atomic
from .runtime.precision import PrecisionCache
from .train.fixres import finetune
from .tracking import StageHistory, Tracking
from .train.trainer import Recipe, RunContext, Trainer, TrainOutcome

log = logging.getLogger("noisystudent")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Env:
    """What every stage may need besides its inputs: where the job runs and how it reports."""

    ctx: DistContext
    run: RunDir
    cfg: Config
    splits: DataSplits
    progress: bool
    tracking: Tracking = dataclasses.field(default_factory=Tracking)  # rank 0's trackers (none elsewhere)

    clean_sets: dict = dataclasses.field(default_factory=dict)
    phases: PhaseClock = dataclasses.field(default_factory=PhaseClock)  # where the run's time goes
    # shared by the run's stages: validation sets stay on the device, `auto` precision is measured once
    eval_cache: EvalCache = dataclasses.field(default_factory=EvalCache)
    precision_cache: PrecisionCache = dataclasses.field(default_factory=PrecisionCache)

    @property
    def num_workers(self) -> int:
        return self.cfg.data.num_workers

    def clean(self, images, size: int, data_cfg: dict | None = None) -> TransformedSet:
        """The un-augmented view of a split at ``size``, preprocessed per ``data_cfg`` (a stage's
        data config, :func:`~noisystudent.models.pretrained.stage_data_config`; None: the data's
        mean/std): one object per (split, size, preprocessing), so the device cache that
        training's validation fills is the one the final measurement reads."""
        s = self.splits
        data_cfg = data_cfg or {"mean": s.mean, "std": s.std}
        how = {"mean": tuple(data_cfg["mean"]), "std": tuple(data_cfg["std"]),
               "interpolation": data_cfg.get("interpolation") or "bilinear",
               "crop_pct": data_cfg.get("crop_pct"), "crop_mode": data_cfg.get("crop_mode")}
        key = (id(images), size, repr(sorted(how.items())))
        if key not in self.clean_sets:
            self.clean_sets[key] = TransformedSet(images, eval_transform(size, s.channels, **how))
        return self.clean_sets[key]


def train_stage(out: Path, stage: ResolvedStage, env: Env, pseudo=None, warm_from: str | None = None) -> dict:
    """Train one model (teacher: labeled only; student: labeled + its selection); returns its
    summary row, and writes model.pt, metrics.json and metrics.jsonl into ``out``. ``warm_from``:
    the stage (of the same architecture) whose saved weights the model starts from
    (``train.warm_start``), instead of its initialisation."""
    cfg, splits = env.cfg, env.splits
    seed_everything(stage.seed)
    model = create_model(stage.model, splits.num_classes, splits.channels, stage.dropout, stage.drop_path,
                         pretrained=stage.pretrained, classes=splits.classes, used_as_is=stage.epochs == 0)
    if warm_from is not None:
        model.load_state_dict(load_checkpoint(env.run.file(warm_from, layout.MODEL))["state_dict"])
        log.info(f"[{stage.name}] starts from {warm_from}'s weights (train.warm_start)")
    # the weights' own preprocessing when the stage starts from pretrained weights, else the data's
    data_cfg = stage_data_config(stage.model, stage.pretrained, model, mean=splits.mean, std=splits.std)
    noisy = train_transform(stage.image_size, splits.channels, data_cfg["mean"], data_cfg["std"], stage.noise,
                            cfg.data.flip, interpolation=data_cfg["interpolation"])
    labeled = TransformedSet(splits.labeled, noisy)
    val = env.clean(splits.val, stage.image_size, data_cfg)  # model selection, at the training size
    pseudo_set = None if pseudo is None else pseudo(noisy)
    log.info(f"[{stage.name}] {stage.model} ({count_parameters(model) / 1e6:.2f}M params) at {stage.image_size}px, "
             f"{len(labeled)} labeled + {0 if pseudo_set is None else len(pseudo_set)} pseudo-labeled, "
             f"dropout {stage.dropout}, drop path {stage.drop_path}, augment {stage.noise.augment}")
    with env.tracking.stage(out, stage.name) as history:
        if stage.epochs > 0:
            trainer = Trainer(Recipe.of_stage(stage, splits.num_classes), _run_context(env, stage, history))
            outcome = trainer.fit(model, labeled, val, pseudo_set)
        else:  # epochs 0: use the (pretrained) model as it is, e.g. a teacher trained elsewhere
            model.to(env.ctx.device)
            outcome = TrainOutcome(state_dict=model.state_dict(), best_epoch=0, best_val_top1=float("nan"),
                                   epochs=0, steps=0, images_seen=0, seconds=0.0, precision="none")
        history.write_all(outcome.history)
    measure_started = time.time()
    # at the training size the model's validation numbers are its best epoch's, measured on the same cached set
    known_val = _best_epoch_val(outcome) if stage.test_size == stage.image_size else None
    measured = _measure(model, stage.test_size, env, data_cfg, known_val)
    env.phases.stage_detail[stage.name] = {**training_breakdown(outcome.history, outcome.resumed_from_step),
                                           "final_measurement": time.time() - measure_started}
    metrics = {"name": stage.name, "model": stage.model, **measured,
               "num_labeled": len(labeled), "num_pseudo": 0 if pseudo_set is None else len(pseudo_set),
               "seconds": outcome.seconds, "params": count_parameters(model), "best_epoch": outcome.best_epoch,
               "warm_start_from": warm_from,
               "epochs": outcome.epochs, "steps": outcome.steps, "images_seen": outcome.images_seen,
               "image_size": stage.image_size, "test_size": stage.test_size, "dropout": stage.dropout,
               "drop_path": stage.drop_path, "seed": stage.seed, "precision": outcome.precision,
               "precision_info": outcome.precision_info, "thread_changes": outcome.thread_changes,
               "stopped_early": outcome.stopped_early, "stopped_at_epoch": outcome.stopped_at_epoch}
    _save(out, model, stage, env, stage.image_size, metrics, data_cfg)
    env.tracking.log_stage(stage.name, metrics)
    trained = (f"best epoch {outcome.best_epoch}/{outcome.epochs}  {outcome.seconds:.1f}s  ({outcome.precision})"
               if outcome.epochs > 0 else "not trained (epochs 0): the given weights as they are")
    log.info(f"[{stage.name}] val top-1 {metrics['val_top1']:.2f}  test top-1 {metrics['test_top1']:.2f}  {trained}")
    return metrics


def label_stage(out: Path, name: str, teacher: dict, pool: UnlabeledSource, labeling: ResolvedLabeling,
                env: Env) -> LabelStore:
    """The teacher, in eval mode on clean images at its test resolution, labels the pool into a
    sharded store in ``out`` (resumable shard by shard), and the labeled validation split into
    ``probe.parquet`` (pseudo-label accuracy against confidence, for the report)."""
    cfg, splits, ctx = env.cfg, env.splits, env.ctx
    model, meta = load_model(env.run.file(teacher["name"], layout.MODEL))
    size, clean = eval_size(meta), clean_transform(meta)
    tta = cfg.pseudo.tta
    members = _ensemble_members(labeling, meta, splits.num_classes, env.run)
    identity = ":".join([teacher["name"], teacher["model"], model_fingerprint(model)]
                        + [f"+{key}={model_fingerprint(m)}" for key, m in members]
                        + ([f"tta={tta}"] if tta != "none" else []))
    # pseudo.tta / pseudo.ensemble: the teacher, its flip average, or the mean of several (label.tta)
    model = labeling_model(model, tta, [m for _, m in members])
    temperature = labeling.temperature
    if cfg.pseudo.calibrate:  # before the pool, so the threshold reads as a calibrated probability
        temperature = _calibrated_temperature(out, name, model, meta, identity, labeling, env)
    log.info(f"[{name}] {teacher['name']} labels the pool at {size}px "
             f"({'hard' if labeling.hard else f'soft, T={temperature:g}'}, top-{labeling.top_k}"
             f"{', flip TTA' if tta == 'flip' else ''}"
             f"{', averaged with ' + ', '.join(key for key, _ in members) if members else ''})")
    common = dict(transform=clean, num_classes=splits.num_classes, teacher=identity, device=ctx.device,
                  top_k=labeling.top_k, temperature=temperature,
                  batch_size=labeling.batch_size, ctx=ctx)
    manifest = label_to_store(model, pool, out, num_workers=env.num_workers, precision=cfg.pseudo.precision,
                              progress=env.progress, hashes=dedup_wanted(cfg), **common)
    if manifest.num_bad:
        log.warning(f"[{name}] skipped {manifest.num_bad} unreadable unlabeled image(s); "
                    f"listed in {out / 'bad_images.tsv'}")
    skipped = manifest.run.get("shards_skipped", 0)
    if skipped:
        log.info(f"[{name}] resuming at the first unfinished shard: {skipped} of {manifest.num_shards} "
                 "shards were labeled earlier")
    log.info(f"[{name}] {manifest.num_rows} images labeled ({manifest.header.precision}), "
             f"{manifest.bytes_per_image:.1f} bytes/image")
    probe_dir = out / "probe-store"
    probe = label_to_store(model, ImageSetSource(splits.val, shard_size=max(1, len(splits.val))), probe_dir,
                           num_workers=0, precision=manifest.header.precision, progress=False, hashes=False,
                           **common)
    labels = LabelStore(probe_dir, probe).to_pseudo_labels()
    table = pa.table({"confidence": pa.array(labels.confidence, pa.float32()),
                      "predicted": pa.array(labels.predicted, pa.int32()),
                      "target": pa.array(splits.val.targets, pa.int32())})
    atomic_write(out / layout.PROBE, lambda f: pq.write_table(table, f))  # every rank writes the same table
    store = LabelStore.open(out, require_complete=True)
    env.tracking.log_labeling(name, store, table)
    return store


def _ensemble_members(labeling: ResolvedLabeling, meta: dict, num_classes: int,
                      run: RunDir) -> list[tuple[str, torch.nn.Module]]:
    """The further teachers of the labeling, loaded: this run's (``pseudo.ensemble_size``) then
    ``pseudo.ensemble``'s files, each checked to label as the teacher does: the same classes,
    input channels, resolution and preprocessing (one clean view of each image serves all)."""
    sources = [(name, str(run.file(name, layout.MODEL))) for name in labeling.members]
    sources += [(f"pseudo.ensemble[{i}]", path) for i, path in enumerate(labeling.ensemble)]
    members = []
    for key, path in sources:
        try:
            model, other = load_model(Path(path))
        except (CheckpointError, OSError) as e:
            raise ConfigError(f"{key}: {e}") from None
        mine, theirs = (num_classes, clean_view(meta)), (other["num_classes"], clean_view(other))
        if theirs != mine:
            raise ConfigError(f"{key}: {path} labels (classes, (channels, geometry, interpolation, mean, std)) "
                              f"{theirs}, the teacher {mine}; an ensemble needs them alike")
        members.append((key, model))
    return members


def _calibrated_temperature(out: Path, name: str, model: torch.nn.Module, meta: dict, identity: str,
                            labeling: ResolvedLabeling, env: Env) -> float:
    """``pseudo.calibrate``: the temperature the pool is labeled at, T_cal x ``labeling.temperature``,
    T_cal fitted on the labeling model's logits on the labeled validation split
    (:mod:`noisystudent.label.calibration`); recorded with the ECE before and after in
    ``calibration.json``, which a resumed stage reuses (the store's header holds the temperature)."""
    path = out / layout.CALIBRATION
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):  # damaged: fit again (the program wrote it)
        recorded = None
    if isinstance(recorded, dict) and recorded.get("teacher") == identity \
            and recorded.get("base_temperature") == float(labeling.temperature):
        return float(recorded["labeling_temperature"])
    device = env.ctx.device
    val = env.clean(env.splits.val, eval_size(meta), data_config(meta))
    model.eval().to(device)
    logits, targets = [], []
    with torch.inference_mode():  # every rank fits on the whole split (no sharding): the same T everywhere
        for x, y in eval_batches(val, device, batch_size=labeling.batch_size, ctx=DistContext(device=device),
                                 cache=env.eval_cache):
            logits.append(model(x).float().cpu())
            targets.append(y.cpu())
    n = env.splits.num_classes
    summary = calibration_summary(torch.cat(logits) if logits else torch.empty(0, n),
                                  torch.cat(targets) if targets else torch.empty(0, dtype=torch.int64),
                                  labeling.temperature)
    summary["teacher"] = identity
    write_json_atomic(path, summary)  # every rank writes the same record
    log.info(f"[{name}] calibrated on {summary['n']} validation images: T_cal {summary['temperature']:.3f}, "
             f"ECE ({summary['bins']} bins) {100 * summary['ece_before']:.2f}% -> {100 * summary['ece_after']:.2f}%, "
             f"NLL {summary['nll_before'] or 0:.3f} -> {summary['nll_after'] or 0:.3f}; "
             f"labeling at T = {summary['labeling_temperature']:.3f}")
    if summary["temperature"] > 10:  # the fit says: trust these logits hardly at all
        log.warning(f"[{name}] the calibrated temperature is {summary['temperature']:.3g}: on validation the "
                    f"teacher (top-1 {100 * (summary['accuracy'] or 0):.1f}%) is best read as nearly uniform, so "
                    "few pool images may pass the threshold")
    return float(summary["labeling_temperature"])


def select_stage(out: Path, name: str, store: LabelStore, labeling: ResolvedLabeling, cfg: Config,
                 splits: DataSplits | None = None, tracking: Tracking | None = None) -> Selection:
    """Threshold and balance the store's pseudo labels (one DuckDB query over its shards), after
    dropping pool images that copy a held-out image of ``splits`` (``pseudo.dedup``); the counts go
    to ``tracking``'s trackers."""
    p = cfg.pseudo
    heldout = None
    if dedup_wanted(cfg) and splits is not None:
        heldout = out / layout.HELDOUT_HASHES
        write_heldout_hashes(heldout, {"val": splits.val, "test": splits.test} if p.dedup == "val+test"
                             else {"test": splits.test}, "L" if splits.channels == 1 else "RGB")
    selection = select_from_store(store.store_dir, out / layout.SELECTION, threshold=p.threshold,
                                  balance=p.balance, per_class=p.per_class, seed=labeling.select_seed,
                                  hard=labeling.hard, heldout=heldout, dedup_distance=p.dedup_distance,
                                  threshold_mode=p.threshold_mode)
    write_json_atomic(out / layout.SELECTION_SUMMARY, selection.summary())
    log.info(f"[{name}] kept {sum(selection.kept_per_class)}/{store.num_rows} above threshold {p.threshold}"
             f"{' (scaled per class)' if p.threshold_mode == 'per-class' else ''}; "
             f"{selection.num_selected} images ({selection.num_unique} unique) "
             f"{'balanced to K=' + str(selection.per_class) if selection.per_class else 'unbalanced'}")
    if tracking is not None:
        tracking.log_selection(name, selection, store.num_rows)
    return selection


def fixres_stage(out: Path, stage: ResolvedStage, last: dict, env: Env) -> dict:
    """Fix-res: fine-tune the last model at its test resolution on un-augmented labeled images,
    shallow blocks frozen, with the one training loop (checkpoints, resume, precision)."""
    splits = env.splits
    seed_everything(stage.seed)
    model, last_meta = load_model(env.run.file(last["name"], layout.MODEL), stage.dropout, stage.drop_path)
    data_cfg = {**(last_meta.get("data_config") or {}), **data_config(last_meta)}  # what it was trained with
    labeled, val, test = (env.clean(s, stage.test_size, data_cfg) for s in (splits.labeled, splits.val, splits.test))
    log.info(f"[{stage.name}] {stage.model} trained at {last['image_size']}px: fine-tune at {stage.test_size}px for "
             f"{stage.epochs:g} epochs on {len(labeled)} un-augmented labeled images, lr {stage.lr:g}")
    with env.tracking.stage(out, stage.name) as history:
        trainer = Trainer(Recipe.of_stage(stage, splits.num_classes), _run_context(env, stage, history))
        outcome = finetune(trainer, model, labeled, val, test)
        history.write_all(outcome.history)
    metrics = {"name": stage.name, "model": stage.model, **outcome.metrics(),
               "val_top1": outcome.after["val_top1"], "val_top5": outcome.after["val_top5"],
               "test_top1": outcome.after["test_top1"], "test_top5": outcome.after["test_top5"],
               "num_labeled": len(labeled), "num_pseudo": 0, "params": count_parameters(model),
               "best_epoch": None, "epochs": outcome.epochs, "steps": outcome.steps,
               "image_size": stage.test_size, "train_size": last["image_size"], "test_size": stage.test_size,
               "frozen": outcome.frozen, "seed": stage.seed}
    _save(out, model, stage, env, stage.test_size, metrics, data_cfg, train_size=last["image_size"])
    env.tracking.log_stage(stage.name, metrics)
    log.info(f"[{stage.name}] at {stage.test_size}px: test top-1 {outcome.before['test_top1']:.2f} -> "
             f"{outcome.after['test_top1']:.2f}; {outcome.frozen_blocks}/{outcome.total_blocks} blocks frozen")
    return metrics


def evaluate_stage(out: Path, ends: list[dict], env: Env) -> dict:
    """The configured suites on the test split, first teacher and final model side by side."""
    models = {m["name"]: env.run.file(m["name"], layout.MODEL) for m in ends}
    known = {m["name"]: {"top1": m["test_top1"], "top5": m["test_top5"]} for m in ends if "test_top5" in m}
    return evaluate_checkpoints(models, env.splits.test, env.cfg.evaluate, channels=env.splits.channels,
                                device=env.ctx.device, out_dir=out, seed=env.cfg.seed, progress=env.progress,
                                known_clean=known, progress_dir=env.run.checkpoint_dir(layout.EVALUATE))


def check_selection(selection: Selection, store: LabelStore) -> None:
    if selection.store.get("teacher") != store.header.teacher or selection.store.get("num_rows") != store.num_rows:
        raise DataError(f"selection {selection.path} was made from another pseudo-label store than "
                        f"{store.store_dir} (teacher {selection.store.get('teacher')}); select again")


def _run_context(env: Env, stage: ResolvedStage, history: StageHistory) -> RunContext:
    """Where a stage's recipe runs: the job's ranks and workers, its checkpoint folder, its history."""
    return RunContext(ctx=env.ctx, num_workers=env.num_workers, progress=env.progress,
                      checkpoint_dir=env.run.checkpoint_dir(stage.name), callbacks=[history.hooks()],
                      step_every=env.tracking.step_every, eval_cache=env.eval_cache,
                      precision_cache=env.precision_cache)


def _best_epoch_val(outcome: TrainOutcome) -> dict | None:
    """The validation top-1/top-5 of the weights training kept (its best epoch's evaluation record),
    None when it kept none (epochs 0)."""
    record = next((r for r in outcome.history if r["epoch"] == outcome.best_epoch), None)
    return None if record is None else {"top1": record["val_top1"], "top5": record["val_top5"]}


def _measure(model, test_size: int, env: Env, data_cfg: dict | None = None, known_val: dict | None = None) -> dict:
    """Val and test top-1/top-5 at the stage's test resolution (the reported numbers). ``known_val``:
    the validation numbers when training already measured these weights on this set at this size
    (the same evaluation: the same cached batches, weights and layout), which saves a pass."""
    val = known_val or evaluate_classifier(model, env.clean(env.splits.val, test_size, data_cfg), env.ctx.device,
                                           ctx=env.ctx, num_workers=env.num_workers, cache=env.eval_cache)
    test = evaluate_classifier(model, env.clean(env.splits.test, test_size, data_cfg), env.ctx.device, ctx=env.ctx,
                               num_workers=env.num_workers, cache=env.eval_cache)
    return {"val_top1": val["top1"], "val_top5": val["top5"], "test_top1": test["top1"], "test_top5": test["top5"]}


def _save(out: Path, model, stage: ResolvedStage, env: Env, image_size: int, metrics: dict, data_cfg: dict,
          **extra) -> None:
    s = env.splits
    save_model(out / layout.MODEL, model, name=stage.model, num_classes=s.num_classes, in_chans=s.channels,
               classes=s.classes, image_size=image_size, mean=data_cfg["mean"], std=data_cfg["std"],
               data_config=data_cfg, test_size=stage.test_size, **extra)
    write_json_atomic(out / layout.METRICS, metrics)
