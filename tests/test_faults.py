"""Faults as users meet them: the CLI killed with SIGKILL in the middle of a stage and resumed, a
full disk, a second process on the same run directory, a torchrun peer that died.

The SIGKILL table runs the real command in a subprocess (``python -m noisystudent run``), kills it
with ``kill -9`` once the stage has left something to continue from, then runs
``noisystudent run --resume RUN_DIR`` and checks that the finished stages were skipped, that the
interrupted one continued from what it left, and that ``summary.json`` equals an uninterrupted
run's. A stage joins the table with one row (what to wait for; what the resumed log says).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from _tiny import cli_sets, free_port, tiny
from noisystudent.cli import main
from noisystudent.runtime import files
from noisystudent.runtime.errors import StorageError
from noisystudent.runtime.rundir import CHECKPOINTS, LOCK, LOG, MANIFEST, SUMMARY, RunDir, write_json_atomic

# A digits run of a few seconds of compute: a teacher and one student, checkpoints every 2 steps,
# and an evaluation long enough (corruptions) to be killed in the middle. fp32: `auto` precision
# is chosen by timing, which could differ between the reference and the killed run.
# The student trains at 12 px and is tested at 16 px, so a fix-res stage follows; 4-image label
# shards give the label stage many shards to be killed between.
TINY = tiny("teacher.epochs=4", "train.epochs=2", "train.checkpoint_every=2", "data.max_unlabeled=400",
            "pseudo.shard_size=4", "finetune.epochs=2", "students=[{model: ns_cnn_s, image_size: 12, test_size: 16}]",
            "evaluate.suites=[clean, corruptions]", "evaluate.max_images=40", "evaluate.severities=[1, 3]")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "noisystudent", *args]


def _results(run: Path) -> dict:
    """What must not depend on a kill: every stage's accuracies and the robustness numbers."""
    summary = json.loads((run / SUMMARY).read_text())
    return {"stages": [(s["name"], s["val_top1"], s["test_top1"], s.get("val_top5"), s.get("test_top5"))
                       for s in summary["stages"]],
            "robustness": summary.get("robustness")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The same run, never interrupted."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = subprocess.run(_cli("run", "--out", str(run), "--quiet", *cli_sets(TINY)), env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return _results(run)


def _files(run: Path, pattern: str) -> list[Path]:
    return sorted(run.glob(pattern))


@dataclass
class Kill:
    stage: str
    ready: Callable[[Path], bool]  # the stage has left something to continue from: kill now
    continued: str  # in the resumed run's log: it continued from there ({run}: the run directory)


KILLS = [
    Kill("teacher", lambda run: bool(_files(run, f"{CHECKPOINTS}/teacher/step-*.pt")),
         "[teacher] resuming from"),
    Kill("label-1", lambda run: len(_files(run, "label-1/done/part-*.json")) >= 3,
         "[label-1] resuming at the first unfinished shard"),
    Kill("student-1", lambda run: bool(_files(run, f"{CHECKPOINTS}/student-1/step-*.pt")),
         "[student-1] resuming from"),
    Kill("fixres", lambda run: bool(_files(run, f"{CHECKPOINTS}/fixres/step-*.pt")),
         "[fixres] resuming from"),
    Kill("evaluate", lambda run: bool(_files(run, f"{CHECKPOINTS}/evaluate/*/*.json")),
         "finished earlier ({run}/" + f"{CHECKPOINTS}/evaluate/"),
]


@pytest.mark.slow
@pytest.mark.parametrize("kill", KILLS, ids=[k.stage for k in KILLS])
def test_sigkill_during_a_stage_then_resume_equals_an_uninterrupted_run(tmp_path, reference, kill):
    run = tmp_path / "run"
    proc = subprocess.Popen(_cli("run", "--out", str(run), "--quiet", *cli_sets(TINY)), env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    try:
        while not kill.ready(run):
            assert proc.poll() is None, (f"the run ended before {kill.stage} could be killed:\n"
                                         + proc.stderr.read()[-3000:])
            assert time.time() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((run / MANIFEST).read_text())
    finished = dict(manifest["stages"])
    assert kill.stage not in finished
    assert json.loads((run / LOCK).read_text())["pid"] == proc.pid  # left behind by kill -9: stale

    resumed = subprocess.run(_cli("run", "--resume", str(run), "--quiet"), env=ENV, capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = json.loads((run / MANIFEST).read_text())["stages"]
    for name, record in finished.items():  # skipped: not run again
        assert after[name]["finished"] == record["finished"], name
    assert kill.stage in after
    assert kill.continued.format(run=run) in (run / LOG).read_text()
    assert not (run / LOCK).exists()
    assert _results(run) == reference


# ------------------------------------------------------------------------------ a full disk


def _full_disk_after(nbytes: int, when: Callable[[str], bool] = lambda name: True):
    """An ``open`` for runtime.files whose files take ``nbytes`` and then raise ENOSPC."""
    real_open = open

    class Full:
        def __init__(self, f):
            self.f, self.left = f, nbytes

        def write(self, data):
            if len(data) > self.left:
                self.f.write(bytes(data[: self.left]))
                self.left = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self.left -= len(data)
            return self.f.write(data)

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Full(f) if "w" in mode and when(Path(path).name) else f

    return fake_open


def test_full_disk_is_one_line_and_leaves_no_temp_file(tmp_path, monkeypatch):
    from noisystudent.models.checkpoint import save_model
    from noisystudent.models.factory import create_model
    from noisystudent.train.state import save_checkpoint

    monkeypatch.setattr(files, "open", _full_disk_after(100), raising=False)
    writes = [
        ("checkpoints", lambda: save_checkpoint(tmp_path / "ck", 7, {"format": 1, "w": torch.zeros(1000)}, keep=2),
         tmp_path / "ck", "step-000000007.pt"),
        ("model", lambda: save_model(tmp_path / "model.pt", create_model("ns_cnn_s", 10, 1), name="ns_cnn_s",
                                     num_classes=10, in_chans=1, classes=list("0123456789"), image_size=16,
                                     mean=(0.5,), std=(0.2,)), tmp_path, "model.pt"),
        ("json", lambda: write_json_atomic(tmp_path / "metrics.json", {"x": list(range(1000))}), tmp_path,
         "metrics.json"),
    ]
    for what, write, folder, name in writes:
        with pytest.raises(StorageError) as e:
            write()
        message = str(e.value)
        assert message.startswith(f"disk full: no space left on the device holding {folder} "
                                  f"(while writing {name})"), what
        assert "\n" not in message and "--resume" in message
        assert not list(folder.glob(".*.tmp")) and not (folder / name).exists(), what


def test_full_disk_during_a_run_is_one_line_on_the_cli(tmp_path, tiny_overrides, monkeypatch, capsys):
    monkeypatch.setattr(files, "open", _full_disk_after(64, when=lambda name: name.startswith(".step-")),
                        raising=False)
    run = tmp_path / "run"
    code = main(["run", "--out", str(run), "--quiet", *cli_sets(tiny_overrides + ["students=[]",
                                                                               "train.checkpoint_every=1",
                                                                               "data.labels_per_class=null"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("noisystudent: error: disk full: no space left on the device holding "
                             f"{run / CHECKPOINTS / 'teacher'} (while writing step-000000001.pt)")
    assert not list(run.rglob("*.tmp"))
    assert not (run / LOCK).exists()  # released on the way out


# ------------------------------------------------------------------------------ the run's lock


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_lock_refuses_a_second_process_in_one_line(tmp_path, tiny_overrides, capsys):
    from noisystudent.config.schema import load_config

    run = tmp_path / "run"
    RunDir.open(run, load_config(None, tiny_overrides), resume=False).release_lock()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid, "since": time.time()}))
        code = main(["run", "--resume", str(run), "--quiet"])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1
        assert err[0].startswith(f"noisystudent: error: run directory {run} is in use by PID {holder.pid} on "
                                 f"{socket.gethostname()} (since ")
        assert json.loads((run / LOCK).read_text())["pid"] == holder.pid  # untouched
        # another host's lock cannot be checked: it holds too
        (run / LOCK).write_text(json.dumps({"host": "elsewhere", "pid": _dead_pid(), "since": time.time()}))
        with pytest.raises(StorageError, match="in use by PID .* on elsewhere"):
            RunDir(run).acquire_lock()
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_replaced_and_released_at_the_end(tmp_path, caplog):
    from noisystudent.config.schema import load_config

    run = tmp_path / "run"
    run.mkdir()
    dead = _dead_pid()
    (run / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "since": 0}))
    opened = RunDir.open(run, load_config(None), resume=False)
    assert json.loads((run / LOCK).read_text())["pid"] == os.getpid()
    assert f"removing the stale lock of PID {dead}" in caplog.text
    opened.release_lock()
    assert not (run / LOCK).exists()


# ------------------------------------------------------------------------------ torchrun peers


PEER = """
import os, signal, sys
import torch
from noisystudent.runtime.distributed import DistContext, barrier
from noisystudent.runtime.errors import NoisyStudentError
import torch.distributed as dist
dist.init_process_group("gloo")
ctx = DistContext(rank=dist.get_rank(), world_size=2)
barrier(ctx)
if ctx.rank == 1:
    os.kill(os.getpid(), signal.SIGKILL)
try:
    barrier(ctx)
except NoisyStudentError as e:
    print(type(e).__name__ + ": " + str(e))
    sys.exit(2)
"""


def test_a_killed_rank_is_one_line_on_the_others(tmp_path):
    """Two gloo processes started by hand (torchrun would SIGTERM the survivor at once): rank 1 is
    killed with SIGKILL; rank 0's barrier reports it in one line with the resume command."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", PEER], env=dict(
        ENV, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(r), LOCAL_RANK=str(r)),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    out, err = procs[0].communicate(timeout=120)
    procs[1].wait(timeout=120)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 2, err[-2000:]
    assert out.startswith("RankFailure: rank 0: another process of this job died during barrier (")
    assert out.strip().endswith("then continue with: noisystudent run --resume RUN_DIR")
    assert "Traceback" not in err


def test_a_dead_peer_in_ddp_backward_is_one_line_naming_the_run(tmp_path, monkeypatch, capsys):
    """DDP's gradient all-reduce fails inside backward, outside the collective helpers: the CLI
    turns gloo's error into the same line, with the run directory filled in."""
    import noisystudent.pipeline as pipeline

    def broken(*args, **kwargs):
        raise RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                           "[127.0.0.1]:12345. This is typically caused by a remote worker crashing.")

    monkeypatch.setattr(pipeline, "run_pipeline", broken)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["run", "--out", str(tmp_path / "run"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "another process of this job died during a collective operation (Connection closed by peer " in err[0]
    assert err[0].endswith(f"then continue with: noisystudent run --resume {tmp_path / 'run'}")
    monkeypatch.setenv("WORLD_SIZE", "1")  # one process: a RuntimeError is a bug, never hidden
    with pytest.raises(RuntimeError, match="Connection closed"):
        main(["run", "--out", str(tmp_path / "run2"), "--quiet"])


# ------------------------------------------------------------------------------ evaluate


@pytest.mark.slow
def test_evaluate_into_a_run_continues_after_a_crash(tmp_path, tiny_overrides, monkeypatch, capsys):
    """`noisystudent evaluate RUN` keeps each finished (suite, model) in RUN/checkpoints/evaluate:
    after a crash the rerun computes only what was missing, and the lock is released either way."""
    import noisystudent.evaluate.classifier as classifier

    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--quiet", *cli_sets(tiny_overrides + ["students=[]", "teacher.epochs=1"])]) == 0
    real, calls, crashed = classifier.evaluate_robustness, [], []

    def crash_once_in_fgsm(model, dataset, settings, **kwargs):
        calls.append(list(settings.suites))
        if calls[-1] == ["fgsm"] and not crashed:
            crashed.append(True)
            raise RuntimeError("simulated crash")
        return real(model, dataset, settings, **kwargs)

    monkeypatch.setattr(classifier, "evaluate_robustness", crash_once_in_fgsm)
    argv = ["evaluate", str(run), "--suite", "clean,fgsm", "--max-images", "20", "--quiet"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        main(argv)
    assert calls == [["clean"], ["fgsm"]]
    assert (run / CHECKPOINTS / "evaluate" / "clean" / "teacher.json").is_file()
    assert not (run / LOCK).exists()
    calls.clear()
    assert main(argv) == 0, capsys.readouterr().err
    assert calls == [["fgsm"]]  # clean was not evaluated again
    results = json.loads((run / "evaluate" / "robustness.json").read_text())
    assert {"clean", "fgsm"} <= set(results["teacher"]) and results["teacher"]["clean"]["n"] == 20
    assert (run / "evaluate" / "fgsm" / "teacher.json").is_file()  # the committed stage keeps them too
    assert not (run / CHECKPOINTS / "evaluate").exists() and not (run / LOCK).exists()


def test_full_disk_before_the_manifest_advises_the_same_command_not_resume(tmp_path, monkeypatch, capsys):
    """Before manifest.json exists there is no run to resume: the line says to run the same
    command again, and that command then starts the run in the same folder."""
    from noisystudent.config.schema import load_config

    monkeypatch.setattr(files, "open", _full_disk_after(0, when=lambda name: name.startswith(f".{MANIFEST}.")),
                        raising=False)
    run = tmp_path / "run"
    assert main(["run", "--out", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"noisystudent: error: disk full: no space left on the device holding {run} (while writing "
                   f"{MANIFEST}); the run in {run} has not started: free some space and run the same command again"]
    assert not (run / MANIFEST).exists() and not list(run.glob(".*.tmp")) and not (run / LOCK).exists()
    monkeypatch.undo()
    RunDir.open(run, load_config(None), resume=False).release_lock()  # what the same command does first
    assert RunDir(run).manifest()["stages"] == {}


# ------------------------------------------------------------------------------ damaged stage outputs

# A run stopped after its label stage (per-stage commands): 4 shards of 25 pool images.
LABELED = tiny("teacher.epochs=1", "data.max_unlabeled=100", "pseudo.shard_size=25", "students=[{model: ns_cnn_s}]")


@pytest.fixture(scope="module")
def labeled_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("labeled") / "run"
    sets = [a for o in LABELED for a in ("--set", o)]
    assert main(["train", str(run), "--quiet", *sets]) == 0
    assert main(["label", str(run), "--quiet"]) == 0
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to / "run")
    return to / "run"


@pytest.mark.parametrize("damage", ["cut short", "deleted"])
def test_a_finished_label_stage_with_a_damaged_shard_labels_it_again(labeled_run, tmp_path, capsys, damage):
    """A shard cut short or deleted after its label stage finished: `select` (and `run --resume`)
    does not advise a resume that would skip the stage again; the runner labels the shard again
    (the same rows: the same teacher) and selects."""
    import pyarrow.parquet as pq

    run = _copy(labeled_run, tmp_path)
    shard = run / "label-1" / "shards" / "part-000001.parquet"
    if damage == "deleted":
        shard.unlink()
    else:
        shard.write_bytes(shard.read_bytes()[:300])
    assert main(["select", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert (f"[label-1] finished earlier, but pseudo-label store {run / 'label-1'} is incomplete: 3 of 4 shards "
            "finished and intact") in err and "running it again" in err
    original = pq.read_table(labeled_run / "label-1" / "shards" / "part-000001.parquet")
    assert pq.read_table(shard).equals(original)
    assert (run / "select-1" / "selection.parquet").is_file()


def test_a_corrupt_shard_of_the_same_size_is_one_line_naming_it(labeled_run, tmp_path, capsys):
    """Bytes overwritten in place (the size unchanged): DuckDB's error names no file, so the line
    names the shard pyarrow cannot read either and says what to do; doing it works."""
    run = _copy(labeled_run, tmp_path)
    shard = run / "label-1" / "shards" / "part-000002.parquet"
    data = bytearray(shard.read_bytes())
    data[4:-200] = b"\xff" * (len(data) - 204)
    shard.write_bytes(bytes(data))
    assert main(["select", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"noisystudent: error: damaged pseudo-label shard {shard} ("), err
    assert err[0].endswith("); delete it and run the command again: its images are labeled again")
    assert not (run / "select-1").exists()
    shard.unlink()
    assert main(["select", str(run), "--quiet"]) == 0


@pytest.mark.slow
def test_sigterm_during_labeling_says_how_to_resume(tmp_path, capsys):
    """SIGTERM while the label stage runs (no checkpoint to write: its shards are its progress):
    exit 143 with one line naming the command that resumes it, which then finishes the store."""
    run = tmp_path / "run"
    sets = [a for o in LABELED + ["data.max_unlabeled=800", "pseudo.shard_size=4"] for a in ("--set", o)]
    assert main(["train", str(run), "--quiet", *sets]) == 0
    proc = subprocess.Popen(_cli("label", str(run), "--quiet"), env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        while len(list((run / "label-1" / "done").glob("*.json"))) < 2 and proc.poll() is None:
            assert time.time() < deadline, "the label stage did not start"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    assert err.strip().splitlines() == [f"noisystudent: stopped by SIGTERM; what finished is kept: resume with "
                                        f"`noisystudent label {run}`"]
    done_before = len(list((run / "label-1" / "done").glob("*.json")))
    assert 2 <= done_before < 200
    assert main(["label", str(run)]) == 0
    assert f"resuming at the first unfinished shard: {done_before} of 200 shards were labeled earlier" in \
        capsys.readouterr().err
    assert len(list((run / "label-1" / "done").glob("*.json"))) == 200


def test_a_finished_selection_cut_short_is_selected_again(labeled_run, tmp_path, capsys):
    """selection.arrow (what students read) cut short after select-1 finished: the student's
    command selects again (the same bytes) instead of dying in pyarrow."""
    run = _copy(labeled_run, tmp_path)
    assert main(["select", str(run), "--quiet"]) == 0
    expanded = run / "select-1" / "selection.arrow"
    whole = expanded.read_bytes()
    expanded.write_bytes(whole[: len(whole) // 2])
    assert main(["train", str(run), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert f"[select-1] finished earlier, but selection file {expanded} is missing or damaged" in err
    assert expanded.read_bytes() == whole and (run / "student-1" / "model.pt").is_file()
