"""The Noisy Student loop, top to bottom.

    teacher  = train(labeled, noise)                          # stage "teacher"
    for each student in the chain:
        store     = teacher(pool, no noise)                   # stage "label-i": a sharded store
        selection = threshold + balance(store)                # stage "select-i": out of core
        student   = train(labeled + selection, noise)         # stage "student-i"
        teacher   = student
    fixres   = fine-tune(last, test resolution, no noise)     # stage "fixres", when it runs
    evaluate(teacher, final)                                   # stage "evaluate"

Each stage is a plain function of its inputs and an output folder; the
:class:`~noisystudent.runtime.runner.StageRunner` skips finished stages, commits each one and
does the ranks' bookkeeping. Every stage's settings come from :func:`resolve_stages` (one place).
The pool is never held in memory: it is labeled shard by shard into a store, selected by a query
over the store, and read back by position or as a stream (noisystudent.label.pseudo_labeled).
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
from .config.stages import ResolvedLabeling, ResolvedStage, resolve_stages
from .data.datasets import DataSplits, TransformedSet, build_splits
from .data.pool import ImageSetSource, UnlabeledSource, build_pool, pool_size
from .data.transforms import eval_transform, train_transform
from .evaluate.classifier import evaluate_checkpoints, evaluate_classifier
from .label.hashing import write_heldout_hashes
from .label.inference import label_to_store, model_fingerprint
from .label.select import Selection, select_from_store
from .label.store import LabelStore
from .label.pseudo_labeled import pseudo_labeled_set
from .models.checkpoint import clean_transform, data_config, eval_size, load_model, save_model
from .models.factory import count_parameters, create_model
from .models.preflight import check_pretrained_files
from .models.pretrained import stage_data_config
from .runtime import rundir as layout
from .runtime.cpu import configure as configure_cpu
from .runtime.distributed import DistContext, cleanup, init_distributed
from .runtime.errors import ConfigError, DataError
from .runtime.files import atomic_write
from .runtime.rundir import RunDir, write_json_atomic
from .runtime.runner import StageRunner
from .train.fixres import finetune_fixres
from .train.loop import TrainOutcome, train_classifier

log = logging.getLogger("noisystudent")

STAGE_KINDS = ("train", "label", "select")  # what each per-stage CLI command runs


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def banner(text: str) -> None:
    log.info("=" * 8 + f" {text} " + "=" * max(0, 70 - len(text)))


@dataclass
class Env:
    """What every stage may need besides its inputs: where the job runs and how it reports."""

    ctx: DistContext
    run: RunDir
    cfg: Config
    splits: DataSplits
    progress: bool

    clean_sets: dict = dataclasses.field(default_factory=dict)

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


# ------------------------------------------------------------------------------ the stages


def train_stage(out: Path, stage: ResolvedStage, env: Env, pseudo=None) -> dict:
    """Train one model (teacher: labeled only; student: labeled + its selection); returns its
    summary row, and writes model.pt, metrics.json and metrics.jsonl into ``out``."""
    cfg, splits = env.cfg, env.splits
    seed_everything(stage.seed)
    model = create_model(stage.model, splits.num_classes, splits.channels, stage.dropout, stage.drop_path,
                         pretrained=stage.pretrained, classes=splits.classes, used_as_is=stage.epochs == 0)
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
    train_cfg = _stage_train_config(cfg, stage)
    with _History(out, env, stage.name) as history:
        if stage.epochs > 0:
            outcome = train_classifier(model, labeled, val, train_cfg, num_classes=splits.num_classes,
                                       epochs=stage.epochs, lr=stage.lr, ctx=env.ctx, pseudo=pseudo_set,
                                       seed=stage.seed, num_workers=env.num_workers, progress=env.progress,
                                       desc=stage.name, on_epoch=history.add,
                                       checkpoint_dir=env.run.checkpoint_dir(stage.name))
        else:  # epochs 0: use the (pretrained) model as it is, e.g. a teacher trained elsewhere
            model.to(env.ctx.device)
            outcome = TrainOutcome(state_dict=model.state_dict(), best_epoch=0, best_val_top1=float("nan"),
                                   epochs=0, steps=0, images_seen=0, seconds=0.0, precision="none")
        history.write_all(outcome.history)
    metrics = {"name": stage.name, "model": stage.model, **_measure(model, stage.test_size, env, data_cfg),
               "num_labeled": len(labeled), "num_pseudo": 0 if pseudo_set is None else len(pseudo_set),
               "seconds": outcome.seconds, "params": count_parameters(model), "best_epoch": outcome.best_epoch,
               "epochs": outcome.epochs, "steps": outcome.steps, "images_seen": outcome.images_seen,
               "image_size": stage.image_size, "test_size": stage.test_size, "dropout": stage.dropout,
               "drop_path": stage.drop_path, "seed": stage.seed, "precision": outcome.precision,
               "precision_info": outcome.precision_info, "thread_changes": outcome.thread_changes}
    _save(out, model, stage, env, stage.image_size, metrics, data_cfg)
    log.info(f"[{stage.name}] val top-1 {metrics['val_top1']:.2f}  test top-1 {metrics['test_top1']:.2f}  "
             f"best epoch {outcome.best_epoch}/{outcome.epochs}  {outcome.seconds:.1f}s  ({outcome.precision})")
    return metrics


def label_stage(out: Path, name: str, teacher: dict, pool: UnlabeledSource, labeling: ResolvedLabeling,
                env: Env) -> LabelStore:
    """The teacher, in eval mode on clean images at its test resolution, labels the pool into a
    sharded store in ``out`` (resumable shard by shard), and the labeled validation split into
    ``probe.parquet`` (pseudo-label accuracy against confidence, for the report)."""
    cfg, splits, ctx = env.cfg, env.splits, env.ctx
    model, meta = load_model(env.run.file(teacher["name"], layout.MODEL))
    size, clean = eval_size(meta), clean_transform(meta)
    identity = f"{teacher['name']}:{teacher['model']}:{model_fingerprint(model)}"
    log.info(f"[{name}] {teacher['name']} labels the pool at {size}px "
             f"({'hard' if labeling.hard else f'soft, T={labeling.temperature}'}, top-{labeling.top_k})")
    common = dict(transform=clean, num_classes=splits.num_classes, teacher=identity, device=ctx.device,
                  top_k=labeling.top_k, temperature=labeling.temperature, hard=labeling.hard,
                  batch_size=labeling.batch_size, ctx=ctx)
    manifest = label_to_store(model, pool, out, num_workers=env.num_workers, precision=cfg.pseudo.precision,
                              progress=env.progress, hashes=cfg.pseudo.dedup != "none", **common)
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
    return LabelStore.open(out, require_complete=True)


def select_stage(out: Path, name: str, store: LabelStore, labeling: ResolvedLabeling, cfg: Config,
                 splits: DataSplits | None = None) -> Selection:
    """Threshold and balance the store's pseudo labels (one DuckDB query over its shards), after
    dropping pool images that copy a held-out image of ``splits`` (``pseudo.dedup``)."""
    p = cfg.pseudo
    heldout = None
    if p.dedup != "none" and splits is not None:
        heldout = out / layout.HELDOUT_HASHES
        write_heldout_hashes(heldout, {"val": splits.val, "test": splits.test} if p.dedup == "val+test"
                             else {"test": splits.test}, "L" if splits.channels == 1 else "RGB")
    selection = select_from_store(store.store_dir, out / layout.SELECTION, threshold=p.threshold,
                                  balance=p.balance, per_class=p.per_class, seed=labeling.select_seed,
                                  heldout=heldout, dedup_distance=p.dedup_distance)
    write_json_atomic(out / layout.SELECTION_SUMMARY, selection.summary())
    log.info(f"[{name}] kept {sum(selection.kept_per_class)}/{store.num_rows} above threshold {p.threshold}; "
             f"{selection.num_selected} images ({selection.num_unique} unique) "
             f"{'balanced to K=' + str(selection.per_class) if selection.per_class else 'unbalanced'}")
    return selection


def fixres_stage(out: Path, stage: ResolvedStage, last: dict, env: Env) -> dict:
    """Fix-res: fine-tune the last model at its test resolution on un-augmented labeled images,
    shallow blocks frozen, with the one training loop (checkpoints, resume, precision)."""
    cfg, splits = env.cfg, env.splits
    seed_everything(stage.seed)
    model, last_meta = load_model(env.run.file(last["name"], layout.MODEL), stage.dropout, stage.drop_path)
    data_cfg = {**(last_meta.get("data_config") or {}), **data_config(last_meta)}  # what it was trained with
    labeled, val, test = (env.clean(s, stage.test_size, data_cfg) for s in (splits.labeled, splits.val, splits.test))
    log.info(f"[{stage.name}] {stage.model} trained at {last['image_size']}px: fine-tune at {stage.test_size}px for "
             f"{stage.epochs:g} epochs on {len(labeled)} un-augmented labeled images, lr {stage.lr:g}")
    with _History(out, env, stage.name) as history:
        outcome = finetune_fixres(model, labeled, val, _stage_train_config(cfg, stage), num_classes=splits.num_classes,
                                  epochs=stage.epochs, lr=stage.lr, ctx=env.ctx, test=test,
                                  frozen_blocks=stage.frozen_blocks, batch_size=stage.batch_size, seed=stage.seed,
                                  num_workers=env.num_workers, progress=env.progress, desc=stage.name,
                                  on_epoch=history.add, checkpoint_dir=env.run.checkpoint_dir(stage.name))
        history.write_all(outcome.history)
    metrics = {"name": stage.name, "model": stage.model, **outcome.metrics(),
               "val_top1": outcome.after["val_top1"], "val_top5": outcome.after["val_top5"],
               "test_top1": outcome.after["test_top1"], "test_top5": outcome.after["test_top5"],
               "num_labeled": len(labeled), "num_pseudo": 0, "params": count_parameters(model),
               "best_epoch": None, "epochs": outcome.epochs, "steps": outcome.steps,
               "image_size": stage.test_size, "train_size": last["image_size"], "test_size": stage.test_size,
               "frozen": outcome.frozen, "seed": stage.seed}
    _save(out, model, stage, env, stage.test_size, metrics, data_cfg, train_size=last["image_size"])
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


# ------------------------------------------------------------------------------ the loop


def run_pipeline(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
                 only: str | None = None) -> dict:
    """Run (or resume) the whole Noisy Student loop; returns the summary written to summary.json.

    ``only`` (one of :data:`STAGE_KINDS`) runs just the next unfinished stage, which must be of
    that kind: the per-stage commands (``noisystudent train | label | select``), so each stage can
    have its own job and allocation. Returns ``{"ran": stage}`` then.
    """
    configure_cpu()  # the CPU thread choice (a no-op after the CLI's, or once torch is loaded)
    if only is not None and only not in STAGE_KINDS:
        raise ConfigError(f"unknown stage kind {only!r}; one of {', '.join(STAGE_KINDS)}")
    stages = resolve_stages(cfg)
    ctx = init_distributed(cfg.device)
    run = None
    try:
        runner = StageRunner.open(run_dir, cfg, resume, ctx)
        run = runner.run
        handler = _attach_log_file(run.root / layout.LOG) if ctx.is_main else None
        try:
            return _loop(cfg, stages, run, runner, ctx, progress, only)
        finally:
            if handler:
                log.removeHandler(handler)
                handler.close()
    finally:
        if run is not None and ctx.is_main:
            run.release_lock()
        cleanup(ctx)


class _Stop(Exception):
    """The per-stage command's stage is done."""


