"""Two CPU processes under torchrun (gloo) train the teacher and the student exactly as one
process with the whole global batch does, with the pseudo:labeled ratio of every step kept, and
stop together on a SIGTERM that reaches only one of them. One torchrun launch (about 10 s of
process start-up) serves all the checks. A whole run under torchrun reports the numbers of the
models it saves, also after one rank is killed and the run resumed."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from noisystudent.runtime.distributed import DistContext
from noisystudent.train.state import load_checkpoint_file
from _tiny import cli_sets, tiny, torchrun, torchrun_argv
from _train_scenarios import digits_data, run_distributed, tiny_stage

SCRIPT = Path(__file__).with_name("_train_scenarios.py")


@pytest.mark.slow
def test_two_processes_match_one_and_stop_together_on_sigterm(tmp_path):
    proc = torchrun(str(SCRIPT), "distributed", str(tmp_path / "two"))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_distributed(tmp_path / "one")  # the reference: one process, no torchrun
        # The pre-empted 2-process student, resumed here by 1 process (a smaller allocation).
        data = digits_data(num_pseudo=64, augment=False)
        resumed, outcome, _ = tiny_stage(DistContext(), data, "student",
                                         tmp_path / "two" / "checkpoints" / "preempted")
    finally:
        torch.set_num_threads(before)

    one, two = (json.loads((tmp_path / d / "result.json").read_text()) for d in ("one", "two"))
    for stage in ("teacher", "student"):
        w1 = torch.load(tmp_path / "one" / f"{stage}-weights.pt")
        w2 = torch.load(tmp_path / "two" / f"{stage}-weights.pt")
        for key in w1:  # equal up to float summation order (gradients averaged over 2 halves)
            torch.testing.assert_close(w2[key], w1[key], rtol=1e-5, atol=1e-6)
        assert two[stage]["history"][-1]["val_top1"] == one[stage]["history"][-1]["val_top1"]
        assert abs(two[stage]["history"][-1]["loss"] - one[stage]["history"][-1]["loss"]) < 1e-5
        # Logging and checkpoints on rank 0 only; the checkpoint holds both ranks' RNG states.
        assert proc.stderr.count(f"[{stage}] epoch 1/1") == 1
        ckpt = load_checkpoint_file(tmp_path / "two" / "checkpoints" / stage / "step-000000007.pt")
        assert len(ckpt["ranks"]) == 2

    # Per step: rank r holds the r-th half of the single process's labeled batch (8 images) and
    # of its pseudo-labeled batch (24 images): 4 + 12 images each, ratio 3 on every rank.
    single = json.loads((tmp_path / "one" / "fetched-rank0.json").read_text())["student"]
    ranks = [json.loads((tmp_path / "two" / f"fetched-rank{r}.json").read_text())["student"] for r in (0, 1)]
    for stream, global_batch in (("labeled", 8), ("pseudo", 24)):
        local = global_batch // 2
        steps = len(single[stream]) // global_batch
        assert steps == 7 and all(len(r[stream]) == steps * local for r in ranks)
        for k in range(steps):
            joined = ranks[0][stream][k * local:(k + 1) * local] + ranks[1][stream][k * local:(k + 1) * local]
            assert joined == single[stream][k * global_batch:(k + 1) * global_batch]

    # SIGTERM reached rank 1 only; both ranks stopped after the same step, one checkpoint was
    # written, and the run continued on one process from there to the same weights.
    reports = [json.loads((tmp_path / "two" / f"preempted-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["preempted"] for r in reports)
    assert reports[0]["checkpoint"] == reports[1]["checkpoint"]
    assert "SIGTERM after step 3/7" in reports[0]["message"]
    assert reports[0]["checkpoint"].endswith("step-000000003.pt")  # not a regular one (every 2 steps)
    assert outcome.resumed_from_step == 3
    w2 = torch.load(tmp_path / "two" / "student-weights.pt")
    for key, value in resumed.state_dict().items():
        torch.testing.assert_close(value, w2[key], rtol=1e-5, atol=1e-6)


def test_missing_cuda_devices_are_a_one_line_config_error(monkeypatch):
    import pytest

    from noisystudent.runtime.distributed import select_device
    from noisystudent.runtime.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert select_device("auto", 0) == torch.device("cuda:0")
    assert select_device("cuda", 0) == torch.device("cuda:0")
    with pytest.raises(ConfigError, match="local rank 1.*--nproc-per-node 1"):
        select_device("auto", 1)
    with pytest.raises(ConfigError, match="cuda:3"):
        select_device("cuda:3", 0)
    assert select_device("cpu", 5) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert select_device("auto", 1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="no CUDA device"):
        select_device("cuda", 0)


# ------------------------------------------------------------------------------ a whole run under torchrun

# Teacher and one student of the same architecture (so no baseline stage), with BatchNorm (ns_cnn_s),
# long enough for a kill to land in the middle of the student (6 epochs, a checkpoint every 2 steps).
RUN = tiny("train.epochs=6", "train.checkpoint_every=2", "students=[{model: ns_cnn_s}]")
TORCHRUN = torchrun_argv("-m", "noisystudent")
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")



def _reported(run: Path) -> list[tuple]:
    summary = json.loads((run / "summary.json").read_text())
    return [(s["name"], s["val_top1"], s["test_top1"], s["test_top5"]) for s in summary["stages"]]


def _reevaluated(run: Path) -> list[tuple]:
    """Each stage's saved model.pt evaluated again by one process, on the run's own splits."""
    from noisystudent.config.schema import load_config
    from noisystudent.data.datasets import TransformedSet
    from noisystudent.data.splits import build_splits
    from noisystudent.evaluate.classifier import evaluate_classifier
    from noisystudent.models.checkpoint import clean_transform, load_model

    cfg = load_config(run / "config.yaml")
    splits = build_splits(cfg.data, cfg.seed, require_unlabeled=False)
    out = []
    for name, *_ in _reported(run):
        model, meta = load_model(run / name / "model.pt")
        m = {split: evaluate_classifier(model, TransformedSet(images, clean_transform(meta)), torch.device("cpu"))
             for split, images in (("val", splits.val), ("test", splits.test))}
        out.append((name, m["val"]["top1"], m["test"]["top1"], m["test"]["top5"]))
    return out


def _rank_pid(agent: int, rank: int) -> int | None:
    """The PID of torchrun worker ``rank`` (a child of the agent with RANK=rank in its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == agent and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    return None


@pytest.mark.slow
def test_two_process_run_reports_its_saved_models_also_after_a_rank_is_killed(tmp_path):
    """Under torchrun every rank evaluates with rank 0's BatchNorm statistics, the ones saved: the
    summary equals a one-process evaluation of each model.pt. A kill -9 of rank 1 in the middle of
    the student, then --resume, ends with the same numbers as the uninterrupted run."""
    whole = tmp_path / "whole"
    proc = subprocess.run([*TORCHRUN, "run", "--out", str(whole), "--quiet", *cli_sets(RUN)], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    reported = _reported(whole)
    assert [r[0] for r in reported] == ["teacher", "student-1"]
    assert reported == _reevaluated(whole)

    killed = tmp_path / "killed"
    agent = subprocess.Popen([*TORCHRUN, "run", "--out", str(killed), "--quiet", *cli_sets(RUN)], env=ENV,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not list((killed / "checkpoints" / "student-1").glob("step-*.pt")):
            assert agent.poll() is None and time.time() < deadline, "the run ended before the student checkpointed"
            time.sleep(0.05)
        pid = _rank_pid(agent.pid, 1)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        assert agent.wait(timeout=300) != 0
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait()
    assert not (killed / "summary.json").exists()
    proc = subprocess.run([*TORCHRUN, "run", "--resume", str(killed), "--quiet"], env=ENV,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "[student-1] resuming from" in (killed / "run.log").read_text()
    assert _reported(killed) == reported
    assert _reevaluated(killed) == reported
