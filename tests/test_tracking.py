"""Experiment tracking (noisystudent.tracking): a real tiny run logged to MLflow (a local SQLite
store), Weights & Biases (offline mode) and TensorBoard at once, each read back with the backend's
own reader and compared with what the run wrote to its folder; the config keys, the missing-package
error and a backend failing mid-run."""

from __future__ import annotations

import json
import logging
import struct
import sys
from pathlib import Path

import pytest

from _tiny import cli_sets, tiny
from noisystudent.cli import main
from noisystudent.config.schema import load_config
from noisystudent.pipeline import run_pipeline
from noisystudent.runtime import rundir as layout
from noisystudent.runtime.errors import ConfigError
from noisystudent.tracking import Tracking, flatten, require_packages, wanted_backends

STEP_EVERY = 2


def _wandb_offline(monkeypatch, home: Path) -> None:
    """W&B offline, silent, and every folder of its own (settings, cache, artifact staging) in ``home``;
    WANDB_DIR unset, so the run's files go to <run>/wandb."""
    for var, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": home / "config",
                       "WANDB_CACHE_DIR": home / "cache", "WANDB_DATA_DIR": home / "data",
                       "WANDB_ARTIFACT_DIR": home / "artifacts"}.items():
        monkeypatch.setenv(var, str(value))
    for var in ("WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY", "WANDB_API_KEY", "MLFLOW_TRACKING_URI",
                "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)


def wandb_records(path: Path):
    """The records of a W&B transaction log (``run-<id>.wandb``), as W&B's protobuf messages.

    The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
    blocks of chunks, each with a 7-byte header (CRC, length, type: full, first, middle, last).
    This wandb version ships no Python reader of it (its Go core writes it), hence these lines."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            yield record
            parts = b""


def _items(items) -> dict:
    return {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in items}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_a_run_logs_to_mlflow_wandb_and_tensorboard_and_resumes_into_the_same_runs(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root is ./mlruns
    _wandb_offline(monkeypatch, tmp_path / "wandb-home")
    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny("students=[{model: ns_cnn_s}]", "tracking=[mlflow, wandb]", "tensorboard=true",
                     f"tracker.mlflow_uri={db}", "tracker.mlflow_experiment=tiny", "tracker.wandb_mode=offline",
                     f"tracker.step_every={STEP_EVERY}", "tracker.run_name=tiny-run")
    run = tmp_path / "run"
    cfg = load_config(None, overrides)
    # the teacher alone (the per-stage command `noisystudent train`), then the rest by resuming
    assert run_pipeline(cfg, run, progress=False, only="train") == {"ran": ["teacher"]}
    first_ids = json.loads((run / layout.TRACKING).read_text())
    run_pipeline(cfg, run, resume=True, progress=False)
    ids = json.loads((run / layout.TRACKING).read_text())
    assert ids == first_ids and set(ids) == {"mlflow", "wandb"}

    history = {s: _jsonl(run / s / layout.HISTORY) for s in ("teacher", "student-1")}
    for records in history.values():  # metrics.jsonl as before: one record per evaluation
        assert records and all({"epoch", "step", "loss", "val_top1", "val_top5", "lr", "seconds"} <= set(r)
                               for r in records)
    metrics = {s: json.loads((run / s / layout.METRICS).read_text()) for s in history}
    selection = json.loads((run / "select-1" / layout.SELECTION_SUMMARY).read_text())
    summary = json.loads((run / layout.SUMMARY).read_text())
    final = next(s for s in summary["stages"] if s["name"] == summary["result"])

    # --- MLflow: one run, read back from the SQLite store
    client = MlflowClient(tracking_uri=db)
    experiment = client.get_experiment_by_name("tiny")
    (found,) = client.search_runs([experiment.experiment_id])
    run_id = found.info.run_id
    assert run_id == ids["mlflow"] and found.info.status == "FINISHED" and found.info.run_name == "tiny-run"
    params = found.data.params
    assert params["data.source"] == "digits" and params["students.0.model"] == "ns_cnn_s"
    assert params["tracker.step_every"] == str(STEP_EVERY) and json.loads(params["tracking"]) == ["mlflow", "wandb"]
    assert params["teacher.epochs"] == "3.0"

    def curve(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))

    for stage, records in history.items():
        assert curve(f"{stage}/val_top1") == [(r["step"], pytest.approx(r["val_top1"])) for r in records]
        assert curve(f"{stage}/val_top5") == [(r["step"], pytest.approx(r["val_top5"])) for r in records]
        losses = curve(f"{stage}/loss")
        steps_logged = [s for s, _ in curve(f"{stage}/img_s")]
        assert steps_logged and all(s % STEP_EVERY == 0 for s in steps_logged)
        assert all(v > 0 for _, v in curve(f"{stage}/img_s")) and len(curve(f"{stage}/lr")) == len(losses)
        # every evaluation's step has a loss point (from the step records or, between them, the evaluation's)
        assert {r["step"] for r in records} <= {s for s, _ in losses}
        for key in ("test_top1", "val_top1", "num_labeled", "steps", "params"):
            assert found.data.metrics[f"{stage}/summary/{key}"] == pytest.approx(metrics[stage][key])
    got = found.data.metrics
    assert got["label-1/images_labeled"] == 200 and got["label-1/unreadable"] == 0
    assert 0 < got["label-1/mean_confidence"] <= 1 and 0 <= got["label-1/probe_accuracy"] <= 100
    assert got["select-1/selected"] == selection["num_selected"] == metrics["student-1"]["num_pseudo"]
    assert got["select-1/kept"] == sum(selection["kept_per_class"]) and got["select-1/labeled"] == 200
    assert got["select-1/unique"] == selection["num_unique"]
    assert got["run/final_test_top1"] == pytest.approx(final["test_top1"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "report")}
    assert {"report/report.html", "report/report.md"} <= artifacts

    # --- W&B: the offline runs' transaction logs under <run>/wandb, one per process, one run id
    logs = sorted((run / layout.WANDB).glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{ids['wandb']}.wandb"] * 2
    records = [r for p in logs for r in wandb_records(p)]
    kinds = [r.WhichOneof("record_type") for r in records]
    runs = [r.run for r in records if r.HasField("run")]
    assert {r.run_id for r in runs} == {ids["wandb"]} and {r.display_name for r in runs} == {"tiny-run"}
    config = {}
    for r in records:
        if r.HasField("config"):
            config.update(_items(r.config.update))
    assert config["data"]["source"] == "digits" and config["tracking"] == ["mlflow", "wandb"]
    rows = [_items(r.history.item) for r in records if r.HasField("history")]
    for stage, recs in history.items():
        vals = sorted((row[f"{stage}/step"], row[f"{stage}/val_top1"]) for row in rows if f"{stage}/val_top1" in row)
        assert vals == [(r["step"], pytest.approx(r["val_top1"])) for r in recs]
        assert any(f"{stage}/img_s" in row for row in rows)
    wsummary = {}
    for r in records:
        if r.HasField("summary"):
            wsummary.update(_items(r.summary.update))
    assert wsummary["select-1/selected"] == selection["num_selected"]
    assert wsummary["teacher/summary/test_top1"] == pytest.approx(metrics["teacher"]["test_top1"])
    assert wsummary["label-1/images_labeled"] == 200
    (artifact,) = [r.artifact for r in records if r.HasField("artifact")]
    assert artifact.type == "report" and artifact.name == "tiny-run-report"
    assert {"report.html", "report.md"} <= {m.path for m in artifact.manifest.contents}
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [0, 0]
    assert kinds.count("exit") == 2

    # --- TensorBoard: the alias still writes its events, now with the step records too
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    scalars: dict[str, list] = {}
    for events in sorted((run / layout.TENSORBOARD).glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    for stage, recs in history.items():
        assert sorted(scalars[f"{stage}/val_top1"]) == [(r["step"], pytest.approx(r["val_top1"])) for r in recs]
        assert f"{stage}/img_s" in scalars and f"{stage}/lr" in scalars
    assert scalars["select-1/selected"] == [(0, selection["num_selected"])]


def test_tracking_keys_and_the_tensorboard_alias():
    assert wanted_backends(load_config(None)) == []
    assert wanted_backends(load_config(None, ["tensorboard=true"])) == ["tensorboard"]
    cfg = load_config(None, ["tracking=[wandb, tensorboard, wandb]", "tensorboard=true"])
    assert wanted_backends(cfg) == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match=r"'tracking\[1\]' must be one of tensorboard, mlflow, wandb; got 'mlfow'"):
        load_config(None, ["tracking=[wandb, mlfow]"])
    with pytest.raises(ConfigError, match="'tracker.wandb_mode' must be one of online, offline, disabled"):
        load_config(None, ["tracker.wandb_mode=sometimes"])
    with pytest.raises(ConfigError, match="'tracker.step_every' must be >= 1"):
        load_config(None, ["tracker.step_every=0"])
    flat = flatten({"data": {"source": "digits"}, "students": [{"model": "a"}, {"model": "b"}], "suites": ["clean"]})
    assert flat == {"data.source": "digits", "students.0.model": "a", "students.1.model": "b", "suites": ["clean"]}


def test_a_missing_tracking_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # importlib finds no mlflow
    with pytest.raises(ConfigError, match=r"tracking: mlflow needs the mlflow package "
                                          r"\(pip install 'noisystudent\[mlflow\]'\)"):
        require_packages(["tensorboard", "mlflow"])
    code = main(["run", "--out", str(tmp_path / "run"), "--quiet",
                 *cli_sets(tiny("students=[]", "tracking=[mlflow]"))])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "pip install 'noisystudent[mlflow]'" in err
    assert not (tmp_path / "run" / "teacher").exists()  # refused before anything trained


class _Recorder:
    run_id = None

    def __init__(self):
        self.calls = []

    def log_metrics(self, values, step=None):
        self.calls.append((values, step))

    def close(self, failed):
        self.calls.append(("closed", failed))


class _Broken(_Recorder):
    def log_metrics(self, values, step=None):
        raise ConnectionError("tracking server went away")


def test_a_backend_failing_mid_run_is_dropped_with_a_warning(caplog):
    ok, broken = _Recorder(), _Broken()
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        with Tracking({"mlflow": broken, "wandb": ok}) as tracking:
            tracking.log({"teacher/loss": 1.0}, 5)
            tracking.log({"teacher/loss": 0.5}, 10)
            assert list(tracking.trackers) == ["wandb"]
    assert ok.calls == [({"teacher/loss": 1.0}, 5), ({"teacher/loss": 0.5}, 10), ("closed", False)]
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["tracking: mlflow failed (ConnectionError: tracking server went away); "
                        "it logs nothing more in this run"]


def test_only_rank_0_tracks_and_a_damaged_ids_file_starts_new_runs(tmp_path, caplog):
    from noisystudent.runtime.distributed import DistContext

    cfg = load_config(None, ["tracking=[tensorboard]"])
    with Tracking.open(cfg, tmp_path, DistContext(rank=1, world_size=2)) as tracking:
        assert not tracking.active and tracking.stage(tmp_path, "teacher").hooks().on_step is None
    assert not (tmp_path / layout.TENSORBOARD).exists()
    (tmp_path / layout.TRACKING).write_text('{"mlflow": ')  # cut short
    with caplog.at_level(logging.WARNING, logger="noisystudent"):
        with Tracking.open(cfg, tmp_path, DistContext()) as tracking:
            assert list(tracking.trackers) == ["tensorboard"]
            assert tracking.stage(tmp_path, "teacher").hooks().on_step is not None
    assert "tracking.json is unreadable" in caplog.text
    assert list((tmp_path / layout.TENSORBOARD).glob("events.out.tfevents.*"))
