"""benchmarks/cuda_check.py stays runnable between the sessions that have a GPU: a CPU smoke run."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import cuda_check  # noqa: E402

pytestmark = pytest.mark.slow


def test_cpu_smoke_run_measures_training_and_labeling_against_the_model_bound_rate(capsys):
    result = cuda_check.main(["--device", "cpu", "--model", "ns_cnn_s", "--size", "32", "--steps", "8",
                              "--batch", "4", "--ratio", "1", "--workers", "0", "--images", "48", "--variants"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == json.loads(json.dumps(result))
    assert result["jpegs"]["images"] == 48
    # fp16 needs CUDA's gradient scaler, so a CPU run has the other four
    assert set(result["train"]) == {"fp32", "bf16", "bf16 contiguous", "bf16 + EMA"}
    for name, r in result["train"].items():
        assert r["finite"] and r["steps"] == 8 and r["end_to_end_img_s"] > 0, name
        assert r["img_s"] is None or r["img_s"] > 0  # None: the long run was not slower than the short
    assert result["train"]["bf16"]["model_bound_img_s"] > 0
    assert result["train_ratio"] is None or result["train_ratio"] > 0
    label = result["label"]
    assert label["images"] == 48 and label["precision"] in ("fp32", "bf16") and label["model_bound_img_s"] > 0
    assert label["decode"]["decoder"] == "cpu"  # a CPU device never decodes on the GPU path
    assert "label_ratio" in result
