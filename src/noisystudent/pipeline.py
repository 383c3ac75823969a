"""The Noisy Student loop, top to bottom.

    teacher  = train(labeled, noise)                          # stage "teacher"
    for each student in the chain:
        labels    = teacher(unlabeled, no noise)              # stage "label-i"
        selection = threshold + balance(labels)               # stage "select-i"
        student   = train(labeled + selection, noise)         # stage "student-i"
        teacher   = student

Every stage writes a folder in the run directory and is skipped on ``--resume`` once finished.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset

from .models.checkpoint import load_model, save_model
from .config.schema import Config, StageConfig
from .runtime.errors import ConfigError
from .data.datasets import DataSplits, ImageSet, TransformedSet, build_splits
from .runtime.distributed import DistContext, barrier, broadcast_object, cleanup, init_distributed
from .evaluate.classifier import evaluate_checkpoints, evaluate_classifier
from .train.fixres import finetune_fixres, fixres_enabled
from .label.pseudo_labels import PseudoLabels, label_images
from .models.factory import count_parameters, create_model
from .runtime.rundir import RunDir, write_json_atomic
from .label.select import Selection, select_pseudo_labels
from .train.loop import TrainOutcome, train_classifier
from .data.transforms import eval_transform, train_transform

log = logging.getLogger("noisystudent")

SUMMARY_KEYS = ("name", "model", "val_top1", "test_top1", "val_top5", "test_top5", "num_labeled",
                "num_pseudo", "seconds", "params", "best_epoch", "image_size")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def banner(text: str) -> None:
    log.info("=" * 8 + f" {text} " + "=" * max(0, 70 - len(text)))


class PseudoLabeledSet(Dataset):
    """Selected unlabeled images (duplicates repeat) with their soft targets, noisy transform."""

    def __init__(self, images: ImageSet, labels: PseudoLabels, rows: np.ndarray, transform):
        self.images, self.labels, self.rows, self.transform = images, labels, rows, transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        row = np.array([self.rows[i]])
        target = torch.from_numpy(self.labels.soft_targets(row)[0])
        return self.transform(self.images.load(int(self.labels.image_index(row)[0]))), target


@dataclass
class StageResult:
    """One row of the summary table."""

    metrics: dict
    checkpoint: Path


def _stage_noise(cfg: Config, stage: StageConfig) -> tuple[float, float]:
    dropout = cfg.noise.dropout if stage.dropout is None else stage.dropout
    drop_path = cfg.noise.drop_path if stage.drop_path is None else stage.drop_path
    return dropout, drop_path


def _tensorboard(run: RunDir, cfg: Config):
    """A TensorBoard writer when ``tensorboard: true`` (an optional dependency)."""
    if not cfg.tensorboard:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ConfigError("tensorboard: true needs the tensorboard package "
                          "(pip install 'noisystudent[tensorboard]')") from None
    return SummaryWriter(str(run.root / "tensorboard"))


def _done(run: RunDir, name: str, ctx: DistContext) -> bool:
    """Whether a stage finished, as rank 0 sees it (all ranks must take the same branch)."""
    return broadcast_object(run.is_done(name), ctx)


def train_stage(run: RunDir, name: str, stage: StageConfig, cfg: Config, splits: DataSplits,
                ctx: DistContext, *, pseudo: tuple[PseudoLabels, Selection] | None, seed: int,
                progress: bool) -> StageResult:
    """Train one model (teacher: labeled only; student: labeled + selected pseudo labels)."""
    out_ckpt = run.path(name) / "model.pt"
    if _done(run, name, ctx):
        log.info(f"[{name}] finished earlier; skipping (resume)")
        return StageResult(json.loads((run.path(name) / "metrics.json").read_text()), out_ckpt)
    size = stage.image_size or cfg.data.image_size
    test_size = stage.test_size or size
    dropout, drop_path = _stage_noise(cfg, stage)
    seed_everything(seed)
    model = create_model(stage.model, splits.num_classes, splits.channels, dropout, drop_path,
                         pretrained=stage.pretrained, classes=splits.classes,
                         used_as_is=cfg.stage_epochs(stage) == 0)
    noisy = train_transform(size, splits.channels, splits.mean, splits.std, cfg.noise, cfg.data.flip)
    clean = eval_transform(size, splits.channels, splits.mean, splits.std)
    labeled = TransformedSet(splits.labeled, noisy)
    val, test = TransformedSet(splits.val, clean), TransformedSet(splits.test, clean)  # model selection
    if test_size != size:  # reported numbers: at the stage's test resolution
        clean_test = eval_transform(test_size, splits.channels, splits.mean, splits.std)
        val_eval, test_eval = TransformedSet(splits.val, clean_test), TransformedSet(splits.test, clean_test)
    else:
        val_eval, test_eval = val, test
    pseudo_set = None
    if pseudo is not None:
        labels, selection = pseudo
        pseudo_set = PseudoLabeledSet(splits.unlabeled, labels, selection.rows, noisy)
    log.info(f"[{name}] {stage.model} ({count_parameters(model) / 1e6:.2f}M params) at {size}px, "
             f"{len(labeled)} labeled + {0 if pseudo_set is None else len(pseudo_set)} pseudo-labeled, "
             f"dropout {dropout}, drop path {drop_path}, augment {cfg.noise.augment}")
    with run.stage(name, enabled=ctx.is_main) as out:
        metrics_file = (out / "metrics.jsonl").open("w") if ctx.is_main else None

        board = _tensorboard(run, cfg) if ctx.is_main else None

        def on_epoch(record: dict) -> None:
            if metrics_file:
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
            if board:
                for key in ("loss", "val_top1", "val_top5", "lr"):
                    board.add_scalar(f"{name}/{key}", record[key], record["step"])
                board.flush()

        if cfg.stage_epochs(stage) > 0:
            outcome = train_classifier(model, labeled, val, cfg.train, num_classes=splits.num_classes,
                                       epochs=cfg.stage_epochs(stage), lr=stage.lr or cfg.train.lr, ctx=ctx,
                                       pseudo=pseudo_set, seed=seed, num_workers=cfg.data.num_workers,
                                       progress=progress, desc=name, on_epoch=on_epoch,
                                       checkpoint_dir=run.root / "checkpoints" / name)
        else:  # epochs 0: use the (pretrained) model as it is, e.g. a teacher trained elsewhere
            model.to(ctx.device)
            outcome = TrainOutcome(state_dict=model.state_dict(), best_epoch=0, best_val_top1=float("nan"),
                                   epochs=0, steps=0, images_seen=0, seconds=0.0)
        if board:
            board.close()
        if metrics_file:
            metrics_file.close()
            # a resumed stage streamed only its last epochs; write the whole history
            (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in outcome.history))
        val_m = evaluate_classifier(model, val_eval, ctx.device, ctx=ctx)
        test_m = evaluate_classifier(model, test_eval, ctx.device, ctx=ctx)
        metrics = {"name": name, "model": stage.model, "val_top1": val_m["top1"], "val_top5": val_m["top5"],
                   "test_top1": test_m["top1"], "test_top5": test_m["top5"], "num_labeled": len(labeled),
                   "num_pseudo": 0 if pseudo_set is None else len(pseudo_set), "seconds": outcome.seconds,
                   "params": count_parameters(model), "best_epoch": outcome.best_epoch,
                   "epochs": outcome.epochs, "steps": outcome.steps, "images_seen": outcome.images_seen,
                   "image_size": size, "test_size": test_size, "dropout": dropout, "drop_path": drop_path}
        if ctx.is_main:
            save_model(out / "model.pt", model, name=stage.model, num_classes=splits.num_classes,
                       in_chans=splits.channels, classes=splits.classes, image_size=size,
                       mean=splits.mean, std=splits.std, test_size=test_size)
            write_json_atomic(out / "metrics.json", metrics)
    barrier(ctx)  # other ranks read this stage's model.pt next
    if ctx.is_main:  # the stage is committed; its resumable checkpoints are no longer needed
        shutil.rmtree(run.root / "checkpoints" / name, ignore_errors=True)
    log.info(f"[{name}] val top-1 {metrics['val_top1']:.2f}  test top-1 {metrics['test_top1']:.2f}  "
             f"best epoch {outcome.best_epoch}/{outcome.epochs}  {outcome.seconds:.1f}s")
    return StageResult(metrics, out_ckpt)


def finetune_stage(run: RunDir, name: str, last: StageResult, stage: StageConfig, cfg: Config,
                   splits: DataSplits, ctx: DistContext, *, seed: int, progress: bool) -> StageResult | None:
    """Fix-res: fine-tune the last model at its test resolution on un-augmented labeled images,
    shallow blocks frozen (noisystudent.train.fixres). None when disabled (finetune.enabled, or by
    default when the test resolution is not above the training resolution)."""
    size = stage.image_size or cfg.data.image_size
    test_size = stage.test_size or size
    if not fixres_enabled(cfg.finetune.enabled, size, test_size):
        return None
    out_ckpt = run.path(name) / "model.pt"
    if _done(run, name, ctx):
        log.info(f"[{name}] finished earlier; skipping (resume)")
        return StageResult(json.loads((run.path(name) / "metrics.json").read_text()), out_ckpt)
    dropout, drop_path = _stage_noise(cfg, stage)
    seed_everything(seed)
    model, _ = load_model(last.checkpoint, dropout, drop_path)
    clean = eval_transform(test_size, splits.channels, splits.mean, splits.std)
    labeled, val, test = (TransformedSet(s, clean) for s in (splits.labeled, splits.val, splits.test))
    lr = cfg.finetune.lr if cfg.finetune.lr is not None else (stage.lr or cfg.train.lr) / 10
    batch_size = cfg.finetune.batch_size or cfg.train.batch_size
    log.info(f"[{name}] {stage.model} trained at {size}px: fine-tune at {test_size}px for "
             f"{cfg.finetune.epochs:g} epochs on {len(labeled)} un-augmented labeled images, lr {lr:g}")
    with run.stage(name, enabled=ctx.is_main) as out:
        outcome = finetune_fixres(model, labeled, val, test=test, frozen_blocks=cfg.finetune.frozen_blocks,
                                  epochs=cfg.finetune.epochs, lr=lr, batch_size=batch_size, ctx=ctx,
                                  optimizer=cfg.train.optimizer, momentum=cfg.train.momentum,
                                  weight_decay=cfg.train.weight_decay, label_smoothing=cfg.train.label_smoothing,
                                  seed=seed, num_workers=cfg.data.num_workers, progress=progress, desc=name)
        metrics = {"name": name, "model": stage.model, **outcome.metrics(),
                   "val_top1": outcome.after["val_top1"], "val_top5": outcome.after["val_top5"],
                   "test_top1": outcome.after["test_top1"], "test_top5": outcome.after["test_top5"],
                   "num_labeled": len(labeled), "num_pseudo": 0, "params": count_parameters(model),
                   "best_epoch": None, "epochs": outcome.epochs, "steps": outcome.steps,
                   "image_size": test_size, "train_size": size, "test_size": test_size,
                   "frozen": outcome.frozen}
        if ctx.is_main:
            save_model(out / "model.pt", model, name=stage.model, num_classes=splits.num_classes,
                       in_chans=splits.channels, classes=splits.classes, image_size=test_size,
                       mean=splits.mean, std=splits.std, train_size=size, test_size=test_size)
            write_json_atomic(out / "metrics.json", metrics)
    barrier(ctx)
    log.info(f"[{name}] at {test_size}px: test top-1 {outcome.before['test_top1']:.2f} -> "
             f"{outcome.after['test_top1']:.2f}, val top-1 {outcome.before['val_top1']:.2f} -> "
             f"{outcome.after['val_top1']:.2f}; {outcome.frozen_blocks}/{outcome.total_blocks} blocks frozen, "
             f"{outcome.seconds:.1f}s")
    return StageResult(metrics, out_ckpt)


def label_stage(run: RunDir, name: str, teacher: StageResult, cfg: Config, splits: DataSplits,
                ctx: DistContext, progress: bool) -> PseudoLabels:
    """The teacher, in eval mode on clean images, labels the unlabeled pool."""
    path = run.path(name) / "pseudo_labels.parquet"
    if not _done(run, name, ctx):
        model, meta = load_model(teacher.checkpoint)
        model.to(ctx.device)
        clean = eval_transform(meta["image_size"], splits.channels, splits.mean, splits.std)
        pool = TransformedSet(splits.unlabeled, clean)
        log.info(f"[{name}] labeling {len(pool)} images with {teacher.metrics['name']} "
                 f"({'hard' if cfg.pseudo.hard else f'soft, T={cfg.pseudo.temperature}'})")
        with run.stage(name, enabled=ctx.is_main) as out:
            if ctx.is_main:
                labels, bad = label_images(
                    model, pool, [splits.unlabeled.key(i) for i in range(len(pool))],
                    num_classes=splits.num_classes, teacher=teacher.metrics["name"], device=ctx.device,
                    temperature=cfg.pseudo.temperature, hard=cfg.pseudo.hard, top_k=cfg.pseudo.top_k,
                    batch_size=cfg.pseudo.batch_size, num_workers=cfg.data.num_workers, progress=progress)
                labels.save(out / path.name)
                if bad:
                    log.warning(f"[{name}] skipped {len(bad)} unreadable unlabeled image(s); "
                                f"listed in {run.path(name) / 'bad_images.txt'}")
                (out / "bad_images.txt").write_text("".join(k + "\n" for k in bad))
                # The same teacher on the labeled validation split: a probe of pseudo-label accuracy
                # against confidence (the report's reliability diagram).
                probe, _ = label_images(model, TransformedSet(splits.val, clean),
                                        [splits.val.key(i) for i in range(len(splits.val))],
                                        num_classes=splits.num_classes, teacher=teacher.metrics["name"],
                                        device=ctx.device, temperature=cfg.pseudo.temperature, top_k=1,
                                        batch_size=cfg.pseudo.batch_size, progress=False)
                pq.write_table(pa.table({"confidence": pa.array(probe.confidence, pa.float32()),
                                         "predicted": pa.array(probe.predicted, pa.int32()),
                                         "target": pa.array(splits.val.targets, pa.int32())}),
                               out / "probe.parquet")
        barrier(ctx)
    return PseudoLabels.load(path)


def select_stage(run: RunDir, name: str, labels: PseudoLabels, cfg: Config, seed: int,
                 ctx: DistContext) -> Selection:
    """Threshold and balance the pseudo labels; the chosen rows are saved as Parquet."""
    path = run.path(name) / "selection.parquet"
    if not _done(run, name, ctx):
        selection = select_pseudo_labels(labels.confidence, labels.predicted, labels.num_classes,
                                         threshold=cfg.pseudo.threshold, balance=cfg.pseudo.balance,
                                         per_class=cfg.pseudo.per_class, seed=seed)
        with run.stage(name, enabled=ctx.is_main) as out:
            if ctx.is_main:
                pq.write_table(pa.table({"row": pa.array(selection.rows, pa.int64())}), out / path.name)
                write_json_atomic(out / "selection.json", selection.summary())
        barrier(ctx)
    summary = json.loads((run.path(name) / "selection.json").read_text())
    rows = pq.read_table(path).column("row").to_numpy()
    sel = Selection(rows=rows, per_class=summary["per_class"],
                    kept_per_class=np.asarray(summary["kept_per_class"]),
                    selected_per_class=np.asarray(summary["selected_per_class"]),
                    num_below_threshold=summary["num_below_threshold"])
    log.info(f"[{name}] kept {int(sel.kept_per_class.sum())}/{len(labels)} above threshold "
             f"{cfg.pseudo.threshold}; {len(sel.rows)} rows ({sel.num_unique} unique) "
             f"{'balanced to K=' + str(sel.per_class) if sel.per_class else 'unbalanced'}")
    return sel


def evaluate_stage(run: RunDir, name: str, stages: list[StageResult], cfg: Config, splits: DataSplits,
                   ctx: DistContext, progress: bool) -> dict:
    """The configured suites on the test split, first teacher and final model side by side."""
    path = run.path(name) / "robustness.json"
    if not _done(run, name, ctx):
        ends = (stages[0], stages[-1])
        models = {s.metrics["name"]: s.checkpoint for s in ends}
        # each stage already measured its test top-1/top-5: no second clean pass over the test set
        known = {s.metrics["name"]: {"top1": s.metrics["test_top1"], "top5": s.metrics["test_top5"]}
                 for s in ends if "test_top5" in s.metrics}
        with run.stage(name, enabled=ctx.is_main) as out:
            if ctx.is_main:
                evaluate_checkpoints(models, splits.test, cfg.evaluate, channels=splits.channels,
                                     device=ctx.device, out_dir=out, seed=cfg.seed, progress=progress,
                                     known_clean=known)
        barrier(ctx)
    results = json.loads(path.read_text())
    return {model: dict(kv for suite, res in r.items() for kv in _headlines(suite, res)) for model, r in results.items()}


def _headlines(suite: str, res) -> list[tuple[str, float]]:
    """A few numbers per suite for the summary (details stay in evaluate/robustness.json)."""
    if not isinstance(res, dict):
        return []
    out = []
    for key in ("top1", "top5", "mce", "relative_mce", "mean_error", "mfr", "mean_flip_prob", "mt5d"):
        value = res.get(key)
        if isinstance(value, (int, float)):
            out.append((f"{suite}.{key}", float(value)))
        elif isinstance(value, list) and value and "eps" in res:  # attacks: accuracy per eps
            out += [(f"{suite}.top1@eps{e:g}", float(v)) for e, v in zip(res["eps"], value)]
    return out


def run_pipeline(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the whole Noisy Student loop; returns the summary written to summary.json."""
    ctx = init_distributed(cfg.device)
    try:
        run = RunDir.open(run_dir, cfg, resume) if ctx.is_main else RunDir(run_dir)
        barrier(ctx)
        handler = _attach_log_file(run.root / "run.log") if ctx.is_main else None
        start = time.time()
        banner(f"Data: {cfg.data.source}")
        splits = build_splits(cfg.data, cfg.seed, require_unlabeled=bool(cfg.students))
        if ctx.is_main:
            write_json_atomic(run.root / "data.json", splits.describe())
        log.info(f"{len(splits.labeled)} labeled, {len(splits.unlabeled)} unlabeled, {len(splits.val)} val, "
                 f"{len(splits.test)} test images; {splits.num_classes} classes; device {ctx.device}, "
                 f"{ctx.world_size} process(es)")

        banner(f"Teacher: {cfg.teacher.model} on labeled images")
        teacher = train_stage(run, "teacher", cfg.teacher, cfg, splits, ctx, pseudo=None,
                              seed=cfg.seed, progress=progress)
        stages = [teacher]
        for i, student_cfg in enumerate(cfg.students, start=1):
            banner(f"Iteration {i}: {teacher.metrics['model']} teaches {student_cfg.model}")
            labels = label_stage(run, f"label-{i}", teacher, cfg, splits, ctx, progress)
            selection = select_stage(run, f"select-{i}", labels, cfg, cfg.seed + i, ctx)
            student = train_stage(run, f"student-{i}", student_cfg, cfg, splits, ctx,
                                  pseudo=(labels, selection), seed=cfg.seed + 1000 * i, progress=progress)
            if student.metrics["params"] < teacher.metrics["params"]:
                log.warning(f"[student-{i}] is smaller than its teacher; the paper uses equal-or-larger students")
            stages.append(student)
            teacher = student

        last_cfg = cfg.students[-1] if cfg.students else cfg.teacher
        last_size = last_cfg.image_size or cfg.data.image_size
        if fixres_enabled(cfg.finetune.enabled, last_size, last_cfg.test_size or last_size):
            banner(f"Fix-res: {last_cfg.model} at {last_cfg.test_size or last_size}px")
            stages.append(finetune_stage(run, "fixres", stages[-1], last_cfg, cfg, splits, ctx,
                                         seed=cfg.seed + 999_999, progress=progress))

        banner(f"Evaluate: {', '.join(cfg.evaluate.suites)}")
        robustness = evaluate_stage(run, "evaluate", stages, cfg, splits, ctx, progress)

        summary = {"run_dir": str(run.root), "config_fingerprint": cfg.fingerprint(),
                   "seconds": time.time() - start, "stages": [s.metrics for s in stages],
                   "result": stages[-1].metrics["name"], "robustness": robustness}
        if ctx.is_main:
            write_json_atomic(run.root / "summary.json", summary)
            log.info("\n" + format_summary_table(summary))
            _write_report(run.root)
        if handler:
            log.removeHandler(handler)
            handler.close()
        return summary
    finally:
        cleanup(ctx)


