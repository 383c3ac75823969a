"""benchmarks/vs_timm.py stays runnable: ours and the loop from timm's pieces on a few images
(--quick), with both sides' phase breakdowns in its JSON. The figures are in docs/benchmarks.md."""

import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import vs_timm  # noqa: E402

pytestmark = pytest.mark.slow  # whole processes on both sides, if tiny ones


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An MNIST-format IDX file, gzipped (the format of /usr/share/datasets/fashion-mnist)."""
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_quick_comparison_reports_ratios_and_both_breakdowns(tmp_path, capsys):
    digits = load_digits()
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", digits.images * 16)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", digits.target)
    result = vs_timm.main(["--quick", "--job", "resnet18", "--idx-dir", str(tmp_path),
                           "--workdir", str(tmp_path / "work")])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    images = tmp_path / "work" / "images-resnet18-8"
    assert [len(list((images / "train" / f"class_{c}").glob("*.png"))) for c in range(10)] == [8] * 10
    assert [len(list((images / "val" / f"class_{c}").glob("*.png"))) for c in range(10)] == [4] * 10
    (job,) = result["jobs"]
    assert job["pairs"] == 1 and job["wall_ratio"] > 0 and job["per_epoch_ratio"] > 0
    assert job["wall_ratio"] == pytest.approx(job["ours_wall"] / job["timm_wall"])
    ours, timm = job["ours_phases"], job["timm_phases"]
    teacher = next(s for s in ours["stages"] if s["stage"] == "teacher")
    assert len(teacher["epochs"]) == 1 and teacher["final_measurement"] > 0 and ours["startup"] > 0
    assert len(timm["epochs"]) == 1 and timm["train"] > 0 and timm["val"] > 0 and timm["startup"] > 0
    assert job["ours_per_epoch"] == pytest.approx(teacher["epochs"][0]["train"] + teacher["epochs"][0]["val"])
    # training per step: ours' epoch is a full pass (80 images, batch 16: 5 steps), timm drops nothing here
    assert timm["steps_per_epoch"] == 5 and job["per_step_ratio"] == pytest.approx(
        (teacher["epochs"][0]["train"] / 5) / (timm["epochs"][0]["train"] / 5))
    assert len(job["loads"]) == 1 and job["loads"][0] >= 0
    assert result["cpu"] and result["threads"] == 1 and result["precision"] == "fp32"
