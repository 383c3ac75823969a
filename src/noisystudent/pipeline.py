"""The Noisy Student loop, top to bottom.

    teacher  = train(labeled, noise)                          # stage "teacher"
    members  = train(labeled, noise), other seeds             # "teacher-2"... (pseudo.ensemble_size)
    baseline = train(labeled, noise), final architecture      # stage "baseline" (unless it is the teacher's)
    for each student in the chain:
        store     = teacher(pool, no noise)                   # stage "label-i": a sharded store
                                                              # (i = 1: averaged with the members)
        selection = threshold + balance(store)                # stage "select-i": out of core
        student   = train(labeled + selection, noise)         # stage "student-i"
        teacher   = student
    fixres   = fine-tune(last, test resolution, no noise)     # stage "fixres", when it runs
    final    = best on validation; gain = best student - baseline
    evaluate(teacher, baseline, best student, final)          # stage "evaluate"

Each stage is a plain function of its inputs and an output folder (:mod:`noisystudent.steps`); the
:class:`~noisystudent.runtime.runner.StageRunner` skips finished stages, commits each one and
does the ranks' bookkeeping. Every stage's settings come from :func:`resolve_stages` (one place).
The pool is never held in memory: it is labeled shard by shard into a store, selected by a query
over the store, and read back by position or as a stream (noisystudent.label.pseudo_labeled).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Generator

from .config.schema import Config
from .config.stages import ResolvedLabeling, ResolvedStage, baseline_of, resolve_stages
from .data.splits import DataSplits, build_splits
from .data.pool import UnlabeledSource, build_pool, pool_size
from .label.select import Selection
from .label.store import LabelStore
from .label.pseudo_labeled import pseudo_labeled_set
from .models.preflight import check_pretrained_files
from .outcome import (TrainedModel, choose_final, format_summary_table, noisy_student_gain,
                      noisy_student_model)
from .runtime import rundir as layout
from .runtime.cpu import configure as configure_cpu
from .runtime.distributed import DistContext, cleanup, init_distributed
from .runtime.errors import ConfigError
from .runtime.phases import PhaseClock, format_phases
from .runtime.rundir import RunDir
from .runtime.runner import StageRunner
from .tracking import Tracking
from .steps import (Env, check_selection, evaluate_stage, fixres_stage, label_stage, select_stage,
                    train_stage)

log = logging.getLogger("noisystudent")

STAGE_KINDS = ("train", "label", "select")  # what each per-stage CLI command runs


def banner(text: str) -> None:
    log.info("=" * 8 + f" {text} " + "=" * max(0, 70 - len(text)))


# ------------------------------------------------------------------------------ the stages


# ------------------------------------------------------------------------------ the loop


def run_pipeline(cfg: Config, run_dir: Path, *, resume: bool = False, progress: bool = True,
                 only: str | None = None, process_started: float | None = None) -> dict:
    """Run (or resume) the whole Noisy Student loop; returns the summary written to summary.json.

    ``process_started``: when the process began (the CLI's, for the start-up phase of the
    summary's ``phases``; None: the phases start with this call).

    ``only`` (one of :data:`STAGE_KINDS`) runs just the next unfinished stage, which must be of
    that kind: the per-stage commands (``noisystudent train | label | select``), so each stage can
    have its own job and allocation. Returns ``{"ran": stage}`` then.
    """
    configure_cpu()  # the CPU thread choice (a no-op after the CLI's, or once torch is loaded)
    phases = PhaseClock(process_started)
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
            with Tracking.open(cfg, run.root, ctx) as tracking:
                return _loop(cfg, stages, run, runner, ctx, progress, only, tracking, phases)
        finally:
            if handler:
                log.removeHandler(handler)
                handler.close()
    finally:
        if run is not None and ctx.is_main:
            run.release_lock()
        cleanup(ctx)


@dataclass
class StageSpec:
    """One stage of the plan: its name, its kind (what the per-stage commands run: train, label,
    select; ``finish`` for the evaluation), the work that makes it and the loader of a finished one."""

    name: str
    kind: str
    work: Callable[[Path], Any]
    load: Callable[[Path], Any]
    every_rank: bool = True
    in_place: bool = False


@dataclass
class ChainOutcome:
    """What the plan produced: the chain's models in order, the baseline, the evaluation."""

    chain: list[TrainedModel]
    baseline: TrainedModel | None
    robustness: dict
    skipped: list[str]
    members: list[TrainedModel] = dataclasses.field(default_factory=list)  # pseudo.ensemble_size's further teachers


def _read_trained(stage_dir: Path) -> TrainedModel:
    return TrainedModel.from_metrics(json.loads((stage_dir / layout.METRICS).read_text()))


def _plan(stages: list[ResolvedStage], pool: UnlabeledSource | None, env: Env,
          on_first_store: Callable[[LabelStore], None]) -> Generator[StageSpec, Any, ChainOutcome]:
    """The Noisy Student loop as a plan: yields each stage's spec and receives its result (made or
    loaded by the runner), so the loop below reads as the algorithm, top to bottom."""
    cfg = env.cfg
    teacher_stage, students = stages[0], [s for s in stages if s.role == "student"]
    banner(f"Teacher: {teacher_stage.model} on labeled images")
    teacher = yield _train_spec(teacher_stage, env)
    members = []
    for member in (s for s in stages if s.role == "member"):  # pseudo.ensemble_size: more teachers, other seeds
        banner(f"Teacher {member.name}: {member.model} on labeled images (seed {member.seed})")
        members.append((yield _train_spec(member, env)))
    baseline = None
    own_baseline = next((s for s in stages if s.role == "baseline"), None)
    if own_baseline is not None:
        banner(f"Baseline: {own_baseline.model} on labeled images alone (the Noisy Student gain's yardstick)")
        baseline = yield _train_spec(own_baseline, env)
    elif baseline_of(stages) is not None:
        baseline = teacher  # the final architecture is the teacher's: nothing extra trains
    chain, skipped = [teacher], []
    for i, st in enumerate(students, start=1):
        banner(f"Iteration {i}: {teacher.model} teaches {st.model}")
        store = yield _label_spec(i, teacher, pool, st.labeling, env)
        if i == 1:
            on_first_store(store)
        selection = yield _select_spec(i, store, st.labeling, cfg, env.splits, env.tracking)
        check_selection(selection, store)
        pseudo = functools.partial(pseudo_labeled_set, selection, pool)
        student = yield _train_spec(st, env, pseudo, warm_from=_warm_start(cfg, st, teacher))
        if student.params < teacher.params:
            log.warning(f"[{st.name}] is smaller than its teacher; the paper uses equal-or-larger students")
        chain.append(student)
        if cfg.stop_iterating and i < len(students) and student.val_top1 <= teacher.val_top1:
            skipped = [f"{s.name} ({s.model}): stop_iterating, {st.name} val top-1 {student.val_top1:.2f} is not "
                       f"above its teacher's {teacher.val_top1:.2f}" for s in students[i:]]
            log.info(f"[{st.name}] no gain on validation over {teacher.name}: the chain stops here (stop_iterating)")
            break
        teacher = student
    fixres = next((s for s in stages if s.role == "fixres"), None)
    if fixres is not None and skipped:
        skipped.append(f"{fixres.name}: it fine-tunes the configured last student, which did not train")
    elif fixres is not None:
        banner(f"Fix-res: {fixres.model} at {fixres.test_size}px")
        last = chain[-1]
        made = lambda out: TrainedModel.from_metrics(fixres_stage(out, fixres, last.metrics, env))  # noqa: E731
        chain.append((yield StageSpec(fixres.name, "train", made, _read_trained)))
    banner(f"Evaluate: {', '.join(cfg.evaluate.suites)}")
    final, _ = choose_final(chain, baseline, cfg.final_model)
    ends = _evaluated_models(chain, baseline, final)
    robustness = yield StageSpec(layout.EVALUATE, "finish", lambda out: evaluate_stage(out, ends, env),
                                 lambda d: json.loads((d / layout.ROBUSTNESS).read_text()), every_rank=False)
    return ChainOutcome(chain, baseline, robustness, skipped, members)


def _train_spec(stage: ResolvedStage, env: Env, pseudo=None, warm_from: str | None = None) -> StageSpec:
    made = lambda out: TrainedModel.from_metrics(train_stage(out, stage, env, pseudo, warm_from))  # noqa: E731
    return StageSpec(stage.name, "train", made, _read_trained)


def _warm_start(cfg: Config, student: ResolvedStage, teacher: TrainedModel) -> str | None:
    """``train.warm_start``: the teacher's stage name when the student has its architecture and
    training size (its weights fit as they are), else None (from scratch)."""
    if not cfg.train.warm_start:
        return None
    if (student.model, student.image_size) != (teacher.model, teacher.image_size):
        log.info(f"[{student.name}] {student.model} at {student.image_size}px starts from scratch: train.warm_start "
                 f"needs its teacher's architecture and size ({teacher.model} at {teacher.image_size}px)")
        return None
    return teacher.name


def _label_spec(i: int, teacher: TrainedModel, pool, labeling: ResolvedLabeling, env: Env) -> StageSpec:
    name = layout.label_stage(i)
    return StageSpec(name, "label", lambda out: label_stage(out, name, teacher.metrics, pool, labeling, env),
                     lambda d: LabelStore.open(d, require_complete=True), in_place=True)


def _select_spec(i: int, store: LabelStore, labeling: ResolvedLabeling, cfg: Config,
                 splits: DataSplits | None = None, tracking: Tracking | None = None) -> StageSpec:
    name = layout.select_stage(i)
    return StageSpec(name, "select", lambda out: select_stage(out, name, store, labeling, cfg, splits, tracking),
                     lambda d: Selection.open(d / layout.SELECTION), every_rank=False)


def _evaluated_models(chain: list[TrainedModel], baseline: TrainedModel | None, final: TrainedModel) -> list[dict]:
    """The models the robustness suites compare: the first teacher, the baseline (the paper's
    comparison), the Noisy Student model and the final model, each once."""
    models = [chain[0], baseline, noisy_student_model(chain), final]
    seen, ends = set(), []
    for m in models:
        if m is not None and m.name not in seen:
            seen.add(m.name)
            ends.append(m.metrics)
    return ends


def _execute(plan: Generator[StageSpec, Any, ChainOutcome], runner: StageRunner,
             only: str | None, phases: PhaseClock | None = None) -> tuple[ChainOutcome | None, list[str]]:
    """Run the plan's stages through the runner (finished ones are loaded). ``only``: the
    per-stage commands, a filter over the plan: run just the first unfinished stage, which must be
    of that kind. Returns the outcome (None when the filter stopped the plan) and what ran."""
    ran: list[str] = []
    try:
        spec = next(plan)
        while True:
            if only is not None and not runner.done(spec.name):
                if ran:
                    plan.close()
                    return None, ran
                if spec.kind != only:
                    command = f"run --resume {runner.run.root}" if spec.kind == "finish" else \
                        f"{spec.kind} {runner.run.root}"
                    raise ConfigError(f"the next unfinished stage of {runner.run.root} is {spec.name} "
                                      f"('{spec.kind}'): run `noisystudent {command}`")
                ran.append(spec.name)
            with (phases or PhaseClock()).stage(spec.name, spec.kind):
                result = runner.stage(spec.name, spec.work, spec.load, every_rank=spec.every_rank,
                                      in_place=spec.in_place)
            spec = plan.send(result)
    except StopIteration as stop:
        return (None if only is not None else stop.value), ran


def _loop(cfg: Config, stages: list[ResolvedStage], run: RunDir, runner: StageRunner, ctx: DistContext,
          progress: bool, only: str | None, tracking: Tracking | None = None,
          phases: PhaseClock | None = None) -> dict:
    start = time.time()
    phases = phases or PhaseClock(start)
    phases.add("startup", start - phases.started)  # interpreter, imports, config, run folder
    scan_started = time.time()
    banner(f"Data: {cfg.data.source}")
    students = [s for s in stages if s.role == "student"]
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=bool(students), log_splits=True)
    # every stage's `pretrained` file and the first labeling's ensemble files, checked before anything trains
    check_pretrained_files(stages, num_classes=splits.num_classes, channels=splits.channels, classes=splits.classes)
    env = Env(ctx=ctx, run=run, cfg=cfg, splits=splits, progress=progress, tracking=tracking or Tracking(),
              phases=phases)
    pool = build_pool(cfg.data, splits.unlabeled, cfg.pseudo.shard_size) if students else None
    if pool is not None:
        pool.prepare(run.root / layout.POOL, ctx)  # a folder is walked once per run, on rank 0
    data = splits.describe() | {"num_unlabeled": None if pool is None else pool_size(pool)}
    if not run.is_done(layout.label_stage(1)):
        runner.write_json(run.root / layout.DATA, data)
    log.info(f"{len(splits.labeled)} labeled, {data['num_unlabeled'] if pool else 0} unlabeled "
             f"{'(' + pool.kind + ')' if pool else ''}, {len(splits.val)} val, {len(splits.test)} test images; "
             f"{splits.num_classes} classes; device {ctx.device}, {ctx.world_size} process(es)")
    phases.add("data_scan", time.time() - scan_started)

    def on_first_store(store: LabelStore) -> None:  # readable and unreadable counts are known now
        runner.write_json(run.root / layout.DATA, data | {"num_unlabeled": store.num_rows,
                                                           "num_unlabeled_unreadable": store.manifest.num_bad})

    outcome, ran = _execute(_plan(stages, pool, env, on_first_store), runner, only, phases)
    if outcome is None:
        return {"ran": ran}
    summary = _summary(cfg, run, outcome, pool, data, time.time() - start)
    timed = phases.as_dict()
    runner.write_json(run.root / layout.SUMMARY, summary | {"phases": timed})
    report_started = time.time()
    if ctx.is_main:
        log.info("\n" + format_summary_table(summary))
        _write_report(run.root, pool)
    # again, with the report's time added (the report itself shows the phases without it)
    report_seconds = time.time() - report_started
    summary["phases"] = timed | {"report": report_seconds, "total": timed["total"] + report_seconds}
    runner.write_json(run.root / layout.SUMMARY, summary)
    log.info(f"time: {format_phases(summary['phases'])}")
    env.tracking.log_run(summary, run.root / layout.REPORT)
    return summary