def _write_report(run_dir: Path) -> None:
    """The HTML + Markdown report; a failure is logged, never fails a finished run."""
    from .report.build import build_report

    try:
        log.info(f"report: {build_report(run_dir)['html']}")
    except Exception as e:  # noqa: BLE001 - the run's results are already safe on disk
        log.warning(f"report not written ({type(e).__name__}: {e}); rebuild it with: noisystudent report {run_dir}")


def format_summary_table(summary: dict) -> str:
    """The teacher and each student: model, val/test top-1, images used, time."""
    head = f"{'stage':<11} {'model':<24} {'val top-1':>9} {'test top-1':>10} {'labeled':>8} {'pseudo':>8} {'time':>8}"
    lines = [head, "-" * len(head)]
    for s in summary["stages"]:
        lines.append(f"{s['name']:<11} {s['model']:<24} {s['val_top1']:>9.2f} {s['test_top1']:>10.2f} "
                     f"{s['num_labeled']:>8} {s['num_pseudo']:>8} {s['seconds']:>7.1f}s")
    for s in summary["stages"]:
        if "test_top1_before" in s:
            lines.append(f"fix-res at {s['test_size']}px (trained at {s['train_size']}px): test top-1 "
                         f"{s['test_top1_before']:.2f} before, {s['test_top1_after']:.2f} after "
                         f"({s['test_top1_after'] - s['test_top1_before']:+.2f}); "
                         f"{s['frozen_blocks']}/{s['total_blocks']} blocks frozen")
    return "\n".join(lines)


def _attach_log_file(path: Path) -> logging.Handler:
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler
