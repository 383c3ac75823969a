"""Two CPU processes under torchrun (gloo) train the teacher and the student exactly as one
process with the whole global batch does, with the pseudo:labeled ratio of every step kept, and
stop together on a SIGTERM that reaches only one of them. One torchrun launch (about 10 s of
process start-up) serves all the checks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from noisystudent.runtime.distributed import DistContext
from noisystudent.train.state import load_checkpoint_file
from _tiny import torchrun
from _train_scenarios import digits_data, run_distributed, tiny_stage

SCRIPT = Path(__file__).with_name("_train_scenarios.py")


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