def _loop(cfg: Config, stages: list[ResolvedStage], run: RunDir, runner: StageRunner, ctx: DistContext,
          progress: bool, only: str | None) -> dict:
    start = time.time()
    banner(f"Data: {cfg.data.source}")
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=len(stages) > 1 and stages[1].role == "student")
    # every stage's `pretrained` file, checked before anything trains
    check_pretrained_files(stages, num_classes=splits.num_classes, channels=splits.channels, classes=splits.classes)
    env = Env(ctx=ctx, run=run, cfg=cfg, splits=splits, progress=progress)
    students = [s for s in stages if s.role == "student"]
    pool = build_pool(cfg.data, splits.unlabeled, cfg.pseudo.shard_size) if students else None
    if pool is not None:
        pool.prepare(run.root / layout.POOL, ctx)  # a folder is walked once per run, on rank 0
    data = splits.describe() | {"num_unlabeled": None if pool is None else pool_size(pool)}
    if not run.is_done(layout.label_stage(1)):
        runner.write_json(run.root / layout.DATA, data)
    log.info(f"{len(splits.labeled)} labeled, {data['num_unlabeled'] if pool else 0} unlabeled "
             f"{'(' + pool.kind + ')' if pool else ''}, {len(splits.val)} val, {len(splits.test)} test images; "
             f"{splits.num_classes} classes; device {ctx.device}, {ctx.world_size} process(es)")

    ran: list[str] = []

    def step(name: str, kind: str, work, load, **how):
        """One stage through the runner; with ``only``, the first unfinished stage ends the run."""
        if only is not None and not runner.done(name):
            if ran:
                raise _Stop()
            if kind != only:
                command = f"run --resume {run.root}" if kind == "finish" else f"{kind} {run.root}"
                raise ConfigError(f"the next unfinished stage of {run.root} is {name} ('{kind}'): "
                                  f"run `noisystudent {command}`")
            ran.append(name)
        return runner.stage(name, work, load, **how)

    read_metrics = lambda d: json.loads((d / layout.METRICS).read_text())  # noqa: E731
    try:
        banner(f"Teacher: {stages[0].model} on labeled images")
        teacher = step(stages[0].name, "train", lambda out: train_stage(out, stages[0], env), read_metrics)
        results = [teacher]
        for i, st in enumerate(students, start=1):
            banner(f"Iteration {i}: {teacher['model']} teaches {st.model}")
            label_name = layout.label_stage(i)
            store = step(label_name, "label", lambda out: label_stage(out, label_name, teacher, pool, st.labeling, env),
                         lambda d: LabelStore.open(d, require_complete=True), in_place=True)
            if i == 1:  # readable and unreadable counts are known now
                runner.write_json(run.root / layout.DATA, data | {"num_unlabeled": store.num_rows,
                                                                   "num_unlabeled_unreadable": store.manifest.num_bad})
            select_name = layout.select_stage(i)
            selection = step(select_name, "select", lambda out: select_stage(out, select_name, store, st.labeling, cfg, splits),
                             lambda d: Selection.open(d / layout.SELECTION), every_rank=False)
            _check_selection(selection, store)
            pseudo = lambda noisy: pseudo_labeled_set(selection, pool, noisy)  # noqa: E731
            student = step(st.name, "train", lambda out: train_stage(out, st, env, pseudo), read_metrics)
            if student["params"] < teacher["params"]:
                log.warning(f"[{st.name}] is smaller than its teacher; the paper uses equal-or-larger students")
            results.append(student)
            teacher = student
        fixres = next((s for s in stages if s.role == "fixres"), None)
        if fixres is not None:
            banner(f"Fix-res: {fixres.model} at {fixres.test_size}px")
            last = results[-1]
            results.append(step(fixres.name, "train", lambda out: fixres_stage(out, fixres, last, env), read_metrics))
        banner(f"Evaluate: {', '.join(cfg.evaluate.suites)}")
        ends = [results[0], results[-1]]
        robustness = step(layout.EVALUATE, "finish", lambda out: evaluate_stage(out, ends, env),
                          lambda d: json.loads((d / layout.ROBUSTNESS).read_text()), every_rank=False)
    except _Stop:
        return {"ran": ran}
    if only is not None:
        return {"ran": ran}

    summary = {"run_dir": str(run.root), "config_fingerprint": cfg.fingerprint(), "seconds": time.time() - start,
               "stages": results, "result": results[-1]["name"], "robustness": _headlines_of(robustness),
               "pool": None if pool is None else {"kind": pool.kind, "listed": data["num_unlabeled"]}}
    runner.write_json(run.root / layout.SUMMARY, summary)
    if ctx.is_main:
        log.info("\n" + format_summary_table(summary))
        _write_report(run.root, pool)
    return summary


# ------------------------------------------------------------------------------ helpers


def _check_selection(selection: Selection, store: LabelStore) -> None:
    if selection.store.get("teacher") != store.header.teacher or selection.store.get("num_rows") != store.num_rows:
        raise DataError(f"selection {selection.path} was made from another pseudo-label store than "
                        f"{store.store_dir} (teacher {selection.store.get('teacher')}); select again")


def _stage_train_config(cfg: Config, stage: ResolvedStage):
    """The run's ``train`` section with this stage's batch size and unlabeled ratio."""
    return dataclasses.replace(cfg.train, batch_size=stage.batch_size, unlabeled_ratio=stage.unlabeled_ratio)


def _measure(model, test_size: int, env: Env, data_cfg: dict | None = None) -> dict:
    """Val and test top-1/top-5 at the stage's test resolution (the reported numbers)."""
    val = evaluate_classifier(model, env.clean(env.splits.val, test_size, data_cfg), env.ctx.device, ctx=env.ctx,
                              num_workers=env.num_workers)
    test = evaluate_classifier(model, env.clean(env.splits.test, test_size, data_cfg), env.ctx.device, ctx=env.ctx,
                               num_workers=env.num_workers)
    return {"val_top1": val["top1"], "val_top5": val["top5"], "test_top1": test["top1"], "test_top5": test["top5"]}


def _save(out: Path, model, stage: ResolvedStage, env: Env, image_size: int, metrics: dict, data_cfg: dict,
          **extra) -> None:
    s = env.splits
    save_model(out / layout.MODEL, model, name=stage.model, num_classes=s.num_classes, in_chans=s.channels,
               classes=s.classes, image_size=image_size, mean=data_cfg["mean"], std=data_cfg["std"],
               data_config=data_cfg, test_size=stage.test_size, **extra)
    write_json_atomic(out / layout.METRICS, metrics)


class _History:
    """Per-epoch records streamed to ``metrics.jsonl`` (and TensorBoard when configured)."""

    def __init__(self, out: Path, env: Env, name: str):
        self.out, self.env, self.name = out, env, name
        self.file, self.board = None, None

    def __enter__(self) -> "_History":
        self.file = (self.out / layout.HISTORY).open("w")
        if self.env.cfg.tensorboard and self.env.ctx.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("tensorboard: true needs the tensorboard package "
                                  "(pip install 'noisystudent[tensorboard]')") from None
            self.board = SummaryWriter(str(self.env.run.root / layout.TENSORBOARD))
        return self

    def add(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.board:
            for key in ("loss", "val_top1", "val_top5", "lr"):
                self.board.add_scalar(f"{self.name}/{key}", record[key], record["step"])
            self.board.flush()

    def write_all(self, history: list[dict]) -> None:
        """A resumed stage streamed only its last epochs; write the whole history."""
        self.file.close()
        (self.out / layout.HISTORY).write_text("".join(json.dumps(r) + "\n" for r in history))

    def __exit__(self, *exc) -> None:
        if not self.file.closed:
            self.file.close()
        if self.board:
            self.board.close()


def _headlines_of(results: dict) -> dict:
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


def open_pool(run_dir: Path) -> UnlabeledSource | None:
    """The unlabeled pool of a run, as its label stages read it (for the report's thumbnails)."""
    from .config.schema import load_config

    cfg = load_config(Path(run_dir) / layout.CONFIG)
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=False)
    pool = build_pool(cfg.data, splits.unlabeled, cfg.pseudo.shard_size)
    if pool is not None:
        pool.prepare(Path(run_dir) / layout.POOL)
    return pool


def _write_report(run_dir: Path, pool: UnlabeledSource | None = None) -> None:
    """The HTML + Markdown report; a failure is logged, never fails a finished run."""
    from .report.build import build_report

    try:
        log.info(f"report: {build_report(run_dir, pool=pool)['html']}")
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
