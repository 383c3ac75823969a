"""Crash safety: a stage killed with SIGKILL, or stopped by SIGTERM, resumes from its last
checkpoint and ends exactly (bit for bit, on CPU) where an uninterrupted run ends."""

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from noisystudent.train.loop import TrainingPreempted
from noisystudent.train.state import list_checkpoints, load_checkpoint_file
from _train_scenarios import run_resumable

SCRIPT = Path(__file__).with_name("_train_scenarios.py")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the same thread count as the resumed runs, for bit-identical results
    try:
        return run_resumable(tmp_path_factory.mktemp("uninterrupted"))
    finally:
        torch.set_num_threads(before)


def assert_same_run(resumed: dict, reference: dict) -> None:
    assert resumed["result"]["history"] == reference["result"]["history"]
    assert resumed["result"]["best_val_top1"] == reference["result"]["best_val_top1"]
    for key, value in reference["weights"].items():
        assert torch.equal(resumed["weights"][key], value), key


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_matches_uninterrupted(tmp_path, uninterrupted):
    # 8 labeled images per step, checkpoints every 3 steps: the 84th image is loaded in step 11,
    # after the checkpoint of step 9 and before the one of step 12.
    proc = subprocess.run([sys.executable, str(SCRIPT), "resumable", str(tmp_path), "84"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-000000006.pt",
                                                                             "step-000000009.pt"]
    assert not (tmp_path / "result.json").exists()
    resumed = run_resumable(tmp_path)
    assert resumed["result"]["resumed_from_step"] == 9
    assert_same_run(resumed, uninterrupted)


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_and_stops_cleanly(tmp_path, uninterrupted):
    def previous_handler(signum, frame):
        raise AssertionError("the training loop should have handled SIGTERM")

    old = signal.signal(signal.SIGTERM, previous_handler)
    try:
        # SIGTERM while loading step 5's images (no checkpoint is due at step 5).
        with pytest.raises(TrainingPreempted, match=r"SIGTERM after step 5/21.*step-000000005\.pt.*--resume") as e:
            run_resumable(tmp_path, signal_at=36, signum=signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is previous_handler  # restored on the way out
    finally:
        signal.signal(signal.SIGTERM, old)
    assert e.value.checkpoint == tmp_path / "checkpoints" / "step-000000005.pt"
    ckpt = load_checkpoint_file(e.value.checkpoint)  # weights_only: tensors and plain data
    assert ckpt["step"] == 5 and ckpt["streams"]["pseudo"]["next_step"] == 5
    assert {"model", "optimizer", "scheduler", "ema", "scaler", "ranks", "progress"} <= set(ckpt)
    resumed = run_resumable(tmp_path)
    assert resumed["result"]["resumed_from_step"] == 5
    assert_same_run(resumed, uninterrupted)