def _summary(cfg: Config, run: RunDir, outcome: ChainOutcome, pool, data: dict, seconds: float) -> dict:
    """summary.json: every stage's metrics, the final model and why, the Noisy Student gain."""
    chain, baseline = outcome.chain, outcome.baseline
    final, reason = choose_final(chain, baseline, cfg.final_model)
    own_baseline = [baseline.metrics] if baseline is not None and baseline.name == layout.BASELINE else []
    rows = [chain[0].metrics] + [m.metrics for m in outcome.members] + own_baseline + [m.metrics for m in chain[1:]]
    gain = noisy_student_gain(chain, baseline)  # shown once, in the summary table (with the baseline's note)
    return {"run_dir": str(run.root), "config_fingerprint": cfg.fingerprint(), "seconds": seconds,
            "stages": rows, "result": final.name,
            "final": {"stage": final.name, "model": final.model, "rule": cfg.final_model, "reason": reason,
                      "chain_last": chain[-1].name},
            "baseline": None if baseline is None else baseline.name, "ns_gain": gain, "skipped": outcome.skipped,
            "robustness": _headlines_of(outcome.robustness),
            "pool": None if pool is None else {"kind": pool.kind, "listed": data["num_unlabeled"]}}


# ------------------------------------------------------------------------------ helpers


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
    """The unlabeled pool of a run, as its label stages read it (for the report's thumbnails);
    None for a folder without the run's config.yaml (no run: the report then says what it is)."""
    from .config.schema import load_config

    if not (Path(run_dir) / layout.CONFIG).is_file():
        return None
    cfg = load_config(Path(run_dir) / layout.CONFIG)
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=False, log_splits=False)
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


def _attach_log_file(path: Path) -> logging.Handler:
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler
