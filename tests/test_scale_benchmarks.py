"""benchmarks/pipeline_scale.py and benchmarks/select_scale.py stay runnable: tiny sizes, seconds.

The figures they exist for (10^4-10^6 pool images, 10^7 selection rows) are in docs/benchmarks.md;
here only the JSON they print and the plumbing behind it are checked.
"""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import pipeline_scale  # noqa: E402
import select_scale  # noqa: E402

pytestmark = pytest.mark.slow  # whole benchmark runs, if tiny ones


def _last_json(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_pipeline_scale_runs_the_whole_loop_per_pool_form(capsys, tmp_path):
    result = pipeline_scale.main(["--wds-sizes", "150", "--folder-sizes", "150", "--steps", "3",
                                  "--tar-size", "64", "--shard-size", "64",
                                  "--work", str(tmp_path)])
    assert _last_json(capsys) == json.loads(json.dumps(result))
    cases = {"webdataset-150", "folder-150"}
    for key in ("peak_rss_mb", "worker_peak_rss_mb", "stage_seconds", "label_img_s", "student_img_s",
                "student_steps", "selected", "stage_rss_mb"):
        assert set(result[key]) == cases, key
    assert result["rss_ratio"] >= 1.0 and result["worker_rss_ratio"] >= 1.0 and result["same_steps"]
    for case in cases:
        assert result["peak_rss_mb"][case] > 0 and result["worker_peak_rss_mb"][case] > 0  # one worker ran
        assert result["student_steps"][case] == 3  # the same steps whatever the pool size
        assert result["selected"][case] > 0
        assert {"teacher", "label-1", "select-1", "student-1", "evaluate"} <= set(result["stage_seconds"][case])
    assert not list(tmp_path.glob("pool-*")) and not list(tmp_path.glob("run-*"))  # big data removed


def test_select_scale_times_duckdb_and_the_radix_code_from_git(capsys):
    result = select_scale.main(["--rows", "20000", "--shards", "4", "--classes", "50", "--per-class", "150",
                                "--compare-radix"])
    assert _last_json(capsys) == json.loads(json.dumps(result))
    assert set(result["seconds"]) == set(result["peak_rss_mb"]) == {"duckdb", "radix"}
    assert result["ratio_duckdb_to_radix"] > 0 and result["num_selected"] > 0
    # Both codes make the same selection: the same counts, and the same top K where a class is full.
    assert result["same_counts"] and result["overfull_classes"] > 0 and result["overfull_keys_differing"] == 0
