"""Experiment tracking: TensorBoard, MLflow and Weights & Biases beside ``metrics.jsonl``.

The config key ``tracking`` lists the backends (``tensorboard: true`` adds tensorboard); the
``tracker`` section holds their settings. What every backend receives, on rank 0 only:

* the resolved config as parameters (MLflow: flattened dotted keys, ``students.0.model``;
  W&B: its nested config; TensorBoard: a text panel),
* per training step (every ``tracker.step_every``): ``<stage>/loss``, ``<stage>/lr``,
  ``<stage>/img_s``, ``<stage>/epoch``; per evaluation: ``<stage>/val_top1``, ``<stage>/val_top5``,
  all on the stage's own step axis,
* per stage: the numbers of its ``metrics.json`` as ``<stage>/summary/<key>``,
* per iteration: ``label-i/...`` (images labeled, unreadable, mean confidence, the pseudo labels'
  accuracy and confidence on the labeled validation split) and ``select-i/...`` (kept above the
  threshold, selected, unique, K, dropped as copies of held-out images),
* at the end: ``run/...`` (the Noisy Student gain, the final model's test top-1) and the report
  folder as an artifact (MLflow, W&B; TensorBoard keeps no files).

Each backend is a small class behind the :class:`Tracker` protocol, imported only when listed
(each an optional extra: ``pip install 'noisystudent[mlflow]'``). The backends' run ids are kept in
``<run>/tracking.json``, so a resumed run and the per-stage commands log to the same MLflow / W&B
run. A backend that fails mid-run is dropped with a warning: tracking never fails a training run.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from .config.schema import Config, TrackerConfig
from .config.values import normalised_dict
from .label.select import Selection
from .label.store import LabelStore
from .runtime import rundir as layout
from .runtime.distributed import DistContext
from .runtime.errors import ConfigError
from .runtime.rundir import write_json_atomic
from .train.trainer import Hooks

log = logging.getLogger("noisystudent")

# backend -> (the module it needs, the extra that installs it)
PACKAGES = {"tensorboard": ("tensorboard", "tensorboard"), "mlflow": ("mlflow", "mlflow"), "wandb": ("wandb", "wandb")}


class Tracker(Protocol):
    """One tracking backend. ``step`` None: one-off values (a summary), else a point of a curve;
    keys are ``<stage>/<name>``, each stage with its own step axis."""

    run_id: str | None  # kept in tracking.json to continue the same run on resume (None: nothing to keep)

    def log_params(self, config: dict) -> None: ...

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None: ...

    def log_artifact(self, path: Path) -> None: ...

    def close(self, failed: bool) -> None: ...


def wanted_backends(cfg: Config) -> list[str]:
    """The backends a config asks for, in order, each once (``tensorboard: true`` adds tensorboard)."""
    names = list(cfg.tracking) + (["tensorboard"] if cfg.tensorboard else [])
    return list(dict.fromkeys(names))


def require_packages(backends: list[str]) -> None:
    """One line naming the install command for the first backend whose package is missing."""
    for name in backends:
        module, extra = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"tracking: {name} needs the {module} package (pip install 'noisystudent[{extra}]')")


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts and lists of dicts as one level of dotted keys (``students.0.model``); lists of
    plain values stay values."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list) and any(isinstance(v, (dict, list)) for v in tree):
        items = enumerate(tree)
    else:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def numbers(values: dict, prefix: str) -> dict[str, float]:
    """The numeric values of a flat mapping (booleans as 0/1), keys under ``prefix/``."""
    kinds = (int, float, np.integer, np.floating)
    return {f"{prefix}/{k}": float(v) for k, v in values.items() if isinstance(v, kinds)}


# ------------------------------------------------------------------------------ the backends


class TensorBoardTracker:
    """Scalars and a config text panel in ``<run>/tensorboard`` (torch's SummaryWriter)."""

    run_id = None

    def __init__(self, log_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(log_dir))

    def log_params(self, config: dict) -> None:
        lines = (f"    {k}: {json.dumps(v)}" for k, v in flatten(config).items())  # indented: markdown code
        self.writer.add_text("config", "\n".join(lines), 0)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step or 0)
        self.writer.flush()

    def log_artifact(self, path: Path) -> None:
        """TensorBoard stores no files; the report stays in the run folder."""

    def close(self, failed: bool) -> None:
        self.writer.close()


class MLflowTracker:
    """One MLflow run per run directory, through ``MlflowClient`` (no global active run)."""

    PARAM_BATCH, METRIC_BATCH, MAX_PARAM = 100, 1000, 6000  # MLflow's per-request limits and value length

    def __init__(self, settings: TrackerConfig, run_name: str, run_dir: Path, run_id: str | None):
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=settings.mlflow_uri)  # None: MLFLOW_TRACKING_URI or MLflow's default
        self.resumed = False
        if run_id is not None:
            try:
                self.client.update_run(run_id, status="RUNNING")
                self.resumed = True
            except MlflowException:  # another store than the one that made it: start a new run
                run_id = None
        if run_id is None:
            name = settings.mlflow_experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "noisystudent"
            found = self.client.get_experiment_by_name(name)
            experiment = found.experiment_id if found is not None else self.client.create_experiment(name)
            run_id = self.client.create_run(experiment, run_name=run_name,
                                            tags={"noisystudent.run_dir": str(run_dir)}).info.run_id
        self.run_id = run_id

    def log_params(self, config: dict) -> None:
        if self.resumed:  # MLflow parameters are written once; a resumed run has the same config
            return
        from mlflow.entities import Param

        params = [Param(k, (v if isinstance(v, str) else json.dumps(v))[:self.MAX_PARAM])
                  for k, v in flatten(config).items()]
        for i in range(0, len(params), self.PARAM_BATCH):
            self.client.log_batch(self.run_id, params=params[i:i + self.PARAM_BATCH])

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step or 0) for k, v in values.items()]
        for i in range(0, len(metrics), self.METRIC_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + self.METRIC_BATCH])

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
        else:
            self.client.log_artifact(self.run_id, str(path))

    def close(self, failed: bool) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker:
    """One W&B run per run directory; its files in ``<run>/wandb`` unless ``WANDB_DIR`` is set."""

    def __init__(self, settings: TrackerConfig, run_name: str, run_dir: Path, run_id: str | None):
        import wandb

        self.wandb, self.run_name, self.axes = wandb, run_name, set()
        kwargs = {"project": settings.wandb_project or os.environ.get("WANDB_PROJECT") or "noisystudent",
                  "entity": settings.wandb_entity, "name": run_name, "mode": settings.wandb_mode,
                  "dir": None if os.environ.get("WANDB_DIR") else str(run_dir)}
        if run_id is not None:
            kwargs.update(id=run_id, resume="allow")
        self.run = wandb.init(**{k: v for k, v in kwargs.items() if v is not None})
        self.run_id = self.run.id

    def log_params(self, config: dict) -> None:
        self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int | None = None) -> None:
        if step is None:
            self.run.summary.update(values)
            return
        for stage in sorted({k.split("/")[0] for k in values}):
            if stage not in self.axes:  # each stage's curves on its own step axis, <stage>/step
                self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/step")
                self.axes.add(stage)
            self.run.log({**{k: v for k, v in values.items() if k.split("/")[0] == stage}, f"{stage}/step": step})

    def log_artifact(self, path: Path) -> None:
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.run_name}-{path.name}")  # W&B's artifact name rule
        artifact = self.wandb.Artifact(name, type=path.name)
        if path.is_dir():
            artifact.add_dir(str(path))
        else:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def close(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)


# ------------------------------------------------------------------------------ the run's trackers


class Tracking:
    """The trackers of one run (none on ranks other than 0, or when none is configured).

    Open with :meth:`open` as a context manager around the run; stages call :meth:`stage` (a
    :class:`StageHistory`), :meth:`log_stage`, :meth:`log_labeling`, :meth:`log_selection`, and the
    run ends with :meth:`log_run`. Each call costs nothing when no tracker is active.
    """

    def __init__(self, trackers: dict[str, Tracker] | None = None, step_every: int = 10):
        self.trackers = dict(trackers or {})
        self.step_every = step_every

    @classmethod
    def open(cls, cfg: Config, run_dir: Path, ctx: DistContext) -> "Tracking":
        """The backends ``cfg`` lists, started on rank 0 (continuing the runs ``tracking.json``
        names); the config goes to each as parameters. A missing package (checked on every rank) or a
        backend that cannot start is a :class:`ConfigError`, before anything trains."""
        backends = wanted_backends(cfg)
        require_packages(backends)
        if not backends or not ctx.is_main:
            return cls(step_every=cfg.tracker.step_every)
        ids = _read_ids(run_dir / layout.TRACKING)
        run_name = cfg.tracker.run_name or run_dir.resolve().name
        tracking = cls(step_every=cfg.tracker.step_every)
        try:
            for name in backends:
                tracking.trackers[name] = _start(name, cfg.tracker, run_name, run_dir, ids.get(name))
        except ConfigError:
            tracking.close(failed=True)
            raise
        kept = {name: t.run_id for name, t in tracking.trackers.items() if t.run_id is not None}
        if kept != ids:
            write_json_atomic(run_dir / layout.TRACKING, kept)
        tracking._each("log_params", normalised_dict(cfg))
        return tracking

    @property
    def active(self) -> bool:
        return bool(self.trackers)

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(failed=kind is not None)

    def close(self, failed: bool = False) -> None:
        self._each("close", failed)
        self.trackers.clear()

    def stage(self, out: Path, name: str) -> "StageHistory":
        """The history of the training stage ``name`` written into ``out`` (a context manager)."""
        return StageHistory(out, name, self)

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        """Values keyed ``<stage>/<name>`` to every tracker (``step`` None: one-off values)."""
        if values:
            self._each("log_metrics", values, step)

    def log_stage(self, name: str, metrics: dict) -> None:
        """A training stage's summary row (its metrics.json) as ``<name>/summary/<key>``."""
        self.log(numbers(metrics, f"{name}/summary"))

    def log_labeling(self, name: str, store: LabelStore, probe: pa.Table) -> None:
        """A label stage: images labeled and unreadable, the pool's mean top-1 confidence (one pass
        over the store's confidence column), and on the labeled validation split (``probe``:
        confidence, predicted, target) the pseudo labels' accuracy and mean confidence."""
        if not self.active:
            return
        total, n = 0.0, 0
        for batch in store.iter_batches(columns=["confidence"]):
            conf = batch.column(0).to_numpy(zero_copy_only=False)
            total, n = total + float(conf.sum(dtype=np.float64)), n + len(conf)
        stats = {"images_labeled": store.num_rows, "unreadable": store.manifest.num_bad,
                 "mean_confidence": total / n if n else math.nan, "bytes_per_image": store.manifest.bytes_per_image}
        if probe.num_rows:
            predicted, target = (probe.column(c).to_numpy() for c in ("predicted", "target"))
            stats["probe_accuracy"] = 100.0 * float(np.mean(predicted == target))
            stats["probe_mean_confidence"] = float(np.mean(probe.column("confidence").to_numpy()))
        self.log(numbers(stats, name))

    def log_selection(self, name: str, selection: Selection, pool_rows: int) -> None:
        """A select stage: kept above the threshold, selected (with copies), unique, K, below the
        threshold, dropped as copies of held-out images, of ``pool_rows`` labeled."""
        s = selection.summary()
        stats = {"labeled": pool_rows, "kept": sum(s["kept_per_class"]), "selected": s["num_selected"],
                 "unique": s["num_unique"], "below_threshold": s["num_below_threshold"],
                 "per_class_k": s["per_class"], "dedup_dropped": (s.get("dedup") or {}).get("dropped")}
        self.log(numbers(stats, name))

    def log_run(self, summary: dict, report_dir: Path | None) -> None:
        """The run's headline numbers as ``run/...`` and the report folder as an artifact."""
        gain = summary.get("ns_gain") or {}
        final = next((s for s in summary.get("stages", []) if s.get("name") == summary.get("result")), {})
        self.log(numbers({"ns_gain_test": gain.get("test"), "ns_gain_val": gain.get("val"),
                          "final_test_top1": final.get("test_top1"), "final_val_top1": final.get("val_top1"),
                          "seconds": summary.get("seconds")}, "run"))
        if report_dir is not None and report_dir.is_dir():
            self._each("log_artifact", report_dir)

    def _each(self, method: str, *args) -> None:
        """Call ``method`` on every tracker; one that fails is dropped with a warning."""
        for name, tracker in list(self.trackers.items()):
            try:
                getattr(tracker, method)(*args)
            except Exception as e:  # noqa: BLE001 - a tracking service down must not stop training
                log.warning(f"tracking: {name} failed ({type(e).__name__}: {e}); it logs nothing more in this run")
                self.trackers.pop(name, None)


def _read_ids(path: Path) -> dict:
    """The backends' run ids a run kept; a missing or damaged file: none (new tracking runs start)."""
    if not path.is_file():
        return {}
    try:
        ids = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.warning(f"tracking: {path} is unreadable ({type(e).__name__}: {e}); new tracking runs start")
        return {}
    return ids if isinstance(ids, dict) else {}


def _start(name: str, settings: TrackerConfig, run_name: str, run_dir: Path, run_id: str | None) -> Tracker:
    """Start one backend; what stops it from starting is one line."""
    try:
        if name == "tensorboard":
            return TensorBoardTracker(run_dir / layout.TENSORBOARD)
        if name == "mlflow":
            return MLflowTracker(settings, run_name, run_dir, run_id)
        return WandbTracker(settings, run_name, run_dir, run_id)
    except Exception as e:  # noqa: BLE001 - the service's own error, as one line
        first = (str(e).strip().splitlines() or [""])[0]
        raise ConfigError(f"tracking: {name} could not start a run ({type(e).__name__}: {first})") from None


class StageHistory:
    """One training stage's records: every evaluation to ``metrics.jsonl`` (the report reads it),
    and with trackers active every ``step_every`` steps' loss, lr and img/s and every evaluation's
    validation top-1/top-5 as ``<stage>/...`` on the stage's step axis."""

    def __init__(self, out: Path, name: str, tracking: Tracking):
        self.out, self.name, self.tracking = out, name, tracking
        self.file = None
        self.last_step: int | None = None  # the last step whose loss and lr the step records gave

    def __enter__(self) -> "StageHistory":
        self.file = (self.out / layout.HISTORY).open("w")
        return self

    def hooks(self) -> Hooks:
        """The trainer's callback (per-step records only when a tracker wants them: reading the
        loss then waits for the device)."""
        return Hooks(on_epoch=self.add, on_step=self.add_step if self.tracking.active else None)

    def add(self, record: dict) -> None:
        """An evaluation record: a line of metrics.jsonl, and validation top-1/top-5 to the trackers."""
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        keys = ["val_top1", "val_top5"] + (["loss", "lr", "epoch"] if record["step"] != self.last_step else [])
        self.tracking.log(numbers({k: record[k] for k in keys if k in record}, self.name), record["step"])

    def add_step(self, record: dict) -> None:
        """A training-step record: loss, lr, img/s and epoch to the trackers."""
        self.last_step = record["step"]
        self.tracking.log(numbers({k: record[k] for k in ("loss", "lr", "img_s", "epoch") if k in record},
                                  self.name), record["step"])

    def write_all(self, history: list[dict]) -> None:
        """A resumed stage streamed only its last epochs; write the whole history."""
        self.file.close()
        (self.out / layout.HISTORY).write_text("".join(json.dumps(r) + "\n" for r in history))

    def __exit__(self, *exc) -> None:
        if not self.file.closed:
            self.file.close()
